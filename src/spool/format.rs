//! The envelope block of a spool record: text lines, CRLF-terminated. The
//! record's body is the message as it will be relayed (trace header first).
//!
//! ```text
//! ringmta-spool 1
//! id 0005f1c2a3b4c5000001
//! arrival 1795431260
//! peer 127.0.0.1:41234
//! helo client.example
//! protocol ESMTP
//! mail-from <sender@example.org>
//! param BODY=8BITMIME
//! rcpt <user@localhost>
//! rcpt-notify SUCCESS,FAILURE
//! rcpt-orcpt rfc822;user@localhost
//! pool bulk
//! ```
//!
//! Every value was validated by the parser (no CR/LF). `pool` (the
//! source-IP pool a trusted client chose) is optional: records written
//! before it existed have none.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::smtp::command::{Body, Ret};
use crate::smtp::Envelope as SmtpEnvelope;

pub const MAGIC: &str = "ringmta-spool 1";

/// Encodes the envelope block.
pub fn encode_envelope(id: &str, env: &SmtpEnvelope, now: SystemTime) -> Vec<u8> {
    let mut h = String::with_capacity(256 + 64 * env.rcpts.len());
    let mut line = |s: &str| {
        h.push_str(s);
        h.push_str("\r\n");
    };
    line(MAGIC);
    line(&format!("id {id}"));
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    line(&format!("arrival {secs}"));
    let millis = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis());
    line(&format!("arrival-ms {millis}"));
    line(&format!("peer {}", env.peer));
    line(&format!("helo {}", env.helo));
    line(&format!("protocol {}", env.protocol.name()));
    line(&format!(
        "mail-from <{}>",
        env.mail_from.as_deref().unwrap_or("")
    ));
    if let Some(size) = env.size {
        line(&format!("param SIZE={size}"));
    }
    match env.body {
        Some(Body::SevenBit) => line("param BODY=7BIT"),
        Some(Body::EightBitMime) => line("param BODY=8BITMIME"),
        None => {}
    }
    if env.smtputf8 {
        line("param SMTPUTF8");
    }
    match env.ret {
        Some(Ret::Full) => line("param RET=FULL"),
        Some(Ret::Hdrs) => line("param RET=HDRS"),
        None => {}
    }
    if let Some(envid) = &env.envid {
        line(&format!("param ENVID={envid}"));
    }
    if env.chunked {
        line("chunked");
    }
    // The address is alone on its line (a quoted local part may hold '>' or
    // spaces); its DSN parameters follow on lines of their own.
    for r in &env.rcpts {
        line(&format!("rcpt <{}>", r.addr));
        if let Some(n) = r.notify {
            line(&format!("rcpt-notify {}", n.to_param()));
        }
        if let Some(o) = &r.orcpt {
            line(&format!("rcpt-orcpt {o}"));
        }
    }
    if let Some(pool) = &env.pool {
        line(&format!("pool {pool}"));
    }
    h.into_bytes()
}

/// An envelope block, parsed back.
#[derive(Debug, PartialEq, Eq)]
pub struct Envelope<'a> {
    pub id: &'a str,
    /// Arrival, Unix seconds.
    pub arrival: u64,
    /// Arrival, Unix milliseconds (records written before it existed lack it).
    pub arrival_ms: Option<u64>,
    /// `None` for the null reverse-path.
    pub mail_from: Option<&'a str>,
    /// Recipient addresses, in order.
    pub rcpts: Vec<&'a str>,
    /// The source-IP pool chosen at intake, if any.
    pub pool: Option<&'a str>,
    /// Every line after the magic, for inspection.
    pub lines: Vec<&'a str>,
}

/// Parses an envelope block; `None` if it is not in this format.
pub fn decode_envelope(block: &str) -> Option<Envelope<'_>> {
    let mut lines = block.split("\r\n").filter(|l| !l.is_empty());
    if lines.next()? != MAGIC {
        return None;
    }
    let lines: Vec<&str> = lines.collect();
    let field = |name: &str| {
        lines
            .iter()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
    };
    let id = field("id")?;
    let arrival = field("arrival")?.parse().ok()?;
    let arrival_ms = field("arrival-ms").and_then(|v| v.parse().ok());
    let from = field("mail-from")?.strip_prefix('<')?.strip_suffix('>')?;
    let rcpts = lines
        .iter()
        .filter_map(|l| l.strip_prefix("rcpt <")?.strip_suffix('>'))
        .collect();
    Some(Envelope {
        id,
        arrival,
        arrival_ms,
        mail_from: (!from.is_empty()).then_some(from),
        rcpts,
        pool: field("pool"),
        lines,
    })
}

/// Each recipient of an envelope block with its DSN parameters, in order:
/// `(address, NOTIFY, ORCPT)`.
pub fn rcpt_params(block: &str) -> Vec<(String, Option<String>, Option<String>)> {
    let mut out: Vec<(String, Option<String>, Option<String>)> = Vec::new();
    for l in block.split("\r\n") {
        if let Some(a) = l.strip_prefix("rcpt <").and_then(|a| a.strip_suffix('>')) {
            out.push((a.to_owned(), None, None));
        } else if let (Some(n), Some(last)) = (l.strip_prefix("rcpt-notify "), out.last_mut()) {
            last.1 = Some(n.to_owned());
        } else if let (Some(o), Some(last)) = (l.strip_prefix("rcpt-orcpt "), out.last_mut()) {
            last.2 = Some(o.to_owned());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::envelope::{Protocol, Rcpt};

    fn envelope(pool: Option<&str>) -> SmtpEnvelope {
        SmtpEnvelope {
            peer: "127.0.0.1:1234".parse().unwrap(),
            helo: "client.test".into(),
            protocol: Protocol {
                esmtp: true,
                tls: false,
                auth: false,
                utf8: false,
            },
            mail_from: Some("s@example.org".into()),
            size: None,
            body: None,
            smtputf8: false,
            ret: None,
            envid: None,
            rcpts: vec![Rcpt {
                addr: "u@example.net".into(),
                notify: None,
                orcpt: None,
            }],
            chunked: false,
            pool: pool.map(str::to_owned),
        }
    }

    #[test]
    fn the_pool_line_round_trips_and_old_records_have_none() {
        let with = encode_envelope("id1", &envelope(Some("bulk")), UNIX_EPOCH);
        let with = String::from_utf8(with).unwrap();
        assert!(with.ends_with("pool bulk\r\n"), "{with}");
        assert_eq!(decode_envelope(&with).unwrap().pool, Some("bulk"));
        let without =
            String::from_utf8(encode_envelope("id2", &envelope(None), UNIX_EPOCH)).unwrap();
        assert!(!without.contains("\r\npool "), "{without}");
        let old = decode_envelope(&without).unwrap();
        assert_eq!(
            (old.pool, old.rcpts.as_slice()),
            (None, &["u@example.net"][..])
        );
    }
}
