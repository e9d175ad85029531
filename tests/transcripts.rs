//! Transcript tests: each `tests/transcripts/NAME.txt` is played against a
//! fresh server, one test per file.
//!
//! # Format
//!
//! One item per line; the prefix decides what it is.
//!
//! * `# text` — a comment. Two comments are directives, read before the
//!   server starts: `# args: FLAG VALUE ...` (extra server flags, split on
//!   whitespace) and `# shards: N`.
//! * `C: text` — a client line; CRLF is appended.
//! * `R: text` — raw client bytes; nothing is appended.
//! * `S: text` — the next line the server sends, without its CRLF. `*`
//!   matches any run of bytes (`\*` is a literal star), so `250 2.0.0 Ok:
//!   queued as *` matches any queue id.
//! * `! directive` — see [`Step`]: `flush`, `sleep 500ms`, `silent 300ms`,
//!   `closed`, `connect`, `queued N`, `envelope-has LINE`, `rcpts A | B`,
//!   `content TEXT`.
//!
//! Client bytes accumulate and go out in ONE write just before the next
//! `S:` or `!` item (or at the end), so consecutive `C:`/`R:` lines are a
//! pipelined batch; `! flush` splits a batch into two writes.
//!
//! In `C:`, `R:`, `S:` and `! content` text: `\r`, `\n`, `\t`, `\\`, `\xHH`
//! are escapes (any other backslash is literal), and `{{N*TEXT}}` stands for
//! TEXT repeated N times. The text starts after the single space that
//! follows the colon.
//!
//! At the start the runner connects (the greeting is the first `S:`); at the
//! end, unless the server closed the connection, it checks that the server
//! sent nothing more than the transcript expected.

mod common;

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ringmta::smtp::reply::{self, Reply};

use common::{Client, Server};

