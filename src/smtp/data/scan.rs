//! Block classification for the DATA receiver: where CR, LF and '.' sit in
//! 64-octet blocks, as bitmasks, so that the receiver does per-line work only
//! in the few blocks that need it.
//!
//! [`Scanner::skip`] passes over blocks that need nothing but a bare CR/LF
//! check (no LF followed by a dot, no line that could be too long) and
//! [`Scanner::masks`] classifies the block it stopped at. There are three
//! implementations with one contract: AVX2 (chosen at run time), SSE2 (part
//! of the x86_64 baseline, so never detected) and a portable SWAR one; the
//! tests run all that the machine can. All of the receiver's `unsafe` is
//! here, and it is only unaligned SIMD loads from slices whose length was
//! checked, and calls to the AVX2 functions after detection. This module
//! knows nothing of SMTP beyond the line-length limit; it never decides
//! where DATA ends.

use super::MAX_TEXT_LINE;

/// Octets per block: one bit of a `u64` mask each.
pub(super) const BLOCK: usize = 64;

/// Where CR, LF and '.' are in one block: bit `i` is the block's octet `i`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Masks {
    pub cr: u64,
    pub lf: u64,
    pub dot: u64,
    /// The octet after the block, 0 if there is none.
    pub next: u8,
}

impl Masks {
    /// Bit `i`: octet `i + 1` is an LF (the pair partner of a CR at `i`).
    pub fn lf_next(&self) -> u64 {
        (self.lf >> 1) | (u64::from(self.next == b'\n') << 63)
    }

    /// Bit `i`: octet `i + 1` is a '.'.
    pub fn dot_next(&self) -> u64 {
        (self.dot >> 1) | (u64::from(self.next == b'.') << 63)
    }
}

/// What [`Scanner::skip`] passed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Skip {
    /// Start of the first block not passed over.
    pub pos: usize,
    /// Some octet `i` passed over is a CR while `i + 1` is not an LF, or the
    /// other way round.
    pub bare: bool,
    /// Start of the last block passed over that holds an LF.
    pub lf_block: Option<usize>,
}

/// A block classifier. Only constructed for instruction sets this CPU has,
/// which is what makes calling the AVX2 functions sound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Scanner(Kind);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    // Only the tests use it where SIMD is available.
    #[cfg_attr(target_arch = "x86_64", allow(dead_code))]
    Portable,
    #[cfg(target_arch = "x86_64")]
    Sse2,
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

