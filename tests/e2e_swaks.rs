//! End to end with a real client: swaks (Debian's `swaks`) sends to a real
//! ringmta, and the queued message must be byte for byte what swaks put on
//! the wire, after ringmta's own `Received:` header.
//!
//! swaks 20201014 (Debian 12) has no CHUNKING/BDAT support and no option to
//! add `BODY=8BITMIME` to MAIL, so those two cases are sent with the raw
//! test client instead (`bdat_message_raw_client`,
//! `eight_bit_body_with_body_8bitmime_raw_client`).
//!
//! How swaks is fed: `--data @FILE` holds the message without its final
//! CRLF; swaks ends the data with CRLF `.` CRLF, dot-stuffs lines that start
//! with '.', and leaves everything else alone when the file has CRLF line
//! ends and no `%TOKEN%`s or backslash escapes. So the content on the wire
//! (after unstuffing) is exactly FILE + CRLF.

mod common;

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use common::{assert_received, peer_program, queued_id, run_peer, Server};

const SWAKS_TIMEOUT: Duration = Duration::from_secs(60);

/// Sends `message` (which must end in CRLF) with swaks plus `extra` flags
/// and returns swaks' transcript (stdout); asserts the one queued message
/// is `message`, with the right envelope and trace header.
fn send_with_swaks(message: &[u8], extra: &[&str]) -> Option<String> {
    let swaks = peer_program("swaks", "swaks")?;
    assert!(message.ends_with(b"\r\n"));
    let server = Server::start(&[]);
    let dir = tempfile::tempdir().expect("temp dir");
    let file: PathBuf = dir.path().join("message.eml");
    std::fs::write(&file, &message[..message.len() - 2]).expect("write message file");
    let port = server.port.to_string();
    let data = format!("@{}", file.display());
    let mut args = vec![
        "--server",
        "127.0.0.1",
        "--port",
        &port,
        "--protocol",
        "ESMTP",
        "--helo",
        "client.example",
        "--from",
        "sender@example.org",
        "--to",
        "user@localhost",
        "--data",
        &data,
        "--timeout",
        "10",
    ];
    args.extend_from_slice(extra);
    let before = SystemTime::now();
    let run = run_peer(&swaks, &args, SWAKS_TIMEOUT);
    let after = SystemTime::now();
    assert!(
        run.status.success(),
        "swaks failed ({})\n--- stdout ---\n{}\n--- stderr ---\n{}\n--- server ---\n{}",
        run.status,
        run.stdout,
        run.stderr,
        server.stderr()
    );
    let queued = server.queued();
    assert_eq!(queued.len(), 1, "swaks transcript:\n{}", run.stdout);
    let q = &queued[0];
    assert!(
        run.stdout
            .contains(&format!("250 2.0.0 Ok: queued as {}", q.id)),
        "swaks did not see the queue id {}:\n{}",
        q.id,
        run.stdout
    );
    assert_eq!(q.mail_from.as_deref(), Some("sender@example.org"));
    assert_eq!(q.rcpts, ["user@localhost"]);
    assert!(q.has_line("helo client.example"), "{:?}", q.lines);
    assert!(q.has_line("protocol ESMTP"), "{:?}", q.lines);
    assert_received(q, "client.example", "ESMTP", before, after);
    assert!(
        q.received().contains("\r\n\tfor <user@localhost>;\r\n\t"),
        "{}",
        q.received()
    );
    assert_eq!(
        q.content(),
        message,
        "content differs:\n got {:?}\nsent {:?}",
        String::from_utf8_lossy(q.content()),
        String::from_utf8_lossy(message)
    );
    Some(run.stdout)
}

#[test]
fn plain_message() {
    let msg = b"From: <sender@example.org>\r\n\
To: <user@localhost>\r\n\
Subject: plain\r\n\
Message-ID: <plain.1@example.org>\r\n\
\r\n\
Hello,\r\n\
\r\n\
a plain message with an empty line, trailing spaces   \r\n\
\tand a tab.\r\n";
    send_with_swaks(msg, &[]);
}

#[test]
fn pipelined() {
    let msg = b"Subject: pipelined\r\n\r\nsent with --pipeline\r\n";
    let Some(transcript) = send_with_swaks(msg, &["--pipeline"]) else {
        return;
    };
    // swaks really pipelined: MAIL, RCPT and DATA went out before the
    // first of their replies came back.
    let sent_before_replies = ["-> MAIL FROM:", "-> RCPT TO:", "-> DATA", "<-  250 2.1.0"];
    let mut at = 0;
    for needle in sent_before_replies {
        match transcript[at..].find(needle) {
            Some(i) => at += i + needle.len(),
            None => panic!("swaks did not pipeline (looking for {needle:?}):\n{transcript}"),
        }
    }
    assert!(
        !transcript[..at].contains("<-  250 2.1.5"),
        "RCPT was answered before DATA was sent:\n{transcript}"
    );
}

