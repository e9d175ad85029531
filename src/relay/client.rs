//! The outbound SMTP client, sans-IO: replies in, commands out, one message
//! at a time over a connection that may carry several.
//!
//! [`Client::handle_reply`] takes each complete reply (see [`ReplyParser`]);
//! [`Client::poll_transmit`] hands out what to send next; when a message is
//! finished [`Client::poll_outcome`] gives one result per recipient. It knows
//! EHLO with a HELO fallback, PIPELINING (MAIL, every RCPT and DATA in one
//! write), SIZE, 8BITMIME/SMTPUTF8 rules, CHUNKING (`BDAT n LAST`) and DSN
//! parameters. No sockets and no clock here: timeouts belong to the driver.
//!
//! The next hop may be hostile or read SMTP its own way. What goes to it is
//! unambiguous ([`ContentEncoder`]: CRLF line ends only, every line-start
//! dot stuffed, no line over 998 octets); what comes back is bounded and
//! sanitised once, at the edge ([`ReplyParser`]): a reply that breaks the
//! bounds is an error, and the connection must then be closed.
//!
//! STARTTLS (RFC 3207) per [`StartTls`]: when the EHLO reply offers it, the
//! client sends `STARTTLS`; on `220` it stops and [`Client::wants_tls`] says
//! the driver must run the handshake, after which
//! [`Client::handle_tls_done`] forgets the plaintext EHLO reply (RFC 3207
//! 4.2) and sends EHLO again. STARTTLS is used at most once per connection,
//! whatever the second EHLO reply offers.

/// One complete reply from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// Every line's text after the code and separator, made safe by the
    /// parser: printable ASCII only, at most [`MAX_KEPT_TEXT`] octets each.
    pub lines: Vec<String>,
}

impl Reply {
    pub fn class(&self) -> u16 {
        self.code / 100
    }

    /// The reply as one line for logs and DSNs: `550 5.1.1 No such user`;
    /// the lines of a multi-line reply joined by ` / `, the first
    /// [`TEXT_LINES`] of them only.
    pub fn text(&self) -> String {
        let mut t = format!("{}", self.code);
        for (i, line) in self.lines.iter().take(TEXT_LINES).enumerate() {
            t.push_str(if i == 0 { " " } else { " / " });
            t.push_str(line);
        }
        if self.lines.len() > TEXT_LINES {
            t.push_str(" / ...");
        }
        t
    }
}

/// Splits server output into replies (RFC 5321 4.2.1: `ddd-text` lines until
/// a `ddd text` line). A line ends at LF (a CR before it is dropped).
/// Bounded, so that a hostile next hop cannot make the client buffer
/// without end or pass arbitrary octets on into logs and bounces: a line
/// over [`MAX_REPLY_LINE`] octets or a reply over [`MAX_REPLY_LINES`] lines
/// is an error (the connection is then closed), and the text kept of each
/// line is sanitised ([`sanitize`]) and cut at [`MAX_KEPT_TEXT`] octets.
#[derive(Debug, Default)]
pub struct ReplyParser {
    lines: Vec<String>,
    code: Option<u16>,
}

/// Longest reply line accepted, CRLF included. RFC 5321 4.5.3.1.5 says 512;
/// real servers exceed it now and then (long 5xx texts with URLs), so the
/// line is taken up to Postfix's `line_length_limit` and its text cut.
pub const MAX_REPLY_LINE: usize = 2048;
/// Most lines in one reply (an EHLO reply has about 15).
pub const MAX_REPLY_LINES: usize = 64;
/// Octets of text kept per line (RFC 5321's reply line length).
pub const MAX_KEPT_TEXT: usize = 512;
/// Lines of a reply in [`Reply::text`].
pub const TEXT_LINES: usize = 4;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    #[error("malformed reply line: {0:?}")]
    Malformed(String),
    #[error("reply line longer than {MAX_REPLY_LINE} octets")]
    LineTooLong,
    #[error("reply of more than {MAX_REPLY_LINES} lines")]
    TooManyLines,
}

impl ReplyParser {
    /// Consumes complete lines from `input`; returns bytes used and the
    /// reply, if one completed.
    pub fn feed(&mut self, input: &[u8]) -> Result<(usize, Option<Reply>), ReplyError> {
        let mut used = 0;
        while let Some(nl) = memchr::memchr(b'\n', &input[used..]) {
            if nl + 1 > MAX_REPLY_LINE {
                return Err(ReplyError::LineTooLong);
            }
            let raw = &input[used..used + nl];
            used += nl + 1;
            let line = raw.strip_suffix(b"\r").unwrap_or(raw);
            let code = line
                .get(..3)
                .filter(|c| c.iter().all(u8::is_ascii_digit))
                .map(|c| c.iter().fold(0u16, |n, d| n * 10 + u16::from(d - b'0')))
                .filter(|c| (200..600).contains(c))
                .ok_or_else(|| ReplyError::Malformed(sanitize(line, MAX_KEPT_TEXT)))?;
            if self.code.is_some_and(|c| c != code) {
                return Err(ReplyError::Malformed(sanitize(line, MAX_KEPT_TEXT)));
            }
            if self.lines.len() >= MAX_REPLY_LINES {
                return Err(ReplyError::TooManyLines);
            }
            self.code = Some(code);
            let sep = line.get(3).copied();
            self.lines
                .push(sanitize(line.get(4..).unwrap_or(b""), MAX_KEPT_TEXT));
            match sep {
                Some(b'-') => continue,
                None | Some(b' ') => {
                    self.code = None;
                    let reply = Reply {
                        code,
                        lines: std::mem::take(&mut self.lines),
                    };
                    return Ok((used, Some(reply)));
                }
                Some(_) => return Err(ReplyError::Malformed(sanitize(line, MAX_KEPT_TEXT))),
            }
        }
        if input.len() - used >= MAX_REPLY_LINE {
            return Err(ReplyError::LineTooLong);
        }
        Ok((used, None))
    }
}

/// `text` as printable ASCII: a tab becomes a space, every other octet
/// outside 0x20..=0x7e (CR, LF, NUL, 8-bit) becomes `\xNN`, and the result
/// is cut at `max` octets (ending in `...` when cut). Safe to put in a log
/// line, a header field or a bounce: nothing in it can end a line.
pub fn sanitize(text: &[u8], max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max));
    for &b in text {
        let before = out.len();
        match b {
            b'\t' => out.push(' '),
            0x20..=0x7e => out.push(char::from(b)),
            _ => out.push_str(&format!("\\x{b:02X}")),
        }
        if out.len() > max {
            out.truncate(before.min(max.saturating_sub(3)));
            out.push_str("...");
            break;
        }
    }
    out
}

/// What the server said it supports, from the EHLO reply.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Features {
    pub esmtp: bool,
    pub pipelining: bool,
    pub size: Option<u64>,
    pub eightbitmime: bool,
    pub smtputf8: bool,
    pub chunking: bool,
    pub dsn: bool,
    pub starttls: bool,
}

