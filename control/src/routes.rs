//! The route table, control's side: every change to hosts, sessions and
//! revocations is published as a numbered delta in the same transaction as
//! the change itself, and gateways follow the deltas (or take a snapshot)
//! on `GET /internal/v1/routes/watch`.
//!
//! Ordering: [`publish`] locks the single `route_version` row, so two
//! publishing transactions run one after the other from that point until
//! commit. Commit order is therefore version order, and a reader that sees
//! version V committed also sees every version below it: no reader skips a
//! change. Callers publish *last* in their transaction (after every other
//! row lock), so the counter lock is held briefly and never waited for while
//! another lock is wanted.

use std::pin::pin;
use std::time::Duration;

use mysql_async::prelude::*;
use mysql_async::{IsolationLevel, Pool, Transaction, TxOpts};
use opencloud_protocol::link::CertFingerprint;
use opencloud_protocol::routes::{
    Change, Delta, HostRoute, HostState, Revocation, SessionRoute, Snapshot, WatchMessage,
};
use opencloud_protocol::token::{PLATFORM_TOKEN_SECONDS, TICKET_SECONDS};
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;

pub use opencloud_protocol::routes::Version;

use crate::db::Lease;
use crate::error::AppError;
use crate::sessions::state;

/// Ended sessions stay in the table this long, so users get a clear page.
pub const TOMBSTONE_SECONDS: u64 = 3600;
/// Changes are kept at least this long for gateways that reconnect...
pub const RETAIN_SECONDS: u64 = 3600;
/// ...and the latest this many are always kept, however old.
pub const RETAIN_MIN_CHANGES: u64 = 10_000;
/// A revocation is carried this long past its login session's expiry: a
/// session cookie (`oc_s`) minted from a ticket just before the login
/// session expired lives a full token lifetime longer, and the gateway only
/// knows it is revoked from the table.
pub const REVOCATION_GRACE_SECONDS: u64 = PLATFORM_TOKEN_SECONDS + TICKET_SECONDS;

/// How often a watch stream looks for changes committed by other replicas.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// An idle watch stream sends a heartbeat this often.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);
/// Deltas read per query when a stream catches up.
pub const DELTA_BATCH: u64 = 1000;

/// Woken after every commit in this process that published a change, so
/// local watch streams send it at once instead of at their next poll.
/// Process-wide (not per `App`) because the domain functions that publish
/// are handed only a pool.
static COMMITTED: Notify = Notify::const_new();

/// Appends `changes` as the next version, inside the caller's transaction.
/// Call it after every other write of the transaction, then [`commit`].
pub async fn publish(tx: &mut Transaction<'_>, changes: &[Change]) -> Result<Version, AppError> {
    let current: Version = tx
        .exec_first(
            "SELECT version FROM route_version WHERE id = 1 FOR UPDATE",
            (),
        )
        .await?
        .ok_or_else(|| AppError::Internal("the route_version row is missing".into()))?;
    if changes.is_empty() {
        return Ok(current);
    }
    let next = current + 1;
    let json = serde_json::to_string(changes)
        .map_err(|e| AppError::Internal(format!("route change encoding: {e}")))?;
    tx.exec_drop(
        "INSERT INTO route_changes (version, changes, created_at) VALUES (?, ?, UTC_TIMESTAMP(6))",
        (next, json),
    )
    .await?;
    tx.exec_drop("UPDATE route_version SET version = ? WHERE id = 1", (next,))
        .await?;
    metrics::counter!("opencloud_control_route_changes_total").increment(changes.len() as u64);
    Ok(next)
}

/// Commits a transaction that published, and wakes this process's watch
/// streams.
pub async fn commit(tx: Transaction<'_>) -> Result<(), AppError> {
    tx.commit().await?;
    COMMITTED.notify_waiters();
    Ok(())
}

/// The revocation entry for a login session that expires at
/// `login_expires_at` (Unix seconds).
pub fn revocation(login_session: impl Into<String>, login_expires_at: u64) -> Revocation {
    Revocation {
        login_session: login_session.into(),
        expires_at: login_expires_at + REVOCATION_GRACE_SECONDS,
    }
}

/// The latest committed version.
pub async fn current_version(pool: &Pool) -> Result<Version, AppError> {
    pool.get_conn()
        .await?
        .query_first("SELECT version FROM route_version WHERE id = 1")
        .await?
        .ok_or_else(|| AppError::Internal("the route_version row is missing".into()))
}

