//! The ESMTP server session as a sans-IO state machine.
//!
//! Bytes go in through [`Session::handle_input`], which returns how many it
//! consumed; replies accumulate in an output buffer the caller writes once per
//! batch ([`Session::output`]); a finished message leaves through
//! [`Session::poll_event`], and its 250 is only produced when the caller
//! reports that it is durable ([`Session::handle_commit`]). Time is passed
//! in. The session never touches a socket, a file or a clock.
//!
//! Each phase is a variant of [`State`] that owns what the phase needs; a
//! transition takes the old state out and puts the next one in.
//!
//! Two phases belong to the driver: after `STARTTLS` the session emits
//! [`Event::StartTls`] and consumes nothing more until
//! [`Session::handle_tls`] (the driver discards every byte that came after
//! the STARTTLS line: RFC 3207 5, CVE-2011-0411); after the last AUTH
//! response it emits [`Event::Auth`] and waits for [`Session::handle_auth`].
//!
//! Memory is bounded by what the driver allows: [`Session::handle_allowance`]
//! says how much the message body may hold (the driver's share of the
//! shard's budget) and [`Session::content_bytes`] what it holds. A DATA with
//! no room is refused before its 354; a body that would outgrow its room is
//! read to its end and refused (452 4.3.1). The content of one message may
//! take at most `max_data_time` from its DATA or first BDAT, however it
//! trickles in. Replies stop being produced once [`MAX_OUTPUT`] octets wait
//! to be written, so a client that pipelines and never reads holds little.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bumpalo::Bump;
use memchr::memmem::Finder;
use std::sync::LazyLock;

use crate::policy::rate::{Counted, RateKey, RateLimiter};
use crate::policy::recipient::{Locality, Recipients, Refusal};
use crate::relay::Target;
use crate::smtp::auth::{self, AuthResult, Authenticated, Credentials, Exchange, Mechanism, Step};
use crate::smtp::command::{Command, Domain, MailCommand, RcptCommand, Recipient};
use crate::smtp::data::{
    grow_within, BareNewline, BdatLines, BdatReceiver, DataReceiver, Overflow, Progress, Verdict,
};
use crate::smtp::envelope::{Envelope, Message, Protocol, Rcpt, TlsInfo};
use crate::smtp::error::ParseError;
use crate::smtp::parse::parse_command;
use crate::smtp::reply::{self, Reply};

/// RFC 5321 4.5.3.1.4 allows 512 octets per command line including CRLF; RFC
/// 1869 4 lets each extension add to MAIL and RCPT: SIZE (RFC 1870, 26),
/// BODY=8BITMIME (RFC 6152, 14), SMTPUTF8 (RFC 6531, 10), RET and ENVID (RFC
/// 3461, 8 + 106), ORCPT and NOTIFY (RFC 3461, 500 + 28), AUTH= (RFC 4954,
/// 500). The longest legal line is the sum.
pub const MAX_COMMAND_LINE: usize = 512 + 26 + 14 + 10 + 114 + 528 + 500;

/// Input is left unconsumed once this many octets of replies wait to be
/// written ([`Session::output_full`]): the driver writes them first, so a
/// client that pipelines thousands of commands and never reads cannot make
/// the output grow past it (an EHLO reply is ~20 times its command).
pub const MAX_OUTPUT: usize = 16 << 10;

/// The default of [`SessionConfig::min_data_room`]: no point starting a
/// body with less room than a typical message needs.
pub const MIN_DATA_ROOM: usize = 64 << 10;

static CRLF: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\r\n"));

/// Policy and limits, shared by every session of a server.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub hostname: String,
    /// Domains (lower case) for which any local part is accepted.
    pub local_domains: Vec<String>,
    pub max_message_size: u64,
    pub max_recipients: usize,
    /// RFC 5321 4.5.3.2.7: waiting for the next command (5 minutes).
    pub command_timeout: Duration,
    /// RFC 5321 4.5.3.2.5/6: waiting for the next block of content.
    pub data_timeout: Duration,
    /// The most the content of one message may take, from DATA (or the
    /// first BDAT) to its end, however steadily it trickles in.
    pub max_data_time: Duration,
    /// A DATA is refused before its 354 unless the body may hold at least
    /// this much (or the SIZE the client declared, when larger).
    pub min_data_room: usize,
    /// After this many error replies the session is closed with 421.
    pub max_errors: u32,
    /// What a bare CR or LF in DATA content means.
    pub bare_newline: BareNewline,
    /// Clients that may relay to any domain (`--relay-network`).
    pub relay_networks: Vec<crate::policy::relay::Cidr>,
    /// `--route`s: which domains go into a Maildir (their recipients must
    /// be Maildir-safe) and which go on by SMTP.
    pub routes: Vec<crate::relay::Route>,
    /// The recipients that exist in the local domains (`--local-recipients`;
    /// disabled: any Maildir-safe local part).
    pub recipients: Recipients,
    /// Relay/MX port or message submission (RFC 6409).
    pub mode: Mode,
    /// A certificate is loaded: STARTTLS is offered until TLS is active.
    pub starttls: bool,
    /// Submission: offer AUTH without TLS to loopback clients (tests only).
    pub plaintext_auth_on_loopback: bool,
    /// The protocol part of the pre-greet screen (`--screen-protocol`,
    /// relay/MX only): commands pipelined before PIPELINING was offered,
    /// and lines that do not start with a letter, drop the client
    /// ([`Session::take_violation`]). HTTP requests and CONNECT drop it
    /// whatever this says.
    pub screen_protocol: bool,
    /// The per-minute limits (`None`: none set): messages and recipients
    /// per client network for clients neither authenticated nor in
    /// `relay_networks`, messages per authenticated user.
    pub rates: Option<Arc<RateLimiter>>,
    /// Relay/MX: hand each MAIL FROM of a client that is neither
    /// authenticated nor in `relay_networks` to the driver
    /// ([`Event::CheckSender`]) before answering it (`--spf-policy reject`,
    /// or a `--domain-auth` entry with `spf=reject`).
    pub check_sender: bool,
    /// The recipient domains that refuse a sender whose SPF failed but who
    /// was let through at MAIL FROM ([`SenderVerdict::SpfFailed`]).
    pub spf_rcpt: SpfRcptPolicy,
}

/// Which recipient domains refuse a failing SPF sender at RCPT (550
/// 5.7.23): per local domain (`--domain-auth DOMAIN:spf=...`), else the
/// default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpfRcptPolicy {
    pub reject_by_default: bool,
    /// `(domain, rejects)`, domains lower-case.
    pub domains: Vec<(String, bool)>,
}

impl SpfRcptPolicy {
    /// Whether mail for `domain` is refused when SPF failed.
    pub fn rejects(&self, domain: &str) -> bool {
        self.domains
            .iter()
            .find(|(d, _)| d.eq_ignore_ascii_case(domain))
            .map_or(self.reject_by_default, |&(_, r)| r)
    }
}

/// The driver's answer to [`Event::CheckSender`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SenderVerdict {
    Accept,
    /// SPF failed, but only some recipient domains refuse it
    /// ([`SessionConfig::spf_rcpt`]): decided at each RCPT.
    SpfFailed,
    /// Refused at MAIL FROM with this reply.
    Refuse(Reply),
}

/// What a listener is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Relay/MX: mail for the local domains, no AUTH.
    #[default]
    Relay,
    /// Message submission (RFC 6409): AUTH required before MAIL (and only
    /// offered under TLS); then any recipient domain; the envelope sender
    /// must belong to the authenticated user; addresses must be fully
    /// qualified.
    Submission,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            hostname: "localhost".into(),
            local_domains: vec!["localhost".into()],
            max_message_size: 50 << 20,
            max_recipients: 1000,
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(180),
            max_data_time: Duration::from_secs(600),
            min_data_room: MIN_DATA_ROOM,
            max_errors: 20,
            bare_newline: BareNewline::Normalize,
            relay_networks: Vec::new(),
            routes: Vec::new(),
            recipients: Recipients::default(),
            mode: Mode::Relay,
            starttls: false,
            plaintext_auth_on_loopback: false,
            screen_protocol: false,
            rates: None,
            check_sender: false,
            spf_rcpt: SpfRcptPolicy::default(),
        }
    }
}

/// Facts about the transport the session runs on.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub tls: bool,
}

/// What the session hands to its driver besides replies.
#[derive(Debug)]
pub enum Event {
    /// A message whose content ended. The driver makes it durable and calls
    /// [`Session::handle_commit`]; input is not consumed until then.
    Message(Message),
    /// `220 Ready to start TLS` is in the output. The driver writes it,
    /// discards all input buffered after the STARTTLS line, runs the
    /// handshake and calls [`Session::handle_tls`] (or closes).
    StartTls,
    /// The client presented credentials. The driver checks them and calls
    /// [`Session::handle_auth`]; input is not consumed until then.
    Auth(Credentials),
    /// A MAIL FROM to check before it is answered (`check_sender`): the
    /// driver calls [`Session::handle_sender`]; input is not consumed until
    /// then.
    CheckSender(SenderCheck),
}

/// What the driver needs to check a sender: the HELO name and the
/// reverse-path (empty for `<>`); the client is the session's peer.
#[derive(Debug, Clone)]
pub struct SenderCheck {
    pub helo: String,
    pub mail_from: String,
}

/// The spool's answer for a message handed out as [`Event::Message`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommitResult {
    /// Durable under this queue id.
    Stored(String),
    /// Out of disk space or quota: 452 4.3.1.
    NoSpace,
    /// Any other local failure: 451 4.3.0.
    Failed,
    /// Refused by policy once the content was seen (e.g. a `From:` the
    /// login may not use): this reply, counted as an error, and logged as a
    /// policy rejection of `what`.
    Refused { reply: Reply, what: String },
}

pub struct Session {
    cfg: Arc<SessionConfig>,
    conn: ConnInfo,
    state: State,
    helo: Option<Helo>,
    output: Vec<u8>,
    event: Option<Event>,
    arena: Bump,
    deadline: Instant,
    /// Inside an over-long command line, discarding up to its CRLF.
    skipping_line: bool,
    errors: u32,
    draining: bool,
    /// Commands refused by policy in this batch, for the driver's log.
    rejections: Vec<PolicyRejection>,
    tls: Option<TlsInfo>,
    auth: Option<Authenticated>,
    /// The most the message body may hold (capacity), from the driver.
    allowance: usize,
    /// The time of the input being handled.
    now: Instant,
    /// The client failed the screen (the session is closed).
    violation: Option<Violation>,
    /// `cfg.screen_protocol`, unless the driver exempted this client.
    screen: bool,
}

#[derive(Debug)]
enum State {
    /// Connected, no HELO/EHLO yet.
    Fresh,
    /// Greeted, no transaction.
    Ready,
    /// MAIL accepted; RCPTs and BDAT chunks accumulate.
    Mail(Transaction),
    Data(Transaction, DataReceiver),
    /// Inside a BDAT chunk.
    Bdat {
        rx: BdatReceiver,
        size: u64,
        target: ChunkTarget,
    },
    /// The message was handed out; waiting for the spool.
    Committing,
    /// `220 Ready to start TLS` was sent; waiting for the handshake.
    StartTls,
    /// Inside an AUTH exchange, waiting for the client's next response.
    Auth(Exchange),
    /// Credentials were handed out; waiting for the verdict.
    Authenticating,
    /// A MAIL FROM was handed out for checking; its transaction waits.
    CheckingSender(Transaction),
    Closed,
}

/// Where the bytes of a BDAT chunk go.
#[derive(Debug)]
enum ChunkTarget {
    Store {
        tx: Transaction,
        last: bool,
    },
    /// The chunk came out of sequence or over the size limit: read it, keep
    /// nothing, then answer `error` and continue with `resume` (or idle).
    Discard {
        error: Reply,
        resume: Option<Transaction>,
    },
}

#[derive(Debug)]
struct Helo {
    name: String,
    esmtp: bool,
}

#[derive(Debug)]
struct Transaction {
    envelope: Envelope,
    body: Vec<u8>,
    /// When the content must have ended (`max_data_time` after DATA or the
    /// first BDAT); `None` before any content.
    content_deadline: Option<Instant>,
    /// Line ends of the BDAT chunks so far (a CR may end one chunk).
    bdat_lines: BdatLines,
    /// The sender check let a failing SPF sender through
    /// ([`SenderVerdict::SpfFailed`]).
    spf_failed: bool,
}

impl Session {
    /// A new session; the 220 greeting is already in [`Session::output`].
    pub fn new(cfg: Arc<SessionConfig>, conn: ConnInfo, now: Instant) -> Self {
        let mut output = Vec::with_capacity(256);
        reply::write_line(
            &mut output,
            220,
            None,
            &format!("{} ESMTP ringmta", cfg.hostname),
            true,
        );
        let deadline = now + cfg.command_timeout;
        Self {
            conn,
            state: State::Fresh,
            helo: None,
            output,
            event: None,
            arena: Bump::new(),
            deadline,
            skipping_line: false,
            errors: 0,
            draining: false,
            rejections: Vec::new(),
            tls: None,
            auth: None,
            allowance: usize::MAX,
            now,
            violation: None,
            screen: cfg.screen_protocol,
            cfg,
        }
    }

    /// A client the screen does not apply to (`--dnswl`, `--relay-network`).
    pub fn exempt_from_screen(mut self) -> Self {
        self.screen = false;
        self
    }

    /// A session on a connection that is already encrypted (implicit TLS,
    /// RFC 8314): STARTTLS is not offered and the trace header names `tls`.
    pub fn with_tls(mut self, tls: TlsInfo) -> Self {
        self.conn.tls = true;
        self.tls = Some(tls);
        self
    }

