//! A project's versions: the `project_versions` rows and their objects in
//! the store, kept together. A version row is written only after its
//! object is complete and its hash matched, so the latest row always names
//! a whole snapshot; pruning deletes objects and rows oldest first.

use bytes::Bytes;
use futures_util::Stream;
use mysql_async::prelude::*;
use mysql_async::{Pool, TxOpts};

use super::store::{PutFailure, Store};
use crate::error::AppError;

const MIB: u64 = 1 << 20;

/// One stored version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    pub version: u64,
    pub object_key: String,
    pub size_bytes: u64,
    pub sha256: String,
    /// autosave, save, stop, upload or restore.
    pub reason: String,
    /// When it was stored, in Unix seconds.
    pub created_unix: u64,
}

/// A version about to be stored.
#[derive(Debug, Clone)]
pub struct NewVersion<'a> {
    pub project_id: u64,
    /// autosave, save, stop, upload or restore (the column's values).
    pub reason: &'a str,
    pub sid: Option<&'a str>,
    pub host_id: Option<u64>,
    /// What the sender says the body hashes to (lower-case hex).
    pub sha256: &'a str,
    /// The owner's storage quota in bytes.
    pub quota_bytes: u64,
}

/// True for a lower-case hex SHA-256.
pub fn is_sha256(value: &str) -> bool {
    value.len() == 64
        && value
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Bytes the owner of `project_id` already holds in the latest good
/// versions of their other live projects.
async fn others_bytes(conn: &mut impl Queryable, project_id: u64) -> Result<u64, AppError> {
    let held: Option<u64> = conn
        .exec_first(
            "SELECT CAST(COALESCE(SUM(v.size_bytes), 0) AS UNSIGNED)
             FROM projects me
             JOIN projects p ON p.owner_id = me.owner_id AND p.id <> me.id AND p.deleted_at IS NULL
             JOIN project_versions v ON v.project_id = p.id
             WHERE me.id = ? AND v.version = (SELECT MAX(w.version) FROM project_versions w
                                              WHERE w.project_id = p.id AND w.damaged_at IS NULL)",
            (project_id,),
        )
        .await?;
    Ok(held.unwrap_or(0))
}

fn mib(bytes: u64) -> String {
    format!("{} MiB", bytes.div_ceil(MIB))
}

/// Stores `body` as the project's next version. The object goes under a
/// fresh key; the row is inserted (taking the next number under the
/// project row's lock) only once the whole body arrived within the quota
/// and matched its hash. On any failure nothing is stored and the previous
/// version stays the latest.
pub async fn put<E: std::fmt::Display + Send + 'static>(
    pool: &Pool,
    store: &Store,
    new: &NewVersion<'_>,
    declared_len: Option<u64>,
    body: impl Stream<Item = Result<Bytes, E>> + Send + 'static,
) -> Result<(u64, u64), (AppError, &'static str)> {
    let fail = |e: AppError| (e, "internal");
    if !is_sha256(new.sha256) {
        return Err((
            AppError::invalid(
                "sha256",
                "The SHA-256 header must be 64 lower-case hex digits.",
            ),
            "bad_request",
        ));
    }
    let held = others_bytes(
        &mut pool.get_conn().await.map_err(|e| fail(e.into()))?,
        new.project_id,
    )
    .await
    .map_err(fail)?;
    let room = new.quota_bytes.saturating_sub(held);
    let too_large = || {
        AppError::QuotaExceeded(format!(
            "This snapshot is larger than the {} of storage left to the project's owner ({} in all, {} used by their other projects); nothing was stored and the previous version stays the latest.",
            mib(room),
            mib(new.quota_bytes),
            mib(held),
        ))
    };
    if declared_len.is_some_and(|n| n > room) {
        return Err((too_large(), "quota"));
    }
    let key = format!(
        "projects/{}/{}.tar.zst",
        new.project_id,
        crate::ids::random_id()
    );
    // In a task of its own, so a caller that goes away mid-upload (a
    // dropped connection) still ends it with an abort, never half an object.
    let upload = {
        let (store, key, sha256) = (store.clone(), key.clone(), new.sha256.to_owned());
        tokio::spawn(async move { store.put(&key, body, room, &sha256).await })
    };
    let put = upload
        .await
        .unwrap_or_else(|e| Err(PutFailure::Store(format!("the upload task failed: {e}"))));
    let written = match put {
        Ok(written) => written,
        Err(failure) => {
            let label = failure.label();
            let error = match failure {
                PutFailure::TooLarge { .. } => too_large(),
                PutFailure::Mismatch { .. } => AppError::invalid(
                    "sha256",
                    "The body does not match its SHA-256 header; nothing was stored.",
                ),
                PutFailure::Broken(e) => {
                    AppError::BadRequest(format!("The upload broke off ({e}); nothing was stored."))
                }
                PutFailure::Store(e) => AppError::Internal(format!("project store: {e}")),
            };
            return Err((error, label));
        }
    };
    match insert(pool, new, &key, written.size_bytes).await {
        Ok(version) => Ok((version, written.size_bytes)),
        Err(e) => {
            // No row names it, so it must not linger.
            if let Err(delete) = store.delete(&key).await {
                tracing::warn!(key, error = %delete, "deleting an unrecorded snapshot failed");
            }
            Err(fail(e))
        }
    }
}

