//! The process's Prometheus metrics: one registry, its metric families, and
//! the handles each shard resolves once and then only adds to.
//!
//! A leaf: every module may use it, it uses none of them (labels are plain
//! strings and numbers). It owns the metric *names*, which are a contract
//! with operators (README "Metrics", `deploy/grafana-dashboard.json`).
//!
//! The hot path never takes a lock nor allocates: a shard resolves its
//! labelled series once ([`shard`] returns the same [`ShardMetrics`] to
//! every component of a shard), and counting is one relaxed atomic add on
//! a handle it keeps. Only what happens per batch or per delivery goes
//! through a lock: histograms (a per-shard mutex nobody else takes but the
//! scrape), per-destination series (a family lookup, at delivery time),
//! and the handful of reply codes a shard sees (resolved on first sight,
//! then found in a shard-local table: [`ReplyCounters`]).
//!
//! Peer-influenced label values are bounded: destinations fold into
//! `other` past [`MAX_DESTINATIONS`], reply codes past
//! [`MAX_REPLY_SERIES`] per shard. It must never hold a lock across a
//! scrape of anything but itself, nor do I/O.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::hash::BuildHasherDefault;
use std::sync::{Arc, Mutex, OnceLock};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// The `Content-Type` of [`encode`]'s output (Prometheus text 0.0.4).
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Distinct destination label values, process-wide; the rest are `other`.
pub const MAX_DESTINATIONS: usize = 1000;
/// Distinct (code, enhanced code) reply series per shard; the rest are
/// counted with `enhanced="other"`.
pub const MAX_REPLY_SERIES: usize = 128;
/// The `listener` label values, indexed as the server's listener kinds.
pub const LISTENERS: [&str; 3] = ["smtp", "submission", "smtps"];

/// Why a connection was refused (`reason` of
/// `ringmta_connections_refused_total`).
#[derive(Debug, Clone, Copy)]
pub enum Refused {
    /// `--max-conns-per-shard`.
    ShardLimit,
    /// `--max-conns-per-ip`.
    IpLimit,
}

/// Why the screen, a DNS blocklist or a rate limit refused a client
/// (`reason` of `ringmta_screen_refusals_total`, and of the `refused`
/// event).
#[derive(Debug, Clone, Copy)]
pub enum Screened {
    Dnsbl,
    Pregreet,
    Pipelining,
    NonSmtp,
    /// Failed the screen earlier, within `--screen-ttl`.
    Remembered,
    ConnectionRate,
    MessageRate,
    RecipientRate,
    UserMessageRate,
}

/// The results of `ringmta_outbound_tls_total`: how an outbound
/// connection was protected, `failed` (the handshake or the certificate
/// check failed), or `mta-sts-testing-failed` (a connection an MTA-STS
/// policy in `testing` mode would have refused).
pub const OUTBOUND_TLS: [&str; 7] = [
    "plain",
    "tls",
    "verified",
    "dane",
    "mta-sts",
    "failed",
    "mta-sts-testing-failed",
];

/// The methods and results of `ringmta_inbound_auth_results_total` (the
/// summary words of `inbound::auth`'s verdict); others are not counted.
pub const AUTH_METHODS: [&str; 4] = ["spf", "dkim", "arc", "dmarc"];
pub const AUTH_RESULTS: [&str; 8] = [
    "pass",
    "fail",
    "softfail",
    "neutral",
    "none",
    "temperror",
    "permerror",
    "policy",
];

impl Screened {
    pub const ALL: [Screened; 9] = [
        Screened::Dnsbl,
        Screened::Pregreet,
        Screened::Pipelining,
        Screened::NonSmtp,
        Screened::Remembered,
        Screened::ConnectionRate,
        Screened::MessageRate,
        Screened::RecipientRate,
        Screened::UserMessageRate,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Screened::Dnsbl => "dnsbl",
            Screened::Pregreet => "pregreet",
            Screened::Pipelining => "pipelining",
            Screened::NonSmtp => "non_smtp",
            Screened::Remembered => "screened",
            Screened::ConnectionRate => "connection_rate",
            Screened::MessageRate => "message_rate",
            Screened::RecipientRate => "recipient_rate",
            Screened::UserMessageRate => "user_message_rate",
        }
    }
}

