//! What the gateway changes in a request it forwards: the client's
//! hop-by-hop fields go, the forwarding chain comes in, and on a session
//! origin the platform's credentials never reach the session.

use std::net::IpAddr;

use bytes::BytesMut;
use http::{header, HeaderMap, HeaderName, HeaderValue};
use opencloud_protocol::credentials;
use opencloud_protocol::names::{self, ALL_PLATFORM_COOKIES};
use pingora::{Error, ErrorType, OrErr, Result};

use crate::class::Class;

// Built at compile time: `from_static` checks every byte when it runs.
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static(names::FORWARDED_FOR);
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static(names::FORWARDED_PROTO);
/// More `Connection` tokens than a client has reason to send.
const MAX_CONNECTION_NOMINATIONS: usize = 10;

/// What the gateway changes in a request it forwards.
pub struct Forwarding {
    pub class: Class,
    pub client_ip: Option<IpAddr>,
    pub https: bool,
    /// The client spoke HTTP/1.1, the only version a WebSocket handshake
    /// is forwarded for.
    pub http11: bool,
}

impl Forwarding {
    pub fn apply(&self, headers: &mut HeaderMap) -> Result<()> {
        strip_hop_by_hop(headers, self.http11)?;
        headers.reserve(3);
        if let Some(ip) = self.client_ip {
            // Control believes the chain only from its gateways; a session
            // sees the client as this gateway saw it.
            let earlier = (self.class == Class::Platform)
                .then(|| headers.get(&X_FORWARDED_FOR)?.to_str().ok())
                .flatten();
            let forwarded = match earlier {
                Some(earlier) => HeaderValue::from_str(&format!("{earlier}, {ip}"))
                    .or_err(ErrorType::InvalidHTTPHeader, "x-forwarded-for")?,
                None => ip_header_value(ip),
            };
            headers.insert(X_FORWARDED_FOR, forwarded);
        }
        headers.insert(
            X_FORWARDED_PROTO,
            HeaderValue::from_static(if self.https { "https" } else { "http" }),
        );
        if self.class == Class::Session {
            strip_cookies(headers, &ALL_PLATFORM_COOKIES)?;
            // The browser's bearer token is for the gateway alone; the
            // session trusts its link, not credentials.
            headers.remove(header::AUTHORIZATION);
        }
        Ok(())
    }
}

/// The `name=value` pairs of every `Cookie` header.
fn cookie_pairs(headers: &HeaderMap) -> impl Iterator<Item = &[u8]> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .flat_map(|v| credentials::cookie_pairs(v.as_bytes()))
}

/// Removes the given cookies, keeping the others. Headers without them are
/// left alone.
fn strip_cookies(headers: &mut HeaderMap, names: &[&str]) -> Result<()> {
    let stripped = |pair: &[u8]| {
        let name = pair.split(|b| *b == b'=').next().unwrap_or_default();
        names.iter().any(|n| n.as_bytes() == name)
    };
    // One pass decides; a second builds the header only when some of the
    // cookies stay and some go.
    let (mut strip, mut keep) = (0, 0);
    for pair in cookie_pairs(headers) {
        if stripped(pair) {
            strip += 1;
        } else {
            keep += pair.len() + 2;
        }
    }
    if strip == 0 {
        return Ok(());
    }
    if keep == 0 {
        headers.remove(header::COOKIE);
        return Ok(());
    }
    let mut kept = BytesMut::with_capacity(keep);
    for pair in cookie_pairs(headers).filter(|pair| !stripped(pair)) {
        if !kept.is_empty() {
            kept.extend_from_slice(b"; ");
        }
        kept.extend_from_slice(pair);
    }
    let value = HeaderValue::from_maybe_shared(kept.freeze())
        .or_err(ErrorType::InvalidHTTPHeader, "cookie")?;
    headers.insert(header::COOKIE, value);
    Ok(())
}

/// Request fields about the client's connection to the gateway, never
/// about the gateway's own connection upstream (the list Pingora's standard
/// request policy strips).
fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "http2-settings"
    )
}

