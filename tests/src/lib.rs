//! The end-to-end harness: real `opencloud-control` processes on free ports,
//! each against its own fresh MariaDB database, driven over HTTP like a
//! client would; real Chromium through chromedriver for the pages.
//!
//! This is the only place that knows ports, paths and processes.

pub mod agents;
pub mod browser;
pub mod gateway;
pub mod hosts;
pub mod jupyter;
pub mod kernel;
pub mod upstream;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use mysql_async::prelude::*;
use rand::Rng;
use reqwest::StatusCode;
use serde_json::{json, Value};

/// The MariaDB server tests use; override with `OPENCLOUD_TEST_MYSQL`.
pub fn mysql_server_url() -> String {
    std::env::var("OPENCLOUD_TEST_MYSQL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".into())
}

/// Where cargo put the workspace binaries (`target/debug`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/debug/deps/<test> → target/debug
    exe.parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps")
        .to_path_buf()
}

pub fn binary(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (scripts/test does)",
        path.display()
    );
    path
}

/// Where test servers listen: below Linux's ephemeral ports (32768 and
/// up). A port the kernel just handed out as ephemeral is soon handed out
/// again to some outgoing connection, and a server started there a moment
/// later finds it taken (a CI run lost control's start-up that way).
pub const TEST_PORTS: std::ops::Range<u16> = 20_000..32_000;

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    free_ports_in_a_row(1).0
}

/// `n` consecutive ports that were free a moment ago: (first, last).
pub fn free_ports_in_a_row(n: u16) -> (u16, u16) {
    for _ in 0..500 {
        let first = rand::Rng::gen_range(
            &mut rand::thread_rng(),
            TEST_PORTS.start..TEST_PORTS.end - n,
        );
        let last = first + n - 1;
        if (first..=last).all(|port| TcpListener::bind(("127.0.0.1", port)).is_ok()) {
            return (first, last);
        }
    }
    panic!("no {n} consecutive free ports in {TEST_PORTS:?}");
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A unique suffix for databases, emails and names within this run.
pub fn unique(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let r: u32 = rand::thread_rng().gen();
    format!("{prefix}{}x{n}x{r:08x}", std::process::id())
}

/// A fresh database, dropped when this value is dropped.
pub struct TestDatabase {
    pub name: String,
    pub url: String,
    pool: mysql_async::Pool,
}

impl TestDatabase {
    pub async fn create() -> anyhow::Result<Self> {
        let server = mysql_server_url();
        let name = unique("oc_e2e_");
        let admin = mysql_async::Pool::new(server.as_str());
        let mut conn = admin
            .get_conn()
            .await
            .with_context(|| format!("cannot reach MariaDB at {server}; is it running?"))?;
        conn.query_drop(format!(
            "CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"
        ))
        .await?;
        drop(conn);
        admin.disconnect().await?;
        let url = format!("{server}/{name}");
        let pool = mysql_async::Pool::new(url.as_str());
        Ok(Self { name, url, pool })
    }

    pub async fn conn(&self) -> mysql_async::Conn {
        self.pool
            .get_conn()
            .await
            .expect("connection to the test database")
    }

    /// `SELECT COUNT(*) FROM table [WHERE …]`.
    pub async fn count(&self, table_and_filter: &str) -> u64 {
        self.conn()
            .await
            .query_first(format!("SELECT COUNT(*) FROM {table_and_filter}"))
            .await
            .expect("count query")
            .unwrap_or(0)
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let server = mysql_server_url();
        let name = self.name.clone();
        // Drop runs outside async context; a short-lived runtime does the SQL.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                let pool = mysql_async::Pool::new(server.as_str());
                let mut conn = pool.get_conn().await.ok()?;
                conn.query_drop(format!("DROP DATABASE IF EXISTS `{name}`"))
                    .await
                    .ok()?;
                drop(conn);
                pool.disconnect().await.ok()
            })
        })
        .join();
    }
}

/// Options for starting control.
#[derive(Clone, Default)]
pub struct ControlOptions {
    /// Lines appended to the generated config file.
    pub extra_config: String,
    /// `trusted_proxies`; loopback by default so tests can play gateway.
    pub trusted_proxies: Option<Vec<String>>,
    /// Environment overrides for the control process.
    pub env: Vec<(String, String)>,
}

