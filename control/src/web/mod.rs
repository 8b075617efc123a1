//! The HTTP layer: routers, the request context every handler sees, and the
//! extractors that turn bad input into our error type. Handlers here only
//! parse input and render output; the domain modules do the work.

mod admin;
mod agent;
mod api;
mod internal;
mod pages;

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use axum::body::Body;
use axum::extract::rejection::{FormRejection, JsonRejection, QueryRejection};
use axum::extract::{
    ConnectInfo, DefaultBodyLimit, FromRequest, FromRequestParts, MatchedPath, Request, State,
};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Form, Json, Router};
use axum_extra::extract::cookie::{Cookie, SameSite};
use opencloud_protocol::credentials;
use opencloud_protocol::token::{self, Claims, TokenKind};
use serde::de::DeserializeOwned;
use subtle::ConstantTimeEq;

use crate::accounts::{self, User};
use crate::error::{ApiError, AppError, PageError};
pub use crate::now_unix;
use crate::App;

/// Requests larger than this are refused with 413.
pub const BODY_LIMIT: usize = 1 << 20;

pub const SESSION_COOKIE: &str = "oc_session";
const CSRF_COOKIE: &str = "oc_csrf";
const CSRF_FIELD: &str = "csrf";

pub fn public_router(app: App) -> Router {
    let platform = Router::new()
        .merge(pages::routes())
        .merge(admin::routes())
        .nest("/api/v1", api::routes())
        .route("/healthz", get(healthz))
        .route("/static/style.css", get(stylesheet))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .route_layer(middleware::from_fn(track_metrics))
        .layer(middleware::from_fn_with_state(
            app.clone(),
            platform_context,
        ));
    // Agents authenticate with their HostKey: no cookies, so no CSRF rules.
    let agents = Router::new()
        .nest("/agent/v1", agent::routes())
        .route_layer(middleware::from_fn(track_metrics));
    Router::new()
        .merge(agents)
        .merge(platform)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(app)
}

/// Internal reports (host health of 100 000 hosts) are larger than what
/// browsers send.
pub const INTERNAL_BODY_LIMIT: usize = 16 << 20;

pub fn internal_router(app: App) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .nest("/internal/v1", internal::routes())
        .fallback(|| async { ApiError(AppError::NotFound("page")) })
        .method_not_allowed_fallback(|request: Request| async move {
            ApiError(AppError::MethodNotAllowed(request.method().to_string()))
        })
        .layer(DefaultBodyLimit::max(INTERNAL_BODY_LIMIT))
        .with_state(app)
}

async fn metrics(State(app): State<App>) -> impl IntoResponse {
    let pool = app.pool.metrics();
    let open = pool
        .connection_count
        .load(std::sync::atomic::Ordering::Relaxed);
    let idle = pool
        .connections_in_pool
        .load(std::sync::atomic::Ordering::Relaxed);
    metrics::gauge!("opencloud_db_pool_connections", "state" => "idle").set(idle as f64);
    metrics::gauge!("opencloud_db_pool_connections", "state" => "in_use")
        .set(open.saturating_sub(idle) as f64);
    metrics::gauge!("opencloud_db_pool_max").set(app.config.pool_max as f64);
    // Sessions and hosts by state, read at scrape time.
    if let Ok(counts) = crate::sessions::count_by_state(&app.pool).await {
        set_state_gauges(
            "opencloud_sessions",
            &["starting", "running", "stopping"],
            &counts,
        );
    }
    if let Ok(counts) = crate::hosts::count_by_state(&app.pool).await {
        let states = ["online", "draining", "offline", "revoked"];
        set_state_gauges("opencloud_hosts", &states, &counts);
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics.render(),
    )
}

/// One gauge per state, zero for states with no rows.
fn set_state_gauges(name: &'static str, states: &[&'static str], counts: &[(String, u64)]) {
    for state in states {
        let n = counts
            .iter()
            .find(|(s, _)| s == state)
            .map_or(0, |(_, n)| *n);
        metrics::gauge!(name, "state" => *state).set(n as f64);
    }
}

/// Healthy when a pooled connection answers a ping.
async fn healthz(State(app): State<App>) -> Response {
    let ping = async {
        let mut conn = app.pool.get_conn().await?;
        mysql_async::prelude::Queryable::ping(&mut conn).await
    };
    match tokio::time::timeout(std::time::Duration::from_secs(2), ping).await {
        Ok(Ok(())) => (StatusCode::OK, Json(serde_json::json!({"status": "ok"}))).into_response(),
        _ => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"status": "database unreachable"})),
        )
            .into_response(),
    }
}

