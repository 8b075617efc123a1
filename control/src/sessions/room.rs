//! Room on hosts: which hosts may take a session and in what order, taking
//! a place on one under the locks that keep any number of concurrent
//! placements (on any number of replicas) within every host's room, putting
//! a session there, and moving a session whose host refused its start to
//! another. Opens ([`super::placement`]) and the queue ([`super::queue`])
//! both place sessions through here.

use mysql_async::prelude::*;
use mysql_async::{Transaction, TxOpts};
use opencloud_protocol::metrics::LabelValue;
use opencloud_protocol::routes::{Change, SessionRoute, SessionState};

use super::commands::{queue_command, Wakeups};
use super::state::{live_sql, Phase};
use crate::billing::ledger::{self, Limits};
use crate::error::AppError;
use crate::hosts::{load_score, HEARTBEAT_FRESH_SECONDS};
use crate::routes::{commit, publish};

/// How a placement ended: the `outcome` of `opencloud_control_placements_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlacementOutcome {
    Placed,
    /// No host had room (or others waited already): the open waits in the queue.
    Queued,
    NoBalance,
    SessionsAtOnce,
    /// The queue itself is full.
    NoCapacity,
}

impl LabelValue for PlacementOutcome {
    const ALL: &'static [Self] = &[
        PlacementOutcome::Placed,
        PlacementOutcome::Queued,
        PlacementOutcome::NoBalance,
        PlacementOutcome::SessionsAtOnce,
        PlacementOutcome::NoCapacity,
    ];
    fn label(self) -> &'static str {
        match self {
            PlacementOutcome::Placed => "placed",
            PlacementOutcome::Queued => "queued",
            PlacementOutcome::NoBalance => "no_balance",
            PlacementOutcome::SessionsAtOnce => "sessions_at_once",
            PlacementOutcome::NoCapacity => "no_capacity",
        }
    }
}

impl PlacementOutcome {
    pub const METRIC: &'static str = "opencloud_control_placements_total";

    pub(super) fn count(self) {
        metrics::counter!(Self::METRIC, "outcome" => self.label()).increment(1);
    }
}

/// A gateway's reachability report counts for this long.
const REACHABILITY_FRESH_SECONDS: u64 = 30;

/// How many hosts one session is tried on before its start counts as failed.
pub const MAX_PLACEMENT_ATTEMPTS: u8 = 3;

/// A host that may take a session, with what placement weighs.
#[derive(Debug, Clone)]
pub(super) struct Candidate {
    id: u64,
    live: u64,
    max_sessions: u32,
    score: f64,
    warm_servers: u32,
}

impl Candidate {
    pub(super) fn id(&self) -> u64 {
        self.id
    }
}

