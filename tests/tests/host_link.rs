#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test
//! The host link, tried as an attacker would: a host lying about where it
//! is (control's own internal listener), a host that cannot prove it holds
//! its link key, addresses no stranger's host may advertise, and Jupyter's
//! own XSRF check, which stays on now that no token is injected.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use opencloud_e2e::external::record_host_and_session;
use opencloud_e2e::hosts::agent_hello;
use opencloud_e2e::jupyter::{JupyterServer, XSRF};
use opencloud_e2e::stack::Target;
use opencloud_e2e::upstream::{capture_upstream, loopback};
use opencloud_e2e::{ControlOptions, TestStack, TestUser};
use opencloud_protocol::link::LinkKey;
use reqwest::StatusCode;
use serde_json::json;

/// Records a session of `user` on a host that claims its link is at
/// `link_addr` with `key`, and waits until the gateway knows the route.
async fn session_on_claimed_host(
    stack: &TestStack,
    user: &TestUser,
    link_addr: SocketAddr,
    key: &LinkKey,
) -> String {
    let project = user.create_project("Claimed").await;
    let pool = mysql_async::Pool::new(stack.db.url.as_str());
    let session = record_host_and_session(&pool, user.id, project, link_addr, key)
        .await
        .unwrap();
    pool.disconnect().await.unwrap();
    let gateway = stack.gateway();
    let client = gateway.client(&[&session.sid], false);
    let started = Instant::now();
    loop {
        let r = client
            .get(format!("{}/", gateway.session_origin(&session.sid)))
            .bearer_auth(&user.token)
            .send()
            .await
            .unwrap();
        if r.status() != StatusCode::NOT_FOUND {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the route never reached the gateway"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    session.sid
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
    let sid = session_on_claimed_host(&stack, &mallory, internal, &LinkKey::generate()).await;
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

/// Attack: something else answers on a host's link port (a host whose key
/// was rotated, or a service squatting its port) and relays to a server. The
/// gateway must not send it a byte of the user's request.
#[tokio::test]
async fn a_link_without_the_hosts_key_never_sees_a_request() {
    let stack = TestStack::with_gateway().await.unwrap();
    let user = stack.new_user().await;
    // A real link, serving the upstream, but under another key than the one
    // control gave the gateway.
    let (port, captured) = capture_upstream().await;
    let sid = stack.session_for(&user, loopback(port)).await;
    let (host, _) = stack.session_row(&sid).await;
    let before = captured.heads().len();
    let mut conn = stack.db.conn().await;
    mysql_async::prelude::Queryable::exec_drop(
        &mut conn,
        "UPDATE hosts SET link_key = ? WHERE id = ?",
        (LinkKey::generate().expose(), host),
    )
    .await
    .unwrap();
    drop(conn);
    // Publish the host with the new key, as a HostKey rotation would.
    let pool = mysql_async::Pool::new(stack.db.url.as_str());
    let route = opencloud_control::routes::snapshot(&pool)
        .await
        .unwrap()
        .hosts
        .into_iter()
        .find(|h| h.id == host)
        .unwrap();
    let mut conn = pool.get_conn().await.unwrap();
    let mut tx = conn
        .start_transaction(mysql_async::TxOpts::default())
        .await
        .unwrap();
    opencloud_control::routes::publish(
        &mut tx,
        &[opencloud_protocol::routes::Change::UpsertHost(route)],
    )
    .await
    .unwrap();
    opencloud_control::routes::commit(tx).await.unwrap();
    drop(conn);
    pool.disconnect().await.unwrap();

    let origin = stack.gateway().session_origin(&sid);
    let client = stack.gateway().client(&[&sid], false);
    let started = Instant::now();
    // Refused: a 5xx page, or (under load, while a request was in flight on
    // a connection of the old key) the connection ended.
    let refused = |answer: reqwest::Result<reqwest::Response>| match answer {
        Ok(r) => r.status().is_server_error(),
        Err(e) => !e.is_builder(),
    };
    let refused_after = loop {
        let answer = client
            .get(format!("{origin}/api/contents?secret-query"))
            .bearer_auth(&user.token)
            .send()
            .await;
        if refused(answer) {
            break started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the gateway kept using the old key"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!("new key refused by the old link after {refused_after:?}");
    // Once refused, no request reaches the upstream through that link.
    let seen = captured.heads().len();
    for _ in 0..3 {
        let answer = client
            .get(format!("{origin}/api/contents?secret-query"))
            .bearer_auth(&user.token)
            .send()
            .await;
        assert!(refused(answer));
    }
    assert_eq!(captured.heads().len(), seen, "a request got through");
    assert!(seen >= before);
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
    assert!(
        body["link_key"].as_str().is_some_and(|k| k.len() == 64),
        "the agent gets its link key: {body}"
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
