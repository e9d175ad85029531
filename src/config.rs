//! The validated configuration the server runs on, built once from the
//! [`crate::cli::Cli`] flags ("parse, don't validate").

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;

use crate::cli::{Cli, Fsync};
use crate::policy::recipient::{RecipientTable, Recipients};
use crate::relay::RelayConfig;
use crate::server::tls::TlsSettings;
use crate::server::users::AuthSettings;
use crate::server::ListenerKind;
use crate::smtp::{Mode, SessionConfig};
use crate::spool::SpoolOptions;

#[derive(Debug, Clone)]
pub struct Config {
    pub smtp: Vec<SocketAddr>,
    pub spool_dir: PathBuf,
    pub shards: usize,
    pub pin: bool,
    pub io_memory: usize,
    pub ring_depth: usize,
    pub backlog: i32,
    pub max_conns_per_shard: usize,
    pub max_conns_per_ip: u32,
    /// `--proxy-protocol-from`: peers whose connections start with a PROXY
    /// header naming the client; empty: nobody's do.
    pub proxy_protocol_from: Vec<crate::policy::relay::Cidr>,
    /// How long such a peer may take to send its header.
    pub proxy_protocol_timeout: Duration,
    /// Each shard's budget for message content in flight.
    pub inflight: InflightLimits,
    /// `--max-message-size` as given, when it was lowered to what one client
    /// may hold on a shard (`None`: taken as given).
    pub message_size_lowered_from: Option<u64>,
    pub shutdown_grace: Duration,
    pub spool: SpoolOptions,
    pub session: Arc<SessionConfig>,
    /// Submission and implicit-TLS listeners (`--submission`, `--smtps`).
    pub submission: Vec<SocketAddr>,
    pub smtps: Vec<SocketAddr>,
    /// The session policy of the submission and smtps listeners.
    pub submission_session: Arc<SessionConfig>,
    pub tls: TlsSettings,
    pub auth: AuthSettings,
    /// `--local-recipients`, loaded into `session.recipients` (which every
    /// session config shares) at start and on SIGHUP.
    pub local_recipients: Option<PathBuf>,
    /// Add `Sender:` to submitted mail whose From is not the user.
    pub add_sender_header: bool,
    /// `--dkim-key`: the keys that sign submitted mail.
    pub dkim_keys: Vec<crate::server::dkim::KeySpec>,
    /// What to do with submitted mail From someone the login is not.
    pub dkim_from_mismatch: crate::server::dkim::FromMismatch,
    /// `--dkim-relay-network`: sign mail from relay-network clients (and
    /// injected mail) for its From: domain.
    pub dkim_relay_network: bool,
    /// `--inject-max-recipients`: recipients per HTTP injection call (0:
    /// injection off).
    pub inject_max_recipients: usize,
    /// Threads of the password-check, signing and Maildir pools.
    pub pools: Pools,
    pub relay: Arc<RelayConfig>,
    /// Run the delivery engine (off: accept and queue only).
    pub delivery: bool,
    /// The admin HTTP listener (`--admin`; `None`: off).
    pub admin: Option<SocketAddr>,
    /// Per-minute limits per client network and per user.
    pub rates: crate::policy::rate::RateLimits,
    /// The relay/MX port's pre-greet screen and DNS lists.
    pub screen: Arc<crate::inbound::screen::ScreenConfig>,
    /// The file with the bearer token the admin API asks for
    /// (`--admin-token-file`; read by `server::Shared`, again on SIGHUP);
    /// `None`: none asked.
    pub admin_token_file: Option<PathBuf>,
    /// Verification of mail on the relay/MX port (`--inbound-auth` and
    /// the policies that follow from it).
    pub inbound: Arc<crate::inbound::auth::AuthPolicy>,
    /// `--dns-timeout`: the bound on the inbound checks' DNS.
    pub dns_timeout: Duration,
}

/// Sizes of the blocking pools ([`crate::blocking`]), at least 1 each.
#[derive(Debug, Clone, Copy)]
pub struct Pools {
    pub auth_threads: usize,
    pub dkim_threads: usize,
    pub maildir_threads: usize,
}

