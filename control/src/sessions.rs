//! Notebook sessions: where one project's Jupyter server runs, who owns it,
//! and how a browser enters it. Every change to a session is published to
//! the route table in the same transaction.
//!
//! Placement and the agent arrive with their own issues; until then
//! [`register_external`] records a Jupyter server started by someone else
//! (tests, local development).

use std::net::IpAddr;

use mysql_async::prelude::*;
use mysql_async::{Pool, TxOpts};
use opencloud_protocol::routes::{self, Change, HostRoute, HostState, SessionRoute, SessionState};
use opencloud_protocol::token::{self, Claims};
use serde::Serialize;

use crate::config::Config;
use crate::error::AppError;
use crate::routes::{
    host_route, publish, session_route, session_state, session_state_str, HOST_COLUMNS,
    SESSION_COLUMNS,
};

pub const UPSTREAM_TOKEN_MAX_CHARS: usize = 100;
pub const END_REASON_MAX_CHARS: usize = 64;

/// A session as its owner sees it (never the upstream token).
#[derive(Debug, Clone, Serialize)]
pub struct Session {
    pub sid: String,
    pub project_id: u64,
    /// What the route table says (starting, running, lost, stopped).
    pub state: SessionState,
    /// The finer state owners see: starting, running, stopping, stopped,
    /// failed or lost.
    pub phase: String,
    pub created_at: String,
    pub ended_at: Option<String>,
    pub end_reason: Option<String>,
}

impl Session {
    pub fn is_live(&self) -> bool {
        self.state.is_live()
    }

    /// Why the session ended, in words for its owner.
    pub fn end_explanation(&self) -> String {
        explain_end(self.state, self.end_reason.as_deref())
    }
}

/// Words for an end reason. Unknown reasons still get a sentence.
pub fn explain_end(state: SessionState, reason: Option<&str>) -> String {
    match (state, reason) {
        (_, Some("host_lost")) | (SessionState::Lost, None) => {
            "The computer it ran on went offline.".into()
        }
        (_, Some("stopped_by_user" | "user")) => "You stopped it.".into(),
        (_, Some("idle")) => "It was stopped after a long time without activity.".into(),
        (_, Some("out_of_time" | "no_compute_time")) => "Your compute time ran out.".into(),
        (_, Some("host_draining")) => "The host owner took the computer out of service.".into(),
        (_, Some("host_revoked")) => "The host owner removed the computer from OpenCloud.".into(),
        (_, Some("stopped_by_admin" | "admin")) => "An administrator stopped it.".into(),
        (_, Some("failed_to_start")) => "The notebook server could not start.".into(),
        (_, Some("jupyter_exited")) => "The notebook server exited unexpectedly.".into(),
        (_, Some("agent_restarted")) => "The host's agent restarted without it.".into(),
        (_, Some(other)) => format!("It was stopped ({}).", other.replace('_', " ")),
        (_, None) => "It was stopped.".into(),
    }
}

type SessionRow = (String, u64, String, String, Option<String>, Option<String>);

const COLUMNS: &str = "sid, project_id, state, DATE_FORMAT(created_at, '%Y-%m-%d %H:%i:%s'), \
                       DATE_FORMAT(ended_at, '%Y-%m-%d %H:%i:%s'), end_reason";

fn from_row((sid, project_id, state, created_at, ended_at, end_reason): SessionRow) -> Session {
    Session {
        sid,
        project_id,
        state: session_state(&state),
        phase: state,
        created_at,
        ended_at,
        end_reason,
    }
}

/// The session `sid` if `user_id` owns it. Others' sessions, unknown sids
/// and malformed ones all answer "not found".
pub async fn get_owned(pool: &Pool, user_id: u64, sid: &str) -> Result<Session, AppError> {
    if !routes::is_valid_sid(sid) {
        return Err(AppError::NotFound("session"));
    }
    let row: Option<SessionRow> = pool
        .get_conn()
        .await?
        .exec_first(
            format!("SELECT {COLUMNS} FROM sessions WHERE sid = ? AND user_id = ?"),
            (sid, user_id),
        )
        .await?;
    row.map(from_row).ok_or(AppError::NotFound("session"))
}

