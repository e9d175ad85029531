//! Server-side TLS: the rustls `ServerConfig` every handshake uses, where its
//! certificate comes from, and its reload on SIGHUP.
//!
//! The certificate is `--tls-cert`/`--tls-key` (PEM), or, when neither is
//! given, a self-signed one generated with rcgen at first start into
//! `<spool-dir>/tls/` and reused afterwards, so the embedded default serves
//! STARTTLS and implicit TLS out of the box. TLS 1.2 and 1.3 only.
//!
//! Crypto provider: `ring`. It builds with nothing but a C compiler;
//! aws-lc-rs (rustls' default) wants cmake or a prebuilt NASM and a much
//! longer build, and this machine has no cmake. ringmta needs no FIPS mode
//! and no post-quantum key exchange yet, so nothing is lost; switching is a
//! feature flag and the provider line in [`server_config`].
//!
//! Reload: the current config sits in an `ArcSwap`; each handshake takes a
//! snapshot, so a reload changes what new handshakes present and never
//! touches sessions already running. A reload that fails (unreadable file,
//! key not matching the certificate) keeps the old certificate.
//!
//! This module must never log key material, and never block a shard: files
//! are read on the main thread (start) or the signal thread (reload).

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use futures_rustls::TlsAcceptor;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ProtocolVersion, ServerConfig, ServerConnection};
use thiserror::Error;

use crate::smtp::TlsInfo;

/// Where the certificate comes from, and how long a handshake may take.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    /// `--tls-cert` and `--tls-key`; `None`: the generated certificate.
    pub files: Option<(PathBuf, PathBuf)>,
    /// Where a generated certificate lives (`<spool-dir>/tls`).
    pub generated_dir: PathBuf,
    /// Subject alternative name of a generated certificate (with
    /// `localhost`).
    pub hostname: String,
    pub handshake_timeout: Duration,
}

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("{path}: no PEM certificate in it ({reason})")]
    NoCertificate { path: PathBuf, reason: String },
    #[error("{path}: no PEM private key in it ({reason})")]
    NoKey { path: PathBuf, reason: String },
    #[error("certificate {cert} / key {key}: {source}")]
    Rustls {
        cert: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
    #[error("cannot generate a self-signed certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

/// The live server configuration, swapped on reload.
#[derive(Debug)]
pub struct TlsStore {
    /// Replaced by a SIGHUP that changes the files or the timeout.
    settings: ArcSwap<TlsSettings>,
    current: ArcSwap<ServerConfig>,
    /// The certificate and key files in use.
    paths: ArcSwap<(PathBuf, PathBuf)>,
}

impl TlsStore {
    /// Loads (or first generates) the certificate. Runs before the shards.
    pub fn load(settings: TlsSettings) -> Result<TlsStore, TlsError> {
        let paths = match &settings.files {
            Some((cert, key)) => (cert.clone(), key.clone()),
            None => ensure_generated(&settings.generated_dir, &settings.hostname)?,
        };
        let config = server_config(&paths.0, &paths.1)?;
        tracing::info!(cert = %paths.0.display(), generated = settings.files.is_none(), "TLS certificate loaded");
        Ok(TlsStore {
            settings: ArcSwap::from_pointee(settings),
            current: ArcSwap::from_pointee(config),
            paths: ArcSwap::from_pointee(paths),
        })
    }

    /// New settings (SIGHUP): the handshake timeout applies at once, the
    /// files at the next [`TlsStore::reload`].
    pub fn set_settings(&self, settings: TlsSettings) {
        self.settings.store(Arc::new(settings));
    }

    /// Re-reads the certificate and key files; on error the old ones stay.
    pub fn reload(&self) -> Result<(), TlsError> {
        let settings = self.settings.load();
        let paths = match &settings.files {
            Some((cert, key)) => (cert.clone(), key.clone()),
            None => ensure_generated(&settings.generated_dir, &settings.hostname)?,
        };
        let config = server_config(&paths.0, &paths.1)?;
        self.current.store(Arc::new(config));
        self.paths.store(Arc::new(paths));
        Ok(())
    }

    /// An acceptor over the current configuration (a snapshot: a reload
    /// during the handshake does not affect it).
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.load_full())
    }

    pub fn handshake_timeout(&self) -> Duration {
        self.settings.load().handshake_timeout
    }

    /// The certificate file in use.
    pub fn cert_path(&self) -> PathBuf {
        self.paths.load().0.clone()
    }
}

/// What the trace header says about a finished handshake.
pub fn info(conn: &ServerConnection) -> TlsInfo {
    let version = match conn.protocol_version() {
        Some(ProtocolVersion::TLSv1_3) => "TLS1.3",
        Some(ProtocolVersion::TLSv1_2) => "TLS1.2",
        _ => "TLS",
    };
    let cipher = conn
        .negotiated_cipher_suite()
        .and_then(|s| s.suite().as_str())
        .unwrap_or("unknown");
    // rustls names the TLS 1.3 suites `TLS13_AES_...`; the IANA registry
    // (and every other MTA's Received header) says `TLS_AES_...`.
    let cipher = match cipher.strip_prefix("TLS13_") {
        Some(rest) => iana_tls13(rest),
        None => cipher,
    };
    TlsInfo { version, cipher }
}

