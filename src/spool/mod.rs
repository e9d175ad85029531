//! Durability: an accepted message is on disk before its 250.
//!
//! Layout under the spool directory:
//!
//! * `ringmta.lock` — held with `flock` for the life of the process, so a
//!   second instance on the same spool refuses to start.
//! * `seg/SSS-TTTTTTTTTTTTTTTT-KKKKKKKK.seg` — per-shard append-only
//!   segment files ([`segment`] record format with crc32c, seeded with K).
//!   Each shard appends to its own current segment; messages that finish
//!   while a write+`fdatasync` is in flight are group-committed by the next
//!   one ([`commit`]). A segment goes once every message in it is finished.
//! * `seg/SSS-TTTTTTTTTTTTTTTT.jrn` — journal files: queue changes of the
//!   messages in `SSS-*.seg` segments (and, from a running shard, of its
//!   messages). A shard replaces its journal files by one snapshot of its
//!   queue as they grow ([`ShardSpool::compact_journal`]).
//!
//! At start ([`Spool::open`]) every segment is scanned and verified; a torn
//! tail (a crash mid-write: never acknowledged) is reported and cut off,
//! damage in the middle is reported and skipped (the records after it were
//! acknowledged).
//!
//! This module must never acknowledge what it has not synced, and never
//! panic on an I/O error: errors become [`SpoolError`]s, which the session
//! turns into 452/451.

pub mod commit;
pub mod format;
pub mod queue;
pub mod segment;

use std::cell::{Cell, RefCell};
use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use event_listener::Event;
use thiserror::Error;

use crate::smtp::{CommitResult, Message, TlsInfo};
use commit::SegmentWriter;
use queue::{Applied, Entry, JournalOp, Location, QueueId, QueueIndex, RcptState};

#[derive(Debug, Error)]
pub enum SpoolError {
    /// ENOSPC or EDQUOT: the reply is 452 4.3.1 and the server keeps going.
    #[error("spool is out of space: {0}")]
    NoSpace(io::Error),
    #[error("spool I/O error: {0}")]
    Io(io::Error),
    #[error("another ringmta instance holds the spool lock {0}")]
    Locked(PathBuf),
}

impl From<io::Error> for SpoolError {
    fn from(e: io::Error) -> Self {
        let full = matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
            || matches!(
                e.kind(),
                io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
            );
        if full {
            SpoolError::NoSpace(e)
        } else {
            SpoolError::Io(e)
        }
    }
}

impl From<glommio::GlommioError<()>> for SpoolError {
    fn from(e: glommio::GlommioError<()>) -> Self {
        match e {
            // Keep the OS error (ENOSPC) that glommio's own conversion drops.
            glommio::GlommioError::EnhancedIoError { source, .. } => source.into(),
            glommio::GlommioError::IoError(source) => source.into(),
            other => io::Error::from(other).into(),
        }
    }
}

impl SpoolError {
    pub fn commit_result(&self) -> CommitResult {
        match self {
            SpoolError::NoSpace(_) => CommitResult::NoSpace,
            _ => CommitResult::Failed,
        }
    }
}

/// The opened spool directory; holds the instance lock while alive.
#[derive(Debug)]
pub struct Spool {
    root: PathBuf,
    recovered: Recovery,
    /// The recovered queue, until the shards take their parts.
    queue: Mutex<QueueIndex>,
    _lock: File,
}

/// What the start-up scan found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Recovery {
    pub segments: usize,
    /// Messages still to be delivered (to at least one recipient).
    pub messages: u64,
    pub bytes: u64,
    /// Segments and journals whose tail was damaged (torn by a crash) and cut off.
    pub torn: usize,
    /// Damaged regions in the middle of files, skipped (the intact records
    /// after them are kept).
    pub damaged: usize,
    /// Journal entries replayed.
    pub journal_ops: u64,
    /// Segments deleted because every message in them was finished.
    pub freed_segments: usize,
    pub elapsed: Duration,
}

/// One queued message, as read back from the segments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedMessage {
    pub segment: PathBuf,
    pub offset: u64,
    /// The envelope block (see [`format`]).
    pub envelope: String,
    /// The message: our trace header, then the content as received.
    pub message: Vec<u8>,
}

impl QueuedMessage {
    pub fn decoded(&self) -> Option<format::Envelope<'_>> {
        format::decode_envelope(&self.envelope)
    }
}

