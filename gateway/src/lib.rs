//! OpenCloud gateway: a Pingora proxy in front of everything users reach.
//!
//! `main.rs` parses arguments; [`build_server`] assembles the services the
//! tests also run: the proxy on the public listener, `/metrics` on its own
//! listener, and the route watch in the background.

pub mod acme;
pub mod banner;
pub mod class;
pub mod clock;
pub mod config;
pub mod connections;
pub mod control_client;
pub mod deadline;
pub mod fast_map;
pub mod forwarding;
pub mod hardening;
pub mod health;
pub mod host_link;
pub mod link_certificate;
pub mod pages;
pub mod proxy;
pub mod redirect;
pub mod store;
pub mod table;
pub mod tickets;
pub mod tls;
pub mod usage;
pub mod verified;
pub mod watch;

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use opencloud_protocol::metrics::{record_build_info, register_at_zero, LabelValue, Part};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{Server, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService};
use pingora::services::listening::Service;

pub use config::Config;

/// Builds the Pingora server with every gateway service added.
pub fn build_server(config: Config, opt: Opt) -> anyhow::Result<Server> {
    let metrics = install_metrics()?;
    let mut store = store::Store::open(&config.state_dir)
        .map_err(|e| anyhow::anyhow!("state_dir {}: {e}", config.state_dir.display()))?;
    // Serve the last good table at once, before control answers.
    let loaded = store.load();
    store
        .resume_log()
        .map_err(|e| anyhow::anyhow!("state_dir {}: {e}", config.state_dir.display()))?;
    tracing::info!(
        version = loaded.version,
        sessions = loaded.sessions.len(),
        "route table loaded from disk"
    );
    let routes = table::Routes::new(loaded);

    let server_conf = ServerConf {
        // One worker thread: the gateway is measured on one core.
        threads: 1,
        // With one thread there is nothing to steal; skipping it is cheaper.
        work_stealing: false,
        // The upstream read timeout (60 s) is armed for nearly every response
        // and almost never fires: Tokio's timer drops a cancelled one at once,
        // Pingora's fast timer keeps it until its deadline.
        fast_timeout_to_tokio_threshold_seconds: Some(5),
        grace_period_seconds: Some(1),
        graceful_shutdown_timeout_seconds: Some(10),
        upgrade_sock: config.state_dir.join("upgrade.sock").display().to_string(),
        pid_file: config.state_dir.join("gateway.pid").display().to_string(),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, server_conf);
    server.bootstrap();

    let control =
        control_client::ControlClient::new(&config.control_internal_url, &config.gateway_key)?;
    let link_credentials = link_certificate::ClientCredentials::default();
    let link_renewer = link_certificate::Renewer::open(
        &config.state_dir,
        link_credentials.clone(),
        control.clone(),
    )?;
    let health = health::HostHealth::default();
    let usage = usage::UsageBook::default();
    let connections = connections::OpenConnections::default();
    let gateway = proxy::Gateway {
        config: config.clone(),
        routes: routes.clone(),
        used_tickets: tickets::UsedTickets::default(),
        health: health.clone(),
        usage: usage.clone(),
        metrics: proxy::RequestMetrics::default(),
        verified: verified::VerifiedTokens::default(),
        connections: connections.clone(),
        link_credentials,
        control: control.clone(),
    };
    let proxy = pingora::proxy::http_proxy(&server.configuration, gateway);
    let app = deadline::HeaderDeadline {
        inner: Arc::new(proxy),
        limits: deadline::Limits {
            head: config.header_timeout,
            answer: config.read_timeout,
        },
    };
    let mut proxy_service = Service::new("gateway".to_owned(), app);
    let public = config.listen_public.to_string();
    match &config.tls {
        None => proxy_service.add_tcp(&public),
        Some(tls) => {
            let certificates = add_tls_listener(&mut proxy_service, &public, tls, &config)?;
            server.add_service(background_service(
                "certificate reload",
                Once::new(CertificateWatch(certificates)),
            ));
            if let Some(acme) = &tls.acme {
                if let Some(ca) = &acme.directory_ca {
                    std::fs::read(ca).map_err(|e| {
                        anyhow::anyhow!(
                            "tls.acme.directory_ca {}: cannot read the file: {e}",
                            ca.display()
                        )
                    })?;
                }
                server.add_service(background_service(
                    "acme",
                    Once::new(acme::Acme {
                        config: acme.clone(),
                        files: tls.platform.clone(),
                        platform_host: config.platform_host.clone(),
                        state_dir: config.state_dir.clone(),
                        challenges: config.state_dir.join(redirect::CHALLENGES_DIR),
                    }),
                ));
            }
        }
    }
    server.add_service(proxy_service);
    if let Some(http) = config.listen_http {
        let challenges = config.state_dir.join(redirect::CHALLENGES_DIR);
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&challenges)
                .map_err(|e| anyhow::anyhow!("{}: {e}", challenges.display()))?;
        }
        let mut redirect_service = Service::new(
            "https redirect".to_owned(),
            redirect::HttpsRedirect {
                platform_host: config.platform_host.clone(),
                session_domain: config.session_domain.clone(),
                challenges,
            },
        );
        redirect_service.add_tcp(&http.to_string());
        server.add_service(redirect_service);
    }

    server.add_service(background_service(
        "metrics upkeep",
        Once::new(MetricsUpkeep(metrics.clone())),
    ));
    let mut metrics_service = Service::new(
        "metrics".to_owned(),
        MetricsApp {
            handle: metrics,
            key: config.metrics_key.clone(),
            routes: routes.clone(),
            health: health.clone(),
            started: clock::unix_now(),
        },
    );
    metrics_service.add_tcp(&config.listen_metrics.to_string());
    server.add_service(metrics_service);

    server.add_service(background_service(
        "host health",
        Once::new(health::HealthChecker {
            routes: routes.clone(),
            health,
            gateway_name: config.name.clone(),
            control: control.clone(),
        }),
    ));
    server.add_service(background_service(
        "link client certificate",
        Once::new(link_renewer),
    ));
    server.add_service(background_service(
        "usage reports",
        Once::new(usage::UsageReporter {
            book: usage,
            control: control.clone(),
        }),
    ));
    let watcher = watch::Watcher {
        routes,
        connections,
        store,
        control,
    };
    server.add_service(background_service("route watch", Once::new(watcher)));
    Ok(server)
}

