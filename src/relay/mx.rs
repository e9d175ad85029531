//! Where mail for a domain goes: MX lookup by preference, the implicit MX
//! (A/AAAA of the domain itself) when there is none (RFC 5321 5.1), and null
//! MX (RFC 7505) as a permanent failure.
//!
//! hickory-resolver runs on tokio, the shards on glommio: one resolver
//! thread owns a current-thread tokio runtime and answers requests sent from
//! any shard; answers come back on `futures` oneshot channels, which glommio
//! tasks can await. Lookups time out inside hickory (its own timeouts and
//! retries), and a dropped request simply finds its answer channel closed.
//! The same thread answers the A lookups of the DNS lists of inbound
//! clients ([`Resolver::a_records`], for [`crate::inbound::dnsbl`]): at most
//! 4096 in flight, each abandoned as soon as its asker gives up.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use futures_channel::oneshot;
use futures_lite::FutureExt;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::rr::{RData, RecordType};
use hickory_resolver::TokioResolver;
use tokio::sync::mpsc;

/// The result of resolving where to deliver a domain's mail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// Addresses to try, in order (MX preference, then address order).
    Hosts(Vec<(String, IpAddr)>),
    /// Permanent: null MX, no such domain, or no address at all.
    Permanent(String),
    /// Try again later (DNS failure or timeout).
    Temporary(String),
}

/// The A records of a name, with how long the answer may be kept (DNS
/// blocklist queries: [`Resolver::a_records`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ARecords {
    /// The addresses, valid until the answer's TTL runs out.
    Found(Vec<Ipv4Addr>, Instant),
    /// No such name or no A record; until when that may be kept (the
    /// zone's negative TTL when the answer carried its SOA).
    None(Option<Instant>),
    /// The lookup failed (server failure, refused, timeout inside hickory).
    Failed(String),
}

enum Request {
    /// MX (then implicit MX) for a mail domain.
    Mail(String, oneshot::Sender<Resolution>),
    /// Addresses of one host (a smarthost or route given by name).
    Host(String, oneshot::Sender<Resolution>),
    /// The A records of an absolute name.
    A(String, oneshot::Sender<ARecords>),
    /// The MTA-STS policy of a mail domain (`mta_sts`).
    MtaSts(
        String,
        oneshot::Sender<Option<std::sync::Arc<super::mta_sts::Policy>>>,
    ),
    /// A lookup with the AD bit for DANE (`dane`).
    Secure(String, RecordType, oneshot::Sender<super::dane::Answer>),
}

/// Longest a DANE lookup (MX or TLSA with the AD bit) may take.
const SECURE_TIMEOUT: Duration = Duration::from_secs(10);

/// The resolvers to ask: `dns_server` alone when given (over UDP, then
/// TCP for truncated answers), else the system's. No resolver configured
/// is not fatal: lookups then fail, temporarily and saying why, until one
/// is (shared with the inbound checks' DNS threads, `inbound::dns`).
pub fn resolver_config(dns_server: Option<SocketAddr>) -> ResolverConfig {
    match dns_server {
        Some(addr) => {
            let mut udp = ConnectionConfig::udp();
            udp.port = addr.port();
            let mut tcp = ConnectionConfig::tcp();
            tcp.port = addr.port();
            ResolverConfig::from_parts(
                None,
                Vec::new(),
                vec![NameServerConfig::new(addr.ip(), true, vec![udp, tcp])],
            )
        }
        None => match hickory_resolver::system_conf::read_system_conf() {
            Ok((cfg, _opts)) => cfg,
            Err(e) => {
                tracing::error!(error = %e, "cannot read /etc/resolv.conf; DNS lookups will fail");
                ResolverConfig::from_parts(None, Vec::new(), Vec::new())
            }
        },
    }
}

/// A handle to the resolver thread; cheap to clone, usable from any shard.
#[derive(Clone)]
pub struct Resolver {
    tx: mpsc::UnboundedSender<Request>,
}

