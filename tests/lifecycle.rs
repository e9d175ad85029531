//! The process around the sessions: graceful stop on SIGTERM/SIGINT, the
//! shutdown grace period, the spool lock, listening-port conflicts,
//! connection limits, the data timeout, and what a vanished client or a
//! killed server leaves in the spool.

mod common;

use std::net::TcpListener;
use std::time::{Duration, Instant};

use common::{queued_id, Client, Server};

const SHUTTING_DOWN: &str = "421 4.3.2 Service shutting down, closing transmission channel";
const TOO_MANY_CONNECTIONS: &str =
    "421 4.7.0 Error: too many connections, closing transmission channel";
const TIMEOUT: &str = "421 4.4.2 Error: timeout exceeded";
/// Logged by each shard once it has seen the stop flag.
const SHARD_STOPPING: &str = "shard stopping";
const EXIT_WITHIN: Duration = Duration::from_secs(5);

/// A client inside DATA, part of its content sent.
fn inside_data(server: &Server) -> Client {
    let mut c = server.connect();
    c.greeting();
    start_data(&mut c);
    c
}

/// From just after the greeting to inside DATA, part of the content sent.
fn start_data(c: &mut Client) {
    c.expect("EHLO client.example", 250);
    c.expect("MAIL FROM:<sender@example.org>", 250);
    c.expect("RCPT TO:<user@localhost>", 250);
    c.expect("DATA", 354);
    c.send(b"Subject: in flight\r\n\r\npart one\r\n");
}

fn assert_reply(c: &mut Client, want: &str) {
    let r = c.reply();
    assert!(r.is(want), "expected `{want}`, got `{r}`");
}

fn idle_sessions_get_421_and_exit_0(sig: i32) {
    let mut server = Server::builder().shards(2).start();
    let mut fresh = server.connect();
    fresh.greeting();
    let mut greeted = server.connect();
    greeted.hello("client.example");
    server.signal(sig);
    for c in [&mut fresh, &mut greeted] {
        assert_reply(c, SHUTTING_DOWN);
        c.expect_closed();
    }
    server.assert_exits_cleanly(EXIT_WITHIN);
}

#[test]
fn sigterm_closes_idle_sessions_with_421_and_exits_0() {
    idle_sessions_get_421_and_exit_0(libc::SIGTERM);
}

#[test]
fn sigint_closes_idle_sessions_with_421_and_exits_0() {
    idle_sessions_get_421_and_exit_0(libc::SIGINT);
}

#[test]
fn sigterm_without_clients_exits_0() {
    let mut server = Server::start(&[]);
    server.signal(libc::SIGTERM);
    server.assert_exits_cleanly(EXIT_WITHIN);
}

/// A transaction open at SIGTERM may finish: its 250 (the message is on
/// disk) comes first, then the 421; idle sessions are closed meanwhile.
#[test]
fn sigterm_lets_an_open_transaction_finish() {
    let mut server = Server::start(&[]);
    let mut sending = inside_data(&server);
    let mut idle = server.connect();
    idle.hello("idle.example");
    server.signal(libc::SIGTERM);
    assert!(
        server.wait_for_log(SHARD_STOPPING, EXIT_WITHIN),
        "the shard did not start stopping:\n{}",
        server.stderr()
    );
    assert_reply(&mut idle, SHUTTING_DOWN);
    idle.expect_closed();
    // The server is draining, not gone: the client inside DATA hears
    // nothing until it ends its message.
    sending.expect_silence(Duration::from_millis(300));
    sending.send(b"part two\r\n.\r\n");
    let id = queued_id(&sending.reply());
    assert_reply(&mut sending, SHUTTING_DOWN);
    sending.expect_closed();
    server.assert_exits_cleanly(EXIT_WITHIN);
    let q = server.message(&id);
    assert_eq!(
        q.content(),
        b"Subject: in flight\r\n\r\npart one\r\npart two\r\n"
    );
    assert_eq!(server.queued().len(), 1);
}

/// A transaction counts as open from MAIL on: it may go on after SIGTERM,
/// and ending it with RSET gets its 250 and then the 421.
#[test]
fn sigterm_waits_for_a_transaction_that_ends_with_rset() {
    let mut server = Server::start(&[]);
    let mut c = server.connect();
    c.hello("client.example");
    c.expect("MAIL FROM:<sender@example.org>", 250);
    server.signal(libc::SIGTERM);
    assert!(
        server.wait_for_log(SHARD_STOPPING, EXIT_WITHIN),
        "{}",
        server.stderr()
    );
    c.expect_silence(Duration::from_millis(300));
    c.expect("RCPT TO:<user@localhost>", 250);
    c.line("RSET");
    assert_reply(&mut c, "250 2.0.0 Reset ok");
    assert_reply(&mut c, SHUTTING_DOWN);
    c.expect_closed();
    server.assert_exits_cleanly(EXIT_WITHIN);
    assert!(server.queued().is_empty());
}

