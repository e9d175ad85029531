//! One shard's delivery engine: schedules the shard's queue, runs
//! per-destination workers, applies outcomes, retries, bounces.
//!
//! SMTP destinations owned by another shard ([`super::handoff`]) are handed
//! to it once the mesh is joined; the owner's workers deliver them next to
//! its own, and their outcomes come back to be journaled here. Recipients
//! stay in `in_flight` on the origin until their outcome is settled, so a
//! message is never scheduled twice at once. A worker that panics gives
//! back the work it held ([`Held`]): its recipients leave `in_flight` and
//! are retried after the first retry delay.

use std::cell::{Cell, RefCell};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use event_listener::Event;
use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, FutureExt};
use futures_rustls::TlsConnector;
use glommio::net::TcpStream;
use rustls::pki_types::ServerName;

use super::classify::{Action, Classifier};
use super::client::{
    Awaiting, Client, ConnError, Job, JobRcpt, RcptOutcome, ReplyParser, StartTls,
};
use super::dane::{self, Dane};
use super::handoff::{self, Attempt, Done, Handoff, Link, Mesh, Msg, RcptIndexes, Report};
use super::maildir;
use super::mta_sts::{self, Mode};
use super::mx::{Resolution, Resolver};
use super::shaping::{Key, Pacer, Shape, Source};
use super::tls::{self, Security, TlsPolicy};
use super::{dsn, RelayConfig, Target};
use crate::policy;
use crate::smtp::envelope::{Protocol, Rcpt};
use crate::smtp::{Envelope, Message};
use crate::spool::queue::{JournalOp, Location, QueueId, RcptState};
use crate::spool::{format, ShardSpool};

/// Some recipients of one message, all for one destination. Every message
/// waiting for a destination that does not answer is one of these, so it
/// holds no allocation of its own in the common case.
#[derive(Debug)]
struct Work {
    id: QueueId,
    rcpts: RcptIndexes,
    /// `Some` when another shard's spool holds the message (handed off).
    origin: Option<Origin>,
    /// See [`Handoff::shaped`].
    shaped: Option<Box<str>>,
    /// See [`Handoff::pinned`].
    pinned: bool,
    /// See [`Handoff::source`] (shared with the rules: no allocation).
    source: Option<Arc<str>>,
}

impl Work {
    /// A copy of what identifies the work, for [`Held`].
    fn key(&self) -> Work {
        Work {
            id: self.id.clone(),
            rcpts: self.rcpts.clone(),
            origin: self.origin.as_ref().map(|o| Origin {
                peer: o.peer,
                location: o.location.clone(),
            }),
            shaped: self.shaped.clone(),
            pinned: self.pinned,
            source: self.source.clone(),
        }
    }
}

/// A destination as reached from one source: what a destination queue,
/// its workers and its budgets are kept by. Without source-IP pools the
/// source is `None` and a lane is its destination.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Lane {
    target: Target,
    source: Option<Arc<str>>,
}

impl std::fmt::Display for Lane {
    /// `mx:example.com:25`, or `mx:example.com:25 via a` for source `a`:
    /// also the name of the lane's automatic suspension.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.source {
            None => write!(f, "{}", self.target),
            Some(s) => write!(f, "{} via {s}", self.target),
        }
    }
}

/// The work one delivery worker has taken and not yet reported. If the
/// worker panics, this is what must leave `in_flight` (else the message
/// is never scheduled again until a restart).
#[derive(Default)]
struct Held(RefCell<Option<Work>>);

/// Where handed-off work came from.
#[derive(Debug)]
struct Origin {
    /// The origin's index in the mesh.
    peer: usize,
    location: Location,
}

/// How long before work whose worker panicked is tried again, when there
/// is no retry schedule to take the first delay from.
const PANIC_RETRY: u64 = 60;
/// Messages the queue census looks at between yields.
const CENSUS_SLICE: usize = 4096;
/// How long before a message that could not be read is tried again.
const UNREADABLE_RETRY: u64 = 10;
/// How long before recipients whose bounce could not be stored (disk
/// full) are tried again.
const BOUNCE_RETRY: u64 = 60;

#[derive(Default)]
struct DestQueue {
    jobs: VecDeque<Work>,
    workers: usize,
    /// Workers keeping their connection open for more work (shaping's
    /// `idle_timeout`): new work wakes one rather than start another.
    idle: usize,
    arrived: Event,
}

/// One shaping budget ([`shaping::Key`]) on the shard that enforces it:
/// the connections open against it and the pacing of new connections
/// and messages.
#[derive(Default)]
struct Budget {
    open: Cell<usize>,
    freed: Event,
    messages: RefCell<Pacer>,
    connections: RefCell<Pacer>,
}

/// A budget's shaping key and the source it counts for (receivers count
/// per sending address: each source has its own budget).
type BudgetKey = (Key, Option<Box<str>>);

/// A connection counted against a [`Budget`] while it lives.
struct Slot(Rc<Budget>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.set(self.0.open.get().saturating_sub(1));
        self.0.freed.notify(1);
    }
}

/// Budgets a shard keeps before it forgets those not in use.
const BUDGETS_KEPT: usize = 4096;
/// How often a worker waiting for a connection slot looks again (a slot
/// freed wakes it sooner; this bounds a wait on a limit lowered by SIGHUP).
const SLOT_RECHECK: Duration = Duration::from_secs(1);

/// The content and envelope of a message, read back from the spool.
struct Loaded {
    job: Job,
    notify: Vec<Option<String>>,
    orcpt: Vec<Option<String>>,
    ret_full: bool,
    envid: Option<String>,
    arrival: u64,
    arrival_ms: Option<u64>,
}

pub struct Relay {
    /// Process-wide, replaced on SIGHUP: read afresh by each use.
    cfg: Arc<ArcSwap<RelayConfig>>,
    hostname: String,
    spool: Rc<ShardSpool>,
    resolver: Resolver,
    /// Local delivery: this shard's Maildir writer (its directory work
    /// on the process-wide, bounded Maildir pool).
    maildir: maildir::Local,
    /// Outbound STARTTLS accepting any certificate (opportunistic TLS).
    tls_any: TlsConnector,
    /// Outbound STARTTLS verifying the certificate (bundled roots plus
    /// `--tls-ca-file`).
    tls_verified: TlsConnector,
    /// The trust anchors of `tls_verified` (MTA-STS testing checks).
    roots: Arc<rustls::RootCertStore>,
    ready: RefCell<VecDeque<QueueId>>,
    timers: RefCell<BinaryHeap<Reverse<(u64, QueueId)>>>,
    /// Recipients (message, envelope index) being delivered.
    in_flight: RefCell<HashSet<(QueueId, usize)>>,
    dests: RefCell<HashMap<Lane, DestQueue>>,
    wake: Event,
    stopping: Cell<bool>,
    stopped: Event,
    /// This shard's end of the handoff mesh, once joined.
    link: RefCell<Option<Rc<Link>>>,
    /// Accept-to-delivery latency of delivered recipients, milliseconds.
    latency: RefCell<hdrhistogram::Histogram<u64>>,
    metrics: Arc<crate::metrics::ShardMetrics>,
    /// Destinations the operator suspended (admin API), by the lowercase
    /// text of their [`Target`], with the Unix time the suspension ends.
    /// Every shard keeps the same copy (the admin side tells each).
    suspended: RefCell<HashMap<String, u64>>,
    /// The shaping budgets this shard enforces (those of the destinations
    /// and providers it owns).
    budgets: RefCell<HashMap<BudgetKey, Rc<Budget>>>,
    /// The suspensions this shard made itself (throttling replies), kept
    /// in `<spool>/suspended-auto-N.json` so that they outlive a restart.
    automatic: RefCell<HashMap<String, u64>>,
    /// A write of that file is under way / another is due after it.
    auto_writing: Cell<bool>,
    auto_dirty: Cell<bool>,
}

impl Relay {
    /// The delivery settings in force now (a SIGHUP may replace them
    /// between two uses; each use sees one whole version).
    fn cfg(&self) -> Arc<RelayConfig> {
        self.cfg.load_full()
    }

    pub fn new(
        cfg: Arc<ArcSwap<RelayConfig>>,
        hostname: String,
        spool: Rc<ShardSpool>,
        resolver: Resolver,
        maildir_pool: Arc<crate::blocking::BlockingPool>,
    ) -> Rc<Relay> {
        let roots = Arc::new(match tls::roots(cfg.load().tls_ca_file.as_deref()) {
            Ok(roots) => roots,
            Err(e) => {
                tracing::error!(error = %e, "--tls-ca-file: using the bundled roots alone");
                // invariant: the bundled roots alone always load.
                tls::roots(None).expect("bundled roots")
            }
        });
        let relay = Rc::new(Relay {
            tls_any: tls::connector(None),
            tls_verified: tls::connector(Some(roots.clone())),
            roots,
            // invariant: 3 significant figures is within hdrhistogram's range.
            latency: RefCell::new(hdrhistogram::Histogram::new(3).expect("3 significant figures")),
            metrics: crate::metrics::shard(spool.shard()),
            cfg,
            hostname,
            spool,
            resolver,
            maildir: maildir::Local::new(maildir_pool),
            ready: RefCell::new(VecDeque::new()),
            timers: RefCell::new(BinaryHeap::new()),
            in_flight: RefCell::new(HashSet::new()),
            dests: RefCell::new(HashMap::new()),
            wake: Event::new(),
            stopping: Cell::new(false),
            stopped: Event::new(),
            link: RefCell::new(None),
            suspended: RefCell::new(HashMap::new()),
            budgets: RefCell::new(HashMap::new()),
            automatic: RefCell::new(HashMap::new()),
            auto_writing: Cell::new(false),
            auto_dirty: Cell::new(false),
        });
        // Every shard's automatic suspensions of before the restart (the
        // shard count may have changed): none of them is forgotten.
        let kept = super::control::load_automatic(relay.spool.root_dir(), unix_now());
        for (key, until) in kept {
            relay.suspend_at_least(&key, until);
            relay.automatic.borrow_mut().insert(key, until);
        }
        // The recovered queue: deferred recipients wait for their time.
        let (due, later) = relay.spool.schedule(unix_now());
        *relay.ready.borrow_mut() = due.into();
        relay
            .timers
            .borrow_mut()
            .extend(later.into_iter().map(Reverse));
        relay
    }

    /// A message became deliverable (new, released or flushed).
    pub fn enqueue(&self, id: impl Into<QueueId>) {
        self.ready.borrow_mut().push_back(id.into());
        self.wake.notify(1);
    }

    /// Starts no new connection or delivery to `destination` (the text of
    /// a [`Target`], any case) before the Unix time `until`; deliveries
    /// under way finish. Work queued for it goes back to its message,
    /// which waits until then (or [`Relay::resume`]).
    pub fn suspend(&self, destination: &str, until: u64) {
        self.suspended
            .borrow_mut()
            .insert(destination.to_ascii_lowercase(), until);
    }

    /// Ends a suspension; `true` if there was one. Everything due is
    /// scheduled again (what waited for the destination among it).
    pub fn resume(self: &Rc<Self>, destination: &str) -> bool {
        let key = destination.to_ascii_lowercase();
        let was = self.suspended.borrow_mut().remove(&key).is_some();
        if self.automatic.borrow_mut().remove(&key).is_some() {
            self.persist_automatic();
        }
        if was {
            self.requeue_due();
        }
        was
    }

