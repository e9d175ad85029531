//! Local delivery into Maildir (`<root>/<domain>/<local-part>/{tmp,new,cur}`):
//! written in `tmp/`, `fdatasync`ed, renamed into `new/`, and `new/` synced,
//! so a delivered message survives a crash and is never seen half-written.
//! Directories made on the way (the domain, the mailbox, `tmp/`, `new/`,
//! `cur/`) have their parent synced after `mkdir`: without that, a crash
//! could lose the new directory entry, and with it a message already
//! reported delivered.
//!
//! Must never write outside the root: the mailbox name comes from
//! [`crate::policy::recipient::maildir_mailbox`], the same check that
//! refuses such a recipient at `RCPT` (a name that could be a path, `/`, a
//! leading, trailing or doubled dot, a control character). Only a message
//! queued before that check existed can still fail it here, and bounce.
//! The content is written and synced through io_uring on the shard; the
//! directory work that io_uring cannot do here (`mkdir -p`, the existence
//! checks, the rename, removing a failed temporary file) runs on the Maildir
//! pool ([`crate::blocking`]), never on the shard thread and never behind
//! password checks or signatures.
//!
//! What makes it fast ([`Local`], one per shard): a mailbox once made is
//! remembered, so later deliveries go straight to writing; the existence
//! checks and the rename (`renameat2(RENAME_NOREPLACE)`, which cannot
//! overwrite a delivery made before a crash) are one trip to the pool; and
//! deliveries into the same mailbox that finish together share one sync of
//! its `new/`, so many run at once (`--maildir-concurrency`) and their
//! fdatasyncs overlap in the kernel.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

use event_listener::Event;

use crate::blocking::BlockingPool;
use crate::policy::recipient::{self, Refusal};

/// How long a delivery waits for room on a full Maildir pool before it is
/// deferred.
const POOL_WAIT: Duration = Duration::from_secs(60);

/// The Maildir of `addr` under `root`, or why there is none.
pub fn mailbox_dir(root: &Path, addr: &str) -> Result<PathBuf, Refusal> {
    let mb = recipient::maildir_mailbox(addr)?;
    Ok(root.join(mb.domain).join(mb.local))
}

/// Most mailbox directories a shard remembers as made (then it forgets
/// them all and checks each again once).
const PREPARED_MAX: usize = 16_384;

/// A shard's Maildir delivery: the pool for the directory work, the
/// mailboxes known to be complete (so a delivery to them goes straight to
/// writing), and the `new/` directory syncs in progress, which deliveries
/// finishing at the same time share (one sync makes all their renames
/// durable, as one fdatasync does for a spool batch). Not `Send`: one per
/// shard.
pub struct Local {
    pool: std::sync::Arc<BlockingPool>,
    prepared: RefCell<HashSet<PathBuf>>,
    syncs: RefCell<HashMap<PathBuf, Rc<DirSync>>>,
}

/// The syncs of one directory: `started` counts syncs begun, `finished`
/// the last one that ended (and whether it failed).
#[derive(Default)]
struct DirSync {
    started: Cell<u64>,
    finished: Cell<(u64, bool)>,
    running: Cell<bool>,
    done: Event,
}

/// What became of one delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivered {
    /// Written and made durable now.
    Now,
    /// The file was already there (`new/` or `cur/`): a delivery made
    /// before a crash, not yet journaled. Not written twice.
    Before,
}

impl Local {
    pub fn new(pool: std::sync::Arc<BlockingPool>) -> Local {
        Local {
            pool,
            prepared: RefCell::new(HashSet::new()),
            syncs: RefCell::new(HashMap::new()),
        }
    }

    /// Delivers `message` (prefixed with `Return-Path` and `Delivered-To`)
    /// into the Maildir `dir` as `new/<unique>`. `unique` is derived from the
    /// queue id and recipient, so a delivery repeated after a crash
    /// (delivered, but not yet journaled) finds its file and is not made
    /// twice: exactly once. Only an `Ok` is a durable delivery.
    pub async fn deliver(
        &self,
        dir: &Path,
        return_path: Option<&str>,
        rcpt: &str,
        message: &[u8],
        unique: &str,
    ) -> io::Result<Delivered> {
        let done = self
            .deliver_inner(dir, return_path, rcpt, message, unique)
            .await;
        if done.is_err() {
            // Perhaps the mailbox went away: check it again next time.
            self.prepared.borrow_mut().remove(dir);
        }
        done
    }

