//! The agent's link to control, built on [`ControlClient`]: registering
//! (retried while control is unreachable), heartbeats with load and
//! sessions, polling for commands and running them, delivering the
//! supervisor's events in order, and renewing the host link's certificate.
//!
//! A refused host key ends the link: the task that meets it sends
//! [`Error::KeyRejected`] on the `fatal` channel and returns.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opencloud_protocol::agent::{
    Action, AgentEvent, AgentHello, Command, Heartbeat, Registered, HEARTBEAT_MS,
};
use opencloud_protocol::link::{certificate_request, LinkCertificate};
use rand::Rng;
use tokio::sync::{mpsc, watch};

use crate::client::{ClientError, ControlClient};
use crate::error::Error;
use crate::host_link::LinkIdentity;
use crate::load;
use crate::supervisor::{unix_now, Supervisor};

/// Reported to control in hellos and heartbeats.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Events waiting for control while it is unreachable; beyond this the
/// oldest are dropped (control reconciles from heartbeats anyway).
const OUTBOX_LIMIT: usize = 10_000;
/// How often running servers are asked for their activity.
const ACTIVITY_EVERY: Duration = Duration::from_secs(5);
/// How long a shutting-down agent keeps trying to deliver events.
pub(crate) const FLUSH_ON_EXIT: Duration = Duration::from_secs(2);

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

fn hello(supervisor: &Supervisor, link_csr: String) -> AgentHello {
    let config = supervisor.config();
    AgentHello {
        version: VERSION.to_owned(),
        address: config.address.to_string(),
        link_port: config.link_port,
        capacity: config.capacity,
        cgroup_limits: supervisor.cgroup_limits(),
        sessions: supervisor.sessions(),
        link_csr,
    }
}

/// A certificate request for the host link's key (PEM).
fn link_request(link_key: &str) -> Result<String, Error> {
    certificate_request(link_key).map_err(|e| Error::Setup(format!("host link key: {e}")))
}

/// Registers, retrying while control is unreachable; returns control's
/// answer and the identity the host link serves under from now on.
pub(crate) async fn register(
    client: &ControlClient,
    supervisor: &Supervisor,
    link_key: &str,
) -> Result<(Registered, LinkIdentity), Error> {
    let registered = register_once(client, supervisor, link_key).await?;
    let identity = LinkIdentity::new(registered.host_id, &registered.link_certificate, link_key)
        .map_err(|e| Error::Setup(e.to_string()))?;
    Ok((registered, identity))
}

async fn register_once(
    client: &ControlClient,
    supervisor: &Supervisor,
    link_key: &str,
) -> Result<Registered, Error> {
    let mut backoff = Backoff::new();
    let mut failures = 0u32;
    loop {
        match client
            .register(&hello(supervisor, link_request(link_key)?))
            .await
        {
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

/// What the host link needs to renew its certificate.
pub(crate) struct LinkRenewal {
    pub key: String,
    pub identity: watch::Sender<Option<LinkIdentity>>,
}

/// Once registered: stops what control no longer wants, then spawns the
/// heartbeats, the command poll, the activity refresh and the link
/// certificate's renewal into `tasks`.
pub(crate) fn spawn_tasks(
    tasks: &mut tokio::task::JoinSet<()>,
    client: &ControlClient,
    supervisor: &Supervisor,
    registered: Registered,
    link: LinkRenewal,
    fatal: mpsc::Sender<Error>,
    stop: &watch::Receiver<bool>,
) {
    tracing::info!(
        host_id = registered.host_id,
        name = registered.name,
        sessions = supervisor.sessions().len(),
        "registered with control"
    );
    let stopping: Arc<Mutex<HashSet<String>>> = Arc::default();
    stop_sessions(
        supervisor,
        &stopping,
        registered.stop,
        supervisor.config().stop_grace,
    );

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
        fatal.clone(),
    ));
    tasks.spawn(renew_link_certificate(
        client.clone(),
        registered.host_id,
        registered.link_certificate,
        link,
        fatal.clone(),
    ));
    tasks.spawn(commands(client.clone(), supervisor.clone(), fatal));
    tasks.spawn(refresh_activity(supervisor.clone(), stop.clone()));
}

/// Asks control for a new link certificate with a third of the current
/// one's life left and serves it from then on: control pins the new one
/// in the route table as it issues it.
async fn renew_link_certificate(
    client: ControlClient,
    host_id: u64,
    mut current: LinkCertificate,
    link: LinkRenewal,
    fatal: mpsc::Sender<Error>,
) {
    let mut backoff = Backoff::new();
    loop {
        let wait = current.renew_at().saturating_sub(unix_now());
        tokio::time::sleep(Duration::from_secs(wait)).await;
        let renewed = match link_request(&link.key) {
            Ok(csr) => client.link_certificate(csr).await.map_err(Error::from),
            Err(e) => Err(e),
        };
        let identity = renewed.and_then(|certificate| {
            LinkIdentity::new(host_id, &certificate, &link.key)
                .map(|identity| (certificate, identity))
                .map_err(|e| Error::Setup(e.to_string()))
        });
        match identity {
            Ok((certificate, identity)) => {
                tracing::info!(
                    not_after = certificate.not_after,
                    "host link certificate renewed"
                );
                link.identity.send_replace(Some(identity));
                current = certificate;
                backoff.reset();
            }
            Err(e @ Error::KeyRejected { .. }) => {
                let _ = fatal.send(e).await;
                return;
            }
            Err(e) => {
                tracing::warn!("cannot renew the host link certificate yet: {e}");
                tokio::time::sleep(backoff.next()).await;
            }
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
            warm_servers: supervisor.warm_servers(),
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
                // Draining: no warm servers wait for opens that will not come.
                supervisor.set_draining(draining);
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
        Action::Save { sid } => {
            tracing::info!(command = command.id, sid, "save");
            supervisor.save_now(&sid).await;
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
pub(crate) async fn deliver_events(
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
}
