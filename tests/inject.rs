//! HTTP injection (`POST /v1/inject` on the admin listener) against the
//! real binary, with curl as the client: a complete message and a parts
//! message relayed to a downstream ringmta (the sink), the MIME ringmta
//! built read back by Python's `email` package, substitution per
//! recipient, the errors (bad JSON, too large, token, policy), and one call
//! with 10,000 recipients, every one of them counted at the sink.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{peer_program, run_peer, run_peer_with_input, Server};
use serde_json::{json, Value};

const PEER_TIMEOUT: Duration = Duration::from_secs(120);

/// curl POSTs `body` to `path` on the admin listener; the status and the
/// JSON answer.
fn post(server: &Server, path: &str, body: &[u8], token: Option<&str>) -> (u16, Value) {
    let curl = peer_program("curl", "curl").expect("curl");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("body.json");
    std::fs::write(&file, body).unwrap();
    let url = format!("http://{}{path}", server.admin.expect("admin listener"));
    let data = format!("@{}", file.display());
    let auth = token.map(|t| format!("Authorization: Bearer {t}"));
    let mut args = vec![
        "-sS",
        "-o",
        "-",
        "-w",
        "\n%{http_code}",
        "-H",
        "Content-Type: application/json",
        "--data-binary",
        &data,
        "--max-time",
        "110",
    ];
    if let Some(a) = &auth {
        args.extend(["-H", a]);
    }
    args.push(&url);
    let out = run_peer(&curl, &args, PEER_TIMEOUT);
    assert!(out.status.success(), "curl: {}{}", out.stdout, out.stderr);
    let (json, code) = out.stdout.trim_end().rsplit_once('\n').expect("a status");
    let value = serde_json::from_str(json).unwrap_or(Value::Null);
    (code.parse().unwrap(), value)
}

/// A sink (a downstream ringmta that keeps what it gets queued) and a
/// server that relays example.net to it.
fn pair(extra: &[&str]) -> (Server, Server) {
    let sink = Server::start(&["--local-domain", "example.net"]);
    let route = format!("example.net=smtp:127.0.0.1:{}", sink.port);
    let mut args = vec!["--route", &route, "--retry-schedule", "1s"];
    args.extend_from_slice(extra);
    let server = Server::start(&args);
    (server, sink)
}

fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Python's `email` package reads `message`: its structure as JSON.
fn parse_mime(message: &[u8]) -> Value {
    const SCRIPT: &str = r#"
import sys, json, email, email.policy
raw = sys.stdin.buffer.read()
m = email.message_from_bytes(raw, policy=email.policy.default)
defects = [str(d) for p in m.walk() for d in p.defects]
parts = []
for p in m.walk():
    if p.is_multipart():
        continue
    parts.append({"type": p.get_content_type(), "cte": p.get("Content-Transfer-Encoding"),
                  "charset": p.get_content_charset(), "text": p.get_content().replace("\r\n", "\n")})
out = {"type": m.get_content_type(), "subject": str(m["subject"]), "from": str(m["from"]),
       "to": str(m["to"]), "date": m["date"] is not None, "message_id": str(m["message-id"]),
       "mime_version": str(m["mime-version"]), "parts": parts, "defects": defects,
       "received": [str(r) for r in m.get_all("received", [])],
       "bare_lf": b"\n" in raw.replace(b"\r\n", b""),
       "long_line": max(len(l) for l in raw.split(b"\r\n")) > 998,
       "ascii": all(b < 128 for b in raw)}
print(json.dumps(out))
"#;
    let out = run_peer_with_input(
        Path::new("/usr/bin/python3"),
        &["-c", SCRIPT],
        message,
        PEER_TIMEOUT,
    );
    assert!(out.status.success(), "python3: {}", out.stderr);
    serde_json::from_str(&out.stdout).unwrap()
}

/// The message the sink holds for `rcpt` (the only one).
fn at_sink(sink: &Server, rcpt: &str) -> common::Queued {
    let mut got: Vec<_> = sink
        .queued()
        .into_iter()
        .filter(|q| q.rcpts.iter().any(|r| r == rcpt))
        .collect();
    assert_eq!(got.len(), 1, "messages for {rcpt}");
    got.remove(0)
}

