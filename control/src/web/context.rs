//! The middleware in front of every platform page and API call. In order:
//! authenticate the caller, renew a cookie past half its life (or clear one
//! that names no live login), bind the CSRF token and check the request
//! against the CSRF rules, hand the context (`Ctx`) to the handler, and
//! turn a page's "log in first" into a redirect to the login page.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};

use super::auth::{self, Ctx};
use super::errors::{is_api_path, respond_error};
use super::{cookies, csrf};
use crate::app::App;
use crate::clock::now_unix;

pub async fn platform_context(State(app): State<App>, request: Request, next: Next) -> Response {
    let (mut parts, body) = request.into_parts();
    let peer = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    let client_ip = auth::client_ip(&app, peer, &parts.headers);
    let is_api = is_api_path(parts.uri.path());
    let mut set_cookies: Vec<HeaderValue> = Vec::new();

    let caller = match auth::authenticate(&app, &parts.headers, now_unix()).await {
        Ok(caller) => caller,
        Err(e) => return respond_error(is_api, e),
    };
    if caller.stale_cookie {
        set_cookies.push(cookies::clear_platform_cookie(&app));
    }
    set_cookies.extend(auth::renew_past_half_life(&app, &caller).await);

    let (binding, csrf_cookie) =
        csrf::binding(&app, &parts.headers, caller.login_session.as_deref());
    set_cookies.extend(csrf_cookie);
    let csrf = csrf::token_for(&app, &binding);
    let body = match csrf::check(&app, &parts, body, is_api, caller.from_cookie, &csrf).await {
        Ok(body) => body,
        Err(refusal) => {
            let mut response = respond_error(is_api, refusal.error);
            if refusal.with_cookies {
                cookies::append(&app, &mut response, set_cookies);
            }
            return response;
        }
    };

    let user_agent = parts
        .headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    parts.extensions.insert(Ctx {
        user: caller.user,
        login_session: caller.login_session,
        client_ip,
        csrf,
        user_agent,
    });
    let wanted = parts
        .uri
        .path_and_query()
        .map(|pq| pq.as_str().to_owned())
        .unwrap_or_default();
    let navigation = !is_api && parts.method == Method::GET;
    let mut response = next.run(Request::from_parts(parts, body)).await;
    if navigation {
        response = login_redirect(response, &wanted);
    }
    cookies::append(&app, &mut response, set_cookies);
    response
}

/// A page that needs a login sends the browser to log in, then back to
/// `wanted`.
fn login_redirect(response: Response, wanted: &str) -> Response {
    if response.status() != StatusCode::UNAUTHORIZED {
        return response;
    }
    let target = serde_urlencoded::to_string([("next", wanted)]).unwrap_or_default();
    Redirect::to(&format!("/login?{target}")).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_that_needs_a_login_sends_the_browser_to_log_in_and_back() {
        let refused = StatusCode::UNAUTHORIZED.into_response();
        let redirect = login_redirect(refused, "/projects/3?x=1");
        assert_eq!(redirect.status(), StatusCode::SEE_OTHER);
        assert_eq!(
            redirect.headers()[header::LOCATION],
            "/login?next=%2Fprojects%2F3%3Fx%3D1"
        );
        let fine = login_redirect(StatusCode::OK.into_response(), "/projects");
        assert_eq!(fine.status(), StatusCode::OK);
    }
}
