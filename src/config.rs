//! The validated configuration the server runs on, built once from the
//! [`crate::cli::Cli`] flags ("parse, don't validate").

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;

use crate::cli::{Cli, Fsync};
use crate::smtp::SessionConfig;
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
    pub shutdown_grace: Duration,
    pub spool: SpoolOptions,
    pub session: Arc<SessionConfig>,
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("--shards must be at least 1")]
    NoShards,
    #[error("--smtp needs at least one address")]
    NoListener,
    #[error("invalid --local-domain {0:?}")]
    BadDomain(String),
    #[error("invalid --hostname {0:?}")]
    BadHostname(String),
    #[error("--ring-depth must be at least 1")]
    BadRingDepth,
    #[error("--max-message-size must be at least 1 (SIZE 0 would advertise no limit)")]
    ZeroMessageSize,
}

impl Config {
    pub fn from_cli(cli: &Cli) -> Result<Config, ConfigError> {
        let shards = match cli.shards {
            Some(0) => return Err(ConfigError::NoShards),
            Some(n) => n,
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
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
        Ok(Config {
            smtp: cli.smtp.clone(),
            spool_dir: cli.spool_dir.clone(),
            shards,
            pin: cli.pin,
            io_memory: usize::try_from(cli.io_memory).unwrap_or(usize::MAX),
            ring_depth: cli.ring_depth,
            backlog: cli.backlog,
            max_conns_per_shard: cli.max_conns_per_shard,
            max_conns_per_ip: cli.max_conns_per_ip,
            shutdown_grace: cli.shutdown_grace,
            spool: SpoolOptions {
                max_segment: cli.max_segment_size.max(1 << 20),
                commit_window: cli.commit_window,
                fsync: cli.fsync == Fsync::On,
            },
            session: Arc::new(SessionConfig {
                hostname,
                local_domains,
                max_message_size: cli.max_message_size,
                max_recipients: cli.max_recipients,
                command_timeout: cli.command_timeout,
                data_timeout: cli.data_timeout,
                max_errors: cli.max_errors.max(1),
                bare_newline: cli.bare_newline,
            }),
        })
    }
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