async fn stylesheet() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        include_str!("../../static/style.css"),
    )
}

async fn not_found(request: Request) -> Response {
    if request.uri().path().starts_with("/api/") {
        ApiError(AppError::NotFound("page")).into_response()
    } else {
        PageError(AppError::NotFound("page")).into_response()
    }
}

async fn method_not_allowed(request: Request) -> Response {
    let error = AppError::MethodNotAllowed(request.method().to_string());
    respond_error(request.uri().path().starts_with("/api/"), error)
}

async fn track_metrics(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    let method = request.method().to_string();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!("opencloud_http_requests_total", "route" => route.clone(), "method" => method, "status" => status)
        .increment(1);
    metrics::histogram!("opencloud_http_request_duration_seconds", "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}

/// What every handler knows about the request: who asks, from where, and
/// the CSRF token its forms must carry.
#[derive(Clone, Debug)]
pub struct Ctx {
    pub user: Option<User>,
    pub login_session: Option<String>,
    pub client_ip: IpAddr,
    pub csrf: String,
    pub user_agent: String,
}

impl Ctx {
    pub fn layout(&self) -> Layout {
        Layout {
            user: self.user.clone(),
            csrf: self.csrf.clone(),
        }
    }

    /// The logged-in user and their login session, or 401.
    pub fn require_user(&self) -> Result<(&User, &str), AppError> {
        match (&self.user, &self.login_session) {
            (Some(user), Some(session)) => Ok((user, session)),
            _ => Err(AppError::Unauthenticated),
        }
    }

    /// A host owner (or admin), or 403.
    pub fn require_host_owner(&self) -> Result<&User, AppError> {
        let (user, _) = self.require_user()?;
        if user.may_host() {
            Ok(user)
        } else {
            Err(AppError::Forbidden(
                "My hosts is for host owners. Register as a host owner to rent out a computer."
                    .into(),
            ))
        }
    }

    pub fn require_admin(&self) -> Result<&User, AppError> {
        let (user, _) = self.require_user()?;
        if user.is_admin() {
            Ok(user)
        } else {
            Err(AppError::Forbidden(
                "This page is for administrators.".into(),
            ))
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Ctx {
    type Rejection = PageError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Ctx>()
            .cloned()
            .ok_or_else(|| PageError(AppError::Internal("request context missing".into())))
    }
}

/// What the shared page layout shows: who is logged in, the logout form's
/// CSRF token.
#[derive(Clone, Debug, Default)]
pub struct Layout {
    pub user: Option<User>,
    pub csrf: String,
}

impl Layout {
    pub fn anonymous() -> Self {
        Self::default()
    }

    pub fn is_admin(&self) -> bool {
        self.user.as_ref().is_some_and(User::is_admin)
    }
}

/// The client's address: the peer, or the last `X-Forwarded-For` hop when
/// the peer is a trusted gateway.
fn client_ip(app: &App, peer: Option<IpAddr>, headers: &HeaderMap) -> IpAddr {
    let peer = peer.unwrap_or(IpAddr::from([0, 0, 0, 0]));
    if !app.config.trusted_proxies.contains(&peer) {
        return peer;
    }
    headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|hop| hop.trim().parse::<IpAddr>().ok())
        .next_back()
        .unwrap_or(peer)
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
pub fn session_cookie(app: &App, token: String) -> HeaderValue {
    let age = time::Duration::seconds(token::PLATFORM_TOKEN_SECONDS as i64);
    cookie_header(app, SESSION_COOKIE, token, Some(age))
}

/// `Set-Cookie` that removes the platform cookie.
pub fn clear_session_cookie(app: &App) -> HeaderValue {
    cookie_header(
        app,
        SESSION_COOKIE,
        String::new(),
        Some(time::Duration::ZERO),
    )
}

/// Signs a platform token for a login session, issued now.
pub fn platform_token(app: &App, user_id: u64, login_session: &str) -> String {
    token::sign(
        &app.config.keys,
        &Claims::platform(user_id, login_session, now_unix()),
    )
}

fn csrf_for(app: &App, binding: &str) -> String {
    token::derive(&app.config.keys, "csrf", binding)
}

fn origin_allowed(app: &App, headers: &HeaderMap) -> bool {
    match headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        None => true,
        Some(origin) => origin.eq_ignore_ascii_case(&app.config.public_origin),
    }
}

/// Resolves the caller (token → live login session → user), re-issues the
/// cookie past half life, and enforces CSRF rules on every change:
/// forms need the token bound to the login (or pre-login) session, JSON
/// changes authenticated by cookie need `application/json` and our Origin.
async fn platform_context(State(app): State<App>, request: Request, next: Next) -> Response {
    let (mut parts, body) = request.into_parts();
    let peer = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    let client_ip = client_ip(&app, peer, &parts.headers);
    let is_api = parts.uri.path().starts_with("/api/");
    let mut set_cookies: Vec<HeaderValue> = Vec::new();

    let bearer = credentials::bearer(&parts.headers).map(str::to_owned);
    let from_cookie = bearer.is_none();
    let presented =
        bearer.or_else(|| credentials::cookie(&parts.headers, SESSION_COOKIE).map(str::to_owned));
    let now = now_unix();
    let mut user = None;
    let mut login_session = None;
    if let Some(presented) = presented.filter(|t| !t.is_empty()) {
        match token::verify(&app.config.keys, &presented, TokenKind::Platform, now) {
            Ok(claims) => {
                match accounts::authenticate(&app.pool, claims.user_id, &claims.login_session).await
                {
                    Ok(Some(found)) => {
                        if from_cookie && claims.past_half_life(now) {
                            if let Err(e) =
                                accounts::extend_login_session(&app.pool, &claims.login_session)
                                    .await
                            {
                                tracing::warn!(error = %e, "could not extend login session");
                            } else {
                                let fresh = platform_token(&app, found.id, &claims.login_session);
                                set_cookies.push(session_cookie(&app, fresh));
                            }
                        }
                        user = Some(found);
                        login_session = Some(claims.login_session);
                    }
                    Ok(None) => {
                        if from_cookie {
                            set_cookies.push(clear_session_cookie(&app));
                        }
                    }
                    Err(e) => return respond_error(is_api, e),
                }
            }
            Err(reason) => {
                metrics::counter!("opencloud_token_rejections_total", "reason" => reason.reason())
                    .increment(1);
                if from_cookie {
                    set_cookies.push(clear_session_cookie(&app));
                }
            }
        }
    }

    let binding = match &login_session {
        Some(id) => id.clone(),
        None => match credentials::cookie(&parts.headers, CSRF_COOKIE) {
            Some(value) if value.len() >= 16 => value.to_owned(),
            _ => {
                let fresh = crate::ids::random_id();
                set_cookies.push(cookie_header(&app, CSRF_COOKIE, fresh.clone(), None));
                fresh
            }
        },
    };
    let csrf = csrf_for(&app, &binding);

    let unsafe_method = !matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS);
    let mut body = body;
    if unsafe_method {
        if !origin_allowed(&app, &parts.headers) {
            return respond_error(
                is_api,
                AppError::Forbidden("This request came from another site and was refused.".into()),
            );
        }
        if is_api {
            let json = parts
                .headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| {
                    v.split(';')
                        .next()
                        .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
                });
            if from_cookie && !json {
                return respond_error(true, AppError::UnsupportedMediaType);
            }
        } else {
            let bytes = match axum::body::to_bytes(body, BODY_LIMIT).await {
                Ok(bytes) => bytes,
                Err(_) => return respond_error(false, AppError::PayloadTooLarge),
            };
            let sent = serde_urlencoded::from_bytes::<Vec<(String, String)>>(&bytes)
                .ok()
                .and_then(|fields| {
                    fields
                        .into_iter()
                        .find(|(k, _)| k == CSRF_FIELD)
                        .map(|(_, v)| v)
                });
            let valid = sent.is_some_and(|sent| bool::from(sent.as_bytes().ct_eq(csrf.as_bytes())));
            if !valid {
                let mut response = PageError(AppError::Forbidden(
                    "This form has expired or did not come from OpenCloud. Go back, reload the page and try again.".into(),
                ))
                .into_response();
                append_cookies(&mut response, set_cookies);
                return response;
            }
            body = Body::from(bytes);
        }
    }

    let user_agent = parts
        .headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    parts.extensions.insert(Ctx {
        user,
        login_session,
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
    // A page that needs a login sends the browser to log in, then back.
    if navigation && response.status() == StatusCode::UNAUTHORIZED {
        let target = serde_urlencoded::to_string([("next", wanted.as_str())]).unwrap_or_default();
        response = axum::response::Redirect::to(&format!("/login?{target}")).into_response();
    }
    // A handler that set the session cookie itself (login, logout) wins.
    if response.headers().contains_key(header::SET_COOKIE) {
        set_cookies.retain(|c| !c.as_bytes().starts_with(SESSION_COOKIE.as_bytes()));
    }
    append_cookies(&mut response, set_cookies);
    response
}

fn append_cookies(response: &mut Response, cookies: Vec<HeaderValue>) {
    for cookie in cookies {
        response.headers_mut().append(header::SET_COOKIE, cookie);
    }
}

fn respond_error(is_api: bool, e: AppError) -> Response {
    if is_api {
        ApiError(e).into_response()
    } else {
        PageError(e).into_response()
    }
}

fn rejection_error(status: StatusCode, text: String) -> AppError {
    match status {
        StatusCode::PAYLOAD_TOO_LARGE => AppError::PayloadTooLarge,
        StatusCode::UNSUPPORTED_MEDIA_TYPE => AppError::UnsupportedMediaType,
        _ => AppError::BadRequest(text),
    }
}

/// `Json<T>` whose rejections are our JSON errors, naming the problem.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(value)) => Ok(ApiJson(value)),
            Err(rejection) => Err(ApiError(json_rejection(rejection))),
        }
    }
}

