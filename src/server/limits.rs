//! Per-client limits across shards: concurrent connections per client, and
//! the AUTH throttle (failed logins in a window, password checks at once).
//!
//! A "client" is [`client_key`]: an IPv4 address, or the /64 of an IPv6 one
//! (one subscriber usually holds a whole /64, and hopping inside it must not
//! buy fresh limits). SO_REUSEPORT spreads one client's connections over all
//! shards, so the counts are process-wide, each under a mutex that is never
//! held across an await. The tables are bounded: the connection table holds
//! only clients with a connection open; the AUTH table evicts expired
//! entries first, then the least recently seen ones that are neither
//! blocked nor checking a password, and never forgets a blocked client to
//! make room for others.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The key per-client limits count under: the IPv4 address (an IPv4-mapped
/// IPv6 address is its IPv4 address), or the IPv6 address with its low 64
/// bits cleared.
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(bits))
        }
    }
}

#[derive(Debug)]
pub struct IpLimiter {
    /// Replaced on SIGHUP; counts only while it is not 0.
    max: AtomicU32,
    counts: Arc<Mutex<HashMap<IpAddr, u32>>>,
}

/// Releases its slot on drop.
#[derive(Debug)]
pub struct IpSlot {
    ip: IpAddr,
    counts: Option<Arc<Mutex<HashMap<IpAddr, u32>>>>,
}

