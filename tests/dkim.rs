//! DKIM signing of submitted mail against a real server: keys made by
//! `ringmta dkim-keygen` (RSA and Ed25519), signatures on the stored
//! message checked with the DNS record keygen printed, and what is left
//! alone (a From domain without a key, everything on the relay port).
//!
//! Three verifiers, none of which touches the network: mail-auth (the
//! record goes into its resolver cache), dkimpy (Debian's python3-dkim,
//! through its `dnsfunc` hook), and OpenDKIM's `opendkim-testmsg`, which
//! can only ask DNS: it runs in a private mount and network namespace whose
//! `/etc/resolv.conf` names a dnsmasq serving the records (root, as in CI).

mod common;

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use mail_auth::common::parse::TxtRecordParser;
use mail_auth::common::verify::DomainKey;
use mail_auth::{
    AuthenticatedMessage, DkimResult, MessageAuthenticator, Parameters, ResolverCache, Txt,
};

use common::{peer_program, run_peer, run_peer_with_input, Client, Server};

const PEER_TIMEOUT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------
// Keys and records.

/// A key made by `ringmta dkim-keygen`, and its published record.
struct Key {
    domain: String,
    selector: String,
    path: PathBuf,
    /// The TXT record's text, its strings joined.
    txt: String,
}

impl Key {
    fn flag(&self) -> String {
        format!("{}:{}:{}", self.domain, self.selector, self.path.display())
    }

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
    assert_eq!(out.stdout.lines().count(), 1, "{}", out.stdout);
    Key {
        domain: domain.into(),
        selector: selector.into(),
        path,
        txt: txt_strings(&line[prefix.len() - 1..]).concat(),
    }
}

/// `"a" "b"` → `["a", "b"]`.
fn txt_strings(s: &str) -> Vec<&str> {
    let strings: Vec<&str> = s.split('"').skip(1).step_by(2).collect();
    assert!(
        strings.iter().all(|t| t.len() <= 255),
        "a TXT string over 255 octets: {s}"
    );
    strings
}

