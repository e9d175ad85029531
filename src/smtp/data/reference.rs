//! The DATA receiver as it was before block scanning (as of commit 614a586), kept
//! verbatim as the oracle the fast receiver is tested against: same
//! `Progress` for every call, same body, size and verdict, for every way of
//! splitting the input. Test-only; never a model of what SMTP requires (the
//! fuzz target's `Model` and the unit tests in `data.rs` are).

use std::sync::LazyLock;

use memchr::memmem::Finder;

use super::{BareNewline, Progress, Verdict, MAX_TEXT_LINE};

static END_OF_DATA: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\r\n.\r\n"));

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
            // Measured as stored: a bare CR or LF became CRLF.
            self.end_line(at - i + 2);
            i = at + if crlf { 2 } else { 1 };
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
