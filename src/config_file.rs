//! The `--config FILE` TOML file, merged under the flags and the
//! environment: for each setting the command line wins, then its
//! `RINGMTA_*` variable, then the file, then the default. The file's keys
//! are the long flag names; every value goes through the flag's own clap
//! parser, so a file can say nothing a flag cannot.
//!
//! This module only reads and merges; it never opens the spool, binds or
//! reads the files a setting names. What a changed key does on SIGHUP is
//! [`crate::server::Shared::apply`]'s; which keys it may change is
//! [`RELOADABLE`].

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{ArgAction, ArgMatches, CommandFactory, FromArgMatches};
use thiserror::Error;

use crate::cli::Cli;

/// Flags that steer the reading itself, not the server: never file keys.
pub const META_FLAGS: &[&str] = &["config", "check-config", "help", "version"];

/// The keys a SIGHUP applies (see the README's "Configuration file"
/// section); a change to any other key is logged and waits for a restart.
pub const RELOADABLE: &[&str] = &[
    // The session policy, taken by every new connection.
    "relay-network",
    "local-domain",
    "route",
    "max-message-size",
    "max-recipients",
    "max-errors",
    "command-timeout",
    "data-timeout",
    "max-data-time",
    "bare-newline",
    "allow-plaintext-auth-on-loopback",
    "add-sender-header",
    "dkim-from-mismatch",
    "dkim-relay-network",
    "max-conns-per-shard",
    // Inbound verification, taken by every new message (SPF at MAIL FROM:
    // by every new connection).
    "inbound-auth",
    "authserv-id",
    "spf-policy",
    "dmarc-reject",
    "domain-auth",
    "quarantine-header",
    // Delivery, taken by the next attempt.
    "relay-host",
    "outbound-port",
    "connect-timeout",
    "relay-timeout",
    "relay-banner-timeout",
    "relay-data-timeout",
    "relay-final-timeout",
    "retry-schedule",
    "max-queue-age",
    "delay-warning",
    "bounce-size-limit",
    "max-conns-per-dest",
    "maildir-concurrency",
    "shaping",
    "bounce-rules",
    "max-hops",
    "tls-policy",
    "dane",
    // Listeners' limits, for the connections that follow.
    "max-conns-per-ip",
    "max-connections-per-minute",
    "max-messages-per-minute",
    "max-recipients-per-minute",
    "max-messages-per-user-per-minute",
    // The relay/MX port's screen and DNS lists, for the connections that
    // follow.
    "greet-pause",
    "screen-protocol",
    "screen-ttl",
    "dnsbl",
    "dnsbl-threshold",
    "dnswl",
    "dnsbl-timeout",
    // The admin API's bearer token (the file is read again).
    "admin-token-file",
    // The files themselves are re-read on every SIGHUP; these name them.
    "dkim-key",
    "tls-cert",
    "tls-key",
    "tls-handshake-timeout",
    "users",
    "sender-login-map",
    "auth-failure-delay",
];

/// The largest file read (a configuration, not a data set).
const MAX_FILE_SIZE: u64 = 1 << 20;

#[derive(Debug, Error)]
pub enum FileError {
    /// From the command line or the environment (help and version too).
    #[error(transparent)]
    Clap(#[from] clap::Error),
    #[error("cannot read {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("{0}: larger than {MAX_FILE_SIZE} bytes")]
    TooLarge(PathBuf),
    #[error("{0}: not valid TOML: {1}")]
    Syntax(PathBuf, String),
    #[error("{path}: unknown key {key:?}{}", suggestion.as_ref().map(|s| format!(" (did you mean {s:?}?)")).unwrap_or_default())]
    UnknownKey {
        path: PathBuf,
        key: String,
        suggestion: Option<String>,
    },
    #[error("{path}: key {key:?}: {reason}")]
    Value {
        path: PathBuf,
        key: String,
        reason: String,
    },
}

/// The merged settings: the typed flags and, per key, the values in force
/// as text and where they came from.
#[derive(Debug)]
pub struct Loaded {
    pub cli: Cli,
    pub file: Option<PathBuf>,
    pub effective: Effective,
}

/// Per long flag name (meta flags left out): its values as text, in the
/// form a file or a flag takes them, and their source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Effective(pub BTreeMap<String, Setting>);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    pub values: Vec<String>,
    pub source: Source,
    /// A flag without a value (a boolean).
    pub switch: bool,
    /// A repeatable flag (a TOML array).
    pub list: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Flag,
    Env,
    File,
    Default,
    Unset,
}

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Source::Flag => "flag",
            Source::Env => "environment",
            Source::File => "file",
            Source::Default => "default",
            Source::Unset => "unset",
        }
    }
}