    /// Writes this shard's automatic suspensions (those still in force)
    /// to its file, off the scheduler's path; changes made while a write
    /// is under way are written by one more after it.
    fn persist_automatic(self: &Rc<Self>) {
        self.auto_dirty.set(true);
        if self.auto_writing.replace(true) {
            return;
        }
        let me = self.clone();
        glommio::spawn_local(async move {
            let written = crate::util::isolate(async {
                while me.auto_dirty.replace(false) {
                    let now = unix_now();
                    let list: Vec<(String, u64)> = {
                        let mut auto = me.automatic.borrow_mut();
                        auto.retain(|_, until| *until > now);
                        auto.iter().map(|(k, &u)| (k.clone(), u)).collect()
                    };
                    let name = super::control::automatic_file(me.spool.shard());
                    let bytes = super::control::encode_automatic(&list);
                    if let Err(e) = me.spool.replace_file(&name, &bytes).await {
                        tracing::warn!(error = %e, "cannot record the automatic suspensions");
                    }
                }
            })
            .await;
            if let Err(what) = written {
                tracing::error!(panic = %what, "recording the automatic suspensions panicked");
            }
            me.auto_writing.set(false);
        })
        .detach();
    }

    /// The destinations suspended now and when each suspension ends.
    pub fn suspensions(&self) -> Vec<(String, u64)> {
        let now = unix_now();
        self.suspended
            .borrow()
            .iter()
            .filter(|(_, &until)| until > now)
            .map(|(d, &until)| (d.clone(), until))
            .collect()
    }

    /// Schedules every message with a recipient due now (a recipient
    /// already being delivered is not sent twice: `dispatch` skips it).
    pub fn requeue_due(&self) {
        let (due, _) = self.spool.schedule(unix_now());
        self.ready.borrow_mut().extend(due);
        self.wake.notify(1);
    }

    /// When the suspension of `target` ends, if it is suspended at `now`.
    fn suspended_until(&self, target: &Target, now: u64) -> Option<u64> {
        let suspended = self.suspended.borrow();
        if suspended.is_empty() {
            return None;
        }
        let full = suspended.get(&target.to_string().to_ascii_lowercase());
        let bare = suspended.get(&target.name().to_ascii_lowercase());
        full.into_iter()
            .chain(bare)
            .copied()
            .filter(|&until| until > now)
            .max()
    }

    /// When the suspension of `target` as reached from `source` ends (an
    /// automatic one, from a throttling reply to that source, or the
    /// operator's `DESTINATION via SOURCE`), if it is suspended at `now`.
    fn suspended_via(&self, target: &Target, source: &str, now: u64) -> Option<u64> {
        let suspended = self.suspended.borrow();
        if suspended.is_empty() {
            return None;
        }
        let source = source.to_ascii_lowercase();
        let full = format!("{} via {source}", target.to_string().to_ascii_lowercase());
        let bare = format!("{} via {source}", target.name().to_ascii_lowercase());
        [full, bare]
            .iter()
            .filter_map(|k| suspended.get(k))
            .copied()
            .filter(|&until| until > now)
            .max()
    }

    /// When the suspension of `lane` ends: its destination's, or its
    /// source's to that destination, whichever ends later.
    fn lane_suspended_until(&self, lane: &Lane, now: u64) -> Option<u64> {
        let whole = self.suspended_until(&lane.target, now);
        let via = lane
            .source
            .as_deref()
            .and_then(|s| self.suspended_via(&lane.target, s, now));
        whole.max(via)
    }

    /// Takes the work for messages in `ids` out of this shard's
    /// destination queues (work not yet started): each goes back to its
    /// message (on its origin shard), to be scheduled again as the queue
    /// now says (held, deleted or bounced work is not). Returns how many
    /// work items were withdrawn.
    pub fn withdraw(&self, ids: &HashSet<QueueId>) -> usize {
        let mut taken = Vec::new();
        for q in self.dests.borrow_mut().values_mut() {
            let (out, keep): (VecDeque<Work>, VecDeque<Work>) =
                q.jobs.drain(..).partition(|w| ids.contains(&w.id));
            q.jobs = keep;
            taken.extend(out);
        }
        let n = taken.len();
        for work in taken {
            match work.origin {
                None => {
                    self.release(&work.id, &work.rcpts);
                    self.enqueue(work.id);
                }
                Some(o) => self.send_done(
                    o.peer,
                    Done {
                        id: work.id,
                        rcpts: work.rcpts,
                        report: Report::Returned,
                    },
                ),
            }
        }
        n
    }

    /// The operator bounces recipients `rcpts` (envelope indexes) of
    /// message `id` in this shard's queue: the sender gets one report on
    /// all of them with `reason` as its diagnostic, stored before they
    /// are journaled as bounced (as for any bounce). `false` when the
    /// report could not be stored: nothing changed.
    pub async fn bounce(&self, id: &QueueId, rcpts: &[usize], reason: &str) -> bool {
        let Some(entry) = id.with_str(|id| self.spool.entry(id)) else {
            return true;
        };
        let work = Work {
            id: id.clone(),
            rcpts: rcpts.into(),
            origin: None,
            shaped: None,
            pinned: false,
            source: None,
        };
        let why = format!("550 5.0.0 returned by the mail administrator: {reason}");
        let failed: Vec<(usize, String)> = (0..rcpts.len()).map(|k| (k, why.clone())).collect();
        if !self
            .notify_sender(&work, dsn::Action::Failed, &failed, None)
            .await
        {
            return false;
        }
        let attempt = Attempt::default();
        let log = OutcomeLog::new(&work.id, &attempt, entry.arrival);
        for &rcpt in rcpts {
            let Some((addr, _)) = entry.rcpts.get(rcpt) else {
                continue;
            };
            log.write("bounced", addr, &why, None);
            let op = JournalOp::Bounced {
                id: id.to_string(),
                rcpt,
            };
            if let Err(e) = self.spool.apply(op).await {
                // The report is out: the recipient stays and may be
                // reported again (a duplicate rather than a loss).
                tracing::error!(%id, error = %e, "cannot journal an administrative bounce");
            }
        }
        true
    }

    /// Stops starting new deliveries (those under way finish).
    pub fn stop(&self) {
        self.stopping.set(true);
        self.wake.notify(usize::MAX);
        self.stopped.notify(usize::MAX);
        let h = self.latency.borrow();
        if !h.is_empty() {
            tracing::info!(
                delivered = h.len(),
                p50_ms = h.value_at_quantile(0.5),
                p99_ms = h.value_at_quantile(0.99),
                max_ms = h.max(),
                "delivery latency (accept to delivered)"
            );
        }
    }

    /// Recipients waiting in this shard's queue and the age in seconds of
    /// the oldest, per destination (bounded by
    /// [`crate::metrics::destination_label`]). Walks the whole queue, for
    /// the metrics every few seconds, in slices with a yield between them,
    /// so a large queue does not hold up the shard's connections.
    pub async fn census(&self) -> HashMap<String, (i64, i64)> {
        let now = unix_now();
        let mut labels: HashMap<String, String> = HashMap::new();
        let mut out: HashMap<String, (i64, i64)> = HashMap::new();
        let mut from = Some(0);
        while let Some(at) = from {
            from = self.census_slice(at, now, &mut labels, &mut out);
            glommio::yield_if_needed().await;
        }
        out
    }

    fn census_slice(
        &self,
        from: usize,
        now: u64,
        labels: &mut HashMap<String, String>,
        out: &mut HashMap<String, (i64, i64)>,
    ) -> Option<usize> {
        self.spool
            .for_each_waiting(from, CENSUS_SLICE, |arrival, addr| {
                let domain = addr.rsplit_once('@').map_or(addr, |(_, d)| d);
                let label = match labels.get(domain) {
                    Some(l) => l,
                    None => {
                        let l =
                            crate::metrics::destination_label(&self.cfg().target(addr).to_string());
                        labels.entry(domain.to_owned()).or_insert(l)
                    }
                };
                let age = now.saturating_sub(arrival) as i64;
                match out.get_mut(label.as_str()) {
                    Some(slot) => *slot = (slot.0 + 1, slot.1.max(age)),
                    None => {
                        out.insert(label.clone(), (1, age));
                    }
                }
            })
    }

    /// Joins the handoff mesh (every shard must), then accepts work and
    /// done records from the other shards. Until it is joined, and if it
    /// never is (a shard failed to start, or the stop came first), this
    /// shard delivers everything it takes in itself.
    pub async fn join_mesh(self: Rc<Self>, mesh: Mesh) {
        let joined = crate::util::isolate(async {
            let stopped = async {
                while !self.stopping.get() {
                    let l = self.stopped.listen();
                    if self.stopping.get() {
                        break;
                    }
                    l.await;
                }
                None
            };
            let Some(joined) = async { Some(Link::join(mesh).await) }.or(stopped).await else {
                return;
            };
            let (link, receivers) = match joined {
                Ok(j) => j,
                Err(e) => {
                    tracing::error!(error = %e, "cannot join the handoff mesh; delivering locally");
                    return;
                }
            };
            for (peer, rx) in receivers {
                let me = self.clone();
                let rx = Rc::new(rx);
                let taken = link.clone();
                // Supervised: without it a panic would silently stop work
                // and done records from `peer`.
                glommio::spawn_local(async move {
                    crate::util::supervise("handoff receiver", || {
                        let (me, rx, taken) = (me.clone(), rx.clone(), taken.clone());
                        async move {
                            while let Some(msg) = rx.recv().await {
                                taken.taken_from(peer);
                                me.clone().receive(peer, msg);
                            }
                        }
                    })
                    .await;
                })
                .detach();
            }
            tracing::debug!(
                peer = link.me(),
                peers = link.peers(),
                "handoff mesh joined"
            );
            *self.link.borrow_mut() = Some(link);
        })
        .await;
        if let Err(what) = joined {
            tracing::error!(panic = %what, "joining the handoff mesh panicked; delivering locally");
        }
    }

    fn receive(self: Rc<Self>, from: usize, msg: Msg) {
        match msg {
            Msg::Work(h) => {
                let work = Work {
                    id: h.id,
                    rcpts: h.rcpts,
                    origin: Some(Origin {
                        peer: h.origin,
                        location: h.location,
                    }),
                    shaped: h.shaped,
                    pinned: h.pinned,
                    source: h.source,
                };
                self.queue_work(h.target, work);
            }
            Msg::Done(d) => {
                glommio::spawn_local(async move {
                    let id = d.id.clone();
                    let settled = crate::util::isolate(self.settle(&d.id, &d.rcpts, d.report));
                    if let Err(what) = settled.await {
                        tracing::error!(%id, from, panic = %what, "settling handed-off work panicked");
                    }
                })
                .detach();
            }
        }
    }

    /// The scheduler: runs until [`Relay::stop`].
    pub async fn run(self: Rc<Self>) {
        while !self.stopping.get() {
            let woken = self.wake.listen();
            self.dispatch();
            let next_timer = self.timers.borrow().peek().map(|Reverse((t, _))| *t);
            let wait = match next_timer {
                Some(t) => Duration::from_secs(t.saturating_sub(unix_now())).min(self.cfg().tick),
                None => self.cfg().tick,
            };
            if self.ready.borrow().is_empty() {
                woken.or(glommio::timer::sleep(wait)).await;
            } else {
                glommio::yield_if_needed().await;
            }
        }
    }

