//! The optional plain-HTTP listener of a TLS gateway: every request is sent
//! to the same path on https, except ACME HTTP-01 challenges, which are
//! answered from the state directory. Only the platform's own names are
//! redirected: an unknown `Host` gets a 404, never a redirect to wherever
//! it points.

use std::path::PathBuf;

use async_trait::async_trait;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use crate::pages::{page, OWN_ANSWER_HEADERS};
use opencloud_protocol::origin::SessionDomain;
use opencloud_protocol::sid::is_valid_sid;

/// Where ACME HTTP-01 answers wait, under the state directory: one file per
/// token, holding its key authorization.
pub const CHALLENGES_DIR: &str = "acme-challenges";

const CHALLENGE_PREFIX: &str = "/.well-known/acme-challenge/";

pub struct HttpsRedirect {
    /// `host[:port]` of the platform origin (what `Location` names).
    pub platform_host: String,
    pub session_domain: SessionDomain,
    /// `{state_dir}/acme-challenges`.
    pub challenges: PathBuf,
}

/// The host part of `host[:port]`, lower case.
fn host_only(host: &str) -> String {
    host.rsplit_once(':')
        .map_or(host, |(h, _)| h)
        .to_ascii_lowercase()
}

/// What the plain listener answers.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// 308 to this https URL.
    Redirect(String),
    /// 200 with a challenge's key authorization.
    Challenge(Vec<u8>),
    /// 404 with this message.
    NotFound(&'static str),
}

impl HttpsRedirect {
    /// The answer for a request naming `host` (its `Host` header) and
    /// `target` (path and query).
    pub fn answer(&self, host: &str, target: &str) -> Answer {
        if let Some(token) = target.strip_prefix(CHALLENGE_PREFIX) {
            return self.challenge(token);
        }
        // Only an origin-form target: an absolute one would name a host.
        if !target.starts_with('/') || target.starts_with("//") {
            return Answer::NotFound("not a path");
        }
        let host = host_only(host);
        if host == host_only(&self.platform_host) {
            return Answer::Redirect(format!("https://{}{target}", self.platform_host));
        }
        let sessions = host_only(self.session_domain.as_str());
        match host
            .strip_suffix(sessions.as_str())
            .and_then(|rest| rest.strip_suffix('.'))
        {
            Some(sid) if is_valid_sid(sid) => {
                Answer::Redirect(format!("{}{target}", self.session_domain.origin(true, sid)))
            }
            _ => Answer::NotFound("no such site here"),
        }
    }

    fn challenge(&self, token: &str) -> Answer {
        // RFC 8555 tokens are base64url; nothing else may name a file.
        let valid = !token.is_empty()
            && token.len() <= 128
            && token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !valid {
            return Answer::NotFound("no such challenge");
        }
        match std::fs::read(self.challenges.join(token)) {
            Ok(answer) => Answer::Challenge(answer),
            Err(_) => Answer::NotFound("no such challenge"),
        }
    }
}

#[async_trait]
impl ServeHttp for HttpsRedirect {
    async fn response(&self, session: &mut ServerSession) -> http::Response<Vec<u8>> {
        let req = session.req_header();
        let host = req
            .headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("");
        let target = req.uri.path_and_query().map_or("/", |pq| pq.as_str());
        let mut response = http::Response::builder();
        for (name, value) in OWN_ANSWER_HEADERS {
            response = response.header(name, value);
        }
        let (response, body) = match self.answer(host, target) {
            Answer::Redirect(location) => (
                response
                    .status(308)
                    .header(http::header::LOCATION, location),
                Vec::new(),
            ),
            Answer::Challenge(body) => (
                response
                    .status(200)
                    .header(http::header::CONTENT_TYPE, "application/octet-stream"),
                body,
            ),
            Answer::NotFound(message) => (
                response
                    .status(404)
                    .header(http::header::CONTENT_TYPE, "text/html; charset=utf-8"),
                page("Not found", message, None).into_bytes(),
            ),
        };
        response
            .header(http::header::CONTENT_LENGTH, body.len())
            .body(body)
            .expect("the answer's headers are valid")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redirect() -> HttpsRedirect {
        let challenges =
            std::env::temp_dir().join(format!("oc-acme-challenges-{}", std::process::id()));
        std::fs::create_dir_all(&challenges).unwrap();
        HttpsRedirect {
            platform_host: "app.example.com".into(),
            session_domain: SessionDomain::parse("nb.example.com").unwrap(),
            challenges,
        }
    }

    #[test]
    fn the_platform_and_session_origins_go_to_the_same_path_on_https() {
        let r = redirect();
        assert_eq!(
            r.answer("app.example.com", "/projects?x=1"),
            Answer::Redirect("https://app.example.com/projects?x=1".into())
        );
        assert_eq!(
            r.answer("APP.example.com:80", "/"),
            Answer::Redirect("https://app.example.com/".into())
        );
        let sid = opencloud_protocol::sid::new_sid();
        assert_eq!(
            r.answer(&format!("{sid}.nb.example.com"), "/lab"),
            Answer::Redirect(format!("https://{sid}.nb.example.com/lab"))
        );
    }

    #[test]
    fn other_hosts_and_targets_are_never_redirected() {
        let r = redirect();
        for (host, target) in [
            ("evil.example", "/"),
            ("app.example.com.evil.example", "/"),
            ("x.nb.example.com", "/"),
            ("a.b.nb.example.com", "/"),
            ("app.example.com", "//evil.example/"),
            ("app.example.com", "http://evil.example/"),
        ] {
            assert!(
                matches!(r.answer(host, target), Answer::NotFound(_)),
                "{host} {target}"
            );
        }
    }

    #[test]
    fn challenges_are_served_from_their_files_and_nothing_else_is() {
        let r = redirect();
        std::fs::write(r.challenges.join("tok-EN_1"), b"tok-EN_1.thumb").unwrap();
        assert_eq!(
            r.answer("anything", "/.well-known/acme-challenge/tok-EN_1"),
            Answer::Challenge(b"tok-EN_1.thumb".to_vec())
        );
        for token in ["missing", "../keys.toml", "a/b", "", "%2e%2e"] {
            assert!(matches!(
                r.answer("app.example.com", &format!("{CHALLENGE_PREFIX}{token}")),
                Answer::NotFound(_)
            ));
        }
    }
}
