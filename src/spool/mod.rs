//! Durability: an accepted message is on disk before its 250.
//!
//! Layout under the spool directory:
//!
//! * `ringmta.lock` — held with `flock` for the life of the process, so a
//!   second instance on the same spool refuses to start.
//! * `seg/SSS-TTTTTTTTTTTTTTTT.seg` — per-shard append-only segment files
//!   ([`segment`] record format with crc32c). Each shard appends to its own
//!   current segment; messages that finish while a write+`fdatasync` is in
//!   flight are group-committed by the next one ([`commit`]).
//!
//! At start ([`Spool::open`]) every segment is scanned and verified; a torn
//! tail (a crash mid-write: never acknowledged) is reported and cut off.
//!
//! This module must never acknowledge what it has not synced, and never
//! panic on an I/O error: errors become [`SpoolError`]s, which the session
//! turns into 452/451.

pub mod commit;
pub mod format;
pub mod segment;

use std::cell::Cell;
use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use thiserror::Error;

use crate::smtp::{CommitResult, Message};
use commit::SegmentWriter;

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
    _lock: File,
}

/// What the start-up scan found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Recovery {
    pub segments: usize,
    pub messages: u64,
    pub bytes: u64,
    /// Segments whose tail was damaged (torn by a crash) and cut off.
    pub torn: usize,
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
        let recovered = recover(root)?;
        Ok(Spool {
            root: root.to_owned(),
            recovered,
            _lock: lock,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn recovered(&self) -> Recovery {
        self.recovered
    }
}

/// Every intact message in the spool, segment by segment in creation order.
/// Reads without the lock: for tests and operators inspecting a spool.
pub fn read_queue(root: &Path) -> io::Result<Vec<QueuedMessage>> {
    let mut out = Vec::new();
    for path in segment_paths(root)? {
        let bytes = fs::read(&path)?;
        for r in segment::scan(&bytes).records {
            out.push(QueuedMessage {
                segment: path.clone(),
                offset: r.offset,
                envelope: String::from_utf8_lossy(r.header).into_owned(),
                message: r.body.to_vec(),
            });
        }
    }
    Ok(out)
}

fn segment_paths(root: &Path) -> io::Result<Vec<PathBuf>> {
    let mut paths: Vec<PathBuf> = fs::read_dir(root.join("seg"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    // Names are shard then creation time (hex, fixed width).
    paths.sort_by_key(|p| {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        (name.get(4..).map(str::to_owned), name)
    });
    Ok(paths)
}

fn recover(root: &Path) -> Result<Recovery, SpoolError> {
    let mut rec = Recovery::default();
    for path in segment_paths(root)? {
        let bytes = fs::read(&path)?;
        let scan = segment::scan(&bytes);
        rec.segments += 1;
        rec.messages += scan.records.len() as u64;
        rec.bytes += scan.valid_len;
        if let Some(damage) = scan.damage {
            rec.torn += 1;
            tracing::warn!(
                segment = %path.display(),
                valid = scan.valid_len,
                dropped = bytes.len() as u64 - scan.valid_len,
                ?damage,
                "damaged segment tail (never acknowledged): cut off"
            );
            let f = fs::OpenOptions::new().write(true).open(&path)?;
            f.set_len(scan.valid_len)?;
            f.sync_all()?;
        }
    }
    Ok(rec)
}

/// Spool tuning, from the CLI.
#[derive(Debug, Clone, Copy)]
pub struct SpoolOptions {
    pub max_segment: u64,
    pub commit_window: Duration,
    pub fsync: bool,
}

/// One shard's writer into the spool. Not `Send`: it lives on its shard.
pub struct ShardSpool {
    shard: usize,
    hostname: String,
    counter: Cell<u64>,
    writer: SegmentWriter,
}

impl ShardSpool {
    pub fn new(root: &Path, shard: usize, hostname: String, opts: SpoolOptions) -> ShardSpool {
        ShardSpool {
            shard,
            hostname,
            counter: Cell::new(0),
            writer: SegmentWriter::new(
                &root.join("seg"),
                shard,
                opts.max_segment,
                opts.commit_window,
                opts.fsync,
            ),
        }
    }

    /// Writes `msg` durably and returns its queue id. Only an `Ok` may be
    /// acknowledged with 250.
    pub async fn store(&self, msg: Message) -> Result<String, SpoolError> {
        let id = self.next_id();
        let now = SystemTime::now();
        let received = msg.envelope.received_header(&self.hostname, &id, now);
        let envelope = format::encode_envelope(&id, &msg.envelope, now);
        self.writer
            .append(&envelope, &[received.as_bytes(), &msg.body])
            .await?;
        Ok(id)
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