#[test]
fn complete_and_built_messages_are_queued_and_relayed() {
    let (server, sink) = pair(&[]);

    // A complete message, LF line ends, to two recipients: one message.
    let raw = "From: App <app@example.org>\nTo: list@example.net\nSubject: raw {{name}}\n\nline one\n.leading dot\n";
    let call = json!({
        "mail_from": "bounces@example.org",
        "recipients": ["a@example.net", "b@example.net", "unqualified", "c@nodot"],
        "message": raw,
    });
    let (code, answer) = post(&server, "/v1/inject", call.to_string().as_bytes(), None);
    assert_eq!(code, 200, "{answer}");
    assert_eq!(answer["accepted"], 2, "{answer}");
    let messages = answer["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 1, "{answer}");
    assert_eq!(
        messages[0]["recipients"],
        json!(["a@example.net", "b@example.net"])
    );
    let rejected = answer["rejected"].as_array().unwrap();
    assert_eq!(rejected.len(), 2, "{answer}");
    assert!(rejected.iter().all(|r| r["temporary"] == false), "{answer}");
    assert!(
        rejected[1]["reason"]
            .as_str()
            .unwrap()
            .starts_with("550 5.1.2"),
        "{answer}"
    );
    // Queued before the answer: the id is in the spool (or already gone
    // downstream, then at the sink).
    let id = messages[0]["id"].as_str().unwrap().to_owned();

    // Parts: text and html, non-ASCII subject and display name, one
    // recipient with vars (its own message), two without (shared).
    let call = json!({
        "mail_from": "bounces@example.org",
        "recipients": [
            {"address": "bob@example.net", "vars": {"name": "Bob", "code": "B-1"}},
            {"address": "zoe@example.net", "vars": {"name": "Zoë", "code": "Z-2"}},
            "d@example.net",
            "e@example.net"
        ],
        "content": {
            "from": "Zoë's Shop <shop@example.org>",
            "subject": "Grüße, {{name}}",
            "text": "Hello {{name}},\nyour code is {{code}}.\nA long line: {{ long }}",
            "html": "<p>Hello <b>{{name}}</b>, your code is {{code}}.</p>",
            "headers": {"X-Campaign": "c-{{code}}"}
        }
    });
    let (code, answer) = post(&server, "/v1/inject", call.to_string().as_bytes(), None);
    assert_eq!(code, 200, "{answer}");
    assert_eq!(answer["accepted"], 4, "{answer}");
    assert_eq!(answer["messages"].as_array().unwrap().len(), 3, "{answer}");

    wait_until("delivery to the sink", Duration::from_secs(30), || {
        let n: usize = sink.queued().iter().map(|q| q.rcpts.len()).sum();
        n == 6
    });
    let a = at_sink(&sink, "a@example.net");
    let text = String::from_utf8_lossy(&a.message).into_owned();
    assert!(text.contains(&format!("with HTTP id {id}")), "{text}");
    assert!(text.contains("(HTTP injection)"), "{text}");
    assert!(text.contains("Message-ID: <"), "Message-ID added: {text}");
    assert!(
        text.ends_with("Subject: raw {{name}}\r\n\r\nline one\r\n.leading dot\r\n"),
        "no vars: placeholders kept, line ends CRLF: {text}"
    );
    assert_eq!(a.mail_from.as_deref(), Some("bounces@example.org"));

    let bob = parse_mime(&at_sink(&sink, "bob@example.net").message);
    assert_eq!(bob["type"], "multipart/alternative", "{bob}");
    assert_eq!(bob["subject"], "Grüße, Bob", "{bob}");
    assert_eq!(bob["from"], "Zoë's Shop <shop@example.org>", "{bob}");
    assert_eq!(bob["to"], "bob@example.net", "{bob}");
    assert_eq!(bob["mime_version"], "1.0", "{bob}");
    assert_eq!(bob["date"], true, "{bob}");
    assert_eq!(bob["defects"], json!([]), "{bob}");
    assert_eq!(bob["bare_lf"], false, "{bob}");
    assert_eq!(bob["long_line"], false, "{bob}");
    assert_eq!(bob["ascii"], true, "{bob}");
    let parts = bob["parts"].as_array().unwrap();
    assert_eq!(parts.len(), 2, "{bob}");
    assert_eq!(parts[0]["type"], "text/plain");
    assert_eq!(parts[0]["charset"], "utf-8");
    assert_eq!(
        parts[0]["text"],
        "Hello Bob,\nyour code is B-1.\nA long line: {{ long }}\n"
    );
    assert_eq!(parts[1]["type"], "text/html");
    assert_eq!(
        parts[1]["text"],
        "<p>Hello <b>Bob</b>, your code is B-1.</p>\n"
    );
    let zoe = parse_mime(&at_sink(&sink, "zoe@example.net").message);
    assert_eq!(zoe["subject"], "Grüße, Zoë", "{zoe}");
    let zparts = zoe["parts"].as_array().unwrap();
    assert_eq!(zparts[0]["cte"], "quoted-printable", "{zoe}");
    assert!(
        zparts[0]["text"]
            .as_str()
            .unwrap()
            .starts_with("Hello Zoë,"),
        "{zoe}"
    );
    assert_ne!(zoe["message_id"], bob["message_id"]);
    // The shared message: both recipients, one copy, To: undisclosed.
    let d = at_sink(&sink, "d@example.net");
    assert_eq!(d.rcpts, ["d@example.net", "e@example.net"]);
    let shared = parse_mime(&d.message);
    assert_eq!(shared["subject"], "Grüße, {{name}}", "{shared}");
    assert_eq!(shared["to"], "undisclosed-recipients:;", "{shared}");
    let dtext = String::from_utf8_lossy(&d.message);
    assert!(dtext.contains("X-Campaign: c-{{code}}\r\n"), "{dtext}");

    // Counted and logged.
    let metrics = common::http_get(server.admin.unwrap(), "/metrics");
    assert_eq!(
        common::metric(&metrics, "ringmta_inject_messages_total", &[]),
        4.0
    );
    assert_eq!(
        common::metric(&metrics, "ringmta_inject_recipients_total", &[]),
        6.0
    );
    assert_eq!(
        common::metric(
            &metrics,
            "ringmta_inject_requests_total",
            &["status=\"200\""]
        ),
        2.0
    );
    assert!(server.wait_for_log("event=\"inject\"", Duration::from_secs(5)));
}

#[test]
fn errors_are_answered_in_json_with_their_status() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "s3cret-token-for-tests\n").unwrap();
    let server = Server::builder()
        .args([
            "--local-domain",
            "example.net",
            "--max-message-size",
            "100K",
        ])
        .args(["--inject-max-recipients", "3", "--admin-token-file"])
        .arg(token_file.to_str().unwrap())
        .start();
    let tok = Some("s3cret-token-for-tests");
    let ok = json!({"mail_from": "a@example.org", "recipients": ["x@example.net"],
                    "content": {"from": "a@example.org", "subject": "s", "text": "t"}});
    let body = ok.to_string();

    let (code, v) = post(&server, "/v1/inject", body.as_bytes(), None);
    assert_eq!(code, 401, "{v}");
    let (code, _) = post(&server, "/v1/inject", body.as_bytes(), Some("wrong"));
    assert_eq!(code, 401);
    assert!(
        server.queued().is_empty(),
        "nothing queued without the token"
    );
    let (code, v) = post(&server, "/v1/inject", body.as_bytes(), tok);
    assert_eq!(code, 200, "{v}");

    let (code, v) = post(&server, "/v1/inject", b"{\"mail_from\": ", tok);
    assert_eq!(code, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("bad JSON"), "{v}");
    let (code, v) = post(
        &server,
        "/v1/inject",
        b"{\"mail_from\":\"\",\"recipients\":[\"x@example.net\"],\"bogus\":1}",
        tok,
    );
    assert_eq!(code, 400, "{v}");

    // Header injection through a value or a variable.
    let evil = json!({"mail_from": "a@example.org", "recipients": ["x@example.net"],
                      "content": {"from": "a@example.org", "subject": "hi\r\nBcc: v@example.com", "text": "t"}});
    let (code, v) = post(&server, "/v1/inject", evil.to_string().as_bytes(), tok);
    assert_eq!(code, 400, "{v}");
    let evil_var = json!({"mail_from": "a@example.org",
                          "recipients": [{"address": "x@example.net", "vars": {"n": "x\nBcc: v@example.com"}}],
                          "content": {"from": "a@example.org", "subject": "{{n}}", "text": "t"}});
    let (code, v) = post(&server, "/v1/inject", evil_var.to_string().as_bytes(), tok);
    assert_eq!(code, 422, "{v}");
    assert_eq!(v["accepted"], 0, "{v}");

    // Too many recipients, a body over the limit, a message over
    // --max-message-size.
    let many = json!({"mail_from": "a@example.org",
                      "recipients": ["a@example.net", "b@example.net", "c@example.net", "d@example.net"],
                      "message": "Subject: x\r\n\r\nx\r\n"});
    let (code, v) = post(&server, "/v1/inject", many.to_string().as_bytes(), tok);
    assert_eq!(code, 413, "{v}");
    let huge = vec![b' '; 300 << 10];
    let (code, _) = post(&server, "/v1/inject", &huge, tok);
    assert_eq!(code, 413);
    let big = json!({"mail_from": "a@example.org", "recipients": ["x@example.net"],
                     "message": format!("Subject: x\r\n\r\n{}\r\n", "y".repeat(150_000))});
    let (code, v) = post(&server, "/v1/inject", big.to_string().as_bytes(), tok);
    assert_eq!(code, 413, "{v}");

    // Every recipient refused by policy: 422, nothing queued.
    let refused = json!({"mail_from": "a@example.org", "recipients": ["nodot", "x@y"],
                         "message": "Subject: x\r\n\r\nx\r\n"});
    let before = server.queued().len();
    let (code, v) = post(&server, "/v1/inject", refused.to_string().as_bytes(), tok);
    assert_eq!(code, 422, "{v}");
    assert_eq!(v["rejected"].as_array().unwrap().len(), 2, "{v}");
    assert_eq!(server.queued().len(), before);

    let metrics = common::http_get(server.admin.unwrap(), "/metrics");
    assert!(
        common::metric(
            &metrics,
            "ringmta_inject_requests_total",
            &["status=\"401\""]
        ) >= 2.0
    );

    // --inject-max-recipients 0: no such endpoint.
    let off = Server::start(&["--inject-max-recipients", "0"]);
    let (code, _) = post(&off, "/v1/inject", body.as_bytes(), None);
    assert_eq!(code, 404);
}

