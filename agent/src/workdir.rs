//! The work dir's layout and its upkeep: where projects, homes, logs,
//! session records and the Jupyter config live, with the permissions that
//! let session users reach their own directories and nothing else, and the
//! lock that keeps a second agent out.

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::Error;
use crate::jupyter;
use crate::users::RunAs;

/// Logs of ended sessions are kept this long, for the owner to read.
const LOG_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// Where a session keeps its files.
#[derive(Debug, Clone)]
pub struct Layout {
    pub work_dir: PathBuf,
}

impl Layout {
    pub fn projects(&self) -> PathBuf {
        self.work_dir.join("projects")
    }
    pub fn project(&self, project_id: u64) -> PathBuf {
        self.projects().join(project_id.to_string())
    }
    /// Root directories of warm servers, by server id: empty until a start
    /// binds the server and moves its project's files in.
    pub fn pool(&self) -> PathBuf {
        self.work_dir.join("pool")
    }
    pub fn pool_root(&self, server_id: &str) -> PathBuf {
        self.pool().join(server_id)
    }
    pub fn homes(&self) -> PathBuf {
        self.work_dir.join("homes")
    }
    pub fn home(&self, user: &str) -> PathBuf {
        self.homes().join(user)
    }
    pub fn logs(&self) -> PathBuf {
        self.work_dir.join("logs")
    }
    pub fn log(&self, sid: &str) -> PathBuf {
        self.logs().join(format!("{sid}.log"))
    }
    pub fn sessions(&self) -> PathBuf {
        self.work_dir.join("sessions")
    }
    /// The session's own directory: the Jupyter socket, owned by the
    /// session's user (0700) in the agent's private `sessions/`.
    pub fn session_dir(&self, sid: &str) -> PathBuf {
        self.sessions().join(sid)
    }
    /// The Unix socket the session's Jupyter serves on.
    pub fn socket(&self, sid: &str) -> PathBuf {
        self.session_dir(sid).join("jupyter.sock")
    }
    pub fn server_config(&self) -> PathBuf {
        self.work_dir.join("jupyter_server_config.py")
    }
    /// The host link's private key (0600): made at the first start, kept
    /// across restarts; only certificate requests for it leave the host.
    pub fn link_key(&self) -> PathBuf {
        self.work_dir.join("link.key")
    }
    /// Snapshots on their way to or from control, and which version each
    /// project's directory matches (agent only).
    pub fn snapshots(&self) -> PathBuf {
        self.work_dir.join("snapshots")
    }
    /// Jupyter data (`JUPYTER_PATH`) every server shares read-only: the kernel spec.
    pub fn jupyter_data(&self) -> PathBuf {
        self.work_dir.join("jupyter")
    }
}

/// `work_dir` with its parts: project and home directories reachable (not
/// listable) by session users, logs and state for the agent only, and the
/// Jupyter config every server loads.
pub(crate) fn prepare_work_dir(layout: &Layout, root: bool, venv: &Path) -> Result<(), Error> {
    let dirs = [
        (layout.work_dir.clone(), 0o711),
        (layout.projects(), 0o711),
        (layout.homes(), 0o711),
        (layout.pool(), 0o711),
        (layout.logs(), 0o700),
        (layout.snapshots(), 0o700),
    ];
    for (dir, mode) in dirs {
        // Created with its mode, so the logs are never open for a moment;
        // set again for directories an older release made.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(mode)
            .create(&dir)
            .map_err(|e| Error::io(&dir, e))?;
        if root || dir != layout.work_dir {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode))
                .map_err(|e| Error::io(&dir, e))?;
        }
    }
    remove_old_logs(layout);
    write_shared(&layout.server_config(), jupyter::SERVER_CONFIG)?;
    let kernel = layout.jupyter_data().join("kernels/python3");
    std::fs::create_dir_all(&kernel).map_err(|e| Error::io(&kernel, e))?;
    for dir in [
        layout.jupyter_data(),
        layout.jupyter_data().join("kernels"),
        kernel.clone(),
    ] {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| Error::io(&dir, e))?;
    }
    write_shared(&kernel.join("kernel.json"), &jupyter::kernel_spec(venv))
}

/// A file every session reads and none may change.
fn write_shared(path: &Path, text: &str) -> Result<(), Error> {
    std::fs::write(path, text).map_err(|e| Error::io(path, e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))
        .map_err(|e| Error::io(path, e))
}

/// Logs of sessions that ended long ago (never of one still recorded:
/// an idle server may not write for days).
fn remove_old_logs(layout: &Layout) {
    let Ok(entries) = std::fs::read_dir(layout.logs()) else {
        return;
    };
    for entry in entries.filter_map(|e| e.ok()) {
        let path = entry.path();
        let sid = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
        if layout.sessions().join(format!("{sid}.json")).exists() {
            continue;
        }
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|modified| modified.elapsed().ok())
            .is_some_and(|age| age > LOG_RETENTION);
        if old {
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// One agent per work dir: two would adopt and kill each other's servers.
pub(crate) fn lock_work_dir(work_dir: &Path) -> Result<std::fs::File, Error> {
    let path = work_dir.join("agent.lock");
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(|e| Error::io(&path, e))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            return Err(Error::Setup(format!(
                "another agent (pid {}) is using {}; stop it first",
                holder.trim(),
                work_dir.display()
            )));
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(&path, e)),
    }
    use std::io::Write;
    file.set_len(0).map_err(|e| Error::io(&path, e))?;
    write!(file, "{}", std::process::id()).map_err(|e| Error::io(&path, e))?;
    Ok(file)
}

