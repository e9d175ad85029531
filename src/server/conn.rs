//! Drives one [`Session`] over one connection: read, hand the bytes to the
//! session, make finished messages durable, check credentials, upgrade to
//! TLS, write each batch of replies in one write. A load balancer's
//! connection first has its PROXY header read ([`super::proxy`]); the
//! session then runs as the client's.
//!
//! The same loop ([`drive`]) runs over a plain `TcpStream` or a rustls
//! stream. On `STARTTLS` it writes the 220, then *drops every byte already
//! buffered* (a client, or a man in the middle, that pipelined commands
//! behind STARTTLS must not have them executed inside the TLS session: RFC
//! 3207 5, CVE-2011-0411), runs the handshake under
//! `--tls-handshake-timeout`, and goes on with the same session, reset by
//! [`Session::handle_tls`]. Implicit-TLS listeners (RFC 8314) handshake
//! before the greeting.
//!
//! Every wait is bounded: reads by the session's deadline (command or data
//! timeout), writes by the socket write timeout, handshakes by their own
//! timeout, and shutdown interrupts a read; the session's deadline also
//! caps the whole content of a message (`--max-data-time`). Memory is
//! bounded: the session consumes content as it arrives, so the unconsumed
//! tail of the buffer never exceeds one command line (or one 12288-octet
//! AUTH line); replies waiting to be written are capped (the session stops
//! taking input until they are); and the message body lives within the
//! shard's [`InflightBudget`](super::budget::InflightBudget): before each
//! input the session is told how far its body may grow, after it the
//! connection's charge is set to what the body holds (with the spool's copy
//! while it is being stored).
//! Password checks (argon2) and DKIM signing (hashing the message, an RSA
//! signature) run on their own bounded pools ([`crate::blocking`]), never
//! on the shard thread and never queued behind each other.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, FutureExt};
use futures_rustls::server::TlsStream;
use glommio::net::TcpStream;

use super::dkim::FromMismatch;
use super::limits::AuthRefusal;
use super::proxy::{self, Prefixed};
use super::shard::ShardState;
use super::{dkim, tls, users, ListenerKind};
use crate::inbound::auth::{self as inbound, SpfResults};
use crate::inbound::dnsbl::{self, Verdict};
use crate::inbound::screen::{self, ScreenConfig};
use crate::metrics::{self, Handshake, Screened, Shortage};
use crate::policy::rate::{Counted, RateKey};
use crate::smtp::auth::{AuthResult, Authenticated, Credentials};
use crate::smtp::envelope::rfc5322_date;
use crate::smtp::reply::Reply;
use crate::smtp::session::Violation;
use crate::smtp::session::{SenderCheck, SenderVerdict};
use crate::smtp::submit::{self, Completion};
use crate::smtp::{CommitResult, ConnInfo, Event, Message, Session, SessionConfig};

/// Read buffer size for an idle or command-phase connection.
const INITIAL_BUFFER: usize = 4 << 10;
/// Largest read buffer, reached while content streams in.
const MAX_BUFFER: usize = 128 << 10;

enum Wake {
    Read(std::io::Result<usize>),
    Timeout,
    Stop,
}

/// How [`drive`] ended.
enum Outcome {
    /// The session is over (closed by either side, or a write failed).
    Closed,
    /// The 220 to STARTTLS is written: the caller runs the handshake.
    StartTls,
}

/// Serves one connection from `peer`. From a load balancer
/// (`behind_proxy`: `peer` is in `--proxy-protocol-from`), its PROXY
/// header is read first ([`proxy::accept`]): the client it names is the
/// session's peer, and what came after the header is the session's first
/// input (commands, or on an implicit-TLS listener the first handshake
/// octets).
pub(crate) async fn serve(
    shard: &ShardState,
    mut stream: TcpStream,
    peer: SocketAddr,
    kind: ListenerKind,
    behind_proxy: bool,
) {
    // Boxed: the header's state must not size every session's task.
    let (peer, initial, _client_slot) = if behind_proxy {
        match Box::pin(proxy::accept(shard, &mut stream, peer, kind)).await {
            Some(a) => (a.client, a.rest, Some(a.slot)),
            None => return,
        }
    } else {
        (peer, Vec::new(), None)
    };
    let mut log = ConnLog::new(shard.ctx.id, peer, kind);
    serve_logged(shard, stream, peer, kind, initial, &mut log).await;
}

/// The `connect` and `disconnect` events of one connection (the README's
/// "Event log"): `disconnect` is written when this is dropped, so it comes
/// however the connection ended, a panic included.
struct ConnLog {
    shard: usize,
    peer: SocketAddr,
    kind: ListenerKind,
    start: Instant,
    /// What the session had negotiated when it ended.
    tls: Option<crate::smtp::TlsInfo>,
    user: Option<String>,
    messages: u32,
}

impl ConnLog {
    fn new(shard: usize, peer: SocketAddr, kind: ListenerKind) -> Self {
        tracing::info!(
            target: "ringmta::event",
            event = "connect",
            shard,
            %peer,
            listener = kind.name(),
            "connect"
        );
        ConnLog {
            shard,
            peer,
            kind,
            start: Instant::now(),
            tls: None,
            user: None,
            messages: 0,
        }
    }

