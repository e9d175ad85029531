//! The handoff mesh: each SMTP destination is delivered by one shard, its
//! *owner* (a hash of the destination's host or mail domain, modulo the
//! number of shards), so that its connections, pipelining and per-destination
//! limits live in one place whichever shard took the message in.
//!
//! After the spool sync, the shard that took a message in (its *origin*)
//! sends each destination's share of the recipients to the owner over a
//! bounded glommio channel mesh ([`Msg::Work`]: the id, the recipients and
//! the message's [`Location`] in the origin's segment file, which the owner
//! reads directly: segment files are shared on disk). The owner delivers and
//! sends the outcome back ([`Msg::Done`]); only the origin journals it,
//! schedules retries and bounces, because only the origin's spool may write
//! its journal.
//!
//! * Never blocks intake, never drops: a full (or closed) channel leaves the
//!   work on its origin, which delivers it itself. Work goes out with
//!   `try_send` only.
//! * Done records must arrive (the origin holds the recipients in flight
//!   until they do), so they are queued per peer and sent by one task per
//!   peer that awaits room: glommio's `send` panics if two tasks wait on one
//!   channel at once.
//! * Restarts: nothing here is durable. Work handed off when the process
//!   died is still pending in the origin's queue and is simply done again
//!   (Maildir delivery is idempotent by file name; SMTP may deliver twice,
//!   as every MTA may).
//! * Local (Maildir) destinations are never handed off.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::ops::Deref;
use std::rc::Rc;

use event_listener::Event;
use glommio::channels::channel_mesh::{Full, MeshBuilder, Senders};
use glommio::channels::shared_channel::ConnectedReceiver;

use super::client::RcptOutcome;
use super::Target;
use crate::spool::queue::{Location, QueueId};

/// The mesh as built in `server::run`, one clone per shard.
pub type Mesh = MeshBuilder<Msg, Full>;

/// What crosses between shards.
#[derive(Debug)]
pub enum Msg {
    /// Deliver these recipients of a message in the origin's spool.
    Work(Handoff),
    /// What became of handed-off work, for the origin to journal.
    Done(Done),
}

#[derive(Debug, Clone)]
pub struct Handoff {
    /// The origin's index in the mesh, where [`Done`] goes back.
    pub origin: usize,
    pub id: QueueId,
    pub location: Location,
    pub rcpts: RcptIndexes,
    pub target: Target,
    /// The recipient domain whose `[domain]` shaping entry governs this
    /// work when a route or relay host sends it (none: the target's).
    pub shaped: Option<Box<str>>,
    /// Handed to the owner of its shaping provider's budget: delivered
    /// where it lands, never handed on again.
    pub pinned: bool,
    /// The source (`[source.NAME]` of the shaping file) it leaves through.
    pub source: Option<std::sync::Arc<str>>,
}

#[derive(Debug)]
pub struct Done {
    pub id: QueueId,
    pub rcpts: RcptIndexes,
    pub report: Report,
}

/// Recipient indexes in a stored envelope, in order: which recipients a
/// piece of work is for. Every queued message has one piece in flight per
/// destination, so this is kept small: the common single recipient inline
/// (16 bytes in all, no allocation), more in one boxed slice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RcptIndexes {
    One([usize; 1]),
    Many(Box<[usize]>),
}

impl Deref for RcptIndexes {
    type Target = [usize];

    fn deref(&self) -> &[usize] {
        match self {
            RcptIndexes::One(one) => one,
            RcptIndexes::Many(many) => many,
        }
    }
}

impl From<&[usize]> for RcptIndexes {
    fn from(rcpts: &[usize]) -> RcptIndexes {
        match rcpts {
            [one] => RcptIndexes::One([*one]),
            _ => RcptIndexes::Many(rcpts.into()),
        }
    }
}

impl From<Vec<usize>> for RcptIndexes {
    fn from(rcpts: Vec<usize>) -> RcptIndexes {
        match *rcpts {
            [one] => RcptIndexes::One([one]),
            _ => RcptIndexes::Many(rcpts.into_boxed_slice()),
        }
    }
}

