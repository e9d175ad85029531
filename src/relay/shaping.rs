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

use std::collections::HashMap;
use std::fmt;
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
                },
            })
            .collect();
        Rules {
            default: Limits::default(),
            domains: HashMap::new(),
            providers,
        }
    }

    /// Parses the TOML text of a `--shaping` file over the built-in
    /// defaults (a `[provider.google]` replaces the built-in one).
    pub fn parse(text: &str) -> Result<Rules, String> {
        let file: File = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut rules = Rules::builtin();
        if let Some(d) = file.default {
            rules.default = d.limits("[default]")?;
        }
        for (domain, entry) in file.domain {
            let limits = entry.limits(&format!("[domain.{domain:?}]"))?;
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
            let limits = entry.limits.limits(&at)?;
            mine.push(Provider { name, mx, limits });
        }
        rules
            .providers
            .retain(|b| !mine.iter().any(|p| p.name == b.name));
        mine.extend(rules.providers);
        rules.providers = mine;
        Ok(rules)
    }

    /// Reads and parses a `--shaping` file.
    pub fn load(path: &std::path::Path) -> Result<Rules, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Rules::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
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
        }
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
    provider: std::collections::BTreeMap<String, ProviderEntry>,
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
}
