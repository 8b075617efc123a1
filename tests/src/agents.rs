//! Real `opencloud-agent` processes for end-to-end tests: a config on free
//! ports, a work dir of its own, and a way to kill it (and its Jupyter
//! servers) the hard way, as a dying host would.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use opencloud_agent::process::{cgroups_of, snapshot, within};

use crate::jupyter::venv;
use crate::machine::{binary, signal_group, unique};

pub fn port_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// The text of an agent config for `control_url` with `host_key`. No warm
/// pool: tests keep their meaning and a small machine is not loaded with
/// idle servers; [`with_warm_pool`] asks for one.
pub fn config_text(control_url: &str, host_key: &str, max_sessions: u32, work_dir: &str) -> String {
    let link_port = crate::machine::free_port();
    let metrics_port = crate::machine::free_port();
    format!(
        "control_url = \"{control_url}\"\nhost_key = \"{host_key}\"\naddress = \"127.0.0.1\"\n\
         link_port = {link_port}\nmetrics_listen = \"127.0.0.1:{metrics_port}\"\nwork_dir = \"{work_dir}\"\n\
         venv = \"{venv}\"\nstop_grace_seconds = 5\nwarm_pool = 0\n\
         # Autosave often, so the tests see it within seconds.\nautosave_interval_seconds = 5\n\n[capacity]\nmax_sessions = {max_sessions}\n\
         cpu_cores = 2.0\nmemory_mib = 2048\n",
        venv = venv().display(),
    )
}

/// `text` (from [`config_text`]) with `warm_pool` warm servers.
pub fn with_warm_pool(text: &str, warm_pool: u32) -> String {
    assert!(text.contains("\nwarm_pool = 0\n"), "{text}");
    text.replacen(
        "\nwarm_pool = 0\n",
        &format!("\nwarm_pool = {warm_pool}\n"),
        1,
    )
}

pub struct AgentProcess {
    child: Option<Child>,
    pub dir: PathBuf,
    pub config_path: PathBuf,
}

impl AgentProcess {
    /// Writes a config and starts the agent (it registers by itself).
    pub fn start(control_url: &str, host_key: &str, max_sessions: u32) -> anyhow::Result<Self> {
        Self::start_with_warm_pool(control_url, host_key, max_sessions, 0)
    }

    /// [`AgentProcess::start`] with `warm_pool` warm servers.
    pub fn start_with_warm_pool(
        control_url: &str,
        host_key: &str,
        max_sessions: u32,
        warm_pool: u32,
    ) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(unique("oc-e2e-agent-"));
        std::fs::create_dir_all(&dir)?;
        let config_path = dir.join("agent.toml");
        let text = config_text(control_url, host_key, max_sessions, "work");
        std::fs::write(&config_path, with_warm_pool(&text, warm_pool))?;
        let mut agent = Self {
            child: None,
            dir,
            config_path,
        };
        agent.spawn()?;
        Ok(agent)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::File::create(self.dir.join("agent.log"))?;
        let child = Command::new(binary("opencloud-agent"))
            .arg("--config")
            .arg(&self.config_path)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("spawn opencloud-agent")?;
        self.child = Some(child);
        Ok(())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// Where the agent's host link listens (its config's `link_port`).
    pub fn link_addr(&self) -> std::net::SocketAddr {
        opencloud_agent::Config::load(&self.config_path)
            .expect("the agent's config")
            .link_addr()
    }

    /// Where the agent serves `/metrics` (its config's `metrics_listen`).
    pub fn metrics_addr(&self) -> std::net::SocketAddr {
        opencloud_agent::Config::load(&self.config_path)
            .expect("the agent's config")
            .metrics_listen
            .expect("the harness gives every agent a metrics listener")
    }

    /// The agent's Prometheus scrape (its config's `metrics_listen`, no key).
    pub async fn metrics(&self) -> String {
        crate::machine::metrics(&format!("http://{}", self.metrics_addr()), None).await
    }

    /// The host link's private key (made at the agent's first start), from
    /// now on searched for in every answer the gateway sends to a client.
    pub fn link_key(&self) -> String {
        let layout = opencloud_agent::workdir::Layout {
            work_dir: self.dir.join("work"),
        };
        let key = std::fs::read_to_string(layout.link_key()).expect("the agent's link key");
        crate::wiretap::forbid(format!("the link key in {}", self.dir.display()), &key);
        key
    }

