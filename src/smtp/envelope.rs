//! The owned result of a transaction: envelope and content, handed from the
//! session to the spool. Also the `Received:` trace header (RFC 5321 4.4),
//! rendered from facts the session gathered and a time the caller passes in.

use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::smtp::command::{Body, Notify, Ret};

/// One accepted message, before it is durable.
#[derive(Debug)]
pub struct Message {
    pub envelope: Envelope,
    /// The content as received (unstuffed), without the trace header.
    pub body: Vec<u8>,
}

#[derive(Debug, Clone)]
pub struct Envelope {
    pub peer: SocketAddr,
    pub helo: String,
    pub protocol: Protocol,
    /// `None` is the null reverse-path.
    pub mail_from: Option<String>,
    pub size: Option<u64>,
    pub body: Option<Body>,
    pub smtputf8: bool,
    pub ret: Option<Ret>,
    pub envid: Option<String>,
    pub rcpts: Vec<Rcpt>,
    /// The content came in BDAT chunks.
    pub chunked: bool,
    /// The source-IP pool a trusted client chose (`X-Ringmta-Pool`, taken
    /// out of the content at intake; see `relay::shaping`).
    pub pool: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rcpt {
    pub addr: String,
    pub notify: Option<Notify>,
    pub orcpt: Option<String>,
}

/// The negotiated TLS parameters of a connection, for the trace header
/// (`with ESMTPS (TLS1.3 TLS_AES_256_GCM_SHA384)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TlsInfo {
    /// `TLS1.2` or `TLS1.3`.
    pub version: &'static str,
    /// The IANA cipher suite name.
    pub cipher: &'static str,
}

/// The `with` protocol of the Received header (RFC 3848, RFC 6531 7.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Protocol {
    pub esmtp: bool,
    pub tls: bool,
    pub auth: bool,
    pub utf8: bool,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match (self.esmtp, self.utf8, self.tls, self.auth) {
            (false, _, _, _) => "SMTP",
            (true, false, false, false) => "ESMTP",
            (true, false, true, false) => "ESMTPS",
            (true, false, false, true) => "ESMTPA",
            (true, false, true, true) => "ESMTPSA",
            (true, true, false, false) => "UTF8SMTP",
            (true, true, true, false) => "UTF8SMTPS",
            (true, true, false, true) => "UTF8SMTPA",
            (true, true, true, true) => "UTF8SMTPSA",
        }
    }
}

impl Envelope {
    /// `Received: from HELO ([IP]) by HOST (ringmta) with PROTO id ID [for
    /// <rcpt>]; DATE`, folded over three lines. The `for` clause is only
    /// given for a single recipient, so one copy does not list the others.
    pub fn received_header(&self, hostname: &str, id: &str, now: SystemTime) -> String {
        self.trace_header(hostname, id, None, now)
    }

    /// [`Envelope::received_header`], with the TLS version and cipher as a
    /// comment after the protocol when the message came over TLS.
    pub fn trace_header(
        &self,
        hostname: &str,
        id: &str,
        tls: Option<&TlsInfo>,
        now: SystemTime,
    ) -> String {
        let mut h = String::with_capacity(200);
        h.push_str("Received: from ");
        h.push_str(shown_helo(&self.helo));
        if self.helo.len() > MAX_HELO_SHOWN {
            h.push_str("...");
        }
        h.push_str(" ([");
        h.push_str(&self.peer.ip().to_canonical().to_string());
        h.push_str("])\r\n\tby ");
        h.push_str(hostname);
        h.push_str(" (ringmta) with ");
        h.push_str(self.protocol.name());
        if let Some(tls) = tls {
            h.push_str(" (");
            h.push_str(tls.version);
            h.push(' ');
            h.push_str(tls.cipher);
            h.push(')');
        }
        h.push_str(" id ");
        h.push_str(id);
        if let [only] = self.rcpts.as_slice() {
            h.push_str("\r\n\tfor <");
            h.push_str(&only.addr);
            h.push('>');
        }
        h.push_str(";\r\n\t");
        h.push_str(&rfc5322_date(now));
        h.push_str("\r\n");
        h
    }
}

/// Octets of the client's EHLO/HELO name shown in the trace header (a
/// domain name has at most 255). A longer one is cut and marked `...`:
/// each line of the header stays far below RFC 5322's 998 octets, which a
/// 1500-octet EHLO name once broke (the next hop refused the message).
pub const MAX_HELO_SHOWN: usize = 255;

/// The part of `helo` the trace header shows: at most [`MAX_HELO_SHOWN`]
/// octets, cut at a character boundary.
fn shown_helo(helo: &str) -> &str {
    let mut end = helo.len().min(MAX_HELO_SHOWN);
    while !helo.is_char_boundary(end) {
        end -= 1;
    }
    &helo[..end]
}

/// RFC 5322 3.3 date-time in UTC, e.g. `Mon, 23 Nov 2026 10:54:20 +0000`.
pub fn rfc5322_date(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    // 1970-01-01 was a Thursday.
    const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{}, {} {} {} {:02}:{:02}:{:02} +0000",
        WEEKDAYS[(days % 7) as usize],
        d,
        MONTHS[(m - 1) as usize],
        y,
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian
/// (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn dates() {
        assert_eq!(rfc5322_date(UNIX_EPOCH), "Thu, 1 Jan 1970 00:00:00 +0000");
        let t = UNIX_EPOCH + Duration::from_secs(1_795_431_260);
        assert_eq!(rfc5322_date(t), "Mon, 23 Nov 2026 10:54:20 +0000");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc5322_date(leap), "Tue, 29 Feb 2000 00:00:00 +0000");
    }

    /// Regression (issue 11): a long EHLO name made a 1529-octet
    /// `Received:` line, which a downstream ringmta refused.
    #[test]
    fn long_helo_keeps_trace_lines_short() {
        for helo in [
            "h".repeat(1500),
            "\u{e9}".repeat(700),
            "short.example".into(),
        ] {
            let env = Envelope {
                peer: "[2001:db8::1]:25".parse().unwrap(),
                helo: helo.clone(),
                protocol: Protocol {
                    esmtp: true,
                    tls: false,
                    auth: false,
                    utf8: true,
                },
                mail_from: None,
                size: None,
                body: None,
                smtputf8: false,
                ret: None,
                envid: None,
                rcpts: vec![Rcpt {
                    addr: format!("{}@{}", "l".repeat(64), "d".repeat(250)),
                    notify: None,
                    orcpt: None,
                }],
                chunked: false,
                pool: None,
            };
            let tls = TlsInfo {
                version: "TLS1.3",
                cipher: "TLS_AES_256_GCM_SHA384",
            };
            let h = env.trace_header(&"m".repeat(253), "0123456789ABCDEF", Some(&tls), UNIX_EPOCH);
            assert!(h.ends_with("\r\n"));
            for line in h.split("\r\n") {
                assert!(line.len() <= 998, "a line of {} octets", line.len());
            }
            if helo.len() > MAX_HELO_SHOWN {
                assert!(h.contains("... ([2001:db8::1])"), "{h}");
            } else {
                assert!(h.starts_with("Received: from short.example ([2001:db8::1])\r\n"));
            }
        }
    }

    #[test]
    fn protocol_names() {
        let p = Protocol {
            esmtp: true,
            tls: true,
            auth: true,
            utf8: false,
        };
        assert_eq!(p.name(), "ESMTPSA");
    }
}
