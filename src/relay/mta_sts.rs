//! MTA-STS (RFC 8461): a domain's published demand for verified TLS to
//! its MX hosts. The `_mta-sts.<domain>` TXT record announces a policy
//! (and its `id`); the policy itself comes over HTTPS from
//! `https://mta-sts.<domain>/.well-known/mta-sts.txt` and is kept for its
//! `max_age`, in memory and in `<spool>/mta-sts/` (one file per domain),
//! so that a restart does not forget it: an attacker who strips the TXT
//! record later cannot turn enforcement off (RFC 8461 5.1).
//!
//! Everything here runs on the resolver thread (`mx`): the cache belongs
//! to it, the TXT lookup uses its resolver, and the HTTPS fetch and the
//! cache files go to tokio's blocking threads (at most
//! [`MAX_FETCHES`] fetches at once). A shard only asks and awaits.
//!
//! The fetch is a bounded HTTPS/1.1 GET over rustls: the certificate must
//! verify (bundled roots plus `--tls-ca-file`) for `mta-sts.<domain>`; no
//! redirects (RFC 8461 3.3); a 200 with `Content-Type: text/plain`; at
//! most [`MAX_POLICY`] octets; every read and the whole fetch time out.
//! This module must never let a policy it could not authenticate loosen
//! one it holds.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What a policy asks of senders (`mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Verified TLS to a matching MX host, or no delivery.
    Enforce,
    /// Report what enforcement would refuse; deliver as usual.
    Testing,
    /// No policy (a domain withdrawing one).
    None,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Testing => "testing",
            Mode::None => "none",
        }
    }
}

/// A parsed policy (RFC 8461 3.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub mode: Mode,
    /// MX host patterns: a host name, or `*.` and a domain (one label).
    pub mx: Vec<String>,
    /// Seconds the policy may be kept.
    pub max_age: u64,
}

/// The most a policy may be kept (RFC 8461 3.2: about a year).
pub const MAX_AGE_LIMIT: u64 = 31_557_600;
/// The largest policy body read (RFC 8461 3.3 suggests 64 KiB).
pub const MAX_POLICY: usize = 64 * 1024;
/// The most HTTP header octets read before the body.
const MAX_HEADER: usize = 16 * 1024;
/// Fetches under way at once; beyond it a fetch fails at once (the
/// destination goes on with the cached policy or none).
pub const MAX_FETCHES: usize = 32;
/// Policies kept in memory (and on disk); when full, the expired go first,
/// then any one.
const MAX_CACHED: usize = 65_536;
/// Longest one fetch (connect, handshake, request and answer) may take.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(20);

impl Policy {
    /// Parses a policy body; `Err` says what is wrong with it.
    pub fn parse(text: &str) -> Result<Policy, String> {
        let mut version = None;
        let mut mode = None;
        let mut max_age = None;
        let mut mx = Vec::new();
        for line in text.split('\n') {
            let line = line.strip_suffix('\r').unwrap_or(line);
            if line.trim().is_empty() {
                continue;
            }
            let Some((key, value)) = line.split_once(':') else {
                return Err(format!("not a key: value line: {line:?}"));
            };
            let value = value.trim_matches([' ', '\t']);
            match key {
                "version" if version.is_none() => version = Some(value.to_owned()),
                "mode" if mode.is_none() => {
                    mode = Some(match value {
                        "enforce" => Mode::Enforce,
                        "testing" => Mode::Testing,
                        "none" => Mode::None,
                        other => return Err(format!("unknown mode {other:?}")),
                    })
                }
                "max_age" if max_age.is_none() => {
                    let n: u64 = value
                        .parse()
                        .ok()
                        .filter(|_| value.len() <= 10 && value.bytes().all(|b| b.is_ascii_digit()))
                        .ok_or_else(|| format!("bad max_age {value:?}"))?;
                    max_age = Some(n.min(MAX_AGE_LIMIT));
                }
                "mx" => {
                    let p = value.trim_end_matches('.').to_ascii_lowercase();
                    if p.is_empty() || p.contains(char::is_whitespace) {
                        return Err(format!("bad mx {value:?}"));
                    }
                    mx.push(p);
                }
                // Unknown keys (and repeats) are ignored (RFC 8461 3.2).
                _ => {}
            }
        }
        if version.as_deref() != Some("STSv1") {
            return Err("no version: STSv1".into());
        }
        let mode = mode.ok_or("no mode")?;
        let max_age = max_age.ok_or("no max_age")?;
        if mode != Mode::None && mx.is_empty() {
            return Err("no mx".into());
        }
        Ok(Policy { mode, mx, max_age })
    }

