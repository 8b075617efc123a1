//! The OpenCloud agent: runs on a host, registers with control, and starts
//! and stops a Jupyter server per session when control says so.
//!
//! [`run`] is the whole agent (what the binary runs); [`Supervisor`] is the
//! part that manages Jupyter servers, usable without control (tests drive it
//! directly, `stop-all` uses it to stop what a work dir records).

pub mod cgroups;
pub mod client;
pub mod config;
pub mod jupyter;
pub mod load;
pub mod process;
pub mod state;
pub mod supervisor;
pub mod users;

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use opencloud_protocol::agent::{
    Action, AgentEvent, AgentHello, Command, Heartbeat, HEARTBEAT_MS, HOST_KEY_REVOKED,
};
use rand::Rng;
use tokio::sync::{mpsc, watch};

pub use client::{ClientError, ControlClient};
pub use config::{Config, ConfigError};
pub use supervisor::Supervisor;

/// Reported to control in hellos and heartbeats.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Events waiting for control while it is unreachable; beyond this the
/// oldest are dropped (control reconciles from heartbeats anyway).
const OUTBOX_LIMIT: usize = 10_000;
/// How often running servers are asked for their activity.
const ACTIVITY_EVERY: Duration = Duration::from_secs(5);
/// How long a shutting-down agent keeps trying to deliver events.
const FLUSH_ON_EXIT: Duration = Duration::from_secs(2);

/// Everything that can stop the agent or a session start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("user {user}: {message}")]
    User { user: String, message: String },
    #[error("{0}")]
    Setup(String),
    /// Control does not accept this host's key (wrong or revoked).
    #[error("control refused this host's key ({code}): {message}. Check host_key in the config; a revoked host needs a new key from My hosts")]
    KeyRejected { code: String, message: String },
    #[error(transparent)]
    Control(ClientError),
}

impl Error {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.display().to_string(),
            source,
        }
    }

    /// The process exit status for this error: 2 for what the owner must
    /// fix in the config (bad file, refused key), 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Config(_) | Error::KeyRejected { .. } => 2,
            _ => 1,
        }
    }
}

impl From<ClientError> for Error {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::KeyRejected { code, message } => Error::KeyRejected { code, message },
            other => Error::Control(other),
        }
    }
}

/// Exponential back-off with jitter: 0.5 s doubling to 30 s.
struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(500);
    const MAX: Duration = Duration::from_secs(30);

    fn new() -> Self {
        Self { next: Self::FIRST }
    }

    fn reset(&mut self) {
        self.next = Self::FIRST;
    }

    fn next(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        base.mul_f64(rand::thread_rng().gen_range(0.8..1.2))
    }
}

