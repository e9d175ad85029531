//! Command-line flags, each also readable from a `RINGMTA_*` environment
//! variable. This is the low-level, as-typed form; [`crate::config::Config`]
//! is what the server runs on.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::smtp::data::BareNewline;

/// ringmta: thread-per-core ESMTP relay and submission server on io_uring.
#[derive(Debug, Parser)]
#[command(name = "ringmta", version, about, max_term_width = 100)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Cli {
    /// Without a subcommand, ringmta serves.
    #[command(subcommand)]
    pub command: Option<Subcommand>,

    /// TOML file of settings: each key a long flag name (`max-message-size = "50M"`, repeatable flags as arrays, switches as true/false); flags and RINGMTA_* variables override it; re-read on SIGHUP.
    #[arg(long, value_name = "FILE", env = "RINGMTA_CONFIG")]
    pub config: Option<PathBuf>,

    /// Check the settings (flags, environment, --config file), print them as TOML with where each came from, and exit (0: valid). Reads no file they name.
    #[arg(long)]
    pub check_config: bool,

    /// Relay/MX listener address (repeatable).
    #[arg(
        long = "smtp",
        value_name = "ADDR",
        env = "RINGMTA_SMTP",
        value_delimiter = ',',
        default_value = "127.0.0.1:2525"
    )]
    pub smtp: Vec<SocketAddr>,

    /// Message submission listener (RFC 6409; STARTTLS, then AUTH) (repeatable; `none`: off).
    #[arg(long, value_name = "ADDR", env = "RINGMTA_SUBMISSION", value_delimiter = ',',
          default_value = "127.0.0.1:2587", value_parser = parse_listen)]
    pub submission: Vec<Listen>,

    /// Submission over implicit TLS listener (RFC 8314) (repeatable; `none`: off).
    #[arg(long, value_name = "ADDR", env = "RINGMTA_SMTPS", value_delimiter = ',',
          default_value = "127.0.0.1:2465", value_parser = parse_listen)]
    pub smtps: Vec<Listen>,

    /// Admin HTTP listener: Prometheus metrics at /metrics (`none`: off).
    #[arg(long, value_name = "ADDR", env = "RINGMTA_ADMIN", default_value = "127.0.0.1:9525",
          value_parser = parse_listen)]
    pub admin: Listen,

    /// Most recipients one HTTP injection call (POST /v1/inject on --admin) may name (0: injection off).
    #[arg(
        long,
        value_name = "N",
        env = "RINGMTA_INJECT_MAX_RECIPIENTS",
        default_value_t = 10_000
    )]
    pub inject_max_recipients: usize,

    /// File whose first line is the bearer token the admin API (/api/) and HTTP injection (/v1/inject) require (needed when --admin is not loopback; /metrics stays open).
    #[arg(long, value_name = "FILE", env = "RINGMTA_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,

    /// TLS certificate chain (PEM) [default: a self-signed one generated into <spool-dir>/tls/].
    #[arg(
        long,
        value_name = "FILE",
        env = "RINGMTA_TLS_CERT",
        requires = "tls_key"
    )]
    pub tls_cert: Option<PathBuf>,

    /// TLS private key (PEM, PKCS#8/PKCS#1/SEC1) for --tls-cert.
    #[arg(
        long,
        value_name = "FILE",
        env = "RINGMTA_TLS_KEY",
        requires = "tls_cert"
    )]
    pub tls_key: Option<PathBuf>,

    /// Longest a TLS handshake (inbound STARTTLS or implicit, outbound STARTTLS) may take before the connection is closed.
    #[arg(long, value_name = "DURATION", env = "RINGMTA_TLS_HANDSHAKE_TIMEOUT", default_value = "30s",
          value_parser = parse_duration)]
    pub tls_handshake_timeout: Duration,

    /// Submission users: lines `user:argon2-hash` (make them with `ringmta passwd USER`); reloaded on SIGHUP.
    #[arg(long, value_name = "FILE", env = "RINGMTA_USERS")]
    pub users: Option<PathBuf>,

    /// Extra envelope senders per login: lines `ADDRESS LOGIN[,LOGIN..]` or `@DOMAIN LOGIN[,..]`; reloaded on SIGHUP.
    #[arg(long, value_name = "FILE", env = "RINGMTA_SENDER_LOGIN_MAP")]
    pub sender_login_map: Option<PathBuf>,

    /// Offer AUTH without TLS to loopback clients (for tests; never for real users).
    #[arg(long, env = "RINGMTA_ALLOW_PLAINTEXT_AUTH_ON_LOOPBACK")]
    pub allow_plaintext_auth_on_loopback: bool,

    /// Pause before each 535 (failed AUTH).
    #[arg(long, value_name = "DURATION", env = "RINGMTA_AUTH_FAILURE_DELAY", default_value = "1s",
          value_parser = parse_duration)]
    pub auth_failure_delay: Duration,

    /// Failed AUTHs per client (IPv4 address or IPv6 /64) within --auth-failure-window before it is refused with 421; a check in progress counts until it succeeds (0: no limit).
    #[arg(
        long,
        value_name = "N",
        env = "RINGMTA_MAX_AUTH_FAILURES",
        default_value_t = 10
    )]
    pub max_auth_failures: u32,

    /// Window over which --max-auth-failures counts.
    #[arg(long, value_name = "DURATION", env = "RINGMTA_AUTH_FAILURE_WINDOW", default_value = "15m",
          value_parser = parse_duration)]
    pub auth_failure_window: Duration,

    /// Password checks in progress at once per client (IPv4 address or IPv6 /64); more AUTHs get 454 4.7.0 (0: no limit).
    #[arg(
        long,
        value_name = "N",
        env = "RINGMTA_MAX_AUTH_CHECKS_PER_IP",
        default_value_t = 2
    )]
    pub max_auth_checks_per_ip: u32,

    /// Threads that check passwords (argon2, ~19 MiB each while checking); a full queue (8 per thread) answers 454 4.7.0.
    #[arg(
        long,
        value_name = "N",
        env = "RINGMTA_AUTH_THREADS",
        default_value_t = 2
    )]
    pub auth_threads: usize,

    /// Threads that DKIM-sign submitted mail.
    #[arg(
        long,
        value_name = "N",
        env = "RINGMTA_DKIM_THREADS",
        default_value_t = 2
    )]
    pub dkim_threads: usize,

    /// Threads for Maildir file operations (directories, renames).
    #[arg(
        long,
        value_name = "N",
        env = "RINGMTA_MAILDIR_THREADS",
        default_value_t = 2
    )]
    pub maildir_threads: usize,

    /// Submitted mail whose From: (or Sender:) is at a --dkim-key domain but not an address the login may send as: reject (550 5.7.1 at the end of DATA) or unsigned (store it without signatures).
    #[arg(
        long,
        value_name = "POLICY",
        env = "RINGMTA_DKIM_FROM_MISMATCH",
        default_value = "reject",
        value_enum
    )]
    pub dkim_from_mismatch: crate::server::dkim::FromMismatch,

    /// DKIM-sign mail from --relay-network clients on the relay/MX port (and mail injected over HTTP) for its From: domain when that domain has a --dkim-key: on or off.
    #[arg(
        long,
        value_name = "ON|OFF",
        env = "RINGMTA_DKIM_RELAY_NETWORK",
        default_value = "off",
        value_enum
    )]
    pub dkim_relay_network: Switch,

    /// Submission: add `Sender: <login address>` when From is not the authenticated user (RFC 6409 8.1).
    #[arg(long, env = "RINGMTA_ADD_SENDER_HEADER")]
    pub add_sender_header: bool,

    /// DKIM-sign submitted mail whose From (or Sender) domain is DOMAIN with the PEM key at PATH (RSA or Ed25519; make one with `ringmta dkim-keygen`) (repeatable; reloaded on SIGHUP).
    #[arg(long = "dkim-key", value_name = "DOMAIN:SELECTOR:PATH", env = "RINGMTA_DKIM_KEY",
          value_delimiter = ',', value_parser = crate::server::dkim::parse_key_spec)]
    pub dkim_keys: Vec<crate::server::dkim::KeySpec>,

    /// Name used in the greeting, EHLO reply and Received headers [default: the system host name].
    #[arg(long, env = "RINGMTA_HOSTNAME")]
    pub hostname: Option<String>,

    /// Directory for the message queue and the instance lock file.
    #[arg(
        long,
        value_name = "DIR",
        env = "RINGMTA_SPOOL_DIR",
        default_value = "./var/spool"
    )]
    pub spool_dir: PathBuf,

    /// Domain whose mail is accepted for local delivery (repeatable).
    #[arg(
        long = "local-domain",
        value_name = "DOMAIN",
        env = "RINGMTA_LOCAL_DOMAIN",
        value_delimiter = ',',
        default_value = "localhost"
    )]
    pub local_domains: Vec<String>,

    /// The recipients that exist in the local domains: lines `user@domain` (any case) or `@domain` (catch-all); others get 550 5.1.1 at RCPT [default: any local part]; reloaded on SIGHUP.
    #[arg(long, value_name = "FILE", env = "RINGMTA_LOCAL_RECIPIENTS")]
    pub local_recipients: Option<PathBuf>,

    /// Largest message accepted, in bytes (suffixes K, M, G); advertised with SIZE.
    #[arg(long, value_name = "BYTES", env = "RINGMTA_MAX_MESSAGE_SIZE", default_value = "50M",
          value_parser = parse_size)]
    pub max_message_size: u64,

    /// Most recipients per message; more get 452 4.5.3.
    #[arg(
        long,
        value_name = "N",
        env = "RINGMTA_MAX_RECIPIENTS",
        default_value_t = 1000
    )]
    pub max_recipients: usize,

    /// Longest a finished message waits for others to share its fdatasync (0: sync as soon as the previous one returns).
    #[arg(long, value_name = "DURATION", env = "RINGMTA_COMMIT_WINDOW", default_value = "0",
          value_parser = parse_duration)]
    pub commit_window: Duration,

    /// fdatasync before every 250: on, or off FOR BENCHMARKS ONLY (acknowledged mail can be lost).
    #[arg(
        long,
        value_name = "on|off",
        env = "RINGMTA_FSYNC",
        default_value = "on",
        value_enum
    )]
    pub fsync: Fsync,

    /// Compact a closed spool segment once its live messages fill at most this share of it (0: never).
    #[arg(
        long,
        value_name = "RATIO",
        env = "RINGMTA_COMPACT_BELOW",
        default_value_t = 0.25
    )]
    pub compact_below: f64,

    /// Bytes of the newest committed spool batches each shard keeps in memory, so delivery reads a fresh message without reading the file (0: always read the file).
    #[arg(long, value_name = "BYTES", env = "RINGMTA_DELIVERY_CACHE", default_value = "16M",
          value_parser = parse_size)]
    pub delivery_cache: u64,

    /// Size at which a shard starts a new spool segment file.
    #[arg(long, value_name = "BYTES", env = "RINGMTA_MAX_SEGMENT_SIZE", default_value = "64M",
          value_parser = parse_size)]
    pub max_segment_size: u64,

    /// Number of shards (glommio executors) [default: one per available core but one, at least one: the kernel's network and disk work and ringmta's helper threads keep a core].
    #[arg(long, value_name = "N", env = "RINGMTA_SHARDS")]
    pub shards: Option<usize>,

    /// Pin each shard to its own core (measured slower on 2 shared cores; see tuning/).
    #[arg(long, env = "RINGMTA_PIN")]
    pub pin: bool,

    /// Memory each shard registers with io_uring, in bytes (must fit RLIMIT_MEMLOCK for non-root).
    #[arg(long, value_name = "BYTES", env = "RINGMTA_IO_MEMORY", default_value = "512K",
          value_parser = parse_size)]
    pub io_memory: u64,

    /// io_uring submission queue depth per ring. Deep rings also size the kernel's table of pending polls: with 128, 10,000 idle connections made poll lookups half the shard's CPU.
    #[arg(
        long,
        value_name = "N",
        env = "RINGMTA_RING_DEPTH",
        default_value_t = 4096
    )]
    pub ring_depth: usize,

    /// Listen backlog of each shard's listening socket.
    #[arg(
        long,
        value_name = "N",
        env = "RINGMTA_BACKLOG",
        default_value_t = 1024
    )]
    pub backlog: i32,

    /// Wait for the next command before 421 (RFC 5321 4.5.3.2.7: 5 minutes).
    #[arg(long, value_name = "DURATION", env = "RINGMTA_COMMAND_TIMEOUT", default_value = "5m",
          value_parser = parse_duration)]
    pub command_timeout: Duration,

    /// Wait for the next block of message content before 421 (RFC 5321 4.5.3.2.6: 3 minutes).
    #[arg(long, value_name = "DURATION", env = "RINGMTA_DATA_TIMEOUT", default_value = "3m",
          value_parser = parse_duration)]
    pub data_timeout: Duration,

    /// The content of one message may take at most this long, from DATA (or the first BDAT) to its end, however it trickles in; then 421 4.4.2 and close.
    #[arg(long, value_name = "DURATION", env = "RINGMTA_MAX_DATA_TIME", default_value = "10m",
          value_parser = parse_duration)]
    pub max_data_time: Duration,

    /// Memory for message bodies being received, for the whole server: split evenly between shards; one client address (IPv4, IPv6 /64) may hold half of a shard's share. DATA/BDAT beyond it get 452 4.3.1.
    #[arg(long, value_name = "BYTES", env = "RINGMTA_MAX_INFLIGHT_BYTES", default_value = "200M",
          value_parser = parse_size)]
    pub max_inflight_bytes: u64,

    /// Concurrent connections per shard; more are answered 421 and closed.
    #[arg(
        long,
        value_name = "N",
        env = "RINGMTA_MAX_CONNS_PER_SHARD",
        default_value_t = 20_000
    )]
    pub max_conns_per_shard: usize,

    /// Concurrent connections per client (IPv4 address or IPv6 /64) over all shards (0: no limit).
    #[arg(
        long,
        value_name = "N",
        env = "RINGMTA_MAX_CONNS_PER_IP",
        default_value_t = 100
    )]
    pub max_conns_per_ip: u32,

    /// Connections per minute per client network (IPv4 /24, IPv6 /64) over all shards; more are answered 421 4.7.0 and closed. Clients in --relay-network are not counted (0: no limit).
    #[arg(
        long,
        value_name = "N",
        env = "RINGMTA_MAX_CONNECTIONS_PER_MINUTE",
        default_value_t = 0
    )]
    pub max_connections_per_minute: u32,

    /// Messages (MAIL commands) per minute per client network (IPv4 /24, IPv6 /64) of unauthenticated clients not in --relay-network; more are answered 451 4.7.0 (0: no limit).
    #[arg(
        long,
        value_name = "N",
        env = "RINGMTA_MAX_MESSAGES_PER_MINUTE",
        default_value_t = 0
    )]
    pub max_messages_per_minute: u32,

    /// Recipients (RCPT commands accepted) per minute per client network (IPv4 /24, IPv6 /64) of unauthenticated clients not in --relay-network; more are answered 452 4.5.3 (0: no limit).
    #[arg(
        long,
        value_name = "N",
        env = "RINGMTA_MAX_RECIPIENTS_PER_MINUTE",
        default_value_t = 0
    )]
    pub max_recipients_per_minute: u32,

    /// Messages (MAIL commands) per minute per authenticated user; more are answered 451 4.7.0 (0: no limit).
    #[arg(
        long,
        value_name = "N",
        env = "RINGMTA_MAX_MESSAGES_PER_USER_PER_MINUTE",
        default_value_t = 0
    )]
    pub max_messages_per_user_per_minute: u32,

    /// Relay/MX port: wait this long before the 220 greeting; a client that talks meanwhile is answered 554 5.5.1, dropped and remembered for --screen-ttl (0: no pause).
    #[arg(long, value_name = "DURATION", env = "RINGMTA_GREET_PAUSE", default_value = "0",
          value_parser = parse_duration)]
    pub greet_pause: Duration,

    /// Relay/MX port: drop (554 5.5.1) and remember a client that pipelines commands before PIPELINING was offered (before EHLO, or after HELO) or sends a line not starting with a letter. HTTP requests and CONNECT are dropped on every port whatever this says.
    #[arg(long, env = "RINGMTA_SCREEN_PROTOCOL")]
    pub screen_protocol: bool,

    /// How long a client that failed the screen (talked before the greeting, pipelined without PIPELINING, sent a non-SMTP command) is answered 421 4.7.0 on the relay/MX port (0: not remembered).
    #[arg(long, value_name = "DURATION", env = "RINGMTA_SCREEN_TTL", default_value = "1h",
          value_parser = parse_duration)]
    pub screen_ttl: Duration,

    /// DNS blocklist ZONE[=WEIGHT] (weight 1 if not given) checked for relay/MX clients before the greeting; a client whose listing weights reach --dnsbl-threshold is refused with 554 5.7.1 (repeatable).
    #[arg(
        long = "dnsbl",
        value_name = "ZONE[=WEIGHT]",
        env = "RINGMTA_DNSBL",
        value_delimiter = ','
    )]
    pub dnsbl: Vec<crate::inbound::dnsbl::Zone>,

    /// Sum of the weights of the --dnsbl lists that list a client at which it is refused.
    #[arg(
        long,
        value_name = "N",
        env = "RINGMTA_DNSBL_THRESHOLD",
        default_value_t = 1,
        allow_negative_numbers = true
    )]
    pub dnsbl_threshold: i32,

    /// DNS allowlist ZONE: a relay/MX client listed there skips --dnsbl and the pre-greet screen (repeatable).
    #[arg(long = "dnswl", value_name = "ZONE", env = "RINGMTA_DNSWL", value_delimiter = ',',
          value_parser = crate::inbound::dnsbl::zone_name)]
    pub dnswl: Vec<String>,

    /// Longest the DNS list lookups of one connection may take together; a list that has not answered by then counts as not listing the client (logged).
    #[arg(long, value_name = "DURATION", env = "RINGMTA_DNSBL_TIMEOUT", default_value = "5s",
          value_parser = parse_duration)]
    pub dnsbl_timeout: Duration,

    /// Error replies after which a session is closed with 421.
    #[arg(
        long,
        value_name = "N",
        env = "RINGMTA_MAX_ERRORS",
        default_value_t = 20
    )]
    pub max_errors: u32,

    /// Bare CR or LF in DATA: store it as CRLF (normalize) or refuse the message with 550 (reject).
    #[arg(long, value_name = "POLICY", env = "RINGMTA_BARE_NEWLINE", default_value = "normalize",
          value_parser = parse_bare_newline)]
    pub bare_newline: BareNewline,

    /// On SIGTERM/SIGINT, how long open transactions may take to finish.
    #[arg(long, value_name = "DURATION", env = "RINGMTA_SHUTDOWN_GRACE", default_value = "30s",
          value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    /// Accept and queue, but deliver nothing (maintenance, intake benchmarks).
    #[arg(long, env = "RINGMTA_NO_DELIVERY")]
    pub no_delivery: bool,

    /// Client network allowed to relay to any domain (repeatable; default none).
    #[arg(
        long = "relay-network",
        value_name = "CIDR",
        env = "RINGMTA_RELAY_NETWORK",
        value_delimiter = ','
    )]
    pub relay_networks: Vec<crate::policy::relay::Cidr>,

    /// Load balancers (e.g. HAProxy with send-proxy-v2 or send-proxy) whose connections, on every listener, must start with a PROXY protocol v1/v2 header; the client address in it is then used for relay policy, per-IP limits, AUTH throttling, Received: and logs. A connection from such a network without a valid header is dropped; others never have a header read (repeatable; default none).
    #[arg(
        long = "proxy-protocol-from",
        value_name = "CIDR",
        env = "RINGMTA_PROXY_PROTOCOL_FROM",
        value_delimiter = ','
    )]
    pub proxy_protocol_from: Vec<crate::policy::relay::Cidr>,

    /// How long a --proxy-protocol-from connection may take to send its PROXY header before it is dropped.
    #[arg(long, value_name = "DURATION", env = "RINGMTA_PROXY_PROTOCOL_TIMEOUT", default_value = "5s",
          value_parser = parse_duration)]
    pub proxy_protocol_timeout: Duration,

    /// Route mail for a domain: DOMAIN=smtp:HOST:PORT or DOMAIN=maildir:PATH (exact or *.domain; repeatable).
    #[arg(
        long = "route",
        value_name = "ROUTE",
        env = "RINGMTA_ROUTE",
        value_delimiter = ','
    )]
    pub routes: Vec<crate::relay::Route>,

    /// Smarthost for all mail that no route or local domain covers (HOST:PORT); else MX lookup.
    #[arg(long, value_name = "HOST:PORT", env = "RINGMTA_RELAY_HOST",
          value_parser = crate::relay::parse_host_port)]
    pub relay_host: Option<(String, u16)>,

    /// DNS server for delivery (MX/A/AAAA) and the inbound checks (SPF, DKIM, DMARC, ARC) (IP:PORT) [default: the system resolver].
    #[arg(long, value_name = "ADDR", env = "RINGMTA_DNS_SERVER")]
    pub dns_server: Option<SocketAddr>,

    /// Verify mail arriving on the relay/MX port (SPF, DKIM, DMARC, ARC) and prepend one Authentication-Results header; clients in --relay-network and authenticated clients are not checked.
    #[arg(
        long,
        value_name = "ON|OFF",
        env = "RINGMTA_INBOUND_AUTH",
        default_value = "on",
        value_enum
    )]
    pub inbound_auth: InboundAuth,

    /// The authserv-id naming this server in Authentication-Results (incoming ones with it are removed) [default: --hostname].
    #[arg(long, value_name = "ID", env = "RINGMTA_AUTHSERV_ID")]
    pub authserv_id: Option<String>,

    /// SPF `fail` of the MAIL FROM identity: mark (record it in Authentication-Results) or reject (550 5.7.23 at MAIL FROM).
    #[arg(
        long,
        value_name = "POLICY",
        env = "RINGMTA_SPF_POLICY",
        default_value = "mark",
        value_enum
    )]
    pub spf_policy: crate::inbound::auth::SpfPolicy,

    /// Refuse (550 5.7.1 at the end of DATA) mail that fails DMARC under the author domain's p=reject (honouring pct and sp); off: quarantine it instead.
    #[arg(long, env = "RINGMTA_DMARC_REJECT")]
    pub dmarc_reject: bool,

    /// One local domain's own verification policy, overriding --inbound-auth (verify=on|off), --spf-policy (spf=mark|reject: a failing sender is then refused at RCPT for this domain) and --dmarc-reject (dmarc=mark|reject: refused only when every recipient's domain says reject) for mail to it (repeatable).
    #[arg(long = "domain-auth", value_name = "DOMAIN:KEY=VALUE[:KEY=VALUE...]",
          env = "RINGMTA_DOMAIN_AUTH", value_delimiter = ',',
          value_parser = crate::inbound::auth::parse_domain_auth)]
    pub domain_auth: Vec<crate::inbound::auth::DomainAuth>,

    /// Header added (value `YES`) to mail that fails DMARC under p=quarantine (or p=reject without --dmarc-reject), for the downstream to file on.
    #[arg(
        long,
        value_name = "NAME",
        env = "RINGMTA_QUARANTINE_HEADER",
        default_value = "X-Spam-Flag"
    )]
    pub quarantine_header: String,

    /// The most the DNS lookups of inbound checks may take for one message (or one MAIL FROM); what has no answer by then is a temperror.
    #[arg(long, value_name = "DURATION", env = "RINGMTA_DNS_TIMEOUT", default_value = "5s",
          value_parser = parse_duration)]
    pub dns_timeout: Duration,

    /// Port of remote MX hosts.
    #[arg(
        long,
        value_name = "PORT",
        env = "RINGMTA_OUTBOUND_PORT",
        default_value_t = 25
    )]
    pub outbound_port: u16,

    /// Root of local Maildir delivery (<root>/<domain>/<local-part>/).
    #[arg(
        long,
        value_name = "DIR",
        env = "RINGMTA_MAILDIR",
        default_value = "./var/maildir"
    )]
    pub maildir: PathBuf,

    /// Outbound connections per destination (and per shard).
    #[arg(
        long,
        value_name = "N",
        env = "RINGMTA_MAX_CONNS_PER_DEST",
        default_value_t = 10
    )]
    pub max_conns_per_dest: usize,

    /// Traffic shaping rules per destination, domain and provider (MX rollup), TOML; without it the built-in provider defaults apply (README "Traffic shaping").
    #[arg(long, value_name = "FILE", env = "RINGMTA_SHAPING")]
    pub shaping: Option<PathBuf>,

    /// Rules classifying the next hop's replies (TOML [[rule]]s before the built-in ones): class, and bounce at once or suspend the destination (README "Bounce classification").
    #[arg(long, value_name = "FILE", env = "RINGMTA_BOUNCE_RULES")]
    pub bounce_rules: Option<PathBuf>,

    /// Local Maildir deliveries under way at once per shard (each holds its message in memory while it writes; those finishing together share one directory sync).
    #[arg(
        long,
        value_name = "N",
        env = "RINGMTA_MAILDIR_CONCURRENCY",
        default_value_t = 32
    )]
    pub maildir_concurrency: usize,

    /// Delays between delivery attempts, by the message's age (the last repeats).
    #[arg(long, value_name = "LIST", env = "RINGMTA_RETRY_SCHEDULE",
          default_value = "1m,5m,15m,30m,1h,2h,4h", value_parser = crate::relay::parse_schedule)]
    pub retry_schedule: crate::relay::Schedule,

    /// How long a message may stay queued before it bounces.
    #[arg(long, value_name = "DURATION", env = "RINGMTA_MAX_QUEUE_AGE", default_value = "5d",
          value_parser = parse_duration)]
    pub max_queue_age: Duration,

    /// Send the sender one "delayed" report (RFC 3464, Action: delayed) for recipients still queued after this long; 0 disables warnings.
    #[arg(long, value_name = "DURATION", env = "RINGMTA_DELAY_WARNING", default_value = "0",
          value_parser = parse_duration)]
    pub delay_warning: Duration,

    /// Most octets of the original message a bounce returns; a larger one comes back as its header only (as Postfix's bounce_size_limit).
    #[arg(long, value_name = "BYTES", env = "RINGMTA_BOUNCE_SIZE_LIMIT", default_value = "51200",
          value_parser = parse_size)]
    pub bounce_size_limit: u64,

    /// Received headers after which a message is a loop and bounces (5.4.6).
    #[arg(long, value_name = "N", env = "RINGMTA_MAX_HOPS", default_value_t = 50)]
    pub max_hops: usize,

    /// Outbound STARTTLS: none, opportunistic (when offered; plaintext otherwise), require (else defer, 4.7.x), verify (a certificate valid for the host name, else defer) or dane (DANE where the host has secure TLSA records, else opportunistic).
    #[arg(
        long,
        value_name = "POLICY",
        env = "RINGMTA_TLS_POLICY",
        default_value = "opportunistic",
        value_enum
    )]
    pub tls_policy: crate::relay::tls::TlsPolicy,

    /// DANE (RFC 7672) for every destination whose TLS policy is not none: DNSSEC-secure TLSA records of an MX host (from the validating resolver of --dns-server, which must be local) make TLS with a matching certificate mandatory.
    #[arg(
        long,
        value_name = "on|off",
        env = "RINGMTA_DANE",
        default_value = "off",
        value_enum
    )]
    pub dane: TlsVerify,

    /// MTA-STS (RFC 8461): honour the policies MX domains publish (enforce: verified TLS to a matching MX host or defer; testing: log what would fail). Policies are kept in <spool-dir>/mta-sts/.
    #[arg(
        long,
        value_name = "on|off",
        env = "RINGMTA_MTA_STS",
        default_value = "on",
        value_enum
    )]
    pub mta_sts: TlsVerify,

    /// HTTPS port MTA-STS policies are fetched from (443; another only for tests).
    #[arg(
        long,
        value_name = "PORT",
        env = "RINGMTA_MTA_STS_PORT",
        default_value_t = 443
    )]
    pub mta_sts_port: u16,

    /// More trust anchors (PEM) for verified outbound TLS (--tls-policy verify, --tls-verify on, DANE-TA is not affected), added to the bundled Mozilla roots.
    #[arg(long, value_name = "PATH", env = "RINGMTA_TLS_CA_FILE")]
    pub tls_ca_file: Option<PathBuf>,

    /// Verify the next hop's certificate against the bundled Mozilla roots (needs --tls-policy require).
    #[arg(
        long,
        value_name = "on|off",
        env = "RINGMTA_TLS_VERIFY",
        default_value = "off",
        value_enum
    )]
    pub tls_verify: TlsVerify,

    /// Work items queued between two shards for the destination's owning shard; when full, the intake shard delivers itself. 0: no handoff (every shard delivers what it took in).
    #[arg(
        long,
        value_name = "N",
        env = "RINGMTA_HANDOFF_CAPACITY",
        default_value_t = 1024
    )]
    pub handoff_capacity: u32,

    /// Outbound connect timeout.
    #[arg(long, value_name = "DURATION", env = "RINGMTA_CONNECT_TIMEOUT", default_value = "30s",
          value_parser = parse_duration)]
    pub connect_timeout: Duration,

    /// Outbound wait for the reply to each command: EHLO, MAIL, RCPT, DATA, RSET (RFC 5321 4.5.3.2).
    #[arg(long, value_name = "DURATION", env = "RINGMTA_RELAY_TIMEOUT", default_value = "5m",
          value_parser = parse_duration)]
    pub relay_timeout: Duration,

    /// Outbound wait for the server's 220 greeting (RFC 5321 4.5.3.2.1).
    #[arg(long, value_name = "DURATION", env = "RINGMTA_RELAY_BANNER_TIMEOUT", default_value = "5m",
          value_parser = parse_duration)]
    pub relay_banner_timeout: Duration,

    /// Outbound: each write of the message content (a data block, RFC 5321 4.5.3.2.5).
    #[arg(long, value_name = "DURATION", env = "RINGMTA_RELAY_DATA_TIMEOUT", default_value = "3m",
          value_parser = parse_duration)]
    pub relay_data_timeout: Duration,

    /// Outbound wait for the reply after the content ("." or BDAT LAST; RFC 5321 4.5.3.2.6).
    #[arg(long, value_name = "DURATION", env = "RINGMTA_RELAY_FINAL_TIMEOUT", default_value = "10m",
          value_parser = parse_duration)]
    pub relay_final_timeout: Duration,

    /// Log filter (tracing EnvFilter syntax, e.g. info or ringmta=debug).
    #[arg(
        long,
        value_name = "FILTER",
        env = "RINGMTA_LOG",
        default_value = "info"
    )]
    pub log: String,

    /// Log line format: `text` (key=value pairs) or `json` (one JSON object
    /// per line). Event lines carry the same field names in both (see the
    /// README's "Event log").
    #[arg(
        long,
        value_name = "FORMAT",
        env = "RINGMTA_LOG_FORMAT",
        default_value = "text"
    )]
    pub log_format: LogFormat,
}

