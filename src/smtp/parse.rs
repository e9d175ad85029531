//! Command-line parser: one line (without its CRLF) into a [`Command`].
//!
//! Grammar from RFC 5321 4.1.1–4.1.3 (paths, address literals, quoted local
//! parts), RFC 6531 (UTF-8 in addresses), RFC 1869/1870/3461/6152/3030 (MAIL
//! and RCPT parameters, BDAT). Parameters are split into the per-connection
//! arena first, then interpreted. This module never allocates on the heap and
//! never panics on peer input.

use bumpalo::Bump;

use crate::smtp::command::{
    Body, Command, Domain, MailCommand, MailParams, Mailbox, Notify, Param, Params, RcptCommand,
    RcptParams, Recipient, Ret,
};
use crate::smtp::error::ParseError;

/// RFC 5321 4.5.3.1.1: local part at most 64 octets.
pub const MAX_LOCAL_PART: usize = 64;
/// RFC 5321 4.5.3.1.2: domain at most 255 octets.
pub const MAX_DOMAIN: usize = 255;
/// RFC 5321 4.5.3.1.3: path at most 256 octets including the brackets.
pub const MAX_PATH: usize = 256;
/// RFC 3461 4.2: ORCPT at most 500 characters; 4.4: ENVID at most 100.
const MAX_ORCPT: usize = 500;
const MAX_ENVID: usize = 100;

/// Parses one command line (CRLF already removed).
pub fn parse_command<'a>(line: &'a [u8], arena: &'a Bump) -> Result<Command<'a>, ParseError> {
    let verb_end = line.iter().position(|&b| b == b' ').unwrap_or(line.len());
    let (verb, rest) = line.split_at(verb_end);
    // `rest` is empty or starts with the separating space.
    let verb = Verb::from_bytes(verb).ok_or(ParseError::Unknown)?;
    let rest = std::str::from_utf8(rest).map_err(|_| ParseError::InvalidUtf8)?;
    match verb {
        Verb::Ehlo => hello_arg(rest)
            .map(Command::Ehlo)
            .ok_or(ParseError::EhloSyntax),
        Verb::Helo => hello_arg(rest)
            .map(Command::Helo)
            .ok_or(ParseError::HeloSyntax),
        Verb::Mail => parse_mail(rest, arena).map(Command::Mail),
        Verb::Rcpt => parse_rcpt(rest, arena).map(Command::Rcpt),
        Verb::Data => no_args(rest).map(|()| Command::Data),
        Verb::Bdat => parse_bdat(rest),
        Verb::Rset => no_args(rest).map(|()| Command::Rset),
        Verb::Quit => no_args(rest).map(|()| Command::Quit),
        Verb::Noop => Ok(Command::Noop),
        Verb::Help => Ok(Command::Help),
        Verb::Vrfy if rest.trim_matches(' ').is_empty() => Err(ParseError::VrfySyntax),
        Verb::Vrfy => Ok(Command::Vrfy),
        Verb::StartTls => no_args(rest).map(|()| Command::StartTls),
        Verb::Auth => parse_auth(rest),
        Verb::NotImplemented => Ok(Command::NotImplemented),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verb {
    Ehlo,
    Helo,
    Mail,
    Rcpt,
    Data,
    Bdat,
    Rset,
    Noop,
    Quit,
    Vrfy,
    Help,
    StartTls,
    Auth,
    NotImplemented,
}

impl Verb {
    fn from_bytes(verb: &[u8]) -> Option<Verb> {
        const VERBS: &[(&[u8], Verb)] = &[
            (b"MAIL", Verb::Mail),
            (b"RCPT", Verb::Rcpt),
            (b"DATA", Verb::Data),
            (b"BDAT", Verb::Bdat),
            (b"EHLO", Verb::Ehlo),
            (b"HELO", Verb::Helo),
            (b"RSET", Verb::Rset),
            (b"NOOP", Verb::Noop),
            (b"QUIT", Verb::Quit),
            (b"VRFY", Verb::Vrfy),
            (b"HELP", Verb::Help),
            (b"STARTTLS", Verb::StartTls),
            (b"AUTH", Verb::Auth),
            // Known verbs ringmta does not implement (RFC 5321 4.1.3 / 4.2.4,
            // RFC 1985 ETRN, RFC 2645 ATRN).
            (b"EXPN", Verb::NotImplemented),
            (b"ETRN", Verb::NotImplemented),
            (b"TURN", Verb::NotImplemented),
            (b"ATRN", Verb::NotImplemented),
            (b"SEND", Verb::NotImplemented),
            (b"SOML", Verb::NotImplemented),
            (b"SAML", Verb::NotImplemented),
        ];
        VERBS
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(verb))
            .map(|&(_, v)| v)
    }
}

/// EHLO/HELO argument: the first word, printable and non-empty. Real clients
/// send names that are not strict RFC 5321 domains (underscores, bare host
/// names); like Postfix's default, ringmta records whatever was given.
fn hello_arg(rest: &str) -> Option<&str> {
    let arg = rest.trim_start_matches(' ');
    let word = arg.split(' ').next().unwrap_or("");
    if word.is_empty() || word.bytes().any(|b| b < 0x21 || b == 0x7f) {
        return None;
    }
    Some(word)
}

fn no_args(rest: &str) -> Result<(), ParseError> {
    if rest.trim_matches(' ').is_empty() {
        Ok(())
    } else {
        Err(ParseError::NoArgsAllowed)
    }
}

/// `AUTH SP mechanism [SP initial-response]` (RFC 4954 4). The mechanism is
/// only checked for SASL name characters (RFC 4422 3.1); whether it is
/// offered is the session's question (504).
fn parse_auth(rest: &str) -> Result<Command<'_>, ParseError> {
    let rest = rest.strip_prefix(' ').ok_or(ParseError::AuthSyntax)?;
    let mut words = rest.split(' ');
    let mechanism = words.next().unwrap_or("");
    let initial = words.next();
    let name_ok = (1..=20).contains(&mechanism.len())
        && mechanism
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    let initial_ok = initial.is_none_or(|i| !i.is_empty());
    if !name_ok || !initial_ok || words.next().is_some() {
        return Err(ParseError::AuthSyntax);
    }
    Ok(Command::Auth { mechanism, initial })
}

