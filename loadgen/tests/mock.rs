//! End-to-end tests against a scripted in-process SMTP server: STARTTLS,
//! AUTH PLAIN, BDAT, message content and dot-stuffing as received, and
//! every failure path (rejections, malformed replies, timeouts, refused
//! connections, remote targets) showing up in the counts and exit status.

mod common;

use common::{free_port, loadgen, LOADGEN};
use rustls::pki_types::PrivateKeyDer;
use rustls::{ServerConfig, ServerConnection, StreamOwned};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the mock server does.
#[derive(Clone, Default)]
struct Behaviour {
    pipelining: bool,
    chunking: bool,
    tls: Option<Arc<ServerConfig>>,
    /// Required `AUTH PLAIN` credentials (user, password).
    auth: Option<(String, String)>,
    /// Refuse recipients whose local part ends in an odd digit.
    reject_odd_rcpt: bool,
    /// Replaces the normal greeting (`None`: "220 mock ESMTP").
    greeting: Option<&'static str>,
    /// Accept connections but never say anything.
    silent: bool,
    /// Close the connection when MAIL arrives.
    hang_up_on_mail: bool,
}

/// One message as the mock received it.
#[derive(Debug, Clone)]
struct Received {
    /// Size after undoing dot-stuffing (DATA) or the BDAT chunk size.
    size: usize,
    bdat: bool,
    tls: bool,
    authenticated: bool,
    recipients: usize,
    /// Longest line, CRLF excluded.
    longest_line: usize,
    has_required_headers: bool,
}

type Log = Arc<Mutex<Vec<Received>>>;

struct Mock {
    addr: SocketAddr,
    log: Log,
}

impl Mock {
    fn start(behaviour: Behaviour) -> Mock {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("local address");
        let log: Log = Arc::default();
        let accept_log = log.clone();
        // The accept thread lives until the test binary exits.
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (b, log) = (behaviour.clone(), accept_log.clone());
                std::thread::spawn(move || {
                    let _ = serve(stream, &b, &log);
                });
            }
        });
        Mock { addr, log }
    }

    fn target(&self) -> String {
        self.addr.to_string()
    }

    fn received(&self) -> Vec<Received> {
        self.log.lock().unwrap().clone()
    }
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<StreamOwned<ServerConnection, TcpStream>>),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

/// A buffered connection reading CRLF lines and exact byte counts.
struct Conn {
    stream: Stream,
    buf: Vec<u8>,
}

impl Conn {
    fn fill(&mut self) -> io::Result<()> {
        let mut chunk = [0u8; 8192];
        let n = self.stream.read(&mut chunk)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    /// One line without its CRLF.
    fn line(&mut self) -> io::Result<Vec<u8>> {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = self.buf[..i].to_vec();
                self.buf.drain(..i + 2);
                return Ok(line);
            }
            self.fill()?;
        }
    }

    fn exact(&mut self, n: usize) -> io::Result<Vec<u8>> {
        while self.buf.len() < n {
            self.fill()?;
        }
        Ok(self.buf.drain(..n).collect())
    }

    fn reply(&mut self, text: &str) -> io::Result<()> {
        self.stream.write_all(text.as_bytes())?;
        self.stream.flush()
    }
}

