#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test
//! The host link, tried as an attacker would: hosts presenting certificates
//! for another host, expired or from another CA, an old certificate after
//! its HostKey was rotated, a host lying about where it is (control's own
//! internal listener), clients without a gateway's certificate at a real
//! agent's link port, addresses no stranger's host may advertise, a host
//! CA key others can read, and Jupyter's own XSRF check, which stays on now
//! that no token is injected. Renewals and revocations move the pin.
//! And the plain case: a session on a real agent serves `/api/status` and a
//! kernel WebSocket through the link.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use opencloud_control::host_ca::{Holder, HostCa, Issued};
use opencloud_e2e::external::{record_host_and_session, register_external_with, External};
use opencloud_e2e::hosts::agent_hello;
use opencloud_e2e::jupyter::{JupyterServer, XSRF};
use opencloud_e2e::stack::Target;
use opencloud_e2e::upstream::{capture_upstream, loopback};
use opencloud_e2e::{
    kernel, sessions, set_mode, unique, Control, ControlOptions, TestDatabase, TestStack, TestUser,
};
use opencloud_protocol::agent::{AgentSession, AgentSessionState};
use opencloud_protocol::link::{certificate_request, new_private_key, CertFingerprint};
use opencloud_protocol::routes::new_sid;
use reqwest::StatusCode;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use serde_json::json;

