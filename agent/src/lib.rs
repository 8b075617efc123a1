//! The OpenCloud agent: runs on a host, registers with control, and starts
//! and stops a Jupyter server per session when control says so.
//!
//! [`run`] is the whole agent (what the binary runs): it binds the
//! host link and metrics listeners (`listener`, [`host_link`]), opens the [`Supervisor`],
//! and keeps the link to control (`link`) until shutdown. [`Supervisor`]
//! is the part that manages Jupyter servers, usable without control (tests
//! drive it directly, `stop-all` uses it to stop what a work dir records).

pub mod cgroups;
pub mod client;
pub mod config;
pub mod error;
pub mod gate;
pub mod host_link;
pub mod jupyter;
mod link;
mod listener;
pub mod load;
pub mod process;
pub mod sandbox;
pub mod snapshot;
pub mod state;
pub mod supervisor;
pub mod users;
pub mod workdir;

use std::future::Future;
use std::time::Duration;

use opencloud_protocol::agent::HOST_KEY_REVOKED;
use tokio::sync::{mpsc, watch};

pub use client::{ClientError, ControlClient};
pub use config::{Config, ConfigError};
pub use error::Error;
pub use link::VERSION;
pub use supervisor::{ServerInfo, Supervisor};

/// Runs the agent until `shutdown` completes — Jupyter servers are left
/// running for the next start to adopt — or until control refuses the host
/// key ([`Error::KeyRejected`]; after registration that also stops every
/// session, since control will no longer route to them).
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    let listeners = listener::bind(&config).await?;

    let (supervisor, events) = Supervisor::open(config.clone()).await?;
    // Warm servers start at once: they need nothing from control until bound.
    supervisor.keep_warm();
    // Made once, after the work dir exists; only requests for it leave.
    let link_key = opencloud_protocol::config::read_or_create_private_file(
        "host link key",
        &workdir::Layout {
            work_dir: config.work_dir.clone(),
        }
        .link_key(),
        opencloud_protocol::link::new_private_key,
    )?;
    if let Some(reason) = supervisor.cgroup_unavailable_reason() {
        tracing::warn!(
            "sessions run WITHOUT memory and CPU limits: cgroup v2 is not usable here ({reason})"
        );
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    let (identity_tx, identity_rx) = watch::channel(None);
    listeners.spawn(
        &mut tasks,
        identity_rx,
        std::sync::Arc::new(supervisor.clone()),
        &stop_rx,
    );

    let client = ControlClient::new(&config.control_url, &config.host_key);
    let (fatal_tx, mut fatal_rx) = mpsc::channel::<Error>(1);
    let outbox = tokio::spawn(link::deliver_events(
        client.clone(),
        events,
        fatal_tx.clone(),
        stop_rx.clone(),
    ));

    tokio::pin!(shutdown);
    let registered = tokio::select! {
        registered = link::register(&client, &supervisor, &link_key) => registered,
        () = &mut shutdown => {
            finish(stop_tx, tasks, outbox).await;
            return Ok(());
        }
    };
    let (registered, identity) = match registered {
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
    identity_tx.send_replace(Some(identity));
    link::spawn_tasks(
        &mut tasks,
        &client,
        &supervisor,
        registered,
        link::LinkRenewal {
            key: link_key,
            identity: identity_tx,
        },
        fatal_tx,
        &stop_rx,
    );

    let outcome = tokio::select! {
        () = &mut shutdown => Ok(()),
        Some(e) = fatal_rx.recv() => Err(e),
    };
    if let Err(e) = &outcome {
        // `stop_all` retires the warm servers too.
        tracing::error!("{e}; stopping every session");
        tasks.abort_all();
        supervisor.stop_all(config.stop_grace).await;
    } else {
        tracing::info!("shutting down; Jupyter servers keep running for the next start");
        // Cheap when nothing changed: a walk of each project's tree.
        supervisor.save_running().await;
        // Unbound warm servers are not adopted by the next start: they go now.
        supervisor.close_pool().await;
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
    if tokio::time::timeout(link::FLUSH_ON_EXIT + Duration::from_secs(1), outbox)
        .await
        .is_err()
    {
        tracing::warn!("some events were not delivered to control before exit");
    }
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
