//! Outbound delivery: every accepted message reaches its destination or its
//! sender learns why not.
//!
//! * [`RelayConfig::target`] routes each recipient: `--route` entries, then
//!   local domains (Maildir), then `--relay-host`, else MX lookup ([`mx`]).
//! * [`Relay`] (one per shard) schedules the shard's queue: ready messages are
//!   split by destination into per-destination queues, each drained by at
//!   most `--max-conns-per-dest` workers that reuse their connection for
//!   several messages ([`client`] is the sans-IO SMTP client they drive).
//!   An SMTP destination is delivered by the shard that owns it (a hash of
//!   its host or domain); other shards hand their work for it over the
//!   [`handoff`] mesh and get the outcomes back to journal.
//! * Outbound connections use STARTTLS when offered, or insist on it, per
//!   `--tls-policy` ([`tls`]).
//! * Outcomes are journaled per recipient through the spool; 4xx and
//!   connection failures are retried on `--retry-schedule` until
//!   `--max-queue-age`, 5xx bounce at once ([`dsn`]).
//!
//! Must never lose a message: a recipient leaves the queue only through a
//! durable journal entry, and a failed delivery attempt is always deferred.

pub mod classify;
pub mod client;
pub mod control;
pub mod dane;
mod deliver;
pub mod dsn;
pub mod handoff;
pub mod maildir;
pub mod mta_sts;
pub mod mx;
pub mod shaping;
pub mod tls;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

pub use deliver::Relay;

/// Where a recipient's mail goes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// A fixed SMTP server (a `--route` or the `--relay-host`).
    Smtp { host: String, port: u16 },
    /// The domain's MX hosts, on this port.
    Mx { domain: String, port: u16 },
    /// Local delivery under this root.
    Maildir(PathBuf),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Smtp { host, port } => write!(f, "smtp:{host}:{port}"),
            Target::Mx { domain, port } => write!(f, "mx:{domain}:{port}"),
            Target::Maildir(p) => write!(f, "maildir:{}", p.display()),
        }
    }
}

impl Target {
    /// The host or domain alone (`maildir` for local delivery): what an
    /// operator may name a destination by, besides its whole text.
    pub fn name(&self) -> &str {
        match self {
            Target::Smtp { host, .. } => host,
            Target::Mx { domain, .. } => domain,
            Target::Maildir(_) => "maildir",
        }
    }

    /// Whether `destination` (either form, any case) names this target.
    pub fn is_named(&self, destination: &str) -> bool {
        self.name().eq_ignore_ascii_case(destination)
            || self.to_string().eq_ignore_ascii_case(destination)
    }
}

/// `--route DOMAIN=smtp:HOST:PORT` or `DOMAIN=maildir:PATH`; DOMAIN is exact
/// or `*.example.org` (any subdomain).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pattern: String,
    target: Target,
}

impl FromStr for Route {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (domain, target) = s.split_once('=').ok_or_else(|| {
            format!("{s:?}: expected DOMAIN=smtp:HOST:PORT or DOMAIN=maildir:PATH")
        })?;
        let target = if let Some(hp) = target.strip_prefix("smtp:") {
            let (host, port) = parse_host_port(hp)?;
            Target::Smtp { host, port }
        } else if let Some(p) = target.strip_prefix("maildir:") {
            Target::Maildir(PathBuf::from(p))
        } else {
            return Err(format!("{s:?}: target must start with smtp: or maildir:"));
        };
        Ok(Route {
            pattern: domain.to_ascii_lowercase(),
            target,
        })
    }
}

impl Route {
    /// The same route with its Maildir path passed through `f` (config
    /// resolution makes it absolute).
    pub fn map_maildir<E>(
        mut self,
        f: impl FnOnce(&Path) -> Result<PathBuf, E>,
    ) -> Result<Self, E> {
        if let Target::Maildir(p) = &self.target {
            self.target = Target::Maildir(f(p)?);
        }
        Ok(self)
    }