fn serve(tcp: TcpStream, b: &Behaviour, log: &Log) -> io::Result<()> {
    if b.silent {
        std::thread::sleep(Duration::from_secs(5));
        return Ok(());
    }
    let mut c = Conn {
        stream: Stream::Plain(tcp),
        buf: Vec::new(),
    };
    c.reply(b.greeting.unwrap_or("220 mock ESMTP\r\n"))?;
    let (mut tls, mut authed) = (false, false);
    let mut rcpts = 0usize;
    let mut in_txn = false;
    loop {
        let line = c.line()?;
        let upper = String::from_utf8_lossy(&line).to_ascii_uppercase();
        let verb = upper.split(' ').next().unwrap_or("").to_owned();
        match verb.as_str() {
            "EHLO" => {
                let mut ext = vec!["mock"];
                if b.pipelining {
                    ext.push("PIPELINING");
                }
                if b.chunking {
                    ext.push("CHUNKING");
                }
                if b.tls.is_some() && !tls {
                    ext.push("STARTTLS");
                }
                if b.auth.is_some() {
                    ext.push("AUTH LOGIN PLAIN");
                }
                let mut reply = String::new();
                for (i, e) in ext.iter().enumerate() {
                    let sep = if i + 1 == ext.len() { ' ' } else { '-' };
                    reply.push_str(&format!("250{sep}{e}\r\n"));
                }
                c.reply(&reply)?;
            }
            "STARTTLS" => {
                let cfg = b.tls.clone().expect("STARTTLS only when offered");
                assert!(c.buf.is_empty(), "client pipelined after STARTTLS");
                c.reply("220 2.0.0 go ahead\r\n")?;
                let Stream::Plain(tcp) = c.stream else {
                    panic!("STARTTLS twice");
                };
                let server = ServerConnection::new(cfg).expect("TLS server session");
                c.stream = Stream::Tls(Box::new(StreamOwned::new(server, tcp)));
                tls = true;
            }
            "AUTH" => {
                let (user, pass) = b.auth.clone().expect("AUTH only when offered");
                let expected = format!("\0{user}\0{pass}");
                let arg = String::from_utf8_lossy(&line)
                    .split(' ')
                    .nth(2)
                    .unwrap_or("")
                    .to_owned();
                if upper.starts_with("AUTH PLAIN ") && decode_b64(&arg) == expected.as_bytes() {
                    authed = true;
                    c.reply("235 2.7.0 ok\r\n")?;
                } else {
                    c.reply("535 5.7.8 bad credentials\r\n")?;
                }
            }
            "MAIL" => {
                if b.hang_up_on_mail {
                    return Ok(());
                }
                if b.auth.is_some() && !authed {
                    c.reply("530 5.7.0 authentication required\r\n")?;
                    continue;
                }
                in_txn = true;
                rcpts = 0;
                c.reply("250 2.1.0 ok\r\n")?;
            }
            "RCPT" => {
                let odd = upper
                    .split('@')
                    .next()
                    .and_then(|l| l.chars().last())
                    .and_then(|d| d.to_digit(10))
                    .is_some_and(|d| d % 2 == 1);
                if !in_txn {
                    c.reply("503 5.5.1 MAIL first\r\n")?;
                } else if b.reject_odd_rcpt && odd {
                    c.reply("550 5.1.1 no such user\r\n")?;
                } else {
                    rcpts += 1;
                    c.reply("250 2.1.5 ok\r\n")?;
                }
            }
            "DATA" => {
                if !in_txn || rcpts == 0 {
                    c.reply("554 5.5.1 no valid recipients\r\n")?;
                    continue;
                }
                c.reply("354 go\r\n")?;
                let mut message = Vec::new();
                loop {
                    let l = c.line()?;
                    if l == b"." {
                        break;
                    }
                    // Undo dot-stuffing (RFC 5321 4.5.2).
                    message.extend_from_slice(l.strip_prefix(b".").unwrap_or(&l));
                    message.extend_from_slice(b"\r\n");
                }
                log.lock()
                    .unwrap()
                    .push(inspect(&message, false, tls, authed, rcpts));
                in_txn = false;
                c.reply("250 2.0.0 queued\r\n")?;
            }
            "BDAT" => {
                let words: Vec<&str> = upper.split(' ').collect();
                let size: usize = words
                    .get(1)
                    .and_then(|n| n.parse().ok())
                    .expect("BDAT size");
                assert_eq!(words.get(2), Some(&"LAST"), "loadgen sends one LAST chunk");
                let message = c.exact(size)?;
                if !in_txn || rcpts == 0 {
                    c.reply("554 5.5.1 no valid recipients\r\n")?;
                    continue;
                }
                log.lock()
                    .unwrap()
                    .push(inspect(&message, true, tls, authed, rcpts));
                in_txn = false;
                c.reply("250 2.0.0 queued\r\n")?;
            }
            "RSET" => {
                in_txn = false;
                c.reply("250 2.0.0 ok\r\n")?;
            }
            "QUIT" => {
                c.reply("221 2.0.0 bye\r\n")?;
                return Ok(());
            }
            _ => c.reply("502 5.5.2 unknown command\r\n")?,
        }
    }
}

