//! Verification of inbound mail on the relay/MX port (SPF, DKIM, DMARC,
//! ARC → one `Authentication-Results:`), against a dnsmasq started here
//! serving the test domains' SPF, DKIM and DMARC records. Messages are
//! signed by three implementations: mail-auth (the Rust signer, in this
//! process), dkimpy (Debian's python3-dkim, which also builds the ARC
//! chain with `arc_sign`) and OpenDKIM's `opendkim-testmsg`. Clients come
//! from 127.0.0.x addresses so that SPF has something to say.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mail_auth::common::crypto::{RsaKey, Sha256};
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::DkimSigner;

use common::{peer_program, run_peer, run_peer_with_input, Client, Queued, Server};

const PEER_TIMEOUT: Duration = Duration::from_secs(60);
/// The authserv-id the servers here use.
const AUTHSERV: &str = "mx.dest.test";

// ---------------------------------------------------------------------------
// Keys and DNS.

struct Key {
    domain: String,
    selector: String,
    path: PathBuf,
    /// The TXT record's text, its strings joined.
    txt: String,
}

impl Key {
    fn name(&self) -> String {
        format!("{}._domainkey.{}", self.selector, self.domain)
    }
}

fn keygen(dir: &Path, domain: &str, selector: &str, algorithm: &str) -> Key {
    let path = dir.join(format!("{selector}.{domain}.pem"));
    let out = run_peer(
        Path::new(env!("CARGO_BIN_EXE_ringmta")),
        &[
            "dkim-keygen",
            "--domain",
            domain,
            "--selector",
            selector,
            "--algorithm",
            algorithm,
            "--out",
            path.to_str().unwrap(),
        ],
        PEER_TIMEOUT,
    );
    assert!(out.status.success(), "dkim-keygen: {}", out.stderr);
    let line = out.stdout.trim_end();
    let prefix = format!("{selector}._domainkey.{domain}. IN TXT \"");
    assert!(line.starts_with(&prefix), "record {line:?}");
    let txt: String = line[prefix.len() - 1..]
        .split('"')
        .skip(1)
        .step_by(2)
        .collect();
    Key {
        domain: domain.into(),
        selector: selector.into(),
        path,
        txt,
    }
}

struct Child_(Child);

