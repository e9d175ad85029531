//! Outbound TLS security end to end: DANE (RFC 7672) against a
//! DNSSEC-signed zone (ldns-keygen, ldns-signzone) served and validated by
//! a real unbound on a loopback port, MTA-STS (RFC 8461) against a policy
//! served over HTTPS here, and the per-destination `tls_policy` of the
//! shaping file. The next hop is a second ringmta with a certificate
//! issued by a test CA (rcgen) for the MX names.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, http_get, metric, peer_program, Reaped, Server};

fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn sha256_hex(b: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, b).as_ref())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A test CA and a server certificate it issued.
struct Pki {
    /// The CA certificate (PEM), for `--tls-ca-file`.
    ca_pem: PathBuf,
    ca_der: Vec<u8>,
    /// The server's chain (its certificate, then the CA's) and key.
    chain: PathBuf,
    key: PathBuf,
    /// The DER SubjectPublicKeyInfo of the server's key.
    spki: Vec<u8>,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    ca_text: String,
}

impl Pki {
    /// Another certificate from the same CA, for `names`: its chain and
    /// key files (`<stem>.pem`, `<stem>.key`) in `dir`.
    fn issue(&self, dir: &Path, stem: &str, names: &[&str]) -> (PathBuf, PathBuf, Vec<u8>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let chain = dir.join(format!("{stem}.pem"));
        std::fs::write(&chain, format!("{}{}", cert.pem(), self.ca_text)).unwrap();
        let key_path = dir.join(format!("{stem}.key"));
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (
            chain,
            key_path,
            rcgen::PublicKeyData::subject_public_key_info(&key),
        )
    }
}

/// A CA and a certificate for `names` signed by it, written into `dir`.
fn pki(dir: &Path, names: &[&str]) -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "ringmta test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let ca_pem = dir.join("ca.pem");
    std::fs::write(&ca_pem, ca.pem()).unwrap();
    let mut pki = Pki {
        ca_pem,
        ca_der: ca.der().to_vec(),
        chain: PathBuf::new(),
        key: PathBuf::new(),
        spki: Vec::new(),
        issuer: Issuer::new(ca_params, ca_key),
        ca_text: ca.pem(),
    };
    let (chain, key, spki) = pki.issue(dir, "server", names);
    pki.chain = chain;
    pki.key = key;
    pki.spki = spki;
    pki
}