    /// Whether MX host `host` is one the policy names (RFC 8461 4.1).
    pub fn matches(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.mx.iter().any(|p| match p.strip_prefix("*.") {
            Some(suffix) => host
                .strip_suffix(suffix)
                .and_then(|h| h.strip_suffix('.'))
                .is_some_and(|label| !label.is_empty() && !label.contains('.')),
            None => *p == host,
        })
    }
}

/// The `id` of the `_mta-sts` TXT record, or `None` when the records do
/// not announce exactly one valid policy (RFC 8461 3.1).
pub fn txt_id<'a>(records: impl IntoIterator<Item = &'a str>) -> Option<String> {
    let mut found = records
        .into_iter()
        .filter(|r| r.starts_with("v=STSv1;") || *r == "v=STSv1");
    let record = found.next()?;
    if found.next().is_some() {
        return None;
    }
    let mut id = None;
    for field in record.split(';').skip(1) {
        let field = field.trim_matches([' ', '\t']);
        if field.is_empty() {
            continue;
        }
        let (k, v) = field.split_once('=')?;
        if k == "id" && id.is_none() {
            if v.is_empty() || v.len() > 32 || !v.bytes().all(|b| b.is_ascii_alphanumeric()) {
                return None;
            }
            id = Some(v.to_owned());
        }
    }
    id
}

/// How the resolver thread fetches and keeps policies.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `<spool>/mta-sts`.
    pub dir: PathBuf,
    /// The HTTPS port of policy hosts (`--mta-sts-port`, 443 but in tests).
    pub port: u16,
    /// Trust anchors of the policy hosts' certificates.
    pub roots: Arc<rustls::RootCertStore>,
}

/// One domain's policy as kept.
#[derive(Debug, Clone)]
struct Cached {
    id: String,
    policy: Arc<Policy>,
    /// Unix time the policy stops being valid.
    expires: u64,
}

/// The policies known (resolver thread only).
pub struct Cache {
    settings: Settings,
    by_domain: HashMap<String, Cached>,
    fetching: usize,
    /// Fetches that failed (domain, id) and until when they are not tried
    /// again: a broken policy server costs one fetch per
    /// [`RETRY_FAILED`], not one per connection.
    failed: HashMap<(String, String), u64>,
}

/// How long a failed fetch of one policy id is not tried again.
const RETRY_FAILED: u64 = 300;

impl Cache {
    /// The cache, with the unexpired policies of `settings.dir`.
    pub fn open(settings: Settings) -> Cache {
        let mut by_domain = HashMap::new();
        let now = unix_now();
        if let Ok(dir) = std::fs::read_dir(&settings.dir) {
            for entry in dir.flatten().take(MAX_CACHED) {
                let Some(domain) = entry.file_name().to_str().map(str::to_owned) else {
                    continue;
                };
                if !valid_domain(&domain) {
                    continue;
                }
                match std::fs::read_to_string(entry.path())
                    .ok()
                    .and_then(|t| decode(&t))
                {
                    Some(c) if c.expires > now => {
                        by_domain.insert(domain, c);
                    }
                    _ => {
                        let _ = std::fs::remove_file(entry.path());
                    }
                }
            }
        }
        if !by_domain.is_empty() {
            tracing::info!(policies = by_domain.len(), dir = %settings.dir.display(), "MTA-STS policies loaded");
        }
        Cache {
            settings,
            by_domain,
            fetching: 0,
            failed: HashMap::new(),
        }
    }
}

