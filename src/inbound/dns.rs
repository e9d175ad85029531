//! DNS for the inbound checks (SPF, DKIM keys, DMARC and ARC records, and
//! any other lookup a check of incoming mail needs, such as a DNS
//! blocklist's A records): one resolver per shard, with the shard's own
//! caches, so that what a shard learned it keeps and no lock is shared.
//!
//! hickory-resolver (the one mail-auth verifies with) runs on tokio, the
//! shards on glommio. The checks run on the shard itself: a [`DnsHandle`]
//! polls them with the resolver's tokio runtime entered, and that runtime's
//! one worker thread (`dns-N`) drives the sockets and timers and wakes the
//! shard when an answer comes. So a message whose records are all cached
//! is verified without leaving the shard (no wake-up of another thread,
//! no context switch), and one that needs DNS waits without blocking it.
//! The RSA/Ed25519 arithmetic runs inline: measured cheaper than any hop
//! (`tuning/results/2026-12-02/auth-inline.md`).
//!
//! Every lookup made here is bounded by `--dns-timeout`; a job that runs a
//! whole check bounds itself (see `inbound::auth`), and the shard never
//! waits longer than that and a grace, on its own timer.
//! Caching: hickory's own cache (TTL, positive and negative) and, for
//! mail-auth, the parsed TXT records ([`TtlCache`]), both per shard.
//!
//! Must never: block a shard on a socket, or let a lookup wait unbounded.

use std::borrow::Borrow;
use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_lite::FutureExt;
use hickory_resolver::config::ResolverOpts;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::RData;
use hickory_resolver::TokioResolver;
use mail_auth::{MessageAuthenticator, RecordSet, ResolverCache, Txt, MX};

/// How long a shard waits for a job beyond the job's own bound before it
/// gives up on it (a runtime whose timers lag, not a DNS that is slow: the
/// job itself stops at its deadline).
pub const GRACE: Duration = Duration::from_secs(2);
/// Entries per parsed-record cache; when full, expired entries go, and if
/// none had, the whole cache (a flood of distinct names must not grow it).
const CACHE_ENTRIES: usize = 16 << 10;
/// The shortest a negative answer (NXDOMAIN, no record) is cached.
const NEGATIVE_MIN_TTL: Duration = Duration::from_secs(60);
/// How long a TXT lookup that failed (SERVFAIL, REFUSED, no answer in
/// time) is answered from memory as that failure: a broken or silent DNS
/// costs one wait per name in this time, not one per message.
pub const ERROR_TTL: Duration = Duration::from_secs(30);
/// The longest a parsed record is kept, whatever its TTL says.
const MAX_TTL: Duration = Duration::from_secs(3600);

/// The outcome of one lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup<T> {
    Found(T),
    /// NXDOMAIN, or the name has no record of that type.
    NotFound,
    /// Timeout, SERVFAIL, no resolver: try again later.
    TempFail(String),
}

/// What a job runs with: the resolver and the shard's caches.
pub struct DnsContext {
    /// The resolver, wrapped for mail-auth's verifiers.
    pub auth: MessageAuthenticator,
    /// `--dns-timeout`: the most any check may wait for DNS.
    pub timeout: Duration,
    pub txt: TtlCache<Box<str>, Txt>,
    pub mx: TtlCache<Box<str>, RecordSet<MX>>,
    pub ipv4: TtlCache<Box<str>, RecordSet<Ipv4Addr>>,
    pub ipv6: TtlCache<Box<str>, RecordSet<Ipv6Addr>>,
    pub ptr: TtlCache<IpAddr, RecordSet<Box<str>>>,
}

/// A handle to one shard's inbound DNS: the resolver, whose sockets and
/// timers a tokio runtime of one worker thread drives, and the parsed-record
/// caches of the shard that uses it. Cheap to clone and `Send` (the shard's
/// context is built before its thread starts); the caches are made on first
/// use on the shard's thread and stay there ([`DnsHandle::context`]).
#[derive(Clone)]
pub struct DnsHandle {
    runtime: Arc<tokio::runtime::Runtime>,
    auth: MessageAuthenticator,
    timeout: Duration,
}

impl DnsHandle {
    /// Starts the resolver's runtime, its worker thread named `name`.
    /// `dns_server` replaces the system's resolvers (as `--dns-server` does
    /// for delivery).
    pub fn start(
        name: &str,
        dns_server: Option<SocketAddr>,
        timeout: Duration,
    ) -> std::io::Result<DnsHandle> {
        let config = crate::relay::mx::resolver_config(dns_server);
        let mut opts = ResolverOpts::default();
        // hickory's own per-query bound (two tries, for a lost datagram);
        // the job's deadline is the real one.
        opts.timeout = timeout / 2;
        opts.attempts = 2;
        // "No such name" is kept at least this long even when the answer
        // carries no SOA to say how long (some servers send none): the
        // DMARC tree walk asks for such names on every message.
        opts.negative_min_ttl = Some(NEGATIVE_MIN_TTL);
        // A multi-thread runtime (of one worker) drives its sockets and
        // timers on its own thread, whoever polls the futures that use them.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(1)
            .thread_name(name)
            .enable_all()
            .build()?;
        let resolver = {
            let _in = runtime.enter();
            TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
                .with_options(opts)
                .build()
                .map_err(std::io::Error::other)?
        };
        Ok(DnsHandle {
            runtime: Arc::new(runtime),
            auth: MessageAuthenticator(resolver),
            timeout,
        })
    }