    /// Consumes as much of `input` as the current phase allows and returns
    /// how many bytes it took. Unconsumed bytes must be presented again,
    /// followed by newer ones. Stops early when a message is handed out as
    /// an event or the session closes.
    pub fn handle_input(&mut self, input: &[u8], now: Instant) -> usize {
        self.now = now;
        let arena = std::mem::take(&mut self.arena);
        let mut pos = 0;
        loop {
            let rest = &input[pos..];
            let step = match &mut self.state {
                State::Closed
                | State::Committing
                | State::StartTls
                | State::Authenticating
                | State::CheckingSender(_) => break,
                State::Data(tx, rx) => {
                    rx.set_allowance(self.allowance);
                    match rx.handle(rest, &mut tx.body) {
                        Progress::NeedMore { consumed } => {
                            pos += consumed;
                            break;
                        }
                        Progress::Done { consumed } => {
                            pos += consumed;
                            self.finish_data();
                            continue;
                        }
                    }
                }
                State::Bdat { rx, target, .. } => {
                    rx.set_allowance(self.allowance);
                    let sink = match target {
                        ChunkTarget::Store { tx, .. } => Some(&mut tx.body),
                        ChunkTarget::Discard { .. } => None,
                    };
                    match rx.handle(rest, sink) {
                        Progress::NeedMore { consumed } => {
                            pos += consumed;
                            break;
                        }
                        Progress::Done { consumed } => {
                            pos += consumed;
                            self.finish_chunk();
                            continue;
                        }
                    }
                }
                State::Fresh | State::Ready | State::Mail(_) | State::Auth(_) => {
                    if self.output_full() {
                        // The driver writes first, then presents the rest.
                        break;
                    }
                    self.next_line(rest)
                }
            };
            match step {
                LineStep::NeedMore(consumed) => {
                    pos += consumed;
                    break;
                }
                LineStep::Line { len, consumed } => {
                    let line = &input[pos..pos + len];
                    pos += consumed;
                    // PIPELINING is offered in the reply to EHLO: before
                    // that reply, or after HELO, a client must wait for
                    // each reply before its next command (RFC 2920 3.1).
                    let unoffered = !matches!(self.state, State::Auth(_))
                        && !self.helo.as_ref().is_some_and(|h| h.esmtp);
                    self.handle_line(line, &arena);
                    if self.screen
                        && unoffered
                        && pos < input.len()
                        && !matches!(self.state, State::Closed)
                    {
                        self.fail_screen(Violation::Pipelining);
                    }
                }
                LineStep::Skipped(consumed) => pos += consumed,
            }
        }
        if self.draining && self.is_idle() {
            self.close_with(reply::SHUTTING_DOWN);
        }
        // Nothing parsed from this batch outlives it.
        let mut arena = arena;
        arena.reset();
        self.arena = arena;
        if pos > 0 {
            // Only progress (a whole command, or content) earns more time: a
            // peer trickling one partial line does not hold the session.
            self.deadline = now + self.current_timeout();
        }
        pos
    }

    /// The most the message body may hold from now on, in bytes of
    /// allocation: the driver's share of the shard's budget for content in
    /// flight, told before each input. Unbounded until told.
    pub fn handle_allowance(&mut self, bytes: usize) {
        self.allowance = bytes;
    }

    /// Bytes of memory the open transaction's body holds (its allocation,
    /// not its length), for the driver's budget.
    pub fn content_bytes(&self) -> usize {
        self.transaction().map_or(0, |tx| tx.body.capacity())
    }

    /// [`MAX_OUTPUT`] octets of replies wait: input is not consumed until
    /// they are written ([`Session::clear_output`]).
    pub fn output_full(&self) -> bool {
        self.output.len() >= MAX_OUTPUT
    }

    /// The screen violation that closed the session, once: the driver
    /// remembers the client ([`crate::inbound::screen`]).
    pub fn take_violation(&mut self) -> Option<Violation> {
        self.violation.take()
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.event.take()
    }

    /// Reports the spool's answer for the message last handed out.
    pub fn handle_commit(&mut self, result: CommitResult, now: Instant) {
        if !matches!(self.state, State::Committing) {
            return;
        }
        self.state = State::Ready;
        match result {
            CommitResult::Stored(id) => reply::write_line(
                &mut self.output,
                250,
                Some("2.0.0"),
                &format!("Ok: queued as {id}"),
                true,
            ),
            // Our failure, not the client's: not counted towards --max-errors.
            CommitResult::NoSpace => self.reply(reply::STORAGE_FULL),
            CommitResult::Failed => self.reply(reply::STORAGE_ERROR),
            CommitResult::Refused { reply, what } => {
                self.note_rejection(reply, what);
                self.error(reply);
            }
        }
        if self.draining {
            self.close_with(reply::SHUTTING_DOWN);
        }
        self.deadline = now + self.current_timeout();
    }

    /// The TLS handshake after STARTTLS succeeded: everything learnt from
    /// the client so far (EHLO, AUTH) is forgotten (RFC 3207 4.2) and the
    /// client must greet again.
    pub fn handle_tls(&mut self, tls: TlsInfo, now: Instant) {
        if !matches!(self.state, State::StartTls) {
            return;
        }
        self.conn.tls = true;
        self.tls = Some(tls);
        self.helo = None;
        self.auth = None;
        self.skipping_line = false;
        self.state = State::Fresh;
        self.deadline = now + self.cfg.command_timeout;
    }

    /// Reports the driver's verdict on the credentials last handed out.
    pub fn handle_auth(&mut self, result: AuthResult, now: Instant) {
        if !matches!(self.state, State::Authenticating) {
            return;
        }
        self.state = self.idle_state();
        match result {
            AuthResult::Success(who) => {
                self.auth = Some(who);
                self.reply(auth::SUCCESS);
            }
            AuthResult::Failed => self.error(auth::FAILED),
            AuthResult::TempFail => self.reply(auth::TEMP_FAIL),
            AuthResult::TooManyFailures => self.close_with(auth::TOO_MANY_FAILURES),
        }
        if self.draining && self.is_idle() {
            self.close_with(reply::SHUTTING_DOWN);
        }
        self.deadline = now + self.current_timeout();
    }

    /// Reports the driver's verdict on the MAIL FROM last handed out
    /// ([`Event::CheckSender`]): `None` accepts it, a reply refuses it (as a
    /// policy rejection).
    pub fn handle_sender(&mut self, verdict: SenderVerdict, now: Instant) {
        let State::CheckingSender(mut tx) = self.take_state() else {
            return;
        };
        match verdict {
            SenderVerdict::Accept | SenderVerdict::SpfFailed => {
                tx.spf_failed = verdict == SenderVerdict::SpfFailed;
                self.state = State::Mail(tx);
                self.reply(reply::SENDER_OK);
            }
            SenderVerdict::Refuse(r) => {
                self.state = self.idle_state();
                let from = tx.envelope.mail_from.unwrap_or_default();
                self.note_rejection(r, format!("MAIL FROM:<{from}>"));
                self.error(r);
            }
        }
        if self.draining && self.is_idle() {
            self.close_with(reply::SHUTTING_DOWN);
        }
        self.deadline = now + self.current_timeout();
    }

    /// The TLS parameters, once the connection is encrypted.
    pub fn tls(&self) -> Option<&TlsInfo> {
        self.tls.as_ref()
    }

    /// Who the client authenticated as, if it did.
    pub fn authenticated(&self) -> Option<&Authenticated> {
        self.auth.as_ref()
    }

    /// Replies waiting to be written, in order.
    pub fn output(&self) -> &[u8] {
        &self.output
    }

    /// Marks the output as written.
    pub fn clear_output(&mut self) {
        self.output.clear();
        if self.output.capacity() > 4096 {
            self.output.shrink_to(256);
        }
    }

