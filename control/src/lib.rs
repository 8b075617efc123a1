//! OpenCloud control: accounts, packages, projects, hosts, sessions, the
//! route stream, pages and the JSON API. This file only wires them together
//! and serves; `main.rs` only parses arguments. Every module below has one
//! concern, stated in its opening comment; `docs/architecture.md` maps them.

pub mod accounts;
pub mod app;
pub mod billing;
pub mod clock;
pub mod config;
pub mod db;
pub mod error;
pub mod host_ca;
pub mod hosts;
pub mod ids;
pub mod names;
pub mod packages;
pub mod projects;
pub mod routes;
pub mod sessions;
pub mod snapshots;
pub mod stats;
pub mod throttle;
pub mod web;

use std::future::Future;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use opencloud_protocol::metrics::{record_build_info, register_at_zero, LabelValue, Part};
use tokio::net::TcpListener;

pub use app::App;
pub use clock::now_unix;
pub use config::Config;

/// Installs the process-wide Prometheus recorder (once) and reports the build.
pub fn install_metrics() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Suffix("_seconds".into()),
            &[
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ],
        )?
        .install_recorder()?;
    record_build_info(Part::Control, env!("CARGO_PKG_VERSION"));
    Ok(handle)
}

/// The counters whose labels take fixed values, at zero before their first
/// event (payments and webhooks for the provider in use).
fn register_counters_at_zero(app: &App) {
    use accounts::LoginOutcome;
    use billing::ledger::ComputeFlow;
    use billing::providers::PaymentOutcome;
    use billing::webhook::WebhookRejection;
    use sessions::ending::EndReason;
    use sessions::queue;
    use sessions::room::{self, PlacementOutcome};

    let provider = [app.payments.provider.name()];
    register_at_zero(
        LoginOutcome::METRIC,
        &[("outcome", &LoginOutcome::labels())],
    );
    register_at_zero(
        PaymentOutcome::METRIC,
        &[
            ("provider", &provider),
            ("outcome", &PaymentOutcome::labels()),
        ],
    );
    register_at_zero(
        WebhookRejection::METRIC,
        &[
            ("provider", &provider),
            ("reason", &WebhookRejection::labels()),
        ],
    );
    register_at_zero(
        web::TOKEN_REJECTIONS,
        &[("reason", &opencloud_protocol::TokenError::labels())],
    );
    register_at_zero(
        PlacementOutcome::METRIC,
        &[("outcome", &PlacementOutcome::labels())],
    );
    register_at_zero(room::Retry::METRIC, &[("outcome", &room::Retry::labels())]);
    register_at_zero(queue::Exit::METRIC, &[("outcome", &queue::Exit::labels())]);
    register_at_zero(ComputeFlow::METRIC, &[("kind", &ComputeFlow::labels())]);
    register_at_zero(EndReason::METRIC, &[("reason", &EndReason::labels())]);
}

/// Listens on `addr`, naming the config `key` it came from when that fails.
async fn bind(addr: std::net::SocketAddr, key: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr} ({key}): {e}"))
}

/// Binds both listeners, then serves until `shutdown` resolves; in-flight
/// requests finish before this returns.
pub async fn serve(
    app: App,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let public = bind(app.config.listen_public, "listen.public").await?;
    let internal = bind(app.config.listen_internal, "listen.internal").await?;
    tracing::info!(
        public = %public.local_addr()?,
        internal = %internal.local_addr()?,
        url = %app.config.public_origin,
        "control listening"
    );

    if app.config.gateway_keys.is_empty() {
        tracing::warn!(
            "no gateway_keys configured: the internal route stream refuses every gateway"
        );
    }
    register_counters_at_zero(&app);
    tokio::spawn(routes::maintain(app.pool.clone(), app.stopping.subscribe()));
    tokio::spawn(throttle::sweep(
        app.pool.clone(),
        vec![
            (accounts::LOGIN_FAILURES, app.config.login.window_seconds),
            (
                accounts::REGISTRATION_ATTEMPTS,
                app.config.registration.window_seconds,
            ),
        ],
        app.stopping.subscribe(),
    ));
    tokio::spawn(sessions::queue::run(
        app.pool.clone(),
        app.wakeups.clone(),
        app.config.billing.host_share_percent,
        app.stopping.subscribe(),
    ));
    tokio::spawn(sessions::watch::watch(
        app.pool.clone(),
        app.wakeups.clone(),
        app.config.idle_timeout,
        app.stopping.subscribe(),
    ));
    // Histograms buffer every sample until drained; without a scrape they
    // would grow without bound.
    let metrics = app.metrics.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            tick.tick().await;
            metrics.run_upkeep();
        }
    });

    // One signal fans out to both servers, the watch streams and the jobs.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopping = app.stopping.clone();
    tokio::spawn(async move {
        shutdown.await;
        stopping.send_replace(true);
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };

    let public_server = axum::serve(
        public,
        web::public_router(app.clone())
            .into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(stopped(stop_rx.clone()));
    let internal_server = axum::serve(internal, web::internal_router(app.clone()))
        .with_graceful_shutdown(stopped(stop_rx));
    let (a, b) = tokio::join!(async { public_server.await }, async {
        internal_server.await
    });
    a?;
    b?;
    app.pool.disconnect().await.ok();
    tracing::info!("control stopped");
    Ok(())
}
