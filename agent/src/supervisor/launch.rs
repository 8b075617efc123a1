//! Starting a session: claiming a slot and a port, making its user and
//! directories, launching Jupyter and waiting until it answers. A start
//! that does not get there ends as `Failed` (or `Stopped`, when a stop took
//! it over meanwhile).

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opencloud_protocol::agent::{AgentEvent, StartSession};
use opencloud_protocol::routes::is_valid_sid;
use tokio::sync::watch;

use super::{
    describe_exit, exit_code, unix_now, Activity, Phase, Session, Status, Supervisor,
    LEFTOVER_GRACE,
};
use crate::error::Error;
use crate::jupyter;
use crate::process;
use crate::state::SessionRecord;
use crate::users;
use crate::workdir::private_dir;

/// Launch attempts when the chosen port is taken between check and bind.
const LAUNCH_ATTEMPTS: u32 = 3;

enum Readiness {
    Ready(u64),
    Exited(Option<i32>),
    TimedOut,
    /// A stop took the session over.
    Superseded,
}

impl Supervisor {
    /// Starts a session and reports (and returns) `Ready` or `Failed`.
    /// Starting a session that runs already reports it ready again.
    pub async fn start(&self, command: StartSession) -> AgentEvent {
        let (event, report) = self.start_inner(command).await;
        if report {
            self.emit(event.clone());
        }
        event
    }

    async fn start_inner(&self, command: StartSession) -> (AgentEvent, bool) {
        let received = Instant::now();
        let sid = command.sid.clone();
        if !is_valid_sid(&sid) {
            return (
                AgentEvent::Failed {
                    sid,
                    reason: "not a valid session id".into(),
                    exit_code: None,
                    log_tail: String::new(),
                },
                true,
            );
        }
        loop {
            let claimed = {
                let mut sessions = self.lock_sessions();
                if let Some(existing) = sessions.get(&sid) {
                    Err(existing.clone())
                } else {
                    let max = self.inner.config.capacity.max_sessions as usize;
                    if sessions.len() >= max {
                        drop(sessions);
                        return (
                            self.refused(&sid, format!("the host is full ({max} sessions)")),
                            true,
                        );
                    }
                    let Some(port) = self.pick_port(&sessions) else {
                        drop(sessions);
                        return (self.refused(&sid, "no free loopback port".into()), true);
                    };
                    let session = Arc::new(Session {
                        sid: sid.clone(),
                        project_id: command.project_id,
                        token: String::new(),
                        started_at: unix_now(),
                        port: AtomicU16::new(port),
                        status: watch::channel(Status {
                            phase: Phase::Starting,
                            spawning: true,
                            process: None,
                            exit: None,
                        })
                        .0,
                        activity: Mutex::new(Activity::default()),
                    });
                    sessions.insert(sid.clone(), session.clone());
                    Ok(session)
                }
            };
            self.publish_gauges();
            match claimed {
                Ok(session) => return self.launch(session, &command, received).await,
                Err(existing) => {
                    let mut rx = existing.status.subscribe();
                    let phase = rx
                        .wait_for(|st| matches!(st.phase, Phase::Running { .. } | Phase::Gone(_)))
                        .await
                        .map(|st| st.phase.clone());
                    match phase {
                        Ok(Phase::Running { spawn_ms }) => {
                            return (AgentEvent::Ready { sid, spawn_ms }, true)
                        }
                        // It was stopped meanwhile: this start starts it anew.
                        Ok(Phase::Gone(AgentEvent::Stopped { .. })) => continue,
                        Ok(Phase::Gone(event)) => return (event, true),
                        _ => continue,
                    }
                }
            }
        }
    }

    fn refused(&self, sid: &str, reason: String) -> AgentEvent {
        metrics::counter!("opencloud_agent_spawn_failures_total").increment(1);
        tracing::warn!(sid, %reason, "session not started");
        AgentEvent::Failed {
            sid: sid.to_owned(),
            reason,
            exit_code: None,
            log_tail: String::new(),
        }
    }

