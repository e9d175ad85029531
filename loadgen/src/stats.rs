//! Measurement: latency histograms per step, reply classes, error kinds,
//! session and message counters, and per-second windows for the live
//! progress line and the time series in the reports.
//!
//! Each worker owns one [`Stats`] and records into it without sharing. Once
//! per second a worker hands its finished [`Window`] to the main thread; at
//! the end the main thread merges every worker's [`Totals`].

use hdrhistogram::Histogram;
use std::time::Duration;

/// Largest latency recorded exactly (one hour, in microseconds); larger
/// values are clamped to it.
const MAX_MICROS: u64 = 3_600_000_000;

/// A measured step. Every step is a histogram of microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Open loop only: how late a session started against its schedule.
    ScheduleLag,
    /// TCP connect.
    Connect,
    /// From connected to the 220 greeting.
    Banner,
    Ehlo,
    StartTls,
    /// The TLS handshake after STARTTLS's 220.
    TlsHandshake,
    Auth,
    Mail,
    Rcpt,
    /// DATA up to its 354 intermediate reply.
    Data,
    /// From the last byte of message data (`.` or `BDAT ... LAST`) to the
    /// final reply: the time the server takes to make the message durable.
    EndOfData,
    Rset,
    Quit,
    /// A whole mail transaction, MAIL to the end-of-data reply.
    Message,
    /// A whole session, from its (intended) start to close, failed or not.
    Session,
}

impl Step {
    pub const COUNT: usize = 15;
    pub const ALL: [Step; Step::COUNT] = [
        Step::ScheduleLag,
        Step::Connect,
        Step::Banner,
        Step::Ehlo,
        Step::StartTls,
        Step::TlsHandshake,
        Step::Auth,
        Step::Mail,
        Step::Rcpt,
        Step::Data,
        Step::EndOfData,
        Step::Rset,
        Step::Quit,
        Step::Message,
        Step::Session,
    ];

    /// Machine name, used as the JSON key.
    pub fn name(self) -> &'static str {
        match self {
            Step::ScheduleLag => "schedule_lag",
            Step::Connect => "connect",
            Step::Banner => "banner",
            Step::Ehlo => "ehlo",
            Step::StartTls => "starttls",
            Step::TlsHandshake => "tls_handshake",
            Step::Auth => "auth",
            Step::Mail => "mail",
            Step::Rcpt => "rcpt",
            Step::Data => "data_354",
            Step::EndOfData => "end_of_data",
            Step::Rset => "rset",
            Step::Quit => "quit",
            Step::Message => "message",
            Step::Session => "session",
        }
    }

    /// Human label, used in the summary table and the HTML report.
    pub fn label(self) -> &'static str {
        match self {
            Step::ScheduleLag => "schedule lag (open loop)",
            Step::Connect => "connect",
            Step::Banner => "banner (220)",
            Step::Ehlo => "EHLO",
            Step::StartTls => "STARTTLS",
            Step::TlsHandshake => "TLS handshake",
            Step::Auth => "AUTH PLAIN",
            Step::Mail => "MAIL",
            Step::Rcpt => "RCPT",
            Step::Data => "DATA (354)",
            Step::EndOfData => "end-of-data (durability)",
            Step::Rset => "RSET",
            Step::Quit => "QUIT",
            Step::Message => "message (MAIL..end-of-data)",
            Step::Session => "session",
        }
    }
}

/// Why a session or a command failed. Each kind is counted separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The TCP connect was refused (nothing listening).
    ConnectRefused,
    /// Any other connect failure.
    ConnectFailed,
    /// A step took longer than `--timeout`.
    Timeout,
    /// The connection was reset (ECONNRESET, EPIPE, ECONNABORTED).
    Reset,
    /// The server closed the connection while a reply was outstanding.
    Eof,
    /// A malformed, unexpected or unsolicited reply.
    Protocol,
    /// The TLS handshake or TLS record layer failed.
    Tls,
    /// The server does not advertise an extension the run requires.
    Unsupported,
    /// A command was answered with 4xx.
    Rejected4xx,
    /// A command was answered with 5xx.
    Rejected5xx,
    /// Any other I/O error.
    Io,
}

