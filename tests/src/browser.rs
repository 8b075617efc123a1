//! Debian's Chromium driven through chromedriver (WebDriver), headless.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;

use crate::{free_port, unique};

pub const CHROMIUM: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// A chromedriver process and one browser session on it.
pub struct Browser {
    pub client: Client,
    driver: Child,
    profile: std::path::PathBuf,
}

impl Browser {
    pub async fn start() -> anyhow::Result<Self> {
        for path in [CHROMIUM, CHROMEDRIVER] {
            if !std::path::Path::new(path).exists() {
                bail!("{path} is missing: scripts/test installs the chromium and chromium-driver packages");
            }
        }
        let port = free_port();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start chromedriver")?;
        let profile = std::env::temp_dir().join(unique("oc-chromium-"));
        let capabilities = json!({
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage", "--window-size=1280,900",
                    format!("--user-data-dir={}", profile.display()),
                ]
            }
        });
        let capabilities = match capabilities {
            serde_json::Value::Object(map) => map,
            _ => unreachable!(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        let client = loop {
            let attempt =
                ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
                    .capabilities(capabilities.clone())
                    .connect(&format!("http://127.0.0.1:{port}"))
                    .await;
            match attempt {
                Ok(client) => break client,
                Err(e) if Instant::now() > deadline => {
                    bail!("chromedriver did not accept a session: {e}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        };
        Ok(Self {
            client,
            driver,
            profile,
        })
    }

    pub async fn goto(&self, url: &str) -> anyhow::Result<()> {
        self.client.goto(url).await?;
        Ok(())
    }

    pub async fn fill(&self, css: &str, value: &str) -> anyhow::Result<()> {
        let field = self.client.wait().for_element(Locator::Css(css)).await?;
        field.clear().await?;
        field.send_keys(value).await?;
        Ok(())
    }

    pub async fn click(&self, css: &str) -> anyhow::Result<()> {
        self.client
            .wait()
            .for_element(Locator::Css(css))
            .await?
            .click()
            .await?;
        Ok(())
    }

    /// The visible text of the first element matching `css`.
    pub async fn text(&self, css: &str) -> anyhow::Result<String> {
        Ok(self
            .client
            .wait()
            .for_element(Locator::Css(css))
            .await?
            .text()
            .await?)
    }

    pub async fn path(&self) -> anyhow::Result<String> {
        Ok(self.client.current_url().await?.path().to_owned())
    }

    /// Waits until the page's path is `path` (navigation after a form post).
    pub async fn wait_for_path(&self, path: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let now = self.path().await?;
            if now == path {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("expected to reach {path}, still on {now}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn page_source(&self) -> anyhow::Result<String> {
        Ok(self.client.source().await?)
    }

    pub async fn close(mut self) {
        let _ = self.client.clone().close().await;
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