/// One shard's budget for message bodies being received (bytes of
/// allocation), and the most one client address may hold of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InflightLimits {
    pub per_shard: usize,
    pub per_client: usize,
}

impl InflightLimits {
    /// `--max-inflight-bytes` is for the whole server: each shard gets an
    /// equal part, so the total holds on any core count; one address may
    /// hold half of a shard's part, so another always finds room.
    pub fn split(total: u64, shards: usize) -> Self {
        let per_shard = usize::try_from(total / shards.max(1) as u64).unwrap_or(usize::MAX);
        Self {
            per_shard,
            per_client: per_shard / 2,
        }
    }
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error(
        "--admin {0} is not a loopback address: the admin API changes the queue, so it needs \
         --admin-token-file (or bind --admin to 127.0.0.1 / ::1)"
    )]
    AdminWithoutToken(SocketAddr),
    #[error("--shaping: {0}")]
    Shaping(String),
    #[error("--bounce-rules: {0}")]
    BounceRules(String),
    #[error("--shards must be at least 1")]
    NoShards,
    #[error("--smtp needs at least one address")]
    NoListener,
    #[error("invalid --local-domain {0:?}")]
    BadDomain(String),
    #[error("invalid --hostname {0:?}")]
    BadHostname(String),
    #[error("invalid --authserv-id {0:?} (a token or domain name, e.g. mx.example.org)")]
    BadAuthservId(String),
    #[error("invalid --quarantine-header {0:?} (a header field name, e.g. X-Spam-Flag)")]
    BadHeaderName(String),
    #[error("--dns-timeout must be between 100ms and 60s")]
    BadDnsTimeout,
    #[error("--ring-depth must be at least 1")]
    BadRingDepth,
    #[error("--max-message-size must be at least 1 (SIZE 0 would advertise no limit)")]
    ZeroMessageSize,
    #[error("--max-inflight-bytes {total} over {shards} shards leaves {per_client} bytes per client on a shard; at least {min} are needed (raise --max-inflight-bytes)")]
    InflightTooSmall {
        total: u64,
        shards: usize,
        per_client: usize,
        min: usize,
    },
    #[error("--max-data-time must be more than 0 (it bounds the content of every message)")]
    ZeroDataTime,
    #[error("--dnsbl-timeout must be more than 0 when --dnsbl or --dnswl is given")]
    ZeroDnsblTimeout,
    #[error("--greet-pause must be under 5 minutes (clients wait 5 minutes for the greeting: RFC 5321 4.5.3.2.1)")]
    GreetPauseTooLong,
    #[error("--dkim-key {0}: the same domain and selector twice")]
    DuplicateDkimKey(String),
    #[error("--tls-verify on needs --tls-policy require (opportunistic TLS falls back to plaintext, so a failed verification would only make delivery less private)")]
    VerifyNeedsRequire,
    #[error("--tls-ca-file {0}")]
    TlsCaFile(String),
    #[error("{0}: cannot make the path absolute (is the working directory gone?): {1}")]
    BadPath(PathBuf, std::io::Error),
}

/// Relative paths are resolved once, against the working directory at start:
/// glommio opens files by absolute path only (a relative `--spool-dir` made
/// every spool write fail with EBADF), and nothing later may depend on the
/// working directory.
fn absolute(path: &Path) -> Result<PathBuf, ConfigError> {
    std::path::absolute(path).map_err(|e| ConfigError::BadPath(path.to_owned(), e))
}

/// The shard count when `--shards` is not given: one per core but one, and
/// at least one. A shard is a thread that wants a whole core; the rest of
/// the box needs one too: the kernel's network and block work (on loopback
/// the sender pays the receiver's TCP processing), ringmta's log, DNS and
/// file-pool threads, and on a shared box the clients. Measured on 2 cores
/// (`tuning/README.md`, "Shards"): two shards took 40 % more CPU per message
/// than one (each executor's sleep sends the other core an IPI, and each
/// group commit gathers half as many messages) and gave 0.6–0.9× its
/// throughput on every path.
pub fn default_shards(cores: usize) -> usize {
    cores.saturating_sub(1).max(1)
}

