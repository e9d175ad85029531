//! Traffic shaping (`--shaping`, issue 13): a routed domain held to its
//! message rate, connection count and deliveries per connection, measured
//! at a next hop on loopback (a small SMTP sink in this test that counts
//! concurrent connections and stamps each message); and MX rollup: two
//! domains whose MX hosts (served by a dnsmasq the test starts) match one
//! provider pattern share that provider's budget, although two different
//! shards own them.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::Server;

/// What the sink saw.
#[derive(Default)]
struct Seen {
    /// When each message's final dot arrived, with its Subject.
    messages: Vec<(Instant, String)>,
    /// Messages carried by each connection, in accept order.
    per_connection: Vec<usize>,
    /// When each connection was accepted.
    accepted: Vec<Instant>,
    /// When the sink answered `421 4.7.28` (see [`Sink::throttling`]).
    throttled_at: Option<Instant>,
    /// Messages still to answer `451 4.3.0` at their final dot (not
    /// counted), and when each such answer went.
    to_defer: usize,
    deferred_at: Vec<Instant>,
}

/// An SMTP next hop on loopback that accepts everything and counts.
struct Sink {
    port: u16,
    open: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
    accepter: Option<JoinHandle<()>>,
}

impl Sink {
    fn start() -> Sink {
        Sink::throttling(usize::MAX)
    }

    /// A sink that answers the MAIL after its `after`th message with
    /// `421 4.7.28 ... rate limited` and closes, once; then accepts again.
    fn throttling(after: usize) -> Sink {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let open = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Seen::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (o, p, s, st) = (open.clone(), peak.clone(), seen.clone(), stop.clone());
        let accepter = std::thread::spawn(move || {
            let mut handlers = Vec::new();
            while !st.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let now = o.fetch_add(1, Ordering::SeqCst) + 1;
                        p.fetch_max(now, Ordering::SeqCst);
                        let n = {
                            let mut seen = s.lock().unwrap();
                            seen.per_connection.push(0);
                            seen.accepted.push(Instant::now());
                            seen.per_connection.len() - 1
                        };
                        let (o, s, st) = (o.clone(), s.clone(), st.clone());
                        handlers.push(std::thread::spawn(move || {
                            let mut open = Some(&*o);
                            serve(conn, n, &s, &st, after, &mut open);
                            if let Some(o) = open {
                                o.fetch_sub(1, Ordering::SeqCst);
                            }
                        }));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    Err(_) => break,
                }
            }
            for h in handlers {
                let _ = h.join();
            }
        });
        Sink {
            port,
            open,
            peak,
            seen,
            stop,
            accepter: Some(accepter),
        }
    }

    fn count(&self) -> usize {
        self.seen.lock().unwrap().messages.len()
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.accepter.take() {
            let _ = h.join();
        }
        let _ = self.open.load(Ordering::SeqCst);
    }
}

