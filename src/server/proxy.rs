//! The PROXY protocol on inbound connections: for a peer in
//! `--proxy-protocol-from` (a load balancer), reads the header that must
//! start the connection, before the greeting and before any TLS handshake,
//! and says who the client is; then takes the per-IP connection slot for
//! that client ([`accept`]), which the accept loop left to this point.
//!
//! The header is parsed by [`crate::smtp::proxy`]; this module only reads,
//! within `--proxy-protocol-timeout` and at most
//! [`MAX_HEADER`](crate::smtp::proxy::MAX_HEADER) octets. Octets that came
//! in the same read after the header belong to the session and are handed
//! on ([`Header::rest`]): into the command buffer on a plaintext listener,
//! into the TLS handshake on an implicit-TLS one ([`Prefixed`]), never from
//! one into the other. Peers not in the list never have a header read:
//! to them `PROXY` is an unknown command.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, FutureExt};
use glommio::net::TcpStream;
use thiserror::Error;

use super::limits::IpSlot;
use super::shard::{refuse_now, ShardState};
use super::ListenerKind;
use crate::policy::relay::Cidr;
use crate::smtp::proxy::{self, Parsed, ProxyError, MAX_HEADER};
use crate::smtp::reply;

/// Whether `peer` must start its connections with a PROXY header.
pub(crate) fn is_trusted(from: &[Cidr], peer: IpAddr) -> bool {
    from.iter().any(|n| n.contains(peer))
}

/// A balancer's connection, accepted: the client, what followed the header,
/// and the client's per-IP connection slot.
#[derive(Debug)]
pub(crate) struct Accepted {
    pub client: SocketAddr,
    pub rest: Vec<u8>,
    pub slot: IpSlot,
}

/// A connection from `--proxy-protocol-from` (`proxy`): its PROXY header
/// first (no header, no session), then the per-IP slot of the client it
/// names. `None` when the connection is to be dropped: no valid header
/// (logged, rate-limited with the policy refusals; a connection closed
/// before its first octet, a balancer's TCP health check, is not), or the
/// client over its limit (421, as at accept).
pub(crate) async fn accept(
    shard: &ShardState,
    stream: &mut TcpStream,
    proxy: SocketAddr,
    kind: ListenerKind,
) -> Option<Accepted> {
    let limit = shard.ctx.config.proxy_protocol_timeout;
    let header = match read_header(stream, proxy, limit).await {
        Ok(h) => h,
        Err(HeaderError::Closed) => return None,
        Err(e) => {
            if let Some(held_back) = shard.reject_log.admit(Instant::now()) {
                tracing::info!(%proxy, error = %e, held_back,
                    "connection dropped: no valid PROXY header");
            }
            return None;
        }
    };
    let client = header.client;
    if header.proxied {
        tracing::debug!(peer = %client, %proxy, "PROXY header read");
    }
    let Some(slot) = shard.ctx.shared.ip_limiter.acquire(client.ip()) else {
        tracing::info!(peer = %client, %proxy, "per-IP connection limit reached");
        refuse_now(stream, kind, reply::TOO_MANY_CONNECTIONS).await;
        return None;
    };
    Some(Accepted {
        client,
        rest: header.rest,
        slot,
    })
}

/// A connection's PROXY header, read.
#[derive(Debug)]
pub(crate) struct Header {
    /// The client: the address in the header, or the connection's own peer
    /// for a `LOCAL` / `UNKNOWN` header.
    pub client: SocketAddr,
    /// Whether the header named a client (not `LOCAL` / `UNKNOWN`).
    pub proxied: bool,
    /// What followed the header in the same read: the session's first
    /// octets.
    pub rest: Vec<u8>,
}

/// Why no header could be read. The connection is dropped in each case.
#[derive(Debug, Error)]
pub(crate) enum HeaderError {
    #[error(transparent)]
    Invalid(#[from] ProxyError),
    /// Closed before sending anything: a balancer's TCP health check.
    #[error("closed without a PROXY header")]
    Closed,
    #[error("closed inside a PROXY header")]
    Truncated,
    #[error("no complete PROXY header within {0:?}")]
    TimedOut(Duration),
    #[error("read failed: {0}")]
    Io(#[from] io::Error),
}

/// Reads the header from `stream`, whose peer is `peer`, within `limit`.
pub(crate) async fn read_header<S>(
    stream: &mut S,
    peer: SocketAddr,
    limit: Duration,
) -> Result<Header, HeaderError>
where
    S: AsyncRead + Unpin,
{
    let read = async {
        // On the heap, and only while the header is read: an idle session
        // does not carry this room.
        let mut buf = vec![0u8; MAX_HEADER];
        let mut have = 0;
        loop {
            if let Parsed::Done { header, len } = proxy::parse(&buf[..have])? {
                let (client, proxied) = match header {
                    proxy::Header::Proxied { source, .. } => (source, true),
                    proxy::Header::Local => (peer, false),
                };
                return Ok(Header {
                    client,
                    proxied,
                    rest: buf[len..have].to_vec(),
                });
            }
            // invariant: `parse` decides once MAX_HEADER octets are there;
            // should it not, the connection is refused, not read further.
            let Some(spare) = buf.get_mut(have..).filter(|s| !s.is_empty()) else {
                return Err(HeaderError::Invalid(ProxyError::TooLong));
            };
            match stream.read(spare).await? {
                0 if have == 0 => return Err(HeaderError::Closed),
                0 => return Err(HeaderError::Truncated),
                n => have += n,
            }
        }
    };
    read.or(async {
        glommio::timer::sleep(limit).await;
        Err(HeaderError::TimedOut(limit))
    })
    .await
}

/// A stream that first yields `prefix`, then reads `inner`; writes go to
/// `inner`. It hands what came after a PROXY header to the TLS handshake
/// of an implicit-TLS listener.
pub(crate) struct Prefixed<S> {
    prefix: Vec<u8>,
    at: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    pub(crate) fn new(inner: S, prefix: Vec<u8>) -> Self {
        Self {
            prefix,
            at: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let left = &this.prefix[this.at..];
        if !left.is_empty() {
            let n = left.len().min(buf.len());
            buf[..n].copy_from_slice(&left[..n]);
            this.at += n;
            if this.at == this.prefix.len() {
                this.prefix = Vec::new();
                this.at = 0;
            }
            return Poll::Ready(Ok(n));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }
}
