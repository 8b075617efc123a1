//! How busy the machine is: CPU from `/proc/stat` deltas, memory from
//! `/proc/meminfo`, free disk where the projects live.

use std::path::Path;

use opencloud_protocol::agent::Load;

/// Cumulative CPU time, in clock ticks, from the `cpu` line of `/proc/stat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuTimes {
    pub busy: u64,
    pub total: u64,
}

pub fn parse_cpu(stat: &str) -> Option<CpuTimes> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let values: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice]:
    // guest time is already counted in user and nice.
    let counted = &values[..values.len().min(8)];
    if counted.len() < 4 {
        return None;
    }
    let total: u64 = counted.iter().sum();
    let idle = counted[3] + counted.get(4).copied().unwrap_or(0);
    Some(CpuTimes {
        busy: total - idle,
        total,
    })
}

/// Busy share between two samples, 0–100.
pub fn cpu_percent(before: CpuTimes, after: CpuTimes) -> f32 {
    let total = after.total.saturating_sub(before.total);
    if total == 0 {
        return 0.0;
    }
    let busy = after.busy.saturating_sub(before.busy).min(total);
    (busy as f64 * 100.0 / total as f64) as f32
}

/// (total, used) MiB; used is what is not available (`MemAvailable`).
pub fn parse_meminfo(meminfo: &str) -> Option<(u64, u64)> {
    let kib = |key: &str| -> Option<u64> {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    let total = kib("MemTotal")?;
    let available = kib("MemAvailable").or_else(|| kib("MemFree"))?;
    Some((total / 1024, total.saturating_sub(available) / 1024))
}

/// Free space for unprivileged users on the file system holding `dir`, MiB.
pub fn disk_free_mib(dir: &Path) -> Option<u64> {
    let stats = nix::sys::statvfs::statvfs(dir).ok()?;
    let bytes = stats.blocks_available() * stats.fragment_size();
    Some(bytes / (1024 * 1024))
}

/// Measures load; CPU is the share since the previous measurement.
#[derive(Debug, Default)]
pub struct LoadSampler {
    previous: Option<CpuTimes>,
}

impl LoadSampler {
    pub fn sample(&mut self, work_dir: &Path) -> Load {
        let cpu = std::fs::read_to_string("/proc/stat")
            .ok()
            .as_deref()
            .and_then(parse_cpu);
        let cpu_percent = match (self.previous, cpu) {
            (Some(before), Some(after)) => cpu_percent(before, after),
            _ => 0.0,
        };
        if cpu.is_some() {
            self.previous = cpu;
        }
        let (memory_total_mib, memory_used_mib) = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .as_deref()
            .and_then(parse_meminfo)
            .unwrap_or((0, 0));
        Load {
            cpu_percent,
            memory_used_mib,
            memory_total_mib,
            disk_free_mib: disk_free_mib(work_dir).unwrap_or(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_is_busy_against_total() {
        let stat = "cpu  100 5 50 800 40 3 2 0 7 0\ncpu0 50 2 25 400 20 1 1 0 0 0\nintr 1\n";
        let times = parse_cpu(stat).unwrap();
        assert_eq!(times.total, 1000);
        assert_eq!(times.busy, 160);
        assert!(parse_cpu("intr 1\n").is_none());
        assert!(parse_cpu("cpu  1 2\n").is_none());
    }

    #[test]
    fn cpu_percent_is_the_busy_share_of_the_delta() {
        let before = CpuTimes {
            busy: 100,
            total: 1000,
        };
        let after = CpuTimes {
            busy: 150,
            total: 1200,
        };
        assert_eq!(cpu_percent(before, after), 25.0);
        assert_eq!(cpu_percent(after, after), 0.0);
        // A counter going backwards (it should not) never gives nonsense.
        assert_eq!(cpu_percent(after, before), 0.0);
    }

    #[test]
    fn memory_used_is_what_is_not_available() {
        let meminfo = "MemTotal:       16384000 kB\nMemFree:         1024000 kB\nMemAvailable:    8192000 kB\n";
        assert_eq!(parse_meminfo(meminfo), Some((16000, 8000)));
        let old_kernel = "MemTotal: 2048 kB\nMemFree: 1024 kB\n";
        assert_eq!(parse_meminfo(old_kernel), Some((2, 1)));
        assert_eq!(parse_meminfo("nothing"), None);
    }

    #[test]
    fn this_machine_reports_sensible_numbers() {
        let mut sampler = LoadSampler::default();
        let dir = std::env::temp_dir();
        sampler.sample(&dir);
        let load = sampler.sample(&dir);
        assert!((0.0..=100.0).contains(&load.cpu_percent), "{load:?}");
        assert!(load.memory_total_mib > 0 && load.memory_used_mib <= load.memory_total_mib);
        assert!(load.disk_free_mib > 0, "{load:?}");
    }
}