pub(crate) fn host_state(raw: &str) -> HostState {
    match raw {
        "online" => HostState::Online,
        "draining" => HostState::Draining,
        _ => HostState::Offline,
    }
}

pub(crate) type HostRow = (u64, String, u16, Option<String>, String, String, bool);
type SessionRow = (String, u64, u64, String);

/// The columns [`host_route`] reads, in its order.
pub(crate) const HOST_COLUMNS: &str =
    "id, address, link_port, link_cert_sha256, health_url, state, draining";
pub(crate) const SESSION_COLUMNS: &str = "sid, user_id, host_id, state";

pub(crate) fn host_route(
    (id, address, link_port, link_cert_sha256, health_url, state, draining): HostRow,
) -> HostRoute {
    HostRoute {
        id,
        address,
        link_port,
        // Control writes only fingerprints; anything else pins nothing, and
        // the host gets no traffic.
        link_cert_sha256: link_cert_sha256.as_deref().and_then(CertFingerprint::parse),
        health_url,
        state: match (host_state(&state), draining) {
            (HostState::Online, true) => HostState::Draining,
            (state, _) => state,
        },
    }
}

pub(crate) fn session_route((sid, owner, host, state): SessionRow) -> SessionRoute {
    SessionRoute {
        sid,
        owner,
        host,
        state: state::route_state(&state),
    }
}

/// The whole table, read in one consistent-snapshot transaction so the
/// version matches the rows exactly. It holds what applying every delta up
/// to that version gives: all hosts, live sessions and tombstones not yet
/// removed, and revocations still in force.
pub async fn snapshot(pool: &Pool) -> Result<Snapshot, AppError> {
    let started = std::time::Instant::now();
    let mut conn = pool.get_conn().await?;
    let mut opts = TxOpts::default();
    opts.with_consistent_snapshot(true)
        .with_isolation_level(IsolationLevel::RepeatableRead)
        .with_readonly(true);
    let mut tx = conn.start_transaction(opts).await?;
    let version: Version = tx
        .query_first("SELECT version FROM route_version WHERE id = 1")
        .await?
        .ok_or_else(|| AppError::Internal("the route_version row is missing".into()))?;
    let hosts: Vec<HostRow> = tx
        .query(format!("SELECT {HOST_COLUMNS} FROM hosts ORDER BY id"))
        .await?;
    let sessions: Vec<SessionRow> = tx
        .query(format!(
            "SELECT {SESSION_COLUMNS} FROM sessions WHERE routes_removed_at IS NULL"
        ))
        .await?;
    // expires_at <= revoked_at + token lifetime (a revoked session is never
    // extended), so the revoked_at bound only narrows the index range.
    let revocations: Vec<(String, u64)> = tx
        .exec(
            "SELECT id, TIMESTAMPDIFF(SECOND, '1970-01-01', expires_at) FROM login_sessions
             WHERE revoked_at > UTC_TIMESTAMP(6) - INTERVAL ? SECOND
               AND expires_at > UTC_TIMESTAMP(6) - INTERVAL ? SECOND",
            (
                PLATFORM_TOKEN_SECONDS + REVOCATION_GRACE_SECONDS,
                REVOCATION_GRACE_SECONDS,
            ),
        )
        .await?;
    tx.commit().await?;
    metrics::histogram!("opencloud_control_route_snapshot_seconds")
        .record(started.elapsed().as_secs_f64());
    Ok(Snapshot {
        version,
        hosts: hosts.into_iter().map(host_route).collect(),
        sessions: sessions.into_iter().map(session_route).collect(),
        revocations: revocations
            .into_iter()
            .map(|(id, expires)| revocation(id, expires))
            .collect(),
    })
}

/// The deltas after `since`, oldest first, at most `limit`.
///
/// `None` when they cannot be given: `since` is older than the oldest
/// retained change, or newer than the current version (the database was
/// restored, or this is another deployment). The caller sends a snapshot.
pub async fn deltas_since(
    pool: &Pool,
    since: Version,
    limit: u64,
) -> Result<Option<Vec<Delta>>, AppError> {
    let mut conn = pool.get_conn().await?;
    // The counter first: every change up to it is committed, so the rows
    // read next include all of them that are retained.
    let current: Version = conn
        .query_first("SELECT version FROM route_version WHERE id = 1")
        .await?
        .ok_or_else(|| AppError::Internal("the route_version row is missing".into()))?;
    if since >= current {
        return Ok((since == current).then(Vec::new));
    }
    let rows: Vec<(Version, String)> = conn
        .exec(
            "SELECT version, changes FROM route_changes WHERE version > ? ORDER BY version LIMIT ?",
            (since, limit.max(1)),
        )
        .await?;
    if rows.is_empty() {
        return Ok(None); // everything after `since` was pruned
    }
    let mut deltas = Vec::with_capacity(rows.len());
    for (version, json) in rows {
        let changes: Vec<Change> = serde_json::from_str(&json).map_err(|e| {
            AppError::Internal(format!("route change {version} does not decode: {e}"))
        })?;
        deltas.push(Delta { version, changes });
    }
    Ok(contiguous_from(since, &deltas).then_some(deltas))
}