/// Hosts that can take a session now, least loaded first: registered, key
/// not revoked, online with a fresh heartbeat, not draining, reported
/// reachable by a gateway (and unreachable by none) recently, with room.
pub(super) async fn candidates(conn: &mut impl Queryable) -> Result<Vec<Candidate>, AppError> {
    let rows: Vec<(u64, u64, u32, f64, u64, u64, u32)> = conn
        .exec(
            format!(
                "SELECT h.id,
                    (SELECT COUNT(*) FROM sessions s WHERE s.host_id = h.id AND s.state IN ({})),
                    h.max_sessions, h.cpu_percent, h.memory_used_mib, h.memory_total_mib,
                    h.warm_servers
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
        .map(
            |(id, live, max_sessions, cpu, used, total, warm_servers)| Candidate {
                id,
                live,
                max_sessions,
                score: load_score(live, max_sessions, cpu, used, total),
                warm_servers,
            },
        )
        .collect();
    list.sort_by(|a, b| a.score.total_cmp(&b.score).then(a.id.cmp(&b.id)));
    Ok(list)
}

/// The order to try hosts in: hosts with a warm server first (the open is
/// ready in a fraction of a second there), among them and then among the
/// rest the project's last host first (its files are there), then the
/// least loaded.
pub(super) fn placement_order(mut list: Vec<Candidate>, last_host: Option<u64>) -> Vec<Candidate> {
    // A stable sort keeps the load order within each group.
    list.sort_by_key(|c| (c.warm_servers == 0, Some(c.id) != last_host));
    list
}

/// Takes a place on the first host in `order` that still has room, under
/// the lock of every candidate's row (in id order, so that concurrent
/// placements wait for each other instead of deadlocking). The live counts
/// are a statement of their own after the locks: under read committed it
/// includes every placement committed before (a count inside the locking
/// statement could read from before the wait, and CI saw a host overfilled
/// by one). The caller's transaction must be read committed.
pub(super) async fn take_room(
    tx: &mut Transaction<'_>,
    order: Vec<Candidate>,
) -> Result<Option<Candidate>, AppError> {
    if order.is_empty() {
        return Ok(None);
    }
    let ids = order
        .iter()
        .map(|c| c.id.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let open_hosts: Vec<(u64, u32)> = tx
        .query(format!(
            "SELECT id, warm_servers FROM hosts WHERE id IN ({ids}) AND state = 'online' AND NOT draining
             ORDER BY id FOR UPDATE"
        ))
        .await?;
    let live: Vec<(u64, u64)> = tx
        .query(format!(
            "SELECT host_id, COUNT(*) FROM sessions
             WHERE host_id IN ({ids}) AND state IN ({}) GROUP BY host_id",
            live_sql()
        ))
        .await?;
    let chosen = order.into_iter().find_map(|candidate| {
        let placed = live
            .iter()
            .find(|(id, _)| *id == candidate.id)
            .map_or(0, |(_, n)| *n);
        let (_, warm_servers) = open_hosts.iter().find(|(id, _)| *id == candidate.id)?;
        (placed < u64::from(candidate.max_sessions)).then_some(Candidate {
            live: placed,
            warm_servers: *warm_servers,
            ..candidate
        })
    });
    if let Some(host) = chosen.as_ref().filter(|h| h.warm_servers > 0) {
        // The warm server is spoken for until the next heartbeat says
        // otherwise, so a burst does not all head for one warm host.
        tx.exec_drop(
            "UPDATE hosts SET warm_servers = warm_servers - 1 WHERE id = ? AND warm_servers > 0",
            (host.id,),
        )
        .await?;
    }
    Ok(chosen)
}

/// The session to place: who it is for and what its package gives it.
pub(super) struct NewSession<'a> {
    pub sid: &'a str,
    pub project_id: u64,
    pub user_id: u64,
    pub host_share_percent: u8,
    pub limits: &'a Limits,
}

impl<'a> NewSession<'a> {
    pub fn new(
        sid: &'a str,
        project_id: u64,
        user_id: u64,
        host_share_percent: u8,
        limits: &'a Limits,
    ) -> Self {
        Self {
            sid,
            project_id,
            user_id,
            host_share_percent,
            limits,
        }
    }
}

/// Inserts the session on `host` (room taken with [`take_room`]), records
/// the placement, queues the agent's start and publishes the `starting`
/// route (last, as every transaction must), commits and wakes the host's
/// agent.
pub(super) async fn place(
    mut tx: Transaction<'_>,
    session: &NewSession<'_>,
    host: &Candidate,
    wakeups: &Wakeups,
) -> Result<(), AppError> {
    place_tx(&mut tx, session, host).await?;
    commit(tx).await?;
    wakeups.wake(host.id);
    Ok(())
}

async fn place_tx(
    tx: &mut Transaction<'_>,
    session: &NewSession<'_>,
    host: &Candidate,
) -> Result<(), AppError> {
    tx.exec_drop(
        "INSERT INTO sessions (sid, project_id, user_id, host_id, state, live_project_id,
            host_share_percent, cpu_limit_cores, memory_limit_mib, created_at)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, UTC_TIMESTAMP(6))",
        (
            session.sid,
            session.project_id,
            session.user_id,
            host.id,
            Phase::Starting.as_column(),
            session.project_id,
            session.host_share_percent,
            session.limits.cpu_cores,
            session.limits.memory_mib,
        ),
    )
    .await?;
    record_attempt(tx, session.sid, 1, host).await?;
    queue_command(tx, host.id, session.sid, "start").await?;
    // The gateway shows a "starting" page until the session is running.
    let route = SessionRoute {
        sid: session.sid.to_owned(),
        owner: session.user_id,
        host: host.id,
        state: SessionState::Starting,
    };
    publish(tx, &[Change::UpsertSession(route)]).await?;
    metrics::counter!(
        "opencloud_control_placement_hosts_total",
        "warm" => if host.warm_servers > 0 { "true" } else { "false" }
    )
    .increment(1);
    tracing::info!(
        sid = session.sid,
        project = session.project_id,
        host = host.id,
        live = host.live,
        warm = host.warm_servers > 0,
        "session placed"
    );
    Ok(())
}

