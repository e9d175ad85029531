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

#[cfg(test)]
mod tests {
    use super::*;

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
