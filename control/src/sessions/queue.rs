//! The queue of opens waiting for room: first come, first served, one
//! waiting open per project, kept in the database (`open_queue`) so that it
//! survives a restart and every replica serves the same queue.
//!
//! A waiting open has its session id from the start (the API hands out its
//! URL at once) but no session row: nothing runs, nothing is charged and no
//! host holds a place for it. [`promote`] places the head of the queue when
//! a host has room; every replica runs it every second and when a session
//! ends here, and the locks it takes (the project's row, then the queue
//! row) let exactly one replica place each open, in order.

use std::time::Duration;

use mysql_async::prelude::*;
use mysql_async::{Pool, Transaction};
use opencloud_protocol::metrics::LabelValue;
use serde::Serialize;

use super::commands::Wakeups;
use super::room::{
    admit, candidates, lock_project, place, placement_order, read_committed, take_room, NewSession,
};
use crate::error::{retrying, AppError};
use crate::routes::commit;

/// The state a waiting open shows as.
pub const QUEUED: &str = "queued";

/// The most opens that may wait at once; past it an open is refused.
pub const QUEUE_MAX: u64 = 10_000;

/// A waiting open nobody asked about for this long leaves the queue: its
/// owner left, and would otherwise be charged for a session they no
/// longer wait for. The waiting page asks every 2 s.
pub const ABANDONED_AFTER_SECONDS: u32 = 120;

/// Session ends the wait estimate is taken from: the last this many, within
/// the last [`ESTIMATE_WINDOW_SECONDS`].
const ESTIMATE_ENDS: u32 = 50;
const ESTIMATE_WINDOW_SECONDS: u32 = 3600;

/// Where an open waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct QueueSpot {
    /// 1 for the next open to be placed.
    pub position: u64,
    /// The expected wait, from how often sessions ended lately; `None`
    /// when none ended in the last hour.
    pub eta_seconds: Option<u64>,
}

impl QueueSpot {
    /// The expected wait in words, as the page and the API say it.
    pub fn wait_text(&self) -> String {
        match self.eta_seconds {
            None => "not known yet (no session has ended in the last hour)".into(),
            Some(s) if s < 60 => "less than a minute".into(),
            Some(s) if s < 90 * 60 => {
                let minutes = s.div_ceil(60);
                format!(
                    "about {minutes} minute{}",
                    if minutes == 1 { "" } else { "s" }
                )
            }
            Some(s) => format!("about {} hours", s.div_ceil(3600)),
        }
    }
}

/// How an open left the queue: the `outcome` of
/// `opencloud_control_queue_exits_total` and the `outcome` column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Placed,
    Cancelled,
    Abandoned,
    NoBalance,
    SessionsAtOnce,
    ProjectGone,
}

impl LabelValue for Exit {
    const ALL: &'static [Self] = &[
        Exit::Placed,
        Exit::Cancelled,
        Exit::Abandoned,
        Exit::NoBalance,
        Exit::SessionsAtOnce,
        Exit::ProjectGone,
    ];
    fn label(self) -> &'static str {
        match self {
            Exit::Placed => "placed",
            Exit::Cancelled => "cancelled",
            Exit::Abandoned => "abandoned",
            Exit::NoBalance => "no_balance",
            Exit::SessionsAtOnce => "sessions_at_once",
            Exit::ProjectGone => "project_gone",
        }
    }
}

impl Exit {
    pub const METRIC: &'static str = "opencloud_control_queue_exits_total";

    fn from_label(label: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|e| e.label() == label)
    }

    /// What the open's owner reads about it.
    pub fn explanation(self) -> &'static str {
        match self {
            Exit::Placed => "It got a place on a host.",
            Exit::Cancelled => "You left the queue.",
            Exit::Abandoned => {
                "It left the queue because nobody was waiting for it any more (the page was closed)."
            }
            Exit::NoBalance => "Your compute time ran out while it waited.",
            Exit::SessionsAtOnce => {
                "Your package allowed no further session at once when its turn came."
            }
            Exit::ProjectGone => "The project was deleted while it waited.",
        }
    }
}

/// Waiting opens now.
pub async fn length(conn: &mut impl Queryable) -> Result<u64, AppError> {
    Ok(conn
        .query_first("SELECT COUNT(*) FROM open_queue WHERE waiting_project_id IS NOT NULL")
        .await?
        .unwrap_or(0))
}

/// The project's waiting open, if it has one: its session id and place.
pub(super) async fn waiting_for_project(
    tx: &mut Transaction<'_>,
    project_id: u64,
) -> Result<Option<(String, QueueSpot)>, AppError> {
    let row: Option<(u64, String)> = tx
        .exec_first(
            "SELECT id, sid FROM open_queue WHERE waiting_project_id = ?",
            (project_id,),
        )
        .await?;
    match row {
        None => Ok(None),
        Some((id, sid)) => Ok(Some((sid, spot(tx, id).await?))),
    }
}