/// The policy in force for `domain` (`None`: no policy): the `_mta-sts`
/// TXT record is looked up; an id other than the held policy's is
/// fetched (unless it failed within [`RETRY_FAILED`]); without a valid
/// record, or when the lookup or the fetch fails, the held policy stays
/// in force until it expires.
pub async fn policy(
    cache: &std::rc::Rc<std::cell::RefCell<Cache>>,
    resolver: &hickory_resolver::TokioResolver,
    domain: &str,
) -> Option<Arc<Policy>> {
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    if !valid_domain(&domain) {
        return None;
    }
    let now = unix_now();
    let cached = cache
        .borrow()
        .by_domain
        .get(&domain)
        .filter(|c| c.expires > now)
        .cloned();
    let txt = match resolver
        .txt_lookup(format!("_mta-sts.{domain}.").as_str())
        .await
    {
        Ok(l) => {
            let strings: Vec<String> = l
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    hickory_resolver::proto::rr::RData::TXT(t) => Some(
                        t.txt_data
                            .iter()
                            .map(|s| String::from_utf8_lossy(s).into_owned())
                            .collect::<String>(),
                    ),
                    _ => None,
                })
                .collect();
            txt_id(strings.iter().map(String::as_str))
        }
        Err(_) => None,
    };
    let Some(id) = txt else {
        // No (valid) record, or DNS failed: a cached policy still holds
        // until it expires (RFC 8461 5.1).
        return cached.map(|c| c.policy);
    };
    if let Some(c) = &cached {
        if c.id == id {
            return Some(c.policy.clone());
        }
    }
    let settings = {
        let mut c = cache.borrow_mut();
        let key = (domain.clone(), id.clone());
        if c.failed.get(&key).is_some_and(|&until| until > now) {
            return cached.map(|c| c.policy);
        }
        if c.fetching >= MAX_FETCHES {
            tracing::warn!(%domain, "MTA-STS: too many policy fetches under way; using what is cached");
            return cached.map(|c| c.policy);
        }
        c.fetching += 1;
        c.settings.clone()
    };
    let addrs: Vec<IpAddr> = match resolver
        .lookup_ip(format!("mta-sts.{domain}.").as_str())
        .await
    {
        Ok(ips) => ips.iter().collect(),
        Err(_) => Vec::new(),
    };
    let host = format!("mta-sts.{domain}");
    let fetch_settings = settings.clone();
    let fetched = tokio::task::spawn_blocking(move || {
        fetch(&host, &addrs, fetch_settings.port, fetch_settings.roots)
    })
    .await
    .unwrap_or_else(|e| Err(format!("fetch task: {e}")));
    cache.borrow_mut().fetching -= 1;
    match fetched.and_then(|text| Policy::parse(&text).map(|p| (p, text))) {
        Ok((p, text)) => {
            tracing::info!(%domain, %id, mode = p.mode.name(), max_age = p.max_age, "MTA-STS policy fetched");
            let policy = Arc::new(p);
            let entry = Cached {
                id: id.clone(),
                policy: policy.clone(),
                expires: now.saturating_add(policy.max_age),
            };
            let file = encode(&entry, &text);
            let path = settings.dir.join(&domain);
            {
                let mut c = cache.borrow_mut();
                if c.by_domain.len() >= MAX_CACHED && !c.by_domain.contains_key(&domain) {
                    c.by_domain.retain(|_, v| v.expires > now);
                    if c.by_domain.len() >= MAX_CACHED {
                        let victim = c.by_domain.keys().next().cloned();
                        if let Some(v) = victim {
                            c.by_domain.remove(&v);
                            let _ = std::fs::remove_file(settings.dir.join(v));
                        }
                    }
                }
                c.by_domain.insert(domain.clone(), entry);
            }
            let _ = tokio::task::spawn_blocking(move || {
                if let Err(e) = write_file(&path, &file) {
                    tracing::warn!(path = %path.display(), error = %e, "MTA-STS: cannot keep the policy on disk");
                }
            })
            .await;
            Some(policy)
        }
        Err(e) => {
            // RFC 8461 5.1: a failed fetch keeps the policy held, if any.
            tracing::warn!(%domain, %id, error = %e, "MTA-STS policy fetch failed");
            let mut c = cache.borrow_mut();
            if c.failed.len() >= MAX_CACHED {
                c.failed.retain(|_, until| *until > now);
                if c.failed.len() >= MAX_CACHED {
                    c.failed.clear();
                }
            }
            c.failed
                .insert((domain.clone(), id.clone()), now + RETRY_FAILED);
            cached.map(|c| c.policy)
        }
    }
}

