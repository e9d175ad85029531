//! SMTP smuggling, end to end: a DATA whose content holds a bare-CR/LF
//! "end of data" followed by a complete second transaction must stay ONE
//! message with ONE reply; the second transaction is never executed.
//!
//! Each sequence is sent twice: in one write, and with the sequence in a
//! write of its own between pauses (so the server sees it at the edge of a
//! read, where held-back bytes matter).

mod common;

use std::time::Duration;

use common::{queued_id, Client, Server};

/// The end-of-data look-alikes of the SMTP-smuggling research (SEC
/// Consult, 2023) and their CR-only variants.
const SEQUENCES: [(&str, &[u8]); 6] = [
    ("LF.LF", b"\n.\n"),
    ("LF.CRLF", b"\n.\r\n"),
    ("CRLF.LF", b"\r\n.\n"),
    ("CR.CR", b"\r.\r"),
    ("CR.CRLF", b"\r.\r\n"),
    ("CRLF.CR", b"\r\n.\r"),
];

const OUTER: &[u8] = b"From: <alice@example.org>\r\nSubject: outer\r\n\r\nfirst part";
/// The smuggled transaction; the real `<CRLF>.<CRLF>` that follows ends it
/// for a vulnerable server, and ends the outer message for a correct one.
const SMUGGLED: &[u8] = b"MAIL FROM:<evil@example.org>\r\n\
RCPT TO:<victim@localhost>\r\n\
DATA\r\n\
From: <ceo@example.org>\r\n\
Subject: smuggled\r\n\
\r\n\
smuggled body";
const END: &[u8] = b"\r\n.\r\n";

const BARE_NEWLINE_REFUSED: &str =
    "550 5.6.0 Error: message contains bare CR or LF; lines must end with <CR><LF>";

#[derive(Clone, Copy, Debug)]
enum Delivery {
    OneWrite,
    SequenceAlone,
}

/// Opens a transaction, sends the smuggling content, and returns the one
/// reply to it; then checks the session is in step (NOOP is answered next).
fn smuggle(server: &Server, seq: &[u8], how: Delivery) -> common::Reply {
    let mut c = server.connect();
    c.hello("client.example");
    c.expect("MAIL FROM:<sender@example.org>", 250);
    c.expect("RCPT TO:<user@localhost>", 250);
    c.expect("DATA", 354);
    match how {
        Delivery::OneWrite => {
            let mut all = OUTER.to_vec();
            all.extend_from_slice(seq);
            all.extend_from_slice(SMUGGLED);
            all.extend_from_slice(END);
            c.send(&all);
        }
        Delivery::SequenceAlone => {
            c.send(OUTER);
            pause_and_expect_nothing(&mut c);
            c.send(seq);
            pause_and_expect_nothing(&mut c);
            c.send(SMUGGLED);
            pause_and_expect_nothing(&mut c);
            c.send(END);
        }
    }
    let r = c.reply();
    let noop = c.cmd("NOOP");
    assert!(
        noop.is("250 2.0.0 Ok"),
        "after the content's reply `{r}`, NOOP got `{noop}`: the session is out of step \
         (the smuggled commands were executed?)"
    );
    c.expect("QUIT", 221);
    c.expect_closed();
    r
}

/// Nothing may be answered before the real end of the data.
fn pause_and_expect_nothing(c: &mut Client) {
    c.expect_silence(Duration::from_millis(60));
}

/// `--bare-newline reject`: exactly one 550 5.6.0, and nothing queued.
#[test]
fn smuggling_is_refused_with_one_reply_and_nothing_queued() {
    let server = Server::start(&["--bare-newline", "reject"]);
    for (name, seq) in SEQUENCES {
        for how in [Delivery::OneWrite, Delivery::SequenceAlone] {
            let r = smuggle(&server, seq, how);
            assert!(
                r.is(BARE_NEWLINE_REFUSED),
                "{name} ({how:?}): expected `{BARE_NEWLINE_REFUSED}`, got `{r}`"
            );
            let queued = server.queued();
            assert!(
                queued.is_empty(),
                "{name} ({how:?}): {} message(s) queued: {:?}",
                queued.len(),
                queued
                    .iter()
                    .map(|q| (&q.mail_from, &q.rcpts))
                    .collect::<Vec<_>>()
            );
        }
    }
}

/// The default `--bare-newline normalize`: exactly one message, for the
/// real sender and recipient, whose content holds the would-be commands as
/// text, every bare CR/LF stored as CRLF.
#[test]
fn smuggling_is_one_normalized_message_by_default() {
    let server = Server::start(&[]);
    let mut expected = OUTER.to_vec();
    // The bare line ends become CRLF, and the '.' that then starts a line
    // is unstuffed, as after a real CRLF.
    expected.extend_from_slice(b"\r\n\r\n");
    expected.extend_from_slice(SMUGGLED);
    expected.extend_from_slice(b"\r\n");
    let mut count = 0;
    for (name, seq) in SEQUENCES {
        for how in [Delivery::OneWrite, Delivery::SequenceAlone] {
            let r = smuggle(&server, seq, how);
            let id = queued_id(&r);
            count += 1;
            let queued = server.queued();
            assert_eq!(
                queued.len(),
                count,
                "{name} ({how:?}): expected {count} messages in all, found {:?}",
                queued
                    .iter()
                    .map(|q| (&q.mail_from, &q.rcpts))
                    .collect::<Vec<_>>()
            );
            let q = server.message(&id);
            assert_eq!(
                q.mail_from.as_deref(),
                Some("sender@example.org"),
                "{name} ({how:?})"
            );
            assert_eq!(q.rcpts, ["user@localhost"], "{name} ({how:?})");
            assert_eq!(
                String::from_utf8_lossy(q.content()),
                String::from_utf8_lossy(&expected),
                "{name} ({how:?})"
            );
        }
    }
}
