//! Outbound TLS: the rustls client configuration STARTTLS to the next hop
//! uses, and the policy that decides what a missing or failed STARTTLS
//! means.
//!
//! * `--tls-policy opportunistic` (default, RFC 7435 and RFC 3207): STARTTLS
//!   whenever the server offers it. A refused STARTTLS goes on in plaintext
//!   on the same connection; a failed or timed-out handshake leaves the
//!   connection unusable, so the host is tried again at once over a new,
//!   plaintext connection. The certificate is **not verified**
//!   ([`NoVerify`]): the point of opportunistic TLS is protection against
//!   passive eavesdropping, and a verification failure would only push the
//!   message back to plaintext (less privacy, not more). This is what
//!   Postfix calls `smtp_tls_security_level = may`.
//! * `--tls-policy require`: no STARTTLS offered (`4.7.4`), STARTTLS refused
//!   or a failed handshake (`4.7.5`) defer the message; it is retried on the
//!   retry schedule and never sent in plaintext. By default the certificate
//!   is still not verified (Postfix's `encrypt` level: on the public MX
//!   network most certificates would not verify, and MX names come from
//!   unauthenticated DNS anyway); `--tls-verify on` verifies the chain
//!   against the bundled Mozilla roots (`webpki-roots`, compiled in, so it
//!   works the same on every machine) and the certificate's name against
//!   the MX host name or the `--route`/`--relay-host` host (Postfix's
//!   `verify`). Use it for a smarthost or route with a real certificate.
//!   `--tls-verify on` is refused with `opportunistic` at start: a
//!   verification failure there would fall back to plaintext.
//!
//! * `--tls-policy verify`: `require`, and the certificate must verify
//!   (bundled roots plus `--tls-ca-file`) for the host name. `none`: never
//!   STARTTLS. `dane`: DANE where usable TLSA records exist, else
//!   opportunistic. Each may be set per destination (shaping file).
//! * DANE (RFC 7672, [`dane_connector`]): the certificate must match the
//!   host's TLSA records, DANE-EE or DANE-TA, and nothing else is trusted.
//! * MTA-STS `enforce` uses the verifying connector; `testing` uses
//!   [`reporting_connector`], which checks, records and goes on.
//!
//! Handshakes are bounded by `--tls-handshake-timeout`, the same flag as the
//! server side. Crypto provider and versions match the server: ring, TLS
//! 1.3 and 1.2 only.
//!
//! This module must never log key material or certificates' contents.

use std::sync::Arc;

use futures_rustls::TlsConnector;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, ProtocolVersion, SignatureScheme};

/// What to do about TLS on outbound connections (`--tls-policy`, and
/// `tls_policy` per destination in the shaping file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum TlsPolicy {
    /// Never STARTTLS, even when offered (a next hop whose TLS is broken).
    None,
    /// STARTTLS when offered; plaintext when not offered, refused or failed.
    #[default]
    Opportunistic,
    /// STARTTLS or no delivery: the message is deferred instead.
    Require,
    /// STARTTLS with a certificate that verifies (bundled roots plus
    /// `--tls-ca-file`) for the host name, or no delivery.
    Verify,
    /// DANE (RFC 7672) when the host has usable DNSSEC-secure TLSA
    /// records, else opportunistic.
    Dane,
}

impl TlsPolicy {
    /// The shaping file's and the logs' word for it.
    pub fn name(self) -> &'static str {
        match self {
            TlsPolicy::None => "none",
            TlsPolicy::Opportunistic => "opportunistic",
            TlsPolicy::Require => "require",
            TlsPolicy::Verify => "verify",
            TlsPolicy::Dane => "dane",
        }
    }

    /// The policy named `word` (shaping file).
    pub fn parse(word: &str) -> Option<TlsPolicy> {
        [
            TlsPolicy::None,
            TlsPolicy::Opportunistic,
            TlsPolicy::Require,
            TlsPolicy::Verify,
            TlsPolicy::Dane,
        ]
        .into_iter()
        .find(|p| p.name() == word)
    }
}

/// How one outbound connection was protected: the `tls` field of the
/// event log and the "outbound TLS established" line, and the `result`
/// label of `ringmta_outbound_tls_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Security {
    /// No TLS.
    Plain,
    /// TLS, the certificate not checked.
    Tls,
    /// TLS, the certificate verified (PKIX) for the host name.
    Verified,
    /// TLS, the certificate matched the host's DNSSEC-secure TLSA records.
    Dane,
    /// TLS, the certificate verified for an MX host the domain's MTA-STS
    /// policy (mode enforce) names.
    MtaSts,
}