    /// A loopback port the system just handed out and no session of ours holds.
    fn pick_port(&self, sessions: &HashMap<String, Arc<Session>>) -> Option<u16> {
        let taken: HashSet<u16> = sessions.values().map(|s| s.port()).collect();
        (0..10).find_map(|_| {
            let port = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
                .ok()?
                .local_addr()
                .ok()?
                .port();
            (!taken.contains(&port)).then_some(port)
        })
    }

    async fn launch(
        &self,
        session: Arc<Session>,
        command: &StartSession,
        received: Instant,
    ) -> (AgentEvent, bool) {
        let sid = session.sid.clone();
        let mut attempt = 0;
        loop {
            attempt += 1;
            if let Err(e) = self.spawn(&session, command).await {
                // Whatever was launched is in the status; nothing more comes.
                session.status.send_modify(|st| st.spawning = false);
                return self.fail(&session, e.to_string(), None).await;
            }
            match self.wait_ready(&session, received).await {
                Readiness::Ready(spawn_ms) => {
                    metrics::histogram!("opencloud_agent_spawn_seconds")
                        .record(spawn_ms as f64 / 1000.0);
                    self.publish_gauges();
                    tracing::info!(sid, port = session.port(), spawn_ms, "session ready");
                    return (AgentEvent::Ready { sid, spawn_ms }, true);
                }
                Readiness::Superseded => return (AgentEvent::Stopped { sid }, false),
                Readiness::TimedOut => {
                    let limit = self.inner.config.start_timeout.as_secs();
                    return self
                        .fail(
                            &session,
                            format!("jupyter did not answer /api/status within {limit} s"),
                            None,
                        )
                        .await;
                }
                Readiness::Exited(code) => {
                    let tail = self.log_tail(&session);
                    if attempt < LAUNCH_ATTEMPTS
                        && tail.contains("already in use")
                        && self.retry_on_another_port(&session).await
                    {
                        continue;
                    }
                    let reason = format!("jupyter {} before it was ready", describe_exit(code));
                    return self.fail(&session, reason, code).await;
                }
            }
        }
    }

    /// After losing a port race: forget the dead server, take another port.
    async fn retry_on_another_port(&self, session: &Arc<Session>) -> bool {
        let old = session.status.borrow().process.clone();
        if let Some(record) = &old {
            process::terminate(&record.scope(), LEFTOVER_GRACE).await;
        }
        let port = {
            let sessions = self.lock_sessions();
            self.pick_port(&sessions)
        };
        let Some(port) = port else {
            return false;
        };
        let reset = session.status.send_if_modified(|st| {
            if matches!(st.phase, Phase::Starting) {
                st.spawning = true;
                st.process = None;
                st.exit = None;
                true
            } else {
                false
            }
        });
        if reset {
            tracing::info!(sid = session.sid, port, "port was taken; trying another");
            session.port.store(port, Ordering::Relaxed);
        }
        reset
    }

    /// Makes the user and directories and launches the server. The process
    /// is published in the session's status as soon as it exists.
    async fn spawn(&self, session: &Arc<Session>, command: &StartSession) -> Result<(), Error> {
        let inner = &self.inner;
        let layout = &inner.layout;
        let run_as = if inner.root {
            let name = users::project_user(command.project_id);
            let _serialised = inner.users.lock().await;
            users::ensure_project_user(command.project_id, &layout.home(&name)).await?
        } else {
            users::current()
        };
        let home = layout.home(&run_as.name);
        let project_dir = layout.project(command.project_id);
        private_dir(&home, &run_as)?;
        private_dir(&project_dir, &run_as)?;

        let log_path = layout.log(&session.sid);
        let log = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&log_path)
            .map_err(|e| Error::io(&log_path, e))?;

        if let Some(cgroups) = inner.cgroups.cgroups() {
            cgroups
                .create(
                    &session.sid,
                    command.memory_limit_mib,
                    command.cpu_limit_cores,
                )
                .map_err(|e| Error::Setup(format!("cannot create the session's cgroup: {e}")))?;
        }