#[test]
fn keygen_writes_the_key_and_prints_the_record() {
    let dir = tempfile::tempdir().unwrap();
    let rsa = keygen(dir.path(), "example.org", "r2026", "rsa");
    let ed = keygen(dir.path(), "example.org", "e2026", "ed25519");
    for k in [&rsa, &ed] {
        let meta = std::fs::metadata(&k.path).unwrap();
        assert_eq!(
            meta.permissions().mode() & 0o777,
            0o600,
            "{}",
            k.path.display()
        );
        let pem = std::fs::read_to_string(&k.path).unwrap();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"), "{pem}");
    }
    assert!(rsa.txt.starts_with("v=DKIM1; k=rsa; p=MII"), "{}", rsa.txt);
    assert!(ed.txt.starts_with("v=DKIM1; k=ed25519; p="), "{}", ed.txt);
    let p = ed.txt.rsplit("p=").next().unwrap();
    let raw = base64::engine::general_purpose::STANDARD.decode(p).unwrap();
    assert_eq!(raw.len(), 32, "RFC 8463: the bare public key");

    // OpenSSL reads both keys, and derives the same RSA public key.
    if let Some(openssl) = peer_program("openssl", "openssl") {
        let out = Command::new(&openssl)
            .args([
                "pkey",
                "-in",
                rsa.path.to_str().unwrap(),
                "-pubout",
                "-outform",
                "DER",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let spki = base64::engine::general_purpose::STANDARD.encode(out.stdout);
        assert!(rsa.txt.ends_with(&format!("p={spki}")), "{}", rsa.txt);
        let out = run_peer(
            &openssl,
            &["pkey", "-in", ed.path.to_str().unwrap(), "-noout"],
            PEER_TIMEOUT,
        );
        assert!(out.status.success(), "{}", out.stderr);
    }

    // An existing file is never replaced; RSA sizes ring cannot sign with
    // are refused.
    let before = std::fs::read(&rsa.path).unwrap();
    let bin = Path::new(env!("CARGO_BIN_EXE_ringmta"));
    let out = run_peer(
        bin,
        &[
            "dkim-keygen",
            "--domain",
            "example.org",
            "--selector",
            "x",
            "--out",
        ]
        .into_iter()
        .chain([rsa.path.to_str().unwrap()])
        .collect::<Vec<_>>(),
        PEER_TIMEOUT,
    );
    assert!(!out.status.success());
    assert!(out.stderr.contains("File exists"), "{}", out.stderr);
    assert_eq!(std::fs::read(&rsa.path).unwrap(), before);
    let small = dir.path().join("small.pem");
    let out = run_peer(
        bin,
        &[
            "dkim-keygen",
            "--domain",
            "example.org",
            "--selector",
            "x",
            "--bits",
            "1024",
            "--out",
        ]
        .into_iter()
        .chain([small.to_str().unwrap()])
        .collect::<Vec<_>>(),
        PEER_TIMEOUT,
    );
    assert!(!out.status.success());
    assert!(out.stderr.contains("2048..=4096"), "{}", out.stderr);
    assert!(!small.exists());
}

// ---------------------------------------------------------------------------
// Verifiers.

/// A resolver cache holding the published records: mail-auth looks there
/// before it would ask DNS, so nothing leaves the machine.
#[derive(Default)]
struct Records(Mutex<HashMap<Box<str>, Txt>>);

impl Records {
    fn new(keys: &[&Key]) -> Records {
        let r = Records::default();
        for k in keys {
            let dk = DomainKey::parse(k.txt.as_bytes()).expect("record parses");
            let txt = Txt::DomainKey(Arc::new(dk));
            let mut map = r.0.lock().unwrap();
            map.insert(format!("{}.", k.name()).into(), txt.clone());
            map.insert(k.name().into(), txt);
        }
        r
    }
}

impl ResolverCache<Box<str>, Txt> for Records {
    fn get<Q>(&self, name: &Q) -> Option<Txt>
    where
        Box<str>: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.0.lock().unwrap().get(name).cloned()
    }

    fn remove<Q>(&self, name: &Q) -> Option<Txt>
    where
        Box<str>: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.0.lock().unwrap().remove(name)
    }

    fn insert(&self, key: Box<str>, value: Txt, _valid_until: Instant) {
        self.0.lock().unwrap().insert(key, value);
    }
}

/// Each signature of `message` as mail-auth judges it with `keys` as the
/// DNS: (result, d=, s=, a=).
fn mail_auth_verify(message: &[u8], keys: &[&Key]) -> Vec<(bool, String, String, String)> {
    let records = Records::new(keys);
    // Builds a resolver object only; every lookup is answered by `records`.
    let authenticator = MessageAuthenticator::new_cloudflare().unwrap();
    let msg = AuthenticatedMessage::parse(message).expect("message parses");
    let out = futures_lite::future::block_on(
        authenticator.verify_dkim(Parameters::new(&msg).with_txt_cache(&records)),
    );
    out.iter()
        .map(|o| {
            let sig = o.signature().expect("a signature");
            let pass = *o.result() == DkimResult::Pass;
            if !pass {
                eprintln!("mail-auth: {:?} for d={} s={}", o.result(), sig.d, sig.s);
            }
            let a = match sig.a {
                mail_auth::common::crypto::Algorithm::RsaSha256 => "rsa-sha256",
                mail_auth::common::crypto::Algorithm::Ed25519Sha256 => "ed25519-sha256",
                mail_auth::common::crypto::Algorithm::RsaSha1 => "rsa-sha1",
            };
            (pass, sig.d.clone(), sig.s.clone(), a.to_owned())
        })
        .collect()
}

