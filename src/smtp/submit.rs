//! Message completion on the submission path (RFC 6409 8): which header
//! fields a submitted message lacks, rendered as a block the spool stores in
//! front of the content.
//!
//! Owns reading the header section of a message (unfolding, case-insensitive
//! names, the addresses in `From:`), including which domains a DKIM
//! signature may be made for ([`authors`]). It only ever *adds* fields: the content
//! as received stays byte-exact after the added block, so a signature the
//! client made over it survives. It must never rewrite or remove a field,
//! never allocate a copy of the body, and never read a clock: the date and
//! the Message-ID are passed in.

use memchr::memmem;

use crate::smtp::reply::Reply;

/// A submitted message whose `From:`/`Sender:` is someone at a signed
/// domain the login may not send as (`--dkim-from-mismatch reject`).
pub const FROM_NOT_OWNED: Reply = Reply::new(
    550,
    "5.7.1",
    "Error: From: address not owned by the authenticated user",
);

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

/// Who a message says wrote it and who sent it (RFC 5322 3.6.2), as far as
/// a DKIM signature is concerned: found in `blocks` (the fields submission
/// added, then the message as received).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authors {
    /// No `From:` field: a signature must cover it (RFC 6376 5.4), so such
    /// a message is not signed.
    NoFrom,
    /// One `From:` (one or more mailboxes) and at most one `Sender:`, each
    /// address as `local@domain` (the domain in lower case, without a
    /// trailing dot).
    Parsed {
        from: Vec<String>,
        sender: Option<String>,
    },
    /// Fields that cannot be read with confidence: two `From:` or `Sender:`
    /// fields, group syntax, an unbalanced quote, comment or bracket, an
    /// address without a domain, two addresses in one mailbox (an encoded
    /// word hiding `<...>`), a source route. `raw` is the fields' values in
    /// lower case, for the caller to tell whether one of its domains is
    /// named in them. When in doubt, nothing is signed.
    Doubtful { reason: &'static str, raw: String },
}

impl Authors {
    /// From's addresses, then Sender's: the order signing domains are
    /// chosen in.
    pub fn addresses(&self) -> impl Iterator<Item = &str> {
        let (from, sender): (&[String], Option<&String>) = match self {
            Authors::Parsed { from, sender } => (from, sender.as_ref()),
            _ => (&[], None),
        };
        from.iter().chain(sender).map(String::as_str)
    }
}

/// Reads the `From:` and `Sender:` fields of the header section.
pub fn authors(blocks: &[&[u8]]) -> Authors {
    let mut from_values = Vec::new();
    let mut sender_values = Vec::new();
    for block in blocks {
        let header = header_section(block);
        for (name, value) in fields(header) {
            if name.eq_ignore_ascii_case(b"From") {
                from_values.push(String::from_utf8_lossy(&value).into_owned());
            } else if name.eq_ignore_ascii_case(b"Sender") {
                sender_values.push(String::from_utf8_lossy(&value).into_owned());
            }
        }
        if header.len() < block.len() {
            // The header section ended in this block: the rest is body.
            break;
        }
    }
    let doubt = |reason| Authors::Doubtful {
        reason,
        raw: from_values
            .iter()
            .chain(&sender_values)
            .map(|v| v.to_ascii_lowercase())
            .collect::<Vec<_>>()
            .join("\n"),
    };
    let from = match from_values.as_slice() {
        [] => return Authors::NoFrom,
        [one] => match mailbox_list(one) {
            Ok(list) if !list.is_empty() => list,
            Ok(_) => return doubt("From: names no address"),
            Err(reason) => return doubt(reason),
        },
        _ => return doubt("more than one From: field"),
    };
    let sender = match sender_values.as_slice() {
        [] => None,
        [one] => match mailbox_list(one) {
            Ok(mut list) if list.len() == 1 => list.pop(),
            Ok(_) => return doubt("Sender: must name one address"),
            Err(reason) => return doubt(reason),
        },
        _ => return doubt("more than one Sender: field"),
    };
    Authors::Parsed { from, sender }
}

/// The domain of `local@domain`, as [`authors`] renders it.
pub fn domain_of(addr: &str) -> Option<&str> {
    addr.rsplit_once('@').map(|(_, d)| d)
}

/// One lexical token of a structured field (RFC 5322 3.2), comments and
/// white space (CFWS) dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    /// An atext run; an encoded word (RFC 2047) is one too: it is never
    /// decoded, so whatever it would show cannot become an address.
    Atom(String),
    /// A quoted-string with its quotes, escapes kept.
    Quoted(String),
    /// `[...]`, with the brackets.
    Literal(String),
    Special(char),
}

