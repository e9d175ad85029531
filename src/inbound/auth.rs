//! Verification of incoming mail on the relay/MX port: SPF (RFC 7208) on
//! the HELO and MAIL FROM identities, every DKIM signature (RFC 6376, RSA
//! and Ed25519), the ARC chain (RFC 8617) and DMARC (RFC 7489: alignment,
//! `p`, `sp`, `pct`), written as one `Authentication-Results:` field
//! (RFC 8601) and a decision: accept, quarantine (a header the downstream
//! files on) or reject.
//!
//! mail-auth does the verifying; this module runs it on the shard through
//! its resolver ([`super::dns`]) under one deadline, `--dns-timeout` from the end
//! of the content: whatever has not finished by then counts as
//! `temperror`, so a slow or silent DNS never holds the session longer.
//! The RSA/Ed25519 arithmetic runs inline (tens of µs, cheaper than a
//! thread hop).
//!
//! RFC 8601 5: `Authentication-Results` fields that arrive carrying our
//! authserv-id are forged or stale and are removed ([`strip_ours`]).
//!
//! Must never: block a shard, wait for DNS past the deadline, or reject on
//! a temporary DNS failure.

use std::borrow::Borrow;
use std::cell::Cell;
use std::hash::Hash;
use std::net::IpAddr;
use std::time::Instant;

use base64::Engine as _;
use mail_auth::dmarc::Policy as DmarcPolicy;
use mail_auth::spf::verify::SpfParameters;
use mail_auth::{
    AuthenticatedMessage, AuthenticationResults, DkimOutput, DkimResult, DmarcOutput, DmarcResult,
    Parameters, ResolverCache, SpfOutput, SpfResult,
};

use super::dns::{self, DnsContext, DnsHandle, Lookup};
use crate::smtp::reply::Reply;

/// `--spf-policy reject`: the MAIL FROM identity's SPF says `fail`.
pub use crate::smtp::reply::SPF_FAIL;
/// `--dmarc-reject`: the author domain's DMARC policy is reject, and the
/// message fails it.
pub const DMARC_REJECT: Reply = Reply {
    code: 550,
    status: Some("5.7.1"),
    text: "Message rejected by the author domain's DMARC policy",
};

/// How inbound mail is checked and what the results lead to (from the
/// configuration; one version per connection).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthPolicy {
    /// `--inbound-auth`: verify mail on the relay/MX port.
    pub enabled: bool,
    /// `--authserv-id`: names us in `Authentication-Results`.
    pub authserv_id: String,
    /// `--spf-policy`.
    pub spf: SpfPolicy,
    /// `--dmarc-reject`: refuse (550 5.7.1) what fails a `p=reject` policy;
    /// off: quarantine it (mark only).
    pub dmarc_reject: bool,
    /// `--quarantine-header`: the field added (value `YES`) when DMARC says
    /// quarantine, or reject while `dmarc_reject` is off.
    pub quarantine_header: String,
    /// `--domain-auth`: local domains whose policy differs from the above.
    pub domains: Vec<DomainAuth>,
}

/// `--domain-auth DOMAIN:KEY=VALUE[:KEY=VALUE...]`: one local domain's own
/// verification policy; a key left out takes the global flag's value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainAuth {
    /// Lower-case; matches the recipient domain exactly.
    pub domain: String,
    /// `verify=on|off` (`--inbound-auth`).
    pub verify: Option<bool>,
    /// `spf=mark|reject` (`--spf-policy`).
    pub spf: Option<SpfPolicy>,
    /// `dmarc=mark|reject` (`--dmarc-reject`).
    pub dmarc_reject: Option<bool>,
}

