//! Append-only segment files: the record format and its scanner.
//!
//! A segment is a sequence of records, each:
//!
//! ```text
//! 0   magic  "RMR1"
//! 4   kind   u8 (1 = message, 2 = journal entry), 3 bytes zero
//! 8   header length   u32 LE
//! 12  body length     u64 LE
//! 20  crc32c          u32 LE, over bytes 4..20, the header and the body,
//!                     starting from the segment's seed
//! 24  header (the envelope block of `spool::format`), then body (the message)
//! ```
//!
//! Records are only ever appended, and a record is acknowledged only once an
//! `fdatasync` covering it *and every record before it* returned, so a crash
//! can only damage the tail: a torn tail (no intact record after the damage)
//! is dropped, never delivered half. Damage in the middle (a bad sector, a
//! flipped bit) must not cost the acknowledged records after it, so the
//! scanner resynchronises: it looks for the next offset where a whole record
//! verifies and goes on from there, reporting what it skipped.
//!
//! Resynchronising looks inside the damaged record, whose body is the
//! message as a peer sent it: a peer can put bytes there that frame and
//! checksum as a record (crc32c is no secret), and such a record would carry
//! an envelope of the peer's choosing. So message segments written since
//! resynchronisation exists have a random 32-bit seed, named in the file
//! name (`SSS-TTTTTTTTTTTTTTTT-KKKKKKKK.seg`) and never shown to a peer, from
//! which every record's crc32c starts; a forged record verifies with
//! probability 2^-32. Segments without a seed in their name (written before)
//! are not resynchronised: they stop at damage as they always did. Journal
//! records hold only what ringmta wrote (queue ids and numbers), never peer
//! bytes, and are resynchronised unseeded.

use memchr::memmem;

pub const MAGIC: &[u8; 4] = b"RMR1";
pub const PREFIX: usize = 24;
pub const KIND_MESSAGE: u8 = 1;
pub const KIND_JOURNAL: u8 = 2;

/// Appends one unseeded record to `out` (journals, tests); see
/// [`encode_record_seeded`].
pub fn encode_record(out: &mut Vec<u8>, kind: u8, header: &[u8], body: &[&[u8]]) {
    encode_record_seeded(out, kind, 0, header, body)
}

/// Appends one record to `out`, its checksum started from `seed` (the
/// segment's, see [`seed_of`]); the body is given in parts (the trace
/// header, then the received content) so it is copied only once.
pub fn encode_record_seeded(out: &mut Vec<u8>, kind: u8, seed: u32, header: &[u8], body: &[&[u8]]) {
    let body_len: usize = body.iter().map(|p| p.len()).sum();
    let start = out.len();
    out.reserve(PREFIX + header.len() + body_len);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[kind, 0, 0, 0]);
    out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    out.extend_from_slice(&(body_len as u64).to_le_bytes());
    let mut crc = crc32c::crc32c_append(seed, &out[start + 4..start + 20]);
    crc = crc32c::crc32c_append(crc, header);
    for part in body {
        crc = crc32c::crc32c_append(crc, part);
    }
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(header);
    for part in body {
        out.extend_from_slice(part);
    }
}

/// The checksum seed of the file `name` (a file name, no directory): the
/// last eight hex digits of a message segment's name; 0 for journals and
/// for segments written before seeds existed.
pub fn seed_of(name: &str) -> u32 {
    name.strip_suffix(".seg")
        .and_then(|stem| stem.splitn(3, '-').nth(2))
        .filter(|k| k.len() == 8)
        .and_then(|k| u32::from_str_radix(k, 16).ok())
        .unwrap_or(0)
}

/// How to read a file: its seed, and whether damage in it may be skipped
/// (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keying {
    pub seed: u32,
    pub resync: bool,
}

impl Keying {
    /// The keying of the spool file `name` (a file name, no directory).
    pub fn of(name: &str) -> Keying {
        let seed = seed_of(name);
        Keying {
            seed,
            resync: seed != 0 || name.ends_with(".jrn"),
        }
    }
}

/// One intact record found by [`scan`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    pub kind: u8,
    /// Offset of the record in the segment.
    pub offset: u64,
    /// Length of the whole record.
    pub len: u64,
    pub header: &'a [u8],
    pub body: &'a [u8],
}

/// What was wrong at a damaged offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Damage {
    /// Fewer bytes than the record claims: a write cut short.
    Truncated,
    /// Bytes that are not a record start.
    BadMagic,
    /// A complete record whose checksum does not match.
    BadChecksum,
}

