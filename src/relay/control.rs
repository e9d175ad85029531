//! Queue control on a shard: the commands the admin API sends each shard
//! ([`Command`]), what a shard answers ([`Answer`]), how a shard carries
//! them out on its own spool and relay ([`execute`]), and the durable file
//! of destination suspensions ([`Suspensions`]).
//!
//! The admin threads never touch a shard's state: a [`Request`] crosses
//! to the shard over a bounded channel and the answer comes back over a
//! channel of its own. A shard acts only on the messages of its own spool;
//! every change to a message is a journal op made durable before it
//! counts (`ShardSpool::apply`), so it survives a restart. Suspensions
//! are not about messages: they live in `<spool>/suspended.json`,
//! written (temp, sync, rename, sync) by the admin side before the shards
//! are told, and read at start.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use serde::{Deserialize, Serialize};

use super::{Relay, RelayConfig};
use crate::spool::queue::{JournalOp, QueueId, RcptState};
use crate::spool::ShardSpool;

/// Which messages (and, for per-recipient actions, which recipients) an
/// action is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// One message: all its recipients still to be delivered.
    Id(String),
    /// Recipients in this domain (exact, any case).
    Domain(String),
    /// Recipients routed to this destination (a [`Target`]'s text, e.g.
    /// `smtp:mx.example.net:25`, or its host or domain alone).
    Destination(String),
}

impl Selector {
    fn rcpt_matches(&self, addr: &str, cfg: &RelayConfig) -> bool {
        match self {
            Selector::Id(_) => true,
            Selector::Domain(d) => domain_of(addr).eq_ignore_ascii_case(d),
            Selector::Destination(d) => cfg.target(addr).is_named(d),
        }
    }
}

impl std::fmt::Display for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Selector::Id(v) => write!(f, "id={v}"),
            Selector::Domain(v) => write!(f, "domain={v}"),
            Selector::Destination(v) => write!(f, "destination={v}"),
        }
    }
}

/// What to do to the selected messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Keep the whole message from delivery until released.
    Hold,
    /// Undo a hold (the message's retry times stay as they were).
    Release,
    /// Retry now: every deferral of the message is cleared.
    Flush,
    /// Drop the selected recipients without a report (by id: the whole
    /// message).
    Delete,
    /// Fail the selected recipients with one report to the sender per
    /// message, `reason` as its diagnostic.
    Bounce { reason: String },
}

impl Action {
    pub fn name(&self) -> &'static str {
        match self {
            Action::Hold => "hold",
            Action::Release => "release",
            Action::Flush => "flush",
            Action::Delete => "delete",
            Action::Bounce { .. } => "bounce",
        }
    }

    /// Whether work already queued for delivery must be taken back.
    pub fn withdraws(&self) -> bool {
        matches!(self, Action::Hold | Action::Delete | Action::Bounce { .. })
    }
}

/// One command to one shard.
#[derive(Debug, Clone)]
pub enum Command {
    /// Per destination: messages, recipients, held messages, oldest age.
    Summary,
    /// Messages with a recipient still to deliver that matches (all
    /// messages without a selector), at most `limit`.
    List {
        selector: Option<Selector>,
        limit: usize,
    },
    /// One message, with its envelope and size.
    Show {
        id: String,
    },
    Act {
        action: Action,
        selector: Selector,
    },
    /// Take back the queued (not started) work of these messages.
    Withdraw {
        ids: Vec<String>,
    },
    Suspend {
        destination: String,
        until: u64,
    },
    Resume {
        destination: String,
    },
    /// The destinations this shard has suspended now (the operator's and
    /// its own, from throttling replies).
    Suspensions,
    /// Store these injected messages (HTTP injection) on this shard's
    /// spool and queue them; answered with [`Answer::Injected`] once each
    /// is durable or failed. Carried out by the shard glue
    /// (`server::inject`), not [`execute`].
    Inject(InjectBatch),
}

/// Messages built by the HTTP injection for one shard.
#[derive(Debug, Clone)]
pub struct InjectBatch {
    /// The HTTP client (named in the trace header and the log).
    pub client: std::net::SocketAddr,
    pub messages: Vec<Injected>,
}