/// Serves one connection. `open` is the count of open connections: taken
/// and decremented here before the `221` to QUIT goes out, since the
/// client may open its next connection as soon as it reads it (else the
/// peak could count a connection that is closing).
fn serve(
    mut conn: TcpStream,
    n: usize,
    seen: &Mutex<Seen>,
    stop: &AtomicBool,
    after: usize,
    open: &mut Option<&AtomicUsize>,
) {
    conn.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let _ = conn.write_all(b"220 sink.test ESMTP\r\n");
    let mut buf = Vec::new();
    let mut data: Option<String> = None;
    let mut chunk = [0u8; 8192];
    while !stop.load(Ordering::SeqCst) {
        while let Some(at) = buf.windows(2).position(|w| w == b"\r\n") {
            let line = String::from_utf8_lossy(&buf[..at]).into_owned();
            buf.drain(..at + 2);
            if let Some(subject) = data.as_mut() {
                if line == "." {
                    let subject = data.take().unwrap_or_default();
                    let mut s = seen.lock().unwrap();
                    if s.to_defer > 0 {
                        s.to_defer -= 1;
                        s.deferred_at.push(Instant::now());
                        drop(s);
                        let _ = conn.write_all(b"451 4.3.0 Error: queue file write error\r\n");
                        continue;
                    }
                    s.messages.push((Instant::now(), subject));
                    s.per_connection[n] += 1;
                    drop(s);
                    let _ = conn.write_all(b"250 2.0.0 taken\r\n");
                } else if let Some(v) = line.strip_prefix("Subject: ") {
                    *subject = v.to_owned();
                }
                continue;
            }
            let verb = line.get(..4).unwrap_or("").to_ascii_uppercase();
            if verb == "MAIL" {
                let mut s = seen.lock().unwrap();
                if s.messages.len() == after && s.throttled_at.is_none() {
                    s.throttled_at = Some(Instant::now());
                    drop(s);
                    let _ = conn.write_all(
                        b"421 4.7.28 [127.0.0.1] Our system has detected an unusual rate of mail; rate limited\r\n",
                    );
                    return;
                }
            }
            let reply: &[u8] = match verb.as_str() {
                "EHLO" => b"250-sink.test\r\n250 8BITMIME\r\n",
                "DATA" => {
                    data = Some(String::new());
                    b"354 go on\r\n"
                }
                "QUIT" => {
                    if let Some(o) = open.take() {
                        o.fetch_sub(1, Ordering::SeqCst);
                    }
                    let _ = conn.write_all(b"221 bye\r\n");
                    return;
                }
                "MAIL" | "RCPT" | "RSET" | "NOOP" | "HELO" => b"250 ok\r\n",
                _ => b"500 what\r\n",
            };
            let _ = conn.write_all(reply);
        }
        match conn.read(&mut chunk) {
            Ok(0) => return,
            Ok(k) => buf.extend_from_slice(&chunk[..k]),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return,
        }
    }
}

fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Messages per second between the first and the last message the sink
/// took (N messages span N-1 intervals).
fn measured_rate(seen: &Seen) -> f64 {
    let first = seen.messages.iter().map(|m| m.0).min().unwrap();
    let last = seen.messages.iter().map(|m| m.0).max().unwrap();
    (seen.messages.len() - 1) as f64 / (last - first).as_secs_f64()
}

/// Every subject in `want` exactly once.
fn assert_once(seen: &Seen, want: usize) {
    let mut subjects: Vec<&str> = seen.messages.iter().map(|m| m.1.as_str()).collect();
    subjects.sort_unstable();
    let before = subjects.len();
    subjects.dedup();
    assert_eq!(before, subjects.len(), "a message arrived twice");
    assert_eq!(subjects.len(), want);
}

/// The test: a destination limited to 10 messages/s and 2
/// connections receives 200 messages; rate and peak connections measured
/// at the sink within 10 %. The domain is routed (`--route`): its
/// `[domain]` entry governs it all the same. Two shards: the route's
/// owner enforces the budget for mail taken in by either.
#[test]
fn routed_domain_is_held_to_its_rate_connections_and_deliveries_per_connection() {
    let sink = Sink::start();
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("shaping.toml");
    std::fs::write(
        &rules,
        "[default]\nmax_connections = 8\n\n\
         [domain.\"rate.test\"]\nmax_connections = 2\nmax_message_rate = \"10/s\"\n\
         max_deliveries_per_connection = 50\nidle_timeout = \"2s\"\n",
    )
    .unwrap();
    let relay = Server::builder()
        .shards(2)
        .args([
            "--route".to_owned(),
            format!("rate.test=smtp:127.0.0.1:{}", sink.port),
            "--relay-network".into(),
            "127.0.0.0/8".into(),
            "--shaping".into(),
            rules.to_str().unwrap().into(),
        ])
        .start();
    // Two clients, so both shards take mail in.
    let mut clients = [relay.connect(), relay.connect()];
    for c in &mut clients {
        c.hello("client.example");
    }
    const N: usize = 200;
    for i in 0..N {
        let body = format!("Subject: m{i:03}\r\n\r\nbody {i}\r\n");
        clients[i % 2].send_message(
            "s@localhost",
            &[&format!("u{i}@rate.test")],
            body.as_bytes(),
        );
    }
    wait_until("200 deliveries", Duration::from_secs(60), || {
        sink.count() >= N
    });
    std::thread::sleep(Duration::from_millis(300));
    let seen = sink.seen.lock().unwrap();
    assert_once(&seen, N);
    let rate = measured_rate(&seen);
    let peak = sink.peak.load(Ordering::SeqCst);
    eprintln!(
        "shaping: {N} messages at {rate:.2}/s (limit 10/s), peak {peak} connections (limit 2), \
         per connection {:?}",
        seen.per_connection
    );
    assert!((9.0..=11.0).contains(&rate), "rate {rate:.2}/s");
    assert_eq!(peak, 2, "peak connections");
    assert!(
        seen.per_connection.iter().all(|&n| n <= 50),
        "{:?}",
        seen.per_connection
    );
    assert!(seen.per_connection.len() >= N / 50);
}

