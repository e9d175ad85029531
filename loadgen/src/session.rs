//! The sans-IO SMTP client session: which command to send next, given the
//! replies so far.
//!
//! Owns the client side of RFC 5321 for one connection: greeting, EHLO and
//! its extensions, STARTTLS (RFC 3207, the handshake itself is the driver's),
//! AUTH PLAIN (RFC 4954), mail transactions with or without PIPELINING
//! (RFC 2920) and with DATA or BDAT ... LAST (RFC 3030), RSET after a failed
//! transaction, QUIT. It reads bytes the driver received, appends the bytes
//! to send to the driver's output buffer and records every measurement into
//! the worker's [`Stats`]. It performs no I/O and reads no clock: the driver
//! passes `now` in.

use crate::message::{dot_stuff_into, MessageFactory, MessageSpec, Template};
use crate::reply::{self, Reply};
use crate::stats::{ErrorKind, Stats, Step};
use std::collections::VecDeque;
use std::time::Instant;

/// What every session of the run does; shared read-only by all sessions.
#[derive(Debug, Clone)]
pub struct Plan {
    pub helo: String,
    /// Mail transactions per session (0: connect, greet and quit).
    pub messages: u32,
    /// Recipients per message, at least 1.
    pub recipients: u32,
    /// Pipeline MAIL/RCPT/DATA when the server offers PIPELINING.
    pub pipelining: bool,
    /// Use BDAT ... LAST instead of DATA when the server offers CHUNKING.
    pub bdat: bool,
    /// Require STARTTLS before anything else.
    pub starttls: bool,
    /// The complete `AUTH PLAIN <base64>\r\n` command, when authenticating.
    pub auth_command: Option<Vec<u8>>,
    pub mail_from: Template,
    pub rcpt_to: Template,
}

impl Plan {
    /// Builds the AUTH PLAIN command (RFC 4616: `\0user\0password`).
    pub fn auth_plain_command(user: &str, password: &str) -> Vec<u8> {
        let mut raw = Vec::with_capacity(user.len() + password.len() + 2);
        raw.push(0);
        raw.extend_from_slice(user.as_bytes());
        raw.push(0);
        raw.extend_from_slice(password.as_bytes());
        let mut cmd = b"AUTH PLAIN ".to_vec();
        base64_into(&raw, &mut cmd);
        cmd.extend_from_slice(b"\r\n");
        cmd
    }
}

/// Where the session stands after consuming input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Keep going: send what is in the output buffer and read more.
    Continue,
    /// STARTTLS was accepted: flush, run the TLS handshake, then call
    /// [`Session::on_tls_established`].
    StartTls,
    /// QUIT was answered: close the connection.
    Done,
}

/// A failure that ends the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub kind: ErrorKind,
    pub detail: String,
}

impl Failure {
    pub fn new(kind: ErrorKind, detail: impl Into<String>) -> Self {
        Failure {
            kind,
            detail: detail.into(),
        }
    }

    fn protocol(detail: impl Into<String>) -> Self {
        Failure::new(ErrorKind::Protocol, detail)
    }

    fn rejected(what: Cmd, reply: &Reply<'_>) -> Self {
        Failure::new(rejection_kind(reply), rejection_text(what, reply))
    }
}

/// The commands whose replies a session waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cmd {
    Banner,
    Ehlo,
    StartTls,
    Auth,
    Mail,
    Rcpt,
    Data,
    /// The `.` after the message (DATA mode).
    EndOfData,
    /// `BDAT n LAST` with the whole message; its reply is the end-of-data one.
    Bdat,
    Rset,
    Quit,
}

impl Cmd {
    fn step(self) -> Step {
        match self {
            Cmd::Banner => Step::Banner,
            Cmd::Ehlo => Step::Ehlo,
            Cmd::StartTls => Step::StartTls,
            Cmd::Auth => Step::Auth,
            Cmd::Mail => Step::Mail,
            Cmd::Rcpt => Step::Rcpt,
            Cmd::Data => Step::Data,
            Cmd::EndOfData | Cmd::Bdat => Step::EndOfData,
            Cmd::Rset => Step::Rset,
            Cmd::Quit => Step::Quit,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Cmd::Banner => "greeting",
            Cmd::Ehlo => "EHLO",
            Cmd::StartTls => "STARTTLS",
            Cmd::Auth => "AUTH",
            Cmd::Mail => "MAIL",
            Cmd::Rcpt => "RCPT",
            Cmd::Data => "DATA",
            Cmd::EndOfData => "end of data",
            Cmd::Bdat => "BDAT",
            Cmd::Rset => "RSET",
            Cmd::Quit => "QUIT",
        }
    }

    /// Whether `code` is this command's success reply: the exact code
    /// where RFC 5321/3207/4954 name one, any 2xx elsewhere.
    fn is_success(self, code: u16) -> bool {
        match self {
            Cmd::Banner | Cmd::StartTls => code == 220,
            Cmd::Auth => code == 235,
            Cmd::Data => code == 354,
            _ => code / 100 == 2,
        }
    }
}

