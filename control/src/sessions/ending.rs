//! How a session ends. [`end_tx`] is the one end: every path that ends a
//! session (a stop on a lost host, the agent's failed, exited and stopped
//! events, an agent restarting without it, a host going offline, and the
//! public [`end`]) goes through it. [`stop`] asks the agent to stop the
//! server first (by its owner, an admin or the idle culler).
//!
//! Invariants of an ended session: a final state, `ended_at` set, every
//! second from ready to end charged, its project freed (`live_project_id = NULL`) so it can be opened again, the
//! first end reason kept, and its tombstone published in the same
//! transaction.

use mysql_async::prelude::*;
use mysql_async::{Pool, TxOpts};
use opencloud_protocol::metrics::LabelValue;
use opencloud_protocol::routes::{self, Change, SessionRoute, SessionState};

use super::commands::{queue_command, Wakeups};
use super::metering::charge_tx;
use super::state::{live_sql, Phase};
use crate::error::{retrying, AppError};
use crate::routes::{commit, publish, session_route, SESSION_COLUMNS};

pub const END_REASON_MAX_CHARS: usize = 64;

/// Why control ended a session: its `end_reason` and the `reason` of
/// `opencloud_control_sessions_ended_total`. (An agent's or an admin API's
/// end names its own reason and is not counted here.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    StoppedByUser,
    StoppedByAdmin,
    ProjectDeleted,
    BalanceExhausted,
    Idle,
    HostLost,
    HostRevoked,
}

impl LabelValue for EndReason {
    const ALL: &'static [Self] = &[
        EndReason::StoppedByUser,
        EndReason::StoppedByAdmin,
        EndReason::ProjectDeleted,
        EndReason::BalanceExhausted,
        EndReason::Idle,
        EndReason::HostLost,
        EndReason::HostRevoked,
    ];
    fn label(self) -> &'static str {
        match self {
            EndReason::StoppedByUser => "stopped_by_user",
            EndReason::StoppedByAdmin => "stopped_by_admin",
            EndReason::ProjectDeleted => "project_deleted",
            EndReason::BalanceExhausted => "balance_exhausted",
            EndReason::Idle => "idle",
            EndReason::HostLost => "host_lost",
            EndReason::HostRevoked => "host_revoked",
        }
    }
}

impl EndReason {
    pub const METRIC: &'static str = "opencloud_control_sessions_ended_total";

    pub fn count(self, sessions: u64) {
        metrics::counter!(Self::METRIC, "reason" => self.label()).increment(sessions);
    }
}

/// Ends a live session in an open transaction: state, end time, reason,
/// the project freed for a new session. Returns the route change to
/// publish (a tombstone), or nothing when it had already ended.
pub(crate) async fn end_tx(
    tx: &mut mysql_async::Transaction<'_>,
    sid: &str,
    phase: Phase,
    reason: Option<&str>,
    detail: Option<&str>,
) -> Result<Option<Change>, AppError> {
    debug_assert!(!phase.is_live(), "a session ends in a final state");
    let row = tx
        .exec_first(
            format!(
                "SELECT {SESSION_COLUMNS} FROM sessions WHERE sid = ? AND state IN ({}) FOR UPDATE",
                live_sql()
            ),
            (sid,),
        )
        .await?
        .map(session_route);
    let Some(mut route) = row else {
        return Ok(None);
    };
    tx.exec_drop(
        "UPDATE sessions SET state = ?, ended_at = UTC_TIMESTAMP(6), live_project_id = NULL,
            end_reason = COALESCE(end_reason, ?), failure_detail = COALESCE(?, failure_detail)
         WHERE sid = ?",
        (phase.as_column(), reason, detail, sid),
    )
    .await?;
    // The last seconds, exactly: up to `ended_at` just set.
    charge_tx(tx, sid).await?;
    tracing::info!(sid, state = phase.as_column(), reason, "session ended");
    let was = route.state;
    route.state = phase.route_state();
    // A stopping session already shows its tombstone.
    Ok((was != route.state).then_some(Change::UpsertSession(route)))
}

/// Ends a session as `Lost` or `Stopped` with a short reason
/// (`host_lost`, `idle`, …), through [`end_tx`]. Ending an ended session
/// changes nothing and returns its tombstone.
pub async fn end(
    pool: &Pool,
    sid: &str,
    state: SessionState,
    reason: &str,
) -> Result<SessionRoute, AppError> {
    if state.is_live() {
        return Err(AppError::invalid(
            "state",
            "A session ends as lost or stopped.",
        ));
    }
    if reason.is_empty()
        || reason.len() > END_REASON_MAX_CHARS
        || !reason.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(AppError::invalid(
            "reason",
            format!("The reason is 1 to {END_REASON_MAX_CHARS} printable ASCII characters, like host_lost."),
        ));
    }
    if !routes::is_valid_sid(sid) {
        return Err(AppError::NotFound("session"));
    }
    let mut conn = pool.get_conn().await?;
    let mut tx = conn.start_transaction(TxOpts::default()).await?;
    let change = end_tx(&mut tx, sid, Phase::from_route(state), Some(reason), None).await?;
    let route = match &change {
        Some(Change::UpsertSession(route)) => route.clone(),
        _ => route_tx(&mut tx, sid)
            .await?
            .ok_or(AppError::NotFound("session"))?,
    };
    publish(&mut tx, change.as_slice()).await?;
    commit(tx).await?;
    Ok(route)
}

