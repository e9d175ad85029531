//! One worker: a thread running a mio (epoll) event loop over its share of
//! the connections, the I/O driver for [`Session`].
//!
//! Owns sockets, TLS records (rustls), the per-step timeout, when sessions
//! start (closed loop: keep `concurrency` in flight; open loop: a fixed
//! schedule, latency counted from the intended start) and handing the
//! worker's figures to the main thread: one [`Window`] per second and the
//! [`Totals`] at the end. The SMTP logic itself lives in `session`.

use crate::config::{Config, Mode};
use crate::message::MessageFactory;
use crate::session::{Ctx, Failure, Next, Session};
use crate::stats::{ErrorKind, Stats, Step, Totals, Window};
use anyhow::{Context, Result};
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection};
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often connections are checked against their deadlines.
const SCAN_EVERY: Duration = Duration::from_millis(10);
/// How often a ramping closed loop re-evaluates its allowed concurrency.
const RAMP_TICK: Duration = Duration::from_millis(10);
/// Bytes read per read call.
const READ_CHUNK: usize = 16 * 1024;
/// Most bytes read from one connection before its replies are processed.
const READ_BUDGET: usize = 64 * 1024;

/// What a worker tells the main thread.
pub enum Report {
    /// The figures of one finished second.
    Window { worker: usize, window: Box<Window> },
    /// The worker is done; its whole-run figures.
    Done { worker: usize, totals: Box<Totals> },
}

/// TLS settings for `--starttls`.
#[derive(Clone)]
pub struct TlsSetup {
    pub config: Arc<ClientConfig>,
    pub server_name: ServerName<'static>,
}

/// What a worker needs to run.
pub struct Setup {
    pub id: usize,
    pub config: Arc<Config>,
    pub tls: Option<TlsSetup>,
    /// This worker's share of `--concurrency`.
    pub concurrency: u32,
    pub run_start: Instant,
    /// Closed loop: the next session number to claim, shared by workers.
    pub next_session: Arc<AtomicU64>,
    /// Set on Ctrl-C: start no more sessions.
    pub stop: Arc<AtomicBool>,
    pub run_id: String,
    pub reports: Sender<Report>,
}

/// Runs one worker to completion.
pub fn run(setup: Setup) -> Result<()> {
    let mut worker = Worker::new(setup)?;
    worker.event_loop()?;
    let id = worker.setup.id;
    let now_second = worker.second_of(Instant::now());
    let last = worker.shared.stats.take_window(now_second);
    let totals = Box::new(std::mem::take(&mut worker.shared.stats.totals));
    // A closed channel means the main thread is gone; nothing to report to.
    let _ = worker.setup.reports.send(Report::Window {
        worker: id,
        window: Box::new(last),
    });
    let _ = worker
        .setup
        .reports
        .send(Report::Done { worker: id, totals });
    Ok(())
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Non-blocking connect in progress since then.
    Connecting { since: Instant },
    /// TLS handshake after STARTTLS in progress since then.
    Handshake { since: Instant },
    /// Talking SMTP.
    Active,
}

struct Conn {
    sock: TcpStream,
    session: Session,
    phase: Phase,
    tls: Option<Box<ClientConnection>>,
    /// Received plaintext not yet consumed by the session.
    inbuf: Vec<u8>,
    /// Plaintext to send; `out[out_pos..]` is not written yet.
    out: Vec<u8>,
    out_pos: usize,
}

/// Worker state the session borrows while it runs.
struct Shared {
    factory: MessageFactory,
    stats: Stats,
    scratch: Vec<u8>,
    readbuf: Box<[u8]>,
}

struct Worker {
    setup: Setup,
    poll: Poll,
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    active: u32,
    shared: Shared,
    /// No more sessions will be started.
    exhausted: bool,
    /// Open loop: how many sessions this worker has started.
    started_local: u64,
    /// Open loop: when the next session is due.
    next_due: Option<Instant>,
}

impl Worker {
    fn new(setup: Setup) -> Result<Self> {
        let seed = setup.id as u64 ^ u64::from(std::process::id()) << 16;
        let mut factory = MessageFactory::new(
            setup.config.size,
            seed,
            &setup.run_id,
            &setup.config.plan.helo,
        );
        if let Some(spec) = &setup.config.dkim {
            factory = factory.with_signer(spec.signer().map_err(anyhow::Error::msg)?);
        }
        Ok(Worker {
            poll: Poll::new().context("creating the epoll instance")?,
            conns: Vec::with_capacity(setup.concurrency as usize),
            free: Vec::new(),
            active: 0,
            shared: Shared {
                factory,
                stats: Stats::default(),
                scratch: Vec::new(),
                readbuf: vec![0; READ_CHUNK].into_boxed_slice(),
            },
            exhausted: false,
            started_local: 0,
            next_due: None,
            setup,
        })
    }