    /// When the session gives up on its peer unless input arrives.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Closed
            | State::Committing
            | State::StartTls
            | State::Authenticating
            | State::CheckingSender(_) => None,
            _ => Some(match self.content_deadline() {
                Some(c) => c.min(self.deadline),
                None => self.deadline,
            }),
        }
    }

    /// Called when the time from [`Session::poll_timeout`] passed. Past the
    /// content's time limit the transaction is dropped (nothing is stored)
    /// and the session closed, as for any timeout.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.poll_timeout().is_none() {
            return;
        }
        if self.content_deadline().is_some_and(|d| now >= d) {
            self.close_with(DATA_TIME_EXCEEDED);
        } else if now >= self.deadline {
            self.close_with(reply::TIMEOUT);
        }
    }

    /// When the open transaction's content must have ended.
    fn content_deadline(&self) -> Option<Instant> {
        self.transaction().and_then(|tx| tx.content_deadline)
    }

    /// The open transaction, whatever the phase.
    fn transaction(&self) -> Option<&Transaction> {
        match &self.state {
            State::Mail(tx)
            | State::Data(tx, _)
            | State::Bdat {
                target: ChunkTarget::Store { tx, .. },
                ..
            }
            | State::Bdat {
                target:
                    ChunkTarget::Discard {
                        resume: Some(tx), ..
                    },
                ..
            } => Some(tx),
            _ => None,
        }
    }

    /// The server is stopping: an idle session is closed at once with 421; a
    /// session inside a transaction is closed once the transaction ends.
    pub fn handle_shutdown(&mut self) {
        self.draining = true;
        if self.is_idle() {
            self.close_with(reply::SHUTTING_DOWN);
        }
    }

    /// The shutdown grace period expired: 421 now, whatever the phase.
    pub fn handle_shutdown_now(&mut self) {
        if !matches!(self.state, State::Closed) {
            self.close_with(reply::SHUTTING_DOWN);
        }
    }

    /// The session has said its last reply; close after writing the output.
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    /// No transaction is open (and none is being committed).
    /// The commands refused by policy (relay denied, AUTH required, sender
    /// not owned, unqualified address; DATA and BDAT refused for want of
    /// room in the shard's budget) since the last call.
    pub fn take_rejections(&mut self) -> Vec<PolicyRejection> {
        std::mem::take(&mut self.rejections)
    }

    pub fn is_idle(&self) -> bool {
        matches!(self.state, State::Fresh | State::Ready | State::Auth(_))
    }

    /// Inside message content (DATA or BDAT): reads may wait for
    /// `data_timeout` rather than `command_timeout`.
    pub fn in_content(&self) -> bool {
        matches!(self.state, State::Data(..) | State::Bdat { .. })
    }

    fn current_timeout(&self) -> Duration {
        if self.in_content() {
            self.cfg.data_timeout
        } else {
            self.cfg.command_timeout
        }
    }

    /// Finds the next CRLF-terminated command line in `rest`.
    fn next_line(&mut self, rest: &[u8]) -> LineStep {
        match CRLF.find(rest) {
            Some(i) => {
                if std::mem::take(&mut self.skipping_line) {
                    self.line_too_long();
                    return LineStep::Skipped(i + 2);
                }
                LineStep::Line {
                    len: i,
                    consumed: i + 2,
                }
            }
            None if rest.len() >= self.line_limit(rest)
                || (self.skipping_line && !rest.is_empty()) =>
            {
                // Too long to be a command: discard it as it arrives (keeping
                // a final CR that may pair with the next LF) and answer once.
                self.skipping_line = true;
                let keep = usize::from(rest.last() == Some(&b'\r'));
                LineStep::NeedMore(rest.len() - keep)
            }
            None => LineStep::NeedMore(0),
        }
    }

    /// The longest line allowed here, CRLF included: RFC 4954 4 lets AUTH
    /// lines and SASL responses reach 12288 octets; every other command
    /// keeps [`MAX_COMMAND_LINE`].
    fn line_limit(&self, line: &[u8]) -> usize {
        let is_auth = line
            .get(..5)
            .is_some_and(|v| v.eq_ignore_ascii_case(b"AUTH "));
        if matches!(self.state, State::Auth(_)) || is_auth {
            auth::MAX_AUTH_LINE
        } else {
            MAX_COMMAND_LINE
        }
    }

    /// An over-long line was skipped: one 500, and an AUTH exchange it was
    /// part of is over.
    fn line_too_long(&mut self) {
        if matches!(self.state, State::Auth(_)) {
            self.state = self.idle_state();
        }
        self.error(reply::LINE_TOO_LONG);
    }

    fn handle_line(&mut self, line: &[u8], arena: &Bump) {
        if line.len() + 2 > self.line_limit(line) {
            return self.line_too_long();
        }
        if let State::Auth(_) = self.state {
            return self.auth_response(line);
        }
        if is_non_smtp(line, self.screen) {
            return self.fail_screen(Violation::NonSmtp);
        }
        if memchr::memchr2(b'\r', b'\n', line).is_some() {
            return self.error(reply::BARE_NEWLINE_COMMAND);
        }
        match parse_command(line, arena) {
            Err(e) => {
                let r = self.parse_error_reply(e);
                self.error(r)
            }
            Ok(cmd) => self.handle_command(cmd),
        }
    }

    /// RFC 6409 6.2: on submission, an address without a domain is refused
    /// as unqualified (554) rather than as bad syntax.
    fn parse_error_reply(&self, e: ParseError) -> Reply {
        match e {
            ParseError::UnqualifiedSender | ParseError::UnqualifiedRecipient
                if self.cfg.mode == Mode::Submission =>
            {
                UNQUALIFIED
            }
            e => e.reply(),
        }
    }

    fn handle_command(&mut self, cmd: Command<'_>) {
        match cmd {
            Command::Ehlo(name) => self.hello(name, true),
            Command::Helo(name) => self.hello(name, false),
            Command::Mail(m) => self.mail(m),
            Command::Rcpt(r) => self.rcpt(r),
            Command::Data => self.data(),
            Command::Bdat { size, last } => self.bdat(size, last),
            Command::Rset => {
                self.state = self.idle_state();
                self.reply(reply::RSET_OK);
            }
            Command::Noop => self.reply(reply::NOOP_OK),
            Command::Quit => self.close_with(reply::BYE),
            Command::Vrfy => self.reply(reply::VRFY),
            Command::Help => self.reply(reply::HELP),
            Command::StartTls => self.starttls(),
            Command::Auth { mechanism, initial } => self.auth(mechanism, initial),
            Command::NotImplemented => self.error(reply::NOT_IMPLEMENTED),
        }
    }

    /// EHLO/HELO: (re)start the session, dropping any transaction
    /// (RFC 5321 4.1.4).
    fn hello(&mut self, name: &str, esmtp: bool) {
        self.helo = Some(Helo {
            name: name.to_owned(),
            esmtp,
        });
        self.state = State::Ready;
        let host = self.cfg.hostname.as_str();
        if !esmtp {
            reply::write_line(&mut self.output, 250, None, host, true);
            return;
        }
        let greeting = format!("{host} Hello {name}");
        let size = format!("SIZE {}", self.cfg.max_message_size);
        let auth = format!("AUTH {}", auth::MECHANISMS);
        let mut lines = Vec::with_capacity(11);
        lines.extend([
            greeting.as_str(),
            "PIPELINING",
            size.as_str(),
            "8BITMIME",
            "SMTPUTF8",
            "ENHANCEDSTATUSCODES",
            "CHUNKING",
            "DSN",
        ]);
        // RFC 3207 4.2: not offered again once TLS is active.
        if self.cfg.starttls && self.tls.is_none() {
            lines.push("STARTTLS");
        }
        if self.auth_offered() {
            lines.push(auth.as_str());
        }
        reply::write_multiline(&mut self.output, 250, None, lines);
    }

    /// AUTH is advertised and accepted: on submission, under TLS (or in
    /// the clear from loopback when the flag allows it).
    fn auth_offered(&self) -> bool {
        self.cfg.mode == Mode::Submission
            && (self.tls.is_some()
                || (self.cfg.plaintext_auth_on_loopback
                    && self.conn.peer.ip().to_canonical().is_loopback()))
    }

    /// STARTTLS (RFC 3207): 220, then nothing more is read until the
    /// driver reports the handshake.
    fn starttls(&mut self) {
        if self.tls.is_some() {
            return self.error(TLS_ALREADY_ACTIVE);
        }
        if !self.cfg.starttls {
            return self.error(reply::NOT_IMPLEMENTED);
        }
        if matches!(self.state, State::Mail(_)) {
            return self.error(IN_TRANSACTION);
        }
        self.reply(READY_TO_START_TLS);
        self.state = State::StartTls;
        self.event = Some(Event::StartTls);
    }

    fn auth(&mut self, mechanism: &str, initial: Option<&str>) {
        if self.cfg.mode != Mode::Submission {
            return self.error(auth::NOT_ENABLED);
        }
        match &self.helo {
            None => return self.error(reply::BAD_SEQUENCE_HELO),
            // RFC 4954 4: AUTH is an ESMTP extension.
            Some(h) if !h.esmtp => return self.error(auth::NOT_ENABLED),
            Some(_) => {}
        }
        if !self.auth_offered() {
            return self.error(auth::NEEDS_TLS);
        }
        if self.auth.is_some() {
            return self.error(auth::ALREADY);
        }
        if matches!(self.state, State::Mail(_)) {
            return self.error(auth::IN_TRANSACTION);
        }
        let Some(mech) = Mechanism::parse(mechanism) else {
            return self.error(auth::UNKNOWN_MECHANISM);
        };
        let step = auth::start(mech, initial);
        self.auth_step(step);
    }

    fn auth_response(&mut self, line: &[u8]) {
        let State::Auth(exchange) = self.take_state() else {
            return;
        };
        self.state = self.idle_state();
        self.auth_step(exchange.handle_response(line));
    }

    fn auth_step(&mut self, step: Step) {
        match step {
            Step::Challenge(exchange, challenge) => {
                reply::write_line(&mut self.output, 334, None, challenge, true);
                self.state = State::Auth(exchange);
            }
            Step::Fail(e) => self.error(e.reply()),
            // No proxy authorization: the authorization identity, when
            // given, must be the login itself (RFC 4616 2).
            Step::Done(c) if c.authzid.as_ref().is_some_and(|z| *z != c.username) => {
                self.error(auth::FAILED)
            }
            Step::Done(c) => {
                self.event = Some(Event::Auth(c));
                self.state = State::Authenticating;
            }
        }
    }

    /// RFC 6409 6.2: on submission every domain in the envelope must be
    /// fully qualified: a dotted name, an address literal, or one of ours.
    fn is_qualified(&self, domain: &Domain<'_>) -> bool {
        match domain {
            Domain::Literal(_) => true,
            Domain::Name(d) => {
                d.contains('.')
                    || self
                        .cfg
                        .local_domains
                        .iter()
                        .any(|l| l.eq_ignore_ascii_case(d))
            }
        }
    }

    fn mail(&mut self, m: MailCommand<'_>) {
        let Some(helo) = &self.helo else {
            return self.error(reply::BAD_SEQUENCE_HELO);
        };
        if matches!(self.state, State::Mail(_)) {
            return self.error(reply::BAD_SEQUENCE_NESTED_MAIL);
        }
        let p = &m.params;
        let any_param = p.size.is_some()
            || p.body.is_some()
            || p.smtputf8
            || p.ret.is_some()
            || p.envid.is_some()
            || p.auth.is_some();
        if any_param && !helo.esmtp {
            return self.error(reply::PARAMETERS_AFTER_HELO);
        }
        if p.auth.is_some() && !self.auth_offered() {
            // AUTH is not advertised here (RFC 4954 5). Where it is, the
            // parameter is accepted and not trusted (nothing is relayed on
            // its word).
            return self.error(reply::UNKNOWN_PARAMETER);
        }
        if self.cfg.mode == Mode::Submission {
            let from = m.from.map_or_else(String::new, |f| f.to_owned_string());
            let Some(who) = &self.auth else {
                self.note_rejection(auth::REQUIRED, format!("MAIL FROM:<{from}>"));
                return self.error(auth::REQUIRED);
            };
            if let Some(f) = &m.from {
                let refusal = if !self.is_qualified(&f.domain) {
                    Some(UNQUALIFIED)
                } else if !who.send_as.iter().any(|r| r.allows(&from)) {
                    Some(SENDER_NOT_OWNED)
                } else {
                    None
                };
                if let Some(refusal) = refusal {
                    self.note_rejection(refusal, format!("MAIL FROM:<{from}>"));
                    return self.error(refusal);
                }
            }
        }
        if m.from.is_some_and(|f| f.utf8) && !p.smtputf8 {
            return self.error(reply::UTF8_NOT_DECLARED);
        }
        if p.size.is_some_and(|s| s > self.cfg.max_message_size) {
            return self.error(reply::SIZE_EXCEEDED);
        }
        if let Some(refusal) = self.message_rate() {
            let from = m.from.map_or_else(String::new, |f| f.to_owned_string());
            self.note_rejection_for(refusal.1, refusal.0, format!("MAIL FROM:<{from}>"));
            return self.error(refusal.0);
        }
        let helo = self.helo.as_ref().map_or("", |h| h.name.as_str());
        let esmtp = self.helo.as_ref().is_some_and(|h| h.esmtp);
        let envelope = Envelope {
            peer: self.conn.peer,
            helo: helo.to_owned(),
            protocol: Protocol {
                esmtp,
                tls: self.conn.tls,
                auth: self.auth.is_some(),
                utf8: p.smtputf8,
            },
            mail_from: m.from.map(|f| f.to_owned_string()),
            size: p.size,
            body: p.body,
            smtputf8: p.smtputf8,
            ret: p.ret,
            envid: p.envid.map(str::to_owned),
            rcpts: Vec::new(),
            chunked: false,
            pool: None,
        };
        let tx = Transaction {
            envelope,
            body: Vec::new(),
            content_deadline: None,
            bdat_lines: BdatLines::default(),
            spf_failed: false,
        };
        if self.cfg.check_sender && self.auth.is_none() && !self.relay_client() {
            self.event = Some(Event::CheckSender(SenderCheck {
                helo: tx.envelope.helo.clone(),
                mail_from: tx.envelope.mail_from.clone().unwrap_or_default(),
            }));
            self.state = State::CheckingSender(tx);
            return;
        }
        self.state = State::Mail(tx);
        self.reply(reply::SENDER_OK);
    }

    fn rcpt(&mut self, r: RcptCommand<'_>) {
        let esmtp = self.helo.as_ref().is_some_and(|h| h.esmtp);
        let verdict = match &self.state {
            State::Fresh => Err(reply::BAD_SEQUENCE_HELO.into()),
            State::Mail(tx) if tx.envelope.chunked => {
                Err(reply::BAD_SEQUENCE_RCPT_AFTER_BDAT.into())
            }
            State::Mail(tx) => self.check_rcpt(&r, &tx.envelope, esmtp),
            _ => Err(reply::BAD_SEQUENCE_NEED_MAIL.into()),
        };
        let spf_refuses = |a: &Accepted| match &self.state {
            State::Mail(tx) if tx.spf_failed => {
                let domain = a.addr.rsplit_once('@').map_or("", |(_, d)| d);
                self.cfg.spf_rcpt.rejects(domain)
            }
            _ => false,
        };
        let accepted = match verdict {
            Ok(a) if spf_refuses(&a) => {
                let command = format!("RCPT TO:<{}>", a.addr);
                self.note_rejection(reply::SPF_FAIL, command);
                return self.error(reply::SPF_FAIL);
            }
            Ok(a) => match self.recipient_rate() {
                None => a,
                Some(refusal) => {
                    let command = format!("RCPT TO:<{}>", a.addr);
                    self.note_rejection_for(RECIPIENT_RATE_REASON, refusal, command);
                    return self.error(refusal);
                }
            },
            Err(RcptRefusal::Reply(e)) => {
                if [reply::RELAY_DENIED, UNQUALIFIED].contains(&e) {
                    let to = match &r.to {
                        Recipient::Postmaster => "postmaster".to_owned(),
                        Recipient::Mailbox(m) => m.to_owned_string(),
                    };
                    self.note_rejection(e, format!("RCPT TO:<{to}>"));
                }
                return self.error(e);
            }
            Err(RcptRefusal::Mailbox { addr, why }) => {
                self.note_rejection(MAILBOX_REFUSED, format!("RCPT TO:<{addr}>"));
                let text = format!("<{addr}>: Recipient address rejected: {why}");
                return self.error_text(MAILBOX_REFUSED.code, MAILBOX_REFUSED.status, &text);
            }
        };
        if let State::Mail(tx) = &mut self.state {
            tx.envelope.rcpts.push(Rcpt {
                addr: accepted.addr,
                notify: r.params.notify,
                orcpt: r.params.orcpt.map(str::to_owned).or(accepted.orcpt),
            });
        }
        self.reply(reply::RCPT_OK);
    }

    fn check_rcpt(
        &self,
        r: &RcptCommand<'_>,
        env: &Envelope,
        esmtp: bool,
    ) -> Result<Accepted, RcptRefusal> {
        if (r.params.notify.is_some() || r.params.orcpt.is_some()) && !esmtp {
            return Err(reply::PARAMETERS_AFTER_HELO.into());
        }
        if env.rcpts.len() >= self.cfg.max_recipients {
            return Err(reply::TOO_MANY_RECIPIENTS.into());
        }
        let mb = match &r.to {
            // RFC 5321 4.5.1: <postmaster> must be delivered: it is the
            // first local domain's postmaster, and the DSN's
            // Original-Recipient says what the client wrote.
            Recipient::Postmaster => {
                let first = self.cfg.local_domains.first().map(String::as_str);
                let addr = crate::policy::recipient::qualify_postmaster("postmaster", first);
                return Ok(Accepted {
                    addr: addr.into_owned(),
                    orcpt: first.map(|_| "rfc822;postmaster".to_owned()),
                });
            }
            Recipient::Mailbox(mb) => mb,
        };
        if mb.utf8 && !env.smtputf8 {
            return Err(reply::UTF8_NOT_DECLARED.into());
        }
        let at = self.locality(&mb.domain);
        if self.cfg.mode == Mode::Submission {
            // MAIL already required AUTH: an authenticated user may
            // send anywhere (RFC 6409 4.3), to qualified addresses.
            if !self.is_qualified(&mb.domain) {
                return Err(UNQUALIFIED.into());
            }
        } else {
            // Relay policy: clients in --relay-network may send anywhere;
            // everyone else only to local domains, and only to plain local
            // parts (no percent hack, bang path or quoted '@' that another
            // MTA could route onward).
            let relay_client = self.relay_client();
            let plain_local =
                at.local_domain && !crate::policy::relay::is_routing_local_part(mb.local);
            if !(relay_client || plain_local) {
                return Err(reply::RELAY_DENIED.into());
            }
        }
        // Whatever delivery would refuse is refused now, in the session:
        // accepted and failed later, it would bounce to a sender who may
        // be forged (backscatter).
        let addr = mb.to_owned_string();
        match self.cfg.recipients.check(&addr, at) {
            Ok(listed) => Ok(Accepted {
                addr: listed.unwrap_or(addr),
                orcpt: None,
            }),
            Err(why) => Err(RcptRefusal::Mailbox { addr, why }),
        }
    }

    /// Whether a domain is local, and whether its mail goes into a Maildir
    /// (a `--route` decides first, as in delivery; then a local domain
    /// does).
    fn locality(&self, domain: &Domain<'_>) -> Locality {
        locality(&self.cfg, domain)
    }

    fn data(&mut self) {
        match self.take_state() {
            State::Mail(tx) if tx.envelope.chunked => {
                self.state = State::Mail(tx);
                self.error(reply::BAD_SEQUENCE_DATA_AFTER_BDAT);
            }
            State::Mail(tx) if tx.envelope.rcpts.is_empty() => {
                self.state = State::Mail(tx);
                self.error(reply::BAD_SEQUENCE_NEED_RCPT);
            }
            State::Mail(tx) if self.allowance < self.data_room(&tx) => {
                // No room for the body now: refused before the client sends
                // it, and the transaction stays for a later DATA.
                self.state = State::Mail(tx);
                self.note_rejection(reply::BUDGET_EXCEEDED, "DATA".into());
                self.reply(reply::BUDGET_EXCEEDED);
            }
            State::Mail(mut tx) => {
                tx.content_deadline = Some(self.now + self.cfg.max_data_time);
                self.state = State::Data(
                    tx,
                    DataReceiver::new(self.cfg.max_message_size, self.cfg.bare_newline),
                );
                self.reply(reply::START_DATA);
            }
            other => {
                let e = if matches!(other, State::Fresh) {
                    reply::BAD_SEQUENCE_HELO
                } else {
                    reply::BAD_SEQUENCE_NEED_MAIL
                };
                self.state = other;
                self.error(e);
            }
        }
    }

    /// The room a DATA needs to be started: `min_data_room`, or the size
    /// the client declared when larger, within the size limit.
    fn data_room(&self, tx: &Transaction) -> usize {
        let declared = tx.envelope.size.unwrap_or(0);
        let room = declared
            .min(self.cfg.max_message_size)
            .max(self.cfg.min_data_room as u64);
        usize::try_from(room).unwrap_or(usize::MAX)
    }

    fn finish_data(&mut self) {
        let State::Data(tx, rx) = self.take_state() else {
            return;
        };
        let refusal = match rx.verdict() {
            Verdict::Ok => None,
            Verdict::TooBig => Some(reply::SIZE_EXCEEDED),
            Verdict::BareNewline => Some(reply::DATA_BARE_NEWLINE),
            Verdict::LineTooLong => Some(reply::DATA_LINE_TOO_LONG),
            Verdict::OverBudget => {
                // Our shortage, not the client's fault: not counted
                // towards --max-errors.
                self.state = State::Ready;
                self.note_rejection(reply::BUDGET_EXCEEDED, "DATA (content)".into());
                self.reply(reply::BUDGET_EXCEEDED);
                return;
            }
        };
        match refusal {
            Some(r) => {
                self.state = State::Ready;
                self.error(r);
            }
            None => self.hand_out(tx),
        }
    }

    /// BDAT: a chunk is always read (its byte count keeps client and server
    /// in step), even when it is then discarded with an error.
    fn bdat(&mut self, size: u64, last: bool) {
        let esmtp = self.helo.as_ref().is_some_and(|h| h.esmtp);
        let target = match self.take_state() {
            State::Mail(tx) if tx.envelope.rcpts.is_empty() => ChunkTarget::Discard {
                error: reply::BAD_SEQUENCE_NEED_RCPT,
                resume: Some(tx),
            },
            // A refused chunk ends the transaction (RFC 3030 2: the message
            // as a whole failed).
            State::Mail(_) if !esmtp => ChunkTarget::Discard {
                error: reply::BAD_SEQUENCE_BDAT_HELO,
                resume: None,
            },
            State::Mail(tx) if tx.body.len() as u64 + size > self.cfg.max_message_size => {
                ChunkTarget::Discard {
                    error: reply::SIZE_EXCEEDED,
                    resume: None,
                }
            }
            State::Mail(mut tx) => {
                let extra = usize::try_from(size).unwrap_or(usize::MAX);
                // The chunk's room is taken now: a chunk is counted by what
                // it will occupy before its bytes arrive.
                if grow_within(
                    &mut tx.body,
                    extra,
                    self.cfg.max_message_size,
                    self.allowance,
                ) {
                    tx.envelope.chunked = true;
                    tx.content_deadline
                        .get_or_insert(self.now + self.cfg.max_data_time);
                    ChunkTarget::Store { tx, last }
                } else {
                    self.note_rejection(reply::BUDGET_EXCEEDED, format!("BDAT {size}"));
                    ChunkTarget::Discard {
                        error: reply::BUDGET_EXCEEDED,
                        resume: None,
                    }
                }
            }
            State::Fresh => ChunkTarget::Discard {
                error: reply::BAD_SEQUENCE_HELO,
                resume: None,
            },
            _ => ChunkTarget::Discard {
                error: reply::BAD_SEQUENCE_NEED_MAIL,
                resume: None,
            },
        };
        let rx = match &target {
            ChunkTarget::Store { tx, .. } => {
                BdatReceiver::with_lines(size, self.cfg.bare_newline, tx.bdat_lines)
                    .limited(self.cfg.max_message_size, self.allowance)
            }
            ChunkTarget::Discard { .. } => BdatReceiver::new(size),
        };
        self.state = State::Bdat { rx, size, target };
    }

    fn finish_chunk(&mut self) {
        let State::Bdat { rx, size, target } = self.take_state() else {
            return;
        };
        let target = match target {
            ChunkTarget::Store { mut tx, last } => {
                tx.bdat_lines = rx.lines();
                // Under `Normalize` a bare CR or LF is stored as CRLF, so a
                // chunk can need more room than it announced: what did not
                // fit (the size limit, or the memory the body may hold)
                // ends the transaction, as a refused chunk does.
                match rx.overflow() {
                    Some(Overflow::Size) => ChunkTarget::Discard {
                        error: reply::SIZE_EXCEEDED,
                        resume: None,
                    },
                    Some(Overflow::Budget) => {
                        self.note_rejection(reply::BUDGET_EXCEEDED, format!("BDAT {size}"));
                        ChunkTarget::Discard {
                            error: reply::BUDGET_EXCEEDED,
                            resume: None,
                        }
                    }
                    None => ChunkTarget::Store { tx, last },
                }
            }
            discard => discard,
        };
        match target {
            ChunkTarget::Discard { error, resume } => {
                self.state = match resume {
                    Some(tx) => State::Mail(tx),
                    None => self.idle_state(),
                };
                if error == reply::BUDGET_EXCEEDED {
                    // Our shortage: not counted towards --max-errors.
                    self.reply(error);
                } else {
                    self.error(error);
                }
            }
            ChunkTarget::Store { tx, last: true } => {
                // The same 550 5.6.0 as for DATA, after the last chunk.
                if tx.bdat_lines.verdict(self.cfg.bare_newline) == Verdict::BareNewline {
                    self.state = State::Ready;
                    self.error(reply::DATA_BARE_NEWLINE);
                } else {
                    self.hand_out(tx);
                }
            }
            ChunkTarget::Store { tx, last: false } => {
                self.state = State::Mail(tx);
                reply::write_line(
                    &mut self.output,
                    250,
                    Some("2.0.0"),
                    &format!("Ok: {size} octets received"),
                    true,
                );
            }
        }
    }

    fn hand_out(&mut self, tx: Transaction) {
        self.event = Some(Event::Message(Message {
            envelope: tx.envelope,
            body: tx.body,
        }));
        self.state = State::Committing;
    }

    fn idle_state(&self) -> State {
        if self.helo.is_some() {
            State::Ready
        } else {
            State::Fresh
        }
    }

    fn take_state(&mut self) -> State {
        std::mem::replace(&mut self.state, State::Closed)
    }

    fn reply(&mut self, r: Reply) {
        r.write_to(&mut self.output);
    }

    /// An error reply; too many of them end the session (a client speaking
    /// another protocol, or probing).
    fn error(&mut self, r: Reply) {
        self.error_text(r.code, r.status, r.text);
    }

    /// An error reply whose text is made for this command.
    fn error_text(&mut self, code: u16, status: Option<&'static str>, text: &str) {
        reply::write_line(&mut self.output, code, status, text, true);
        self.errors += 1;
        if self.errors >= self.cfg.max_errors && !matches!(self.state, State::Closed) {
            self.close_with(reply::TOO_MANY_ERRORS);
        }
    }

    fn note_rejection(&mut self, reply: Reply, command: String) {
        self.note_rejection_for("policy", reply, command);
    }

    fn note_rejection_for(&mut self, reason: &'static str, reply: Reply, command: String) {
        self.rejections.push(PolicyRejection {
            reply,
            command,
            user: self.auth.as_ref().map(|a| a.login.clone()),
            reason,
        });
    }

    /// The client failed the screen: its answer, and the session is over.
    fn fail_screen(&mut self, why: Violation) {
        self.violation = Some(why);
        self.close_with(why.reply());
    }

    /// The client may relay (`--relay-network`).
    fn relay_client(&self) -> bool {
        self.cfg
            .relay_networks
            .iter()
            .any(|n| n.contains(self.conn.peer.ip()))
    }

    /// Counts one message against the per-minute limits: the user's when
    /// authenticated, else the client network's (unless it may relay).
    /// `Some` with the refusal and its reason when over.
    fn message_rate(&self) -> Option<(Reply, &'static str)> {
        let rates = self.cfg.rates.as_ref()?;
        if let Some(who) = &self.auth {
            let key = RateKey::user(&who.login);
            return rates
                .take(key, Counted::Messages, self.now)
                .err()
                .map(|_| (USER_MESSAGE_RATE, USER_MESSAGE_RATE_REASON));
        }
        if self.relay_client() {
            return None;
        }
        rates
            .take(
                RateKey::net(self.conn.peer.ip()),
                Counted::Messages,
                self.now,
            )
            .err()
            .map(|_| (MESSAGE_RATE, MESSAGE_RATE_REASON))
    }

    /// Counts one recipient against the client network's per-minute limit
    /// (not for authenticated or relay clients).
    fn recipient_rate(&self) -> Option<Reply> {
        let rates = self.cfg.rates.as_ref()?;
        if self.auth.is_some() || self.relay_client() {
            return None;
        }
        rates
            .take(
                RateKey::net(self.conn.peer.ip()),
                Counted::Recipients,
                self.now,
            )
            .err()
            .map(|_| RECIPIENT_RATE)
    }

    fn close_with(&mut self, r: Reply) {
        r.write_to(&mut self.output);
        self.state = State::Closed;
    }
}