/// Parses `--domain-auth` (clap's value parser).
pub fn parse_domain_auth(s: &str) -> Result<DomainAuth, String> {
    let mut parts = s.split(':');
    let domain = parts.next().unwrap_or("").trim().to_ascii_lowercase();
    if domain.is_empty() || domain.contains(['@', ' ', '=']) {
        return Err(format!("{s:?}: expected DOMAIN:KEY=VALUE[:KEY=VALUE...]"));
    }
    let mut entry = DomainAuth {
        domain,
        verify: None,
        spf: None,
        dmarc_reject: None,
    };
    let mut any = false;
    for kv in parts {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| format!("{s:?}: {kv:?} is not KEY=VALUE"))?;
        let bad = || format!("{s:?}: {k}={v:?} is not a value {k} takes");
        match (k.trim(), v.trim()) {
            ("verify", "on") => entry.verify = Some(true),
            ("verify", "off") => entry.verify = Some(false),
            ("spf", "mark") => entry.spf = Some(SpfPolicy::Mark),
            ("spf", "reject") => entry.spf = Some(SpfPolicy::Reject),
            ("dmarc", "mark") => entry.dmarc_reject = Some(false),
            ("dmarc", "reject") => entry.dmarc_reject = Some(true),
            ("verify" | "spf" | "dmarc", _) => return Err(bad()),
            (other, _) => {
                return Err(format!(
                    "{s:?}: unknown key {other:?} (verify, spf or dmarc)"
                ))
            }
        }
        any = true;
    }
    if !any {
        return Err(format!("{s:?}: no KEY=VALUE after the domain"));
    }
    Ok(entry)
}

impl AuthPolicy {
    fn entry(&self, domain: &str) -> Option<&DomainAuth> {
        self.domains
            .iter()
            .find(|d| d.domain.eq_ignore_ascii_case(domain))
    }

    /// Whether mail for `domain` is verified.
    pub fn verifies(&self, domain: &str) -> bool {
        self.entry(domain)
            .and_then(|e| e.verify)
            .unwrap_or(self.enabled)
    }

    /// What an SPF `fail` means for mail to `domain`.
    pub fn spf_for(&self, domain: &str) -> SpfPolicy {
        if !self.verifies(domain) {
            return SpfPolicy::Mark;
        }
        self.entry(domain).and_then(|e| e.spf).unwrap_or(self.spf)
    }

    /// Whether a message to all of `domains` is refused when it fails a
    /// `p=reject` DMARC policy: only when every recipient's domain says so
    /// (one reply at the end of DATA answers for all of them; a mixed
    /// transaction is quarantined instead).
    pub fn dmarc_rejects(&self, domains: &[&str]) -> bool {
        !domains.is_empty()
            && domains.iter().all(|d| {
                self.verifies(d)
                    && self
                        .entry(d)
                        .and_then(|e| e.dmarc_reject)
                        .unwrap_or(self.dmarc_reject)
            })
    }

    /// Whether any MAIL FROM needs its SPF checked before it is answered.
    pub fn checks_sender(&self) -> bool {
        (self.enabled && self.spf == SpfPolicy::Reject)
            || self
                .domains
                .iter()
                .any(|d| self.spf_for(&d.domain) == SpfPolicy::Reject)
    }

    /// Whether an SPF `fail` is refused at MAIL FROM (every domain refuses
    /// it) rather than at each RCPT whose domain refuses it.
    pub fn spf_refused_at_mail_from(&self) -> bool {
        self.enabled
            && self.spf == SpfPolicy::Reject
            && self
                .domains
                .iter()
                .all(|d| self.spf_for(&d.domain) == SpfPolicy::Reject)
    }

    /// The session's per-recipient view of [`AuthPolicy::spf_for`].
    pub fn spf_rcpt(&self) -> crate::smtp::session::SpfRcptPolicy {
        crate::smtp::session::SpfRcptPolicy {
            reject_by_default: self.enabled && self.spf == SpfPolicy::Reject,
            domains: self
                .domains
                .iter()
                .map(|d| {
                    (
                        d.domain.clone(),
                        self.spf_for(&d.domain) == SpfPolicy::Reject,
                    )
                })
                .collect(),
        }
    }
}

/// What an SPF `fail` of the MAIL FROM identity leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum SpfPolicy {
    /// Recorded in `Authentication-Results` only (and for DMARC).
    #[default]
    Mark,
    /// Refused at MAIL FROM with 550 5.7.23.
    Reject,
}

/// The SMTP facts a check needs.
#[derive(Debug, Clone)]
pub struct Client {
    /// The client's address (the one a PROXY header named, when trusted).
    pub ip: IpAddr,
    pub helo: String,
    /// The reverse-path; empty for `<>`.
    pub mail_from: String,
}

