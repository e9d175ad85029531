//! One shard: a glommio executor on its own thread that owns its listeners,
//! its connections and its spool writer, from accept to the durable 250.
//!
//! Shutdown: the process-wide stop flag is watched here; on it the shard
//! stops accepting, tells every connection (idle ones answer 421 at once),
//! waits up to the grace period for open transactions, then forces 421 on the
//! rest and returns.

use std::cell::{Cell, RefCell};
use std::os::fd::{FromRawFd, IntoRawFd};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use event_listener::Event;
use futures_lite::{AsyncWriteExt, FutureExt};
use glommio::net::{TcpListener, TcpStream};
use glommio::{LocalExecutorBuilder, Placement};

use super::{conn, proxy, ListenerKind, ServerError, Shared};
use crate::config::Config;
use crate::metrics::Refused;
use crate::smtp::reply::{self, Reply};
use crate::spool::ShardSpool;

pub(crate) struct ShardContext {
    pub id: usize,
    pub config: Config,
    pub spool_root: PathBuf,
    pub shared: Arc<Shared>,
    /// This shard's part of the recovered queue (taken once at start).
    pub queue: std::cell::Cell<crate::spool::queue::QueueIndex>,
    /// DNS for outbound delivery; `None` with `--no-delivery`.
    pub resolver: Option<crate::relay::mx::Resolver>,
    /// DNS for the lists of inbound clients (the same resolver thread).
    pub lists_dns: crate::relay::mx::Resolver,
    /// This shard's resolver and caches for the inbound checks.
    pub dns: crate::inbound::dns::DnsHandle,
    /// This shard's clone of the handoff mesh (joined once, in `serve`);
    /// `None` with one shard or `--no-delivery`.
    pub mesh: Option<crate::relay::handoff::Mesh>,
    /// Commands from the admin API to this shard (`None`: no admin
    /// listener).
    pub control: Option<futures_channel::mpsc::Receiver<crate::relay::control::Request>>,
    /// Destinations suspended at start, with the end of each suspension.
    pub suspended: Vec<(String, u64)>,
}

/// What every connection task of this shard shares (single-threaded).
pub(crate) struct ShardState {
    pub ctx: ShardContext,
    pub spool: Rc<ShardSpool>,
    /// This shard's delivery engine; `None` with `--no-delivery`.
    pub relay: Option<Rc<crate::relay::Relay>>,
    /// Rate-limited log of commands refused by policy.
    pub reject_log: super::limits::RejectLog,
    /// Memory for message bodies in flight on this shard.
    pub budget: super::budget::InflightBudget,
    /// This shard's metric handles (counting is an atomic add).
    pub metrics: Arc<crate::metrics::ShardMetrics>,
    /// Replies sent, by code and enhanced code.
    pub replies: crate::metrics::ReplyCounters,
    /// DNS list answers kept on this shard.
    pub dnsbl_cache: Rc<crate::inbound::dnsbl::Cache>,
    active: Cell<usize>,
    /// Set once the stop flag was seen; connections answer 421 when idle.
    pub stopping: Cell<bool>,
    pub stop_event: Event,
    /// Set when the grace period is over: 421 now, whatever the phase.
    pub grace_over: Cell<bool>,
    pub grace_event: Event,
    conn_closed: Event,
}

