//! The packages on sale, for anyone.

use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::app::App;
use crate::packages;
use crate::web::errors::ApiResult;

pub fn routes() -> Router<App> {
    Router::new().route("/packages", get(list_packages))
}

async fn list_packages(State(app): State<App>) -> ApiResult {
    let list = packages::list(&app.pool, false).await?;
    Ok(Json(json!({ "packages": list })).into_response())
}
