//! SMTP AUTH (RFC 4954) with the SASL mechanisms PLAIN (RFC 4616) and
//! LOGIN, sans-IO.
//!
//! Owns the exchange: which challenge comes next, BASE64 decoding of the
//! client's responses (`*` cancels, `=` is an empty initial response), and
//! turning the final response into [`Credentials`]. It also owns the
//! "may this user send as this address" rule ([`SendAs`]), which arrives with
//! a successful authentication.
//!
//! It must never check a password, log one, or touch I/O or a clock: the
//! session hands the [`Credentials`] to its driver as an event, and the
//! driver (which may take tens of milliseconds of argon2 off the shard
//! thread) reports the verdict back. Passwords never appear in `Debug`
//! output.

use std::fmt;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;

use crate::smtp::reply::Reply;

/// RFC 4954 4: the server accepts AUTH command lines and continuation lines
/// of up to 12288 octets (CRLF included).
pub const MAX_AUTH_LINE: usize = 12288;

/// RFC 4616 2: authcid and passwd are at most 255 octets each (we apply the
/// same bound to LOGIN, which has no specification).
pub const MAX_CREDENTIAL: usize = 255;

/// The mechanisms ringmta offers, in the order they are advertised.
pub const MECHANISMS: &str = "PLAIN LOGIN";

/// `334 VXNlcm5hbWU6` / `334 UGFzc3dvcmQ6`: "Username:" and "Password:".
const LOGIN_USERNAME: &str = "VXNlcm5hbWU6";
const LOGIN_PASSWORD: &str = "UGFzc3dvcmQ6";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    Plain,
    Login,
}

impl Mechanism {
    /// The mechanism named `name` (case-insensitive, RFC 4422 3.1), if we
    /// offer it.
    pub fn parse(name: &str) -> Option<Mechanism> {
        if name.eq_ignore_ascii_case("PLAIN") {
            Some(Mechanism::Plain)
        } else if name.eq_ignore_ascii_case("LOGIN") {
            Some(Mechanism::Login)
        } else {
            None
        }
    }
}

/// What the client presented. `authzid` is the PLAIN authorization identity
/// when one was given and differs from nothing yet (the session refuses it
/// unless it equals `username`: ringmta does not support proxy
/// authorization).
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub authzid: Option<String>,
    pub username: String,
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("authzid", &self.authzid)
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// An exchange waiting for the client's next response line.
#[derive(Clone, PartialEq, Eq)]
pub enum Exchange {
    /// PLAIN without an initial response: the empty challenge was sent.
    Plain,
    /// LOGIN: "Username:" was sent.
    LoginUsername,
    /// LOGIN: "Password:" was sent.
    LoginPassword { username: String },
}

impl fmt::Debug for Exchange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exchange::Plain => f.write_str("Plain"),
            Exchange::LoginUsername => f.write_str("LoginUsername"),
            Exchange::LoginPassword { username } => f
                .debug_struct("LoginPassword")
                .field("username", username)
                .finish(),
        }
    }
}

/// The result of one step of an exchange.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Send `334 <challenge>` and wait for a response line.
    Challenge(Exchange, &'static str),
    /// The client has presented everything: check it.
    Done(Credentials),
    Fail(AuthError),
}

/// Why an exchange ended without credentials: each is a 501 (RFC 4954 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("the client cancelled the exchange")]
    Cancelled,
    #[error("the response is not BASE64")]
    BadBase64,
    #[error("the decoded response is malformed")]
    Malformed,
}

impl AuthError {
    pub fn reply(self) -> Reply {
        match self {
            AuthError::Cancelled => CANCELLED,
            AuthError::BadBase64 => BAD_BASE64,
            AuthError::Malformed => MALFORMED,
        }
    }
}

/// Who may use which envelope sender (RFC 6409 6.1): granted by the driver
/// with a successful authentication, checked by the session at MAIL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendAs {
    /// Exactly this address (compared case-insensitively).
    Address(String),
    /// Any address at this domain.
    Domain(String),
}

impl SendAs {
    /// True when `addr` (`local@domain`, as the session renders paths) is
    /// covered by this rule.
    pub fn allows(&self, addr: &str) -> bool {
        match self {
            SendAs::Address(a) => a.eq_ignore_ascii_case(addr),
            SendAs::Domain(d) => addr
                .rsplit_once('@')
                .is_some_and(|(_, dom)| dom.eq_ignore_ascii_case(d)),
        }
    }
}

/// A successful authentication, as the driver reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authenticated {
    /// The login name the client authenticated as.
    pub login: String,
    /// The envelope senders this login may use.
    pub send_as: Vec<SendAs>,
}

