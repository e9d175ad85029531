//! Checks of inbound clients and mail on the relay/MX port: DNS blocklists
//! and allowlists ([`dnsbl`]) and the pre-greet screen and its memory of
//! clients that failed it ([`screen`]), looked up through the process's
//! resolver thread ([`crate::relay::mx::Resolver`], so `--dns-server`
//! applies), each bounded by a timeout; and sender authentication (SPF,
//! DKIM, DMARC, ARC → `Authentication-Results`, [`auth`]) over the
//! per-shard resolvers and caches of [`dns`]. The decisions are made here, the
//! sockets stay in [`crate::server`].

pub mod auth;
pub mod dns;
pub mod dnsbl;
pub mod screen;
