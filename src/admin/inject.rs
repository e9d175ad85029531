//! `POST /v1/inject` (README "HTTP injection" is the contract): mail handed
//! over as JSON, checked and built into messages here
//! ([`crate::smtp::inject`]), stored by the shards.
//!
//! The request is checked as SMTP would check it from a `--relay-network`
//! client: the sender and each recipient through the SMTP parser and the
//! RCPT policy of the session configuration in force (a refused recipient
//! is reported, never queued). Recipients without `vars` share messages of
//! at most `--max-recipients` recipients; one with `vars` gets its own.
//! Messages go to the shards round-robin in batches (bounded in count and
//! octets, so a 10,000-recipient call never holds more than one batch of
//! built messages) over the shards' bounded command channels; each batch
//! is answered once its messages are durable. The HTTP answer lists the
//! queue ids, so a 200 means what a 250 means. The admin threads never
//! touch a shard: a shard that does not answer within [`SHARD_TIMEOUT`]
//! gives 504 (what it stored stays queued).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use futures_channel::mpsc;
use serde::Serialize;
use serde_json::json;

use super::{Request, Response, Router};
use crate::relay::control::{
    Answer, Command, InjectBatch, InjectFailure, Injected, Request as ShardRequest,
};
use crate::server::Shared;
use crate::smtp::inject::{self, InjectRequest, Stamp};
use crate::smtp::SessionConfig;

/// The path.
pub const PATH: &str = "/v1/inject";
/// How long one batch may take a shard to store.
pub const SHARD_TIMEOUT: Duration = Duration::from_secs(60);
/// Messages per batch, and octets (a larger single message goes alone).
const BATCH_MESSAGES: usize = 512;
const BATCH_BYTES: usize = 16 << 20;

/// The injection endpoint: the shards' command senders, the token, and
/// the live configuration (the session policy recipients are checked by).
pub struct Injector {
    shards: Vec<mpsc::Sender<ShardRequest>>,
    token: Arc<ArcSwapOption<String>>,
    shared: Arc<Shared>,
    max_recipients: usize,
    next: AtomicUsize,
}

/// The largest request body for `max_recipients` recipients per call and
/// messages of at most `max_message_size` octets: twice the message (JSON
/// escapes) and 1 KiB per recipient (address and vars).
pub fn body_limit(max_message_size: u64, max_recipients: usize) -> usize {
    usize::try_from(max_message_size)
        .unwrap_or(usize::MAX)
        .saturating_mul(2)
        .saturating_add(max_recipients.saturating_mul(1024))
        .saturating_add(64 << 10)
}

impl Injector {
    pub fn new(
        shards: Vec<mpsc::Sender<ShardRequest>>,
        token: Arc<ArcSwapOption<String>>,
        shared: Arc<Shared>,
        max_recipients: usize,
    ) -> Arc<Injector> {
        Arc::new(Injector {
            shards,
            token,
            shared,
            max_recipients,
            next: AtomicUsize::new(0),
        })
    }

    /// `router` with `POST /v1/inject` added, its body limit set from
    /// `max_message_size`.
    pub fn routes(self: &Arc<Injector>, router: Router, max_message_size: u64) -> Router {
        let me = self.clone();
        router
            .route("POST", PATH, move |req| {
                let resp = match super::api::authorized(&me.token, req) {
                    Ok(()) => me.inject(req),
                    Err(resp) => resp,
                };
                if resp.status != 200 {
                    crate::metrics::injected(resp.status, 0, 0, 0);
                }
                resp
            })
            .body_limit(PATH, body_limit(max_message_size, self.max_recipients))
    }