/// Parses `argv` (with the environment) and, when `--config` names a file,
/// fills every setting neither gave from it.
pub fn load<I, T>(argv: I) -> Result<Loaded, FileError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let argv: Vec<OsString> = argv.into_iter().map(Into::into).collect();
    let cmd = Cli::command();
    let first = cmd.clone().try_get_matches_from(&argv)?;
    let path = match (first.subcommand_name(), first.get_one::<PathBuf>("config")) {
        (None, Some(p)) => p.clone(),
        // Subcommands take nothing from the file.
        _ => {
            let cli = Cli::from_arg_matches(&first)?;
            let effective = effective(&cmd, &first, &[]);
            return Ok(Loaded {
                cli,
                file: None,
                effective,
            });
        }
    };
    let table = read_table(&path)?;
    let mut extra: Vec<OsString> = Vec::new();
    let mut from_file = Vec::new();
    for (key, value) in &table {
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(key.as_str()) && !META_FLAGS.contains(&key.as_str()))
            .ok_or_else(|| FileError::UnknownKey {
                path: path.clone(),
                key: key.clone(),
                suggestion: suggest(&cmd, key),
            })?;
        let bad = |reason: String| FileError::Value {
            path: path.clone(),
            key: key.clone(),
            reason,
        };
        let values = file_values(arg, value).map_err(bad)?;
        if !is_switch(arg) {
            check_values(arg, key, &values).map_err(bad)?;
        }
        let id = arg.get_id().as_str();
        if matches!(
            first.value_source(id),
            None | Some(ValueSource::DefaultValue)
        ) {
            from_file.push(key.clone());
            if is_switch(arg) {
                if values.iter().any(|v| v == "true") {
                    extra.push(format!("--{key}").into());
                }
            } else {
                extra.extend(values.iter().map(|v| format!("--{key}={v}").into()));
            }
        }
    }
    let mut merged_argv = argv;
    merged_argv.extend(extra);
    let merged = cmd.clone().try_get_matches_from(&merged_argv)?;
    let cli = Cli::from_arg_matches(&merged)?;
    let effective = effective(&cmd, &merged, &from_file);
    Ok(Loaded {
        cli,
        file: Some(path),
        effective,
    })
}

/// A `Cli` from `settings` alone (every key as a flag), as [`load`] would
/// have made it; how a reload keeps the restart-only keys as they were.
pub fn cli_from(settings: &Effective) -> Result<Cli, clap::Error> {
    let mut argv: Vec<OsString> = vec!["ringmta".into()];
    for (key, s) in &settings.0 {
        if s.switch {
            if s.values.iter().any(|v| v == "true") {
                argv.push(format!("--{key}").into());
            }
        } else {
            argv.extend(s.values.iter().map(|v| format!("--{key}={v}").into()));
        }
    }
    let matches = Cli::command().try_get_matches_from(argv)?;
    Cli::from_arg_matches(&matches)
}

impl Effective {
    /// The keys whose values differ between `self` and `new`.
    pub fn changed<'a>(&'a self, new: &'a Effective) -> impl Iterator<Item = &'a str> + 'a {
        self.0
            .iter()
            .filter(move |(k, s)| new.0.get(*k).map(|n| &n.values) != Some(&s.values))
            .map(|(k, _)| k.as_str())
    }

    /// `new`'s values for the reloadable keys, `self`'s for the others.
    pub fn reloadable_from(&self, new: &Effective) -> Effective {
        let mut out = self.clone();
        for key in RELOADABLE {
            if let Some(s) = new.0.get(*key) {
                out.0.insert((*key).to_owned(), s.clone());
            }
        }
        out
    }

    /// The settings as a TOML file, each with where it came from; one that
    /// was not set is a comment. The output loads back as a `--config`.
    pub fn to_toml(&self) -> String {
        let mut out = String::new();
        for (key, s) in &self.0 {
            let line = if s.source == Source::Unset || (s.values.is_empty() && !s.list) {
                format!("# {key} =")
            } else if s.switch {
                let on = s.values.iter().any(|v| v == "true");
                format!("{key} = {on}")
            } else if s.list {
                let items: Vec<String> = s.values.iter().map(|v| toml_scalar(v)).collect();
                format!("{key} = [{}]", items.join(", "))
            } else {
                format!("{key} = {}", toml_scalar(&s.values[0]))
            };
            out.push_str(&format!("{line:<60} # {}\n", s.source.name()));
        }
        out
    }
}

