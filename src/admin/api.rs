//! The JSON queue-control API under `/api/v1/` (README "Admin API and
//! queue control" is the contract): queue summary per destination,
//! list/show, hold/release/flush/delete/bounce by id, recipient domain or
//! destination, and suspending destinations.
//!
//! Every command goes to every shard over its bounded channel
//! ([`crate::relay::control`]); the answers come back within
//! [`SHARD_TIMEOUT`], else 504 (what a shard already journaled stays
//! done). With `--admin-token-file`, every request here must carry
//! `Authorization: Bearer <token>` (compared in constant time), else 401.
//! Each action is written to the event log (`event=admin`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use futures_channel::mpsc;
use serde::Deserialize;
use serde_json::json;

use super::{Request, Response, Router};
use crate::relay::control::{
    split_suspension_key, suspension_key, Action, Affected, Answer, Command, DestSummary,
    MessageInfo, Request as ShardRequest, Selector, Suspension, Suspensions,
};

/// How long the API waits for every shard's answer.
pub const SHARD_TIMEOUT: Duration = Duration::from_secs(120);
/// Commands waiting for one shard (each sender has a slot of its own
/// besides).
pub const SHARD_QUEUE: usize = 16;
/// The longest suspension.
pub const MAX_SUSPENSION: Duration = Duration::from_secs(30 * 86_400);
/// Messages a list answers by default, and at most.
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 10_000;

/// The admin side's end of the shards' command channels, the suspensions
/// file and the bearer token.
pub struct Api {
    shards: Vec<mpsc::Sender<ShardRequest>>,
    suspensions: Mutex<Suspensions>,
    /// `None`: no token needed. Replaced on SIGHUP.
    token: Arc<ArcSwapOption<String>>,
    /// The delivery configuration in force (its shaping rules), replaced
    /// on SIGHUP.
    relay: Arc<arc_swap::ArcSwap<crate::relay::RelayConfig>>,
}

/// One command channel per shard: the senders for [`Api::new`], the
/// receivers for the shards.
#[allow(clippy::type_complexity)]
pub fn channels(
    shards: usize,
) -> (
    Vec<mpsc::Sender<ShardRequest>>,
    Vec<Option<mpsc::Receiver<ShardRequest>>>,
) {
    (0..shards)
        .map(|_| {
            let (tx, rx) = mpsc::channel(SHARD_QUEUE);
            (tx, Some(rx))
        })
        .unzip()
}

impl Api {
    pub fn new(
        shards: Vec<mpsc::Sender<ShardRequest>>,
        suspensions: Suspensions,
        token: Arc<ArcSwapOption<String>>,
        relay: Arc<arc_swap::ArcSwap<crate::relay::RelayConfig>>,
    ) -> Arc<Api> {
        let mut suspensions = suspensions;
        crate::metrics::suspended_destinations().set(suspensions.active(unix_now()).len() as i64);
        Arc::new(Api {
            shards,
            suspensions: Mutex::new(suspensions),
            token,
            relay,
        })
    }

    /// `router` with the API's routes added.
    pub fn routes(self: &Arc<Api>, router: Router) -> Router {
        let r = |f: fn(&Api, &Request) -> Response| {
            let api = self.clone();
            move |req: &Request| match api.authorized(req) {
                Ok(()) => f(&api, req),
                Err(resp) => resp,
            }
        };
        router
            .route("GET", "/api/v1/queue", r(Api::summary))
            .route("GET", "/api/v1/queue/messages", r(Api::list))
            .route("GET", "/api/v1/queue/messages/", r(Api::show))
            .route("POST", "/api/v1/queue/hold", r(Api::act))
            .route("POST", "/api/v1/queue/release", r(Api::act))
            .route("POST", "/api/v1/queue/flush", r(Api::act))
            .route("POST", "/api/v1/queue/delete", r(Api::act))
            .route("POST", "/api/v1/queue/bounce", r(Api::act))
            .route("POST", "/api/v1/suspend", r(Api::suspend))
            .route("POST", "/api/v1/resume", r(Api::resume))
            .route("GET", "/api/v1/suspensions", r(Api::suspensions))
            .route("GET", "/api/v1/shaping", r(Api::shaping))
    }

