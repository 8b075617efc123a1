//! The gateway in front of control, as users meet them: the platform at
//! `http://localhost:PORT`, sessions at `http://{sid}.nb.localhost:PORT`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use serde_json::{json, Value};

use crate::{binary, free_port, unique, Control, ControlOptions, TestDatabase, PASSWORD};

pub struct GatewayProcess {
    child: Option<Child>,
    pub dir: PathBuf,
    pub config_path: PathBuf,
    pub port: u16,
    pub metrics_port: u16,
}

impl GatewayProcess {
    /// Writes the config for a gateway in front of `control` on `port`.
    pub fn prepare(control: &Control, port: u16) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(unique("oc-gateway-"));
        std::fs::create_dir_all(dir.join("state"))?;
        std::fs::copy(control.dir.join("keys.toml"), dir.join("keys.toml"))?;
        let metrics_port = free_port();
        let control_public = control.public.trim_start_matches("http://");
        let config = format!(
            "name = \"test-gateway\"\npublic_url = \"http://localhost:{port}\"\n\
             session_domain = \"nb.localhost:{port}\"\nkeys_file = \"keys.toml\"\nstate_dir = \"state\"\n\
             [listen]\npublic = \"127.0.0.1:{port}\"\nmetrics = \"127.0.0.1:{metrics_port}\"\n\
             [control]\npublic = \"{control_public}\"\ninternal_url = \"{}\"\ngateway_key = \"{}\"\n\
             [timeouts]\nread_seconds = 5\n",
            control.internal, control.gateway_key
        );
        let config_path = dir.join("gateway.toml");
        std::fs::write(&config_path, config)?;
        Ok(Self {
            child: None,
            dir,
            config_path,
            port,
            metrics_port,
        })
    }

    /// Starts (or restarts) the gateway and waits for its listener.
    pub async fn start(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("gateway.log"))?;
        let child = Command::new(binary("opencloud-gateway"))
            .arg("--config")
            .arg(&self.config_path)
            .env("RUST_LOG", "info")
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawn opencloud-gateway")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!("gateway exited with {status}:\n{}", self.log());
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("gateway did not listen in 30 s:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Resident memory of the running gateway, in KiB (from /proc).
    pub fn rss_kib(&self) -> Option<u64> {
        let pid = self.child.as_ref()?.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("gateway.log")).unwrap_or_default()
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The platform origin as the browser sees it.
    pub fn platform(&self) -> String {
        format!("http://localhost:{}", self.port)
    }

    pub fn session_origin(&self, sid: &str) -> String {
        format!("http://{sid}.nb.localhost:{}", self.port)
    }

    /// A client that reaches `localhost` and the given session hosts through
    /// this gateway (Rust's resolver does not map `*.localhost`).
    pub fn client(&self, sids: &[&str], cookies: bool) -> reqwest::Client {
        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .cookie_store(cookies)
            .resolve("localhost", self.addr());
        for sid in sids {
            builder = builder.resolve(&format!("{sid}.nb.localhost"), self.addr());
        }
        builder.build().expect("http client")
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(format!("http://127.0.0.1:{}/metrics", self.metrics_port))
            .await
            .expect("metrics")
            .text()
            .await
            .unwrap_or_default()
    }

    /// Replaces the running gateway with a new process without closing the
    /// listener: the new one starts with `--upgrade`, the old one gets
    /// SIGQUIT, hands over its sockets and finishes what it holds.
    pub async fn upgrade(&mut self) -> anyhow::Result<()> {
        let mut old = self.child.take().context("no gateway running")?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("gateway.log"))?;
        let new = Command::new(binary("opencloud-gateway"))
            .arg("--config")
            .arg(&self.config_path)
            .arg("--upgrade")
            .env("RUST_LOG", "info")
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawn the upgraded gateway")?;
        self.child = Some(new);
        // The new process must be waiting on the upgrade socket before the
        // old one sends its listeners.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        Command::new("kill")
            .args(["-QUIT", &old.id().to_string()])
            .status()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while old.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = old.kill();
                bail!(
                    "the old gateway did not exit after SIGQUIT:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait: a graceful stop.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        child.wait().ok()
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Control and a gateway in front of it, on a fresh database.
pub struct GatewayStack {
    pub gateway: GatewayProcess,
    pub control: Option<Control>,
    pub db: TestDatabase,
}

impl GatewayStack {
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with_env(Vec::new()).await
    }

    /// Like [`GatewayStack::start`], with more environment overrides for
    /// control (`OPENCLOUD_CONTROL__…`).
    pub async fn start_with_env(control_env: Vec<(String, String)>) -> anyhow::Result<Self> {
        let db = TestDatabase::create().await?;
        let port = free_port();
        let mut env = vec![
            (
                "OPENCLOUD_CONTROL__PUBLIC_URL".into(),
                format!("http://localhost:{port}"),
            ),
            (
                "OPENCLOUD_CONTROL__SESSION_DOMAIN".into(),
                format!("nb.localhost:{port}"),
            ),
        ];
        env.extend(control_env);
        let options = ControlOptions {
            env,
            ..Default::default()
        };
        let control = Control::start(&db, &options).await?;
        let mut gateway = GatewayProcess::prepare(&control, port)?;
        gateway.start().await?;
        Ok(Self {
            gateway,
            control: Some(control),
            db,
        })
    }

    pub fn control(&self) -> &Control {
        self.control.as_ref().expect("control is running")
    }
}

/// A user registered and logged in through the gateway.
pub struct GatewayUser {
    pub email: String,
    pub token: String,
    pub id: u64,
}

impl GatewayStack {
    /// Registers and logs in a new user through the gateway.
    pub async fn new_user(&self) -> GatewayUser {
        self.registered("gw", "Gateway User", None).await
    }

    /// Registers (with `role`, or the default customer role) and logs in a
    /// user through the gateway; `prefix` starts the unique email.
    pub async fn registered(&self, prefix: &str, name: &str, role: Option<&str>) -> GatewayUser {
        let http = self.gateway.client(&[], false);
        let platform = self.gateway.platform();
        let email = format!("{}@example.com", unique(prefix));
        let mut form = json!({"email": email, "password": PASSWORD, "name": name});
        if let Some(role) = role {
            form["role"] = json!(role);
        }
        let r = http
            .post(format!("{platform}/api/v1/auth/register"))
            .json(&form)
            .send()
            .await
            .expect("register");
        assert_eq!(
            r.status(),
            reqwest::StatusCode::CREATED,
            "register through the gateway"
        );
        let login: Value = http
            .post(format!("{platform}/api/v1/auth/login"))
            .json(&json!({"email": email, "password": PASSWORD}))
            .send()
            .await
            .expect("login")
            .json()
            .await
            .expect("login body");
        GatewayUser {
            token: login["token"].as_str().expect("token").to_owned(),
            id: login["user"]["id"].as_u64().expect("user id"),
            email,
        }
    }

    /// A request to the platform's API through the gateway as `user`; the
    /// status and the JSON body (`Null` when there is none).
    pub async fn api(
        &self,
        user: &GatewayUser,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (reqwest::StatusCode, Value) {
        let mut request = self
            .gateway
            .client(&[], false)
            .request(method, format!("{}{path}", self.gateway.platform()))
            .bearer_auth(&user.token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let r = request.send().await.expect("request through the gateway");
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn post(
        &self,
        user: &GatewayUser,
        path: &str,
        body: Value,
    ) -> (reqwest::StatusCode, Value) {
        self.api(user, reqwest::Method::POST, path, Some(body))
            .await
    }

    pub async fn get(&self, user: &GatewayUser, path: &str) -> (reqwest::StatusCode, Value) {
        self.api(user, reqwest::Method::GET, path, None).await
    }

    /// Creates a project for `user` and a session on the upstream at
    /// `port` (as the agent will), and waits until the gateway routes it.
    pub async fn session_for(&self, user: &GatewayUser, port: u16, upstream_token: &str) -> String {
        let project: Value = self
            .gateway
            .client(&[], false)
            .post(format!("{}/api/v1/projects", self.gateway.platform()))
            .bearer_auth(&user.token)
            .json(&json!({"name": "Analysis"}))
            .send()
            .await
            .expect("create project")
            .json()
            .await
            .expect("project body");
        let pool = mysql_async::Pool::new(self.db.url.as_str());
        let session = opencloud_control::sessions::register_external(
            &pool,
            user.id,
            project["project"]["id"].as_u64().expect("project id"),
            "127.0.0.1",
            port,
            upstream_token,
        )
        .await
        .expect("register the session");
        let _ = pool.disconnect().await;
        let client = self.gateway.client(&[&session.sid], false);
        let probe = format!("{}/api/status", self.gateway.session_origin(&session.sid));
        let started = Instant::now();
        while client
            .get(&probe)
            .bearer_auth(&user.token)
            .send()
            .await
            .expect("probe")
            .status()
            == reqwest::StatusCode::NOT_FOUND
        {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "the route never reached the gateway"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        session.sid
    }

    /// Enters session `sid` as `user` through a fresh ticket; returns the
    /// `oc_s` cookie pair (`oc_s=…`).
    pub async fn enter(&self, user: &GatewayUser, sid: &str) -> String {
        let client = self.gateway.client(&[sid], false);
        let body: Value = client
            .get(format!("{}/api/v1/sessions/{sid}", self.gateway.platform()))
            .bearer_auth(&user.token)
            .send()
            .await
            .expect("session")
            .json()
            .await
            .expect("session body");
        let url = body["url"]
            .as_str()
            .unwrap_or_else(|| panic!("no url in {body}"));
        let r = client.get(url).send().await.expect("enter");
        assert_eq!(r.status(), reqwest::StatusCode::FOUND);
        assert_eq!(r.headers()[reqwest::header::LOCATION], "/lab");
        let cookie = r.headers()[reqwest::header::SET_COOKIE]
            .to_str()
            .expect("cookie");
        cookie.split(';').next().expect("cookie pair").to_owned()
    }
}
