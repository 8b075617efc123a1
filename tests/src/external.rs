//! A stand-in for the agent: records a Jupyter server that someone else
//! started (a test, a benchmark) as a running session, the way control does
//! for one the agent started, and serves it through a host link of its own
//! (the agent's real link code, on a loopback port). Written against
//! control's public route log (`publish`, `commit`) and the database, so it
//! keeps the guarantees the real path keeps: the host and the session are
//! published in the same transaction that writes them.
//!
//! The stand-in's link certificate comes from control's own host CA (read
//! from control's directory, `HostCa::open`), issued and pinned as a
//! registration would, unless a test hands it another to play a host that
//! lies about who it is.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{bail, Context};
use mysql_async::prelude::*;
use mysql_async::{Pool, TxOpts};
use opencloud_agent::host_link::{self, LinkIdentity, Sessions, Target};
use opencloud_control::host_ca::{Holder, HostCa, Issued};
use opencloud_control::routes::{commit, publish};
use opencloud_protocol::link::{certificate_request, new_private_key};
use opencloud_protocol::routes::{self, Change, HostRoute, HostState, SessionRoute, SessionState};
use tokio::sync::watch;

use crate::wiretap::forbid;

/// A session served by a stand-in host; the host's link stops when this
/// is dropped (or at [`External::stop_link`]), as if the host went away.
pub struct External {
    pub session: SessionRoute,
    /// Where the stand-in host's link listens.
    pub link_addr: SocketAddr,
    /// The host link's private key (PEM).
    pub link_key: String,
    /// What the link presents (and the route table pins).
    pub issued: Issued,
    identity: LinkIdentity,
    sessions: Arc<OneSession>,
    stop: watch::Sender<bool>,
}

impl External {
    pub fn sid(&self) -> &str {
        &self.session.sid
    }

    /// The host's link stops answering (its health probe too).
    pub fn stop_link(&self) {
        self.stop.send_replace(true);
    }

    /// The host comes back on the same address.
    pub fn restart_link(&mut self) -> anyhow::Result<()> {
        let listener = std::net::TcpListener::bind(self.link_addr)?;
        listener.set_nonblocking(true)?;
        self.stop = serve_link(
            tokio::net::TcpListener::from_std(listener)?,
            self.identity.clone(),
            self.sessions.clone(),
        );
        Ok(())
    }
}

impl Drop for External {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

/// Serves a stand-in host's link until the returned sender says stop.
fn serve_link(
    listener: tokio::net::TcpListener,
    identity: LinkIdentity,
    sessions: Arc<OneSession>,
) -> watch::Sender<bool> {
    let (stop, stopped) = watch::channel(false);
    let (_, identity) = watch::channel(Some(identity));
    tokio::spawn(host_link::serve(listener, identity, sessions, stopped));
    stop
}

/// One session, one target: all a stand-in host serves.
struct OneSession(String, Target);

impl Sessions for OneSession {
    fn target(&self, sid: &str) -> Option<Target> {
        (sid == self.0).then(|| self.1.clone())
    }
}

/// Records the server at `target` as a running session of `project_id`
/// owned by `owner_user_id`, on a new host of that user's (online, with a
/// link on a free loopback port and a certificate `ca` issued for it, as at
/// registration). Publishes the host and the session in the same
/// transaction.
pub async fn register_external(
    pool: &Pool,
    ca: &HostCa,
    owner_user_id: u64,
    project_id: u64,
    target: Target,
) -> anyhow::Result<External> {
    register_external_with(pool, owner_user_id, project_id, target, |host, csr| {
        Ok(ca.issue(Holder::Host(host), csr, opencloud_control::now_unix())?)
    })
    .await
}

/// [`register_external`] with the link certificate `issue` makes from the
/// new host's id and its request (PEM): a test's way to play a host
/// presenting something control would never issue it. The route table
/// pins whatever `issue` returns.
pub async fn register_external_with(
    pool: &Pool,
    owner_user_id: u64,
    project_id: u64,
    target: Target,
    issue: impl FnOnce(u64, &str) -> anyhow::Result<Issued>,
) -> anyhow::Result<External> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let link_addr = listener.local_addr()?;
    let link_key = new_private_key()?;
    let csr = certificate_request(&link_key)?;
    let (session, issued) =
        record_host_and_session(pool, owner_user_id, project_id, link_addr, |host| {
            issue(host, &csr)
        })
        .await?;
    forbid(format!("host {}'s link key", session.host), &link_key);
    let identity = LinkIdentity::new(session.host, &issued.certificate, &link_key)?;
    let sessions = Arc::new(OneSession(session.sid.clone(), target));
    let stop = serve_link(listener, identity.clone(), sessions.clone());
    Ok(External {
        session,
        link_addr,
        link_key,
        issued,
        identity,
        sessions,
        stop,
    })
}

/// Records a new online host of `owner_user_id` whose link is said to be at
/// `link_addr`, pinned to the certificate `issue` makes for the new host's
/// id, and a running session of `project_id` on it, as control would after
/// the host's agent registered and reported it ready. Whatever listens at
/// `link_addr` is not asked: this is also how a test plays a host that lies
/// about its address.
pub async fn record_host_and_session(
    pool: &Pool,
    owner_user_id: u64,
    project_id: u64,
    link_addr: SocketAddr,
    issue: impl FnOnce(u64) -> anyhow::Result<Issued>,
) -> anyhow::Result<(SessionRoute, Issued)> {
    let address = link_addr.ip().to_string();
    let health_url = format!("http://{link_addr}/healthz");
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
    tx.exec_drop(
        "INSERT INTO hosts (owner_id, name, address, link_port, health_url, state, created_at, updated_at)
         VALUES (?, ?, ?, ?, ?, 'online', UTC_TIMESTAMP(6), UTC_TIMESTAMP(6))",
        (
            owner_user_id,
            link_addr.to_string(),
            &address,
            link_addr.port(),
            &health_url,
        ),
    )
    .await?;
    let host_id = tx.last_insert_id().context("no id for the new host")?;
    let issued = issue(host_id)?;
    tx.exec_drop(
        "UPDATE hosts SET link_cert_sha256 = ? WHERE id = ?",
        (issued.fingerprint.to_string(), host_id),
    )
    .await?;
    let host = HostRoute {
        id: host_id,
        address,
        link_port: link_addr.port(),
        link_cert_sha256: Some(issued.fingerprint),
        health_url,
        state: HostState::Online,
    };
    let sid = routes::new_sid();
    tx.exec_drop(
        "INSERT INTO sessions (sid, project_id, user_id, host_id, state, created_at)
         VALUES (?, ?, ?, ?, 'running', UTC_TIMESTAMP(6))",
        (&sid, project_id, owner_user_id, host_id),
    )
    .await?;
    let session = SessionRoute {
        sid,
        owner: owner_user_id,
        host: host_id,
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
    Ok((session, issued))
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
