//! The HTTP layer, and here only its routers. Handlers only parse input
//! and render output; the domain modules do the work.
//!
//! Handler areas: `pages` (the site, by area), `admin` (every admin page),
//! `api` (the JSON API under `/api/v1`), `agent` (host agents), `internal`
//! (gateways). They share the small modules and never each other:
//! `context` (the middleware before every platform request) on `auth` (who
//! is calling), `cookies` and `csrf`; `errors` (errors as HTTP answers),
//! `extract` (reading input), `layout` (the page layout), `render`
//! (answering with a page), `ops` (health and metrics) and
//! `security_headers` (on every answer).

mod admin;
mod agent;
mod api;
mod auth;
mod context;
mod cookies;
mod csrf;
mod errors;
mod extract;
mod internal;
mod layout;
mod ops;
mod pages;
mod render;
mod security_headers;

pub use auth::TOKEN_REJECTIONS;

use axum::extract::{DefaultBodyLimit, Request};
use axum::middleware;
use axum::routing::get;
use axum::Router;

use crate::app::App;
use crate::error::AppError;
use errors::ApiError;
use extract::{BODY_LIMIT, INTERNAL_BODY_LIMIT};
use security_headers::SecurityHeaders;

/// The public listener: the site, the API and the agents' calls.
pub fn public_router(app: App) -> Router {
    let platform = Router::new()
        .merge(pages::routes())
        .merge(admin::routes())
        .nest("/api/v1", api::routes())
        .route("/healthz", get(ops::healthz))
        .route("/static/style.css", get(layout::stylesheet))
        .fallback(errors::not_found)
        .method_not_allowed_fallback(errors::method_not_allowed)
        .route_layer(middleware::from_fn(ops::track_metrics))
        .layer(middleware::from_fn_with_state(
            app.clone(),
            context::platform_context,
        ));
    // Agents authenticate with their HostKey: no cookies, so no CSRF rules.
    let agents = agent::routes().route_layer(middleware::from_fn(ops::track_metrics));
    // Payment providers sign their webhooks; they carry no cookie.
    let webhooks = api::webhook_routes().route_layer(middleware::from_fn(ops::track_metrics));
    let headers = SecurityHeaders::new(&app.config);
    Router::new()
        .merge(agents)
        .merge(webhooks)
        .merge(platform)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::map_response_with_state(
            headers,
            security_headers::add,
        ))
        .with_state(app)
}

/// The internal listener: metrics, health and the gateways' calls.
pub fn internal_router(app: App) -> Router {
    Router::new()
        .route("/healthz", get(ops::healthz))
        .merge(internal::routes())
        .fallback(|| async { ApiError(AppError::NotFound("page")) })
        .method_not_allowed_fallback(|request: Request| async move {
            ApiError(AppError::MethodNotAllowed(request.method().to_string()))
        })
        .layer(DefaultBodyLimit::max(INTERNAL_BODY_LIMIT))
        .layer(middleware::map_response_with_state(
            SecurityHeaders::new(&app.config),
            security_headers::add,
        ))
        .with_state(app)
}