    fn dispatch(self: &Rc<Self>) {
        let now = unix_now();
        {
            let mut timers = self.timers.borrow_mut();
            while timers.peek().is_some_and(|Reverse((t, _))| *t <= now) {
                if let Some(Reverse((_, id))) = timers.pop() {
                    self.ready.borrow_mut().push_back(id);
                }
            }
        }
        // Bounded work per pass so intake on this shard keeps its latency.
        for _ in 0..1024 {
            let Some(id) = self.ready.borrow_mut().pop_front() else {
                break;
            };
            let Some(entry) = id.with_str(|id| self.spool.entry(id)) else {
                continue;
            };
            if entry.held {
                continue;
            }
            let mut by_target: HashMap<(Target, Option<Box<str>>), Vec<usize>> = HashMap::new();
            let cfg = self.cfg();
            // Recipients deferred to later than now still need a wake-up
            // of their own: nothing else would bring the message back
            // once the due ones are settled (regression test:
            // handed_off_work_is_redone_after_kill_9).
            let mut later: Option<u64> = None;
            {
                let in_flight = self.in_flight.borrow();
                for (i, (addr, state)) in entry.rcpts.iter().enumerate() {
                    let due = match state {
                        RcptState::Pending => true,
                        RcptState::Deferred { until } if *until > now => {
                            later = Some(later.map_or(*until, |l| l.min(*until)));
                            false
                        }
                        RcptState::Deferred { .. } => true,
                        RcptState::Delivered | RcptState::Bounced => false,
                    };
                    if due && !in_flight.contains(&(id.clone(), i)) {
                        let target = cfg.target(addr);
                        // A suspended destination: the message comes back
                        // when the suspension ends (or at a resume).
                        if let Some(until) = self.suspended_until(&target, now) {
                            later = Some(later.map_or(until, |l| l.min(until)));
                            continue;
                        }
                        let shaped = shaped_domain(&cfg, &target, addr);
                        by_target.entry((target, shaped)).or_default().push(i);
                    }
                }
            }
            if let Some(t) = later {
                self.timers.borrow_mut().push(Reverse((t, id.clone())));
            }
            for ((target, shaped), rcpts) in by_target {
                // The source-IP pool's choice, among the sources not
                // suspended for this destination.
                let pool = match target {
                    Target::Maildir(_) => None,
                    _ => cfg.shaping.pool_for(
                        entry.pool.as_deref(),
                        entry.mail_from.as_deref(),
                        target.name(),
                    ),
                };
                let source: Option<Arc<str>> = match pool {
                    None => None,
                    Some(pool) => {
                        let seed = id.with_str(super::shaping::spread);
                        let usable = |s: &str| self.suspended_via(&target, s, now).is_none();
                        match pool.pick(seed, usable) {
                            Some(s) => Some(s.clone()),
                            None => {
                                // Every source of the pool is suspended
                                // here: back when the first one ends.
                                let first = pool
                                    .sources
                                    .iter()
                                    .filter_map(|(s, _)| self.suspended_via(&target, s, now))
                                    .min();
                                if let Some(until) = first {
                                    self.timers.borrow_mut().push(Reverse((until, id.clone())));
                                }
                                continue;
                            }
                        }
                    }
                };
                {
                    let mut f = self.in_flight.borrow_mut();
                    for &i in &rcpts {
                        f.insert((id.clone(), i));
                    }
                }
                let work = Work {
                    id: id.clone(),
                    rcpts: rcpts.into(),
                    origin: None,
                    shaped,
                    pinned: false,
                    source,
                };
                if let Some(work) = self.hand_off(&target, &entry.location, work) {
                    self.queue_work(target, work);
                }
            }
        }
        let mut ready = self.ready.borrow_mut();
        let len = ready.len();
        if sparse(len, ready.capacity()) {
            ready.shrink_to(len * 2);
        }
    }

    /// Sends `work` to the shard that owns `target`; gives it back when it
    /// is to be delivered here (this shard owns it, no mesh, or the
    /// owner's channel is full).
    fn hand_off(&self, target: &Target, location: &Location, work: Work) -> Option<Work> {
        let link = self.link.borrow();
        // Before the mesh is joined (or with one shard) everything is
        // delivered here: `?` would drop the work (regression test:
        // handed_off_work_is_redone_after_kill_9).
        let Some(link) = link.as_ref() else {
            return Some(work);
        };
        let Some(owner) = handoff::owner(target, link.peers()) else {
            return Some(work);
        };
        if owner == link.me() {
            return Some(work);
        }
        let h = Handoff {
            origin: link.me(),
            id: work.id.clone(),
            location: location.clone(),
            rcpts: work.rcpts.clone(),
            target: target.clone(),
            shaped: work.shaped.clone(),
            pinned: false,
            source: work.source.clone(),
        };
        let handed = link.try_hand(owner, h);
        self.metrics.handoff(handed);
        if handed {
            tracing::debug!(id = %work.id, %target, owner, "handed off");
            None
        } else {
            tracing::debug!(id = %work.id, %target, owner, "handoff channel full; delivering from here");
            Some(work)
        }
    }

    /// Queues work for `target` (from its source) here, starting a
    /// worker if there is room.
    fn queue_work(self: &Rc<Self>, target: Target, work: Work) {
        let lane = Lane {
            target,
            source: work.source.clone(),
        };
        if work.origin.is_some() && self.lane_suspended_until(&lane, unix_now()).is_some() {
            return self.give_back(&lane, work);
        }
        let target = &lane.target;
        let spawn = {
            let mut dests = self.dests.borrow_mut();
            let q = dests.entry(lane.clone()).or_default();
            let cfg = self.cfg();
            let limit = match target {
                Target::Maildir(_) => cfg.maildir_concurrency,
                Target::Smtp { .. } | Target::Mx { .. } => {
                    // A domain entry's connection limit is known before
                    // any lookup: no more workers than it allows.
                    let domain = match target {
                        Target::Mx { domain, .. } => Some(domain.as_str()),
                        _ => work.shaped.as_deref(),
                    };
                    let cap = domain
                        .and_then(|d| cfg.shaping.domains.get(d))
                        .and_then(|l| l.max_connections);
                    cap.map_or(cfg.max_conns_per_dest, |c| c.min(cfg.max_conns_per_dest))
                }
            };
            q.jobs.push_back(work);
            if q.idle > 0 {
                q.arrived.notify(1);
                return;
            }
            let spawn = q.workers < limit.max(1);
            if spawn {
                q.workers += 1;
            }
            spawn
        };
        if spawn {
            let me = self.clone();
            glommio::spawn_local(async move {
                let l = lane.clone();
                let held = Held::default();
                if let Err(what) = crate::util::isolate(me.clone().worker(l, &held)).await {
                    tracing::error!(target = %lane, panic = %what, "delivery worker panicked");
                    // Its work would stay in flight (never scheduled again)
                    // until a restart.
                    if let Some(work) = held.0.take() {
                        me.retry_after_panic(work);
                    }
                }
                me.worker_done(&lane);
            })
            .detach();
        }
    }

    /// The next work for `target`, noted in `held` until it is reported.
    fn take_work(&self, target: &Lane, held: &Held) -> Option<Work> {
        let work = self.next_work(target)?;
        *held.0.borrow_mut() = Some(work.key());
        Some(work)
    }

    /// [`Relay::report`], for a worker: the work is no longer held once
    /// the report is made (settled, when the message is in this spool).
    async fn finish(&self, held: &Held, work: &Work, report: Report) {
        self.report(work, report).await;
        held.0.borrow_mut().take();
    }

    /// [`Relay::finish`] without waiting for it: the worker goes on to its
    /// next message while the outcome is journaled (an fdatasync, shared
    /// with the other outcomes of that moment). The recipients stay in
    /// flight until it is settled, so nothing is scheduled twice; if
    /// settling panics, the work is retried later, as a worker's would be.
    fn finish_soon(self: &Rc<Self>, held: &Held, work: Work, report: Report) {
        held.0.borrow_mut().take();
        let me = self.clone();
        glommio::spawn_local(async move {
            let key = work.key();
            if let Err(what) = crate::util::isolate(me.report(&work, report)).await {
                tracing::error!(id = %key.id, panic = %what, "settling a delivery panicked");
                me.retry_after_panic(key);
            }
        })
        .detach();
    }

    /// A worker panicked holding `work`: it leaves `in_flight` and is tried
    /// again after the first retry delay (not at once: the same message
    /// may well make the worker panic again).
    fn retry_after_panic(&self, work: Work) {
        match work.origin {
            None => self.retry_later(&work.id, &work.rcpts),
            Some(o) => self.send_done(
                o.peer,
                Done {
                    id: work.id,
                    rcpts: work.rcpts,
                    report: Report::Crashed,
                },
            ),
        }
    }

    /// Releases the recipients and schedules the message after the first
    /// retry delay, without journaling anything.
    fn retry_later(&self, id: &QueueId, rcpts: &[usize]) {
        self.release(id, rcpts);
        let delay = self
            .cfg()
            .retry_schedule
            .first()
            .map_or(PANIC_RETRY, |d| d.as_secs().max(1));
        let at = unix_now() + delay;
        self.timers.borrow_mut().push(Reverse((at, id.clone())));
        self.wake.notify(1);
    }

    /// The next work queued for `target`; none while it is suspended (the
    /// worker then ends and the queued work goes back, see
    /// [`Relay::worker_done`]). Work of a message of this shard that was
    /// held or left the queue since it was queued is dropped here.
    fn next_work(&self, target: &Lane) -> Option<Work> {
        if self.lane_suspended_until(target, unix_now()).is_some() {
            return None;
        }
        loop {
            let work = {
                let mut dests = self.dests.borrow_mut();
                let q = dests.get_mut(target)?;
                let work = q.jobs.pop_front();
                if sparse(q.jobs.len(), q.jobs.capacity()) {
                    q.jobs.shrink_to(q.jobs.len() * 2);
                }
                work?
            };
            let stale =
                work.origin.is_none() && work.id.with_str(|id| self.spool.held(id)) != Some(false);
            if !stale {
                return Some(work);
            }
            // Released later, it is enqueued again then.
            self.release(&work.id, &work.rcpts);
        }
    }

    fn worker_done(self: &Rc<Self>, target: &Lane) {
        let mut dests = self.dests.borrow_mut();
        if let Some(q) = dests.get_mut(target) {
            q.workers -= 1;
            if q.workers == 0 && q.jobs.is_empty() {
                dests.remove(target);
            } else if q.workers == 0 {
                // Work arrived as the last worker was leaving.
                drop(dests);
                let left: Vec<Work> = self
                    .dests
                    .borrow_mut()
                    .remove(target)
                    .map(|q| q.jobs.into_iter().collect())
                    .unwrap_or_default();
                for work in left {
                    self.give_back(target, work);
                }
            }
        }
    }

