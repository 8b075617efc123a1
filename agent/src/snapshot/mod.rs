//! Project snapshots (issue 15): a project's files never live only on a
//! host. Before Jupyter starts, the project's latest snapshot is restored
//! from control; while it runs and when it stops, the files are pushed back
//! when they changed. The format is [`archive`]'s; the contract with
//! control is `opencloud_protocol::snapshots`.
//!
//! Archives pass through temporary files in `work_dir/snapshots/` (0700),
//! never whole in memory. That directory also keeps, per project, which
//! version the local directory matched when it was last pushed or
//! restored (with the tree's fingerprint then): an unchanged project is
//! neither downloaded at start nor uploaded again.

pub mod archive;

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use futures_util::StreamExt;
use opencloud_protocol::snapshots::{Reason, Stored};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::client::{ClientError, ControlClient};
pub use archive::{Fingerprint, Owner};

/// Upload chunks: big enough that a 100 MB snapshot is a few thousand.
const UPLOAD_CHUNK: usize = 256 * 1024;
/// Damaged versions tried past before giving up on a restore.
const MAX_DAMAGED: usize = 10;

/// Why a snapshot could not be pushed or restored.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{0}")]
    Control(#[from] ClientError),
    #[error("{what}: {error}")]
    Io { what: String, error: std::io::Error },
    #[error("the snapshot was cut off while downloading: {0}")]
    Download(String),
}

impl SnapshotError {
    fn io(what: impl Into<String>, error: std::io::Error) -> Self {
        SnapshotError::Io {
            what: what.into(),
            error,
        }
    }

    /// A 413: the owner's storage quota is full.
    pub fn over_quota(&self) -> bool {
        matches!(
            self,
            SnapshotError::Control(ClientError::Refused { status: 413, .. })
        )
    }
}

/// What a push did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pushed {
    /// Nothing changed since the version control has.
    Unchanged,
    Stored(Stored),
}

/// What a restore did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Restored {
    /// Control has no snapshot of the project: the directory is as it was.
    Nothing,
    /// The directory already is the latest version: nothing downloaded.
    Current(u64),
    /// The directory is the latest version with changes made here that
    /// were never pushed: kept (the next push takes them).
    KeptLocalChanges(u64),
    /// The directory now holds this version.
    Version(u64),
}

/// Which version the project's directory matched, and its fingerprint then.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct LocalState {
    version: u64,
    fingerprint: String,
}

/// A temporary file removed when dropped: a failed push or restore leaves
/// nothing behind.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Pushes and restores snapshots through control; cheap to clone.
#[derive(Clone)]
pub struct Snapshots {
    inner: Arc<Inner>,
}

struct Inner {
    client: ControlClient,
    /// `work_dir/snapshots`: temporary archives and the per-project state.
    dir: PathBuf,
    /// One push or restore at a time per project.
    locks: Mutex<HashMap<u64, Arc<tokio::sync::Mutex<()>>>>,
    /// The fingerprint control last refused as over quota, per project:
    /// autosave does not send the same files again.
    refused: Mutex<HashMap<u64, Fingerprint>>,
}