/// `{session origin}/_oc/enter?ticket=…`: a fresh ticket (valid
/// [`token::TICKET_SECONDS`]) bound to the session, the user and their
/// login session, signed with the token keys.
pub fn enter_url(
    config: &Config,
    user_id: u64,
    login_session: &str,
    sid: &str,
    now: u64,
) -> String {
    let ticket = token::sign(
        &config.keys,
        &Claims::ticket(user_id, login_session, sid, now),
    );
    format!("{}/_oc/enter?ticket={ticket}", config.session_origin(sid))
}

/// Records a Jupyter server that is already running at `host_address:port`
/// as a running session of `project_id` owned by `owner_user_id`. Makes sure
/// a host row for that address exists for the user (online, health URL
/// `http://{address}:{port}/api/status`). Publishes the host and the session
/// in the same transaction. For tests until the agent exists.
pub async fn register_external(
    pool: &Pool,
    owner_user_id: u64,
    project_id: u64,
    host_address: &str,
    port: u16,
    upstream_token: &str,
) -> Result<SessionRoute, AppError> {
    let address: IpAddr = host_address.trim().parse().map_err(|_| {
        AppError::invalid(
            "address",
            "The host address must be an IP address, like 10.0.0.5.",
        )
    })?;
    if port == 0 {
        return Err(AppError::invalid(
            "port",
            "The port must be between 1 and 65535.",
        ));
    }
    check_upstream_token(upstream_token)?;
    let address = address.to_string();
    let health_url = match address.contains(':') {
        true => format!("http://[{address}]:{port}/api/status"),
        false => format!("http://{address}:{port}/api/status"),
    };

    let mut conn = pool.get_conn().await?;
    let mut tx = conn.start_transaction(TxOpts::default()).await?;
    // One registration per user at a time, so two cannot both add the host.
    let user: Option<u64> = tx
        .exec_first(
            "SELECT id FROM users WHERE id = ? FOR UPDATE",
            (owner_user_id,),
        )
        .await?;
    if user.is_none() {
        return Err(AppError::NotFound("user"));
    }
    let project: Option<u64> = tx
        .exec_first(
            "SELECT id FROM projects WHERE id = ? AND owner_id = ? AND deleted_at IS NULL",
            (project_id, owner_user_id),
        )
        .await?;
    if project.is_none() {
        return Err(AppError::NotFound("project"));
    }
    let existing: Option<u64> = tx
        .exec_first(
            "SELECT id FROM hosts WHERE owner_id = ? AND address = ? ORDER BY id LIMIT 1 FOR UPDATE",
            (owner_user_id, &address),
        )
        .await?;
    let host_id = match existing {
        Some(id) => {
            tx.exec_drop(
                "UPDATE hosts SET state = 'online', health_url = ?, updated_at = UTC_TIMESTAMP(6)
                 WHERE id = ?",
                (&health_url, id),
            )
            .await?;
            id
        }
        None => {
            tx.exec_drop(
                "INSERT INTO hosts (owner_id, name, address, health_url, state, created_at, updated_at)
                 VALUES (?, ?, ?, ?, 'online', UTC_TIMESTAMP(6), UTC_TIMESTAMP(6))",
                (owner_user_id, &address, &address, &health_url),
            )
            .await?;
            tx.last_insert_id()
                .ok_or_else(|| AppError::Internal("no id for the new host".into()))?
        }
    };
    let host: HostRoute = tx
        .exec_first(
            format!("SELECT {HOST_COLUMNS} FROM hosts WHERE id = ?"),
            (host_id,),
        )
        .await?
        .map(host_route)
        .ok_or_else(|| AppError::Internal("the host vanished".into()))?;
    debug_assert_eq!(host.state, HostState::Online);

    let sid = routes::new_sid();
    tx.exec_drop(
        "INSERT INTO sessions (sid, project_id, user_id, host_id, port, upstream_token, state, created_at)
         VALUES (?, ?, ?, ?, ?, ?, 'running', UTC_TIMESTAMP(6))",
        (&sid, project_id, owner_user_id, host_id, port, upstream_token),
    )
    .await?;
    let session = SessionRoute {
        sid,
        owner: owner_user_id,
        host: host_id,
        port,
        upstream_token: upstream_token.to_owned(),
        state: SessionState::Running,
    };
    publish(
        &mut tx,
        &[
            Change::UpsertHost(host),
            Change::UpsertSession(session.clone()),
        ],
    )
    .await?;
    crate::routes::commit(tx).await?;
    tracing::info!(sid = %session.sid, host = host_id, "external session registered");
    Ok(session)
}

