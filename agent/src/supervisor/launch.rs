//! Starting a session: claiming a slot, making its user and directories,
//! its network namespace and cgroups, launching Jupyter in its sandbox and
//! waiting until it answers on its socket. A start
//! that does not get there ends as `Failed` (or `Stopped`, when a stop took
//! it over meanwhile).

use std::os::unix::fs::OpenOptionsExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opencloud_protocol::agent::{AgentEvent, StartSession};
use opencloud_protocol::routes::is_valid_sid;
use tokio::sync::watch;

use super::{describe_exit, exit_code, unix_now, Activity, Phase, Session, Status, Supervisor};
use crate::cgroups::{Limits, DEFAULT_PIDS_MAX};
use crate::error::Error;
use crate::jupyter;
use crate::process;
use crate::sandbox::{self, NetNs, Walls};
use crate::state::{Helper, SessionRecord};
use crate::users;
use crate::workdir::private_dir;

/// How long bwrap may take to make the sandbox's first process.
const SANDBOX_SETUP: Duration = Duration::from_secs(5);

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
                    let session = Arc::new(Session {
                        sid: sid.clone(),
                        project_id: command.project_id,
                        started_at: unix_now(),
                        memory_limit_mib: command.memory_limit_mib,
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
                            return (
                                AgentEvent::Ready {
                                    sid,
                                    // No ports any more: the host link reaches the socket.
                                    spawn_ms,
                                    warm: false,
                                },
                                true,
                            );
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
        metrics::counter!(super::SPAWN_FAILURES).increment(1);
        tracing::warn!(sid, %reason, "session not started");
        AgentEvent::Failed {
            sid: sid.to_owned(),
            reason,
            exit_code: None,
            log_tail: String::new(),
        }
    }

    async fn launch(
        &self,
        session: Arc<Session>,
        command: &StartSession,
        received: Instant,
    ) -> (AgentEvent, bool) {
        let sid = session.sid.clone();
        let restoring = match self.spawn(&session, command).await {
            Ok(restoring) => restoring,
            Err(e) => {
                // Whatever was launched is in the status; nothing more comes.
                session.status.send_modify(|st| st.spawning = false);
                return self.fail(&session, e.to_string(), None).await;
            }
        };
        match self.wait_ready(&session, received, restoring).await {
            Readiness::Ready(spawn_ms) => {
                if let Some(cgroups) = self.inner.cgroups.cgroups() {
                    // The CPU share from now on (the user's code runs only
                    // once the server is ready).
                    if let Err(e) = cgroups.create(&sid, &session_limits(command)) {
                        tracing::error!(sid, "cannot apply the session's CPU share: {e}");
                    }
                }
                metrics::histogram!("opencloud_agent_spawn_seconds")
                    .record(spawn_ms as f64 / 1000.0);
                self.publish_gauges();
                self.watch_memory(session.clone());
                self.autosave(session.clone());
                tracing::info!(sid, spawn_ms, "session ready");
                (
                    AgentEvent::Ready {
                        sid,
                        spawn_ms,
                        warm: false,
                    },
                    true,
                )
            }
            Readiness::Superseded => (AgentEvent::Stopped { sid }, false),
            Readiness::TimedOut => {
                let limit = self.inner.config.start_timeout.as_secs();
                self.fail(
                    &session,
                    format!("jupyter did not answer /api/status within {limit} s"),
                    None,
                )
                .await
            }
            Readiness::Exited(code) => {
                let reason = format!("jupyter {} before it was ready", describe_exit(code));
                self.fail(&session, reason, code).await
            }
        }
    }

    /// Makes the user and directories, restores the project's files and
    /// launches the server; returns how long the restore took. The process
    /// is published in the session's status as soon as it exists.
    async fn spawn(
        &self,
        session: &Arc<Session>,
        command: &StartSession,
    ) -> Result<Duration, Error> {
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
        let restoring = Instant::now();
        self.restore_project(session, &run_as).await;
        let restoring = restoring.elapsed();

        let session_dir = layout.session_dir(&session.sid);
        private_dir(&session_dir, &run_as)?;
        let socket = layout.socket(&session.sid);
        if socket.as_os_str().len() > jupyter::SOCKET_PATH_MAX {
            return Err(Error::Setup(format!(
                "{} is longer than a Unix socket path may be ({} bytes); use a shorter work_dir",
                socket.display(),
                jupyter::SOCKET_PATH_MAX
            )));
        }
        match std::fs::remove_file(&socket) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(Error::io(&socket, e))
            }
            _ => {}
        }

        let log_path = layout.log(&session.sid);
        let log = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&log_path)
            .map_err(|e| Error::io(&log_path, e))?;

        let mut cgroup_procs: Vec<std::path::PathBuf> = Vec::new();
        if let Some(cgroups) = inner.cgroups.cgroups() {
            // Jupyter starts on whatever CPU is idle (a hard 0.5-core quota
            // nearly doubled open-to-ready); its share applies once ready.
            let limits = Limits {
                cpu_cores: 0.0,
                ..session_limits(command)
            };
            cgroups
                .create(&session.sid, &limits)
                .map_err(|e| Error::Setup(format!("cannot create the session's cgroup: {e}")))?;
            cgroup_procs = cgroups.procs_files(&session.sid);
        }

        // Root makes the network namespace (and its slirp); an agent that
        // is not root has bwrap make an empty one.
        let (netns, slirp) = if inner.root {
            let netns = NetNs::for_session(&session.sid);
            let log = log.try_clone().map_err(|e| Error::io(&log_path, e))?;
            let slirp = netns
                .create(inner.config.egress, &inner.host_addresses, log)
                .await
                .map_err(|e| Error::Setup(format!("cannot set up the session's network: {e}")))?;
            let slirp = slirp.map(|pid| Helper {
                pid: pid as i32,
                start_ticks: process::proc_info(pid as i32)
                    .map(|p| p.start_ticks)
                    .unwrap_or(0),
            });
            (Some(netns), slirp)
        } else {
            (None, None)
        };
        let launched = self
            .spawn_sandbox(
                session,
                command,
                &run_as,
                log,
                netns.as_ref(),
                slirp,
                &cgroup_procs,
            )
            .await;
        if launched.is_err() {
            if let Some(slirp) = slirp {
                process::stop_helper(slirp.pid, slirp.start_ticks, LEFTOVER_HELPER).await;
            }
            if let Some(netns) = netns {
                netns.remove().await;
            }
        }
        launched.map(|()| restoring)
    }

    /// Spawns bwrap with Jupyter in it; publishes the process at once.
    #[allow(clippy::too_many_arguments)]
    async fn spawn_sandbox(
        &self,
        session: &Arc<Session>,
        command: &StartSession,
        run_as: &users::RunAs,
        log: std::fs::File,
        netns: Option<&NetNs>,
        slirp: Option<Helper>,
        cgroup_procs: &[std::path::PathBuf],
    ) -> Result<(), Error> {
        let inner = &self.inner;
        let layout = &inner.layout;
        let home = layout.home(&run_as.name);
        let project_dir = layout.project(command.project_id);
        let session_dir = layout.session_dir(&session.sid);
        let socket = layout.socket(&session.sid);
        let config_file = layout.server_config();
        let data_dir = layout.jupyter_data();
        // The venv is bound back wherever it is: under `/tmp` or the work
        // dir it would otherwise be hidden, and every start would fail.
        let read_only = [
            config_file.as_path(),
            data_dir.as_path(),
            inner.config.venv.as_path(),
        ];
        let args = sandbox::bwrap_args(&Walls {
            work_dir: &layout.work_dir,
            writable: &[&project_dir, &home],
            session_dir: &session_dir,
            read_only: &read_only,
            chdir: &project_dir,
            unshare_net: netns.is_none(),
        });
        let mut prefix = match netns {
            // Root: join cgroups and network, drop to the user, then bwrap.
            Some(netns) => {
                sandbox::entry_command(cgroup_procs, &netns.path(), run_as.uid, run_as.gid)
            }
            None => Vec::new(),
        };
        prefix.push(inner.bwrap.clone().into());
        prefix.extend(args);
        let log_path = layout.log(&session.sid);
        let jupyter = jupyter::command(
            jupyter::Launch {
                venv: &inner.config.venv,
                socket: &socket,
                project_dir: &project_dir,
                home: &home,
                config_file: &config_file,
                data_dir: &data_dir,
                log,
            },
            prefix,
        )
        .map_err(|e| Error::io(&log_path, e))?;
        if !matches!(session.phase(), Phase::Starting) {
            // Stopped while the user and directories were being made.
            session.status.send_modify(|st| st.spawning = false);
            return Err(Error::Setup("stopped before it was launched".into()));
        }
        let mut jupyter = jupyter;
        let mut child = jupyter
            .spawn()
            .map_err(|e| Error::Setup(format!("cannot start the sandbox: {e}")))?;
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
        let pidns = sandbox_namespace(pid).await;
        let record = SessionRecord {
            sid: session.sid.clone(),
            project_id: command.project_id,
            pid,
            pgid: pid,
            start_ticks,
            pidns,
            slirp,
            user: run_as.name.clone(),
            uid: run_as.uid,
            gid: run_as.gid,
            started_at: session.started_at,
        };
        session.status.send_modify(|st| {
            st.spawning = false;
            st.process = Some(record.clone());
        });
        self.watch_child(session.clone(), child);
        inner.state.save(&record)?;
        tracing::info!(
            sid = session.sid,
            pid,
            pidns,
            user = run_as.name,
            "jupyter launched in its sandbox"
        );
        Ok(())
    }

    /// `restoring` does not count against the start timeout: a big
    /// project takes long to download, not to start.
    async fn wait_ready(
        &self,
        session: &Arc<Session>,
        received: Instant,
        restoring: Duration,
    ) -> Readiness {
        let deadline = received + restoring + self.inner.config.start_timeout;
        let socket = self.inner.layout.socket(&session.sid);
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
            if jupyter::status(&socket).await.is_some() {
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
        metrics::counter!(super::SPAWN_FAILURES).increment(1);
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

/// Grace for a helper left by a start that failed.
const LEFTOVER_HELPER: Duration = Duration::from_secs(1);

/// The PID namespace bwrap made under `outer`: its first child lives in
/// it. 0 when bwrap died first.
async fn sandbox_namespace(outer: i32) -> u64 {
    let deadline = Instant::now() + SANDBOX_SETUP;
    let own = process::pid_namespace(outer);
    loop {
        if let Some(child) = process::child_of(outer) {
            match process::pid_namespace(child.pid) {
                Some(ns) if Some(ns) != own => return ns,
                _ => {}
            }
        }
        let outer_alive = process::proc_info(outer).is_some_and(|p| p.is_alive());
        if !outer_alive || Instant::now() >= deadline {
            return 0;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The limits the user's package gives a session.
fn session_limits(command: &StartSession) -> Limits {
    Limits {
        memory_mib: command.memory_limit_mib,
        cpu_cores: command.cpu_limit_cores,
        pids: DEFAULT_PIDS_MAX,
    }
}