    fn matches(&self, domain: &str) -> bool {
        match self.pattern.strip_prefix("*.") {
            Some(suffix) => domain
                .strip_suffix(suffix)
                .is_some_and(|head| head.ends_with('.') && head.len() > 1),
            None => self.pattern == domain,
        }
    }
}

/// Where the first `--route` for `domain` (lower case) sends it, if one
/// matches. Routes come before the local domains: the session asks this
/// too, to know which recipients will be delivered into a Maildir.
pub fn route_for<'a>(routes: &'a [Route], domain: &str) -> Option<&'a Target> {
    routes.iter().find(|r| r.matches(domain)).map(|r| &r.target)
}

/// `HOST:PORT` (`[v6]:PORT` for IPv6 literals).
pub fn parse_host_port(s: &str) -> Result<(String, u16), String> {
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Ok((sa.ip().to_string(), sa.port()));
    }
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("{s:?}: expected HOST:PORT"))?;
    let port = port.parse().map_err(|_| format!("{s:?}: bad port"))?;
    if host.is_empty() {
        return Err(format!("{s:?}: empty host"));
    }
    Ok((host.to_owned(), port))
}

#[derive(Debug, Clone)]
pub struct RelayConfig {
    pub routes: Vec<Route>,
    pub relay_host: Option<(String, u16)>,
    pub local_domains: Vec<String>,
    pub maildir_root: PathBuf,
    pub outbound_port: u16,
    pub helo_name: String,
    pub dns_server: Option<SocketAddr>,
    pub connect_timeout: Duration,
    /// Waiting for any reply, content included.
    /// Waits for a reply to a command (`--relay-timeout`).
    pub reply_timeout: Duration,
    /// Wait for the greeting (`--relay-banner-timeout`).
    pub banner_timeout: Duration,
    /// Wait for the reply after the content (`--relay-final-timeout`).
    pub final_timeout: Duration,
    /// Each write of the content (`--relay-data-timeout`).
    pub data_timeout: Duration,
    pub retry_schedule: Vec<Duration>,
    pub max_queue_age: Duration,
    /// Warn senders of recipients still queued after this long.
    pub delay_warning: Option<Duration>,
    /// Most octets of the original a bounce returns (`--bounce-size-limit`).
    pub bounce_size_limit: usize,
    pub max_conns_per_dest: usize,
    /// Local Maildir deliveries under way at once, per Maildir root and
    /// shard (`--maildir-concurrency`).
    pub maildir_concurrency: usize,
    pub max_hops: usize,
    /// STARTTLS to the next hop: opportunistic or required ([`tls`]).
    pub tls_policy: tls::TlsPolicy,
    /// Verify the next hop's certificate (only with `require`).
    pub tls_verify: bool,
    /// DANE for every destination whose policy is not `none` (`--dane`).
    pub dane: bool,
    /// MTA-STS on (`--mta-sts`; restart-only: the resolver thread keeps
    /// the policies).
    pub mta_sts: bool,
    /// HTTPS port of policy hosts (`--mta-sts-port`).
    pub mta_sts_port: u16,
    /// More trust anchors for verified TLS (`--tls-ca-file`), read at start.
    pub tls_ca_file: Option<std::path::PathBuf>,
    pub tls_handshake_timeout: Duration,
    /// Work items per channel between two shards ([`handoff`]).
    pub handoff_capacity: usize,
    /// How often the scheduler looks for due retries when nothing wakes it.
    pub tick: Duration,
    /// Traffic shaping (`--shaping`, over the built-in provider defaults).
    pub shaping: std::sync::Arc<shaping::Rules>,
    /// Reply classification (`--bounce-rules`, over the built-in rules).
    pub classifier: std::sync::Arc<classify::Classifier>,
}