    /// Work not attempted goes back to its message: scheduled again (on
    /// its origin), or, while `target` is suspended, at the suspension's
    /// end (the origin learns of the suspension).
    fn give_back(&self, target: &Lane, work: Work) {
        match work.origin {
            None => {
                self.release(&work.id, &work.rcpts);
                self.enqueue(work.id);
            }
            Some(o) => {
                // Named as the suspension that applies: the destination's
                // (the origin then waits), or its source's (the origin
                // picks another source at once).
                let now = unix_now();
                let report = match (
                    self.suspended_until(&target.target, now),
                    self.lane_suspended_until(target, now),
                ) {
                    (Some(until), _) => {
                        let destination = target.target.to_string().to_ascii_lowercase();
                        let automatic = self.automatic.borrow().contains_key(&destination);
                        Report::Suspended {
                            destination,
                            until,
                            automatic,
                        }
                    }
                    (None, Some(until)) => {
                        let destination = target.to_string().to_ascii_lowercase();
                        let automatic = self.automatic.borrow().contains_key(&destination);
                        Report::Suspended {
                            destination,
                            until,
                            automatic,
                        }
                    }
                    (None, None) => Report::Returned,
                };
                self.send_done(
                    o.peer,
                    Done {
                        id: work.id,
                        rcpts: work.rcpts,
                        report,
                    },
                )
            }
        }
    }

    /// Suspends `destination` until `until` unless it already is for
    /// longer (automatic backoff: never shortens an operator's suspension).
    fn suspend_at_least(&self, destination: &str, until: u64) {
        let mut s = self.suspended.borrow_mut();
        let slot = s.entry(destination.to_ascii_lowercase()).or_insert(until);
        *slot = (*slot).max(until);
    }

