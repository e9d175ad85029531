//! The PROXY protocol on inbound connections: for a peer in
//! `--proxy-protocol-from` (a load balancer), reads the header that must
//! start the connection, before the greeting and before any TLS handshake,
//! and says who the client is.
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
use std::time::Duration;

use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, FutureExt};
use thiserror::Error;

use crate::relay::policy::Cidr;
use crate::smtp::proxy::{self, Parsed, ProxyError, MAX_HEADER};

/// Whether `peer` must start its connections with a PROXY header.
pub(crate) fn is_trusted(from: &[Cidr], peer: IpAddr) -> bool {
    from.iter().any(|n| n.contains(peer))
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