impl ErrorKind {
    pub const COUNT: usize = 11;
    pub const ALL: [ErrorKind; ErrorKind::COUNT] = [
        ErrorKind::ConnectRefused,
        ErrorKind::ConnectFailed,
        ErrorKind::Timeout,
        ErrorKind::Reset,
        ErrorKind::Eof,
        ErrorKind::Protocol,
        ErrorKind::Tls,
        ErrorKind::Unsupported,
        ErrorKind::Rejected4xx,
        ErrorKind::Rejected5xx,
        ErrorKind::Io,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::ConnectRefused => "connect_refused",
            ErrorKind::ConnectFailed => "connect_failed",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Reset => "connection_reset",
            ErrorKind::Eof => "unexpected_eof",
            ErrorKind::Protocol => "protocol",
            ErrorKind::Tls => "tls",
            ErrorKind::Unsupported => "unsupported_extension",
            ErrorKind::Rejected4xx => "rejected_4xx",
            ErrorKind::Rejected5xx => "rejected_5xx",
            ErrorKind::Io => "io_other",
        }
    }

    /// Classifies an I/O error from a connected socket.
    pub fn from_io(err: &std::io::Error) -> ErrorKind {
        use std::io::ErrorKind as K;
        match err.kind() {
            K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe => ErrorKind::Reset,
            K::UnexpectedEof => ErrorKind::Eof,
            K::TimedOut => ErrorKind::Timeout,
            _ => ErrorKind::Io,
        }
    }

    /// Classifies an error from a connect attempt.
    pub fn from_connect(err: &std::io::Error) -> ErrorKind {
        match err.kind() {
            std::io::ErrorKind::ConnectionRefused => ErrorKind::ConnectRefused,
            std::io::ErrorKind::TimedOut => ErrorKind::Timeout,
            _ => ErrorKind::ConnectFailed,
        }
    }
}

/// How many distinct error descriptions are kept for the report.
const MAX_SAMPLES: usize = 8;

/// Whole-run figures of one worker (or, merged, of the run).
#[derive(Debug, Clone)]
pub struct Totals {
    /// Indexed by `Step as usize`.
    pub hist: Vec<Histogram<u64>>,
    /// Replies by class: index 0 is 2xx, 3 is 5xx.
    pub replies: [u64; 4],
    /// Indexed by `ErrorKind as usize`.
    pub errors: [u64; ErrorKind::COUNT],
    pub sessions_ok: u64,
    pub sessions_failed: u64,
    /// Messages whose end-of-data reply was 2xx.
    pub messages_accepted: u64,
    /// Messages a reply refused (MAIL, every RCPT, DATA or end-of-data).
    pub messages_rejected: u64,
    /// Messages cut off by a session failure (timeout, reset, ...).
    pub messages_aborted: u64,
    /// Of the accepted messages: sent with BDAT, sent pipelined.
    pub messages_bdat: u64,
    pub messages_pipelined: u64,
    pub recipients_accepted: u64,
    pub recipients_rejected: u64,
    /// Bytes of accepted messages (as the recipient sees them).
    pub message_bytes: u64,
    /// A few distinct error descriptions, first seen first.
    pub error_samples: Vec<String>,
}

impl Default for Totals {
    fn default() -> Self {
        Totals {
            hist: (0..Step::COUNT).map(|_| new_histogram(3)).collect(),
            replies: [0; 4],
            errors: [0; ErrorKind::COUNT],
            sessions_ok: 0,
            sessions_failed: 0,
            messages_accepted: 0,
            messages_rejected: 0,
            messages_aborted: 0,
            messages_bdat: 0,
            messages_pipelined: 0,
            recipients_accepted: 0,
            recipients_rejected: 0,
            message_bytes: 0,
            error_samples: Vec::new(),
        }
    }
}

