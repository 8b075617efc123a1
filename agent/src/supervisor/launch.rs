//! Starting a session: claiming a slot — a ready warm server's when there
//! is one (bound in `pool`), one still starting that it then waits for, or
//! a cold start's — and for a cold start, taking its turn at the start gate,
//! making its user and directories, its network namespace and cgroups,
//! launching Jupyter in its sandbox and waiting until it answers on its
//! socket. Warm servers are launched by the same code. A start that does
//! not get there ends as `Failed` (or `Stopped`, when a stop took it over
//! meanwhile); one whose warm server fails it starts cold instead.

use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opencloud_protocol::agent::{AgentEvent, StartSession};
use opencloud_protocol::routes::is_valid_sid;
use tokio::sync::watch;

use super::{describe_exit, exit_code, unix_now, Activity, Phase, Session, Status, Supervisor};
use crate::cgroups::{Limits, DEFAULT_PIDS_MAX};
use crate::error::Error;
use crate::gate::{Pass, Priority};
use crate::jupyter;
use crate::process;
use crate::sandbox::{self, NetNs, Walls};
use crate::state::{Helper, SessionRecord, WarmRecord};
use crate::users;
use crate::workdir::private_dir;

/// How long bwrap may take to make the sandbox's first process.
const SANDBOX_SETUP: Duration = Duration::from_secs(5);

pub(super) enum Readiness {
    Ready(u64),
    Exited(Option<i32>),
    TimedOut,
    /// A stop took the session over.
    Superseded,
}

/// Where a server runs and as whom, decided before it is launched.
pub(super) struct Plan {
    pub run_as: users::RunAs,
    pub home: PathBuf,
    /// Its cgroup's limits while it starts (no CPU quota: see `spawn`).
    pub limits: Limits,
}

/// What the claim of a start found.
enum Claim {
    /// A new session, cold.
    Cold(Arc<Session>),
    /// A new session bound to this warm server (taken out of the pool).
    Warm(Arc<Session>, Arc<Session>),
    /// A new session (cold until it binds) that waits for this warm server,
    /// still starting, promised to it.
    AwaitWarm(Arc<Session>, Arc<Session>),
    /// The session exists already.
    Existing(Arc<Session>),
    Full(usize),
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
        let mut warm_allowed = true;
        loop {
            let (claim, retired) = self.claim(&command, warm_allowed);
            self.publish_gauges();
            if let Some(retired) = retired {
                // Its slot is this start's: the host never runs more servers than it has slots.
                self.retire(&retired).await;
            }
            let (session, warm) = match claim {
                Claim::Full(max) => {
                    return (
                        self.refused(&sid, format!("the host is full ({max} sessions)")),
                        true,
                    )
                }
                Claim::Cold(session) => return self.launch(session, &command, received).await,
                Claim::Warm(session, warm) => (session, warm),
                Claim::AwaitWarm(waiting, warm) => {
                    match self.await_warm(&waiting, &warm, &command).await {
                        Some(bound) => (bound, warm),
                        None if starting_now(&waiting) => {
                            return self.launch(waiting, &command, received).await
                        }
                        // Stopped while it waited (the stop reports it).
                        None => return (AgentEvent::Stopped { sid }, false),
                    }
                }
                Claim::Existing(existing) => {
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
                                    spawn_ms,
                                    warm: existing.pool_slot.is_some(),
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
            };
            match self.bind(&session, &warm, &command, received).await {
                Ok(outcome) => return outcome,
                Err(reason) => {
                    metrics::counter!(super::WARM_BIND_FAILURES).increment(1);
                    tracing::warn!(
                        sid,
                        server_id = session.server_id,
                        %reason,
                        "the warm server could not take the session; starting cold"
                    );
                    if !self.abandon_bind(&session).await {
                        // A stop took the session over and reports it.
                        return (AgentEvent::Stopped { sid }, false);
                    }
                    warm_allowed = false;
                }
            }
        }
    }

