//! A project's files for its owner (issue 15, "My projects"): the version
//! history, a version as a zip, a zip uploaded as a new version, and an
//! older version restored as a new one. Every new version goes through
//! [`versions::put`], as agents' snapshots do, so quota, hashing and
//! atomicity are theirs; nothing is ever overwritten.

use std::io::{self, Read, Write};

use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::{Stream, StreamExt};
use mysql_async::prelude::*;
use mysql_async::Pool;
use sha2::Digest;
use tokio::sync::mpsc;

use super::store::Store;
use super::versions::{self, Listed, NewVersion};
use super::zipped;
use crate::config::{StorePolicy, TrialLimits};
use crate::error::AppError;
use crate::sessions::state::live_sql;

/// What an uploaded zip may take beyond the quota (zip headers).
pub const UPLOAD_MARGIN: u64 = 16 << 20;

/// The project `project_id` when `user` owns it (else not found), with its name.
async fn owned(conn: &mut impl Queryable, user: u64, project_id: u64) -> Result<String, AppError> {
    let name: Option<String> = conn
        .exec_first(
            "SELECT name FROM projects WHERE id = ? AND owner_id = ? AND deleted_at IS NULL",
            (project_id, user),
        )
        .await?;
    name.ok_or(AppError::NotFound("project"))
}

/// The project's versions, newest first, for its owner.
pub async fn list(pool: &Pool, user: u64, project_id: u64) -> Result<Vec<Listed>, AppError> {
    let mut conn = pool.get_conn().await?;
    owned(&mut conn, user, project_id).await?;
    versions::list(&mut conn, project_id).await
}

/// The storage quota (bytes) of the user owning the project.
pub async fn quota(pool: &Pool, user: u64, trial: &TrialLimits) -> Result<u64, AppError> {
    super::quota_bytes(&mut pool.get_conn().await?, user, trial).await
}

/// Refuses while the project has a live session: its next autosave would
/// overwrite what is stored now.
async fn not_live(conn: &mut impl Queryable, project_id: u64) -> Result<(), AppError> {
    let live: Option<String> = conn
        .exec_first(
            format!(
                "SELECT sid FROM sessions WHERE project_id = ? AND state IN ({}) LIMIT 1",
                live_sql()
            ),
            (project_id,),
        )
        .await?;
    match live {
        Some(_) => Err(AppError::Conflict {
            field: None,
            message: "The project has a running session; stop the session first, or its next autosave would overwrite these files.".into(),
        }),
        None => Ok(()),
    }
}

/// A version on its way out as a zip.
pub struct Download {
    /// `<project name>-v<N>.zip`, safe for a header.
    pub filename: String,
    pub body: BoxStream<'static, Result<Bytes, io::Error>>,
}

/// A filename of letters, digits, `-`, `_` and `.` only.
pub fn safe_filename(name: &str, version: u64) -> String {
    let mut stem: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(80)
        .collect();
    if stem.trim_matches('_').is_empty() {
        stem = "project".into();
    }
    format!("{stem}-v{version}.zip")
}

/// Blocking reads of an async byte stream.
struct ChannelReader {
    rx: mpsc::Receiver<Result<Bytes, io::Error>>,
    chunk: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.chunk.is_empty() {
            match self.rx.blocking_recv() {
                None => return Ok(0),
                Some(chunk) => self.chunk = chunk?,
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk.split_to(n));
        Ok(n)
    }
}

/// Blocking writes into an async byte stream, in 64 KiB chunks.
struct ChannelWriter {
    tx: mpsc::Sender<Result<Bytes, io::Error>>,
    buf: Vec<u8>,
}

const CHUNK: usize = 64 << 10;

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.flush()?;
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::take(&mut self.buf));
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the download went away"))
    }
}

/// Version `version` (the latest good one when `None`) of the project as
/// a zip, converted as it streams.
pub async fn download(
    pool: &Pool,
    store: &Store,
    user: u64,
    project_id: u64,
    version: Option<u64>,
) -> Result<Download, AppError> {
    let mut conn = pool.get_conn().await?;
    let name = owned(&mut conn, user, project_id).await?;
    let found = match version {
        Some(n) => match versions::get(&mut conn, project_id, n).await? {
            Some((_, true)) => {
                return Err(AppError::invalid(
                    "version",
                    format!("Version {n} is damaged and cannot be downloaded."),
                ))
            }
            found => found.map(|(v, _)| v),
        },
        None => versions::latest_good(&mut conn, project_id, None).await?,
    };
    drop(conn);
    let version = found.ok_or(AppError::NotFound("version"))?;
    let mut stored = store.get(&version.object_key).await.map_err(|e| {
        AppError::Internal(format!(
            "project store: version {} of project {project_id}: {e}",
            version.version
        ))
    })?;
    let (in_tx, in_rx) = mpsc::channel(4);
    tokio::spawn(async move {
        while let Some(chunk) = stored.next().await {
            if in_tx.send(chunk.map_err(io::Error::other)).await.is_err() {
                break;
            }
        }
    });
    let (out_tx, out_rx) = mpsc::channel(4);
    let sha256 = version.sha256.clone();
    tokio::task::spawn_blocking(move || {
        let input = zipped::Checked {
            inner: ChannelReader {
                rx: in_rx,
                chunk: Bytes::new(),
            },
            hash: sha2::Sha256::new(),
            expected: sha256,
        };
        let writer = ChannelWriter {
            tx: out_tx.clone(),
            buf: Vec::new(),
        };
        if let Err(e) = zipped::snapshot_to_zip(input, writer) {
            tracing::warn!(project = project_id, error = %e, "a zip download failed");
            let _ = out_tx.blocking_send(Err(e));
        }
    });
    let body = futures_util::stream::unfold(out_rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (chunk, rx))
    })
    .boxed();
    Ok(Download {
        filename: safe_filename(&name, version.version),
        body,
    })
}