/// One injected message: checked envelope, complete content (CRLF).
#[derive(Debug, Clone)]
pub struct Injected {
    /// `None`: the null reverse-path.
    pub mail_from: Option<String>,
    pub rcpts: Vec<String>,
    pub body: Vec<u8>,
    /// An address needs SMTPUTF8.
    pub smtputf8: bool,
    /// The content has 8-bit octets.
    pub eight_bit: bool,
}

/// Why an injected message was not stored (nothing was acknowledged).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InjectFailure {
    /// The spool's disk is full (SMTP would answer 452).
    NoSpace,
    /// Signing or storing failed (SMTP would answer 451).
    Failed,
}

/// A command on its way to a shard, with where the answer goes.
#[derive(Debug)]
pub struct Request {
    pub command: Command,
    pub reply: std::sync::mpsc::SyncSender<(usize, Answer)>,
}

/// What a shard answers.
#[derive(Debug, Clone)]
pub enum Answer {
    Summary(Vec<DestSummary>),
    Messages(Vec<MessageInfo>),
    Message(Option<MessageInfo>),
    Affected(Affected),
    Count(usize),
    /// Suspended destinations (lowercase text) and when each ends.
    Suspended(Vec<(String, u64)>),
    /// Per injected message, in order: its queue id, or why not stored.
    Injected(Vec<Result<String, InjectFailure>>),
    Error(String),
}

/// One destination's part of the queue.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DestSummary {
    pub destination: String,
    /// Messages with at least one recipient waiting for it.
    pub messages: usize,
    /// Recipients waiting for it.
    pub recipients: usize,
    /// Of `messages`, those on hold.
    pub held: usize,
    /// Seconds since the oldest of them arrived.
    pub oldest_age: u64,
    /// Unix time its suspension ends, if it is suspended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub suspended_until: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageInfo {
    pub id: String,
    pub shard: usize,
    /// Unix time of arrival.
    pub arrival: u64,
    pub age: u64,
    pub held: bool,
    /// The reverse-path; empty for the null sender.
    pub sender: String,
    pub recipients: Vec<RcptInfo>,
    /// Octets of the stored message (show only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// The envelope block as stored (show only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub envelope: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RcptInfo {
    pub address: String,
    /// `pending`, `deferred`, `delivered` or `bounced`.
    pub state: String,
    /// For a deferred recipient: the Unix time of its next attempt.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<u64>,
    pub destination: String,
}

/// What an action changed on one shard.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Affected {
    pub messages: usize,
    pub recipients: usize,
    /// Messages the action could not be journaled for (disk full, or a
    /// report that could not be stored): unchanged.
    pub failed: usize,
    /// Ids of the affected messages (for withdrawing their queued work).
    #[serde(skip)]
    pub ids: Vec<String>,
}

/// Messages looked at between yields, so a large queue does not hold up
/// the shard's connections.
const SLICE: usize = 4096;
/// Journal ops in flight at once (they share group commits).
const BATCH: usize = 256;

/// Carries out `command` on this shard. `relay` is `None` with
/// `--no-delivery` (then bounce is refused: it needs to send a report).
pub async fn execute(
    command: Command,
    spool: &Rc<ShardSpool>,
    relay: Option<&Rc<Relay>>,
    cfg: &RelayConfig,
) -> Answer {
    match command {
        Command::Summary => Answer::Summary(summary(spool, cfg).await),
        Command::List { selector, limit } => {
            Answer::Messages(list(spool, cfg, selector.as_ref(), limit).await)
        }
        Command::Show { id } => Answer::Message(show(spool, cfg, &id).await),
        Command::Act { action, selector } => {
            if matches!(action, Action::Bounce { .. }) && relay.is_none() {
                return Answer::Error("delivery is off (--no-delivery): cannot bounce".into());
            }
            Answer::Affected(act(spool, relay, cfg, &action, &selector).await)
        }
        Command::Withdraw { ids } => {
            let ids: HashSet<QueueId> = ids.iter().map(|i| QueueId::new(i)).collect();
            Answer::Count(relay.map_or(0, |r| r.withdraw(&ids)))
        }
        Command::Suspend { destination, until } => {
            if let Some(r) = relay {
                r.suspend(&destination, until);
            }
            Answer::Count(1)
        }
        Command::Resume { destination } => {
            Answer::Count(relay.map_or(0, |r| usize::from(r.resume(&destination))))
        }
        Command::Suspensions => Answer::Suspended(relay.map_or_else(Vec::new, |r| r.suspensions())),
        Command::Inject(_) => Answer::Error("injection is the shard glue's to carry out".into()),
    }
}

