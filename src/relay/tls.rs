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

/// What to do about TLS on outbound connections (`--tls-policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum TlsPolicy {
    /// STARTTLS when offered; plaintext when not offered, refused or failed.
    #[default]
    Opportunistic,
    /// STARTTLS or no delivery: the message is deferred instead.
    Require,
}

/// The connector every outbound STARTTLS of a shard uses: verifying
/// against the bundled roots when `verify`, else accepting any certificate.
pub fn connector(verify: bool) -> TlsConnector {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        // invariant: the ring provider supports both versions.
        .expect("ring supports TLS 1.2 and 1.3");
    let config = if verify {
        let roots: rustls::RootCertStore = webpki_roots::TLS_SERVER_ROOTS.iter().cloned().collect();
        builder.with_root_certificates(roots).with_no_client_auth()
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
            .with_no_client_auth()
    };
    TlsConnector::from(Arc::new(config))
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
        let _ = connector(false);
        let _ = connector(true);
    }
}
