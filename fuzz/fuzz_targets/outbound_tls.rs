//! The parsers of what outbound TLS security reads from peers: MTA-STS
//! policies (`relay::mta_sts::Policy::parse`), `_mta-sts` TXT records
//! (`txt_id`), the policy server's HTTP answer (`http_body`), and the DER
//! walk to a certificate's public key that DANE's SPKI selector uses
//! (`relay::tls::spki`).
//!
//! Checked: no panic; a parsed policy names MX hosts unless its mode is
//! `none` and keeps `max_age` within a year; a TXT id is 1 to 32
//! letters and digits; an HTTP body is at most 64 KiB; a key found is a
//! DER SEQUENCE inside the input; every parse is deterministic.

#![no_main]

use libfuzzer_sys::fuzz_target;
use ringmta::relay::mta_sts::{http_body, txt_id, Mode, Policy, MAX_AGE_LIMIT, MAX_POLICY};
use ringmta::relay::tls::spki;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let parsed = Policy::parse(&text);
    assert_eq!(parsed, Policy::parse(&text));
    if let Ok(p) = &parsed {
        assert!(p.max_age <= MAX_AGE_LIMIT);
        assert!(p.mode == Mode::None || !p.mx.is_empty());
        for host in text.split(['\n', ' ']).take(16) {
            let _ = p.matches(host);
        }
    }
    if let Some(id) = txt_id(text.split('\0')) {
        assert!(!id.is_empty() && id.len() <= 32);
        assert!(id.bytes().all(|b| b.is_ascii_alphanumeric()));
    }
    for closed in [false, true] {
        if let Ok(body) = http_body(data, closed) {
            assert!(body.len() <= MAX_POLICY);
        }
    }
    if let Some(key) = spki(data) {
        assert_eq!(key.first(), Some(&0x30));
        let start = key.as_ptr() as usize - data.as_ptr() as usize;
        assert!(start + key.len() <= data.len());
    }
});
