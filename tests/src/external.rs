//! A stand-in for the agent: records a Jupyter server that someone else
//! started (a test, a benchmark) as a running session, the way control does
//! for one the agent started. Written against control's public route log
//! (`publish`, `commit`) and the database, so it keeps the guarantees the
//! real path keeps: the host and the session are published in the same
//! transaction that writes them.

use std::net::IpAddr;

use anyhow::{bail, Context};
use mysql_async::prelude::*;
use mysql_async::{Pool, TxOpts};
use opencloud_control::routes::{commit, publish};
use opencloud_protocol::routes::{self, Change, HostRoute, HostState, SessionRoute, SessionState};

/// The longest upstream token a session may carry.
pub const UPSTREAM_TOKEN_MAX_CHARS: usize = 100;

/// Records a Jupyter server that is already running at `host_address:port`
/// as a running session of `project_id` owned by `owner_user_id`. Makes sure
/// a host row for that address exists for the user (online, health URL
/// `http://{address}:{port}/api/status`). Publishes the host and the session
/// in the same transaction.
pub async fn register_external(
    pool: &Pool,
    owner_user_id: u64,
    project_id: u64,
    host_address: &str,
    port: u16,
    upstream_token: &str,
) -> anyhow::Result<SessionRoute> {
    let address: IpAddr = host_address
        .trim()
        .parse()
        .context("address: The host address must be an IP address, like 10.0.0.5.")?;
    if port == 0 {
        bail!("port: The port must be between 1 and 65535.");
    }
    check_upstream_token(upstream_token)?;
    let address = address.to_string();
    let health_url = match address.contains(':') {
        true => format!("http://[{address}]:{port}/api/status"),
        false => format!("http://{address}:{port}/api/status"),
    };

    let mut conn = pool.get_conn().await?;
    let mut tx = conn.start_transaction(TxOpts::default()).await?;
    // One registration per user at a time, so two cannot both add the host.
    require(
        &mut tx,
        "user",
        "SELECT id FROM users WHERE id = ? FOR UPDATE",
        (owner_user_id,),
    )
    .await?;
    require(
        &mut tx,
        "project",
        "SELECT id FROM projects WHERE id = ? AND owner_id = ? AND deleted_at IS NULL",
        (project_id, owner_user_id),
    )
    .await?;
    let existing: Option<u64> = tx
        .exec_first(
            "SELECT id FROM hosts WHERE owner_id = ? AND address = ? ORDER BY id LIMIT 1 FOR UPDATE",
            (owner_user_id, &address),
        )
        .await?;
    let host_id = match existing {
        Some(id) => {
            tx.exec_drop(
                "UPDATE hosts SET state = 'online', health_url = ?, updated_at = UTC_TIMESTAMP(6)
                 WHERE id = ?",
                (&health_url, id),
            )
            .await?;
            id
        }
        None => {
            tx.exec_drop(
                "INSERT INTO hosts (owner_id, name, address, health_url, state, created_at, updated_at)
                 VALUES (?, ?, ?, ?, 'online', UTC_TIMESTAMP(6), UTC_TIMESTAMP(6))",
                (owner_user_id, &address, &address, &health_url),
            )
            .await?;
            tx.last_insert_id().context("no id for the new host")?
        }
    };
    let (id, address, health_url, state): (u64, String, String, String) = tx
        .exec_first(
            "SELECT id, address, health_url, state FROM hosts WHERE id = ?",
            (host_id,),
        )
        .await?
        .context("the host vanished")?;
    debug_assert_eq!(state, "online");
    let host = HostRoute {
        id,
        address,
        health_url,
        state: HostState::Online,
    };

    let sid = routes::new_sid();
    tx.exec_drop(
        "INSERT INTO sessions (sid, project_id, user_id, host_id, port, upstream_token, state, created_at)
         VALUES (?, ?, ?, ?, ?, ?, 'running', UTC_TIMESTAMP(6))",
        (&sid, project_id, owner_user_id, host_id, port, upstream_token),
    )
    .await?;
    let session = SessionRoute {
        sid,
        owner: owner_user_id,
        host: host_id,
        port,
        upstream_token: upstream_token.to_owned(),
        state: SessionState::Running,
    };
    publish(
        &mut tx,
        &[
            Change::UpsertHost(host),
            Change::UpsertSession(session.clone()),
        ],
    )
    .await?;
    commit(tx).await?;
    Ok(session)
}

/// Fails with "{what} not found" unless `sql` finds a row.
async fn require(
    tx: &mut mysql_async::Transaction<'_>,
    what: &str,
    sql: &str,
    params: impl Into<mysql_async::Params> + Send,
) -> anyhow::Result<()> {
    let found: Option<u64> = tx.exec_first(sql, params).await?;
    if found.is_none() {
        bail!("{what} not found");
    }
    Ok(())
}

/// Upstream tokens are 1 to [`UPSTREAM_TOKEN_MAX_CHARS`] printable ASCII
/// characters: they travel in a header to the Jupyter server.
pub fn check_upstream_token(token: &str) -> anyhow::Result<()> {
    if token.is_empty()
        || token.len() > UPSTREAM_TOKEN_MAX_CHARS
        || !token.bytes().all(|b| b.is_ascii_graphic())
    {
        bail!(
            "upstream_token: The upstream token must be 1 to {UPSTREAM_TOKEN_MAX_CHARS} printable ASCII characters."
        );
    }
    Ok(())
}
