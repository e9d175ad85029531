//! Bounces and delay warnings: RFC 3464 delivery status notifications,
//! built as a new message from the null sender to the original sender.
//!
//! Never reports on a report (null reverse-path), and honours NOTIFY
//! (RFC 3461 4.1): a recipient with NOTIFY=NEVER, or with a NOTIFY list
//! lacking FAILURE (or DELAY for a warning), produces no report. Without
//! NOTIFY, failures are reported, and delays too when `--delay-warning` is
//! set (RFC 3461 leaves that default to the MTA; Postfix does the same).
//!
//! Returns at most `--bounce-size-limit` octets of the original (Postfix's
//! `bounce_size_limit`, 50 KiB by default): a larger message comes back as
//! its header alone (text/rfc822-headers, RFC 6522), whatever RET asked, and
//! a header larger than the limit is cut after the last whole field that
//! fits. A bounce must never carry someone's message back in bulk: on the
//! relay port the sender it goes to can be forged.
//!
//! A diagnostic is whatever the next hop said: it is never put in a report
//! as it came. [`diagnostic_lines`] makes it printable ASCII (no CR or LF
//! can end a line early) and caps it at [`DIAGNOSTIC_LINES`] lines of at
//! most [`DIAGNOSTIC_LINE`] octets, folded in the report.

use std::time::SystemTime;

use super::client::sanitize;
use crate::smtp::envelope::rfc5322_date;

/// Octets of one line of a diagnostic in a report.
pub const DIAGNOSTIC_LINE: usize = 512;
/// Lines of a diagnostic in a report (a multi-line reply's lines are
/// joined by ` / `).
pub const DIAGNOSTIC_LINES: usize = 4;

/// One recipient in a report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipient {
    pub addr: String,
    /// ORCPT as received (`rfc822;...`), if any.
    pub orcpt: Option<String>,
    /// The remote reply or our reason, e.g. `550 5.1.1 No such user`.
    pub diagnostic: String,
    /// Who said so (`mx.example.net`), if it was a remote server.
    pub remote: Option<String>,
    /// The diagnostic's class (`relay::classify`), written as the
    /// extension field `X-Ringmta-Class` (RFC 3464 2.4: X- fields).
    pub class: Option<&'static str>,
}

/// What the report says happened to its recipients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Given up: a bounce.
    Failed,
    /// Still queued and retried until `retry_until`: a delay warning.
    Delayed { retry_until: SystemTime },
}

/// The message a report is about.
#[derive(Debug, Clone, Copy)]
pub struct Original<'a> {
    /// Its queue id.
    pub id: &'a str,
    /// The envelope sender, who gets the report.
    pub sender: &'a str,
    pub envid: Option<&'a str>,
    pub arrival: SystemTime,
    /// The stored message; only its header is returned unless `ret_full`.
    pub content: &'a [u8],
    pub ret_full: bool,
    /// Most octets of `content` the report returns (`--bounce-size-limit`).
    pub limit: usize,
}

/// Whether a failure report is wanted for a recipient with this NOTIFY.
pub fn wants_failure_report(notify: Option<&str>) -> bool {
    match notify {
        None => true,
        Some(n) => n.split(',').any(|w| w.eq_ignore_ascii_case("FAILURE")),
    }
}

/// Whether a delay warning is wanted for a recipient with this NOTIFY
/// (once warnings are enabled at all).
pub fn wants_delay_report(notify: Option<&str>) -> bool {
    match notify {
        None => true,
        Some(n) => n.split(',').any(|w| w.eq_ignore_ascii_case("DELAY")),
    }
}

/// The status code (`5.1.1`) inside a diagnostic, or a generic one of the
/// right class.
fn status_of(diagnostic: &str, action: Action) -> String {
    let generic = match action {
        Action::Failed => "5.0.0",
        Action::Delayed { .. } => "4.0.0",
    };
    diagnostic
        .split_ascii_whitespace()
        .nth(1)
        .filter(|s| {
            let p: Vec<&str> = s.split('.').collect();
            p.len() == 3
                && p.iter()
                    .all(|x| !x.is_empty() && x.bytes().all(|b| b.is_ascii_digit()))
        })
        .map_or_else(|| generic.to_owned(), str::to_owned)
}