/// True when `deltas` are exactly `since + 1, since + 2, …`. A gap means
/// the change after `since` was pruned (or never existed).
fn contiguous_from(since: Version, deltas: &[Delta]) -> bool {
    deltas
        .iter()
        .enumerate()
        .all(|(n, d)| d.version == since + 1 + n as u64)
}

/// Where a new watch stream starts: a snapshot when `since` is 0, too old
/// or ahead of the database, otherwise the deltas after it. Returns the
/// messages and the version they bring the gateway to.
pub async fn catch_up(
    pool: &Pool,
    since: Version,
) -> Result<(Vec<WatchMessage>, Version), AppError> {
    if since > 0 {
        if let Some(deltas) = deltas_since(pool, since, DELTA_BATCH).await? {
            let version = deltas.last().map_or(since, |d| d.version);
            return Ok((
                deltas.into_iter().map(WatchMessage::Delta).collect(),
                version,
            ));
        }
    }
    let snapshot = snapshot(pool).await?;
    let version = snapshot.version;
    Ok((vec![WatchMessage::Snapshot(snapshot)], version))
}

/// Sends what commits after `version` into `out` until the receiver goes
/// away, `stopping` turns true, or the database fails (the gateway then
/// reconnects and keeps serving its table meanwhile). Wakes on local
/// commits at once and polls every [`POLL_INTERVAL`] for other replicas';
/// sends a heartbeat after [`HEARTBEAT_INTERVAL`] without anything else.
pub async fn follow(
    pool: Pool,
    mut version: Version,
    out: mpsc::Sender<WatchMessage>,
    mut stopping: watch::Receiver<bool>,
) {
    let mut last_sent = Instant::now();
    loop {
        if *stopping.borrow() {
            return;
        }
        // Registered before looking, so a commit between the look and the
        // wait still wakes us.
        let mut notified = pin!(COMMITTED.notified());
        notified.as_mut().enable();
        let current = match current_version(&pool).await {
            Ok(current) => current,
            Err(e) => {
                tracing::warn!(error = %e, "route stream: cannot read the version; closing");
                return;
            }
        };
        if current != version {
            let messages = match deltas_since(&pool, version, DELTA_BATCH).await {
                Ok(Some(deltas)) => deltas.into_iter().map(WatchMessage::Delta).collect(),
                Ok(None) => match snapshot(&pool).await {
                    Ok(snapshot) => vec![WatchMessage::Snapshot(snapshot)],
                    Err(e) => {
                        tracing::warn!(error = %e, "route stream: snapshot failed; closing");
                        return;
                    }
                },
                Err(e) => {
                    tracing::warn!(error = %e, "route stream: cannot read changes; closing");
                    return;
                }
            };
            let sent_any = !messages.is_empty();
            for message in messages {
                version = match &message {
                    WatchMessage::Delta(d) => d.version,
                    WatchMessage::Snapshot(s) => s.version,
                    WatchMessage::Heartbeat { version } => *version,
                };
                if out.send(message).await.is_err() {
                    return;
                }
            }
            if sent_any {
                last_sent = Instant::now();
                // There may be more than one batch: look again at once.
                continue;
            }
        }
        if last_sent.elapsed() >= HEARTBEAT_INTERVAL {
            if out.send(WatchMessage::Heartbeat { version }).await.is_err() {
                return;
            }
            last_sent = Instant::now();
        }
        tokio::select! {
            _ = notified => {}
            _ = tokio::time::sleep(POLL_INTERVAL) => {}
            _ = out.closed() => return,
            _ = stopping.wait_for(|stop| *stop) => return,
        }
    }
}

