//! Criterion benchmark of the spool commit path: `ShardSpool::store` on a
//! real file with fdatasync, 1 KiB and 64 KiB messages, 1 to 64 concurrent
//! committers on one shard. Group commit is what the committer axis shows:
//! with more committers, more messages share each fdatasync.
//!
//! `cargo bench --bench spool -- --warm-up-time 1 --measurement-time 5`
//!
//! `Throughput::Elements` = messages; MB/s is messages/s × the size.

use std::rc::Rc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use glommio::{LocalExecutor, LocalExecutorBuilder, Placement};

use ringmta::smtp::envelope::{Protocol, Rcpt};
use ringmta::smtp::{Envelope, Message};
use ringmta::spool::{ShardSpool, Spool, SpoolOptions};

criterion_group!(benches, commit);
criterion_main!(benches);

fn message(body: &[u8]) -> Message {
    Message {
        envelope: Envelope {
            peer: "127.0.0.1:1234".parse().expect("address"),
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
                addr: "rcpt@localhost".into(),
                notify: None,
                orcpt: None,
            }],
            chunked: false,
            pool: None,
        },
        body: body.to_vec(),
    }
}

fn commit(c: &mut Criterion) {
    // On the build disk, not a tmpfs: fdatasync must cost what it costs.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    let spool = Spool::open(dir.path()).expect("spool");
    let ex: LocalExecutor = LocalExecutorBuilder::new(Placement::Unbound)
        .io_memory(512 << 10)
        .make()
        .expect("executor");
    let shard = Rc::new(ShardSpool::new(
        dir.path(),
        0,
        "mx.test".into(),
        SpoolOptions {
            max_segment: 64 << 20,
            compact_below: 0.0,
            commit_window: Duration::ZERO,
            fsync: true,
            delivery_cache: 0,
        },
        spool.take_shard_queue(0, 1),
    ));
    let mut group = c.benchmark_group("commit");
    for size in [1024usize, 64 << 10] {
        let body = vec![b'x'; size];
        for committers in [1usize, 8, 64] {
            group.throughput(Throughput::Elements(committers as u64));
            let id = BenchmarkId::new(format!("{}KiB", size >> 10), committers);
            group.bench_with_input(id, &committers, |b, &committers| {
                b.iter_custom(|iters| {
                    let shard = shard.clone();
                    let body = body.clone();
                    ex.run(async move {
                        let start = Instant::now();
                        let tasks: Vec<_> = (0..committers)
                            .map(|_| {
                                let shard = shard.clone();
                                let body = body.clone();
                                glommio::spawn_local(async move {
                                    for _ in 0..iters {
                                        shard.store(message(&body)).await.expect("store");
                                    }
                                })
                            })
                            .collect();
                        for t in tasks {
                            t.await;
                        }
                        start.elapsed()
                    })
                })
            });
        }
    }
    group.finish();
    let stats = shard.stats();
    eprintln!(
        "spool commit: {} messages in {} fdatasyncs ({:.1} per sync)",
        stats.records,
        stats.batches,
        stats.records as f64 / stats.batches.max(1) as f64
    );
}
