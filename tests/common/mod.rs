//! What the integration tests share: a real `ringmta` process on a temporary
//! spool ([`Server`]), a small blocking SMTP client ([`Client`]) and readers
//! for the queue ([`Queued`]).
//!
//! Everything here is bounded in time: the server must announce its port
//! within [`START_TIMEOUT`], every socket has read and write timeouts, and a
//! dropped [`Server`] is killed (SIGKILL if it still runs) and reaped. It
//! must never bind anything but 127.0.0.1 port 0, so tests can run in
//! parallel.

// Each test binary uses a different part of this module.
#![allow(dead_code)]

use std::fmt;
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use tempfile::TempDir;

/// How long a server may take to print its listening line.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Read and write timeout of every test socket.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// The `--hostname` every test server runs with.
pub const HOSTNAME: &str = "mx.test";

/// `ringmta listening KIND ADDR`, one line per listener.
const LISTENING: &str = "ringmta listening ";

/// Starts servers: `Server::builder().arg("--max-errors").arg("3").start()`.
#[derive(Debug, Clone)]
pub struct ServerBuilder {
    args: Vec<String>,
    /// `None`: ringmta's default (one shard per core).
    shards: Option<usize>,
    spool: Option<PathBuf>,
    envs: Vec<(String, String)>,
    /// Leave `--inbound-auth` to the configuration (file or default)
    /// instead of the harness's `off`.
    inbound_auth_as_configured: bool,
}

impl ServerBuilder {
    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.args.push(a.into());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets an environment variable of the server process (after the
    /// developer's `RINGMTA_*` variables were removed).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.envs.push((key.into(), value.into()));
        self
    }

    pub fn shards(mut self, n: usize) -> Self {
        self.shards = Some(n);
        self
    }

    /// No `--shards`: as many shards as ringmta picks by default (one per
    /// core but one), for tests that must hold with the defaults on any machine.
    pub fn default_shards(mut self) -> Self {
        self.shards = None;
        self
    }

    /// No `--inbound-auth off` from the harness: the `--config` file (or
    /// ringmta's default) decides, as for a key SIGHUP must be able to change.
    pub fn inbound_auth_as_configured(mut self) -> Self {
        self.inbound_auth_as_configured = true;
        self
    }

    /// Runs on this spool directory instead of a fresh one (which the
    /// caller keeps alive).
    pub fn spool_dir(mut self, dir: &Path) -> Self {
        self.spool = Some(dir.to_owned());
        self
    }

    /// Starts the server and waits for its port; panics with its stderr if
    /// it does not come up.
    pub fn start(self) -> Server {
        match self.try_start() {
            Ok(s) => s,
            Err(e) => panic!("ringmta did not start: {e}"),
        }
    }