    fn inject(&self, req: &Request) -> Response {
        let started = Instant::now();
        let call: InjectRequest = match serde_json::from_slice(&req.body) {
            Ok(c) => c,
            Err(e) => return Response::error(400, &format!("bad JSON body: {e}")),
        };
        let session = self.shared.live.load().session.clone();
        let plan = match Plan::new(&call, &session, self.max_recipients) {
            Ok(p) => p,
            Err(resp) => return resp,
        };
        let client = req
            .peer
            .unwrap_or_else(|| std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
        let mut out = Outcome {
            rejected: plan.rejected.clone(),
            ..Outcome::default()
        };
        let mut batch = Vec::new();
        let mut batch_rcpts: Vec<Vec<String>> = Vec::new();
        let mut bytes = 0;
        let mut stop: Option<(u16, String)> = None;
        let hostname = &session.hostname;
        for group in plan.groups(session.max_recipients.max(1)) {
            if stop.is_some() {
                for r in group.rcpts {
                    out.reject(r, "451 4.3.0 not tried: an earlier message failed", true);
                }
                continue;
            }
            let date = crate::smtp::envelope::rfc5322_date(SystemTime::now());
            let message_id = message_id(hostname);
            let stamp = Stamp {
                date: &date,
                message_id: &message_id,
            };
            let built = match (&call.message, &call.content) {
                (Some(raw), _) => inject::raw_message(raw, group.vars, stamp),
                // 7-bit, but for a non-ASCII recipient in a default `To:`.
                (None, Some(c)) => inject::build(c, group.vars, &group.rcpts, stamp).map(|b| {
                    let eight_bit = !b.is_ascii();
                    (b, eight_bit)
                }),
                (None, None) => unreachable!("Plan::new checked"),
            };
            let (body, eight_bit) = match built {
                Ok(b) => b,
                Err(why) => {
                    for r in group.rcpts {
                        out.reject(r, &format!("554 5.6.0 {why}"), false);
                    }
                    continue;
                }
            };
            if body.len() as u64 > session.max_message_size {
                for r in group.rcpts {
                    out.reject(r, "552 5.3.4 Message size exceeds fixed limit", false);
                }
                out.too_large = true;
                continue;
            }
            bytes += body.len();
            batch_rcpts.push(group.rcpts.clone());
            batch.push(Injected {
                mail_from: plan.mail_from.clone(),
                smtputf8: plan.smtputf8 || group.utf8,
                rcpts: group.rcpts,
                body,
                eight_bit,
            });
            if batch.len() >= BATCH_MESSAGES || bytes >= BATCH_BYTES {
                stop = self.send(client, &mut batch, &mut batch_rcpts, &mut out);
                bytes = 0;
            }
        }
        if stop.is_none() && !batch.is_empty() {
            stop = self.send(client, &mut batch, &mut batch_rcpts, &mut out);
        }
        let status = match (&stop, out.accepted) {
            (_, 1..) => 200,
            (Some((code, _)), 0) => *code,
            (None, 0)
                if out.too_large && out.rejected.iter().all(|r| r.reason.starts_with("552")) =>
            {
                413
            }
            (None, 0) => 422,
        };
        let rejected = out.rejected.len() as u64;
        crate::metrics::injected(
            status,
            out.messages.len() as u64,
            out.accepted as u64,
            rejected,
        );
        tracing::info!(
            peer = %client,
            status,
            messages = out.messages.len(),
            accepted = out.accepted,
            rejected,
            took_ms = started.elapsed().as_millis() as u64,
            "HTTP injection"
        );
        let mut body = json!({
            "messages": out.messages,
            "accepted": out.accepted,
            "rejected": out.rejected,
        });
        if let Some((_, why)) = stop {
            body["error"] = json!(why);
        }
        Response::json(status, &body)
    }

    /// Sends `batch` to the next shard and waits for its answer; the
    /// stored messages and failed recipients go into `out`. `Some` with
    /// the status and why when nothing more should be tried.
    fn send(
        &self,
        client: std::net::SocketAddr,
        batch: &mut Vec<Injected>,
        rcpts: &mut Vec<Vec<String>>,
        out: &mut Outcome,
    ) -> Option<(u16, String)> {
        let messages = std::mem::take(batch);
        let rcpts = std::mem::take(rcpts);
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let mut req = Some(ShardRequest {
            command: Command::Inject(InjectBatch { client, messages }),
            reply: tx,
        });
        let deadline = Instant::now() + SHARD_TIMEOUT;
        // Round-robin; a shard whose channel is full is passed over, and
        // when all are, the call waits for room (bounded by the deadline).
        while let Some(r) = req.take() {
            let mut pending = Some(r);
            let mut full = 0;
            for _ in 0..self.shards.len() {
                let i = self.next.fetch_add(1, Ordering::Relaxed) % self.shards.len();
                let Some(r) = pending.take() else { break };
                if let Err(e) = self.shards[i].clone().try_send(r) {
                    full += usize::from(e.is_full());
                    pending = Some(e.into_inner());
                }
            }
            if pending.is_some() {
                req = pending;
                // Every channel closed: the shards are stopping.
                if full == 0 || Instant::now() > deadline {
                    let why = "the shards are busy; try again";
                    for r in rcpts.into_iter().flatten() {
                        out.reject(r, "451 4.3.0 not tried: the shards are busy", true);
                    }
                    return Some((503, why.into()));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let results = match rx.recv_timeout(left) {
            Ok((_, Answer::Injected(r))) if r.len() == rcpts.len() => r,
            Ok(_) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                vec![Err(InjectFailure::Failed); rcpts.len()]
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                for r in rcpts.into_iter().flatten() {
                    out.reject(
                        r,
                        "451 4.3.0 the shard did not answer in time; may be queued",
                        true,
                    );
                }
                return Some((
                    504,
                    "a shard did not answer in time; messages it stored stay queued".into(),
                ));
            }
        };
        let mut stop = None;
        for (result, rcpts) in results.into_iter().zip(rcpts) {
            match result {
                Ok(id) => {
                    out.accepted += rcpts.len();
                    out.messages.push(Stored {
                        id,
                        recipients: rcpts,
                    });
                }
                Err(InjectFailure::NoSpace) => {
                    for r in rcpts {
                        out.reject(r, "452 4.3.1 Insufficient system storage", true);
                    }
                    stop = Some((507, "the spool is full".into()));
                }
                Err(InjectFailure::Failed) => {
                    for r in rcpts {
                        out.reject(r, "451 4.3.0 not stored (see the log)", true);
                    }
                    stop.get_or_insert((503, "messages could not be stored".into()));
                }
            }
        }
        stop
    }
}

/// The call's checked envelope and its recipients, grouped into messages.
struct Plan<'a> {
    mail_from: Option<String>,
    smtputf8: bool,
    /// Accepted recipients without vars (address, needs SMTPUTF8).
    shared: Vec<(String, bool)>,
    /// Accepted recipients with vars.
    own: Vec<(String, bool, &'a BTreeMap<String, String>)>,
    rejected: Vec<Rejected>,
}

/// The recipients of one message and the vars it is built with.
struct Group<'a> {
    rcpts: Vec<String>,
    utf8: bool,
    vars: Option<&'a BTreeMap<String, String>>,
}

impl<'a> Plan<'a> {
    fn new(
        call: &'a InjectRequest,
        session: &SessionConfig,
        max_recipients: usize,
    ) -> Result<Plan<'a>, Response> {
        match (&call.message, &call.content) {
            (Some(_), Some(_)) | (None, None) => {
                return Err(Response::error(400, "give one of message, content"))
            }
            _ => {}
        }
        if call.recipients.is_empty() {
            return Err(Response::error(400, "recipients is empty"));
        }
        if call.recipients.len() > max_recipients {
            return Err(Response::error(
                413,
                &format!("more than {max_recipients} recipients (--inject-max-recipients)"),
            ));
        }
        let (mail_from, smtputf8) =
            inject::check_sender(&call.mail_from).map_err(|e| Response::error(400, &e))?;
        // The parts must build without any vars: what fails then fails for
        // every recipient, and is the caller's error.
        let stamp = Stamp {
            date: "Thu, 1 Jan 1970 00:00:00 +0000",
            message_id: "<check@localhost>",
        };
        let trial = match (&call.message, &call.content) {
            (Some(raw), _) => inject::raw_message(raw, None, stamp).map(|_| ()),
            (None, Some(c)) => inject::build(c, None, &[], stamp).map(|_| ()),
            (None, None) => Ok(()),
        };
        trial.map_err(|e| Response::error(400, &e))?;
        let mut plan = Plan {
            mail_from,
            smtputf8,
            shared: Vec::new(),
            own: Vec::new(),
            rejected: Vec::new(),
        };
        // A recipient given twice without vars is queued once.
        let mut shared_seen = std::collections::HashSet::new();
        for spec in &call.recipients {
            match inject::check_recipient(session, spec.address()) {
                Ok((addr, utf8)) => match spec.vars() {
                    Some(vars) => plan.own.push((addr, utf8, vars)),
                    None if shared_seen.insert(addr.clone()) => plan.shared.push((addr, utf8)),
                    None => {}
                },
                Err(why) => plan.rejected.push(Rejected {
                    rcpt: spec.address().to_owned(),
                    reason: why,
                    temporary: false,
                }),
            }
        }
        Ok(plan)
    }

    /// The messages to build: the shared recipients in messages of at most
    /// `per_message`, then one per recipient with vars.
    fn groups(&self, per_message: usize) -> impl Iterator<Item = Group<'a>> + '_ {
        let shared = self.shared.chunks(per_message).map(|c| Group {
            rcpts: c.iter().map(|(a, _)| a.clone()).collect(),
            utf8: c.iter().any(|(_, u)| *u),
            vars: None,
        });
        let own = self.own.iter().map(|(a, u, v)| Group {
            rcpts: vec![a.clone()],
            utf8: *u,
            vars: Some(*v),
        });
        shared.chain(own)
    }
}

#[derive(Debug, Default)]
struct Outcome {
    messages: Vec<Stored>,
    accepted: usize,
    rejected: Vec<Rejected>,
    too_large: bool,
}

impl Outcome {
    fn reject(&mut self, rcpt: String, reason: &str, temporary: bool) {
        self.rejected.push(Rejected {
            rcpt,
            reason: reason.to_owned(),
            temporary,
        });
    }
}

#[derive(Debug, Serialize)]
struct Stored {
    id: String,
    recipients: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
struct Rejected {
    rcpt: String,
    reason: String,
    /// Not refused by policy: the spool could not take it now; send again.
    temporary: bool,
}

/// `<time.seq.inject.pid@host>`: unique across calls, restarts and hosts.
fn message_id(hostname: &str) -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    format!(
        "<{nanos:x}.{seq:x}.inject.{}@{hostname}>",
        std::process::id()
    )
}