/// The SPF results of one transaction, kept from MAIL FROM to the end of
/// the content so they are not computed twice.
#[derive(Debug, Clone)]
pub struct SpfResults {
    /// For this reverse-path.
    pub mail_from: String,
    pub helo: SpfOutput,
    /// `None` for the null reverse-path (the HELO identity stands for it).
    pub mail: Option<SpfOutput>,
}

impl SpfResults {
    /// The result RFC 7208 2.4 gives the MAIL FROM identity (the HELO one
    /// for a null reverse-path).
    pub fn mail_from_result(&self) -> SpfResult {
        self.mail.as_ref().unwrap_or(&self.helo).result()
    }
}

/// What the checks decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    Accept,
    /// Add the quarantine header.
    Quarantine,
    /// Refuse with this reply.
    Reject(Reply),
}

/// The outcome of [`verify`].
#[derive(Debug, Clone)]
pub struct Verdict {
    /// The fields to prepend: `Authentication-Results:` and, when
    /// quarantined, the quarantine header.
    pub header: Vec<u8>,
    pub disposition: Disposition,
    /// A one-line summary for the log (`spf=pass dkim=pass dmarc=pass`).
    pub summary: String,
}

/// SPF of the HELO and MAIL FROM identities, bounded by `--dns-timeout`
/// (`temperror` past it). Runs on the shard; only the DNS queries leave it.
pub async fn check_spf(dns: &DnsHandle, client: Client) -> SpfResults {
    let limit = dns.timeout();
    let fallback = client.clone();
    dns.run(limit + dns::GRACE, move |ctx| async move {
        let deadline = Instant::now() + ctx.timeout;
        spf(&ctx, &client, deadline).await
    })
    .await
    .unwrap_or_else(|| temp_spf(&fallback))
}

/// Verifies `body` (the content as received) from `client`, reusing `spf`
/// when it was computed at MAIL FROM for this reverse-path. Runs on the
/// shard ([`DnsHandle::run`]); the body comes back with the verdict; `None`
/// only when the checks overran their bound (the caller answers 451).
/// `dmarc_reject`: whether a `p=reject` failure is refused (for these
/// recipients: [`AuthPolicy::dmarc_rejects`]) or quarantined.
pub async fn verify(
    dns: &DnsHandle,
    policy: &AuthPolicy,
    dmarc_reject: bool,
    client: Client,
    spf_done: Option<SpfResults>,
    body: Vec<u8>,
) -> Option<(Vec<u8>, Verdict)> {
    let limit = dns.timeout();
    let authserv_id = policy.authserv_id.clone();
    let quarantine_header = policy.quarantine_header.clone();
    dns.run(limit + dns::GRACE, move |ctx| async move {
        let deadline = Instant::now() + ctx.timeout;
        let verdict = check_message(
            &ctx,
            &client,
            spf_done,
            &body,
            deadline,
            &authserv_id,
            &quarantine_header,
            dmarc_reject,
        )
        .await;
        (body, verdict)
    })
    .await
}

/// Removes every `Authentication-Results` field of the header section
/// whose authserv-id is `authserv_id` (RFC 8601 5); returns how many.
pub fn strip_ours(body: &mut Vec<u8>, authserv_id: &str) -> usize {
    let end = header_end(body);
    let mut fields: Vec<(usize, usize)> = Vec::new();
    let mut pos = 0;
    while pos < end {
        let field_end = field_end(body, pos, end);
        let field = &body[pos..field_end];
        if let Some(value) = value_of(field, b"authentication-results") {
            if authserv_id_of(value).is_some_and(|id| id.eq_ignore_ascii_case(authserv_id)) {
                fields.push((pos, field_end));
            }
        }
        pos = field_end;
    }
    for &(start, stop) in fields.iter().rev() {
        body.drain(start..stop);
    }
    fields.len()
}

// ---------------------------------------------------------------------------
// Run by DnsHandle::run: on the shard, with the resolver's runtime entered.