/// Runs the agent until `shutdown` completes — Jupyter servers are left
/// running for the next start to adopt — or until control refuses the host
/// key ([`Error::KeyRejected`]; after registration that also stops every
/// session, since control will no longer route to them).
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    let metrics = match config.metrics_listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| Error::Setup(format!("metrics_listen {addr}: {e}")))?;
            Some((listener, install_metrics()))
        }
        None => None,
    };
    let health_addr = config.health_addr();
    let health = tokio::net::TcpListener::bind(health_addr)
        .await
        .map_err(|e| Error::Setup(format!("health_port: cannot listen on {health_addr}: {e}")))?;

    let (supervisor, events) = Supervisor::open(config.clone()).await?;
    if let Some(reason) = supervisor.cgroup_unavailable_reason() {
        tracing::warn!(
            "sessions run WITHOUT memory and CPU limits: cgroup v2 is not usable here ({reason})"
        );
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(serve_health(health, stop_rx.clone()));
    if let Some((listener, Some(handle))) = metrics {
        tasks.spawn(serve_metrics(listener, handle, stop_rx.clone()));
    }

    let client = ControlClient::new(&config.control_url, &config.host_key);
    let (fatal_tx, mut fatal_rx) = mpsc::channel::<Error>(1);
    let outbox = tokio::spawn(deliver_events(
        client.clone(),
        events,
        fatal_tx.clone(),
        stop_rx.clone(),
    ));

    tokio::pin!(shutdown);
    let registered = tokio::select! {
        registered = register(&client, &supervisor) => registered,
        () = &mut shutdown => {
            finish(stop_tx, tasks, outbox).await;
            return Ok(());
        }
    };
    let registered = match registered {
        Ok(registered) => registered,
        Err(e) => {
            if matches!(&e, Error::KeyRejected { code, .. } if code == HOST_KEY_REVOKED) {
                // Control will never route to them again.
                supervisor.stop_all(config.stop_grace).await;
            }
            finish(stop_tx, tasks, outbox).await;
            return Err(e);
        }
    };
    tracing::info!(
        host_id = registered.host_id,
        name = registered.name,
        sessions = supervisor.sessions().len(),
        "registered with control"
    );
    let stopping: Arc<Mutex<HashSet<String>>> = Arc::default();
    stop_sessions(&supervisor, &stopping, registered.stop, config.stop_grace);

    let heartbeat_every = if registered.heartbeat_ms == 0 {
        Duration::from_millis(HEARTBEAT_MS)
    } else {
        Duration::from_millis(registered.heartbeat_ms.clamp(250, 60_000))
    };
    tasks.spawn(heartbeats(
        client.clone(),
        supervisor.clone(),
        heartbeat_every,
        stopping,
        fatal_tx.clone(),
    ));
    tasks.spawn(commands(client.clone(), supervisor.clone(), fatal_tx));
    tasks.spawn(refresh_activity(supervisor.clone(), stop_rx.clone()));

    let outcome = tokio::select! {
        () = &mut shutdown => Ok(()),
        Some(e) = fatal_rx.recv() => Err(e),
    };
    if let Err(e) = &outcome {
        tracing::error!("{e}; stopping every session");
        tasks.abort_all();
        supervisor.stop_all(config.stop_grace).await;
    } else {
        tracing::info!("shutting down; Jupyter servers keep running for the next start");
    }
    finish(stop_tx, tasks, outbox).await;
    outcome
}

/// Stops the background tasks and gives queued events a moment to leave.
async fn finish(
    stop: watch::Sender<bool>,
    mut tasks: tokio::task::JoinSet<()>,
    outbox: tokio::task::JoinHandle<()>,
) {
    stop.send_replace(true);
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    if tokio::time::timeout(FLUSH_ON_EXIT + Duration::from_secs(1), outbox)
        .await
        .is_err()
    {
        tracing::warn!("some events were not delivered to control before exit");
    }
}

fn hello(supervisor: &Supervisor) -> AgentHello {
    let config = supervisor.config();
    AgentHello {
        version: VERSION.to_owned(),
        address: config.address.to_string(),
        health_port: config.health_port,
        port_range: [config.port_range.0, config.port_range.1],
        capacity: config.capacity,
        cgroup_limits: supervisor.cgroup_limits(),
        sessions: supervisor.sessions(),
    }
}

