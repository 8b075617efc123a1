//! Host reachability: every host in the route table is probed every 2 s
//! (any HTTP answer counts; connect timeout 1 s), and a failed connect while
//! proxying marks its host down at once. Requests for a host known to be
//! down get a clear page immediately instead of waiting on a dead address.
//! Results are reported to control in batches.

use std::collections::HashMap;
use std::fmt::Write;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures_util::StreamExt;
use opencloud_protocol::reports::{HealthReport, HostReachability};

use crate::control_client::ControlClient;
use crate::fast_map::FastMap;
use crate::table::{RouteTable, Routes};

pub const PROBE_INTERVAL: Duration = Duration::from_secs(2);
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Probes in flight at once, so a large table cannot exhaust sockets.
const PROBES_AT_ONCE: usize = 256;
/// Failed probes in a row before an active check marks a host down (a
/// failed connect while proxying marks it down at once).
const FAILURES_TO_MARK_DOWN: u8 = 2;

const HOST_REACHABLE: &str = "opencloud_gateway_host_reachable";

/// Host id → reachable, as last seen by this gateway.
#[derive(Clone, Default)]
pub struct HostHealth(Arc<RwLock<FastMap<u64, bool>>>);

/// Failed probes in a row, per host (owned by the checker task).
type Streaks = HashMap<u64, u8>;

impl HostHealth {
    /// False only when the host is known to be down.
    pub fn is_up(&self, host: u64) -> bool {
        self.0
            .read()
            .map(|m| m.get(&host).copied().unwrap_or(true))
            .unwrap_or(true)
    }

    pub fn mark(&self, host: u64, reachable: bool) {
        if let Ok(mut map) = self.0.write() {
            map.insert(host, reachable);
        }
    }

    /// `opencloud_gateway_host_reachable{host}` (1 or 0) as exposition
    /// text, for the hosts in `table` this gateway has probed. Written at
    /// scrape time because the recorder cannot drop a series: a host gone
    /// from the table simply has none.
    pub fn exposition(&self, table: &RouteTable) -> String {
        let mut hosts: Vec<(u64, bool)> = self
            .snapshot()
            .into_iter()
            .filter(|(id, _)| table.hosts.contains_key(id))
            .collect();
        if hosts.is_empty() {
            return String::new();
        }
        hosts.sort_unstable();
        let mut text = format!("# TYPE {HOST_REACHABLE} gauge\n");
        for (id, reachable) in hosts {
            let _ = writeln!(
                text,
                "{HOST_REACHABLE}{{host=\"{id}\"}} {}",
                u8::from(reachable)
            );
        }
        text
    }

    fn snapshot(&self) -> Vec<(u64, bool)> {
        self.0
            .read()
            .map(|m| m.iter().map(|(k, v)| (*k, *v)).collect())
            .unwrap_or_default()
    }
}

pub struct HealthChecker {
    pub routes: Routes,
    pub health: HostHealth,
    pub gateway_name: String,
    pub control: ControlClient,
}

impl HealthChecker {
    pub async fn run(self) {
        let probe = reqwest::Client::builder()
            .connect_timeout(PROBE_TIMEOUT)
            .timeout(PROBE_TIMEOUT * 2)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("probe client");
        let mut ticker = tokio::time::interval(PROBE_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut streaks = Streaks::new();
        loop {
            ticker.tick().await;
            let table = self.routes.current();
            let hosts: Vec<_> = table.hosts.values().cloned().collect();
            let probes = hosts.into_iter().map(|host| {
                let probe = probe.clone();
                async move {
                    let answered = probe.get(&host.route.health_url).send().await.is_ok();
                    (host.route.id, answered)
                }
            });
            // Concurrent but bounded: a dead host costs its timeout, not
            // everyone's, and a huge table cannot exhaust the sockets.
            let results: Vec<(u64, bool)> = futures_util::stream::iter(probes)
                .buffer_unordered(PROBES_AT_ONCE)
                .collect()
                .await;
            streaks.retain(|id, _| table.hosts.contains_key(id));
            let mut up = 0;
            for (id, answered) in &results {
                let streak = streaks.entry(*id).or_default();
                *streak = if *answered {
                    0
                } else {
                    streak.saturating_add(1)
                };
                let reachable = *streak < FAILURES_TO_MARK_DOWN;
                self.health.mark(*id, reachable);
                up += usize::from(reachable);
            }
            metrics::gauge!("opencloud_gateway_hosts", "reachable" => "true").set(up as f64);
            metrics::gauge!("opencloud_gateway_hosts", "reachable" => "false")
                .set((results.len() - up) as f64);
            self.report().await;
        }
    }

    async fn report(&self) {
        let hosts: Vec<HostReachability> = self
            .health
            .snapshot()
            .into_iter()
            .map(|(id, reachable)| HostReachability { id, reachable })
            .collect();
        if hosts.is_empty() {
            return;
        }
        let report = HealthReport {
            gateway: self.gateway_name.clone(),
            hosts,
        };
        if let Err(e) = self.control.report_health(&report).await {
            tracing::debug!(error = %e, "health report not delivered; control may be down");
        }
    }
}

#[cfg(test)]
mod tests {
    use opencloud_protocol::routes::{HostRoute, HostState, Snapshot};

    use super::*;

    fn with_hosts(ids: &[u64]) -> RouteTable {
        let hosts = ids
            .iter()
            .map(|&id| HostRoute {
                id,
                address: "127.0.0.1".into(),
                link_port: 1,
                link_cert_sha256: None,
                health_url: "http://127.0.0.1:1/healthz".into(),
                state: HostState::Online,
            })
            .collect();
        RouteTable::from_snapshot(Snapshot {
            hosts,
            ..Snapshot::default()
        })
    }

    #[test]
    fn reachability_is_exposed_only_for_hosts_still_in_the_table() {
        let health = HostHealth::default();
        assert_eq!(health.exposition(&with_hosts(&[1])), "", "no probe yet");
        health.mark(1, true);
        health.mark(2, false);
        health.mark(3, true);
        assert_eq!(
            health.exposition(&with_hosts(&[1, 2])),
            "# TYPE opencloud_gateway_host_reachable gauge\n\
             opencloud_gateway_host_reachable{host=\"1\"} 1\n\
             opencloud_gateway_host_reachable{host=\"2\"} 0\n"
        );
        assert_eq!(
            health.exposition(&with_hosts(&[3])),
            "# TYPE opencloud_gateway_host_reachable gauge\n\
             opencloud_gateway_host_reachable{host=\"3\"} 1\n"
        );
    }
}
