//! The admin HTTP listener (`--admin`, default `127.0.0.1:9525`): a small
//! HTTP/1.1 responder on threads of its own, outside the shards, serving
//! [`crate::metrics`] at `GET /metrics`, the JSON queue-control API
//! under `/api/v1/` ([`api`]; [`client`] is the blocking client
//! `ringmta queue` uses) and HTTP injection at `POST /v1/inject`
//! ([`inject`]).
//!
//! Routes are a table of (method, path) → handler ([`Router`]), so that
//! more endpoints join by adding a line. Every connection is bounded: the
//! request head is read with a timeout and refused past
//! [`MAX_REQUEST`] bytes, a body past [`MAX_BODY`] (or the route's own
//! limit, [`Router::body_limit`]) or not in within [`BODY_TIMEOUT`], the answer written
//! with a timeout, one request per connection (`Connection: close`), and
//! at most [`MAX_CLIENTS`] served at once (more get 503). It must never
//! touch a shard's state: metrics are what the shards publish (atomics),
//! and the API sends each shard a command over a bounded channel and
//! waits, with a timeout, for its answer.

pub mod api;
pub mod client;
pub mod inject;

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;

/// The largest request head read; a longer one is answered 431.
pub const MAX_REQUEST: usize = 8 << 10;
/// The largest request body read (the API's JSON); a larger one is
/// answered 413.
pub const MAX_BODY: usize = 64 << 10;
/// Connections served at once; more are answered 503 at once.
pub const MAX_CLIENTS: usize = 8;
/// How long a client may take to send its request, and to read the answer.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client may take to send a whole body (each read within
/// [`IO_TIMEOUT`] besides).
pub const BODY_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Error)]
pub enum AdminError {
    #[error(
        "cannot listen on {addr} for --admin: {source} (choose another address, or --admin none)"
    )]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("cannot start the admin thread: {0}")]
    Thread(io::Error),
}

/// An answer: status, content type and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

impl Response {
    pub fn text(status: u16, body: impl Into<Vec<u8>>) -> Response {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }

    pub fn json(status: u16, value: &impl serde::Serialize) -> Response {
        let mut body = serde_json::to_vec_pretty(value).unwrap_or_default();
        body.push(b'\n');
        Response {
            status,
            content_type: "application/json",
            body,
        }
    }

    /// `{"error": why}`.
    pub fn error(status: u16, why: &str) -> Response {
        Response::json(status, &serde_json::json!({ "error": why }))
    }
}

/// A parsed request head: what the routes see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The path, without the query string.
    pub path: String,
    /// The query string after `?`, if any (undecoded).
    pub query: Option<String>,
    /// The `Authorization` header's value, if any.
    pub authorization: Option<String>,
    /// The body (`Content-Length` octets, at most [`MAX_BODY`] or the
    /// route's own limit, [`Router::body_limit`]).
    pub body: Vec<u8>,
    /// The client's address (`None` in tests that make requests by hand).
    pub peer: Option<SocketAddr>,
}

type Handler = Box<dyn Fn(&Request) -> Response + Send + Sync>;

/// Path → handler. A path with a handler for another method answers 405.
/// A route whose path ends in `/` takes every path under it (the longest
/// such prefix wins after the exact paths).
#[derive(Default)]
pub struct Router {
    routes: Vec<(&'static str, &'static str, Handler)>,
    /// Paths whose bodies may be larger than [`MAX_BODY`].
    body_limits: Vec<(&'static str, usize)>,
}

impl Router {
    /// The routes ringmta serves: `GET /metrics`.
    pub fn standard() -> Router {
        Router::default().route("GET", "/metrics", |_| Response {
            status: 200,
            content_type: crate::metrics::CONTENT_TYPE,
            body: crate::metrics::encode().into_bytes(),
        })
    }

    pub fn route(
        mut self,
        method: &'static str,
        path: &'static str,
        handler: impl Fn(&Request) -> Response + Send + Sync + 'static,
    ) -> Router {
        self.routes.push((method, path, Box::new(handler)));
        self
    }

    /// Lets requests to exactly `path` carry bodies of up to `limit`
    /// octets (read within [`BODY_TIMEOUT`]).
    pub fn body_limit(mut self, path: &'static str, limit: usize) -> Router {
        self.body_limits.push((path, limit));
        self
    }

    fn max_body(&self, path: &str) -> usize {
        self.body_limits
            .iter()
            .find(|(p, _)| *p == path)
            .map_or(MAX_BODY, |(_, n)| (*n).max(MAX_BODY))
    }