    fn event_loop(&mut self) -> Result<()> {
        let mut events = Events::with_capacity(1024);
        let mut next_scan = Instant::now() + SCAN_EVERY;
        loop {
            let now = Instant::now();
            self.roll_window(now);
            self.start_sessions(now);
            if self.exhausted && self.active == 0 {
                return Ok(());
            }
            let timeout = self.poll_timeout(now, next_scan);
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e).context("epoll_wait");
                }
            }
            let now = Instant::now();
            for event in events.iter() {
                // Errors and hang-ups surface through the read.
                let readable = event.is_readable() || event.is_read_closed() || event.is_error();
                self.on_ready(event.token().0, now, readable);
            }
            if now >= next_scan {
                self.expire(now);
                next_scan = now + SCAN_EVERY;
            }
        }
    }

    fn second_of(&self, now: Instant) -> u32 {
        let secs = now
            .saturating_duration_since(self.setup.run_start)
            .as_secs();
        u32::try_from(secs).unwrap_or(u32::MAX)
    }

    /// Hands the finished second to the main thread when a new one began.
    fn roll_window(&mut self, now: Instant) {
        let second = self.second_of(now);
        if second > self.shared.stats.window.second {
            let window = Box::new(self.shared.stats.take_window(second));
            let _ = self.setup.reports.send(Report::Window {
                worker: self.setup.id,
                window,
            });
        }
    }

    fn poll_timeout(&self, now: Instant, next_scan: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.setup.run_start);
        let next_second = Duration::from_secs(elapsed.as_secs() + 1) - elapsed;
        let mut timeout = next_second;
        if self.active > 0 {
            timeout = timeout.min(next_scan.saturating_duration_since(now));
        }
        if let Some(due) = self.next_due {
            timeout = timeout.min(due.saturating_duration_since(now));
        }
        let ramping = !self.setup.config.ramp.is_zero() && elapsed < self.setup.config.ramp;
        if ramping && matches!(self.setup.config.mode, Mode::Closed) {
            timeout = timeout.min(RAMP_TICK);
        }
        timeout
    }

    fn past_deadline(&self, at: Instant) -> bool {
        self.setup.stop.load(Ordering::Relaxed)
            || self
                .setup
                .config
                .duration
                .is_some_and(|d| at.saturating_duration_since(self.setup.run_start) >= d)
    }

    fn start_sessions(&mut self, now: Instant) {
        if self.exhausted {
            return;
        }
        match self.setup.config.mode {
            Mode::Closed => self.start_closed(now),
            Mode::Open { rate } => self.start_open(now, rate),
        }
    }

    fn start_closed(&mut self, now: Instant) {
        let cfg = &self.setup.config;
        let cap = self.setup.concurrency;
        let allowed = if cfg.ramp.is_zero() {
            cap
        } else {
            let frac = (now
                .saturating_duration_since(self.setup.run_start)
                .as_secs_f64()
                / cfg.ramp.as_secs_f64())
            .min(1.0);
            ((f64::from(cap) * frac).ceil() as u32).clamp(1, cap)
        };
        let limit = cfg.sessions.unwrap_or(u64::MAX);
        while self.active < allowed {
            if self.past_deadline(now) {
                self.exhausted = true;
                return;
            }
            let n = self.setup.next_session.fetch_add(1, Ordering::Relaxed);
            if n >= limit {
                self.exhausted = true;
                return;
            }
            self.open(n, now, now);
        }
    }

    fn start_open(&mut self, now: Instant, rate: f64) {
        let cfg = &self.setup.config;
        let workers = cfg.workers as u64;
        let limit = cfg.sessions.unwrap_or(u64::MAX);
        let ramp = cfg.ramp.as_secs_f64();
        loop {
            // Sessions are dealt round-robin: worker `id` runs numbers
            // id, id + W, id + 2W, ... each at its slot of the global schedule.
            let n = self.started_local * workers + self.setup.id as u64;
            if n >= limit {
                self.exhausted = true;
                self.next_due = None;
                return;
            }
            let offset = Duration::from_secs_f64(open_loop_offset(n, rate, ramp));
            let due = self.setup.run_start + offset;
            if self.past_deadline(due) || self.past_deadline(now) {
                self.exhausted = true;
                self.next_due = None;
                return;
            }
            if due > now {
                self.next_due = Some(due);
                return;
            }
            if self.active >= self.setup.concurrency {
                // At the cap: the session waits, and its latency (counted
                // from `due`) shows the queueing. Re-checked when one ends.
                self.next_due = None;
                return;
            }
            self.shared.stats.record(Step::ScheduleLag, now - due);
            self.started_local += 1;
            self.open(n, due, now);
        }
    }

    /// Starts session `n` whose latency counts from `started`.
    fn open(&mut self, n: u64, started: Instant, now: Instant) {
        let session = Session::new(n, started);
        let sock = match TcpStream::connect(self.setup.config.target) {
            Ok(sock) => sock,
            Err(e) => {
                let failure = Failure::new(ErrorKind::from_connect(&e), format!("connect: {e}"));
                session.finish(&mut self.shared.stats, Err(failure), now);
                return;
            }
        };
        // Commands are small and written whole; never let Nagle hold them.
        let _ = sock.set_nodelay(true);
        let idx = self.free.pop().unwrap_or_else(|| {
            self.conns.push(None);
            self.conns.len() - 1
        });
        let mut conn = Conn {
            sock,
            session,
            phase: Phase::Connecting { since: now },
            tls: None,
            inbuf: Vec::new(),
            out: Vec::new(),
            out_pos: 0,
        };
        if let Err(e) = self.poll.registry().register(
            &mut conn.sock,
            Token(idx),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            self.free.push(idx);
            let failure = Failure::new(ErrorKind::Io, format!("epoll register: {e}"));
            conn.session
                .finish(&mut self.shared.stats, Err(failure), now);
            return;
        }
        self.conns[idx] = Some(conn);
        self.active += 1;
    }

    fn on_ready(&mut self, idx: usize, now: Instant, readable: bool) {
        let Some(conn) = self.conns.get_mut(idx).and_then(Option::as_mut) else {
            return; // closed earlier in this batch of events
        };
        match drive(conn, &mut self.shared, &self.setup, now, readable) {
            Ok(Next::Continue | Next::StartTls) => {}
            Ok(Next::Done) => self.close(idx, Ok(()), now),
            Err(failure) => self.close(idx, Err(failure), now),
        }
    }

    fn close(&mut self, idx: usize, outcome: Result<(), Failure>, now: Instant) {
        if let Some(conn) = self.conns.get_mut(idx).and_then(Option::take) {
            // No explicit deregister: closing the socket (dropping `conn`)
            // removes it from the epoll set, one syscall fewer per session.
            // Events of this batch still naming `idx` find the slot empty,
            // and slots are reused only between polls (`start_sessions`).
            conn.session.finish(&mut self.shared.stats, outcome, now);
            self.free.push(idx);
            self.active -= 1;
        }
    }

    /// Fails every connection whose current step exceeded `--timeout`.
    fn expire(&mut self, now: Instant) {
        let timeout = self.setup.config.timeout;
        for idx in 0..self.conns.len() {
            let Some(conn) = &self.conns[idx] else {
                continue;
            };
            let (since, what) = match conn.phase {
                Phase::Connecting { since } => (Some(since), "connect"),
                Phase::Handshake { since } => (Some(since), "TLS handshake"),
                Phase::Active => (conn.session.waiting_since(), conn.session.waiting_for()),
            };
            if since.is_some_and(|s| now.saturating_duration_since(s) >= timeout) {
                let failure = Failure::new(
                    ErrorKind::Timeout,
                    format!("{what}: no progress within {:.1} s", timeout.as_secs_f64()),
                );
                self.close(idx, Err(failure), now);
            }
        }
    }
}

