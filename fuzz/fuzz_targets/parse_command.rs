//! `parse_command` on arbitrary bytes: it must never panic, and whatever it
//! accepts must be a faithful view of the line it was given.
//!
//! Invariants checked on `Ok`:
//! * every `&str` in the command borrows from the input line itself (the
//!   parser copies nothing, and so cannot invent text);
//! * the verb of the line names the variant that came out;
//! * a mailbox is written contiguously (`local@domain`) in the line, respects
//!   the RFC 5321 length limits, its `utf8` flag says whether it is ASCII,
//!   and it parses back to the same mailbox on its own;
//! * parsing is deterministic and does not depend on the arena's history.

#![no_main]

use bumpalo::Bump;
use libfuzzer_sys::fuzz_target;
use ringmta::smtp::command::{Command, Domain, Mailbox, Recipient};
use ringmta::smtp::parse::{parse_command, MAX_DOMAIN, MAX_LOCAL_PART};

fuzz_target!(|line: &[u8]| {
    let arena = Bump::new();
    let first = parse_command(line, &arena);

    // Same answer from a fresh arena and from one already holding data.
    let again = parse_command(line, &arena);
    assert_eq!(format!("{first:?}"), format!("{again:?}"));

    let Ok(cmd) = first else { return };
    check_command(line, &cmd);
});

fn check_command(line: &[u8], cmd: &Command<'_>) {
    let verb = line.split(|&b| b == b' ').next().unwrap_or_default();
    let expect_verb = |name: &str| {
        assert!(
            verb.eq_ignore_ascii_case(name.as_bytes()),
            "{cmd:?} from verb {:?}",
            String::from_utf8_lossy(verb)
        );
    };
    match cmd {
        Command::Ehlo(name) | Command::Helo(name) => {
            expect_verb(if matches!(cmd, Command::Ehlo(_)) {
                "EHLO"
            } else {
                "HELO"
            });
            assert_within(line, name);
            assert!(!name.is_empty());
            assert!(name.bytes().all(|b| b > 0x20 && b != 0x7f), "{name:?}");
        }
        Command::Mail(m) => {
            expect_verb("MAIL");
            if let Some(from) = &m.from {
                check_mailbox(line, from);
                assert_reparses(&format!("MAIL FROM:<{}>", from.to_owned_string()), from);
            } else {
                assert!(contains(line, b"<>"));
            }
            for s in [m.params.envid, m.params.auth].into_iter().flatten() {
                assert_within(line, s);
            }
        }
        Command::Rcpt(r) => {
            expect_verb("RCPT");
            match &r.to {
                Recipient::Postmaster => {
                    let lower = line.to_ascii_lowercase();
                    assert!(contains(&lower, b"<postmaster>"));
                }
                Recipient::Mailbox(to) => {
                    check_mailbox(line, to);
                    assert_reparses(&format!("RCPT TO:<{}>", to.to_owned_string()), to);
                }
            }
            if let Some(orcpt) = r.params.orcpt {
                assert_within(line, orcpt);
                assert!(orcpt.contains(';'));
            }
        }
        Command::Bdat { size, .. } => {
            expect_verb("BDAT");
            // The size is written in decimal (leading zeros allowed).
            let digits = size.to_string();
            assert!(contains(line, digits.as_bytes()), "{size}");
        }
        Command::Data => expect_verb("DATA"),
        Command::Rset => expect_verb("RSET"),
        Command::Quit => expect_verb("QUIT"),
        Command::Noop => expect_verb("NOOP"),
        Command::Help => expect_verb("HELP"),
        Command::Vrfy => expect_verb("VRFY"),
        Command::StartTls => expect_verb("STARTTLS"),
        Command::Auth { mechanism, initial } => {
            expect_verb("AUTH");
            assert_within(line, mechanism);
            assert!(!mechanism.is_empty());
            if let Some(initial) = initial {
                assert_within(line, initial);
            }
        }
        Command::NotImplemented => {}
    }
}

fn check_mailbox(line: &[u8], mb: &Mailbox<'_>) {
    assert_within(line, mb.local);
    let domain = match mb.domain {
        Domain::Name(d) | Domain::Literal(d) => d,
    };
    assert_within(line, domain);
    assert!(
        !mb.local.is_empty() && mb.local.len() <= MAX_LOCAL_PART,
        "{mb:?}"
    );
    assert!(!domain.is_empty() && domain.len() <= MAX_DOMAIN, "{mb:?}");
    let text = mb.to_owned_string();
    assert!(contains(line, text.as_bytes()), "{text:?} not in the line");
    assert_eq!(mb.utf8, !text.is_ascii(), "{mb:?}");
}

/// A mailbox the parser accepted, written back on its own, parses to itself.
fn assert_reparses(line: &str, mb: &Mailbox<'_>) {
    let arena = Bump::new();
    let got = match parse_command(line.as_bytes(), &arena) {
        Ok(Command::Mail(m)) => m.from,
        Ok(Command::Rcpt(r)) => match r.to {
            Recipient::Mailbox(m) => Some(m),
            Recipient::Postmaster => None,
        },
        other => panic!("{line:?} does not parse back: {other:?}"),
    };
    assert_eq!(got.as_ref(), Some(mb), "{line:?}");
}

/// `s` is a subslice of `line` (borrowed from it, not merely equal to a part).
fn assert_within(line: &[u8], s: &str) {
    let start = line.as_ptr() as usize;
    let p = s.as_ptr() as usize;
    assert!(
        p >= start && p + s.len() <= start + line.len(),
        "{s:?} does not borrow from the line"
    );
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    memchr::memmem::find(haystack, needle).is_some()
}
