//! End to end with Postfix's load generator: `smtp-source` sends 10,000
//! messages over 50 parallel sessions to ringmta with two shards, and every
//! one of them must be queued, decodable, with the right envelope, and with
//! exactly the content smtp-source sends.
//!
//! What smtp-source (Postfix 3.7, `src/smtpstone/smtp-source.c`) sends per
//! message, one connection each (no `-d`), with HELO (it never says EHLO):
//!
//! ```text
//! From: <SENDER>
//! To: <RECIPIENT>
//! Date: DATE                      computed once per process
//! Message-Id: <PID.FD.COUNT@HELO>  %04x each: its pid, the socket fd, and
//!                                 the shared countdown of messages left
//!                                 (an int: near the end it goes down to
//!                                 -SESSIONS, printed as ffffffce and so on)
//!
//! PAYLOAD                         -l bytes, then CRLF
//! ```
//!
//! PAYLOAD is `-l` bytes of 'X' in which, for i = 80, 160, ... < len, byte
//! i-80 is the digit (i/80) % 10 and bytes i-2, i-1 are CR LF: 78-octet
//! lines, the remainder (here 64 'X') ending in the CRLF smtp-source adds.

mod common;

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use common::{assert_received, peer_program, run_peer, Server};

const MESSAGES: usize = 10_000;
const SESSIONS: usize = 50;
const LENGTH: usize = 1024;
const SENDER: &str = "sender@example.org";
const RECIPIENT: &str = "rcpt@localhost";
const HELO: &str = "client.example";

/// The payload smtp-source generates for `-l len`, with its final CRLF.
fn payload(len: usize) -> Vec<u8> {
    let mut data = vec![b'X'; len];
    let mut i = 80;
    while i < len {
        data[i - 80] = b"0123456789"[(i / 80) % 10];
        data[i - 2] = b'\r';
        data[i - 1] = b'\n';
        i += 80;
    }
    data.extend_from_slice(b"\r\n");
    data
}

fn is_hex(s: &str) -> bool {
    s.len() >= 4
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

#[test]
fn ten_thousand_messages_from_smtp_source() {
    let Some(smtp_source) = peer_program("smtp-source", "postfix") else {
        return;
    };
    let server = Server::builder().shards(2).start();
    let target = format!("127.0.0.1:{}", server.port);
    let (sessions, messages, length) = (
        SESSIONS.to_string(),
        MESSAGES.to_string(),
        LENGTH.to_string(),
    );
    let before = SystemTime::now();
    let run = run_peer(
        &smtp_source,
        &[
            "-s", &sessions, "-m", &messages, "-l", &length, "-M", HELO, "-f", SENDER, "-t",
            RECIPIENT, &target,
        ],
        Duration::from_secs(180),
    );
    let after = SystemTime::now();
    assert!(
        run.status.success(),
        "smtp-source failed ({})\n--- stderr ---\n{}\n--- server ---\n{}",
        run.status,
        run.stderr,
        server.stderr()
    );

    let queued = server.queued();
    assert_eq!(queued.len(), MESSAGES, "messages queued");

    let head = format!("From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nDate: ");
    let body = payload(LENGTH);
    let pid = format!("{:04x}", run.pid);
    let mut ids = HashSet::with_capacity(MESSAGES);
    let mut shards = HashSet::new();
    let mut date: Option<String> = None;
    for q in &queued {
        assert!(ids.insert(q.id.clone()), "queue id {} used twice", q.id);
        shards.insert(q.id.get(14..16).unwrap_or_default().to_owned());
        assert_eq!(q.mail_from.as_deref(), Some(SENDER), "{}", q.id);
        assert_eq!(q.rcpts, [RECIPIENT], "{}", q.id);
        assert!(
            q.has_line(&format!("helo {HELO}")),
            "{}: {:?}",
            q.id,
            q.lines
        );
        assert!(q.has_line("protocol SMTP"), "{}: {:?}", q.id, q.lines);
        assert_received(q, HELO, "SMTP", before, after);

        let c = q.content();
        let text = String::from_utf8_lossy(c);
        let rest = text
            .strip_prefix(&head)
            .unwrap_or_else(|| panic!("{}: content does not start with {head:?}: {text:?}", q.id));
        let (this_date, rest) = rest
            .split_once("\r\nMessage-Id: <")
            .unwrap_or_else(|| panic!("{}: no Message-Id after Date: {text:?}", q.id));
        assert!(
            !this_date.is_empty() && this_date.is_ascii(),
            "{}: Date {this_date:?}",
            q.id
        );
        match &date {
            None => date = Some(this_date.to_owned()),
            Some(d) => assert_eq!(d, this_date, "{}: smtp-source sends one Date per run", q.id),
        }
        let (msgid, rest) = rest
            .split_once(">\r\n\r\n")
            .unwrap_or_else(|| panic!("{}: no end of header: {text:?}", q.id));
        let parts: Vec<&str> = msgid
            .strip_suffix(&format!("@{HELO}"))
            .unwrap_or_else(|| panic!("{}: Message-Id <{msgid}> not @{HELO}", q.id))
            .split('.')
            .collect();
        assert!(
            parts.len() == 3 && parts[0] == pid && is_hex(parts[1]) && is_hex(parts[2]),
            "{}: Message-Id <{msgid}> is not <{pid}.FD.COUNT@{HELO}>",
            q.id
        );
        // The countdown is an int shared by all sessions; each session
        // that finds it at 0 or below still decrements it once more.
        let count = u32::from_str_radix(parts[2], 16).expect("hex") as i32;
        assert!(
            (-(SESSIONS as i32)..MESSAGES as i32).contains(&count),
            "{}: Message-Id count {count} out of range",
            q.id
        );
        assert_eq!(
            rest.as_bytes(),
            body.as_slice(),
            "{}: payload differs",
            q.id
        );
    }
    assert_eq!(
        shards,
        HashSet::from(["00".to_owned(), "01".to_owned()]),
        "both shards should have taken connections"
    );
}

#[test]
fn payload_shape() {
    let p = payload(100);
    assert_eq!(p.len(), 102);
    assert_eq!(&p[..2], b"1X");
    assert_eq!(&p[78..80], b"\r\n");
    assert!(p[80..100].iter().all(|&b| b == b'X'));
    let p = payload(LENGTH);
    assert_eq!(&p[880..881], b"2");
    assert!(p[960..1024].iter().all(|&b| b == b'X'));
    assert_eq!(&p[1024..], b"\r\n");
}