impl Features {
    fn from_ehlo(r: &Reply) -> Features {
        let mut f = Features {
            esmtp: true,
            ..Features::default()
        };
        for line in r.lines.iter().skip(1) {
            let mut words = line.split_ascii_whitespace();
            let kw = words.next().unwrap_or("").to_ascii_uppercase();
            match kw.as_str() {
                "PIPELINING" => f.pipelining = true,
                "SIZE" => f.size = words.next().and_then(|n| n.parse().ok()).filter(|&n| n > 0),
                "8BITMIME" => f.eightbitmime = true,
                "SMTPUTF8" => f.smtputf8 = true,
                "CHUNKING" => f.chunking = true,
                "DSN" => f.dsn = true,
                "STARTTLS" => f.starttls = true,
                _ => {}
            }
        }
        f
    }
}

/// One recipient of the message being sent, with its DSN parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRcpt {
    pub addr: String,
    /// `NOTIFY=` value, passed on when the server offers DSN.
    pub notify: Option<String>,
    pub orcpt: Option<String>,
}

/// One message to send.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Job {
    /// `None` is the null reverse-path.
    pub mail_from: Option<String>,
    pub rcpts: Vec<JobRcpt>,
    /// Content with CRLF line ends (as stored), not dot-stuffed.
    pub body: Vec<u8>,
    pub smtputf8: bool,
    /// `RET=` and `ENVID=`, passed on when the server offers DSN.
    pub ret: Option<String>,
    pub envid: Option<String>,
}

/// What happened to one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RcptOutcome {
    Delivered(Reply),
    /// 4xx or a connection problem: try again later.
    Deferred(String),
    /// 5xx: give up, tell the sender.
    Failed(String),
}

/// Whether this connection uses STARTTLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartTls {
    /// Never (TLS off, or the plaintext retry after a failed handshake).
    Off,
    /// When offered; a refusal (4xx/5xx) goes on in plaintext.
    Opportunistic,
    /// Mandatory: not offered or refused is [`ConnError::TlsUnavailable`].
    Required,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Banner,
    Ehlo,
    Helo,
    /// `STARTTLS` sent; waiting for its 220.
    StartTls,
    /// The 220 came: the driver runs the handshake, then
    /// [`Client::handle_tls_done`].
    TlsWanted,
    /// Greeted; waiting for a job (or QUIT).
    Idle,
    Mail,
    Rcpt(usize),
    Data,
    /// Content sent; waiting for the final reply.
    DataDone,
    Rset,
    Quit,
    Closed,
}

/// What the next reply answers, for choosing its timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Awaiting {
    /// The 220 greeting (RFC 5321 4.5.3.2.1: 5 minutes).
    Banner,
    /// A command: EHLO, MAIL, RCPT, DATA, RSET, QUIT (5 minutes; 2 for the
    /// 354 to DATA).
    Command,
    /// The reply after the content, `.` or `BDAT LAST` (10 minutes: the
    /// server may be processing the message).
    Final,
}

/// Why the connection cannot carry (more) mail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnError {
    /// The greeting or EHLO/HELO was refused; `permanent` for 5xx.
    Refused {
        reply: String,
        permanent: bool,
    },
    Protocol(String),
    /// `--tls-policy require` and no TLS: STARTTLS not offered (or only
    /// HELO), or refused. Always temporary: the message waits for a retry.
    TlsUnavailable(String),
}

pub struct Client {
    helo_name: String,
    starttls: StartTls,
    /// The TLS handshake is done: no second STARTTLS.
    tls: bool,
    phase: Phase,
    features: Features,
    out: Vec<u8>,
    job: Option<Job>,
    /// Replies to RCPT: `Some(Ok)` accepted, `Some(Err)` refused.
    rcpt_replies: Vec<Option<Result<(), Reply>>>,
    /// Replies still expected for commands already sent (pipelining).
    pending: std::collections::VecDeque<Phase>,
    outcome: Option<Vec<RcptOutcome>>,
    error: Option<ConnError>,
}

impl Client {
    pub fn new(helo_name: &str) -> Self {
        Self {
            helo_name: helo_name.to_owned(),
            starttls: StartTls::Off,
            tls: false,
            phase: Phase::Banner,
            features: Features::default(),
            out: Vec::new(),
            job: None,
            rcpt_replies: Vec::new(),
            pending: Default::default(),
            outcome: None,
            error: None,
        }
    }

    /// Uses STARTTLS as `mode` says (the default is [`StartTls::Off`]).
    pub fn with_starttls(mut self, mode: StartTls) -> Self {
        self.starttls = mode;
        self
    }

    pub fn features(&self) -> &Features {
        &self.features
    }

    /// Ready to take a message with [`Client::start`].
    pub fn is_idle(&self) -> bool {
        self.phase == Phase::Idle && self.job.is_none()
    }

    pub fn is_closed(&self) -> bool {
        self.phase == Phase::Closed
    }

    /// The server said 220 to STARTTLS: the driver must discard anything
    /// it has buffered, run the TLS handshake, then call
    /// [`Client::handle_tls_done`] (or drop the connection if it failed).
    pub fn wants_tls(&self) -> bool {
        self.phase == Phase::TlsWanted
    }

    /// The connection runs over TLS.
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// The handshake succeeded: start over with EHLO (RFC 3207 4.2: what
    /// the server said before TLS no longer counts).
    pub fn handle_tls_done(&mut self) {
        if self.phase != Phase::TlsWanted {
            return;
        }
        self.tls = true;
        self.features = Features::default();
        self.pending.clear();
        self.command(&format!("EHLO {}", self.helo_name), Phase::Ehlo);
        self.phase = Phase::Ehlo;
    }

    pub fn error(&self) -> Option<&ConnError> {
        self.error.as_ref()
    }

    /// Which reply the client waits for next, for the driver's timeout
    /// (RFC 5321 4.5.3.2 gives each its own).
    pub fn awaiting(&self) -> Awaiting {
        match self.pending.front().copied().unwrap_or(self.phase) {
            Phase::Banner => Awaiting::Banner,
            Phase::DataDone => Awaiting::Final,
            _ => Awaiting::Command,
        }
    }