/// How log lines are written (`--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, clap::Subcommand)]
pub enum Subcommand {
    /// Inspect the queue (count, list, show: read from the spool directory, read-only, running or not) or control it through a running server's admin API (the other verbs).
    Queue {
        /// The spool directory to read (before or after the action: `queue count --spool-dir DIR`).
        #[arg(
            long,
            value_name = "DIR",
            env = "RINGMTA_SPOOL_DIR",
            default_value = "./var/spool",
            global = true
        )]
        spool_dir: PathBuf,
        /// The running server's admin listener, for the verbs that go through the API.
        #[arg(
            long = "admin",
            value_name = "ADDR",
            env = "RINGMTA_ADMIN",
            default_value = "127.0.0.1:9525",
            value_parser = parse_listen,
            global = true
        )]
        admin_addr: Listen,
        /// File whose first line is the admin API's bearer token (as given to the server).
        #[arg(
            long = "admin-token-file",
            value_name = "FILE",
            env = "RINGMTA_ADMIN_TOKEN_FILE",
            global = true
        )]
        token_file: Option<PathBuf>,
        /// Print the API's JSON answer as it came (the verbs that go through the API).
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        action: QueueAction,
    },
    /// Read a password from standard input and print the `USER:argon2-hash` line for --users.
    Passwd {
        /// The login name (no ':' or white space).
        user: String,
    },
    /// Generate a DKIM private key for --dkim-key and print its DNS TXT record.
    DkimKeygen {
        /// The signing domain (d=).
        #[arg(long, value_name = "DOMAIN")]
        domain: String,
        /// The selector (s=): the record goes at SELECTOR._domainkey.DOMAIN.
        #[arg(long, value_name = "SELECTOR")]
        selector: String,
        /// Key type. Many verifiers still know only RSA: sign with both (two --dkim-key) to use Ed25519.
        #[arg(long, value_name = "ALGORITHM", default_value = "rsa", value_enum)]
        algorithm: crate::server::dkim::KeyAlgorithm,
        /// RSA key size (2048 to 4096).
        #[arg(long, value_name = "N", default_value_t = 2048)]
        bits: usize,
        /// Where to write the private key (PKCS#8 PEM, mode 0600; an existing file is not replaced).
        #[arg(long, value_name = "PATH")]
        out: PathBuf,
    },
}

