//! DKIM signing of submitted and trusted mail (RFC 6376; Ed25519 per RFC 8463): the
//! `--dkim-key DOMAIN:SELECTOR:PATH` keys, which of them sign a message, the
//! `DKIM-Signature:` fields, and the key pairs `ringmta dkim-keygen` makes.
//!
//! Keys are PEM private keys (PKCS#8, or PKCS#1 for RSA); the algorithm
//! follows from the key: RSA signs `rsa-sha256`, Ed25519 `ed25519-sha256`.
//! Every key of a domain signs (an RSA and an Ed25519 key for one domain
//! give the two signatures RFC 8463 3 suggests). Keys load at start (one
//! that does not load stops the start) and again on SIGHUP, where a key that
//! does not load keeps its old version, like the users file.
//!
//! Signing canonicalizes and hashes the whole message and, for RSA, costs a
//! millisecond or two of CPU: [`sign_all`] must never run on a shard thread
//! (the connection driver calls it on the signing pool, [`crate::blocking`]).
//!
//! A signature vouches for its domain: [`plan`] signs only for a domain
//! taken from an author address (From, else Sender) the login may send as,
//! by the same rule as the envelope sender, and signs nothing when another
//! author address is at a domain with a key (`--dkim-from-mismatch` then
//! refuses the message or stores it unsigned). With
//! `--dkim-relay-network on`, mail from `--relay-network` clients on the
//! relay port and mail injected over HTTP (trusted sources without a
//! login) is signed for its first author domain with keys. This module
//! only ever *adds* fields in front of a message; it must never rewrite
//! one, and never see other mail from the relay port, which stays
//! byte-exact.

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use base64::Engine as _;
use mail_auth::common::crypto::{DkimKey, Ed25519Key, RsaKey, Sha256};
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::{Canonicalization, DkimSigner, Done};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::PrivateKeyDer;
use thiserror::Error;

use crate::smtp::submit::{self, Authors};

/// The header fields a signature covers: who wrote it and to whom, what it
/// is about, when, which thread, and how the body is to be read (RFC 6376
/// 5.4.1). `Received:` and the like, which relays add on the way, are left
/// out. Each name is in `h=` whether the message has the field or not: an
/// absent one is signed as absent, so nobody can add it on the way without
/// breaking the signature (RFC 6376 8.15).
pub const SIGNED_HEADERS: &[&str] = &[
    "From",
    "Sender",
    "Reply-To",
    "To",
    "Cc",
    "Subject",
    "Date",
    "Message-ID",
    "In-Reply-To",
    "References",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
];

/// `--dkim-from-mismatch`: what becomes of submitted mail whose `From:`
/// or `Sender:` is at a domain with a key but is not an address the login
/// may send as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FromMismatch {
    /// `550 5.7.1` at the end of the content: the user learns at once.
    Reject,
    /// Stored without any signature: the domain's DMARC policy decides.
    Unsigned,
}

/// Whether and with which keys a submitted message is signed.
#[derive(Debug)]
pub enum Plan {
    /// With these keys (all of one domain, the first author domain with
    /// keys).
    Sign(Vec<Arc<Signer>>),
    /// No author is at a domain with a key (or there is no From at all).
    Unsigned,
    /// An author at a domain with a key is not the login's to use (or the
    /// fields cannot be read and name such a domain): never signed; what
    /// happens is `--dkim-from-mismatch`'s. The offending address or the
    /// reason.
    Mismatch(String),
}

/// Which keys may sign a message with these `authors` for a login that may
/// send as `may_send_as` allows: only keys of a domain taken from an
/// address the login may use, and none at all when any author address at a
/// domain with keys is not the login's (a signature for its own domain on
/// a message From someone else's signed domain would still vouch for the
/// forgery). When the fields cannot be read, nothing is signed.
pub fn plan(
    signers: &[Arc<Signer>],
    authors: &Authors,
    may_send_as: impl Fn(&str) -> bool,
) -> Plan {
    if signers.is_empty() {
        return Plan::Unsigned;
    }
    let keyed = |domain: &str| signers.iter().any(|s| s.domain == domain);
    match authors {
        Authors::NoFrom => return Plan::Unsigned,
        Authors::Doubtful { reason, raw } => {
            return if signers.iter().any(|s| raw.contains(s.domain.as_str())) {
                Plan::Mismatch((*reason).to_owned())
            } else {
                Plan::Unsigned
            };
        }
        Authors::Parsed { .. } => {}
    }
    let mut chosen = None;
    for addr in authors.addresses() {
        let Some(domain) = submit::domain_of(addr).filter(|d| keyed(d)) else {
            continue;
        };
        if !may_send_as(addr) {
            return Plan::Mismatch(addr.to_owned());
        }
        chosen.get_or_insert(domain);
    }
    match chosen {
        Some(d) => Plan::Sign(signers.iter().filter(|s| s.domain == d).cloned().collect()),
        None => Plan::Unsigned,
    }
}

