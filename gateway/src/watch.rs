//! Follows control's route stream, publishes each new table and persists
//! it. Reconnects with backoff and resumes from the version it holds; while
//! control is away the gateway keeps serving the last good table. Each
//! new table also ends the open requests it would no longer admit.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::{sleep, timeout, Instant};

use crate::clock::unix_now;
use crate::connections::{Changed, OpenConnections};
use crate::control_client::ControlClient;
use crate::store::Store;
use crate::table::{Incoming, Routes};

/// No line at all for this long means the stream is dead (control sends a
/// heartbeat every few seconds).
const SILENCE_LIMIT: Duration = Duration::from_secs(15);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

pub struct Watcher {
    pub routes: Routes,
    pub connections: OpenConnections,
    pub store: Store,
    pub control: ControlClient,
}

impl Watcher {
    /// Runs until the process ends.
    pub async fn run(mut self) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let started = Instant::now();
            match self.follow().await {
                Ok(()) => tracing::info!("route stream ended; reconnecting"),
                Err(e) => tracing::warn!(error = %e, "route stream failed; reconnecting"),
            }
            metrics::counter!("opencloud_gateway_route_stream_reconnects_total").increment(1);
            if started.elapsed() > Duration::from_secs(30) {
                backoff = Duration::from_millis(100);
            }
            sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    async fn follow(&mut self) -> anyhow::Result<()> {
        let since = self.routes.load().version;
        let mut stream = self.control.watch_routes(since).await?;
        let mut pending: Vec<u8> = Vec::new();
        // Bytes of `pending` already searched for a newline: a snapshot line
        // can be hundreds of megabytes, so never scan it again per chunk.
        let mut scanned = 0;
        loop {
            let chunk = match timeout(SILENCE_LIMIT, stream.chunk()).await {
                Err(_) => anyhow::bail!("no data for {}s", SILENCE_LIMIT.as_secs()),
                Ok(chunk) => chunk?,
            };
            let Some(chunk) = chunk else { return Ok(()) };
            pending.extend_from_slice(&chunk);
            let mut start = 0;
            while let Some(offset) = pending[scanned..].iter().position(|b| *b == b'\n') {
                let end = scanned + offset;
                let line = &pending[start..end];
                scanned = end + 1;
                start = scanned;
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let message: Incoming = serde_json::from_slice(line)?;
                self.handle(message)?;
            }
            scanned = pending.len();
            pending.drain(..start);
            scanned -= start;
        }
    }

    fn handle(&mut self, message: Incoming) -> anyhow::Result<()> {
        let current = self.routes.current();
        let delta;
        let (next, changed) = match message {
            Incoming::Snapshot(table) => {
                if let Err(e) = self.store.save_snapshot(&table) {
                    tracing::error!(error = %e, "could not persist the route snapshot");
                }
                (table, Some(Changed::Everything))
            }
            Incoming::Delta(d) => {
                delta = d;
                if delta.version <= current.version {
                    return Ok(());
                }
                let table = current.apply(&delta)?;
                if let Err(e) = self.store.append(&delta, &table) {
                    tracing::error!(error = %e, "could not persist a route delta");
                }
                (table, Some(Changed::Only(&delta.changes)))
            }
            // Dropping expired revocations admits nothing new and ends nothing.
            Incoming::Heartbeat => match current.without_expired_revocations(unix_now()) {
                Some(table) => (table, None),
                None => {
                    mark_updated();
                    return Ok(());
                }
            },
        };
        self.routes.publish(next);
        // After publishing: see the race note in `connections`.
        if let Some(changed) = changed {
            self.connections.close_refused(&self.routes.load(), changed);
        }
        mark_updated();
        Ok(())
    }
}

/// Unix seconds of the last route update or heartbeat; 0 before the first.
static LAST_UPDATE: AtomicU64 = AtomicU64::new(0);

fn mark_updated() {
    let now = unix_now();
    LAST_UPDATE.store(now, Ordering::Relaxed);
    metrics::gauge!("opencloud_gateway_route_table_last_update_timestamp_seconds").set(now as f64);
}

/// When control's stream last changed or confirmed the table, if it has.
pub fn last_update() -> Option<u64> {
    Some(LAST_UPDATE.load(Ordering::Relaxed)).filter(|t| *t > 0)
}
