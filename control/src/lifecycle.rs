//! A session's life: opening a project (placement, the agent's start
//! command, a `starting` route), the agent's events (ready, failed, exited,
//! stopped), stopping (by its owner, an admin or the idle culler), and the
//! jobs that notice lost hosts and idle sessions. Every state change and
//! its route change commit in one transaction.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use mysql_async::prelude::*;
use mysql_async::{Pool, TxOpts};
use opencloud_protocol::agent::{Action, AgentEvent, Command, StartSession, COMMAND_POLL_SECONDS};
use opencloud_protocol::routes::{self, Change, SessionRoute, SessionState};
use serde::Serialize;
use tokio::sync::Notify;

use crate::db::Lease;
use crate::error::AppError;
use crate::hosts::{end_session_tx, load_score, take_offline, LIVE_STATES};
use crate::routes::{commit, publish, session_route, SESSION_COLUMNS};

/// How long an agent gets to stop a server before it is killed.
pub const STOP_GRACE_MS: u64 = 10_000;
/// A gateway's reachability report counts for this long.
const REACHABILITY_FRESH_SECONDS: u64 = 30;
/// Failure details kept per session (the last lines of Jupyter's log).
const FAILURE_DETAIL_MAX_CHARS: usize = 4000;

/// Wakes agents' command polls on this replica the moment a command for
/// their host is queued (other replicas notice within a second).
#[derive(Clone, Default)]
pub struct Wakeups(Arc<Mutex<HashMap<u64, Arc<Notify>>>>);

impl Wakeups {
    fn for_host(&self, host: u64) -> Arc<Notify> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(host).or_default().clone()
    }

    pub fn wake(&self, host: u64) {
        self.for_host(host).notify_waiters();
    }
}

/// What an open answers.
#[derive(Debug, Clone, Serialize)]
pub struct Opened {
    pub session_id: String,
    pub host_id: u64,
    /// starting, running, stopping.
    pub state: String,
    /// True when the project already had this session.
    pub existing: bool,
}

/// A host that may take a session, with what placement weighs.
#[derive(Debug, Clone)]
struct Candidate {
    id: u64,
    live: u64,
    max_sessions: u32,
    score: f64,
}

/// Hosts that can take a session now, least loaded first: registered, key
/// not revoked, online with a fresh heartbeat, not draining, reported
/// reachable by a gateway (and unreachable by none) recently, with room.
async fn candidates(conn: &mut mysql_async::Conn) -> Result<Vec<Candidate>, AppError> {
    let rows: Vec<(u64, u64, u32, f64, u64, u64)> = conn
        .exec(
            format!(
                "SELECT h.id,
                    (SELECT COUNT(*) FROM sessions s WHERE s.host_id = h.id AND s.state IN ({LIVE_STATES})),
                    h.max_sessions, h.cpu_percent, h.memory_used_mib, h.memory_total_mib
                 FROM hosts h
                 WHERE h.state = 'online' AND NOT h.draining AND h.key_revoked_at IS NULL
                   AND h.key_digest IS NOT NULL
                   AND h.last_heartbeat_at > UTC_TIMESTAMP(6) - INTERVAL ? MICROSECOND
                   AND EXISTS (SELECT 1 FROM host_reachability r WHERE r.host_id = h.id AND r.reachable
                               AND r.checked_at > UTC_TIMESTAMP(6) - INTERVAL ? SECOND)
                   AND NOT EXISTS (SELECT 1 FROM host_reachability r WHERE r.host_id = h.id AND NOT r.reachable
                               AND r.checked_at > UTC_TIMESTAMP(6) - INTERVAL ? SECOND)"
            ),
            (
                crate::hosts::HEARTBEAT_FRESH_SECONDS * 1_000_000,
                REACHABILITY_FRESH_SECONDS,
                REACHABILITY_FRESH_SECONDS,
            ),
        )
        .await?;
    let mut list: Vec<Candidate> = rows
        .into_iter()
        .filter(|(_, live, max, ..)| *live < u64::from(*max))
        .map(|(id, live, max_sessions, cpu, used, total)| Candidate {
            id,
            live,
            max_sessions,
            score: load_score(live, max_sessions, cpu, used, total),
        })
        .collect();
    list.sort_by(|a, b| a.score.total_cmp(&b.score).then(a.id.cmp(&b.id)));
    Ok(list)
}