impl Totals {
    pub fn sessions(&self) -> u64 {
        self.sessions_ok + self.sessions_failed
    }

    pub fn error_count(&self) -> u64 {
        self.errors.iter().sum()
    }

    pub fn step(&self, step: Step) -> &Histogram<u64> {
        &self.hist[step as usize]
    }

    /// Adds `other` into `self`.
    pub fn merge(&mut self, other: &Totals) {
        for (mine, theirs) in self.hist.iter_mut().zip(&other.hist) {
            // invariant: both histograms were built by `new_histogram` with
            // identical bounds, so `add` cannot fail.
            let _ = mine.add(theirs);
        }
        for (a, b) in self.replies.iter_mut().zip(other.replies) {
            *a += b;
        }
        for (a, b) in self.errors.iter_mut().zip(other.errors) {
            *a += b;
        }
        self.sessions_ok += other.sessions_ok;
        self.sessions_failed += other.sessions_failed;
        self.messages_accepted += other.messages_accepted;
        self.messages_rejected += other.messages_rejected;
        self.messages_aborted += other.messages_aborted;
        self.messages_bdat += other.messages_bdat;
        self.messages_pipelined += other.messages_pipelined;
        self.recipients_accepted += other.recipients_accepted;
        self.recipients_rejected += other.recipients_rejected;
        self.message_bytes += other.message_bytes;
        for s in &other.error_samples {
            push_sample(&mut self.error_samples, s);
        }
    }
}

/// The figures of one second of the run, as plotted over time.
#[derive(Debug, Clone)]
pub struct Window {
    /// Seconds since the run started; this window covers `[second, second+1)`.
    pub second: u32,
    pub sessions: u64,
    pub messages: u64,
    pub message_bytes: u64,
    pub errors: u64,
    /// End-of-data latency of messages accepted in this second.
    pub end_of_data: Histogram<u64>,
    /// Latency of sessions that ended in this second.
    pub session: Histogram<u64>,
}

impl Window {
    pub fn new(second: u32) -> Self {
        Window {
            second,
            sessions: 0,
            messages: 0,
            message_bytes: 0,
            errors: 0,
            end_of_data: new_histogram(2),
            session: new_histogram(2),
        }
    }

    /// Adds `other` (the same second from another worker) into `self`.
    pub fn merge(&mut self, other: &Window) {
        self.sessions += other.sessions;
        self.messages += other.messages;
        self.message_bytes += other.message_bytes;
        self.errors += other.errors;
        // invariant: identical bounds, see `Totals::merge`.
        let _ = self.end_of_data.add(&other.end_of_data);
        let _ = self.session.add(&other.session);
    }
}

/// Summary figures of one histogram, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub min: u64,
    pub mean: f64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Percentiles::default();
        }
        Percentiles {
            count: h.len(),
            min: h.min(),
            mean: h.mean(),
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

/// One second of the run, merged over workers and reduced to figures.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct TimelineRow {
    pub second: u32,
    /// Seconds of the run this row covers: 1, except for the last row,
    /// which ends with the run.
    pub span_s: f64,
    pub sessions: u64,
    pub messages: u64,
    pub message_bytes: u64,
    pub errors: u64,
    pub end_of_data_us: Percentiles,
    pub session_us: Percentiles,
}

impl TimelineRow {
    pub fn of(w: &Window) -> Self {
        TimelineRow {
            second: w.second,
            span_s: 1.0,
            sessions: w.sessions,
            messages: w.messages,
            message_bytes: w.message_bytes,
            errors: w.errors,
            end_of_data_us: Percentiles::of(&w.end_of_data),
            session_us: Percentiles::of(&w.session),
        }
    }
}

/// One worker's recorder: whole-run totals plus the current second.
pub struct Stats {
    pub totals: Totals,
    pub window: Window,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            totals: Totals::default(),
            window: Window::new(0),
        }
    }
}