/// One `--dkim-key DOMAIN:SELECTOR:PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySpec {
    /// Lower case.
    pub domain: String,
    pub selector: String,
    pub path: PathBuf,
}

/// The value parser of `--dkim-key`: `DOMAIN:SELECTOR:PATH` (the path may
/// itself contain `:`).
pub fn parse_key_spec(s: &str) -> Result<KeySpec, String> {
    let mut parts = s.splitn(3, ':');
    let (Some(domain), Some(selector), Some(path)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(format!("{s:?}: expected DOMAIN:SELECTOR:PATH"));
    };
    KeySpec::new(domain, selector, Path::new(path))
}

impl KeySpec {
    /// Checks the names: a domain, and a selector of DNS labels.
    pub fn new(domain: &str, selector: &str, path: &Path) -> Result<KeySpec, String> {
        if !is_dns_name(domain) {
            return Err(format!("{domain:?} is not a domain name"));
        }
        if !is_dns_name(selector) {
            return Err(format!(
                "selector {selector:?}: expected DNS labels (letters, digits, '-', '.')"
            ));
        }
        if path.as_os_str().is_empty() {
            return Err("the key file path is empty".into());
        }
        Ok(KeySpec {
            domain: domain.to_ascii_lowercase(),
            selector: selector.to_owned(),
            path: path.to_owned(),
        })
    }
}

#[derive(Debug, Error)]
pub enum DkimError {
    #[error("cannot read DKIM key {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("DKIM key {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("DKIM signing for {domain} failed: {reason}")]
    Sign { domain: String, reason: String },
    #[error("cannot generate the key: {0}")]
    Generate(String),
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
}

/// The signature algorithm, which the key decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KeyAlgorithm {
    Rsa,
    Ed25519,
}

impl KeyAlgorithm {
    /// The `a=` tag's name.
    pub fn signature_name(self) -> &'static str {
        match self {
            KeyAlgorithm::Rsa => "rsa-sha256",
            KeyAlgorithm::Ed25519 => "ed25519-sha256",
        }
    }

    /// The DNS record's `k=` tag.
    pub fn key_type(self) -> &'static str {
        match self {
            KeyAlgorithm::Rsa => "rsa",
            KeyAlgorithm::Ed25519 => "ed25519",
        }
    }
}

/// One loaded key, ready to sign for its domain and selector.
pub struct Signer {
    domain: String,
    selector: String,
    algorithm: KeyAlgorithm,
    signer: DkimSigner<DkimKey, Done>,
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signer")
            .field("domain", &self.domain)
            .field("selector", &self.selector)
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// Reads and parses the key file of `spec`.
    pub fn load(spec: &KeySpec) -> Result<Signer, DkimError> {
        let pem = fs::read(&spec.path).map_err(|source| DkimError::Read {
            path: spec.path.clone(),
            source,
        })?;
        Signer::from_pem(&spec.domain, &spec.selector, &pem).map_err(|reason| DkimError::Key {
            path: spec.path.clone(),
            reason,
        })
    }

    /// A signer from a PEM private key; the algorithm is the key's.
    pub fn from_pem(domain: &str, selector: &str, pem: &[u8]) -> Result<Signer, String> {
        let (algorithm, key) = parse_private_key(pem)?;
        let signer = DkimSigner::from_key(key)
            .domain(domain)
            .selector(selector)
            .headers(SIGNED_HEADERS.iter().copied())
            .header_canonicalization(Canonicalization::Relaxed)
            .body_canonicalization(Canonicalization::Relaxed);
        Ok(Signer {
            domain: domain.to_owned(),
            selector: selector.to_owned(),
            algorithm,
            signer,
        })
    }

    pub fn domain(&self) -> &str {
        &self.domain
    }

    pub fn selector(&self) -> &str {
        &self.selector
    }

