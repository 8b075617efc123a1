#![allow(clippy::unwrap_used)]
//! Hosts and sessions end to end: real agents registered with their
//! HostKeys, control placing sessions, real Jupyter servers, and the
//! gateway in front. Times that have deadlines are polled with generous
//! slack and printed.

use std::time::{Duration, Instant};

use opencloud_e2e::agents::eventually;
use opencloud_e2e::kernel;
use opencloud_e2e::sessions::{open, wait_running};
use opencloud_e2e::{listed, TestStack, TestUser};
use reqwest::StatusCode;
use serde_json::json;

/// Like [`open`], and the session must be placed on `host` (`why`).
async fn open_on(
    stack: &TestStack,
    user: &TestUser,
    project: u64,
    host: u64,
    why: &str,
) -> (String, String) {
    let (sid, url) = open(user, project).await;
    assert_eq!(stack.session_row(&sid).await.0, host, "{why}");
    (sid, url)
}

/// The owner takes `host` out of placement (`true`) or back in.
async fn set_draining(owner: &TestUser, host: u64, draining: bool) {
    owner
        .post_json(
            &format!("/api/v1/hosts/{host}/drain"),
            json!({"draining": draining}),
        )
        .await;
}

async fn wait_state(stack: &TestStack, sid: &str, wanted: &str, limit: Duration) -> Duration {
    let (_, took) = eventually(
        &format!("session {sid} becoming {wanted}"),
        limit,
        || async { (stack.session_row(sid).await.1 == wanted).then_some(()) },
    )
    .await;
    took
}

/// A browser that entered one session: its client, the session's origin
/// and the `oc_s` cookie the ticket gave it.
struct Entered {
    client: reqwest::Client,
    origin: String,
    cookie: String,
}

impl Entered {
    /// Follows the ticket URL, as the browser does after Open.
    async fn new(stack: &TestStack, sid: &str, url: &str) -> Self {
        Self {
            client: stack.gateway().client(&[sid], false),
            origin: stack.gateway().session_origin(sid),
            cookie: stack.follow_ticket(sid, url).await,
        }
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.client
            .request(method, format!("{}{path}", self.origin))
            .header("cookie", &self.cookie)
    }