    /// Starts the server; `Err` if it exits or stays silent instead of
    /// printing its listening line within [`START_TIMEOUT`].
    pub fn try_start(self) -> Result<Server, StartFailure> {
        let dir = tempfile::Builder::new()
            .prefix("ringmta-test-")
            .tempdir()
            .expect("create temp dir");
        let spool = self
            .spool
            .clone()
            .unwrap_or_else(|| dir.path().join("spool"));
        let stderr_path = dir.path().join("stderr.log");
        let stderr = fs::File::create(&stderr_path).expect("create stderr log");

        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ringmta"));
        let has = |flag: &str| self.args.iter().any(|a| a == flag);
        if !has("--smtp") {
            cmd.args(["--smtp", "127.0.0.1:0"]);
        }
        if !has("--hostname") {
            cmd.args(["--hostname", HOSTNAME]);
        }
        // Submission and implicit TLS on ephemeral ports too (the defaults
        // are fixed ports that parallel tests would fight over).
        let kind_enabled = |flag: &str| {
            let given = self.args.iter().position(|a| a == flag);
            given.is_none_or(|i| self.args.get(i + 1).is_some_and(|v| v != "none"))
        };
        let want_submission = kind_enabled("--submission");
        let want_smtps = kind_enabled("--smtps");
        let want_admin = kind_enabled("--admin");
        if !has("--submission") {
            cmd.args(["--submission", "127.0.0.1:0"]);
        }
        if !has("--smtps") {
            cmd.args(["--smtps", "127.0.0.1:0"]);
        }
        // The admin listener too (metrics at /metrics); its line comes last.
        if !has("--admin") {
            cmd.args(["--admin", "127.0.0.1:0"]);
        }
        // Outbound delivery stays on this machine: local mail goes into the
        // test's directory, everything else to a smarthost on loopback
        // (nothing listens on port 9: it stays queued) rather than to MX
        // hosts found through the system resolver.
        if !has("--maildir") {
            cmd.arg("--maildir").arg(dir.path().join("maildir"));
        }
        // Tests look at what was accepted and queued; those about
        // delivery say where mail goes (a route, smarthost or DNS server).
        let delivers = ["--route", "--relay-host", "--dns-server"]
            .iter()
            .any(|f| has(f));
        if !delivers {
            cmd.arg("--no-delivery");
        }
        // Verification of inbound mail (on by default in the product) asks
        // DNS for every message and adds a header: the tests of it turn it
        // on (`--inbound-auth on`, with their own DNS server); elsewhere it
        // would only reach out to the system resolver.
        if !has("--inbound-auth") && !self.inbound_auth_as_configured {
            cmd.args(["--inbound-auth", "off"]);
        }
        cmd.arg("--spool-dir").arg(&spool);
        if let Some(n) = self.shards {
            cmd.args(["--shards", &n.to_string()]);
        }
        cmd.args(&self.args);
        // Flags come from the test alone, not from the developer's shell.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("RINGMTA_") {
                cmd.env_remove(k);
            }
        }
        cmd.envs(self.envs.iter().map(|(k, v)| (k, v)));
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr));
        let mut child = cmd.spawn().expect("spawn ringmta");

        // stdout is read on a thread so the wait for it can be bounded.
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });

        let deadline = Instant::now() + START_TIMEOUT;
        let failure = |child: &mut Child, reason: String| {
            // Give an exiting process a moment to finish writing stderr.
            let status = wait_with_timeout(child, Duration::from_secs(2));
            if status.is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
            StartFailure {
                status,
                stderr: strip_ansi(&fs::read_to_string(&stderr_path).unwrap_or_default()),
                reason,
            }
        };
        let (mut smtp, mut submission, mut smtps, mut admin) = (None, None, None, None);
        loop {
            let complete = smtp.is_some()
                && (submission.is_some() || !want_submission)
                && (smtps.is_some() || !want_smtps)
                && (admin.is_some() || !want_admin);
            if let (true, Some(addr)) = (complete, smtp) {
                return Ok(Server {
                    child,
                    addr,
                    port: addr.port(),
                    submission,
                    smtps,
                    admin,
                    spool,
                    stderr_path,
                    _dir: dir,
                });
            }
            match rx.recv_timeout(Duration::from_millis(20)) {
                Ok(line) => {
                    let parsed = line.strip_prefix(LISTENING).and_then(|rest| {
                        let (kind, addr) = rest.split_once(' ')?;
                        Some((kind.to_owned(), addr.trim().parse::<SocketAddr>().ok()?))
                    });
                    let slot = match &parsed {
                        Some((k, _)) if k == "smtp" => &mut smtp,
                        Some((k, _)) if k == "submission" => &mut submission,
                        Some((k, _)) if k == "smtps" => &mut smtps,
                        Some((k, _)) if k == "admin" => &mut admin,
                        _ => {
                            return Err(failure(
                                &mut child,
                                format!("unexpected stdout line {line:?}"),
                            ))
                        }
                    };
                    // The first listener of each kind is the one tests use.
                    if slot.is_none() {
                        *slot = parsed.map(|(_, a)| a);
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(failure(
                        &mut child,
                        "stdout closed before the listening line".into(),
                    ));
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Ok(Some(_)) = child.try_wait() {
                        return Err(failure(&mut child, "exited before listening".into()));
                    }
                    if Instant::now() >= deadline {
                        return Err(failure(
                            &mut child,
                            format!("no listening line within {START_TIMEOUT:?}"),
                        ));
                    }
                }
            }
        }
    }
}