/// How an inbound TLS handshake ended.
#[derive(Debug, Clone, Copy)]
pub enum Handshake {
    Ok,
    Failed,
    TimedOut,
}

/// How an AUTH attempt ended.
#[derive(Debug, Clone, Copy)]
pub enum Auth {
    Success,
    /// Wrong user or password.
    Failure,
    /// Refused before the check: too many failures, or busy.
    Refused,
    /// Not checked: the auth pool was full.
    TempFail,
}

/// A message refused for want of a resource.
#[derive(Debug, Clone, Copy)]
pub enum Shortage {
    /// The spool's disk is full (452 4.3.1).
    DiskFull,
    /// The shard's `--max-inflight-bytes` budget had no room (452 4.3.1).
    MemoryBudget,
}

/// What became of one recipient's delivery attempt.
#[derive(Debug, Clone, Copy)]
pub enum Delivery {
    Delivered,
    Deferred,
    Bounced,
}

/// The process-wide metrics; [`global`] holds the one instance.
pub struct Metrics {
    registry: Registry,
    conns_accepted: Family<ShardListener, Counter>,
    conns_refused: Family<ShardReason, Counter>,
    conns_open: Family<ShardLabel, Gauge>,
    sessions: Family<ShardListener, Counter>,
    messages: Family<ShardLabel, Counter>,
    recipients: Family<ShardLabel, Counter>,
    received_bytes: Family<ShardLabel, Counter>,
    replies: Family<ReplyLabels, Counter>,
    refusals: Family<ShardReason, Counter>,
    screen_refusals: Family<ShardReason, Counter>,
    inbound_auth: Family<MethodResult, Counter>,
    dnsbl_lookups: Family<ShardResult, Counter>,
    tls: Family<ShardResult, Counter>,
    auth: Family<ShardResult, Counter>,
    commits: Family<ShardFile, Counter>,
    commit_messages: Family<ShardLabel, Histogram>,
    fdatasync: Family<ShardFile, Histogram>,
    queue_messages: Family<ShardLabel, Gauge>,
    queue_held: Family<ShardLabel, Gauge>,
    suspended: Gauge,
    inject_requests: Family<StatusLabel, Counter>,
    inject_messages: Counter,
    inject_recipients: Counter,
    inject_rejected: Counter,
    queue_rcpts: Family<ShardDest, Gauge>,
    queue_oldest: Family<ShardDest, Gauge>,
    deliveries: Family<DeliveryLabels, Counter>,
    source_deliveries: Family<SourceLabels, Counter>,
    reply_classes: Family<ClassLabels, Counter>,
    delivery_latency: Family<ShardLabel, Histogram>,
    handoff_queued: Family<HandoffLabels, Gauge>,
    handoffs: Family<ShardResult, Counter>,
    outbound_tls: Family<ShardResult, Counter>,
    destinations: Mutex<HashSet<String>>,
    shards: Mutex<Vec<Arc<ShardMetrics>>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// The process's metrics (made on first use).
pub fn global() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

/// Shard `id`'s handles: made on the first call, the same `Arc` after.
pub fn shard(id: usize) -> Arc<ShardMetrics> {
    global().shard(id)
}

/// Everything registered, in the Prometheus text format.
pub fn encode() -> String {
    let mut out = String::with_capacity(16 << 10);
    // invariant: writing into a String cannot fail.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &global().registry);
    out
}

/// Destinations suspended now (set by the admin API's suspend/resume).
pub fn suspended_destinations() -> &'static Gauge {
    &global().suspended
}

/// Counts one HTTP injection call: its answer's status, the messages and
/// recipients it queued, the recipients it did not.
pub fn injected(status: u16, messages: u64, recipients: u64, rejected: u64) {
    let m = global();
    m.inject_requests
        .get_or_create(&StatusLabel {
            status: status.to_string(),
        })
        .inc();
    m.inject_messages.inc_by(messages);
    m.inject_recipients.inc_by(recipients);
    m.inject_rejected.inc_by(rejected);
}

