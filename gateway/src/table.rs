//! The route table: one immutable value behind one `ArcSwap`. Readers load
//! it without locking; the watch task builds the next version off to the
//! side (persistent maps share structure, so a delta never copies the
//! table) and publishes it with one atomic swap.
//!
//! Sessions are kept compact, since a gateway holds up to a million: the
//! key is the 16 bytes the sid encodes and the entry is inline (no `String`,
//! no `Arc`).
//! Snapshots are read and written as streams, never as one big `Vec`.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use arc_swap::ArcSwap;
/// A persistent map with a fast seeded hash (keys come from control).
type HashMap<K, V> =
    imbl::GenericHashMap<K, V, foldhash::fast::RandomState, imbl::shared_ptr::DefaultSharedPtr>;
use opencloud_protocol::link::CertFingerprint;
use opencloud_protocol::routes::{
    sid_from_bytes, sid_to_bytes, Change, Delta, HostRoute, Revocation, SessionRoute, SessionState,
    Snapshot, Version,
};
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::ser::SerializeStruct;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A session, keyed by the 16 bytes of its sid.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SessionKey([u8; 16]);

impl SessionKey {
    /// `None` for anything that is not a sid control could have made.
    pub fn parse(sid: impl AsRef<[u8]>) -> Option<Self> {
        sid_to_bytes(sid.as_ref()).map(Self)
    }

    pub fn sid(&self) -> String {
        sid_from_bytes(self.0)
    }

    /// The upstream connection pool group of this session's connections
    /// (128 random bits, so any 64 of them keep sessions apart).
    pub fn pool_group(&self) -> u64 {
        let [a, b, c, d, e, f, g, h, ..] = self.0;
        u64::from_le_bytes([a, b, c, d, e, f, g, h])
    }
}

impl fmt::Display for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.sid())
    }
}

impl fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionKey({self})")
    }
}

/// What the request path needs of a session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionEntry {
    pub owner: u64,
    pub host: u64,
    pub state: SessionState,
}

impl SessionEntry {
    fn from_route(route: &SessionRoute) -> Self {
        Self {
            owner: route.owner,
            host: route.host,
            state: route.state,
        }
    }
}

/// Where a host's link answers and the certificate it must present.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostLink {
    pub addr: SocketAddr,
    pub pinned: CertFingerprint,
    /// Set apart by pinned certificate, so connections to a certificate
    /// control has since replaced are never taken from the pool again.
    pub pool_tag: u64,
}

/// 64 bits of the fingerprint (a SHA-256: any 64 of its bits will do).
fn pin_tag(pinned: &CertFingerprint) -> u64 {
    let [a, b, c, d, e, f, g, h, ..] = *pinned.as_bytes();
    u64::from_le_bytes([a, b, c, d, e, f, g, h])
}

/// A host and its link, parsed once rather than per request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostEntry {
    pub route: HostRoute,
    /// `None` when the advertised address is not an IP or the host has no
    /// link certificate (yet, or any more): nothing is sent there.
    pub link: Option<HostLink>,
}

impl HostEntry {
    fn new(route: HostRoute) -> Arc<Self> {
        let ip: Option<IpAddr> = route.address.parse().ok();
        if ip.is_none() {
            tracing::warn!(host = route.id, address = %route.address, "host address is not an IP; its sessions get the host-unknown page");
        }
        let link = match (ip, route.link_cert_sha256) {
            (Some(ip), Some(pinned)) if route.link_port != 0 => Some(HostLink {
                addr: SocketAddr::new(ip, route.link_port),
                pool_tag: pin_tag(&pinned),
                pinned,
            }),
            _ => None,
        };
        Arc::new(Self { route, link })
    }
}