impl Config {
    pub fn from_cli(cli: &Cli) -> Result<Config, ConfigError> {
        let shards = match cli.shards {
            Some(0) => return Err(ConfigError::NoShards),
            Some(n) => n,
            None => default_shards(std::thread::available_parallelism().map_or(1, |n| n.get())),
        };
        if cli.smtp.is_empty() {
            return Err(ConfigError::NoListener);
        }
        if cli.ring_depth == 0 {
            return Err(ConfigError::BadRingDepth);
        }
        if cli.max_message_size == 0 {
            return Err(ConfigError::ZeroMessageSize);
        }
        if cli.max_data_time.is_zero() {
            return Err(ConfigError::ZeroDataTime);
        }
        if cli.dnsbl_timeout.is_zero() && !(cli.dnsbl.is_empty() && cli.dnswl.is_empty()) {
            return Err(ConfigError::ZeroDnsblTimeout);
        }
        if cli.greet_pause >= Duration::from_secs(300) {
            return Err(ConfigError::GreetPauseTooLong);
        }
        let admin_token_file = match &cli.admin_token_file {
            None => None,
            Some(path) => Some(absolute(path)?),
        };
        if let Some(addr) = cli.admin.0 {
            if !addr.ip().is_loopback() && admin_token_file.is_none() {
                return Err(ConfigError::AdminWithoutToken(addr));
            }
        }
        let inflight = InflightLimits::split(cli.max_inflight_bytes, shards);
        if inflight.per_client < crate::smtp::session::MIN_DATA_ROOM {
            return Err(ConfigError::InflightTooSmall {
                total: cli.max_inflight_bytes,
                shards,
                per_client: inflight.per_client,
                min: crate::smtp::session::MIN_DATA_ROOM,
            });
        }
        // A message larger than one client may hold on a shard could never
        // be taken: better an honest SIZE (and 552 at once) than a 452 the
        // sender retries for days.
        let max_message_size = cli.max_message_size.min(inflight.per_client as u64);
        let message_size_lowered_from =
            (max_message_size < cli.max_message_size).then_some(cli.max_message_size);
        let mut local_domains = Vec::with_capacity(cli.local_domains.len());
        for d in &cli.local_domains {
            if !is_domain(d) {
                return Err(ConfigError::BadDomain(d.clone()));
            }
            local_domains.push(d.to_ascii_lowercase());
        }
        let hostname = match &cli.hostname {
            Some(h) if is_domain(h) => h.clone(),
            Some(h) => return Err(ConfigError::BadHostname(h.clone())),
            None => system_hostname().unwrap_or_else(|| "localhost".into()),
        };
        let inbound = inbound_policy(cli, &hostname)?;
        if !(Duration::from_millis(100)..=Duration::from_secs(60)).contains(&cli.dns_timeout) {
            return Err(ConfigError::BadDnsTimeout);
        }
        let spool_dir = absolute(&cli.spool_dir)?;
        let routes = cli
            .routes
            .iter()
            .map(|r| r.clone().map_maildir(absolute))
            .collect::<Result<Vec<_>, _>>()?;
        let relay = Arc::new(RelayConfig {
            routes,
            relay_host: cli.relay_host.clone(),
            local_domains: local_domains.clone(),
            maildir_root: absolute(&cli.maildir)?,
            outbound_port: cli.outbound_port,
            helo_name: hostname.clone(),
            dns_server: cli.dns_server,
            connect_timeout: cli.connect_timeout,
            reply_timeout: cli.relay_timeout,
            banner_timeout: cli.relay_banner_timeout,
            final_timeout: cli.relay_final_timeout,
            data_timeout: cli.relay_data_timeout,
            retry_schedule: cli.retry_schedule.0.clone(),
            max_queue_age: cli.max_queue_age,
            delay_warning: (!cli.delay_warning.is_zero()).then_some(cli.delay_warning),
            bounce_size_limit: usize::try_from(cli.bounce_size_limit).unwrap_or(usize::MAX),
            max_conns_per_dest: cli.max_conns_per_dest.max(1),
            maildir_concurrency: cli.maildir_concurrency.max(1),
            max_hops: cli.max_hops,
            tls_policy: cli.tls_policy,
            tls_verify: tls_verify(cli)?,
            dane: cli.dane == crate::cli::TlsVerify::On,
            mta_sts: cli.mta_sts == crate::cli::TlsVerify::On,
            mta_sts_port: cli.mta_sts_port,
            tls_ca_file: match &cli.tls_ca_file {
                Some(path) => {
                    let path = absolute(path)?;
                    crate::relay::tls::roots(Some(&path)).map_err(ConfigError::TlsCaFile)?;
                    Some(path)
                }
                None => None,
            },
            tls_handshake_timeout: cli.tls_handshake_timeout,
            handoff_capacity: cli.handoff_capacity as usize,
            tick: Duration::from_secs(1),
            shaping: Arc::new(match &cli.shaping {
                Some(path) => crate::relay::shaping::Rules::load(&absolute(path)?)
                    .map_err(ConfigError::Shaping)?,
                None => crate::relay::shaping::Rules::builtin(),
            }),
            classifier: Arc::new(match &cli.bounce_rules {
                Some(path) => crate::relay::classify::Classifier::load(&absolute(path)?)
                    .map_err(ConfigError::BounceRules)?,
                None => crate::relay::classify::Classifier::builtin(),
            }),
        });
        let session = SessionConfig {
            hostname: hostname.clone(),
            local_domains: local_domains.clone(),
            max_message_size,
            max_recipients: cli.max_recipients,
            command_timeout: cli.command_timeout,
            data_timeout: cli.data_timeout,
            max_data_time: cli.max_data_time,
            min_data_room: crate::smtp::session::MIN_DATA_ROOM,
            max_errors: cli.max_errors.max(1),
            bare_newline: cli.bare_newline,
            relay_networks: cli.relay_networks.clone(),
            routes: cli.routes.clone(),
            // Filled from the file by `Shared::new`, before any session.
            recipients: if cli.local_recipients.is_some() {
                Recipients::enabled(RecipientTable::default())
            } else {
                Recipients::default()
            },
            mode: Mode::Relay,
            // A certificate is always there (given or generated).
            starttls: true,
            plaintext_auth_on_loopback: false,
            screen_protocol: cli.screen_protocol,
            // The process's table, set by `Shared` when a limit is.
            rates: None,
            check_sender: inbound.checks_sender(),
            spf_rcpt: inbound.spf_rcpt(),
        };
        let submission_session = Arc::new(SessionConfig {
            mode: Mode::Submission,
            plaintext_auth_on_loopback: cli.allow_plaintext_auth_on_loopback,
            // The screen is the relay/MX port's.
            screen_protocol: false,
            check_sender: false,
            ..session.clone()
        });
        let tls = TlsSettings {
            files: cli.tls_cert.clone().zip(cli.tls_key.clone()),
            generated_dir: spool_dir.join("tls"),
            hostname: hostname.clone(),
            handshake_timeout: cli.tls_handshake_timeout,
        };
        let auth = AuthSettings {
            users: cli.users.clone(),
            sender_login_map: cli.sender_login_map.clone(),
            local_domains: local_domains.clone(),
            failure_delay: cli.auth_failure_delay,
            max_failures: cli.max_auth_failures,
            failure_window: cli.auth_failure_window,
            max_checks_per_ip: cli.max_auth_checks_per_ip,
        };
        Ok(Config {
            submission: cli.submission.iter().filter_map(|l| l.0).collect(),
            smtps: cli.smtps.iter().filter_map(|l| l.0).collect(),
            submission_session,
            tls,
            auth,
            local_recipients: cli.local_recipients.clone(),
            add_sender_header: cli.add_sender_header,
            dkim_keys: dkim_keys(cli)?,
            dkim_from_mismatch: cli.dkim_from_mismatch,
            dkim_relay_network: cli.dkim_relay_network == crate::cli::Switch::On,
            inject_max_recipients: cli.inject_max_recipients,
            pools: Pools {
                auth_threads: cli.auth_threads.max(1),
                dkim_threads: cli.dkim_threads.max(1),
                maildir_threads: cli.maildir_threads.max(1),
            },
            smtp: cli.smtp.clone(),
            spool_dir,
            shards,
            pin: cli.pin,
            io_memory: usize::try_from(cli.io_memory).unwrap_or(usize::MAX),
            ring_depth: cli.ring_depth,
            backlog: cli.backlog,
            max_conns_per_shard: cli.max_conns_per_shard,
            max_conns_per_ip: cli.max_conns_per_ip,
            proxy_protocol_from: cli.proxy_protocol_from.clone(),
            proxy_protocol_timeout: cli.proxy_protocol_timeout,
            inflight,
            message_size_lowered_from,
            shutdown_grace: cli.shutdown_grace,
            relay,
            delivery: !cli.no_delivery,
            admin: cli.admin.0,
            admin_token_file,
            inbound,
            dns_timeout: cli.dns_timeout,
            spool: SpoolOptions {
                max_segment: cli.max_segment_size.max(1 << 20),
                compact_below: cli.compact_below.clamp(0.0, 1.0),
                commit_window: cli.commit_window,
                fsync: cli.fsync == Fsync::On,
                delivery_cache: cli.delivery_cache,
            },
            session: Arc::new(session),
            rates: crate::policy::rate::RateLimits {
                connections: cli.max_connections_per_minute,
                messages: cli.max_messages_per_minute,
                recipients: cli.max_recipients_per_minute,
                user_messages: cli.max_messages_per_user_per_minute,
            },
            screen: Arc::new(crate::inbound::screen::ScreenConfig {
                greet_pause: cli.greet_pause,
                ttl: cli.screen_ttl,
                lists: crate::inbound::dnsbl::Lists {
                    block: cli.dnsbl.clone(),
                    allow: cli.dnswl.clone(),
                    threshold: cli.dnsbl_threshold,
                    timeout: cli.dnsbl_timeout,
                },
            }),
        })
    }