impl Scanner {
    /// The fastest this CPU runs. `is_x86_feature_detected!` caches its
    /// answer, so this is one atomic load after the first call.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") {
                Scanner(Kind::Avx2)
            } else {
                Scanner(Kind::Sse2)
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        Scanner(Kind::Portable)
    }

    /// Every implementation this CPU can run, the portable one first.
    #[cfg(test)]
    pub fn available() -> Vec<Self> {
        #[allow(unused_mut)]
        let mut all = vec![Scanner(Kind::Portable)];
        #[cfg(target_arch = "x86_64")]
        {
            all.push(Scanner(Kind::Sse2));
            if is_x86_feature_detected!("avx2") {
                all.push(Scanner(Kind::Avx2));
            }
        }
        all
    }

    /// Classifies the 64 octets at `input[pos..]`; octets past the end of
    /// `input` count as 0 (neither CR, LF nor '.').
    pub fn masks(self, input: &[u8], pos: usize) -> Masks {
        let next = input.get(pos + BLOCK).copied().unwrap_or(0);
        if let Some(block) = input
            .get(pos..)
            .and_then(|rest| rest.first_chunk::<BLOCK>())
        {
            let (cr, lf, dot) = self.classify(block);
            return Masks { cr, lf, dot, next };
        }
        // The last, short block of a call: classify the last 64 octets of
        // the input instead and shift the octets before `pos` out.
        let pos = pos.min(input.len());
        let mut padded = [0u8; BLOCK];
        let (block, shift) = match input.last_chunk::<BLOCK>() {
            Some(block) => (block, pos - (input.len() - BLOCK)),
            None => {
                padded[..input.len() - pos].copy_from_slice(&input[pos..]);
                (&padded, 0)
            }
        };
        let (cr, lf, dot) = self.classify(block);
        Masks {
            cr: cr.checked_shr(shift as u32).unwrap_or(0),
            lf: lf.checked_shr(shift as u32).unwrap_or(0),
            dot: dot.checked_shr(shift as u32).unwrap_or(0),
            next,
        }
    }

    fn classify(self, block: &[u8; BLOCK]) -> (u64, u64, u64) {
        match self.0 {
            Kind::Portable => masks_swar(block),
            // SAFETY: SSE2 is part of the x86_64 baseline.
            #[cfg(target_arch = "x86_64")]
            Kind::Sse2 => unsafe { x86::masks_sse2(block) },
            // SAFETY: `Kind::Avx2` only exists once AVX2 was detected.
            #[cfg(target_arch = "x86_64")]
            Kind::Avx2 => unsafe { x86::masks_avx2(block) },
        }
    }

    /// Passes over the blocks starting at `from`, `from + 64`, ... while a
    /// block and the octet after it lie before `to` (`to <= input.len()`),
    /// and stops at the first block that holds
    /// * an LF followed by '.' (the dot may be the octet after the block): a
    ///   dot to unstuff or the end of DATA; or
    /// * an LF that may end a line longer than [`MAX_TEXT_LINE`], judged
    ///   from `line_begin`, a lower bound of where the current line's
    ///   counted octets begin (negative: octets carried from earlier input),
    ///   and from the LFs passed over.
    ///
    /// Blocks passed over need nothing more than the pair check reported in
    /// [`Skip::bare`].
    pub fn skip(self, input: &[u8], from: usize, to: usize, line_begin: isize) -> Skip {
        let to = to.min(input.len());
        match self.0 {
            Kind::Portable => skip_swar(input, from, to, line_begin),
            // SAFETY: SSE2 is part of the x86_64 baseline.
            #[cfg(target_arch = "x86_64")]
            Kind::Sse2 => unsafe { x86::skip_sse2(input, from, to, line_begin) },
            // SAFETY: `Kind::Avx2` only exists once AVX2 was detected.
            #[cfg(target_arch = "x86_64")]
            Kind::Avx2 => unsafe { x86::skip_avx2(input, from, to, line_begin) },
        }
    }
}

/// Whether a block with an LF, starting at `pos`, may end a line that began
/// at `line_begin` or later with more than [`MAX_TEXT_LINE`] octets: its
/// first LF is at most at `pos + 63`.
#[inline(always)]
fn may_be_long(pos: usize, line_begin: isize) -> bool {
    pos as isize + BLOCK as isize - line_begin > MAX_TEXT_LINE as isize
}

fn skip_swar(input: &[u8], mut pos: usize, to: usize, mut line_begin: isize) -> Skip {
    let mut bare = false;
    let mut lf_block = None;
    while pos + BLOCK < to {
        let Some(block) = input[pos..].first_chunk::<BLOCK>() else {
            break;
        };
        let (cr, lf, dot) = masks_swar(block);
        let m = Masks {
            cr,
            lf,
            dot,
            next: input[pos + BLOCK],
        };
        if lf & m.dot_next() != 0 || (lf != 0 && may_be_long(pos, line_begin)) {
            break;
        }
        bare |= cr ^ m.lf_next() != 0;
        if lf != 0 {
            line_begin = pos as isize + 1;
            lf_block = Some(pos);
        }
        pos += BLOCK;
    }
    Skip {
        pos,
        bare,
        lf_block,
    }
}

/// CR, LF and '.' masks of a block, eight octets at a time in a `u64`.
fn masks_swar(block: &[u8; BLOCK]) -> (u64, u64, u64) {
    let (mut cr, mut lf, mut dot) = (0, 0, 0);
    for (w, word) in block.chunks_exact(8).enumerate() {
        let mut b = [0u8; 8];
        b.copy_from_slice(word);
        let x = u64::from_le_bytes(b);
        cr |= swar_eq(x, b'\r') << (8 * w);
        lf |= swar_eq(x, b'\n') << (8 * w);
        dot |= swar_eq(x, b'.') << (8 * w);
    }
    (cr, lf, dot)
}

