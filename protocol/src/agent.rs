//! What a host agent and control say to each other, on control's public
//! listener under `/agent/v1/`. Every call carries the host's key as
//! `Authorization: HostKey <key>`; control stores only its SHA-256 digest.
//!
//! The conversation:
//! 1. `POST /agent/v1/register` with [`AgentHello`] → [`Registered`]. A wrong
//!    key gets 401 with code `host_key_invalid`, a revoked one 403 with code
//!    `host_key_revoked` (the agent then exits with status 2).
//! 2. `POST /agent/v1/heartbeat` with [`Heartbeat`] every
//!    [`Registered::heartbeat_ms`] → [`HeartbeatReply`]. Control marks a host
//!    offline after [`HOST_LOST_AFTER_MS`] without one.
//! 3. `GET /agent/v1/commands?after=ID` long-polls (up to
//!    [`COMMAND_POLL_SECONDS`]) for [`CommandBatch`]: commands with an id
//!    above `after`, oldest first. Commands are idempotent: starting a session
//!    the agent already runs reports it ready again; stopping one it does not
//!    know reports it stopped.
//! 4. `POST /agent/v1/events` with [`AgentEvent`] when a session becomes
//!    ready, fails to start, exits by itself, or has stopped.
//! 5. `POST /agent/v1/link-certificate` with a
//!    [`CertificateRequest`](crate::link::CertificateRequest) when the host
//!    link's certificate nears its end → a new
//!    [`LinkCertificate`](crate::link::LinkCertificate).

use serde::{Deserialize, Serialize};

use crate::link::LinkCertificate;

/// The `Authorization` scheme agents use.
pub const HOST_KEY_SCHEME: &str = "HostKey";
/// How often agents send heartbeats.
pub const HEARTBEAT_MS: u64 = 2_000;
/// A host with no heartbeat for this long is offline and its sessions lost.
pub const HOST_LOST_AFTER_MS: u64 = 6_000;
/// How long one `GET /agent/v1/commands` waits for something to do.
pub const COMMAND_POLL_SECONDS: u64 = 25;
/// Error code control answers with for a host key it does not know (401).
pub const HOST_KEY_INVALID: &str = "host_key_invalid";
/// Error code control answers with for a revoked host key (403).
pub const HOST_KEY_REVOKED: &str = "host_key_revoked";

/// What a host offers. Placement never puts more sessions on a host than
/// `max_sessions`; cgroup limits give each session its share of the rest.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Capacity {
    pub max_sessions: u32,
    pub cpu_cores: f32,
    pub memory_mib: u64,
}

/// How much of the machine is in use, measured by the agent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Load {
    /// Whole machine, 0–100.
    pub cpu_percent: f32,
    pub memory_used_mib: u64,
    pub memory_total_mib: u64,
    /// Free space where the agent keeps project directories.
    pub disk_free_mib: u64,
}

/// A Jupyter server's state as its agent sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentSessionState {
    /// Jupyter launched, `/api/status` not answering yet.
    Starting,
    Running,
    /// SIGTERM sent, waiting for the process group to exit.
    Stopping,
}

/// One Jupyter server the agent runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSession {
    pub sid: String,
    pub state: AgentSessionState,
    /// Unix seconds.
    pub started_at: u64,
    /// Jupyter's own idea of its last activity (`/api/status`), unix seconds.
    pub last_activity: Option<u64>,
    /// Kernels currently executing code.
    pub busy_kernels: u32,
}

/// `POST /agent/v1/register`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentHello {
    /// The agent's version.
    pub version: String,
    /// An IP address the gateways can connect to.
    pub address: String,
    /// The host link's port on `address`: every session of the host is
    /// reached through it (see [`crate::link`]), and it answers `/healthz`.
    pub link_port: u16,
    pub capacity: Capacity,
    /// Whether each session's memory and CPU are limited with cgroup v2.
    pub cgroup_limits: bool,
    /// Servers the agent found still running from before a restart and kept.
    pub sessions: Vec<AgentSession>,
    /// A certificate request (PEM) for the host link's key, which never
    /// leaves the host; see [`crate::link`].
    pub link_csr: String,
}

/// Control's answer to a registration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registered {
    pub host_id: u64,
    pub name: String,
    pub heartbeat_ms: u64,
    /// Sessions from the hello that control no longer wants: stop them.
    pub stop: Vec<String>,
    /// The host link's certificate, issued now for this host id (each
    /// registration issues a new one), and the CA gateways' certificates
    /// come from.
    pub link_certificate: LinkCertificate,
}