impl Spool {
    /// Creates the layout, takes the instance lock and recovers the queue:
    /// every segment is verified, torn tails are cut off. Runs before the
    /// shards start.
    pub fn open(root: &Path) -> Result<Spool, SpoolError> {
        fs::create_dir_all(root.join("seg"))?;
        let lock_path = root.join("ringmta.lock");
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)?;
        // SAFETY: flock on a file descriptor we own.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            return Err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                SpoolError::Locked(lock_path)
            } else {
                SpoolError::Io(e)
            });
        }
        lock.set_len(0)?;
        fs::write(&lock_path, format!("{}\n", std::process::id()))?;
        let (recovered, queue) = recover(root)?;
        Ok(Spool {
            root: root.to_owned(),
            recovered,
            queue: Mutex::new(queue),
            _lock: lock,
        })
    }

    /// The recovered queue for shard `shard` of `shards`: the messages of
    /// every segment whose shard number maps to it.
    pub fn take_shard_queue(&self, shard: usize, shards: usize) -> QueueIndex {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        q.split_off(|segment| segment_shard(segment).is_some_and(|s| s % shards == shard))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn recovered(&self) -> Recovery {
        self.recovered
    }
}

/// Every message still queued (not finished according to the journal), in
/// arrival order. Reads without the lock and changes nothing: for tests and
/// operators inspecting a spool, also while ringmta runs.
pub fn read_queue(root: &Path) -> io::Result<Vec<QueuedMessage>> {
    let (_, queue) = rebuild(root, false)?;
    let mut files: std::collections::HashMap<Arc<str>, Option<Vec<u8>>> = Default::default();
    let mut out = Vec::new();
    for e in queue.list() {
        if !files.contains_key(&e.location.segment) {
            // Gone since the rebuild (regression test: crash.rs raced a
            // running ringmta deleting a finished segment): its messages
            // left the queue meanwhile.
            let bytes = match fs::read(root.join("seg").join(&*e.location.segment)) {
                Ok(b) => Some(b),
                Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                Err(e) => return Err(e),
            };
            files.insert(e.location.segment.clone(), bytes);
        }
        let Some(bytes) = &files[&e.location.segment] else {
            continue;
        };
        let start = e.location.offset as usize;
        let end = start + e.location.len as usize;
        let keying = segment::Keying::of(&e.location.segment);
        let Some(r) = bytes
            .get(start..end)
            .and_then(|rec| segment::scan(rec, keying).records.first().copied())
        else {
            continue;
        };
        out.push(QueuedMessage {
            segment: root.join("seg").join(&*e.location.segment),
            offset: e.location.offset,
            envelope: String::from_utf8_lossy(r.header).into_owned(),
            message: r.body.to_vec(),
        });
    }
    Ok(out)
}

fn segment_shard(name: &str) -> Option<usize> {
    name.get(..3)?.parse().ok()
}

fn segment_paths(root: &Path) -> io::Result<Vec<PathBuf>> {
    spool_files(root, "seg")
}

/// Files of one kind in `seg/`, oldest first.
fn spool_files(root: &Path, ext: &str) -> io::Result<Vec<PathBuf>> {
    let mut paths: Vec<PathBuf> = fs::read_dir(root.join("seg"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == ext))
        .collect();
    // Names are shard then creation time (hex, fixed width).
    paths.sort_by_cached_key(|p| {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let (time, _) = spool_order(&name);
        (time.map(str::to_owned), name.clone())
    });
    Ok(paths)
}

/// Reads a spool file, cutting off a damaged tail (never acknowledged);
/// damage in the middle is reported and left in place (the records after
/// it were acknowledged, and are read past it).
fn read_verified(path: &Path, rec: &mut Recovery, repair: bool) -> io::Result<Vec<u8>> {
    let mut bytes = fs::read(path)?;
    let scan = segment::scan(&bytes, keying(path));
    if repair {
        for skip in &scan.skipped {
            rec.damaged += 1;
            tracing::error!(
                file = %path.display(),
                offset = skip.offset,
                bytes = skip.len,
                damage = ?skip.damage,
                "damaged records in the middle of a spool file skipped; the records after them are kept"
            );
        }
    }
    if let (Some(damage), true) = (scan.damage, repair) {
        rec.torn += 1;
        tracing::warn!(
            file = %path.display(),
            valid = scan.valid_len,
            dropped = bytes.len() as u64 - scan.valid_len,
            ?damage,
            "damaged tail (never acknowledged): cut off"
        );
        let f = fs::OpenOptions::new().write(true).open(path)?;
        f.set_len(scan.valid_len)?;
        f.sync_all()?;
        bytes.truncate(scan.valid_len as usize);
    }
    Ok(bytes)
}