/// A name safe as a file name and as a host name.
fn valid_domain(d: &str) -> bool {
    !d.is_empty()
        && d.len() <= 253
        && !d.starts_with('.')
        && !d.contains("..")
        && d.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The cache file: `id`, `expires` lines, a blank line, the policy text.
fn encode(c: &Cached, text: &str) -> String {
    format!("id: {}\nexpires: {}\n\n{text}", c.id, c.expires)
}

fn decode(file: &str) -> Option<Cached> {
    let (head, text) = file.split_once("\n\n")?;
    let mut id = None;
    let mut expires = None;
    for line in head.lines() {
        match line.split_once(": ")? {
            ("id", v) => id = Some(v.to_owned()),
            ("expires", v) => expires = v.parse().ok(),
            _ => {}
        }
    }
    Some(Cached {
        id: id?,
        policy: Arc::new(Policy::parse(text).ok()?),
        expires: expires?,
    })
}

fn write_file(path: &Path, content: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content)?;
    std::fs::rename(&tmp, path)
}

/// GET `https://host/.well-known/mta-sts.txt` from the first of `addrs`
/// that answers (blocking; on a blocking thread). The body, or why not.
pub fn fetch(
    host: &str,
    addrs: &[IpAddr],
    port: u16,
    roots: Arc<rustls::RootCertStore>,
) -> Result<String, String> {
    if addrs.is_empty() {
        return Err(format!("{host} has no address"));
    }
    let deadline = Instant::now() + FETCH_TIMEOUT;
    let mut last = String::new();
    for ip in addrs {
        match fetch_from(host, SocketAddr::new(*ip, port), roots.clone(), deadline) {
            Ok(body) => return Ok(body),
            Err(e) => last = format!("{host}[{ip}]:{port}: {e}"),
        }
        if Instant::now() >= deadline {
            break;
        }
    }
    Err(last)
}

fn fetch_from(
    host: &str,
    addr: SocketAddr,
    roots: Arc<rustls::RootCertStore>,
    deadline: Instant,
) -> Result<String, String> {
    let left = || deadline.saturating_duration_since(Instant::now());
    let tcp = std::net::TcpStream::connect_timeout(&addr, left().max(Duration::from_millis(1)))
        .map_err(|e| format!("connect: {e}"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(host.to_owned())
        .map_err(|e| format!("{host}: {e}"))?;
    let conn = rustls::ClientConnection::new(Arc::new(config), name).map_err(|e| e.to_string())?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let timeout = |s: &std::net::TcpStream| {
        let t = left().max(Duration::from_millis(1));
        s.set_read_timeout(Some(t))
            .and_then(|_| s.set_write_timeout(Some(t)))
            .map_err(|e| e.to_string())
    };
    timeout(&tls.sock)?;
    let request = format!(
        "GET /.well-known/mta-sts.txt HTTP/1.1\r\nHost: {host}\r\nUser-Agent: ringmta\r\nAccept: text/plain\r\nConnection: close\r\n\r\n"
    );
    tls.write_all(request.as_bytes())
        .and_then(|_| tls.flush())
        .map_err(|e| format!("request: {e}"))?;
    let mut got = Vec::with_capacity(4096);
    let mut buf = [0u8; 8192];
    loop {
        if Instant::now() >= deadline {
            return Err("timed out".into());
        }
        timeout(&tls.sock)?;
        match tls.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                if got.len() > MAX_HEADER + MAX_POLICY + 4096 {
                    return Err("answer too large".into());
                }
                if let Some(done) = complete(&got)? {
                    return done;
                }
            }
            // A server that closes without close_notify: what came is
            // judged as it is (a length or chunked body must be whole).
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    match complete(&got)? {
        Some(done) => done,
        None => http_body(&got, true),
    }
}

/// The body when `got` holds a whole answer with a length (or chunks),
/// `None` while more is needed.
fn complete(got: &[u8]) -> Result<Option<Result<String, String>>, String> {
    let Some(end) = memchr::memmem::find(got, b"\r\n\r\n") else {
        if got.len() > MAX_HEADER {
            return Err("header too large".into());
        }
        return Ok(None);
    };
    let head = String::from_utf8_lossy(&got[..end]);
    let has_length = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("content-length:")
            || (l.starts_with("transfer-encoding:") && l.contains("chunked"))
    });
    if !has_length {
        return Ok(None);
    }
    match http_body(got, false) {
        Err(e) if e == INCOMPLETE => Ok(None),
        other => Ok(Some(other)),
    }
}