/// A listener address, or `none` to turn that listener off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listen(pub Option<SocketAddr>);

fn parse_listen(s: &str) -> Result<Listen, String> {
    if s.eq_ignore_ascii_case("none") {
        return Ok(Listen(None));
    }
    s.parse()
        .map(|a| Listen(Some(a)))
        .map_err(|_| format!("{s:?}: expected ADDR:PORT or none"))
}

#[derive(Debug, clap::Subcommand)]
pub enum QueueAction {
    /// Number of queued messages and their total size.
    Count,
    /// One line per message: id, size, sender, recipients.
    List,
    /// Print one message (envelope block, then the message) by id.
    Show { id: String },
    /// Per destination: queued messages and recipients, held, oldest age, suspension (API).
    Summary,
    /// Keep the selected messages from delivery until released (API).
    Hold(SelectorArgs),
    /// Release held messages (API).
    Release(SelectorArgs),
    /// Retry the selected messages now (API).
    Flush(SelectorArgs),
    /// Drop the selected recipients without a report (by --id: the whole message) (API).
    Delete(SelectorArgs),
    /// Fail the selected recipients: one report per message to its sender (API).
    Bounce {
        #[command(flatten)]
        selector: SelectorArgs,
        /// Why, as the report's diagnostic.
        #[arg(long, value_name = "TEXT")]
        reason: String,
    },
    /// Stop connecting to a destination for a while; deliveries under way finish (API).
    Suspend {
        /// The destination (as `summary` shows it, or its host or domain alone).
        #[arg(long, value_name = "DEST")]
        destination: String,
        /// How long, e.g. 30m, 2h (at most 30d).
        #[arg(long, value_name = "DURATION")]
        duration: String,
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
        /// Only the mail from this source-IP pool source (`[source.NAME]`).
        #[arg(long, value_name = "NAME")]
        source: Option<String>,
    },
    /// End a destination's suspension (API).
    Resume {
        #[arg(long, value_name = "DEST")]
        destination: String,
        /// The suspension of this source's mail to it.
        #[arg(long, value_name = "NAME")]
        source: Option<String>,
    },
    /// The suspended destinations (API).
    Suspensions,
}

