//! The requests on session origins that are under way, and what admitted
//! each: so that a route table change that would refuse a new request also
//! ends the ones already open (a kernel WebSocket, a long download) within
//! the time the change takes to arrive, not when the client next hangs up.
//!
//! Rule: a request stays open only while [`refusal`] finds nothing against
//! it in the current table, the same checks `proxy` makes before letting a
//! request through (login session not revoked, session live and still the
//! user's, host known and not offline). The indexes only narrow down which
//! requests a change can touch; the decision is always [`refusal`].
//!
//! Ending one: `shutdown(2)` of the upstream socket. Pingora's proxy loop
//! then reads the end of the upstream and closes the client's side itself,
//! for HTTP/1 and upgraded requests alike. The registry keeps the socket's
//! descriptor number and its inode, and shuts the descriptor only while it
//! still names that inode: Pingora may have closed it (the request ends a
//! moment before it leaves the registry) and the number gone to another
//! connection, which must never be touched.
//!
//! Race: a request checked against the old table may connect after the
//! closer looked. The closer publishes the table before it looks, and a new
//! request registers before it checks the current table again (both under
//! the registry's lock), so one of the two always sees the other.

use std::hash::{BuildHasher, Hash};
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex, MutexGuard};

use nix::sys::socket::{shutdown, Shutdown};
use opencloud_protocol::metrics::LabelValue;
use opencloud_protocol::routes::{Change, HostState};
use opencloud_protocol::token::Claims;

use crate::fast_map::FastMap;
use crate::table::{RouteTable, Routes, SessionKey};

/// What admitted a request to a session's upstream.
#[derive(Clone, Debug)]
pub struct Admission {
    /// The verified cookie or token: user and login session.
    pub claims: Arc<Claims>,
    pub sid: SessionKey,
    pub host: u64,
}

/// Why an open request was ended; the metric's `reason` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Logout, password change, disabled user: the login session is revoked.
    LoginRevoked,
    /// The session stopped, was lost, or is gone from the table.
    SessionEnded,
    /// The host was removed, revoked or went offline.
    HostGone,
}

impl LabelValue for Reason {
    const ALL: &'static [Self] = &[Reason::LoginRevoked, Reason::SessionEnded, Reason::HostGone];
    fn label(self) -> &'static str {
        match self {
            Reason::LoginRevoked => "login_revoked",
            Reason::SessionEnded => "session_ended",
            Reason::HostGone => "host_gone",
        }
    }
}

/// Open requests closed because the table stopped admitting them, by [`Reason`].
pub const CONNECTIONS_CLOSED: &str = "opencloud_gateway_connections_closed_total";

/// Why `table` would refuse the request `admission` let in, if it would.
pub fn refusal(table: &RouteTable, admission: &Admission) -> Option<Reason> {
    if table.is_revoked(&admission.claims.login_session) {
        return Some(Reason::LoginRevoked);
    }
    let session_live = table.sessions.get(&admission.sid).is_some_and(|s| {
        s.owner == admission.claims.user_id && s.host == admission.host && s.state.is_live()
    });
    if !session_live {
        return Some(Reason::SessionEnded);
    }
    let host_up = table
        .hosts
        .get(&admission.host)
        .is_some_and(|h| h.route.state != HostState::Offline);
    (!host_up).then_some(Reason::HostGone)
}

/// Which part of the table changed.
pub enum Changed<'a> {
    /// A snapshot replaced it: every open request is checked.
    Everything,
    Only(&'a [Change]),
}

/// The registry; cheap to clone.
#[derive(Clone, Default)]
pub struct OpenConnections(Arc<Mutex<Registry>>);

/// Keeps a request in the registry; dropping it (at the latest when the
/// request's context goes) takes the request out.
#[derive(Debug)]
pub struct Registration {
    id: u64,
    book: OpenConnections,
}

impl std::fmt::Debug for OpenConnections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OpenConnections")
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.book.lock().remove(self.id);
    }
}

/// The request's upstream connection did not survive its registration.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error("the upstream connection is not an open socket")]
    NotASocket,
    #[error("the request was refused while it connected: {}", .0.label())]
    Refused(Reason),
}