/// `diagnostic` made safe for a report: printable ASCII only, split where
/// a multi-line reply's lines were joined, at most [`DIAGNOSTIC_LINES`]
/// lines of at most [`DIAGNOSTIC_LINE`] octets (`...` marks a cut).
pub fn diagnostic_lines(diagnostic: &str) -> Vec<String> {
    let mut lines: Vec<String> = diagnostic
        .split(" / ")
        .take(DIAGNOSTIC_LINES)
        .map(|l| sanitize(l.as_bytes(), DIAGNOSTIC_LINE))
        .collect();
    if diagnostic.split(" / ").nth(DIAGNOSTIC_LINES).is_some() {
        if let Some(last) = lines.last_mut() {
            last.truncate(DIAGNOSTIC_LINE - 4);
            last.push_str(" ...");
        }
    }
    lines
}

/// Builds the report (headers and a multipart/report body) on `original`
/// for `rcpts`.
pub fn build(
    hostname: &str,
    original: &Original<'_>,
    action: Action,
    rcpts: &[Recipient],
    now: SystemTime,
) -> Vec<u8> {
    let id = original.id;
    let (tag, subject, what) = match action {
        Action::Failed => (
            "bounce",
            "Undelivered Mail Returned to Sender".to_owned(),
            "Your message could not be delivered to one or more recipients:".to_owned(),
        ),
        Action::Delayed { retry_until } => (
            "delay",
            "Delayed Mail (still being retried)".to_owned(),
            format!(
                "Your message could not be delivered yet to one or more recipients.\r\n\
                 It is still queued and will be retried until {}.\r\n\
                 This is only a warning: you need not send the message again.",
                rfc5322_date(retry_until)
            ),
        ),
    };
    let boundary = format!("{id}/{hostname}");
    let date = rfc5322_date(now);
    let mut m = String::with_capacity(2048);
    m.push_str(&format!(
        "From: Mail Delivery System <MAILER-DAEMON@{hostname}>\r\n"
    ));
    m.push_str(&format!("To: <{}>\r\n", original.sender));
    m.push_str(&format!("Subject: {subject}\r\n"));
    m.push_str(&format!("Date: {date}\r\n"));
    m.push_str(&format!("Message-ID: <{id}.{tag}@{hostname}>\r\n"));
    m.push_str("Auto-Submitted: auto-replied\r\n");
    m.push_str("MIME-Version: 1.0\r\n");
    m.push_str(&format!(
        "Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"{boundary}\"\r\n\r\n"
    ));
    m.push_str("This is a MIME-encapsulated message.\r\n\r\n");
    m.push_str(&format!(
        "--{boundary}\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
    ));
    m.push_str(&format!(
        "This is the mail system at host {hostname}.\r\n\r\n{what}\r\n\r\n"
    ));
    for r in rcpts {
        m.push_str(&format!("<{}>:", r.addr));
        for line in diagnostic_lines(&r.diagnostic) {
            m.push_str(&format!("\r\n    {line}"));
        }
        m.push_str("\r\n");
    }
    let returned = Returned::of(original);
    if returned.cut {
        m.push_str(&format!(
            "\r\nThe original message was {} octets, more than this server returns\r\n\
             ({} octets): only its header is attached{}.\r\n",
            original.content.len(),
            original.limit,
            if returned.content.len() < header_len(original.content) {
                ", and only the first fields of that"
            } else {
                ""
            }
        ));
    }
    m.push_str(&format!(
        "\r\n--{boundary}\r\nContent-Type: message/delivery-status\r\n\r\n"
    ));
    m.push_str(&format!("Reporting-MTA: dns; {hostname}\r\n"));
    if let Some(envid) = original.envid {
        m.push_str(&format!("Original-Envelope-Id: {envid}\r\n"));
    }
    m.push_str(&format!(
        "Arrival-Date: {}\r\n",
        rfc5322_date(original.arrival)
    ));
    for r in rcpts {
        m.push_str("\r\n");
        if let Some(o) = &r.orcpt {
            m.push_str(&format!("Original-Recipient: {o}\r\n"));
        }
        m.push_str(&format!("Final-Recipient: rfc822; {}\r\n", r.addr));
        match action {
            Action::Failed => m.push_str("Action: failed\r\n"),
            Action::Delayed { .. } => m.push_str("Action: delayed\r\n"),
        }
        let status = status_of(&r.diagnostic, action);
        m.push_str(&format!("Status: {status}\r\n"));
        if let Some(remote) = &r.remote {
            m.push_str(&format!("Remote-MTA: dns; {remote}\r\n"));
        }
        // Folded (RFC 5322 2.2.3): one continuation line per reply line.
        m.push_str("Diagnostic-Code: smtp;");
        for line in diagnostic_lines(&r.diagnostic) {
            m.push_str(&format!("\r\n {line}"));
        }
        m.push_str("\r\n");
        if let Some(class) = r.class {
            m.push_str(&format!("X-Ringmta-Class: {class}\r\n"));
        }
        if let Action::Delayed { retry_until } = action {
            m.push_str(&format!(
                "Will-Retry-Until: {}\r\n",
                rfc5322_date(retry_until)
            ));
        }
    }
    m.push_str(&format!(
        "\r\n--{boundary}\r\nContent-Type: {}\r\n\r\n",
        returned.part_type
    ));
    let mut out = m.into_bytes();
    out.extend_from_slice(returned.content);
    if !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    out
}

