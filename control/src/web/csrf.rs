//! Cross-site request forgery rules for the platform origin. Every change
//! (any method but GET, HEAD, OPTIONS) must come from our Origin (or carry
//! none); forms must also carry the token bound to the login session (or,
//! before login, to the CSRF cookie); JSON changes authenticated by cookie
//! must be `application/json`, which a cross-site form cannot send.

use axum::body::Body;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, Method};
use opencloud_protocol::token;
use subtle::ConstantTimeEq;

use super::cookies;
use super::extract::BODY_LIMIT;
use crate::app::App;
use crate::error::AppError;
use crate::ids;

/// The form field that carries the token.
const CSRF_FIELD: &str = "csrf";

/// What the token is bound to: the login session, else the browser's CSRF
/// cookie, else a fresh one, returned with the cookie that sets it.
pub fn binding(
    app: &App,
    headers: &HeaderMap,
    login_session: Option<&str>,
) -> (String, Option<HeaderValue>) {
    match login_session {
        Some(id) => (id.to_owned(), None),
        None => match cookies::csrf_binding(app, headers) {
            Some(value) if value.len() >= 16 => (value.to_owned(), None),
            _ => {
                let fresh = ids::random_id();
                let cookie = cookies::csrf_cookie(app, fresh.clone());
                (fresh, Some(cookie))
            }
        },
    }
}

/// The token forms bound to `binding` must carry.
pub fn token_for(app: &App, binding: &str) -> String {
    token::derive(&app.config.keys, "csrf", binding)
}

fn origin_allowed(app: &App, headers: &HeaderMap) -> bool {
    match headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        None => true,
        Some(origin) => origin.eq_ignore_ascii_case(&app.config.public_origin),
    }
}

/// JSON, or a zip upload: types a cross-site form cannot send.
fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';').next().is_some_and(|m| {
                let m = m.trim();
                m.eq_ignore_ascii_case("application/json")
                    || m.eq_ignore_ascii_case("application/zip")
            })
        })
}

/// A page's multipart upload form (My projects' zip upload).
fn is_file_upload(parts: &Parts) -> bool {
    let multipart = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';')
                .next()
                .is_some_and(|m| m.trim().eq_ignore_ascii_case("multipart/form-data"))
        });
    let path = parts.uri.path();
    multipart && path.starts_with("/projects/") && path.ends_with(UPLOAD_SUFFIX)
}

/// Where upload forms post: `/projects/{id}` and this.
pub const UPLOAD_SUFFIX: &str = "/files/upload";

/// True when a form's `sent` token is `csrf` (for the upload form, whose
/// body [`check`] does not read).
pub fn token_matches(sent: &str, csrf: &str) -> bool {
    bool::from(sent.as_bytes().ct_eq(csrf.as_bytes()))
}

/// The refusal of a form with a wrong token.
pub fn expired_form() -> AppError {
    AppError::Forbidden(
        "This form has expired or did not come from OpenCloud. Go back, reload the page and try again.".into(),
    )
}

/// A change refused by the rules.
pub struct Refusal {
    pub error: AppError,
    /// The form's token was wrong: the answer still sets the cookies the
    /// request's context decided on, so the reloaded form works.
    pub with_cookies: bool,
}

impl Refusal {
    fn plain(error: AppError) -> Self {
        Self {
            error,
            with_cookies: false,
        }
    }
}

/// Checks a request against the rules; a form's body is read to find the
/// token and handed back for the handler.
pub async fn check(
    app: &App,
    parts: &Parts,
    body: Body,
    is_api: bool,
    from_cookie: bool,
    csrf: &str,
) -> Result<Body, Refusal> {
    let unsafe_method = !matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS);
    if !unsafe_method {
        return Ok(body);
    }
    if !origin_allowed(app, &parts.headers) {
        return Err(Refusal::plain(AppError::Forbidden(
            "This request came from another site and was refused.".into(),
        )));
    }
    if is_api {
        if from_cookie && !is_json(&parts.headers) {
            return Err(Refusal::plain(AppError::UnsupportedMediaType));
        }
        return Ok(body);
    }
    if is_file_upload(parts) {
        // Too large to read here: the handler checks the token, the form's
        // first field, before it reads the file.
        return Ok(body);
    }
    let bytes = match axum::body::to_bytes(body, BODY_LIMIT).await {
        Ok(bytes) => bytes,
        Err(_) => return Err(Refusal::plain(AppError::PayloadTooLarge)),
    };
    let sent = serde_urlencoded::from_bytes::<Vec<(String, String)>>(&bytes)
        .ok()
        .and_then(|fields| {
            fields
                .into_iter()
                .find(|(k, _)| k == CSRF_FIELD)
                .map(|(_, v)| v)
        });
    let valid = sent.is_some_and(|sent| token_matches(&sent, csrf));
    if !valid {
        return Err(Refusal {
            error: expired_form(),
            with_cookies: true,
        });
    }
    Ok(Body::from(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_json_counts_as_json() {
        let typed = |value: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(value));
            is_json(&headers)
        };
        assert!(typed("application/json"));
        assert!(typed("Application/JSON; charset=utf-8"));
        assert!(!typed("text/plain"));
        assert!(!typed("application/x-www-form-urlencoded"));
        assert!(!is_json(&HeaderMap::new()));
    }
}