    /// Every listener address with what it serves, in the order the
    /// `ringmta listening` lines are printed: smtp, submission, smtps.
    pub fn listeners(&self) -> Vec<(ListenerKind, SocketAddr)> {
        let kind = |k: ListenerKind| move |a: &SocketAddr| (k, *a);
        self.smtp
            .iter()
            .map(kind(ListenerKind::Smtp))
            .chain(self.submission.iter().map(kind(ListenerKind::Submission)))
            .chain(self.smtps.iter().map(kind(ListenerKind::Smtps)))
            .collect()
    }
}

/// One key per domain and selector (a domain may have several selectors).
fn dkim_keys(cli: &Cli) -> Result<Vec<crate::server::dkim::KeySpec>, ConfigError> {
    for (i, k) in cli.dkim_keys.iter().enumerate() {
        if cli.dkim_keys[..i]
            .iter()
            .any(|o| o.domain == k.domain && o.selector == k.selector)
        {
            return Err(ConfigError::DuplicateDkimKey(format!(
                "{}:{}",
                k.domain, k.selector
            )));
        }
    }
    Ok(cli.dkim_keys.clone())
}

/// `--tls-verify on` only means something when TLS is mandatory.
fn tls_verify(cli: &Cli) -> Result<bool, ConfigError> {
    use crate::relay::tls::TlsPolicy;
    match (cli.tls_verify, cli.tls_policy) {
        (crate::cli::TlsVerify::Off, _) => Ok(false),
        (crate::cli::TlsVerify::On, TlsPolicy::Require | TlsPolicy::Verify) => Ok(true),
        (
            crate::cli::TlsVerify::On,
            TlsPolicy::Opportunistic | TlsPolicy::None | TlsPolicy::Dane,
        ) => Err(ConfigError::VerifyNeedsRequire),
    }
}

