//! DNS blocklists and allowlists for the relay/MX port: `--dnsbl
//! ZONE[=WEIGHT]`, `--dnsbl-threshold`, `--dnswl ZONE`.
//!
//! A client is looked up under each zone as its reversed IPv4 octets or
//! IPv6 nibbles (`2.0.0.127.bl.example`); an A record in 127.0.0.0/8 means
//! listed, except 127.255.255.0/24, which lists use to say "your query was
//! refused" (Spamhaus' codes for public resolvers) and which must not block
//! anyone. The weights of the blocklists that list the client add up; at
//! the threshold it is refused. A client on an allowlist is never refused
//! by a blocklist (nor by the pre-greet screen).
//!
//! Every zone is asked at once, on shard tasks that ask the process's
//! resolver thread ([`crate::relay::mx::Resolver`]); the whole check waits
//! at most `--dnsbl-timeout`, and a zone that has not answered by then (or
//! whose lookup failed) counts as not listing the client, and is logged.
//! Answers are kept per shard for their TTL (at most [`MAX_TTL`]) in a
//! bounded [`Cache`]; failures are not kept.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::rc::Rc;
use std::str::FromStr;
use std::time::{Duration, Instant};

use futures_lite::FutureExt;

use crate::relay::mx::{ARecords, Resolver};

/// Longest an answer is kept, whatever its TTL says.
pub const MAX_TTL: Duration = Duration::from_secs(3600);
/// Most answers a shard keeps.
pub const MAX_CACHED: usize = 16_384;

/// One `--dnsbl ZONE[=WEIGHT]` (weight 1 when not given; a negative weight
/// lowers the score, as in Postfix's postscreen).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Zone {
    pub name: String,
    pub weight: i32,
}

impl FromStr for Zone {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (name, weight) = match s.split_once('=') {
            Some((n, w)) => (
                n,
                w.trim()
                    .parse::<i32>()
                    .map_err(|_| format!("bad weight in {s:?} (ZONE=WEIGHT, an integer)"))?,
            ),
            None => (s, 1),
        };
        Ok(Zone {
            name: zone_name(name)?,
            weight,
        })
    }
}

/// A zone name as given to `--dnswl` (and the zone part of `--dnsbl`):
/// lower case, no trailing dot.
pub fn zone_name(s: &str) -> Result<String, String> {
    let name = s.trim().trim_end_matches('.').to_ascii_lowercase();
    let ok = !name.is_empty()
        && name.len() <= 200
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if ok {
        Ok(name)
    } else {
        Err(format!("not a DNS zone: {s:?}"))
    }
}

/// The lists, as configured.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Lists {
    pub block: Vec<Zone>,
    pub allow: Vec<String>,
    /// Refused when the listing blocklists' weights add up to this.
    pub threshold: i32,
    /// The longest the whole check may take.
    pub timeout: Duration,
}

impl Lists {
    pub fn is_empty(&self) -> bool {
        self.block.is_empty() && self.allow.is_empty()
    }
}

/// What the lists say of a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// On this allowlist: no blocklist or screen applies.
    Allowed(String),
    /// The blocklists that list it reach the threshold; the first (in
    /// configuration order) is named in the refusal.
    Blocked { zones: Vec<String>, score: i32 },
    /// Neither (listed below the threshold, perhaps).
    Pass { score: i32 },
}

/// How one zone's lookup went, for the caller's metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    pub listed: u32,
    pub not_listed: u32,
    /// Failed, or not answered within the timeout.
    pub failed: u32,
}

/// The name to look up for `ip` under `zone`.
pub fn query_name(ip: IpAddr, zone: &str) -> String {
    let mut q = String::with_capacity(80);
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            let _ = write!(q, "{}.{}.{}.{}", o[3], o[2], o[1], o[0]);
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            for i in 0..32 {
                let nibble = (bits >> (i * 4)) & 0xf;
                if i > 0 {
                    q.push('.');
                }
                let _ = write!(q, "{nibble:x}");
            }
        }
    }
    q.push('.');
    q.push_str(zone);
    q
}

/// Whether an answer lists the client: an address in 127/8 that is not
/// one of the lists' error codes (127.255.255.0/24).
pub fn listing(addrs: &[Ipv4Addr]) -> Option<Ipv4Addr> {
    addrs
        .iter()
        .copied()
        .find(|a| a.octets()[0] == 127 && a.octets()[..3] != [127, 255, 255])
}