/// Puts an open at the end of the queue.
pub(super) async fn join(
    tx: &mut Transaction<'_>,
    sid: &str,
    project_id: u64,
    user_id: u64,
) -> Result<QueueSpot, AppError> {
    // Joins take turns here, so concurrent ones get distinct positions.
    tx.query_drop("UPDATE open_queue_tail SET joined = joined + 1 WHERE id = 1")
        .await?;
    if length(tx).await? >= QUEUE_MAX {
        return Err(AppError::NoCapacity(
            "Every host is busy and the queue is full. Try again in a few minutes.".into(),
        ));
    }
    tx.exec_drop(
        "INSERT INTO open_queue (sid, project_id, user_id, waiting_project_id, queued_at, last_seen_at)
         VALUES (?, ?, ?, ?, UTC_TIMESTAMP(6), UTC_TIMESTAMP(6))",
        (sid, project_id, user_id, project_id),
    )
    .await?;
    let id = tx.last_insert_id().unwrap_or(0);
    spot(tx, id).await
}

/// The position of waiting open `id` and its expected wait.
async fn spot(conn: &mut impl Queryable, id: u64) -> Result<QueueSpot, AppError> {
    let position: u64 = conn
        .exec_first(
            "SELECT COUNT(*) FROM open_queue q, open_queue me
             WHERE me.id = ? AND q.waiting_project_id IS NOT NULL
               AND (q.queued_at, q.id) <= (me.queued_at, me.id)",
            (id,),
        )
        .await?
        .unwrap_or(1);
    Ok(QueueSpot {
        position,
        eta_seconds: estimate_wait(conn, position).await?,
    })
}

/// How long the open at `position` will likely wait: one place frees up
/// each time a session ends, so `position` times the mean gap between the
/// recent ends. `None` when no session ended lately.
async fn estimate_wait(conn: &mut impl Queryable, position: u64) -> Result<Option<u64>, AppError> {
    let row: Option<(u64, Option<f64>)> = conn
        .exec_first(
            "SELECT COUNT(*), TIMESTAMPDIFF(MICROSECOND, MIN(ended_at), UTC_TIMESTAMP(6)) / 1e6
             FROM (SELECT ended_at FROM sessions
                   WHERE ended_at > UTC_TIMESTAMP(6) - INTERVAL ? SECOND
                   ORDER BY ended_at DESC LIMIT ?) recent",
            (ESTIMATE_WINDOW_SECONDS, ESTIMATE_ENDS),
        )
        .await?;
    Ok(match row {
        Some((ends, Some(span))) if ends > 0 => Some(wait_for(position, ends, span)),
        _ => None,
    })
}

/// `position` places at one per `span / ends` seconds, at least a second.
fn wait_for(position: u64, ends: u64, span_seconds: f64) -> u64 {
    let gap = span_seconds.max(0.0) / ends as f64;
    ((position as f64 * gap).ceil() as u64).max(1)
}

/// A waiting (or formerly waiting) open as its owner sees it.
#[derive(Debug, Clone)]
pub struct Waiting {
    pub sid: String,
    pub project_id: u64,
    /// Set while it waits.
    pub spot: Option<QueueSpot>,
    /// Why it left the queue, once it did.
    pub left: Option<Exit>,
}

/// The open `sid` of `user_id` if it is or was in the queue; asking keeps
/// a waiting open in the queue (see [`ABANDONED_AFTER_SECONDS`]).
pub async fn get_owned(pool: &Pool, user_id: u64, sid: &str) -> Result<Option<Waiting>, AppError> {
    let mut conn = pool.get_conn().await?;
    conn.exec_drop(
        "UPDATE open_queue SET last_seen_at = UTC_TIMESTAMP(6)
         WHERE sid = ? AND user_id = ? AND waiting_project_id IS NOT NULL",
        (sid, user_id),
    )
    .await?;
    let row: Option<(u64, u64, bool, Option<String>)> = conn
        .exec_first(
            "SELECT id, project_id, waiting_project_id IS NOT NULL, outcome
             FROM open_queue WHERE sid = ? AND user_id = ?",
            (sid, user_id),
        )
        .await?;
    let Some((id, project_id, waiting, outcome)) = row else {
        return Ok(None);
    };
    let spot = if waiting {
        Some(spot(&mut conn, id).await?)
    } else {
        None
    };
    Ok(Some(Waiting {
        sid: sid.to_owned(),
        project_id,
        spot,
        left: outcome.as_deref().and_then(Exit::from_label),
    }))
}