    /// Takes what the session negotiated, for the `disconnect` line.
    fn note(&mut self, session: &Session) {
        self.tls = session.tls().copied();
        self.user = session.authenticated().map(|a| a.login.clone());
    }
}

impl Drop for ConnLog {
    fn drop(&mut self) {
        let tls = self.tls.map(|t| format!("{} {}", t.version, t.cipher));
        tracing::info!(
            target: "ringmta::event",
            event = "disconnect",
            shard = self.shard,
            peer = %self.peer,
            listener = self.kind.name(),
            tls = tls.as_deref().unwrap_or("none"),
            user = self.user.as_deref().unwrap_or("-"),
            messages = self.messages,
            duration_ms = self.start.elapsed().as_millis() as u64,
            "disconnect"
        );
    }
}

/// [`serve`] once the client is known; `initial` is what came after a
/// PROXY header.
async fn serve_logged(
    shard: &ShardState,
    stream: TcpStream,
    peer: SocketAddr,
    kind: ListenerKind,
    initial: Vec<u8>,
    log: &mut ConnLog,
) {
    // The policy in force when the connection starts is its policy to the
    // end, whatever a SIGHUP does meanwhile.
    let live = shard.ctx.shared.live.load();
    let cfg = match kind {
        ListenerKind::Smtp => live.session.clone(),
        ListenerKind::Submission | ListenerKind::Smtps => live.submission_session.clone(),
    };
    let screen_cfg = live.screen.clone();
    let connection_rate = live.connection_rate;
    drop(live);
    let mut stream = stream;
    let mut initial = initial;
    // Boxed: the screen's state (DNS tasks, the pause) must not size every
    // session's task.
    let screened = Box::pin(screen(
        shard,
        &mut stream,
        peer,
        kind,
        &cfg,
        &screen_cfg,
        connection_rate,
        &mut initial,
    ))
    .await;
    let exempt = match screened {
        Screen::Refused => return,
        Screen::Exempt => true,
        Screen::Passed => false,
    };
    drop(screen_cfg);
    let _ = stream.set_write_timeout(Some(cfg.command_timeout));
    let conn = ConnInfo { peer, tls: false };
    if kind == ListenerKind::Smtps {
        // Boxed: the TLS states (rustls' connection, the handshake) are
        // large, and an idle plaintext session should not carry their room
        // in its future (this is what keeps an idle session near 8 KiB).
        let stream = Prefixed::new(stream, initial);
        let buf = InputBuffer::new(&[]);
        Box::pin(serve_implicit_tls(shard, stream, peer, cfg, conn, buf, log)).await;
        return;
    }
    let mut buf = InputBuffer::new(&initial);
    drop(initial);
    let mut session = Session::new(cfg, conn, Instant::now());
    if exempt {
        session = session.exempt_from_screen();
    }
    shard.metrics.session(kind.metrics_index());
    let outcome = drive(shard, &mut stream, &mut session, &mut buf, peer, log).await;
    log.note(&session);
    if let Outcome::StartTls = outcome {
        Box::pin(serve_after_starttls(shard, stream, peer, session, buf, log)).await;
    }
}

async fn serve_implicit_tls(
    shard: &ShardState,
    stream: Prefixed<TcpStream>,
    peer: SocketAddr,
    cfg: std::sync::Arc<crate::smtp::SessionConfig>,
    conn: ConnInfo,
    mut buf: InputBuffer,
    log: &mut ConnLog,
) {
    let Some(mut tls) = handshake(shard, stream, peer).await else {
        return;
    };
    let info = tls::info(tls.get_ref().1);
    let mut session = Session::new(cfg, conn, Instant::now()).with_tls(info);
    shard.metrics.session(ListenerKind::Smtps.metrics_index());
    drive(shard, &mut tls, &mut session, &mut buf, peer, log).await;
    log.note(&session);
}

async fn serve_after_starttls(
    shard: &ShardState,
    stream: TcpStream,
    peer: SocketAddr,
    mut session: Session,
    mut buf: InputBuffer,
    log: &mut ConnLog,
) {
    // RFC 3207 5: whatever the client sent after STARTTLS, before the
    // handshake, is discarded unread.
    let dropped = buf.clear();
    if dropped > 0 {
        tracing::info!(%peer, bytes = dropped, "discarded input pipelined after STARTTLS");
    }
    let Some(mut tls) = handshake(shard, stream, peer).await else {
        return;
    };
    session.handle_tls(tls::info(tls.get_ref().1), Instant::now());
    let outcome = drive(shard, &mut tls, &mut session, &mut buf, peer, log).await;
    log.note(&session);
    if let Outcome::StartTls = outcome {
        // invariant: the session refuses STARTTLS under TLS (503), so it
        // never asks again; close rather than loop.
        tracing::error!(%peer, "STARTTLS requested twice; closing");
    }
}

