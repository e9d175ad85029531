//! Small, bounded thread pools for the blocking work shards hand off:
//! password checks (argon2), DKIM signing, Maildir file operations. Each
//! kind has its own pool, so a burst of one (a password-guessing flood)
//! never queues another (a good login, a signature) behind it.
//!
//! glommio has one blocking thread per executor, with one FIFO queue of
//! 4096 entries shared by everything a shard hands it (its own file
//! renames included) and no way to refuse work; hence pools of our own.
//! A pool is process-wide: a fixed number of threads and a bounded queue.
//! [`BlockingPool::try_run`] refuses at once when the queue is full (the
//! caller answers `454`/`451`); [`BlockingPool::run`] waits for room, for at
//! most a given time. Results come back on `futures` oneshot channels,
//! which glommio tasks await like the resolver's answers; waiting for room
//! uses an `event_listener::Event`, notified by the worker that took a job.
//!
//! A panic in a job is caught on the worker (the thread lives on) and
//! reported to the caller as [`PoolError::Panicked`]. This module must never
//! block a shard thread: submission only takes a short mutex.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use event_listener::Event;
use futures_channel::oneshot;
use futures_lite::FutureExt;
use thiserror::Error;

type Job = Box<dyn FnOnce() + Send + 'static>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum PoolError {
    /// The queue stayed full: the caller answers with a temporary failure.
    #[error("the {0} pool is busy")]
    Busy(&'static str),
    /// The job panicked (the worker survives).
    #[error("a job on the {0} pool panicked")]
    Panicked(&'static str),
}

/// A handle to one pool; dropping the last handle lets its threads finish
/// what is queued and exit.
#[derive(Debug)]
pub struct BlockingPool {
    inner: Arc<Inner>,
}

struct Inner {
    name: &'static str,
    capacity: usize,
    queue: Mutex<Queue>,
    /// Workers wait here for jobs.
    work: Condvar,
    /// Submitters wait here for room.
    room: Event,
}

struct Queue {
    jobs: VecDeque<Job>,
    closed: bool,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockingPool")
            .field("name", &self.name)
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

impl BlockingPool {
    /// Starts `threads` workers (at least one) named `ringmta-{name}-N`,
    /// with room for `capacity` queued jobs (at least one) besides those
    /// running.
    pub fn new(name: &'static str, threads: usize, capacity: usize) -> std::io::Result<Self> {
        let inner = Arc::new(Inner {
            name,
            capacity: capacity.max(1),
            queue: Mutex::new(Queue {
                jobs: VecDeque::new(),
                closed: false,
            }),
            work: Condvar::new(),
            room: Event::new(),
        });
        for i in 0..threads.max(1) {
            let inner = inner.clone();
            std::thread::Builder::new()
                .name(format!("ringmta-{name}-{i}"))
                .spawn(move || inner.work_loop())?;
        }
        Ok(BlockingPool { inner })
    }

    /// Runs `f` on the pool, or `Busy` at once when the queue is full.
    pub async fn try_run<F, R>(&self, f: F) -> Result<R, PoolError>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        let rx = self.push(f).map_err(|_| PoolError::Busy(self.inner.name))?;
        self.collect(rx).await
    }

    /// Runs `f` on the pool, waiting up to `wait` for room in the queue.
    pub async fn run<F, R>(&self, f: F, wait: Duration) -> Result<R, PoolError>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        let deadline = Instant::now() + wait;
        let mut f = f;
        let rx = loop {
            // Listen before trying, so a slot freed in between is not missed.
            let room = self.inner.room.listen();
            match self.push(f) {
                Ok(rx) => break rx,
                Err(back) => f = back,
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(PoolError::Busy(self.inner.name));
            }
            room.or(async {
                glommio::timer::sleep(left).await;
            })
            .await;
        };
        self.collect(rx).await
    }

    /// Jobs waiting for a thread (not those running).
    pub fn queued(&self) -> usize {
        self.inner.lock().jobs.len()
    }

    /// Queues `f`, or gives it back when the queue is full.
    fn push<F, R>(&self, f: F) -> Result<oneshot::Receiver<std::thread::Result<R>>, F>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        let mut q = self.inner.lock();
        if q.jobs.len() >= self.inner.capacity {
            return Err(f);
        }
        let (tx, rx) = oneshot::channel();
        q.jobs.push_back(Box::new(move || {
            // A receiver gone (the connection closed) just drops the result.
            let _ = tx.send(catch_unwind(AssertUnwindSafe(f)));
        }));
        drop(q);
        self.inner.work.notify_one();
        Ok(rx)
    }

    async fn collect<R>(
        &self,
        rx: oneshot::Receiver<std::thread::Result<R>>,
    ) -> Result<R, PoolError> {
        match rx.await {
            Ok(Ok(r)) => Ok(r),
            // A panic, or (never expected) a job dropped unrun.
            Ok(Err(_)) | Err(_) => Err(PoolError::Panicked(self.inner.name)),
        }
    }
}