/// Bounds a peer-influenced destination name: the first
/// [`MAX_DESTINATIONS`] distinct names are kept, later new ones are
/// `other`.
pub fn destination_label(name: &str) -> String {
    let m = global();
    let mut seen = m.destinations.lock().unwrap_or_else(|p| p.into_inner());
    if seen.contains(name) {
        return name.to_owned();
    }
    if seen.len() >= MAX_DESTINATIONS {
        return "other".to_owned();
    }
    seen.insert(name.to_owned());
    name.to_owned()
}

/// One shard's resolved handles. Counting is an atomic add.
#[derive(Debug)]
pub struct ShardMetrics {
    pub id: usize,
    /// By [`LISTENERS`] index.
    conns_accepted: [Counter; 3],
    sessions: [Counter; 3],
    refused_shard: Counter,
    refused_ip: Counter,
    pub conns_open: Gauge,
    pub messages: Counter,
    pub recipients: Counter,
    pub received_bytes: Counter,
    disk_full: Counter,
    memory_budget: Counter,
    /// By [`Screened::ALL`] index.
    screened: [Counter; 9],
    dnsbl_listed: Counter,
    dnsbl_not_listed: Counter,
    dnsbl_failed: Counter,
    /// By [`AUTH_METHODS`], then [`AUTH_RESULTS`] index.
    inbound_auth: [[Counter; AUTH_RESULTS.len()]; AUTH_METHODS.len()],
    tls_ok: Counter,
    tls_failed: Counter,
    tls_timeout: Counter,
    auth_success: Counter,
    auth_failure: Counter,
    auth_refused: Counter,
    auth_tempfail: Counter,
    commits_segment: Counter,
    commits_journal: Counter,
    pub commit_messages: Histogram,
    fdatasync_segment: Histogram,
    fdatasync_journal: Histogram,
    pub queue_messages: Gauge,
    /// Messages on hold (set with the queue census).
    pub queue_held: Gauge,
    pub delivery_latency: Histogram,
    handed: Counter,
    handoff_full: Counter,
    /// By [`OUTBOUND_TLS`] index.
    outbound_tls: [Counter; OUTBOUND_TLS.len()],
}

impl ShardMetrics {
    pub fn accepted(&self, listener: usize) {
        if let Some(c) = self.conns_accepted.get(listener) {
            c.inc();
        }
    }

    pub fn session(&self, listener: usize) {
        if let Some(c) = self.sessions.get(listener) {
            c.inc();
        }
    }

    pub fn refused(&self, why: Refused) {
        match why {
            Refused::ShardLimit => self.refused_shard.inc(),
            Refused::IpLimit => self.refused_ip.inc(),
        };
    }

    /// A client refused by the screen, a DNS blocklist or a rate limit.
    pub fn screened(&self, why: Screened) {
        self.screened[why as usize].inc();
    }

    /// The DNS list lookups of one connection (cache hits included).
    pub fn dnsbl(&self, listed: u32, not_listed: u32, failed: u32) {
        self.dnsbl_listed.inc_by(listed.into());
        self.dnsbl_not_listed.inc_by(not_listed.into());
        self.dnsbl_failed.inc_by(failed.into());
    }

    /// The verdict of one message's inbound checks, as `method=result`
    /// words (`spf=pass dkim=none arc=none dmarc=fail`): one count per
    /// method, no allocation.
    pub fn inbound_auth(&self, summary: &str) {
        for word in summary.split_ascii_whitespace() {
            let Some((method, result)) = word.split_once('=') else {
                continue;
            };
            let m = AUTH_METHODS.iter().position(|&x| x == method);
            let r = AUTH_RESULTS.iter().position(|&x| x == result);
            if let (Some(m), Some(r)) = (m, r) {
                self.inbound_auth[m][r].inc();
            }
        }
    }

    pub fn shortage(&self, what: Shortage) {
        match what {
            Shortage::DiskFull => self.disk_full.inc(),
            Shortage::MemoryBudget => self.memory_budget.inc(),
        };
    }

    /// One outbound connection ready to carry mail (`plain`, `tls`,
    /// `verified`, `dane`) or a failed outbound handshake (`failed`).
    pub fn outbound_tls(&self, result: &str) {
        if let Some(k) = OUTBOUND_TLS.iter().position(|&r| r == result) {
            self.outbound_tls[k].inc();
        }
    }

