//! The queue: which messages are in the spool, where, and what is left to do
//! for each recipient. Kept in memory per shard, rebuilt at start from the
//! segments and the journal, changed only through [`JournalOp`]s that are
//! made durable before they count.
//!
//! Pure data structure: no I/O here (the shard's `ShardSpool` writes the
//! journal and deletes finished segments).

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;

use hashbrown::HashTable;

/// Where a message record lives.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Location {
    /// Segment file name, e.g. `000-00060a3b4c5d6e7f.seg`. One allocation
    /// is shared by every queued message of the segment (the index interns
    /// it); `Arc`, as a location crosses shards in a handoff.
    pub segment: Arc<str>,
    pub offset: u64,
    /// Length of the whole record.
    pub len: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RcptState {
    Pending,
    /// Retry not before this Unix time.
    Deferred {
        until: u64,
    },
    Delivered,
    Bounced,
}

impl RcptState {
    pub fn finished(self) -> bool {
        matches!(self, RcptState::Delivered | RcptState::Bounced)
    }
}

/// One queued message, as handed out by the index (an owned copy; the index
/// keeps a compact form of it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub id: String,
    pub location: Location,
    pub arrival: u64,
    /// `None` is the null reverse-path.
    pub mail_from: Option<String>,
    pub rcpts: Vec<(String, RcptState)>,
    pub held: bool,
    /// The source-IP pool chosen at intake (`pool` in the envelope).
    pub pool: Option<String>,
}

/// A queue id in 16 bytes and no allocation for the ids ringmta makes
/// (22 lowercase hex digits, see `ShardSpool::next_id`), packed two digits
/// a byte. Any other text (older spools, tests, operator typos) is kept as
/// text, so every string maps to exactly one `QueueId`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct QueueId(Repr);

#[derive(Clone, PartialEq, Eq, Hash)]
enum Repr {
    Hex([u8; HEX_DIGITS / 2]),
    // Boxed twice: the thin pointer is what keeps `QueueId` at 16 bytes
    // (a `Box<str>` beside the tag would make it 24).
    Text(Box<Box<str>>),
}

const HEX_DIGITS: usize = 22;

impl QueueId {
    pub fn new(id: &str) -> QueueId {
        let b = id.as_bytes();
        if b.len() == HEX_DIGITS && b.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')) {
            let mut packed = [0u8; HEX_DIGITS / 2];
            for (p, pair) in packed.iter_mut().zip(b.chunks_exact(2)) {
                *p = (nibble(pair[0]) << 4) | nibble(pair[1]);
            }
            return QueueId(Repr::Hex(packed));
        }
        QueueId(Repr::Text(Box::new(id.into())))
    }

    /// Calls `f` with the id as text (no allocation).
    pub fn with_str<R>(&self, f: impl FnOnce(&str) -> R) -> R {
        match &self.0 {
            Repr::Hex(packed) => {
                let mut buf = [0u8; HEX_DIGITS];
                for (pair, p) in buf.chunks_exact_mut(2).zip(packed) {
                    pair[0] = DIGITS[usize::from(p >> 4)];
                    pair[1] = DIGITS[usize::from(p & 0xf)];
                }
                // invariant: every byte is an ASCII hex digit.
                f(std::str::from_utf8(&buf).expect("hex digits are ASCII"))
            }
            Repr::Text(t) => f(t),
        }
    }
}

const DIGITS: &[u8; 16] = b"0123456789abcdef";

fn nibble(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        _ => c - b'a' + 10,
    }
}

impl From<&str> for QueueId {
    fn from(id: &str) -> QueueId {
        QueueId::new(id)
    }
}

impl From<String> for QueueId {
    fn from(id: String) -> QueueId {
        QueueId::new(&id)
    }
}

impl PartialEq<str> for QueueId {
    fn eq(&self, other: &str) -> bool {
        self.with_str(|s| s == other)
    }
}

/// The order of the ids as text.
impl Ord for QueueId {
    fn cmp(&self, other: &QueueId) -> Ordering {
        match (&self.0, &other.0) {
            // Packed digits sort as the digits do.
            (Repr::Hex(a), Repr::Hex(b)) => a.cmp(b),
            _ => self.with_str(|a| other.with_str(|b| a.cmp(b))),
        }
    }
}

impl PartialOrd for QueueId {
    fn partial_cmp(&self, other: &QueueId) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for QueueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.with_str(|s| f.write_str(s))
    }
}

impl fmt::Debug for QueueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.with_str(|s| fmt::Debug::fmt(s, f))
    }
}