const INCOMPLETE: &str = "incomplete answer";

/// Parses an HTTP/1.1 answer: a 200, `text/plain`, the body by length,
/// chunks, or (when `closed`) to the end (public for the fuzz target).
pub fn http_body(got: &[u8], closed: bool) -> Result<String, String> {
    let end = memchr::memmem::find(got, b"\r\n\r\n").ok_or(INCOMPLETE)?;
    let head = std::str::from_utf8(&got[..end]).map_err(|_| "header not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or_default();
    let mut parts = status.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    let code = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(format!("not HTTP/1.x: {status:?}"));
    }
    if code != "200" {
        // Redirects are not followed (RFC 8461 3.3).
        return Err(format!("HTTP status {status:?}"));
    }
    let mut length = None;
    let mut chunked = false;
    let mut plain = false;
    for l in lines {
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        let v = v.trim();
        match k.trim().to_ascii_lowercase().as_str() {
            "content-length" => {
                length = Some(v.parse::<usize>().map_err(|_| "bad Content-Length")?)
            }
            "transfer-encoding" => chunked = v.to_ascii_lowercase().contains("chunked"),
            "content-type" => {
                plain = v
                    .split(';')
                    .next()
                    .is_some_and(|t| t.trim().eq_ignore_ascii_case("text/plain"))
            }
            _ => {}
        }
    }
    if !plain {
        return Err("Content-Type is not text/plain".into());
    }
    let rest = &got[end + 4..];
    let body: Vec<u8> = if chunked {
        dechunk(rest)?
    } else if let Some(n) = length {
        if n > MAX_POLICY {
            return Err("policy too large".into());
        }
        if rest.len() < n {
            return Err(INCOMPLETE.into());
        }
        rest[..n].to_vec()
    } else if closed {
        rest.to_vec()
    } else {
        return Err(INCOMPLETE.into());
    };
    if body.len() > MAX_POLICY {
        return Err("policy too large".into());
    }
    String::from_utf8(body).map_err(|_| "policy not UTF-8".into())
}