fn parse_bdat(rest: &str) -> Result<Command<'static>, ParseError> {
    let mut words = rest.split(' ').filter(|w| !w.is_empty());
    let size = words.next().ok_or(ParseError::BdatSyntax)?;
    if size.is_empty() || size.len() > 19 || !size.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ParseError::BdatSyntax);
    }
    let size: u64 = size.parse().map_err(|_| ParseError::BdatSyntax)?;
    let last = match words.next() {
        None => false,
        Some(w) if w.eq_ignore_ascii_case("LAST") => true,
        Some(_) => return Err(ParseError::BdatSyntax),
    };
    if words.next().is_some() {
        return Err(ParseError::BdatSyntax);
    }
    Ok(Command::Bdat { size, last })
}

/// Strips `" FROM:"` / `" TO:"` (case-insensitive) and any spaces after the
/// colon, which many clients send although RFC 5321 has none.
fn strip_keyword<'a>(rest: &'a str, keyword: &str) -> Option<&'a str> {
    let rest = rest.strip_prefix(' ')?;
    let head = rest.get(..keyword.len())?;
    if !head.eq_ignore_ascii_case(keyword) {
        return None;
    }
    Some(rest[keyword.len()..].trim_start_matches(' '))
}

fn parse_mail<'a>(rest: &'a str, arena: &'a Bump) -> Result<MailCommand<'a>, ParseError> {
    let path = strip_keyword(rest, "FROM:").ok_or(ParseError::MailSyntax)?;
    if !path.starts_with('<') {
        return Err(ParseError::MailSyntax);
    }
    let (from, after) = parse_path(path).ok_or(if is_unqualified(path) {
        ParseError::UnqualifiedSender
    } else {
        ParseError::BadSender
    })?;
    let from = match from {
        Path::Null => None,
        Path::Mailbox(m) => Some(m),
        Path::Postmaster => return Err(ParseError::BadSender),
    };
    let params = split_params(after, arena)?;
    let mut out = MailParams::default();
    for (i, p) in params.iter().enumerate() {
        if params[..i]
            .iter()
            .any(|q| q.keyword.eq_ignore_ascii_case(p.keyword))
        {
            return Err(ParseError::BadParam);
        }
        let kw = p.keyword;
        if kw.eq_ignore_ascii_case("SIZE") {
            out.size = Some(parse_decimal(p.value.ok_or(ParseError::BadParam)?)?);
        } else if kw.eq_ignore_ascii_case("BODY") {
            let v = p.value.ok_or(ParseError::BadParam)?;
            out.body = Some(if v.eq_ignore_ascii_case("7BIT") {
                Body::SevenBit
            } else if v.eq_ignore_ascii_case("8BITMIME") {
                Body::EightBitMime
            } else if v.eq_ignore_ascii_case("BINARYMIME") {
                // RFC 3030 BINARYMIME is not advertised.
                return Err(ParseError::UnknownParam);
            } else {
                return Err(ParseError::BadParam);
            });
        } else if kw.eq_ignore_ascii_case("SMTPUTF8") {
            if p.value.is_some() {
                return Err(ParseError::BadParam);
            }
            out.smtputf8 = true;
        } else if kw.eq_ignore_ascii_case("RET") {
            let v = p.value.ok_or(ParseError::BadParam)?;
            out.ret = Some(if v.eq_ignore_ascii_case("FULL") {
                Ret::Full
            } else if v.eq_ignore_ascii_case("HDRS") {
                Ret::Hdrs
            } else {
                return Err(ParseError::BadParam);
            });
        } else if kw.eq_ignore_ascii_case("ENVID") {
            let v = p.value.ok_or(ParseError::BadParam)?;
            if v.len() > MAX_ENVID || !is_xtext(v) {
                return Err(ParseError::BadParam);
            }
            out.envid = Some(v);
        } else if kw.eq_ignore_ascii_case("AUTH") {
            let v = p.value.ok_or(ParseError::BadParam)?;
            if v != "<>" && !is_xtext(v) {
                return Err(ParseError::BadParam);
            }
            out.auth = Some(v);
        } else {
            return Err(ParseError::UnknownParam);
        }
    }
    Ok(MailCommand { from, params: out })
}

