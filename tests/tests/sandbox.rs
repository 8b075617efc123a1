#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test
//! Each session in its sandbox, attacked from inside: a real agent
//! supervisor (as root), real Jupyter servers and real kernels, reached on
//! their Unix sockets as the agent reaches them. From A's kernel, B's
//! processes, files and `/tmp` are invisible, the host's services, LAN and
//! metadata addresses are unreachable for both egress settings, kernels
//! listen on no TCP port, and everything but A's own directories is
//! read-only. A kernel that outgrows its memory is killed alone.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use opencloud_agent::{Config, Supervisor};
use opencloud_e2e::agents::{config_text, session_leftovers, stop_all, with_warm_pool};
use opencloud_e2e::kernel::{execute_on_socket, start_on_socket};
use opencloud_e2e::sandbox::unix_request;
use opencloud_e2e::{free_port, unique};
use opencloud_protocol::agent::{AgentEvent, StartSession};
use opencloud_protocol::routes::new_sid;
use serde_json::Value;
use tokio::sync::mpsc::UnboundedReceiver;

struct Host {
    base: PathBuf,
    config_path: PathBuf,
    config: Config,
    supervisor: Supervisor,
    events: UnboundedReceiver<AgentEvent>,
}

impl Host {
    async fn open(extra: &str) -> Self {
        Self::open_with(extra, 0).await
    }

    /// [`Host::open`] with `warm_pool` warm servers (kept once [`Host::warm_up`] is called).
    async fn open_with(extra: &str, warm_pool: u32) -> Self {
        let base = std::env::temp_dir().join(unique("oc-sbx-"));
        std::fs::create_dir_all(&base).unwrap();
        let path = base.join("agent.toml");
        // Nothing listens on control's port: these tests never need control.
        let control = format!("http://127.0.0.1:{}", free_port());
        // `extra` lines belong before the [capacity] table.
        let text = config_text(&control, "test-host-key", 4, "w");
        let text = with_warm_pool(&text, warm_pool).replacen(
            "[capacity]",
            &format!("{extra}\n[capacity]"),
            1,
        );
        std::fs::write(&path, &text).unwrap();
        let config = Config::from_toml(&path, &text, Vec::new()).unwrap();
        let (supervisor, events) = Supervisor::open(config.clone()).await.unwrap();
        Self {
            base,
            config_path: path,
            config,
            supervisor,
            events,
        }
    }

    /// Starts a session of `project_id` with `memory_mib`.
    async fn start(&self, project_id: u64, memory_mib: u64) -> Session {
        let command = StartSession {
            sid: new_sid(),
            project_id,
            memory_limit_mib: memory_mib,
            cpu_limit_cores: 1.0,
        };
        let started = Instant::now();
        let event = self.supervisor.start(command.clone()).await;
        let warm = matches!(event, AgentEvent::Ready { warm: true, .. });
        assert!(
            matches!(event, AgentEvent::Ready { .. }),
            "{event:?}\n{}",
            std::fs::read_to_string(self.work().join(format!("logs/{}.log", command.sid)))
                .unwrap_or_default()
        );
        println!(
            "session of project {project_id} ready in {} ms (warm: {warm})",
            started.elapsed().as_millis()
        );
        let server = self.supervisor.server_of(&command.sid).unwrap();
        Session {
            socket: self
                .work()
                .join("sessions")
                .join(&server.server_id)
                .join("jupyter.sock"),
            sid: command.sid,
            server_id: server.server_id,
            project_dir: server.files,
            warm,
        }
    }