    /// Waits for the agent to exit by itself; its status code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return status.code();
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The pid of session `sid`'s Jupyter server (or of the warm server
    /// with that id), from the agent's state files: a cold start's is named
    /// by its sid, a warm server's by its own id and names the session it
    /// was bound to.
    pub fn session_pid(&self, sid: &str) -> Option<i32> {
        let read = |path: &Path| -> Option<serde_json::Value> {
            serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
        };
        let sessions = self.dir.join("work/sessions");
        let state = read(&sessions.join(format!("{sid}.json"))).or_else(|| {
            std::fs::read_dir(&sessions)
                .ok()?
                .flatten()
                .filter_map(|entry| read(&entry.path()))
                .find(|state| state["warm"]["session"] == sid)
        })?;
        state["pid"].as_i64().map(|p| p as i32)
    }

    /// SIGKILL to the agent and to every Jupyter server it recorded, sandbox
    /// and all: the host is gone, with no chance to say so.
    pub fn kill_hard(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let sessions = self.dir.join("work/sessions");
        for entry in std::fs::read_dir(sessions).into_iter().flatten().flatten() {
            let sid = entry.file_name().to_string_lossy().replace(".json", "");
            if let Some(pid) = self.session_pid(&sid) {
                signal_group(pid as u32, "KILL");
                kill_session(&sid);
            }
        }
    }
}

/// SIGKILL to every process in session `sid`'s cgroup (the sandbox's outer
/// process, bwrap inside it, Jupyter and its kernels), as a crash would.
pub fn kill_session(sid: &str) {
    let cgroup = opencloud_agent::cgroups::session_path(sid);
    for process in snapshot() {
        if process.is_alive() && within(&cgroups_of(process.pid), &cgroup) {
            let _ = Command::new("kill")
                .args(["-KILL", &process.pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// What is left of session `sid` on this machine outside its work dir: its
/// network namespace, its slirp4netns, its cgroups, processes in them.
/// Empty once the session is really gone.
pub fn session_leftovers(sid: &str) -> Vec<String> {
    let mut left = Vec::new();
    let netns = Path::new("/run/netns").join(format!("oc-{sid}"));
    if netns.exists() {
        left.push(format!("network namespace {}", netns.display()));
    }
    let cgroup = opencloud_agent::cgroups::session_path(sid);
    for process in snapshot().into_iter().filter(|p| p.is_alive()) {
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", process.pid)).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.starts_with("slirp4netns") && cmdline.contains(&format!("oc-{sid}")) {
            left.push(format!("slirp4netns {}", process.pid));
        } else if within(&cgroups_of(process.pid), &cgroup) {
            left.push(format!(
                "process {} in the session's cgroup: {cmdline}",
                process.pid
            ));
        }
    }
    // v2 at the root, v1 one directory per controller.
    let roots = std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .chain([PathBuf::from("/sys/fs/cgroup")]);
    for root in roots {
        let dir = root.join(cgroup.trim_start_matches('/'));
        if dir.is_dir() {
            left.push(format!("cgroup {}", dir.display()));
        }
    }
    left
}

/// Runs `opencloud-agent stop-all` on `config_path`: whatever sessions its
/// work dir records are stopped, and what is left of dead ones cleaned up
/// (slirp4netns, network namespace, cgroups). Test hosts call it when
/// dropped, so a failed test leaves nothing running.
pub fn stop_all(config_path: &Path) {
    let _ = Command::new(binary("opencloud-agent"))
        .arg("--config")
        .arg(config_path)
        .arg("stop-all")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Whatever Jupyter servers are left go with the test: those the
        // agent knows of, then anything still running from its work dir
        // (a server whose start the agent had not recorded yet).
        stop_all(&self.config_path);
        let _ = Command::new("pkill")
            .arg("-KILL")
            .arg("-f")
            .arg(self.dir.as_os_str())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Polls `check` every 100 ms until it returns `Some`, or panics after
/// `limit` naming `what`. Returns the value and how long it took.
pub async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> (T, Duration)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(value) = check().await {
            return (value, started.elapsed());
        }
        assert!(
            started.elapsed() < limit,
            "{what} did not happen within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