fn parse_rcpt<'a>(rest: &'a str, arena: &'a Bump) -> Result<RcptCommand<'a>, ParseError> {
    let path = strip_keyword(rest, "TO:").ok_or(ParseError::RcptSyntax)?;
    if !path.starts_with('<') {
        return Err(ParseError::RcptSyntax);
    }
    let (to, after) = parse_path(path).ok_or(if is_unqualified(path) {
        ParseError::UnqualifiedRecipient
    } else {
        ParseError::BadRecipient
    })?;
    let to = match to {
        Path::Null => return Err(ParseError::NullRecipient),
        Path::Postmaster => Recipient::Postmaster,
        Path::Mailbox(m) => Recipient::Mailbox(m),
    };
    let params = split_params(after, arena)?;
    let mut out = RcptParams::default();
    for (i, p) in params.iter().enumerate() {
        if params[..i]
            .iter()
            .any(|q| q.keyword.eq_ignore_ascii_case(p.keyword))
        {
            return Err(ParseError::BadParam);
        }
        if p.keyword.eq_ignore_ascii_case("NOTIFY") {
            out.notify = Some(parse_notify(p.value.ok_or(ParseError::BadParam)?)?);
        } else if p.keyword.eq_ignore_ascii_case("ORCPT") {
            let v = p.value.ok_or(ParseError::BadParam)?;
            let (addr_type, xtext) = v.split_once(';').ok_or(ParseError::BadParam)?;
            if v.len() > MAX_ORCPT
                || addr_type.is_empty()
                || !addr_type.bytes().all(|b| is_atext(b) && b != b'.')
                || !is_xtext(xtext)
            {
                return Err(ParseError::BadParam);
            }
            out.orcpt = Some(v);
        } else {
            return Err(ParseError::UnknownParam);
        }
    }
    Ok(RcptCommand { to, params: out })
}