/// Does what Pingora's standard upstream request policy does, which the
/// gateway turns off on its peers: drops hop-by-hop fields and the fields
/// `Connection` nominates, refuses nominations that would hide where a
/// request came from, and forwards a WebSocket handshake as
/// `Connection: Upgrade` + `Upgrade: websocket`. Pingora removes ten names
/// from two maps on every request (some 3 600 instructions); a request
/// without any of them costs one look at each name here.
fn strip_hop_by_hop(headers: &mut HeaderMap, http11: bool) -> Result<()> {
    if !headers.keys().any(is_hop_by_hop) {
        return Ok(());
    }
    let present: Vec<HeaderName> = headers
        .keys()
        .filter(|n| is_hop_by_hop(n))
        .cloned()
        .collect();
    let websocket = http11
        && headers
            .get(header::UPGRADE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    for name in connection_nominations(headers)?.iter().chain(&present) {
        headers.remove(name);
    }
    if websocket {
        headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    }
    Ok(())
}

/// The fields `Connection` names, checked as Pingora checks them: a bounded
/// number of valid tokens, none naming a pseudo-header, `Host` or a
/// forwarding field.
fn connection_nominations(headers: &HeaderMap) -> Result<Vec<HeaderName>> {
    let refuse =
        |why: &'static str| Err(Error::explain(ErrorType::InvalidHTTPHeader, why).into_down());
    let mut names = Vec::new();
    let tokens = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty());
    for (count, token) in tokens.enumerate() {
        if count + 1 >= MAX_CONNECTION_NOMINATIONS {
            return refuse("too many tokens in the Connection header");
        }
        if token.starts_with(b":") || !token.iter().all(|b| is_token_char(*b)) {
            return refuse("the Connection header names something that is not a header");
        }
        let Ok(name) = HeaderName::from_bytes(token) else {
            return refuse("the Connection header names something that is not a header");
        };
        if matches!(
            name.as_str(),
            "host" | names::FORWARDED_FOR | "x-forwarded-host" | names::FORWARDED_PROTO
        ) {
            return refuse("the Connection header may not name Host or X-Forwarded-* headers");
        }
        names.push(name);
    }
    Ok(names)
}

/// A `tchar` of an HTTP token (RFC 9110 5.6.2).
fn is_token_char(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte)
}

