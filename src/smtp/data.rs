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

/// What the content looked like once it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    /// More octets than the size limit; nothing was kept past it.
    TooBig,
    /// A CR not followed by LF, or an LF not preceded by CR.
    BareNewline,
    /// A line longer than [`MAX_TEXT_LINE`] octets.
    LineTooLong,
}

/// Receives DATA content up to `<CRLF>.<CRLF>`.
#[derive(Debug)]
pub struct DataReceiver {
    /// The next byte begins a line (the previous bytes ended with CRLF).
    line_start: bool,
    /// The last byte fed was CR (an LF next completes CRLF).
    prev_cr: bool,
    /// Octets of the current, unfinished line.
    line_len: usize,
    crs: u64,
    lfs: u64,
    bare_lf: bool,
    long_line: bool,
    /// Octets of unstuffed content so far, kept or not.
    size: u64,
    max_size: u64,
}

impl DataReceiver {
    /// A receiver positioned just after the CRLF of the `DATA` command.
    pub fn new(max_size: u64) -> Self {
        Self {
            line_start: true,
            prev_cr: false,
            line_len: 0,
            crs: 0,
            lfs: 0,
            bare_lf: false,
            long_line: false,
            size: 0,
            max_size,
        }
    }

    /// Feeds newly arrived bytes; unstuffed content is appended to `body`
    /// until it would exceed the size limit. Bytes that might begin the end
    /// marker are not consumed: present them again with the next input.
    pub fn handle(&mut self, input: &[u8], body: &mut Vec<u8>) -> Progress {
        if self.line_start {
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
        } else if self.bare_lf || self.crs != self.lfs || self.prev_cr {
            // Every LF was checked to follow a CR, so a CR count above the LF
            // count means some CR stood alone.
            Verdict::BareNewline
        } else if self.long_line {
            Verdict::LineTooLong
        } else {
            Verdict::Ok
        }
    }

    fn feed(&mut self, seg: &[u8], body: &mut Vec<u8>) {
        let Some(&last) = seg.last() else { return };
        let mut copy_from = 0;
        if self.line_start && seg[0] == b'.' {
            copy_from = 1;
        }
        self.crs += memchr::memchr_iter(b'\r', seg).count() as u64;
        let mut line_begin = 0;
        for j in memchr::memchr_iter(b'\n', seg) {
            self.lfs += 1;
            let after_cr = if j == 0 {
                self.prev_cr
            } else {
                seg[j - 1] == b'\r'
            };
            self.bare_lf |= !after_cr;
            if self.line_len + (j + 1 - line_begin) > MAX_TEXT_LINE {
                self.long_line = true;
            }
            self.line_len = 0;
            line_begin = j + 1;
            if after_cr && seg.get(j + 1) == Some(&b'.') {
                // A dot-stuffed line (RFC 5321 4.5.2): drop the first dot.
                self.emit(&seg[copy_from..j + 1], body);
                copy_from = j + 2;
            }
        }
        self.line_len += seg.len() - line_begin;
        if self.line_len > MAX_TEXT_LINE {
            self.long_line = true;
        }
        if copy_from < seg.len() {
            self.emit(&seg[copy_from..], body);
        }
        // Only CRLF starts a line: after a bare LF, ".\r\n" is content.
        self.line_start = last == b'\n'
            && match seg.len() {
                1 => self.prev_cr,
                n => seg[n - 2] == b'\r',
            };
        self.prev_cr = last == b'\r';
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
        let n = input.len().min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
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
mod tests {
    use super::*;

    /// Feeds `input` in pieces split at `cuts`, as a connection would: bytes
    /// not consumed are presented again with the next piece.
    fn receive_split(input: &[u8], cuts: &[usize], max: u64) -> (Vec<u8>, Verdict, usize) {
        let mut rx = DataReceiver::new(max);
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
        let whole = receive_split(input, &[], 1 << 20);
        for cut in 1..input.len() {
            assert_eq!(receive_split(input, &[cut], 1 << 20), whole, "split at {cut}");
        }
        // And byte by byte.
        let all: Vec<usize> = (1..input.len()).collect();
        assert_eq!(receive_split(input, &all, 1 << 20), whole, "byte by byte");
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

    /// The smuggling table: each of these sequences must not end DATA; the
    /// second transaction is content of the first, which is then refused.
    #[test]
    fn smuggling_sequences_do_not_end_data() {
        for seq in [
            &b"\n.\n"[..],
            b"\n.\r\n",
            b"\r\n.\n",
            b"\r.\r",
            b"\r.\r\n",
            b"\r\n.\r",
        ] {
            let mut input = b"Subject: a\r\n\r\nfirst".to_vec();
            input.extend_from_slice(seq);
            input.extend_from_slice(
                b"MAIL FROM:<evil@example.org>\r\nRCPT TO:<v@localhost>\r\nDATA\r\nsmuggled\r\n.\r\n",
            );
            let (body, v, n) = receive_every_split(&input);
            assert_eq!(n, input.len(), "{seq:?} ended DATA early");
            assert_eq!(v, Verdict::BareNewline, "{seq:?}");
            assert!(body.ends_with(b"smuggled\r\n"));
        }
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
        assert_eq!(rx.handle(b"ab", Some(&mut sink)), Progress::NeedMore { consumed: 2 });
        assert_eq!(rx.handle(b"c\r\n.\r\nX", Some(&mut sink)), Progress::Done { consumed: 3 });
        assert_eq!(sink, b"abc\r\n");
    }
}