impl Drop for BlockingPool {
    fn drop(&mut self) {
        self.inner.lock().closed = true;
        self.inner.work.notify_all();
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn work_loop(&self) {
        loop {
            let job = {
                let mut q = self.lock();
                loop {
                    if let Some(job) = q.jobs.pop_front() {
                        break job;
                    }
                    if q.closed {
                        return;
                    }
                    q = self.work.wait(q).unwrap_or_else(|p| p.into_inner());
                }
            };
            self.room.notify(1);
            job();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::mpsc;

    use glommio::{LocalExecutorBuilder, Placement};

    use super::*;

    fn run<T>(fut: impl std::future::Future<Output = T>) -> T {
        LocalExecutorBuilder::new(Placement::Unbound)
            .io_memory(64 << 10)
            .make()
            .expect("executor")
            .run(fut)
    }

    /// Blocks the pool's only thread until the returned sender is dropped.
    fn occupy(pool: &BlockingPool) -> (mpsc::Sender<()>, mpsc::Receiver<()>) {
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let (started_tx, started_rx) = mpsc::channel::<()>();
        let mut q = pool.inner.lock();
        q.jobs.push_back(Box::new(move || {
            let _ = started_tx.send(());
            let _ = release_rx.recv();
        }));
        drop(q);
        pool.inner.work.notify_one();
        (release_tx, started_rx)
    }

    #[test]
    fn runs_jobs_and_refuses_when_full() {
        let pool = BlockingPool::new("test", 1, 1).unwrap();
        run(async {
            assert_eq!(pool.try_run(|| 6 * 7).await, Ok(42));
            let (release, started) = occupy(&pool);
            started.recv().unwrap();
            // One job fits in the queue; the next is refused at once.
            let queued = pool.push(|| 1).ok().expect("room for one");
            assert_eq!(pool.try_run(|| 2).await, Err(PoolError::Busy("test")));
            let t0 = Instant::now();
            assert_eq!(
                pool.run(|| 3, Duration::from_millis(50)).await,
                Err(PoolError::Busy("test"))
            );
            assert!(t0.elapsed() >= Duration::from_millis(50));
            drop(release);
            assert_eq!(pool.collect(queued).await, Ok(1));
        });
    }

    #[test]
    fn a_waiting_job_gets_the_room_a_finished_one_frees() {
        let pool = BlockingPool::new("test", 1, 1).unwrap();
        run(async {
            let (release, started) = occupy(&pool);
            started.recv().unwrap();
            let _queued = pool.push(|| ()).ok().expect("room for one");
            let releaser = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(30));
                drop(release);
            });
            assert_eq!(pool.run(|| 5, Duration::from_secs(10)).await, Ok(5));
            releaser.join().unwrap();
        });
    }

    #[test]
    fn a_panicking_job_is_reported_and_the_worker_lives() {
        let pool = BlockingPool::new("test", 1, 4).unwrap();
        run(async {
            let r: Result<(), _> = pool.try_run(|| panic!("job bug")).await;
            assert_eq!(r, Err(PoolError::Panicked("test")));
            let ran = Arc::new(AtomicBool::new(false));
            let r2 = ran.clone();
            pool.try_run(move || r2.store(true, Ordering::SeqCst))
                .await
                .unwrap();
            assert!(ran.load(Ordering::SeqCst));
        });
    }
}
