//! `--log-format json`: every line ringmta writes is one JSON object, and
//! the event lines carry the README's field names: a message's `accepted`
//! and `delivered` lines share its queue id, whether it went to a next hop
//! (a second ringmta) or into a Maildir; `connect`/`disconnect` frame the
//! session and `refused` names the command and the reply.

mod common;

use std::time::{Duration, Instant};

use common::Server;
use serde_json::Value;

/// The parsed log; panics on the first line that is not a JSON object.
fn json_lines(server: &Server) -> Vec<Value> {
    server
        .stderr()
        .lines()
        .enumerate()
        .map(|(n, line)| match serde_json::from_str::<Value>(line) {
            Ok(v) if v.is_object() => v,
            _ => panic!("log line {} is not a JSON object: {line:?}", n + 1),
        })
        .collect()
}

fn events<'a>(lines: &'a [Value], name: &str) -> Vec<&'a Value> {
    lines.iter().filter(|v| v["event"] == name).collect()
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("no string {key:?} in {v}"))
}

/// `a/b/c/d`, each seconds with three decimals.
fn is_delays(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() == 4
        && parts.iter().all(|p| {
            p.split_once('.').is_some_and(|(s, ms)| {
                !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && ms.len() == 3
            })
        })
}

#[test]
fn json_event_log_follows_each_message() {
    let downstream = Server::start(&["--relay-network", "127.0.0.0/8"]);
    let relay = Server::start(&[
        "--log-format",
        "json",
        "--relay-host",
        &format!("127.0.0.1:{}", downstream.port),
        "--relay-network",
        "127.0.0.0/8",
    ]);
    let mut c = relay.connect();
    c.hello("client.example");
    let relayed = c.send_message(
        "s@example.org",
        &["r1@remote.example", "r2@remote.example"],
        b"Subject: out\r\n\r\nbody\r\n",
    );
    let local = c.send_message(
        "s@example.org",
        &["user@localhost"],
        b"Subject: in\r\n\r\nbody\r\n",
    );
    c.cmd("MAIL FROM:<s@example.org>");
    assert_eq!(c.cmd("RCPT TO:<\"../x\"@localhost>").code, 550);
    c.cmd("RSET");
    c.expect("QUIT", 221);
    drop(c);

    // Both delivered (two recipients relayed, one in the Maildir) and the
    // session's end written.
    let deadline = Instant::now() + Duration::from_secs(30);
    let lines = loop {
        let lines = json_lines(&relay);
        let done =
            events(&lines, "delivered").len() == 3 && !events(&lines, "disconnect").is_empty();
        if done {
            break lines;
        }
        assert!(
            Instant::now() < deadline,
            "not all delivered: {}",
            relay.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let id_of = |reply: &str| reply.rsplit(' ').next().unwrap().to_owned();
    let (relayed, local) = (id_of(&relayed), id_of(&local));

    let accepted = events(&lines, "accepted");
    assert_eq!(accepted.len(), 2, "{accepted:?}");
    for (a, id, nrcpt) in [(accepted[0], &relayed, 2), (accepted[1], &local, 1)] {
        assert_eq!(str_of(a, "queue_id"), id);
        assert_eq!(str_of(a, "from"), "s@example.org");
        assert_eq!(a["nrcpt"], nrcpt);
        assert_eq!(str_of(a, "proto"), "ESMTP");
        assert_eq!(str_of(a, "helo"), "client.example");
        assert_eq!(str_of(a, "tls"), "none");
        // A --relay-network client: no inbound checks.
        assert_eq!(str_of(a, "auth"), "-");
        assert!(str_of(a, "peer").starts_with("127.0.0.1:"));
        assert!(a["size"].as_u64().unwrap() > 0);
    }

    let delivered = events(&lines, "delivered");
    let to_next_hop = format!("127.0.0.1[127.0.0.1]:{}", downstream.port);
    for (to, id, relay_name) in [
        ("r1@remote.example", &relayed, to_next_hop.as_str()),
        ("r2@remote.example", &relayed, to_next_hop.as_str()),
        ("user@localhost", &local, "maildir"),
    ] {
        let d = delivered
            .iter()
            .find(|d| d["to"] == to)
            .unwrap_or_else(|| panic!("no delivered line for {to}: {delivered:?}"));
        assert_eq!(str_of(d, "queue_id"), id, "{d}");
        assert_eq!(str_of(d, "relay"), relay_name, "{d}");
        assert!(is_delays(str_of(d, "delays")), "{d}");
        assert!(str_of(d, "reply").starts_with("250"), "{d}");
    }

    let refused = events(&lines, "refused");
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert!(
        str_of(refused[0], "command").starts_with("RCPT"),
        "{}",
        refused[0]
    );
    assert_eq!(refused[0]["reply"], 550);

    let connects = events(&lines, "connect");
    let disconnects = events(&lines, "disconnect");
    assert_eq!((connects.len(), disconnects.len()), (1, 1));
    assert_eq!(str_of(connects[0], "listener"), "smtp");
    assert_eq!(connects[0]["peer"], disconnects[0]["peer"]);
    assert_eq!(disconnects[0]["messages"], 2);
}

/// The text format carries the same fields, as key=value pairs.
#[test]
fn text_event_log_has_the_same_fields() {
    let server = Server::start(&[]);
    let mut c = server.connect();
    c.hello("client.example");
    let reply = c.send_message(
        "s@example.org",
        &["user@localhost"],
        b"Subject: x\r\n\r\nx\r\n",
    );
    let id = reply.rsplit(' ').next().unwrap().to_owned();
    c.expect("QUIT", 221);
    assert!(server.wait_for_log("event=\"disconnect\"", Duration::from_secs(10)));
    let log = server.stderr();
    let accepted = log
        .lines()
        .find(|l| l.contains("event=\"accepted\""))
        .unwrap_or_else(|| panic!("no accepted line: {log}"));
    assert!(
        accepted.contains(&format!("queue_id=\"{id}\"")),
        "{accepted}"
    );
    assert!(accepted.contains("nrcpt=1"), "{accepted}");
}
