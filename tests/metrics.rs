//! The admin listener's `/metrics`, scraped by a real Prometheus (Debian's
//! `prometheus`, started here with a 1 s scrape of ringmta) while
//! smtp-source sends a known number of messages: Prometheus' HTTP API must
//! then report exactly that many accepted, delivered (to Maildir) and
//! replied to. `promtool check metrics` must pass on the text, and every
//! metric name the Grafana dashboard (`deploy/grafana-dashboard.json`)
//! uses must be in it.
//!
//! The admin port is the one ringmta prints (`ringmta listening admin
//! ADDR`, bound on port 0); Prometheus' own port is a free one found by
//! binding port 0 and letting it go.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{http_get, metric, peer_program, run_peer, Client, Server};

const MESSAGES: usize = 300;
const SESSIONS: usize = 10;
/// Messages to a destination that refuses connections: deferred, queued.
const DEFERRED: usize = 3;
/// How long Prometheus may take to show what was sent.
const SETTLE: Duration = Duration::from_secs(60);

#[test]
fn prometheus_scrapes_exact_counts() {
    let Some(smtp_source) = peer_program("smtp-source", "postfix") else {
        return;
    };
    let Some(prometheus) = peer_program("prometheus", "prometheus") else {
        return;
    };
    let Some(promtool) = peer_program("promtool", "prometheus") else {
        return;
    };
    // Local mail is delivered into the test's Maildir; everything else to a
    // smarthost where nothing listens (deferred, stays queued).
    let server = Server::builder()
        .shards(2)
        .args([
            "--relay-host",
            "127.0.0.1:9",
            "--relay-network",
            "127.0.0.0/8",
        ])
        .args(["--retry-schedule", "1h"])
        .start();
    let admin = server.admin.expect("admin listener");
    let prom = Prometheus::start(&prometheus, admin);

    let target = format!("127.0.0.1:{}", server.port);
    let run = run_peer(
        &smtp_source,
        &[
            "-s",
            &SESSIONS.to_string(),
            "-m",
            &MESSAGES.to_string(),
            "-l",
            "512",
            "-M",
            "client.example",
            "-f",
            "sender@example.org",
            "-t",
            "rcpt@localhost",
            &target,
        ],
        Duration::from_secs(120),
    );
    assert!(run.status.success(), "smtp-source: {}", run.stderr);
    let mut c = server.connect();
    c.hello("client.example");
    for _ in 0..DEFERRED {
        c.send_message(
            "sender@example.org",
            &["someone@far.example"],
            b"Subject: x\r\n\r\nbody\r\n",
        );
    }
    c.expect("QUIT", 221);

    let all = MESSAGES + DEFERRED;
    // Connections: one per smtp-source message, and ours.
    let exact = [
        ("sum(ringmta_messages_accepted_total)", all),
        ("sum(ringmta_recipients_accepted_total)", all),
        ("sum(ringmta_spool_commit_messages_sum)", all),
        (
            "sum(ringmta_connections_accepted_total{listener=\"smtp\"})",
            MESSAGES + 1,
        ),
        (
            "sum(ringmta_sessions_total{listener=\"smtp\"})",
            MESSAGES + 1,
        ),
        (
            "sum(ringmta_smtp_replies_total{code=\"250\",enhanced=\"2.1.5\"})",
            all,
        ),
        (
            "sum(ringmta_smtp_replies_total{class=\"2xx\",code=\"221\"})",
            MESSAGES + 1,
        ),
        (
            "sum(ringmta_deliveries_total{outcome=\"delivered\",destination=~\"maildir:.*\"})",
            MESSAGES,
        ),
        ("sum(ringmta_delivery_latency_seconds_count)", MESSAGES),
        (
            "sum(ringmta_deliveries_total{outcome=\"deferred\",destination=\"smtp:127.0.0.1:9\"})",
            DEFERRED,
        ),
        (
            "sum(ringmta_queue_recipients{destination=\"smtp:127.0.0.1:9\"})",
            DEFERRED,
        ),
        ("sum(ringmta_connections_open)", 0),
        ("sum(ringmta_refusals_total)", 0),
    ];
    for (query, want) in exact {
        prom.wait_for(query, want as f64);
    }
    // Some commits; each carried at least one message.
    let commits = prom.value("sum(ringmta_spool_commits_total{file=\"segment\"})");
    assert!(
        commits >= 1.0 && commits <= all as f64,
        "{commits} segment commits for {all} messages"
    );
    let bytes = prom.value("sum(ringmta_received_bytes_total)");
    assert!(bytes > (MESSAGES * 512) as f64, "{bytes} bytes received");

    let text = http_get(admin, "/metrics");
    let check = promtool_check(&promtool, &text);
    assert!(check.0, "promtool check metrics:\n{}\n{text}", check.1);
    dashboard_names_exist(&text);
}

