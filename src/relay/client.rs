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
    /// Every line's text after the code and separator.
    pub lines: Vec<String>,
}

impl Reply {
    pub fn class(&self) -> u16 {
        self.code / 100
    }

    /// The reply as one line for logs and DSNs: `550 5.1.1 No such user`.
    pub fn text(&self) -> String {
        format!("{} {}", self.code, self.lines.join(" / "))
    }
}

/// Splits server output into replies (RFC 5321 4.2.1: `ddd-text` lines until
/// a `ddd text` line). Bounded: a reply over `MAX_REPLY` bytes is an error.
#[derive(Debug, Default)]
pub struct ReplyParser {
    lines: Vec<String>,
    code: Option<u16>,
    size: usize,
}

/// Largest reply accepted (a peer cannot make us buffer without bound).
pub const MAX_REPLY: usize = 64 << 10;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    #[error("malformed reply line: {0:?}")]
    Malformed(String),
    #[error("reply longer than {MAX_REPLY} bytes")]
    TooLong,
}

impl ReplyParser {
    /// Consumes complete lines from `input`; returns bytes used and the
    /// reply, if one completed.
    pub fn feed(&mut self, input: &[u8]) -> Result<(usize, Option<Reply>), ReplyError> {
        let mut used = 0;
        while let Some(nl) = memchr::memchr(b'\n', &input[used..]) {
            let raw = &input[used..used + nl];
            used += nl + 1;
            let line = raw.strip_suffix(b"\r").unwrap_or(raw);
            self.size += line.len();
            if self.size > MAX_REPLY {
                return Err(ReplyError::TooLong);
            }
            let text = String::from_utf8_lossy(line);
            let code = text
                .get(..3)
                .filter(|c| c.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|c| c.parse::<u16>().ok())
                .filter(|c| (200..600).contains(c))
                .ok_or_else(|| ReplyError::Malformed(text.clone().into_owned()))?;
            if self.code.is_some_and(|c| c != code) {
                return Err(ReplyError::Malformed(text.into_owned()));
            }
            self.code = Some(code);
            let sep = text.as_bytes().get(3).copied();
            self.lines.push(text.get(4..).unwrap_or("").to_owned());
            match sep {
                Some(b'-') => continue,
                None | Some(b' ') => {
                    self.size = 0;
                    self.code = None;
                    let reply = Reply {
                        code,
                        lines: std::mem::take(&mut self.lines),
                    };
                    return Ok((used, Some(reply)));
                }
                Some(_) => return Err(ReplyError::Malformed(text.into_owned())),
            }
        }
        if input.len() - used > MAX_REPLY {
            return Err(ReplyError::TooLong);
        }
        Ok((used, None))
    }
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
#[derive(Debug, Clone, PartialEq, Eq)]
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
                            .map(|j| dot_stuff(&j.body))
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
            let head = format!("BDAT {} LAST\r\n", job.body.len());
            self.out.extend_from_slice(head.as_bytes());
            self.out.extend_from_slice(&job.body);
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

/// RFC 5321 4.5.2: a line that starts with '.' gets one more.
pub fn dot_stuff(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 64);
    let mut from = 0;
    if body.first() == Some(&b'.') {
        out.push(b'.');
    }
    for i in memchr::memmem::find_iter(body, b"\n.") {
        out.extend_from_slice(&body[from..=i]);
        out.push(b'.');
        from = i + 1;
    }
    out.extend_from_slice(&body[from..]);
    if !out.ends_with(b"\r\n") && !out.is_empty() {
        out.extend_from_slice(b"\r\n");
    }
    out
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

    #[test]
    fn dot_stuffing() {
        assert_eq!(dot_stuff(b".a\r\nb\r\n..c\r\n"), b"..a\r\nb\r\n...c\r\n");
        assert_eq!(dot_stuff(b""), b"");
    }
}