/// How often a shard looks for segments to compact.
const COMPACT_EVERY: Duration = Duration::from_secs(10);
/// How often a shard publishes its queue metrics.
const QUEUE_CENSUS_EVERY: Duration = Duration::from_secs(5);
/// How often a shard looks at the process-wide stop flag.
const STOP_POLL: Duration = Duration::from_millis(50);
/// After the grace period, how long forced 421s may take to be written.
const FORCE_CLOSE_WAIT: Duration = Duration::from_secs(5);
/// How long a refused connection may take to read its 421.
const REFUSE_WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// The shard thread's body.
pub(crate) fn run(
    ctx: ShardContext,
    listeners: Vec<(ListenerKind, std::net::TcpListener)>,
    core: Option<core_affinity::CoreId>,
    ready: mpsc::Sender<Result<(), ServerError>>,
) {
    if let Some(core) = core {
        if !core_affinity::set_for_current(core) {
            tracing::warn!(
                shard = ctx.id,
                core = core.id,
                "could not pin shard to core"
            );
        }
    }
    let executor = LocalExecutorBuilder::new(Placement::Unbound)
        .name(&format!("ringmta-shard-{}", ctx.id))
        .io_memory(ctx.config.io_memory)
        .ring_depth(ctx.config.ring_depth)
        .make();
    let executor = match executor {
        Ok(ex) => ex,
        Err(e) => {
            let _ = ready.send(Err(ServerError::IoUring {
                shard: ctx.id,
                io_memory: ctx.config.io_memory,
                reason: e.to_string(),
            }));
            return;
        }
    };
    executor.run(serve(ctx, listeners, ready));
}

async fn serve(
    mut ctx: ShardContext,
    listeners: Vec<(ListenerKind, std::net::TcpListener)>,
    ready: mpsc::Sender<Result<(), ServerError>>,
) {
    let spool = Rc::new(ShardSpool::new(
        &ctx.spool_root,
        ctx.id,
        ctx.config.session.hostname.clone(),
        ctx.config.spool,
        ctx.queue.take(),
    ));
    let relay = ctx.resolver.clone().map(|resolver| {
        crate::relay::Relay::new(
            ctx.shared.relay.clone(),
            ctx.config.session.hostname.clone(),
            spool.clone(),
            resolver,
            ctx.shared.maildir_pool.clone(),
        )
    });
    if let Some(relay) = &relay {
        for (destination, until) in &ctx.suspended {
            relay.suspend(destination, *until);
        }
    }
    // The shard's long-lived loops are supervised: a panic in one is logged
    // and the loop started again, instead of silently ending the shard's
    // delivery or compaction.
    if let Some(relay) = &relay {
        let relay = relay.clone();
        glommio::spawn_local(async move {
            crate::util::supervise("relay scheduler", || relay.clone().run()).await;
        })
        .detach();
    }
    if let (Some(relay), Some(mesh)) = (&relay, ctx.mesh.take()) {
        glommio::spawn_local(relay.clone().join_mesh(mesh)).detach();
    }
    {
        let (spool, below) = (spool.clone(), ctx.config.spool.compact_below);
        glommio::spawn_local(async move {
            crate::util::supervise("spool maintenance", || maintain_spool(spool.clone(), below))
                .await;
        })
        .detach();
    }
    let control = ctx.control.take();
    let grace = ctx.config.shutdown_grace;
    let inflight = ctx.config.inflight;
    let id = ctx.id;
    let state = Rc::new(ShardState {
        ctx,
        spool,
        relay,
        reject_log: Default::default(),
        budget: super::budget::InflightBudget::new(inflight.per_shard, inflight.per_client),
        metrics: crate::metrics::shard(id),
        replies: crate::metrics::ReplyCounters::new(id),
        dnsbl_cache: Default::default(),
        active: Cell::new(0),
        stopping: Cell::new(false),
        stop_event: Event::new(),
        grace_over: Cell::new(false),
        grace_event: Event::new(),
        conn_closed: Event::new(),
    });
    {
        let state = state.clone();
        glommio::spawn_local(async move {
            crate::util::supervise("queue metrics", || publish_queue(state.clone())).await;
        })
        .detach();
    }
    if let Some(rx) = control {
        let (state, rx) = (state.clone(), Rc::new(RefCell::new(rx)));
        glommio::spawn_local(async move {
            crate::util::supervise("queue control", || control_loop(state.clone(), rx.clone()))
                .await;
        })
        .detach();
    }
    let accept_tasks: Vec<_> = listeners
        .into_iter()
        .map(|(kind, l)| {
            // SAFETY: the fd comes from a listening socket we own and give up.
            let l = unsafe { TcpListener::from_raw_fd(l.into_raw_fd()) };
            glommio::spawn_local(accept_loop(state.clone(), l, kind)).detach()
        })
        .collect();
    let _ = ready.send(Ok(()));
    drop(ready);

    while !state.ctx.shared.stop_requested() {
        glommio::timer::sleep(STOP_POLL).await;
    }
    tracing::info!(
        shard = state.ctx.id,
        active = state.active.get(),
        "shard stopping"
    );
    state.stopping.set(true);
    state.stop_event.notify(usize::MAX);
    if let Some(relay) = &state.relay {
        relay.stop();
    }
    for t in accept_tasks {
        t.await;
    }
    if !wait_for_conns(&state, grace).await {
        tracing::warn!(
            shard = state.ctx.id,
            active = state.active.get(),
            "grace period over; closing open sessions with 421"
        );
        state.grace_over.set(true);
        state.grace_event.notify(usize::MAX);
        wait_for_conns(&state, FORCE_CLOSE_WAIT).await;
    }
    let stats = state.spool.stats();
    tracing::info!(
        shard = state.ctx.id,
        commits = stats.batches,
        messages = stats.records,
        "shard stopped"
    );
}

