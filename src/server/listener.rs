//! Listening sockets: one per shard and address, all with SO_REUSEPORT so the
//! kernel spreads connections over the shards, built with `socket2` so the
//! backlog is ours to choose.
//!
//! Sockets are bound on the main thread before the shards start: port 0 is
//! resolved once (the first socket's port is used for the others), and a
//! port some other process already serves is refused rather than silently
//! shared.

use std::io;
use std::net::{SocketAddr, TcpListener};

use socket2::{Domain, Protocol, Socket, Type};
use thiserror::Error;

/// What a listening socket serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerKind {
    /// Relay/MX (RFC 5321), STARTTLS offered.
    Smtp,
    /// Message submission (RFC 6409), STARTTLS then AUTH.
    Submission,
    /// Message submission over implicit TLS (RFC 8314).
    Smtps,
}

impl ListenerKind {
    /// The word in the `ringmta listening KIND ADDR` line.
    pub fn name(self) -> &'static str {
        match self {
            ListenerKind::Smtp => "smtp",
            ListenerKind::Submission => "submission",
            ListenerKind::Smtps => "smtps",
        }
    }

    /// Its position in [`crate::metrics::LISTENERS`] (the same names).
    pub fn metrics_index(self) -> usize {
        match self {
            ListenerKind::Smtp => 0,
            ListenerKind::Submission => 1,
            ListenerKind::Smtps => 2,
        }
    }
}

#[cfg(test)]
#[test]
fn metric_names_match() {
    for k in [
        ListenerKind::Smtp,
        ListenerKind::Submission,
        ListenerKind::Smtps,
    ] {
        assert_eq!(crate::metrics::LISTENERS[k.metrics_index()], k.name());
    }
}

#[derive(Debug, Error)]
pub enum ListenError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("{0} is already in use by another process")]
    InUse(SocketAddr),
}

/// The bound sockets: `by_shard[s]` holds shard `s`'s listener for every
/// address, in the order of `addrs`, which has port 0 resolved.
#[derive(Debug)]
pub struct Bound {
    pub addrs: Vec<SocketAddr>,
    pub by_shard: Vec<Vec<TcpListener>>,
}

pub fn bind_all(addrs: &[SocketAddr], shards: usize, backlog: i32) -> Result<Bound, ListenError> {
    let mut by_shard: Vec<Vec<TcpListener>> = (0..shards).map(|_| Vec::new()).collect();
    let mut resolved = Vec::with_capacity(addrs.len());
    for &want in addrs {
        if want.port() != 0 {
            refuse_if_in_use(want)?;
        }
        let mut addr = want;
        for listeners in by_shard.iter_mut() {
            let l = bind_one(addr, backlog).map_err(|source| ListenError::Bind { addr, source })?;
            if addr.port() == 0 {
                addr = l
                    .local_addr()
                    .map_err(|source| ListenError::Bind { addr, source })?;
            }
            listeners.push(l);
        }
        resolved.push(addr);
    }
    Ok(Bound {
        addrs: resolved,
        by_shard,
    })
}

fn bind_one(addr: SocketAddr, backlog: i32) -> io::Result<TcpListener> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    sock.set_reuse_port(true)?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    sock.set_nodelay(true)?;
    sock.bind(&addr.into())?;
    sock.listen(backlog)?;
    Ok(sock.into())
}

/// SO_REUSEPORT would let us join another process's listener on the same
/// port (as the same user); a plain bind tells whether anyone holds it.
fn refuse_if_in_use(addr: SocketAddr) -> Result<(), ListenError> {
    let probe = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .map_err(|source| ListenError::Bind { addr, source })?;
    // SO_REUSEADDR only lets us past TIME_WAIT leftovers, not a listener.
    let _ = probe.set_reuse_address(true);
    if addr.is_ipv6() {
        let _ = probe.set_only_v6(true);
    }
    match probe.bind(&addr.into()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => Err(ListenError::InUse(addr)),
        Err(source) => Err(ListenError::Bind { addr, source }),
    }
}