/// Waits until the gateway knows session `sid`'s route (anything but 404).
async fn wait_for_route(stack: &TestStack, user: &TestUser, sid: &str) {
    let gateway = stack.gateway();
    let client = gateway.client(&[sid], false);
    let started = Instant::now();
    loop {
        let r = client
            .get(format!("{}/", gateway.session_origin(sid)))
            .bearer_auth(&user.token)
            .send()
            .await
            .unwrap();
        if r.status() != StatusCode::NOT_FOUND {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the route never reached the gateway"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A session of `user` on a stand-in host serving `target` with the link
/// certificate `issue` makes (and the route table pins), once the gateway
/// knows its route.
async fn stand_in(
    stack: &TestStack,
    user: &TestUser,
    target: Target,
    issue: impl FnOnce(u64, &str) -> anyhow::Result<Issued>,
) -> External {
    let project = user.create_project("Stand-in").await;
    let pool = mysql_async::Pool::new(stack.db.url.as_str());
    let external = register_external_with(&pool, user.id, project, target, issue)
        .await
        .unwrap();
    pool.disconnect().await.unwrap();
    wait_for_route(stack, user, external.sid()).await;
    external
}

/// `GET /api/contents?secret-query` through the gateway: refused (a 5xx
/// page, or the connection ended) or the upstream's answer.
async fn refused(stack: &TestStack, user: &TestUser, sid: &str) -> bool {
    let answer = stack
        .gateway()
        .client(&[sid], false)
        .get(format!(
            "{}/api/contents?secret-query",
            stack.gateway().session_origin(sid)
        ))
        .bearer_auth(&user.token)
        .send()
        .await;
    match answer {
        Ok(r) => r.status().is_server_error(),
        Err(e) => !e.is_builder(),
    }
}

/// Requests through the gateway to a host presenting what `issue` makes:
/// each is refused, none reaches the upstream, and the gateway counts the
/// refusal under `reason`.
async fn no_traffic_to(
    issue: impl FnOnce(&HostCa, u64, &str) -> anyhow::Result<Issued>,
    reason: &str,
) {
    let stack = TestStack::with_gateway().await.unwrap();
    let user = stack.new_user().await;
    let (port, captured) = capture_upstream().await;
    let ca = stack.host_ca();
    let external = stand_in(&stack, &user, loopback(port), |host, csr| {
        issue(&ca, host, csr)
    })
    .await;
    for _ in 0..3 {
        assert!(refused(&stack, &user, external.sid()).await);
    }
    assert_eq!(
        captured.forwarded(port),
        Vec::<String>::new(),
        "a request reached the host"
    );
    refusals_counted(&stack, reason).await;
}

/// Waits until the gateway's metrics count link refusals for `reason`.
async fn refusals_counted(stack: &TestStack, reason: &str) {
    let line = format!("opencloud_gateway_host_link_refusals_total{{reason=\"{reason}\"}}");
    let started = Instant::now();
    loop {
        let metrics = stack.gateway().metrics().await;
        if metrics.lines().any(|l| l.starts_with(&line)) {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no refusal counted as {reason}:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Attack: a host serves a genuine certificate control issued to another
/// host (its owner's other machine, or one it stole), pinned as its own.
#[tokio::test]
async fn a_host_presenting_a_certificate_for_another_host_gets_no_traffic() {
    no_traffic_to(
        |ca, host, csr| {
            Ok(ca.issue(
                Holder::Host(host + 1000),
                csr,
                opencloud_control::now_unix(),
            )?)
        },
        "wrong_host",
    )
    .await;
}

/// Attack: a host serves its own certificate after it ran out.
#[tokio::test]
async fn a_host_presenting_an_expired_certificate_gets_no_traffic() {
    no_traffic_to(
        |ca, host, csr| {
            let now = opencloud_control::now_unix();
            Ok(ca.issue_for(Holder::Host(host), csr, now - 2 * 86_400, now - 86_400)?)
        },
        "expired",
    )
    .await;
}

/// Attack: a host makes its own CA and a certificate naming it correctly.
#[tokio::test]
async fn a_host_presenting_a_certificate_not_from_the_host_ca_gets_no_traffic() {
    let own_ca_dir = std::env::temp_dir().join(unique("oc-e2e-mallory-ca-"));
    std::fs::create_dir_all(&own_ca_dir).unwrap();
    let own_ca = HostCa::open(&own_ca_dir, opencloud_control::now_unix()).unwrap();
    no_traffic_to(
        |_, host, csr| Ok(own_ca.issue(Holder::Host(host), csr, opencloud_control::now_unix())?),
        "unknown_ca",
    )
    .await;
    std::fs::remove_dir_all(&own_ca_dir).unwrap();
}

/// Attack: a host keeps serving with the certificate it had before its
/// owner rotated the HostKey (a stolen machine keeps its files). The
/// rotation unpins it at once; when the host registers again with the new
/// key it gets a new certificate, and the old one, though valid, named
/// right and from the host CA, still gets nothing.
#[tokio::test]
async fn after_a_hostkey_rotation_the_old_certificate_gets_no_traffic() {
    let stack = TestStack::with_gateway().await.unwrap();
    let owner = stack.host_owner().await;
    let (port, captured) = capture_upstream().await;
    let ca = stack.host_ca();
    let external = stand_in(&stack, &owner, loopback(port), |host, csr| {
        Ok(ca.issue(Holder::Host(host), csr, opencloud_control::now_unix())?)
    })
    .await;
    let (sid, host) = (external.sid().to_owned(), external.session.host);
    assert!(!refused(&stack, &owner, &sid).await, "served before");
    assert!(!captured.forwarded(port).is_empty());

    let rotated = owner
        .post_json(&format!("/api/v1/hosts/{host}/key"), json!({}))
        .await;
    let new_key = rotated["host_key"].as_str().unwrap().to_owned();
    let started = Instant::now();
    while !refused(&stack, &owner, &sid).await {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the gateway kept trusting the old certificate"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "old certificate refused {:?} after the rotation",
        started.elapsed()
    );
    // What the gateway sent before the rotation reached it was fine.
    let served = captured.forwarded(port).len();

    // The host registers again with the new key, listing its session.
    let mut hello = agent_hello("127.0.0.1");
    hello.link_port = external.link_addr.port();
    hello.sessions = vec![AgentSession {
        sid: sid.clone(),
        state: AgentSessionState::Running,
        started_at: opencloud_control::now_unix(),
        last_activity: None,
        busy_kernels: 0,
    }];
    let (status, body) = stack
        .post_as_agent(
            &new_key,
            "/agent/v1/register",
            &serde_json::to_value(&hello).unwrap(),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let pinned = pinned(&stack, host).await;
    assert!(pinned.is_some() && pinned != Some(external.issued.fingerprint));
    // Once the gateway has the new pin, the host is routed again: to the
    // new certificate only.
    let started = Instant::now();
    loop {
        assert!(refused(&stack, &owner, &sid).await);
        let metrics = stack.gateway().metrics().await;
        if metrics.contains(r#"opencloud_gateway_host_link_refusals_total{reason="not_pinned"}"#) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the old certificate was never refused for its pin:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        captured.forwarded(port).len(),
        served,
        "a request reached the host after the rotation"
    );
}

/// The pin control holds for host `host`.
async fn pinned(stack: &TestStack, host: u64) -> Option<CertFingerprint> {
    let mut conn = stack.db.conn().await;
    let pin: Option<Option<String>> = mysql_async::prelude::Queryable::exec_first(
        &mut conn,
        "SELECT link_cert_sha256 FROM hosts WHERE id = ?",
        (host,),
    )
    .await
    .unwrap();
    pin.flatten().and_then(|p| CertFingerprint::parse(&p))
}

/// Attack: a host owner advertises control's internal listener (on the
/// gateway's loopback) as their host's link and hopes the gateway fetches
/// control's `/metrics` and internal API for them.
#[tokio::test]
async fn a_host_claiming_controls_internal_port_gets_nothing_from_control() {
    let stack = TestStack::with_gateway().await.unwrap();
    let mallory = stack.new_user().await;
    let internal: SocketAddr = stack
        .control()
        .internal
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    let project = mallory.create_project("Claimed").await;
    let pool = mysql_async::Pool::new(stack.db.url.as_str());
    let ca = stack.host_ca();
    let csr = certificate_request(&new_private_key().unwrap()).unwrap();
    let (session, _) = record_host_and_session(&pool, mallory.id, project, internal, |host| {
        Ok(ca.issue(Holder::Host(host), &csr, opencloud_control::now_unix())?)
    })
    .await
    .unwrap();
    pool.disconnect().await.unwrap();
    let sid = session.sid;
    wait_for_route(&stack, &mallory, &sid).await;
    let origin = stack.gateway().session_origin(&sid);
    let client = stack.gateway().client(&[&sid], false);
    for path in [
        "/metrics",
        "/internal/v1/routes/watch?since=0",
        "/healthz",
        "/",
    ] {
        let r = client
            .get(format!("{origin}{path}"))
            .bearer_auth(&mallory.token)
            .send()
            .await
            .unwrap();
        let status = r.status();
        let body = r.text().await.unwrap();
        println!("{path}: {status}");
        assert!(status.is_server_error(), "{path} answered {status}: {body}");
        for secret in ["opencloud_", "snapshot", "\"version\"", "gateway_key"] {
            assert!(!body.contains(secret), "{path} leaked {secret}: {body}");
        }
    }
    let metrics = stack.gateway().metrics().await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("opencloud_gateway_host_link_refusals_total")),
        "the refused handshakes are counted:\n{metrics}"
    );
}

/// A certificate and its key, PEM.
struct Credential {
    certificate: String,
    key: String,
}

/// A certificate control's CA issues `holder` for a fresh key.
fn credential(ca: &HostCa, holder: Holder) -> Credential {
    let key = new_private_key().unwrap();
    let csr = certificate_request(&key).unwrap();
    let issued = ca
        .issue(holder, &csr, opencloud_control::now_unix())
        .unwrap();
    Credential {
        certificate: issued.certificate.certificate,
        key,
    }
}

/// Dials a host link at `addr` as a gateway would, trusting only `ca`,
/// presenting `client` (if any), asking for session `sid` of host `host`;
/// what came back to one request, or why nothing did.
async fn dial_link(
    addr: SocketAddr,
    ca: &HostCa,
    client: Option<&Credential>,
    host: u64,
    sid: &str,
) -> Result<String, String> {
    let client = client.map(|c| (c.certificate.as_str(), c.key.as_str()));
    let request = b"GET /api/status HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n";
    opencloud_agent::host_link::dial(addr, ca.certificate(), client, (sid, host), request).await
}

/// A real agent, registered and placeable: its host id and link address.
async fn agent_link(stack: &TestStack) -> (u64, SocketAddr, opencloud_e2e::agents::AgentProcess) {
    let owner = stack.host_owner().await;
    let [(host, agent)] = stack.online_hosts(&owner, [("desk-pc", 1)]).await;
    (host, agent.link_addr(), agent)
}

/// Attack: something on the network dials a host's link port directly,
/// with no client certificate, to reach its sessions. The agent answers a
/// gateway's certificate (a 503 for a session it does not run) and gives a
/// client without one nothing.
#[tokio::test]
async fn a_client_without_a_gateway_certificate_gets_nothing_from_an_agent() {
    let stack = TestStack::with_gateway().await.unwrap();
    let (host, addr, _agent) = agent_link(&stack).await;
    let ca = stack.host_ca();
    let sid = new_sid();
    let gateway = credential(&ca, Holder::Gateway);
    let answer = dial_link(addr, &ca, Some(&gateway), host, &sid).await;
    assert!(
        answer
            .as_deref()
            .is_ok_and(|a| a.starts_with("HTTP/1.1 503")),
        "a gateway's certificate opens the link: {answer:?}"
    );
    let answer = dial_link(addr, &ca, None, host, &sid).await;
    assert!(answer.is_err(), "no certificate: {answer:?}");
}

/// Attack: a host owner uses their host's own certificate (issued by
/// control, valid, from the host CA) as a client at another host's link,
/// or at its own, to play gateway. Host certificates are serverAuth only
/// and name a host, never the gateway.
#[tokio::test]
async fn a_hosts_own_certificate_used_as_a_client_gets_nothing_from_an_agent() {
    let stack = TestStack::with_gateway().await.unwrap();
    let (host, addr, _agent) = agent_link(&stack).await;
    let ca = stack.host_ca();
    for holder in [Holder::Host(host), Holder::Host(host + 1)] {
        let answer = dial_link(addr, &ca, Some(&credential(&ca, holder)), host, &new_sid()).await;
        assert!(answer.is_err(), "{holder:?} as a client: {answer:?}");
    }
}

/// The plain case through a real agent: Open places the session, the
/// agent's certificate is pinned, and `/api/status` and a kernel WebSocket
/// answer through the gateway's mutual TLS link.
#[tokio::test(flavor = "multi_thread")]
async fn a_session_serves_its_status_and_a_kernel_websocket_through_the_link() {
    let stack = TestStack::with_gateway().await.unwrap();
    let (host, _, _agent) = agent_link(&stack).await;
    assert!(
        pinned(&stack, host).await.is_some(),
        "registration pinned a certificate"
    );
    let user = stack.new_user().await;
    let project = user.create_project("Linked").await;
    let (sid, url) = sessions::open(&user, project).await;
    sessions::wait_running(&stack, &sid).await;
    let cookie = stack.follow_ticket(&sid, &url).await;
    let gateway = stack.gateway();
    let origin = gateway.session_origin(&sid);
    let client = gateway.client(&[&sid], false);
    let status = client
        .get(format!("{origin}/api/status"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(status.status(), StatusCode::OK);
    let status: serde_json::Value = status.json().await.unwrap();
    assert!(
        status.get("started").is_some(),
        "Jupyter's status: {status}"
    );
    let channels = kernel::start(&client, &origin, &cookie).await.unwrap();
    let out = kernel::execute(&channels, gateway.addr(), &cookie, "1+1")
        .await
        .unwrap();
    assert_eq!(out, "2");
    let metrics = gateway.metrics().await;
    assert!(
        !metrics.contains("opencloud_gateway_host_link_refusals_total"),
        "nothing was refused:\n{metrics}"
    );
}

/// Hosts may only advertise public addresses unless control allows private
/// ones; the refusal names the field and says why.
#[tokio::test]
async fn without_allow_private_hosts_only_public_addresses_register() {
    let stack = TestStack::control_only_with(ControlOptions {
        env: vec![(
            "OPENCLOUD_CONTROL__ALLOW_PRIVATE_HOSTS".into(),
            "false".into(),
        )],
        ..Default::default()
    })
    .await
    .unwrap();
    let owner = stack.host_owner().await;
    let (_, key) = stack.add_host(&owner, "lab-pc").await;
    for (address, why) in [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("10.0.0.1", "private"),
        ("192.168.1.20", "private"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("::ffff:127.0.0.1", "loopback"),
    ] {
        let hello = serde_json::to_value(agent_hello(address)).unwrap();
        let (status, body) = stack
            .post_as_agent(&key, "/agent/v1/register", &hello)
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{address}: {body}");
        assert_eq!(body["error"]["field"], "address", "{address}: {body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(why), "{address}: {body}");
    }
    let hello = serde_json::to_value(agent_hello("203.0.113.9")).unwrap();
    let (status, body) = stack
        .post_as_agent(&key, "/agent/v1/register", &hello)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let certificate = &body["link_certificate"];
    assert!(
        certificate["certificate"]
            .as_str()
            .is_some_and(|c| c.starts_with("-----BEGIN CERTIFICATE-----")),
        "the agent gets its link certificate: {body}"
    );
    assert_eq!(certificate["ca"], stack.host_ca().certificate());
}

/// A registration's certificate request must be one: signed by its key.
#[tokio::test]
async fn a_registration_without_a_valid_certificate_request_is_refused_naming_it() {
    let stack = TestStack::control_only().await.unwrap();
    let owner = stack.host_owner().await;
    let (host, key) = stack.add_host(&owner, "lab-pc").await;
    let mut hello = agent_hello("127.0.0.1");
    hello.link_csr =
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n".into();
    let (status, body) = stack
        .post_as_agent(
            &key,
            "/agent/v1/register",
            &serde_json::to_value(&hello).unwrap(),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["field"], "link_csr", "{body}");
    assert_eq!(pinned(&stack, host).await, None, "nothing was pinned");
}

/// Renewing through `/agent/v1/link-certificate` pins the new certificate
/// in the same step, and only a registered host has one to renew; revoking
/// the HostKey unpins it.
#[tokio::test]
async fn a_renewed_link_certificate_is_pinned_as_it_is_issued_and_a_revoke_unpins_it() {
    let stack = TestStack::control_only().await.unwrap();
    let owner = stack.host_owner().await;
    let (host, key) = stack.add_host(&owner, "lab-pc").await;
    let renew = serde_json::json!({
        "csr": certificate_request(&new_private_key().unwrap()).unwrap()
    });
    let (status, body) = stack
        .post_as_agent(&key, "/agent/v1/link-certificate", &renew)
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "not registered yet: {body}");
    let hello = serde_json::to_value(agent_hello("127.0.0.1")).unwrap();
    let (status, registered) = stack
        .post_as_agent(&key, "/agent/v1/register", &hello)
        .await;
    assert_eq!(status, StatusCode::OK, "{registered}");
    let first = pinned(&stack, host).await.unwrap();
    let (status, renewed) = stack
        .post_as_agent(&key, "/agent/v1/link-certificate", &renew)
        .await;
    assert_eq!(status, StatusCode::OK, "{renewed}");
    let leaf = CertificateDer::from_pem_slice(renewed["certificate"].as_str().unwrap().as_bytes())
        .unwrap();
    let second = pinned(&stack, host).await.unwrap();
    assert_eq!(second, CertFingerprint::of(&leaf));
    assert_ne!(second, first, "the old certificate is unpinned");

    let (status, _) = owner
        .post(&format!("/api/v1/hosts/{host}/revoke"), json!({}))
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(
        pinned(&stack, host).await,
        None,
        "a revoked host is unpinned"
    );
    let (status, body) = stack
        .post_as_agent(&key, "/agent/v1/link-certificate", &renew)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
}

/// Whoever reads control's host CA key can issue any host's or gateway's
/// certificate: control refuses to start, naming the file and its mode.
#[tokio::test]
async fn control_with_a_host_ca_key_others_can_read_refuses_to_start() {
    let db = TestDatabase::create().await.unwrap();
    let (dir, config, _, _) = Control::prepare(&db, &ControlOptions::default()).unwrap();
    HostCa::open(&dir, opencloud_control::now_unix()).unwrap();
    let key = dir.join(opencloud_control::host_ca::KEY_FILE);
    set_mode(&key, 0o640);
    let stderr = Control::refusal(&config);
    assert!(
        stderr.contains(&format!(
            "host CA key {} is readable by others (mode 0640); chmod 600 it",
            key.display()
        )),
        "{stderr}"
    );
}

/// Attack: a page on another session origin (same site) submits a form into
/// the victim's session. The gateway's Origin rule stops it first; behind it,
/// Jupyter's own XSRF check is on again (no token is injected): a change
/// without the `_xsrf` pair is refused by Jupyter itself.
#[tokio::test]
async fn jupyters_own_xsrf_check_guards_changes_behind_the_gateway() {
    let stack = TestStack::with_gateway().await.unwrap();
    let jupyter = JupyterServer::start().await.unwrap();
    let user = stack.new_user().await;
    let sid = stack
        .session_for(&user, Target::Unix(jupyter.socket.clone()))
        .await;
    let cookie = stack.enter(&user, &sid).await;
    let origin = stack.gateway().session_origin(&sid);
    let client = stack.gateway().client(&[&sid], false);
    let create = |with_xsrf: bool| {
        let mut request = client
            .post(format!("{origin}/api/contents"))
            .header("origin", &origin)
            .json(&json!({"type": "file", "ext": ".txt"}));
        request = if with_xsrf {
            request
                .header("cookie", format!("{cookie}; _xsrf={XSRF}"))
                .header("x-xsrftoken", XSRF)
        } else {
            request.header("cookie", &cookie)
        };
        request.send()
    };
    let refused = create(false).await.unwrap();
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    assert!(refused.text().await.unwrap().contains("_xsrf"));
    assert_eq!(
        std::fs::read_dir(&jupyter.root).unwrap().count(),
        0,
        "nothing was created"
    );
    let created = create(true).await.unwrap();
    assert_eq!(created.status(), StatusCode::CREATED);
    assert_eq!(std::fs::read_dir(&jupyter.root).unwrap().count(), 1);
}
