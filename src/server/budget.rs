//! One shard's budget for message content in flight: the bodies its
//! connections are receiving (DATA and BDAT) and those waiting for the
//! spool, counted by their allocation (a `Vec`'s capacity, not its length).
//!
//! Each connection holds a [`Charge`]: before its session takes input it is
//! told how far its body may grow ([`Charge::allowance`]), and afterwards
//! the charge is set to what the body really holds. The shard's total stays
//! within `per_shard`, and one client address (IPv4 address, IPv6 /64)
//! within `per_client`, so a crowd of connections from one address cannot
//! take the room a client elsewhere needs. Dropping a charge (the
//! connection ends, or its task panics) gives its bytes back.
//!
//! Single-threaded like the shard that owns it: no locks, no atomics. It
//! decides nothing about SMTP; the session turns "no room" into replies.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};

/// The budget of one shard.
#[derive(Debug)]
pub struct InflightBudget {
    per_shard: usize,
    per_client: usize,
    used: Cell<usize>,
    /// Bytes held per client address; an address holding nothing has no
    /// entry, so the map is as large as the clients receiving bodies.
    by_client: RefCell<HashMap<ClientKey, usize>>,
}

/// What the fair share is counted against: the IPv4 address, or the /64 of
/// an IPv6 address (one site's allocation, as for the per-IP limits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientKey(IpAddr);

impl ClientKey {
    pub fn of(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V4(v4) => ClientKey(IpAddr::V4(v4)),
            IpAddr::V6(v6) => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                ClientKey(IpAddr::V6(Ipv6Addr::from(bits)))
            }
        }
    }
}

/// One connection's part of the budget; given back on drop.
#[derive(Debug)]
pub struct Charge<'a> {
    budget: &'a InflightBudget,
    client: ClientKey,
    bytes: usize,
}

impl InflightBudget {
    pub fn new(per_shard: usize, per_client: usize) -> Self {
        Self {
            per_shard,
            per_client: per_client.min(per_shard),
            used: Cell::new(0),
            by_client: RefCell::new(HashMap::new()),
        }
    }

    /// A charge of nothing, for a connection from `ip`.
    pub fn charge(&self, ip: IpAddr) -> Charge<'_> {
        Charge {
            budget: self,
            client: ClientKey::of(ip),
            bytes: 0,
        }
    }

    /// Bytes held on this shard.
    pub fn used(&self) -> usize {
        self.used.get()
    }

    /// Bytes held by one client address.
    pub fn used_by(&self, client: ClientKey) -> usize {
        self.by_client.borrow().get(&client).copied().unwrap_or(0)
    }

    fn apply(&self, client: ClientKey, old: usize, new: usize) {
        self.used.set(self.used.get() - old + new);
        let mut map = self.by_client.borrow_mut();
        let held = map.entry(client).or_insert(0);
        *held = *held - old + new;
        if *held == 0 {
            map.remove(&client);
        }
    }
}

impl Charge<'_> {
    /// The most this connection's content may hold: what it holds plus the
    /// room left both on the shard and for its client address.
    pub fn allowance(&self) -> usize {
        let b = self.budget;
        let shard_room = b.per_shard.saturating_sub(b.used.get());
        let client_room = b.per_client.saturating_sub(b.used_by(self.client));
        self.bytes + shard_room.min(client_room)
    }

    /// Records what the connection's content holds now. It may be more than
    /// the allowance (a message being handed to the spool is counted with
    /// the spool's copy of it): the room left for others is then zero.
    pub fn set(&mut self, bytes: usize) {
        if bytes != self.bytes {
            self.budget.apply(self.client, self.bytes, bytes);
            self.bytes = bytes;
        }
    }
}

impl Drop for Charge<'_> {
    fn drop(&mut self) {
        self.set(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn one_address_gets_its_share_and_others_the_rest() {
        let b = InflightBudget::new(1000, 500);
        let mut a1 = b.charge(ip("192.0.2.1"));
        let mut a2 = b.charge(ip("192.0.2.1"));
        let mut c = b.charge(ip("192.0.2.9"));
        assert_eq!(a1.allowance(), 500);
        a1.set(300);
        assert_eq!(a2.allowance(), 200, "the address's share is shared");
        a2.set(200);
        assert_eq!(a1.allowance(), 300);
        assert_eq!(c.allowance(), 500);
        c.set(500);
        let d = b.charge(ip("192.0.2.10"));
        assert_eq!(d.allowance(), 0, "the shard is full");
        drop(a1);
        assert_eq!(d.allowance(), 300);
        assert_eq!(b.used(), 700);
        drop(a2);
        drop(c);
        assert_eq!(b.used(), 0);
        assert!(b.by_client.borrow().is_empty());
    }

    #[test]
    fn a_charge_over_its_allowance_leaves_no_room() {
        let b = InflightBudget::new(100, 100);
        let mut a = b.charge(ip("192.0.2.1"));
        a.set(150);
        assert_eq!(a.allowance(), 150);
        assert_eq!(b.charge(ip("192.0.2.2")).allowance(), 0);
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() {
        let b = InflightBudget::new(1000, 400);
        let mut a = b.charge(ip("2001:db8:1:2::1"));
        a.set(400);
        assert_eq!(b.charge(ip("2001:db8:1:2:ffff::7")).allowance(), 0);
        assert_eq!(b.charge(ip("2001:db8:1:3::1")).allowance(), 400);
        let mut v4 = b.charge(ip("192.0.2.1"));
        v4.set(400);
        assert_eq!(b.charge(ip("::ffff:192.0.2.1")).allowance(), 0);
    }
}