/// Runs the session over `stream` until it closes or asks for STARTTLS.
async fn drive<S>(
    shard: &ShardState,
    stream: &mut S,
    session: &mut Session,
    buf: &mut InputBuffer,
    peer: SocketAddr,
    log: &mut ConnLog,
) -> Outcome
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut told_to_stop = false;
    let mut charge = shard.budget.charge(peer.ip());
    // SPF as checked at MAIL FROM, for the end of the content.
    let mut spf_memo: Option<SpfResults> = None;
    loop {
        // A client sending as fast as loopback allows always has input
        // ready (and room for replies), so this loop need never wait: give
        // the shard's other connections their turn once this task's time
        // slice is used.
        glommio::yield_if_needed().await;
        // Everything buffered, including input pipelined behind a message
        // that had to be committed first.
        loop {
            session.handle_allowance(charge.allowance());
            let n = session.handle_input(buf.pending(), Instant::now());
            buf.consume(n);
            charge.set(session.content_bytes());
            for r in session.take_rejections() {
                if r.reply == crate::smtp::reply::BUDGET_EXCEEDED {
                    shard.metrics.shortage(Shortage::MemoryBudget);
                }
                if let Some(why) = rate_refusal(r.reason) {
                    shard.metrics.screened(why);
                }
                if let Some(held_back) = shard.reject_log.admit(Instant::now()) {
                    tracing::info!(
                        target: "ringmta::event",
                        event = "refused",
                        %peer,
                        user = r.user.as_deref().unwrap_or("-"),
                        command = %r.command,
                        reply = r.reply.code,
                        status = r.reply.status.unwrap_or(""),
                        reason = r.reason,
                        held_back,
                        "refused by policy"
                    );
                }
            }
            if let Some(v) = session.take_violation() {
                failed_screen(shard, peer, log.kind, v);
            }
            match session.poll_event() {
                None => break,
                Some(Event::Message(msg)) => {
                    // Until it is on disk: the body, and the spool's copy
                    // of it in the commit batch.
                    charge.set(msg.body.capacity() + msg.body.len());
                    // Boxed (as below): rarely-taken branches with large
                    // futures must not size every idle session's task.
                    let result = Box::pin(store(shard, session, msg, peer, spf_memo.take())).await;
                    if let CommitResult::Stored(_) = &result {
                        log.messages += 1;
                    }
                    session.handle_commit(result, Instant::now());
                    charge.set(session.content_bytes());
                }
                Some(Event::Auth(creds)) => {
                    let result = Box::pin(authenticate(shard, peer, creds)).await;
                    session.handle_auth(result, Instant::now());
                }
                Some(Event::CheckSender(check)) => {
                    let refusal = Box::pin(check_sender(shard, peer, check, &mut spf_memo)).await;
                    session.handle_sender(refusal, Instant::now());
                }
                Some(Event::StartTls) => {
                    count_replies(shard, session.output());
                    if stream.write_all(session.output()).await.is_err()
                        || stream.flush().await.is_err()
                    {
                        return Outcome::Closed;
                    }
                    session.clear_output();
                    return Outcome::StartTls;
                }
            }
        }
        if !session.output().is_empty() {
            // The session stopped taking input at its output cap: once this
            // is written, what is still buffered comes before any read.
            let more = session.output_full();
            count_replies(shard, session.output());
            if stream.write_all(session.output()).await.is_err() || stream.flush().await.is_err() {
                return Outcome::Closed;
            }
            session.clear_output();
            if more {
                continue;
            }
        }
        if session.is_closed() {
            let _ = stream.close().await;
            return Outcome::Closed;
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
                return Outcome::Closed;
            }
            Wake::Read(Ok(n)) => {
                shard.metrics.received_bytes.inc_by(n as u64);
                buf.filled(n);
            }
            Wake::Timeout => session.handle_timeout(Instant::now()),
            Wake::Stop => {}
        }
    }
}

/// How the screen ended for a connection.
enum Screen {
    /// Refused (answered and to be closed).
    Refused,
    /// Passed.
    Passed,
    /// Not screened: `--relay-network`, or on a `--dnswl` allowlist.
    Exempt,
}

/// Connections per minute from a client network over
/// `--max-connections-per-minute`.
const CONNECTION_RATE: Reply = Reply::new(
    421,
    "4.7.0",
    "Error: too many connections from your network, try again later",
);