fn iana_tls13(rest: &str) -> &'static str {
    match rest {
        "AES_128_GCM_SHA256" => "TLS_AES_128_GCM_SHA256",
        "AES_256_GCM_SHA384" => "TLS_AES_256_GCM_SHA384",
        "CHACHA20_POLY1305_SHA256" => "TLS_CHACHA20_POLY1305_SHA256",
        _ => "TLS1.3-unknown",
    }
}

/// TLS 1.3 and 1.2 with the ring provider, no client certificates.
fn server_config(cert_path: &Path, key_path: &Path) -> Result<ServerConfig, TlsError> {
    let certs = read_certs(cert_path)?;
    let key = read_key(key_path)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let rustls_err = |source| TlsError::Rustls {
        cert: cert_path.to_owned(),
        key: key_path.to_owned(),
        source,
    };
    ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(rustls_err)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(rustls_err)
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(&pem).collect();
    match certs {
        Ok(c) if !c.is_empty() => Ok(c),
        Ok(_) => Err(TlsError::NoCertificate {
            path: path.to_owned(),
            reason: "no CERTIFICATE section".into(),
        }),
        Err(e) => Err(TlsError::NoCertificate {
            path: path.to_owned(),
            reason: e.to_string(),
        }),
    }
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::NoKey {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// `dir/cert.pem` and `dir/key.pem`, generated (ECDSA P-256, self-signed
/// for `hostname` and `localhost`) when either is missing.
fn ensure_generated(dir: &Path, hostname: &str) -> Result<(PathBuf, PathBuf), TlsError> {
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    if cert.is_file() && key.is_file() {
        return Ok((cert, key));
    }
    let write_err = |path: &Path| {
        let path = path.to_owned();
        move |source| TlsError::Write { path, source }
    };
    fs::create_dir_all(dir).map_err(write_err(dir))?;
    let mut names = vec![hostname.to_owned()];
    if hostname != "localhost" {
        names.push("localhost".to_owned());
    }
    let generated = rcgen::generate_simple_self_signed(names)?;
    // The key first, private from its first byte; each file appears whole
    // (written aside, then renamed), so a crash leaves no half file.
    write_atomically(
        &key,
        generated.signing_key.serialize_pem().as_bytes(),
        0o600,
    )
    .map_err(write_err(&key))?;
    write_atomically(&cert, generated.cert.pem().as_bytes(), 0o644).map_err(write_err(&cert))?;
    tracing::warn!(
        cert = %cert.display(),
        "no --tls-cert given: generated a self-signed certificate (clients will not verify it)"
    );
    Ok((cert, key))
}

fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(dir: &Path) -> TlsSettings {
        TlsSettings {
            files: None,
            generated_dir: dir.join("tls"),
            hostname: "mx.test".into(),
            handshake_timeout: Duration::from_secs(5),
        }
    }

    #[test]
    fn generates_once_then_reuses() {
        let dir = tempfile::tempdir().unwrap();
        let s = TlsStore::load(settings(dir.path())).unwrap();
        let first = fs::read(s.cert_path()).unwrap();
        let key_mode = fs::metadata(dir.path().join("tls/key.pem"))
            .unwrap()
            .permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&key_mode) & 0o777,
            0o600
        );
        let again = TlsStore::load(settings(dir.path())).unwrap();
        assert_eq!(fs::read(again.cert_path()).unwrap(), first);
        again.reload().unwrap();
    }

    #[test]
    fn bad_files_are_refused_and_reload_keeps_the_old_config() {
        let dir = tempfile::tempdir().unwrap();
        let s = TlsStore::load(settings(dir.path())).unwrap();
        let cert = s.cert_path().to_owned();
        let key = dir.path().join("tls/key.pem");

        // A key that does not belong to the certificate.
        let other = rcgen::generate_simple_self_signed(vec!["x.test".to_string()]).unwrap();
        let other_key = dir.path().join("other.key");
        fs::write(&other_key, other.signing_key.serialize_pem()).unwrap();
        let mismatched = TlsSettings {
            files: Some((cert.clone(), other_key)),
            ..settings(dir.path())
        };
        assert!(matches!(
            TlsStore::load(mismatched),
            Err(TlsError::Rustls { .. })
        ));

        let garbage = dir.path().join("garbage.pem");
        fs::write(&garbage, "not pem").unwrap();
        let bad = TlsSettings {
            files: Some((garbage.clone(), key.clone())),
            ..settings(dir.path())
        };
        assert!(matches!(
            TlsStore::load(bad),
            Err(TlsError::NoCertificate { .. })
        ));

        let before = s.current.load_full();
        fs::write(&cert, "truncated").unwrap();
        assert!(s.reload().is_err());
        assert!(Arc::ptr_eq(&before, &s.current.load_full()));
    }
}
