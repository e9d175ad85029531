//! Message-content receivers: DATA (dot-terminated, dot-stuffed) and BDAT
//! (counted chunks, RFC 3030).
//!
//! `DataReceiver` owns the SMTP-smuggling defence: only `<CRLF>.<CRLF>` ends
//! DATA. A bare CR or LF anywhere in the content is never a line end; it is
//! noted and the message refused at the end, with exactly one reply. The end
//! marker is found with one `memmem::Finder` that only ever sees new bytes
//! plus the at most four held-back bytes that could begin the marker. Content
//! is unstuffed as it is copied out, once. `BdatReceiver` never looks at the
//! bytes it carries.

use std::sync::LazyLock;

use memchr::memmem::Finder;

/// RFC 5321 4.5.3.1.6: a text line is at most 1000 octets including CRLF.
pub const MAX_TEXT_LINE: usize = 1000;

static END_OF_DATA: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\r\n.\r\n"));

/// Result of feeding bytes to a receiver. Incomplete input is not an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// All of `consumed` was taken; more input is needed to finish.
    NeedMore { consumed: usize },
    /// The content ended; `consumed` bytes (terminator included) were taken.
    Done { consumed: usize },
}

/// What to do with a CR or LF that is not part of a CRLF pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BareNewline {
    /// Store it as CRLF (a line end for unstuffing and line length), as
    /// Postfix's `smtpd_forbid_bare_newline = normalize` does. It still never
    /// ends DATA, and stored content only ever holds CRLF pairs, so nothing
    /// ambiguous is relayed onward.
    #[default]
    Normalize,
    /// Refuse the message after its end with one 550 5.6.0 reply.
    Reject,
}

/// What the content looked like once it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    /// More octets than the size limit; nothing was kept past it.
    TooBig,
    /// A CR not followed by LF, or an LF not preceded by CR (under
    /// [`BareNewline::Reject`]).
    BareNewline,
    /// A line longer than [`MAX_TEXT_LINE`] octets.
    LineTooLong,
}

/// Receives DATA content up to `<CRLF>.<CRLF>`.
#[derive(Debug, Clone)]
pub struct DataReceiver {
    policy: BareNewline,
    /// The next byte begins a line (the previous bytes ended a line).
    line_start: bool,
    /// The previous bytes ended with a real CRLF: only then can `.\r\n`
    /// be the end of the content.
    after_crlf: bool,
    /// Octets of the current, unfinished line.
    line_len: usize,
    /// A bare CR or LF was seen.
    bare: bool,
    long_line: bool,
    /// Octets of unstuffed content so far, kept or not.
    size: u64,
    max_size: u64,
}

impl DataReceiver {
    /// A receiver positioned just after the CRLF of the `DATA` command.
    pub fn new(max_size: u64, policy: BareNewline) -> Self {
        Self {
            policy,
            line_start: true,
            after_crlf: true,
            line_len: 0,
            bare: false,
            long_line: false,
            size: 0,
            max_size,
        }
    }

    /// Feeds newly arrived bytes; unstuffed content is appended to `body`
    /// until it would exceed the size limit. Bytes that might begin the end
    /// marker are not consumed: present them again with the next input.
    pub fn handle(&mut self, input: &[u8], body: &mut Vec<u8>) -> Progress {
        if self.after_crlf {
            if input.starts_with(b".\r\n") {
                return Progress::Done { consumed: 3 };
            }
            if b".\r".starts_with(input) {
                // "" or "." or ".\r": could still become the terminator.
                return Progress::NeedMore { consumed: 0 };
            }
        }
        if let Some(p) = END_OF_DATA.find(input) {
            // The CRLF before the dot ends the last line of content.
            self.feed(&input[..p + 2], body);
            return Progress::Done { consumed: p + 5 };
        }
        // A segment fed here never ends in a lone CR: that is held back.
        let keep = input.len() - held_back(input);
        self.feed(&input[..keep], body);
        Progress::NeedMore { consumed: keep }
    }

    /// Octets of content received (after unstuffing).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Judges the content once [`Progress::Done`] was returned.
    pub fn verdict(&self) -> Verdict {
        if self.size > self.max_size {
            Verdict::TooBig
        } else if self.bare && self.policy == BareNewline::Reject {
            Verdict::BareNewline
        } else if self.long_line {
            Verdict::LineTooLong
        } else {
            Verdict::Ok
        }
    }