fn domain_of(addr: &str) -> &str {
    addr.rsplit_once('@').map_or("", |(_, d)| d)
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn summary(spool: &ShardSpool, cfg: &RelayConfig) -> Vec<DestSummary> {
    let now = unix_now();
    let mut by_dest: HashMap<String, DestSummary> = HashMap::new();
    let mut targets: HashMap<String, String> = HashMap::new();
    let mut from = Some(0);
    while let Some(at) = from {
        from = spool.visit(at, SLICE, |v| {
            // A message counts once per destination.
            let mut seen: Vec<String> = Vec::new();
            for (addr, state) in v.rcpts {
                if state.finished() {
                    continue;
                }
                let dest = targets
                    .entry(domain_of(addr).to_ascii_lowercase())
                    .or_insert_with(|| cfg.target(addr).to_string())
                    .clone();
                let s = by_dest.entry(dest.clone()).or_insert_with(|| DestSummary {
                    destination: dest.clone(),
                    ..DestSummary::default()
                });
                s.recipients += 1;
                s.oldest_age = s.oldest_age.max(now.saturating_sub(v.arrival));
                if !seen.contains(&dest) {
                    s.messages += 1;
                    s.held += usize::from(v.held);
                    seen.push(dest);
                }
            }
        });
        glommio::yield_if_needed().await;
    }
    by_dest.into_values().collect()
}

fn state_name(s: RcptState) -> (&'static str, Option<u64>) {
    match s {
        RcptState::Pending => ("pending", None),
        RcptState::Deferred { until } => ("deferred", Some(until)),
        RcptState::Delivered => ("delivered", None),
        RcptState::Bounced => ("bounced", None),
    }
}

/// What [`info`] shows of a message besides its recipients.
struct Head<'a> {
    id: &'a str,
    arrival: u64,
    held: bool,
    sender: Option<&'a str>,
}

fn info(
    shard: usize,
    now: u64,
    cfg: &RelayConfig,
    Head {
        id,
        arrival,
        held,
        sender,
    }: Head<'_>,
    rcpts: impl Iterator<Item = (String, RcptState)>,
) -> MessageInfo {
    MessageInfo {
        id: id.to_owned(),
        shard,
        arrival,
        age: now.saturating_sub(arrival),
        held,
        sender: sender.unwrap_or("").to_owned(),
        recipients: rcpts
            .map(|(address, s)| {
                let (state, retry_at) = state_name(s);
                RcptInfo {
                    destination: cfg.target(&address).to_string(),
                    address,
                    state: state.to_owned(),
                    retry_at,
                }
            })
            .collect(),
        size: None,
        envelope: None,
    }
}

async fn list(
    spool: &ShardSpool,
    cfg: &RelayConfig,
    selector: Option<&Selector>,
    limit: usize,
) -> Vec<MessageInfo> {
    let now = unix_now();
    let mut out = Vec::new();
    let mut from = Some(0);
    while let Some(at) = from {
        if out.len() >= limit {
            break;
        }
        from = spool.visit(at, SLICE, |v| {
            if out.len() >= limit {
                return;
            }
            let wanted = match selector {
                None => true,
                Some(Selector::Id(id)) => *v.id == **id,
                Some(sel) => v
                    .rcpts
                    .iter()
                    .any(|(a, s)| !s.finished() && sel.rcpt_matches(a, cfg)),
            };
            if wanted {
                let id = v.id.to_string();
                let head = Head {
                    id: &id,
                    arrival: v.arrival,
                    held: v.held,
                    sender: v.mail_from,
                };
                out.push(info(
                    spool.shard(),
                    now,
                    cfg,
                    head,
                    v.rcpts.iter().map(|(a, s)| (a.to_string(), *s)),
                ));
            }
        });
        glommio::yield_if_needed().await;
    }
    out
}

