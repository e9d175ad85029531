//! Taking a header field out of a received message: the intake removes the
//! control fields meant for ringmta alone (`X-Ringmta-Pool`) before the
//! message is signed, checked or stored, so they never reach the next hop.
//!
//! Pure byte work on the header section (up to the first empty line); the
//! content after it is never looked at, and nothing is copied when the
//! field is absent.

use memchr::memmem;

/// Removes every `name:` field (any case, folded lines included) from the
/// header section of `body` and returns the first one's value, unfolded
/// and trimmed; `None` (and `body` untouched) when there is none.
pub fn take(body: &mut Vec<u8>, name: &str) -> Option<String> {
    let end = header_end(body)?;
    let mut first: Option<String> = None;
    let mut spans: Vec<(usize, usize)> = Vec::new();
    let mut at = 0;
    while at < end {
        // One field: this line and the continuation lines after it.
        let mut e = at;
        loop {
            match memmem::find(&body[e..end], b"\r\n") {
                Some(i) => e += i + 2,
                None => e = end,
            }
            if e >= end || !matches!(body[e], b' ' | b'\t') {
                break;
            }
        }
        let field = &body[at..e];
        if let Some(value) = value_of(field, name.as_bytes()) {
            if first.is_none() {
                let unfolded: Vec<u8> = value
                    .iter()
                    .copied()
                    .filter(|&b| b != b'\r' && b != b'\n')
                    .collect();
                first = Some(String::from_utf8_lossy(&unfolded).trim().to_owned());
            }
            spans.push((at, e));
        }
        at = e;
    }
    for &(s, e) in spans.iter().rev() {
        body.drain(s..e);
    }
    first
}

/// Where the header section ends (after the CRLF of its last field), or
/// `None` when the message does not start with a header field.
fn header_end(body: &[u8]) -> Option<usize> {
    let name_len = body
        .iter()
        .take_while(|&&b| (33..=126).contains(&b) && b != b':')
        .count();
    if name_len == 0 || body.get(name_len) != Some(&b':') {
        return None;
    }
    Some(memmem::find(body, b"\r\n\r\n").map_or(body.len(), |i| i + 2))
}

/// The value of `field` when its name is `name` (RFC 5322 allows
/// white space before the colon in the obsolete syntax: accepted here, so
/// that it cannot be used to slip the field past the intake).
fn value_of<'a>(field: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    let head = field.get(..name.len())?;
    if !head.eq_ignore_ascii_case(name) {
        return None;
    }
    let rest = &field[name.len()..];
    let ws = rest
        .iter()
        .take_while(|&&b| matches!(b, b' ' | b'\t'))
        .count();
    (rest.get(ws) == Some(&b':')).then(|| &rest[ws + 1..])
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAME: &str = "X-Ringmta-Pool";

    #[test]
    fn takes_every_instance_and_keeps_the_rest() {
        let mut body = b"Subject: hi\r\nx-ringmta-pool: bulk \r\nFrom: a@b.test\r\nX-Ringmta-Pool : other\r\n\r\nX-Ringmta-Pool: in the body\r\n".to_vec();
        assert_eq!(take(&mut body, NAME).as_deref(), Some("bulk"));
        assert_eq!(
            body,
            b"Subject: hi\r\nFrom: a@b.test\r\n\r\nX-Ringmta-Pool: in the body\r\n"
        );
    }

    #[test]
    fn folded_values_are_unfolded_and_removed_whole() {
        let mut body = b"X-Ringmta-Pool:\r\n  vip\r\nSubject: s\r\n\r\nbody".to_vec();
        assert_eq!(take(&mut body, NAME).as_deref(), Some("vip"));
        assert_eq!(body, b"Subject: s\r\n\r\nbody");
    }

    #[test]
    fn absent_or_lookalike_fields_change_nothing() {
        for text in [
            &b"Subject: s\r\nX-Ringmta-Pools: x\r\n\r\nbody"[..],
            b"\r\nX-Ringmta-Pool: x\r\n",
            b"no header section\r\nX-Ringmta-Pool: x\r\n\r\n",
            b"",
        ] {
            let mut body = text.to_vec();
            assert_eq!(take(&mut body, NAME), None);
            assert_eq!(body, text);
        }
    }

    #[test]
    fn last_field_of_a_header_without_body() {
        let mut body = b"Subject: s\r\nX-Ringmta-Pool: a".to_vec();
        assert_eq!(take(&mut body, NAME).as_deref(), Some("a"));
        assert_eq!(body, b"Subject: s\r\n");
    }
}