/// The message with only its `n`th DKIM-Signature field kept: each
/// signature is checked on its own (none covers another).
fn only_signature(message: &[u8], n: usize) -> Vec<u8> {
    let text = String::from_utf8(message.to_vec()).unwrap();
    let (header, body) = text.split_once("\r\n\r\n").unwrap();
    let mut out = String::new();
    let mut index = 0;
    let mut keep = true;
    for line in header.split("\r\n") {
        if line.starts_with(' ') || line.starts_with('\t') {
            if keep {
                out.push_str(line);
                out.push_str("\r\n");
            }
            continue;
        }
        keep = true;
        if line.to_ascii_lowercase().starts_with("dkim-signature:") {
            keep = index == n;
            index += 1;
        }
        if keep {
            out.push_str(line);
            out.push_str("\r\n");
        }
    }
    out.push_str("\r\n");
    out.push_str(body);
    out.into_bytes()
}

fn signature_count(message: &[u8]) -> usize {
    let text = String::from_utf8_lossy(message);
    let header = text.split("\r\n\r\n").next().unwrap_or_default();
    header
        .split("\r\n")
        .filter(|l| l.to_ascii_lowercase().starts_with("dkim-signature:"))
        .count()
}

/// Debian's `/usr/bin/python3` with dkimpy (python3-dkim); `None` means
/// skip, only allowed under RINGMTA_SKIP_PEERS=1.
fn dkimpy() -> Option<PathBuf> {
    let python = PathBuf::from("/usr/bin/python3");
    let ok = Command::new(&python)
        .args(["-c", "import dkim, nacl"])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return Some(python);
    }
    if std::env::var("RINGMTA_SKIP_PEERS").as_deref() == Ok("1") {
        eprintln!("SKIPPED: python3-dkim is not installed and RINGMTA_SKIP_PEERS=1");
        return None;
    }
    panic!(
        "python3-dkim is not installed: `apt-get install python3-dkim` (.ci/run does), \
         or set RINGMTA_SKIP_PEERS=1 to skip the tests that need real peers"
    );
}

/// dkimpy verifies every signature of `message`, the DNS being `keys`.
fn dkimpy_verify(python: &Path, message: &[u8], keys: &[&Key]) -> Result<(), String> {
    const SCRIPT: &str = r#"
import sys, dkim
records = {}
args = sys.argv[1:]
for name, txt in zip(args[0::2], args[1::2]):
    records[name.rstrip('.').lower()] = txt.encode()
def dns(name, timeout=5):
    if isinstance(name, bytes):
        name = name.decode()
    return records.get(name.rstrip('.').lower())
msg = sys.stdin.buffer.read()
d = dkim.DKIM(msg)
n = sum(1 for k, v in d.headers if k.lower() == b'dkim-signature')
ok = [d.verify(idx=i, dnsfunc=dns) for i in range(n)]
print(n, ok)
sys.exit(0 if n > 0 and all(ok) else 1)
"#;
    let mut args = vec!["-c".to_owned(), SCRIPT.to_owned()];
    for k in keys {
        args.push(k.name());
        args.push(k.txt.clone());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_peer_with_input(python, &args, message, PEER_TIMEOUT);
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("dkimpy: {}{}", out.stdout, out.stderr))
    }
}

