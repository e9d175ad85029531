//! Log lines to stderr from a writer thread that the shards do not wake
//! line by line. A leaf: it uses no other module of the crate.
//!
//! A shard appends each formatted line to one shared buffer (a short
//! mutex hold, uncontended in practice) and goes on. The writer thread
//! takes the whole buffer, writes it in one `write(2)`, and sleeps
//! [`INTERVAL`]-long between batches; only when it has found nothing and
//! gone idle does the next line wake it (a futex wake per burst, not per
//! line: `tracing-appender`'s channel woke it for nearly every line, which
//! cost a shard 4–7 % of its time under connect-heavy load, three lines per
//! session).
//!
//! Mail before logs: past [`Options::limit`] bytes waiting (a stalled log
//! reader, a full pipe), lines are dropped whole, counted, and reported by
//! a warning once the writer catches up. A line is never split or
//! interleaved with another.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{JoinHandle, Thread};
use std::time::Duration;

/// How long the writer thread waits between two batches while lines keep
/// coming (the most a line waits before its write, under load).
pub const INTERVAL: Duration = Duration::from_millis(10);

/// How the writer runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// Bytes of lines waiting beyond which new lines are dropped.
    pub limit: usize,
    /// The pause between batches.
    pub interval: Duration,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            limit: 16 << 20,
            interval: INTERVAL,
        }
    }
}

struct Shared {
    lines: Mutex<Vec<u8>>,
    limit: usize,
    dropped: AtomicU64,
    /// The writer thread found nothing and parks (or is about to): the next
    /// line unparks it.
    idle: AtomicBool,
    stop: AtomicBool,
    thread: OnceLock<Thread>,
}

impl Shared {
    fn push(&self, line: &[u8]) {
        {
            let mut lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
            if lines.len() + line.len() > self.limit {
                drop(lines);
                self.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            lines.extend_from_slice(line);
        }
        // After the append: a writer that announced idle before our lock
        // either saw the line under its own lock or is woken here.
        if self.idle.load(Ordering::SeqCst) && self.idle.swap(false, Ordering::SeqCst) {
            if let Some(t) = self.thread.get() {
                t.unpark();
            }
        }
    }
}

/// The `tracing_subscriber` writer: cheap to clone, one per subscriber.
#[derive(Clone)]
pub struct LogWriter {
    shared: Arc<Shared>,
}

/// Stops the writer thread when dropped, after it wrote every line.
pub struct Guard {
    shared: Arc<Shared>,
    handle: Option<JoinHandle<()>>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.shared.thread.get() {
            t.unpark();
        }
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Starts the writer thread `name` writing to `out`.
pub fn spawn<W: Write + Send + 'static>(
    name: &str,
    mut out: W,
    opts: Options,
) -> std::io::Result<(LogWriter, Guard)> {
    let shared = Arc::new(Shared {
        lines: Mutex::new(Vec::new()),
        limit: opts.limit,
        dropped: AtomicU64::new(0),
        idle: AtomicBool::new(false),
        stop: AtomicBool::new(false),
        thread: OnceLock::new(),
    });
    let handle = {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || run(&shared, &mut out, opts.interval))?
    };
    let _ = shared.thread.set(handle.thread().clone());
    Ok((
        LogWriter {
            shared: shared.clone(),
        },
        Guard {
            shared,
            handle: Some(handle),
        },
    ))
}

fn run(shared: &Shared, out: &mut dyn Write, interval: Duration) {
    let mut batch = Vec::new();
    loop {
        {
            let mut lines = shared.lines.lock().unwrap_or_else(|p| p.into_inner());
            std::mem::swap(&mut *lines, &mut batch);
        }
        if !batch.is_empty() {
            // Errors (a closed stderr) are not the mail's problem: the
            // lines go, so the buffer never fills because of them.
            let _ = out.write_all(&batch);
            let _ = out.flush();
            batch.clear();
            if batch.capacity() > 1 << 20 {
                batch = Vec::new();
            }
            let dropped = shared.dropped.swap(0, Ordering::Relaxed);
            if dropped > 0 {
                tracing::warn!(dropped, "log lines dropped: stderr is not read fast enough");
            }
            if shared.stop.load(Ordering::SeqCst) {
                continue;
            }
            std::thread::park_timeout(interval);
            continue;
        }
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        shared.idle.store(true, Ordering::SeqCst);
        let empty = shared
            .lines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty();
        if empty && !shared.stop.load(Ordering::SeqCst) {
            std::thread::park();
        }
        shared.idle.store(false, Ordering::SeqCst);
    }
}

