//! Processes as `/proc` shows them: which ones belong to a session, and
//! signalling them.
//!
//! A session is more than the server's process group: bwrap's process
//! inside the sandbox starts a Linux session of its own, Jupyter starts each
//! kernel in another (so it can interrupt it), and all of them outlive a
//! killed outer process. So a session's processes are found from several
//! sides: its cgroup (the kernel's own record, which no process of the
//! session can leave, whatever uid `/proc` shows for it), and, restricted to
//! the session's uid, the sandbox's PID namespace, the outer process's group
//! and descendants, and the process groups and sessions those lead.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;

/// One process, as `/proc/<pid>/stat` describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcInfo {
    pub pid: i32,
    pub ppid: i32,
    pub pgrp: i32,
    /// The Linux session (`setsid`), not an OpenCloud one.
    pub session: i32,
    /// `R`, `S`, `Z`, …
    pub state: char,
    /// Clock ticks after boot; with the pid, names a process across pid reuse.
    pub start_ticks: u64,
    /// Effective uid (the owner of `/proc/<pid>`).
    pub uid: u32,
}

impl ProcInfo {
    /// Zombies and dead tasks hold a pid but nothing else.
    pub fn is_alive(&self) -> bool {
        !matches!(self.state, 'Z' | 'X' | 'x')
    }
}

/// Parses the fields after the command name of `/proc/<pid>/stat`.
/// The command name is in parentheses and may itself contain `)`.
pub fn parse_stat(pid: i32, stat: &str, uid: u32) -> Option<ProcInfo> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 of proc(5): state; starttime is field 22.
    Some(ProcInfo {
        pid,
        state: fields.first()?.chars().next()?,
        ppid: fields.get(1)?.parse().ok()?,
        pgrp: fields.get(2)?.parse().ok()?,
        session: fields.get(3)?.parse().ok()?,
        start_ticks: fields.get(19)?.parse().ok()?,
        uid,
    })
}

/// The process `pid`, if it exists (zombies included: see [`ProcInfo::is_alive`]).
pub fn proc_info(pid: i32) -> Option<ProcInfo> {
    let dir = format!("/proc/{pid}");
    let uid = std::fs::metadata(&dir).ok()?.uid();
    let stat = std::fs::read_to_string(format!("{dir}/stat")).ok()?;
    parse_stat(pid, &stat, uid)
}

/// Every process on the machine.
pub fn snapshot() -> Vec<ProcInfo> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(proc_info)
        .collect()
}

/// The PID namespace `pid` lives in (the inode of `/proc/<pid>/ns/pid`).
pub fn pid_namespace(pid: i32) -> Option<u64> {
    let link = std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok()?;
    parse_namespace(link.to_str()?)
}

/// `pid:[4026532174]` → 4026532174.
pub fn parse_namespace(link: &str) -> Option<u64> {
    link.split_once(":[")?.1.strip_suffix(']')?.parse().ok()
}

/// The first child of `parent` (bwrap's process inside its namespaces).
pub fn child_of(parent: i32) -> Option<ProcInfo> {
    snapshot()
        .into_iter()
        .filter(|p| p.ppid == parent && p.is_alive())
        .min_by_key(|p| p.start_ticks)
}

/// What identifies one session's processes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    /// The sandbox's outer process (its pid is also its process group).
    pub pid: i32,
    pub pgid: i32,
    pub start_ticks: u64,
    pub uid: u32,
    /// The sandbox's PID namespace; 0 when unknown.
    pub pidns: u64,
    /// The session's cgroup path (`/opencloud/<sid>`) in every hierarchy.
    pub cgroup: String,
}

/// The cgroup paths `pid` is in, one per hierarchy (`/proc/<pid>/cgroup`).
pub fn cgroups_of(pid: i32) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .map(|text| parse_cgroups(&text))
        .unwrap_or_default()
}

/// `4:memory:/opencloud/abc` and `0::/opencloud/abc` → `/opencloud/abc`.
pub fn parse_cgroups(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|line| Some(line.splitn(3, ':').nth(2)?.to_owned()))
        .collect()
}

/// Whether one of `paths` is `cgroup` or below it.
pub fn within(paths: &[String], cgroup: &str) -> bool {
    !cgroup.is_empty()
        && paths.iter().any(|p| {
            p.strip_prefix(cgroup)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        })
}