async fn show(spool: &ShardSpool, cfg: &RelayConfig, id: &str) -> Option<MessageInfo> {
    let e = spool.entry(id)?;
    let head = Head {
        id: &e.id,
        arrival: e.arrival,
        held: e.held,
        sender: e.mail_from.as_deref(),
    };
    let mut m = info(spool.shard(), unix_now(), cfg, head, e.rcpts.into_iter());
    if let Ok(Some((block, message))) = spool.show(id).await {
        m.size = Some(message.len() as u64);
        m.envelope = Some(block.lines().map(str::to_owned).collect());
    }
    Some(m)
}

/// The messages `selector` picks on this shard, each with the envelope
/// indexes of its matching recipients still to be delivered (and whether
/// it is held).
async fn select(
    spool: &ShardSpool,
    cfg: &RelayConfig,
    selector: &Selector,
) -> Vec<(String, Vec<usize>, bool, usize)> {
    let pick = |rcpts: &[(Box<str>, RcptState)]| -> Vec<usize> {
        rcpts
            .iter()
            .enumerate()
            .filter(|(_, (a, s))| !s.finished() && selector.rcpt_matches(a, cfg))
            .map(|(i, _)| i)
            .collect()
    };
    if let Selector::Id(id) = selector {
        let Some(e) = spool.entry(id) else {
            return Vec::new();
        };
        let rcpts: Vec<(Box<str>, RcptState)> = e
            .rcpts
            .into_iter()
            .map(|(a, s)| (a.into_boxed_str(), s))
            .collect();
        let total = rcpts.iter().filter(|(_, s)| !s.finished()).count();
        return vec![(e.id, pick(&rcpts), e.held, total)];
    }
    let mut out = Vec::new();
    let mut from = Some(0);
    while let Some(at) = from {
        from = spool.visit(at, SLICE, |v| {
            let matched = pick(v.rcpts);
            if !matched.is_empty() {
                let total = v.rcpts.iter().filter(|(_, s)| !s.finished()).count();
                out.push((v.id.to_string(), matched, v.held, total));
            }
        });
        glommio::yield_if_needed().await;
    }
    out
}