#[test]
fn ten_thousand_recipients_in_one_call() {
    let (server, sink) = pair(&["--inject-max-recipients", "10000"]);
    let recipients: Vec<String> = (0..10_000).map(|i| format!("r{i}@example.net")).collect();
    let call = json!({
        "mail_from": "bulk@example.org",
        "recipients": recipients,
        "content": {"from": "Bulk <bulk@example.org>", "subject": "bulk", "text": "one call, many recipients"}
    });
    let started = Instant::now();
    let (code, answer) = post(&server, "/v1/inject", call.to_string().as_bytes(), None);
    eprintln!("10,000 recipients injected in {:?}", started.elapsed());
    assert_eq!(code, 200, "{answer}");
    assert_eq!(answer["accepted"], 10_000);
    assert_eq!(answer["rejected"], json!([]));
    // --max-recipients (1000) per message.
    let messages = answer["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 10);
    assert!(messages
        .iter()
        .all(|m| m["recipients"].as_array().unwrap().len() == 1000));

    wait_until("all 10,000 at the sink", Duration::from_secs(120), || {
        let n: usize = sink.queued().iter().map(|q| q.rcpts.len()).sum();
        n == 10_000
    });
    let mut seen: Vec<String> = sink.queued().into_iter().flat_map(|q| q.rcpts).collect();
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 10_000, "each recipient exactly once");
    eprintln!("and at the sink after {:?}", started.elapsed());
    wait_until("the relay's queue drained", Duration::from_secs(60), || {
        server.queued().is_empty()
    });
}

struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// A full spool: the call is answered 507 with its recipients listed as
/// temporary, every id an earlier answer gave is queued, and calls succeed
/// again once there is room (a small tmpfs the test mounts: root, as CI).
#[test]
fn full_spool_is_507_and_acknowledged_ids_are_queued() {
    let root = tempfile::tempdir().unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
        .arg(root.path())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        assert!(
            std::env::var("CI").is_err(),
            "CI must be able to mount a tmpfs"
        );
        eprintln!("SKIPPED: cannot mount tmpfs (not root)");
        return;
    }
    let _mount = Mount(root.path().to_owned());
    let server = Server::builder()
        .shards(1)
        .spool_dir(&root.path().join("spool"))
        .args(["--local-domain", "example.net"])
        .start();
    let text = format!("{}\n", "z".repeat(70)).repeat(800);
    let mut acked = Vec::new();
    let mut full = None;
    for n in 0..60 {
        let call = json!({"mail_from": "f@example.org", "recipients": [format!("n{n}@example.net")],
                          "message": format!("Subject: {n}\r\n\r\n{text}")});
        let (code, v) = post(&server, "/v1/inject", call.to_string().as_bytes(), None);
        match code {
            200 => acked.push(v["messages"][0]["id"].as_str().unwrap().to_owned()),
            507 => {
                full = Some(v);
                break;
            }
            other => panic!("{other}: {v}"),
        }
    }
    let full = full.expect("the spool filled up");
    assert!(!acked.is_empty());
    assert_eq!(full["accepted"], 0, "{full}");
    assert_eq!(full["rejected"][0]["temporary"], true, "{full}");
    assert!(full["rejected"][0]["reason"]
        .as_str()
        .unwrap()
        .starts_with("452 4.3.1"));
    let mut queued = server.queued_ids();
    queued.sort();
    acked.sort();
    assert_eq!(
        queued, acked,
        "queued messages differ from acknowledged ones"
    );

    let grown = std::process::Command::new("mount")
        .args(["-o", "remount,size=16m"])
        .arg(root.path())
        .status()
        .unwrap();
    assert!(grown.success());
    let call = json!({"mail_from": "f@example.org", "recipients": ["again@example.net"],
                      "message": "Subject: again\r\n\r\nroom again\r\n"});
    let (code, v) = post(&server, "/v1/inject", call.to_string().as_bytes(), None);
    assert_eq!(code, 200, "{v}");
}

