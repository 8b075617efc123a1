//! Throttling by counting recent events in a table: failed logins (per
//! account and client, per client) and registrations (per client). The
//! events live in the database so every control replica sees the same
//! counts; each use says which rows count (`filter`) and how the count
//! turns into a wait (`Limit`). A refusal is `AppError::TooManyAttempts`,
//! which the web layer answers with 429 and `Retry-After`.

use std::net::{IpAddr, Ipv6Addr};
use std::time::Duration;

use mysql_async::prelude::*;
use mysql_async::Pool;
use tokio::sync::watch;

use crate::error::AppError;

/// Who a throttle counts as one client: an IPv4 address, or the /64 an
/// IPv6 address is in. A subscriber gets a whole /64 (often more), so
/// counting single IPv6 addresses would give one machine 2^64 fresh
/// starts. An IPv4 address written as IPv6 (`::ffff:192.0.2.1`) is IPv4.
pub fn client_key(ip: IpAddr) -> String {
    match ip.to_canonical() {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => {
            let network = Ipv6Addr::from(u128::from(v6) & (u128::MAX << 64));
            format!("{network}/64")
        }
    }
}

/// A table of events, each row stamped with when it happened.
#[derive(Debug, Clone, Copy)]
pub struct Events {
    pub table: &'static str,
    pub at_column: &'static str,
}

/// How many events inside the window are allowed, and what waiting looks
/// like past that.
#[derive(Debug, Clone, Copy)]
pub enum Limit {
    /// After `after` events, wait `first_delay` seconds from the last one,
    /// doubling with each further event, up to `max_delay`. For guessing:
    /// each wrong guess costs more.
    Backoff {
        after: u32,
        first_delay: u64,
        max_delay: u64,
    },
    /// At most `per_window` events per window; past that, wait until the
    /// oldest leaves the window. For things that are fine now and then.
    Quota { per_window: u32 },
}

/// The events that count inside the window: how many, and how many seconds
/// ago the first and the last of them happened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recent {
    pub count: u64,
    pub since_first: u64,
    pub since_last: u64,
}

impl Limit {
    /// Seconds still to wait after `recent` events in a window of
    /// `window_seconds`, if any.
    pub fn wait(self, recent: Recent, window_seconds: u64) -> Option<u64> {
        match self {
            Limit::Backoff {
                after,
                first_delay,
                max_delay,
            } => {
                let over = recent.count.checked_sub(u64::from(after))?;
                let delay = first_delay
                    .saturating_mul(1u64 << over.min(20))
                    .min(max_delay);
                (recent.since_last < delay).then(|| delay - recent.since_last)
            }
            Limit::Quota { per_window } => (recent.count >= u64::from(per_window))
                // At least a second: the oldest may leave the window this very second.
                .then(|| window_seconds.saturating_sub(recent.since_first).max(1)),
        }
    }
}

/// Refuses with 429 and `message(wait)` while the `events` rows that
/// `filter` matches (with `params`) inside the last `window_seconds` are
/// past `limit`.
pub async fn refuse_while_limited(
    conn: &mut mysql_async::Conn,
    events: &Events,
    filter: &str,
    params: Vec<mysql_async::Value>,
    window_seconds: u64,
    limit: Limit,
    message: impl FnOnce(u64) -> String,
) -> Result<(), AppError> {
    let recent = recent(conn, events, filter, params, window_seconds).await?;
    match limit.wait(recent, window_seconds) {
        Some(wait) => Err(AppError::TooManyAttempts {
            retry_after: wait,
            message: message(wait),
        }),
        None => Ok(()),
    }
}

async fn recent(
    conn: &mut mysql_async::Conn,
    events: &Events,
    filter: &str,
    mut params: Vec<mysql_async::Value>,
    window_seconds: u64,
) -> Result<Recent, AppError> {
    let Events { table, at_column } = events;
    params.push(window_seconds.into());
    let row: Option<(u64, Option<i64>, Option<i64>)> = conn
        .exec_first(
            format!(
                "SELECT COUNT(*), TIMESTAMPDIFF(SECOND, MIN({at_column}), NOW(6)),
                        TIMESTAMPDIFF(SECOND, MAX({at_column}), NOW(6))
                 FROM {table} WHERE {filter} AND {at_column} > NOW(6) - INTERVAL ? SECOND"
            ),
            params,
        )
        .await?;
    let (count, since_first, since_last) = row.unwrap_or((0, None, None));
    // A clock step backwards makes a negative age; count it as just now.
    let age = |seconds: Option<i64>| seconds.unwrap_or(0).max(0) as u64;
    Ok(Recent {
        count,
        since_first: age(since_first),
        since_last: age(since_last),
    })
}