/// Runs a program of the test's peers in `dir`; its stdout.
fn run_in(dir: &Path, program: &Path, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{} {args:?}: {}",
        program.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Signs zone `origin` made of `records` (ldns-keygen, ldns-signzone) in
/// `dir`, then appends `unsigned` (records without signatures: bogus to
/// a validator). Returns the signed zone file and the DS file of its key.
fn signed_zone(
    dir: &Path,
    origin: &str,
    records: &[String],
    unsigned: &[String],
) -> (PathBuf, PathBuf) {
    let keygen = peer_program("ldns-keygen", "ldnsutils").unwrap();
    let signzone = peer_program("ldns-signzone", "ldnsutils").unwrap();
    let zone = dir.join(format!("{origin}.zone"));
    let mut text = format!(
        "$ORIGIN {origin}.\n$TTL 300\n@ IN SOA ns.{origin}. admin.{origin}. 1 3600 600 86400 300\n@ IN NS ns.{origin}.\nns IN A 127.0.0.1\n"
    );
    for r in records {
        text.push_str(r);
        text.push('\n');
    }
    std::fs::write(&zone, text).unwrap();
    let ksk = run_in(dir, &keygen, &["-a", "ECDSAP256SHA256", "-k", origin]);
    let zsk = run_in(dir, &keygen, &["-a", "ECDSAP256SHA256", origin]);
    let (ksk, zsk) = (ksk.trim(), zsk.trim());
    run_in(dir, &signzone, &[zone.to_str().unwrap(), ksk, zsk]);
    let signed = dir.join(format!("{origin}.zone.signed"));
    if !unsigned.is_empty() {
        let mut text = std::fs::read_to_string(&signed).unwrap();
        for r in unsigned {
            text.push_str(r);
            text.push('\n');
        }
        std::fs::write(&signed, text).unwrap();
    }
    (signed, dir.join(format!("{ksk}.ds")))
}

/// unbound validating on a free loopback port: each of `signed` (origin,
/// zone file, DS file) is an auth zone for upstream with its DS as trust
/// anchor; `plain` zones (origin, zone file) are served unsigned
/// (insecure: no trust anchor above them). Returned once it answers.
fn unbound(
    dir: &Path,
    signed: &[(&str, PathBuf, PathBuf)],
    plain: &[(&str, PathBuf)],
) -> Option<(Reaped, u16)> {
    let bin = peer_program("unbound", "unbound")?;
    let port = free_port();
    let mut conf = format!(
        "server:\n  interface: 127.0.0.1\n  port: {port}\n  do-daemonize: no\n  username: \"\"\n  chroot: \"\"\n  directory: \"{dir}\"\n  pidfile: \"\"\n  use-syslog: no\n  logfile: \"\"\n  verbosity: 1\n  val-log-level: 2\n  local-zone: \"test.\" nodefault\n  do-ip6: no\n",
        dir = dir.display()
    );
    for (_, _, ds) in signed {
        conf.push_str(&format!("  trust-anchor-file: \"{}\"\n", ds.display()));
    }
    let zones = signed
        .iter()
        .map(|(o, z, _)| (*o, z))
        .chain(plain.iter().map(|(o, z)| (*o, z)));
    for (origin, zone) in zones {
        conf.push_str(&format!(
            "auth-zone:\n  name: \"{origin}\"\n  zonefile: \"{}\"\n  for-upstream: yes\n  for-downstream: no\n  fallback-enabled: no\n",
            zone.display()
        ));
    }
    let conf_path = dir.join("unbound.conf");
    std::fs::write(&conf_path, conf).unwrap();
    let log = std::fs::File::create(dir.join("unbound.log")).unwrap();
    let child = Reaped(
        Command::new(bin)
            .args(["-d", "-c", conf_path.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("unbound starts"),
    );
    if common::dns_answers(port) {
        return Some((child, port));
    }
    panic!(
        "unbound did not answer on port {port}: {}",
        std::fs::read_to_string(dir.join("unbound.log")).unwrap_or_default()
    );
}

/// The MX: a ringmta on `port` with `pki`'s certificate, taking mail for
/// `domains`.
fn next_hop(port: u16, pki: &Pki, domains: &[&str]) -> Server {
    let mut args = vec![
        "--smtp".to_owned(),
        format!("127.0.0.1:{port}"),
        "--tls-cert".into(),
        pki.chain.display().to_string(),
        "--tls-key".into(),
        pki.key.display().to_string(),
    ];
    for d in domains {
        args.push("--local-domain".into());
        args.push(d.to_string());
    }
    Server::builder().args(args).start()
}

/// Sends one message to each of `rcpts`, one transaction each, with the
/// recipient as the subject.
fn send_each(relay: &Server, rcpts: &[&str]) {
    let mut c = relay.connect();
    c.hello("client.example");
    for r in rcpts {
        let content = format!("Subject: {r}\r\n\r\nbody\r\n");
        c.send_message("s@localhost", &[r], content.as_bytes());
    }
}

fn delivered_to(server: &Server) -> Vec<String> {
    let mut v: Vec<String> = server.queued().iter().map(|q| q.rcpts[0].clone()).collect();
    v.sort();
    v
}

/// Waits for the event log line of `event` for `to`.
fn wait_for_event(relay: &Server, event: &str, to: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while event_line(relay, event, to).is_none() {
        assert!(
            Instant::now() < deadline,
            "no {event} line for {to}:\n{}",
            relay.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The event log line of `event` for `to`, once it is there.
fn event(relay: &Server, event: &str, to: &str) -> String {
    wait_for_event(relay, event, to);
    event_line(relay, event, to).unwrap()
}

/// The event log line of `event` for recipient `to`.
fn event_line(relay: &Server, event: &str, to: &str) -> Option<String> {
    relay
        .stderr()
        .lines()
        .find(|l| l.contains(&format!("event=\"{event}\"")) && l.contains(&format!("to=\"{to}\"")))
        .map(str::to_owned)
}

#[test]
fn dane_ee_and_ta_deliver_mismatch_and_bogus_defer_insecure_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let names = [
        "mx-good.dane.test",
        "mx-bad.dane.test",
        "mx-ta.dane.test",
        "mx-bogus.dane.test",
        "mx.insecure.test",
    ];
    let pki = pki(dir.path(), &names);
    let other = pki_other_spki();
    let tlsa = |host: &str, rdata: String| format!("_{port}._tcp.{host}. IN TLSA {rdata}");
    let records = vec![
        "good IN MX 10 mx-good".to_owned(),
        "bad IN MX 10 mx-bad".to_owned(),
        "ta IN MX 10 mx-ta".to_owned(),
        "tanoname IN MX 10 mx-noname".to_owned(),
        "bogus IN MX 10 mx-bogus".to_owned(),
        "mx-good IN A 127.0.0.1".to_owned(),
        "mx-bad IN A 127.0.0.1".to_owned(),
        "mx-ta IN A 127.0.0.1".to_owned(),
        "mx-noname IN A 127.0.0.1".to_owned(),
        "mx-bogus IN A 127.0.0.1".to_owned(),
        // DANE-EE(3) SPKI(1) SHA2-256(1): the next hop's key.
        tlsa(
            "mx-good.dane.test",
            format!("3 1 1 {}", sha256_hex(&pki.spki)),
        ),
        // Another key.
        tlsa("mx-bad.dane.test", format!("3 1 1 {}", sha256_hex(&other))),
        // DANE-TA(2) Cert(0) SHA2-256(1): the CA of its chain.
        tlsa(
            "mx-ta.dane.test",
            format!("2 0 1 {}", sha256_hex(&pki.ca_der)),
        ),
        // The same trust anchor, for a host its certificate does not name.
        tlsa(
            "mx-noname.dane.test",
            format!("2 0 1 {}", sha256_hex(&pki.ca_der)),
        ),
    ];
    // Unsigned in a signed zone: bogus, SERVFAIL from the validator.
    let bogus = vec![tlsa(
        "mx-bogus.dane.test",
        format!("3 1 1 {}", sha256_hex(&pki.spki)),
    )];
    let (zone, ds) = signed_zone(dir.path(), "dane.test", &records, &bogus);
    // An unsigned zone whose TLSA (not matching) must be ignored.
    let insecure = dir.path().join("insecure.test.zone");
    std::fs::write(
        &insecure,
        format!(
            "$ORIGIN insecure.test.\n$TTL 300\n@ IN SOA ns admin 1 3600 600 86400 300\n@ IN NS ns\nns IN A 127.0.0.1\n@ IN MX 10 mx\nmx IN A 127.0.0.1\n_{port}._tcp.mx IN TLSA 3 1 1 {}\n",
            sha256_hex(&other)
        ),
    )
    .unwrap();
    let Some((_dns, dns_port)) = unbound(
        dir.path(),
        &[("dane.test", zone, ds)],
        &[("insecure.test", insecure)],
    ) else {
        return;
    };
    let domains = [
        "good.dane.test",
        "bad.dane.test",
        "ta.dane.test",
        "tanoname.dane.test",
        "bogus.dane.test",
        "insecure.test",
    ];
    let mx = next_hop(port, &pki, &domains);
    let relay = Server::start(&[
        "--dns-server",
        &format!("127.0.0.1:{dns_port}"),
        "--outbound-port",
        &port.to_string(),
        "--relay-network",
        "127.0.0.0/8",
        "--dane",
        "on",
    ]);
    send_each(
        &relay,
        &[
            "u@good.dane.test",
            "u@bad.dane.test",
            "u@ta.dane.test",
            "u@tanoname.dane.test",
            "u@bogus.dane.test",
            "u@insecure.test",
        ],
    );
    let unbound_log =
        || std::fs::read_to_string(dir.path().join("unbound.log")).unwrap_or_default();
    wait_until("the deliveries", Duration::from_secs(30), || {
        mx.queued().len() >= 3
    });
    for to in [
        "u@bad.dane.test",
        "u@tanoname.dane.test",
        "u@bogus.dane.test",
    ] {
        wait_for_event(&relay, "deferred", to);
    }
    assert_eq!(
        delivered_to(&mx),
        ["u@good.dane.test", "u@insecure.test", "u@ta.dane.test"],
        "relay:\n{}\nunbound:\n{}",
        relay.stderr(),
        unbound_log()
    );
    // How each connection was protected, in the event log.
    let good = event(&relay, "delivered", "u@good.dane.test");
    assert!(good.contains("tls=\"dane\""), "{good}");
    let ta = event(&relay, "delivered", "u@ta.dane.test");
    assert!(ta.contains("tls=\"dane\""), "{ta}");
    let insecure = event(&relay, "delivered", "u@insecure.test");
    assert!(insecure.contains("tls=\"tls\""), "{insecure}");
    // The failures: deferred with 4.7.5, never sent another way.
    let bad = event(&relay, "deferred", "u@bad.dane.test");
    assert!(bad.contains("4.7.5"), "{bad}");
    assert!(bad.contains("no TLSA record matches"), "{bad}");
    let noname = event(&relay, "deferred", "u@tanoname.dane.test");
    assert!(noname.contains("4.7.5"), "{noname}");
    assert!(noname.contains("trust anchor"), "{noname}");
    let bogus = event(&relay, "deferred", "u@bogus.dane.test");
    assert!(bogus.contains("TLSA lookup failed"), "{bogus}");
    assert!(relay
        .stderr()
        .lines()
        .any(|l| l.contains("outbound TLS established") && l.contains("security=\"dane\"")));
    let text = http_get(relay.admin.unwrap(), "/metrics");
    assert!(
        metric(&text, "ringmta_outbound_tls_total", &["result=\"dane\""]) >= 2.0,
        "{text}"
    );
    assert!(metric(&text, "ringmta_outbound_tls_total", &["result=\"failed\""]) >= 2.0);
    assert_eq!(relay.queued().len(), 3, "the deferred wait, none is lost");
    assert_eq!(mx.queued().len(), 3, "nothing sent without DANE");

    // Without --dane, DANE only where the shaping file asks for it.
    let shaping = dir.path().join("shaping.toml");
    std::fs::write(
        &shaping,
        "[domain.\"bad.dane.test\"]\ntls_policy = \"dane\"\n\n\
         [domain.\"good.dane.test\"]\ntls_policy = \"dane\"\n",
    )
    .unwrap();
    let relay = Server::start(&[
        "--dns-server",
        &format!("127.0.0.1:{dns_port}"),
        "--outbound-port",
        &port.to_string(),
        "--relay-network",
        "127.0.0.0/8",
        "--shaping",
        shaping.to_str().unwrap(),
    ]);
    send_each(
        &relay,
        &[
            "v@good.dane.test",
            "v@bad.dane.test",
            "v@tanoname.dane.test",
        ],
    );
    let good = event(&relay, "delivered", "v@good.dane.test");
    assert!(good.contains("tls=\"dane\""), "{good}");
    // No entry: opportunistic, the TLSA records are not even looked at.
    let noname = event(&relay, "delivered", "v@tanoname.dane.test");
    assert!(noname.contains("tls=\"tls\""), "{noname}");
    let bad = event(&relay, "deferred", "v@bad.dane.test");
    assert!(bad.contains("no TLSA record matches"), "{bad}");
    assert_eq!(mx.queued().len(), 5);
}

/// The SPKI of a key nobody serves.
fn pki_other_spki() -> Vec<u8> {
    let key = rcgen::KeyPair::generate().unwrap();
    rcgen::PublicKeyData::subject_public_key_info(&key)
}

#[test]
fn per_destination_tls_policy_verify_and_none() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let pki = pki(dir.path(), &["mx.verified.test", "mx.plain.test"]);
    let Some((_dns, dns_port)) = common::dnsmasq(
        &[
            "--mx-host=verified.test,mx.verified.test,10".into(),
            "--mx-host=plain.test,mx.plain.test,10".into(),
            "--mx-host=wrongname.test,mx.wrongname.test,10".into(),
            "--host-record=mx.verified.test,127.0.0.1".into(),
            "--host-record=mx.plain.test,127.0.0.1".into(),
            "--host-record=mx.wrongname.test,127.0.0.1".into(),
        ],
        0,
    ) else {
        return;
    };
    let shaping = dir.path().join("shaping.toml");
    std::fs::write(
        &shaping,
        "[domain.\"verified.test\"]\ntls_policy = \"verify\"\n\n\
         [domain.\"wrongname.test\"]\ntls_policy = \"verify\"\n\n\
         [domain.\"plain.test\"]\ntls_policy = \"none\"\n",
    )
    .unwrap();
    let mx = next_hop(
        port,
        &pki,
        &["verified.test", "plain.test", "wrongname.test"],
    );
    let relay = Server::start(&[
        "--dns-server",
        &format!("127.0.0.1:{dns_port}"),
        "--outbound-port",
        &port.to_string(),
        "--relay-network",
        "127.0.0.0/8",
        "--shaping",
        shaping.to_str().unwrap(),
        "--tls-ca-file",
        pki.ca_pem.to_str().unwrap(),
    ]);
    send_each(
        &relay,
        &["u@verified.test", "u@plain.test", "u@wrongname.test"],
    );
    wait_until("the deliveries", Duration::from_secs(30), || {
        mx.queued().len() >= 2
    });
    wait_for_event(&relay, "deferred", "u@wrongname.test");
    assert_eq!(delivered_to(&mx), ["u@plain.test", "u@verified.test"]);
    let verified = event(&relay, "delivered", "u@verified.test");
    assert!(verified.contains("tls=\"verified\""), "{verified}");
    let plain = event(&relay, "delivered", "u@plain.test");
    assert!(plain.contains("tls=\"plain\""), "{plain}");
    let queued = mx.queued();
    let by_rcpt = |r: &str| queued.iter().find(|q| q.rcpts[0] == r).unwrap();
    assert!(by_rcpt("u@verified.test").has_line("protocol ESMTPS"));
    assert!(
        by_rcpt("u@plain.test").has_line("protocol ESMTP"),
        "{:?}",
        by_rcpt("u@plain.test").lines
    );
    let wrong = event(&relay, "deferred", "u@wrongname.test");
    assert!(wrong.contains("4.7.5"), "{wrong}");
    assert_eq!(relay.queued().len(), 1, "deferred, not lost");
    let text = http_get(relay.admin.unwrap(), "/metrics");
    assert_eq!(
        metric(
            &text,
            "ringmta_outbound_tls_total",
            &["result=\"verified\""]
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        metric(&text, "ringmta_outbound_tls_total", &["result=\"plain\""]),
        1.0
    );
}

/// An HTTPS server for MTA-STS policies: `GET /.well-known/mta-sts.txt`
/// answers the policy of the `Host` asked for (404 for others), over
/// rustls with the given certificate.
struct PolicyServer {
    port: u16,
    hits: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PolicyServer {
    fn start(chain: &Path, key: &Path, policies: Vec<(String, String)>) -> PolicyServer {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        use std::sync::Arc;
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(chain)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let key = PrivateKeyDer::from_pem_file(key).unwrap();
        let config = Arc::new(
            rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap(),
        );
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let hits = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (h, st) = (hits.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !st.load(Ordering::SeqCst) {
                let Ok((sock, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                };
                sock.set_nonblocking(false).unwrap();
                sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let conn = rustls::ServerConnection::new(config.clone()).unwrap();
                let mut tls = rustls::StreamOwned::new(conn, sock);
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                use std::io::{Read, Write};
                while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 8192 {
                    match tls.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let req = String::from_utf8_lossy(&req).into_owned();
                let host = req
                    .lines()
                    .find_map(|l| l.strip_prefix("Host: "))
                    .unwrap_or_default()
                    .trim()
                    .to_owned();
                h.fetch_add(1, Ordering::SeqCst);
                let answer = match policies.iter().find(|(hn, _)| *hn == host) {
                    Some((_, p)) if req.starts_with("GET /.well-known/mta-sts.txt HTTP/1.1") => format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{p}",
                        p.len()
                    ),
                    _ => "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_owned(),
                };
                let _ = tls.write_all(answer.as_bytes());
                tls.conn.send_close_notify();
                let _ = tls.flush();
            }
        });
        PolicyServer {
            port,
            hits,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for PolicyServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn sts_policy(mode: &str, mx: &[&str]) -> String {
    let mut p = format!("version: STSv1\r\nmode: {mode}\r\n");
    for m in mx {
        p.push_str(&format!("mx: {m}\r\n"));
    }
    p.push_str("max_age: 86400\r\n");
    p
}

#[test]
fn mta_sts_enforce_testing_and_the_cache_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let pki = pki(dir.path(), &["mx.enf.test"]);
    let domains = ["enf.test", "enfbad.test", "enfnomx.test", "testing.test"];
    let policy_hosts: Vec<String> = domains.iter().map(|d| format!("mta-sts.{d}")).collect();
    let names: Vec<&str> = policy_hosts.iter().map(String::as_str).collect();
    let (https_chain, https_key, _) = pki.issue(dir.path(), "https", &names);
    let policies = vec![
        (
            "mta-sts.enf.test".to_owned(),
            sts_policy("enforce", &["mx.enf.test"]),
        ),
        // Its MX host is named, its certificate does not name it.
        (
            "mta-sts.enfbad.test".to_owned(),
            sts_policy("enforce", &["*.enfbad.test"]),
        ),
        // Its MX host is not named.
        (
            "mta-sts.enfnomx.test".to_owned(),
            sts_policy("enforce", &["mx.elsewhere.test"]),
        ),
        // Neither: testing only reports.
        (
            "mta-sts.testing.test".to_owned(),
            sts_policy("testing", &["mx.elsewhere.test"]),
        ),
    ];
    let https = PolicyServer::start(&https_chain, &https_key, policies);
    let mut records = Vec::new();
    for d in domains {
        records.push(format!("--mx-host={d},mx.{d},10"));
        records.push(format!("--host-record=mx.{d},127.0.0.1"));
        records.push(format!("--host-record=mta-sts.{d},127.0.0.1"));
        records.push(format!("--txt-record=_mta-sts.{d},v=STSv1; id=20261202;"));
    }
    let Some((_dns, dns_port)) = common::dnsmasq(&records, 0) else {
        return;
    };
    let mx = next_hop(port, &pki, &domains);
    let spool = tempfile::tempdir().unwrap();
    let args = [
        "--dns-server".to_owned(),
        format!("127.0.0.1:{dns_port}"),
        "--outbound-port".into(),
        port.to_string(),
        "--relay-network".into(),
        "127.0.0.0/8".into(),
        "--tls-ca-file".into(),
        pki.ca_pem.display().to_string(),
        "--mta-sts-port".into(),
        https.port.to_string(),
    ];
    let relay = Server::builder()
        .spool_dir(spool.path())
        .args(args.iter().cloned())
        .start();
    send_each(
        &relay,
        &[
            "u@enf.test",
            "u@enfbad.test",
            "u@enfnomx.test",
            "u@testing.test",
        ],
    );
    wait_until("the deliveries", Duration::from_secs(30), || {
        mx.queued().len() >= 2
    });
    wait_for_event(&relay, "deferred", "u@enfbad.test");
    wait_for_event(&relay, "deferred", "u@enfnomx.test");
    assert_eq!(
        delivered_to(&mx),
        ["u@enf.test", "u@testing.test"],
        "{}",
        relay.stderr()
    );
    let enf = event(&relay, "delivered", "u@enf.test");
    assert!(enf.contains("tls=\"mta-sts\""), "{enf}");
    let testing = event(&relay, "delivered", "u@testing.test");
    assert!(testing.contains("tls=\"tls\""), "{testing}");
    assert!(
        relay
            .stderr()
            .contains("MTA-STS testing: enforce would refuse"),
        "{}",
        relay.stderr()
    );
    let bad = event(&relay, "deferred", "u@enfbad.test");
    assert!(
        bad.contains("4.7.5") && bad.contains("not valid for name"),
        "{bad}"
    );
    let nomx = event(&relay, "deferred", "u@enfnomx.test");
    assert!(
        nomx.contains("4.7.5 MTA-STS: no MX host of enfnomx.test matches its policy"),
        "{nomx}"
    );
    let text = http_get(relay.admin.unwrap(), "/metrics");
    assert_eq!(
        metric(&text, "ringmta_outbound_tls_total", &["result=\"mta-sts\""]),
        1.0,
        "{text}"
    );
    assert!(
        metric(
            &text,
            "ringmta_outbound_tls_total",
            &["result=\"mta-sts-testing-failed\""]
        ) >= 1.0
    );
    // Each policy fetched once; a later message to the same domain uses
    // the cache (the TXT id did not change).
    assert_eq!(https.hits.load(std::sync::atomic::Ordering::SeqCst), 4);
    send_each(&relay, &["v@enf.test"]);
    wait_until("the second delivery", Duration::from_secs(30), || {
        mx.queued().len() >= 3
    });
    assert_eq!(https.hits.load(std::sync::atomic::Ordering::SeqCst), 4);
    assert!(spool.path().join("mta-sts").join("enfnomx.test").is_file());
    // Restart with the policy server gone: the policies kept on disk
    // still hold (RFC 8461 5.1).
    drop(relay);
    drop(https);
    let relay = Server::builder()
        .spool_dir(spool.path())
        .args(args.iter().cloned())
        .start();
    assert!(
        relay.wait_for_log("MTA-STS policies loaded", Duration::from_secs(5)),
        "{}",
        relay.stderr()
    );
    send_each(&relay, &["w@enfnomx.test"]);
    wait_for_event(&relay, "deferred", "w@enfnomx.test");
    let nomx = event(&relay, "deferred", "w@enfnomx.test");
    assert!(nomx.contains("MTA-STS: no MX host"), "{nomx}");
    assert_eq!(mx.queued().len(), 3, "nothing sent against a policy");
}
