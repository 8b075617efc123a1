//! A host owner's hosts: listing, adding (the HostKey shown once), keys,
//! draining.

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::app::App;
use crate::billing::reports;
use crate::hosts;
use crate::web::auth::Ctx;
use crate::web::errors::ApiResult;
use crate::web::extract::{parse_id, ApiJson, ApiQuery, BeforeQuery};

pub fn routes() -> Router<App> {
    Router::new()
        .route("/hosts", get(list_hosts).post(create_host))
        .route("/hosts/{id}", get(get_host))
        .route("/hosts/{id}/key", post(rotate_host_key))
        .route("/hosts/{id}/revoke", post(revoke_host_key))
        .route("/hosts/{id}/drain", post(drain_host))
}

async fn list_hosts(
    State(app): State<App>,
    ctx: Ctx,
    ApiQuery(page): ApiQuery<BeforeQuery>,
) -> ApiResult {
    let user = ctx.require_host_owner()?;
    let mut page = hosts::list(&app.pool, Some(user.id), page.before).await?;
    let earned = reports::host_earnings(&mut app.pool.get_conn().await?, user.id).await?;
    for host in &mut page.hosts {
        host.earnings = reports::host_text(&earned, host.id);
    }
    Ok(Json(page).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateHost {
    name: String,
}

/// Adds a host; the answer carries its HostKey, shown this once.
async fn create_host(
    State(app): State<App>,
    ctx: Ctx,
    ApiJson(body): ApiJson<CreateHost>,
) -> ApiResult {
    let user = ctx.require_host_owner()?;
    let (host, key) = hosts::create(&app.pool, user.id, &body.name).await?;
    Ok((
        StatusCode::CREATED,
        [(header::CACHE_CONTROL, "no-store")],
        Json(json!({ "host": host, "host_key": key })),
    )
        .into_response())
}

async fn get_host(State(app): State<App>, ctx: Ctx, Path(id): Path<String>) -> ApiResult {
    let user = ctx.require_host_owner()?;
    let host = hosts::get(&app.pool, Some(user.id), parse_id(&id, "host")?).await?;
    Ok(Json(json!({ "host": host })).into_response())
}

async fn rotate_host_key(State(app): State<App>, ctx: Ctx, Path(id): Path<String>) -> ApiResult {
    let user = ctx.require_host_owner()?;
    let key = hosts::rotate_key(&app.pool, user.id, parse_id(&id, "host")?).await?;
    Ok((
        [(header::CACHE_CONTROL, "no-store")],
        Json(json!({ "host_key": key })),
    )
        .into_response())
}

async fn revoke_host_key(State(app): State<App>, ctx: Ctx, Path(id): Path<String>) -> ApiResult {
    let user = ctx.require_host_owner()?;
    hosts::revoke_key(&app.pool, user.id, parse_id(&id, "host")?).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Drain {
    draining: bool,
}

async fn drain_host(
    State(app): State<App>,
    ctx: Ctx,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<Drain>,
) -> ApiResult {
    let user = ctx.require_host_owner()?;
    let id = parse_id(&id, "host")?;
    hosts::set_draining(&app.pool, Some(user.id), id, body.draining).await?;
    let host = hosts::get(&app.pool, Some(user.id), id).await?;
    Ok(Json(json!({ "host": host })).into_response())
}
