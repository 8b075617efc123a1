//! Per-session memory, CPU and process-count limits with cgroups, v2 or v1.
//!
//! cgroup v2 (the unified hierarchy at `/sys/fs/cgroup` with the `memory`
//! and `cpu` controllers; `pids` when present): each session gets
//! `/sys/fs/cgroup/opencloud/<sid>` with `memory.max`, `cpu.max` and
//! `pids.max`. cgroup v1 (a controller per hierarchy, e.g.
//! `/sys/fs/cgroup/memory`): `<hierarchy>/opencloud/<sid>` in the memory,
//! cpu and pids hierarchies with their v1 files. The sandbox joins them
//! between fork and exec ([`Cgroups::procs_files`]), so nothing of a session
//! runs outside them. Elsewhere (no such controllers, no root) the agent
//! says so once at start and reports `cgroup_limits: false` to control.
//!
//! The OOM killer, when a session reaches its memory limit, kills inside
//! that session only; [`Cgroups::oom_kills`] counts how often it did.

use std::path::{Path, PathBuf};
use std::time::Duration;

const ROOT: &str = "/sys/fs/cgroup";
/// The cgroup all sessions live under.
const GROUP: &str = "opencloud";
/// `cpu.max` period, in µs (the kernel's default).
const CPU_PERIOD_US: u64 = 100_000;
/// Processes (threads included) one session may have: packages say nothing
/// of it, and this is far above what notebooks use and far below what
/// exhausts a host.
pub const DEFAULT_PIDS_MAX: u64 = 512;

/// What one session may use.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// 0: no limit.
    pub memory_mib: u64,
    /// 0: no limit.
    pub cpu_cores: f32,
    pub pids: u64,
}

/// Whether this machine can limit sessions, and why not.
#[derive(Debug, Clone)]
pub enum Support {
    Available(Cgroups),
    Unavailable(String),
}

impl Support {
    pub fn cgroups(&self) -> Option<&Cgroups> {
        match self {
            Support::Available(c) => Some(c),
            Support::Unavailable(_) => None,
        }
    }
}

/// Where the controllers are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hierarchy {
    /// The unified hierarchy; whether it has the pids controller.
    V2 { pids: bool },
    /// One mount point per controller.
    V1 {
        memory: PathBuf,
        cpu: PathBuf,
        pids: Option<PathBuf>,
    },
}

/// Looks at this machine and prepares the `opencloud` cgroups when it can.
pub fn detect() -> Support {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let controllers = std::fs::read_to_string(Path::new(ROOT).join("cgroup.controllers")).ok();
    let hierarchy = match decide(&mounts, controllers.as_deref()) {
        Ok(hierarchy) => hierarchy,
        Err(reason) => return Support::Unavailable(reason),
    };
    if !crate::users::running_as_root() {
        return Support::Unavailable("the agent is not running as root".into());
    }
    let cgroups = Cgroups { hierarchy };
    match cgroups.prepare() {
        Ok(()) => Support::Available(cgroups),
        Err(e) => Support::Unavailable(format!("cannot set up the opencloud cgroups: {e}")),
    }
}

/// Which hierarchy `mounts` (as in `/proc/self/mounts`) and the root's
/// `cgroup.controllers` offer for per-session limits; the reason when none.
pub fn decide(mounts: &str, root_controllers: Option<&str>) -> Result<Hierarchy, String> {
    let entries: Vec<(&str, &str, &str)> = mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let _device = fields.next()?;
            let point = fields.next()?;
            let fstype = fields.next()?;
            let options = fields.next().unwrap_or("");
            Some((point, fstype, options))
        })
        .collect();
    // The last mount on a mount point is the one visible.
    let root_type = entries
        .iter()
        .rev()
        .find(|(point, _, _)| *point == ROOT)
        .map(|(_, fstype, _)| *fstype);
    if root_type == Some("cgroup2") {
        let controllers: Vec<&str> = root_controllers.unwrap_or("").split_whitespace().collect();
        let missing: Vec<&str> = ["memory", "cpu"]
            .into_iter()
            .filter(|c| !controllers.contains(c))
            .collect();
        if !missing.is_empty() {
            return Err(format!(
                "the cgroup v2 hierarchy lacks the {} controller{}",
                missing.join(" and "),
                if missing.len() > 1 { "s" } else { "" }
            ));
        }
        return Ok(Hierarchy::V2 {
            pids: controllers.contains(&"pids"),
        });
    }
    let v1 = |controller: &str| {
        entries
            .iter()
            .rev()
            .find(|(_, fstype, options)| {
                *fstype == "cgroup" && options.split(',').any(|o| o == controller)
            })
            .map(|(point, _, _)| PathBuf::from(point))
    };
    match (v1("memory"), v1("cpu")) {
        (Some(memory), Some(cpu)) => Ok(Hierarchy::V1 {
            memory,
            cpu,
            pids: v1("pids"),
        }),
        _ => Err(match root_type {
            Some(fstype) => format!(
                "{ROOT} is {fstype}, neither cgroup2 nor cgroup v1 hierarchies with the memory and cpu controllers"
            ),
            None => format!("nothing is mounted at {ROOT} and no cgroup v1 memory and cpu hierarchies"),
        }),
    }
}

