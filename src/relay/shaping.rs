//! Traffic shaping rules (`--shaping FILE`) and the pacing arithmetic that
//! enforces them: which limits apply to a destination, and how long a
//! worker waits before its next connection or message.
//!
//! Pure: no I/O and no clock of its own (`Instant`s come in); the file is
//! read by the configuration, the waiting done by `relay::deliver`.
//!
//! An entry is `[default]`, `[domain."example.com"]` (the recipient domain,
//! also when a `--route` or `--relay-host` sends its mail elsewhere) or
//! `[provider.NAME]` with `mx = ["*.google.com", ...]`: every domain whose
//! MX hosts match shares that provider's budget ("MX rollup"). Precedence:
//! domain > provider > default, key by key; a key an entry leaves out comes
//! from the next one down, then from the built-in defaults.
//!
//! Source-IP pools live here too: `[source.NAME]` (a `bind` address and
//! the `ehlo` name that matches its PTR), `[pool.NAME]` (sources with
//! weights) and which pool a message leaves through: the `X-Ringmta-Pool`
//! header of a trusted client, then `[sender."domain"]`, then
//! `[route."name"]` (a route's or the relay host's host, or the recipient
//! domain of mail sent by MX), then `pool` in `[default]`. The budgets
//! above then count per source and destination, as receivers do.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::tls::TlsPolicy;

/// `N/s`, `N/m` or `N/h`: at most N events per period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u32,
    pub per: Duration,
}

impl Rate {
    /// The spacing between two events at this rate.
    pub fn interval(&self) -> Duration {
        self.per / self.count.max(1)
    }
}

impl FromStr for Rate {
    type Err = String;

    fn from_str(s: &str) -> Result<Rate, String> {
        let (n, unit) = s
            .trim()
            .split_once('/')
            .ok_or_else(|| format!("{s:?}: expected N/s, N/m or N/h"))?;
        let count: u32 = n
            .trim()
            .parse()
            .map_err(|_| format!("{s:?}: bad count {n:?}"))?;
        if count == 0 {
            return Err(format!("{s:?}: the count must be at least 1"));
        }
        let per = match unit.trim() {
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            other => return Err(format!("{s:?}: unit {other:?} is not s, m or h")),
        };
        Ok(Rate { count, per })
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.per.as_secs() {
            1 => "s",
            60 => "m",
            _ => "h",
        };
        write!(f, "{}/{unit}", self.count)
    }
}

/// The keys of one entry, each optional (left out: the next entry down
/// decides).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Limits {
    pub max_connections: Option<usize>,
    pub max_message_rate: Option<Rate>,
    pub max_connection_rate: Option<Rate>,
    pub max_deliveries_per_connection: Option<u32>,
    pub idle_timeout: Option<Duration>,
    pub tls_policy: Option<TlsPolicy>,
    /// The delays between attempts (`--retry-schedule` when none).
    pub retry: Option<std::sync::Arc<[Duration]>>,
}

impl Limits {
    /// `self` where it has a value, else `under`.
    fn over(&self, under: &Limits) -> Limits {
        Limits {
            max_connections: self.max_connections.or(under.max_connections),
            max_message_rate: self.max_message_rate.or(under.max_message_rate),
            max_connection_rate: self.max_connection_rate.or(under.max_connection_rate),
            max_deliveries_per_connection: self
                .max_deliveries_per_connection
                .or(under.max_deliveries_per_connection),
            idle_timeout: self.idle_timeout.or(under.idle_timeout),
            tls_policy: self.tls_policy.or(under.tls_policy),
            retry: self.retry.clone().or_else(|| under.retry.clone()),
        }
    }
}

/// A provider: the MX host patterns that make a domain one of its own.
#[derive(Debug, Clone, PartialEq)]
pub struct Provider {
    pub name: String,
    /// Lower case; `*.example.com` (any subdomain) or an exact host.
    pub mx: Vec<String>,
    pub limits: Limits,
}

impl Provider {
    /// Whether MX host `host` (any case, trailing dot or not) is this
    /// provider's.
    pub fn matches(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.mx.iter().any(|p| match p.strip_prefix("*.") {
            Some(suffix) => host
                .strip_suffix(suffix)
                .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
            None => *p == host,
        })
    }
}

