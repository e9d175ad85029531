//! Command line: the flags (one help line each) and their validation into a
//! [`Config`] the run uses.
//!
//! Owns the safety rules on the target (loopback unless `--allow-remote`)
//! and the bounds of a run (it always stops by itself).

use crate::message::{SizeSpec, Template};
use crate::session::Plan;
use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

/// Sessions per run when neither --sessions nor --duration is given.
pub const DEFAULT_SESSIONS: u64 = 1000;
/// Concurrency when --concurrency is not given (closed loop).
pub const DEFAULT_CONCURRENCY: u32 = 50;
/// Concurrency cap when --concurrency is not given (open loop).
pub const DEFAULT_OPEN_LOOP_CAP: u32 = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

/// SMTP load generator for ringmta: drives an SMTP server and reports
/// sessions/s, messages/s and latency percentiles of every protocol step.
#[derive(Debug, Parser)]
// term_width = 0: never wrap and never move a flag's help to its own line,
// so `--help` stays one line per flag.
#[command(name = "ringmta-loadgen", version, term_width = 0)]
pub struct Args {
    /// Server to load, HOST:PORT (loopback only unless --allow-remote)
    #[arg(
        long,
        short = 't',
        value_name = "HOST:PORT",
        default_value = "127.0.0.1:2525",
        env = "LOADGEN_TARGET"
    )]
    pub target: String,
    /// Allow a target outside 127.0.0.0/8, ::1 and localhost
    #[arg(long)]
    pub allow_remote: bool,
    /// Worker threads, one event loop each [default: number of cores]
    #[arg(long, short = 'w', value_name = "N")]
    pub workers: Option<usize>,
    /// Stop after this many sessions [default: 1000 unless --duration]
    #[arg(long, short = 'n', value_name = "N")]
    pub sessions: Option<u64>,
    /// Stop starting sessions after this many seconds (in-flight ones finish)
    #[arg(long, short = 'd', value_name = "S")]
    pub duration: Option<f64>,
    /// Closed loop: sessions in flight; open loop: cap on them [default: 50; with --rate: 1000]
    #[arg(long, short = 'c', value_name = "C")]
    pub concurrency: Option<u32>,
    /// Open loop: start this many sessions per second on a fixed schedule
    #[arg(long, short = 'r', value_name = "R")]
    pub rate: Option<f64>,
    /// Ramp concurrency (closed loop) or rate (open loop) up linearly over S seconds
    #[arg(long, value_name = "S", default_value_t = 0.0)]
    pub ramp: f64,
    /// Mail transactions per session (0: connect, EHLO, QUIT only)
    #[arg(long, short = 'm', value_name = "M", default_value_t = 1)]
    pub messages_per_session: u32,
    /// Recipients (RCPT TO) per message
    #[arg(long, value_name = "R", default_value_t = 1)]
    pub recipients: u32,
    /// Message size in bytes: N, Nk, Nm, or MIN:MAX for uniform sizes (e.g. 1k:64k)
    #[arg(long, short = 's', value_name = "BYTES", default_value = "1k")]
    pub size: SizeSpec,
    /// Pipeline MAIL/RCPT/DATA (RFC 2920) when the server offers PIPELINING
    #[arg(
        long,
        value_enum,
        value_name = "ON|OFF",
        default_value = "on",
        hide_possible_values = true
    )]
    pub pipelining: OnOff,
    /// Send messages with BDAT ... LAST (RFC 3030) when the server offers CHUNKING
    #[arg(long)]
    pub bdat: bool,
    /// Require STARTTLS and run each session over TLS
    #[arg(long)]
    pub starttls: bool,
    /// With --starttls: accept any server certificate [default: on for loopback targets]
    #[arg(
        long,
        value_enum,
        value_name = "ON|OFF",
        num_args = 0..=1,
        default_missing_value = "on",
        hide_possible_values = true
    )]
    pub insecure: Option<OnOff>,
    /// Authenticate with AUTH PLAIN as USER:PASS
    #[arg(
        long,
        value_name = "USER:PASS",
        env = "LOADGEN_AUTH",
        hide_env_values = true
    )]
    pub auth: Option<String>,
    /// MAIL FROM address; the n in braces becomes the message number
    #[arg(long, value_name = "TEMPLATE", default_value = "loadgen{n}@localhost")]
    pub mail_from: Template,
    /// RCPT TO address; the n in braces becomes the recipient number
    #[arg(long, value_name = "TEMPLATE", default_value = "rcpt{n}@localhost")]
    pub rcpt_to: Template,
    /// Name sent in EHLO
    #[arg(long, value_name = "NAME", default_value = "loadgen.localhost")]
    pub helo: String,
    /// Per-step timeout in seconds (connect, each reply, TLS handshake)
    #[arg(long, value_name = "S", default_value_t = 30.0)]
    pub timeout: f64,
    /// DKIM-sign every message with the PEM key at PATH (RSA or Ed25519, e.g. from `ringmta dkim-keygen`) as DOMAIN and SELECTOR, to load a server that verifies
    #[arg(long, value_name = "DOMAIN:SELECTOR:PATH")]
    pub dkim_key: Option<String>,
    /// Write all counts and percentiles as JSON to FILE
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write a self-contained HTML report (inline SVG charts) to FILE
    #[arg(long, value_name = "FILE")]
    pub html: Option<PathBuf>,
    /// Exit with status 1 if any error (failed connect, timeout, rejection, ...) occurred
    #[arg(long)]
    pub fail_on_error: bool,
    /// Never print the live progress line (it is shown only when stderr is a terminal)
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