/// OpenDKIM's verifier, inside `unshare --mount --net`: `lo` up, a
/// dnsmasq on 127.0.0.1:53 serving `keys`, and a resolv.conf naming it
/// bind-mounted over `/etc/resolv.conf`. Checks each signature of
/// `message` on its own. `None` when it cannot run here (not root, or
/// skipped peers).
fn opendkim_verify(message: &[u8], keys: &[&Key]) -> Option<Result<(), String>> {
    let testmsg = peer_program("opendkim-testmsg", "opendkim-tools")?;
    let dnsmasq = peer_program("dnsmasq", "dnsmasq-base")?;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("resolv.conf"), "nameserver 127.0.0.1\n").unwrap();
    let mut conf = String::from(
        "no-resolv\nno-hosts\nbind-interfaces\nlisten-address=127.0.0.1\nport=53\nuser=root\n",
    );
    for k in keys {
        let strings: Vec<String> = k
            .txt
            .as_bytes()
            .chunks(255)
            .map(|c| format!("\"{}\"", String::from_utf8_lossy(c)))
            .collect();
        conf.push_str(&format!("txt-record={},{}\n", k.name(), strings.join(",")));
    }
    std::fs::write(dir.path().join("dnsmasq.conf"), conf).unwrap();
    let n = signature_count(message);
    assert!(n > 0);
    for i in 0..n {
        std::fs::write(
            dir.path().join(format!("msg{i}")),
            only_signature(message, i),
        )
        .unwrap();
    }
    let script = format!(
        r#"set -e
ip link set lo up
mount --bind "$1/resolv.conf" /etc/resolv.conf
"{dnsmasq}" --keep-in-foreground --pid-file --log-facility=- --conf-file="$1/dnsmasq.conf" 2>"$1/dnsmasq.log" &
dns=$!
trap 'kill $dns' EXIT
for _ in $(seq 50); do
  grep -q started "$1/dnsmasq.log" && break || sleep 0.1
done
rc=0
for i in $(seq 0 {last}); do
  if ! "{testmsg}" < "$1/msg$i" > "$1/out$i" 2>&1; then rc=1; fi
  if [ -s "$1/out$i" ]; then rc=1; fi
done
exit $rc
"#,
        dnsmasq = dnsmasq.display(),
        testmsg = testmsg.display(),
        last = n - 1,
    );
    let script_path = dir.path().join("verify.sh");
    std::fs::write(&script_path, script).unwrap();
    let probe = Command::new("unshare")
        .args(["--mount", "--net", "true"])
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        assert!(
            std::env::var("CI").is_err(),
            "CI must be able to unshare mount and network namespaces (run as root)"
        );
        eprintln!("SKIPPED: opendkim-testmsg: cannot unshare namespaces (not root)");
        return None;
    }
    let out = run_peer(
        Path::new("/usr/bin/unshare"),
        &[
            "--mount",
            "--net",
            "/bin/sh",
            script_path.to_str().unwrap(),
            dir.path().to_str().unwrap(),
        ],
        PEER_TIMEOUT,
    );
    let outputs: Vec<String> = (0..n)
        .map(|i| std::fs::read_to_string(dir.path().join(format!("out{i}"))).unwrap_or_default())
        .collect();
    if out.status.success() {
        return Some(Ok(()));
    }
    Some(Err(format!(
        "opendkim-testmsg: {outputs:?} {}{}\ndnsmasq: {}",
        out.stdout,
        out.stderr,
        std::fs::read_to_string(dir.path().join("dnsmasq.log")).unwrap_or_default(),
    )))
}

// ---------------------------------------------------------------------------
// The server.

/// A users file with `alice` / `secret`, made by `ringmta passwd`.
fn users_file(dir: &Path) -> PathBuf {
    let out = run_peer_with_input(
        Path::new(env!("CARGO_BIN_EXE_ringmta")),
        &["passwd", "alice"],
        b"secret\n",
        PEER_TIMEOUT,
    );
    assert!(out.status.success(), "passwd: {}", out.stderr);
    let path = dir.join("users");
    std::fs::write(&path, &out.stdout).unwrap();
    path
}

/// A submission server for local domain `example.com` (alice's own address
/// is alice@example.com; the sender login map lets her send as anyone at
/// example.org and example.net), AUTH in the clear from loopback.
fn server(dir: &Path, keys: &[&Key], extra: &[&str]) -> Server {
    let map = dir.join("sender-login-map");
    std::fs::write(&map, "@example.org alice\n@example.net alice\n").unwrap();
    let mut b = Server::builder()
        .args(["--auth-failure-delay", "0", "--local-domain", "example.com"])
        .args(["--allow-plaintext-auth-on-loopback", "--users"])
        .arg(users_file(dir).to_str().unwrap())
        .arg("--sender-login-map")
        .arg(map.to_str().unwrap());
    for k in keys {
        b = b.arg("--dkim-key").arg(k.flag());
    }
    b.args(extra.iter().copied()).start()
}

