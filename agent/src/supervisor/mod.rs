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
//!
//! This module holds the supervisor, its sessions and what can be asked of
//! them; the ways in and out live beside it: `launch` (starting and
//! readiness), `adopt` (taking over servers after a restart) and `end`
//! (stopping, exits and the teardown every ending shares), `save` (the
//! project's snapshots around all of them), `pool` (warm servers started
//! before their project is known, and binding one to a start). The work
//! dir's layout is [`crate::workdir`].
//!
//! A session's resources (socket directory, network namespace, cgroup,
//! state file, log) are named by its `server_id`: its sid for a cold start,
//! the warm server's own id when it was bound to one. Warm servers wait in
//! a map of their own, never in the sessions map, so nothing routes to or
//! reports a server no start has bound. Lock order: sessions, then pool.

mod adopt;
mod end;
mod launch;
mod pool;
mod save;

use std::collections::HashMap;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opencloud_protocol::agent::{AgentEvent, AgentSession, AgentSessionState};
use opencloud_protocol::metrics::{register_at_zero, LabelValue};
use tokio::sync::{mpsc, watch};

use crate::cgroups::{self, Support};
use crate::client::ControlClient;
use crate::config::Config;
use crate::error::Error;
use crate::gate::Gate;
use crate::host_link::{Sessions, Target};
use crate::jupyter;
use crate::sandbox;
use crate::snapshot::Snapshots;
use crate::state::{SessionRecord, StateDir};
use crate::users;
use crate::workdir::{self, Layout};

/// The supervisor's counters, named once for the increments and for their
/// registration at zero.
const SPAWN_FAILURES: &str = "opencloud_agent_spawn_failures_total";
const OOM_KILLS: &str = "opencloud_agent_oom_kills_total";
const EXITS: &str = "opencloud_agent_exits_total";
const SNAPSHOT_FAILURES: &str = "opencloud_agent_snapshot_failures_total";
const WARM_BINDS: &str = "opencloud_agent_warm_binds_total";
const WARM_BIND_FAILURES: &str = "opencloud_agent_warm_bind_failures_total";
const WARM_SERVERS: &str = "opencloud_agent_warm_servers";

/// Which way a failed snapshot went: the `op` of `SNAPSHOT_FAILURES`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SnapshotOp {
    Restore,
    Push,
}

impl LabelValue for SnapshotOp {
    const ALL: &'static [Self] = &[SnapshotOp::Restore, SnapshotOp::Push];
    fn label(self) -> &'static str {
        match self {
            SnapshotOp::Restore => "restore",
            SnapshotOp::Push => "push",
        }
    }
}

impl SnapshotOp {
    fn count_failure(self) {
        metrics::counter!(SNAPSHOT_FAILURES, "op" => self.label()).increment(1);
    }
}

/// The supervisor's counters at zero, before their first event.
pub fn register_counters_at_zero() {
    for name in [
        SPAWN_FAILURES,
        OOM_KILLS,
        EXITS,
        WARM_BINDS,
        WARM_BIND_FAILURES,
    ] {
        register_at_zero(name, &[]);
    }
    for gauge in [WARM_SERVERS, crate::gate::STARTS_WAITING] {
        metrics::gauge!(gauge).set(0.0);
    }
    register_at_zero(SNAPSHOT_FAILURES, &[("op", &SnapshotOp::labels())]);
}

/// Log lines sent with a failure or an exit.
const LOG_TAIL_LINES: usize = 20;
/// How often a running session's cgroup is checked for OOM kills.
const OOM_POLL: Duration = Duration::from_millis(500);
/// Grace given to what is left of a server that exited or failed.
const LEFTOVER_GRACE: Duration = Duration::from_secs(2);