impl Resolver {
    /// Starts the resolver thread. `dns_server` replaces the system's
    /// resolvers (for tests: a dnsmasq on a loopback port); `mta_sts`
    /// (when MTA-STS is on) is where policies are fetched and kept.
    pub fn start(
        dns_server: Option<SocketAddr>,
        mta_sts: Option<super::mta_sts::Settings>,
    ) -> std::io::Result<Resolver> {
        let config = resolver_config(dns_server);
        // DANE's lookups go to one validating resolver whose AD bit is
        // trusted: `--dns-server`, else the system's first.
        let secure_server = dns_server.or_else(|| {
            config
                .name_servers()
                .first()
                .map(|ns| SocketAddr::new(ns.ip, 53))
        });
        let (tx, mut rx) = mpsc::unbounded_channel::<Request>();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            // MTA-STS fetches and cache files.
            .max_blocking_threads(super::mta_sts::MAX_FETCHES + 4)
            .build()?;
        std::thread::Builder::new()
            .name("resolver".into())
            .spawn(move || {
                rt.block_on(async move {
                    let resolver = match TokioResolver::builder_with_config(
                        config,
                        TokioRuntimeProvider::default(),
                    )
                    .build()
                    {
                        Ok(r) => r,
                        Err(e) => {
                            tracing::error!(error = %e, "cannot build the DNS resolver");
                            while let Some(req) = rx.recv().await {
                                match req {
                                    Request::Mail(_, answer) | Request::Host(_, answer) => {
                                        let _ = answer.send(Resolution::Temporary(format!(
                                            "no resolver: {e}"
                                        )));
                                    }
                                    Request::A(_, answer) => {
                                        let _ = answer
                                            .send(ARecords::Failed(format!("no resolver: {e}")));
                                    }
                                    Request::MtaSts(_, answer) => {
                                        let _ = answer.send(None);
                                    }
                                    Request::Secure(_, _, answer) => {
                                        let _ = answer.send(super::dane::Answer::Failed(format!(
                                            "no resolver: {e}"
                                        )));
                                    }
                                }
                            }
                            return;
                        }
                    };
                    let resolver = std::rc::Rc::new(resolver);
                    let sts = mta_sts.map(|settings| {
                        std::rc::Rc::new(std::cell::RefCell::new(super::mta_sts::Cache::open(
                            settings,
                        )))
                    });
                    let a_inflight = std::rc::Rc::new(std::cell::Cell::new(0usize));
                    let local = tokio::task::LocalSet::new();
                    local
                        .run_until(async move {
                            while let Some(req) = rx.recv().await {
                                let r = resolver.clone();
                                let a_inflight = a_inflight.clone();
                                let sts = sts.clone();
                                tokio::task::spawn_local(async move {
                                    match req {
                                        Request::Mail(domain, answer) => {
                                            let _ = answer.send(resolve(&r, &domain).await);
                                        }
                                        Request::Host(host, answer) => {
                                            let _ = answer.send(addresses(&r, &host).await);
                                        }
                                        Request::MtaSts(domain, answer) => {
                                            let p = match &sts {
                                                Some(cache) => {
                                                    super::mta_sts::policy(cache, &r, &domain).await
                                                }
                                                None => None,
                                            };
                                            let _ = answer.send(p);
                                        }
                                        Request::Secure(name, rtype, answer) => {
                                            let a = match secure_server {
                                                Some(server) => {
                                                    super::dane::query(
                                                        server,
                                                        &name,
                                                        rtype,
                                                        SECURE_TIMEOUT,
                                                    )
                                                    .await
                                                }
                                                None => super::dane::Answer::Failed(
                                                    "no DNS server configured".into(),
                                                ),
                                            };
                                            let _ = answer.send(a);
                                        }
                                        Request::A(name, mut answer) => {
                                            let Some(_slot) = ASlot::take(&a_inflight) else {
                                                let _ = answer.send(ARecords::Failed(
                                                    "too many DNS list lookups in flight".into(),
                                                ));
                                                return;
                                            };
                                            // Abandoned by the asker (its own
                                            // timeout): hickory stops too.
                                            let lookup = async { Some(a_records(&r, &name).await) };
                                            let gone = async {
                                                answer.cancellation().await;
                                                None
                                            };
                                            if let Some(a) = lookup.or(gone).await {
                                                let _ = answer.send(a);
                                            }
                                        }
                                    }
                                });
                            }
                        })
                        .await;
                })
            })?;
        Ok(Resolver { tx })
    }