fn read_table(path: &Path) -> Result<toml::Table, FileError> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| FileError::Read(path.to_owned(), e))?;
    let mut text = String::new();
    file.take(MAX_FILE_SIZE + 1)
        .read_to_string(&mut text)
        .map_err(|e| FileError::Read(path.to_owned(), e))?;
    if text.len() as u64 > MAX_FILE_SIZE {
        return Err(FileError::TooLarge(path.to_owned()));
    }
    text.parse::<toml::Table>()
        .map_err(|e| FileError::Syntax(path.to_owned(), e.to_string().trim_end().to_owned()))
}

/// The value as the flag's text values: booleans for switches, arrays (or
/// one value) for repeatable flags, one scalar otherwise.
fn file_values(arg: &clap::Arg, value: &toml::Value) -> Result<Vec<String>, String> {
    if is_switch(arg) {
        return match value {
            toml::Value::Boolean(b) => Ok(vec![b.to_string()]),
            other => Err(format!("expected true or false, not {}", other.type_str())),
        };
    }
    let list = matches!(arg.get_action(), ArgAction::Append);
    match value {
        toml::Value::Array(items) if list => items.iter().map(scalar).collect(),
        toml::Value::Array(_) => Err("takes one value, not an array".into()),
        other => scalar(other).map(|v| vec![v]),
    }
}

fn scalar(value: &toml::Value) -> Result<String, String> {
    match value {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(n) => Ok(n.to_string()),
        toml::Value::Float(f) => Ok(f.to_string()),
        other => Err(format!(
            "expected a string or a number, not {}",
            other.type_str()
        )),
    }
}

/// Runs `values` through the flag's own parser alone (so that a flag it
/// requires is not asked for), for an error that names the file's key.
fn check_values(arg: &clap::Arg, key: &str, values: &[String]) -> Result<(), String> {
    let mut one = clap::Arg::new("value")
        .long(key.to_owned())
        .action(ArgAction::Append)
        .value_parser(arg.get_value_parser().clone());
    if let Some(names) = arg.get_value_names() {
        one = one.value_names(names.iter().cloned());
    }
    if let Some(d) = arg.get_value_delimiter() {
        one = one.value_delimiter(d);
    }
    let argv = std::iter::once(OsString::from("check")).chain(
        values
            .iter()
            .map(|v| OsString::from(format!("--{key}={v}"))),
    );
    clap::Command::new("check")
        .arg(one)
        .try_get_matches_from(argv)
        .map(drop)
        .map_err(|e| clap_reason(&e))
}

fn is_switch(arg: &clap::Arg) -> bool {
    matches!(arg.get_action(), ArgAction::SetTrue)
}

/// A number stays a number, anything else is a quoted string.
fn toml_scalar(v: &str) -> String {
    if v.parse::<i64>().is_ok() || (v.parse::<f64>().is_ok_and(f64::is_finite) && v.contains('.')) {
        v.to_owned()
    } else {
        toml::Value::String(v.to_owned()).to_string()
    }
}