    pub fn handle(&self, req: &Request) -> Response {
        let exact = self.routes.iter().any(|(_, p, _)| *p == req.path);
        let prefix = self
            .routes
            .iter()
            .filter(|(_, p, _)| p.ends_with('/') && req.path.starts_with(p) && req.path != *p)
            .map(|(_, p, _)| p.len())
            .max();
        let mut path_known = false;
        for (method, path, handler) in &self.routes {
            let hit = if exact {
                *path == req.path
            } else {
                prefix == Some(path.len()) && req.path.starts_with(path)
            };
            if hit {
                // HEAD is GET without the body (stripped when written).
                if *method == req.method || (*method == "GET" && req.method == "HEAD") {
                    return handler(req);
                }
                path_known = true;
            }
        }
        if path_known {
            Response::text(405, "method not allowed\n")
        } else {
            Response::text(404, "not found\n")
        }
    }
}

/// Binds `addr` (a clear error when it cannot) and serves `router` on a
/// thread of its own until the process ends. Returns the bound address
/// (port 0 resolved).
pub fn start(addr: SocketAddr, router: Router) -> Result<SocketAddr, AdminError> {
    let listener = TcpListener::bind(addr).map_err(|source| AdminError::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| AdminError::Bind { addr, source })?;
    let router = Arc::new(router);
    std::thread::Builder::new()
        .name("admin".into())
        .spawn(move || accept_loop(listener, router))
        .map_err(AdminError::Thread)?;
    Ok(bound)
}

fn accept_loop(listener: TcpListener, router: Arc<Router>) {
    let busy = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        let mut stream = match stream {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "admin: accept failed");
                // Out of descriptors or similar: back off, do not spin.
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
        let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
        if busy.fetch_add(1, Ordering::AcqRel) >= MAX_CLIENTS {
            busy.fetch_sub(1, Ordering::AcqRel);
            let _ = write_response(&mut stream, &Response::text(503, "busy\n"), false);
            continue;
        }
        let (router, guard) = (router.clone(), Busy(busy.clone()));
        let spawned = std::thread::Builder::new()
            .name("admin-conn".into())
            .spawn(move || {
                let _guard = guard;
                // A panicking handler costs its connection, not the listener.
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    serve(&mut stream, &router)
                }));
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "admin: cannot start a connection thread");
        }
    }
}

/// Gives back a connection slot when its thread ends.
struct Busy(Arc<AtomicUsize>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn serve(stream: &mut TcpStream, router: &Router) {
    let answer = match read_head(stream) {
        Ok((head, rest)) => match parse_head(&head) {
            Some(mut req) => match read_body(stream, &head, rest, router.max_body(&req.path)) {
                Ok(body) => {
                    req.body = body;
                    req.peer = stream.peer_addr().ok();
                    let resp = router.handle(&req);
                    Some((resp, req.method != "HEAD"))
                }
                Err(BodyError::TooLarge) => Some((Response::error(413, "body too large"), true)),
                Err(BodyError::Bad(why)) => Some((Response::error(400, why), true)),
                Err(BodyError::Io) => None,
            },
            None => Some((Response::text(400, "bad request\n"), true)),
        },
        Err(HeadError::TooLarge) => Some((Response::text(431, "request too large\n"), true)),
        Err(HeadError::Io) => None,
    };
    if let Some((resp, body)) = answer {
        let _ = write_response(stream, &resp, body);
    }
    // Close our side, then read what the client may still send (a request
    // we stopped reading), bounded: closing with unread input would reset
    // the connection and could destroy the answer in flight.
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut sink = [0u8; 4096];
    let mut left = 64usize << 10;
    while let Ok(n @ 1..) = stream.read(&mut sink) {
        left = left.saturating_sub(n);
        if left == 0 {
            break;
        }
    }
}

enum HeadError {
    TooLarge,
    /// Closed, timed out, or failed: nothing to answer.
    Io,
}

enum BodyError {
    TooLarge,
    Bad(&'static str),
    Io,
}

/// Reads the body the head announces (`Content-Length`, at most `max`;
/// no chunked bodies) within [`BODY_TIMEOUT`], `rest` being what came
/// after the head already.
fn read_body(
    stream: &mut TcpStream,
    head: &[u8],
    mut rest: Vec<u8>,
    max: usize,
) -> Result<Vec<u8>, BodyError> {
    let len = match header(head, "content-length") {
        None => 0,
        Some(v) => v
            .trim()
            .parse::<usize>()
            .map_err(|_| BodyError::Bad("bad Content-Length"))?,
    };
    if header(head, "transfer-encoding").is_some() {
        return Err(BodyError::Bad(
            "Transfer-Encoding is not accepted: send Content-Length",
        ));
    }
    if len > max {
        return Err(BodyError::TooLarge);
    }
    // curl asks before a large body (RFC 9110 10.1.1): say go on at once
    // rather than let it wait a second for an answer.
    let expects = header(head, "expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
    if expects && rest.len() < len {
        stream
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .map_err(|_| BodyError::Io)?;
    }
    let deadline = std::time::Instant::now() + BODY_TIMEOUT;
    rest.reserve(len.saturating_sub(rest.len()));
    let mut chunk = [0u8; 16384];
    while rest.len() < len {
        if std::time::Instant::now() > deadline {
            return Err(BodyError::Io);
        }
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return Err(BodyError::Io),
            Ok(n) => rest.extend_from_slice(&chunk[..n]),
        }
    }
    rest.truncate(len);
    Ok(rest)
}

/// The value of the first header `name` (any case) in `head`.
fn header<'a>(head: &'a [u8], name: &str) -> Option<&'a str> {
    std::str::from_utf8(head)
        .ok()?
        .split("\r\n")
        .skip(1)
        .find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
}

