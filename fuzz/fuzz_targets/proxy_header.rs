//! The PROXY protocol header parser (`smtp::proxy::parse`) on arbitrary
//! input, as the driver feeds it: the bytes received so far, growing.
//!
//! Checked, for every prefix of the input:
//! * no panic;
//! * the answer is "need more" until it is decided, and once decided
//!   (a header of `len` octets, or an error) it stays the same for every
//!   longer prefix: how the input is split into reads changes nothing;
//! * a header is at most `MAX_HEADER` octets (`MAX_V1` for version 1), and
//!   the parser never needs more than `MAX_HEADER` octets to decide;
//! * an error is never decided later than a header could have been.

#![no_main]

use libfuzzer_sys::fuzz_target;
use ringmta::smtp::proxy::{parse, Parsed, MAX_HEADER, MAX_V1};

fuzz_target!(|data: &[u8]| {
    let data = &data[..data.len().min(MAX_HEADER + 64)];
    let mut decided = None;
    for k in 0..=data.len() {
        let p = parse(&data[..k]);
        match (&decided, &p) {
            (None, Ok(Parsed::NeedMore)) => {
                assert!(k < MAX_HEADER, "still undecided at {k} octets");
            }
            (None, _) => decided = Some(p),
            (Some(d), _) => assert_eq!(d, &p, "decided, then changed at {k}"),
        }
        if let Ok(Parsed::Done { len, .. }) = p {
            assert!(len <= k && len <= MAX_HEADER);
            if data.first() == Some(&b'P') {
                assert!(len <= MAX_V1);
            }
        }
    }
});
