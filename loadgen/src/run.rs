//! The run: starts the workers, merges what they report into a per-second
//! timeline and whole-run totals, and shows the live progress line.
//!
//! Owns the main thread's side of the run; the workers own the sockets.

use crate::config::Config;
use crate::stats::{Percentiles, TimelineRow, Totals, Window};
use crate::tls;
use crate::worker::{self, Report, TlsSetup};
use anyhow::{anyhow, Context, Result};
use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// What a run measured.
pub struct Outcome {
    pub totals: Totals,
    pub timeline: Vec<TimelineRow>,
    /// From the first session start until the last worker finished.
    pub elapsed: Duration,
    /// The run was cut short by Ctrl-C.
    pub interrupted: bool,
}

pub fn run(config: Arc<Config>) -> Result<Outcome> {
    let tls = if config.plan.starttls {
        Some(TlsSetup {
            config: tls::client_config(config.insecure)?,
            server_name: tls::server_name(&config.target_host)?,
        })
    } else {
        None
    };

    // First Ctrl-C: start no more sessions, finish the running ones and
    // report. Second Ctrl-C: exit at once.
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register_conditional_shutdown(
        signal_hook::consts::SIGINT,
        130,
        stop.clone(),
    )
    .context("installing the SIGINT handler")?;
    signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())
        .context("installing the SIGINT handler")?;

    let (tx, rx) = mpsc::channel();
    let run_id = run_id();
    let next_session = Arc::new(AtomicU64::new(0));
    let workers = config.workers;
    let run_start = Instant::now();
    let mut handles = Vec::with_capacity(workers);
    for id in 0..workers {
        // invariant: workers <= concurrency (Config), so every share >= 1.
        let share = config.concurrency / workers as u32
            + u32::from((id as u32) < config.concurrency % workers as u32);
        let setup = worker::Setup {
            id,
            config: config.clone(),
            tls: tls.clone(),
            concurrency: share,
            run_start,
            next_session: next_session.clone(),
            stop: stop.clone(),
            run_id: run_id.clone(),
            reports: tx.clone(),
        };
        let handle = std::thread::Builder::new()
            .name(format!("loadgen-w{id}"))
            .spawn(move || worker::run(setup))
            .context("spawning a worker thread")?;
        handles.push(handle);
    }
    drop(tx);

    let mut merger = Merger::new(workers);
    let mut progress = Progress::new(!config.quiet && std::io::stderr().is_terminal());
    // The channel closes when the last worker has dropped its sender.
    while let Ok(report) = rx.recv() {
        for row in merger.add(report) {
            progress.show(&row);
        }
    }
    let elapsed = run_start.elapsed();
    progress.finish();
    if let Some(last) = merger.rows.last_mut() {
        last.span_s = (elapsed.as_secs_f64() - f64::from(last.second)).clamp(0.0, 1.0);
    }

    for handle in handles {
        handle
            .join()
            .map_err(|_| anyhow!("a worker thread panicked"))??;
    }
    Ok(Outcome {
        totals: merger.totals,
        timeline: merger.rows,
        elapsed,
        interrupted: stop.load(std::sync::atomic::Ordering::Relaxed),
    })
}

/// Unique per run: goes into every Message-ID.
fn run_id() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{nanos:x}.{:x}", std::process::id())
}

/// Merges the workers' per-second windows: a second is final once every
/// worker still running has reported a later one.
struct Merger {
    totals: Totals,
    pending: BTreeMap<u32, Window>,
    /// Per worker: the latest second reported, `None` before the first.
    reported: Vec<Option<u32>>,
    done: Vec<bool>,
    rows: Vec<TimelineRow>,
}

impl Merger {
    fn new(workers: usize) -> Self {
        Merger {
            totals: Totals::default(),
            pending: BTreeMap::new(),
            reported: vec![None; workers],
            done: vec![false; workers],
            rows: Vec::new(),
        }
    }

