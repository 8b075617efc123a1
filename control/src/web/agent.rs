//! `/agent/v1/…` (the protocol's `paths::agent`): what host agents call,
//! authenticated by their HostKey (`Authorization: HostKey <key>`), never by
//! cookies. What agents send is untrusted input: a bad field is a 400 that
//! names it.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use opencloud_protocol::agent::{
    AgentEvent, AgentHello, CommandBatch, Heartbeat, COMMAND_POLL_SECONDS, HOST_KEY_SCHEME,
};
use opencloud_protocol::link::CertificateRequest;
use opencloud_protocol::paths::agent as paths;
use opencloud_protocol::snapshots::{self as snapshot, Damaged, Reason};
use serde::Deserialize;

use super::errors::ApiError;
use super::extract::{ApiJson, ApiQuery};
use crate::app::App;
use crate::error::AppError;
use crate::hosts;
use crate::sessions::{commands, events};
use crate::snapshots;

pub fn routes() -> Router<App> {
    Router::new()
        .route(paths::REGISTER, post(register))
        .route(paths::HEARTBEAT, post(heartbeat))
        .route(paths::COMMANDS, get(commands))
        .route(paths::EVENTS, post(event))
        .route(paths::LINK_CERTIFICATE, post(link_certificate))
        // Snapshots are streamed and may be far over the 1 MiB of the rest;
        // the owner's storage quota bounds them instead.
        .route(
            snapshot::SNAPSHOT,
            get(pull_snapshot)
                .put(push_snapshot)
                .layer(DefaultBodyLimit::disable()),
        )
        .route(snapshot::SNAPSHOT_DAMAGED, post(snapshot_damaged))
}

/// The host whose key the request carries.
pub struct Agent(u64);

impl FromRequestParts<App> for Agent {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &App) -> Result<Self, Self::Rejection> {
        let key = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case(HOST_KEY_SCHEME))
            .map(|(_, key)| key.trim())
            .ok_or(ApiError(AppError::HostKeyInvalid))?;
        Ok(Agent(hosts::authenticate(&app.pool, key).await?))
    }
}

/// An [`ApiError`] whose bad fields are 400s: an agent's input is not a
/// form a person corrects, it is a protocol message that is wrong.
pub struct AgentError(AppError);

impl<E: Into<AppError>> From<E> for AgentError {
    fn from(e: E) -> Self {
        AgentError(e.into())
    }
}

impl IntoResponse for AgentError {
    fn into_response(self) -> Response {
        let mut response = ApiError(self.0).into_response();
        if response.status() == StatusCode::UNPROCESSABLE_ENTITY {
            *response.status_mut() = StatusCode::BAD_REQUEST;
        }
        response
    }
}

async fn register(
    State(app): State<App>,
    Agent(host): Agent,
    ApiJson(hello): ApiJson<AgentHello>,
) -> Result<Response, AgentError> {
    let registered = hosts::register(
        &app.pool,
        &app.host_ca,
        host,
        &hello,
        app.config.allow_private_hosts,
    )
    .await?;
    app.wakeups.wake(host);
    Ok(Json(registered).into_response())
}

async fn link_certificate(
    State(app): State<App>,
    Agent(host): Agent,
    ApiJson(request): ApiJson<CertificateRequest>,
) -> Result<Response, AgentError> {
    let certificate =
        hosts::renew_link_certificate(&app.pool, &app.host_ca, host, &request.csr).await?;
    Ok(Json(certificate).into_response())
}

async fn heartbeat(
    State(app): State<App>,
    Agent(host): Agent,
    ApiJson(beat): ApiJson<Heartbeat>,
) -> Result<Response, AgentError> {
    Ok(Json(hosts::heartbeat(&app.pool, host, &beat).await?).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CommandQuery {
    #[serde(default)]
    after: u64,
    /// How long to wait for a command, at most the protocol's limit.
    wait_ms: Option<u64>,
}

async fn commands(
    State(app): State<App>,
    Agent(host): Agent,
    ApiQuery(query): ApiQuery<CommandQuery>,
) -> Result<Response, ApiError> {
    let wait = Duration::from_millis(query.wait_ms.unwrap_or(COMMAND_POLL_SECONDS * 1000));
    let mut stopping = app.stopping.subscribe();
    let commands = tokio::select! {
        found = commands::commands(&app.pool, &app.wakeups, host, query.after, wait) => found?,
        // Shutting down: answer now so the agent reconnects elsewhere.
        _ = stopping.wait_for(|stop| *stop) => Vec::new(),
    };
    Ok(Json(CommandBatch { commands }).into_response())
}

async fn event(
    State(app): State<App>,
    Agent(host): Agent,
    ApiJson(event): ApiJson<AgentEvent>,
) -> Result<Response, AgentError> {
    events::handle_event(&app.pool, &app.wakeups, host, &event).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PullQuery {
    before: Option<u64>,
}

async fn pull_snapshot(
    State(app): State<App>,
    Agent(host): Agent,
    Path(sid): Path<String>,
    ApiQuery(query): ApiQuery<PullQuery>,
) -> Result<Response, AgentError> {
    let Some(pulled) = snapshots::pull(&app.pool, &app.store, host, &sid, query.before).await?
    else {
        return Ok(StatusCode::NO_CONTENT.into_response());
    };
    let version = &pulled.version;
    let mut response = Body::from_stream(pulled.body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/zstd"),
    );
    headers.insert(
        header::CONTENT_LENGTH,
        HeaderValue::from(version.size_bytes),
    );
    headers.insert(snapshot::VERSION_HEADER, HeaderValue::from(version.version));
    headers.insert(
        snapshot::CREATED_HEADER,
        HeaderValue::from(version.created_unix),
    );
    if let Ok(sha256) = HeaderValue::from_str(&version.sha256) {
        headers.insert(snapshot::SHA256_HEADER, sha256);
    }
    Ok(response)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PushQuery {
    reason: Reason,
}

async fn push_snapshot(
    State(app): State<App>,
    Agent(host): Agent,
    Path(sid): Path<String>,
    ApiQuery(query): ApiQuery<PushQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, AgentError> {
    let sha256 = headers
        .get(snapshot::SHA256_HEADER)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            AppError::invalid(
                "sha256",
                format!("Send the archive's SHA-256 in {}.", snapshot::SHA256_HEADER),
            )
        })?;
    let declared_len = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let push = snapshots::Push {
        host_id: host,
        sid: &sid,
        reason: query.reason,
        sha256,
        declared_len,
    };
    let stored = snapshots::push(
        &app.pool,
        &app.store,
        &app.config.store,
        &app.config.billing.trial,
        &push,
        body.into_data_stream(),
    )
    .await?;
    Ok(Json(stored).into_response())
}

async fn snapshot_damaged(
    State(app): State<App>,
    Agent(host): Agent,
    Path(sid): Path<String>,
    ApiJson(report): ApiJson<Damaged>,
) -> Result<Response, AgentError> {
    snapshots::damaged(&app.pool, host, &sid, report.version).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