/// A command sent (or queued) whose reply has not arrived yet.
#[derive(Debug, Clone, Copy)]
struct Pending {
    cmd: Cmd,
    /// When its last byte went to the kernel (queue time until flushed).
    sent: Instant,
    flushed: bool,
}

/// What the server offered in its EHLO reply.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Caps {
    pipelining: bool,
    chunking: bool,
    starttls: bool,
    auth_plain: bool,
    /// `SIZE` was advertised (with or without a limit).
    size: bool,
}

impl Caps {
    fn from_ehlo(reply: &Reply<'_>) -> Caps {
        let mut caps = Caps::default();
        // The first line is the server's name; each further line one keyword.
        for line in reply.lines().skip(1) {
            let mut words = line
                .split(|&b| b == b' ')
                .filter(|w| !w.is_empty())
                .map(|w| w.to_ascii_uppercase());
            let Some(keyword) = words.next() else {
                continue;
            };
            match keyword.as_slice() {
                b"PIPELINING" => caps.pipelining = true,
                b"CHUNKING" => caps.chunking = true,
                b"STARTTLS" => caps.starttls = true,
                b"SIZE" => caps.size = true,
                b"AUTH" => caps.auth_plain |= words.any(|w| w == b"PLAIN"),
                // The pre-RFC 4954 form some servers still send.
                kw if kw.starts_with(b"AUTH=") => {
                    caps.auth_plain |= kw[5..].split(|&b| b == b' ').any(|w| w == b"PLAIN")
                        || words.any(|w| w == b"PLAIN");
                }
                _ => {}
            }
        }
        caps
    }
}

/// The mail transaction in progress.
#[derive(Debug, Clone, Copy)]
struct Txn {
    started: Instant,
    pipelined: bool,
    bdat: bool,
    mail_ok: bool,
    rcpt_ok: u32,
    /// Non-pipelined: the next recipient to send.
    next_rcpt: u32,
}

impl Txn {
    fn deliverable(&self) -> bool {
        self.mail_ok && self.rcpt_ok > 0
    }
}

/// The per-call context: the plan and the worker's shared scratch.
pub struct Ctx<'a> {
    pub plan: &'a Plan,
    pub factory: &'a mut MessageFactory,
    pub stats: &'a mut Stats,
    /// Bytes to send; the session appends, the driver drains.
    pub out: &'a mut Vec<u8>,
    /// Scratch for rendering messages (reused across sessions).
    pub scratch: &'a mut Vec<u8>,
}

/// One SMTP client session.
pub struct Session {
    /// Session number in the run; message and address counters derive
    /// from it so they are unique across workers.
    number: u64,
    /// The (intended) start, for the session latency.
    started: Instant,
    pending: VecDeque<Pending>,
    caps: Caps,
    tls: bool,
    authenticated: bool,
    messages_started: u32,
    txn: Option<Txn>,
    /// The current message's number in the run and its drawn size. The
    /// message is rendered (into the worker's shared scratch) only when it
    /// is written, so sessions never see each other's content.
    message_number: u64,
    message_size: usize,
    /// Bytes of the current message as rendered (as the recipient sees it).
    message_len: usize,
    /// A non-fatal error (a rejection) happened.
    had_error: bool,
    from: Vec<u8>,
    rcpts: Vec<Vec<u8>>,
}

impl Session {
    /// A session numbered `number`, whose latency counts from `started`.
    pub fn new(number: u64, started: Instant) -> Self {
        Session {
            number,
            started,
            pending: VecDeque::new(),
            caps: Caps::default(),
            tls: false,
            authenticated: false,
            messages_started: 0,
            txn: None,
            message_number: 0,
            message_size: 0,
            message_len: 0,
            had_error: false,
            from: Vec::new(),
            rcpts: Vec::new(),
        }
    }

    /// The TCP connection is up: wait for the greeting.
    pub fn on_connected(&mut self, now: Instant) {
        self.pending.push_back(Pending {
            cmd: Cmd::Banner,
            sent: now,
            flushed: true,
        });
    }

    /// Since when the oldest outstanding reply has been awaited, for the
    /// per-step timeout. `None` when nothing is outstanding.
    pub fn waiting_since(&self) -> Option<Instant> {
        self.pending.front().map(|p| p.sent)
    }