        let addr = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), session.port());
        let config_file = layout.server_config();
        let mut jupyter = jupyter::command(jupyter::Launch {
            venv: &inner.config.venv,
            addr,
            project_dir: &project_dir,
            home: &home,
            config_file: &config_file,
            token: &session.token,
            run_as: &run_as,
            log,
        })
        .map_err(|e| Error::io(&log_path, e))?;
        if !matches!(session.phase(), Phase::Starting) {
            // Stopped while the user and directories were being made.
            session.status.send_modify(|st| st.spawning = false);
            return Ok(());
        }
        let mut child = jupyter
            .spawn()
            .map_err(|e| Error::Setup(format!("cannot start jupyter: {e}")))?;
        let Some(pid) = child.id().map(|p| p as i32) else {
            // Already exited and reaped: report it like any early exit.
            let code = child.wait().await.ok().and_then(exit_code);
            session.status.send_modify(|st| {
                st.spawning = false;
                st.exit = Some(code);
            });
            return Ok(());
        };
        let start_ticks = process::proc_info(pid).map(|p| p.start_ticks).unwrap_or(0);
        let record = SessionRecord {
            sid: session.sid.clone(),
            project_id: command.project_id,
            pid,
            pgid: pid,
            start_ticks,
            port: addr.port(),
            user: run_as.name.clone(),
            uid: run_as.uid,
            gid: run_as.gid,
            token: session.token.clone(),
            started_at: session.started_at,
        };
        session.status.send_modify(|st| {
            st.spawning = false;
            st.process = Some(record.clone());
        });
        self.watch_child(session.clone(), child);

        if let Some(cgroups) = inner.cgroups.cgroups() {
            cgroups
                .add(&session.sid, pid)
                .map_err(|e| Error::Setup(format!("cannot move jupyter into its cgroup: {e}")))?;
        }
        inner.state.save(&record)?;
        tracing::info!(
            sid = session.sid,
            pid,
            port = addr.port(),
            user = run_as.name,
            "jupyter launched"
        );
        Ok(())
    }

    async fn wait_ready(&self, session: &Arc<Session>, received: Instant) -> Readiness {
        let deadline = received + self.inner.config.start_timeout;
        let addr = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), session.port());
        let mut rx = session.status.subscribe();
        loop {
            {
                let status = rx.borrow_and_update();
                if !matches!(status.phase, Phase::Starting) {
                    return Readiness::Superseded;
                }
                if let Some(code) = status.exit {
                    return Readiness::Exited(code);
                }
            }
            if jupyter::status(&self.inner.http, addr, &session.token)
                .await
                .is_some()
            {
                let spawn_ms = received.elapsed().as_millis() as u64;
                let running = session.status.send_if_modified(|st| {
                    if matches!(st.phase, Phase::Starting) && st.exit.is_none() {
                        st.phase = Phase::Running { spawn_ms };
                        true
                    } else {
                        false
                    }
                });
                if running {
                    return Readiness::Ready(spawn_ms);
                }
                continue;
            }
            if Instant::now() >= deadline {
                return Readiness::TimedOut;
            }
            tokio::select! {
                _ = rx.changed() => {}
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
    }

    /// Ends a start that did not work: kills what is left, reports `Failed`.
    async fn fail(
        &self,
        session: &Arc<Session>,
        reason: String,
        exit_code: Option<i32>,
    ) -> (AgentEvent, bool) {
        if !session.take_over(|p| matches!(p, Phase::Starting), Phase::Ending) {
            // A stop took over and reports `Stopped`.
            return (
                AgentEvent::Stopped {
                    sid: session.sid.clone(),
                },
                false,
            );
        }
        metrics::counter!("opencloud_agent_spawn_failures_total").increment(1);
        let record = self.settled_process(session).await;
        let log_tail = self.clear_leftovers(session, record.as_ref()).await;
        tracing::warn!(sid = session.sid, %reason, "session failed to start");
        let event = AgentEvent::Failed {
            sid: session.sid.clone(),
            reason,
            exit_code,
            log_tail,
        };
        self.finish(session, record.as_ref(), event.clone()).await;
        (event, true)
    }

    fn watch_child(&self, session: Arc<Session>, mut child: tokio::process::Child) {
        let supervisor = self.clone();
        let mut detached = self.inner.detached.subscribe();
        tokio::spawn(async move {
            let code = tokio::select! {
                status = child.wait() => status.ok().and_then(exit_code),
                _ = detached.wait_for(|d| *d) => return,
            };
            supervisor.exited(session, code).await;
        });
    }
}
