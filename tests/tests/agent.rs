#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test
//! The agent with real Jupyter servers from the project's venv: sessions run
//! as their project's own unprivileged user, stop without leftovers, survive
//! an agent restart (or are cleaned up when they cannot be trusted), and
//! report failures and exits with their logs, and keep projects' files in
//! snapshots. Nothing here needs control (a stand-in serves snapshots).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use opencloud_agent::process::{proc_info, snapshot};
use opencloud_agent::{Config, Supervisor};
use opencloud_e2e::agents::{kill_session, session_leftovers, stop_all};
use opencloud_e2e::jupyter::get_status;
use opencloud_e2e::stack::Target;
use opencloud_e2e::{binary, free_port, jupyter::venv, unique};
use opencloud_protocol::agent::{AgentEvent, AgentSessionState, StartSession};
use opencloud_protocol::routes::new_sid;
use tokio::sync::mpsc::UnboundedReceiver;

/// A host's work dir and config, on ports nothing else uses right now.
/// Dropped, it stops whatever its supervisors left running (a failed test
/// included).
struct Host {
    base: PathBuf,
    config_path: PathBuf,
    config: Config,
    supervisors: Mutex<Vec<Supervisor>>,
}

impl Host {
    fn new(max_sessions: u32) -> Self {
        Self::with(max_sessions, &venv(), "")
    }

    fn with(max_sessions: u32, venv: &Path, extra: &str) -> Self {
        // Nothing listens there: these tests never need control.
        let control = format!("http://127.0.0.1:{}", free_port());
        Self::with_control(max_sessions, venv, extra, &control)
    }

    fn with_control(max_sessions: u32, venv: &Path, extra: &str, control: &str) -> Self {
        let base = std::env::temp_dir().join(unique("oc-agent-"));
        std::fs::create_dir_all(&base).unwrap();
        let link = free_port();
        let text = format!(
            r#"
control_url = "{control}"
host_key = "test-host-key"
address = "127.0.0.1"
link_port = {link}
work_dir = "work"
venv = "{venv}"
stop_grace_seconds = 5
{warm_pool}
{extra}

[capacity]
max_sessions = {max_sessions}
cpu_cores = 2.0
memory_mib = 2048
"#,
            venv = venv.display(),
            // No warm pool unless a test asks for one in `extra`.
            warm_pool = if extra.contains("warm_pool") {
                ""
            } else {
                "warm_pool = 0"
            },
        );
        let config_path = base.join("agent.toml");
        std::fs::write(&config_path, &text).unwrap();
        let config = Config::from_toml(&config_path, &text, Vec::new()).unwrap();
        Self {
            base,
            config_path,
            config,
            supervisors: Mutex::new(Vec::new()),
        }
    }

    async fn supervisor(&self) -> (Supervisor, UnboundedReceiver<AgentEvent>) {
        let (supervisor, events) = Supervisor::open(self.config.clone()).await.unwrap();
        self.supervisors.lock().unwrap().push(supervisor.clone());
        (supervisor, events)
    }

    fn work(&self) -> PathBuf {
        self.config.work_dir.clone()
    }

    fn state_file(&self, sid: &str) -> PathBuf {
        self.work().join("sessions").join(format!("{sid}.json"))
    }

