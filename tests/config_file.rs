//! The `--config` TOML file against the real binary: every flag is a key
//! (the test walks clap's own list of arguments), precedence flag >
//! environment > file > default, unknown keys named, the example file in
//! `deploy/` valid, and SIGHUP under load from Postfix's smtp-source: a
//! reloadable key takes effect for new sessions, open sessions keep theirs,
//! a restart-only key is kept and logged, a bad file keeps the old
//! configuration, and no session is dropped.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use clap::CommandFactory;

use common::{peer_program, run_peer, Client, Server, IO_TIMEOUT};
use ringmta::cli::Cli;
use ringmta::config_file::META_FLAGS;

/// A value for each key, each different from the default, all valid
/// together. A new flag without a line here fails
/// `every_flag_is_a_config_key`: add one.
const SAMPLES: &[(&str, &str)] = &[
    ("max-connections-per-minute", "30"),
    ("max-messages-per-minute", "60"),
    ("max-recipients-per-minute", "600"),
    ("max-messages-per-user-per-minute", "120"),
    ("greet-pause", r#""3s""#),
    ("screen-protocol", "true"),
    ("screen-ttl", r#""2h""#),
    ("dnsbl", r#"["zen.spamhaus.org=2", "bl.spamcop.net"]"#),
    ("dnsbl-threshold", "2"),
    ("dnswl", r#"["list.dnswl.org"]"#),
    ("dnsbl-timeout", r#""3s""#),
    ("smtp", r#"["127.0.0.1:2626", "127.0.0.2:2626"]"#),
    ("submission", r#"["none"]"#),
    ("smtps", r#"["127.0.0.1:2466"]"#),
    ("tls-cert", r#""/etc/ringmta/cert.pem""#),
    ("tls-key", r#""/etc/ringmta/key.pem""#),
    ("tls-handshake-timeout", r#""45s""#),
    ("users", r#""/etc/ringmta/users""#),
    ("sender-login-map", r#""/etc/ringmta/senders""#),
    ("allow-plaintext-auth-on-loopback", "true"),
    ("auth-failure-delay", r#""2s""#),
    ("max-auth-failures", "11"),
    ("auth-failure-window", r#""20m""#),
    ("max-auth-checks-per-ip", "3"),
    ("auth-threads", "3"),
    ("dkim-threads", "3"),
    ("maildir-threads", "3"),
    ("dkim-from-mismatch", r#""unsigned""#),
    ("dkim-relay-network", r#""on""#),
    ("inject-max-recipients", "20000"),
    ("add-sender-header", "true"),
    (
        "dkim-key",
        r#"["example.org:s1:/etc/ringmta/s1.pem", "example.org:s2:/etc/ringmta/s2.pem"]"#,
    ),
    ("hostname", r#""mx.example.org""#),
    ("spool-dir", r#""/var/spool/ringmta""#),
    ("local-domain", r#"["example.org", "example.net"]"#),
    ("local-recipients", r#""/etc/ringmta/recipients""#),
    ("max-message-size", r#""20M""#),
    ("max-recipients", "77"),
    ("commit-window", r#""2ms""#),
    ("delivery-cache", r#""8M""#),
    ("fsync", r#""off""#),
    ("compact-below", "0.5"),
    ("max-segment-size", r#""32M""#),
    ("shards", "3"),
    ("pin", "true"),
    ("io-memory", r#""1M""#),
    ("ring-depth", "512"),
    ("backlog", "256"),
    ("command-timeout", r#""4m""#),
    ("data-timeout", r#""2m""#),
    ("max-data-time", r#""9m""#),
    ("max-inflight-bytes", r#""300M""#),
    ("max-conns-per-shard", "1000"),
    ("max-conns-per-ip", "50"),
    ("max-errors", "5"),
    ("bare-newline", r#""reject""#),
    ("shutdown-grace", r#""10s""#),
    ("no-delivery", "true"),
    ("relay-network", r#"["10.0.0.0/8", "2001:db8::/32"]"#),
    (
        "route",
        r#"["example.com=smtp:127.0.0.1:2525", "*.example.net=maildir:/var/mail"]"#,
    ),
    ("relay-host", r#""smarthost.example.org:587""#),
    ("dns-server", r#""127.0.0.53:53""#),
    ("inbound-auth", r#""off""#),
    ("authserv-id", r#""mx.example.org""#),
    ("spf-policy", r#""reject""#),
    ("dmarc-reject", "true"),
    ("domain-auth", r#"["example.org:spf=reject:dmarc=mark"]"#),
    ("quarantine-header", r#""X-Quarantine""#),
    ("dns-timeout", r#""3s""#),
    ("outbound-port", "2525"),
    ("maildir", r#""/var/lib/ringmta/maildir""#),
    ("max-conns-per-dest", "4"),
    ("maildir-concurrency", "8"),
    ("shaping", r#""deploy/shaping.toml""#),
    ("bounce-rules", r#""deploy/bounce-rules.toml""#),
    ("retry-schedule", r#""2m,10m,1h""#),
    ("max-queue-age", r#""3d""#),
    ("delay-warning", r#""4h""#),
    ("bounce-size-limit", r#""100K""#),
    ("max-hops", "30"),
    ("tls-policy", r#""require""#),
    ("tls-verify", r#""on""#),
    ("dane", r#""on""#),
    ("mta-sts", r#""off""#),
    ("mta-sts-port", "8443"),
    // From Debian's ca-certificates (.ci/run installs it): the file is read at start.
    ("tls-ca-file", r#""/etc/ssl/certs/ca-certificates.crt""#),
    ("handoff-capacity", "256"),
    ("connect-timeout", r#""20s""#),
    ("relay-timeout", r#""4m""#),
    ("relay-banner-timeout", r#""4m""#),
    ("relay-data-timeout", r#""2m""#),
    ("relay-final-timeout", r#""8m""#),
    ("log", r#""ringmta=debug""#),
    ("log-format", r#""json""#),
    ("admin", r#""127.0.0.1:9999""#),
    ("admin-token-file", r#""/etc/ringmta/admin-token""#),
    ("proxy-protocol-from", r#"["10.0.0.0/8"]"#),
    ("proxy-protocol-timeout", r#""3s""#),
];

/// Every long flag of the server (not of subcommands), as clap knows them.
fn server_flags() -> Vec<String> {
    Cli::command()
        .get_arguments()
        .filter_map(|a| a.get_long())
        .filter(|l| !META_FLAGS.contains(l))
        .map(str::to_owned)
        .collect()
}

/// Runs `ringmta ARGS` with only `envs` among the `RINGMTA_*` variables,
/// killed after a bound.
fn ringmta(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ringmta"));
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("RINGMTA_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(envs.iter().copied());
    let mut child = cmd.spawn().expect("spawn ringmta");
    let deadline = Instant::now() + IO_TIMEOUT;
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("ringmta {args:?} did not finish within {IO_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().expect("output")
}

/// `--check-config`: each key's values (as text) and source.
fn check_config(args: &[&str], envs: &[(&str, &str)]) -> BTreeMap<String, (Vec<String>, String)> {
    let mut argv = vec!["--check-config"];
    argv.extend_from_slice(args);
    let out = ringmta(&argv, envs);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "--check-config {args:?} failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The output is itself TOML; the comment after each line is its source.
    let table: toml::Table = stdout.parse().expect("--check-config prints TOML");
    let mut settings = BTreeMap::new();
    for line in stdout.lines().skip(1) {
        let source = line.rsplit_once("# ").expect("# source").1.trim();
        // A setting without a value is a comment: `# key =`.
        let (key, values) = match line.strip_prefix("# ") {
            Some(unset) => (unset.split_once(" =").expect("# key =").0, Vec::new()),
            None => {
                let key = line.split_once(" = ").expect("key = value").0;
                (key, texts(&table[key]))
            }
        };
        settings.insert(key.to_owned(), (values, source.to_owned()));
    }
    settings
}

/// A TOML value as the flag's text values.
fn texts(v: &toml::Value) -> Vec<String> {
    match v {
        toml::Value::String(s) => vec![s.clone()],
        toml::Value::Array(a) => a.iter().flat_map(texts).collect(),
        other => vec![other.to_string()],
    }
}

fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("ringmta.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

#[test]
fn every_flag_is_a_config_key() {
    let flags = server_flags();
    assert!(flags.len() > 50, "clap lists only {} flags?", flags.len());
    let samples: BTreeMap<&str, &str> = SAMPLES.iter().copied().collect();
    let missing: Vec<_> = flags
        .iter()
        .filter(|f| !samples.contains_key(f.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "flags without a sample value in SAMPLES: {missing:?}"
    );
    let stale: Vec<_> = samples
        .keys()
        .filter(|k| !flags.iter().any(|f| f == *k))
        .collect();
    assert!(stale.is_empty(), "SAMPLES for no flag: {stale:?}");

    let dir = tempfile::tempdir().unwrap();
    let text: String = SAMPLES
        .iter()
        .map(|(k, v)| format!("{k} = {v}\n"))
        .collect();
    let file = write_config(dir.path(), &text);
    let defaults = check_config(&[], &[]);
    let got = check_config(&["--config", file.to_str().unwrap()], &[]);
    for (key, sample) in SAMPLES {
        let want = texts(&format!("v = {sample}").parse::<toml::Table>().unwrap()["v"]);
        let (values, source) = got
            .get(*key)
            .unwrap_or_else(|| panic!("--check-config does not show {key}"));
        assert_eq!(values, &want, "{key}");
        assert_eq!(source, "file", "{key}");
        assert_ne!(
            defaults.get(*key).map(|d| &d.0),
            Some(&want),
            "{key}: the sample is the default, so it proves nothing"
        );
    }
}

#[test]
fn precedence_is_flag_then_environment_then_file_then_default() {
    let dir = tempfile::tempdir().unwrap();
    let file = write_config(
        dir.path(),
        "max-recipients = 7\npin = true\nrelay-network = [\"10.0.0.0/8\", \"192.0.2.0/24\"]\n",
    );
    let file = file.to_str().unwrap();
    let with_file = ["--config", file];
    let with_flags = [
        "--config",
        file,
        "--max-recipients",
        "9",
        "--relay-network",
        "198.51.100.0/24",
    ];
    let env = [
        ("RINGMTA_MAX_RECIPIENTS", "8"),
        ("RINGMTA_PIN", "false"),
        ("RINGMTA_RELAY_NETWORK", "203.0.113.0/24,2001:db8::/32"),
    ];
    let value = |s: &BTreeMap<String, (Vec<String>, String)>, k: &str| {
        let (v, src) = &s[k];
        (v.join(","), src.clone())
    };
    let pair = |v: &str, s: &str| (v.to_owned(), s.to_owned());

    let s = check_config(&[], &[]);
    assert_eq!(value(&s, "max-recipients"), pair("1000", "default"));
    assert_eq!(value(&s, "pin"), pair("false", "default"));
    assert_eq!(value(&s, "relay-network"), pair("", "unset"));

    let s = check_config(&with_file, &[]);
    assert_eq!(value(&s, "max-recipients"), pair("7", "file"));
    assert_eq!(value(&s, "pin"), pair("true", "file"));
    assert_eq!(
        value(&s, "relay-network"),
        pair("10.0.0.0/8,192.0.2.0/24", "file")
    );

    let s = check_config(&with_file, &env);
    assert_eq!(value(&s, "max-recipients"), pair("8", "environment"));
    assert_eq!(value(&s, "pin"), pair("false", "environment"));
    assert_eq!(
        value(&s, "relay-network"),
        pair("203.0.113.0/24,2001:db8::/32", "environment")
    );
    // The file is named by the environment too.
    let s = check_config(&[], &[("RINGMTA_CONFIG", file)]);
    assert_eq!(value(&s, "max-recipients"), pair("7", "file"));

    let s = check_config(&with_flags, &env);
    assert_eq!(value(&s, "max-recipients"), pair("9", "flag"));
    assert_eq!(value(&s, "relay-network"), pair("198.51.100.0/24", "flag"));
    assert_eq!(value(&s, "pin"), pair("false", "environment"));
    assert_eq!(value(&s, "max-hops"), pair("50", "default"));

    // And the server runs on it: the file's limit, under the flag's.
    let server = Server::builder().args(with_file).start();
    let mut c = server.connect();
    c.hello("client.example");
    c.expect("MAIL FROM:<a@example.org>", 250);
    for i in 0..7 {
        c.expect(&format!("RCPT TO:<r{i}@localhost>"), 250);
    }
    c.expect("RCPT TO:<r7@localhost>", 452);
    drop(c);
    let server = Server::builder()
        .args(with_file)
        .args(["--max-recipients", "2"])
        .env("RINGMTA_MAX_RECIPIENTS", "5")
        .start();
    let mut c = server.connect();
    c.hello("client.example");
    c.expect("MAIL FROM:<a@example.org>", 250);
    c.expect("RCPT TO:<r0@localhost>", 250);
    c.expect("RCPT TO:<r1@localhost>", 250);
    c.expect("RCPT TO:<r2@localhost>", 452);
}

#[test]
fn unknown_key_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = write_config(dir.path(), "max-recipients = 7\nmax-recipent = 8\n");
    let file = file.to_str().unwrap();
    for args in [
        &["--check-config", "--config", file][..],
        &["--config", file, "--smtp", "127.0.0.1:0"],
    ] {
        let out = ringmta(args, &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains("unknown key \"max-recipent\"")
                && stderr.contains("did you mean \"max-recipients\""),
            "{args:?}: {stderr}"
        );
        assert!(out.stdout.is_empty(), "{args:?}: started anyway");
    }
    // A meta flag is not a key either; nor is a wrong type accepted.
    for (text, needle) in [
        ("config = \"/x\"\n", "unknown key \"config\""),
        ("pin = \"yes\"\n", "key \"pin\": expected true or false"),
        ("max-recipients = \"many\"\n", "key \"max-recipients\""),
        ("max-recipients = \n", "not valid TOML"),
    ] {
        let file = write_config(dir.path(), text);
        let out = ringmta(&["--check-config", "--config", file.to_str().unwrap()], &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{text}: {stderr}");
        assert!(stderr.contains(needle), "{text}: {stderr}");
    }
}

/// The packaged example must stay a valid file (with its paths, which
/// `--check-config` does not open).
#[test]
fn example_config_is_valid() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/ringmta.toml");
    let s = check_config(&["--config", example.to_str().unwrap()], &[]);
    assert_eq!(s["spool-dir"].0, ["/var/spool/ringmta"]);
    assert_eq!(s["spool-dir"].1, "file");
}

/// What each SMTP session of the load sends: 1 recipient per message.
const LOAD_MESSAGES: usize = 3000;
const LOAD_SESSIONS: usize = 20;

#[test]
fn sighup_reloads_under_load_without_dropping_sessions() {
    let Some(smtp_source) = peer_program("smtp-source", "postfix") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let routed = dir.path().join("routed");
    let file = write_config(
        dir.path(),
        "max-recipients = 1\nlocal-domain = [\"localhost\"]\n",
    );
    // A smarthost flag so the harness leaves delivery on; nothing in the
    // test goes there (every recipient is local or routed to a Maildir).
    let server = Server::builder()
        .shards(2)
        .args(["--config", file.to_str().unwrap()])
        .args(["--relay-host", "127.0.0.1:9"])
        .start();
    let maildir = server.spool_dir().parent().unwrap().join("maildir");

    // Before: one recipient per message, new.test not ours, no relaying.
    let mut before = server.connect();
    before.hello("before.example");
    before.expect("MAIL FROM:<a@example.org>", 250);
    before.expect("RCPT TO:<one@localhost>", 250);
    before.expect("RCPT TO:<two@localhost>", 452);
    before.expect("RSET", 250);
    before.expect("MAIL FROM:<a@example.org>", 250);
    before.expect("RCPT TO:<x@new.test>", 550);
    before.expect("RCPT TO:<y@routed.test>", 550);
    before.expect("RSET", 250);

    let target = format!("127.0.0.1:{}", server.port);
    let load = std::thread::spawn({
        let smtp_source = smtp_source.clone();
        move || {
            let (s, m) = (LOAD_SESSIONS.to_string(), LOAD_MESSAGES.to_string());
            run_peer(
                &smtp_source,
                &[
                    "-s",
                    &s,
                    "-m",
                    &m,
                    "-l",
                    "512",
                    "-M",
                    "load.example",
                    "-f",
                    "load@example.org",
                    "-t",
                    "load@localhost",
                    &target,
                ],
                Duration::from_secs(300),
            )
        }
    });
    // Wait until the load is flowing, then reload in the middle of it.
    let load_box = maildir.join("localhost").join("load").join("new");
    let deadline = Instant::now() + Duration::from_secs(60);
    while count(&load_box) < 100 {
        assert!(Instant::now() < deadline, "no load: {}", server.stderr());
        std::thread::sleep(Duration::from_millis(20));
    }

    // 1. Reloadable keys change (session policy and delivery); a
    // restart-only key changes too.
    write_config(
        dir.path(),
        &format!(
            "max-recipients = 3\nlocal-domain = [\"localhost\", \"new.test\"]\n\
             relay-network = [\"127.0.0.0/8\"]\n\
             route = [\"routed.test=maildir:{}\"]\nbacklog = 16\n",
            routed.to_str().unwrap()
        ),
    );
    eprintln!(
        "SIGHUP with {} of {LOAD_MESSAGES} load messages delivered, smtp-source done: {}",
        count(&load_box),
        load.is_finished()
    );
    server.signal(libc::SIGHUP);
    assert!(
        server.wait_for_log("SIGHUP: configuration reloaded", IO_TIMEOUT),
        "{}",
        server.stderr()
    );
    let log = server.stderr();
    assert!(
        log.lines()
            .any(|l| l.contains("needs a restart") && l.contains("backlog")),
        "the restart-only key is not named: {log}"
    );
    let mut after = server.connect();
    after.hello("after.example");
    after.expect("MAIL FROM:<a@example.org>", 250);
    for r in ["one@localhost", "two@localhost", "x@new.test"] {
        after.expect(&format!("RCPT TO:<{r}>"), 250);
    }
    after.expect("RCPT TO:<four@localhost>", 452);
    after.expect("RSET", 250);
    after.send_message(
        "a@example.org",
        &["x@new.test"],
        b"Subject: new\r\n\r\nnew\r\n",
    );
    after.send_message(
        "a@example.org",
        &["y@routed.test"],
        b"Subject: routed\r\n\r\nrouted\r\n",
    );
    // The session opened before keeps the policy it started with.
    before.expect("MAIL FROM:<a@example.org>", 250);
    before.expect("RCPT TO:<x@new.test>", 550);
    before.expect("RCPT TO:<one@localhost>", 250);
    before.expect("RCPT TO:<two@localhost>", 452);
    before.expect("RSET", 250);

    // Delivery follows the new local domain and the new route.
    let new_box = maildir.join("new.test").join("x").join("new");
    let routed_box = routed.join("routed.test").join("y").join("new");
    let deadline = Instant::now() + Duration::from_secs(60);
    while count(&new_box) == 0 || count(&routed_box) == 0 {
        assert!(
            Instant::now() < deadline,
            "not delivered to {} and {}: {}",
            new_box.display(),
            routed_box.display(),
            server.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // 2. A file that does not parse, one that does not validate, one with
    // an unknown key: each is logged and nothing changes.
    for (bad, why) in [
        ("max-recipients = [\n", "not valid TOML"),
        ("max-recipients = 1\nmax-data-time = 0\n", "max-data-time"),
        ("max-recipients = 1\nmax-recipent = 2\n", "max-recipent"),
    ] {
        let seen = server
            .stderr()
            .matches("configuration NOT reloaded")
            .count();
        write_config(dir.path(), bad);
        server.signal(libc::SIGHUP);
        let deadline = Instant::now() + IO_TIMEOUT;
        while server
            .stderr()
            .matches("configuration NOT reloaded")
            .count()
            == seen
        {
            assert!(Instant::now() < deadline, "{bad}: {}", server.stderr());
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(server.stderr().contains(why), "{bad}: {}", server.stderr());
        let mut c = server.connect();
        c.hello("bad.example");
        c.expect("MAIL FROM:<a@example.org>", 250);
        for r in ["one@localhost", "two@localhost", "x@new.test"] {
            c.expect(&format!("RCPT TO:<{r}>"), 250);
        }
        c.expect("RCPT TO:<four@localhost>", 452);
    }

    let run = load.join().expect("load thread");
    assert!(
        run.status.success(),
        "smtp-source failed ({}): {}\n--- server ---\n{}",
        run.status,
        run.stderr,
        server.stderr()
    );
    // Every message of the load was taken and delivered.
    let deadline = Instant::now() + Duration::from_secs(120);
    while count(&load_box) < LOAD_MESSAGES {
        assert!(
            Instant::now() < deadline,
            "{} of {LOAD_MESSAGES} delivered: {}",
            count(&load_box),
            server.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(count(&load_box), LOAD_MESSAGES);
    before.expect("QUIT", 221);
    after.expect("QUIT", 221);
}

fn count(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |d| d.count())
}

/// Every key listed as reloadable is taken by a SIGHUP (the log names
/// exactly the keys that changed, none is refused as restart-only), and
/// those a client can see act at once for new connections: SIZE, AUTH
/// offered on plaintext loopback, a user from a new users file, the
/// per-IP connection limit, and the new DKIM key list.
#[test]
fn sighup_applies_every_reloadable_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = write_config(dir.path(), "max-recipients = 5\ninbound-auth = \"off\"\n");
    // The DNS lists the reload turns on ask a server on loopback that
    // never answers (nothing may leave the machine); --dnsbl-timeout
    // bounds the wait.
    let silent_dns = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let dns = silent_dns.local_addr().unwrap().to_string();
    let server = Server::builder()
        .args(["--config", file.to_str().unwrap(), "--dns-server", &dns])
        .inbound_auth_as_configured()
        .start();
    let submission = server.submission.expect("submission listener");

    // Before: default SIZE, no AUTH without TLS, 3 connections at once.
    let mut c = server.connect();
    let ehlo = c.hello("before.example").to_string();
    assert!(ehlo.contains("SIZE 52428800"), "{ehlo}");
    let mut sub = Client::connect(submission);
    let ehlo = sub.hello("before.example").to_string();
    assert!(!ehlo.contains("AUTH"), "{ehlo}");
    let mut third = server.connect();
    third.hello("third.example");
    drop((c, sub, third));

    // Files the new settings name.
    let tls_dir = server.spool_dir().join("tls");
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::copy(tls_dir.join("cert.pem"), &cert).unwrap();
    std::fs::copy(tls_dir.join("key.pem"), &key).unwrap();
    let ringmta = Path::new(env!("CARGO_BIN_EXE_ringmta"));
    let out = common::run_peer_with_input(
        ringmta,
        &["passwd", "carol"],
        b"s3cret\n",
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "passwd: {}", out.stderr);
    let users = dir.path().join("users");
    std::fs::write(&users, &out.stdout).unwrap();
    let senders = dir.path().join("senders");
    std::fs::write(&senders, "@example.net carol\n").unwrap();
    let shaping = dir.path().join("shaping.toml");
    std::fs::write(
        &shaping,
        "[domain.\"example.com\"]\nmax_message_rate = \"5/s\"\n",
    )
    .unwrap();
    let bounce_rules = dir.path().join("bounce-rules.toml");
    std::fs::write(
        &bounce_rules,
        "[[rule]]\nclass = \"throttled\"\ncode = \"421\"\nsuspend = \"1m\"\n",
    )
    .unwrap();
    let token = dir.path().join("admin-token");
    std::fs::write(&token, "after-the-reload-0123456789\n").unwrap();
    let admin = server.admin.expect("admin listener");
    assert_eq!(api_status(admin, None), 200, "no token before");
    let dkim = dir.path().join("dkim.pem");
    let out = run_peer(
        ringmta,
        &[
            "dkim-keygen",
            "--domain",
            "example.net",
            "--selector",
            "s1",
            "--algorithm",
            "ed25519",
            "--out",
            dkim.to_str().unwrap(),
        ],
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "dkim-keygen: {}", out.stderr);

    let values: &[(&str, String)] = &[
        ("relay-network", r#"["10.0.0.0/8"]"#.into()),
        ("local-domain", r#"["localhost", "example.net"]"#.into()),
        ("route", r#"["example.com=smtp:127.0.0.1:9"]"#.into()),
        ("max-message-size", r#""1M""#.into()),
        ("max-recipients", "3".into()),
        ("max-errors", "7".into()),
        ("command-timeout", r#""4m""#.into()),
        ("data-timeout", r#""2m""#.into()),
        ("max-data-time", r#""9m""#.into()),
        ("bare-newline", r#""reject""#.into()),
        ("allow-plaintext-auth-on-loopback", "true".into()),
        ("add-sender-header", "true".into()),
        ("dkim-from-mismatch", r#""unsigned""#.into()),
        ("dkim-relay-network", r#""on""#.into()),
        ("max-conns-per-shard", "1000".into()),
        ("max-conns-per-ip", "2".into()),
        ("relay-host", r#""127.0.0.1:9""#.into()),
        ("outbound-port", "2525".into()),
        ("connect-timeout", r#""20s""#.into()),
        ("relay-timeout", r#""4m""#.into()),
        ("relay-banner-timeout", r#""4m""#.into()),
        ("relay-data-timeout", r#""2m""#.into()),
        ("relay-final-timeout", r#""8m""#.into()),
        ("retry-schedule", r#""2m,10m""#.into()),
        ("max-queue-age", r#""3d""#.into()),
        ("delay-warning", r#""4h""#.into()),
        ("bounce-size-limit", r#""100K""#.into()),
        ("max-conns-per-dest", "4".into()),
        ("maildir-concurrency", "8".into()),
        ("shaping", format!("{:?}", shaping.to_str().unwrap())),
        (
            "bounce-rules",
            format!("{:?}", bounce_rules.to_str().unwrap()),
        ),
        ("max-hops", "30".into()),
        ("tls-policy", r#""require""#.into()),
        ("dane", r#""on""#.into()),
        (
            "dkim-key",
            format!("[\"example.net:s1:{}\"]", dkim.display()),
        ),
        ("tls-cert", format!("{:?}", cert.to_str().unwrap())),
        ("tls-key", format!("{:?}", key.to_str().unwrap())),
        ("tls-handshake-timeout", r#""20s""#.into()),
        ("users", format!("{:?}", users.to_str().unwrap())),
        (
            "sender-login-map",
            format!("{:?}", senders.to_str().unwrap()),
        ),
        ("auth-failure-delay", r#""2s""#.into()),
        ("max-connections-per-minute", "100".into()),
        ("max-messages-per-minute", "100".into()),
        ("max-recipients-per-minute", "1000".into()),
        ("max-messages-per-user-per-minute", "100".into()),
        ("greet-pause", r#""100ms""#.into()),
        ("screen-protocol", "true".into()),
        ("screen-ttl", r#""2h""#.into()),
        ("dnsbl", r#"["bl.test=2"]"#.into()),
        ("dnsbl-threshold", "2".into()),
        ("dnswl", r#"["wl.test"]"#.into()),
        ("dnsbl-timeout", r#""1s""#.into()),
        ("admin-token-file", format!("{:?}", token.to_str().unwrap())),
        ("inbound-auth", r#""on""#.into()),
        ("authserv-id", r#""mx.example.org""#.into()),
        ("spf-policy", r#""reject""#.into()),
        ("dmarc-reject", "true".into()),
        ("domain-auth", r#"["example.org:verify=off"]"#.into()),
        ("quarantine-header", r#""X-Quarantine""#.into()),
    ];
    let mut listed: Vec<&str> = values.iter().map(|(k, _)| *k).collect();
    listed.sort_unstable();
    let mut reloadable = ringmta::config_file::RELOADABLE.to_vec();
    reloadable.sort_unstable();
    reloadable.dedup();
    assert_eq!(
        listed, reloadable,
        "this test must change every reloadable key"
    );
    let text: String = values.iter().map(|(k, v)| format!("{k} = {v}\n")).collect();
    write_config(dir.path(), &text);
    server.signal(libc::SIGHUP);
    assert!(
        server.wait_for_log("SIGHUP: configuration reloaded", IO_TIMEOUT),
        "{}",
        server.stderr()
    );
    let log = server.stderr();
    let line = log
        .lines()
        .find(|l| l.contains("SIGHUP: configuration reloaded"))
        .unwrap();
    let mut changed: Vec<&str> = line
        .split("changed=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or_default()
        .split(',')
        .collect();
    changed.sort_unstable();
    assert_eq!(changed, reloadable, "{line}");
    assert!(!log.contains("needs a restart"), "{log}");
    assert!(
        server.wait_for_log("SIGHUP: DKIM keys reloaded keys=1", IO_TIMEOUT),
        "{}",
        server.stderr()
    );

    // After: SIZE, AUTH on plaintext loopback with the new user, two
    // connections per address.
    let mut c = server.connect();
    let ehlo = c.hello("after.example").to_string();
    assert!(ehlo.contains("SIZE 1048576"), "{ehlo}");
    let mut sub = Client::connect(submission);
    let ehlo = sub.hello("after.example").to_string();
    assert!(ehlo.contains("AUTH"), "{ehlo}");
    let plain = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        b"\0carol\0s3cret",
    );
    sub.expect(&format!("AUTH PLAIN {plain}"), 235);
    let mut third = server.connect();
    let r = third.reply();
    assert!(r.to_string().starts_with("421"), "{r}");
    sub.expect("QUIT", 221);
    c.expect("QUIT", 221);
    // The admin API now wants the token.
    assert_eq!(api_status(admin, None), 401);
    assert_eq!(api_status(admin, Some("after-the-reload-0123456789")), 200);
}

/// The status of `GET /api/v1/suspensions` on the admin listener.
fn api_status(addr: std::net::SocketAddr, token: Option<&str>) -> u16 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        s,
        "GET /api/v1/suspensions HTTP/1.1\r\nHost: t\r\n{auth}\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.split(' ').nth(1).unwrap().parse().unwrap()
}