const DATA_TIME_EXCEEDED: Reply = Reply::new(
    421,
    "4.4.2",
    "Error: time limit for the message content exceeded, closing connection",
);
const READY_TO_START_TLS: Reply = Reply::new(220, "2.0.0", "Ready to start TLS");
const TLS_ALREADY_ACTIVE: Reply = Reply::new(503, "5.5.1", "Error: TLS already active");
const IN_TRANSACTION: Reply = Reply::new(
    503,
    "5.5.1",
    "Error: STARTTLS not permitted during a mail transaction",
);
const UNQUALIFIED: Reply = Reply::new(554, "5.5.2", "Error: address is not fully qualified");
const SENDER_NOT_OWNED: Reply = Reply::new(
    550,
    "5.7.1",
    "Error: sender address not owned by the authenticated user",
);

/// A local recipient that does not exist or cannot be delivered; the reply
/// text names the address and the reason (`<bob@example.org>: Recipient
/// address rejected: User unknown`), as Postfix's does.
const MAILBOX_REFUSED: Reply = Reply::new(550, "5.1.1", "Recipient address rejected");

/// A recipient the session takes: the address to store, and the ORCPT to
/// keep when the client gave none (the address was rewritten).
/// Whether `domain` is local under `cfg`, and whether its mail goes into a
/// Maildir (a `--route` decides first, as in delivery; then a local domain
/// does). Shared with the HTTP injection's recipient check.
pub(crate) fn locality(cfg: &SessionConfig, domain: &Domain<'_>) -> Locality {
    let Domain::Name(d) = domain else {
        return Locality::default();
    };
    let local_domain = cfg.local_domains.iter().any(|l| l.eq_ignore_ascii_case(d));
    let maildir = match crate::relay::route_for(&cfg.routes, &d.to_ascii_lowercase()) {
        Some(t) => matches!(t, Target::Maildir(_)),
        None => local_domain,
    };
    Locality {
        local_domain,
        maildir,
    }
}

struct Accepted {
    addr: String,
    orcpt: Option<String>,
}

/// Why a recipient is refused: a fixed reply, or a local mailbox refused by
/// [`crate::policy::recipient`] (its reply names the address).
enum RcptRefusal {
    Reply(Reply),
    Mailbox { addr: String, why: Refusal },
}

impl From<Reply> for RcptRefusal {
    fn from(r: Reply) -> Self {
        RcptRefusal::Reply(r)
    }
}

/// A command refused by policy: what was asked, by whom, and the answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyRejection {
    pub reply: Reply,
    /// The command, e.g. `MAIL FROM:<x@example.org>`.
    pub command: String,
    /// The authenticated user, if any.
    pub user: Option<String>,
    /// Why, for the event log: `policy`, or a rate limit
    /// (`message_rate`, `recipient_rate`, `user_message_rate`).
    pub reason: &'static str,
}

/// Why a client failed the screen (the `reason` of its `refused` event
/// and of `ringmta_screen_refusals_total`); the memory of clients that
/// failed is [`crate::inbound::screen`]'s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Violation {
    /// Sent something before the greeting.
    Pregreet,
    /// Sent several commands at once without PIPELINING offered.
    Pipelining,
    /// Sent an HTTP request, a CONNECT or binary garbage.
    NonSmtp,
}

impl Violation {
    pub fn name(self) -> &'static str {
        match self {
            Violation::Pregreet => "pregreet",
            Violation::Pipelining => "pipelining",
            Violation::NonSmtp => "non_smtp",
        }
    }

    /// The answer before the connection is dropped.
    pub fn reply(self) -> Reply {
        match self {
            Violation::Pregreet => PREGREET,
            Violation::Pipelining => PIPELINING,
            Violation::NonSmtp => NON_SMTP,
        }
    }
}

pub const PREGREET: Reply = Reply::new(
    554,
    "5.5.1",
    "Error: protocol violation: talking before the greeting",
);
pub const PIPELINING: Reply = Reply::new(
    554,
    "5.5.1",
    "Error: protocol violation: commands pipelined without PIPELINING",
);
pub const NON_SMTP: Reply = Reply::new(554, "5.5.1", "Error: non-SMTP command");
/// Messages per minute from a client network over `--max-messages-per-minute`.
pub const MESSAGE_RATE: Reply = Reply::new(
    451,
    "4.7.0",
    "Error: too many messages from your network, try again later",
);
/// Recipients per minute from a client network over
/// `--max-recipients-per-minute`.
pub const RECIPIENT_RATE: Reply = Reply::new(
    452,
    "4.5.3",
    "Error: too many recipients from your network, try again later",
);
/// Messages per minute from one login over
/// `--max-messages-per-user-per-minute`.
pub const USER_MESSAGE_RATE: Reply = Reply::new(
    451,
    "4.7.0",
    "Error: too many messages from this user, try again later",
);
pub const MESSAGE_RATE_REASON: &str = "message_rate";
pub const RECIPIENT_RATE_REASON: &str = "recipient_rate";
pub const USER_MESSAGE_RATE_REASON: &str = "user_message_rate";

