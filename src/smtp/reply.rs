//! SMTP replies: the three-digit code, the RFC 3463 enhanced status code and
//! the text, rendered onto the session's output buffer.
//!
//! Owns the wire format of replies (RFC 5321 4.2, multi-line per 4.2.1 and the
//! EHLO form of 4.1.1.1). It never decides *which* reply to send; the session
//! does.

/// One reply the session can send. Text is static or formatted by the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    /// The three-digit reply code (RFC 5321 4.2.2).
    pub code: u16,
    /// The enhanced status code (RFC 3463), `None` where RFC 2034 exempts the
    /// reply (the greeting and the reply to HELO/EHLO).
    pub status: Option<&'static str>,
    /// Human-readable text, a single line without CR or LF.
    pub text: &'static str,
}

impl Reply {
    pub const fn new(code: u16, status: &'static str, text: &'static str) -> Self {
        Self {
            code,
            status: Some(status),
            text,
        }
    }

    /// Appends this reply as one line.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        write_line(out, self.code, self.status, self.text, true);
    }

    /// True for 4xx and 5xx replies.
    pub fn is_error(&self) -> bool {
        self.code >= 400
    }
}

/// Appends one reply line `code SP [status SP] text CRLF`, or with `-` after
/// the code when `last` is false (RFC 5321 4.2.1).
pub fn write_line(out: &mut Vec<u8>, code: u16, status: Option<&str>, text: &str, last: bool) {
    push_code(out, code);
    out.push(if last { b' ' } else { b'-' });
    if let Some(status) = status {
        out.extend_from_slice(status.as_bytes());
        if !text.is_empty() {
            out.push(b' ');
        }
    }
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Appends a multi-line reply: every line but the last carries `code-`.
pub fn write_multiline<'a, I>(out: &mut Vec<u8>, code: u16, status: Option<&str>, lines: I)
where
    I: IntoIterator<Item = &'a str>,
    I::IntoIter: ExactSizeIterator,
{
    let lines = lines.into_iter();
    let n = lines.len();
    for (i, line) in lines.enumerate() {
        write_line(out, code, status, line, i + 1 == n);
    }
}

/// Calls `f` with the code and enhanced status code (RFC 3463, when the
/// line has one) of every complete reply in `out`: of each reply's last
/// line (`code SP`), so a multi-line reply counts once. For counting what
/// was sent; lines that are not replies are skipped.
pub fn for_each_final(out: &[u8], mut f: impl FnMut(u16, Option<&str>)) {
    for line in out.split(|&b| b == b'\n') {
        let [a, b, c, b' ', rest @ ..] = line else {
            continue;
        };
        if !(a.is_ascii_digit() && b.is_ascii_digit() && c.is_ascii_digit()) {
            continue;
        }
        let code = u16::from(a - b'0') * 100 + u16::from(b - b'0') * 10 + u16::from(c - b'0');
        let word = rest
            .split(|&b| b == b' ' || b == b'\r')
            .next()
            .unwrap_or_default();
        let enhanced = (word.len() >= 5
            && matches!(word[0], b'2' | b'4' | b'5')
            && word[1] == b'.'
            && word.iter().all(|&b| b.is_ascii_digit() || b == b'.'))
        .then(|| std::str::from_utf8(word).ok())
        .flatten();
        f(code, enhanced);
    }
}

fn push_code(out: &mut Vec<u8>, code: u16) {
    // invariant: reply codes are three digits, 200..=599 (RFC 5321 4.2).
    debug_assert!((200..600).contains(&code));
    out.extend_from_slice(&[
        b'0' + (code / 100) as u8,
        b'0' + (code / 10 % 10) as u8,
        b'0' + (code % 10) as u8,
    ]);
}

// The replies the session sends, named once so the transcripts and the code
// agree. Codes follow RFC 5321 4.2/4.3; enhanced codes RFC 3463 and the IANA
// registry (RFC 5248).
pub const OK: Reply = Reply::new(250, "2.0.0", "Ok");
/// The sender's SPF says `fail` and the policy refuses it (RFC 7372 3.2).
pub const SPF_FAIL: Reply = Reply::new(550, "5.7.23", "SPF validation failed");
pub const SENDER_OK: Reply = Reply::new(250, "2.1.0", "Sender ok");
pub const RCPT_OK: Reply = Reply::new(250, "2.1.5", "Recipient ok");
pub const RSET_OK: Reply = Reply::new(250, "2.0.0", "Reset ok");
pub const NOOP_OK: Reply = Reply::new(250, "2.0.0", "Ok");
pub const START_DATA: Reply = Reply {
    code: 354,
    status: None,
    text: "End data with <CR><LF>.<CR><LF>",
};
pub const VRFY: Reply = Reply::new(
    252,
    "2.5.2",
    "Cannot VRFY user, but will accept message and attempt delivery",
);
pub const HELP: Reply = Reply::new(
    214,
    "2.0.0",
    "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP",
);
pub const UNKNOWN_COMMAND: Reply = Reply::new(500, "5.5.2", "Error: command not recognized");
pub const LINE_TOO_LONG: Reply = Reply::new(500, "5.5.2", "Error: line too long");
pub const BARE_NEWLINE_COMMAND: Reply = Reply::new(
    500,
    "5.5.2",
    "Error: bare CR or LF in command; lines must end with <CR><LF>",
);
pub const NOT_IMPLEMENTED: Reply = Reply::new(502, "5.5.1", "Error: command not implemented");
pub const BAD_SEQUENCE_HELO: Reply = Reply::new(503, "5.5.1", "Error: send HELO/EHLO first");
pub const BAD_SEQUENCE_NESTED_MAIL: Reply = Reply::new(503, "5.5.1", "Error: nested MAIL command");
pub const BAD_SEQUENCE_NEED_MAIL: Reply = Reply::new(503, "5.5.1", "Error: need MAIL command");
pub const BAD_SEQUENCE_NEED_RCPT: Reply = Reply::new(503, "5.5.1", "Error: need RCPT command");
pub const BAD_SEQUENCE_DATA_AFTER_BDAT: Reply = Reply::new(
    503,
    "5.5.1",
    "Error: DATA not allowed after BDAT in the same transaction",
);
pub const BAD_SEQUENCE_RCPT_AFTER_BDAT: Reply = Reply::new(
    503,
    "5.5.1",
    "Error: RCPT not allowed after BDAT in the same transaction",
);
pub const BAD_SEQUENCE_BDAT_HELO: Reply =
    Reply::new(503, "5.5.1", "Error: BDAT requires EHLO (CHUNKING)");
pub const SYNTAX_EHLO: Reply = Reply::new(501, "5.5.4", "Syntax: EHLO hostname");
pub const SYNTAX_HELO: Reply = Reply::new(501, "5.5.4", "Syntax: HELO hostname");
pub const SYNTAX_MAIL: Reply = Reply::new(501, "5.5.4", "Syntax: MAIL FROM:<address>");
pub const SYNTAX_RCPT: Reply = Reply::new(501, "5.5.4", "Syntax: RCPT TO:<address>");
pub const SYNTAX_VRFY: Reply = Reply::new(501, "5.5.4", "Syntax: VRFY address");
pub const SYNTAX_BDAT: Reply = Reply::new(501, "5.5.4", "Syntax: BDAT size [LAST]");
pub const SYNTAX_NO_ARGS: Reply = Reply::new(501, "5.5.4", "Syntax: no parameters allowed");
pub const BAD_SENDER_SYNTAX: Reply = Reply::new(501, "5.1.7", "Error: bad sender address syntax");
pub const BAD_RECIPIENT_SYNTAX: Reply =
    Reply::new(501, "5.1.3", "Error: bad recipient address syntax");
pub const INVALID_UTF8: Reply = Reply::new(501, "5.5.2", "Error: command is not valid UTF-8");
pub const UNKNOWN_PARAMETER: Reply =
    Reply::new(555, "5.5.4", "Error: unsupported MAIL/RCPT parameter");
pub const BAD_PARAMETER: Reply = Reply::new(
    555,
    "5.5.4",
    "Error: malformed or duplicate MAIL/RCPT parameter",
);
pub const PARAMETERS_AFTER_HELO: Reply =
    Reply::new(555, "5.5.4", "Error: MAIL/RCPT parameters require EHLO");
pub const UTF8_NOT_DECLARED: Reply = Reply::new(
    553,
    "5.6.7",
    "Error: non-ASCII address requires the SMTPUTF8 parameter",
);
pub const SIZE_EXCEEDED: Reply =
    Reply::new(552, "5.3.4", "Error: message size exceeds fixed limit");
pub const TOO_MANY_RECIPIENTS: Reply = Reply::new(452, "4.5.3", "Error: too many recipients");
pub const RELAY_DENIED: Reply = Reply::new(550, "5.7.1", "Error: relay access denied");
pub const NULL_RECIPIENT: Reply = Reply::new(
    501,
    "5.1.3",
    "Error: the null path is not a valid recipient",
);
pub const DATA_BARE_NEWLINE: Reply = Reply::new(
    550,
    "5.6.0",
    "Error: message contains bare CR or LF; lines must end with <CR><LF>",
);
pub const DATA_LINE_TOO_LONG: Reply = Reply::new(
    500,
    "5.5.2",
    "Error: message line longer than 1000 octets (RFC 5321 4.5.3.1.6)",
);
pub const STORAGE_FULL: Reply = Reply::new(452, "4.3.1", "Error: insufficient system storage");
/// The shard's budget for message content in flight has no room for this
/// body now (RFC 3463 4.3.1: a temporary shortage; the client retries).
pub const BUDGET_EXCEEDED: Reply = Reply::new(
    452,
    "4.3.1",
    "Error: insufficient system resources, try again later",
);
pub const STORAGE_ERROR: Reply = Reply::new(451, "4.3.0", "Error: local error in processing");
pub const SHUTTING_DOWN: Reply = Reply::new(
    421,
    "4.3.2",
    "Service shutting down, closing transmission channel",
);
pub const TIMEOUT: Reply = Reply::new(421, "4.4.2", "Error: timeout exceeded");
pub const TOO_MANY_CONNECTIONS: Reply = Reply::new(
    421,
    "4.7.0",
    "Error: too many connections, closing transmission channel",
);
pub const TOO_MANY_ERRORS: Reply = Reply::new(
    421,
    "4.7.0",
    "Error: too many errors, closing transmission channel",
);
pub const BYE: Reply = Reply::new(221, "2.0.0", "Bye");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_line_has_enhanced_code() {
        let mut out = Vec::new();
        RCPT_OK.write_to(&mut out);
        assert_eq!(out, b"250 2.1.5 Recipient ok\r\n");
    }

    #[test]
    fn multiline_marks_all_but_last() {
        let mut out = Vec::new();
        write_multiline(&mut out, 250, None, ["mx.example", "PIPELINING", "SIZE 10"]);
        assert_eq!(out, b"250-mx.example\r\n250-PIPELINING\r\n250 SIZE 10\r\n");
    }

    #[test]
    fn final_lines_are_counted_once_with_their_status() {
        let mut out = Vec::new();
        write_line(&mut out, 220, None, "mx.test ESMTP", true);
        write_multiline(&mut out, 250, None, ["mx.test", "PIPELINING", "SIZE 10"]);
        RCPT_OK.write_to(&mut out);
        BUDGET_EXCEEDED.write_to(&mut out);
        write_line(&mut out, 250, Some("2.0.0"), "", true);
        let mut seen = Vec::new();
        for_each_final(&out, |code, status| {
            seen.push((code, status.map(str::to_owned)))
        });
        let want: Vec<(u16, Option<String>)> = vec![
            (220, None),
            (250, None),
            (250, Some("2.1.5".into())),
            (452, Some("4.3.1".into())),
            (250, Some("2.0.0".into())),
        ];
        assert_eq!(seen, want);
    }
}