    /// Bytes to write now (commands, or content after a 354).
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        (!self.out.is_empty()).then(|| std::mem::take(&mut self.out))
    }

    /// Per-recipient results of the finished message, in job order.
    pub fn poll_outcome(&mut self) -> Option<Vec<RcptOutcome>> {
        self.outcome.take()
    }

    /// Starts sending a message. Returns it back if the client is not idle,
    /// or decides at once (e.g. 8-bit content to a 7-bit server).
    pub fn start(&mut self, job: Job) -> Result<(), Box<Job>> {
        if !self.is_idle() {
            return Err(Box::new(job));
        }
        let eight_bit = job.body.iter().any(|&b| b >= 0x80);
        let refuse = |why: &str| {
            Some(
                job.rcpts
                    .iter()
                    .map(|_| RcptOutcome::Failed(why.to_owned()))
                    .collect::<Vec<_>>(),
            )
        };
        // RFC 6152 3 / RFC 6531 3.4: no downgrade here, the message bounces.
        let refusal = if eight_bit && !self.features.eightbitmime {
            refuse("554 5.6.3 8-bit content, and the receiving server does not offer 8BITMIME")
        } else if job.smtputf8 && !self.features.smtputf8 {
            refuse("553 5.6.7 SMTPUTF8 message, and the receiving server does not offer SMTPUTF8")
        } else if self
            .features
            .size
            .is_some_and(|max| job.body.len() as u64 > max)
        {
            refuse("552 5.3.4 message larger than the receiving server's SIZE limit")
        } else {
            None
        };
        if let Some(o) = refusal {
            self.outcome = Some(o);
            return Ok(());
        }
        let mut cmd = format!("MAIL FROM:<{}>", job.mail_from.as_deref().unwrap_or(""));
        if self.features.size.is_some() {
            cmd.push_str(&format!(" SIZE={}", job.body.len()));
        }
        if eight_bit {
            cmd.push_str(" BODY=8BITMIME");
        }
        if job.smtputf8 {
            cmd.push_str(" SMTPUTF8");
        }
        if self.features.dsn {
            if let Some(ret) = &job.ret {
                cmd.push_str(&format!(" RET={ret}"));
            }
            if let Some(envid) = &job.envid {
                cmd.push_str(&format!(" ENVID={envid}"));
            }
        }
        self.command(&cmd, Phase::Mail);
        self.rcpt_replies = vec![None; job.rcpts.len()];
        self.job = Some(job);
        if self.features.pipelining {
            // RFC 2920: MAIL, every RCPT and DATA (not BDAT) in one write.
            for i in 0..self.rcpt_replies.len() {
                self.send_rcpt(i);
            }
            if !self.features.chunking {
                self.command("DATA", Phase::Data);
            }
        }
        self.phase = Phase::Mail;
        Ok(())
    }

    /// Ends the session politely.
    pub fn quit(&mut self) {
        if !matches!(self.phase, Phase::Quit | Phase::Closed) {
            self.command("QUIT", Phase::Quit);
            self.phase = Phase::Quit;
        }
    }

    /// The connection broke: the message in flight, if any, is deferred.
    pub fn handle_close(&mut self, why: &str) {
        if let Some(job) = self.job.take() {
            self.outcome = Some(
                job.rcpts
                    .iter()
                    .map(|_| RcptOutcome::Deferred(format!("connection lost: {why}")))
                    .collect(),
            );
        }
        self.phase = Phase::Closed;
    }

    pub fn handle_reply(&mut self, r: Reply) {
        let expecting = self.pending.pop_front().unwrap_or(self.phase);
        match expecting {
            Phase::Banner => {
                if r.code == 220 {
                    self.command(&format!("EHLO {}", self.helo_name), Phase::Ehlo);
                } else {
                    self.fail_conn(&r);
                }
            }
            Phase::Ehlo => {
                if r.class() == 2 {
                    self.features = Features::from_ehlo(&r);
                    self.greeted();
                } else if r.class() == 5 {
                    // RFC 5321 4.1.4: fall back to HELO.
                    self.command(&format!("HELO {}", self.helo_name), Phase::Helo);
                } else {
                    self.fail_conn(&r);
                }
            }
            Phase::Helo => {
                if r.class() == 2 {
                    self.features = Features::default();
                    self.greeted();
                } else {
                    self.fail_conn(&r);
                }
            }
            Phase::StartTls => {
                if r.code == 220 {
                    self.phase = Phase::TlsWanted;
                } else if self.starttls == StartTls::Required {
                    self.fail_tls(format!("STARTTLS refused: {}", r.text()));
                } else {
                    // RFC 3207 4: the session goes on, in plaintext, with
                    // what the EHLO reply said (never STARTTLS again).
                    self.features.starttls = false;
                    self.phase = Phase::Idle;
                }
            }
            Phase::TlsWanted => {
                // Nothing may arrive between the 220 and the handshake.
                self.error = Some(ConnError::Protocol(format!(
                    "unexpected reply before the TLS handshake: {}",
                    r.text()
                )));
                self.phase = Phase::Closed;
            }
            Phase::Mail => {
                if r.class() != 2 {
                    // Every recipient shares the MAIL refusal; replies to
                    // pipelined RCPTs and DATA still arrive and are skipped.
                    self.finish_all(&r);
                    return;
                }
                if !self.features.pipelining {
                    self.send_rcpt(0);
                }
            }
            Phase::Rcpt(i) => {
                if let Some(slot) = self.rcpt_replies.get_mut(i) {
                    *slot = Some(if r.class() == 2 { Ok(()) } else { Err(r) });
                }
                let n = self.rcpt_replies.len();
                let last = i + 1 == n;
                if !self.features.pipelining {
                    if !last {
                        self.send_rcpt(i + 1);
                    } else if self.any_accepted() {
                        self.send_content_command();
                    } else {
                        self.finish_rcpts_only();
                    }
                } else if last && self.features.chunking {
                    if self.any_accepted() {
                        self.send_content_command();
                    } else {
                        self.finish_rcpts_only();
                    }
                }
            }
            Phase::Data => {
                if r.code == 354 {
                    if self.any_accepted() {
                        let body = self
                            .job
                            .as_ref()
                            .map(|j| ContentEncoder::encode_all(Framing::Data, &j.body))
                            .unwrap_or_default();
                        self.out.extend_from_slice(&body);
                        self.out.extend_from_slice(b".\r\n");
                        self.pending.push_back(Phase::DataDone);
                        self.phase = Phase::DataDone;
                    } else {
                        // Pipelined DATA got 354 although every RCPT
                        // failed: send an empty message end, ignore it.
                        self.out.extend_from_slice(b".\r\n");
                        self.pending.push_back(Phase::Rset);
                        self.finish_rcpts_only();
                    }
                } else if self.phase != Phase::Idle {
                    if self.any_accepted() {
                        self.finish_all(&r);
                    } else {
                        self.finish_rcpts_only();
                    }
                }
            }
            Phase::DataDone => self.finish_accepted(&r),
            Phase::Rset | Phase::Idle => {}
            Phase::Quit => self.phase = Phase::Closed,
            Phase::Closed => {}
        }
    }

    fn any_accepted(&self) -> bool {
        self.rcpt_replies.iter().any(|r| matches!(r, Some(Ok(()))))
    }

    fn send_rcpt(&mut self, i: usize) {
        let Some(job) = &self.job else { return };
        let Some(rcpt) = job.rcpts.get(i) else { return };
        let mut cmd = format!("RCPT TO:<{}>", rcpt.addr);
        if self.features.dsn {
            if let Some(n) = &rcpt.notify {
                cmd.push_str(&format!(" NOTIFY={n}"));
            }
            if let Some(o) = &rcpt.orcpt {
                cmd.push_str(&format!(" ORCPT={o}"));
            }
        }
        self.command(&cmd, Phase::Rcpt(i));
        self.phase = Phase::Rcpt(i);
    }

    /// DATA, or the content at once as one `BDAT n LAST` chunk.
    fn send_content_command(&mut self) {
        if self.features.chunking {
            let Some(job) = &self.job else { return };
            let body = ContentEncoder::encode_all(Framing::Bdat, &job.body);
            let head = format!("BDAT {} LAST\r\n", body.len());
            self.out.extend_from_slice(head.as_bytes());
            self.out.extend_from_slice(&body);
            self.pending.push_back(Phase::DataDone);
            self.phase = Phase::DataDone;
        } else {
            self.command("DATA", Phase::Data);
            self.phase = Phase::Data;
        }
    }

    fn command(&mut self, cmd: &str, expect: Phase) {
        self.out.extend_from_slice(cmd.as_bytes());
        self.out.extend_from_slice(b"\r\n");
        self.pending.push_back(expect);
    }

    /// MAIL or DATA was refused: the same outcome for everyone.
    fn finish_all(&mut self, r: &Reply) {
        let Some(job) = self.job.take() else { return };
        let o = outcome_of(r);
        self.outcome = Some(job.rcpts.iter().map(|_| o.clone()).collect());
        self.reset_after();
    }

    /// No recipient was accepted: each keeps its RCPT reply.
    fn finish_rcpts_only(&mut self) {
        let Some(job) = self.job.take() else { return };
        let replies = std::mem::take(&mut self.rcpt_replies);
        self.outcome = Some(
            job.rcpts
                .iter()
                .zip(replies)
                .map(|(_, r)| match r {
                    Some(Err(r)) => outcome_of(&r),
                    _ => RcptOutcome::Deferred("no reply to RCPT".into()),
                })
                .collect(),
        );
        self.reset_after();
    }

    /// The final reply to the content: it applies to accepted recipients;
    /// refused ones keep their RCPT reply.
    fn finish_accepted(&mut self, r: &Reply) {
        let Some(job) = self.job.take() else { return };
        let replies = std::mem::take(&mut self.rcpt_replies);
        let final_outcome = if r.class() == 2 {
            RcptOutcome::Delivered(r.clone())
        } else {
            outcome_of(r)
        };
        self.outcome = Some(
            job.rcpts
                .iter()
                .zip(replies)
                .map(|(_, rr)| match rr {
                    Some(Ok(())) => final_outcome.clone(),
                    Some(Err(e)) => outcome_of(&e),
                    None => RcptOutcome::Deferred("no reply to RCPT".into()),
                })
                .collect(),
        );
        self.phase = Phase::Idle;
    }

    /// After a failed transaction, RSET so the connection can carry the next.
    fn reset_after(&mut self) {
        self.command("RSET", Phase::Rset);
        self.phase = Phase::Idle;
    }

    /// EHLO or HELO answered: STARTTLS first if policy and offer say so.
    fn greeted(&mut self) {
        let offered = self.features.starttls;
        match self.starttls {
            _ if self.tls => self.phase = Phase::Idle,
            StartTls::Off => self.phase = Phase::Idle,
            StartTls::Opportunistic | StartTls::Required if offered => {
                self.command("STARTTLS", Phase::StartTls);
                self.phase = Phase::StartTls;
            }
            StartTls::Opportunistic => self.phase = Phase::Idle,
            StartTls::Required => self.fail_tls("the server does not offer STARTTLS".into()),
        }
    }

    fn fail_tls(&mut self, why: String) {
        self.error = Some(ConnError::TlsUnavailable(why));
        self.quit();
    }

    fn fail_conn(&mut self, r: &Reply) {
        self.error = Some(ConnError::Refused {
            reply: r.text(),
            permanent: r.class() == 5,
        });
        self.quit();
    }
}