fn check_upstream_token(token: &str) -> Result<(), AppError> {
    if token.is_empty()
        || token.len() > UPSTREAM_TOKEN_MAX_CHARS
        || !token.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(AppError::invalid(
            "upstream_token",
            format!(
                "The upstream token must be 1 to {UPSTREAM_TOKEN_MAX_CHARS} printable ASCII characters."
            ),
        ));
    }
    Ok(())
}

/// Ends a session as `Lost` or `Stopped` with a short reason
/// (`host_lost`, `idle`, …): sets `ended_at` and publishes the tombstone in
/// the same transaction. Ending an ended session changes nothing and
/// returns its tombstone.
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
    let row = tx
        .exec_first(
            format!("SELECT {SESSION_COLUMNS} FROM sessions WHERE sid = ? FOR UPDATE"),
            (sid,),
        )
        .await?
        .map(session_route);
    let Some(mut route) = row else {
        return Err(AppError::NotFound("session"));
    };
    if !route.state.is_live() {
        tx.rollback().await?;
        return Ok(route);
    }
    tx.exec_drop(
        "UPDATE sessions SET state = ?, ended_at = UTC_TIMESTAMP(6), end_reason = ? WHERE sid = ?",
        (session_state_str(state), reason, sid),
    )
    .await?;
    route.state = state;
    publish(&mut tx, &[Change::UpsertSession(route.clone())]).await?;
    crate::routes::commit(tx).await?;
    tracing::info!(
        sid,
        state = session_state_str(state),
        reason,
        "session ended"
    );
    Ok(route)
}

/// One session's traffic since the gateway's previous report.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionUsage {
    pub sid: String,
    /// Unix seconds of the last request or WebSocket frame; 0 for none.
    pub last_activity: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// Sessions one usage report may carry.
pub const MAX_USAGE_ENTRIES: usize = 50_000;
/// A single report's byte count above this is a bug, not traffic (1 PiB).
const MAX_REPORTED_BYTES: u64 = 1 << 50;
/// Clock skew tolerated in reported activity times.
const MAX_FUTURE_SECONDS: u64 = 300;

/// Adds a gateway's usage report: `last_activity_at` becomes the later of
/// the stored and the reported time, byte counts are added. Sids that name
/// no session are skipped (the session may be long gone).
pub async fn record_usage(pool: &Pool, usage: &[SessionUsage], now: u64) -> Result<(), AppError> {
    if usage.len() > MAX_USAGE_ENTRIES {
        return Err(AppError::invalid(
            "sessions",
            format!("A report holds at most {MAX_USAGE_ENTRIES} sessions; send several."),
        ));
    }
    let merged = merge_usage(usage, now)?;
    if merged.is_empty() {
        return Ok(());
    }
    let mut conn = pool.get_conn().await?;
    for chunk in merged.chunks(500) {
        let rows =
            vec!["SELECT ? AS sid, ? AS activity, ? AS bytes_in, ? AS bytes_out"; chunk.len()]
                .join(" UNION ALL ");
        let params: Vec<mysql_async::Value> = chunk
            .iter()
            .flat_map(|u| {
                [
                    u.sid.clone().into(),
                    u.last_activity.into(),
                    u.bytes_in.into(),
                    u.bytes_out.into(),
                ]
            })
            .collect();
        conn.exec_drop(
            format!(
                "UPDATE sessions s JOIN ({rows}) u ON s.sid = u.sid SET
                   s.last_activity_at = CASE WHEN u.activity = 0 THEN s.last_activity_at
                     ELSE GREATEST(COALESCE(s.last_activity_at, TIMESTAMP'1970-01-01 00:00:00'),
                                   TIMESTAMP'1970-01-01 00:00:00' + INTERVAL u.activity SECOND) END,
                   s.bytes_in = s.bytes_in + u.bytes_in,
                   s.bytes_out = s.bytes_out + u.bytes_out"
            ),
            params,
        )
        .await?;
    }
    Ok(())
}

