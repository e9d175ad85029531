//! Criterion benchmarks of the sans-IO protocol core: command parsing (alone
//! and through `Session::handle_input`) and content reception (DATA with
//! dot-unstuffing, BDAT), each next to the cheapest thing it could be
//! compared with.
//!
//! `cargo bench --bench smtp -- --warm-up-time 1 --measurement-time 3`
//!
//! * `pipeline/*`: one pipelined batch (EHLO, MAIL with SIZE and BODY, 50
//!   RCPT with NOTIFY, DATA), `Throughput::Elements` = commands.
//! * `content/*`: 1 KiB, 64 KiB and 10 MiB bodies of 78-character lines with
//!   some dot-stuffed lines, `Throughput::Bytes`. `memmem` is only the search
//!   for `<CRLF>.<CRLF>` in the same buffer, `memmem_copy` that search plus
//!   copying the content out: the floors `data_receiver` (which also checks
//!   line ends and lengths and unstuffs) is measured against.
//! * `metrics/per_message`: what the connection driver adds for the metrics
//!   to one message on its own connection: the counters it bumps (accepted,
//!   session, open, bytes, message, recipients) and the scan and count of the
//!   replies it writes (greeting, EHLO, MAIL, RCPT, DATA, end of data, QUIT).

use std::hint::black_box;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use bumpalo::Bump;
use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};

use ringmta::smtp::data::{BareNewline, BdatReceiver, DataReceiver, Progress};
use ringmta::smtp::parse::parse_command;
use ringmta::smtp::{ConnInfo, Session, SessionConfig};

criterion_group!(benches, pipeline, content, metrics);
criterion_main!(benches);

const RCPTS: usize = 50;
const SIZES: [(&str, usize); 3] = [("1KiB", 1 << 10), ("64KiB", 64 << 10), ("10MiB", 10 << 20)];

fn pipeline(c: &mut Criterion) {
    let batch = pipelined_batch();
    let commands = RCPTS + 3;
    let cfg = Arc::new(SessionConfig::default());
    let conn = ConnInfo {
        peer: SocketAddr::from((Ipv4Addr::LOCALHOST, 40000)),
        tls: false,
    };
    let now = Instant::now();

    let mut g = c.benchmark_group("pipeline");
    g.throughput(Throughput::Elements(commands as u64));

    // Once, untimed: the batch is accepted whole, one reply per command.
    let mut s = Session::new(cfg.clone(), conn, now);
    s.clear_output();
    assert_eq!(s.handle_input(&batch, now), batch.len());
    let replies = s
        .output()
        .split(|&b| b == b'\n')
        .filter(|l| l.len() > 3 && l[3] == b' ');
    assert_eq!(replies.count(), commands);
    assert!(
        s.output().starts_with(b"250-")
            && s.output()
                .ends_with(b"354 End data with <CR><LF>.<CR><LF>\r\n")
    );

    g.bench_function("session_handle_input", |b| {
        b.iter_batched_ref(
            || Session::new(cfg.clone(), conn, now),
            |s| {
                let consumed = s.handle_input(black_box(&batch), now);
                black_box((consumed, s.output().len()))
            },
            BatchSize::SmallInput,
        )
    });

    let lines: Vec<&[u8]> = batch
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .collect();
    assert_eq!(lines.len(), commands);
    let mut arena = Bump::new();
    g.bench_function("parse_command", |b| {
        b.iter(|| {
            for line in &lines {
                let parsed = parse_command(black_box(line), &arena);
                black_box(parsed.is_ok());
            }
            arena.reset();
        })
    });
    g.finish();
}

fn metrics(c: &mut Criterion) {
    use ringmta::metrics::{self, ReplyCounters};
    use ringmta::smtp::reply::for_each_final;
    let m = metrics::shard(0);
    let replies = ReplyCounters::new(0);
    let batches: [&[u8]; 5] = [
        b"220 mx.test ESMTP ringmta\r\n",
        b"250-mx.test\r\n250-PIPELINING\r\n250-SIZE 10485760\r\n250-8BITMIME\r\n\
          250-SMTPUTF8\r\n250-ENHANCEDSTATUSCODES\r\n250-CHUNKING\r\n250 DSN\r\n",
        b"250 2.1.0 Sender ok\r\n250 2.1.5 Recipient ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n",
        b"250 2.0.0 Ok: queued as 0123456789abcdef\r\n",
        b"221 2.0.0 Bye\r\n",
    ];
    let mut g = c.benchmark_group("metrics");
    g.throughput(Throughput::Elements(1));
    g.bench_function("per_message", |b| {
        b.iter(|| {
            m.accepted(0);
            m.conns_open.inc();
            m.session(0);
            for out in batches {
                for_each_final(black_box(out), |code, status| replies.count(code, status));
                m.received_bytes.inc_by(black_box(40));
            }
            m.messages.inc();
            m.recipients.inc_by(1);
            m.conns_open.dec();
        })
    });
    g.finish();
}