impl Security {
    pub const ALL: [Security; 5] = [
        Security::Plain,
        Security::Tls,
        Security::Verified,
        Security::Dane,
        Security::MtaSts,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Security::Plain => "plain",
            Security::Tls => "tls",
            Security::Verified => "verified",
            Security::Dane => "dane",
            Security::MtaSts => "mta-sts",
        }
    }
}

/// The provider every outbound configuration uses.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn builder(
    provider: Arc<CryptoProvider>,
) -> rustls::ConfigBuilder<ClientConfig, rustls::WantsVerifier> {
    ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        // invariant: the ring provider supports both versions.
        .expect("ring supports TLS 1.2 and 1.3")
}

/// The trust anchors of verified outbound TLS: the bundled Mozilla roots
/// plus the certificates of `ca_file` (`--tls-ca-file`, PEM), if any.
pub fn roots(ca_file: Option<&std::path::Path>) -> Result<rustls::RootCertStore, String> {
    let mut roots: rustls::RootCertStore = webpki_roots::TLS_SERVER_ROOTS.iter().cloned().collect();
    if let Some(path) = ca_file {
        use rustls::pki_types::pem::PemObject;
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .and_then(|it| it.collect::<Result<_, _>>())
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if certs.is_empty() {
            return Err(format!("{}: no certificate in it", path.display()));
        }
        for c in certs {
            roots
                .add(c)
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
    }
    Ok(roots)
}

/// The connector of an outbound STARTTLS: verifying against `roots` when
/// given, else accepting any certificate.
pub fn connector(roots: Option<Arc<rustls::RootCertStore>>) -> TlsConnector {
    let provider = provider();
    let config = match roots {
        Some(roots) => builder(provider)
            .with_root_certificates(roots)
            .with_no_client_auth(),
        None => builder(provider.clone())
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
            .with_no_client_auth(),
    };
    TlsConnector::from(Arc::new(config))
}

/// The connector of one DANE-protected connection: the certificate must
/// match one of `records` (all usable, RFC 7672 3.1); nothing else is
/// trusted (no PKIX fallback).
pub fn dane_connector(records: Vec<Tlsa>) -> TlsConnector {
    let provider = provider();
    let verifier = DaneVerifier {
        records,
        provider: provider.clone(),
    };
    let config = builder(provider)
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

/// A connector that checks the certificate against `roots` for the host
/// name but lets the handshake go on when it does not verify: MTA-STS
/// `testing` (RFC 8461 5) reports what enforcement would refuse. What
/// failed is in the returned cell after the handshake.
pub fn reporting_connector(
    roots: Arc<rustls::RootCertStore>,
) -> (TlsConnector, Arc<std::sync::Mutex<Option<String>>>) {
    let provider = provider();
    let failure = Arc::new(std::sync::Mutex::new(None));
    let config =
        match rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
            .build()
        {
            Ok(inner) => builder(provider)
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Reporting {
                    inner,
                    failure: failure.clone(),
                }))
                .with_no_client_auth(),
            Err(e) => {
                *failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                builder(provider.clone())
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
                    .with_no_client_auth()
            }
        };
    (TlsConnector::from(Arc::new(config)), failure)
}

/// PKIX verification that records its failure instead of failing.
#[derive(Debug)]
struct Reporting {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    failure: Arc<std::sync::Mutex<Option<String>>>,
}

impl ServerCertVerifier for Reporting {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Err(e) = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            *self.failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// One TLSA record (RFC 6698 2.1), as the resolver returned it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tlsa {
    pub usage: u8,
    pub selector: u8,
    pub matching: u8,
    pub data: Vec<u8>,
}

impl Tlsa {
    /// Usable for SMTP (RFC 7672 3.1): DANE-TA(2) or DANE-EE(3), the
    /// full certificate(0) or its public key(1), exact(0), SHA2-256(1) or
    /// SHA2-512(2); PKIX-TA(0) and PKIX-EE(1) are not (RFC 7672 3.1.3).
    pub fn usable(&self) -> bool {
        matches!(self.usage, 2 | 3)
            && matches!(self.selector, 0 | 1)
            && match self.matching {
                0 => !self.data.is_empty(),
                1 => self.data.len() == 32,
                2 => self.data.len() == 64,
                _ => false,
            }
    }

