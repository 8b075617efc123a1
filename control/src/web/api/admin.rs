//! The admin calls: every host, Session data and stopping any session,
//! users (search, role, disable) and packages (create, patch).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, patch, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::app::App;
use crate::packages::{self, PackageInput, PackagePatch};
use crate::sessions::{data, ending};
use crate::web::auth::Ctx;
use crate::web::errors::ApiResult;
use crate::web::extract::{parse_id, parse_role, ApiJson, ApiQuery, BeforeQuery, UserSearch};
use crate::{accounts, hosts};

pub fn routes() -> Router<App> {
    Router::new()
        .route("/admin/hosts", get(admin_hosts))
        .route("/admin/sessions", get(admin_sessions))
        .route("/admin/sessions/{sid}/stop", post(admin_stop_session))
        .route("/admin/users", get(admin_users))
        .route("/admin/users/{id}", patch(admin_update_user))
        .route(
            "/admin/packages",
            get(admin_packages).post(admin_create_package),
        )
        .route("/admin/packages/{id}", patch(admin_update_package))
}

async fn admin_stop_session(
    State(app): State<App>,
    ctx: Ctx,
    Path(sid): Path<String>,
) -> ApiResult {
    ctx.require_admin()?;
    let state = ending::stop_as_admin(&app.pool, &app.wakeups, &sid).await?;
    Ok(Json(json!({ "session_id": sid, "state": state })).into_response())
}

async fn admin_hosts(
    State(app): State<App>,
    ctx: Ctx,
    ApiQuery(page): ApiQuery<BeforeQuery>,
) -> ApiResult {
    ctx.require_admin()?;
    let page = hosts::list(&app.pool, None, page.before).await?;
    Ok(Json(page).into_response())
}

async fn admin_sessions(
    State(app): State<App>,
    ctx: Ctx,
    ApiQuery(filter): ApiQuery<data::Filter>,
) -> ApiResult {
    ctx.require_admin()?;
    let page = data::page(&app.pool, &filter).await?;
    Ok(Json(page).into_response())
}

async fn admin_users(
    State(app): State<App>,
    ctx: Ctx,
    ApiQuery(search): ApiQuery<UserSearch>,
) -> ApiResult {
    ctx.require_admin()?;
    let (offset, limit) = search.checked()?;
    let page = accounts::search_users(&app.pool, &search.q, offset, limit).await?;
    Ok(Json(json!({
        "users": page.users,
        "total": page.total,
        "page": search.page,
        "per_page": search.per_page,
    }))
    .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AdminUserPatch {
    role: Option<String>,
    disabled: Option<bool>,
}

async fn admin_update_user(
    State(app): State<App>,
    ctx: Ctx,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<AdminUserPatch>,
) -> ApiResult {
    let admin = ctx.require_admin()?;
    let role = body.role.as_deref().map(parse_role).transpose()?;
    let user = accounts::admin_update_user(
        &app.pool,
        admin.id,
        parse_id(&id, "user")?,
        role,
        body.disabled,
    )
    .await?;
    Ok(Json(json!({ "user": user })).into_response())
}

async fn admin_packages(State(app): State<App>, ctx: Ctx) -> ApiResult {
    ctx.require_admin()?;
    let list = packages::list(&app.pool, true).await?;
    Ok(Json(json!({ "packages": list })).into_response())
}

async fn admin_create_package(
    State(app): State<App>,
    ctx: Ctx,
    ApiJson(body): ApiJson<PackageInput>,
) -> ApiResult {
    ctx.require_admin()?;
    let package = packages::create(&app.pool, body).await?;
    Ok((StatusCode::CREATED, Json(json!({ "package": package }))).into_response())
}

async fn admin_update_package(
    State(app): State<App>,
    ctx: Ctx,
    Path(id): Path<String>,
    ApiJson(patch): ApiJson<PackagePatch>,
) -> ApiResult {
    ctx.require_admin()?;
    let package = packages::patch(&app.pool, parse_id(&id, "package")?, patch).await?;
    Ok(Json(json!({ "package": package })).into_response())
}