    /// `--dns-timeout`.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Runs `job` on the calling shard, inside the resolver's runtime (so
    /// that hickory can open sockets and set timers), and returns its
    /// output; `None` when it did not finish within `limit` (the job should
    /// bound itself below that; this is the shard's own bound, on its own
    /// clock). What the caches already hold costs no thread hop at all.
    pub async fn run<T, F, Fut>(&self, limit: Duration, job: F) -> Option<T>
    where
        F: FnOnce(Rc<DnsContext>) -> Fut,
        Fut: Future<Output = T>,
    {
        let job = InRuntime {
            runtime: self.runtime.handle().clone(),
            future: Box::pin(job(self.context())),
        };
        async { Some(job.await) }
            .or(async {
                glommio::timer::sleep(limit).await;
                None
            })
            .await
    }

    /// This thread's caches for this resolver (made on first use).
    fn context(&self) -> Rc<DnsContext> {
        thread_local! {
            static CONTEXTS: RefCell<Vec<(usize, Rc<DnsContext>)>> =
                const { RefCell::new(Vec::new()) };
        }
        let key = Arc::as_ptr(&self.runtime) as usize;
        CONTEXTS.with(|c| {
            let mut c = c.borrow_mut();
            if let Some((_, ctx)) = c.iter().find(|(k, _)| *k == key) {
                return ctx.clone();
            }
            let ctx = Rc::new(DnsContext {
                auth: self.auth.clone(),
                timeout: self.timeout,
                txt: TtlCache::default(),
                mx: TtlCache::default(),
                ipv4: TtlCache::default(),
                ipv6: TtlCache::default(),
                ptr: TtlCache::default(),
            });
            c.push((key, ctx.clone()));
            ctx
        })
    }

    /// The IPv4 addresses of `name` (a DNS blocklist's answer, say).
    pub async fn lookup_a(&self, name: &str) -> Lookup<Vec<Ipv4Addr>> {
        let name = absolute(name);
        self.bounded(move |ctx| async move {
            match ctx.auth.resolver().ipv4_lookup(name.as_str()).await {
                Ok(l) => Lookup::Found(
                    l.answers()
                        .iter()
                        .filter_map(|r| match &r.data {
                            RData::A(a) => Some(a.0),
                            _ => None,
                        })
                        .collect(),
                ),
                Err(e) if e.is_nx_domain() || e.is_no_records_found() => Lookup::NotFound,
                Err(e) => Lookup::TempFail(e.to_string()),
            }
        })
        .await
    }

    /// The TXT records of `name`, each one's strings joined.
    pub async fn lookup_txt(&self, name: &str) -> Lookup<Vec<String>> {
        let name = absolute(name);
        self.bounded(move |ctx| async move { txt(&ctx, &name).await })
            .await
    }

    /// Runs a single lookup under `--dns-timeout`.
    async fn bounded<T, F, Fut>(&self, f: F) -> Lookup<T>
    where
        F: FnOnce(Rc<DnsContext>) -> Fut,
        Fut: Future<Output = Lookup<T>>,
    {
        let limit = self.timeout;
        let job = move |ctx: Rc<DnsContext>| async move {
            match tokio::time::timeout(limit, f(ctx)).await {
                Ok(r) => r,
                Err(_) => Lookup::TempFail(format!("no answer within {limit:?}")),
            }
        };
        self.run(limit + GRACE, job)
            .await
            .unwrap_or_else(|| Lookup::TempFail(format!("no answer within {limit:?}")))
    }
}

/// TXT lookup (no bound of its own: the caller's).
pub async fn txt(ctx: &DnsContext, name: &str) -> Lookup<Vec<String>> {
    match ctx.auth.resolver().txt_lookup(name).await {
        Ok(l) => Lookup::Found(
            l.answers()
                .iter()
                .filter_map(|r| match &r.data {
                    RData::TXT(t) => Some(
                        t.txt_data
                            .iter()
                            .map(|s| String::from_utf8_lossy(s))
                            .collect::<String>(),
                    ),
                    _ => None,
                })
                .collect(),
        ),
        Err(e) if e.is_nx_domain() || e.is_no_records_found() => Lookup::NotFound,
        Err(e) => Lookup::TempFail(e.to_string()),
    }
}