/// How sessions are started.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    /// `concurrency` sessions back to back.
    Closed,
    /// Sessions started at `rate` per second on a fixed schedule.
    Open { rate: f64 },
}

/// A validated run configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub target: SocketAddr,
    /// The host part of `--target`, for TLS server name checks.
    pub target_host: String,
    pub workers: usize,
    /// Total sessions to run; `None` with `--duration` only.
    pub sessions: Option<u64>,
    pub duration: Option<Duration>,
    pub concurrency: u32,
    pub mode: Mode,
    pub ramp: Duration,
    pub size: SizeSpec,
    pub timeout: Duration,
    pub insecure: bool,
    pub plan: Plan,
    /// `--dkim-key`: every message is signed with it.
    pub dkim: Option<crate::message::DkimSpec>,
    pub json: Option<PathBuf>,
    pub html: Option<PathBuf>,
    pub fail_on_error: bool,
    pub quiet: bool,
}

impl Config {
    pub fn from_args(args: Args) -> Result<Config> {
        let (target, host, loopback) = resolve_target(&args.target)?;
        if !loopback && !args.allow_remote {
            bail!(
                "refusing to load {} ({target}): not a loopback address; \
                 pass --allow-remote if you really mean it",
                args.target
            );
        }
        let duration = match args.duration {
            Some(d) => Some(seconds("--duration", d, false)?),
            None => None,
        };
        let sessions = match (args.sessions, duration) {
            (Some(0), _) => bail!("--sessions must be at least 1"),
            (Some(n), _) => Some(n),
            (None, Some(_)) => None,
            (None, None) => Some(DEFAULT_SESSIONS),
        };
        let mode = match args.rate {
            None => Mode::Closed,
            Some(r) if r.is_finite() && r > 0.0 && r <= 10_000_000.0 => Mode::Open { rate: r },
            Some(r) => bail!("--rate must be a positive number of sessions per second, got {r}"),
        };
        let concurrency = args.concurrency.unwrap_or(match mode {
            Mode::Closed => DEFAULT_CONCURRENCY,
            Mode::Open { .. } => DEFAULT_OPEN_LOOP_CAP,
        });
        if concurrency == 0 {
            bail!("--concurrency must be at least 1");
        }
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let workers = match args.workers {
            Some(0) => bail!("--workers must be at least 1"),
            Some(w) => w,
            None => cores,
        };
        // A worker without connections would idle; never run more workers
        // than concurrent sessions.
        let workers = workers.min(concurrency as usize);
        if args.recipients == 0 {
            bail!("--recipients must be at least 1");
        }
        if args.helo.is_empty()
            || args
                .helo
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
        {
            bail!("--helo must be a non-empty name without spaces");
        }
        let auth_command = match &args.auth {
            None => None,
            Some(spec) => {
                let (user, pass) = spec.split_once(':').context("--auth expects USER:PASS")?;
                if user.is_empty() {
                    bail!("--auth: empty user name");
                }
                Some(Plan::auth_plain_command(user, pass))
            }
        };
        let insecure = match args.insecure {
            Some(v) => v == OnOff::On,
            None => loopback,
        };
        Ok(Config {
            target,
            target_host: host,
            workers,
            sessions,
            duration,
            concurrency,
            mode,
            ramp: seconds("--ramp", args.ramp, true)?,
            size: args.size,
            timeout: seconds("--timeout", args.timeout, false)?,
            insecure,
            plan: Plan {
                helo: args.helo,
                messages: args.messages_per_session,
                recipients: args.recipients,
                pipelining: args.pipelining == OnOff::On,
                bdat: args.bdat,
                starttls: args.starttls,
                auth_command,
                mail_from: args.mail_from,
                rcpt_to: args.rcpt_to,
            },
            dkim: match &args.dkim_key {
                Some(s) => {
                    let spec: crate::message::DkimSpec = s.parse().map_err(anyhow::Error::msg)?;
                    // Loaded once here so a bad key fails the start.
                    spec.signer().map_err(anyhow::Error::msg)?;
                    Some(spec)
                }
                None => None,
            },
            json: args.json,
            html: args.html,
            fail_on_error: args.fail_on_error,
            quiet: args.quiet,
        })
    }
}

