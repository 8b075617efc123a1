//! Hosts and the sessions placed on them, set up the way their owners and
//! customers do it: through the platform's API behind the gateway. The
//! database is read only to see what control decided.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;

use crate::agents::eventually;
use crate::gateway::{GatewayStack, GatewayUser};

/// A host owner, registered and logged in through the gateway.
pub async fn host_owner(stack: &GatewayStack) -> GatewayUser {
    stack
        .registered("owner", "Host Owner", Some("host_owner"))
        .await
}

/// Adds a host on My hosts and returns (host id, HostKey).
pub async fn add_host(stack: &GatewayStack, owner: &GatewayUser, name: &str) -> (u64, String) {
    let (status, body) = stack
        .post(owner, "/api/v1/hosts", json!({"name": name}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "add host: {body}");
    (
        body["host"]["id"].as_u64().expect("host id"),
        body["host_key"].as_str().expect("host key").to_owned(),
    )
}

/// Waits until the host is online and a gateway has found it reachable,
/// so placement may use it.
pub async fn wait_placeable(stack: &GatewayStack, host_id: u64) {
    let db = &stack.db;
    let (_, took) = eventually(
        "the host becoming placeable",
        Duration::from_secs(60),
        || async {
            let n = db
                .count(&format!(
                    "hosts h JOIN host_reachability r ON r.host_id = h.id \
                     WHERE h.id = {host_id} AND h.state = 'online' AND r.reachable"
                ))
                .await;
            (n > 0).then_some(())
        },
    )
    .await;
    println!("host {host_id} placeable after {took:?}");
}

/// Creates a project for `user` through the API; its id.
pub async fn create_project(stack: &GatewayStack, user: &GatewayUser, name: &str) -> u64 {
    let (status, body) = stack
        .post(user, "/api/v1/projects", json!({"name": name}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "create project: {body}");
    body["project"]["id"].as_u64().expect("project id")
}

/// Session `sid` as control recorded it: (host id, state, port, upstream token).
pub async fn session_row(stack: &GatewayStack, sid: &str) -> (u64, String, u16, String) {
    let mut conn = stack.db.conn().await;
    mysql_async::prelude::Queryable::exec_first(
        &mut conn,
        "SELECT host_id, state, port, upstream_token FROM sessions WHERE sid = ?",
        (sid,),
    )
    .await
    .expect("read the session")
    .unwrap_or_else(|| panic!("no session {sid}"))
}
