//! Running the service: the health check, the Prometheus scrape (with the
//! gauges read at scrape time) and the middleware that counts and times
//! every request by its route.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::app::App;
use crate::sessions::state::Phase;

pub async fn metrics(State(app): State<App>) -> impl IntoResponse {
    let pool = app.pool.metrics();
    let open = pool
        .connection_count
        .load(std::sync::atomic::Ordering::Relaxed);
    let idle = pool
        .connections_in_pool
        .load(std::sync::atomic::Ordering::Relaxed);
    metrics::gauge!("opencloud_control_db_pool_connections", "state" => "idle").set(idle as f64);
    metrics::gauge!("opencloud_control_db_pool_connections", "state" => "in_use")
        .set(open.saturating_sub(idle) as f64);
    metrics::gauge!("opencloud_control_db_pool_max").set(app.config.pool_max as f64);
    // Sessions and hosts by state, read at scrape time.
    if let Ok(counts) = crate::sessions::count_by_state(&app.pool).await {
        let live: Vec<&'static str> = Phase::ALL
            .into_iter()
            .filter(|p| p.is_live())
            .map(Phase::as_column)
            .collect();
        set_state_gauges("opencloud_control_sessions", &live, &counts);
    }
    if let Ok(counts) = crate::hosts::count_by_state(&app.pool).await {
        let states = ["online", "draining", "offline", "revoked"];
        set_state_gauges("opencloud_control_hosts", &states, &counts);
    }
    if let Ok(bytes) = crate::snapshots::versions::total_bytes(&app.pool).await {
        metrics::gauge!("opencloud_control_snapshot_store_bytes").set(bytes as f64);
    }
    crate::stats::publish(&app.pool).await;
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics.render(),
    )
}

/// One gauge per state, zero for states with no rows.
fn set_state_gauges(name: &'static str, states: &[&'static str], counts: &[(String, u64)]) {
    for state in states {
        let n = counts
            .iter()
            .find(|(s, _)| s == state)
            .map_or(0, |(_, n)| *n);
        metrics::gauge!(name, "state" => *state).set(n as f64);
    }
}

/// Healthy when a pooled connection answers a ping.
pub async fn healthz(State(app): State<App>) -> Response {
    let ping = async {
        let mut conn = app.pool.get_conn().await?;
        mysql_async::prelude::Queryable::ping(&mut conn).await
    };
    match tokio::time::timeout(std::time::Duration::from_secs(2), ping).await {
        Ok(Ok(())) => (StatusCode::OK, Json(serde_json::json!({"status": "ok"}))).into_response(),
        _ => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"status": "database unreachable"})),
        )
            .into_response(),
    }
}

/// The method as a label: anything but the usual ones is `other`, since a
/// client may send any token as a method and each would be a new series.
fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

pub async fn track_metrics(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    let method = method_label(request.method());
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!("opencloud_control_http_requests_total", "route" => route.clone(), "method" => method, "status" => status)
        .increment(1);
    metrics::histogram!("opencloud_control_http_request_duration_seconds", "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}