/// Makes sure the TXT cache answers for each of `names` (absolute,
/// lower-case, as mail-auth writes its keys) before the checks look them
/// up: mail-auth caches the records it found, not the answers that had
/// none, nor the failures, so without this every message would ask the
/// resolver again for each name that has no record (the DMARC tree walk
/// asks for the parent domains' `_dmarc` on every message) and wait again
/// for each name whose DNS is broken. A name with no record is remembered
/// as such (what mail-auth would have concluded, with the same response
/// code) for [`NEGATIVE_MIN_TTL`]; one whose lookup failed, as a DNS error
/// for [`ERROR_TTL`]; one with records is left for mail-auth to parse and
/// cache. Lookups run together, bounded by `deadline`.
pub async fn prime_txt(ctx: &DnsContext, names: &[String], deadline: Instant) {
    let missing: Vec<&String> = names
        .iter()
        .filter(|n| ctx.txt.get(n.as_str()).is_none())
        .collect();
    if missing.is_empty() {
        return;
    }
    let left = deadline.saturating_duration_since(Instant::now());
    let lookups = missing.iter().map(|name| async move {
        let answer =
            tokio::time::timeout(left, ctx.auth.resolver().txt_lookup(name.as_str())).await;
        let now = Instant::now();
        let (error, ttl) = match answer {
            Ok(Ok(_)) => return,
            Ok(Err(e)) if e.is_no_records_found() => {
                let code = if e.is_nx_domain() {
                    ResponseCode::NXDomain
                } else {
                    ResponseCode::NoError
                };
                (mail_auth::DnsError::RecordNotFound(code), NEGATIVE_MIN_TTL)
            }
            Ok(Err(e)) => (mail_auth::DnsError::Resolver(e.to_string()), ERROR_TTL),
            Err(_) => (
                mail_auth::DnsError::Resolver(format!("no answer within {left:?}")),
                ERROR_TTL,
            ),
        };
        ctx.txt.insert(
            name.as_str().into(),
            Txt::Error(mail_auth::Error::Dns(error)),
            now + ttl,
        );
    });
    join_all(lookups).await;
}

/// Runs `futures` together to completion.
async fn join_all<F: Future<Output = ()>>(futures: impl Iterator<Item = F>) {
    let mut pending: Vec<Pin<Box<F>>> = futures.map(Box::pin).collect();
    std::future::poll_fn(|cx| {
        pending.retain_mut(|f| f.as_mut().poll(cx).is_pending());
        if pending.is_empty() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
}

/// A trailing dot makes the name absolute: no search-domain surprises.
fn absolute(name: &str) -> String {
    format!("{}.", name.trim_end_matches('.'))
}

/// A future polled with the resolver's runtime entered: hickory spawns its
/// exchanges and arms its timers on that runtime, whose worker thread then
/// wakes the shard when an answer or a deadline comes.
struct InRuntime<F> {
    runtime: tokio::runtime::Handle,
    future: Pin<Box<F>>,
}

impl<F: Future> Future for InRuntime<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let _in = self.runtime.enter();
        self.future.as_mut().poll(cx)
    }
}

/// A bounded cache of parsed records for one shard, kept for their TTL
/// (at most [`MAX_TTL`]). Single-threaded: the shard owns it.
pub struct TtlCache<K, V> {
    map: RefCell<HashMap<K, (V, Instant)>>,
}

impl<K, V> Default for TtlCache<K, V> {
    fn default() -> Self {
        TtlCache {
            map: RefCell::new(HashMap::new()),
        }
    }
}

impl<K: Hash + Eq, V: Clone> TtlCache<K, V> {
    /// Entries held (expired ones included until they are swept).
    pub fn len(&self) -> usize {
        self.map.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<K: Hash + Eq, V: Clone> ResolverCache<K, V> for TtlCache<K, V> {
    fn get<Q>(&self, name: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let mut map = self.map.borrow_mut();
        match map.get(name) {
            Some((v, until)) if *until > Instant::now() => Some(v.clone()),
            Some(_) => {
                map.remove(name);
                None
            }
            None => None,
        }
    }

    fn remove<Q>(&self, name: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.map.borrow_mut().remove(name).map(|(v, _)| v)
    }

    fn insert(&self, key: K, value: V, valid_until: Instant) {
        let now = Instant::now();
        let until = valid_until.min(now + MAX_TTL);
        if until <= now {
            return;
        }
        let mut map = self.map.borrow_mut();
        if map.len() >= CACHE_ENTRIES {
            map.retain(|_, (_, u)| *u > now);
            if map.len() >= CACHE_ENTRIES {
                map.clear();
            }
        }
        map.insert(key, (value, until));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_keeps_for_the_ttl_and_stays_bounded() {
        let c: TtlCache<Box<str>, u32> = TtlCache::default();
        c.insert("a".into(), 1, Instant::now() + Duration::from_secs(60));
        assert_eq!(c.get("a"), Some(1));
        c.insert("gone".into(), 2, Instant::now());
        assert_eq!(c.get("gone"), None);
        for i in 0..CACHE_ENTRIES + 10 {
            c.insert(
                i.to_string().into(),
                3,
                Instant::now() + Duration::from_secs(60),
            );
        }
        assert!(c.len() <= CACHE_ENTRIES);
    }
}