/// An upload on its way in.
pub struct Upload<'a> {
    pub user: u64,
    pub project_id: u64,
    pub quota_bytes: u64,
    /// The Content-Length, when sent: refused at once when over the limit.
    pub declared_len: Option<u64>,
    pub policy: &'a StorePolicy,
}

/// The limit on an uploaded zip's own size.
pub fn upload_limit(quota_bytes: u64) -> u64 {
    quota_bytes.saturating_add(UPLOAD_MARGIN)
}

fn too_large(limit: u64) -> AppError {
    AppError::QuotaExceeded(format!(
        "The zip is larger than the {} MiB allowed (the owner's storage and a margin); nothing was stored.",
        limit >> 20
    ))
}

/// Spools `body` to an unnamed temp file (owner-only), at most `limit` bytes.
async fn spool<E: std::fmt::Display>(
    body: impl Stream<Item = Result<Bytes, E>>,
    limit: u64,
) -> Result<std::fs::File, AppError> {
    let file = tokio::task::spawn_blocking(tempfile::tempfile)
        .await
        .map_err(|e| AppError::Internal(format!("spooling an upload: {e}")))?
        .map_err(|e| AppError::Internal(format!("spooling an upload: {e}")))?;
    let mut file = tokio::fs::File::from_std(file);
    let mut body = std::pin::pin!(body);
    let mut size = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| {
            AppError::BadRequest(format!("The upload broke off ({e}); nothing was stored."))
        })?;
        size += chunk.len() as u64;
        if size > limit {
            return Err(too_large(limit));
        }
        tokio::io::AsyncWriteExt::write_all(&mut file, &chunk)
            .await
            .map_err(|e| AppError::Internal(format!("spooling an upload: {e}")))?;
    }
    tokio::io::AsyncWriteExt::flush(&mut file)
        .await
        .map_err(|e| AppError::Internal(format!("spooling an upload: {e}")))?;
    Ok(file.into_std().await)
}

/// A file read from its start as a stream.
fn file_stream(file: std::fs::File) -> impl Stream<Item = Result<Bytes, io::Error>> + Send {
    let file = tokio::fs::File::from_std(file);
    futures_util::stream::unfold(file, |mut file| async move {
        let mut buf = vec![0u8; CHUNK];
        match tokio::io::AsyncReadExt::read(&mut file, &mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(Bytes::from(buf)), file))
            }
            Err(e) => Some((Err(e), file)),
        }
    })
}

/// Stores the zip `body` as the project's next version (reason `upload`),
/// replacing its files with the zip's. A hostile, broken or too large zip
/// is refused and stores nothing.
pub async fn upload<E: std::fmt::Display>(
    pool: &Pool,
    store: &Store,
    up: &Upload<'_>,
    body: impl Stream<Item = Result<Bytes, E>>,
) -> Result<u64, AppError> {
    {
        let mut conn = pool.get_conn().await?;
        owned(&mut conn, up.user, up.project_id).await?;
        not_live(&mut conn, up.project_id).await?;
    }
    let limit = upload_limit(up.quota_bytes);
    if up.declared_len.is_some_and(|n| n > limit) {
        return Err(too_large(limit));
    }
    let zip = spool(body, limit).await?;
    let quota = up.quota_bytes;
    let converted = tokio::task::spawn_blocking(move || {
        let mut snapshot = tempfile::tempfile()
            .map_err(|e| AppError::Internal(format!("converting an upload: {e}")))?;
        let converted = zipped::zip_to_snapshot(
            io::BufReader::new(zip),
            io::BufWriter::new(&mut snapshot),
            quota,
            crate::clock::now_unix(),
        )?;
        io::Seek::rewind(&mut snapshot)
            .map_err(|e| AppError::Internal(format!("converting an upload: {e}")))?;
        Ok::<_, AppError>((converted, snapshot))
    })
    .await
    .map_err(|e| AppError::Internal(format!("converting an upload: {e}")))??;
    let (converted, snapshot) = converted;
    let new = NewVersion {
        project_id: up.project_id,
        reason: "upload",
        sid: None,
        host_id: None,
        sha256: &converted.sha256,
        quota_bytes: up.quota_bytes,
    };
    let (version, _) = versions::put(
        pool,
        store,
        &new,
        Some(converted.size),
        file_stream(snapshot),
    )
    .await
    .map_err(|(e, _)| e)?;
    tracing::info!(
        project = up.project_id,
        version,
        files = converted.files,
        bytes = converted.bytes,
        "zip uploaded"
    );
    prune(pool, store, up.project_id, up.policy).await;
    Ok(version)
}

