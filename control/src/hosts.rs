//! Hosts: what their owners do with them (add with a HostKey, rotate or
//! revoke the key, drain), what their agents report (registration,
//! heartbeats), when they count as lost, and which ones each gateway can
//! reach.

use std::net::IpAddr;
use std::sync::LazyLock;

use base64::Engine;
use mysql_async::prelude::*;
use mysql_async::{Pool, TxOpts};
use opencloud_protocol::agent::{AgentHello, AgentSession, Heartbeat, HeartbeatReply, Registered};
use opencloud_protocol::link::LinkCertificate;
use opencloud_protocol::metrics::LabelValue;
use opencloud_protocol::reports::{HostReachability, MAX_HEALTH_ENTRIES};
use opencloud_protocol::routes::{is_valid_sid, Change, HostRoute};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::clock::now_unix;
use crate::error::AppError;
use crate::host_ca::{Holder, HostCa, Issued};
use crate::names::NameRule;
use crate::routes::{commit, host_route, publish, HostRow, HOST_COLUMNS};
use crate::sessions::ending::{end_tx, EndReason};
use crate::sessions::state::{live_sql, Phase};

pub const GATEWAY_NAME_MAX_CHARS: usize = 100;

/// Records what gateway `gateway` found. Ids that name no host are skipped
/// (the host may have been removed since the gateway's table was built);
/// a host listed twice counts as its last entry.
pub async fn record_reachability(
    pool: &Pool,
    gateway: &str,
    hosts: &[HostReachability],
) -> Result<(), AppError> {
    let gateway = GATEWAY_NAME.check(gateway)?;
    if hosts.len() > MAX_HEALTH_ENTRIES {
        return Err(AppError::invalid(
            "hosts",
            format!("A report holds at most {MAX_HEALTH_ENTRIES} hosts; send several."),
        ));
    }
    let mut last: std::collections::BTreeMap<u64, bool> = Default::default();
    for h in hosts {
        last.insert(h.id, h.reachable);
    }
    let (up, down): (Vec<_>, Vec<_>) = last.into_iter().partition(|(_, reachable)| *reachable);
    let mut conn = pool.get_conn().await?;
    for (reachable, group) in [(true, up), (false, down)] {
        for chunk in group.chunks(1000) {
            let marks = vec!["?"; chunk.len()].join(", ");
            let mut params: Vec<mysql_async::Value> =
                vec![gateway.clone().into(), reachable.into()];
            params.extend(chunk.iter().map(|(id, _)| mysql_async::Value::from(*id)));
            conn.exec_drop(
                format!(
                    "INSERT INTO host_reachability (host_id, gateway, reachable, checked_at)
                     SELECT id, ?, ?, UTC_TIMESTAMP(6) FROM hosts WHERE id IN ({marks})
                     ON DUPLICATE KEY UPDATE reachable = VALUES(reachable), checked_at = VALUES(checked_at)"
                ),
                params,
            )
            .await?;
        }
    }
    Ok(())
}

/// The rule for the name a gateway reports itself under.
const GATEWAY_NAME: NameRule = NameRule {
    field: "gateway",
    what: "A gateway name",
    when_empty: "Name the gateway.",
    max_chars: GATEWAY_NAME_MAX_CHARS,
};

pub const HOST_NAME_MAX_CHARS: usize = 100;
/// Prefix of every HostKey, so a pasted key is recognisable.
const KEY_PREFIX: &str = "ochk_";
/// A heartbeat older than this (seconds) means the host is lost.
pub const HEARTBEAT_FRESH_SECONDS: u64 = opencloud_protocol::agent::HOST_LOST_AFTER_MS / 1000;