async fn insert(
    pool: &Pool,
    new: &NewVersion<'_>,
    key: &str,
    size_bytes: u64,
) -> Result<u64, AppError> {
    let mut conn = pool.get_conn().await?;
    let mut tx = conn.start_transaction(TxOpts::default()).await?;
    let found: Option<u64> = tx
        .exec_first(
            "SELECT id FROM projects WHERE id = ? FOR UPDATE",
            (new.project_id,),
        )
        .await?;
    found.ok_or(AppError::NotFound("project"))?;
    let version: u64 = tx
        .exec_first(
            "SELECT CAST(COALESCE(MAX(version), 0) + 1 AS UNSIGNED) FROM project_versions
             WHERE project_id = ?",
            (new.project_id,),
        )
        .await?
        .unwrap_or(1);
    tx.exec_drop(
        "INSERT INTO project_versions (project_id, version, object_key, size_bytes, sha256,
            reason, sid, host_id, created_at)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, UTC_TIMESTAMP(6))",
        (
            new.project_id,
            version,
            key,
            size_bytes,
            new.sha256,
            new.reason,
            new.sid,
            new.host_id,
        ),
    )
    .await?;
    tx.commit().await?;
    Ok(version)
}

type VersionRow = (u64, String, u64, String, String, u64);

const COLUMNS: &str = "version, object_key, size_bytes, sha256, reason, \
    CAST(TIMESTAMPDIFF(SECOND, '1970-01-01', created_at) AS UNSIGNED)";

fn from_row(
    (version, object_key, size_bytes, sha256, reason, created_unix): VersionRow,
) -> Version {
    Version {
        version,
        object_key,
        size_bytes,
        sha256,
        reason,
        created_unix,
    }
}

/// The project's latest version not marked damaged, or the latest such one
/// older than `before`.
pub async fn latest_good(
    conn: &mut impl Queryable,
    project_id: u64,
    before: Option<u64>,
) -> Result<Option<Version>, AppError> {
    let row: Option<VersionRow> = conn
        .exec_first(
            format!(
                "SELECT {COLUMNS} FROM project_versions
                 WHERE project_id = ? AND damaged_at IS NULL AND version < ?
                 ORDER BY version DESC LIMIT 1"
            ),
            (project_id, before.unwrap_or(u64::MAX)),
        )
        .await?;
    Ok(row.map(from_row))
}

/// A version as My projects lists it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Listed {
    pub version: u64,
    pub size_bytes: u64,
    pub reason: String,
    /// Unix seconds.
    pub created_at: u64,
    pub damaged: bool,
}

/// Every version of the project, newest first.
pub async fn list(conn: &mut impl Queryable, project_id: u64) -> Result<Vec<Listed>, AppError> {
    let rows: Vec<(u64, u64, String, u64, bool)> = conn
        .exec(
            "SELECT version, size_bytes, reason,
                CAST(TIMESTAMPDIFF(SECOND, '1970-01-01', created_at) AS UNSIGNED),
                damaged_at IS NOT NULL
             FROM project_versions WHERE project_id = ? ORDER BY version DESC",
            (project_id,),
        )
        .await?;
    Ok(rows
        .into_iter()
        .map(
            |(version, size_bytes, reason, created_at, damaged)| Listed {
                version,
                size_bytes,
                reason,
                created_at,
                damaged,
            },
        )
        .collect())
}

