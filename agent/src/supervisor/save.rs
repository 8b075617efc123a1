//! A session's project snapshots ([`crate::snapshot`]): restored before
//! its server starts, pushed every `autosave_interval` while it runs when
//! the files changed, and once more after its server has exited. None of it
//! stops a session from starting or stopping: failures are logged, and the
//! session goes on with the files on this host.

use std::sync::Arc;

use opencloud_protocol::snapshots::Reason;

use super::{Phase, Session, SnapshotOp, Supervisor};
use crate::snapshot::{Owner, Pushed, Restored};
use crate::users::RunAs;

impl Supervisor {
    /// Brings the project's directory to its latest snapshot (before its
    /// server starts).
    pub(super) async fn restore_project(&self, session: &Session, run_as: &RunAs) {
        let project_id = session.project_id;
        let shared = self.lock_sessions().values().any(|s| {
            s.project_id == project_id
                && s.sid != session.sid
                && !matches!(s.phase(), Phase::Gone(_))
        });
        if shared {
            // Its files are in use: replacing them would lose that work.
            tracing::info!(
                sid = session.sid,
                project_id,
                "another session of the project runs here; its files are not restored"
            );
            return;
        }
        let owner = run_as.switch.then_some(Owner {
            uid: run_as.uid,
            gid: run_as.gid,
        });
        let dir = self.inner.layout.project(project_id);
        let restored = self
            .inner
            .snapshots
            .restore(&session.sid, project_id, &dir, owner)
            .await;
        match restored {
            Ok(Restored::Nothing) => {
                tracing::debug!(sid = session.sid, project_id, "no snapshot to restore")
            }
            Ok(Restored::Current(version)) => tracing::info!(
                sid = session.sid,
                project_id,
                version,
                "the project's files are already the latest snapshot"
            ),
            Ok(Restored::KeptLocalChanges(version)) => tracing::warn!(
                sid = session.sid,
                project_id,
                version,
                "the project's files here have changes newer than the latest snapshot; kept"
            ),
            Ok(Restored::Version(_)) => {}
            Err(e) => {
                SnapshotOp::Restore.count_failure();
                tracing::error!(
                    sid = session.sid,
                    project_id,
                    "cannot restore the project's snapshot; starting with the files on this host: {e}"
                );
            }
        }
    }

    /// Pushes the session's files if they changed; false when that failed.
    async fn push(&self, session: &Session, reason: Reason) -> bool {
        let dir = &session.files;
        let pushed = self
            .inner
            .snapshots
            .push(&session.sid, session.project_id, dir, reason)
            .await;
        match pushed {
            Ok(Pushed::Unchanged | Pushed::Stored(_)) => true,
            Err(e) => {
                SnapshotOp::Push.count_failure();
                tracing::warn!(
                    sid = session.sid,
                    project_id = session.project_id,
                    reason = reason.as_str(),
                    over_quota = e.over_quota(),
                    "snapshot not stored: {e}"
                );
                false
            }
        }
    }

    /// Pushes a running session's changed files every `autosave_interval`
    /// until it stops running (its stop pushes the last state itself).
    pub(super) fn autosave(&self, session: Arc<Session>) {
        let supervisor = self.clone();
        let mut detached = self.inner.detached.subscribe();
        let every = self.inner.config.autosave_interval;
        tokio::spawn(async move {
            let mut status = session.status.subscribe();
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = detached.wait_for(|d| *d) => return,
                    _ = status.wait_for(|st| !matches!(st.phase, Phase::Running { .. })) => return,
                }
                // Cut short by a stop: its own push takes over at once.
                tokio::select! {
                    _ = supervisor.push(&session, Reason::Autosave) => {}
                    _ = status.wait_for(|st| !matches!(st.phase, Phase::Running { .. })) => return,
                }
            }
        });
    }

    /// The last snapshot of a session whose server has exited (its files
    /// are final), bounded by `final_snapshot`: a stop never hangs on it.
    pub(super) async fn final_snapshot(&self, session: &Session) {
        let bound = self.inner.config.final_snapshot;
        if tokio::time::timeout(bound, self.push(session, Reason::Stop))
            .await
            .is_err()
        {
            SnapshotOp::Push.count_failure();
            tracing::warn!(
                sid = session.sid,
                project_id = session.project_id,
                "the last snapshot did not finish within {} s; the previous one stays the latest",
                bound.as_secs()
            );
        }
    }

    /// Pushes running session `sid`'s files now, when they changed (its
    /// owner asked); a session that is not running here is left alone.
    pub async fn save_now(&self, sid: &str) {
        let session = self
            .lock_sessions()
            .get(sid)
            .filter(|s| matches!(s.phase(), Phase::Running { .. }))
            .cloned();
        match session {
            Some(session) => {
                self.push(&session, Reason::Save).await;
            }
            None => tracing::warn!(sid, "save asked for a session not running here"),
        }
    }

    /// Pushes the changed files of every running session (the agent is
    /// shutting down; the servers keep running), all within `final_snapshot`.
    pub async fn save_running(&self) {
        let running = self.running_sessions();
        let mut pushes = tokio::task::JoinSet::new();
        for session in running {
            let supervisor = self.clone();
            pushes.spawn(async move { supervisor.push(&session, Reason::Autosave).await });
        }
        let all = async { while pushes.join_next().await.is_some() {} };
        if tokio::time::timeout(self.inner.config.final_snapshot, all)
            .await
            .is_err()
        {
            tracing::warn!("some sessions' files were not saved before shutdown");
        }
    }
}
