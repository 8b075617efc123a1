//! A user's projects, and opening one (its live session, or a new one).

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::app::App;
use crate::projects;
use crate::sessions::placement;
use crate::web::auth::Ctx;
use crate::web::errors::ApiResult;
use crate::web::extract::{parse_id, ApiJson};

pub fn routes() -> Router<App> {
    Router::new()
        .route("/projects", get(list_projects).post(create_project))
        .route(
            "/projects/{id}",
            get(get_project)
                .patch(update_project)
                .delete(delete_project),
        )
        .route("/projects/{id}/open", post(open_project))
}

async fn list_projects(State(app): State<App>, ctx: Ctx) -> ApiResult {
    let (user, _) = ctx.require_user()?;
    let list = projects::list(&app.pool, user.id).await?;
    Ok(Json(json!({ "projects": list })).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateProject {
    name: String,
    #[serde(default)]
    description: String,
}

async fn create_project(
    State(app): State<App>,
    ctx: Ctx,
    ApiJson(body): ApiJson<CreateProject>,
) -> ApiResult {
    let (user, _) = ctx.require_user()?;
    let project = projects::create(&app.pool, user.id, &body.name, &body.description).await?;
    Ok((StatusCode::CREATED, Json(json!({ "project": project }))).into_response())
}

async fn get_project(State(app): State<App>, ctx: Ctx, Path(id): Path<String>) -> ApiResult {
    let (user, _) = ctx.require_user()?;
    let project = projects::get(&app.pool, user.id, parse_id(&id, "project")?).await?;
    Ok(Json(json!({ "project": project })).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateProject {
    name: Option<String>,
    description: Option<String>,
}

async fn update_project(
    State(app): State<App>,
    ctx: Ctx,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<UpdateProject>,
) -> ApiResult {
    let (user, _) = ctx.require_user()?;
    let id = parse_id(&id, "project")?;
    let project = projects::update(
        &app.pool,
        user.id,
        id,
        body.name.as_deref(),
        body.description.as_deref(),
    )
    .await?;
    Ok(Json(json!({ "project": project })).into_response())
}

async fn delete_project(State(app): State<App>, ctx: Ctx, Path(id): Path<String>) -> ApiResult {
    let (user, _) = ctx.require_user()?;
    let id = parse_id(&id, "project")?;
    projects::delete(&app.pool, &app.wakeups, user.id, id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Opens a project: its live session, or a new one placed on a host (201),
/// or, when every host is full, a place in the queue (202 with `queued`,
/// `position` and `eta_seconds`). `url` enters the session's own origin (a
/// ticket valid one minute); while it waits, `url` is the page that sends
/// the browser there once it has a place.
async fn open_project(State(app): State<App>, ctx: Ctx, Path(id): Path<String>) -> ApiResult {
    let (user, _) = ctx.require_user()?;
    let opened = placement::open(
        &app.pool,
        &app.wakeups,
        app.config.billing.host_share_percent,
        user.id,
        parse_id(&id, "project")?,
    )
    .await?;
    let (status, url) = match opened.queue {
        Some(_) => (
            StatusCode::ACCEPTED,
            super::sessions::waiting_url(&app, &opened.session_id),
        ),
        None if opened.existing => (StatusCode::OK, ctx.enter_url(&app, &opened.session_id)?),
        None => (
            StatusCode::CREATED,
            ctx.enter_url(&app, &opened.session_id)?,
        ),
    };
    Ok((
        status,
        [(header::CACHE_CONTROL, "no-store")],
        Json(json!({
            "session_id": opened.session_id,
            "url": url,
            "state": opened.state,
            "queued": opened.queue.is_some(),
            "position": opened.queue.map(|q| q.position),
            "eta_seconds": opened.queue.and_then(|q| q.eta_seconds),
        })),
    )
        .into_response())
}