fn seconds(flag: &str, value: f64, zero_ok: bool) -> Result<Duration> {
    if !value.is_finite() || value < 0.0 || (value == 0.0 && !zero_ok) || value > 1e7 {
        bail!("{flag} must be a positive number of seconds, got {value}");
    }
    Ok(Duration::from_secs_f64(value))
}

/// Resolves `HOST:PORT`; returns the address to use, the host part and
/// whether *every* address the name resolves to is loopback.
fn resolve_target(target: &str) -> Result<(SocketAddr, String, bool)> {
    let host = match target.rsplit_once(':') {
        Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']').to_owned(),
        None => bail!("--target {target:?}: expected HOST:PORT"),
    };
    let addrs: Vec<SocketAddr> = target
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve --target {target:?}"))?
        .collect();
    let first = *addrs
        .first()
        .with_context(|| format!("--target {target:?} resolves to no address"))?;
    let loopback = addrs.iter().all(|a| is_loopback(a.ip()));
    Ok((first, host, loopback))
}

fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config> {
        let mut argv = vec!["ringmta-loadgen"];
        argv.extend_from_slice(args);
        Config::from_args(Args::try_parse_from(argv)?)
    }

    #[test]
    fn defaults() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.target, "127.0.0.1:2525".parse().unwrap());
        assert_eq!(c.sessions, Some(DEFAULT_SESSIONS));
        assert_eq!(c.concurrency, DEFAULT_CONCURRENCY);
        assert_eq!(c.mode, Mode::Closed);
        assert!(c.plan.pipelining && !c.plan.bdat);
        assert!(c.insecure);
        assert_eq!(c.timeout, Duration::from_secs(30));
    }

    #[test]
    fn loopback_only_unless_allowed() {
        for ok in ["127.0.0.1:25", "127.9.9.9:25", "[::1]:25", "localhost:25"] {
            assert!(parse(&["--target", ok]).is_ok(), "{ok}");
        }
        let err = parse(&["--target", "192.0.2.1:25"]).unwrap_err();
        assert!(err.to_string().contains("--allow-remote"), "{err}");
        let c = parse(&["--target", "192.0.2.1:25", "--allow-remote"]).unwrap();
        assert!(!c.insecure);
        assert!(parse(&["--target", "nocolon"]).is_err());
    }

    #[test]
    fn bounds_and_modes() {
        let c = parse(&["--duration", "5"]).unwrap();
        assert_eq!(
            (c.sessions, c.duration),
            (None, Some(Duration::from_secs(5)))
        );
        let c = parse(&["--rate", "200"]).unwrap();
        assert_eq!(c.mode, Mode::Open { rate: 200.0 });
        assert_eq!(c.concurrency, DEFAULT_OPEN_LOOP_CAP);
        assert!(parse(&["--rate", "0"]).is_err());
        assert!(parse(&["--sessions", "0"]).is_err());
        assert!(parse(&["--duration", "0"]).is_err());
        assert!(parse(&["--duration", "-1"]).is_err());
        assert!(parse(&["--recipients", "0"]).is_err());
        assert!(parse(&["--concurrency", "0"]).is_err());
        assert_eq!(parse(&["-c", "1", "-w", "8"]).unwrap().workers, 1);
    }

    #[test]
    fn flags() {
        let c = parse(&[
            "--pipelining",
            "off",
            "--bdat",
            "--starttls",
            "--insecure",
            "--auth",
            "u:p:w",
            "--size",
            "1k:2k",
            "--helo",
            "h.example",
        ])
        .unwrap();
        assert!(!c.plan.pipelining && c.plan.bdat && c.plan.starttls && c.insecure);
        assert_eq!(c.plan.auth_command.unwrap(), b"AUTH PLAIN AHUAcDp3\r\n");
        assert_eq!(
            c.size,
            SizeSpec::Uniform {
                min: 1024,
                max: 2048
            }
        );
        let c = parse(&["--insecure", "off"]).unwrap();
        assert!(!c.insecure);
        assert!(parse(&["--auth", "nocolon"]).is_err());
        assert!(parse(&["--helo", "a b"]).is_err());
        assert!(parse(&["--mail-from", "x y@z"]).is_err());
    }
}
