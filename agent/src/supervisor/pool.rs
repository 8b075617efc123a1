//! The warm pool: Jupyter servers started before their project is known,
//! each in its own sandbox exactly like a cold start's (network namespace,
//! cgroup, walls), as a pool user of its own (`users::pool_user`) with an
//! empty home and an empty root directory (`pool/<server id>`).
//!
//! A start takes a ready one (`launch::claim`) and binds it here: the
//! project's files, restored as for a cold start in `projects/<id>`, move
//! into the server's root and the project's home into the server's home,
//! both then owned by the pool user; the cgroup gets the session's limits.
//! When the session ends, after its last snapshot, everything moves back,
//! owned by the project's user again, so a later cold start finds it
//! (`finish` → [`Supervisor::clear_pool_server`]). A pooled server serves
//! one session and is never reused; its slot (and user) is free again only
//! once its processes are gone and its root and home are empty.
//!
//! The keeper holds `min(warm_pool, max_sessions - sessions)` servers
//! (none while control drains the host), refilling through the start gate
//! behind every user's start.

use std::os::unix::fs::MetadataExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use opencloud_protocol::agent::{AgentEvent, StartSession};
use opencloud_protocol::routes::new_sid;

use super::launch::{Plan, Readiness};
use super::{Phase, Session, Supervisor, LEFTOVER_GRACE};
use crate::cgroups::{Limits, DEFAULT_PIDS_MAX};
use crate::error::Error;
use crate::gate::Priority;
use crate::jupyter;
use crate::state::WarmRecord;
use crate::users;
use crate::workdir::{empty_dir, move_contents, private_dir, Rehome};

/// Between refills that failed, at first; doubles up to [`REFILL_BACKOFF_MAX`].
const REFILL_BACKOFF: Duration = Duration::from_secs(5);
const REFILL_BACKOFF_MAX: Duration = Duration::from_secs(120);
/// The keeper looks again this often even when nothing woke it.
const KEEPER_TICK: Duration = Duration::from_secs(5);

impl Supervisor {
    /// Keeps the warm pool filled (a background task, until detached).
    pub fn keep_warm(&self) {
        if self.inner.config.warm_pool == 0 {
            return;
        }
        let supervisor = self.clone();
        let mut detached = self.inner.detached.subscribe();
        tokio::spawn(async move {
            let mut backoff = REFILL_BACKOFF;
            loop {
                for extra in supervisor.extra_warm_servers() {
                    supervisor.retire(&extra).await;
                }
                let pause = match supervisor.refill().await {
                    Some(true) => {
                        backoff = REFILL_BACKOFF;
                        continue;
                    }
                    Some(false) => {
                        let pause = backoff;
                        backoff = (backoff * 2).min(REFILL_BACKOFF_MAX);
                        pause
                    }
                    None => KEEPER_TICK,
                };
                tokio::select! {
                    _ = supervisor.inner.pool_changed.notified(), if pause == KEEPER_TICK => {}
                    _ = tokio::time::sleep(pause) => {}
                    _ = detached.wait_for(|d| *d) => return,
                }
            }
        });
    }

    /// Control drains this host (or no longer does): no warm servers then.
    pub fn set_draining(&self, draining: bool) {
        let changed = self.inner.draining.send_if_modified(|d| {
            let changed = *d != draining;
            *d = draining;
            changed
        });
        if changed {
            self.inner.pool_changed.notify_one();
        }
    }

    /// Warm servers ready to be bound now.
    pub fn warm_servers(&self) -> u32 {
        self.lock_pool()
            .values()
            .filter(|w| matches!(w.phase(), Phase::Running { .. }))
            .count() as u32
    }

    /// The server process of each warm server waiting in the pool (for tests and logs).
    pub fn warm_pids(&self) -> Vec<i32> {
        self.lock_pool()
            .values()
            .filter_map(|w| w.status.borrow().process.as_ref().map(|p| p.pid))
            .collect()
    }