/// A mailbox-list (RFC 5322 3.4, what `From:` holds): each addr-spec as
/// `local@domain`. Strict: what it cannot read for sure is an error.
fn mailbox_list(value: &str) -> Result<Vec<String>, &'static str> {
    let tokens = tokenize(value)?;
    let mut out = Vec::new();
    for mailbox in tokens.split(|t| *t == Token::Special(',')) {
        if mailbox.is_empty() {
            // obs-mbox-list allows empty elements ("a@b,,c@d").
            continue;
        }
        out.push(mailbox_addr(mailbox)?);
    }
    Ok(out)
}

/// name-addr (`[phrase] <addr-spec>`) or addr-spec.
fn mailbox_addr(tokens: &[Token]) -> Result<String, &'static str> {
    if tokens
        .iter()
        .any(|t| matches!(t, Token::Special(':' | ';')))
    {
        return Err("group syntax or a source route in an author field");
    }
    let Some(open) = tokens.iter().position(|t| *t == Token::Special('<')) else {
        return addr_spec(tokens);
    };
    let phrase = &tokens[..open];
    if !phrase
        .iter()
        .all(|t| matches!(t, Token::Atom(_) | Token::Quoted(_) | Token::Special('.')))
    {
        return Err("unexpected characters before <address>");
    }
    let rest = &tokens[open + 1..];
    let close = rest
        .iter()
        .position(|t| *t == Token::Special('>'))
        .ok_or("an unclosed <")?;
    if close + 1 != rest.len() {
        return Err("more than one address in one mailbox");
    }
    addr_spec(&rest[..close])
}

/// `local-part @ domain`: dot-separated atoms or quoted strings, then a
/// dot-atom or a domain literal.
fn addr_spec(tokens: &[Token]) -> Result<String, &'static str> {
    let at = tokens
        .iter()
        .position(|t| *t == Token::Special('@'))
        .ok_or("an address without a domain")?;
    let local = dotted(&tokens[..at], true).ok_or("a malformed local part")?;
    let domain = match &tokens[at + 1..] {
        [Token::Literal(l)] => l.to_ascii_lowercase(),
        d => dotted(d, false)
            .ok_or("a malformed domain")?
            .to_ascii_lowercase(),
    };
    let domain = domain.trim_end_matches('.');
    if domain.is_empty() {
        return Err("an empty domain");
    }
    Ok(format!("{local}@{domain}"))
}

/// `word *("." word)`, rendered back with its dots; one trailing dot is
/// allowed (a fully qualified domain).
fn dotted(tokens: &[Token], quoted_ok: bool) -> Option<String> {
    let mut out = String::new();
    let mut want_word = true;
    for t in tokens {
        match (t, want_word) {
            (Token::Atom(a), true) => out.push_str(a),
            (Token::Quoted(q), true) if quoted_ok => out.push_str(q),
            (Token::Special('.'), false) => out.push('.'),
            _ => return None,
        }
        want_word = !want_word;
    }
    (!out.is_empty()).then_some(out)
}

