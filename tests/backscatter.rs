//! No backscatter (issue 11): a recipient that local delivery cannot take is
//! refused in the session, so no forged sender ever gets a bounce for it;
//! bare `<postmaster>` is delivered; `--local-recipients` decides which
//! users exist (and is reloaded on SIGHUP); a bounce returns at most
//! `--bounce-size-limit` octets of the original.
//!
//! The forged sender's domain is routed to a Maildir of the test's own
//! (`--route remote.test=maildir:SINK`), so a bounce to it, if one were
//! made, would land where the test looks.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{dot_stuff, queued_id, Client, Server};

const FORGED: &str = "victim@remote.test";

fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The files in `root/domain/local/new`, oldest name first.
fn maildir_files(root: &Path, mailbox: &str) -> Vec<String> {
    let (local, domain) = mailbox.rsplit_once('@').expect("an address");
    let Ok(dir) = fs::read_dir(root.join(domain).join(local).join("new")) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = dir.map(|e| e.expect("dir entry").path()).collect();
    paths.sort();
    paths
        .iter()
        .map(|p| String::from_utf8_lossy(&fs::read(p).expect("read mail")).into_owned())
        .collect()
}

/// Every file anywhere under `root`.
fn all_files(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![root.to_owned()];
    while let Some(d) = dirs.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries {
            let p = e.expect("dir entry").path();
            if p.is_dir() {
                dirs.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

fn maildir_root(server: &Server) -> PathBuf {
    server
        .spool_dir()
        .parent()
        .expect("spool in the test dir")
        .join("maildir")
}

/// For each `(rcpt, expected reply start)`: a transaction from the forged
/// sender with RET=FULL to that recipient and to `good`, which must be
/// delivered. Then the queue drains, and nothing may have reached the sink.
/// Mismatches are collected, so a run on the unfixed server shows every
/// spelling it accepted and every bounce it sent.
fn assert_refused_in_session_and_never_bounced(
    server: &Server,
    sink: &Path,
    good: &str,
    rows: &[(&str, &str)],
) {
    let mut wrong = Vec::new();
    let mut c = server.connect();
    c.hello("client.example");
    for (i, (rcpt, want)) in rows.iter().enumerate() {
        c.expect(&format!("MAIL FROM:<{FORGED}> RET=FULL"), 250);
        let r = c.cmd(&format!("RCPT TO:<{rcpt}>"));
        if !(r.lines.len() == 1 && r.last().starts_with(want)) {
            wrong.push(format!("RCPT TO:<{rcpt}>: got {r}, want {want}..."));
        }
        c.expect(&format!("RCPT TO:<{good}>"), 250);
        c.expect("DATA", 354);
        c.send(&dot_stuff(
            format!("Subject: row {i}\r\n\r\nthe attacker's payload {i}\r\n").as_bytes(),
        ));
        queued_id(&c.reply());
        // The session stays in sync after every refusal.
        c.expect("RSET", 250);
    }
    c.expect("QUIT", 221);
    // Every message settled: each good copy delivered, and any bounce
    // (stored before its message leaves the queue) delivered as well.
    wait_until("the queue to drain", Duration::from_secs(30), || {
        server.queued().is_empty()
    });
    let delivered = maildir_files(&maildir_root(server), good).len();
    assert_eq!(
        delivered,
        rows.len(),
        "the good recipient got every message"
    );
    let bounces = all_files(sink);
    if !bounces.is_empty() {
        wrong.push(format!(
            "{} bounce(s) sent to the forged sender: {bounces:?}",
            bounces.len()
        ));
    }
    assert!(wrong.is_empty(), "\n{}", wrong.join("\n"));
}

/// Regression (issue 11): spellings that Maildir delivery refuses were
/// accepted with 250, failed at delivery and bounced the whole message to
/// the forged sender. Quoted forms that parse are refused with 550 5.1.1;
/// forms that do not parse keep their 501 5.1.3 (a syntax error is the
/// precise reply, and they were never accepted).
#[test]
fn undeliverable_local_spellings_are_refused_at_rcpt_not_bounced() {
    let sink = tempfile::tempdir().expect("sink dir");
    let route = format!("remote.test=maildir:{}", sink.path().display());
    let server = Server::start(&["--route", &route]);
    let unusable = "550 5.1.1 ";
    let syntax = "501 5.1.3 ";
    let rows = [
        ("a/b@localhost", unusable),
        ("\"a/b\"@localhost", unusable),
        ("\"a\\/b\"@localhost", unusable),
        ("\".x\"@localhost", unusable),
        ("\".hidden\"@LOCALHOST", unusable),
        ("\"x.\"@localhost", unusable),
        ("\"a..b\"@localhost", unusable),
        ("\"..\"@localhost", unusable),
        ("\"../../etc\"@localhost", unusable),
        ("\"\"@localhost", unusable),
        (".x@localhost", syntax),
        ("x.@localhost", syntax),
        ("a..b@localhost", syntax),
        ("a\x01b@localhost", syntax),
        ("\"a\\\tb\"@localhost", syntax),
        ("\"a\x7fb\"@localhost", syntax),
    ];
    assert_refused_in_session_and_never_bounced(&server, sink.path(), "user@localhost", &rows);
    // The reply names the address and the rule.
    let mut c = server.connect();
    c.hello("client.example");
    c.expect(&format!("MAIL FROM:<{FORGED}>"), 250);
    let r = c.cmd("RCPT TO:<a/b@localhost>");
    assert!(
        r.is("550 5.1.1 <a/b@localhost>: Recipient address rejected: undeliverable mailbox name (contains '/')"),
        "{r}"
    );
}

/// Regression (issue 11): under `--local-recipients` an unknown user is
/// refused in the session, and nothing is bounced.
#[test]
fn unknown_users_under_local_recipients_are_refused_at_rcpt_not_bounced() {
    let sink = tempfile::tempdir().expect("sink dir");
    let table = sink.path().join("recipients");
    fs::write(&table, "user@localhost\n").expect("write table");
    let route = format!("remote.test=maildir:{}", sink.path().join("mail").display());
    let server = Server::start(&[
        "--route",
        &route,
        "--local-recipients",
        table.to_str().expect("UTF-8 path"),
    ]);
    let unknown = "550 5.1.1 ";
    let rows = [
        ("nobody@localhost", unknown),
        ("User.Name@localhost", unknown),
        ("\"user \"@localhost", unknown),
        ("a/b@localhost", unknown),
    ];
    assert_refused_in_session_and_never_bounced(
        &server,
        &sink.path().join("mail"),
        "user@localhost",
        &rows,
    );
}

/// Regression (issue 11): bare `<postmaster>` (RFC 5321 4.5.1) was queued
/// as `postmaster`, which no Maildir takes: it bounced instead of arriving.
#[test]
fn bare_postmaster_lands_in_the_first_local_domains_maildir() {
    let server = Server::start(&[
        "--local-domain",
        "example.org",
        "--local-domain",
        "localhost",
        "--relay-host",
        "127.0.0.1:9",
    ]);
    let mut c = server.connect();
    c.hello("client.example");
    c.expect("MAIL FROM:<someone@remote.test>", 250);
    c.expect("RCPT TO:<PostMaster>", 250);
    c.expect("DATA", 354);
    c.send(&dot_stuff(b"Subject: for the postmaster\r\n\r\nhello\r\n"));
    queued_id(&c.reply());
    let root = maildir_root(&server);
    wait_until("delivery to postmaster", Duration::from_secs(20), || {
        !maildir_files(&root, "postmaster@example.org").is_empty()
    });
    let mail = maildir_files(&root, "postmaster@example.org").remove(0);
    assert!(
        mail.starts_with(
            "Return-Path: <someone@remote.test>\r\nDelivered-To: postmaster@example.org\r\n"
        ),
        "{mail}"
    );
    assert!(mail.contains("\tfor <postmaster@example.org>;"), "{mail}");
    assert!(mail.contains("Subject: for the postmaster\r\n"), "{mail}");
    wait_until("the queue to drain", Duration::from_secs(10), || {
        server.queued().is_empty()
    });
    assert!(maildir_files(&root, "someone@remote.test").is_empty());
}

/// The replies to `rcpts` in one transaction (RSET after).
fn rcpt_replies(c: &mut Client, rcpts: &[&str]) -> Vec<String> {
    c.expect("MAIL FROM:<s@remote.test>", 250);
    let out = rcpts
        .iter()
        .map(|r| c.cmd(&format!("RCPT TO:<{r}>")).to_string())
        .collect();
    c.expect("RSET", 250);
    out
}

#[test]
fn local_recipients_accept_refuse_catch_all_and_reload_on_sighup() {
    let dir = tempfile::tempdir().expect("temp dir");
    let table = dir.path().join("recipients");
    fs::write(
        &table,
        "# who exists\n\nalice@example.org\n  @catchall.example  \n",
    )
    .expect("write table");
    let server = Server::start(&[
        "--local-domain",
        "example.org",
        "--local-domain",
        "catchall.example",
        "--local-recipients",
        table.to_str().expect("UTF-8 path"),
    ]);
    let ok = "250 2.1.5 Recipient ok";
    let unknown = |a: &str| format!("550 5.1.1 <{a}>: Recipient address rejected: User unknown");
    let mut c = server.connect();
    c.hello("client.example");
    assert_eq!(
        rcpt_replies(
            &mut c,
            &[
                "alice@example.org",
                "ALICE@Example.ORG",
                "bob@example.org",
                "anyone@catchall.example",
                "postmaster@example.org",
                "postmaster",
                "x@remote.test",
            ]
        ),
        [
            ok.to_owned(),
            ok.to_owned(),
            unknown("bob@example.org"),
            ok.to_owned(),
            ok.to_owned(),
            ok.to_owned(),
            "550 5.7.1 Error: relay access denied".to_owned(),
        ]
    );
    // Local parts match without regard to case, and are stored as listed.
    c.expect("MAIL FROM:<s@remote.test>", 250);
    c.expect("RCPT TO:<ALICE@example.org>", 250);
    c.expect("DATA", 354);
    c.send(&dot_stuff(b"Subject: x\r\n\r\n"));
    let id = queued_id(&c.reply());
    assert_eq!(server.message(&id).rcpts, ["alice@example.org"]);

    // SIGHUP: bob exists now, for new sessions and the next RCPT of this one.
    fs::write(&table, "alice@example.org\nbob@example.org\n").expect("write table");
    server.signal(libc::SIGHUP);
    assert!(
        server.wait_for_log("SIGHUP: local recipients reloaded", Duration::from_secs(10)),
        "{}",
        server.stderr()
    );
    assert_eq!(rcpt_replies(&mut c, &["bob@example.org"]), [ok]);
    let mut fresh = server.connect();
    fresh.hello("client.example");
    assert_eq!(
        rcpt_replies(&mut fresh, &["bob@example.org", "anyone@catchall.example"]),
        [ok.to_owned(), unknown("anyone@catchall.example")]
    );

    // A file that does not load leaves the table in force.
    fs::write(&table, "alice@example.org\ncarol\n").expect("write table");
    server.signal(libc::SIGHUP);
    assert!(
        server.wait_for_log(
            "SIGHUP: local recipients NOT reloaded; keeping the old ones",
            Duration::from_secs(10)
        ),
        "{}",
        server.stderr()
    );
    assert!(server.stderr().contains("line 2"), "{}", server.stderr());
    assert_eq!(rcpt_replies(&mut fresh, &["bob@example.org"]), [ok]);
}

#[test]
fn a_local_recipients_file_that_does_not_load_stops_the_start() {
    let dir = tempfile::tempdir().expect("temp dir");
    let table = dir.path().join("recipients");
    fs::write(&table, "alice@example.org\njust-a-name\n").expect("write table");
    let e = Server::builder()
        .args(["--local-recipients", table.to_str().expect("UTF-8 path")])
        .try_start()
        .err()
        .expect("the start must fail");
    assert!(
        e.stderr.contains("--local-recipients") && e.stderr.contains("line 2"),
        "{e}"
    );
}

/// A relay whose route for fail.test leads to a ringmta that refuses it
/// (550 5.7.1), so every message there bounces to its local sender.
fn bouncing_relay() -> (Server, Server) {
    let downstream = Server::start(&["--local-domain", "example.net"]);
    let route = format!("fail.test=smtp:127.0.0.1:{}", downstream.port);
    let relay = Server::start(&[
        "--route",
        &route,
        "--relay-network",
        "127.0.0.0/8",
        "--retry-schedule",
        "1s",
    ]);
    (relay, downstream)
}

fn send(c: &mut Client, from: &str, ret: &str, content: &[u8]) {
    c.expect(&format!("MAIL FROM:<{from}> RET={ret}"), 250);
    c.expect("RCPT TO:<x@fail.test>", 250);
    c.expect("DATA", 354);
    c.send(&dot_stuff(content));
    queued_id(&c.reply());
}

/// Regression (issue 11): a bounce carried the whole original back, so one
/// forged message could reflect up to --max-message-size onto a victim.
/// Above --bounce-size-limit (51200 by default) only the header returns.
#[test]
fn bounce_of_a_large_message_carries_headers_only() {
    let (relay, _downstream) = bouncing_relay();
    let mut c = relay.connect();
    c.hello("client.example");
    let big = format!(
        "Subject: big one\r\n\r\n{}",
        "BIGBODY 0123456789 0123456789 0123456789 0123456789\r\n".repeat(2000)
    );
    assert!(big.len() > 51_200);
    send(&mut c, "big@localhost", "FULL", big.as_bytes());
    let small = "Subject: small one\r\n\r\nSMALLBODY\r\n";
    send(&mut c, "small@localhost", "FULL", small.as_bytes());
    send(&mut c, "hdrs@localhost", "HDRS", small.as_bytes());

    let root = maildir_root(&relay);
    wait_until("three bounces", Duration::from_secs(30), || {
        ["big@localhost", "small@localhost", "hdrs@localhost"]
            .iter()
            .all(|m| !maildir_files(&root, m).is_empty())
    });
    let bounce = maildir_files(&root, "big@localhost").remove(0);
    assert!(bounce.contains("Status: 5.7.1"), "{bounce}");
    assert!(
        bounce.contains("Content-Type: text/rfc822-headers\r\n\r\nReceived: "),
        "{bounce}"
    );
    assert!(bounce.contains("Subject: big one\r\n"), "{bounce}");
    assert!(!bounce.contains("BIGBODY"), "the body came back");
    assert!(bounce.len() < 8192, "bounce of {} octets", bounce.len());
    assert!(
        bounce.contains(
            "more than this server returns\r\n(51200 octets): only its header is attached."
        ),
        "{bounce}"
    );

    let bounce = maildir_files(&root, "small@localhost").remove(0);
    assert!(
        bounce.contains("Content-Type: message/rfc822\r\n\r\nReceived: "),
        "{bounce}"
    );
    assert!(
        bounce.contains("Subject: small one\r\n\r\nSMALLBODY\r\n"),
        "{bounce}"
    );

    let bounce = maildir_files(&root, "hdrs@localhost").remove(0);
    assert!(
        bounce.contains("Content-Type: text/rfc822-headers\r\n"),
        "{bounce}"
    );
    assert!(bounce.contains("Subject: small one\r\n"), "{bounce}");
    assert!(!bounce.contains("SMALLBODY"), "{bounce}");
}