    /// How many warm servers the host should hold now.
    fn warm_wanted(&self, sessions: usize) -> usize {
        if *self.inner.draining.borrow() {
            return 0;
        }
        let max = self.inner.config.capacity.max_sessions as usize;
        (self.inner.config.warm_pool as usize).min(max.saturating_sub(sessions))
    }

    /// Warm servers beyond what is wanted, those not ready first.
    fn extra_warm_servers(&self) -> Vec<Arc<Session>> {
        let sessions = self.lock_sessions();
        let wanted = self.warm_wanted(sessions.len());
        let pool = self.lock_pool();
        let promised = pool.values().filter(|w| w.is_promised()).count();
        let wanted = wanted.max(promised);
        let mut servers: Vec<Arc<Session>> = pool
            .values()
            .filter(|w| !w.is_promised())
            .cloned()
            .collect();
        servers.sort_by_key(|w| (matches!(w.phase(), Phase::Running { .. }), w.started_at));
        let extra = (servers.len() + promised).saturating_sub(wanted);
        servers.truncate(extra);
        servers
    }

    /// Starts one warm server when one is wanted and a slot is free:
    /// `None` when none was wanted, else whether it became ready.
    async fn refill(&self) -> Option<bool> {
        let server = {
            let sessions = self.lock_sessions();
            let wanted = self.warm_wanted(sessions.len());
            let mut pool = self.lock_pool();
            if pool.len() >= wanted {
                return None;
            }
            let slot = free_slot(
                sessions.values().chain(pool.values()),
                self.inner.config.capacity.max_sessions,
            )?;
            let server_id = new_sid();
            let server = Arc::new(Session::launching(
                server_id.clone(),
                server_id.clone(),
                0,
                self.inner.layout.pool_root(&server_id),
                Some(slot),
                0,
            ));
            pool.insert(server_id, server.clone());
            server
        };
        self.publish_gauges();
        let server_id = server.server_id.clone();
        // Behind every user's start; retired meanwhile, its retirement ends it.
        let Some(_pass) = self.wait_turn(&server, Priority::Refill).await else {
            return Some(false);
        };
        let launched = match self.prepare_warm(&server).await {
            Ok(plan) => self.spawn(&server, &plan).await,
            Err(e) => Err(e),
        };
        if let Err(e) = launched {
            server.status.send_modify(|st| st.spawning = false);
            let (event, _) = self.fail(&server, e.to_string(), None).await;
            tracing::warn!(server_id, ?event, "a warm server did not start");
            return Some(false);
        }
        let received = Instant::now();
        let deadline = received + self.inner.config.start_timeout;
        let ready = match self.wait_ready(&server, received, deadline).await {
            Readiness::Ready(spawn_ms) => {
                tracing::info!(server_id, spawn_ms, "warm server ready");
                true
            }
            Readiness::Superseded => false,
            Readiness::TimedOut => {
                let (event, _) = self
                    .fail(&server, "did not answer in time".into(), None)
                    .await;
                tracing::warn!(server_id, ?event, "a warm server did not start");
                false
            }
            Readiness::Exited(code) => {
                let (event, _) = self.fail(&server, "exited".into(), code).await;
                tracing::warn!(server_id, ?event, "a warm server did not start");
                false
            }
        };
        self.publish_gauges();
        Some(ready)
    }

    /// The pool slot's user with an empty home, and an empty root.
    async fn prepare_warm(&self, server: &Session) -> Result<Plan, Error> {
        let layout = &self.inner.layout;
        let slot = server.pool_slot.unwrap_or_default();
        let run_as = if self.inner.root {
            let name = users::pool_user(&layout.work_dir, slot);
            let _serialised = self.inner.users.lock().await;
            users::ensure_user(&name, &layout.home(&name)).await?
        } else {
            users::current()
        };
        let home = layout.home(&run_as.name);
        if self.inner.root {
            // What an earlier server of the slot left is not this one's.
            empty_dir(&home).map_err(|e| Error::io(&home, e))?;
        }
        private_dir(&home, &run_as)?;
        private_dir(&server.files, &run_as)?;
        Ok(Plan {
            run_as,
            home,
            limits: Limits {
                memory_mib: 0,
                cpu_cores: 0.0,
                pids: DEFAULT_PIDS_MAX,
            },
        })
    }

