//! The admin's money calls: refunding a paid order through the provider
//! that took it (the ledger takes the lot's unused time back).

use axum::extract::{Path, State};
use axum::response::IntoResponse;
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::app::App;
use crate::billing::orders;
use crate::web::auth::Ctx;
use crate::web::errors::ApiResult;
use crate::web::extract::{parse_id, ApiJson};

pub fn routes() -> Router<App> {
    Router::new().route("/admin/orders/{id}/refund", post(refund_order))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RefundRequest {
    reason: String,
}

async fn refund_order(
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