/// The driver's verdict on [`Credentials`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthResult {
    Success(Authenticated),
    /// Unknown user or wrong password: 535 5.7.8 (the two are not told
    /// apart).
    Failed,
    /// This client address failed too often: 421 and close.
    TooManyFailures,
    /// The check itself could not run: 454 4.7.0.
    TempFail,
}

pub const SUCCESS: Reply = Reply::new(235, "2.7.0", "Authentication successful");
pub const CANCELLED: Reply = Reply::new(501, "5.0.0", "Error: authentication cancelled");
pub const BAD_BASE64: Reply = Reply::new(
    501,
    "5.5.2",
    "Error: cannot decode the BASE64 authentication response",
);
pub const MALFORMED: Reply = Reply::new(501, "5.5.2", "Error: malformed authentication response");
pub const SYNTAX: Reply = Reply::new(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]");
pub const UNKNOWN_MECHANISM: Reply =
    Reply::new(504, "5.5.4", "Error: unrecognized authentication type");
pub const FAILED: Reply = Reply::new(535, "5.7.8", "Error: authentication failed");
pub const ALREADY: Reply = Reply::new(503, "5.5.1", "Error: already authenticated");
pub const IN_TRANSACTION: Reply = Reply::new(
    503,
    "5.5.1",
    "Error: AUTH not permitted during a mail transaction",
);
pub const NOT_ENABLED: Reply = Reply::new(503, "5.5.1", "Error: authentication not enabled");
pub const NEEDS_TLS: Reply = Reply::new(
    538,
    "5.7.11",
    "Error: encryption required for requested authentication mechanism",
);
pub const REQUIRED: Reply = Reply::new(530, "5.7.0", "Error: authentication required");
pub const TEMP_FAIL: Reply = Reply::new(454, "4.7.0", "Error: temporary authentication failure");
pub const TOO_MANY_FAILURES: Reply = Reply::new(
    421,
    "4.7.0",
    "Error: too many authentication failures, closing transmission channel",
);

/// Starts an exchange for `AUTH mech [initial]`.
pub fn start(mech: Mechanism, initial: Option<&str>) -> Step {
    match (mech, initial) {
        (Mechanism::Plain, None) => Step::Challenge(Exchange::Plain, ""),
        (Mechanism::Plain, Some(r)) => match decode_initial(r) {
            Ok(bytes) => plain(&bytes),
            Err(e) => Step::Fail(e),
        },
        (Mechanism::Login, None) => Step::Challenge(Exchange::LoginUsername, LOGIN_USERNAME),
        (Mechanism::Login, Some(r)) => match decode_initial(r) {
            Ok(bytes) => login_username(&bytes),
            Err(e) => Step::Fail(e),
        },
    }
}

impl Exchange {
    /// The client's response line (CRLF removed).
    pub fn handle_response(self, line: &[u8]) -> Step {
        if line == b"*" {
            return Step::Fail(AuthError::Cancelled);
        }
        let bytes = match decode(line) {
            Ok(b) => b,
            Err(e) => return Step::Fail(e),
        };
        match self {
            Exchange::Plain => plain(&bytes),
            Exchange::LoginUsername => login_username(&bytes),
            Exchange::LoginPassword { username } => match credential(&bytes, true) {
                Some(password) => Step::Done(Credentials {
                    authzid: None,
                    username,
                    password,
                }),
                None => Step::Fail(AuthError::Malformed),
            },
        }
    }
}

/// An initial response: `=` stands for an empty one (RFC 4954 4).
fn decode_initial(r: &str) -> Result<Vec<u8>, AuthError> {
    if r == "=" {
        return Ok(Vec::new());
    }
    if r == "*" {
        return Err(AuthError::Cancelled);
    }
    decode(r.as_bytes())
}

fn decode(line: &[u8]) -> Result<Vec<u8>, AuthError> {
    BASE64.decode(line).map_err(|_| AuthError::BadBase64)
}

/// PLAIN: `[authzid] NUL authcid NUL passwd` (RFC 4616 2).
fn plain(msg: &[u8]) -> Step {
    let mut parts = msg.split(|&b| b == 0);
    let (Some(authzid), Some(authcid), Some(passwd), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Step::Fail(AuthError::Malformed);
    };
    let authzid = match authzid {
        [] => None,
        z => match credential(z, false) {
            Some(z) => Some(z),
            None => return Step::Fail(AuthError::Malformed),
        },
    };
    match (credential(authcid, false), credential(passwd, false)) {
        (Some(username), Some(password)) => Step::Done(Credentials {
            authzid,
            username,
            password,
        }),
        _ => Step::Fail(AuthError::Malformed),
    }
}

fn login_username(bytes: &[u8]) -> Step {
    match credential(bytes, false) {
        Some(username) => Step::Challenge(Exchange::LoginPassword { username }, LOGIN_PASSWORD),
        None => Step::Fail(AuthError::Malformed),
    }
}