/// Checks a usage report and folds repeated sids into one entry.
fn merge_usage(usage: &[SessionUsage], now: u64) -> Result<Vec<SessionUsage>, AppError> {
    let mut merged: Vec<SessionUsage> = Vec::with_capacity(usage.len());
    let mut index = std::collections::HashMap::new();
    for (n, u) in usage.iter().enumerate() {
        if !routes::is_valid_sid(&u.sid) {
            return Err(AppError::invalid(
                "sessions",
                format!("sessions[{n}].sid is not a session id (26 characters a-z, 2-7)."),
            ));
        }
        if u.last_activity > now + MAX_FUTURE_SECONDS {
            return Err(AppError::invalid(
                "sessions",
                format!("sessions[{n}].last_activity is in the future; check the gateway's clock."),
            ));
        }
        if u.bytes_in > MAX_REPORTED_BYTES || u.bytes_out > MAX_REPORTED_BYTES {
            return Err(AppError::invalid(
                "sessions",
                format!("sessions[{n}]: byte counts are per report and cannot be this large."),
            ));
        }
        match index.get(&u.sid) {
            Some(&i) => {
                let m: &mut SessionUsage = &mut merged[i];
                m.last_activity = m.last_activity.max(u.last_activity);
                m.bytes_in += u.bytes_in;
                m.bytes_out += u.bytes_out;
            }
            None => {
                index.insert(u.sid.clone(), merged.len());
                merged.push(u.clone());
            }
        }
    }
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(sid: &str, last_activity: u64, bytes: u64) -> SessionUsage {
        SessionUsage {
            sid: sid.into(),
            last_activity,
            bytes_in: bytes,
            bytes_out: bytes * 2,
        }
    }

    #[test]
    fn usage_for_one_sid_is_merged_and_bad_entries_are_named() {
        let a = "a".repeat(26);
        let b = "b".repeat(26);
        let merged =
            merge_usage(&[usage(&a, 10, 1), usage(&b, 5, 7), usage(&a, 8, 2)], 100).unwrap();
        assert_eq!(merged.len(), 2);
        assert_eq!(merged[0].last_activity, 10);
        assert_eq!((merged[0].bytes_in, merged[0].bytes_out), (3, 6));
        let err = merge_usage(&[usage(&a, 1, 1), usage("nope", 1, 1)], 100).unwrap_err();
        assert!(err.to_string().contains("sessions[1].sid"), "{err}");
        let err = merge_usage(&[usage(&a, 10_000, 1)], 100).unwrap_err();
        assert!(err.to_string().contains("future"), "{err}");
    }

    #[test]
    fn end_reasons_read_as_sentences() {
        assert_eq!(
            explain_end(SessionState::Lost, Some("host_lost")),
            "The computer it ran on went offline."
        );
        assert_eq!(
            explain_end(SessionState::Stopped, Some("quota_exceeded")),
            "It was stopped (quota exceeded)."
        );
        assert_eq!(explain_end(SessionState::Stopped, None), "It was stopped.");
    }

    #[test]
    fn upstream_tokens_are_short_printable_ascii() {
        assert!(check_upstream_token("abc-123").is_ok());
        assert!(check_upstream_token("").is_err());
        assert!(check_upstream_token("a b").is_err());
        assert!(check_upstream_token(&"x".repeat(101)).is_err());
    }
}