/// One event's writer: `tracing_subscriber::fmt` formats the whole line
/// first and hands it over in one `write_all`.
pub struct Line<'a> {
    shared: &'a Shared,
}

impl Write for Line<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.shared.push(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = Line<'a>;

    fn make_writer(&'a self) -> Line<'a> {
        Line {
            shared: &self.shared,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `Write` the test reads back.
    #[derive(Clone, Default)]
    struct Out(Arc<Mutex<Vec<u8>>>);

    impl Write for Out {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn line(w: &LogWriter, text: &str) {
        use tracing_subscriber::fmt::MakeWriter;
        w.make_writer().write_all(text.as_bytes()).unwrap();
    }

    #[test]
    fn lines_from_many_threads_arrive_whole_and_the_guard_flushes() {
        let out = Out::default();
        let (w, guard) = spawn("log-test", out.clone(), Options::default()).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let w = w.clone();
                std::thread::spawn(move || {
                    for i in 0..2000 {
                        line(&w, &format!("t{t} line {i} {}\n", "x".repeat(i % 50)));
                        if i % 500 == 0 {
                            // Let the writer go idle, so a later line wakes it.
                            std::thread::sleep(Duration::from_millis(30));
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        drop(guard);
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 8000);
        for t in 0..4 {
            let mine: Vec<&str> = lines
                .iter()
                .copied()
                .filter(|l| l.starts_with(&format!("t{t} ")))
                .collect();
            for (i, l) in mine.iter().enumerate() {
                assert_eq!(*l, format!("t{t} line {i} {}", "x".repeat(i % 50)));
            }
        }
    }

    #[test]
    fn an_idle_writer_is_woken_by_the_next_line() {
        let out = Out::default();
        let (w, _guard) = spawn("log-test", out.clone(), Options::default()).unwrap();
        for i in 0..3 {
            // Long enough for the writer to find nothing and park.
            std::thread::sleep(Duration::from_millis(50));
            line(&w, &format!("after idle {i}\n"));
            let deadline = std::time::Instant::now() + Duration::from_secs(2);
            while !String::from_utf8_lossy(&out.0.lock().unwrap())
                .contains(&format!("after idle {i}\n"))
            {
                assert!(
                    std::time::Instant::now() < deadline,
                    "line {i} never written"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    /// A writer that blocks until released: a stalled stderr.
    struct Stalled(Arc<(Mutex<bool>, std::sync::Condvar)>, Out);

    impl Write for Stalled {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let (lock, cv) = &*self.0;
            let mut open = lock.lock().unwrap();
            while !*open {
                open = cv.wait(open).unwrap();
            }
            self.1.write(buf)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_reader_costs_dropped_lines_not_memory_or_waiting() {
        let gate = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        let out = Out::default();
        let opts = Options {
            limit: 4096,
            ..Options::default()
        };
        let (w, guard) = spawn("log-test", Stalled(gate.clone(), out.clone()), opts).unwrap();
        line(&w, "first\n");
        // The writer takes "first" and blocks on the stalled write.
        std::thread::sleep(Duration::from_millis(50));
        let started = std::time::Instant::now();
        for i in 0..10_000 {
            line(&w, &format!("line {i:05}\n"));
        }
        assert!(started.elapsed() < Duration::from_secs(5), "lines waited");
        let waiting = w.shared.lines.lock().unwrap().len();
        assert!(waiting <= 4096, "{waiting} bytes held");
        assert!(w.shared.dropped.load(Ordering::Relaxed) > 9000);
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
        drop(guard);
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        assert!(text.starts_with("first\nline 00000\n"), "{}", &text[..40]);
        // Whole lines only.
        assert!(
            text.lines().all(|l| l == "first" || l.len() == 10),
            "{text}"
        );
    }
}
