//! Sans-IO parser for SMTP server replies (RFC 5321 4.2, 4.2.1).
//!
//! Owns only the wire format: finding one complete, possibly multi-line reply
//! (`250-first`, `250-second`, `250 last`) at the front of a receive buffer,
//! checking that every line carries the same three-digit code, and bounding
//! how much a server may send before it counts as a protocol error. It never
//! decides what a reply *means* for the session; `session` does.
//!
//! Everything here treats the input as untrusted: any byte sequence yields
//! either a reply, "need more bytes", or a [`ReplyError`], never a panic.

use std::fmt;

/// Longest reply line accepted, CRLF included. RFC 5321 4.5.3.1.5 sets 512;
/// real servers exceed it in EHLO and rejection texts, so allow some slack.
pub const MAX_LINE: usize = 4096;
/// Longest multi-line reply accepted, all lines together.
pub const MAX_REPLY: usize = 64 * 1024;

/// One complete reply borrowed from the receive buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply<'a> {
    /// The reply code, 200..=599.
    pub code: u16,
    /// The raw reply, all lines with their line ends.
    raw: &'a [u8],
}

impl<'a> Reply<'a> {
    /// The reply class: 2, 3, 4 or 5.
    pub fn class(&self) -> u8 {
        // invariant: `parse` only accepts codes 200..=599.
        (self.code / 100) as u8
    }

    /// The text of each line (after `code-` / `code `), line end removed.
    pub fn lines(&self) -> impl Iterator<Item = &'a [u8]> {
        self.raw
            .split_inclusive(|&b| b == b'\n')
            .map(|line| strip_line_end(line).get(4..).unwrap_or(&[]))
    }

    /// The first line's text, lossily decoded, for diagnostics.
    pub fn first_line(&self) -> String {
        String::from_utf8_lossy(self.lines().next().unwrap_or(&[])).into_owned()
    }
}

/// Why the bytes at the front of the buffer are not a valid reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyError {
    /// A line does not start with a code 200..=599.
    BadCode,
    /// The fourth byte of a line is neither `-`, space nor the line end.
    BadSeparator,
    /// A continuation line carries a different code than the first line.
    CodeMismatch,
    /// A line is longer than [`MAX_LINE`].
    LineTooLong,
    /// The reply is longer than [`MAX_REPLY`].
    ReplyTooLong,
}

impl fmt::Display for ReplyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ReplyError::BadCode => "reply line does not start with a code 200..599",
            ReplyError::BadSeparator => "reply code not followed by '-', ' ' or CRLF",
            ReplyError::CodeMismatch => "multi-line reply changes its code",
            ReplyError::LineTooLong => "reply line too long",
            ReplyError::ReplyTooLong => "multi-line reply too long",
        })
    }
}

impl std::error::Error for ReplyError {}

/// Parses one reply from the front of `buf`.
///
/// Returns `Ok(Some((reply, consumed)))` when a whole reply is present,
/// `Ok(None)` when more bytes are needed, and `Err` when the bytes can never
/// become a valid reply. Lines end in CRLF; a bare LF is tolerated, as most
/// clients do.
pub fn parse(buf: &[u8]) -> Result<Option<(Reply<'_>, usize)>, ReplyError> {
    let mut code = None;
    let mut pos = 0;
    loop {
        let rest = &buf[pos..];
        let Some(nl) = memchr(b'\n', rest) else {
            // Incomplete line: judge what is there already so that garbage
            // fails fast instead of waiting for a line end that never comes.
            check_prefix(rest, code)?;
            if rest.len() >= MAX_LINE {
                return Err(ReplyError::LineTooLong);
            }
            if pos + rest.len() >= MAX_REPLY {
                return Err(ReplyError::ReplyTooLong);
            }
            return Ok(None);
        };
        let line_len = nl + 1;
        if line_len > MAX_LINE {
            return Err(ReplyError::LineTooLong);
        }
        let line = strip_line_end(&rest[..line_len]);
        let this = check_prefix(line, code)?.ok_or(ReplyError::BadCode)?;
        code = Some(this);
        pos += line_len;
        if pos > MAX_REPLY {
            return Err(ReplyError::ReplyTooLong);
        }
        // `250-text` continues; `250 text` and a bare `250` end the reply.
        if line.get(3) != Some(&b'-') {
            let reply = Reply {
                code: this,
                raw: &buf[..pos],
            };
            return Ok(Some((reply, pos)));
        }
    }
}

