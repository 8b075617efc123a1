//! A real `jupyter server` from the project's venv, run as an unprivileged
//! user (Jupyter refuses root, and notebooks must never run as root), with
//! the settings every OpenCloud session uses.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::machine::{free_port, signal_group, unique, wait_until_ready};

/// The venv `scripts/test` builds from the system Python.
pub fn venv() -> PathBuf {
    std::env::var_os("OPENCLOUD_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/opencloud/venv"))
}

const NOBODY: u32 = 65534;

pub struct JupyterServer {
    child: Child,
    pub port: u16,
    pub token: String,
    pub root: PathBuf,
}

impl JupyterServer {
    pub async fn start() -> anyhow::Result<Self> {
        let jupyter = venv().join("bin/jupyter");
        if !jupyter.exists() {
            bail!(
                "{} is missing: scripts/test builds the venv",
                jupyter.display()
            );
        }
        let base = std::env::temp_dir().join(unique("oc-jupyter-"));
        let root = base.join("project");
        let home = base.join("home");
        for dir in [&base, &root, &home] {
            std::fs::create_dir_all(dir)?;
            std::os::unix::fs::chown(dir, Some(NOBODY), Some(NOBODY))?;
        }
        let port = free_port();
        let token = crate::machine::unique("tok").replace('x', "");
        let config = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../config/jupyter_server_config.py"
        );
        let log = std::fs::File::create(base.join("jupyter.log"))?;
        std::os::unix::fs::chown(base.join("jupyter.log"), Some(NOBODY), Some(NOBODY))?;
        let child = Command::new(&jupyter)
            .args([
                "server",
                "--no-browser",
                "--ServerApp.ip=127.0.0.1",
                &format!("--ServerApp.port={port}"),
                &format!("--ServerApp.root_dir={}", root.display()),
                "--ServerApp.base_url=/",
                &format!("--config={config}"),
            ])
            .env_clear()
            .env(
                "PATH",
                format!("{}:/usr/bin:/bin", venv().join("bin").display()),
            )
            .env("HOME", &home)
            .env("JUPYTER_TOKEN", &token)
            .current_dir(&root)
            .uid(NOBODY)
            .gid(NOBODY)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start jupyter server")?;
        let mut server = Self {
            child,
            port,
            token,
            root,
        };
        server.wait_ready(&base).await?;
        Ok(server)
    }

    async fn wait_ready(&mut self, base: &std::path::Path) -> anyhow::Result<()> {
        let client = reqwest::Client::new();
        let status = format!("http://127.0.0.1:{}/api/status", self.port);
        let authorization = format!("token {}", self.token);
        wait_until_ready(
            &mut self.child,
            "jupyter",
            &base.join("jupyter.log"),
            Duration::from_secs(60),
            Duration::from_millis(100),
            || async {
                client
                    .get(&status)
                    .header("authorization", &authorization)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success())
            },
        )
        .await
    }
}

impl Drop for JupyterServer {
    fn drop(&mut self) {
        // The whole group: the server and the kernels it started.
        let group = self.child.id();
        signal_group(group, "TERM");
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        signal_group(group, "KILL");
        let _ = self.child.wait();
    }
}