/// Why a server did not come up.
pub struct StartFailure {
    /// The exit status, if the process exited.
    pub status: Option<ExitStatus>,
    pub stderr: String,
    pub reason: String,
}

impl fmt::Display for StartFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (status {:?})\n--- stderr ---\n{}",
            self.reason, self.status, self.stderr
        )
    }
}

impl fmt::Debug for StartFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A running `ringmta`. Dropping it kills and reaps the process.
pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    pub port: u16,
    /// The submission listener (`None` under `--submission none`).
    pub submission: Option<SocketAddr>,
    /// The implicit-TLS listener (`None` under `--smtps none`).
    pub smtps: Option<SocketAddr>,
    /// The admin HTTP listener (`None` under `--admin none`).
    pub admin: Option<SocketAddr>,
    spool: PathBuf,
    stderr_path: PathBuf,
    // Last: the directory outlives nothing above that points into it.
    _dir: TempDir,
}

impl Server {
    pub fn builder() -> ServerBuilder {
        ServerBuilder {
            args: Vec::new(),
            shards: Some(1),
            spool: None,
            envs: Vec::new(),
            inbound_auth_as_configured: false,
        }
    }

    /// One shard, default flags plus `args`.
    pub fn start(args: &[&str]) -> Server {
        Server::builder().args(args.iter().copied()).start()
    }

    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("pid fits in pid_t")
    }

    /// The server's resident memory now and at its peak, in KiB (`VmRSS`
    /// and `VmHWM` of `/proc/PID/status`).
    pub fn memory_kib(&self) -> (u64, u64) {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read /proc/PID/status");
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .unwrap_or_else(|| panic!("no {name} in /proc/PID/status"))
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    /// Sends `sig` (e.g. `libc::SIGTERM`) to the server.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) with the pid of a child we have not reaped yet, so
        // the pid cannot have been reused.
        let rc = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(
            rc,
            0,
            "kill({}, {sig}): {}",
            self.pid(),
            io::Error::last_os_error()
        );
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_with_timeout(&mut self.child, timeout)
    }

    /// Waits for the exit and asserts it was a clean exit 0.
    pub fn assert_exits_cleanly(&mut self, timeout: Duration) {
        match self.wait_exit(timeout) {
            Some(s) if s.success() => {}
            Some(s) => panic!("ringmta exited with {s}\n--- stderr ---\n{}", self.stderr()),
            None => panic!(
                "ringmta still running after {timeout:?}\n--- stderr ---\n{}",
                self.stderr()
            ),
        }
    }

    /// Everything the server logged so far, without terminal colours.
    /// The log so far, once it has settled: ringmta's log writer thread
    /// writes lines in batches up to 10 ms apart (`ringmta::logwriter`),
    /// so a line about what the test just did may still be on its way.
    pub fn stderr(&self) -> String {
        let read = || fs::read_to_string(&self.stderr_path).unwrap_or_default();
        let mut text = read();
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            std::thread::sleep(Duration::from_millis(25));
            let now = read();
            if now.len() == text.len() || Instant::now() >= deadline {
                return strip_ansi(&now);
            }
            text = now;
        }
    }

    /// Waits until the log contains `needle`; false after `timeout`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.stderr().contains(needle) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn spool_dir(&self) -> &Path {
        &self.spool
    }

    /// Ids of the queued messages, in the order the spool returns them
    /// (arrival order within a shard).
    pub fn queued_ids(&self) -> Vec<String> {
        self.queued().into_iter().map(|q| q.id).collect()
    }

    /// Every queued message, decoded; panics on one that does not decode.
    pub fn queued(&self) -> Vec<Queued> {
        read_spool(&self.spool)
    }

    /// The queued message with this id.
    pub fn message(&self, id: &str) -> Queued {
        self.queued()
            .into_iter()
            .find(|q| q.id == id)
            .unwrap_or_else(|| panic!("no queued message {id}"))
    }

    /// The last message the spool returns (the newest, with one shard).
    pub fn newest(&self) -> Option<Queued> {
        self.queued().pop()
    }

    pub fn connect(&self) -> Client {
        Client::connect(self.addr)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Removes ANSI escape sequences (`ESC [ ... final-byte`) from a log.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

fn wait_with_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => return None,
        }
    }
}

