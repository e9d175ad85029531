//! Which recipients of the local domains exist, and which mailbox names a
//! Maildir can hold: one decision, made at `RCPT` (so a client that names a
//! recipient we cannot deliver gets `550 5.1.1` in its session) and again
//! by Maildir delivery (so nothing queued before the check existed can
//! write outside the Maildir root).
//!
//! Refusing at `RCPT` is what keeps ringmta from backscatter: a recipient
//! accepted and then failed at delivery turns into a bounce to the envelope
//! sender, who on the relay port is whoever the client claimed to be.
//!
//! Must never do I/O and never accept a name that is a path (`/`, a leading
//! dot, `..`) or holds control characters.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use arc_swap::ArcSwap;

/// Why a recipient of a local domain is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Not in the `--local-recipients` table, and its domain has no
    /// catch-all.
    #[error("User unknown")]
    Unknown,
    /// A name no Maildir can hold (the reason says which rule it breaks).
    #[error("undeliverable mailbox name ({0})")]
    Unusable(&'static str),
}

/// How a recipient's domain is delivered, as far as the checks care.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Locality {
    /// One of the `--local-domain`s: the recipient table applies (also when
    /// a `--route` sends the domain on by SMTP, as Postfix's
    /// `relay_recipient_maps` would).
    pub local_domain: bool,
    /// Delivered into a Maildir (a local domain without an SMTP route, or a
    /// `maildir:` route): the name must be Maildir-safe, and the recipient
    /// table applies too.
    pub maildir: bool,
}

impl Locality {
    /// Whether any local check applies.
    pub fn is_local(self) -> bool {
        self.local_domain || self.maildir
    }
}

/// A Maildir-safe mailbox: the two directory names under the Maildir root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mailbox {
    /// The local part, unquoted (`"john"` and `john` are one mailbox), its
    /// case kept (RFC 5321 2.4: only the recipient's host may fold it).
    pub local: String,
    /// The domain in lower case.
    pub domain: String,
}

/// The Maildir mailbox of `addr` (`local@domain`), or why no Maildir can
/// hold it. Delivery builds its path from this; `RCPT` refuses with it.
pub fn maildir_mailbox(addr: &str) -> Result<Mailbox, Refusal> {
    let (local, domain) = maildir_parts(addr)?;
    Ok(Mailbox {
        local: local.into_owned(),
        domain: domain.to_ascii_lowercase(),
    })
}

/// [`maildir_mailbox`] without the copies (one RCPT of a plain address
/// allocates nothing here): the unquoted local part and the domain as
/// written.
fn maildir_parts(addr: &str) -> Result<(Cow<'_, str>, &str), Refusal> {
    let (local, domain) = addr
        .rsplit_once('@')
        .ok_or(Refusal::Unusable("address without a domain"))?;
    let local = unquote(local).ok_or(Refusal::Unusable("malformed quoted string"))?;
    name_rule(&local).map_err(Refusal::Unusable)?;
    name_rule(domain).map_err(|_| Refusal::Unusable("domain not usable as a directory name"))?;
    Ok((local, domain))
}

/// The decision for a recipient `addr` whose domain is delivered as `at`
/// says: `Ok(None)` to accept it as written, `Ok(Some(addr))` to accept it
/// under the spelling the table lists (local parts match without regard to
/// case, so `John@` and `john@` do not end in two Maildirs), or why not.
/// `table` is `None` when no `--local-recipients` is configured: then every
/// Maildir-safe local part exists.
pub fn check(
    addr: &str,
    at: Locality,
    table: Option<&RecipientTable>,
) -> Result<Option<String>, Refusal> {
    if !at.is_local() {
        return Ok(None);
    }
    if at.maildir {
        maildir_parts(addr)?;
    }
    let Some(table) = table else {
        return Ok(None);
    };
    let (raw_local, domain) = addr
        .rsplit_once('@')
        .ok_or(Refusal::Unusable("address without a domain"))?;
    let local = unquote(raw_local).ok_or(Refusal::Unusable("malformed quoted string"))?;
    // RFC 5321 4.5.1: every domain we take mail for has a postmaster.
    if local.eq_ignore_ascii_case("postmaster") {
        return Ok(None);
    }
    match table.lookup(&local, domain) {
        Lookup::Unknown => Err(Refusal::Unknown),
        Lookup::CatchAll => Ok(None),
        // A quoted local part stays as sent: the listed spelling may need
        // the quotes too.
        Lookup::User(listed) if listed != raw_local && !raw_local.starts_with('"') => {
            Ok(Some(format!("{listed}@{domain}")))
        }
        Lookup::User(_) => Ok(None),
    }
}