impl RelayConfig {
    /// Where mail for `addr` goes.
    pub fn target(&self, addr: &str) -> Target {
        let domain = addr
            .rsplit_once('@')
            .map_or(addr, |(_, d)| d)
            .to_ascii_lowercase();
        if let Some(t) = route_for(&self.routes, &domain) {
            return t.clone();
        }
        if addr.eq_ignore_ascii_case("postmaster") || self.local_domains.contains(&domain) {
            return Target::Maildir(self.maildir_root.clone());
        }
        if let Some((host, port)) = &self.relay_host {
            return Target::Smtp {
                host: host.clone(),
                port: *port,
            };
        }
        Target::Mx {
            domain,
            port: self.outbound_port,
        }
    }

    /// The delay before the next attempt for a message this old, with up to
    /// 10 % jitter from `seed`, or `None` once it is past `--max-queue-age`.
    pub fn next_retry(&self, age: Duration, seed: u64) -> Option<Duration> {
        self.next_retry_on(&self.retry_schedule, age, seed)
    }

    /// [`RelayConfig::next_retry`] on `schedule` (a shaping entry's
    /// `retry`) instead of `--retry-schedule`.
    pub fn next_retry_on(
        &self,
        schedule: &[Duration],
        age: Duration,
        seed: u64,
    ) -> Option<Duration> {
        if age >= self.max_queue_age {
            return None;
        }
        let mut elapsed = Duration::ZERO;
        let mut delay = *schedule.last()?;
        for d in schedule {
            elapsed += *d;
            if elapsed > age {
                delay = *d;
                break;
            }
        }
        let jitter = delay.mul_f64((seed % 1000) as f64 / 10_000.0);
        Some(delay + jitter)
    }

    /// When a recipient deferred `now` is tried next (Unix seconds): `delay`
    /// later, but not past the `--delay-warning` threshold while it is still
    /// ahead, so the attempt that crosses it (and sends the warning) comes
    /// on time.
    pub fn retry_at(&self, arrival: u64, now: u64, delay: Duration) -> u64 {
        let at = now + delay.as_secs().max(1);
        match self.delay_warning {
            Some(w) if now < arrival + w.as_secs() => at.min(arrival + w.as_secs()),
            _ => at,
        }
    }

    /// Whether a recipient deferred again `now`, in state `before` until
    /// this attempt, is owed its delay warning: warnings are on, it has been
    /// queued for at least `--delay-warning`, and the attempt before this
    /// one was still inside that time (it was pending, or its retry was
    /// scheduled no later than the threshold, which [`Self::retry_at`]
    /// guarantees). So each recipient is warned once, with no state kept
    /// beyond the journal's retry times: a restart neither repeats nor
    /// forgets a warning.
    pub fn delay_warning_due(
        &self,
        arrival: u64,
        now: u64,
        before: &crate::spool::queue::RcptState,
    ) -> bool {
        use crate::spool::queue::RcptState;
        let Some(w) = self.delay_warning else {
            return false;
        };
        let threshold = arrival + w.as_secs();
        now >= threshold
            && match before {
                RcptState::Pending => true,
                RcptState::Deferred { until } => *until <= threshold,
                RcptState::Delivered | RcptState::Bounced => false,
            }
    }
}

/// `--retry-schedule 1m,5m,15m,...`: delays between attempts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule(pub Vec<Duration>);

