//! The route table on disk: a snapshot plus a log of the deltas applied
//! since, so a restarted gateway serves its last good table before control
//! answers. Written only by the watch task, never on the request path.
//!
//! The files hold every session's upstream token, so they and their
//! directory are the gateway user's alone: created 0600 in a 0700 directory,
//! and tightened at start when an older release left them open.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use opencloud_protocol::config;
use opencloud_protocol::routes::Delta;

use crate::table::RouteTable;

const SNAPSHOT: &str = "routes.snapshot.json";
const LOG: &str = "routes.deltas.ndjson";
const SNAPSHOT_TMP: &str = "routes.snapshot.json.tmp";
/// The log is folded into a new snapshot once it is larger than the
/// snapshot itself (and at least this), so compaction cost stays
/// proportional to the changes, whatever the table's size.
const MIN_LOG_BYTES: u64 = 1 << 20;

pub struct Store {
    dir: PathBuf,
    log: Option<File>,
    /// Bytes in the delta log and in the last snapshot.
    log_bytes: u64,
    snapshot_bytes: u64,
}

impl Store {
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        close_to_others(dir, 0o700)?;
        for name in [SNAPSHOT, LOG, SNAPSHOT_TMP] {
            match close_to_others(&dir.join(name), 0o600) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                other => other?,
            }
        }
        Ok(Self {
            dir: dir.to_owned(),
            log: None,
            log_bytes: 0,
            snapshot_bytes: 0,
        })
    }

    /// The last persisted table: the snapshot with every following delta
    /// applied. A torn last line (a crash mid-write) is ignored.
    pub fn load(&self) -> RouteTable {
        let mut table = match File::open(self.dir.join(SNAPSHOT)) {
            Ok(file) => match RouteTable::read_snapshot(BufReader::with_capacity(1 << 20, file)) {
                Ok(table) => table,
                Err(e) => {
                    tracing::warn!(error = %e, "ignoring an unreadable route snapshot");
                    return RouteTable::default();
                }
            },
            Err(_) => return RouteTable::default(),
        };
        if let Ok(file) = File::open(self.dir.join(LOG)) {
            for line in BufReader::new(file).lines() {
                let Ok(line) = line else { break };
                // A torn line (a crash mid-write) is skipped; version
                // continuity below still refuses any gap.
                let Ok(delta) = serde_json::from_str::<Delta>(&line) else {
                    continue;
                };
                if delta.version <= table.version {
                    continue;
                }
                match table.apply(&delta) {
                    Ok(next) => table = next,
                    Err(_) => break,
                }
            }
        }
        table
    }

    /// Replaces everything on disk with `table` (write, fsync, rename).
    pub fn save_snapshot(&mut self, table: &RouteTable) -> std::io::Result<()> {
        let tmp = self.dir.join(SNAPSHOT_TMP);
        {
            let mut file = std::io::BufWriter::with_capacity(1 << 20, create_private(&tmp)?);
            table.write_snapshot(&mut file)?;
            let file = file.into_inner().map_err(|e| e.into_error())?;
            file.sync_all()?;
            self.snapshot_bytes = file.metadata()?.len();
        }
        fs::rename(&tmp, self.dir.join(SNAPSHOT))?;
        self.log = Some(create_private(&self.dir.join(LOG))?);
        self.log_bytes = 0;
        Ok(())
    }

    /// Continues the existing log after a restart instead of rewriting the
    /// whole table on the first delta.
    pub fn resume_log(&mut self) -> std::io::Result<()> {
        let path = self.dir.join(LOG);
        if self.dir.join(SNAPSHOT).exists() {
            let mut log = OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(&path)?;
            self.log_bytes = log.metadata()?.len();
            // Close off a torn last line so the next delta starts on its own.
            if self.log_bytes > 0 && !ends_with_newline(&path)? {
                log.write_all(b"\n")?;
            }
            self.snapshot_bytes = fs::metadata(self.dir.join(SNAPSHOT))?.len();
            self.log = Some(log);
        }
        Ok(())
    }

    /// Appends a delta; folds the log into a snapshot when it has grown
    /// larger than the snapshot.
    pub fn append(&mut self, delta: &Delta, table_after: &RouteTable) -> std::io::Result<()> {
        if self.log_bytes > self.snapshot_bytes.max(MIN_LOG_BYTES) {
            return self.save_snapshot(table_after);
        }
        let Some(log) = self.log.as_mut() else {
            return self.save_snapshot(table_after);
        };
        let mut line = serde_json::to_vec(delta)?;
        line.push(b'\n');
        log.write_all(&line)?;
        self.log_bytes += line.len() as u64;
        Ok(())
    }
}