/// What a report returns of the original.
struct Returned<'a> {
    part_type: &'static str,
    content: &'a [u8],
    /// RET=FULL was asked, and the message was over the limit.
    cut: bool,
}

impl Returned<'_> {
    fn of<'a>(original: &Original<'a>) -> Returned<'a> {
        let content = original.content;
        if original.ret_full && content.len() <= original.limit {
            return Returned {
                part_type: "message/rfc822",
                content,
                cut: false,
            };
        }
        let header = &content[..header_len(content)];
        Returned {
            part_type: "text/rfc822-headers",
            content: whole_fields(header, original.limit),
            cut: original.ret_full,
        }
    }
}

/// The length of the header section, up to and including the CRLF that
/// ends its last field (all of `content` when no empty line follows).
fn header_len(content: &[u8]) -> usize {
    if content.starts_with(b"\r\n") {
        return 0;
    }
    memchr::memmem::find(content, b"\r\n\r\n").map_or(content.len(), |e| e + 2)
}

/// The longest prefix of `header` within `limit` octets that ends after a
/// whole field (at a CRLF not followed by a folded continuation line).
fn whole_fields(header: &[u8], limit: usize) -> &[u8] {
    if header.len() <= limit {
        return header;
    }
    let mut end = limit;
    while let Some(p) = memchr::memmem::rfind(&header[..end], b"\r\n") {
        let cut = p + 2;
        if !matches!(header.get(cut), Some(b' ' | b'\t')) {
            return &header[..cut];
        }
        end = p + 1;
    }
    &[]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_rules() {
        assert!(wants_failure_report(None));
        assert!(wants_failure_report(Some("SUCCESS,FAILURE")));
        assert!(!wants_failure_report(Some("NEVER")));
        assert!(!wants_failure_report(Some("DELAY")));
    }

    #[test]
    fn delay_notify_rules() {
        assert!(wants_delay_report(None));
        assert!(wants_delay_report(Some("FAILURE,DELAY")));
        assert!(!wants_delay_report(Some("NEVER")));
        assert!(!wants_delay_report(Some("FAILURE")));
    }

    fn original(content: &[u8]) -> Original<'_> {
        Original {
            id: "Q1",
            sender: "a@example.org",
            envid: Some("E1"),
            arrival: SystemTime::UNIX_EPOCH,
            content,
            ret_full: false,
            limit: 51_200,
        }
    }

    fn rcpt(diagnostic: &str) -> Recipient {
        Recipient {
            addr: "u@example.net".into(),
            orcpt: Some("rfc822;u@example.net".into()),
            diagnostic: diagnostic.into(),
            remote: Some("mx.example.net".into()),
            class: Some("bad-mailbox"),
        }
    }

    #[test]
    fn report_has_the_parts() {
        let content = b"Subject: hi\r\nFrom: a@example.org\r\n\r\nsecret body\r\n";
        let now = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(86_400);
        let b = build(
            "mx.test",
            &original(content),
            Action::Failed,
            &[rcpt("550 5.1.1 no such user")],
            now,
        );
        let s = String::from_utf8(b).unwrap();
        assert!(s.contains("Content-Type: multipart/report; report-type=delivery-status;"));
        assert!(s.contains(
            "Final-Recipient: rfc822; u@example.net\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        ));
        assert!(s.contains("Original-Envelope-Id: E1\r\n"));
        // The arrival, not the time of the report.
        assert!(
            s.contains("Arrival-Date: Thu, 1 Jan 1970 00:00:00 +0000\r\n"),
            "{s}"
        );
        assert!(s.contains("Subject: hi\r\n"));
        assert!(!s.contains("secret body"), "RET=HDRS returns headers only");
        assert!(!s.contains("Will-Retry-Until"));
        assert!(s.contains("X-Ringmta-Class: bad-mailbox\r\n"), "{s}");
        assert!(s.ends_with("--Q1/mx.test--\r\n"));
    }

    /// Regression (issue 11): the next hop's reply text went into bounces
    /// unsanitised: a bare CR, 8-bit octets, any length.
    #[test]
    fn hostile_diagnostic_is_sanitised_and_capped() {
        let mut hostile = "550 5.1.1 bad\r.\rMAIL FROM:<x@example.org>\u{0}caf\u{e9}".to_owned();
        hostile.push_str(&"y".repeat(3000));
        for n in 0..20 {
            hostile.push_str(&format!(" / line {n}\r\n"));
        }
        let b = build(
            "mx.test",
            &original(b"Subject: hi\r\n\r\nbody\r\n"),
            Action::Failed,
            &[rcpt(&hostile)],
            SystemTime::UNIX_EPOCH,
        );
        for (i, &c) in b.iter().enumerate() {
            assert!(
                matches!(c, b'\r' | b'\n' | b'\t' | 0x20..=0x7e),
                "octet {c:#x}"
            );
            if c == b'\r' {
                assert_eq!(b.get(i + 1), Some(&b'\n'), "bare CR at {i}");
            }
            if c == b'\n' {
                assert_eq!(b[i - 1], b'\r', "bare LF at {i}");
            }
        }
        let s = String::from_utf8(b).unwrap();
        for line in s.split("\r\n") {
            assert!(line.len() <= DIAGNOSTIC_LINE + 8, "{} octets", line.len());
        }
        assert!(s.contains("Diagnostic-Code: smtp;\r\n 550 5.1.1 bad\\x0D.\\x0DMAIL FROM:<x@example.org>\\x00caf\\xC3\\xA9yyy"), "{s}");
        assert!(s.contains("Status: 5.1.1\r\n"));
        assert!(s.contains(" line 2\\x0D\\x0A ...\r\n"), "{s}");
        assert!(!s.contains("line 3"));
    }

    #[test]
    fn delay_warning_says_delayed_and_until_when() {
        let content = b"Subject: hi\r\n\r\nbody\r\n";
        let until = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(5 * 86_400);
        let b = build(
            "mx.test",
            &original(content),
            Action::Delayed { retry_until: until },
            &[rcpt("451 4.3.0 try later"), {
                let mut r = rcpt("connection refused");
                r.addr = "v@example.net".into();
                r.remote = None;
                r
            }],
            until,
        );
        let s = String::from_utf8(b).unwrap();
        assert!(s.contains("Subject: Delayed Mail (still being retried)\r\n"));
        assert!(s.contains("Message-ID: <Q1.delay@mx.test>\r\n"));
        assert!(s.contains(
            "Final-Recipient: rfc822; u@example.net\r\nAction: delayed\r\nStatus: 4.3.0\r\n"
        ));
        assert!(s.contains(
            "Final-Recipient: rfc822; v@example.net\r\nAction: delayed\r\nStatus: 4.0.0\r\n"
        ));
        assert!(
            s.contains("Will-Retry-Until: Tue, 6 Jan 1970 00:00:00 +0000\r\n"),
            "{s}"
        );
    }

    fn returned_part(s: &str) -> (&str, &str) {
        let boundary = "--Q1/mx.test";
        let last = s
            .rsplit_once(&format!("\r\n{boundary}\r\nContent-Type: "))
            .map(|(_, p)| p)
            .expect("a last part");
        let (ty, rest) = last.split_once("\r\n\r\n").expect("part header");
        (
            ty,
            rest.strip_suffix(&format!("\r\n{boundary}--\r\n"))
                .expect("closing boundary"),
        )
    }

    fn bounce(content: &[u8], ret_full: bool, limit: usize) -> String {
        let o = Original {
            ret_full,
            limit,
            ..original(content)
        };
        let b = build(
            "mx.test",
            &o,
            Action::Failed,
            &[rcpt("550 5.1.1 no such user")],
            SystemTime::UNIX_EPOCH,
        );
        String::from_utf8(b).unwrap()
    }

    #[test]
    fn ret_full_returns_a_message_within_the_limit_whole() {
        let content = "Subject: small\r\n\r\nthe body\r\n";
        let s = bounce(content.as_bytes(), true, content.len());
        assert_eq!(returned_part(&s), ("message/rfc822", content));
        assert!(!s.contains("more than this server returns"), "{s}");
    }

    #[test]
    fn bounce_size_limit_returns_headers_only_above_it() {
        let content = format!(
            "Subject: big\r\nX-Folded: a\r\n\tb\r\n\r\n{}",
            "body line\r\n".repeat(10_000)
        );
        let s = bounce(content.as_bytes(), true, 51_200);
        let (ty, part) = returned_part(&s);
        assert_eq!(ty, "text/rfc822-headers");
        assert_eq!(part, "Subject: big\r\nX-Folded: a\r\n\tb\r\n");
        assert!(!s.contains("body line"));
        assert!(
            s.contains(&format!(
                "The original message was {} octets, more than this server returns\r\n(51200 octets)",
                content.len()
            )),
            "{s}"
        );
        // RET=HDRS: headers, and nothing to explain.
        let s = bounce(b"Subject: x\r\n\r\nbody\r\n", false, 51_200);
        assert_eq!(returned_part(&s), ("text/rfc822-headers", "Subject: x\r\n"));
        assert!(!s.contains("more than this server returns"));
    }

    #[test]
    fn a_header_over_the_limit_is_cut_after_a_whole_field() {
        let content = "A: 1\r\nB: 2\r\n\tcontinued\r\nC: 3\r\n\r\nbody\r\n";
        // The limit falls inside the folded B field: B goes entirely.
        let within_b = "A: 1\r\nB: 2\r\n\tcont".len();
        let s = bounce(content.as_bytes(), true, within_b);
        assert_eq!(returned_part(&s), ("text/rfc822-headers", "A: 1\r\n"));
        assert!(s.contains("and only the first fields of that"), "{s}");
        // Exactly at a field's end, that field stays.
        let at_b_end = "A: 1\r\nB: 2\r\n\tcontinued\r\n".len();
        let s = bounce(content.as_bytes(), false, at_b_end);
        assert_eq!(
            returned_part(&s),
            ("text/rfc822-headers", "A: 1\r\nB: 2\r\n\tcontinued\r\n")
        );
        // A header with no empty line after it, and a limit of 0.
        assert_eq!(whole_fields(b"A: 1\r\nB: 2", 8), b"A: 1\r\n");
        assert_eq!(whole_fields(b"A: 1\r\n", 0), b"");
        assert_eq!(header_len(b"\r\nbody"), 0);
        assert_eq!(header_len(b"A: 1\r\n"), 6);
    }
}
