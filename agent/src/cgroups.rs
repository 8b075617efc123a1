//! Per-session memory and CPU limits with cgroup v2.
//!
//! Only where cgroup v2 is the unified hierarchy at `/sys/fs/cgroup` with
//! the `memory` and `cpu` controllers: each session gets
//! `/sys/fs/cgroup/opencloud/<sid>` with `memory.max` and `cpu.max`, and its
//! server is moved in right after spawn (the kernels it starts later are
//! born inside). Elsewhere (cgroup v1, hybrid mounts, no root) the agent
//! says so once at start and reports `cgroup_limits: false` to control.

use std::path::{Path, PathBuf};
use std::time::Duration;

const ROOT: &str = "/sys/fs/cgroup";
/// The cgroup all sessions live under.
const GROUP: &str = "opencloud";
/// `cpu.max` period, in µs (the kernel's default).
const CPU_PERIOD_US: u64 = 100_000;

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

/// Looks at this machine and prepares `/sys/fs/cgroup/opencloud` when it can.
pub fn detect() -> Support {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let controllers = std::fs::read_to_string(Path::new(ROOT).join("cgroup.controllers")).ok();
    if let Err(reason) = decide(&mounts, controllers.as_deref()) {
        return Support::Unavailable(reason);
    }
    if !crate::users::running_as_root() {
        return Support::Unavailable("the agent is not running as root".into());
    }
    let cgroups = Cgroups {
        base: Path::new(ROOT).join(GROUP),
    };
    match cgroups.prepare() {
        Ok(()) => Support::Available(cgroups),
        Err(e) => Support::Unavailable(format!("cannot set up {}: {e}", cgroups.base.display())),
    }
}

/// Whether `mounts` (as in `/proc/self/mounts`) and the root's
/// `cgroup.controllers` allow per-session limits; the reason when not.
pub fn decide(mounts: &str, root_controllers: Option<&str>) -> Result<(), String> {
    let entries: Vec<(&str, &str)> = mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let _device = fields.next()?;
            let point = fields.next()?;
            let fstype = fields.next()?;
            Some((point, fstype))
        })
        .collect();
    // The last mount on a mount point is the one visible.
    let root_type = entries
        .iter()
        .rev()
        .find(|(point, _)| *point == ROOT)
        .map(|(_, fstype)| *fstype);
    match root_type {
        Some("cgroup2") => {}
        other => {
            let elsewhere = entries
                .iter()
                .find(|(point, fstype)| *fstype == "cgroup2" && *point != ROOT)
                .map(|(point, _)| format!("; cgroup2 is only mounted at {point}"))
                .unwrap_or_default();
            let what = match other {
                Some(fstype) => format!(
                    "{ROOT} is {fstype}, not cgroup2 (cgroup v1 or a hybrid setup{elsewhere})"
                ),
                None => format!("nothing is mounted at {ROOT}{elsewhere}"),
            };
            return Err(what);
        }
    }
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
    Ok(())
}

/// `memory.max` for a limit in MiB; 0 means no limit.
pub fn memory_max(mib: u64) -> String {
    if mib == 0 {
        "max".into()
    } else {
        (mib * 1024 * 1024).to_string()
    }
}

/// `cpu.max` for a share in cores; 0 (or nonsense) means no limit.
pub fn cpu_max(cores: f32) -> String {
    if !(cores.is_finite() && cores > 0.0) {
        return format!("max {CPU_PERIOD_US}");
    }
    // The kernel refuses quotas under 1 ms.
    let quota = ((f64::from(cores) * CPU_PERIOD_US as f64).round() as u64).max(1_000);
    format!("{quota} {CPU_PERIOD_US}")
}

/// The `opencloud` cgroup, ready for sessions.
#[derive(Debug, Clone)]
pub struct Cgroups {
    base: PathBuf,
}

impl Cgroups {
    fn prepare(&self) -> std::io::Result<()> {
        enable_controllers(Path::new(ROOT))?;
        std::fs::create_dir_all(&self.base)?;
        enable_controllers(&self.base)
    }

    fn dir(&self, sid: &str) -> PathBuf {
        self.base.join(sid)
    }

    /// Makes the session's cgroup with its limits.
    pub fn create(&self, sid: &str, memory_mib: u64, cpu_cores: f32) -> std::io::Result<()> {
        let dir = self.dir(sid);
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        std::fs::write(dir.join("memory.max"), memory_max(memory_mib))?;
        std::fs::write(dir.join("cpu.max"), cpu_max(cpu_cores))
    }

    /// Moves `pid` (and so what it starts from now on) into the session's cgroup.
    pub fn add(&self, sid: &str, pid: i32) -> std::io::Result<()> {
        std::fs::write(self.dir(sid).join("cgroup.procs"), pid.to_string())
    }

    /// Removes the session's cgroup once its processes are gone.
    pub async fn remove(&self, sid: &str) {
        let dir = self.dir(sid);
        for _ in 0..20 {
            match std::fs::remove_dir(&dir) {
                Ok(()) => return,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
                // Busy while the last processes are being reaped.
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        tracing::warn!(sid, dir = %dir.display(), "could not remove the session's cgroup");
    }

    /// Session cgroups left behind, for clean-up after a restart.
    pub fn existing(&self) -> Vec<String> {
        std::fs::read_dir(&self.base)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok())
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .filter_map(|e| e.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default()
    }
}

fn enable_controllers(dir: &Path) -> std::io::Result<()> {
    let control = dir.join("cgroup.subtree_control");
    let enabled = std::fs::read_to_string(&control)?;
    let enabled: Vec<&str> = enabled.split_whitespace().collect();
    for controller in ["memory", "cpu"] {
        if !enabled.contains(&controller) {
            std::fs::write(&control, format!("+{controller}"))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const UNIFIED: &str = "sysfs /sys sysfs rw 0 0\ncgroup2 /sys/fs/cgroup cgroup2 rw,nosuid 0 0\n";

    #[test]
    fn a_unified_hierarchy_with_memory_and_cpu_is_used() {
        assert_eq!(decide(UNIFIED, Some("cpuset cpu io memory pids\n")), Ok(()));
    }

    #[test]
    fn cgroup_v1_with_an_empty_v2_mount_is_not() {
        // What this kind of machine has.
        let mounts = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n\
                      cgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        let reason = decide(mounts, None).unwrap_err();
        assert!(
            reason.contains("/sys/fs/cgroup is tmpfs, not cgroup2"),
            "{reason}"
        );
        assert!(
            reason.contains("only mounted at /sys/fs/cgroup/unified"),
            "{reason}"
        );
    }

    #[test]
    fn missing_controllers_are_named() {
        let reason = decide(UNIFIED, Some("cpuset io pids")).unwrap_err();
        assert!(reason.contains("memory and cpu controllers"), "{reason}");
        let reason = decide(UNIFIED, Some("cpu pids")).unwrap_err();
        assert!(reason.contains("lacks the memory controller"), "{reason}");
        assert!(decide(UNIFIED, None).is_err());
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
}
