//! `DataReceiver` on arbitrary content, fed the way a connection feeds it:
//! in pieces, with the bytes it did not consume presented again in front of
//! the next piece.
//!
//! Input layout: `[flags, n, gap_1 .. gap_n, payload ..]`. `flags` bit 0
//! picks the bare-newline policy and bits 1..=3 the size limit; the `n & 15`
//! gaps are the lengths of the first pieces (the rest of the payload is the
//! last piece).
//!
//! Checked, for the whole payload, for the chosen pieces and byte by byte:
//! * the same (body, verdict, consumed, size) whatever the split;
//! * DATA ends exactly after the first `<CRLF>.<CRLF>` of the stream (the
//!   CRLF of the DATA command counts), never anywhere else — this is the
//!   SMTP-smuggling property;
//! * the body never exceeds the limit, and is empty once the limit was
//!   passed;
//! * body, size and verdict agree with a slow reference model of RFC 5321
//!   4.5.2 unstuffing (for rejected bare-newline content, only the verdict).

#![no_main]

use libfuzzer_sys::fuzz_target;
use ringmta::smtp::data::{BareNewline, DataReceiver, Progress, Verdict, MAX_TEXT_LINE};

const LIMITS: [u64; 8] = [0, 1, 8, 64, 512, 4096, 1 << 20, u64::MAX];

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let Some((&n, rest)) = rest.split_first() else {
        return;
    };
    let n = usize::from(n & 15).min(rest.len());
    let (gaps, payload) = rest.split_at(n);
    let policy = if flags & 1 == 0 {
        BareNewline::Reject
    } else {
        BareNewline::Normalize
    };
    let max = LIMITS[usize::from(flags >> 1) & 7];

    let mut cuts = Vec::with_capacity(gaps.len());
    let mut at = 0;
    for &g in gaps {
        at = (at + usize::from(g)).min(payload.len());
        cuts.push(at);
    }

    let whole = receive(payload, &[], max, policy);
    check_against_model(payload, &whole, max, policy);
    let split = receive(payload, &cuts, max, policy);
    assert_eq!(whole, split, "split at {cuts:?}");
    if payload.len() <= 4096 {
        let every: Vec<usize> = (1..payload.len()).collect();
        assert_eq!(whole, receive(payload, &every, max, policy), "byte by byte");
    }
});

#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    body: Vec<u8>,
    /// `Some` once the receiver said `Done`.
    verdict: Option<Verdict>,
    /// Bytes of the payload taken, the terminator included.
    consumed: usize,
    size: u64,
}

/// Feeds `payload` in pieces ending at `cuts` (then at its end).
fn receive(payload: &[u8], cuts: &[usize], max: u64, policy: BareNewline) -> Outcome {
    let mut rx = DataReceiver::new(max, policy);
    let mut body = Vec::new();
    let mut pending: Vec<u8> = Vec::new();
    let mut fed = 0;
    for &end in cuts.iter().chain(std::iter::once(&payload.len())) {
        pending.extend_from_slice(&payload[fed..end]);
        fed = end;
        let progress = rx.handle(&pending, &mut body);
        assert!(body.len() as u64 <= max, "body over the limit");
        assert!(body.len() as u64 <= rx.size());
        match progress {
            Progress::Done { consumed } => {
                assert!(consumed <= pending.len());
                return Outcome {
                    body,
                    verdict: Some(rx.verdict()),
                    consumed: fed - (pending.len() - consumed),
                    size: rx.size(),
                };
            }
            Progress::NeedMore { consumed } => {
                assert!(consumed <= pending.len());
                pending.drain(..consumed);
                // Only a possible start of the terminator is held back.
                assert!(pending.len() <= 4, "held back {pending:?}");
            }
        }
    }
    Outcome {
        body,
        verdict: None,
        consumed: fed - pending.len(),
        size: rx.size(),
    }
}

fn check_against_model(payload: &[u8], got: &Outcome, max: u64, policy: BareNewline) {
    // The DATA command's own CRLF precedes the payload.
    let mut stream = b"\r\n".to_vec();
    stream.extend_from_slice(payload);
    let Some(p) = memchr::memmem::find(&stream, b"\r\n.\r\n") else {
        assert_eq!(got.verdict, None, "DATA ended without <CRLF>.<CRLF>");
        return;
    };
    // `stream[p..p + 5]` is the marker; in payload offsets it ends at p + 3.
    let Some(verdict) = got.verdict else {
        panic!("no end of DATA although the payload holds <CRLF>.<CRLF>");
    };
    assert_eq!(got.consumed, p + 3, "DATA ended at the wrong place");
    let content = &payload[..p];

    let model = Model::of(content, policy);
    let want = if model.body.len() as u64 > max {
        Verdict::TooBig
    } else if model.bare && policy == BareNewline::Reject {
        Verdict::BareNewline
    } else if model.long {
        Verdict::LineTooLong
    } else {
        Verdict::Ok
    };
    if model.bare && policy == BareNewline::Reject {
        // Refused content: its exact unstuffing is not specified.
        assert!(
            matches!(verdict, Verdict::TooBig | Verdict::BareNewline),
            "{verdict:?}"
        );
        return;
    }
    assert_eq!(got.size, model.body.len() as u64, "size");
    assert_eq!(verdict, want);
    if verdict == Verdict::TooBig {
        assert!(got.body.is_empty(), "kept content past the limit");
    } else {
        assert_eq!(got.body, model.body, "body");
    }
}

/// RFC 5321 4.5.2, slowly: split the content into lines, drop one leading
/// dot per line. Under `Normalize` a bare CR or LF ends a line too and every
/// line end is stored as CRLF.
struct Model {
    body: Vec<u8>,
    bare: bool,
    long: bool,
}

impl Model {
    fn of(content: &[u8], policy: BareNewline) -> Self {
        let mut m = Model {
            body: Vec::new(),
            bare: false,
            long: false,
        };
        let mut i = 0;
        while i < content.len() {
            let text_end = content[i..]
                .iter()
                .position(|&b| b == b'\r' || b == b'\n')
                .map_or(content.len(), |o| i + o);
            let crlf = content[text_end..].starts_with(b"\r\n");
            let term_len = if text_end == content.len() {
                0
            } else if crlf {
                2
            } else {
                1
            };
            m.bare |= term_len == 1;
            let text = &content[i..text_end];
            let stored = text.strip_prefix(b".").unwrap_or(text);
            // A line is measured as stored: without its stuffing dot, and
            // with CRLF as its end (a bare CR or LF becomes one).
            let eol = if term_len == 0 { 0 } else { 2 };
            m.long |= stored.len() + eol > MAX_TEXT_LINE;
            m.body.extend_from_slice(stored);
            let term = &content[text_end..text_end + term_len];
            if policy == BareNewline::Normalize && term_len > 0 {
                m.body.extend_from_slice(b"\r\n");
            } else {
                m.body.extend_from_slice(term);
            }
            i = text_end + term_len;
        }
        m
    }
}