/// Version `version` of the project with whether it is damaged.
pub async fn get(
    conn: &mut impl Queryable,
    project_id: u64,
    version: u64,
) -> Result<Option<(Version, bool)>, AppError> {
    let row: Option<(u64, String, u64, String, String, u64, bool)> = conn
        .exec_first(
            format!(
                "SELECT {COLUMNS}, damaged_at IS NOT NULL FROM project_versions
                 WHERE project_id = ? AND version = ?"
            ),
            (project_id, version),
        )
        .await?;
    Ok(row.map(|(v, k, size, sha, reason, created, damaged)| {
        (from_row((v, k, size, sha, reason, created)), damaged)
    }))
}

/// Marks `version` damaged so it is never restored again; false when the
/// project has no such version.
pub async fn mark_damaged(
    conn: &mut impl Queryable,
    project_id: u64,
    version: u64,
) -> Result<bool, AppError> {
    let found: Option<u64> = conn
        .exec_first(
            "SELECT id FROM project_versions WHERE project_id = ? AND version = ?",
            (project_id, version),
        )
        .await?;
    let Some(id) = found else {
        return Ok(false);
    };
    conn.exec_drop(
        "UPDATE project_versions SET damaged_at = COALESCE(damaged_at, UTC_TIMESTAMP(6))
         WHERE id = ?",
        (id,),
    )
    .await?;
    Ok(true)
}

/// Deletes the project's versions beyond the newest `keep`, oldest first,
/// each object before its row (a row never names a missing object unless
/// the row's delete failed). The latest good version is kept whatever its
/// place. Returns how many went.
pub async fn prune(
    pool: &Pool,
    store: &Store,
    project_id: u64,
    keep: u32,
) -> Result<u64, AppError> {
    let mut conn = pool.get_conn().await?;
    let latest = latest_good(&mut conn, project_id, None)
        .await?
        .map(|v| v.version);
    let old: Vec<(u64, u64, String)> = conn
        .exec(
            "SELECT id, version, object_key FROM project_versions WHERE project_id = ?
             ORDER BY version DESC LIMIT 18446744073709551615 OFFSET ?",
            (project_id, keep),
        )
        .await?;
    let mut pruned = 0;
    for (id, version, key) in old.into_iter().rev() {
        if Some(version) == latest {
            continue;
        }
        if let Err(e) = store.delete(&key).await {
            tracing::warn!(project = project_id, version, error = %e, "pruning a snapshot failed");
            continue;
        }
        conn.exec_drop("DELETE FROM project_versions WHERE id = ?", (id,))
            .await?;
        pruned += 1;
    }
    Ok(pruned)
}