/// Seconds after the run start at which open-loop session `n` (0-based) is
/// due: `n / rate`, or with a ramp of `ramp` seconds a rate rising linearly
/// from 0 to `rate`, so the first `rate * ramp / 2` sessions fall into it.
pub fn open_loop_offset(n: u64, rate: f64, ramp: f64) -> f64 {
    let n = n as f64;
    let in_ramp = rate * ramp / 2.0;
    if n < in_ramp {
        (2.0 * ramp * n / rate).sqrt()
    } else {
        ramp + (n - in_ramp) / rate
    }
}

/// Moves one connection forward as far as it can go without blocking.
///
/// Sockets are registered edge-triggered, so a readiness event must be
/// followed by reading until the socket is drained; a short read counts as
/// drained (the kernel signals the next arrival with a new edge), which
/// saves the extra `read` that would only return `EAGAIN`. For the same
/// reason nothing is read right after a command is written: its reply
/// arrives with an edge of its own. `readable` is the event's read hint.
fn drive(
    conn: &mut Conn,
    sh: &mut Shared,
    setup: &Setup,
    now: Instant,
    readable: bool,
) -> Result<Next, Failure> {
    if let Phase::Connecting { since } = conn.phase {
        let connect_err =
            |e: io::Error| Failure::new(ErrorKind::from_connect(&e), format!("connect: {e}"));
        if let Some(e) = conn.sock.take_error().map_err(connect_err)? {
            return Err(connect_err(e));
        }
        match conn.sock.peer_addr() {
            Ok(_) => {}
            // Spurious wakeup: the connect is still in progress.
            Err(e) if e.kind() == io::ErrorKind::NotConnected => return Ok(Next::Continue),
            Err(e) => return Err(connect_err(e)),
        }
        sh.stats.record(Step::Connect, now - since);
        conn.session.on_connected(now);
        conn.phase = Phase::Active;
    }
    let mut read_now = readable;
    loop {
        if conn.flush()? {
            conn.session.on_flushed(now);
        }
        if let (Phase::Handshake { since }, Some(tls)) = (conn.phase, &conn.tls) {
            if !tls.is_handshaking() {
                sh.stats.record(Step::TlsHandshake, now - since);
                conn.phase = Phase::Active;
                let mut ctx = ctx(sh, setup, &mut conn.out);
                conn.session.on_tls_established(&mut ctx, now);
                continue;
            }
        }
        if !read_now {
            return Ok(Next::Continue);
        }
        let before = conn.inbuf.len();
        let read = conn.fill(&mut sh.readbuf)?;
        if conn.inbuf.len() > before && matches!(conn.phase, Phase::Active) {
            let mut ctx = ctx(sh, setup, &mut conn.out);
            let (used, next) = conn.session.on_input(&mut ctx, &conn.inbuf, now)?;
            conn.inbuf.drain(..used);
            match next {
                Next::Continue => {}
                Next::Done => return Ok(Next::Done),
                Next::StartTls => {
                    let tls = setup.tls.as_ref().ok_or_else(|| {
                        Failure::new(
                            ErrorKind::Tls,
                            "STARTTLS accepted but TLS is not configured",
                        )
                    })?;
                    let client = ClientConnection::new(tls.config.clone(), tls.server_name.clone())
                        .map_err(|e| Failure::new(ErrorKind::Tls, e.to_string()))?;
                    conn.tls = Some(Box::new(client));
                    conn.phase = Phase::Handshake { since: now };
                }
            }
        }
        if read.eof {
            let what = match conn.phase {
                Phase::Handshake { .. } => "the TLS handshake",
                _ => conn.session.waiting_for(),
            };
            return Err(Failure::new(
                ErrorKind::Eof,
                format!("server closed the connection while waiting for {what}"),
            ));
        }
        // Drained: write what the input produced, then wait for an edge.
        // Not drained (read budget spent): go round and read on.
        read_now = !read.drained;
    }
}

