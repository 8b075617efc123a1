#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test
//! Hosts are untrusted input: whatever a host's agent sends (its hello,
//! heartbeats, events) is checked field by field. A bad value is a 400 that
//! names the field, never a 500, and an event about a session the host does
//! not run is refused and logged. The agent is played by the test, sending
//! exactly what a hostile host would, with its real HostKey.

use std::time::{SystemTime, UNIX_EPOCH};

use mysql_async::prelude::*;
use opencloud_e2e::external::register_external;
use opencloud_e2e::hosts::agent_hello;
use opencloud_e2e::upstream::loopback;
use opencloud_e2e::TestStack;
use reqwest::StatusCode;
use serde_json::{json, Value};

const ADDRESS: &str = "10.1.2.3";

/// A host registered by its (stand-in) agent, running one session.
struct Fixture {
    stack: TestStack,
    host_id: u64,
    key: String,
    sid: String,
}

impl Fixture {
    async fn start() -> Self {
        let stack = TestStack::control_only().await.unwrap();
        let owner = stack.host_owner().await;
        let (host_id, key) = stack.add_host(&owner, "lab-pc").await;
        let hello = serde_json::to_value(agent_hello(ADDRESS)).unwrap();
        let (status, body) = stack
            .post_as_agent(&key, "/agent/v1/register", &hello)
            .await;
        assert_eq!(status, StatusCode::OK, "register: {body}");
        let project = owner.create_project("Untrusted").await;
        let pool = mysql_async::Pool::new(stack.db.url.as_str());
        let external = register_external(&pool, &stack.host_ca(), owner.id, project, loopback(9))
            .await
            .unwrap();
        let sid = external.sid().to_owned();
        // The session runs on the host this test speaks for.
        stack
            .db
            .conn()
            .await
            .exec_drop(
                "UPDATE sessions SET host_id = ? WHERE sid = ?",
                (host_id, &sid),
            )
            .await
            .unwrap();
        Self {
            stack,
            host_id,
            key,
            sid,
        }
    }

    async fn send(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        self.stack.post_as_agent(&self.key, path, body).await
    }

    /// A heartbeat reporting this host's one session with `session` merged
    /// into it and `load` merged into a sane load.
    fn heartbeat(&self, load: Value, session: Value) -> Value {
        let mut beat = json!({
            "version": "0.1.0-test",
            "load": {"cpu_percent": 12.0, "memory_used_mib": 2048,
                     "memory_total_mib": 16384, "disk_free_mib": 100000},
            "sessions": [{"sid": self.sid, "state": "running",
                          "started_at": now(), "last_activity": now(), "busy_kernels": 0}],
        });
        merge(&mut beat["load"], load);
        merge(&mut beat["sessions"][0], session);
        beat
    }