    /// Binds the ready warm server `session` was given (see `claim`) to it:
    /// the outcome to report, or why the server could not take it (the
    /// caller then starts cold).
    pub(super) async fn bind(
        &self,
        session: &Arc<Session>,
        warm: &Session,
        command: &StartSession,
        received: Instant,
    ) -> Result<(AgentEvent, bool), String> {
        let sid = session.sid.clone();
        let layout = &self.inner.layout;
        let mut record = warm
            .status
            .borrow()
            .process
            .clone()
            .ok_or("the warm server has no process")?;
        // The project's files as a cold start has them, in `projects/<id>`.
        let run_as = self
            .project_user(command.project_id)
            .await
            .map_err(|e| e.to_string())?;
        let project_dir = layout.project(command.project_id);
        let home = layout.home(&run_as.name);
        private_dir(&home, &run_as).map_err(|e| e.to_string())?;
        private_dir(&project_dir, &run_as).map_err(|e| e.to_string())?;
        self.restore_project(session, &run_as).await;

        // Recorded before a file moves: a restart from here on hands them back.
        record.project_id = command.project_id;
        record.warm = Some(WarmRecord {
            slot: session.pool_slot.unwrap_or_default(),
            session: Some(sid.clone()),
        });
        self.inner.state.save(&record).map_err(|e| e.to_string())?;
        session
            .status
            .send_modify(|st| st.process = Some(record.clone()));
        let rehome = run_as.switch.then_some(Rehome {
            from_uid: run_as.uid,
            to_uid: record.uid,
            to_gid: record.gid,
        });
        let moves = [
            (project_dir, session.files.clone()),
            (home, layout.home(&record.user)),
        ];
        tokio::task::spawn_blocking(move || {
            for (from, to) in &moves {
                move_contents(from, to, rehome).map_err(|e| {
                    format!("cannot move {} to {}: {e}", from.display(), to.display())
                })?;
            }
            Ok::<_, String>(())
        })
        .await
        .map_err(|e| e.to_string())??;
        self.apply_limits(session, command);

        let socket = layout.socket(&session.server_id);
        if session.status.borrow().exit.is_some() || jupyter::status(&socket).await.is_none() {
            return Err("the warm server no longer answers".into());
        }
        let spawn_ms = received.elapsed().as_millis() as u64;
        let mut running = false;
        let mut exited = false;
        session.status.send_modify(|st| {
            st.spawning = false;
            exited = st.exit.is_some();
            if matches!(st.phase, Phase::Starting) && !exited {
                st.phase = Phase::Running { spawn_ms };
                running = true;
            }
        });
        if exited {
            return Err("the warm server exited while it was being bound".into());
        }
        if !running {
            // A stop took over; it reports `Stopped` (and hands the files back).
            return Ok((AgentEvent::Stopped { sid }, false));
        }
        metrics::counter!(super::WARM_BINDS).increment(1);
        metrics::histogram!("opencloud_agent_spawn_seconds").record(spawn_ms as f64 / 1000.0);
        self.publish_gauges();
        self.watch_memory(session.clone());
        self.autosave(session.clone());
        // A replacement starts in the background.
        self.inner.pool_changed.notify_one();
        tracing::info!(
            sid,
            server_id = session.server_id,
            spawn_ms,
            "session bound to a warm server"
        );
        Ok((
            AgentEvent::Ready {
                sid,
                spawn_ms,
                warm: true,
            },
            true,
        ))
    }

    /// Ends a bind that failed: the server goes (its files back to the
    /// project) and the session leaves the map for a cold start. False when
    /// a stop took the session over meanwhile.
    pub(super) async fn abandon_bind(&self, session: &Arc<Session>) -> bool {
        session.status.send_modify(|st| st.spawning = false);
        if !session.take_over(|p| matches!(p, Phase::Starting), Phase::Ending) {
            return false;
        }
        let record = session.status.borrow().process.clone();
        self.clear_leftovers(session, record.as_ref()).await;
        let event = AgentEvent::Stopped {
            sid: session.sid.clone(),
        };
        self.finish(session, record.as_ref(), event).await;
        true
    }