macro_rules! transcripts {
    ($($(#[$attr:meta])* $name:ident),* $(,)?) => {
        $(
            #[test]
            $(#[$attr])*
            fn $name() {
                run(stringify!($name));
            }
        )*
        const LISTED: &[&str] = &[$(stringify!($name)),*];
    };
}

transcripts!(
    greeting_and_session_commands,
    ehlo_size_limit,
    helo_session,
    mail_transaction,
    rset_and_ehlo_reset_transaction,
    unknown_command,
    line_too_long,
    bare_newline_in_command,
    syntax_errors_keep_transaction,
    not_implemented,
    bad_sequence,
    bdat_bad_sequence,
    size_limit,
    too_many_recipients,
    relay_denied,
    relay_policy,
    relay_network,
    smtputf8,
    parameters,
    parameters_after_helo,
    data_bare_newline_reject,
    data_bare_newline_normalize,
    data_line_too_long,
    data_line_limit_ignores_stuffing_dot,
    dot_stuffing,
    eight_bit_content,
    bdat,
    bdat_bare_newline_reject,
    bdat_pipelined,
    command_timeout,
    too_many_errors,
    pipelining,
    quoted_local_part,
    quoted_local_part_with_angle_bracket,
    non_smtp_command,
    screen_pipelining,
);

/// Every file in the directory has a test above, and every test a file.
#[test]
fn every_transcript_file_is_listed() {
    let on_disk: BTreeSet<String> = std::fs::read_dir(dir())
        .expect("read transcripts dir")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "txt"))
        .map(|p| p.file_stem().expect("stem").to_string_lossy().into_owned())
        .collect();
    let listed: BTreeSet<String> = LISTED.iter().map(|s| (*s).to_owned()).collect();
    assert_eq!(
        on_disk, listed,
        "tests/transcripts/*.txt and the transcripts! list differ"
    );
}

/// Together the transcripts expect every fixed reply the session can send,
/// word for word. Replies a transcript cannot provoke are checked elsewhere.
#[test]
fn transcripts_cover_every_reply() {
    let must_cover: &[Reply] = &[
        reply::OK,
        reply::SENDER_OK,
        reply::RCPT_OK,
        reply::RSET_OK,
        reply::NOOP_OK,
        reply::START_DATA,
        reply::VRFY,
        reply::HELP,
        reply::UNKNOWN_COMMAND,
        reply::LINE_TOO_LONG,
        reply::BARE_NEWLINE_COMMAND,
        reply::NOT_IMPLEMENTED,
        reply::BAD_SEQUENCE_HELO,
        reply::BAD_SEQUENCE_NESTED_MAIL,
        reply::BAD_SEQUENCE_NEED_MAIL,
        reply::BAD_SEQUENCE_NEED_RCPT,
        reply::BAD_SEQUENCE_DATA_AFTER_BDAT,
        reply::BAD_SEQUENCE_BDAT_HELO,
        reply::SYNTAX_EHLO,
        reply::SYNTAX_HELO,
        reply::SYNTAX_MAIL,
        reply::SYNTAX_RCPT,
        reply::SYNTAX_BDAT,
        reply::SYNTAX_NO_ARGS,
        reply::BAD_SENDER_SYNTAX,
        reply::BAD_RECIPIENT_SYNTAX,
        reply::INVALID_UTF8,
        reply::UNKNOWN_PARAMETER,
        reply::BAD_PARAMETER,
        reply::PARAMETERS_AFTER_HELO,
        reply::UTF8_NOT_DECLARED,
        reply::SIZE_EXCEEDED,
        reply::TOO_MANY_RECIPIENTS,
        reply::RELAY_DENIED,
        reply::NULL_RECIPIENT,
        reply::DATA_BARE_NEWLINE,
        reply::DATA_LINE_TOO_LONG,
        reply::TIMEOUT,
        reply::TOO_MANY_ERRORS,
        reply::BYE,
        reply::SYNTAX_VRFY,
        reply::BAD_SEQUENCE_RCPT_AFTER_BDAT,
        // Elsewhere: SHUTTING_DOWN, TOO_MANY_CONNECTIONS (tests/lifecycle.rs),
        // STORAGE_FULL (tests/disk_full.rs). Not provoked from a test:
        // STORAGE_ERROR (needs an I/O error other than a full disk).
    ];
    let mut expected_lines = BTreeSet::new();
    for name in LISTED {
        let t = parse(&dir().join(format!("{name}.txt")));
        for step in t.steps {
            if let Step::Expect { pattern, .. } = step {
                if pattern.iter().all(|p| matches!(p, Pat::Byte(_))) {
                    let bytes: Vec<u8> = pattern
                        .iter()
                        .map(|p| match p {
                            Pat::Byte(b) => *b,
                            Pat::Any => unreachable!(),
                        })
                        .collect();
                    expected_lines.insert(bytes);
                }
            }
        }
    }
    let mut missing = String::new();
    for r in must_cover {
        let mut line = Vec::new();
        r.write_to(&mut line);
        line.truncate(line.len() - 2);
        if !expected_lines.contains(&line) {
            let _ = writeln!(missing, "  {}", String::from_utf8_lossy(&line));
        }
    }
    assert!(
        missing.is_empty(),
        "no transcript expects these replies:\n{missing}"
    );
}

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/transcripts")
}

/// One element of an `S:` pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pat {
    Byte(u8),
    Any,
}

