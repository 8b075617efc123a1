//! What gateways report to control on its internal listener: host
//! reachability ([`HealthReport`], every probe round) and per-session
//! traffic ([`UsageReport`], in batches). Control refuses unknown fields and
//! reports larger than the limits here.

use serde::{Deserialize, Serialize};

/// Hosts one health report may carry.
pub const MAX_HEALTH_ENTRIES: usize = 200_000;

/// Sessions one usage report may carry.
pub const MAX_USAGE_ENTRIES: usize = 50_000;

/// `POST` [`paths::internal::HEALTH`](crate::paths::internal::HEALTH).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthReport {
    /// The reporting gateway's name, as configured.
    pub gateway: String,
    /// Every host the gateway has an opinion about.
    pub hosts: Vec<HostReachability>,
}

/// One host as a gateway's health check found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostReachability {
    /// The host's id in the route table.
    pub id: u64,
    /// False after failed probes in a row, or a failed connect while proxying.
    pub reachable: bool,
}

/// `POST` [`paths::internal::USAGE`](crate::paths::internal::USAGE).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageReport {
    /// Sessions with traffic since the previous report, one entry each.
    pub sessions: Vec<SessionUsage>,
}

/// One session's traffic since the gateway's previous report.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionUsage {
    /// The session's id.
    pub sid: String,
    /// Unix seconds of the last request or WebSocket frame; 0 for none.
    pub last_activity: u64,
    /// Request body bytes read from clients.
    pub bytes_in: u64,
    /// Response body bytes sent to clients.
    pub bytes_out: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_refuse_unknown_fields() {
        let err = serde_json::from_str::<HealthReport>(
            r#"{"gateway":"g","hosts":[{"id":1,"reachable":true,"port":1}]}"#,
        );
        assert!(err.is_err());
        let err = serde_json::from_str::<UsageReport>(r#"{"sessions":[],"extra":1}"#);
        assert!(err.is_err());
    }

    #[test]
    fn a_usage_report_reads_back_what_was_written() {
        let report = UsageReport {
            sessions: vec![SessionUsage {
                sid: "abc".into(),
                last_activity: 7,
                bytes_in: 1,
                bytes_out: 2,
            }],
        };
        let text = serde_json::to_string(&report).unwrap();
        assert_eq!(serde_json::from_str::<UsageReport>(&text).unwrap(), report);
    }
}

/// What control says about a session owner's compute time, for the banner
/// the gateway adds to Lab: a warning while it runs out soon, and where to
/// buy more.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalanceNotice {
    pub warning: Option<String>,
    pub packages_url: String,
}