/// The public listener on TLS: certificates chosen by SNI (checked now, so
/// a pair that cannot work stops start-up), HTTP/2 offered by ALPN.
fn add_tls_listener<A: pingora::apps::ServerApp + Send + Sync + 'static>(
    service: &mut Service<A>,
    address: &str,
    tls_config: &config::TlsConfig,
    config: &Config,
) -> anyhow::Result<Arc<tls::Certificates>> {
    pingora::tls::install_default_crypto_provider();
    let certificates = Arc::new(tls::Certificates::load(
        tls_config,
        &config.platform_host,
        config.session_domain.as_str(),
    )?);
    let mut settings = pingora::listeners::tls::TlsSettings::intermediate("", "")
        .map_err(|e| anyhow::anyhow!("tls: {e}"))?;
    settings.set_cert_resolver(certificates.clone());
    settings.enable_h2();
    service.add_tls_with_settings(address, None, settings);
    Ok(certificates)
}

/// Reloads the certificates when their files change or on SIGHUP.
struct CertificateWatch(Arc<tls::Certificates>);

#[async_trait]
impl Task for CertificateWatch {
    async fn run(self) {
        self.0.watch().await
    }
}

fn install_metrics() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Suffix("_seconds".into()),
            &[
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
            ],
        )?
        .install_recorder()?;
    record_build_info(Part::Gateway, env!("CARGO_PKG_VERSION"));
    register_counters_at_zero();
    Ok(handle)
}