impl OpenConnections {
    fn lock(&self) -> MutexGuard<'_, Registry> {
        // Every change is complete before the lock is let go.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers the request on the upstream socket `fd`, then checks it
    /// against the table now in `routes` (see the module's race note).
    pub fn register(
        &self,
        fd: RawFd,
        admission: Admission,
        routes: &Routes,
    ) -> Result<Registration, RegisterError> {
        // Pingora keeps `fd` open for the whole call: this is its inode.
        let inode = socket_inode(fd).ok_or(RegisterError::NotASocket)?;
        let id = self.lock().insert(Entry {
            admission,
            fd,
            inode,
        });
        let registration = Registration {
            id,
            book: self.clone(),
        };
        let table = routes.load();
        let registry = self.lock();
        if let Some(entry) = registry.entries.get(&id) {
            if let Some(reason) = refusal(&table, &entry.admission) {
                end(entry, reason);
                return Err(RegisterError::Refused(reason));
            }
        }
        Ok(registration)
    }

    /// Ends every open request the just-published `table` would refuse,
    /// among those `changed` can touch. Returns how many it ended.
    pub fn close_refused(&self, table: &RouteTable, changed: Changed<'_>) -> usize {
        let registry = self.lock();
        let candidates: Vec<u64> = match changed {
            Changed::Everything => registry.entries.keys().copied().collect(),
            Changed::Only(changes) => {
                let mut ids = Vec::new();
                for change in changes {
                    let found = match change {
                        Change::Revoke(r) => registry.by_login.get(&login_key(&r.login_session)),
                        Change::UpsertSession(s) => {
                            SessionKey::parse(&s.sid).and_then(|key| registry.by_sid.get(&key))
                        }
                        Change::RemoveSession { sid } => {
                            SessionKey::parse(sid).and_then(|key| registry.by_sid.get(&key))
                        }
                        Change::UpsertHost(h) => registry.by_host.get(&h.id),
                        Change::RemoveHost { id } => registry.by_host.get(id),
                    };
                    ids.extend_from_slice(found.unwrap_or_default());
                }
                ids.sort_unstable();
                ids.dedup();
                ids
            }
        };
        candidates
            .iter()
            .filter_map(|id| registry.entries.get(id))
            .filter_map(|entry| Some((entry, refusal(table, &entry.admission)?)))
            .filter(|(entry, reason)| end(entry, *reason))
            .count()
    }