    /// Where mail for `domain` goes.
    pub async fn resolve(&self, domain: &str) -> Resolution {
        let (tx, rx) = oneshot::channel();
        self.ask(Request::Mail(domain.to_owned(), tx), rx).await
    }

    /// The addresses of `host` (an IP literal answers itself).
    pub async fn host(&self, host: &str) -> Resolution {
        if let Ok(ip) = host.trim_matches(['[', ']']).parse::<IpAddr>() {
            return Resolution::Hosts(vec![(host.to_owned(), ip)]);
        }
        let (tx, rx) = oneshot::channel();
        self.ask(Request::Host(host.to_owned(), tx), rx).await
    }

    /// The A records of `name` (taken as absolute). A caller that must not
    /// wait long bounds this itself (hickory's own timeouts and retries
    /// are longer than a session should wait); dropping the future drops
    /// the request.
    pub async fn a_records(&self, name: &str) -> ARecords {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Request::A(name.to_owned(), tx)).is_err() {
            return ARecords::Failed("resolver thread is gone".into());
        }
        rx.await
            .unwrap_or_else(|_| ARecords::Failed("resolver dropped the request".into()))
    }

    /// `name`'s records of type `rtype`, asked with the AD bit of the
    /// validating resolver (DANE: `super::dane`).
    pub async fn secure(&self, name: &str, rtype: RecordType) -> super::dane::Answer {
        let (tx, rx) = oneshot::channel();
        if self
            .tx
            .send(Request::Secure(name.to_owned(), rtype, tx))
            .is_err()
        {
            return super::dane::Answer::Failed("resolver thread is gone".into());
        }
        rx.await
            .unwrap_or_else(|_| super::dane::Answer::Failed("resolver dropped the request".into()))
    }

    /// The MTA-STS policy in force for mail domain `domain` (`None`: no
    /// policy, or MTA-STS is off).
    pub async fn mta_sts(&self, domain: &str) -> Option<std::sync::Arc<super::mta_sts::Policy>> {
        let (tx, rx) = oneshot::channel();
        if self
            .tx
            .send(Request::MtaSts(domain.to_owned(), tx))
            .is_err()
        {
            return None;
        }
        rx.await.ok().flatten()
    }

    async fn ask(&self, req: Request, rx: oneshot::Receiver<Resolution>) -> Resolution {
        if self.tx.send(req).is_err() {
            return Resolution::Temporary("resolver thread is gone".into());
        }
        rx.await
            .unwrap_or_else(|_| Resolution::Temporary("resolver dropped the request".into()))
    }
}

/// Most A lookups (DNS lists of inbound clients) in flight at once: a
/// flood of connections from new addresses against a slow DNS server must
/// not pile up lookups without bound; beyond it a lookup fails at once
/// (the client counts as not listed).
const MAX_A_INFLIGHT: usize = 4096;

/// One of the [`MAX_A_INFLIGHT`] places, given back on drop.
struct ASlot(std::rc::Rc<std::cell::Cell<usize>>);

impl ASlot {
    fn take(count: &std::rc::Rc<std::cell::Cell<usize>>) -> Option<ASlot> {
        if count.get() >= MAX_A_INFLIGHT {
            return None;
        }
        count.set(count.get() + 1);
        Some(ASlot(count.clone()))
    }
}

impl Drop for ASlot {
    fn drop(&mut self) {
        self.0.set(self.0.get() - 1);
    }
}