    async fn host_cpu_percent(&self) -> f64 {
        self.stack
            .db
            .conn()
            .await
            .exec_first(
                "SELECT cpu_percent FROM hosts WHERE id = ?",
                (self.host_id,),
            )
            .await
            .unwrap()
            .unwrap()
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn merge(into: &mut Value, from: Value) {
    if let (Some(into), Value::Object(from)) = (into.as_object_mut(), from) {
        into.extend(from);
    }
}

/// Asserts a 400 whose error names `field` (as its field, or in its
/// message when the body did not even parse as the protocol's types).
fn expect_refused(what: &str, (status, body): (StatusCode, Value), field: &str) {
    assert_eq!(status, StatusCode::BAD_REQUEST, "{what}: {body}");
    let named = body["error"]["field"] == field
        || body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains(field));
    assert!(named, "{what}: the answer must name {field}: {body}");
}

#[tokio::test]
async fn a_heartbeat_from_the_far_future_is_a_400_naming_the_field_and_the_next_one_lands() {
    let f = Fixture::start().await;
    for field in ["last_activity", "started_at"] {
        let beat = f.heartbeat(json!({}), json!({ field: 4_102_444_800u64 }));
        let got = f.send("/agent/v1/heartbeat", &beat).await;
        expect_refused(&format!("{field} in 2100"), got, field);
    }
    let (status, body) = f
        .send("/agent/v1/heartbeat", &f.heartbeat(json!({}), json!({})))
        .await;
    assert_eq!(status, StatusCode::OK, "a sane heartbeat after: {body}");
    assert_eq!(body["stop"], json!([]), "the session is still wanted");
}

#[tokio::test]
async fn reported_load_and_session_figures_are_bounded() {
    let f = Fixture::start().await;
    let bad_loads = [
        (json!({"cpu_percent": -1.0}), "cpu_percent"),
        (json!({"cpu_percent": 1e30}), "cpu_percent"),
        // NaN goes on the wire as null.
        (json!({"cpu_percent": null}), "cpu_percent"),
        (json!({"memory_used_mib": -5}), "memory_used_mib"),
        (json!({"memory_used_mib": 20000}), "memory_used_mib"),
        (
            json!({"memory_total_mib": u64::MAX, "memory_used_mib": 1}),
            "memory_total_mib",
        ),
        (json!({"disk_free_mib": u64::MAX}), "disk_free_mib"),
    ];
    for (load, field) in bad_loads {
        let got = f
            .send("/agent/v1/heartbeat", &f.heartbeat(load.clone(), json!({})))
            .await;
        expect_refused(&format!("load {load}"), got, field);
    }
    let bad_sessions = [
        (json!({"busy_kernels": u32::MAX}), "busy_kernels"),
        (json!({"sid": "../../etc"}), "sid"),
    ];
    for (session, field) in bad_sessions {
        let got = f
            .send(
                "/agent/v1/heartbeat",
                &f.heartbeat(json!({}), session.clone()),
            )
            .await;
        expect_refused(&format!("session {session}"), got, field);
    }
    let mut beat = f.heartbeat(json!({}), json!({}));
    beat["version"] = json!("1.0\u{202e}evil");
    expect_refused(
        "a version with a control character",
        f.send("/agent/v1/heartbeat", &beat).await,
        "version",
    );
    assert_eq!(
        f.host_cpu_percent().await,
        0.0,
        "no refused load was stored"
    );
}

#[tokio::test]
async fn a_hello_with_absurd_values_is_a_400_naming_the_field() {
    let f = Fixture::start().await;
    let hello = serde_json::to_value(agent_hello(ADDRESS)).unwrap();
    let bad = [
        (
            json!({"capacity": {"max_sessions": u32::MAX, "cpu_cores": 8.0, "memory_mib": 16384}}),
            "max_sessions",
        ),
        (
            json!({"capacity": {"max_sessions": 4, "cpu_cores": 1e30, "memory_mib": 16384}}),
            "cpu_cores",
        ),
        (
            json!({"capacity": {"max_sessions": 4, "cpu_cores": 8.0, "memory_mib": u64::MAX}}),
            "memory_mib",
        ),
        (json!({"link_port": 0}), "link_port"),
        (json!({"address": "0.0.0.0"}), "address"),
        (json!({"version": "x\u{0007}"}), "version"),
        (
            json!({"sessions": [{"sid": "not a sid", "state": "running",
                              "started_at": 1, "last_activity": null, "busy_kernels": 0}]}),
            "sid",
        ),
        (
            json!({"sessions": [{"sid": f.sid, "state": "running",
                              "started_at": 1, "last_activity": 4_102_444_800u64, "busy_kernels": 0}]}),
            "last_activity",
        ),
    ];
    for (change, field) in bad {
        let mut body = hello.clone();
        merge(&mut body, change.clone());
        let got = f.send("/agent/v1/register", &body).await;
        expect_refused(&format!("hello with {change}"), got, field);
    }
}

#[tokio::test]
async fn events_are_checked_and_those_for_sessions_the_host_does_not_run_are_refused_and_logged() {
    let f = Fixture::start().await;
    let stranger = f.stack.host_owner().await;
    let (_, stranger_key) = f.stack.add_host(&stranger, "stranger-pc").await;
    let hello = serde_json::to_value(agent_hello("10.9.9.9")).unwrap();
    let (status, _) = f
        .stack
        .post_as_agent(&stranger_key, "/agent/v1/register", &hello)
        .await;
    assert_eq!(status, StatusCode::OK);

    let ready = json!({"event": "ready", "sid": f.sid, "spawn_ms": 10});
    let (status, body) = f
        .stack
        .post_as_agent(&stranger_key, "/agent/v1/events", &ready)
        .await;
    assert!(
        status.is_client_error(),
        "another host's session: {status} {body}"
    );
    let stopped = json!({"event": "stopped", "sid": f.sid});
    let (status, _) = f
        .stack
        .post_as_agent(&stranger_key, "/agent/v1/events", &stopped)
        .await;
    assert!(status.is_client_error(), "stopping another host's session");
    let log = f.stack.control().log();
    assert!(
        log.lines()
            .any(|l| l.contains("refused") && l.contains(f.sid.as_str())),
        "the refusal is logged with the sid:\n{log}"
    );

    // The session's own host, with values no agent would send.
    let bad = [
        (
            json!({"event": "ready", "sid": f.sid, "spawn_ms": u64::MAX}),
            "spawn_ms",
        ),
        (
            json!({"event": "failed", "sid": f.sid, "reason": "x".repeat(100_000), "exit_code": 1, "log_tail": ""}),
            "reason",
        ),
    ];
    for (event, field) in bad {
        let got = f.send("/agent/v1/events", &event).await;
        expect_refused(&format!("event {}", event["event"]), got, field);
    }
    let (_, state) = f.stack.session_row(&f.sid).await;
    assert_eq!(state, "running", "no refused event changed the session");
}
