//! The one stack a test starts: a fresh database and control, alone or
//! behind a gateway, with agents joining on demand. Users register and log
//! in through the platform origin a browser would use (the gateway when
//! there is one). Fields drop in order: gateway, control, then the database.

use std::net::IpAddr;
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use reqwest::header::COOKIE;
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde_json::{json, Value};

pub use opencloud_agent::host_link::Target;

use crate::agents::AgentProcess;
use crate::control::{Control, ControlOptions};
use crate::db::TestDatabase;
use crate::gateway::GatewayProcess;
use crate::machine::{binary, free_port, fresh_loopback, unique};
use crate::user::{TestUser, PASSWORD};

pub struct TestStack {
    gateway: Option<GatewayProcess>,
    control: Option<Control>,
    pub db: TestDatabase,
    /// Stand-in hosts of [`TestStack::session_for`], serving while the stack lives.
    externals: std::sync::Mutex<Vec<crate::external::External>>,
}

impl TestStack {
    /// Control alone; tests play the gateway (loopback is trusted).
    pub async fn control_only() -> anyhow::Result<Self> {
        Self::control_only_with(ControlOptions::default()).await
    }

    pub async fn control_only_with(options: ControlOptions) -> anyhow::Result<Self> {
        let db = TestDatabase::create().await?;
        let control = Control::start(&db, &options).await?;
        Ok(Self {
            gateway: None,
            control: Some(control),
            db,
            externals: Default::default(),
        })
    }

    /// Control behind a gateway: the platform at `http://localhost:PORT`,
    /// sessions at `http://{sid}.nb.localhost:PORT`.
    pub async fn with_gateway() -> anyhow::Result<Self> {
        Self::with_gateway_env(Vec::new()).await
    }

    /// Like [`TestStack::with_gateway`], with more environment overrides
    /// for control (`OPENCLOUD_CONTROL__…`).
    pub async fn with_gateway_env(control_env: Vec<(String, String)>) -> anyhow::Result<Self> {
        Self::behind_gateway(control_env, false).await
    }

    /// Like [`TestStack::with_gateway`], on `https://` with certificates
    /// from a test CA (the gateway's `tls`).
    pub async fn with_gateway_tls() -> anyhow::Result<Self> {
        Self::behind_gateway(Vec::new(), true).await
    }