/// The body of a chunked transfer (RFC 9112 7.1), trailers ignored.
fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        let line_end = memchr::memmem::find(rest, b"\r\n").ok_or(INCOMPLETE)?;
        let size_text = std::str::from_utf8(&rest[..line_end]).map_err(|_| "bad chunk size")?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| "bad chunk size")?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Ok(body);
        }
        if body.len() + size > MAX_POLICY {
            return Err("policy too large".into());
        }
        if rest.len() < size + 2 {
            return Err(INCOMPLETE.into());
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_parse() {
        let p = Policy::parse(
            "version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.example.net\r\nmx: backupmx.example.com\r\nmax_age: 604800\r\n",
        )
        .unwrap();
        assert_eq!(p.mode, Mode::Enforce);
        assert_eq!(p.max_age, 604800);
        assert_eq!(p.mx.len(), 3);
        assert!(p.matches("mail.example.com."));
        assert!(p.matches("MX1.example.net"));
        assert!(!p.matches("a.b.example.net"));
        assert!(!p.matches("example.net"));
        assert!(!p.matches("evilexample.net"));
        assert!(!p.matches("mail.example.org"));
        // LF only, unknown keys, a huge max_age capped.
        let p = Policy::parse(
            "version: STSv1\nmode: testing\nfoo: bar\nmx: a.example\nmax_age: 9999999999\n",
        )
        .unwrap();
        assert_eq!(p.mode, Mode::Testing);
        assert_eq!(p.max_age, MAX_AGE_LIMIT);
        assert!(Policy::parse("version: STSv1\nmode: none\nmax_age: 1\n").is_ok());
        for bad in [
            "mode: enforce\nmx: a\nmax_age: 1\n",
            "version: STSv2\nmode: enforce\nmx: a\nmax_age: 1\n",
            "version: STSv1\nmode: enforce\nmax_age: 1\n",
            "version: STSv1\nmode: maybe\nmx: a\nmax_age: 1\n",
            "version: STSv1\nmode: enforce\nmx: a\nmax_age: -1\n",
            "version: STSv1\nmode: enforce\nmx: a\n",
            "<html>",
        ] {
            assert!(Policy::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn txt_records() {
        assert_eq!(
            txt_id(["v=STSv1; id=20160831085700Z;"]),
            Some("20160831085700Z".into())
        );
        assert_eq!(txt_id(["v=STSv1;id=abc"]), Some("abc".into()));
        assert_eq!(
            txt_id(["something else", "v=STSv1; id=1"]),
            Some("1".into())
        );
        assert_eq!(txt_id(["v=STSv1; id=1", "v=STSv1; id=2"]), None);
        assert_eq!(txt_id(["v=STSv1; id=no-dashes"]), None);
        assert_eq!(txt_id(["v=STSv1;"]), None);
        assert_eq!(txt_id(Vec::<&str>::new()), None);
    }

    #[test]
    fn http_answers() {
        let ok = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 5\r\n\r\nhello";
        assert_eq!(http_body(ok, false), Ok("hello".into()));
        assert_eq!(complete(&ok[..ok.len() - 1]).unwrap(), None);
        let chunked = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhel\r\n2\r\nlo\r\n0\r\n\r\n";
        assert_eq!(http_body(chunked, false), Ok("hello".into()));
        let redirect = b"HTTP/1.1 301 Moved\r\nLocation: https://x/\r\nContent-Type: text/plain\r\nContent-Length: 0\r\n\r\n";
        assert!(http_body(redirect, false).unwrap_err().contains("301"));
        let html = b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 0\r\n\r\n";
        assert!(http_body(html, false).is_err());
        let big = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n",
            MAX_POLICY + 1
        );
        assert_eq!(
            http_body(big.as_bytes(), false),
            Err("policy too large".into())
        );
        let to_close = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nhello";
        assert_eq!(http_body(to_close, true), Ok("hello".into()));
    }

    #[test]
    fn cache_files_round_trip() {
        let p =
            Policy::parse("version: STSv1\nmode: enforce\nmx: *.a.test\nmax_age: 60\n").unwrap();
        let c = Cached {
            id: "x1".into(),
            policy: Arc::new(p.clone()),
            expires: 1234,
        };
        let d = decode(&encode(
            &c,
            "version: STSv1\nmode: enforce\nmx: *.a.test\nmax_age: 60\n",
        ))
        .unwrap();
        assert_eq!((d.id.as_str(), d.expires, &*d.policy), ("x1", 1234, &p));
        assert!(valid_domain("a-b.example.org"));
        assert!(!valid_domain("../etc"));
        assert!(!valid_domain("a/b"));
    }
}
