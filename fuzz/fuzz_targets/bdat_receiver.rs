//! `BdatReceiver` on arbitrary content, cut into BDAT chunks and each chunk
//! read in pieces, as a session feeds it, with the line-end state carried
//! from chunk to chunk.
//!
//! Input layout: `[flags, n, gap_1 .. gap_n, payload ..]`. `flags` bit 0
//! picks the bare-newline policy, bit 1 whether the gaps cut chunks or
//! reads, bit 2 whether the body is limited (a size limit of
//! `(flags >> 3) * 67` octets and an allowance of `(n >> 4) * 41`, as the
//! session sets them); the `n & 15` gaps are the lengths of the first
//! pieces.
//!
//! Checked, for one whole chunk, for the chosen cuts and byte by byte:
//! * the same (body, verdict) whatever the chunks and reads;
//! * every chunk takes exactly its octet count, never an octet more;
//! * under `Normalize` the body is the content with every CRLF, bare CR
//!   and bare LF made one CRLF (so it holds CRLF pairs only), and the
//!   verdict is `Ok`; under `Reject` the body is the content as sent, and
//!   the verdict is `BareNewline` exactly when a CR is not followed by LF
//!   or an LF not preceded by CR;
//! * limited, under `Normalize` (which may store more than a chunk's
//!   announced size: the session reserves only that), the first chunk
//!   after which the stored length passes the allowance or the size limit
//!   ends the message: `Size` when it is past the size limit, else
//!   `Budget`, and the body is released (empty). The body's capacity never
//!   passes the allowance.

#![no_main]

use libfuzzer_sys::fuzz_target;
use ringmta::smtp::data::{BareNewline, BdatLines, BdatReceiver, Overflow, Progress, Verdict};

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let Some((&n, rest)) = rest.split_first() else {
        return;
    };
    let policy = if flags & 1 == 0 {
        BareNewline::Reject
    } else {
        BareNewline::Normalize
    };
    let limits = (flags & 4 != 0).then(|| (u64::from(flags >> 3) * 67, usize::from(n >> 4) * 41));
    let n = usize::from(n & 15).min(rest.len());
    let (gaps, payload) = rest.split_at(n);
    let mut cuts = Vec::with_capacity(gaps.len());
    let mut at = 0;
    for &g in gaps {
        at = (at + usize::from(g)).min(payload.len());
        cuts.push(at);
    }
    let whole = receive(payload, &[], &[], policy, limits);
    assert_eq!(whole, model(payload, &[], policy, limits));
    let got = if flags & 2 == 0 {
        let got = receive(payload, &cuts, &[], policy, limits);
        assert_eq!(
            got,
            model(payload, &cuts, policy, limits),
            "chunks at {cuts:?}"
        );
        got
    } else {
        let got = receive(payload, &[], &cuts, policy, limits);
        assert_eq!(got, whole, "reads cut at {cuts:?}");
        got
    };
    if limits.is_none() {
        assert_eq!(got, whole, "cut at {cuts:?}");
    }
    if payload.len() <= 1024 {
        let every: Vec<usize> = (1..payload.len()).collect();
        assert_eq!(
            receive(payload, &every, &[], policy, limits),
            model(payload, &every, policy, limits),
            "chunk per octet"
        );
        assert_eq!(
            whole,
            receive(payload, &[], &every, policy, limits),
            "read per octet"
        );
    }
});

type Outcome = (Vec<u8>, Verdict, Option<Overflow>);

/// Chunks end at `chunk_cuts` (then at the end); reads end at `read_cuts`
/// (and at chunk ends). The read that ends a chunk also holds what follows
/// it (the next command), which the receiver must not take. Limited, the
/// message ends at the first chunk that overflows (the session refuses it
/// and ends the transaction).
fn receive(
    payload: &[u8],
    chunk_cuts: &[usize],
    read_cuts: &[usize],
    policy: BareNewline,
    limits: Option<(u64, usize)>,
) -> Outcome {
    let mut lines = BdatLines::default();
    let mut body = Vec::new();
    let mut from = 0;
    for &end in chunk_cuts.iter().chain(std::iter::once(&payload.len())) {
        let mut rx = BdatReceiver::with_lines((end - from) as u64, policy, lines);
        if let Some((max, allowance)) = limits {
            rx = rx.limited(max, allowance);
        }
        let mut pos = from;
        let reads = read_cuts.iter().copied().filter(|&c| c > from && c < end);
        for stop in reads.chain(std::iter::once(end)) {
            if stop == pos && stop < end {
                continue;
            }
            let mut input = payload[pos..stop].to_vec();
            if stop == end {
                // What follows the chunk in the stream.
                input.extend_from_slice(b"BDAT 1 LAST\r\n");
            }
            match rx.handle(&input, Some(&mut body)) {
                Progress::NeedMore { consumed } => {
                    assert_eq!(consumed, stop - pos);
                    assert!(stop < end, "more wanted past the chunk");
                }
                Progress::Done { consumed } => {
                    assert_eq!(consumed, stop - pos, "took past the chunk");
                    assert_eq!(stop, end, "done before the chunk's end");
                }
            }
            if let Some((_, allowance)) = limits {
                assert!(body.capacity() <= allowance || policy == BareNewline::Reject);
            }
            pos = stop;
        }
        if end == from {
            // An empty chunk (BDAT 0): nothing to read.
            assert!(matches!(
                rx.handle(b"NOOP\r\n", Some(&mut body)),
                Progress::Done { consumed: 0 }
            ));
        }
        lines = rx.lines();
        if let Some(overflow) = rx.overflow() {
            assert!(body.is_empty(), "kept after {overflow:?}");
            return (body, lines.verdict(policy), Some(overflow));
        }
        from = end;
    }
    (body, lines.verdict(policy), None)
}

fn model(
    content: &[u8],
    chunk_cuts: &[usize],
    policy: BareNewline,
    limits: Option<(u64, usize)>,
) -> Outcome {
    let mut bare = false;
    let mut norm = Vec::with_capacity(content.len());
    // The stored length at each chunk's end: a CR that ends a chunk is
    // stored as CRLF before the next chunk is read (so a cut between a CR
    // and its LF, passed over with the pair, sees the pair stored).
    let mut stored_at = Vec::new();
    let mut ends = chunk_cuts.iter().copied().peekable();
    let mut i = 0;
    while i < content.len() {
        while ends.next_if(|&end| end <= i).is_some() {
            stored_at.push(norm.len());
        }
        match content[i] {
            b'\r' if content.get(i + 1) == Some(&b'\n') => {
                norm.extend_from_slice(b"\r\n");
                i += 2;
                continue;
            }
            b'\r' | b'\n' => {
                bare = true;
                norm.extend_from_slice(b"\r\n");
            }
            b => norm.push(b),
        }
        i += 1;
    }
    stored_at.push(norm.len());
    match policy {
        BareNewline::Normalize => {
            if let Some((max, allowance)) = limits {
                let over = stored_at
                    .iter()
                    .find(|&&len| len as u64 > max || len > allowance);
                if let Some(&len) = over {
                    let kind = if len as u64 > max {
                        Overflow::Size
                    } else {
                        Overflow::Budget
                    };
                    return (Vec::new(), Verdict::Ok, Some(kind));
                }
            }
            (norm, Verdict::Ok, None)
        }
        BareNewline::Reject if bare => (content.to_vec(), Verdict::BareNewline, None),
        BareNewline::Reject => (content.to_vec(), Verdict::Ok, None),
    }
}