/// 10,000 recipients, each with vars: 10,000 messages, each with its own
/// substitution, all at the sink exactly once.
#[test]
fn ten_thousand_recipients_with_vars_get_a_message_each() {
    let (server, sink) = pair(&[]);
    let recipients: Vec<Value> = (0..10_000)
        .map(|i| json!({"address": format!("v{i}@example.net"), "vars": {"n": i.to_string()}}))
        .collect();
    let call = json!({
        "mail_from": "bulk@example.org",
        "recipients": recipients,
        "message": "From: bulk@example.org\r\nSubject: number {{n}}\r\n\r\nyou are {{n}}\r\n"
    });
    let started = Instant::now();
    let (code, answer) = post(&server, "/v1/inject", call.to_string().as_bytes(), None);
    eprintln!("10,000 messages injected in {:?}", started.elapsed());
    assert_eq!(code, 200, "{answer}");
    assert_eq!(answer["accepted"], 10_000);
    assert_eq!(answer["messages"].as_array().unwrap().len(), 10_000);

    wait_until("all 10,000 at the sink", Duration::from_secs(300), || {
        sink.queued().len() == 10_000
    });
    eprintln!("and at the sink after {:?}", started.elapsed());
    for q in sink.queued() {
        assert_eq!(q.rcpts.len(), 1);
        let n = q.rcpts[0]
            .trim_start_matches('v')
            .split('@')
            .next()
            .unwrap()
            .to_owned();
        let text = String::from_utf8_lossy(q.content()).into_owned();
        assert!(
            text.contains(&format!("Subject: number {n}\r\n"))
                && text.ends_with(&format!("you are {n}\r\n")),
            "{text}"
        );
    }
}
