//! The two kinds of origin OpenCloud serves, as control and the gateways
//! read them from their configs: the platform origin (`public_url`) and the
//! session domain under which every session has an origin of its own,
//! `{scheme}://{sid}.{session_domain}`. Both configs validate them here, so
//! a domain one part accepts is never one the other refuses.
//!
//! Invariants of a parsed value: lower case; the platform origin is
//! `http(s)://host[:port]` without a trailing slash; the session domain is
//! DNS labels with an optional port, short enough that a sid label still
//! fits in a DNS name; the two never share a host.

use std::fmt;

/// The keys both config files give these values under.
const PUBLIC_URL: &str = "public_url";
const SESSION_DOMAIN: &str = "session_domain";

/// The platform origin, e.g. `http://localhost:8080`: where users log in
/// and where the gateway sends everything that is not a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlatformOrigin {
    /// `http(s)://host[:port]`, lower case.
    text: String,
    /// Where the host starts in `text` (after `://`).
    host_at: usize,
}

impl PlatformOrigin {
    /// `http(s)://host[:port]` with an optional trailing slash, nothing
    /// else. The error says what is wrong with `url`, for the config reader
    /// to put next to the file and key.
    pub fn parse(url: &str) -> Result<Self, String> {
        let trimmed = url.trim_end_matches('/');
        let rest = trimmed
            .strip_prefix("http://")
            .or_else(|| trimmed.strip_prefix("https://"))
            .ok_or_else(|| format!("`{url}` must start with http:// or https://"))?;
        if rest.is_empty() || rest.contains(['/', '?', '#', '@', ' ']) {
            return Err(format!(
                "`{url}` must be a bare origin like https://opencloud.example (no path)"
            ));
        }
        Ok(Self {
            host_at: trimmed.len() - rest.len(),
            text: trimmed.to_ascii_lowercase(),
        })
    }

    /// `http://localhost:8080`: scheme, host and port, no trailing slash.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// `localhost:8080`: the `Host` header a request for this origin carries.
    pub fn host(&self) -> &str {
        &self.text[self.host_at..]
    }

    /// Whether users reach OpenCloud over TLS (and so every session origin
    /// too, and cookies are `Secure`).
    pub fn https(&self) -> bool {
        self.text.starts_with("https://")
    }
}

/// The domain sessions live under, e.g. `nb.localhost:8080`: session `sid`
/// is served at `{scheme}://{sid}.{session_domain}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionDomain(String);

impl SessionDomain {
    /// `host[:port]`: DNS labels of letters, digits and hyphens, lower-cased;
    /// no scheme, path or leading dot. The error says what is wrong with
    /// `raw`, for the config reader to put next to the file and key.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let domain = raw.trim().to_ascii_lowercase();
        let example = "like nb.example.com or nb.localhost:8080 (no scheme, path or leading dot)";
        if domain.contains("://") {
            return Err(format!(
                "`{raw}` must be a host name without a scheme, {example}"
            ));
        }
        let (host, port) = match domain.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (domain.as_str(), None),
        };
        if let Some(port) = port {
            if !port.parse::<u16>().is_ok_and(|p| p > 0) {
                return Err(format!("`{raw}` has a bad port; use a host name {example}"));
            }
        }
        let label_ok = |label: &str| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        };
        // A sid label (26 characters) plus a dot must still fit in a DNS name.
        if host.is_empty() || host.len() > 253 - 27 || !host.split('.').all(label_ok) {
            return Err(format!("`{raw}` must be a host name {example}"));
        }
        Ok(Self(domain))
    }

    /// `nb.localhost:8080`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `{scheme}://{sid}.{session_domain}`: where session `sid` is served.
    pub fn origin(&self, https: bool, sid: &str) -> String {
        let scheme = if https { "https" } else { "http" };
        format!("{scheme}://{sid}.{}", self.0)
    }

    /// What a lower-case `Host` header names before `.{session_domain}`
    /// (for a session origin, its sid; the caller checks that it is one),
    /// or `None` for a host outside the session domain. Byte slices, no
    /// allocation: the gateway asks this for every request.
    #[inline]
    pub fn session_label<'h>(&self, host: &'h [u8]) -> Option<&'h [u8]> {
        host.strip_suffix(self.0.as_bytes())
            .and_then(|rest| rest.strip_suffix(b"."))
    }

    /// Whether `origin` (an `Origin` header's value) is session `sid`'s
    /// own, `{scheme}://{sid}.{session_domain}`, ignoring ASCII case. Byte
    /// slices, no allocation: the gateway asks this for every change made
    /// with a session cookie.
    pub fn is_origin_of(&self, https: bool, sid: &[u8], origin: &[u8]) -> bool {
        let scheme: &[u8] = if https { b"https://" } else { b"http://" };
        let domain = self.0.as_bytes();
        if origin.len() != scheme.len() + sid.len() + 1 + domain.len() {
            return false;
        }
        let (head, rest) = origin.split_at(scheme.len());
        let (label, rest) = rest.split_at(sid.len());
        head.eq_ignore_ascii_case(scheme)
            && label.eq_ignore_ascii_case(sid)
            && rest[0] == b'.'
            && rest[1..].eq_ignore_ascii_case(domain)
    }
}