fn content(c: &mut Criterion) {
    let mut g = c.benchmark_group("content");
    for (label, size) in SIZES {
        let (wire, content) = message(size);
        // Bytes on the wire, terminator included, for every variant.
        g.throughput(Throughput::Bytes(wire.len() as u64));

        g.bench_with_input(BenchmarkId::new("memmem", label), &wire, |b, wire| {
            let finder = memchr::memmem::Finder::new(b"\r\n.\r\n");
            b.iter(|| finder.find(black_box(wire)))
        });

        // Once, untimed: the receiver gives back exactly the content.
        let mut body = Vec::with_capacity(wire.len());
        let mut rx = DataReceiver::new(u64::MAX, BareNewline::default());
        let done = rx.handle(&wire, &mut body);
        assert_eq!(
            done,
            Progress::Done {
                consumed: wire.len()
            }
        );
        assert_eq!(body, content);

        // The floor for any receiver that hands the content on: find the
        // end, copy what precedes it.
        g.bench_with_input(BenchmarkId::new("memmem_copy", label), &wire, |b, wire| {
            let finder = memchr::memmem::Finder::new(b"\r\n.\r\n");
            b.iter(|| {
                body.clear();
                let end = finder.find(black_box(wire)).map_or(0, |p| p + 2);
                body.extend_from_slice(&wire[..end]);
                black_box(body.len())
            })
        });

        g.bench_with_input(
            BenchmarkId::new("data_receiver", label),
            &wire,
            |b, wire| {
                b.iter(|| {
                    body.clear();
                    let mut rx = DataReceiver::new(u64::MAX, BareNewline::default());
                    let done = rx.handle(black_box(wire), &mut body);
                    black_box((done, body.len()))
                })
            },
        );

        // The same, arriving in 64 KiB reads as from a socket (the last
        // unconsumed bytes presented again with the next read).
        g.bench_with_input(
            BenchmarkId::new("data_receiver_64k_reads", label),
            &wire,
            |b, wire| {
                b.iter(|| {
                    body.clear();
                    let mut rx = DataReceiver::new(u64::MAX, BareNewline::default());
                    let mut pos = 0;
                    loop {
                        let end = (pos + (64 << 10)).min(wire.len());
                        match rx.handle(&wire[pos..end], &mut body) {
                            Progress::Done { consumed } => break black_box(pos + consumed),
                            Progress::NeedMore { consumed } => pos += consumed,
                        }
                    }
                })
            },
        );

        g.throughput(Throughput::Bytes(content.len() as u64));
        g.bench_with_input(
            BenchmarkId::new("bdat_receiver", label),
            &content,
            |b, chunk| {
                b.iter(|| {
                    body.clear();
                    // The default policy: bare CR/LF normalised.
                    let mut rx = BdatReceiver::with_lines(
                        chunk.len() as u64,
                        BareNewline::Normalize,
                        Default::default(),
                    );
                    black_box(rx.handle(black_box(chunk), Some(&mut body)))
                })
            },
        );
    }
    g.finish();
}

/// `EHLO`, `MAIL FROM` with SIZE and BODY, 50 `RCPT TO` with NOTIFY, `DATA`,
/// as a pipelining client sends them in one write.
fn pipelined_batch() -> Vec<u8> {
    let mut b = Vec::with_capacity(4096);
    b.extend_from_slice(b"EHLO client.example.org\r\n");
    b.extend_from_slice(b"MAIL FROM:<sender@example.org> SIZE=65536 BODY=8BITMIME\r\n");
    for i in 0..RCPTS {
        b.extend_from_slice(
            format!("RCPT TO:<user{i}@localhost> NOTIFY=SUCCESS,FAILURE\r\n").as_bytes(),
        );
    }
    b.extend_from_slice(b"DATA\r\n");
    b
}

/// A message of about `size` octets: headers, then 78-character text lines,
/// every 50th beginning with a dot. Returns it dot-stuffed with its
/// `.<CRLF>` terminator (DATA on the wire) and as plain content (BDAT).
fn message(size: usize) -> (Vec<u8>, Vec<u8>) {
    // Prose with the punctuation real text has: '.' is one of the bytes
    // `memmem` prefilters on, so a text without periods would flatter it.
    const TEXT: &[u8] = b"The quick brown fox jumps over the lazy dog. Pack my box with five \
        dozen liquor jugs. How vexingly quick daft zebras jump, said Ms. Blitz. ";
    let mut plain = Vec::with_capacity(size + 100);
    plain.extend_from_slice(
        b"From: Sender <sender@example.org>\r\nTo: user0@localhost\r\n\
          Subject: benchmark\r\nMessage-ID: <bench@example.org>\r\n\r\n",
    );
    let mut n = 0usize;
    while plain.len() < size {
        n += 1;
        let line = &TEXT[..78];
        // (`== 25` rather than `== 0`: `is_multiple_of` is newer than the
        // declared rust-version.)
        if n % 50 == 25 {
            plain.push(b'.');
            plain.extend_from_slice(&line[1..]);
        } else {
            // Vary the text so lines are not byte-identical.
            let r = n % 60;
            plain.extend_from_slice(&line[r..]);
            plain.extend_from_slice(&line[..r]);
        }
        plain.extend_from_slice(b"\r\n");
    }
    let mut wire = Vec::with_capacity(plain.len() + plain.len() / 50 + 3);
    let mut at_line_start = true;
    for &b in &plain {
        if at_line_start && b == b'.' {
            wire.push(b'.');
        }
        wire.push(b);
        at_line_start = b == b'\n';
    }
    wire.extend_from_slice(b".\r\n");
    (wire, plain)
}
