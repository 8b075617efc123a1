//! The background job that ends sessions nobody asked to end: every
//! second, hosts whose heartbeat stopped go offline and their sessions are
//! lost; every [`METER_EVERY`], running sessions are charged, sessions
//! whose owner's balance is empty are stopped (`balance_exhausted`) and
//! lots past their validity are written off; every 30 s, idle sessions are
//! stopped. Each part runs on one replica at a time (its lease).

use std::time::{Duration, Instant};

use mysql_async::prelude::*;
use mysql_async::Pool;

use super::commands::Wakeups;
use super::ending::{stop, EndReason};
use super::metering::charge_tx;
use super::state::Phase;
use crate::billing::ledger;
use crate::db::Lease;
use crate::error::{retrying, AppError};
use crate::hosts::{find_silent, take_offline};

/// Runs until `stopping` turns true.
pub async fn watch(
    pool: Pool,
    wakeups: Wakeups,
    idle_timeout: Duration,
    mut stopping: tokio::sync::watch::Receiver<bool>,
) {
    let mut last_cull = Instant::now();
    let mut last_meter = Instant::now();
    let mut last_drift_check: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stopping.wait_for(|stop| *stop) => return,
        }
        if let Err(e) = lose_silent_hosts(&pool).await {
            tracing::warn!(error = %e, "host loss check failed");
        }
        if last_meter.elapsed() >= METER_EVERY {
            last_meter = Instant::now();
            if let Err(e) = meter(&pool, &wakeups).await {
                tracing::warn!(error = %e, "metering failed");
            }
        }
        if last_drift_check.is_none_or(|at| at.elapsed() >= Duration::from_secs(60)) {
            last_drift_check = Some(Instant::now());
            if let Err(e) = ledger::drift(&pool).await {
                tracing::warn!(error = %e, "ledger drift check failed");
            }
        }
        if last_cull.elapsed() >= Duration::from_secs(30).min(idle_timeout / 4) {
            last_cull = Instant::now();
            if let Err(e) = cull_idle(&pool, &wakeups, idle_timeout).await {
                tracing::warn!(error = %e, "idle culling failed");
            }
        }
    }
}

/// How often running sessions are charged (the issue asks for at least
/// every 10 s).
pub const METER_EVERY: Duration = Duration::from_secs(5);

/// Charges every session with uncharged seconds, stops those whose owner's
/// balance is empty, and writes off expired lots.
pub async fn meter(pool: &Pool, wakeups: &Wakeups) -> Result<(), AppError> {
    let mut conn = pool.get_conn().await?;
    let Ok(lease) = Lease::acquire(&mut conn, "metering", Duration::ZERO).await else {
        return Ok(());
    };
    let result = async {
        let due: Vec<(String, String)> = pool
            .get_conn()
            .await?
            .exec(
                "SELECT sid, state FROM sessions WHERE state IN (?, ?) AND ready_at IS NOT NULL
                   AND metered_seconds < TIMESTAMPDIFF(SECOND, ready_at, UTC_TIMESTAMP(6))
                 LIMIT 5000",
                (Phase::Running.as_column(), Phase::Stopping.as_column()),
            )
            .await?;
        for (sid, state) in &due {
            let charged = retrying(|| async {
                let mut tx = pool
                    .start_transaction(mysql_async::TxOpts::default())
                    .await?;
                let charged = charge_tx(&mut tx, sid).await?;
                tx.commit().await?;
                Ok(charged)
            })
            .await?;
            if charged.exhausted && state == Phase::Running.as_column() {
                tracing::info!(
                    sid,
                    user = charged.user_id,
                    "balance exhausted; stopping the session"
                );
                stop(pool, wakeups, None, sid, EndReason::BalanceExhausted).await?;
            }
        }
        ledger::expire_due(pool).await?;
        Ok::<_, AppError>(())
    }
    .await;
    lease.release(&mut conn).await?;
    result
}

async fn lose_silent_hosts(pool: &Pool) -> Result<(), AppError> {
    let mut conn = pool.get_conn().await?;
    let Ok(lease) = Lease::acquire(&mut conn, "host_monitor", Duration::ZERO).await else {
        return Ok(());
    };
    let result = async {
        for host in find_silent(pool).await? {
            let lost = take_offline(pool, host, EndReason::HostLost).await?;
            tracing::warn!(host, lost, "host missed its heartbeats; offline");
        }
        Ok::<_, AppError>(())
    }
    .await;
    lease.release(&mut conn).await?;
    result
}

/// Stops running sessions with no traffic through a gateway and no kernel
/// activity for `idle_timeout`, and no kernel busy right now.
pub async fn cull_idle(
    pool: &Pool,
    wakeups: &Wakeups,
    idle_timeout: Duration,
) -> Result<usize, AppError> {
    let mut conn = pool.get_conn().await?;
    let Ok(lease) = Lease::acquire(&mut conn, "session_culler", Duration::ZERO).await else {
        return Ok(0);
    };
    let result = async {
        let idle: Vec<String> = pool
            .get_conn()
            .await?
            .exec(
                "SELECT sid FROM sessions WHERE state = ? AND busy_kernels = 0
                   AND GREATEST(COALESCE(last_activity_at, ready_at), COALESCE(kernel_activity_at, ready_at), ready_at)
                       < UTC_TIMESTAMP(6) - INTERVAL ? MICROSECOND
                 LIMIT 1000",
                (Phase::Running.as_column(), idle_timeout.as_micros() as u64),
            )
            .await?;
        for sid in &idle {
            stop(pool, wakeups, None, sid, EndReason::Idle).await?;
        }
        Ok::<_, AppError>(idle.len())
    }
    .await;
    lease.release(&mut conn).await?;
    result
}