/// `postmaster` without a domain (RFC 5321 4.5.1) is the postmaster of the
/// first local domain; every other address is returned as it is.
pub fn qualify_postmaster<'a>(addr: &'a str, first_local_domain: Option<&str>) -> Cow<'a, str> {
    match first_local_domain {
        Some(d) if addr.eq_ignore_ascii_case("postmaster") => Cow::Owned(format!("postmaster@{d}")),
        _ => Cow::Borrowed(addr),
    }
}

/// The recipients of the local domains that exist (`--local-recipients`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecipientTable {
    /// `local@domain`, both folded to lower case, to the local part as
    /// listed.
    users: HashMap<String, String>,
    /// Domains (lower case) where every local part exists.
    catch_all: HashSet<String>,
}

/// A line of a recipient table that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct TableError {
    pub line: usize,
    pub reason: &'static str,
}

/// What the table says of one recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup<'a> {
    /// Listed, with this spelling of the local part.
    User(&'a str),
    /// Not listed, but its domain has an `@domain` catch-all.
    CatchAll,
    Unknown,
}

impl RecipientTable {
    /// Parses the file's text: one `user@domain` or `@domain` (a catch-all)
    /// per line, `#` comment lines and blank lines. A second column, as in
    /// a Postfix map (`user@example.org OK`), is allowed and ignored.
    pub fn parse(text: &str) -> Result<RecipientTable, TableError> {
        let mut t = RecipientTable::default();
        for (i, line) in text.lines().enumerate() {
            let err = |reason| TableError {
                line: i + 1,
                reason,
            };
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut words = line.split_whitespace();
            let key = words.next().unwrap_or_default();
            if words.nth(1).is_some() {
                return Err(err("expected one address per line"));
            }
            let (local, domain) = key
                .rsplit_once('@')
                .ok_or_else(|| err("expected user@domain or @domain"))?;
            if domain.is_empty() || domain.contains(['@', '/']) || domain.starts_with('.') {
                return Err(err("bad domain"));
            }
            let domain = domain.to_ascii_lowercase();
            if local.is_empty() {
                t.catch_all.insert(domain);
                continue;
            }
            let local = unquote(local).ok_or_else(|| err("malformed quoted string"))?;
            t.users.insert(fold(&local, &domain), local.into_owned());
        }
        Ok(t)
    }

    /// How many addresses and catch-alls it lists.
    pub fn len(&self) -> usize {
        self.users.len() + self.catch_all.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Looks up an unquoted local part at `domain` (any case).
    pub fn lookup(&self, local: &str, domain: &str) -> Lookup<'_> {
        let domain = domain.to_ascii_lowercase();
        if let Some(listed) = self.users.get(&fold(local, &domain)) {
            return Lookup::User(listed);
        }
        if self.catch_all.contains(&domain) {
            Lookup::CatchAll
        } else {
            Lookup::Unknown
        }
    }
}

/// The recipient table in force, shared by every session of every shard
/// and replaced whole on reload (a lookup sees the old table or the new,
/// never a mix). The default is disabled: every Maildir-safe local part of
/// a local domain exists.
#[derive(Debug, Clone, Default)]
pub struct Recipients(Option<Arc<ArcSwap<RecipientTable>>>);

impl Recipients {
    /// Enabled, with `table` in force until [`Recipients::replace`].
    pub fn enabled(table: RecipientTable) -> Recipients {
        Recipients(Some(Arc::new(ArcSwap::from_pointee(table))))
    }

    pub fn is_enabled(&self) -> bool {
        self.0.is_some()
    }

    /// Puts `table` in force for every clone of this handle (nothing when
    /// disabled).
    pub fn replace(&self, table: RecipientTable) {
        if let Some(t) = &self.0 {
            t.store(Arc::new(table));
        }
    }

