//! The route table control streams to the gateways: hosts, sessions and
//! revoked login sessions, as a snapshot and then versioned deltas.
//!
//! The wire form is newline-delimited JSON on
//! `GET /internal/v1/routes/watch?since=V`: one [`WatchMessage`] per line.
//! Versions are strictly increasing; a gateway applies a delta only when its
//! version is exactly one more than what it holds, and otherwise asks again
//! from the version it has.

use serde::{Deserialize, Serialize};

use crate::link::LinkKey;
pub use crate::sid::{is_valid_sid, new_sid, sid_from_bytes, sid_to_bytes, SID_LEN};

/// A route table version: the counter control bumps with each change.
pub type Version = u64;

/// Whether a host takes sessions, as control last saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostState {
    /// Heartbeating and taking new sessions.
    Online,
    /// Heartbeating, but the owner asked for no new sessions.
    Draining,
    /// No heartbeat for too long: its sessions are lost.
    Offline,
}

/// A host as the gateways need it: where to connect, how to prove who is
/// at the other end, and how to check it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRoute {
    pub id: u64,
    /// The advertised address, an IP the gateway can connect to.
    pub address: String,
    /// The host link's port on `address` (see [`crate::link`]).
    pub link_port: u16,
    /// The host's link key; `None` until its agent first registers.
    pub link_key: Option<LinkKey>,
    /// Full URL the gateway probes, e.g. `http://10.0.0.5:7000/healthz`.
    pub health_url: String,
    pub state: HostState,
}

impl std::fmt::Debug for HostRoute {
    // The link key never reaches logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostRoute")
            .field("id", &self.id)
            .field("address", &self.address)
            .field("link_port", &self.link_port)
            .field("health_url", &self.health_url)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

/// Where a session is in its life, as far as routing cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionState {
    /// Placed on a host; its server is not answering yet.
    Starting,
    /// Its server answers through its host's link.
    Running,
    /// The host went away; kept as a tombstone so users get a clear page.
    Lost,
    /// Ended on purpose; kept as a tombstone for a while.
    Stopped,
}

impl SessionState {
    /// True when requests may be forwarded to the upstream.
    pub fn is_live(self) -> bool {
        matches!(self, SessionState::Starting | SessionState::Running)
    }
}

/// One notebook session: who owns it and which host serves it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRoute {
    pub sid: String,
    pub owner: u64,
    pub host: u64,
    pub state: SessionState,
}

/// A revoked login session, carried until its tokens would have expired.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    pub login_session: String,
    /// Unix seconds after which the entry may be dropped.
    pub expires_at: u64,
}

/// One change to the table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Change {
    UpsertHost(HostRoute),
    RemoveHost { id: u64 },
    UpsertSession(SessionRoute),
    RemoveSession { sid: String },
    Revoke(Revocation),
}

/// The whole table at one version.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub version: Version,
    pub hosts: Vec<HostRoute>,
    pub sessions: Vec<SessionRoute>,
    pub revocations: Vec<Revocation>,
}

/// The changes that take the table from `version - 1` to `version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delta {
    pub version: Version,
    pub changes: Vec<Change>,
}

/// One line of the watch stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WatchMessage {
    Snapshot(Snapshot),
    Delta(Delta),
    /// Nothing changed; sent periodically so a dead stream is noticed.
    Heartbeat {
        version: Version,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watch_messages_round_trip_as_one_json_line() {
        let message = WatchMessage::Delta(Delta {
            version: 7,
            changes: vec![
                Change::UpsertSession(SessionRoute {
                    sid: new_sid(),
                    owner: 1,
                    host: 2,
                    state: SessionState::Running,
                }),
                Change::RemoveHost { id: 3 },
                Change::Revoke(Revocation {
                    login_session: "ls".into(),
                    expires_at: 10,
                }),
            ],
        });
        let line = serde_json::to_string(&message).unwrap();
        assert!(!line.contains('\n'));
        assert_eq!(
            serde_json::from_str::<WatchMessage>(&line).unwrap(),
            message
        );
    }

    #[test]
    fn debug_output_hides_the_link_key() {
        let key = LinkKey::generate();
        let route = HostRoute {
            id: 1,
            address: "10.0.0.5".into(),
            link_port: 7000,
            link_key: Some(key.clone()),
            health_url: "http://10.0.0.5:7000/healthz".into(),
            state: HostState::Online,
        };
        assert!(!format!("{route:?}").contains(key.expose()));
    }
}