/// Every message in the spool at `root`, through the library's own reader
/// (the one place that knows the on-disk layout).
pub fn read_spool(root: &Path) -> Vec<Queued> {
    let msgs = ringmta::spool::read_queue(root)
        .unwrap_or_else(|e| panic!("read spool {}: {e}", root.display()));
    msgs.iter()
        .map(|m| {
            let env = m
                .decoded()
                .unwrap_or_else(|| panic!("envelope does not decode: {:?}", m.envelope));
            let trace_len = trace_header_len(&m.message).unwrap_or_else(|| {
                panic!(
                    "message {} does not start with a Received header: {:?}",
                    env.id,
                    String::from_utf8_lossy(&m.message[..m.message.len().min(300)])
                )
            });
            Queued {
                id: env.id.to_owned(),
                mail_from: env.mail_from.map(str::to_owned),
                rcpts: env.rcpts.iter().map(|r| (*r).to_owned()).collect(),
                lines: env.lines.iter().map(|l| (*l).to_owned()).collect(),
                message: m.message.clone(),
                trace_len,
            }
        })
        .collect()
}

/// One queued message, decoded.
#[derive(Debug, Clone)]
pub struct Queued {
    pub id: String,
    /// `None` for the null reverse-path.
    pub mail_from: Option<String>,
    pub rcpts: Vec<String>,
    /// The envelope lines after the magic line.
    pub lines: Vec<String>,
    /// Trace header and content.
    pub message: Vec<u8>,
    /// Length of our `Received:` header at the start of `message`.
    trace_len: usize,
}

impl Queued {
    /// Our `Received:` header, folded lines and final CRLF included.
    pub fn received(&self) -> &str {
        std::str::from_utf8(&self.message[..self.trace_len]).expect("trace header is ASCII")
    }

    /// The content as the client sent it (unstuffed), after the trace header.
    pub fn content(&self) -> &[u8] {
        &self.message[self.trace_len..]
    }

    pub fn has_line(&self, line: &str) -> bool {
        self.lines.iter().any(|l| l == line)
    }
}

/// Length of the leading `Received:` header field (with its folded lines).
fn trace_header_len(message: &[u8]) -> Option<usize> {
    if !message.starts_with(b"Received: ") {
        return None;
    }
    let mut pos = 0;
    loop {
        let eol = memchr_crlf(&message[pos..])? + pos + 2;
        pos = eol;
        match message.get(pos) {
            Some(b' ' | b'\t') => continue,
            _ => return Some(pos),
        }
    }
}

fn memchr_crlf(s: &[u8]) -> Option<usize> {
    s.windows(2).position(|w| w == b"\r\n")
}

