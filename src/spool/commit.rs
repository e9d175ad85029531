//! Group commit into a shard's current segment.
//!
//! Every message that reaches its end while a write+`fdatasync` is in flight
//! joins the next batch; the batch goes out as one write and one
//! `fdatasync`, and every message in it learns the outcome together. Batches
//! are written strictly in order, one at a time, so a record is acknowledged
//! only when it and everything before it in the segment is durable (the
//! property `segment::scan` relies on). Shard-local: glommio runs one task at
//! a time, so `Cell`/`RefCell` suffice.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::io;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use event_listener::Event;
use glommio::io::BufferedFile;

use super::queue::Location;
use super::{segment, SpoolError};

/// How a batch ended, shared by every record in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Durable,
    NoSpace,
    Failed,
}

#[derive(Default)]
struct Batch {
    buf: RefCell<Vec<u8>>,
    records: Cell<u64>,
    outcome: Cell<Option<Outcome>>,
    /// Segment name and offset at which the batch was written.
    placed: RefCell<Option<(Rc<str>, u64)>>,
}

struct OpenSegment {
    name: Rc<str>,
    file: BufferedFile,
    /// Bytes durably written (batches are appended here).
    written: u64,
    /// The file's length: zeros written past `written` (see [`ZEROED_AHEAD`]).
    zeroed: u64,
    /// The zeros did not fit once: this segment is appended to plainly.
    unzeroed: bool,
}

impl OpenSegment {
    /// Closes the file, its zeros cut off first: a closed segment's size is
    /// what compaction weighs its live records against.
    async fn close(self) {
        if self.zeroed > self.written {
            let _ = self.file.truncate(self.written).await;
        }
        let _ = self.file.close().await;
    }
}

/// How far past the last batch a message segment's file is filled with zeros, so
/// that most batches overwrite space the file already has: their
/// fdatasync then writes the data only, not the file's size and block map
/// too (`tuning/fsync-cost.py`: about 120 µs against 210 µs here). The
/// extension itself is written by the batch that needs it, before that
/// batch's fdatasync. Readers stop at the first record that does not verify
/// where only zeros follow ([`segment::scan`]): a clean end, not damage.
const ZEROED_AHEAD: u64 = 1 << 20;

/// Commit statistics, for logs and the bench report.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CommitStats {
    pub batches: u64,
    pub records: u64,
}

pub struct SegmentWriter {
    dir: PathBuf,
    shard: usize,
    /// File name extension: `seg` for messages, `jrn` for the journal.
    ext: &'static str,
    kind: u8,
    /// The checksum seed of every record this writer makes, named in the
    /// file names of its message segments (see `segment`); 0 for journals.
    seed: u32,
    max_segment: u64,
    window: Duration,
    fsync: bool,
    current: RefCell<Rc<Batch>>,
    flushing: Cell<bool>,
    flush_done: Event,
    segment: RefCell<Option<OpenSegment>>,
    /// The open segment's name. Kept apart from `segment`, which is taken
    /// out while a batch is written: the segment is still current then, and
    /// must not look removable.
    current_name: RefCell<Option<Rc<str>>>,
    /// Records written to a segment whose appender has not taken its
    /// location yet (woken, not yet run): the segment holds messages the
    /// queue does not know of, so it must not look removable.
    unclaimed: RefCell<HashMap<Rc<str>, u64>>,
    /// The time part of the last file name made: names only grow, so
    /// files replay in the order they were made.
    last_stamp: Cell<u64>,
    stats: Cell<CommitStats>,
    /// How long the last batch's fdatasync took, for the metrics.
    last_sync: Cell<Option<Duration>>,
    metrics: std::sync::Arc<crate::metrics::ShardMetrics>,
    /// The last durable batches, as written: delivery reads a message it
    /// has just committed from here instead of from the file.
    recent: RefCell<Recent>,
}

/// The newest durable batches of a writer, newest last, at most `limit`
/// bytes of them (`--delivery-cache`): a copy of what is on disk, so a
/// record read from here is the record read from the file.
#[derive(Default)]
struct Recent {
    batches: VecDeque<(Rc<str>, u64, Vec<u8>)>,
    bytes: usize,
    limit: usize,
}