    /// `GET /api/v1/shaping`: the `--shaping` rules in force (the file's
    /// entries over the built-in ones), or with `?domain=D` (and `&mx=H,H`
    /// for the MX hosts a provider entry would match, as delivery looks
    /// them up) the limits in force for mail to that domain, the budget
    /// that counts it and, with `&sender=S`, the pool it would leave by.
    fn shaping(&self, req: &Request) -> Response {
        let cfg = self.relay.load_full();
        let rules = &cfg.shaping;
        let (mut domain, mut mx, mut sender) = (None, Vec::new(), None);
        for (k, v) in query_pairs(req.query.as_deref()) {
            match k.as_str() {
                "domain" => domain = Some(v.trim_end_matches('.').to_ascii_lowercase()),
                "mx" => mx = v.split(',').map(|h| h.trim().to_owned()).collect(),
                "sender" => sender = Some(v),
                other => return Response::error(400, &format!("unknown parameter {other:?}")),
            }
        }
        let Some(domain) = domain else {
            if !mx.is_empty() || sender.is_some() {
                return Response::error(400, "mx and sender need a domain");
            }
            return Response::json(200, &rules_json(rules));
        };
        let target = cfg.target(&format!("x@{domain}"));
        let destination = target.to_string();
        let shape = rules.shape(Some(&domain), &destination, mx.iter().map(String::as_str));
        let pool = rules
            .pool_for(None, sender.as_deref(), target.name())
            .map(|p| p.name.clone());
        Response::json(
            200,
            &json!({
                "domain": domain,
                "destination": destination,
                "budget": shape.key.to_string(),
                "limits": {
                    "max_connections": shape.max_connections,
                    "max_message_rate": shape.max_message_rate.map(|r| r.to_string()),
                    "max_connection_rate": shape.max_connection_rate.map(|r| r.to_string()),
                    "max_deliveries_per_connection": shape.max_deliveries_per_connection,
                    "idle_timeout": format!("{}s", shape.idle_timeout.as_secs_f64()),
                    "tls_policy": shape.tls_policy.unwrap_or(cfg.tls_policy).name(),
                    "retry": schedule_json(shape.retry.as_deref().unwrap_or(&cfg.retry_schedule)),
                },
                "pool": pool,
            }),
        )
    }

    fn authorized(&self, req: &Request) -> Result<(), Response> {
        authorized(&self.token, req)
    }

