//! Starts, watches and stops the Jupyter servers of one host.
//!
//! Every session moves through phases kept in one `watch` channel, so each
//! change is atomic and anyone waiting sees it:
//!
//! ```text
//!  Starting ──ready──► Running ──exits by itself──► Ending ──► Gone(Exited)
//!     │  └─exits / times out──► Ending ──► Gone(Failed)
//!     └──────────────┴──stop──► Stopping ──► Gone(Stopped)
//! ```
//!
//! Whoever moves a session out of `Starting`/`Running` owns its teardown
//! (kill what is left, free the port, drop the cgroup and state file, report
//! one event); everyone else waits for `Gone`. The session map and each
//! session's status are behind std locks held only for a few instructions,
//! never across an `.await`.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use opencloud_protocol::agent::{AgentEvent, AgentSession, AgentSessionState, StartSession};
use opencloud_protocol::routes::is_valid_sid;
use tokio::sync::{mpsc, watch};

use crate::cgroups::{self, Support};
use crate::config::Config;
use crate::jupyter::{self, Layout};
use crate::process;
use crate::state::{SessionRecord, StateDir};
use crate::users::{self, RunAs};
use crate::Error;

/// Log lines sent with a failure or an exit.
const LOG_TAIL_LINES: usize = 20;
/// How long a stopped server's port may take to become free again.
const PORT_RELEASE: Duration = Duration::from_secs(10);
/// Launch attempts when the chosen port is taken between check and bind.
const LAUNCH_ATTEMPTS: u32 = 3;
/// Logs of ended sessions are kept this long, for the owner to read.
const LOG_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
/// Grace given to what is left of a server that exited or failed.
const LEFTOVER_GRACE: Duration = Duration::from_secs(2);

/// Starts, watches and stops sessions; cheap to clone.
#[derive(Clone)]
pub struct Supervisor {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    layout: Layout,
    state: StateDir,
    cgroups: Support,
    root: bool,
    http: reqwest::Client,
    events: mpsc::UnboundedSender<AgentEvent>,
    sessions: Mutex<HashMap<String, Arc<Session>>>,
    next_port: Mutex<u16>,
    /// Serialises `useradd`.
    users: tokio::sync::Mutex<()>,
    /// Set by [`Supervisor::detach`]: watchers stop, servers keep running.
    detached: watch::Sender<bool>,
    /// `work_dir/agent.lock`, held while this supervisor owns the work dir.
    lock: Mutex<Option<std::fs::File>>,
}

struct Session {
    sid: String,
    project_id: u64,
    token: String,
    started_at: u64,
    port: AtomicU16,
    status: watch::Sender<Status>,
    activity: Mutex<Activity>,
}

#[derive(Clone)]
struct Status {
    phase: Phase,
    /// Set while the user, directories and process are being made.
    spawning: bool,
    process: Option<SessionRecord>,
    /// Set once the server has exited: its exit code (128 + n for signal n).
    exit: Option<Option<i32>>,
}

#[derive(Clone)]
enum Phase {
    Starting,
    Running { spawn_ms: u64 },
    Stopping,
    Ending,
    Gone(AgentEvent),
}

#[derive(Clone, Copy, Default)]
struct Activity {
    last_activity: Option<u64>,
    busy_kernels: u32,
}

enum Readiness {
    Ready(u64),
    Exited(Option<i32>),
    TimedOut,
    /// A stop took the session over.
    Superseded,
}

impl Session {
    fn port(&self) -> u16 {
        self.port.load(Ordering::Relaxed)
    }

    fn phase(&self) -> Phase {
        self.status.borrow().phase.clone()
    }

    /// Moves `from` phases to `to`; true when this call made the move.
    fn take_over(&self, from: impl Fn(&Phase) -> bool, to: Phase) -> bool {
        self.status.send_if_modified(|st| {
            if from(&st.phase) {
                st.phase = to.clone();
                true
            } else {
                false
            }
        })
    }

    async fn gone(&self) -> AgentEvent {
        let mut rx = self.status.subscribe();
        let status = rx
            .wait_for(|st| matches!(st.phase, Phase::Gone(_)))
            .await
            .map(|st| st.clone());
        match status {
            Ok(Status {
                phase: Phase::Gone(event),
                ..
            }) => event,
            _ => AgentEvent::Stopped {
                sid: self.sid.clone(),
            },
        }
    }
}