fn outcome_of(r: &Reply) -> RcptOutcome {
    if r.class() == 5 {
        RcptOutcome::Failed(r.text())
    } else {
        RcptOutcome::Deferred(r.text())
    }
}

/// Longest line the client sends, without its CRLF and counting a
/// stuffing dot: 998 (RFC 5322 2.1.1; RFC 5321 4.5.3.1.6's 1000 with CRLF).
pub const MAX_LINE: usize = 998;

/// How content is framed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// After DATA: a dot is stuffed in front of every line that starts with
    /// one (RFC 5321 4.5.2); the caller sends `.<CRLF>` after the content.
    Data,
    /// In a BDAT chunk: counted, nothing stuffed.
    Bdat,
}

/// Turns stored content into what goes on the wire, so that the next hop
/// can read it only one way, whatever it does with bare line ends:
///
/// * every line end is CRLF: a bare CR, a bare LF and CRLF each become
///   one CRLF (content stored before bare line ends were normalised, or
///   from a BDAT, may hold them);
/// * under [`Framing::Data`] a dot is stuffed after every line break, so
///   the only `<CRLF>.<CRLF>` sent is the end of the content;
/// * no line is longer than [`MAX_LINE`] octets: a longer header line is
///   folded (RFC 5322 2.2.3) before its last space or tab that fits, which
///   unfolds to the same field; one without whitespace, and a long body
///   line, get `<CRLF><SPACE>` inserted, as Postfix's
///   `smtp_line_length_limit` does (the space keeps a continuation from
///   looking like a MIME boundary, a header or a dot line);
/// * the content ends with CRLF.
///
/// Sans-IO and incremental: [`ContentEncoder::encode`] may be given the
/// content in pieces split anywhere (a CR and its LF in two pieces
/// included); [`ContentEncoder::finish`] ends it. Memory: one header line
/// (at most [`MAX_LINE`] octets) is held to find where to fold it.
#[derive(Debug, Clone)]
pub struct ContentEncoder {
    framing: Framing,
    /// The last octet was a CR, already written as a line end: an LF right
    /// after it belongs to it.
    after_cr: bool,
    /// No empty line yet: lines are header lines, folded at whitespace.
    header: bool,
    /// The current header line, held until it ends.
    line: Vec<u8>,
    /// Octets of the current body line on the wire so far (a stuffing
    /// dot included).
    body_len: usize,
}

impl ContentEncoder {
    pub fn new(framing: Framing) -> Self {
        Self {
            framing,
            after_cr: false,
            header: true,
            line: Vec::new(),
            body_len: 0,
        }
    }

    /// The whole of `content`, encoded.
    pub fn encode_all(framing: Framing, content: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(content.len() + content.len() / 64 + 2);
        let mut enc = ContentEncoder::new(framing);
        enc.encode(content, &mut out);
        enc.finish(&mut out);
        out
    }