/// Before the greeting: the client network's connection rate (every
/// listener), then on the relay/MX port the screen's memory, the DNS lists
/// and the greet pause (the lookups run during the pause). Clients in
/// `--relay-network` are never checked. What a client on an allowlist
/// sent during the pause is its first input; anyone else who talked then
/// is refused and remembered.
#[allow(clippy::too_many_arguments)]
async fn screen(
    shard: &ShardState,
    stream: &mut TcpStream,
    peer: SocketAddr,
    kind: ListenerKind,
    cfg: &SessionConfig,
    screen: &ScreenConfig,
    connection_rate: bool,
    initial: &mut Vec<u8>,
) -> Screen {
    let ip = peer.ip();
    if cfg.relay_networks.iter().any(|n| n.contains(ip)) {
        return Screen::Exempt;
    }
    let shared = &shard.ctx.shared;
    let now = Instant::now();
    if connection_rate
        && shared
            .rates
            .take(RateKey::net(ip), Counted::Connections, now)
            .is_err()
    {
        let r = CONNECTION_RATE;
        refuse_client(
            shard,
            stream,
            peer,
            kind,
            Screened::ConnectionRate,
            r,
            r.text,
            None,
        )
        .await;
        return Screen::Refused;
    }
    if kind != ListenerKind::Smtp {
        return Screen::Passed;
    }
    if shared.screened.check(ip, now).is_some() {
        let r = screen::REMEMBERED;
        refuse_client(
            shard,
            stream,
            peer,
            kind,
            Screened::Remembered,
            r,
            r.text,
            None,
        )
        .await;
        return Screen::Refused;
    }
    let lists = &screen.lists;
    let pause = screen.greet_pause;
    if lists.is_empty() && pause.is_zero() {
        return Screen::Passed;
    }
    let dns = async {
        if lists.is_empty() {
            return None;
        }
        Some(dnsbl::check(&shard.ctx.lists_dns, &shard.dnsbl_cache, lists, ip).await)
    };
    let listen = async {
        if pause.is_zero() {
            return Pause::Quiet;
        }
        if !initial.is_empty() {
            // Came behind the PROXY header, before any greeting.
            return Pause::Talked(Vec::new());
        }
        let mut early = vec![0u8; 512];
        let read = async { Some(stream.read(&mut early).await) };
        let waited = async {
            glommio::timer::sleep(pause).await;
            None
        };
        match read.or(waited).await {
            None => Pause::Quiet,
            Some(Ok(0)) | Some(Err(_)) => Pause::Gone,
            Some(Ok(n)) => {
                early.truncate(n);
                Pause::Talked(early)
            }
        }
    };
    let (lists_say, heard) = futures_lite::future::zip(dns, listen).await;
    if let Some((verdict, tally)) = &lists_say {
        shard
            .metrics
            .dnsbl(tally.listed, tally.not_listed, tally.failed);
        match verdict {
            Verdict::Allowed(zone) => {
                tracing::debug!(%peer, zone = %zone, "client on a DNS allowlist");
                return match heard {
                    Pause::Gone => Screen::Refused,
                    Pause::Talked(early) => {
                        initial.extend_from_slice(&early);
                        Screen::Exempt
                    }
                    Pause::Quiet => Screen::Exempt,
                };
            }
            Verdict::Blocked { zones, score } => {
                if matches!(heard, Pause::Gone) {
                    return Screen::Refused;
                }
                let zone = zones.first().map_or("", String::as_str);
                let text = format!("Service unavailable; client [{ip}] blocked using {zone}");
                let detail = format!("{} score={score}", zones.join(","));
                refuse_client(
                    shard,
                    stream,
                    peer,
                    kind,
                    Screened::Dnsbl,
                    DNSBL,
                    &text,
                    Some(&detail),
                )
                .await;
                return Screen::Refused;
            }
            Verdict::Pass { .. } => {}
        }
    }
    match heard {
        Pause::Gone => Screen::Refused,
        Pause::Quiet => Screen::Passed,
        Pause::Talked(_) => {
            let v = Violation::Pregreet;
            let r = v.reply();
            refuse_client(
                shard,
                stream,
                peer,
                kind,
                Screened::Pregreet,
                r,
                r.text,
                None,
            )
            .await;
            shared.screened.record(ip, v, screen.ttl, Instant::now());
            Screen::Refused
        }
    }
}

/// What the client did during the greet pause.
enum Pause {
    Quiet,
    /// Sent these octets.
    Talked(Vec<u8>),
    /// Closed the connection (or it failed).
    Gone,
}

/// A client listed on the DNS blocklists (the text names the list).
const DNSBL: Reply = Reply::new(554, "5.7.1", "Service unavailable");

/// Answers `reply` with `text` and closes; counts and logs the refusal
/// (the `refused` event, rate-limited with the policy refusals).
#[allow(clippy::too_many_arguments)]
async fn refuse_client(
    shard: &ShardState,
    stream: &mut TcpStream,
    peer: SocketAddr,
    kind: ListenerKind,
    why: Screened,
    reply: Reply,
    text: &str,
    detail: Option<&str>,
) {
    shard.metrics.screened(why);
    log_refusal(shard, peer, why, "CONNECT", reply, detail);
    if kind == ListenerKind::Smtps {
        return;
    }
    shard.replies.count(reply.code, reply.status);
    let mut out = Vec::with_capacity(128);
    crate::smtp::reply::write_line(&mut out, reply.code, reply.status, text, true);
    let _ = stream.set_write_timeout(Some(REFUSE_WRITE_TIMEOUT));
    let _ = stream.write_all(&out).await;
    let _ = stream.close().await;
}