    async fn behind_gateway(control_env: Vec<(String, String)>, tls: bool) -> anyhow::Result<Self> {
        let db = TestDatabase::create().await?;
        let port = free_port();
        let scheme = if tls { "https" } else { "http" };
        let mut env = vec![
            (
                "OPENCLOUD_CONTROL__PUBLIC_URL".into(),
                format!("{scheme}://localhost:{port}"),
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
        let mut gateway = GatewayProcess::prepare_with(&control, port, tls)?;
        gateway.start().await?;
        Ok(Self {
            gateway: Some(gateway),
            control: Some(control),
            db,
            externals: Default::default(),
        })
    }

    pub fn control(&self) -> &Control {
        self.control.as_ref().expect("control is running")
    }

    /// Control's host CA, from its directory (control made it at start).
    pub fn host_ca(&self) -> opencloud_control::host_ca::HostCa {
        self.control().host_ca()
    }

    /// The private link key of stand-in host `host_id` (see
    /// [`TestStack::session_for`]); agents keep theirs in their work dir
    /// ([`AgentProcess::link_key`]).
    pub fn link_key(&self, host_id: u64) -> String {
        self.externals
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .iter()
            .find(|e| e.session.host == host_id)
            .map(|e| e.link_key.clone())
            .unwrap_or_else(|| panic!("host {host_id} is not a stand-in of this stack"))
    }

    /// SIGKILL to control, as a crash would.
    pub fn kill_control(&mut self) {
        drop(self.control.take());
    }

    /// SIGTERM to control and wait for its exit.
    pub fn stop_control(&mut self) -> anyhow::Result<ExitStatus> {
        self.control.take().expect("control is running").stop()
    }

    /// Restarts control in place (SIGTERM, then the same config and ports).
    pub async fn restart_control(&mut self) -> anyhow::Result<()> {
        self.control
            .as_mut()
            .expect("control is running")
            .restart()
            .await
    }

    pub fn gateway(&self) -> &GatewayProcess {
        self.gateway.as_ref().expect("a stack with a gateway")
    }

    pub fn gateway_mut(&mut self) -> &mut GatewayProcess {
        self.gateway.as_mut().expect("a stack with a gateway")
    }

    /// The platform origin as clients see it.
    pub fn platform(&self) -> String {
        match &self.gateway {
            Some(gateway) => gateway.platform(),
            None => self.control().public.clone(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.platform())
    }

    /// A client without cookies, as an API client would be.
    pub fn http(&self) -> reqwest::Client {
        self.client(false)
    }

    /// A client that keeps cookies, as a browser would.
    pub fn browser_like(&self) -> reqwest::Client {
        self.client(true)
    }

    /// A client connecting from `source`, a loopback address of its own
    /// ([`fresh_loopback`]): to control and the gateway, another person.
    pub fn client_from(&self, source: IpAddr, cookies: bool) -> reqwest::Client {
        self.client_at(Some(source), cookies)
    }

    fn client(&self, cookies: bool) -> reqwest::Client {
        self.client_at(None, cookies)
    }

    fn client_at(&self, source: Option<IpAddr>, cookies: bool) -> reqwest::Client {
        match &self.gateway {
            Some(gateway) => gateway.client_from(source, &[], cookies),
            None => reqwest::Client::builder()
                .cookie_store(cookies)
                .redirect(reqwest::redirect::Policy::none())
                .local_address(source)
                .build()
                .expect("http client"),
        }
    }

    /// An anonymous GET on the platform; the response as it came.
    pub async fn get_anonymous(&self, path: &str) -> Response {
        self.send(self.http().get(self.url(path))).await
    }

    /// An anonymous GET that must succeed; its JSON body.
    pub async fn get_json_anonymous(&self, path: &str) -> Value {
        let r = self.get_anonymous(path).await;
        assert!(r.status().is_success(), "GET {path}: {}", r.status());
        r.json().await.expect("a JSON body")
    }

    /// A GET on the platform with `token` as the bearer, whoever's it is.
    pub async fn get_with_bearer(&self, path: &str, token: &str) -> Response {
        self.send(self.http().get(self.url(path)).bearer_auth(token))
            .await
    }

    /// A GET on the platform carrying `cookie` (`name=value`), as a browser
    /// sends it.
    pub async fn get_with_cookie(&self, path: &str, cookie: &str) -> Response {
        self.send(self.http().get(self.url(path)).header(COOKIE, cookie))
            .await
    }

    async fn send(&self, request: RequestBuilder) -> Response {
        request.send().await.expect("request")
    }

    /// A request to control's internal listener with the gateways' key,
    /// as a gateway makes it.
    pub fn as_gateway(&self, method: Method, path: &str) -> RequestBuilder {
        let control = self.control();
        reqwest::Client::new()
            .request(method, format!("{}{path}", control.internal))
            .bearer_auth(&control.gateway_key)
    }

    /// An anonymous POST with a JSON body: the status and the JSON answer.
    pub async fn post_anonymous(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.post_with(self.http(), path, body).await
    }

    /// POSTs `body` to `path` with `client`: the status and the JSON answer.
    async fn post_with(
        &self,
        client: reqwest::Client,
        path: &str,
        body: Value,
    ) -> (StatusCode, Value) {
        let r = client
            .post(self.url(path))
            .json(&body)
            .send()
            .await
            .expect("request");
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Registers from an address no one else used: each person the tests
    /// make registers from a machine of their own, as people do, so the
    /// per-address registration limit never counts one test's users
    /// together (`register_from` is for the tests about that limit).
    pub async fn register(&self, email: &str, password: &str, name: &str) -> (StatusCode, Value) {
        let body = json!({"email": email, "password": password, "name": name});
        self.register_from(fresh_loopback(), body).await
    }

    /// POSTs `body` to the registration API from `source`: the status and
    /// the JSON answer.
    pub async fn register_from(&self, source: IpAddr, body: Value) -> (StatusCode, Value) {
        self.post_with(
            self.client_from(source, false),
            "/api/v1/auth/register",
            body,
        )
        .await
    }

    pub async fn login(&self, email: &str, password: &str) -> (StatusCode, Value) {
        self.post_anonymous(
            "/api/v1/auth/login",
            json!({"email": email, "password": password}),
        )
        .await
    }

    /// Registers a new user with a unique email and logs them in.
    pub async fn new_user(&self) -> TestUser {
        self.registered("user", "Test User", None).await
    }

    /// Registers (with `role`, or the default customer role) and logs in a
    /// user; `prefix` starts the unique email.
    pub async fn registered(&self, prefix: &str, name: &str, role: Option<&str>) -> TestUser {
        let email = format!("{}@example.com", unique(prefix));
        let mut form = json!({"email": email, "password": PASSWORD, "name": name});
        if let Some(role) = role {
            form["role"] = json!(role);
        }
        let (status, body) = self.register_from(fresh_loopback(), form).await;
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
            base: self.platform(),
        }
    }

    /// Seeds an admin with the control binary (as scripts/up does) and logs in.
    pub async fn admin(&self) -> TestUser {
        let email = format!("{}@example.com", unique("admin"));
        let out = Command::new(binary("opencloud-control"))
            .arg("--config")
            .arg(&self.control().config_path)
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

    /// Starts an agent for the host with `host_key`; it registers by itself.
    pub fn start_agent(&self, host_key: &str, max_sessions: u32) -> AgentProcess {
        AgentProcess::start(&self.control().public, host_key, max_sessions).expect("start agent")
    }

    /// [`TestStack::start_agent`] with `warm_pool` warm servers.
    pub fn start_agent_with_warm_pool(
        &self,
        host_key: &str,
        max_sessions: u32,
        warm_pool: u32,
    ) -> AgentProcess {
        AgentProcess::start_with_warm_pool(
            &self.control().public,
            host_key,
            max_sessions,
            warm_pool,
        )
        .expect("start agent")
    }

    /// Creates a project for `user` and a session served from `target`
    /// through a stand-in host's link (as the agent would), and waits until
    /// the gateway routes it.
    pub async fn session_for(&self, user: &TestUser, target: Target) -> String {
        let project = user.create_project("Analysis").await;
        let pool = mysql_async::Pool::new(self.db.url.as_str());
        let external =
            crate::external::register_external(&pool, &self.host_ca(), user.id, project, target)
                .await
                .expect("register the session");
        let _ = pool.disconnect().await;
        let session = external.session.clone();
        self.externals
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(external);
        let gateway = self.gateway();
        let client = gateway.client(&[&session.sid], false);
        let probe = format!("{}/api/status", gateway.session_origin(&session.sid));
        let started = Instant::now();
        while client
            .get(&probe)
            .bearer_auth(&user.token)
            .send()
            .await
            .expect("probe")
            .status()
            == StatusCode::NOT_FOUND
        {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "the route never reached the gateway"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        session.sid
    }

    /// Runs `act` on the stand-in host serving session `sid` (one of
    /// [`TestStack::session_for`]'s).
    pub fn with_external<T>(
        &self,
        sid: &str,
        act: impl FnOnce(&mut crate::external::External) -> T,
    ) -> T {
        let mut externals = self
            .externals
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let external = externals
            .iter_mut()
            .find(|e| e.sid() == sid)
            .unwrap_or_else(|| panic!("no stand-in host serves {sid}"));
        act(external)
    }

    /// Enters session `sid` as `user` through a fresh ticket; returns the
    /// `oc_s` cookie pair (`oc_s=…`).
    pub async fn enter(&self, user: &TestUser, sid: &str) -> String {
        let body = user.get_json(&format!("/api/v1/sessions/{sid}")).await;
        let url = body["url"]
            .as_str()
            .unwrap_or_else(|| panic!("no url in {body}"));
        self.follow_ticket(sid, url).await
    }

    /// Follows the ticket URL of session `sid`, as the browser does after
    /// Open: it must land on `/lab`; returns the `oc_s` cookie pair.
    pub async fn follow_ticket(&self, sid: &str, url: &str) -> String {
        let r = self
            .gateway()
            .client(&[sid], false)
            .get(url)
            .send()
            .await
            .expect("enter");
        assert_eq!(r.status(), StatusCode::FOUND);
        assert_eq!(r.headers()[reqwest::header::LOCATION], "/lab");
        let cookie = r.headers()[reqwest::header::SET_COOKIE]
            .to_str()
            .expect("cookie");
        cookie.split(';').next().expect("cookie pair").to_owned()
    }
}