async fn act(
    spool: &Rc<ShardSpool>,
    relay: Option<&Rc<Relay>>,
    cfg: &RelayConfig,
    action: &Action,
    selector: &Selector,
) -> Affected {
    let picked = select(spool, cfg, selector).await;
    let mut done = Affected::default();
    // Per message: the ops that carry the action out, then whether to
    // schedule it again.
    let mut plans: Vec<(String, usize, Vec<JournalOp>, bool)> = Vec::new();
    let mut bounces: Vec<(String, Vec<usize>)> = Vec::new();
    for (id, rcpts, held, unfinished) in picked {
        let n = rcpts.len();
        let ops = match action {
            Action::Hold if !held => vec![JournalOp::Hold { id: id.clone() }],
            Action::Release if held => vec![JournalOp::Release { id: id.clone() }],
            Action::Hold | Action::Release => continue,
            Action::Flush => vec![JournalOp::Flush { id: id.clone() }],
            // The whole message: one op.
            Action::Delete if n == unfinished => vec![JournalOp::Delete { id: id.clone() }],
            Action::Delete => rcpts
                .iter()
                .map(|&rcpt| JournalOp::Bounced {
                    id: id.clone(),
                    rcpt,
                })
                .collect(),
            Action::Bounce { .. } => {
                bounces.push((id, rcpts));
                continue;
            }
        };
        let requeue = matches!(action, Action::Release | Action::Flush);
        plans.push((id, n, ops, requeue));
    }
    for chunk in plans.chunks(BATCH) {
        let tasks: Vec<_> = chunk
            .iter()
            .map(|(_, _, ops, _)| {
                let (spool, ops) = (spool.clone(), ops.clone());
                glommio::spawn_local(async move {
                    for op in ops {
                        spool.apply(op).await?;
                    }
                    Ok::<(), crate::spool::SpoolError>(())
                })
            })
            .collect();
        for ((id, n, _, requeue), task) in chunk.iter().zip(tasks) {
            match task.await {
                Ok(()) => {
                    done.messages += 1;
                    done.recipients += n;
                    done.ids.push(id.clone());
                    if let (true, Some(r)) = (requeue, relay) {
                        r.enqueue(id.as_str());
                    }
                }
                Err(e) => {
                    tracing::error!(%id, error = %e, action = action.name(), "cannot journal an admin action");
                    done.failed += 1;
                }
            }
        }
    }
    if let (Action::Bounce { reason }, Some(relay)) = (action, relay) {
        for chunk in bounces.chunks(BATCH / 4) {
            let tasks: Vec<_> = chunk
                .iter()
                .map(|(id, rcpts)| {
                    let (relay, id, rcpts, reason) =
                        (relay.clone(), id.clone(), rcpts.clone(), reason.clone());
                    glommio::spawn_local(async move {
                        relay.bounce(&QueueId::new(&id), &rcpts, &reason).await
                    })
                })
                .collect();
            for ((id, rcpts), task) in chunk.iter().zip(tasks) {
                if task.await {
                    done.messages += 1;
                    done.recipients += rcpts.len();
                    done.ids.push(id.clone());
                } else {
                    done.failed += 1;
                }
            }
        }
    }
    if let Some(r) = relay {
        // Work of this shard's messages queued here goes back at once;
        // the admin side asks the other shards with the ids.
        if action.withdraws() && !done.ids.is_empty() {
            let ids: HashSet<QueueId> = done.ids.iter().map(|i| QueueId::new(i)).collect();
            r.withdraw(&ids);
        }
    }
    done
}

/// One suspended destination, as kept in the suspensions file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Suspension {
    pub destination: String,
    /// Only mail from this source (`[source.NAME]` of the shaping file)
    /// to the destination is suspended; none: all of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Unix time it ends.
    pub until: u64,
    pub reason: String,
}

impl Suspension {
    /// How a shard names it: `DESTINATION` or `DESTINATION via SOURCE`
    /// (lower case).
    pub fn key(&self) -> String {
        suspension_key(&self.destination, self.source.as_deref())
    }
}

/// `destination`, or `destination via source`, lower case: the name of a
/// suspension on the shards.
pub fn suspension_key(destination: &str, source: Option<&str>) -> String {
    match source {
        None => destination.to_ascii_lowercase(),
        Some(s) => format!("{destination} via {s}").to_ascii_lowercase(),
    }
}

/// The file in the spool's root where shard `shard` keeps the suspensions
/// it made itself (throttling replies), so that a restart does not
/// hammer a receiver that just asked us to slow down.
pub fn automatic_file(shard: usize) -> String {
    format!("suspended-auto-{shard}.json")
}

/// The automatic suspensions as their file holds them (the format of
/// `suspended.json`, reason `automatic`).
pub fn encode_automatic(list: &[(String, u64)]) -> Vec<u8> {
    let suspended = list
        .iter()
        .map(|(key, until)| {
            let (destination, source) = split_suspension_key(key);
            Suspension {
                destination: destination.to_owned(),
                source: source.map(str::to_owned),
                until: *until,
                reason: "automatic".into(),
            }
        })
        .collect();
    serde_json::to_vec_pretty(&SuspensionsFile { suspended }).unwrap_or_default()
}

/// Every shard's automatic suspensions still in force at `now` (the
/// files of any number of shards: the count may have changed), as
/// (name, end). A file that cannot be read is logged and skipped.
pub fn load_automatic(spool_root: &Path, now: u64) -> Vec<(String, u64)> {
    let Ok(dir) = std::fs::read_dir(spool_root) else {
        return Vec::new();
    };
    let mut out: HashMap<String, u64> = HashMap::new();
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !(name.starts_with("suspended-auto-") && name.ends_with(".json")) {
            continue;
        }
        let parsed = std::fs::read(entry.path())
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<SuspensionsFile>(&b).map_err(|e| e.to_string()));
        match parsed {
            Ok(f) => {
                for s in f.suspended.into_iter().filter(|s| s.until > now) {
                    let slot = out.entry(s.key()).or_insert(s.until);
                    *slot = (*slot).max(s.until);
                }
            }
            Err(e) => tracing::warn!(file = %name, error = %e, "automatic suspensions not read"),
        }
    }
    out.into_iter().collect()
}

