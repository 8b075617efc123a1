//! A real Prometheus (Debian's `prometheus` package) scraping a test
//! stack every second, its data in a directory of its own, and its HTTP
//! query API. Dropping it kills the process and removes the directory.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::Value;

use crate::machine::{free_port, unique, wait_until_ready};

/// One thing to scrape: `job` at `address` (`127.0.0.1:PORT`), with `bearer`
/// as `Authorization: Bearer` when it wants one.
pub struct ScrapeTarget {
    pub job: &'static str,
    pub address: String,
    pub bearer: Option<String>,
}

pub struct Prometheus {
    child: Child,
    dir: PathBuf,
    /// `http://127.0.0.1:PORT`
    pub url: String,
    http: reqwest::Client,
}

impl Prometheus {
    /// Starts Prometheus scraping `targets` every second.
    pub async fn start(targets: &[ScrapeTarget]) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(unique("oc-e2e-prometheus-"));
        std::fs::create_dir_all(dir.join("data"))?;
        let mut config = String::from(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\nscrape_configs:\n",
        );
        for target in targets {
            config.push_str(&format!(
                "  - job_name: {job}\n    static_configs:\n      - targets: [\"{address}\"]\n",
                job = target.job,
                address = target.address,
            ));
            if let Some(bearer) = &target.bearer {
                // A file, so the key is never in the config or a command line.
                let file = dir.join(format!("{}-key", target.job));
                std::fs::write(&file, bearer)?;
                config.push_str(&format!(
                    "    authorization:\n      credentials_file: {}\n",
                    file.display()
                ));
            }
        }
        std::fs::write(dir.join("prometheus.yml"), config)?;
        let port = free_port();
        let log = std::fs::File::create(dir.join("prometheus.log"))?;
        let mut child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("spawn prometheus (Debian package `prometheus`; scripts/test installs it)")?;
        let url = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let ready = format!("{url}/-/ready");
        wait_until_ready(
            &mut child,
            "prometheus",
            &dir.join("prometheus.log"),
            Duration::from_secs(30),
            Duration::from_millis(100),
            || async { matches!(http.get(&ready).send().await, Ok(r) if r.status().is_success()) },
        )
        .await?;
        Ok(Self {
            child,
            dir,
            url,
            http,
        })
    }

    /// `GET /api/v1/{api}` with `params`; the answer's `data`, or an error
    /// with Prometheus's own message.
    async fn api(&self, api: &str, params: &[(&str, String)]) -> anyhow::Result<Value> {
        let body: Value = self
            .http
            .get(format!("{}/api/v1/{api}", self.url))
            .query(params)
            .send()
            .await?
            .json()
            .await?;
        if body["status"] != "success" {
            bail!("{api} {params:?}: {body}");
        }
        Ok(body["data"].clone())
    }

    /// The instant query `expr` now: its `result` list.
    pub async fn query(&self, expr: &str) -> anyhow::Result<Vec<Value>> {
        let data = self.api("query", &[("query", expr.to_owned())]).await?;
        Ok(data["result"].as_array().cloned().unwrap_or_default())
    }

    /// `expr` over the last `range` at `step`: its `result` list.
    pub async fn query_range(
        &self,
        expr: &str,
        range: Duration,
        step: Duration,
    ) -> anyhow::Result<Vec<Value>> {
        let end = opencloud_control::now_unix();
        let params = [
            ("query", expr.to_owned()),
            ("start", (end - range.as_secs()).to_string()),
            ("end", end.to_string()),
            ("step", format!("{}s", step.as_secs().max(1))),
        ];
        let data = self.api("query_range", &params).await?;
        Ok(data["result"].as_array().cloned().unwrap_or_default())
    }

    /// Waits until every target has been scraped successfully at least
    /// `scrapes` times (a failing target names itself in the error).
    pub async fn wait_scraped(&self, scrapes: u32, within: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let targets = self.api("targets", &[]).await?;
            let active = targets["activeTargets"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let down: Vec<String> = active
                .iter()
                .filter(|t| t["health"] != "up")
                .map(|t| format!("{} {} {}", t["labels"]["job"], t["health"], t["lastError"]))
                .collect();
            let scraped = self
                .query(&format!("min(count_over_time(up[5m]) * up) >= {scrapes}"))
                .await?;
            if down.is_empty() && !active.is_empty() && !scraped.is_empty() {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("targets not scraped {scrapes} times within {within:?}: {down:?}");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