fn json_rejection(rejection: JsonRejection) -> AppError {
    rejection_error(rejection.status(), rejection.body_text())
}

/// `Query<T>` for the API.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| ApiQuery(q.0))
            .map_err(|r: QueryRejection| {
                ApiError(rejection_error(StatusCode::BAD_REQUEST, r.body_text()))
            })
    }
}

/// Which page of a newest-first list: the items older than `before`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BeforeQuery {
    pub before: Option<u64>,
}

/// `Query<T>` whose rejections are error pages.
pub struct PageQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for PageQuery<T> {
    type Rejection = PageError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| PageQuery(q.0))
            .map_err(|r: QueryRejection| {
                PageError(rejection_error(StatusCode::BAD_REQUEST, r.body_text()))
            })
    }
}

/// `Form<T>` whose rejections are error pages.
pub struct PageForm<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for PageForm<T> {
    type Rejection = PageError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Form::<T>::from_request(req, state).await {
            Ok(Form(value)) => Ok(PageForm(value)),
            Err(rejection) => {
                let rejection: FormRejection = rejection;
                Err(PageError(rejection_error(
                    rejection.status(),
                    rejection.body_text(),
                )))
            }
        }
    }
}

/// A form's error, shown next to the field it names.
#[derive(Debug, Default, Clone)]
pub struct FormError {
    field: Option<&'static str>,
    message: Option<String>,
}