/// Every so often, removes finished segments that could not go at once
/// (no further delivery may come to retry it), and copies the few live
/// messages out of mostly-finished segments so their files can go (the
/// spool's disk use follows the queue).
async fn maintain_spool(spool: Rc<ShardSpool>, below: f64) {
    loop {
        glommio::timer::sleep(COMPACT_EVERY).await;
        spool.reap().await;
        if below <= 0.0 {
            continue;
        }
        match spool.compact(below).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(freed = n, "spool segments compacted"),
            Err(e) => tracing::warn!(error = %e, "spool compaction failed; retrying later"),
        }
    }
}

/// Every so often, publishes the queue's size (and, with delivery on, the
/// recipients waiting per destination and the oldest's age): the admin
/// thread cannot look into a shard, so the shard tells.
async fn publish_queue(state: Rc<ShardState>) {
    let mut last = std::collections::HashSet::new();
    loop {
        let m = &state.metrics;
        m.queue_messages.set(state.spool.len() as i64);
        m.queue_held.set(held_messages(&state.spool).await as i64);
        if let Some(relay) = &state.relay {
            m.queue_census(&relay.census().await, &mut last);
        }
        glommio::timer::sleep(QUEUE_CENSUS_EVERY).await;
    }
}

/// Carries out the admin API's commands on this shard, each in a task of
/// its own (a panic costs that command, answered by the dropped reply).
async fn control_loop(
    state: Rc<ShardState>,
    rx: Rc<RefCell<futures_channel::mpsc::Receiver<crate::relay::control::Request>>>,
) {
    use futures_lite::Stream;
    loop {
        // Borrowed only while polled: a restart after a panic finds it free.
        let next =
            std::future::poll_fn(|cx| std::pin::Pin::new(&mut *rx.borrow_mut()).poll_next(cx))
                .await;
        let Some(req) = next else {
            return;
        };
        let state = state.clone();
        glommio::spawn_local(async move {
            let cfg = state.ctx.shared.relay.load_full();
            let mut answer = None;
            let done = crate::util::isolate(async {
                let a = match req.command {
                    crate::relay::control::Command::Inject(batch) => {
                        super::inject::store_batch(&state, batch).await
                    }
                    command => {
                        crate::relay::control::execute(
                            command,
                            &state.spool,
                            state.relay.as_ref(),
                            &cfg,
                        )
                        .await
                    }
                };
                answer = Some(a);
            })
            .await;
            match (done, answer) {
                (Ok(()), Some(a)) => {
                    let _ = req.reply.try_send((state.ctx.id, a));
                }
                (Err(what), _) => {
                    tracing::error!(shard = state.ctx.id, panic = %what, "queue control command panicked");
                }
                (Ok(()), None) => {}
            }
        })
        .detach();
    }
}