/// Registers, retrying while control is unreachable.
async fn register(
    client: &ControlClient,
    supervisor: &Supervisor,
) -> Result<opencloud_protocol::agent::Registered, Error> {
    let mut backoff = Backoff::new();
    let mut failures = 0u32;
    loop {
        match client.register(&hello(supervisor)).await {
            Ok(registered) => return Ok(registered),
            Err(e) if e.is_retryable() => {
                failures += 1;
                // The first failure, then now and then: not every retry.
                if failures == 1 || failures.is_multiple_of(10) {
                    tracing::warn!(failures, "cannot register yet: {e}; retrying");
                }
                tokio::time::sleep(backoff.next()).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

fn stop_sessions(
    supervisor: &Supervisor,
    stopping: &Arc<Mutex<HashSet<String>>>,
    sids: Vec<String>,
    grace: Duration,
) {
    for sid in sids {
        let first = stopping
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(sid.clone());
        if !first {
            continue;
        }
        tracing::info!(sid, "control asked for this session to end");
        let supervisor = supervisor.clone();
        let stopping = stopping.clone();
        tokio::spawn(async move {
            supervisor.stop(&sid, grace).await;
            stopping
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .remove(&sid);
        });
    }
}

async fn heartbeats(
    client: ControlClient,
    supervisor: Supervisor,
    every: Duration,
    stopping: Arc<Mutex<HashSet<String>>>,
    fatal: mpsc::Sender<Error>,
) {
    let mut sampler = load::LoadSampler::default();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    let mut draining = false;
    loop {
        tick.tick().await;
        let heartbeat = Heartbeat {
            version: VERSION.to_owned(),
            load: sampler.sample(&supervisor.config().work_dir),
            sessions: supervisor.sessions(),
        };
        match client.heartbeat(&heartbeat).await {
            Ok(reply) => {
                if failing {
                    tracing::info!("heartbeats reach control again");
                    failing = false;
                }
                if reply.draining != draining {
                    draining = reply.draining;
                    tracing::info!(draining, "control changed this host's draining state");
                }
                stop_sessions(
                    &supervisor,
                    &stopping,
                    reply.stop,
                    supervisor.config().stop_grace,
                );
            }
            Err(ClientError::KeyRejected { code, message }) => {
                let _ = fatal.send(Error::KeyRejected { code, message }).await;
                return;
            }
            Err(e) => {
                if !failing {
                    tracing::warn!("heartbeat failed: {e}");
                    failing = true;
                }
            }
        }
    }
}

async fn commands(client: ControlClient, supervisor: Supervisor, fatal: mpsc::Sender<Error>) {
    let mut after = 0u64;
    let mut backoff = Backoff::new();
    loop {
        match client.commands(after).await {
            Ok(batch) => {
                backoff.reset();
                for command in batch.commands {
                    if command.id <= after {
                        continue;
                    }
                    after = command.id;
                    let supervisor = supervisor.clone();
                    tokio::spawn(execute(supervisor, command));
                }
            }
            Err(ClientError::KeyRejected { code, message }) => {
                let _ = fatal.send(Error::KeyRejected { code, message }).await;
                return;
            }
            Err(e) => {
                tracing::warn!("cannot fetch commands: {e}");
                tokio::time::sleep(backoff.next()).await;
            }
        }
    }
}

/// Runs one command; its outcome reaches control as an event.
async fn execute(supervisor: Supervisor, command: Command) {
    match command.action {
        Action::Start(start) => {
            tracing::info!(
                command = command.id,
                sid = start.sid,
                project = start.project_id,
                "start"
            );
            supervisor.start(start).await;
        }
        Action::Stop { sid, grace_ms } => {
            tracing::info!(command = command.id, sid, grace_ms, "stop");
            // 0: the host's own default.
            let grace = if grace_ms == 0 {
                supervisor.config().stop_grace
            } else {
                Duration::from_millis(grace_ms)
            };
            supervisor.stop(&sid, grace).await;
        }
    }
}

async fn refresh_activity(supervisor: Supervisor, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(ACTIVITY_EVERY) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        supervisor.refresh_activity().await;
    }
}

/// Delivers events in order, holding them while control is unreachable.
async fn deliver_events(
    client: ControlClient,
    mut events: mpsc::UnboundedReceiver<AgentEvent>,
    fatal: mpsc::Sender<Error>,
    mut stop: watch::Receiver<bool>,
) {
    let mut queue: VecDeque<AgentEvent> = VecDeque::new();
    let mut backoff = Backoff::new();
    let mut flush_until: Option<tokio::time::Instant> = None;
    let push = |queue: &mut VecDeque<AgentEvent>, event: AgentEvent| {
        if queue.len() >= OUTBOX_LIMIT {
            if let Some(dropped) = queue.pop_front() {
                tracing::error!(
                    sid = dropped.sid(),
                    "event queue full; dropped the oldest event"
                );
            }
        }
        queue.push_back(event);
    };
    loop {
        while let Ok(event) = events.try_recv() {
            push(&mut queue, event);
        }
        if flush_until.is_none() && *stop.borrow() {
            flush_until = Some(tokio::time::Instant::now() + FLUSH_ON_EXIT);
        }
        if let Some(until) = flush_until {
            if queue.is_empty() || tokio::time::Instant::now() >= until {
                return;
            }
        }
        let Some(event) = queue.front() else {
            tokio::select! {
                event = events.recv() => match event {
                    Some(event) => push(&mut queue, event),
                    None => return,
                },
                _ = stop.changed() => {}
            }
            continue;
        };
        let sent = match flush_until {
            Some(until) => tokio::time::timeout_at(until, client.event(event))
                .await
                .unwrap_or_else(|_| Err(ClientError::Unavailable("shutting down".into()))),
            None => client.event(event).await,
        };
        match sent {
            Ok(()) => {
                backoff.reset();
                queue.pop_front();
            }
            Err(ClientError::KeyRejected { code, message }) => {
                let _ = fatal.try_send(Error::KeyRejected { code, message });
                return;
            }
            Err(e @ ClientError::Refused { .. }) => {
                tracing::error!(sid = event.sid(), "control refused an event, dropped: {e}");
                queue.pop_front();
            }
            Err(e) => {
                tracing::warn!(queued = queue.len(), "cannot deliver events yet: {e}");
                if flush_until.is_some() {
                    continue;
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff.next()) => {}
                    _ = stop.changed() => {}
                }
            }
        }
    }
}

async fn serve_health(listener: tokio::net::TcpListener, mut stop: watch::Receiver<bool>) {
    let app = axum::Router::new().route("/healthz", get(|| async { "ok\n" }));
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await;
    if let Err(e) = served {
        tracing::error!("health listener failed: {e}");
    }
}

async fn serve_metrics(
    listener: tokio::net::TcpListener,
    handle: PrometheusHandle,
    mut stop: watch::Receiver<bool>,
) {
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let handle = handle.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4",
                    )],
                    handle.render(),
                )
            }
        }),
    );
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await;
    if let Err(e) = served {
        tracing::error!("metrics listener failed: {e}");
    }
}