impl Stats {
    pub fn record(&mut self, step: Step, took: Duration) {
        let us = micros(took);
        self.totals.hist[step as usize].saturating_record(us);
        match step {
            Step::EndOfData => self.window.end_of_data.saturating_record(us),
            Step::Session => self.window.session.saturating_record(us),
            _ => {}
        }
    }

    /// Counts a reply by its class (code / 100, 2..=5).
    pub fn reply(&mut self, code: u16) {
        if let Some(slot) = (code / 100)
            .checked_sub(2)
            .and_then(|i| self.totals.replies.get_mut(usize::from(i)))
        {
            *slot += 1;
        }
    }

    pub fn error(&mut self, kind: ErrorKind, detail: &str) {
        self.totals.errors[kind as usize] += 1;
        self.window.errors += 1;
        if self.totals.error_samples.len() < MAX_SAMPLES {
            push_sample(
                &mut self.totals.error_samples,
                &format!("{}: {detail}", kind.name()),
            );
        }
    }

    pub fn session_done(&mut self, ok: bool) {
        if ok {
            self.totals.sessions_ok += 1;
        } else {
            self.totals.sessions_failed += 1;
        }
        self.window.sessions += 1;
    }

    pub fn message_accepted(&mut self, bytes: usize, bdat: bool, pipelined: bool) {
        let t = &mut self.totals;
        t.messages_accepted += 1;
        t.message_bytes += bytes as u64;
        t.messages_bdat += u64::from(bdat);
        t.messages_pipelined += u64::from(pipelined);
        self.window.messages += 1;
        self.window.message_bytes += bytes as u64;
    }

    /// Closes the current window and starts the one for `next_second`.
    pub fn take_window(&mut self, next_second: u32) -> Window {
        std::mem::replace(&mut self.window, Window::new(next_second))
    }
}

fn push_sample(samples: &mut Vec<String>, s: &str) {
    if samples.len() < MAX_SAMPLES && !samples.iter().any(|x| x == s) {
        samples.push(s.to_owned());
    }
}

fn new_histogram(sigfig: u8) -> Histogram<u64> {
    // invariant: constant, valid bounds (1 <= low, high >= 2 * low, sigfig <= 5).
    Histogram::new_with_bounds(1, MAX_MICROS, sigfig).expect("valid histogram bounds")
}

pub fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_and_error_tables_are_consistent() {
        for (i, s) in Step::ALL.iter().enumerate() {
            assert_eq!(*s as usize, i);
        }
        for (i, e) in ErrorKind::ALL.iter().enumerate() {
            assert_eq!(*e as usize, i);
        }
    }

    #[test]
    fn records_and_merges() {
        let mut a = Stats::default();
        a.record(Step::EndOfData, Duration::from_millis(2));
        a.reply(250);
        a.reply(354);
        a.reply(451);
        a.reply(550);
        a.reply(999); // not a valid class; parse() never yields it
        a.error(ErrorKind::Timeout, "x");
        a.error(ErrorKind::Timeout, "x");
        a.session_done(false);
        a.message_accepted(100, true, false);
        let mut b = Stats::default();
        b.record(Step::EndOfData, Duration::from_millis(4));
        b.session_done(true);
        let mut t = a.totals.clone();
        t.merge(&b.totals);
        assert_eq!(t.replies, [1, 1, 1, 1]);
        assert_eq!(t.errors[ErrorKind::Timeout as usize], 2);
        assert_eq!(t.error_samples, vec!["timeout: x".to_string()]);
        assert_eq!(t.sessions(), 2);
        assert_eq!(t.step(Step::EndOfData).len(), 2);
        assert_eq!(t.messages_bdat, 1);
        let w = a.take_window(1);
        assert_eq!((w.second, w.messages, w.errors), (0, 1, 2));
        assert_eq!(a.window.second, 1);
    }

    #[test]
    fn huge_latency_is_clamped() {
        let mut a = Stats::default();
        a.record(Step::Session, Duration::from_secs(10 * 3600));
        assert_eq!(a.totals.step(Step::Session).len(), 1);
    }
}