/// Damaged bytes in the middle of a file, skipped by resynchronising.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Skipped {
    pub offset: u64,
    pub len: u64,
    pub damage: Damage,
}

/// The result of reading one segment.
#[derive(Debug, PartialEq, Eq)]
pub struct Scan<'a> {
    pub records: Vec<Record<'a>>,
    /// End of the last intact record: with `damage`, everything past it is
    /// a torn tail; without, only zeros follow it, if anything (space the
    /// writer filled ahead).
    pub valid_len: u64,
    /// Why the file does not end at `valid_len` (a torn tail).
    pub damage: Option<Damage>,
    /// Damage in the middle, skipped (records after it are in `records`).
    pub skipped: Vec<Skipped>,
}

/// Reads every intact record of a file keyed by `keying`; damage with an
/// intact record after it is skipped when `keying.resync` allows.
pub fn scan(seg: &[u8], keying: Keying) -> Scan<'_> {
    let finder = memmem::Finder::new(MAGIC);
    let mut records = Vec::new();
    let mut skipped = Vec::new();
    let mut off = 0usize;
    let damage = loop {
        if off == seg.len() {
            break None;
        }
        let damage = match record_at(seg, off, keying.seed) {
            Ok(r) => {
                off += r.len as usize;
                records.push(r);
                continue;
            }
            Err(d) => d,
        };
        // Zeros to the end: space the writer filled ahead of its records
        // (`commit::ZEROED_AHEAD`), or never written. Nothing was lost.
        if seg[off..].iter().all(|&b| b == 0) {
            break None;
        }
        if !keying.resync {
            break Some(damage);
        }
        match resync(seg, off, keying.seed, &finder) {
            Some(next) => {
                skipped.push(Skipped {
                    offset: off as u64,
                    len: (next - off) as u64,
                    damage,
                });
                off = next;
            }
            None => break Some(damage),
        }
    };
    Scan {
        records,
        valid_len: off as u64,
        damage,
        skipped,
    }
}

/// Most bytes one resynchronisation checksums, in multiples of the file:
/// magic bytes planted in a body with lengths reaching to the end of the
/// file would otherwise make the search quadratic. Past it the rest counts
/// as a torn tail.
const RESYNC_WORK: usize = 4;

/// The next offset after `bad` where a whole record verifies.
fn resync(seg: &[u8], bad: usize, seed: u32, finder: &memmem::Finder<'_>) -> Option<usize> {
    let mut from = bad + 1;
    let mut budget = seg.len().saturating_mul(RESYNC_WORK);
    while from < seg.len() {
        let at = from + finder.find(&seg[from..])?;
        if let Some(len) = plausible(&seg[at..]) {
            if len > budget {
                return None;
            }
            budget -= len;
            if record_at(seg, at, seed).is_ok() {
                return Some(at);
            }
        }
        from = at + 1;
    }
    None
}

/// The length of the record framed at the start of `rest` when its fixed
/// fields make sense and it fits, before any checksum is computed.
fn plausible(rest: &[u8]) -> Option<usize> {
    if rest.len() < PREFIX
        || &rest[..4] != MAGIC
        || !matches!(rest[4], KIND_MESSAGE | KIND_JOURNAL)
        || rest[5..8] != [0, 0, 0]
    {
        return None;
    }
    let (hlen, blen) = lengths(rest);
    let total = (PREFIX as u64).checked_add(hlen)?.checked_add(blen)?;
    usize::try_from(total).ok().filter(|&t| t <= rest.len())
}

fn lengths(rest: &[u8]) -> (u64, u64) {
    let hlen = u32::from_le_bytes(rest[8..12].try_into().unwrap_or_default()) as u64;
    let blen = u64::from_le_bytes(rest[12..20].try_into().unwrap_or_default());
    (hlen, blen)
}