#[allow(clippy::too_many_arguments)]
async fn check_message(
    ctx: &DnsContext,
    client: &Client,
    spf_done: Option<SpfResults>,
    body: &[u8],
    deadline: Instant,
    authserv_id: &str,
    quarantine_header: &str,
    dmarc_reject: bool,
) -> Verdict {
    let spf_results = match spf_done {
        Some(s) if s.mail_from == client.mail_from => s,
        _ => spf(ctx, client, deadline).await,
    };
    let mut ar = AuthenticationResults::new(authserv_id);
    let Some(message) = AuthenticatedMessage::parse(body) else {
        // Not a message mail-auth can read (no header section): SPF only.
        ar = with_spf(ar, client, &spf_results);
        return Verdict {
            header: field(&ar, &[]),
            disposition: Disposition::Accept,
            summary: format!("spf={}", spf_results.mail_from_result()),
        };
    };
    dns::prime_txt(ctx, &record_names(&message), deadline).await;
    let params = || {
        Parameters::new(&message)
            .with_txt_cache(&ctx.txt)
            .with_mx_cache(&ctx.mx)
            .with_ipv4_cache(&ctx.ipv4)
            .with_ipv6_cache(&ctx.ipv6)
            .with_ptr_cache(&ctx.ptr)
    };
    let dkim_fut = bounded(deadline, ctx.auth.verify_dkim(params()));
    let arc_fut = bounded(deadline, ctx.auth.verify_arc(params()));
    let (dkim, arc) = futures_lite::future::zip(dkim_fut, arc_fut).await;
    let dkim = dkim.unwrap_or_else(|| vec![DkimOutput::temp_err(timed_out())]);
    let arc = arc.unwrap_or_else(|| {
        mail_auth::ArcOutput::default().with_result(DkimResult::TempError(timed_out()))
    });
    let mail_from_domain = match client.mail_from.rsplit_once('@') {
        Some((_, d)) => d.to_owned(),
        None => client.helo.clone(),
    };
    let spf_for_dmarc = spf_results.mail.as_ref().unwrap_or(&spf_results.helo);
    let dmarc_params = Parameters::new(mail_auth::dmarc::verify::DmarcParameters::new(
        &message,
        &dkim,
        &mail_from_domain,
        spf_for_dmarc,
    ))
    .with_txt_cache(&ctx.txt)
    .with_ipv4_cache(&ctx.ipv4);
    let dmarc = bounded(deadline, ctx.auth.verify_dmarc(dmarc_params))
        .await
        .unwrap_or_else(|| {
            let from = message
                .from
                .first()
                .and_then(|f| f.rsplit_once('@'))
                .map_or("", |(_, d)| d);
            DmarcOutput::default()
                .with_domain(from)
                .with_spf_result(DmarcResult::TempError(timed_out()))
                .with_dkim_result(DmarcResult::TempError(timed_out()))
        });

    ar = with_spf(ar, client, &spf_results)
        .with_arc_result(&arc, client.ip)
        .with_dmarc_result(&dmarc);

    let applied = if matches!(dmarc.result(), DmarcResult::Fail(_)) {
        let pct = pct_of(ctx, dmarc.domain(), deadline).await;
        sampled(dmarc.policy(), pct, fastrand::u8(0..100))
    } else {
        DmarcPolicy::None
    };
    let disposition = match applied {
        DmarcPolicy::Reject if dmarc_reject => Disposition::Reject(DMARC_REJECT),
        DmarcPolicy::Reject | DmarcPolicy::Quarantine => Disposition::Quarantine,
        DmarcPolicy::None | DmarcPolicy::Unspecified => Disposition::Accept,
    };
    let mut header = field(&ar, &dkim);
    if disposition == Disposition::Quarantine {
        header.extend_from_slice(quarantine_header.as_bytes());
        header.extend_from_slice(b": YES\r\n");
    }
    let dkim_summary = match dkim.iter().map(|d| d.result()).min_by_key(|r| dkim_rank(r)) {
        Some(r) => result_word(r),
        None => "none",
    };
    Verdict {
        header,
        disposition,
        summary: format!(
            "spf={} dkim={} arc={} dmarc={}",
            spf_results
                .mail_from_result()
                .to_string()
                .to_ascii_lowercase(),
            dkim_summary,
            result_word(arc.result()),
            match dmarc.result() {
                DmarcResult::Pass => "pass",
                DmarcResult::Fail(_) => "fail",
                DmarcResult::TempError(_) => "temperror",
                DmarcResult::PermError(_) => "permerror",
                DmarcResult::None => "none",
            }
        ),
    }
}