/// Reads up to the blank line that ends the head; returns it and what
/// was read after it (the start of a body).
fn read_head(stream: &mut TcpStream) -> Result<(Vec<u8>, Vec<u8>), HeadError> {
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return Err(HeadError::Io),
            Ok(n) => n,
        };
        let from = head.len().saturating_sub(3);
        head.extend_from_slice(&chunk[..n]);
        if let Some(end) = memchr::memmem::find(&head[from..], b"\r\n\r\n") {
            let rest = head.split_off(from + end + 4);
            head.truncate(from + end);
            return Ok((head, rest));
        }
        if head.len() > MAX_REQUEST {
            return Err(HeadError::TooLarge);
        }
    }
}

/// The request line of `head`: `METHOD SP TARGET SP HTTP/1.x`.
pub fn parse_head(head: &[u8]) -> Option<Request> {
    let line_end = memchr::memmem::find(head, b"\r\n").unwrap_or(head.len());
    let line = std::str::from_utf8(&head[..line_end]).ok()?;
    let mut parts = line.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some()
        || !version.starts_with("HTTP/1.")
        || method.is_empty()
        || !method.bytes().all(|b| b.is_ascii_uppercase())
        || !target.starts_with('/')
    {
        return None;
    }
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q.to_owned())),
        None => (target, None),
    };
    Some(Request {
        method: method.to_owned(),
        path: path.to_owned(),
        query,
        authorization: header(head, "authorization").map(str::to_owned),
        body: Vec::new(),
        peer: None,
    })
}