/// The order to try hosts in: the project's last host first when it can
/// take the session (its files are there), then the least loaded.
fn placement_order(mut list: Vec<Candidate>, last_host: Option<u64>) -> Vec<Candidate> {
    if let Some(last) = last_host {
        if let Some(i) = list.iter().position(|c| c.id == last) {
            let preferred = list.remove(i);
            list.insert(0, preferred);
        }
    }
    list
}

/// Queues `action` (`start` or `stop`) for the host's agent.
async fn queue_command(
    tx: &mut mysql_async::Transaction<'_>,
    host_id: u64,
    sid: &str,
    action: &str,
) -> Result<(), AppError> {
    tx.exec_drop(
        "INSERT INTO host_commands (host_id, sid, action, created_at) VALUES (?, ?, ?, UTC_TIMESTAMP(6))",
        (host_id, sid, action),
    )
    .await?;
    Ok(())
}

/// The session's route as its row says now.
async fn route_tx(
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

fn new_upstream_token() -> String {
    let mut bytes = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Opens `project_id` for its owner: returns the project's live session if
/// it has one, otherwise places a new one and tells the host's agent.
pub async fn open(
    pool: &Pool,
    wakeups: &Wakeups,
    user_id: u64,
    project_id: u64,
) -> Result<Opened, AppError> {
    let started = Instant::now();
    let mut conn = pool.get_conn().await?;
    // Opening the same project twice at once: the project row lock makes
    // the second wait and then find the first's session.
    let mut tx = conn.start_transaction(TxOpts::default()).await?;
    let project: Option<(Option<u64>, bool)> = tx
        .exec_first(
            "SELECT last_host_id, deleted_at IS NOT NULL FROM projects WHERE id = ? AND owner_id = ? FOR UPDATE",
            (project_id, user_id),
        )
        .await?;
    let last_host = match project {
        None => return Err(AppError::NotFound("project")),
        Some((_, true)) => {
            return Err(AppError::Conflict {
                field: None,
                message: "This project was deleted, so it cannot be opened.".into(),
            })
        }
        Some((last_host, false)) => last_host,
    };
    let existing: Option<(String, u64, String)> = tx
        .exec_first(
            "SELECT sid, host_id, state FROM sessions WHERE live_project_id = ?",
            (project_id,),
        )
        .await?;
    if let Some((sid, host_id, state)) = existing {
        tx.rollback().await?;
        if state == "stopping" {
            return Err(AppError::Conflict {
                field: None,
                message:
                    "This project's last session is still stopping; open it again in a moment."
                        .into(),
            });
        }
        return Ok(Opened {
            session_id: sid,
            host_id,
            state,
            existing: true,
        });
    }
    // Candidates are read without locks; the chosen host's row is then
    // locked and its sessions recounted, so capacity holds under races.
    let mut reader = pool.get_conn().await?;
    let order = placement_order(candidates(&mut reader).await?, last_host);
    drop(reader);
    let mut chosen = None;
    for candidate in order {
        let live: Option<u64> = tx
            .exec_first(
                format!(
                    "SELECT (SELECT COUNT(*) FROM sessions s WHERE s.host_id = h.id AND s.state IN ({LIVE_STATES}))
                     FROM hosts h WHERE h.id = ? AND h.state = 'online' AND NOT h.draining FOR UPDATE"
                ),
                (candidate.id,),
            )
            .await?;
        if live.is_some_and(|live| live < u64::from(candidate.max_sessions)) {
            chosen = Some(candidate);
            break;
        }
    }
    let Some(host) = chosen else {
        tx.rollback().await?;
        metrics::counter!("opencloud_placements_total", "outcome" => "no_capacity").increment(1);
        return Err(AppError::NoCapacity(
            "No host has room for a new session right now. Try again in a few minutes.".into(),
        ));
    };
    let sid = routes::new_sid();
    let token = new_upstream_token();
    tx.exec_drop(
        "INSERT INTO sessions (sid, project_id, user_id, host_id, port, upstream_token, state, live_project_id, created_at)
         VALUES (?, ?, ?, ?, 0, ?, 'starting', ?, UTC_TIMESTAMP(6))",
        (&sid, project_id, user_id, host.id, &token, project_id),
    )
    .await?;
    queue_command(&mut tx, host.id, &sid, "start").await?;
    // The gateway shows a "starting" page until the route has a port.
    let route = SessionRoute {
        sid: sid.clone(),
        owner: user_id,
        host: host.id,
        port: 0,
        upstream_token: token,
        state: SessionState::Starting,
    };
    publish(&mut tx, &[Change::UpsertSession(route)]).await?;
    commit(tx).await?;
    wakeups.wake(host.id);
    metrics::counter!("opencloud_placements_total", "outcome" => "placed").increment(1);
    metrics::histogram!("opencloud_placement_duration_seconds")
        .record(started.elapsed().as_secs_f64());
    tracing::info!(%sid, project = project_id, host = host.id, live = host.live, "session placed");
    Ok(Opened {
        session_id: sid,
        host_id: host.id,
        state: "starting".into(),
        existing: false,
    })
}

/// Stops a session for `reason` (`stopped_by_user`, `stopped_by_admin`,
/// `idle`). With `owner`, only that user's session. The route becomes a
/// tombstone at once; the agent is told to stop the server. Stopping an
/// ended session changes nothing.
pub async fn stop(
    pool: &Pool,
    wakeups: &Wakeups,
    owner: Option<u64>,
    sid: &str,
    reason: &str,
) -> Result<String, AppError> {
    if !routes::is_valid_sid(sid) {
        return Err(AppError::NotFound("session"));
    }
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
    if !matches!(state.as_str(), "starting" | "running") {
        tx.rollback().await?;
        return Ok(state);
    }
    let mut changes = Vec::new();
    let new_state = if host_state == "online" {
        tx.exec_drop(
            "UPDATE sessions SET state = 'stopping', stop_requested_at = UTC_TIMESTAMP(6), end_reason = ?
             WHERE sid = ?",
            (reason, sid),
        )
        .await?;
        queue_command(&mut tx, host_id, sid, "stop").await?;
        let route = route_tx(&mut tx, sid).await?;
        if let Some(mut route) = route {
            route.state = SessionState::Stopped;
            changes.push(Change::UpsertSession(route));
        }
        "stopping"
    } else {
        // Nobody to ask: the host is gone, so the session simply ends.
        changes.extend(end_session_tx(&mut tx, sid, "stopped", Some(reason), None).await?);
        "stopped"
    };
    publish(&mut tx, &changes).await?;
    commit(tx).await?;
    wakeups.wake(host_id);
    metrics::counter!("opencloud_sessions_ended_total", "reason" => reason.to_owned()).increment(1);
    tracing::info!(sid, reason, "session stop requested");
    Ok(new_state.into())
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
        stop(pool, wakeups, Some(owner), &sid, "project_deleted").await?;
    }
    Ok(())
}

/// Commands for `host_id` after `after`, oldest first, waiting up to
/// [`COMMAND_POLL_SECONDS`] (or `wait`) for one to appear. Commands whose
/// session has moved on (a start for a session no longer starting) are
/// skipped.
pub async fn commands(
    pool: &Pool,
    wakeups: &Wakeups,
    host_id: u64,
    after: u64,
    wait: Duration,
) -> Result<Vec<Command>, AppError> {
    let deadline = Instant::now() + wait.min(Duration::from_secs(COMMAND_POLL_SECONDS));
    let notify = wakeups.for_host(host_id);
    loop {
        let woken = notify.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        let found = pending_commands(pool, host_id, after).await?;
        let now = Instant::now();
        if !found.is_empty() || now >= deadline {
            return Ok(found);
        }
        let nap = (deadline - now).min(Duration::from_secs(1));
        let _ = tokio::time::timeout(nap, woken).await;
    }
}

type CommandRow = (u64, String, String, u64, String, String, f64, u64, u32);

async fn pending_commands(pool: &Pool, host_id: u64, after: u64) -> Result<Vec<Command>, AppError> {
    let rows: Vec<CommandRow> = pool
        .get_conn()
        .await?
        .exec(
            "SELECT c.id, c.action, c.sid, s.project_id, s.upstream_token, s.state,
                    h.cpu_cores, h.memory_mib, h.max_sessions
             FROM host_commands c
             JOIN sessions s ON s.sid = c.sid
             JOIN hosts h ON h.id = c.host_id
             WHERE c.host_id = ? AND c.id > ?
               AND ((c.action = 'start' AND s.state = 'starting') OR (c.action = 'stop' AND s.state = 'stopping'))
             ORDER BY c.id LIMIT 100",
            (host_id, after),
        )
        .await?;
    Ok(rows
        .into_iter()
        .map(
            |(id, action, sid, project_id, token, _, cpu_cores, memory_mib, max_sessions)| {
                let share = f64::from(max_sessions.max(1));
                let action = if action == "start" {
                    Action::Start(StartSession {
                        sid,
                        project_id,
                        upstream_token: token,
                        memory_limit_mib: (memory_mib as f64 / share).floor() as u64,
                        cpu_limit_cores: (cpu_cores / share) as f32,
                    })
                } else {
                    Action::Stop {
                        sid,
                        grace_ms: STOP_GRACE_MS,
                    }
                };
                Command { id, action }
            },
        )
        .collect())
}

fn clip(detail: &str) -> String {
    let chars: Vec<char> = detail.chars().collect();
    let start = chars.len().saturating_sub(FAILURE_DETAIL_MAX_CHARS);
    chars[start..].iter().collect()
}

/// Applies an agent's report about one of its sessions. Events for
/// sessions on other hosts are refused; late events for ended sessions
/// change nothing.
pub async fn handle_event(
    pool: &Pool,
    wakeups: &Wakeups,
    host_id: u64,
    event: &AgentEvent,
) -> Result<(), AppError> {
    let sid = event.sid();
    if !routes::is_valid_sid(sid) {
        return Err(AppError::invalid(
            "sid",
            "The sid is not a session id (26 characters a-z, 2-7).",
        ));
    }
    let mut conn = pool.get_conn().await?;
    let mut tx = conn.start_transaction(TxOpts::default()).await?;
    let row: Option<(u64, String, Option<u64>)> = tx
        .exec_first(
            "SELECT host_id, state, TIMESTAMPDIFF(MICROSECOND, created_at, UTC_TIMESTAMP(6)) DIV 1000
             FROM sessions WHERE sid = ? FOR UPDATE",
            (sid,),
        )
        .await?;
    let Some((owner_host, state, age_ms)) = row else {
        return Err(AppError::NotFound("session"));
    };
    if owner_host != host_id {
        return Err(AppError::NotFound("session"));
    }
    let mut changes = Vec::new();
    match event {
        AgentEvent::Ready { port, spawn_ms, .. } => {
            if state == "starting" {
                if *port == 0 {
                    return Err(AppError::invalid("port", "A ready session has a port."));
                }
                tx.exec_drop(
                    "UPDATE sessions SET state = 'running', port = ?, ready_at = UTC_TIMESTAMP(6), spawn_ms = ?
                     WHERE sid = ?",
                    (port, spawn_ms, sid),
                )
                .await?;
                tx.exec_drop(
                    "UPDATE projects p JOIN sessions s ON s.project_id = p.id SET p.last_host_id = s.host_id
                     WHERE s.sid = ?",
                    (sid,),
                )
                .await?;
                let route = route_tx(&mut tx, sid).await?;
                changes.extend(route.map(Change::UpsertSession));
                metrics::histogram!("opencloud_session_open_to_ready_seconds")
                    .record(age_ms.unwrap_or(0) as f64 / 1000.0);
                metrics::histogram!("opencloud_session_spawn_seconds")
                    .record(*spawn_ms as f64 / 1000.0);
            } else if state == "stopping" {
                // Ready after a stop was asked for: ask again.
                queue_command(&mut tx, host_id, sid, "stop").await?;
            }
        }
        AgentEvent::Failed {
            reason,
            exit_code,
            log_tail,
            ..
        } => {
            let detail = clip(&format!(
                "{reason}{}\n{log_tail}",
                exit_code
                    .map(|c| format!(" (exit code {c})"))
                    .unwrap_or_default()
            ));
            changes.extend(
                end_session_tx(
                    &mut tx,
                    sid,
                    "failed",
                    Some("failed_to_start"),
                    Some(&detail),
                )
                .await?,
            );
        }
        AgentEvent::Exited {
            exit_code,
            log_tail,
            ..
        } => {
            let detail = clip(&format!(
                "exited{}\n{log_tail}",
                exit_code
                    .map(|c| format!(" with code {c}"))
                    .unwrap_or_default()
            ));
            let (new_state, reason) = if state == "stopping" {
                ("stopped", None)
            } else {
                ("failed", Some("jupyter_exited"))
            };
            changes.extend(end_session_tx(&mut tx, sid, new_state, reason, Some(&detail)).await?);
        }
        AgentEvent::Stopped { .. } => {
            changes.extend(end_session_tx(&mut tx, sid, "stopped", Some("stopped"), None).await?);
        }
    }
    publish(&mut tx, &changes).await?;
    commit(tx).await?;
    wakeups.wake(host_id);
    tracing::info!(sid, host = host_id, event = ?std::mem::discriminant(event), "agent event");
    Ok(())
}

/// Every second, on one replica at a time: hosts whose heartbeat stopped
/// go offline and their sessions are lost; every 30 s, idle sessions are
/// stopped. Runs until `stopping` turns true.
pub async fn watch(
    pool: Pool,
    wakeups: Wakeups,
    idle_timeout: Duration,
    mut stopping: tokio::sync::watch::Receiver<bool>,
) {
    let mut last_cull = Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stopping.wait_for(|stop| *stop) => return,
        }
        if let Err(e) = lose_silent_hosts(&pool).await {
            tracing::warn!(error = %e, "host loss check failed");
        }
        if last_cull.elapsed() >= Duration::from_secs(30).min(idle_timeout / 4) {
            last_cull = Instant::now();
            if let Err(e) = cull_idle(&pool, &wakeups, idle_timeout).await {
                tracing::warn!(error = %e, "idle culling failed");
            }
        }
    }
}

