//! Buying and the provider's webhooks: placing an order (its checkout URL),
//! reading one's orders, and `POST /payments/webhooks/{provider}`, which
//! carries no cookie and is trusted only for its signature. What the
//! ledger says: my compute time, a host owner's earnings, and the admins'
//! calls that move money (grants and revocations, refunds, payouts).

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::app::App;
use crate::billing::{ledger, orders, reports, webhook};
use crate::error::AppError;
use crate::web::auth::Ctx;
use crate::web::errors::ApiResult;
use crate::web::extract::{parse_id, ApiJson};

pub fn routes() -> Router<App> {
    Router::new()
        .route("/orders", post(create_order).get(list_orders))
        .route("/orders/{id}", get(get_order))
        .route("/me/billing", get(my_billing))
        .route("/hosts/earnings", get(my_earnings))
        .route("/admin/billing", get(admin_billing))
        .route("/admin/users/{id}/credit", post(admin_credit))
        .route("/admin/orders/{id}/refund", post(admin_refund))
        .route("/admin/payouts", post(admin_payout))
}

/// The webhook route, mounted outside the cookie and CSRF middleware.
pub fn webhook_routes() -> Router<App> {
    Router::new().route(
        "/api/v1/payments/webhooks/{provider}",
        post(receive_webhook),
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OrderRequest {
    package_id: u64,
}

async fn create_order(
    State(app): State<App>,
    ctx: Ctx,
    ApiJson(body): ApiJson<OrderRequest>,
) -> ApiResult {
    let (user, _) = ctx.require_user()?;
    let (order, checkout_url) = orders::create(
        &app.pool,
        app.payments.provider.as_ref(),
        &app.config.public_origin,
        user.id,
        body.package_id,
    )
    .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"order_id": order.id, "checkout_url": checkout_url, "order": order})),
    )
        .into_response())
}

async fn list_orders(State(app): State<App>, ctx: Ctx) -> ApiResult {
    let (user, _) = ctx.require_user()?;
    let list = orders::list(&app.pool, Some(user.id), 200).await?;
    Ok(Json(json!({ "orders": list })).into_response())
}

/// An order and, once paid, the balance it brought: what the return page polls.
async fn get_order(State(app): State<App>, ctx: Ctx, Path(id): Path<String>) -> ApiResult {
    let (user, _) = ctx.require_user()?;
    let order = orders::get_owned(&app.pool, user.id, parse_id(&id, "order")?).await?;
    let balance = crate::billing::ledger::balance(&app.pool, user.id).await?;
    Ok(Json(json!({
        "order": order,
        "paid": order.is_paid(),
        "message": order_message(&order),
        "balance_seconds": balance,
        "balance_text": crate::billing::money::seconds(balance as i64),
    }))
    .into_response())
}

/// What the return page says about an order.
pub fn order_message(order: &orders::Order) -> String {
    match order.status.as_str() {
        "paid" => format!("Payment received: {} added.", order.compute_display()),
        "refunded" => "This payment was refunded.".into(),
        _ => match &order.last_failure {
            Some(failure) => format!("Not paid yet: {failure}"),
            None => "Waiting for the payment to be confirmed…".into(),
        },
    }
}

async fn receive_webhook(
    State(app): State<App>,
    Path(provider): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    let active = app.payments.provider.as_ref();
    if provider != active.name() {
        return Err(AppError::NotFound("payment provider").into());
    }
    let signature = headers
        .get(webhook::SIGNATURE_HEADER)
        .and_then(|v| v.to_str().ok());
    let outcome = orders::apply_webhook(
        &app.pool,
        active,
        signature,
        &body,
        crate::clock::now_unix(),
    )
    .await?;
    Ok(Json(json!({ "received": true, "outcome": outcome })).into_response())
}

async fn my_billing(State(app): State<App>, ctx: Ctx) -> ApiResult {
    let (user, _) = ctx.require_user()?;
    Ok(Json(reports::account(&app.pool, user.id).await?).into_response())
}

async fn my_earnings(State(app): State<App>, ctx: Ctx) -> ApiResult {
    let user = ctx.require_host_owner()?;
    Ok(Json(reports::earnings(&app.pool, user.id).await?).into_response())
}

async fn admin_billing(State(app): State<App>, ctx: Ctx) -> ApiResult {
    ctx.require_admin()?;
    let summary = reports::admin(&app.pool).await?;
    let orders = orders::list(&app.pool, None, 100).await?;
    Ok(Json(json!({ "summary": summary, "orders": orders })).into_response())
}

/// A missing reason or reference is the domain's error, naming its field.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreditRequest {
    seconds: i64,
    #[serde(default)]
    reason: String,
}

async fn admin_credit(
    State(app): State<App>,
    ctx: Ctx,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<CreditRequest>,
) -> ApiResult {
    let admin = ctx.require_admin()?;
    let user_id = parse_id(&id, "user")?;
    let moved = ledger::adjust(
        &app.pool,
        &app.config.billing.trial,
        user_id,
        body.seconds,
        admin.id,
        &body.reason,
    )
    .await?;
    let balance = ledger::balance(&app.pool, user_id).await?;
    Ok(Json(json!({ "moved_seconds": moved, "balance_seconds": balance })).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RefundRequest {
    #[serde(default)]
    reason: String,
}

async fn admin_refund(
    State(app): State<App>,
    ctx: Ctx,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<RefundRequest>,
) -> ApiResult {
    let admin = ctx.require_admin()?;
    let order = orders::refund(
        &app.pool,
        app.payments.provider.as_ref(),
        parse_id(&id, "order")?,
        admin.id,
        &body.reason,
    )
    .await?;
    Ok(Json(json!({ "order": order })).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PayoutRequest {
    owner_id: u64,
    amount_minor: u64,
    currency: String,
    #[serde(default)]
    reference: String,
}

async fn admin_payout(
    State(app): State<App>,
    ctx: Ctx,
    ApiJson(body): ApiJson<PayoutRequest>,
) -> ApiResult {
    let admin = ctx.require_admin()?;
    ledger::record_payout(
        &app.pool,
        body.owner_id,
        body.amount_minor,
        &body.currency,
        admin.id,
        &body.reference,
    )
    .await?;
    let owed = reports::owed(&mut app.pool.get_conn().await?, body.owner_id).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "recorded": true, "owed": owed })),
    )
        .into_response())
}
