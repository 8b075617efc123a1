//! Where credentials travel in a request: cookies and bearer tokens. Shared
//! so control and the gateways read them exactly alike.

use http::header::{AUTHORIZATION, COOKIE};
use http::HeaderMap;

/// The value of cookie `name`, from any `Cookie` header.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_and_bearer_tokens_are_found() {
        let mut headers = HeaderMap::new();
        headers.append(COOKIE, "a=1; oc_s=tok".parse().unwrap());
        headers.append(COOKIE, "b=2".parse().unwrap());
        headers.insert(AUTHORIZATION, "Bearer  v1.x ".parse().unwrap());
        assert_eq!(cookie(&headers, "oc_s"), Some("tok"));
        assert_eq!(cookie(&headers, "b"), Some("2"));
        assert_eq!(cookie(&headers, "oc"), None);
        assert_eq!(bearer(&headers), Some("v1.x"));
        headers.insert(AUTHORIZATION, "token abc".parse().unwrap());
        assert_eq!(bearer(&headers), None);
    }
}