    /// Keeps a warm pool and waits for its server to be ready.
    async fn warm_up(&self) {
        self.supervisor.keep_warm();
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.supervisor.warm_servers() == 0 {
            assert!(Instant::now() < deadline, "no warm server within 60 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn work(&self) -> PathBuf {
        self.config.work_dir.clone()
    }

    /// Stops `session` and checks nothing of it is left on the machine.
    async fn stop(&self, session: &Session) {
        self.supervisor
            .stop(&session.sid, Duration::from_secs(5))
            .await;
        let id = &session.server_id;
        assert!(!self.work().join("sessions").join(id).exists());
        assert!(!self.work().join("pool").join(id).exists());
        assert_eq!(session_leftovers(id), Vec::<String>::new());
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        // A failed test leaves nothing running either: the lock released,
        // stop-all takes the work dir over.
        self.supervisor.clone().detach();
        stop_all(&self.config_path);
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

struct Session {
    sid: String,
    /// What its socket directory, cgroup and network namespace are named by.
    server_id: String,
    socket: PathBuf,
    /// Where its project's files are while it runs.
    project_dir: PathBuf,
    /// Bound to a warm server.
    warm: bool,
}

impl Session {
    async fn kernel(&self) -> String {
        start_on_socket(&self.socket).await.unwrap()
    }

    async fn run(&self, kernel: &str, code: &str) -> String {
        execute_on_socket(&self.socket, kernel, code).await.unwrap()
    }
}

/// The host's own IPv4 addresses besides loopback.
fn host_addresses() -> Vec<String> {
    let out = std::process::Command::new("ip")
        .args(["-o", "-4", "addr", "show"])
        .output()
        .unwrap();
    opencloud_agent::sandbox::parse_addresses(&String::from_utf8_lossy(&out.stdout))
        .into_iter()
        .filter(|a| !a.starts_with("127."))
        .collect()
}

/// Python that tries to reach each `host:port` and prints what happened.
fn reach_code(targets: &[(String, u16)]) -> String {
    let list: Vec<String> = targets
        .iter()
        .map(|(h, p)| format!("({h:?}, {p})"))
        .collect();
    format!(
        r#"
import socket, json
def reach(host, port):
    s = socket.socket(); s.settimeout(3)
    try:
        s.connect((host, port)); return "connected"
    except Exception as e:
        return type(e).__name__ + ": " + str(e)
    finally:
        s.close()
print(json.dumps({{f"{{h}}:{{p}}": reach(h, p) for h, p in [{}]}}))
"#,
        list.join(", ")
    )
}

/// What must be out of reach from any session: the host's services on its
/// loopback and its own addresses, the LAN and the metadata address.
fn forbidden_targets(host: &Host) -> Vec<(String, u16)> {
    let link = host.config.link_port;
    let mut targets = vec![
        ("127.0.0.1".to_owned(), 3306),
        ("127.0.0.1".to_owned(), link),
        ("10.0.0.1".to_owned(), 80),
        ("169.254.169.254".to_owned(), 80),
        ("192.168.1.1".to_owned(), 80),
        ("172.16.0.1".to_owned(), 80),
    ];
    for address in host_addresses() {
        targets.push((address.clone(), 3306));
        targets.push((address, 2024));
    }
    targets
}

fn assert_unreachable(report: &str) {
    let results: Value = serde_json::from_str(report).unwrap();
    println!("reachability from the sandbox: {results}");
    for (target, result) in results.as_object().unwrap() {
        assert_ne!(result, "connected", "{target} was reachable");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kernel_sees_nothing_of_other_sessions_or_the_host() {
    let host = Host::open("").await;
    let a = host.start(930_001, 1024).await;
    let b = host.start(930_002, 1024).await;
    walls_hold(&host, &a, &b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kernel_of_a_session_bound_to_a_warm_server_sees_nothing_of_other_sessions_or_the_host() {
    let host = Host::open_with("", 1).await;
    host.warm_up().await;
    let a = host.start(930_011, 1024).await;
    assert!(a.warm, "the start did not take the warm server");
    // The replacement warm server starts meanwhile: it is a live server too.
    let b = host.start(930_012, 1024).await;
    walls_hold(&host, &a, &b).await;
}

/// From inside `a`'s kernel: nothing of `b`, of the host or of the agent's
/// work dir beyond `a`'s own is visible or writable; `a` runs under a uid
/// no other live server has; both stop without leftovers.
async fn walls_hold(host: &Host, a: &Session, b: &Session) {
    let uid_of = |pid: i32| opencloud_agent::process::proc_info(pid).unwrap().uid;
    let a_uid = uid_of(host.supervisor.pid_of(&a.sid).unwrap());
    let others: Vec<i32> = [host.supervisor.pid_of(&b.sid).unwrap()]
        .into_iter()
        .chain(host.supervisor.warm_pids())
        .collect();
    for pid in others {
        assert_ne!(uid_of(pid), a_uid, "another live server runs as A's user");
    }
    assert_ne!(a_uid, 0);
    let b_kernel = b.kernel().await;
    b.run(
        &b_kernel,
        "open('/tmp/b-secret', 'w').write('x'); open('b-file', 'w').write('x'); print('ok')",
    )
    .await;

    let a_kernel = a.kernel().await;
    let probe = format!(
        r#"
import os, json
pids = [p for p in os.listdir('/proc') if p.isdigit()]
cmdlines = []
for p in pids:
    try: cmdlines.append(open(f'/proc/{{p}}/cmdline', 'rb').read().decode(errors='replace'))
    except OSError: pass
def listening(path):
    try: return [l for l in open(path).read().splitlines()[1:] if l.split()[3] == '0A']
    except OSError: return []
def write(path):
    try:
        open(path, 'w').write('x'); return 'written'
    except Exception as e:
        return type(e).__name__
def owners():
    found = []
    for p in pids:
        try:
            for f in os.listdir(f'/proc/{{p}}/fd'):
                link = os.readlink(f'/proc/{{p}}/fd/{{f}}')
                if link.startswith('socket:'):
                    found.append((p, open(f'/proc/{{p}}/cmdline').read()[:50], link))
        except OSError:
            pass
    return found
def look(path):
    try: return sorted(os.listdir(path))
    except Exception as e: return type(e).__name__
print(json.dumps({{
    'pids': len(pids),
    'cmdlines': cmdlines,
    'b_tmp': os.path.exists('/tmp/b-secret'),
    'b_file': os.path.exists({b_file:?}),
    'b_socket': os.path.exists({b_socket:?}),
    'listening': listening('/proc/net/tcp') + listening('/proc/net/tcp6'),
    'owners': owners(),
    'work': look({work:?}),
    'sessions': look({sessions:?}),
    'writes': {{p: write(p) for p in [{outside}]}},
    'own': {{p: write(p) for p in ['/tmp/a', {own_project:?}, os.path.expanduser('~/a')]}},
}}))
"#,
        b_file = b.project_dir.join("b-file").display().to_string(),
        b_socket = b.socket.display().to_string(),
        work = host.work().display().to_string(),
        sessions = host.work().join("sessions").display().to_string(),
        own_project = a.project_dir.join("a").display().to_string(),
        outside = [
            "/etc/oc-probe".to_owned(),
            "/usr/oc-probe".to_owned(),
            "/var/tmp/oc-probe".to_owned(),
            b.project_dir.join("oc-probe").display().to_string(),
        ]
        .iter()
        .map(|p| format!("{p:?}"))
        .collect::<Vec<_>>()
        .join(", "),
    );
    let report: Value = serde_json::from_str(&a.run(&a_kernel, &probe).await).unwrap();
    println!("A's view: {report}");

    // Processes: only A's own sandbox, none of B's command lines.
    let pids = report["pids"].as_u64().unwrap();
    assert!(pids < 10, "A sees {pids} processes");
    for cmdline in report["cmdlines"].as_array().unwrap() {
        let cmdline = cmdline.as_str().unwrap();
        assert!(
            !cmdline.contains(&b.sid) && !cmdline.contains(&b.server_id),
            "B's process visible: {cmdline}"
        );
    }
    let outer_b = host.supervisor.pid_of(&b.sid).unwrap();
    assert!(outer_b > 0);
    // Files, sockets and /tmp.
    assert_eq!(report["b_tmp"], false, "B's /tmp is visible");
    assert_eq!(report["b_file"], false, "B's project is visible");
    assert_eq!(report["b_socket"], false, "B's socket is visible");
    // The agent's work dir shows only what A's sandbox binds back.
    let work: Vec<&str> = report["work"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(!work.contains(&"logs"), "{work:?}");
    for name in &work {
        assert!(
            [
                "homes",
                "jupyter",
                "jupyter_server_config.py",
                "pool",
                "projects",
                "sessions"
            ]
            .contains(name),
            "{name} of the work dir is visible"
        );
    }
    assert_eq!(
        report["sessions"],
        serde_json::json!([a.server_id.clone()]),
        "other sessions' directories or state are visible"
    );
    // Kernels over IPC: the server listens on no TCP port. ipykernel keeps
    // one pipe for its subprocesses' output on the loopback, which here is
    // the sandbox's own (no other session or the host shares it).
    let listening = report["listening"].as_array().unwrap();
    assert!(listening.len() <= 1, "{listening:?}");
    for line in listening {
        assert!(
            line.as_str()
                .unwrap()
                .trim_start()
                .starts_with("0: 0100007F:"),
            "{line}"
        );
    }
    // Read-only everywhere but A's own places.
    for (path, result) in report["writes"].as_object().unwrap() {
        assert_ne!(result, "written", "A could write {path}");
    }
    for (path, result) in report["own"].as_object().unwrap() {
        assert_eq!(result, "written", "A could not write its own {path}");
    }
    // Writing into the hidden work dir lands in the sandbox's own tmpfs.
    a.run(
        &a_kernel,
        &format!(
            "open({:?}, 'w').write('x')",
            host.work().join("oc-probe").display().to_string()
        ),
    )
    .await;
    assert!(!host.work().join("oc-probe").exists());

    // The network: nothing of the host, its LAN or the metadata service.
    let report = a
        .run(&a_kernel, &reach_code(&forbidden_targets(host)))
        .await;
    assert_unreachable(&report);

    host.stop(a).await;
    host.stop(b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_egress_nothing_is_reachable_either() {
    let host = Host::open("egress = \"none\"").await;
    assert_eq!(host.config.egress, opencloud_agent::sandbox::Egress::None);
    let a = host.start(930_003, 1024).await;
    let kernel = a.kernel().await;
    let mut targets = forbidden_targets(&host);
    targets.push(("1.1.1.1".to_owned(), 53));
    let report = a.run(&kernel, &reach_code(&targets)).await;
    assert_unreachable(&report);
    host.stop(&a).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kernel_over_its_memory_is_killed_alone() {
    let mut host = Host::open("").await;
    let a = host.start(930_004, 256).await;
    let b = host.start(930_005, 256).await;
    memory_limit_holds(&mut host, &a, &b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_bound_session_gets_its_memory_limit_and_its_kernel_over_it_is_killed_alone() {
    let mut host = Host::open_with("", 1).await;
    host.warm_up().await;
    let a = host.start(930_014, 256).await;
    assert!(a.warm, "the start did not take the warm server");
    let b = host.start(930_015, 256).await;
    memory_limit_holds(&mut host, &a, &b).await;
}

/// A's kernel allocating twice A's 256 MiB is killed, A is told so, and
/// A's server and B run on.
async fn memory_limit_holds(host: &mut Host, a: &Session, b: &Session) {
    let a_kernel = a.kernel().await;
    assert_eq!(a.run(&a_kernel, "print(6 * 7)").await, "42");

    // Twice the session's memory; the kernel never answers.
    let hog = execute_on_socket(
        &a.socket,
        &a_kernel,
        "x = bytearray(512 * 1024 * 1024); print(len(x))",
    );
    let outcome = tokio::time::timeout(Duration::from_secs(20), hog).await;
    assert!(
        !matches!(&outcome, Ok(Ok(text)) if text == "536870912"),
        "the allocation succeeded: {outcome:?}"
    );

    let started = Instant::now();
    let reason = loop {
        let event = tokio::time::timeout(Duration::from_secs(15), host.events.recv())
            .await
            .expect("no OOM notice within 15 s")
            .unwrap();
        if let AgentEvent::KernelKilled { sid, reason } = event {
            assert_eq!(sid, a.sid);
            break reason;
        }
    };
    println!(
        "OOM notice after {} ms: {reason}",
        started.elapsed().as_millis()
    );
    assert_eq!(
        reason,
        "A kernel was stopped because it used more than its 256 MiB memory limit."
    );
    // A's server survived and still answers; B runs code as before.
    let (status, _) = unix_request(&a.socket, "GET", "/api/status", None)
        .await
        .unwrap();
    assert_eq!(status, 200);
    let b_kernel = b.kernel().await;
    assert_eq!(b.run(&b_kernel, "print(6 * 7)").await, "42");
    host.stop(a).await;
    host.stop(b).await;
}
