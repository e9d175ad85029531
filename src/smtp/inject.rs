//! The message side of HTTP injection (`POST /v1/inject`, README "HTTP
//! injection"), sans-IO: the JSON request, the envelope checks (the SMTP
//! parser and the RCPT policy of a client that may relay), `{{name}}`
//! substitution per recipient, and the MIME message built from
//! from/subject/text/html parts (RFC 5322, RFC 2045-2047).
//!
//! Owns turning a request into messages; it must never do I/O nor read a
//! clock (the date and Message-ID are passed in), and never let a value
//! put a line break into a header section: header values with CR or LF
//! are refused, not cleaned.

use std::collections::BTreeMap;

use base64::Engine as _;
use bumpalo::Bump;
use serde::Deserialize;

use crate::smtp::command::{Command, Recipient};
use crate::smtp::parse::parse_command;
use crate::smtp::session::SessionConfig;

/// One injection call.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InjectRequest {
    /// The envelope sender (`""`: the null reverse-path).
    pub mail_from: String,
    pub recipients: Vec<RecipientSpec>,
    /// A complete RFC 5322 message.
    #[serde(default)]
    pub message: Option<String>,
    /// Parts ringmta builds into MIME.
    #[serde(default)]
    pub content: Option<Content>,
}

/// A recipient: an address, or an address with substitution variables
/// (then it gets a message of its own).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RecipientSpec {
    Plain(String),
    WithVars {
        address: String,
        #[serde(default)]
        vars: Option<BTreeMap<String, String>>,
    },
}

impl RecipientSpec {
    pub fn address(&self) -> &str {
        match self {
            RecipientSpec::Plain(a) | RecipientSpec::WithVars { address: a, .. } => a,
        }
    }

    /// The variables, when the recipient has any.
    pub fn vars(&self) -> Option<&BTreeMap<String, String>> {
        match self {
            RecipientSpec::Plain(_) => None,
            RecipientSpec::WithVars { vars, .. } => vars.as_ref().filter(|v| !v.is_empty()),
        }
    }
}

/// The parts of a message ringmta builds.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Content {
    /// `addr@domain` or `Display Name <addr@domain>`.
    pub from: String,
    /// The `To:` field: one mailbox or a list [default: the recipient when
    /// the message has one, else `undisclosed-recipients:;`].
    #[serde(default)]
    pub to: Option<OneOrMany>,
    #[serde(default)]
    pub cc: Option<OneOrMany>,
    #[serde(default)]
    pub reply_to: Option<String>,
    #[serde(default)]
    pub subject: String,
    #[serde(default)]
    pub text: Option<String>,
    #[serde(default)]
    pub html: Option<String>,
    /// More header fields (`X-Campaign`, `List-Unsubscribe`...), in this
    /// order after the standard ones.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn items(&self) -> Vec<&str> {
        match self {
            OneOrMany::One(s) => vec![s.as_str()],
            OneOrMany::Many(v) => v.iter().map(String::as_str).collect(),
        }
    }
}

/// Fields the parts build themselves; `headers` may not set them.
const STRUCTURAL: &[&str] = &[
    "from",
    "to",
    "cc",
    "bcc",
    "reply-to",
    "subject",
    "date",
    "message-id",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "received",
    "return-path",
    "dkim-signature",
];

/// The envelope sender, checked by the SMTP parser as `MAIL FROM:<addr>`:
/// `None` for the null reverse-path, and whether it needs SMTPUTF8.
pub fn check_sender(addr: &str) -> Result<(Option<String>, bool), String> {
    if addr
        .bytes()
        .any(|b| matches!(b, b'<' | b'>' | b'\r' | b'\n' | 0))
    {
        return Err(format!("mail_from {addr:?}: not an address"));
    }
    let line = format!("MAIL FROM:<{addr}>");
    let arena = Bump::new();
    match parse_command(line.as_bytes(), &arena) {
        Ok(Command::Mail(m)) => Ok(match m.from {
            None => (None, false),
            Some(mb) => (Some(mb.to_owned_string()), mb.utf8),
        }),
        _ => Err(format!("mail_from {addr:?}: not an address")),
    }
}

