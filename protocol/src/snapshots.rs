//! Project snapshots between agents and control (issue 15). A snapshot is
//! the project directory's contents as a tar archive (relative paths,
//! regular files and directories only), compressed with zstd. Its SHA-256
//! is of the compressed bytes, as stored.
//!
//! The agent never talks to the store: it pulls and pushes a session's
//! snapshots through control's agent API, authenticated by its HostKey and
//! allowed only for sessions its host runs now:
//!
//! - `GET  {SNAPSHOT}` → 200 with the latest good snapshot as the body and
//!   the [`VERSION_HEADER`], [`SHA256_HEADER`] and [`CREATED_HEADER`]
//!   headers, or 204 when the project has none yet. `?before=N` asks for
//!   the latest good version older than `N` (after `N` failed its check).
//! - `PUT  {SNAPSHOT}?reason=autosave|save|stop` with the archive as a
//!   streamed body and its [`SHA256_HEADER`] → 200 [`Stored`]. Control
//!   hashes what it receives; a mismatch, a body over the owner's storage
//!   quota (413) or a broken upload stores nothing, and the previous version
//!   stays the latest.
//! - `POST {SNAPSHOT_DAMAGED}` with [`Damaged`]: the agent found version `N`
//!   failing its checksum; control marks it and tells the user.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// `GET` / `PUT` a session's project snapshot.
pub const SNAPSHOT: &str = "/agent/v1/sessions/{sid}/snapshot";
/// `POST` a [`Damaged`] report.
pub const SNAPSHOT_DAMAGED: &str = "/agent/v1/sessions/{sid}/snapshot/damaged";

pub fn snapshot_path(sid: &str) -> String {
    SNAPSHOT.replace("{sid}", sid)
}

pub fn damaged_path(sid: &str) -> String {
    SNAPSHOT_DAMAGED.replace("{sid}", sid)
}

/// The snapshot's version number (1, 2, …, per project).
pub const VERSION_HEADER: &str = "x-oc-snapshot-version";
/// Lower-case hex SHA-256 of the compressed archive.
pub const SHA256_HEADER: &str = "x-oc-snapshot-sha256";
/// When the snapshot was taken, in Unix seconds.
pub const CREATED_HEADER: &str = "x-oc-snapshot-created";

/// Why a snapshot is pushed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// Files changed since the last one (every `autosave_interval`).
    Autosave,
    /// The user asked to save now.
    Save,
    /// The session is stopping: its last state.
    Stop,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Autosave => "autosave",
            Reason::Save => "save",
            Reason::Stop => "stop",
        }
    }
}

/// What control answers to a stored snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stored {
    pub version: u64,
    pub size_bytes: u64,
}

/// A version the agent could not use: its bytes did not match its checksum.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Damaged {
    pub version: u64,
}

/// The zstd level snapshots are written with: fast, and most of the gain.
pub const ZSTD_LEVEL: i32 = 3;

/// Counts and hashes what goes through it: the stored bytes' size and
/// SHA-256, as both the agent and control's zip upload compute them.
pub struct HashingWriter<W> {
    inner: W,
    hash: Sha256,
    size: u64,
}

impl<W> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            hash: Sha256::new(),
            size: 0,
        }
    }

    /// The lower-case hex SHA-256 and the size of what was written.
    pub fn finish(self) -> (String, u64) {
        (hex::encode(self.hash.finalize()), self.size)
    }
}

impl<W: std::io::Write> std::io::Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}