async fn prune(pool: &Pool, store: &Store, project_id: u64, policy: &StorePolicy) {
    // A failed prune only keeps more than asked; the next version tries again.
    if let Err(e) = versions::prune(pool, store, project_id, policy.keep_versions).await {
        tracing::warn!(project = project_id, error = %e, "pruning snapshots failed");
    }
}

/// Copies version `version` as the project's next version (reason
/// `restore`); returns the new number.
pub async fn restore(
    pool: &Pool,
    store: &Store,
    policy: &StorePolicy,
    trial: &TrialLimits,
    user: u64,
    project_id: u64,
    version: u64,
) -> Result<u64, AppError> {
    let (old, quota) = {
        let mut conn = pool.get_conn().await?;
        owned(&mut conn, user, project_id).await?;
        let old = match versions::get(&mut conn, project_id, version).await? {
            None => return Err(AppError::NotFound("version")),
            Some((_, true)) => {
                return Err(AppError::invalid(
                    "version",
                    format!("Version {version} is damaged and cannot be restored."),
                ))
            }
            Some((old, false)) => old,
        };
        not_live(&mut conn, project_id).await?;
        (old, super::quota_bytes(&mut conn, user, trial).await?)
    };
    let body = store.get(&old.object_key).await.map_err(|e| {
        AppError::Internal(format!(
            "project store: version {version} of project {project_id}: {e}"
        ))
    })?;
    let new = NewVersion {
        project_id,
        reason: "restore",
        sid: None,
        host_id: None,
        sha256: &old.sha256,
        quota_bytes: quota,
    };
    let (restored, _) = versions::put(pool, store, &new, Some(old.size_bytes), body)
        .await
        .map_err(|(e, _)| e)?;
    tracing::info!(
        project = project_id,
        from = version,
        version = restored,
        "version restored"
    );
    prune(pool, store, project_id, policy).await;
    Ok(restored)
}

#[cfg(test)]
mod tests {
    use super::super::store::tests::temp_store;
    use super::super::tests::test_db;
    use super::*;

    #[test]
    fn filenames_are_safe() {
        assert_eq!(
            safe_filename("My \"proj\"\r\n/x", 3),
            "My__proj____x-v3.zip"
        );
        assert_eq!(safe_filename("../", 1), "project-v1.zip");
    }

    #[tokio::test]
    async fn uploads_are_refused_while_a_session_is_live() {
        let db = test_db().await;
        let (store, dir) = temp_store("files-live");
        let mut conn = db.pool.get_conn().await.unwrap();
        let owner: u64 = conn
            .exec_first("SELECT owner_id FROM projects WHERE id = ?", (db.project,))
            .await
            .unwrap()
            .unwrap();
        drop(conn);
        let policy = StorePolicy {
            location: crate::config::StoreLocation::Local(dir.clone()),
            keep_versions: 10,
        };
        let up = Upload {
            user: owner,
            project_id: db.project,
            quota_bytes: 100 << 20,
            declared_len: None,
            policy: &policy,
        };
        let not_zip =
            || futures_util::stream::iter([Ok::<_, io::Error>(Bytes::from_static(b"nope"))]);
        let e = upload(&db.pool, &store, &up, not_zip()).await.unwrap_err();
        assert!(e.to_string().contains("not a zip"), "{e}");
        // Someone else's project is not found.
        let other = Upload {
            user: owner + 1,
            ..up
        };
        let e = upload(&db.pool, &store, &other, not_zip())
            .await
            .unwrap_err();
        assert!(matches!(e, AppError::NotFound("project")), "{e}");
        mark_live(&db.pool, db.project).await;
        let e = upload(&db.pool, &store, &up, not_zip()).await.unwrap_err();
        assert!(matches!(e, AppError::Conflict { .. }), "{e}");
        assert!(e.to_string().contains("stop the session first"));
        std::fs::remove_dir_all(dir).ok();
    }

    async fn mark_live(pool: &Pool, project: u64) {
        let mut conn = pool.get_conn().await.unwrap();
        // No host or user rows needed: only the state is looked at.
        conn.query_drop("SET foreign_key_checks = 0").await.unwrap();
        conn.exec_drop(
            "INSERT INTO sessions (sid, project_id, user_id, host_id, state)
             VALUES ('01ARZ3NDEKTSV4RRFFQ69G5FAV', ?, 1, 1, 'running')",
            (project,),
        )
        .await
        .unwrap();
    }
}