/// Connection limits, TLS handshakes and AUTH are counted as they
/// happen, read straight from `/metrics`.
#[test]
fn refusals_handshakes_and_logins_are_counted() {
    let server = Server::builder()
        .shards(1)
        .args([
            "--max-conns-per-ip",
            "1",
            "--allow-plaintext-auth-on-loopback",
        ])
        .start();
    let admin = server.admin.expect("admin listener");
    let mut c = Client::connect(server.submission.expect("submission"));
    c.hello("client.example");
    // No users: every login fails ("\0alice\0wrong").
    c.expect("AUTH PLAIN AGFsaWNlAHdyb25n", 535);
    // A second connection from this address is one too many.
    let mut second = Client::connect(server.addr);
    let r = second.reply();
    assert!(
        r.is("421 4.7.0 Error: too many connections, closing transmission channel"),
        "{r}"
    );
    c.expect("QUIT", 221);
    c.expect_closed();
    second.expect_closed();
    wait_until(admin, |t| metric(t, "ringmta_connections_open", &[]) == 0.0);
    // Plaintext to the implicit-TLS port: the handshake fails.
    let mut tls = TcpStream::connect(server.smtps.expect("smtps")).unwrap();
    tls.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    tls.write_all(b"EHLO client.example\r\n").unwrap();
    let _ = tls.read_to_end(&mut Vec::new());
    let text = wait_until(admin, |t| {
        metric(t, "ringmta_tls_handshakes_total", &["result=\"failed\""]) > 0.0
    });
    let count = |name, labels: &[&str]| metric(&text, name, labels);
    assert_eq!(
        count("ringmta_tls_handshakes_total", &["result=\"failed\""]),
        1.0
    );
    assert_eq!(
        count("ringmta_tls_handshakes_total", &["result=\"ok\""]),
        0.0
    );
    assert_eq!(
        count("ringmta_auth_attempts_total", &["result=\"failure\""]),
        1.0
    );
    assert_eq!(
        count("ringmta_auth_attempts_total", &["result=\"success\""]),
        0.0
    );
    assert_eq!(
        count(
            "ringmta_connections_refused_total",
            &["reason=\"ip_limit\""]
        ),
        1.0
    );
    assert_eq!(
        count("ringmta_connections_accepted_total", &["listener=\"smtp\""]),
        1.0
    );
    assert_eq!(
        count(
            "ringmta_connections_accepted_total",
            &["listener=\"smtps\""]
        ),
        1.0
    );
    assert_eq!(
        count("ringmta_sessions_total", &["listener=\"submission\""]),
        1.0
    );
    // The session on smtps never started; the refused one had none.
    assert_eq!(count("ringmta_sessions_total", &[]), 1.0);
    assert_eq!(
        count(
            "ringmta_smtp_replies_total",
            &["class=\"5xx\"", "code=\"535\"", "enhanced=\"5.7.8\""]
        ),
        1.0
    );
    assert_eq!(
        count(
            "ringmta_smtp_replies_total",
            &["code=\"421\"", "enhanced=\"4.7.0\""]
        ),
        1.0
    );
    assert_eq!(count("ringmta_smtp_replies_total", &["code=\"220\""]), 1.0);
}

/// Polls `/metrics` (bounded) until `done` holds; returns that text.
fn wait_until(admin: SocketAddr, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = http_get(admin, "/metrics");
        if done(&text) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "metrics never got there:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn promtool_check(promtool: &Path, text: &str) -> (bool, String) {
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn promtool");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().expect("promtool");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), said)
}

/// Every `ringmta_*` name in the dashboard's queries is a metric in `text`
/// (a histogram's `_bucket`/`_sum`/`_count` by its base name).
fn dashboard_names_exist(text: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/grafana-dashboard.json");
    let dash = std::fs::read_to_string(&path).expect("deploy/grafana-dashboard.json");
    let families: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    let mut used = Vec::new();
    let mut rest = dash.as_str();
    while let Some(i) = rest.find("ringmta_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        // Names only (the description's `ringmta_*` is not one).
        if end > "ringmta_".len() {
            used.push(&tail[..end]);
        }
        rest = &tail[end..];
    }
    assert!(
        used.len() >= 10,
        "the dashboard uses too few metrics: {used:?}"
    );
    for name in used {
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .filter(|b| families.contains(b))
            .unwrap_or(name);
        assert!(
            families.contains(&base),
            "dashboard metric {name} is not in /metrics"
        );
    }
}

/// A Prometheus server scraping one target every second; killed on drop.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(bin: &Path, target: SocketAddr) -> Prometheus {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
                 scrape_configs:\n  - job_name: ringmta\n    static_configs:\n      \
                 - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new(bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn prometheus");
        let p = Prometheus {
            child,
            addr,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while p.try_query("up").is_none() {
            assert!(
                Instant::now() < deadline,
                "prometheus did not start: {}",
                p.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        p
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// Waits (bounded) until `query` is `want`; fails at once when it is
    /// past it (counts only grow).
    fn wait_for(&self, query: &str, want: f64) {
        let deadline = Instant::now() + SETTLE;
        let mut last = None;
        loop {
            let v = self.try_query(query);
            if v == Some(want) {
                return;
            }
            if let Some(v) = v {
                assert!(
                    !(v > want && !query.contains("open") && !query.contains("queue")),
                    "{query} = {v}, more than {want}"
                );
            }
            last = v.or(last);
            assert!(
                Instant::now() < deadline,
                "{query} = {last:?}, not {want}, after {SETTLE:?}"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    fn value(&self, query: &str) -> f64 {
        self.try_query(query)
            .unwrap_or_else(|| panic!("no value for {query}"))
    }

    /// The single value of an instant query, if there is one.
    fn try_query(&self, query: &str) -> Option<f64> {
        let mut s = TcpStream::connect(self.addr).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        let q = encode(query);
        write!(
            s,
            "GET /api/v1/query?query={q} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.addr
        )
        .ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        // {"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[T,"V"]}]}}
        let at = out.find("\"value\":[")?;
        let rest = &out[at..];
        let start = rest.find(",\"")? + 2;
        let end = start + rest[start..].find('"')?;
        rest[start..end].parse().ok()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Percent-encodes a query for a URL.
fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