/// Validates the start of a line (possibly incomplete) and returns its code
/// once all three digits are present.
fn check_prefix(line: &[u8], expected: Option<u16>) -> Result<Option<u16>, ReplyError> {
    let digits = &line[..line.len().min(3)];
    for (i, &b) in digits.iter().enumerate() {
        let ok = match i {
            0 => (b'2'..=b'5').contains(&b),
            _ => b.is_ascii_digit(),
        };
        if !ok {
            return Err(ReplyError::BadCode);
        }
    }
    if digits.len() < 3 {
        return Ok(None);
    }
    let code = digits
        .iter()
        .fold(0u16, |acc, &b| acc * 10 + u16::from(b - b'0'));
    match line.get(3) {
        None | Some(b'-') | Some(b' ') => {}
        Some(b'\r') if line.len() == 4 => {}
        Some(_) => return Err(ReplyError::BadSeparator),
    }
    if expected.is_some_and(|e| e != code) {
        return Err(ReplyError::CodeMismatch);
    }
    Ok(Some(code))
}

fn strip_line_end(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

fn memchr(needle: u8, hay: &[u8]) -> Option<usize> {
    hay.iter().position(|&b| b == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(input: &[u8]) -> (u16, Vec<Vec<u8>>, usize) {
        let (reply, used) = parse(input).unwrap().unwrap();
        (
            reply.code,
            reply.lines().map(<[u8]>::to_vec).collect(),
            used,
        )
    }

    #[test]
    fn single_line() {
        let (code, lines, used) = one(b"250 2.1.0 Ok\r\nrest");
        assert_eq!(code, 250);
        assert_eq!(lines, vec![b"2.1.0 Ok".to_vec()]);
        assert_eq!(used, 14);
    }

    #[test]
    fn multi_line_and_empty_text() {
        let input = b"250-smtp-sink\r\n250-PIPELINING\r\n250 \r\n";
        let (code, lines, used) = one(input);
        assert_eq!(code, 250);
        assert_eq!(
            lines,
            vec![b"smtp-sink".to_vec(), b"PIPELINING".to_vec(), Vec::new()]
        );
        assert_eq!(used, input.len());
    }

    #[test]
    fn bare_code_and_bare_lf() {
        assert_eq!(one(b"221\r\n").0, 221);
        assert_eq!(one(b"354 go\n").0, 354);
    }

    #[test]
    fn incomplete_needs_more() {
        for input in [
            &b""[..],
            b"2",
            b"25",
            b"250",
            b"250-a\r\n",
            b"250-a\r\n250 b",
            b"250 b\r",
        ] {
            assert_eq!(
                parse(input),
                Ok(None),
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn every_prefix_of_a_valid_reply_is_incomplete() {
        let input = b"250-x\r\n250-y\r\n250 z\r\n";
        for end in 0..input.len() {
            assert_eq!(parse(&input[..end]), Ok(None), "prefix {end}");
        }
        assert!(parse(input).unwrap().is_some());
    }

    #[test]
    fn malformed() {
        assert_eq!(parse(b"hello\r\n"), Err(ReplyError::BadCode));
        assert_eq!(parse(b"h"), Err(ReplyError::BadCode));
        assert_eq!(parse(b"150 x\r\n"), Err(ReplyError::BadCode));
        assert_eq!(parse(b"2a0 x\r\n"), Err(ReplyError::BadCode));
        assert_eq!(parse(b"250x\r\n"), Err(ReplyError::BadSeparator));
        assert_eq!(parse(b"250-a\r\n251 b\r\n"), Err(ReplyError::CodeMismatch));
        assert_eq!(parse(b"250-a\r\n25"), Ok(None));
        assert_eq!(parse(b"250-a\r\n251"), Err(ReplyError::CodeMismatch));
        assert_eq!(parse(b"\r\n"), Err(ReplyError::BadCode));
    }

    #[test]
    fn limits() {
        let mut long = b"250 ".to_vec();
        long.resize(MAX_LINE + 10, b'a');
        assert_eq!(parse(&long), Err(ReplyError::LineTooLong));
        long.extend_from_slice(b"\r\n");
        assert_eq!(parse(&long), Err(ReplyError::LineTooLong));

        let mut many = Vec::new();
        while many.len() <= MAX_REPLY {
            many.extend_from_slice(b"250-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\r\n");
        }
        assert_eq!(parse(&many), Err(ReplyError::ReplyTooLong));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A small deterministic fuzz: every outcome is fine except a panic
        // or a consumed length beyond the input.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let alphabet = b"0123456789 -\r\n2345aZ";
        for _ in 0..20_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let len = (state % 24) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|i| alphabet[((state >> (i % 60)) as usize + i) % alphabet.len()])
                .collect();
            if let Ok(Some((reply, used))) = parse(&bytes) {
                assert!(used <= bytes.len());
                assert!((200..600).contains(&reply.code));
                let _ = reply.lines().count();
            }
        }
    }
}
