//! Memory and time a hostile client can make ringmta spend (issue 11): the
//! real server, real sockets, the server's RSS read from `/proc`.
//!
//! * Bodies in flight live within a per-shard budget, half of which one
//!   client address may hold: 20 connections from one address pushing
//!   25 MiB each leave the RSS bounded, and a client on another address
//!   still gets its 250 meanwhile (with the default flags and shard count).
//! * A body that outgrows its room is read to its end and refused with
//!   452 4.3.1; the session goes on. DATA and BDAT with no room get 452
//!   before any content.
//! * The content of one message has an absolute time limit, however it
//!   trickles in.

mod common;

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{queued_id, Client, Server};

const ATTACKERS: usize = 20;
/// 25 MiB, in 1000-octet lines.
const ATTACK_LINES: usize = (25 << 20) / 1000;
const RSS_LIMIT_KIB: u64 = 256 << 10;
const ATTACKER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
const NORMAL: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

/// `lines` text lines of 1000 octets, CRLF included (the longest allowed).
fn text(lines: usize) -> Vec<u8> {
    let mut line = vec![b'x'; 998];
    line.extend_from_slice(b"\r\n");
    line.repeat(lines)
}

fn open_data(c: &mut Client, from: &str) -> u16 {
    c.expect(&format!("MAIL FROM:<{from}>"), 250);
    c.expect("RCPT TO:<u@localhost>", 250);
    c.cmd("DATA").code
}

/// Regression (issue 11): message bodies were held whole in memory and
/// only limited by --max-message-size, so 10 connections × 40 MiB took the
/// RSS to 421 MB. With the defaults (default shard count, budget and share
/// per address), 20 connections from one address each push 25 MiB of
/// unterminated DATA (500 MiB in flight) as fast as the server reads; the
/// server's peak RSS stays under 256 MiB, a client on another address gets
/// its 250 while they hold their bodies, and at their end the attackers'
/// bodies are either stored (those that fitted) or refused with 452 4.3.1,
/// each session still usable.
#[test]
fn bodies_from_one_address_stay_within_budget_and_others_are_served() {
    let server = Server::builder().default_shards().start();
    let addr = server.addr;
    let (_, hwm_start) = server.memory_kib();

    // Each attacker: DATA, 25 MiB without an end, then wait; on release,
    // end the content, report the reply, and check the session goes on.
    // (Channels, not a barrier: an attacker that fails must not hang the
    // test; a dropped sender releases everyone.)
    let (written_tx, written_rx) = mpsc::channel::<usize>();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let release_rx = Arc::new(Mutex::new(release_rx));
    let body = Arc::new(text(ATTACK_LINES));
    let attackers: Vec<_> = (0..ATTACKERS)
        .map(|i| {
            let written = written_tx.clone();
            let release = release_rx.clone();
            let body = body.clone();
            thread::spawn(move || {
                let mut c = Client::connect_from(addr, ATTACKER);
                // 20 senders at full speed on a shared machine: the
                // server answers each in turn, not within the usual 10 s.
                c.set_read_timeout(Duration::from_secs(60));
                c.stream()
                    .set_write_timeout(Some(Duration::from_secs(60)))
                    .unwrap();
                c.hello("attacker.test");
                let code = open_data(&mut c, &format!("a{i}@example.org"));
                if code == 354 {
                    // Write timeouts bound every write: a server that
                    // stopped reading fails the test here.
                    for chunk in body.chunks(256 << 10) {
                        c.send(chunk);
                    }
                }
                let _ = written.send(i);
                let _ = release.lock().unwrap().recv();
                let end = if code == 354 {
                    c.send(b".\r\n");
                    c.reply()
                } else {
                    c.expect("RSET", 250);
                    common::Reply {
                        code,
                        lines: vec![],
                    }
                };
                // In step and usable whatever the answer was.
                c.expect("MAIL FROM:<next@example.org>", 250);
                c.expect("QUIT", 221);
                (code, end)
            })
        })
        .collect();
    drop(written_tx);
    for n in 0..ATTACKERS {
        match written_rx.recv_timeout(Duration::from_secs(120)) {
            Ok(_) => {}
            Err(e) => panic!("only {n} attackers wrote their body ({e}); see their panics"),
        }
    }

    // Every attacker has pushed its 25 MiB and holds its connection open.
    let mut c = Client::connect_from(addr, NORMAL);
    c.hello("normal.test");
    let content = [&b"Subject: normal\r\n\r\n"[..], &text(100)].concat();
    let id = c.send_message("n@example.org", &["u@localhost"], &content);
    c.expect("QUIT", 221);
    let (rss, hwm) = server.memory_kib();

    for _ in 0..ATTACKERS {
        release_tx.send(()).unwrap();
    }
    let results: Vec<_> = attackers
        .into_iter()
        .map(|t| t.join().expect("attacker thread"))
        .collect();
    eprintln!(
        "ringmta VmHWM at start {hwm_start} KiB; with {ATTACKERS} bodies in flight: \
         VmRSS {rss} KiB, VmHWM {hwm} KiB"
    );
    assert!(
        hwm < RSS_LIMIT_KIB,
        "peak RSS {hwm} KiB with {ATTACKERS} × 25 MiB in flight"
    );
    let mut stored = 0;
    for (code, end) in &results {
        match (code, end.code) {
            (354, 250) => stored += 1,
            (354, 452) | (452, _) => assert!(
                end.lines.is_empty() || end.last().starts_with("452 4.3.1 "),
                "{end}"
            ),
            _ => panic!("attacker got {code} then {end}"),
        }
    }
    assert!(
        stored < ATTACKERS / 2,
        "{stored} of {ATTACKERS} bodies of 25 MiB were kept"
    );
    assert!(server.queued_ids().contains(&id));
}