/// Asserts the trace header's shape: `from HELO ([IP])`, `by mx.test
/// (ringmta) with PROTO id ID`, and a date the server took between `before`
/// and `after` (rendered by the server's own RFC 5322 formatter).
pub fn assert_received(q: &Queued, helo: &str, proto: &str, before: SystemTime, after: SystemTime) {
    let r = q.received();
    let head = format!(
        "Received: from {helo} ([127.0.0.1])\r\n\tby {HOSTNAME} (ringmta) with {proto} id {}",
        q.id
    );
    assert!(
        r.starts_with(&head),
        "trace header {r:?} does not start with {head:?}"
    );
    assert!(
        r.contains(&format!("by {HOSTNAME} (ringmta) with {proto}")),
        "{r:?}"
    );
    let date = r
        .trim_end_matches("\r\n")
        .rsplit_once(";\r\n\t")
        .map(|(_, d)| d)
        .unwrap_or_else(|| panic!("no date in trace header {r:?}"));
    let from = before - Duration::from_secs(1);
    let secs = after.duration_since(from).unwrap_or_default().as_secs() + 2;
    let ok = (0..=secs)
        .any(|s| ringmta::smtp::envelope::rfc5322_date(from + Duration::from_secs(s)) == date);
    assert!(
        ok,
        "trace header date {date:?} is not a time during the test"
    );
}

/// One reply: every line without its CRLF.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub lines: Vec<String>,
}

impl Reply {
    /// The last line (the whole reply for single-line replies).
    pub fn last(&self) -> &str {
        self.lines.last().map(String::as_str).unwrap_or("")
    }

    pub fn is(&self, line: &str) -> bool {
        self.lines.len() == 1 && self.lines[0] == line
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.lines.join("\n"))
    }
}

