//! The JSON API under `/api/v1`: the same operations as the pages.

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use super::{ApiJson, ApiQuery, BeforeQuery, Ctx};
use crate::accounts::{self, LoginAttempt, NewUser, Role};
use crate::error::{ApiError, AppError};
use crate::packages::{self, PackageInput};
use crate::sessions::{data, ending, placement};
use crate::{hosts, projects, sessions, App};

pub fn routes() -> Router<App> {
    Router::new()
        .route("/auth/register", post(register))
        .route("/auth/login", post(login))
        .route("/auth/logout", post(logout))
        .route("/auth/password", post(change_password))
        .route("/me", get(me))
        .route("/projects", get(list_projects).post(create_project))
        .route(
            "/projects/{id}",
            get(get_project)
                .patch(update_project)
                .delete(delete_project),
        )
        .route("/projects/{id}/open", post(open_project))
        .route("/sessions/{sid}", get(get_session))
        .route("/sessions/{sid}/stop", post(stop_session))
        .route("/hosts", get(list_hosts).post(create_host))
        .route("/hosts/{id}", get(get_host))
        .route("/hosts/{id}/key", post(rotate_host_key))
        .route("/hosts/{id}/revoke", post(revoke_host_key))
        .route("/hosts/{id}/drain", post(drain_host))
        .route("/admin/hosts", get(admin_hosts))
        .route("/admin/sessions", get(admin_sessions))
        .route("/admin/sessions/{sid}/stop", post(admin_stop_session))
        .route("/packages", get(list_packages))
        .route("/admin/users", get(admin_users))
        .route("/admin/users/{id}", patch(admin_update_user))
        .route(
            "/admin/packages",
            get(admin_packages).post(admin_create_package),
        )
        .route("/admin/packages/{id}", patch(admin_update_package))
}

type ApiResult = Result<Response, ApiError>;

/// Ids that are not numbers name nothing: 404, like a missing row.
pub(super) fn parse_id(raw: &str, what: &'static str) -> Result<u64, AppError> {
    raw.parse().map_err(|_| AppError::NotFound(what))
}

