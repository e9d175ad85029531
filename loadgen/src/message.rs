//! Test message content: address templates, message sizes, RFC 5322 message
//! generation and DATA dot-stuffing (RFC 5321 4.5.2).
//!
//! Owns what goes *inside* a mail transaction. A [`MessageFactory`] lives in
//! one worker (no sharing, no locks) and renders each message into a
//! caller-provided buffer so the hot path reuses allocations.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use mail_auth::common::crypto::{DkimKey, Ed25519Key, RsaKey, Sha256};
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::{Canonicalization, DkimSigner, Done};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::PrivateKeyDer;
use std::time::{SystemTime, UNIX_EPOCH};

/// Body line length before CRLF; RFC 5322 2.1.1 asks for at most 78.
const BODY_LINE: usize = 76;
/// Every this many body lines, one starts with `.` so DATA dot-stuffing is
/// exercised by every run instead of only by unit tests.
const DOT_LINE_EVERY: usize = 16;

/// An address template such as `loadgen{n}@localhost`: every `{n}` is
/// replaced with a counter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<String>,
}

impl Template {
    /// Renders the template for counter `n`, appending to `out`.
    pub fn render_into(&self, n: u64, out: &mut Vec<u8>) {
        for (i, part) in self.parts.iter().enumerate() {
            if i > 0 {
                push_u64(out, n);
            }
            out.extend_from_slice(part.as_bytes());
        }
    }

    /// Renders the template for counter `n` as a new string.
    #[cfg(test)]
    pub fn render(&self, n: u64) -> String {
        let mut out = Vec::new();
        self.render_into(n, &mut out);
        // invariant: parts are `&str` and the counter is ASCII digits.
        String::from_utf8(out).unwrap_or_default()
    }
}

impl FromStr for Template {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Err("empty address template".into());
        }
        if let Some(bad) = s
            .chars()
            .find(|c| c.is_whitespace() || c.is_control() || matches!(c, '<' | '>'))
        {
            return Err(format!("address template {s:?} contains {bad:?}"));
        }
        if !s.contains('@') {
            return Err(format!("address template {s:?} has no '@'"));
        }
        Ok(Template {
            parts: s.split("{n}").map(str::to_owned).collect(),
        })
    }
}

/// Message size: fixed, or uniformly distributed over an inclusive range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeSpec {
    Fixed(usize),
    Uniform { min: usize, max: usize },
}

impl SizeSpec {
    /// Draws a size (bytes of the message as the recipient sees it).
    pub fn sample(&self, rng: &mut Rng) -> usize {
        match *self {
            SizeSpec::Fixed(n) => n,
            SizeSpec::Uniform { min, max } => {
                let span = (max - min) as u64 + 1;
                min + (rng.next_u64() % span) as usize
            }
        }
    }

    /// The largest size this spec can draw.
    pub fn max(&self) -> usize {
        match *self {
            SizeSpec::Fixed(n) => n,
            SizeSpec::Uniform { max, .. } => max,
        }
    }
}

impl fmt::Display for SizeSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SizeSpec::Fixed(n) => write!(f, "{n}"),
            SizeSpec::Uniform { min, max } => write!(f, "{min}:{max}"),
        }
    }
}

/// Upper bound on `--size`, to keep a typo from allocating gigabytes.
pub const MAX_SIZE: usize = 64 << 20;

impl FromStr for SizeSpec {
    type Err = String;

    /// `1024`, `4k`, `1m` (binary units), or `MIN:MAX` for a uniform range.
    fn from_str(s: &str) -> Result<Self, String> {
        let spec = match s.split_once(':') {
            None => SizeSpec::Fixed(parse_bytes(s)?),
            Some((lo, hi)) => {
                let (min, max) = (parse_bytes(lo)?, parse_bytes(hi)?);
                if min > max {
                    return Err(format!("size range {s:?}: minimum above maximum"));
                }
                SizeSpec::Uniform { min, max }
            }
        };
        if spec.max() > MAX_SIZE {
            return Err(format!("size {s:?} above the limit of {MAX_SIZE} bytes"));
        }
        Ok(spec)
    }
}

fn parse_bytes(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, 'k' | 'K')) => (&t[..i], 1024),
        Some((i, 'm' | 'M')) => (&t[..i], 1024 * 1024),
        _ => (t, 1),
    };
    num.parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("invalid size {s:?} (expected e.g. 1024, 4k, 1m)"))
}