/// `memory.max` for a limit in MiB; 0 means no limit.
pub fn memory_max(mib: u64) -> String {
    if mib == 0 {
        "max".into()
    } else {
        (mib * 1024 * 1024).to_string()
    }
}

/// The quota in µs per [`CPU_PERIOD_US`] for a share in cores; `None`: no limit.
fn cpu_quota_us(cores: f32) -> Option<u64> {
    if !(cores.is_finite() && cores > 0.0) {
        return None;
    }
    // The kernel refuses quotas under 1 ms.
    Some(((f64::from(cores) * CPU_PERIOD_US as f64).round() as u64).max(1_000))
}

/// `cpu.max` for a share in cores; 0 (or nonsense) means no limit.
pub fn cpu_max(cores: f32) -> String {
    match cpu_quota_us(cores) {
        Some(quota) => format!("{quota} {CPU_PERIOD_US}"),
        None => format!("max {CPU_PERIOD_US}"),
    }
}

/// Each file to write and its text, for a session's limits.
pub fn limit_files(hierarchy: &Hierarchy, limits: &Limits) -> Vec<(PathBuf, String)> {
    let pids_max = if limits.pids == 0 {
        "max".to_owned()
    } else {
        limits.pids.to_string()
    };
    match hierarchy {
        Hierarchy::V2 { pids } => {
            let mut files = vec![
                ("memory.max".into(), memory_max(limits.memory_mib)),
                // No swap to grow into past the limit.
                ("memory.swap.max".into(), "0".to_owned()),
                ("cpu.max".into(), cpu_max(limits.cpu_cores)),
            ];
            if *pids {
                files.push(("pids.max".into(), pids_max));
            }
            files
        }
        Hierarchy::V1 { memory, cpu, pids } => {
            let bytes = match limits.memory_mib {
                0 => "-1".to_owned(),
                mib => (mib * 1024 * 1024).to_string(),
            };
            let mut files = vec![
                (memory.join("memory.limit_in_bytes"), bytes.clone()),
                // Where swap is accounted: memory + swap, the same limit.
                (memory.join("memory.memsw.limit_in_bytes"), bytes),
                (cpu.join("cpu.cfs_period_us"), CPU_PERIOD_US.to_string()),
                (
                    cpu.join("cpu.cfs_quota_us"),
                    cpu_quota_us(limits.cpu_cores)
                        .map(|q| q.to_string())
                        .unwrap_or_else(|| "-1".into()),
                ),
            ];
            if let Some(pids) = pids {
                files.push((pids.join("pids.max"), pids_max));
            }
            files
        }
    }
}

/// A session's cgroup as `/proc/<pid>/cgroup` names it, in every hierarchy.
pub fn session_path(sid: &str) -> String {
    format!("/{GROUP}/{sid}")
}

/// The `opencloud` cgroups, ready for sessions.
#[derive(Debug, Clone)]
pub struct Cgroups {
    hierarchy: Hierarchy,
}

impl Cgroups {
    /// The `opencloud` group in every hierarchy used.
    fn bases(&self) -> Vec<PathBuf> {
        match &self.hierarchy {
            Hierarchy::V2 { .. } => vec![Path::new(ROOT).join(GROUP)],
            Hierarchy::V1 { memory, cpu, pids } => [Some(memory), Some(cpu), pids.as_ref()]
                .into_iter()
                .flatten()
                .map(|h| h.join(GROUP))
                .collect(),
        }
    }