fn starting_or_running(phase: &Phase) -> bool {
    matches!(phase, Phase::Starting | Phase::Running { .. })
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn exit_code(status: std::process::ExitStatus) -> Option<i32> {
    status.code().or_else(|| status.signal().map(|s| 128 + s))
}

fn describe_exit(code: Option<i32>) -> String {
    match code {
        Some(code) if code > 128 => format!("was killed by signal {}", code - 128),
        Some(code) => format!("exited with code {code}"),
        None => "exited".into(),
    }
}

impl Supervisor {
    /// Prepares the work dir and takes over what an earlier agent left in
    /// it: servers that are alive and answer with their stored token are
    /// kept (and reported by [`Supervisor::sessions`]); the rest are killed
    /// and cleaned up. Events go to the returned receiver.
    pub async fn open(
        config: Config,
    ) -> Result<(Self, mpsc::UnboundedReceiver<AgentEvent>), Error> {
        let cgroups = cgroups::detect();
        Self::open_with(config, cgroups).await
    }

    /// [`Supervisor::open`] with a given cgroup decision.
    pub async fn open_with(
        config: Config,
        cgroups: Support,
    ) -> Result<(Self, mpsc::UnboundedReceiver<AgentEvent>), Error> {
        let root = users::running_as_root();
        let layout = Layout {
            work_dir: config.work_dir.clone(),
        };
        prepare_work_dir(&layout, root)?;
        let lock = lock_work_dir(&layout.work_dir)?;
        if root {
            for path in [&config.work_dir, &config.venv] {
                ensure_reachable(path)?;
            }
        }
        let state = StateDir::open(layout.sessions())?;
        let (events, receiver) = mpsc::unbounded_channel();
        let (detached, _) = watch::channel(false);
        let supervisor = Self {
            inner: Arc::new(Inner {
                next_port: Mutex::new(config.port_range.0),
                config,
                layout,
                state,
                cgroups,
                root,
                http: jupyter::http_client(),
                events,
                sessions: Mutex::new(HashMap::new()),
                users: tokio::sync::Mutex::new(()),
                detached,
                lock: Mutex::new(Some(lock)),
            }),
        };
        supervisor.adopt_leftovers().await;
        Ok((supervisor, receiver))
    }

    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// Whether sessions get cgroup v2 memory and CPU limits.
    pub fn cgroup_limits(&self) -> bool {
        self.inner.cgroups.cgroups().is_some()
    }

    /// Why sessions get no limits, when they do not.
    pub fn cgroup_unavailable_reason(&self) -> Option<&str> {
        match &self.inner.cgroups {
            Support::Available(_) => None,
            Support::Unavailable(reason) => Some(reason),
        }
    }

    fn emit(&self, event: AgentEvent) {
        let _ = self.inner.events.send(event);
    }

    fn lookup(&self, sid: &str) -> Option<Arc<Session>> {
        self.lock_sessions().get(sid).cloned()
    }

    fn lock_sessions(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Session>>> {
        // A panic while holding the lock leaves the map itself consistent.
        self.inner
            .sessions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

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
                        let (first, last) = self.inner.config.port_range;
                        return (
                            self.refused(&sid, format!("no free port in {first}–{last}")),
                            true,
                        );
                    };
                    let session = Arc::new(Session {
                        sid: sid.clone(),
                        project_id: command.project_id,
                        token: command.upstream_token.clone(),
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
                            return (
                                AgentEvent::Ready {
                                    sid,
                                    port: existing.port(),
                                    spawn_ms,
                                },
                                true,
                            )
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

    /// A port in the range that no session of ours holds and nothing listens on.
    fn pick_port(&self, sessions: &HashMap<String, Arc<Session>>) -> Option<u16> {
        let taken: HashSet<u16> = sessions.values().map(|s| s.port()).collect();
        let (first, last) = self.inner.config.port_range;
        let count = u32::from(last - first) + 1;
        let mut next = self
            .inner
            .next_port
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // Round-robin, so a port just released is not the first one reused.
        let offset = u32::from(next.saturating_sub(first)) % count;
        for i in 0..count {
            let port = first + ((offset + i) % count) as u16;
            if !taken.contains(&port) && process::port_is_free(self.inner.config.address, port) {
                *next = if port == last { first } else { port + 1 };
                return Some(port);
            }
        }
        None
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
                    return (
                        AgentEvent::Ready {
                            sid,
                            port: session.port(),
                            spawn_ms,
                        },
                        true,
                    );
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
                    let tail = jupyter::log_tail(
                        &self.inner.layout.log(&sid),
                        LOG_TAIL_LINES,
                        &session.token,
                    );
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

        let addr = SocketAddr::new(inner.config.address, session.port());
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
        let addr = SocketAddr::new(self.inner.config.address, session.port());
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
        if let Some(record) = &record {
            process::terminate(&record.scope(), LEFTOVER_GRACE).await;
        }
        let log_tail = jupyter::log_tail(
            &self.inner.layout.log(&session.sid),
            LOG_TAIL_LINES,
            &session.token,
        );
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

    /// The session's process once spawning is over (`None`: never launched).
    async fn settled_process(&self, session: &Session) -> Option<SessionRecord> {
        let mut rx = session.status.subscribe();
        let status = rx.wait_for(|st| !st.spawning).await.map(|st| st.clone());
        status.ok().and_then(|st| st.process)
    }

    /// Last step of every ending: port free, cgroup and state gone, removed
    /// from the map, waiters told.
    async fn finish(
        &self,
        session: &Arc<Session>,
        record: Option<&SessionRecord>,
        event: AgentEvent,
    ) {
        if let Some(record) = record {
            if !process::wait_port_free(self.inner.config.address, record.port, PORT_RELEASE).await
            {
                tracing::warn!(
                    sid = session.sid,
                    port = record.port,
                    "port still busy after the session ended"
                );
            }
        }
        if let Some(cgroups) = self.inner.cgroups.cgroups() {
            cgroups.remove(&session.sid).await;
        }
        self.inner.state.remove(&session.sid);
        {
            let mut sessions = self.lock_sessions();
            if sessions
                .get(&session.sid)
                .is_some_and(|s| Arc::ptr_eq(s, session))
            {
                sessions.remove(&session.sid);
            }
        }
        session
            .status
            .send_modify(|st| st.phase = Phase::Gone(event));
        self.publish_gauges();
    }

    /// Stops a session: SIGTERM to its processes, SIGKILL after `grace`,
    /// waits for its port, and reports `Stopped`. Unknown sessions are
    /// reported stopped at once.
    pub async fn stop(&self, sid: &str, grace: Duration) -> AgentEvent {
        let event = AgentEvent::Stopped {
            sid: sid.to_owned(),
        };
        if let Some(session) = self.lookup(sid) {
            if session.take_over(starting_or_running, Phase::Stopping) {
                self.publish_gauges();
                let record = self.settled_process(&session).await;
                if let Some(record) = &record {
                    tracing::info!(sid, pid = record.pid, "stopping session");
                    if !process::terminate(&record.scope(), grace).await {
                        tracing::error!(sid, "processes of the session survived SIGKILL");
                    }
                }
                self.finish(&session, record.as_ref(), event.clone()).await;
                tracing::info!(sid, "session stopped");
            } else {
                // Already ending: wait for that to finish.
                session.gone().await;
            }
        }
        self.emit(event.clone());
        event
    }

    /// Stops every session, `grace` each, all at once.
    pub async fn stop_all(&self, grace: Duration) {
        let sids: Vec<String> = self.lock_sessions().keys().cloned().collect();
        let mut stops = tokio::task::JoinSet::new();
        for sid in sids {
            let supervisor = self.clone();
            stops.spawn(async move { supervisor.stop(&sid, grace).await });
        }
        while stops.join_next().await.is_some() {}
    }

    /// The sessions as control sees them in hellos and heartbeats.
    pub fn sessions(&self) -> Vec<AgentSession> {
        let sessions: Vec<Arc<Session>> = self.lock_sessions().values().cloned().collect();
        let mut list: Vec<AgentSession> = sessions
            .iter()
            .filter_map(|s| {
                let state = match s.phase() {
                    Phase::Starting => AgentSessionState::Starting,
                    Phase::Running { .. } => AgentSessionState::Running,
                    Phase::Stopping | Phase::Ending => AgentSessionState::Stopping,
                    Phase::Gone(_) => return None,
                };
                let activity = *s
                    .activity
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                Some(AgentSession {
                    sid: s.sid.clone(),
                    port: s.port(),
                    state,
                    started_at: s.started_at,
                    last_activity: activity.last_activity,
                    busy_kernels: activity.busy_kernels,
                })
            })
            .collect();
        list.sort_by(|a, b| a.sid.cmp(&b.sid));
        list
    }

    /// The project a session serves, while it exists.
    pub fn project_of(&self, sid: &str) -> Option<u64> {
        self.lookup(sid).map(|s| s.project_id)
    }

    /// The server process of a session, once launched (for tests and logs).
    pub fn pid_of(&self, sid: &str) -> Option<i32> {
        self.lookup(sid)
            .and_then(|s| s.status.borrow().process.as_ref().map(|p| p.pid))
    }

    /// Asks every running server for its last activity and busy kernels.
    pub async fn refresh_activity(&self) {
        let running: Vec<Arc<Session>> = self
            .lock_sessions()
            .values()
            .filter(|s| matches!(s.phase(), Phase::Running { .. }))
            .cloned()
            .collect();
        let mut probes = tokio::task::JoinSet::new();
        for session in running {
            let http = self.inner.http.clone();
            let addr = SocketAddr::new(self.inner.config.address, session.port());
            probes.spawn(async move {
                let (status, busy) = tokio::join!(
                    jupyter::status(&http, addr, &session.token),
                    jupyter::busy_kernels(&http, addr, &session.token)
                );
                let mut activity = session
                    .activity
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                if let Some(last) = status {
                    activity.last_activity = last.or(activity.last_activity);
                }
                if let Some(busy) = busy {
                    activity.busy_kernels = busy;
                }
            });
        }
        while probes.join_next().await.is_some() {}
    }

    /// Stops watching without touching the servers: they keep running and
    /// the next supervisor over the same work dir adopts them.
    pub fn detach(self) {
        self.inner.detached.send_replace(true);
        // Closing the file releases the lock for the next supervisor.
        self.inner
            .lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
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

    async fn exited(&self, session: Arc<Session>, code: Option<i32>) {
        session.status.send_modify(|st| st.exit = Some(code));
        if !session.take_over(|p| matches!(p, Phase::Running { .. }), Phase::Ending) {
            // Starting: the start reports it; stopping: expected.
            return;
        }
        self.publish_gauges();
        let record = session.status.borrow().process.clone();
        if let Some(record) = &record {
            // Kernels outlive a killed server.
            process::terminate(&record.scope(), LEFTOVER_GRACE).await;
        }
        let log_tail = jupyter::log_tail(
            &self.inner.layout.log(&session.sid),
            LOG_TAIL_LINES,
            &session.token,
        );
        tracing::warn!(
            sid = session.sid,
            exit = describe_exit(code),
            "jupyter exited by itself"
        );
        metrics::counter!("opencloud_agent_exits_total").increment(1);
        let event = AgentEvent::Exited {
            sid: session.sid.clone(),
            exit_code: code,
            log_tail,
        };
        self.finish(&session, record.as_ref(), event.clone()).await;
        self.emit(event);
    }

    async fn adopt_leftovers(&self) {
        let records = self.inner.state.load_all();
        let mut kept = HashSet::new();
        for record in records {
            let sid = record.sid.clone();
            if is_valid_sid(&sid) && self.answers(&record).await {
                tracing::info!(
                    sid,
                    pid = record.pid,
                    port = record.port,
                    "adopted a running server"
                );
                let session = Arc::new(Session {
                    sid: sid.clone(),
                    project_id: record.project_id,
                    token: record.token.clone(),
                    started_at: record.started_at,
                    port: AtomicU16::new(record.port),
                    status: watch::channel(Status {
                        phase: Phase::Running { spawn_ms: 0 },
                        spawning: false,
                        process: Some(record.clone()),
                        exit: None,
                    })
                    .0,
                    activity: Mutex::new(Activity::default()),
                });
                self.lock_sessions().insert(sid.clone(), session.clone());
                self.watch_adopted(session, record);
                kept.insert(sid);
            } else {
                tracing::info!(sid, pid = record.pid, "cleaning up a server left behind");
                if !process::terminate(&record.scope(), LEFTOVER_GRACE).await {
                    tracing::error!(sid, "processes left behind survived SIGKILL");
                }
                process::wait_port_free(self.inner.config.address, record.port, PORT_RELEASE).await;
                if let Some(cgroups) = self.inner.cgroups.cgroups() {
                    cgroups.remove(&sid).await;
                }
                self.inner.state.remove(&sid);
            }
        }
        if let Some(cgroups) = self.inner.cgroups.cgroups() {
            for sid in cgroups.existing() {
                if !kept.contains(&sid) {
                    cgroups.remove(&sid).await;
                }
            }
        }
        self.publish_gauges();
    }

    /// Whether a recorded server is the one we started and answers with its token.
    async fn answers(&self, record: &SessionRecord) -> bool {
        let ours = process::proc_info(record.pid).is_some_and(|p| {
            p.is_alive() && p.start_ticks == record.start_ticks && p.uid == record.uid
        });
        if !ours {
            return false;
        }
        let addr = SocketAddr::new(self.inner.config.address, record.port);
        for attempt in 0..3 {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            if jupyter::status(&self.inner.http, addr, &record.token)
                .await
                .is_some()
            {
                return true;
            }
        }
        false
    }

    fn publish_gauges(&self) {
        let (mut starting, mut running, mut stopping) = (0u32, 0u32, 0u32);
        for session in self.lock_sessions().values() {
            match session.phase() {
                Phase::Starting => starting += 1,
                Phase::Running { .. } => running += 1,
                Phase::Stopping | Phase::Ending => stopping += 1,
                Phase::Gone(_) => {}
            }
        }
        for (state, count) in [
            ("starting", starting),
            ("running", running),
            ("stopping", stopping),
        ] {
            metrics::gauge!("opencloud_agent_sessions", "state" => state).set(f64::from(count));
        }
    }
}

/// `work_dir` with its parts: project and home directories reachable (not
/// listable) by session users, logs and state for the agent only, and the
/// Jupyter config every server loads.
fn prepare_work_dir(layout: &Layout, root: bool) -> Result<(), Error> {
    let dirs = [
        (layout.work_dir.clone(), 0o711),
        (layout.projects(), 0o711),
        (layout.homes(), 0o711),
        (layout.logs(), 0o700),
    ];
    for (dir, mode) in dirs {
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        if root || dir != layout.work_dir {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode))
                .map_err(|e| Error::io(&dir, e))?;
        }
    }
    remove_old_logs(layout);
    let config = layout.server_config();
    std::fs::write(&config, jupyter::SERVER_CONFIG).map_err(|e| Error::io(&config, e))?;
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644))
        .map_err(|e| Error::io(&config, e))
}

/// Logs of sessions that ended long ago (never of one still recorded:
/// an idle server may not write for days).
fn remove_old_logs(layout: &Layout) {
    let Ok(entries) = std::fs::read_dir(layout.logs()) else {
        return;
    };
    for entry in entries.filter_map(|e| e.ok()) {
        let path = entry.path();
        let sid = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
        if layout.sessions().join(format!("{sid}.json")).exists() {
            continue;
        }
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|modified| modified.elapsed().ok())
            .is_some_and(|age| age > LOG_RETENTION);
        if old {
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// One agent per work dir: two would adopt and kill each other's servers.
fn lock_work_dir(work_dir: &Path) -> Result<std::fs::File, Error> {
    let path = work_dir.join("agent.lock");
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(|e| Error::io(&path, e))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            return Err(Error::Setup(format!(
                "another agent (pid {}) is using {}; stop it first",
                holder.trim(),
                work_dir.display()
            )));
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(&path, e)),
    }
    use std::io::Write;
    file.set_len(0).map_err(|e| Error::io(&path, e))?;
    write!(file, "{}", std::process::id()).map_err(|e| Error::io(&path, e))?;
    Ok(file)
}

/// Session users must be able to walk down to their project and the venv.
fn ensure_reachable(path: &Path) -> Result<(), Error> {
    for dir in path.ancestors() {
        let Ok(meta) = std::fs::metadata(dir) else {
            continue;
        };
        if meta.is_dir() && meta.permissions().mode() & 0o001 == 0 {
            return Err(Error::Setup(format!(
                "{} (mode {:o}) cannot be entered by other users, so session users cannot reach {}; \
                 use a world-searchable place (chmod o+x) for work_dir and venv",
                dir.display(),
                meta.permissions().mode() & 0o777,
                path.display()
            )));
        }
    }
    Ok(())
}

/// A directory only `run_as` may enter.
fn private_dir(dir: &Path, run_as: &RunAs) -> Result<(), Error> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    if run_as.switch {
        std::os::unix::fs::chown(dir, Some(run_as.uid), Some(run_as.gid))
            .map_err(|e| Error::io(dir, e))?;
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| Error::io(dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exits_are_described_like_a_shell_would() {
        assert_eq!(describe_exit(Some(1)), "exited with code 1");
        assert_eq!(describe_exit(Some(137)), "was killed by signal 9");
        assert_eq!(describe_exit(None), "exited");
        let killed = std::process::ExitStatus::from_raw(9);
        assert_eq!(exit_code(killed), Some(137));
        let failed = std::process::ExitStatus::from_raw(3 << 8);
        assert_eq!(exit_code(failed), Some(3));
    }

    #[test]
    fn closed_directories_on_the_way_are_named() {
        let base = std::env::temp_dir().join(format!("oc-agent-reach-{}", std::process::id()));
        let closed = base.join("closed");
        std::fs::create_dir_all(closed.join("work")).unwrap();
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o700)).unwrap();
        let err = ensure_reachable(&closed.join("work"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("closed (mode 700)"), "{err}");
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o755)).unwrap();
        ensure_reachable(&closed.join("work")).unwrap();
        std::fs::remove_dir_all(&base).unwrap();
    }
}
