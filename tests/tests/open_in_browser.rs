#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test
//! The whole way from a new account to code running in a notebook, in
//! Chromium, as a customer meets it: register and log in on the platform's
//! pages (through the gateway), create a project on My projects, click
//! Open, land in JupyterLab on the session's own origin (served by a real
//! agent's Jupyter server), make a notebook and run a cell. Run it on its
//! own (`--test-threads=1`): it drives its own Chromium.

use std::cell::Cell;
use std::time::{Duration, Instant};

use fantoccini::key::Key;
use fantoccini::Locator;
use opencloud_e2e::agents::AgentProcess;
use opencloud_e2e::browser::Browser;
use opencloud_e2e::exposition::Exposition;
use opencloud_e2e::TestStack;
use opencloud_e2e::{unique, PASSWORD};

const NOTEBOOK_CARD: &str = ".jp-LauncherCard[data-category=\"Notebook\"]";
const FIRST_CELL: &str = ".jp-Notebook .jp-CodeCell:first-child";
const NO_ROUTE: &str = "There is no session at this address";
const KERNEL_IDLE: &str = ".jp-Notebook-ExecutionIndicator[data-status=\"idle\"]";

/// Waits for what the browser shows to satisfy `check`; how long it took.
/// WebDriver errors count as "not yet": the gateway's starting page reloads
/// itself, and an element found just before a reload is gone after it. On
/// time-out the error names the page the browser is on and what it says.
async fn shows<T, F, Fut>(
    browser: &Browser,
    what: &str,
    limit: Duration,
    check: F,
) -> anyhow::Result<(T, Duration)>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let started = Instant::now();
    loop {
        if let Ok(Some(value)) = check().await {
            return Ok((value, started.elapsed()));
        }
        if started.elapsed() > limit {
            let url = browser.client.current_url().await?;
            let text = browser.text("body").await.unwrap_or_default();
            anyhow::bail!(
                "{what} did not happen within {limit:?}; the browser is on {url}, showing:\n{text}"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The last lines of the gateway's and the agent's logs, for a failure.
fn tails(stack: &TestStack, agent: &AgentProcess) -> String {
    let tail = |log: String| {
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    };
    format!(
        "--- gateway log ---\n{}\n--- agent log ---\n{}",
        tail(stack.gateway().log()),
        tail(agent.log())
    )
}

/// The text of every output of the first cell, joined.
async fn first_cell_output(browser: &Browser) -> anyhow::Result<String> {
    let mut text = String::new();
    let selector = format!("{FIRST_CELL} .jp-OutputArea-output");
    for output in browser.client.find_all(Locator::Css(&selector)).await? {
        text.push_str(&output.text().await?);
    }
    Ok(text)
}

/// Shift+Enter in the first cell's editor.
async fn run_first_cell(browser: &Browser) -> anyhow::Result<()> {
    let editor = browser.click(&format!("{FIRST_CELL} .cm-content")).await?;
    editor
        .send_keys(&format!("{}{}", Key::Shift, Key::Enter))
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_user_opens_a_project_from_my_projects_and_runs_a_cell_in_lab() {
    // Warned an hour ahead, the sign-up grant's 30 minutes show Lab's banner.
    let warn_early = vec![(
        "OPENCLOUD_CONTROL__BILLING__WARNING_SECONDS".to_owned(),
        "3600".to_owned(),
    )];
    let stack = TestStack::with_gateway_env(warn_early).await.unwrap();
    opens_a_project_and_runs_a_cell(stack, true).await
}

/// The same on https, Chromium trusting the gateway's test CA: TLS as
/// users will use it (HTTP/2 for pages, a WebSocket over TLS for the kernel).
#[tokio::test(flavor = "multi_thread")]
async fn the_same_over_https() {
    opens_a_project_and_runs_a_cell(TestStack::with_gateway_tls().await.unwrap(), false).await
}

/// `balance_banner`: whether Lab must show the compute-time banner (or
/// must not, with the default warning and a fresh sign-up grant).
async fn opens_a_project_and_runs_a_cell(stack: TestStack, balance_banner: bool) {
    let owner = stack.host_owner().await;
    let [(host, agent)] = stack.online_hosts(&owner, [("desk-pc", 2)]).await;
    let platform = stack.gateway().platform();
    let ca = stack.gateway().tls.as_ref().map(|tls| tls.ca.pem());
    let browser = Browser::start_trusting(ca.as_deref()).await.unwrap();

    // A new customer signs up and logs in on the platform's pages.
    let email = format!("{}@example.com", unique("lab"));
    browser.goto(&format!("{platform}/register")).await.unwrap();
    browser
        .submit_register("Ada Lovelace", &email, PASSWORD)
        .await
        .unwrap();
    browser.wait_for_path("/login").await.unwrap();
    browser.submit_login(&email, PASSWORD).await.unwrap();
    browser.wait_for_path("/projects").await.unwrap();

    // A project on My projects.
    browser.submit_new_project("Engine notes").await.unwrap();
    let entry = browser.wait_for("li.project").await.unwrap();
    let id = entry.attr("data-project-id").await.unwrap().unwrap();
    assert_eq!(
        browser.text("li.project h3 a").await.unwrap(),
        "Engine notes"
    );

    // Open: the ticket redirect, the starting page, then Lab. The redirect
    // can reach the gateway before the session's route does; the gateway
    // must then show its self-reloading starting page, never the "no
    // session at this address" 404 a user would be stuck on.
    let lab_page_at = Cell::new(None);
    let clicked = Instant::now();
    browser
        .click(&format!(
            "li.project form[action='/projects/{id}/open'] button[type=submit]"
        ))
        .await
        .unwrap();
    let (sid, _) = shows(
        &browser,
        "JupyterLab's launcher on the session origin",
        Duration::from_secs(120),
        || async {
            let url = browser.client.current_url().await?;
            let Some(sid) = url
                .host_str()
                .and_then(|h| h.strip_suffix(".nb.localhost"))
                .map(str::to_owned)
            else {
                return Ok(None);
            };
            if url.path() != "/lab" {
                return Ok(None);
            }
            if browser.count(NOTEBOOK_CARD).await? > 0 {
                return Ok(Some(sid));
            }
            let source = browser.page_source().await?;
            if lab_page_at.get().is_none() && source.contains("jupyter-config-data") {
                lab_page_at.set(Some(clicked.elapsed()));
            }
            assert!(
                !source.contains(NO_ROUTE),
                "the gateway answered 404 for a session the user just entered"
            );
            Ok(None)
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", tails(&stack, &agent)));
    let to_lab = clicked.elapsed();
    let url = browser.client.current_url().await.unwrap();
    assert_eq!(
        url.port(),
        Some(stack.gateway().port),
        "Lab is served through the gateway"
    );
    assert_eq!(url.scheme(), stack.gateway().scheme());
    let (session_host, state) = stack.session_row(&sid).await;
    assert_eq!(session_host, host);
    assert_eq!(state, "running");

    // Lab's page carries its config, but no credential: there is no
    // server token, and the host's link key never leaves the host.
    let source = browser.page_source().await.unwrap();
    assert!(source.contains("jupyter-config-data"), "not Lab's page");
    let link_key = agent.link_key();
    assert!(
        !source.contains(&link_key),
        "the host's link key reached the browser"
    );
    assert!(
        !source.contains("data-jupyter-api-token"),
        "a server token reached the browser"
    );

    // A notebook from the launcher; the cell is usable once the kernel is idle.
    browser.click(NOTEBOOK_CARD).await.unwrap();
    shows(
        &browser,
        "the new notebook's first cell with an idle kernel",
        Duration::from_secs(60),
        || async {
            let ready = browser.count(&format!("{FIRST_CELL} .cm-content")).await? > 0
                && browser.count(KERNEL_IDLE).await? > 0;
            Ok(ready.then_some(()))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", tails(&stack, &agent)));
    let usable = clicked.elapsed();
    println!(
        "click Open → Lab's page: {:?}; → Lab's launcher: {to_lab:?}; → first cell usable: {usable:?}",
        lab_page_at.get().unwrap_or(to_lab)
    );

    let editor = browser
        .click(&format!("{FIRST_CELL} .cm-content"))
        .await
        .unwrap();
    editor.send_keys("print(6*7)").await.unwrap();
    assert_eq!(editor.text().await.unwrap(), "print(6*7)");

    // Lab now and then drops an execution sent while its kernel connection
    // settles: run the cell again if nothing came back.
    let mut runs = 0;
    let output = loop {
        runs += 1;
        run_first_cell(&browser).await.unwrap();
        let started = Instant::now();
        let mut output = String::new();
        while started.elapsed() < Duration::from_secs(15) && output.is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
            output = first_cell_output(&browser).await.unwrap_or_default();
        }
        if !output.is_empty() || runs == 3 {
            break output;
        }
        println!("no output after run {runs}; running the cell again");
    };
    assert_eq!(output.trim(), "42", "after {runs} run(s)");
    println!(
        "print(6*7) → 42 after {runs} run(s); click → output: {:?}",
        clicked.elapsed()
    );
    // Lab sent its own Origin with every change and WebSocket: none refused.
    // (Every reason is there from the start, at 0.)
    let metrics = Exposition::parse(&stack.gateway().metrics().await).unwrap();
    let refused: Vec<_> = metrics
        .family("opencloud_gateway_origin_refusals_total")
        .filter(|s| s.value > 0.0)
        .collect();
    assert!(
        refused.is_empty(),
        "Lab was refused for its Origin: {refused:?}"
    );

    // The gateway's banner in Lab, only while the balance runs out soon.
    if balance_banner {
        let banner = browser.wait_for("#oc-balance-banner").await.unwrap();
        let text = banner.text().await.unwrap();
        assert!(
            text.contains("runs out") && text.contains("Buy compute time"),
            "{text}"
        );
        println!("Lab's banner: {text:?}");
    } else {
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(
            browser.count("#oc-balance-banner").await.unwrap(),
            0,
            "a banner without cause"
        );
    }

    // Back on the platform, My projects shows the session running.
    browser.goto(&format!("{platform}/projects")).await.unwrap();
    let badge = browser
        .wait_for(&format!(
            "li.project[data-project-id='{id}'] .badge[data-session-state]"
        ))
        .await
        .unwrap();
    assert_eq!(
        badge.attr("data-session-state").await.unwrap().as_deref(),
        Some("running")
    );
    assert!(agent.session_pid(&sid).is_some(), "{}", agent.log());
    browser.close().await;
}
