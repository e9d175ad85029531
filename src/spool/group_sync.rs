//! Group commit of a directory sync: callers that arrive while a sync is in
//! flight share the next one, so N renames cost one `fsync` of the directory
//! instead of N. Shard-local (no locks): glommio runs one task at a time.

use std::cell::Cell;
use std::path::PathBuf;

use event_listener::Event;

pub struct GroupSync {
    dir: PathBuf,
    /// Generation numbers: `requested` counts callers, `done` is the highest
    /// caller generation covered by a completed sync.
    requested: Cell<u64>,
    done: Cell<u64>,
    running: Cell<bool>,
    finished: Event,
}

impl GroupSync {
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            requested: Cell::new(0),
            done: Cell::new(0),
            running: Cell::new(false),
            finished: Event::new(),
        }
    }

    /// Returns once a directory sync that *started after this call* has
    /// completed (so it covers every change made before the call).
    pub async fn sync(&self) -> std::io::Result<()> {
        let mine = self.requested.get() + 1;
        self.requested.set(mine);
        loop {
            if self.done.get() >= mine {
                return Ok(());
            }
            if !self.running.get() {
                self.running.set(true);
                let covers = self.requested.get();
                let r = self.sync_once().await;
                self.running.set(false);
                if r.is_ok() {
                    self.done.set(self.done.get().max(covers));
                }
                self.finished.notify(usize::MAX);
                r?;
                continue;
            }
            let listener = self.finished.listen();
            // Single-threaded: nothing changed between the checks and listen().
            listener.await;
        }
    }

    async fn sync_once(&self) -> std::io::Result<()> {
        let dir = glommio::io::Directory::open(&self.dir).await?;
        let r = dir.sync().await;
        let _ = dir.close().await;
        r.map_err(Into::into)
    }
}
