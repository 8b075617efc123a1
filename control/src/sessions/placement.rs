//! Opening a project: its live session if it has one, otherwise (when the
//! owner has compute time and their package allows another session at
//! once) a new session placed on a host that can take it (the project's last host
//! first, then the least loaded), the agent's start command queued and a
//! `starting` route published, all in one transaction.

use std::time::Instant;

use mysql_async::prelude::*;
use mysql_async::{Pool, TxOpts};
use opencloud_protocol::metrics::LabelValue;
use opencloud_protocol::routes::{self, Change, SessionRoute, SessionState};
use serde::Serialize;

use super::commands::{queue_command, Wakeups};
use super::state::{live_sql, Phase};
use crate::billing::ledger;
use crate::error::AppError;
use crate::hosts::{load_score, HEARTBEAT_FRESH_SECONDS};
use crate::routes::{commit, publish};

/// How a placement ended: the `outcome` of `opencloud_control_placements_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlacementOutcome {
    Placed,
    NoBalance,
    SessionsAtOnce,
    NoCapacity,
}

impl LabelValue for PlacementOutcome {
    const ALL: &'static [Self] = &[
        PlacementOutcome::Placed,
        PlacementOutcome::NoBalance,
        PlacementOutcome::SessionsAtOnce,
        PlacementOutcome::NoCapacity,
    ];
    fn label(self) -> &'static str {
        match self {
            PlacementOutcome::Placed => "placed",
            PlacementOutcome::NoBalance => "no_balance",
            PlacementOutcome::SessionsAtOnce => "sessions_at_once",
            PlacementOutcome::NoCapacity => "no_capacity",
        }
    }
}

impl PlacementOutcome {
    pub const METRIC: &'static str = "opencloud_control_placements_total";

    fn count(self) {
        metrics::counter!(Self::METRIC, "outcome" => self.label()).increment(1);
    }
}