fn keying(path: &Path) -> segment::Keying {
    segment::Keying::of(&path.file_name().unwrap_or_default().to_string_lossy())
}

/// A file the directory listing named, verified; `None` when a running
/// ringmta deleted it in the meantime (a finished or compacted segment, a
/// journal replaced by its snapshot). Only a read-only look at a live
/// spool (`repair` off: `ringmta queue`, [`read_queue`]) can see that; at
/// start-up, under the lock, a vanished file is an error.
fn read_listed(path: &Path, rec: &mut Recovery, repair: bool) -> io::Result<Option<Vec<u8>>> {
    match read_verified(path, rec, repair) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if !repair && e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Rebuilds the queue: every message record, then every journal entry in
/// order. With `repair`, damaged tails are cut off the files.
fn rebuild(root: &Path, repair: bool) -> io::Result<(Recovery, QueueIndex)> {
    let mut rec = Recovery::default();
    let mut queue = QueueIndex::default();
    let segments = segment_paths(root)?;
    for path in &segments {
        let Some(bytes) = read_listed(path, &mut rec, repair)? else {
            continue;
        };
        rec.segments += 1;
        let name: Arc<str> = path
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
            .into();
        for r in segment::scan(&bytes, keying(path)).records {
            let Ok(block) = std::str::from_utf8(r.header) else {
                continue;
            };
            let Some(env) = format::decode_envelope(block) else {
                tracing::warn!(segment = %name, offset = r.offset, "record with an unreadable envelope skipped");
                continue;
            };
            queue.insert(Entry {
                id: env.id.to_owned(),
                location: Location {
                    segment: name.clone(),
                    offset: r.offset,
                    len: r.len,
                },
                arrival: env.arrival,
                mail_from: env.mail_from.map(str::to_owned),
                rcpts: env
                    .rcpts
                    .iter()
                    .map(|r| (r.to_string(), RcptState::Pending))
                    .collect(),
                held: false,
                pool: env.pool.map(str::to_owned),
            });
        }
    }
    for path in &spool_files(root, "jrn")? {
        let Some(bytes) = read_listed(path, &mut rec, repair)? else {
            continue;
        };
        for r in segment::scan(&bytes, keying(path)).records {
            if let Some(op) = std::str::from_utf8(r.header)
                .ok()
                .and_then(JournalOp::decode)
            {
                rec.journal_ops += 1;
                queue.apply(&op);
            }
        }
    }
    Ok((rec, queue))
}

/// [`rebuild`], then frees segments with nothing left to do and replaces
/// the journals by snapshots of the live state: one per segment shard
/// number (`SSS-TIME.jrn` holds the state of the messages in `SSS-*.seg`),
/// so that each running shard owns the journal files about its messages,
/// and compacts them alone ([`ShardSpool`]).
fn recover(root: &Path) -> Result<(Recovery, QueueIndex), SpoolError> {
    let started = std::time::Instant::now();
    let segments = segment_paths(root)?;
    let journals = spool_files(root, "jrn")?;
    // A journal snapshot a crash left half-written: its journals are intact.
    for tmp in spool_files(root, "tmp")? {
        fs::remove_file(tmp)?;
    }
    let (mut rec, mut queue) = rebuild(root, true)?;
    // Segments with nothing left to deliver.
    let live: std::collections::HashSet<String> =
        queue.live_segments().map(|(s, _)| s.to_owned()).collect();
    for path in &segments {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        if let Some(name) = name.filter(|n| !live.contains(n)) {
            fs::remove_file(path)?;
            queue.forget_segment(&name);
            rec.freed_segments += 1;
        }
    }
    // The snapshots replace every journal; they are durable before they go.
    let micros = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros());
    let shards: std::collections::BTreeSet<usize> =
        queue.segment_names().filter_map(segment_shard).collect();
    for shard in shards {
        let snapshot = queue.snapshot_where(|s| segment_shard(s) == Some(shard));
        if snapshot.is_empty() {
            continue;
        }
        let path = root
            .join("seg")
            .join(format!("{shard:03}-{micros:016x}.jrn"));
        let mut buf = Vec::new();
        for op in &snapshot {
            segment::encode_record(&mut buf, segment::KIND_JOURNAL, op.encode().as_bytes(), &[]);
        }
        let f = File::create(&path)?;
        io::Write::write_all(&mut &f, &buf)?;
        f.sync_all()?;
    }
    File::open(root.join("seg"))?.sync_all()?;
    for path in &journals {
        fs::remove_file(path)?;
    }
    File::open(root.join("seg"))?.sync_all()?;
    rec.messages = queue.len() as u64;
    rec.bytes = queue.live_segments().map(|(_, live)| live.bytes).sum();
    rec.elapsed = started.elapsed();
    Ok((rec, queue))
}