impl Drop for Child_ {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A TXT record option for dnsmasq: strings of at most 255 octets,
/// separated by commas (on its command line quotes would be data).
fn txt(name: &str, text: &str) -> String {
    assert!(!text.contains(','), "{text}");
    let strings: Vec<String> = text
        .as_bytes()
        .chunks(255)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect();
    format!("--txt-record={name},{}", strings.join(","))
}

/// dnsmasq answering for `.test` from `records` alone (NXDOMAIN for the
/// rest), on a loopback port; `broken.test` is forwarded to a port where
/// nothing listens, which dnsmasq answers with a failure (a temperror).
fn dnsmasq(records: &[String]) -> Option<(Child_, u16)> {
    let bin = peer_program("dnsmasq", "dnsmasq-base")?;
    // A free UDP port may be another test's TCP port (dnsmasq binds both):
    // a start that fails that way is tried again on other ports.
    for _ in 0..5 {
        if let Some(started) = dnsmasq_once(&bin, records) {
            return Some(started);
        }
    }
    panic!("dnsmasq did not start in five tries");
}

fn dnsmasq_once(bin: &Path, records: &[String]) -> Option<(Child_, u16)> {
    let port = free_udp_port();
    let dead = free_udp_port();
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut cmd = Command::new(bin);
    cmd.args([
        "--keep-in-foreground",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        "--listen-address=127.0.0.1",
        "--user=root",
        "--pid-file",
        "--log-facility=-",
        "--local=/test/",
        // Cacheable answers (dnsmasq's own default is a TTL of 0).
        "--local-ttl=60",
    ])
    .arg(format!("--server=/broken.test/127.0.0.1#{dead}"))
    .arg(format!("--port={port}"))
    .args(records)
    .stdout(Stdio::null())
    .stderr(Stdio::from(log.reopen().unwrap()));
    let child = Child_(cmd.spawn().unwrap());
    // Ready once it answers a query of ours.
    let deadline = Instant::now() + Duration::from_secs(10);
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let query = [
        0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 4, b'p', b'i', b'n', b'g', 4, b't', b'e', b's',
        b't', 0, 0, 16, 0, 1,
    ];
    let mut child = child;
    loop {
        sock.send_to(&query, ("127.0.0.1", port)).unwrap();
        let mut buf = [0u8; 512];
        if sock.recv_from(&mut buf).is_ok() {
            break;
        }
        if child.0.try_wait().ok().flatten().is_some() {
            let why = std::fs::read_to_string(log.path()).unwrap_or_default();
            assert!(why.contains("Address already in use"), "dnsmasq: {why}");
            return None;
        }
        assert!(
            Instant::now() < deadline,
            "dnsmasq did not start: {}",
            std::fs::read_to_string(log.path()).unwrap_or_default()
        );
    }
    Some((child, port))
}

/// Everything a test needs: the DNS, the keys, a directory.
struct World {
    _dir: tempfile::TempDir,
    _dns: Child_,
    dns_port: u16,
    rsa: Key,
    ed: Key,
    arc: Key,
    strict: Key,
}

impl World {
    fn new() -> Option<World> {
        let dir = tempfile::tempdir().unwrap();
        let rsa = keygen(dir.path(), "signed.test", "rsa", "rsa");
        let ed = keygen(dir.path(), "signed.test", "ed", "ed25519");
        let arc = keygen(dir.path(), "forwarder.test", "arc", "rsa");
        let strict = keygen(dir.path(), "strict.test", "rsa", "rsa");
        let mut records = vec![
            // SPF, one domain per result (clients connect from 127.0.0.2).
            txt("pass.test", "v=spf1 ip4:127.0.0.2 -all"),
            txt("mx.pass.test", "v=spf1 ip4:127.0.0.2 -all"),
            txt("fail.test", "v=spf1 ip4:192.0.2.1 -all"),
            txt("soft.test", "v=spf1 ip4:192.0.2.1 ~all"),
            txt("neutral.test", "v=spf1 ?all"),
            // RFC 7208 4.6.4: more than 10 mechanisms that need DNS.
            txt(
                "perm.test",
                &format!("v=spf1 {}ip4:127.0.0.2 -all", "a:none.test ".repeat(11)),
            ),
            "--host-record=none.test,192.0.2.7".into(),
            // RFC 7208 4.6.4: two void lookups (names that do not exist)
            // are allowed, a third is a permerror; a DNS error after two
            // is still a temperror.
            txt(
                "void2.test",
                "v=spf1 a:v1.void.test a:v2.void.test ip4:127.0.0.2 -all",
            ),
            txt(
                "void3.test",
                "v=spf1 a:v1.void.test a:v2.void.test a:v3.void.test ip4:127.0.0.2 -all",
            ),
            txt(
                "voidtemp.test",
                "v=spf1 a:v1.void.test a:v2.void.test a:x.broken.test ip4:127.0.0.2 -all",
            ),
            txt("signed.test", "v=spf1 ip4:127.0.0.2 -all"),
            txt("strict.test", "v=spf1 ip4:127.0.0.2 -all"),
            // DMARC under each policy.
            txt("_dmarc.signed.test", "v=DMARC1; p=reject"),
            txt("_dmarc.quar.test", "v=DMARC1; p=quarantine"),
            txt("_dmarc.rej.test", "v=DMARC1; p=reject"),
            txt("_dmarc.nop.test", "v=DMARC1; p=none"),
            txt("_dmarc.pct.test", "v=DMARC1; p=reject; pct=0"),
            txt("_dmarc.org.test", "v=DMARC1; p=none; sp=reject"),
            "--host-record=sub.org.test,192.0.2.8".into(),
            "--host-record=news.signed.test,192.0.2.9".into(),
            "--host-record=sub.strict.test,192.0.2.10".into(),
            txt("_dmarc.strict.test", "v=DMARC1; p=reject; adkim=s; aspf=s"),
        ];
        for k in [&rsa, &ed, &arc, &strict] {
            records.push(txt(&k.name(), &k.txt));
        }
        let (dns, dns_port) = dnsmasq(&records)?;
        Some(World {
            _dir: dir,
            _dns: dns,
            dns_port,
            rsa,
            ed,
            arc,
            strict,
        })
    }

    fn server(&self, extra: &[&str]) -> Server {
        let dns = format!("127.0.0.1:{}", self.dns_port);
        let mut args = vec![
            "--inbound-auth",
            "on",
            "--authserv-id",
            AUTHSERV,
            "--dns-server",
            &dns,
            "--local-domain",
            "dest.test",
            "--no-delivery",
        ];
        args.extend_from_slice(extra);
        Server::start(&args)
    }
}

/// A message from `from` (the From: header), LF line ends turned to CRLF.
fn message(from: &str, subject: &str, extra: &str) -> Vec<u8> {
    format!(
        "{extra}From: Sender <{from}>\nTo: u@dest.test\nSubject: {subject}\nDate: Wed, 02 Dec 2026 10:00:00 +0000\nMessage-ID: <{subject}@x>\n\nHello.\nA second line.\n"
    )
    .replace('\n', "\r\n")
    .into_bytes()
}

/// mail-auth's signer with the RSA key at `key` (PKCS#8 or PKCS#1 PEM);
/// `expire` sets x= that many seconds after t=.
// The PEM constructors are deprecated for `from_key_der`, which would need
// a PEM parser here only for this.
#[allow(deprecated)]
fn rust_sign(key: &Key, msg: &[u8], expire: Option<u64>) -> Vec<u8> {
    let pem = std::fs::read_to_string(&key.path).unwrap();
    let rsa = if pem.contains("BEGIN RSA PRIVATE KEY") {
        RsaKey::<Sha256>::from_rsa_pem(&pem).unwrap()
    } else {
        RsaKey::<Sha256>::from_pkcs8_pem(&pem).unwrap()
    };
    let mut signer = DkimSigner::from_key(rsa)
        .domain(key.domain.clone())
        .selector(key.selector.clone())
        .headers(["From", "To", "Subject", "Date", "Message-ID"]);
    if let Some(x) = expire {
        signer = signer.expiration(x);
    }
    let sig = signer.sign(msg).unwrap();
    let mut out = sig.to_header().into_bytes();
    out.extend_from_slice(msg);
    out
}

/// Debian's python3 with dkimpy; `None` (skip) only under
/// RINGMTA_SKIP_PEERS=1.
fn dkimpy() -> Option<PathBuf> {
    let python = PathBuf::from("/usr/bin/python3");
    let ok = Command::new(&python)
        .args(["-c", "import dkim, nacl"])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return Some(python);
    }
    assert!(
        std::env::var("RINGMTA_SKIP_PEERS").as_deref() == Ok("1"),
        "python3-dkim is not installed: `apt-get install python3-dkim` (.ci/run does)"
    );
    eprintln!("SKIPPED: python3-dkim is not installed and RINGMTA_SKIP_PEERS=1");
    None
}

