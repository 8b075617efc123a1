//! Taking over what an earlier agent left in the work dir: servers that
//! are still ours and answer on their socket run on as `Running`
//! sessions; everything else (processes, slirp, cgroups, session
//! directories, state files) is cleaned up.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opencloud_protocol::routes::is_valid_sid;
use tokio::sync::watch;

use super::{Activity, Phase, Session, Status, Supervisor, LEFTOVER_GRACE};
use crate::jupyter;
use crate::process;
use crate::state::SessionRecord;

impl Supervisor {
    pub(super) async fn adopt_leftovers(&self) {
        let records = self.inner.state.load_all();
        let mut kept = HashSet::new();
        for record in records {
            let server_id = record.sid.clone();
            // A warm server no start bound is not adopted: nobody needs it
            // yet, and a fresh one replaces it.
            let sid = match &record.warm {
                None => Some(server_id.clone()),
                Some(warm) => warm.session.clone(),
            };
            let adoptable = sid.as_deref().is_some_and(is_valid_sid) && is_valid_sid(&server_id);
            if let (Some(sid), true) = (sid, adoptable && self.answers(&record).await) {
                tracing::info!(sid, server_id, pid = record.pid, "adopted a running server");
                let files = match &record.warm {
                    Some(_) => self.inner.layout.pool_root(&server_id),
                    None => self.inner.layout.project(record.project_id),
                };
                let session = Arc::new(Session {
                    sid: sid.clone(),
                    server_id: server_id.clone(),
                    project_id: record.project_id,
                    files,
                    pool_slot: record.warm.as_ref().map(|w| w.slot),
                    started_at: record.started_at,
                    memory_limit_mib: 0,
                    status: watch::channel(Status {
                        phase: Phase::Running { spawn_ms: 0 },
                        spawning: false,
                        process: Some(record.clone()),
                        exit: None,
                    })
                    .0,
                    activity: Mutex::new(Activity::default()),
                    promised: Default::default(),
                });
                self.lock_sessions().insert(sid.clone(), session.clone());
                self.watch_adopted(session.clone(), record);
                self.watch_memory(session.clone());
                self.autosave(session);
                kept.insert(server_id);
            } else {
                tracing::info!(
                    server_id,
                    pid = record.pid,
                    "cleaning up a server left behind"
                );
                if !process::terminate(&record.scope(), LEFTOVER_GRACE).await {
                    tracing::error!(server_id, "processes left behind survived SIGKILL");
                }
                self.release(&server_id, Some(&record)).await;
                let mut files_safe = true;
                if let Some(warm) = &record.warm {
                    let bound = warm.session.is_some().then_some(record.project_id);
                    files_safe = self.clear_pool_server(&server_id, warm.slot, bound).await;
                }
                if let Some(cgroups) = self.inner.cgroups.cgroups() {
                    cgroups.remove(&server_id).await;
                }
                if files_safe {
                    self.inner.state.remove(&server_id);
                } else {
                    // Its files are still in its root: keep that for the next start.
                    kept.insert(server_id);
                }
            }
        }
        // Session directories (with their network namespaces and cgroups)
        // of starts an earlier agent did not finish. Only what this work
        // dir names is ours: other agents on the machine (the local stack
        // runs two) keep their sessions' cgroups beside ours, and removing
        // one between its creation and its first process breaks that start.
        let dirs = std::fs::read_dir(self.inner.layout.sessions())
            .into_iter()
            .flatten();
        for entry in dirs.filter_map(|e| e.ok()) {
            let sid = entry.file_name().to_string_lossy().into_owned();
            if entry.path().is_dir() && is_valid_sid(&sid) && !kept.contains(&sid) {
                self.release(&sid, None).await;
                if let Some(cgroups) = self.inner.cgroups.cgroups() {
                    cgroups.remove(&sid).await;
                }
            }
        }
        // Roots of warm servers whose start an earlier agent did not
        // finish: only ever empty (a bound one has a state file), so only
        // empty ones go.
        let roots = std::fs::read_dir(self.inner.layout.pool())
            .into_iter()
            .flatten();
        for entry in roots.filter_map(|e| e.ok()) {
            let server_id = entry.file_name().to_string_lossy().into_owned();
            if !kept.contains(&server_id) && std::fs::remove_dir(entry.path()).is_err() {
                tracing::warn!(
                    server_id,
                    "a warm server's root with files in it and no state file; left for a person to look at"
                );
            }
        }
        self.publish_gauges();
    }

    /// Whether a recorded server is the one we started and answers on its socket.
    async fn answers(&self, record: &SessionRecord) -> bool {
        let ours = process::proc_info(record.pid).is_some_and(|p| {
            p.is_alive() && p.start_ticks == record.start_ticks && p.uid == record.uid
        });
        if !ours {
            return false;
        }
        let socket = self.inner.layout.socket(&record.sid);
        for attempt in 0..3 {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            if jupyter::status(&socket).await.is_some() {
                return true;
            }
        }
        false
    }

    /// Watches a server this process did not start (adopted after a restart).
    fn watch_adopted(&self, session: Arc<Session>, record: SessionRecord) {
        let supervisor = self.clone();
        let mut detached = self.inner.detached.subscribe();
        tokio::spawn(async move {
            loop {
                let alive = process::proc_info(record.pid)
                    .is_some_and(|p| p.is_alive() && p.start_ticks == record.start_ticks);
                if !alive {
                    break;
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = detached.wait_for(|d| *d) => return,
                }
            }
            // Not our child: its exit code went to its new parent.
            supervisor.exited(session, None).await;
        });
    }
}