/// Answers kept on one shard: query name → the listing address (if any)
/// and until when it holds.
#[derive(Debug, Default)]
pub struct Cache {
    map: RefCell<HashMap<String, (Option<Ipv4Addr>, Instant)>>,
}

impl Cache {
    fn get(&self, name: &str, now: Instant) -> Option<Option<Ipv4Addr>> {
        let map = self.map.borrow();
        let (listed, until) = map.get(name)?;
        (now < *until).then_some(*listed)
    }

    fn put(&self, name: String, listed: Option<Ipv4Addr>, until: Instant, now: Instant) {
        let until = until.min(now + MAX_TTL);
        if until <= now {
            return;
        }
        let mut map = self.map.borrow_mut();
        if map.len() >= MAX_CACHED && !map.contains_key(&name) {
            map.retain(|_, (_, u)| *u > now);
            if map.len() >= MAX_CACHED {
                // Still full of live answers: the ones nearest their end go.
                let mut ends: Vec<(Instant, String)> =
                    map.iter().map(|(k, (_, u))| (*u, k.clone())).collect();
                let n = (MAX_CACHED / 16).min(ends.len()).max(1);
                ends.select_nth_unstable_by_key(n - 1, |(u, _)| *u);
                for (_, k) in &ends[..n] {
                    map.remove(k);
                }
            }
        }
        map.insert(name, (listed, until));
    }