async fn record_attempt(
    tx: &mut Transaction<'_>,
    sid: &str,
    attempt: u8,
    host: &Candidate,
) -> Result<(), AppError> {
    tx.exec_drop(
        "INSERT INTO session_placements (sid, attempt, host_id, warm, placed_at)
         VALUES (?, ?, ?, ?, UTC_TIMESTAMP(6))",
        (sid, attempt, host.id, host.warm_servers > 0),
    )
    .await?;
    Ok(())
}

/// A host refused or failed the start of `sid` (its row locked by the
/// caller, still starting): the attempt is recorded with `failure`, and the
/// session moves to another host with room that it has not tried, up to
/// [`MAX_PLACEMENT_ATTEMPTS`] hosts. Returns the new host, or `None` when
/// the session has had its tries or no other host has room (the caller then
/// ends it). The caller's transaction must be read committed; it publishes
/// the returned route change last.
pub(super) async fn replace_tx(
    tx: &mut Transaction<'_>,
    sid: &str,
    failed_host: u64,
    failure: &str,
) -> Result<Option<(u64, Change)>, AppError> {
    let failure: String = failure.chars().take(200).collect();
    tx.exec_drop(
        "UPDATE session_placements SET failed_at = UTC_TIMESTAMP(6), failure = ?
         WHERE sid = ? AND host_id = ? AND failed_at IS NULL",
        (&failure, sid, failed_host),
    )
    .await?;
    let tried: Vec<u64> = tx
        .exec(
            "SELECT host_id FROM session_placements WHERE sid = ?",
            (sid,),
        )
        .await?;
    let attempt = u8::try_from(tried.len()).unwrap_or(u8::MAX);
    if attempt >= MAX_PLACEMENT_ATTEMPTS {
        Retry::GaveUp.count();
        return Ok(None);
    }
    let row: Option<(u64, Option<u64>)> = tx
        .exec_first(
            "SELECT s.user_id, p.last_host_id FROM sessions s
             JOIN projects p ON p.id = s.project_id WHERE s.sid = ?",
            (sid,),
        )
        .await?;
    let Some((user_id, last_host)) = row else {
        return Ok(None);
    };
    let untried: Vec<Candidate> = candidates(tx)
        .await?
        .into_iter()
        .filter(|c| !tried.contains(&c.id))
        .collect();
    let Some(host) = take_room(tx, placement_order(untried, last_host)).await? else {
        Retry::NoOtherHost.count();
        return Ok(None);
    };
    tx.exec_drop(
        "UPDATE sessions SET host_id = ? WHERE sid = ?",
        (host.id, sid),
    )
    .await?;
    record_attempt(tx, sid, attempt + 1, &host).await?;
    queue_command(tx, host.id, sid, "start").await?;
    Retry::Replaced.count();
    tracing::warn!(
        sid,
        from = failed_host,
        to = host.id,
        attempt = attempt + 1,
        %failure,
        "start failed on one host; the session moves to another"
    );
    let route = SessionRoute {
        sid: sid.to_owned(),
        owner: user_id,
        host: host.id,
        state: SessionState::Starting,
    };
    Ok(Some((host.id, Change::UpsertSession(route))))
}

/// What became of a start a host refused or failed: the `outcome` of
/// `opencloud_control_placement_retries_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    Replaced,
    NoOtherHost,
    GaveUp,
}

impl LabelValue for Retry {
    const ALL: &'static [Self] = &[Retry::Replaced, Retry::NoOtherHost, Retry::GaveUp];
    fn label(self) -> &'static str {
        match self {
            Retry::Replaced => "replaced",
            Retry::NoOtherHost => "no_other_host",
            Retry::GaveUp => "gave_up",
        }
    }
}

impl Retry {
    pub const METRIC: &'static str = "opencloud_control_placement_retries_total";

