//! Checks of inbound clients and mail on the relay/MX port: DNS blocklists
//! and allowlists ([`dnsbl`]) and the pre-greet screen and its memory of
//! clients that failed it ([`screen`]).
//!
//! Lookups go through the process's resolver thread
//! ([`crate::relay::mx::Resolver`], so `--dns-server` applies), each
//! bounded by a timeout; the decisions are made here, the sockets stay in
//! [`crate::server`].

pub mod dnsbl;
pub mod screen;