    /// Takes one report; returns the seconds that became final, in order.
    fn add(&mut self, report: Report) -> Vec<TimelineRow> {
        match report {
            Report::Window { worker, window } => {
                self.reported[worker] = Some(window.second);
                match self.pending.get_mut(&window.second) {
                    Some(w) => w.merge(&window),
                    None => {
                        self.pending.insert(window.second, *window);
                    }
                }
            }
            Report::Done { worker, totals } => {
                self.done[worker] = true;
                self.totals.merge(&totals);
            }
        }
        // The oldest second some running worker may still add to.
        let open = self
            .reported
            .iter()
            .zip(&self.done)
            .filter(|(_, &done)| !done)
            .map(|(r, _)| r.map_or(0, |s| s + 1))
            .min();
        let mut finished = Vec::new();
        while let Some(entry) = self.pending.first_entry() {
            if open.is_some_and(|open| *entry.key() >= open) {
                break;
            }
            let window = entry.remove();
            // Seconds in which no worker reported (a stall) stay visible.
            let next = self.rows.last().map_or(0, |r| r.second + 1);
            for second in next..window.second {
                let row = TimelineRow::of(&Window::new(second));
                self.rows.push(row);
                finished.push(row);
            }
            let row = TimelineRow::of(&window);
            self.rows.push(row);
            finished.push(row);
        }
        finished
    }
}

/// The live progress line on stderr, redrawn once per second.
struct Progress {
    enabled: bool,
    sessions: u64,
    messages: u64,
    errors: u64,
    drawn: bool,
}

impl Progress {
    fn new(enabled: bool) -> Self {
        Progress {
            enabled,
            sessions: 0,
            messages: 0,
            errors: 0,
            drawn: false,
        }
    }

    fn show(&mut self, row: &TimelineRow) {
        self.sessions += row.sessions;
        self.messages += row.messages;
        self.errors += row.errors;
        if !self.enabled {
            return;
        }
        let line = progress_line(row, self.sessions, self.messages, self.errors);
        let mut err = std::io::stderr().lock();
        // Progress is best effort: a failing stderr must not stop the run.
        let _ = write!(err, "\r\x1b[2K{line}");
        let _ = err.flush();
        self.drawn = true;
    }

    fn finish(&mut self) {
        if self.drawn {
            let _ = writeln!(std::io::stderr());
        }
    }
}

fn progress_line(row: &TimelineRow, sessions: u64, messages: u64, errors: u64) -> String {
    let ms = |p: &Percentiles, v: u64| {
        if p.count == 0 {
            "-".to_string()
        } else {
            format!("{:.2}ms", v as f64 / 1000.0)
        }
    };
    let eod = &row.end_of_data_us;
    format!(
        "[{:>4}s] {:>7} sess/s {:>7} msg/s | total {sessions} sessions, {messages} messages, {errors} errors | end-of-data p50 {} p99 {}",
        row.second + 1,
        row.sessions,
        row.messages,
        ms(eod, eod.p50),
        ms(eod, eod.p99),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(second: u32, messages: u64) -> Window {
        let mut w = Window::new(second);
        w.messages = messages;
        w
    }

    #[test]
    fn seconds_finalise_only_when_every_worker_moved_on() {
        let mut m = Merger::new(2);
        let rows = m.add(Report::Window {
            worker: 0,
            window: Box::new(window(0, 5)),
        });
        assert!(rows.is_empty(), "worker 1 may still add to second 0");
        let rows = m.add(Report::Window {
            worker: 1,
            window: Box::new(window(0, 7)),
        });
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].messages, 12);
        // Worker 0 skips to second 3; worker 1 finishes during second 1.
        assert!(m
            .add(Report::Window {
                worker: 0,
                window: Box::new(window(3, 1)),
            })
            .is_empty());
        assert!(
            m.add(Report::Window {
                worker: 1,
                window: Box::new(window(1, 2)),
            })
            .len()
                == 1
        );
        // Second 2 had no report: it appears empty. Worker 0 sent second 3
        // only after it ended, so with worker 1 done both are final.
        let rows = m.add(Report::Done {
            worker: 1,
            totals: Box::default(),
        });
        assert_eq!(
            rows.iter().map(|r| r.second).collect::<Vec<_>>(),
            vec![2, 3]
        );
        assert!(m
            .add(Report::Done {
                worker: 0,
                totals: Box::default(),
            })
            .is_empty());
        assert_eq!(
            m.rows.iter().map(|r| r.messages).collect::<Vec<_>>(),
            vec![12, 2, 0, 1]
        );
    }
}
