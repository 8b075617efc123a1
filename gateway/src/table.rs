//! The route table: one immutable value behind one `ArcSwap`. Readers load
//! it without locking; the watch task builds the next version off to the
//! side (persistent maps share structure, so a delta never copies the
//! table) and publishes it with one atomic swap.

use std::sync::Arc;

use arc_swap::ArcSwap;
use imbl::HashMap;
use opencloud_protocol::routes::{
    Change, Delta, HostRoute, Revocation, SessionRoute, Snapshot, Version,
};

#[derive(Clone, Debug, Default)]
pub struct RouteTable {
    pub version: Version,
    pub hosts: HashMap<u64, Arc<HostRoute>>,
    pub sessions: HashMap<String, Arc<SessionRoute>>,
    /// Revoked login session → when its tokens expire (Unix seconds).
    pub revocations: HashMap<String, u64>,
}

/// Why a delta could not be applied.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("delta {got} does not follow version {have}")]
pub struct OutOfOrder {
    pub have: Version,
    pub got: Version,
}

impl RouteTable {
    pub fn from_snapshot(snapshot: Snapshot) -> Self {
        Self {
            version: snapshot.version,
            hosts: snapshot
                .hosts
                .into_iter()
                .map(|h| (h.id, Arc::new(h)))
                .collect(),
            sessions: snapshot
                .sessions
                .into_iter()
                .map(|s| (s.sid.clone(), Arc::new(s)))
                .collect(),
            revocations: snapshot
                .revocations
                .into_iter()
                .map(|r| (r.login_session, r.expires_at))
                .collect(),
        }
    }

    pub fn to_snapshot(&self) -> Snapshot {
        Snapshot {
            version: self.version,
            hosts: self.hosts.values().map(|h| (**h).clone()).collect(),
            sessions: self.sessions.values().map(|s| (**s).clone()).collect(),
            revocations: self
                .revocations
                .iter()
                .map(|(login_session, expires_at)| Revocation {
                    login_session: login_session.clone(),
                    expires_at: *expires_at,
                })
                .collect(),
        }
    }

    /// The table after `delta`, which must be the very next version.
    pub fn apply(&self, delta: &Delta) -> Result<Self, OutOfOrder> {
        if delta.version != self.version + 1 {
            return Err(OutOfOrder {
                have: self.version,
                got: delta.version,
            });
        }
        let mut next = self.clone();
        next.version = delta.version;
        for change in &delta.changes {
            match change {
                Change::UpsertHost(host) => {
                    next.hosts.insert(host.id, Arc::new(host.clone()));
                }
                Change::RemoveHost { id } => {
                    next.hosts.remove(id);
                }
                Change::UpsertSession(session) => {
                    next.sessions
                        .insert(session.sid.clone(), Arc::new(session.clone()));
                }
                Change::RemoveSession { sid } => {
                    next.sessions.remove(sid);
                }
                Change::Revoke(r) => {
                    next.revocations
                        .insert(r.login_session.clone(), r.expires_at);
                }
            }
        }
        Ok(next)
    }

    pub fn is_revoked(&self, login_session: &str) -> bool {
        self.revocations.contains_key(login_session)
    }

    /// Drops revocations whose tokens have expired anyway.
    pub fn without_expired_revocations(&self, now: u64) -> Option<Self> {
        let expired: Vec<String> = self
            .revocations
            .iter()
            .filter(|(_, expires)| **expires <= now)
            .map(|(k, _)| k.clone())
            .collect();
        if expired.is_empty() {
            return None;
        }
        let mut next = self.clone();
        for key in expired {
            next.revocations.remove(&key);
        }
        Some(next)
    }
}

/// The shared handle: cheap to clone, lock-free to read.
#[derive(Clone, Default)]
pub struct Routes(Arc<ArcSwap<RouteTable>>);

impl Routes {
    pub fn new(table: RouteTable) -> Self {
        Self(Arc::new(ArcSwap::from_pointee(table)))
    }

    pub fn load(&self) -> arc_swap::Guard<Arc<RouteTable>> {
        self.0.load()
    }

    pub fn current(&self) -> Arc<RouteTable> {
        self.0.load_full()
    }

    pub fn publish(&self, table: RouteTable) {
        metrics::gauge!("opencloud_gateway_route_table_version").set(table.version as f64);
        metrics::gauge!("opencloud_gateway_route_table_sessions").set(table.sessions.len() as f64);
        metrics::gauge!("opencloud_gateway_route_table_hosts").set(table.hosts.len() as f64);
        self.0.store(Arc::new(table));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opencloud_protocol::routes::{HostState, SessionState};

    fn session(sid: &str, state: SessionState) -> SessionRoute {
        SessionRoute {
            sid: sid.into(),
            owner: 1,
            host: 1,
            port: 9000,
            upstream_token: "t".into(),
            state,
        }
    }

    #[test]
    fn deltas_apply_in_order_and_leave_the_old_table_untouched() {
        let base = RouteTable::default();
        let one = base
            .apply(&Delta {
                version: 1,
                changes: vec![
                    Change::UpsertHost(HostRoute {
                        id: 1,
                        address: "127.0.0.1".into(),
                        health_url: "http://127.0.0.1:1/".into(),
                        state: HostState::Online,
                    }),
                    Change::UpsertSession(session("s1", SessionState::Running)),
                ],
            })
            .unwrap();
        assert_eq!(one.sessions.len(), 1);
        assert!(base.sessions.is_empty(), "the old table is unchanged");
        let two = one
            .apply(&Delta {
                version: 2,
                changes: vec![
                    Change::UpsertSession(session("s1", SessionState::Lost)),
                    Change::Revoke(Revocation {
                        login_session: "ls".into(),
                        expires_at: 100,
                    }),
                ],
            })
            .unwrap();
        assert_eq!(two.sessions["s1"].state, SessionState::Lost);
        assert!(two.is_revoked("ls"));
        assert_eq!(
            two.apply(&Delta {
                version: 4,
                changes: vec![]
            })
            .unwrap_err(),
            OutOfOrder { have: 2, got: 4 }
        );
        assert!(two
            .without_expired_revocations(100)
            .unwrap()
            .revocations
            .is_empty());
        assert!(two.without_expired_revocations(99).is_none());
    }

    #[test]
    fn snapshots_round_trip() {
        let table = RouteTable::default()
            .apply(&Delta {
                version: 1,
                changes: vec![Change::UpsertSession(session("s1", SessionState::Running))],
            })
            .unwrap();
        let back = RouteTable::from_snapshot(table.to_snapshot());
        assert_eq!(back.version, 1);
        assert_eq!(back.sessions["s1"].port, 9000);
    }
}