pub fn parse_schedule(s: &str) -> Result<Schedule, String> {
    let v: Vec<Duration> = s
        .split(',')
        .map(|p| crate::cli::parse_duration(p.trim()))
        .collect::<Result<_, _>>()?;
    if v.is_empty() || v.iter().any(|d| d.is_zero()) {
        return Err(format!("{s:?}: need at least one non-zero delay"));
    }
    Ok(Schedule(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> RelayConfig {
        RelayConfig {
            routes: vec![
                "example.net=smtp:127.0.0.1:2626".parse().unwrap(),
                "*.corp.example=maildir:/srv/mail".parse().unwrap(),
            ],
            relay_host: None,
            local_domains: vec!["localhost".into()],
            maildir_root: "/var/maildir".into(),
            outbound_port: 25,
            helo_name: "mx.test".into(),
            dns_server: None,
            connect_timeout: Duration::from_secs(30),
            reply_timeout: Duration::from_secs(300),
            banner_timeout: Duration::from_secs(300),
            final_timeout: Duration::from_secs(600),
            data_timeout: Duration::from_secs(180),
            retry_schedule: parse_schedule("1m,5m,15m").unwrap().0,
            delay_warning: None,
            bounce_size_limit: 51_200,
            max_queue_age: Duration::from_secs(5 * 86_400),
            max_conns_per_dest: 4,
            maildir_concurrency: 32,
            shaping: Default::default(),
            classifier: Default::default(),
            max_hops: 50,
            tls_policy: tls::TlsPolicy::Opportunistic,
            tls_verify: false,
            dane: false,
            mta_sts: false,
            mta_sts_port: 443,
            tls_ca_file: None,
            tls_handshake_timeout: Duration::from_secs(30),
            handoff_capacity: 1024,
            tick: Duration::from_secs(1),
        }
    }

    #[test]
    fn delay_warning_once_per_recipient_at_the_threshold() {
        use crate::spool::queue::RcptState;
        let mut c = cfg();
        let arrival = 1_000_000;
        // Off: never, and retries are not moved.
        assert!(!c.delay_warning_due(arrival, arrival + 86_400, &RcptState::Pending));
        assert_eq!(
            c.retry_at(arrival, arrival + 3000, Duration::from_secs(900)),
            arrival + 3900
        );
        c.delay_warning = Some(Duration::from_secs(3600));
        let t = arrival + 3600;
        // A retry that would jump over the threshold is pulled back to it.
        assert_eq!(
            c.retry_at(arrival, arrival + 3000, Duration::from_secs(900)),
            t
        );
        assert_eq!(
            c.retry_at(arrival, arrival + 100, Duration::from_secs(60)),
            arrival + 160
        );
        // Past the threshold, the schedule is the schedule.
        assert_eq!(
            c.retry_at(arrival, t + 10, Duration::from_secs(900)),
            t + 910
        );
        // Before the threshold: no warning.
        let before = RcptState::Deferred { until: t - 600 };
        assert!(!c.delay_warning_due(arrival, t - 1, &before));
        // The attempt that crosses it warns (also when it was pulled back
        // exactly to the threshold, or is late)...
        assert!(c.delay_warning_due(arrival, t, &RcptState::Deferred { until: t }));
        assert!(c.delay_warning_due(arrival, t + 500, &before));
        assert!(c.delay_warning_due(arrival, t + 500, &RcptState::Pending));
        // ...and the ones after it (scheduled past the threshold) do not.
        let after = c.retry_at(arrival, t, Duration::from_secs(900));
        assert!(!c.delay_warning_due(arrival, after, &RcptState::Deferred { until: after }));
        assert!(!c.delay_warning_due(arrival, t + 1, &RcptState::Delivered));
    }

    #[test]
    fn routing() {
        let c = cfg();
        assert_eq!(
            c.target("u@Example.NET"),
            Target::Smtp {
                host: "127.0.0.1".into(),
                port: 2626
            }
        );
        assert_eq!(
            c.target("u@a.corp.example"),
            Target::Maildir("/srv/mail".into())
        );
        assert_eq!(
            c.target("u@corp.example"),
            Target::Mx {
                domain: "corp.example".into(),
                port: 25
            }
        );
        assert_eq!(
            c.target("u@localhost"),
            Target::Maildir("/var/maildir".into())
        );
        assert_eq!(
            c.target("postmaster"),
            Target::Maildir("/var/maildir".into())
        );
        assert!("x=ftp:h".parse::<Route>().is_err());
    }

    #[test]
    fn retry_schedule_by_age() {
        let c = cfg();
        let m = |s| Duration::from_secs(s);
        assert_eq!(c.next_retry(m(0), 0), Some(m(60)));
        assert_eq!(c.next_retry(m(70), 0), Some(m(300)));
        assert_eq!(c.next_retry(m(10_000), 0), Some(m(900)));
        assert!(c.next_retry(m(10_000), 999).unwrap() < m(990));
        assert_eq!(c.next_retry(m(6 * 86_400), 0), None);
    }
}