/// Bit `k` set where octet `k` of `x` (little-endian) equals `b`.
#[inline(always)]
fn swar_eq(x: u64, b: u8) -> u64 {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    let y = x ^ (LO * u64::from(b));
    // Exact per octet (no borrow between octets, unlike the `haszero`
    // shortcut): the high bit of each octet of `t` says "nonzero".
    let t = ((y & !HI) + !HI) | y;
    let zero = !t & HI;
    // Gather the eight high bits into the low byte, octet k to bit k.
    (zero >> 7).wrapping_mul(0x0102_0408_1020_4080) >> 56
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The SIMD implementations. Each function is `unsafe` only because of
    //! its `target_feature`; inside, the loads are the only unsafe
    //! operations, each reading within a slice whose length was checked.
    use core::arch::x86_64::*;

    use super::{may_be_long, Skip, BLOCK};

    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn masks_avx2(block: &[u8; BLOCK]) -> (u64, u64, u64) {
        let at = block.as_ptr();
        // SAFETY: `block` holds 64 octets; the loads read [0, 32) and [32, 64).
        let (v1, v2) = unsafe {
            (
                _mm256_loadu_si256(at.cast()),
                _mm256_loadu_si256(at.add(32).cast()),
            )
        };
        let (cr, lf, dot) = (
            _mm256_set1_epi8(b'\r' as i8),
            _mm256_set1_epi8(b'\n' as i8),
            _mm256_set1_epi8(b'.' as i8),
        );
        let m1 = |x: u32, y: u32| u64::from(x) | (u64::from(y) << 32);
        (
            m1(
                _mm256_movemask_epi8(_mm256_cmpeq_epi8(v1, cr)) as u32,
                _mm256_movemask_epi8(_mm256_cmpeq_epi8(v2, cr)) as u32,
            ),
            m1(
                _mm256_movemask_epi8(_mm256_cmpeq_epi8(v1, lf)) as u32,
                _mm256_movemask_epi8(_mm256_cmpeq_epi8(v2, lf)) as u32,
            ),
            m1(
                _mm256_movemask_epi8(_mm256_cmpeq_epi8(v1, dot)) as u32,
                _mm256_movemask_epi8(_mm256_cmpeq_epi8(v2, dot)) as u32,
            ),
        )
    }

    /// One 64-octet block at `$pos` for [`skip_avx2`]: (LF followed by '.',
    /// LF, CR/LF pairing broken), each as a vector of 0x00/0xff octets.
    /// The caller guarantees `$pos + 65 <= input.len()`.
    macro_rules! block_avx2 {
        ($at:expr, $pos:expr, $cr:expr, $lf:expr, $dot:expr) => {{
            let at: *const u8 = $at;
            let pos: usize = $pos;
            // SAFETY: pos + 65 <= input.len() (the caller's condition); the
            // loads read [pos, pos + 64) and, one octet on, [pos + 1, pos + 65).
            let (v1, v2, w1, w2) = unsafe {
                (
                    _mm256_loadu_si256(at.add(pos).cast()),
                    _mm256_loadu_si256(at.add(pos + 32).cast()),
                    _mm256_loadu_si256(at.add(pos + 1).cast()),
                    _mm256_loadu_si256(at.add(pos + 33).cast()),
                )
            };
            // The octet after each one comes from the loads one octet on,
            // so pairs across the block edge need no carry.
            let lf1 = _mm256_cmpeq_epi8(v1, $lf);
            let lf2 = _mm256_cmpeq_epi8(v2, $lf);
            let lf_dot = _mm256_or_si256(
                _mm256_and_si256(lf1, _mm256_cmpeq_epi8(w1, $dot)),
                _mm256_and_si256(lf2, _mm256_cmpeq_epi8(w2, $dot)),
            );
            let pairs = _mm256_or_si256(
                _mm256_xor_si256(_mm256_cmpeq_epi8(v1, $cr), _mm256_cmpeq_epi8(w1, $lf)),
                _mm256_xor_si256(_mm256_cmpeq_epi8(v2, $cr), _mm256_cmpeq_epi8(w2, $lf)),
            );
            (lf_dot, _mm256_or_si256(lf1, lf2), pairs)
        }};
    }

    /// See [`super::Scanner::skip`]; `to <= input.len()`. Two blocks per
    /// step while there is room, which halves the scalar work per octet; a
    /// pair that must stop is retried one block at a time.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn skip_avx2(
        input: &[u8],
        mut pos: usize,
        to: usize,
        mut line_begin: isize,
    ) -> Skip {
        debug_assert!(to <= input.len());
        let (cr, lf, dot) = (
            _mm256_set1_epi8(b'\r' as i8),
            _mm256_set1_epi8(b'\n' as i8),
            _mm256_set1_epi8(b'.' as i8),
        );
        let at = input.as_ptr();
        let mut bad = _mm256_setzero_si256();
        let mut lf_block = None;
        loop {
            while pos + 2 * BLOCK < to {
                let (dot1, lf1, pairs1) = block_avx2!(at, pos, cr, lf, dot);
                let (dot2, lf2, pairs2) = block_avx2!(at, pos + BLOCK, cr, lf, dot);
                let lf_dot = _mm256_or_si256(dot1, dot2);
                let any1 = _mm256_movemask_epi8(lf1) != 0;
                let any2 = _mm256_movemask_epi8(lf2) != 0;
                // Judged as if both blocks' LFs were in the second one.
                if _mm256_testz_si256(lf_dot, lf_dot) == 0
                    || ((any1 || any2) && may_be_long(pos + BLOCK, line_begin))
                {
                    break;
                }
                bad = _mm256_or_si256(bad, _mm256_or_si256(pairs1, pairs2));
                if any2 {
                    line_begin = (pos + BLOCK) as isize + 1;
                    lf_block = Some(pos + BLOCK);
                } else if any1 {
                    line_begin = pos as isize + 1;
                    lf_block = Some(pos);
                }
                pos += 2 * BLOCK;
            }
            if pos + BLOCK >= to {
                break;
            }
            let (lf_dot, lfs, pairs) = block_avx2!(at, pos, cr, lf, dot);
            let any_lf = _mm256_movemask_epi8(lfs) != 0;
            if _mm256_testz_si256(lf_dot, lf_dot) == 0 || (any_lf && may_be_long(pos, line_begin)) {
                break;
            }
            bad = _mm256_or_si256(bad, pairs);
            if any_lf {
                line_begin = pos as isize + 1;
                lf_block = Some(pos);
            }
            pos += BLOCK;
        }
        Skip {
            pos,
            bare: _mm256_testz_si256(bad, bad) == 0,
            lf_block,
        }
    }

    #[target_feature(enable = "sse2")]
    pub(super) unsafe fn masks_sse2(block: &[u8; BLOCK]) -> (u64, u64, u64) {
        let at = block.as_ptr();
        let (cr, lf, dot) = (
            _mm_set1_epi8(b'\r' as i8),
            _mm_set1_epi8(b'\n' as i8),
            _mm_set1_epi8(b'.' as i8),
        );
        let (mut mcr, mut mlf, mut mdot) = (0u64, 0u64, 0u64);
        for k in 0..4 {
            // SAFETY: k < 4, so the load reads [16k, 16k + 16) within the
            // 64 octets of `block`.
            let v = unsafe { _mm_loadu_si128(at.add(16 * k).cast()) };
            mcr |= u64::from(_mm_movemask_epi8(_mm_cmpeq_epi8(v, cr)) as u16) << (16 * k);
            mlf |= u64::from(_mm_movemask_epi8(_mm_cmpeq_epi8(v, lf)) as u16) << (16 * k);
            mdot |= u64::from(_mm_movemask_epi8(_mm_cmpeq_epi8(v, dot)) as u16) << (16 * k);
        }
        (mcr, mlf, mdot)
    }

    /// See [`super::Scanner::skip`]; `to <= input.len()`.
    #[target_feature(enable = "sse2")]
    pub(super) unsafe fn skip_sse2(
        input: &[u8],
        mut pos: usize,
        to: usize,
        mut line_begin: isize,
    ) -> Skip {
        debug_assert!(to <= input.len());
        let (cr, lf, dot) = (
            _mm_set1_epi8(b'\r' as i8),
            _mm_set1_epi8(b'\n' as i8),
            _mm_set1_epi8(b'.' as i8),
        );
        let at = input.as_ptr();
        let mut bad = _mm_setzero_si128();
        let mut lf_block = None;
        while pos + BLOCK < to {
            let mut lf_dot = _mm_setzero_si128();
            let mut lfs = _mm_setzero_si128();
            let mut pairs = _mm_setzero_si128();
            for k in 0..4 {
                // SAFETY: pos + 65 <= to <= input.len() and k < 4: the loads
                // read [pos + 16k, pos + 16k + 17).
                let (v, w) = unsafe {
                    (
                        _mm_loadu_si128(at.add(pos + 16 * k).cast()),
                        _mm_loadu_si128(at.add(pos + 16 * k + 1).cast()),
                    )
                };
                let l = _mm_cmpeq_epi8(v, lf);
                lfs = _mm_or_si128(lfs, l);
                lf_dot = _mm_or_si128(lf_dot, _mm_and_si128(l, _mm_cmpeq_epi8(w, dot)));
                pairs = _mm_or_si128(
                    pairs,
                    _mm_xor_si128(_mm_cmpeq_epi8(v, cr), _mm_cmpeq_epi8(w, lf)),
                );
            }
            let any_lf = _mm_movemask_epi8(lfs) != 0;
            if _mm_movemask_epi8(lf_dot) != 0 || (any_lf && may_be_long(pos, line_begin)) {
                break;
            }
            bad = _mm_or_si128(bad, pairs);
            if any_lf {
                line_begin = pos as isize + 1;
                lf_block = Some(pos);
            }
            pos += BLOCK;
        }
        Skip {
            pos,
            bare: _mm_movemask_epi8(bad) != 0,
            lf_block,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::data::tests::XorShift;

    fn masks_scalar(input: &[u8], pos: usize) -> Masks {
        let at = |i: usize| input.get(pos + i).copied().unwrap_or(0);
        let mask = |b: u8| (0..BLOCK).fold(0u64, |m, i| m | (u64::from(at(i) == b) << i));
        Masks {
            cr: mask(b'\r'),
            lf: mask(b'\n'),
            dot: mask(b'.'),
            next: at(BLOCK),
        }
    }

    fn noise(rng: &mut XorShift, len: usize) -> Vec<u8> {
        const ALPHABET: &[u8] = b"\r\n.\r\n.ax\x80\xff\x00\x8d\x8a\xae";
        (0..len)
            .map(|_| ALPHABET[rng.next() as usize % ALPHABET.len()])
            .collect()
    }

    #[test]
    fn masks_agree_with_scalar() {
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        for len in 0..200 {
            let input = noise(&mut rng, len);
            for pos in 0..=len {
                let want = masks_scalar(&input, pos);
                for s in Scanner::available() {
                    assert_eq!(s.masks(&input, pos), want, "{s:?} len {len} pos {pos}");
                }
            }
        }
    }

    /// `skip` against a block-by-block model built from the scalar masks.
    #[test]
    fn skip_agrees_with_model() {
        let mut rng = XorShift(7);
        for round in 0..3000 {
            let len = (rng.next() % 700) as usize;
            let mut input = noise(&mut rng, len);
            // Mostly text, so that runs of blocks are passed over.
            if round & 1 == 0 {
                for b in input.iter_mut() {
                    if rng.next() & 7 != 0 {
                        *b = b'a';
                    }
                }
            }
            let from = (rng.next() % 70) as usize;
            let to = (rng.next() as usize % (len + 2)).max(from);
            let begin = -((rng.next() % 1200) as isize);
            let model = {
                let (mut pos, mut lb, mut bare, mut lf_block) = (from, begin, false, None);
                while pos + BLOCK < to.min(len) {
                    let m = masks_scalar(&input, pos);
                    if m.lf & m.dot_next() != 0 || (m.lf != 0 && may_be_long(pos, lb)) {
                        break;
                    }
                    bare |= m.cr ^ m.lf_next() != 0;
                    if m.lf != 0 {
                        lb = pos as isize + 1;
                        lf_block = Some(pos);
                    }
                    pos += BLOCK;
                }
                Skip {
                    pos,
                    bare,
                    lf_block,
                }
            };
            for s in Scanner::available() {
                assert_eq!(
                    s.skip(&input, from, to, begin),
                    model,
                    "{s:?} round {round}"
                );
            }
        }
    }
}