/// How long a refused client may take to read its answer.
const REFUSE_WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// The `refused` event of a client the screen, a list or a rate limit
/// refused.
fn log_refusal(
    shard: &ShardState,
    peer: SocketAddr,
    why: Screened,
    command: &str,
    reply: Reply,
    detail: Option<&str>,
) {
    if let Some(held_back) = shard.reject_log.admit(Instant::now()) {
        tracing::info!(
            target: "ringmta::event",
            event = "refused",
            %peer,
            user = "-",
            command,
            reply = reply.code,
            status = reply.status.unwrap_or(""),
            reason = why.name(),
            detail = detail.unwrap_or(""),
            held_back,
            "refused by the screen"
        );
    }
}

/// The session dropped the client for a protocol violation: counted,
/// logged, and on the relay/MX port remembered for `--screen-ttl`.
fn failed_screen(shard: &ShardState, peer: SocketAddr, kind: ListenerKind, v: Violation) {
    let why = match v {
        Violation::Pregreet => Screened::Pregreet,
        Violation::Pipelining => Screened::Pipelining,
        Violation::NonSmtp => Screened::NonSmtp,
    };
    shard.metrics.screened(why);
    log_refusal(shard, peer, why, "-", v.reply(), None);
    if kind == ListenerKind::Smtp {
        let ttl = shard.ctx.shared.live.load().screen.ttl;
        shard
            .ctx
            .shared
            .screened
            .record(peer.ip(), v, ttl, Instant::now());
    }
}

/// The metric of a session's rate-limit refusal (`None`: another policy).
fn rate_refusal(reason: &str) -> Option<Screened> {
    use crate::smtp::session::{
        MESSAGE_RATE_REASON, RECIPIENT_RATE_REASON, USER_MESSAGE_RATE_REASON,
    };
    match reason {
        MESSAGE_RATE_REASON => Some(Screened::MessageRate),
        RECIPIENT_RATE_REASON => Some(Screened::RecipientRate),
        USER_MESSAGE_RATE_REASON => Some(Screened::UserMessageRate),
        _ => None,
    }
}

/// Counts the replies about to be written (their final lines).
fn count_replies(shard: &ShardState, output: &[u8]) {
    crate::smtp::reply::for_each_final(output, |code, status| {
        shard.replies.count(code, status);
    });
}

/// The TLS handshake, bounded by `--tls-handshake-timeout`; `None` (and the
/// connection dropped) when it fails or takes too long.
async fn handshake<S>(shard: &ShardState, stream: S, peer: SocketAddr) -> Option<TlsStream<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let store = &shard.ctx.shared.tls;
    let limit = store.handshake_timeout();
    let accept = store.acceptor().accept(stream);
    let result = async { Some(accept.await) }
        .or(async {
            glommio::timer::sleep(limit).await;
            None
        })
        .await;
    match result {
        Some(Ok(s)) => {
            shard.metrics.handshake(Handshake::Ok);
            Some(s)
        }
        Some(Err(e)) => {
            shard.metrics.handshake(Handshake::Failed);
            tracing::info!(%peer, error = %e, "TLS handshake failed");
            None
        }
        None => {
            shard.metrics.handshake(Handshake::TimedOut);
            tracing::info!(%peer, timeout = ?limit, "TLS handshake timed out");
            None
        }
    }
}

/// The `X-Ringmta-Pool` field, taken out of every message before it is
/// signed, checked or stored: from an authenticated or `--relay-network`
/// client it chooses the source-IP pool (recorded in the envelope), from
/// anyone else it is dropped unread.
fn choose_pool(shard: &ShardState, session: &Session, msg: &mut Message, peer: SocketAddr) {
    let Some(named) = crate::smtp::field::take(&mut msg.body, POOL_FIELD) else {
        return;
    };
    let trusted = session.authenticated().is_some()
        || shard
            .ctx
            .shared
            .live
            .load()
            .session
            .relay_networks
            .iter()
            .any(|n| n.contains(peer.ip()));
    if !trusted {
        tracing::debug!(%peer, "X-Ringmta-Pool from an untrusted client removed");
        return;
    }
    if crate::relay::shaping::valid_pool_name(&named) {
        msg.envelope.pool = Some(named);
    } else {
        tracing::info!(%peer, pool = %named.escape_debug(), "X-Ringmta-Pool with a bad pool name removed");
    }
}

/// The header field that chooses a message's source-IP pool.
pub(crate) const POOL_FIELD: &str = "X-Ringmta-Pool";