    /// The command whose reply is awaited, for diagnostics.
    pub fn waiting_for(&self) -> &'static str {
        self.pending.front().map_or("nothing", |p| p.cmd.name())
    }

    /// The driver wrote the whole output buffer to the kernel at `now`.
    pub fn on_flushed(&mut self, now: Instant) {
        for p in self.pending.iter_mut().rev() {
            if p.flushed {
                break;
            }
            p.sent = now;
            p.flushed = true;
        }
    }

    /// Consumes complete replies from `input`. Returns how many bytes were
    /// used (the rest is an incomplete reply) and what the driver does next.
    pub fn on_input(
        &mut self,
        ctx: &mut Ctx<'_>,
        input: &[u8],
        now: Instant,
    ) -> Result<(usize, Next), Failure> {
        let mut pos = 0;
        loop {
            let (reply, used) = match reply::parse(&input[pos..]) {
                Ok(Some(parsed)) => parsed,
                Ok(None) => return Ok((pos, Next::Continue)),
                Err(e) => return Err(Failure::protocol(format!("{e}: {}", excerpt(input)))),
            };
            pos += used;
            match self.on_reply(ctx, &reply, now)? {
                Next::Continue => {}
                Next::StartTls if pos != input.len() => {
                    // RFC 3207 5: plaintext pipelined after STARTTLS could be
                    // an injection; a client must not act on it.
                    return Err(Failure::protocol("data after the STARTTLS reply"));
                }
                next => return Ok((pos, next)),
            }
        }
    }

    /// TLS is up after STARTTLS: greet again (RFC 3207 4.2).
    pub fn on_tls_established(&mut self, ctx: &mut Ctx<'_>, now: Instant) {
        self.tls = true;
        self.caps = Caps::default();
        self.send_ehlo(ctx, now);
    }

    /// Records the session's end. `outcome` is the failure that ended it,
    /// if any (a driver failure such as a timeout, or one from `on_input`).
    pub fn finish(self, stats: &mut Stats, outcome: Result<(), Failure>, now: Instant) {
        if let Err(f) = &outcome {
            stats.error(f.kind, &f.detail);
            if self.txn.is_some() {
                stats.totals.messages_aborted += 1;
            }
        }
        stats.record(Step::Session, now.saturating_duration_since(self.started));
        stats.session_done(outcome.is_ok() && !self.had_error);
    }

    fn on_reply(
        &mut self,
        ctx: &mut Ctx<'_>,
        reply: &Reply<'_>,
        now: Instant,
    ) -> Result<Next, Failure> {
        ctx.stats.reply(reply.code);
        let Some(p) = self.pending.pop_front() else {
            return Err(Failure::protocol(format!(
                "unsolicited reply {}",
                reply.code
            )));
        };
        ctx.stats
            .record(p.cmd.step(), now.saturating_duration_since(p.sent));
        let class = reply.class();
        if reply.code == 421 {
            // The server is closing the channel (RFC 5321 3.8).
            return Err(Failure::rejected(p.cmd, reply));
        }
        if class >= 4 {
            return self.on_negative(ctx, p.cmd, reply, now);
        }
        if !p.cmd.is_success(reply.code) {
            return Err(Failure::protocol(format!(
                "unexpected reply to {}: {}",
                p.cmd.name(),
                excerpt_reply(reply)
            )));
        }
        match p.cmd {
            Cmd::Banner => self.send_ehlo(ctx, now),
            Cmd::Ehlo => {
                self.caps = Caps::from_ehlo(reply);
                self.after_ehlo(ctx, now)?;
            }
            Cmd::StartTls => return Ok(Next::StartTls),
            Cmd::Auth => {
                self.authenticated = true;
                self.next_message_or_quit(ctx, now);
            }
            Cmd::Mail => {
                let txn = self.txn_mut()?;
                txn.mail_ok = true;
                if !txn.pipelined {
                    self.send_rcpt_or_data(ctx, now);
                }
            }
            Cmd::Rcpt => {
                ctx.stats.totals.recipients_accepted += 1;
                let txn = self.txn_mut()?;
                txn.rcpt_ok += 1;
                if !txn.pipelined {
                    self.send_rcpt_or_data(ctx, now);
                }
            }
            Cmd::Data => {
                let txn = *self.txn_mut()?;
                if txn.deliverable() {
                    self.render_message(ctx);
                    dot_stuff_into(ctx.scratch, ctx.out);
                } else {
                    // Pipelined, every recipient refused, yet DATA got 354:
                    // send an empty message (RFC 2920 3.1).
                    ctx.out.extend_from_slice(b".\r\n");
                }
                self.expect(Cmd::EndOfData, now);
            }
            Cmd::EndOfData | Cmd::Bdat => {
                let txn = *self.txn_mut()?;
                if !txn.deliverable() {
                    return Err(Failure::protocol(format!(
                        "{} accepted a message without recipients",
                        p.cmd.name()
                    )));
                }
                ctx.stats.record(Step::Message, now - txn.started);
                ctx.stats
                    .message_accepted(self.message_len, txn.bdat, txn.pipelined);
                self.txn = None;
                self.next_message_or_quit(ctx, now);
            }
            Cmd::Rset => self.next_message_or_quit(ctx, now),
            Cmd::Quit => return Ok(Next::Done),
        }
        Ok(Next::Continue)
    }

    /// A 4xx/5xx reply (other than 421).
    fn on_negative(
        &mut self,
        ctx: &mut Ctx<'_>,
        cmd: Cmd,
        reply: &Reply<'_>,
        now: Instant,
    ) -> Result<Next, Failure> {
        match cmd {
            // Without these the session cannot go on.
            Cmd::Banner | Cmd::Ehlo | Cmd::StartTls | Cmd::Auth => {
                return Err(Failure::rejected(cmd, reply))
            }
            _ => {}
        }
        self.had_error = true;
        ctx.stats
            .error(rejection_kind(reply), &rejection_text(cmd, reply));
        match cmd {
            Cmd::Mail => {
                let txn = self.txn_mut()?;
                if !txn.pipelined {
                    // No transaction was opened: nothing to reset.
                    self.end_failed_transaction(ctx, false, now);
                }
            }
            Cmd::Rcpt => {
                ctx.stats.totals.recipients_rejected += 1;
                if !self.txn_mut()?.pipelined {
                    self.send_rcpt_or_data(ctx, now);
                }
            }
            Cmd::Data | Cmd::Bdat => {
                let mail_ok = self.txn_mut()?.mail_ok;
                self.end_failed_transaction(ctx, mail_ok, now);
            }
            // A refused message ends its transaction (RFC 5321 4.1.1.4).
            Cmd::EndOfData => self.end_failed_transaction(ctx, false, now),
            // The server's state is unknown now: leave.
            Cmd::Rset => self.send(ctx, b"QUIT\r\n", Cmd::Quit, now),
            Cmd::Quit => return Ok(Next::Done),
            Cmd::Banner | Cmd::Ehlo | Cmd::StartTls | Cmd::Auth => {}
        }
        Ok(Next::Continue)
    }

    fn after_ehlo(&mut self, ctx: &mut Ctx<'_>, now: Instant) -> Result<(), Failure> {
        if ctx.plan.starttls && !self.tls {
            if !self.caps.starttls {
                return Err(Failure::new(
                    ErrorKind::Unsupported,
                    "--starttls given but the server does not offer STARTTLS",
                ));
            }
            self.send(ctx, b"STARTTLS\r\n", Cmd::StartTls, now);
            return Ok(());
        }
        if let (Some(auth), false) = (&ctx.plan.auth_command, self.authenticated) {
            if !self.caps.auth_plain {
                return Err(Failure::new(
                    ErrorKind::Unsupported,
                    "--auth given but the server does not offer AUTH PLAIN",
                ));
            }
            ctx.out.extend_from_slice(auth);
            self.expect(Cmd::Auth, now);
            return Ok(());
        }
        self.next_message_or_quit(ctx, now);
        Ok(())
    }

    fn send_ehlo(&mut self, ctx: &mut Ctx<'_>, now: Instant) {
        ctx.out.extend_from_slice(b"EHLO ");
        ctx.out.extend_from_slice(ctx.plan.helo.as_bytes());
        ctx.out.extend_from_slice(b"\r\n");
        self.expect(Cmd::Ehlo, now);
    }

    fn next_message_or_quit(&mut self, ctx: &mut Ctx<'_>, now: Instant) {
        if self.messages_started < ctx.plan.messages {
            self.start_message(ctx, now);
        } else {
            self.send(ctx, b"QUIT\r\n", Cmd::Quit, now);
        }
    }

    fn start_message(&mut self, ctx: &mut Ctx<'_>, now: Instant) {
        let plan = ctx.plan;
        let number = self.number * u64::from(plan.messages) + u64::from(self.messages_started);
        self.messages_started += 1;
        self.message_number = number;
        self.message_size = ctx.factory.draw_size();

        self.from.clear();
        plan.mail_from.render_into(number, &mut self.from);
        self.rcpts.resize_with(plan.recipients as usize, Vec::new);
        for (i, rcpt) in self.rcpts.iter_mut().enumerate() {
            rcpt.clear();
            plan.rcpt_to
                .render_into(number * u64::from(plan.recipients) + i as u64, rcpt);
        }
        if self.caps.size {
            // The exact length for SIZE= (RFC 1870); rendering is
            // deterministic, so the message written later has this length.
            self.render_message(ctx);
        }

        let txn = Txn {
            started: now,
            pipelined: plan.pipelining && self.caps.pipelining,
            bdat: plan.bdat && self.caps.chunking,
            mail_ok: false,
            rcpt_ok: 0,
            next_rcpt: 0,
        };
        self.txn = Some(txn);

        let out = &mut *ctx.out;
        out.extend_from_slice(b"MAIL FROM:<");
        out.extend_from_slice(&self.from);
        out.push(b'>');
        if self.caps.size {
            out.extend_from_slice(format!(" SIZE={}", self.message_len).as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        self.expect(Cmd::Mail, now);

        if txn.pipelined {
            // RFC 2920: MAIL, every RCPT and DATA (or BDAT with its chunk)
            // go out in one write; DATA must be last in the group.
            for i in 0..plan.recipients {
                self.write_rcpt(ctx, i, now);
            }
            self.write_data_command(ctx, now);
        }
    }

    /// Non-pipelined: the next RCPT, or DATA/BDAT once every RCPT is
    /// answered, or RSET when no recipient was accepted.
    fn send_rcpt_or_data(&mut self, ctx: &mut Ctx<'_>, now: Instant) {
        let Some(txn) = self.txn.as_mut() else {
            return;
        };
        if txn.next_rcpt < ctx.plan.recipients {
            let i = txn.next_rcpt;
            txn.next_rcpt += 1;
            self.write_rcpt(ctx, i, now);
        } else if txn.deliverable() {
            self.write_data_command(ctx, now);
        } else {
            self.end_failed_transaction(ctx, true, now);
        }
    }

    fn write_rcpt(&mut self, ctx: &mut Ctx<'_>, i: u32, now: Instant) {
        ctx.out.extend_from_slice(b"RCPT TO:<");
        ctx.out.extend_from_slice(&self.rcpts[i as usize]);
        ctx.out.extend_from_slice(b">\r\n");
        self.expect(Cmd::Rcpt, now);
    }

    fn write_data_command(&mut self, ctx: &mut Ctx<'_>, now: Instant) {
        let bdat = self.txn.is_some_and(|t| t.bdat);
        if bdat {
            // The whole message as one last chunk: no dot-stuffing.
            self.render_message(ctx);
            ctx.out
                .extend_from_slice(format!("BDAT {} LAST\r\n", ctx.scratch.len()).as_bytes());
            ctx.out.extend_from_slice(ctx.scratch);
            self.expect(Cmd::Bdat, now);
        } else {
            self.send(ctx, b"DATA\r\n", Cmd::Data, now);
        }
    }

    /// Renders the current message into `ctx.scratch`.
    fn render_message(&mut self, ctx: &mut Ctx<'_>) {
        ctx.factory.render(
            &MessageSpec {
                number: self.message_number,
                from: &self.from,
                to: &self.rcpts,
            },
            self.message_size,
            ctx.scratch,
        );
        self.message_len = ctx.scratch.len();
    }

    /// The current message failed; reset the server's transaction state if
    /// it may still hold some, then go on with the next message.
    fn end_failed_transaction(&mut self, ctx: &mut Ctx<'_>, rset: bool, now: Instant) {
        ctx.stats.totals.messages_rejected += 1;
        self.txn = None;
        if rset {
            self.send(ctx, b"RSET\r\n", Cmd::Rset, now);
        } else {
            self.next_message_or_quit(ctx, now);
        }
    }

    fn send(&mut self, ctx: &mut Ctx<'_>, line: &[u8], cmd: Cmd, now: Instant) {
        ctx.out.extend_from_slice(line);
        self.expect(cmd, now);
    }

    fn expect(&mut self, cmd: Cmd, now: Instant) {
        self.pending.push_back(Pending {
            cmd,
            sent: now,
            flushed: false,
        });
    }

    fn txn_mut(&mut self) -> Result<&mut Txn, Failure> {
        // invariant: MAIL/RCPT/DATA are only sent inside a transaction and
        // replies are matched in order, so this is a bug guard, not a
        // reachable error; report it rather than panic.
        self.txn
            .as_mut()
            .ok_or_else(|| Failure::protocol("transaction reply outside a transaction"))
    }
}

fn rejection_kind(reply: &Reply<'_>) -> ErrorKind {
    if reply.class() == 4 {
        ErrorKind::Rejected4xx
    } else {
        ErrorKind::Rejected5xx
    }
}

fn rejection_text(cmd: Cmd, reply: &Reply<'_>) -> String {
    format!("{} refused: {}", cmd.name(), excerpt_reply(reply))
}

fn excerpt_reply(reply: &Reply<'_>) -> String {
    let mut s = format!("{} {}", reply.code, reply.first_line());
    truncate(&mut s);
    s
}

fn excerpt(input: &[u8]) -> String {
    let mut s = format!(
        "{:?}",
        String::from_utf8_lossy(&input[..input.len().min(60)])
    );
    truncate(&mut s);
    s
}

fn truncate(s: &mut String) {
    const MAX: usize = 100;
    if s.len() > MAX {
        let mut end = MAX;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
}

/// Standard base64 (RFC 4648 4) with padding.
fn base64_into(input: &[u8], out: &mut Vec<u8>) {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]);
            } else {
                out.push(b'=');
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::SizeSpec;
    use std::time::Duration;

    fn plan() -> Plan {
        Plan {
            helo: "client.test".into(),
            messages: 2,
            recipients: 2,
            pipelining: true,
            bdat: false,
            starttls: false,
            auth_command: None,
            mail_from: "f{n}@x".parse().unwrap(),
            rcpt_to: "r{n}@x".parse().unwrap(),
        }
    }

    /// Drives a session against a scripted server: each step feeds one
    /// server chunk and returns what the client sent in response.
    struct Harness {
        plan: Plan,
        factory: MessageFactory,
        stats: Stats,
        out: Vec<u8>,
        scratch: Vec<u8>,
        session: Option<Session>,
        now: Instant,
    }

    impl Harness {
        fn new(plan: Plan) -> Self {
            let now = Instant::now();
            let mut session = Session::new(3, now);
            session.on_connected(now);
            Harness {
                plan,
                factory: MessageFactory::new(SizeSpec::Fixed(500), 1, "run", "x"),
                stats: Stats::default(),
                out: Vec::new(),
                scratch: Vec::new(),
                session: Some(session),
                now,
            }
        }

        fn feed(&mut self, server: &str) -> Result<(String, Next), Failure> {
            self.now += Duration::from_millis(1);
            let mut ctx = Ctx {
                plan: &self.plan,
                factory: &mut self.factory,
                stats: &mut self.stats,
                out: &mut self.out,
                scratch: &mut self.scratch,
            };
            let session = self.session.as_mut().unwrap();
            let (used, next) = session.on_input(&mut ctx, server.as_bytes(), self.now)?;
            assert_eq!(used, server.len(), "whole script chunk consumed");
            session.on_flushed(self.now);
            let sent = String::from_utf8(std::mem::take(&mut self.out)).unwrap();
            Ok((sent, next))
        }

        fn tls_up(&mut self) -> String {
            let mut ctx = Ctx {
                plan: &self.plan,
                factory: &mut self.factory,
                stats: &mut self.stats,
                out: &mut self.out,
                scratch: &mut self.scratch,
            };
            self.session
                .as_mut()
                .unwrap()
                .on_tls_established(&mut ctx, self.now);
            String::from_utf8(std::mem::take(&mut self.out)).unwrap()
        }

        fn finish(&mut self, outcome: Result<(), Failure>) {
            let s = self.session.take().unwrap();
            s.finish(&mut self.stats, outcome, self.now);
        }

        fn errors(&self, kind: ErrorKind) -> u64 {
            self.stats.totals.errors[kind as usize]
        }
    }

    const EHLO_FULL: &str = "250-srv\r\n250-PIPELINING\r\n250-CHUNKING\r\n250-SIZE 1000000\r\n250-STARTTLS\r\n250 AUTH LOGIN PLAIN\r\n";
    const EHLO_BARE: &str = "250-srv\r\n250 8BITMIME\r\n";

    #[test]
    fn pipelined_data_session() {
        let mut h = Harness::new(plan());
        let (sent, _) = h.feed("220 hi\r\n").unwrap();
        assert_eq!(sent, "EHLO client.test\r\n");
        let (sent, _) = h.feed(EHLO_FULL).unwrap();
        assert_eq!(
            sent,
            "MAIL FROM:<f6@x> SIZE=500\r\nRCPT TO:<r12@x>\r\nRCPT TO:<r13@x>\r\nDATA\r\n"
        );
        let (sent, _) = h.feed("250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n").unwrap();
        assert!(sent.starts_with("From: <f6@x>\r\nTo: <r12@x>,\r\n <r13@x>\r\n"));
        assert!(sent.ends_with("\r\n.\r\n"));
        assert_eq!(sent.len(), 503);
        let (sent, _) = h.feed("250 queued\r\n").unwrap();
        assert!(sent.starts_with("MAIL FROM:<f7@x>"));
        h.feed("250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n").unwrap();
        let (sent, _) = h.feed("250 queued\r\n").unwrap();
        assert_eq!(sent, "QUIT\r\n");
        let (_, next) = h.feed("221 bye\r\n").unwrap();
        assert_eq!(next, Next::Done);
        h.finish(Ok(()));
        let t = &h.stats.totals;
        assert_eq!(t.messages_accepted, 2);
        assert_eq!(t.messages_pipelined, 2);
        assert_eq!(t.message_bytes, 1000);
        assert_eq!(t.recipients_accepted, 4);
        assert_eq!(t.sessions_ok, 1);
        assert_eq!(t.replies, [11, 2, 0, 0]);
        assert_eq!(t.step(Step::Rcpt).len(), 4);
        assert_eq!(t.step(Step::EndOfData).len(), 2);
        assert_eq!(t.step(Step::Session).len(), 1);
    }

    #[test]
    fn unpipelined_when_not_offered() {
        let mut h = Harness::new(plan());
        h.feed("220 hi\r\n").unwrap();
        let (sent, _) = h.feed(EHLO_BARE).unwrap();
        assert_eq!(sent, "MAIL FROM:<f6@x>\r\n");
        assert_eq!(h.feed("250 ok\r\n").unwrap().0, "RCPT TO:<r12@x>\r\n");
        assert_eq!(h.feed("250 ok\r\n").unwrap().0, "RCPT TO:<r13@x>\r\n");
        assert_eq!(h.feed("250 ok\r\n").unwrap().0, "DATA\r\n");
        h.feed("354 go\r\n").unwrap();
        assert!(h.feed("250 ok\r\n").unwrap().0.starts_with("MAIL"));
        assert_eq!(h.stats.totals.messages_pipelined, 0);
    }

    #[test]
    fn bdat_pipelined() {
        let mut p = plan();
        p.bdat = true;
        p.messages = 1;
        let mut h = Harness::new(p);
        h.feed("220 hi\r\n").unwrap();
        let (sent, _) = h.feed(EHLO_FULL).unwrap();
        let (head, chunk) = sent.split_once("BDAT 500 LAST\r\n").unwrap();
        assert!(head.ends_with("RCPT TO:<r7@x>\r\n"));
        assert_eq!(chunk.len(), 500);
        assert!(!chunk.contains("\r\n..")); // no dot-stuffing in BDAT
        let (sent, _) = h
            .feed("250 ok\r\n250 ok\r\n250 ok\r\n250 done\r\n")
            .unwrap();
        assert_eq!(sent, "QUIT\r\n");
        assert_eq!(h.stats.totals.messages_bdat, 1);
    }

    #[test]
    fn bdat_falls_back_to_data_without_chunking() {
        let mut p = plan();
        p.bdat = true;
        let mut h = Harness::new(p);
        h.feed("220 hi\r\n").unwrap();
        let (sent, _) = h.feed("250-srv\r\n250 PIPELINING\r\n").unwrap();
        assert!(sent.ends_with("DATA\r\n"));
    }

    #[test]
    fn rejected_recipient_and_mail() {
        let mut p = plan();
        p.pipelining = false;
        let mut h = Harness::new(p);
        h.feed("220 hi\r\n").unwrap();
        h.feed(EHLO_BARE).unwrap();
        h.feed("250 ok\r\n").unwrap();
        h.feed("550 no such user\r\n").unwrap();
        // One recipient refused, the other accepted: the message goes out.
        assert_eq!(h.feed("250 ok\r\n").unwrap().0, "DATA\r\n");
        h.feed("354 go\r\n").unwrap();
        // Second message: MAIL refused, no RSET needed.
        let (sent, _) = h.feed("250 ok\r\n").unwrap();
        assert!(sent.starts_with("MAIL"));
        assert_eq!(h.feed("451 try later\r\n").unwrap().0, "QUIT\r\n");
        h.feed("221 bye\r\n").unwrap();
        h.finish(Ok(()));
        let t = &h.stats.totals;
        assert_eq!((t.messages_accepted, t.messages_rejected), (1, 1));
        assert_eq!((t.recipients_accepted, t.recipients_rejected), (1, 1));
        assert_eq!(h.errors(ErrorKind::Rejected5xx), 1);
        assert_eq!(h.errors(ErrorKind::Rejected4xx), 1);
        assert_eq!((t.sessions_ok, t.sessions_failed), (0, 1));
        assert_eq!(
            t.error_samples[0],
            "rejected_5xx: RCPT refused: 550 no such user"
        );
    }

    #[test]
    fn all_recipients_refused_unpipelined_resets() {
        let mut p = plan();
        p.pipelining = false;
        p.recipients = 1;
        p.messages = 1;
        let mut h = Harness::new(p);
        h.feed("220 hi\r\n").unwrap();
        h.feed(EHLO_BARE).unwrap();
        h.feed("250 ok\r\n").unwrap();
        assert_eq!(h.feed("550 no\r\n").unwrap().0, "RSET\r\n");
        assert_eq!(h.feed("250 ok\r\n").unwrap().0, "QUIT\r\n");
    }

    #[test]
    fn pipelined_all_refused_but_354_sends_empty_message() {
        let mut p = plan();
        p.messages = 1;
        let mut h = Harness::new(p);
        h.feed("220 hi\r\n").unwrap();
        h.feed(EHLO_FULL).unwrap();
        let (sent, _) = h.feed("250 ok\r\n550 no\r\n550 no\r\n354 go\r\n").unwrap();
        assert_eq!(sent, ".\r\n");
        let (sent, _) = h.feed("554 no valid recipients\r\n").unwrap();
        assert_eq!(sent, "QUIT\r\n");
        assert_eq!(h.stats.totals.messages_rejected, 1);
    }

    #[test]
    fn pipelined_data_refused_resets() {
        let mut p = plan();
        p.messages = 1;
        let mut h = Harness::new(p);
        h.feed("220 hi\r\n").unwrap();
        h.feed(EHLO_FULL).unwrap();
        let (sent, _) = h
            .feed("250 ok\r\n250 ok\r\n250 ok\r\n451 later\r\n")
            .unwrap();
        assert_eq!(sent, "RSET\r\n");
    }

    #[test]
    fn replies_split_across_reads_and_batched() {
        // `feed` asserts full consumption, so drive partial reads by hand.
        let mut h = Harness::new(plan());
        let mut ctx = Ctx {
            plan: &h.plan,
            factory: &mut h.factory,
            stats: &mut h.stats,
            out: &mut h.out,
            scratch: &mut h.scratch,
        };
        let s = h.session.as_mut().unwrap();
        let (used, _) = s.on_input(&mut ctx, b"220 h", h.now).unwrap();
        assert_eq!(used, 0);
        assert!(ctx.out.is_empty());
        let (used, _) = s.on_input(&mut ctx, b"220 hi\r\n250-srv", h.now).unwrap();
        assert_eq!(used, 8);
        assert_eq!(ctx.out.as_slice(), b"EHLO client.test\r\n");
    }

    #[test]
    fn interleaved_sessions_send_their_own_message() {
        // Two sessions of one worker share the factory and the scratch
        // buffer; each must still send its own message on 354.
        let mut p = plan();
        p.pipelining = false;
        p.recipients = 1;
        let now = Instant::now();
        let mut factory =
            MessageFactory::new(SizeSpec::Uniform { min: 400, max: 900 }, 1, "run", "x");
        let mut stats = Stats::default();
        let mut scratch = Vec::new();
        let mut outs = [Vec::new(), Vec::new()];
        let mut sessions = [Session::new(0, now), Session::new(1, now)];
        let script: [&[u8]; 4] = [
            b"220 hi\r\n",
            EHLO_BARE.as_bytes(),
            b"250 ok\r\n",
            b"250 ok\r\n",
        ];
        for input in script {
            for (s, out) in sessions.iter_mut().zip(outs.iter_mut()) {
                if s.pending.is_empty() {
                    s.on_connected(now);
                }
                let mut ctx = Ctx {
                    plan: &p,
                    factory: &mut factory,
                    stats: &mut stats,
                    out,
                    scratch: &mut scratch,
                };
                s.on_input(&mut ctx, input, now).unwrap();
                out.clear();
            }
        }
        for (i, (s, out)) in sessions.iter_mut().zip(outs.iter_mut()).enumerate() {
            let mut ctx = Ctx {
                plan: &p,
                factory: &mut factory,
                stats: &mut stats,
                out,
                scratch: &mut scratch,
            };
            s.on_input(&mut ctx, b"354 go\r\n", now).unwrap();
            let text = String::from_utf8_lossy(out);
            assert!(
                text.starts_with(&format!("From: <f{}@x>\r\nTo: <r{}@x>\r\n", 2 * i, 2 * i)),
                "{text}"
            );
        }
    }

    #[test]
    fn protocol_errors_are_failures_not_panics() {
        for script in [
            "garbage\r\n",
            "250 not a greeting\r\n",
            "354 what\r\n",
            "220 a\r\n354 not an EHLO reply\r\n",
            "220-a\r\n230 b\r\n",
        ] {
            let mut h = Harness::new(plan());
            let err = h.feed(script).unwrap_err();
            assert_eq!(err.kind, ErrorKind::Protocol, "{script:?}");
        }
    }

    #[test]
    fn greeting_refused_and_421() {
        let mut h = Harness::new(plan());
        let err = h.feed("554 go away\r\n").unwrap_err();
        assert_eq!(err.kind, ErrorKind::Rejected5xx);
        let mut h = Harness::new(plan());
        h.feed("220 hi\r\n").unwrap();
        h.feed(EHLO_FULL).unwrap();
        let err = h.feed("421 shutting down\r\n").unwrap_err();
        assert_eq!(err.kind, ErrorKind::Rejected4xx);
        h.finish(Err(err));
        let t = &h.stats.totals;
        assert_eq!(t.messages_aborted, 1);
        assert_eq!(t.sessions_failed, 1);
        assert_eq!(t.errors[ErrorKind::Rejected4xx as usize], 1);
    }

    #[test]
    fn starttls_then_auth() {
        let mut p = plan();
        p.starttls = true;
        p.messages = 0;
        p.auth_command = Some(Plan::auth_plain_command("user", "pass"));
        let mut h = Harness::new(p);
        h.feed("220 hi\r\n").unwrap();
        assert_eq!(h.feed(EHLO_FULL).unwrap().0, "STARTTLS\r\n");
        let (sent, next) = h.feed("220 go ahead\r\n").unwrap();
        assert_eq!((sent.as_str(), next), ("", Next::StartTls));
        assert_eq!(h.tls_up(), "EHLO client.test\r\n");
        assert_eq!(
            h.feed(EHLO_FULL).unwrap().0,
            "AUTH PLAIN AHVzZXIAcGFzcw==\r\n"
        );
        assert_eq!(h.feed("235 ok\r\n").unwrap().0, "QUIT\r\n");
    }

    #[test]
    fn starttls_injection_is_refused() {
        let mut p = plan();
        p.starttls = true;
        let mut h = Harness::new(p);
        h.feed("220 hi\r\n").unwrap();
        h.feed(EHLO_FULL).unwrap();
        let err = h.feed("220 go\r\n250 injected\r\n").unwrap_err();
        assert_eq!(err.kind, ErrorKind::Protocol);
    }

    #[test]
    fn missing_extensions_are_reported() {
        let mut p = plan();
        p.starttls = true;
        let mut h = Harness::new(p);
        h.feed("220 hi\r\n").unwrap();
        assert_eq!(h.feed(EHLO_BARE).unwrap_err().kind, ErrorKind::Unsupported);
        let mut p = plan();
        p.auth_command = Some(Plan::auth_plain_command("u", "p"));
        let mut h = Harness::new(p);
        h.feed("220 hi\r\n").unwrap();
        assert_eq!(h.feed(EHLO_BARE).unwrap_err().kind, ErrorKind::Unsupported);
        let mut h = Harness::new(plan());
        h.feed("220 hi\r\n").unwrap();
        let caps = Caps::from_ehlo(
            &reply::parse(b"250-x\r\n250 AUTH=LOGIN PLAIN\r\n")
                .unwrap()
                .unwrap()
                .0,
        );
        assert!(caps.auth_plain);
    }

    #[test]
    fn base64() {
        let enc = |s: &[u8]| {
            let mut out = Vec::new();
            base64_into(s, &mut out);
            String::from_utf8(out).unwrap()
        };
        assert_eq!(enc(b""), "");
        assert_eq!(enc(b"f"), "Zg==");
        assert_eq!(enc(b"fo"), "Zm8=");
        assert_eq!(enc(b"foo"), "Zm9v");
        assert_eq!(enc(b"foobar"), "Zm9vYmFy");
    }
}
