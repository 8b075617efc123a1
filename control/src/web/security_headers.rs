//! The security headers on every answer control sends, pages and JSON
//! alike: a Content-Security-Policy that allows only control's own files
//! (no inline script or style), no framing, no MIME sniffing, and no
//! referrer beyond the platform's own origin.

use axum::extract::State;
use axum::http::header::{
    CONTENT_SECURITY_POLICY, REFERRER_POLICY, X_CONTENT_TYPE_OPTIONS, X_FRAME_OPTIONS,
};
use axum::http::HeaderValue;
use axum::response::Response;

use crate::config::Config;

/// The headers, built once from the config.
#[derive(Clone)]
pub struct SecurityHeaders {
    policy: HeaderValue,
}

impl SecurityHeaders {
    pub fn new(config: &Config) -> Self {
        // Forms post to the platform only, but Open answers with a redirect
        // to the session's origin, and browsers hold redirects after a form
        // to `form-action` too.
        let sessions = config.session_domain.origin(config.secure_cookies, "*");
        let policy = format!(
            "default-src 'self'; object-src 'none'; frame-ancestors 'none'; \
             base-uri 'none'; form-action 'self' {sessions}"
        );
        Self {
            policy: HeaderValue::try_from(policy)
                .expect("a session domain is a valid header value"),
        }
    }
}

/// Adds the headers to `response`, keeping any a handler set itself.
pub async fn add(State(headers): State<SecurityHeaders>, mut response: Response) -> Response {
    let h = response.headers_mut();
    h.entry(CONTENT_SECURITY_POLICY).or_insert(headers.policy);
    h.entry(X_FRAME_OPTIONS)
        .or_insert(HeaderValue::from_static("DENY"));
    h.entry(X_CONTENT_TYPE_OPTIONS)
        .or_insert(HeaderValue::from_static("nosniff"));
    h.entry(REFERRER_POLICY)
        .or_insert(HeaderValue::from_static("same-origin"));
    response
}