/// dkimpy signs `msg` with `key` (RSA or Ed25519).
fn dkimpy_sign(python: &Path, key: &Key, algorithm: &str, msg: &[u8]) -> Vec<u8> {
    const SCRIPT: &str = r#"
import sys, dkim
sel, dom, path, alg = sys.argv[1:5]
msg = sys.stdin.buffer.read()
key = open(path, 'rb').read()
if alg == 'ed25519':
    # dkimpy takes the raw 32-octet seed, base64, for Ed25519.
    import base64
    from cryptography.hazmat.primitives import serialization
    k = serialization.load_pem_private_key(key, password=None)
    raw = k.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                          serialization.NoEncryption())
    key = base64.b64encode(raw)
    sig = dkim.sign(msg, sel.encode(), dom.encode(), key, signature_algorithm=b'ed25519-sha256',
                    include_headers=[b'from', b'to', b'subject', b'date', b'message-id'])
else:
    sig = dkim.sign(msg, sel.encode(), dom.encode(), key,
                    include_headers=[b'from', b'to', b'subject', b'date', b'message-id'])
sys.stdout.buffer.write(sig + msg)
"#;
    let path = key.path.to_str().unwrap();
    let out = run_peer_with_input(
        python,
        &["-c", SCRIPT, &key.selector, &key.domain, path, algorithm],
        msg,
        PEER_TIMEOUT,
    );
    assert!(out.status.success(), "dkimpy sign: {}", out.stderr);
    crlf(out.stdout.as_bytes())
}

/// dkimpy's `arc_sign` seals `msg` (which carries the forwarder's own
/// Authentication-Results) as forwarder.test would.
fn dkimpy_arc_sign(python: &Path, key: &Key, msg: &[u8]) -> Vec<u8> {
    const SCRIPT: &str = r#"
import sys, dkim
sel, dom, path = sys.argv[1:4]
msg = sys.stdin.buffer.read()
key = open(path, 'rb').read()
headers = dkim.arc_sign(msg, sel.encode(), dom.encode(), key, dom.encode(),
                        include_headers=[b'from', b'to', b'subject', b'date', b'message-id'])
sys.stdout.buffer.write(b''.join(headers) + msg)
"#;
    let out = run_peer_with_input(
        python,
        &[
            "-c",
            SCRIPT,
            &key.selector,
            &key.domain,
            key.path.to_str().unwrap(),
        ],
        msg,
        PEER_TIMEOUT,
    );
    assert!(out.status.success(), "dkimpy arc_sign: {}", out.stderr);
    crlf(out.stdout.as_bytes())
}

/// OpenDKIM's signer (`opendkim-testmsg` in signing mode, CRLF output).
fn opendkim_sign(key: &Key, msg: &[u8]) -> Option<Vec<u8>> {
    let bin = peer_program("opendkim-testmsg", "opendkim-tools")?;
    let out = run_peer_with_input(
        &bin,
        &[
            "-C",
            "-d",
            &key.domain,
            "-s",
            &key.selector,
            "-k",
            key.path.to_str().unwrap(),
        ],
        msg,
        PEER_TIMEOUT,
    );
    assert!(out.status.success(), "opendkim-testmsg: {}", out.stderr);
    Some(crlf(out.stdout.as_bytes()))
}

/// Every line end CRLF (some signers write LF).
fn crlf(b: &[u8]) -> Vec<u8> {
    String::from_utf8_lossy(b)
        .replace("\r\n", "\n")
        .replace('\n', "\r\n")
        .into_bytes()
}

// ---------------------------------------------------------------------------
// Sending and reading the result.

const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