/// `--inbound-auth` and its policies; the authserv-id defaults to the
/// host name.
fn inbound_policy(
    cli: &Cli,
    hostname: &str,
) -> Result<Arc<crate::inbound::auth::AuthPolicy>, ConfigError> {
    let authserv_id = cli
        .authserv_id
        .clone()
        .unwrap_or_else(|| hostname.to_owned());
    // RFC 8601 2.2: a value (token); RFC 2045 tspecials excluded.
    let token = |s: &str| {
        !s.is_empty()
            && s.len() <= 255
            && s.bytes()
                .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?=".contains(&b))
    };
    if !token(&authserv_id) {
        return Err(ConfigError::BadAuthservId(authserv_id));
    }
    let name = &cli.quarantine_header;
    // RFC 5322 2.2: printable ASCII but the colon.
    if name.is_empty()
        || name.len() > 76
        || !name.bytes().all(|b| b.is_ascii_graphic() && b != b':')
    {
        return Err(ConfigError::BadHeaderName(name.clone()));
    }
    Ok(Arc::new(crate::inbound::auth::AuthPolicy {
        enabled: cli.inbound_auth == crate::cli::InboundAuth::On,
        authserv_id,
        spf: cli.spf_policy,
        dmarc_reject: cli.dmarc_reject,
        domains: cli.domain_auth.clone(),
        quarantine_header: name.clone(),
    }))
}

