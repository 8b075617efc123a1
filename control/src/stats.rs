//! The platform at a glance, read from control's own database: the
//! headline numbers, every host's health and the last 24 hours by hour.
//! One definition serves both the admin overview page and the
//! `opencloud_control_*` gauges that `/metrics` sets at scrape time
//! ([`publish`]), so the page and the dashboards never disagree.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{LazyLock, Mutex};

use mysql_async::prelude::*;
use mysql_async::{Pool, Value};

use crate::billing::money::MICRO_PER_MINOR;
use crate::billing::reports::{Amount, Revenue};
use crate::db::lenient;
use crate::error::AppError;
use crate::hosts::{load_score, HEARTBEAT_FRESH_SECONDS};
use crate::sessions::state::live_sql;

/// A user counts as online for this long after their last request.
pub const ONLINE_WINDOW_SECONDS: u64 = 300;
/// The window of the uptime ratio: online seconds over 30 whole days (a
/// host added last week cannot be above 7/30).
pub const UPTIME_WINDOW_SECONDS: f64 = 30.0 * 86_400.0;
/// The charts' span, in hours (the last one is the current hour, so far).
pub const HOURS: u64 = 24;
/// The hosts-online history's span, in days (`host_uptime` keeps days).
pub const UPTIME_DAYS: u64 = 30;

/// Compute seconds moved today (since 00:00 UTC), all accounts together.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ComputeToday {
    pub sold: u64,
    pub used: u64,
    pub expired: u64,
}

/// The headline numbers.
#[derive(Debug, Clone, Default)]
pub struct Headline {
    /// Distinct users with a live session (starting, running, stopping) or
    /// a request to control in the last [`ONLINE_WINDOW_SECONDS`]: every
    /// authenticated request stamps its login's `last_seen_at` (at most
    /// once a minute, so "5 min" is true to within one). Notebook traffic
    /// goes to the hosts, not control; a live session stands in for it.
    pub users_online: u64,
    pub sessions_running: u64,
    pub sessions_starting: u64,
    /// Hosts up (see [`HostStat::up`]) and all registered, unrevoked hosts.
    pub hosts_online: u64,
    pub hosts_total: u64,
    /// Median seconds from Open to ready of the sessions that became ready
    /// in the last hour; none when none did.
    pub open_to_ready_median_seconds: Option<f64>,
    /// Sessions opened in the last hour, and those of them that failed to
    /// start. Control sees no user-facing error ratio cheaply (most traffic
    /// goes through the gateways): Prometheus has that; this is what
    /// control knows for sure.
    pub opens_last_hour: u64,
    pub open_failures_last_hour: u64,
    /// Paid purchases since 00:00 UTC less refunds made since then, per
    /// currency; every currency a package is priced in is listed (0 when
    /// nothing sold), so a gauge never vanishes.
    pub revenue_today: Vec<Revenue>,
    pub compute_today: ComputeToday,
    /// Host earnings not yet paid out, per currency (micro units).
    pub owed_to_hosts: Vec<Amount>,
    /// Unused seconds on lots that have not expired.
    pub compute_seconds_outstanding: u64,
    /// Opens waiting for room, and how long the first of them has waited.
    pub queue_length: u64,
    pub queue_oldest_wait_seconds: f64,
}

/// One registered, unrevoked host's health.
#[derive(Debug, Clone, Default)]
pub struct HostStat {
    pub id: u64,
    pub name: String,
    /// Online and its last heartbeat fresh (draining hosts are up too).
    pub up: bool,
    pub draining: bool,
    /// Seconds since its last heartbeat; none before the first.
    pub heartbeat_age_seconds: Option<f64>,
    /// Live sessions placed on it, and how many it takes.
    pub sessions: u64,
    pub max_sessions: u32,
    /// Its last heartbeat's CPU use and memory used over total, 0..1.
    pub cpu_ratio: f64,
    pub memory_used_ratio: f64,
    /// Placement load, 0..1 (`hosts::load_score`).
    pub load_ratio: f64,
    /// Online seconds over the last 30 days / [`UPTIME_WINDOW_SECONDS`].
    pub uptime_ratio_30d: f64,
    /// Warm servers its agent last reported ready, less those taken since.
    pub warm_servers: u32,
}