    fn prepare(&self) -> std::io::Result<()> {
        match &self.hierarchy {
            Hierarchy::V2 { pids } => {
                let base = Path::new(ROOT).join(GROUP);
                enable_controllers(Path::new(ROOT), *pids)?;
                std::fs::create_dir_all(&base)?;
                enable_controllers(&base, *pids)
            }
            Hierarchy::V1 { .. } => {
                for base in self.bases() {
                    std::fs::create_dir_all(&base)?;
                }
                Ok(())
            }
        }
    }

    /// The session's directory in every hierarchy used.
    fn dirs(&self, sid: &str) -> Vec<PathBuf> {
        self.bases().into_iter().map(|b| b.join(sid)).collect()
    }

    /// Makes the session's cgroups with their limits.
    pub fn create(&self, sid: &str, limits: &Limits) -> std::io::Result<()> {
        for dir in self.dirs(sid) {
            match std::fs::create_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
        }
        let session = |hierarchy_file: &Path| -> PathBuf {
            // `<hierarchy>/<file>` → `<hierarchy>/opencloud/<sid>/<file>`.
            let file = hierarchy_file.file_name().unwrap_or_default();
            let hierarchy = hierarchy_file.parent().unwrap_or(Path::new(ROOT));
            let hierarchy = if hierarchy.as_os_str().is_empty() {
                Path::new(ROOT)
            } else {
                hierarchy
            };
            hierarchy.join(GROUP).join(sid).join(file)
        };
        for (file, text) in limit_files(&self.hierarchy, limits) {
            let path = session(&file);
            if let Err(e) = std::fs::write(&path, &text) {
                // Swap files exist only where swap is accounted.
                let optional = path.to_string_lossy().contains("swap")
                    || path.to_string_lossy().contains("memsw");
                if !(optional && e.kind() == std::io::ErrorKind::NotFound) {
                    return Err(std::io::Error::new(
                        e.kind(),
                        format!("{}: {e}", path.display()),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The `cgroup.procs` files a process writes its pid into to join the
    /// session's cgroups.
    pub fn procs_files(&self, sid: &str) -> Vec<PathBuf> {
        self.dirs(sid)
            .into_iter()
            .map(|d| d.join("cgroup.procs"))
            .collect()
    }

    /// How many processes the OOM killer killed in the session so far.
    pub fn oom_kills(&self, sid: &str) -> Option<u64> {
        let (file, _) = match &self.hierarchy {
            Hierarchy::V2 { .. } => (
                Path::new(ROOT).join(GROUP).join(sid).join("memory.events"),
                (),
            ),
            Hierarchy::V1 { memory, .. } => {
                (memory.join(GROUP).join(sid).join("memory.oom_control"), ())
            }
        };
        parse_oom_kills(&std::fs::read_to_string(file).ok()?)
    }

    /// Removes the session's cgroups once its processes are gone.
    pub async fn remove(&self, sid: &str) {
        for dir in self.dirs(sid) {
            remove_dir(sid, &dir).await;
        }
    }
}

async fn remove_dir(sid: &str, dir: &Path) {
    for _ in 0..20 {
        match std::fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            // Busy while the last processes are being reaped.
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    tracing::warn!(sid, dir = %dir.display(), "could not remove the session's cgroup");
}

/// `oom_kill N` from v2 `memory.events` or v1 `memory.oom_control`.
pub fn parse_oom_kills(text: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        (fields.next()? == "oom_kill").then(|| fields.next()?.parse().ok())?
    })
}

fn enable_controllers(dir: &Path, pids: bool) -> std::io::Result<()> {
    let control = dir.join("cgroup.subtree_control");
    let enabled = std::fs::read_to_string(&control)?;
    let enabled: Vec<&str> = enabled.split_whitespace().collect();
    let wanted: &[&str] = if pids {
        &["memory", "cpu", "pids"]
    } else {
        &["memory", "cpu"]
    };
    for controller in wanted {
        if !enabled.contains(controller) {
            std::fs::write(&control, format!("+{controller}"))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const UNIFIED: &str = "sysfs /sys sysfs rw 0 0\ncgroup2 /sys/fs/cgroup cgroup2 rw,nosuid 0 0\n";
    /// What this kind of machine has.
    const V1: &str = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n\
                      cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0\n\
                      cgroup /sys/fs/cgroup/cpuacct cgroup rw,relatime,cpuacct 0 0\n\
                      cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0\n\
                      cgroup /sys/fs/cgroup/pids cgroup rw,relatime,pids 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";

    #[test]
    fn a_unified_hierarchy_with_memory_and_cpu_is_used() {
        assert_eq!(
            decide(UNIFIED, Some("cpuset cpu io memory pids\n")),
            Ok(Hierarchy::V2 { pids: true })
        );
        assert_eq!(
            decide(UNIFIED, Some("cpu memory")),
            Ok(Hierarchy::V2 { pids: false })
        );
    }

    #[test]
    fn cgroup_v1_hierarchies_are_found_by_controller() {
        assert_eq!(
            decide(V1, None),
            Ok(Hierarchy::V1 {
                memory: "/sys/fs/cgroup/memory".into(),
                cpu: "/sys/fs/cgroup/cpu".into(),
                pids: Some("/sys/fs/cgroup/pids".into()),
            })
        );
        // Debian's older layout: cpu and cpuacct share a hierarchy.
        let joint = "cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,cpu,cpuacct 0 0\n\
                     cgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0\n";
        assert_eq!(
            decide(joint, None),
            Ok(Hierarchy::V1 {
                memory: "/sys/fs/cgroup/memory".into(),
                cpu: "/sys/fs/cgroup/cpu,cpuacct".into(),
                pids: None,
            })
        );
    }

    #[test]
    fn missing_controllers_are_named() {
        let reason = decide(UNIFIED, Some("cpuset io pids")).unwrap_err();
        assert!(reason.contains("memory and cpu controllers"), "{reason}");
        let reason = decide(UNIFIED, Some("cpu pids")).unwrap_err();
        assert!(reason.contains("lacks the memory controller"), "{reason}");
        assert!(decide(UNIFIED, None).is_err());
        let only_cpu = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n\
                        cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n";
        let reason = decide(only_cpu, None).unwrap_err();
        assert!(reason.contains("/sys/fs/cgroup is tmpfs"), "{reason}");
    }

    #[test]
    fn the_last_mount_on_the_root_wins() {
        let mounts = format!("{UNIFIED}tmpfs /sys/fs/cgroup tmpfs rw 0 0\n");
        assert!(decide(&mounts, Some("cpu memory")).is_err());
        assert!(decide("", Some("cpu memory"))
            .unwrap_err()
            .contains("nothing is mounted"));
    }

    #[test]
    fn limits_are_written_as_the_kernel_reads_them() {
        assert_eq!(memory_max(512), "536870912");
        assert_eq!(memory_max(0), "max");
        assert_eq!(cpu_max(1.5), "150000 100000");
        assert_eq!(cpu_max(0.001), "1000 100000");
        assert_eq!(cpu_max(0.0), "max 100000");
        assert_eq!(cpu_max(f32::NAN), "max 100000");
    }

    #[test]
    fn v1_and_v2_get_the_same_limits_in_their_own_files() {
        let limits = Limits {
            memory_mib: 512,
            cpu_cores: 0.5,
            pids: 512,
        };
        let v1 = decide(V1, None).unwrap();
        let files = limit_files(&v1, &limits);
        let get = |name: &str| {
            files
                .iter()
                .find(|(p, _)| p.ends_with(name))
                .map(|(p, t)| (p.to_string_lossy().into_owned(), t.clone()))
                .unwrap_or_else(|| panic!("{name} in {files:?}"))
        };
        assert_eq!(
            get("memory.limit_in_bytes"),
            (
                "/sys/fs/cgroup/memory/memory.limit_in_bytes".into(),
                "536870912".into()
            )
        );
        assert_eq!(get("cpu.cfs_quota_us").1, "50000");
        assert_eq!(get("cpu.cfs_period_us").1, "100000");
        assert_eq!(
            get("pids.max"),
            ("/sys/fs/cgroup/pids/pids.max".into(), "512".into())
        );
        let v2 = limit_files(&Hierarchy::V2 { pids: true }, &limits);
        assert!(v2.contains(&("memory.max".into(), "536870912".into())));
        assert!(v2.contains(&("cpu.max".into(), "50000 100000".into())));
        assert!(v2.contains(&("pids.max".into(), "512".into())));
    }

    #[test]
    fn oom_kills_are_read_from_either_file() {
        let v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        assert_eq!(parse_oom_kills(v1), Some(3));
        let v2 = "low 0\nhigh 0\nmax 12\noom 2\noom_kill 2\noom_group_kill 0\n";
        assert_eq!(parse_oom_kills(v2), Some(2));
        assert_eq!(parse_oom_kills("under_oom 0\n"), None);
    }
}