/// Bytes every stored version takes, for the store size gauge.
pub async fn total_bytes(pool: &Pool) -> Result<u64, AppError> {
    let total: Option<u64> = pool
        .get_conn()
        .await?
        .query_first("SELECT CAST(COALESCE(SUM(size_bytes), 0) AS UNSIGNED) FROM project_versions")
        .await?;
    Ok(total.unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::super::store::tests::{chunks, files, sha, temp_store};
    use super::super::tests::test_db;
    use super::*;

    fn new(project_id: u64, sha256: &str, quota_bytes: u64) -> NewVersion<'_> {
        NewVersion {
            project_id,
            reason: "autosave",
            sid: None,
            host_id: None,
            sha256,
            quota_bytes,
        }
    }

    async fn push(pool: &Pool, store: &Store, project: u64, body: &[u8]) -> u64 {
        let sum = sha(body);
        put(
            pool,
            store,
            &new(project, &sum, 100 * MIB),
            None,
            chunks(vec![Ok(Bytes::copy_from_slice(body))]),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap()
        .0
    }

    async fn latest(pool: &Pool, project: u64, before: Option<u64>) -> Option<u64> {
        latest_good(&mut pool.get_conn().await.unwrap(), project, before)
            .await
            .unwrap()
            .map(|v| v.version)
    }

    #[tokio::test]
    async fn failed_puts_never_become_latest_and_store_nothing() {
        let db = test_db().await;
        let (pool, project) = (&db.pool, db.project);
        let (store, dir) = temp_store("failed-puts");
        assert_eq!(push(pool, &store, project, b"first").await, 1);
        let body = vec![3u8; 2 * MIB as usize];
        let sum = sha(&body);
        // Half a body, then the connection drops.
        let (_, label) = put(
            pool,
            &store,
            &new(project, &sum, 100 * MIB),
            None,
            chunks(vec![
                Ok(Bytes::copy_from_slice(&body[..MIB as usize])),
                Err("reset".into()),
            ]),
        )
        .await
        .unwrap_err();
        assert_eq!(label, "upload_broken");
        // All of it, but not what the header says.
        let (e, label) = put(
            pool,
            &store,
            &new(project, &sha(b"else"), 100 * MIB),
            None,
            chunks(vec![Ok(Bytes::from(body.clone()))]),
        )
        .await
        .unwrap_err();
        assert_eq!((label, e.field()), ("sha256_mismatch", Some("sha256")));
        // Over the quota, as the body shows and as its length says.
        let (e, label) = put(
            pool,
            &store,
            &new(project, &sum, MIB),
            None,
            chunks(vec![Ok(Bytes::from(body.clone()))]),
        )
        .await
        .unwrap_err();
        assert_eq!(label, "quota");
        assert!(
            matches!(e, AppError::QuotaExceeded(ref m) if m.contains("1 MiB")),
            "{e}"
        );
        let (_, label) = put(
            pool,
            &store,
            &new(project, &sum, MIB),
            Some(body.len() as u64),
            chunks(vec![Ok(Bytes::from(body.clone()))]),
        )
        .await
        .unwrap_err();
        assert_eq!(label, "quota");
        assert_eq!(latest(pool, project, None).await, Some(1));
        assert_eq!(files(&dir).len(), 1, "{:?}", files(&dir));
        std::fs::remove_dir_all(dir).ok();
    }

    #[tokio::test]
    async fn damaged_versions_are_skipped_and_before_goes_back() {
        let db = test_db().await;
        let (pool, project) = (&db.pool, db.project);
        let (store, dir) = temp_store("damaged");
        for body in [b"one", b"two", b"six"] {
            push(pool, &store, project, body).await;
        }
        assert_eq!(latest(pool, project, None).await, Some(3));
        assert_eq!(latest(pool, project, Some(3)).await, Some(2));
        let mut conn = pool.get_conn().await.unwrap();
        assert!(mark_damaged(&mut conn, project, 3).await.unwrap());
        assert!(!mark_damaged(&mut conn, project, 9).await.unwrap());
        drop(conn);
        assert_eq!(latest(pool, project, None).await, Some(2));
        assert_eq!(latest(pool, project, Some(1)).await, None);
        // Numbers go on after a damaged one.
        assert_eq!(push(pool, &store, project, b"new").await, 4);
        std::fs::remove_dir_all(dir).ok();
    }

    #[tokio::test]
    async fn pruning_keeps_the_newest_n_with_their_objects() {
        let db = test_db().await;
        let (pool, project) = (&db.pool, db.project);
        let (store, dir) = temp_store("prune");
        for n in 0..5u8 {
            push(pool, &store, project, &[n; 10]).await;
        }
        assert_eq!(prune(pool, &store, project, 3).await.unwrap(), 2);
        let kept: Vec<u64> = pool
            .get_conn()
            .await
            .unwrap()
            .exec(
                "SELECT version FROM project_versions WHERE project_id = ? ORDER BY version",
                (project,),
            )
            .await
            .unwrap();
        assert_eq!(kept, vec![3, 4, 5]);
        assert_eq!(files(&dir).len(), 3);
        // The only good version survives however far back it is.
        let mut conn = pool.get_conn().await.unwrap();
        for v in [4, 5] {
            mark_damaged(&mut conn, project, v).await.unwrap();
        }
        drop(conn);
        assert_eq!(prune(pool, &store, project, 1).await.unwrap(), 1);
        assert_eq!(latest(pool, project, None).await, Some(3));
        std::fs::remove_dir_all(dir).ok();
    }
}