impl Recent {
    fn keep(&mut self, segment: Rc<str>, at: u64, buf: Vec<u8>) {
        if buf.len() > self.limit {
            return;
        }
        self.bytes += buf.capacity();
        self.batches.push_back((segment, at, buf));
        while self.bytes > self.limit {
            let Some((_, _, old)) = self.batches.pop_front() else {
                break;
            };
            self.bytes -= old.capacity();
        }
    }

    fn get(&self, loc: &Location) -> Option<&[u8]> {
        let (_, at, buf) = self.batches.iter().rev().find(|(seg, at, buf)| {
            **seg == *loc.segment && *at <= loc.offset && loc.offset < at + buf.len() as u64
        })?;
        let from = usize::try_from(loc.offset - at).ok()?;
        let to = from.checked_add(usize::try_from(loc.len).ok()?)?;
        buf.get(from..to)
    }
}

impl SegmentWriter {
    pub fn new(
        dir: &Path,
        shard: usize,
        journal: bool,
        max_segment: u64,
        window: Duration,
        fsync: bool,
    ) -> Self {
        Self {
            dir: dir.to_owned(),
            shard,
            ext: if journal { "jrn" } else { "seg" },
            kind: if journal {
                segment::KIND_JOURNAL
            } else {
                segment::KIND_MESSAGE
            },
            seed: if journal { 0 } else { random_seed(shard) },
            max_segment,
            window,
            fsync,
            current: RefCell::new(Rc::new(Batch::default())),
            flushing: Cell::new(false),
            flush_done: Event::new(),
            segment: RefCell::new(None),
            current_name: RefCell::new(None),
            unclaimed: RefCell::new(HashMap::new()),
            last_stamp: Cell::new(0),
            stats: Cell::new(CommitStats::default()),
            last_sync: Cell::new(None),
            metrics: crate::metrics::shard(shard),
            recent: RefCell::new(Recent::default()),
        }
    }

    /// Keeps up to `bytes` of the newest durable batches in memory for
    /// [`SegmentWriter::with_recent_record`] (0, the default: none).
    pub fn keep_recent(&self, bytes: u64) {
        self.recent.borrow_mut().limit = usize::try_from(bytes).unwrap_or(usize::MAX);
    }

    /// `f` of the bytes of the record at `loc`, if its batch is among the
    /// newest kept in memory (exactly what the file holds there), without
    /// copying them.
    pub fn with_recent_record<R>(&self, loc: &Location, f: impl FnOnce(&[u8]) -> R) -> Option<R> {
        self.recent.borrow().get(loc).map(f)
    }

    pub fn stats(&self) -> CommitStats {
        self.stats.get()
    }

    /// The file currently appended to, if any.
    pub fn current_segment(&self) -> Option<Rc<str>> {
        self.current_name.borrow().clone()
    }

    /// Whether `name` may still receive records or holds records whose
    /// appenders have not taken their location yet: deleting it now could
    /// lose an acknowledged message.
    pub fn in_use(&self, name: &str) -> bool {
        self.current_name.borrow().as_deref() == Some(name)
            || self.unclaimed.borrow().contains_key(name)
    }

    /// Stops appending to `name` if it is the current segment and no batch
    /// is being written to it: the next record starts a new segment.
    /// Returns whether `name` is no longer current. The caller knows the
    /// segment has nothing live left (a drained queue then leaves no
    /// segment of delivered mail behind).
    pub async fn retire(&self, name: &str) -> bool {
        if self.current_name.borrow().as_deref() != Some(name) {
            return true;
        }
        if self.flushing.get() {
            // A batch is on its way into it.
            return false;
        }
        *self.current_name.borrow_mut() = None;
        if let Some(old) = self.segment.take() {
            old.close().await;
        }
        true
    }