    fn count(self) {
        metrics::counter!(Self::METRIC, "outcome" => self.label()).increment(1);
    }
}

/// A read-committed transaction: every count after a lock must see what
/// the holder before us committed (a repeatable-read snapshot taken before
/// the lock let a crowd of opens overfill a host).
pub(super) fn read_committed() -> TxOpts {
    TxOpts::default()
        .with_isolation_level(mysql_async::IsolationLevel::ReadCommitted)
        .clone()
}

/// The project `project_id` of `user_id`, locked: its last host. Opening
/// the same project twice at once: the lock makes the second wait and then
/// find the first's session.
pub(super) async fn lock_project(
    tx: &mut Transaction<'_>,
    user_id: u64,
    project_id: u64,
) -> Result<Option<u64>, AppError> {
    let project: Option<(Option<u64>, bool)> = tx
        .exec_first(
            "SELECT last_host_id, deleted_at IS NOT NULL FROM projects WHERE id = ? AND owner_id = ? FOR UPDATE",
            (project_id, user_id),
        )
        .await?;
    match project {
        None => Err(AppError::NotFound("project")),
        Some((_, true)) => Err(AppError::Conflict {
            field: None,
            message: "This project was deleted, so it cannot be opened.".into(),
        }),
        Some((last_host, false)) => Ok(last_host),
    }
}

/// The owner's account, locked (two opens at once cannot both take the
/// last place their package allows): the package limits when they have
/// compute time left and another session at once, else why not.
/// `waiting_counts`: whether the owner's waiting opens count as sessions.
pub(super) async fn admit(
    tx: &mut Transaction<'_>,
    user_id: u64,
    waiting_counts: bool,
) -> Result<Limits, AppError> {
    ledger::lock_account(tx, user_id).await?;
    let plan = ledger::plan(tx, user_id).await?;
    let Some(limits) = plan.limits.filter(|_| plan.balance_seconds > 0) else {
        PlacementOutcome::NoBalance.count();
        return Err(AppError::PaymentRequired(
            "You have no compute time left. Buy a package on the Packages page to open projects."
                .into(),
        ));
    };
    // A stopping session still holds its host's place, but no longer the
    // owner's: Stop and then Open another works at once.
    let live_sessions: u64 = tx
        .exec_first(
            "SELECT (SELECT COUNT(*) FROM sessions WHERE user_id = ? AND state IN (?, ?))
                  + (SELECT COUNT(*) FROM open_queue WHERE user_id = ? AND waiting_project_id IS NOT NULL AND ?)",
            (
                user_id,
                Phase::Starting.as_column(),
                Phase::Running.as_column(),
                user_id,
                waiting_counts,
            ),
        )
        .await?
        .unwrap_or(0);
    if live_sessions >= u64::from(limits.sessions_at_once) {
        PlacementOutcome::SessionsAtOnce.count();
        let n = limits.sessions_at_once;
        return Err(AppError::LimitReached(format!(
            "Your package allows {n} session{} at once, and {n} {} running or waiting. Stop one first, or buy a larger package.",
            if n == 1 { "" } else { "s" },
            if n == 1 { "is" } else { "are" },
        )));
    }
    Ok(limits)
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
            warm_servers: 0,
        }
    }

    fn ids(order: &[Candidate]) -> Vec<u64> {
        order.iter().map(|c| c.id).collect()
    }

    #[test]
    fn a_host_with_a_warm_server_goes_first_then_the_last_host() {
        let warm = Candidate {
            warm_servers: 1,
            ..candidate(3, 0.9)
        };
        let list = vec![candidate(1, 0.1), candidate(2, 0.5), warm];
        assert_eq!(ids(&placement_order(list.clone(), Some(2))), [3, 2, 1]);
        assert_eq!(ids(&placement_order(list, None)), [3, 1, 2]);
    }

    #[test]
    fn the_last_host_goes_first_when_it_can_take_the_session() {
        let order = placement_order(vec![candidate(1, 0.1), candidate(2, 0.5)], Some(2));
        assert_eq!(ids(&order), [2, 1]);
        let order = placement_order(vec![candidate(1, 0.1), candidate(2, 0.5)], Some(9));
        assert_eq!(ids(&order), [1, 2]);
    }
}