/// After --shutdown-grace an open transaction is cut off with 421 and
/// nothing of it is queued; the exit is still clean.
#[test]
fn shutdown_grace_expiry_closes_open_transactions() {
    let mut server = Server::start(&["--shutdown-grace", "1s"]);
    let mut c = inside_data(&server);
    let start = Instant::now();
    server.signal(libc::SIGTERM);
    assert_reply(&mut c, SHUTTING_DOWN);
    assert!(
        start.elapsed() >= Duration::from_millis(900),
        "421 came before the grace period was over ({:?})",
        start.elapsed()
    );
    c.expect_closed();
    server.assert_exits_cleanly(EXIT_WITHIN);
    assert!(server.queued().is_empty());
}

/// A second stop signal does not wait for the grace period: exit 1 now.
#[test]
fn second_sigterm_exits_at_once() {
    let mut server = Server::start(&[]);
    let _c = inside_data(&server);
    server.signal(libc::SIGTERM);
    assert!(
        server.wait_for_log(SHARD_STOPPING, EXIT_WITHIN),
        "{}",
        server.stderr()
    );
    server.signal(libc::SIGTERM);
    let status = server
        .wait_exit(EXIT_WITHIN)
        .unwrap_or_else(|| panic!("still running after a second SIGTERM:\n{}", server.stderr()));
    assert_eq!(status.code(), Some(1), "{status}");
    assert!(server.queued().is_empty());
}

#[test]
fn second_instance_on_the_same_spool_fails() {
    let server = Server::start(&[]);
    let err = match Server::builder().spool_dir(server.spool_dir()).try_start() {
        Ok(_) => panic!("a second ringmta started on the same spool"),
        Err(e) => e,
    };
    let status = err.status.unwrap_or_else(|| panic!("did not exit: {err}"));
    assert!(!status.success(), "{err}");
    assert!(
        err.stderr.contains("ringmta.lock"),
        "the error does not name the lock: {err}"
    );
    // The first instance is unharmed.
    let mut c = server.connect();
    c.greeting();
    c.expect("NOOP", 250);
}

#[test]
fn port_held_by_another_process_fails_to_start() {
    // std binds without SO_REUSEPORT, like most other servers.
    let holder = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = holder.local_addr().expect("local addr").to_string();
    let err = match Server::builder().args(["--smtp", &addr]).try_start() {
        Ok(_) => panic!("ringmta started on {addr}, which is in use"),
        Err(e) => e,
    };
    let status = err.status.unwrap_or_else(|| panic!("did not exit: {err}"));
    assert!(!status.success(), "{err}");
    assert!(
        err.stderr.contains(&addr),
        "the error does not name {addr}: {err}"
    );
}

/// SO_REUSEPORT must not let a second ringmta (own spool) share the port
/// of a running one and silently take half its connections.
#[test]
fn port_held_by_another_ringmta_fails_to_start() {
    let first = Server::builder().shards(2).start();
    let addr = first.addr.to_string();
    let err = match Server::builder().args(["--smtp", &addr]).try_start() {
        Ok(_) => panic!("a second ringmta started on {addr}"),
        Err(e) => e,
    };
    assert!(!err.status.is_some_and(|s| s.success()), "{err}");
    assert!(
        err.stderr.contains(&addr),
        "the error does not name {addr}: {err}"
    );
}

/// --max-conns-per-ip counts over all shards: the third concurrent
/// connection is answered 421 4.7.0 and closed; a freed slot is reusable.
#[test]
fn max_conns_per_ip() {
    let server = Server::builder()
        .shards(2)
        .args(["--max-conns-per-ip", "2"])
        .start();
    let mut a = server.connect();
    a.greeting();
    let mut b = server.connect();
    b.greeting();
    for _ in 0..3 {
        let mut c = server.connect();
        assert_reply(&mut c, TOO_MANY_CONNECTIONS);
        c.expect_closed();
    }
    // The two admitted sessions are unaffected.
    a.expect("NOOP", 250);
    b.expect("NOOP", 250);
    drop(a);
    let mut c = connect_when_admitted(&server);
    c.expect("NOOP", 250);
}