    /// Content between line boundaries the caller chose; never ends in a
    /// lone CR (see `held_back`), so a CRLF pair never straddles two calls.
    fn feed(&mut self, seg: &[u8], body: &mut Vec<u8>) {
        if seg.is_empty() {
            return;
        }
        if self.policy == BareNewline::Normalize {
            // Optimistic: clean CRLF text takes the fast path; on the rare
            // bare CR/LF, undo and take the normalising path instead.
            let saved = (self.clone(), body.len());
            if !self.feed_fast(seg, body) {
                *self = saved.0;
                body.truncate(saved.1);
                self.feed_normalizing(seg, body);
            }
        } else if !self.feed_fast(seg, body) {
            self.bare = true;
        }
        self.after_crlf = seg.ends_with(b"\r\n");
    }

    /// Per line: check its CRLF, its length and a leading dot. Returns
    /// `false` if the segment holds a bare CR or LF (the content was still
    /// taken, with the bare bytes as they were).
    fn feed_fast(&mut self, seg: &[u8], body: &mut Vec<u8>) -> bool {
        // The stuffing dot is dropped and, per RFC 5321 4.5.3.1.6, not
        // counted in the line length: a stuffed line "begins" after it.
        let mut copy_from = 0;
        if self.line_start && seg[0] == b'.' {
            copy_from = 1;
        }
        let crs = memchr::memchr_iter(b'\r', seg).count();
        let mut lfs = 0;
        let mut clean = true;
        let mut line_begin = copy_from;
        for j in memchr::memchr_iter(b'\n', seg) {
            lfs += 1;
            clean &= j > 0 && seg[j - 1] == b'\r';
            self.end_line(j + 1 - line_begin);
            line_begin = j + 1;
            if seg.get(j + 1) == Some(&b'.') {
                // A dot-stuffed line (RFC 5321 4.5.2): drop the first dot.
                self.emit(&seg[copy_from..j + 1], body);
                copy_from = j + 2;
                line_begin = j + 2;
            }
        }
        // Every LF followed a CR, so more CRs than LFs means a lone CR.
        clean &= crs == lfs;
        self.line_len += seg.len() - line_begin;
        self.long_line |= self.line_len > MAX_TEXT_LINE;
        if copy_from < seg.len() {
            self.emit(&seg[copy_from..], body);
        }
        self.line_start = seg.last() == Some(&b'\n');
        clean
    }

    /// Byte-exact slow path: every CR, LF or CRLF ends a line and is stored
    /// as CRLF.
    fn feed_normalizing(&mut self, seg: &[u8], body: &mut Vec<u8>) {
        let mut i = 0;
        while i < seg.len() {
            if self.line_start && seg[i] == b'.' {
                // Dropped, and not counted in the line length.
                i += 1;
            }
            self.line_start = false;
            let Some(off) = memchr::memchr2(b'\r', b'\n', &seg[i..]) else {
                self.emit(&seg[i..], body);
                self.line_len += seg.len() - i;
                self.long_line |= self.line_len > MAX_TEXT_LINE;
                return;
            };
            let at = i + off;
            self.emit(&seg[i..at], body);
            self.emit(b"\r\n", body);
            let crlf = seg[at] == b'\r' && seg.get(at + 1) == Some(&b'\n');
            self.bare |= !crlf;
            let eol = if crlf { 2 } else { 1 };
            self.end_line(at - i + eol);
            i = at + eol;
            self.line_start = true;
        }
    }

    fn end_line(&mut self, octets_in_this_call: usize) {
        self.long_line |= self.line_len + octets_in_this_call > MAX_TEXT_LINE;
        self.line_len = 0;
    }

    fn emit(&mut self, bytes: &[u8], body: &mut Vec<u8>) {
        let was_over = self.size > self.max_size;
        self.size += bytes.len() as u64;
        if self.size > self.max_size {
            if !was_over {
                // Past the limit nothing is kept: memory stays bounded.
                *body = Vec::new();
            }
            return;
        }
        body.extend_from_slice(bytes);
    }
}

/// Length of the longest suffix of `input` that is a proper prefix of
/// `\r\n.\r\n` (so the marker may still complete with the next bytes).
fn held_back(input: &[u8]) -> usize {
    const MARKER: &[u8] = b"\r\n.\r\n";
    (1..MARKER.len())
        .rev()
        .find(|&n| input.len() >= n && input.ends_with(&MARKER[..n]))
        .unwrap_or(0)
}

/// Receives one BDAT chunk of a known size; never scans it.
#[derive(Debug)]
pub struct BdatReceiver {
    remaining: u64,
}