/// A recipient, checked as `RCPT TO:<addr>` from a client that may relay
/// (as a `--relay-network` client): the SMTP parser, a qualified domain,
/// and the local recipient policy (`--local-recipients`, Maildir-safe
/// names). The address to queue (a table may rewrite it, `postmaster` is
/// qualified) and whether it needs SMTPUTF8; else the refusal as the SMTP
/// reply would give it.
pub fn check_recipient(cfg: &SessionConfig, addr: &str) -> Result<(String, bool), String> {
    if addr
        .bytes()
        .any(|b| matches!(b, b'<' | b'>' | b'\r' | b'\n' | 0))
    {
        return Err("501 5.1.3 Bad recipient address syntax".into());
    }
    let line = format!("RCPT TO:<{addr}>");
    let arena = Bump::new();
    let mb = match parse_command(line.as_bytes(), &arena) {
        Ok(Command::Rcpt(r)) => match r.to {
            Recipient::Postmaster => {
                let first = cfg.local_domains.first().map(String::as_str);
                let pm = crate::policy::recipient::qualify_postmaster("postmaster", first);
                return Ok((pm.into_owned(), false));
            }
            Recipient::Mailbox(mb) => mb,
        },
        _ => return Err("501 5.1.3 Bad recipient address syntax".into()),
    };
    let qualified = match mb.domain {
        crate::smtp::command::Domain::Literal(_) => true,
        crate::smtp::command::Domain::Name(d) => {
            d.contains('.') || cfg.local_domains.iter().any(|l| l.eq_ignore_ascii_case(d))
        }
    };
    if !qualified {
        return Err(format!(
            "550 5.1.2 <{addr}>: Recipient address rejected: need fully-qualified address"
        ));
    }
    let at = crate::smtp::session::locality(cfg, &mb.domain);
    let owned = mb.to_owned_string();
    match cfg.recipients.check(&owned, at) {
        Ok(listed) => Ok((listed.unwrap_or(owned), mb.utf8)),
        Err(why) => Err(format!(
            "550 5.1.1 <{owned}>: Recipient address rejected: {why}"
        )),
    }
}