    /// Takes a slot for the start: a ready warm server when there is one
    /// (and no other session of the project runs here, whose files are in
    /// use), else a cold start; with the warm server, if any, that must go
    /// to make room.
    fn claim(&self, command: &StartSession, warm_allowed: bool) -> (Claim, Option<Arc<Session>>) {
        let mut sessions = self.lock_sessions();
        if let Some(existing) = sessions.get(&command.sid) {
            return (Claim::Existing(existing.clone()), None);
        }
        let max = self.inner.config.capacity.max_sessions as usize;
        if sessions.len() >= max {
            return (Claim::Full(max), None);
        }
        let shared = sessions
            .values()
            .any(|s| s.project_id == command.project_id && !matches!(s.phase(), Phase::Gone(_)));
        let mut pool = self.lock_pool();
        let warm_allowed = warm_allowed && !shared;
        let ready = warm_allowed
            .then(|| {
                pool.values()
                    .find(|w| !w.is_promised() && take_ready(w))
                    .cloned()
            })
            .flatten();
        if let Some(warm) = ready {
            pool.remove(&warm.server_id);
            let session = bound_session(command, &warm);
            sessions.insert(command.sid.clone(), session.clone());
            return (Claim::Warm(session, warm), None);
        }
        // A warm server still starting is ready sooner than a cold start
        // begun now (and does not compete with it for the CPU).
        let starting = warm_allowed
            .then(|| {
                pool.values()
                    .find(|w| !w.is_promised() && matches!(w.phase(), Phase::Starting))
                    .cloned()
            })
            .flatten();
        if let Some(warm) = starting {
            warm.set_promised(true);
            let session = self.cold_session(command);
            sessions.insert(command.sid.clone(), session.clone());
            return (Claim::AwaitWarm(session, warm), None);
        }
        // Servers on the host never exceed its slots: a warm server that
        // is not ready yet gives its slot to this start. (A start waiting
        // for a promised one counts as that server.)
        let promised = pool.values().filter(|w| w.is_promised()).count();
        let retired = if sessions.len().saturating_sub(promised) + pool.len() >= max {
            let newest = pool
                .values()
                .filter(|w| !w.is_promised())
                .max_by_key(|w| w.started_at)
                .cloned();
            if let Some(warm) = &newest {
                pool.remove(&warm.server_id);
            }
            newest
        } else {
            None
        };
        let session = self.cold_session(command);
        sessions.insert(command.sid.clone(), session.clone());
        (Claim::Cold(session), retired)
    }

    fn cold_session(&self, command: &StartSession) -> Arc<Session> {
        Arc::new(Session::launching(
            command.sid.clone(),
            command.sid.clone(),
            command.project_id,
            self.inner.layout.project(command.project_id),
            None,
            command.memory_limit_mib,
        ))
    }