/// Logs in as alice on the submission port.
fn submit(server: &Server) -> Client {
    let mut c = Client::connect(server.submission.expect("submission listener"));
    c.hello("client.example");
    let auth = base64::engine::general_purpose::STANDARD.encode(b"\0alice\0secret");
    c.expect(&format!("AUTH PLAIN {auth}"), 235);
    c
}

const RCPT: &str = "bob@elsewhere.example";

fn message(from: &str) -> String {
    format!(
        "From: {from}\r\nTo: Bob <{RCPT}>\r\nSubject: DKIM test\r\n\
         MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n\
         Hello,  world.   Trailing white space and blank lines follow:  \r\n\r\n\r\n"
    )
}

#[test]
fn submitted_mail_is_signed_and_verifies() {
    let dir = tempfile::tempdir().unwrap();
    // example.org signs twice (RSA and Ed25519, RFC 8463 3); example.net
    // with Ed25519; example.com (alice's own domain) with RSA.
    let org_rsa = keygen(dir.path(), "example.org", "r1", "rsa");
    let org_ed = keygen(dir.path(), "example.org", "e1", "ed25519");
    let net_ed = keygen(dir.path(), "example.net", "e2", "ed25519");
    let com_rsa = keygen(dir.path(), "example.com", "r3", "rsa");
    let all = [&org_rsa, &org_ed, &net_ed, &com_rsa];
    let server = server(dir.path(), &all, &["--add-sender-header"]);
    let mut c = submit(&server);

    // No Date or Message-ID: the signature covers the ones ringmta adds.
    let org_msg = message("Alice <alice@example.org>");
    let org = c.send_message("alice@example.com", &[RCPT], org_msg.as_bytes());
    let net_msg = format!(
        "Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <n1@client.example>\r\n{}",
        message("Alice <alice@EXAMPLE.NET>")
    );
    let net = c.send_message("alice@example.com", &[RCPT], net_msg.as_bytes());
    // From a domain without a key, and not alice: the Sender ringmta adds
    // (alice@example.com) has one.
    let sender_msg = message("Someone <someone@nokey.example>");
    let via_sender = c.send_message("alice@example.com", &[RCPT], sender_msg.as_bytes());
    c.expect("QUIT", 221);

    let q = server.message(&org);
    let content = String::from_utf8(q.content().to_vec()).unwrap();
    assert!(
        content.ends_with(&org_msg),
        "the content as sent follows: {content}"
    );
    assert!(
        content.starts_with(
            "DKIM-Signature: v=1; a=rsa-sha256; s=r1; d=example.org; c=relaxed/relaxed;"
        ),
        "{content}"
    );
    let added = &content[..content.len() - org_msg.len()];
    let second = added
        .find("\r\nDKIM-Signature: v=1; a=ed25519-sha256; s=e1; d=example.org;")
        .expect("the Ed25519 signature second");
    assert!(
        added[second..].contains("\r\nDate: ") && added.contains("\r\nMessage-ID: <"),
        "{added}"
    );
    let got = mail_auth_verify(&q.message, &all);
    assert_eq!(
        got,
        [
            (true, "example.org".into(), "r1".into(), "rsa-sha256".into()),
            (
                true,
                "example.org".into(),
                "e1".into(),
                "ed25519-sha256".into()
            ),
        ]
    );

    let q_net = server.message(&net);
    assert_eq!(
        mail_auth_verify(&q_net.message, &all),
        [(
            true,
            "example.net".into(),
            "e2".into(),
            "ed25519-sha256".into()
        )]
    );
    assert!(q_net.content().ends_with(net_msg.as_bytes()));

    let q_sender = server.message(&via_sender);
    let content = String::from_utf8(q_sender.content().to_vec()).unwrap();
    assert!(
        content.contains("\r\nSender: <alice@example.com>\r\n"),
        "{content}"
    );
    assert_eq!(
        mail_auth_verify(&q_sender.message, &all),
        [(true, "example.com".into(), "r3".into(), "rsa-sha256".into())]
    );

    // The verifier really checks: one changed body byte, and every
    // signature fails.
    let mut tampered = q.message.clone();
    let at = tampered.len() - 10;
    tampered[at] ^= 0x20;
    let got = mail_auth_verify(&tampered, &all);
    assert_eq!(got.len(), 2);
    assert!(got.iter().all(|(pass, ..)| !pass), "{got:?}");

    // Independent verifiers, which must see the tampering too.
    let signed = [&q.message, &q_net.message, &q_sender.message];
    if let Some(python) = dkimpy() {
        for m in signed {
            if let Err(e) = dkimpy_verify(&python, m, &all) {
                panic!("{e}\n{}", String::from_utf8_lossy(m));
            }
        }
        assert!(dkimpy_verify(&python, &tampered, &all).is_err());
    }
    for m in signed {
        match opendkim_verify(m, &all) {
            None => return,
            Some(Ok(())) => {}
            Some(Err(e)) => panic!("{e}\n{}", String::from_utf8_lossy(m)),
        }
    }
    let e = opendkim_verify(&tampered, &all)
        .expect("ran before")
        .unwrap_err();
    eprintln!("tampered, as expected: {e}");
}

