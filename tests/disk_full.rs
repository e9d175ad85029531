//! A full spool filesystem: new messages get 452 4.3.1, nothing acknowledged
//! is lost, the server stays up, and service resumes when space returns.
//! Uses a small tmpfs the test mounts itself (needs root, as CI has).
//! The refusals are counted in `ringmta_refusals_total{reason="disk_full"}`.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn mount_tmpfs(dir: &Path, size: &str) -> Option<Mount> {
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(dir)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    ok.then(|| Mount(dir.to_owned()))
}

struct Client {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl Client {
    fn connect(port: u16) -> Client {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut c = Client {
            w: s.try_clone().unwrap(),
            r: BufReader::new(s),
        };
        assert!(c.reply().starts_with("220 "));
        c.send(b"EHLO full.test\r\n");
        assert!(c.reply().starts_with("250 "));
        c
    }

    fn send(&mut self, b: &[u8]) {
        self.w.write_all(b).unwrap();
    }

    fn reply(&mut self) -> String {
        loop {
            let mut l = String::new();
            assert!(self.r.read_line(&mut l).unwrap() > 0, "connection closed");
            if l.as_bytes().get(3) != Some(&b'-') {
                return l;
            }
        }
    }

    /// Sends one message of about 64 KiB; returns the end-of-data reply.
    fn message(&mut self, n: usize) -> String {
        self.send(
            format!("MAIL FROM:<f@full.test>\r\nRCPT TO:<n{n}@localhost>\r\nDATA\r\n").as_bytes(),
        );
        for _ in 0..3 {
            let r = self.reply();
            assert!(r.starts_with('2') || r.starts_with('3'), "{r}");
        }
        let line = format!("{n:08} {}\r\n", "z".repeat(70));
        self.send(line.repeat(800).as_bytes());
        self.send(b".\r\n");
        self.reply()
    }
}

#[test]
fn full_disk_answers_452_and_recovers() {
    let root = tempfile::tempdir().unwrap();
    let Some(_mount) = mount_tmpfs(root.path(), "2m") else {
        assert!(
            std::env::var("CI").is_err(),
            "CI must be able to mount a tmpfs (run as root)"
        );
        eprintln!("SKIPPED: cannot mount tmpfs (not root)");
        return;
    };
    let mut child = Command::new(env!("CARGO_BIN_EXE_ringmta"))
        .args([
            "--smtp",
            "127.0.0.1:0",
            "--shards",
            "1",
            "--no-delivery",
            "--submission",
            "none",
            "--smtps",
            "none",
            "--admin",
            "127.0.0.1:0",
            "--log",
            "error",
            "--spool-dir",
        ])
        .arg(root.path().join("spool"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let (mut line, mut admin) = (String::new(), String::new());
    out.read_line(&mut line).unwrap();
    out.read_line(&mut admin).unwrap();
    let _server = Server(child);
    let port: u16 = line.trim().rsplit(':').next().unwrap().parse().unwrap();
    let admin: std::net::SocketAddr = admin
        .trim()
        .strip_prefix("ringmta listening admin ")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no admin line: {admin:?}"));

    let mut c = Client::connect(port);
    let mut acked = Vec::new();
    let mut refused = 0;
    for n in 0..60 {
        let r = c.message(n);
        if r.starts_with("250 ") {
            acked.push(n);
        } else {
            assert!(
                r.starts_with("452 4.3.1"),
                "unexpected reply on a full disk: {r}"
            );
            refused += 1;
        }
    }
    assert!(
        !acked.is_empty() && refused > 0,
        "acked {acked:?}, refused {refused}"
    );
    // The space the segment fills with zeros ahead of its batches is not
    // a reason to refuse what still fits: about 31 messages do (17 when a
    // batch failed for want of room for its 1 MiB of zeros).
    assert!(
        acked.len() >= 26,
        "only {} of 60 messages of 64 KiB accepted on 2 MiB",
        acked.len()
    );
    // The session is still in sync, and the server still up.
    c.send(b"NOOP\r\n");
    assert!(c.reply().starts_with("250 "));

    // Space returns: new mail is accepted again.
    let grown = Command::new("mount")
        .args(["-o", "remount,size=16m"])
        .arg(root.path())
        .status()
        .unwrap();
    assert!(grown.success());
    let r = c.message(1000);
    assert!(r.starts_with("250 "), "after space returned: {r}");
    acked.push(1000);
    let text = common::http_get(admin, "/metrics");
    let count = |name, labels: &[&str]| common::metric(&text, name, labels) as usize;
    assert_eq!(
        count("ringmta_refusals_total", &["reason=\"disk_full\""]),
        refused
    );
    assert_eq!(count("ringmta_messages_accepted_total", &[]), acked.len());
    assert_eq!(
        count(
            "ringmta_smtp_replies_total",
            &["code=\"452\"", "enhanced=\"4.3.1\""]
        ),
        refused
    );

    let queued = ringmta::spool::read_queue(&root.path().join("spool")).unwrap();
    let mut tokens: Vec<usize> = queued
        .iter()
        .map(|q| {
            let env = q.decoded().unwrap();
            env.rcpts[0][1..env.rcpts[0].find('@').unwrap()]
                .parse()
                .unwrap()
        })
        .collect();
    tokens.sort();
    assert_eq!(
        tokens, acked,
        "queued messages differ from acknowledged ones"
    );
}