fn tokenize(value: &str) -> Result<Vec<Token>, &'static str> {
    const SPECIALS: &str = "()<>[]:;@\\,.\"";
    let mut tokens = Vec::new();
    let mut chars = value.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' | '\r' | '\n' => {}
            '(' => {
                let mut depth = 1;
                while depth > 0 {
                    match chars.next().ok_or("an unclosed comment")? {
                        '\\' => {
                            chars.next();
                        }
                        '(' => depth += 1,
                        ')' => depth -= 1,
                        _ => {}
                    }
                }
            }
            '"' => {
                let mut q = String::from('"');
                loop {
                    let c = chars.next().ok_or("an unclosed quoted string")?;
                    q.push(c);
                    match c {
                        '\\' => q.push(chars.next().ok_or("an unclosed quoted string")?),
                        '"' => break,
                        _ => {}
                    }
                }
                tokens.push(Token::Quoted(q));
            }
            '[' => {
                let mut l = String::from('[');
                loop {
                    let c = chars.next().ok_or("an unclosed domain literal")?;
                    if matches!(c, '[' | '\\') {
                        return Err("a malformed domain literal");
                    }
                    l.push(c);
                    if c == ']' {
                        break;
                    }
                }
                tokens.push(Token::Literal(l));
            }
            ')' | ']' | '\\' => return Err("an unbalanced ')' or ']', or a stray '\\'"),
            c if SPECIALS.contains(c) => tokens.push(Token::Special(c)),
            c if c.is_control() => return Err("a control character"),
            c => {
                let mut a = String::from(c);
                while let Some(&n) = chars.peek() {
                    if SPECIALS.contains(n) || n.is_whitespace() || n.is_control() {
                        break;
                    }
                    a.push(n);
                    chars.next();
                }
                tokens.push(Token::Atom(a));
            }
        }
    }
    Ok(tokens)
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
    fn authors_from_then_sender() {
        let parsed = |from: &[&str], sender: Option<&str>| Authors::Parsed {
            from: from.iter().map(|s| s.to_string()).collect(),
            sender: sender.map(str::to_owned),
        };
        assert_eq!(
            authors(&[
                b"From: Alice <alice@Example.ORG>\r\nTo: x@y.test\r\n\r\nFrom: no@body.test\r\n"
            ]),
            parsed(&["alice@example.org"], None)
        );
        // Sender added by submission, From in the message; several From
        // addresses, folded, with comments and a trailing dot.
        let added: &[u8] = b"Date: d\r\nSender: <alice@example.net>\r\n";
        let msg: &[u8] =
            b"From: a@one.test (A),\r\n b@two.test., \"C, Esq.\" <c(x)@ONE.test>\r\nSubject: s\r\n\r\nbody\r\n";
        let a = authors(&[added, msg]);
        assert_eq!(
            a,
            parsed(
                &["a@one.test", "b@two.test", "c@one.test"],
                Some("alice@example.net")
            )
        );
        assert_eq!(
            a.addresses().collect::<Vec<_>>(),
            [
                "a@one.test",
                "b@two.test",
                "c@one.test",
                "alice@example.net"
            ]
        );
        // No From: nothing to sign for, whatever Sender says.
        assert_eq!(
            authors(&[b"Sender: s@example.org\r\n\r\n"]),
            Authors::NoFrom
        );
        // The header section ends in the added block (the message had
        // none): a From-like line in the body is not a field.
        assert_eq!(
            authors(&[b"Date: d\r\n\r\n", b"From: x@in.body\r\n"]),
            Authors::NoFrom
        );
        assert_eq!(
            authors(&[b"From: a@b.test\r\n", b"\r\nFrom: x@in.body\r\n"]),
            parsed(&["a@b.test"], None)
        );
    }

    /// Display names, comments and encoded words that look like addresses
    /// are not the address.
    #[test]
    fn authors_display_tricks() {
        let from = |v: &str| authors(&[format!("From: {v}\r\n\r\n").as_bytes()]);
        let one = |v: &str| match from(v) {
            Authors::Parsed { from, sender: None } if from.len() == 1 => from[0].clone(),
            other => panic!("{v}: {other:?}"),
        };
        assert_eq!(
            one("\"bob@signed.test\" <alice@example.com>"),
            "alice@example.com"
        );
        assert_eq!(
            one("alice@example.com (bob@signed.test)"),
            "alice@example.com"
        );
        assert_eq!(
            one("(bob@signed.test) alice@example.com"),
            "alice@example.com"
        );
        assert_eq!(
            one("=?utf-8?q?bob=40signed=2Etest?= <alice@example.com>"),
            "alice@example.com"
        );
        assert_eq!(
            one("\"a\\\"b\" <\"x y\"@Example.com>"),
            "\"x y\"@example.com"
        );
        assert_eq!(one("alice@[192.0.2.1]"), "alice@[192.0.2.1]");
        // Nested comments with escapes.
        assert_eq!(
            one("(a (b \\) c) d) alice@example.com"),
            "alice@example.com"
        );
    }

    #[test]
    fn authors_in_doubt() {
        for v in [
            "=?utf-8?q?x<bob@signed.test>?= <alice@example.com>",
            "Friends: bob@signed.test, alice@example.com;",
            "undisclosed-recipients:;",
            "<@relay.test:bob@signed.test>",
            "\"unclosed <bob@signed.test>",
            "(unclosed bob@signed.test",
            "Bob <bob@signed.test",
            "bob",
            "bob@",
            "<>",
            "",
            "a@b.test) x",
            "a..b@signed.test",
            "alice@example.com <bob@signed.test>",
        ] {
            let a = authors(&[format!("From: {v}\r\n\r\n").as_bytes()]);
            assert!(matches!(a, Authors::Doubtful { .. }), "{v:?}: {a:?}");
            assert_eq!(a.addresses().count(), 0);
        }
        let two_from = authors(&[b"From: a@x.test\r\nFrom: b@Signed.test\r\n\r\n"]);
        match two_from {
            Authors::Doubtful { raw, .. } => assert!(raw.contains("b@signed.test"), "{raw}"),
            other => panic!("{other:?}"),
        }
        let two_senders = b"From: a@x.test\r\nSender: a@x.test, b@y.test\r\n\r\n";
        assert!(matches!(authors(&[two_senders]), Authors::Doubtful { .. }));
    }
}