#[test]
fn unsigned_without_a_key_and_on_the_relay_port() {
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path(), "example.org", "e1", "ed25519");
    let server = server(dir.path(), &[&key], &[]);

    // Submission, From a domain without a key: completed, not signed.
    let mut c = submit(&server);
    let nokey_msg = message("alice@example.com");
    let nokey = c.send_message("alice@example.com", &[RCPT], nokey_msg.as_bytes());
    // No From at all: nothing to sign for (RFC 6376 5.4: From is signed).
    let no_from = "Sender: alice@example.org\r\nSubject: s\r\n\r\nbody\r\n";
    let no_from_id = c.send_message("alice@example.com", &[RCPT], no_from.as_bytes());
    c.expect("QUIT", 221);
    for (id, sent) in [(&nokey, nokey_msg.as_str()), (&no_from_id, no_from)] {
        let q = server.message(id);
        let content = String::from_utf8(q.content().to_vec()).unwrap();
        assert!(content.ends_with(sent));
        assert!(content.starts_with("Date: "), "{content}");
        assert_eq!(signature_count(&q.message), 0, "{content}");
    }

    // Relay port, From the signing domain: byte for byte what was sent.
    let mut c = server.connect();
    c.hello("mx.elsewhere.example");
    let relayed = message("alice@example.org");
    let id = c.send_message(
        "alice@example.org",
        &["postmaster@example.com"],
        relayed.as_bytes(),
    );
    c.expect("QUIT", 221);
    assert_eq!(server.message(&id).content(), relayed.as_bytes());
}