    pub fn algorithm(&self) -> KeyAlgorithm {
        self.algorithm
    }

    /// The `DKIM-Signature:` field (folded, CRLF-terminated) for the
    /// message made of `parts` in order. CPU-bound: not on a shard thread.
    pub fn sign(&self, parts: &[&[u8]]) -> Result<String, DkimError> {
        self.signer
            .sign_chained(parts.iter().copied())
            .map(|s| s.to_header())
            .map_err(|e| DkimError::Sign {
                domain: self.domain.clone(),
                reason: e.to_string(),
            })
    }
}

/// Every signature for the message made of `parts`, in `signers` order, as
/// the block of fields to put in front of it. CPU-bound: not on a shard
/// thread.
pub fn sign_all(signers: &[Arc<Signer>], parts: &[&[u8]]) -> Result<Vec<u8>, DkimError> {
    let mut out = Vec::new();
    for s in signers {
        out.extend_from_slice(s.sign(parts)?.as_bytes());
    }
    Ok(out)
}

/// The keys in force, swapped whole on reload.
pub struct DkimStore {
    /// Replaced (with the signers) by a SIGHUP that changes `--dkim-key`.
    specs: ArcSwap<Vec<KeySpec>>,
    /// One per spec, in the same order.
    signers: ArcSwap<Vec<Arc<Signer>>>,
}

impl fmt::Debug for DkimStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DkimStore")
            .field("specs", &self.specs)
            .finish_non_exhaustive()
    }
}

