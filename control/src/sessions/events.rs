//! What agents report about their sessions (ready, failed, exited,
//! stopped), applied to the session and its route in one transaction.

use mysql_async::prelude::*;
use mysql_async::Pool;
use opencloud_protocol::agent::AgentEvent;
use opencloud_protocol::routes::{self, Change};

use super::commands::{queue_command, Wakeups};
use super::ending::{end_tx, route_tx};
use super::room::{read_committed, replace_tx};
use super::state::Phase;
use crate::error::AppError;
use crate::routes::{commit, publish};

/// Failure details kept per session (the last lines of Jupyter's log).
const FAILURE_DETAIL_MAX_CHARS: usize = 4000;

/// The longest `reason` a failed event may give (a short code, not a log).
const FAILURE_REASON_MAX_CHARS: usize = 200;
/// The longest start an agent may report: a day, in milliseconds.
const SPAWN_MS_MAX: u64 = 86_400_000;

fn clip(detail: &str) -> String {
    let chars: Vec<char> = detail.chars().collect();
    let start = chars.len().saturating_sub(FAILURE_DETAIL_MAX_CHARS);
    chars[start..].iter().collect()
}

/// The fields of an event that need no database to judge; the port is
/// checked against the host's range once that is read.
fn check_event(event: &AgentEvent) -> Result<(), AppError> {
    if !routes::is_valid_sid(event.sid()) {
        return Err(AppError::invalid(
            "sid",
            "The sid is not a session id (26 characters a-z, 2-7).",
        ));
    }
    match event {
        AgentEvent::Ready { spawn_ms, .. } if *spawn_ms > SPAWN_MS_MAX => Err(AppError::invalid(
            "spawn_ms",
            format!("spawn_ms is at most {SPAWN_MS_MAX} (a day)."),
        )),
        AgentEvent::Failed { reason, .. } | AgentEvent::KernelKilled { reason, .. }
            if reason.chars().count() > FAILURE_REASON_MAX_CHARS =>
        {
            Err(AppError::invalid(
                "reason",
                format!("The reason is at most {FAILURE_REASON_MAX_CHARS} characters; put the log in log_tail."),
            ))
        }
        _ => Ok(()),
    }
}

/// Applies an agent's report about one of its sessions. Events for
/// sessions the host does not run are refused and logged; late events for
/// ended sessions change nothing.
pub async fn handle_event(
    pool: &Pool,
    wakeups: &Wakeups,
    host_id: u64,
    event: &AgentEvent,
) -> Result<(), AppError> {
    check_event(event)?;
    let sid = event.sid();
    let mut conn = pool.get_conn().await?;
    // Read committed: a re-placement counts other hosts' sessions after
    // their locks (see `room::take_room`).
    let mut tx = conn.start_transaction(read_committed()).await?;
    let row: Option<(String, Option<u64>)> = tx
        .exec_first(
            "SELECT s.state, TIMESTAMPDIFF(MICROSECOND, s.created_at, UTC_TIMESTAMP(6)) DIV 1000
             FROM sessions s
             WHERE s.sid = ? AND s.host_id = ? FOR UPDATE",
            (sid, host_id),
        )
        .await?;
    let Some((state, age_ms)) = row else {
        // Unknown, or another host's: a host speaks only for its own sessions.
        tracing::warn!(
            sid,
            host = host_id,
            "agent event refused: the host does not run this session"
        );
        return Err(AppError::NotFound("session"));
    };
    let state = Phase::from_column(&state);
    let mut changes = Vec::new();
    let mut wake = vec![host_id];
    match event {
        AgentEvent::Ready { spawn_ms, warm, .. } => {
            if state == Some(Phase::Starting) {
                tx.exec_drop(
                    "UPDATE sessions SET state = ?, ready_at = UTC_TIMESTAMP(6), spawn_ms = ?
                     WHERE sid = ?",
                    (Phase::Running.as_column(), spawn_ms, sid),
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
                let start = if *warm { "warm" } else { "cold" };
                metrics::histogram!("opencloud_control_session_open_to_ready_seconds", "start" => start)
                    .record(age_ms.unwrap_or(0) as f64 / 1000.0);
                metrics::histogram!("opencloud_control_session_spawn_seconds")
                    .record(*spawn_ms as f64 / 1000.0);
            } else if state == Some(Phase::Stopping) {
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
            // A host that refuses or fails a start (its own view of its
            // room may differ) hands the session to another host.
            let moved = if state == Some(Phase::Starting) {
                replace_tx(&mut tx, sid, host_id, reason).await?
            } else {
                None
            };
            if let Some((new_host, route)) = moved {
                changes.push(route);
                wake.push(new_host);
            } else {
                changes.extend(
                    end_tx(
                        &mut tx,
                        sid,
                        Phase::Failed,
                        Some("failed_to_start"),
                        Some(&detail),
                    )
                    .await?,
                );
            }
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
            let (phase, reason) = if state == Some(Phase::Stopping) {
                (Phase::Stopped, None)
            } else {
                (Phase::Failed, Some("jupyter_exited"))
            };
            changes.extend(end_tx(&mut tx, sid, phase, reason, Some(&detail)).await?);
        }
        AgentEvent::Stopped { .. } => {
            changes.extend(end_tx(&mut tx, sid, Phase::Stopped, Some("stopped"), None).await?);
        }
        AgentEvent::KernelKilled { reason, .. } => {
            // The session runs on; its owner is told why a kernel died.
            tx.exec_drop(
                "UPDATE sessions SET notice = ? WHERE sid = ?",
                (reason, sid),
            )
            .await?;
        }
    }
    publish(&mut tx, &changes).await?;
    commit(tx).await?;
    for host in wake {
        wakeups.wake(host);
    }
    tracing::info!(sid, host = host_id, event = ?std::mem::discriminant(event), "agent event");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_details_keep_the_end_of_the_log() {
        let long = format!("{}END", "x".repeat(10_000));
        let clipped = clip(&long);
        assert_eq!(clipped.chars().count(), FAILURE_DETAIL_MAX_CHARS);
        assert!(clipped.ends_with("END"));
    }
}