/// A change to the queue, as written to the journal (one text line each).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JournalOp {
    Delivered {
        id: String,
        rcpt: usize,
    },
    Bounced {
        id: String,
        rcpt: usize,
    },
    Deferred {
        id: String,
        rcpt: usize,
        until: u64,
    },
    Delete {
        id: String,
    },
    Hold {
        id: String,
    },
    Release {
        id: String,
    },
    /// Retry now: clears every deferral of the message.
    Flush {
        id: String,
    },
}

impl JournalOp {
    pub fn id(&self) -> &str {
        match self {
            JournalOp::Delivered { id, .. }
            | JournalOp::Bounced { id, .. }
            | JournalOp::Deferred { id, .. }
            | JournalOp::Delete { id }
            | JournalOp::Hold { id }
            | JournalOp::Release { id }
            | JournalOp::Flush { id } => id,
        }
    }

    pub fn encode(&self) -> String {
        match self {
            JournalOp::Delivered { id, rcpt } => format!("delivered {id} {rcpt}"),
            JournalOp::Bounced { id, rcpt } => format!("bounced {id} {rcpt}"),
            JournalOp::Deferred { id, rcpt, until } => format!("deferred {id} {rcpt} {until}"),
            JournalOp::Delete { id } => format!("delete {id}"),
            JournalOp::Hold { id } => format!("hold {id}"),
            JournalOp::Release { id } => format!("release {id}"),
            JournalOp::Flush { id } => format!("flush {id}"),
        }
    }

    pub fn decode(line: &str) -> Option<JournalOp> {
        let mut w = line.split(' ');
        let op = w.next()?;
        let id = w.next()?.to_owned();
        let mut num = || w.next().and_then(|n| n.parse::<u64>().ok());
        let op = match op {
            "delivered" => JournalOp::Delivered {
                id,
                rcpt: usize::try_from(num()?).ok()?,
            },
            "bounced" => JournalOp::Bounced {
                id,
                rcpt: usize::try_from(num()?).ok()?,
            },
            "deferred" => {
                let rcpt = usize::try_from(num()?).ok()?;
                JournalOp::Deferred {
                    id,
                    rcpt,
                    until: num()?,
                }
            }
            "delete" => JournalOp::Delete { id },
            "hold" => JournalOp::Hold { id },
            "release" => JournalOp::Release { id },
            "flush" => JournalOp::Flush { id },
            _ => return None,
        };
        Some(op)
    }
}

/// What applying an op did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// No such message (already finished, or never here): nothing changed.
    Unknown,
    Changed,
    /// The message is finished and left the queue; `segment_empty` names its
    /// segment when no live message remains in it.
    Finished {
        segment_empty: Option<String>,
    },
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Live {
    pub messages: usize,
    pub bytes: u64,
}

/// A borrowed look at one queued message ([`QueueIndex::visit`]).
#[derive(Debug, Clone, Copy)]
pub struct View<'a> {
    pub id: &'a QueueId,
    pub arrival: u64,
    pub held: bool,
    pub mail_from: Option<&'a str>,
    pub rcpts: &'a [(Box<str>, RcptState)],
}

/// The in-memory queue. A million queued messages must fit in a few hundred
/// MiB, so each is one compact [`Slot`] in a dense vector, found through a
/// hash table of 4-byte positions (a map from id to entry would hold a
/// second copy of the id and leave up to half its buckets empty, each as
/// large as an entry). Segment names are interned.
#[derive(Debug, Default)]
pub struct QueueIndex {
    slots: Vec<Slot>,
    /// Positions in `slots`, hashed by the slot's id.
    by_id: HashTable<u32>,
    hasher: RandomState,
    /// Live messages and their record bytes, per segment. Its keys are the
    /// interned segment names.
    live_per_segment: HashMap<Arc<str>, Live>,
    /// Finished messages whose record may still be on disk (their segment
    /// holds live messages too), by id, with that segment: so a record read
    /// again at recovery is not taken for a message still to deliver.
    finished: HashMap<QueueId, Arc<str>>,
}

/// What the index keeps of one message: [`Entry`] without spare capacity,
/// with a packed id and a shared segment name.
#[derive(Debug)]
struct Slot {
    id: QueueId,
    location: Location,
    arrival: u64,
    mail_from: Option<Box<str>>,
    rcpts: Rcpts,
    held: bool,
    pool: Option<Box<str>>,
}

/// The recipients of a slot. Most messages have one, kept inline: the
/// common case costs no allocation but the address's own.
#[derive(Debug)]
enum Rcpts {
    One([(Box<str>, RcptState); 1]),
    Many(Box<[(Box<str>, RcptState)]>),
}

impl std::ops::Deref for Rcpts {
    type Target = [(Box<str>, RcptState)];

    fn deref(&self) -> &Self::Target {
        match self {
            Rcpts::One(one) => one,
            Rcpts::Many(many) => many,
        }
    }
}

