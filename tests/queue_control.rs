//! The admin API's queue control, end to end: a real relay delivering to a
//! real downstream ringmta (which keeps what it gets queued: the sink),
//! driven through the JSON API and the `ringmta queue` verbs. Hold a
//! destination's messages, restart, still held, release, delivered;
//! bounce by domain, one report per message; suspend a destination,
//! nothing connects (across a restart) until resume, then every message
//! arrives once; the bearer token.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::{metric, Server};

fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One API call: status and JSON answer.
fn api(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<Value>,
    token: Option<&str>,
) -> (u16, Value) {
    let mut s = TcpStream::connect(addr).expect("connect to the admin listener");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: t\r\n{auth}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").expect("an HTTP answer");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// `ringmta queue ARGS...` against a running server; stdout, or a panic
/// with stderr when it fails.
fn cli(args: &[&str]) -> String {
    let out = cli_run(args);
    assert!(
        out.status.success(),
        "ringmta queue {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn cli_run(args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ringmta"));
    cmd.arg("queue").args(args);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("RINGMTA_") {
            cmd.env_remove(k);
        }
    }
    cmd.output().expect("run ringmta queue")
}

/// The relay under test, on `spool`, routing example.net and
/// other.example to `port` on loopback.
fn relay(spool: &Path, port: u16, shards: usize, extra: &[&str]) -> Server {
    Server::builder()
        .spool_dir(spool)
        .shards(shards)
        .arg("--route")
        .arg(format!("example.net=smtp:127.0.0.1:{port}"))
        .arg("--route")
        .arg(format!("other.example=smtp:127.0.0.1:{port}"))
        .args(["--relay-network", "127.0.0.0/8", "--retry-schedule", "1h"])
        // Local mail (the reports to sender@localhost) beside the spool.
        .arg("--maildir")
        .arg(spool.parent().unwrap().join("maildir").to_str().unwrap())
        .args(extra.iter().copied())
        .start()
}

fn send(server: &Server, n: usize, rcpts: &[&str]) -> Vec<String> {
    let mut c = server.connect();
    c.hello("client.example");
    (0..n)
        .map(|i| {
            c.send_message(
                "sender@localhost",
                rcpts,
                format!("Subject: queue control {i}\r\n\r\nbody {i}\r\n").as_bytes(),
            )
        })
        .collect()
}

fn stop(mut server: Server) {
    server.signal(libc::SIGTERM);
    server.assert_exits_cleanly(Duration::from_secs(30));
}

fn admin(server: &Server) -> SocketAddr {
    server.admin.expect("admin listener")
}

/// Connections the downstream ringmta accepted (its own metrics).
fn connections(downstream: &Server) -> f64 {
    let text = common::http_get(admin(downstream), "/metrics");
    metric(&text, "ringmta_connections_accepted_total", &[])
}

fn reports(server: &Server, mailbox: &str) -> Vec<String> {
    let root = server.spool_dir().parent().unwrap().join("maildir");
    let (local, domain) = mailbox.split_once('@').unwrap();
    let Ok(dir) = std::fs::read_dir(root.join(domain).join(local).join("new")) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = dir.map(|e| e.unwrap().path()).collect();
    files.sort();
    files
        .iter()
        .map(|p| String::from_utf8_lossy(&std::fs::read(p).unwrap()).into_owned())
        .collect()
}

fn messages(server: &Server, query: &str) -> Vec<Value> {
    let (status, v) = api(
        admin(server),
        "GET",
        &format!("/api/v1/queue/messages{query}"),
        None,
        None,
    );
    assert_eq!(status, 200, "{v}");
    v["messages"].as_array().unwrap().clone()
}

