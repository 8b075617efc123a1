//! A user's own session: reading it (with a fresh URL to enter it while it
//! is live) and stopping it.

use axum::extract::{Path, State};
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use crate::app::App;
use crate::billing::ledger;
use crate::sessions;
use crate::sessions::ending;
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
    let session = sessions::get_owned(&app.pool, user.id, &sid).await?;
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

async fn stop_session(State(app): State<App>, ctx: Ctx, Path(sid): Path<String>) -> ApiResult {
    let (user, _) = ctx.require_user()?;
    let state = ending::stop_own(&app.pool, &app.wakeups, user.id, &sid).await?;
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