/// A running control process and what it needs.
pub struct Control {
    child: Child,
    pub dir: PathBuf,
    pub public: String,
    pub internal: String,
    pub config_path: PathBuf,
    /// The key gateways present on the internal listener (`gateway_keys`).
    pub gateway_key: String,
}

impl Control {
    /// Writes a config and keys file for `db` into a temp dir.
    pub fn prepare(
        db: &TestDatabase,
        options: &ControlOptions,
    ) -> anyhow::Result<(PathBuf, PathBuf, u16, u16)> {
        let dir = std::env::temp_dir().join(unique("oc-e2e-"));
        std::fs::create_dir_all(&dir)?;
        let keys = Command::new(binary("opencloud-control"))
            .arg("keygen")
            .output()?;
        std::fs::write(dir.join("keys.toml"), keys.stdout)?;
        let (public, internal) = (free_port(), free_port());
        let trusted = options
            .trusted_proxies
            .clone()
            .unwrap_or_else(|| vec!["127.0.0.1".into()]);
        let trusted = trusted
            .iter()
            .map(|t| format!("\"{t}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let gateway_key = unique("gateway-key-for-tests-");
        std::fs::write(dir.join("gateway.key"), &gateway_key)?;
        let config = format!(
            "public_url = \"http://127.0.0.1:{public}\"\nkeys_file = \"keys.toml\"\ntrusted_proxies = [{trusted}]\n\
             session_domain = \"nb.localhost:{public}\"\ngateway_keys = [\"{gateway_key}\"]\n\
             [listen]\npublic = \"127.0.0.1:{public}\"\ninternal = \"127.0.0.1:{internal}\"\n\
             [database]\nurl = \"{}\"\npool_min = 1\npool_max = 8\n{}",
            db.url, options.extra_config
        );
        let config_path = dir.join("control.toml");
        std::fs::write(&config_path, config)?;
        Ok((dir, config_path, public, internal))
    }

    /// Starts control and waits until `/healthz` answers.
    pub async fn start(db: &TestDatabase, options: &ControlOptions) -> anyhow::Result<Self> {
        let (dir, config_path, public, internal) = Self::prepare(db, options)?;
        let log = std::fs::File::create(dir.join("control.log"))?;
        let child = Command::new(binary("opencloud-control"))
            .arg("--config")
            .arg(&config_path)
            .env("RUST_LOG", "info,mysql_async=warn")
            .envs(options.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawn opencloud-control")?;
        let mut control = Self {
            child,
            public: format!("http://127.0.0.1:{public}"),
            internal: format!("http://127.0.0.1:{internal}"),
            gateway_key: std::fs::read_to_string(dir.join("gateway.key"))?,
            dir,
            config_path,
        };
        control.wait_healthy().await?;
        Ok(control)
    }

    async fn wait_healthy(&mut self) -> anyhow::Result<()> {
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "control exited with {status} during start-up:\n{}",
                    self.log()
                );
            }
            if let Ok(r) = client.get(format!("{}/healthz", self.public)).send().await {
                if r.status() == StatusCode::OK {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("control did not become healthy in 60 s:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("control.log")).unwrap_or_default()
    }

    /// Sends SIGTERM and waits for a clean exit.
    pub fn stop(mut self) -> anyhow::Result<std::process::ExitStatus> {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status()?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                return Err(anyhow!("control did not stop within 20 s after SIGTERM"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One control process with a fresh database.
pub struct TestStack {
    pub control: Control,
    pub db: TestDatabase,
}

/// A registered, logged-in user talking to the API with their token.
pub struct TestUser {
    pub id: u64,
    pub email: String,
    pub password: String,
    pub token: String,
    pub http: reqwest::Client,
    pub base: String,
}

pub const PASSWORD: &str = "correct horse battery";

impl TestStack {
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(ControlOptions::default()).await
    }

    pub async fn start_with(options: ControlOptions) -> anyhow::Result<Self> {
        let db = TestDatabase::create().await?;
        let control = Control::start(&db, &options).await?;
        Ok(Self { control, db })
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.control.public)
    }

    /// A client without cookies, as an API client would be.
    pub fn http(&self) -> reqwest::Client {
        reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("http client")
    }

    /// A client that keeps cookies, as a browser would.
    pub fn browser_like(&self) -> reqwest::Client {
        reqwest::Client::builder()
            .cookie_store(true)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("http client")
    }

    pub async fn post_json(&self, path: &str, body: Value) -> (StatusCode, Value) {
        let r = self
            .http()
            .post(self.url(path))
            .json(&body)
            .send()
            .await
            .expect("request");
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn register(&self, email: &str, password: &str, name: &str) -> (StatusCode, Value) {
        self.post_json(
            "/api/v1/auth/register",
            json!({"email": email, "password": password, "name": name}),
        )
        .await
    }

    pub async fn login(&self, email: &str, password: &str) -> (StatusCode, Value) {
        self.post_json(
            "/api/v1/auth/login",
            json!({"email": email, "password": password}),
        )
        .await
    }

    /// Registers a new user with a unique email and logs them in.
    pub async fn new_user(&self) -> TestUser {
        let email = format!("{}@example.com", unique("user"));
        let (status, body) = self.register(&email, PASSWORD, "Test User").await;
        assert_eq!(status, StatusCode::CREATED, "register: {body}");
        self.logged_in(&email, PASSWORD).await
    }

    pub async fn logged_in(&self, email: &str, password: &str) -> TestUser {
        let (status, body) = self.login(email, password).await;
        assert_eq!(status, StatusCode::OK, "login: {body}");
        TestUser {
            id: body["user"]["id"].as_u64().expect("user id"),
            email: email.to_owned(),
            password: password.to_owned(),
            token: body["token"].as_str().expect("token").to_owned(),
            http: self.http(),
            base: self.control.public.clone(),
        }
    }

    /// Seeds an admin with the control binary (as scripts/up does) and logs in.
    pub async fn admin(&self) -> TestUser {
        let email = format!("{}@example.com", unique("admin"));
        let out = Command::new(binary("opencloud-control"))
            .arg("--config")
            .arg(&self.control.config_path)
            .args(["seed", "--admin-email", &email])
            .env("OPENCLOUD_ADMIN_PASSWORD", PASSWORD)
            .output()
            .expect("run seed");
        assert!(
            out.status.success(),
            "seed failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.logged_in(&email, PASSWORD).await
    }
}

impl TestUser {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> (StatusCode, Value) {
        let r = request
            .bearer_auth(&self.token)
            .send()
            .await
            .expect("request");
        let status = r.status();
        let text = r.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.send(self.http.get(self.url(path))).await
    }

    pub async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.send(self.http.post(self.url(path)).json(&body)).await
    }

    pub async fn patch(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.send(self.http.patch(self.url(path)).json(&body)).await
    }

    /// Any method with a JSON body, for the odd cases.
    pub async fn send_raw(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Value,
    ) -> (StatusCode, Value) {
        self.send(self.http.request(method, self.url(path)).json(&body))
            .await
    }

    pub async fn delete(&self, path: &str) -> (StatusCode, Value) {
        self.send(self.http.delete(self.url(path))).await
    }

    /// Creates a project and returns its id.
    pub async fn create_project(&self, name: &str) -> u64 {
        let (status, body) = self.post("/api/v1/projects", json!({"name": name})).await;
        assert_eq!(status, StatusCode::CREATED, "create project: {body}");
        body["project"]["id"].as_u64().expect("project id")
    }
}

/// Asserts an API error's status, code and field, and returns its message.
pub fn expect_error(
    got: &(StatusCode, Value),
    status: StatusCode,
    code: &str,
    field: Option<&str>,
) -> String {
    let (got_status, body) = got;
    assert_eq!(*got_status, status, "status for {body}");
    assert_eq!(body["error"]["code"], code, "code in {body}");
    assert_eq!(body["error"]["field"].as_str(), field, "field in {body}");
    let message = body["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        !message.is_empty(),
        "an error must say what is wrong: {body}"
    );
    message
}
