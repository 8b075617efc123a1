//! The agent's own listeners: the host link on the link port (which also
//! answers the gateways' `/healthz` probe) and, when configured, Prometheus
//! `/metrics` (behind `metrics_key` when one is set). Both are bound before
//! anything else starts, so a taken port stops the agent at once.

use std::sync::{Arc, OnceLock};

use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use opencloud_protocol::credentials::bearer_is;
use opencloud_protocol::metrics::{record_build_info, Part};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::Config;
use crate::error::Error;
use crate::host_link::{self, LinkIdentity, Sessions};

/// The bound listeners, not yet serving.
pub struct Listeners {
    link: TcpListener,
    /// The metrics listener and the recorder it renders (`None`: metrics
    /// could not be installed, so nothing is served).
    metrics: Option<(TcpListener, Option<PrometheusHandle>)>,
    metrics_key: Option<String>,
}

/// Binds the metrics listener (if configured) and the link listener.
pub async fn bind(config: &Config) -> Result<Listeners, Error> {
    let metrics = match config.metrics_listen {
        Some(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|e| Error::Setup(format!("metrics_listen {addr}: {e}")))?;
            Some((listener, install_metrics()))
        }
        None => None,
    };
    let link_addr = config.link_addr();
    let link = TcpListener::bind(link_addr)
        .await
        .map_err(|e| Error::Setup(format!("link_port: cannot listen on {link_addr}: {e}")))?;
    Ok(Listeners {
        link,
        metrics,
        metrics_key: config.metrics_key.clone(),
    })
}

impl Listeners {
    /// Serves both until `stop` turns true; the link forwards to
    /// `sessions` once `identity` holds this host's link certificate.
    pub fn spawn(
        self,
        tasks: &mut tokio::task::JoinSet<()>,
        identity: watch::Receiver<Option<LinkIdentity>>,
        sessions: Arc<dyn Sessions>,
        stop: &watch::Receiver<bool>,
    ) {
        tasks.spawn(host_link::serve(
            self.link,
            identity,
            sessions,
            stop.clone(),
        ));
        if let Some((listener, Some(handle))) = self.metrics {
            tasks.spawn(serve_metrics(
                listener,
                handle,
                self.metrics_key,
                stop.clone(),
            ));
        }
    }
}

async fn serve_metrics(
    listener: TcpListener,
    handle: PrometheusHandle,
    key: Option<String>,
    stop: watch::Receiver<bool>,
) {
    let app = axum::Router::new().route(
        "/metrics",
        get(move |headers: HeaderMap| {
            let handle = handle.clone();
            let admitted = key.as_deref().is_none_or(|key| bearer_is(&headers, key));
            async move {
                if !admitted {
                    return (
                        StatusCode::UNAUTHORIZED,
                        "send the metrics key as Authorization: Bearer <key>\n",
                    )
                        .into_response();
                }
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4",
                    )],
                    handle.render(),
                )
                    .into_response()
            }
        }),
    );
    serve("metrics", listener, app, stop).await;
}

/// Serves `app` until `stop` turns true; `name` names the listener in logs.
async fn serve(
    name: &str,
    listener: TcpListener,
    app: axum::Router,
    mut stop: watch::Receiver<bool>,
) {
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await;
    if let Err(e) = served {
        tracing::error!("{name} listener failed: {e}");
    }
}

/// The process-wide Prometheus recorder (installed once, even when an
/// embedding process runs several agents).
fn install_metrics() -> Option<PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let installed = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full("opencloud_agent_spawn_seconds".into()),
                    // Warm binds take tenths of a second, cold starts seconds.
                    &[
                        0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0,
                    ],
                )
                .and_then(|b| b.install_recorder());
            match installed {
                Ok(handle) => {
                    record_build_info(Part::Agent, env!("CARGO_PKG_VERSION"));
                    crate::supervisor::register_counters_at_zero();
                    Some(handle)
                }
                Err(e) => {
                    tracing::warn!("metrics are off: {e}");
                    None
                }
            }
        })
        .clone()
}
