//! A real `opencloud-gateway` process in front of control, as users meet
//! them: the platform at `http://localhost:PORT`, sessions at
//! `http://{sid}.nb.localhost:PORT`; started, upgraded, stopped or killed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use opencloud_protocol::config::write_private_file;

use crate::certs::{Pair, TestCa};
use crate::control::Control;
use crate::machine::{binary, free_port, fresh_loopback, unique, wait_until_ready};
use crate::wiretap::{forbid, forbid_keys_file, Wiretap};
use opencloud_gateway::link_certificate::KEY_FILE as LINK_CLIENT_KEY;

pub struct GatewayProcess {
    child: Option<Child>,
    /// Where clients reach the gateway (`127.0.0.1:port`): every answer is
    /// searched for secrets on its way to them.
    tap: Wiretap,
    /// Where the gateway itself listens: the same port on a loopback
    /// address of its own.
    listener: SocketAddr,
    pub dir: PathBuf,
    pub config_path: PathBuf,
    pub port: u16,
    pub metrics_port: u16,
    /// What a scrape of `/metrics` must present (`listen.metrics_key`).
    pub metrics_key: String,
    /// With TLS: the CA that signed its certificates.
    pub tls: Option<GatewayTls>,
}

/// A gateway's TLS: a test CA of its own, the platform's certificate for
/// `localhost` and the sessions' wildcard for `*.nb.localhost`.
pub struct GatewayTls {
    pub ca: TestCa,
    /// The plain-HTTP listener that redirects to https (`listen.http`).
    pub http_port: u16,
    pub platform_cert: PathBuf,
    pub platform_key: PathBuf,
    pub session_cert: PathBuf,
    pub session_key: PathBuf,
}

impl GatewayTls {
    fn create(dir: &std::path::Path) -> anyhow::Result<Self> {
        let certs = dir.join("certs");
        std::fs::create_dir_all(&certs)?;
        let tls = Self {
            ca: TestCa::new("OpenCloud test CA"),
            http_port: free_port(),
            platform_cert: certs.join("platform.pem"),
            platform_key: certs.join("platform.key"),
            session_cert: certs.join("sessions.pem"),
            session_key: certs.join("sessions.key"),
        };
        tls.ca
            .issue(&["localhost"])
            .write(&tls.platform_cert, &tls.platform_key)?;
        tls.renew_sessions()?;
        Ok(tls)
    }

    /// Writes a new wildcard pair over the sessions' files; the new one.
    pub fn renew_sessions(&self) -> anyhow::Result<Pair> {
        let pair = self.ca.issue(&["*.nb.localhost"]);
        pair.write(&self.session_cert, &self.session_key)?;
        Ok(pair)
    }

    /// The `[tls]` lines naming the platform pair.
    fn platform_lines(&self) -> String {
        format!(
            "cert = \"{}\"\nkey = \"{}\"\n",
            self.platform_cert.display(),
            self.platform_key.display(),
        )
    }

    fn config(&self) -> String {
        format!(
            "[tls]\n{}session_cert = \"{}\"\nsession_key = \"{}\"\n",
            self.platform_lines(),
            self.session_cert.display(),
            self.session_key.display()
        )
    }
}

impl GatewayProcess {
    /// Writes the config for a gateway in front of `control` on `port`.
    pub fn prepare(control: &Control, port: u16) -> anyhow::Result<Self> {
        Self::prepare_with(control, port, false)
    }