    pub fn handshake(&self, how: Handshake) {
        match how {
            Handshake::Ok => self.tls_ok.inc(),
            Handshake::Failed => self.tls_failed.inc(),
            Handshake::TimedOut => self.tls_timeout.inc(),
        };
    }

    pub fn auth(&self, how: Auth) {
        match how {
            Auth::Success => self.auth_success.inc(),
            Auth::Failure => self.auth_failure.inc(),
            Auth::Refused => self.auth_refused.inc(),
            Auth::TempFail => self.auth_tempfail.inc(),
        };
    }

    /// One write+fdatasync of `journal` or message records, and how long
    /// the sync took (`None` under `--fsync off`).
    pub fn commit(&self, journal: bool, records: u64, sync_seconds: Option<f64>) {
        if journal {
            self.commits_journal.inc();
        } else {
            self.commits_segment.inc();
            self.commit_messages.observe(records as f64);
        }
        if let Some(s) = sync_seconds {
            let h = if journal {
                &self.fdatasync_journal
            } else {
                &self.fdatasync_segment
            };
            h.observe(s);
        }
    }

    /// Work handed to its owner shard (`true`) or kept because the
    /// channel was full (`false`).
    pub fn handoff(&self, handed: bool) {
        if handed {
            self.handed.inc();
        } else {
            self.handoff_full.inc();
        }
    }

    /// A failed delivery's reply fell in `class` (a fixed set of names).
    pub fn reply_class(&self, class: &'static str) {
        global()
            .reply_classes
            .get_or_create(&ClassLabels {
                shard: self.id.to_string(),
                class: class.to_owned(),
            })
            .inc();
    }

