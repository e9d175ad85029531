//! The glommio glue, and the only place with sockets.
//!
//! [`run`] binds the listeners, starts one shard (a glommio executor on its
//! own thread) per configured core, and returns when every shard has shut
//! down. Shards share nothing mutable but the per-client connection and
//! login counts, the shutdown flag and the queues of the blocking pools
//! ([`crate::blocking`]); each owns its listeners, its connections and its
//! spool writer.

pub mod budget;
mod conn;
pub mod dkim;
mod inject;
mod limits;
pub mod listener;
mod proxy;
pub mod recipients;
mod shard;
pub mod tls;
pub mod users;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;

use arc_swap::ArcSwap;
use thiserror::Error;

use crate::blocking::BlockingPool;
use crate::config::Config;
use crate::inbound::screen::ScreenConfig;
use crate::policy::rate::RateLimiter;
use crate::policy::recipient::Recipients;
use crate::relay::RelayConfig;
use crate::smtp::SessionConfig;
use crate::spool::Spool;

pub use limits::IpLimiter;
pub use listener::ListenerKind;

#[derive(Debug, Error)]
pub enum ServerError {
    #[error(transparent)]
    Listen(#[from] listener::ListenError),
    #[error(
        "cannot set up io_uring for shard {shard}: {reason}\n\
         ringmta needs Linux 5.8 or later with io_uring enabled, and locked memory for the \
         rings and --io-memory ({io_memory} bytes per shard): check `ulimit -l` \
         (RLIMIT_MEMLOCK) or lower --io-memory / --ring-depth"
    )]
    IoUring {
        shard: usize,
        io_memory: usize,
        reason: String,
    },
    #[error("cannot start shard thread: {0}")]
    Thread(std::io::Error),
    #[error("shard {0} panicked")]
    ShardPanic(usize),
    #[error("cannot start the DNS resolver: {0}")]
    Resolver(std::io::Error),
    #[error("TLS: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("users: {0}")]
    Users(#[from] users::UsersError),
    #[error(transparent)]
    Dkim(#[from] dkim::DkimError),
    #[error("--admin-token-file {0}: {1}")]
    AdminToken(std::path::PathBuf, String),
    #[error("--local-recipients: {0}")]
    Recipients(#[from] recipients::RecipientsError),
}

/// Process-wide state: the stop flag the signal handler sets, the per-IP
/// connection counts, what SIGHUP reloads (certificate, users, DKIM keys,
/// local recipients, and the settings in [`Live`] and the delivery
/// settings), and the blocking pools, one per kind of work so that none
/// waits behind another.
#[derive(Debug)]
pub struct Shared {
    pub stop: AtomicBool,
    pub ip_limiter: IpLimiter,
    /// Connections, messages and recipients per minute per client
    /// network, messages per minute per user (`--max-*-per-minute`).
    pub rates: Arc<RateLimiter>,
    /// Clients that failed the pre-greet screen, refused for `--screen-ttl`.
    pub screened: crate::inbound::screen::Memory,
    /// The settings each new connection takes; replaced on SIGHUP.
    pub live: ArcSwap<Live>,
    /// The delivery settings, read by each delivery step; replaced on SIGHUP.
    pub relay: Arc<ArcSwap<RelayConfig>>,
    pub tls: tls::TlsStore,
    pub auth: users::AuthStore,
    pub dkim: dkim::DkimStore,
    pub recipients: recipients::RecipientsStore,
    /// Password checks (argon2).
    pub auth_pool: BlockingPool,
    /// DKIM signing.
    pub dkim_pool: BlockingPool,
    /// Maildir directory operations and renames.
    pub maildir_pool: Arc<BlockingPool>,
    /// The admin API's bearer token (`--admin-token-file`); replaced on
    /// SIGHUP.
    pub admin_token: Arc<arc_swap::ArcSwapOption<String>>,
}

/// What a connection takes when it starts, as one version: a SIGHUP
/// replaces the whole of it, and sessions already open keep theirs.
#[derive(Debug)]
pub struct Live {
    /// The session policy of the relay/MX listeners.
    pub session: Arc<SessionConfig>,
    /// The session policy of the submission and smtps listeners.
    pub submission_session: Arc<SessionConfig>,
    pub add_sender_header: bool,
    pub dkim_from_mismatch: dkim::FromMismatch,
    /// `--dkim-relay-network`.
    pub dkim_relay_network: bool,
    pub max_conns_per_shard: usize,
    /// The relay/MX port's pre-greet screen and DNS lists.
    pub screen: Arc<ScreenConfig>,
    /// Whether a connections-per-minute limit is set.
    pub connection_rate: bool,
    /// How mail on the relay/MX port is verified.
    pub inbound: Arc<crate::inbound::auth::AuthPolicy>,
}

impl Live {
    /// `config`'s settings, with `recipients` (the one table every session
    /// shares, which the SIGHUP reload of the file fills) in both policies,
    /// and the process's rate table when a per-minute limit is set.
    fn new(config: &Config, recipients: &Recipients, rates: &Arc<RateLimiter>) -> Live {
        let counted = config.rates.messages > 0
            || config.rates.recipients > 0
            || config.rates.user_messages > 0;
        let with = |s: &SessionConfig| {
            Arc::new(SessionConfig {
                recipients: recipients.clone(),
                rates: counted.then(|| rates.clone()),
                ..s.clone()
            })
        };
        Live {
            session: with(&config.session),
            submission_session: with(&config.submission_session),
            add_sender_header: config.add_sender_header,
            dkim_from_mismatch: config.dkim_from_mismatch,
            dkim_relay_network: config.dkim_relay_network,
            max_conns_per_shard: config.max_conns_per_shard,
            screen: config.screen.clone(),
            connection_rate: config.rates.connections > 0,
            inbound: config.inbound.clone(),
        }
    }
}

/// Queued password checks per auth thread: beyond them a login gets 454
/// rather than waiting behind a flood (each check is tens of milliseconds).
const AUTH_QUEUE_PER_THREAD: usize = 8;
/// Queued signatures and Maildir operations per thread; beyond them the
/// caller waits (bounded) for room.
const QUEUE_PER_THREAD: usize = 64;

impl Shared {
    /// Loads (or generates) the certificate, reads the users file, the
    /// DKIM keys and the local recipients.
    pub fn new(config: &Config) -> Result<Arc<Shared>, ServerError> {
        let recipients = recipients::RecipientsStore::load(
            config.local_recipients.clone(),
            config.session.recipients.clone(),
        )?;
        let rates = Arc::new(RateLimiter::new(config.rates));
        Ok(Arc::new(Shared {
            stop: AtomicBool::new(false),
            ip_limiter: IpLimiter::new(config.max_conns_per_ip),
            live: ArcSwap::from_pointee(Live::new(config, recipients.handle(), &rates)),
            rates,
            screened: Default::default(),
            relay: Arc::new(ArcSwap::new(config.relay.clone())),
            tls: tls::TlsStore::load(config.tls.clone())?,
            auth: users::AuthStore::load(config.auth.clone())?,
            dkim: dkim::DkimStore::load(config.dkim_keys.clone())?,
            recipients,
            admin_token: Arc::new(arc_swap::ArcSwapOption::from(admin_token(config)?)),
            auth_pool: BlockingPool::new(
                "auth",
                config.pools.auth_threads,
                config.pools.auth_threads * AUTH_QUEUE_PER_THREAD,
            )
            .map_err(ServerError::Thread)?,
            dkim_pool: BlockingPool::new(
                "dkim",
                config.pools.dkim_threads,
                config.pools.dkim_threads * QUEUE_PER_THREAD,
            )
            .map_err(ServerError::Thread)?,
            maildir_pool: Arc::new(
                BlockingPool::new(
                    "maildir",
                    config.pools.maildir_threads,
                    config.pools.maildir_threads * QUEUE_PER_THREAD,
                )
                .map_err(ServerError::Thread)?,
            ),
        }))
    }

    /// SIGHUP, with the configuration file re-read (the admin token's
    /// file too; one that does not read refuses the reload): puts `config`'s
    /// reloadable settings in force for new connections and the next
    /// delivery steps. The caller keeps every restart-only setting as it
    /// was in `config`. New DKIM keys are loaded first: if one does not
    /// load, nothing changes. The files the settings name are read by
    /// [`Shared::reload`], which should follow.
    pub fn apply(&self, config: &Config) -> Result<(), ServerError> {
        let token = admin_token(config)?;
        if *self.dkim.specs() != config.dkim_keys {
            self.dkim.replace(config.dkim_keys.clone())?;
        }
        self.tls.set_settings(config.tls.clone());
        self.auth.set_settings(config.auth.clone());
        self.ip_limiter.set_max(config.max_conns_per_ip);
        self.rates.set_limits(config.rates);
        self.live.store(Arc::new(Live::new(
            config,
            self.recipients.handle(),
            &self.rates,
        )));
        self.relay.store(config.relay.clone());
        self.admin_token.store(token);
        Ok(())
    }

    /// SIGHUP: re-reads the certificate, the users file, the sender login
    /// map, the DKIM keys and the local recipients. Whatever fails to load keeps its old version
    /// (and is logged); sessions in progress are not touched.
    pub fn reload(&self) {
        match self.tls.reload() {
            Ok(()) => {
                tracing::info!(cert = %self.tls.cert_path().display(), "SIGHUP: TLS certificate reloaded")
            }
            Err(e) => {
                tracing::error!(error = %e, "SIGHUP: TLS certificate NOT reloaded; keeping the old one")
            }
        }
        match self.auth.reload() {
            Ok(n) => tracing::info!(users = n, "SIGHUP: users reloaded"),
            Err(e) => {
                tracing::error!(error = %e, "SIGHUP: users NOT reloaded; keeping the old ones")
            }
        }
        match self.recipients.reload() {
            None => {}
            Some(Ok(n)) => tracing::info!(entries = n, "SIGHUP: local recipients reloaded"),
            Some(Err(e)) => tracing::error!(
                error = %e,
                "SIGHUP: local recipients NOT reloaded; keeping the old ones"
            ),
        }
        if !self.dkim.is_empty() {
            let errors = self.dkim.reload();
            for e in &errors {
                tracing::error!(error = %e, "SIGHUP: DKIM key NOT reloaded; keeping the old one");
            }
            tracing::info!(
                keys = self.dkim.len() - errors.len(),
                "SIGHUP: DKIM keys reloaded"
            );
        }
    }

    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    pub fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

/// The admin API's token, from `--admin-token-file`.
fn admin_token(config: &Config) -> Result<Option<Arc<String>>, ServerError> {
    config
        .admin_token_file
        .as_deref()
        .map(|p| read_token(p).map(Arc::new))
        .transpose()
}

/// The token in `--admin-token-file`: its first line, trimmed; at least
/// 16 characters, printable ASCII.
fn read_token(path: &std::path::Path) -> Result<String, ServerError> {
    let bad = |why: String| ServerError::AdminToken(path.to_owned(), why);
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let token = text.lines().next().unwrap_or_default().trim();
    if token.len() < 16 || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad(
            "the first line must be a token of at least 16 printable ASCII characters".into(),
        ));
    }
    Ok(token.to_owned())
}

/// The admin API's way into the shards: one command receiver per shard
/// (the admin side holds the senders), and the destinations suspended at
/// start with the end of each suspension.
#[derive(Debug, Default)]
pub struct Control {
    pub receivers: Vec<Option<futures_channel::mpsc::Receiver<crate::relay::control::Request>>>,
    pub suspended: Vec<(String, u64)>,
}

/// Runs the server until `shared.request_stop()` and every shard drained.
/// `on_listening` is called once every shard is up, with the bound addresses
/// and what each listener is for.
pub fn run(
    config: &Config,
    spool: &Spool,
    shared: Arc<Shared>,
    control: Control,
    on_listening: impl FnOnce(&[(ListenerKind, SocketAddr)]),
) -> Result<(), ServerError> {
    let Control {
        mut receivers,
        suspended,
    } = control;
    let (kinds, addrs): (Vec<ListenerKind>, Vec<SocketAddr>) =
        config.listeners().into_iter().unzip();
    let bound = listener::bind_all(&addrs, config.shards, config.backlog)?;
    // One resolver thread for all shards: outbound delivery, and the DNS
    // lists of inbound clients (which a SIGHUP may turn on at any time).
    // MTA-STS policies are fetched and kept by the same thread.
    let mta_sts = (config.delivery && config.relay.mta_sts).then(|| {
        let ca_file = config.relay.tls_ca_file.as_deref();
        crate::relay::mta_sts::Settings {
            dir: config.spool_dir.join("mta-sts"),
            port: config.relay.mta_sts_port,
            // Checked by Config::from_cli; the bundled roots otherwise.
            roots: std::sync::Arc::new(
                crate::relay::tls::roots(ca_file)
                    .or_else(|_| crate::relay::tls::roots(None))
                    .unwrap_or_else(|_| rustls::RootCertStore::empty()),
            ),
        }
    });
    if config.delivery && config.relay.dane {
        match config.relay.dns_server {
            Some(a) if a.ip().is_loopback() => {}
            Some(a) => tracing::warn!(dns_server = %a, "--dane on trusts the AD bit of a resolver that is not on loopback: the path to it is not protected"),
            None => tracing::info!("--dane on trusts the AD bit of /etc/resolv.conf's first nameserver: it must be a local validating resolver"),
        }
    }
    let dns = crate::relay::mx::Resolver::start(config.relay.dns_server, mta_sts)
        .map_err(ServerError::Resolver)?;
    let resolver = config.delivery.then(|| dns.clone());
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let (ready_tx, ready_rx) = mpsc::channel::<Result<(), ServerError>>();
    let mut threads = Vec::with_capacity(config.shards);
    // The handoff mesh between shards (outbound delivery only). Every clone
    // is made here, before any shard thread runs: glommio's MeshBuilder
    // shares a non-atomic `Rc` between its clones, so none may be cloned
    // while another thread could be dropping one.
    let shards = bound.by_shard.len();
    let mut meshes: Vec<Option<crate::relay::handoff::Mesh>> =
        if config.delivery && shards > 1 && config.relay.handoff_capacity > 0 {
            let mesh = crate::relay::handoff::Mesh::full(shards, config.relay.handoff_capacity);
            (0..shards).map(|_| Some(mesh.clone())).collect()
        } else {
            (0..shards).map(|_| None).collect()
        };
    for (id, listeners) in bound.by_shard.into_iter().enumerate() {
        let core = if config.pin && !cores.is_empty() {
            Some(cores[id % cores.len()])
        } else {
            None
        };
        let ctx = shard::ShardContext {
            id,
            config: config.clone(),
            spool_root: spool.root().to_owned(),
            shared: shared.clone(),
            queue: std::cell::Cell::new(spool.take_shard_queue(id, config.shards)),
            resolver: resolver.clone(),
            lists_dns: dns.clone(),
            dns: crate::inbound::dns::DnsHandle::start(
                &format!("dns-{id}"),
                config.relay.dns_server,
                config.dns_timeout,
            )
            .map_err(ServerError::Resolver)?,
            mesh: meshes.get_mut(id).and_then(Option::take),
            control: receivers.get_mut(id).and_then(Option::take),
            suspended: suspended.clone(),
        };
        let ready = ready_tx.clone();
        let t = std::thread::Builder::new()
            .name(format!("shard-{id}"))
            .spawn({
                let listeners = kinds.iter().copied().zip(listeners).collect();
                move || shard::run(ctx, listeners, core, ready)
            })
            .map_err(ServerError::Thread)?;
        threads.push(t);
    }
    drop(ready_tx);
    let mut first_error = None;
    for _ in 0..threads.len() {
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
            }
            Err(_) => break,
        }
    }
    if first_error.is_some() {
        shared.request_stop();
    } else {
        let named: Vec<_> = kinds.iter().copied().zip(bound.addrs).collect();
        on_listening(&named);
    }
    for (id, t) in threads.into_iter().enumerate() {
        if t.join().is_err() {
            first_error.get_or_insert(ServerError::ShardPanic(id));
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
