//! Criterion benchmark of DKIM verification as the inbound checks run it
//! (`ringmta::inbound`): mail-auth parsing the message, hashing the body
//! and headers, and one RSA-2048 or Ed25519 signature check, the key
//! answered from the parsed-record cache (no DNS: what a shard's DNS
//! thread does for a domain it has seen). This is the CPU a verified
//! message costs on top of intake, to decide where it runs.
//!
//! `cargo bench --bench inbound_auth -- --warm-up-time 1 --measurement-time 3`
//!
//! `Throughput::Elements` = verified messages.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use mail_auth::common::parse::TxtRecordParser;
use mail_auth::common::verify::DomainKey;
use mail_auth::Txt;
use mail_auth::{
    AuthenticatedMessage, DkimResult, MessageAuthenticator, Parameters, ResolverCache,
};

use ringmta::inbound::dns::TtlCache;
use ringmta::server::dkim::{generate, KeyAlgorithm, Signer};

criterion_group!(benches, verify);
criterion_main!(benches);

fn message(size: usize) -> Vec<u8> {
    let mut m = b"From: <a@bench.test>\r\nTo: <u@dest.test>\r\nSubject: bench\r\n\
Date: Wed, 02 Dec 2026 10:00:00 +0000\r\nMessage-ID: <1@bench.test>\r\n\r\n"
        .to_vec();
    while m.len() < size {
        m.extend_from_slice(
            b"line of body text, seventy-six characters long, give or take a few.\r\n",
        );
    }
    m
}

fn verify(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // Lookups never happen: every key is in the cache.
    let auth = rt.block_on(async { MessageAuthenticator::new_cloudflare().unwrap() });
    let mut g = c.benchmark_group("dkim_verify");
    g.throughput(Throughput::Elements(1));
    for (name, alg) in [
        ("rsa2048", KeyAlgorithm::Rsa),
        ("ed25519", KeyAlgorithm::Ed25519),
    ] {
        let key = generate(alg, 2048).unwrap();
        let signer = Signer::from_pem("bench.test", "s", key.private_pem.as_bytes()).unwrap();
        let cache: TtlCache<Box<str>, Txt> = TtlCache::default();
        let dk = DomainKey::parse(key.txt_value().as_bytes()).unwrap();
        cache.insert(
            "s._domainkey.bench.test.".into(),
            Txt::DomainKey(Arc::new(dk)),
            Instant::now() + Duration::from_secs(3600),
        );
        for size in [1 << 10, 10 << 10, 100 << 10] {
            let body = message(size);
            let mut signed = signer.sign(&[&body]).unwrap().into_bytes();
            signed.extend_from_slice(&body);
            g.bench_with_input(BenchmarkId::new(name, size), &signed, |b, m| {
                b.iter(|| {
                    let msg = AuthenticatedMessage::parse(m).unwrap();
                    let out =
                        rt.block_on(auth.verify_dkim(Parameters::new(&msg).with_txt_cache(&cache)));
                    assert_eq!(out[0].result(), &DkimResult::Pass);
                })
            });
        }
    }
    g.finish();
}