    /// Outcomes of one delivery attempt made from `source` (a source-IP
    /// pool source: as many labels as the shaping file has sources).
    pub fn source_deliveries(&self, source: &str, outcome: Delivery, n: u64) {
        if n == 0 {
            return;
        }
        let outcome = match outcome {
            Delivery::Delivered => "delivered",
            Delivery::Deferred => "deferred",
            Delivery::Bounced => "bounced",
        };
        global()
            .source_deliveries
            .get_or_create(&SourceLabels {
                source: source.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc_by(n);
    }

    /// Outcomes of one delivery attempt to `destination` (a label from
    /// [`destination_label`]). Not the intake path: a family lookup.
    pub fn deliveries(&self, destination: &str, outcome: Delivery, n: u64) {
        if n == 0 {
            return;
        }
        let outcome = match outcome {
            Delivery::Delivered => "delivered",
            Delivery::Deferred => "deferred",
            Delivery::Bounced => "bounced",
        };
        global()
            .deliveries
            .get_or_create(&DeliveryLabels {
                shard: self.id.to_string(),
                destination: destination.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc_by(n);
    }

    /// Publishes this shard's queue census: recipients waiting and the age
    /// of the oldest, per destination. Destinations of the last census
    /// that are gone are removed.
    pub fn queue_census(&self, census: &HashMap<String, (i64, i64)>, last: &mut HashSet<String>) {
        let m = global();
        let shard = self.id.to_string();
        for (dest, &(rcpts, oldest)) in census {
            let key = ShardDest {
                shard: shard.clone(),
                destination: dest.clone(),
            };
            m.queue_rcpts.get_or_create(&key).set(rcpts);
            m.queue_oldest.get_or_create(&key).set(oldest);
        }
        for dest in last.iter().filter(|d| !census.contains_key(*d)) {
            let key = ShardDest {
                shard: shard.clone(),
                destination: dest.clone(),
            };
            m.queue_rcpts.remove(&key);
            m.queue_oldest.remove(&key);
        }
        *last = census.keys().cloned().collect();
    }

    /// The gauge of work sent from shard `from` to shard `to` and not yet
    /// taken off the channel by `to`; both ends hold it.
    pub fn handoff_queued(from: usize, to: usize) -> Gauge {
        global().handoff_queued.get_or_create_owned(&HandoffLabels {
            from: from.to_string(),
            to: to.to_string(),
        })
    }
}

/// Counts a shard's SMTP replies by class, code and enhanced code. Shard-
/// local (not `Sync`): a series is resolved in the global family the first
/// time the shard sends that reply, then found here without a lock.
#[derive(Debug)]
pub struct ReplyCounters {
    shard: String,
    /// Keyed by code << 32 | packed enhanced code.
    seen: RefCell<HashMap<u64, Counter, BuildHasherDefault<KeyHasher>>>,
}

impl ReplyCounters {
    pub fn new(shard: usize) -> ReplyCounters {
        ReplyCounters {
            shard: shard.to_string(),
            seen: RefCell::new(HashMap::default()),
        }
    }

    /// One reply with `code` and, if it has one, the enhanced status code.
    pub fn count(&self, code: u16, enhanced: Option<&str>) {
        let packed = enhanced.map_or(Some(0), pack_enhanced);
        let key = |p: u32| u64::from(code) << 32 | u64::from(p);
        if let Some(c) = self.seen.borrow().get(&key(packed.unwrap_or(u32::MAX))) {
            c.inc();
            return;
        }
        let mut seen = self.seen.borrow_mut();
        let over = seen.len() >= MAX_REPLY_SERIES;
        let packed = packed.filter(|_| !over).unwrap_or(u32::MAX);
        let counter = seen.entry(key(packed)).or_insert_with(|| {
            let enhanced = match (packed, enhanced) {
                (u32::MAX, _) => "other".to_owned(),
                (_, Some(e)) => e.to_owned(),
                (_, None) => "none".to_owned(),
            };
            global().replies.get_or_create_owned(&ReplyLabels {
                shard: self.shard.clone(),
                class: format!("{}xx", code / 100),
                code: code.to_string(),
                enhanced,
            })
        });
        counter.inc();
    }
}

/// A multiplicative hash of the one `u64` a reply key is: SipHash would
/// cost more than the rest of the count.
#[derive(Default)]
struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0 ^ v)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .rotate_left(29);
    }
}

/// `X.Y.Z` (RFC 3463: class 2, 4 or 5, then up to three digits twice) as
/// one number; `None` when it is not that.
fn pack_enhanced(s: &str) -> Option<u32> {
    let mut parts = s.split('.');
    let (a, b, c) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let num = |p: &str| -> Option<u32> {
        if p.is_empty() || p.len() > 3 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        p.parse().ok()
    };
    let class = num(a)?;
    if !matches!(class, 2 | 4 | 5) {
        return None;
    }
    Some(1 + class * 1_000_000 + num(b)? * 1000 + num(c)?)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ShardLabel {
    shard: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ShardListener {
    shard: String,
    listener: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ShardReason {
    shard: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ShardResult {
    shard: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodResult {
    shard: String,
    method: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ShardFile {
    shard: String,
    file: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ShardDest {
    shard: String,
    destination: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReplyLabels {
    shard: String,
    class: String,
    code: String,
    enhanced: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    source: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabels {
    shard: String,
    class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeliveryLabels {
    shard: String,
    destination: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandoffLabels {
    from: String,
    to: String,
}

/// Seconds, from 100 µs to about 13 s.
fn sync_buckets() -> Family<ShardFile, Histogram> {
    Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.0001, 2.0, 18)))
}

impl Metrics {
    fn new() -> Metrics {
        let mut m = Metrics {
            registry: Registry::with_prefix("ringmta"),
            conns_accepted: Family::default(),
            conns_refused: Family::default(),
            conns_open: Family::default(),
            sessions: Family::default(),
            messages: Family::default(),
            recipients: Family::default(),
            received_bytes: Family::default(),
            replies: Family::default(),
            refusals: Family::default(),
            screen_refusals: Family::default(),
            inbound_auth: Family::default(),
            dnsbl_lookups: Family::default(),
            tls: Family::default(),
            auth: Family::default(),
            commits: Family::default(),
            // 1, 2, 4 … 1024 messages per sync.
            commit_messages: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(1.0, 2.0, 11))
            }),
            fdatasync: sync_buckets(),
            queue_messages: Family::default(),
            queue_held: Family::default(),
            suspended: Gauge::default(),
            inject_requests: Family::default(),
            inject_messages: Counter::default(),
            inject_recipients: Counter::default(),
            inject_rejected: Counter::default(),
            queue_rcpts: Family::default(),
            queue_oldest: Family::default(),
            deliveries: Family::default(),
            source_deliveries: Family::default(),
            reply_classes: Family::default(),
            // 10 ms to about 2.9 days.
            delivery_latency: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.01, 4.0, 14))
            }),
            handoff_queued: Family::default(),
            handoffs: Family::default(),
            outbound_tls: Family::default(),
            destinations: Mutex::new(HashSet::new()),
            shards: Mutex::new(Vec::new()),
        };
        let r = &mut m.registry;
        // Counters are registered without `_total`: the encoder adds it.
        r.register(
            "connections_accepted",
            "Connections accepted from the listening sockets, before any limit",
            m.conns_accepted.clone(),
        );
        r.register(
            "connections_refused",
            "Accepted connections answered 421 and closed, by limit",
            m.conns_refused.clone(),
        );
        r.register(
            "connections_open",
            "Connections being served now",
            m.conns_open.clone(),
        );
        r.register(
            "sessions",
            "SMTP sessions started (greeting sent; after the handshake on smtps)",
            m.sessions.clone(),
        );
        r.register(
            "messages_accepted",
            "Messages acknowledged with 250 (on disk)",
            m.messages.clone(),
        );
        r.register(
            "recipients_accepted",
            "Recipients of the messages acknowledged with 250",
            m.recipients.clone(),
        );
        r.register(
            "received_bytes",
            "Bytes read from SMTP clients (after TLS decryption)",
            m.received_bytes.clone(),
        );
        r.register(
            "smtp_replies",
            "SMTP replies sent (final lines), by class, code and enhanced code",
            m.replies.clone(),
        );
        r.register(
            "refusals",
            "Messages refused for want of a resource (disk_full, memory_budget)",
            m.refusals.clone(),
        );
        r.register(
            "screen_refusals",
            "Clients refused by the pre-greet screen, a DNS blocklist or a per-minute rate limit, by reason",
            m.screen_refusals.clone(),
        );
        r.register(
            "inbound_auth_results",
            "Inbound checks of messages on the relay/MX port by method (spf, dkim, arc, dmarc) and result",
            m.inbound_auth.clone(),
        );
        r.register(
            "dnsbl_lookups",
            "DNS list lookups of inbound clients (cache hits included), by result (listed, not_listed, failed)",
            m.dnsbl_lookups.clone(),
        );
        r.register(
            "tls_handshakes",
            "Inbound TLS handshakes (STARTTLS and smtps), by result",
            m.tls.clone(),
        );
        r.register(
            "auth_attempts",
            "SMTP AUTH attempts, by result",
            m.auth.clone(),
        );
        r.register(
            "spool_commits",
            "Spool write+fdatasync batches (file: segment or journal)",
            m.commits.clone(),
        );
        r.register(
            "spool_commit_messages",
            "Messages made durable by one segment write+fdatasync",
            m.commit_messages.clone(),
        );
        r.register(
            "spool_fdatasync_seconds",
            "Time spent in one fdatasync of the spool",
            m.fdatasync.clone(),
        );
        r.register(
            "queue_messages",
            "Messages in the shard's queue (not finished for every recipient)",
            m.queue_messages.clone(),
        );
        r.register(
            "queue_held_messages",
            "Messages on hold in the shard's queue (admin API hold; census every few seconds)",
            m.queue_held.clone(),
        );
        r.register(
            "inject_requests",
            "HTTP injection calls (POST /v1/inject), by the HTTP status answered",
            m.inject_requests.clone(),
        );
        r.register(
            "inject_messages",
            "Messages stored and queued by HTTP injection",
            m.inject_messages.clone(),
        );
        r.register(
            "inject_recipients",
            "Recipients stored and queued by HTTP injection",
            m.inject_recipients.clone(),
        );
        r.register(
            "inject_rejected_recipients",
            "Recipients of HTTP injection calls not queued (refused by policy or not stored)",
            m.inject_rejected.clone(),
        );
        r.register(
            "suspended_destinations",
            "Destinations suspended by the admin API now",
            m.suspended.clone(),
        );
        r.register(
            "queue_recipients",
            "Recipients waiting for delivery, per destination (census every few seconds)",
            m.queue_rcpts.clone(),
        );
        r.register(
            "queue_oldest_age_seconds",
            "Age of the oldest message waiting, per destination",
            m.queue_oldest.clone(),
        );
        r.register(
            "source_deliveries",
            "Recipient delivery attempts by outcome, per source-IP pool source (--shaping [source.NAME])",
            m.source_deliveries.clone(),
        );
        r.register(
            "reply_class",
            "Failed recipient deliveries by the class of the next hop's reply (--bounce-rules)",
            m.reply_classes.clone(),
        );
        r.register(
            "deliveries",
            "Recipient delivery attempts by outcome (delivered, deferred, bounced), per destination",
            m.deliveries.clone(),
        );
        r.register(
            "delivery_latency_seconds",
            "Time from acceptance to delivery, per delivered recipient",
            m.delivery_latency.clone(),
        );
        r.register(
            "handoff_queued",
            "Work sent over the handoff channel from shard `from` to `to` not yet taken",
            m.handoff_queued.clone(),
        );
        r.register(
            "handoffs",
            "Work for a destination owned by another shard: handed, or kept (channel full)",
            m.handoffs.clone(),
        );
        r.register(
            "outbound_tls",
            "Outbound connections ready for mail by protection (plain, tls, verified, dane, mta-sts), failed outbound TLS handshakes or certificate checks (failed), connections an MTA-STS testing policy would refuse (mta-sts-testing-failed)",
            m.outbound_tls.clone(),
        );
        m
    }

    fn shard(&self, id: usize) -> Arc<ShardMetrics> {
        let mut shards = self.shards.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = shards.iter().find(|s| s.id == id) {
            return s.clone();
        }
        let s = Arc::new(self.make_shard(id));
        shards.push(s.clone());
        s
    }

    fn make_shard(&self, id: usize) -> ShardMetrics {
        let shard = id.to_string();
        let by_listener = |f: &Family<ShardListener, Counter>| {
            LISTENERS.map(|l| {
                f.get_or_create_owned(&ShardListener {
                    shard: shard.clone(),
                    listener: l.to_owned(),
                })
            })
        };
        let reason = |f: &Family<ShardReason, Counter>, r: &str| {
            f.get_or_create_owned(&ShardReason {
                shard: shard.clone(),
                reason: r.to_owned(),
            })
        };
        let result = |f: &Family<ShardResult, Counter>, r: &str| {
            f.get_or_create_owned(&ShardResult {
                shard: shard.clone(),
                result: r.to_owned(),
            })
        };
        let label = ShardLabel {
            shard: shard.clone(),
        };
        let file = |f: &str| ShardFile {
            shard: shard.clone(),
            file: f.to_owned(),
        };
        ShardMetrics {
            id,
            conns_accepted: by_listener(&self.conns_accepted),
            sessions: by_listener(&self.sessions),
            refused_shard: reason(&self.conns_refused, "shard_limit"),
            refused_ip: reason(&self.conns_refused, "ip_limit"),
            conns_open: self.conns_open.get_or_create_owned(&label),
            messages: self.messages.get_or_create_owned(&label),
            recipients: self.recipients.get_or_create_owned(&label),
            received_bytes: self.received_bytes.get_or_create_owned(&label),
            disk_full: reason(&self.refusals, "disk_full"),
            memory_budget: reason(&self.refusals, "memory_budget"),
            screened: Screened::ALL.map(|s| reason(&self.screen_refusals, s.name())),
            dnsbl_listed: result(&self.dnsbl_lookups, "listed"),
            dnsbl_not_listed: result(&self.dnsbl_lookups, "not_listed"),
            dnsbl_failed: result(&self.dnsbl_lookups, "failed"),
            inbound_auth: AUTH_METHODS.map(|m| {
                AUTH_RESULTS.map(|r| {
                    self.inbound_auth.get_or_create_owned(&MethodResult {
                        shard: shard.clone(),
                        method: m.to_owned(),
                        result: r.to_owned(),
                    })
                })
            }),
            tls_ok: result(&self.tls, "ok"),
            tls_failed: result(&self.tls, "failed"),
            tls_timeout: result(&self.tls, "timeout"),
            auth_success: result(&self.auth, "success"),
            auth_failure: result(&self.auth, "failure"),
            auth_refused: result(&self.auth, "refused"),
            auth_tempfail: result(&self.auth, "tempfail"),
            commits_segment: self.commits.get_or_create_owned(&file("segment")),
            commits_journal: self.commits.get_or_create_owned(&file("journal")),
            commit_messages: self.commit_messages.get_or_create_owned(&label),
            fdatasync_segment: self.fdatasync.get_or_create_owned(&file("segment")),
            fdatasync_journal: self.fdatasync.get_or_create_owned(&file("journal")),
            queue_messages: self.queue_messages.get_or_create_owned(&label),
            queue_held: self.queue_held.get_or_create_owned(&label),
            delivery_latency: self.delivery_latency.get_or_create_owned(&label),
            handed: result(&self.handoffs, "handed"),
            handoff_full: result(&self.handoffs, "full"),
            outbound_tls: OUTBOUND_TLS.map(|r| result(&self.outbound_tls, r)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enhanced_codes_pack_or_are_refused() {
        assert_eq!(pack_enhanced("2.0.0"), Some(2_000_001));
        assert_eq!(pack_enhanced("5.7.139"), Some(5_007_140));
        assert_eq!(pack_enhanced("3.0.0"), None);
        assert_eq!(pack_enhanced("2.0"), None);
        assert_eq!(pack_enhanced("2.0.0.0"), None);
        assert_eq!(pack_enhanced("2.0000.0"), None);
        assert_eq!(pack_enhanced("2.a.0"), None);
    }

    #[test]
    fn shard_handles_are_resolved_once_and_shared() {
        let a = shard(900);
        let b = shard(900);
        assert!(Arc::ptr_eq(&a, &b));
        a.messages.inc();
        a.accepted(0);
        a.commit(false, 3, Some(0.002));
        let text = encode();
        assert!(
            text.contains("ringmta_messages_accepted_total{shard=\"900\"} 1\n"),
            "{text}"
        );
        assert!(text
            .contains("ringmta_connections_accepted_total{shard=\"900\",listener=\"smtp\"} 1\n"));
        assert!(text.contains("ringmta_spool_commit_messages_count{shard=\"900\"} 1\n"));
    }

    #[test]
    fn reply_series_are_bounded_per_shard() {
        let r = ReplyCounters::new(901);
        r.count(250, Some("2.1.5"));
        r.count(250, Some("2.1.5"));
        r.count(220, None);
        r.count(421, Some("not-a-code"));
        for detail in 0..(MAX_REPLY_SERIES as u32 + 10) {
            r.count(550, Some(&format!("5.1.{detail}")));
        }
        let text = encode();
        let series = |s: &str| {
            text.lines()
                .filter(|l| l.starts_with("ringmta_smtp_replies_total{shard=\"901\""))
                .filter(|l| l.contains(s))
                .count()
        };
        assert!(text.contains(
            "ringmta_smtp_replies_total{shard=\"901\",class=\"2xx\",code=\"250\",enhanced=\"2.1.5\"} 2\n"
        ));
        assert!(text.contains("code=\"220\",enhanced=\"none\"} 1\n"));
        assert!(text.contains("code=\"421\",enhanced=\"other\"} 1\n"));
        assert_eq!(series(""), MAX_REPLY_SERIES + 1, "{text}");
        assert_eq!(series("enhanced=\"other\""), 2);
    }

    #[test]
    fn destinations_fold_into_other_past_the_cap() {
        // The set is process-wide: fill it past the cap from here.
        for i in 0..MAX_DESTINATIONS + 5 {
            let _ = destination_label(&format!("mx:test-{i}.example:25"));
        }
        assert_eq!(destination_label("mx:never-seen.example:25"), "other");
        assert_eq!(
            destination_label("mx:test-0.example:25"),
            "mx:test-0.example:25"
        );
    }
}