/// Everything the overview shows at one moment.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub headline: Headline,
    pub hosts: Vec<HostStat>,
}

/// Reads the headline numbers and every host.
pub async fn read(pool: &Pool) -> Result<Stats, AppError> {
    let mut conn = pool.get_conn().await?;
    let hosts = hosts(&mut conn).await?;
    let mut headline = Headline {
        hosts_online: hosts.iter().filter(|h| h.up).count() as u64,
        hosts_total: hosts.len() as u64,
        ..Headline::default()
    };

    let users_online: Option<u64> = conn
        .exec_first(
            format!(
                "SELECT COUNT(DISTINCT user_id) FROM (
                     SELECT user_id FROM sessions WHERE state IN ({live})
                     UNION ALL
                     SELECT user_id FROM login_sessions
                     WHERE last_seen_at >= UTC_TIMESTAMP(6) - INTERVAL ? SECOND
                 ) seen",
                live = live_sql()
            ),
            (ONLINE_WINDOW_SECONDS,),
        )
        .await?;
    headline.users_online = users_online.unwrap_or(0);

    let by_state: Vec<(String, u64)> = conn
        .query(
            "SELECT state, COUNT(*) FROM sessions
             WHERE state IN ('starting', 'running') GROUP BY state",
        )
        .await?;
    for (state, n) in by_state {
        match state.as_str() {
            "starting" => headline.sessions_starting = n,
            "running" => headline.sessions_running = n,
            _ => {}
        }
    }

    // Every state is named so the (state, ready_at) index serves the range.
    let mut ready_seconds: Vec<f64> = conn
        .query(
            "SELECT TIMESTAMPDIFF(MICROSECOND, created_at, ready_at) / 1e6 FROM sessions
             WHERE state IN ('starting', 'running', 'stopping', 'stopped', 'lost', 'failed')
               AND ready_at >= UTC_TIMESTAMP(6) - INTERVAL 1 HOUR",
        )
        .await?;
    headline.open_to_ready_median_seconds = median(&mut ready_seconds);

    let opens: Option<(u64, Option<u64>)> = conn
        .query_first(
            "SELECT COUNT(*), CAST(SUM(state = 'failed' AND ready_at IS NULL) AS UNSIGNED) FROM sessions
             WHERE created_at >= UTC_TIMESTAMP(6) - INTERVAL 1 HOUR",
        )
        .await?;
    if let Some((opens, failures)) = opens {
        headline.opens_last_hour = opens;
        headline.open_failures_last_hour = failures.unwrap_or(0);
    }

    let queue: Option<(u64, Option<f64>)> = conn
        .query_first(
            "SELECT COUNT(*), TIMESTAMPDIFF(MICROSECOND, MIN(queued_at), UTC_TIMESTAMP(6)) / 1e6
             FROM open_queue WHERE waiting_project_id IS NOT NULL",
        )
        .await?;
    if let Some((length, oldest)) = queue {
        headline.queue_length = length;
        headline.queue_oldest_wait_seconds = oldest.unwrap_or(0.0).max(0.0);
    }

    headline.revenue_today = revenue_today(&mut conn).await?;

    let compute: Vec<(String, i64)> = conn
        .query(
            "SELECT kind, CAST(ABS(SUM(seconds)) AS SIGNED) FROM ledger_entries
             WHERE kind IN ('purchase', 'usage', 'expiry') AND book = 'compute'
               AND created_at >= UTC_DATE()
             GROUP BY kind",
        )
        .await?;
    for (kind, seconds) in compute {
        let seconds = seconds.max(0) as u64;
        match kind.as_str() {
            "purchase" => headline.compute_today.sold = seconds,
            "usage" => headline.compute_today.used = seconds,
            "expiry" => headline.compute_today.expired = seconds,
            _ => {}
        }
    }

    // Every currency packages are priced in, at 0 when nothing is owed, so
    // the gauge (and its dashboard panel) exists from the start.
    headline.owed_to_hosts = conn
        .query_map(
            "SELECT c.currency, CAST(COALESCE(SUM(e.amount_micro), 0) AS SIGNED)
             FROM (SELECT currency FROM packages
                   UNION SELECT currency FROM ledger_entries
                   WHERE book = 'earnings' AND currency IS NOT NULL) c
             LEFT JOIN ledger_entries e ON e.book = 'earnings' AND e.currency = c.currency
             GROUP BY c.currency ORDER BY c.currency",
            |(currency, micro): (String, i64)| Amount::new(currency, micro),
        )
        .await?;

    let outstanding: Option<i64> = conn
        .query_first(
            "SELECT CAST(COALESCE(SUM(seconds_left), 0) AS SIGNED) FROM lots
             WHERE expired_at IS NULL AND expires_at > UTC_TIMESTAMP(6)",
        )
        .await?;
    headline.compute_seconds_outstanding = outstanding.unwrap_or(0).max(0) as u64;

    Ok(Stats { headline, hosts })
}

