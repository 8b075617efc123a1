//! Opening a project: its live (or waiting) session if it has one,
//! otherwise (when the owner has compute time and their package allows
//! another session at once) a new session placed on a host that can take it
//! (a host with a warm server first, then the project's last host, then the
//! least loaded), the agent's start command queued and a `starting` route
//! published, all in one transaction. When no host has room, or others
//! wait already, the open joins the queue ([`super::queue`]).
//!
//! Room is reserved by the placement itself: every candidate host's row is
//! locked and its sessions counted under the lock, so no number of opens on
//! any number of replicas puts more sessions on a host than it has room for.

use std::time::Instant;

use mysql_async::prelude::*;
use mysql_async::Pool;
use opencloud_protocol::routes;
use serde::Serialize;

use super::commands::Wakeups;
use super::queue::{self, QueueSpot};
use super::room::{
    admit, candidates, lock_project, place, placement_order, read_committed, take_room, NewSession,
    PlacementOutcome,
};
use super::state::Phase;
use crate::error::AppError;
use crate::routes::commit;

/// What an open answers.
#[derive(Debug, Clone, Serialize)]
pub struct Opened {
    pub session_id: String,
    /// The host it runs on; `None` while it waits in the queue.
    pub host_id: Option<u64>,
    /// queued, starting, running, stopping.
    pub state: String,
    /// True when the project already had this session (or waiting open).
    pub existing: bool,
    /// Where it waits, while it waits.
    pub queue: Option<QueueSpot>,
}

impl Opened {
    fn placed(sid: String, host_id: u64, state: String, existing: bool) -> Self {
        Self {
            session_id: sid,
            host_id: Some(host_id),
            state,
            existing,
            queue: None,
        }
    }

    fn waiting(sid: String, spot: QueueSpot, existing: bool) -> Self {
        Self {
            session_id: sid,
            host_id: None,
            state: queue::QUEUED.into(),
            existing,
            queue: Some(spot),
        }
    }
}

/// Opens `project_id` for its owner: returns the project's live session
/// (or its waiting open) if it has one, otherwise places a new session and
/// tells the host's agent, or queues the open when no host has room or
/// others wait already.
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
    let mut tx = conn.start_transaction(read_committed()).await?;
    let last_host = lock_project(&mut tx, user_id, project_id).await?;
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
        return Ok(Opened::placed(sid, host_id, state, true));
    }
    if let Some((sid, spot)) = queue::waiting_for_project(&mut tx, project_id).await? {
        tx.rollback().await?;
        return Ok(Opened::waiting(sid, spot, true));
    }
    let limits = match admit(&mut tx, user_id, true).await {
        Ok(limits) => limits,
        Err(e) => {
            tx.rollback().await?;
            return Err(e);
        }
    };
    let sid = routes::new_sid();
    // First come, first served: while anyone waits, a new open waits behind
    // them even if a host has room this instant (the queue takes it next).
    let host = if queue::length(&mut tx).await? > 0 {
        None
    } else {
        take_room(&mut tx, placement_order(candidate_list, last_host)).await?
    };
    let Some(host) = host else {
        let spot = queue::join(&mut tx, &sid, project_id, user_id).await?;
        commit(tx).await?;
        wakeups.wake_queue();
        PlacementOutcome::Queued.count();
        tracing::info!(%sid, project = project_id, position = spot.position, "open queued");
        return Ok(Opened::waiting(sid, spot, false));
    };
    let session = NewSession::new(&sid, project_id, user_id, host_share_percent, &limits);
    place(tx, &session, &host, wakeups).await?;
    PlacementOutcome::Placed.count();
    metrics::histogram!("opencloud_control_placement_duration_seconds")
        .record(started.elapsed().as_secs_f64());
    Ok(Opened::placed(
        sid,
        host.id(),
        Phase::Starting.as_column().into(),
        false,
    ))
}