/// HTTP methods and CONNECT (a client speaking to the wrong port, or an
/// open proxy relaying a spammer), as Postfix's `smtpd_forbidden_commands`;
/// with `strict` (`--screen-protocol`) also any line that does not start
/// with a letter (TLS handshakes and other binary garbage).
fn is_non_smtp(line: &[u8], strict: bool) -> bool {
    const VERBS: [&[u8]; 9] = [
        b"GET ",
        b"POST ",
        b"HEAD ",
        b"PUT ",
        b"CONNECT ",
        b"OPTIONS ",
        b"DELETE ",
        b"PATCH ",
        b"TRACE ",
    ];
    if VERBS
        .iter()
        .any(|v| line.len() >= v.len() && line[..v.len()].eq_ignore_ascii_case(v))
    {
        return true;
    }
    strict && line.first().is_some_and(|b| !b.is_ascii_alphabetic())
}

enum LineStep {
    NeedMore(usize),
    Line { len: usize, consumed: usize },
    Skipped(usize),
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEER: &str = "192.0.2.7:4321";
    const TLS: TlsInfo = TlsInfo {
        version: "TLS1.3",
        cipher: "TLS_AES_256_GCM_SHA384",
    };

    /// The test driver's credential check: user `alice`, password `secret`,
    /// may send as alice@localhost; password `busy` is a temporary failure,
    /// `blocked` a blocked client.
    fn check(c: &Credentials) -> AuthResult {
        match (c.username.as_str(), c.password.as_str()) {
            ("alice", "secret") => AuthResult::Success(Authenticated {
                login: "alice".into(),
                send_as: vec![crate::smtp::auth::SendAs::Address("alice@localhost".into())],
            }),
            (_, "busy") => AuthResult::TempFail,
            (_, "blocked") => AuthResult::TooManyFailures,
            _ => AuthResult::Failed,
        }
    }

    fn submission(tls: bool) -> Arc<SessionConfig> {
        Arc::new(SessionConfig {
            mode: Mode::Submission,
            starttls: true,
            plaintext_auth_on_loopback: !tls,
            ..(*cfg()).clone()
        })
    }

    fn cfg() -> Arc<SessionConfig> {
        Arc::new(SessionConfig {
            hostname: "mx.test".into(),
            max_message_size: 10_000,
            max_recipients: 3,
            ..SessionConfig::default()
        })
    }

    /// Drives a session as a connection would: `input` arrives in pieces cut
    /// at `cuts`; unconsumed bytes are presented again; every message is
    /// committed at once. Returns all output and the messages.
    fn drive(cfg: &Arc<SessionConfig>, input: &[u8], cuts: &[usize]) -> (String, Vec<Message>) {
        drive_from(cfg, PEER, input, cuts)
    }

    fn drive_from(
        cfg: &Arc<SessionConfig>,
        peer: &str,
        input: &[u8],
        cuts: &[usize],
    ) -> (String, Vec<Message>) {
        drive_with(cfg, peer, input, cuts, &|_| usize::MAX)
    }

    /// [`drive_from`], telling the session before each input the allowance
    /// `allowance` computes (the driver's share of the shard's budget), and
    /// checking that its body never holds more.
    fn drive_with(
        cfg: &Arc<SessionConfig>,
        peer: &str,
        input: &[u8],
        cuts: &[usize],
        allowance: &dyn Fn(&Session) -> usize,
    ) -> (String, Vec<Message>) {
        let now = Instant::now();
        let conn = ConnInfo {
            peer: peer.parse().unwrap(),
            tls: false,
        };
        let mut s = Session::new(cfg.clone(), conn, now);
        let mut out = Vec::new();
        let mut msgs = Vec::new();
        let mut pending = Vec::new();
        let mut fed = 0;
        let mut bounds = cuts.to_vec();
        bounds.push(input.len());
        for end in bounds {
            pending.extend_from_slice(&input[fed..end]);
            fed = end;
            loop {
                loop {
                    let room = allowance(&s);
                    s.handle_allowance(room);
                    let n = s.handle_input(&pending, now);
                    pending.drain(..n);
                    assert!(s.content_bytes() <= room, "{} > {room}", s.content_bytes());
                    match s.poll_event() {
                        Some(Event::Message(m)) => {
                            msgs.push(m);
                            s.handle_commit(CommitResult::Stored(format!("Q{}", msgs.len())), now);
                        }
                        Some(Event::StartTls) => {
                            // The driver drops what was pipelined behind it.
                            pending.clear();
                            s.handle_tls(TLS, now);
                        }
                        Some(Event::Auth(c)) => s.handle_auth(check(&c), now),
                        // The driver's SPF check, as a rule on the name.
                        Some(Event::CheckSender(c)) => {
                            let verdict = if c.mail_from.starts_with("spf-fail@") {
                                SenderVerdict::Refuse(reply::SPF_FAIL)
                            } else if c.mail_from.starts_with("spf-soft@") {
                                SenderVerdict::SpfFailed
                            } else {
                                SenderVerdict::Accept
                            };
                            s.handle_sender(verdict, now)
                        }
                        None => break,
                    }
                }
                // At its output cap the session leaves input for after the
                // write, as the driver does.
                let more = s.output_full();
                assert!(s.output().len() < MAX_OUTPUT + 1024);
                out.extend_from_slice(s.output());
                s.clear_output();
                if !more || s.is_closed() {
                    break;
                }
            }
            if s.is_closed() {
                break;
            }
        }
        (String::from_utf8(out).unwrap(), msgs)
    }

    /// Same result whether the input comes whole, split once anywhere, or
    /// byte by byte.
    fn drive_every_split(cfg: &Arc<SessionConfig>, input: &[u8]) -> (String, Vec<Message>) {
        let (out, msgs) = drive(cfg, input, &[]);
        let fingerprint = |msgs: &[Message]| {
            msgs.iter()
                .map(|m| {
                    (
                        m.envelope.mail_from.clone(),
                        m.envelope.rcpts.clone(),
                        m.body.clone(),
                    )
                })
                .collect::<Vec<_>>()
        };
        for cut in 1..input.len() {
            let (o, m) = drive(cfg, input, &[cut]);
            assert_eq!(o, out, "split at {cut}");
            assert_eq!(fingerprint(&m), fingerprint(&msgs), "split at {cut}");
        }
        let all: Vec<usize> = (1..input.len()).collect();
        let (o, m) = drive(cfg, input, &all);
        assert_eq!(o, out, "byte by byte");
        assert_eq!(fingerprint(&m), fingerprint(&msgs), "byte by byte");
        (out, msgs)
    }

    fn codes(out: &str) -> Vec<&str> {
        out.split("\r\n")
            .filter(|l| !l.is_empty())
            .filter(|l| l.as_bytes().get(3) == Some(&b' '))
            .map(|l| &l[..3])
            .collect()
    }

