//! One file per running session under `work_dir/sessions/`, readable by root
//! only (it names the processes the agent may signal), so that an agent that restarts finds
//! the servers it left and can either keep them or clean them up. Files are
//! private from creation (0600); the directory is 0711: not listable, but
//! each session's user (bwrap runs as it) can reach its own
//! `sessions/<sid>/`, 0700 and its own. Ones an older release left open are
//! closed when they are read at start.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use opencloud_protocol::config::close_to_others;
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::process::Scope;

/// Searchable, not listable: see the module's comment.
const DIR_MODE: u32 = 0o711;

#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionRecord {
    /// What the server's resources (state file, socket directory, network
    /// namespace, cgroup, log) are named by: the session's sid for a cold
    /// start, the server's own id for one started for the warm pool.
    pub sid: String,
    /// 0 for a warm server not bound to a session yet.
    pub project_id: u64,
    /// The sandbox's outer process (bwrap); it leads its own process group.
    pub pid: i32,
    pub pgid: i32,
    /// With the pid, tells this process from a later one with its pid.
    pub start_ticks: u64,
    /// The sandbox's PID namespace (inode): every process of the session.
    #[serde(default)]
    pub pidns: u64,
    /// The session's slirp4netns, when it has internet egress.
    #[serde(default)]
    pub slirp: Option<Helper>,
    pub user: String,
    pub uid: u32,
    pub gid: u32,
    /// Unix seconds.
    pub started_at: u64,
    /// Set for a server started for the warm pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm: Option<WarmRecord>,
}

/// What an agent restart needs to know of a warm server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WarmRecord {
    /// The pool slot its user is named by.
    pub slot: u32,
    /// The session it serves once a start bound it (the project is
    /// `project_id`; its files are in the server's root): adopted like any
    /// session. None: never bound, killed and cleaned at a restart.
    #[serde(default)]
    pub session: Option<String>,
}

impl std::fmt::Debug for SessionRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionRecord")
            .field("sid", &self.sid)
            .field("project_id", &self.project_id)
            .field("pid", &self.pid)
            .field("pgid", &self.pgid)
            .field("pidns", &self.pidns)
            .field("slirp", &self.slirp)
            .field("user", &self.user)
            .field("started_at", &self.started_at)
            .field("warm", &self.warm)
            .finish_non_exhaustive()
    }
}

/// A root process the agent runs beside a session (its slirp4netns).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Helper {
    pub pid: i32,
    pub start_ticks: u64,
}

impl SessionRecord {
    pub fn scope(&self) -> Scope {
        Scope {
            pid: self.pid,
            pgid: self.pgid,
            start_ticks: self.start_ticks,
            uid: self.uid,
            pidns: self.pidns,
            cgroup: crate::cgroups::session_path(&self.sid),
        }
    }
}

/// The `sessions/` directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    pub fn open(dir: PathBuf) -> Result<Self, Error> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(&dir)
            .map_err(|e| Error::io(&dir, e))?;
        let mode = std::fs::metadata(&dir)
            .map_err(|e| Error::io(&dir, e))?
            .permissions()
            .mode()
            & 0o777;
        if mode != DIR_MODE {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(DIR_MODE))
                .map_err(|e| Error::io(&dir, e))?;
            if mode & 0o066 != 0 {
                warn_if_closed(&dir, Some(mode));
            }
        }
        Ok(Self { dir })
    }

    pub fn path(&self, sid: &str) -> PathBuf {
        self.dir.join(format!("{sid}.json"))
    }

    /// Writes the record atomically, mode 0600.
    pub fn save(&self, record: &SessionRecord) -> Result<(), Error> {
        let path = self.path(&record.sid);
        let temp = self.dir.join(format!("{}.json.tmp", record.sid));
        let json = serde_json::to_vec_pretty(record).map_err(|e| Error::io(&path, e.into()))?;
        let write = || -> std::io::Result<()> {
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&temp)?;
            file.write_all(&json)?;
            file.sync_all()?;
            std::fs::rename(&temp, &path)
        };
        write().map_err(|e| Error::io(&path, e))
    }

    pub fn remove(&self, sid: &str) {
        let path = self.path(sid);
        if let Err(e) = std::fs::remove_file(&path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(sid, error = %e, "cannot remove the session's state file");
            }
        }
    }

    /// Every record, and the files that could not be read (removed, logged).
    pub fn load_all(&self) -> Vec<SessionRecord> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut records = Vec::new();
        for entry in entries.filter_map(|e| e.ok()) {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".json.tmp") {
                // A write cut short by a crash: only complete files count.
                let _ = std::fs::remove_file(&path);
                continue;
            }
            if !name.ends_with(".json") {
                continue;
            }
            match close_to_others(&path, 0o600) {
                Ok(was) => warn_if_closed(&path, was),
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "cannot close the state file to others")
                }
            }
            match read_record(&path) {
                Ok(record) if path == self.path(&record.sid) => records.push(record),
                Ok(_) => {
                    tracing::warn!(file = %path.display(), "state file names another session; removed");
                    let _ = std::fs::remove_file(&path);
                }
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "unreadable state file; removed");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        records.sort_by(|a, b| a.sid.cmp(&b.sid));
        records
    }
}