#[derive(Clone, Debug, Default)]
pub struct RouteTable {
    pub version: Version,
    pub hosts: HashMap<u64, Arc<HostEntry>>,
    /// A B-tree: its nodes stay at least half full, where a hash trie's
    /// sparse leaves would waste most of their slots on inline entries.
    pub sessions: imbl::OrdMap<SessionKey, SessionEntry>,
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
        let mut table = Self {
            version: snapshot.version,
            ..Self::default()
        };
        for host in snapshot.hosts {
            table.change(Change::UpsertHost(host));
        }
        for session in &snapshot.sessions {
            table.upsert_session(session);
        }
        for revocation in snapshot.revocations {
            table.change(Change::Revoke(revocation));
        }
        table
    }

    /// The table as control would send it. Built in memory: for tests and
    /// tools; the store streams with [`RouteTable::write_snapshot`].
    pub fn to_snapshot(&self) -> Snapshot {
        let json = serde_json::to_vec(&SnapshotOut(self)).unwrap_or_default();
        serde_json::from_slice(&json).unwrap_or_default()
    }

    /// Writes the table in [`Snapshot`]'s JSON form without building one.
    pub fn write_snapshot(&self, out: impl std::io::Write) -> serde_json::Result<()> {
        serde_json::to_writer(out, &SnapshotOut(self))
    }

    /// Reads a table from [`Snapshot`]'s JSON form, one session at a time.
    pub fn read_snapshot(input: impl std::io::Read) -> serde_json::Result<Self> {
        let mut de = serde_json::Deserializer::from_reader(input);
        let table = de::Deserialize::deserialize(&mut de)?;
        de.end()?;
        Ok(table)
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
                Change::UpsertSession(session) => next.upsert_session(session),
                other => next.change(other.clone()),
            }
        }
        Ok(next)
    }

    /// Adds or replaces one session in place (building a table).
    pub fn upsert_session(&mut self, session: &SessionRoute) {
        match SessionKey::parse(&session.sid) {
            Some(key) => {
                self.sessions.insert(key, SessionEntry::from_route(session));
            }
            None => tracing::warn!(sid = %session.sid, "ignoring a session whose sid is malformed"),
        }
    }

    /// Adds or replaces one host in place (building a table).
    pub fn upsert_host(&mut self, host: HostRoute) {
        self.hosts.insert(host.id, HostEntry::new(host));
    }

    fn change(&mut self, change: Change) {
        match change {
            Change::UpsertHost(host) => self.upsert_host(host),
            Change::RemoveHost { id } => {
                self.hosts.remove(&id);
            }
            Change::UpsertSession(session) => self.upsert_session(&session),
            Change::RemoveSession { sid } => {
                if let Some(key) = SessionKey::parse(&sid) {
                    self.sessions.remove(&key);
                }
            }
            Change::Revoke(r) => {
                self.revocations.insert(r.login_session, r.expires_at);
            }
        }
    }

    pub fn session(&self, sid: &str) -> Option<&SessionEntry> {
        self.sessions.get(&SessionKey::parse(sid)?)
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

/// Serialises a table as a [`Snapshot`], streaming its maps.
struct SnapshotOut<'a>(&'a RouteTable);

impl Serialize for SnapshotOut<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        struct Each<I>(std::cell::Cell<Option<I>>);
        impl<I: Iterator<Item = T>, T: Serialize> Serialize for Each<I> {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_seq(self.0.take().into_iter().flatten())
            }
        }
        fn each<I>(iter: I) -> Each<I> {
            Each(std::cell::Cell::new(Some(iter)))
        }
        let table = self.0;
        let mut out = serializer.serialize_struct("Snapshot", 4)?;
        out.serialize_field("version", &table.version)?;
        out.serialize_field("hosts", &each(table.hosts.values().map(|h| &h.route)))?;
        out.serialize_field(
            "sessions",
            &each(table.sessions.iter().map(|(key, entry)| SessionRoute {
                sid: key.sid(),
                owner: entry.owner,
                host: entry.host,
                state: entry.state,
            })),
        )?;
        out.serialize_field(
            "revocations",
            &each(
                table
                    .revocations
                    .iter()
                    .map(|(login_session, expires_at)| Revocation {
                        login_session: login_session.clone(),
                        expires_at: *expires_at,
                    }),
            ),
        )?;
        out.end()
    }
}

/// Reads a [`Snapshot`]'s JSON straight into a table: each session is
/// inserted as it is read, so a million of them never sit in a `Vec`.
impl<'de> Deserialize<'de> for RouteTable {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(SnapshotFields::default())
    }
}

/// The fields of a snapshot, read into a table. Also used for the watch
/// stream's snapshot message, whose other fields come first.
#[derive(Default)]
pub(crate) struct SnapshotFields {
    pub(crate) table: RouteTable,
}