/// What runs a session (see [`Supervisor::server_of`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerInfo {
    /// What its socket directory, network namespace, cgroup and state
    /// file are named by: the sid, or the warm server's own id.
    pub server_id: String,
    /// Where the project's files are while it runs.
    pub files: PathBuf,
    pub pid: Option<i32>,
    /// Whether it came from the warm pool.
    pub warm: bool,
}

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
    /// bubblewrap, found at start.
    bwrap: PathBuf,
    /// The host's own addresses, unreachable from sessions.
    host_addresses: Vec<String>,
    events: mpsc::UnboundedSender<AgentEvent>,
    snapshots: Snapshots,
    /// By sid.
    sessions: Mutex<HashMap<String, Arc<Session>>>,
    /// Warm servers no start has bound yet, by server id.
    pool: Mutex<HashMap<String, Arc<Session>>>,
    /// Paces cold starts and refills of the pool.
    gate: Gate,
    /// Set while control drains this host: no warm servers then.
    draining: watch::Sender<bool>,
    /// Wakes the pool's keeper: a session came or went, a warm server
    /// became ready or died.
    pool_changed: tokio::sync::Notify,
    /// Serialises `useradd`.
    users: tokio::sync::Mutex<()>,
    /// Set by [`Supervisor::detach`]: watchers stop, servers keep running.
    detached: watch::Sender<bool>,
    /// `work_dir/agent.lock`, held while this supervisor owns the work dir.
    lock: Mutex<Option<std::fs::File>>,
}

struct Session {
    /// For a warm server waiting in the pool: its server id.
    sid: String,
    /// What its resources are named by (see the module's comment).
    server_id: String,
    /// 0 for a warm server waiting in the pool.
    project_id: u64,
    /// Where the project's files are while it runs: the project's
    /// directory for a cold start, the warm server's root when bound.
    files: PathBuf,
    /// The pool slot of a warm server (waiting or bound): its user, and
    /// what it hands back when it ends.
    pool_slot: Option<u32>,
    started_at: u64,
    /// What the OOM notice names; 0 when not known (adopted).
    memory_limit_mib: u64,
    status: watch::Sender<Status>,
    activity: Mutex<Activity>,
    /// A warm server still starting that a start waits for (it is the
    /// soonest ready): no other start takes it, the keeper leaves it be.
    promised: std::sync::atomic::AtomicBool,
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

impl Session {
    /// A server about to be launched: starting, spawning, no process yet.
    fn launching(
        sid: String,
        server_id: String,
        project_id: u64,
        files: PathBuf,
        pool_slot: Option<u32>,
        memory_limit_mib: u64,
    ) -> Self {
        Self {
            sid,
            server_id,
            project_id,
            files,
            pool_slot,
            started_at: unix_now(),
            memory_limit_mib,
            status: watch::channel(Status {
                phase: Phase::Starting,
                spawning: true,
                process: None,
                exit: None,
            })
            .0,
            activity: Mutex::new(Activity::default()),
            promised: Default::default(),
        }
    }