/// A small, fast PRNG (xorshift64*). Load shapes only; not cryptographic.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        // xorshift must not start at zero; mix the seed (SplitMix64 step).
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Rng((z ^ (z >> 31)) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Everything that identifies one message.
pub struct MessageSpec<'a> {
    /// Global message number, unique in the run.
    pub number: u64,
    pub from: &'a [u8],
    pub to: &'a [Vec<u8>],
}

/// Renders messages for one worker.
pub struct MessageFactory {
    size: SizeSpec,
    rng: Rng,
    /// Unique per run; part of every Message-ID.
    run_id: String,
    domain: String,
    /// Body lines, pre-rendered: `body[i]` is line `i` with its CRLF.
    body: Vec<u8>,
    date: DateCache,
    /// `--dkim-key`: signs every rendered message.
    signer: Option<DkimSigner<DkimKey, Done>>,
}

/// `--dkim-key DOMAIN:SELECTOR:PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DkimSpec {
    pub domain: String,
    pub selector: String,
    pub path: PathBuf,
}

impl FromStr for DkimSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.splitn(3, ':');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(d), Some(sel), Some(p)) if !d.is_empty() && !sel.is_empty() && !p.is_empty() => {
                Ok(DkimSpec {
                    domain: d.to_owned(),
                    selector: sel.to_owned(),
                    path: PathBuf::from(p),
                })
            }
            _ => Err(format!("--dkim-key {s:?}: expected DOMAIN:SELECTOR:PATH")),
        }
    }
}

impl DkimSpec {
    /// A signer over the headers loadgen writes (relaxed/relaxed, as most
    /// signers do), with the key read from the file (PKCS#8 or PKCS#1).
    pub fn signer(&self) -> Result<DkimSigner<DkimKey, Done>, String> {
        let pem = std::fs::read(&self.path)
            .map_err(|e| format!("--dkim-key {}: {e}", self.path.display()))?;
        let der = PrivateKeyDer::from_pem_slice(&pem)
            .map_err(|e| format!("--dkim-key {}: {e}", self.path.display()))?;
        let key = match RsaKey::<Sha256>::from_key_der(der.clone_key()) {
            Ok(k) => DkimKey::from(k),
            Err(_) => match &der {
                PrivateKeyDer::Pkcs8(k) => {
                    Ed25519Key::from_pkcs8_maybe_unchecked_der(k.secret_pkcs8_der())
                        .map(DkimKey::from)
                        .map_err(|e| format!("--dkim-key {}: {e}", self.path.display()))?
                }
                _ => {
                    return Err(format!(
                        "--dkim-key {}: not an RSA or Ed25519 key",
                        self.path.display()
                    ))
                }
            },
        };
        Ok(DkimSigner::from_key(key)
            .domain(self.domain.clone())
            .selector(self.selector.clone())
            .headers([
                "From",
                "To",
                "Subject",
                "Date",
                "Message-ID",
                "MIME-Version",
                "Content-Type",
            ])
            .header_canonicalization(Canonicalization::Relaxed)
            .body_canonicalization(Canonicalization::Relaxed))
    }
}

impl MessageFactory {
    pub fn new(size: SizeSpec, seed: u64, run_id: &str, domain: &str) -> Self {
        MessageFactory {
            size,
            rng: Rng::new(seed),
            run_id: run_id.to_owned(),
            domain: domain.to_owned(),
            body: body_block(size.max()),
            date: DateCache::default(),
            signer: None,
        }
    }

    /// Every message rendered from now on is DKIM-signed by `signer`.
    pub fn with_signer(mut self, signer: DkimSigner<DkimKey, Done>) -> Self {
        self.signer = Some(signer);
        self
    }

    /// Draws the size of the next message from the `--size` spec.
    pub fn draw_size(&mut self) -> usize {
        self.size.sample(&mut self.rng)
    }