async fn spf(ctx: &DnsContext, client: &Client, deadline: Instant) -> SpfResults {
    let mail_domain = client.mail_from.rsplit_once('@').map(|(_, d)| d);
    let names: Vec<String> = [Some(client.helo.as_str()), mail_domain]
        .into_iter()
        .flatten()
        .filter_map(fqdn)
        .collect();
    dns::prime_txt(ctx, &names, deadline).await;
    let helo = spf_one(
        ctx,
        SpfParameters::verify_ehlo(client.ip, &client.helo, &client.helo),
        &client.helo,
        deadline,
    )
    .await;
    let mail = if client.mail_from.is_empty() {
        None
    } else {
        let domain = client
            .mail_from
            .rsplit_once('@')
            .map_or(client.helo.as_str(), |(_, d)| d);
        let params = SpfParameters::verify_mail_from(
            client.ip,
            &client.helo,
            &client.helo,
            &client.mail_from,
        );
        Some(spf_one(ctx, params, domain, deadline).await)
    };
    SpfResults {
        mail_from: client.mail_from.clone(),
        helo,
        mail,
    }
}

/// The most key names of one message primed ([`dns::prime_txt`]); more
/// signatures than this are looked up by mail-auth alone.
const MAX_PRIMED_KEYS: usize = 10;

/// The TXT names the checks of `message` will ask for first: each DKIM
/// and ARC signature's key, and the DMARC tree walk's `_dmarc` names for
/// the author domain and its parents (at most eight labels, as the walk).
fn record_names(message: &AuthenticatedMessage<'_>) -> Vec<String> {
    let keys = message
        .dkim_headers
        .iter()
        .map(|h| (h.header.s.as_str(), h.header.d.as_str()))
        .chain(
            message
                .ams_headers
                .iter()
                .map(|h| (h.header.s.as_str(), h.header.d.as_str())),
        )
        .take(MAX_PRIMED_KEYS)
        .filter_map(|(s, d)| fqdn(&format!("{s}._domainkey.{d}")));
    let mut names: Vec<String> = keys.collect();
    for from in message.from.iter().take(1) {
        let Some((_, domain)) = from.rsplit_once('@') else {
            continue;
        };
        let labels: Vec<&str> = domain.trim_end_matches('.').split('.').collect();
        let first = labels.len().saturating_sub(8);
        for i in first..labels.len() {
            if let Some(n) = fqdn(&format!("_dmarc.{}", labels[i..].join("."))) {
                names.push(n);
            }
        }
    }
    names.sort();
    names.dedup();
    names
}

/// `name` as mail-auth keys its cache (lower-case, a trailing dot), or
/// `None` when it is no domain name (an address literal, say).
fn fqdn(name: &str) -> Option<String> {
    let name = name.trim_end_matches('.');
    let ok = !name.is_empty()
        && name.len() < 254
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && !name.split('.').any(str::is_empty);
    ok.then(|| format!("{}.", name.to_ascii_lowercase()))
}

/// RFC 7208 4.6.4: an evaluation that makes more than two "void" lookups
/// (no such name, or no record of the type asked) is a `permerror`.
const MAX_VOID_LOOKUPS: u32 = 2;

/// One SPF evaluation, with the void-lookup limit mail-auth does not keep:
/// it consults the caches before every lookup and fills them after every
/// answer, so a lookup that missed the cache and filled nothing found
/// nothing ([`Voids`]). Counting afterwards gives the RFC's answer: an
/// evaluation that ended before its third void never made one, and one
/// that went past it would have stopped there with `permerror`.
async fn spf_one(
    ctx: &DnsContext,
    params: SpfParameters<'_>,
    domain: &str,
    deadline: Instant,
) -> SpfOutput {
    let voids = Voids::default();
    let (txt, mx) = (voids.counting(&ctx.txt), voids.counting(&ctx.mx));
    let (ipv4, ipv6) = (voids.counting(&ctx.ipv4), voids.counting(&ctx.ipv6));
    let ptr = voids.counting(&ctx.ptr);
    let verifying = ctx.auth.verify_spf(
        Parameters::new(params)
            .with_txt_cache(&txt)
            .with_mx_cache(&mx)
            .with_ipv4_cache(&ipv4)
            .with_ipv6_cache(&ipv6)
            .with_ptr_cache(&ptr),
    );
    let Some(output) = bounded(deadline, verifying).await else {
        return SpfOutput::new(domain.to_owned()).with_result(SpfResult::TempError);
    };
    let mut void = voids.count();
    if output.result() == SpfResult::TempError {
        // The lookup that failed filled nothing either.
        void = void.saturating_sub(1);
    }
    if void > MAX_VOID_LOOKUPS && output.result() != SpfResult::PermError {
        return output.with_result(SpfResult::PermError);
    }
    output
}

