//! The outbound client's side of a hostile next hop: `ReplyParser` on
//! arbitrary server output, fed in pieces as the relay's connection feeds
//! it, and the `Client` state machine driven by whatever replies come out,
//! sending one message whose content is also fuzzer-chosen.
//!
//! Input layout: `[flags, n, gap_1 .. gap_n, len_lo, len_hi, payload ..]`.
//! The `n & 15` gaps are the lengths of the first reads of server output;
//! `len` (mod the payload length + 1) octets of the payload are the
//! message content, the rest is what the server says. `flags` bit 0 picks
//! STARTTLS off or opportunistic, bit 1 a null sender, bit 2 SMTPUTF8.
//!
//! Checked, whole, at the chosen reads and byte by byte:
//! * no panic; the same replies and the same error (or none), whatever
//!   the split;
//! * what the parser holds back is below `MAX_REPLY_LINE`: a peer cannot
//!   make it buffer more;
//! * every reply has a code 200..=599, at most `MAX_REPLY_LINES` lines,
//!   each printable ASCII of at most `MAX_KEPT_TEXT` octets, and
//!   `Reply::text` is printable ASCII too;
//! * everything the client sends has CRLF line ends only, no line over
//!   1000 octets with its CRLF, and the same bytes whatever the split.

#![no_main]

use libfuzzer_sys::fuzz_target;
use ringmta::relay::client::{
    Client, Job, JobRcpt, Reply, ReplyError, ReplyParser, StartTls, MAX_KEPT_TEXT, MAX_REPLY_LINE,
    MAX_REPLY_LINES,
};

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let Some((&n, rest)) = rest.split_first() else {
        return;
    };
    let n = usize::from(n & 15).min(rest.len());
    let (gaps, rest) = rest.split_at(n);
    let Some((len, payload)) = rest.split_first_chunk::<2>() else {
        return;
    };
    let len = usize::from(u16::from_le_bytes(*len)) % (payload.len() + 1);
    let (content, server) = payload.split_at(len);

    let mut cuts = Vec::with_capacity(gaps.len());
    let mut at = 0;
    for &g in gaps {
        at = (at + usize::from(g)).min(server.len());
        cuts.push(at);
    }
    let whole = run(flags, content, server, &[]);
    assert_eq!(
        whole,
        run(flags, content, server, &cuts),
        "split at {cuts:?}"
    );
    if server.len() <= 2048 {
        let every: Vec<usize> = (1..server.len()).collect();
        assert_eq!(whole, run(flags, content, server, &every), "byte by byte");
    }
});

#[derive(Debug, PartialEq, Eq)]
struct Run {
    replies: Vec<Reply>,
    error: Option<ReplyError>,
    sent: Vec<u8>,
}

/// Feeds `server` in reads ending at `cuts`, as `Conn::step` does: the
/// parser sees what is buffered, the octets it used are dropped.
fn run(flags: u8, content: &[u8], server: &[u8], cuts: &[usize]) -> Run {
    let tls = if flags & 1 == 0 {
        StartTls::Off
    } else {
        StartTls::Opportunistic
    };
    let mut client = Client::new("relay.test").with_starttls(tls);
    let mut job = Some(Job {
        mail_from: (flags & 2 == 0).then(|| "sender@example.org".to_owned()),
        rcpts: vec![
            JobRcpt {
                addr: "a@example.net".into(),
                notify: Some("FAILURE".into()),
                orcpt: None,
            },
            JobRcpt {
                addr: "b@example.net".into(),
                notify: None,
                orcpt: Some("rfc822;b@example.net".into()),
            },
        ],
        body: content.to_vec(),
        smtputf8: flags & 4 != 0,
        ret: Some("HDRS".into()),
        envid: None,
    });
    let mut parser = ReplyParser::default();
    let mut buf: Vec<u8> = Vec::new();
    let mut out = Run {
        replies: Vec::new(),
        error: None,
        sent: Vec::new(),
    };
    let mut fed = 0;
    'reads: for &end in cuts.iter().chain(std::iter::once(&server.len())) {
        buf.extend_from_slice(&server[fed..end]);
        fed = end;
        loop {
            match parser.feed(&buf) {
                Err(e) => {
                    client.handle_close("malformed reply");
                    out.error = Some(e);
                    break 'reads;
                }
                Ok((used, reply)) => {
                    buf.drain(..used);
                    let Some(r) = reply else { break };
                    check_reply(&r);
                    out.replies.push(r.clone());
                    client.handle_reply(r);
                    if client.wants_tls() {
                        // No handshake here: as if it succeeded. (The
                        // driver drops what was buffered before it; here it
                        // is kept, so that the outcome does not depend on
                        // how the output was split into reads.)
                        client.handle_tls_done();
                    }
                    if client.is_idle() {
                        if let Some(j) = job.take() {
                            let _ = client.start(j);
                        }
                    }
                    let _ = client.poll_outcome();
                    while let Some(bytes) = client.poll_transmit() {
                        out.sent.extend_from_slice(&bytes);
                    }
                }
            }
        }
        assert!(buf.len() < MAX_REPLY_LINE, "held back {} octets", buf.len());
    }
    check_sent(&out.sent);
    out
}

fn check_reply(r: &Reply) {
    assert!((200..600).contains(&r.code));
    assert!(!r.lines.is_empty() && r.lines.len() <= MAX_REPLY_LINES);
    for line in &r.lines {
        assert!(line.len() <= MAX_KEPT_TEXT, "{} octets kept", line.len());
        assert!(line.bytes().all(|b| (0x20..0x7f).contains(&b)), "{line:?}");
    }
    assert!(r.text().bytes().all(|b| (0x20..0x7f).contains(&b)));
}

/// Only CRLF line ends, no line over 1000 octets with its CRLF.
fn check_sent(sent: &[u8]) {
    for (i, &b) in sent.iter().enumerate() {
        if b == b'\r' {
            assert_eq!(sent.get(i + 1), Some(&b'\n'), "bare CR sent at {i}");
        }
        if b == b'\n' {
            assert!(i > 0 && sent[i - 1] == b'\r', "bare LF sent at {i}");
        }
    }
    for line in sent.split(|&b| b == b'\n') {
        assert!(
            line.len() <= 999,
            "a line of {} octets sent",
            line.len() + 1
        );
    }
}
