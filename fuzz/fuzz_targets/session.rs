//! A whole `Session` driven by arbitrary client bytes, as the connection
//! task drives it: unconsumed input is presented again with the next read,
//! every event is answered before input continues — `Message` committed
//! (with a fake queue id, every third one failed), `StartTls` completed (the
//! bytes after the STARTTLS line then stand for the decrypted stream),
//! `Auth` judged by a fixed rule. This also covers `BdatReceiver` and the
//! AUTH exchange, which only the session reaches with peer-chosen input.
//!
//! Input layout: `[flags, n, gap_1 .. gap_n, client bytes ..]`. `flags`
//! picks the bare-newline policy, a small or large size limit, few or many
//! recipients and errors, relay or submission mode, STARTTLS offered, a
//! loopback peer allowed plaintext AUTH, implicit TLS; the `n & 15` gaps are
//! the lengths of the first reads.
//!
//! Checked:
//! * no panic;
//! * the output is well-formed SMTP: lines `DDD[ -]text<CRLF>`, codes 2xx to
//!   5xx, a multi-line reply keeps its code, a 220 greeting first, nothing
//!   after a closing 221/421;
//! * the same output and the same messages whether the bytes arrive at once,
//!   in the chosen reads, or one byte at a time;
//! * a handed-out message has recipients and fits the size limit.

#![no_main]

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use ringmta::smtp::auth::{AuthResult, Authenticated, Credentials, SendAs};
use ringmta::smtp::data::BareNewline;
use ringmta::smtp::{CommitResult, ConnInfo, Event, Mode, Session, SessionConfig, TlsInfo};

const TLS: TlsInfo = TlsInfo {
    version: "TLS1.3",
    cipher: "TLS_AES_128_GCM_SHA256",
};

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let Some((&n, rest)) = rest.split_first() else {
        return;
    };
    // The high bits of `n`: the body's allowance from the shard's budget
    // (0: unbounded), small enough to hit the discard path.
    let room = usize::from(n >> 4);
    let n = usize::from(n & 15).min(rest.len());
    let (gaps, input) = rest.split_at(n);

    let cfg = Arc::new(SessionConfig {
        bare_newline: if flags & 1 == 0 {
            BareNewline::Reject
        } else {
            BareNewline::Normalize
        },
        max_message_size: if flags & 2 == 0 { 1 << 20 } else { 100 },
        max_recipients: if flags & 4 == 0 { 1000 } else { 2 },
        max_errors: if flags & 8 == 0 { 20 } else { 3 },
        local_domains: vec!["localhost".into(), "example.org".into()],
        mode: if flags & 16 == 0 {
            Mode::Relay
        } else {
            Mode::Submission
        },
        starttls: flags & 32 != 0,
        plaintext_auth_on_loopback: flags & 64 != 0,
        min_data_room: if room == 0 { 1 << 16 } else { 16 },
        ..SessionConfig::default()
    });
    let setup = Setup {
        cfg,
        allowance: if room == 0 { usize::MAX } else { room * 40 },
        loopback: flags & 64 != 0,
        implicit_tls: flags & 128 != 0,
    };

    let mut cuts = Vec::with_capacity(gaps.len());
    let mut at = 0;
    for &g in gaps {
        at = (at + usize::from(g)).min(input.len());
        cuts.push(at);
    }

    let whole = run(&setup, input, &[]);
    check_replies(&whole.output);
    let split = run(&setup, input, &cuts);
    assert_eq!(whole, split, "split at {cuts:?}");
    if input.len() <= 2048 {
        let every: Vec<usize> = (1..input.len()).collect();
        assert_eq!(whole, run(&setup, input, &every), "byte by byte");
    }
});

struct Setup {
    cfg: Arc<SessionConfig>,
    /// What the driver allows the body to hold.
    allowance: usize,
    loopback: bool,
    implicit_tls: bool,
}

#[derive(PartialEq, Eq)]
struct Transcript {
    output: Vec<u8>,
    /// `Debug` of each event handed out (a message: envelope and body).
    events: Vec<String>,
    consumed: usize,
    closed: bool,
}

impl std::fmt::Debug for Transcript {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transcript")
            .field("output", &String::from_utf8_lossy(&self.output))
            .field("events", &self.events)
            .field("consumed", &self.consumed)
            .field("closed", &self.closed)
            .finish()
    }
}

