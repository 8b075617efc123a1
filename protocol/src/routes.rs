//! The route table control streams to the gateways: hosts, sessions and
//! revoked login sessions, as a snapshot and then versioned deltas.
//!
//! The wire form is newline-delimited JSON on
//! `GET /internal/v1/routes/watch?since=V`: one [`WatchMessage`] per line.
//! Versions are strictly increasing; a gateway applies a delta only when its
//! version is exactly one more than what it holds, and otherwise asks again
//! from the version it has.

use serde::{Deserialize, Serialize};

use crate::link::CertFingerprint;
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRoute {
    pub id: u64,
    /// The advertised address, an IP the gateway can connect to.
    pub address: String,
    /// The host link's port on `address` (see [`crate::link`]).
    pub link_port: u16,
    /// The SHA-256 of the host link certificate control last issued to the
    /// host: gateways accept no other. `None` until its agent registers, and
    /// again once its HostKey is rotated or revoked.
    pub link_cert_sha256: Option<CertFingerprint>,
    /// Full URL the gateway probes, e.g. `http://10.0.0.5:7000/healthz`.
    pub health_url: String,
    pub state: HostState,
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
    fn a_host_route_from_before_link_certificates_reads_without_a_pin() {
        // Route files and the route log of the HMAC release carry a link
        // key: it is ignored, and the host gets no traffic until it
        // registers again and has a certificate.
        let old = r#"{"id":1,"address":"10.0.0.5","link_port":7000,"link_key":"00","health_url":"http://10.0.0.5:7000/healthz","state":"online"}"#;
        let route: HostRoute = serde_json::from_str(old).unwrap();
        assert_eq!(route.link_cert_sha256, None);
        let pinned = HostRoute {
            link_cert_sha256: Some(crate::link::CertFingerprint::of(b"leaf")),
            ..route
        };
        let json = serde_json::to_string(&pinned).unwrap();
        assert_eq!(serde_json::from_str::<HostRoute>(&json).unwrap(), pinned);
    }
}
