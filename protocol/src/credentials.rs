//! Where credentials travel in a request: cookies and bearer tokens. Shared
//! so control and the gateways read them exactly alike.

use http::header::{AUTHORIZATION, COOKIE};
use http::HeaderMap;

/// The value of cookie `name`, from any `Cookie` header. The gateway looks
/// up a cookie on every request, so this works on bytes.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    std::str::from_utf8(cookie_bytes(headers, name)?).ok()
}

/// Like [`cookie`], without checking that the value is text (a cache
/// keyed by the bytes need not look at them twice).
pub fn cookie_bytes<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a [u8]> {
    headers.get_all(COOKIE).iter().find_map(|header| {
        cookie_pairs(header.as_bytes())
            .find_map(|pair| pair.strip_prefix(name.as_bytes())?.strip_prefix(b"="))
    })
}

/// The `name=value` pairs of one `Cookie` header, trimmed, empty ones
/// skipped.
pub fn cookie_pairs(header: &[u8]) -> impl Iterator<Item = &[u8]> {
    split_at_byte(header, b';')
        .map(<[u8]>::trim_ascii)
        .filter(|pair| !pair.is_empty())
}

/// The pieces of `bytes` between occurrences of `separator`, found with
/// memchr (the request path splits cookies and header lines).
pub fn split_at_byte(bytes: &[u8], separator: u8) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(bytes);
    std::iter::from_fn(move || {
        let current = rest?;
        let (piece, next) = match memchr::memchr(separator, current) {
            Some(at) => (&current[..at], Some(&current[at + 1..])),
            None => (current, None),
        };
        rest = next;
        Some(piece)
    })
}

/// The token of `Authorization: Bearer <token>`.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

/// Whether `headers` carry `Authorization: Bearer <key>`. The key is
/// compared without stopping at the first differing byte, so the time taken
/// says nothing about how much of a guess was right.
pub fn bearer_is(headers: &HeaderMap, key: &str) -> bool {
    bearer(headers).is_some_and(|presented| {
        presented.len() == key.len()
            && presented
                .bytes()
                .zip(key.bytes())
                .fold(0u8, |diff, (a, b)| diff | (a ^ b))
                == 0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bearer_key_matches_only_itself() {
        let mut headers = HeaderMap::new();
        assert!(!bearer_is(&headers, "key"));
        headers.insert(AUTHORIZATION, "Bearer key".parse().unwrap());
        assert!(bearer_is(&headers, "key"));
        assert!(!bearer_is(&headers, "ke"));
        assert!(!bearer_is(&headers, "kez"));
        assert!(!bearer_is(&headers, "key2"));
    }

    #[test]
    fn cookies_and_bearer_tokens_are_found() {
        let mut headers = HeaderMap::new();
        headers.append(
            COOKIE,
            "xoc_s=no; oc_s_x=no; a=1;  oc_s=tok ".parse().unwrap(),
        );
        headers.append(COOKIE, "b=2".parse().unwrap());
        headers.insert(AUTHORIZATION, "Bearer  v1.x ".parse().unwrap());
        assert_eq!(cookie(&headers, "oc_s"), Some("tok"));
        assert_eq!(cookie(&headers, "b"), Some("2"));
        assert_eq!(cookie(&headers, "oc"), None);
        assert_eq!(bearer(&headers), Some("v1.x"));
        headers.insert(AUTHORIZATION, "token abc".parse().unwrap());
        assert_eq!(bearer(&headers), None);
    }

    #[test]
    fn cookie_pairs_are_trimmed_and_empty_ones_skipped() {
        let pairs: Vec<&[u8]> = cookie_pairs(b" a=1;;b=2 ; ; c").collect();
        assert_eq!(pairs, [&b"a=1"[..], b"b=2", b"c"]);
        assert_eq!(cookie_pairs(b"").count(), 0);
        assert_eq!(cookie_pairs(b" ; ").count(), 0);
        let pieces: Vec<&[u8]> = split_at_byte(b"a\nb\n", b'\n').collect();
        assert_eq!(pieces, [&b"a"[..], b"b", b""]);
    }
}
