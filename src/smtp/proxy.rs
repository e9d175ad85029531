//! The PROXY protocol header (HAProxy's, versions 1 and 2), sans-IO: a
//! load balancer in front of ringmta sends it before anything else, and it
//! names the client the balancer accepted.
//!
//! [`parse`] looks at the bytes received so far and says "need more",
//! "a header of N octets, naming this client" or why it is not one. It
//! never asks for more than [`MAX_HEADER`] octets (a version 1 line is at
//! most [`MAX_V1`] with its CRLF, a version 2 header at most 16 octets plus
//! [`MAX_V2_BLOCK`]), so what a peer can make the driver buffer is
//! bounded. Version 2 TLVs are skipped unread. Whether a peer may send a
//! header at all is the driver's decision (`--proxy-protocol-from`); this
//! module never touches sockets or clocks.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use thiserror::Error;

/// Longest version 1 header, CRLF included (the specification's bound).
pub const MAX_V1: usize = 107;
/// Longest version 2 address block accepted (addresses and TLVs).
pub const MAX_V2_BLOCK: usize = 1024;
/// Most octets [`parse`] ever needs to decide.
pub const MAX_HEADER: usize = V2_FIXED + MAX_V2_BLOCK;

/// The 12-octet signature that starts a version 2 header.
pub const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
const V1_PREFIX: &[u8] = b"PROXY ";
/// Signature, version/command, family/transport, block length.
const V2_FIXED: usize = 16;

/// What a complete header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// A proxied TCP connection: the client's address and the address it
    /// connected to.
    Proxied {
        source: SocketAddr,
        destination: SocketAddr,
    },
    /// No client address: version 2 `LOCAL` (the balancer's own health
    /// check), version 1 `UNKNOWN`, or a version 2 family other than
    /// TCP over IPv4/IPv6. The connection's own peer is the client.
    Local,
}

/// [`parse`]'s answer when the input is not wrong (yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// The input is a prefix of a header: read more (at most up to
    /// [`MAX_HEADER`] octets in all).
    NeedMore,
    /// A header took the first `len` octets; what follows is the session's.
    Done { header: Header, len: usize },
}