    fn is_promised(&self) -> bool {
        self.promised.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn set_promised(&self, promised: bool) {
        self.promised
            .store(promised, std::sync::atomic::Ordering::SeqCst);
    }

    /// A warm server that no start has bound (it reports nothing to control).
    fn waiting_in_pool(&self) -> bool {
        self.pool_slot.is_some() && self.sid == self.server_id
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

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn exit_code(status: std::process::ExitStatus) -> Option<i32> {
    status.code().or_else(|| status.signal().map(|s| 128 + s))
}

/// What the session's owner reads when a kernel was killed for memory.
fn oom_reason(memory_limit_mib: u64) -> String {
    if memory_limit_mib == 0 {
        "A kernel was stopped because the session ran out of memory.".into()
    } else {
        format!(
            "A kernel was stopped because it used more than its {memory_limit_mib} MiB memory limit."
        )
    }
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
    /// it: servers that are alive and answer on their socket are
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
        sandbox::check_tools(config.egress, root).map_err(Error::Setup)?;
        let bwrap = sandbox::which("bwrap").unwrap_or_else(|| PathBuf::from("bwrap"));
        workdir::prepare_work_dir(&layout, root, &config.venv)?;
        let lock = workdir::lock_work_dir(&layout.work_dir)?;
        if root {
            for path in [&config.work_dir, &config.venv] {
                workdir::ensure_reachable(path)?;
            }
        }
        let state = StateDir::open(layout.sessions())?;
        let snapshots = Snapshots::open(
            ControlClient::new(&config.control_url, &config.host_key),
            layout.snapshots(),
        )
        .map_err(|e| Error::io(&layout.snapshots(), e))?;
        let (events, receiver) = mpsc::unbounded_channel();
        let (detached, _) = watch::channel(false);
        let gate = Gate::new(config.start_concurrency);
        let supervisor = Self {
            inner: Arc::new(Inner {
                config,
                layout,
                state,
                cgroups,
                root,
                bwrap,
                host_addresses: sandbox::host_addresses().await,
                events,
                snapshots,
                sessions: Mutex::new(HashMap::new()),
                pool: Mutex::new(HashMap::new()),
                gate,
                draining: watch::channel(false).0,
                pool_changed: tokio::sync::Notify::new(),
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

    /// The last lines of a session's log: sent with a failure or an exit.
    fn log_tail(&self, session: &Session) -> String {
        jupyter::log_tail(&self.inner.layout.log(&session.server_id), LOG_TAIL_LINES)
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

    /// Taken after the sessions lock when both are needed.
    fn lock_pool(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Session>>> {
        self.inner
            .pool
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whoever holds server `server_id` now: its session, or the pool.
    fn holder_of(&self, server_id: &str) -> Option<Arc<Session>> {
        // Both locks at once: a claim moves a server from one map to the other.
        let sessions = self.lock_sessions();
        let pool = self.lock_pool();
        let in_session = sessions.values().find(|s| s.server_id == server_id);
        in_session.or_else(|| pool.get(server_id)).cloned()
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
                    // No ports any more: the host link reaches the socket.
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

    /// Where the host link forwards a session's connections: only to a
    /// running server of this host, on its private socket.
    pub fn link_target(&self, sid: &str) -> Option<Target> {
        let session = self.lookup(sid)?;
        matches!(session.phase(), Phase::Running { .. })
            .then(|| Target::Unix(self.inner.layout.socket(&session.server_id)))
    }

    /// The project a session serves, while it exists.
    pub fn project_of(&self, sid: &str) -> Option<u64> {
        self.lookup(sid).map(|s| s.project_id)
    }

    /// Which server runs session `sid`, while it exists (for tests and logs).
    pub fn server_of(&self, sid: &str) -> Option<ServerInfo> {
        let session = self.lookup(sid)?;
        let pid = session.status.borrow().process.as_ref().map(|p| p.pid);
        Some(ServerInfo {
            server_id: session.server_id.clone(),
            files: session.files.clone(),
            pid,
            warm: session.pool_slot.is_some(),
        })
    }

    /// The server process of a session, once launched (for tests and logs).
    pub fn pid_of(&self, sid: &str) -> Option<i32> {
        self.lookup(sid)
            .and_then(|s| s.status.borrow().process.as_ref().map(|p| p.pid))
    }

    /// The sessions whose servers run now.
    fn running_sessions(&self) -> Vec<Arc<Session>> {
        self.lock_sessions()
            .values()
            .filter(|s| matches!(s.phase(), Phase::Running { .. }))
            .cloned()
            .collect()
    }

    /// Asks every running server for its last activity and busy kernels.
    pub async fn refresh_activity(&self) {
        let running = self.running_sessions();
        let mut probes = tokio::task::JoinSet::new();
        for session in running {
            let socket = self.inner.layout.socket(&session.server_id);
            probes.spawn(async move {
                let (status, busy) =
                    tokio::join!(jupyter::status(&socket), jupyter::busy_kernels(&socket));
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

    /// Reports each OOM kill in the session's cgroup (a kernel that
    /// outgrew the session's memory) until the session is gone.
    fn watch_memory(&self, session: Arc<Session>) {
        let Some(cgroups) = self.inner.cgroups.cgroups().cloned() else {
            return;
        };
        let supervisor = self.clone();
        let mut detached = self.inner.detached.subscribe();
        tokio::spawn(async move {
            let mut seen = cgroups.oom_kills(&session.server_id).unwrap_or(0);
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(OOM_POLL) => {}
                    _ = detached.wait_for(|d| *d) => return,
                }
                if !matches!(session.phase(), Phase::Running { .. }) {
                    return;
                }
                let kills = cgroups.oom_kills(&session.server_id).unwrap_or(seen);
                if kills > seen {
                    seen = kills;
                    tracing::warn!(sid = session.sid, kills, "a kernel was killed for memory");
                    metrics::counter!(OOM_KILLS).increment(1);
                    supervisor.emit(AgentEvent::KernelKilled {
                        sid: session.sid.clone(),
                        reason: oom_reason(session.memory_limit_mib),
                    });
                }
            }
        });
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
        metrics::gauge!(WARM_SERVERS).set(f64::from(self.warm_servers()));
    }
}

impl Sessions for Supervisor {
    fn target(&self, sid: &str) -> Option<Target> {
        self.link_target(sid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oom_kills_are_explained_with_the_limit() {
        assert_eq!(
            oom_reason(512),
            "A kernel was stopped because it used more than its 512 MiB memory limit."
        );
        assert!(oom_reason(0).contains("ran out of memory"));
    }

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
}