async fn a_records(r: &TokioResolver, name: &str) -> ARecords {
    let fqdn = format!("{}.", name.trim_end_matches('.'));
    match r.lookup(fqdn.as_str(), RecordType::A).await {
        Ok(lookup) => {
            // The answer's TTL, as hickory counts it down in its cache.
            let until = lookup.valid_until();
            let addrs: Vec<Ipv4Addr> = lookup
                .answers()
                .iter()
                .filter_map(|rec| match &rec.data {
                    RData::A(a) => Some(a.0),
                    _ => None,
                })
                .collect();
            if addrs.is_empty() {
                ARecords::None(Some(until))
            } else {
                ARecords::Found(addrs, until)
            }
        }
        Err(NetError::Dns(DnsError::NoRecordsFound(no))) => ARecords::None(
            no.negative_ttl
                .map(|ttl| Instant::now() + Duration::from_secs(ttl.into())),
        ),
        Err(e) => ARecords::Failed(e.to_string()),
    }
}

async fn addresses(r: &TokioResolver, host: &str) -> Resolution {
    match r
        .lookup_ip(format!("{}.", host.trim_end_matches('.')).as_str())
        .await
    {
        Ok(ips) => {
            let v: Vec<(String, IpAddr)> = ips.iter().map(|ip| (host.to_owned(), ip)).collect();
            if v.is_empty() {
                Resolution::Permanent(format!("{host} has no address"))
            } else {
                Resolution::Hosts(v)
            }
        }
        Err(e) if e.is_nx_domain() || e.is_no_records_found() => {
            Resolution::Permanent(format!("{host} has no address"))
        }
        Err(e) => Resolution::Temporary(format!("address lookup for {host} failed: {e}")),
    }
}

async fn resolve(r: &TokioResolver, domain: &str) -> Resolution {
    // A trailing dot makes the name absolute: no search-domain surprises.
    let fqdn = format!("{}.", domain.trim_end_matches('.'));
    let mut exchanges: Vec<(u16, String)> = match r.mx_lookup(fqdn.as_str()).await {
        Ok(mx) => mx
            .answers()
            .iter()
            .filter_map(|rec| match &rec.data {
                hickory_resolver::proto::rr::RData::MX(m) => Some((
                    m.preference,
                    m.exchange.to_ascii().trim_end_matches('.').to_owned(),
                )),
                _ => None,
            })
            .collect(),
        Err(e) if e.is_nx_domain() => {
            return Resolution::Permanent(format!("{domain}: no such domain"))
        }
        Err(e) if e.is_no_records_found() => Vec::new(),
        Err(e) => return Resolution::Temporary(format!("MX lookup for {domain} failed: {e}")),
    };
    // RFC 7505: a single MX of preference 0 with the root as exchange.
    if exchanges.len() == 1 && exchanges[0].1.is_empty() {
        return Resolution::Permanent(format!("{domain} accepts no mail (null MX)"));
    }
    exchanges.retain(|(_, h)| !h.is_empty());
    if exchanges.is_empty() {
        // RFC 5321 5.1: the domain itself is the implicit MX.
        exchanges.push((0, domain.to_owned()));
    }
    exchanges.sort_by_key(|(pref, _)| *pref);
    let mut hosts = Vec::new();
    let mut temporary = None;
    for (_, host) in exchanges {
        match r.lookup_ip(format!("{host}.").as_str()).await {
            Ok(ips) => hosts.extend(ips.iter().map(|ip| (host.clone(), ip))),
            Err(e) if e.is_nx_domain() || e.is_no_records_found() => {}
            Err(e) => temporary = Some(format!("address lookup for {host} failed: {e}")),
        }
    }
    if !hosts.is_empty() {
        Resolution::Hosts(hosts)
    } else if let Some(t) = temporary {
        Resolution::Temporary(t)
    } else {
        Resolution::Permanent(format!("{domain}: no mail exchanger has an address"))
    }
}