/// The counters whose labels take fixed values, at zero before their first
/// event.
fn register_counters_at_zero() {
    let reasons: Vec<&str> = opencloud_protocol::TokenError::labels()
        .into_iter()
        .chain(proxy::CREDENTIAL_REFUSALS)
        .collect();
    register_at_zero(
        proxy::TOKEN_REJECTIONS,
        &[("kind", &proxy::TOKEN_KINDS), ("reason", &reasons)],
    );
    register_at_zero(
        proxy::ORIGIN_REFUSALS,
        &[("reason", &proxy::ORIGIN_REFUSAL_REASONS)],
    );
    let rejected: Vec<&str> = hardening::REASONS
        .into_iter()
        .chain([deadline::SLOW_HEADER])
        .collect();
    register_at_zero(hardening::REJECTED_REQUESTS, &[("reason", &rejected)]);
    register_at_zero(
        connections::CONNECTIONS_CLOSED,
        &[("reason", &connections::Reason::labels())],
    );
}

/// How long ago control's stream last changed or confirmed the table (since
/// the gateway started, before the first time).
const ROUTE_TABLE_AGE: &str = "opencloud_gateway_route_table_age_seconds";

/// `/metrics` on the metrics listener, nothing else; with a key configured,
/// only for a scrape that presents it.
struct MetricsApp {
    handle: PrometheusHandle,
    key: Option<config::MetricsKey>,
    routes: table::Routes,
    health: health::HostHealth,
    /// Unix seconds when the gateway started.
    started: u64,
}

impl MetricsApp {
    /// The recorder's text plus what is read at scrape time.
    fn render(&self) -> String {
        let since = watch::last_update().unwrap_or(self.started);
        metrics::gauge!(ROUTE_TABLE_AGE).set(clock::unix_now().saturating_sub(since) as f64);
        let mut text = self.handle.render();
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(&self.health.exposition(&self.routes.current()));
        text
    }
}

#[async_trait]
impl ServeHttp for MetricsApp {
    async fn response(&self, session: &mut ServerSession) -> http::Response<Vec<u8>> {
        let req = session.req_header();
        let admitted = self.key.as_ref().is_none_or(|key| key.admits(&req.headers));
        let (status, body) = if !admitted {
            (
                401,
                b"send the metrics key as Authorization: Bearer <key>\n".to_vec(),
            )
        } else if req.uri.path() == "/metrics" {
            (200, self.render().into_bytes())
        } else {
            (404, b"not found\n".to_vec())
        };
        http::Response::builder()
            .status(status)
            .header(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")
            .header(http::header::CONTENT_LENGTH, body.len())
            .body(body)
            .expect("a static response is valid")
    }
}

/// Runs a task once as a background service.
struct Once<T>(Mutex<Option<T>>);

impl<T> Once<T> {
    fn new(task: T) -> Self {
        Self(Mutex::new(Some(task)))
    }
}

/// A long-running task the server starts once and stops at shutdown.
#[async_trait]
pub trait Task: Send + Sync + 'static {
    async fn run(self);
}

#[async_trait]
impl Task for acme::Acme {
    async fn run(self) {
        acme::Acme::run(self).await
    }
}

#[async_trait]
impl Task for watch::Watcher {
    async fn run(self) {
        watch::Watcher::run(self).await
    }
}

#[async_trait]
impl Task for health::HealthChecker {
    async fn run(self) {
        health::HealthChecker::run(self).await
    }
}

#[async_trait]
impl Task for link_certificate::Renewer {
    async fn run(self) {
        link_certificate::Renewer::run(self).await
    }
}

#[async_trait]
impl Task for usage::UsageReporter {
    async fn run(self) {
        usage::UsageReporter::run(self).await
    }
}

/// Drains histogram samples into their buckets: they are buffered until
/// then, and would grow without bound on a gateway nobody scrapes.
struct MetricsUpkeep(PrometheusHandle);

#[async_trait]
impl Task for MetricsUpkeep {
    async fn run(self) {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            tick.tick().await;
            self.0.run_upkeep();
        }
    }
}

#[async_trait]
impl<T: Task> BackgroundService for Once<T> {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let task = self.0.lock().ok().and_then(|mut t| t.take());
        if let Some(task) = task {
            tokio::select! {
                _ = task.run() => {}
                _ = shutdown.changed() => {}
            }
        }
    }
}
