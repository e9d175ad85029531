//! The README's first command, as a new user runs it: the binary with no
//! flags at all, in an empty working directory, on the embedded defaults
//! (relative `./var/spool` and `./var/maildir`, fixed ports 2525/2587/2465,
//! and the admin listener on 9525).
//!
//! Regression: a relative `--spool-dir` (the default) made every spool write
//! fail with EBADF, so every message got `451 4.3.0` while every other test,
//! all with absolute paths, passed.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{peer_program, run_peer};

/// Kills the server however the test ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn no_flags_in_an_empty_directory_accepts_and_delivers() {
    let Some(swaks) = peer_program("swaks", "swaks") else {
        return;
    };
    let cwd = tempfile::tempdir().expect("temp dir");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ringmta"));
    cmd.current_dir(cwd.path());
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("RINGMTA_") {
            cmd.env_remove(k);
        }
    }
    let stderr = std::fs::File::create(cwd.path().join("stderr.log")).expect("stderr file");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("spawn ringmta");
    let stdout = child.stdout.take().expect("piped stdout");
    let server = Running(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let log = || std::fs::read_to_string(cwd.path().join("stderr.log")).unwrap_or_default();
    let line = rx
        .recv_timeout(common::START_TIMEOUT)
        .unwrap_or_else(|_| panic!("no listening line (is port 2525 taken?)\n{}", log()));
    assert_eq!(
        line,
        "ringmta listening smtp 127.0.0.1:2525",
        "the embedded default listener\n{}",
        log()
    );

    let run = run_peer(
        &swaks,
        &[
            "--server",
            "127.0.0.1:2525",
            "--from",
            "someone@localhost",
            "--to",
            "user@localhost",
            "--body",
            "first run",
        ],
        Duration::from_secs(30),
    );
    assert!(
        run.stdout.contains("<-  250 2.0.0"),
        "the message was not accepted:\n{}\n--- server log ---\n{}",
        run.stdout,
        log()
    );

    // Delivered into the default local domain's Maildir (or, at worst,
    // still queued in the default spool).
    let new = cwd.path().join("var/maildir/localhost/user/new");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let delivered = count(&new);
        if delivered == 1 {
            let name = std::fs::read_dir(&new).unwrap().next().unwrap().unwrap();
            let content = std::fs::read_to_string(name.path()).unwrap();
            assert!(content.contains("first run"), "{content}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not delivered into {} within 20 s ({} queued)\n{}",
            new.display(),
            common::read_spool(&cwd.path().join("var/spool")).len(),
            log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(server);
}

fn count(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |d| d.count())
}