/// The live processes of `scope` among `procs`. `in_sandbox(pid)` says
/// whether a process lives in the session's PID namespace, `in_cgroup(pid)`
/// whether it is in the session's cgroup (a member whatever its uid).
pub fn members(
    procs: &[ProcInfo],
    scope: &Scope,
    own_pid: i32,
    in_sandbox: impl Fn(i32) -> bool,
    in_cgroup: impl Fn(i32) -> bool,
) -> Vec<ProcInfo> {
    // Everything in the cgroup started with or after the outer process.
    let in_cgroup = |p: &ProcInfo| p.start_ticks >= scope.start_ticks && in_cgroup(p.pid);
    let alive: Vec<&ProcInfo> = procs
        .iter()
        .filter(|p| p.pid != own_pid && p.is_alive())
        .collect();
    let contained: HashSet<i32> = alive
        .iter()
        .filter(|p| in_cgroup(p))
        .map(|p| p.pid)
        .collect();
    let candidates: Vec<&ProcInfo> = alive
        .into_iter()
        .filter(|p| p.uid == scope.uid || contained.contains(&p.pid))
        .collect();
    let mut found: HashSet<i32> = candidates
        .iter()
        .filter(|p| {
            contained.contains(&p.pid)
                || (p.uid == scope.uid
                    && (p.pgrp == scope.pgid
                        || (p.pid == scope.pid && p.start_ticks == scope.start_ticks)
                        || (p.start_ticks >= scope.start_ticks && in_sandbox(p.pid))))
        })
        .map(|p| p.pid)
        .collect();
    // Descendants, and what members lead as groups or sessions, until nothing new.
    loop {
        let before = found.len();
        for p in &candidates {
            if !found.contains(&p.pid)
                && (found.contains(&p.ppid)
                    || found.contains(&p.pgrp)
                    || found.contains(&p.session))
            {
                found.insert(p.pid);
            }
        }
        if found.len() == before {
            break;
        }
    }
    candidates
        .into_iter()
        .filter(|p| found.contains(&p.pid))
        .copied()
        .collect()
}

/// The live processes of `scope` right now.
pub fn session_members(scope: &Scope) -> Vec<ProcInfo> {
    let own = std::process::id() as i32;
    members(
        &snapshot(),
        scope,
        own,
        |pid| scope.pidns != 0 && pid_namespace(pid) == Some(scope.pidns),
        |pid| within(&cgroups_of(pid), &scope.cgroup),
    )
}

/// Sends `signal` to every process of `scope`; returns how many there were.
pub fn signal_members(scope: &Scope, signal: Signal) -> usize {
    let members = session_members(scope);
    // The group in one call where it is wholly ours, so a process forking
    // right now is not missed; then each member, wherever it is.
    let group: Vec<&ProcInfo> = members.iter().filter(|p| p.pgrp == scope.pgid).collect();
    if !group.is_empty() && scope.pgid > 1 {
        let _ = killpg(Pid::from_raw(scope.pgid), signal);
    }
    for p in &members {
        if p.pid > 1 {
            let _ = kill(Pid::from_raw(p.pid), signal);
        }
    }
    members.len()
}

