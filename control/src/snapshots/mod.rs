//! Project snapshots (issue 15): a project's files live in the project
//! store, so they follow the user from host to host. This file is what
//! agents may do with them (the contract is `opencloud_protocol::snapshots`):
//! pull, push and report damaged versions, each only for a session their
//! host runs now, with the metrics of each.
//!
//! The rooms: [`store`] (objects in the store) and [`versions`] (the
//! version rows and their objects together).

pub mod files;
pub mod store;
pub mod versions;
pub mod zipped;

use std::time::Instant;

use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::{Stream, StreamExt};
use mysql_async::prelude::*;
use mysql_async::Pool;
use opencloud_protocol::routes;
use opencloud_protocol::snapshots::{Reason, Stored};

use crate::billing::ledger;
use crate::config::{StorePolicy, TrialLimits};
use crate::error::AppError;
use crate::sessions::state::live_sql;
use store::Store;
use versions::{NewVersion, Version};

const MIB: u64 = 1 << 20;

/// A session the calling host runs now, and whose project it is.
struct HostSession {
    project_id: u64,
    owner_id: u64,
}

fn failed(direction: &'static str, host_id: u64, reason: &'static str) {
    metrics::counter!("opencloud_control_snapshot_failures_total",
        "direction" => direction, "reason" => reason, "host" => host_id.to_string())
    .increment(1);
}

/// The live session `sid` of host `host_id`; anything else is refused as
/// missing and logged with host and sid.
async fn host_session(
    conn: &mut impl Queryable,
    host_id: u64,
    sid: &str,
    what: &'static str,
) -> Result<HostSession, AppError> {
    let found: Option<(u64, u64)> = if routes::is_valid_sid(sid) {
        conn.exec_first(
            format!(
                "SELECT s.project_id, p.owner_id FROM sessions s JOIN projects p ON p.id = s.project_id
                 WHERE s.sid = ? AND s.host_id = ? AND s.state IN ({})",
                live_sql()
            ),
            (sid, host_id),
        )
        .await?
    } else {
        None
    };
    match found {
        Some((project_id, owner_id)) => Ok(HostSession {
            project_id,
            owner_id,
        }),
        None => {
            tracing::warn!(
                sid,
                host = host_id,
                what,
                "snapshot call refused: the host does not run this session"
            );
            Err(AppError::NotFound("session"))
        }
    }
}

/// The owner's storage quota in bytes: the largest among their live lots,
/// else the trial's.
pub(crate) async fn quota_bytes(
    conn: &mut impl Queryable,
    owner_id: u64,
    trial: &TrialLimits,
) -> Result<u64, AppError> {
    let plan = ledger::plan(conn, owner_id).await?;
    let mib = plan.limits.map_or(trial.storage_mib, |l| l.storage_mib);
    Ok(u64::from(mib) * MIB)
}

/// A version on its way to an agent.
pub struct Pulled {
    pub version: Version,
    pub body: BoxStream<'static, Result<Bytes, object_store::Error>>,
}

/// Records the bytes sent and the time taken when the download ends
/// (completed or dropped).
struct OutMeter {
    host: String,
    bytes: u64,
    started: Instant,
}

impl Drop for OutMeter {
    fn drop(&mut self) {
        metrics::counter!("opencloud_control_snapshot_bytes_total", "direction" => "out", "host" => self.host.clone())
            .increment(self.bytes);
        metrics::histogram!("opencloud_control_snapshot_duration_seconds", "direction" => "out")
            .record(self.started.elapsed().as_secs_f64());
    }
}