    async fn deliver_inner(
        &self,
        dir: &Path,
        return_path: Option<&str>,
        rcpt: &str,
        message: &[u8],
        unique: &str,
    ) -> io::Result<Delivered> {
        if !self.prepared.borrow().contains(dir) {
            self.prepare(dir).await?;
        }
        let mut content = format!(
            "Return-Path: <{}>\r\nDelivered-To: {rcpt}\r\n",
            return_path.unwrap_or("")
        )
        .into_bytes();
        content.extend_from_slice(message);
        let tmp = dir.join("tmp").join(unique);
        let file = glommio::io::BufferedFile::create(&tmp).await?;
        let written = async {
            let mut off = 0usize;
            while off < content.len() {
                let end = (off + (1 << 20)).min(content.len());
                let n = file
                    .write_at(content[off..end].to_vec(), off as u64)
                    .await?;
                if n == 0 {
                    return Err(std::io::Error::from(std::io::ErrorKind::WriteZero).into());
                }
                off += n;
            }
            file.fdatasync().await
        }
        .await;
        let closed = file.close().await;
        if let Err(e) = written.and(closed) {
            let _ = on_pool(&self.pool, move || std::fs::remove_file(tmp)).await;
            return Err(e.into());
        }
        // The existence checks and the rename in one trip to the pool.
        let publish = {
            let dest = dir.join("new").join(unique);
            let in_cur = dir.join("cur").join(unique);
            move || publish(&tmp, &dest, &in_cur)
        };
        let placed = on_pool(&self.pool, publish).await?;
        if placed == Delivered::Now {
            self.sync_dir(&dir.join("new")).await?;
        }
        Ok(placed)
    }

    /// Makes the mailbox's directories; the entries of those made are
    /// durable before any message in them can be reported delivered
    /// (outermost first).
    async fn prepare(&self, dir: &Path) -> io::Result<()> {
        let changed = {
            let dir = dir.to_owned();
            on_pool(&self.pool, move || make_dirs(&dir)).await?
        };
        for parent in &changed {
            sync_dir(parent).await?;
        }
        let mut prepared = self.prepared.borrow_mut();
        if prepared.len() >= PREPARED_MAX {
            prepared.clear();
        }
        prepared.insert(dir.to_owned());
        Ok(())
    }

    /// Syncs `dir` by a sync that began after this call: every rename made
    /// into it before the call is then durable. Callers that come while a
    /// sync runs share the next one.
    async fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let state = self
            .syncs
            .borrow_mut()
            .entry(dir.to_owned())
            .or_default()
            .clone();
        let mine = state.started.get() + 1;
        let result = loop {
            let (finished, failed) = state.finished.get();
            if finished >= mine {
                break if failed {
                    Err(io::Error::other(format!(
                        "syncing {} failed",
                        dir.display()
                    )))
                } else {
                    Ok(())
                };
            }
            if state.running.get() {
                let done = state.done.listen();
                if state.running.get() {
                    done.await;
                }
                continue;
            }
            state.running.set(true);
            let n = state.started.get() + 1;
            state.started.set(n);
            let synced = sync_dir(dir).await;
            state.finished.set((n, synced.is_err()));
            state.running.set(false);
            state.done.notify(usize::MAX);
        };
        // The last one out forgets the directory (the map holds one).
        if Rc::strong_count(&state) == 2 && !state.running.get() {
            self.syncs.borrow_mut().remove(dir);
        }
        result
    }
}

/// Moves the written `tmp` file to `dest` unless the message is there
/// already (`dest`, or `in_cur` where a mail reader moved it): then `tmp`
/// goes. Blocking: runs on the Maildir pool.
fn publish(tmp: &Path, dest: &Path, in_cur: &Path) -> io::Result<Delivered> {
    let before = || {
        std::fs::remove_file(tmp)?;
        Ok(Delivered::Before)
    };
    if in_cur.exists() {
        return before();
    }
    match rename_noreplace(tmp, dest) {
        Ok(()) => Ok(Delivered::Now),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => before(),
        // A file system without RENAME_NOREPLACE: check, then rename (only
        // this shard delivers this unique name, so nothing comes between).
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS)) => {
            if dest.exists() {
                return before();
            }
            std::fs::rename(tmp, dest)?;
            Ok(Delivered::Now)
        }
        Err(e) => Err(e),
    }
}

fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let from = std::ffi::CString::new(from.as_os_str().as_bytes())?;
    let to = std::ffi::CString::new(to.as_os_str().as_bytes())?;
    // SAFETY: both are NUL-terminated paths that live across the call.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Runs a file operation on the Maildir pool; a pool that stays full (or a
/// panic) is an I/O error, so the recipient is deferred and retried.
async fn on_pool<T: Send + 'static>(
    pool: &BlockingPool,
    op: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    pool.run(op, POOL_WAIT)
        .await
        .unwrap_or_else(|e| Err(io::Error::other(e)))
}

/// Makes `dir` (and its missing ancestors) and its `tmp/`, `new/` and
/// `cur/` (blocking: runs on the Maildir pool). Returns the parents whose
/// entries changed, outermost first: each must be synced before a message
/// in them counts as delivered.
fn make_dirs(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut synced = Vec::new();
    if ["tmp", "new", "cur"]
        .iter()
        .all(|sub| dir.join(sub).is_dir())
    {
        return Ok(synced);
    }
    // Missing ancestors, the outermost first.
    let mut missing: Vec<&Path> = dir.ancestors().take_while(|p| !p.is_dir()).collect();
    missing.reverse();
    for p in missing {
        make_dir(p)?;
        if let Some(parent) = p.parent() {
            synced.push(parent.to_owned());
        }
    }
    let mut made = false;
    for sub in ["tmp", "new", "cur"] {
        let p = dir.join(sub);
        if !p.is_dir() {
            made |= make_dir(&p)?;
        }
    }
    if made {
        synced.push(dir.to_owned());
    }
    Ok(synced)
}

