//! `ringmta`: parse the flags, open the spool, start the shards, and wait
//! for a signal.

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use tracing_subscriber::EnvFilter;

use ringmta::cli::{Cli, QueueAction, Subcommand};
use ringmta::config::Config;
use ringmta::server::{self, Shared};
use ringmta::spool::Spool;

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_new(&cli.log).unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match &cli.command {
        Some(Subcommand::Queue { spool_dir, action }) => queue(spool_dir, action),
        Some(Subcommand::Passwd { user }) => passwd(user),
        Some(Subcommand::DkimKeygen {
            domain,
            selector,
            algorithm,
            bits,
            out,
        }) => dkim_keygen(domain, selector, *algorithm, *bits, out),
        None => serve(&cli),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ringmta: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(cli: &Cli) -> anyhow::Result<()> {
    let config = Config::from_cli(cli).context("invalid configuration")?;
    raise_fd_limit();
    let spool = Spool::open(&config.spool_dir)
        .with_context(|| format!("cannot open spool {}", config.spool_dir.display()))?;
    let rec = spool.recovered();
    tracing::info!(
        segments = rec.segments,
        messages = rec.messages,
        bytes = rec.bytes,
        torn = rec.torn,
        damaged = rec.damaged,
        "spool recovered"
    );
    if !config.spool.fsync {
        tracing::warn!("--fsync off: acknowledged mail is NOT durable; for benchmarks only");
        eprintln!(
            "ringmta: WARNING: --fsync off: a crash can lose acknowledged mail (benchmarks only)"
        );
    }
    let shared = Shared::new(&config)?;
    if !(config.submission.is_empty() && config.smtps.is_empty()) && shared.auth.user_count() == 0 {
        tracing::warn!("submission is listening but no --users are configured: every AUTH fails");
    }
    if let Some(given) = config.message_size_lowered_from {
        tracing::warn!(
            max_message_size = given,
            lowered_to = config.session.max_message_size,
            per_client = config.inflight.per_client,
            shards = config.shards,
            "--max-message-size lowered to what one client may hold on a shard \
             (--max-inflight-bytes / shards / 2); raise --max-inflight-bytes to take larger messages"
        );
    }
    watch_signals(shared.clone()).context("cannot install signal handlers")?;
    // Bound before the shards start: a taken port is a startup error.
    let admin = match config.admin {
        Some(addr) => Some(ringmta::admin::start(
            addr,
            ringmta::admin::Router::standard(),
        )?),
        None => None,
    };
    tracing::info!(
        shards = config.shards,
        pin = config.pin,
        spool = %config.spool_dir.display(),
        hostname = %config.session.hostname,
        inflight_per_shard = config.inflight.per_shard,
        inflight_per_client = config.inflight.per_client,
        "starting"
    );
    server::run(&config, &spool, shared, |addrs| {
        // One machine-readable line on stdout per listener: tests and
        // scripts that bind port 0 read the real port from it.
        let mut out = std::io::stdout().lock();
        for (kind, a) in addrs {
            let _ = writeln!(out, "ringmta listening {} {a}", kind.name());
            tracing::info!(addr = %a, kind = kind.name(), "listening");
        }
        // Last, so the first line stays the SMTP listener's.
        if let Some(a) = admin {
            let _ = writeln!(out, "ringmta listening admin {a}");
            tracing::info!(addr = %a, kind = "admin", "listening");
        }
        let _ = out.flush();
    })?;
    tracing::info!("stopped");
    Ok(())
}

/// SIGTERM/SIGINT: graceful stop (a second one exits at once). SIGHUP: reload
/// the TLS certificate, the users file, the sender login map, the DKIM keys
/// and the local recipients (new handshakes, logins, messages and RCPTs see
/// them; open sessions are not otherwise touched).
fn watch_signals(shared: Arc<Shared>) -> std::io::Result<()> {
    let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                match sig {
                    SIGHUP => shared.reload(),
                    _ if shared.stop_requested() => {
                        eprintln!("ringmta: second stop signal, exiting now");
                        std::process::exit(1);
                    }
                    _ => {
                        tracing::info!(signal = sig, "stop requested: draining sessions");
                        shared.request_stop();
                    }
                }
            }
        })?;
    Ok(())
}

/// Each connection is a descriptor: lift the soft limit to the hard one, as
/// servers commonly do (the hard limit is the administrator's to set).
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on a stack struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                tracing::warn!("could not raise the open-file limit");
            }
        }
    }
}

/// `ringmta passwd USER`: the password is the first line of standard input
/// (so it never appears in a process list or shell history).
fn passwd(user: &str) -> anyhow::Result<()> {
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .context("cannot read the password from standard input")?;
    let password = line.strip_suffix('\n').unwrap_or(&line);
    let password = password.strip_suffix('\r').unwrap_or(password);
    if password.is_empty() {
        anyhow::bail!("empty password (give it on standard input)");
    }
    let entry = ringmta::server::users::passwd_line(user, password)?;
    writeln!(std::io::stdout().lock(), "{entry}")?;
    Ok(())
}

/// `ringmta dkim-keygen`: writes the private key (0600, never over an
/// existing file) and prints the DNS record to publish.
fn dkim_keygen(
    domain: &str,
    selector: &str,
    algorithm: ringmta::server::dkim::KeyAlgorithm,
    bits: usize,
    out: &std::path::Path,
) -> anyhow::Result<()> {
    use ringmta::server::dkim;
    let spec = dkim::KeySpec::new(domain, selector, out).map_err(anyhow::Error::msg)?;
    let key = dkim::generate(algorithm, bits)?;
    dkim::write_private_key(&spec.path, &key.private_pem)?;
    writeln!(
        std::io::stdout().lock(),
        "{}",
        key.dns_record(&spec.domain, &spec.selector)
    )?;
    eprintln!(
        "ringmta: wrote {}; publish the record above, then run with --dkim-key {}:{}:{}",
        spec.path.display(),
        spec.domain,
        spec.selector,
        spec.path.display()
    );
    Ok(())
}

fn queue(spool_dir: &std::path::Path, action: &QueueAction) -> anyhow::Result<()> {
    let msgs = ringmta::spool::read_queue(spool_dir)
        .with_context(|| format!("cannot read spool {}", spool_dir.display()))?;
    let mut out = std::io::stdout().lock();
    match action {
        QueueAction::Count => {
            let bytes: usize = msgs.iter().map(|m| m.message.len()).sum();
            writeln!(out, "{} messages, {} bytes", msgs.len(), bytes)?;
        }
        QueueAction::List => {
            for m in &msgs {
                let Some(env) = m.decoded() else { continue };
                writeln!(
                    out,
                    "{} {} <{}> {}",
                    env.id,
                    m.message.len(),
                    env.mail_from.unwrap_or(""),
                    env.rcpts.join(" ")
                )?;
            }
        }
        QueueAction::Show { id } => {
            let m = msgs
                .iter()
                .find(|m| m.decoded().is_some_and(|e| e.id == id))
                .with_context(|| format!("no queued message {id}"))?;
            out.write_all(m.envelope.as_bytes())?;
            out.write_all(b"\r\n")?;
            out.write_all(&m.message)?;
        }
    }
    Ok(())
}