    /// Renders one message (headers, blank line, body; CRLF line ends, no
    /// dot-stuffing) into `out`, replacing its contents. Its length is
    /// `target` (at most the spec's maximum), unless the headers alone are
    /// longer, plus the `DKIM-Signature` field in front under `--dkim-key`.
    /// The same `msg` and `target` always give the same length.
    pub fn render(&mut self, msg: &MessageSpec<'_>, target: usize, out: &mut Vec<u8>) {
        out.clear();
        let target = target.min(self.size.max());
        out.extend_from_slice(b"From: <");
        out.extend_from_slice(msg.from);
        out.extend_from_slice(b">\r\nTo: ");
        // Fold the recipient list one address per line (RFC 5322 2.2.3).
        for (i, rcpt) in msg.to.iter().enumerate() {
            if i > 0 {
                out.extend_from_slice(b",\r\n ");
            }
            out.push(b'<');
            out.extend_from_slice(rcpt);
            out.push(b'>');
        }
        out.extend_from_slice(b"\r\nSubject: ringmta-loadgen message ");
        push_u64(out, msg.number);
        out.extend_from_slice(b"\r\nDate: ");
        out.extend_from_slice(self.date.get().as_bytes());
        out.extend_from_slice(b"\r\nMessage-ID: <");
        out.extend_from_slice(self.run_id.as_bytes());
        out.push(b'.');
        push_u64(out, msg.number);
        out.push(b'@');
        out.extend_from_slice(self.domain.as_bytes());
        out.extend_from_slice(
            b">\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n",
        );
        append_body(out, target, &self.body);
        if let Some(signer) = &self.signer {
            // A signing failure (none is expected for a key that loaded)
            // leaves the message unsigned rather than stopping the run.
            if let Ok(sig) = signer.sign(out) {
                let header = sig.to_header();
                out.splice(0..0, header.bytes());
            }
        }
    }
}

/// Appends body lines to `out` until it is `target` bytes long (or one
/// minimal line, when the headers already reach `target`).
fn append_body(out: &mut Vec<u8>, target: usize, block: &[u8]) {
    const LINE: usize = BODY_LINE + 2;
    let want = target.saturating_sub(out.len());
    if want < 3 {
        // Too small for even one line: keep the message well formed.
        out.extend_from_slice(b"x\r\n");
        return;
    }
    let full = want / LINE;
    let rest = want % LINE;
    // invariant: `block` holds at least `size.max() / LINE + 1` lines.
    out.extend_from_slice(&block[..full * LINE]);
    match rest {
        0 => {}
        1 | 2 if full > 0 => {
            // Too short for its own line: lengthen the last full line (76
            // characters + up to 2 = 78, still within RFC 5322's limit).
            let crlf = out.len() - 2;
            out.truncate(crlf);
            out.extend(std::iter::repeat_n(b'=', rest));
            out.extend_from_slice(b"\r\n");
        }
        1 | 2 => out.extend_from_slice(b"x\r\n"),
        _ => {
            let start = full * LINE;
            out.extend_from_slice(&block[start..start + rest - 2]);
            out.extend_from_slice(b"\r\n");
        }
    }
}