/// Why the input is not a PROXY header. All mean the same to the driver
/// (drop the connection); they differ in what the log says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum ProxyError {
    #[error("no PROXY header (the connection does not start with one)")]
    Missing,
    #[error("PROXY header longer than allowed")]
    TooLong,
    #[error("malformed PROXY header: {0}")]
    Malformed(&'static str),
    #[error("unsupported PROXY header: {0}")]
    Unsupported(&'static str),
}

/// Parses the header at the start of `input`, the bytes received so far.
/// Returns [`Parsed::NeedMore`] only while `input` could still become a
/// header, and never once it holds [`MAX_HEADER`] octets.
pub fn parse(input: &[u8]) -> Result<Parsed, ProxyError> {
    match input.first() {
        None => Ok(Parsed::NeedMore),
        Some(b'P') => parse_v1(input),
        Some(b'\r') => parse_v2(input),
        Some(_) => Err(ProxyError::Missing),
    }
}

fn parse_v1(input: &[u8]) -> Result<Parsed, ProxyError> {
    let n = input.len().min(V1_PREFIX.len());
    if input[..n] != V1_PREFIX[..n] {
        return Err(ProxyError::Missing);
    }
    let window = &input[..input.len().min(MAX_V1)];
    let Some(end) = memchr::memchr2(b'\r', b'\n', window) else {
        return if input.len() >= MAX_V1 {
            Err(ProxyError::TooLong)
        } else {
            Ok(Parsed::NeedMore)
        };
    };
    if window[end] == b'\n' {
        return Err(ProxyError::Malformed("bare LF in version 1 header"));
    }
    if end + 2 > MAX_V1 {
        return Err(ProxyError::TooLong);
    }
    match input.get(end + 1) {
        None => return Ok(Parsed::NeedMore),
        Some(b'\n') => {}
        Some(_) => return Err(ProxyError::Malformed("bare CR in version 1 header")),
    }
    let header = v1_fields(&input[V1_PREFIX.len()..end])?;
    Ok(Parsed::Done {
        header,
        len: end + 2,
    })
}

/// `TCP4 SRC DST SPORT DPORT`, `TCP6 ...` or `UNKNOWN[ anything]`, single
/// spaces between.
fn v1_fields(line: &[u8]) -> Result<Header, ProxyError> {
    let line = std::str::from_utf8(line).map_err(|_| ProxyError::Malformed("not ASCII"))?;
    let mut fields = line.split(' ');
    let proto = fields.next().unwrap_or("");
    let v6 = match proto {
        "TCP4" => false,
        "TCP6" => true,
        "UNKNOWN" => return Ok(Header::Local),
        _ => {
            return Err(ProxyError::Unsupported(
                "version 1 protocol not TCP4, TCP6 or UNKNOWN",
            ))
        }
    };
    let mut next = || fields.next().ok_or(ProxyError::Malformed("missing field"));
    let (src, dst, sport, dport) = (next()?, next()?, next()?, next()?);
    if fields.next().is_some() {
        return Err(ProxyError::Malformed("extra field"));
    }
    let ip = |s: &str| -> Result<IpAddr, ProxyError> {
        let ip = if v6 {
            s.parse::<Ipv6Addr>().map(IpAddr::V6)
        } else {
            s.parse::<Ipv4Addr>().map(IpAddr::V4)
        };
        ip.map_err(|_| ProxyError::Malformed("bad address"))
    };
    Ok(Header::Proxied {
        source: SocketAddr::new(ip(src)?, port(sport)?),
        destination: SocketAddr::new(ip(dst)?, port(dport)?),
    })
}

/// A decimal port, digits only (no sign, no leading zero).
fn port(s: &str) -> Result<u16, ProxyError> {
    let digits = !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits || (s.len() > 1 && s.starts_with('0')) {
        return Err(ProxyError::Malformed("bad port"));
    }
    s.parse().map_err(|_| ProxyError::Malformed("bad port"))
}

fn parse_v2(input: &[u8]) -> Result<Parsed, ProxyError> {
    let n = input.len().min(V2_SIGNATURE.len());
    if input[..n] != V2_SIGNATURE[..n] {
        return Err(ProxyError::Missing);
    }
    let Some(fixed) = input.first_chunk::<V2_FIXED>() else {
        return Ok(Parsed::NeedMore);
    };
    let (version, command) = (fixed[12] >> 4, fixed[12] & 0x0f);
    if version != 2 {
        return Err(ProxyError::Unsupported(
            "version 2 signature with another version",
        ));
    }
    let block_len = usize::from(u16::from_be_bytes([fixed[14], fixed[15]]));
    if block_len > MAX_V2_BLOCK {
        return Err(ProxyError::TooLong);
    }
    let local = match command {
        0 => true,
        1 => false,
        _ => {
            return Err(ProxyError::Unsupported(
                "version 2 command not LOCAL or PROXY",
            ))
        }
    };
    let len = V2_FIXED + block_len;
    let Some(block) = input.get(V2_FIXED..len) else {
        return Ok(Parsed::NeedMore);
    };
    if local {
        // LOCAL: the family and block are to be ignored (the
        // specification's words), the real peer is the client.
        return Ok(Parsed::Done {
            header: Header::Local,
            len,
        });
    }
    let header = match fixed[13] {
        // UNSPEC: no addresses.
        0x00 => Header::Local,
        // TCP over IPv4, TCP over IPv6.
        0x11 => {
            let a = block
                .first_chunk::<12>()
                .ok_or(ProxyError::Malformed("address block too short for IPv4"))?;
            let ip = |o: usize| Ipv4Addr::new(a[o], a[o + 1], a[o + 2], a[o + 3]);
            let port = |o: usize| u16::from_be_bytes([a[o], a[o + 1]]);
            Header::Proxied {
                source: SocketAddr::new(ip(0).into(), port(8)),
                destination: SocketAddr::new(ip(4).into(), port(10)),
            }
        }
        0x21 => {
            let a = block
                .first_chunk::<36>()
                .ok_or(ProxyError::Malformed("address block too short for IPv6"))?;
            let ip = |o: usize| {
                let mut b = [0u8; 16];
                b.copy_from_slice(&a[o..o + 16]);
                Ipv6Addr::from(b)
            };
            let port = |o: usize| u16::from_be_bytes([a[o], a[o + 1]]);
            Header::Proxied {
                source: SocketAddr::new(ip(0).into(), port(32)),
                destination: SocketAddr::new(ip(16).into(), port(34)),
            }
        }
        // A Unix socket stream: no IP address to use.
        0x31 => Header::Local,
        _ => {
            return Err(ProxyError::Unsupported(
                "version 2 family/transport not TCP",
            ))
        }
    };
    Ok(Parsed::Done { header, len })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every prefix shorter than the header needs more (or is already the
    /// whole input's error); from the header's end on, the answer is the
    /// same as for the whole input.
    fn check_prefixes(input: &[u8]) -> Result<Parsed, ProxyError> {
        let whole = parse(input);
        let decided_at = match whole {
            Ok(Parsed::Done { len, .. }) => len,
            _ => input.len(),
        };
        for k in 0..input.len() {
            let p = parse(&input[..k]);
            if k < decided_at {
                assert!(
                    p == Ok(Parsed::NeedMore) || (p == whole && whole.is_err()),
                    "prefix {k} of {input:?}: {p:?}, whole: {whole:?}"
                );
            } else {
                assert_eq!(p, whole, "prefix {k} of {input:?}");
            }
        }
        whole
    }

    fn done(input: &[u8]) -> (Header, usize) {
        match check_prefixes(input) {
            Ok(Parsed::Done { header, len }) => (header, len),
            other => panic!("{input:?}: {other:?}"),
        }
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn v2(command: u8, family: u8, block: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(0x20 | command);
        h.push(family);
        h.extend_from_slice(&(block.len() as u16).to_be_bytes());
        h.extend_from_slice(block);
        h
    }

    fn v4_block() -> Vec<u8> {
        let mut b = vec![192, 0, 2, 7, 127, 0, 0, 1];
        b.extend_from_slice(&40000u16.to_be_bytes());
        b.extend_from_slice(&25u16.to_be_bytes());
        b
    }

    #[test]
    fn v1_tcp4_split_at_every_byte_keeps_what_follows() {
        let input = b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 25\r\nEHLO x\r\n";
        let (h, len) = done(input);
        assert_eq!(
            h,
            Header::Proxied {
                source: sa("192.0.2.7:40000"),
                destination: sa("127.0.0.1:25")
            }
        );
        assert_eq!(&input[len..], b"EHLO x\r\n");
    }

    #[test]
    fn v1_tcp6_and_unknown() {
        let (h, _) = done(b"PROXY TCP6 2001:db8::7 ::1 65535 0\r\n");
        assert_eq!(
            h,
            Header::Proxied {
                source: sa("[2001:db8::7]:65535"),
                destination: sa("[::1]:0")
            }
        );
        assert_eq!(done(b"PROXY UNKNOWN\r\n"), (Header::Local, 15));
        let junk = b"PROXY UNKNOWN ffff::1 whatever 1 2\r\n";
        assert_eq!(done(junk), (Header::Local, junk.len()));
    }

    #[test]
    fn v1_longest_allowed_and_one_more() {
        // 107 octets exactly: the longest line the specification allows.
        let max = b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
        assert_eq!(max.len(), MAX_V1);
        assert_eq!(done(max), (Header::Local, MAX_V1));
        let tcp6 = [&b"PROXY TCP6"[..], &max[13..]].concat();
        assert!(matches!(done(&tcp6).0, Header::Proxied { .. }));
        let mut long = b"PROXY UNKNOWN ".to_vec();
        long.resize(MAX_V1 - 1, b'x');
        long.extend_from_slice(b"\r\n");
        assert_eq!(check_prefixes(&long), Err(ProxyError::TooLong));
        // Without any line end the answer comes at 107 octets, not later.
        let endless = vec![b'P'; 1];
        let mut endless = [endless, b"ROXY UNKNOWN ".to_vec()].concat();
        endless.resize(MAX_V1, b'x');
        assert_eq!(parse(&endless), Err(ProxyError::TooLong));
        assert_eq!(parse(&endless[..MAX_V1 - 1]), Ok(Parsed::NeedMore));
    }

    #[test]
    fn v1_malformed() {
        for bad in [
            &b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 25\n"[..],
            b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 25\rX",
            b"PROXY TCP4 192.0.2.7 127.0.0.1 40000\r\n",
            b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 25 9\r\n",
            b"PROXY TCP4 192.0.2.7  127.0.0.1 40000 25\r\n",
            b"PROXY TCP4 2001:db8::1 127.0.0.1 40000 25\r\n",
            b"PROXY TCP6 192.0.2.7 ::1 40000 25\r\n",
            b"PROXY TCP4 192.0.2.7 127.0.0.1 +4000 25\r\n",
            b"PROXY TCP4 192.0.2.7 127.0.0.1 040000 25\r\n",
            b"PROXY TCP4 192.0.2.7 127.0.0.1 65536 25\r\n",
            b"PROXY TCP4 192.0.2.7 127.0.0.1 -1 25\r\n",
            b"PROXY TCP4 192.0.2.07 127.0.0.1 4000 25\r\n",
            b"PROXY TCP4 192.0.2.7 127.0.0.1 4000 25 \r\n",
            b"PROXY TCP4 \xff.0.2.7 127.0.0.1 4000 25\r\n",
        ] {
            assert!(
                matches!(check_prefixes(bad), Err(ProxyError::Malformed(_))),
                "{:?}: {:?}",
                String::from_utf8_lossy(bad),
                parse(bad)
            );
        }
        for bad in [&b"PROXY UDP4 1.2.3.4 1.2.3.4 1 2\r\n"[..], b"PROXY \r\n"] {
            assert!(matches!(
                check_prefixes(bad),
                Err(ProxyError::Unsupported(_))
            ));
        }
    }

    #[test]
    fn not_a_header_is_missing_at_the_first_wrong_octet() {
        assert_eq!(parse(b""), Ok(Parsed::NeedMore));
        assert_eq!(parse(b"EHLO x\r\n"), Err(ProxyError::Missing));
        assert_eq!(parse(b"PROX"), Ok(Parsed::NeedMore));
        assert_eq!(parse(b"PROXZ"), Err(ProxyError::Missing));
        assert_eq!(parse(b"PROXY"), Ok(Parsed::NeedMore));
        assert_eq!(parse(b"\r\n\r\n"), Ok(Parsed::NeedMore));
        assert_eq!(parse(b"\r\nEHLO"), Err(ProxyError::Missing));
        assert_eq!(parse(b"\x16\x03\x01"), Err(ProxyError::Missing));
    }

    #[test]
    fn v2_tcp4_split_at_every_byte_keeps_what_follows() {
        let mut input = v2(1, 0x11, &v4_block());
        input.extend_from_slice(b"\x16\x03\x01 a ClientHello");
        let (h, len) = done(&input);
        assert_eq!(
            h,
            Header::Proxied {
                source: sa("192.0.2.7:40000"),
                destination: sa("127.0.0.1:25")
            }
        );
        assert_eq!(len, 28);
        assert_eq!(&input[len..], b"\x16\x03\x01 a ClientHello");
    }

    #[test]
    fn v2_tcp6_with_tlvs_skipped() {
        let mut block = Vec::new();
        block.extend_from_slice(&"2001:db8::7".parse::<Ipv6Addr>().unwrap().octets());
        block.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        block.extend_from_slice(&[0x9c, 0x40, 0x00, 0x19]);
        // PP2_TYPE_CRC32C and PP2_TYPE_NOOP.
        block.extend_from_slice(&[0x03, 0x00, 0x04, 1, 2, 3, 4, 0x04, 0x00, 0x02, 0, 0]);
        let input = v2(1, 0x21, &block);
        let (h, len) = done(&input);
        assert_eq!(len, input.len());
        assert_eq!(
            h,
            Header::Proxied {
                source: sa("[2001:db8::7]:40000"),
                destination: sa("[::1]:25")
            }
        );
    }

    #[test]
    fn v2_local_unspec_and_unix_use_the_real_peer() {
        // LOCAL ignores family and block, whatever they hold.
        assert_eq!(done(&v2(0, 0x00, &[])), (Header::Local, 16));
        assert_eq!(done(&v2(0, 0x11, &[1, 2, 3])), (Header::Local, 19));
        assert_eq!(done(&v2(1, 0x00, &[])).0, Header::Local);
        assert_eq!(done(&v2(1, 0x31, &[0; 216])).0, Header::Local);
    }

    #[test]
    fn v2_malformed_and_unsupported() {
        assert!(matches!(
            check_prefixes(&v2(1, 0x11, &v4_block()[..11])),
            Err(ProxyError::Malformed(_))
        ));
        assert!(matches!(
            check_prefixes(&v2(1, 0x21, &[0; 35])),
            Err(ProxyError::Malformed(_))
        ));
        for family in [0x12, 0x22, 0x32, 0x10, 0x41, 0x01] {
            assert!(matches!(
                check_prefixes(&v2(1, family, &v4_block())),
                Err(ProxyError::Unsupported(_))
            ));
        }
        let mut bad_command = v2(1, 0x11, &v4_block());
        bad_command[12] = 0x22;
        assert!(matches!(
            check_prefixes(&bad_command),
            Err(ProxyError::Unsupported(_))
        ));
        let mut bad_version = v2(1, 0x11, &v4_block());
        bad_version[12] = 0x11;
        assert!(matches!(
            check_prefixes(&bad_version),
            Err(ProxyError::Unsupported(_))
        ));
    }

    #[test]
    fn v2_block_length_is_capped_before_it_is_read() {
        let ok = v2(
            1,
            0x11,
            &[v4_block(), vec![0x04, 0x03, 0xf1], vec![0; 1009]].concat(),
        );
        assert_eq!(ok.len(), MAX_HEADER);
        assert_eq!(done(&ok).1, MAX_HEADER);
        // One more octet announced: refused from the 16 fixed octets on.
        let mut big = V2_SIGNATURE.to_vec();
        big.extend_from_slice(&[0x21, 0x11]);
        big.extend_from_slice(&((MAX_V2_BLOCK + 1) as u16).to_be_bytes());
        assert_eq!(parse(&big[..15]), Ok(Parsed::NeedMore));
        assert_eq!(parse(&big), Err(ProxyError::TooLong));
        big[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
        assert_eq!(parse(&big), Err(ProxyError::TooLong));
    }
}