/// The end of one piece of work, on whichever shard it ran.
#[derive(Debug)]
pub enum Report {
    /// One outcome per recipient, in order; `remote` names the server,
    /// `attempt` says where and how long (for the event log).
    Outcomes {
        outcomes: Vec<RcptOutcome>,
        remote: Option<String>,
        attempt: Attempt,
    },
    /// Not attempted (its worker went away): schedule it again now.
    Returned,
    /// Its worker panicked: try again after the first retry delay.
    Crashed,
    /// The message could not be read (deleted, or compacted elsewhere in
    /// the meantime): try again a little later if it is still queued.
    Unreadable,
    /// Not attempted: the destination (its text, or `DEST via SOURCE`)
    /// is suspended on the owner until this Unix time. An `automatic` one
    /// (the owner's backoff) the origin records too; an operator's it
    /// already knows, and does not record again (it may have been lifted
    /// there a moment before the owner heard of it).
    Suspended {
        destination: String,
        until: u64,
        automatic: bool,
    },
}

/// Where one delivery attempt went and how long its parts took: the
/// `relay` and `delays` of the event log's delivered, deferred, bounced and
/// expired lines.
#[derive(Debug, Clone, Default)]
pub struct Attempt {
    /// `host[ip]:port`, `maildir`, or `None` when no server was reached.
    pub relay: Option<String>,
    /// The source (`[source.NAME]`) the connection was made from.
    pub source: Option<std::sync::Arc<str>>,
    /// Milliseconds, as Postfix's `delays=a/b/c/d`: (a) in the queue, from
    /// arrival until a worker took the message; (b) finding the
    /// destination (DNS); (c) connection set-up (TCP, greeting, EHLO,
    /// STARTTLS; 0 on a reused connection); (d) transmission (MAIL FROM to
    /// the reply to the content; for a Maildir, writing and syncing).
    pub delays: [u64; 4],
    /// How the connection was protected (`tls` field); `None` when no
    /// server was reached or for a Maildir.
    pub tls: Option<super::tls::Security>,
    /// The retry schedule of the shaping entry the worker applied (a
    /// provider's is known only there); `None`: the origin decides.
    pub retry: Option<std::sync::Arc<[std::time::Duration]>>,
}

/// The owner of `target` among `peers` shards, or `None` for a destination
/// that is never handed off (local delivery).
pub fn owner(target: &Target, peers: usize) -> Option<usize> {
    let key = match target {
        Target::Smtp { host, .. } => host.as_str(),
        Target::Mx { domain, .. } => domain.as_str(),
        Target::Maildir(_) => return None,
    };
    owner_of(key, peers)
}

/// The shard that owns `key` (a host, a domain or a shaping provider's
/// name) among `peers`.
pub fn owner_of(key: &str, peers: usize) -> Option<usize> {
    // FNV-1a: the same on every shard and every run (std's hasher is
    // randomly seeded per process and per map).
    let h = key.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b.to_ascii_lowercase())).wrapping_mul(0x100_0000_01b3)
    });
    (peers > 0).then(|| (h % peers as u64) as usize)
}

/// This shard's end of the mesh.
pub struct Link {
    senders: Senders<Msg>,
    /// Done records per peer, waiting for their sender task.
    outbox: Vec<RefCell<VecDeque<Msg>>>,
    queued: Vec<Event>,
    /// `ringmta_handoff_queued{from=me,to=peer}` per peer: sent, not yet
    /// taken by the peer (it lowers the gauge when it takes one).
    in_channel: Vec<prometheus_client::metrics::gauge::Gauge>,
    /// The same gauges of the channels from each peer to this shard.
    from_peer: Vec<prometheus_client::metrics::gauge::Gauge>,
}

impl Link {
    /// Joins the mesh (waits for every shard to join) and starts the done
    /// senders; returns the link and the receivers, one per peer.
    pub async fn join(
        mesh: Mesh,
    ) -> Result<(Rc<Link>, Vec<(usize, ConnectedReceiver<Msg>)>), String> {
        let (senders, mut receivers) = mesh.join().await.map_err(|e| e.to_string())?;
        let peers = senders.nr_consumers();
        let me = senders.peer_id();
        let link = Rc::new(Link {
            in_channel: (0..peers)
                .map(|to| crate::metrics::ShardMetrics::handoff_queued(me, to))
                .collect(),
            from_peer: (0..peers)
                .map(|from| crate::metrics::ShardMetrics::handoff_queued(from, me))
                .collect(),
            senders,
            outbox: (0..peers).map(|_| RefCell::default()).collect(),
            queued: (0..peers).map(|_| Event::new()).collect(),
        });
        for peer in (0..peers).filter(|&p| p != link.me()) {
            // Supervised: a panic here would silently stop every done
            // record to `peer`, leaving its recipients in flight for good.
            let link = link.clone();
            glommio::spawn_local(async move {
                crate::util::supervise("handoff done sender", || link.clone().send_done_loop(peer))
                    .await;
            })
            .detach();
        }
        Ok((link, receivers.streams()))
    }

