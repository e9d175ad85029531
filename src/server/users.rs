//! Who may submit mail: the `--users` file (`user:argon2-PHC-hash` lines),
//! the `--sender-login-map` (which envelope senders a login may use), and
//! the per-client throttle on logins ([`AuthThrottle`]: failures in a
//! window, checks at once). Both files are reloaded on SIGHUP; a reload that
//! fails keeps the old contents.
//!
//! Verifying an argon2 hash costs tens of milliseconds of CPU by design:
//! [`verify`] must never run on a shard thread. The connection driver calls
//! it on the auth pool ([`crate::blocking`]), which does nothing else. An
//! unknown user is verified against a dummy hash, so a failure takes the
//! same time either way.
//!
//! This module must never log or keep a password, and never tell an unknown
//! user from a wrong password to the client.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use thiserror::Error;

use super::limits::{AuthLimits, AuthThrottle};
use crate::smtp::auth::SendAs;

/// The submission knobs that are not session policy.
#[derive(Debug, Clone)]
pub struct AuthSettings {
    pub users: Option<PathBuf>,
    pub sender_login_map: Option<PathBuf>,
    /// The local domains: `login@domain` is a login's own address.
    pub local_domains: Vec<String>,
    /// Pause before each 535.
    pub failure_delay: Duration,
    /// Failures per client (an IPv4 address, an IPv6 /64) within
    /// `failure_window` before further attempts are refused (0: no limit).
    pub max_failures: u32,
    pub failure_window: Duration,
    /// Password checks per client at once (0: no limit).
    pub max_checks_per_ip: u32,
}

#[derive(Debug, Error)]
pub enum UsersError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path}:{line}: {reason}")]
    Syntax {
        path: PathBuf,
        line: usize,
        reason: &'static str,
    },
    #[error("cannot hash the password: {0}")]
    Hash(String),
    #[error("invalid user name {0:?}: it must be non-empty, without ':' or white space")]
    BadUser(String),
}

/// The users and sender map in force, and the login throttle.
#[derive(Debug)]
pub struct AuthStore {
    /// Replaced by a SIGHUP (the throttle keeps the limits it started with).
    settings: ArcSwap<AuthSettings>,
    users: ArcSwap<HashMap<String, String>>,
    senders: ArcSwap<SenderMap>,
    throttle: AuthThrottle,
}

/// Most clients whose logins are counted at once (a few MiB); see
/// [`AuthThrottle`] for what goes when it is full.
const MAX_TRACKED_CLIENTS: usize = 65_536;

impl AuthStore {
    pub fn load(settings: AuthSettings) -> Result<AuthStore, UsersError> {
        let users = match &settings.users {
            Some(p) => read_users(p)?,
            None => HashMap::new(),
        };
        let senders = match &settings.sender_login_map {
            Some(p) => read_sender_map(p)?,
            None => SenderMap::default(),
        };
        let throttle = AuthThrottle::new(AuthLimits {
            max_failures: settings.max_failures,
            window: settings.failure_window,
            max_checks: settings.max_checks_per_ip,
            max_clients: MAX_TRACKED_CLIENTS,
        });
        Ok(AuthStore {
            settings: ArcSwap::from_pointee(settings),
            users: ArcSwap::from_pointee(users),
            senders: ArcSwap::from_pointee(senders),
            throttle,
        })
    }

    /// New settings (SIGHUP): the files are read at the next
    /// [`AuthStore::reload`]; the throttle's limits do not change.
    pub fn set_settings(&self, settings: AuthSettings) {
        self.settings.store(Arc::new(settings));
    }

    /// Re-reads both files; returns the number of users now in force.
    pub fn reload(&self) -> Result<usize, UsersError> {
        let settings = self.settings.load();
        let users = match &settings.users {
            Some(p) => read_users(p)?,
            None => HashMap::new(),
        };
        let senders = match &settings.sender_login_map {
            Some(p) => read_sender_map(p)?,
            None => SenderMap::default(),
        };
        let n = users.len();
        self.users.store(Arc::new(users));
        self.senders.store(Arc::new(senders));
        Ok(n)
    }

    pub fn user_count(&self) -> usize {
        self.users.load().len()
    }

    /// The stored hash for `user` (a snapshot for one verification).
    pub fn hash_of(&self, user: &str) -> Option<String> {
        self.users.load().get(user).cloned()
    }