fn ctx<'a>(sh: &'a mut Shared, setup: &'a Setup, out: &'a mut Vec<u8>) -> Ctx<'a> {
    Ctx {
        plan: &setup.config.plan,
        factory: &mut sh.factory,
        stats: &mut sh.stats,
        out,
        scratch: &mut sh.scratch,
    }
}

/// The outcome of reading until the socket would block.
struct ReadOutcome {
    /// Nothing more can be read until the next readiness edge.
    drained: bool,
    /// The peer closed the connection (TCP FIN or TLS close_notify).
    eof: bool,
}

impl Conn {
    /// Whether bytes are waiting to be written.
    fn wants_write(&self) -> bool {
        self.out_pos < self.out.len() || self.tls.as_ref().is_some_and(|t| t.wants_write())
    }

    /// Writes pending output until done or the socket would block. Returns
    /// true when something was written and nothing is left.
    fn flush(&mut self) -> Result<bool, Failure> {
        if !self.wants_write() {
            return Ok(false);
        }
        match &mut self.tls {
            None => {
                while self.out_pos < self.out.len() {
                    match self.sock.write(&self.out[self.out_pos..]) {
                        Ok(0) => return Err(Failure::new(ErrorKind::Io, "write returned 0")),
                        Ok(n) => self.out_pos += n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(io_failure("write", &e)),
                    }
                }
            }
            Some(tls) => loop {
                // rustls takes a bounded amount of plaintext at a time (and
                // none before the handshake is done): feed it, write the
                // records it produced, repeat while either makes progress.
                let mut fed = false;
                if self.out_pos < self.out.len() && !tls.is_handshaking() {
                    let n = tls
                        .writer()
                        .write(&self.out[self.out_pos..])
                        .map_err(|e| io_failure("TLS write", &e))?;
                    self.out_pos += n;
                    fed = n > 0;
                }
                if tls.wants_write() {
                    match tls.write_tls(&mut self.sock) {
                        Ok(0) => return Err(Failure::new(ErrorKind::Io, "write returned 0")),
                        Ok(_) => continue,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(io_failure("write", &e)),
                    }
                }
                if !fed || self.out_pos == self.out.len() {
                    break;
                }
            },
        }
        if self.out_pos < self.out.len() {
            return Ok(false); // handshake still running; plaintext waits
        }
        self.out.clear();
        self.out_pos = 0;
        Ok(true)
    }

