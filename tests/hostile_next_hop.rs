//! The relay toward next hops that read SMTP another way, or are hostile
//! (issue 11): a fake next hop in the test, listening on loopback, that
//! reads lines the way a smuggling-vulnerable server does (a bare CR or LF
//! ends a line) and records every command and message; or answers with a
//! malformed reply, or with reply text meant to break a bounce. Also a
//! delivery worker that panics, and a long EHLO name relayed to a second
//! ringmta.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::Server;

fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What the fake next hop does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Script {
    /// Accepts everything.
    Lenient,
    /// On its first connection: the greeting waits for [`Hop::go`], and
    /// MAIL gets a line that is no SMTP reply. Later connections accept.
    MalformedFirst,
    /// RCPT gets a 550 whose text holds a bare CR, 8-bit octets, a NUL and
    /// 1500 octets more.
    HostileRefusal,
}

#[derive(Debug, Default)]
struct HopLog {
    connections: usize,
    /// Every command line, as the lenient reading splits them.
    commands: Vec<String>,
    /// The content of every message the hop took, line ends as CRLF.
    messages: Vec<Vec<u8>>,
    /// Per connection: it ended without QUIT (closed by the relay).
    dropped: Vec<bool>,
}

/// A fake next hop: one thread accepting, one per connection.
struct Hop {
    port: u16,
    stop: Arc<AtomicBool>,
    go: Arc<AtomicBool>,
    log: Arc<Mutex<HopLog>>,
    thread: Option<JoinHandle<()>>,
}

const HOSTILE_REFUSAL: &[u8] = b"550-5.1.1 bad\r.\rMAIL FROM:<x@example.org>\x80\x00";

impl Hop {
    fn start(script: Script) -> Hop {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let go = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(HopLog::default()));
        let (s, g, l) = (stop.clone(), go.clone(), log.clone());
        let thread = std::thread::spawn(move || {
            let mut conns = Vec::new();
            while !s.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let n = {
                            let mut log = l.lock().unwrap();
                            log.connections += 1;
                            log.dropped.push(false);
                            log.connections - 1
                        };
                        let (s, g, l) = (s.clone(), g.clone(), l.clone());
                        conns.push(std::thread::spawn(move || {
                            serve(conn, n, script, &s, &g, &l);
                        }));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
            for c in conns {
                let _ = c.join();
            }
        });
        Hop {
            port,
            stop,
            go,
            log,
            thread: Some(thread),
        }
    }

    fn log<T>(&self, f: impl FnOnce(&HopLog) -> T) -> T {
        f(&self.log.lock().unwrap())
    }
}

impl Drop for Hop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The next line as a smuggling-vulnerable server reads it: it ends at
/// CRLF, or at a bare CR or LF. `None` until a whole line is there.
fn lenient_line(buf: &[u8]) -> Option<(Vec<u8>, usize)> {
    let at = buf.iter().position(|&b| b == b'\r' || b == b'\n')?;
    if buf[at] == b'\r' {
        match buf.get(at + 1) {
            None => return None,
            Some(b'\n') => return Some((buf[..at].to_vec(), at + 2)),
            Some(_) => {}
        }
    }
    Some((buf[..at].to_vec(), at + 1))
}

