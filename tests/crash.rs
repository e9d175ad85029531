//! kill -9 while mail is flowing (and being delivered into Maildir): every
//! message that got a 250 is, once the queue has drained after the last
//! restart, delivered exactly once, byte for byte. Messages without a 250
//! may or may not be there, but never twice.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(spool: &Path) -> (Server, u16) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ringmta"))
        .args([
            "--smtp",
            "127.0.0.1:0",
            "--shards",
            "2",
            "--hostname",
            "mx.test",
        ])
        .args(["--max-conns-per-ip", "0", "--log", "warn"])
        .args(["--submission", "none", "--smtps", "none", "--admin", "none"])
        .args(["--relay-host", "127.0.0.1:9", "--retry-schedule", "1s"])
        .arg("--maildir")
        .arg(spool.join("maildir"))
        .arg("--spool-dir")
        .arg(spool)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start ringmta");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port = line
        .trim()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no listening line: {line:?}"));
    (Server(child), port)
}

fn body_for(token: u64) -> Vec<u8> {
    let mut b = format!("Subject: crash test {token}\r\nMessage-ID: <{token}@crash.test>\r\n\r\n")
        .into_bytes();
    for i in 0..(token % 40) {
        b.extend_from_slice(
            format!("line {i} of message {token} ......................\r\n").as_bytes(),
        );
    }
    b
}

/// One client: sends messages until `stop`, recording tokens that got 250.
fn client(
    port: Arc<AtomicU16>,
    next: Arc<AtomicU64>,
    acked: Arc<Mutex<Vec<u64>>>,
    stop: Arc<AtomicBool>,
) {
    while !stop.load(Ordering::SeqCst) {
        let Ok(s) = TcpStream::connect(("127.0.0.1", port.load(Ordering::SeqCst))) else {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        };
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut w = s.try_clone().unwrap();
        let mut r = BufReader::new(s);
        let reply = |r: &mut BufReader<TcpStream>| -> Option<String> {
            loop {
                let mut l = String::new();
                if r.read_line(&mut l).ok()? == 0 {
                    return None;
                }
                if l.as_bytes().get(3) != Some(&b'-') {
                    return Some(l);
                }
            }
        };
        if reply(&mut r).is_none()
            || w.write_all(b"EHLO crash.test\r\n").is_err()
            || reply(&mut r).is_none()
        {
            continue;
        }
        while !stop.load(Ordering::SeqCst) {
            let token = next.fetch_add(1, Ordering::SeqCst);
            let mut msg =
                format!("MAIL FROM:<c@crash.test>\r\nRCPT TO:<t{token}@localhost>\r\nDATA\r\n")
                    .into_bytes();
            if w.write_all(&msg).is_err() {
                break;
            }
            let ok = (0..3)
                .all(|_| reply(&mut r).is_some_and(|l| l.starts_with('2') || l.starts_with('3')));
            if !ok {
                break;
            }
            msg = body_for(token);
            msg.extend_from_slice(b".\r\n");
            if w.write_all(&msg).is_err() {
                break;
            }
            match reply(&mut r) {
                Some(l) if l.starts_with("250 ") => acked.lock().unwrap().push(token),
                _ => break,
            }
        }
    }
}

#[test]
fn kill_9_loses_no_acknowledged_message() {
    let spool = tempfile::tempdir().unwrap();
    let (mut server, p) = start(spool.path());
    let port = Arc::new(AtomicU16::new(p));
    let next = Arc::new(AtomicU64::new(1));
    let acked = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..6)
        .map(|_| {
            let (port, next, acked, stop) =
                (port.clone(), next.clone(), acked.clone(), stop.clone());
            std::thread::spawn(move || client(port, next, acked, stop))
        })
        .collect();
    let t0 = Instant::now();
    for round in 0..4u64 {
        // Let mail flow for a varying while, then kill -9 mid-stream.
        std::thread::sleep(Duration::from_millis(300 + round * 170));
        server.0.kill().unwrap(); // SIGKILL
        server.0.wait().unwrap();
        let before = acked.lock().unwrap().len();
        let (s, p) = start(spool.path());
        server = s;
        port.store(p, Ordering::SeqCst);
        assert!(
            before > 0 || round > 0,
            "no mail flowed before the first kill"
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.join().unwrap();
    }
    drop(server);
    assert!(t0.elapsed() < Duration::from_secs(60));

    let acked: HashSet<u64> = acked.lock().unwrap().iter().copied().collect();
    // The last instance, left running, drains the queue into Maildir.
    let (server, _) = start(spool.path());
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ringmta::spool::read_queue(spool.path()).unwrap().is_empty() {
        assert!(Instant::now() < deadline, "queue did not drain");
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(server);

    let mut seen: HashMap<u64, usize> = HashMap::new();
    let boxes = spool.path().join("maildir").join("localhost");
    for mailbox in std::fs::read_dir(&boxes).unwrap() {
        let mailbox = mailbox.unwrap().path();
        let name = mailbox.file_name().unwrap().to_string_lossy().into_owned();
        let token: u64 = name[1..].parse().expect("test mailbox t<N>");
        for file in std::fs::read_dir(mailbox.join("new")).unwrap() {
            let content = std::fs::read(file.unwrap().path()).unwrap();
            *seen.entry(token).or_default() += 1;
            // Byte for byte: delivery and trace headers, then what was sent.
            let head = format!(
                "Return-Path: <c@crash.test>\r\nDelivered-To: t{token}@localhost\r\nReceived: from crash.test"
            );
            assert!(content.starts_with(head.as_bytes()), "message {token}");
            assert!(
                content.ends_with(&body_for(token)),
                "message {token} differs"
            );
        }
    }
    assert!(
        acked.len() > 100,
        "only {} messages acknowledged",
        acked.len()
    );
    for t in &acked {
        assert_eq!(
            seen.get(t),
            Some(&1),
            "acknowledged message {t} not delivered exactly once"
        );
    }
    for (t, n) in &seen {
        assert_eq!(*n, 1, "message {t} delivered {n} times");
    }
    eprintln!(
        "acknowledged {}, delivered {} (the difference were in flight at a kill)",
        acked.len(),
        seen.len()
    );
}