impl SnapshotFields {
    /// Reads one field named `key` from `map`.
    pub(crate) fn read_field<'de, A: MapAccess<'de>>(
        &mut self,
        key: &str,
        map: &mut A,
    ) -> Result<(), A::Error> {
        match key {
            "version" => self.table.version = map.next_value()?,
            "hosts" => {
                for host in map.next_value::<Vec<HostRoute>>()? {
                    self.table.change(Change::UpsertHost(host));
                }
            }
            "sessions" => map.next_value_seed(Sessions(&mut self.table))?,
            "revocations" => {
                for revocation in map.next_value::<Vec<Revocation>>()? {
                    self.table.change(Change::Revoke(revocation));
                }
            }
            _ => {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }
}

impl<'de> Visitor<'de> for SnapshotFields {
    type Value = RouteTable;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a route table snapshot")
    }

    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<RouteTable, A::Error> {
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            self.read_field(&key, &mut map)?;
        }
        Ok(self.table)
    }
}

struct Sessions<'t>(&'t mut RouteTable);

impl<'de> DeserializeSeed<'de> for Sessions<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for Sessions<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list of sessions")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(session) = seq.next_element::<SessionRoute>()? {
            self.0.upsert_session(&session);
        }
        Ok(())
    }
}

/// One line of the watch stream, as the gateway reads it: like
/// [`opencloud_protocol::routes::WatchMessage`], but a snapshot streams into
/// a table instead of being buffered whole.
pub enum Incoming {
    Snapshot(RouteTable),
    Delta(Delta),
    Heartbeat,
}

impl<'de> Deserialize<'de> for Incoming {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(IncomingVisitor)
    }
}

struct IncomingVisitor;