    /// Requests open now.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Shuts the request's upstream socket both ways (the proxy does the rest)
/// if its descriptor is still that socket's; whether it did.
fn end(entry: &Entry, reason: Reason) -> bool {
    if socket_inode(entry.fd) != Some(entry.inode) {
        // Closed already: the request is ending on its own.
        return false;
    }
    // Already shut (by the upstream or an earlier change) is fine.
    let _ = shutdown(entry.fd, Shutdown::Both);
    metrics::counter!(CONNECTIONS_CLOSED, "reason" => reason.label()).increment(1);
    tracing::info!(
        sid = %entry.admission.sid,
        user = entry.admission.claims.user_id,
        reason = reason.label(),
        "closed an open request the route table no longer admits"
    );
    true
}

struct Entry {
    admission: Admission,
    fd: RawFd,
    inode: u64,
}

/// The inode of the socket `fd` names in this process, as `fstat` would
/// give it (read from `/proc`, which needs no unsafe code).
fn socket_inode(fd: RawFd) -> Option<u64> {
    let link = std::fs::read_link(format!("/proc/self/fd/{fd}")).ok()?;
    link.to_str()?
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// The login index is keyed by a hash of the login session: no string is
/// copied per request, and a collision only adds a candidate that
/// [`refusal`] then lets be.
fn login_key(login_session: &str) -> u64 {
    foldhash::fast::FixedState::default().hash_one(login_session)
}

#[derive(Default)]
struct Registry {
    next_id: u64,
    entries: FastMap<u64, Entry>,
    by_sid: Index<SessionKey>,
    by_login: Index<u64>,
    by_host: Index<u64>,
}

impl Registry {
    fn insert(&mut self, entry: Entry) -> u64 {
        self.next_id += 1;
        let id = self.next_id;
        let admission = &entry.admission;
        self.by_sid.add(admission.sid, id);
        self.by_login
            .add(login_key(&admission.claims.login_session), id);
        self.by_host.add(admission.host, id);
        self.entries.insert(id, entry);
        id
    }

    fn remove(&mut self, id: u64) {
        if let Some(entry) = self.entries.remove(&id) {
            let admission = &entry.admission;
            self.by_sid.remove(&admission.sid, id);
            self.by_login
                .remove(&login_key(&admission.claims.login_session), id);
            self.by_host.remove(&admission.host, id);
        }
    }
}

/// Request ids by one key; a key usually has one or two.
struct Index<K>(FastMap<K, Vec<u64>>);

impl<K> Default for Index<K> {
    fn default() -> Self {
        Self(FastMap::default())
    }
}

impl<K: Hash + Eq> Index<K> {
    fn add(&mut self, key: K, id: u64) {
        self.0.entry(key).or_default().push(id);
    }

    fn remove(&mut self, key: &K, id: u64) {
        if let Some(ids) = self.0.get_mut(key) {
            ids.retain(|i| *i != id);
            if ids.is_empty() {
                self.0.remove(key);
            }
        }
    }

    fn get(&self, key: &K) -> Option<&[u64]> {
        self.0.get(key).map(Vec::as_slice)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opencloud_protocol::routes::{
        new_sid, Delta, HostRoute, Revocation, SessionRoute, SessionState,
    };
    use std::io::Read;
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::{AsRawFd, OwnedFd};

    fn host(id: u64, state: HostState) -> HostRoute {
        HostRoute {
            id,
            address: "127.0.0.1".into(),
            link_port: 1,
            link_cert_sha256: None,
            health_url: "http://127.0.0.1:1/healthz".into(),
            state,
        }
    }

    fn session(sid: &str, owner: u64, host: u64, state: SessionState) -> SessionRoute {
        SessionRoute {
            sid: sid.into(),
            owner,
            host,
            state,
        }
    }

    /// A table at version 1 with hosts 1 and 2 and the given sessions.
    fn table(sessions: &[SessionRoute]) -> RouteTable {
        let mut changes = vec![
            Change::UpsertHost(host(1, HostState::Online)),
            Change::UpsertHost(host(2, HostState::Online)),
        ];
        changes.extend(sessions.iter().cloned().map(Change::UpsertSession));
        RouteTable::default()
            .apply(&Delta {
                version: 1,
                changes,
            })
            .unwrap()
    }

    fn admission(user: u64, login_session: &str, sid: &str, host: u64) -> Admission {
        let mut claims = Claims::platform(user, login_session, 100);
        claims.sid = Some(sid.into());
        Admission {
            claims: Arc::new(claims),
            sid: SessionKey::parse(sid).unwrap(),
            host,
        }
    }

    /// A connected socket pair: the gateway's end and the upstream's.
    fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let ours = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (theirs, _) = listener.accept().unwrap();
        (ours, theirs)
    }

    /// Whether the upstream's end saw the connection end (EOF).
    fn was_shut(theirs: &mut TcpStream) -> bool {
        theirs.set_nonblocking(true).unwrap();
        matches!(theirs.read(&mut [0u8; 1]), Ok(0))
    }

    #[test]
    fn refusal_follows_the_request_paths_rules() {
        let sid = new_sid();
        let t = table(&[session(&sid, 7, 1, SessionState::Running)]);
        assert_eq!(refusal(&t, &admission(7, "ls", &sid, 1)), None);
        assert_eq!(
            refusal(&t, &admission(8, "ls", &sid, 1)),
            Some(Reason::SessionEnded),
            "someone else's session"
        );
        let next = |changes| {
            t.apply(&Delta {
                version: 2,
                changes,
            })
            .unwrap()
        };
        let revoked = next(vec![Change::Revoke(Revocation {
            login_session: "ls".into(),
            expires_at: u64::MAX,
        })]);
        assert_eq!(
            refusal(&revoked, &admission(7, "ls", &sid, 1)),
            Some(Reason::LoginRevoked)
        );
        assert_eq!(refusal(&revoked, &admission(7, "other", &sid, 1)), None);
        for state in [SessionState::Stopped, SessionState::Lost] {
            let ended = next(vec![Change::UpsertSession(session(&sid, 7, 1, state))]);
            assert_eq!(
                refusal(&ended, &admission(7, "ls", &sid, 1)),
                Some(Reason::SessionEnded)
            );
        }
        let removed = next(vec![Change::RemoveSession { sid: sid.clone() }]);
        assert_eq!(
            refusal(&removed, &admission(7, "ls", &sid, 1)),
            Some(Reason::SessionEnded)
        );
        let offline = next(vec![Change::UpsertHost(host(1, HostState::Offline))]);
        assert_eq!(
            refusal(&offline, &admission(7, "ls", &sid, 1)),
            Some(Reason::HostGone)
        );
        let gone = next(vec![Change::RemoveHost { id: 1 }]);
        assert_eq!(
            refusal(&gone, &admission(7, "ls", &sid, 1)),
            Some(Reason::HostGone)
        );
        let draining = next(vec![Change::UpsertHost(host(1, HostState::Draining))]);
        assert_eq!(refusal(&draining, &admission(7, "ls", &sid, 1)), None);
    }

    #[test]
    fn a_change_shuts_exactly_the_requests_it_refuses() {
        let (mine, other) = (new_sid(), new_sid());
        let t = table(&[
            session(&mine, 7, 1, SessionState::Running),
            session(&other, 8, 2, SessionState::Running),
        ]);
        let routes = Routes::new(t.clone());
        let book = OpenConnections::default();
        let (a, mut a_up) = pair();
        let (b, mut b_up) = pair();
        let (c, mut c_up) = pair();
        let _a = book
            .register(a.as_raw_fd(), admission(7, "alice-1", &mine, 1), &routes)
            .unwrap();
        let _b = book
            .register(b.as_raw_fd(), admission(7, "alice-2", &mine, 1), &routes)
            .unwrap();
        let _c = book
            .register(c.as_raw_fd(), admission(8, "bob", &other, 2), &routes)
            .unwrap();
        assert_eq!(book.len(), 3);

        // Alice logs out of one browser: only that browser's request ends.
        let changes = vec![Change::Revoke(Revocation {
            login_session: "alice-1".into(),
            expires_at: u64::MAX,
        })];
        let next = t
            .apply(&Delta {
                version: 2,
                changes: changes.clone(),
            })
            .unwrap();
        routes.publish(next.clone());
        assert_eq!(book.close_refused(&next, Changed::Only(&changes)), 1);
        assert!(was_shut(&mut a_up));
        assert!(!was_shut(&mut b_up) && !was_shut(&mut c_up));

        // Her session stops: her other request ends, Bob's goes on.
        let changes = vec![Change::UpsertSession(session(
            &mine,
            7,
            1,
            SessionState::Stopped,
        ))];
        let next = next
            .apply(&Delta {
                version: 3,
                changes: changes.clone(),
            })
            .unwrap();
        routes.publish(next.clone());
        assert_eq!(book.close_refused(&next, Changed::Only(&changes)), 2);
        assert!(was_shut(&mut b_up));
        assert!(!was_shut(&mut c_up));

        // A snapshot without Bob's host: checked in full.
        let snapshot = table(&[]);
        assert_eq!(book.close_refused(&snapshot, Changed::Everything), 3);
        assert!(was_shut(&mut c_up));
    }

    #[test]
    fn a_request_refused_while_it_connects_is_shut_and_ended_requests_leave() {
        let sid = new_sid();
        let t = table(&[session(&sid, 7, 1, SessionState::Running)]);
        let routes = Routes::new(t.clone());
        let book = OpenConnections::default();
        let (a, mut a_up) = pair();
        let kept = book
            .register(a.as_raw_fd(), admission(7, "ls", &sid, 1), &routes)
            .unwrap();
        drop(kept);
        assert!(book.is_empty(), "a finished request leaves the registry");
        assert!(!was_shut(&mut a_up), "and its connection is left alone");

        routes.publish(
            t.apply(&Delta {
                version: 2,
                changes: vec![Change::RemoveHost { id: 1 }],
            })
            .unwrap(),
        );
        let refused = book.register(a.as_raw_fd(), admission(7, "ls", &sid, 1), &routes);
        assert!(matches!(
            refused,
            Err(RegisterError::Refused(Reason::HostGone))
        ));
        assert!(was_shut(&mut a_up));
        assert!(book.is_empty());
    }

    #[test]
    fn a_descriptor_number_reused_by_another_socket_is_never_shut() {
        let sid = new_sid();
        let t = table(&[session(&sid, 7, 1, SessionState::Running)]);
        let routes = Routes::new(t.clone());
        let book = OpenConnections::default();
        let (a, _a_up) = pair();
        let number = a.as_raw_fd();
        let _registered = book
            .register(number, admission(7, "ls", &sid, 1), &routes)
            .unwrap();
        // Pingora closes the request's socket before the request leaves the
        // registry, and the number goes to the next connection. dup2 makes
        // that happen here for sure: waiting for the kernel to hand the
        // number out again races with the other tests' sockets.
        let mut reused = OwnedFd::from(a);
        let (other, mut other_up) = pair();
        nix::unistd::dup2(&other, &mut reused).unwrap();
        assert_eq!(reused.as_raw_fd(), number);
        let changes = vec![Change::RemoveSession { sid }];
        let next = t
            .apply(&Delta {
                version: 2,
                changes: changes.clone(),
            })
            .unwrap();
        assert_eq!(book.close_refused(&next, Changed::Only(&changes)), 0);
        assert!(!was_shut(&mut other_up));
        drop((reused, other));
    }
}