/// The record at `off`, verified.
fn record_at(seg: &[u8], off: usize, seed: u32) -> Result<Record<'_>, Damage> {
    let rest = &seg[off..];
    if rest.len() < PREFIX {
        return Err(if MAGIC.starts_with(&rest[..rest.len().min(4)]) {
            Damage::Truncated
        } else {
            Damage::BadMagic
        });
    }
    if &rest[..4] != MAGIC || !matches!(rest[4], KIND_MESSAGE | KIND_JOURNAL) {
        return Err(Damage::BadMagic);
    }
    let (hlen, blen) = lengths(rest);
    let Some(total) = (PREFIX as u64)
        .checked_add(hlen)
        .and_then(|t| t.checked_add(blen))
    else {
        return Err(Damage::BadMagic);
    };
    if (rest.len() as u64) < total {
        return Err(Damage::Truncated);
    }
    let (hlen, total) = (hlen as usize, total as usize);
    let header = &rest[PREFIX..PREFIX + hlen];
    let body = &rest[PREFIX + hlen..total];
    let want = u32::from_le_bytes(rest[20..24].try_into().unwrap_or_default());
    let mut crc = crc32c::crc32c_append(seed, &rest[4..20]);
    crc = crc32c::crc32c_append(crc, header);
    crc = crc32c::crc32c_append(crc, body);
    if crc != want {
        return Err(Damage::BadChecksum);
    }
    Ok(Record {
        kind: rest[4],
        offset: off as u64,
        len: total as u64,
        header,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: u32 = 0x5eed_1234;
    const KEYED: Keying = Keying {
        seed: SEED,
        resync: true,
    };

    fn segment(n: usize) -> Vec<u8> {
        let mut seg = Vec::new();
        for i in 0..n {
            let header = format!("id {i}\r\n");
            let body = format!("Subject: {i}\r\n\r\n{}\r\n", "x".repeat(i * 7));
            encode_record_seeded(
                &mut seg,
                KIND_MESSAGE,
                SEED,
                header.as_bytes(),
                &[body.as_bytes()],
            );
        }
        seg
    }

    fn ids(s: &Scan<'_>) -> Vec<String> {
        s.records
            .iter()
            .map(|r| String::from_utf8_lossy(r.header).trim().to_owned())
            .collect()
    }

    /// Regression (issue 11): recovery cut a segment at its first bad
    /// record, losing every acknowledged record after damage in the
    /// middle. A flipped bit anywhere in the second record (its framing
    /// included) costs that record only.
    #[test]
    fn mid_file_damage_costs_only_the_damaged_record() {
        let seg = segment(5);
        let recs = scan(&seg, KEYED).records;
        let (start, end) = (recs[1].offset as usize, recs[2].offset as usize);
        for i in start..end {
            for bit in [0x01, 0x10, 0x80] {
                let mut bad = seg.clone();
                bad[i] ^= bit;
                let s = scan(&bad, KEYED);
                assert_eq!(ids(&s), ["id 0", "id 2", "id 3", "id 4"], "flip at {i}");
                assert_eq!(
                    s.skipped,
                    [Skipped {
                        offset: start as u64,
                        len: (end - start) as u64,
                        damage: s.skipped[0].damage,
                    }],
                    "flip at {i}"
                );
                assert_eq!((s.damage, s.valid_len), (None, seg.len() as u64));
            }
        }
    }

    /// A lost sector (zeros over the end of one record and the start of
    /// the next) in the middle: the records after it are kept.
    #[test]
    fn zeroed_region_in_the_middle_is_skipped() {
        let seg = segment(6);
        let recs = scan(&seg, KEYED).records;
        let mut bad = seg.clone();
        let (from, to) = (recs[2].offset as usize + 30, recs[3].offset as usize + 10);
        bad[from..to].fill(0);
        let s = scan(&bad, KEYED);
        assert_eq!(ids(&s), ["id 0", "id 1", "id 4", "id 5"]);
        assert_eq!(s.skipped.len(), 1);
        assert_eq!(s.skipped[0].offset, recs[2].offset);
        assert_eq!(s.skipped[0].len, recs[4].offset - recs[2].offset);
        assert_eq!(s.damage, None);
    }

    /// A message body can hold bytes that frame as a record with a correct
    /// unseeded crc32c (anyone can compute one), with an envelope of the
    /// sender's choosing. Resynchronising after damage to that message must
    /// not take it for a queued message: the segment's seed is not known to
    /// the sender. (Unseeded, it would be taken: the reason for the seed.)
    #[test]
    fn forged_record_in_a_damaged_body_is_not_accepted() {
        let mut forged = Vec::new();
        encode_record(&mut forged, KIND_MESSAGE, b"id forged\r\n", &[b"spam\r\n"]);
        for keying in [
            KEYED,
            Keying {
                seed: 0,
                resync: true,
            },
        ] {
            let mut seg = Vec::new();
            for (i, body) in [&b"first\r\n"[..], &forged, b"last\r\n"].iter().enumerate() {
                let header = format!("id {i}\r\n");
                encode_record_seeded(
                    &mut seg,
                    KIND_MESSAGE,
                    keying.seed,
                    header.as_bytes(),
                    &[body],
                );
            }
            let second = scan(&seg, keying).records[1].offset as usize;
            // Damage to the framing of the record holding the forgery.
            seg[second + 9] ^= 0x40;
            let got = ids(&scan(&seg, keying));
            if keying.seed != 0 {
                assert_eq!(got, ["id 0", "id 2"]);
            } else {
                assert_eq!(
                    got,
                    ["id 0", "id forged", "id 2"],
                    "the risk the seed removes"
                );
            }
        }
    }

    /// A file without a seed in its name holds message records written
    /// before seeds: it is not resynchronised (a forged record would
    /// verify), it stops at damage as before.
    #[test]
    fn unseeded_segments_stop_at_damage() {
        let mut seg = Vec::new();
        for i in 0..3 {
            encode_record(
                &mut seg,
                KIND_MESSAGE,
                format!("id {i}\r\n").as_bytes(),
                &[b"b\r\n"],
            );
        }
        let keying = Keying::of("000-00060a3b4c5d6e7f.seg");
        assert_eq!(
            keying,
            Keying {
                seed: 0,
                resync: false
            }
        );
        let second = scan(&seg, keying).records[1].offset as usize;
        seg[second + 30] ^= 1;
        let s = scan(&seg, keying);
        assert_eq!(ids(&s), ["id 0"]);
        assert_eq!(s.damage, Some(Damage::BadChecksum));
        // Journals hold no peer bytes: resynchronised without a seed.
        assert_eq!(
            ids(&scan(&seg, Keying::of("000-00060a3b4c5d6e7f.jrn"))),
            ["id 0", "id 2"]
        );
    }

    #[test]
    fn seeds_come_from_segment_names() {
        assert_eq!(seed_of("003-00060a3b4c5d6e7f-5eed1234.seg"), 0x5eed_1234);
        assert_eq!(seed_of("003-00060a3b4c5d6e7f.seg"), 0);
        assert_eq!(seed_of("003-00060a3b4c5d6e7f-5eed1234.jrn"), 0);
        assert_eq!(seed_of("003-00060a3b4c5d6e7f-xyz.seg"), 0);
        assert_eq!(
            Keying::of("003-00060a3b4c5d6e7f-5eed1234.seg"),
            Keying {
                seed: 0x5eed_1234,
                resync: true
            }
        );
    }

    #[test]
    fn round_trip() {
        let seg = segment(5);
        let s = scan(&seg, KEYED);
        assert_eq!(s.records.len(), 5);
        assert_eq!(s.damage, None);
        assert_eq!(s.valid_len, seg.len() as u64);
        assert_eq!(s.records[3].header, b"id 3\r\n");
        assert!(s.records[3].body.starts_with(b"Subject: 3\r\n"));
    }

    /// A crash can cut the last record at any byte: every cut leaves the
    /// earlier records intact and drops the last one whole.
    #[test]
    fn torn_tail_at_every_byte() {
        let seg = segment(3);
        let last = scan(&seg, KEYED).records[2].offset as usize;
        for cut in last..seg.len() {
            let s = scan(&seg[..cut], KEYED);
            assert_eq!(s.records.len(), 2, "cut at {cut}");
            assert_eq!(s.valid_len, last as u64);
            assert_eq!(s.damage.is_some(), cut > last, "cut at {cut}");
        }
    }

    #[test]
    fn flipped_bit_is_caught() {
        let seg = segment(3);
        let last = scan(&seg, KEYED).records[2].offset as usize;
        for i in last + 4..seg.len() {
            let mut bad = seg.clone();
            bad[i] ^= 0x10;
            let s = scan(&bad, KEYED);
            assert_eq!(s.records.len(), 2, "flip at {i}");
            assert!(s.damage.is_some());
        }
    }

    /// Zeros after the last record are space the writer filled ahead
    /// (`commit::ZEROED_AHEAD`), or a file extended but never written: a
    /// clean end, not damage. A record begun and cut off before the zeros
    /// is still a torn tail.
    #[test]
    fn zero_filled_tail_is_a_clean_end_not_records() {
        let mut seg = segment(2);
        let len = seg.len();
        seg.extend_from_slice(&[0u8; 100]);
        for keying in [
            KEYED,
            Keying {
                seed: SEED,
                resync: false,
            },
        ] {
            let s = scan(&seg, keying);
            assert_eq!(s.records.len(), 2);
            assert_eq!(s.valid_len, len as u64);
            assert_eq!(s.damage, None);
        }
        let third = segment(3);
        let last = scan(&third, KEYED).records[2].offset as usize;
        let mut torn = third[..last + 30].to_vec();
        torn.extend_from_slice(&[0u8; 4096]);
        let s = scan(&torn, KEYED);
        assert_eq!(s.records.len(), 2);
        assert_eq!(s.valid_len, last as u64);
        assert!(s.damage.is_some());
    }
}