impl Snapshots {
    /// Uses (and makes, owner-only) `dir`; temporary files a previous run
    /// left there are removed.
    pub fn open(client: ControlClient, dir: PathBuf) -> std::io::Result<Self> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)?;
        for entry in std::fs::read_dir(&dir)?.filter_map(|e| e.ok()) {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "tmp") {
                let _ = std::fs::remove_file(&path);
            }
        }
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                dir,
                locks: Mutex::default(),
                refused: Mutex::default(),
            }),
        })
    }

    fn project_lock(&self, project_id: u64) -> Arc<tokio::sync::Mutex<()>> {
        self.inner
            .locks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .entry(project_id)
            .or_default()
            .clone()
    }

    fn state_path(&self, project_id: u64) -> PathBuf {
        self.inner.dir.join(format!("project-{project_id}.json"))
    }

    fn temp_path(&self, what: &str) -> TempFile {
        let n: u64 = rand::random();
        TempFile(self.inner.dir.join(format!("{what}-{n:016x}.tmp")))
    }

    fn read_state(&self, project_id: u64) -> Option<LocalState> {
        let text = std::fs::read(self.state_path(project_id)).ok()?;
        serde_json::from_slice(&text).ok()
    }

    fn write_state(&self, project_id: u64, state: &LocalState) -> std::io::Result<()> {
        let path = self.state_path(project_id);
        let tmp = path.with_extension("json.tmp");
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(&serde_json::to_vec(state).unwrap_or_default())?;
        file.sync_all()?;
        std::fs::rename(&tmp, &path)
    }

    /// Forgets which version a project's directory matches (it was
    /// replaced or could not be read).
    fn forget_state(&self, project_id: u64) {
        let _ = std::fs::remove_file(self.state_path(project_id));
    }

    /// Pushes the project's files at `dir` as the session's snapshot when
    /// they changed since the version control has.
    pub async fn push(
        &self,
        sid: &str,
        project_id: u64,
        dir: &Path,
        reason: Reason,
    ) -> Result<Pushed, SnapshotError> {
        let lock = self.project_lock(project_id);
        let _held = lock.lock().await;
        let fingerprint = fingerprint(dir).await?;
        let known = self.read_state(project_id);
        // A save the owner asked for is a checkpoint even when nothing changed.
        let unchanged =
            known.as_ref().map(|s| s.fingerprint.as_str()) == Some(&hex::encode(fingerprint));
        if unchanged && reason != Reason::Save {
            return Ok(Pushed::Unchanged);
        }
        let refused = self
            .inner
            .refused
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(&project_id)
            == Some(&fingerprint);
        if refused && reason == Reason::Autosave {
            return Ok(Pushed::Unchanged);
        }

        let temp = self.temp_path("push");
        let path = temp.0.clone();
        let source = dir.to_path_buf();
        let packed = tokio::task::spawn_blocking(move || {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)?;
            let mut out = std::io::BufWriter::with_capacity(UPLOAD_CHUNK, file);
            let packed = archive::pack(&source, &mut out)?;
            // Read back at once: no fsync needed.
            out.flush()?;
            Ok::<_, std::io::Error>(packed)
        })
        .await
        .map_err(|e| SnapshotError::io("packing", std::io::Error::other(e)))?
        .map_err(|e| SnapshotError::io(format!("cannot pack {}", dir.display()), e))?;

        let file = tokio::fs::File::open(&temp.0)
            .await
            .map_err(|e| SnapshotError::io("the packed snapshot", e))?;
        let stored = self
            .inner
            .client
            .put_snapshot(sid, reason, upload_body(file), packed.size, &packed.sha256)
            .await;
        let stored = match stored {
            Ok(stored) => stored,
            Err(e) => {
                let e = SnapshotError::from(e);
                if e.over_quota() {
                    self.inner
                        .refused
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                        .insert(project_id, fingerprint);
                }
                return Err(e);
            }
        };
        self.inner
            .refused
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(&project_id);
        let state = LocalState {
            version: stored.version,
            fingerprint: hex::encode(fingerprint),
        };
        if let Err(e) = self.write_state(project_id, &state) {
            // Only costs a download or an upload that was not needed.
            tracing::warn!(project_id, "cannot record the pushed snapshot: {e}");
        }
        tracing::info!(
            sid,
            project_id,
            reason = reason.as_str(),
            version = stored.version,
            bytes = packed.size,
            files = packed.counts.files,
            skipped = packed.counts.skipped,
            "snapshot stored"
        );
        Ok(Pushed::Stored(stored))
    }

    /// Makes the project's directory at `dir` the latest good snapshot
    /// control has for it (`dir` exists, owned by `owner`'s user when set).
    /// On any failure the directory is left as it was.
    pub async fn restore(
        &self,
        sid: &str,
        project_id: u64,
        dir: &Path,
        owner: Option<Owner>,
    ) -> Result<Restored, SnapshotError> {
        let lock = self.project_lock(project_id);
        let _held = lock.lock().await;
        let client = &self.inner.client;
        let Some(mut download) = client.snapshot(sid, None).await? else {
            return Ok(Restored::Nothing);
        };
        if let Some(known) = self.read_state(project_id) {
            if known.version == download.version {
                drop(download);
                let now = hex::encode(fingerprint(dir).await?);
                return Ok(if now == known.fingerprint {
                    Restored::Current(known.version)
                } else {
                    Restored::KeptLocalChanges(known.version)
                });
            }
        }
        let mut damaged = 0;
        let (temp, version) = loop {
            let version = download.version;
            if let Some(temp) = self.download(download).await? {
                break (temp, version);
            }
            tracing::error!(
                sid,
                project_id,
                version,
                "snapshot failed its checksum; trying the one before"
            );
            if let Err(e) = client.snapshot_damaged(sid, version).await {
                tracing::warn!(sid, version, "cannot report the damaged snapshot: {e}");
            }
            damaged += 1;
            match client.snapshot(sid, Some(version)).await? {
                Some(older) if damaged < MAX_DAMAGED => download = older,
                _ => {
                    tracing::error!(
                        sid,
                        project_id,
                        damaged,
                        "no good snapshot is left to restore; the files here are kept"
                    );
                    return Ok(Restored::Nothing);
                }
            }
        };
        let archive_path = temp.0.clone();
        let dir_owned = dir.to_path_buf();
        let swapped = tokio::task::spawn_blocking(move || {
            extract_and_swap(&archive_path, &dir_owned, owner, project_id)
        })
        .await
        .map_err(|e| SnapshotError::io("extracting", std::io::Error::other(e)))?;
        drop(temp);
        let unpacked = match swapped {
            Ok(unpacked) => unpacked,
            Err(e) => {
                return Err(SnapshotError::io(
                    format!("cannot restore version {version}"),
                    e,
                ))
            }
        };
        match fingerprint(dir).await {
            Ok(now) => {
                let state = LocalState {
                    version,
                    fingerprint: hex::encode(now),
                };
                if let Err(e) = self.write_state(project_id, &state) {
                    tracing::warn!(project_id, "cannot record the restored snapshot: {e}");
                }
            }
            Err(_) => self.forget_state(project_id),
        }
        tracing::info!(
            sid,
            project_id,
            version,
            files = unpacked.files,
            dirs = unpacked.dirs,
            refused = unpacked.refused,
            "snapshot restored"
        );
        Ok(Restored::Version(version))
    }

    /// Streams a snapshot into a temporary file, hashing it as it comes;
    /// `None` when it does not match its checksum.
    async fn download(
        &self,
        download: crate::client::SnapshotDownload,
    ) -> Result<Option<TempFile>, SnapshotError> {
        let temp = self.temp_path("restore");
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp.0)
            .await
            .map_err(|e| SnapshotError::io("a temporary file", e))?;
        let mut hash = Sha256::new();
        let mut body = download.response.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| SnapshotError::Download(e.to_string()))?;
            hash.update(&chunk);
            file.write_all(&chunk)
                .await
                .map_err(|e| SnapshotError::io("the downloaded snapshot", e))?;
        }
        file.flush()
            .await
            .map_err(|e| SnapshotError::io("the downloaded snapshot", e))?;
        let good = hex::encode(hash.finalize()) == download.sha256;
        Ok(good.then_some(temp))
    }
}

