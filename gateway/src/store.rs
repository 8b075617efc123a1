//! The route table on disk: a snapshot plus a log of the deltas applied
//! since, so a restarted gateway serves its last good table before control
//! answers. Written only by the watch task, never on the request path.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use opencloud_protocol::routes::{Delta, Snapshot};

use crate::table::RouteTable;

const SNAPSHOT: &str = "routes.snapshot.json";
const LOG: &str = "routes.deltas.ndjson";
/// Deltas appended before the log is folded into a new snapshot.
const COMPACT_AFTER: usize = 1000;

pub struct Store {
    dir: PathBuf,
    log: Option<File>,
    logged: usize,
}

impl Store {
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        fs::create_dir_all(dir)?;
        Ok(Self {
            dir: dir.to_owned(),
            log: None,
            logged: 0,
        })
    }

    /// The last persisted table: the snapshot with every following delta
    /// applied. A torn last line (a crash mid-write) is ignored.
    pub fn load(&self) -> RouteTable {
        let mut table = match fs::read(self.dir.join(SNAPSHOT)) {
            Ok(bytes) => match serde_json::from_slice::<Snapshot>(&bytes) {
                Ok(snapshot) => RouteTable::from_snapshot(snapshot),
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
                let Ok(delta) = serde_json::from_str::<Delta>(&line) else {
                    break;
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
        let tmp = self.dir.join(format!("{SNAPSHOT}.tmp"));
        {
            let mut file = File::create(&tmp)?;
            serde_json::to_writer(&mut file, &table.to_snapshot())?;
            file.sync_all()?;
        }
        fs::rename(&tmp, self.dir.join(SNAPSHOT))?;
        self.log = Some(File::create(self.dir.join(LOG))?);
        self.logged = 0;
        Ok(())
    }

    /// Appends a delta; folds the log into a snapshot now and then.
    pub fn append(&mut self, delta: &Delta, table_after: &RouteTable) -> std::io::Result<()> {
        if self.logged >= COMPACT_AFTER || self.log.is_none() {
            return self.save_snapshot(table_after);
        }
        let log = match &mut self.log {
            Some(log) => log,
            None => {
                self.log = Some(
                    OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(self.dir.join(LOG))?,
                );
                self.log.as_mut().expect("just set")
            }
        };
        let mut line = serde_json::to_vec(delta)?;
        line.push(b'\n');
        log.write_all(&line)?;
        log.flush()?;
        self.logged += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opencloud_protocol::routes::{Change, Revocation};

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
        let loaded = Store::open(&dir).unwrap().load();
        assert_eq!(loaded.version, 4);
        assert!(loaded.is_revoked("ls1") && loaded.is_revoked("ls4"));
        fs::remove_dir_all(&dir).unwrap();
    }
}