fn write_response(stream: &mut TcpStream, resp: &Response, body: bool) -> io::Result<()> {
    let reason = match resp.status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        413 => "Content Too Large",
        422 => "Unprocessable Content",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        507 => "Insufficient Storage",
        _ => "",
    };
    let challenge = if resp.status == 401 {
        "WWW-Authenticate: Bearer realm=\"ringmta\"\r\n"
    } else {
        ""
    };
    let mut out = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{challenge}Connection: close\r\n\r\n",
        resp.status,
        resp.content_type,
        resp.body.len()
    )
    .into_bytes();
    if body {
        out.extend_from_slice(&resp.body);
    }
    stream.write_all(&out)?;
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines() {
        let r = parse_head(b"GET /metrics HTTP/1.1\r\nHost: x").unwrap();
        assert_eq!(
            (r.method.as_str(), r.path.as_str(), r.query),
            ("GET", "/metrics", None)
        );
        let r = parse_head(b"GET /q?x=1 HTTP/1.0").unwrap();
        assert_eq!(r.query.as_deref(), Some("x=1"));
        for bad in [
            &b""[..],
            b"GET /metrics",
            b"GET metrics HTTP/1.1",
            b"get /metrics HTTP/1.1",
            b"GET /metrics HTTP/2 x",
            b"GET  /metrics HTTP/1.1",
            b"\xff /metrics HTTP/1.1",
        ] {
            assert_eq!(parse_head(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn routes() {
        let router = Router::default().route("GET", "/a", |_| Response::text(200, "a"));
        let router = router
            .route("GET", "/p/", |r| Response::text(200, r.path.clone()))
            .route("POST", "/p/x", |_| Response::text(200, "x"));
        let req = |m: &str, p: &str| Request {
            method: m.into(),
            path: p.into(),
            query: None,
            authorization: None,
            body: Vec::new(),
            peer: None,
        };
        assert_eq!(router.handle(&req("GET", "/p/abc")).body, b"/p/abc");
        assert_eq!(router.handle(&req("GET", "/p/x")).status, 405);
        assert_eq!(router.handle(&req("POST", "/p/x")).body, b"x");
        assert_eq!(router.handle(&req("DELETE", "/p/abc")).status, 405);
        assert_eq!(router.handle(&req("GET", "/a")).body, b"a");
        assert_eq!(router.handle(&req("HEAD", "/a")).status, 200);
        assert_eq!(router.handle(&req("POST", "/a")).status, 405);
        assert_eq!(router.handle(&req("GET", "/b")).status, 404);
    }

    fn get(addr: SocketAddr, request: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(request).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn serves_metrics_and_bounds_requests() {
        let addr = start("127.0.0.1:0".parse().unwrap(), Router::standard()).unwrap();
        crate::metrics::shard(902).messages.inc();
        let out = get(addr, b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n");
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        assert!(out.contains("ringmta_messages_accepted_total{shard=\"902\"} 1\n"));
        let out = get(addr, b"GET /nope HTTP/1.1\r\n\r\n");
        assert!(out.starts_with("HTTP/1.1 404 "), "{out}");
        let mut huge = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
        huge.resize(MAX_REQUEST + 2048, b'a');
        let out = get(addr, &huge);
        assert!(out.starts_with("HTTP/1.1 431 "), "{out}");
        // Split across writes still parses.
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        s.write_all(b"\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
    }

    #[test]
    fn bodies_are_read_bounded_and_only_by_length() {
        let router = Router::default().route("POST", "/echo", |r| {
            Response::text(
                200,
                [
                    r.authorization.as_deref().unwrap_or("-").as_bytes(),
                    b" ",
                    &r.body,
                ]
                .concat(),
            )
        });
        let addr = start("127.0.0.1:0".parse().unwrap(), router).unwrap();
        let out = get(
            addr,
            b"POST /echo HTTP/1.1\r\nAuthorization: Bearer t\r\ncontent-length: 5\r\n\r\nhello",
        );
        assert!(out.ends_with("\r\n\r\nBearer t hello"), "{out}");
        // Split: the body after the head, in pieces.
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"POST /echo HTTP/1.1\r\nContent-Length: 4\r\n\r\nab")
            .unwrap();
        std::thread::sleep(Duration::from_millis(20));
        s.write_all(b"cd").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(out.ends_with("- abcd"), "{out}");
        let big = format!(
            "POST /echo HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY + 1
        );
        assert!(get(addr, big.as_bytes()).starts_with("HTTP/1.1 413 "));
        let chunked = b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        assert!(get(addr, chunked).starts_with("HTTP/1.1 400 "));
        let bad = b"POST /echo HTTP/1.1\r\nContent-Length: x\r\n\r\n";
        assert!(get(addr, bad).starts_with("HTTP/1.1 400 "));
    }

    #[test]
    fn a_route_may_take_larger_bodies() {
        let router = Router::default()
            .route("POST", "/big", |r| {
                Response::text(200, r.body.len().to_string())
            })
            .route("POST", "/small", |r| {
                Response::text(200, r.body.len().to_string())
            })
            .body_limit("/big", MAX_BODY * 4);
        let addr = start("127.0.0.1:0".parse().unwrap(), router).unwrap();
        let body = vec![b'x'; MAX_BODY * 2];
        let req = |path: &str| {
            let mut r = format!(
                "POST {path} HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .into_bytes();
            r.extend_from_slice(&body);
            r
        };
        let out = get(addr, &req("/big"));
        assert!(out.ends_with(&format!("\r\n\r\n{}", MAX_BODY * 2)), "{out}");
        let small = format!(
            "POST /small HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY + 1
        );
        assert!(get(addr, small.as_bytes()).starts_with("HTTP/1.1 413 "));
        // Expect: 100-continue is answered before the body is sent.
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"POST /big HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")
            .unwrap();
        let mut first = [0u8; 25];
        s.read_exact(&mut first).unwrap();
        assert_eq!(&first, b"HTTP/1.1 100 Continue\r\n\r\n");
        s.write_all(b"abc").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(
            out.starts_with("HTTP/1.1 200 ") && out.ends_with("\r\n\r\n3"),
            "{out}"
        );
        let over = format!(
            "POST /big HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY * 4 + 1
        );
        assert!(get(addr, over.as_bytes()).starts_with("HTTP/1.1 413 "));
    }

    #[test]
    fn bind_failure_is_an_error() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let e = start(addr, Router::standard()).unwrap_err();
        assert!(e.to_string().contains("--admin"), "{e}");
    }
}