/// A shard's suspension name split back into destination and source.
pub fn split_suspension_key(key: &str) -> (&str, Option<&str>) {
    match key.rsplit_once(" via ") {
        Some((d, s)) => (d, Some(s)),
        None => (key, None),
    }
}

/// The suspended destinations and the durable file that keeps them
/// (`<spool>/suspended.json`). Owned by the admin side; each shard keeps
/// its own copy of the destinations and end times.
#[derive(Debug)]
pub struct Suspensions {
    path: PathBuf,
    list: Vec<Suspension>,
}

#[derive(Serialize, Deserialize)]
struct SuspensionsFile {
    suspended: Vec<Suspension>,
}

impl Suspensions {
    /// Reads the file under `spool_root` (none yet: nothing suspended);
    /// suspensions already over are left out.
    pub fn load(spool_root: &Path) -> std::io::Result<Suspensions> {
        let path = spool_root.join("suspended.json");
        let list = match std::fs::read(&path) {
            Ok(bytes) => {
                let f: SuspensionsFile = serde_json::from_slice(&bytes).map_err(|e| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("{}: {e}", path.display()),
                    )
                })?;
                f.suspended
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        let mut s = Suspensions { path, list };
        s.expire(unix_now());
        Ok(s)
    }

    /// The suspensions in force at `now`.
    pub fn active(&mut self, now: u64) -> &[Suspension] {
        self.expire(now);
        &self.list
    }

    fn expire(&mut self, now: u64) {
        self.list.retain(|s| s.until > now);
    }

    /// Adds or replaces the suspension of `s.destination` (any case) from
    /// `s.source` and makes it durable.
    pub fn add(&mut self, s: Suspension) -> std::io::Result<()> {
        let mut next = self.list.clone();
        let key = s.key();
        next.retain(|o| o.key() != key);
        next.push(s);
        self.store(next)
    }

    /// Removes the suspension named `key` ([`suspension_key`]), durably;
    /// `false` if there was none.
    pub fn remove(&mut self, key: &str) -> std::io::Result<bool> {
        let mut next = self.list.clone();
        next.retain(|o| !o.key().eq_ignore_ascii_case(key));
        if next.len() == self.list.len() {
            return Ok(false);
        }
        self.store(next)?;
        Ok(true)
    }

    /// Temp file, sync, rename, sync the directory: the file is the old
    /// list or the new one after a crash, never a torn one.
    fn store(&mut self, list: Vec<Suspension>) -> std::io::Result<()> {
        let body = serde_json::to_vec_pretty(&SuspensionsFile {
            suspended: list.clone(),
        })
        .map_err(std::io::Error::other)?;
        let tmp = self.path.with_extension("json.tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&body)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        self.list = list;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suspensions_are_durable_and_expire() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Suspensions::load(dir.path()).unwrap();
        assert!(s.active(0).is_empty());
        let far = unix_now() + 3600;
        s.add(Suspension {
            destination: "smtp:a.example:25".into(),
            source: None,
            until: far,
            reason: "maintenance".into(),
        })
        .unwrap();
        s.add(Suspension {
            destination: "b.example".into(),
            source: Some("a".into()),
            until: 1,
            reason: String::new(),
        })
        .unwrap();
        let mut again = Suspensions::load(dir.path()).unwrap();
        let active = again.active(unix_now());
        assert_eq!(active.len(), 1, "{active:?}");
        assert_eq!(active[0].reason, "maintenance");
        assert!(again.remove("SMTP:A.example:25").unwrap());
        assert!(!again.remove("smtp:a.example:25").unwrap());
        assert!(Suspensions::load(dir.path()).unwrap().active(0).is_empty());
    }
}