/// Waits until `scope` has no live process, up to `limit`. True when none is left.
pub async fn wait_gone(scope: &Scope, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if session_members(scope).is_empty() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// SIGTERM, then SIGKILL after `grace` to whatever is left; true when
/// nothing of the session is left.
pub async fn terminate(scope: &Scope, grace: Duration) -> bool {
    if signal_members(scope, Signal::SIGTERM) == 0 {
        return true;
    }
    if wait_gone(scope, grace).await {
        return true;
    }
    for _ in 0..5 {
        signal_members(scope, Signal::SIGKILL);
        if wait_gone(scope, Duration::from_secs(2)).await {
            return true;
        }
    }
    false
}

/// Stops a helper the agent started (`pid` with `start_ticks`, so never a
/// stranger that got its pid): SIGTERM, SIGKILL after `grace`.
pub async fn stop_helper(pid: i32, start_ticks: u64, grace: Duration) {
    let same = || proc_info(pid).is_some_and(|p| p.is_alive() && p.start_ticks == start_ticks);
    if pid <= 1 || !same() {
        return;
    }
    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while same() {
        if Instant::now() >= deadline {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pid: i32, ppid: i32, pgrp: i32, session: i32, uid: u32) -> ProcInfo {
        ProcInfo {
            pid,
            ppid,
            pgrp,
            session,
            state: 'S',
            start_ticks: 1000 + pid as u64,
            uid,
        }
    }

    const SCOPE: Scope = Scope {
        pid: 100,
        pgid: 100,
        start_ticks: 1100,
        uid: 1001,
        pidns: 4_026_532_174,
        cgroup: String::new(),
    };

    fn pids(found: Vec<ProcInfo>) -> Vec<i32> {
        let mut pids: Vec<i32> = found.into_iter().map(|p| p.pid).collect();
        pids.sort();
        pids
    }

    #[test]
    fn stat_lines_parse_even_with_odd_command_names() {
        let stat = "4242 (jupyter (x) y) S 1 4242 17 0 -1 4194560 100 0 0 0 5 3 0 0 20 0 3 0 987654 1000000 200";
        let info = parse_stat(4242, stat, 1001).unwrap();
        assert_eq!(info.state, 'S');
        assert_eq!(info.ppid, 1);
        assert_eq!(info.pgrp, 4242);
        assert_eq!(info.session, 17);
        assert_eq!(info.start_ticks, 987654);
        assert!(info.is_alive());
        assert!(parse_stat(1, "1 (init) S 0", 0).is_none());
    }

    #[test]
    fn namespace_links_are_read() {
        assert_eq!(parse_namespace("pid:[4026532174]"), Some(4_026_532_174));
        assert_eq!(parse_namespace("pid:4026532174"), None);
        let own = pid_namespace(std::process::id() as i32);
        assert!(own.is_some_and(|ns| ns > 0));
    }

    #[test]
    fn this_process_is_visible() {
        let me = proc_info(std::process::id() as i32).unwrap();
        assert!(me.is_alive());
        assert!(me.start_ticks > 0);
    }

    #[test]
    fn a_session_is_its_group_its_descendants_and_their_sessions() {
        let procs = vec![
            p(1, 0, 1, 1, 0),
            p(50, 1, 50, 50, 0),         // the agent
            p(100, 50, 100, 50, 1001),   // the server, own group, agent's session
            p(101, 100, 100, 50, 1001),  // a helper in the server's group
            p(200, 100, 200, 200, 1001), // a kernel: own session
            p(201, 200, 200, 200, 1001), // something the kernel ran
            p(300, 1, 300, 300, 1001),   // in the sandbox's namespace, reparented
            p(301, 300, 300, 300, 1001),
            p(400, 1, 400, 400, 1002), // another project's process
            p(500, 1, 500, 500, 1001), // same uid, unrelated, no marker
        ];
        let found = members(&procs, &SCOPE, 50, |pid| pid == 300, |_| false);
        assert_eq!(pids(found), vec![100, 101, 200, 201, 300, 301]);
    }

    #[test]
    fn other_users_zombies_and_older_markers_are_never_members() {
        let mut zombie = p(102, 100, 100, 50, 1001);
        zombie.state = 'Z';
        let mut old = p(20, 1, 20, 20, 1001); // started before the server: pid reuse
        old.start_ticks = 5;
        let procs = vec![
            p(100, 50, 100, 50, 1001),
            p(101, 100, 100, 50, 0), // root in the group (setuid helper): left alone
            zombie,
            old,
        ];
        let found = members(&procs, &SCOPE, 50, |_| true, |_| false);
        assert_eq!(pids(found), vec![100]);
    }

    #[test]
    fn the_cgroup_holds_members_whatever_uid_proc_shows() {
        // A non-dumpable process shows as root's in /proc; its own session,
        // its own group, reparented: only the cgroup still names it.
        let hidden = p(700, 1, 700, 700, 0);
        let mut older = p(20, 1, 20, 20, 0); // in no session of ours: pid reuse
        older.start_ticks = 5;
        let procs = vec![
            hidden,
            p(701, 700, 700, 700, 1001), // its child
            p(800, 1, 800, 800, 0),      // root, elsewhere: never
            older,
        ];
        let in_cgroup = |pid: i32| pid == 700 || pid == 20;
        let found = members(&procs, &SCOPE, 50, |_| false, in_cgroup);
        assert_eq!(pids(found), vec![700, 701]);
    }

    #[test]
    fn cgroup_files_are_read_for_v1_and_v2() {
        let v1 = "8:pids:/opencloud/abc\n4:memory:/opencloud/abc\n1:name=systemd:/\n";
        let paths = parse_cgroups(v1);
        assert_eq!(paths, vec!["/opencloud/abc", "/opencloud/abc", "/"]);
        assert!(within(&paths, "/opencloud/abc"));
        assert!(!within(&paths, "/opencloud/ab"));
        assert!(!within(&paths, ""));
        assert!(within(
            &parse_cgroups("0::/opencloud/abc/x\n"),
            "/opencloud/abc"
        ));
        assert!(!within(&parse_cgroups("0::/\n"), "/opencloud/abc"));
        let own = cgroups_of(std::process::id() as i32);
        assert!(!own.is_empty());
    }

    #[test]
    fn the_agent_itself_is_never_a_member() {
        // Running as the session's user (no root): the agent shares the uid.
        let procs = vec![p(50, 1, 100, 50, 1001), p(100, 50, 100, 50, 1001)];
        assert_eq!(
            pids(members(&procs, &SCOPE, 50, |_| false, |_| false)),
            vec![100]
        );
    }
}