impl<'de> Visitor<'de> for IncomingVisitor {
    type Value = Incoming;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a watch message")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Incoming, A::Error> {
        // Control writes the tag first; fields before it would need
        // buffering, which is exactly what this type avoids.
        match map.next_key::<std::borrow::Cow<'de, str>>()?.as_deref() {
            Some("type") => {}
            _ => return Err(de::Error::custom("a watch message starts with its type")),
        }
        let kind: std::borrow::Cow<'de, str> = map.next_value()?;
        match &*kind {
            "snapshot" => {
                let mut fields = SnapshotFields::default();
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    fields.read_field(&key, &mut map)?;
                }
                Ok(Incoming::Snapshot(fields.table))
            }
            "delta" => {
                let mut version = None;
                let mut changes = None;
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    match &*key {
                        "version" => version = Some(map.next_value()?),
                        "changes" => changes = Some(map.next_value()?),
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(Incoming::Delta(Delta {
                    version: version.ok_or_else(|| de::Error::missing_field("version"))?,
                    changes: changes.ok_or_else(|| de::Error::missing_field("changes"))?,
                }))
            }
            "heartbeat" => {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Incoming::Heartbeat)
            }
            other => Err(de::Error::unknown_variant(
                other,
                &["snapshot", "delta", "heartbeat"],
            )),
        }
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
    use opencloud_protocol::routes::{new_sid, HostState, WatchMessage};

    fn session(sid: &str, state: SessionState) -> SessionRoute {
        SessionRoute {
            sid: sid.into(),
            owner: 1,
            host: 1,
            state,
        }
    }

    fn host(id: u64) -> HostRoute {
        HostRoute {
            id,
            address: "127.0.0.1".into(),
            link_port: 7000,
            link_cert_sha256: Some(CertFingerprint::of(new_sid().as_bytes())),
            health_url: "http://127.0.0.1:7000/healthz".into(),
            state: HostState::Online,
        }
    }

    #[test]
    fn deltas_apply_in_order_and_leave_the_old_table_untouched() {
        let s1 = new_sid();
        let base = RouteTable::default();
        let one = base
            .apply(&Delta {
                version: 1,
                changes: vec![
                    Change::UpsertHost(host(1)),
                    Change::UpsertSession(session(&s1, SessionState::Running)),
                ],
            })
            .unwrap();
        assert_eq!(one.sessions.len(), 1);
        let link = one.hosts[&1].link.as_ref().unwrap();
        assert_eq!(link.addr, "127.0.0.1:7000".parse().unwrap());
        let unpinned = HostEntry::new(HostRoute {
            link_cert_sha256: None,
            ..host(2)
        });
        assert_eq!(unpinned.link, None, "no certificate, no link");
        let recertified = HostEntry::new(host(1));
        assert_ne!(
            recertified.link.as_ref().unwrap().pool_tag,
            link.pool_tag,
            "another certificate, another pool"
        );
        assert!(base.sessions.is_empty(), "the old table is unchanged");
        let two = one
            .apply(&Delta {
                version: 2,
                changes: vec![
                    Change::UpsertSession(session(&s1, SessionState::Lost)),
                    Change::Revoke(Revocation {
                        login_session: "ls".into(),
                        expires_at: 100,
                    }),
                ],
            })
            .unwrap();
        assert_eq!(two.session(&s1).unwrap().state, SessionState::Lost);
        assert!(two.is_revoked("ls"));
        assert_eq!(
            two.apply(&Delta {
                version: 4,
                changes: vec![]
            })
            .unwrap_err(),
            OutOfOrder { have: 2, got: 4 }
        );
        let three = two
            .apply(&Delta {
                version: 3,
                changes: vec![Change::RemoveSession { sid: s1.clone() }],
            })
            .unwrap();
        assert!(three.session(&s1).is_none());
        assert!(two
            .without_expired_revocations(100)
            .unwrap()
            .revocations
            .is_empty());
        assert!(two.without_expired_revocations(99).is_none());
    }

    #[test]
    fn malformed_sids_are_skipped_not_fatal() {
        let table = RouteTable::default()
            .apply(&Delta {
                version: 1,
                changes: vec![Change::UpsertSession(session(
                    "not-a-sid",
                    SessionState::Running,
                ))],
            })
            .unwrap();
        assert_eq!(table.version, 1);
        assert!(table.sessions.is_empty());
    }

    fn sample_snapshot() -> Snapshot {
        Snapshot {
            version: 9,
            hosts: vec![host(1), host(2)],
            sessions: (0..50)
                .map(|_| session(&new_sid(), SessionState::Running))
                .collect(),
            revocations: vec![Revocation {
                login_session: "ls".into(),
                expires_at: 5,
            }],
        }
    }

    fn sorted(mut snapshot: Snapshot) -> Snapshot {
        snapshot.hosts.sort_by_key(|h| h.id);
        snapshot.sessions.sort_by(|a, b| a.sid.cmp(&b.sid));
        snapshot
    }

    #[test]
    fn snapshots_stream_both_ways_in_the_protocol_form() {
        let snapshot = sample_snapshot();
        let json = serde_json::to_vec(&snapshot).unwrap();
        let table = RouteTable::read_snapshot(&json[..]).unwrap();
        assert_eq!(table.sessions.len(), 50);
        let mut written = Vec::new();
        table.write_snapshot(&mut written).unwrap();
        let back: Snapshot = serde_json::from_slice(&written).unwrap();
        assert_eq!(sorted(back), sorted(snapshot.clone()));
        assert_eq!(sorted(table.to_snapshot()), sorted(snapshot));
    }

    #[test]
    fn watch_messages_read_like_the_protocol_writes_them() {
        let snapshot = sample_snapshot();
        let line = serde_json::to_vec(&WatchMessage::Snapshot(snapshot.clone())).unwrap();
        let Incoming::Snapshot(table) = serde_json::from_slice(&line).unwrap() else {
            panic!("not a snapshot");
        };
        assert_eq!(sorted(table.to_snapshot()), sorted(snapshot));
        let delta = Delta {
            version: 3,
            changes: vec![Change::RemoveHost { id: 1 }],
        };
        let line = serde_json::to_vec(&WatchMessage::Delta(delta.clone())).unwrap();
        let Incoming::Delta(read) = serde_json::from_slice(&line).unwrap() else {
            panic!("not a delta");
        };
        assert_eq!(read, delta);
        let line = serde_json::to_vec(&WatchMessage::Heartbeat { version: 3 }).unwrap();
        assert!(matches!(
            serde_json::from_slice(&line).unwrap(),
            Incoming::Heartbeat
        ));
        assert!(serde_json::from_slice::<Incoming>(br#"{"version":1,"type":"delta"}"#).is_err());
        assert!(serde_json::from_slice::<Incoming>(br#"{"type":"nope"}"#).is_err());
    }
}
