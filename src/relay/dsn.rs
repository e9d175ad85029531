//! Bounces: RFC 3464 delivery status notifications, built as a new message
//! from the null sender to the original sender.
//!
//! Never bounces a bounce (null reverse-path), and honours NOTIFY (RFC 3461
//! 4.1): a recipient with NOTIFY=NEVER, or with a NOTIFY list lacking
//! FAILURE, produces no failure report.

use std::time::SystemTime;

use crate::smtp::envelope::rfc5322_date;

/// One failed recipient, for the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failed {
    pub addr: String,
    /// ORCPT as received (`rfc822;...`), if any.
    pub orcpt: Option<String>,
    /// The remote reply or our reason, e.g. `550 5.1.1 No such user`.
    pub diagnostic: String,
    /// Who said so (`mx.example.net`), if it was a remote server.
    pub remote: Option<String>,
}

/// Whether a failure report is wanted for a recipient with this NOTIFY.
pub fn wants_failure_report(notify: Option<&str>) -> bool {
    match notify {
        None => true,
        Some(n) => n.split(',').any(|w| w.eq_ignore_ascii_case("FAILURE")),
    }
}

/// The status code (`5.1.1`) inside a diagnostic, or a generic one.
fn status_of(diagnostic: &str) -> String {
    diagnostic
        .split_ascii_whitespace()
        .nth(1)
        .filter(|s| {
            let p: Vec<&str> = s.split('.').collect();
            p.len() == 3
                && p.iter()
                    .all(|x| !x.is_empty() && x.bytes().all(|b| b.is_ascii_digit()))
        })
        .map_or_else(|| "5.0.0".to_owned(), str::to_owned)
}

/// Builds the bounce message (headers and a multipart/report body). `original`
/// is the stored message; only its header is returned unless `ret_full`.
#[allow(clippy::too_many_arguments)]
pub fn build(
    hostname: &str,
    id: &str,
    sender: &str,
    envid: Option<&str>,
    failed: &[Failed],
    original: &[u8],
    ret_full: bool,
    now: SystemTime,
) -> Vec<u8> {
    let boundary = format!("{id}/{hostname}");
    let date = rfc5322_date(now);
    let mut m = String::with_capacity(2048);
    m.push_str(&format!(
        "From: Mail Delivery System <MAILER-DAEMON@{hostname}>\r\n"
    ));
    m.push_str(&format!("To: <{sender}>\r\n"));
    m.push_str("Subject: Undelivered Mail Returned to Sender\r\n");
    m.push_str(&format!("Date: {date}\r\n"));
    m.push_str(&format!("Message-ID: <{id}.bounce@{hostname}>\r\n"));
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
        "This is the mail system at host {hostname}.\r\n\r\nYour message could not be delivered to one or more recipients:\r\n\r\n"
    ));
    for f in failed {
        m.push_str(&format!("<{}>: {}\r\n", f.addr, f.diagnostic));
    }
    m.push_str(&format!(
        "\r\n--{boundary}\r\nContent-Type: message/delivery-status\r\n\r\n"
    ));
    m.push_str(&format!("Reporting-MTA: dns; {hostname}\r\n"));
    if let Some(envid) = envid {
        m.push_str(&format!("Original-Envelope-Id: {envid}\r\n"));
    }
    m.push_str(&format!("Arrival-Date: {date}\r\n"));
    for f in failed {
        m.push_str("\r\n");
        if let Some(o) = &f.orcpt {
            m.push_str(&format!("Original-Recipient: {o}\r\n"));
        }
        m.push_str(&format!("Final-Recipient: rfc822; {}\r\n", f.addr));
        m.push_str("Action: failed\r\n");
        m.push_str(&format!("Status: {}\r\n", status_of(&f.diagnostic)));
        if let Some(r) = &f.remote {
            m.push_str(&format!("Remote-MTA: dns; {r}\r\n"));
        }
        m.push_str(&format!("Diagnostic-Code: smtp; {}\r\n", f.diagnostic));
    }
    let (part_type, content): (&str, &[u8]) = if ret_full {
        ("message/rfc822", original)
    } else {
        let end = memchr::memmem::find(original, b"\r\n\r\n").map_or(original.len(), |e| e + 2);
        ("text/rfc822-headers", &original[..end])
    };
    m.push_str(&format!(
        "\r\n--{boundary}\r\nContent-Type: {part_type}\r\n\r\n"
    ));
    let mut out = m.into_bytes();
    out.extend_from_slice(content);
    if !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    out
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
    fn report_has_the_parts() {
        let original = b"Subject: hi\r\nFrom: a@example.org\r\n\r\nsecret body\r\n";
        let f = Failed {
            addr: "u@example.net".into(),
            orcpt: Some("rfc822;u@example.net".into()),
            diagnostic: "550 5.1.1 no such user".into(),
            remote: Some("mx.example.net".into()),
        };
        let b = build(
            "mx.test",
            "Q1",
            "a@example.org",
            Some("E1"),
            &[f],
            original,
            false,
            SystemTime::UNIX_EPOCH,
        );
        let s = String::from_utf8(b).unwrap();
        assert!(s.contains("Content-Type: multipart/report; report-type=delivery-status;"));
        assert!(s.contains(
            "Final-Recipient: rfc822; u@example.net\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        ));
        assert!(s.contains("Original-Envelope-Id: E1\r\n"));
        assert!(s.contains("Subject: hi\r\n"));
        assert!(!s.contains("secret body"), "RET=HDRS returns headers only");
        assert!(s.ends_with("--Q1/mx.test--\r\n"));
    }
}