fn inspect(
    message: &[u8],
    bdat: bool,
    tls: bool,
    authenticated: bool,
    recipients: usize,
) -> Received {
    let text = String::from_utf8_lossy(message);
    let head = text.split("\r\n\r\n").next().unwrap_or("");
    let has = |h: &str| head.starts_with(h) || head.contains(&format!("\r\n{h}"));
    Received {
        size: message.len(),
        bdat,
        tls,
        authenticated,
        recipients,
        longest_line: text.split("\r\n").map(str::len).max().unwrap_or(0),
        has_required_headers: ["From: ", "To: ", "Subject: ", "Date: ", "Message-ID: <"]
            .iter()
            .all(|h| has(h)),
    }
}

fn decode_b64(s: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes().filter(|&c| c != b'=') {
        let Some(v) = ALPHABET.iter().position(|&a| a == c) else {
            return Vec::new();
        };
        acc = (acc << 6) | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

fn tls_config() -> Arc<ServerConfig> {
    let cert =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("certificate");
    let key: PrivateKeyDer<'static> = cert.signing_key.into();
    let cfg =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(vec![cert.cert.der().clone()], key)
            .expect("server config");
    Arc::new(cfg)
}

fn assert_ok(run: &common::Run) {
    assert_eq!(
        run.code(),
        Some(0),
        "stdout:\n{}\nstderr:\n{}",
        run.stdout(),
        run.stderr()
    );
}

#[test]
fn starttls_auth_bdat_pipelined() {
    let mock = Mock::start(Behaviour {
        pipelining: true,
        chunking: true,
        tls: Some(tls_config()),
        auth: Some(("user".into(), "secret".into())),
        ..Behaviour::default()
    });
    let run = loadgen(&[
        "--target",
        &mock.target(),
        "--starttls",
        "--auth",
        "user:secret",
        "--bdat",
        "--sessions",
        "20",
        "--concurrency",
        "4",
        "--messages-per-session",
        "3",
        "--recipients",
        "2",
        "--size",
        "2k",
        "--fail-on-error",
    ]);
    assert_ok(&run);
    assert_eq!(run.num(&["messages", "accepted"]), 60);
    assert_eq!(run.num(&["messages", "bdat"]), 60);
    assert_eq!(run.num(&["messages", "pipelined"]), 60);
    assert_eq!(run.num(&["latency_us", "tls_handshake", "count"]), 20);
    assert_eq!(run.num(&["latency_us", "starttls", "count"]), 20);
    assert_eq!(run.num(&["latency_us", "auth", "count"]), 20);
    assert_eq!(run.num(&["bytes", "total"]), 60 * 2048);
    let got = mock.received();
    assert_eq!(got.len(), 60);
    for m in &got {
        assert!(m.bdat && m.tls && m.authenticated, "{m:?}");
        assert_eq!((m.size, m.recipients), (2048, 2), "{m:?}");
        assert!(m.has_required_headers && m.longest_line <= 78, "{m:?}");
    }
}

#[test]
fn starttls_large_messages_over_data() {
    // Larger than rustls' plaintext buffer and the socket buffers: the
    // TLS write path must go round several times.
    let mock = Mock::start(Behaviour {
        tls: Some(tls_config()),
        ..Behaviour::default()
    });
    let run = loadgen(&[
        "--target",
        &mock.target(),
        "--starttls",
        "--sessions",
        "4",
        "--messages-per-session",
        "2",
        "--size",
        "1m",
        "--fail-on-error",
    ]);
    assert_ok(&run);
    let got = mock.received();
    assert_eq!(got.len(), 8);
    for m in &got {
        assert!(m.tls && !m.bdat && m.size == 1 << 20, "{m:?}");
    }
}

#[test]
fn wrong_password_is_a_rejection() {
    let mock = Mock::start(Behaviour {
        auth: Some(("user".into(), "secret".into())),
        ..Behaviour::default()
    });
    let run = loadgen(&[
        "--target",
        &mock.target(),
        "--auth",
        "user:wrong",
        "--sessions",
        "3",
        "--fail-on-error",
    ]);
    assert_eq!(run.code(), Some(1));
    assert_eq!(run.num(&["errors", "rejected_5xx"]), 3);
    assert_eq!(run.num(&["sessions", "failed"]), 3);
    assert!(mock.received().is_empty());
}

#[test]
fn data_is_dot_stuffed_and_sized_as_reported() {
    let mock = Mock::start(Behaviour::default());
    let run = loadgen(&[
        "--target",
        &mock.target(),
        "--sessions",
        "30",
        "--messages-per-session",
        "2",
        "--size",
        "1k:8k",
        "--pipelining",
        "on", // not offered by this mock: must go unpipelined
        "--fail-on-error",
    ]);
    assert_ok(&run);
    assert_eq!(run.num(&["messages", "pipelined"]), 0);
    let got = mock.received();
    assert_eq!(got.len(), 60);
    let total: usize = got.iter().map(|m| m.size).sum();
    assert_eq!(run.num(&["bytes", "total"]), total as u64);
    for m in &got {
        assert!((1024..=8192).contains(&m.size), "{m:?}");
        assert!(
            !m.bdat && m.has_required_headers && m.longest_line <= 78,
            "{m:?}"
        );
    }
}

#[test]
fn refused_recipients_are_counted_and_fail_the_run() {
    let mock = Mock::start(Behaviour {
        pipelining: true,
        reject_odd_rcpt: true,
        ..Behaviour::default()
    });
    let target = mock.target();
    let base = vec!["--target", &target, "--sessions", "10", "--recipients", "2"];
    // Without --fail-on-error a run with errors still exits 0.
    let run = loadgen(&base);
    assert_ok(&run);
    let mut with_flag = base.clone();
    with_flag.push("--fail-on-error");
    let run = loadgen(&with_flag);
    assert_eq!(run.code(), Some(1));
    // Recipients 2k and 2k+1: one of each pair is refused.
    assert_eq!(run.num(&["recipients", "accepted"]), 10);
    assert_eq!(run.num(&["recipients", "rejected"]), 10);
    assert_eq!(run.num(&["errors", "rejected_5xx"]), 10);
    assert_eq!(run.num(&["messages", "accepted"]), 10);
    assert_eq!(run.num(&["replies", "5xx"]), 10);
    assert_eq!(run.num(&["sessions", "failed"]), 10);
    assert!(run.stdout().contains("rejected_5xx 10"), "{}", run.stdout());
}

#[test]
fn malformed_greeting_is_a_protocol_error() {
    let mock = Mock::start(Behaviour {
        greeting: Some("hello, I am not SMTP\r\n"),
        ..Behaviour::default()
    });
    let run = loadgen(&["--target", &mock.target(), "--sessions", "5"]);
    assert_ok(&run);
    assert_eq!(run.num(&["errors", "protocol"]), 5);
    assert_eq!(run.num(&["errors", "total"]), 5);
    assert_eq!(run.num(&["sessions", "failed"]), 5);
    assert_eq!(run.num(&["latency_us", "session", "count"]), 5);
}

#[test]
fn hang_up_is_an_unexpected_eof_and_aborts_the_message() {
    let mock = Mock::start(Behaviour {
        hang_up_on_mail: true,
        ..Behaviour::default()
    });
    let run = loadgen(&["--target", &mock.target(), "--sessions", "4"]);
    assert_eq!(run.num(&["errors", "unexpected_eof"]), 4);
    assert_eq!(run.num(&["messages", "aborted"]), 4);
    assert_eq!(run.num(&["messages", "accepted"]), 0);
}

#[test]
fn silent_server_times_out() {
    let mock = Mock::start(Behaviour {
        silent: true,
        ..Behaviour::default()
    });
    let run = loadgen(&[
        "--target",
        &mock.target(),
        "--sessions",
        "3",
        "--concurrency",
        "3",
        "--timeout",
        "0.3",
    ]);
    assert_eq!(run.num(&["errors", "timeout"]), 3);
    assert_eq!(run.num(&["sessions", "failed"]), 3);
    assert!(run.stdout().contains("greeting"), "{}", run.stdout());
}

#[test]
fn refused_connections_are_counted() {
    let port = free_port().to_string();
    let run = loadgen(&[
        "--target",
        &format!("127.0.0.1:{port}"),
        "--sessions",
        "5",
        "--fail-on-error",
    ]);
    assert_eq!(run.code(), Some(1));
    assert_eq!(run.num(&["errors", "connect_refused"]), 5);
    assert_eq!(run.num(&["sessions", "failed"]), 5);
}

#[test]
fn remote_targets_need_allow_remote() {
    // 192.0.2.0/24 is TEST-NET-1: never routed. Nothing is sent: the
    // check happens before any connection.
    let run = loadgen(&["--target", "192.0.2.1:25", "--sessions", "1"]);
    assert_ne!(run.code(), Some(0));
    assert!(run.stderr().contains("--allow-remote"), "{}", run.stderr());
    assert!(run.json.is_null());
}

#[test]
fn open_loop_follows_the_schedule() {
    let mock = Mock::start(Behaviour {
        pipelining: true,
        ..Behaviour::default()
    });
    let run = loadgen(&[
        "--target",
        &mock.target(),
        "--rate",
        "200",
        "--duration",
        "1",
        "--fail-on-error",
    ]);
    assert_ok(&run);
    // Sessions due at 0, 5 ms, ... 995 ms: exactly 200 inside one second.
    assert_eq!(run.num(&["sessions", "total"]), 200);
    assert_eq!(run.num(&["latency_us", "schedule_lag", "count"]), 200);
    assert_eq!(run.json["config"]["mode"], "open");
}

#[test]
fn html_report_is_self_contained() {
    let mock = Mock::start(Behaviour::default());
    let path = std::env::temp_dir().join(format!("loadgen-test-{}.html", std::process::id()));
    let run = loadgen(&[
        "--target",
        &mock.target(),
        "--sessions",
        "20",
        "--html",
        path.to_str().unwrap(),
    ]);
    assert_ok(&run);
    let html = std::fs::read_to_string(&path).expect("HTML report written");
    let _ = std::fs::remove_file(&path);
    assert!(html.starts_with("<!DOCTYPE html>") && html.trim_end().ends_with("</html>"));
    assert!(html.matches("<svg").count() >= 4);
    assert!(html.contains("<polyline") || html.contains("<circle"));
    for banned in ["<script", "src=", "href=", "@import", "url("] {
        assert!(!html.contains(banned), "report references {banned}");
    }
    // The only URL is the SVG namespace, which is never fetched.
    assert_eq!(
        html.matches("http").count(),
        html.matches("http://www.w3.org/2000/svg").count()
    );
}

#[test]
fn help_documents_every_flag_on_one_line() {
    let out = Command::new(LOADGEN)
        .arg("--help")
        .output()
        .expect("run --help");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--target",
        "--allow-remote",
        "--workers",
        "--sessions",
        "--duration",
        "--concurrency",
        "--rate",
        "--ramp",
        "--messages-per-session",
        "--recipients",
        "--size",
        "--pipelining",
        "--bdat",
        "--starttls",
        "--insecure",
        "--auth",
        "--mail-from",
        "--rcpt-to",
        "--helo",
        "--timeout",
        "--json",
        "--html",
        "--fail-on-error",
        "--quiet",
    ] {
        let lines: Vec<&str> = help
            .lines()
            .filter(|l| l.trim_start().starts_with(flag) || l.contains(&format!(", {flag}")))
            .collect();
        assert_eq!(lines.len(), 1, "{flag}: {lines:?}\n{help}");
        // The description is on the flag's own line.
        assert!(lines[0].trim().len() > flag.len() + 10, "{flag}: {lines:?}");
    }
}