/// Today's revenue per currency, with 0 for the currencies packages are
/// priced in that sold nothing today.
async fn revenue_today(conn: &mut impl Queryable) -> Result<Vec<Revenue>, AppError> {
    let mut by_currency: BTreeMap<String, (i64, i64)> = conn
        .query_map("SELECT DISTINCT currency FROM packages", |c: String| {
            (c, (0, 0))
        })
        .await?
        .into_iter()
        .collect();
    let today: Vec<(String, i64, i64)> = conn
        .query(
            "SELECT currency,
                CAST(SUM(CASE WHEN kind = 'purchase' THEN amount_micro ELSE 0 END) AS SIGNED),
                CAST(-SUM(CASE WHEN kind = 'refund' THEN amount_micro ELSE 0 END) AS SIGNED)
             FROM ledger_entries
             WHERE kind IN ('purchase', 'refund') AND created_at >= UTC_DATE()
               AND currency IS NOT NULL
             GROUP BY currency",
        )
        .await?;
    for (currency, purchases, refunds) in today {
        by_currency.insert(currency, (purchases, refunds));
    }
    Ok(by_currency
        .into_iter()
        .map(|(currency, (purchases, refunds))| Revenue {
            currency,
            purchases_minor: purchases / MICRO_PER_MINOR,
            refunds_minor: refunds / MICRO_PER_MINOR,
            net_minor: (purchases - refunds) / MICRO_PER_MINOR,
        })
        .collect())
}

/// Every registered host whose key is not revoked, by id.
async fn hosts(conn: &mut impl Queryable) -> Result<Vec<HostStat>, AppError> {
    let rows: Vec<mysql_async::Row> = conn
        .exec(
            format!(
                "SELECT h.id, h.name,
                    COALESCE(h.state = 'online'
                        AND h.last_heartbeat_at >= UTC_TIMESTAMP(6) - INTERVAL ? MICROSECOND, FALSE),
                    h.draining,
                    TIMESTAMPDIFF(MICROSECOND, h.last_heartbeat_at, UTC_TIMESTAMP(6)) / 1e6,
                    (SELECT COUNT(*) FROM sessions s WHERE s.host_id = h.id AND s.state IN ({live})),
                    h.max_sessions, h.cpu_percent, h.memory_used_mib, h.memory_total_mib,
                    (SELECT COALESCE(SUM(t.online_seconds), 0) FROM host_uptime t
                       WHERE t.host_id = h.id AND t.day >= UTC_DATE() - INTERVAL 30 DAY) * 1e0,
                    h.warm_servers
                 FROM hosts h
                 WHERE h.registered_at IS NOT NULL AND h.key_revoked_at IS NULL
                 ORDER BY h.id",
                live = live_sql()
            ),
            (HEARTBEAT_FRESH_SECONDS * 1_000_000,),
        )
        .await?;
    Ok(rows.into_iter().map(host_from_row).collect())
}