/// The whole rule set: the file's entries over the built-in defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct Rules {
    pub default: Limits,
    pub domains: HashMap<String, Limits>,
    /// In file order, then the built-in ones the file did not redefine;
    /// the first that matches an MX host wins.
    pub providers: Vec<Provider>,
    /// Egress sources by name.
    pub sources: HashMap<String, Source>,
    /// Pools of sources by name.
    pub pools: HashMap<String, Pool>,
    /// Sender domain (lower case) → pool name.
    pub senders: HashMap<String, String>,
    /// Route name (lower case: a host of `--route`/`--relay-host`, or a
    /// recipient domain sent by MX) → pool name.
    pub routes: HashMap<String, String>,
    /// The pool of everything no other rule chose (`pool` in `[default]`).
    pub default_pool: Option<String>,
}

/// One egress source: the local address outbound connections are bound
/// to and the name they greet with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub name: String,
    pub bind: IpAddr,
    /// The EHLO name (the one its address's PTR names).
    pub ehlo: String,
}

/// Sources with weights: each message leaves through one of them, in
/// proportion to the weights (among those not suspended).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    pub name: String,
    /// (source name, weight), sorted by name; the weights add up to at
    /// least 1. The names are shared with every piece of work that uses
    /// them (a queue of millions holds no copy of its own).
    pub sources: Vec<(std::sync::Arc<str>, u32)>,
}

impl Pool {
    /// The source for the message whose [`spread`] is `seed`, among the
    /// sources `usable` allows, in proportion to their weights; `None`
    /// when none may be used. The same seed and the same usable sources
    /// give the same answer.
    pub fn pick(&self, seed: u64, usable: impl Fn(&str) -> bool) -> Option<&std::sync::Arc<str>> {
        let total: u64 = self
            .sources
            .iter()
            .filter(|(n, _)| usable(n))
            .map(|(_, w)| u64::from(*w))
            .sum();
        if total == 0 {
            return None;
        }
        let mut at = seed % total;
        for (name, w) in self.sources.iter().filter(|(n, _)| usable(n)) {
            let w = u64::from(*w);
            if at < w {
                return Some(name);
            }
            at -= w;
        }
        None
    }
}

/// A well-mixed 64-bit number from a message's queue id: the seed of
/// [`Pool::pick`] (FNV-1a, then the splitmix64 finalizer so that ids
/// differing in their last digits spread over the whole range).
pub fn spread(id: &str) -> u64 {
    let mut h = id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// Whether `name` may name a pool in the `X-Ringmta-Pool` header or the
/// spool's envelope: 1 to 64 of `A-Z a-z 0-9 _ . -`.
pub fn valid_pool_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// Which budget a delivery counts against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Key {
    /// A `[domain."..."]` entry.
    Domain(String),
    /// A `[provider.NAME]` entry: every domain with matching MX hosts.
    Provider(String),
    /// No entry: the destination alone (its text, as `relay::Target`
    /// prints it), under `[default]`.
    Destination(String),
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Key::Domain(d) => write!(f, "domain:{d}"),
            Key::Provider(p) => write!(f, "provider:{p}"),
            Key::Destination(t) => write!(f, "{t}"),
        }
    }
}

/// The limits in force for one budget: every key decided.
#[derive(Debug, Clone, PartialEq)]
pub struct Shape {
    pub key: Key,
    /// Connections at once (none: `--max-conns-per-dest` alone limits).
    pub max_connections: Option<usize>,
    pub max_message_rate: Option<Rate>,
    pub max_connection_rate: Option<Rate>,
    pub max_deliveries_per_connection: Option<u32>,
    /// How long a connection waits for more work before QUIT.
    pub idle_timeout: Duration,
    /// None: `--tls-policy`.
    pub tls_policy: Option<TlsPolicy>,
    /// None: `--retry-schedule`.
    pub retry: Option<std::sync::Arc<[Duration]>>,
}

impl Default for Rules {
    fn default() -> Rules {
        Rules::builtin()
    }
}

/// The built-in providers: (name, MX patterns, connections, messages).
/// Modest numbers, well under what these providers are known to accept
/// from one sending IP, so a first run is never throttled by them.
const BUILTIN: &[(&str, &[&str], usize, &str)] = &[
    (
        "google",
        &[
            "*.google.com",
            "*.googlemail.com",
            "*.gmail-smtp-in.l.google.com",
        ],
        20,
        "50/s",
    ),
    (
        "outlook",
        &["*.outlook.com", "*.protection.outlook.com", "*.hotmail.com"],
        10,
        "20/s",
    ),
    ("yahoo", &["*.yahoodns.net", "*.yahoo.com"], 10, "20/s"),
    ("icloud", &["*.icloud.com", "*.mail.me.com"], 5, "10/s"),
];