/// Sends `content` from `mail_from` after `EHLO helo` from 127.0.0.2;
/// returns the final reply's first line.
fn send(server: &Server, helo: &str, mail_from: &str, content: &[u8]) -> String {
    let mut c = Client::connect_from(server.addr, CLIENT);
    c.hello(helo);
    let r = c.cmd(&format!("MAIL FROM:<{mail_from}>"));
    if r.code != 250 {
        return r.last().to_owned();
    }
    c.expect("RCPT TO:<u@dest.test>", 250);
    c.expect("DATA", 354);
    c.send(&common::dot_stuff(content));
    let r = c.reply();
    c.cmd("QUIT");
    r.last().to_owned()
}

/// The stored message with queue id from `reply` (`250 2.0.0 Ok: queued as ID`).
fn stored(server: &Server, reply: &str) -> Queued {
    assert!(reply.starts_with("250"), "{reply}");
    let id = reply.rsplit(' ').next().unwrap();
    server.message(id)
}

/// Our Authentication-Results field, unfolded, and how many there are.
fn auth_results(q: &Queued) -> String {
    let text = String::from_utf8_lossy(q.content()).into_owned();
    let head = text.split("\r\n\r\n").next().unwrap_or("").to_owned();
    let unfolded = head.replace("\r\n\t", " ").replace("\r\n ", " ");
    let ours: Vec<&str> = unfolded
        .split("\r\n")
        .filter(|l| l.starts_with(&format!("Authentication-Results: {AUTHSERV}")))
        .collect();
    assert_eq!(
        ours.len(),
        1,
        "one Authentication-Results of ours: {unfolded}"
    );
    ours[0].to_owned()
}

fn has_header(q: &Queued, line: &str) -> bool {
    let text = String::from_utf8_lossy(q.content()).into_owned();
    let head = text.split("\r\n\r\n").next().unwrap_or("").to_owned();
    head.split("\r\n").any(|l| l == line)
}

/// `method=result` appears in `ar` (e.g. `spf=pass` for the MAIL FROM
/// identity when followed by ` smtp.mailfrom`).
fn method(ar: &str, method: &str, result: &str) -> bool {
    ar.split(';')
        .map(str::trim)
        .any(|r| r.starts_with(&format!("{method}={result}")))
}

fn spf_mailfrom(ar: &str) -> String {
    ar.split(';')
        .map(str::trim)
        .find(|r| r.starts_with("spf=") && r.contains("smtp.mailfrom="))
        .unwrap_or_else(|| panic!("no MAIL FROM spf result in {ar}"))
        .split([' ', '('])
        .next()
        .unwrap()
        .to_owned()
}

// ---------------------------------------------------------------------------
// The cases.

#[test]
fn spf_results_for_each_case() {
    let Some(w) = World::new() else { return };
    let server = w.server(&[]);
    for (domain, want) in [
        ("pass.test", "spf=pass"),
        ("fail.test", "spf=fail"),
        ("soft.test", "spf=softfail"),
        ("neutral.test", "spf=neutral"),
        ("none.test", "spf=none"),
        ("perm.test", "spf=permerror"),
        ("broken.test", "spf=temperror"),
        ("void2.test", "spf=pass"),
        ("void3.test", "spf=permerror"),
        ("voidtemp.test", "spf=temperror"),
    ] {
        let from = format!("a@{domain}");
        let reply = send(&server, "mx.pass.test", &from, &message(&from, "spf", ""));
        let q = stored(&server, &reply);
        let ar = auth_results(&q);
        assert_eq!(spf_mailfrom(&ar), want, "{domain}: {ar}");
        // The HELO identity is checked too.
        assert!(
            ar.contains("spf=pass") && ar.contains("smtp.helo=mx.pass.test"),
            "{ar}"
        );
        // Unsigned: no DKIM; no DMARC record for these domains (and none
        // to be had for the one whose DNS fails).
        assert!(method(&ar, "dkim", "none"), "{ar}");
        // voidtemp.test's SPF waits out the check's one deadline on the
        // dead server, so DMARC may have no time left for its lookup.
        let dmarc: &[&str] = match domain {
            "broken.test" => &["temperror"],
            "voidtemp.test" => &["none", "temperror"],
            _ => &["none"],
        };
        assert!(dmarc.iter().any(|r| method(&ar, "dmarc", r)), "{ar}");
    }
    // The null reverse-path: the HELO identity stands for it.
    let reply = send(
        &server,
        "mx.pass.test",
        "",
        &message("a@pass.test", "null", ""),
    );
    let ar = auth_results(&stored(&server, &reply));
    assert!(method(&ar, "spf", "pass"), "{ar}");
    assert!(!ar.contains("smtp.mailfrom"), "{ar}");
}