    /// Reads until the socket is drained (or the read budget is spent),
    /// appending plaintext to `inbuf`.
    fn fill(&mut self, buf: &mut [u8]) -> Result<ReadOutcome, Failure> {
        let mut outcome = ReadOutcome {
            drained: true,
            eof: false,
        };
        let mut total = 0;
        loop {
            if total >= READ_BUDGET {
                outcome.drained = false;
                break;
            }
            match &mut self.tls {
                None => match self.sock.read(buf) {
                    Ok(0) => outcome.eof = true,
                    Ok(n) => {
                        total += n;
                        self.inbuf.extend_from_slice(&buf[..n]);
                        if n == buf.len() {
                            continue; // maybe more: only EAGAIN or a short read tells
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(io_failure("read", &e)),
                },
                Some(tls) => {
                    // rustls reads in record-sized steps: read until EAGAIN.
                    let got = match tls.read_tls(&mut self.sock) {
                        Ok(0) => {
                            outcome.eof = true;
                            0
                        }
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(io_failure("read", &e)),
                    };
                    total += got;
                    let state = tls
                        .process_new_packets()
                        .map_err(|e| Failure::new(ErrorKind::Tls, e.to_string()))?;
                    let mut plain = state.plaintext_bytes_to_read();
                    while plain > 0 {
                        let want = plain.min(buf.len());
                        let n = tls
                            .reader()
                            .read(&mut buf[..want])
                            .map_err(|e| io_failure("TLS read", &e))?;
                        if n == 0 {
                            break;
                        }
                        self.inbuf.extend_from_slice(&buf[..n]);
                        plain -= n;
                    }
                    if state.peer_has_closed() {
                        outcome.eof = true;
                    }
                    if got > 0 && !outcome.eof {
                        continue;
                    }
                }
            }
            break;
        }
        Ok(outcome)
    }
}

fn io_failure(what: &str, e: &io::Error) -> Failure {
    Failure::new(ErrorKind::from_io(e), format!("{what}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::open_loop_offset;

    #[test]
    fn schedule_without_ramp_is_uniform() {
        assert_eq!(open_loop_offset(0, 100.0, 0.0), 0.0);
        assert!((open_loop_offset(250, 100.0, 0.0) - 2.5).abs() < 1e-9);
    }

    #[test]
    fn schedule_with_ramp_is_continuous_and_rises() {
        // 100/s ramped over 10 s: 500 sessions in the ramp, then 100/s.
        let at = |n| open_loop_offset(n, 100.0, 10.0);
        assert_eq!(at(0), 0.0);
        assert!((at(500) - 10.0).abs() < 1e-9);
        assert!((at(600) - 11.0).abs() < 1e-9);
        assert!((at(125) - 5.0).abs() < 1e-9); // a quarter of the sessions by half time
        let mut last = -1.0;
        for n in 0..2000 {
            assert!(at(n) > last);
            last = at(n);
        }
    }
}