    /// This shard's index in the mesh.
    pub fn me(&self) -> usize {
        self.senders.peer_id()
    }

    pub fn peers(&self) -> usize {
        self.senders.nr_consumers()
    }

    /// Hands work to `peer` if its channel has room; `false` (the work
    /// stays here) when it is full or gone.
    pub fn try_hand(&self, peer: usize, work: Handoff) -> bool {
        if peer == self.me() || peer >= self.peers() {
            return false;
        }
        // Counted first: the peer may take it off before we could count.
        self.in_channel[peer].inc();
        let handed = self.senders.try_send_to(peer, Msg::Work(work)).is_ok();
        if !handed {
            self.in_channel[peer].dec();
        }
        handed
    }

    /// A message from `peer` was taken off its channel.
    pub fn taken_from(&self, peer: usize) {
        if let Some(g) = self.from_peer.get(peer) {
            g.dec();
        }
    }

    /// Queues a done record for `peer`; it is sent as soon as there is room.
    pub fn send_done(&self, peer: usize, done: Done) {
        let (Some(q), Some(ev)) = (self.outbox.get(peer), self.queued.get(peer)) else {
            tracing::error!(peer, id = %done.id, "done record for no such shard dropped");
            return;
        };
        q.borrow_mut().push_back(Msg::Done(done));
        ev.notify(1);
    }

    /// The only task that awaits room on the channel to `peer`.
    async fn send_done_loop(self: Rc<Self>, peer: usize) {
        loop {
            let listener = self.queued[peer].listen();
            let next = self.outbox[peer].borrow_mut().pop_front();
            let Some(msg) = next else {
                listener.await;
                continue;
            };
            // Counted before the send: the peer may take it off the
            // channel before this task runs again.
            self.in_channel[peer].inc();
            if self.senders.send_to(peer, msg).await.is_err() {
                self.in_channel[peer].dec();
                // The peer is gone (shutting down): its work is redone from
                // its queue after the restart.
                tracing::debug!(peer, "done record not delivered: shard gone");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rcpt_indexes_keep_order_and_one_is_inline() {
        // The size is the point: one per piece of queued work.
        assert_eq!(std::mem::size_of::<RcptIndexes>(), 16);
        let one = RcptIndexes::from(vec![3]);
        assert!(matches!(one, RcptIndexes::One(_)));
        assert_eq!(*one, [3]);
        assert_eq!(*RcptIndexes::from(&[2, 0, 5][..]), [2, 0, 5]);
        assert!(RcptIndexes::from(Vec::new()).is_empty());
        assert_eq!(RcptIndexes::from(&[7][..]), RcptIndexes::One([7]));
    }

    #[test]
    fn owners_are_stable_and_spread() {
        let smtp = |h: &str| Target::Smtp {
            host: h.into(),
            port: 25,
        };
        let a = owner(&smtp("127.0.0.1"), 2);
        let b = owner(&smtp("127.0.0.2"), 2);
        assert_eq!(a, Some(0));
        assert_eq!(b, Some(1));
        // The port does not matter, the case of the name does not either.
        assert_eq!(
            owner(
                &Target::Smtp {
                    host: "127.0.0.1".into(),
                    port: 2525
                },
                2
            ),
            a
        );
        let mx = |d: &str| Target::Mx {
            domain: d.into(),
            port: 25,
        };
        assert_eq!(owner(&mx("Example.ORG"), 7), owner(&mx("example.org"), 7));
        assert_eq!(owner(&Target::Maildir("/m".into()), 2), None);
        assert_eq!(owner(&mx("example.org"), 1), Some(0));
    }
}