    fn claim(&self, name: &Rc<str>) {
        let mut unclaimed = self.unclaimed.borrow_mut();
        if let Some(n) = unclaimed.get_mut(name) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                unclaimed.remove(name);
            }
        }
    }

    /// Appends one record and returns where it landed once it is durable
    /// (or the error of its batch).
    pub async fn append(&self, header: &[u8], body: &[&[u8]]) -> Result<Location, SpoolError> {
        let batch = self.current.borrow().clone();
        let (pos, len) = {
            let mut buf = batch.buf.borrow_mut();
            let pos = buf.len();
            segment::encode_record_seeded(&mut buf, self.kind, self.seed, header, body);
            (pos as u64, (buf.len() - pos) as u64)
        };
        batch.records.set(batch.records.get() + 1);
        // Takes this record off the unclaimed count, also when the caller
        // goes away before it looked.
        let mut claim = Claim {
            writer: self,
            batch: &batch,
            done: false,
        };
        loop {
            match batch.outcome.get() {
                Some(Outcome::Durable) => {
                    claim.take();
                    let placed = batch.placed.borrow();
                    let Some((segment, base)) = placed.as_ref() else {
                        return Err(SpoolError::Io(io::Error::other("batch without a place")));
                    };
                    return Ok(Location {
                        segment: Arc::from(&**segment),
                        offset: base + pos,
                        len,
                    });
                }
                Some(Outcome::NoSpace) => {
                    return Err(SpoolError::NoSpace(io::Error::from_raw_os_error(
                        libc::ENOSPC,
                    )))
                }
                Some(Outcome::Failed) => {
                    return Err(SpoolError::Io(io::Error::other(
                        "segment write or sync failed",
                    )))
                }
                None => {}
            }
            if !self.flushing.get() {
                self.flush().await;
                continue;
            }
            let done = self.flush_done.listen();
            if batch.outcome.get().is_none() && self.flushing.get() {
                done.await;
            }
        }
    }

    /// Takes the current batch and makes it durable. Only one runs at a time.
    async fn flush(&self) {
        self.flushing.set(true);
        if !self.window.is_zero() {
            // --commit-window: wait a little for more messages to join.
            glommio::timer::sleep(self.window).await;
        }
        let batch = self.current.replace(Rc::new(Batch::default()));
        let buf = batch.buf.take();
        let outcome = match self.write(&buf).await {
            Ok(place) => {
                *self
                    .unclaimed
                    .borrow_mut()
                    .entry(place.0.clone())
                    .or_default() += batch.records.get();
                if self.recent.borrow().limit > 0 {
                    self.recent.borrow_mut().keep(place.0.clone(), place.1, buf);
                }
                *batch.placed.borrow_mut() = Some(place);
                let mut s = self.stats.get();
                s.batches += 1;
                s.records += batch.records.get();
                self.stats.set(s);
                self.metrics.commit(
                    self.kind == segment::KIND_JOURNAL,
                    batch.records.get(),
                    self.last_sync.take().map(|d| d.as_secs_f64()),
                );
                Outcome::Durable
            }
            Err(SpoolError::NoSpace(e)) => {
                tracing::warn!(shard = self.shard, error = %e, "spool full: refusing new messages");
                Outcome::NoSpace
            }
            Err(e) => {
                tracing::error!(shard = self.shard, error = %e, "spool write failed");
                Outcome::Failed
            }
        };
        batch.outcome.set(Some(outcome));
        self.flushing.set(false);
        self.flush_done.notify(usize::MAX);
    }

    /// Writes and syncs one batch; returns the segment and offset it went to.
    async fn write(&self, buf: &[u8]) -> Result<(Rc<str>, u64), SpoolError> {
        let rotate = self
            .segment
            .borrow()
            .as_ref()
            .is_none_or(|s| s.written >= self.max_segment);
        if rotate {
            let old = self.segment.take();
            if let Some(old) = old {
                old.close().await;
            }
            let (name, file) = self.create_segment().await?;
            *self.current_name.borrow_mut() = Some(name.clone());
            *self.segment.borrow_mut() = Some(OpenSegment {
                name,
                file,
                written: 0,
                zeroed: 0,
                unzeroed: false,
            });
        }
        // Only the flusher (one at a time) touches the open segment: take it
        // for the duration of the write rather than hold a borrow across it.
        let Some(mut seg) = self.segment.take() else {
            return Err(SpoolError::Io(io::Error::other("no open segment")));
        };
        let at = seg.written;
        let end = at + buf.len() as u64;
        // Message segments only: the journal is small and compacted by
        // size, and no session waits for its syncs.
        let extend =
            self.fsync && self.kind == segment::KIND_MESSAGE && !seg.unzeroed && end > seg.zeroed;
        let mut zeroed = false;
        let result = async {
            super::write_all(&seg.file, buf, at).await?;
            if extend {
                let zeros = vec![0u8; self.zeroed_ahead() as usize];
                zeroed = super::write_all(&seg.file, &zeros, end).await.is_ok();
                if !zeroed {
                    // No room for the zeros (a nearly full disk): the batch
                    // still goes, as a plain append, and so does the rest
                    // of this segment. The partial zeros go.
                    seg.file.truncate(end).await?;
                    seg.unzeroed = true;
                }
            }
            if self.fsync {
                let started = std::time::Instant::now();
                seg.file.fdatasync().await?;
                self.last_sync.set(Some(started.elapsed()));
            }
            Ok::<(), glommio::GlommioError<()>>(())
        }
        .await;
        match result {
            Ok(()) => {
                seg.written = end;
                seg.zeroed = if zeroed {
                    end + self.zeroed_ahead()
                } else {
                    seg.zeroed.max(end)
                };
                let name = seg.name.clone();
                *self.segment.borrow_mut() = Some(seg);
                Ok((name, at))
            }
            Err(e) => {
                // Nothing after a failed batch may follow its garbage: cut the
                // file back, or abandon it if even that fails.
                if seg.file.truncate(at).await.is_ok() {
                    seg.zeroed = at;
                    *self.segment.borrow_mut() = Some(seg);
                } else {
                    let _ = seg.file.close().await;
                }
                Err(e.into())
            }
        }
    }

    /// How far ahead of its batches a segment is filled with zeros: at most
    /// [`ZEROED_AHEAD`], and never more than a whole segment.
    fn zeroed_ahead(&self) -> u64 {
        ZEROED_AHEAD.min(self.max_segment)
    }

    /// A file name that sorts after every file this writer made so far and
    /// before every later one (a journal snapshot takes its place in the
    /// order this way).
    pub fn reserve_name(&self) -> String {
        let stamp = self.next_stamp();
        format!("{:03}-{stamp:016x}.{}", self.shard, self.ext)
    }

    /// Makes every later name sort after a file stamped `stamp` (a file
    /// from before a restart, if the clock went back since).
    pub fn names_after(&self, stamp: u64) {
        self.last_stamp.set(self.last_stamp.get().max(stamp));
    }

    fn next_stamp(&self) -> u64 {
        let micros = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        let stamp = micros.max(self.last_stamp.get() + 1);
        self.last_stamp.set(stamp);
        stamp
    }

    /// A new segment file, with its directory entry made durable before any
    /// record in it can be acknowledged.
    async fn create_segment(&self) -> Result<(Rc<str>, BufferedFile), SpoolError> {
        let micros = self.next_stamp();
        let name: Rc<str> = if self.seed == 0 {
            format!("{:03}-{micros:016x}.{}", self.shard, self.ext).into()
        } else {
            format!(
                "{:03}-{micros:016x}-{:08x}.{}",
                self.shard, self.seed, self.ext
            )
            .into()
        };
        let path = self.dir.join(&*name);
        let file = BufferedFile::create(&path).await?;
        let dir = glommio::io::Directory::open(&self.dir).await?;
        let synced = dir.sync().await;
        let _ = dir.close().await;
        synced?;
        Ok((name, file))
    }
}

