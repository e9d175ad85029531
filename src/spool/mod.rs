//! Durability: an accepted message is on disk before its 250.
//!
//! Layout under the spool directory:
//!
//! * `ringmta.lock` — held with `flock` for the life of the process, so a
//!   second instance on the same spool refuses to start.
//! * `tmp/` — messages being written. Anything here at start-up was never
//!   acknowledged and is removed.
//! * `queue/<id>` — committed messages: the file was written and
//!   `fdatasync`ed in `tmp/`, renamed here, and `queue/` was synced. Directory
//!   syncs are group-committed: every rename that lands while one sync is in
//!   flight is covered by the next, single, sync.
//!
//! The file format is [`format`]'s: an envelope block, a blank line, then the
//! message exactly as it will be relayed (our `Received:` header first).
//!
//! This module must never acknowledge what it has not synced, and never
//! panic on an I/O error: errors become [`SpoolError`]s, which the session
//! turns into 452/451.

pub mod format;
mod group_sync;

use std::cell::Cell;
use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use thiserror::Error;

use crate::smtp::{CommitResult, Message};
use group_sync::GroupSync;

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
    _lock: File,
}

impl Spool {
    /// Creates the layout, takes the instance lock and removes never
    /// acknowledged files from `tmp/`. Runs before the shards start.
    pub fn open(root: &Path) -> Result<Spool, SpoolError> {
        fs::create_dir_all(root.join("tmp"))?;
        fs::create_dir_all(root.join("queue"))?;
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
        for entry in fs::read_dir(root.join("tmp"))? {
            let entry = entry?;
            tracing::warn!(file = %entry.path().display(), "removing unacknowledged partial message");
            fs::remove_file(entry.path())?;
        }
        Ok(Spool {
            root: root.to_owned(),
            _lock: lock,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Committed messages, for tests and the operator.
    pub fn queued(&self) -> io::Result<Vec<PathBuf>> {
        let mut v: Vec<PathBuf> = fs::read_dir(self.root.join("queue"))?
            .map(|e| e.map(|e| e.path()))
            .collect::<io::Result<_>>()?;
        v.sort();
        Ok(v)
    }
}

/// One shard's writer into the spool. Not `Send`: it lives on its shard.
pub struct ShardSpool {
    shard: usize,
    tmp: PathBuf,
    queue: PathBuf,
    hostname: String,
    counter: Cell<u64>,
    dir_sync: GroupSync,
}

impl ShardSpool {
    pub fn new(root: &Path, shard: usize, hostname: String) -> ShardSpool {
        let queue = root.join("queue");
        ShardSpool {
            shard,
            tmp: root.join("tmp"),
            dir_sync: GroupSync::new(queue.clone()),
            queue,
            hostname,
            counter: Cell::new(0),
        }
    }

    /// Writes `msg` durably and returns its queue id. Only an `Ok` may be
    /// acknowledged with 250.
    pub async fn store(&self, msg: Message) -> Result<String, SpoolError> {
        let id = self.next_id();
        let now = SystemTime::now();
        let received = msg.envelope.received_header(&self.hostname, &id, now);
        let head = format::encode_head(&id, &msg.envelope, now, &received);
        let tmp = self.tmp.join(&id);
        let result = self.write_synced(&tmp, head, msg.body).await;
        if let Err(e) = result {
            let _ = glommio::io::remove(&tmp).await;
            return Err(e);
        }
        let dest = self.queue.join(&id);
        if let Err(e) = glommio::io::rename(&tmp, &dest).await {
            let _ = glommio::io::remove(&tmp).await;
            return Err(e.into());
        }
        if let Err(e) = self.dir_sync.sync().await {
            // The file may or may not survive a crash: do not acknowledge,
            // and do not deliver it later either.
            let _ = glommio::io::remove(&dest).await;
            return Err(e.into());
        }
        Ok(id)
    }

    async fn write_synced(
        &self,
        path: &Path,
        head: Vec<u8>,
        body: Vec<u8>,
    ) -> Result<(), SpoolError> {
        let file = glommio::io::BufferedFile::create(path).await?;
        let r = async {
            write_all(&file, &head, &body).await?;
            file.fdatasync().await
        }
        .await;
        let closed = file.close().await;
        r?;
        closed?;
        Ok(())
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

/// Largest single write; small messages (head and body) go out in one.
const WRITE_CHUNK: usize = 256 << 10;

/// Writes `head` then `body` from offset 0. glommio's write takes its buffer
/// by value, so each write gets a fresh chunk copied from the source and a
/// short write simply continues from where it stopped.
async fn write_all(
    file: &glommio::io::BufferedFile,
    head: &[u8],
    body: &[u8],
) -> Result<(), glommio::GlommioError<()>> {
    let total = head.len() + body.len();
    let mut off = 0;
    while off < total {
        let end = (off + WRITE_CHUNK).min(total);
        let mut chunk = Vec::with_capacity(end - off);
        if off < head.len() {
            chunk.extend_from_slice(&head[off..end.min(head.len())]);
        }
        if end > head.len() {
            chunk.extend_from_slice(&body[off.max(head.len()) - head.len()..end - head.len()]);
        }
        let n = file.write_at(chunk, off as u64).await?;
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::WriteZero).into());
        }
        off += n;
    }
    Ok(())
}
