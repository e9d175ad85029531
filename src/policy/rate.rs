//! Rate limits over time: connections, messages and recipients per minute
//! per client network (an IPv4 /24, an IPv6 /64), and messages per minute
//! per authenticated user.
//!
//! [`RateTable`] is the arithmetic: fixed one-minute windows, each starting
//! at a key's first counted event in it (so a client may get up to twice
//! its limit across one window boundary, never more within a window), and
//! a bound on the keys remembered: when full, expired windows go first,
//! then the sixteenth of the table with the oldest windows. Time comes in
//! as an `Instant`; nothing here reads a clock or does I/O.
//! [`RateLimiter`] is the one table a process shares (every shard's
//! sessions count in it, under a mutex never held across an await), so a
//! limit is the node's, whatever the number of shards.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The window every limit counts over.
pub const WINDOW: Duration = Duration::from_secs(60);

/// Most keys (client networks and users) remembered at once: about 100
/// bytes each, so a few MiB at most.
pub const MAX_KEYS: usize = 65_536;

/// What is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    Connections,
    Messages,
    Recipients,
}

/// The limits per [`WINDOW`]; 0 means no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RateLimits {
    /// Connections per client network.
    pub connections: u32,
    /// Messages (MAIL commands accepted) per client network.
    pub messages: u32,
    /// Recipients (RCPT commands accepted) per client network.
    pub recipients: u32,
    /// Messages per authenticated user.
    pub user_messages: u32,
}

impl RateLimits {
    pub fn any(&self) -> bool {
        self.connections > 0 || self.messages > 0 || self.recipients > 0 || self.user_messages > 0
    }
}

/// Who is counted: a client network, or a user.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RateKey {
    Net(IpAddr),
    User(Arc<str>),
}

impl RateKey {
    /// `ip`'s network: the IPv4 /24 (an IPv4-mapped IPv6 address is its
    /// IPv4 address), or the IPv6 /64.
    pub fn net(ip: IpAddr) -> RateKey {
        RateKey::Net(match ip.to_canonical() {
            IpAddr::V4(v4) => IpAddr::V4(Ipv4Addr::from(u32::from(v4) & !0xff)),
            IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        })
    }

    pub fn user(login: &str) -> RateKey {
        RateKey::User(Arc::from(login))
    }
}

/// A count went over its limit: what was counted and the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exceeded {
    pub what: Counted,
    pub limit: u32,
}

/// Counts per key in the current window, bounded in size.
#[derive(Debug)]
pub struct RateTable {
    limits: RateLimits,
    max_keys: usize,
    entries: HashMap<RateKey, Entry>,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    since: Instant,
    /// By [`Counted`] index.
    counts: [u32; 3],
}

impl RateTable {
    pub fn new(limits: RateLimits, max_keys: usize) -> Self {
        Self {
            limits,
            max_keys: max_keys.max(1),
            entries: HashMap::new(),
        }
    }

    /// New limits (SIGHUP); the counts so far stay.
    pub fn set_limits(&mut self, limits: RateLimits) {
        self.limits = limits;
    }

    pub fn limits(&self) -> RateLimits {
        self.limits
    }

    /// Counts one `what` for `key` at `now`, unless that would go over the
    /// limit: then nothing is counted and the limit is returned.
    pub fn take(&mut self, key: RateKey, what: Counted, now: Instant) -> Result<(), Exceeded> {
        let limit = self.limit(&key, what);
        if limit == 0 {
            return Ok(());
        }
        if !self.entries.contains_key(&key) && self.entries.len() >= self.max_keys {
            self.make_room(now);
        }
        let e = self.entries.entry(key).or_insert(Entry {
            since: now,
            counts: [0; 3],
        });
        if now.saturating_duration_since(e.since) >= WINDOW {
            *e = Entry {
                since: now,
                counts: [0; 3],
            };
        }
        let n = &mut e.counts[what as usize];
        if *n >= limit {
            return Err(Exceeded { what, limit });
        }
        *n += 1;
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn limit(&self, key: &RateKey, what: Counted) -> u32 {
        let l = &self.limits;
        match (key, what) {
            (RateKey::Net(_), Counted::Connections) => l.connections,
            (RateKey::Net(_), Counted::Messages) => l.messages,
            (RateKey::Net(_), Counted::Recipients) => l.recipients,
            (RateKey::User(_), Counted::Messages) => l.user_messages,
            (RateKey::User(_), _) => 0,
        }
    }

    /// Expired windows go first; if that frees nothing, the oldest
    /// sixteenth (a batch, so a spray of new addresses does not scan the
    /// table for each). A forgotten key starts a fresh window: the bound is
    /// what lets a hostile internet not grow the table.
    fn make_room(&mut self, now: Instant) {
        self.entries
            .retain(|_, e| now.saturating_duration_since(e.since) < WINDOW);
        if self.entries.len() < self.max_keys {
            return;
        }
        let mut ages: Vec<(Instant, RateKey)> = self
            .entries
            .iter()
            .map(|(k, e)| (e.since, k.clone()))
            .collect();
        let n = (self.max_keys / 16).clamp(1, ages.len());
        ages.select_nth_unstable_by_key(n - 1, |(since, _)| *since);
        for (_, k) in &ages[..n] {
            self.entries.remove(k);
        }
    }
}

/// The process's one [`RateTable`], shared by every shard.
#[derive(Debug)]
pub struct RateLimiter {
    table: Mutex<RateTable>,
}

impl RateLimiter {
    pub fn new(limits: RateLimits) -> Self {
        Self {
            table: Mutex::new(RateTable::new(limits, MAX_KEYS)),
        }
    }