/// A new HostKey: 256 random bits. Only its digest is stored.
fn new_key() -> String {
    let mut bytes = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut bytes);
    format!(
        "{KEY_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

fn key_digest(key: &str) -> Vec<u8> {
    Sha256::digest(key.trim().as_bytes()).to_vec()
}

/// The rule for a host's name, which its owner chooses.
pub const HOST_NAME: NameRule = NameRule {
    field: "name",
    what: "A host name",
    when_empty: "Give the host a name.",
    max_chars: HOST_NAME_MAX_CHARS,
};

/// A host as its owner (and admins) see it.
#[derive(Debug, Clone, Serialize)]
pub struct HostView {
    pub id: u64,
    pub owner_id: u64,
    pub owner_email: String,
    pub name: String,
    /// online, offline, draining, revoked, or new (never registered).
    pub state: String,
    pub address: String,
    pub draining: bool,
    pub key_revoked: bool,
    pub max_sessions: u32,
    pub cpu_cores: f64,
    pub memory_mib: u64,
    pub sessions: u64,
    pub cpu_percent: f64,
    pub memory_used_mib: u64,
    pub memory_total_mib: u64,
    pub disk_free_mib: u64,
    /// Placement load, 0–100.
    pub load_percent: u32,
    /// Share of the last 30 days (or of the host's life, if shorter) it was online.
    pub uptime_percent: f64,
    pub cgroup_limits: bool,
    pub agent_version: String,
    pub last_heartbeat: Option<String>,
    /// What the host has earned, in words; the web layer fills it in
    /// from `billing::reports` for the host's owner.
    pub earnings: String,
}

/// Placement load of a host, 0.0–1.0: sessions weigh most, then CPU and
/// memory, each against what the host offers.
pub fn load_score(
    sessions: u64,
    max_sessions: u32,
    cpu_percent: f64,
    used_mib: u64,
    total_mib: u64,
) -> f64 {
    let share = |used: f64, total: f64| {
        if total > 0.0 {
            (used / total).clamp(0.0, 1.0)
        } else {
            1.0
        }
    };
    0.6 * share(sessions as f64, f64::from(max_sessions))
        + 0.2 * (cpu_percent / 100.0).clamp(0.0, 1.0)
        + 0.2 * share(used_mib as f64, total_mib as f64)
}

static VIEW_COLUMNS: LazyLock<String> = LazyLock::new(|| {
    format!(
        "h.id, h.owner_id, u.email, h.name, h.state, h.address, h.draining, \
    h.key_revoked_at IS NOT NULL, h.registered_at IS NOT NULL, h.max_sessions, h.cpu_cores, h.memory_mib, \
    (SELECT COUNT(*) FROM sessions s WHERE s.host_id = h.id AND s.state IN ({})), \
    h.cpu_percent, h.memory_used_mib, h.memory_total_mib, h.disk_free_mib, h.cgroup_limits, h.agent_version, \
    DATE_FORMAT(h.last_heartbeat_at, '%Y-%m-%d %H:%i:%s'), \
    (SELECT COALESCE(SUM(t.online_seconds), 0) FROM host_uptime t \
       WHERE t.host_id = h.id AND t.day >= UTC_DATE() - INTERVAL 30 DAY) * 1e0, \
    LEAST(30 * 86400, GREATEST(1, TIMESTAMPDIFF(SECOND, h.created_at, UTC_TIMESTAMP(6)))) * 1e0",
        live_sql()
    )
});

fn view_from_row(mut row: mysql_async::Row) -> HostView {
    let mut take = |i: usize| {
        row.take::<mysql_async::Value, _>(i)
            .unwrap_or(mysql_async::Value::NULL)
    };
    use crate::db::lenient as v;
    let id: u64 = v(take(0));
    let owner_id: u64 = v(take(1));
    let owner_email: String = v(take(2));
    let name: String = v(take(3));
    let raw_state: String = v(take(4));
    let address: String = v(take(5));
    let draining: bool = v(take(6));
    let key_revoked: bool = v(take(7));
    let registered: bool = v(take(8));
    let max_sessions: u32 = v(take(9));
    let cpu_cores: f64 = v(take(10));
    let memory_mib: u64 = v(take(11));
    let sessions: u64 = v(take(12));
    let cpu_percent: f64 = v(take(13));
    let memory_used_mib: u64 = v(take(14));
    let memory_total_mib: u64 = v(take(15));
    let disk_free_mib: u64 = v(take(16));
    let cgroup_limits: bool = v(take(17));
    let agent_version: String = v(take(18));
    let last_heartbeat: Option<String> = v(take(19));
    let online_seconds: f64 = v(take(20));
    let window_seconds: f64 = v(take(21));
    let state = if key_revoked {
        "revoked"
    } else if !registered {
        "new"
    } else if raw_state == "online" && draining {
        "draining"
    } else {
        raw_state.as_str()
    }
    .to_owned();
    HostView {
        id,
        owner_id,
        owner_email,
        name,
        state,
        address,
        draining,
        key_revoked,
        max_sessions,
        cpu_cores,
        memory_mib,
        sessions,
        cpu_percent,
        memory_used_mib,
        memory_total_mib,
        disk_free_mib,
        load_percent: (100.0
            * load_score(
                sessions,
                max_sessions,
                cpu_percent,
                memory_used_mib,
                memory_total_mib,
            ))
        .round() as u32,
        uptime_percent: (1000.0 * (online_seconds / window_seconds).clamp(0.0, 1.0)).round() / 10.0,
        cgroup_limits,
        agent_version,
        last_heartbeat,
        earnings: "—".into(),
    }
}

/// Adds a host for `owner_id`; returns it with its HostKey, which is shown
/// this once and never stored.
pub async fn create(
    pool: &Pool,
    owner_id: u64,
    name: &str,
) -> Result<(HostView, String), AppError> {
    let name = HOST_NAME.check(name)?;
    let key = new_key();
    let mut conn = pool.get_conn().await?;
    conn.exec_drop(
        "INSERT INTO hosts (owner_id, name, address, health_url, state, key_digest, created_at, updated_at)
         VALUES (?, ?, '', '', 'offline', ?, UTC_TIMESTAMP(6), UTC_TIMESTAMP(6))",
        (owner_id, &name, key_digest(&key)),
    )
    .await?;
    let id = conn
        .last_insert_id()
        .ok_or_else(|| AppError::Internal("no id for the new host".into()))?;
    drop(conn);
    tracing::info!(host = id, owner = owner_id, "host added");
    Ok((get(pool, Some(owner_id), id).await?, key))
}

/// A HostKey for `owner_email`'s host `name`: the host is added if it is
/// missing, otherwise it gets a new key (the old one stops working).
pub async fn issue_key(pool: &Pool, owner_email: &str, name: &str) -> Result<String, AppError> {
    let name = HOST_NAME.check(name)?;
    let mut conn = pool.get_conn().await?;
    let owner: u64 = conn
        .exec_first(
            "SELECT id FROM users WHERE email = ?",
            (owner_email.trim().to_lowercase(),),
        )
        .await?
        .ok_or(AppError::NotFound("user"))?;
    let existing: Option<u64> = conn
        .exec_first(
            "SELECT id FROM hosts WHERE owner_id = ? AND name = ? AND key_digest IS NOT NULL ORDER BY id LIMIT 1",
            (owner, &name),
        )
        .await?;
    drop(conn);
    match existing {
        Some(id) => rotate_key(pool, owner, id).await,
        None => Ok(create(pool, owner, &name).await?.1),
    }
}

/// One host; with `owner`, only if that user owns it.
pub async fn get(pool: &Pool, owner: Option<u64>, id: u64) -> Result<HostView, AppError> {
    let row: Option<mysql_async::Row> = pool
        .get_conn()
        .await?
        .exec_first(
            format!(
                "SELECT {} FROM hosts h JOIN users u ON u.id = h.owner_id
                 WHERE h.id = ? AND (? IS NULL OR h.owner_id = ?)",
                VIEW_COLUMNS.as_str()
            ),
            (id, owner, owner),
        )
        .await?;
    row.map(view_from_row).ok_or(AppError::NotFound("host"))
}

/// Hosts on one page of a list.
pub const HOSTS_PER_PAGE: usize = 200;

/// One page of a host list, newest first.
#[derive(Debug, Clone, Serialize)]
pub struct HostPage {
    pub hosts: Vec<HostView>,
    /// Hosts on all pages together.
    pub total: u64,
    /// `before` for the next page; `None` on the last one.
    pub next_before: Option<u64>,
}

/// The hosts `owner` has (all hosts for `None`), newest first, one page:
/// those with an id below `before`, if given.
pub async fn list(
    pool: &Pool,
    owner: Option<u64>,
    before: Option<u64>,
) -> Result<HostPage, AppError> {
    let mut conn = pool.get_conn().await?;
    let rows: Vec<mysql_async::Row> = conn
        .exec(
            format!(
                "SELECT {} FROM hosts h JOIN users u ON u.id = h.owner_id
                 WHERE h.key_digest IS NOT NULL AND (? IS NULL OR h.owner_id = ?)
                   AND (? IS NULL OR h.id < ?)
                 ORDER BY h.id DESC LIMIT {}",
                VIEW_COLUMNS.as_str(),
                HOSTS_PER_PAGE + 1
            ),
            (owner, owner, before, before),
        )
        .await?;
    let total: Option<u64> = conn
        .exec_first(
            "SELECT COUNT(*) FROM hosts WHERE key_digest IS NOT NULL AND (? IS NULL OR owner_id = ?)",
            (owner, owner),
        )
        .await?;
    let mut hosts: Vec<HostView> = rows.into_iter().map(view_from_row).collect();
    let more = hosts.len() > HOSTS_PER_PAGE;
    hosts.truncate(HOSTS_PER_PAGE);
    let next_before = more.then(|| hosts.last().map(|h| h.id)).flatten();
    Ok(HostPage {
        hosts,
        total: total.unwrap_or_default(),
        next_before,
    })
}

/// A new HostKey for the host; the old one stops working at once. Also
/// lifts a revocation.
pub async fn rotate_key(pool: &Pool, owner_id: u64, id: u64) -> Result<String, AppError> {
    get(pool, Some(owner_id), id).await?;
    let key = new_key();
    let mut conn = pool.get_conn().await?;
    let mut tx = conn.start_transaction(TxOpts::default()).await?;
    // The link certificate goes with the HostKey: gateways stop trusting
    // the old one now, and the agent's next registration gets a new one.
    tx.exec_drop(
        "UPDATE hosts SET key_digest = ?, key_revoked_at = NULL, link_cert_sha256 = NULL,
            updated_at = UTC_TIMESTAMP(6)
         WHERE id = ? AND owner_id = ?",
        (key_digest(&key), id, owner_id),
    )
    .await?;
    if let Some(route) = host_route_tx(&mut tx, id).await? {
        publish(&mut tx, &[Change::UpsertHost(route)]).await?;
    }
    commit(tx).await?;
    tracing::info!(host = id, "host key rotated");
    Ok(key)
}

/// Revokes the host's key: its agent is refused from now on, gateways stop
/// trusting its link certificate, the host goes offline and its sessions
/// are lost.
pub async fn revoke_key(pool: &Pool, owner_id: u64, id: u64) -> Result<(), AppError> {
    get(pool, Some(owner_id), id).await?;
    pool.get_conn()
        .await?
        .exec_drop(
            "UPDATE hosts SET key_revoked_at = UTC_TIMESTAMP(6), link_cert_sha256 = NULL,
                updated_at = UTC_TIMESTAMP(6)
             WHERE id = ? AND owner_id = ? AND key_revoked_at IS NULL",
            (id, owner_id),
        )
        .await?;
    take_offline(pool, id, EndReason::HostRevoked).await?;
    tracing::info!(host = id, "host key revoked");
    Ok(())
}

/// Draining: no new sessions; running ones go on.
pub async fn set_draining(
    pool: &Pool,
    owner: Option<u64>,
    id: u64,
    draining: bool,
) -> Result<(), AppError> {
    get(pool, owner, id).await?;
    let mut conn = pool.get_conn().await?;
    let mut tx = conn.start_transaction(TxOpts::default()).await?;
    tx.exec_drop(
        "UPDATE hosts SET draining = ?, updated_at = UTC_TIMESTAMP(6) WHERE id = ?",
        (draining, id),
    )
    .await?;
    if let Some(route) = host_route_tx(&mut tx, id).await? {
        publish(&mut tx, &[Change::UpsertHost(route)]).await?;
    }
    commit(tx).await?;
    Ok(())
}

/// The host as the route table carries it.
async fn host_route_tx(
    tx: &mut mysql_async::Transaction<'_>,
    id: u64,
) -> Result<Option<HostRoute>, AppError> {
    let row: Option<HostRow> = tx
        .exec_first(
            format!("SELECT {HOST_COLUMNS} FROM hosts WHERE id = ?"),
            (id,),
        )
        .await?;
    Ok(row.map(host_route))
}

/// The host an agent's key names. Unknown keys and revoked hosts are refused
/// with the error codes agents recognise.
pub async fn authenticate(pool: &Pool, key: &str) -> Result<u64, AppError> {
    if !key.trim().starts_with(KEY_PREFIX) {
        return Err(AppError::HostKeyInvalid);
    }
    let row: Option<(u64, bool)> = pool
        .get_conn()
        .await?
        .exec_first(
            "SELECT id, key_revoked_at IS NOT NULL FROM hosts WHERE key_digest = ?",
            (key_digest(key),),
        )
        .await?;
    match row {
        None => Err(AppError::HostKeyInvalid),
        Some((_, true)) => Err(AppError::HostKeyRevoked),
        Some((id, false)) => Ok(id),
    }
}

// What a host reports is untrusted input: every figure is bounded so a
// bad or hostile agent gets a 400 naming the field, never a 500 from the
// database and never a figure that skews placement.

/// The most sessions one host may offer.
pub const MAX_HOST_SESSIONS: u32 = 1_000;
/// The most CPU cores one host may offer.
const MAX_HOST_CPU_CORES: f32 = 1_024.0;
/// The most memory one host may have: 64 TiB.
const MAX_HOST_MEMORY_MIB: u64 = 64 << 20;
/// The most free disk one host may report: 1 EiB.
const MAX_HOST_DISK_MIB: u64 = 1 << 40;
/// The most kernels one session may report busy.
const MAX_BUSY_KERNELS: u32 = 1_000;
/// How far ahead of control's clock an agent's timestamps may be.
pub const CLOCK_SKEW_SECONDS: u64 = 300;
const VERSION_MAX_CHARS: usize = 64;

/// The rule for the version an agent reports, shown on the admin pages.
const AGENT_VERSION: NameRule = NameRule {
    field: "version",
    what: "The version",
    when_empty: "The version is missing.",
    max_chars: VERSION_MAX_CHARS,
};

fn check_version(version: &str) -> Result<(), AppError> {
    AGENT_VERSION.check(version).map(drop)
}

/// A unix time an agent reports: not after control's `now` (give or take
/// the clock skew allowed).
fn check_timestamp(field: &'static str, at: u64, now: u64) -> Result<(), AppError> {
    if at > now + CLOCK_SKEW_SECONDS {
        return Err(AppError::invalid(
            field,
            format!("{field} {at} is in the future (control's clock says {now})."),
        ));
    }
    Ok(())
}

/// The sessions an agent lists in its hello or heartbeat.
fn check_agent_sessions(sessions: &[AgentSession], now: u64) -> Result<(), AppError> {
    if sessions.len() > MAX_HOST_SESSIONS as usize {
        return Err(AppError::invalid(
            "sessions",
            format!("A host runs at most {MAX_HOST_SESSIONS} sessions."),
        ));
    }
    for session in sessions {
        if !is_valid_sid(&session.sid) {
            return Err(AppError::invalid(
                "sid",
                "The sid is not a session id (26 characters a-z, 2-7).",
            ));
        }
        check_timestamp("started_at", session.started_at, now)?;
        if let Some(at) = session.last_activity {
            check_timestamp("last_activity", at, now)?;
        }
        if session.busy_kernels > MAX_BUSY_KERNELS {
            return Err(AppError::invalid(
                "busy_kernels",
                format!("A session has at most {MAX_BUSY_KERNELS} busy kernels."),
            ));
        }
    }
    Ok(())
}

/// Why an address is no place for a stranger's host to send gateways:
/// loopback, private, link-local (cloud metadata lives there), unspecified,
/// multicast, or reserved. `None` for a public unicast address.
pub fn non_public_reason(address: IpAddr) -> Option<&'static str> {
    let address = match address {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    match address {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            if v4.is_unspecified() {
                Some("unspecified")
            } else if v4.is_loopback() {
                Some("loopback")
            } else if v4.is_private() || (a == 100 && (64..128).contains(&b)) {
                Some("private")
            } else if v4.is_link_local() {
                Some("link-local")
            } else if v4.is_multicast() || v4.is_broadcast() || a == 0 || a >= 240 {
                Some("reserved or multicast")
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            if v6.is_unspecified() {
                Some("unspecified")
            } else if v6.is_loopback() {
                Some("loopback")
            } else if first & 0xfe00 == 0xfc00 {
                Some("private")
            } else if first & 0xffc0 == 0xfe80 {
                Some("link-local")
            } else if v6.is_multicast() {
                Some("reserved or multicast")
            } else {
                None
            }
        }
    }
}

fn check_hello(hello: &AgentHello, now: u64, allow_private: bool) -> Result<IpAddr, AppError> {
    let address: IpAddr = hello.address.parse().map_err(|_| {
        AppError::invalid("address", "The advertised address must be an IP address.")
    })?;
    if address.is_unspecified() {
        return Err(AppError::invalid(
            "address",
            "Advertise an address gateways can connect to, not 0.0.0.0.",
        ));
    }
    if let Some(reason) = non_public_reason(address).filter(|_| !allow_private) {
        return Err(AppError::invalid(
            "address",
            format!(
                "{address} is a {reason} address; hosts must advertise a public address \
                 (control's allow_private_hosts permits others)."
            ),
        ));
    }
    if hello.link_port == 0 {
        return Err(AppError::invalid(
            "link_port",
            "The link port must be between 1 and 65535.",
        ));
    }
    let c = hello.capacity;
    if c.max_sessions == 0 || c.max_sessions > MAX_HOST_SESSIONS {
        return Err(AppError::invalid(
            "max_sessions",
            format!("A host offers 1 to {MAX_HOST_SESSIONS} sessions."),
        ));
    }
    if !(c.cpu_cores > 0.0 && c.cpu_cores <= MAX_HOST_CPU_CORES) {
        return Err(AppError::invalid(
            "cpu_cores",
            format!("A host offers more than 0 and at most {MAX_HOST_CPU_CORES} CPU cores."),
        ));
    }
    if c.memory_mib == 0 || c.memory_mib > MAX_HOST_MEMORY_MIB {
        return Err(AppError::invalid(
            "memory_mib",
            format!("A host offers 1 to {MAX_HOST_MEMORY_MIB} MiB of memory."),
        ));
    }
    check_version(&hello.version)?;
    check_agent_sessions(&hello.sessions, now)?;
    Ok(address)
}

fn check_heartbeat(beat: &Heartbeat, now: u64) -> Result<(), AppError> {
    check_version(&beat.version)?;
    let load = beat.load;
    // Written so that NaN fails too.
    if !(0.0..=100.0).contains(&load.cpu_percent) {
        return Err(AppError::invalid(
            "cpu_percent",
            "cpu_percent is the whole machine's use, 0 to 100.",
        ));
    }
    for (field, value, max) in [
        (
            "memory_total_mib",
            load.memory_total_mib,
            MAX_HOST_MEMORY_MIB,
        ),
        (
            "memory_used_mib",
            load.memory_used_mib,
            load.memory_total_mib,
        ),
        ("disk_free_mib", load.disk_free_mib, MAX_HOST_DISK_MIB),
        (
            "warm_servers",
            u64::from(beat.warm_servers),
            u64::from(MAX_HOST_SESSIONS),
        ),
    ] {
        if value > max {
            return Err(AppError::invalid(
                field,
                format!("{field} is at most {max} here."),
            ));
        }
    }
    check_agent_sessions(&beat.sessions, now)
}

/// An agent (re)starts: record what it offers, bring the host online, and
/// reconcile sessions. Running sessions the agent no longer has are ended;
/// servers it kept that control no longer wants are listed for stopping.
pub async fn register(
    pool: &Pool,
    ca: &HostCa,
    host_id: u64,
    hello: &AgentHello,
    allow_private: bool,
) -> Result<Registered, AppError> {
    let now = now_unix();
    let address = check_hello(hello, now, allow_private)?.to_string();
    // Each registration gets a new certificate: the agent may have a new key.
    let issued = issue_link_certificate(ca, host_id, &hello.link_csr, now)?;
    let health_url = if address.contains(':') {
        format!("http://[{address}]:{}/healthz", hello.link_port)
    } else {
        format!("http://{address}:{}/healthz", hello.link_port)
    };
    let mut conn = pool.get_conn().await?;
    let mut tx = conn.start_transaction(TxOpts::default()).await?;
    let name: String = tx
        .exec_first("SELECT name FROM hosts WHERE id = ? FOR UPDATE", (host_id,))
        .await?
        .ok_or(AppError::HostKeyInvalid)?;
    tx.exec_drop(
        "UPDATE hosts SET address = ?, link_port = ?, link_cert_sha256 = ?, health_url = ?, state = 'online',
            max_sessions = ?, cpu_cores = ?, memory_mib = ?, cgroup_limits = ?, agent_version = ?,
            registered_at = UTC_TIMESTAMP(6), last_heartbeat_at = UTC_TIMESTAMP(6), updated_at = UTC_TIMESTAMP(6)
         WHERE id = ?",
        (
            &address,
            hello.link_port,
            issued.fingerprint.to_string(),
            &health_url,
            hello.capacity.max_sessions,
            f64::from(hello.capacity.cpu_cores),
            hello.capacity.memory_mib,
            hello.cgroup_limits,
            hello.version.trim(),
            host_id,
        ),
    )
    .await?;
    let mut changes = Vec::new();
    if let Some(route) = host_route_tx(&mut tx, host_id).await? {
        changes.push(Change::UpsertHost(route));
    }
    // Running sessions the agent did not keep are gone; starting ones will
    // be started again from the command queue; stopping ones are done.
    let kept: Vec<&str> = hello.sessions.iter().map(|s| s.sid.as_str()).collect();
    let live: Vec<(String, String)> = tx
        .exec(
            format!(
                "SELECT sid, state FROM sessions WHERE host_id = ? AND state IN ({}) FOR UPDATE",
                live_sql()
            ),
            (host_id,),
        )
        .await?;
    for (sid, state) in &live {
        let state = Phase::from_column(state);
        if kept.contains(&sid.as_str()) || state == Some(Phase::Starting) {
            continue;
        }
        let (phase, reason) = if state == Some(Phase::Stopping) {
            (Phase::Stopped, None)
        } else {
            (Phase::Failed, Some("agent_restarted"))
        };
        changes.extend(end_tx(&mut tx, sid, phase, reason, None).await?);
    }
    let stop = kept
        .iter()
        .filter(|sid| !live.iter().any(|(live_sid, _)| live_sid == *sid))
        .map(|sid| sid.to_string())
        .collect();
    publish(&mut tx, &changes).await?;
    commit(tx).await?;
    tracing::info!(host = host_id, %address, sessions = hello.sessions.len(), "agent registered");
    Ok(Registered {
        host_id,
        name,
        heartbeat_ms: opencloud_protocol::agent::HEARTBEAT_MS,
        stop,
        link_certificate: issued.certificate,
    })
}

/// A host link certificate for host `host_id` from its request; a bad
/// request is a 400 naming `link_csr`.
fn issue_link_certificate(
    ca: &HostCa,
    host_id: u64,
    csr: &str,
    now: u64,
) -> Result<Issued, AppError> {
    ca.issue(Holder::Host(host_id), csr, now).map_err(|e| {
        AppError::invalid(
            "link_csr",
            format!("The link certificate request was refused: {e}."),
        )
    })
}

/// A new link certificate for a registered host whose current one nears
/// its end: gateways trust the new one from this commit on, and the old
/// one no longer.
pub async fn renew_link_certificate(
    pool: &Pool,
    ca: &HostCa,
    host_id: u64,
    csr: &str,
) -> Result<LinkCertificate, AppError> {
    let issued = issue_link_certificate(ca, host_id, csr, now_unix())?;
    let mut conn = pool.get_conn().await?;
    let mut tx = conn.start_transaction(TxOpts::default()).await?;
    // Only a host that registered under its current key has a certificate
    // to renew; after a rotation the agent must register again.
    tx.exec_drop(
        "UPDATE hosts SET link_cert_sha256 = ?, updated_at = UTC_TIMESTAMP(6)
         WHERE id = ? AND link_cert_sha256 IS NOT NULL",
        (issued.fingerprint.to_string(), host_id),
    )
    .await?;
    if tx.affected_rows() == 0 {
        return Err(AppError::Conflict {
            field: None,
            message: "this host has no link certificate to renew; register again".into(),
        });
    }
    if let Some(route) = host_route_tx(&mut tx, host_id).await? {
        publish(&mut tx, &[Change::UpsertHost(route)]).await?;
    }
    commit(tx).await?;
    tracing::info!(
        host = host_id,
        not_after = issued.certificate.not_after,
        "host link certificate renewed"
    );
    Ok(issued.certificate)
}

/// A heartbeat: load, liveness, per-session activity. Brings an offline
/// host back online; answers with sessions the agent should stop.
pub async fn heartbeat(
    pool: &Pool,
    host_id: u64,
    beat: &Heartbeat,
) -> Result<HeartbeatReply, AppError> {
    check_heartbeat(beat, now_unix())?;
    let load = beat.load;
    let mut conn = pool.get_conn().await?;
    let mut tx = conn.start_transaction(TxOpts::default()).await?;
    let row: Option<(String, bool, Option<f64>)> = tx
        .exec_first(
            "SELECT state, draining, TIMESTAMPDIFF(MICROSECOND, last_heartbeat_at, UTC_TIMESTAMP(6)) / 1e6
             FROM hosts WHERE id = ? FOR UPDATE",
            (host_id,),
        )
        .await?;
    let Some((state, draining, since_last)) = row else {
        return Err(AppError::HostKeyInvalid);
    };
    tx.exec_drop(
        "UPDATE hosts SET state = 'online', last_heartbeat_at = UTC_TIMESTAMP(6), cpu_percent = ?,
            memory_used_mib = ?, memory_total_mib = ?, disk_free_mib = ?, agent_version = ?,
            warm_servers = LEAST(?, max_sessions)
         WHERE id = ?",
        (
            f64::from(load.cpu_percent),
            load.memory_used_mib,
            load.memory_total_mib,
            load.disk_free_mib,
            beat.version.trim(),
            beat.warm_servers,
            host_id,
        ),
    )
    .await?;
    // Uptime: the time since the last heartbeat, if it was recent enough
    // that the host was online all along.
    if let Some(seconds) = since_last.filter(|s| *s > 0.0 && *s <= HEARTBEAT_FRESH_SECONDS as f64) {
        tx.exec_drop(
            "INSERT INTO host_uptime (host_id, day, online_seconds) VALUES (?, UTC_DATE(), ?)
             ON DUPLICATE KEY UPDATE online_seconds = online_seconds + VALUES(online_seconds)",
            (host_id, seconds),
        )
        .await?;
    }
    let mut changes = Vec::new();
    if state != "online" {
        if let Some(route) = host_route_tx(&mut tx, host_id).await? {
            changes.push(Change::UpsertHost(route));
        }
        tracing::info!(host = host_id, "host back online");
    }
    let mut stop = Vec::new();
    for session in &beat.sessions {
        let live: Option<String> = tx
            .exec_first(
                format!(
                    "SELECT state FROM sessions WHERE sid = ? AND host_id = ? AND state IN ({})",
                    live_sql()
                ),
                (&session.sid, host_id),
            )
            .await?;
        if live.is_none() {
            stop.push(session.sid.clone());
            continue;
        }
        tx.exec_drop(
            "UPDATE sessions SET busy_kernels = ?,
                kernel_activity_at = GREATEST(COALESCE(kernel_activity_at, FROM_UNIXTIME(0)),
                    LEAST(FROM_UNIXTIME(?), UTC_TIMESTAMP(6)))
             WHERE sid = ?",
            (
                session.busy_kernels,
                session.last_activity.unwrap_or(0),
                &session.sid,
            ),
        )
        .await?;
    }
    publish(&mut tx, &changes).await?;
    commit(tx).await?;
    Ok(HeartbeatReply { draining, stop })
}

/// Takes a host offline now: its live sessions are lost (with `reason`) and
/// become tombstones the gateways show as such.
pub async fn take_offline(pool: &Pool, host_id: u64, reason: EndReason) -> Result<usize, AppError> {
    let mut conn = pool.get_conn().await?;
    let mut tx = conn.start_transaction(TxOpts::default()).await?;
    tx.exec_drop(
        "UPDATE hosts SET state = 'offline', warm_servers = 0, updated_at = UTC_TIMESTAMP(6) WHERE id = ?",
        (host_id,),
    )
    .await?;
    let mut changes = Vec::new();
    if let Some(route) = host_route_tx(&mut tx, host_id).await? {
        changes.push(Change::UpsertHost(route));
    }
    let live: Vec<String> = tx
        .exec(
            format!(
                "SELECT sid FROM sessions WHERE host_id = ? AND state IN ({}) FOR UPDATE",
                live_sql()
            ),
            (host_id,),
        )
        .await?;
    for sid in &live {
        changes.extend(end_tx(&mut tx, sid, Phase::Lost, Some(reason.label()), None).await?);
    }
    publish(&mut tx, &changes).await?;
    commit(tx).await?;
    if !live.is_empty() {
        reason.count(live.len() as u64);
    }
    Ok(live.len())
}

/// Registered hosts by state (online, draining, offline, revoked).
pub async fn count_by_state(pool: &Pool) -> Result<Vec<(String, u64)>, AppError> {
    Ok(pool
        .get_conn()
        .await?
        .query(
            "SELECT CASE WHEN key_revoked_at IS NOT NULL THEN 'revoked'
                         WHEN state = 'online' AND draining THEN 'draining'
                         ELSE state END AS s, COUNT(*)
             FROM hosts WHERE key_digest IS NOT NULL GROUP BY s",
        )
        .await?)
}

/// Agent-run hosts online whose last heartbeat is older than the limit.
pub async fn find_silent(pool: &Pool) -> Result<Vec<u64>, AppError> {
    Ok(pool
        .get_conn()
        .await?
        .exec(
            // Only hosts run by an agent heartbeat; hosts recorded for
            // servers started elsewhere (tests' stand-ins) do not.
            "SELECT id FROM hosts WHERE state = 'online' AND key_digest IS NOT NULL
             AND (last_heartbeat_at IS NULL OR last_heartbeat_at < UTC_TIMESTAMP(6) - INTERVAL ? MICROSECOND)",
            (HEARTBEAT_FRESH_SECONDS * 1_000_000,),
        )
        .await?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use opencloud_protocol::agent::{AgentSessionState, Load};

    fn beat(cpu_percent: f32, last_activity: u64) -> Heartbeat {
        Heartbeat {
            version: "1.0".into(),
            load: Load {
                cpu_percent,
                memory_used_mib: 1,
                memory_total_mib: 2,
                disk_free_mib: 3,
            },
            sessions: vec![AgentSession {
                sid: "a".repeat(26),
                state: AgentSessionState::Running,
                started_at: 1,
                last_activity: Some(last_activity),
                busy_kernels: 0,
            }],
            warm_servers: 0,
        }
    }

    #[test]
    fn heartbeats_are_bounded_and_nan_is_refused() {
        let now = 1_800_000_000;
        assert!(check_heartbeat(&beat(50.0, now + CLOCK_SKEW_SECONDS), now).is_ok());
        let field = |b: Heartbeat| check_heartbeat(&b, now).unwrap_err().field();
        assert_eq!(field(beat(f32::NAN, now)), Some("cpu_percent"));
        assert_eq!(field(beat(100.5, now)), Some("cpu_percent"));
        assert_eq!(field(beat(1.0, 4_102_444_800)), Some("last_activity"));
        // A host claiming endless warm servers to draw every open is refused.
        let boastful = Heartbeat {
            warm_servers: MAX_HOST_SESSIONS + 1,
            ..beat(1.0, now)
        };
        assert_eq!(field(boastful), Some("warm_servers"));
    }

    #[test]
    fn only_public_addresses_are_public() {
        for (address, reason) in [
            ("127.0.0.1", Some("loopback")),
            ("::1", Some("loopback")),
            ("10.0.0.1", Some("private")),
            ("172.16.5.4", Some("private")),
            ("192.168.1.1", Some("private")),
            ("100.64.0.1", Some("private")),
            ("fc00::1", Some("private")),
            ("fd12::1", Some("private")),
            ("169.254.169.254", Some("link-local")),
            ("fe80::1", Some("link-local")),
            ("::ffff:127.0.0.1", Some("loopback")),
            ("::ffff:169.254.169.254", Some("link-local")),
            ("0.0.0.0", Some("unspecified")),
            ("::", Some("unspecified")),
            ("224.0.0.1", Some("reserved or multicast")),
            ("255.255.255.255", Some("reserved or multicast")),
            ("0.1.2.3", Some("reserved or multicast")),
            ("203.0.113.9", None),
            ("8.8.8.8", None),
            ("100.128.0.1", None),
            ("2001:db8::1", None),
        ] {
            let ip: IpAddr = address.parse().unwrap();
            assert_eq!(non_public_reason(ip), reason, "{address}");
        }
    }

    #[test]
    fn names_with_bidirectional_overrides_are_refused() {
        assert_eq!(HOST_NAME.check(" lab ").unwrap(), "lab");
        assert!(HOST_NAME.check("lab\u{202e}gpj").is_err());
        assert!(HOST_NAME.check("lab\u{2067}").is_err());
        assert!(check_version("1.0\u{200b}").is_err());
    }

    #[test]
    fn host_keys_are_long_random_and_prefixed() {
        let (a, b) = (new_key(), new_key());
        assert_ne!(a, b);
        assert!(a.starts_with(KEY_PREFIX));
        assert_eq!(a.len(), KEY_PREFIX.len() + 43);
        assert_eq!(key_digest(&a).len(), 32);
        assert_eq!(
            key_digest(&format!(" {a}\n")),
            key_digest(&a),
            "pasted whitespace is ignored"
        );
    }

    #[test]
    fn fuller_hosts_score_higher() {
        let empty = load_score(0, 4, 10.0, 1000, 8000);
        let two = load_score(2, 4, 10.0, 1000, 8000);
        assert!(two > empty);
        assert!(load_score(4, 4, 100.0, 8000, 8000) <= 1.0);
        assert_eq!(
            load_score(0, 0, 0.0, 0, 0),
            0.6 + 0.2,
            "nothing offered counts as full"
        );
    }

    #[test]
    fn gateway_names_are_short_and_printable() {
        assert_eq!(GATEWAY_NAME.check(" gw-1 ").unwrap(), "gw-1");
        assert!(GATEWAY_NAME.check("").is_err());
        assert!(GATEWAY_NAME.check("a\nb").is_err());
        assert!(GATEWAY_NAME.check(&"g".repeat(101)).is_err());
    }
}