/// The latest good version of the session's project (older than `before`
/// when given) for host `host_id`, or `None` when there is none. Records
/// on the session which version it was restored from.
pub async fn pull(
    pool: &Pool,
    store: &Store,
    host_id: u64,
    sid: &str,
    before: Option<u64>,
) -> Result<Option<Pulled>, AppError> {
    let started = Instant::now();
    let mut conn = pool.get_conn().await?;
    let session = match host_session(&mut conn, host_id, sid, "pull").await {
        Ok(session) => session,
        Err(e) => {
            failed("out", host_id, "refused");
            return Err(e);
        }
    };
    let Some(version) = versions::latest_good(&mut conn, session.project_id, before).await? else {
        return Ok(None);
    };
    let body = store.get(&version.object_key).await.map_err(|e| {
        failed("out", host_id, "store");
        AppError::Internal(format!(
            "project store: version {} of project {}: {e}",
            version.version, session.project_id
        ))
    })?;
    conn.exec_drop(
        "UPDATE sessions s JOIN project_versions v ON v.project_id = ? AND v.version = ?
         SET s.restored_version = v.version, s.restored_from_at = v.created_at
         WHERE s.sid = ?",
        (session.project_id, version.version, sid),
    )
    .await?;
    tracing::info!(
        sid,
        host = host_id,
        project = session.project_id,
        version = version.version,
        "snapshot pulled"
    );
    let mut meter = OutMeter {
        host: host_id.to_string(),
        bytes: 0,
        started,
    };
    let body = body
        .map(move |chunk| {
            // The whole meter moves into the stream, to be dropped with it.
            let meter = &mut meter;
            if let Ok(bytes) = &chunk {
                meter.bytes += bytes.len() as u64;
            }
            chunk
        })
        .boxed();
    Ok(Some(Pulled { version, body }))
}

/// A snapshot pushed by an agent.
pub struct Push<'a> {
    pub host_id: u64,
    pub sid: &'a str,
    pub reason: Reason,
    pub sha256: &'a str,
    /// The Content-Length, when the agent sent one: refused at once when
    /// already over the quota.
    pub declared_len: Option<u64>,
}

/// Stores the session's project snapshot `body` as its next version, then
/// prunes the project beyond `policy.keep_versions`.
pub async fn push<E: std::fmt::Display + Send + 'static>(
    pool: &Pool,
    store: &Store,
    policy: &StorePolicy,
    trial: &TrialLimits,
    push: &Push<'_>,
    body: impl Stream<Item = Result<Bytes, E>> + Send + 'static,
) -> Result<Stored, AppError> {
    let started = Instant::now();
    let host_id = push.host_id;
    let (session, quota) = {
        let mut conn = pool.get_conn().await?;
        let session = match host_session(&mut conn, host_id, push.sid, "push").await {
            Ok(session) => session,
            Err(e) => {
                failed("in", host_id, "refused");
                return Err(e);
            }
        };
        let quota = quota_bytes(&mut conn, session.owner_id, trial).await?;
        (session, quota)
    };
    let new = NewVersion {
        project_id: session.project_id,
        reason: push.reason.as_str(),
        sid: Some(push.sid),
        host_id: Some(host_id),
        sha256: push.sha256,
        quota_bytes: quota,
    };
    let (version, size_bytes) = match versions::put(pool, store, &new, push.declared_len, body)
        .await
    {
        Ok(stored) => stored,
        Err((e, label)) => {
            failed("in", host_id, label);
            tracing::warn!(
                sid = push.sid,
                host = host_id,
                project = session.project_id,
                reason = label,
                "snapshot push refused"
            );
            if let AppError::QuotaExceeded(why) = &e {
                // The owner sees it next to the session on My projects.
                let notice = format!(
                    "Your files could not be saved: {why} Delete files you no longer need, or buy a package with more storage."
                );
                pool.get_conn()
                    .await?
                    .exec_drop(
                        "UPDATE sessions SET notice = ? WHERE sid = ?",
                        (notice, push.sid),
                    )
                    .await?;
            }
            return Err(e);
        }
    };
    metrics::counter!("opencloud_control_snapshot_bytes_total", "direction" => "in", "host" => host_id.to_string())
        .increment(size_bytes);
    metrics::histogram!("opencloud_control_snapshot_duration_seconds", "direction" => "in")
        .record(started.elapsed().as_secs_f64());
    tracing::info!(
        sid = push.sid,
        host = host_id,
        project = session.project_id,
        version,
        size_bytes,
        reason = push.reason.as_str(),
        "snapshot stored"
    );
    // A failed prune only keeps more than asked; the next push tries again.
    if let Err(e) = versions::prune(pool, store, session.project_id, policy.keep_versions).await {
        tracing::warn!(project = session.project_id, error = %e, "pruning snapshots failed");
    }
    Ok(Stored {
        version,
        size_bytes,
    })
}