/// Publishes `RemoveSession` for sessions that ended more than `age` ago
/// and are still in the table, at most 1000 per call. Returns how many.
pub async fn expire_tombstones(pool: &Pool, age: Duration) -> Result<usize, AppError> {
    let mut conn = pool.get_conn().await?;
    let mut tx = conn.start_transaction(TxOpts::default()).await?;
    let sids: Vec<String> = tx
        .exec(
            "SELECT sid FROM sessions
             WHERE routes_removed_at IS NULL AND ended_at < UTC_TIMESTAMP(6) - INTERVAL ? SECOND
             ORDER BY ended_at LIMIT 1000 FOR UPDATE",
            (age.as_secs(),),
        )
        .await?;
    if sids.is_empty() {
        tx.rollback().await?;
        return Ok(0);
    }
    let marks = vec!["?"; sids.len()].join(", ");
    tx.exec_drop(
        format!("UPDATE sessions SET routes_removed_at = UTC_TIMESTAMP(6) WHERE sid IN ({marks})"),
        sids.clone(),
    )
    .await?;
    let changes: Vec<Change> = sids
        .iter()
        .map(|sid| Change::RemoveSession { sid: sid.clone() })
        .collect();
    publish(&mut tx, &changes).await?;
    commit(tx).await?;
    Ok(sids.len())
}

/// Deletes changes older than `keep` except the latest `keep_latest`.
/// Idempotent, so replicas racing here do no harm. Returns how many.
pub async fn prune(pool: &Pool, keep: Duration, keep_latest: u64) -> Result<u64, AppError> {
    let current = current_version(pool).await?;
    let Some(last_prunable) = current.checked_sub(keep_latest) else {
        return Ok(0);
    };
    let mut conn = pool.get_conn().await?;
    let mut deleted = 0;
    loop {
        conn.exec_drop(
            "DELETE FROM route_changes
             WHERE version <= ? AND created_at < UTC_TIMESTAMP(6) - INTERVAL ? SECOND
             ORDER BY version LIMIT 5000",
            (last_prunable, keep.as_secs()),
        )
        .await?;
        let affected = conn.affected_rows();
        deleted += affected;
        if affected < 5000 {
            return Ok(deleted);
        }
    }
}

/// Tombstone expiry and change pruning, once a minute, on one replica at a
/// time (the `route_maintenance` lease), until `stopping` turns true.
pub async fn maintain(pool: Pool, mut stopping: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(60)) => {}
            _ = stopping.wait_for(|stop| *stop) => return,
        }
        if let Err(e) = maintain_once(&pool).await {
            tracing::warn!(error = %e, "route table maintenance failed");
        }
    }
}

async fn maintain_once(pool: &Pool) -> Result<(), AppError> {
    let mut conn = pool.get_conn().await?;
    let Ok(lease) = Lease::acquire(&mut conn, "route_maintenance", Duration::ZERO).await else {
        return Ok(()); // another replica is at it
    };
    let result = async {
        let mut removed = 0;
        loop {
            let n = expire_tombstones(pool, Duration::from_secs(TOMBSTONE_SECONDS)).await?;
            removed += n;
            if n < 1000 {
                break;
            }
        }
        let pruned = prune(
            pool,
            Duration::from_secs(RETAIN_SECONDS),
            RETAIN_MIN_CHANGES,
        )
        .await?;
        if removed > 0 || pruned > 0 {
            tracing::info!(removed, pruned, "route table maintenance");
        }
        Ok::<_, AppError>(())
    }
    .await;
    lease.release(&mut conn).await?;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delta(version: Version) -> Delta {
        Delta {
            version,
            changes: vec![Change::RemoveHost { id: version }],
        }
    }

    #[test]
    fn deltas_must_follow_since_without_gaps() {
        assert!(contiguous_from(4, &[delta(5), delta(6), delta(7)]));
        assert!(contiguous_from(4, &[]));
        assert!(!contiguous_from(4, &[delta(6), delta(7)]), "5 was pruned");
        assert!(!contiguous_from(4, &[delta(5), delta(7)]), "a gap");
    }

    #[test]
    fn revocations_outlive_session_cookies_minted_at_the_last_moment() {
        let login_expires = 1_790_000_000;
        let entry = revocation("ls", login_expires);
        // A ticket issued one second before the login expired, turned into
        // a session cookie at the end of its validity.
        let cookie_expires = (login_expires - 1) + TICKET_SECONDS + PLATFORM_TOKEN_SECONDS;
        assert!(entry.expires_at >= cookie_expires);
    }

    #[test]
    fn host_states_read_from_their_column_values() {
        assert_eq!(host_state("draining"), HostState::Draining);
        assert_eq!(host_state("online"), HostState::Online);
    }
}