    /// Sends `command` to every shard; their answers, or the response to
    /// give when one cannot be had.
    fn ask_all(&self, command: Command) -> Result<Vec<Answer>, Response> {
        let (tx, rx) = std::sync::mpsc::sync_channel(self.shards.len());
        for (i, shard) in self.shards.iter().enumerate() {
            let req = ShardRequest {
                command: command.clone(),
                reply: tx.clone(),
            };
            if let Err(e) = shard.clone().try_send(req) {
                let why = if e.is_full() {
                    format!("shard {i} is busy with other admin commands; try again")
                } else {
                    format!("shard {i} is not running")
                };
                return Err(Response::error(503, &why));
            }
        }
        drop(tx);
        let deadline = Instant::now() + SHARD_TIMEOUT;
        let mut answers = Vec::with_capacity(self.shards.len());
        while answers.len() < self.shards.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok((_, Answer::Error(why))) => return Err(Response::error(409, &why)),
                Ok((_, a)) => answers.push(a),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    return Err(Response::error(
                        504,
                        "a shard did not answer in time; what it did so far stays done",
                    ))
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(Response::error(
                        500,
                        "a shard failed to carry out the command (see the log)",
                    ))
                }
            }
        }
        Ok(answers)
    }

    fn summary(&self, _: &Request) -> Response {
        let answers = match self.ask_all(Command::Summary) {
            Ok(a) => a,
            Err(resp) => return resp,
        };
        let mut merged: HashMap<String, DestSummary> = HashMap::new();
        for a in answers {
            let Answer::Summary(list) = a else { continue };
            for d in list {
                let m = merged
                    .entry(d.destination.clone())
                    .or_insert_with(|| DestSummary {
                        destination: d.destination.clone(),
                        ..DestSummary::default()
                    });
                m.messages += d.messages;
                m.recipients += d.recipients;
                m.held += d.held;
                m.oldest_age = m.oldest_age.max(d.oldest_age);
            }
        }
        let suspended: Vec<Suspension> = self.lock().active(unix_now()).to_vec();
        // One source's suspension does not stop the destination.
        for s in suspended.iter().filter(|s| s.source.is_none()) {
            let mut named = false;
            for m in merged.values_mut() {
                if target_named(&m.destination, &s.destination) {
                    m.suspended_until = Some(s.until);
                    named = true;
                }
            }
            if !named {
                merged.insert(
                    s.destination.clone(),
                    DestSummary {
                        destination: s.destination.clone(),
                        suspended_until: Some(s.until),
                        ..DestSummary::default()
                    },
                );
            }
        }
        let mut list: Vec<DestSummary> = merged.into_values().collect();
        list.sort_by(|a, b| (b.recipients, &a.destination).cmp(&(a.recipients, &b.destination)));
        Response::json(200, &json!({ "destinations": list }))
    }

    fn list(&self, req: &Request) -> Response {
        let q = query_pairs(req.query.as_deref());
        let mut selector = None;
        let mut limit = DEFAULT_LIMIT;
        for (k, v) in &q {
            match k.as_str() {
                "domain" | "destination" | "id" if selector.is_some() => {
                    return Response::error(400, "give one of id, domain, destination")
                }
                "domain" => selector = Some(Selector::Domain(v.clone())),
                "destination" => selector = Some(Selector::Destination(v.clone())),
                "id" => selector = Some(Selector::Id(v.clone())),
                "limit" => match v.parse::<usize>() {
                    Ok(n) if (1..=MAX_LIMIT).contains(&n) => limit = n,
                    _ => return Response::error(400, "limit: a number from 1 to 10000"),
                },
                other => return Response::error(400, &format!("unknown parameter {other:?}")),
            }
        }
        let answers = match self.ask_all(Command::List { selector, limit }) {
            Ok(a) => a,
            Err(resp) => return resp,
        };
        let mut all: Vec<MessageInfo> = answers
            .into_iter()
            .flat_map(|a| match a {
                Answer::Messages(m) => m,
                _ => Vec::new(),
            })
            .collect();
        all.sort_by(|a, b| (a.arrival, &a.id).cmp(&(b.arrival, &b.id)));
        let truncated = all.len() > limit;
        all.truncate(limit);
        Response::json(200, &json!({ "messages": all, "truncated": truncated }))
    }

    fn show(&self, req: &Request) -> Response {
        let id = req.path.trim_start_matches("/api/v1/queue/messages/");
        if id.is_empty() || id.contains('/') {
            return Response::error(404, "no such message");
        }
        let id = percent_decode(id);
        let answers = match self.ask_all(Command::Show { id: id.clone() }) {
            Ok(a) => a,
            Err(resp) => return resp,
        };
        for a in answers {
            if let Answer::Message(Some(m)) = a {
                return Response::json(200, &json!({ "message": m }));
            }
        }
        Response::error(404, &format!("no queued message {id}"))
    }

    fn act(&self, req: &Request) -> Response {
        let verb = req.path.rsplit('/').next().unwrap_or_default();
        let body: ActBody = match serde_json::from_slice(&req.body) {
            Ok(b) => b,
            Err(e) => return Response::error(400, &format!("bad JSON body: {e}")),
        };
        let selector = match (body.id, body.domain, body.destination) {
            (Some(v), None, None) => Selector::Id(v),
            (None, Some(v), None) => Selector::Domain(v),
            (None, None, Some(v)) => Selector::Destination(v),
            _ => return Response::error(400, "give exactly one of id, domain, destination"),
        };
        if matches!(&selector, Selector::Id(v) | Selector::Domain(v) | Selector::Destination(v) if v.is_empty())
        {
            return Response::error(400, "the selector is empty");
        }
        let action = match (verb, body.reason) {
            ("hold", None) => Action::Hold,
            ("release", None) => Action::Release,
            ("flush", None) => Action::Flush,
            ("delete", None) => Action::Delete,
            ("bounce", Some(r)) if !r.trim().is_empty() => Action::Bounce { reason: r },
            ("bounce", _) => return Response::error(400, "bounce needs a \"reason\""),
            (_, Some(_)) => return Response::error(400, "only bounce takes a \"reason\""),
            _ => return Response::error(404, "no such action"),
        };
        let answers = match self.ask_all(Command::Act {
            action: action.clone(),
            selector: selector.clone(),
        }) {
            Ok(a) => a,
            Err(resp) => return resp,
        };
        let mut total = Affected::default();
        for a in answers {
            if let Answer::Affected(x) = a {
                total.messages += x.messages;
                total.recipients += x.recipients;
                total.failed += x.failed;
                total.ids.extend(x.ids);
            }
        }
        // Work for these messages already queued on another shard (the
        // destination's owner) goes back too.
        if action.withdraws() && !total.ids.is_empty() && self.shards.len() > 1 {
            let ids = std::mem::take(&mut total.ids);
            if let Err(resp) = self.ask_all(Command::Withdraw { ids }) {
                return resp;
            }
        }
        tracing::info!(
            target: "ringmta::event",
            event = "admin",
            action = action.name(),
            selector = %selector,
            messages = total.messages,
            recipients = total.recipients,
            failed = total.failed,
            "admin action"
        );
        let (kind, value) = selector_parts(&selector);
        let status = if total.failed > 0 { 500 } else { 200 };
        Response::json(
            status,
            &json!({
                "action": action.name(),
                "selector": { kind: value },
                "messages": total.messages,
                "recipients": total.recipients,
                "failed": total.failed,
            }),
        )
    }

    fn suspend(&self, req: &Request) -> Response {
        let body: SuspendBody = match serde_json::from_slice(&req.body) {
            Ok(b) => b,
            Err(e) => return Response::error(400, &format!("bad JSON body: {e}")),
        };
        let destination = body.destination.trim().to_ascii_lowercase();
        if destination.is_empty() {
            return Response::error(400, "destination is empty");
        }
        let duration = match crate::cli::parse_duration(&body.duration) {
            Ok(d) if d >= Duration::from_secs(1) && d <= MAX_SUSPENSION => d,
            Ok(_) => return Response::error(400, "duration: from 1s to 30d"),
            Err(e) => return Response::error(400, &format!("duration: {e}")),
        };
        let until = unix_now() + duration.as_secs();
        let reason = body.reason.unwrap_or_default();
        let source = match source_of(body.source) {
            Ok(s) => s,
            Err(resp) => return resp,
        };
        let s = Suspension {
            destination: destination.clone(),
            source,
            until,
            reason: reason.clone(),
        };
        let key = s.key();
        {
            let mut list = self.lock();
            if let Err(e) = list.add(s.clone()) {
                return Response::error(500, &format!("cannot record the suspension: {e}"));
            }
            crate::metrics::suspended_destinations().set(list.active(unix_now()).len() as i64);
        }
        let told = self.ask_all(Command::Suspend {
            destination: key.clone(),
            until,
        });
        tracing::info!(
            target: "ringmta::event",
            event = "admin",
            action = "suspend",
            selector = %format!("destination={key}"),
            until,
            reason = %reason,
            "admin action"
        );
        match told {
            Ok(_) => Response::json(200, &s),
            Err(resp) => resp,
        }
    }

    fn resume(&self, req: &Request) -> Response {
        let body: ResumeBody = match serde_json::from_slice(&req.body) {
            Ok(b) => b,
            Err(e) => return Response::error(400, &format!("bad JSON body: {e}")),
        };
        let destination = body.destination.trim().to_ascii_lowercase();
        let source = match source_of(body.source) {
            Ok(s) => s,
            Err(resp) => return resp,
        };
        let key = suspension_key(&destination, source.as_deref());
        let was = {
            let mut list = self.lock();
            let was = match list.remove(&key) {
                Ok(w) => w,
                Err(e) => return Response::error(500, &format!("cannot record the resume: {e}")),
            };
            crate::metrics::suspended_destinations().set(list.active(unix_now()).len() as i64);
            was
        };
        let told = self.ask_all(Command::Resume {
            destination: key.clone(),
        });
        // A destination the shards suspended themselves (a throttling
        // reply, `--bounce-rules`) is in no list here: a shard says it was.
        let by_shards =
            matches!(&told, Ok(a) if a.iter().any(|a| matches!(a, Answer::Count(n) if *n > 0)));
        if !was && !by_shards {
            return Response::error(404, &format!("{key} is not suspended"));
        }
        tracing::info!(
            target: "ringmta::event",
            event = "admin",
            action = "resume",
            selector = %format!("destination={key}"),
            "admin action"
        );
        match told {
            Ok(_) => Response::json(
                200,
                &json!({ "destination": destination, "source": source, "resumed": true }),
            ),
            Err(resp) => resp,
        }
    }

    /// The operator's suspensions, then those the shards made themselves
    /// (a throttling reply, `--bounce-rules`), with the reason
    /// `automatic`. A shard that does not answer leaves its own out.
    fn suspensions(&self, _: &Request) -> Response {
        let mut list = self.lock().active(unix_now()).to_vec();
        if let Ok(answers) = self.ask_all(Command::Suspensions) {
            let mut automatic: std::collections::BTreeMap<String, u64> = Default::default();
            for a in answers {
                let Answer::Suspended(s) = a else { continue };
                for (key, until) in s {
                    if !list.iter().any(|x| x.key() == key) {
                        let slot = automatic.entry(key).or_insert(until);
                        *slot = (*slot).max(until);
                    }
                }
            }
            list.extend(automatic.into_iter().map(|(key, until)| {
                let (destination, source) = split_suspension_key(&key);
                Suspension {
                    destination: destination.to_owned(),
                    source: source.map(str::to_owned),
                    until,
                    reason: "automatic".into(),
                }
            }));
        }
        Response::json(200, &json!({ "suspensions": list }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Suspensions> {
        self.suspensions.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ActBody {
    id: Option<String>,
    domain: Option<String>,
    destination: Option<String>,
    reason: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SuspendBody {
    destination: String,
    duration: String,
    reason: Option<String>,
    /// Only this source's mail to the destination.
    source: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResumeBody {
    destination: String,
    source: Option<String>,
}

/// A source named in a suspend or resume body: a shaping file's source
/// name, lower case.
fn source_of(source: Option<String>) -> Result<Option<String>, Response> {
    match source.map(|s| s.trim().to_ascii_lowercase()) {
        None => Ok(None),
        Some(s) if crate::relay::shaping::valid_pool_name(&s) => Ok(Some(s)),
        Some(_) => Err(Response::error(400, "source: not a source name")),
    }
}

/// `Ok` when no token is set (`--admin-token-file`) or `req` carries it
/// as `Authorization: Bearer <token>` (compared in constant time); else
/// the 401 to answer.
pub fn authorized(token: &ArcSwapOption<String>, req: &Request) -> Result<(), Response> {
    let Some(token) = token.load_full() else {
        return Ok(());
    };
    // The scheme is case-insensitive (RFC 9110 11.1).
    let given = req
        .authorization
        .as_deref()
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim());
    match given {
        Some(g) if constant_time_eq(g.as_bytes(), token.as_bytes()) => Ok(()),
        _ => Err(Response::error(
            401,
            "a bearer token is required (--admin-token-file)",
        )),
    }
}

fn selector_parts(s: &Selector) -> (&'static str, &str) {
    match s {
        Selector::Id(v) => ("id", v),
        Selector::Domain(v) => ("domain", v),
        Selector::Destination(v) => ("destination", v),
    }
}

/// Whether the suspension name `named` (a target's whole text or its host
/// or domain) names the destination whose text is `destination`.
fn target_named(destination: &str, named: &str) -> bool {
    if destination.eq_ignore_ascii_case(named) {
        return true;
    }
    // `smtp:HOST:PORT` / `mx:DOMAIN:PORT`: the middle part.
    let mut parts = destination.splitn(2, ':');
    let (_, rest) = (parts.next(), parts.next().unwrap_or_default());
    rest.rsplit_once(':')
        .is_some_and(|(name, _)| name.eq_ignore_ascii_case(named))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Compares in time that depends on the lengths only.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `k=v&k=v`, percent-decoded (`+` is a space).
fn query_pairs(q: Option<&str>) -> Vec<(String, String)> {
    q.unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(&v.replace('+', " ")))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One entry's keys as JSON (`null`: not set, the next entry down
/// decides).
fn limits_json(l: &crate::relay::shaping::Limits) -> serde_json::Value {
    json!({
        "max_connections": l.max_connections,
        "max_message_rate": l.max_message_rate.map(|r| r.to_string()),
        "max_connection_rate": l.max_connection_rate.map(|r| r.to_string()),
        "max_deliveries_per_connection": l.max_deliveries_per_connection,
        "idle_timeout": l.idle_timeout.map(|d| format!("{}s", d.as_secs_f64())),
        "tls_policy": l.tls_policy.map(|p| p.name()),
        "retry": l.retry.as_ref().map(|r| schedule_json(r)),
    })
}

/// A retry schedule as the file writes it (`["60s", "300s"]`).
fn schedule_json(schedule: &[Duration]) -> Vec<String> {
    schedule
        .iter()
        .map(|d| format!("{}s", d.as_secs_f64()))
        .collect()
}

/// The whole rule set as JSON, names sorted.
fn rules_json(rules: &crate::relay::shaping::Rules) -> serde_json::Value {
    let sorted = |m: Vec<(&String, serde_json::Value)>| {
        let mut m = m;
        m.sort_by(|a, b| a.0.cmp(b.0));
        serde_json::Value::Object(m.into_iter().map(|(k, v)| (k.clone(), v)).collect())
    };
    json!({
        "default": limits_json(&rules.default),
        "domains": sorted(rules.domains.iter().map(|(d, l)| (d, limits_json(l))).collect()),
        "providers": rules.providers.iter().map(|p| json!({
            "name": p.name,
            "mx": p.mx,
            "limits": limits_json(&p.limits),
        })).collect::<Vec<_>>(),
        "sources": sorted(rules.sources.iter().map(|(n, s)| (n, json!({
            "bind": s.bind.to_string(),
            "ehlo": s.ehlo,
        }))).collect()),
        "pools": sorted(rules.pools.iter().map(|(n, p)| (n, serde_json::Value::Object(
            p.sources.iter().map(|(s, w)| (s.to_string(), json!(w))).collect(),
        ))).collect()),
        "senders": sorted(rules.senders.iter().map(|(d, p)| (d, json!(p))).collect()),
        "routes": sorted(rules.routes.iter().map(|(r, p)| (r, json!(p))).collect()),
        "default_pool": rules.default_pool,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_and_names() {
        assert_eq!(
            query_pairs(Some("domain=ex%41mple.org&limit=5")),
            [
                ("domain".to_owned(), "exAmple.org".to_owned()),
                ("limit".to_owned(), "5".to_owned())
            ]
        );
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("a%20b"), "a b");
        assert!(target_named("smtp:127.0.0.1:2526", "127.0.0.1"));
        assert!(target_named("smtp:127.0.0.1:2526", "SMTP:127.0.0.1:2526"));
        assert!(target_named("mx:example.org:25", "example.org"));
        assert!(!target_named("mx:example.org:25", "example"));
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