    /// Whether `cert` (DER) is what this record names.
    pub fn matches(&self, cert: &[u8]) -> bool {
        let content = match self.selector {
            0 => cert,
            1 => match spki(cert) {
                Some(k) => k,
                None => return false,
            },
            _ => return false,
        };
        match self.matching {
            0 => content == self.data.as_slice(),
            1 => ring::digest::digest(&ring::digest::SHA256, content).as_ref() == self.data,
            2 => ring::digest::digest(&ring::digest::SHA512, content).as_ref() == self.data,
            _ => false,
        }
    }
}

/// The DER of a certificate's SubjectPublicKeyInfo (RFC 5280 4.1): the
/// seventh element of the TBSCertificate when it has the explicit version
/// `[0]`, else the sixth (public for the fuzz target). `None` for
/// anything that is not such a certificate.
pub fn spki(cert: &[u8]) -> Option<&[u8]> {
    let (tbs_outer, _) = der_element(cert)?;
    let (_, tbs) = der_content(tbs_outer)?;
    let (tbs_body, _) = der_element(tbs)?;
    let (_, mut fields) = der_content(tbs_body)?;
    let (first, _) = der_element(fields)?;
    // [0] EXPLICIT version, then serial, signature, issuer, validity, subject.
    let skip = if first.first() == Some(&0xa0) { 6 } else { 5 };
    for _ in 0..skip {
        let (el, rest) = der_element(fields)?;
        let _ = el;
        fields = rest;
    }
    let (key, _) = der_element(fields)?;
    (key.first() == Some(&0x30)).then_some(key)
}

/// Splits `der` into its first element (tag, length and content) and
/// what follows.
fn der_element(der: &[u8]) -> Option<(&[u8], &[u8])> {
    let (header, len) = der_header(der)?;
    let end = header.checked_add(len)?;
    (end <= der.len()).then(|| der.split_at(end))
}

/// The tag and the content of one element.
fn der_content(el: &[u8]) -> Option<(u8, &[u8])> {
    let (header, len) = der_header(el)?;
    Some((el[0], el.get(header..header.checked_add(len)?)?))
}

/// The header length and content length of the element at the start of
/// `der` (definite lengths only, as DER requires).
fn der_header(der: &[u8]) -> Option<(usize, usize)> {
    let first = *der.get(1)?;
    if first < 0x80 {
        return Some((2, usize::from(first)));
    }
    let n = usize::from(first & 0x7f);
    if n == 0 || n > 4 {
        return None;
    }
    let mut len = 0usize;
    for &b in der.get(2..2 + n)? {
        len = (len << 8) | usize::from(b);
    }
    Some((2 + n, len))
}

/// The name a certificate is checked against (and sent as SNI): the host
/// name, or its address when the name is not a valid DNS name (an address
/// literal in a route, for example; no SNI is sent for addresses).
pub fn server_name(host: &str, ip: std::net::IpAddr) -> ServerName<'static> {
    let host = host.trim_matches(['[', ']']).trim_end_matches('.');
    match ServerName::try_from(host.to_owned()) {
        Ok(name) => name,
        Err(_) => ServerName::IpAddress(ip.into()),
    }
}

/// `TLS1.3 TLS_AES_256_GCM_SHA384`, for the logs.
pub fn describe(conn: &rustls::ClientConnection) -> String {
    let version = match conn.protocol_version() {
        Some(ProtocolVersion::TLSv1_3) => "TLS1.3",
        Some(ProtocolVersion::TLSv1_2) => "TLS1.2",
        _ => "TLS",
    };
    let cipher = conn
        .negotiated_cipher_suite()
        .and_then(|s| s.suite().as_str())
        .unwrap_or("unknown");
    format!("{version} {cipher}")
}