/// How long a built-in provider's connection stays open for more work.
const BUILTIN_IDLE: Duration = Duration::from_secs(5);
/// Deliveries per connection for the built-in providers.
const BUILTIN_PER_CONNECTION: u32 = 100;

impl Rules {
    /// The defaults without a file: no limit beyond `--max-conns-per-dest`
    /// for an unknown destination, the big providers' entries.
    pub fn builtin() -> Rules {
        let providers = BUILTIN
            .iter()
            .map(|(name, mx, conns, rate)| Provider {
                name: (*name).to_owned(),
                mx: mx.iter().map(|p| (*p).to_owned()).collect(),
                limits: Limits {
                    max_connections: Some(*conns),
                    // invariant: the table's rates parse (unit test).
                    max_message_rate: rate.parse().ok(),
                    max_connection_rate: None,
                    max_deliveries_per_connection: Some(BUILTIN_PER_CONNECTION),
                    idle_timeout: Some(BUILTIN_IDLE),
                    tls_policy: None,
                    retry: None,
                },
            })
            .collect();
        Rules {
            default: Limits::default(),
            domains: HashMap::new(),
            providers,
            sources: HashMap::new(),
            pools: HashMap::new(),
            senders: HashMap::new(),
            routes: HashMap::new(),
            default_pool: None,
        }
    }

    /// The pool a message leaves through: the one its trusted client
    /// named (`header`, if it exists), else its sender domain's, else its
    /// route's (`route`: the target's host or domain), else the default
    /// one; `None` without pools (no bind, `--helo-name`).
    pub fn pool_for(
        &self,
        header: Option<&str>,
        sender: Option<&str>,
        route: &str,
    ) -> Option<&Pool> {
        if self.pools.is_empty() {
            return None;
        }
        if let Some(p) = header.and_then(|h| self.pools.get(&h.to_ascii_lowercase())) {
            return Some(p);
        }
        let sender_domain = sender
            .and_then(|s| s.rsplit_once('@'))
            .map(|(_, d)| d.trim_end_matches('.').to_ascii_lowercase());
        let named = sender_domain
            .and_then(|d| self.senders.get(&d))
            .or_else(|| {
                self.routes
                    .get(&route.trim_end_matches('.').to_ascii_lowercase())
            })
            .or(self.default_pool.as_ref())?;
        self.pools.get(named)
    }

    /// Parses the TOML text of a `--shaping` file over the built-in
    /// defaults (a `[provider.google]` replaces the built-in one).
    pub fn parse(text: &str) -> Result<Rules, String> {
        let file: File = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut rules = Rules::builtin();
        if let Some(d) = file.default {
            rules.default = d.limits("[default]")?;
            rules.default_pool = d.pool.map(|p| p.to_ascii_lowercase());
        }
        parse_pools(&mut rules, file.source, file.pool, file.sender, file.route)?;
        for (domain, entry) in file.domain {
            let at = format!("[domain.{domain:?}]");
            if entry.pool.is_some() {
                return Err(format!(
                    "{at}: pool is chosen in [default], [sender] or [route]"
                ));
            }
            let limits = entry.limits(&at)?;
            let domain = domain.trim_end_matches('.').to_ascii_lowercase();
            if domain.is_empty() {
                return Err("[domain.\"\"]: empty domain".into());
            }
            rules.domains.insert(domain, limits);
        }
        let mut mine = Vec::new();
        for (name, entry) in file.provider {
            let at = format!("[provider.{name}]");
            if entry.mx.is_empty() {
                return Err(format!("{at}: mx = [...] must name at least one pattern"));
            }
            let mx = entry
                .mx
                .iter()
                .map(|p| p.trim_end_matches('.').to_ascii_lowercase())
                .collect::<Vec<_>>();
            if let Some(bad) = mx.iter().find(|p| p.is_empty() || p[1..].contains('*')) {
                return Err(format!("{at}: bad mx pattern {bad:?} (HOST or *.DOMAIN)"));
            }
            if entry.limits.pool.is_some() {
                return Err(format!(
                    "{at}: pool is chosen in [default], [sender] or [route]"
                ));
            }
            let limits = entry.limits.limits(&at)?;
            mine.push(Provider { name, mx, limits });
        }
        rules
            .providers
            .retain(|b| !mine.iter().any(|p| p.name == b.name));
        mine.extend(rules.providers);
        rules.providers = mine;
        if let Some(p) = &rules.default_pool {
            if !rules.pools.contains_key(p) {
                return Err(format!("[default] pool: no [pool.{p}]"));
            }
        }
        Ok(rules)
    }