/// `template` with every `{{name}}` whose name (spaces around it ignored)
/// is in `vars` replaced by its value; other placeholders stay as written.
/// In a header (`header`), a value with CR or LF is an error.
pub fn substitute(
    template: &str,
    vars: Option<&BTreeMap<String, String>>,
    header: bool,
) -> Result<String, String> {
    let Some(vars) = vars else {
        return Ok(template.to_owned());
    };
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(open) = rest.find("{{") {
        let after = &rest[open + 2..];
        let Some(close) = after.find("}}") else {
            break;
        };
        let name = after[..close].trim();
        out.push_str(&rest[..open]);
        match vars.get(name) {
            Some(v) => {
                if header && v.bytes().any(|b| b == b'\r' || b == b'\n') {
                    return Err(format!("variable {name:?}: a line break in a header"));
                }
                out.push_str(v);
            }
            None => out.push_str(&rest[open..open + 2 + close + 2]),
        }
        rest = &after[close + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

/// What a built message needs from outside.
#[derive(Debug, Clone, Copy)]
pub struct Stamp<'a> {
    pub date: &'a str,
    pub message_id: &'a str,
}

/// A complete message from the request's `message`, substituted for one
/// recipient's `vars` (a value with a line break may not land in the
/// header section), line ends made CRLF, and `Date:`/`Message-ID:` added
/// when missing (RFC 6409 8). Whether it has 8-bit octets is the second
/// value.
pub fn raw_message(
    message: &str,
    vars: Option<&BTreeMap<String, String>>,
    stamp: Stamp<'_>,
) -> Result<(Vec<u8>, bool), String> {
    if message.trim().is_empty() {
        return Err("message is empty".into());
    }
    if message.contains('\0') {
        return Err("message: a NUL octet".into());
    }
    // The header section ends at the first empty line (either line end).
    let split = ["\r\n\r\n", "\n\n", "\r\n\n", "\n\r\n"]
        .iter()
        .filter_map(|sep| message.find(sep).map(|i| (i, sep.len())))
        .min();
    let (head, body) = match split {
        Some((i, n)) => (&message[..i], &message[i + n..]),
        None => (message, ""),
    };
    let head = substitute(head, vars, true)?;
    let body = substitute(body, vars, false)?;
    let mut out = Vec::with_capacity(head.len() + body.len() + 256);
    push_crlf(&mut out, &head);
    out.extend_from_slice(b"\r\n\r\n");
    push_crlf(&mut out, &body);
    if !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    let completion = crate::smtp::submit::Completion {
        date: stamp.date,
        message_id: stamp.message_id,
        sender: None,
    };
    let mut added = crate::smtp::submit::missing_headers(&out, &completion);
    let eight_bit = !out.is_ascii();
    added.extend_from_slice(&out);
    Ok((added, eight_bit))
}

/// The MIME message of `content` for the recipients `rcpts` (their `vars`
/// substituted when given): text/plain, text/html, or
/// multipart/alternative of both, UTF-8, 7bit when every line is short
/// ASCII, else quoted-printable; non-ASCII header text as RFC 2047
/// encoded-words. 7-bit throughout, but for a non-ASCII (SMTPUTF8)
/// recipient the default `To:` names.
pub fn build(
    content: &Content,
    vars: Option<&BTreeMap<String, String>>,
    rcpts: &[String],
    stamp: Stamp<'_>,
) -> Result<Vec<u8>, String> {
    if content.text.is_none() && content.html.is_none() {
        return Err("content: give text, html or both".into());
    }
    let mut h = String::with_capacity(1024);
    header(&mut h, "Date", stamp.date);
    let from = substitute(&content.from, vars, true)?;
    let from = mailbox("from", &from)?;
    header(&mut h, "From", &from);
    match &content.to {
        Some(to) => {
            let list = address_list("to", to, vars)?;
            header(&mut h, "To", &list);
        }
        None => match rcpts {
            [one] => header(&mut h, "To", &format!("<{one}>")),
            _ => header(&mut h, "To", "undisclosed-recipients:;"),
        },
    }
    if let Some(cc) = &content.cc {
        let list = address_list("cc", cc, vars)?;
        header(&mut h, "Cc", &list);
    }
    if let Some(r) = &content.reply_to {
        let r = mailbox("reply_to", &substitute(r, vars, true)?)?;
        header(&mut h, "Reply-To", &r);
    }
    let subject = substitute(&content.subject, vars, true)?;
    check_value("subject", &subject)?;
    header(&mut h, "Subject", &encode_text(&subject));
    header(&mut h, "Message-ID", stamp.message_id);
    header(&mut h, "MIME-Version", "1.0");
    for (name, value) in &content.headers {
        if name.is_empty()
            || !name.bytes().all(|b| (33..=126).contains(&b) && b != b':')
            || name.len() > 76
        {
            return Err(format!("headers: {name:?} is not a field name"));
        }
        if STRUCTURAL.contains(&name.to_ascii_lowercase().as_str()) {
            return Err(format!(
                "headers: {name} is built from the other fields; set it there"
            ));
        }
        let value = substitute(value, vars, true)?;
        check_value(name, &value)?;
        header(&mut h, name, &encode_text(&value));
    }
    let text = content
        .text
        .as_deref()
        .map(|t| substitute(t, vars, false))
        .transpose()?;
    let html = content
        .html
        .as_deref()
        .map(|t| substitute(t, vars, false))
        .transpose()?;
    let mut out = h.into_bytes();
    match (text, html) {
        (Some(text), Some(html)) => {
            // `=_` never appears in quoted-printable text, and a 7bit part
            // holding it is sent quoted-printable (see `part`).
            let boundary = format!("=_ringmta_{}", boundary_tag(stamp.message_id));
            out.extend_from_slice(
                format!("Content-Type: multipart/alternative;\r\n boundary=\"{boundary}\"\r\n\r\n")
                    .as_bytes(),
            );
            out.extend_from_slice(b"This is a multi-part message in MIME format.\r\n");
            for (sub, body) in [("plain", &text), ("html", &html)] {
                out.extend_from_slice(format!("\r\n--{boundary}\r\n").as_bytes());
                part(&mut out, sub, body);
            }
            out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        }
        (Some(text), None) => part(&mut out, "plain", &text),
        (None, Some(html)) => part(&mut out, "html", &html),
        (None, None) => unreachable!("checked above"),
    }
    Ok(out)
}

/// Appends `Name: value CRLF` (the value already safe and encoded).
fn header(h: &mut String, name: &str, value: &str) {
    h.push_str(name);
    h.push_str(": ");
    h.push_str(value);
    h.push_str("\r\n");
}

fn check_value(what: &str, v: &str) -> Result<(), String> {
    if v.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
        return Err(format!("{what}: a line break in a header value"));
    }
    if v.len() > 16 << 10 {
        return Err(format!("{what}: longer than 16 KiB"));
    }
    Ok(())
}

/// `Display Name <addr>` or `addr` as a header value: the address ASCII
/// and parsed as an SMTP mailbox, the display name quoted or encoded.
fn mailbox(what: &str, v: &str) -> Result<String, String> {
    check_value(what, v)?;
    let v = v.trim();
    let (name, addr) = match v.rfind('<') {
        Some(i) if v.ends_with('>') => (v[..i].trim(), &v[i + 1..v.len() - 1]),
        _ => ("", v),
    };
    if !addr.is_ascii() {
        return Err(format!(
            "{what}: {addr:?}: only ASCII addresses in header fields"
        ));
    }
    match check_sender(addr) {
        Ok((Some(_), _)) => {}
        _ => return Err(format!("{what}: {addr:?} is not an address")),
    }
    let name = name
        .strip_prefix('"')
        .and_then(|n| n.strip_suffix('"'))
        .unwrap_or(name);
    if name.is_empty() {
        return Ok(format!("<{addr}>"));
    }
    Ok(format!("{} <{addr}>", phrase(name)))
}

fn address_list(
    what: &str,
    list: &OneOrMany,
    vars: Option<&BTreeMap<String, String>>,
) -> Result<String, String> {
    let mut out = Vec::new();
    for item in list.items() {
        out.push(mailbox(what, &substitute(item, vars, true)?)?);
    }
    if out.is_empty() {
        return Err(format!("{what}: empty"));
    }
    Ok(out.join(",\r\n "))
}

/// A display name: as is when it is atoms, quoted when it has specials,
/// encoded-words when it is not ASCII (RFC 2047 5(3)).
fn phrase(name: &str) -> String {
    if !name.is_ascii() {
        return encoded_words(name);
    }
    let atext = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~ ".contains(c);
    if name.chars().all(atext) {
        return name.to_owned();
    }
    let mut q = String::with_capacity(name.len() + 2);
    q.push('"');
    for c in name.chars() {
        if c == '"' || c == '\\' {
            q.push('\\');
        }
        q.push(c);
    }
    q.push('"');
    q
}

/// Unstructured text (Subject, extra fields): as is when ASCII (folded at
/// spaces past 76 columns), else encoded-words.
pub fn encode_text(v: &str) -> String {
    if !v.is_ascii() {
        return encoded_words(v);
    }
    let mut out = String::with_capacity(v.len() + 8);
    let mut col = 0;
    for (i, word) in v.split(' ').enumerate() {
        if i > 0 {
            if col + 1 + word.len() > 76 && col > 0 {
                out.push_str("\r\n ");
                col = 1;
            } else {
                out.push(' ');
                col += 1;
            }
        }
        out.push_str(word);
        col += word.len();
    }
    out
}

/// `=?UTF-8?B?...?=` words of at most 75 characters (45 octets of text
/// each, cut at character boundaries), folded one per line.
fn encoded_words(v: &str) -> String {
    let mut words = Vec::new();
    let mut start = 0;
    while start < v.len() {
        let mut end = (start + 45).min(v.len());
        while !v.is_char_boundary(end) {
            end -= 1;
        }
        let b64 = base64::engine::general_purpose::STANDARD.encode(&v.as_bytes()[start..end]);
        words.push(format!("=?UTF-8?B?{b64}?="));
        start = end;
    }
    words.join("\r\n ")
}

/// One text part's header and body: 7bit when the text is ASCII, every
/// line at most 998 octets and no `=_` (the boundary's start) in it, else
/// quoted-printable.
fn part(out: &mut Vec<u8>, subtype: &str, text: &str) {
    let mut crlf = Vec::with_capacity(text.len() + 64);
    push_crlf(&mut crlf, text);
    if !crlf.ends_with(b"\r\n") {
        crlf.extend_from_slice(b"\r\n");
    }
    let seven = crlf.is_ascii()
        && crlf.split(|&b| b == b'\n').all(|l| l.len() <= 999)
        && memchr::memmem::find(&crlf, b"=_").is_none();
    out.extend_from_slice(format!("Content-Type: text/{subtype}; charset=utf-8\r\n").as_bytes());
    if seven {
        out.extend_from_slice(b"Content-Transfer-Encoding: 7bit\r\n\r\n");
        out.extend_from_slice(&crlf);
    } else {
        out.extend_from_slice(b"Content-Transfer-Encoding: quoted-printable\r\n\r\n");
        quoted_printable(out, &crlf);
    }
}

/// RFC 2045 6.7: lines of `crlf` encoded, soft breaks keeping every line
/// at most 76 characters, trailing white space encoded.
pub fn quoted_printable(out: &mut Vec<u8>, crlf: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut lines = crlf.split(|&b| b == b'\n').peekable();
    while let Some(line) = lines.next() {
        let last = lines.peek().is_none();
        if last && line.is_empty() {
            break;
        }
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let mut col = 0;
        for (i, &b) in line.iter().enumerate() {
            let at_end = i + 1 == line.len();
            let plain =
                (b == b' ' || b == b'\t') && !at_end || (33..=126).contains(&b) && b != b'=';
            let width = if plain { 1 } else { 3 };
            // Room for the soft break's `=`.
            if col + width > 75 {
                out.extend_from_slice(b"=\r\n");
                col = 0;
            }
            if plain {
                out.push(b);
            } else {
                out.extend_from_slice(&[b'=', HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]);
            }
            col += width;
        }
        out.extend_from_slice(b"\r\n");
    }
}

/// `text` with every line end (CRLF, lone LF, lone CR) as CRLF.
fn push_crlf(out: &mut Vec<u8>, text: &str) {
    let b = text.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\r' => {
                out.extend_from_slice(b"\r\n");
                if b.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
            }
            b'\n' => out.extend_from_slice(b"\r\n"),
            c => out.push(c),
        }
        i += 1;
    }
}