/// The DANE check of RFC 7672 3.1 against the TLSA RRset of the host:
///
/// * DANE-EE(3): the server's own certificate (or its key) matches; its
///   names and dates are not looked at (RFC 7672 3.1.1).
/// * DANE-TA(2): a certificate of the chain the server sent matches; the
///   chain up to it must verify (signatures, dates) and name the host
///   (the TLS server name: the MX host name), as in RFC 7672 3.1.2 and
///   3.2.3.
///
/// No match is a failed handshake: the connection is never used, and no
/// other trust (PKIX, none) is tried.
#[derive(Debug)]
struct DaneVerifier {
    records: Vec<Tlsa>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for DaneVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self
            .records
            .iter()
            .any(|r| r.usage == 3 && r.matches(end_entity))
        {
            return Ok(ServerCertVerified::assertion());
        }
        let mut ta_failure = None;
        for (k, ca) in intermediates.iter().enumerate() {
            if !self.records.iter().any(|r| r.usage == 2 && r.matches(ca)) {
                continue;
            }
            let mut roots = rustls::RootCertStore::empty();
            if let Err(e) = roots.add(ca.clone().into_owned()) {
                ta_failure = Some(e);
                continue;
            }
            let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots),
                self.provider.clone(),
            )
            .build()
            .map_err(|e| rustls::Error::General(format!("DANE-TA: {e}")))?;
            match verifier.verify_server_cert(
                end_entity,
                &intermediates[..k],
                server_name,
                ocsp_response,
                now,
            ) {
                Ok(v) => return Ok(v),
                Err(e) => ta_failure = Some(e),
            }
        }
        Err(match ta_failure {
            Some(e) => rustls::Error::General(format!(
                "DANE: the chain to the TLSA trust anchor does not verify: {e}"
            )),
            None => rustls::Error::General(
                "DANE: no TLSA record matches the server's certificate chain".into(),
            ),
        })
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A certificate verifier that accepts every certificate: opportunistic TLS
/// (RFC 7435) encrypts against passive attackers and does not authenticate
/// the server, because failing verification could only mean falling back to
/// plaintext. The handshake signatures are still checked against the
/// certificate's key, so the peer must hold the key of the certificate it
/// presents. Used for `--tls-policy opportunistic` and for `require` with
/// `--tls-verify off`.
#[derive(Debug)]
pub struct NoVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names() {
        let ip = std::net::IpAddr::from([127, 0, 0, 1]);
        assert!(matches!(
            server_name("mx1.example.org.", ip),
            ServerName::DnsName(n) if n.as_ref() == "mx1.example.org"
        ));
        assert!(matches!(
            server_name("127.0.0.1", ip),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            server_name("bad name!", ip),
            ServerName::IpAddress(_)
        ));
    }

    #[test]
    fn connectors_build() {
        let _ = connector(None);
        let _ = connector(Some(Arc::new(roots(None).unwrap())));
    }

    fn cert(name: &str) -> (Vec<u8>, Vec<u8>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
        let c = rcgen::CertificateParams::new(vec![name.to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (c.der().to_vec(), spki)
    }

    #[test]
    fn spki_is_found_in_a_certificate() {
        let (der, key) = cert("mx.example.org");
        assert_eq!(spki(&der), Some(key.as_slice()));
        assert_eq!(spki(&der[..der.len() / 2]), None);
        assert_eq!(spki(b""), None);
        assert_eq!(spki(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
    }

    #[test]
    fn tlsa_matching() {
        let (der, key) = cert("mx.example.org");
        let (other, _) = cert("mx.example.org");
        let sha256 = |b: &[u8]| {
            ring::digest::digest(&ring::digest::SHA256, b)
                .as_ref()
                .to_vec()
        };
        let sha512 = |b: &[u8]| {
            ring::digest::digest(&ring::digest::SHA512, b)
                .as_ref()
                .to_vec()
        };
        let rec = |usage, selector, matching, data: Vec<u8>| Tlsa {
            usage,
            selector,
            matching,
            data,
        };
        for r in [
            rec(3, 1, 1, sha256(&key)),
            rec(3, 0, 1, sha256(&der)),
            rec(3, 1, 2, sha512(&key)),
            rec(3, 0, 0, der.clone()),
            rec(3, 1, 0, key.clone()),
        ] {
            assert!(r.usable(), "{r:?}");
            assert!(r.matches(&der), "{r:?}");
            assert!(!r.matches(&other), "{r:?}");
        }
        // Not usable for SMTP: PKIX usages, unknown selectors or matchings,
        // digests of the wrong length.
        assert!(!rec(1, 1, 1, sha256(&key)).usable());
        assert!(!rec(0, 0, 1, sha256(&der)).usable());
        assert!(!rec(3, 2, 1, sha256(&key)).usable());
        assert!(!rec(3, 1, 3, sha256(&key)).usable());
        assert!(!rec(3, 1, 1, vec![0; 31]).usable());
    }

    #[test]
    fn policy_words() {
        for w in ["none", "opportunistic", "require", "verify", "dane"] {
            assert_eq!(TlsPolicy::parse(w).map(TlsPolicy::name), Some(w));
        }
        assert_eq!(TlsPolicy::parse("maybe"), None);
    }
}