/// `mkdir`; `false` when another delivery made it first (and syncs it).
fn make_dir(p: &Path) -> std::io::Result<bool> {
    match std::fs::create_dir(p) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && p.is_dir() => Ok(false),
        Err(e) => Err(e),
    }
}

async fn sync_dir(p: &Path) -> std::io::Result<()> {
    let d = glommio::io::Directory::open(p).await?;
    let synced = d.sync().await;
    let _ = d.close().await;
    synced.map_err(Into::into)
}

/// The Maildir file name of queue message `id` for its recipient number
/// `rcpt`: `<arrival>.Q<id>R<rcpt>.<host>` (unique per delivery, stable
/// across retries).
pub fn unique_name(id: &str, rcpt: usize, arrival: u64, host: &str) -> String {
    format!("{arrival}.Q{id}R{rcpt}.{}", host.replace(['/', ':'], "_"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run<T>(fut: impl std::future::Future<Output = T>) -> T {
        glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .io_memory(64 << 10)
            .make()
            .expect("executor")
            .run(fut)
    }

    /// Regression (issue 11): the directories made for a first delivery
    /// were never synced into their parents, so a crash could lose a
    /// message already reported delivered. Each parent of a directory made
    /// is synced, the root's included; nothing is synced once they exist.
    #[test]
    fn new_mailbox_directories_are_synced_into_their_parents() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("maildir");
        std::fs::create_dir(&root).unwrap();
        let dir = mailbox_dir(&root, "John@Example.org").unwrap();
        let synced = make_dirs(&dir).unwrap();
        assert_eq!(
            synced,
            [root.clone(), root.join("example.org"), dir.clone()],
            "root (for the domain), the domain (for the mailbox), the mailbox (for tmp/new/cur)"
        );
        for sub in ["tmp", "new", "cur"] {
            assert!(dir.join(sub).is_dir());
        }
        assert!(make_dirs(&dir).unwrap().is_empty());
        // A mailbox missing only cur/ (made by another tool) gets it.
        std::fs::remove_dir(dir.join("cur")).unwrap();
        assert_eq!(make_dirs(&dir).unwrap(), std::slice::from_ref(&dir));
        // And delivery writes the file there, once.
        let pool = BlockingPool::new("maildir-test", 1, 4).unwrap();
        let local = Rc::new(Local::new(std::sync::Arc::new(pool)));
        run(async {
            let first = local
                .deliver(
                    &dir,
                    None,
                    "John@example.org",
                    b"Subject: x\r\n\r\nx\r\n",
                    "u1",
                )
                .await;
            assert_eq!(first.unwrap(), Delivered::Now);
            let again = local
                .deliver(&dir, None, "John@example.org", b"other", "u1")
                .await;
            assert_eq!(again.unwrap(), Delivered::Before);
        });
        let got = std::fs::read(dir.join("new/u1")).unwrap();
        assert!(got.ends_with(b"Subject: x\r\n\r\nx\r\n"));
        // A mail reader moved it to cur/: still delivered before, and
        // nothing is left in tmp/.
        std::fs::rename(dir.join("new/u1"), dir.join("cur/u1:2,S")).unwrap();
        std::fs::rename(dir.join("cur/u1:2,S"), dir.join("cur/u1")).unwrap();
        run(async {
            let again = local
                .deliver(&dir, None, "John@example.org", b"x", "u1")
                .await;
            assert_eq!(again.unwrap(), Delivered::Before);
            // Many at once into one mailbox: each is there, whole.
            let tasks: Vec<_> = (0..20)
                .map(|i| {
                    let (local, dir) = (local.clone(), dir.clone());
                    glommio::spawn_local(async move {
                        let body = format!("Subject: {i}\r\n\r\n{i}\r\n");
                        let to = "John@example.org";
                        let unique = format!("m{i}");
                        local
                            .deliver(&dir, Some("a@b"), to, body.as_bytes(), &unique)
                            .await
                    })
                })
                .collect();
            for t in tasks {
                assert_eq!(t.await.unwrap(), Delivered::Now);
            }
        });
        for i in 0..20 {
            let got = std::fs::read(dir.join(format!("new/m{i}"))).unwrap();
            assert!(got.ends_with(format!("Subject: {i}\r\n\r\n{i}\r\n").as_bytes()));
        }
        assert_eq!(std::fs::read_dir(dir.join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn mailbox_paths_stay_inside_the_root() {
        let root = Path::new("/r");
        assert_eq!(
            mailbox_dir(root, "John.Doe@Example.ORG").unwrap(),
            Path::new("/r/example.org/John.Doe")
        );
        assert_eq!(
            mailbox_dir(root, "\"john\"@example.org").unwrap(),
            Path::new("/r/example.org/john")
        );
        for bad in [
            "../x@example.org",
            "a/b@example.org",
            ".hidden@example.org",
            "\"x.\"@example.org",
            "x@..",
            "x@a/b",
            "nodomain",
        ] {
            assert!(mailbox_dir(root, bad).is_err(), "{bad}");
        }
    }
}