/// The waiting opens of `user_id`'s projects, by project; the page that
/// shows them keeps them in the queue like the waiting page does.
pub async fn waiting_of_user(
    pool: &Pool,
    user_id: u64,
) -> Result<Vec<(u64, String, QueueSpot)>, AppError> {
    let mut conn = pool.get_conn().await?;
    conn.exec_drop(
        "UPDATE open_queue SET last_seen_at = UTC_TIMESTAMP(6)
         WHERE user_id = ? AND waiting_project_id IS NOT NULL",
        (user_id,),
    )
    .await?;
    let rows: Vec<(u64, u64, String)> = conn
        .exec(
            "SELECT id, project_id, sid FROM open_queue
             WHERE user_id = ? AND waiting_project_id IS NOT NULL",
            (user_id,),
        )
        .await?;
    let mut list = Vec::with_capacity(rows.len());
    for (id, project_id, sid) in rows {
        list.push((project_id, sid, spot(&mut conn, id).await?));
    }
    Ok(list)
}

/// Takes `user_id`'s open `sid` out of the queue. False when it does not
/// wait (any more): it was placed meanwhile, or it is not theirs.
pub async fn cancel(
    pool: &Pool,
    wakeups: &Wakeups,
    user_id: u64,
    sid: &str,
) -> Result<bool, AppError> {
    let left = retrying(|| async {
        let mut conn = pool.get_conn().await?;
        let project: Option<u64> = conn
            .exec_first(
                "SELECT project_id FROM open_queue
                 WHERE sid = ? AND user_id = ? AND waiting_project_id IS NOT NULL",
                (sid, user_id),
            )
            .await?;
        let Some(project_id) = project else {
            return Ok(false);
        };
        let mut tx = conn.start_transaction(read_committed()).await?;
        // The project's lock first, as opens and promotions take it.
        tx.exec_drop(
            "SELECT id FROM projects WHERE id = ? FOR UPDATE",
            (project_id,),
        )
        .await?;
        let left = leave(&mut tx, sid, Exit::Cancelled).await?;
        commit(tx).await?;
        Ok(left)
    })
    .await?;
    if left {
        tracing::info!(sid, user = user_id, "queued open cancelled");
        // The ones behind it move up: their pages ask again anyway.
        wakeups.wake_queue();
    }
    Ok(left)
}

/// What Stop did to `sid`.
pub enum Stopped {
    /// It still waited: it left the queue.
    LeftQueue,
    /// A session: its new state.
    Session(String),
}

/// The owner's Stop: an open that still waits leaves the queue, a session
/// (including one that got its place a moment ago) is stopped.
pub async fn leave_or_stop(
    pool: &Pool,
    wakeups: &Wakeups,
    user_id: u64,
    sid: &str,
) -> Result<Stopped, AppError> {
    if cancel(pool, wakeups, user_id, sid).await? {
        return Ok(Stopped::LeftQueue);
    }
    Ok(Stopped::Session(
        super::ending::stop_own(pool, wakeups, user_id, sid).await?,
    ))
}

/// Marks waiting open `sid` as gone with `exit`; false when it no longer waited.
async fn leave(tx: &mut Transaction<'_>, sid: &str, exit: Exit) -> Result<bool, AppError> {
    tx.exec_drop(
        "UPDATE open_queue SET waiting_project_id = NULL, left_at = UTC_TIMESTAMP(6), outcome = ?
         WHERE sid = ? AND waiting_project_id IS NOT NULL",
        (exit.label(), sid),
    )
    .await?;
    let left = tx.affected_rows() == 1;
    if left {
        metrics::counter!(Exit::METRIC, "outcome" => exit.label()).increment(1);
    }
    Ok(left)
}

/// Takes the opens nobody asks about any more out of the queue.
async fn drop_abandoned(pool: &Pool) -> Result<(), AppError> {
    let mut conn = pool.get_conn().await?;
    conn.exec_drop(
        "UPDATE open_queue SET waiting_project_id = NULL, left_at = UTC_TIMESTAMP(6), outcome = ?
         WHERE waiting_project_id IS NOT NULL
           AND last_seen_at < UTC_TIMESTAMP(6) - INTERVAL ? SECOND",
        (Exit::Abandoned.label(), ABANDONED_AFTER_SECONDS),
    )
    .await?;
    let dropped = conn.affected_rows();
    if dropped > 0 {
        metrics::counter!(Exit::METRIC, "outcome" => Exit::Abandoned.label()).increment(dropped);
        tracing::info!(dropped, "queued opens nobody waits for left the queue");
    }
    Ok(())
}

/// What one look at the head of the queue did.
enum Step {
    /// The head was placed: look again.
    Placed,
    /// The head left the queue (or another replica took it): look again.
    Moved,
    /// The queue is empty, or its head waits for room.
    Done,
}