/// Spool tuning, from the CLI.
#[derive(Debug, Clone, Copy)]
pub struct SpoolOptions {
    pub max_segment: u64,
    /// Compact closed segments whose live records fill at most this share
    /// of the file (0: never).
    pub compact_below: f64,
    pub commit_window: Duration,
    pub fsync: bool,
    /// Bytes of the newest committed batches kept in memory, so that
    /// delivery reads a fresh message without going to the file.
    pub delivery_cache: u64,
}

/// One shard's part of the spool: its segment writer, its journal and its
/// queue. Not `Send`: it lives on its shard.
pub struct ShardSpool {
    shard: usize,
    hostname: String,
    dir: PathBuf,
    counter: Cell<u64>,
    writer: SegmentWriter,
    journal: SegmentWriter,
    queue: RefCell<QueueIndex>,
    /// Segments left without live messages while they could not go yet
    /// (still being appended to, or records in them not yet claimed):
    /// removed by a later [`ShardSpool::reap`].
    retired: RefCell<Vec<String>>,
    /// Journal compaction: see [`ShardSpool::compact_journal`].
    journal_state: JournalState,
    fsync: bool,
}

/// What journal compaction keeps track of.
struct JournalState {
    /// Segment shard numbers whose journal files are this shard's: its
    /// own, and those of the segments it adopted at start (recovery wrote
    /// one snapshot per number). No other shard has messages there.
    owned: std::collections::HashSet<usize>,
    /// Bytes in this shard's journal files (snapshot included).
    bytes: Cell<u64>,
    /// Size of the last snapshot: the journal is compacted once it is
    /// [`JOURNAL_GROWTH`] times that (and at least [`JOURNAL_COMPACT_MIN`]).
    base: Cell<u64>,
    /// Set while a snapshot is being taken: changes wait.
    closed: Cell<bool>,
    opened: Event,
    /// Changes between their journal write and their queue update.
    in_flight: Cell<usize>,
    drained: Event,
    compacting: Cell<bool>,
}

/// A journal smaller than this is never compacted.
const JOURNAL_COMPACT_MIN: u64 = 16 << 10;
/// A journal is compacted once it is this many times its last snapshot:
/// the rewrite costs at most a third of the appends since the last one.
const JOURNAL_GROWTH: u64 = 4;

impl ShardSpool {
    pub fn new(
        root: &Path,
        shard: usize,
        hostname: String,
        opts: SpoolOptions,
        queue: QueueIndex,
    ) -> ShardSpool {
        let dir = root.join("seg");
        let mut owned: std::collections::HashSet<usize> =
            queue.segment_names().filter_map(segment_shard).collect();
        owned.insert(shard);
        // The snapshots recovery wrote for them.
        let journals = spool_files(root, "jrn").unwrap_or_default();
        let base = journals
            .iter()
            .filter(|p| journal_owner(p).is_some_and(|s| owned.contains(&s)))
            .filter_map(|p| fs::metadata(p).ok())
            .map(|m| m.len())
            .sum();
        let newest = journals
            .iter()
            .filter_map(|p| {
                let name = p.file_name()?.to_str()?;
                u64::from_str_radix(name.get(4..20)?, 16).ok()
            })
            .max()
            .unwrap_or(0);
        let journal = SegmentWriter::new(
            &dir,
            shard,
            true,
            opts.max_segment,
            Duration::ZERO,
            opts.fsync,
        );
        // Replay goes by name: this shard's journal files must come after
        // the snapshots recovery wrote, whatever the clock says.
        journal.names_after(newest);
        let writer = SegmentWriter::new(
            &dir,
            shard,
            false,
            opts.max_segment,
            opts.commit_window,
            opts.fsync,
        );
        writer.keep_recent(opts.delivery_cache);
        ShardSpool {
            shard,
            hostname,
            counter: Cell::new(0),
            writer,
            journal,
            dir,
            queue: RefCell::new(queue),
            retired: RefCell::new(Vec::new()),
            journal_state: JournalState {
                owned,
                bytes: Cell::new(base),
                base: Cell::new(base),
                closed: Cell::new(false),
                opened: Event::new(),
                in_flight: Cell::new(0),
                drained: Event::new(),
                compacting: Cell::new(false),
            },
            fsync: opts.fsync,
        }
    }

