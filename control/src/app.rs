//! The state every request handler and background job shares: config,
//! database pool, password hasher, host CA, payment provider, project store, metrics handle, the stop signal
//! and the agents' wake-ups. Cheap to clone.

use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusHandle;
use mysql_async::Pool;

use crate::accounts;
use crate::billing::providers::Payments;
use crate::config::Config;
use crate::host_ca::HostCa;
use crate::sessions::commands::Wakeups;
use crate::snapshots::store::Store;

/// Everything a request handler may need, cheap to clone.
#[derive(Clone)]
pub struct App {
    pub config: Arc<Config>,
    pub pool: Pool,
    pub passwords: accounts::Passwords,
    /// Signs the host link's certificates.
    pub host_ca: HostCa,
    pub metrics: PrometheusHandle,
    /// The payment provider in use.
    pub payments: Payments,
    /// Where projects' snapshots live.
    pub store: Store,
    /// Turns true when the service is shutting down, so long-lived
    /// responses (route watch streams) and background jobs end.
    pub stopping: Arc<tokio::sync::watch::Sender<bool>>,
    /// Wakes agents' command polls when their host gets a command.
    pub wakeups: Wakeups,
}

impl App {
    pub fn new(
        config: Config,
        pool: Pool,
        host_ca: HostCa,
        payments: Payments,
        store: Store,
        metrics: PrometheusHandle,
    ) -> Self {
        let passwords = accounts::Passwords::new(config.pbkdf2_iterations);
        Self {
            config: Arc::new(config),
            pool,
            passwords,
            host_ca,
            payments,
            store,
            metrics,
            stopping: Arc::new(tokio::sync::watch::Sender::new(false)),
            wakeups: Wakeups::default(),
        }
    }
}