fn host_from_row(mut row: mysql_async::Row) -> HostStat {
    let mut take = |i: usize| row.take::<Value, _>(i).unwrap_or(Value::NULL);
    let id: u64 = lenient(take(0));
    let name: String = lenient(take(1));
    let up: bool = lenient(take(2));
    let draining: bool = lenient(take(3));
    let heartbeat_age_seconds: Option<f64> = lenient(take(4));
    let sessions: u64 = lenient(take(5));
    let max_sessions: u32 = lenient(take(6));
    let cpu_percent: f64 = lenient(take(7));
    let memory_used_mib: u64 = lenient(take(8));
    let memory_total_mib: u64 = lenient(take(9));
    let online_seconds: f64 = lenient(take(10));
    let warm_servers: u32 = lenient(take(11));
    HostStat {
        id,
        name,
        up,
        draining,
        heartbeat_age_seconds: heartbeat_age_seconds.map(|s| s.max(0.0)),
        sessions,
        max_sessions,
        cpu_ratio: (cpu_percent / 100.0).clamp(0.0, 1.0),
        memory_used_ratio: if memory_total_mib > 0 {
            (memory_used_mib as f64 / memory_total_mib as f64).clamp(0.0, 1.0)
        } else {
            0.0
        },
        load_ratio: load_score(
            sessions,
            max_sessions,
            cpu_percent,
            memory_used_mib,
            memory_total_mib,
        ),
        uptime_ratio_30d: (online_seconds / UPTIME_WINDOW_SECONDS).clamp(0.0, 1.0),
        warm_servers,
    }
}

/// The middle value (the mean of the two middle ones for an even count).
fn median(values: &mut [f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len().is_multiple_of(2) {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    })
}

// ----- the last 24 hours -----

/// Values per hour: `values[i]` is the hour starting at
/// `first_hour + i * 3600` (unix seconds, UTC); the last is the current
/// hour so far.
#[derive(Debug, Clone, PartialEq)]
pub struct Hourly {
    pub first_hour: u64,
    pub values: Vec<f64>,
}

impl Hourly {
    fn zeros(first_hour: u64) -> Self {
        Self {
            first_hour,
            values: vec![0.0; HOURS as usize],
        }
    }

    pub fn is_empty(&self) -> bool {
        self.values.iter().all(|v| *v == 0.0)
    }

    /// Adds `value` to the hour holding `at` (unix seconds), if shown.
    fn add(&mut self, at: u64, value: f64) {
        if let Some(slot) = at
            .checked_sub(self.first_hour)
            .and_then(|d| self.values.get_mut((d / 3600) as usize))
        {
            *slot += value;
        }
    }
}

/// Revenue per hour in one currency (minor units, refunds taken off).
#[derive(Debug, Clone, PartialEq)]
pub struct HourlyRevenue {
    pub currency: String,
    pub minor: Hourly,
}

/// The last 24 hours, by hour.
#[derive(Debug, Clone)]
pub struct LastDay {
    /// Sessions that were running at any time in the hour.
    pub sessions_running: Hourly,
    /// Sessions opened, and those of them that failed to start.
    pub opens: Hourly,
    pub open_failures: Hourly,
    /// One per currency with money moved in the 24 hours.
    pub revenue: Vec<HourlyRevenue>,
    pub signups: Hourly,
    /// Hosts online on average per day over the last 30 days (today so
    /// far): control keeps online seconds per host per day
    /// (`host_uptime`), no finer history. `(day's start in unix seconds,
    /// hosts)`, oldest first, one per day.
    pub hosts_online_daily: Vec<(u64, f64)>,
}

