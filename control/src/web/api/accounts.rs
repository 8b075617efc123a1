//! The account calls: registering, logging in and out (token and cookie),
//! changing the password, who am I, and changing my name.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::accounts::{self, NewUser, Role};
use crate::app::App;
use crate::billing::ledger;
use crate::web::auth::{self, Ctx};
use crate::web::cookies;
use crate::web::errors::ApiResult;
use crate::web::extract::{parse_role, ApiJson};

pub fn routes() -> Router<App> {
    Router::new()
        .route("/auth/register", post(register))
        .route("/auth/login", post(login))
        .route("/auth/logout", post(logout))
        .route("/auth/password", post(change_password))
        .route("/me", get(me).patch(rename))
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

async fn register(
    State(app): State<App>,
    ctx: Ctx,
    ApiJson(body): ApiJson<RegisterRequest>,
) -> ApiResult {
    let role = body
        .role
        .as_deref()
        .map(parse_role)
        .transpose()?
        .unwrap_or(Role::Customer);
    let user = accounts::register(
        &app.pool,
        &app.passwords,
        &app.config.registration,
        &app.config.billing,
        ctx.client_ip,
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
    let (logged_in, token) = auth::log_in(&app, &ctx, &body.email, &body.password).await?;
    Ok((
        [(
            header::SET_COOKIE,
            cookies::platform_cookie(&app, token.clone()),
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
    let cleared = auth::log_out(&app, &ctx).await?;
    Ok((
        [(header::SET_COOKIE, cleared)],
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

/// Who am I, with my compute balance and what my package allows.
async fn me(State(app): State<App>, ctx: Ctx) -> ApiResult {
    let (user, _) = ctx.require_user()?;
    let plan = ledger::plan(&mut app.pool.get_conn().await?, user.id).await?;
    Ok(Json(json!({
        "user": user,
        "balance_seconds": plan.balance_seconds,
        "limits": plan.limits,
    }))
    .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RenameRequest {
    name: String,
}

async fn rename(
    State(app): State<App>,
    ctx: Ctx,
    ApiJson(body): ApiJson<RenameRequest>,
) -> ApiResult {
    let (user, _) = ctx.require_user()?;
    let user = accounts::rename(&app.pool, user.id, &body.name).await?;
    Ok(Json(json!({ "user": user })).into_response())
}