/// A blocking SMTP client over `TcpStream`, for speaking raw bytes.
pub struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        Client::try_connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"))
    }

    pub fn try_connect(addr: SocketAddr) -> io::Result<Client> {
        Client::with_stream(TcpStream::connect_timeout(&addr, IO_TIMEOUT)?)
    }

    /// Connects from `source` (any 127/8 address works on loopback), for
    /// tests that need clients on different addresses.
    pub fn connect_from(addr: SocketAddr, source: std::net::IpAddr) -> Client {
        let connect = || -> io::Result<Client> {
            let domain = socket2::Domain::for_address(addr);
            let socket = socket2::Socket::new(domain, socket2::Type::STREAM, None)?;
            socket.bind(&SocketAddr::new(source, 0).into())?;
            socket.connect_timeout(&addr.into(), IO_TIMEOUT)?;
            Client::with_stream(socket.into())
        };
        connect().unwrap_or_else(|e| panic!("connect {addr} from {source}: {e}"))
    }

    fn with_stream(stream: TcpStream) -> io::Result<Client> {
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        stream.set_nodelay(true)?;
        Ok(Client {
            stream,
            buf: Vec::new(),
        })
    }

    pub fn set_read_timeout(&mut self, t: Duration) {
        self.stream
            .set_read_timeout(Some(t))
            .expect("set read timeout");
    }

    /// Writes `bytes` in one write call (as one batch, for pipelining).
    pub fn try_send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)?;
        self.stream.flush()
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.try_send(bytes)
            .unwrap_or_else(|e| panic!("send {:?}: {e}", String::from_utf8_lossy(bytes)));
    }

    /// Sends `line` followed by CRLF.
    pub fn line(&mut self, line: &str) {
        let mut b = Vec::with_capacity(line.len() + 2);
        b.extend_from_slice(line.as_bytes());
        b.extend_from_slice(b"\r\n");
        self.send(&b);
    }

    /// Reads one line; it must end in CRLF (returned without it).
    pub fn read_line(&mut self) -> io::Result<Vec<u8>> {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.buf.drain(..=i).collect();
                line.pop();
                if line.pop() != Some(b'\r') {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "reply line without CRLF: {:?}",
                            String::from_utf8_lossy(&line)
                        ),
                    ));
                }
                return Ok(line);
            }
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!(
                            "connection closed (pending {:?})",
                            String::from_utf8_lossy(&self.buf)
                        ),
                    ))
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads one complete reply: lines until one with a space after the code.
    pub fn try_reply(&mut self) -> io::Result<Reply> {
        let mut lines = Vec::new();
        let mut code = None;
        loop {
            let raw = self.read_line()?;
            let line = String::from_utf8(raw).map_err(|e| {
                io::Error::new(io::ErrorKind::InvalidData, format!("reply not UTF-8: {e}"))
            })?;
            let b = line.as_bytes();
            let well_formed = b.len() >= 3
                && b[..3].iter().all(u8::is_ascii_digit)
                && matches!(b.get(3), None | Some(b' ' | b'-'));
            if !well_formed {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("malformed reply line {line:?}"),
                ));
            }
            let c: u16 = line[..3].parse().expect("three digits");
            if *code.get_or_insert(c) != c {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("reply code changed within a reply: {line:?}"),
                ));
            }
            let more = b.get(3) == Some(&b'-');
            lines.push(line);
            if !more {
                return Ok(Reply { code: c, lines });
            }
        }
    }

    pub fn reply(&mut self) -> Reply {
        self.try_reply()
            .unwrap_or_else(|e| panic!("reading a reply: {e}"))
    }

    /// Sends `line` + CRLF and reads the reply.
    pub fn cmd(&mut self, line: &str) -> Reply {
        self.line(line);
        self.reply()
    }

    /// Sends `line` + CRLF and asserts the reply code.
    pub fn expect(&mut self, line: &str, code: u16) -> Reply {
        let r = self.cmd(line);
        assert_eq!(r.code, code, "{line:?} got {r}");
        r
    }

    /// Reads the greeting and asserts it is the 220 of our server.
    pub fn greeting(&mut self) -> Reply {
        let r = self.reply();
        assert!(
            r.is(&format!("220 {HOSTNAME} ESMTP ringmta")),
            "greeting {r}"
        );
        r
    }

    /// Greeting, then EHLO.
    pub fn hello(&mut self, name: &str) -> Reply {
        self.greeting();
        self.expect(&format!("EHLO {name}"), 250)
    }

    /// MAIL, RCPTs, DATA with `content` (dot-stuffed here, terminated here);
    /// returns the queue id from the 250.
    pub fn send_message(&mut self, from: &str, rcpts: &[&str], content: &[u8]) -> String {
        self.expect(&format!("MAIL FROM:<{from}>"), 250);
        for r in rcpts {
            self.expect(&format!("RCPT TO:<{r}>"), 250);
        }
        self.expect("DATA", 354);
        self.send(&dot_stuff(content));
        queued_id(&self.reply())
    }

    /// Asserts the server closes the connection without sending anything
    /// more (EOF or reset) within the read timeout.
    pub fn expect_closed(&mut self) {
        if let Err(e) = self.check_closed() {
            panic!("{e}");
        }
    }

    /// `Err` unless the server closes the connection without sending
    /// anything more (EOF or reset) within the read timeout.
    pub fn check_closed(&mut self) -> Result<(), String> {
        let mut chunk = [0u8; 1024];
        loop {
            if !self.buf.is_empty() {
                return Err(format!(
                    "expected the connection to close, got {:?}",
                    String::from_utf8_lossy(&self.buf)
                ));
            }
            match self.stream.read(&mut chunk) {
                Ok(0) => return Ok(()),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("expected the connection to close: {e}")),
            }
        }
    }

    /// Asserts nothing arrives for `d` (and the connection stays open).
    pub fn expect_silence(&mut self, d: Duration) {
        if let Err(e) = self.check_silence(d) {
            panic!("{e}");
        }
    }

    /// `Err` if anything arrives within `d`, or the connection closes.
    pub fn check_silence(&mut self, d: Duration) -> Result<(), String> {
        if !self.buf.is_empty() {
            return Err(format!(
                "unexpected server output {:?}",
                String::from_utf8_lossy(&self.buf)
            ));
        }
        self.stream
            .set_read_timeout(Some(d))
            .expect("set read timeout");
        let mut chunk = [0u8; 1024];
        let r = self.stream.read(&mut chunk);
        self.stream
            .set_read_timeout(Some(IO_TIMEOUT))
            .expect("set read timeout");
        match r {
            Ok(0) => Err("connection closed while expecting silence".into()),
            Ok(n) => Err(format!(
                "unexpected server output {:?}",
                String::from_utf8_lossy(&chunk[..n])
            )),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(format!("expecting silence: {e}")),
        }
    }

    /// The socket, for tests that write raw content from another thread.
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// Closes the write side: the server sees EOF.
    pub fn shutdown_write(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
    }
}

