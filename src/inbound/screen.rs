//! The pre-greet screen of the relay/MX port, after Postfix's postscreen:
//! what it checks, its settings, and its memory of the clients that failed.
//!
//! A client fails the screen when it talks before the greeting (within
//! `--greet-pause`), pipelines commands the server did not offer
//! PIPELINING for (before EHLO, or after HELO; `--screen-protocol`), or
//! sends a non-SMTP command (an HTTP request or CONNECT through an open
//! proxy, always; a line that does not start with a letter, with
//! `--screen-protocol`). It is answered 554 and dropped, and remembered
//! for `--screen-ttl`: until then its connections to the relay/MX port are
//! answered 421 at once. The memory is one process-wide table (a client's
//! connections land on any shard), bounded by [`MAX_REMEMBERED`]: expired
//! entries go first, then those nearest their end.
//!
//! The session ([`crate::smtp::Session`]) detects the protocol violations;
//! the connection driver ([`crate::server`]) times the pause and keeps the
//! socket. Clients in `--relay-network` and on a `--dnswl` allowlist are
//! never screened.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::dnsbl::Lists;
use crate::smtp::reply::Reply;
pub use crate::smtp::session::Violation;

/// Most clients remembered at once.
pub const MAX_REMEMBERED: usize = 65_536;

/// The screen's settings (reloaded on SIGHUP for the connections that
/// follow).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ScreenConfig {
    /// Wait this long before the 220; a client that talks meanwhile fails.
    /// Zero: no pause.
    pub greet_pause: Duration,
    /// How long a client that failed is refused (zero: not remembered).
    pub ttl: Duration,
    /// The DNS lists.
    pub lists: Lists,
}

/// A client remembered for failing the screen.
pub const REMEMBERED: Reply = Reply::new(
    421,
    "4.7.0",
    "Error: refused for an earlier protocol violation, try again later",
);

/// Clients that failed the screen, until their entry expires.
#[derive(Debug, Default)]
pub struct Memory {
    table: Mutex<HashMap<IpAddr, (Violation, Instant)>>,
}

impl Memory {
    /// Remembers `ip` (its /64 for IPv6) as having failed for `why`, for
    /// `ttl` from `now` (nothing when `ttl` is zero).
    pub fn record(&self, ip: IpAddr, why: Violation, ttl: Duration, now: Instant) {
        if ttl.is_zero() {
            return;
        }
        let key = key(ip);
        let mut t = self.lock();
        if t.len() >= MAX_REMEMBERED && !t.contains_key(&key) {
            t.retain(|_, (_, until)| *until > now);
            if t.len() >= MAX_REMEMBERED {
                let mut ends: Vec<(Instant, IpAddr)> =
                    t.iter().map(|(k, (_, u))| (*u, *k)).collect();
                let n = (MAX_REMEMBERED / 16).min(ends.len()).max(1);
                ends.select_nth_unstable_by_key(n - 1, |(u, _)| *u);
                for (_, k) in &ends[..n] {
                    t.remove(k);
                }
            }
        }
        t.insert(key, (why, now + ttl));
    }

    /// Why `ip` is refused now, if it is.
    pub fn check(&self, ip: IpAddr, now: Instant) -> Option<Violation> {
        let key = key(ip);
        let mut t = self.lock();
        match t.get(&key) {
            Some((why, until)) if *until > now => Some(*why),
            Some(_) => {
                t.remove(&key);
                None
            }
            None => None,
        }
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, (Violation, Instant)>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// An IPv4 address, or the /64 of an IPv6 one.
fn key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_until_the_ttl_and_per_ipv6_64() {
        let m = Memory::default();
        let now = Instant::now();
        let ttl = Duration::from_secs(60);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        m.record(a, Violation::Pregreet, ttl, now);
        assert_eq!(m.check(a, now), Some(Violation::Pregreet));
        assert_eq!(m.check("192.0.2.2".parse().unwrap(), now), None);
        assert_eq!(m.check(a, now + ttl), None);
        assert!(m.is_empty());
        m.record("2001:db8::1".parse().unwrap(), Violation::NonSmtp, ttl, now);
        assert_eq!(
            m.check("2001:db8::ffff".parse().unwrap(), now),
            Some(Violation::NonSmtp)
        );
        m.record(a, Violation::Pipelining, Duration::ZERO, now);
        assert_eq!(m.check(a, now), None);
    }

    #[test]
    fn memory_is_bounded() {
        let m = Memory::default();
        let now = Instant::now();
        for i in 0..(MAX_REMEMBERED as u32 + 1000) {
            let ip = IpAddr::V4(std::net::Ipv4Addr::from(i));
            m.record(ip, Violation::Pregreet, Duration::from_secs(60), now);
        }
        assert!(m.len() <= MAX_REMEMBERED);
        // The newest is there.
        let last = IpAddr::V4(std::net::Ipv4Addr::from(MAX_REMEMBERED as u32 + 999));
        assert!(m.check(last, now).is_some());
    }
}