    /// The senders `login` may use: its own address (the login itself when
    /// it is an address, else `login@` each local domain) plus what the
    /// sender login map grants.
    pub fn send_as(&self, login: &str) -> Vec<SendAs> {
        let mut rules = Vec::new();
        if login.contains('@') {
            rules.push(SendAs::Address(login.to_owned()));
        } else {
            for d in &self.settings.load().local_domains {
                rules.push(SendAs::Address(format!("{login}@{d}")));
            }
        }
        rules.extend(self.senders.load().grants(login));
        rules
    }

    /// Failed logins and checks in progress per client.
    pub fn throttle(&self) -> &AuthThrottle {
        &self.throttle
    }

    pub fn failure_delay(&self) -> Duration {
        self.settings.load().failure_delay
    }
}

/// Hashes `password` for the users file (argon2id, the crate's default
/// parameters, a random salt): the PHC string.
pub fn hash_password(password: &str) -> Result<String, UsersError> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| UsersError::Hash(e.to_string()))
}

/// The `user:hash` line `ringmta passwd` prints.
pub fn passwd_line(user: &str, password: &str) -> Result<String, UsersError> {
    if !valid_user(user) {
        return Err(UsersError::BadUser(user.to_owned()));
    }
    Ok(format!("{user}:{}", hash_password(password)?))
}

/// Checks `password` against a PHC hash, or against a dummy hash when the
/// user is unknown (`None`), which always fails after the same work.
/// CPU-heavy: call it off the shard thread.
pub fn verify(hash: Option<&str>, password: &str) -> bool {
    let (phc, known) = match hash {
        Some(h) => (h, true),
        None => (DUMMY_HASH.as_str(), false),
    };
    let Ok(parsed) = PasswordHash::new(phc) else {
        return false;
    };
    let ok = Argon2::default()
        .verify_password(password.as_bytes(), &parsed)
        .is_ok();
    ok && known
}

static DUMMY_HASH: LazyLock<String> = LazyLock::new(|| {
    // invariant: hashing with a fresh salt and default parameters only fails
    // on an RNG failure, which leaves nothing sensible to do but a hash that
    // never verifies.
    hash_password("ringmta dummy password").unwrap_or_default()
});

fn valid_user(user: &str) -> bool {
    !user.is_empty()
        && user.len() <= 255
        && !user.contains(':')
        && !user.contains(char::is_whitespace)
}

/// `user:$argon2id$...` lines; `#` comments and blank lines are skipped.
fn read_users(path: &Path) -> Result<HashMap<String, String>, UsersError> {
    let text = fs::read_to_string(path).map_err(|source| UsersError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_users(&text).map_err(|(line, reason)| UsersError::Syntax {
        path: path.to_owned(),
        line,
        reason,
    })
}

fn parse_users(text: &str) -> Result<HashMap<String, String>, (usize, &'static str)> {
    let mut users = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (user, hash) = line
            .split_once(':')
            .ok_or((i + 1, "expected user:argon2-hash"))?;
        if !valid_user(user) {
            return Err((i + 1, "invalid user name"));
        }
        let phc = PasswordHash::new(hash).map_err(|_| (i + 1, "not a PHC hash string"))?;
        if !phc.algorithm.as_str().starts_with("argon2") {
            return Err((i + 1, "not an argon2 hash (use `ringmta passwd USER`)"));
        }
        if users.insert(user.to_owned(), hash.to_owned()).is_some() {
            return Err((i + 1, "duplicate user"));
        }
    }
    Ok(users)
}

/// `--sender-login-map`: lines `ADDRESS LOGIN[,LOGIN...]` or `@DOMAIN
/// LOGIN[,...]` (the logins may send as that address, or as any address at
/// that domain). `#` comments and blank lines are skipped.
#[derive(Debug, Default)]
pub struct SenderMap {
    /// login → what it may send as.
    grants: HashMap<String, Vec<SendAs>>,
}

impl SenderMap {
    fn grants(&self, login: &str) -> Vec<SendAs> {
        self.grants.get(login).cloned().unwrap_or_default()
    }
}