/// Places waiting opens in order while hosts have room; returns how many
/// were placed.
pub async fn promote(
    pool: &Pool,
    wakeups: &Wakeups,
    host_share_percent: u8,
) -> Result<usize, AppError> {
    drop_abandoned(pool).await?;
    let mut placed = 0;
    loop {
        match retrying(|| promote_head(pool, wakeups, host_share_percent)).await? {
            Step::Placed => placed += 1,
            Step::Moved => {}
            Step::Done => return Ok(placed),
        }
    }
}

async fn promote_head(
    pool: &Pool,
    wakeups: &Wakeups,
    host_share_percent: u8,
) -> Result<Step, AppError> {
    let mut conn = pool.get_conn().await?;
    let head: Option<(String, u64, u64)> = conn
        .query_first(
            "SELECT sid, project_id, user_id FROM open_queue
             WHERE waiting_project_id IS NOT NULL ORDER BY queued_at, id LIMIT 1",
        )
        .await?;
    let Some((sid, project_id, user_id)) = head else {
        return Ok(Step::Done);
    };
    let candidate_list = candidates(&mut conn).await?;
    let mut tx = conn.start_transaction(read_committed()).await?;
    // Lock order as in an open: the project, then the queue row, the
    // account and the hosts.
    let last_host = match lock_project(&mut tx, user_id, project_id).await {
        Ok(last_host) => last_host,
        Err(AppError::NotFound(_) | AppError::Conflict { .. }) => {
            leave(&mut tx, &sid, Exit::ProjectGone).await?;
            commit(tx).await?;
            return Ok(Step::Moved);
        }
        Err(e) => return Err(e),
    };
    let waited: Option<f64> = tx
        .exec_first(
            "SELECT TIMESTAMPDIFF(MICROSECOND, queued_at, UTC_TIMESTAMP(6)) / 1e6 FROM open_queue
             WHERE sid = ? AND waiting_project_id IS NOT NULL FOR UPDATE",
            (&sid,),
        )
        .await?;
    let Some(waited) = waited else {
        // Another replica placed it, or its owner cancelled it, meanwhile.
        tx.rollback().await?;
        return Ok(Step::Moved);
    };
    let limits = match admit(&mut tx, user_id, false).await {
        Ok(limits) => limits,
        Err(e) => {
            let exit = match e {
                AppError::PaymentRequired(_) => Exit::NoBalance,
                AppError::LimitReached(_) => Exit::SessionsAtOnce,
                other => return Err(other),
            };
            leave(&mut tx, &sid, exit).await?;
            commit(tx).await?;
            tracing::info!(%sid, outcome = exit.label(), "queued open dropped");
            return Ok(Step::Moved);
        }
    };
    let Some(host) = take_room(&mut tx, placement_order(candidate_list, last_host)).await? else {
        tx.rollback().await?;
        return Ok(Step::Done);
    };
    leave(&mut tx, &sid, Exit::Placed).await?;
    let session = NewSession::new(&sid, project_id, user_id, host_share_percent, &limits);
    place(tx, &session, &host, wakeups).await?;
    metrics::histogram!("opencloud_control_queue_wait_seconds").record(waited);
    tracing::info!(%sid, waited_seconds = waited, "queued open placed");
    Ok(Step::Placed)
}

/// Promotes waiting opens every second and whenever a session ends on
/// this replica, until `stopping` turns true.
pub async fn run(
    pool: Pool,
    wakeups: Wakeups,
    host_share_percent: u8,
    mut stopping: tokio::sync::watch::Receiver<bool>,
) {
    let woken = wakeups.queue();
    loop {
        if let Err(e) = promote(&pool, &wakeups, host_share_percent).await {
            tracing::warn!(error = %e, "queue promotion failed");
        }
        tokio::select! {
            _ = woken.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stopping.wait_for(|stop| *stop) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wait_is_the_position_times_the_gap_between_ends() {
        // Ten ends in the last 600 s: one place every 60 s.
        assert_eq!(wait_for(1, 10, 600.0), 60);
        assert_eq!(wait_for(3, 10, 600.0), 180);
        // Never zero, and a clock step backwards reads as no gap.
        assert_eq!(wait_for(1, 100, 1.0), 1);
        assert_eq!(wait_for(2, 1, -5.0), 1);
    }

    #[test]
    fn waits_read_in_words() {
        let text = |eta_seconds| {
            QueueSpot {
                position: 1,
                eta_seconds,
            }
            .wait_text()
        };
        assert_eq!(text(Some(30)), "less than a minute");
        assert_eq!(text(Some(61)), "about 2 minutes");
        assert_eq!(text(Some(60)), "about 1 minute");
        assert_eq!(text(Some(4 * 3600)), "about 4 hours");
        assert!(text(None).starts_with("not known yet"));
    }

    #[test]
    fn every_exit_reads_back_from_its_label() {
        for exit in Exit::ALL {
            assert_eq!(Exit::from_label(exit.label()), Some(*exit));
        }
        assert_eq!(Exit::from_label("unheard_of"), None);
    }
}