/// A seed no peer can guess: std's `RandomState` keys come from the
/// operating system's random source. Never 0 (that means unseeded).
fn random_seed(shard: usize) -> u32 {
    use std::hash::BuildHasher;
    let micros = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros());
    let h = std::hash::RandomState::new().hash_one((shard, micros));
    match (h ^ (h >> 32)) as u32 {
        0 => 1,
        seed => seed,
    }
}

/// One appender's claim on its record's location (see
/// `SegmentWriter::unclaimed`).
struct Claim<'a> {
    writer: &'a SegmentWriter,
    batch: &'a Batch,
    done: bool,
}

impl Claim<'_> {
    fn take(&mut self) {
        if self.done || self.batch.outcome.get() != Some(Outcome::Durable) {
            return;
        }
        self.done = true;
        if let Some((segment, _)) = self.batch.placed.borrow().as_ref() {
            self.writer.claim(segment);
        }
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.take();
    }
}

#[cfg(test)]
mod tests {
    use glommio::{LocalExecutorBuilder, Placement};

    use super::*;

    fn loc(segment: &str, offset: u64, len: u64) -> Location {
        Location {
            segment: Arc::from(segment),
            offset,
            len,
        }
    }

    /// The delivery cache answers only for a record wholly inside a kept
    /// batch of that segment, and forgets the oldest batches past its limit.
    #[test]
    fn recent_batches_hold_what_the_file_holds() {
        let mut r = Recent {
            limit: 64,
            ..Recent::default()
        };
        let batch = |b: &[u8]| {
            let mut v = Vec::with_capacity(b.len());
            v.extend_from_slice(b);
            v
        };
        r.keep("a".into(), 0, batch(b"0123456789"));
        r.keep("a".into(), 10, batch(b"abcdefghij"));
        assert_eq!(r.get(&loc("a", 12, 3)), Some(&b"cde"[..]));
        assert_eq!(r.get(&loc("a", 0, 10)), Some(&b"0123456789"[..]));
        // Past a batch's end, another segment, not kept: read the file.
        assert_eq!(r.get(&loc("a", 8, 4)), None);
        assert_eq!(r.get(&loc("b", 12, 3)), None);
        assert_eq!(r.get(&loc("a", 20, 1)), None);
        // Over the limit: the oldest go first.
        for k in 0..5 {
            r.keep("a".into(), 20 + 10 * k, batch(b"KLMNOPQRST"));
        }
        assert!(r.bytes <= 64);
        assert_eq!(r.get(&loc("a", 0, 1)), None);
        assert_eq!(r.get(&loc("a", 60, 2)), Some(&b"KL"[..]));
        // A batch larger than the whole cache is not kept at all.
        r.keep("a".into(), 70, vec![0; 65]);
        assert_eq!(r.get(&loc("a", 70, 1)), None);
    }