async fn lose_silent_hosts(pool: &Pool) -> Result<(), AppError> {
    let mut conn = pool.get_conn().await?;
    let Ok(lease) = Lease::acquire(&mut conn, "host_monitor", Duration::ZERO).await else {
        return Ok(());
    };
    let result = async {
        for host in crate::hosts::find_silent(pool).await? {
            let lost = take_offline(pool, host, "host_lost").await?;
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
                "SELECT sid FROM sessions WHERE state = 'running' AND busy_kernels = 0
                   AND GREATEST(COALESCE(last_activity_at, ready_at), COALESCE(kernel_activity_at, ready_at), ready_at)
                       < UTC_TIMESTAMP(6) - INTERVAL ? MICROSECOND
                 LIMIT 1000",
                (idle_timeout.as_micros() as u64,),
            )
            .await?;
        for sid in &idle {
            stop(pool, wakeups, None, sid, "idle").await?;
        }
        Ok::<_, AppError>(idle.len())
    }
    .await;
    lease.release(&mut conn).await?;
    result
}

/// Sessions by state, for the metrics endpoint.
pub async fn count_by_state(pool: &Pool) -> Result<Vec<(String, u64)>, AppError> {
    Ok(pool
        .get_conn()
        .await?
        .query(format!(
            "SELECT state, COUNT(*) FROM sessions WHERE state IN ({LIVE_STATES}) GROUP BY state"
        ))
        .await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate(id: u64, score: f64) -> Candidate {
        Candidate {
            id,
            live: 0,
            max_sessions: 4,
            score,
        }
    }

    #[test]
    fn the_last_host_goes_first_when_it_can_take_the_session() {
        let order = placement_order(vec![candidate(1, 0.1), candidate(2, 0.5)], Some(2));
        assert_eq!(order.iter().map(|c| c.id).collect::<Vec<_>>(), [2, 1]);
        let order = placement_order(vec![candidate(1, 0.1), candidate(2, 0.5)], Some(9));
        assert_eq!(order.iter().map(|c| c.id).collect::<Vec<_>>(), [1, 2]);
    }

    #[test]
    fn failure_details_keep_the_end_of_the_log() {
        let long = format!("{}END", "x".repeat(10_000));
        let clipped = clip(&long);
        assert_eq!(clipped.chars().count(), FAILURE_DETAIL_MAX_CHARS);
        assert!(clipped.ends_with("END"));
    }

    #[test]
    fn upstream_tokens_fit_the_gateways_inline_form() {
        let token = new_upstream_token();
        assert_eq!(token.len(), 43);
        assert_ne!(token, new_upstream_token());
    }
}