#[derive(Debug)]
enum Step {
    /// `C:` / `R:`: bytes for the next write.
    Send { bytes: Vec<u8> },
    /// `S:`: the next server line must match.
    Expect { pattern: Vec<Pat>, line: usize },
    /// `! flush`: write the pending client bytes now.
    Flush,
    /// `! sleep DURATION`.
    Sleep(Duration, usize),
    /// `! silent DURATION`: the server sends nothing for that long.
    Silent(Duration, usize),
    /// `! closed`: the server closes the connection, sending nothing more.
    Closed(usize),
    /// `! connect`: a new connection replaces the current one.
    Connect,
    /// `! queued N`: exactly N messages are in the queue.
    Queued(usize, usize),
    /// `! envelope-has LINE`: the newest queued message has this envelope
    /// line (e.g. `rcpt <u@localhost>` or `param BODY=8BITMIME`).
    EnvelopeHas(String, usize),
    /// `! rcpts A | B | ...`: the newest queued message's recipients are
    /// exactly these, in this order.
    Rcpts(Vec<String>, usize),
    /// `! content TEXT`: the newest queued message's content (after our
    /// trace header) is exactly TEXT.
    Content(Vec<u8>, usize),
}

struct Transcript {
    args: Vec<String>,
    shards: usize,
    steps: Vec<Step>,
}

fn parse(path: &Path) -> Transcript {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let mut t = Transcript {
        args: Vec::new(),
        shards: 1,
        steps: Vec::new(),
    };
    let bad = |n: usize, why: &str| -> ! { panic!("{}:{n}: {why}", path.display()) };
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        if let Some(c) = raw.strip_prefix('#') {
            let c = c.trim();
            if let Some(a) = c.strip_prefix("args:") {
                t.args.extend(a.split_whitespace().map(str::to_owned));
            } else if let Some(s) = c.strip_prefix("shards:") {
                t.shards = s.trim().parse().unwrap_or_else(|_| bad(n, "bad shards"));
            }
            continue;
        }
        let (kind, rest) = match raw.split_once(':') {
            Some((k, r)) if matches!(k, "C" | "R" | "S") => (k, r.strip_prefix(' ').unwrap_or(r)),
            _ if raw.starts_with("! ") => ("!", &raw[2..]),
            _ => bad(n, "expected `C:`, `R:`, `S:`, `! ` or `#`"),
        };
        let step = match kind {
            "C" => {
                let mut bytes = unescape(rest, n, path);
                bytes.extend_from_slice(b"\r\n");
                Step::Send { bytes }
            }
            "R" => Step::Send {
                bytes: unescape(rest, n, path),
            },
            "S" => Step::Expect {
                pattern: decode(rest, n, path),
                line: n,
            },
            _ => {
                let (word, arg) = rest.split_once(' ').unwrap_or((rest, ""));
                let dur = || parse_duration(arg).unwrap_or_else(|| bad(n, "bad duration"));
                match word {
                    "flush" => Step::Flush,
                    "sleep" => Step::Sleep(dur(), n),
                    "silent" => Step::Silent(dur(), n),
                    "closed" => Step::Closed(n),
                    "connect" => Step::Connect,
                    "queued" => Step::Queued(
                        arg.trim().parse().unwrap_or_else(|_| bad(n, "bad count")),
                        n,
                    ),
                    "envelope-has" => Step::EnvelopeHas(arg.to_owned(), n),
                    "rcpts" => Step::Rcpts(arg.split(" | ").map(str::to_owned).collect(), n),
                    "content" => Step::Content(unescape(arg, n, path), n),
                    _ => bad(n, "unknown directive"),
                }
            }
        };
        t.steps.push(step);
    }
    t
}

fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if let Some(ms) = s.strip_suffix("ms") {
        return ms.parse().ok().map(Duration::from_millis);
    }
    s.strip_suffix('s')?.parse().ok().map(Duration::from_secs)
}

/// Expands `{{N*TEXT}}` repetitions.
fn expand(text: &str, n: usize, path: &Path) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find("}}")
            .unwrap_or_else(|| panic!("{}:{n}: unclosed {{{{", path.display()));
        let (count, unit) = after[..end]
            .split_once('*')
            .unwrap_or_else(|| panic!("{}:{n}: expected {{{{N*TEXT}}}}", path.display()));
        let count: usize = count
            .parse()
            .unwrap_or_else(|_| panic!("{}:{n}: bad repeat count", path.display()));
        out.push_str(&unit.repeat(count));
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    out
}