/// Which messages a queue action is about: exactly one of these.
#[derive(Debug, Clone, clap::Args)]
#[group(required = true, multiple = false)]
pub struct SelectorArgs {
    /// One message, by queue id.
    #[arg(long, value_name = "ID")]
    pub id: Option<String>,
    /// Recipients in this domain.
    #[arg(long, value_name = "DOMAIN")]
    pub domain: Option<String>,
    /// Recipients routed to this destination (as `summary` shows it, or its host or domain alone).
    #[arg(long, value_name = "DEST")]
    pub destination: Option<String>,
}

/// A feature switch: whether outbound TLS verifies the server's
/// certificate (`--tls-verify`), DANE (`--dane`), MTA-STS (`--mta-sts`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TlsVerify {
    On,
    Off,
}

/// Whether inbound mail on the relay/MX port is verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum InboundAuth {
    On,
    Off,
}

/// A feature turned on or off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Switch {
    On,
    Off,
}

/// Whether the spool syncs before acknowledging.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Fsync {
    On,
    Off,
}

fn parse_bare_newline(s: &str) -> Result<BareNewline, String> {
    match s {
        "normalize" => Ok(BareNewline::Normalize),
        "reject" => Ok(BareNewline::Reject),
        _ => Err(format!("{s:?}: expected normalize or reject")),
    }
}

