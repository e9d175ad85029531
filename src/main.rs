//! `ringmta`: parse the flags, open the spool, start the shards, and wait
//! for a signal.

use std::ffi::OsString;
use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use tracing_subscriber::EnvFilter;

use ringmta::cli::{Cli, LogFormat, QueueAction, Subcommand};
use ringmta::config::Config;
use ringmta::config_file::{self, Effective, FileError};
use ringmta::logwriter;
use ringmta::server::{self, Shared};
use ringmta::spool::Spool;

fn main() -> ExitCode {
    let argv: Vec<OsString> = std::env::args_os().collect();
    let loaded = match config_file::load(&argv) {
        Ok(l) => l,
        Err(FileError::Clap(e)) => e.exit(),
        Err(e) => {
            eprintln!("ringmta: invalid configuration: {e}");
            return ExitCode::FAILURE;
        }
    };
    let cli = &loaded.cli;
    // Flushes the log lines still queued when main returns.
    let _log = match init_log(cli) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("ringmta: cannot start the log writer thread: {e}");
            return ExitCode::FAILURE;
        }
    };
    if cli.check_config {
        return check_config(&loaded);
    }
    let result = match &cli.command {
        Some(Subcommand::Queue {
            spool_dir,
            admin_addr,
            token_file,
            json,
            action,
        }) => match action {
            QueueAction::Count | QueueAction::List | QueueAction::Show { .. } => {
                queue(spool_dir, action)
            }
            _ => match admin_addr.0 {
                Some(addr) => queue_api(addr, token_file.as_deref(), *json, action),
                None => Err(anyhow::anyhow!(
                    "this verb talks to the admin API: give --admin ADDR (it is none)"
                )),
            },
        },
        Some(Subcommand::Passwd { user }) => passwd(user),
        Some(Subcommand::DkimKeygen {
            domain,
            selector,
            algorithm,
            bits,
            out,
        }) => dkim_keygen(domain, selector, *algorithm, *bits, out),
        None => serve(cli, Reload::new(argv, &loaded)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ringmta: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `--check-config`: the settings in force as TOML on stdout, once they
/// validate; what is wrong on stderr otherwise.
fn check_config(loaded: &config_file::Loaded) -> ExitCode {
    if let Err(e) = Config::from_cli(&loaded.cli) {
        eprintln!("ringmta: invalid configuration: {e}");
        return ExitCode::FAILURE;
    }
    let mut out = std::io::stdout().lock();
    let file = loaded
        .file
        .as_ref()
        .map_or_else(|| "none".to_owned(), |p| p.display().to_string());
    let _ = writeln!(out, "# ringmta --check-config: valid (config file: {file})");
    let _ = out.write_all(loaded.effective.to_toml().as_bytes());
    ExitCode::SUCCESS
}

/// Logs go to stderr through a writer thread ([`ringmta::logwriter`]), so
/// no shard ever blocks on a write to it or wakes it for every line; past
/// 16 MiB of waiting lines, new ones are dropped (mail before logs).
/// `--log-format json` writes one JSON object per line with the event's
/// fields at the top level.
fn init_log(cli: &Cli) -> std::io::Result<logwriter::Guard> {
    let (writer, guard) = logwriter::spawn(
        "ringmta-log",
        std::io::stderr(),
        logwriter::Options::default(),
    )?;
    let filter = EnvFilter::try_new(&cli.log).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match cli.log_format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init(),
    }
    Ok(guard)
}

fn serve(cli: &Cli, reload: Reload) -> anyhow::Result<()> {
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
    watch_signals(shared.clone(), reload).context("cannot install signal handlers")?;
    // Destinations suspended through the admin API, kept across restarts.
    let mut suspensions = ringmta::relay::control::Suspensions::load(spool.root())
        .context("cannot read the suspended destinations")?;
    let mut control = server::Control {
        suspended: suspensions
            .active(0)
            .iter()
            .map(|s| (s.key(), s.until))
            .collect(),
        ..server::Control::default()
    };
    // Bound before the shards start: a taken port is a startup error.
    let admin = match config.admin {
        Some(addr) => {
            let (senders, receivers) = ringmta::admin::api::channels(config.shards);
            control.receivers = receivers;
            let api = ringmta::admin::api::Api::new(
                senders.clone(),
                suspensions,
                shared.admin_token.clone(),
                shared.relay.clone(),
            );
            let mut router = api.routes(ringmta::admin::Router::standard());
            if config.inject_max_recipients > 0 {
                let injector = ringmta::admin::inject::Injector::new(
                    senders,
                    shared.admin_token.clone(),
                    shared.clone(),
                    config.inject_max_recipients,
                );
                router = injector.routes(router, config.session.max_message_size);
            }
            Some(ringmta::admin::start(addr, router)?)
        }
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
    server::run(&config, &spool, shared, control, |addrs| {
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

/// What a SIGHUP needs to read the settings again: the command line (the
/// environment is the process's own) and the settings now in force.
struct Reload {
    argv: Vec<OsString>,
    current: Effective,
    /// Whether there is a file to re-read at all.
    file: bool,
}

impl Reload {
    fn new(argv: Vec<OsString>, loaded: &config_file::Loaded) -> Reload {
        Reload {
            argv,
            current: loaded.effective.clone(),
            file: loaded.file.is_some(),
        }
    }

    /// Re-reads the flags, environment and file. If they do not load or
    /// validate, nothing changes. Otherwise the reloadable keys take their
    /// new values and a changed restart-only key is logged and kept.
    fn settings(&mut self, shared: &Shared) {
        if !self.file {
            return;
        }
        let new = match config_file::load(&self.argv) {
            Ok(new) => new,
            Err(e) => {
                let error = e.to_string();
                tracing::error!(error = %error.trim_end(), "SIGHUP: configuration NOT reloaded; keeping the old one");
                return;
            }
        };
        let mut changed = Vec::new();
        for key in self.current.changed(&new.effective) {
            if config_file::RELOADABLE.contains(&key) {
                changed.push(key.to_owned());
            } else {
                tracing::warn!(
                    key,
                    "SIGHUP: this key changed but needs a restart; keeping its old value"
                );
            }
        }
        let next = self.current.reloadable_from(&new.effective);
        let config = config_file::cli_from(&next)
            .map_err(anyhow::Error::from)
            .and_then(|cli| Ok(Config::from_cli(&cli)?))
            .and_then(|config| Ok(shared.apply(&config)?));
        match config {
            Ok(()) => {
                tracing::info!(changed = %changed.join(","), "SIGHUP: configuration reloaded");
                self.current = next;
            }
            Err(e) => tracing::error!(
                error = %format!("{e:#}").trim_end(),
                "SIGHUP: configuration NOT reloaded; keeping the old one"
            ),
        }
    }
}

/// SIGTERM/SIGINT: graceful stop (a second one exits at once). SIGHUP: read
/// the settings again (the `--config` file, see [`Reload::settings`]), then
/// reload the TLS certificate, the users file, the sender login map, the
/// DKIM keys and the local recipients (new connections, handshakes,
/// logins, messages and RCPTs see them; open sessions keep what they had).
fn watch_signals(shared: Arc<Shared>, mut reload: Reload) -> std::io::Result<()> {
    let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                match sig {
                    SIGHUP => {
                        reload.settings(&shared);
                        shared.reload();
                    }
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

/// The `ringmta queue` verbs that go through a running server's admin API.
fn queue_api(
    addr: std::net::SocketAddr,
    token_file: Option<&std::path::Path>,
    raw: bool,
    action: &QueueAction,
) -> anyhow::Result<()> {
    use serde_json::{json, Value};
    let token = match token_file {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .with_context(|| format!("cannot read {}", p.display()))?
                .lines()
                .next()
                .unwrap_or_default()
                .trim()
                .to_owned(),
        ),
        None => None,
    };
    let selector = |s: &ringmta::cli::SelectorArgs| {
        let mut v = serde_json::Map::new();
        for (k, x) in [
            ("id", &s.id),
            ("domain", &s.domain),
            ("destination", &s.destination),
        ] {
            if let Some(x) = x {
                v.insert(k.into(), Value::String(x.clone()));
            }
        }
        v
    };
    let (method, path, body): (&str, String, Option<Value>) = match action {
        QueueAction::Summary => ("GET", "/api/v1/queue".into(), None),
        QueueAction::Suspensions => ("GET", "/api/v1/suspensions".into(), None),
        QueueAction::Hold(s)
        | QueueAction::Release(s)
        | QueueAction::Flush(s)
        | QueueAction::Delete(s) => {
            let verb = match action {
                QueueAction::Hold(_) => "hold",
                QueueAction::Release(_) => "release",
                QueueAction::Flush(_) => "flush",
                _ => "delete",
            };
            (
                "POST",
                format!("/api/v1/queue/{verb}"),
                Some(Value::Object(selector(s))),
            )
        }
        QueueAction::Bounce {
            selector: s,
            reason,
        } => {
            let mut v = selector(s);
            v.insert("reason".into(), Value::String(reason.clone()));
            (
                "POST",
                "/api/v1/queue/bounce".into(),
                Some(Value::Object(v)),
            )
        }
        QueueAction::Suspend {
            destination,
            duration,
            reason,
            source,
        } => {
            let mut v =
                json!({ "destination": destination, "duration": duration, "reason": reason });
            if let Some(s) = source {
                v["source"] = json!(s);
            }
            ("POST", "/api/v1/suspend".into(), Some(v))
        }
        QueueAction::Resume {
            destination,
            source,
        } => {
            let mut v = json!({ "destination": destination });
            if let Some(s) = source {
                v["source"] = json!(s);
            }
            ("POST", "/api/v1/resume".into(), Some(v))
        }
        QueueAction::Count | QueueAction::List | QueueAction::Show { .. } => {
            anyhow::bail!("not an API verb")
        }
    };
    let body = body.map(|b| b.to_string().into_bytes());
    let (status, answer) =
        ringmta::admin::client::call(addr, token.as_deref(), method, &path, body.as_deref())
            .with_context(|| {
                format!("cannot reach the admin API at {addr} (is ringmta running? --admin ADDR)")
            })?;
    let v: Value = serde_json::from_slice(&answer).unwrap_or(Value::Null);
    let mut out = std::io::stdout().lock();
    if raw {
        out.write_all(&answer)?;
    }
    if !(200..300).contains(&status) {
        let why = v["error"].as_str().map_or_else(
            || String::from_utf8_lossy(&answer).trim().to_owned(),
            str::to_owned,
        );
        if status == 500 && v["failed"].is_number() {
            anyhow::bail!(
                "{}: {} messages could not be changed (see the server's log)",
                v["action"].as_str().unwrap_or("action"),
                v["failed"]
            );
        }
        anyhow::bail!("the admin API answered {status}: {why}");
    }
    if raw {
        return Ok(());
    }
    match action {
        QueueAction::Summary => {
            writeln!(
                out,
                "destination messages recipients held oldest_age suspended_until"
            )?;
            for d in v["destinations"].as_array().into_iter().flatten() {
                writeln!(
                    out,
                    "{} {} {} {} {}s {}",
                    d["destination"].as_str().unwrap_or(""),
                    d["messages"],
                    d["recipients"],
                    d["held"],
                    d["oldest_age"],
                    d["suspended_until"]
                        .as_u64()
                        .map_or("-".into(), |u| u.to_string()),
                )?;
            }
        }
        QueueAction::Suspensions => {
            for s in v["suspensions"].as_array().into_iter().flatten() {
                writeln!(
                    out,
                    "{}{} until {} {}",
                    s["destination"].as_str().unwrap_or(""),
                    s["source"]
                        .as_str()
                        .map_or(String::new(), |s| format!(" via {s}")),
                    s["until"],
                    s["reason"].as_str().unwrap_or("")
                )?;
            }
        }
        QueueAction::Suspend { .. } | QueueAction::Resume { .. } => {
            let via = v["source"]
                .as_str()
                .map_or(String::new(), |s| format!(" via {s}"));
            let what = v["destination"].as_str().unwrap_or("");
            match action {
                QueueAction::Suspend { .. } => {
                    writeln!(out, "suspended {what}{via} until {}", v["until"])?
                }
                _ => writeln!(out, "resumed {what}{via}")?,
            }
        }
        _ => writeln!(
            out,
            "{}: {} messages, {} recipients",
            v["action"].as_str().unwrap_or(""),
            v["messages"],
            v["recipients"]
        )?,
    }
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
        _ => anyhow::bail!("this verb talks to a running server (the admin API)"),
    }
    Ok(())
}