/// A gateway's reachability report counts for this long.
const REACHABILITY_FRESH_SECONDS: u64 = 30;

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
                    (SELECT COUNT(*) FROM sessions s WHERE s.host_id = h.id AND s.state IN ({})),
                    h.max_sessions, h.cpu_percent, h.memory_used_mib, h.memory_total_mib
                 FROM hosts h
                 WHERE h.state = 'online' AND NOT h.draining AND h.key_revoked_at IS NULL
                   AND h.key_digest IS NOT NULL
                   AND h.last_heartbeat_at > UTC_TIMESTAMP(6) - INTERVAL ? MICROSECOND
                   AND EXISTS (SELECT 1 FROM host_reachability r WHERE r.host_id = h.id AND r.reachable
                               AND r.checked_at > UTC_TIMESTAMP(6) - INTERVAL ? SECOND)
                   AND NOT EXISTS (SELECT 1 FROM host_reachability r WHERE r.host_id = h.id AND NOT r.reachable
                               AND r.checked_at > UTC_TIMESTAMP(6) - INTERVAL ? SECOND)",
                live_sql()
            ),
            (
                HEARTBEAT_FRESH_SECONDS * 1_000_000,
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

/// Opens `project_id` for its owner: returns the project's live session if
/// it has one, otherwise places a new one and tells the host's agent.
pub async fn open(
    pool: &Pool,
    wakeups: &Wakeups,
    host_share_percent: u8,
    user_id: u64,
    project_id: u64,
) -> Result<Opened, AppError> {
    let started = Instant::now();
    let mut conn = pool.get_conn().await?;
    // The hosts that might take it, read before the transaction on the same
    // connection: taking a second pooled connection while holding locks
    // deadlocked control once a crowd of opens held every connection.
    let candidate_list = candidates(&mut conn).await?;
    // Opening the same project twice at once: the project row lock makes
    // the second wait and then find the first's session. Read committed:
    // every count below runs after a lock and must see what the holder
    // before us committed (a repeatable-read snapshot taken before the
    // lock let a crowd of opens overfill a host).
    let mut tx = conn
        .start_transaction(
            TxOpts::default()
                .with_isolation_level(mysql_async::IsolationLevel::ReadCommitted)
                .clone(),
        )
        .await?;
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
        if Phase::from_column(&state) == Some(Phase::Stopping) {
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
    // The owner's account is locked so that two opens at once cannot both
    // take the last place their package allows.
    ledger::lock_account(&mut tx, user_id).await?;
    let plan = ledger::plan(&mut tx, user_id).await?;
    let Some(limits) = plan.limits.filter(|_| plan.balance_seconds > 0) else {
        tx.rollback().await?;
        PlacementOutcome::NoBalance.count();
        return Err(AppError::PaymentRequired(
            "You have no compute time left. Buy a package on the Packages page to open projects."
                .into(),
        ));
    };
    let live_sessions: u64 = tx
        .exec_first(
            format!(
                "SELECT COUNT(*) FROM sessions WHERE user_id = ? AND state IN ({})",
                live_sql()
            ),
            (user_id,),
        )
        .await?
        .unwrap_or(0);
    if live_sessions >= u64::from(limits.sessions_at_once) {
        tx.rollback().await?;
        PlacementOutcome::SessionsAtOnce.count();
        let n = limits.sessions_at_once;
        return Err(AppError::LimitReached(format!(
            "Your package allows {n} session{} at once, and {n} {} running. Stop one first, or buy a larger package.",
            if n == 1 { "" } else { "s" },
            if n == 1 { "is" } else { "are" },
        )));
    }
    // Candidates were read without locks; the chosen host's row is now
    // locked and its sessions recounted, so capacity holds under races.
    let order = placement_order(candidate_list, last_host);
    // Every candidate's row is locked at once, in id order, so that
    // concurrent opens wait for each other instead of deadlocking (each
    // would otherwise lock its own preferred host first). The live counts
    // are a second statement: under read committed it reads after the locks
    // were granted and so includes every placement committed before. (A
    // count inside the locking statement could read from before the wait,
    // and CI saw a host overfilled by one.)
    let ids: Vec<String> = order.iter().map(|c| c.id.to_string()).collect();
    let (open_hosts, live): (Vec<u64>, Vec<(u64, u64)>) = if ids.is_empty() {
        (Vec::new(), Vec::new())
    } else {
        let ids = ids.join(", ");
        let open_hosts = tx
            .query(format!(
                "SELECT id FROM hosts WHERE id IN ({ids}) AND state = 'online' AND NOT draining
                 ORDER BY id FOR UPDATE"
            ))
            .await?;
        let live = tx
            .query(format!(
                "SELECT host_id, COUNT(*) FROM sessions
                 WHERE host_id IN ({ids}) AND state IN ({}) GROUP BY host_id",
                live_sql()
            ))
            .await?;
        (open_hosts, live)
    };
    let chosen = order.into_iter().find(|candidate| {
        let placed = live
            .iter()
            .find(|(id, _)| *id == candidate.id)
            .map_or(0, |(_, n)| *n);
        open_hosts.contains(&candidate.id) && placed < u64::from(candidate.max_sessions)
    });
    let Some(host) = chosen else {
        tx.rollback().await?;
        PlacementOutcome::NoCapacity.count();
        return Err(AppError::NoCapacity(
            "No host has room for a new session right now. Try again in a few minutes.".into(),
        ));
    };
    let sid = routes::new_sid();
    tx.exec_drop(
        "INSERT INTO sessions (sid, project_id, user_id, host_id, state, live_project_id,
            host_share_percent, cpu_limit_cores, memory_limit_mib, created_at)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, UTC_TIMESTAMP(6))",
        (
            &sid,
            project_id,
            user_id,
            host.id,
            Phase::Starting.as_column(),
            project_id,
            host_share_percent,
            limits.cpu_cores,
            limits.memory_mib,
        ),
    )
    .await?;
    queue_command(&mut tx, host.id, &sid, "start").await?;
    // The gateway shows a "starting" page until the session is running.
    let route = SessionRoute {
        sid: sid.clone(),
        owner: user_id,
        host: host.id,
        state: SessionState::Starting,
    };
    publish(&mut tx, &[Change::UpsertSession(route)]).await?;
    commit(tx).await?;
    wakeups.wake(host.id);
    PlacementOutcome::Placed.count();
    metrics::histogram!("opencloud_control_placement_duration_seconds")
        .record(started.elapsed().as_secs_f64());
    tracing::info!(%sid, project = project_id, host = host.id, live = host.live, "session placed");
    Ok(Opened {
        session_id: sid,
        host_id: host.id,
        state: Phase::Starting.as_column().into(),
        existing: false,
    })
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
}
