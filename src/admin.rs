//! The admin HTTP listener (`--admin`, default `127.0.0.1:9525`): a small
//! HTTP/1.1 responder on threads of its own, outside the shards, serving
//! [`crate::metrics`] at `GET /metrics`.
//!
//! Routes are a table of (method, path) → handler ([`Router`]), so that
//! more endpoints join by adding a line. Every connection is bounded: the
//! request head is read with a timeout and refused past
//! [`MAX_REQUEST`] bytes, the answer written with a timeout, one request
//! per connection (`Connection: close`), and at most [`MAX_CLIENTS`]
//! served at once (more get 503). It must never touch a shard's state:
//! what it serves is what the shards publish (atomics), read at request
//! time.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;

/// The largest request head read; a longer one is answered 431.
pub const MAX_REQUEST: usize = 8 << 10;
/// Connections served at once; more are answered 503 at once.
pub const MAX_CLIENTS: usize = 8;
/// How long a client may take to send its request, and to read the answer.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

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
}

/// A parsed request head: what the routes see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The path, without the query string.
    pub path: String,
    /// The query string after `?`, if any (undecoded).
    pub query: Option<String>,
}

type Handler = Box<dyn Fn(&Request) -> Response + Send + Sync>;

/// Path → handler. A path with a handler for another method answers 405.
#[derive(Default)]
pub struct Router {
    routes: Vec<(&'static str, &'static str, Handler)>,
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

    pub fn handle(&self, req: &Request) -> Response {
        let mut path_known = false;
        for (method, path, handler) in &self.routes {
            if *path == req.path {
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
        Ok(head) => match parse_head(&head) {
            Some(req) => {
                let resp = router.handle(&req);
                Some((resp, req.method != "HEAD"))
            }
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

/// Reads up to the blank line that ends the head (a body, if any, is not
/// read: no route takes one yet).
fn read_head(stream: &mut TcpStream) -> Result<Vec<u8>, HeadError> {
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
            head.truncate(from + end);
            return Ok(head);
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
    })
}

fn write_response(stream: &mut TcpStream, resp: &Response, body: bool) -> io::Result<()> {
    let reason = match resp.status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "",
    };
    let mut out = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
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
        let req = |m: &str, p: &str| Request {
            method: m.into(),
            path: p.into(),
            query: None,
        };
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
    fn bind_failure_is_an_error() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let e = start(addr, Router::standard()).unwrap_err();
        assert!(e.to_string().contains("--admin"), "{e}");
    }
}