    /// Applies what the reply classes of one delivery's `outcomes` ask: a
    /// rule's `bounce` makes a deferral a bounce; a `suspend` suspends
    /// `target` (logged as a `suspended` event). Returns whether it did.
    fn act_on_classes(self: &Rc<Self>, target: &Lane, outcomes: &mut [RcptOutcome]) -> bool {
        let classifier: Arc<Classifier> = self.cfg().classifier.clone();
        let mut suspend: Option<(Duration, &'static str, String)> = None;
        for o in outcomes.iter_mut() {
            let reply = match o {
                RcptOutcome::Deferred(r) | RcptOutcome::Failed(r) => r,
                RcptOutcome::Delivered(_) => continue,
            };
            let (class, action) = classifier.classify(reply);
            self.metrics.reply_class(class.name());
            match action {
                Action::Bounce => {
                    if let RcptOutcome::Deferred(r) = o {
                        *o = RcptOutcome::Failed(std::mem::take(r));
                    }
                }
                Action::Suspend(d) if suspend.as_ref().is_none_or(|s| s.0 < d) => {
                    suspend = Some((d, class.name(), reply.clone()));
                }
                Action::Suspend(_) | Action::AsCoded => {}
            }
        }
        let Some((d, class, reply)) = suspend else {
            return false;
        };
        let until = unix_now() + d.as_secs().max(1);
        let key = target.to_string().to_ascii_lowercase();
        self.suspend_at_least(&key, until);
        {
            let mut auto = self.automatic.borrow_mut();
            let slot = auto.entry(key).or_insert(until);
            *slot = (*slot).max(until);
        }
        self.persist_automatic();
        tracing::info!(
            target: "ringmta::event",
            event = "suspended",
            destination = %target.target,
            source = target.source.as_deref(),
            until,
            class,
            reply = %reply,
            "suspended"
        );
        true
    }

    /// The recipients are no longer being delivered.
    fn release(&self, id: &QueueId, rcpts: &[usize]) {
        let mut f = self.in_flight.borrow_mut();
        for &i in rcpts {
            f.remove(&(id.clone(), i));
        }
        let len = f.len();
        if sparse(len, f.capacity()) {
            f.shrink_to(len * 2);
        }
    }

    fn send_done(&self, peer: usize, done: Done) {
        match self.link.borrow().as_ref() {
            Some(link) => link.send_done(peer, done),
            // invariant: handed-off work only arrives over a joined link.
            None => tracing::error!(id = %done.id, "no handoff link for a done record"),
        }
    }

    /// Ends `work` here: settled at once when the message is in this
    /// shard's spool, else reported back to its origin.
    async fn report(&self, work: &Work, report: Report) {
        match &work.origin {
            None => self.settle(&work.id, &work.rcpts, report).await,
            Some(o) => self.send_done(
                o.peer,
                Done {
                    id: work.id.clone(),
                    rcpts: work.rcpts.clone(),
                    report,
                },
            ),
        }
    }

    /// On the origin: journals what became of the work.
    async fn settle(&self, id: &QueueId, rcpts: &[usize], report: Report) {
        match report {
            Report::Outcomes {
                outcomes,
                remote,
                attempt,
            } => {
                self.apply_outcomes(id, rcpts, outcomes, remote.as_deref(), &attempt)
                    .await
            }
            Report::Returned => {
                self.release(id, rcpts);
                self.enqueue(id.clone());
            }
            Report::Crashed => self.retry_later(id, rcpts),
            Report::Suspended {
                destination,
                until,
                automatic,
            } => {
                if automatic {
                    self.suspend_at_least(&destination, until);
                }
                self.release(id, rcpts);
                // As this shard sees the destination now (an operator's
                // resume may have reached it before the owner).
                let now = unix_now();
                let entry = id.with_str(|i| self.spool.entry(i));
                let target = entry.as_ref().and_then(|e| {
                    let (addr, _) = e.rcpts.get(*rcpts.first()?)?;
                    Some(self.cfg().target(addr))
                });
                let whole = target.and_then(|t| self.suspended_until(&t, now));
                let per_source = super::control::split_suspension_key(&destination)
                    .1
                    .is_some();
                match whole {
                    Some(until) => self.timers.borrow_mut().push(Reverse((until, id.clone()))),
                    // One source is suspended: scheduled again now, the
                    // pool's choice then skips it (or, when all of the
                    // pool's sources are, waits for the first to end).
                    None if per_source => self.enqueue(id.clone()),
                    // Lifted here, not yet on the owner: soon again.
                    None => self
                        .timers
                        .borrow_mut()
                        .push(Reverse((now + 1, id.clone()))),
                }
            }
            Report::Unreadable => {
                self.release(id, rcpts);
                if id.with_str(|id| self.spool.entry(id)).is_some() {
                    let at = unix_now() + UNREADABLE_RETRY;
                    self.timers.borrow_mut().push(Reverse((at, id.clone())));
                }
            }
        }
    }

    async fn worker(self: Rc<Self>, target: Lane, held: &Held) {
        match &target.target {
            Target::Maildir(root) => {
                while let Some(work) = self.take_work(&target, held) {
                    self.deliver_local(root, work, held).await;
                }
            }
            Target::Smtp { .. } | Target::Mx { .. } => self.smtp_worker(&target, held).await,
        }
    }

    async fn deliver_local(self: &Rc<Self>, root: &std::path::Path, work: Work, held: &Held) {
        let taken = Instant::now();
        let Some(loaded) = self.load(&work).await else {
            return self.finish(held, &work, Report::Unreadable).await;
        };
        #[cfg(debug_assertions)]
        test_hooks::maybe_panic(&loaded);
        let id = work.id.to_string();
        let mut outcomes = Vec::with_capacity(loaded.job.rcpts.len());
        let cfg = self.cfg();
        let first_local = cfg.local_domains.first().map(String::as_str);
        for (k, r) in loaded.job.rcpts.iter().enumerate() {
            // A bare <postmaster> queued before the session qualified it.
            let addr = policy::recipient::qualify_postmaster(&r.addr, first_local);
            let o = match maildir::mailbox_dir(root, &addr) {
                Err(e) => RcptOutcome::Failed(format!("550 5.1.1 <{}>: {e}", r.addr)),
                Ok(dir) => {
                    let name =
                        maildir::unique_name(&id, work.rcpts[k], loaded.arrival, &self.hostname);
                    let delivered = self.maildir.deliver(
                        &dir,
                        loaded.job.mail_from.as_deref(),
                        &addr,
                        &loaded.job.body,
                        &name,
                    );
                    match delivered.await {
                        Ok(_) => RcptOutcome::Delivered(super::client::Reply {
                            code: 250,
                            lines: vec![format!("2.0.0 delivered to maildir {}", dir.display())],
                        }),
                        Err(e) => {
                            RcptOutcome::Deferred(format!("451 4.3.0 maildir write failed: {e}"))
                        }
                    }
                }
            };
            outcomes.push(o);
        }
        self.observe(&loaded, &outcomes);
        let report = Report::Outcomes {
            outcomes,
            remote: None,
            attempt: Attempt {
                relay: Some("maildir".into()),
                source: None,
                delays: [queued_ms(&loaded), 0, 0, ms(taken.elapsed())],
                tls: None,
                retry: None,
            },
        };
        self.finish_soon(held, work, report);
    }

    async fn smtp_worker(self: &Rc<Self>, lane: &Lane, held: &Held) {
        let target = &lane.target;
        'connections: while let Some(first) = self.take_work(lane, held) {
            // The source as the shaping file defines it now; one a reload
            // removed sends its work back to be given another.
            let source = match lane.source.as_deref() {
                None => None,
                Some(name) => match self.cfg().shaping.sources.get(name) {
                    Some(s) => Some(s.clone()),
                    None => {
                        held.0.borrow_mut().take();
                        self.give_back(lane, first);
                        continue;
                    }
                },
            };
            let taken = Instant::now();
            let hosts = match target {
                Target::Smtp { host, .. } => self.resolver.host(host).await,
                Target::Mx { domain, .. } => self.resolver.resolve(domain).await,
                Target::Maildir(_) => return,
            };
            let port = match target {
                Target::Smtp { port, .. } | Target::Mx { port, .. } => *port,
                Target::Maildir(_) => return,
            };
            let resolved = Instant::now();
            let resolving = ms(resolved - taken);
            let hosts = match hosts {
                Resolution::Hosts(h) => h,
                Resolution::Permanent(why) => {
                    let why = format!("550 5.1.2 {why}");
                    self.fail_work(first, &why, true, [resolving, 0], held)
                        .await;
                    continue;
                }
                Resolution::Temporary(why) => {
                    let why = format!("451 4.4.3 {why}");
                    self.fail_work(first, &why, false, [resolving, 0], held)
                        .await;
                    continue;
                }
            };
            let shape = self.shape_of(target, &first, &hosts);
            // A provider's budget is kept by one shard: its work goes there.
            let Some(first) = self.to_provider_home(target, &shape, first, held) else {
                continue;
            };
            let via = lane.source.as_deref();
            // Counted against the budget until the connection is closed.
            let _slot = self.connection_slot(&shape, via).await;
            // DANE applies only to MX hosts named by a secure MX RRset.
            let policy = shape.tls_policy.unwrap_or(self.cfg().tls_policy);
            let dane_wanted =
                policy == TlsPolicy::Dane || (self.cfg().dane && policy != TlsPolicy::None);
            let dane_ok = match target {
                _ if !dane_wanted => false,
                Target::Mx { domain, .. } => {
                    let mx = self
                        .resolver
                        .secure(domain, hickory_proto::rr::RecordType::MX)
                        .await;
                    match dane::is_secure(&mx) {
                        Ok(secure) => secure,
                        Err(why) => {
                            let why = format!("451 4.4.3 DNSSEC MX lookup failed: {why}");
                            let trying = ms(resolved.elapsed());
                            self.fail_work(first, &why, false, [resolving, trying], held)
                                .await;
                            continue;
                        }
                    }
                }
                // The operator named the host (route, relay host).
                Target::Smtp { .. } => true,
                Target::Maildir(_) => false,
            };
            // MTA-STS (RFC 8461) for MX destinations whose TLS is not off.
            let sts = match target {
                Target::Mx { domain, .. } if self.cfg().mta_sts && policy != TlsPolicy::None => {
                    self.resolver
                        .mta_sts(domain)
                        .await
                        .filter(|p| p.mode != Mode::None)
                }
                _ => None,
            };
            let hosts = match (&sts, target) {
                (Some(p), Target::Mx { domain, .. }) => {
                    let (named, others): (Vec<_>, Vec<_>) =
                        hosts.into_iter().partition(|(n, _)| p.matches(n));
                    for (n, _) in others.iter().take(8) {
                        tracing::warn!(%domain, mx = %n, mode = p.mode.name(), "MTA-STS: the policy does not name this MX host");
                    }
                    match p.mode {
                        Mode::Enforce if named.is_empty() => {
                            self.metrics.outbound_tls("failed");
                            let why = format!(
                                "451 4.7.5 MTA-STS: no MX host of {domain} matches its policy"
                            );
                            let trying = ms(resolved.elapsed());
                            self.fail_work(first, &why, false, [resolving, trying], held)
                                .await;
                            continue;
                        }
                        // RFC 8461 4.2: hosts the policy does not name are
                        // not used.
                        Mode::Enforce => named,
                        _ => {
                            if !others.is_empty() {
                                self.metrics.outbound_tls("mta-sts-testing-failed");
                            }
                            named.into_iter().chain(others).collect()
                        }
                    }
                }
                _ => hosts,
            };
            // Try each host in order until one greets us (RFC 5321 5.1).
            let mut last_error = HostError::new("4.4.1", "no host to try".into());
            for (name, ip) in &hosts {
                let opening = Instant::now();
                self.pace(&shape, via, |b| &b.connections, shape.max_connection_rate)
                    .await;
                let opened = self
                    .open(
                        Hop {
                            name,
                            ip: *ip,
                            port,
                            source: source.as_ref(),
                        },
                        policy,
                        dane_ok,
                        sts.as_deref(),
                    )
                    .await;
                let (mut conn, mut client, secured) = match opened {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::debug!(target = %lane, error = %e.text, "host failed");
                        last_error = e;
                        continue;
                    }
                };
                let relay = format!("{name}[{ip}]:{port}");
                // The first message pays for finding and opening the
                // connection; the next ones on it for nothing but their own.
                let mut setup = [resolving, ms(opening.elapsed())];
                let mut sent = 0u32;
                let per_connection = shape.max_deliveries_per_connection.unwrap_or(u32::MAX);
                // Connected and greeted: carry as many messages as are queued.
                let mut work = Some(first);
                while let Some(w) = work.take() {
                    let Some(mut loaded) = self.load(&w).await else {
                        self.finish(held, &w, Report::Unreadable).await;
                        work = self.take_work(lane, held);
                        continue;
                    };
                    if let Some(reason) = self.too_many_hops(&loaded) {
                        let outcomes = loaded
                            .job
                            .rcpts
                            .iter()
                            .map(|_| RcptOutcome::Failed(reason.clone()))
                            .collect();
                        let report = Report::Outcomes {
                            outcomes,
                            remote: None,
                            attempt: Attempt::default(),
                        };
                        self.finish(held, &w, report).await;
                        work = self.take_work(lane, held);
                        continue;
                    }
                    #[cfg(debug_assertions)]
                    test_hooks::maybe_panic(&loaded);
                    // Routed mail of another shaped domain on this
                    // connection is paced by its own domain's budget.
                    if w.shaped == first_shaped(&shape) {
                        self.pace(&shape, via, |b| &b.messages, shape.max_message_rate)
                            .await;
                    } else {
                        let own = self.shape_of(target, &w, &hosts);
                        self.pace(&own, via, |b| &b.messages, own.max_message_rate)
                            .await;
                    }
                    let n = loaded.job.rcpts.len();
                    let sending = Instant::now();
                    // The job goes to the client; what stays is the
                    // envelope's timing (no copy of the content).
                    let job = std::mem::take(&mut loaded.job);
                    let outcomes = match conn.send(&mut client, job).await {
                        Ok(o) => o,
                        Err(e) => (0..n)
                            .map(|_| RcptOutcome::Deferred(format!("451 4.4.2 {name}[{ip}]: {e}")))
                            .collect(),
                    };
                    sent += 1;
                    let mut outcomes = outcomes;
                    let suspended = self.act_on_classes(lane, &mut outcomes);
                    let broken = client.is_closed() || suspended;
                    self.observe(&loaded, &outcomes);
                    let [b, c] = std::mem::take(&mut setup);
                    let report = Report::Outcomes {
                        outcomes,
                        remote: Some(name.clone()),
                        attempt: Attempt {
                            relay: Some(relay.clone()),
                            source: lane.source.clone(),
                            delays: [queued_ms(&loaded), b, c, ms(sending.elapsed())],
                            tls: Some(secured),
                            retry: shape.retry.clone(),
                        },
                    };
                    self.finish_soon(held, w, report);
                    if broken || self.stopping.get() {
                        continue 'connections;
                    }
                    if sent >= per_connection {
                        break;
                    }
                    work = match self.take_work(lane, held) {
                        Some(w) => Some(w),
                        None => self.wait_for_work(lane, held, shape.idle_timeout).await,
                    };
                }
                client.quit();
                let _ = conn.until_closed(&mut client).await;
                continue 'connections;
            }
            // Every host failed.
            let reply = format!("451 {} {}", last_error.status, last_error.text);
            let trying = ms(resolved.elapsed());
            self.fail_work(first, &reply, false, [resolving, trying], held)
                .await;
        }
    }

    /// The shaping limits for `work` to `target` (whose MX hosts, for an
    /// MX target, are `hosts`).
    fn shape_of(&self, target: &Target, work: &Work, hosts: &[(String, IpAddr)]) -> Shape {
        let cfg = self.cfg();
        let (domain, mx) = match target {
            Target::Mx { domain, .. } => (Some(domain.as_str()), hosts),
            _ => (work.shaped.as_deref(), &[][..]),
        };
        cfg.shaping.shape(
            domain,
            &target.to_string(),
            mx.iter().map(|(n, _)| n.as_str()),
        )
    }

    /// The budget for `key` on this shard (created on first use; the
    /// unused ones are forgotten once there are many).
    fn budget(&self, key: &Key, source: Option<&str>) -> Rc<Budget> {
        let mut budgets = self.budgets.borrow_mut();
        let key = (key.clone(), source.map(Box::from));
        if let Some(b) = budgets.get(&key) {
            return b.clone();
        }
        if budgets.len() >= BUDGETS_KEPT {
            let now = Instant::now();
            budgets.retain(|_, b| {
                Rc::strong_count(b) > 1
                    || !b.messages.borrow().is_idle(now)
                    || !b.connections.borrow().is_idle(now)
            });
        }
        budgets.entry(key).or_default().clone()
    }

    /// Waits until `shape`'s budget (of `source`: receivers count per
    /// sending address) has room for one more connection and counts it
    /// until the [`Slot`] is dropped.
    async fn connection_slot(&self, shape: &Shape, source: Option<&str>) -> Slot {
        let budget = self.budget(&shape.key, source);
        if let Some(max) = shape.max_connections {
            while budget.open.get() >= max.max(1) && !self.stopping.get() {
                let freed = budget.freed.listen();
                if budget.open.get() < max.max(1) {
                    break;
                }
                freed.or(glommio::timer::sleep(SLOT_RECHECK)).await;
            }
        }
        budget.open.set(budget.open.get() + 1);
        Slot(budget)
    }

    /// Waits for the next event `rate` allows on `shape`'s pacer `which`
    /// (a timer, no polling).
    async fn pace(
        &self,
        shape: &Shape,
        source: Option<&str>,
        which: fn(&Budget) -> &RefCell<Pacer>,
        rate: Option<super::shaping::Rate>,
    ) {
        let Some(rate) = rate else {
            return;
        };
        let budget = self.budget(&shape.key, source);
        let wait = which(&budget).borrow_mut().reserve(Instant::now(), rate, 1);
        if !wait.is_zero() {
            glommio::timer::sleep(wait).await;
        }
    }

    /// Keeps the connection for `target` open up to `idle` for more work.
    async fn wait_for_work(&self, target: &Lane, held: &Held, idle: Duration) -> Option<Work> {
        if idle.is_zero() {
            return None;
        }
        let deadline = Instant::now() + idle;
        loop {
            let arrived = {
                let mut dests = self.dests.borrow_mut();
                let q = dests.get_mut(target)?;
                q.idle += 1;
                q.arrived.listen()
            };
            let work = self.take_work(target, held);
            let left = deadline.saturating_duration_since(Instant::now());
            if work.is_none() && !left.is_zero() && !self.stopping.get() {
                arrived.or(glommio::timer::sleep(left)).await;
            }
            if let Some(q) = self.dests.borrow_mut().get_mut(target) {
                q.idle = q.idle.saturating_sub(1);
            }
            if work.is_some() {
                return work;
            }
            if let Some(w) = self.take_work(target, held) {
                return Some(w);
            }
            if Instant::now() >= deadline || self.stopping.get() {
                return None;
            }
        }
    }

    /// Hands `work` to the shard that keeps its provider's budget (MX
    /// rollup: every domain of a provider is paced by one shard); gives it
    /// back when it is to be delivered here (no provider, this shard keeps
    /// it, it was handed here for it already, or that shard's channel is
    /// full).
    fn to_provider_home(
        &self,
        target: &Target,
        shape: &Shape,
        work: Work,
        held: &Held,
    ) -> Option<Work> {
        let Key::Provider(name) = &shape.key else {
            return Some(work);
        };
        if work.pinned {
            return Some(work);
        }
        let link = self.link.borrow();
        let Some(link) = link.as_ref() else {
            return Some(work);
        };
        let home = handoff::owner_of(name, link.peers())?;
        if home == link.me() {
            return Some(work);
        }
        let (origin, location) = match &work.origin {
            Some(o) => (o.peer, o.location.clone()),
            None => match work.id.with_str(|id| self.spool.entry(id)) {
                Some(e) => (link.me(), e.location.clone()),
                None => return Some(work),
            },
        };
        let h = Handoff {
            origin,
            id: work.id.clone(),
            location,
            rcpts: work.rcpts.clone(),
            target: target.clone(),
            shaped: work.shaped.clone(),
            pinned: true,
            source: work.source.clone(),
        };
        if link.try_hand(home, h) {
            tracing::debug!(id = %work.id, %target, provider = %name, home, "handed to the provider's shard");
            held.0.borrow_mut().take();
            None
        } else {
            Some(work)
        }
    }

    /// Connects to one host and greets it, with STARTTLS as `policy` (the
    /// destination's or `--tls-policy`) says, after DANE when `dane_ok`
    /// (the host's name is DNSSEC-secure) and DANE is wanted: usable TLSA
    /// records leave no other choice than TLS with a matching certificate.
    /// Then MTA-STS: `enforce` needs TLS with a certificate that verifies
    /// for the host; `testing` connects as `policy` says and reports what
    /// enforcement would have refused. Under `opportunistic`, a failed
    /// handshake (after which the connection is unusable) is followed by a
    /// plaintext connection.
    async fn open(
        &self,
        hop: Hop<'_>,
        policy: TlsPolicy,
        dane_ok: bool,
        sts: Option<&mta_sts::Policy>,
    ) -> Result<(Conn, Client, Security), HostError> {
        let Hop { name, ip, port, .. } = hop;
        let cfg = self.cfg();
        let dane_wanted = policy == TlsPolicy::Dane || (cfg.dane && policy != TlsPolicy::None);
        // An address literal (a route to [192.0.2.1]) has no TLSA records.
        let named = name.trim_matches(['[', ']']).parse::<IpAddr>().is_err();
        if dane_ok && dane_wanted && named {
            use hickory_proto::rr::RecordType;
            // RFC 7672 2.2.2: only a host whose addresses are secure.
            let rtype = if ip.is_ipv4() {
                RecordType::A
            } else {
                RecordType::AAAA
            };
            let addresses = self.resolver.secure(name, rtype).await;
            let dane = match dane::is_secure(&addresses) {
                Ok(true) => {
                    let tlsa = self
                        .resolver
                        .secure(&dane::tlsa_name(name, port), RecordType::TLSA)
                        .await;
                    dane::of_tlsa(tlsa)
                }
                Ok(false) => Dane::None,
                Err(why) => Dane::Failed(format!("DNSSEC address lookup: {why}")),
            };
            match dane {
                Dane::Records(records) => {
                    let connector = tls::dane_connector(records);
                    return self
                        .open_with(hop, StartTls::Required, &connector, Security::Dane)
                        .await;
                }
                // RFC 7672 3.1.3: TLS is mandatory, unauthenticated.
                Dane::Unusable => {
                    return self
                        .open_with(hop, StartTls::Required, &self.tls_any, Security::Tls)
                        .await;
                }
                // RFC 7672 2.2.3: a failed TLSA lookup makes the host unusable.
                Dane::Failed(why) => {
                    return Err(HostError::new(
                        "4.7.5",
                        format!("{name}[{ip}]:{port}: TLSA lookup failed, host not used: {why}"),
                    ));
                }
                Dane::None => {}
            }
        }
        let mut testing = None;
        match sts.map(|p| p.mode) {
            Some(Mode::Enforce) => {
                return self
                    .open_with(
                        hop,
                        StartTls::Required,
                        &self.tls_verified,
                        Security::MtaSts,
                    )
                    .await;
            }
            Some(Mode::Testing) => testing = Some(tls::reporting_connector(self.roots.clone())),
            Some(Mode::None) | None => {}
        }
        let (mode, connector, secured) = match policy {
            TlsPolicy::None => (StartTls::Off, &self.tls_any, Security::Plain),
            TlsPolicy::Opportunistic | TlsPolicy::Dane => {
                (StartTls::Opportunistic, &self.tls_any, Security::Tls)
            }
            TlsPolicy::Require if cfg.tls_verify => {
                (StartTls::Required, &self.tls_verified, Security::Verified)
            }
            TlsPolicy::Require => (StartTls::Required, &self.tls_any, Security::Tls),
            TlsPolicy::Verify => (StartTls::Required, &self.tls_verified, Security::Verified),
        };
        // MTA-STS testing: the unverified connector gives way to one that
        // verifies, reports and goes on.
        let connector = match &testing {
            Some((reporting, _)) if std::ptr::eq(connector, &self.tls_any) => reporting,
            _ => connector,
        };
        let opened = match self.open_with(hop, mode, connector, secured).await {
            Err(e) if e.handshake && mode == StartTls::Opportunistic => {
                tracing::info!(error = %e.text, "TLS handshake failed; trying again without TLS");
                self.open_with(hop, StartTls::Off, connector, secured).await
            }
            other => other,
        };
        if let (Some((_, failure)), Ok((_, _, security))) = (&testing, &opened) {
            let failure = failure.lock().unwrap_or_else(|p| p.into_inner()).take();
            let why = match (security, failure) {
                (Security::Plain, _) => Some("no TLS".to_owned()),
                (_, Some(f)) => Some(f),
                _ => None,
            };
            if let Some(why) = why {
                self.metrics.outbound_tls("mta-sts-testing-failed");
                tracing::warn!(host = %format!("{name}[{ip}]:{port}"), reason = %why, "MTA-STS testing: enforce would refuse this connection; delivering anyway");
            }
        }
        opened
    }

    /// One connection to one host: `secured` is what a completed
    /// handshake with `connector` proves (plaintext proves nothing).
    async fn open_with(
        &self,
        hop: Hop<'_>,
        mode: StartTls,
        connector: &TlsConnector,
        secured: Security,
    ) -> Result<(Conn, Client, Security), HostError> {
        let Hop {
            name,
            ip,
            port,
            source,
        } = hop;
        let at = match source {
            None => format!("{name}[{ip}]:{port}"),
            Some(s) => format!("{name}[{ip}]:{port} from {}", s.bind),
        };
        let addr = SocketAddr::new(ip, port);
        let cfg = self.cfg();
        let bind = source.map(|s| s.bind);
        let mut conn = Conn::connect(addr, bind, cfg.connect_timeout, Timeouts::of(&cfg))
            .await
            .map_err(|e| HostError::new("4.4.1", format!("{at}: {e}")))?;
        let helo = source.map_or(cfg.helo_name.as_str(), |s| s.ehlo.as_str());
        let mut client = Client::new(helo).with_starttls(mode);
        let greet_err = |e: String| HostError::new("4.4.1", format!("{at}: {e}"));
        conn.until_idle(&mut client).await.map_err(greet_err)?;
        let mut security = Security::Plain;
        if client.wants_tls() {
            let server_name = tls::server_name(name, ip);
            conn = match conn
                .starttls(connector, server_name, self.cfg().tls_handshake_timeout)
                .await
            {
                Ok(c) => c,
                Err(e) => {
                    self.metrics.outbound_tls("failed");
                    return Err(HostError {
                        status: "4.7.5",
                        text: format!("{at}: TLS handshake failed: {e}"),
                        handshake: true,
                    });
                }
            };
            security = secured;
            tracing::info!(
                host = %at,
                tls = %conn.tls_description(),
                security = security.name(),
                "outbound TLS established"
            );
            client.handle_tls_done();
            conn.until_idle(&mut client).await.map_err(greet_err)?;
        }
        match client.error() {
            None => {
                self.metrics.outbound_tls(security.name());
                Ok((conn, client, security))
            }
            Some(ConnError::TlsUnavailable(why)) => Err(HostError::new(
                "4.7.4",
                format!("{at}: TLS is required: {why}"),
            )),
            Some(err) => Err(HostError::new("4.4.1", format!("{at}: {err:?}"))),
        }
    }

    /// Loop detection (RFC 5321 6.3): too many trace headers.
    fn too_many_hops(&self, loaded: &Loaded) -> Option<String> {
        let body = &loaded.job.body;
        let header_end = memchr::memmem::find(body, b"\r\n\r\n").unwrap_or(body.len());
        let hops = body[..header_end]
            .split(|&b| b == b'\n')
            .filter(|l| l.len() >= 9 && l[..9].eq_ignore_ascii_case(b"received:"))
            .count();
        (hops > self.cfg().max_hops).then(|| {
            format!(
                "554 5.4.6 mail loop: {hops} Received headers (limit {})",
                self.cfg().max_hops
            )
        })
    }

    /// Every recipient of `work` gets the same outcome (no connection);
    /// `[b, c]` are the time spent finding the destination and trying its
    /// hosts.
    async fn fail_work(
        &self,
        work: Work,
        reply: &str,
        permanent: bool,
        [b, c]: [u64; 2],
        held: &Held,
    ) {
        let outcomes = work
            .rcpts
            .iter()
            .map(|_| {
                if permanent {
                    RcptOutcome::Failed(reply.to_owned())
                } else {
                    RcptOutcome::Deferred(reply.to_owned())
                }
            })
            .collect();
        // The queue time is the origin's to know (the message was not read).
        let report = Report::Outcomes {
            outcomes,
            remote: None,
            attempt: Attempt {
                relay: None,
                source: work.source.clone(),
                delays: [0, b, c, 0],
                tls: None,
                retry: None,
            },
        };
        self.finish(held, &work, report).await;
    }

    /// Reads the message back, with what delivery needs: from this shard's
    /// queue, or, for handed-off work, from the origin's segment by
    /// location.
    async fn load(&self, work: &Work) -> Option<Loaded> {
        let read = match &work.origin {
            None => self.spool.show(&work.id.to_string()).await,
            Some(o) => self.spool.read_at(&o.location).await,
        };
        let (block, message) = match read {
            Ok(Some(x)) => x,
            Ok(None) => return None,
            Err(e) => {
                tracing::warn!(id = %work.id, error = %e, "cannot read queued message");
                return None;
            }
        };
        let env = format::decode_envelope(&block)?;
        if work.id != *env.id {
            // Compacted away and the place reused: not this message.
            tracing::warn!(id = %work.id, found = %env.id, "queued message moved");
            return None;
        }
        let params = format::rcpt_params(&block);
        let param = |name: &str| {
            env.lines
                .iter()
                .find_map(|l| l.strip_prefix("param ").and_then(|p| p.strip_prefix(name)))
                .map(str::to_owned)
        };
        let mut rcpts = Vec::new();
        let mut notify = Vec::new();
        let mut orcpt = Vec::new();
        for &i in work.rcpts.iter() {
            let (addr, n, o) = params.get(i)?.clone();
            rcpts.push(JobRcpt {
                addr,
                notify: n.clone(),
                orcpt: o.clone(),
            });
            notify.push(n);
            orcpt.push(o);
        }
        Some(Loaded {
            job: Job {
                mail_from: env.mail_from.map(str::to_owned),
                rcpts,
                body: message,
                smtputf8: env.lines.contains(&"param SMTPUTF8"),
                ret: param("RET="),
                envid: param("ENVID="),
            },
            notify,
            orcpt,
            ret_full: param("RET=").is_some_and(|r| r.eq_ignore_ascii_case("FULL")),
            envid: param("ENVID="),
            arrival: env.arrival,
            arrival_ms: env.arrival_ms,
        })
    }

    /// Accept-to-delivery latency of the delivered recipients, recorded
    /// on the shard that delivered them.
    fn observe(&self, loaded: &Loaded, outcomes: &[RcptOutcome]) {
        let Some(at) = loaded.arrival_ms else { return };
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut h = self.latency.borrow_mut();
        for o in outcomes {
            if let RcptOutcome::Delivered(_) = o {
                let ms = now_ms.saturating_sub(at);
                h.saturating_record(ms);
                self.metrics.delivery_latency.observe(ms as f64 / 1000.0);
            }
        }
    }

    /// On the origin: journals each recipient's outcome, schedules
    /// retries, bounces. `rcpts` are envelope indexes, in outcome order.
    ///
    /// The bounce is stored before its recipients are journaled as
    /// bounced: once the last recipient is finished the message may leave
    /// the spool, and a crash in between must cost at worst a second
    /// report, never the only one. A bounce that cannot be stored leaves
    /// its recipients deferred (retried, and reported then).
    async fn apply_outcomes(
        &self,
        id: &QueueId,
        rcpts: &[usize],
        outcomes: Vec<RcptOutcome>,
        remote: Option<&str>,
        attempt: &Attempt,
    ) {
        let Some(entry) = id.with_str(|id| self.spool.entry(id)) else {
            // Deleted from the queue while it was being delivered.
            return self.release(id, rcpts);
        };
        let work = Work {
            id: id.clone(),
            rcpts: rcpts.into(),
            origin: None,
            shaped: None,
            pinned: false,
            source: None,
        };
        let now = unix_now();
        let age = Duration::from_secs(now.saturating_sub(entry.arrival));
        let log = OutcomeLog::new(&work.id, attempt, entry.arrival)
            .classifying(self.cfg().classifier.clone());
        let mut failed = Vec::new();
        let mut delayed = Vec::new();
        let mut retry_at: Option<u64> = None;
        let mut ops = Vec::with_capacity(outcomes.len());
        // Every recipient of one work item goes to one destination.
        let destination = rcpts
            .first()
            .and_then(|&i| entry.rcpts.get(i))
            .map(|(addr, _)| {
                crate::metrics::destination_label(&self.cfg().target(addr).to_string())
            });
        let mut counts = [0u64; 3];
        for (k, outcome) in outcomes.into_iter().enumerate() {
            let Some(&rcpt) = rcpts.get(k) else {
                continue;
            };
            let Some((addr, before)) = entry.rcpts.get(rcpt) else {
                continue;
            };
            // Finished while it was being delivered (the operator bounced
            // or deleted it): that stands, and no second report goes out.
            if before.finished() {
                continue;
            }
            let id = work.id.to_string();
            let op = match outcome {
                RcptOutcome::Delivered(r) => {
                    counts[0] += 1;
                    log.write("delivered", addr, &r.text(), None);
                    JournalOp::Delivered { id, rcpt }
                }
                RcptOutcome::Failed(why) => {
                    counts[2] += 1;
                    log.write("bounced", addr, &why, None);
                    failed.push((k, why));
                    JournalOp::Bounced { id, rcpt }
                }
                RcptOutcome::Deferred(why) => {
                    let seed = hash(&id) ^ rcpt as u64;
                    // The shaping entry's schedule: the one the worker
                    // applied, else the recipient domain's.
                    let cfg = self.cfg();
                    let domain = addr.rsplit_once('@').map_or("", |(_, d)| d);
                    let schedule = attempt
                        .retry
                        .clone()
                        .or_else(|| cfg.shaping.retry_for(&domain.to_ascii_lowercase()));
                    let next = match &schedule {
                        Some(s) => cfg.next_retry_on(s, age, seed),
                        None => cfg.next_retry(age, seed),
                    };
                    match next {
                        Some(delay) => {
                            counts[1] += 1;
                            let until = self.cfg().retry_at(entry.arrival, now, delay);
                            log.write("deferred", addr, &why, Some(until - now));
                            if self.cfg().delay_warning_due(entry.arrival, now, before) {
                                delayed.push((k, why));
                            }
                            retry_at = Some(retry_at.map_or(until, |t: u64| t.min(until)));
                            JournalOp::Deferred { id, rcpt, until }
                        }
                        None => {
                            counts[2] += 1;
                            let why =
                                format!("{why} (gave up after {}s in the queue)", age.as_secs());
                            log.write("expired", addr, &why, None);
                            failed.push((k, why));
                            JournalOp::Bounced { id, rcpt }
                        }
                    }
                }
            };
            ops.push(op);
        }
        if let Some(dest) = &destination {
            use crate::metrics::Delivery;
            self.metrics
                .deliveries(dest, Delivery::Delivered, counts[0]);
            self.metrics.deliveries(dest, Delivery::Deferred, counts[1]);
            self.metrics.deliveries(dest, Delivery::Bounced, counts[2]);
        }
        if let Some(source) = attempt.source.as_deref() {
            use crate::metrics::Delivery;
            self.metrics
                .source_deliveries(source, Delivery::Delivered, counts[0]);
            self.metrics
                .source_deliveries(source, Delivery::Deferred, counts[1]);
            self.metrics
                .source_deliveries(source, Delivery::Bounced, counts[2]);
        }
        if !delayed.is_empty() {
            let retry_until =
                UNIX_EPOCH + Duration::from_secs(entry.arrival) + self.cfg().max_queue_age;
            let action = dsn::Action::Delayed { retry_until };
            // A warning that cannot be stored is not retried: it only
            // informs, and the recipient's bounce (if it comes) will.
            self.notify_sender(&work, action, &delayed, remote).await;
        }
        if !failed.is_empty()
            && !self
                .notify_sender(&work, dsn::Action::Failed, &failed, remote)
                .await
        {
            let until = now + BOUNCE_RETRY;
            retry_at = Some(retry_at.map_or(until, |t: u64| t.min(until)));
            for op in &mut ops {
                if let JournalOp::Bounced { id, rcpt } = op {
                    *op = JournalOp::Deferred {
                        id: std::mem::take(id),
                        rcpt: *rcpt,
                        until,
                    };
                }
            }
        }
        for op in ops {
            if let Err(e) = self.spool.apply(op).await {
                // Not journaled: the recipient stays as it was and is tried
                // again (a duplicate is better than a loss).
                tracing::error!(id = %work.id, error = %e, "cannot journal a delivery outcome");
                retry_at = Some(now + 60);
            }
        }
        self.release(id, rcpts);
        if let Some(t) = retry_at {
            self.timers.borrow_mut().push(Reverse((t, work.id.clone())));
            // The scheduler may be asleep until a later timer or its tick.
            self.wake.notify(1);
        }
    }

    /// Sends the sender one report on the recipients in `rcpts` (positions
    /// in `work.rcpts`, each with its diagnostic) that failed or are
    /// delayed, unless the message was itself a report, or their NOTIFY
    /// says not to. `false` when a report is due but could not be stored.
    async fn notify_sender(
        &self,
        work: &Work,
        action: dsn::Action,
        rcpts: &[(usize, String)],
        remote: Option<&str>,
    ) -> bool {
        let Some(loaded) = self.load(work).await else {
            tracing::error!(id = %work.id, "cannot read the message to report on it");
            return false;
        };
        let Some(sender) = &loaded.job.mail_from else {
            tracing::info!(id = %work.id, "not reporting on a report (null sender)");
            return true;
        };
        let wanted = |n: Option<&str>| match action {
            dsn::Action::Failed => dsn::wants_failure_report(n),
            dsn::Action::Delayed { .. } => dsn::wants_delay_report(n),
        };
        let classifier = self.cfg().classifier.clone();
        let reported: Vec<dsn::Recipient> = rcpts
            .iter()
            .filter(|(k, _)| wanted(loaded.notify[*k].as_deref()))
            .map(|(k, why)| dsn::Recipient {
                addr: loaded.job.rcpts[*k].addr.clone(),
                orcpt: loaded.orcpt[*k].clone(),
                diagnostic: why.clone(),
                remote: remote.map(str::to_owned),
                class: Some(classifier.classify(why).0.name()),
            })
            .collect();
        if reported.is_empty() {
            return true;
        }
        let id = work.id.to_string();
        let original = dsn::Original {
            id: &id,
            sender,
            envid: loaded.envid.as_deref(),
            arrival: UNIX_EPOCH + Duration::from_secs(loaded.arrival),
            content: &loaded.job.body,
            ret_full: loaded.ret_full,
            limit: self.cfg().bounce_size_limit,
        };
        let body = dsn::build(
            &self.hostname,
            &original,
            action,
            &reported,
            SystemTime::now(),
        );
        let msg = Message {
            envelope: Envelope {
                peer: SocketAddr::from(([127, 0, 0, 1], 0)),
                helo: self.hostname.clone(),
                protocol: Protocol {
                    esmtp: true,
                    tls: false,
                    auth: false,
                    utf8: false,
                },
                mail_from: None,
                size: None,
                body: None,
                smtputf8: false,
                ret: None,
                envid: None,
                rcpts: vec![Rcpt {
                    addr: sender.clone(),
                    notify: None,
                    orcpt: None,
                }],
                chunked: false,
                pool: None,
            },
            body,
        };
        match self.spool.store(msg).await {
            Ok(id) => {
                let kind = match action {
                    dsn::Action::Failed => "bounce",
                    dsn::Action::Delayed { .. } => "delay warning",
                };
                tracing::info!(
                    target: "ringmta::event",
                    event = "dsn",
                    queue_id = %work.id,
                    dsn_id = %id,
                    to = %sender,
                    kind,
                    "{kind} queued"
                );
                self.enqueue(id);
                true
            }
            Err(e) => {
                tracing::error!(id = %work.id, error = %e, "cannot queue a report");
                false
            }
        }
    }
}