    /// Nothing of session `sid` is left: no state file, no session
    /// directory, no network namespace, slirp4netns or cgroup.
    fn assert_nothing_left(&self, sid: &str) {
        assert!(!self.state_file(sid).exists(), "state file left");
        assert!(
            !self.work().join("sessions").join(sid).exists(),
            "session directory left"
        );
        assert_eq!(session_leftovers(sid), Vec::<String>::new(), "{sid}");
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        // Releases the work dir's lock, so that stop-all may take it over.
        for supervisor in self.supervisors.lock().unwrap().drain(..) {
            supervisor.detach();
        }
        stop_all(&self.config_path);
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

fn start_command(project_id: u64) -> StartSession {
    StartSession {
        sid: new_sid(),
        project_id,
        memory_limit_mib: 1024,
        cpu_limit_cores: 1.0,
    }
}

/// The session a `Ready` names, where the host link reaches it, and its spawn time.
fn ready(supervisor: &Supervisor, event: AgentEvent) -> (String, Target, u64) {
    match event {
        AgentEvent::Ready { sid, spawn_ms, .. } => {
            let target = supervisor
                .link_target(&sid)
                .expect("a ready session has a target");
            (sid, target, spawn_ms)
        }
        other => panic!("expected Ready, got {other:?}"),
    }
}

async fn api_status(target: &Target) -> Option<u16> {
    get_status(target, "/api/status").await
}

/// Nothing answers at `target` any more.
async fn gone(target: &Target) -> bool {
    api_status(target).await.is_none()
}

fn uid_of(pid: i32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// The uid `/etc/passwd` gives a user.
fn passwd_uid(user: &str) -> Option<u32> {
    std::fs::read_to_string("/etc/passwd")
        .unwrap()
        .lines()
        .find(|l| l.split(':').next() == Some(user))
        .and_then(|l| l.split(':').nth(2)?.parse().ok())
}

/// Live processes of a user (each test uses its own project users) started
/// since this test binary was: an earlier run's leftovers are not this one's.
fn processes_of(uid: u32) -> Vec<i32> {
    let since = proc_info(std::process::id() as i32).unwrap().start_ticks;
    snapshot()
        .into_iter()
        .filter(|p| p.uid == uid && p.is_alive() && p.start_ticks >= since)
        .map(|p| p.pid)
        .collect()
}

/// Whether one of `uid`'s processes is a kernel.
fn runs_a_kernel(uid: u32) -> bool {
    processes_of(uid).into_iter().any(|pid| {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains("ipykernel_launcher"))
    })
}

async fn eventually(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "{what} did not happen in {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The next event, within `limit`.
async fn next_event(events: &mut UnboundedReceiver<AgentEvent>, limit: Duration) -> AgentEvent {
    tokio::time::timeout(limit, events.recv())
        .await
        .expect("an event in time")
        .expect("the supervisor is alive")
}

fn kill(signal: &str, target: &str) {
    let _ = Command::new("kill")
        .args([signal, "--", target])
        .stderr(Stdio::null())
        .status();
}

/// Starts a kernel in a session, so that stopping it has more to stop.
async fn start_kernel(target: &Target) {
    let (status, body) = opencloud_e2e::jupyter::request(
        target,
        "POST",
        "/api/kernels",
        Some(serde_json::json!({ "name": "python3" })),
    )
    .await
    .unwrap();
    assert_eq!(status, 201, "{body}");
}

#[tokio::test]
async fn a_session_runs_as_its_own_user_and_stopping_it_leaves_nothing() {
    let host = Host::new(2);
    let (supervisor, mut events) = host.supervisor().await;
    println!(
        "cgroup limits: {} ({})",
        supervisor.cgroup_limits(),
        supervisor
            .cgroup_unavailable_reason()
            .unwrap_or("available")
    );
    let start = start_command(910_001);

    let (sid, target, spawn_ms) = ready(&supervisor, supervisor.start(start.clone()).await);
    println!("spawn to ready: {spawn_ms} ms");
    assert_eq!(sid, start.sid);
    assert!(spawn_ms < 60_000, "{spawn_ms}");
    assert!(matches!(
        next_event(&mut events, Duration::from_secs(1)).await,
        AgentEvent::Ready { .. }
    ));

    assert_eq!(api_status(&target).await, Some(200));

    let pid = supervisor.pid_of(&sid).unwrap();
    let uid = uid_of(pid);
    assert_ne!(uid, 0, "jupyter must not run as root");
    assert_eq!(
        Some(uid),
        passwd_uid("oc-p910001"),
        "runs as the project's user"
    );
    // No credential to hand out: the server trusts its link.
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    assert!(!String::from_utf8_lossy(&environ).contains("JUPYTER_TOKEN="));

    let project = std::fs::metadata(host.work().join("projects/910001")).unwrap();
    assert_eq!((project.uid(), project.mode() & 0o777), (uid, 0o700));
    let home = std::fs::metadata(host.work().join("homes/oc-p910001")).unwrap();
    assert_eq!((home.uid(), home.mode() & 0o777), (uid, 0o700));
    // The state file says which process is the server: root's alone, in root's own directories.
    let state = std::fs::metadata(host.state_file(&sid)).unwrap();
    assert_eq!((state.uid(), state.mode() & 0o777), (0, 0o600));
    // Logs are root's alone; `sessions/` is searchable (each session's user
    // reaches its own 0700 directory there) but not listable.
    for (dir, mode) in [("sessions", 0o711), ("logs", 0o700)] {
        let meta = std::fs::metadata(host.work().join(dir)).unwrap();
        assert_eq!((meta.uid(), meta.mode() & 0o777), (0, mode), "{dir}");
    }

    let sessions = supervisor.sessions();
    assert_eq!(sessions.len(), 1);
    assert_eq!(
        (sessions[0].sid.as_str(), sessions[0].state),
        (sid.as_str(), AgentSessionState::Running)
    );

    // A kernel runs in a process session of its own: stopping must find it too.
    start_kernel(&target).await;
    eventually("the kernel starts", Duration::from_secs(30), || {
        runs_a_kernel(uid)
    })
    .await;
    supervisor.refresh_activity().await;
    assert!(supervisor.sessions()[0].last_activity.is_some());

    let stopped = supervisor.stop(&sid, Duration::from_secs(5)).await;
    assert_eq!(stopped, AgentEvent::Stopped { sid: sid.clone() });
    assert_eq!(
        next_event(&mut events, Duration::from_secs(1)).await,
        stopped
    );
    assert!(gone(&target).await, "{target:?} still answers");
    assert_eq!(
        processes_of(uid),
        Vec::<i32>::new(),
        "processes left behind"
    );
    host.assert_nothing_left(&sid);
    assert!(supervisor.sessions().is_empty());
}

#[tokio::test]
async fn starting_a_running_session_again_reports_it_ready_and_a_full_host_says_so() {
    let host = Host::new(1);
    let (supervisor, _events) = host.supervisor().await;
    let start = start_command(910_002);

    // Twice at once, then once more: one server, one port.
    let (a, b) = tokio::join!(
        supervisor.start(start.clone()),
        supervisor.start(start.clone())
    );
    let (_, target_a, _) = ready(&supervisor, a);
    let (_, target_b, _) = ready(&supervisor, b);
    assert_eq!(target_a, target_b);
    let pid = supervisor.pid_of(&start.sid).unwrap();
    let (_, target_c, _) = ready(&supervisor, supervisor.start(start.clone()).await);
    assert_eq!(target_c, target_a);
    assert_eq!(supervisor.pid_of(&start.sid), Some(pid));
    assert_eq!(supervisor.sessions().len(), 1);

    match supervisor.start(start_command(910_012)).await {
        AgentEvent::Failed { reason, .. } => assert!(reason.contains("host is full"), "{reason}"),
        other => panic!("expected Failed, got {other:?}"),
    }

    let unknown = new_sid();
    assert_eq!(
        supervisor.stop(&unknown, Duration::from_secs(1)).await,
        AgentEvent::Stopped { sid: unknown }
    );
    supervisor.stop(&start.sid, Duration::from_secs(5)).await;
    assert!(gone(&target_a).await);
}

#[tokio::test]
async fn a_restarted_supervisor_adopts_live_servers_and_cleans_up_the_rest() {
    let host = Host::new(3);
    let (first, _events) = host.supervisor().await;
    let (keep, mismatched, dead) = (
        start_command(910_003),
        start_command(910_004),
        start_command(910_005),
    );
    let (a, b, c) = tokio::join!(
        first.start(keep.clone()),
        first.start(mismatched.clone()),
        first.start(dead.clone())
    );
    let (keep_target, wrong_target, dead_target) =
        (ready(&first, a).1, ready(&first, b).1, ready(&first, c).1);
    let keep_pid = first.pid_of(&keep.sid).unwrap();
    let wrong_uid = uid_of(first.pid_of(&mismatched.sid).unwrap());
    let dead_pid = first.pid_of(&dead.sid).unwrap();
    let dead_uid = uid_of(dead_pid);

    // The agent goes away; its servers keep running.
    first.detach();
    assert_eq!(api_status(&keep_target).await, Some(200));
    // One record no longer matches its server, one server dies meanwhile.
    let path = host.state_file(&mismatched.sid);
    let mut record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    record["start_ticks"] = serde_json::json!(1);
    std::fs::write(&path, record.to_string()).unwrap();
    // The whole sandbox: its outer process alone dying leaves bwrap's
    // inner one and Jupyter running.
    kill_session(&dead.sid);
    eventually("the killed server is gone", Duration::from_secs(10), || {
        processes_of(dead_uid).is_empty()
    })
    .await;

    let (second, _events) = host.supervisor().await;
    let sessions = second.sessions();
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    assert_eq!(
        (sessions[0].sid.as_str(), sessions[0].state),
        (keep.sid.as_str(), AgentSessionState::Running)
    );
    assert_eq!(second.pid_of(&keep.sid), Some(keep_pid));
    assert_eq!(second.link_target(&keep.sid).as_ref(), Some(&keep_target));
    assert_eq!(api_status(&keep_target).await, Some(200));

    assert_eq!(
        processes_of(wrong_uid),
        Vec::<i32>::new(),
        "untrusted server left running"
    );
    assert!(gone(&wrong_target).await);
    host.assert_nothing_left(&mismatched.sid);
    assert!(gone(&dead_target).await);
    host.assert_nothing_left(&dead.sid);

    // Starting the adopted session again is idempotent; stopping it works.
    assert_eq!(
        ready(&second, second.start(keep.clone()).await).1,
        keep_target
    );
    let keep_uid = uid_of(keep_pid);
    second.stop(&keep.sid, Duration::from_secs(5)).await;
    assert!(gone(&keep_target).await);
    assert_eq!(processes_of(keep_uid), Vec::<i32>::new());
    host.assert_nothing_left(&keep.sid);
}

#[tokio::test]
async fn a_server_killed_from_outside_is_reported_as_exited_with_its_log() {
    let host = Host::new(1);
    let (supervisor, mut events) = host.supervisor().await;
    let start = start_command(910_006);
    let (sid, target, _) = ready(&supervisor, supervisor.start(start.clone()).await);
    next_event(&mut events, Duration::from_secs(1)).await;
    let pid = supervisor.pid_of(&sid).unwrap();
    let uid = uid_of(pid);
    // A kernel outlives a server killed this way; the agent must end it.
    start_kernel(&target).await;
    eventually("the kernel starts", Duration::from_secs(30), || {
        runs_a_kernel(uid)
    })
    .await;

    kill("-KILL", &pid.to_string());
    match next_event(&mut events, Duration::from_secs(20)).await {
        AgentEvent::Exited {
            sid: exited,
            exit_code,
            log_tail,
        } => {
            assert_eq!(exited, sid);
            assert_eq!(exit_code, Some(137), "SIGKILL reads as 128 + 9");
            assert!(log_tail.contains("Jupyter Server"), "{log_tail}");
            assert!(log_tail.lines().count() <= 20);
        }
        other => panic!("expected Exited, got {other:?}"),
    }
    assert!(supervisor.sessions().is_empty());
    assert!(gone(&target).await);
    assert_eq!(processes_of(uid), Vec::<i32>::new());
    host.assert_nothing_left(&sid);
}

/// A venv whose `jupyter` is a shell script.
fn fake_venv(base: &Path, script: &str) -> PathBuf {
    let venv = base.join("venv");
    std::fs::create_dir_all(venv.join("bin")).unwrap();
    let jupyter = venv.join("bin/jupyter");
    std::fs::write(&jupyter, format!("#!/bin/sh\n{script}\n")).unwrap();
    std::fs::set_permissions(&jupyter, std::fs::Permissions::from_mode(0o755)).unwrap();
    for dir in [base, &venv, &venv.join("bin")] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    venv
}

#[tokio::test]
async fn a_server_that_exits_early_fails_with_its_exit_code_and_log() {
    let scripts = std::env::temp_dir().join(unique("oc-agent-fake-"));
    let venv = fake_venv(
        &scripts,
        "echo 'ModuleNotFoundError: the venv is broken' >&2\nexit 3",
    );
    let host = Host::with(1, &venv, "");
    let (supervisor, mut events) = host.supervisor().await;
    let start = start_command(910_007);
    match supervisor.start(start.clone()).await {
        AgentEvent::Failed {
            sid,
            reason,
            exit_code,
            log_tail,
        } => {
            assert_eq!(sid, start.sid);
            assert_eq!(exit_code, Some(3));
            assert!(reason.contains("exited with code 3"), "{reason}");
            assert!(log_tail.contains("the venv is broken"), "{log_tail}");
        }
        other => panic!("expected Failed, got {other:?}"),
    }
    assert!(matches!(
        next_event(&mut events, Duration::from_secs(1)).await,
        AgentEvent::Failed { .. }
    ));
    assert!(supervisor.sessions().is_empty());
    host.assert_nothing_left(&start.sid);
    std::fs::remove_dir_all(&scripts).unwrap();
}

#[tokio::test]
async fn a_server_that_never_answers_fails_after_the_start_timeout_and_is_killed() {
    let scripts = std::env::temp_dir().join(unique("oc-agent-fake-"));
    let venv = fake_venv(&scripts, "echo starting\nexec sleep 600");
    let host = Host::with(1, &venv, "start_timeout_seconds = 2");
    let (supervisor, _events) = host.supervisor().await;
    let started = Instant::now();
    let start = start_command(910_008);
    match supervisor.start(start.clone()).await {
        AgentEvent::Failed {
            reason,
            exit_code,
            log_tail,
            ..
        } => {
            assert!(
                reason.contains("did not answer /api/status within 2 s"),
                "{reason}"
            );
            assert_eq!(exit_code, None);
            assert!(log_tail.contains("starting"), "{log_tail}");
        }
        other => panic!("expected Failed, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(15));
    let uid = passwd_uid("oc-p910008").unwrap();
    assert_eq!(
        processes_of(uid),
        Vec::<i32>::new(),
        "the hung server was left running"
    );
    host.assert_nothing_left(&start.sid);
    std::fs::remove_dir_all(&scripts).unwrap();
}

#[test]
fn bad_configs_name_the_key_in_the_library_and_the_binary() {
    let host = Host::new(1);
    let good = std::fs::read_to_string(&host.config_path).unwrap();

    let unknown = format!("colour = \"blue\"\n{good}");
    let err = Config::from_toml(&host.config_path, &unknown, Vec::new())
        .unwrap_err()
        .to_string();
    assert!(err.contains("key `colour`"), "{err}");

    let reversed = format!("port_range = [9400, 9300]\n{good}");
    let err = Config::from_toml(&host.config_path, &reversed, Vec::new())
        .unwrap_err()
        .to_string();
    assert!(err.contains("key `port_range`"), "{err}");

    let short_key = format!("metrics_key = \"too-short\"\n{good}");
    let err = Config::from_toml(&host.config_path, &short_key, Vec::new())
        .unwrap_err()
        .to_string();
    assert!(err.contains("key `metrics_key`"), "{err}");

    let bad_path = host.base.join("bad.toml");
    std::fs::write(&bad_path, &reversed).unwrap();
    let output = Command::new(binary("opencloud-agent"))
        .arg("--config")
        .arg(&bad_path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("bad.toml") && stderr.contains("key `port_range`"),
        "{stderr}"
    );
}

/// The binary, killed (politely) when dropped.
struct AgentProcess(Child);

impl Drop for AgentProcess {
    fn drop(&mut self) {
        kill("-KILL", &self.0.id().to_string());
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn the_binary_waits_for_control_serving_its_health_and_exits_on_sigterm() {
    let metrics_key = "a-metrics-key-of-at-least-32-chars";
    let host = Host::with(
        1,
        &venv(),
        &format!(
            "metrics_listen = \"127.0.0.1:{}\"\nmetrics_key = \"{metrics_key}\"",
            free_port()
        ),
    );
    let metrics = host.config.metrics_listen.unwrap();
    let mut agent = AgentProcess(
        Command::new(binary("opencloud-agent"))
            .arg("--config")
            .arg(&host.config_path)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let health = format!("http://{}/healthz", host.config.link_addr());
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = http.get(&health).send().await {
            assert_eq!(r.status().as_u16(), 200);
            break;
        }
        assert!(agent.0.try_wait().unwrap().is_none(), "the agent exited");
        assert!(Instant::now() < deadline, "no /healthz");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let scrape = format!("http://{metrics}/metrics");
    let r = http.get(&scrape).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401, "a scrape without the metrics key");
    let text = http
        .get(&scrape)
        .bearer_auth(metrics_key)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains("opencloud_agent_sessions"), "{text}");

    // Control is unreachable: the agent keeps trying rather than giving up.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(agent.0.try_wait().unwrap().is_none(), "gave up on control");

    kill("-TERM", &agent.0.id().to_string());
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = agent.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "SIGTERM did not stop the agent");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(agent.0.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(status.success(), "{status}: {stderr}");
    assert!(stderr.contains("cannot register yet"), "{stderr}");
}

#[tokio::test]
async fn stop_all_stops_what_the_work_dir_records_but_not_under_a_running_agent() {
    let host = Host::new(1);
    let (supervisor, _events) = host.supervisor().await;
    let start = start_command(910_009);
    let (sid, target, _) = ready(&supervisor, supervisor.start(start).await);
    let uid = uid_of(supervisor.pid_of(&sid).unwrap());

    let stop_all = || {
        Command::new(binary("opencloud-agent"))
            .arg("--config")
            .arg(&host.config_path)
            .arg("stop-all")
            .output()
            .unwrap()
    };
    let refused = stop_all();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("another agent"), "{stderr}");

    supervisor.detach();
    let output = stop_all();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("stopped 1 Jupyter server"), "{stdout}");
    assert!(gone(&target).await);
    assert_eq!(processes_of(uid), Vec::<i32>::new());
    host.assert_nothing_left(&sid);
}

/// Two agents on one machine (the local stack runs two) share the
/// `opencloud` cgroups: an agent starting up cleans what its own work dir
/// left, never another agent's sessions. Removing another's freshly made
/// cgroup, before its first process joined, failed that session's start.
#[tokio::test]
async fn an_agent_starting_up_leaves_other_agents_session_cgroups_alone() {
    let opencloud_agent::cgroups::Support::Available(cgroups) = opencloud_agent::cgroups::detect()
    else {
        println!("no cgroups here (not root?): nothing to check");
        return;
    };
    let theirs = new_sid();
    let limits = opencloud_agent::cgroups::Limits {
        memory_mib: 256,
        cpu_cores: 0.5,
        pids: 64,
    };
    cgroups.create(&theirs, &limits).unwrap();
    assert!(
        !session_leftovers(&theirs).is_empty(),
        "the cgroup was made"
    );

    let host = Host::new(1);
    let (supervisor, _events) = host.supervisor().await;
    let kept = session_leftovers(&theirs);
    cgroups.remove(&theirs).await;
    assert!(
        kept.iter().any(|l| l.starts_with("cgroup")),
        "a starting agent removed another agent's session cgroup: {kept:?}"
    );
    drop(supervisor);
}

/// A stand-in for control's snapshot routes: serves the latest stored
/// archive and records every upload with its reason.
#[derive(Default)]
struct SnapshotStore {
    /// (reason, bytes) of every stored snapshot, oldest first.
    stored: Vec<(String, Vec<u8>)>,
}

type Store = std::sync::Arc<Mutex<SnapshotStore>>;

async fn stand_in_control(store: Store) -> String {
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::IntoResponse;
    use opencloud_protocol::snapshots::{SHA256_HEADER, SNAPSHOT, VERSION_HEADER};
    use sha2::Digest;

    async fn get_latest(
        axum::extract::State(store): axum::extract::State<Store>,
    ) -> axum::response::Response {
        let store = store.lock().unwrap();
        match store.stored.last() {
            None => StatusCode::NO_CONTENT.into_response(),
            Some((_, bytes)) => (
                [
                    (VERSION_HEADER, store.stored.len().to_string()),
                    (SHA256_HEADER, hex::encode(sha2::Sha256::digest(bytes))),
                ],
                bytes.clone(),
            )
                .into_response(),
        }
    }
    async fn put(
        axum::extract::State(store): axum::extract::State<Store>,
        axum::extract::Query(query): axum::extract::Query<
            std::collections::HashMap<String, String>,
        >,
        headers: HeaderMap,
        body: axum::body::Bytes,
    ) -> axum::response::Response {
        let sha = hex::encode(sha2::Sha256::digest(&body));
        if headers.get(SHA256_HEADER).and_then(|v| v.to_str().ok()) != Some(&sha) {
            return StatusCode::UNPROCESSABLE_ENTITY.into_response();
        }
        let mut store = store.lock().unwrap();
        store.stored.push((
            query.get("reason").cloned().unwrap_or_default(),
            body.to_vec(),
        ));
        axum::Json(serde_json::json!({
            "version": store.stored.len(),
            "size_bytes": body.len(),
        }))
        .into_response()
    }
    let app = axum::Router::new()
        .route(SNAPSHOT, axum::routing::get(get_latest).put(put))
        .with_state(store);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

/// The relative paths of the files in a snapshot.
fn files_in(archive: &[u8]) -> Vec<String> {
    let dir = std::env::temp_dir().join(unique("oc-snapshot-read-"));
    std::fs::create_dir_all(&dir).unwrap();
    opencloud_agent::snapshot::archive::unpack(archive, &dir, None).unwrap();
    let mut files = Vec::new();
    let mut stack = vec![dir.clone()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                files.push(path.strip_prefix(&dir).unwrap().display().to_string());
            }
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
    files.sort();
    files
}

/// A stand-in control's store holding one snapshot (pushed at a stop on
/// another host) of the files `write` puts in an empty directory.
fn stored_snapshot(write: impl FnOnce(&Path)) -> Store {
    let earlier = std::env::temp_dir().join(unique("oc-snapshot-earlier-"));
    std::fs::create_dir_all(&earlier).unwrap();
    write(&earlier);
    let mut archive = Vec::new();
    opencloud_agent::snapshot::archive::pack(&earlier, &mut archive).unwrap();
    std::fs::remove_dir_all(&earlier).unwrap();
    let store = Store::default();
    store.lock().unwrap().stored.push(("stop".into(), archive));
    store
}

#[tokio::test]
async fn a_project_is_restored_before_its_server_starts_and_saved_while_it_runs_and_at_its_stop() {
    // The project's last snapshot, taken on another host.
    let store = stored_snapshot(|earlier| {
        std::fs::create_dir_all(earlier.join("data")).unwrap();
        std::fs::write(earlier.join("analysis.py"), "print('hi')\n").unwrap();
        std::fs::write(earlier.join("data/table.csv"), "a,b\n").unwrap();
        std::fs::set_permissions(
            earlier.join("analysis.py"),
            std::fs::Permissions::from_mode(0o4755),
        )
        .unwrap();
    });
    let control = stand_in_control(store.clone()).await;
    let host = Host::with_control(1, &venv(), "autosave_interval_seconds = 5", &control);
    let (supervisor, _events) = host.supervisor().await;
    let start = start_command(910_050);
    let project = host.work().join("projects/910050");
    // Files on this host from before, not in the snapshot: replaced.
    std::fs::create_dir_all(&project).unwrap();
    std::fs::write(project.join("stale.txt"), "old").unwrap();

    let (sid, _target, spawn_ms) = ready(&supervisor, supervisor.start(start).await);
    println!("spawn to ready with a restore: {spawn_ms} ms");
    assert!(!project.join("stale.txt").exists());
    let restored = std::fs::metadata(project.join("analysis.py")).unwrap();
    let dir = std::fs::metadata(&project).unwrap();
    let uid = passwd_uid("oc-p910050").unwrap();
    assert_eq!((restored.uid(), restored.mode() & 0o7777), (uid, 0o755));
    assert_eq!((dir.uid(), dir.mode() & 0o777), (uid, 0o700));
    assert!(project.join("data/table.csv").exists());

    // Files the session's user writes (root's would be left out).
    let write_as_user = |name: &str, text: &str| {
        std::fs::write(project.join(name), text).unwrap();
        std::os::unix::fs::chown(project.join(name), Some(uid), None).unwrap();
    };
    // A change is autosaved.
    write_as_user("notes.md", "# notes\n");
    eventually("an autosave", Duration::from_secs(20), || {
        store.lock().unwrap().stored.len() == 2
    })
    .await;
    let (reason, bytes) = store.lock().unwrap().stored[1].clone();
    assert_eq!(reason, "autosave");
    assert_eq!(
        files_in(&bytes),
        ["analysis.py", "data/table.csv", "notes.md"]
    );

    // The last state is stored before the stop is reported.
    write_as_user("last.txt", "just before the stop");
    supervisor.stop(&sid, Duration::from_secs(5)).await;
    let (reason, bytes) = store.lock().unwrap().stored.last().cloned().unwrap();
    assert_eq!(reason, "stop");
    assert!(files_in(&bytes).contains(&"last.txt".to_owned()));
    assert_eq!(store.lock().unwrap().stored.len(), 3);
    host.assert_nothing_left(&sid);
}

/// A host with a warm pool of one, its keeper running, and a warm server
/// ready: its pid.
async fn warm_pool_ready(supervisor: &Supervisor) -> i32 {
    supervisor.keep_warm();
    eventually("a warm server is ready", Duration::from_secs(60), || {
        supervisor.warm_servers() == 1
    })
    .await;
    let pids = supervisor.warm_pids();
    assert_eq!(pids.len(), 1, "{pids:?}");
    pids[0]
}

/// The `Ready` of a start bound to a warm server: its spawn time.
fn warm_ready(event: &AgentEvent) -> u64 {
    match event {
        AgentEvent::Ready {
            warm: true,
            spawn_ms,
            ..
        } => *spawn_ms,
        other => panic!("expected a warm Ready, got {other:?}"),
    }
}

/// The names at the top of the server's root, through Jupyter's contents API.
async fn listing(target: &Target) -> Vec<String> {
    let (status, body) = opencloud_e2e::jupyter::request(target, "GET", "/api/contents", None)
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let mut names: Vec<String> = body["content"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn a_warm_server_takes_a_start_with_its_projects_snapshot_and_another_replaces_it() {
    // The project's last snapshot, taken on another host.
    let store = stored_snapshot(|earlier| {
        std::fs::write(earlier.join("analysis.py"), "print('hi')\n").unwrap();
    });
    let control = stand_in_control(store.clone()).await;

    let host = Host::with_control(2, &venv(), "warm_pool = 1", &control);
    let (supervisor, mut events) = host.supervisor().await;
    let warm_pid = warm_pool_ready(&supervisor).await;
    let warm_uid = uid_of(warm_pid);
    let pool_user = opencloud_agent::users::pool_user(&host.work(), 0);
    assert_eq!(
        Some(warm_uid),
        passwd_uid(&pool_user),
        "runs as its pool user"
    );

    let start = start_command(910_060);
    let sid = start.sid.clone();
    let spawn_ms = warm_ready(&supervisor.start(start).await);
    println!("warm bind, start to ready: {spawn_ms} ms");
    assert!(spawn_ms < 2_000, "{spawn_ms} ms is no warm start");
    assert_eq!(
        warm_ready(&next_event(&mut events, Duration::from_secs(1)).await),
        spawn_ms
    );
    let server = supervisor.server_of(&sid).unwrap();
    assert!(server.warm);
    assert_eq!(
        server.pid,
        Some(warm_pid),
        "the warm server took the session"
    );
    assert_ne!(server.server_id, sid);

    // The snapshot's files, through Jupyter on the session's own socket,
    // owned by the server's user (the project's user is another one).
    let target = supervisor.link_target(&sid).unwrap();
    let (status, body) =
        opencloud_e2e::jupyter::request(&target, "GET", "/api/contents/analysis.py", None)
            .await
            .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["content"], "print('hi')\n");
    let file = std::fs::metadata(server.files.join("analysis.py")).unwrap();
    assert_eq!(file.uid(), warm_uid);
    let project_uid = passwd_uid("oc-p910060").unwrap();
    assert_ne!(project_uid, warm_uid);

    // A replacement starts in the background: another process, another user.
    eventually(
        "a new warm server is ready",
        Duration::from_secs(60),
        || supervisor.warm_servers() == 1,
    )
    .await;
    let replacement = supervisor.warm_pids()[0];
    assert_ne!(replacement, warm_pid);
    assert_ne!(
        uid_of(replacement),
        warm_uid,
        "two live servers share a user"
    );

    // What the user writes is in the last snapshot, and back in the
    // project's directory, the project user's again, once the session ends.
    let (status, body) = opencloud_e2e::jupyter::request(
        &target,
        "PUT",
        "/api/contents/notes.md",
        Some(serde_json::json!({"type": "file", "format": "text", "content": "# notes\n"})),
    )
    .await
    .unwrap();
    assert_eq!(status, 201, "{body}");
    supervisor.stop(&sid, Duration::from_secs(5)).await;
    let (reason, bytes) = store.lock().unwrap().stored.last().cloned().unwrap();
    assert_eq!(reason, "stop");
    assert_eq!(files_in(&bytes), ["analysis.py", "notes.md"]);
    let project = host.work().join("projects/910060");
    for name in ["analysis.py", "notes.md"] {
        let meta = std::fs::metadata(project.join(name)).unwrap();
        assert_eq!(meta.uid(), project_uid, "{name}");
    }
    let dir = std::fs::metadata(&project).unwrap();
    assert_eq!((dir.uid(), dir.mode() & 0o777), (project_uid, 0o700));
    assert!(gone(&target).await);
    assert_eq!(processes_of(warm_uid), Vec::<i32>::new());
    host.assert_nothing_left(&server.server_id);
    assert!(!server.files.exists(), "the warm server's root is left");
    let pool_home = host.work().join("homes").join(&pool_user);
    assert!(
        std::fs::read_dir(&pool_home).map_or(true, |mut d| d.next().is_none()),
        "the pool user's home is not empty"
    );
}

#[tokio::test]
async fn a_warm_server_serves_one_project_and_the_next_gets_another_server_without_its_files() {
    // No control: the host's cached copy of the project is what it gets.
    let host = Host::with(2, &venv(), "warm_pool = 1");
    let (supervisor, _events) = host.supervisor().await;
    let first_pid = warm_pool_ready(&supervisor).await;

    let project = host.work().join("projects/910070");
    let owner =
        opencloud_agent::users::ensure_user("oc-p910070", &host.work().join("homes/oc-p910070"))
            .await
            .unwrap();
    std::fs::create_dir_all(&project).unwrap();
    std::fs::write(project.join("cached.txt"), "from the last session here").unwrap();
    std::os::unix::fs::chown(project.join("cached.txt"), Some(owner.uid), None).unwrap();

    let a = start_command(910_070);
    warm_ready(&supervisor.start(a.clone()).await);
    let a_server = supervisor.server_of(&a.sid).unwrap();
    assert_eq!(a_server.pid, Some(first_pid));
    let a_target = supervisor.link_target(&a.sid).unwrap();
    assert_eq!(listing(&a_target).await, ["cached.txt"]);
    supervisor.stop(&a.sid, Duration::from_secs(5)).await;
    let back = std::fs::metadata(project.join("cached.txt")).unwrap();
    assert_eq!(back.uid(), owner.uid, "handed back to the project's user");

    eventually(
        "a warm server is ready again",
        Duration::from_secs(60),
        || supervisor.warm_servers() == 1,
    )
    .await;
    let b = start_command(910_071);
    warm_ready(&supervisor.start(b.clone()).await);
    let b_server = supervisor.server_of(&b.sid).unwrap();
    assert_ne!(
        b_server.server_id, a_server.server_id,
        "a pooled server was reused"
    );
    assert_ne!(b_server.pid, a_server.pid);
    let b_target = supervisor.link_target(&b.sid).unwrap();
    assert_ne!(b_target, a_target);
    assert_eq!(listing(&b_target).await, Vec::<String>::new());
    assert_eq!(
        opencloud_e2e::jupyter::get_status(&b_target, "/api/contents/cached.txt").await,
        Some(404),
        "the other project's file"
    );
    supervisor.stop(&b.sid, Duration::from_secs(5)).await;
    host.assert_nothing_left(&b_server.server_id);
}

#[tokio::test]
async fn starts_at_once_pass_the_gate_in_order_with_at_most_the_limit_starting() {
    let host = Host::with(3, &venv(), "start_concurrency = 1");
    let (supervisor, mut events) = host.supervisor().await;
    let starts: Vec<StartSession> = (0..3).map(|n| start_command(910_080 + n)).collect();

    // The most servers launched and not ready yet, seen at any one time.
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let watcher = {
        let (supervisor, peak) = (supervisor.clone(), peak.clone());
        let sids: Vec<String> = starts.iter().map(|s| s.sid.clone()).collect();
        tokio::spawn(async move {
            loop {
                let starting = supervisor
                    .sessions()
                    .iter()
                    .filter(|s| {
                        s.state == AgentSessionState::Starting
                            && sids.contains(&s.sid)
                            && supervisor.pid_of(&s.sid).is_some()
                    })
                    .count();
                peak.fetch_max(starting, std::sync::atomic::Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    // Polled in this order: each takes its place at the gate on its first poll.
    let outcomes =
        futures_util::future::join_all(starts.iter().map(|s| supervisor.start(s.clone()))).await;
    watcher.abort();
    for outcome in &outcomes {
        assert!(
            matches!(outcome, AgentEvent::Ready { warm: false, .. }),
            "{outcome:?}"
        );
    }
    let mut order = Vec::new();
    for _ in 0..3 {
        match next_event(&mut events, Duration::from_secs(1)).await {
            AgentEvent::Ready { sid, spawn_ms, .. } => {
                println!("{sid} ready after {spawn_ms} ms");
                order.push(sid);
            }
            other => panic!("expected Ready, got {other:?}"),
        }
    }
    let expected: Vec<String> = starts.iter().map(|s| s.sid.clone()).collect();
    assert_eq!(order, expected, "not in start order");
    let peak = peak.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(peak, 1, "servers starting at once with a limit of 1");
    for start in &starts {
        supervisor.stop(&start.sid, Duration::from_secs(5)).await;
    }
}

/// The server id of each warm server the work dir's state files say no
/// start has bound.
fn unbound_warm_servers(host: &Host) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(host.work().join("sessions")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") {
            let record: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            if record["warm"].is_object() && record["warm"]["session"].is_null() {
                found.push(record["sid"].as_str().unwrap().to_owned());
            }
        }
    }
    found
}

#[tokio::test]
async fn a_restarted_agent_adopts_a_bound_warm_server_and_cleans_up_an_unbound_one() {
    let host = Host::with(3, &venv(), "warm_pool = 1");
    let (first, _events) = host.supervisor().await;
    warm_pool_ready(&first).await;
    let start = start_command(910_090);
    warm_ready(&first.start(start.clone()).await);
    let bound = first.server_of(&start.sid).unwrap();
    let target = first.link_target(&start.sid).unwrap();
    std::fs::write(bound.files.join("work.txt"), "unsaved").unwrap();
    eventually(
        "a new warm server is ready",
        Duration::from_secs(60),
        || first.warm_servers() == 1,
    )
    .await;
    let unbound_pid = first.warm_pids()[0];
    let unbound = unbound_warm_servers(&host);
    assert_eq!(unbound.len(), 1, "{unbound:?}");
    first.detach();

    let (second, _events) = host.supervisor().await;
    // The session runs on, on the same server with its files.
    let sessions = second.sessions();
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0].sid, start.sid);
    assert_eq!(second.server_of(&start.sid), Some(bound.clone()));
    assert_eq!(second.link_target(&start.sid), Some(target.clone()));
    assert_eq!(api_status(&target).await, Some(200));
    // The unbound one is gone, with everything it had.
    assert!(
        !proc_info(unbound_pid).is_some_and(|p| p.is_alive()),
        "the unbound warm server was adopted"
    );
    assert_eq!(second.warm_servers(), 0);
    host.assert_nothing_left(&unbound[0]);
    assert!(!host.work().join("pool").join(&unbound[0]).exists());

    // Ending the adopted session hands its files back to the project.
    second.stop(&start.sid, Duration::from_secs(5)).await;
    assert!(host.work().join("projects/910090/work.txt").exists());
    host.assert_nothing_left(&bound.server_id);
}

#[tokio::test]
async fn a_start_while_the_warm_server_is_still_starting_waits_for_it_rather_than_starting_cold() {
    let host = Host::with(2, &venv(), "warm_pool = 1");
    let (supervisor, _events) = host.supervisor().await;
    supervisor.keep_warm();
    // Launched, not ready yet.
    eventually("a warm server launched", Duration::from_secs(30), || {
        supervisor.warm_pids().len() == 1
    })
    .await;
    let warm_pid = supervisor.warm_pids()[0];
    let ready_before = supervisor.warm_servers();
    let start = start_command(910_100);
    let spawn_ms = warm_ready(&supervisor.start(start.clone()).await);
    println!(
        "start → bound to the warm server (ready at the start: {ready_before}): {spawn_ms} ms"
    );
    let server = supervisor.server_of(&start.sid).unwrap();
    assert_eq!(server.pid, Some(warm_pid), "a second server was started");
    assert_eq!(supervisor.sessions().len(), 1);
    supervisor.stop(&start.sid, Duration::from_secs(5)).await;
    host.assert_nothing_left(&server.server_id);
}

#[tokio::test]
async fn a_warm_bound_server_killed_from_outside_is_reported_exited_and_its_files_go_back() {
    let host = Host::with(2, &venv(), "warm_pool = 1");
    let (supervisor, mut events) = host.supervisor().await;
    warm_pool_ready(&supervisor).await;
    let start = start_command(910_110);
    warm_ready(&supervisor.start(start.clone()).await);
    next_event(&mut events, Duration::from_secs(1)).await;
    let server = supervisor.server_of(&start.sid).unwrap();
    std::fs::write(server.files.join("result.csv"), "1,2\n").unwrap();

    kill_session(&server.server_id);
    match next_event(&mut events, Duration::from_secs(20)).await {
        AgentEvent::Exited { sid, .. } => assert_eq!(sid, start.sid),
        other => panic!("expected Exited, got {other:?}"),
    }
    assert!(supervisor.sessions().is_empty());
    assert!(host.work().join("projects/910110/result.csv").exists());
    host.assert_nothing_left(&server.server_id);
}
