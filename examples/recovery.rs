//! Recovery time of a large queue:
//!
//!     cargo run --release --example recovery -- [MESSAGES] [DIR]
//!
//! (DIR given: the spool is kept there afterwards.)
//!
//! Writes MESSAGES (default 1,000,000) queued 1 KiB messages into a fresh
//! spool as segment files (the record format ringmta writes, built directly
//! so the set-up takes seconds), then times `Spool::open`: the scan, checksum
//! verification, journal replay and queue rebuild ringmta does at start.

use std::io::Write;
use std::time::{Instant, SystemTime};

use ringmta::smtp::envelope::{Protocol, Rcpt};
use ringmta::smtp::Envelope;
use ringmta::spool::{format, segment, Spool};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let n: usize = args
        .next()
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(1_000_000);
    // With DIR given, the spool is left there (e.g. to start ringmta on it
    // and measure what holding the queue costs).
    let (dir, keep) = match args.next() {
        Some(d) => (std::path::PathBuf::from(d), true),
        None => (
            std::env::temp_dir().join(format!("ringmta-recovery-{}", std::process::id())),
            false,
        ),
    };
    std::fs::create_dir_all(dir.join("seg"))?;
    let body = {
        let mut b = b"Received: from client.test ([127.0.0.1])\r\n\tby mx.test (ringmta) with ESMTP id x;\r\n\tMon, 23 Nov 2026 10:54:20 +0000\r\nSubject: recovery\r\n\r\n".to_vec();
        while b.len() < 1024 {
            b.extend_from_slice(
                b"0123456789012345678901234567890123456789012345678901234567890123456789\r\n",
            );
        }
        b.truncate(1024);
        b
    };
    let t0 = Instant::now();
    let mut seg = Vec::with_capacity(65 << 20);
    let mut files = 0;
    for i in 0..n {
        let env = Envelope {
            peer: "127.0.0.1:1234".parse()?,
            helo: "client.test".into(),
            protocol: Protocol {
                esmtp: true,
                tls: false,
                auth: false,
                utf8: false,
            },
            mail_from: Some("sender@example.org".into()),
            size: None,
            body: None,
            smtputf8: false,
            ret: None,
            envid: None,
            rcpts: vec![Rcpt {
                addr: format!("r{i}@example.net"),
                notify: None,
                orcpt: None,
            }],
            chunked: false,
            pool: None,
        };
        let id = format!("{i:014x}00{:06x}", i & 0xff_ffff);
        let head = format::encode_envelope(&id, &env, SystemTime::now());
        segment::encode_record(&mut seg, segment::KIND_MESSAGE, &head, &[&body]);
        if seg.len() >= 64 << 20 || i + 1 == n {
            let path = dir
                .join("seg")
                .join(format!("{:03}-{:016x}.seg", files % 2, files));
            std::fs::File::create(path)?.write_all(&seg)?;
            seg.clear();
            files += 1;
        }
    }
    println!(
        "wrote {n} messages in {files} segments in {:.1?}",
        t0.elapsed()
    );
    // Cold-ish: drop the page cache when we may (root), as after a reboot.
    let dropped = std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok();
    let t1 = Instant::now();
    let spool = Spool::open(&dir)?;
    let took = t1.elapsed();
    let rec = spool.recovered();
    println!(
        "recovered {} messages ({} MiB, {} segments) in {:.2?} ({}page cache dropped first); {:.0} messages/s",
        rec.messages,
        rec.bytes >> 20,
        rec.segments,
        took,
        if dropped { "" } else { "NOT " },
        rec.messages as f64 / took.as_secs_f64().max(f64::EPSILON)
    );
    println!("process peak RSS: {} MiB", peak_rss_kib() / 1024);
    drop(spool);
    if !keep {
        std::fs::remove_dir_all(&dir)?;
    }
    Ok(())
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}
