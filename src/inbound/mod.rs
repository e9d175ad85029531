//! Checks of incoming mail on the relay/MX port: sender authentication
//! (SPF, DKIM, DMARC, ARC → `Authentication-Results`, [`auth`]) over the
//! per-shard DNS threads of [`dns`].

pub mod auth;
pub mod dns;
