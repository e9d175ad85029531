//! The relay/MX port's screening of clients, against the real server: DNS
//! blocklists and allowlists served by a dnsmasq the test starts (weights,
//! threshold, the lists' error codes, the cache), a DNS server that never
//! answers, the greet pause and the memory of clients that failed it,
//! non-SMTP commands, pipelining before PIPELINING, and the per-minute rate
//! limits per client network. Clients come from different 127/8 addresses.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::process::Command;
use std::time::Duration;

use common::{peer_program, Client, Server};
use serde_json::Value;

/// dnsmasq serving `records` as `--host-record`s, with a TTL of 300 s.
fn dnsmasq(records: &[&str]) -> Option<(common::Reaped, u16)> {
    let args: Vec<String> = records
        .iter()
        .map(|r| format!("--host-record={r}"))
        .collect();
    common::dnsmasq(&args, 300)
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// The first reply of a connection from `source`.
fn first_reply(server: &Server, to: SocketAddr, source: &str) -> (Client, common::Reply) {
    let mut c = Client::connect_from(to, ip(source));
    let r = c.reply();
    let _ = server;
    (c, r)
}

fn json_events(server: &Server, name: &str) -> Vec<Value> {
    server
        .stderr()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["event"] == name)
        .collect()
}

fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// The value of `name{…reason="reason"…}` summed over shards.
fn counter(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn dnsbl_weights_threshold_allowlist_and_cache() {
    let Some((dns, dns_port)) = dnsmasq(&[
        // bl.test (weight 2) lists .2 and .5; bl2.test (weight 1) lists .2
        // and .3.
        "2.0.0.127.bl.test,127.0.0.2",
        "2.0.0.127.bl2.test,127.0.0.2",
        "3.0.0.127.bl2.test,127.0.0.3",
        // An error code ("query refused"), not a listing.
        "4.0.0.127.bl.test,127.255.255.254",
        // Listed, but on the allowlist.
        "5.0.0.127.bl.test,127.0.0.2",
        "5.0.0.127.wl.test,127.0.0.2",
    ]) else {
        return;
    };
    let server = Server::builder()
        .args([
            "--log-format",
            "json",
            "--dns-server",
            &format!("127.0.0.1:{dns_port}"),
            "--dnsbl",
            "bl.test=2",
            "--dnsbl",
            "bl2.test",
            "--dnsbl-threshold",
            "2",
            "--dnswl",
            "wl.test",
            "--admin",
            "127.0.0.1:0",
        ])
        .start();
    let refused = "554 5.7.1 Service unavailable; client [127.0.0.2] blocked using bl.test";
    let (mut c, r) = first_reply(&server, server.addr, "127.0.0.2");
    assert!(r.is(refused), "{r}");
    c.expect_closed();
    // Listed below the threshold, an error code, allowlisted, not listed:
    // all served.
    for source in ["127.0.0.3", "127.0.0.4", "127.0.0.5", "127.0.0.6"] {
        let mut c = Client::connect_from(server.addr, ip(source));
        c.hello("client.example");
        c.send_message(
            "s@example.org",
            &["u@localhost"],
            b"Subject: t\r\n\r\nx\r\n",
        );
        c.expect("QUIT", 221);
    }
    // The submission port is not checked (its users log in).
    let sub = server.submission.expect("submission listener");
    let mut c = Client::connect_from(sub, ip("127.0.0.2"));
    c.greeting();
    // Answers are kept for their TTL: with the DNS server gone, .2 is
    // still refused and .3 still served.
    drop(dns);
    let (_c, r) = first_reply(&server, server.addr, "127.0.0.2");
    assert!(r.is(refused), "{r}");
    let mut c = Client::connect_from(server.addr, ip("127.0.0.3"));
    c.greeting();

    let events = json_events(&server, "refused");
    let dnsbl: Vec<_> = events.iter().filter(|e| e["reason"] == "dnsbl").collect();
    assert_eq!(dnsbl.len(), 2, "{events:?}");
    assert_eq!(dnsbl[0]["reply"], 554);
    assert_eq!(dnsbl[0]["detail"], "bl.test,bl2.test score=3");
    assert!(dnsbl[0]["peer"].as_str().unwrap().starts_with("127.0.0.2:"));
    let text = http_get(server.admin.expect("admin"), "/metrics");
    assert_eq!(
        counter(&text, "ringmta_screen_refusals_total", "reason=\"dnsbl\""),
        2.0,
        "{text}"
    );
    assert!(counter(&text, "ringmta_dnsbl_lookups_total", "result=\"listed\"") >= 4.0);
}

/// A DNS server that takes queries and never answers (UDP and TCP) must
/// not hold the greeting past `--dnsbl-timeout`: the lists count as not
/// listing the client. (hickory's own timeout is 5 s; the client here
/// gives up after 4.)
#[test]
fn silent_dns_server_does_not_hold_the_session() {
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = udp.local_addr().unwrap().port();
    let _tcp = std::net::TcpListener::bind(("127.0.0.1", port)).ok();
    let server = Server::builder()
        .args([
            "--dns-server",
            &format!("127.0.0.1:{port}"),
            "--dnsbl",
            "bl.test",
            "--dnswl",
            "wl.test",
            "--dnsbl-timeout",
            "1s",
        ])
        .start();
    for _ in 0..2 {
        let mut c = Client::connect_from(server.addr, ip("127.0.0.2"));
        c.set_read_timeout(Duration::from_secs(4));
        c.hello("client.example");
        c.send_message(
            "s@example.org",
            &["u@localhost"],
            b"Subject: t\r\n\r\nx\r\n",
        );
        c.expect("QUIT", 221);
    }
    // The queries did reach the silent server.
    udp.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut buf = [0u8; 512];
    assert!(udp.recv(&mut buf).is_ok());
    assert!(server.wait_for_log("DNS list lookup timed out", Duration::from_secs(5)));
}

#[test]
fn talking_before_the_greeting_is_refused_and_remembered() {
    let server = Server::builder()
        .args([
            "--log-format",
            "json",
            "--greet-pause",
            "1s",
            "--relay-network",
            "127.0.0.9/32",
        ])
        .start();
    // Talks at once: 554, closed, then refused at once for --screen-ttl.
    let mut c = Client::connect_from(server.addr, ip("127.0.0.7"));
    c.line("EHLO early.example");
    let r = c.reply();
    assert!(
        r.is("554 5.5.1 Error: protocol violation: talking before the greeting"),
        "{r}"
    );
    c.expect_closed();
    let mut c = Client::connect_from(server.addr, ip("127.0.0.7"));
    let r = c.reply();
    assert!(
        r.is("421 4.7.0 Error: refused for an earlier protocol violation, try again later"),
        "{r}"
    );
    c.expect_closed();
    // Another client that waits is served; a relay client is not screened
    // (what it sent early is its first command).
    let mut c = Client::connect_from(server.addr, ip("127.0.0.8"));
    c.hello("patient.example");
    c.expect("QUIT", 221);
    let mut c = Client::connect_from(server.addr, ip("127.0.0.9"));
    c.line("EHLO internal.example");
    c.greeting();
    assert_eq!(c.reply().code, 250);
    let events = json_events(&server, "refused");
    let reasons: Vec<&str> = events
        .iter()
        .map(|e| e["reason"].as_str().unwrap())
        .collect();
    assert_eq!(reasons, ["pregreet", "screened"], "{events:?}");
}

#[test]
fn http_and_pipelining_without_pipelining_are_dropped_and_remembered() {
    let server = Server::builder()
        .args(["--screen-protocol", "--screen-ttl", "10m"])
        .start();
    // An HTTP request (a browser, or a proxy's victim): dropped, remembered.
    let mut c = Client::connect_from(server.addr, ip("127.0.0.10"));
    c.greeting();
    c.send(b"GET / HTTP/1.1\r\nHost: mx.test\r\n\r\n");
    let r = c.reply();
    assert!(r.is("554 5.5.1 Error: non-SMTP command"), "{r}");
    c.expect_closed();
    let mut c = Client::connect_from(server.addr, ip("127.0.0.10"));
    assert_eq!(c.reply().code, 421);
    // HELO, then commands in one write without waiting: dropped after the
    // first reply.
    let mut c = Client::connect_from(server.addr, ip("127.0.0.11"));
    c.greeting();
    c.send(b"HELO bot.example\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<u@localhost>\r\n");
    assert_eq!(c.reply().code, 250);
    let r = c.reply();
    assert!(
        r.is("554 5.5.1 Error: protocol violation: commands pipelined without PIPELINING"),
        "{r}"
    );
    c.expect_closed();
    let mut c = Client::connect_from(server.addr, ip("127.0.0.11"));
    assert_eq!(c.reply().code, 421);
    // A client that waits for EHLO's PIPELINING may pipeline (swaks, a
    // real client, does so when offered).
    let mut c = Client::connect_from(server.addr, ip("127.0.0.12"));
    c.hello("good.example");
    c.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<u@localhost>\r\nDATA\r\n");
    assert_eq!(c.reply().code, 250);
    assert_eq!(c.reply().code, 250);
    assert_eq!(c.reply().code, 354);
    c.send(b"Subject: t\r\n\r\nx\r\n.\r\n");
    assert_eq!(c.reply().code, 250);
    if let Some(swaks) = peer_program("swaks", "swaks") {
        let out = Command::new(swaks)
            .args([
                "--server",
                &server.addr.to_string(),
                "--local-interface",
                "127.0.0.13",
                "--to",
                "u@localhost",
                "--from",
                "s@example.org",
                "--pipeline",
                "--timeout",
                "10",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

#[test]
fn rate_limits_per_minute_per_network() {
    let server = Server::builder()
        .args([
            "--log-format",
            "json",
            "--max-connections-per-minute",
            "3",
            "--max-messages-per-minute",
            "2",
            "--max-recipients-per-minute",
            "3",
        ])
        .start();
    // Connections: three from 127.0.1.0/24, the fourth refused, another
    // address of the same /24 too, another /24 not.
    for _ in 0..3 {
        let mut c = Client::connect_from(server.addr, ip("127.0.1.2"));
        c.greeting();
        c.expect("QUIT", 221);
    }
    for source in ["127.0.1.2", "127.0.1.3"] {
        let mut c = Client::connect_from(server.addr, ip(source));
        let r = c.reply();
        assert!(
            r.is("421 4.7.0 Error: too many connections from your network, try again later"),
            "{r}"
        );
        c.expect_closed();
    }
    // Messages and recipients, from 127.0.2.0/24: two messages, then 451;
    // the fourth recipient 452.
    let mut c = Client::connect_from(server.addr, ip("127.0.2.2"));
    c.hello("client.example");
    c.send_message(
        "s@example.org",
        &["a@localhost", "b@localhost"],
        b"Subject: 1\r\n\r\nx\r\n",
    );
    c.expect("MAIL FROM:<s@example.org>", 250);
    c.expect("RCPT TO:<c@localhost>", 250);
    let r = c.cmd("RCPT TO:<d@localhost>");
    assert!(
        r.is("452 4.5.3 Error: too many recipients from your network, try again later"),
        "{r}"
    );
    c.expect("DATA", 354);
    c.send(b"Subject: 2\r\n\r\nx\r\n.\r\n");
    assert_eq!(c.reply().code, 250);
    let r = c.cmd("MAIL FROM:<s@example.org>");
    assert!(
        r.is("451 4.7.0 Error: too many messages from your network, try again later"),
        "{r}"
    );
    // Another network is not affected.
    let mut other = Client::connect_from(server.addr, ip("127.0.3.2"));
    other.hello("other.example");
    other.send_message(
        "s@example.org",
        &["a@localhost"],
        b"Subject: o\r\n\r\nx\r\n",
    );
    let events = json_events(&server, "refused");
    let reasons: Vec<&str> = events
        .iter()
        .map(|e| e["reason"].as_str().unwrap())
        .collect();
    assert_eq!(
        reasons,
        [
            "connection_rate",
            "connection_rate",
            "recipient_rate",
            "message_rate"
        ],
        "{events:?}"
    );
}

/// Behind a trusted balancer the lists see the client its PROXY header
/// names, never the balancer; during the greet pause an allowlisted client
/// may talk (its early command is served), anyone else may not.
#[test]
fn proxied_clients_allowlist_and_greet_pause_with_lists() {
    let Some((_dns, dns_port)) = dnsmasq(&[
        "2.0.0.127.bl.test,127.0.0.2",
        // The balancer itself is listed: it must not matter.
        "100.0.0.127.bl.test,127.0.0.2",
        "5.0.0.127.bl.test,127.0.0.2",
        "5.0.0.127.wl.test,127.0.0.2",
    ]) else {
        return;
    };
    let server = Server::builder()
        .args([
            "--dns-server",
            &format!("127.0.0.1:{dns_port}"),
            "--dnsbl",
            "bl.test",
            "--dnswl",
            "wl.test",
            "--greet-pause",
            "500ms",
            "--proxy-protocol-from",
            "127.0.0.100/32",
        ])
        .start();
    let mut c = Client::connect_from(server.addr, ip("127.0.0.100"));
    c.send(b"PROXY TCP4 192.0.2.50 127.0.0.1 40000 25\r\n");
    c.hello("proxied.example");
    c.expect("QUIT", 221);
    let mut c = Client::connect_from(server.addr, ip("127.0.0.100"));
    c.send(b"PROXY TCP4 127.0.0.2 127.0.0.1 40000 25\r\n");
    let r = c.reply();
    assert!(
        r.is("554 5.7.1 Service unavailable; client [127.0.0.2] blocked using bl.test"),
        "{r}"
    );
    // Allowlisted (though on the blocklist too) and talking at once.
    let mut c = Client::connect_from(server.addr, ip("127.0.0.5"));
    c.line("EHLO eager.example");
    c.greeting();
    assert_eq!(c.reply().code, 250);
    c.send_message(
        "s@example.org",
        &["u@localhost"],
        b"Subject: t\r\n\r\nx\r\n",
    );
    // Not allowlisted and talking at once.
    let mut c = Client::connect_from(server.addr, ip("127.0.0.6"));
    c.line("EHLO eager.example");
    assert_eq!(c.reply().code, 554);
}

#[test]
fn messages_per_minute_per_user_on_submission() {
    let ringmta = std::path::Path::new(env!("CARGO_BIN_EXE_ringmta"));
    let out = common::run_peer_with_input(
        ringmta,
        &["passwd", "carol"],
        b"s3cret\n",
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "passwd: {}", out.stderr);
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users");
    std::fs::write(&users, &out.stdout).unwrap();
    let server = Server::builder()
        .args([
            "--users",
            users.to_str().unwrap(),
            "--allow-plaintext-auth-on-loopback",
            "--local-domain",
            "example.org",
            "--max-messages-per-user-per-minute",
            "2",
            "--max-messages-per-minute",
            "1",
        ])
        .start();
    let plain = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        b"\0carol\0s3cret",
    );
    let mut c = Client::connect(server.submission.expect("submission listener"));
    c.hello("mua.example");
    c.expect(&format!("AUTH PLAIN {plain}"), 235);
    // The network's limit (1) is not the user's (2).
    for _ in 0..2 {
        c.send_message(
            "carol@example.org",
            &["x@example.com"],
            b"From: carol@example.org\r\nSubject: t\r\n\r\nx\r\n",
        );
    }
    let r = c.cmd("MAIL FROM:<carol@example.org>");
    assert!(
        r.is("451 4.7.0 Error: too many messages from this user, try again later"),
        "{r}"
    );
    // The relay/MX port counts the same address's network on its own.
    let mut mx = server.connect();
    mx.hello("mx.example");
    mx.send_message(
        "s@example.com",
        &["u@example.org"],
        b"Subject: 1\r\n\r\nx\r\n",
    );
    let r = mx.cmd("MAIL FROM:<s@example.com>");
    assert!(
        r.is("451 4.7.0 Error: too many messages from your network, try again later"),
        "{r}"
    );
}

/// SIGHUP puts new limits and lists in force for the connections that
/// follow: a connection limit turned on, then the greet pause.
#[test]
fn sighup_turns_limits_and_the_screen_on() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ringmta.toml");
    std::fs::write(&config, "max-connections-per-minute = 0\n").unwrap();
    let server = Server::builder()
        .args(["--config", config.to_str().unwrap()])
        .start();
    for _ in 0..3 {
        let mut c = Client::connect_from(server.addr, ip("127.0.4.2"));
        c.greeting();
    }
    std::fs::write(
        &config,
        "max-connections-per-minute = 2\ngreet-pause = \"500ms\"\n",
    )
    .unwrap();
    server.signal(libc::SIGHUP);
    assert!(server.wait_for_log("SIGHUP: configuration reloaded", Duration::from_secs(10)));
    // Connections before the limit was set were not counted.
    for _ in 0..2 {
        let mut c = Client::connect_from(server.addr, ip("127.0.4.2"));
        c.greeting();
    }
    let mut c = Client::connect_from(server.addr, ip("127.0.4.2"));
    assert_eq!(c.reply().code, 421);
    let mut c = Client::connect_from(server.addr, ip("127.0.5.2"));
    c.line("EHLO early.example");
    assert_eq!(c.reply().code, 554);
}