/// `POST /agent/v1/heartbeat`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    pub version: String,
    pub load: Load,
    pub sessions: Vec<AgentSession>,
    /// Warm servers started and ready to be bound to the next session
    /// (see `warm_pool` in the agent's config). Placement prefers hosts
    /// that have one.
    #[serde(default)]
    pub warm_servers: u32,
}

/// Control's answer to a heartbeat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatReply {
    /// The owner asked for no new sessions on this host.
    pub draining: bool,
    /// Sessions the agent reported that control considers ended: stop them.
    pub stop: Vec<String>,
}

/// Start one Jupyter server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartSession {
    pub sid: String,
    pub project_id: u64,
    /// This session's share of the host, applied with cgroup v2 where present.
    pub memory_limit_mib: u64,
    pub cpu_limit_cores: f32,
}

/// What a command asks the agent to do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    Start(StartSession),
    /// SIGTERM the server's process group, SIGKILL after `grace_ms`.
    Stop {
        sid: String,
        grace_ms: u64,
    },
    /// Push the running session's files now (the owner asked to save).
    Save {
        sid: String,
    },
}

/// One command for an agent, numbered so the agent asks only for newer ones.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Command {
    pub id: u64,
    #[serde(flatten)]
    pub action: Action,
}

/// Answer to `GET /agent/v1/commands?after=ID`; empty when the poll timed out.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandBatch {
    pub commands: Vec<Command>,
}

/// `POST /agent/v1/events`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case", deny_unknown_fields)]
pub enum AgentEvent {
    /// `/api/status` answered on the session's socket. `warm` when the
    /// session was bound to a server from the warm pool (no cold start).
    Ready {
        sid: String,
        spawn_ms: u64,
        #[serde(default)]
        warm: bool,
    },
    /// The server could not be started (or exited before it was ready).
    Failed {
        sid: String,
        reason: String,
        exit_code: Option<i32>,
        log_tail: String,
    },
    /// A running server exited without being asked to.
    Exited {
        sid: String,
        exit_code: Option<i32>,
        log_tail: String,
    },
    /// Stopped on command; its processes are gone and its port is free.
    Stopped { sid: String },
    /// The session runs on, but the kernel OOM killer stopped one of its
    /// processes (a kernel that outgrew the session's memory); `reason` is
    /// a sentence for the session's owner.
    KernelKilled { sid: String, reason: String },
}

impl AgentEvent {
    /// The session the event is about.
    pub fn sid(&self) -> &str {
        match self {
            AgentEvent::Ready { sid, .. }
            | AgentEvent::Failed { sid, .. }
            | AgentEvent::Exited { sid, .. }
            | AgentEvent::Stopped { sid }
            | AgentEvent::KernelKilled { sid, .. } => sid,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_flat_json() {
        let command = Command {
            id: 7,
            action: Action::Stop {
                sid: "abc".into(),
                grace_ms: 5000,
            },
        };
        let json = serde_json::to_string(&command).unwrap();
        assert_eq!(
            json,
            r#"{"id":7,"action":"stop","sid":"abc","grace_ms":5000}"#
        );
        assert_eq!(serde_json::from_str::<Command>(&json).unwrap(), command);
    }

    #[test]
    fn registrations_carry_the_link_certificate_and_log_only_its_dates() {
        let registered = Registered {
            host_id: 1,
            name: "a".into(),
            heartbeat_ms: 2000,
            stop: Vec::new(),
            link_certificate: LinkCertificate {
                certificate: "-----BEGIN CERTIFICATE-----leaf".into(),
                ca: "-----BEGIN CERTIFICATE-----ca".into(),
                not_before: 10,
                not_after: 20,
            },
        };
        let json = serde_json::to_string(&registered).unwrap();
        assert_eq!(
            serde_json::from_str::<Registered>(&json).unwrap(),
            registered
        );
        let logged = format!("{registered:?}");
        assert!(!logged.contains("BEGIN"), "{logged}");
        assert!(logged.contains("not_after: 20"), "{logged}");
    }

    #[test]
    fn events_name_their_kind() {
        let event = AgentEvent::Ready {
            sid: "abc".into(),
            spawn_ms: 1500,
            warm: false,
        };
        let json = serde_json::to_string(&event).unwrap();
        assert!(json.starts_with(r#"{"event":"ready""#), "{json}");
        assert_eq!(event.sid(), "abc");
    }
}