    /// Regression (issue 11, the leak fix): a segment must not look
    /// removable while a message written to it has not been queued yet
    /// (its appender woken but not run), even once it is no longer the
    /// current segment; else deleting a finished segment right after a
    /// rotation could take an acknowledged message with it.
    #[test]
    fn unclaimed_records_keep_their_segment_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let ex = LocalExecutorBuilder::new(Placement::Unbound)
            .io_memory(64 << 10)
            .make()
            .unwrap();
        let path = dir.path().to_owned();
        ex.run(async move {
            // A commit window, so that two records share one batch.
            let w = Rc::new(SegmentWriter::new(
                &path,
                0,
                false,
                1 << 20,
                Duration::from_millis(20),
                true,
            ));
            let w2 = w.clone();
            let first = glommio::spawn_local(async move {
                let at = w2.append(b"h", &[b"one"]).await.unwrap();
                // The flusher runs on at once; the other appender of the
                // batch has not run yet.
                let unclaimed = w2.unclaimed.borrow().get(&*at.segment).copied();
                (at, unclaimed)
            });
            futures_lite::future::yield_now().await;
            let second = w.append(b"h", &[b"two"]).await.unwrap();
            let (at, unclaimed) = first.await;
            assert_eq!(at.segment, second.segment);
            // The second record counted until its appender took it: the
            // segment was in use whether current or not.
            assert_eq!(unclaimed, Some(1));
            assert!(w.unclaimed.borrow().is_empty());
            assert!(w.in_use(&at.segment), "current");
            assert!(w.retire(&at.segment).await);
            assert!(w.current_segment().is_none());
            assert!(!w.in_use(&at.segment), "claimed, retired: free to go");
        });
    }

    /// Regression: while a batch was being written the open segment was
    /// taken out of the writer, so `current_segment()` said `None` and a
    /// delivery finishing the segment's last live message deleted the
    /// segment being appended to (every later message in it unreadable).
    #[test]
    fn current_segment_stays_named_while_a_batch_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let ex = LocalExecutorBuilder::new(Placement::Unbound)
            .io_memory(64 << 10)
            .make()
            .unwrap();
        let path = dir.path().to_owned();
        let observed = ex.run(async move {
            let w = Rc::new(SegmentWriter::new(
                &path,
                0,
                false,
                1 << 20,
                Duration::ZERO,
                true,
            ));
            let first = w.append(b"h", &[b"one"]).await.unwrap();
            let done = Rc::new(Cell::new(false));
            let (w2, d2) = (w.clone(), done.clone());
            glommio::spawn_local(async move {
                w2.append(b"h", &[b"two"]).await.unwrap();
                d2.set(true);
            })
            .detach();
            let mut observed = 0;
            futures_lite::future::yield_now().await;
            while !done.get() {
                assert_eq!(w.current_segment().as_deref(), Some(&*first.segment));
                observed += 1;
                futures_lite::future::yield_now().await;
            }
            observed
        });
        assert!(observed > 0, "never looked while the batch was written");
    }
}