/// Body text for messages up to `max` bytes: 76-character lines of printable
/// ASCII, every [`DOT_LINE_EVERY`]th starting with a dot.
fn body_block(max: usize) -> Vec<u8> {
    const LINE: usize = BODY_LINE + 2;
    let lines = max / LINE + 1;
    let mut out = Vec::with_capacity(lines * LINE);
    for i in 0..lines {
        let start = out.len();
        if i % DOT_LINE_EVERY == DOT_LINE_EVERY - 1 {
            out.extend_from_slice(b". dot-stuffed line ");
        } else {
            out.extend_from_slice(b"line ");
        }
        push_u64(&mut out, i as u64);
        out.push(b' ');
        let mut c = b'a' + (i % 26) as u8;
        while out.len() - start < BODY_LINE {
            out.push(c);
            c = if c == b'z' { b'a' } else { c + 1 };
        }
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Appends `msg` dot-stuffed (RFC 5321 4.5.2) followed by the end-of-data
/// marker `.CRLF`. `msg` must end in CRLF (as rendered messages do); if it
/// does not, a CRLF is added before the marker.
pub fn dot_stuff_into(msg: &[u8], out: &mut Vec<u8>) {
    out.reserve(msg.len() + msg.len() / 64 + 5);
    let mut line_start = true;
    let mut from = 0;
    for (i, &b) in msg.iter().enumerate() {
        if line_start && b == b'.' {
            out.extend_from_slice(&msg[from..i]);
            out.push(b'.');
            from = i;
        }
        line_start = b == b'\n';
    }
    out.extend_from_slice(&msg[from..]);
    if !msg.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
}

fn push_u64(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// RFC 5322 3.3 date of the current second, recomputed once per second.
#[derive(Default)]
struct DateCache {
    second: u64,
    text: String,
}

impl DateCache {
    fn get(&mut self) -> &str {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if self.text.is_empty() || now != self.second {
            self.second = now;
            self.text = rfc5322_date(now);
        }
        &self.text
    }
}

/// Formats seconds since the Unix epoch as `Thu, 01 Jan 1970 00:00:00 +0000`.
pub fn rfc5322_date(secs: u64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Civil-from-days (H. Hinnant), for days since 1970-01-01.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{}, {:02} {} {} {:02}:{:02}:{:02} +0000",
        DAYS[(days % 7) as usize],
        day,
        MONTHS[(month - 1) as usize],
        year,
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The signed message verifies (mail-auth, the key record given as its
    /// cache: no DNS).
    #[test]
    fn dkim_key_signs_every_message_verifiably() {
        use std::borrow::Borrow;
        use std::hash::Hash;
        use std::sync::Arc;

        use base64::Engine as _;
        use mail_auth::common::parse::TxtRecordParser;
        use mail_auth::common::verify::DomainKey;
        use mail_auth::{AuthenticatedMessage, DkimResult, MessageAuthenticator, Parameters};
        use mail_auth::{ResolverCache, Txt};

        struct One(Box<str>, Txt);
        impl ResolverCache<Box<str>, Txt> for One {
            fn get<Q>(&self, name: &Q) -> Option<Txt>
            where
                Box<str>: Borrow<Q>,
                Q: Hash + Eq + ?Sized,
            {
                (<Box<str> as Borrow<Q>>::borrow(&self.0) == name).then(|| self.1.clone())
            }
            fn remove<Q>(&self, _: &Q) -> Option<Txt>
            where
                Box<str>: Borrow<Q>,
                Q: Hash + Eq + ?Sized,
            {
                None
            }
            fn insert(&self, _: Box<str>, _: Txt, _: std::time::Instant) {}
        }

        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let dir = std::env::temp_dir().join(format!("loadgen-dkim-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ed.pem");
        std::fs::write(&path, key.serialize_pem()).unwrap();
        let spec: DkimSpec = format!("loadgen.test:ed:{}", path.display())
            .parse()
            .unwrap();
        let mut f = MessageFactory::new(SizeSpec::Fixed(3000), 7, "run1", "loadgen.test")
            .with_signer(spec.signer().unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
        let to = vec![b"r@x".to_vec()];
        let mut out = Vec::new();
        f.render(
            &MessageSpec {
                number: 1,
                from: b"a@loadgen.test",
                to: &to,
            },
            3000,
            &mut out,
        );
        assert!(out.starts_with(b"DKIM-Signature: "));

        let record = format!(
            "v=DKIM1; k=ed25519; p={}",
            base64::engine::general_purpose::STANDARD.encode(key.public_key_raw())
        );
        let dk = DomainKey::parse(record.as_bytes()).unwrap();
        let cache = One(
            "ed._domainkey.loadgen.test.".into(),
            Txt::DomainKey(Arc::new(dk)),
        );
        let auth = MessageAuthenticator::new_cloudflare().unwrap();
        let msg = AuthenticatedMessage::parse(&out).unwrap();
        let results = futures_lite::future::block_on(
            auth.verify_dkim(Parameters::new(&msg).with_txt_cache(&cache)),
        );
        assert_eq!(results.len(), 1);
        assert_eq!(results[0].result(), &DkimResult::Pass);
        // Changed after signing, it does not verify: the check can fail.
        let mut bad = out.clone();
        let n = bad.len();
        bad[n - 3] ^= 1;
        let msg = AuthenticatedMessage::parse(&bad).unwrap();
        let results = futures_lite::future::block_on(
            auth.verify_dkim(Parameters::new(&msg).with_txt_cache(&cache)),
        );
        assert_ne!(results[0].result(), &DkimResult::Pass);
    }

    fn render(size: SizeSpec, rcpts: &[&[u8]]) -> Vec<u8> {
        let mut f = MessageFactory::new(size, 7, "run1", "loadgen.test");
        let to: Vec<Vec<u8>> = rcpts.iter().map(|r| r.to_vec()).collect();
        let mut out = Vec::new();
        let target = f.draw_size();
        f.render(
            &MessageSpec {
                number: 42,
                from: b"a@b",
                to: &to,
            },
            target,
            &mut out,
        );
        out
    }

    fn lines(msg: &[u8]) -> Vec<&[u8]> {
        assert!(msg.ends_with(b"\r\n"));
        msg.split_inclusive(|&b| b == b'\n')
            .map(|l| l.strip_suffix(b"\r\n").expect("every line ends in CRLF"))
            .collect()
    }

    #[test]
    fn template_replaces_every_counter() {
        let t: Template = "u{n}x{n}@d".parse().unwrap();
        assert_eq!(t.render(17), "u17x17@d");
        let plain: Template = "fixed@d".parse().unwrap();
        assert_eq!(plain.render(3), "fixed@d");
        assert!("a b@c".parse::<Template>().is_err());
        assert!("<a@c>".parse::<Template>().is_err());
        assert!("nodomain".parse::<Template>().is_err());
    }

    #[test]
    fn size_parsing() {
        assert_eq!("1024".parse(), Ok(SizeSpec::Fixed(1024)));
        assert_eq!("4k".parse(), Ok(SizeSpec::Fixed(4096)));
        assert_eq!(
            "1k:64K".parse(),
            Ok(SizeSpec::Uniform {
                min: 1024,
                max: 65536
            })
        );
        assert!("2k:1k".parse::<SizeSpec>().is_err());
        assert!("x".parse::<SizeSpec>().is_err());
        assert!("1g".parse::<SizeSpec>().is_err());
        assert!("100m".parse::<SizeSpec>().is_err());
    }

    #[test]
    fn uniform_sizes_stay_in_range() {
        let spec = SizeSpec::Uniform { min: 10, max: 20 };
        let mut rng = Rng::new(1);
        let mut seen = [false; 11];
        for _ in 0..1000 {
            let s = spec.sample(&mut rng);
            assert!((10..=20).contains(&s));
            seen[s - 10] = true;
        }
        assert!(seen.iter().all(|&s| s));
    }

    #[test]
    fn messages_have_exact_size_and_valid_lines() {
        for size in (300..700).chain([1024, 4096, 65_536, 100_003]) {
            let msg = render(SizeSpec::Fixed(size), &[b"r1@x", b"r2@x"]);
            assert_eq!(msg.len(), size, "size {size}");
            for line in lines(&msg) {
                assert!(line.len() <= 78, "line {:?}", String::from_utf8_lossy(line));
                assert!(!line.contains(&b'\r') && !line.contains(&b'\n'));
            }
        }
    }

    #[test]
    fn message_headers() {
        let msg = render(SizeSpec::Fixed(2000), &[b"r1@x", b"r2@x"]);
        let text = String::from_utf8(msg).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("From: <a@b>\r\nTo: <r1@x>,\r\n <r2@x>\r\n"));
        assert!(head.contains("\r\nSubject: ringmta-loadgen message 42\r\n"));
        assert!(head.contains("\r\nMessage-ID: <run1.42@loadgen.test>\r\n"));
        assert!(head.contains("\r\nDate: "));
        assert!(body.contains("\r\n. dot-stuffed line"));
    }

    #[test]
    fn tiny_size_still_well_formed() {
        let msg = render(SizeSpec::Fixed(1), &[b"r@x"]);
        assert!(msg.ends_with(b"\r\n\r\nx\r\n"));
    }

    #[test]
    fn dot_stuffing() {
        let mut out = Vec::new();
        dot_stuff_into(b".a\r\nb.\r\n..c\r\n.\r\n", &mut out);
        assert_eq!(out, b"..a\r\nb.\r\n...c\r\n..\r\n.\r\n");
        out.clear();
        dot_stuff_into(b"no final newline", &mut out);
        assert_eq!(out, b"no final newline\r\n.\r\n");
        out.clear();
        dot_stuff_into(b"", &mut out);
        assert_eq!(out, b"\r\n.\r\n");
    }

    #[test]
    fn dot_stuffing_round_trips() {
        let msg = render(SizeSpec::Fixed(10_000), &[b"r@x"]);
        let mut wire = Vec::new();
        dot_stuff_into(&msg, &mut wire);
        let body = wire.strip_suffix(b".\r\n").unwrap();
        let mut unstuffed = Vec::new();
        for line in body.split_inclusive(|&b| b == b'\n') {
            unstuffed.extend_from_slice(line.strip_prefix(b".").unwrap_or(line));
        }
        assert_eq!(unstuffed, msg);
        assert!(wire.len() > msg.len() + 3, "stuffing happened");
    }

    #[test]
    fn dates() {
        assert_eq!(rfc5322_date(0), "Thu, 01 Jan 1970 00:00:00 +0000");
        assert_eq!(rfc5322_date(951_782_400), "Tue, 29 Feb 2000 00:00:00 +0000");
        assert_eq!(
            rfc5322_date(1_700_000_000),
            "Tue, 14 Nov 2023 22:13:20 +0000"
        );
    }
}
