//! The cookies control sets on the platform origin and reads back: the
//! platform login cookie (its name is the protocol's, shared with the
//! gateway, which strips it) and the pre-login CSRF cookie. Every cookie is
//! HttpOnly, SameSite=Lax, path `/`, and Secure when configured.

use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::Response;
use axum_extra::extract::cookie::{Cookie, SameSite};
use opencloud_protocol::credentials;
use opencloud_protocol::names::PLATFORM_COOKIE;
use opencloud_protocol::token;

use crate::app::App;

/// Binds the CSRF token of a browser that is not logged in.
const CSRF_COOKIE: &str = "oc_csrf";

fn cookie_header(
    app: &App,
    name: &str,
    value: String,
    max_age: Option<time::Duration>,
) -> HeaderValue {
    let mut cookie = Cookie::build((name.to_owned(), value))
        .path("/")
        .http_only(true)
        .same_site(SameSite::Lax)
        .secure(app.config.secure_cookies);
    if let Some(age) = max_age {
        cookie = cookie.max_age(age);
    }
    HeaderValue::from_str(&cookie.build().to_string()).expect("cookie values are ASCII")
}

/// `Set-Cookie` for a fresh platform token.
pub fn platform_cookie(app: &App, token: String) -> HeaderValue {
    let age = time::Duration::seconds(token::PLATFORM_TOKEN_SECONDS as i64);
    cookie_header(app, PLATFORM_COOKIE, token, Some(age))
}

/// `Set-Cookie` that removes the platform cookie.
pub fn clear_platform_cookie(app: &App) -> HeaderValue {
    cookie_header(
        app,
        PLATFORM_COOKIE,
        String::new(),
        Some(time::Duration::ZERO),
    )
}

/// `Set-Cookie` for a new pre-login CSRF binding (a browser session cookie).
pub fn csrf_cookie(app: &App, binding: String) -> HeaderValue {
    cookie_header(app, CSRF_COOKIE, binding, None)
}

/// The platform token the browser's cookie carries.
pub fn platform_token(headers: &HeaderMap) -> Option<&str> {
    credentials::cookie(headers, PLATFORM_COOKIE)
}

/// The pre-login CSRF binding the browser's cookie carries.
pub fn csrf_binding(headers: &HeaderMap) -> Option<&str> {
    credentials::cookie(headers, CSRF_COOKIE)
}

/// Adds the cookies the request's context decided on to the answer. A
/// handler that set the platform cookie itself (login, logout) wins.
pub fn append(response: &mut Response, mut cookies: Vec<HeaderValue>) {
    if response.headers().contains_key(header::SET_COOKIE) {
        cookies.retain(|c| !c.as_bytes().starts_with(PLATFORM_COOKIE.as_bytes()));
    }
    for cookie in cookies {
        response.headers_mut().append(header::SET_COOKIE, cookie);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set_cookies(response: &Response) -> Vec<&str> {
        response
            .headers()
            .get_all(header::SET_COOKIE)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect()
    }

    #[test]
    fn a_platform_cookie_the_handler_set_wins() {
        let decided = || {
            vec![
                HeaderValue::from_static("oc_session=renewed"),
                HeaderValue::from_static("oc_csrf=fresh"),
            ]
        };
        let mut untouched = Response::default();
        append(&mut untouched, decided());
        assert_eq!(
            set_cookies(&untouched),
            ["oc_session=renewed", "oc_csrf=fresh"]
        );

        let mut logged_out = Response::default();
        logged_out
            .headers_mut()
            .insert(header::SET_COOKIE, HeaderValue::from_static("oc_session="));
        append(&mut logged_out, decided());
        assert_eq!(set_cookies(&logged_out), ["oc_session=", "oc_csrf=fresh"]);
    }
}
