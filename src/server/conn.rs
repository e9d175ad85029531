//! Drives one [`Session`] over one TCP connection: read, hand the bytes to
//! the session, make finished messages durable, write each batch of replies
//! in one write.
//!
//! Every wait is bounded: reads by the session's deadline (command or data
//! timeout), writes by the socket write timeout, and shutdown interrupts a
//! read. Memory is bounded: the session consumes content as it arrives, so
//! the unconsumed tail of the buffer never exceeds one command line.

use std::net::SocketAddr;
use std::time::Instant;

use futures_lite::{AsyncReadExt, AsyncWriteExt, FutureExt};
use glommio::net::TcpStream;

use super::shard::ShardState;
use crate::smtp::{CommitResult, ConnInfo, Event, Session};

/// Read buffer size for an idle or command-phase connection.
const INITIAL_BUFFER: usize = 4 << 10;
/// Largest read buffer, reached while content streams in.
const MAX_BUFFER: usize = 128 << 10;

enum Wake {
    Read(std::io::Result<usize>),
    Timeout,
    Stop,
}

pub(crate) async fn serve(shard: &ShardState, mut stream: TcpStream, peer: SocketAddr) {
    let cfg = shard.ctx.config.session.clone();
    let _ = stream.set_write_timeout(Some(cfg.command_timeout));
    let mut session = Session::new(cfg, ConnInfo { peer, tls: false }, Instant::now());
    let mut buf = InputBuffer::new();
    let mut told_to_stop = false;
    loop {
        // Everything buffered, including input pipelined behind a message
        // that had to be committed first.
        loop {
            let n = session.handle_input(buf.pending(), Instant::now());
            buf.consume(n);
            let Some(Event::Message(msg)) = session.poll_event() else {
                break;
            };
            let result = match shard.spool.store(msg).await {
                Ok(id) => CommitResult::Stored(id),
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "message not stored");
                    e.commit_result()
                }
            };
            session.handle_commit(result, Instant::now());
        }
        if !session.output().is_empty() {
            if stream.write_all(session.output()).await.is_err() {
                return;
            }
            session.clear_output();
        }
        if session.is_closed() {
            let _ = stream.close().await;
            return;
        }
        if shard.grace_over.get() {
            session.handle_shutdown_now();
            continue;
        }
        if shard.stopping.get() && !told_to_stop {
            told_to_stop = true;
            session.handle_shutdown();
            continue;
        }
        if session.is_idle() {
            buf.shrink_if_empty();
        }

        let stop = if told_to_stop {
            shard.grace_event.listen()
        } else {
            shard.stop_event.listen()
        };
        let deadline = session.poll_timeout();
        let read = async { Wake::Read(stream.read(buf.spare()).await) };
        let timeout = async {
            match deadline {
                Some(d) => glommio::timer::sleep(d.saturating_duration_since(Instant::now())).await,
                None => futures_lite::future::pending::<()>().await,
            }
            Wake::Timeout
        };
        let stopped = async {
            stop.await;
            Wake::Stop
        };
        match read.or(timeout).or(stopped).await {
            Wake::Read(Ok(0)) | Wake::Read(Err(_)) => {
                // Peer gone: an unfinished message is simply dropped (it was
                // never acknowledged).
                return;
            }
            Wake::Read(Ok(n)) => buf.filled(n),
            Wake::Timeout => session.handle_timeout(Instant::now()),
            Wake::Stop => {}
        }
    }
}

/// A read buffer with a consumed prefix, compacted and grown as needed.
struct InputBuffer {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// The last read filled all the free space: content is streaming.
    grow: bool,
}

impl InputBuffer {
    fn new() -> Self {
        Self {
            buf: vec![0; INITIAL_BUFFER],
            start: 0,
            end: 0,
            grow: false,
        }
    }

    fn pending(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Free space to read into: compacts, and grows when the last read
    /// filled what was there (a stream of content, worth bigger reads).
    fn spare(&mut self) -> &mut [u8] {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if (self.grow || self.end == self.buf.len()) && self.buf.len() < MAX_BUFFER {
            let grown = (self.buf.len() * 2).min(MAX_BUFFER);
            self.buf.resize(grown, 0);
        }
        self.grow = false;
        &mut self.buf[self.end..]
    }

    fn filled(&mut self, n: usize) {
        self.end += n;
        self.grow = self.end == self.buf.len();
    }

    /// Gives back a grown buffer once a connection is idle again.
    fn shrink_if_empty(&mut self) {
        if self.start == self.end && self.buf.len() > INITIAL_BUFFER {
            self.buf = vec![0; INITIAL_BUFFER];
            self.start = 0;
            self.end = 0;
            self.grow = false;
        }
    }
}