    /// Waits for the warm server promised to `session` to be ready, and
    /// takes it: the session bound to it, in `session`'s place in the map.
    /// `None` when it failed or the session was stopped meanwhile (then
    /// `session` is as it was, for a cold start or the stop).
    async fn await_warm(
        &self,
        session: &Arc<Session>,
        warm: &Arc<Session>,
        command: &StartSession,
    ) -> Option<Arc<Session>> {
        let mut warm_status = warm.status.subscribe();
        let mut own_status = session.status.subscribe();
        let waited = tokio::time::timeout(self.inner.config.start_timeout, async {
            tokio::select! {
                _ = warm_status.wait_for(|st| !matches!(st.phase, Phase::Starting)) => {}
                _ = own_status.wait_for(|st| !matches!(st.phase, Phase::Starting)) => {}
            }
        })
        .await;
        let bound = {
            let mut sessions = self.lock_sessions();
            let mut pool = self.lock_pool();
            warm.set_promised(false);
            let ours = sessions
                .get(&session.sid)
                .is_some_and(|s| Arc::ptr_eq(s, session));
            if waited.is_ok() && ours && starting_now(session) && take_ready(warm) {
                pool.remove(&warm.server_id);
                let bound = bound_session(command, warm);
                sessions.insert(session.sid.clone(), bound.clone());
                Some(bound)
            } else {
                None
            }
        };
        match &bound {
            Some(_) => {
                // Whoever waits on the placeholder looks again and finds the bound session.
                session.status.send_modify(|st| {
                    st.spawning = false;
                    st.phase = Phase::Gone(AgentEvent::Stopped {
                        sid: session.sid.clone(),
                    });
                });
            }
            None => {
                tracing::info!(
                    sid = session.sid,
                    server_id = warm.server_id,
                    "the warm server this start waited for did not become ready"
                );
                self.inner.pool_changed.notify_one();
            }
        }
        if !starting_now(session) && bound.is_none() {
            // A stop took over while it waited: it waits for this.
            session.status.send_modify(|st| st.spawning = false);
        }
        bound
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

    /// Waits at the start gate; `None` when the session was stopped meanwhile
    /// (its stop reports it).
    pub(super) async fn wait_turn(&self, session: &Session, priority: Priority) -> Option<Pass> {
        let mut status = session.status.subscribe();
        tokio::select! {
            pass = self.inner.gate.enter(priority) => Some(pass),
            _ = status.wait_for(|st| !matches!(st.phase, Phase::Starting)) => {
                session.status.send_modify(|st| st.spawning = false);
                None
            }
        }
    }

    async fn launch(
        &self,
        session: Arc<Session>,
        command: &StartSession,
        received: Instant,
    ) -> (AgentEvent, bool) {
        let sid = session.sid.clone();
        let Some(_pass) = self.wait_turn(&session, Priority::User).await else {
            return (AgentEvent::Stopped { sid }, false);
        };
        let prepared = self.prepare_cold(&session, command).await;
        let launched = match prepared {
            Ok(plan) => self.spawn(&session, &plan).await,
            Err(e) => Err(e),
        };
        if let Err(e) = launched {
            // Whatever was launched is in the status; nothing more comes.
            session.status.send_modify(|st| st.spawning = false);
            return self.fail(&session, e.to_string(), None).await;
        }
        // Counted from the launch: a big project takes long to download,
        // not to start, and a turn at the gate is no start either.
        let deadline = Instant::now() + self.inner.config.start_timeout;
        match self.wait_ready(&session, received, deadline).await {
            Readiness::Ready(spawn_ms) => {
                self.apply_limits(&session, command);
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

    /// The session's limits on its cgroup from now on (the user's code
    /// runs only once the server is ready).
    pub(super) fn apply_limits(&self, session: &Session, command: &StartSession) {
        if let Some(cgroups) = self.inner.cgroups.cgroups() {
            if let Err(e) = cgroups.create(&session.server_id, &session_limits(command)) {
                tracing::error!(sid = session.sid, "cannot apply the session's limits: {e}");
            }
        }
    }

    /// The project's user and directories, with its files restored.
    async fn prepare_cold(&self, session: &Session, command: &StartSession) -> Result<Plan, Error> {
        let run_as = self.project_user(command.project_id).await?;
        let home = self.inner.layout.home(&run_as.name);
        private_dir(&home, &run_as)?;
        private_dir(&session.files, &run_as)?;
        self.restore_project(session, &run_as).await;
        Ok(Plan {
            run_as,
            home,
            limits: session_limits(command),
        })
    }

    /// Who a project's sessions run as (made when missing).
    pub(super) async fn project_user(&self, project_id: u64) -> Result<users::RunAs, Error> {
        if !self.inner.root {
            return Ok(users::current());
        }
        let name = users::project_user(project_id);
        let _serialised = self.inner.users.lock().await;
        users::ensure_user(&name, &self.inner.layout.home(&name)).await
    }

    /// Makes the server's session directory, log, cgroup and network, and
    /// launches it in its sandbox. The process is published in the
    /// session's status as soon as it exists.
    pub(super) async fn spawn(&self, session: &Arc<Session>, plan: &Plan) -> Result<(), Error> {
        let inner = &self.inner;
        let layout = &inner.layout;
        let run_as = &plan.run_as;
        let server_id = &session.server_id;
        let session_dir = layout.session_dir(server_id);
        private_dir(&session_dir, run_as)?;
        let socket = layout.socket(server_id);
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

        let log_path = layout.log(server_id);
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
                ..plan.limits
            };
            cgroups
                .create(server_id, &limits)
                .map_err(|e| Error::Setup(format!("cannot create the session's cgroup: {e}")))?;
            cgroup_procs = cgroups.procs_files(server_id);
        }

        // Root makes the network namespace (and its slirp); an agent that
        // is not root has bwrap make an empty one.
        let (netns, slirp) = if inner.root {
            let netns = NetNs::for_session(server_id);
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
            .spawn_sandbox(session, plan, log, netns.as_ref(), slirp, &cgroup_procs)
            .await;
        if launched.is_err() {
            if let Some(slirp) = slirp {
                process::stop_helper(slirp.pid, slirp.start_ticks, LEFTOVER_HELPER).await;
            }
            if let Some(netns) = netns {
                netns.remove().await;
            }
        }
        launched
    }

    /// Spawns bwrap with Jupyter in it; publishes the process at once.
    async fn spawn_sandbox(
        &self,
        session: &Arc<Session>,
        plan: &Plan,
        log: std::fs::File,
        netns: Option<&NetNs>,
        slirp: Option<Helper>,
        cgroup_procs: &[std::path::PathBuf],
    ) -> Result<(), Error> {
        let inner = &self.inner;
        let layout = &inner.layout;
        let run_as = &plan.run_as;
        let home = &plan.home;
        let project_dir = &session.files;
        let session_dir = layout.session_dir(&session.server_id);
        let socket = layout.socket(&session.server_id);
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
            writable: &[project_dir, home],
            session_dir: &session_dir,
            read_only: &read_only,
            chdir: project_dir,
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
        let log_path = layout.log(&session.server_id);
        let jupyter = jupyter::command(
            jupyter::Launch {
                venv: &inner.config.venv,
                socket: &socket,
                project_dir,
                home,
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
            sid: session.server_id.clone(),
            project_id: session.project_id,
            pid,
            pgid: pid,
            start_ticks,
            pidns,
            slirp,
            user: run_as.name.clone(),
            uid: run_as.uid,
            gid: run_as.gid,
            started_at: session.started_at,
            warm: session.pool_slot.map(|slot| WarmRecord {
                slot,
                session: None,
            }),
        };
        session.status.send_modify(|st| {
            st.spawning = false;
            st.process = Some(record.clone());
        });
        self.watch_child(session.server_id.clone(), child);
        inner.state.save(&record)?;
        tracing::info!(
            server_id = session.server_id,
            pid,
            pidns,
            user = run_as.name,
            "jupyter launched in its sandbox"
        );
        Ok(())
    }

    /// Waits until the server answers on its socket (`spawn_ms` counted
    /// from `received`), exits, is stopped, or `deadline` passes.
    pub(super) async fn wait_ready(
        &self,
        session: &Arc<Session>,
        received: Instant,
        deadline: Instant,
    ) -> Readiness {
        let socket = self.inner.layout.socket(&session.server_id);
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
    pub(super) async fn fail(
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

    /// Reports the server's exit to whoever holds it then: the pool, or
    /// the session a start bound it to.
    fn watch_child(&self, server_id: String, mut child: tokio::process::Child) {
        let supervisor = self.clone();
        let mut detached = self.inner.detached.subscribe();
        tokio::spawn(async move {
            let code = tokio::select! {
                status = child.wait() => status.ok().and_then(exit_code),
                _ = detached.wait_for(|d| *d) => return,
            };
            if let Some(holder) = supervisor.holder_of(&server_id) {
                supervisor.exited(holder, code).await;
            }
        });
    }
}

fn starting_now(session: &Session) -> bool {
    matches!(session.phase(), Phase::Starting)
}

/// Takes a ready warm server out of the running pool, atomically: its own
/// exit watch lets go of it. False when it is not ready (or gone).
fn take_ready(warm: &Session) -> bool {
    warm.take_over(
        |p| matches!(p, Phase::Running { .. }),
        Phase::Gone(AgentEvent::Stopped {
            sid: warm.sid.clone(),
        }),
    )
}

/// A new session for `command`, on the ready warm server `warm`.
fn bound_session(command: &StartSession, warm: &Session) -> Arc<Session> {
    Arc::new(Session {
        sid: command.sid.clone(),
        server_id: warm.server_id.clone(),
        project_id: command.project_id,
        files: warm.files.clone(),
        pool_slot: warm.pool_slot,
        started_at: unix_now(),
        memory_limit_mib: command.memory_limit_mib,
        status: watch::channel(Status {
            phase: Phase::Starting,
            // Until the project's files are in: a stop waits for them.
            spawning: true,
            process: warm.status.borrow().process.clone(),
            exit: None,
        })
        .0,
        activity: Mutex::new(Activity::default()),
        promised: Default::default(),
    })
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
pub(super) fn session_limits(command: &StartSession) -> Limits {
    Limits {
        memory_mib: command.memory_limit_mib,
        cpu_cores: command.cpu_limit_cores,
        pids: DEFAULT_PIDS_MAX,
    }
}