impl std::ops::DerefMut for Rcpts {
    fn deref_mut(&mut self) -> &mut Self::Target {
        match self {
            Rcpts::One(one) => one,
            Rcpts::Many(many) => many,
        }
    }
}

impl From<Vec<(String, RcptState)>> for Rcpts {
    fn from(rcpts: Vec<(String, RcptState)>) -> Rcpts {
        let mut it = rcpts.into_iter().map(|(a, s)| (a.into_boxed_str(), s));
        match (it.len(), it.next()) {
            (1, Some(one)) => Rcpts::One([one]),
            (_, first) => Rcpts::Many(first.into_iter().chain(it).collect()),
        }
    }
}

impl Slot {
    fn finished(&self) -> bool {
        self.rcpts.iter().all(|(_, s)| s.finished())
    }

    fn to_entry(&self) -> Entry {
        Entry {
            id: self.id.to_string(),
            location: self.location.clone(),
            arrival: self.arrival,
            mail_from: self.mail_from.as_deref().map(str::to_owned),
            rcpts: self
                .rcpts
                .iter()
                .map(|(a, s)| (a.to_string(), *s))
                .collect(),
            held: self.held,
            pool: self.pool.as_deref().map(str::to_owned),
        }
    }
}

impl From<Entry> for Slot {
    fn from(e: Entry) -> Slot {
        Slot {
            id: QueueId::new(&e.id),
            location: e.location,
            arrival: e.arrival,
            mail_from: e.mail_from.map(String::into_boxed_str),
            rcpts: e.rcpts.into(),
            held: e.held,
            pool: e.pool.map(String::into_boxed_str),
        }
    }
}

impl QueueIndex {
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Adds a message (a new one, or one found by recovery). A second record
    /// with the same id (a crash during compaction) is ignored.
    pub fn insert(&mut self, entry: Entry) {
        self.insert_slot(Slot::from(entry));
    }

    /// Moves a message's record (compaction copied it); returns the segment
    /// it left when nothing live remains there.
    pub fn relocate(&mut self, id: &str, to: Location) -> Option<String> {
        let at = self.position(&QueueId::new(id))?;
        let to = Location {
            segment: self.intern(to.segment),
            ..to
        };
        self.count(&to, true);
        let from = std::mem::replace(&mut self.slots[at].location, to);
        self.count(&from, false).then(|| from.segment.to_string())
    }

    /// Ids of the live messages in `segment`.
    pub fn ids_in(&self, segment: &str) -> Vec<String> {
        self.slots
            .iter()
            .filter(|s| &*s.location.segment == segment)
            .map(|s| s.id.to_string())
            .collect()
    }

    /// A copy of one message's entry.
    pub fn get(&self, id: &str) -> Option<Entry> {
        self.slot(id).map(Slot::to_entry)
    }

    /// Whether the message is on hold; `None` when it is not queued.
    pub fn held(&self, id: &str) -> Option<bool> {
        self.slot(id).map(|s| s.held)
    }

    pub fn contains(&self, id: &str) -> bool {
        self.slot(id).is_some()
    }

    /// Where one message's record is.
    pub fn location(&self, id: &str) -> Option<Location> {
        self.slot(id).map(|s| s.location.clone())
    }

    /// Messages in arrival order (copies).
    pub fn list(&self) -> Vec<Entry> {
        self.by_arrival()
            .into_iter()
            .map(|i| self.slots[i as usize].to_entry())
            .collect()
    }

    /// Where delivery starts with this queue at `now`: in arrival order, the
    /// messages with a recipient due (pending, or deferred until `now` or
    /// before), and the others with the end of their earliest deferral.
    pub fn schedule(&self, now: u64) -> (Vec<QueueId>, Vec<(u64, QueueId)>) {
        let mut due = Vec::with_capacity(self.slots.len());
        let mut later = Vec::new();
        for i in self.by_arrival() {
            let s = &self.slots[i as usize];
            let until = s
                .rcpts
                .iter()
                .filter_map(|(_, st)| match st {
                    RcptState::Deferred { until } => Some(*until),
                    _ => None,
                })
                .min();
            let pending_now = s.rcpts.iter().any(|(_, st)| *st == RcptState::Pending);
            match until {
                Some(t) if !pending_now && t > now => later.push((t, s.id.clone())),
                _ => due.push(s.id.clone()),
            }
        }
        (due, later)
    }

    /// Calls `f(arrival, address)` for every recipient still to be
    /// delivered (no copies) of up to `max` messages from position `from`;
    /// returns where to go on, or `None` at the end. Positions move as
    /// messages leave, so a walk in several calls is approximate.
    pub fn for_each_waiting(
        &self,
        from: usize,
        max: usize,
        mut f: impl FnMut(u64, &str),
    ) -> Option<usize> {
        let end = from.saturating_add(max).min(self.slots.len());
        for e in self.slots.get(from..end).unwrap_or_default() {
            for (addr, state) in e.rcpts.iter() {
                if !state.finished() {
                    f(e.arrival, addr);
                }
            }
        }
        (end < self.slots.len()).then_some(end)
    }