fn read_sender_map(path: &Path) -> Result<SenderMap, UsersError> {
    let text = fs::read_to_string(path).map_err(|source| UsersError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_sender_map(&text).map_err(|(line, reason)| UsersError::Syntax {
        path: path.to_owned(),
        line,
        reason,
    })
}

fn parse_sender_map(text: &str) -> Result<SenderMap, (usize, &'static str)> {
    let mut map = SenderMap::default();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut words = line.split_whitespace();
        let (Some(sender), Some(logins), None) = (words.next(), words.next(), words.next()) else {
            return Err((i + 1, "expected ADDRESS LOGIN[,LOGIN...]"));
        };
        let rule = match sender.strip_prefix('@') {
            Some(d) if !d.is_empty() && !d.contains('@') => SendAs::Domain(d.to_ascii_lowercase()),
            Some(_) => return Err((i + 1, "bad @domain")),
            None => match sender.rsplit_once('@') {
                Some((l, d)) if !l.is_empty() && !d.is_empty() => {
                    SendAs::Address(sender.to_owned())
                }
                _ => return Err((i + 1, "the sender must be user@domain or @domain")),
            },
        };
        for login in logins.split(',').filter(|l| !l.is_empty()) {
            map.grants
                .entry(login.to_owned())
                .or_default()
                .push(rule.clone());
        }
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> AuthSettings {
        AuthSettings {
            users: None,
            sender_login_map: None,
            local_domains: vec!["example.org".into(), "localhost".into()],
            failure_delay: Duration::ZERO,
            max_failures: 3,
            failure_window: Duration::from_secs(60),
            max_checks_per_ip: 2,
        }
    }

    #[test]
    fn hash_and_verify() {
        let line = passwd_line("alice", "s3cret pass").unwrap();
        let (user, hash) = line.split_once(':').unwrap();
        assert_eq!(user, "alice");
        assert!(hash.starts_with("$argon2id$"));
        assert!(verify(Some(hash), "s3cret pass"));
        assert!(!verify(Some(hash), "wrong"));
        assert!(!verify(None, "ringmta dummy password"));
        assert!(!verify(Some("not a hash"), "x"));
        assert!(passwd_line("a:b", "x").is_err());
        assert!(passwd_line("", "x").is_err());
        let users = parse_users(&format!("# users\n\n{line}\n")).unwrap();
        assert_eq!(users.get("alice").map(String::as_str), Some(hash));
    }

    #[test]
    fn users_file_errors_name_the_line() {
        assert_eq!(parse_users("nocolon").unwrap_err().0, 1);
        assert_eq!(parse_users("\nbob:plaintext").unwrap_err().0, 2);
        let h = "$pbkdf2-sha256$i=1000$c2FsdA$aGFzaA";
        assert_eq!(parse_users(&format!("bob:{h}")).unwrap_err().0, 1);
    }

    #[test]
    fn sender_rules() {
        let map = parse_sender_map(
            "# who may send as what\nsales@example.org alice,bob\n@team.example alice\n",
        )
        .unwrap();
        let store = AuthStore {
            senders: ArcSwap::from_pointee(map),
            ..AuthStore::load(settings()).unwrap()
        };
        let alice = store.send_as("alice");
        let allowed = |rules: &[SendAs], a: &str| rules.iter().any(|r| r.allows(a));
        assert!(allowed(&alice, "alice@example.org"));
        assert!(allowed(&alice, "alice@localhost"));
        assert!(allowed(&alice, "sales@example.org"));
        assert!(allowed(&alice, "anyone@team.example"));
        assert!(!allowed(&alice, "bob@example.org"));
        let carol = store.send_as("carol@elsewhere.example");
        assert!(allowed(&carol, "carol@elsewhere.example"));
        assert!(!allowed(&carol, "carol@example.org"));
        assert!(parse_sender_map("sales@example.org").is_err());
        assert!(parse_sender_map("@ alice").is_err());
    }

    #[test]
    fn failures_block_per_client_within_the_window() {
        use std::net::IpAddr;
        use std::time::Instant;
        let store = AuthStore::load(settings()).unwrap();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(!store.throttle().is_blocked(ip, t0));
            drop(store.throttle().reserve(ip, t0).unwrap());
        }
        assert!(store.throttle().is_blocked(ip, t0));
        assert!(!store.throttle().is_blocked(other, t0));
        let later = t0 + Duration::from_secs(61);
        assert!(!store.throttle().is_blocked(ip, later));
        drop(store.throttle().reserve(ip, later).unwrap());
        assert!(!store.throttle().is_blocked(ip, later));
    }
}