fn parse_notify(v: &str) -> Result<Notify, ParseError> {
    let mut n = Notify::default();
    if v.eq_ignore_ascii_case("NEVER") {
        n.never = true;
        return Ok(n);
    }
    for part in v.split(',') {
        let flag = if part.eq_ignore_ascii_case("SUCCESS") {
            &mut n.success
        } else if part.eq_ignore_ascii_case("FAILURE") {
            &mut n.failure
        } else if part.eq_ignore_ascii_case("DELAY") {
            &mut n.delay
        } else {
            return Err(ParseError::BadParam);
        };
        if *flag {
            return Err(ParseError::BadParam);
        }
        *flag = true;
    }
    Ok(n)
}

fn parse_decimal(v: &str) -> Result<u64, ParseError> {
    if v.is_empty() || v.len() > 19 || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ParseError::BadParam);
    }
    v.parse().map_err(|_| ParseError::BadParam)
}

/// Splits `SP keyword[=value] *(SP keyword[=value])` into the arena.
fn split_params<'a>(after: &'a str, arena: &'a Bump) -> Result<Params<'a>, ParseError> {
    let mut params = Params::new_in(arena);
    if after.is_empty() {
        return Ok(params);
    }
    if !after.starts_with(' ') {
        return Err(ParseError::BadParam);
    }
    for word in after.split(' ').filter(|w| !w.is_empty()) {
        let (keyword, value) = match word.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (word, None),
        };
        let kw_ok = keyword
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
            && keyword
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-');
        // RFC 5321 esmtp-value: %d33-60 / %d62-126, plus UTF-8 (RFC 6531).
        let value_ok = value.is_none_or(|v| {
            !v.is_empty()
                && v.bytes()
                    .all(|b| (b >= 33 && b != b'=' && b != 127) || b >= 0x80)
        });
        if !kw_ok || !value_ok {
            return Err(ParseError::BadParam);
        }
        params.push(Param { keyword, value });
    }
    Ok(params)
}

/// RFC 3461 4: xtext = *( xchar / hexchar ), hexchar = "+" 2(%x30-39 / %x41-46).
fn is_xtext(v: &str) -> bool {
    let b = v.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => {
                let hex = |c: u8| c.is_ascii_digit() || (b'A'..=b'F').contains(&c);
                if i + 2 >= b.len() || !(hex(b[i + 1]) && hex(b[i + 2])) {
                    return false;
                }
                i += 3;
            }
            33..=42 | 44..=60 | 62..=126 => i += 1,
            _ => return false,
        }
    }
    true
}

/// `<local-part>` without `@domain` (not `<postmaster>`, which
/// [`parse_path`] accepts for RCPT): refused as syntax on the relay port,
/// and as an unqualified address on submission (RFC 6409 6.2: 554).
fn is_unqualified(path: &str) -> bool {
    let Some(inner) = path.strip_prefix('<').and_then(|p| p.split('>').next()) else {
        return false;
    };
    path.len() > inner.len() + 1
        && parse_local_part(inner).is_some_and(|(_, n, _)| n == inner.len())
}

enum Path<'a> {
    Null,
    Postmaster,
    Mailbox(Mailbox<'a>),
}

/// Parses `<...>` at the start of `s`; returns the path and the text after
/// the closing bracket. A source route (`<@a,@b:u@d>`) is accepted and
/// discarded, as RFC 5321 4.1.1.3 and appendix C direct.
fn parse_path(s: &str) -> Option<(Path<'_>, &str)> {
    let b = s.as_bytes();
    let mut i = 1; // past '<'
    if b.get(i) == Some(&b'>') {
        return Some((Path::Null, &s[2..]));
    }
    if b.get(i) == Some(&b'@') {
        // A-d-l = At-domain *( "," At-domain ) ":"
        loop {
            i += 1; // past '@'
            let (_, n) = parse_domain(&s[i..])?;
            i += n;
            match b.get(i) {
                Some(b',') if b.get(i + 1) == Some(&b'@') => i += 1,
                Some(b':') => {
                    i += 1;
                    break;
                }
                _ => return None,
            }
        }
    }
    let start = i;
    let (local, n, mut utf8) = parse_local_part(&s[i..])?;
    i += n;
    if b.get(i) != Some(&b'@') {
        // Only <postmaster> may appear without a domain (RFC 5321 4.1.1.3).
        if b.get(i) == Some(&b'>') && start == 1 && local.eq_ignore_ascii_case("postmaster") {
            return Some((Path::Postmaster, &s[i + 1..]));
        }
        return None;
    }
    i += 1;
    let (domain, n) = parse_domain(&s[i..])?;
    if let Domain::Name(d) = domain {
        utf8 |= !d.is_ascii();
    }
    i += n;
    if b.get(i) != Some(&b'>') || i + 1 > MAX_PATH {
        return None;
    }
    Some((
        Path::Mailbox(Mailbox {
            local,
            domain,
            utf8,
        }),
        &s[i + 1..],
    ))
}