/// The tree's fingerprint, on a blocking thread.
async fn fingerprint(dir: &Path) -> Result<Fingerprint, SnapshotError> {
    let path = dir.to_path_buf();
    tokio::task::spawn_blocking(move || archive::fingerprint(&path))
        .await
        .map_err(|e| SnapshotError::io("fingerprinting", std::io::Error::other(e)))?
        .map_err(|e| SnapshotError::io(format!("cannot read {}", dir.display()), e))
}

/// The file as an upload body, read in chunks as it is sent.
fn upload_body(file: tokio::fs::File) -> reqwest::Body {
    use tokio::io::AsyncReadExt;
    let stream = futures_util::stream::try_unfold(file, |mut file| async move {
        let mut buf = bytes::BytesMut::with_capacity(UPLOAD_CHUNK);
        let n = file.read_buf(&mut buf).await?;
        Ok::<_, std::io::Error>((n > 0).then(|| (buf.freeze(), file)))
    });
    reqwest::Body::wrap_stream(stream)
}

/// Extracts the archive beside `dir` and swaps it in: a restore that fails
/// half-way leaves `dir` untouched.
fn extract_and_swap(
    archive_path: &Path,
    dir: &Path,
    owner: Option<Owner>,
    project_id: u64,
) -> std::io::Result<archive::Unpacked> {
    let parent = dir.parent().unwrap_or(Path::new("/"));
    let staging = parent.join(format!(".restore-{project_id}"));
    let old = parent.join(format!(".replaced-{project_id}"));
    for leftover in [&staging, &old] {
        match std::fs::remove_dir_all(leftover) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    // The agent's own until it is complete: nobody can slip links in.
    std::fs::DirBuilder::new().mode(0o700).create(&staging)?;
    let result = (|| {
        let file = std::fs::File::open(archive_path)?;
        let unpacked = archive::unpack(std::io::BufReader::new(file), &staging, owner)?;
        if let Some(owner) = owner {
            std::os::unix::fs::lchown(&staging, Some(owner.uid), Some(owner.gid))?;
        }
        std::fs::rename(dir, &old)?;
        if let Err(e) = std::fs::rename(&staging, dir) {
            let _ = std::fs::rename(&old, dir);
            return Err(e);
        }
        Ok(unpacked)
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    let _ = std::fs::remove_dir_all(&old);
    result
}

#[cfg(test)]
mod tests;