impl BdatReceiver {
    pub fn new(size: u64) -> Self {
        Self { remaining: size }
    }

    /// Takes up to the rest of the chunk from `input`, appending it to `sink`
    /// when given (a chunk being discarded passes `None`).
    pub fn handle(&mut self, input: &[u8], sink: Option<&mut Vec<u8>>) -> Progress {
        let n = input
            .len()
            .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        if let Some(sink) = sink {
            sink.extend_from_slice(&input[..n]);
        }
        self.remaining -= n as u64;
        if self.remaining == 0 {
            Progress::Done { consumed: n }
        } else {
            Progress::NeedMore { consumed: n }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Feeds `input` in pieces split at `cuts`, as a connection would: bytes
    /// not consumed are presented again with the next piece.
    fn receive_split(input: &[u8], cuts: &[usize], max: u64) -> (Vec<u8>, Verdict, usize) {
        receive_split_with(input, cuts, max, BareNewline::Reject)
    }

    fn receive_split_with(
        input: &[u8],
        cuts: &[usize],
        max: u64,
        policy: BareNewline,
    ) -> (Vec<u8>, Verdict, usize) {
        let mut rx = DataReceiver::new(max, policy);
        let mut body = Vec::new();
        let mut pending: Vec<u8> = Vec::new();
        let mut fed = 0;
        let mut bounds: Vec<usize> = cuts.to_vec();
        bounds.push(input.len());
        for &end in &bounds {
            pending.extend_from_slice(&input[fed..end]);
            fed = end;
            match rx.handle(&pending, &mut body) {
                Progress::Done { consumed } => {
                    let total = fed - (pending.len() - consumed);
                    return (body, rx.verdict(), total);
                }
                Progress::NeedMore { consumed } => {
                    pending.drain(..consumed);
                }
            }
        }
        panic!("no end of data in {:?}", String::from_utf8_lossy(input));
    }

    fn receive_every_split(input: &[u8]) -> (Vec<u8>, Verdict, usize) {
        receive_every_split_with(input, BareNewline::Reject)
    }

    fn receive_every_split_with(input: &[u8], policy: BareNewline) -> (Vec<u8>, Verdict, usize) {
        let whole = receive_split_with(input, &[], 1 << 20, policy);
        for cut in 1..input.len() {
            assert_eq!(
                receive_split_with(input, &[cut], 1 << 20, policy),
                whole,
                "split at {cut}"
            );
            for cut2 in (cut + 1..input.len()).step_by(7) {
                assert_eq!(
                    receive_split_with(input, &[cut, cut2], 1 << 20, policy),
                    whole,
                    "split at {cut} and {cut2}"
                );
            }
        }
        // And byte by byte.
        let all: Vec<usize> = (1..input.len()).collect();
        assert_eq!(
            receive_split_with(input, &all, 1 << 20, policy),
            whole,
            "byte by byte"
        );
        whole
    }

    #[test]
    fn plain_message() {
        let (body, v, n) = receive_every_split(b"Subject: x\r\n\r\nhello\r\n.\r\nQUIT\r\n");
        assert_eq!(body, b"Subject: x\r\n\r\nhello\r\n");
        assert_eq!(v, Verdict::Ok);
        assert_eq!(n, 24);
    }

    #[test]
    fn empty_message() {
        let (body, v, n) = receive_every_split(b".\r\nNOOP\r\n");
        assert!(body.is_empty());
        assert_eq!((v, n), (Verdict::Ok, 3));
    }

    #[test]
    fn dot_unstuffing() {
        let (body, v, _) = receive_every_split(b"..leading\r\na\r\n...two\r\n..\r\n.\r\n");
        assert_eq!(body, b".leading\r\na\r\n..two\r\n.\r\n");
        assert_eq!(v, Verdict::Ok);
    }

    pub(crate) const SMUGGLING: [&[u8]; 6] = [
        b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\r.\r\n", b"\r\n.\r",
    ];

    fn smuggling_input(seq: &[u8]) -> Vec<u8> {
        let mut input = b"Subject: a\r\n\r\nfirst".to_vec();
        input.extend_from_slice(seq);
        input.extend_from_slice(
            b"MAIL FROM:<evil@example.org>\r\nRCPT TO:<v@localhost>\r\nDATA\r\nsmuggled\r\n.\r\n",
        );
        input
    }

    /// The smuggling table: none of these sequences ends DATA; the second
    /// transaction is content of the first, which is refused...
    #[test]
    fn smuggling_sequences_rejected() {
        for seq in SMUGGLING {
            let input = smuggling_input(seq);
            let (body, v, n) = receive_every_split(&input);
            assert_eq!(n, input.len(), "{seq:?} ended DATA early");
            assert_eq!(v, Verdict::BareNewline, "{seq:?}");
            assert!(body.ends_with(b"smuggled\r\n"));
        }
    }

    /// ...or kept as content with every line ending made CRLF.
    #[test]
    fn smuggling_sequences_normalized() {
        for seq in SMUGGLING {
            let input = smuggling_input(seq);
            let (body, v, n) = receive_every_split_with(&input, BareNewline::Normalize);
            assert_eq!(n, input.len(), "{seq:?} ended DATA early");
            assert_eq!(v, Verdict::Ok, "{seq:?}");
            assert!(body.ends_with(b"\r\nMAIL FROM:<evil@example.org>\r\nRCPT TO:<v@localhost>\r\nDATA\r\nsmuggled\r\n"), "{seq:?}: {:?}", String::from_utf8_lossy(&body));
            // Only CRLF pairs are stored.
            let crs = body.iter().filter(|&&b| b == b'\r').count();
            let lfs = body.iter().filter(|&&b| b == b'\n').count();
            assert_eq!(crs, lfs);
        }
    }

    #[test]
    fn normalize_keeps_clean_text_identical() {
        let input = b"a\r\n..b\r\nc\r\n.\r\n";
        let strict = receive_every_split(input);
        let norm = receive_every_split_with(input, BareNewline::Normalize);
        assert_eq!(strict, norm);
        let (body, _, _) = receive_every_split_with(b"x\ny\r\n.\r\n", BareNewline::Normalize);
        assert_eq!(body, b"x\r\ny\r\n");
    }

    #[test]
    fn long_line_is_flagged_not_split() {
        let mut input = vec![b'x'; 1001];
        input.extend_from_slice(b"\r\n.\r\n");
        let (body, v, _) = receive_split(&input, &[500], 1 << 20);
        assert_eq!(v, Verdict::LineTooLong);
        assert_eq!(body.len(), 1003);
        let mut ok = vec![b'x'; 998];
        ok.extend_from_slice(b"\r\n.\r\n");
        assert_eq!(receive_split(&ok, &[10], 1 << 20).1, Verdict::Ok);
    }

    /// Regression: the stuffing dot does not count towards the 1000 octets
    /// (RFC 5321 4.5.3.1.6), whether the line starts the content or not,
    /// on the fast and on the normalising path.
    #[test]
    fn stuffing_dot_not_counted_in_line_length() {
        for prefix in [&b""[..], b"a\r\n", b"a\n"] {
            let mut input = prefix.to_vec();
            input.extend_from_slice(b"..");
            input.extend(std::iter::repeat_n(b'x', 997));
            input.extend_from_slice(b"\r\n.\r\n");
            for policy in [BareNewline::Normalize, BareNewline::Reject] {
                let (body, v, _) = receive_every_split_with(&input, policy);
                if prefix == b"a\n" && policy == BareNewline::Reject {
                    assert_eq!(v, Verdict::BareNewline);
                    continue;
                }
                assert_eq!(v, Verdict::Ok, "{prefix:?} {policy:?}");
                assert!(body.ends_with(&[&b"."[..], &[b'x'; 997], b"\r\n"].concat()));
            }
            let mut over = prefix.to_vec();
            over.extend_from_slice(b"..");
            over.extend(std::iter::repeat_n(b'x', 998));
            over.extend_from_slice(b"\r\n.\r\n");
            assert_eq!(
                receive_split_with(&over, &[], 1 << 20, BareNewline::Normalize).1,
                Verdict::LineTooLong
            );
        }
    }

    #[test]
    fn oversize_keeps_nothing() {
        let mut input = b"0123456789\r\n".repeat(10);
        input.extend_from_slice(b".\r\n");
        let (body, v, n) = receive_split(&input, &[7, 50], 50);
        assert_eq!(v, Verdict::TooBig);
        assert!(body.is_empty());
        assert_eq!(n, input.len());
    }

    #[test]
    fn bdat_counts_exactly() {
        let mut rx = BdatReceiver::new(5);
        let mut sink = Vec::new();
        assert_eq!(
            rx.handle(b"ab", Some(&mut sink)),
            Progress::NeedMore { consumed: 2 }
        );
        assert_eq!(
            rx.handle(b"c\r\n.\r\nX", Some(&mut sink)),
            Progress::Done { consumed: 3 }
        );
        assert_eq!(sink, b"abc\r\n");
    }
}