/// Local-part = Dot-string / Quoted-string; returns (text, length, non-ASCII).
fn parse_local_part(s: &str) -> Option<(&str, usize, bool)> {
    let b = s.as_bytes();
    let mut utf8 = false;
    let mut i = 0;
    if b.first() == Some(&b'"') {
        i = 1;
        loop {
            match *b.get(i)? {
                b'"' => {
                    i += 1;
                    break;
                }
                b'\\' => {
                    let c = *b.get(i + 1)?;
                    if !(32..=126).contains(&c) {
                        return None;
                    }
                    i += 2;
                }
                32..=33 | 35..=91 | 93..=126 => i += 1,
                c if c >= 0x80 => {
                    utf8 = true;
                    i += 1;
                }
                _ => return None,
            }
        }
    } else {
        // Dot-string = Atom *("." Atom)
        let mut atom_len = 0;
        while let Some(&c) = b.get(i) {
            if c == b'.' {
                if atom_len == 0 {
                    return None;
                }
                atom_len = 0;
            } else if is_atext(c) {
                atom_len += 1;
            } else if c >= 0x80 {
                utf8 = true;
                atom_len += 1;
            } else {
                break;
            }
            i += 1;
        }
        if atom_len == 0 {
            return None;
        }
    }
    if i > MAX_LOCAL_PART {
        return None;
    }
    Some((&s[..i], i, utf8))
}

/// Domain / address-literal at the start of `s`; returns it and its length.
fn parse_domain(s: &str) -> Option<(Domain<'_>, usize)> {
    let b = s.as_bytes();
    if b.first() == Some(&b'[') {
        let end = s.find(']')?;
        let lit = &s[1..end];
        if !is_address_literal(lit) {
            return None;
        }
        return Some((Domain::Literal(lit), end + 1));
    }
    // sub-domain *("." sub-domain); sub-domain = Let-dig [Ldh-str], or a
    // U-label under SMTPUTF8. No trailing dot.
    let mut i = 0;
    let mut label_len = 0;
    let mut last = 0u8;
    while let Some(&c) = b.get(i) {
        if c == b'.' {
            if label_len == 0 || last == b'-' {
                return None;
            }
            label_len = 0;
        } else if c.is_ascii_alphanumeric() || c >= 0x80 || (c == b'-' && label_len > 0) {
            label_len += 1;
            if label_len > 63 {
                return None;
            }
        } else {
            break;
        }
        last = c;
        i += 1;
    }
    if label_len == 0 || last == b'-' || i > MAX_DOMAIN {
        return None;
    }
    Some((Domain::Name(&s[..i]), i))
}

/// IPv4-address-literal / "IPv6:" IPv6-addr / General-address-literal.
fn is_address_literal(lit: &str) -> bool {
    if let Some(v6) = lit
        .get(..5)
        .filter(|p| p.eq_ignore_ascii_case("IPv6:"))
        .map(|_| &lit[5..])
    {
        return v6.parse::<std::net::Ipv6Addr>().is_ok();
    }
    if lit.parse::<std::net::Ipv4Addr>().is_ok() {
        return true;
    }
    // General-address-literal = Standardized-tag ":" 1*dcontent
    match lit.split_once(':') {
        Some((tag, content)) => {
            !tag.is_empty()
                && tag.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
                && !content.is_empty()
                && content
                    .bytes()
                    .all(|c| (33..=90).contains(&c) || (94..=126).contains(&c))
        }
        None => false,
    }
}