    pub fn len(&self) -> usize {
        self.map.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Looks `ip` up in every list at once, within `lists.timeout`.
pub async fn check(
    resolver: &Resolver,
    cache: &Rc<Cache>,
    lists: &Lists,
    ip: IpAddr,
) -> (Verdict, Tally) {
    let deadline = Instant::now() + lists.timeout;
    // Every zone is asked before any answer is awaited.
    let allow = ask_all(resolver, cache, lists.allow.iter(), ip);
    let block = ask_all(resolver, cache, lists.block.iter().map(|z| &z.name), ip);
    let mut tally = Tally::default();
    let allow = collect(allow, cache, deadline, &mut tally).await;
    let block = collect(block, cache, deadline, &mut tally).await;
    if let Some(i) = allow.iter().position(Option::is_some) {
        return (Verdict::Allowed(lists.allow[i].clone()), tally);
    }
    let mut score = 0;
    let mut zones = Vec::new();
    for (zone, listed) in lists.block.iter().zip(&block) {
        if listed.is_some() {
            score += zone.weight;
            zones.push(zone.name.clone());
        }
    }
    if !zones.is_empty() && score >= lists.threshold {
        (Verdict::Blocked { zones, score }, tally)
    } else {
        (Verdict::Pass { score }, tally)
    }
}

/// A zone's answer from the cache, or a task asking the resolver.
enum Lookup {
    Cached(Option<Ipv4Addr>),
    /// The query name, and the task (cancelled when dropped).
    Asked(String, glommio::Task<ARecords>),
}

/// Starts the lookups of `ip` under each of `zones`, answered from the
/// cache when it can.
fn ask_all<'a>(
    resolver: &Resolver,
    cache: &Cache,
    zones: impl Iterator<Item = &'a String>,
    ip: IpAddr,
) -> Vec<Lookup> {
    let now = Instant::now();
    zones
        .map(|zone| {
            let name = query_name(ip, zone);
            match cache.get(&name, now) {
                Some(hit) => Lookup::Cached(hit),
                None => {
                    let resolver = resolver.clone();
                    let query = name.clone();
                    let task =
                        glommio::spawn_local(async move { resolver.a_records(&query).await });
                    Lookup::Asked(name, task)
                }
            }
        })
        .collect()
}

/// The lookups' results in order (`Some(address)`: listed), waiting no
/// later than `deadline`; answers go into the cache.
async fn collect(
    lookups: Vec<Lookup>,
    cache: &Cache,
    deadline: Instant,
    tally: &mut Tally,
) -> Vec<Option<Ipv4Addr>> {
    let mut out = Vec::with_capacity(lookups.len());
    for lookup in lookups {
        let (name, task) = match lookup {
            Lookup::Cached(hit) => {
                tally.count(hit);
                out.push(hit);
                continue;
            }
            Lookup::Asked(name, task) => (name, task),
        };
        let left = deadline.saturating_duration_since(Instant::now());
        let answer = async { Some(task.await) }
            .or(async {
                glommio::timer::sleep(left).await;
                None
            })
            .await;
        let now = Instant::now();
        let listed = match answer {
            Some(ARecords::Found(addrs, until)) => {
                let listed = listing(&addrs);
                cache.put(name, listed, until, now);
                listed
            }
            Some(ARecords::None(until)) => {
                if let Some(until) = until {
                    cache.put(name, None, until, now);
                }
                None
            }
            Some(ARecords::Failed(e)) => {
                tally.failed += 1;
                tracing::info!(query = %name, error = %e,
                    "DNS list lookup failed; taken as not listed");
                out.push(None);
                continue;
            }
            None => {
                tally.failed += 1;
                tracing::info!(query = %name,
                    "DNS list lookup timed out (--dnsbl-timeout); taken as not listed");
                out.push(None);
                continue;
            }
        };
        tally.count(listed);
        out.push(listed);
    }
    out
}

impl Tally {
    fn count(&mut self, listed: Option<Ipv4Addr>) {
        if listed.is_some() {
            self.listed += 1;
        } else {
            self.not_listed += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_names_reverse_octets_and_nibbles() {
        assert_eq!(
            query_name("127.0.0.2".parse().unwrap(), "bl.test"),
            "2.0.0.127.bl.test"
        );
        assert_eq!(
            query_name("::ffff:192.0.2.99".parse().unwrap(), "bl.test"),
            "99.2.0.192.bl.test"
        );
        // RFC 5782 2.4's example.
        assert_eq!(
            query_name(
                "2001:db8:1:2:3:4:567:89ab".parse().unwrap(),
                "ugly.example.com"
            ),
            "b.a.9.8.7.6.5.0.4.0.0.0.3.0.0.0.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2.ugly.example.com"
        );
    }

    #[test]
    fn zones_parse_with_weights() {
        assert_eq!(
            "zen.spamhaus.org".parse::<Zone>().unwrap(),
            Zone {
                name: "zen.spamhaus.org".into(),
                weight: 1
            }
        );
        assert_eq!("BL.Test.=3".parse::<Zone>().unwrap().weight, 3);
        assert_eq!("BL.Test.=3".parse::<Zone>().unwrap().name, "bl.test");
        assert_eq!("wl.test=-2".parse::<Zone>().unwrap().weight, -2);
        assert!("bl.test=x".parse::<Zone>().is_err());
        assert!("".parse::<Zone>().is_err());
        assert!("bad..zone".parse::<Zone>().is_err());
        assert!("bad zone".parse::<Zone>().is_err());
    }

    #[test]
    fn listing_ignores_error_codes_and_other_addresses() {
        let a = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        assert_eq!(listing(&[a("127.0.0.2")]), Some(a("127.0.0.2")));
        assert_eq!(listing(&[a("127.255.255.254")]), None);
        assert_eq!(listing(&[a("192.0.2.1")]), None);
        assert_eq!(
            listing(&[a("127.255.255.252"), a("127.0.0.10")]),
            Some(a("127.0.0.10"))
        );
        assert_eq!(listing(&[]), None);
    }

    #[test]
    fn cache_keeps_answers_for_their_ttl_and_stays_bounded() {
        let c = Cache::default();
        let now = Instant::now();
        let hit = Some(Ipv4Addr::new(127, 0, 0, 2));
        c.put("a".into(), hit, now + Duration::from_secs(10), now);
        assert_eq!(c.get("a", now), Some(hit));
        assert_eq!(c.get("a", now + Duration::from_secs(10)), None);
        // A TTL of 0 is not kept; a long one is cut to MAX_TTL.
        c.put("b".into(), None, now, now);
        assert_eq!(c.get("b", now), None);
        c.put("c".into(), None, now + Duration::from_secs(1 << 20), now);
        assert_eq!(c.get("c", now + MAX_TTL), None);
        for i in 0..MAX_CACHED + 100 {
            c.put(format!("n{i}"), None, now + Duration::from_secs(60), now);
        }
        assert!(c.len() <= MAX_CACHED);
    }
}