    /// Writes `msg` durably, queues it, and returns its queue id. Only an
    /// `Ok` may be acknowledged with 250.
    pub async fn store(&self, msg: Message) -> Result<String, SpoolError> {
        self.store_with(msg, None, &[]).await
    }

    /// [`ShardSpool::store`] for a message that came over TLS (`tls` is
    /// named in the trace header) or that submission completed with
    /// `added` header fields (stored after the trace header, before the
    /// content as received).
    pub async fn store_with(
        &self,
        msg: Message,
        tls: Option<&TlsInfo>,
        added: &[u8],
    ) -> Result<String, SpoolError> {
        self.store_traced(
            msg,
            |env, host, id, now| env.trace_header(host, id, tls, now),
            added,
        )
        .await
    }

    /// [`ShardSpool::store_with`] with the trace header made by `trace`
    /// (from the envelope, this host's name, the queue id and the time):
    /// mail that did not come by SMTP (HTTP injection) says so.
    pub async fn store_traced(
        &self,
        msg: Message,
        trace: impl FnOnce(&crate::smtp::Envelope, &str, &str, SystemTime) -> String,
        added: &[u8],
    ) -> Result<String, SpoolError> {
        let id = self.next_id();
        let now = SystemTime::now();
        let received = trace(&msg.envelope, &self.hostname, &id, now);
        let envelope = format::encode_envelope(&id, &msg.envelope, now);
        let location = self
            .writer
            .append(&envelope, &[received.as_bytes(), added, &msg.body])
            .await?;
        self.queue.borrow_mut().insert(Entry {
            id: id.clone(),
            location,
            arrival: now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            mail_from: msg.envelope.mail_from,
            rcpts: msg
                .envelope
                .rcpts
                .into_iter()
                .map(|r| (r.addr, RcptState::Pending))
                .collect(),
            held: false,
            pool: msg.envelope.pool,
        });
        Ok(id)
    }

    /// Records a queue change durably, then applies it; frees the message's
    /// segment once nothing in it is left to do.
    pub async fn apply(&self, op: JournalOp) -> Result<Applied, SpoolError> {
        let js = &self.journal_state;
        while js.closed.get() {
            let opened = js.opened.listen();
            if js.closed.get() {
                opened.await;
            }
        }
        if !self.queue.borrow().contains(op.id()) {
            return Ok(Applied::Unknown);
        }
        let applied = {
            let _flight = InFlight::enter(js);
            let line = op.encode();
            self.journal.append(line.as_bytes(), &[]).await?;
            js.bytes
                .set(js.bytes.get() + (segment::PREFIX + line.len()) as u64);
            self.queue.borrow_mut().apply(&op)
        };
        if let Applied::Finished {
            segment_empty: Some(segment),
        } = &applied
        {
            self.remove_segment(segment).await;
        }
        self.reap().await;
        let due = js.bytes.get() >= JOURNAL_COMPACT_MIN.max(JOURNAL_GROWTH * js.base.get());
        if due && !js.compacting.get() {
            if let Err(e) = self.compact_journal().await {
                tracing::warn!(shard = self.shard, error = %e, "journal compaction failed; retrying later");
            }
        }
        Ok(applied)
    }

