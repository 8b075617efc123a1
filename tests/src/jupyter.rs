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
            // Kernels talk over IPC files here; their paths must stay under
            // the 107 bytes a Unix socket path may have.
            .env("JUPYTER_RUNTIME_DIR", &run)
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

/// Jupyter's XSRF double-submit pair: the same value as cookie and header,
/// as Lab sends it (Jupyter's own checks stay on behind the gateway).
pub const XSRF: &str = "oc-test-xsrf";

/// `method path` on the server at `target`, reached the way the host link
/// reaches it (with the XSRF pair a page of its own sends): the status and
/// the JSON body (`Null` when the body is not JSON).
pub async fn request(
    target: &Target,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> anyhow::Result<(u16, serde_json::Value)> {
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::TokioIo;
    let exchange = async {
        let mut sender = match target {
            Target::Unix(socket) => {
                let stream = tokio::net::UnixStream::connect(socket)
                    .await
                    .with_context(|| format!("connect {}", socket.display()))?;
                handshake(TokioIo::new(stream)).await?
            }
            Target::Tcp(addr) => {
                let stream = tokio::net::TcpStream::connect(addr)
                    .await
                    .with_context(|| format!("connect {addr}"))?;
                handshake(TokioIo::new(stream)).await?
            }
        };
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "localhost")
            .header("cookie", format!("_xsrf={XSRF}"))
            .header("x-xsrftoken", XSRF)
            .header("content-type", "application/json")
            .body(Full::new(hyper::body::Bytes::from(body)))?;
        let response = sender.send_request(request).await?;
        let status = response.status().as_u16();
        let bytes = response.into_body().collect().await?.to_bytes();
        Ok::<_, anyhow::Error>((
            status,
            serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
        ))
    };
    tokio::time::timeout(Duration::from_secs(30), exchange)
        .await
        .context("no answer within 30 s")?
}

async fn handshake<S>(
    io: hyper_util::rt::TokioIo<S>,
) -> anyhow::Result<hyper::client::conn::http1::SendRequest<http_body_util::Full<hyper::body::Bytes>>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(connection);
    Ok(sender)
}

/// `GET path` on the server at `target`: the status code, if it answers.
pub async fn get_status(target: &Target, path: &str) -> Option<u16> {
    request(target, "GET", path, None)
        .await
        .ok()
        .map(|(status, _)| status)
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
