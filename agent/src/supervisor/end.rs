//! Every way a session ends — stopped, or exited by itself — and the
//! teardown all endings share (`finish`): whoever moved the session out of
//! `Starting`/`Running` runs it once; everyone else waits for `Gone`.

use std::sync::Arc;
use std::time::Duration;

use opencloud_protocol::agent::AgentEvent;

use super::{describe_exit, starting_or_running, Phase, Session, Supervisor, LEFTOVER_GRACE};
use crate::process;
use crate::state::SessionRecord;

impl Supervisor {
    /// The session's process once spawning is over (`None`: never launched).
    pub(super) async fn settled_process(&self, session: &Session) -> Option<SessionRecord> {
        let mut rx = session.status.subscribe();
        let status = rx.wait_for(|st| !st.spawning).await.map(|st| st.clone());
        status.ok().and_then(|st| st.process)
    }

    /// Last step of every ending: network helper, session directory, a
    /// warm server's files (handed back to the project) and user, cgroup
    /// and state gone, removed from its map, waiters told.
    pub(super) async fn finish(
        &self,
        session: &Arc<Session>,
        record: Option<&SessionRecord>,
        event: AgentEvent,
    ) {
        let server_id = &session.server_id;
        self.release(server_id, record).await;
        let mut files_safe = true;
        if let Some(slot) = session.pool_slot {
            let bound = (!session.waiting_in_pool()).then_some(session.project_id);
            files_safe = self.clear_pool_server(server_id, slot, bound).await;
        }
        if let Some(cgroups) = self.inner.cgroups.cgroups() {
            cgroups.remove(server_id).await;
        }
        if files_safe {
            self.inner.state.remove(server_id);
        }
        {
            let mut sessions = self.lock_sessions();
            if sessions
                .get(&session.sid)
                .is_some_and(|s| Arc::ptr_eq(s, session))
            {
                sessions.remove(&session.sid);
            }
            let mut pool = self.lock_pool();
            if pool.get(server_id).is_some_and(|s| Arc::ptr_eq(s, session)) {
                pool.remove(server_id);
            }
        }
        session
            .status
            .send_modify(|st| st.phase = Phase::Gone(event));
        self.publish_gauges();
        self.inner.pool_changed.notify_one();
    }

    /// What a server holds outside its sandbox once its processes are
    /// gone: its slirp4netns and its directory (the socket).
    pub(super) async fn release(&self, server_id: &str, record: Option<&SessionRecord>) {
        if let Some(slirp) = record.and_then(|r| r.slirp) {
            process::stop_helper(slirp.pid, slirp.start_ticks, LEFTOVER_GRACE).await;
        }
        if self.inner.root {
            crate::sandbox::NetNs::for_session(server_id).remove().await;
        }
        let dir = self.inner.layout.session_dir(server_id);
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(server_id, error = %e, "cannot remove the session's directory");
            }
        }
    }

    /// Stops a session: SIGTERM to its processes, SIGKILL after `grace`,
    /// and reports `Stopped`. Unknown sessions are
    /// reported stopped at once.
    pub async fn stop(&self, sid: &str, grace: Duration) -> AgentEvent {
        let event = AgentEvent::Stopped {
            sid: sid.to_owned(),
        };
        if let Some(session) = self.lookup(sid) {
            self.end(&session, grace, event.clone()).await;
        }
        self.emit(event.clone());
        event
    }

    /// Ends a session or warm server: SIGTERM, SIGKILL after `grace`, the
    /// last snapshot of a session's files, the teardown; or waits for the
    /// ending already under way.
    pub(super) async fn end(&self, session: &Arc<Session>, grace: Duration, event: AgentEvent) {
        let sid = session.sid.as_str();
        if session.take_over(starting_or_running, Phase::Stopping) {
            self.publish_gauges();
            let record = self.settled_process(session).await;
            if let Some(record) = &record {
                tracing::info!(sid, pid = record.pid, "stopping session");
                if !process::terminate(&record.scope(), grace).await {
                    tracing::error!(sid, "processes of the session survived SIGKILL");
                }
                // Before `Stopped`: control takes snapshots only from
                // sessions the host still runs.
                if !session.waiting_in_pool() {
                    self.final_snapshot(session).await;
                }
            }
            self.finish(session, record.as_ref(), event).await;
            tracing::info!(sid, "session stopped");
        } else {
            // Already ending: wait for that to finish.
            session.gone().await;
        }
    }

    /// Stops every session and warm server, `grace` each, all at once.
    pub async fn stop_all(&self, grace: Duration) {
        let sids: Vec<String> = self.lock_sessions().keys().cloned().collect();
        let mut stops = tokio::task::JoinSet::new();
        for sid in sids {
            let supervisor = self.clone();
            stops.spawn(async move { supervisor.stop(&sid, grace).await });
        }
        let sessions = async { while stops.join_next().await.is_some() {} };
        tokio::join!(sessions, self.close_pool());
    }

    pub(super) async fn exited(&self, session: Arc<Session>, code: Option<i32>) {
        session.status.send_modify(|st| st.exit = Some(code));
        if !session.take_over(|p| matches!(p, Phase::Running { .. }), Phase::Ending) {
            // Starting: the start reports it; stopping: expected.
            return;
        }
        self.publish_gauges();
        let record = session.status.borrow().process.clone();
        let log_tail = self.clear_leftovers(&session, record.as_ref()).await;
        if session.waiting_in_pool() {
            tracing::warn!(
                server_id = session.server_id,
                exit = describe_exit(code),
                log_tail,
                "a warm server exited by itself; another one starts"
            );
            let event = AgentEvent::Stopped {
                sid: session.sid.clone(),
            };
            self.finish(&session, record.as_ref(), event).await;
            return;
        }
        self.final_snapshot(&session).await;
        tracing::warn!(
            sid = session.sid,
            exit = describe_exit(code),
            "jupyter exited by itself"
        );
        metrics::counter!(super::EXITS).increment(1);
        let event = AgentEvent::Exited {
            sid: session.sid.clone(),
            exit_code: code,
            log_tail,
        };
        self.finish(&session, record.as_ref(), event.clone()).await;
        self.emit(event);
    }

    /// Kills what is left of a server that exited or failed to start
    /// (kernels outlive a killed server) and reads the tail of its log.
    pub(super) async fn clear_leftovers(
        &self,
        session: &Session,
        record: Option<&SessionRecord>,
    ) -> String {
        if let Some(record) = record {
            process::terminate(&record.scope(), LEFTOVER_GRACE).await;
        }
        self.log_tail(session)
    }
}