fn serve(
    mut conn: TcpStream,
    n: usize,
    script: Script,
    stop: &AtomicBool,
    go: &AtomicBool,
    log: &Mutex<HopLog>,
) {
    conn.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    if script == Script::MalformedFirst && n == 0 {
        while !go.load(Ordering::SeqCst) && !stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let _ = conn.write_all(b"220 hop.test ESMTP\r\n");
    let mut buf = Vec::new();
    let mut data: Option<Vec<u8>> = None;
    let mut chunk = [0u8; 4096];
    while !stop.load(Ordering::SeqCst) {
        while let Some((line, used)) = lenient_line(&buf) {
            buf.drain(..used);
            if let Some(content) = data.as_mut() {
                if line == b"." {
                    let content = data.take().unwrap_or_default();
                    log.lock().unwrap().messages.push(content);
                    let _ = conn.write_all(b"250 2.0.0 taken\r\n");
                } else {
                    let line = line.strip_prefix(b".").unwrap_or(&line);
                    content.extend_from_slice(line);
                    content.extend_from_slice(b"\r\n");
                }
                continue;
            }
            let cmd = String::from_utf8_lossy(&line).into_owned();
            log.lock().unwrap().commands.push(cmd.clone());
            let verb = cmd.get(..4).unwrap_or("").to_ascii_uppercase();
            let reply: &[u8] = match verb.as_str() {
                "EHLO" => b"250-hop.test\r\n250 8BITMIME\r\n",
                "MAIL" if script == Script::MalformedFirst && n == 0 => {
                    b"hello, I am no SMTP server\r\n"
                }
                "RCPT" if script == Script::HostileRefusal => {
                    let mut r = HOSTILE_REFUSAL.to_vec();
                    r.extend(std::iter::repeat_n(b'y', 1500));
                    r.extend_from_slice(b"\r\n550 5.1.1 user unknown\r\n");
                    let _ = conn.write_all(&r);
                    continue;
                }
                "DATA" => {
                    data = Some(Vec::new());
                    b"354 go on\r\n"
                }
                "QUIT" => {
                    let _ = conn.write_all(b"221 bye\r\n");
                    return;
                }
                "MAIL" | "RCPT" | "RSET" | "NOOP" | "HELO" => b"250 ok\r\n",
                _ => b"500 what\r\n",
            };
            let _ = conn.write_all(reply);
        }
        match conn.read(&mut chunk) {
            Ok(0) => break,
            Ok(k) => buf.extend_from_slice(&chunk[..k]),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => break,
        }
    }
    if !stop.load(Ordering::SeqCst) {
        log.lock().unwrap().dropped[n] = true;
    }
}

/// A relay sending example.net to `port`.
fn relay(port: u16, extra: &[&str]) -> common::ServerBuilder {
    Server::builder()
        .args([
            "--route".to_owned(),
            format!("example.net=smtp:127.0.0.1:{port}"),
            "--relay-network".into(),
            "127.0.0.0/8".into(),
        ])
        .args(extra.iter().copied())
}

/// Regression (issue 11): a BDAT body holding `\r.\rMAIL FROM:...` was
/// relayed unchanged inside DATA, and a next hop that takes a bare CR for
/// a line end ran the second transaction. It now arrives as one message
/// holding the would-be commands as text, whatever the next hop's reading.
#[test]
fn bdat_bare_cr_dot_is_not_smuggled_to_the_next_hop() {
    let hop = Hop::start(Script::Lenient);
    let relay = relay(hop.port, &["--retry-schedule", "1s"]).start();
    let content: &[u8] = b"Subject: smuggle\r\n\r\nfirst\r.\rMAIL FROM:<evil@example.org>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\nsmuggled\r\n";
    let mut c = relay.connect();
    c.hello("client.example");
    c.expect("MAIL FROM:<sender@example.org>", 250);
    c.expect("RCPT TO:<u@example.net>", 250);
    let mut bdat = format!("BDAT {} LAST\r\n", content.len()).into_bytes();
    bdat.extend_from_slice(content);
    c.send(&bdat);
    let r = c.reply();
    assert_eq!(r.code, 250, "{r}");
    c.expect("QUIT", 221);

    wait_until(
        "the message at the next hop",
        Duration::from_secs(20),
        || hop.log(|l| !l.messages.is_empty()),
    );
    wait_until(
        "the relay's queue to empty",
        Duration::from_secs(20),
        || relay.queued().is_empty(),
    );
    std::thread::sleep(Duration::from_millis(300));
    hop.log(|l| {
        let mails: Vec<&String> = l.commands.iter().filter(|c| c.starts_with("MAIL")).collect();
        assert_eq!(mails, ["MAIL FROM:<sender@example.org>"], "{:?}", l.commands);
        assert!(!l.commands.iter().any(|c| c.contains("victim")), "{:?}", l.commands);
        assert_eq!(l.messages.len(), 1);
        let m = String::from_utf8_lossy(&l.messages[0]);
        assert!(
            m.contains("first\r\n.\r\nMAIL FROM:<evil@example.org>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\nsmuggled\r\n"),
            "{m:?}"
        );
    });
}

/// Regression (issue 11): a malformed reply left the connection half-open
/// and deferred every message queued for the destination ("connection not
/// ready"). Now the connection is closed, only the message in flight is
/// deferred (and retried), and the rest go out on a new connection.
#[test]
fn malformed_reply_closes_the_connection_and_defers_only_its_message() {
    let hop = Hop::start(Script::MalformedFirst);
    let relay = relay(
        hop.port,
        &["--retry-schedule", "2s", "--max-conns-per-dest", "1"],
    )
    .start();
    let mut c = relay.connect();
    c.hello("client.example");
    for n in 0..3 {
        c.send_message(
            "s@example.org",
            &["u@example.net"],
            format!("Subject: m{n}\r\n\r\nbody {n}\r\n").as_bytes(),
        );
    }
    c.expect("QUIT", 221);
    // All three wait behind the first connection's greeting.
    hop.go.store(true, Ordering::SeqCst);

    wait_until(
        "three messages at the next hop",
        Duration::from_secs(30),
        || hop.log(|l| l.messages.len() == 3),
    );
    wait_until(
        "the relay's queue to empty",
        Duration::from_secs(20),
        || relay.queued().is_empty(),
    );
    let log = relay.stderr();
    let deferred = log.lines().filter(|l| l.contains(": deferred")).count();
    assert_eq!(
        deferred, 1,
        "only the message in flight is deferred:\n{log}"
    );
    assert!(log.contains("malformed reply"), "{log}");
    assert!(!log.contains("not ready"), "{log}");
    hop.log(|l| {
        assert!(l.dropped[0], "the relay closed the bad connection");
        assert!(l.connections >= 2, "the others went on a new connection");
        let bodies: Vec<String> = l
            .messages
            .iter()
            .map(|m| String::from_utf8_lossy(m).into_owned())
            .collect();
        for n in 0..3 {
            assert_eq!(
                bodies
                    .iter()
                    .filter(|b| b.contains(&format!("body {n}\r\n")))
                    .count(),
                1,
                "{bodies:?}"
            );
        }
    });
}

/// Regression (issue 11): the next hop's reply text went into the bounce
/// as it came (a bare CR, 8-bit octets, a NUL, any length).
#[test]
fn hostile_reply_text_is_sanitised_in_the_bounce() {
    let hop = Hop::start(Script::HostileRefusal);
    let relay = relay(hop.port, &["--retry-schedule", "1s"]).start();
    let mut c = relay.connect();
    c.hello("client.example");
    c.send_message(
        "s@localhost",
        &["u@example.net"],
        b"Subject: refused\r\n\r\nx\r\n",
    );
    c.expect("QUIT", 221);

    let new = relay
        .spool_dir()
        .parent()
        .unwrap()
        .join("maildir/localhost/s/new");
    let mut bounce = Vec::new();
    wait_until(
        "the bounce in s@localhost's Maildir",
        Duration::from_secs(30),
        || {
            let Ok(dir) = std::fs::read_dir(&new) else {
                return false;
            };
            let Some(file) = dir.flatten().next() else {
                return false;
            };
            bounce = std::fs::read(file.path()).unwrap();
            true
        },
    );
    let text = String::from_utf8_lossy(&bounce).into_owned();
    for (i, &b) in bounce.iter().enumerate() {
        assert!(
            matches!(b, b'\r' | b'\n' | b'\t' | 0x20..=0x7e),
            "octet {b:#x} at {i} in\n{text}"
        );
        if b == b'\r' {
            assert_eq!(bounce.get(i + 1), Some(&b'\n'), "bare CR at {i} in\n{text}");
        }
    }
    for line in text.split("\r\n") {
        assert!(line.len() <= 600, "a line of {} octets", line.len());
    }
    assert!(
        text.contains("Diagnostic-Code: smtp;\r\n 550 5.1.1 bad\\x0D.\\x0DMAIL FROM:<x@example.org>\\x80\\x00yyy"),
        "{text}"
    );
    assert!(text.contains("\r\n 5.1.1 user unknown\r\n"), "{text}");
    assert!(text.contains("Status: 5.1.1"));
}

/// Regression (issue 11): a delivery worker that panicked left its message
/// marked in flight until a restart: it was never tried again. Now its
/// recipients are released and retried after the first retry delay, and
/// the shard goes on delivering. The panic comes from a debug-build hook
/// read from the server's environment (`RINGMTA_TEST_PANIC_RCPT`).
#[test]
fn panicking_delivery_worker_releases_its_message_for_a_retry() {
    let hop = Hop::start(Script::Lenient);
    let relay = relay(hop.port, &["--retry-schedule", "1s"])
        .env("RINGMTA_TEST_PANIC_RCPT", "boom@example.net")
        .start();
    let mut c = relay.connect();
    c.hello("client.example");
    c.send_message(
        "s@example.org",
        &["boom@example.net"],
        b"Subject: boom\r\n\r\nfirst try panics\r\n",
    );
    assert!(
        relay.wait_for_log("delivery worker panicked", Duration::from_secs(20)),
        "{}",
        relay.stderr()
    );
    c.send_message(
        "s@example.org",
        &["other@example.net"],
        b"Subject: other\r\n\r\nafter the panic\r\n",
    );
    c.expect("QUIT", 221);
    wait_until(
        "both messages at the next hop",
        Duration::from_secs(30),
        || hop.log(|l| l.messages.len() == 2),
    );
    wait_until(
        "the relay's queue to empty",
        Duration::from_secs(20),
        || relay.queued().is_empty(),
    );
}

/// Regression (issue 11): a long EHLO name made a 1529-octet `Received:`
/// line, and a downstream ringmta refused the relayed message.
#[test]
fn long_ehlo_name_is_relayed_to_another_ringmta() {
    let downstream = Server::start(&["--local-domain", "example.net"]);
    let relay = relay(downstream.port, &["--retry-schedule", "1s"]).start();
    let helo = format!("{}.example", "h".repeat(1500));
    let mut c = relay.connect();
    c.greeting();
    let r = c.cmd(&format!("EHLO {helo}"));
    assert_eq!(r.code, 250, "{r}");
    c.send_message(
        "s@example.org",
        &["u@example.net"],
        b"Subject: long helo\r\n\r\nx\r\n",
    );
    c.expect("QUIT", 221);
    wait_until("delivery downstream", Duration::from_secs(20), || {
        !downstream.queued().is_empty()
    });
    let q = downstream.newest().unwrap();
    let content = q.content();
    let header_end = content.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    for line in content[..header_end].split(|&b| b == b'\n') {
        assert!(line.len() <= 999, "a header line of {} octets", line.len());
    }
    let text = String::from_utf8_lossy(content);
    assert!(
        text.contains(&format!("Received: from {}...", &helo[..255])),
        "{text}"
    );
}
