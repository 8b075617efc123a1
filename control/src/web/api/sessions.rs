//! A user's own session: reading it (with a fresh URL to enter it while it
//! is live) and stopping it.

use axum::extract::{Path, State};
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use opencloud_protocol::metrics::LabelValue;
use serde_json::json;

use crate::app::App;
use crate::billing::ledger;
use crate::error::AppError;
use crate::sessions;
use crate::sessions::ending;
use crate::sessions::queue::{self, Stopped, Waiting};
use crate::web::auth::Ctx;
use crate::web::errors::ApiResult;

pub fn routes() -> Router<App> {
    Router::new()
        .route("/sessions/{sid}", get(get_session))
        .route("/sessions/{sid}/stop", post(stop_session))
        .route("/sessions/{sid}/save", post(save_session))
}

/// A session and, while it is live, the URL that enters it (with a fresh
/// ticket, so fetch it right before navigating).
async fn get_session(State(app): State<App>, ctx: Ctx, Path(sid): Path<String>) -> ApiResult {
    let (user, _) = ctx.require_user()?;
    let session = match sessions::get_owned(&app.pool, user.id, &sid).await {
        Err(AppError::NotFound(_)) => match queue::get_owned(&app.pool, user.id, &sid).await? {
            Some(waiting) => return Ok(waiting_json(&app, waiting).into_response()),
            None => return Err(AppError::NotFound("session").into()),
        },
        other => other?,
    };
    let url = session
        .is_live()
        .then(|| ctx.enter_url(&app, &session.sid))
        .transpose()?;
    let ended = (!session.is_live()).then(|| session.end_explanation());
    let warning = ledger::runs_out_warning(&app.pool, user.id, app.config.billing.warning_seconds)
        .await?
        .filter(|_| session.is_live());
    Ok((
        [(header::CACHE_CONTROL, "no-store")],
        Json(json!({
            "session_id": session.sid,
            "project_id": session.project_id,
            "state": session.state,
            "url": url,
            "created_at": session.created_at,
            "ended_at": session.ended_at,
            "end_reason": session.end_reason,
            "notice": session.notice,
            "ended_because": ended,
            "balance_warning": warning,
        })),
    )
        .into_response())
}

/// The page that waits with a queued open and then enters its session.
pub fn waiting_url(app: &App, sid: &str) -> String {
    format!("{}/sessions/{sid}/enter", app.config.public_origin)
}

/// A queued open (or one that left the queue without a place).
fn waiting_json(app: &App, waiting: Waiting) -> impl IntoResponse {
    let state = if waiting.spot.is_some() {
        queue::QUEUED
    } else {
        "left_queue"
    };
    (
        [(header::CACHE_CONTROL, "no-store")],
        Json(json!({
            "session_id": waiting.sid,
            "project_id": waiting.project_id,
            "state": state,
            "queued": waiting.spot.is_some(),
            "position": waiting.spot.map(|s| s.position),
            "eta_seconds": waiting.spot.and_then(|s| s.eta_seconds),
            "wait_text": waiting.spot.map(|s| s.wait_text()),
            "url": waiting.spot.map(|_| waiting_url(app, &waiting.sid)),
            "left_queue": waiting.left.map(|e| e.label()),
            "ended_because": waiting.left.map(|e| e.explanation()),
        })),
    )
}

/// Stops a session, or takes an open that still waits out of the queue.
async fn stop_session(State(app): State<App>, ctx: Ctx, Path(sid): Path<String>) -> ApiResult {
    let (user, _) = ctx.require_user()?;
    let state = match queue::leave_or_stop(&app.pool, &app.wakeups, user.id, &sid).await? {
        Stopped::LeftQueue => "left_queue".to_owned(),
        Stopped::Session(state) => state,
    };
    Ok(Json(json!({ "session_id": sid, "state": state })).into_response())
}

/// Saves a running session's files to the project store now (202: the
/// agent pushes them in a moment); 409 when the session is not running.
async fn save_session(State(app): State<App>, ctx: Ctx, Path(sid): Path<String>) -> ApiResult {
    let (user, _) = ctx.require_user()?;
    ending::save_now(&app.pool, &app.wakeups, user.id, &sid).await?;
    Ok((
        axum::http::StatusCode::ACCEPTED,
        Json(json!({ "session_id": sid, "saving": true })),
    )
        .into_response())
}