    /// Stops a warm server that waits in the pool (or is still starting).
    pub(super) async fn retire(&self, server: &Arc<Session>) {
        tracing::info!(server_id = server.server_id, "retiring a warm server");
        let event = AgentEvent::Stopped {
            sid: server.sid.clone(),
        };
        self.end(server, LEFTOVER_GRACE, event).await;
    }

    /// No more warm servers: those waiting go now (shutdown, stop-all).
    pub async fn close_pool(&self) {
        self.set_draining(true);
        let servers: Vec<Arc<Session>> = self.lock_pool().values().cloned().collect();
        let mut retiring = tokio::task::JoinSet::new();
        for server in servers {
            let supervisor = self.clone();
            retiring.spawn(async move { supervisor.retire(&server).await });
        }
        while retiring.join_next().await.is_some() {}
    }

    /// Empties a warm server's root and home once its processes are gone,
    /// first handing the files of the project it was bound to back to the
    /// project's directory and home. False when that failed: the files
    /// stay in the root (and the state file that names them) for the next try.
    pub(super) async fn clear_pool_server(
        &self,
        server_id: &str,
        slot: u32,
        bound_project: Option<u64>,
    ) -> bool {
        let layout = &self.inner.layout;
        let root = layout.pool_root(server_id);
        let pool_home = layout.home(&users::pool_user(&layout.work_dir, slot));
        let pool_home = if self.inner.root {
            pool_home
        } else {
            // Not root: every server runs as the agent's user, in its home.
            layout.home(&users::current().name)
        };
        if let Some(project_id) = bound_project {
            if let Err(e) = self.hand_back(project_id, &root, &pool_home).await {
                tracing::error!(
                    server_id,
                    project_id,
                    "cannot hand the project's files back; they stay in {}: {e}",
                    root.display()
                );
                return false;
            }
        }
        for dir in [&root, &pool_home] {
            if !self.inner.root && dir == &pool_home {
                continue;
            }
            if let Err(e) = empty_dir(dir) {
                tracing::warn!(server_id, dir = %dir.display(), "cannot empty a warm server's directory: {e}");
            }
        }
        true
    }

    /// Moves a bound server's files back to the project, owned by its user.
    async fn hand_back(
        &self,
        project_id: u64,
        root: &std::path::Path,
        pool_home: &std::path::Path,
    ) -> Result<(), String> {
        let layout = &self.inner.layout;
        let run_as = self
            .project_user(project_id)
            .await
            .map_err(|e| e.to_string())?;
        let project_dir = layout.project(project_id);
        let home = layout.home(&run_as.name);
        private_dir(&project_dir, &run_as).map_err(|e| e.to_string())?;
        private_dir(&home, &run_as).map_err(|e| e.to_string())?;
        let pool_uid = std::fs::metadata(root).map(|m| m.uid()).ok();
        let rehome = match pool_uid {
            Some(from_uid) if run_as.switch => Some(Rehome {
                from_uid,
                to_uid: run_as.uid,
                to_gid: run_as.gid,
            }),
            _ => None,
        };
        let moves = [
            (root.to_path_buf(), project_dir),
            (pool_home.to_path_buf(), home),
        ];
        tokio::task::spawn_blocking(move || {
            for (from, to) in &moves {
                if from == to {
                    continue;
                }
                move_contents(from, to, rehome).map_err(|e| {
                    format!("cannot move {} to {}: {e}", from.display(), to.display())
                })?;
            }
            Ok(())
        })
        .await
        .map_err(|e| e.to_string())?
    }
}

/// The lowest pool slot no live server holds.
fn free_slot<'a>(holders: impl Iterator<Item = &'a Arc<Session>>, slots: u32) -> Option<u32> {
    let taken: std::collections::HashSet<u32> = holders.filter_map(|s| s.pool_slot).collect();
    (0..slots).find(|slot| !taken.contains(slot))
}
