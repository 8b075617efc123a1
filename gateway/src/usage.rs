//! Per-session usage seen by this gateway (last activity, bytes in and
//! out), collected on the request path into a small map and sent to control
//! in batches, so idle culling and metering need no call per request.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use opencloud_protocol::reports::{SessionUsage, UsageReport};

use crate::control_client::ControlClient;
use crate::fast_map::FastMap;
use crate::table::SessionKey;

pub const FLUSH_INTERVAL: Duration = Duration::from_secs(5);

/// What the request path adds up per session between two reports.
#[derive(Debug, Clone, Copy, Default)]
struct Tally {
    last_activity: u64,
    bytes_in: u64,
    bytes_out: u64,
}

#[derive(Clone, Default)]
pub struct UsageBook(Arc<Mutex<FastMap<SessionKey, Tally>>>);

impl UsageBook {
    pub fn record(&self, sid: SessionKey, now: u64, bytes_in: u64, bytes_out: u64) {
        let mut book = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let tally = book.entry(sid).or_default();
        tally.last_activity = tally.last_activity.max(now);
        tally.bytes_in += bytes_in;
        tally.bytes_out += bytes_out;
    }

    /// Takes everything recorded since the last call.
    pub fn drain(&self) -> Vec<SessionUsage> {
        let drained = std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()));
        drained
            .into_iter()
            .map(|(sid, tally)| SessionUsage {
                sid: sid.sid(),
                last_activity: tally.last_activity,
                bytes_in: tally.bytes_in,
                bytes_out: tally.bytes_out,
            })
            .collect()
    }

    /// Puts back a batch that could not be delivered.
    fn restore(&self, batch: Vec<SessionUsage>) {
        for usage in batch {
            if let Some(sid) = SessionKey::parse(&usage.sid) {
                self.record(sid, usage.last_activity, usage.bytes_in, usage.bytes_out);
            }
        }
    }
}

pub struct UsageReporter {
    pub book: UsageBook,
    pub control: ControlClient,
}

impl UsageReporter {
    pub async fn run(self) {
        let mut ticker = tokio::time::interval(FLUSH_INTERVAL);
        loop {
            ticker.tick().await;
            let report = UsageReport {
                sessions: self.book.drain(),
            };
            if report.sessions.is_empty() {
                continue;
            }
            if self.control.report_usage(&report).await.is_err() {
                // Kept for the next round: usage is never lost to a blip.
                self.book.restore(report.sessions);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opencloud_protocol::routes::new_sid;

    #[test]
    fn usage_adds_up_per_session_and_drains() {
        let book = UsageBook::default();
        let (a, b) = (new_sid(), new_sid());
        let key = |sid: &str| SessionKey::parse(sid).unwrap();
        book.record(key(&a), 10, 100, 1000);
        book.record(key(&a), 5, 1, 2);
        book.record(key(&b), 7, 0, 0);
        let mut batch = book.drain();
        batch.sort_by_key(|u| u.sid != a);
        assert_eq!(
            batch[0],
            SessionUsage {
                sid: a.clone(),
                last_activity: 10,
                bytes_in: 101,
                bytes_out: 1002
            }
        );
        assert!(book.drain().is_empty());
        book.restore(batch);
        assert_eq!(book.drain().len(), 2);
    }
}