    /// Reads and parses a `--shaping` file, and checks that this host has
    /// every source's address (a typo is refused at start or reload, not
    /// found as deferrals later).
    pub fn load(path: &std::path::Path) -> Result<Rules, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let rules = Rules::parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut sources: Vec<&Source> = rules.sources.values().collect();
        sources.sort_by(|a, b| a.name.cmp(&b.name));
        for s in sources {
            let domain = socket2::Domain::for_address(std::net::SocketAddr::new(s.bind, 0));
            let bound = socket2::Socket::new(domain, socket2::Type::STREAM, None)
                .and_then(|sock| sock.bind(&std::net::SocketAddr::new(s.bind, 0).into()));
            if let Err(e) = bound {
                return Err(format!(
                    "{}: [source.{}] bind = \"{}\": {e}",
                    path.display(),
                    s.name,
                    s.bind
                ));
            }
        }
        Ok(rules)
    }

    /// The provider whose patterns match one of `mx_hosts`, if any.
    pub fn provider_for<'a>(
        &self,
        mx_hosts: impl IntoIterator<Item = &'a str> + Clone,
    ) -> Option<&Provider> {
        self.providers
            .iter()
            .find(|p| mx_hosts.clone().into_iter().any(|h| p.matches(h)))
    }

    /// The limits for mail to `domain` (the recipient domain, lower case)
    /// sent to `destination` (the target's text) whose MX hosts are
    /// `mx_hosts` (empty when not looked up: a route or relay host).
    pub fn shape<'a>(
        &self,
        domain: Option<&str>,
        destination: &str,
        mx_hosts: impl IntoIterator<Item = &'a str> + Clone,
    ) -> Shape {
        let provider = self.provider_for(mx_hosts);
        let dom = domain.and_then(|d| self.domains.get_key_value(d));
        let mut limits = self.default.clone();
        let mut key = Key::Destination(destination.to_owned());
        if let Some(p) = provider {
            limits = p.limits.over(&limits);
            key = Key::Provider(p.name.clone());
        }
        if let Some((d, l)) = dom {
            limits = l.over(&limits);
            key = Key::Domain(d.clone());
        }
        Shape {
            key,
            max_connections: limits.max_connections,
            max_message_rate: limits.max_message_rate,
            max_connection_rate: limits.max_connection_rate,
            max_deliveries_per_connection: limits.max_deliveries_per_connection,
            idle_timeout: limits.idle_timeout.unwrap_or(Duration::ZERO),
            tls_policy: limits.tls_policy,
            retry: limits.retry,
        }
    }

    /// The retry schedule of mail to `domain` as far as the recipient
    /// domain alone decides it (its `[domain]` entry, else `[default]`):
    /// what the origin uses when the delivering worker named none (it did
    /// not get as far as a provider's entry).
    pub fn retry_for(&self, domain: &str) -> Option<std::sync::Arc<[Duration]>> {
        self.domains
            .get(domain)
            .and_then(|l| l.retry.clone())
            .or_else(|| self.default.retry.clone())
    }
}

/// Paces events at a [`Rate`] (GCRA: one reservation time, no timers):
/// each caller reserves the next free slot and waits until it comes.
/// Callers that reserve together are spread one interval apart; up to
/// `burst` events may go at once after a quiet spell.
#[derive(Debug, Clone, Default)]
pub struct Pacer {
    /// When the next event may go, if it has been reserved.
    next: Option<Instant>,
}

impl Pacer {
    /// Whether nothing is reserved past `now` (forgetting this pacer
    /// changes nothing).
    pub fn is_idle(&self, now: Instant) -> bool {
        self.next.is_none_or(|n| n <= now)
    }

