//! The spool's disk use follows the queue while ringmta runs: delivered
//! mail does not stay on disk until the next restart (issue 11, defect 4).

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::Server;

/// `--max-segment-size` is at least 1 MiB.
const SEGMENT: u64 = 1 << 20;

fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The files under `spool/seg/` with this extension, and their total size.
fn files(spool: &Path, ext: &str) -> (usize, u64) {
    let mut n = 0;
    let mut bytes = 0;
    for e in std::fs::read_dir(spool.join("seg")).unwrap() {
        let e = e.unwrap();
        if e.path().extension().is_some_and(|x| x == ext) {
            n += 1;
            // A file deleted between the listing and the stat counts as gone.
            bytes += e.metadata().map_or(0, |m| m.len());
        }
    }
    (n, bytes)
}

fn delivered(maildir: &Path) -> usize {
    std::fs::read_dir(maildir.join("localhost/rcpt/new")).map_or(0, |d| d.count())
}

/// A message of about `size` bytes, in 78-octet lines.
fn content(n: usize, size: usize) -> Vec<u8> {
    let mut c = format!("Subject: leak test {n}\r\n\r\n").into_bytes();
    let line = format!("{:<76}\r\n", format!("message {n} ........"));
    while c.len() < size {
        c.extend_from_slice(line.as_bytes());
    }
    c
}

/// Regression (issue 11, defect 4): a segment whose last message finished
/// while it was still the current segment was never deleted (the removal
/// was skipped for the current segment and nothing tried again after the
/// rotation), so on a lightly loaded gateway every segment of delivered
/// mail stayed on disk until a restart. Messages go one at a time, each
/// delivered before the next, through many rotations.
#[test]
fn finished_segments_are_deleted_while_running() {
    let work = tempfile::tempdir().unwrap();
    let maildir: PathBuf = work.path().join("maildir");
    let server = Server::builder()
        .args(["--max-segment-size", "1M", "--relay-host", "127.0.0.1:9"])
        .arg("--maildir")
        .arg(maildir.to_str().unwrap())
        .start();
    let spool = server.spool_dir().to_owned();
    let size = 300 << 10;
    let messages = 24; // about 7 MiB: 7 segments' worth
    let mut most = (0, 0);
    let mut c = server.connect();
    c.hello("client.test");
    for n in 0..messages {
        c.send_message("sender@example.org", &["rcpt@localhost"], &content(n, size));
        wait_until("delivery", Duration::from_secs(20), || {
            delivered(&maildir) == n + 1 && server.queued().is_empty()
        });
        // The delivery is journaled before the segment goes: give the
        // removal a moment, but not forever.
        let settled = Instant::now() + Duration::from_secs(5);
        let (segs, bytes) = loop {
            let (segs, bytes) = files(&spool, "seg");
            if (segs <= 1 && bytes <= SEGMENT + size as u64 + 4096) || Instant::now() > settled {
                break (segs, bytes);
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        most = (most.0.max(segs), most.1.max(bytes));
        assert!(
            segs <= 1 && bytes <= SEGMENT + size as u64 + 4096,
            "after message {n} was delivered: {segs} segment files, {bytes} bytes \
             (delivered mail left on disk)"
        );
    }
    c.cmd("QUIT");
    eprintln!("at most {} segment files, {} bytes", most.0, most.1);
    // The queue CLI agrees, with the flag after the action (defect 8).
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ringmta"))
        .args(["queue", "count", "--spool-dir"])
        .arg(&spool)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "0 messages, 0 bytes\n"
    );
}