/// A new, empty file only its owner may read (0600 from its creation on).
fn create_private(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

/// [`config::close_to_others`], saying so when it changed anything: the
/// tokens in a file left open may already have been read.
fn close_to_others(path: &Path, private: u32) -> std::io::Result<()> {
    if let Some(mode) = config::close_to_others(path, private)? {
        tracing::warn!(
            "{} was open to other users (mode {mode:o}); now {private:o}",
            path.display()
        );
    }
    Ok(())
}

fn ends_with_newline(path: &Path) -> std::io::Result<bool> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = File::open(path)?;
    file.seek(SeekFrom::End(-1))?;
    let mut last = [0u8; 1];
    file.read_exact(&mut last)?;
    Ok(last[0] == b'\n')
}

#[cfg(test)]
mod tests {
    use super::*;
    use opencloud_protocol::routes::{Change, Revocation};
    use std::os::unix::fs::PermissionsExt;

    fn delta(version: u64) -> Delta {
        Delta {
            version,
            changes: vec![Change::Revoke(Revocation {
                login_session: format!("ls{version}"),
                expires_at: u64::MAX,
            })],
        }
    }

    #[test]
    fn a_saved_table_and_its_deltas_come_back_after_a_restart() {
        let dir = std::env::temp_dir().join(format!("oc-gw-store-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let mut store = Store::open(&dir).unwrap();
        let mut table = RouteTable::default().apply(&delta(1)).unwrap();
        store.save_snapshot(&table).unwrap();
        for v in 2..=4 {
            table = table.apply(&delta(v)).unwrap();
            store.append(&delta(v), &table).unwrap();
        }
        // A torn line at the end is ignored.
        OpenOptions::new()
            .append(true)
            .open(dir.join(LOG))
            .unwrap()
            .write_all(b"{\"vers")
            .unwrap();
        let mut reopened = Store::open(&dir).unwrap();
        let loaded = reopened.load();
        assert_eq!(loaded.version, 4);
        assert!(loaded.is_revoked("ls1") && loaded.is_revoked("ls4"));
        // After a restart the log goes on past the torn line.
        reopened.resume_log().unwrap();
        let five = loaded.apply(&delta(5)).unwrap();
        reopened.append(&delta(5), &five).unwrap();
        assert_eq!(Store::open(&dir).unwrap().load().version, 5);
        fs::remove_dir_all(&dir).unwrap();
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn the_files_are_private_from_creation_and_open_ones_are_closed_at_start() {
        let base = std::env::temp_dir().join(format!("oc-gw-store-modes-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        let dir = base.join("state");
        let mut store = Store::open(&dir).unwrap();
        let table = RouteTable::default().apply(&delta(1)).unwrap();
        store.save_snapshot(&table).unwrap();
        store
            .append(&delta(2), &table.apply(&delta(2)).unwrap())
            .unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(
            (mode(&dir.join(SNAPSHOT)), mode(&dir.join(LOG))),
            (0o600, 0o600)
        );
        // As an older release left them.
        for (path, open) in [
            (&dir, 0o755),
            (&dir.join(SNAPSHOT), 0o644),
            (&dir.join(LOG), 0o640),
        ] {
            fs::set_permissions(path, fs::Permissions::from_mode(open)).unwrap();
        }
        let store = Store::open(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(
            (mode(&dir.join(SNAPSHOT)), mode(&dir.join(LOG))),
            (0o600, 0o600)
        );
        assert_eq!(store.load().version, 2, "tightened, not lost");
        fs::remove_dir_all(&base).unwrap();
    }
}