    /// Reserves one event at `rate` and returns how long to wait for it
    /// from `now` (zero: go now).
    pub fn reserve(&mut self, now: Instant, rate: Rate, burst: u32) -> Duration {
        let interval = rate.interval();
        let slack = interval * burst.saturating_sub(1);
        // A quiet spell earns at most `burst` events at once.
        let floor = now.checked_sub(slack).unwrap_or(now);
        let at = match self.next {
            Some(n) if n > floor => n,
            _ => floor,
        };
        self.next = Some(at + interval);
        at.saturating_duration_since(now)
    }
}

/// The TOML file, as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    default: Option<Entry>,
    #[serde(default)]
    domain: HashMap<String, Entry>,
    #[serde(default)]
    provider: BTreeMap<String, ProviderEntry>,
    #[serde(default)]
    source: BTreeMap<String, SourceEntry>,
    #[serde(default)]
    pool: BTreeMap<String, PoolEntry>,
    #[serde(default)]
    sender: BTreeMap<String, PoolChoice>,
    #[serde(default)]
    route: BTreeMap<String, PoolChoice>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SourceEntry {
    bind: String,
    ehlo: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PoolEntry {
    sources: BTreeMap<String, u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PoolChoice {
    pool: String,
}

/// Checks and adds the `[source]`, `[pool]`, `[sender]` and `[route]`
/// tables: every name a pool or a choice refers to must exist.
fn parse_pools(
    rules: &mut Rules,
    sources: BTreeMap<String, SourceEntry>,
    pools: BTreeMap<String, PoolEntry>,
    senders: BTreeMap<String, PoolChoice>,
    routes: BTreeMap<String, PoolChoice>,
) -> Result<(), String> {
    // Names are case-insensitive (kept in lower case): the header, the
    // admin API and the suspensions name them too.
    for (name, e) in sources {
        let at = format!("[source.{name}]");
        let name = name.to_ascii_lowercase();
        if !valid_pool_name(&name) {
            return Err(format!("{at}: a name is 1-64 of A-Z a-z 0-9 _ . -"));
        }
        let bind: IpAddr = e
            .bind
            .trim()
            .parse()
            .map_err(|_| format!("{at} bind: {:?} is not an IP address", e.bind))?;
        if bind.is_unspecified() || bind.is_multicast() {
            return Err(format!("{at} bind: {bind} cannot be a source"));
        }
        let ehlo = e.ehlo.trim().trim_end_matches('.').to_ascii_lowercase();
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        };
        if ehlo.len() > 253 || !ehlo.contains('.') || !ehlo.split('.').all(label_ok) {
            return Err(format!(
                "{at} ehlo: {:?} is not a fully qualified host name",
                e.ehlo
            ));
        }
        rules
            .sources
            .insert(name.clone(), Source { name, bind, ehlo });
    }
    for (name, e) in pools {
        let at = format!("[pool.{name}]");
        let name = name.to_ascii_lowercase();
        let sources: BTreeMap<String, u32> = e
            .sources
            .into_iter()
            .map(|(s, w)| (s.to_ascii_lowercase(), w))
            .collect();
        if !valid_pool_name(&name) {
            return Err(format!("{at}: a name is 1-64 of A-Z a-z 0-9 _ . -"));
        }
        if let Some(unknown) = sources.keys().find(|s| !rules.sources.contains_key(*s)) {
            return Err(format!("{at} sources: no [source.{unknown}]"));
        }
        if sources.values().map(|&w| u64::from(w)).sum::<u64>() == 0 {
            return Err(format!(
                "{at} sources: the weights must add up to at least 1"
            ));
        }
        let sources = sources.into_iter().map(|(s, w)| (s.into(), w)).collect();
        rules.pools.insert(name.clone(), Pool { name, sources });
    }
    for (table, choices, into) in [
        ("sender", senders, &mut rules.senders),
        ("route", routes, &mut rules.routes),
    ] {
        for (key, c) in choices {
            let pool = c.pool.to_ascii_lowercase();
            if !rules.pools.contains_key(&pool) {
                return Err(format!("[{table}.{key:?}] pool: no [pool.{}]", c.pool));
            }
            let key = key.trim_end_matches('.').to_ascii_lowercase();
            if key.is_empty() {
                return Err(format!("[{table}.\"\"]: empty name"));
            }
            into.insert(key, pool);
        }
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProviderEntry {
    #[serde(default)]
    mx: Vec<String>,
    #[serde(flatten)]
    limits: Entry,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Entry {
    max_connections: Option<u64>,
    max_message_rate: Option<String>,
    max_connection_rate: Option<String>,
    max_deliveries_per_connection: Option<u64>,
    idle_timeout: Option<String>,
    tls_policy: Option<String>,
    /// `["1m", "5m", "30m"]`: the delays between attempts.
    retry: Option<Vec<String>>,
    /// Only in `[default]`: the pool of everything no other rule chose.
    pool: Option<String>,
}

impl Entry {
    fn limits(&self, at: &str) -> Result<Limits, String> {
        let rate = |r: &Option<String>, key: &str| {
            r.as_deref()
                .map(|s| s.parse::<Rate>().map_err(|e| format!("{at} {key}: {e}")))
                .transpose()
        };
        let positive = |n: Option<u64>, key: &str| match n {
            Some(0) => Err(format!("{at} {key}: must be at least 1")),
            other => Ok(other),
        };
        Ok(Limits {
            max_connections: positive(self.max_connections, "max_connections")?
                .map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
            max_message_rate: rate(&self.max_message_rate, "max_message_rate")?,
            max_connection_rate: rate(&self.max_connection_rate, "max_connection_rate")?,
            max_deliveries_per_connection: positive(
                self.max_deliveries_per_connection,
                "max_deliveries_per_connection",
            )?
            .map(|n| u32::try_from(n).unwrap_or(u32::MAX)),
            idle_timeout: self
                .idle_timeout
                .as_deref()
                .map(|s| {
                    crate::cli::parse_duration(s).map_err(|e| format!("{at} idle_timeout: {e}"))
                })
                .transpose()?,
            tls_policy: self
                .tls_policy
                .as_deref()
                .map(|s| {
                    TlsPolicy::parse(s).ok_or_else(|| {
                        format!(
                            "{at} tls_policy: {s:?} is not none, opportunistic, require, verify or dane"
                        )
                    })
                })
                .transpose()?,
            retry: self
                .retry
                .as_ref()
                .map(|delays| {
                    let parsed: Vec<Duration> = delays
                        .iter()
                        .map(|d| {
                            crate::cli::parse_duration(d)
                                .map_err(|e| format!("{at} retry: {e}"))
                        })
                        .collect::<Result<_, _>>()?;
                    if parsed.is_empty() || parsed.iter().any(Duration::is_zero) {
                        return Err(format!("{at} retry: need at least one non-zero delay"));
                    }
                    Ok(parsed.into())
                })
                .transpose()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
[default]
max_connections = 10
max_message_rate = "100/s"        # N/s, N/m or N/h
max_connection_rate = "20/s"
max_deliveries_per_connection = 100

[domain."example.com"]
max_message_rate = "10/s"

[provider.google]
mx = ["*.google.com", "*.googlemail.com"]
max_connections = 20
"#;

    #[test]
    fn the_issue_sample_parses_with_precedence() {
        let r = Rules::parse(SAMPLE).unwrap();
        let s = r.shape(Some("example.com"), "mx:example.com:25", []);
        assert_eq!(s.key, Key::Domain("example.com".into()));
        assert_eq!(s.max_message_rate, Some("10/s".parse().unwrap()));
        assert_eq!(s.max_connections, Some(10), "from [default]");
        let g = r.shape(
            Some("corp.test"),
            "mx:corp.test:25",
            ["aspmx.l.google.com."],
        );
        assert_eq!(g.key, Key::Provider("google".into()));
        assert_eq!(g.max_connections, Some(20));
        assert_eq!(g.max_message_rate, Some("100/s".parse().unwrap()));
        // The built-in google entry was replaced, not kept besides.
        assert_eq!(r.providers.iter().filter(|p| p.name == "google").count(), 1);
        assert!(r.providers.iter().any(|p| p.name == "outlook"));
        let other = r.shape(Some("x.test"), "mx:x.test:25", ["mx.x.test"]);
        assert_eq!(other.key, Key::Destination("mx:x.test:25".into()));
        assert_eq!(other.max_connection_rate, Some("20/s".parse().unwrap()));
    }

    #[test]
    fn domain_entry_wins_over_provider_key_by_key() {
        let r = Rules::parse(
            "[domain.\"big.test\"]\nmax_connections = 3\n[provider.p]\nmx=[\"*.p.test\"]\nmax_message_rate=\"5/m\"\n",
        )
        .unwrap();
        let s = r.shape(Some("big.test"), "mx:big.test:25", ["mx1.p.test"]);
        assert_eq!(s.key, Key::Domain("big.test".into()));
        assert_eq!(s.max_connections, Some(3));
        assert_eq!(s.max_message_rate, Some("5/m".parse().unwrap()));
    }

    #[test]
    fn bad_files_are_refused() {
        for bad in [
            "[default]\nmax_message_rate = \"10/d\"",
            "[default]\nmax_message_rate = \"0/s\"",
            "[default]\nmax_connections = 0",
            "[default]\nmax_conections = 3",
            "[provider.x]\nmax_connections = 3",
            "[provider.x]\nmx = [\"a.*.com\"]",
            "[default]\nidle_timeout = \"soon\"",
            "[default]\ntls_policy = \"maybe\"",
            "[bogus]\n",
        ] {
            assert!(Rules::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn builtin_rates_parse_and_match() {
        for (_, _, _, rate) in BUILTIN {
            assert!(rate.parse::<Rate>().is_ok());
        }
        let r = Rules::builtin();
        assert_eq!(
            r.provider_for(["gmail-smtp-in.l.google.com"]).unwrap().name,
            "google"
        );
        assert_eq!(
            r.provider_for(["example-com.mail.protection.outlook.com"])
                .unwrap()
                .name,
            "outlook"
        );
        assert!(r.provider_for(["google.com.evil.test"]).is_none());
        assert!(r.provider_for(["notgoogle.com"]).is_none());
    }

    #[test]
    fn rates_round_trip() {
        for s in ["10/s", "5/m", "100/h"] {
            assert_eq!(s.parse::<Rate>().unwrap().to_string(), s);
        }
        assert_eq!(
            "10/s".parse::<Rate>().unwrap().interval(),
            Duration::from_millis(100)
        );
    }

    #[test]
    fn pacer_spreads_reservations_one_interval_apart() {
        let rate: Rate = "10/s".parse().unwrap();
        let t0 = Instant::now();
        let mut p = Pacer::default();
        let waits: Vec<_> = (0..5).map(|_| p.reserve(t0, rate, 1)).collect();
        assert_eq!(
            waits,
            (0..5)
                .map(|i| Duration::from_millis(100 * i))
                .collect::<Vec<_>>()
        );
        // After a long quiet spell: `burst` at once, then paced again.
        let later = t0 + Duration::from_secs(10);
        let mut p = Pacer::default();
        p.reserve(t0, rate, 3);
        let w: Vec<_> = (0..4).map(|_| p.reserve(later, rate, 3)).collect();
        assert_eq!(w[..3], [Duration::ZERO; 3]);
        assert_eq!(w[3], Duration::from_millis(100));
    }

    #[test]
    fn n_events_take_n_minus_one_intervals() {
        // 200 messages at 10/s: the last goes 19.9 s after the first.
        let rate: Rate = "10/s".parse().unwrap();
        let t0 = Instant::now();
        let mut p = Pacer::default();
        let mut last = Duration::ZERO;
        for _ in 0..200 {
            last = p.reserve(t0, rate, 1);
        }
        assert_eq!(last, Duration::from_millis(19_900));
    }

    const POOLS: &str = r#"
[source.a]
bind = "127.0.0.2"
ehlo = "mta-a.example.net"
[source.b]
bind = "127.0.0.3"
ehlo = "MTA-B.example.net."
[source.c]
bind = "::1"
ehlo = "mta-c.example.net"
[pool.bulk]
sources = { a = 3, b = 1 }
[pool.vip]
sources = { c = 1 }
[sender."news.example.com"]
pool = "vip"
[route."smarthost.test"]
pool = "vip"
[default]
pool = "bulk"
max_connections = 4
"#;

    #[test]
    fn sources_and_pools_parse() {
        let r = Rules::parse(POOLS).unwrap();
        assert_eq!(r.sources["b"].ehlo, "mta-b.example.net");
        assert_eq!(r.sources["c"].bind, "::1".parse::<IpAddr>().unwrap());
        assert_eq!(r.pools["bulk"].sources, [("a".into(), 3), ("b".into(), 1)]);
        assert_eq!(r.default.max_connections, Some(4));
        // Choice: header > sender domain > route > default.
        let name = |p: Option<&Pool>| p.map(|p| p.name.clone());
        assert_eq!(
            name(r.pool_for(Some("vip"), Some("x@other.test"), "mx.test")),
            Some("vip".into())
        );
        assert_eq!(
            name(r.pool_for(Some("nope"), Some("x@other.test"), "mx.test")),
            Some("bulk".into()),
            "an unknown header pool falls through"
        );
        assert_eq!(
            name(r.pool_for(None, Some("x@NEWS.example.com"), "mx.test")),
            Some("vip".into())
        );
        assert_eq!(
            name(r.pool_for(None, None, "SmartHost.test")),
            Some("vip".into())
        );
        assert_eq!(name(r.pool_for(None, None, "mx.test")), Some("bulk".into()));
        // Without pools nothing is chosen.
        assert!(Rules::parse(SAMPLE)
            .unwrap()
            .pool_for(Some("x"), None, "y")
            .is_none());
    }

    #[test]
    fn bad_pools_are_refused() {
        let a = "[source.a]\nbind = \"127.0.0.2\"\nehlo = \"a.example\"\n";
        for bad in [
            "[source.a]\nbind = \"nowhere\"\nehlo = \"a.example\"".to_owned(),
            "[source.a]\nbind = \"0.0.0.0\"\nehlo = \"a.example\"".to_owned(),
            "[source.a]\nbind = \"127.0.0.2\"\nehlo = \"localhost\"".to_owned(),
            "[source.a]\nbind = \"127.0.0.2\"\nehlo = \"bad_name.example\"".to_owned(),
            "[source.a]\nbind = \"127.0.0.2\"".to_owned(),
            format!("{a}[pool.p]\nsources = {{ b = 1 }}"),
            format!("{a}[pool.p]\nsources = {{ a = 0 }}"),
            format!("{a}[pool.p]\nsources = {{ a = 1 }}\n[sender.\"x.test\"]\npool = \"q\""),
            format!("{a}[pool.p]\nsources = {{ a = 1 }}\n[route.\"x.test\"]\npool = \"q\""),
            format!("{a}[pool.p]\nsources = {{ a = 1 }}\n[default]\npool = \"q\""),
            format!("{a}[pool.p]\nsources = {{ a = 1 }}\n[domain.\"x.test\"]\npool = \"p\""),
        ] {
            assert!(Rules::parse(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn pick_follows_the_weights_and_skips_unusable_sources() {
        let r = Rules::parse(POOLS).unwrap();
        let bulk = &r.pools["bulk"];
        let mut a = 0;
        for i in 0..4000u32 {
            let id = format!("0005f1c2a3b4c5{i:08x}");
            match bulk.pick(spread(&id), |_| true).map(|s| &**s) {
                Some("a") => a += 1,
                Some("b") => {}
                other => panic!("{other:?}"),
            }
        }
        // 3:1 of 4000 is 3000 (a standard deviation is about 27).
        assert!((2850..=3150).contains(&a), "{a}");
        assert_eq!(bulk.pick(7, |s| s != "a").map(|s| &**s), Some("b"));
        assert_eq!(bulk.pick(7, |_| false), None);
        assert_eq!(bulk.pick(7, |_| true), bulk.pick(7, |_| true));
    }

    #[test]
    fn pool_names() {
        assert!(valid_pool_name("bulk-1.eu_west"));
        assert!(!valid_pool_name(""));
        assert!(!valid_pool_name("a b"));
        assert!(!valid_pool_name(&"x".repeat(65)));
    }

    /// The example in `deploy/shaping.toml` holds with its pool lines
    /// (`#> `) uncommented (the config test loads it as it is).
    #[test]
    fn deploy_example_with_pools_parses() {
        let text = include_str!("../../deploy/shaping.toml");
        let on: String = text
            .lines()
            .map(|l| l.strip_prefix("#> ").or(l.strip_prefix("#>")).unwrap_or(l))
            .collect::<Vec<_>>()
            .join("\n");
        let r = Rules::parse(&on).unwrap();
        assert_eq!(r.default_pool.as_deref(), Some("bulk"));
        assert_eq!(r.pools["bulk"].sources.len(), 2);
        assert_eq!(r.senders["news.example.com"], "bulk");
        assert_eq!(r.routes["smarthost.example.net"], "transactional");
        assert!(Rules::parse(text).unwrap().pools.is_empty());
    }
}