/// Makes `msg` durable. Submitted mail (an authenticated session) is
/// completed first: `Date:`, `Message-ID:` and optionally `Sender:` when
/// missing (RFC 6409 8), then DKIM-signed when an author's domain has a key
/// and the login may send as that author; the added fields are stored in
/// front of the content as received.
async fn store(
    shard: &ShardState,
    session: &Session,
    mut msg: Message,
    peer: SocketAddr,
    spf: Option<SpfResults>,
) -> CommitResult {
    // The inbound checks' summary, for the `accepted` event.
    let mut auth = None;
    choose_pool(shard, session, &mut msg, peer);
    let added = match session.authenticated() {
        Some(who) => {
            let live = shard.ctx.shared.live.load_full();
            let date = rfc5322_date(SystemTime::now());
            let message_id = new_message_id(shard.ctx.id, &live.session.hostname);
            let me = own_address(who, &live.session.local_domains);
            let sender = me.as_deref().filter(|_| live.add_sender_header);
            let completion = Completion {
                date: &date,
                message_id: &message_id,
                sender,
            };
            let added = submit::missing_headers(&msg.body, &completion);
            match dkim_sign(shard, &mut msg, added, who, peer).await {
                Ok(added) => added,
                Err(refusal) => return refusal,
            }
        }
        None => match verify_inbound(shard, &mut msg, peer, spf, &mut auth).await {
            Ok(added) if relay_signed(shard, peer) => {
                match dkim_sign_trusted(shard, &mut msg, added, &peer.to_string()).await {
                    Ok(added) => added,
                    Err(refusal) => return refusal,
                }
            }
            Ok(added) => added,
            Err(refusal) => return refusal,
        },
    };
    let mut accepted = Accepted::of(&msg, added.len(), session);
    accepted.auth = auth;
    let rcpts = msg.envelope.rcpts.len() as u64;
    match shard.spool.store_with(msg, session.tls(), &added).await {
        Ok(id) => {
            accepted.log(shard.ctx.id, &id, peer);
            if let Some(relay) = &shard.relay {
                relay.enqueue(id.clone());
            }
            shard.metrics.messages.inc();
            shard.metrics.recipients.inc_by(rcpts);
            CommitResult::Stored(id)
        }
        Err(e) => {
            tracing::warn!(%peer, error = %e, "message not stored");
            let result = e.commit_result();
            if let CommitResult::NoSpace = result {
                shard.metrics.shortage(Shortage::DiskFull);
            }
            result
        }
    }
}

/// What the `accepted` event says of a message, taken before the spool
/// takes the message.
struct Accepted {
    from: String,
    nrcpt: usize,
    size: usize,
    proto: &'static str,
    helo: String,
    tls: Option<String>,
    user: Option<String>,
    /// The inbound checks' results (`spf=pass dkim=none ...`), when run.
    auth: Option<String>,
}

impl Accepted {
    fn of(msg: &Message, added: usize, session: &Session) -> Accepted {
        let env = &msg.envelope;
        Accepted {
            from: env.mail_from.clone().unwrap_or_default(),
            nrcpt: env.rcpts.len(),
            size: msg.body.len() + added,
            proto: env.protocol.name(),
            helo: env.helo.clone(),
            tls: session.tls().map(|t| format!("{} {}", t.version, t.cipher)),
            user: session.authenticated().map(|a| a.login.clone()),
            auth: None,
        }
    }

    fn log(&self, shard: usize, queue_id: &str, peer: SocketAddr) {
        tracing::info!(
            target: "ringmta::event",
            event = "accepted",
            shard,
            queue_id,
            %peer,
            helo = %self.helo,
            from = %self.from,
            nrcpt = self.nrcpt,
            size = self.size,
            proto = self.proto,
            tls = self.tls.as_deref().unwrap_or("none"),
            user = self.user.as_deref().unwrap_or("-"),
            auth = self.auth.as_deref().unwrap_or("-"),
            "accepted"
        );
    }
}

/// `--spf-policy reject` (or a `--domain-auth ...:spf=reject`): SPF of the
/// HELO and MAIL FROM identities, kept in `memo` for the end of the
/// content. When the MAIL FROM identity fails: 550 5.7.23 at once if every
/// domain refuses it, else at each RCPT whose domain does.
async fn check_sender(
    shard: &ShardState,
    peer: SocketAddr,
    check: SenderCheck,
    memo: &mut Option<SpfResults>,
) -> SenderVerdict {
    let client = inbound::Client {
        ip: peer.ip(),
        helo: check.helo,
        mail_from: check.mail_from,
    };
    let results = inbound::check_spf(&shard.ctx.dns, client).await;
    let fail = results.mail_from_result() == mail_auth::SpfResult::Fail;
    *memo = Some(results);
    if !fail {
        SenderVerdict::Accept
    } else if shard
        .ctx
        .shared
        .live
        .load()
        .inbound
        .spf_refused_at_mail_from()
    {
        SenderVerdict::Refuse(inbound::SPF_FAIL)
    } else {
        // Some recipient domains take it: each RCPT is decided on its own.
        SenderVerdict::SpfFailed
    }
}