/// The id of `250 2.0.0 Ok: queued as ID`; panics on any other reply.
pub fn queued_id(r: &Reply) -> String {
    r.last()
        .strip_prefix("250 2.0.0 Ok: queued as ")
        .filter(|_| r.lines.len() == 1)
        .unwrap_or_else(|| panic!("expected 250 queued, got {r}"))
        .to_owned()
}

/// DATA wire form of `content` (which must end in CRLF, or be empty): every
/// line beginning with '.' gets another, then the `.` CRLF terminator.
pub fn dot_stuff(content: &[u8]) -> Vec<u8> {
    assert!(
        content.is_empty() || content.ends_with(b"\r\n"),
        "content must end in CRLF"
    );
    let mut out = Vec::with_capacity(content.len() + 16);
    let mut at_line_start = true;
    for &b in content {
        if at_line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        at_line_start = b == b'\n';
    }
    out.extend_from_slice(b".\r\n");
    out
}

/// Finds a real peer program (swaks, smtp-source) on PATH or in
/// /usr/sbin. `None` means "skip": only allowed when RINGMTA_SKIP_PEERS=1;
/// otherwise a missing peer fails the test with instructions.
pub fn peer_program(name: &str, package: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file());
    if found.is_some() {
        return found;
    }
    if std::env::var("RINGMTA_SKIP_PEERS").as_deref() == Ok("1") {
        eprintln!("SKIPPED: {name} is not installed and RINGMTA_SKIP_PEERS=1");
        return None;
    }
    panic!(
        "{name} is not installed: `apt-get install {package}` (.ci/run does), \
         or set RINGMTA_SKIP_PEERS=1 to skip the tests that need real peers"
    );
}

/// What a peer program did: its exit status and output.
#[derive(Debug)]
pub struct PeerRun {
    pub pid: u32,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `program args`, killing it after `timeout`; output goes to files so
/// nothing can block on a full pipe.
pub fn run_peer(program: &Path, args: &[&str], timeout: Duration) -> PeerRun {
    let dir = tempfile::tempdir().expect("temp dir");
    let out_path = dir.path().join("stdout");
    let err_path = dir.path().join("stderr");
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out_path).expect("stdout file"))
        .stderr(fs::File::create(&err_path).expect("stderr file"))
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", program.display()));
    let pid = child.id();
    let status = wait_with_timeout(&mut child, timeout);
    let status = match status {
        Some(s) => s,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{} {args:?} did not finish within {timeout:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                program.display(),
                fs::read_to_string(&out_path).unwrap_or_default(),
                fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
    };
    PeerRun {
        pid,
        status,
        stdout: String::from_utf8_lossy(&fs::read(&out_path).unwrap_or_default()).into_owned(),
        stderr: String::from_utf8_lossy(&fs::read(&err_path).unwrap_or_default()).into_owned(),
    }
}

/// [`run_peer`] with `input` on the program's standard input.
pub fn run_peer_with_input(
    program: &Path,
    args: &[&str],
    input: &[u8],
    timeout: Duration,
) -> PeerRun {
    let dir = tempfile::tempdir().expect("temp dir");
    let in_path = dir.path().join("stdin");
    fs::write(&in_path, input).expect("stdin file");
    let out_path = dir.path().join("stdout");
    let err_path = dir.path().join("stderr");
    let mut child = Command::new(program)
        .args(args)
        .stdin(fs::File::open(&in_path).expect("stdin file"))
        .stdout(fs::File::create(&out_path).expect("stdout file"))
        .stderr(fs::File::create(&err_path).expect("stderr file"))
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", program.display()));
    let pid = child.id();
    let Some(status) = wait_with_timeout(&mut child, timeout) else {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "{} {args:?} did not finish within {timeout:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            program.display(),
            fs::read_to_string(&out_path).unwrap_or_default(),
            fs::read_to_string(&err_path).unwrap_or_default()
        );
    };
    PeerRun {
        pid,
        status,
        stdout: String::from_utf8_lossy(&fs::read(&out_path).unwrap_or_default()).into_owned(),
        stderr: String::from_utf8_lossy(&fs::read(&err_path).unwrap_or_default()).into_owned(),
    }
}