/// The delivered, deferred, bounced and expired lines of one attempt's
/// outcomes (the README's "Event log").
struct OutcomeLog<'a> {
    /// Classifies the replies of failures (`class` field).
    classifier: Option<Arc<Classifier>>,
    queue_id: &'a QueueId,
    relay: &'a str,
    /// How the connection was protected (`plain`, `tls`, `verified`,
    /// `dane`), when there was one.
    tls: Option<&'static str>,
    source: Option<&'a str>,
    delays: String,
    /// Seconds since arrival, with milliseconds.
    delay: String,
}

impl<'a> OutcomeLog<'a> {
    /// The same log, with a `class` field on failures.
    fn classifying(mut self, classifier: Arc<Classifier>) -> Self {
        self.classifier = Some(classifier);
        self
    }

    fn new(queue_id: &'a QueueId, attempt: &'a Attempt, arrival: u64) -> Self {
        let total = unix_now_ms().saturating_sub(arrival.saturating_mul(1000));
        let [a, b, c, d] = attempt.delays;
        // Work that failed before its message was read has no queue time of
        // its own: it is what the total leaves.
        let a = if a == 0 {
            total.saturating_sub(b + c + d)
        } else {
            a
        };
        let secs = |ms: u64| format!("{}.{:03}", ms / 1000, ms % 1000);
        OutcomeLog {
            classifier: None,
            queue_id,
            relay: attempt.relay.as_deref().unwrap_or("none"),
            tls: attempt.tls.map(Security::name),
            source: attempt.source.as_deref(),
            delays: format!("{}/{}/{}/{}", secs(a), secs(b), secs(c), secs(d)),
            delay: secs(total),
        }
    }

