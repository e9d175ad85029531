//! Connection admission across shards: concurrent connections per client IP.
//!
//! SO_REUSEPORT spreads one client's connections over all shards, so the
//! count has to be process-wide. It is touched twice per connection (accept,
//! close) under a mutex that is never held across an await; that is the one
//! mutable thing the shards share besides the stop flag.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

#[derive(Debug)]
pub struct IpLimiter {
    max: u32,
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
            max,
            counts: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// A slot for one more connection from `ip`, or `None` at the limit.
    pub fn acquire(&self, ip: IpAddr) -> Option<IpSlot> {
        let ip = ip.to_canonical();
        if self.max == 0 {
            return Some(IpSlot { ip, counts: None });
        }
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = counts.entry(ip).or_insert(0);
        if *n >= self.max {
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
}
