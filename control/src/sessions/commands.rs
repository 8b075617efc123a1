//! The command queue to agents: `start` and `stop` rows in
//! `host_commands`, the long poll agents take them from, and the
//! [`Wakeups`] that end a poll the moment its host gets a command.
//!
//! A command is only handed out while its session still wants it (a start
//! while starting, a stop while stopping, a save while running), so a
//! stale one is never acted on.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mysql_async::prelude::*;
use mysql_async::Pool;
use opencloud_protocol::agent::{Action, Command, StartSession, COMMAND_POLL_SECONDS};
use tokio::sync::Notify;

use super::state::Phase;
use crate::error::AppError;

/// How long an agent gets to stop a server before it is killed.
pub const STOP_GRACE_MS: u64 = 10_000;

/// Wakes agents' command polls on this replica the moment a command for
/// their host is queued, and the queue's promoter when something on a host
/// changed (other replicas notice within a second).
#[derive(Clone, Default)]
pub struct Wakeups {
    hosts: Arc<Mutex<HashMap<u64, Arc<Notify>>>>,
    queue: Arc<Notify>,
}

impl Wakeups {
    fn for_host(&self, host: u64) -> Arc<Notify> {
        let mut map = self.hosts.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(host).or_default().clone()
    }

    /// A command for `host` was queued, or one of its sessions changed
    /// (which may have freed a place for a waiting open).
    pub fn wake(&self, host: u64) {
        self.for_host(host).notify_waiters();
        self.wake_queue();
    }

    /// The queue changed or a place may be free: look at its head now.
    pub fn wake_queue(&self) {
        self.queue.notify_one();
    }

    /// What the queue's promoter waits on.
    pub(super) fn queue(&self) -> Arc<Notify> {
        self.queue.clone()
    }
}

/// Queues `action` (`start` or `stop`) for the host's agent.
pub(crate) async fn queue_command(
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

type CommandRow = (
    u64,
    String,
    String,
    u64,
    String,
    f64,
    u64,
    u32,
    Option<f64>,
    Option<u64>,
);

async fn pending_commands(pool: &Pool, host_id: u64, after: u64) -> Result<Vec<Command>, AppError> {
    let rows: Vec<CommandRow> = pool
        .get_conn()
        .await?
        .exec(
            "SELECT c.id, c.action, c.sid, s.project_id, s.state,
                    h.cpu_cores, h.memory_mib, h.max_sessions,
                    CAST(s.cpu_limit_cores AS DOUBLE), s.memory_limit_mib
             FROM host_commands c
             JOIN sessions s ON s.sid = c.sid
             JOIN hosts h ON h.id = c.host_id
             WHERE c.host_id = ? AND c.id > ? AND s.host_id = c.host_id
               AND ((c.action = 'start' AND s.state = ?) OR (c.action = 'stop' AND s.state = ?)
                    OR (c.action = 'save' AND s.state = ?))
             ORDER BY c.id LIMIT 100",
            (
                host_id,
                after,
                Phase::Starting.as_column(),
                Phase::Stopping.as_column(),
                Phase::Running.as_column(),
            ),
        )
        .await?;
    Ok(rows
        .into_iter()
        .map(
            |(
                id,
                action,
                sid,
                project_id,
                _,
                cpu_cores,
                memory_mib,
                max_sessions,
                package_cpu,
                package_memory,
            )| {
                // The host's fair share, within what the user's package allows.
                let share = f64::from(max_sessions.max(1));
                let host_memory = (memory_mib as f64 / share).floor() as u64;
                let host_cpu = cpu_cores / share;
                let action = if action == "save" {
                    Action::Save { sid }
                } else if action == "start" {
                    Action::Start(StartSession {
                        sid,
                        project_id,
                        memory_limit_mib: package_memory
                            .map_or(host_memory, |m| m.min(host_memory)),
                        cpu_limit_cores: package_cpu.map_or(host_cpu, |c| c.min(host_cpu)) as f32,
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