/// Mail on the relay/MX port from a client neither authenticated nor in
/// `--relay-network`: verified (SPF, DKIM, ARC, DMARC) on the shard's DNS
/// thread, `Authentication-Results` fields with our authserv-id removed
/// from it, and the fields to prepend returned. `Err` with the answer when
/// it is not stored: 550 5.7.1 for a DMARC reject under `--dmarc-reject`,
/// 451 when the checks did not give the message back in time.
async fn verify_inbound(
    shard: &ShardState,
    msg: &mut Message,
    peer: SocketAddr,
    spf: Option<SpfResults>,
    summary: &mut Option<String>,
) -> Result<Vec<u8>, CommitResult> {
    let live = shard.ctx.shared.live.load();
    let policy = live.inbound.clone();
    let trusted = live
        .session
        .relay_networks
        .iter()
        .any(|n| n.contains(peer.ip()));
    drop(live);
    let domains: Vec<&str> = msg
        .envelope
        .rcpts
        .iter()
        .map(|r| r.addr.rsplit_once('@').map_or("", |(_, d)| d))
        .collect();
    // Verified when any recipient's domain wants it (`--domain-auth`).
    if trusted || !domains.iter().any(|d| policy.verifies(d)) {
        return Ok(Vec::new());
    }
    let dmarc_reject = policy.dmarc_rejects(&domains);
    drop(domains);
    let client = inbound::Client {
        ip: peer.ip(),
        helo: msg.envelope.helo.clone(),
        mail_from: msg.envelope.mail_from.clone().unwrap_or_default(),
    };
    // The body goes to the checks and back; should it not come back,
    // the message was never acknowledged and is answered 451.
    let body = std::mem::take(&mut msg.body);
    let started = Instant::now();
    let Some((body, verdict)) =
        inbound::verify(&shard.ctx.dns, &policy, dmarc_reject, client, spf, body).await
    else {
        tracing::error!(%peer, "message refused (451): the inbound checks did not finish");
        return Err(CommitResult::Failed);
    };
    msg.body = body;
    shard.metrics.inbound_auth(&verdict.summary);
    let stripped = inbound::strip_ours(&mut msg.body, &policy.authserv_id);
    // An accepted message carries its results in its `accepted` event; a
    // line of its own only says what that one does not.
    if stripped > 0 || verdict.disposition != inbound::Disposition::Accept {
        tracing::info!(%peer, results = %verdict.summary, stripped, disposition = ?verdict.disposition,
            took_ms = started.elapsed().as_millis() as u64, "inbound checks");
    }
    match verdict.disposition {
        inbound::Disposition::Reject(reply) => Err(CommitResult::Refused {
            reply,
            what: format!("DATA ({})", verdict.summary),
        }),
        inbound::Disposition::Accept | inbound::Disposition::Quarantine => {
            *summary = Some(verdict.summary);
            Ok(verdict.header)
        }
    }
}

/// How long a message waits for room on a full signing pool before 451.
const DKIM_POOL_WAIT: Duration = Duration::from_secs(10);

/// Prepends the DKIM signatures of the message `added` + `msg.body` to
/// `added` when [`dkim::plan`] says so; `added` unchanged when nothing is to
/// be signed. `Err` with the answer when the message is not stored: 550
/// when an author is someone else at a signed domain (under
/// `--dkim-from-mismatch reject`), 451 when signing failed, so that the
/// client retries rather than the message leaving unsigned into a DMARC
/// policy.
async fn dkim_sign(
    shard: &ShardState,
    msg: &mut Message,
    added: Vec<u8>,
    who: &Authenticated,
    peer: SocketAddr,
) -> Result<Vec<u8>, CommitResult> {
    let signers = shard.ctx.shared.dkim.signers();
    let authors = submit::authors(&[&added, &msg.body]);
    let may_send_as = |addr: &str| who.send_as.iter().any(|r| r.allows(addr));
    let signers = match dkim::plan(&signers, &authors, may_send_as) {
        dkim::Plan::Sign(signers) => signers,
        dkim::Plan::Unsigned => return Ok(added),
        dkim::Plan::Mismatch(what) => {
            return match shard.ctx.shared.live.load().dkim_from_mismatch {
                FromMismatch::Reject => Err(CommitResult::Refused {
                    reply: submit::FROM_NOT_OWNED,
                    what: format!("DATA (From: {what})"),
                }),
                FromMismatch::Unsigned => {
                    tracing::info!(%peer, user = %who.login, from = %what,
                        "not DKIM-signed: the author is not the login's");
                    Ok(added)
                }
            };
        }
    };
    sign_on_pool(shard, msg, added, signers, &peer.to_string()).await
}

/// Whether mail from `peer` (neither authenticated nor on the submission
/// port's rules) is signed: `--dkim-relay-network on` and the client is in
/// `--relay-network`.
fn relay_signed(shard: &ShardState, peer: SocketAddr) -> bool {
    let live = shard.ctx.shared.live.load();
    live.dkim_relay_network
        && !shard.ctx.shared.dkim.is_empty()
        && live
            .session
            .relay_networks
            .iter()
            .any(|n| n.contains(peer.ip()))
}

/// Signs mail from a trusted source that has no login (a `--relay-network`
/// client, an HTTP injection) for the first author domain that has keys:
/// the source may send as anyone, so no author is a mismatch. `who` names
/// the source in the log. `Err` (451) when signing failed.
pub(crate) async fn dkim_sign_trusted(
    shard: &ShardState,
    msg: &mut Message,
    added: Vec<u8>,
    who: &str,
) -> Result<Vec<u8>, CommitResult> {
    let signers = shard.ctx.shared.dkim.signers();
    let authors = submit::authors(&[&added, &msg.body]);
    match dkim::plan(&signers, &authors, |_| true) {
        dkim::Plan::Sign(signers) => sign_on_pool(shard, msg, added, signers, who).await,
        // `Mismatch` only comes of fields that cannot be read: unsigned.
        dkim::Plan::Unsigned | dkim::Plan::Mismatch(_) => Ok(added),
    }
}

