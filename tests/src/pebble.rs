//! Pebble, the ACME test CA (Debian's `pebble` package), on free ports of
//! its own: its HTTPS listener on a certificate from a test CA, HTTP-01
//! checked on the port the gateway's plain-HTTP listener uses, and its
//! issuing root and intermediate fetched from its management listener.

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::certs::TestCa;
use crate::machine::{free_port, unique};

/// From PATH: Debian's package installs it as `pebble`.
const PEBBLE: &str = "pebble";

pub struct Pebble {
    child: Child,
    pub dir: PathBuf,
    /// `https://127.0.0.1:PORT/dir`.
    pub directory: String,
    /// The CA of pebble's own HTTPS listener, for `tls.acme.directory_ca`.
    pub listener_ca: PathBuf,
    listener_ca_pem: String,
    management_port: u16,
}

impl Pebble {
    /// Starts pebble; it validates HTTP-01 on `http_port` and issues
    /// certificates that live for `validity`.
    pub async fn start(http_port: u16, validity: Duration) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(unique("oc-pebble-"));
        std::fs::create_dir_all(&dir)?;
        let ca = TestCa::new("pebble listener test CA");
        let (cert, key) = (dir.join("listener.pem"), dir.join("listener.key"));
        ca.issue(&["127.0.0.1", "localhost"]).write(&cert, &key)?;
        let listener_ca = dir.join("listener-ca.pem");
        std::fs::write(&listener_ca, ca.pem())?;
        let (port, management_port) = (free_port(), free_port());
        let config = serde_json::json!({
            "pebble": {
                "listenAddress": format!("127.0.0.1:{port}"),
                "managementListenAddress": format!("127.0.0.1:{management_port}"),
                "certificate": cert,
                "privateKey": key,
                "httpPort": http_port,
                "tlsPort": free_port(),
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false,
                "certificateValidityPeriod": validity.as_secs(),
            }
        });
        let config_path = dir.join("pebble.json");
        std::fs::write(&config_path, serde_json::to_vec_pretty(&config)?)?;
        let log = std::fs::File::create(dir.join("pebble.log"))?;
        let child = Command::new(PEBBLE)
            .arg("-config")
            .arg(&config_path)
            // No random waits before validating, no rejected nonces: the
            // test measures the gateway, not pebble's chaos.
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawn pebble (Debian package `pebble`)")?;
        let pebble = Self {
            child,
            dir,
            directory: format!("https://127.0.0.1:{port}/dir"),
            listener_ca,
            listener_ca_pem: ca.pem(),
            management_port,
        };
        let started = Instant::now();
        while pebble.management("roots/0").await.is_err() {
            if started.elapsed() > Duration::from_secs(20) {
                bail!("pebble did not come up:\n{}", pebble.log());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(pebble)
    }

    /// A PEM document from pebble's management listener.
    async fn management(&self, path: &str) -> anyhow::Result<String> {
        let ca = reqwest::Certificate::from_pem(self.listener_ca_pem.as_bytes())?;
        let answer = reqwest::Client::builder()
            .add_root_certificate(ca)
            .build()?
            .get(format!("https://127.0.0.1:{}/{path}", self.management_port))
            .send()
            .await?
            .error_for_status()?;
        Ok(answer.text().await?)
    }

    /// The root that pebble's certificates chain to.
    pub async fn root_pem(&self) -> anyhow::Result<String> {
        self.management("roots/0").await
    }

    /// The intermediate that signs pebble's certificates.
    pub async fn intermediate_pem(&self) -> anyhow::Result<String> {
        self.management("intermediates/0").await
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("pebble.log")).unwrap_or_default()
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