/// Says that `path` was open to other users (mode `was`) and now is not.
fn warn_if_closed(path: &Path, was: Option<u32>) {
    if let Some(mode) = was {
        tracing::warn!(
            "{} was open to other users (mode {mode:o}); closed",
            path.display()
        );
    }
}

fn read_record(path: &Path) -> Result<SessionRecord, String> {
    let text = std::fs::read(path).map_err(|e| e.to_string())?;
    serde_json::from_slice(&text).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(sid: &str) -> SessionRecord {
        SessionRecord {
            sid: sid.into(),
            project_id: 7,
            pid: 1234,
            pgid: 1234,
            start_ticks: 99,
            pidns: 4_026_532_174,
            slirp: Some(Helper {
                pid: 1240,
                start_ticks: 100,
            }),
            user: "oc-p7".into(),
            uid: 998,
            gid: 998,
            started_at: 1_800_000_000,
            warm: None,
        }
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("oc-agent-state-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn records_round_trip_privately() {
        let dir = StateDir::open(temp_dir("round")).unwrap();
        dir.save(&record("aaaa")).unwrap();
        let warm = SessionRecord {
            warm: Some(WarmRecord {
                slot: 2,
                session: Some("cccc".into()),
            }),
            ..record("bbbb")
        };
        dir.save(&warm).unwrap();
        let mode = std::fs::metadata(dir.path("aaaa"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(dir.load_all(), vec![record("aaaa"), warm.clone()]);
        dir.remove("aaaa");
        dir.remove("aaaa");
        assert_eq!(dir.load_all(), vec![warm]);
        std::fs::remove_dir_all(&dir.dir).unwrap();
    }

    #[test]
    fn broken_and_half_written_files_are_dropped() {
        let dir = StateDir::open(temp_dir("broken")).unwrap();
        std::fs::write(dir.path("cccc"), "{not json").unwrap();
        std::fs::write(dir.dir.join("dddd.json.tmp"), "{").unwrap();
        dir.save(&record("eeee")).unwrap();
        std::fs::copy(dir.path("eeee"), dir.path("ffff")).unwrap();
        assert_eq!(dir.load_all(), vec![record("eeee")]);
        assert!(!dir.path("cccc").exists());
        assert!(!dir.path("ffff").exists());
        std::fs::remove_dir_all(&dir.dir).unwrap();
    }

    #[test]
    fn files_an_older_agent_left_open_are_closed_at_start() {
        let path = temp_dir("open");
        std::fs::create_dir_all(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(
            path.join("gggg.json"),
            serde_json::to_vec(&record("gggg")).unwrap(),
        )
        .unwrap();
        std::fs::set_permissions(
            path.join("gggg.json"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        let dir = StateDir::open(path.clone()).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o711);
        assert_eq!(dir.load_all(), vec![record("gggg")]);
        assert_eq!(mode(&dir.path("gggg")), 0o600);
        std::fs::remove_dir_all(&path).unwrap();
    }

    #[test]
    fn a_new_state_dir_is_private_from_its_creation() {
        let parent = temp_dir("new");
        let dir = StateDir::open(parent.join("a/sessions")).unwrap();
        let mode = std::fs::metadata(&dir.dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o711);
        std::fs::remove_dir_all(&parent).unwrap();
    }
}