/// A boundary suffix from the Message-ID (unique per message).
fn boundary_tag(message_id: &str) -> String {
    message_id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '.')
        .take(60)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp() -> Stamp<'static> {
        Stamp {
            date: "Wed, 2 Dec 2026 10:00:00 +0000",
            message_id: "<1.2.3@mx.test>",
        }
    }

    #[test]
    fn substitution() {
        let vars: BTreeMap<String, String> =
            [("name".into(), "Zoë".into()), ("n".into(), "a\r\nb".into())].into();
        assert_eq!(
            substitute("Hi {{name}}, {{ name }}! {{other}} {{", Some(&vars), true).unwrap(),
            "Hi Zoë, Zoë! {{other}} {{"
        );
        assert!(substitute("x {{n}}", Some(&vars), true).is_err());
        assert_eq!(
            substitute("x {{n}}", Some(&vars), false).unwrap(),
            "x a\r\nb"
        );
        assert_eq!(substitute("{{name}}", None, true).unwrap(), "{{name}}");
    }

    #[test]
    fn header_values_cannot_inject() {
        let c = Content {
            from: "a@example.org".into(),
            to: None,
            cc: None,
            reply_to: None,
            subject: "hi\r\nBcc: victim@example.net".into(),
            text: Some("x".into()),
            html: None,
            headers: BTreeMap::new(),
        };
        assert!(build(&c, None, &["b@example.net".into()], stamp()).is_err());
        let c = Content {
            subject: "ok".into(),
            from: "Evil\n <a@example.org>".into(),
            ..c
        };
        assert!(build(&c, None, &["b@example.net".into()], stamp()).is_err());
        let c = Content {
            from: "a@example.org".into(),
            headers: [("X-A".into(), "1\r\nBcc: x@y.z".into())].into(),
            ..c
        };
        assert!(build(&c, None, &["b@example.net".into()], stamp()).is_err());
        let c = Content {
            headers: [("Content-Type".into(), "text/evil".into())].into(),
            ..c
        };
        assert!(build(&c, None, &["b@example.net".into()], stamp()).is_err());
    }

    #[test]
    fn mime_shapes() {
        let c = Content {
            from: "Zoë Dupont <zoe@example.org>".into(),
            to: None,
            cc: None,
            reply_to: None,
            subject: "Grüße".into(),
            text: Some("plain\nline".into()),
            html: Some("<p>é</p>".into()),
            headers: BTreeMap::new(),
        };
        let m = build(&c, None, &["b@example.net".into()], stamp()).unwrap();
        let s = String::from_utf8(m).unwrap();
        assert!(s.is_ascii(), "{s}");
        assert!(s.contains("From: =?UTF-8?B?"), "{s}");
        assert!(s.contains("Subject: =?UTF-8?B?R3LDvMOfZQ==?=\r\n"), "{s}");
        assert!(s.contains("To: <b@example.net>\r\n"), "{s}");
        assert!(s.contains("Content-Type: multipart/alternative;"), "{s}");
        assert!(s.contains("plain\r\nline\r\n"), "{s}");
        assert!(s.contains("<p>=C3=A9</p>\r\n"), "{s}");
        assert!(!s.replace("\r\n", "").contains('\n'), "bare LF: {s}");
    }

    #[test]
    fn quoted_printable_lines() {
        let mut out = Vec::new();
        let long = format!("{} \r\n", "é".repeat(100));
        quoted_printable(&mut out, long.as_bytes());
        let s = String::from_utf8(out).unwrap();
        for line in s.split("\r\n") {
            assert!(line.len() <= 76, "{line}");
        }
        assert!(s.ends_with("=20\r\n"), "{s}");
    }

    #[test]
    fn addresses() {
        let cfg = SessionConfig::default();
        assert_eq!(check_sender("").unwrap(), (None, false));
        assert_eq!(
            check_sender("a@example.org").unwrap().0.as_deref(),
            Some("a@example.org")
        );
        assert!(check_sender("a@example.org> SIZE=1").is_err());
        assert!(check_sender("not an address").is_err());
        assert_eq!(
            check_recipient(&cfg, "b@example.net").unwrap().0,
            "b@example.net"
        );
        assert!(check_recipient(&cfg, "b@nodot").is_err());
        assert!(check_recipient(&cfg, "b@x.y>\r\nRSET").is_err());
        assert!(check_recipient(&cfg, "").is_err());
    }

    #[test]
    fn raw_messages_get_crlf_and_completion() {
        let vars: BTreeMap<String, String> = [("n".into(), "Bob".into())].into();
        let (m, eight) =
            raw_message("Subject: hi {{n}}\n\nbody {{n}}\n", Some(&vars), stamp()).unwrap();
        let s = String::from_utf8(m).unwrap();
        assert!(!eight);
        assert!(s.starts_with("Date: "), "{s}");
        assert!(s.contains("Message-ID: <1.2.3@mx.test>\r\n"), "{s}");
        assert!(s.ends_with("Subject: hi Bob\r\n\r\nbody Bob\r\n"), "{s}");
        let evil: BTreeMap<String, String> = [("n".into(), "x\r\nBcc: y@z.t".into())].into();
        assert!(raw_message("Subject: {{n}}\r\n\r\nb\r\n", Some(&evil), stamp()).is_err());
    }
}
