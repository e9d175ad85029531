//! # ringmta
//!
//! A thread-per-core ESMTP relay and submission server on io_uring (glommio).
//!
//! # Layout
//!
//! * [`smtp`] — the protocol, sans-IO: the command parser, the DATA/BDAT
//!   receivers (the SMTP-smuggling defence lives there), reply rendering and
//!   the [`smtp::Session`] state machine, the SASL PLAIN/LOGIN exchange
//!   ([`smtp::auth`]; the password check is the driver's) and the RFC 6409
//!   header completion of submitted mail ([`smtp::submit`]) and the PROXY
//!   protocol v1/v2 header a load balancer sends first ([`smtp::proxy`]),
//!   and the message side of HTTP injection ([`smtp::inject`]: the JSON
//!   request, the sender and RCPT checks of a relay client, `{{name}}`
//!   substitution, the MIME built from parts); [`smtp::field`] takes a
//!   control field (`X-Ringmta-Pool`) out of a received message. No
//!   sockets, files or clocks.
//! * [`server`] — the glommio glue and the only place with sockets: shards
//!   (one per core but one by default, [`config::default_shards`]), each
//!   with its own SO_REUSEPORT listeners, connection tasks (each inside
//!   `catch_unwind`), limits, timeouts and graceful shutdown.
//!   [`server::budget`] is a shard's budget for message bodies in flight,
//!   with a fair share per client address; the driver tells each session
//!   how far its body may grow.
//!   The connection driver runs a session over plain TCP or rustls
//!   (STARTTLS, implicit TLS); [`server::tls`] holds the certificate,
//!   [`server::users`] the argon2 users, [`server::dkim`] the keys that
//!   sign submitted mail (and, under `--dkim-relay-network on`, mail of
//!   relay-network clients and injected mail) and [`server::recipients`] the
//!   `--local-recipients` file, all reloaded on SIGHUP. Connections from
//!   `--proxy-protocol-from` start with a PROXY header, read (`server::proxy`)
//!   before the greeting or handshake; the client it names is the
//!   session's peer, and the per-IP limit is taken for it only then.
//!   `server::inject` stores the messages HTTP injection hands a shard
//!   (signed on the pool when asked, one group commit for a batch) and
//!   answers once they are durable.
//! * [`spool`] — durability: per-shard append-only segment files of
//!   checksummed records; messages that finish while a write+`fdatasync` is
//!   in flight share the next one (group commit), and their 250s go out when
//!   it returns. A message segment is zero-filled ahead of its batches, so
//!   their syncs overwrite space the file has (a zero tail is a clean end). A per-shard journal records per-recipient outcomes and
//!   queue operations, and is replaced by a snapshot of the queue as it
//!   grows; at start the segments are verified (torn tails cut off, damage
//!   in the middle skipped) and the queue is rebuilt. Finished segments are
//!   deleted while running. The newest committed batches stay in memory
//!   (`--delivery-cache`), so delivery reads a fresh message from there.
//! * [`relay`] — outbound delivery: routing (`--route`, local Maildir,
//!   `--relay-host`, MX lookup on a resolver thread), per-destination
//!   workers that reuse connections, the sans-IO SMTP client
//!   ([`relay::client`], STARTTLS included) driven over glommio sockets and
//!   rustls ([`relay::tls`]: the five TLS policies, the DANE and
//!   MTA-STS-testing certificate checks), DANE's AD-bit lookups
//!   ([`relay::dane`], on the resolver thread), MTA-STS policies
//!   ([`relay::mta_sts`]: fetched over HTTPS off the shards, kept in
//!   `<spool>/mta-sts/`), retries with
//!   backoff, RFC 3464 bounces and optional delay warnings
//!   ([`relay::dsn`]), exactly-once Maildir delivery ([`relay::maildir`]:
//!   many at once per shard, sharing the `new/` syncs). Each SMTP destination
//!   is delivered by the shard that owns it (a hash of its host or domain):
//!   the shard that took a message in hands that destination's recipients
//!   over the bounded [`relay::handoff`] mesh (or delivers them itself when
//!   the channel is full) and gets the outcomes back. Outcomes are journaled
//!   per recipient, by the origin shard only, through its spool.
//!   [`relay::control`] is what a shard does for the admin API: summaries,
//!   listings, hold/release/flush/delete/bounce journaled on its own
//!   spool, destinations suspended (kept in `<spool>/suspended.json`).
//!   [`relay::shaping`] is the traffic shaping rules (`--shaping`: default,
//!   domain and provider entries, MX rollup) and their pacing arithmetic,
//!   pure; the owner shard's workers enforce them (a provider's budget on
//!   the shard owning the provider's name, its work handed there). The
//!   same file defines source-IP pools (sources with a bind address and an
//!   EHLO name, weighted pools, the pool chosen by the `X-Ringmta-Pool`
//!   header of a trusted client, the sender domain, the route or the
//!   default): each message gets one source, connections are bound to it,
//!   and queues, budgets and automatic suspensions are per source and
//!   destination.
//!   [`relay::classify`] classifies the next hop's replies (`--bounce-rules`
//!   over built-in rules) and says what to do: bounce at once, or suspend a
//!   throttling destination, or one source's mail to it (the delivering
//!   shard does it and keeps it in `<spool>/suspended-auto-N.json`).
//! * [`inbound`] — checks of incoming mail on the relay/MX port:
//!   [`inbound::auth`] verifies SPF (HELO and MAIL FROM), every DKIM
//!   signature, the ARC chain and DMARC (alignment, `p`/`sp`/`pct`) with
//!   mail-auth, writes one `Authentication-Results` (and the quarantine
//!   header), removes forged ones with our authserv-id, and decides the
//!   SPF (`550 5.7.23` at MAIL FROM) and DMARC (`550 5.7.1`) refusals;
//!   [`inbound::dns`] is each shard's resolver (hickory on a one-thread
//!   tokio runtime, `dns-N`, that drives the sockets) and TTL caches; the
//!   checks run on the shard under `--dns-timeout`.
//! * [`policy`] — pure decisions the session and delivery share: which
//!   local recipients exist (`--local-recipients`) and which mailbox names
//!   a Maildir can hold, checked at `RCPT` so that nothing accepted fails
//!   later as a bounce to a forged sender; and who may relay
//!   ([`policy::relay`]: `--relay-network` CIDRs, local parts that would
//!   route elsewhere) and the arithmetic of per-minute rate limits
//!   ([`policy::rate`]: per client /24 or /64 and per user, one bounded
//!   table per process). No I/O.
//! * [`inbound`] — checks of inbound clients on the relay/MX port: DNS
//!   blocklists and allowlists ([`inbound::dnsbl`]: weighted zones, a
//!   threshold, lookups on the relay's resolver thread bounded by
//!   `--dnsbl-timeout`, answers cached per shard for their TTL) and the
//!   pre-greet screen's settings and its memory of clients that failed it
//!   ([`inbound::screen`]). The connection driver in [`server`] runs them
//!   before the greeting (with `--greet-pause`); the session detects the
//!   protocol violations.
//! * [`blocking`] — small bounded thread pools for the blocking work the
//!   shards hand off, one per kind (password checks, DKIM signing, Maildir
//!   file operations), so a flood of one never queues the others; a full
//!   queue is refused or waited for, with a bound. A leaf.
//! * [`cli`] / [`config_file`] / [`config`] — every knob as a flag (and
//!   `RINGMTA_*` variable, and key of the `--config` TOML file, merged under
//!   them by [`config_file::load`]), turned into a validated
//!   [`config::Config`] at start and again on SIGHUP, when
//!   [`server::Shared::apply`] swaps in what may change
//!   ([`config_file::RELOADABLE`]).
//! * [`metrics`] — a leaf every module may use and that uses none: the
//!   Prometheus registry and its metric names (a contract: README
//!   "Metrics"), and the handles each shard resolves once so that counting
//!   is an atomic add, no lock, no allocation.
//! * [`admin`] — the admin HTTP listener (`--admin`) on threads of its own,
//!   outside the shards: a path → handler router serving `/metrics` and
//!   the JSON queue-control API ([`admin::api`], with an optional bearer
//!   token), which reaches the shards only through a bounded command
//!   channel per shard and a timed wait for their answers (the shaping
//!   rules in force, `/api/v1/shaping`, it reads from the shared
//!   configuration);
//!   [`admin::client`] is the blocking client of `ringmta queue`;
//!   [`admin::inject`] is `POST /v1/inject`, which checks and builds the
//!   messages and sends them to the shards round-robin in bounded batches
//!   over the same channels, waiting for each batch's spool commit.
//!   Bounded requests and bodies, timeouts, a cap on clients.
//! * [`logwriter`] — a leaf: log lines go from the shards into one
//!   bounded buffer that a writer thread empties into stderr in batches;
//!   a shard never blocks on stderr nor wakes the writer per line.
//! * [`util`] — a leaf of small shared helpers: [`util::isolate`] (a task's
//!   panic caught, not the shard's end) and [`util::supervise`] (a shard's
//!   long-lived loop restarted with backoff after a panic).

pub mod admin;
pub mod blocking;
pub mod cli;
pub mod config;
pub mod config_file;
pub mod inbound;
pub mod logwriter;
pub mod metrics;
pub mod policy;
pub mod relay;
pub mod server;
pub mod smtp;
pub mod spool;
pub mod util;