#[test]
fn eight_bit_body() {
    let msg = b"Subject: 8bit\r\n\
Content-Type: text/plain; charset=utf-8\r\n\
Content-Transfer-Encoding: 8bit\r\n\
\r\n\
UTF-8: Gr\xc3\xbc\xc3\x9fe, \xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e, \xf0\x9f\x98\x80\r\n\
Latin-1: caf\xe9, cr\xe8me br\xfbl\xe9e\r\n\
high bytes: \x80\x81\xfe\xff\r\n";
    send_with_swaks(msg, &[]);
}

#[test]
fn dot_stuffing() {
    let msg = b"Subject: dots\r\n\
\r\n\
.\r\n\
..\r\n\
.leading dot\r\n\
...three dots\r\n\
. space\r\n\
middle . dot\r\n\
last line\r\n";
    let Some(transcript) = send_with_swaks(msg, &[]) else {
        return;
    };
    // swaks did stuff them on the wire (and ringmta took the dots off).
    let sent: Vec<&str> = transcript
        .lines()
        .filter_map(|l| l.trim_end().strip_prefix(" -> "))
        .collect();
    for stuffed in ["..", "...", "..leading dot", "....three dots", ".. space"] {
        assert!(
            sent.contains(&stuffed),
            "swaks did not send {stuffed:?}:\n{transcript}"
        );
    }
}

/// swaks cannot send BDAT: the raw client sends the message in three
/// chunks (the middle one pipelined with the last), which ringmta stores
/// as they are, never unstuffed; only the bare LF becomes CRLF
/// (`--bare-newline normalize`, as for DATA).
#[test]
fn bdat_message_raw_client() {
    let server = Server::start(&[]);
    let msg: &[u8] =
        b"Subject: chunked\r\n\r\n.not stuffed in BDAT\r\nbare\nLF made CRLF\r\n.\r\nend\r\n";
    let (a, rest) = msg.split_at(20);
    let (b, c) = rest.split_at(17);
    let mut client = server.connect();
    client.hello("client.example");
    let before = SystemTime::now();
    client.expect("MAIL FROM:<sender@example.org>", 250);
    client.expect("RCPT TO:<user@localhost>", 250);
    let mut first = format!("BDAT {}\r\n", a.len()).into_bytes();
    first.extend_from_slice(a);
    client.send(&first);
    assert!(client
        .reply()
        .is(&format!("250 2.0.0 Ok: {} octets received", a.len())));
    let mut rest = format!("BDAT {}\r\n", b.len()).into_bytes();
    rest.extend_from_slice(b);
    rest.extend_from_slice(format!("BDAT {} LAST\r\n", c.len()).as_bytes());
    rest.extend_from_slice(c);
    client.send(&rest);
    assert!(client
        .reply()
        .is(&format!("250 2.0.0 Ok: {} octets received", b.len())));
    let id = queued_id(&client.reply());
    let after = SystemTime::now();
    client.expect("QUIT", 221);
    let q = server.message(&id);
    assert!(q.has_line("chunked"), "{:?}", q.lines);
    assert_received(&q, "client.example", "ESMTP", before, after);
    assert_eq!(
        q.content(),
        b"Subject: chunked\r\n\r\n.not stuffed in BDAT\r\nbare\r\nLF made CRLF\r\n.\r\nend\r\n"
    );
}

/// swaks cannot add BODY=8BITMIME: the raw client sends an 8-bit body with
/// it, and the parameter is kept in the envelope.
#[test]
fn eight_bit_body_with_body_8bitmime_raw_client() {
    let server = Server::start(&[]);
    let msg: &[u8] = b"Subject: 8bit\r\n\r\nGr\xc3\xbc\xc3\x9fe caf\xe9 \x80\xff\r\n..dot\r\n";
    let mut client = server.connect();
    client.hello("client.example");
    let before = SystemTime::now();
    client.expect("MAIL FROM:<sender@example.org> BODY=8BITMIME", 250);
    client.expect("RCPT TO:<user@localhost>", 250);
    client.expect("DATA", 354);
    client.send(&common::dot_stuff(msg));
    let id = queued_id(&client.reply());
    let after = SystemTime::now();
    let q = server.message(&id);
    assert!(q.has_line("param BODY=8BITMIME"), "{:?}", q.lines);
    assert_received(&q, "client.example", "ESMTP", before, after);
    assert_eq!(q.content(), msg);
}