/// Regression (issue 11, defect 7): any `From:` domain with a key was
/// signed, whoever logged in, so alice could send DKIM-aligned mail as
/// bob. Now a signature is made only for an author the login may send as;
/// anyone else at a signed domain is refused (the default) or stored
/// unsigned.
#[test]
fn dkim_signs_only_from_addresses_the_login_may_send_as() {
    let dir = tempfile::tempdir().unwrap();
    let com = keygen(dir.path(), "example.com", "c1", "ed25519");
    let org = keygen(dir.path(), "example.org", "o1", "ed25519");
    let keys = [&com, &org];
    let server = server(dir.path(), &keys, &[]);
    let mut c = submit(&server);

    // Her own address, and one the sender login map grants: signed.
    let own = c.send_message(
        "alice@example.com",
        &[RCPT],
        message("Alice <alice@example.com>").as_bytes(),
    );
    let granted = c.send_message(
        "alice@example.com",
        &[RCPT],
        message("sales@example.org").as_bytes(),
    );
    // bob at her own (signed) domain; bob hidden behind a display name that
    // shows alice; bob next to alice; an unreadable From naming the domain.
    for from in [
        "Bob <bob@example.com>",
        "\"alice@example.com\" <bob@example.com>",
        "alice@example.com, bob@example.com",
        "=?utf-8?q?x<alice@example.com>?= <bob@example.com",
    ] {
        c.expect("MAIL FROM:<alice@example.com>", 250);
        c.expect(&format!("RCPT TO:<{RCPT}>"), 250);
        c.expect("DATA", 354);
        c.send(&common::dot_stuff(message(from).as_bytes()));
        let r = c.reply();
        assert_eq!(r.code, 550, "From: {from}: {r}");
        assert!(r.to_string().contains("5.7.1"), "{r}");
    }
    // The session stays in sync and usable.
    let after = c.send_message(
        "alice@example.com",
        &[RCPT],
        message("alice@example.com").as_bytes(),
    );
    c.expect("QUIT", 221);
    assert_eq!(server.queued().len(), 3, "the refused messages were stored");
    for (id, key) in [
        (&own, "example.com"),
        (&granted, "example.org"),
        (&after, "example.com"),
    ] {
        let got = mail_auth_verify(&server.message(id).message, &keys);
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(got[0].0 && got[0].1 == key, "{got:?}");
    }
    assert!(server.wait_for_log("refused by policy", Duration::from_secs(10)));

    // --dkim-from-mismatch unsigned: stored, without any signature.
    let dir2 = tempfile::tempdir().unwrap();
    let server = self::server(dir2.path(), &keys, &["--dkim-from-mismatch", "unsigned"]);
    let mut c = submit(&server);
    let sent = message("Bob <bob@example.com>");
    let id = c.send_message("alice@example.com", &[RCPT], sent.as_bytes());
    c.expect("QUIT", 221);
    let q = server.message(&id);
    assert_eq!(signature_count(&q.message), 0);
    assert!(q.content().ends_with(sent.as_bytes()));
}

#[test]
fn sighup_reloads_keys_and_keeps_one_that_does_not_load() {
    let dir = tempfile::tempdir().unwrap();
    let old = keygen(dir.path(), "example.org", "s1", "ed25519");
    let server = server(dir.path(), &[&old], &[]);
    let send = || {
        let mut c = submit(&server);
        let id = c.send_message(
            "alice@example.com",
            &[RCPT],
            message("a@example.org").as_bytes(),
        );
        c.expect("QUIT", 221);
        server.message(&id).message
    };
    let passes = |m: &[u8], k: &Key| mail_auth_verify(m, &[k]).iter().all(|(pass, ..)| *pass);
    assert!(passes(&send(), &old));

    // A new key in the same file (same selector, as after a rotation).
    let new_dir = dir.path().join("new");
    std::fs::create_dir(&new_dir).unwrap();
    let mut new = keygen(&new_dir, "example.org", "s1", "rsa");
    std::fs::rename(&new.path, &old.path).unwrap();
    new.path = old.path.clone();
    server.signal(libc::SIGHUP);
    assert!(server.wait_for_log("DKIM keys reloaded", Duration::from_secs(10)));
    let m = send();
    assert!(passes(&m, &new), "signed with the new key");
    assert!(!passes(&m, &old));

    // A file that does not load: the key in force stays.
    std::fs::write(&old.path, "not a key\n").unwrap();
    server.signal(libc::SIGHUP);
    assert!(server.wait_for_log("DKIM key NOT reloaded", Duration::from_secs(10)));
    assert!(passes(&send(), &new));
}

#[test]
fn a_key_that_does_not_load_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.pem");
    std::fs::write(
        &bad,
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let err = Server::builder()
        .arg("--dkim-key")
        .arg(format!("example.org:s:{}", bad.display()))
        .try_start()
        .err()
        .expect("does not start");
    assert!(err.to_string().contains("DKIM key"), "{err}");
    let err = Server::builder()
        .args(["--dkim-key", "example.org:s:/nonexistent/key.pem"])
        .try_start()
        .err()
        .expect("does not start");
    assert!(err.to_string().contains("/nonexistent/key.pem"), "{err}");
}

