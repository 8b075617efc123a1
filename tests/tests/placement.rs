#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test
//! Placement under a crowd: many opens at the same moment never put more
//! sessions on a host than it has room for, so nobody is told "starting"
//! and then sees the host refuse the session.

use std::time::Instant;

use futures_util::future::join_all;
use opencloud_e2e::sessions::wait_running;
use opencloud_e2e::TestStack;
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn thirty_opens_at_once_on_nine_places_admit_nine_and_all_nine_run() {
    let stack = TestStack::with_gateway().await.unwrap();
    let owner = stack.host_owner().await;
    let [(host_a, _agent_a), (host_b, _agent_b)] = stack
        .online_hosts(&owner, [("host-a", 6), ("host-b", 3)])
        .await;
    let users = join_all((0..30).map(|_| stack.new_user())).await;
    let projects = join_all(users.iter().map(|u| u.create_project("Crowd"))).await;

    let started = Instant::now();
    let answers = join_all(
        users
            .iter()
            .zip(&projects)
            .map(|(user, project)| async move {
                user.post(&format!("/api/v1/projects/{project}/open"), json!({}))
                    .await
            }),
    )
    .await;
    println!("30 opens answered in {:?}", started.elapsed());
    let mut admitted = Vec::new();
    for (status, body) in &answers {
        match *status {
            StatusCode::CREATED => admitted.push(body["session_id"].as_str().unwrap().to_owned()),
            StatusCode::SERVICE_UNAVAILABLE => {
                assert_eq!(body["error"]["code"], "no_capacity", "{body}")
            }
            other => panic!("{other}: {body}"),
        }
    }
    assert_eq!(
        admitted.len(),
        9,
        "exactly the 9 places are given out, no more"
    );
    for (host, room) in [(host_a, 6), (host_b, 3)] {
        let placed = stack
            .db
            .count(&format!("sessions WHERE host_id = {host}"))
            .await;
        assert_eq!(
            placed, room,
            "host {host} got {placed} sessions for {room} places"
        );
    }
    // Every admitted session runs: none is refused by its host for room.
    for sid in &admitted {
        wait_running(&stack, sid).await;
    }
    println!("all 9 running {:?} after the click", started.elapsed());
    assert_eq!(
        stack
            .db
            .count("sessions WHERE state NOT IN ('starting', 'running')")
            .await,
        0
    );
}
