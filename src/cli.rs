//! Command-line flags, each also readable from a `RINGMTA_*` environment
//! variable. This is the low-level, as-typed form; [`crate::config::Config`]
//! is what the server runs on.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::smtp::data::BareNewline;

/// ringmta: thread-per-core ESMTP relay and submission server on io_uring.
#[derive(Debug, Parser)]
#[command(name = "ringmta", version, about, max_term_width = 100)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Cli {
    /// Without a subcommand, ringmta serves.
    #[command(subcommand)]
    pub command: Option<Subcommand>,

    /// Relay/MX listener address (repeatable).
    #[arg(
        long = "smtp",
        value_name = "ADDR",
        env = "RINGMTA_SMTP",
        value_delimiter = ',',
        default_value = "127.0.0.1:2525"
    )]
    pub smtp: Vec<SocketAddr>,

    /// Name used in the greeting, EHLO reply and Received headers [default: the system host name].
    #[arg(long, env = "RINGMTA_HOSTNAME")]
    pub hostname: Option<String>,

    /// Directory for the message queue and the instance lock file.
    #[arg(
        long,
        value_name = "DIR",
        env = "RINGMTA_SPOOL_DIR",
        default_value = "./var/spool"
    )]
    pub spool_dir: PathBuf,

    /// Domain whose mail is accepted for local delivery (repeatable).
    #[arg(
        long = "local-domain",
        value_name = "DOMAIN",
        env = "RINGMTA_LOCAL_DOMAIN",
        value_delimiter = ',',
        default_value = "localhost"
    )]
    pub local_domains: Vec<String>,

    /// Largest message accepted, in bytes (suffixes K, M, G); advertised with SIZE.
    #[arg(long, value_name = "BYTES", env = "RINGMTA_MAX_MESSAGE_SIZE", default_value = "50M",
          value_parser = parse_size)]
    pub max_message_size: u64,

    /// Most recipients per message; more get 452 4.5.3.
    #[arg(
        long,
        value_name = "N",
        env = "RINGMTA_MAX_RECIPIENTS",
        default_value_t = 1000
    )]
    pub max_recipients: usize,

    /// Longest a finished message waits for others to share its fdatasync (0: sync as soon as the previous one returns).
    #[arg(long, value_name = "DURATION", env = "RINGMTA_COMMIT_WINDOW", default_value = "0",
          value_parser = parse_duration)]
    pub commit_window: Duration,

    /// fdatasync before every 250: on, or off FOR BENCHMARKS ONLY (acknowledged mail can be lost).
    #[arg(
        long,
        value_name = "on|off",
        env = "RINGMTA_FSYNC",
        default_value = "on",
        value_enum
    )]
    pub fsync: Fsync,

    /// Size at which a shard starts a new spool segment file.
    #[arg(long, value_name = "BYTES", env = "RINGMTA_MAX_SEGMENT_SIZE", default_value = "64M",
          value_parser = parse_size)]
    pub max_segment_size: u64,

    /// Number of shards (glommio executors) [default: one per available core].
    #[arg(long, value_name = "N", env = "RINGMTA_SHARDS")]
    pub shards: Option<usize>,

    /// Pin each shard to its own core (measured slower on 2 shared cores; see tuning/).
    #[arg(long, env = "RINGMTA_PIN")]
    pub pin: bool,

    /// Memory each shard registers with io_uring, in bytes (must fit RLIMIT_MEMLOCK for non-root).
    #[arg(long, value_name = "BYTES", env = "RINGMTA_IO_MEMORY", default_value = "512K",
          value_parser = parse_size)]
    pub io_memory: u64,

    /// io_uring submission queue depth per ring.
    #[arg(
        long,
        value_name = "N",
        env = "RINGMTA_RING_DEPTH",
        default_value_t = 128
    )]
    pub ring_depth: usize,

    /// Listen backlog of each shard's listening socket.
    #[arg(
        long,
        value_name = "N",
        env = "RINGMTA_BACKLOG",
        default_value_t = 1024
    )]
    pub backlog: i32,

    /// Wait for the next command before 421 (RFC 5321 4.5.3.2.7: 5 minutes).
    #[arg(long, value_name = "DURATION", env = "RINGMTA_COMMAND_TIMEOUT", default_value = "5m",
          value_parser = parse_duration)]
    pub command_timeout: Duration,

    /// Wait for the next block of message content before 421 (RFC 5321 4.5.3.2.6: 3 minutes).
    #[arg(long, value_name = "DURATION", env = "RINGMTA_DATA_TIMEOUT", default_value = "3m",
          value_parser = parse_duration)]
    pub data_timeout: Duration,

    /// Concurrent connections per shard; more are answered 421 and closed.
    #[arg(
        long,
        value_name = "N",
        env = "RINGMTA_MAX_CONNS_PER_SHARD",
        default_value_t = 20_000
    )]
    pub max_conns_per_shard: usize,

    /// Concurrent connections per client IP address over all shards (0: no limit).
    #[arg(
        long,
        value_name = "N",
        env = "RINGMTA_MAX_CONNS_PER_IP",
        default_value_t = 100
    )]
    pub max_conns_per_ip: u32,

    /// Error replies after which a session is closed with 421.
    #[arg(
        long,
        value_name = "N",
        env = "RINGMTA_MAX_ERRORS",
        default_value_t = 20
    )]
    pub max_errors: u32,

    /// Bare CR or LF in DATA: store it as CRLF (normalize) or refuse the message with 550 (reject).
    #[arg(long, value_name = "POLICY", env = "RINGMTA_BARE_NEWLINE", default_value = "normalize",
          value_parser = parse_bare_newline)]
    pub bare_newline: BareNewline,

    /// On SIGTERM/SIGINT, how long open transactions may take to finish.
    #[arg(long, value_name = "DURATION", env = "RINGMTA_SHUTDOWN_GRACE", default_value = "30s",
          value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    /// Log filter (tracing EnvFilter syntax, e.g. info or ringmta=debug).
    #[arg(
        long,
        value_name = "FILTER",
        env = "RINGMTA_LOG",
        default_value = "info"
    )]
    pub log: String,
}