/// The shard that owns `key` among `peers` (the relay's FNV-1a, as
/// `relay::handoff::owner_of` computes it).
fn owner(key: &str, peers: u64) -> u64 {
    key.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b.to_ascii_lowercase())).wrapping_mul(0x100_0000_01b3)
    }) % peers
}

/// MX rollup: two domains, owned by different shards, whose MX hosts match
/// one provider's pattern are held together to the provider's 10/s and 2
/// connections (each alone would be allowed as much).
#[test]
fn mx_rollup_two_domains_share_one_provider_budget() {
    // Two domains the two shards own one each.
    let a = "one.test".to_owned();
    let b = (0..)
        .map(|i| format!("two{i}.test"))
        .find(|d| owner(d, 2) != owner(&a, 2))
        .unwrap();
    let sink = Sink::start();
    let Some((_dns, dns_port)) = common::dnsmasq(
        &[
            format!("--mx-host={a},mx1.hosting.sinkprov.test,10"),
            format!("--mx-host={b},mx2.hosting.sinkprov.test,10"),
            "--host-record=mx1.hosting.sinkprov.test,127.0.0.1".into(),
            "--host-record=mx2.hosting.sinkprov.test,127.0.0.1".into(),
        ],
        0,
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("shaping.toml");
    std::fs::write(
        &rules,
        "[provider.sinkprov]\nmx = [\"*.sinkprov.test\"]\nmax_connections = 2\n\
         max_message_rate = \"10/s\"\n",
    )
    .unwrap();
    let relay = Server::builder()
        .shards(2)
        .args([
            "--dns-server".to_owned(),
            format!("127.0.0.1:{dns_port}"),
            "--outbound-port".into(),
            sink.port.to_string(),
            "--relay-network".into(),
            "127.0.0.0/8".into(),
            "--shaping".into(),
            rules.to_str().unwrap().into(),
        ])
        .start();
    let mut c = relay.connect();
    c.hello("client.example");
    const N: usize = 80;
    for i in 0..N {
        let domain = if i % 2 == 0 { &a } else { &b };
        let body = format!("Subject: r{i:03}\r\n\r\nbody {i}\r\n");
        c.send_message("s@localhost", &[&format!("u{i}@{domain}")], body.as_bytes());
    }
    wait_until("deliveries", Duration::from_secs(40), || sink.count() >= N);
    std::thread::sleep(Duration::from_millis(300));
    let seen = sink.seen.lock().unwrap();
    assert_once(&seen, N);
    let rate = measured_rate(&seen);
    let peak = sink.peak.load(Ordering::SeqCst);
    eprintln!("rollup: {N} messages to {a} and {b} at {rate:.2}/s (limit 10/s), peak {peak}");
    assert!((9.0..=11.0).contains(&rate), "rate {rate:.2}/s");
    assert!(peak <= 2, "peak connections {peak}");
}

/// Backoff: the next hop answers `421 4.7.28 ... rate limited` after 10
/// messages; the reply is classified as throttling (a `--bounce-rules`
/// rule with a short suspension), the destination is suspended: no
/// connection during the suspension (counted at the sink), then delivery
/// resumes and every message arrives exactly once. The class is in the
/// event log.
#[test]
fn throttling_reply_suspends_the_destination_then_everything_is_delivered_once() {
    let sink = Sink::throttling(10);
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("bounce-rules.toml");
    std::fs::write(
        &rules,
        "[[rule]]\nclass = \"throttled\"\ncode = \"421\"\nenhanced = \"4.7.28\"\nsuspend = \"4s\"\n",
    )
    .unwrap();
    let shaping = dir.path().join("shaping.toml");
    // Paced, so that mail is still queued when the 421 comes.
    std::fs::write(
        &shaping,
        "[domain.\"backoff.test\"]\nmax_connections = 1\nmax_message_rate = \"20/s\"\n",
    )
    .unwrap();
    let relay = Server::builder()
        .shards(2)
        .args([
            "--route".to_owned(),
            format!("backoff.test=smtp:127.0.0.1:{}", sink.port),
            "--relay-network".into(),
            "127.0.0.0/8".into(),
            "--retry-schedule".into(),
            "1s".into(),
            "--bounce-rules".into(),
            rules.to_str().unwrap().into(),
            "--shaping".into(),
            shaping.to_str().unwrap().into(),
        ])
        .start();
    let mut clients = [relay.connect(), relay.connect()];
    for c in &mut clients {
        c.hello("client.example");
    }
    const N: usize = 30;
    for i in 0..N {
        let body = format!("Subject: b{i:03}\r\n\r\nbody {i}\r\n");
        clients[i % 2].send_message(
            "s@localhost",
            &[&format!("u{i}@backoff.test")],
            body.as_bytes(),
        );
    }
    // While it lasts, the suspension is visible in the admin API.
    wait_until("the 421", Duration::from_secs(20), || {
        sink.seen.lock().unwrap().throttled_at.is_some()
    });
    let admin = relay.admin.expect("admin listener");
    let destination = format!("smtp:127.0.0.1:{}", sink.port);
    wait_until("the suspension listed", Duration::from_secs(2), || {
        let body = common::http_get(admin, "/api/v1/suspensions");
        body.contains(&destination) && body.contains("\"automatic\"")
    });
    wait_until("every message", Duration::from_secs(40), || {
        sink.count() >= N
    });
    std::thread::sleep(Duration::from_millis(500));
    let seen = sink.seen.lock().unwrap();
    assert_once(&seen, N);
    let throttled = seen.throttled_at.expect("the sink throttled");
    // Suspended for 4 s from a whole second: at least 3 s without a
    // connection; 2.5 s leaves room for a slow machine.
    let during: Vec<_> = seen
        .accepted
        .iter()
        .filter(|&&t| t > throttled && t < throttled + Duration::from_millis(2500))
        .collect();
    let after = seen.accepted.iter().filter(|&&t| t > throttled).min();
    eprintln!(
        "backoff: {} connections, first after the 421: {:?} later",
        seen.accepted.len(),
        after.map(|t| *t - throttled)
    );
    assert!(
        during.is_empty(),
        "connections during the suspension: {}",
        during.len()
    );
    let log = relay.stderr();
    assert!(
        log.lines().any(|l| l.contains("suspended")
            && l.contains("throttled")
            && l.contains("destination")),
        "{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("deferred") && l.contains("class") && l.contains("throttled")),
        "{log}"
    );
}

#[test]
fn limits_in_force_are_shown_by_the_admin_api_and_follow_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("shaping.toml");
    std::fs::write(
        &rules,
        "[default]\nmax_connections = 8\n\n\
         [domain.\"rate.test\"]\nmax_message_rate = \"10/s\"\nidle_timeout = \"2s\"\n\n\
         [provider.sinkprov]\nmx = [\"*.hosting.sinkprov.test\"]\nmax_connections = 3\n\
         max_message_rate = \"5/m\"\n\n\
         [source.a]\nbind = \"127.0.0.2\"\nehlo = \"a.example\"\n\
         [pool.bulk]\nsources = { a = 1 }\n\
         [sender.\"news.example\"]\npool = \"bulk\"\n",
    )
    .unwrap();
    // SIGHUP reloads the settings of a --config file (the shaping file
    // named there is read again with them).
    let config = dir.path().join("ringmta.toml");
    std::fs::write(
        &config,
        format!("shaping = {:?}\n", rules.to_str().unwrap()),
    )
    .unwrap();
    let relay = Server::builder()
        .args(["--config".to_owned(), config.to_str().unwrap().into()])
        .start();
    let admin = relay.admin.expect("admin listener");
    let get = |path: &str| -> serde_json::Value {
        serde_json::from_str(&common::http_get(admin, path)).unwrap()
    };
    // The whole rule set: the file's entries over the built-in providers.
    let all = get("/api/v1/shaping");
    assert_eq!(all["default"]["max_connections"], 8, "{all}");
    assert_eq!(all["domains"]["rate.test"]["max_message_rate"], "10/s");
    let providers = all["providers"].as_array().unwrap();
    assert_eq!(providers[0]["name"], "sinkprov");
    assert!(providers.iter().any(|p| p["name"] == "google"), "{all}");
    assert_eq!(all["sources"]["a"]["bind"], "127.0.0.2");
    assert_eq!(all["pools"]["bulk"]["a"], 1);

    // One domain: its entry over the default, its budget.
    let rate = get("/api/v1/shaping?domain=Rate.Test");
    assert_eq!(rate["budget"], "domain:rate.test", "{rate}");
    assert_eq!(rate["limits"]["max_message_rate"], "10/s");
    assert_eq!(rate["limits"]["max_connections"], 8);
    assert_eq!(rate["limits"]["idle_timeout"], "2s");
    assert_eq!(rate["limits"]["tls_policy"], "opportunistic");
    assert!(rate["limits"]["retry"].is_array(), "{rate}");
    // A domain whose MX hosts are a provider's shares the provider's budget.
    let hosted = get("/api/v1/shaping?domain=a.test&mx=mx1.hosting.sinkprov.test");
    assert_eq!(hosted["budget"], "provider:sinkprov", "{hosted}");
    assert_eq!(hosted["limits"]["max_connections"], 3);
    assert_eq!(hosted["limits"]["max_message_rate"], "5/m");
    // Anything else: the default, its own budget; the sender's pool.
    let other = get("/api/v1/shaping?domain=other.test&sender=x@news.example");
    assert_eq!(other["budget"], "mx:other.test:25", "{other}");
    assert_eq!(other["limits"]["max_message_rate"], serde_json::Value::Null);
    assert_eq!(other["pool"], "bulk");

    // SIGHUP: the new rules are the ones shown.
    std::fs::write(
        &rules,
        "[domain.\"rate.test\"]\nmax_message_rate = \"20/s\"\n",
    )
    .unwrap();
    relay.signal(libc::SIGHUP);
    wait_until("the reloaded rules", Duration::from_secs(10), || {
        get("/api/v1/shaping?domain=rate.test")["limits"]["max_message_rate"] == "20/s"
    });
}