    pub fn set_limits(&self, limits: RateLimits) {
        self.lock().set_limits(limits);
    }

    /// [`RateTable::take`].
    pub fn take(&self, key: RateKey, what: Counted, now: Instant) -> Result<(), Exceeded> {
        self.lock().take(key, what, now)
    }

    /// Whether any limit is set (a session counts nothing otherwise).
    pub fn enabled(&self) -> bool {
        self.lock().limits().any()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RateTable> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn net_key_is_the_ipv4_24_or_the_ipv6_64() {
        assert_eq!(
            RateKey::net(ip("192.0.2.7")),
            RateKey::net(ip("192.0.2.200"))
        );
        assert_eq!(
            RateKey::net(ip("::ffff:192.0.2.7")),
            RateKey::net(ip("192.0.2.1"))
        );
        assert_ne!(RateKey::net(ip("192.0.2.7")), RateKey::net(ip("192.0.3.7")));
        assert_eq!(
            RateKey::net(ip("2001:db8:1:2::1")),
            RateKey::net(ip("2001:db8:1:2:ffff::9"))
        );
        assert_ne!(
            RateKey::net(ip("2001:db8:1:2::1")),
            RateKey::net(ip("2001:db8:1:3::1"))
        );
    }

    #[test]
    fn limit_per_window_and_a_fresh_window_after_a_minute() {
        let mut t = RateTable::new(
            RateLimits {
                recipients: 3,
                ..Default::default()
            },
            100,
        );
        let now = Instant::now();
        let a = RateKey::net(ip("192.0.2.1"));
        for _ in 0..3 {
            t.take(a.clone(), Counted::Recipients, now).unwrap();
        }
        let over = t.take(a.clone(), Counted::Recipients, now).unwrap_err();
        assert_eq!(over.limit, 3);
        assert_eq!(over.what, Counted::Recipients);
        // Another network, and another kind of count, are not affected.
        t.take(RateKey::net(ip("192.0.3.1")), Counted::Recipients, now)
            .unwrap();
        t.take(a.clone(), Counted::Messages, now).unwrap();
        // Refusals are not counted: the window ends as it would have.
        let almost = now + WINDOW - Duration::from_millis(1);
        assert!(t.take(a.clone(), Counted::Recipients, almost).is_err());
        t.take(a, Counted::Recipients, now + WINDOW).unwrap();
    }

    #[test]
    fn users_count_messages_only_under_their_own_limit() {
        let mut t = RateTable::new(
            RateLimits {
                messages: 1,
                user_messages: 2,
                ..Default::default()
            },
            100,
        );
        let now = Instant::now();
        let u = RateKey::user("alice");
        t.take(u.clone(), Counted::Messages, now).unwrap();
        t.take(u.clone(), Counted::Messages, now).unwrap();
        assert!(t.take(u.clone(), Counted::Messages, now).is_err());
        t.take(u, Counted::Recipients, now).unwrap();
        t.take(RateKey::user("bob"), Counted::Messages, now)
            .unwrap();
    }

    #[test]
    fn no_limit_counts_nothing() {
        let mut t = RateTable::new(RateLimits::default(), 100);
        let now = Instant::now();
        for _ in 0..1000 {
            t.take(RateKey::net(ip("192.0.2.1")), Counted::Connections, now)
                .unwrap();
        }
        assert!(t.is_empty());
    }

    #[test]
    fn table_is_bounded_and_forgets_expired_then_oldest() {
        let mut t = RateTable::new(
            RateLimits {
                connections: 1,
                ..Default::default()
            },
            32,
        );
        let t0 = Instant::now();
        let key = |i: u32| RateKey::net(IpAddr::V4(Ipv4Addr::from(i << 8)));
        for i in 0..32 {
            t.take(
                key(i),
                Counted::Connections,
                t0 + Duration::from_millis(i.into()),
            )
            .unwrap();
        }
        assert_eq!(t.len(), 32);
        // Full: the two oldest (a sixteenth) make room for a newcomer.
        let t1 = t0 + Duration::from_secs(1);
        t.take(key(100), Counted::Connections, t1).unwrap();
        assert_eq!(t.len(), 31);
        t.take(key(0), Counted::Connections, t1).unwrap();
        assert!(t.take(key(2), Counted::Connections, t1).is_err());
        // A spray of a thousand networks never grows it past its bound.
        let t2 = t0 + Duration::from_secs(2);
        for i in 1000..2000 {
            t.take(key(i), Counted::Connections, t2).unwrap();
            assert!(t.len() <= 32);
        }
        // Once every window expired, they all go at once.
        let later = t2 + WINDOW;
        t.take(key(5000), Counted::Connections, later).unwrap();
        assert_eq!(t.len(), 1);
    }
}
