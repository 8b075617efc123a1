//! A project's files for its owner: the version history, a version as a
//! zip, a zip uploaded as a new version, an older version restored.

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::app::App;
use crate::snapshots::files;
use crate::web::auth::Ctx;
use crate::web::errors::ApiResult;
use crate::web::extract::{parse_id, ApiQuery};

pub fn routes() -> Router<App> {
    Router::new()
        .route("/projects/{id}/versions", get(list_versions))
        // Uploads are spooled to disk; the owner's quota bounds them instead.
        .route(
            "/projects/{id}/archive",
            get(download)
                .post(upload)
                .layer(DefaultBodyLimit::disable()),
        )
        .route("/projects/{id}/versions/{n}/restore", post(restore))
}

async fn list_versions(State(app): State<App>, ctx: Ctx, Path(id): Path<String>) -> ApiResult {
    let (user, _) = ctx.require_user()?;
    let list = files::list(&app.pool, user.id, parse_id(&id, "project")?).await?;
    Ok(Json(json!({ "versions": list })).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ArchiveQuery {
    version: Option<u64>,
}

/// The archive response of a download, for the API and the page alike.
pub fn zip_response(download: files::Download) -> axum::response::Response {
    let disposition = format!("attachment; filename=\"{}\"", download.filename);
    let mut response = Body::from_stream(download.body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/zip"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Ok(value) = HeaderValue::from_str(&disposition) {
        headers.insert(header::CONTENT_DISPOSITION, value);
    }
    response
}

async fn download(
    State(app): State<App>,
    ctx: Ctx,
    Path(id): Path<String>,
    ApiQuery(query): ApiQuery<ArchiveQuery>,
) -> ApiResult {
    let (user, _) = ctx.require_user()?;
    let download = files::download(
        &app.pool,
        &app.store,
        user.id,
        parse_id(&id, "project")?,
        query.version,
    )
    .await?;
    Ok(zip_response(download))
}

async fn upload(
    State(app): State<App>,
    ctx: Ctx,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let (user, _) = ctx.require_user()?;
    let project_id = parse_id(&id, "project")?;
    let quota_bytes = files::quota(&app.pool, user.id, &app.config.billing.trial).await?;
    let declared_len = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let up = files::Upload {
        user: user.id,
        project_id,
        quota_bytes,
        declared_len,
        policy: &app.config.store,
    };
    let version = files::upload(&app.pool, &app.store, &up, body.into_data_stream()).await?;
    Ok((StatusCode::CREATED, Json(json!({ "version": version }))).into_response())
}

async fn restore(
    State(app): State<App>,
    ctx: Ctx,
    Path((id, n)): Path<(String, String)>,
) -> ApiResult {
    let (user, _) = ctx.require_user()?;
    let version = files::restore(
        &app.pool,
        &app.store,
        &app.config.store,
        &app.config.billing.trial,
        user.id,
        parse_id(&id, "project")?,
        parse_id(&n, "version")?,
    )
    .await?;
    Ok((StatusCode::CREATED, Json(json!({ "version": version }))).into_response())
}