/// The process-wide Prometheus recorder (installed once, even when an
/// embedding process runs several agents).
fn install_metrics() -> Option<PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let installed = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full("opencloud_agent_spawn_seconds".into()),
                    &[0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0],
                )
                .and_then(|b| b.install_recorder());
            match installed {
                Ok(handle) => Some(handle),
                Err(e) => {
                    tracing::warn!("metrics are off: {e}");
                    None
                }
            }
        })
        .clone()
}

/// `opencloud-agent stop-all`: stops every server the work dir records
/// (and cleans up what is left of dead ones). Returns how many were running.
pub async fn stop_all(config: Config) -> Result<usize, Error> {
    let grace = config.stop_grace;
    let (supervisor, _events) = Supervisor::open(config).await?;
    let running = supervisor.sessions().len();
    supervisor.stop_all(grace).await;
    Ok(running)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_a_limit_and_resets() {
        let mut backoff = Backoff::new();
        let first = backoff.next();
        assert!(first >= Duration::from_millis(400) && first <= Duration::from_millis(600));
        for _ in 0..20 {
            assert!(backoff.next() <= Duration::from_secs(36));
        }
        backoff.reset();
        assert!(backoff.next() <= Duration::from_millis(600));
    }

    #[test]
    fn refused_keys_exit_with_status_2() {
        let e: Error = ClientError::KeyRejected {
            code: "host_key_invalid".into(),
            message: "unknown key".into(),
        }
        .into();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("host_key_invalid"), "{e}");
        let e: Error = ClientError::Unavailable("down".into()).into();
        assert_eq!(e.exit_code(), 1);
    }
}
