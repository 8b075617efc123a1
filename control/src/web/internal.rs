//! `/internal/v1/…` (the protocol's `paths::internal`) on the internal
//! listener, for gateways only: the route stream, the health and usage
//! reports (the protocol's `reports`) gateways send back, and their client
//! certificates for host links; and `/metrics` for whoever scrapes control. Every call carries
//! `Authorization: Bearer <gateway key>`.

use std::convert::Infallible;

use axum::body::Body;
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures_util::StreamExt;
use opencloud_protocol::credentials;
use opencloud_protocol::link::CertificateRequest;
use opencloud_protocol::paths::internal as paths;
use opencloud_protocol::reports::{HealthReport, UsageReport};
use opencloud_protocol::routes::{Version, WatchMessage};
use serde::Deserialize;
use tokio::sync::mpsc;

use super::errors::ApiError;
use super::extract::{ApiJson, ApiQuery};
use super::ops;
use crate::app::App;
use crate::error::AppError;
use crate::host_ca::Holder;
use crate::hosts;
use crate::routes;
use crate::sessions;

pub fn routes() -> Router<App> {
    Router::new()
        .route("/metrics", get(metrics))
        .route(paths::ROUTES_WATCH, get(watch))
        .route(paths::HEALTH, post(health))
        .route(paths::USAGE, post(usage))
        .route(paths::LINK_CERTIFICATE, post(link_certificate))
        .route(paths::SESSION_BALANCE, get(session_balance))
}

/// A caller that presented one of the configured gateway keys.
pub struct Gateway;

impl FromRequestParts<App> for Gateway {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &App) -> Result<Self, Self::Rejection> {
        match credentials::bearer(&parts.headers) {
            Some(key) if app.config.gateway_keys.accepts(key) => Ok(Gateway),
            Some(_) => {
                metrics::counter!("opencloud_control_gateway_auth_failures_total").increment(1);
                Err(ApiError(AppError::Unauthorized(
                    "the gateway key is not one this control accepts (gateway_keys)".into(),
                )))
            }
            None => Err(ApiError(AppError::Unauthorized(
                "send the gateway key as Authorization: Bearer <key>".into(),
            ))),
        }
    }
}

/// The scrape needs a key too: anything on the host (a notebook, too) can
/// reach the internal listener's port.
async fn metrics(_: Gateway, app: State<App>) -> impl IntoResponse {
    ops::metrics(app).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WatchQuery {
    #[serde(default)]
    since: Version,
}

/// Newline-delimited JSON: a snapshot or the deltas after `since`, then
/// each change as it commits, with heartbeats while idle. The first part
/// is read before answering, so a database failure is a 503, not a
/// half-open stream.
async fn watch(
    _: Gateway,
    State(app): State<App>,
    ApiQuery(query): ApiQuery<WatchQuery>,
) -> Result<Response, ApiError> {
    let (first, version) = routes::catch_up(&app.pool, query.since).await?;
    let (tx, rx) = mpsc::channel::<WatchMessage>(16);
    let stopping = app.stopping.subscribe();
    let pool = app.pool.clone();
    tokio::spawn(async move {
        let streams = metrics::gauge!("opencloud_control_route_watch_streams");
        streams.increment(1.0);
        routes::follow(pool, version, tx, stopping).await;
        streams.decrement(1.0);
    });
    let following = futures_util::stream::unfold(rx, |mut rx| async move {
        let message = rx.recv().await?;
        Some((message, rx))
    });
    let lines = futures_util::stream::iter(first)
        .chain(following)
        .map(|message| {
            let mut line = serde_json::to_string(&message).unwrap_or_default();
            line.push('\n');
            Ok::<_, Infallible>(line)
        });
    Ok((
        [
            (header::CONTENT_TYPE, "application/x-ndjson"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        Body::from_stream(lines),
    )
        .into_response())
}

async fn health(
    _: Gateway,
    State(app): State<App>,
    ApiJson(report): ApiJson<HealthReport>,
) -> Result<Response, ApiError> {
    hosts::record_reachability(&app.pool, &report.gateway, &report.hosts).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn usage(
    _: Gateway,
    State(app): State<App>,
    ApiJson(report): ApiJson<UsageReport>,
) -> Result<Response, ApiError> {
    sessions::usage::record_usage(&app.pool, &report.sessions, crate::clock::now_unix()).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// A client certificate for host links, for whichever gateway holds the
/// key: every gateway gets the same name, since hosts accept any gateway.
async fn link_certificate(
    _: Gateway,
    State(app): State<App>,
    ApiJson(request): ApiJson<CertificateRequest>,
) -> Result<Response, ApiError> {
    let issued = app
        .host_ca
        .issue(Holder::Gateway, &request.csr, crate::clock::now_unix())
        .map_err(|e| {
            AppError::invalid("csr", format!("The certificate request was refused: {e}."))
        })?;
    tracing::info!(
        not_after = issued.certificate.not_after,
        "gateway link certificate issued"
    );
    Ok(axum::Json(issued.certificate).into_response())
}

/// Whether the owner of live session `sid` runs out of compute time soon,
/// for the banner the gateway adds to Lab. Unknown and ended sessions are
/// "not found".
async fn session_balance(
    _: Gateway,
    State(app): State<App>,
    axum::extract::Path(sid): axum::extract::Path<String>,
) -> Result<Response, ApiError> {
    let owner = sessions::live_owner(&app.pool, &sid)
        .await?
        .ok_or(AppError::NotFound("session"))?;
    let warning = crate::billing::ledger::runs_out_warning(
        &app.pool,
        owner,
        app.config.billing.warning_seconds,
    )
    .await?;
    Ok(axum::Json(opencloud_protocol::reports::BalanceNotice {
        warning,
        packages_url: format!("{}/packages", app.config.public_origin),
    })
    .into_response())
}