fn effective(cmd: &clap::Command, m: &ArgMatches, from_file: &[String]) -> Effective {
    let mut out = BTreeMap::new();
    for arg in cmd.get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        if META_FLAGS.contains(&long) {
            continue;
        }
        let id = arg.get_id().as_str();
        let values: Vec<String> = m
            .get_raw(id)
            .map(|vs| vs.map(|v| v.to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        let source = match m.value_source(id) {
            _ if from_file.iter().any(|k| k == long) => Source::File,
            Some(ValueSource::CommandLine) => Source::Flag,
            Some(ValueSource::EnvVariable) => Source::Env,
            Some(ValueSource::DefaultValue) => Source::Default,
            _ => Source::Unset,
        };
        out.insert(
            long.to_owned(),
            Setting {
                values,
                source,
                switch: is_switch(arg),
                list: matches!(arg.get_action(), ArgAction::Append),
            },
        );
    }
    Effective(out)
}

/// clap's message without its "error: " prefix and usage lines.
fn clap_reason(e: &clap::Error) -> String {
    let text = e.to_string();
    let first = text.lines().next().unwrap_or_default();
    first.strip_prefix("error: ").unwrap_or(first).to_owned()
}

/// The closest key, when it is close (a typo, not another word).
fn suggest(cmd: &clap::Command, key: &str) -> Option<String> {
    cmd.get_arguments()
        .filter_map(|a| a.get_long())
        .filter(|l| !META_FLAGS.contains(l))
        .map(|l| (edit_distance(key, l), l))
        .filter(|(d, l)| *d <= 2.max(l.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, l)| l.to_owned())
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        f
    }

    fn load_with(text: &str, args: &[&str]) -> Result<Loaded, FileError> {
        let f = write(text);
        let mut argv = vec!["ringmta", "--config", f.path().to_str().unwrap()];
        argv.extend_from_slice(args);
        load(argv)
    }

    #[test]
    fn file_fills_what_flags_do_not_give() {
        let l = load_with(
            "max-recipients = 7\nrelay-network = [\"10.0.0.0/8\", \"192.0.2.0/24\"]\npin = true\ncommit-window = \"5ms\"\n",
            &["--max-recipients", "9"],
        )
        .unwrap();
        assert_eq!(l.cli.max_recipients, 9, "the flag wins");
        assert_eq!(l.cli.relay_networks.len(), 2);
        assert!(l.cli.pin);
        assert_eq!(l.cli.commit_window, std::time::Duration::from_millis(5));
        assert_eq!(l.effective.0["max-recipients"].source, Source::Flag);
        assert_eq!(l.effective.0["pin"].source, Source::File);
        assert_eq!(l.effective.0["max-hops"].source, Source::Default);
    }

    #[test]
    fn unknown_key_is_named_with_a_suggestion() {
        let e = load_with("max-recipient = 7\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"max-recipient\""), "{e}");
        assert!(e.contains("did you mean \"max-recipients\""), "{e}");
        let e = load_with("config = \"x\"\n", &[]).unwrap_err().to_string();
        assert!(e.contains("unknown key \"config\""), "{e}");
        let e = load_with("zzzzzz = 1\n", &[]).unwrap_err().to_string();
        assert!(!e.contains("did you mean"), "{e}");
    }

    #[test]
    fn bad_values_name_the_key() {
        for (text, want) in [
            ("max-message-size = \"lots\"\n", "max-message-size"),
            ("pin = \"yes\"\n", "expected true or false"),
            ("hostname = [\"a\", \"b\"]\n", "not an array"),
            ("tls-policy = \"sometimes\"\n", "tls-policy"),
            ("max-hops = {a = 1}\n", "max-hops"),
            ("max-hops = \n", "not valid TOML"),
        ] {
            let e = load_with(text, &[]).unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn printed_settings_load_back_the_same() {
        let l = load_with(
            "route = [\"example.com=smtp:127.0.0.1:25\"]\nhostname = \"mx.test\"\ncompact-below = 0.5\nno-delivery = true\n",
            &[],
        )
        .unwrap();
        let again = load_with(&l.effective.to_toml(), &[]).unwrap();
        let values = |e: &Effective| {
            e.0.iter()
                .map(|(k, s)| (k.clone(), s.values.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(values(&l.effective), values(&again.effective));
        let via_flags = cli_from(&l.effective).unwrap();
        let mut cli = l.cli;
        cli.config = None;
        assert_eq!(format!("{via_flags:?}"), format!("{cli:?}"));
    }

    #[test]
    fn edit_distances() {
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "ab"), 2);
        assert_eq!(edit_distance("ab", "ab"), 0);
    }
}
