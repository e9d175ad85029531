//! End-to-end relay with real peers on loopback: ringmta → ringmta, ringmta
//! → Postfix's smtp-sink, MX routing through a dnsmasq the test starts, and
//! the faults a relay meets (refusals, a downstream that is down, then up).

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{peer_program, Server};

fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn maildir_files(server: &Server, mailbox: &str) -> Vec<Vec<u8>> {
    let root = server.spool_dir().parent().unwrap().join("maildir");
    let (local, domain) = mailbox.split_once('@').unwrap();
    let new = root.join(domain).join(local).join("new");
    let Ok(dir) = std::fs::read_dir(&new) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = dir.map(|e| e.unwrap().path()).collect();
    files.sort();
    files.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A relay in front of a downstream ringmta; the downstream keeps what it
/// receives queued (--no-delivery by the harness) so it can be compared.
fn relay_to(downstream: &Server, extra: &[&str]) -> Server {
    relay_to_port(downstream.port, extra)
}

/// The same, towards a port where a downstream may not (yet) listen.
fn relay_to_port(port: u16, extra: &[&str]) -> Server {
    let route = format!("example.net=smtp:127.0.0.1:{port}");
    let mut args = vec![
        "--route",
        &route,
        "--relay-network",
        "127.0.0.0/8",
        "--retry-schedule",
        "1s",
    ];
    args.extend_from_slice(extra);
    Server::start(&args)
}

#[test]
fn relays_byte_for_byte_to_another_ringmta() {
    let downstream = Server::start(&["--local-domain", "example.net"]);
    let relay = relay_to(&downstream, &[]);
    let content: &[u8] = b"Subject: relay test\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n.leading dot\r\n..two dots\r\n.\r\ncaf\xc3\xa9 \xe2\x82\xac\r\nlast line\r\n";
    let mut c = relay.connect();
    c.hello("client.example");
    // Null sender (a bounce), 8-bit body declared as such.
    c.expect("MAIL FROM:<> BODY=8BITMIME", 250);
    c.expect("RCPT TO:<u@example.net>", 250);
    c.expect("DATA", 354);
    c.send(&common::dot_stuff(content));
    let r = c.reply();
    assert_eq!(r.code, 250, "{r:?}");

    wait_until("delivery downstream", Duration::from_secs(20), || {
        !downstream.queued().is_empty()
    });
    let got = downstream.queued();
    assert_eq!(got.len(), 1);
    let m = &got[0];
    assert_eq!(m.mail_from, None, "null sender kept");
    assert_eq!(m.rcpts, ["u@example.net"]);
    assert!(m.has_line("param BODY=8BITMIME"), "{:?}", m.lines);
    // Downstream's trace header, then ours, then exactly what was sent.
    let text = String::from_utf8_lossy(&m.message);
    assert_eq!(text.matches("Received: ").count(), 2, "{text}");
    assert!(
        m.message.ends_with(content),
        "content changed in transit: {text}"
    );
    // Delivered: the relay's queue is empty.
    wait_until("relay queue drained", Duration::from_secs(10), || {
        relay.queued().is_empty()
    });
}

#[test]
fn refusals_bounce_and_temporary_failures_retry_without_duplicates() {
    // Downstream takes one recipient per transaction (452 for the second:
    // deferred and retried) and refuses a non-local domain (550: bounced).
    let downstream = Server::start(&["--local-domain", "example.net", "--max-recipients", "1"]);
    let route2 = format!("other.example=smtp:127.0.0.1:{}", downstream.port);
    let relay = relay_to(&downstream, &["--route", &route2]);
    let mut c = relay.connect();
    c.hello("client.example");
    c.send_message(
        "sender@localhost",
        &["a@example.net", "b@example.net", "x@other.example"],
        b"Subject: partial\r\n\r\nbody\r\n",
    );
    wait_until(
        "both local recipients delivered",
        Duration::from_secs(20),
        || downstream.queued().len() == 2,
    );
    let mut rcpts: Vec<String> = downstream
        .queued()
        .into_iter()
        .flat_map(|q| q.rcpts)
        .collect();
    rcpts.sort();
    assert_eq!(
        rcpts,
        ["a@example.net", "b@example.net"],
        "each exactly once"
    );

    // The refused recipient comes back to the sender as a DSN (delivered
    // into the relay's own Maildir: localhost is its local domain).
    wait_until("bounce", Duration::from_secs(20), || {
        !maildir_files(&relay, "sender@localhost").is_empty()
    });
    let bounce = String::from_utf8(maildir_files(&relay, "sender@localhost").remove(0)).unwrap();
    assert!(bounce.starts_with("Return-Path: <>\r\n"), "{bounce}");
    assert!(bounce.contains("Content-Type: multipart/report; report-type=delivery-status"));
    assert!(
        bounce.contains(
            "Final-Recipient: rfc822; x@other.example\r\nAction: failed\r\nStatus: 5.7.1"
        ),
        "{bounce}"
    );
    assert!(
        bounce.contains("Subject: partial"),
        "original headers returned"
    );
    assert!(
        !bounce.contains("a@example.net\r\nAction"),
        "delivered recipients are not reported"
    );
    wait_until("relay queue drained", Duration::from_secs(10), || {
        relay.queued().len() <= 1
    });
}

#[test]
fn downstream_down_then_up_delivers_once() {
    let port = free_port();
    let relay = relay_to_port(port, &[]);
    let mut c = relay.connect();
    c.hello("client.example");
    for n in 0..3 {
        c.send_message(
            "s@localhost",
            &["u@example.net"],
            format!("Subject: {n}\r\n\r\nx\r\n").as_bytes(),
        );
    }
    // Nobody listens: the messages stay queued (deferred), none is lost.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(relay.queued().len(), 3);
    assert!(relay.wait_for_log("deferred", Duration::from_secs(5)));

    let addr = format!("127.0.0.1:{port}");
    let downstream = Server::start(&["--smtp", &addr, "--local-domain", "example.net"]);
    wait_until(
        "delivery after the downstream came up",
        Duration::from_secs(30),
        || downstream.queued().len() == 3,
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(downstream.queued().len(), 3, "nothing delivered twice");
    wait_until("relay queue drained", Duration::from_secs(10), || {
        relay.queued().is_empty()
    });
}

#[test]
fn delay_warning_is_sent_once_then_the_message_is_delivered() {
    let port = free_port();
    let relay = relay_to_port(port, &["--delay-warning", "2s"]);
    let mut c = relay.connect();
    c.hello("client.example");
    c.send_message(
        "sender@localhost",
        &["u@example.net"],
        b"Subject: slow\r\n\r\nx\r\n",
    );
    // NOTIFY=FAILURE only: this sender asked not to hear about delays.
    c.expect("MAIL FROM:<quiet@localhost>", 250);
    c.expect("RCPT TO:<u@example.net> NOTIFY=FAILURE", 250);
    c.expect("DATA", 354);
    c.send(b"Subject: quiet\r\n\r\nx\r\n.\r\n");
    assert_eq!(c.reply().code, 250);

    // Nobody listens downstream: deferred every second, warned once at 2 s.
    wait_until("delay warning", Duration::from_secs(20), || {
        !maildir_files(&relay, "sender@localhost").is_empty()
    });
    let warning = String::from_utf8(maildir_files(&relay, "sender@localhost").remove(0)).unwrap();
    assert!(warning.starts_with("Return-Path: <>\r\n"), "{warning}");
    assert!(warning.contains("Subject: Delayed Mail (still being retried)\r\n"));
    assert!(
        warning.contains("Final-Recipient: rfc822; u@example.net\r\nAction: delayed\r\nStatus: 4."),
        "{warning}"
    );
    assert!(warning.contains("Will-Retry-Until: "), "{warning}");
    assert!(
        warning.contains("Subject: slow\r\n"),
        "original headers returned"
    );
    // Several more deferrals: still one warning, none for NOTIFY=FAILURE.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(maildir_files(&relay, "sender@localhost").len(), 1);
    assert!(maildir_files(&relay, "quiet@localhost").is_empty());
    assert_eq!(relay.queued().len(), 2, "both still queued");

    let addr = format!("127.0.0.1:{port}");
    let downstream = Server::start(&["--smtp", &addr, "--local-domain", "example.net"]);
    wait_until(
        "delivery once the downstream is up",
        Duration::from_secs(30),
        || downstream.queued().len() == 2,
    );
    wait_until("relay queue drained", Duration::from_secs(10), || {
        relay.queued().is_empty()
    });
    assert_eq!(maildir_files(&relay, "sender@localhost").len(), 1);
}

struct Child_(Child);

impl Drop for Child_ {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn relays_through_smtp_sink() {
    let Some(sink_bin) = peer_program("smtp-sink", "postfix") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let template = format!("{}/%Y%m%d%H%M%S.", dir.path().display());
    let sink = Child_(
        Command::new(&sink_bin)
            .args([
                "-u",
                "nobody",
                "-d",
                &template,
                &format!("127.0.0.1:{port}"),
                "64",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    wait_until("smtp-sink", Duration::from_secs(5), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let relay = Server::start(&[
        "--relay-host",
        &format!("127.0.0.1:{port}"),
        "--relay-network",
        "127.0.0.0/8",
    ]);
    let mut c = relay.connect();
    c.hello("client.example");
    let content = b"Subject: to the sink\r\n\r\n.dot\r\nbody\r\n";
    c.send_message(
        "s@example.org",
        &["r1@remote.example", "r2@remote.example"],
        content,
    );
    wait_until("smtp-sink dump", Duration::from_secs(20), || {
        std::fs::read_dir(dir.path()).unwrap().count() == 1
    });
    let dump_path = std::fs::read_dir(dir.path())
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let dump = std::fs::read(&dump_path).unwrap();
    let text = String::from_utf8_lossy(&dump);
    // smtp-sink writes the envelope as X- headers, then the message with
    // LF line ends.
    assert!(text.contains("X-Mail-Args: <s@example.org>\n"), "{text}");
    assert!(
        text.contains("X-Rcpt-Args: <r1@remote.example>\nX-Rcpt-Args: <r2@remote.example>\n"),
        "{text}"
    );
    let lf = String::from_utf8_lossy(content).replace("\r\n", "\n");
    assert!(text.trim_end().ends_with(lf.trim_end()), "{text}");
    assert!(
        text.contains("by mx.test (ringmta) with ESMTP"),
        "our trace header: {text}"
    );
    wait_until("relay queue drained", Duration::from_secs(10), || {
        relay.queued().is_empty()
    });
    drop(sink);
}

#[test]
fn starttls_to_another_ringmta_shows_esmtps_downstream() {
    let downstream = Server::start(&["--local-domain", "example.net"]);
    // Opportunistic (the default) and required: both go over TLS 1.3.
    for policy in ["opportunistic", "require"] {
        let relay = relay_to(&downstream, &["--tls-policy", policy]);
        let mut c = relay.connect();
        c.hello("client.example");
        let subject = format!("Subject: tls {policy}\r\n\r\nbody\r\n");
        c.send_message("s@localhost", &["u@example.net"], subject.as_bytes());
        wait_until("delivery over TLS", Duration::from_secs(20), || {
            downstream
                .queued()
                .iter()
                .any(|m| m.content().ends_with(subject.as_bytes()))
        });
        let m = downstream
            .queued()
            .into_iter()
            .find(|m| m.content().ends_with(subject.as_bytes()))
            .unwrap();
        assert!(m.has_line("protocol ESMTPS"), "{:?}", m.lines);
        let received = m.received();
        assert!(
            received.contains("with ESMTPS (TLS1.3 TLS_"),
            "downstream trace header: {received}"
        );
        assert!(relay.wait_for_log("outbound TLS established", Duration::from_secs(5)));
        wait_until("relay queue drained", Duration::from_secs(10), || {
            relay.queued().is_empty()
        });
    }
}

#[test]
fn required_tls_with_verification_defers_on_a_self_signed_certificate() {
    let downstream = Server::start(&["--local-domain", "example.net"]);
    let relay = relay_to(
        &downstream,
        &["--tls-policy", "require", "--tls-verify", "on"],
    );
    let mut c = relay.connect();
    c.hello("client.example");
    c.send_message(
        "s@localhost",
        &["u@example.net"],
        b"Subject: verify\r\n\r\nx\r\n",
    );
    assert!(
        relay.wait_for_log("4.7.5", Duration::from_secs(20)),
        "{}",
        relay.stderr()
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        downstream.queued().is_empty(),
        "never sent without verified TLS"
    );
    assert_eq!(relay.queued().len(), 1, "deferred, not lost");
    // And --tls-verify on without require is refused at start.
    let refused = common::Server::builder()
        .args(["--tls-verify", "on"])
        .try_start();
    let err = refused
        .err()
        .expect("--tls-verify on alone must be refused");
    assert!(err.stderr.contains("--tls-policy require"), "{err}");
}

#[test]
fn downstream_silent_after_connect_times_out_and_is_retried() {
    // Accepts and never says a word: the greeting wait must end.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let accepted = Arc::new(AtomicUsize::new(0));
    let silent = {
        let (stop, accepted) = (stop.clone(), accepted.clone());
        std::thread::spawn(move || {
            let mut held = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        accepted.fetch_add(1, Ordering::SeqCst);
                        held.push(conn);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        })
    };
    let relay = relay_to_port(port, &["--relay-banner-timeout", "1s"]);
    let mut c = relay.connect();
    c.hello("client.example");
    c.send_message(
        "s@localhost",
        &["u@example.net"],
        b"Subject: mute\r\n\r\nx\r\n",
    );
    assert!(relay.wait_for_log("timeout waiting for the greeting", Duration::from_secs(15)));
    wait_until("a second attempt", Duration::from_secs(15), || {
        accepted.load(Ordering::SeqCst) >= 2
    });
    assert_eq!(relay.queued().len(), 1, "deferred, not lost");
    stop.store(true, Ordering::SeqCst);
    silent.join().unwrap();
}

/// A fake downstream: greets, offers STARTTLS, says 220 to it and then
/// nothing (a stalled handshake); in plaintext it answers EHLO but never a
/// MAIL. Counts what it saw.
struct StallingServer {
    stop: Arc<AtomicBool>,
    starttls: Arc<AtomicUsize>,
    plaintext_mail: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StallingServer {
    fn start(port: u16) -> StallingServer {
        let listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let starttls = Arc::new(AtomicUsize::new(0));
        let plaintext_mail = Arc::new(AtomicUsize::new(0));
        let (s, t, m) = (stop.clone(), starttls.clone(), plaintext_mail.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let (s, t, m) = (s.clone(), t.clone(), m.clone());
                        std::thread::spawn(move || stall(conn, &s, &t, &m));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        StallingServer {
            stop,
            starttls,
            plaintext_mail,
            thread: Some(thread),
        }
    }
}

impl Drop for StallingServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn stall(conn: std::net::TcpStream, stop: &AtomicBool, starttls: &AtomicUsize, mail: &AtomicUsize) {
    use std::io::{BufRead, Write};
    conn.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut out = conn.try_clone().unwrap();
    let _ = out.write_all(b"220 stall.test ESMTP\r\n");
    let mut reader = std::io::BufReader::new(conn);
    let mut silent = false;
    let mut line = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        match reader.read_until(b'\n', &mut line) {
            Ok(0) => return,
            Ok(_) if line.ends_with(b"\n") => {}
            Ok(_) => continue,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                continue
            }
            Err(_) => return,
        }
        let cmd = String::from_utf8_lossy(&line).to_ascii_uppercase();
        line.clear();
        if silent {
            continue;
        }
        if cmd.starts_with("EHLO") {
            let _ = out.write_all(b"250-stall.test\r\n250-PIPELINING\r\n250 STARTTLS\r\n");
        } else if cmd.starts_with("STARTTLS") {
            starttls.fetch_add(1, Ordering::SeqCst);
            let _ = out.write_all(b"220 2.0.0 go ahead\r\n");
            // The ClientHello arrives and is never answered.
            silent = true;
        } else if cmd.starts_with("MAIL") {
            mail.fetch_add(1, Ordering::SeqCst);
            silent = true;
        } else if cmd.starts_with("QUIT") {
            let _ = out.write_all(b"221 bye\r\n");
            return;
        }
    }
}

#[test]
fn stalled_tls_handshake_times_out_falls_back_and_the_message_waits() {
    let port = free_port();
    let stalling = StallingServer::start(port);
    let route = format!("example.net=smtp:127.0.0.1:{port}");
    let relay = Server::start(&[
        "--route",
        &route,
        "--relay-network",
        "127.0.0.0/8",
        "--retry-schedule",
        "1s",
        "--tls-handshake-timeout",
        "1s",
        "--relay-timeout",
        "2s",
    ]);
    let mut c = relay.connect();
    c.hello("client.example");
    let content = b"Subject: stalled\r\n\r\nx\r\n";
    c.send_message("s@localhost", &["u@example.net"], content);
    // Opportunistic: the handshake times out, the host is tried again in
    // plaintext (which stalls too), and the message is deferred.
    wait_until(
        "STARTTLS, then a plaintext MAIL",
        Duration::from_secs(20),
        || {
            stalling.starttls.load(Ordering::SeqCst) >= 1
                && stalling.plaintext_mail.load(Ordering::SeqCst) >= 1
        },
    );
    assert!(relay.wait_for_log("trying again without TLS", Duration::from_secs(5)));
    assert!(
        relay.wait_for_log("deferred", Duration::from_secs(10)),
        "{}",
        relay.stderr()
    );
    assert_eq!(relay.queued().len(), 1, "deferred, not lost");

    // A real downstream takes the port over: delivered once, over TLS.
    drop(stalling);
    let addr = format!("127.0.0.1:{port}");
    let downstream = Server::start(&["--smtp", &addr, "--local-domain", "example.net"]);
    wait_until(
        "delivery to the real downstream",
        Duration::from_secs(30),
        || downstream.queued().len() == 1,
    );
    let m = &downstream.queued()[0];
    assert!(m.content().ends_with(content));
    assert!(
        m.received().contains("with ESMTPS (TLS1.3"),
        "{}",
        m.received()
    );
    wait_until("relay queue drained", Duration::from_secs(10), || {
        relay.queued().is_empty()
    });
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(downstream.queued().len(), 1, "delivered once");
}

#[test]
fn required_tls_to_a_server_without_starttls_stays_deferred() {
    let Some(sink_bin) = peer_program("smtp-sink", "postfix") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let template = format!("{}/%Y%m%d%H%M%S.", dir.path().display());
    // smtp-sink offers no STARTTLS.
    let _sink = Child_(
        Command::new(&sink_bin)
            .args([
                "-u",
                "nobody",
                "-d",
                &template,
                &format!("127.0.0.1:{port}"),
                "64",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    wait_until("smtp-sink", Duration::from_secs(5), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let relay = Server::start(&[
        "--relay-host",
        &format!("127.0.0.1:{port}"),
        "--relay-network",
        "127.0.0.0/8",
        "--retry-schedule",
        "1s",
        "--tls-policy",
        "require",
    ]);
    let mut c = relay.connect();
    c.hello("client.example");
    c.send_message(
        "s@example.org",
        &["r@remote.example"],
        b"Subject: x\r\n\r\nx\r\n",
    );
    assert!(
        relay.wait_for_log("4.7.4", Duration::from_secs(20)),
        "{}",
        relay.stderr()
    );
    // Retried (every second) and deferred each time; never sent.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(relay.queued().len(), 1, "still queued");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "nothing reached the sink in plaintext"
    );
}

/// Four destinations on one downstream (four loopback addresses, one
/// port): by the FNV hash of the host, 127.0.0.1 and .3 belong to one shard,
/// .2 and .4 to the other.
const HANDOFF_HOSTS: [&str; 4] = ["127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4"];

fn handoff_downstream(port: u16) -> Server {
    let mut args = Vec::new();
    for (i, host) in HANDOFF_HOSTS.iter().enumerate() {
        args.push("--smtp".to_string());
        args.push(format!("{host}:{port}"));
        args.push("--local-domain".to_string());
        args.push(format!("d{i}.example"));
    }
    Server::builder().args(args).start()
}

fn handoff_relay_args(port: u16) -> Vec<String> {
    let mut args: Vec<String> = [
        "--relay-network",
        "127.0.0.0/8",
        "--retry-schedule",
        "1s",
        "--log",
        "ringmta=debug",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for (i, host) in HANDOFF_HOSTS.iter().enumerate() {
        args.push("--route".into());
        args.push(format!("d{i}.example=smtp:{host}:{port}"));
    }
    args
}

/// Every (message, destination) pair the downstream holds, with a count.
fn delivered_pairs(downstream: &Server) -> std::collections::HashMap<(String, String), usize> {
    let mut seen = std::collections::HashMap::new();
    for m in downstream.queued() {
        let text = String::from_utf8_lossy(m.content()).into_owned();
        let subject = text
            .lines()
            .find_map(|l| l.strip_prefix("Subject: "))
            .unwrap_or_default()
            .to_owned();
        for r in m.rcpts {
            *seen.entry((subject.clone(), r)).or_insert(0) += 1;
        }
    }
    seen
}

fn send_to_every_destination(relay: &Server, conns: usize, per_conn: usize) -> usize {
    let rcpts: Vec<String> = (0..HANDOFF_HOSTS.len())
        .map(|i| format!("u@d{i}.example"))
        .collect();
    let rcpts: Vec<&str> = rcpts.iter().map(String::as_str).collect();
    let mut clients: Vec<_> = (0..conns).map(|_| relay.connect()).collect();
    for c in &mut clients {
        c.hello("client.example");
    }
    for n in 0..per_conn {
        for (k, c) in clients.iter_mut().enumerate() {
            let body = format!("Subject: m{k}-{n}\r\n\r\nx\r\n");
            c.send_message("s@localhost", &rcpts, body.as_bytes());
        }
    }
    conns * per_conn
}

#[test]
fn handoff_between_shards_delivers_each_recipient_once() {
    let port = free_port();
    let downstream = handoff_downstream(port);
    // A channel of one: handoffs happen, and so do "full, deliver here".
    let mut args = handoff_relay_args(port);
    args.extend(["--handoff-capacity".to_string(), "1".to_string()]);
    let relay = Server::builder().shards(2).args(args).start();
    assert!(relay.wait_for_log("handoff mesh joined", Duration::from_secs(10)));
    let messages = send_to_every_destination(&relay, 6, 5);
    let expected = messages * HANDOFF_HOSTS.len();
    wait_until("every recipient delivered", Duration::from_secs(60), || {
        delivered_pairs(&downstream).len() == expected
    });
    assert!(
        relay.wait_for_log("handed off", Duration::from_secs(5)),
        "no work crossed shards"
    );
    // The outcomes came back to each message's origin and were journaled.
    wait_until("relay queue drained", Duration::from_secs(20), || {
        relay.queued().is_empty()
    });
    std::thread::sleep(Duration::from_millis(1500));
    let seen = delivered_pairs(&downstream);
    assert_eq!(seen.len(), expected);
    assert!(seen.values().all(|&n| n == 1), "delivered twice: {seen:?}");
}

#[test]
fn handed_off_work_is_redone_after_kill_9() {
    let port = free_port();
    let spool = tempfile::tempdir().unwrap();
    let args = handoff_relay_args(port);
    // Nothing listens yet: the work crosses shards and is deferred.
    let relay = Server::builder()
        .shards(2)
        .spool_dir(spool.path())
        .args(args.clone())
        .start();
    assert!(relay.wait_for_log("handoff mesh joined", Duration::from_secs(10)));
    let messages = send_to_every_destination(&relay, 3, 2);
    assert!(relay.wait_for_log("handed off", Duration::from_secs(10)));
    assert!(relay.wait_for_log("deferred", Duration::from_secs(10)));
    relay.signal(libc::SIGKILL);
    drop(relay);

    let downstream = handoff_downstream(port);
    let relay = Server::builder()
        .shards(2)
        .spool_dir(spool.path())
        .args(args)
        .start();
    let expected = messages * HANDOFF_HOSTS.len();
    wait_until(
        "every recipient delivered after the restart",
        Duration::from_secs(60),
        || delivered_pairs(&downstream).len() == expected,
    );
    wait_until("relay queue drained", Duration::from_secs(20), || {
        relay.queued().is_empty()
    });
    let seen = delivered_pairs(&downstream);
    assert!(seen.values().all(|&n| n == 1), "delivered twice: {seen:?}");
}

#[test]
fn mx_preference_fallback_a_record_and_null_mx() {
    let mx_port = free_port();
    // Two downstreams on the same port at different loopback addresses.
    let first = Server::start(&[
        "--smtp",
        &format!("127.0.0.2:{mx_port}"),
        "--local-domain",
        "pref.test",
        "--local-domain",
        "plain.test",
    ]);
    let second = Server::start(&[
        "--smtp",
        &format!("127.0.0.3:{mx_port}"),
        "--local-domain",
        "pref.test",
        "--local-domain",
        "down.test",
    ]);
    let Some((_dns, dns_port)) = common::dnsmasq(
        &[
            "--mx-host=pref.test,mx1.pref.test,10".into(),
            "--mx-host=pref.test,mx2.pref.test,20".into(),
            "--host-record=mx1.pref.test,127.0.0.2".into(),
            "--host-record=mx2.pref.test,127.0.0.3".into(),
            // The preferred MX has nothing listening: fall back to the next.
            "--mx-host=down.test,mx1.down.test,5".into(),
            "--mx-host=down.test,mx2.down.test,50".into(),
            "--host-record=mx1.down.test,127.0.0.4".into(),
            "--host-record=mx2.down.test,127.0.0.3".into(),
            // No MX at all: the domain's own address (RFC 5321 5.1).
            "--host-record=plain.test,127.0.0.2".into(),
            // Null MX (RFC 7505).
            "--mx-host=nullmx.test,.,0".into(),
        ],
        0,
    ) else {
        return;
    };
    let relay = Server::start(&[
        "--dns-server",
        &format!("127.0.0.1:{dns_port}"),
        "--outbound-port",
        &mx_port.to_string(),
        "--relay-network",
        "127.0.0.0/8",
        "--connect-timeout",
        "2s",
    ]);
    let mut c = relay.connect();
    c.hello("client.example");
    c.send_message(
        "s@localhost",
        &["u@pref.test"],
        b"Subject: pref\r\n\r\nx\r\n",
    );
    c.send_message(
        "s@localhost",
        &["u@down.test"],
        b"Subject: down\r\n\r\nx\r\n",
    );
    c.send_message(
        "s@localhost",
        &["u@plain.test"],
        b"Subject: plain\r\n\r\nx\r\n",
    );
    c.send_message(
        "s@localhost",
        &["u@nullmx.test"],
        b"Subject: null\r\n\r\nx\r\n",
    );
    wait_until("MX deliveries", Duration::from_secs(30), || {
        first.queued().len() == 2 && second.queued().len() == 1
    });
    let subjects = |s: &Server| -> Vec<String> {
        let mut v: Vec<String> = s.queued().iter().map(|q| q.rcpts[0].clone()).collect();
        v.sort();
        v
    };
    assert_eq!(subjects(&first), ["u@plain.test", "u@pref.test"]);
    assert_eq!(subjects(&second), ["u@down.test"]);
    wait_until("null MX bounce", Duration::from_secs(20), || {
        !maildir_files(&relay, "s@localhost").is_empty()
    });
    let bounce = String::from_utf8(maildir_files(&relay, "s@localhost").remove(0)).unwrap();
    assert!(
        bounce.contains("Final-Recipient: rfc822; u@nullmx.test"),
        "{bounce}"
    );
    assert!(bounce.contains("null MX"), "{bounce}");
}

#[test]
fn refusals_by_policy_are_logged() {
    let server = Server::start(&[]);
    let mut c = server.connect();
    c.hello("client.example");
    c.expect("MAIL FROM:<s@example.org>", 250);
    c.expect("RCPT TO:<victim@remote.example>", 550);
    assert!(
        server.wait_for_log("refused by policy", Duration::from_secs(5)),
        "{}",
        server.stderr()
    );
    let log = server.stderr();
    assert!(log.contains("RCPT TO:<victim@remote.example>"), "{log}");
    assert!(log.contains("reply=550"), "{log}");
}
