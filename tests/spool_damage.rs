//! Damage in the middle of a segment costs the damaged record, not the
//! acknowledged records after it (issue 11).

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::Server;

fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn segment_files(spool: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(spool.join("seg"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    v.sort();
    v
}

fn subjects(dir: &Path) -> Vec<String> {
    let Ok(d) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<String> = d
        .map(|e| {
            let text = std::fs::read_to_string(e.unwrap().path()).unwrap();
            text.lines()
                .find_map(|l| l.strip_prefix("Subject: ").map(str::to_owned))
                .unwrap()
        })
        .collect();
    out.sort();
    out
}

/// Regression (issue 11): recovery truncated a segment at its first bad
/// record, so damage in the middle of the first message (a bad sector, a
/// flipped bit: not a crash, which only tears the tail) lost every
/// acknowledged message after it. Now the damaged record is skipped and
/// logged with its offset and length, and the later messages are still
/// queued and get delivered.
#[test]
fn damage_in_the_first_record_keeps_the_later_messages() {
    // The framing of the first record (its header length), or a byte of
    // its body.
    for (what, at) in [("framing", Some(9)), ("body", None)] {
        let work = tempfile::tempdir().unwrap();
        let spool = work.path().join("spool");
        let maildir = work.path().join("maildir");
        let mut ids = Vec::new();
        {
            let server = Server::builder().spool_dir(&spool).start();
            let mut c = server.connect();
            c.hello("client.test");
            for n in 0..5 {
                let content = format!("Subject: damage {n}\r\n\r\nbody of message {n}\r\n");
                ids.push(c.send_message("s@example.org", &["rcpt@localhost"], content.as_bytes()));
            }
            c.cmd("QUIT");
        }
        let segs = segment_files(&spool);
        assert_eq!(segs.len(), 1, "{segs:?}");
        let mut bytes = std::fs::read(&segs[0]).unwrap();
        let at = at.unwrap_or_else(|| {
            let needle = b"body of message 0";
            bytes
                .windows(needle.len())
                .position(|w| w == needle)
                .unwrap()
                + 3
        });
        bytes[at] ^= 0x20;
        std::fs::write(&segs[0], &bytes).unwrap();

        let server = Server::builder()
            .spool_dir(&spool)
            .args(["--relay-host", "127.0.0.1:9", "--maildir"])
            .arg(maildir.to_str().unwrap())
            .start();
        assert!(
            server.wait_for_log("damaged records in the middle", Duration::from_secs(5)),
            "{what}: {}",
            server.stderr()
        );
        let log = server.stderr();
        assert!(log.contains("offset=0"), "{what}: {log}");
        let new = maildir.join("localhost/rcpt/new");
        wait_until("delivery", Duration::from_secs(20), || {
            subjects(&new).len() == 4
        });
        assert_eq!(
            subjects(&new),
            ["damage 1", "damage 2", "damage 3", "damage 4"],
            "{what}"
        );
        wait_until("empty queue", Duration::from_secs(10), || {
            server.queued().is_empty()
        });
    }
}