/// Cache misses and fills of one SPF evaluation.
#[derive(Default)]
struct Voids {
    misses: Cell<u32>,
    fills: Cell<u32>,
}

impl Voids {
    fn counting<'a, K, V>(&'a self, cache: &'a dns::TtlCache<K, V>) -> Counting<'a, K, V> {
        Counting { cache, voids: self }
    }

    /// Lookups that found nothing (or failed).
    fn count(&self) -> u32 {
        self.misses.get().saturating_sub(self.fills.get())
    }
}

/// A cache that counts into [`Voids`].
struct Counting<'a, K, V> {
    cache: &'a dns::TtlCache<K, V>,
    voids: &'a Voids,
}

impl<K: Hash + Eq, V: Clone> ResolverCache<K, V> for Counting<'_, K, V> {
    fn get<Q>(&self, name: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let found = self.cache.get(name);
        if found.is_none() {
            self.voids.misses.set(self.voids.misses.get() + 1);
        }
        found
    }

    fn remove<Q>(&self, name: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.cache.remove(name)
    }

    fn insert(&self, key: K, value: V, valid_until: Instant) {
        self.voids.fills.set(self.voids.fills.get() + 1);
        self.cache.insert(key, value, valid_until);
    }
}

fn temp_spf(client: &Client) -> SpfResults {
    SpfResults {
        mail_from: client.mail_from.clone(),
        helo: SpfOutput::new(client.helo.clone()).with_result(SpfResult::TempError),
        mail: (!client.mail_from.is_empty())
            .then(|| SpfOutput::new(String::new()).with_result(SpfResult::TempError)),
    }
}

fn with_spf<'x>(
    ar: AuthenticationResults<'x>,
    client: &Client,
    spf: &SpfResults,
) -> AuthenticationResults<'x> {
    let ar = ar.with_spf_ehlo_result(&spf.helo, client.ip, &client.helo);
    match &spf.mail {
        Some(mail) => ar.with_spf_mailfrom_result(mail, client.ip, &client.mail_from, &client.helo),
        None => ar,
    }
}

/// `fut`, or `None` once `deadline` passed.
async fn bounded<T>(deadline: Instant, fut: impl std::future::Future<Output = T>) -> Option<T> {
    let left = deadline.saturating_duration_since(Instant::now());
    tokio::time::timeout(left, fut).await.ok()
}

fn timed_out() -> mail_auth::Error {
    mail_auth::Error::Dns(mail_auth::DnsError::Resolver(
        "no answer within --dns-timeout".into(),
    ))
}

/// The header field: mail-auth's results, then one `dkim=` per signature
/// (`dkim=none` for none, RFC 8601 2.7.1), written here so that the reason
/// says what went wrong (mail-auth calls an expired signature a "signature
/// error").
fn field(ar: &AuthenticationResults<'_>, dkim: &[DkimOutput<'_>]) -> Vec<u8> {
    // `Display` gives `authserv-id; results…` (or the id alone).
    let mut text = ar.to_string();
    if dkim.is_empty() {
        text.push_str(";\r\n\tdkim=none");
    }
    for d in dkim {
        text.push_str(";\r\n\tdkim=");
        text.push_str(result_word(d.result()));
        if let Some(why) = reason(d.result()) {
            text.push_str(" (");
            text.push_str(&why);
            text.push(')');
        }
        if let Some(sig) = d.signature() {
            text.push_str(" header.d=");
            text.push_str(&pvalue(&sig.d));
            text.push_str(" header.s=");
            text.push_str(&pvalue(&sig.s));
            if let Some(prefix) = sig.b.get(..6) {
                // RFC 6008: the first octets of the signature tell several
                // signatures of one domain apart.
                text.push_str(" header.b=");
                text.push_str(&base64::engine::general_purpose::STANDARD.encode(prefix));
            }
        }
    }
    let mut out = Vec::with_capacity(text.len() + 26);
    out.extend_from_slice(b"Authentication-Results: ");
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(b"\r\n");
    out
}