impl DkimStore {
    /// Loads every key; the first that does not load is the error.
    pub fn load(specs: Vec<KeySpec>) -> Result<DkimStore, DkimError> {
        let signers = specs
            .iter()
            .map(|s| Signer::load(s).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        for s in &signers {
            tracing::info!(
                domain = %s.domain,
                selector = %s.selector,
                algorithm = s.algorithm.signature_name(),
                "DKIM key loaded"
            );
        }
        Ok(DkimStore {
            specs: ArcSwap::from_pointee(specs),
            signers: ArcSwap::from_pointee(signers),
        })
    }

    /// SIGHUP: re-reads every key file. A key that does not load keeps its
    /// old version; its error is returned (the others are reloaded).
    pub fn reload(&self) -> Vec<DkimError> {
        let old = self.signers.load();
        let specs = self.specs.load();
        let mut errors = Vec::new();
        let signers = specs
            .iter()
            .zip(old.iter())
            .map(|(spec, old)| match Signer::load(spec) {
                Ok(s) => Arc::new(s),
                Err(e) => {
                    errors.push(e);
                    old.clone()
                }
            })
            .collect();
        self.signers.store(Arc::new(signers));
        errors
    }

    /// A new list of keys (SIGHUP): all load, or nothing changes and the
    /// first error is returned.
    pub fn replace(&self, specs: Vec<KeySpec>) -> Result<usize, DkimError> {
        let signers = specs
            .iter()
            .map(|s| Signer::load(s).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        let n = signers.len();
        // The signal thread is the only writer: no reload runs in between.
        self.signers.store(Arc::new(signers));
        self.specs.store(Arc::new(specs));
        Ok(n)
    }

    /// The keys configured.
    pub fn specs(&self) -> Arc<Vec<KeySpec>> {
        self.specs.load_full()
    }

    /// How many keys are configured.
    pub fn len(&self) -> usize {
        self.specs.load().len()
    }

    pub fn is_empty(&self) -> bool {
        self.specs.load().is_empty()
    }

    /// The keys in force.
    pub fn signers(&self) -> Arc<Vec<Arc<Signer>>> {
        self.signers.load_full()
    }
}

/// A new key pair from `ringmta dkim-keygen`.
#[derive(Debug)]
pub struct GeneratedKey {
    pub algorithm: KeyAlgorithm,
    /// The private key, PKCS#8 PEM (what `--dkim-key` reads).
    pub private_pem: String,
    /// The `p=` value: base64 of the SubjectPublicKeyInfo (RSA, as
    /// OpenDKIM and OpenSSL publish it) or of the raw 32-byte key (Ed25519,
    /// RFC 8463 4).
    pub public_b64: String,
}

/// RSA key sizes ring signs with.
pub const RSA_BITS: std::ops::RangeInclusive<usize> = 2048..=4096;

/// Generates a key pair; `bits` is for RSA only. The private key is loaded
/// back before it is returned, so what is written is known to sign.
pub fn generate(algorithm: KeyAlgorithm, bits: usize) -> Result<GeneratedKey, DkimError> {
    let (pkcs8, public) = match algorithm {
        KeyAlgorithm::Rsa => generate_rsa(bits)?,
        KeyAlgorithm::Ed25519 => {
            let v2 =
                Ed25519Key::generate_pkcs8().map_err(|e| DkimError::Generate(e.to_string()))?;
            let pkcs8 = ed25519_pkcs8_v1(&v2)
                .ok_or_else(|| DkimError::Generate("unexpected Ed25519 PKCS#8 from ring".into()))?;
            let key = Ed25519Key::from_pkcs8_maybe_unchecked_der(&pkcs8)
                .map_err(|e| DkimError::Generate(e.to_string()))?;
            (pkcs8, key.public_key())
        }
    };
    let private_pem = pem_encode("PRIVATE KEY", &pkcs8);
    Signer::from_pem("check.invalid", "check", private_pem.as_bytes())
        .map_err(DkimError::Generate)?;
    Ok(GeneratedKey {
        algorithm,
        private_pem,
        public_b64: base64::engine::general_purpose::STANDARD.encode(public),
    })
}

impl GeneratedKey {
    /// The record's text: `v=DKIM1; k=...; p=...`.
    pub fn txt_value(&self) -> String {
        format!(
            "v=DKIM1; k={}; p={}",
            self.algorithm.key_type(),
            self.public_b64
        )
    }

    /// The DNS record in zone-file syntax, on one line. The text is split
    /// into quoted strings of at most 255 octets (RFC 1035 3.3.14: a
    /// 2048-bit RSA key does not fit one); verifiers join them (RFC 6376
    /// 3.6.2.2).
    pub fn dns_record(&self, domain: &str, selector: &str) -> String {
        let value = self.txt_value();
        let strings: Vec<String> = value
            .as_bytes()
            .chunks(255)
            // invariant: the value is ASCII (tags and base64).
            .map(|c| format!("\"{}\"", String::from_utf8_lossy(c)))
            .collect();
        format!(
            "{selector}._domainkey.{}. IN TXT {}",
            domain.trim_end_matches('.'),
            strings.join(" ")
        )
    }
}

/// Writes a private key readable by its owner only (mode 0600), refusing to
/// replace an existing file (it may be the key in use), and syncs it.
pub fn write_private_key(path: &Path, pem: &str) -> Result<(), DkimError> {
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| DkimError::Write {
        path: path.to_owned(),
        source,
    };
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(err)?;
    f.write_all(pem.as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)
}

fn generate_rsa(bits: usize) -> Result<(Vec<u8>, Vec<u8>), DkimError> {
    use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey};
    if !RSA_BITS.contains(&bits) || !bits.is_multiple_of(8) {
        return Err(DkimError::Generate(format!(
            "--bits {bits}: RSA keys must be {}..={} bits, a multiple of 8",
            RSA_BITS.start(),
            RSA_BITS.end()
        )));
    }
    let gen = |e: &dyn fmt::Display| DkimError::Generate(e.to_string());
    let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, bits).map_err(|e| gen(&e))?;
    let private = key.to_pkcs8_der().map_err(|e| gen(&e))?;
    let public = key
        .to_public_key()
        .to_public_key_der()
        .map_err(|e| gen(&e))?;
    Ok((private.as_bytes().to_vec(), public.as_bytes().to_vec()))
}

/// ring makes PKCS#8 v2 (RFC 5958, the public key included), which OpenSSL
/// 3.0 refuses to read; the v1 form (RFC 8410 7: version 0, the private key
/// only) is what `openssl genpkey` writes and every tool reads.
fn ed25519_pkcs8_v1(v2: &[u8]) -> Option<Vec<u8>> {
    let (0x30, info, _) = der_item(v2)? else {
        return None;
    };
    let (0x02, _, rest) = der_item(info)? else {
        return None;
    };
    let (0x30, _, rest) = der_item(rest)? else {
        return None;
    };
    // privateKey: OCTET STRING { OCTET STRING (32-octet seed) }.
    let (0x04, private_key, _) = der_item(rest)? else {
        return None;
    };
    if private_key.len() != 34 || private_key[..2] != [0x04, 0x20] {
        return None;
    }
    let mut v1 = vec![
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22,
    ];
    v1.extend_from_slice(private_key);
    Some(v1)
}