/// Decodes escapes; `\*` becomes `Pat::Byte(b'*')`, a bare `*` `Pat::Any`.
fn decode(text: &str, n: usize, path: &Path) -> Vec<Pat> {
    let text = expand(text, n, path);
    let b = text.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'*' {
            out.push(Pat::Any);
            i += 1;
            continue;
        }
        if c != b'\\' || i + 1 == b.len() {
            out.push(Pat::Byte(c));
            i += 1;
            continue;
        }
        let (byte, len) = match b[i + 1] {
            b'r' => (b'\r', 2),
            b'n' => (b'\n', 2),
            b't' => (b'\t', 2),
            b'\\' => (b'\\', 2),
            b'*' => (b'*', 2),
            b'x' => {
                let hex = text
                    .get(i + 2..i + 4)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .unwrap_or_else(|| panic!("{}:{n}: bad \\x escape", path.display()));
                (hex, 4)
            }
            _ => (b'\\', 1),
        };
        out.push(Pat::Byte(byte));
        i += len;
    }
    out
}

fn unescape(text: &str, n: usize, path: &Path) -> Vec<u8> {
    decode(text, n, path)
        .into_iter()
        .map(|p| match p {
            Pat::Byte(b) => b,
            Pat::Any => b'*',
        })
        .collect()
}

/// Glob match: `Pat::Any` matches any run of bytes.
fn matches(pat: &[Pat], s: &[u8]) -> bool {
    match pat.split_first() {
        None => s.is_empty(),
        Some((Pat::Any, rest)) => (0..=s.len()).any(|k| matches(rest, &s[k..])),
        Some((Pat::Byte(b), rest)) => s.first() == Some(b) && matches(rest, &s[1..]),
    }
}

fn show_pattern(p: &[Pat]) -> String {
    p.iter()
        .map(|p| match p {
            Pat::Any => "*".to_owned(),
            Pat::Byte(b) => show_bytes(&[*b]),
        })
        .collect()
}

/// For the conversation log: long writes are cut in the middle.
fn show_bytes_short(b: &[u8]) -> String {
    const KEEP: usize = 120;
    if b.len() <= 2 * KEEP {
        return show_bytes(b);
    }
    format!(
        "{}...({} bytes)...{}",
        show_bytes(&b[..KEEP]),
        b.len() - 2 * KEEP,
        show_bytes(&b[b.len() - KEEP..])
    )
}

fn show_bytes(b: &[u8]) -> String {
    b.iter()
        .flat_map(|&c| std::ascii::escape_default(c))
        .map(char::from)
        .collect()
}