/// Reads the last 24 hours up to `now` (unix seconds).
pub async fn last_day(pool: &Pool, now: u64) -> Result<LastDay, AppError> {
    let first_hour = (now / 3600 + 1 - HOURS) * 3600;
    let mut conn = pool.get_conn().await?;

    // Running: ready before the hour ended, not ended before it began.
    // Ended sessions are scanned by their end (no index serves that); an
    // admin page, not a scrape, reads this.
    let runs: Vec<(i64, Option<i64>)> = conn
        .exec(
            "SELECT CAST(FLOOR(UNIX_TIMESTAMP(ready_at)) AS SIGNED),
                    CAST(FLOOR(UNIX_TIMESTAMP(ended_at)) AS SIGNED) FROM sessions
             WHERE ready_at IS NOT NULL AND (ended_at IS NULL OR ended_at >= FROM_UNIXTIME(?))",
            (first_hour,),
        )
        .await?;
    let mut sessions_running = Hourly::zeros(first_hour);
    for hour in 0..HOURS as usize {
        let start = (first_hour + hour as u64 * 3600) as i64;
        let end = start + 3600;
        sessions_running.values[hour] = runs
            .iter()
            .filter(|(ready, ended)| *ready < end && ended.is_none_or(|e| e >= start))
            .count() as f64;
    }

    let mut opens = Hourly::zeros(first_hour);
    let mut open_failures = Hourly::zeros(first_hour);
    let opened: Vec<(u64, bool)> = conn
        .exec(
            "SELECT CAST(FLOOR(UNIX_TIMESTAMP(created_at)) AS UNSIGNED),
                    state = 'failed' AND ready_at IS NULL FROM sessions
             WHERE created_at >= FROM_UNIXTIME(?)",
            (first_hour,),
        )
        .await?;
    for (at, failed) in opened {
        opens.add(at, 1.0);
        if failed {
            open_failures.add(at, 1.0);
        }
    }

    let mut signups = Hourly::zeros(first_hour);
    let joined: Vec<u64> = conn
        .exec(
            "SELECT CAST(FLOOR(UNIX_TIMESTAMP(created_at)) AS UNSIGNED) FROM users WHERE created_at >= FROM_UNIXTIME(?)",
            (first_hour,),
        )
        .await?;
    for at in joined {
        signups.add(at, 1.0);
    }

    let mut revenue: BTreeMap<String, Hourly> = BTreeMap::new();
    let money: Vec<(u64, String, i64)> = conn
        .exec(
            "SELECT CAST(FLOOR(UNIX_TIMESTAMP(created_at)) AS UNSIGNED), currency, amount_micro
             FROM ledger_entries
             WHERE kind IN ('purchase', 'refund') AND created_at >= FROM_UNIXTIME(?)
               AND currency IS NOT NULL",
            (first_hour,),
        )
        .await?;
    for (at, currency, micro) in money {
        revenue
            .entry(currency)
            .or_insert_with(|| Hourly::zeros(first_hour))
            .add(at, micro as f64 / MICRO_PER_MINOR as f64);
    }

    let today = now / 86_400;
    let online: BTreeMap<u64, f64> = conn
        .exec(
            "SELECT CAST(TO_DAYS(day) - TO_DAYS('1970-01-01') AS UNSIGNED), SUM(online_seconds) * 1e0
             FROM host_uptime WHERE day > UTC_DATE() - INTERVAL ? DAY GROUP BY day",
            (UPTIME_DAYS,),
        )
        .await?
        .into_iter()
        .collect();
    let hosts_online_daily = (today + 1 - UPTIME_DAYS..=today)
        .map(|day| {
            // Today is averaged over the part of it that has passed.
            let span = if day == today { now % 86_400 } else { 86_400 };
            let seconds = online.get(&day).copied().unwrap_or(0.0);
            (day * 86_400, seconds / span.max(1) as f64)
        })
        .collect();

    Ok(LastDay {
        sessions_running,
        opens,
        open_failures,
        revenue: revenue
            .into_iter()
            .map(|(currency, minor)| HourlyRevenue { currency, minor })
            .collect(),
        signups,
        hosts_online_daily,
    })
}

