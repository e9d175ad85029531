//! HTTP injection on a shard: the messages the admin side built and
//! checked ([`crate::admin::inject`]) arrive over the shard's bounded
//! command channel; here each is DKIM-signed when `--dkim-relay-network
//! on` (on the signing pool, as relay-network mail), stored with a
//! `Received:` field naming HTTP injection, and queued for delivery. All
//! messages of a batch are stored at once, so they share the spool's group
//! commits; the answer goes back when every one is durable (fdatasync
//! returned) or failed, which is what lets the HTTP reply mean what a 250
//! means.
//!
//! Must never acknowledge a message that is not on disk, and never
//! block the shard: the signing runs on the pool, the stores are tasks.

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::SystemTime;

use super::shard::ShardState;
use crate::relay::control::{Answer, InjectBatch, InjectFailure, Injected};
use crate::smtp::command::Body;
use crate::smtp::envelope::{rfc5322_date, Envelope, Message, Protocol, Rcpt};
use crate::smtp::CommitResult;

/// Stores `batch`'s messages on this shard; one result per message, in
/// order.
pub(crate) async fn store_batch(state: &Rc<ShardState>, batch: InjectBatch) -> Answer {
    let client = batch.client;
    // Counted in the shard's body budget while it is stored (its copy in
    // the commit batch too), so SMTP clients see the room it takes; its
    // size is bounded by the admin side (a batch of at most 16 MiB, or one
    // message).
    let held: usize = batch
        .messages
        .iter()
        .map(|m| m.body.capacity() + m.body.len())
        .sum();
    let mut charge = state.budget.charge(client.ip());
    charge.set(held);
    let tasks: Vec<_> = batch
        .messages
        .into_iter()
        .map(|m| {
            let state = state.clone();
            glommio::spawn_local(async move {
                let mut out = None;
                let done = crate::util::isolate(async {
                    out = Some(store_one(&state, m, client).await);
                })
                .await;
                if let Err(what) = done {
                    tracing::error!(shard = state.ctx.id, panic = %what, "injected message panicked");
                }
                out.unwrap_or(Err(InjectFailure::Failed))
            })
        })
        .collect();
    let mut results = Vec::with_capacity(tasks.len());
    for t in tasks {
        results.push(t.await);
    }
    drop(charge);
    Answer::Injected(results)
}

async fn store_one(
    state: &ShardState,
    m: Injected,
    client: SocketAddr,
) -> Result<String, InjectFailure> {
    let rcpts = m.rcpts.len();
    let mut msg = Message {
        envelope: Envelope {
            peer: client,
            helo: String::new(),
            protocol: Protocol {
                esmtp: true,
                tls: false,
                auth: false,
                utf8: m.smtputf8,
            },
            mail_from: m.mail_from,
            size: None,
            body: m.eight_bit.then_some(Body::EightBitMime),
            smtputf8: m.smtputf8,
            ret: None,
            envid: None,
            rcpts: m
                .rcpts
                .into_iter()
                .map(|addr| Rcpt {
                    addr,
                    notify: None,
                    orcpt: None,
                })
                .collect(),
            chunked: false,
            pool: None,
        },
        body: m.body,
    };
    // The caller is trusted as a relay-network client: its message may
    // name a source-IP pool, the field taken out as from SMTP.
    if let Some(named) = crate::smtp::field::take(&mut msg.body, super::conn::POOL_FIELD) {
        if crate::relay::shaping::valid_pool_name(&named) {
            msg.envelope.pool = Some(named);
        }
    }
    let who = format!("http:{client}");
    let added = if state.ctx.shared.live.load().dkim_relay_network {
        match super::conn::dkim_sign_trusted(state, &mut msg, Vec::new(), &who).await {
            Ok(added) => added,
            Err(_) => return Err(InjectFailure::Failed),
        }
    } else {
        Vec::new()
    };
    let from = msg.envelope.mail_from.clone().unwrap_or_default();
    let size = msg.body.len() + added.len();
    match state.spool.store_traced(msg, trace_header, &added).await {
        Ok(id) => {
            tracing::info!(
                target: "ringmta::event",
                event = "inject",
                shard = state.ctx.id,
                queue_id = %id,
                peer = %client,
                from = %from,
                nrcpt = rcpts,
                size,
                signed = !added.is_empty(),
                "accepted"
            );
            if let Some(relay) = &state.relay {
                relay.enqueue(id.clone());
            }
            Ok(id)
        }
        Err(e) => {
            tracing::warn!(peer = %who, error = %e, "injected message not stored");
            match e.commit_result() {
                CommitResult::NoSpace => {
                    state.metrics.shortage(crate::metrics::Shortage::DiskFull);
                    Err(InjectFailure::NoSpace)
                }
                _ => Err(InjectFailure::Failed),
            }
        }
    }
}

/// `Received: from [IP] (HTTP injection) by HOST (ringmta) with HTTP id
/// ID [for <rcpt>]; DATE`: the trace field of injected mail.
fn trace_header(env: &Envelope, hostname: &str, id: &str, now: SystemTime) -> String {
    let mut h = String::with_capacity(200);
    h.push_str("Received: from [");
    h.push_str(&env.peer.ip().to_canonical().to_string());
    h.push_str("] (HTTP injection)\r\n\tby ");
    h.push_str(hostname);
    h.push_str(" (ringmta) with HTTP id ");
    h.push_str(id);
    if let [only] = env.rcpts.as_slice() {
        h.push_str("\r\n\tfor <");
        h.push_str(&only.addr);
        h.push('>');
    }
    h.push_str(";\r\n\t");
    h.push_str(&rfc5322_date(now));
    h.push_str("\r\n");
    h
}