#[test]
fn spf_fail_is_refused_at_mail_from_under_reject() {
    let Some(w) = World::new() else { return };
    let server = w.server(&["--spf-policy", "reject"]);
    let reply = send(&server, "mx.pass.test", "a@fail.test", b"");
    assert!(reply.starts_with("550 5.7.23"), "{reply}");
    // softfail, temperror and permerror are not refused.
    for domain in ["soft.test", "broken.test", "perm.test", "pass.test"] {
        let from = format!("a@{domain}");
        let reply = send(&server, "mx.pass.test", &from, &message(&from, "ok", ""));
        let ar = auth_results(&stored(&server, &reply));
        assert!(ar.contains(&format!("smtp.mailfrom={from}")), "{ar}");
    }
    // A --relay-network client and an authenticated one are not checked.
    let trusted = w.server(&["--spf-policy", "reject", "--relay-network", "127.0.0.2/32"]);
    let reply = send(
        &trusted,
        "mx.pass.test",
        "a@fail.test",
        &message("a@fail.test", "t", ""),
    );
    let q = stored(&trusted, &reply);
    assert!(!String::from_utf8_lossy(q.content()).contains("Authentication-Results"));
}

#[test]
fn dkim_pass_fail_none_body_hash_and_expired() {
    let Some(w) = World::new() else { return };
    let Some(python) = dkimpy() else { return };
    let server = w.server(&[]);
    let from = "a@signed.test";
    let base = message(from, "dkim", "");

    // pass: mail-auth (RSA), dkimpy (RSA and Ed25519), OpenDKIM (RSA).
    let mut signed = vec![
        ("mail-auth rsa", rust_sign(&w.rsa, &base, None)),
        ("dkimpy rsa", dkimpy_sign(&python, &w.rsa, "rsa", &base)),
        (
            "dkimpy ed25519",
            dkimpy_sign(&python, &w.ed, "ed25519", &base),
        ),
    ];
    if let Some(m) = opendkim_sign(&w.rsa, &base) {
        signed.push(("opendkim rsa", m));
    }
    for (who, m) in &signed {
        let reply = send(&server, "mx.pass.test", "b@pass.test", m);
        let ar = auth_results(&stored(&server, &reply));
        assert!(method(&ar, "dkim", "pass"), "{who}: {ar}");
        assert!(ar.contains("header.d=signed.test"), "{who}: {ar}");
        // Aligned DKIM pass: DMARC passes although SPF is for pass.test.
        assert!(method(&ar, "dmarc", "pass"), "{who}: {ar}");
    }

    // Both signatures of one message are reported.
    let both = dkimpy_sign(&python, &w.ed, "ed25519", &rust_sign(&w.rsa, &base, None));
    let reply = send(&server, "mx.pass.test", "b@pass.test", &both);
    let ar = auth_results(&stored(&server, &reply));
    assert_eq!(ar.matches("dkim=pass").count(), 2, "{ar}");

    // Body changed after signing: the body hash does not match.
    let good = rust_sign(&w.rsa, &base, None);
    let tampered = String::from_utf8(good.clone())
        .unwrap()
        .replace("A second line.", "A second line!")
        .into_bytes();
    // As Gmail and mail-auth write it: the signature could not be
    // checked against this body.
    let reply = send(&server, "mx.pass.test", "b@pass.test", &tampered);
    let ar = auth_results(&stored(&server, &reply));
    assert!(
        ar.contains("dkim=neutral (body hash did not verify)"),
        "{ar}"
    );
    // A signed header changed: the signature does not verify.
    let forged = String::from_utf8(good)
        .unwrap()
        .replace("Subject: dkim", "Subject: DKIM")
        .into_bytes();
    let reply = send(&server, "mx.pass.test", "b@pass.test", &forged);
    let ar = auth_results(&stored(&server, &reply));
    assert!(ar.contains("dkim=fail (signature did not verify)"), "{ar}");
    // DMARC: no aligned pass, p=reject, --dmarc-reject off: quarantined.
    assert!(method(&ar, "dmarc", "fail"), "{ar}");
    assert!(has_header(&stored(&server, &reply), "X-Spam-Flag: YES"));

    // Unsigned.
    let reply = send(&server, "mx.pass.test", "b@pass.test", &base);
    let ar = auth_results(&stored(&server, &reply));
    assert!(method(&ar, "dkim", "none"), "{ar}");

    // Expired (x= one second after t=).
    let expiring = rust_sign(&w.rsa, &base, Some(1));
    std::thread::sleep(Duration::from_millis(2100));
    let reply = send(&server, "mx.pass.test", "b@pass.test", &expiring);
    let ar = auth_results(&stored(&server, &reply));
    assert!(ar.contains("dkim=neutral (signature expired)"), "{ar}");

    // Each message's verdict is counted by method and result (summed over
    // the shards).
    let metrics = common::http_get(server.admin.expect("admin listener"), "/metrics");
    let count = |method: &str, result: &str| -> u64 {
        let labels = format!("method=\"{method}\",result=\"{result}\"");
        metrics
            .lines()
            .filter(|l| l.starts_with("ringmta_inbound_auth_results_total{") && l.contains(&labels))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    let messages = signed.len() as u64 + 5;
    assert_eq!(count("dkim", "pass"), signed.len() as u64 + 1, "{metrics}");
    assert_eq!(count("dkim", "fail"), 1, "{metrics}");
    assert_eq!(count("dkim", "neutral"), 2, "{metrics}");
    assert_eq!(count("dkim", "none"), 1, "{metrics}");
    let dmarc: u64 = ["pass", "fail", "none", "temperror", "permerror"]
        .iter()
        .map(|r| count("dmarc", r))
        .sum();
    assert_eq!(dmarc, messages, "{metrics}");
}

#[test]
fn dmarc_under_each_policy_and_alignment() {
    let Some(w) = World::new() else { return };
    let server = w.server(&[]);
    let rejecting = w.server(&["--dmarc-reject"]);
    // SPF fails for the MAIL FROM (fail.test) and nothing is signed, so
    // DMARC fails for every author domain with a record.
    let send_as = |s: &Server, author: &str| {
        let m = message(author, "dmarc", "");
        send(s, "mx.pass.test", "x@fail.test", &m)
    };

    // p=none: recorded, nothing else.
    let reply = send_as(&server, "a@nop.test");
    let q = stored(&server, &reply);
    let ar = auth_results(&q);
    assert!(method(&ar, "dmarc", "fail"), "{ar}");
    assert!(ar.contains("policy.dmarc=none"), "{ar}");
    assert!(!has_header(&q, "X-Spam-Flag: YES"));

    // p=quarantine: the header to file on.
    let reply = send_as(&server, "a@quar.test");
    let q = stored(&server, &reply);
    assert!(auth_results(&q).contains("policy.dmarc=quarantine"));
    assert!(has_header(&q, "X-Spam-Flag: YES"));

    // p=reject: quarantined by default, refused under --dmarc-reject.
    let reply = send_as(&server, "a@rej.test");
    let q = stored(&server, &reply);
    assert!(auth_results(&q).contains("policy.dmarc=reject"));
    assert!(has_header(&q, "X-Spam-Flag: YES"));
    let reply = send_as(&rejecting, "a@rej.test");
    assert!(reply.starts_with("550 5.7.1"), "{reply}");

    // pct=0: nobody is in the sample, reject becomes quarantine.
    let reply = send_as(&rejecting, "a@pct.test");
    let q = stored(&rejecting, &reply);
    assert!(has_header(&q, "X-Spam-Flag: YES"));

    // sp: the subdomain policy (reject) applies to sub.org.test, p (none)
    // to org.test.
    let reply = send_as(&rejecting, "a@sub.org.test");
    assert!(reply.starts_with("550 5.7.1"), "{reply}");
    let reply = send_as(&rejecting, "a@org.test");
    let q = stored(&rejecting, &reply);
    assert!(!has_header(&q, "X-Spam-Flag: YES"));

    // Relaxed alignment: an SPF pass for signed.test aligns with the
    // author news.signed.test (same organizational domain).
    let m = message("a@news.signed.test", "relaxed", "");
    let reply = send(&rejecting, "mx.pass.test", "x@signed.test", &m);
    let ar = auth_results(&stored(&rejecting, &reply));
    assert!(method(&ar, "dmarc", "pass"), "{ar}");

    // Strict alignment (adkim=s; aspf=s): a DKIM pass for strict.test and
    // an SPF pass for strict.test do not align with sub.strict.test.
    let m = rust_sign(&w.strict, &message("a@sub.strict.test", "strict", ""), None);
    let reply = send(&rejecting, "mx.pass.test", "x@strict.test", &m);
    assert!(reply.starts_with("550 5.7.1"), "strict: {reply}");
    let m = rust_sign(&w.strict, &message("a@strict.test", "strict", ""), None);
    let reply = send(&rejecting, "mx.pass.test", "x@strict.test", &m);
    let ar = auth_results(&stored(&rejecting, &reply));
    assert!(method(&ar, "dmarc", "pass"), "{ar}");
}

/// Sends `content` to each of `rcpts` in one transaction; returns each
/// RCPT reply's code and the final reply's line (`None` when no recipient
/// was taken).
fn send_to(
    server: &Server,
    mail_from: &str,
    rcpts: &[&str],
    content: &[u8],
) -> (Vec<u16>, Option<String>) {
    let mut c = Client::connect_from(server.addr, CLIENT);
    c.hello("mx.pass.test");
    c.expect(&format!("MAIL FROM:<{mail_from}>"), 250);
    let codes: Vec<u16> = rcpts
        .iter()
        .map(|r| c.cmd(&format!("RCPT TO:<{r}>")).code)
        .collect();
    if !codes.contains(&250) {
        c.cmd("QUIT");
        return (codes, None);
    }
    c.expect("DATA", 354);
    c.send(&common::dot_stuff(content));
    let r = c.reply();
    c.cmd("QUIT");
    (codes, Some(r.last().to_owned()))
}

#[test]
fn per_domain_policy_overrides_the_flags() {
    let Some(w) = World::new() else { return };
    // strict.dest: refuses SPF fails (at RCPT) and DMARC rejects; off.dest
    // is not verified at all; dest.test follows the flags (mark).
    let server = w.server(&[
        "--local-domain",
        "strict.dest",
        "--local-domain",
        "off.dest",
        "--domain-auth",
        "strict.dest:spf=reject:dmarc=reject",
        "--domain-auth",
        "off.dest:verify=off",
    ]);
    let m = message("x@fail.test", "spf", "");
    // SPF fail: refused for strict.dest only, the rest of the transaction
    // goes on (and the message is marked, not refused).
    let (codes, last) = send_to(
        &server,
        "x@fail.test",
        &["u@strict.dest", "u@dest.test"],
        &m,
    );
    assert_eq!(codes, [550, 250]);
    let q = stored(&server, &last.unwrap());
    assert!(method(&auth_results(&q), "spf", "fail"));
    let (codes, last) = send_to(&server, "x@fail.test", &["u@strict.dest"], &m);
    assert_eq!((codes, last), (vec![550], None));
    // A passing sender is taken for strict.dest.
    let (codes, _) = send_to(
        &server,
        "x@pass.test",
        &["u@strict.dest"],
        &message("x@pass.test", "ok", ""),
    );
    assert_eq!(codes, [250]);

    // DMARC p=reject failing (SPF soft-fails for soft.test, unsigned):
    // refused when every recipient's domain says reject, quarantined when
    // one does not.
    let m = message("a@rej.test", "dmarc", "");
    let (_, last) = send_to(&server, "x@soft.test", &["u@strict.dest"], &m);
    assert!(
        last.as_deref().unwrap().starts_with("550 5.7.1"),
        "{last:?}"
    );
    let (_, last) = send_to(
        &server,
        "x@soft.test",
        &["u@strict.dest", "u@dest.test"],
        &m,
    );
    let q = stored(&server, &last.unwrap());
    assert!(has_header(&q, "X-Spam-Flag: YES"));

    // verify=off: no Authentication-Results, no SPF refusal, no quarantine.
    let (codes, last) = send_to(&server, "x@fail.test", &["u@off.dest"], &m);
    assert_eq!(codes, [250]);
    let q = stored(&server, &last.unwrap());
    let text = String::from_utf8_lossy(q.content()).into_owned();
    assert!(!text.contains("Authentication-Results"), "{text}");
    assert!(!has_header(&q, "X-Spam-Flag: YES"));

    // Global --spf-policy reject with a domain that marks: decided per RCPT.
    let server = w.server(&[
        "--spf-policy",
        "reject",
        "--local-domain",
        "lenient.dest",
        "--domain-auth",
        "lenient.dest:spf=mark",
    ]);
    let m = message("x@fail.test", "spf", "");
    let (codes, last) = send_to(
        &server,
        "x@fail.test",
        &["u@dest.test", "u@lenient.dest"],
        &m,
    );
    assert_eq!(codes, [550, 250]);
    assert!(last.unwrap().starts_with("250"));
}

#[test]
fn arc_chain_sealed_by_dkimpy_verifies() {
    let Some(w) = World::new() else { return };
    let Some(python) = dkimpy() else { return };
    let server = w.server(&[]);
    let forwarded = message(
        "a@signed.test",
        "arc",
        "Authentication-Results: forwarder.test; spf=pass smtp.mailfrom=a@signed.test\n",
    );
    let sealed = dkimpy_arc_sign(&python, &w.arc, &forwarded);
    assert!(String::from_utf8_lossy(&sealed).contains("ARC-Seal:"));
    let reply = send(&server, "mx.pass.test", "x@pass.test", &sealed);
    let ar = auth_results(&stored(&server, &reply));
    assert!(method(&ar, "arc", "pass"), "{ar}");
    // Changed after sealing: the chain no longer verifies.
    let broken = String::from_utf8(sealed)
        .unwrap()
        .replace("Subject: arc", "Subject: ARC")
        .into_bytes();
    let reply = send(&server, "mx.pass.test", "x@pass.test", &broken);
    let ar = auth_results(&stored(&server, &reply));
    assert!(method(&ar, "arc", "fail"), "{ar}");
    // Not sealed at all.
    let reply = send(&server, "mx.pass.test", "x@pass.test", &forwarded);
    let ar = auth_results(&stored(&server, &reply));
    assert!(method(&ar, "arc", "none"), "{ar}");
}

#[test]
fn forged_authentication_results_with_our_id_are_removed() {
    let Some(w) = World::new() else { return };
    let server = w.server(&[]);
    let forged = message(
        "a@pass.test",
        "forged",
        &format!(
            "Authentication-Results: {AUTHSERV}; dkim=pass header.d=bank.test\n\
             authentication-results: (x) MX.DEST.TEST;\n\tdmarc=pass\n\
             Authentication-Results: other.test; spf=pass\n"
        ),
    );
    let reply = send(&server, "mx.pass.test", "a@pass.test", &forged);
    let q = stored(&server, &reply);
    let ar = auth_results(&q);
    assert!(!ar.contains("bank.test"), "{ar}");
    let text = String::from_utf8_lossy(q.content()).to_ascii_lowercase();
    assert_eq!(text.matches("authentication-results:").count(), 2, "{text}");
    assert!(text.contains("authentication-results: other.test; spf=pass"));
    // Ours is above the content, under our Received.
    assert!(text.starts_with(&format!("authentication-results: {AUTHSERV}")));
}

#[test]
fn silent_dns_does_not_hold_the_session_past_the_timeout() {
    // A DNS server that reads and never answers.
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr: SocketAddr = silent.local_addr().unwrap();
    let server = Server::start(&[
        "--inbound-auth",
        "on",
        "--authserv-id",
        AUTHSERV,
        "--dns-server",
        &addr.to_string(),
        "--dns-timeout",
        "1s",
        "--spf-policy",
        "reject",
        "--local-domain",
        "dest.test",
        "--no-delivery",
    ]);
    let mut c = Client::connect_from(server.addr, CLIENT);
    // The bound: --dns-timeout, the 2 s grace for a busy DNS thread, and
    // room for a loaded machine. Past it the read fails and so does the test.
    c.set_read_timeout(Duration::from_secs(6));
    c.hello("mx.pass.test");
    // SPF at MAIL FROM: temperror, not a refusal.
    c.expect("MAIL FROM:<a@pass.test>", 250);
    c.expect("RCPT TO:<u@dest.test>", 250);
    c.expect("DATA", 354);
    c.send(&common::dot_stuff(&message("a@signed.test", "slow", "")));
    let reply = c.reply();
    assert_eq!(reply.code, 250, "{reply:?}");
    let ar = auth_results(&stored(&server, reply.last()));
    assert!(method(&ar, "dmarc", "temperror"), "{ar}");
    assert_eq!(spf_mailfrom(&ar), "spf=temperror", "{ar}");
    // The names that got no answer are remembered as failed for a while:
    // the next message waits for nothing. Without that it would wait the
    // whole --dns-timeout (1 s) at MAIL FROM and again at the end of DATA.
    let started = std::time::Instant::now();
    c.expect("MAIL FROM:<a@pass.test>", 250);
    c.expect("RCPT TO:<u@dest.test>", 250);
    c.expect("DATA", 354);
    c.send(&common::dot_stuff(&message("a@signed.test", "again", "")));
    let reply = c.reply();
    let took = started.elapsed();
    assert_eq!(reply.code, 250, "{reply:?}");
    let ar = auth_results(&stored(&server, reply.last()));
    assert!(method(&ar, "dmarc", "temperror"), "{ar}");
    assert_eq!(spf_mailfrom(&ar), "spf=temperror", "{ar}");
    assert!(took < Duration::from_millis(900), "waited {took:?} again");
    drop(silent);
}

#[test]
fn delivered_into_the_maildir_with_the_results() {
    let Some(w) = World::new() else { return };
    let dns = format!("127.0.0.1:{}", w.dns_port);
    // Delivery on (no --no-delivery): dest.test is a local Maildir domain.
    let server = Server::start(&[
        "--inbound-auth",
        "on",
        "--authserv-id",
        AUTHSERV,
        "--dns-server",
        &dns,
        "--local-domain",
        "dest.test",
    ]);
    let m = rust_sign(&w.rsa, &message("a@signed.test", "maildir", ""), None);
    let reply = send(&server, "mx.pass.test", "a@signed.test", &m);
    assert!(reply.starts_with("250"), "{reply}");
    let new = server
        .spool_dir()
        .parent()
        .unwrap()
        .join("maildir/dest.test/u/new");
    let deadline = Instant::now() + Duration::from_secs(30);
    let file = loop {
        let found = std::fs::read_dir(&new)
            .ok()
            .and_then(|mut d| d.next())
            .map(|e| e.unwrap().path());
        if let Some(f) = found {
            break f;
        }
        assert!(
            Instant::now() < deadline,
            "not delivered: {}",
            server.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = String::from_utf8(std::fs::read(file).unwrap()).unwrap();
    let head = text
        .split("\r\n\r\n")
        .next()
        .unwrap()
        .replace("\r\n\t", " ");
    let ar = head
        .lines()
        .find(|l| l.starts_with("Authentication-Results: mx.dest.test;"))
        .unwrap_or_else(|| panic!("{head}"));
    for want in ["spf=pass", "dkim=pass header.d=signed.test", "dmarc=pass"] {
        assert!(ar.contains(want), "{want}: {ar}");
    }
    // The results are in the message's `accepted` event, on its one line.
    let log = server.stderr();
    let accepted = log
        .lines()
        .find(|l| l.contains("event=\"accepted\""))
        .unwrap_or_else(|| panic!("no accepted event: {log}"));
    assert!(
        accepted.contains("auth=\"spf=pass dkim=pass arc=none dmarc=pass\""),
        "{accepted}"
    );
    assert!(!log.contains("inbound checks"), "{log}");
}