    /// [`check`] against the table in force.
    pub fn check(&self, addr: &str, at: Locality) -> Result<Option<String>, Refusal> {
        let guard = self.0.as_ref().map(|t| t.load());
        check(addr, at, guard.as_deref().map(Arc::as_ref))
    }
}

/// The key of a table entry: both parts in lower case (Unicode lower case
/// for the local part, which may be UTF-8 under SMTPUTF8).
fn fold(local: &str, domain: &str) -> String {
    format!("{}@{domain}", local.to_lowercase())
}

/// A local part without its quotes and quoted-pair backslashes (RFC 5321
/// 4.1.2), or as it is when not quoted; `None` when the quoting is broken.
fn unquote(local: &str) -> Option<Cow<'_, str>> {
    let Some(inner) = local.strip_prefix('"') else {
        return Some(Cow::Borrowed(local));
    };
    let inner = inner.strip_suffix('"')?;
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.push(chars.next()?),
            '"' => return None,
            c => out.push(c),
        }
    }
    Some(Cow::Owned(out))
}

/// Whether `name` can be one directory name under the Maildir root, and
/// the rule it breaks if not. Dots follow the dot-atom shape (no leading,
/// trailing or doubled dot) even inside quotes: a quoted `".."` or `".x"`
/// would otherwise be a path or a hidden directory.
fn name_rule(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("empty");
    }
    if name.len() > 255 {
        return Err("longer than 255 octets");
    }
    if name.starts_with('.') {
        return Err("leading dot");
    }
    if name.ends_with('.') {
        return Err("trailing dot");
    }
    if name.contains("..") {
        return Err("two dots in a row");
    }
    if name.contains('/') {
        return Err("contains '/'");
    }
    if name.bytes().any(|b| b < 0x20 || b == 0x7f) {
        return Err("control character");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAILDIR: Locality = Locality {
        local_domain: true,
        maildir: true,
    };
    const SMTP_ROUTED: Locality = Locality {
        local_domain: true,
        maildir: false,
    };
    const REMOTE: Locality = Locality {
        local_domain: false,
        maildir: false,
    };

    #[test]
    fn maildir_mailboxes_stay_inside_the_root() {
        assert_eq!(
            maildir_mailbox("John.Doe@Example.ORG"),
            Ok(Mailbox {
                local: "John.Doe".into(),
                domain: "example.org".into()
            })
        );
        assert_eq!(maildir_mailbox("\"john\"@x.test").unwrap().local, "john");
        assert_eq!(maildir_mailbox("\"a b\"@x.test").unwrap().local, "a b");
        for (bad, why) in [
            ("a/b@example.org", "contains '/'"),
            ("\"a\\/b\"@example.org", "contains '/'"),
            ("\"../x\"@example.org", "leading dot"),
            ("\".x\"@example.org", "leading dot"),
            ("\"x.\"@example.org", "trailing dot"),
            ("\"a..b\"@example.org", "two dots in a row"),
            ("\"..\"@example.org", "leading dot"),
            ("\"\"@example.org", "empty"),
            ("a\u{1}b@example.org", "control character"),
            ("\"a\\\u{7f}\"@example.org", "control character"),
            ("a\0b@example.org", "control character"),
            ("nodomain", "address without a domain"),
            ("x@..", "domain not usable as a directory name"),
            ("x@a/b", "domain not usable as a directory name"),
            ("\"x@example.org", "malformed quoted string"),
        ] {
            assert_eq!(maildir_mailbox(bad), Err(Refusal::Unusable(why)), "{bad}");
        }
        let long = format!("{}@example.org", "a".repeat(256));
        assert!(maildir_mailbox(&long).is_err());
    }

    #[test]
    fn checks_apply_by_locality() {
        // A remote domain is none of this policy's business.
        assert_eq!(check("a/b@remote.test", REMOTE, None), Ok(None));
        // Only Maildir delivery needs a Maildir-safe name.
        assert_eq!(check("a/b@example.org", SMTP_ROUTED, None), Ok(None));
        assert_eq!(
            check("a/b@example.org", MAILDIR, None),
            Err(Refusal::Unusable("contains '/'"))
        );
        // Without a table, any safe local part exists.
        assert_eq!(check("anyone@example.org", MAILDIR, None), Ok(None));
    }

    fn table() -> RecipientTable {
        RecipientTable::parse(
            "# users\n\
             \n\
             alice@example.org\n\
             \tBob.Smith@Example.ORG   OK\n\
             @catchall.example\n\
             \"quoted\"@example.org\n",
        )
        .unwrap()
    }

    #[test]
    fn table_lookups_fold_case_and_know_catch_alls() {
        let t = table();
        assert_eq!(t.len(), 4);
        assert_eq!(t.lookup("alice", "example.org"), Lookup::User("alice"));
        assert_eq!(t.lookup("ALICE", "EXAMPLE.org"), Lookup::User("alice"));
        assert_eq!(
            t.lookup("bob.smith", "example.org"),
            Lookup::User("Bob.Smith")
        );
        assert_eq!(t.lookup("carol", "example.org"), Lookup::Unknown);
        assert_eq!(t.lookup("anyone", "Catchall.Example"), Lookup::CatchAll);
        assert_eq!(t.lookup("alice", "other.example"), Lookup::Unknown);
        assert_eq!(t.lookup("quoted", "example.org"), Lookup::User("quoted"));
    }

    #[test]
    fn table_decisions() {
        let t = table();
        let t = Some(&t);
        assert_eq!(check("alice@example.org", MAILDIR, t), Ok(None));
        // Another case is delivered under the listed spelling.
        assert_eq!(
            check("ALICE@example.org", MAILDIR, t),
            Ok(Some("alice@example.org".into()))
        );
        assert_eq!(
            check("bob.smith@example.org", SMTP_ROUTED, t),
            Ok(Some("Bob.Smith@example.org".into()))
        );
        assert_eq!(check("\"Alice\"@example.org", MAILDIR, t), Ok(None));
        assert_eq!(
            check("carol@example.org", MAILDIR, t),
            Err(Refusal::Unknown)
        );
        assert_eq!(
            check("carol@example.org", SMTP_ROUTED, t),
            Err(Refusal::Unknown)
        );
        assert_eq!(check("x@catchall.example", MAILDIR, t), Ok(None));
        // Postmaster always exists (RFC 5321 4.5.1), listed or not.
        assert_eq!(check("PostMaster@example.org", MAILDIR, t), Ok(None));
        assert_eq!(check("postmaster@unlisted.example", MAILDIR, t), Ok(None));
        // The Maildir check comes first: a listed name still has to be safe.
        let bad = RecipientTable::parse("a/b@example.org\n").unwrap();
        assert_eq!(
            check("a/b@example.org", MAILDIR, Some(&bad)),
            Err(Refusal::Unusable("contains '/'"))
        );
        assert_eq!(check("nobody@remote.test", REMOTE, t), Ok(None));
    }

    #[test]
    fn table_syntax_errors_name_the_line() {
        for (text, line) in [
            ("alice@example.org\nbob\n", 2),
            ("a@b.example x y\n", 1),
            ("#c\n\nalice@\n", 3),
            ("alice@.example\n", 1),
            ("\"alice@example.org\n", 1),
        ] {
            assert_eq!(
                RecipientTable::parse(text).map_err(|e| e.line),
                Err(line),
                "{text:?}"
            );
        }
        assert!(RecipientTable::parse("# nothing\n\n").unwrap().is_empty());
    }

    #[test]
    fn reloads_are_seen_by_every_clone() {
        let r = Recipients::enabled(table());
        let session = r.clone();
        assert_eq!(
            session.check("carol@example.org", MAILDIR),
            Err(Refusal::Unknown)
        );
        r.replace(RecipientTable::parse("carol@example.org\n").unwrap());
        assert_eq!(session.check("carol@example.org", MAILDIR), Ok(None));
        assert_eq!(
            session.check("alice@example.org", MAILDIR),
            Err(Refusal::Unknown)
        );
        let off = Recipients::default();
        assert!(!off.is_enabled());
        off.replace(table());
        assert_eq!(off.check("carol@example.org", MAILDIR), Ok(None));
    }

    #[test]
    fn bare_postmaster_is_the_first_local_domains() {
        assert_eq!(
            qualify_postmaster("PostMaster", Some("example.org")),
            "postmaster@example.org"
        );
        assert_eq!(qualify_postmaster("postmaster", None), "postmaster");
        assert_eq!(
            qualify_postmaster("postmaster@x.test", Some("example.org")),
            "postmaster@x.test"
        );
    }
}