    /// [`GatewayProcess::prepare`], on TLS (`https://`) when `tls`.
    pub fn prepare_with(control: &Control, port: u16, tls: bool) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(unique("oc-gateway-"));
        std::fs::create_dir_all(dir.join("state"))?;
        write_private_file(
            &dir.join("keys.toml"),
            std::fs::read(control.dir.join("keys.toml"))?,
        )?;
        let metrics_port = free_port();
        let metrics_key = unique("metrics-key-for-tests-");
        let listener = SocketAddr::new(fresh_loopback(), port);
        let tap = Wiretap::start(SocketAddr::from(([127, 0, 0, 1], port)), listener)?;
        forbid_keys_file("the gateway's keys file", &dir.join("keys.toml"));
        forbid("the gateways' key for control", &control.gateway_key);
        forbid("the gateway's metrics key", &metrics_key);
        let control_public = control.public.trim_start_matches("http://");
        let tls = tls.then(|| GatewayTls::create(&dir)).transpose()?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let http_listener = tls
            .as_ref()
            .map(|t| format!("http = \"127.0.0.1:{}\"\n", t.http_port))
            .unwrap_or_default();
        let config = format!(
            "name = \"test-gateway\"\npublic_url = \"{scheme}://localhost:{port}\"\n\
             session_domain = \"nb.localhost:{port}\"\nkeys_file = \"keys.toml\"\nstate_dir = \"state\"\n\
             [listen]\npublic = \"{listener}\"\nmetrics = \"127.0.0.1:{metrics_port}\"\n\
             metrics_key = \"{metrics_key}\"\n{http_listener}\
             [control]\npublic = \"{control_public}\"\ninternal_url = \"{}\"\ngateway_key = \"{}\"\n\
             [timeouts]\nread_seconds = 5\n{}",
            control.internal,
            control.gateway_key,
            tls.as_ref().map(GatewayTls::config).unwrap_or_default()
        );
        let config_path = dir.join("gateway.toml");
        std::fs::write(&config_path, config)?;
        Ok(Self {
            child: None,
            tap,
            listener,
            dir,
            config_path,
            port,
            metrics_port,
            metrics_key,
            tls,
        })
    }

    /// Lets ACME obtain the platform certificate, with `acme` the body of
    /// `[tls.acme]`: the test CA's pair is dropped from the config, and the
    /// pair is kept where the gateway keeps it by default (its state dir).
    pub fn use_acme(&mut self, acme: &str) -> anyhow::Result<()> {
        let tls = self.tls.as_mut().context("ACME needs a TLS gateway")?;
        let config = std::fs::read_to_string(&self.config_path)?.replace(&tls.platform_lines(), "")
            + &format!("[tls.acme]\n{acme}");
        std::fs::write(&self.config_path, config)?;
        tls.platform_cert = self.dir.join("state/acme-platform.pem");
        tls.platform_key = self.dir.join("state/acme-platform.key");
        Ok(())
    }

    /// Starts (or restarts) the gateway and waits for its listener.
    pub async fn start(&mut self) -> anyhow::Result<()> {
        let child = self.child.insert(self.spawn(&[])?);
        let listener = self.listener;
        wait_until_ready(
            child,
            "gateway",
            &self.dir.join("gateway.log"),
            Duration::from_secs(30),
            Duration::from_millis(50),
            || async { tokio::net::TcpStream::connect(listener).await.is_ok() },
        )
        .await?;
        // Made before the gateway listens; it never leaves the state dir.
        let key = std::fs::read_to_string(self.dir.join("state").join(LINK_CLIENT_KEY))?;
        forbid("the gateway's link client key", &key);
        Ok(())
    }

    /// A new gateway process with `args` after its config, logging to the
    /// end of `gateway.log`.
    fn spawn(&self, args: &[&str]) -> anyhow::Result<Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("gateway.log"))?;
        Command::new(binary("opencloud-gateway"))
            .arg("--config")
            .arg(&self.config_path)
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawn opencloud-gateway {args:?}"))
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

    /// Where clients connect: through the tap.
    pub fn addr(&self) -> SocketAddr {
        self.tap.addr()
    }

    /// The gateway's own listener, behind the tap.
    pub fn listener(&self) -> SocketAddr {
        self.listener
    }

    /// `https` on TLS, else `http`.
    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// The platform origin as the browser sees it.
    pub fn platform(&self) -> String {
        format!("{}://localhost:{}", self.scheme(), self.port)
    }

    pub fn session_origin(&self, sid: &str) -> String {
        format!("{}://{sid}.nb.localhost:{}", self.scheme(), self.port)
    }

    /// A client that reaches `localhost` and the given session hosts through
    /// this gateway (Rust's resolver does not map `*.localhost`).
    pub fn client(&self, sids: &[&str], cookies: bool) -> reqwest::Client {
        self.client_from(None, sids, cookies)
    }

    /// [`GatewayProcess::client`], connecting from `source` (a
    /// [`crate::machine::fresh_loopback`]) when given.
    pub fn client_from(
        &self,
        source: Option<std::net::IpAddr>,
        sids: &[&str],
        cookies: bool,
    ) -> reqwest::Client {
        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .cookie_store(cookies)
            .local_address(source)
            .resolve("localhost", self.addr());
        for sid in sids {
            builder = builder.resolve(&format!("{sid}.nb.localhost"), self.addr());
        }
        if let Some(tls) = &self.tls {
            let ca = reqwest::Certificate::from_pem(tls.ca.pem().as_bytes()).expect("test CA");
            builder = builder.add_root_certificate(ca);
        }
        builder.build().expect("http client")
    }

    pub async fn metrics(&self) -> String {
        crate::machine::metrics(
            &format!("http://127.0.0.1:{}", self.metrics_port),
            Some(&self.metrics_key),
        )
        .await
    }

    /// Waits until the metrics hold every line of `wanted` (they are
    /// recorded after the answer is sent); returns them.
    pub async fn metrics_show(&self, wanted: &[&str]) -> String {
        let started = Instant::now();
        loop {
            let metrics = self.metrics().await;
            let missing: Vec<&str> = wanted
                .iter()
                .copied()
                .filter(|w| !metrics.lines().any(|l| l == *w))
                .collect();
            if missing.is_empty() {
                return metrics;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "missing {missing:#?} in\n{metrics}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Replaces the running gateway with a new process without closing the
    /// listener: the new one starts with `--upgrade`, the old one gets
    /// SIGQUIT, hands over its sockets and finishes what it holds.
    pub async fn upgrade(&mut self) -> anyhow::Result<()> {
        let mut old = self.child.take().context("no gateway running")?;
        self.child = Some(self.spawn(&["--upgrade"])?);
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

    /// Sends `signal` (`HUP`, `TERM`) to the running gateway.
    pub fn signal(&self, signal: &str) {
        if let Some(child) = &self.child {
            let _ = Command::new("kill")
                .args([format!("-{signal}"), child.id().to_string()])
                .status();
        }
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