#[derive(Debug, clap::Subcommand)]
pub enum Subcommand {
    /// Inspect the queue in a spool directory (read-only; works while ringmta runs).
    Queue {
        /// The spool directory to read.
        #[arg(
            long,
            value_name = "DIR",
            env = "RINGMTA_SPOOL_DIR",
            default_value = "./var/spool"
        )]
        spool_dir: PathBuf,
        #[command(subcommand)]
        action: QueueAction,
    },
}

#[derive(Debug, clap::Subcommand)]
pub enum QueueAction {
    /// Number of queued messages and their total size.
    Count,
    /// One line per message: id, size, sender, recipients.
    List,
    /// Print one message (envelope block, then the message) by id.
    Show { id: String },
}

/// Whether the spool syncs before acknowledging.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Fsync {
    On,
    Off,
}

fn parse_bare_newline(s: &str) -> Result<BareNewline, String> {
    match s {
        "normalize" => Ok(BareNewline::Normalize),
        "reject" => Ok(BareNewline::Reject),
        _ => Err(format!("{s:?}: expected normalize or reject")),
    }
}

/// Bytes with an optional K/M/G suffix (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, 'k' | 'K')) => (&s[..i], 1u64 << 10),
        Some((i, 'm' | 'M')) => (&s[..i], 1 << 20),
        Some((i, 'g' | 'G')) => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    num.trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("not a size: {s:?} (use e.g. 1048576, 512K, 50M)"))
}

/// A duration: a number with an optional unit ms, s (default), m or h.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("not a duration: {s:?} (use e.g. 300, 30s, 5m, 250ms)"))?;
    let secs = match unit.trim() {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        other => return Err(format!("unknown duration unit {other:?} in {s:?}")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("bad duration {s:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("50M"), Ok(50 << 20));
        assert_eq!(parse_size("1024"), Ok(1024));
        assert!(parse_size("x").is_err());
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert!(parse_duration("3 weeks").is_err());
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
