//! The cookies control sets on the platform origin and reads back: the
//! platform login cookie (its name is the protocol's, shared with the
//! gateway, which strips it) and the pre-login CSRF cookie. Every cookie is
//! HttpOnly, SameSite=Lax, path `/`, and Secure when configured.

use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::Response;
use axum_extra::extract::cookie::{Cookie, SameSite};
use opencloud_protocol::credentials;
use opencloud_protocol::names;
use opencloud_protocol::token;

use crate::app::App;

/// Binds the CSRF token of a browser that is not logged in (`__Host-` on
/// https, like the platform cookie).
fn csrf_cookie_name(https: bool) -> &'static str {
    if https {
        "__Host-oc_csrf"
    } else {
        "oc_csrf"
    }
}

fn platform_cookie_name(app: &App) -> &'static str {
    names::platform_cookie(app.config.secure_cookies)
}

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
    cookie_header(app, platform_cookie_name(app), token, Some(age))
}

/// `Set-Cookie` that removes the platform cookie.
pub fn clear_platform_cookie(app: &App) -> HeaderValue {
    cookie_header(
        app,
        platform_cookie_name(app),
        String::new(),
        Some(time::Duration::ZERO),
    )
}

/// `Set-Cookie` for a new pre-login CSRF binding (a browser session cookie).
pub fn csrf_cookie(app: &App, binding: String) -> HeaderValue {
    cookie_header(
        app,
        csrf_cookie_name(app.config.secure_cookies),
        binding,
        None,
    )
}

/// The platform token the browser's cookie carries.
pub fn platform_token<'h>(app: &App, headers: &'h HeaderMap) -> Option<&'h str> {
    credentials::cookie(headers, platform_cookie_name(app))
}

/// The pre-login CSRF binding the browser's cookie carries.
pub fn csrf_binding<'h>(app: &App, headers: &'h HeaderMap) -> Option<&'h str> {
    credentials::cookie(headers, csrf_cookie_name(app.config.secure_cookies))
}

/// Adds the cookies the request's context decided on to the answer. A
/// handler that set the platform cookie itself (login, logout) wins.
pub fn append(app: &App, response: &mut Response, cookies: Vec<HeaderValue>) {
    append_for(app.config.secure_cookies, response, cookies)
}

fn append_for(https: bool, response: &mut Response, mut cookies: Vec<HeaderValue>) {
    if response.headers().contains_key(header::SET_COOKIE) {
        let platform = format!("{}=", names::platform_cookie(https));
        cookies.retain(|c| !c.as_bytes().starts_with(platform.as_bytes()));
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
        append_for(false, &mut untouched, decided());
        assert_eq!(
            set_cookies(&untouched),
            ["oc_session=renewed", "oc_csrf=fresh"]
        );

        let mut logged_out = Response::default();
        logged_out
            .headers_mut()
            .insert(header::SET_COOKIE, HeaderValue::from_static("oc_session="));
        append_for(false, &mut logged_out, decided());
        assert_eq!(set_cookies(&logged_out), ["oc_session=", "oc_csrf=fresh"]);

        // On https the names carry `__Host-`, and the rule follows them.
        let mut on_https = Response::default();
        on_https.headers_mut().insert(
            header::SET_COOKIE,
            HeaderValue::from_static("__Host-oc_session="),
        );
        append_for(
            true,
            &mut on_https,
            vec![HeaderValue::from_static("__Host-oc_session=renewed")],
        );
        assert_eq!(set_cookies(&on_https), ["__Host-oc_session="]);
    }
}