/// An agent found `version` of the session's project not matching its
/// hash: it is marked so it is never restored again, and the owner is told.
pub async fn damaged(pool: &Pool, host_id: u64, sid: &str, version: u64) -> Result<(), AppError> {
    let mut conn = pool.get_conn().await?;
    let session = host_session(&mut conn, host_id, sid, "damaged").await?;
    if !versions::mark_damaged(&mut conn, session.project_id, version).await? {
        return Err(AppError::NotFound("version"));
    }
    conn.exec_drop(
        "UPDATE sessions SET notice = ? WHERE sid = ?",
        (
            format!(
                "The latest snapshot of your files (version {version}) was damaged, so an older one was used."
            ),
            sid,
        ),
    )
    .await?;
    failed("out", host_id, "damaged");
    tracing::warn!(
        sid,
        host = host_id,
        project = session.project_id,
        version,
        "snapshot reported damaged"
    );
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use mysql_async::prelude::*;
    use mysql_async::Pool;

    fn server() -> String {
        std::env::var("OPENCLOUD_TEST_MYSQL")
            .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".into())
    }

    /// A fresh database (migrated) with one user and one project, dropped
    /// with this value.
    pub(crate) struct TestDb {
        pub pool: Pool,
        pub project: u64,
        name: String,
    }

    impl Drop for TestDb {
        fn drop(&mut self) {
            let (server, name) = (server(), self.name.clone());
            // Drop runs outside async context; a short-lived runtime does the SQL.
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .ok()?;
                rt.block_on(async {
                    let pool = Pool::new(server.as_str());
                    let mut conn = pool.get_conn().await.ok()?;
                    conn.query_drop(format!("DROP DATABASE IF EXISTS `{name}`"))
                        .await
                        .ok()?;
                    drop(conn);
                    pool.disconnect().await.ok()
                })
            })
            .join();
        }
    }

    pub(crate) async fn test_db() -> TestDb {
        let server = server();
        let name = format!("oc_unit_{}", crate::ids::random_id().replace('-', "_"));
        let admin = Pool::new(server.as_str());
        let mut conn = admin
            .get_conn()
            .await
            .expect("MariaDB for the unit tests (OPENCLOUD_TEST_MYSQL)");
        conn.query_drop(format!("CREATE DATABASE `{name}`"))
            .await
            .unwrap();
        drop(conn);
        admin.disconnect().await.ok();
        let opts = mysql_async::OptsBuilder::from_opts(
            mysql_async::Opts::from_url(&format!("{server}/{name}")).unwrap(),
        )
        .init(vec!["SET time_zone = '+00:00'"]);
        let pool = Pool::new(opts);
        crate::db::migrate(&pool).await.unwrap();
        let mut conn = pool.get_conn().await.unwrap();
        conn.query_drop(
            "INSERT INTO users (email, name, password_hash) VALUES ('a@example.com', 'A', 'x')",
        )
        .await
        .unwrap();
        let user = conn.last_insert_id().unwrap();
        conn.exec_drop(
            "INSERT INTO projects (owner_id, name, description) VALUES (?, 'P', '')",
            (user,),
        )
        .await
        .unwrap();
        let project = conn.last_insert_id().unwrap();
        drop(conn);
        TestDb {
            pool,
            project,
            name,
        }
    }
}
