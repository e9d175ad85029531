//! Criterion benchmark of the shard-to-shard handoff
//! (`ringmta::relay::handoff`): one origin shard hands work items (one
//! recipient of a queued message each) to the owning shard over the bounded
//! glommio channel mesh with `Link::try_hand`; the owner answers each with a
//! done record (`Link::send_done`: a per-peer outbox and its sender task), and
//! the measurement ends when the origin has every done record back. This is
//! the whole cross-core round trip a relayed message pays on top of delivery.
//!
//! `cargo bench --bench handoff -- --warm-up-time 1 --measurement-time 3`
//!
//! Two executors on two threads, as `ringmta --shards 2` runs; the channel
//! capacity (`--handoff-capacity`) is the parameter. When the owner's channel
//! is full the origin yields and tries again (ringmta itself delivers such
//! work on the origin instead: the bench measures the channel, not that
//! fallback), so small capacities show the cost of waiting for room.
//! `Throughput::Elements` = handed-off work items (= done records).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use glommio::{LocalExecutorBuilder, Placement};

use ringmta::relay::client::{RcptOutcome, Reply};
use ringmta::relay::handoff::{Attempt, Done, Handoff, Link, Mesh, Msg, Report};
use ringmta::relay::Target;
use ringmta::spool::queue::Location;

criterion_group!(benches, handoff);
criterion_main!(benches);

fn handoff(c: &mut Criterion) {
    let mut g = c.benchmark_group("handoff");
    g.throughput(Throughput::Elements(1));
    for capacity in [16usize, 256, 1024] {
        g.bench_with_input(
            BenchmarkId::new("round_trip", capacity),
            &capacity,
            |b, &capacity| b.iter_custom(|iters| round_trips(iters, capacity)),
        );
    }
    g.finish();
}

/// Hands `n` work items from shard 0 to shard 1 and waits for their done
/// records; the time from the first hand to the last record back.
fn round_trips(n: u64, capacity: usize) -> Duration {
    // Every clone is made before any thread runs: MeshBuilder's clones
    // share a non-atomic reference count (see server::run).
    let mesh = Mesh::full(2, capacity);
    let (origin_mesh, owner_mesh) = (mesh.clone(), mesh);
    let finished = Arc::new(AtomicBool::new(false));
    let owner = std::thread::spawn({
        let finished = finished.clone();
        move || on_executor("owner", owner(owner_mesh, finished))
    });
    let took = std::thread::spawn(move || on_executor("origin", origin(origin_mesh, n)))
        .join()
        .expect("origin thread");
    finished.store(true, Ordering::Release);
    owner.join().expect("owner thread");
    took
}

fn on_executor<T: 'static>(name: &str, f: impl std::future::Future<Output = T> + 'static) -> T {
    LocalExecutorBuilder::new(Placement::Unbound)
        .name(name)
        .io_memory(512 << 10)
        .make()
        .expect("executor (io_uring)")
        .run(f)
}

async fn origin(mesh: Mesh, n: u64) -> Duration {
    let (link, receivers) = Link::join(mesh).await.expect("join mesh");
    let owner = 1 - link.me();
    let (_, from_owner) = receivers
        .into_iter()
        .find(|(peer, _)| *peer == owner)
        .expect("receiver from the owner");
    let location = Location {
        segment: "000-0006612cf508be84.seg".into(),
        offset: 0,
        len: 1442,
    };
    let target = Target::Smtp {
        host: "127.0.0.2".into(),
        port: 25,
    };
    let start = Instant::now();
    let sender = glommio::spawn_local({
        let link = link.clone();
        async move {
            for i in 0..n {
                let work = Handoff {
                    origin: link.me(),
                    id: format!("06612cf508be55{i:08x}").into(),
                    location: location.clone(),
                    rcpts: vec![0].into(),
                    target: target.clone(),
                    shaped: None,
                    pinned: false,
                    source: None,
                };
                // Keep the item when the channel is full: `try_hand`
                // consumes it, so hand a clone and retry after a yield.
                while !link.try_hand(owner, work.clone()) {
                    // Let the done records in (they free the owner to
                    // read on).
                    futures_lite::future::yield_now().await;
                }
            }
        }
    })
    .detach();
    let mut done = 0;
    while done < n {
        match from_owner.recv().await {
            Some(Msg::Done(_)) => done += 1,
            Some(Msg::Work(_)) => unreachable!("the owner hands nothing back"),
            None => panic!("owner left before every done record came back"),
        }
    }
    let took = start.elapsed();
    sender.await;
    took
}

/// Answers every work item with a delivered outcome, until the origin has
/// every answer back (`finished`).
async fn owner(mesh: Mesh, finished: Arc<AtomicBool>) {
    let (link, receivers) = Link::join(mesh).await.expect("join mesh");
    let origin = 1 - link.me();
    let (_, from_origin) = receivers
        .into_iter()
        .find(|(peer, _)| *peer == origin)
        .expect("receiver from the origin");
    let reply = Reply {
        code: 250,
        lines: vec!["2.0.0 Ok: queued".into()],
    };
    let stop = async {
        while !finished.load(Ordering::Acquire) {
            glommio::timer::sleep(Duration::from_millis(1)).await;
        }
        None
    };
    let mut stop = std::pin::pin!(stop);
    loop {
        let msg = futures_lite::future::or(from_origin.recv(), stop.as_mut()).await;
        let Some(Msg::Work(w)) = msg else { break };
        link.send_done(
            w.origin,
            Done {
                id: w.id,
                rcpts: w.rcpts,
                report: Report::Outcomes {
                    outcomes: vec![RcptOutcome::Delivered(reply.clone())],
                    remote: Some("127.0.0.2".into()),
                    attempt: Attempt::default(),
                },
            },
        );
    }
}
