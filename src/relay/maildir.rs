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

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

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

/// Delivers `message` (prefixed with `Return-Path` and `Delivered-To`) into
/// the Maildir `dir` as `new/<unique>`. `unique` is derived from the queue id
/// and recipient, so a delivery repeated after a crash (delivered, but not
/// yet journaled) finds its file and is not made twice: exactly once.
pub async fn deliver(
    pool: &BlockingPool,
    dir: &Path,
    return_path: Option<&str>,
    rcpt: &str,
    message: &[u8],
    unique: &str,
) -> std::io::Result<()> {
    let dest = dir.join("new").join(unique);
    let prepare = {
        let dir = dir.to_owned();
        let dest = dest.clone();
        let in_cur = dir.join("cur").join(unique);
        move || -> io::Result<(Vec<PathBuf>, bool)> {
            let changed = make_dirs(&dir)?;
            Ok((changed, dest.exists() || in_cur.exists()))
        }
    };
    let (changed, delivered_before) = on_pool(pool, prepare).await?;
    // The new directories' entries are durable before any message in them
    // can be reported delivered (outermost first).
    for parent in &changed {
        sync_dir(parent).await?;
    }
    if delivered_before {
        // Delivered before (a crash between delivery and journal).
        return Ok(());
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
        let tmp = tmp.clone();
        let _ = on_pool(pool, move || std::fs::remove_file(tmp)).await;
        return Err(e.into());
    }
    {
        let tmp = tmp.clone();
        let dest = dest.clone();
        on_pool(pool, move || std::fs::rename(tmp, dest)).await?;
    }
    let new = glommio::io::Directory::open(dir.join("new")).await?;
    let synced = new.sync().await;
    let _ = new.close().await;
    synced.map_err(Into::into)
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
        run(deliver(
            &pool,
            &dir,
            None,
            "John@example.org",
            b"Subject: x\r\n\r\nx\r\n",
            "u1",
        ))
        .unwrap();
        run(deliver(
            &pool,
            &dir,
            None,
            "John@example.org",
            b"other",
            "u1",
        ))
        .unwrap();
        let got = std::fs::read(dir.join("new/u1")).unwrap();
        assert!(got.ends_with(b"Subject: x\r\n\r\nx\r\n"));
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
