//! The queue: which messages are in the spool, where, and what is left to do
//! for each recipient. Kept in memory per shard, rebuilt at start from the
//! segments and the journal, changed only through [`JournalOp`]s that are
//! made durable before they count.
//!
//! Pure data structure: no I/O here (the shard's `ShardSpool` writes the
//! journal and deletes finished segments).

use std::collections::{BTreeMap, HashMap};

/// Where a message record lives.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Location {
    /// Segment file name, e.g. `000-00060a3b4c5d6e7f.seg`.
    pub segment: String,
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
    fn finished(self) -> bool {
        matches!(self, RcptState::Delivered | RcptState::Bounced)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub id: String,
    pub location: Location,
    pub arrival: u64,
    /// `None` is the null reverse-path.
    pub mail_from: Option<String>,
    pub rcpts: Vec<(String, RcptState)>,
    pub held: bool,
}

impl Entry {
    fn finished(&self) -> bool {
        self.rcpts.iter().all(|(_, s)| s.finished())
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

#[derive(Debug, Default)]
pub struct QueueIndex {
    entries: HashMap<String, Entry>,
    /// Live messages and their record bytes, per segment.
    live_per_segment: HashMap<String, Live>,
    /// Finished messages whose record may still be on disk (their segment
    /// holds live messages too), by id, with that segment: so a record read
    /// again at recovery is not taken for a message still to deliver.
    finished: HashMap<String, String>,
}

impl QueueIndex {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Adds a message (a new one, or one found by recovery). A second record
    /// with the same id (a crash during compaction) is ignored.
    pub fn insert(&mut self, entry: Entry) {
        if self.entries.contains_key(&entry.id) || self.finished.contains_key(&entry.id) {
            return;
        }
        self.count(&entry.location, true);
        self.entries.insert(entry.id.clone(), entry);
    }

    /// Moves a message's record (compaction copied it); returns the segment
    /// it left when nothing live remains there.
    pub fn relocate(&mut self, id: &str, to: Location) -> Option<String> {
        let from = self.entries.get(id)?.location.clone();
        self.count(&to, true);
        if let Some(e) = self.entries.get_mut(id) {
            e.location = to;
        }
        self.count(&from, false).then_some(from.segment)
    }

    /// Ids of the live messages in `segment`.
    pub fn ids_in(&self, segment: &str) -> Vec<String> {
        self.entries
            .values()
            .filter(|e| e.location.segment == segment)
            .map(|e| e.id.clone())
            .collect()
    }

    /// Adds or removes one record from its segment's tally; `true` when a
    /// removal left the segment without live messages.
    fn count(&mut self, at: &Location, add: bool) -> bool {
        let live = self.live_per_segment.entry(at.segment.clone()).or_default();
        if add {
            live.messages += 1;
            live.bytes += at.len;
            return false;
        }
        live.messages = live.messages.saturating_sub(1);
        live.bytes = live.bytes.saturating_sub(at.len);
        if live.messages == 0 {
            self.live_per_segment.remove(&at.segment);
            return true;
        }
        false
    }

    pub fn get(&self, id: &str) -> Option<&Entry> {
        self.entries.get(id)
    }

    /// Messages in arrival order.
    pub fn list(&self) -> Vec<&Entry> {
        let mut v: Vec<&Entry> = self.entries.values().collect();
        v.sort_by(|a, b| (a.arrival, &a.id).cmp(&(b.arrival, &b.id)));
        v
    }

    /// Recipients still to be delivered, by domain.
    pub fn count_by_domain(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for e in self.entries.values() {
            for (addr, state) in &e.rcpts {
                if !state.finished() {
                    let domain = addr.rsplit_once('@').map_or("", |(_, d)| d);
                    *out.entry(domain.to_ascii_lowercase()).or_default() += 1;
                }
            }
        }
        out
    }

    /// Segments that hold at least one live message.
    pub fn live_segments(&self) -> impl Iterator<Item = (&str, Live)> {
        self.live_per_segment.iter().map(|(s, n)| (s.as_str(), *n))
    }

    pub fn apply(&mut self, op: &JournalOp) -> Applied {
        let Some(e) = self.entries.get_mut(op.id()) else {
            return Applied::Unknown;
        };
        let set = |e: &mut Entry, rcpt: usize, s: RcptState| {
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
                for r in &mut e.rcpts {
                    if let RcptState::Deferred { .. } = r.1 {
                        r.1 = RcptState::Pending;
                    }
                }
            }
            JournalOp::Delete { .. } => {
                for r in &mut e.rcpts {
                    if !r.1.finished() {
                        r.1 = RcptState::Bounced;
                    }
                }
            }
        }
        if !e.finished() {
            return Applied::Changed;
        }
        let location = e.location.clone();
        self.entries.remove(op.id());
        self.finished
            .insert(op.id().to_owned(), location.segment.clone());
        let segment_empty = self.count(&location, false).then_some(location.segment);
        Applied::Finished { segment_empty }
    }

    /// A segment file was deleted: its finished messages are gone for good.
    pub fn forget_segment(&mut self, segment: &str) {
        self.finished.retain(|_, s| s != segment);
    }

    /// The ops that rebuild the current state from the segments alone: the
    /// content of a compacted journal. Finished messages whose record is
    /// still on disk are marked finished (as deleted) so they stay finished.
    pub fn snapshot(&self) -> Vec<JournalOp> {
        let mut ops: Vec<JournalOp> = self
            .finished
            .iter()
            .filter(|(_, seg)| self.live_per_segment.contains_key(*seg))
            .map(|(id, _)| JournalOp::Delete { id: id.clone() })
            .collect();
        for e in self.list() {
            if e.held {
                ops.push(JournalOp::Hold { id: e.id.clone() });
            }
            for (i, (_, s)) in e.rcpts.iter().enumerate() {
                let id = e.id.clone();
                match *s {
                    RcptState::Pending => {}
                    RcptState::Deferred { until } => {
                        ops.push(JournalOp::Deferred { id, rcpt: i, until })
                    }
                    RcptState::Delivered => ops.push(JournalOp::Delivered { id, rcpt: i }),
                    RcptState::Bounced => ops.push(JournalOp::Bounced { id, rcpt: i }),
                }
            }
        }
        ops
    }

    /// Moves out the messages whose segment satisfies `pick` (for handing a
    /// recovered queue to the shard that owns each segment).
    pub fn split_off(&mut self, pick: impl Fn(&str) -> bool) -> QueueIndex {
        let mut out = QueueIndex::default();
        let ids: Vec<String> = self
            .entries
            .values()
            .filter(|e| pick(&e.location.segment))
            .map(|e| e.id.clone())
            .collect();
        for id in ids {
            if let Some(e) = self.entries.remove(&id) {
                self.count(&e.location, false);
                out.insert(e);
            }
        }
        let finished: Vec<(String, String)> = self
            .finished
            .iter()
            .filter(|(_, seg)| pick(seg))
            .map(|(i, s)| (i.clone(), s.clone()))
            .collect();
        for (id, seg) in finished {
            self.finished.remove(&id);
            out.finished.insert(id, seg);
        }
        out
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