/// `--dkim-relay-network on`: mail from a `--relay-network` client on the
/// relay port (swaks, an application injecting on port 25) is signed for
/// its From: domain, and dkimpy and mail-auth accept the signature; with
/// the flag off (the default) the same message stays byte for byte what
/// was sent. Mail injected over HTTP is signed by the same rule.
#[test]
fn relay_network_mail_is_signed_when_asked() {
    let Some(swaks) = peer_program("swaks", "swaks") else {
        return;
    };
    let Some(python) = dkimpy() else { return };
    let dir = tempfile::tempdir().unwrap();
    let rsa = keygen(dir.path(), "example.org", "r1", "rsa");
    let ed = keygen(dir.path(), "example.org", "e1", "ed25519");
    let keys = [&rsa, &ed];
    let file = dir.path().join("message.eml");
    let sent = message("App <app@example.org>");
    // swaks ends the data with CRLF . CRLF itself.
    std::fs::write(&file, &sent.as_bytes()[..sent.len() - 2]).unwrap();
    let via_swaks = |server: &Server| -> Vec<u8> {
        let port = server.port.to_string();
        let data = format!("@{}", file.display());
        let args = [
            "--server",
            "127.0.0.1",
            "--port",
            &port,
            "--helo",
            "app.example",
            "--from",
            "app@example.org",
            "--to",
            RCPT,
            "--data",
            &data,
            "--timeout",
            "10",
        ];
        let run = run_peer(&swaks, &args, PEER_TIMEOUT);
        assert!(run.status.success(), "swaks: {}{}", run.stdout, run.stderr);
        let q = server.newest().expect("queued");
        assert!(run.stdout.contains(&q.id), "{}", run.stdout);
        q.content().to_vec()
    };
    let start = |on: &str| {
        let mut b =
            Server::builder().args(["--relay-network", "127.0.0.0/8", "--dkim-relay-network", on]);
        for k in keys {
            b = b.arg("--dkim-key").arg(k.flag());
        }
        b.start()
    };

    let off = start("off");
    assert_eq!(via_swaks(&off), sent.as_bytes(), "unsigned, byte for byte");

    let on = start("on");
    let signed = via_swaks(&on);
    assert_eq!(
        signature_count(&signed),
        2,
        "{}",
        String::from_utf8_lossy(&signed)
    );
    assert!(signed.ends_with(sent.as_bytes()), "only added in front");
    dkimpy_verify(&python, &signed, &keys).unwrap();
    let got = mail_auth_verify(&signed, &keys);
    assert_eq!(got.len(), 2);
    assert!(got.iter().all(|(pass, ..)| *pass), "{got:?}");

    // HTTP injection on the same server: signed by the same rule.
    let call = serde_json::json!({
        "mail_from": "app@example.org",
        "recipients": [RCPT],
        "content": {"from": "App <app@example.org>", "subject": "Grüße", "text": "héllo\n", "html": "<p>hi</p>"}
    });
    let curl = peer_program("curl", "curl").expect("curl");
    let url = format!("http://{}/v1/inject", on.admin.unwrap());
    let body = call.to_string();
    let out = run_peer(&curl, &["-sS", "--data-binary", &body, &url], PEER_TIMEOUT);
    assert!(out.status.success(), "{}", out.stderr);
    let answer: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let id = answer["messages"][0]["id"]
        .as_str()
        .expect(&out.stdout)
        .to_owned();
    let injected = on.message(&id).content().to_vec();
    assert_eq!(
        signature_count(&injected),
        2,
        "{}",
        String::from_utf8_lossy(&injected)
    );
    dkimpy_verify(&python, &injected, &keys).unwrap();
}