impl IpLimiter {
    /// `max == 0` means no limit.
    pub fn new(max: u32) -> Self {
        Self {
            max: AtomicU32::new(max),
            counts: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// A new limit (SIGHUP) for the connections that follow; those open
    /// stay. Connections accepted while there was no limit are not counted.
    pub fn set_max(&self, max: u32) {
        self.max.store(max, Ordering::Relaxed);
    }

    /// A slot for one more connection from `ip`'s [`client_key`], or
    /// `None` at the limit.
    pub fn acquire(&self, ip: IpAddr) -> Option<IpSlot> {
        let ip = client_key(ip);
        let max = self.max.load(Ordering::Relaxed);
        if max == 0 {
            return Some(IpSlot { ip, counts: None });
        }
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = counts.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(IpSlot {
            ip,
            counts: Some(self.counts.clone()),
        })
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let Some(counts) = &self.counts else { return };
        let mut counts = counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

/// The AUTH limits of one client ([`client_key`]).
#[derive(Debug, Clone, Copy)]
pub struct AuthLimits {
    /// Failed logins within `window` after which AUTH answers 421 (0: no
    /// limit). A check in progress counts as a failure until it succeeds.
    pub max_failures: u32,
    pub window: Duration,
    /// Password checks in progress at once (0: no limit); more get 454.
    pub max_checks: u32,
    /// Most clients remembered at once.
    pub max_clients: usize,
}

/// Why an AUTH attempt may not go on to the password check.
#[derive(Debug, PartialEq, Eq)]
pub enum AuthRefusal {
    /// The client used up its failures in the window: 421, close.
    Blocked,
    /// The client has `max_checks` checks in progress: 454, try later.
    Busy,
    /// Every remembered client is blocked or checking, so there is no room
    /// to count a new one: 454 rather than an uncounted check.
    TableFull,
}

/// Failed-login counts and checks in progress per client, process-wide.
#[derive(Debug)]
pub struct AuthThrottle {
    limits: AuthLimits,
    table: Mutex<HashMap<IpAddr, AuthEntry>>,
}

#[derive(Debug, Clone, Copy)]
struct AuthEntry {
    /// Failures in the window that began at `since`, checks in progress
    /// included.
    failures: u32,
    since: Instant,
    checking: u32,
    /// Last attempt: eviction order.
    seen: Instant,
}

/// One password check, reserved as a failure: [`AuthAttempt::succeeded`]
/// gives the failure back; dropping it ends the check either way.
#[derive(Debug)]
pub struct AuthAttempt<'a> {
    throttle: &'a AuthThrottle,
    /// `None` when there are no limits to keep.
    key: Option<IpAddr>,
    /// The window the failure was reserved in.
    since: Instant,
}

impl AuthThrottle {
    pub fn new(limits: AuthLimits) -> Self {
        Self {
            limits,
            table: Mutex::new(HashMap::new()),
        }
    }

    /// Reserves one password check for `ip`, counted as a failure until it
    /// succeeds: so that many concurrent attempts cannot all pass the check
    /// for "too many failures" before the first of them failed.
    pub fn reserve(&self, ip: IpAddr, now: Instant) -> Result<AuthAttempt<'_>, AuthRefusal> {
        let l = self.limits;
        if l.max_failures == 0 && l.max_checks == 0 {
            return Ok(AuthAttempt {
                throttle: self,
                key: None,
                since: now,
            });
        }
        let key = client_key(ip);
        let mut table = self.lock();
        if !table.contains_key(&key) && table.len() >= l.max_clients.max(1) {
            self.make_room(&mut table, now)?;
        }
        let e = table.entry(key).or_insert(AuthEntry {
            failures: 0,
            since: now,
            checking: 0,
            seen: now,
        });
        e.seen = now;
        if now.saturating_duration_since(e.since) >= l.window {
            e.failures = 0;
            e.since = now;
        }
        if l.max_failures > 0 && e.failures >= l.max_failures {
            return Err(AuthRefusal::Blocked);
        }
        if l.max_checks > 0 && e.checking >= l.max_checks {
            return Err(AuthRefusal::Busy);
        }
        if l.max_failures > 0 {
            e.failures += 1;
        }
        e.checking += 1;
        Ok(AuthAttempt {
            throttle: self,
            key: Some(key),
            since: e.since,
        })
    }

    /// True when `ip`'s client has used up its failures in the window.
    pub fn is_blocked(&self, ip: IpAddr, now: Instant) -> bool {
        self.lock()
            .get(&client_key(ip))
            .is_some_and(|e| self.blocked(e, now))
    }

    fn blocked(&self, e: &AuthEntry, now: Instant) -> bool {
        self.limits.max_failures > 0
            && e.failures >= self.limits.max_failures
            && now.saturating_duration_since(e.since) < self.limits.window
    }

    /// Frees room for one more client: expired entries go first, then the
    /// least recently seen sixteenth of those neither blocked nor checking
    /// (a batch, so a spray of new addresses does not scan the table for
    /// each). A blocked client is never forgotten early: if nothing else
    /// can go, the newcomer is refused.
    fn make_room(
        &self,
        table: &mut HashMap<IpAddr, AuthEntry>,
        now: Instant,
    ) -> Result<(), AuthRefusal> {
        let window = self.limits.window;
        table.retain(|_, e| e.checking > 0 || now.saturating_duration_since(e.since) < window);
        let max = self.limits.max_clients.max(1);
        if table.len() < max {
            return Ok(());
        }
        let mut idle: Vec<(Instant, IpAddr)> = table
            .iter()
            .filter(|(_, e)| e.checking == 0 && !self.blocked(e, now))
            .map(|(k, e)| (e.seen, *k))
            .collect();
        if idle.is_empty() {
            return Err(AuthRefusal::TableFull);
        }
        let n = (max / 16).clamp(1, idle.len());
        idle.select_nth_unstable(n - 1);
        for (_, k) in &idle[..n] {
            table.remove(k);
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, AuthEntry>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl AuthAttempt<'_> {
    /// The password was right: the reserved failure is given back (unless
    /// its window has ended meanwhile, and the count with it).
    pub fn succeeded(self) {
        let Some(key) = self.key else { return };
        let mut table = self.throttle.lock();
        if let Some(e) = table.get_mut(&key) {
            if e.since == self.since {
                e.failures = e.failures.saturating_sub(1);
            }
        }
    }
}

impl Drop for AuthAttempt<'_> {
    fn drop(&mut self) {
        let Some(key) = self.key else { return };
        let mut table = self.throttle.lock();
        if let Some(e) = table.get_mut(&key) {
            e.checking = e.checking.saturating_sub(1);
            if e.checking == 0 && e.failures == 0 {
                table.remove(&key);
            }
        }
    }
}

/// Logs commands refused by policy (relay attempts, MAIL before AUTH,
/// senders a user may not use), at most [`RejectLog::PER_SECOND`] lines a
/// second per shard; what is held back is counted and reported with the next
/// line, so a flood cannot fill the disk or hide in it.
#[derive(Debug)]
pub struct RejectLog {
    window: std::cell::Cell<std::time::Instant>,
    logged: std::cell::Cell<u32>,
    suppressed: std::cell::Cell<u64>,
}

impl Default for RejectLog {
    fn default() -> Self {
        Self {
            window: std::cell::Cell::new(std::time::Instant::now()),
            logged: std::cell::Cell::new(0),
            suppressed: std::cell::Cell::new(0),
        }
    }
}

impl RejectLog {
    pub const PER_SECOND: u32 = 20;

    /// Whether this rejection may be logged now; `Some(n)` also carries how
    /// many were held back since the last line.
    pub fn admit(&self, now: std::time::Instant) -> Option<u64> {
        if now.duration_since(self.window.get()) >= std::time::Duration::from_secs(1) {
            self.window.set(now);
            self.logged.set(0);
        }
        if self.logged.get() >= Self::PER_SECOND {
            self.suppressed.set(self.suppressed.get() + 1);
            return None;
        }
        self.logged.set(self.logged.get() + 1);
        Some(self.suppressed.replace(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reject_log_is_rate_limited_and_counts_what_it_drops() {
        let log = RejectLog::default();
        let t0 = std::time::Instant::now();
        for _ in 0..RejectLog::PER_SECOND {
            assert_eq!(log.admit(t0), Some(0));
        }
        assert_eq!(log.admit(t0), None);
        assert_eq!(log.admit(t0), None);
        let t1 = t0 + std::time::Duration::from_secs(1);
        assert_eq!(log.admit(t1), Some(2));
        assert_eq!(log.admit(t1), Some(0));
    }

    #[test]
    fn limits_per_ip_and_releases() {
        let l = IpLimiter::new(2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let s1 = l.acquire(a).unwrap();
        let _s2 = l.acquire(a).unwrap();
        assert!(l.acquire(a).is_none());
        assert!(l.acquire(b).is_some());
        drop(s1);
        assert!(l.acquire(a).is_some());
    }

    #[test]
    fn client_key_is_the_ipv4_address_or_the_ipv6_64() {
        let k = |s: &str| client_key(s.parse().unwrap()).to_string();
        assert_eq!(k("192.0.2.7"), "192.0.2.7");
        assert_eq!(k("::ffff:192.0.2.7"), "192.0.2.7");
        assert_eq!(k("2001:db8:1:2:aaaa:bbbb:cccc:dddd"), "2001:db8:1:2::");
        assert_eq!(k("2001:db8:1:2::1"), k("2001:db8:1:2:ffff::9"));
        assert_ne!(k("2001:db8:1:2::1"), k("2001:db8:1:3::1"));
    }

    #[test]
    fn connection_limit_counts_an_ipv6_64_as_one_client() {
        let l = IpLimiter::new(2);
        let a: IpAddr = "2001:db8::1".parse().unwrap();
        let b: IpAddr = "2001:db8::ffff:2".parse().unwrap();
        let other: IpAddr = "2001:db8:0:1::1".parse().unwrap();
        let _s1 = l.acquire(a).unwrap();
        let _s2 = l.acquire(b).unwrap();
        assert!(l.acquire("2001:db8::3".parse().unwrap()).is_none());
        assert!(l.acquire(other).is_some());
        let v4 = IpLimiter::new(1);
        let _s = v4.acquire("192.0.2.1".parse().unwrap()).unwrap();
        assert!(v4.acquire("::ffff:192.0.2.1".parse().unwrap()).is_none());
    }

    fn throttle(max_failures: u32, max_checks: u32, max_clients: usize) -> AuthThrottle {
        AuthThrottle::new(AuthLimits {
            max_failures,
            window: Duration::from_secs(60),
            max_checks,
            max_clients,
        })
    }

    /// Regression: the failure used to be counted after the password check
    /// and the block checked before it, so 60 concurrent wrong passwords
    /// all got checked (and 535).
    #[test]
    fn auth_attempts_in_flight_count_as_failures() {
        let t = throttle(3, 0, 100);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let now = Instant::now();
        let held: Vec<_> = (0..3).map(|_| t.reserve(ip, now).unwrap()).collect();
        assert_eq!(t.reserve(ip, now).unwrap_err(), AuthRefusal::Blocked);
        // Two succeed (their failures are given back), one fails.
        let mut held = held.into_iter();
        held.next().unwrap().succeeded();
        held.next().unwrap().succeeded();
        drop(held);
        let a = t.reserve(ip, now).unwrap();
        let b = t.reserve(ip, now).unwrap();
        assert_eq!(t.reserve(ip, now).unwrap_err(), AuthRefusal::Blocked);
        drop((a, b));
        assert!(t.is_blocked(ip, now));
        // The window ends, the count with it.
        let later = now + Duration::from_secs(60);
        assert!(!t.is_blocked(ip, later));
        t.reserve(ip, later).unwrap().succeeded();
    }

    #[test]
    fn auth_checks_at_once_are_capped_per_client() {
        let t = throttle(0, 2, 100);
        let now = Instant::now();
        let a = t.reserve("2001:db8::1".parse().unwrap(), now).unwrap();
        let _b = t.reserve("2001:db8::2".parse().unwrap(), now).unwrap();
        let same_64: IpAddr = "2001:db8::3".parse().unwrap();
        assert_eq!(t.reserve(same_64, now).unwrap_err(), AuthRefusal::Busy);
        assert!(t.reserve("2001:db8:0:1::3".parse().unwrap(), now).is_ok());
        drop(a);
        assert!(t.reserve(same_64, now).is_ok());
    }

    /// Regression: a full table used to be cleared, so a flood of failures
    /// from other addresses gave a blocked client a fresh count.
    #[test]
    fn auth_table_full_never_unblocks_a_blocked_client() {
        let t = throttle(2, 0, 64);
        let now = Instant::now();
        let blocked: IpAddr = "198.51.100.1".parse().unwrap();
        drop(t.reserve(blocked, now).unwrap());
        drop(t.reserve(blocked, now).unwrap());
        assert!(t.is_blocked(blocked, now));
        // Ten tables' worth of one-failure clients.
        for i in 0..640u32 {
            let ip = IpAddr::V4((0x0a00_0000 + i).into());
            drop(
                t.reserve(ip, now + Duration::from_millis(u64::from(i) + 1))
                    .unwrap(),
            );
            assert!(t.lock().len() <= 64);
        }
        assert!(t.is_blocked(blocked, now + Duration::from_secs(1)));
        assert_eq!(
            t.reserve(blocked, now + Duration::from_secs(1))
                .unwrap_err(),
            AuthRefusal::Blocked
        );
        // The most recent ones are still counted: the oldest went first.
        let last = IpAddr::V4((0x0a00_0000 + 639u32).into());
        assert_eq!(t.lock()[&last].failures, 1);
        assert!(!t.lock().contains_key(&IpAddr::V4(0x0a00_0000u32.into())));
    }

    #[test]
    fn auth_table_full_drops_expired_entries_first_then_refuses() {
        let t = throttle(1, 0, 4);
        let now = Instant::now();
        let ips: Vec<IpAddr> = (1..=4u8)
            .map(|i| IpAddr::V4([192, 0, 2, i].into()))
            .collect();
        for ip in &ips {
            drop(t.reserve(*ip, now).unwrap());
        }
        // Every entry is blocked: a newcomer cannot be counted, so it is
        // refused rather than checked uncounted, and nobody is unblocked.
        let new: IpAddr = "203.0.113.9".parse().unwrap();
        assert_eq!(t.reserve(new, now).unwrap_err(), AuthRefusal::TableFull);
        assert!(ips.iter().all(|ip| t.is_blocked(*ip, now)));
        // Once their window is over they make room.
        let later = now + Duration::from_secs(61);
        drop(t.reserve(new, later).unwrap());
        assert!(t.is_blocked(new, later));
        assert_eq!(t.lock().len(), 1);
    }

    #[test]
    fn unlimited_auth_keeps_no_table() {
        let t = throttle(0, 0, 4);
        let now = Instant::now();
        for i in 0..10u8 {
            drop(t.reserve(IpAddr::V4([192, 0, 2, i].into()), now).unwrap());
        }
        assert!(t.lock().is_empty());
    }
}