fn run(setup: &Setup, input: &[u8], cuts: &[usize]) -> Transcript {
    let cfg = &setup.cfg;
    let now = Instant::now();
    let ip = if setup.loopback {
        Ipv4Addr::LOCALHOST
    } else {
        Ipv4Addr::new(192, 0, 2, 1)
    };
    let conn = ConnInfo {
        peer: SocketAddr::from((ip, 2525)),
        tls: false,
    };
    let mut s = Session::new(cfg.clone(), conn, now);
    if setup.implicit_tls {
        s = s.with_tls(TLS);
    }
    let mut t = Transcript {
        output: Vec::new(),
        events: Vec::new(),
        consumed: 0,
        closed: false,
    };
    let mut messages = 0;
    let mut pending: Vec<u8> = Vec::new();
    let mut fed = 0;
    'reads: for &end in cuts.iter().chain(std::iter::once(&input.len())) {
        pending.extend_from_slice(&input[fed..end]);
        fed = end;
        loop {
            s.handle_allowance(setup.allowance);
            let n = s.handle_input(&pending, now);
            assert!(n <= pending.len());
            assert!(
                s.content_bytes() <= setup.allowance,
                "body past its allowance"
            );
            pending.drain(..n);
            t.consumed += n;
            let mut answered = false;
            while let Some(event) = s.poll_event() {
                answered = true;
                match event {
                    Event::Message(m) => {
                        assert!(!m.envelope.rcpts.is_empty(), "message without recipients");
                        assert!(m.envelope.rcpts.len() <= cfg.max_recipients);
                        assert!(m.body.len() as u64 <= cfg.max_message_size);
                        assert!(m.body.capacity() <= setup.allowance);
                        t.events.push(format!("{m:?}"));
                        messages += 1;
                        let result = if messages % 3 == 0 {
                            CommitResult::Failed
                        } else {
                            CommitResult::Stored(format!("Q{messages}"))
                        };
                        s.handle_commit(result, now);
                    }
                    Event::StartTls => {
                        t.events.push("STARTTLS".into());
                        // The 220 must reach the client before the handshake.
                        assert!(s.output().ends_with(b"\r\n"));
                        s.handle_tls(TLS, now);
                    }
                    Event::Auth(creds) => {
                        t.events.push(format!("{creds:?}"));
                        s.handle_auth(verdict(&creds), now);
                    }
                }
            }
            t.output.extend_from_slice(s.output());
            s.clear_output();
            if s.is_closed() {
                t.closed = true;
                break 'reads;
            }
            if n == 0 && !answered {
                break;
            }
        }
    }
    t
}

/// The fake password check: `user`/`pass` may send as anyone at
/// example.org; `temp` fails temporarily, `lock` too often.
fn verdict(c: &Credentials) -> AuthResult {
    match (c.username.as_str(), c.password.as_str()) {
        ("user", "pass") => AuthResult::Success(Authenticated {
            login: "user".into(),
            send_as: vec![
                SendAs::Domain("example.org".into()),
                SendAs::Address("user@localhost".into()),
            ],
        }),
        ("temp", _) => AuthResult::TempFail,
        ("lock", _) => AuthResult::TooManyFailures,
        _ => AuthResult::Failed,
    }
}

/// Every line is `DDD SP text CRLF` or `DDD - text CRLF`; the lines of a
/// multi-line reply share their code; the first reply is the 220 greeting and
/// a closing reply is the last.
fn check_replies(out: &[u8]) {
    assert!(out.starts_with(b"220 "), "no greeting");
    let mut open_code: Option<&[u8]> = None;
    let mut rest = out;
    while !rest.is_empty() {
        let end = memchr::memmem::find(rest, b"\r\n").expect("reply line without CRLF");
        let line = &rest[..end];
        rest = &rest[end + 2..];
        assert!(line.len() >= 4, "short reply line {line:?}");
        let code = &line[..3];
        assert!(
            matches!(code[0], b'2'..=b'5') && code[1..].iter().all(u8::is_ascii_digit),
            "bad code in {:?}",
            String::from_utf8_lossy(line)
        );
        assert!(
            matches!(line[3], b' ' | b'-'),
            "{:?}",
            String::from_utf8_lossy(line)
        );
        assert!(
            !line.iter().any(|&b| b == b'\r' || b == b'\n'),
            "CR or LF inside a reply line"
        );
        if let Some(open) = open_code {
            assert_eq!(open, code, "multi-line reply changed its code");
        }
        open_code = (line[3] == b'-').then_some(code);
        if rest.is_empty() {
            assert!(open_code.is_none(), "multi-line reply not finished");
        }
        let closing = code == b"221" || line.starts_with(b"421 4.");
        assert!(!closing || rest.is_empty(), "output after a closing reply");
    }
}