fn is_domain(d: &str) -> bool {
    !d.is_empty()
        && d.len() <= 255
        && d.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

fn system_hostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates
    // within it on success (or truncates, which the position search handles).
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = std::str::from_utf8(&buf[..end]).ok()?;
    is_domain(name).then(|| name.to_owned())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn config(args: &[&str]) -> Result<Config, ConfigError> {
        let mut argv = vec!["ringmta", "--hostname", "mx.test"];
        argv.extend_from_slice(args);
        Config::from_cli(&Cli::parse_from(argv))
    }

    #[test]
    fn default_shards_leave_a_core_to_the_rest_of_the_box() {
        assert_eq!(default_shards(1), 1);
        assert_eq!(default_shards(2), 1);
        assert_eq!(default_shards(4), 3);
        assert_eq!(default_shards(16), 15);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(config(&[]).unwrap().shards, default_shards(cores));
        assert_eq!(config(&["--shards", "2"]).unwrap().shards, 2);
    }

    #[test]
    fn inbound_checks_are_on_by_default_and_validated() {
        let c = config(&[]).unwrap();
        assert!(c.inbound.enabled);
        assert_eq!(c.inbound.authserv_id, "mx.test");
        assert_eq!(c.inbound.spf, crate::inbound::auth::SpfPolicy::Mark);
        assert!(!c.inbound.dmarc_reject);
        assert_eq!(c.inbound.quarantine_header, "X-Spam-Flag");
        assert_eq!(c.dns_timeout, Duration::from_secs(5));
        assert!(!c.session.check_sender);
        let c = config(&["--spf-policy", "reject"]).unwrap();
        assert!(c.session.check_sender);
        assert!(!c.submission_session.check_sender);
        let c = config(&["--spf-policy", "reject", "--inbound-auth", "off"]).unwrap();
        assert!(!c.session.check_sender);
        assert!(matches!(
            config(&["--authserv-id", "mx example"]),
            Err(ConfigError::BadAuthservId(_))
        ));
        assert!(matches!(
            config(&["--authserv-id", "a;b"]),
            Err(ConfigError::BadAuthservId(_))
        ));
        assert!(matches!(
            config(&["--quarantine-header", "X-Bad:"]),
            Err(ConfigError::BadHeaderName(_))
        ));
        assert!(matches!(
            config(&["--dns-timeout", "0s"]),
            Err(ConfigError::BadDnsTimeout)
        ));
    }

    #[test]
    fn inflight_budget_is_split_between_shards_and_bounds_message_size() {
        let c = config(&["--shards", "2"]).unwrap();
        assert_eq!(
            c.inflight,
            InflightLimits {
                per_shard: 100 << 20,
                per_client: 50 << 20
            }
        );
        // The default message size fits one client's share on 2 shards.
        assert_eq!(c.session.max_message_size, 50 << 20);
        assert_eq!(c.message_size_lowered_from, None);

        // On 16 shards a client may hold 6.25 MiB: SIZE says so.
        let c = config(&["--shards", "16"]).unwrap();
        assert_eq!(c.inflight.per_client, 6400 << 10);
        assert_eq!(c.session.max_message_size, 6400 << 10);
        assert_eq!(c.submission_session.max_message_size, 6400 << 10);
        assert_eq!(c.message_size_lowered_from, Some(50 << 20));

        assert!(matches!(
            config(&["--shards", "2", "--max-inflight-bytes", "200K"]),
            Err(ConfigError::InflightTooSmall { .. })
        ));
        assert!(matches!(
            config(&["--max-data-time", "0"]),
            Err(ConfigError::ZeroDataTime)
        ));
    }
}
