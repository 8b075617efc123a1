//! Hosts as the gateways see them: which ones each gateway can reach.
//! (Registration with a HostKey and heartbeats arrive with the agent.)

use mysql_async::prelude::*;
use mysql_async::Pool;
use serde::Deserialize;

use crate::error::AppError;

pub const GATEWAY_NAME_MAX_CHARS: usize = 100;
/// Hosts one health report may carry.
pub const MAX_HEALTH_ENTRIES: usize = 200_000;

/// One host as a gateway's health check found it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostHealth {
    pub id: u64,
    pub reachable: bool,
}

/// Records what gateway `gateway` found. Ids that name no host are skipped
/// (the host may have been removed since the gateway's table was built);
/// a host listed twice counts as its last entry.
pub async fn record_reachability(
    pool: &Pool,
    gateway: &str,
    hosts: &[HostHealth],
) -> Result<(), AppError> {
    let gateway = check_gateway_name(gateway)?;
    if hosts.len() > MAX_HEALTH_ENTRIES {
        return Err(AppError::invalid(
            "hosts",
            format!("A report holds at most {MAX_HEALTH_ENTRIES} hosts; send several."),
        ));
    }
    let mut last: std::collections::BTreeMap<u64, bool> = Default::default();
    for h in hosts {
        last.insert(h.id, h.reachable);
    }
    let (up, down): (Vec<_>, Vec<_>) = last.into_iter().partition(|(_, reachable)| *reachable);
    let mut conn = pool.get_conn().await?;
    for (reachable, group) in [(true, up), (false, down)] {
        for chunk in group.chunks(1000) {
            let marks = vec!["?"; chunk.len()].join(", ");
            let mut params: Vec<mysql_async::Value> =
                vec![gateway.clone().into(), reachable.into()];
            params.extend(chunk.iter().map(|(id, _)| mysql_async::Value::from(*id)));
            conn.exec_drop(
                format!(
                    "INSERT INTO host_reachability (host_id, gateway, reachable, checked_at)
                     SELECT id, ?, ?, UTC_TIMESTAMP(6) FROM hosts WHERE id IN ({marks})
                     ON DUPLICATE KEY UPDATE reachable = VALUES(reachable), checked_at = VALUES(checked_at)"
                ),
                params,
            )
            .await?;
        }
    }
    Ok(())
}

fn check_gateway_name(raw: &str) -> Result<String, AppError> {
    let name = raw.trim();
    if name.is_empty()
        || name.chars().count() > GATEWAY_NAME_MAX_CHARS
        || name.chars().any(char::is_control)
    {
        return Err(AppError::invalid(
            "gateway",
            format!("Name the gateway in 1 to {GATEWAY_NAME_MAX_CHARS} characters, without control characters."),
        ));
    }
    Ok(name.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_names_are_short_and_printable() {
        assert_eq!(check_gateway_name(" gw-1 ").unwrap(), "gw-1");
        assert!(check_gateway_name("").is_err());
        assert!(check_gateway_name("a\nb").is_err());
        assert!(check_gateway_name(&"g".repeat(101)).is_err());
    }
}
