//! `/agent/v1/…` (the protocol's `paths::agent`): what host agents call,
//! authenticated by their HostKey (`Authorization: HostKey <key>`), never by
//! cookies. What agents send is untrusted input: a bad field is a 400 that
//! names it.

use std::time::Duration;

use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use opencloud_protocol::agent::{
    AgentEvent, AgentHello, CommandBatch, Heartbeat, COMMAND_POLL_SECONDS, HOST_KEY_SCHEME,
};
use opencloud_protocol::link::CertificateRequest;
use opencloud_protocol::paths::agent as paths;
use serde::Deserialize;

use super::errors::ApiError;
use super::extract::{ApiJson, ApiQuery};
use crate::app::App;
use crate::error::AppError;
use crate::hosts;
use crate::sessions::{commands, events};

pub fn routes() -> Router<App> {
    Router::new()
        .route(paths::REGISTER, post(register))
        .route(paths::HEARTBEAT, post(heartbeat))
        .route(paths::COMMANDS, get(commands))
        .route(paths::EVENTS, post(event))
        .route(paths::LINK_CERTIFICATE, post(link_certificate))
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