/// Bytes with an optional K/M/G suffix (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, 'k' | 'K')) => (&s[..i], 1u64 << 10),
        Some((i, 'm' | 'M')) => (&s[..i], 1 << 20),
        Some((i, 'g' | 'G')) => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    num.trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("not a size: {s:?} (use e.g. 1048576, 512K, 50M)"))
}

/// A duration: a number with an optional unit ms, s (default), m or h.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("not a duration: {s:?} (use e.g. 300, 30s, 5m, 250ms)"))?;
    let secs = match unit.trim() {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86_400.0,
        other => return Err(format!("unknown duration unit {other:?} in {s:?}")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("bad duration {s:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("50M"), Ok(50 << 20));
        assert_eq!(parse_size("1024"), Ok(1024));
        assert!(parse_size("x").is_err());
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert!(parse_duration("3 weeks").is_err());
    }

    /// Regression: `ringmta queue count --spool-dir X` was refused, the
    /// flag was only accepted between `queue` and the action.
    #[test]
    fn queue_spool_dir_after_the_action() {
        for args in [
            &["ringmta", "queue", "count", "--spool-dir", "/x"][..],
            &["ringmta", "queue", "--spool-dir", "/x", "count"],
            &["ringmta", "queue", "show", "abc", "--spool-dir", "/x"],
        ] {
            let cli = Cli::try_parse_from(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
            match cli.command {
                Some(Subcommand::Queue { spool_dir, .. }) => {
                    assert_eq!(spool_dir, PathBuf::from("/x"), "{args:?}")
                }
                other => panic!("{args:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn queue_verbs_take_their_flags_after_the_verb() {
        let cli = Cli::try_parse_from([
            "ringmta",
            "queue",
            "bounce",
            "--domain",
            "example.org",
            "--reason",
            "gone",
            "--admin",
            "127.0.0.1:1",
            "--admin-token-file",
            "/t",
        ])
        .unwrap();
        match cli.command {
            Some(Subcommand::Queue {
                admin_addr,
                token_file,
                action: QueueAction::Bounce { selector, reason },
                ..
            }) => {
                assert_eq!(admin_addr.0.map(|a| a.port()), Some(1));
                assert_eq!(token_file, Some(PathBuf::from("/t")));
                assert_eq!(selector.domain.as_deref(), Some("example.org"));
                assert_eq!(reason, "gone");
            }
            other => panic!("{other:?}"),
        }
        // Exactly one selector.
        for bad in [
            &["ringmta", "queue", "hold"][..],
            &["ringmta", "queue", "hold", "--id", "a", "--domain", "b"],
        ] {
            assert!(Cli::try_parse_from(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