/// Why a signature did not pass, in words an operator reads (a comment:
/// no parentheses, backslashes or control characters from the peer).
fn reason(r: &DkimResult) -> Option<String> {
    use mail_auth::common::crypto::CryptoError;
    use mail_auth::dkim::DkimError;
    use mail_auth::{DnsError, Error};
    let e = match r {
        DkimResult::Pass | DkimResult::None => return None,
        DkimResult::Fail(e)
        | DkimResult::Neutral(e)
        | DkimResult::PermError(e)
        | DkimResult::TempError(e) => e,
    };
    let text = match e {
        Error::Dkim(DkimError::FailedBodyHashMatch) => "body hash did not verify".into(),
        Error::Dkim(DkimError::SignatureExpired) => "signature expired".into(),
        Error::Crypto(CryptoError::FailedVerification) => "signature did not verify".into(),
        Error::Dns(DnsError::RecordNotFound(_)) => "no key published".into(),
        Error::Dns(DnsError::InvalidRecordType) => "key record unreadable".into(),
        Error::Dns(DnsError::Resolver(_)) => "DNS error".into(),
        other => other.to_string().to_ascii_lowercase(),
    };
    Some(
        text.chars()
            .filter(|c| c.is_ascii_graphic() || *c == ' ')
            .filter(|c| !matches!(c, '(' | ')' | '\\'))
            .collect(),
    )
}

/// A domain or selector from a signature, as a header value: what a
/// domain name may hold, nothing else.
fn pvalue(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        .collect()
}

/// RFC 7489 6.6.4: a message not in the `pct` sample gets the next lower
/// policy (reject → quarantine, quarantine → none). `roll` is uniform in
/// 0..100.
fn sampled(policy: DmarcPolicy, pct: u8, roll: u8) -> DmarcPolicy {
    if roll < pct {
        return policy;
    }
    match policy {
        DmarcPolicy::Reject => DmarcPolicy::Quarantine,
        _ => DmarcPolicy::None,
    }
}

/// The `pct` of the DMARC record that governs `domain` (its own, else the
/// nearest parent's: the organizational domain's), 100 when absent or
/// unreadable. mail-auth follows DMARCbis, which dropped `pct`, so the
/// record is read again here (from the resolver's cache), only for failures.
async fn pct_of(ctx: &DnsContext, domain: &str, deadline: Instant) -> u8 {
    let mut name = domain.trim_end_matches('.');
    for _ in 0..8 {
        let query = format!("_dmarc.{name}.");
        if let Some(Lookup::Found(records)) = bounded(deadline, dns::txt(ctx, &query)).await {
            if let Some(r) = records
                .iter()
                .find(|r| r.trim_start().starts_with("v=DMARC1"))
            {
                return parse_pct(r);
            }
        }
        match name.split_once('.') {
            Some((_, parent)) if parent.contains('.') => name = parent,
            _ => break,
        }
    }
    100
}

fn parse_pct(record: &str) -> u8 {
    record
        .split(';')
        .filter_map(|t| t.split_once('='))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("pct"))
        .and_then(|(_, v)| v.trim().parse::<u8>().ok())
        .map_or(100, |p| p.min(100))
}

fn dkim_rank(r: &DkimResult) -> u8 {
    match r {
        DkimResult::Pass => 0,
        DkimResult::Fail(_) => 1,
        DkimResult::TempError(_) => 2,
        DkimResult::PermError(_) => 3,
        DkimResult::Neutral(_) => 4,
        DkimResult::None => 5,
    }
}

fn result_word(r: &DkimResult) -> &'static str {
    match r {
        DkimResult::Pass => "pass",
        DkimResult::Fail(_) => "fail",
        DkimResult::TempError(_) => "temperror",
        DkimResult::PermError(_) => "permerror",
        DkimResult::Neutral(_) => "neutral",
        DkimResult::None => "none",
    }
}

// ---------------------------------------------------------------------------
// Header section scanning (for strip_ours).