#[test]
fn held_messages_stay_held_across_a_restart_and_go_when_released() {
    let downstream = Server::start(&["--local-domain", "example.net"]);
    let spool = tempfile::tempdir().unwrap();
    let spool_dir = spool.path().join("spool");
    let dest = format!("smtp:127.0.0.1:{}", downstream.port);
    let r = relay(&spool_dir, downstream.port, 2, &[]);
    let admin_addr = admin(&r).to_string();
    // Nothing may leave before the hold: the destination is suspended
    // first (through the CLI).
    let out = cli(&[
        "suspend",
        "--destination",
        &dest,
        "--duration",
        "1h",
        "--admin",
        &admin_addr,
    ]);
    assert!(
        out.starts_with(&format!("suspended {dest} until ")),
        "{out}"
    );
    let ids = send(&r, 3, &["u@example.net"]);
    let out = cli(&["hold", "--destination", &dest, "--admin", &admin_addr]);
    assert_eq!(out, "hold: 3 messages, 3 recipients\n");
    // Held is what keeps them now.
    let out = cli(&["resume", "--destination", &dest, "--admin", &admin_addr]);
    assert_eq!(out, format!("resumed {dest}\n"));
    assert!(r.wait_for_log("event=\"admin\"", Duration::from_secs(5)));
    stop(r);

    let r = relay(&spool_dir, downstream.port, 2, &[]);
    let listed = messages(&r, "");
    assert_eq!(listed.len(), 3, "{listed:?}");
    for m in &listed {
        assert_eq!(m["held"], json!(true), "{m}");
        assert!(ids.contains(&m["id"].as_str().unwrap().to_owned()));
        assert_eq!(m["recipients"][0]["state"], json!("pending"));
        assert_eq!(m["recipients"][0]["destination"], json!(dest));
    }
    let (status, summary) = api(admin(&r), "GET", "/api/v1/queue", None, None);
    assert_eq!(status, 200);
    let d = &summary["destinations"][0];
    assert_eq!(
        (&d["destination"], &d["messages"], &d["held"]),
        (&json!(dest), &json!(3), &json!(3)),
        "{summary}"
    );
    let out = cli(&["summary", "--admin", &admin(&r).to_string()]);
    assert!(out.contains(&format!("{dest} 3 3 3 ")), "{out}");
    // The scheduler had every chance to send them: nothing went.
    std::thread::sleep(Duration::from_secs(2));
    assert!(downstream.queued().is_empty());
    assert_eq!(connections(&downstream), 0.0);

    let (status, v) = api(
        admin(&r),
        "POST",
        "/api/v1/queue/release",
        Some(json!({ "destination": "127.0.0.1" })),
        None,
    );
    assert_eq!((status, &v["messages"]), (200, &json!(3)), "{v}");
    wait_until("delivery downstream", Duration::from_secs(30), || {
        downstream.queued().len() == 3
    });
    wait_until("relay queue drained", Duration::from_secs(10), || {
        r.queued().is_empty()
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(downstream.queued().len(), 3, "each exactly once");
}

#[test]
fn bounce_by_domain_sends_one_report_per_message() {
    // Nothing listens on the destination: the first attempt is deferred
    // (for an hour), and the messages wait.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = dead.local_addr().unwrap().port();
    drop(dead);
    let spool = tempfile::tempdir().unwrap();
    let r = relay(&spool.path().join("spool"), port, 1, &[]);
    send(&r, 2, &["a@example.net", "b@example.net"]);
    let mixed = send(&r, 1, &["c@example.net", "d@other.example"]).remove(0);
    wait_until("first attempts deferred", Duration::from_secs(20), || {
        r.stderr().matches("event=\"deferred\"").count() >= 6
    });
    let (status, v) = api(
        admin(&r),
        "POST",
        "/api/v1/queue/bounce",
        Some(json!({ "domain": "example.net", "reason": "example.net moved away" })),
        None,
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        (&v["action"], &v["messages"], &v["recipients"], &v["failed"]),
        (&json!("bounce"), &json!(3), &json!(5), &json!(0)),
        "{v}"
    );
    assert_eq!(v["selector"], json!({ "domain": "example.net" }));
    wait_until("three reports", Duration::from_secs(20), || {
        reports(&r, "sender@localhost").len() >= 3
    });
    std::thread::sleep(Duration::from_secs(1));
    let got = reports(&r, "sender@localhost");
    assert_eq!(got.len(), 3, "one report per message");
    for report in &got {
        assert!(report.contains("report-type=delivery-status"), "{report}");
        assert!(report.contains("Action: failed"), "{report}");
        assert!(report.contains("Status: 5.0.0"), "{report}");
        assert!(report.contains("example.net moved away"), "{report}");
        assert!(!report.contains("Final-Recipient: rfc822; d@other.example"));
    }
    // The other domain's recipient is still queued, the rest is gone.
    let left = messages(&r, "");
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0]["id"], json!(mixed));
    let states: Vec<(&str, &str)> = left[0]["recipients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["address"].as_str().unwrap(), r["state"].as_str().unwrap()))
        .collect();
    assert_eq!(
        states,
        [
            ("c@example.net", "bounced"),
            ("d@other.example", "deferred")
        ]
    );
    assert!(r.stderr().contains("admin action"));
    // Delete by id (CLI): the message goes, no report.
    let out = cli(&["delete", "--id", &mixed, "--admin", &admin(&r).to_string()]);
    assert_eq!(out, "delete: 1 messages, 1 recipients\n");
    assert!(messages(&r, "").is_empty());
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(reports(&r, "sender@localhost").len(), 3);
}

#[test]
fn a_suspended_destination_gets_no_connection_until_resumed_even_across_a_restart() {
    let downstream = Server::start(&["--local-domain", "example.net"]);
    let spool = tempfile::tempdir().unwrap();
    let spool_dir = spool.path().join("spool");
    let dest = format!("smtp:127.0.0.1:{}", downstream.port);
    let r = relay(&spool_dir, downstream.port, 2, &[]);
    let (status, v) = api(
        admin(&r),
        "POST",
        "/api/v1/suspend",
        Some(json!({ "destination": dest, "duration": "30m", "reason": "maintenance" })),
        None,
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["reason"], json!("maintenance"));
    let ids = send(&r, 4, &["u@example.net"]);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(connections(&downstream), 0.0);
    let text = common::http_get(admin(&r), "/metrics");
    assert_eq!(metric(&text, "ringmta_suspended_destinations", &[]), 1.0);
    stop(r);

    let r = relay(&spool_dir, downstream.port, 2, &[]);
    let (_, s) = api(admin(&r), "GET", "/api/v1/suspensions", None, None);
    assert_eq!(s["suspensions"][0]["destination"], json!(dest), "{s}");
    let (_, summary) = api(admin(&r), "GET", "/api/v1/queue", None, None);
    let d = &summary["destinations"][0];
    assert_eq!(d["messages"], json!(4), "{summary}");
    assert!(d["suspended_until"].as_u64().is_some(), "{summary}");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(connections(&downstream), 0.0, "connected while suspended");
    assert!(downstream.queued().is_empty());

    let out = cli(&[
        "resume",
        "--destination",
        &dest,
        "--admin",
        &admin(&r).to_string(),
    ]);
    assert_eq!(out, format!("resumed {dest}\n"));
    wait_until("delivery downstream", Duration::from_secs(30), || {
        downstream.queued().len() == 4
    });
    wait_until("relay queue drained", Duration::from_secs(10), || {
        r.queued().is_empty()
    });
    std::thread::sleep(Duration::from_millis(500));
    let got = downstream.queued();
    assert_eq!(got.len(), 4, "each exactly once");
    for q in &got {
        let text = String::from_utf8_lossy(&q.message);
        assert!(ids.iter().any(|id| text.contains(id.as_str())), "{text}");
    }
    let (status, _) = api(
        admin(&r),
        "POST",
        "/api/v1/resume",
        Some(json!({ "destination": dest })),
        None,
    );
    assert_eq!(status, 404, "no longer suspended");
    assert!(cli(&["suspensions", "--admin", &admin(&r).to_string()]).is_empty());
}

#[test]
fn the_api_wants_the_bearer_token_when_one_is_set() {
    let dir = tempfile::tempdir().unwrap();
    let token = "s3cret-token-0123456789abcdef";
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let token_arg = token_file.to_str().unwrap();
    let r = Server::start(&["--admin-token-file", token_arg]);
    let a = admin(&r);
    assert_eq!(api(a, "GET", "/api/v1/queue", None, None).0, 401);
    assert_eq!(
        api(
            a,
            "GET",
            "/api/v1/queue",
            None,
            Some("s3cret-token-0123456789abcdeX")
        )
        .0,
        401
    );
    assert_eq!(api(a, "GET", "/api/v1/queue", None, Some("short")).0, 401);
    assert_eq!(api(a, "GET", "/api/v1/queue", None, Some(token)).0, 200);
    assert_eq!(
        api(
            a,
            "POST",
            "/api/v1/queue/hold",
            Some(json!({"domain": "x.example"})),
            None
        )
        .0,
        401
    );
    // Metrics stay open to scrapers.
    common::http_get(a, "/metrics");
    // The CLI with and without the file.
    let addr = a.to_string();
    let out = cli(&["summary", "--admin", &addr, "--admin-token-file", token_arg]);
    assert!(out.starts_with("destination messages"), "{out}");
    let denied = cli_run(&["summary", "--admin", &addr]);
    assert!(!denied.status.success());
    assert!(
        String::from_utf8_lossy(&denied.stderr).contains("401"),
        "{}",
        String::from_utf8_lossy(&denied.stderr)
    );

    // Not on loopback without a token: refused at start.
    let Err(e) = Server::builder().args(["--admin", "0.0.0.0:0"]).try_start() else {
        panic!("started with --admin 0.0.0.0 and no token");
    };
    assert!(e.stderr.contains("--admin-token-file"), "{e}");
}

#[test]
fn api_errors_are_precise() {
    let r = Server::start(&[]);
    let a = admin(&r);
    let mut c = r.connect();
    c.hello("client.example");
    let id = c.send_message(
        "s@example.org",
        &["u@localhost"],
        b"Subject: x\r\n\r\nx\r\n",
    );
    // --no-delivery: it stays queued.
    let (status, v) = api(
        a,
        "GET",
        &format!("/api/v1/queue/messages/{id}"),
        None,
        None,
    );
    assert_eq!(status, 200, "{v}");
    let m = &v["message"];
    assert_eq!(
        (&m["id"], &m["sender"]),
        (&json!(id), &json!("s@example.org"))
    );
    assert!(m["size"].as_u64().unwrap() > 0);
    assert!(m["envelope"].as_array().unwrap().len() > 1);
    assert!(m["arrival"].as_u64().unwrap() > 1_700_000_000);
    let listed = messages(&r, "?domain=localhost&limit=5");
    assert_eq!(listed.len(), 1);
    assert!(messages(&r, "?domain=example.org").is_empty());

    for (method, path, body, want) in [
        ("GET", "/api/v1/queue/messages/nope", None, 404),
        ("GET", "/api/v1/queue/hold", None, 405),
        ("POST", "/api/v1/queue", None, 405),
        ("POST", "/api/v1/queue/hold", Some(json!({})), 400),
        (
            "POST",
            "/api/v1/queue/hold",
            Some(json!({"id": "a", "domain": "b"})),
            400,
        ),
        ("POST", "/api/v1/queue/hold", Some(json!({"ids": "a"})), 400),
        (
            "POST",
            "/api/v1/queue/bounce",
            Some(json!({"id": "a"})),
            400,
        ),
        (
            "POST",
            "/api/v1/queue/bounce",
            Some(json!({"id": id, "reason": "x"})),
            409, // --no-delivery: no report can be sent
        ),
        (
            "POST",
            "/api/v1/suspend",
            Some(json!({"destination": "x", "duration": "40d"})),
            400,
        ),
        (
            "POST",
            "/api/v1/resume",
            Some(json!({"destination": "x"})),
            404,
        ),
        ("GET", "/api/v1/queue/messages?limit=0", None, 400),
        ("GET", "/api/v1/nothing", None, 404),
    ] {
        let (status, v) = api(a, method, path, body, None);
        assert_eq!(status, want, "{method} {path}: {v}");
        if want != 404 || path.starts_with("/api/v1/queue") {
            assert!(
                v["error"].is_string() || want == 405,
                "{method} {path}: {v}"
            );
        }
    }
    // Hold, then release, by id; the journal keeps it.
    let (status, v) = api(
        a,
        "POST",
        "/api/v1/queue/hold",
        Some(json!({"id": id})),
        None,
    );
    assert_eq!((status, &v["messages"]), (200, &json!(1)), "{v}");
    let (_, v) = api(
        a,
        "POST",
        "/api/v1/queue/hold",
        Some(json!({"id": id})),
        None,
    );
    assert_eq!(v["messages"], json!(0), "already held: {v}");
    assert_eq!(messages(&r, "")[0]["held"], json!(true));
    wait_until("the held gauge", Duration::from_secs(15), || {
        let text = common::http_get(a, "/metrics");
        metric(&text, "ringmta_queue_held_messages", &[]) == 1.0
    });
    let (_, v) = api(
        a,
        "POST",
        "/api/v1/queue/release",
        Some(json!({"id": id})),
        None,
    );
    assert_eq!(v["messages"], json!(1), "{v}");
    assert_eq!(messages(&r, "")[0]["held"], json!(false));
}

/// Work already queued for a destination (behind a connection that hangs)
/// is taken back by a hold: no further connection is made for the held
/// messages once the hung attempt ends.
#[test]
fn a_hold_takes_back_work_already_queued_for_the_destination() {
    // Accepts connections (the kernel does) and never greets.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    silent.set_nonblocking(true).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopping = stop.clone();
    let acceptor = std::thread::spawn(move || {
        let mut held = Vec::new();
        while !stopping.load(std::sync::atomic::Ordering::SeqCst) {
            match silent.accept() {
                Ok((s, _)) => {
                    counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    held.push(s);
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    });
    let spool = tempfile::tempdir().unwrap();
    let r = relay(
        &spool.path().join("spool"),
        port,
        2,
        &["--max-conns-per-dest", "1", "--relay-banner-timeout", "3s"],
    );
    // One connection each: both shards take some in, so work is handed
    // to the destination's owner from the other shard too.
    for _ in 0..6 {
        send(&r, 1, &["u@example.net"]);
    }
    wait_until("the first connection", Duration::from_secs(10), || {
        accepted.load(std::sync::atomic::Ordering::SeqCst) == 1
    });
    let (status, v) = api(
        admin(&r),
        "POST",
        "/api/v1/queue/hold",
        Some(json!({ "domain": "example.net" })),
        None,
    );
    assert_eq!((status, &v["messages"]), (200, &json!(6)), "{v}");
    // The hung attempt times out (its message is deferred); nothing else
    // is tried.
    assert!(r.wait_for_log("event=\"deferred\"", Duration::from_secs(20)));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    let listed = messages(&r, "?destination=127.0.0.1");
    assert_eq!(listed.len(), 6);
    assert!(listed.iter().all(|m| m["held"] == json!(true)));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    acceptor.join().unwrap();
}

/// A deferred message waits for its retry time (an hour here); flush
/// makes it due now, and it is delivered once the next hop is back.
#[test]
fn flush_retries_deferred_messages_now() {
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = free.local_addr().unwrap().port();
    drop(free);
    let spool = tempfile::tempdir().unwrap();
    let r = relay(&spool.path().join("spool"), port, 1, &[]);
    send(&r, 2, &["u@example.net"]);
    wait_until("first attempts deferred", Duration::from_secs(20), || {
        r.stderr().matches("event=\"deferred\"").count() >= 2
    });
    // The event is logged as the outcome is journaled, not after: the
    // queue says so once the journal write returned.
    wait_until("deferrals journaled", Duration::from_secs(10), || {
        messages(&r, "?domain=example.net")
            .iter()
            .all(|m| m["recipients"][0]["state"] == json!("deferred"))
    });
    let listed = messages(&r, "?domain=example.net");
    assert_eq!(listed.len(), 2);
    for m in &listed {
        assert_eq!(m["recipients"][0]["state"], json!("deferred"), "{m}");
        assert!(
            m["recipients"][0]["retry_at"].as_u64().unwrap() > m["arrival"].as_u64().unwrap() + 600
        );
    }
    // The next hop comes back on that port.
    let smtp = format!("127.0.0.1:{port}");
    let downstream = Server::start(&["--smtp", &smtp, "--local-domain", "example.net"]);
    std::thread::sleep(Duration::from_secs(1));
    assert!(downstream.queued().is_empty(), "retried before its time");
    let out = cli(&[
        "flush",
        "--domain",
        "example.net",
        "--admin",
        &admin(&r).to_string(),
    ]);
    assert_eq!(out, "flush: 2 messages, 2 recipients\n");
    wait_until("delivery downstream", Duration::from_secs(30), || {
        downstream.queued().len() == 2
    });
    wait_until("relay queue drained", Duration::from_secs(10), || {
        r.queued().is_empty()
    });
}