    /// `reply` is the next hop's reply (or our reason); `retry_in` the
    /// seconds until the next attempt of a deferred recipient.
    fn write(&self, event: &'static str, to: &str, reply: &str, retry_in: Option<u64>) {
        let class = match &self.classifier {
            Some(c) if event != "delivered" => Some(c.classify(reply).0.name()),
            _ => None,
        };
        tracing::info!(
            target: "ringmta::event",
            event,
            queue_id = %self.queue_id,
            to,
            relay = self.relay,
            tls = self.tls,
            source = self.source,
            delay = %self.delay,
            delays = %self.delays,
            reply,
            retry_in,
            class,
            "{event}"
        );
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Milliseconds from the message's arrival until now.
fn queued_ms(loaded: &Loaded) -> u64 {
    let arrival = loaded
        .arrival_ms
        .unwrap_or(loaded.arrival.saturating_mul(1000));
    unix_now_ms().saturating_sub(arrival)
}

fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(ms)
        .unwrap_or(0)
}

/// Whether a queue or set sized for a crowd (the whole recovered queue at
/// start, a burst, a destination that stopped answering) is now mostly
/// empty and should give memory back. Shrinking to twice the length leaves
/// room to grow before the next shrink, so the copying stays amortized.
/// The recipient domain whose `[domain]` shaping entry governs mail to
/// `addr` when `target` is a route or the relay host (an MX target is
/// shaped by its own domain): none without such an entry.
fn shaped_domain(cfg: &RelayConfig, target: &Target, addr: &str) -> Option<Box<str>> {
    if !matches!(target, Target::Smtp { .. }) || cfg.shaping.domains.is_empty() {
        return None;
    }
    let domain = addr.rsplit_once('@')?.1.to_ascii_lowercase();
    cfg.shaping
        .domains
        .contains_key(&domain)
        .then(|| domain.into_boxed_str())
}

/// The routed domain `shape` is the budget of, as [`Work::shaped`] holds it.
fn first_shaped(shape: &Shape) -> Option<Box<str>> {
    match &shape.key {
        Key::Domain(d) => Some(d.as_str().into()),
        _ => None,
    }
}

fn sparse(len: usize, capacity: usize) -> bool {
    capacity > 4096 && len < capacity / 4
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn hash(s: &str) -> u64 {
    // FNV-1a: only for retry jitter.
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// One host a connection goes to, and the source it leaves from.
#[derive(Clone, Copy)]
struct Hop<'a> {
    name: &'a str,
    ip: IpAddr,
    port: u16,
    source: Option<&'a Source>,
}

/// Why one host could not take mail, with the enhanced status code the
/// deferral gets if no other host can either.
struct HostError {
    status: &'static str,
    text: String,
    /// The TLS handshake failed (the connection is unusable).
    handshake: bool,
}

impl HostError {
    fn new(status: &'static str, text: String) -> HostError {
        HostError {
            status,
            text,
            handshake: false,
        }
    }
}

/// A socket, before or after STARTTLS.
enum Stream {
    Plain(TcpStream),
    Tls(Box<futures_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_close(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_close(cx),
        }
    }
}

/// One outbound connection: socket, reply parser, timeouts.
struct Conn {
    stream: Stream,
    parser: ReplyParser,
    buf: Vec<u8>,
    len: usize,
    timeouts: Timeouts,
}

/// How long each wait of an outbound session may take (RFC 5321 4.5.3.2
/// gives the greeting, commands, content writes and the final reply their
/// own).
#[derive(Debug, Clone, Copy)]
struct Timeouts {
    banner: Duration,
    command: Duration,
    /// Each write (the content goes out in blocks).
    write: Duration,
    final_reply: Duration,
}

impl Timeouts {
    fn of(cfg: &RelayConfig) -> Timeouts {
        Timeouts {
            banner: cfg.banner_timeout,
            command: cfg.reply_timeout,
            write: cfg.data_timeout,
            final_reply: cfg.final_timeout,
        }
    }

    /// The limit for the reply `client` waits for, and what to call it.
    fn reply(&self, client: &Client) -> (Duration, &'static str) {
        match client.awaiting() {
            Awaiting::Banner => (self.banner, "timeout waiting for the greeting"),
            Awaiting::Command => (self.command, "timeout waiting for a reply"),
            Awaiting::Final => (
                self.final_reply,
                "timeout waiting for the reply to the content",
            ),
        }
    }
}

impl Conn {
    /// Connects to `addr`, from the local address `bind` when given.
    async fn connect(
        addr: SocketAddr,
        bind: Option<IpAddr>,
        connect_timeout: Duration,
        timeouts: Timeouts,
    ) -> Result<Conn, String> {
        let stream = match bind {
            None => TcpStream::connect_timeout(addr, connect_timeout)
                .await
                .map_err(|e| e.to_string())?,
            Some(from) => connect_from(from, addr, connect_timeout)
                .await
                .map_err(|e| format!("from {from}: {e}"))?,
        };
        let _ = stream.set_nodelay(true);
        let _ = stream.set_write_timeout(Some(timeouts.write));
        Ok(Conn {
            stream: Stream::Plain(stream),
            parser: ReplyParser::default(),
            buf: vec![0; 8192],
            len: 0,
            timeouts,
        })
    }

    /// The TLS handshake after the server's 220 to STARTTLS, bounded by
    /// `timeout`. On failure the connection is gone (dropped).
    async fn starttls(
        self,
        connector: &TlsConnector,
        name: ServerName<'static>,
        timeout: Duration,
    ) -> Result<Conn, String> {
        let Stream::Plain(tcp) = self.stream else {
            return Err("STARTTLS on a TLS connection".into());
        };
        if self.len > 0 {
            // Sent before the handshake: it must not count as said under
            // TLS (RFC 3207 5, the response-injection class of attacks).
            tracing::warn!(
                bytes = self.len,
                "discarding what the server sent after its 220 to STARTTLS"
            );
        }
        let handshake = connector.connect(name, tcp);
        let done = async { Some(handshake.await) }
            .or(async {
                glommio::timer::sleep(timeout).await;
                None
            })
            .await;
        match done {
            None => Err(format!("no handshake within {timeout:?}")),
            Some(Err(e)) => Err(e.to_string()),
            Some(Ok(tls)) => Ok(Conn {
                stream: Stream::Tls(Box::new(tls)),
                parser: ReplyParser::default(),
                buf: self.buf,
                len: 0,
                timeouts: self.timeouts,
            }),
        }
    }

    /// `TLS1.3 TLS_AES_256_GCM_SHA384`, or `plaintext`.
    fn tls_description(&self) -> String {
        match &self.stream {
            Stream::Plain(_) => "plaintext".into(),
            Stream::Tls(s) => tls::describe(s.get_ref().1),
        }
    }

    async fn flush(&mut self, client: &mut Client) -> Result<(), String> {
        let mut wrote = false;
        while let Some(bytes) = client.poll_transmit() {
            self.stream
                .write_all(&bytes)
                .await
                .map_err(|e| e.to_string())?;
            wrote = true;
        }
        if wrote {
            // rustls holds records until flushed.
            self.stream.flush().await.map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Writes what the client has to say and feeds it the next reply.
    async fn step(&mut self, client: &mut Client) -> Result<(), String> {
        self.flush(client).await?;
        let (timeout, timed_out) = self.timeouts.reply(client);
        let deadline = Instant::now() + timeout;
        loop {
            let (used, reply) = match self.parser.feed(&self.buf[..self.len]) {
                Ok(parsed) => parsed,
                Err(e) => {
                    // Not SMTP, or not in step with what was sent: nothing
                    // more on this connection can be trusted. It is closed
                    // and only the message in flight is deferred (left
                    // open, every message queued behind it was deferred
                    // as "not ready").
                    let why = format!("malformed reply: {e}");
                    client.handle_close(&why);
                    return Err(why);
                }
            };
            self.buf.copy_within(used..self.len, 0);
            self.len -= used;
            if let Some(r) = reply {
                client.handle_reply(r);
                return Ok(());
            }
            if self.len == self.buf.len() {
                self.buf.resize(self.buf.len() * 2, 0);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let read = async { Some(self.stream.read(&mut self.buf[self.len..]).await) }
                .or(async {
                    glommio::timer::sleep(left).await;
                    None
                })
                .await;
            match read {
                None => {
                    client.handle_close(timed_out);
                    return Err(timed_out.into());
                }
                Some(Ok(0)) => {
                    client.handle_close("connection closed by the server");
                    return Err("connection closed by the server".into());
                }
                Some(Ok(n)) => self.len += n,
                Some(Err(e)) => {
                    client.handle_close(&e.to_string());
                    return Err(e.to_string());
                }
            }
        }
    }

    /// Runs the dialogue until the client is ready for a message, wants
    /// the TLS handshake, or cannot go on.
    async fn until_idle(&mut self, client: &mut Client) -> Result<(), String> {
        while !client.is_idle()
            && !client.wants_tls()
            && !client.is_closed()
            && client.error().is_none()
        {
            self.step(client).await?;
        }
        Ok(())
    }

    /// Sends one message; returns the per-recipient outcomes.
    async fn send(&mut self, client: &mut Client, job: Job) -> Result<Vec<RcptOutcome>, String> {
        if client.start(job).is_err() {
            return Err("connection not ready for a message".into());
        }
        loop {
            if let Some(o) = client.poll_outcome() {
                // Commands queued after the outcome (RSET) go out with the next.
                return Ok(o);
            }
            if let Err(e) = self.step(client).await {
                return client.poll_outcome().ok_or(e);
            }
        }
    }

    async fn until_closed(&mut self, client: &mut Client) -> Result<(), String> {
        let _ = self.flush(client).await;
        while !client.is_closed() {
            if self.step(client).await.is_err() {
                break;
            }
        }
        let _ = self.stream.close().await;
        Ok(())
    }
}

/// A TCP connection to `addr` from the local address `from` (glommio
/// connects only from the address the kernel picks): the socket is bound
/// first, connected without blocking, and handed to glommio once the
/// kernel has made the connection. The wait looks at the socket's state
/// at growing intervals (1 ms, doubling up to 50 ms), within `timeout`.
async fn connect_from(
    from: IpAddr,
    addr: SocketAddr,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    use std::io::{Error, ErrorKind};
    use std::os::fd::{FromRawFd, IntoRawFd};

    use socket2::{Domain, Protocol, SockAddr, Socket, Type};

    if from.is_ipv4() != addr.is_ipv4() {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            "the source cannot reach a host of the other address family",
        ));
    }
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_nonblocking(true)?;
    socket.bind(&SockAddr::from(SocketAddr::new(from, 0)))?;
    match socket.connect(&SockAddr::from(addr)) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {
            let deadline = Instant::now() + timeout;
            let mut step = Duration::from_millis(1);
            loop {
                if let Some(e) = socket.take_error()? {
                    return Err(e);
                }
                // getpeername answers only once the connection is made.
                if socket.peer_addr().is_ok() {
                    break;
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(Error::new(ErrorKind::TimedOut, "connection timed out"));
                }
                glommio::timer::sleep(step.min(left)).await;
                step = (step * 2).min(Duration::from_millis(50));
            }
        }
        Err(e) => return Err(e),
    }
    // SAFETY: the descriptor is this socket's, given up by `into_raw_fd`;
    // the glommio stream owns (and closes) it from here.
    Ok(unsafe { TcpStream::from_raw_fd(socket.into_raw_fd()) })
}

/// A way to make a delivery worker panic, for the end-to-end test of panic
/// recovery. Debug builds only (the test binary), and read from the
/// process environment: no peer can reach it.
#[cfg(debug_assertions)]
mod test_hooks {
    use std::sync::atomic::{AtomicBool, Ordering};

    static PANICKED: AtomicBool = AtomicBool::new(false);

    /// Panics once per process when the message is for the recipient that
    /// `RINGMTA_TEST_PANIC_RCPT` names.
    pub(super) fn maybe_panic(loaded: &super::Loaded) {
        let Ok(rcpt) = std::env::var("RINGMTA_TEST_PANIC_RCPT") else {
            return;
        };
        if loaded.job.rcpts.iter().any(|r| r.addr == rcpt) && !PANICKED.swap(true, Ordering::SeqCst)
        {
            panic!("test hook: delivery to {rcpt} panics once");
        }
    }
}