impl fmt::Display for SessionDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Both origins of one OpenCloud, validated together: sessions need an
/// origin of their own, so the session domain may not be the platform's host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origins {
    /// From `public_url`.
    pub platform: PlatformOrigin,
    /// From `session_domain`.
    pub sessions: SessionDomain,
}

/// A `public_url` or `session_domain` that was refused: the key it came
/// from (both configs use the same keys) and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginError {
    /// `public_url` or `session_domain`.
    pub key: &'static str,
    /// What is wrong, quoting the value.
    pub message: String,
}

impl Origins {
    /// Parses both config values (see [`PlatformOrigin::parse`] and
    /// [`SessionDomain::parse`]) and checks they name different hosts.
    pub fn parse(public_url: &str, session_domain: &str) -> Result<Self, OriginError> {
        let refused = |key: &'static str| move |message: String| OriginError { key, message };
        let platform = PlatformOrigin::parse(public_url).map_err(refused(PUBLIC_URL))?;
        let sessions = SessionDomain::parse(session_domain).map_err(refused(SESSION_DOMAIN))?;
        if platform.host() == sessions.as_str() {
            return Err(refused(SESSION_DOMAIN)(
                "must differ from the host of public_url (sessions need their own origin)".into(),
            ));
        }
        Ok(Self { platform, sessions })
    }