    /// Calls `f` with a borrowed view of each of up to `max` messages from
    /// position `from` (no copies); returns where to go on, or `None` at
    /// the end. As [`QueueIndex::for_each_waiting`], a walk in several
    /// calls is approximate when messages leave in between.
    pub fn visit(&self, from: usize, max: usize, mut f: impl FnMut(View<'_>)) -> Option<usize> {
        let end = from.saturating_add(max).min(self.slots.len());
        for s in self.slots.get(from..end).unwrap_or_default() {
            f(View {
                id: &s.id,
                arrival: s.arrival,
                held: s.held,
                mail_from: s.mail_from.as_deref(),
                rcpts: &s.rcpts,
            });
        }
        (end < self.slots.len()).then_some(end)
    }

    /// Recipients still to be delivered, by domain.
    pub fn count_by_domain(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for e in &self.slots {
            for (addr, state) in e.rcpts.iter() {
                if !state.finished() {
                    let domain = addr.rsplit_once('@').map_or("", |(_, d)| d);
                    *out.entry(domain.to_ascii_lowercase()).or_default() += 1;
                }
            }
        }
        out
    }

    /// Every segment the index refers to: with live messages, or with
    /// finished ones not forgotten yet.
    pub fn segment_names(&self) -> impl Iterator<Item = &str> {
        let mut names: std::collections::HashSet<&str> =
            self.live_per_segment.keys().map(|s| &**s).collect();
        names.extend(self.finished.values().map(|s| &**s));
        names.into_iter()
    }

    /// Whether `segment` holds at least one live message.
    pub fn segment_is_live(&self, segment: &str) -> bool {
        self.live_per_segment.contains_key(segment)
    }

    /// Segments that hold at least one live message.
    pub fn live_segments(&self) -> impl Iterator<Item = (&str, Live)> {
        self.live_per_segment.iter().map(|(s, n)| (&**s, *n))
    }

    pub fn apply(&mut self, op: &JournalOp) -> Applied {
        let Some(at) = self.position(&QueueId::new(op.id())) else {
            return Applied::Unknown;
        };
        let e = &mut self.slots[at];
        let set = |e: &mut Slot, rcpt: usize, s: RcptState| {
            if let Some(r) = e.rcpts.get_mut(rcpt) {
                r.1 = s;
            }
        };
        match op {
            JournalOp::Delivered { rcpt, .. } => set(e, *rcpt, RcptState::Delivered),
            JournalOp::Bounced { rcpt, .. } => set(e, *rcpt, RcptState::Bounced),
            JournalOp::Deferred { rcpt, until, .. } => {
                set(e, *rcpt, RcptState::Deferred { until: *until })
            }
            JournalOp::Hold { .. } => e.held = true,
            JournalOp::Release { .. } => e.held = false,
            JournalOp::Flush { .. } => {
                for r in e.rcpts.iter_mut() {
                    if let RcptState::Deferred { .. } = r.1 {
                        r.1 = RcptState::Pending;
                    }
                }
            }
            JournalOp::Delete { .. } => {
                for r in e.rcpts.iter_mut() {
                    if !r.1.finished() {
                        r.1 = RcptState::Bounced;
                    }
                }
            }
        }
        if !e.finished() {
            return Applied::Changed;
        }
        let slot = self.remove_at(at);
        let location = slot.location;
        self.finished.insert(slot.id, location.segment.clone());
        let segment_empty = self
            .count(&location, false)
            .then(|| location.segment.to_string());
        Applied::Finished { segment_empty }
    }

    /// A segment file was deleted: its finished messages are gone for good.
    pub fn forget_segment(&mut self, segment: &str) {
        self.finished.retain(|_, s| &**s != segment);
    }

    /// The ops that rebuild the current state from the segments alone: the
    /// content of a compacted journal. Finished messages whose record may
    /// still be on disk (every one whose segment was not forgotten: a
    /// segment left empty can outlive the snapshot) are marked finished (as
    /// deleted) so they stay finished.
    pub fn snapshot(&self) -> Vec<JournalOp> {
        self.snapshot_where(|_| true)
    }

    /// [`QueueIndex::snapshot`] of the messages whose segment satisfies
    /// `pick`.
    pub fn snapshot_where(&self, pick: impl Fn(&str) -> bool) -> Vec<JournalOp> {
        let mut ops: Vec<JournalOp> = self
            .finished
            .iter()
            .filter(|(_, seg)| pick(seg))
            .map(|(id, _)| JournalOp::Delete { id: id.to_string() })
            .collect();
        for i in self.by_arrival() {
            let e = &self.slots[i as usize];
            if !pick(&e.location.segment) {
                continue;
            }
            if e.held {
                ops.push(JournalOp::Hold {
                    id: e.id.to_string(),
                });
            }
            for (i, (_, s)) in e.rcpts.iter().enumerate() {
                let id = || e.id.to_string();
                match *s {
                    RcptState::Pending => {}
                    RcptState::Deferred { until } => ops.push(JournalOp::Deferred {
                        id: id(),
                        rcpt: i,
                        until,
                    }),
                    RcptState::Delivered => ops.push(JournalOp::Delivered { id: id(), rcpt: i }),
                    RcptState::Bounced => ops.push(JournalOp::Bounced { id: id(), rcpt: i }),
                }
            }
        }
        ops
    }

    /// Moves out the messages whose segment satisfies `pick` (for handing a
    /// recovered queue to the shard that owns each segment).
    pub fn split_off(&mut self, pick: impl Fn(&str) -> bool) -> QueueIndex {
        // The common case (one shard, or the last one to take its part):
        // hand over the whole index rather than build a copy of it beside
        // the original.
        if self.slots.iter().all(|s| pick(&s.location.segment))
            && self.finished.values().all(|s| pick(s))
        {
            return std::mem::take(self);
        }
        let mut out = QueueIndex::default();
        let mut at = 0;
        while at < self.slots.len() {
            if pick(&self.slots[at].location.segment) {
                let slot = self.remove_at(at);
                self.count(&slot.location, false);
                out.insert_slot(slot);
            } else {
                at += 1;
            }
        }
        for (id, seg) in self.finished.extract_if(|_, seg| pick(seg)) {
            let seg = out.intern(seg);
            out.finished.insert(id, seg);
        }
        // What stays here is the next shard's part: not the room the whole
        // recovered queue took.
        self.slots.shrink_to_fit();
        let (slots, hasher) = (&self.slots, &self.hasher);
        self.by_id
            .shrink_to_fit(|&i| hasher.hash_one(&slots[i as usize].id));
        out
    }

    fn insert_slot(&mut self, mut slot: Slot) {
        if self.position(&slot.id).is_some() || self.finished.contains_key(&slot.id) {
            return;
        }
        slot.location.segment = self.intern(slot.location.segment);
        self.count(&slot.location, true);
        // invariant: 2^32 messages would take a terabyte of index first.
        let at = u32::try_from(self.slots.len()).expect("fewer than 2^32 queued messages");
        let hash = self.hasher.hash_one(&slot.id);
        self.slots.push(slot);
        let (slots, hasher) = (&self.slots, &self.hasher);
        self.by_id
            .insert_unique(hash, at, |&i| hasher.hash_one(&slots[i as usize].id));
    }

    /// Removes the slot at `at`; the last slot takes its place.
    fn remove_at(&mut self, at: usize) -> Slot {
        let last = self.slots.len() - 1;
        let hash = self.hasher.hash_one(&self.slots[at].id);
        if let Ok(found) = self.by_id.find_entry(hash, |&i| i as usize == at) {
            found.remove();
        }
        if at != last {
            let hash = self.hasher.hash_one(&self.slots[last].id);
            if let Some(i) = self.by_id.find_mut(hash, |&i| i as usize == last) {
                // invariant: `at` < `last`, a position already in the table.
                *i = u32::try_from(at).expect("a position below another");
            }
        }
        let slot = self.slots.swap_remove(at);
        // Give memory back as the queue drains.
        if self.slots.capacity() > 1024 && self.slots.len() < self.slots.capacity() / 4 {
            self.slots.shrink_to(self.slots.len() * 2);
            let (slots, hasher) = (&self.slots, &self.hasher);
            self.by_id
                .shrink_to(slots.len() * 2, |&i| hasher.hash_one(&slots[i as usize].id));
        }
        slot
    }

    fn position(&self, id: &QueueId) -> Option<usize> {
        let hash = self.hasher.hash_one(id);
        self.by_id
            .find(hash, |&i| self.slots[i as usize].id == *id)
            .map(|&i| i as usize)
    }

    fn slot(&self, id: &str) -> Option<&Slot> {
        self.position(&QueueId::new(id)).map(|at| &self.slots[at])
    }

    /// Positions of the slots in arrival order (ties: by id).
    fn by_arrival(&self) -> Vec<u32> {
        // invariant: `insert_slot` keeps the count below 2^32.
        let mut order: Vec<u32> = (0..u32::try_from(self.slots.len()).expect("< 2^32")).collect();
        order.sort_unstable_by(|&a, &b| {
            let (a, b) = (&self.slots[a as usize], &self.slots[b as usize]);
            (a.arrival, &a.id).cmp(&(b.arrival, &b.id))
        });
        order
    }

    /// The shared copy of a segment name, when one is already held.
    fn intern(&self, segment: Arc<str>) -> Arc<str> {
        match self.live_per_segment.get_key_value(&*segment) {
            Some((shared, _)) => shared.clone(),
            None => segment,
        }
    }

    /// Adds or removes one record from its segment's tally; `true` when a
    /// removal left the segment without live messages.
    fn count(&mut self, at: &Location, add: bool) -> bool {
        if add {
            let live = self.live_per_segment.entry(at.segment.clone()).or_default();
            live.messages += 1;
            live.bytes += at.len;
            return false;
        }
        let Some(live) = self.live_per_segment.get_mut(&*at.segment) else {
            return true;
        };
        live.messages = live.messages.saturating_sub(1);
        live.bytes = live.bytes.saturating_sub(at.len);
        if live.messages == 0 {
            self.live_per_segment.remove(&*at.segment);
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, seg: &str, rcpts: &[&str]) -> Entry {
        Entry {
            id: id.into(),
            location: Location {
                segment: seg.into(),
                offset: 0,
                len: 100,
            },
            arrival: 1,
            mail_from: Some("a@example.org".into()),
            rcpts: rcpts
                .iter()
                .map(|r| (r.to_string(), RcptState::Pending))
                .collect(),
            held: false,
            pool: None,
        }
    }

    #[test]
    fn ops_round_trip_as_text() {
        for op in [
            JournalOp::Delivered {
                id: "x1".into(),
                rcpt: 2,
            },
            JournalOp::Bounced {
                id: "x1".into(),
                rcpt: 0,
            },
            JournalOp::Deferred {
                id: "x1".into(),
                rcpt: 1,
                until: 1_795_431_260,
            },
            JournalOp::Delete { id: "x1".into() },
            JournalOp::Hold { id: "x1".into() },
            JournalOp::Release { id: "x1".into() },
            JournalOp::Flush { id: "x1".into() },
        ] {
            assert_eq!(JournalOp::decode(&op.encode()), Some(op));
        }
        assert_eq!(JournalOp::decode("delivered x1"), None);
        assert_eq!(JournalOp::decode("frobnicate x1"), None);
    }

    #[test]
    fn waiting_recipients_are_walked_in_slices() {
        let mut q = QueueIndex::default();
        for i in 0..5 {
            q.insert(entry(
                &format!("m{i}"),
                "s1",
                &["a@x.example", "b@y.example"],
            ));
        }
        let done = JournalOp::Delivered {
            id: "m2".into(),
            rcpt: 1,
        };
        assert_eq!(q.apply(&done), Applied::Changed);
        let mut seen = Vec::new();
        let mut from = Some(0);
        let mut calls = 0;
        while let Some(at) = from {
            from = q.for_each_waiting(at, 2, |_, addr| seen.push(addr.to_owned()));
            calls += 1;
        }
        assert_eq!(calls, 3);
        assert_eq!(seen.len(), 9, "{seen:?}");
        assert_eq!(seen.iter().filter(|a| *a == "b@y.example").count(), 4);
        assert_eq!(
            q.for_each_waiting(7, 2, |_, _| panic!("past the end")),
            None
        );
    }

    #[test]
    fn a_message_finishes_when_every_recipient_has() {
        let mut q = QueueIndex::default();
        q.insert(entry("m1", "s1", &["a@x.example", "b@y.example"]));
        q.insert(entry("m2", "s1", &["c@x.example"]));
        assert_eq!(q.count_by_domain().get("x.example"), Some(&2));
        let d = |id: &str, rcpt| JournalOp::Delivered {
            id: id.into(),
            rcpt,
        };
        assert_eq!(q.apply(&d("m1", 0)), Applied::Changed);
        assert_eq!(
            q.apply(&JournalOp::Bounced {
                id: "m1".into(),
                rcpt: 1
            }),
            Applied::Finished {
                segment_empty: None
            }
        );
        assert_eq!(q.apply(&d("m1", 0)), Applied::Unknown);
        assert_eq!(
            q.apply(&JournalOp::Delete { id: "m2".into() }),
            Applied::Finished {
                segment_empty: Some("s1".into())
            }
        );
        assert!(q.is_empty());
    }

    /// Regression: a finished message in a segment that is kept (other
    /// messages in it are live) must stay finished across two restarts.
    #[test]
    fn finished_messages_in_kept_segments_stay_finished() {
        let mut q = QueueIndex::default();
        q.insert(entry("m1", "s1", &["a@x.example"]));
        q.insert(entry("m2", "s1", &["b@x.example"]));
        q.apply(&JournalOp::Delivered {
            id: "m1".into(),
            rcpt: 0,
        });
        let snap = q.snapshot();
        // Restart: the segment is scanned again, then the snapshot replayed.
        let mut r = QueueIndex::default();
        r.insert(entry("m1", "s1", &["a@x.example"]));
        r.insert(entry("m2", "s1", &["b@x.example"]));
        for op in &snap {
            r.apply(op);
        }
        assert!(r.get("m1").is_none(), "m1 came back after a restart");
        assert!(r.get("m2").is_some());
        // And again from this state's snapshot.
        let snap2 = r.snapshot();
        let mut r2 = QueueIndex::default();
        r2.insert(entry("m1", "s1", &["a@x.example"]));
        r2.insert(entry("m2", "s1", &["b@x.example"]));
        for op in &snap2 {
            r2.apply(op);
        }
        assert!(
            r2.get("m1").is_none(),
            "m1 came back after a second restart"
        );
        // A record read twice (compaction copy) is not a second message.
        r2.insert(entry("m1", "s9", &["a@x.example"]));
        assert!(r2.get("m1").is_none());
    }

    #[test]
    fn relocation_moves_the_tally() {
        let mut q = QueueIndex::default();
        q.insert(entry("m1", "s1", &["a@x.example"]));
        q.insert(entry("m2", "s1", &["b@x.example"]));
        let to = Location {
            segment: "s2".into(),
            offset: 0,
            len: 100,
        };
        assert_eq!(q.relocate("m1", to.clone()), None);
        assert_eq!(
            q.relocate("m2", Location { offset: 100, ..to }),
            Some("s1".into())
        );
        let live: Vec<_> = q.live_segments().collect();
        assert_eq!(
            live,
            [(
                "s2",
                Live {
                    messages: 2,
                    bytes: 200
                }
            )]
        );
        assert_eq!(q.ids_in("s1"), Vec::<String>::new());
    }

    #[test]
    fn queue_ids_pack_ours_and_keep_any_other_text() {
        let ours = "00060a3b4c5d6e7f00a1b2";
        for text in [
            ours,
            "m1",
            "",
            "00060A3B4C5D6E7F00A1B2",
            "00060a3b4c5d6e7f00a1b",
        ] {
            let id = QueueId::new(text);
            assert_eq!(id.to_string(), text);
            assert!(id == *text);
        }
        assert!(matches!(QueueId::new(ours).0, Repr::Hex(_)));
        assert!(matches!(
            QueueId::new("00060A3B4C5D6E7F00A1B2").0,
            Repr::Text(_)
        ));
        assert_eq!(std::mem::size_of::<QueueId>(), 16);
        // Ordered as the text is, packed or not.
        let mut ids = [
            "m1",
            "00060a3b4c5d6e7f00a1b2",
            "00060a3b4c5d6e7f00a1b3",
            "0z",
            "ff",
        ];
        let mut packed: Vec<QueueId> = ids.iter().map(|t| QueueId::new(t)).collect();
        ids.sort();
        packed.sort();
        let back: Vec<String> = packed.iter().map(QueueId::to_string).collect();
        assert_eq!(back, ids);
    }

    /// Messages of one segment share one copy of its name, however the
    /// name reached the index.
    #[test]
    fn segment_names_are_interned() {
        let mut q = QueueIndex::default();
        q.insert(entry("m1", "000-00060a3b4c5d6e7f.seg", &["a@x.example"]));
        q.insert(entry("m2", "000-00060a3b4c5d6e7f.seg", &["b@x.example"]));
        let (m1, m2) = (q.get("m1").unwrap(), q.get("m2").unwrap());
        assert!(Arc::ptr_eq(&m1.location.segment, &m2.location.segment));
        q.insert(entry("m3", "001-00060a3b4c5d6e80.seg", &["c@x.example"]));
        let to = Location {
            segment: "001-00060a3b4c5d6e80.seg".into(),
            offset: 100,
            len: 100,
        };
        q.relocate("m1", to);
        let (m1, m3) = (q.get("m1").unwrap(), q.get("m3").unwrap());
        assert!(Arc::ptr_eq(&m1.location.segment, &m3.location.segment));
    }

    #[test]
    fn removals_keep_every_other_message_findable() {
        let mut q = QueueIndex::default();
        let ids: Vec<String> = (0..3000).map(|i| format!("{i:022x}")).collect();
        for (i, id) in ids.iter().enumerate() {
            q.insert(entry(id, &format!("s{}", i % 7), &["a@x.example"]));
        }
        // Remove all but one in sixteen (the index shrinks on the way).
        for id in ids.iter().filter(|id| !id.ends_with('0')) {
            let done = q.apply(&JournalOp::Delete { id: id.clone() });
            assert!(matches!(done, Applied::Finished { .. }), "{id}");
        }
        let left: Vec<&String> = ids.iter().filter(|id| id.ends_with('0')).collect();
        assert_eq!(q.len(), left.len());
        for id in left {
            assert_eq!(q.get(id).map(|e| e.id), Some(id.clone()));
        }
        let listed: Vec<String> = q.list().into_iter().map(|e| e.id).collect();
        let mut sorted = listed.clone();
        sorted.sort();
        assert_eq!(listed, sorted, "arrival ties are listed by id");
    }

    #[test]
    fn splitting_hands_over_each_part_once() {
        let mut q = QueueIndex::default();
        q.insert(entry("m1", "000-a.seg", &["a@x.example"]));
        q.insert(entry("m2", "001-a.seg", &["a@x.example"]));
        q.insert(entry("m3", "000-a.seg", &["a@x.example"]));
        q.apply(&JournalOp::Delete { id: "m3".into() });
        let zero = q.split_off(|s| s.starts_with("000"));
        assert_eq!(zero.len(), 1);
        assert!(zero.get("m1").is_some());
        assert_eq!(zero.snapshot(), [JournalOp::Delete { id: "m3".into() }]);
        let one = q.split_off(|_| true);
        assert!(one.get("m2").is_some());
        assert!(q.is_empty());
        assert_eq!(q.live_segments().count(), 0);
    }

    /// Journal compaction on a running shard (issue 11): a crash can leave
    /// the old journal files, or only the newest of them (they are removed
    /// oldest first), before the snapshot. Replaying whatever is left,
    /// then the snapshot, then the changes made after it must give the
    /// queue the shard had, for any history of changes.
    #[test]
    fn snapshot_after_any_suffix_of_the_old_journal_gives_the_same_queue() {
        use crate::smtp::data::tests::XorShift;
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let fresh = || {
            let mut q = QueueIndex::default();
            for m in 0..6 {
                let seg = if m < 3 { "s1" } else { "s2" };
                q.insert(entry(
                    &format!("m{m}"),
                    seg,
                    &["a@x.example", "b@y.example", "c@z.example"],
                ));
            }
            q
        };
        for round in 0..300 {
            let mut ops = Vec::new();
            for _ in 0..(rng.next() % 40) {
                let id = format!("m{}", rng.next() % 6);
                let rcpt = (rng.next() % 3) as usize;
                ops.push(match rng.next() % 9 {
                    0 => JournalOp::Delivered { id, rcpt },
                    1 => JournalOp::Bounced { id, rcpt },
                    2 | 3 => JournalOp::Deferred {
                        id,
                        rcpt,
                        until: rng.next() % 1000,
                    },
                    4 => JournalOp::Hold { id },
                    5 => JournalOp::Release { id },
                    6 => JournalOp::Flush { id },
                    7 if rng.next().is_multiple_of(4) => JournalOp::Delete { id },
                    _ => JournalOp::Hold { id },
                });
            }
            let compacted_at = (rng.next() as usize) % (ops.len() + 1);
            let mut before = fresh();
            for op in &ops[..compacted_at] {
                before.apply(op);
            }
            let snapshot = before.snapshot();
            let mut truth = fresh();
            for op in &ops {
                truth.apply(op);
            }
            // Any suffix of the old journal survived the crash.
            for kept in 0..=compacted_at {
                let mut q = fresh();
                for op in ops[kept..compacted_at]
                    .iter()
                    .chain(&snapshot)
                    .chain(&ops[compacted_at..])
                {
                    q.apply(op);
                }
                assert_eq!(q.list(), truth.list(), "round {round}, kept from {kept}");
            }
        }
    }

    #[test]
    fn snapshot_rebuilds_state() {
        let mut q = QueueIndex::default();
        q.insert(entry(
            "m1",
            "s1",
            &["a@x.example", "b@y.example", "c@z.example"],
        ));
        q.apply(&JournalOp::Delivered {
            id: "m1".into(),
            rcpt: 0,
        });
        q.apply(&JournalOp::Deferred {
            id: "m1".into(),
            rcpt: 2,
            until: 99,
        });
        q.apply(&JournalOp::Hold { id: "m1".into() });
        let mut fresh = QueueIndex::default();
        fresh.insert(entry(
            "m1",
            "s1",
            &["a@x.example", "b@y.example", "c@z.example"],
        ));
        for op in q.snapshot() {
            fresh.apply(&op);
        }
        assert_eq!(fresh.get("m1"), q.get("m1"));
        fresh.apply(&JournalOp::Flush { id: "m1".into() });
        assert_eq!(fresh.get("m1").unwrap().rcpts[2].1, RcptState::Pending);
    }
}