// ----- /metrics -----

/// Hosts given per-host series so far, so a host that is revoked (or
/// deleted) gets its series set to 0 instead of keeping its last values.
static PUBLISHED_HOSTS: LazyLock<Mutex<BTreeSet<u64>>> = LazyLock::new(Default::default);

/// Sets the `opencloud_control_*` gauges read from the database (the
/// metric contract's "read at scrape time" set). A failed read leaves the
/// last values and is logged; the scrape still answers.
pub async fn publish(pool: &Pool) {
    match read(pool).await {
        Ok(stats) => set_gauges(&stats),
        Err(e) => tracing::warn!(error = %e, "cannot read the overview numbers for /metrics"),
    }
}

fn set_gauges(stats: &Stats) {
    let h = &stats.headline;
    metrics::gauge!("opencloud_control_users_online").set(h.users_online as f64);
    metrics::gauge!("opencloud_control_compute_seconds_outstanding")
        .set(h.compute_seconds_outstanding as f64);
    metrics::gauge!("opencloud_control_queue_length").set(h.queue_length as f64);
    metrics::gauge!("opencloud_control_queue_oldest_wait_seconds").set(h.queue_oldest_wait_seconds);
    for revenue in &h.revenue_today {
        metrics::gauge!("opencloud_control_revenue_today_minor", "currency" => revenue.currency.clone())
            .set(revenue.net_minor as f64);
    }
    for owed in &h.owed_to_hosts {
        metrics::gauge!("opencloud_control_host_earnings_owed_minor", "currency" => owed.currency.clone())
            .set(owed.amount_micro as f64 / MICRO_PER_MINOR as f64);
    }

    let mut published = PUBLISHED_HOSTS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let current: BTreeSet<u64> = stats.hosts.iter().map(|host| host.id).collect();
    for gone in published.difference(&current) {
        set_host_gauges(&HostStat {
            id: *gone,
            ..HostStat::default()
        });
    }
    for host in &stats.hosts {
        set_host_gauges(host);
    }
    published.extend(current);
}

fn set_host_gauges(host: &HostStat) {
    let id = host.id.to_string();
    let gauge = |name: &'static str, value: f64| {
        metrics::gauge!(name, "host" => id.clone()).set(value);
    };
    gauge("opencloud_control_host_up", if host.up { 1.0 } else { 0.0 });
    gauge(
        "opencloud_control_host_heartbeat_age_seconds",
        host.heartbeat_age_seconds.unwrap_or(0.0),
    );
    gauge("opencloud_control_host_sessions", host.sessions as f64);
    gauge("opencloud_control_host_cpu_ratio", host.cpu_ratio);
    gauge(
        "opencloud_control_host_memory_used_ratio",
        host.memory_used_ratio,
    );
    gauge(
        "opencloud_control_host_uptime_ratio_30d",
        host.uptime_ratio_30d,
    );
    gauge(
        "opencloud_control_host_warm_servers",
        f64::from(host.warm_servers),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_is_the_middle_value() {
        assert_eq!(median(&mut []), None);
        assert_eq!(median(&mut [3.0]), Some(3.0));
        assert_eq!(median(&mut [9.0, 1.0, 4.0]), Some(4.0));
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 10.0]), Some(3.0));
    }

    #[test]
    fn an_hourly_value_lands_in_its_hour_and_outside_ones_are_dropped() {
        let first = 1_000 * 3600;
        let mut hourly = Hourly::zeros(first);
        assert!(hourly.is_empty());
        hourly.add(first, 1.0);
        hourly.add(first + 3599, 1.0);
        hourly.add(first + 23 * 3600 + 5, 2.5);
        hourly.add(first - 1, 7.0);
        hourly.add(first + 24 * 3600, 7.0);
        assert_eq!(hourly.values[0], 2.0);
        assert_eq!(hourly.values[23], 2.5);
        assert_eq!(hourly.values.iter().sum::<f64>(), 4.5);
        assert!(!hourly.is_empty());
    }
}