/// The body of `GET path` from an HTTP server at `addr` (the admin
/// listener); panics unless the answer is 200.
pub fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("connect to the admin listener");
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read the answer");
    let (head, body) = out.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    body.to_owned()
}

/// The sum of the samples of metric `name` in the Prometheus text `text`
/// that carry every one of `labels` (`key="value"` each).
pub fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let (series, value) = rest.rsplit_once(' ')?;
            if !(series.is_empty() || series.starts_with('{')) {
                return None; // a longer name
            }
            labels
                .iter()
                .all(|want| series.contains(want))
                .then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// A TLS client's certificate verifier for tests against ringmta's
/// self-signed certificate: accepts any certificate (the signatures are
/// still checked) and remembers the one presented.
#[derive(Debug)]
pub struct AnyCert {
    seen: std::sync::Mutex<Option<Vec<u8>>>,
    provider: std::sync::Arc<rustls::crypto::CryptoProvider>,
}

impl AnyCert {
    pub fn new(provider: std::sync::Arc<rustls::crypto::CryptoProvider>) -> AnyCert {
        AnyCert {
            seen: std::sync::Mutex::new(None),
            provider,
        }
    }

    /// The end-entity certificate of the last handshake, if any.
    pub fn take_seen(&self) -> Option<Vec<u8>> {
        self.seen.lock().unwrap().take()
    }
}

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        *self.seen.lock().unwrap() = Some(end_entity.to_vec());
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A child process, killed and reaped when dropped.
pub struct Reaped(pub Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// dnsmasq on a free loopback port, answering for `.test` from `args`
/// alone (NXDOMAIN or NODATA for every other `.test` name, never
/// forwarding anywhere), with `ttl` seconds on its answers (0, dnsmasq's
/// own default, makes nothing cacheable). Returned once it answers a query;
/// `None` when dnsmasq is missing and the peers may be skipped.
pub fn dnsmasq(args: &[String], ttl: u32) -> Option<(Reaped, u16)> {
    let bin = peer_program("dnsmasq", "dnsmasq-base")?;
    let port = free_port();
    let mut cmd = Command::new(bin);
    cmd.args([
        "--keep-in-foreground",
        "--no-resolv",
        "--no-hosts",
        "--no-daemon",
        "--bind-interfaces",
        "--local=/test/",
        "--listen-address=127.0.0.1",
        "--user=root",
        "--pid-file",
        "--log-facility=-",
    ])
    .arg(format!("--local-ttl={ttl}"))
    .arg(format!("--port={port}"))
    .args(args)
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    let child = Reaped(cmd.spawn().expect("dnsmasq starts"));
    if dns_answers(port) {
        return Some((child, port));
    }
    panic!("dnsmasq did not answer on port {port}");
}

/// Whether a DNS server on 127.0.0.1:`port` answers (a query for
/// `probe.test`, whatever the answer) within about ten seconds: a server
/// just started is ready.
pub fn dns_answers(port: u16) -> bool {
    let probe = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    probe
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let query = [
        0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 5, b'p', b'r', b'o', b'b', b'e', 4, b't', b'e',
        b's', b't', 0, 0, 1, 0, 1,
    ];
    for _ in 0..50 {
        let _ = probe.send_to(&query, ("127.0.0.1", port));
        let mut buf = [0u8; 512];
        if probe.recv(&mut buf).is_ok() {
            return true;
        }
    }
    false
}

/// A port that was free on 127.0.0.1 when asked.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
