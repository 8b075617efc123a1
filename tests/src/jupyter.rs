//! A real `jupyter server` from the project's venv, run as an unprivileged
//! user (Jupyter refuses root, and notebooks must never run as root), with
//! the settings every OpenCloud session uses.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use futures_util::FutureExt;
use opencloud_agent::host_link::Target;

use crate::machine::{signal_group, unique, wait_until_ready};

/// The venv `scripts/test` builds from the system Python.
pub fn venv() -> PathBuf {
    std::env::var_os("OPENCLOUD_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/opencloud/venv"))
}

const NOBODY: u32 = 65534;

pub struct JupyterServer {
    child: Child,
    /// The server's private socket (mode 0600, owned by `nobody`).
    pub socket: PathBuf,
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
        let run = base.join("run");
        for dir in [&base, &root, &home, &run] {
            std::fs::create_dir_all(dir)?;
            std::os::unix::fs::chown(dir, Some(NOBODY), Some(NOBODY))?;
        }
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o700))?;
        let socket = run.join("jupyter.sock");
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
                &format!("--ServerApp.sock={}", socket.display()),
                "--ServerApp.sock_mode=0600",
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
            socket,
            root,
        };
        server.wait_ready(&base).await?;
        Ok(server)
    }

    /// Where a host link forwards this server's sessions.
    pub fn target(&self) -> Target {
        Target::Unix(self.socket.clone())
    }

    async fn wait_ready(&mut self, base: &std::path::Path) -> anyhow::Result<()> {
        let target = self.target();
        wait_until_ready(
            &mut self.child,
            "jupyter",
            &base.join("jupyter.log"),
            Duration::from_secs(60),
            Duration::from_millis(100),
            || get_status(&target, "/api/status").map(|s| s == Some(200)),
        )
        .await
    }
}

/// `GET path` on the server at `target`, as the host link would reach
/// it: the status code, if it answers.
pub async fn get_status(target: &Target, path: &str) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let request = format!("GET {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n");
    let mut head = [0u8; 12];
    match target {
        Target::Unix(path) => {
            let mut stream = tokio::net::UnixStream::connect(path).await.ok()?;
            stream.write_all(request.as_bytes()).await.ok()?;
            stream.read_exact(&mut head).await.ok()?;
        }
        Target::Tcp(addr) => {
            let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
            stream.write_all(request.as_bytes()).await.ok()?;
            stream.read_exact(&mut head).await.ok()?;
        }
    }
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// Jupyter's XSRF double-submit pair: the same value as cookie and header,
/// as Lab sends it (Jupyter's own checks stay on behind the gateway).
pub const XSRF: &str = "oc-test-xsrf";

/// `POST path` with a JSON body on the server at `target` (with the XSRF
/// pair): the status code and the body.
pub async fn post_json(
    target: &Target,
    path: &str,
    body: &serde_json::Value,
) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = body.to_string();
    let request = format!(
        "POST {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\
         cookie: _xsrf={XSRF}\r\nx-xsrftoken: {XSRF}\r\n\r\n{body}",
        body.len()
    );
    let mut answer = Vec::new();
    match target {
        Target::Unix(path) => {
            let mut stream = tokio::net::UnixStream::connect(path).await?;
            stream.write_all(request.as_bytes()).await?;
            stream.read_to_end(&mut answer).await?;
        }
        Target::Tcp(addr) => {
            let mut stream = tokio::net::TcpStream::connect(addr).await?;
            stream.write_all(request.as_bytes()).await?;
            stream.read_to_end(&mut answer).await?;
        }
    }
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer.get(9..12).unwrap_or("0").parse()?;
    let body = answer
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    Ok((status, body))
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