#[test]
fn a_domain_entry_retries_on_its_own_schedule() {
    // The sink defers the first attempt; --retry-schedule would wait an
    // hour, the domain's entry a second.
    let sink = Sink::start();
    sink.seen.lock().unwrap().to_defer = 1;
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("shaping.toml");
    std::fs::write(
        &rules,
        "[domain.\"retry.test\"]\nretry = [\"1s\", \"1h\"]\n",
    )
    .unwrap();
    let relay = Server::builder()
        .args([
            "--route".to_owned(),
            format!("retry.test=smtp:127.0.0.1:{}", sink.port),
            "--relay-network".into(),
            "127.0.0.0/8".into(),
            "--retry-schedule".into(),
            "1h".into(),
            "--shaping".into(),
            rules.to_str().unwrap().into(),
        ])
        .start();
    let mut c = relay.connect();
    c.hello("client.example");
    c.send_message(
        "s@localhost",
        &["u@retry.test"],
        b"Subject: again\r\n\r\nbody\r\n",
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while sink.count() < 1 {
        assert!(Instant::now() < deadline, "not retried: {}", relay.stderr());
        std::thread::sleep(Duration::from_millis(50));
    }
    let seen = sink.seen.lock().unwrap();
    assert_eq!(seen.deferred_at.len(), 1);
    let waited = seen.messages[0].0 - seen.deferred_at[0];
    eprintln!("retried {waited:?} after the 451");
    drop(seen);
    let log = relay.stderr();
    assert!(
        log.lines()
            .any(|l| l.contains("deferred") && l.contains("retry_in=1")),
        "{log}"
    );
}
