//! A real `opencloud-control` process: its config and keys in a temp dir,
//! listeners on free ports, started against a test database.

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use opencloud_protocol::config::write_private_file;
use reqwest::StatusCode;

use crate::db::TestDatabase;
use crate::machine::{binary, free_port, unique, wait_until_ready};
use opencloud_control::host_ca::{HostCa, KEY_FILE as HOST_CA_KEY};

/// Options for starting control.
#[derive(Clone, Default)]
pub struct ControlOptions {
    /// Lines appended to the generated config file, whose last table is
    /// `[database]`: start them with a table header (`[billing]`) unless
    /// they are meant for `[database]`. No other table is generated after
    /// it, so any other table may be added here.
    pub extra_config: String,
    /// `trusted_proxies`; loopback by default so tests can play gateway.
    pub trusted_proxies: Option<Vec<String>>,
    /// Environment overrides for the control process.
    pub env: Vec<(String, String)>,
}

impl ControlOptions {
    /// Default options with `text` appended to the config file.
    pub fn config(text: &str) -> Self {
        Self {
            extra_config: text.into(),
            ..Default::default()
        }
    }
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
    /// The environment overrides it was started with (kept for a restart).
    env: Vec<(String, String)>,
    /// Its log, in `dir` (replicas share the dir, not the log).
    log_file: PathBuf,
}

impl Control {
    /// Control's host CA, from the directory it made it in.
    pub fn host_ca(&self) -> HostCa {
        HostCa::open(&self.dir, opencloud_control::now_unix()).expect("control's host CA")
    }

    /// The sandbox's webhook signing secret, made by control at start.
    pub fn webhook_secret_path(&self) -> PathBuf {
        self.dir.join("payments-webhook.secret")
    }

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
        write_private_file(&dir.join("keys.toml"), keys.stdout)?;
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
        write_private_file(&dir.join("gateway.key"), &gateway_key)?;
        let config = format!(
            "public_url = \"http://127.0.0.1:{public}\"\nkeys_file = \"keys.toml\"\ntrusted_proxies = [{trusted}]\n\
             session_domain = \"nb.localhost:{public}\"\ngateway_keys = [\"{gateway_key}\"]\n\
             # Every test host is on loopback.\nallow_private_hosts = true\n\
             [listen]\npublic = \"127.0.0.1:{public}\"\ninternal = \"127.0.0.1:{internal}\"\n\
             [database]\nurl = \"{}\"\npool_min = 1\npool_max = 8\n{}",
            db.url, options.extra_config
        );
        let config_path = dir.join("control.toml");
        std::fs::write(&config_path, config)?;
        Ok((dir, config_path, public, internal))
    }

    /// Runs control on `config_path`, which must refuse to start: what it
    /// said on stderr.
    pub fn refusal(config_path: &std::path::Path) -> String {
        let out = crate::machine::run_to_refusal(
            Command::new(binary("opencloud-control"))
                .arg("--config")
                .arg(config_path),
            Duration::from_secs(20),
        )
        .expect("control refuses to start");
        assert!(!out.status.success(), "control exited with success");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// Starts control and waits until `/healthz` answers.
    pub async fn start(db: &TestDatabase, options: &ControlOptions) -> anyhow::Result<Self> {
        let (dir, config_path, public, internal) = Self::prepare(db, options)?;
        let log_file = dir.join("control.log");
        let child = Self::spawn(&log_file, &config_path, &options.env)?;
        let mut control = Self {
            child,
            public: format!("http://127.0.0.1:{public}"),
            internal: format!("http://127.0.0.1:{internal}"),
            gateway_key: std::fs::read_to_string(dir.join("gateway.key"))?,
            dir,
            config_path,
            env: options.env.clone(),
            log_file,
        };
        control.wait_healthy().await?;
        crate::wiretap::forbid(
            "control's host CA key",
            &std::fs::read_to_string(control.dir.join(HOST_CA_KEY))?,
        );
        if let Ok(secret) = std::fs::read_to_string(control.webhook_secret_path()) {
            crate::wiretap::forbid("the payment webhook secret", &secret);
        }
        Ok(control)
    }

    /// The control process on `config_path`, its output appended to `log_file`.
    fn spawn(
        log_file: &std::path::Path,
        config_path: &std::path::Path,
        env: &[(String, String)],
    ) -> anyhow::Result<Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_file)?;
        Command::new(binary("opencloud-control"))
            .arg("--config")
            .arg(config_path)
            .env("RUST_LOG", "info,mysql_async=warn")
            // Tests open several sessions per user on their sign-up grant;
            // the billing tests set the product's own limit (1) again.
            .env("OPENCLOUD_CONTROL__BILLING__TRIAL__SESSIONS_AT_ONCE", "8")
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawn opencloud-control")
    }

    /// SIGTERM, then the same control again on the same config, ports,
    /// keys and database, as an operator's restart would.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        let status = self.terminate()?;
        anyhow::ensure!(status.success(), "control exited with {status} on SIGTERM");
        self.child = Self::spawn(&self.log_file, &self.config_path, &self.env)?;
        self.wait_healthy().await
    }

    /// A second replica of this control: the same config, keys and
    /// database, its own listeners (as replicas behind a load balancer).
    pub async fn replica(&self) -> anyhow::Result<Control> {
        let (public, internal) = (free_port(), free_port());
        let mut env = self.env.clone();
        env.push((
            "OPENCLOUD_CONTROL__LISTEN__PUBLIC".into(),
            format!("127.0.0.1:{public}"),
        ));
        env.push((
            "OPENCLOUD_CONTROL__LISTEN__INTERNAL".into(),
            format!("127.0.0.1:{internal}"),
        ));
        let log_file = self.dir.join(unique("replica-") + ".log");
        let mut replica = Control {
            child: Self::spawn(&log_file, &self.config_path, &env)?,
            dir: self.dir.clone(),
            public: format!("http://127.0.0.1:{public}"),
            internal: format!("http://127.0.0.1:{internal}"),
            config_path: self.config_path.clone(),
            gateway_key: self.gateway_key.clone(),
            env,
            log_file,
        };
        replica.wait_healthy().await?;
        Ok(replica)
    }

    async fn wait_healthy(&mut self) -> anyhow::Result<()> {
        let client = reqwest::Client::new();
        let healthz = format!("{}/healthz", self.public);
        wait_until_ready(
            &mut self.child,
            "control",
            &self.log_file,
            Duration::from_secs(60),
            Duration::from_millis(50),
            || async {
                client
                    .get(&healthz)
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == StatusCode::OK)
            },
        )
        .await
    }

    /// The text of `/metrics` on the internal listener.
    pub async fn metrics(&self) -> String {
        crate::machine::metrics(&self.internal, Some(&self.gateway_key)).await
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_file).unwrap_or_default()
    }

    /// Sends SIGTERM and waits for a clean exit.
    pub fn stop(mut self) -> anyhow::Result<std::process::ExitStatus> {
        self.terminate()
    }

    fn terminate(&mut self) -> anyhow::Result<std::process::ExitStatus> {
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
        // A failing test's 500s say only "it has been logged": show where.
        if std::thread::panicking() {
            let log = self.log();
            let errors: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("ERROR") || l.contains(" WARN "))
                .collect();
            eprintln!(
                "control log {} (its last errors and warnings):\n{}",
                self.log_file.display(),
                errors[errors.len().saturating_sub(20)..].join("\n")
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
