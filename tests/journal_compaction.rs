//! The journal follows the queue while ringmta runs, and kill -9 at any
//! moment (during a compaction too) loses no outcome (issue 11).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::Server;
use ringmta::spool::queue::RcptState;
use ringmta::spool::Spool;

/// Journal bytes above which the test calls the journal unbounded: two
/// shards, each compacting at four times its snapshot (about 14 KB of
/// deferrals each here), plus what arrives meanwhile.
const BOUND: u64 = 160_000;
const MESSAGES: usize = 8;
const REMOTE: usize = 50;

fn journal_bytes(spool: &Path) -> u64 {
    std::fs::read_dir(spool.join("seg"))
        .map(|d| {
            d.filter_map(|e| {
                let e = e.ok()?;
                let jrn = e.path().extension().is_some_and(|x| x == "jrn");
                jrn.then(|| e.metadata().map_or(0, |m| m.len()))
            })
            .sum()
        })
        .unwrap_or(0)
}

fn start(spool: &Path, maildir: &Path) -> Server {
    Server::builder()
        .shards(2)
        .spool_dir(spool)
        .args(["--relay-host", "127.0.0.1:9", "--retry-schedule", "1s"])
        .args(["--relay-network", "127.0.0.0/8", "--maildir"])
        .arg(maildir.to_str().unwrap())
        .start()
}

/// Regression (issue 11): journals grew with every outcome until a
/// restart. Recipients that nothing accepts are deferred again every
/// second (an outcome journaled each time), one per message is delivered
/// into a Maildir at once; the server is killed with SIGKILL every few
/// seconds and restarted. The journal files stay bounded while far more
/// than that bound is journaled, and after the last kill every message is
/// still queued with its delivered recipient delivered and no other
/// recipient finished.
#[test]
fn journal_stays_bounded_and_survives_kill_9() {
    let work = tempfile::tempdir().unwrap();
    let spool = work.path().join("spool");
    let maildir = work.path().join("maildir");
    let mut server = start(&spool, &maildir);
    // Half the messages on each shard (the shard is in the queue id), so
    // that the bound does not depend on how connections were spread: a
    // connection that lands on a full shard sends a local-only message,
    // delivered at once.
    let mut ids = Vec::new();
    let mut per_shard = [0; 2];
    let mut attempts = 0;
    while ids.len() < MESSAGES {
        attempts += 1;
        assert!(attempts < 200, "connections all land on one shard");
        let n = ids.len();
        let mut c = server.connect();
        c.hello("client.test");
        let shard = {
            let probe = c.send_message(
                "s@example.org",
                &["extra@localhost"],
                b"Subject: x\r\n\r\nx\r\n",
            );
            usize::from_str_radix(&probe[14..16], 16).unwrap()
        };
        if per_shard[shard] < MESSAGES / 2 {
            let mut rcpts: Vec<String> = (0..REMOTE).map(|r| format!("r{r}@example.net")).collect();
            rcpts.push(format!("local{n}@localhost"));
            let rcpts: Vec<&str> = rcpts.iter().map(String::as_str).collect();
            let content = format!("Subject: journal {n}\r\n\r\nbody {n}\r\n");
            ids.push(c.send_message("s@example.org", &rcpts, content.as_bytes()));
            per_shard[shard] += 1;
        }
        c.cmd("QUIT");
    }
    // Running: bounded while three times the bound is journaled.
    let mut most = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    let deferrals = loop {
        most = most.max(journal_bytes(&spool));
        let deferrals = server.stderr().matches(" deferred").count() as u64;
        // Each deferral is a journal record of about 70 bytes.
        if deferrals * 70 >= 3 * BOUND {
            break deferrals;
        }
        assert!(
            Instant::now() < deadline,
            "only {deferrals} deferrals journaled: {}",
            server.stderr()
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let compactions = server.stderr().matches("journal compacted").count();
    eprintln!("{deferrals} deferrals, {compactions} compactions, journal at most {most} bytes");
    assert!(
        most <= BOUND,
        "journal reached {most} bytes with {deferrals} deferrals journaled"
    );
    assert!(compactions > 0);

    // kill -9 at moments that fall before, during and after compactions.
    let mut compactions = 0;
    for kill in 0..5 {
        drop(server); // SIGKILL
        server = start(&spool, &maildir);
        let until = Instant::now() + Duration::from_millis(2500 + 700 * kill);
        while Instant::now() < until {
            most = most.max(journal_bytes(&spool));
            std::thread::sleep(Duration::from_millis(10));
        }
        compactions += server.stderr().matches("journal compacted").count();
    }
    drop(server);
    eprintln!("{compactions} compactions between kills, journal at most {most} bytes");
    assert!(compactions > 0);
    assert!(most <= BOUND, "journal reached {most} bytes");

    let spool = Spool::open(&spool).unwrap();
    let q = spool.take_shard_queue(0, 1);
    assert_eq!(q.len(), MESSAGES);
    for id in &ids {
        let e = q.get(id).unwrap_or_else(|| panic!("{id} lost"));
        assert_eq!(e.rcpts[REMOTE].1, RcptState::Delivered, "{id}");
        for (addr, state) in &e.rcpts[..REMOTE] {
            assert!(
                matches!(state, RcptState::Deferred { .. } | RcptState::Pending),
                "{id} {addr}: {state:?}"
            );
        }
    }
    for n in 0..MESSAGES {
        let new = maildir.join(format!("localhost/local{n}/new"));
        assert_eq!(std::fs::read_dir(new).unwrap().count(), 1);
    }
}