/// How often `sweep` deletes what counts for nothing any more.
const SWEEP_EVERY: Duration = Duration::from_secs(600);

/// Deletes the rows of each table that are older than its window (they
/// count for nothing), at start and every ten minutes, until `stopping`
/// turns true. Replicas may sweep at once: deleting twice is harmless.
pub async fn sweep(pool: Pool, tables: Vec<(Events, u64)>, mut stopping: watch::Receiver<bool>) {
    loop {
        for (events, window_seconds) in &tables {
            match prune(&pool, events, *window_seconds).await {
                Ok(0) => {}
                Ok(deleted) => {
                    tracing::info!(table = events.table, deleted, "throttle rows pruned")
                }
                Err(e) => {
                    tracing::warn!(table = events.table, error = %e, "could not prune throttle rows")
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(SWEEP_EVERY) => {}
            _ = stopping.wait_for(|stop| *stop) => return,
        }
    }
}

/// Deletes the `events` rows older than `window_seconds`, oldest first in
/// batches, so the table stays as large as its window needs however many
/// events an attack once made. Returns how many went.
pub async fn prune(pool: &Pool, events: &Events, window_seconds: u64) -> Result<u64, AppError> {
    let Events { table, at_column } = events;
    let mut conn = pool.get_conn().await?;
    let mut deleted = 0;
    loop {
        conn.exec_drop(
            format!(
                "DELETE FROM {table} WHERE {at_column} < NOW(6) - INTERVAL ? SECOND
                 ORDER BY id LIMIT 5000"
            ),
            (window_seconds,),
        )
        .await?;
        let affected = conn.affected_rows();
        deleted += affected;
        if affected < 5000 {
            return Ok(deleted);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recent(count: u64, since_first: u64, since_last: u64) -> Recent {
        Recent {
            count,
            since_first,
            since_last,
        }
    }

    #[test]
    fn ipv6_clients_count_by_their_64_and_ipv4_by_address() {
        let key = |s: &str| client_key(s.parse().unwrap());
        assert_eq!(key("192.0.2.7"), "192.0.2.7");
        assert_eq!(key("::ffff:192.0.2.7"), "192.0.2.7");
        assert_eq!(key("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::/64");
        assert_eq!(key("2001:db8:1:2:ffff:ffff:ffff:ffff"), "2001:db8:1:2::/64");
        assert_ne!(key("2001:db8:1:3::1"), key("2001:db8:1:2::1"));
        // The longest key fits the 45 characters the tables hold.
        assert!(key("ffff:ffff:ffff:ffff:ffff::1").len() <= 45);
    }

    #[test]
    fn backoff_doubles_after_the_threshold_and_is_capped() {
        let limit = Limit::Backoff {
            after: 5,
            first_delay: 15,
            max_delay: 900,
        };
        assert_eq!(limit.wait(recent(4, 0, 0), 900), None);
        assert_eq!(limit.wait(recent(5, 60, 0), 900), Some(15));
        assert_eq!(limit.wait(recent(6, 60, 10), 900), Some(20));
        assert_eq!(limit.wait(recent(5, 60, 15), 900), None);
        assert_eq!(limit.wait(recent(40, 60, 0), 900), Some(900));
    }

    #[test]
    fn a_quota_waits_until_the_oldest_event_leaves_the_window() {
        let limit = Limit::Quota { per_window: 10 };
        assert_eq!(limit.wait(recent(9, 100, 0), 3600), None);
        assert_eq!(limit.wait(recent(10, 100, 0), 3600), Some(3500));
        assert_eq!(limit.wait(recent(10, 3600, 0), 3600), Some(1));
        assert_eq!(limit.wait(recent(0, 0, 0), 3600), None);
    }
}