    /// `{scheme}://{sid}.{session_domain}`, with the platform's scheme.
    pub fn session_origin(&self, sid: &str) -> String {
        self.sessions.origin(self.platform.https(), sid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn session_domains_are_host_names_with_an_optional_port() {
        assert_eq!(
            SessionDomain::parse("NB.localhost:8080").unwrap().as_str(),
            "nb.localhost:8080"
        );
        assert_eq!(
            SessionDomain::parse("nb.example.com").unwrap().as_str(),
            "nb.example.com"
        );
        for bad in [
            "",
            "http://nb.example.com",
            ".nb.example.com",
            "nb.example.com/x",
            "nb.example.com:0",
            "nb.example.com:99999",
            "nb..example.com",
            "nb_x.example.com",
            "-nb.example.com",
            "nb.example.com:",
            "user@nb.example.com",
        ] {
            assert!(SessionDomain::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn a_session_domain_leaves_room_for_a_sid_label() {
        let label = "a".repeat(63);
        let longest = [label.as_str(); 3].join(".") + "." + &"b".repeat(226 - 3 * 64);
        assert_eq!(longest.len(), 226);
        assert!(SessionDomain::parse(&longest).is_ok());
        assert!(SessionDomain::parse(&format!("{longest}b")).is_err());
        assert!(SessionDomain::parse(&"a".repeat(64)).is_err(), "label > 63");
    }

    #[test]
    fn platform_origins_are_bare_http_origins() {
        assert!(
            PlatformOrigin::parse("HTTP://x").is_err(),
            "the scheme is compared as written"
        );
        let origin = PlatformOrigin::parse("https://OpenCloud.Example:8443/").unwrap();
        assert_eq!(origin.as_str(), "https://opencloud.example:8443");
        assert_eq!(origin.host(), "opencloud.example:8443");
        assert!(origin.https());
        let origin = PlatformOrigin::parse("http://127.0.0.1:8080").unwrap();
        assert_eq!(origin.host(), "127.0.0.1:8080");
        assert!(!origin.https());
        for bad in [
            "",
            "localhost:8080",
            "ftp://x",
            "http://",
            "https://x.example/app",
            "http://x?y",
            "http://x#y",
            "http://user@x",
            "http://x y",
        ] {
            assert!(PlatformOrigin::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn sessions_need_an_origin_of_their_own() {
        let err = Origins::parse("http://localhost:8080", "LOCALHOST:8080").unwrap_err();
        assert_eq!(err.key, "session_domain");
        let err = Origins::parse("http://localhost:8080/x", "nb.localhost:8080").unwrap_err();
        assert_eq!(err.key, "public_url");
        let err = Origins::parse("http://localhost:8080", "nb.localhost:0").unwrap_err();
        assert_eq!(err.key, "session_domain");
        let origins = Origins::parse("http://localhost:8080", "nb.localhost:8080").unwrap();
        assert_eq!(
            origins.session_origin("abc"),
            "http://abc.nb.localhost:8080"
        );
        let origins = Origins::parse("https://cloud.example", "nb.example").unwrap();
        assert_eq!(origins.session_origin("abc"), "https://abc.nb.example");
    }

    #[test]
    fn a_session_host_is_recognised_by_its_suffix() {
        let domain = SessionDomain::parse("nb.localhost:8080").unwrap();
        assert_eq!(
            domain.session_label(b"abc.nb.localhost:8080"),
            Some(&b"abc"[..])
        );
        assert_eq!(domain.session_label(b"nb.localhost:8080"), None);
        assert_eq!(domain.session_label(b"abcnb.localhost:8080"), None);
        assert_eq!(domain.session_label(b"abc.nb.localhost:8081"), None);
        assert_eq!(domain.session_label(b"localhost:8080"), None);
    }

    #[test]
    fn only_a_sessions_own_origin_is_its_origin() {
        let domain = SessionDomain::parse("nb.localhost:8080").unwrap();
        let own = |origin: &str| domain.is_origin_of(false, b"abc", origin.as_bytes());
        assert!(own("http://abc.nb.localhost:8080"));
        assert!(own("HTTP://ABC.nb.Localhost:8080"));
        for foreign in [
            "",
            "null",
            "http://abd.nb.localhost:8080",
            "http://xabc.nb.localhost:8080",
            "http://nb.localhost:8080",
            "http://localhost:8080",
            "https://abc.nb.localhost:8080",
            "http://abc.nb.localhost:8081",
            "http://abc.nb.localhost:8080/",
            "http://abc.nb.localhost:808",
            "http://abc.nb.localhost:8080.evil.example",
            "http://abc-nb.localhost:8080",
            "http://abcxnb.localhost:8080",
        ] {
            assert!(!own(foreign), "{foreign:?} counted as the session's own");
        }
        assert!(domain.is_origin_of(true, b"abc", b"https://abc.nb.localhost:8080"));
        assert!(!domain.is_origin_of(true, b"abc", b"http://abc.nb.localhost:8080"));
    }

    proptest! {
        /// Every session's origin as built is its own, and no other
        /// session's: the check and the builder agree.
        #[test]
        fn a_built_origin_is_its_sessions_own_and_no_others(
            https: bool,
            sid in "[a-z0-9]{26}",
            other in "[a-z0-9]{26}",
        ) {
            let domain = SessionDomain::parse("nb.example.com").unwrap();
            let origin = domain.origin(https, &sid);
            prop_assert!(domain.is_origin_of(https, sid.as_bytes(), origin.as_bytes()));
            prop_assert!(!domain.is_origin_of(!https, sid.as_bytes(), origin.as_bytes()));
            prop_assert_eq!(
                domain.is_origin_of(https, other.as_bytes(), origin.as_bytes()),
                other == sid
            );
        }

        /// Whatever the parser accepts, a session origin built on it is
        /// recognised again, and its sid comes back out.
        #[test]
        fn a_built_session_origin_names_its_sid(
            labels in proptest::collection::vec("[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", 1..4),
            port in proptest::option::of(1u16..),
            sid in "[a-z0-9]{26}",
        ) {
            let raw = match port {
                Some(port) => format!("{}:{port}", labels.join(".")),
                None => labels.join("."),
            };
            let domain = SessionDomain::parse(&raw).unwrap();
            prop_assert_eq!(domain.as_str(), raw.as_str());
            let origin = domain.origin(false, &sid);
            let host = origin.strip_prefix("http://").unwrap();
            prop_assert_eq!(domain.session_label(host.as_bytes()), Some(sid.as_bytes()));
        }

        /// The parser never panics, and what it accepts is lower case,
        /// trimmed and free of anything but host and port characters.
        #[test]
        fn accepted_domains_are_plain_host_names(raw in "\\PC{0,40}") {
            if let Ok(domain) = SessionDomain::parse(&raw) {
                prop_assert!(domain
                    .as_str()
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.:".contains(&b)));
            }
        }
    }
}
