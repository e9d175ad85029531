//! Append-only segment files: the record format and its scanner.
//!
//! A segment is a sequence of records, each:
//!
//! ```text
//! 0   magic  "RMR1"
//! 4   kind   u8 (1 = message, 2 = journal entry), 3 bytes zero
//! 8   header length   u32 LE
//! 12  body length     u64 LE
//! 20  crc32c          u32 LE, over bytes 4..20, the header and the body
//! 24  header (the envelope block of `spool::format`), then body (the message)
//! ```
//!
//! Records are only ever appended, and a record is acknowledged only once an
//! `fdatasync` covering it *and every record before it* returned, so damage
//! can only be at the tail: the scanner stops at the first record that is
//! short or fails its checksum and reports where (a torn write from a crash
//! is dropped, never delivered half).

pub const MAGIC: &[u8; 4] = b"RMR1";
pub const PREFIX: usize = 24;
pub const KIND_MESSAGE: u8 = 1;
pub const KIND_JOURNAL: u8 = 2;

/// Appends one message record to `out`; the body is given in parts (the
/// trace header, then the received content) so it is copied only once.
pub fn encode_record(out: &mut Vec<u8>, kind: u8, header: &[u8], body: &[&[u8]]) {
    let body_len: usize = body.iter().map(|p| p.len()).sum();
    let start = out.len();
    out.reserve(PREFIX + header.len() + body_len);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[kind, 0, 0, 0]);
    out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    out.extend_from_slice(&(body_len as u64).to_le_bytes());
    let mut crc = crc32c::crc32c(&out[start + 4..start + 20]);
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

/// Why a scan stopped before the end of the segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Damage {
    /// Fewer bytes than the record claims: a write cut short.
    Truncated,
    /// Bytes that are not a record start.
    BadMagic,
    /// A complete record whose checksum does not match.
    BadChecksum,
}

/// The result of reading one segment.
#[derive(Debug, PartialEq, Eq)]
pub struct Scan<'a> {
    pub records: Vec<Record<'a>>,
    /// Length of the valid prefix: everything past it is damage.
    pub valid_len: u64,
    pub damage: Option<Damage>,
}

/// Reads every intact record from the start of `seg`.
pub fn scan(seg: &[u8]) -> Scan<'_> {
    let mut records = Vec::new();
    let mut off = 0usize;
    let damage = loop {
        let rest = &seg[off..];
        if rest.is_empty() {
            break None;
        }
        if rest.len() < PREFIX {
            break Some(if MAGIC.starts_with(&rest[..rest.len().min(4)]) {
                Damage::Truncated
            } else {
                Damage::BadMagic
            });
        }
        if &rest[..4] != MAGIC || !matches!(rest[4], KIND_MESSAGE | KIND_JOURNAL) {
            break Some(Damage::BadMagic);
        }
        let hlen = u32::from_le_bytes(rest[8..12].try_into().unwrap_or_default()) as u64;
        let blen = u64::from_le_bytes(rest[12..20].try_into().unwrap_or_default());
        let Some(total) = (PREFIX as u64)
            .checked_add(hlen)
            .and_then(|t| t.checked_add(blen))
        else {
            break Some(Damage::BadMagic);
        };
        if (rest.len() as u64) < total {
            break Some(Damage::Truncated);
        }
        let (hlen, total) = (hlen as usize, total as usize);
        let header = &rest[PREFIX..PREFIX + hlen];
        let body = &rest[PREFIX + hlen..total];
        let want = u32::from_le_bytes(rest[20..24].try_into().unwrap_or_default());
        let mut crc = crc32c::crc32c(&rest[4..20]);
        crc = crc32c::crc32c_append(crc, header);
        crc = crc32c::crc32c_append(crc, body);
        if crc != want {
            break Some(Damage::BadChecksum);
        }
        records.push(Record {
            kind: rest[4],
            offset: off as u64,
            len: total as u64,
            header,
            body,
        });
        off += total;
    };
    Scan {
        records,
        valid_len: off as u64,
        damage,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment(n: usize) -> Vec<u8> {
        let mut seg = Vec::new();
        for i in 0..n {
            let header = format!("id {i}\r\n");
            let body = format!("Subject: {i}\r\n\r\n{}\r\n", "x".repeat(i * 7));
            encode_record(
                &mut seg,
                KIND_MESSAGE,
                header.as_bytes(),
                &[body.as_bytes()],
            );
        }
        seg
    }

    #[test]
    fn round_trip() {
        let seg = segment(5);
        let s = scan(&seg);
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
        let last = scan(&seg).records[2].offset as usize;
        for cut in last..seg.len() {
            let s = scan(&seg[..cut]);
            assert_eq!(s.records.len(), 2, "cut at {cut}");
            assert_eq!(s.valid_len, last as u64);
            assert_eq!(s.damage.is_some(), cut > last, "cut at {cut}");
        }
    }

    #[test]
    fn flipped_bit_is_caught() {
        let seg = segment(3);
        let last = scan(&seg).records[2].offset as usize;
        for i in last + 4..seg.len() {
            let mut bad = seg.clone();
            bad[i] ^= 0x10;
            let s = scan(&bad);
            assert_eq!(s.records.len(), 2, "flip at {i}");
            assert!(s.damage.is_some());
        }
    }

    #[test]
    fn zero_filled_tail_is_damage_not_records() {
        // A file extended but not written (crash after size update).
        let mut seg = segment(2);
        let len = seg.len();
        seg.extend_from_slice(&[0u8; 100]);
        let s = scan(&seg);
        assert_eq!(s.records.len(), 2);
        assert_eq!(s.valid_len, len as u64);
        assert_eq!(s.damage, Some(Damage::BadMagic));
    }
}