/// Messages on hold in this shard's queue, counted in slices with a
/// yield between them (a large queue does not hold up connections).
async fn held_messages(spool: &ShardSpool) -> usize {
    let mut held = 0;
    let mut from = Some(0);
    while let Some(at) = from {
        from = spool.visit(at, 4096, |v| held += usize::from(v.held));
        glommio::yield_if_needed().await;
    }
    held
}

/// Waits until no connection is open, or `limit` passed (then `false`).
async fn wait_for_conns(state: &ShardState, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if state.active.get() == 0 {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        let closed = state.conn_closed.listen();
        if state.active.get() == 0 {
            return true;
        }
        closed.or(glommio::timer::sleep(deadline - now)).await;
    }
}

async fn accept_loop(state: Rc<ShardState>, listener: TcpListener, kind: ListenerKind) {
    loop {
        let stop = state.stop_event.listen();
        if state.stopping.get() {
            break;
        }
        let accepted = async { Some(listener.accept().await) }
            .or(async {
                stop.await;
                None
            })
            .await;
        match accepted {
            None => break,
            Some(Ok(stream)) => admit(&state, stream, kind),
            Some(Err(e)) => {
                tracing::warn!(shard = state.ctx.id, error = %e, "accept failed");
                // Out of descriptors or similar: back off instead of spinning.
                glommio::timer::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

fn admit(state: &Rc<ShardState>, stream: TcpStream, kind: ListenerKind) {
    let metrics = &state.metrics;
    metrics.accepted(kind.metrics_index());
    let peer = match stream.peer_addr() {
        Ok(p) => p,
        Err(_) => return, // already gone
    };
    let _ = stream.set_nodelay(true);
    if state.active.get() >= state.ctx.shared.live.load().max_conns_per_shard {
        metrics.refused(Refused::ShardLimit);
        refuse(state, stream, kind, reply::TOO_MANY_CONNECTIONS);
        return;
    }
    // A load balancer's connections are counted per client once its PROXY
    // header named the client: its own address must not use up one
    // client's share.
    let behind_proxy = proxy::is_trusted(&state.ctx.config.proxy_protocol_from, peer.ip());
    let slot = if behind_proxy {
        None
    } else {
        let Some(slot) = state.ctx.shared.ip_limiter.acquire(peer.ip()) else {
            tracing::info!(%peer, "per-IP connection limit reached");
            metrics.refused(Refused::IpLimit);
            refuse(state, stream, kind, reply::TOO_MANY_CONNECTIONS);
            return;
        };
        Some(slot)
    };
    state.active.set(state.active.get() + 1);
    metrics.conns_open.inc();
    let state = state.clone();
    glommio::spawn_local(async move {
        // Awaited where it is made: a `let` first would hold a second
        // copy of the connection's future in this task.
        if let Err(what) =
            crate::util::isolate(conn::serve(&state, stream, peer, kind, behind_proxy)).await
        {
            tracing::error!(%peer, panic = %what, "connection task panicked; shard continues");
        }
        drop(slot);
        state.active.set(state.active.get() - 1);
        state.metrics.conns_open.dec();
        state.conn_closed.notify(usize::MAX);
    })
    .detach();
}

/// Answers `r` and closes, without counting the connection. On an
/// implicit-TLS listener the client expects a handshake, not a plaintext
/// reply: the connection is just closed.
fn refuse(state: &ShardState, stream: TcpStream, kind: ListenerKind, r: Reply) {
    if kind == ListenerKind::Smtps {
        return;
    }
    state.replies.count(r.code, r.status);
    glommio::spawn_local(async move {
        let mut stream = stream;
        refuse_now(&mut stream, kind, r).await;
    })
    .detach();
}

/// [`refuse`], in the calling task (the caller drops the stream).
pub(crate) async fn refuse_now(stream: &mut TcpStream, kind: ListenerKind, r: Reply) {
    if kind == ListenerKind::Smtps {
        return;
    }
    let mut out = Vec::with_capacity(96);
    r.write_to(&mut out);
    let _ = stream.set_write_timeout(Some(REFUSE_WRITE_TIMEOUT));
    let _ = stream.write_all(&out).await;
    let _ = stream.close().await;
}
