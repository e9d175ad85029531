//! Message completion on the submission path (RFC 6409 8): which header
//! fields a submitted message lacks, rendered as a block the spool stores in
//! front of the content.
//!
//! Owns reading the header section of a message (unfolding, case-insensitive
//! names, the addresses in `From:`), including which domains a DKIM
//! signature may be made for ([`author_domains`]). It only ever *adds* fields: the content
//! as received stays byte-exact after the added block, so a signature the
//! client made over it survives. It must never rewrite or remove a field,
//! never allocate a copy of the body, and never read a clock: the date and
//! the Message-ID are passed in.

use memchr::memmem;

/// What to add when missing.
#[derive(Debug, Clone, Copy)]
pub struct Completion<'a> {
    /// RFC 5322 date-time for a missing `Date:`.
    pub date: &'a str,
    /// `<unique@host>` for a missing `Message-ID:`.
    pub message_id: &'a str,
    /// The authenticated user's address: a `Sender:` with it is added when
    /// `From:` names someone else and no `Sender:` is present (RFC 6409
    /// 8.1). `None`: never add `Sender:`.
    pub sender: Option<&'a str>,
}

/// The header fields `body` lacks, as `Name: value CRLF` lines (empty when
/// nothing is missing). A message without a header section gets the fields
/// and the empty line that ends a header section.
pub fn missing_headers(body: &[u8], c: &Completion<'_>) -> Vec<u8> {
    let header = header_section(body);
    let mut has_date = false;
    let mut has_message_id = false;
    let mut has_sender = false;
    let mut from_matches = None;
    for (name, value) in fields(header) {
        if name.eq_ignore_ascii_case(b"Date") {
            has_date = true;
        } else if name.eq_ignore_ascii_case(b"Message-ID") {
            has_message_id = true;
        } else if name.eq_ignore_ascii_case(b"Sender") {
            has_sender = true;
        } else if name.eq_ignore_ascii_case(b"From") {
            if let Some(me) = c.sender {
                from_matches = Some(names_address(&value, me));
            }
        }
    }
    let mut out = Vec::new();
    if !has_date {
        push_field(&mut out, "Date", c.date);
    }
    if !has_message_id {
        push_field(&mut out, "Message-ID", c.message_id);
    }
    if let (Some(me), Some(false), false) = (c.sender, from_matches, has_sender) {
        push_field(&mut out, "Sender", &format!("<{me}>"));
    }
    if !out.is_empty() && header.is_empty() {
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// The domains a DKIM signature of this message may be made for, best
/// first: those of the `From:` addresses, then that of `Sender:`, found in
/// `blocks` (the fields submission added, then the message as received).
/// Lower case, without duplicates. Empty when there is no `From:` field: a
/// signature must cover it (RFC 6376 5.4), so such a message is not signed.
pub fn author_domains(blocks: &[&[u8]]) -> Vec<String> {
    let mut from = Vec::new();
    let mut sender = Vec::new();
    let mut has_from = false;
    for block in blocks {
        let header = header_section(block);
        for (name, value) in fields(header) {
            let list = if name.eq_ignore_ascii_case(b"From") {
                has_from = true;
                &mut from
            } else if name.eq_ignore_ascii_case(b"Sender") {
                &mut sender
            } else {
                continue;
            };
            let value = String::from_utf8_lossy(&value);
            list.extend(addresses(&value).into_iter().filter_map(domain_of));
        }
        if header.len() < block.len() {
            // The header section ended in this block: the rest is body.
            break;
        }
    }
    if !has_from {
        return Vec::new();
    }
    let mut out: Vec<String> = Vec::with_capacity(from.len() + sender.len());
    for d in from.into_iter().chain(sender) {
        if !out.contains(&d) {
            out.push(d);
        }
    }
    out
}

/// `user@Example.ORG.` → `example.org`.
fn domain_of(addr: &str) -> Option<String> {
    let (_, domain) = addr.rsplit_once('@')?;
    let domain = domain.trim().trim_end_matches('.');
    (!domain.is_empty()).then(|| domain.to_ascii_lowercase())
}

fn push_field(out: &mut Vec<u8>, name: &str, value: &str) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// The header section: from the start up to (not including) the empty line,
/// or nothing when the first line is not a header field (the message has
/// no header section; RFC 5322 2.1).
fn header_section(body: &[u8]) -> &[u8] {
    if !starts_with_field(body) {
        return &[];
    }
    match memmem::find(body, b"\r\n\r\n") {
        Some(i) => &body[..i + 2],
        None => body,
    }
}

/// RFC 5322 3.6.8: field-name = 1*ftext (printable US-ASCII but ':'), then
/// ':'.
fn starts_with_field(line: &[u8]) -> bool {
    let name_len = line
        .iter()
        .take_while(|&&b| (33..=126).contains(&b) && b != b':')
        .count();
    name_len > 0 && line.get(name_len) == Some(&b':')
}

/// Each field as (name, unfolded value).
fn fields(header: &[u8]) -> impl Iterator<Item = (&[u8], Vec<u8>)> {
    let mut rest = header;
    std::iter::from_fn(move || loop {
        if rest.is_empty() {
            return None;
        }
        // One field: this line plus the continuation lines after it.
        let mut end = 0;
        loop {
            match memmem::find(&rest[end..], b"\r\n") {
                Some(i) => end += i + 2,
                None => end = rest.len(),
            }
            if end >= rest.len() || !matches!(rest[end], b' ' | b'\t') {
                break;
            }
        }
        let (field, tail) = rest.split_at(end);
        rest = tail;
        let Some(colon) = field.iter().position(|&b| b == b':') else {
            continue;
        };
        if !starts_with_field(field) {
            continue;
        }
        let value: Vec<u8> = field[colon + 1..]
            .iter()
            .copied()
            .filter(|&b| b != b'\r' && b != b'\n')
            .collect();
        return Some((&field[..colon], value));
    })
}

/// True when `addr` is one of the addresses of a `From:` value.
fn names_address(value: &[u8], addr: &str) -> bool {
    let value = String::from_utf8_lossy(value);
    addresses(&value)
        .into_iter()
        .any(|a| a.eq_ignore_ascii_case(addr))
}

/// The addresses of an address-list value: those inside `<...>`, or, when
/// there are no angle brackets, the comma-separated addr-specs (comments
/// dropped).
fn addresses(value: &str) -> Vec<&str> {
    let mut found = Vec::new();
    let mut found_bracket = false;
    let mut rest = value;
    while let Some(open) = rest.find('<') {
        found_bracket = true;
        let after = &rest[open + 1..];
        let Some(close) = after.find('>') else { break };
        found.push(after[..close].trim());
        rest = &after[close + 1..];
    }
    if found_bracket {
        return found;
    }
    value
        .split(',')
        .map(|a| strip_comment(a).trim())
        .filter(|a| !a.is_empty())
        .collect()
}

/// `user@example.org (User)` → `user@example.org `.
fn strip_comment(s: &str) -> &str {
    match s.find('(') {
        Some(i) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const C: Completion<'static> = Completion {
        date: "Mon, 23 Nov 2026 10:54:20 +0000",
        message_id: "<x1@mx.test>",
        sender: None,
    };

    fn added(body: &[u8], c: &Completion<'_>) -> String {
        String::from_utf8(missing_headers(body, c)).unwrap()
    }

    #[test]
    fn adds_date_and_message_id_when_missing() {
        assert_eq!(
            added(b"Subject: hi\r\n\r\nbody\r\n", &C),
            "Date: Mon, 23 Nov 2026 10:54:20 +0000\r\nMessage-ID: <x1@mx.test>\r\n"
        );
        let complete = b"DATE: x\r\nmessage-id:\r\n <a@b>\r\nSubject: s\r\n\r\nDate: in body\r\n";
        assert_eq!(added(complete, &C), "");
        // A Date in the body is not a Date header.
        assert_eq!(
            added(b"Subject: s\r\n\r\nDate: x\r\nMessage-ID: <y>\r\n", &C),
            "Date: Mon, 23 Nov 2026 10:54:20 +0000\r\nMessage-ID: <x1@mx.test>\r\n"
        );
    }

    #[test]
    fn message_without_header_section_gets_one() {
        assert_eq!(
            added(b"just text\r\n", &C),
            "Date: Mon, 23 Nov 2026 10:54:20 +0000\r\nMessage-ID: <x1@mx.test>\r\n\r\n"
        );
        assert_eq!(
            added(b"", &C),
            "Date: Mon, 23 Nov 2026 10:54:20 +0000\r\nMessage-ID: <x1@mx.test>\r\n\r\n"
        );
        assert!(added(b"Date: d\r\nMessage-ID: <m>\r\n", &C).is_empty());
    }

    #[test]
    fn sender_when_from_is_someone_else() {
        let c = Completion {
            sender: Some("alice@example.org"),
            ..C
        };
        let base = "Date: d\r\nMessage-ID: <m>\r\n";
        for (from, want_sender) in [
            ("From: Alice <alice@example.org>", false),
            ("From: ALICE@example.org", false),
            ("From: alice@example.org (Alice)", false),
            ("From: Bob <bob@example.org>", true),
            ("From: bob@example.org", true),
            ("From: \"alice@example.org\" <bob@example.org>", true),
            (
                "From: Bob <bob@example.org>,\r\n Alice <alice@example.org>",
                false,
            ),
        ] {
            let msg = format!("{base}{from}\r\n\r\nbody\r\n");
            let a = added(msg.as_bytes(), &c);
            assert_eq!(
                a == "Sender: <alice@example.org>\r\n",
                want_sender,
                "{from}: {a:?}"
            );
        }
        let with_sender = format!("{base}From: bob@example.org\r\nSender: x@example.org\r\n\r\n");
        assert!(added(with_sender.as_bytes(), &c).is_empty());
        let no_from = format!("{base}\r\n");
        assert!(added(no_from.as_bytes(), &c).is_empty());
    }

    #[test]
    fn author_domains_from_then_sender() {
        let d = |blocks: &[&[u8]]| author_domains(blocks);
        assert_eq!(
            d(&[b"From: Alice <alice@Example.ORG>\r\nTo: x@y.test\r\n\r\nFrom: no@body.test\r\n"]),
            ["example.org"]
        );
        // Sender added by submission, From in the message; several From
        // addresses, folded, with a duplicate domain.
        let added: &[u8] = b"Date: d\r\nSender: <alice@example.net>\r\n";
        let msg: &[u8] =
            b"From: a@one.test (A),\r\n b@two.test., c@ONE.test\r\nSubject: s\r\n\r\nbody\r\n";
        assert_eq!(d(&[added, msg]), ["one.test", "two.test", "example.net"]);
        // No From: nothing to sign for, whatever Sender says.
        assert!(d(&[b"Sender: s@example.org\r\n\r\n"]).is_empty());
        // The header section ends in the added block (the message had
        // none): a From-like line in the body is not a field.
        assert!(d(&[b"Date: d\r\n\r\n", b"From: x@in.body\r\n"]).is_empty());
        assert!(d(&[b"From: a@b.test\r\n", b"\r\nFrom: x@in.body\r\n"]) == ["b.test"]);
        assert!(d(&[b"From: undisclosed\r\n\r\n"]).is_empty());
    }
}