/// Plays one transcript; panics with `file:line` on the first mismatch.
fn run(name: &str) {
    let path = dir().join(format!("{name}.txt"));
    let file = format!("tests/transcripts/{name}.txt");
    let t = parse(&path);
    let server = Server::builder()
        .args(t.args.iter().cloned())
        .shards(t.shards)
        .start();
    let mut client = server.connect();
    let mut pending: Vec<u8> = Vec::new();
    let mut log = String::new();
    let mut closed = false;

    let fail = |log: &str, at: usize, why: String| -> ! {
        panic!(
            "{file}:{at}: {why}\n--- conversation ---\n{log}--- server stderr ---\n{}",
            server.stderr()
        )
    };
    let flush = |client: &mut Client, pending: &mut Vec<u8>, log: &mut String, at: usize| {
        if pending.is_empty() {
            return;
        }
        let _ = writeln!(log, "C: {}", show_bytes_short(pending));
        if let Err(e) = client.try_send(pending) {
            fail(log, at, format!("sending failed: {e}"));
        }
        pending.clear();
    };
    let newest = |log: &str, at: usize| match server.newest() {
        Some(q) => q,
        None => fail(log, at, "no message is queued".into()),
    };

    for step in &t.steps {
        if let Step::Send { bytes } = step {
            pending.extend_from_slice(bytes);
            continue;
        }
        let at = match step {
            Step::Expect { line, .. }
            | Step::Sleep(_, line)
            | Step::Silent(_, line)
            | Step::Closed(line)
            | Step::Queued(_, line)
            | Step::EnvelopeHas(_, line)
            | Step::Rcpts(_, line)
            | Step::Content(_, line) => *line,
            _ => 0,
        };
        flush(&mut client, &mut pending, &mut log, at);
        match step {
            Step::Send { .. } | Step::Flush => {}
            Step::Expect { pattern, line } => match client.read_line() {
                Ok(got) => {
                    let _ = writeln!(log, "S: {}", show_bytes_short(&got));
                    if !matches(pattern, &got) {
                        fail(
                            &log,
                            *line,
                            format!(
                                "expected `{}`\n                got `{}`",
                                show_pattern(pattern),
                                show_bytes(&got)
                            ),
                        );
                    }
                }
                Err(e) => fail(
                    &log,
                    *line,
                    format!("expected `{}`, read failed: {e}", show_pattern(pattern)),
                ),
            },
            Step::Sleep(d, _) => std::thread::sleep(*d),
            Step::Silent(d, line) => {
                if let Err(e) = client.check_silence(*d) {
                    fail(&log, *line, e);
                }
            }
            Step::Closed(line) => {
                if let Err(e) = client.check_closed() {
                    fail(&log, *line, e);
                }
                let _ = writeln!(log, "(closed)");
                closed = true;
            }
            Step::Connect => {
                client = server.connect();
                closed = false;
                let _ = writeln!(log, "(new connection)");
            }
            Step::Queued(want, line) => {
                let got = server.queued_ids().len();
                if got != *want {
                    fail(
                        &log,
                        *line,
                        format!("expected {want} queued messages, found {got}"),
                    );
                }
            }
            Step::EnvelopeHas(want, line) => {
                let q = newest(&log, *line);
                if !q.has_line(want) {
                    fail(
                        &log,
                        *line,
                        format!("envelope of {} lacks `{want}`: {:?}", q.id, q.lines),
                    );
                }
            }
            Step::Rcpts(want, line) => {
                let q = newest(&log, *line);
                if &q.rcpts != want {
                    fail(
                        &log,
                        *line,
                        format!(
                            "recipients of {}: expected {want:?}, got {:?}",
                            q.id, q.rcpts
                        ),
                    );
                }
            }
            Step::Content(want, line) => {
                let q = newest(&log, *line);
                if q.content() != want.as_slice() {
                    fail(
                        &log,
                        *line,
                        format!(
                            "content of {}:\nexpected `{}`\n     got `{}`",
                            q.id,
                            show_bytes(want),
                            show_bytes(q.content())
                        ),
                    );
                }
            }
        }
    }
    let end = t.steps.len();
    flush(&mut client, &mut pending, &mut log, end);
    if !closed {
        if let Err(e) = client.check_silence(Duration::from_millis(150)) {
            fail(&log, end, format!("after the last line: {e}"));
        }
    }
}

#[test]
fn glob_matching() {
    let p = |s: &str| decode(s, 0, Path::new("x"));
    assert!(matches(
        &p("250 2.0.0 Ok: queued as *"),
        b"250 2.0.0 Ok: queued as 0660ef"
    ));
    assert!(!matches(&p("250 2.0.0 Ok: queued as *"), b"250 2.0.0 Ok"));
    assert!(matches(&p("a*c*e"), b"abcde"));
    assert!(!matches(&p("a\\*"), b"ab"));
    assert!(matches(&p("a\\*"), b"a*"));
    assert_eq!(
        unescape("{{3*ab}}\\r\\x41\\q", 0, Path::new("x")),
        b"ababab\rA\\q"
    );
}
