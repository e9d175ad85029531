//! Parsed SMTP commands, borrowing from the input line or the per-connection
//! arena.
//!
//! These types exist only for the length of one `Session::handle_input` call:
//! everything that must outlive it (the envelope) is copied into owned
//! [`crate::smtp::envelope`] types by the session.

use bumpalo::collections::Vec as BumpVec;

/// One command line, parsed.
#[derive(Debug)]
pub enum Command<'a> {
    Ehlo(&'a str),
    Helo(&'a str),
    Mail(MailCommand<'a>),
    Rcpt(RcptCommand<'a>),
    Data,
    Bdat {
        size: u64,
        last: bool,
    },
    Rset,
    Noop,
    Quit,
    Vrfy,
    Help,
    /// `STARTTLS` (RFC 3207).
    StartTls,
    /// `AUTH mechanism [initial-response]` (RFC 4954); the mechanism name as
    /// sent, the initial response still BASE64 (or `=`).
    Auth {
        mechanism: &'a str,
        initial: Option<&'a str>,
    },
    /// A command RFC 5321 or an extension defines, which ringmta does not
    /// implement (ETRN, TURN, EXPN, SEND, SOML, SAML, ...): 502.
    NotImplemented,
}

/// `MAIL FROM:<reverse-path> [params]`.
#[derive(Debug)]
pub struct MailCommand<'a> {
    /// `None` is the null reverse-path `<>`.
    pub from: Option<Mailbox<'a>>,
    pub params: MailParams<'a>,
}

/// `RCPT TO:<forward-path> [params]`.
#[derive(Debug)]
pub struct RcptCommand<'a> {
    pub to: Recipient<'a>,
    pub params: RcptParams<'a>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Recipient<'a> {
    /// `<postmaster>` without a domain (RFC 5321 4.5.1).
    Postmaster,
    Mailbox(Mailbox<'a>),
}

/// An address, `local@domain`. The local part is kept exactly as sent
/// (quoted form included), so it is relayed unchanged.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub struct Mailbox<'a> {
    pub local: &'a str,
    pub domain: Domain<'a>,
    /// True when the address contains non-ASCII (SMTPUTF8) characters.
    pub utf8: bool,
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Domain<'a> {
    Name(&'a str),
    /// The text between the brackets of an address literal.
    Literal(&'a str),
}

impl Domain<'_> {
    /// The domain as written in an address (`example.org` or `[127.0.0.1]`).
    pub fn write_to(&self, out: &mut String) {
        match self {
            Domain::Name(n) => out.push_str(n),
            Domain::Literal(l) => {
                out.push('[');
                out.push_str(l);
                out.push(']');
            }
        }
    }
}

impl Mailbox<'_> {
    pub fn to_owned_string(&self) -> String {
        let mut s = String::with_capacity(self.local.len() + 1 + 64);
        s.push_str(self.local);
        s.push('@');
        self.domain.write_to(&mut s);
        s
    }
}

/// MAIL parameters ringmta understands (RFC 1870, 6152, 6531, 3461, 4954).
#[derive(Debug, Default)]
pub struct MailParams<'a> {
    pub size: Option<u64>,
    pub body: Option<Body>,
    pub smtputf8: bool,
    pub ret: Option<Ret>,
    /// ENVID, still xtext-encoded, as it is relayed.
    pub envid: Option<&'a str>,
    /// AUTH=, still xtext-encoded (RFC 4954 5).
    pub auth: Option<&'a str>,
}

/// RCPT parameters (RFC 3461).
#[derive(Debug, Default)]
pub struct RcptParams<'a> {
    pub notify: Option<Notify>,
    /// ORCPT as `addr-type;xtext`, kept encoded.
    pub orcpt: Option<&'a str>,
}

/// One `keyword[=value]` parameter, split but not yet interpreted.
#[derive(Debug, Clone, Copy)]
pub struct Param<'a> {
    pub keyword: &'a str,
    pub value: Option<&'a str>,
}

/// The parameters of one MAIL or RCPT line, in the arena.
pub type Params<'a> = BumpVec<'a, Param<'a>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    SevenBit,
    EightBitMime,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ret {
    Full,
    Hdrs,
}

/// NOTIFY=NEVER or a set of SUCCESS/FAILURE/DELAY (RFC 3461 4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Notify {
    pub never: bool,
    pub success: bool,
    pub failure: bool,
    pub delay: bool,
}

impl Notify {
    pub fn to_param(self) -> String {
        if self.never {
            return "NEVER".into();
        }
        let mut parts = Vec::with_capacity(3);
        if self.success {
            parts.push("SUCCESS");
        }
        if self.failure {
            parts.push("FAILURE");
        }
        if self.delay {
            parts.push("DELAY");
        }
        parts.join(",")
    }
}