/// `-----BEGIN label-----`, base64 in 64-column lines, `-----END label-----`.
fn pem_encode(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        // invariant: base64 is ASCII.
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// The first private key in `pem`, with its algorithm.
fn parse_private_key(pem: &[u8]) -> Result<(KeyAlgorithm, DkimKey), String> {
    let der =
        PrivateKeyDer::from_pem_slice(pem).map_err(|e| format!("no PEM private key ({e})"))?;
    let algorithm = match &der {
        PrivateKeyDer::Pkcs1(_) => KeyAlgorithm::Rsa,
        PrivateKeyDer::Pkcs8(k) => match pkcs8_algorithm(k.secret_pkcs8_der()) {
            Some(a) => a,
            None => return Err("a PKCS#8 key that is neither RSA nor Ed25519".into()),
        },
        PrivateKeyDer::Sec1(_) => {
            return Err("an EC (SEC1) key: DKIM signs with RSA or Ed25519".into())
        }
        _ => return Err("an unsupported private key format".into()),
    };
    let key = match (algorithm, der) {
        (KeyAlgorithm::Rsa, der) => RsaKey::<Sha256>::from_key_der(der)
            .map(DkimKey::from)
            .map_err(|e| {
                format!(
                    "not a usable RSA key ({e}); ring signs with {}- to {}-bit keys",
                    RSA_BITS.start(),
                    RSA_BITS.end()
                )
            })?,
        (KeyAlgorithm::Ed25519, PrivateKeyDer::Pkcs8(k)) => {
            // OpenSSL writes PKCS#8 v1 (no public key inside); ring's
            // checked constructor wants v2.
            Ed25519Key::from_pkcs8_maybe_unchecked_der(k.secret_pkcs8_der())
                .map(DkimKey::from)
                .map_err(|e| format!("not a usable Ed25519 key ({e})"))?
        }
        (KeyAlgorithm::Ed25519, _) => return Err("an Ed25519 key must be PKCS#8".into()),
    };
    Ok((algorithm, key))
}

/// rsaEncryption, 1.2.840.113549.1.1.1.
const OID_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
/// id-Ed25519, 1.3.101.112 (RFC 8410).
const OID_ED25519: &[u8] = &[0x2b, 0x65, 0x70];

/// The algorithm of a PKCS#8 PrivateKeyInfo: SEQUENCE { INTEGER version,
/// SEQUENCE { OID algorithm, ... }, ... }.
fn pkcs8_algorithm(der: &[u8]) -> Option<KeyAlgorithm> {
    let (0x30, info, _) = der_item(der)? else {
        return None;
    };
    let (0x02, _, rest) = der_item(info)? else {
        return None;
    };
    let (0x30, alg_id, _) = der_item(rest)? else {
        return None;
    };
    let (0x06, oid, _) = der_item(alg_id)? else {
        return None;
    };
    match oid {
        OID_RSA => Some(KeyAlgorithm::Rsa),
        OID_ED25519 => Some(KeyAlgorithm::Ed25519),
        _ => None,
    }
}

/// One DER item: (tag, contents, what follows).
fn der_item(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// RFC 1035 host-name-like: dot-separated labels of letters, digits, `-`
/// and `_` (selectors and domains both), none empty or over 63 octets.
fn is_dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `openssl genpkey -algorithm ed25519`: PKCS#8 v1, no public key.
    const OPENSSL_ED25519: &str = "-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEIGmKqfnvnCK7F9uIXdkvXZ4hC7jgbvdSOymTqR81cqcP
-----END PRIVATE KEY-----
";

    #[test]
    fn key_spec_parsing() {
        let k = parse_key_spec("Example.ORG:s2024:/etc/dkim/a:b.pem").unwrap();
        assert_eq!(
            k,
            KeySpec {
                domain: "example.org".into(),
                selector: "s2024".into(),
                path: "/etc/dkim/a:b.pem".into(),
            }
        );
        assert!(parse_key_spec("example.org:sel.sub:k").is_ok());
        for bad in [
            "example.org:sel",
            "example.org:sel:",
            ":sel:/k",
            "example.org::/k",
            "exa mple.org:s:/k",
            "example.org:s;x:/k",
        ] {
            assert!(parse_key_spec(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn algorithm_follows_the_key() {
        let ed = generate(KeyAlgorithm::Ed25519, 0).unwrap();
        let s = Signer::from_pem("example.org", "s", ed.private_pem.as_bytes()).unwrap();
        assert_eq!(s.algorithm(), KeyAlgorithm::Ed25519);
        // The v1 form, as OpenSSL writes it (48 octets: 64 base64 chars).
        assert_eq!(ed.private_pem.lines().nth(1).unwrap().len(), 64);
        assert!(ed
            .private_pem
            .lines()
            .nth(1)
            .unwrap()
            .starts_with("MC4CAQAwBQYDK2Vw"));
        let s = Signer::from_pem("example.org", "s", OPENSSL_ED25519.as_bytes()).unwrap();
        assert_eq!(s.algorithm(), KeyAlgorithm::Ed25519);

        let rsa = generate(KeyAlgorithm::Rsa, 2048).unwrap();
        let s = Signer::from_pem("example.org", "s", rsa.private_pem.as_bytes()).unwrap();
        assert_eq!(s.algorithm(), KeyAlgorithm::Rsa);
        // The same key as PKCS#1 ("BEGIN RSA PRIVATE KEY").
        let der = PrivateKeyDer::from_pem_slice(rsa.private_pem.as_bytes()).unwrap();
        let pkcs1 = {
            use rsa::pkcs1::EncodeRsaPrivateKey;
            use rsa::pkcs8::DecodePrivateKey;
            let k = rsa::RsaPrivateKey::from_pkcs8_der(der.secret_der()).unwrap();
            k.to_pkcs1_der().unwrap().as_bytes().to_vec()
        };
        let pem = pem_encode("RSA PRIVATE KEY", &pkcs1);
        let s = Signer::from_pem("example.org", "s", pem.as_bytes()).unwrap();
        assert_eq!(s.algorithm(), KeyAlgorithm::Rsa);

        let ec = rcgen::KeyPair::generate().unwrap().serialize_pem();
        let err = Signer::from_pem("example.org", "s", ec.as_bytes()).unwrap_err();
        assert!(err.contains("neither RSA nor Ed25519"), "{err}");
        let err = Signer::from_pem("example.org", "s", b"not a key").unwrap_err();
        assert!(err.contains("no PEM private key"), "{err}");
    }

    #[test]
    fn rsa_bits_are_checked() {
        for bits in [1024, 2047, 8192] {
            assert!(generate(KeyAlgorithm::Rsa, bits).is_err(), "{bits}");
        }
    }

    #[test]
    fn signature_field() {
        let ed = generate(KeyAlgorithm::Ed25519, 0).unwrap();
        let s = Signer::from_pem("example.org", "sel", ed.private_pem.as_bytes()).unwrap();
        let added: &[u8] = b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n";
        let msg: &[u8] = b"From: a@example.org\r\nX-Other: x\r\nSubject: hi\r\n\r\nbody\r\n";
        let field = s.sign(&[added, msg]).unwrap();
        assert!(
            field.starts_with(
                "DKIM-Signature: v=1; a=ed25519-sha256; s=sel; d=example.org; c=relaxed/relaxed;"
            ),
            "{field}"
        );
        assert!(field.ends_with(";\r\n"), "{field}");
        // Folded: every line but the first starts with white space.
        assert!(field
            .trim_end()
            .split("\r\n")
            .skip(1)
            .all(|l| l.starts_with('\t')));
        let h = field.replace("\r\n\t", " ");
        let h = h.split("h=").nth(1).unwrap().split(';').next().unwrap();
        let mut names: Vec<String> = h
            .split(':')
            .map(|n| n.trim().to_ascii_lowercase())
            .collect();
        names.sort();
        let mut want: Vec<String> = SIGNED_HEADERS
            .iter()
            .map(|n| n.to_ascii_lowercase())
            .collect();
        want.sort();
        assert_eq!(
            names, want,
            "present and absent ones; X-Other is not signed"
        );
    }

    #[test]
    fn dns_record_is_split_into_strings() {
        let rsa = generate(KeyAlgorithm::Rsa, 2048).unwrap();
        let rec = rsa.dns_record("example.org", "s1");
        assert!(
            rec.starts_with("s1._domainkey.example.org. IN TXT \"v=DKIM1; k=rsa; p=MII"),
            "{rec}"
        );
        let strings: Vec<&str> = rec.split('"').skip(1).step_by(2).collect();
        assert!(strings.len() >= 2, "{rec}");
        assert!(strings.iter().all(|s| s.len() <= 255));
        assert_eq!(strings.concat(), rsa.txt_value());

        let ed = generate(KeyAlgorithm::Ed25519, 0).unwrap();
        let rec = ed.dns_record("example.org.", "e");
        assert!(
            rec.starts_with("e._domainkey.example.org. IN TXT \"v=DKIM1; k=ed25519; p="),
            "{rec}"
        );
        assert_eq!(ed.public_b64.len(), 44);
    }

    #[test]
    fn signs_only_for_the_logins_own_authors_and_reload_keeps_a_broken_key() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, pem: &str| {
            let p = dir.path().join(name);
            fs::write(&p, pem).unwrap();
            p
        };
        let ed1 = generate(KeyAlgorithm::Ed25519, 0).unwrap();
        let ed2 = generate(KeyAlgorithm::Ed25519, 0).unwrap();
        let spec = |domain: &str, sel: &str, path: PathBuf| KeySpec {
            domain: domain.into(),
            selector: sel.into(),
            path,
        };
        let a = write("a.pem", &ed1.private_pem);
        let b = write("b.pem", &ed2.private_pem);
        let store = DkimStore::load(vec![
            spec("one.test", "a", a.clone()),
            spec("one.test", "b", b.clone()),
            spec("two.test", "a", a.clone()),
        ])
        .unwrap();
        let signers = store.signers();
        // The login may send as anything at one.test and two.test.
        let mine = |a: &str| a.ends_with("@one.test") || a.ends_with("@two.test");
        let sels = |header: &str| match plan(&signers, &submit::authors(&[header.as_bytes()]), mine)
        {
            Plan::Sign(keys) => keys
                .iter()
                .map(|s| format!("{}/{}", s.domain(), s.selector()))
                .collect::<Vec<_>>()
                .join(" "),
            Plan::Unsigned => "unsigned".into(),
            Plan::Mismatch(what) => format!("mismatch {what}"),
        };
        assert_eq!(sels("From: a@one.test\r\n\r\n"), "one.test/a one.test/b");
        assert_eq!(
            sels("From: a@three.test, b@two.test, c@ONE.test\r\n\r\n"),
            "two.test/a"
        );
        assert_eq!(sels("From: a@three.test\r\n\r\n"), "unsigned");
        assert_eq!(sels("Subject: no from\r\n\r\n"), "unsigned");
        // Sender's domain signs when From's has no key.
        assert_eq!(
            sels("From: x@three.test\r\nSender: s@two.test\r\n\r\n"),
            "two.test/a"
        );
        assert_eq!(
            sels("From: \"a@one.test\" <a@three.test>\r\n\r\n"),
            "unsigned"
        );

        let alice = |a: &str| a == "alice@one.test";
        let plan_for = |header: &str| plan(&signers, &submit::authors(&[header.as_bytes()]), alice);
        let mismatch = |header: &str| match plan_for(header) {
            Plan::Mismatch(what) => what,
            other => panic!("{header}: {other:?}"),
        };
        assert!(matches!(
            plan_for("From: Alice <alice@one.test>\r\n\r\n"),
            Plan::Sign(_)
        ));
        // Someone else at a signed domain, in From or Sender, alone or next
        // to the login's own address: never signed.
        assert_eq!(mismatch("From: bob@one.test\r\n\r\n"), "bob@one.test");
        assert_eq!(
            mismatch("From: alice@one.test, bob@two.test\r\n\r\n"),
            "bob@two.test"
        );
        assert_eq!(
            mismatch("From: x@three.test\r\nSender: bob@two.test\r\n\r\n"),
            "bob@two.test"
        );
        // Unreadable fields naming a signed domain: in doubt, a mismatch.
        mismatch("From: Friends: bob@one.test;\r\n\r\n");
        mismatch("From: alice@one.test\r\nFrom: bob@one.test\r\n\r\n");
        assert!(matches!(
            plan_for("From: (x@three.test\r\n\r\n"),
            Plan::Unsigned
        ));

        let before = store.signers()[2].clone();
        fs::write(&a, "garbage").unwrap();
        let errors = store.reload();
        assert_eq!(errors.len(), 2, "{errors:?}");
        let after = store.signers()[2].clone();
        assert!(Arc::ptr_eq(&before, &after), "the old key stays");

        assert!(DkimStore::load(vec![spec("one.test", "a", a)]).is_err());
    }
}