/// Regression (issue 11): every content byte pushed the DATA deadline
/// back, so one byte every few seconds kept a transaction (and its body)
/// alive forever. Under `--max-data-time 2s` a client trickling a byte
/// every 200 ms is cut off with 421 4.4.2 after 2 s, and nothing is stored.
#[test]
fn trickled_data_is_cut_off_by_max_data_time() {
    let server = Server::start(&["--max-data-time", "2s"]);
    let mut c = server.connect();
    c.hello("slow.test");
    assert_eq!(open_data(&mut c, "slow@example.org"), 354);
    let started = Instant::now();
    let writer = c.stream().try_clone().expect("clone socket");
    let trickle = thread::spawn(move || {
        let mut w = writer;
        let stop = Instant::now() + Duration::from_secs(8);
        while Instant::now() < stop {
            if w.write_all(b"x").is_err() {
                return;
            }
            thread::sleep(Duration::from_millis(200));
        }
    });
    let r = c.reply();
    let took = started.elapsed();
    assert!(
        r.is("421 4.4.2 Error: time limit for the message content exceeded, closing connection"),
        "{r}"
    );
    assert!(
        took >= Duration::from_millis(1900),
        "cut off after {took:?}"
    );
    c.expect_closed();
    trickle.join().unwrap();
    assert!(server.queued_ids().is_empty());
}

/// One shard, 1 MiB of budget: 512 KiB per client address (and
/// --max-message-size lowered to that). Another connection from the same
/// address holds part of it, so a body that outgrows the rest is read to
/// its `<CRLF>.<CRLF>` and refused with 452 4.3.1, and the next MAIL works;
/// with the share taken, DATA and BDAT get 452 before any content.
#[test]
fn over_budget_body_gets_452_after_its_end_and_session_stays_usable() {
    let server = Server::start(&["--max-inflight-bytes", "1M"]);
    assert!(server.wait_for_log("--max-message-size lowered", Duration::from_secs(5)));
    let settle = || thread::sleep(Duration::from_millis(500));

    // A holds 200 KB (a buffer of ~224 KiB) of its share.
    let mut a = Client::connect_from(server.addr, ATTACKER);
    a.hello("a.test");
    assert_eq!(open_data(&mut a, "a@example.org"), 354);
    a.send(&text(200));
    settle();

    // B, same address: under 300 KB left, its 300 KB do not fit.
    let mut b = Client::connect_from(server.addr, ATTACKER);
    b.hello("b.test");
    assert_eq!(open_data(&mut b, "b@example.org"), 354);
    // Smuggling bait inside: only the real <CRLF>.<CRLF> ends it.
    let mut body = text(150);
    body.extend_from_slice(b"\n.\nMAIL FROM:<evil@example.org>\r\n\r.\r\n");
    body.extend_from_slice(&text(150));
    b.send(&body);
    let r = b.cmd(".");
    assert!(
        r.is("452 4.3.1 Error: insufficient system resources, try again later"),
        "{r}"
    );
    // In step: the session takes the next transaction.
    let id_b = b.send_message("b@example.org", &["u@localhost"], b"small\r\n");

    // A ends its message: it was kept whole.
    a.send(b".\r\n");
    let id_a = queued_id(&a.reply());
    assert_eq!(server.message(&id_a).content().len(), 200_000);

    // A takes 480 KB, so its buffer is the whole share of the address.
    assert_eq!(open_data(&mut a, "a@example.org"), 354);
    a.send(&text(480));
    settle();
    let r = b.cmd("MAIL FROM:<b@example.org>");
    assert_eq!(r.code, 250);
    b.expect("RCPT TO:<u@localhost>", 250);
    let r = b.cmd("DATA");
    assert!(r.last().starts_with("452 4.3.1 "), "DATA without room: {r}");
    // A BDAT chunk is counted when announced: read, discarded, refused.
    b.send(&[&b"BDAT 1000 LAST\r\n"[..], &[b'z'; 1000]].concat());
    let r = b.reply();
    assert!(r.last().starts_with("452 4.3.1 "), "BDAT without room: {r}");
    // A client on another address still has its own share.
    let mut c = Client::connect_from(server.addr, NORMAL);
    c.hello("c.test");
    let id_c = c.send_message("c@example.org", &["u@localhost"], &text(100));

    a.send(b".\r\n");
    let id_a2 = queued_id(&a.reply());
    // The room is back.
    let id_b2 = b.send_message("b@example.org", &["u@localhost"], &text(300));
    let ids = server.queued_ids();
    for id in [id_a, id_b, id_a2, id_b2, id_c] {
        assert!(ids.contains(&id), "{id} not queued");
    }
    // The three 452s (content, DATA, BDAT) are counted as such.
    let metrics = common::http_get(server.admin.expect("admin listener"), "/metrics");
    let budget = ["reason=\"memory_budget\""];
    assert_eq!(
        common::metric(&metrics, "ringmta_refusals_total", &budget),
        3.0
    );
}