    async fn get(&self, path: &str) -> reqwest::Response {
        self.request(reqwest::Method::GET, path)
            .send()
            .await
            .unwrap()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_project_opens_on_the_least_loaded_host_and_runs_code_through_the_gateway() {
    let stack = TestStack::with_gateway().await.unwrap();
    let owner = stack.host_owner().await;
    let [(host_a, _agent_a), (host_b, agent_b)] = stack
        .online_hosts(&owner, [("host-a", 4), ("host-b", 2)])
        .await;

    // host-b drains: both sessions go to host-a.
    set_draining(&owner, host_b, true).await;
    let alice = stack.new_user().await;
    let mut on_a = Vec::new();
    for n in 0..2 {
        let project = alice.create_project(&format!("Project {n}")).await;
        let started = Instant::now();
        let (sid, _) = open_on(
            &stack,
            &alice,
            project,
            host_a,
            "a draining host gets no sessions",
        )
        .await;
        let took = wait_running(&stack, &sid).await;
        println!(
            "open → ready on host-a: {:?} (placement answered in {:?})",
            took,
            started.elapsed() - took
        );
        on_a.push(sid);
    }
    // Opening a running project again returns the same session.
    let (again, _) = open(&alice, {
        let (_, body) = alice.get("/api/v1/projects").await;
        body["projects"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["session"]["sid"] == on_a[0].as_str())
            .unwrap()["id"]
            .as_u64()
            .unwrap()
    })
    .await;
    assert_eq!(again, on_a[0]);

    // host-b back in service: with host-a holding two sessions, it gets the next.
    set_draining(&owner, host_b, false).await;
    let project = alice.create_project("Analysis").await;
    let opened_at = Instant::now();
    let (sid, url) = open_on(&stack, &alice, project, host_b, "the least-loaded host").await;

    // Entering at once lands on the "starting" page, then on Lab.
    let entered = Entered::new(&stack, &sid, &url).await;
    let (_, took) = eventually(
        "Lab through the gateway",
        Duration::from_secs(90),
        || async {
            let r = entered
                .request(reqwest::Method::GET, "/lab")
                .header("accept", "text/html")
                .send()
                .await
                .unwrap();
            let status = r.status();
            let body = r.text().await.unwrap();
            (status == StatusCode::OK && body.contains("jupyter-config-data")).then_some(body)
        },
    )
    .await;
    println!(
        "click → Lab page through the gateway: {:?}",
        opened_at.elapsed().max(took)
    );
    // On host-b, whose link key never leaves it.
    let link_key = agent_b.link_key();
    let lab = entered.get("/lab").await.text().await.unwrap();
    assert!(
        !lab.contains(&link_key) && !lab.contains("data-jupyter-api-token"),
        "a credential reached the browser"
    );
    let contents = entered.get("/api/contents").await;
    assert_eq!(contents.status(), StatusCode::OK);
    assert!(!contents.text().await.unwrap().contains(&link_key));

    // A kernel through the gateway's WebSocket.
    let ws = kernel::start(&entered.client, &entered.origin, &entered.cookie)
        .await
        .unwrap();
    let out = kernel::execute(&ws, stack.gateway().addr(), &entered.cookie, "print(6*7)")
        .await
        .unwrap();
    assert_eq!(out.trim(), "42");

    // Someone else, even knowing the sid, gets 404.
    let mallory = stack.new_user().await;
    let r = entered
        .client
        .get(format!("{}/api/contents", entered.origin))
        .bearer_auth(&mallory.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let (status, _) = mallory
        .post(&format!("/api/v1/sessions/{sid}/stop"), json!({}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // My hosts shows the load.
    let (_, hosts) = owner.get("/api/v1/hosts").await;
    let a = listed(&hosts, "hosts", host_a).unwrap().clone();
    assert_eq!(a["sessions"], 2);
    assert_eq!(a["state"], "online");

    // Stop: the port is freed and no process of the session is left.
    let pid = agent_b
        .session_pid(&sid)
        .expect("the agent records the server");
    let (status, body) = alice
        .post(&format!("/api/v1/sessions/{sid}/stop"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let took = wait_state(&stack, &sid, "stopped", Duration::from_secs(60)).await;
    println!("stop → stopped: {took:?}");
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "the Jupyter server {pid} is still running"
    );
    let r = entered.get("/lab").await;
    assert_eq!(
        r.status(),
        StatusCode::GONE,
        "a stopped session gets its page"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_host_loses_its_sessions_and_the_project_reopens_elsewhere() {
    let stack = TestStack::with_gateway().await.unwrap();
    let owner = stack.host_owner().await;
    let [(_, mut agent_a), (host_b, _agent_b)] = stack
        .online_hosts(&owner, [("host-a", 2), ("host-b", 2)])
        .await;
    // Only host-a takes the first session.
    set_draining(&owner, host_b, true).await;
    let alice = stack.new_user().await;
    let project = alice.create_project("Thesis").await;
    let (sid, url) = open(&alice, project).await;
    wait_running(&stack, &sid).await;
    let entered = Entered::new(&stack, &sid, &url).await;
    set_draining(&owner, host_b, false).await;

    agent_a.kill_hard();
    let killed = Instant::now();
    let took = wait_state(&stack, &sid, "lost", Duration::from_secs(60)).await;
    println!("host killed → its session marked lost: {took:?}");
    // The gateway shows the host-lost page at once.
    let (_, took) = eventually("the lost page", Duration::from_secs(30), || async {
        let r = entered.get("/lab").await;
        (r.status() == StatusCode::GONE).then_some(())
    })
    .await;
    let asked = Instant::now();
    let r = entered.get("/lab").await;
    assert_eq!(r.status(), StatusCode::GONE);
    assert!(r.text().await.unwrap().contains("went offline"));
    println!(
        "lost page: seen {:?} after the kill, answered in {:?}",
        killed.elapsed() - took.min(killed.elapsed()),
        asked.elapsed()
    );
    // My projects tells the user; reopening lands on host-b.
    let (_, projects) = alice.get("/api/v1/projects").await;
    let p = &projects["projects"][0];
    assert_eq!(p["session"]["state"], "lost");
    assert!(p["session"]["ended_because"]
        .as_str()
        .unwrap()
        .contains("offline"));
    let (again, _) = open_on(&stack, &alice, project, host_b, "the host still online").await;
    assert_ne!(again, sid);
    wait_running(&stack, &again).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_opens_and_bad_agents_get_clear_answers() {
    let stack = TestStack::with_gateway().await.unwrap();
    let owner = stack.host_owner().await;
    let alice = stack.new_user().await;
    let bob = stack.new_user().await;
    let project = alice.create_project("Private").await;

    // Someone else's project: 404, like a missing one.
    let (status, body) = bob
        .post(&format!("/api/v1/projects/{project}/open"), json!({}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    // No host at all: the open waits in the queue for one, never a 500.
    let (status, body) = alice
        .post(&format!("/api/v1/projects/{project}/open"), json!({}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(
        (body["state"].clone(), body["position"].clone()),
        (json!("queued"), json!(1))
    );
    // A deleted project.
    let (status, _) = alice.delete(&format!("/api/v1/projects/{project}")).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, body) = alice
        .post(&format!("/api/v1/projects/{project}/open"), json!({}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("deleted"));
    // Customers cannot add hosts.
    let (status, _) = alice.post("/api/v1/hosts", json!({"name": "mine"})).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, body) = owner.post("/api/v1/hosts", json!({"name": "  "})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["error"]["field"], "name");

    // A key no host has: exit 2, nothing started.
    let mut agent = stack.start_agent("ochk_not-a-real-key-at-all-0000000000000000000", 1);
    assert_eq!(
        agent.wait_exit(Duration::from_secs(30)),
        Some(2),
        "{}",
        agent.log()
    );
    assert!(
        agent.log().to_lowercase().contains("hostkey") || agent.log().contains("host key"),
        "{}",
        agent.log()
    );
    // A revoked host's key: exit 2 with a message saying so.
    let (host, key) = stack.add_host(&owner, "old-pc").await;
    let (status, _) = owner
        .post(&format!("/api/v1/hosts/{host}/revoke"), json!({}))
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let mut agent = stack.start_agent(&key, 1);
    assert_eq!(
        agent.wait_exit(Duration::from_secs(30)),
        Some(2),
        "{}",
        agent.log()
    );
    assert!(agent.log().contains("revoked"), "{}", agent.log());
    // A malformed config names the key.
    let mut agent = stack.start_agent(&key, 1);
    agent.wait_exit(Duration::from_secs(30));
    let config = std::fs::read_to_string(&agent.config_path).unwrap();
    std::fs::write(
        &agent.config_path,
        config.replace("[capacity]", "colour = \"blue\"\n[capacity]"),
    )
    .unwrap();
    let out = std::process::Command::new(opencloud_e2e::binary("opencloud-agent"))
        .arg("--config")
        .arg(&agent.config_path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("colour"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_session_is_stopped_and_its_owner_told_why_while_a_used_one_lives_on() {
    let stack = TestStack::with_gateway_env(vec![(
        "OPENCLOUD_CONTROL__SESSIONS__IDLE_TIMEOUT_SECONDS".into(),
        "10".into(),
    )])
    .await
    .unwrap();
    let owner = stack.host_owner().await;
    let [(_, _agent)] = stack.online_hosts(&owner, [("host-a", 2)]).await;
    let alice = stack.new_user().await;
    let project = alice.create_project("Forgotten").await;
    let (sid, _) = open(&alice, project).await;
    let used_project = alice.create_project("In use").await;
    let (used_sid, used_url) = open(&alice, used_project).await;
    wait_running(&stack, &sid).await;
    wait_running(&stack, &used_sid).await;
    // The other one is used through the gateway every second, with no
    // kernel running: the gateway's usage reports alone must keep it.
    let used = Entered::new(&stack, &used_sid, &used_url).await;
    let traffic = tokio::spawn(async move {
        loop {
            assert_eq!(used.get("/api/status").await.status(), StatusCode::OK);
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    // Nobody uses the first: no traffic through the gateway, no kernel.
    let took = wait_state(&stack, &sid, "stopped", Duration::from_secs(90)).await;
    println!("idle timeout 10 s: stopped {took:?} after it became ready");
    assert!(
        took >= Duration::from_secs(8),
        "stopped before it was idle: {took:?}"
    );
    // Two more timeouts' worth of traffic, and the used one still runs.
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert!(
        !traffic.is_finished(),
        "requests to the used session failed"
    );
    traffic.abort();
    assert_eq!(stack.session_row(&used_sid).await.1, "running");
    let mut conn = stack.db.conn().await;
    let reason: Option<String> = mysql_async::prelude::Queryable::exec_first(
        &mut conn,
        "SELECT end_reason FROM sessions WHERE sid = ?",
        (&sid,),
    )
    .await
    .unwrap();
    assert_eq!(reason.as_deref(), Some("idle"));
    let (_, projects) = alice.get("/api/v1/projects").await;
    let forgotten = listed(&projects, "projects", project).unwrap();
    let why = forgotten["session"]["ended_because"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(why.contains("without activity"), "{why}");
}

/// A sample of the agent's `/metrics` (0 when it is not there).
async fn agent_metric(agent: &opencloud_e2e::agents::AgentProcess, name: &str) -> f64 {
    let text = agent.metrics().await;
    opencloud_e2e::exposition::Exposition::parse(&text)
        .unwrap()
        .value(name, &[])
        .unwrap_or(0.0)
}

#[tokio::test]
async fn an_open_binds_the_hosts_warm_server_and_a_draining_host_keeps_none() {
    let stack = TestStack::with_gateway().await.unwrap();
    let owner = stack.host_owner().await;
    let (host, key) = stack.add_host(&owner, "warm").await;
    let agent = stack.start_agent_with_warm_pool(&key, 2, 1);
    stack.wait_placeable(host).await;
    let warm_servers = |wanted: f64| {
        let agent = &agent;
        move || async move {
            (agent_metric(agent, "opencloud_agent_warm_servers").await == wanted).then_some(())
        }
    };
    let (_, took) = eventually("a warm server", Duration::from_secs(60), warm_servers(1.0)).await;
    println!("warm server ready {took:?} after the host was placeable");
    // The heartbeat carries it to control.
    eventually(
        "control hearing of the warm server",
        Duration::from_secs(10),
        || async {
            let n = stack
                .db
                .count(&format!("hosts WHERE id = {host} AND warm_servers = 1"))
                .await;
            (n == 1).then_some(())
        },
    )
    .await;

    let alice = stack.new_user().await;
    let project = alice.create_project("Warm").await;
    let (sid, _) = open(&alice, project).await;
    let took = wait_running(&stack, &sid).await;
    println!("open → running on a warm server: {took:?}");
    // Its state file is the warm server's, naming the session.
    let pid = agent.session_pid(&sid).expect("the bound server's pid");
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    assert_eq!(
        agent_metric(&agent, "opencloud_agent_warm_binds_total").await,
        1.0
    );
    assert_eq!(
        agent_metric(&agent, "opencloud_agent_warm_bind_failures_total").await,
        0.0
    );
    // A replacement, within the host's two slots.
    eventually(
        "a new warm server",
        Duration::from_secs(60),
        warm_servers(1.0),
    )
    .await;

    // Draining: the idle warm server goes, and comes back after.
    set_draining(&owner, host, true).await;
    eventually(
        "no warm server while draining",
        Duration::from_secs(30),
        warm_servers(0.0),
    )
    .await;
    set_draining(&owner, host, false).await;
    eventually(
        "a warm server again",
        Duration::from_secs(60),
        warm_servers(1.0),
    )
    .await;
}