    /// Replaces this shard's journal files by a snapshot of its queue, so
    /// the journal follows the queue instead of growing until a restart.
    /// Changes wait while the snapshot is taken (until the ones in flight
    /// are in the queue: the snapshot holds every journaled change); then
    /// they go on into a new journal file that sorts after the snapshot.
    /// The snapshot is written to a temporary file, synced, renamed and its
    /// directory synced before the old files go, oldest first, each removal
    /// synced: a crash at any point leaves the old files, or a suffix of
    /// them, before the snapshot, and replaying that suffix, then the
    /// snapshot, then the newer changes gives the same queue (a snapshot
    /// sets every field that is not at its initial value).
    pub async fn compact_journal(&self) -> Result<(), SpoolError> {
        let js = &self.journal_state;
        if js.compacting.replace(true) {
            return Ok(());
        }
        let _done = Compacting(js);
        js.closed.set(true);
        while js.in_flight.get() > 0 {
            let drained = js.drained.listen();
            if js.in_flight.get() > 0 {
                drained.await;
            }
        }
        let ops = self.queue.borrow().snapshot();
        let name = self.journal.reserve_name();
        if let Some(current) = self.journal.current_segment() {
            // Nothing is being appended: it closes, the next change starts
            // a file named after the snapshot.
            self.journal.retire(&current).await;
        }
        let snapshot_key = spool_order(&name);
        let old: Vec<PathBuf> = spool_files(self.root(), "jrn")?
            .into_iter()
            .filter(|p| journal_owner(p).is_some_and(|s| js.owned.contains(&s)))
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| spool_order(&n.to_string_lossy()) < snapshot_key)
            })
            .collect();
        js.bytes.set(0);
        js.closed.set(false);
        js.opened.notify(usize::MAX);

        let mut buf = Vec::new();
        for op in &ops {
            segment::encode_record(&mut buf, segment::KIND_JOURNAL, op.encode().as_bytes(), &[]);
        }
        if !buf.is_empty() {
            let tmp = self.dir.join(format!("{name}.tmp"));
            let file = glommio::io::BufferedFile::create(&tmp).await?;
            let written = async {
                write_all(&file, &buf, 0).await?;
                if self.fsync {
                    file.fdatasync().await?;
                }
                Ok::<(), glommio::GlommioError<()>>(())
            }
            .await;
            let _ = file.close().await;
            if let Err(e) = written {
                let _ = glommio::io::remove(&tmp).await;
                return Err(e.into());
            }
            glommio::io::rename(&tmp, self.dir.join(&name)).await?;
            self.sync_dir().await?;
        }
        for path in &old {
            glommio::io::remove(path).await?;
            // One at a time: what a crash leaves is always the newest ones.
            self.sync_dir().await?;
        }
        js.bytes.set(js.bytes.get() + buf.len() as u64);
        js.base.set(buf.len() as u64);
        tracing::info!(
            shard = self.shard,
            ops = ops.len(),
            bytes = buf.len(),
            replaced = old.len(),
            "journal compacted"
        );
        Ok(())
    }

    fn root(&self) -> &Path {
        self.dir.parent().unwrap_or(&self.dir)
    }

    /// Replaces the small file `name` in the spool's root directory with
    /// `bytes`, durably (temp file, fdatasync, rename, directory sync):
    /// after a crash it holds the old content or the new, never a mix.
    /// For the relay's own state (its automatic suspensions).
    pub async fn replace_file(&self, name: &str, bytes: &[u8]) -> Result<(), SpoolError> {
        let root = self.root().to_owned();
        let tmp = root.join(format!("{name}.tmp"));
        let file = glommio::io::BufferedFile::create(&tmp).await?;
        let written = async {
            write_all(&file, bytes, 0).await?;
            if self.fsync {
                file.fdatasync().await?;
            }
            Ok::<(), glommio::GlommioError<()>>(())
        }
        .await;
        let _ = file.close().await;
        if let Err(e) = written {
            let _ = glommio::io::remove(&tmp).await;
            return Err(e.into());
        }
        glommio::io::rename(&tmp, root.join(name)).await?;
        if self.fsync {
            let dir = glommio::io::Directory::open(&root).await?;
            let synced = dir.sync().await;
            let _ = dir.close().await;
            synced?;
        }
        Ok(())
    }

    /// The spool's root directory.
    pub fn root_dir(&self) -> &Path {
        self.root()
    }

    async fn sync_dir(&self) -> Result<(), SpoolError> {
        if !self.fsync {
            return Ok(());
        }
        let dir = glommio::io::Directory::open(&self.dir).await?;
        let synced = dir.sync().await;
        let _ = dir.close().await;
        Ok(synced?)
    }

    /// Removes the segments that were left empty while they could not go
    /// yet, once they can. Runs after every journaled change and on the
    /// shard's maintenance timer, so a segment that was current when its
    /// last message finished goes once it no longer is.
    pub async fn reap(&self) {
        if self.retired.borrow().is_empty() {
            return;
        }
        let retired = std::mem::take(&mut *self.retired.borrow_mut());
        for segment in retired {
            // Live again (appended to after it was retired): it comes back
            // here when that message finishes.
            if !self.queue.borrow().segment_is_live(&segment) {
                self.remove_segment(&segment).await;
            }
        }
    }

    /// Whether a queued message is on hold; `None` when it is not queued.
    pub fn held(&self, id: &str) -> Option<bool> {
        self.queue.borrow().held(id)
    }

    /// One queued message's queue entry.
    pub fn entry(&self, id: &str) -> Option<Entry> {
        self.queue.borrow().get(id)
    }

    /// Where delivery starts with the queue at `now` (see
    /// [`QueueIndex::schedule`]).
    pub fn schedule(&self, now: u64) -> (Vec<QueueId>, Vec<(u64, QueueId)>) {
        self.queue.borrow().schedule(now)
    }

    /// Deletes a segment with no live message left, with its finished
    /// entries. The current segment is retired first (the next message
    /// starts a new one); one still in use is kept in `retired` for
    /// [`ShardSpool::reap`]. The journal already says every message in it
    /// is finished; a crash before the removal is finished by recovery.
    async fn remove_segment(&self, segment: &str) {
        let busy = self.writer.in_use(segment)
            && (!self.writer.retire(segment).await || self.writer.in_use(segment));
        if busy {
            let mut retired = self.retired.borrow_mut();
            if !retired.iter().any(|s| s == segment) {
                retired.push(segment.to_owned());
            }
            return;
        }
        // Retiring awaited: make sure nothing was stored into it meanwhile.
        if self.queue.borrow().segment_is_live(segment) {
            return;
        }
        match glommio::io::remove(self.dir.join(segment))
            .await
            .map_err(io::Error::from)
        {
            Ok(()) => self.queue.borrow_mut().forget_segment(segment),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.queue.borrow_mut().forget_segment(segment)
            }
            Err(e) => {
                tracing::warn!(%segment, error = %e, "cannot remove finished segment; retrying later");
                let mut retired = self.retired.borrow_mut();
                if !retired.iter().any(|s| s == segment) {
                    retired.push(segment.to_owned());
                }
            }
        }
    }

    /// Compaction: copies the live messages out of segments whose live
    /// records fill at most `max_live_ratio` of the file into the current
    /// segment (same ids), then deletes those segments. A crash half-way
    /// leaves two copies of some records; recovery keeps one (ids are
    /// unique). Returns how many segments were freed.
    pub async fn compact(&self, max_live_ratio: f64) -> Result<usize, SpoolError> {
        let current = self.writer.current_segment();
        let candidates: Vec<(String, queue::Live)> = self
            .queue
            .borrow()
            .live_segments()
            .filter(|(seg, _)| current.as_deref() != Some(*seg))
            .map(|(seg, live)| (seg.to_owned(), live))
            .collect();
        let mut freed = 0;
        for (segment, live) in candidates {
            // Any closed segment this shard owns: its own, or adopted at start.
            let size = match std::fs::metadata(self.dir.join(&segment)) {
                Ok(m) => m.len(),
                Err(_) => continue,
            };
            let mostly_dead = (live.bytes as f64) <= max_live_ratio * size as f64;
            if size == 0 || !mostly_dead {
                continue;
            }
            let ids = self.queue.borrow().ids_in(&segment);
            for id in ids {
                let Some((envelope, message)) = self.show(&id).await? else {
                    continue;
                };
                let to = self.writer.append(envelope.as_bytes(), &[&message]).await?;
                let left = self.queue.borrow_mut().relocate(&id, to);
                if let Some(empty) = left {
                    self.remove_segment(&empty).await;
                    freed += 1;
                }
            }
        }
        Ok(freed)
    }

    /// Queue snapshot for operators: messages in arrival order.
    pub fn list(&self) -> Vec<Entry> {
        self.queue.borrow().list()
    }

    /// The shard this spool belongs to.
    pub fn shard(&self) -> usize {
        self.shard
    }

    /// [`QueueIndex::visit`] on this shard's queue.
    pub fn visit(&self, from: usize, max: usize, f: impl FnMut(queue::View<'_>)) -> Option<usize> {
        self.queue.borrow().visit(from, max, f)
    }

    /// [`QueueIndex::for_each_waiting`] on this shard's queue.
    pub fn for_each_waiting(
        &self,
        from: usize,
        max: usize,
        f: impl FnMut(u64, &str),
    ) -> Option<usize> {
        self.queue.borrow().for_each_waiting(from, max, f)
    }

    pub fn count_by_domain(&self) -> std::collections::BTreeMap<String, usize> {
        self.queue.borrow().count_by_domain()
    }

    pub fn len(&self) -> usize {
        self.queue.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.borrow().is_empty()
    }

    /// The envelope block and message of one queued message, read back from
    /// its segment.
    pub async fn show(&self, id: &str) -> Result<Option<(String, Vec<u8>)>, SpoolError> {
        let Some(loc) = self.queue.borrow().location(id) else {
            return Ok(None);
        };
        self.read_at(&loc).await
    }

    /// The envelope block and message of the record at `loc`, in any
    /// shard's segment (segment files are shared on disk): how a shard
    /// delivering another shard's message reads it, without owning its
    /// queue entry. `None` when no intact record is there.
    pub async fn read_at(&self, loc: &Location) -> Result<Option<(String, Vec<u8>)>, SpoolError> {
        let decode = |bytes: &[u8]| {
            let scan = segment::scan(bytes, segment::Keying::of(&loc.segment));
            scan.records.first().map(|r| {
                (
                    String::from_utf8_lossy(r.header).into_owned(),
                    r.body.to_vec(),
                )
            })
        };
        if let Some(found) = self.writer.with_recent_record(loc, decode) {
            return Ok(found);
        }
        let file = glommio::io::BufferedFile::open(self.dir.join(&*loc.segment)).await?;
        let result = file.read_at(loc.offset, loc.len as usize).await;
        let _ = file.close().await;
        Ok(decode(&result?))
    }

    pub fn stats(&self) -> commit::CommitStats {
        self.writer.stats()
    }

    fn next_id(&self) -> String {
        let n = self.counter.get().wrapping_add(1);
        self.counter.set(n);
        let micros = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros());
        format!(
            "{micros:014x}{:02x}{:06x}",
            self.shard & 0xff,
            n & 0xff_ffff
        )
    }
}