    #[test]
    fn spf_failed_sender_is_refused_per_recipient_domain() {
        let cfg = Arc::new(SessionConfig {
            check_sender: true,
            local_domains: vec!["localhost".into(), "strict.test".into()],
            spf_rcpt: SpfRcptPolicy {
                reject_by_default: false,
                domains: vec![("strict.test".into(), true)],
            },
            ..(*cfg()).clone()
        });
        let input = b"EHLO c.example\r\nMAIL FROM:<spf-soft@example.org>\r\nRCPT TO:<u@Strict.Test>\r\nRCPT TO:<u@localhost>\r\nDATA\r\nSubject: t\r\n\r\nx\r\n.\r\nMAIL FROM:<ok@example.org>\r\nRCPT TO:<u@strict.test>\r\nRSET\r\nQUIT\r\n";
        let (out, msgs) = drive_every_split(&cfg, input);
        assert_eq!(
            codes(&out),
            ["220", "250", "250", "550", "250", "354", "250", "250", "250", "250", "221"],
            "{out}"
        );
        assert!(out.contains("550 5.7.23 "), "{out}");
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0].envelope.rcpts.len(), 1);
        assert_eq!(msgs[0].envelope.rcpts[0].addr, "u@localhost");
    }

    #[test]
    fn sender_check_holds_pipelined_commands_until_its_verdict() {
        let cfg = Arc::new(SessionConfig {
            check_sender: true,
            relay_networks: vec!["198.51.100.0/24".parse().unwrap()],
            ..(*cfg()).clone()
        });
        let input = b"EHLO c.example\r\nMAIL FROM:<spf-fail@example.org>\r\nRCPT TO:<u@localhost>\r\nMAIL FROM:<ok@example.org>\r\nRCPT TO:<u@localhost>\r\nDATA\r\nSubject: t\r\n\r\nx\r\n.\r\nQUIT\r\n";
        let (out, msgs) = drive_every_split(&cfg, input);
        assert_eq!(
            codes(&out),
            ["220", "250", "550", "503", "250", "250", "354", "250", "221"],
            "{out}"
        );
        assert!(out.contains("550 5.7.23 "), "{out}");
        assert_eq!(msgs.len(), 1);
        assert_eq!(
            msgs[0].envelope.mail_from.as_deref(),
            Some("ok@example.org")
        );
        // A --relay-network client is not checked.
        let (out, msgs) = drive_from(&cfg, "198.51.100.7:1234", input, &[]);
        assert_eq!(
            codes(&out),
            ["220", "250", "250", "250", "503", "250", "354", "250", "221"],
            "{out}"
        );
        assert_eq!(msgs.len(), 1);
        assert_eq!(
            msgs[0].envelope.mail_from.as_deref(),
            Some("spf-fail@example.org")
        );
    }

    #[test]
    fn pipelined_transaction() {
        let input = b"EHLO c.example\r\nMAIL FROM:<a@example.org> BODY=8BITMIME\r\nRCPT TO:<u@localhost> NOTIFY=FAILURE\r\nRCPT TO:<Postmaster>\r\nDATA\r\nSubject: t\r\n\r\n..dot\r\n\xc3\xa9\r\n.\r\nQUIT\r\n";
        let (out, msgs) = drive_every_split(&cfg(), input);
        assert_eq!(
            codes(&out),
            ["220", "250", "250", "250", "250", "354", "250", "221"]
        );
        assert!(out.starts_with("220 mx.test ESMTP ringmta\r\n250-mx.test Hello c.example\r\n250-PIPELINING\r\n250-SIZE 10000\r\n"));
        assert!(out.contains("250 2.0.0 Ok: queued as Q1\r\n"));
        assert_eq!(msgs.len(), 1);
        let m = &msgs[0];
        assert_eq!(m.body, b"Subject: t\r\n\r\n.dot\r\n\xc3\xa9\r\n");
        assert_eq!(m.envelope.mail_from.as_deref(), Some("a@example.org"));
        assert_eq!(m.envelope.rcpts.len(), 2);
        // RFC 5321 4.5.1: bare <postmaster> is the first local domain's,
        // and ORCPT keeps what the client wrote.
        assert_eq!(m.envelope.rcpts[1].addr, "postmaster@localhost");
        assert_eq!(
            m.envelope.rcpts[1].orcpt.as_deref(),
            Some("rfc822;postmaster")
        );
        assert!(m.envelope.rcpts[0].notify.unwrap().failure);
    }

    fn rcpt_replies(cfg: &Arc<SessionConfig>, peer: &str, rcpts: &[&str]) -> Vec<String> {
        let mut input = b"EHLO c.example\r\nMAIL FROM:<victim@remote.test> RET=FULL\r\n".to_vec();
        for r in rcpts {
            input.extend_from_slice(format!("RCPT TO:<{r}>\r\n").as_bytes());
        }
        let (out, _) = drive_from(cfg, peer, &input, &[]);
        out.split("\r\n")
            .filter(|l| l.as_bytes().get(3) == Some(&b' '))
            .skip(3)
            .map(str::to_owned)
            .collect()
    }

    /// Regression (issue 11): recipients that Maildir delivery would refuse
    /// were accepted, then bounced, with the whole message, to the forged
    /// sender. They are refused at RCPT, for every kind of client.
    #[test]
    fn undeliverable_local_recipients_are_refused_at_rcpt() {
        let cfg = Arc::new(SessionConfig {
            relay_networks: vec!["198.51.100.0/24".parse().unwrap()],
            routes: vec![
                "sink.test=maildir:/srv/sink".parse().unwrap(),
                "backend.test=smtp:127.0.0.1:2626".parse().unwrap(),
            ],
            local_domains: vec!["localhost".into(), "backend.test".into()],
            max_recipients: 100,
            ..(*cfg()).clone()
        });
        let bad = [
            "a/b@localhost",
            "\".x\"@localhost",
            "\"x.\"@localhost",
            "\"a..b\"@localhost",
            "\"..\"@localhost",
            "\"a\\/b\"@LOCALHOST",
        ];
        for peer in [PEER, "198.51.100.9:25"] {
            let replies = rcpt_replies(&cfg, peer, &bad);
            for (r, reply) in bad.iter().zip(&replies) {
                assert!(
                    reply.starts_with(&format!(
                        "550 5.1.1 <{r}>: Recipient address rejected: undeliverable mailbox name ("
                    )),
                    "{peer} {r}: {reply}"
                );
            }
        }
        // A maildir: route is local delivery too (for a relay client); an
        // SMTP-routed local domain is not a Maildir.
        let replies = rcpt_replies(
            &cfg,
            "198.51.100.9:25",
            &["a/b@sink.test", "a/b@backend.test", "a/b@remote.test"],
        );
        assert_eq!(
            replies,
            [
                "550 5.1.1 <a/b@sink.test>: Recipient address rejected: undeliverable mailbox name (contains '/')",
                "250 2.1.5 Recipient ok",
                "250 2.1.5 Recipient ok",
            ]
        );
        // Authenticated submission is checked the same way.
        let input = b"EHLO c\r\nAUTH PLAIN AGFsaWNlAHNlY3JldA==\r\nMAIL FROM:<alice@localhost>\r\nRCPT TO:<\".x\"@localhost>\r\nRCPT TO:<ok@localhost>\r\n";
        let (out, _) = drive_from(&submission(false), "127.0.0.1:4321", input, &[]);
        assert!(
            out.contains("550 5.1.1 <\".x\"@localhost>: Recipient address rejected: undeliverable mailbox name (leading dot)\r\n250 2.1.5 Recipient ok\r\n"),
            "{out}"
        );
    }

    #[test]
    fn local_recipients_table_at_rcpt() {
        use crate::policy::recipient::RecipientTable;
        let table = RecipientTable::parse("alice@localhost\n@catchall.test\n").unwrap();
        let cfg = Arc::new(SessionConfig {
            local_domains: vec!["localhost".into(), "catchall.test".into()],
            recipients: Recipients::enabled(table),
            max_recipients: 100,
            ..(*cfg()).clone()
        });
        let input = b"EHLO c\r\nMAIL FROM:<s@remote.test>\r\nRCPT TO:<ALICE@localhost>\r\nRCPT TO:<bob@localhost>\r\nRCPT TO:<anyone@catchall.test>\r\nRCPT TO:<Postmaster@localhost>\r\nRCPT TO:<postmaster>\r\nDATA\r\n.\r\n";
        let (out, msgs) = drive_every_split(&cfg, input);
        assert!(
            out.contains("550 5.1.1 <bob@localhost>: Recipient address rejected: User unknown\r\n"),
            "{out}"
        );
        assert_eq!(
            codes(&out),
            ["220", "250", "250", "250", "550", "250", "250", "250", "354", "250"]
        );
        let rcpts: Vec<&str> = msgs[0]
            .envelope
            .rcpts
            .iter()
            .map(|r| r.addr.as_str())
            .collect();
        assert_eq!(
            rcpts,
            [
                "alice@localhost",
                "anyone@catchall.test",
                "Postmaster@localhost",
                "postmaster@localhost"
            ]
        );
    }

    /// Each smuggling sequence, followed by a complete second transaction,
    /// gives exactly one message and one reply to the content.
    #[test]
    fn smuggling_table_one_message_one_reply() {
        for seq in crate::smtp::data::tests::SMUGGLING {
            let mut input =
                b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<u@localhost>\r\nDATA\r\nfirst"
                    .to_vec();
            input.extend_from_slice(seq);
            input.extend_from_slice(b"MAIL FROM:<evil@example.org>\r\nRCPT TO:<v@localhost>\r\nDATA\r\nsmuggled\r\n.\r\nNOOP\r\n");
            let (out, msgs) = drive_every_split(&cfg(), &input);
            assert_eq!(
                codes(&out),
                ["220", "250", "250", "250", "354", "250", "250"],
                "{seq:?}"
            );
            assert_eq!(msgs.len(), 1, "{seq:?}");
            assert_eq!(msgs[0].envelope.rcpts[0].addr, "u@localhost");
            assert!(msgs[0].body.ends_with(b"DATA\r\nsmuggled\r\n"));

            let strict = Arc::new(SessionConfig {
                bare_newline: BareNewline::Reject,
                ..(*cfg()).clone()
            });
            let (out, msgs) = drive(&strict, &input, &[]);
            assert_eq!(
                codes(&out),
                ["220", "250", "250", "250", "354", "550", "250"],
                "{seq:?}"
            );
            assert!(msgs.is_empty());
        }
    }

    #[test]
    fn sequence_errors_leave_transaction_alone() {
        let input = b"MAIL FROM:<a@example.org>\r\nEHLO c\r\nRCPT TO:<u@localhost>\r\nDATA\r\nMAIL FROM:<a@example.org>\r\nDATA\r\nMAIL FROM:<b@example.org>\r\nRCPT TO:<bad>\r\nRCPT TO:<u@localhost>\r\nDATA\r\nx\r\n.\r\n";
        let (out, msgs) = drive_every_split(&cfg(), input);
        assert_eq!(
            codes(&out),
            ["220", "503", "250", "503", "503", "250", "503", "503", "501", "250", "354", "250"]
        );
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0].envelope.mail_from.as_deref(), Some("a@example.org"));
    }

    #[test]
    fn limits() {
        let input = b"EHLO c\r\nMAIL FROM:<a@example.org> SIZE=10001\r\nMAIL FROM:<a@example.org> SIZE=100\r\nRCPT TO:<a@localhost>\r\nRCPT TO:<b@localhost>\r\nRCPT TO:<c@localhost>\r\nRCPT TO:<d@localhost>\r\nRCPT TO:<x@elsewhere.example>\r\nRCPT TO:<j\xc3\xb6@localhost>\r\n";
        let (out, _) = drive_every_split(&cfg(), input);
        assert_eq!(
            codes(&out),
            ["220", "250", "552", "250", "250", "250", "250", "452", "452", "452"]
        );
        let (out, _) = drive(&cfg(), b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<x@elsewhere.example>\r\nRCPT TO:<j\xc3\xb6@localhost>\r\n", &[]);
        assert_eq!(codes(&out), ["220", "250", "250", "550", "553"]);
    }

    #[test]
    fn oversize_data_is_refused_once() {
        let mut input =
            b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<a@localhost>\r\nDATA\r\n".to_vec();
        for _ in 0..200 {
            input.extend_from_slice(
                b"0123456789012345678901234567890123456789012345678901234567890123456789\r\n",
            );
        }
        input.extend_from_slice(b".\r\nNOOP\r\n");
        let (out, msgs) = drive(&cfg(), &input, &[100, 5000]);
        assert_eq!(
            codes(&out),
            ["220", "250", "250", "250", "354", "552", "250"]
        );
        assert!(msgs.is_empty());
    }

    #[test]
    fn long_command_line_one_reply_and_in_sync() {
        let mut input = b"EHLO c\r\nNOOP ".to_vec();
        input.extend(std::iter::repeat_n(b'x', 100_000));
        input.extend_from_slice(b"\r\nNOOP\r\n");
        let (out, _) = drive(&cfg(), &input, &[9, 4000, 4001, 50_000]);
        assert_eq!(codes(&out), ["220", "250", "500", "250"]);
        let (out, _) = drive(
            &cfg(),
            b"EHLO c\r\nNOOP\nRSET\r\nNOOP x\ry\r\nQUIT\r\n",
            &[],
        );
        assert_eq!(codes(&out), ["220", "250", "500", "500", "221"]);
    }

    /// Regression (issue 11): a BDAT body holding `\r.\rMAIL FROM:...`
    /// was stored (and relayed) unchanged. Under `--bare-newline reject`
    /// it is refused with one 550 5.6.0 after the last chunk, the session
    /// in step; by default it is stored as CRLF lines, also when a CR ends
    /// one chunk and its LF begins the next.
    #[test]
    fn bdat_bare_cr_is_refused_or_normalized() {
        let content: &[u8] = b"Subject: a\r\n\r\nfirst\r.\rMAIL FROM:<evil@example.org>\r\n";
        let mut input =
            b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<a@localhost>\r\n".to_vec();
        input.extend_from_slice(format!("BDAT {} LAST\r\n", content.len()).as_bytes());
        input.extend_from_slice(content);
        input.extend_from_slice(b"NOOP\r\n");
        let strict = Arc::new(SessionConfig {
            bare_newline: BareNewline::Reject,
            ..(*cfg()).clone()
        });
        let (out, msgs) = drive_every_split(&strict, &input);
        assert_eq!(codes(&out), ["220", "250", "250", "250", "550", "250"]);
        assert!(out.contains("550 5.6.0"), "{out}");
        assert!(msgs.is_empty());
        let (out, msgs) = drive_every_split(&cfg(), &input);
        assert_eq!(codes(&out), ["220", "250", "250", "250", "250", "250"]);
        assert_eq!(
            msgs[0].body,
            b"Subject: a\r\n\r\nfirst\r\n.\r\nMAIL FROM:<evil@example.org>\r\n"
        );
        // A CRLF split between two chunks is one line end; a CR ending the
        // last chunk is bare.
        let split = b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<a@localhost>\r\nBDAT 3\r\nab\rBDAT 2 LAST\r\n\ncNOOP\r\n";
        let (out, msgs) = drive_every_split(&strict, split);
        assert_eq!(
            codes(&out),
            ["220", "250", "250", "250", "250", "250", "250"]
        );
        assert_eq!(msgs[0].body, b"ab\r\nc");
        let trailing = b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<a@localhost>\r\nBDAT 3\r\nab\rBDAT 0 LAST\r\nNOOP\r\n";
        let (out, msgs) = drive_every_split(&strict, trailing);
        assert_eq!(
            codes(&out),
            ["220", "250", "250", "250", "250", "550", "250"]
        );
        assert!(msgs.is_empty());
    }

    #[test]
    fn bdat_chunks_pipelined() {
        let input = b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<a@localhost>\r\nBDAT 5\r\nab\r\n.BDAT 3 LAST\r\nxyzBDAT 0 LAST\r\nMAIL FROM:<>\r\nRCPT TO:<a@localhost>\r\nBDAT 0 LAST\r\n";
        let (out, msgs) = drive_every_split(&cfg(), input);
        assert_eq!(
            codes(&out),
            ["220", "250", "250", "250", "250", "250", "503", "250", "250", "250"]
        );
        assert_eq!(msgs.len(), 2);
        assert_eq!(msgs[0].body, b"ab\r\n.xyz");
        assert!(msgs[0].envelope.chunked);
        assert!(msgs[1].body.is_empty());
        assert_eq!(msgs[1].envelope.mail_from, None);
    }

    #[test]
    fn bdat_out_of_sequence_is_read_and_discarded() {
        let input = b"EHLO c\r\nBDAT 6\r\nQUIT\r\nNOOP\r\nMAIL FROM:<a@example.org>\r\nBDAT 4\r\nDATAQUIT\r\n";
        let (out, msgs) = drive_every_split(&cfg(), input);
        assert_eq!(
            codes(&out),
            ["220", "250", "503", "250", "250", "503", "221"]
        );
        assert!(msgs.is_empty());
    }

    #[test]
    fn timeouts_and_shutdown() {
        let now = Instant::now();
        let conn = ConnInfo {
            peer: PEER.parse().unwrap(),
            tls: false,
        };
        let c = cfg();
        let mut s = Session::new(c.clone(), conn, now);
        assert_eq!(s.poll_timeout(), Some(now + c.command_timeout));
        s.handle_timeout(now + Duration::from_secs(1));
        assert!(!s.is_closed());
        s.handle_timeout(now + c.command_timeout);
        assert!(s.is_closed());
        assert!(s
            .output()
            .ends_with(b"421 4.4.2 Error: timeout exceeded\r\n"));

        let mut s = Session::new(c.clone(), conn, now);
        s.handle_input(
            b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<a@localhost>\r\nDATA\r\n",
            now,
        );
        assert_eq!(s.poll_timeout(), Some(now + c.data_timeout));
        s.handle_shutdown();
        assert!(!s.is_closed(), "a transaction in progress may finish");
        s.handle_input(b"x\r\n.\r\n", now);
        assert!(matches!(s.poll_event(), Some(Event::Message(_))));
        s.handle_commit(CommitResult::Stored("Q".into()), now);
        assert!(s.is_closed());
        assert!(s.output().ends_with(b"250 2.0.0 Ok: queued as Q\r\n421 4.3.2 Service shutting down, closing transmission channel\r\n"));
    }

    #[test]
    fn commit_failures_map_to_4xx() {
        let now = Instant::now();
        let conn = ConnInfo {
            peer: PEER.parse().unwrap(),
            tls: false,
        };
        let mut s = Session::new(cfg(), conn, now);
        s.handle_input(
            b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<a@localhost>\r\nDATA\r\nx\r\n.\r\n",
            now,
        );
        assert!(s.poll_event().is_some());
        s.handle_commit(CommitResult::NoSpace, now);
        assert!(s
            .output()
            .ends_with(b"452 4.3.1 Error: insufficient system storage\r\n"));
        assert!(s.is_idle());
    }

    /// A refusal after the content (a From: the login may not use) is the
    /// given reply, a logged policy rejection, and the session goes on.
    #[test]
    fn commit_refused_by_policy_replies_and_stays_in_sync() {
        let now = Instant::now();
        let conn = ConnInfo {
            peer: PEER.parse().unwrap(),
            tls: false,
        };
        let mut s = Session::new(cfg(), conn, now);
        s.handle_input(
            b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<a@localhost>\r\nDATA\r\nx\r\n.\r\n",
            now,
        );
        assert!(s.poll_event().is_some());
        let reply = crate::smtp::submit::FROM_NOT_OWNED;
        s.handle_commit(
            CommitResult::Refused {
                reply,
                what: "DATA (From: bob@example.org)".into(),
            },
            now,
        );
        assert!(s
            .output()
            .ends_with(b"550 5.7.1 Error: From: address not owned by the authenticated user\r\n"));
        let rejections = s.take_rejections();
        assert_eq!(rejections.len(), 1);
        assert_eq!(rejections[0].command, "DATA (From: bob@example.org)");
        assert!(s.is_idle());
        s.clear_output();
        s.handle_input(b"NOOP\r\n", now);
        assert!(s.output().starts_with(b"250 "));
    }

    #[test]
    fn too_many_errors_close() {
        let c = Arc::new(SessionConfig {
            max_errors: 3,
            ..(*cfg()).clone()
        });
        let (out, _) = drive(
            &c,
            b"FROB / HTTP/1.1\r\nHost: x\r\nAccept: */*\r\nNOOP\r\n",
            &[],
        );
        assert_eq!(codes(&out), ["220", "500", "500", "500", "421"]);
    }

    fn b64(s: &[u8]) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    /// RFC 3207: STARTTLS is advertised until TLS is active; what was
    /// pipelined behind it is never executed; the client must greet again;
    /// a second STARTTLS is 503.
    #[test]
    fn starttls_discards_pipelined_input_and_resets() {
        let c = Arc::new(SessionConfig {
            starttls: true,
            ..(*cfg()).clone()
        });
        let first =
            b"EHLO c\r\nSTARTTLS\r\nMAIL FROM:<evil@example.org>\r\nRCPT TO:<u@localhost>\r\n";
        let mut input = first.to_vec();
        input.extend_from_slice(b"MAIL FROM:<a@example.org>\r\nEHLO c\r\nSTARTTLS\r\nQUIT\r\n");
        let (out, _) = drive(&c, &input, &[first.len()]);
        assert_eq!(
            codes(&out),
            ["220", "250", "220", "503", "250", "503", "221"]
        );
        let (before, after) = out.split_once("220 2.0.0 Ready to start TLS\r\n").unwrap();
        assert!(before.contains("250 STARTTLS\r\n"), "{before}");
        assert!(!after.contains("STARTTLS\r\n"), "{after}");
        assert!(after.contains("503 5.5.1 Error: send HELO/EHLO first"));
        assert!(after.contains("503 5.5.1 Error: TLS already active"));

        let (out, _) = drive(
            &c,
            b"EHLO c\r\nSTARTTLS x\r\nMAIL FROM:<a@example.org>\r\nSTARTTLS\r\n",
            &[],
        );
        assert_eq!(codes(&out), ["220", "250", "501", "250", "503"]);
        let (out, _) = drive(&cfg(), b"EHLO c\r\nSTARTTLS\r\n", &[]);
        assert_eq!(codes(&out), ["220", "250", "502"]);
        assert!(!out.contains("STARTTLS"));
    }

    /// The trace protocol says TLS and AUTH.
    #[test]
    fn protocol_records_tls_and_auth() {
        let input = format!(
            "EHLO c\r\nSTARTTLS\r\nEHLO c\r\nAUTH PLAIN {}\r\nMAIL FROM:<alice@localhost>\r\nRCPT TO:<x@elsewhere.example>\r\nDATA\r\nx\r\n.\r\n",
            b64(b"\0alice\0secret")
        );
        let cut = input.find("STARTTLS\r\n").unwrap() + 10;
        let (out, msgs) = drive(&submission(true), input.as_bytes(), &[cut]);
        assert_eq!(
            codes(&out),
            ["220", "250", "220", "250", "235", "250", "250", "354", "250"]
        );
        assert!(out.contains("250 AUTH PLAIN LOGIN\r\n"));
        assert_eq!(msgs[0].envelope.protocol.name(), "ESMTPSA");
    }

    /// AUTH edge cases on submission (plaintext allowed from loopback), each
    /// split at every byte.
    #[test]
    fn auth_table() {
        let ok = b64(b"\0alice\0secret");
        let bad = b64(b"\0alice\0wrong");
        let rows: Vec<(String, Vec<&str>)> = vec![
            (format!("AUTH PLAIN {ok}\r\n"), vec!["235"]),
            (format!("AUTH PLAIN {bad}\r\n"), vec!["535"]),
            (format!("AUTH plain\r\n{ok}\r\n"), vec!["334", "235"]),
            (
                format!("AUTH LOGIN\r\n{}\r\n{}\r\n", b64(b"alice"), b64(b"secret")),
                vec!["334", "334", "235"],
            ),
            (
                format!("AUTH LOGIN {}\r\n{}\r\n", b64(b"alice"), b64(b"secret")),
                vec!["334", "235"],
            ),
            ("AUTH PLAIN\r\n*\r\n".into(), vec!["334", "501"]),
            ("AUTH LOGIN\r\n*\r\n".into(), vec!["334", "501"]),
            ("AUTH PLAIN *\r\n".into(), vec!["501"]),
            ("AUTH PLAIN !!!\r\n".into(), vec!["501"]),
            ("AUTH PLAIN\r\nnot base64\r\n".into(), vec!["334", "501"]),
            ("AUTH PLAIN =\r\n".into(), vec!["501"]),
            ("AUTH CRAM-MD5\r\n".into(), vec!["504"]),
            ("AUTH\r\n".into(), vec!["501"]),
            (
                format!("AUTH PLAIN {}\r\n", b64(b"bob\0alice\0secret")),
                vec!["535"],
            ),
            (
                format!("AUTH PLAIN {}\r\n", b64(b"alice\0alice\0secret")),
                vec!["235"],
            ),
            (format!("AUTH PLAIN {ok}\r\nAUTH PLAIN {ok}\r\n"), vec!["235", "503"]),
            (format!("AUTH PLAIN {}\r\n", b64(b"\0alice\0busy")), vec!["454"]),
            (
                format!("AUTH PLAIN {}\r\nNOOP\r\n", b64(b"\0alice\0blocked")),
                vec!["421"],
            ),
            // RFC 4954: no AUTH inside a transaction; MAIL needs AUTH.
            ("MAIL FROM:<alice@localhost>\r\n".into(), vec!["530"]),
            // A failed AUTH leaves the session usable.
            (
                format!("AUTH PLAIN {bad}\r\nAUTH PLAIN {ok}\r\nMAIL FROM:<alice@localhost>\r\nAUTH PLAIN {ok}\r\n"),
                vec!["535", "235", "250", "503"],
            ),
            // RFC 6409: the sender must be the user's; envelope addresses
            // must be fully qualified; any qualified recipient domain.
            (
                format!("AUTH PLAIN {ok}\r\nMAIL FROM:<bob@localhost>\r\nMAIL FROM:<alice>\r\nMAIL FROM:<alice@host>\r\nMAIL FROM:<ALICE@LOCALHOST> AUTH=<>\r\nRCPT TO:<x@host>\r\nRCPT TO:<x>\r\nRCPT TO:<x@elsewhere.example>\r\nRCPT TO:<y@[192.0.2.1]>\r\n"),
                vec!["235", "550", "554", "554", "250", "554", "554", "250", "250"],
            ),
            (
                format!("AUTH PLAIN {ok}\r\nMAIL FROM:<>\r\nRCPT TO:<x@elsewhere.example>\r\n"),
                vec!["235", "250", "250"],
            ),
        ];
        for (lines, want) in rows {
            let input = format!("EHLO c\r\n{lines}");
            let c = submission(false);
            let (out, _) = drive_from(&c, "127.0.0.1:40000", input.as_bytes(), &[]);
            let mut expected = vec!["220", "250"];
            expected.extend(want);
            assert_eq!(codes(&out), expected, "{lines:?}\n{out}");
            let cuts: Vec<usize> = (1..input.len()).collect();
            let (split, _) = drive_from(&c, "127.0.0.1:40000", input.as_bytes(), &cuts);
            assert_eq!(split, out, "byte by byte: {lines:?}");
        }
    }

    #[test]
    fn auth_is_offered_only_where_allowed() {
        let ok = b64(b"\0alice\0secret");
        // Submission in the clear from a remote address: not advertised,
        // 538 to AUTH, 530 to MAIL.
        let input = format!("EHLO c\r\nAUTH PLAIN {ok}\r\nMAIL FROM:<alice@localhost>\r\n");
        let (out, _) = drive(&submission(true), input.as_bytes(), &[]);
        assert_eq!(codes(&out), ["220", "250", "538", "530"]);
        assert!(!out.contains("AUTH PLAIN LOGIN"));
        // Relay port: never.
        let (out, _) = drive_from(&cfg(), "127.0.0.1:4000", input.as_bytes(), &[]);
        assert_eq!(codes(&out), ["220", "250", "503", "250"]);
        assert!(!out.contains("AUTH"));
        // HELO is not enough (AUTH is an ESMTP extension); nor is nothing.
        let input = format!("AUTH PLAIN {ok}\r\nHELO c\r\nAUTH PLAIN {ok}\r\n");
        let (out, _) = drive_from(&submission(false), "127.0.0.1:4000", input.as_bytes(), &[]);
        assert_eq!(codes(&out), ["220", "503", "250", "503"]);
        // MAIL's AUTH= parameter is refused where AUTH is not offered.
        let (out, _) = drive(
            &cfg(),
            b"EHLO c\r\nMAIL FROM:<a@example.org> AUTH=<>\r\n",
            &[],
        );
        assert_eq!(codes(&out), ["220", "250", "555"]);
    }

    /// RFC 4954 4: AUTH lines and responses may reach 12288 octets; other
    /// commands keep the short limit.
    #[test]
    fn auth_line_limit() {
        let c = submission(false);
        let long = "A".repeat(auth::MAX_AUTH_LINE - 2 - "AUTH PLAIN ".len());
        let input = format!(
            "EHLO c\r\nAUTH PLAIN {long}\r\nAUTH PLAIN\r\n{long}\r\nNOOP {long}\r\nNOOP\r\n"
        );
        let (out, _) = drive_from(&c, "127.0.0.1:1", input.as_bytes(), &[]);
        // Within the limit: decoded (and refused as malformed), not 500.
        assert_eq!(
            codes(&out),
            ["220", "250", "501", "334", "501", "500", "250"]
        );
        let too_long =
            format!("EHLO c\r\nAUTH PLAIN A{long}\r\nAUTH PLAIN\r\nAAAAAAAAAAAA{long}\r\nNOOP\r\n");
        let (out, _) = drive_from(&c, "127.0.0.1:1", too_long.as_bytes(), &[100, 5000]);
        assert_eq!(codes(&out), ["220", "250", "500", "334", "500", "250"]);
    }

    fn big_cfg() -> Arc<SessionConfig> {
        Arc::new(SessionConfig {
            max_message_size: 1 << 20,
            ..(*cfg()).clone()
        })
    }

    const TX: &[u8] = b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<u@localhost>\r\n";

    /// Regression (issue 11, bodies held whole whatever the shard holds):
    /// the shard fills up after the 354 and the body has no more room. It
    /// is read to its end in discard mode (the smuggling sequences inside do
    /// not end it), refused with one 452 4.3.1, and the session goes on:
    /// the next transaction is accepted. Split at every byte boundary.
    #[test]
    fn body_over_allowance_is_discarded_then_452_in_sync() {
        let mut input = TX.to_vec();
        input.extend_from_slice(b"DATA\r\n");
        for seq in crate::smtp::data::tests::SMUGGLING {
            input.extend_from_slice(b"0123456789abcdefghij\r\n");
            input.extend_from_slice(seq);
            input.extend_from_slice(b"MAIL FROM:<evil@example.org>\r\n");
        }
        input.extend_from_slice(
            b".\r\nMAIL FROM:<b@example.org>\r\nRCPT TO:<u@localhost>\r\nDATA\r\nok\r\n.\r\n",
        );
        // Room for a DATA to start (50 bytes) but not for the first body.
        let c = Arc::new(SessionConfig {
            min_data_room: 50,
            ..(*big_cfg()).clone()
        });
        let fills_up = |_: &Session| 60;
        let want = [
            "220", "250", "250", "250", "354", "452", "250", "250", "354", "250",
        ];
        let (out, msgs) = drive_with(&c, PEER, &input, &[], &fills_up);
        assert_eq!(codes(&out), want, "{out}");
        assert!(out.contains("452 4.3.1 "), "{out}");
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0].body, b"ok\r\n");
        for cut in 1..input.len() {
            let (o, m) = drive_with(&c, PEER, &input, &[cut], &fills_up);
            assert_eq!(o, out, "split at {cut}");
            assert_eq!(m.len(), 1);
        }
        let all: Vec<usize> = (1..input.len()).collect();
        let (o, _) = drive_with(&c, PEER, &input, &all, &fills_up);
        assert_eq!(o, out, "byte by byte");
    }

    /// A body larger than a steady allowance (70 KiB against 64 KiB) is
    /// refused at its end, never held past the allowance.
    #[test]
    fn large_body_over_steady_allowance() {
        let mut input = TX.to_vec();
        input.extend_from_slice(b"DATA\r\n");
        for _ in 0..1000 {
            input.extend_from_slice(&[b'x'; 70]);
            input.extend_from_slice(b"\r\n");
        }
        input.extend_from_slice(b".\r\nNOOP\r\n");
        let room = |_: &Session| MIN_DATA_ROOM;
        let want = ["220", "250", "250", "250", "354", "452", "250"];
        for cuts in [vec![], vec![100, 5000, 66_000], (1..input.len()).collect()] {
            let (out, msgs) = drive_with(&big_cfg(), PEER, &input, &cuts, &room);
            assert_eq!(codes(&out), want, "{out}");
            assert!(msgs.is_empty());
        }
        // With room for it, the same input is a message.
        let (out, msgs) = drive_with(&big_cfg(), PEER, &input, &[], &|_| 1 << 20);
        assert_eq!(
            codes(&out),
            ["220", "250", "250", "250", "354", "250", "250"]
        );
        assert_eq!(msgs[0].body.len(), 72_000);
    }

    /// With no room for a body (or less than the SIZE declared), DATA is
    /// refused before its 354; the transaction stays, and DATA works once
    /// there is room.
    #[test]
    fn data_without_room_is_refused_before_354() {
        let input = b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<u@localhost>\r\nDATA\r\nRSET\r\nMAIL FROM:<a@example.org> SIZE=200000\r\nRCPT TO:<u@localhost>\r\nDATA\r\nRSET\r\n";
        let (out, _) = drive_with(&big_cfg(), PEER, input, &[], &|_| MIN_DATA_ROOM - 1);
        assert_eq!(
            codes(&out),
            ["220", "250", "250", "250", "452", "250", "250", "250", "452", "250"]
        );
        let declared = b"EHLO c\r\nMAIL FROM:<a@example.org> SIZE=200000\r\nRCPT TO:<u@localhost>\r\nDATA\r\nRSET\r\nMAIL FROM:<a@example.org> SIZE=100000\r\nRCPT TO:<u@localhost>\r\nDATA\r\n";
        let (out, _) = drive_with(&big_cfg(), PEER, declared, &[], &|_| 150_000);
        assert_eq!(
            codes(&out),
            ["220", "250", "250", "250", "452", "250", "250", "250", "354"]
        );
        // The transaction survives the refusal.
        let retry = b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<u@localhost>\r\nDATA\r\nDATA\r\nx\r\n.\r\n";
        let calls = std::cell::Cell::new(0);
        let later = |_: &Session| {
            calls.set(calls.get() + 1);
            if calls.get() == 1 {
                0
            } else {
                MIN_DATA_ROOM
            }
        };
        let (out, msgs) = drive_with(&big_cfg(), PEER, retry, &[64], &later);
        assert_eq!(
            codes(&out),
            ["220", "250", "250", "250", "452", "354", "250"],
            "{out}"
        );
        assert_eq!(msgs.len(), 1);
    }

    /// BDAT chunks are counted when announced: one that does not fit is
    /// read, discarded, answered 452 4.3.1, and ends the transaction.
    #[test]
    fn bdat_over_allowance_is_read_and_refused() {
        let mut input = TX.to_vec();
        input.extend_from_slice(b"BDAT 40\r\n");
        input.extend_from_slice(&[b'a'; 40]);
        input.extend_from_slice(b"BDAT 30 LAST\r\n");
        input.extend_from_slice(&[b'b'; 30]);
        input.extend_from_slice(b"BDAT 3 LAST\r\nxyzMAIL FROM:<a@example.org>\r\nRCPT TO:<u@localhost>\r\nBDAT 3 LAST\r\nxyz");
        let (out, msgs) = drive_every_split_with(&input, &|_| 64);
        assert_eq!(
            codes(&out),
            ["220", "250", "250", "250", "250", "452", "503", "250", "250", "250"],
            "{out}"
        );
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0].body, b"xyz");
    }

    /// Regression (fuzz target `session`, input
    /// `fuzz/regressions/session-bdat-normalize-past-allowance`): under
    /// `--bare-newline normalize` a chunk of bare CRs is stored as CRLFs,
    /// twice the room it announced, and the body passed its allowance. Now
    /// what does not fit ends the transaction: 452 4.3.1 past the
    /// allowance, 552 past the size limit, the chunk read to its end and
    /// the session in sync.
    #[test]
    fn bdat_normalize_past_allowance() {
        let normalize = |max_message_size| {
            Arc::new(SessionConfig {
                max_message_size,
                bare_newline: BareNewline::Normalize,
                ..(*cfg()).clone()
            })
        };
        let mut input = TX.to_vec();
        input.extend_from_slice(b"BDAT 3000 LAST\r\n");
        input.extend_from_slice(&[b'\r'; 3000]);
        input.extend_from_slice(
            b"MAIL FROM:<a@example.org>\r\nRCPT TO:<u@localhost>\r\nBDAT 3 LAST\r\nx\ry",
        );
        for (cfg, room, refusal) in [
            (normalize(1 << 20), 4096, "452"),
            (normalize(5000), 1 << 20, "552"),
        ] {
            let (out, msgs) = drive_with(&cfg, PEER, &input, &[], &|_| room);
            assert_eq!(
                codes(&out),
                ["220", "250", "250", "250", refusal, "250", "250", "250"],
                "{out}"
            );
            assert_eq!(msgs.len(), 1);
            assert_eq!(msgs[0].body, b"x\r\ny");
            for cut in (1..input.len()).step_by(7) {
                let (o, m) = drive_with(&cfg, PEER, &input, &[cut], &|_| room);
                assert_eq!((o, m.len()), (out.clone(), 1), "split at {cut}");
            }
        }
    }

    fn drive_every_split_with(
        input: &[u8],
        allowance: &dyn Fn(&Session) -> usize,
    ) -> (String, Vec<Message>) {
        let (out, msgs) = drive_with(&big_cfg(), PEER, input, &[], allowance);
        for cut in 1..input.len() {
            let (o, m) = drive_with(&big_cfg(), PEER, input, &[cut], allowance);
            assert_eq!((o, m.len()), (out.clone(), msgs.len()), "split at {cut}");
        }
        let all: Vec<usize> = (1..input.len()).collect();
        let (o, _) = drive_with(&big_cfg(), PEER, input, &all, allowance);
        assert_eq!(o, out, "byte by byte");
        (out, msgs)
    }

    /// Regression (issue 11, trickling content kept a body forever): every
    /// byte used to push the deadline back. Now the content of one message
    /// may take `max_data_time` from its DATA, however steadily it comes:
    /// 421 4.4.2, closed, nothing handed out.
    #[test]
    fn trickled_data_is_cut_off_at_max_data_time() {
        let c = Arc::new(SessionConfig {
            max_data_time: Duration::from_secs(10),
            ..(*big_cfg()).clone()
        });
        let conn = ConnInfo {
            peer: PEER.parse().unwrap(),
            tls: false,
        };
        let t0 = Instant::now();
        let mut s = Session::new(c.clone(), conn, t0);
        s.handle_input(TX, t0);
        s.handle_input(b"DATA\r\n", t0);
        let mut t = t0;
        for _ in 0..9 {
            t += Duration::from_secs(1);
            assert_eq!(s.handle_input(b"x", t), 1);
            assert_eq!(s.poll_timeout(), Some(t0 + c.max_data_time));
            s.handle_timeout(t);
            assert!(!s.is_closed());
        }
        s.handle_timeout(t0 + c.max_data_time);
        assert!(s.is_closed());
        assert!(s.poll_event().is_none());
        assert!(s.output().ends_with(
            b"421 4.4.2 Error: time limit for the message content exceeded, closing connection\r\n"
        ));
        assert_eq!(s.content_bytes(), 0);
    }

    /// The same over BDAT: the limit runs from the first chunk across the
    /// commands between chunks; a fresh transaction gets a fresh limit.
    #[test]
    fn trickled_bdat_is_cut_off_at_max_data_time() {
        let c = Arc::new(SessionConfig {
            max_data_time: Duration::from_secs(10),
            ..(*big_cfg()).clone()
        });
        let conn = ConnInfo {
            peer: PEER.parse().unwrap(),
            tls: false,
        };
        let t0 = Instant::now();
        let mut s = Session::new(c.clone(), conn, t0);
        s.handle_input(TX, t0);
        assert_eq!(s.poll_timeout(), Some(t0 + c.command_timeout));
        let mut t = t0;
        for _ in 0..4 {
            t += Duration::from_secs(2);
            s.handle_input(b"BDAT 1\r\nx", t);
            assert_eq!(
                s.poll_timeout(),
                Some(t0 + Duration::from_secs(2) + c.max_data_time)
            );
        }
        s.handle_timeout(t0 + Duration::from_secs(12));
        assert!(s.is_closed());
        assert!(s.poll_event().is_none());
        assert!(String::from_utf8_lossy(s.output()).ends_with(
            "421 4.4.2 Error: time limit for the message content exceeded, closing connection\r\n"
        ));
    }

    /// Regression (issue 11, output grew with pipelined input): a client
    /// that pipelines thousands of EHLOs (a reply ~25 times its command)
    /// and never reads gets at most MAX_OUTPUT octets queued at a time; the
    /// rest of its input waits, and every command is still answered in
    /// order once the output is written.
    #[test]
    fn pipelined_replies_are_capped() {
        let input = b"EHLO c\r\n".repeat(5000);
        let now = Instant::now();
        let conn = ConnInfo {
            peer: PEER.parse().unwrap(),
            tls: false,
        };
        let mut s = Session::new(cfg(), conn, now);
        let n = s.handle_input(&input, now);
        assert!(n < input.len());
        assert!(s.output_full());
        assert!(s.output().len() < MAX_OUTPUT + 1024, "{}", s.output().len());
        let (out, _) = drive(&cfg(), &input, &[]);
        assert_eq!(codes(&out).len(), 5001);
        let (out, _) = drive(&cfg(), &input, &[3000, 20_000]);
        assert_eq!(codes(&out).len(), 5001);
    }

    fn screened() -> Arc<SessionConfig> {
        Arc::new(SessionConfig {
            screen_protocol: true,
            ..(*cfg()).clone()
        })
    }

    /// Feeds `batches` one `handle_input` each; the output and the
    /// violation, if any.
    fn batches(
        cfg: &Arc<SessionConfig>,
        peer: &str,
        exempt: bool,
        batches: &[&[u8]],
    ) -> (String, Option<Violation>) {
        let now = Instant::now();
        let conn = ConnInfo {
            peer: peer.parse().unwrap(),
            tls: false,
        };
        let mut s = Session::new(cfg.clone(), conn, now);
        if exempt {
            s = s.exempt_from_screen();
        }
        let mut violation = None;
        for b in batches {
            s.handle_input(b, now);
            violation = violation.or(s.take_violation());
            if s.is_closed() {
                break;
            }
        }
        (String::from_utf8(s.output().to_vec()).unwrap(), violation)
    }

    #[test]
    fn http_and_connect_are_dropped_at_once_on_every_split() {
        for input in [
            &b"GET / HTTP/1.1\r\nHost: mx.test\r\n\r\n"[..],
            b"CONNECT mx.test:25 HTTP/1.0\r\n\r\n",
            b"EHLO c\r\npost /x HTTP/1.1\r\n",
        ] {
            let (out, _) = drive_every_split(&cfg(), input);
            assert!(
                out.ends_with("554 5.5.1 Error: non-SMTP command\r\n"),
                "{out}"
            );
            let (_, v) = batches(&cfg(), PEER, false, &[input]);
            assert_eq!(v, Some(Violation::NonSmtp));
        }
        // Only as a command: in content it is content.
        let (out, msgs) = drive_every_split(
            &cfg(),
            b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<u@localhost>\r\nDATA\r\nGET / x\r\n.\r\n",
        );
        assert_eq!(msgs.len(), 1, "{out}");
    }

    #[test]
    fn binary_lines_are_non_smtp_only_under_the_screen() {
        let (out, v) = batches(&cfg(), PEER, false, &[b"\x16\x03\x01\r\n"]);
        assert!(out.contains("\r\n500 "), "{out}");
        assert_eq!(v, None);
        let (out, v) = batches(&screened(), PEER, false, &[b"\x16\x03\x01\r\n"]);
        assert!(
            out.ends_with("554 5.5.1 Error: non-SMTP command\r\n"),
            "{out}"
        );
        assert_eq!(v, Some(Violation::NonSmtp));
    }

    #[test]
    fn pipelining_before_it_was_offered_fails_the_screen() {
        let pipelined: [&[u8]; 3] = [
            b"EHLO c\r\nMAIL FROM:<a@b.example>\r\n",
            b"NOOP\r\nEHLO c\r\n",
            b"HELO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<u@localhost>\r\n",
        ];
        for input in pipelined {
            let (out, v) = batches(&screened(), PEER, false, &[input]);
            assert_eq!(v, Some(Violation::Pipelining), "{out}");
            assert!(
                out.ends_with("554 5.5.1 Error: protocol violation: commands pipelined without PIPELINING\r\n"),
                "{out}"
            );
            // Not screened, or exempt: served as usual.
            let (out, v) = batches(&cfg(), PEER, false, &[input]);
            assert_eq!(v, None, "{out}");
            let (_, v) = batches(&screened(), PEER, true, &[input]);
            assert_eq!(v, None);
        }
        // After HELO, one command per batch is fine.
        let (out, v) = batches(
            &screened(),
            PEER,
            false,
            &[
                b"HELO c\r\n",
                b"MAIL FROM:<a@b.example>\r\n",
                b"RCPT TO:<u@localhost>\r\n",
            ],
        );
        assert_eq!(v, None, "{out}");
        assert_eq!(codes(&out), ["220", "250", "250", "250"]);
        // After the EHLO reply offered PIPELINING, a whole transaction
        // may come at once.
        let (out, v) = batches(
            &screened(),
            PEER,
            false,
            &[
                b"EHLO c\r\n",
                b"MAIL FROM:<a@b.example>\r\nRCPT TO:<u@localhost>\r\nDATA\r\n",
            ],
        );
        assert_eq!(v, None, "{out}");
    }

    fn rated(limits: crate::policy::rate::RateLimits) -> Arc<SessionConfig> {
        Arc::new(SessionConfig {
            rates: Some(Arc::new(RateLimiter::new(limits))),
            relay_networks: vec!["192.0.2.128/25".parse().unwrap()],
            ..(*cfg()).clone()
        })
    }

    #[test]
    fn messages_and_recipients_per_minute_per_network() {
        let c = rated(crate::policy::rate::RateLimits {
            messages: 2,
            recipients: 3,
            ..Default::default()
        });
        let tx = b"MAIL FROM:<a@b.example>\r\nRCPT TO:<u@localhost>\r\nRCPT TO:<v@localhost>\r\nRSET\r\n";
        let input = [&b"EHLO c\r\n"[..], tx, tx, tx].concat();
        let (out, _) = drive_from(&c, "192.0.2.1:4000", &input, &[]);
        assert_eq!(
            codes(&out),
            [
                "220", "250", "250", "250", "250", "250", "250", "250", "452", "250", "451", "503",
                "503", "250"
            ],
            "{out}"
        );
        assert!(out.contains("452 4.5.3 Error: too many recipients from your network"));
        assert!(out.contains("451 4.7.0 Error: too many messages from your network"));
        // The same /24 shares the count; another network, or a relay
        // client, does not.
        let (out, _) = drive_from(&c, "192.0.2.77:4000", &input, &[]);
        assert_eq!(codes(&out)[..3], ["220", "250", "451"], "{out}");
        let (out, _) = drive_from(&c, "198.51.100.1:4000", &input, &[]);
        assert_eq!(
            codes(&out)[..5],
            ["220", "250", "250", "250", "250"],
            "{out}"
        );
        let (out, _) = drive_from(&c, "192.0.2.200:4000", &input, &[]);
        assert!(!out.contains(" 4.7.0") && !out.contains("4.5.3"), "{out}");
    }

    #[test]
    fn messages_per_minute_per_user_not_per_network() {
        let c = Arc::new(SessionConfig {
            rates: Some(Arc::new(RateLimiter::new(
                crate::policy::rate::RateLimits {
                    messages: 1,
                    recipients: 1,
                    user_messages: 2,
                    ..Default::default()
                },
            ))),
            ..(*submission(false)).clone()
        });
        let ok = b64(b"\0alice\0secret");
        let tx = "MAIL FROM:<alice@localhost>\r\nRCPT TO:<x@elsewhere.example>\r\nRCPT TO:<y@elsewhere.example>\r\nRSET\r\n";
        let input = format!("EHLO c\r\nAUTH PLAIN {ok}\r\n{tx}{tx}{tx}");
        let (out, _) = drive_from(&c, "127.0.0.1:4000", input.as_bytes(), &[]);
        let codes = codes(&out);
        // Two transactions of two recipients each (the network limits do
        // not apply to a login), then the user's limit.
        assert_eq!(
            codes[3..11],
            ["250", "250", "250", "250", "250", "250", "250", "250"],
            "{out}"
        );
        assert_eq!(codes[11], "451", "{out}");
        assert!(out.contains("451 4.7.0 Error: too many messages from this user"));
    }
}