/// `ip` as a header value; IPv4, the usual case, without `fmt`.
fn ip_header_value(ip: IpAddr) -> HeaderValue {
    let IpAddr::V4(v4) = ip else {
        return HeaderValue::from_str(&ip.to_string()).expect("an address is a valid value");
    };
    let mut text = [0u8; 15];
    let mut len = 0;
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            text[len] = b'.';
            len += 1;
        }
        if octet >= 100 {
            text[len] = b'0' + octet / 100;
            len += 1;
        }
        if octet >= 10 {
            text[len] = b'0' + octet / 10 % 10;
            len += 1;
        }
        text[len] = b'0' + octet % 10;
        len += 1;
    }
    HeaderValue::from_bytes(&text[..len]).expect("digits and dots")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platform_and_session_cookies_are_stripped_and_others_kept() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "cookie",
            "oc_s=x; _xsrf=abc; oc_session=y; __Host-oc_s=z; theme=dark; __Host-oc_session=w"
                .parse()
                .unwrap(),
        );
        strip_cookies(&mut headers, &ALL_PLATFORM_COOKIES).unwrap();
        assert_eq!(headers["cookie"], "_xsrf=abc; theme=dark");
    }

    #[test]
    fn a_request_without_those_cookies_keeps_its_cookie_header() {
        let mut headers = HeaderMap::new();
        headers.insert("cookie", "_xsrf=abc; oc_sx=1".parse().unwrap());
        strip_cookies(&mut headers, &ALL_PLATFORM_COOKIES).unwrap();
        assert_eq!(headers["cookie"], "_xsrf=abc; oc_sx=1");
        headers.insert("cookie", "oc_s=x".parse().unwrap());
        strip_cookies(&mut headers, &ALL_PLATFORM_COOKIES).unwrap();
        assert!(headers.get("cookie").is_none());
    }

    #[test]
    fn addresses_become_header_values_as_display_writes_them() {
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.30.40",
            "255.255.255.255",
            "100.9.99.199",
            "::1",
            "2001:db8::8a2e:370:7334",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(ip_header_value(ip), ip.to_string().as_str());
        }
    }

    #[test]
    fn hop_by_hop_and_nominated_fields_go_and_the_rest_stays() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("connection", "keep-alive, X-Secret"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("proxy-authorization", "Basic eDp5"),
            ("te", "trailers"),
            ("trailer", "x-sum"),
            ("http2-settings", "AAMAAABkAAQAAP__"),
            ("upgrade", "h2c"),
            ("x-secret", "1"),
            ("accept", "*/*"),
        ] {
            headers.append(name, value.parse().unwrap());
        }
        strip_hop_by_hop(&mut headers, true).unwrap();
        assert_eq!(headers.len(), 1, "{headers:?}");
        assert_eq!(headers["accept"], "*/*");
    }

    #[test]
    fn a_websocket_handshake_is_forwarded_in_its_plain_form() {
        let mut headers = HeaderMap::new();
        headers.insert("connection", "keep-alive, Upgrade".parse().unwrap());
        headers.insert("upgrade", "WebSocket".parse().unwrap());
        headers.insert(
            "sec-websocket-key",
            "dGhlIHNhbXBsZSBub25jZQ==".parse().unwrap(),
        );
        let mut http10 = headers.clone();
        strip_hop_by_hop(&mut headers, true).unwrap();
        assert_eq!(headers["connection"], "Upgrade");
        assert_eq!(headers["upgrade"], "websocket");
        assert!(headers.contains_key("sec-websocket-key"));
        strip_hop_by_hop(&mut http10, false).unwrap();
        assert!(
            !http10.contains_key("upgrade"),
            "no WebSocket over HTTP/1.0"
        );
    }

    #[test]
    fn connection_may_not_hide_where_a_request_came_from() {
        for value in [
            "close, Host",
            "X-Forwarded-For",
            "x-forwarded-proto",
            "X-Forwarded-Host",
            ":authority",
            "\"x-forwarded-for\"",
            "a, b, c, d, e, f, g, h, i, j",
        ] {
            let mut headers = HeaderMap::new();
            headers.insert("connection", value.parse().unwrap());
            let refused = strip_hop_by_hop(&mut headers, true).unwrap_err();
            assert_eq!(refused.etype(), &ErrorType::InvalidHTTPHeader, "{value}");
            assert_eq!(
                refused.esource(),
                &pingora::ErrorSource::Downstream,
                "{value}"
            );
        }
        let mut headers = HeaderMap::new();
        headers.insert("connection", "a, b, c, d, e, f, g, h, i".parse().unwrap());
        assert!(
            strip_hop_by_hop(&mut headers, true).is_ok(),
            "nine are fine"
        );
    }

    fn browser_headers() -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("authorization", "Bearer platform-token".parse().unwrap());
        headers.insert("x-forwarded-for", "203.0.113.9".parse().unwrap());
        headers.insert("cookie", "oc_s=c; _xsrf=x".parse().unwrap());
        headers.insert("accept", "*/*".parse().unwrap());
        headers
    }

    #[test]
    fn a_session_request_carries_no_platform_credentials() {
        let mut headers = browser_headers();
        Forwarding {
            class: Class::Session,
            client_ip: Some("10.0.0.7".parse().unwrap()),
            https: true,
            http11: true,
        }
        .apply(&mut headers)
        .unwrap();
        assert_eq!(headers.get("authorization"), None);
        assert_eq!(headers["x-forwarded-for"], "10.0.0.7");
        assert_eq!(headers["x-forwarded-proto"], "https");
        assert_eq!(headers["cookie"], "_xsrf=x");
        assert_eq!(headers["accept"], "*/*");
        assert_eq!(headers.len(), 4);
    }

    #[test]
    fn a_platform_request_extends_the_forwarded_chain_and_keeps_its_credentials() {
        let mut headers = browser_headers();
        Forwarding {
            class: Class::Platform,
            client_ip: Some("10.0.0.7".parse().unwrap()),
            https: false,
            http11: true,
        }
        .apply(&mut headers)
        .unwrap();
        assert_eq!(headers["authorization"], "Bearer platform-token");
        assert_eq!(headers["x-forwarded-for"], "203.0.113.9, 10.0.0.7");
        assert_eq!(headers["x-forwarded-proto"], "http");
        assert_eq!(headers["cookie"], "oc_s=c; _xsrf=x");
    }
}