/// Counts a change between its journal write and its queue update.
struct InFlight<'a>(&'a JournalState);

impl<'a> InFlight<'a> {
    fn enter(js: &'a JournalState) -> InFlight<'a> {
        js.in_flight.set(js.in_flight.get() + 1);
        InFlight(js)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let n = self.0.in_flight.get().saturating_sub(1);
        self.0.in_flight.set(n);
        if n == 0 {
            self.0.drained.notify(usize::MAX);
        }
    }
}

/// Ends a journal compaction, also one cut short: changes go on.
struct Compacting<'a>(&'a JournalState);

impl Drop for Compacting<'_> {
    fn drop(&mut self) {
        self.0.compacting.set(false);
        if self.0.closed.replace(false) {
            self.0.opened.notify(usize::MAX);
        }
    }
}

/// The segment shard number a journal file is about (see [`recover`]).
fn journal_owner(path: &Path) -> Option<usize> {
    segment_shard(&path.file_name()?.to_string_lossy())
}

/// The replay order of spool files: creation time, then name.
fn spool_order(name: &str) -> (Option<&str>, &str) {
    (name.get(4..), name)
}

/// Largest single write; small batches go out in one.
const WRITE_CHUNK: usize = 1 << 20;

/// Writes `buf` at `at`. glommio's write takes its buffer by value, so each
/// write gets a fresh chunk copied from `buf`, and a short write simply
/// continues from where it stopped.
async fn write_all(
    file: &glommio::io::BufferedFile,
    buf: &[u8],
    at: u64,
) -> Result<(), glommio::GlommioError<()>> {
    let mut off = 0;
    while off < buf.len() {
        let end = (off + WRITE_CHUNK).min(buf.len());
        let n = file
            .write_at(buf[off..end].to_vec(), at + off as u64)
            .await?;
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::WriteZero).into());
        }
        off += n;
    }
    Ok(())
}