/// RFC 5322 atext.
fn is_atext(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(&c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> Result<String, ParseError> {
        let arena = Bump::new();
        parse_command(line.as_bytes(), &arena).map(|c| format!("{c:?}"))
    }

    fn mail_from(line: &str) -> Result<Option<String>, ParseError> {
        let arena = Bump::new();
        match parse_command(line.as_bytes(), &arena)? {
            Command::Mail(m) => Ok(m.from.map(|m| m.to_owned_string())),
            other => panic!("not MAIL: {other:?}"),
        }
    }

    #[test]
    fn verbs_are_case_insensitive() {
        assert!(parse("ehlo client.example").unwrap().starts_with("Ehlo"));
        assert!(parse("QuIt").unwrap().starts_with("Quit"));
        assert_eq!(parse("FROB"), Err(ParseError::Unknown));
        assert_eq!(parse(""), Err(ParseError::Unknown));
        assert!(parse("ETRN example.org").unwrap().starts_with("NotImpl"));
    }

    #[test]
    fn starttls_and_auth() {
        assert_eq!(parse("starttls").unwrap(), "StartTls");
        assert_eq!(parse("STARTTLS now"), Err(ParseError::NoArgsAllowed));
        assert_eq!(
            parse("AUTH PLAIN AGFsaWNlAHB3").unwrap(),
            r#"Auth { mechanism: "PLAIN", initial: Some("AGFsaWNlAHB3") }"#
        );
        assert_eq!(
            parse("auth login").unwrap(),
            r#"Auth { mechanism: "login", initial: None }"#
        );
        assert!(parse("AUTH X-UNKNOWN-MECH").is_ok());
        for bad in [
            "AUTH",
            "AUTH ",
            "AUTH PLAIN a b",
            "AUTH PL/AIN",
            "AUTH PLAIN  x",
        ] {
            assert_eq!(parse(bad), Err(ParseError::AuthSyntax), "{bad}");
        }
    }

    #[test]
    fn unqualified_paths() {
        assert_eq!(
            mail_from("MAIL FROM:<alice>"),
            Err(ParseError::UnqualifiedSender)
        );
        assert_eq!(
            parse("RCPT TO:<bob>"),
            Err(ParseError::UnqualifiedRecipient)
        );
        assert_eq!(mail_from("MAIL FROM:<a b>"), Err(ParseError::BadSender));
        assert_eq!(mail_from("MAIL FROM:<a..b>"), Err(ParseError::BadSender));
    }

    #[test]
    fn paths() {
        assert_eq!(mail_from("MAIL FROM:<>"), Ok(None));
        assert_eq!(
            mail_from("MAIL FROM:<a.b@example.org>"),
            Ok(Some("a.b@example.org".into()))
        );
        assert_eq!(
            mail_from("mail from: <x@[127.0.0.1]>"),
            Ok(Some("x@[127.0.0.1]".into()))
        );
        assert_eq!(
            mail_from("MAIL FROM:<x@[IPv6:::1]>"),
            Ok(Some("x@[IPv6:::1]".into()))
        );
        assert_eq!(
            mail_from(r#"MAIL FROM:<"john \"q\" doe"@example.org>"#),
            Ok(Some(r#""john \"q\" doe"@example.org"#.into()))
        );
        assert_eq!(
            mail_from("MAIL FROM:<@relay.example,@b.example:u@example.org>"),
            Ok(Some("u@example.org".into()))
        );
        assert_eq!(
            mail_from("MAIL FROM:<jöran@bücher.example> SMTPUTF8"),
            Ok(Some("jöran@bücher.example".into()))
        );
        for bad in [
            "MAIL FROM:<a..b@example.org>",
            "MAIL FROM:<.a@example.org>",
            "MAIL FROM:<a@example.org.>",
            "MAIL FROM:<a@-example.org>",
            "MAIL FROM:<a@[300.1.1.1]>",
            "MAIL FROM:<a@example.org",
            "MAIL FROM:<a b@example.org>",
            "MAIL FROM:<postmaster>",
            "MAIL FROM:<a@>",
        ] {
            assert_eq!(mail_from(bad), Err(ParseError::BadSender), "{bad}");
        }
        assert_eq!(
            mail_from("MAIL FROM:a@example.org"),
            Err(ParseError::MailSyntax)
        );
        assert_eq!(
            mail_from("MAIL TO:<a@example.org>"),
            Err(ParseError::MailSyntax)
        );
        let long = format!("MAIL FROM:<{}@example.org>", "a".repeat(65));
        assert_eq!(mail_from(&long), Err(ParseError::BadSender));
    }

    #[test]
    fn rcpt_postmaster_and_null() {
        let arena = Bump::new();
        match parse_command(b"RCPT TO:<PostMaster>", &arena).unwrap() {
            Command::Rcpt(r) => assert_eq!(r.to, Recipient::Postmaster),
            other => panic!("{other:?}"),
        }
        assert_eq!(parse("RCPT TO:<>"), Err(ParseError::NullRecipient));
    }

    #[test]
    fn mail_params() {
        let arena = Bump::new();
        let Command::Mail(m) = parse_command(
            b"MAIL FROM:<a@b.example> SIZE=1000 BODY=8BITMIME RET=HDRS ENVID=QQ+2B314 SMTPUTF8",
            &arena,
        )
        .unwrap() else {
            panic!()
        };
        assert_eq!(m.params.size, Some(1000));
        assert_eq!(m.params.body, Some(Body::EightBitMime));
        assert_eq!(m.params.ret, Some(Ret::Hdrs));
        assert_eq!(m.params.envid, Some("QQ+2B314"));
        assert!(m.params.smtputf8);
        assert_eq!(
            parse("MAIL FROM:<a@b.example> FOO=bar"),
            Err(ParseError::UnknownParam)
        );
        for bad in [
            "MAIL FROM:<a@b.example> SIZE=x",
            "MAIL FROM:<a@b.example> SIZE=1 SIZE=2",
            "MAIL FROM:<a@b.example> BODY=9BIT",
            "MAIL FROM:<a@b.example> RET=ALL",
            "MAIL FROM:<a@b.example> ENVID=a+zz",
            "MAIL FROM:<a@b.example> ENVID=a+",
            "MAIL FROM:<a@b.example> SIZE=",
            "MAIL FROM:<a@b.example>SIZE=1",
        ] {
            assert_eq!(parse(bad), Err(ParseError::BadParam), "{bad}");
        }
    }

    #[test]
    fn rcpt_params() {
        let arena = Bump::new();
        let Command::Rcpt(r) = parse_command(
            b"RCPT TO:<u@example.org> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;u+40example.org",
            &arena,
        )
        .unwrap() else {
            panic!()
        };
        assert_eq!(r.params.orcpt, Some("rfc822;u+40example.org"));
        let n = r.params.notify.unwrap();
        assert!(n.success && n.failure && !n.delay && !n.never);
        for bad in [
            "RCPT TO:<u@example.org> NOTIFY=NEVER,SUCCESS",
            "RCPT TO:<u@example.org> NOTIFY=SUCCESS,SUCCESS",
            "RCPT TO:<u@example.org> ORCPT=rfc822",
        ] {
            assert_eq!(parse(bad), Err(ParseError::BadParam), "{bad}");
        }
    }

    #[test]
    fn bdat() {
        assert!(parse("BDAT 0 LAST").unwrap().contains("last: true"));
        assert!(parse("bdat 1000")
            .unwrap()
            .contains("size: 1000, last: false"));
        for bad in [
            "BDAT",
            "BDAT x",
            "BDAT 1 FIRST",
            "BDAT 1 LAST x",
            "BDAT 99999999999999999999",
        ] {
            assert_eq!(parse(bad), Err(ParseError::BdatSyntax), "{bad}");
        }
    }

    #[test]
    fn no_arg_commands() {
        assert_eq!(parse("DATA x"), Err(ParseError::NoArgsAllowed));
        assert!(parse("NOOP anything").is_ok());
        assert_eq!(parse("EHLO"), Err(ParseError::EhloSyntax));
        assert_eq!(parse("HELO "), Err(ParseError::HeloSyntax));
    }

    #[test]
    fn invalid_utf8_args() {
        assert_eq!(
            parse_command(b"MAIL FROM:<\xff@x.example>", &Bump::new()).map(|_| ()),
            Err(ParseError::InvalidUtf8)
        );
    }
}
