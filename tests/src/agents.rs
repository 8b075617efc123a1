//! Real `opencloud-agent` processes for end-to-end tests: a config on free
//! ports, a work dir of its own, and a way to kill it (and its Jupyter
//! servers) the hard way, as a dying host would.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::jupyter::venv;
use crate::machine::{binary, signal_group, unique};

pub fn port_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// The text of an agent config for `control_url` with `host_key`.
pub fn config_text(control_url: &str, host_key: &str, max_sessions: u32, work_dir: &str) -> String {
    let link_port = crate::machine::free_port();
    format!(
        "control_url = \"{control_url}\"\nhost_key = \"{host_key}\"\naddress = \"127.0.0.1\"\n\
         link_port = {link_port}\nwork_dir = \"{work_dir}\"\n\
         venv = \"{venv}\"\nstop_grace_seconds = 5\n\n[capacity]\nmax_sessions = {max_sessions}\n\
         cpu_cores = 2.0\nmemory_mib = 2048\n",
        venv = venv().display(),
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
        let dir = std::env::temp_dir().join(unique("oc-e2e-agent-"));
        std::fs::create_dir_all(&dir)?;
        let config_path = dir.join("agent.toml");
        std::fs::write(
            &config_path,
            config_text(control_url, host_key, max_sessions, "work"),
        )?;
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

    /// The pid of session `sid`'s Jupyter server, from the agent's state file.
    pub fn session_pid(&self, sid: &str) -> Option<i32> {
        let path = self.dir.join("work/sessions").join(format!("{sid}.json"));
        let state: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
        state["pid"].as_i64().map(|p| p as i32)
    }

    /// SIGKILL to the agent and to every Jupyter server it recorded: the
    /// host is gone, with no chance to say so.
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
            }
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Whatever Jupyter servers are left go with the test.
        let _ = Command::new(binary("opencloud-agent"))
            .arg("--config")
            .arg(&self.config_path)
            .arg("stop-all")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
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