/// Where the header section ends (after its last field's CRLF), or the
/// whole body when there is no empty line.
fn header_end(body: &[u8]) -> usize {
    if body.starts_with(b"\r\n") {
        return 0;
    }
    memchr::memmem::find(body, b"\r\n\r\n").map_or(body.len(), |i| i + 2)
}

/// The end of the field starting at `pos` (after its CRLF, folded lines
/// included).
fn field_end(body: &[u8], pos: usize, end: usize) -> usize {
    let mut p = pos;
    loop {
        match memchr::memmem::find(&body[p..end], b"\r\n") {
            Some(i) => {
                p += i + 2;
                if p >= end || !matches!(body[p], b' ' | b'\t') {
                    return p;
                }
            }
            None => return end,
        }
    }
}

/// The value of `field` when its name is `name` (ASCII case-insensitive).
fn value_of<'a>(field: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    let colon = memchr::memchr(b':', field)?;
    let (n, rest) = field.split_at(colon);
    // RFC 5322 4.5 (obsolete syntax): white space before the colon.
    let n = n.trim_ascii_end();
    n.eq_ignore_ascii_case(name).then(|| &rest[1..])
}

/// The authserv-id of an `Authentication-Results` value: the first token,
/// comments and folding skipped (RFC 8601 2.2).
fn authserv_id_of(value: &[u8]) -> Option<&str> {
    let mut v = value;
    loop {
        v = v.trim_ascii_start();
        if v.first() == Some(&b'(') {
            // A comment (not nested: a nested one ends the match early,
            // which only means it is not ours).
            let close = memchr::memchr(b')', v)?;
            v = &v[close + 1..];
        } else {
            break;
        }
    }
    let end = v
        .iter()
        .position(|&b| b == b';' || b == b'(' || b.is_ascii_whitespace())
        .unwrap_or(v.len());
    let id = std::str::from_utf8(&v[..end]).ok()?;
    (!id.is_empty()).then_some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_only_our_authserv_id() {
        let mut m = b"Received: x\r\n\
Authentication-Results: MX.Example.org; spf=pass\r\n\
\tsmtp.mailfrom=a@b\r\n\
Authentication-Results: other.example; dkim=pass\r\n\
authentication-results : (comment) mx.example.org;\r\n dkim=pass\r\n\
Subject: hi\r\n\
\r\n\
Authentication-Results: mx.example.org; in the body\r\n"
            .to_vec();
        assert_eq!(strip_ours(&mut m, "mx.example.org"), 2);
        assert_eq!(
            m,
            b"Received: x\r\n\
Authentication-Results: other.example; dkim=pass\r\n\
Subject: hi\r\n\
\r\n\
Authentication-Results: mx.example.org; in the body\r\n"
                .to_vec()
        );
        // A prefix of our id is someone else's.
        let mut m = b"Authentication-Results: mx.example.org.evil; x\r\n\r\nb".to_vec();
        assert_eq!(strip_ours(&mut m, "mx.example.org"), 0);
        // No header section at all, or no end to it.
        let mut m = b"\r\nAuthentication-Results: mx.example.org; x\r\n".to_vec();
        assert_eq!(strip_ours(&mut m, "mx.example.org"), 0);
        let mut m = b"Authentication-Results: mx.example.org; x".to_vec();
        assert_eq!(strip_ours(&mut m, "mx.example.org"), 1);
        assert!(m.is_empty());
    }

    #[test]
    fn pct_lowers_the_policy_outside_the_sample() {
        assert_eq!(parse_pct("v=DMARC1; p=reject; pct=20"), 20);
        assert_eq!(parse_pct("v=DMARC1; p=reject"), 100);
        assert_eq!(parse_pct("v=DMARC1; p=reject; PCT = 0 ;"), 0);
        assert_eq!(parse_pct("v=DMARC1; pct=300"), 100);
        assert_eq!(sampled(DmarcPolicy::Reject, 20, 19), DmarcPolicy::Reject);
        assert_eq!(
            sampled(DmarcPolicy::Reject, 20, 20),
            DmarcPolicy::Quarantine
        );
        assert_eq!(sampled(DmarcPolicy::Quarantine, 0, 0), DmarcPolicy::None);
        assert_eq!(
            sampled(DmarcPolicy::Quarantine, 100, 99),
            DmarcPolicy::Quarantine
        );
    }
}