impl FormError {
    pub fn none() -> Self {
        Self::default()
    }

    /// The message for `field`, if the error is about that field.
    pub fn on(&self, field: &str) -> Option<&str> {
        match (self.field, &self.message) {
            (Some(f), Some(m)) if f == field => Some(m),
            _ => None,
        }
    }

    /// The message when it is about no particular field.
    pub fn general(&self) -> Option<&str> {
        match (self.field, &self.message) {
            (None, Some(m)) => Some(m),
            _ => None,
        }
    }
}

impl From<&AppError> for FormError {
    fn from(e: &AppError) -> Self {
        Self {
            field: e.field(),
            message: Some(e.to_string()),
        }
    }
}

/// Only same-origin relative paths are followed after login.
pub fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(path)
            if path.starts_with('/')
                && !path.starts_with("//")
                && !path.starts_with("/\\")
                && !path.chars().any(|c| c.is_control() || c == '\\') =>
        {
            path.to_owned()
        }
        _ => "/projects".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_only_follows_relative_paths_on_this_origin() {
        assert_eq!(safe_next(Some("/projects/3")), "/projects/3");
        for bad in [
            "//evil.example",
            "https://evil.example",
            "/\\evil.example",
            "evil",
            "/a\r\nb",
            "\\\\evil",
        ] {
            assert_eq!(safe_next(Some(bad)), "/projects", "{bad:?}");
        }
        assert_eq!(safe_next(None), "/projects");
    }
}