#[test]
fn max_conns_per_shard() {
    let server = Server::start(&["--max-conns-per-shard", "2"]);
    let mut a = server.connect();
    a.greeting();
    let mut b = server.connect();
    b.greeting();
    let mut c = server.connect();
    assert_reply(&mut c, TOO_MANY_CONNECTIONS);
    c.expect_closed();
    b.expect("NOOP", 250);
}

/// Connects until the server admits the connection (greets with 220)
/// rather than refusing it with 421: then every earlier connection that
/// was closed has been fully released by the server.
fn connect_when_admitted(server: &Server) -> Client {
    let deadline = Instant::now() + EXIT_WITHIN;
    loop {
        let mut c = server.connect();
        let r = c.reply();
        if r.code == 220 {
            return c;
        }
        assert!(r.is(TOO_MANY_CONNECTIONS), "unexpected greeting `{r}`");
        assert!(
            Instant::now() < deadline,
            "the server never released the slot"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// --data-timeout, not --command-timeout (5 minutes here), governs a
/// client that stalls inside DATA or inside a BDAT chunk.
#[test]
fn data_timeout_mid_data() {
    let server = Server::start(&["--data-timeout", "1s"]);
    let mut c = inside_data(&server);
    let start = Instant::now();
    assert_reply(&mut c, TIMEOUT);
    assert!(
        start.elapsed() >= Duration::from_millis(900),
        "{:?}",
        start.elapsed()
    );
    c.expect_closed();

    let mut c = server.connect();
    c.hello("client.example");
    c.expect("MAIL FROM:<sender@example.org>", 250);
    c.expect("RCPT TO:<user@localhost>", 250);
    c.send(b"BDAT 100 LAST\r\nonly ten b");
    assert_reply(&mut c, TIMEOUT);
    c.expect_closed();

    assert!(server.queued().is_empty());
    // Between commands the long command timeout still applies.
    let mut idle = server.connect();
    idle.hello("client.example");
    idle.expect_silence(Duration::from_millis(1500));
    idle.expect("NOOP", 250);
}

/// A client that vanishes mid-message leaves nothing behind, in DATA or
/// in a BDAT chunk, whether it closes cleanly or resets.
#[test]
fn disconnect_mid_data_queues_nothing() {
    // One connection per IP: when a new one is admitted, the old session
    // is gone.
    let server = Server::start(&["--max-conns-per-ip", "1"]);

    let c = inside_data(&server);
    c.shutdown_write();
    drop(c);

    let mut c = connect_when_admitted(&server);
    start_data(&mut c);
    // Everything but the last byte of the end marker.
    c.send(b"last line\r\n.\r");
    drop(c);

    let mut c = connect_when_admitted(&server);
    c.expect("EHLO client.example", 250);
    c.expect("MAIL FROM:<sender@example.org>", 250);
    c.expect("RCPT TO:<user@localhost>", 250);
    c.send(b"BDAT 100 LAST\r\nthe first part of the chunk");
    c.expect_silence(Duration::from_millis(100));
    drop(c);

    let mut c = connect_when_admitted(&server);
    assert!(server.queued().is_empty(), "{:?}", server.queued_ids());
    // The server is fine: the next message is the only one queued.
    c.expect("EHLO client.example", 250);
    let id = c.send_message("sender@example.org", &["user@localhost"], b"after\r\n");
    assert_eq!(server.queued_ids(), [id]);
}

/// "250 means on disk": a message acknowledged just before SIGKILL is in
/// the spool, and a restarted server (the lock died with the process)
/// recovers it.
#[test]
fn acknowledged_message_survives_sigkill() {
    let mut server = Server::start(&[]);
    let mut c = server.connect();
    c.hello("client.example");
    let id = c.send_message(
        "sender@example.org",
        &["user@localhost"],
        b"Subject: durable\r\n\r\nx\r\n",
    );
    server.signal(libc::SIGKILL);
    let status = server
        .wait_exit(EXIT_WITHIN)
        .expect("killed process is reaped");
    assert_eq!(status.code(), None, "{status}");
    assert_eq!(server.queued_ids(), std::slice::from_ref(&id));

    let restarted = Server::builder().spool_dir(server.spool_dir()).start();
    assert!(
        restarted.wait_for_log("messages=1", EXIT_WITHIN),
        "restart did not recover the message:\n{}",
        restarted.stderr()
    );
    assert_eq!(restarted.queued_ids(), std::slice::from_ref(&id));
    assert_eq!(
        restarted.message(&id).content(),
        b"Subject: durable\r\n\r\nx\r\n"
    );
}