fn parse_role(raw: &str) -> Result<Role, AppError> {
    Role::parse(raw)
        .ok_or_else(|| AppError::invalid("role", "The role must be customer, host_owner or admin."))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterRequest {
    email: String,
    password: String,
    name: String,
    #[serde(default)]
    role: Option<String>,
}

async fn register(State(app): State<App>, ApiJson(body): ApiJson<RegisterRequest>) -> ApiResult {
    let role = body
        .role
        .as_deref()
        .map(parse_role)
        .transpose()?
        .unwrap_or(Role::Customer);
    let user = accounts::register(
        &app.pool,
        &app.passwords,
        NewUser {
            email: body.email,
            name: body.name,
            password: body.password,
            role,
        },
    )
    .await?;
    Ok((StatusCode::CREATED, Json(json!({ "user": user }))).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginRequest {
    email: String,
    password: String,
}

async fn login(
    State(app): State<App>,
    ctx: Ctx,
    ApiJson(body): ApiJson<LoginRequest>,
) -> ApiResult {
    let logged_in = accounts::login(
        &app.pool,
        &app.passwords,
        &app.config.login,
        LoginAttempt {
            email: &body.email,
            password: &body.password,
            client_ip: ctx.client_ip.to_string(),
            user_agent: &ctx.user_agent,
        },
    )
    .await?;
    let token = super::platform_token(&app, logged_in.user.id, &logged_in.login_session);
    Ok((
        [(
            header::SET_COOKIE,
            super::session_cookie(&app, token.clone()),
        )],
        Json(json!({
            "token": token,
            "expires_in": opencloud_protocol::token::PLATFORM_TOKEN_SECONDS,
            "user": logged_in.user,
        })),
    )
        .into_response())
}

async fn logout(State(app): State<App>, ctx: Ctx) -> ApiResult {
    if let Some(session) = &ctx.login_session {
        accounts::revoke_login_session(&app.pool, session, "logout").await?;
    }
    Ok((
        [(header::SET_COOKIE, super::clear_session_cookie(&app))],
        Json(json!({ "logged_out": true })),
    )
        .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PasswordRequest {
    current_password: String,
    new_password: String,
}

async fn change_password(
    State(app): State<App>,
    ctx: Ctx,
    ApiJson(body): ApiJson<PasswordRequest>,
) -> ApiResult {
    let (user, session) = ctx.require_user()?;
    accounts::change_password(
        &app.pool,
        &app.passwords,
        user.id,
        session,
        &body.current_password,
        &body.new_password,
    )
    .await?;
    Ok(Json(json!({ "changed": true, "other_sessions_revoked": true })).into_response())
}

async fn me(ctx: Ctx) -> ApiResult {
    let (user, _) = ctx.require_user()?;
    Ok(Json(json!({ "user": user })).into_response())
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
    ending::stop_project(&app.pool, &app.wakeups, user.id, id).await?;
    projects::delete(&app.pool, user.id, id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Opens a project: its live session, or a new one placed on a host.
/// `url` enters the session's own origin (a ticket valid one minute).
async fn open_project(State(app): State<App>, ctx: Ctx, Path(id): Path<String>) -> ApiResult {
    let (user, login_session) = ctx.require_user()?;
    let opened =
        placement::open(&app.pool, &app.wakeups, user.id, parse_id(&id, "project")?).await?;
    let url = sessions::enter_url(
        &app.config,
        user.id,
        login_session,
        &opened.session_id,
        super::now_unix(),
    );
    let status = if opened.existing {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((
        status,
        [(header::CACHE_CONTROL, "no-store")],
        Json(json!({
            "session_id": opened.session_id,
            "url": url,
            "state": opened.state,
        })),
    )
        .into_response())
}

async fn stop_session(State(app): State<App>, ctx: Ctx, Path(sid): Path<String>) -> ApiResult {
    let (user, _) = ctx.require_user()?;
    let state = ending::stop(
        &app.pool,
        &app.wakeups,
        Some(user.id),
        &sid,
        "stopped_by_user",
    )
    .await?;
    Ok(Json(json!({ "session_id": sid, "state": state })).into_response())
}

async fn admin_stop_session(
    State(app): State<App>,
    ctx: Ctx,
    Path(sid): Path<String>,
) -> ApiResult {
    ctx.require_admin()?;
    let state = ending::stop(&app.pool, &app.wakeups, None, &sid, "stopped_by_admin").await?;
    Ok(Json(json!({ "session_id": sid, "state": state })).into_response())
}

async fn list_hosts(
    State(app): State<App>,
    ctx: Ctx,
    ApiQuery(page): ApiQuery<BeforeQuery>,
) -> ApiResult {
    let user = ctx.require_host_owner()?;
    let page = hosts::list(&app.pool, Some(user.id), page.before).await?;
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

/// A session and, while it is live, the URL that enters it (with a fresh
/// ticket, so fetch it right before navigating).
async fn get_session(State(app): State<App>, ctx: Ctx, Path(sid): Path<String>) -> ApiResult {
    let (user, login_session) = ctx.require_user()?;
    let session = sessions::get_owned(&app.pool, user.id, &sid).await?;
    let url = session.is_live().then(|| {
        sessions::enter_url(
            &app.config,
            user.id,
            login_session,
            &session.sid,
            super::now_unix(),
        )
    });
    let ended = (!session.is_live()).then(|| session.end_explanation());
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
            "ended_because": ended,
        })),
    )
        .into_response())
}

async fn list_packages(State(app): State<App>) -> ApiResult {
    let list = packages::list(&app.pool, false).await?;
    Ok(Json(json!({ "packages": list })).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct UserSearch {
    #[serde(default)]
    pub q: String,
    #[serde(default = "first_page")]
    pub page: u64,
    #[serde(default = "default_per_page")]
    pub per_page: u64,
}

fn first_page() -> u64 {
    1
}
fn default_per_page() -> u64 {
    25
}

impl UserSearch {
    pub fn checked(&self) -> Result<(u64, u64), AppError> {
        if self.page == 0 {
            return Err(AppError::invalid("page", "Pages start at 1."));
        }
        if !(1..=200).contains(&self.per_page) {
            return Err(AppError::invalid(
                "per_page",
                "Show between 1 and 200 users a page.",
            ));
        }
        Ok(((self.page - 1).saturating_mul(self.per_page), self.per_page))
    }
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

/// Every field optional: what is sent replaces, the rest stays.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PackagePatch {
    name: Option<String>,
    description: Option<String>,
    price_minor: Option<u64>,
    currency: Option<String>,
    compute_minutes: Option<u32>,
    max_concurrent_sessions: Option<u32>,
    cpu_cores: Option<f64>,
    memory_mib: Option<u32>,
    storage_quota_mib: Option<u32>,
    validity_days: Option<u32>,
    retired: Option<bool>,
}

async fn admin_update_package(
    State(app): State<App>,
    ctx: Ctx,
    Path(id): Path<String>,
    ApiJson(patch): ApiJson<PackagePatch>,
) -> ApiResult {
    ctx.require_admin()?;
    let id = parse_id(&id, "package")?;
    let current = PackageInput::from(packages::get(&app.pool, id).await?);
    let merged = PackageInput {
        name: patch.name.unwrap_or(current.name),
        description: patch.description.unwrap_or(current.description),
        price_minor: patch.price_minor.unwrap_or(current.price_minor),
        currency: patch.currency.unwrap_or(current.currency),
        compute_minutes: patch.compute_minutes.unwrap_or(current.compute_minutes),
        max_concurrent_sessions: patch
            .max_concurrent_sessions
            .unwrap_or(current.max_concurrent_sessions),
        cpu_cores: patch.cpu_cores.unwrap_or(current.cpu_cores),
        memory_mib: patch.memory_mib.unwrap_or(current.memory_mib),
        storage_quota_mib: patch.storage_quota_mib.unwrap_or(current.storage_quota_mib),
        validity_days: patch.validity_days.unwrap_or(current.validity_days),
        retired: patch.retired.unwrap_or(current.retired),
    };
    let package = packages::update(&app.pool, id, merged).await?;
    Ok(Json(json!({ "package": package })).into_response())
}
