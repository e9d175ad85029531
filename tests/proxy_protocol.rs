//! The PROXY protocol (`--proxy-protocol-from`) behind a real HAProxy
//! (Debian's `haproxy`, started here on loopback with `send-proxy-v2` and
//! `send-proxy` backends), and against hand-written headers where the exact
//! bytes matter.
//!
//! Checked: relay permission and the `Received:` header use the address
//! the header names (the client connects to HAProxy from 127.0.0.5, HAProxy
//! to ringmta from 127.0.0.1); `--max-conns-per-ip` counts that address and
//! not the proxy's; a trusted peer without a valid header is dropped before
//! any greeting; an untrusted peer's `PROXY` line is an unknown command; what
//! follows the header in the same write is kept, as commands or as the TLS
//! handshake of the implicit-TLS port; `deploy/haproxy.cfg` is valid.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, StreamOwned};

use common::{peer_program, run_peer, AnyCert, Client, Server, IO_TIMEOUT};

const HAPROXY: &str = "haproxy";
const CLIENT: &str = "127.0.0.5";
const OTHER_CLIENT: &str = "127.0.0.6";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A port nothing listens on right now (for HAProxy's frontends: it cannot
/// tell which port 0 became).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// HAProxy in front of one ringmta: frontend `v2` (send-proxy-v2, with a
/// CRC32C TLV) and `v1` (send-proxy) to its relay port, `smtps`
/// and `submission` (send-proxy-v2) to its implicit-TLS and submission
/// ports. Killed on drop, panic or not.
struct Haproxy {
    child: Child,
    v2: SocketAddr,
    v1: SocketAddr,
    smtps: SocketAddr,
    submission: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Haproxy {
    /// `None` when haproxy is missing and RINGMTA_SKIP_PEERS=1.
    fn start(server: &Server) -> Option<Haproxy> {
        let bin = peer_program(HAPROXY, "haproxy")?;
        let dir = tempfile::tempdir().unwrap();
        let [v2, v1, smtps, submission] = [free_port(), free_port(), free_port(), free_port()]
            .map(|p| SocketAddr::from(([127, 0, 0, 1], p)));
        let server_submission = server.submission.expect("submission listener");
        let smtp = server.addr;
        let server_smtps = server.smtps.expect("smtps listener");
        let cfg = format!(
            "global\n    maxconn 256\n    nbthread 1\n\
             defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 60s\n    timeout server 60s\n\
             frontend v2\n    bind {v2}\n    default_backend b_v2\n\
             backend b_v2\n    server s1 {smtp} send-proxy-v2 proxy-v2-options crc32c\n\
             frontend v1\n    bind {v1}\n    default_backend b_v1\n\
             backend b_v1\n    server s1 {smtp} send-proxy\n\
             frontend smtps\n    bind {smtps}\n    default_backend b_smtps\n\
             backend b_smtps\n    server s1 {server_smtps} send-proxy-v2\n\
             frontend submission\n    bind {submission}\n    default_backend b_submission\n\
             backend b_submission\n    server s1 {server_submission} send-proxy-v2\n"
        );
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, cfg).unwrap();
        let log = std::fs::File::create(dir.path().join("haproxy.log")).unwrap();
        let child = Command::new(bin)
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn haproxy");
        let mut h = Haproxy {
            child,
            v2,
            v1,
            smtps,
            submission,
            _dir: dir,
        };
        // Up once every frontend accepts (such a probe reaches ringmta as
        // a header and an immediate close: nothing to answer).
        let deadline = Instant::now() + IO_TIMEOUT;
        for addr in [v2, v1, smtps, submission] {
            while TcpStream::connect_timeout(&addr, IO_TIMEOUT).is_err() {
                if let Ok(Some(status)) = h.child.try_wait() {
                    panic!("haproxy exited: {status}: {}", h.log());
                }
                assert!(Instant::now() < deadline, "haproxy not up: {}", h.log());
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Some(h)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("haproxy.log")).unwrap_or_default()
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn server(extra: &[&str]) -> Server {
    Server::builder()
        .shards(2)
        .args(["--proxy-protocol-from", "127.0.0.1/32"])
        .args(extra.iter().copied())
        .start()
}

/// Relay permission and the trace header follow the address HAProxy's
/// header names, over both versions; the proxy's own 127.0.0.1 is neither
/// allowed to relay nor recorded.
#[test]
fn relay_policy_and_received_use_the_address_behind_haproxy() {
    let server = server(&["--relay-network", "127.0.0.5/32"]);
    let Some(haproxy) = Haproxy::start(&server) else {
        return;
    };
    for front in [haproxy.v2, haproxy.v1] {
        let mut c = Client::connect_from(front, ip(CLIENT));
        c.hello("client.test");
        let id = c.send_message(
            "a@example.org",
            &["b@remote.example"],
            b"Subject: relayed\r\n\r\nhi\r\n",
        );
        let q = server.message(&id);
        assert!(
            q.received()
                .starts_with("Received: from client.test ([127.0.0.5])"),
            "{front}: {}",
            q.received()
        );
        c.expect("QUIT", 221);

        let mut other = Client::connect_from(front, ip(OTHER_CLIENT));
        other.hello("other.test");
        other.expect("MAIL FROM:<a@example.org>", 250);
        let r = other.cmd("RCPT TO:<b@remote.example>");
        assert_eq!(r.code, 550, "{front}: relay from {OTHER_CLIENT}: {r}");
        other.expect("QUIT", 221);
    }
    // swaks, through send-proxy, from both addresses.
    let swaks = peer_program("swaks", "swaks").expect("swaks");
    let port = haproxy.v1.port().to_string();
    let run = |from: &str| {
        run_peer(
            &swaks,
            &[
                "--server",
                "127.0.0.1",
                "--port",
                &port,
                "--local-interface",
                from,
                "--from",
                "a@example.org",
                "--to",
                "c@remote.example",
                "--helo",
                "swaks.test",
            ],
            IO_TIMEOUT * 3,
        )
    };
    let ok = run(CLIENT);
    assert!(ok.status.success(), "swaks from {CLIENT}: {}", ok.stdout);
    let refused = run(OTHER_CLIENT);
    assert!(!refused.status.success(), "{}", refused.stdout);
    assert!(refused.stdout.contains("<** 550"), "{}", refused.stdout);
    let q = server.newest().expect("swaks' message");
    assert!(
        q.received()
            .starts_with("Received: from swaks.test ([127.0.0.5])"),
        "{}",
        q.received()
    );
}

/// `--max-conns-per-ip 2`: the third connection of one client behind
/// HAProxy is refused, another client behind the same proxy is not, and
/// the proxy's own address (five connections here) never counts.
#[test]
fn per_ip_limit_counts_the_client_behind_haproxy() {
    let server = server(&["--max-conns-per-ip", "2"]);
    let Some(haproxy) = Haproxy::start(&server) else {
        return;
    };
    let mut first = Client::connect_from(haproxy.v2, ip(CLIENT));
    first.greeting();
    let mut second = Client::connect_from(haproxy.v1, ip(CLIENT));
    second.greeting();
    let mut third = Client::connect_from(haproxy.v2, ip(CLIENT));
    let r = third.reply();
    assert_eq!(r.code, 421, "third connection from {CLIENT}: {r}");
    third.expect_closed();

    let mut others: Vec<Client> = (0..2)
        .map(|_| Client::connect_from(haproxy.v2, ip(OTHER_CLIENT)))
        .collect();
    for o in &mut others {
        o.greeting();
    }
    // A closed connection gives its slot back.
    first.expect("QUIT", 221);
    drop(first);
    let deadline = Instant::now() + IO_TIMEOUT;
    loop {
        let mut again = Client::connect_from(haproxy.v2, ip(CLIENT));
        let r = again.reply();
        if r.code == 220 {
            break;
        }
        assert!(Instant::now() < deadline, "slot never released: {r}");
        std::thread::sleep(Duration::from_millis(50));
    }
    second.expect("NOOP", 250);
}

/// The AUTH throttle counts the client behind HAProxy: one client's
/// failures get it 421, another client behind the same proxy still gets its
/// password checked. (127.0.0.5 is loopback, so plaintext AUTH is offered
/// under --allow-plaintext-auth-on-loopback: the header's address decides
/// that too.)
#[test]
fn auth_throttle_counts_the_client_behind_haproxy() {
    let dir = tempfile::tempdir().unwrap();
    let out = common::run_peer_with_input(
        Path::new(env!("CARGO_BIN_EXE_ringmta")),
        &["passwd", "alice"],
        b"secret\n",
        IO_TIMEOUT * 3,
    );
    assert!(out.status.success(), "passwd: {}", out.stderr);
    let users = dir.path().join("users");
    std::fs::write(&users, &out.stdout).unwrap();
    let server = server(&[
        "--users",
        users.to_str().unwrap(),
        "--allow-plaintext-auth-on-loopback",
        "--auth-failure-delay",
        "0",
        "--max-auth-failures",
        "2",
    ]);
    let Some(haproxy) = Haproxy::start(&server) else {
        return;
    };
    // "\0alice\0wrong" and "\0alice\0secret".
    const WRONG: &str = "AUTH PLAIN AGFsaWNlAHdyb25n";
    const RIGHT: &str = "AUTH PLAIN AGFsaWNlAHNlY3JldA==";
    let mut c = Client::connect_from(haproxy.submission, ip(CLIENT));
    c.hello("client.test");
    c.expect(WRONG, 535);
    c.expect(WRONG, 535);
    c.expect(RIGHT, 421);
    let mut other = Client::connect_from(haproxy.submission, ip(OTHER_CLIENT));
    other.hello("other.test");
    other.expect(WRONG, 535);
    other.expect(RIGHT, 235);
}

/// An address outside `--proxy-protocol-from` gets the normal session: its
/// `PROXY` line is an unknown command, and the address it names buys
/// nothing. (The networks come from `RINGMTA_PROXY_PROTOCOL_FROM` here,
/// comma-separated.)
#[test]
fn untrusted_peer_sending_a_proxy_line_gets_a_normal_session() {
    let server = Server::builder()
        .env("RINGMTA_PROXY_PROTOCOL_FROM", "2001:db8::/32,127.0.0.1/32")
        .args(["--relay-network", "192.0.2.7/32"])
        .start();
    // The variable took effect: 127.0.0.1 must send a header.
    let mut trusted = Client::connect(server.addr);
    trusted.send(b"EHLO x\r\n");
    trusted.expect_closed();
    let mut c = Client::connect_from(server.addr, ip("127.0.0.2"));
    c.greeting();
    let r = c.cmd("PROXY TCP4 192.0.2.7 127.0.0.1 40000 25");
    assert_eq!(r.code, 500, "{r}");
    c.expect("EHLO spoof.test", 250);
    c.expect("MAIL FROM:<a@example.org>", 250);
    let r = c.cmd("RCPT TO:<b@remote.example>");
    assert_eq!(r.code, 550, "{r}");
}

/// A trusted address must start with a header: commands instead, a
/// malformed header, or silence past `--proxy-protocol-timeout` get the
/// connection closed without a greeting. A valid header followed by
/// commands in the same write, or sent one octet at a time, starts the
/// session as the client it names.
#[test]
fn trusted_peer_without_a_valid_header_is_dropped() {
    let server = server(&[
        "--proxy-protocol-timeout",
        "1s",
        "--relay-network",
        "192.0.2.7/32",
    ]);
    let mut c = Client::connect(server.addr);
    c.send(b"EHLO direct.test\r\n");
    c.expect_closed();

    let mut c = Client::connect(server.addr);
    c.send(b"PROXY TCP4 192.0.2.7 127.0.0.1 40000\r\nEHLO x\r\n");
    c.expect_closed();

    let mut c = Client::connect(server.addr);
    c.expect_closed();
    assert!(server.wait_for_log("no complete PROXY header within", IO_TIMEOUT));

    let mut c = Client::connect(server.addr);
    c.send(b"PROXY TCP4 192.0.2.7");
    c.shutdown_write();
    c.expect_closed();
    assert!(server.wait_for_log("closed inside a PROXY header", IO_TIMEOUT));
    assert!(server.stderr().contains("no valid PROXY header"));

    // Header and EHLO in one write: the EHLO is not lost.
    let mut c = Client::connect(server.addr);
    c.send(b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 25\r\nEHLO one.test\r\n");
    c.greeting();
    assert_eq!(c.reply().code, 250);
    let id = c.send_message("a@example.org", &["b@remote.example"], b"\r\nv1\r\n");
    assert!(server
        .message(&id)
        .received()
        .starts_with("Received: from one.test ([192.0.2.7])"));

    // A version 2 header for an IPv6 client, one octet per write.
    let mut header = b"\r\n\r\n\0\r\nQUIT\n\x21\x21\x00\x24".to_vec();
    header.extend_from_slice(
        &"2001:db8::7"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets(),
    );
    header.extend_from_slice(&std::net::Ipv6Addr::LOCALHOST.octets());
    header.extend_from_slice(&[0x9c, 0x40, 0x00, 0x19]);
    let mut c = Client::connect(server.addr);
    for b in &header {
        c.send(std::slice::from_ref(b));
    }
    c.hello("two.test");
    c.expect("MAIL FROM:<a@example.org>", 250);
    // 2001:db8::7 may not relay (only 192.0.2.7 may).
    assert_eq!(c.cmd("RCPT TO:<b@remote.example>").code, 550);
    c.expect("RSET", 250);
    let id = c.send_message("a@example.org", &["postmaster@localhost"], b"\r\nv2\r\n");
    assert!(server
        .message(&id)
        .received()
        .starts_with("Received: from two.test ([2001:db8::7])"));
}

/// The implicit-TLS port: the header, then the handshake. A ClientHello in
/// the same write as the header is handed to TLS; the per-IP limit counts
/// the header's address; swaks --tlsc through HAProxy works.
#[test]
fn implicit_tls_after_a_proxy_header() {
    let server = server(&["--max-conns-per-ip", "1"]);
    let smtps = server.smtps.expect("smtps");
    let header = |client: &str| format!("PROXY TCP4 {client} 127.0.0.1 40000 465\r\n");

    let mut held = TlsClient::connect(smtps, header("192.0.2.7").as_bytes());
    held.expect_line("220 ");
    // Same client again: over its limit, closed before any handshake.
    let mut tcp = TcpStream::connect(smtps).unwrap();
    tcp.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    tcp.write_all(header("192.0.2.7").as_bytes()).unwrap();
    let mut buf = [0u8; 64];
    assert!(matches!(tcp.read(&mut buf), Ok(0) | Err(_)));
    // Another client through the same (trusted) address is served.
    let mut other = TlsClient::connect(smtps, header("192.0.2.8").as_bytes());
    other.expect_line("220 ");
    other.send(b"EHLO tls.test\r\n");
    other.expect_line("250 ");
    held.send(b"NOOP\r\n");
    held.expect_line("250 ");

    let Some(haproxy) = Haproxy::start(&server) else {
        return;
    };
    let swaks = peer_program("swaks", "swaks").expect("swaks");
    let port = haproxy.smtps.port().to_string();
    let run = run_peer(
        &swaks,
        &[
            "--server",
            "127.0.0.1",
            "--port",
            &port,
            "--tlsc",
            "--local-interface",
            CLIENT,
            "--quit-after",
            "EHLO",
            "--helo",
            "swaks.test",
        ],
        IO_TIMEOUT * 3,
    );
    assert!(run.status.success(), "{}\n{}", run.stdout, run.stderr);
    assert!(run.stdout.contains("<~  250"), "{}", run.stdout);
}

/// `deploy/haproxy.cfg` is a configuration HAProxy accepts.
#[test]
fn deploy_haproxy_cfg_is_valid() {
    let Some(bin) = peer_program(HAPROXY, "haproxy") else {
        return;
    };
    let cfg = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/haproxy.cfg");
    let out = run_peer(&bin, &["-c", "-f", cfg.to_str().unwrap()], IO_TIMEOUT);
    assert!(out.status.success(), "{}\n{}", out.stdout, out.stderr);
    let text = std::fs::read_to_string(&cfg).unwrap();
    assert!(
        text.contains("send-proxy-v2"),
        "the example must send PROXY v2"
    );
}

// ---------------------------------------------------------------------------
// A minimal blocking TLS client that sends the ClientHello in the same
// write as a PROXY header.

struct TlsClient {
    stream: StreamOwned<ClientConnection, TcpStream>,
    buf: Vec<u8>,
}

impl TlsClient {
    fn connect(addr: SocketAddr, header: &[u8]) -> TlsClient {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCert::new(provider)))
            .with_no_client_auth();
        let name = ServerName::try_from("mx.test").unwrap();
        let mut conn = ClientConnection::new(Arc::new(config), name).unwrap();
        let mut tcp = TcpStream::connect_timeout(&addr, IO_TIMEOUT).unwrap();
        tcp.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        tcp.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        let mut first = header.to_vec();
        while conn.wants_write() {
            conn.write_tls(&mut first).unwrap();
        }
        assert!(first.len() > header.len(), "no ClientHello");
        tcp.write_all(&first).unwrap();
        while conn.is_handshaking() {
            conn.complete_io(&mut tcp).expect("TLS handshake");
        }
        TlsClient {
            stream: StreamOwned::new(conn, tcp),
            buf: Vec::new(),
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
        self.stream.flush().unwrap();
    }

    /// Reads lines until one starts with `prefix` (a reply's last line).
    fn expect_line(&mut self, prefix: &str) {
        loop {
            while let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..i + 2).collect();
                if line.starts_with(prefix.as_bytes()) {
                    return;
                }
                assert_eq!(
                    line.get(3),
                    Some(&b'-'),
                    "{:?}",
                    String::from_utf8_lossy(&line)
                );
            }
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk).expect("read over TLS");
            assert!(n > 0, "closed waiting for {prefix:?}");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}