/// One UTF-8 identity or password without NUL, 1..=255 octets (an empty
/// password only where `allow_empty`; it then simply fails the check).
fn credential(bytes: &[u8], allow_empty: bool) -> Option<String> {
    if (bytes.is_empty() && !allow_empty) || bytes.len() > MAX_CREDENTIAL || bytes.contains(&0) {
        return None;
    }
    String::from_utf8(bytes.to_vec()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &[u8]) -> String {
        BASE64.encode(s)
    }

    fn creds(authzid: Option<&str>, user: &str, pass: &str) -> Credentials {
        Credentials {
            authzid: authzid.map(str::to_owned),
            username: user.into(),
            password: pass.into(),
        }
    }

    #[test]
    fn plain_initial_response() {
        assert_eq!(
            start(Mechanism::Plain, Some(&b64(b"\0alice\0secret"))),
            Step::Done(creds(None, "alice", "secret"))
        );
        assert_eq!(
            start(Mechanism::Plain, Some(&b64(b"alice\0alice\0pw"))),
            Step::Done(creds(Some("alice"), "alice", "pw"))
        );
    }

    #[test]
    fn plain_with_challenge() {
        let Step::Challenge(ex, "") = start(Mechanism::Plain, None) else {
            panic!("no empty challenge")
        };
        assert_eq!(
            ex.handle_response(b64(b"\0bob\0pw").as_bytes()),
            Step::Done(creds(None, "bob", "pw"))
        );
    }

    #[test]
    fn login_exchange() {
        let Step::Challenge(ex, LOGIN_USERNAME) = start(Mechanism::Login, None) else {
            panic!()
        };
        let Step::Challenge(ex, LOGIN_PASSWORD) = ex.handle_response(b64(b"carol").as_bytes())
        else {
            panic!()
        };
        assert_eq!(
            ex.handle_response(b64(b"pw").as_bytes()),
            Step::Done(creds(None, "carol", "pw"))
        );
        // The username as initial response skips the first challenge.
        let Step::Challenge(Exchange::LoginPassword { username }, LOGIN_PASSWORD) =
            start(Mechanism::Login, Some(&b64(b"dave")))
        else {
            panic!()
        };
        assert_eq!(username, "dave");
    }

    /// Every way an exchange fails, and the reply it gets.
    #[test]
    fn failures_table() {
        let fail = |s: Step| match s {
            Step::Fail(e) => e.reply().code,
            other => panic!("{other:?}"),
        };
        for (step, code) in [
            (start(Mechanism::Plain, Some("*")), 501),
            (start(Mechanism::Plain, Some("=")), 501),
            (start(Mechanism::Plain, Some("!!!")), 501),
            (start(Mechanism::Plain, Some(&b64(b"alice\0pw"))), 501),
            (start(Mechanism::Plain, Some(&b64(b"\0\0pw"))), 501),
            (start(Mechanism::Plain, Some(&b64(b"a\0b\0c\0d"))), 501),
            (start(Mechanism::Plain, Some(&b64(b"\0\xff\0pw"))), 501),
            (start(Mechanism::Login, Some("=")), 501),
            (Exchange::Plain.handle_response(b"*"), 501),
            (Exchange::Plain.handle_response(b"AAA"), 501),
            (Exchange::Plain.handle_response(b"QUJD\xc3"), 501),
            (Exchange::LoginUsername.handle_response(b""), 501),
        ] {
            assert_eq!(fail(step), code);
        }
        let long = "x".repeat(MAX_CREDENTIAL + 1);
        let msg = format!("\0{long}\0pw");
        assert_eq!(
            start(Mechanism::Plain, Some(&b64(msg.as_bytes()))),
            Step::Fail(AuthError::Malformed)
        );
        assert_eq!(
            Exchange::Plain.handle_response(b"*"),
            Step::Fail(AuthError::Cancelled)
        );
    }

    #[test]
    fn empty_login_password_is_passed_on_to_fail_the_check() {
        let ex = Exchange::LoginPassword {
            username: "u".into(),
        };
        assert_eq!(ex.handle_response(b""), Step::Done(creds(None, "u", "")));
    }

    #[test]
    fn passwords_are_not_debug_printed() {
        let c = creds(None, "alice", "hunter2");
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn send_as_rules() {
        assert!(SendAs::Address("Alice@Example.org".into()).allows("alice@example.org"));
        assert!(!SendAs::Address("alice@example.org".into()).allows("bob@example.org"));
        assert!(SendAs::Domain("example.org".into()).allows("x@EXAMPLE.org"));
        assert!(!SendAs::Domain("example.org".into()).allows("x@sub.example.org"));
    }
}