/// Session users must be able to walk down to their project and the venv.
pub(crate) fn ensure_reachable(path: &Path) -> Result<(), Error> {
    for dir in path.ancestors() {
        let Ok(meta) = std::fs::metadata(dir) else {
            continue;
        };
        if meta.is_dir() && meta.permissions().mode() & 0o001 == 0 {
            return Err(Error::Setup(format!(
                "{} (mode {:o}) cannot be entered by other users, so session users cannot reach {}; \
                 use a world-searchable place (chmod o+x) for work_dir and venv",
                dir.display(),
                meta.permissions().mode() & 0o777,
                path.display()
            )));
        }
    }
    Ok(())
}

/// A directory only `run_as` may enter.
pub(crate) fn private_dir(dir: &Path, run_as: &RunAs) -> Result<(), Error> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::io(dir, e))?;
    if run_as.switch {
        std::os::unix::fs::chown(dir, Some(run_as.uid), Some(run_as.gid))
            .map_err(|e| Error::io(dir, e))?;
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| Error::io(dir, e))
}

/// Whose files a hand-over moves, and to whom they then belong.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rehome {
    /// Only entries of this uid change owner: anything else got in by a hard
    /// link and stays whose it was.
    pub from_uid: u32,
    pub to_uid: u32,
    pub to_gid: u32,
}

/// Moves everything in `from` into `to` (both on the work dir's file
/// system, so each entry is one rename): a directory that exists in both is
/// merged, anything else in `to` with the same name is replaced. Entries
/// then change owner per `rehome`. Symlinks are moved as they are, never
/// followed. Callers make sure no process of either user runs meanwhile.
pub(crate) fn move_contents(from: &Path, to: &Path, rehome: Option<Rehome>) -> std::io::Result<()> {
    if from == to {
        return Ok(());
    }
    let entries = match std::fs::read_dir(from) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let source = entry.path();
        let target = to.join(entry.file_name());
        let source_is_dir = entry.file_type()?.is_dir();
        match std::fs::symlink_metadata(&target) {
            Ok(existing) if existing.is_dir() && source_is_dir => {
                move_contents(&source, &target, rehome)?;
                std::fs::remove_dir(&source)?;
                if let Some(rehome) = rehome {
                    chown_if(&target, &existing, rehome)?;
                }
                continue;
            }
            Ok(existing) if existing.is_dir() => std::fs::remove_dir_all(&target)?,
            Ok(_) => std::fs::remove_file(&target)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        std::fs::rename(&source, &target)?;
        if let Some(rehome) = rehome {
            rehome_tree(&target, rehome)?;
        }
    }
    Ok(())
}

/// `path` and everything below it (symlinks not followed) to `rehome`'s owner.
fn rehome_tree(path: &Path, rehome: Rehome) -> std::io::Result<()> {
    let meta = std::fs::symlink_metadata(path)?;
    chown_if(path, &meta, rehome)?;
    if meta.is_dir() {
        for entry in std::fs::read_dir(path)? {
            rehome_tree(&entry?.path(), rehome)?;
        }
    }
    Ok(())
}

fn chown_if(path: &Path, meta: &std::fs::Metadata, rehome: Rehome) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    if meta.uid() == rehome.from_uid {
        std::os::unix::fs::lchown(path, Some(rehome.to_uid), Some(rehome.to_gid))?;
    }
    Ok(())
}

/// An empty directory at `dir`, whatever was there.
pub(crate) fn empty_dir(dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contents_move_merging_directories_and_keeping_links_as_links() {
        let base = std::env::temp_dir().join(format!("oc-agent-move-{}", std::process::id()));
        let (from, to) = (base.join("from"), base.join("to"));
        std::fs::create_dir_all(from.join("data/deep")).unwrap();
        std::fs::create_dir_all(to.join("data")).unwrap();
        std::fs::write(from.join("notebook.ipynb"), "{}").unwrap();
        std::fs::write(from.join("data/deep/table.csv"), "a,b").unwrap();
        std::fs::write(from.join("clash"), "new").unwrap();
        std::fs::write(to.join("clash"), "old").unwrap();
        std::fs::write(to.join("data/kept.txt"), "kept").unwrap();
        std::os::unix::fs::symlink("/etc", from.join("outside")).unwrap();
        move_contents(&from, &to, None).unwrap();
        assert_eq!(std::fs::read_dir(&from).unwrap().count(), 0);
        assert_eq!(std::fs::read_to_string(to.join("clash")).unwrap(), "new");
        assert!(to.join("notebook.ipynb").is_file());
        assert!(to.join("data/deep/table.csv").is_file());
        assert!(to.join("data/kept.txt").is_file());
        let link = std::fs::symlink_metadata(to.join("outside")).unwrap();
        assert!(link.file_type().is_symlink());
        // Moving out of a directory that is not there moves nothing.
        move_contents(&base.join("missing"), &to, None).unwrap();
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn closed_directories_on_the_way_are_named() {
        let base = std::env::temp_dir().join(format!("oc-agent-reach-{}", std::process::id()));
        let closed = base.join("closed");
        std::fs::create_dir_all(closed.join("work")).unwrap();
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o700)).unwrap();
        let err = ensure_reachable(&closed.join("work"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("closed (mode 700)"), "{err}");
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o755)).unwrap();
        ensure_reachable(&closed.join("work")).unwrap();
        std::fs::remove_dir_all(&base).unwrap();
    }
}