    /// Encodes the next piece of content onto `out`.
    pub fn encode(&mut self, mut input: &[u8], out: &mut Vec<u8>) {
        while !input.is_empty() {
            if std::mem::take(&mut self.after_cr) && input[0] == b'\n' {
                input = &input[1..];
                continue;
            }
            let eol = memchr::memchr2(b'\r', b'\n', input);
            let run = &input[..eol.unwrap_or(input.len())];
            if self.header {
                self.header_run(run, out);
            } else {
                self.body_run(run, out);
            }
            let Some(at) = eol else { break };
            self.end_line(out);
            self.after_cr = input[at] == b'\r';
            input = &input[at + 1..];
        }
    }

    /// Ends the content: an unfinished last line gets its CRLF.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if (self.header && !self.line.is_empty()) || (!self.header && self.body_len > 0) {
            self.end_line(out);
        }
    }

    fn end_line(&mut self, out: &mut Vec<u8>) {
        if self.header {
            if self.line.is_empty() {
                // The empty line: the body follows.
                self.header = false;
            } else {
                self.write_header_line(out);
            }
        }
        self.body_len = 0;
        out.extend_from_slice(b"\r\n");
    }

    fn header_run(&mut self, run: &[u8], out: &mut Vec<u8>) {
        for &b in run {
            if self.wire_len() >= MAX_LINE {
                self.fold(out);
            }
            self.line.push(b);
        }
    }

    /// Writes the held header line without its CRLF and forgets it.
    fn write_header_line(&mut self, out: &mut Vec<u8>) {
        if self.stuffed() {
            out.push(b'.');
        }
        out.extend_from_slice(&self.line);
        self.line.clear();
    }

    /// The held header line is as long as a line may be and goes on: it
    /// is cut before its last whitespace (that has something else before
    /// it), which begins the continuation; else after its last octet, with
    /// a space to begin the continuation.
    fn fold(&mut self, out: &mut Vec<u8>) {
        let is_wsp = |b: &u8| *b == b' ' || *b == b'\t';
        let first_text = self.line.iter().position(|b| !is_wsp(b));
        let at =
            first_text.and_then(|first| self.line.iter().rposition(is_wsp).filter(|&p| p > first));
        match at {
            Some(p) => {
                let rest = self.line.split_off(p);
                self.write_header_line(out);
                self.line = rest;
            }
            None => {
                self.write_header_line(out);
                self.line.push(b' ');
            }
        }
        out.extend_from_slice(b"\r\n");
    }

    fn stuffed(&self) -> bool {
        self.framing == Framing::Data && self.line.first() == Some(&b'.')
    }

    fn wire_len(&self) -> usize {
        self.line.len() + usize::from(self.stuffed())
    }

    fn body_run(&mut self, mut run: &[u8], out: &mut Vec<u8>) {
        while !run.is_empty() {
            if self.body_len >= MAX_LINE {
                out.extend_from_slice(b"\r\n ");
                self.body_len = 1;
            }
            if self.body_len == 0 && self.framing == Framing::Data && run[0] == b'.' {
                out.push(b'.');
                self.body_len = 1;
            }
            let take = run.len().min(MAX_LINE - self.body_len);
            out.extend_from_slice(&run[..take]);
            self.body_len += take;
            run = &run[take..];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(s: &str) -> Reply {
        let mut p = ReplyParser::default();
        let (_, r) = p.feed(s.as_bytes()).unwrap();
        r.unwrap()
    }

    fn job(n: usize, body: &[u8]) -> Job {
        Job {
            mail_from: Some("a@example.org".into()),
            rcpts: (0..n)
                .map(|i| JobRcpt {
                    addr: format!("r{i}@example.net"),
                    notify: Some("FAILURE".into()),
                    orcpt: None,
                })
                .collect(),
            body: body.to_vec(),
            smtputf8: false,
            ret: None,
            envid: None,
        }
    }

    fn sent(c: &mut Client) -> String {
        String::from_utf8(c.poll_transmit().unwrap_or_default()).unwrap()
    }

    #[test]
    fn reply_parser_multiline_and_split() {
        let mut p = ReplyParser::default();
        let all = b"250-mx.example\r\n250-PIPELINING\r\n250 SIZE 100\r\n220 x\r\n";
        let (n, r) = p.feed(&all[..10]).unwrap();
        assert_eq!((n, r), (0, None));
        let (n, r) = p.feed(all).unwrap();
        let r = r.unwrap();
        assert_eq!(r.code, 250);
        assert_eq!(r.lines, ["mx.example", "PIPELINING", "SIZE 100"]);
        assert_eq!(&all[n..], b"220 x\r\n");
        assert!(p.feed(b"hello\r\n").is_err());
        assert!(ReplyParser::default().feed(b"250-a\r\n251 b\r\n").is_err());
    }

    #[test]
    fn pipelined_transaction_with_partial_refusal() {
        let mut c = Client::new("relay.test");
        c.handle_reply(reply("220 mx ESMTP\r\n"));
        assert_eq!(sent(&mut c), "EHLO relay.test\r\n");
        c.handle_reply(reply(
            "250-mx\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-DSN\r\n250 SIZE 1000\r\n",
        ));
        assert!(c.is_idle());
        c.start(job(3, b"Subject: x\r\n\r\n.dot\r\n")).unwrap();
        assert_eq!(
            sent(&mut c),
            "MAIL FROM:<a@example.org> SIZE=20\r\nRCPT TO:<r0@example.net> NOTIFY=FAILURE\r\nRCPT TO:<r1@example.net> NOTIFY=FAILURE\r\nRCPT TO:<r2@example.net> NOTIFY=FAILURE\r\nDATA\r\n"
        );
        c.handle_reply(reply("250 ok\r\n"));
        c.handle_reply(reply("250 ok\r\n"));
        c.handle_reply(reply("550 5.1.1 no such user\r\n"));
        c.handle_reply(reply("451 4.3.0 later\r\n"));
        c.handle_reply(reply("354 go\r\n"));
        assert_eq!(sent(&mut c), "Subject: x\r\n\r\n..dot\r\n.\r\n");
        c.handle_reply(reply("250 2.0.0 queued\r\n"));
        let o = c.poll_outcome().unwrap();
        assert!(matches!(o[0], RcptOutcome::Delivered(_)));
        assert_eq!(o[1], RcptOutcome::Failed("550 5.1.1 no such user".into()));
        assert_eq!(o[2], RcptOutcome::Deferred("451 4.3.0 later".into()));
        assert!(c.is_idle());
    }

    #[test]
    fn each_wait_is_named_for_its_timeout() {
        let mut c = Client::new("relay.test");
        assert_eq!(c.awaiting(), Awaiting::Banner);
        c.handle_reply(reply("220 mx ESMTP\r\n"));
        sent(&mut c);
        assert_eq!(c.awaiting(), Awaiting::Command, "EHLO");
        c.handle_reply(reply("250-mx\r\n250 PIPELINING\r\n"));
        c.start(job(1, b"x\r\n")).unwrap();
        sent(&mut c);
        assert_eq!(c.awaiting(), Awaiting::Command, "MAIL, RCPT, DATA");
        c.handle_reply(reply("250 ok\r\n"));
        c.handle_reply(reply("250 ok\r\n"));
        assert_eq!(c.awaiting(), Awaiting::Command, "the 354");
        c.handle_reply(reply("354 go\r\n"));
        sent(&mut c);
        assert_eq!(c.awaiting(), Awaiting::Final, "after the content");
        c.handle_reply(reply("250 queued\r\n"));
        c.poll_outcome().unwrap();
        // With CHUNKING the last chunk's reply is the final one too.
        let mut c = Client::new("relay.test");
        c.handle_reply(reply("220 mx ESMTP\r\n"));
        c.handle_reply(reply("250-mx\r\n250-PIPELINING\r\n250 CHUNKING\r\n"));
        c.start(job(1, b"x\r\n")).unwrap();
        c.handle_reply(reply("250 ok\r\n"));
        assert_eq!(c.awaiting(), Awaiting::Command, "RCPT");
        c.handle_reply(reply("250 ok\r\n"));
        assert_eq!(c.awaiting(), Awaiting::Final, "BDAT LAST");
    }

    #[test]
    fn helo_fallback_and_lockstep() {
        let mut c = Client::new("relay.test");
        c.handle_reply(reply("220 old\r\n"));
        sent(&mut c);
        c.handle_reply(reply("502 what\r\n"));
        assert_eq!(sent(&mut c), "HELO relay.test\r\n");
        c.handle_reply(reply("250 old\r\n"));
        c.start(job(2, b"x\r\n")).unwrap();
        assert_eq!(sent(&mut c), "MAIL FROM:<a@example.org>\r\n");
        c.handle_reply(reply("250 ok\r\n"));
        assert_eq!(sent(&mut c), "RCPT TO:<r0@example.net>\r\n");
        c.handle_reply(reply("550 no\r\n"));
        assert_eq!(sent(&mut c), "RCPT TO:<r1@example.net>\r\n");
        c.handle_reply(reply("550 no\r\n"));
        // Nobody accepted: no DATA, an RSET, and both refusals reported.
        assert_eq!(sent(&mut c), "RSET\r\n");
        let o = c.poll_outcome().unwrap();
        assert!(o.iter().all(|x| matches!(x, RcptOutcome::Failed(_))));
    }

    #[test]
    fn eight_bit_to_seven_bit_server_bounces() {
        let mut c = Client::new("relay.test");
        c.handle_reply(reply("220 x\r\n"));
        sent(&mut c);
        c.handle_reply(reply("250-x\r\n250 PIPELINING\r\n"));
        c.start(job(1, b"caf\xc3\xa9\r\n")).unwrap();
        assert_eq!(c.poll_transmit(), None);
        let o = c.poll_outcome().unwrap();
        assert!(matches!(&o[0], RcptOutcome::Failed(t) if t.contains("8BITMIME")));
    }

    #[test]
    fn chunking_sends_bdat_last() {
        let mut c = Client::new("relay.test");
        c.handle_reply(reply("220 x\r\n"));
        sent(&mut c);
        c.handle_reply(reply("250-x\r\n250-PIPELINING\r\n250 CHUNKING\r\n"));
        c.start(job(1, b"a\r\n.\r\n")).unwrap();
        assert_eq!(
            sent(&mut c),
            "MAIL FROM:<a@example.org>\r\nRCPT TO:<r0@example.net>\r\n"
        );
        c.handle_reply(reply("250 ok\r\n"));
        c.handle_reply(reply("250 ok\r\n"));
        assert_eq!(sent(&mut c), "BDAT 6 LAST\r\na\r\n.\r\n");
        c.handle_reply(reply("250 ok\r\n"));
        assert!(matches!(
            c.poll_outcome().unwrap()[0],
            RcptOutcome::Delivered(_)
        ));
    }

    #[test]
    fn starttls_when_offered_then_ehlo_again_and_never_twice() {
        let mut c = Client::new("relay.test").with_starttls(StartTls::Opportunistic);
        c.handle_reply(reply("220 mx\r\n"));
        assert_eq!(sent(&mut c), "EHLO relay.test\r\n");
        c.handle_reply(reply("250-mx\r\n250-PIPELINING\r\n250 STARTTLS\r\n"));
        assert_eq!(sent(&mut c), "STARTTLS\r\n");
        assert!(!c.is_idle() && !c.wants_tls());
        c.handle_reply(reply("220 2.0.0 go ahead\r\n"));
        assert!(c.wants_tls());
        assert_eq!(
            c.poll_transmit(),
            None,
            "nothing is sent before the handshake"
        );
        c.handle_tls_done();
        assert!(c.is_tls());
        assert_eq!(
            c.features(),
            &Features::default(),
            "plaintext EHLO forgotten"
        );
        assert_eq!(sent(&mut c), "EHLO relay.test\r\n");
        // A server that offers STARTTLS again under TLS is not obeyed.
        c.handle_reply(reply("250-mx\r\n250-8BITMIME\r\n250 STARTTLS\r\n"));
        assert!(c.is_idle());
        assert_eq!(c.poll_transmit(), None);
        assert!(c.features().eightbitmime);
    }

    #[test]
    fn opportunistic_starttls_refused_goes_on_in_plaintext() {
        let mut c = Client::new("relay.test").with_starttls(StartTls::Opportunistic);
        c.handle_reply(reply("220 mx\r\n"));
        sent(&mut c);
        c.handle_reply(reply("250-mx\r\n250-PIPELINING\r\n250 STARTTLS\r\n"));
        assert_eq!(sent(&mut c), "STARTTLS\r\n");
        c.handle_reply(reply("454 4.7.0 TLS not available\r\n"));
        assert!(c.is_idle());
        assert!(c.error().is_none());
        assert!(c.features().pipelining, "the EHLO reply still counts");
        // Not offered at all: plaintext at once.
        let mut c = Client::new("relay.test").with_starttls(StartTls::Opportunistic);
        c.handle_reply(reply("220 mx\r\n"));
        sent(&mut c);
        c.handle_reply(reply("250-mx\r\n250 PIPELINING\r\n"));
        assert!(c.is_idle());
        assert_eq!(c.poll_transmit(), None);
    }

    #[test]
    fn required_tls_without_offer_or_after_refusal_is_an_error() {
        for ehlo in ["250-mx\r\n250 PIPELINING\r\n", "250 mx\r\n"] {
            let mut c = Client::new("relay.test").with_starttls(StartTls::Required);
            c.handle_reply(reply("220 mx\r\n"));
            sent(&mut c);
            c.handle_reply(reply(ehlo));
            assert!(matches!(c.error(), Some(ConnError::TlsUnavailable(_))));
            assert_eq!(sent(&mut c), "QUIT\r\n");
        }
        let mut c = Client::new("relay.test").with_starttls(StartTls::Required);
        c.handle_reply(reply("220 mx\r\n"));
        sent(&mut c);
        c.handle_reply(reply("502 no EHLO\r\n"));
        assert_eq!(sent(&mut c), "HELO relay.test\r\n");
        c.handle_reply(reply("250 old\r\n"));
        assert!(matches!(c.error(), Some(ConnError::TlsUnavailable(_))));
        let mut c = Client::new("relay.test").with_starttls(StartTls::Required);
        c.handle_reply(reply("220 mx\r\n"));
        sent(&mut c);
        c.handle_reply(reply("250-mx\r\n250 STARTTLS\r\n"));
        sent(&mut c);
        c.handle_reply(reply("554 5.7.0 no\r\n"));
        assert!(matches!(c.error(), Some(ConnError::TlsUnavailable(t)) if t.contains("554")));
        assert!(!c.wants_tls());
    }

    #[test]
    fn starttls_off_ignores_the_offer() {
        let mut c = Client::new("relay.test");
        c.handle_reply(reply("220 mx\r\n"));
        sent(&mut c);
        c.handle_reply(reply("250-mx\r\n250 STARTTLS\r\n"));
        assert!(c.is_idle());
        assert_eq!(c.poll_transmit(), None);
    }

    fn data(content: &[u8]) -> Vec<u8> {
        ContentEncoder::encode_all(Framing::Data, content)
    }

    #[test]
    fn dot_stuffing() {
        assert_eq!(data(b".a\r\nb\r\n..c\r\n"), b"..a\r\nb\r\n...c\r\n");
        assert_eq!(data(b"a\r\n\r\n.\r\n"), b"a\r\n\r\n..\r\n");
        assert_eq!(data(b""), b"");
    }

    /// Checks what the next hop receives after DATA: only CRLF line ends,
    /// no line over 1000 octets with its CRLF, and `<CRLF>.<CRLF>` nowhere
    /// but at the very end once `.<CRLF>` is added.
    fn assert_unambiguous(wire: &[u8]) {
        for (i, &b) in wire.iter().enumerate() {
            if b == b'\r' {
                assert_eq!(wire.get(i + 1), Some(&b'\n'), "bare CR at {i}");
            }
            if b == b'\n' {
                assert!(i > 0 && wire[i - 1] == b'\r', "bare LF at {i}");
            }
        }
        assert!(wire.is_empty() || wire.ends_with(b"\r\n"));
        for line in wire.split(|&b| b == b'\n') {
            assert!(
                line.len() <= MAX_LINE + 1,
                "a line of {} octets",
                line.len()
            );
        }
        let mut all = b"\r\n".to_vec();
        all.extend_from_slice(wire);
        all.extend_from_slice(b".\r\n");
        let ends: Vec<usize> = memchr::memmem::find_iter(&all, b"\r\n.\r\n").collect();
        assert_eq!(ends, [all.len() - 5], "an end of data inside the content");
    }

    /// Encodes `content` split at `cuts`.
    fn encode_split(framing: Framing, content: &[u8], cuts: &[usize]) -> Vec<u8> {
        let mut enc = ContentEncoder::new(framing);
        let mut out = Vec::new();
        let mut from = 0;
        for &c in cuts.iter().chain(std::iter::once(&content.len())) {
            enc.encode(&content[from..c], &mut out);
            from = c;
        }
        enc.finish(&mut out);
        out
    }

    /// The same output whole, split at every point (long content: every
    /// point near a line end), at pairs of points and byte by byte.
    fn encode_every_split(framing: Framing, content: &[u8]) -> Vec<u8> {
        let whole = encode_split(framing, content, &[]);
        let near_eol = |c: usize| {
            content.len() < 400
                || content[c.saturating_sub(2)..(c + 2).min(content.len())]
                    .iter()
                    .any(|&b| b == b'\r' || b == b'\n' || b == b' ')
                || c.is_multiple_of(97)
        };
        for cut in (0..=content.len()).filter(|&c| near_eol(c)) {
            assert_eq!(encode_split(framing, content, &[cut]), whole, "cut {cut}");
            if content.len() < 400 {
                for cut2 in (cut..=content.len()).step_by(7) {
                    assert_eq!(encode_split(framing, content, &[cut, cut2]), whole);
                }
            }
        }
        let all: Vec<usize> = (1..content.len()).collect();
        assert_eq!(encode_split(framing, content, &all), whole, "byte by byte");
        whole
    }

    const SMUGGLING: [&[u8]; 6] = [
        b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\r.\r\n", b"\r\n.\r",
    ];

    /// Regression (issue 11): a BDAT body holding `\r.\rMAIL FROM:...` was
    /// relayed unchanged inside DATA, where a next hop that takes a bare CR
    /// as a line end reads the end of the message and a second
    /// transaction. Every look-alike of the end of data now goes out as a
    /// CRLF line with its dot stuffed.
    #[test]
    fn bare_cr_dot_in_content_cannot_end_data_downstream() {
        for seq in SMUGGLING {
            let mut content = b"Subject: a\r\n\r\nfirst".to_vec();
            content.extend_from_slice(seq);
            content.extend_from_slice(
                b"MAIL FROM:<evil@example.org>\r\nRCPT TO:<v@example.net>\r\nDATA\r\nsmuggled\r\n",
            );
            let wire = encode_every_split(Framing::Data, &content);
            assert_unambiguous(&wire);
            let text = String::from_utf8_lossy(&wire);
            assert!(
                text.contains("first\r\n..\r\nMAIL FROM:<evil@example.org>\r\n"),
                "{seq:?}: {text:?}"
            );
            // Under BDAT nothing is stuffed, but line ends are CRLF too.
            let bdat = encode_every_split(Framing::Bdat, &content);
            assert!(String::from_utf8_lossy(&bdat).contains("first\r\n.\r\nMAIL FROM:"));
            assert!(!bdat.windows(2).any(|w| w[0] == b'\r' && w[1] != b'\n'));
        }
    }

    #[test]
    fn bare_line_ends_become_crlf_even_split_between_cr_and_lf() {
        let wire = encode_every_split(Framing::Data, b"a\rb\nc\r\n\r\r\nd\n\re");
        assert_eq!(wire, b"a\r\nb\r\nc\r\n\r\n\r\nd\r\n\r\ne\r\n");
        assert_eq!(encode_every_split(Framing::Bdat, b"x\r"), b"x\r\n");
    }

    /// Clean content (CRLF, short lines) goes out exactly as before:
    /// stuffed after DATA, unchanged in BDAT.
    #[test]
    fn clean_content_is_unchanged_but_for_stuffing() {
        let content = b"Subject: x\r\nTo: <a@b>\r\n\r\n.dot\r\n..two\r\nplain\r\n";
        assert_eq!(encode_every_split(Framing::Bdat, content), content);
        assert_eq!(
            encode_every_split(Framing::Data, content),
            b"Subject: x\r\nTo: <a@b>\r\n\r\n..dot\r\n...two\r\nplain\r\n"
        );
    }

    /// Unfolds a header section (RFC 5322 2.2.3): CRLF before WSP removed.
    fn unfold(h: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < h.len() {
            if h[i..].starts_with(b"\r\n") && matches!(h.get(i + 2), Some(b' ' | b'\t')) {
                i += 2;
                continue;
            }
            out.push(h[i]);
            i += 1;
        }
        out
    }

    #[test]
    fn long_header_line_is_folded_at_whitespace() {
        let mut value = Vec::new();
        for n in 0..200 {
            value.extend_from_slice(format!(" <recipient{n}@example.net>,").as_bytes());
        }
        let mut content = b"To:".to_vec();
        content.extend_from_slice(&value);
        content.extend_from_slice(b"\r\nSubject: x\r\n\r\nbody\r\n");
        let wire = encode_every_split(Framing::Data, &content);
        assert_unambiguous(&wire);
        assert!(wire.split(|&b| b == b'\n').count() > 6, "folded");
        // Folding at existing whitespace loses nothing.
        assert_eq!(unfold(&wire), content);
    }

    #[test]
    fn long_lines_without_whitespace_are_split_with_crlf_space() {
        let mut content = b"X-Long: ".to_vec();
        content.extend(std::iter::repeat_n(b'h', 2500));
        content.extend_from_slice(b"\r\n\r\n");
        content.extend(std::iter::repeat_n(b'b', 3000));
        content.extend_from_slice(b"\r\n.");
        content.extend(std::iter::repeat_n(b'd', 997));
        content.extend_from_slice(b"\r\n");
        for framing in [Framing::Data, Framing::Bdat] {
            let wire = encode_every_split(framing, &content);
            if framing == Framing::Data {
                assert_unambiguous(&wire);
            }
            let lines: Vec<&[u8]> = wire.split(|&b| b == b'\n').collect();
            assert!(lines.iter().all(|l| l.len() <= MAX_LINE + 1));
            // Continuations begin with a space; nothing is lost.
            let spaces = lines.iter().filter(|l| l.first() == Some(&b' ')).count();
            assert!(spaces > 2 + 3, "{spaces}");
            let kept: Vec<u8> = wire
                .iter()
                .copied()
                .filter(|&b| b != b'\r' && b != b'\n' && b != b' ' && b != b'.')
                .collect();
            let want: Vec<u8> = content
                .iter()
                .copied()
                .filter(|&b| b != b'\r' && b != b'\n' && b != b' ' && b != b'.')
                .collect();
            assert_eq!(kept, want);
        }
        // A stuffed line of 998 octets would be 999 on the wire: split.
        let mut dotted = b"\r\n.".to_vec();
        dotted.extend(std::iter::repeat_n(b'd', 997));
        let wire = data(&dotted);
        assert_unambiguous(&wire);
    }

    /// Deterministic noise full of the octets that matter.
    fn noise(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed | 1;
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let piece: &[u8] = match x % 23 {
                0 => b"\r",
                1 => b"\n",
                2 => b"\r\n",
                3 => b".",
                4 => b"\r\n.\r\n",
                5 => b" ",
                6 => b"\r\n\r\n",
                7 => b"\t",
                _ => {
                    b"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
                }
            };
            out.extend_from_slice(piece);
        }
        out
    }

    #[test]
    fn any_content_goes_out_unambiguous_whatever_the_split() {
        for seed in 0..40u64 {
            let content = noise(seed * 7919 + 1, 300 + (seed as usize * 97) % 2500);
            let wire = encode_split(Framing::Data, &content, &[]);
            assert_unambiguous(&wire);
            for cut in (0..content.len()).step_by(31) {
                assert_eq!(encode_split(Framing::Data, &content, &[cut]), wire);
            }
        }
    }

    #[test]
    fn bdat_chunk_size_counts_the_encoded_content() {
        let mut c = Client::new("relay.test");
        c.handle_reply(reply("220 x\r\n"));
        sent(&mut c);
        c.handle_reply(reply("250-x\r\n250-PIPELINING\r\n250 CHUNKING\r\n"));
        c.start(job(1, b"a\r.\rb")).unwrap();
        sent(&mut c);
        c.handle_reply(reply("250 ok\r\n"));
        c.handle_reply(reply("250 ok\r\n"));
        assert_eq!(sent(&mut c), "BDAT 9 LAST\r\na\r\n.\r\nb\r\n");
    }

    /// Regression (issue 11): a next hop's reply text went into logs and
    /// bounces unsanitised (bare CR, 8-bit, any length).
    #[test]
    fn reply_text_is_sanitised_and_capped() {
        let r = reply("550-5.1.1 bad\rMAIL FROM:<x>\x01\r\n550 caf\u{e9}\tend\r\n");
        assert_eq!(r.lines[0], "5.1.1 bad\\x0DMAIL FROM:<x>\\x01");
        assert_eq!(r.lines[1], "caf\\xC3\\xA9 end");
        let long = format!("550 {}\r\n", "y".repeat(1500));
        let r = reply(&long);
        assert!(r.lines[0].len() <= MAX_KEPT_TEXT && r.lines[0].ends_with("..."));
        let mut many = String::new();
        for _ in 0..10 {
            many.push_str(&format!("451-{}\r\n", "z".repeat(400)));
        }
        many.push_str("451 last\r\n");
        let t = reply(&many).text();
        assert!(
            t.len() < TEXT_LINES * (MAX_KEPT_TEXT + 3) + 16,
            "{}",
            t.len()
        );
        assert!(t.ends_with(" / ..."));
        assert!(t.bytes().all(|b| (0x20..0x7f).contains(&b)));
    }

    /// Regression (issue 11): how much reply a next hop can make the client
    /// hold is bounded per line and per reply.
    #[test]
    fn reply_parser_bounds_lines_and_replies() {
        let mut long = format!("250 {}", "x".repeat(MAX_REPLY_LINE - 6)).into_bytes();
        long.extend_from_slice(b"\r\n");
        assert_eq!(long.len(), MAX_REPLY_LINE);
        assert!(ReplyParser::default().feed(&long).unwrap().1.is_some());
        long.insert(5, b'x');
        assert_eq!(
            ReplyParser::default().feed(&long),
            Err(ReplyError::LineTooLong)
        );
        // Without its LF yet: refused as soon as it cannot fit.
        assert_eq!(
            ReplyParser::default().feed(&vec![b'2'; MAX_REPLY_LINE]),
            Err(ReplyError::LineTooLong)
        );
        assert_eq!(
            ReplyParser::default().feed(&vec![b'2'; MAX_REPLY_LINE - 1]),
            Ok((0, None))
        );
        let mut p = ReplyParser::default();
        let line = b"250-x\r\n".repeat(MAX_REPLY_LINES + 1);
        assert_eq!(p.feed(&line), Err(ReplyError::TooManyLines));
        let mut ok = b"250-x\r\n".repeat(MAX_REPLY_LINES - 1);
        ok.extend_from_slice(b"250 x\r\n");
        let (_, r) = ReplyParser::default().feed(&ok).unwrap();
        assert_eq!(r.unwrap().lines.len(), MAX_REPLY_LINES);
    }
}
