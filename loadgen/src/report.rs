//! End-of-run output: the summary table on stdout and the `--json` document.
//!
//! Owns the names and layout of every reported figure; `html` reuses
//! [`Report::workload`] and the JSON keys so the three outputs agree.

use crate::config::{Config, Mode};
use crate::run::Outcome;
use crate::stats::{ErrorKind, Percentiles, Step};
use serde_json::{json, Map, Value};
use std::fmt::Write as _;

/// A finished run, ready to be rendered.
pub struct Report<'a> {
    pub config: &'a Config,
    pub outcome: &'a Outcome,
}

impl Report<'_> {
    fn secs(&self) -> f64 {
        self.outcome.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn per_second(&self, count: u64) -> f64 {
        count as f64 / self.secs()
    }

    /// One line describing the load shape.
    pub fn mode(&self) -> String {
        let c = self.config;
        let mut s = match c.mode {
            Mode::Closed => format!("closed loop, concurrency {}", c.concurrency),
            Mode::Open { rate } => {
                format!(
                    "open loop, {rate} sessions/s, at most {} in flight",
                    c.concurrency
                )
            }
        };
        if !c.ramp.is_zero() {
            let _ = write!(s, ", ramp {:.1} s", c.ramp.as_secs_f64());
        }
        let _ = write!(s, ", {} workers", c.workers);
        match (c.sessions, c.duration) {
            (Some(n), Some(d)) => {
                let _ = write!(s, ", {n} sessions or {:.1} s", d.as_secs_f64());
            }
            (Some(n), None) => {
                let _ = write!(s, ", {n} sessions");
            }
            (None, Some(d)) => {
                let _ = write!(s, ", {:.1} s", d.as_secs_f64());
            }
            (None, None) => {}
        }
        s
    }

    /// One line describing what each session does.
    pub fn workload(&self) -> String {
        let p = &self.config.plan;
        format!(
            "{} message(s)/session, {} recipient(s), size {}, pipelining {}, {}{}{}",
            p.messages,
            p.recipients,
            self.config.size,
            if p.pipelining { "on" } else { "off" },
            if p.bdat { "BDAT" } else { "DATA" },
            if p.starttls { ", STARTTLS" } else { "" },
            if p.auth_command.is_some() {
                ", AUTH PLAIN"
            } else {
                ""
            },
        )
    }

    /// The summary table printed on stdout.
    pub fn summary(&self) -> String {
        let t = &self.outcome.totals;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "ringmta-loadgen -> {}  ({})",
            self.config.target,
            self.mode()
        );
        let _ = writeln!(s, "workload: {}", self.workload());
        let _ = writeln!(
            s,
            "elapsed:  {:.3} s{}",
            self.secs(),
            if self.outcome.interrupted {
                "  (interrupted by Ctrl-C)"
            } else {
                ""
            }
        );
        s.push('\n');
        let _ = writeln!(s, "{:<16}{:>12}{:>14}", "", "total", "per second");
        let _ = writeln!(
            s,
            "{:<16}{:>12}{:>14.1}   ok {}, failed {}",
            "sessions",
            t.sessions(),
            self.per_second(t.sessions()),
            t.sessions_ok,
            t.sessions_failed
        );
        let _ = writeln!(
            s,
            "{:<16}{:>12}{:>14.1}   rejected {}, aborted {}; pipelined {}, BDAT {}",
            "messages",
            t.messages_accepted,
            self.per_second(t.messages_accepted),
            t.messages_rejected,
            t.messages_aborted,
            t.messages_pipelined,
            t.messages_bdat
        );
        let _ = writeln!(
            s,
            "{:<16}{:>12}{:>14}   rejected {}",
            "recipients", t.recipients_accepted, "", t.recipients_rejected
        );
        let _ = writeln!(
            s,
            "{:<16}{:>12}{:>14}",
            "message bytes",
            t.message_bytes,
            format!("{:.2} MB/s", self.per_second(t.message_bytes) / 1e6)
        );
        s.push('\n');
        let _ = writeln!(
            s,
            "replies         2xx {}   3xx {}   4xx {}   5xx {}",
            t.replies[0], t.replies[1], t.replies[2], t.replies[3]
        );
        if t.error_count() == 0 {
            let _ = writeln!(s, "errors          none");
        } else {
            let kinds: Vec<String> = ErrorKind::ALL
                .iter()
                .filter(|k| t.errors[**k as usize] > 0)
                .map(|k| format!("{} {}", k.name(), t.errors[*k as usize]))
                .collect();
            let _ = writeln!(
                s,
                "errors          {}: {}",
                t.error_count(),
                kinds.join(", ")
            );
            for sample in &t.error_samples {
                let _ = writeln!(s, "  e.g. {sample}");
            }
        }
        s.push('\n');
        let _ = writeln!(
            s,
            "{:<30}{:>9}{:>10}{:>10}{:>10}{:>10}{:>10}",
            "latency (ms)", "count", "p50", "p90", "p99", "p99.9", "max"
        );
        for step in Step::ALL {
            let p = Percentiles::of(t.step(step));
            if p.count == 0 {
                continue;
            }
            let ms = |us: u64| us as f64 / 1000.0;
            let _ = writeln!(
                s,
                "{:<30}{:>9}{:>10.3}{:>10.3}{:>10.3}{:>10.3}{:>10.3}",
                step.label(),
                p.count,
                ms(p.p50),
                ms(p.p90),
                ms(p.p99),
                ms(p.p999),
                ms(p.max)
            );
        }
        s
    }

    /// Every count and percentile, for `--json`.
    pub fn json(&self) -> Value {
        let c = self.config;
        let t = &self.outcome.totals;
        let mut errors = Map::new();
        errors.insert("total".into(), json!(t.error_count()));
        for kind in ErrorKind::ALL {
            errors.insert(kind.name().into(), json!(t.errors[kind as usize]));
        }
        let mut latency = Map::new();
        for step in Step::ALL {
            latency.insert(step.name().into(), json!(Percentiles::of(t.step(step))));
        }
        let (mode, rate) = match c.mode {
            Mode::Closed => ("closed", None),
            Mode::Open { rate } => ("open", Some(rate)),
        };
        json!({
            "tool": "ringmta-loadgen",
            "version": env!("CARGO_PKG_VERSION"),
            "config": {
                "target": c.target.to_string(),
                "mode": mode,
                "rate": rate,
                "concurrency": c.concurrency,
                "workers": c.workers,
                "ramp_s": c.ramp.as_secs_f64(),
                "sessions_limit": c.sessions,
                "duration_s": c.duration.map(|d| d.as_secs_f64()),
                "messages_per_session": c.plan.messages,
                "recipients": c.plan.recipients,
                "size": c.size.to_string(),
                "pipelining": c.plan.pipelining,
                "bdat": c.plan.bdat,
                "starttls": c.plan.starttls,
                "auth": c.plan.auth_command.is_some(),
                "timeout_s": c.timeout.as_secs_f64(),
            },
            "elapsed_s": self.secs(),
            "interrupted": self.outcome.interrupted,
            "sessions": {
                "total": t.sessions(),
                "ok": t.sessions_ok,
                "failed": t.sessions_failed,
                "per_s": self.per_second(t.sessions()),
            },
            "messages": {
                "accepted": t.messages_accepted,
                "rejected": t.messages_rejected,
                "aborted": t.messages_aborted,
                "pipelined": t.messages_pipelined,
                "bdat": t.messages_bdat,
                "per_s": self.per_second(t.messages_accepted),
            },
            "recipients": {
                "accepted": t.recipients_accepted,
                "rejected": t.recipients_rejected,
            },
            "bytes": {
                "total": t.message_bytes,
                "per_s": self.per_second(t.message_bytes),
            },
            "replies": {
                "2xx": t.replies[0],
                "3xx": t.replies[1],
                "4xx": t.replies[2],
                "5xx": t.replies[3],
            },
            "errors": errors,
            "error_samples": t.error_samples,
            "latency_us": latency,
            "timeline": self.outcome.timeline,
        })
    }
}