/// The session's route as its row says now.
pub(crate) async fn route_tx(
    tx: &mut mysql_async::Transaction<'_>,
    sid: &str,
) -> Result<Option<SessionRoute>, AppError> {
    Ok(tx
        .exec_first(
            format!("SELECT {SESSION_COLUMNS} FROM sessions WHERE sid = ?"),
            (sid,),
        )
        .await?
        .map(session_route))
}

/// Stops a session for `reason`. With `owner`, only that user's session. The route becomes a
/// tombstone at once; the agent is told to stop the server. Stopping an
/// ended session changes nothing.
pub async fn stop(
    pool: &Pool,
    wakeups: &Wakeups,
    owner: Option<u64>,
    sid: &str,
    reason: EndReason,
) -> Result<String, AppError> {
    if !routes::is_valid_sid(sid) {
        return Err(AppError::NotFound("session"));
    }
    // Under load the database may pick this transaction to break a deadlock.
    retrying(|| stop_once(pool, wakeups, owner, sid, reason)).await
}

async fn stop_once(
    pool: &Pool,
    wakeups: &Wakeups,
    owner: Option<u64>,
    sid: &str,
    reason: EndReason,
) -> Result<String, AppError> {
    let mut conn = pool.get_conn().await?;
    let mut tx = conn.start_transaction(TxOpts::default()).await?;
    let row: Option<(u64, String, String)> = tx
        .exec_first(
            "SELECT s.host_id, s.state, h.state FROM sessions s JOIN hosts h ON h.id = s.host_id
             WHERE s.sid = ? AND (? IS NULL OR s.user_id = ?) FOR UPDATE",
            (sid, owner, owner),
        )
        .await?;
    let Some((host_id, state, host_state)) = row else {
        return Err(AppError::NotFound("session"));
    };
    if !matches!(
        Phase::from_column(&state),
        Some(Phase::Starting | Phase::Running)
    ) {
        tx.rollback().await?;
        return Ok(state);
    }
    let mut changes = Vec::new();
    let new_state = if host_state == "online" {
        tx.exec_drop(
            "UPDATE sessions SET state = ?, stop_requested_at = UTC_TIMESTAMP(6), end_reason = ?
             WHERE sid = ?",
            (Phase::Stopping.as_column(), reason.label(), sid),
        )
        .await?;
        queue_command(&mut tx, host_id, sid, "stop").await?;
        let route = route_tx(&mut tx, sid).await?;
        if let Some(mut route) = route {
            route.state = SessionState::Stopped;
            changes.push(Change::UpsertSession(route));
        }
        Phase::Stopping
    } else {
        // Nobody to ask: the host is gone, so the session simply ends.
        changes.extend(end_tx(&mut tx, sid, Phase::Stopped, Some(reason.label()), None).await?);
        Phase::Stopped
    };
    publish(&mut tx, &changes).await?;
    commit(tx).await?;
    wakeups.wake(host_id);
    reason.count(1);
    tracing::info!(sid, reason = reason.label(), "session stop requested");
    Ok(new_state.as_column().into())
}

/// A user stops their own session `sid`; returns its new state.
pub async fn stop_own(
    pool: &Pool,
    wakeups: &Wakeups,
    user_id: u64,
    sid: &str,
) -> Result<String, AppError> {
    stop(pool, wakeups, Some(user_id), sid, EndReason::StoppedByUser).await
}

/// An administrator stops anyone's session `sid`; returns its new state.
pub async fn stop_as_admin(pool: &Pool, wakeups: &Wakeups, sid: &str) -> Result<String, AppError> {
    stop(pool, wakeups, None, sid, EndReason::StoppedByAdmin).await
}

/// Stops the project's live session, if any (before deleting it).
pub async fn stop_project(
    pool: &Pool,
    wakeups: &Wakeups,
    owner: u64,
    project_id: u64,
) -> Result<(), AppError> {
    let live: Option<String> = pool
        .get_conn()
        .await?
        .exec_first(
            "SELECT sid FROM sessions WHERE live_project_id = ? AND user_id = ?",
            (project_id, owner),
        )
        .await?;
    if let Some(sid) = live {
        stop(pool, wakeups, Some(owner), &sid, EndReason::ProjectDeleted).await?;
    }
    Ok(())
}

/// Asks the agent of `owner`'s running session `sid` to push its files now;
/// returns the session's project. A session that is not running has
/// nothing to save: 409.
pub async fn save_now(
    pool: &Pool,
    wakeups: &Wakeups,
    owner: u64,
    sid: &str,
) -> Result<u64, AppError> {
    if !routes::is_valid_sid(sid) {
        return Err(AppError::NotFound("session"));
    }
    let mut conn = pool.get_conn().await?;
    let mut tx = conn.start_transaction(TxOpts::default()).await?;
    let row: Option<(u64, u64, String)> = tx
        .exec_first(
            "SELECT host_id, project_id, state FROM sessions WHERE sid = ? AND user_id = ? FOR UPDATE",
            (sid, owner),
        )
        .await?;
    let Some((host_id, project_id, state)) = row else {
        return Err(AppError::NotFound("session"));
    };
    if Phase::from_column(&state) != Some(Phase::Running) {
        tx.rollback().await?;
        return Err(AppError::Conflict {
            field: None,
            message:
                "Only a running session can be saved; an ended one saved its files when it stopped."
                    .into(),
        });
    }
    queue_command(&mut tx, host_id, sid, "save").await?;
    tx.commit().await?;
    wakeups.wake(host_id);
    tracing::info!(sid, "save requested");
    Ok(project_id)
}
