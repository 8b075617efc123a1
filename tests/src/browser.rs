//! Debian's Chromium driven through chromedriver (WebDriver), headless.

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use fantoccini::elements::Element;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;

use crate::machine::{free_port, signal_group, unique};

pub const CHROMIUM: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// A chromedriver process and one browser session on it.
pub struct Browser {
    pub client: Client,
    driver: Child,
    profile: std::path::PathBuf,
}

/// Adds `ca_pem` as a trusted CA to a new NSS database in `home`.
fn trust_in_nss(home: &std::path::Path, ca_pem: &str) -> anyhow::Result<()> {
    let db = home.join(".pki/nssdb");
    std::fs::create_dir_all(&db)?;
    let ca = home.join("test-ca.pem");
    std::fs::write(&ca, ca_pem)?;
    let nss = format!("sql:{}", db.display());
    for args in [
        vec!["-N", "-d", &nss, "--empty-password"],
        vec![
            "-A",
            "-d",
            &nss,
            "-t",
            "C,,",
            "-n",
            "OpenCloud test CA",
            "-i",
            ca.to_str().context("a UTF-8 path")?,
        ],
    ] {
        let out = Command::new("certutil")
            .args(&args)
            .output()
            .context("certutil is missing: scripts/test installs the libnss3-tools package")?;
        if !out.status.success() {
            bail!(
                "certutil {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    Ok(())
}

impl Browser {
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_trusting(None).await
    }

    /// A browser that trusts the CA `ca_pem` besides the system's, the way
    /// a user who installed it would: in the NSS database of a home
    /// directory of its own (Chromium on Linux reads `~/.pki/nssdb`).
    pub async fn start_trusting(ca_pem: Option<&str>) -> anyhow::Result<Self> {
        for path in [CHROMIUM, CHROMEDRIVER] {
            if !std::path::Path::new(path).exists() {
                bail!("{path} is missing: scripts/test installs the chromium and chromium-driver packages");
            }
        }
        let port = free_port();
        let profile = std::env::temp_dir().join(unique("oc-chromium-"));
        let home = profile.join("home");
        std::fs::create_dir_all(&home)?;
        if let Some(ca_pem) = ca_pem {
            trust_in_nss(&home, ca_pem)?;
        }
        // Its own process group, which Chromium joins: a test that panics
        // before `close` still takes the browser down in `Drop`.
        let driver = Command::new(CHROMEDRIVER)
            .process_group(0)
            .env("HOME", &home)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start chromedriver")?;
        let capabilities = json!({
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage", "--window-size=1280,900",
                    format!("--user-data-dir={}", profile.join("data").display()),
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

    /// Clicks the first element matching `css` once it exists and takes
    /// clicks: pages that render in steps (Lab) cover, hide or replace an
    /// element for a moment after it appears.
    pub async fn click(&self, css: &str) -> anyhow::Result<Element> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let element = self.wait_for(css).await?;
            match element.click().await {
                Ok(()) => return Ok(element),
                Err(e) if Instant::now() < deadline && not_clickable_yet(&e) => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(anyhow::Error::new(e).context(format!("clicking {css}"))),
            }
        }
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

    /// Clicks `css` (a link or a button) and waits until the page's path
    /// is `path`.
    pub async fn follow(&self, css: &str, path: &str) -> anyhow::Result<()> {
        self.click(css).await?;
        self.wait_for_path(path).await
    }

    /// Clicks `css` and waits until the URL satisfies `ready` (see
    /// [`Browser::wait_for_url`]).
    pub async fn click_until_url(
        &self,
        css: &str,
        what: &str,
        ready: impl Fn(&str) -> bool,
    ) -> anyhow::Result<()> {
        self.click(css).await?;
        self.wait_for_url(what, ready).await
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

    /// Waits until the full current URL satisfies `ready`; `what` names the
    /// expectation in the error. For navigations that keep the path (a form
    /// that posts back to its own page, a search).
    pub async fn wait_for_url(
        &self,
        what: &str,
        ready: impl Fn(&str) -> bool,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let now = self.client.current_url().await?;
            if ready(now.as_str()) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("expected a URL {what}, still on {now}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits for an element matching `css` to exist.
    pub async fn wait_for(&self, css: &str) -> anyhow::Result<Element> {
        self.client
            .wait()
            .at_most(Duration::from_secs(15))
            .for_element(Locator::Css(css))
            .await
            .with_context(|| format!("no element matches {css}"))
    }

    /// The current value of the input or textarea matching `css`.
    pub async fn value(&self, css: &str) -> anyhow::Result<String> {
        Ok(self
            .wait_for(css)
            .await?
            .prop("value")
            .await?
            .unwrap_or_default())
    }

    /// How many elements match `css` right now.
    pub async fn count(&self, css: &str) -> anyhow::Result<usize> {
        Ok(self.client.find_all(Locator::Css(css)).await?.len())
    }

    /// Fills and submits the registration form on the current page. The
    /// caller waits for what should follow (the login page, or an error).
    pub async fn submit_register(
        &self,
        name: &str,
        email: &str,
        password: &str,
    ) -> anyhow::Result<()> {
        self.fill("#name", name).await?;
        self.fill("#email", email).await?;
        self.fill("#password", password).await?;
        self.click("form[action='/register'] button[type=submit]")
            .await?;
        Ok(())
    }

    /// Fills and submits the new-project form on `/projects`. The caller
    /// waits for the list entry.
    pub async fn submit_new_project(&self, name: &str) -> anyhow::Result<()> {
        self.fill("form[action='/projects'] #name", name).await?;
        self.click("form[action='/projects'] button[type=submit]")
            .await?;
        Ok(())
    }

    /// Fills and submits the login form on the current page. The caller
    /// waits for what should follow (the next page, or an error).
    pub async fn submit_login(&self, email: &str, password: &str) -> anyhow::Result<()> {
        self.fill("form[action='/login'] #email", email).await?;
        self.fill("form[action='/login'] #password", password)
            .await?;
        self.click("form[action='/login'] button[type=submit]")
            .await?;
        Ok(())
    }

    /// Clicks "Log out" in the top bar and waits for the home page.
    pub async fn log_out(&self) -> anyhow::Result<()> {
        self.click("header.topbar form[action='/logout'] button")
            .await?;
        self.wait_for_path("/").await?;
        // The top bar offers to log in again once the cookie is gone.
        self.wait_for("header.topbar a[href='/login']").await?;
        Ok(())
    }

    pub async fn page_source(&self) -> anyhow::Result<String> {
        Ok(self.client.source().await?)
    }

    /// Ends the session cleanly; `Drop` then stops chromedriver.
    pub async fn close(self) {
        let _ = self.client.clone().close().await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // chromedriver and the Chromium it started share this group. The
        // driver is not reaped yet, so its id cannot name another group.
        signal_group(self.driver.id(), "KILL");
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// Opens `{base}/login` and logs in through the form. Waits for nothing:
/// a good login goes on to `/projects`, a refused one stays on `/login`.
pub async fn login_in_browser(
    browser: &Browser,
    base: &str,
    email: &str,
    password: &str,
) -> anyhow::Result<()> {
    browser.goto(&format!("{base}/login")).await?;
    browser.submit_login(email, password).await
}

/// Logs in through the form at `{base}/login` and waits for the project
/// list a good login lands on.
pub async fn log_in(
    browser: &Browser,
    base: &str,
    email: &str,
    password: &str,
) -> anyhow::Result<()> {
    login_in_browser(browser, base, email, password).await?;
    browser.wait_for_path("/projects").await
}

/// WebDriver's answers for an element that is there but covered, hidden
/// or just replaced.
fn not_clickable_yet(error: &fantoccini::error::CmdError) -> bool {
    use fantoccini::error::{CmdError, ErrorStatus};
    matches!(error, CmdError::Standard(w) if matches!(
        w.error,
        ErrorStatus::ElementNotInteractable
            | ErrorStatus::ElementClickIntercepted
            | ErrorStatus::StaleElementReference
    ))
}