/// Runs the signatures of `added` + `msg.body` on the signing pool and
/// puts them in front of `added`.
async fn sign_on_pool(
    shard: &ShardState,
    msg: &mut Message,
    added: Vec<u8>,
    signers: Vec<std::sync::Arc<dkim::Signer>>,
    who: &str,
) -> Result<Vec<u8>, CommitResult> {
    // The pool needs owned data: the body moves there and back. Should the
    // job be refused or the connection go away, the body is lost with it:
    // the message is answered 451 and never acknowledged.
    let body = std::mem::take(&mut msg.body);
    let job = move || {
        let result = dkim::sign_all(&signers, &[&added, &body]);
        (added, body, result)
    };
    let outcome = shard.ctx.shared.dkim_pool.run(job, DKIM_POOL_WAIT).await;
    match outcome {
        Ok((added, body, Ok(mut signed))) => {
            msg.body = body;
            signed.extend_from_slice(&added);
            Ok(signed)
        }
        Ok((_, _, Err(e))) => {
            tracing::error!(peer = %who, error = %e, "message refused (451): not signed");
            Err(CommitResult::Failed)
        }
        Err(e) => {
            tracing::error!(peer = %who, error = %e, "message refused (451): not signed");
            Err(CommitResult::Failed)
        }
    }
}

/// Checks credentials. The attempt is first reserved against this client's
/// limits (it counts as a failure until it succeeds, so concurrent guesses
/// cannot all get past the limit): 421 when the client failed too often,
/// 454 when it has too many checks in progress or the auth pool is full.
/// argon2 runs on the auth pool; a failure is answered after
/// `--auth-failure-delay`, the reservation held meanwhile. Unknown users and
/// wrong passwords look the same to the client.
async fn authenticate(shard: &ShardState, peer: SocketAddr, creds: Credentials) -> AuthResult {
    let store = &shard.ctx.shared.auth;
    let attempt = match store.throttle().reserve(peer.ip(), Instant::now()) {
        Ok(a) => a,
        Err(refusal) => {
            shard.metrics.auth(metrics::Auth::Refused);
            if let Some(held_back) = shard.reject_log.admit(Instant::now()) {
                tracing::warn!(%peer, user = ?creds.username, ?refusal, held_back,
                    "AUTH refused before the password check");
            }
            return match refusal {
                AuthRefusal::Blocked => AuthResult::TooManyFailures,
                AuthRefusal::Busy | AuthRefusal::TableFull => AuthResult::TempFail,
            };
        }
    };
    let hash = store.hash_of(&creds.username);
    let Credentials {
        username, password, ..
    } = creds;
    let check = move || users::verify(hash.as_deref(), &password);
    match shard.ctx.shared.auth_pool.try_run(check).await {
        Ok(true) => {
            shard.metrics.auth(metrics::Auth::Success);
            attempt.succeeded();
            tracing::info!(%peer, user = ?username, "authenticated");
            let send_as = store.send_as(&username);
            return AuthResult::Success(Authenticated {
                login: username,
                send_as,
            });
        }
        Ok(false) => {}
        Err(e) => {
            // Not the client's failure: its reservation is given back.
            shard.metrics.auth(metrics::Auth::TempFail);
            attempt.succeeded();
            tracing::warn!(%peer, user = ?username, error = %e, "AUTH not checked (454)");
            return AuthResult::TempFail;
        }
    }
    shard.metrics.auth(metrics::Auth::Failure);
    tracing::warn!(%peer, user = ?username, "authentication failed");
    let delay = store.failure_delay();
    if !delay.is_zero() {
        glommio::timer::sleep(delay).await;
    }
    drop(attempt);
    AuthResult::Failed
}

/// The authenticated user's own address: the login when it is one, else
/// login@ the first local domain.
fn own_address(who: &Authenticated, local_domains: &[String]) -> Option<String> {
    if who.login.contains('@') {
        return Some(who.login.clone());
    }
    local_domains.first().map(|d| format!("{}@{d}", who.login))
}

/// `<time.seq.shard.pid@host>`: unique across shards, restarts and hosts.
fn new_message_id(shard: usize, hostname: &str) -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    format!(
        "<{nanos:x}.{seq:x}.{shard}.{}@{hostname}>",
        std::process::id()
    )
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
    /// A buffer holding `initial` (input already read).
    fn new(initial: &[u8]) -> Self {
        let mut buf = vec![0; INITIAL_BUFFER.max(initial.len())];
        buf[..initial.len()].copy_from_slice(initial);
        Self {
            buf,
            start: 0,
            end: initial.len(),
            grow: false,
        }
    }

    fn pending(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// Drops everything buffered; returns how many bytes that was.
    fn clear(&mut self) -> usize {
        let n = self.end - self.start;
        self.start = 0;
        self.end = 0;
        n
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
