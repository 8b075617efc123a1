//! Sessions as a customer gets them: Open on a project, then waiting for
//! the host to report it running.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;

use crate::agents::eventually;
use crate::stack::TestStack;
use crate::user::TestUser;

/// Opens a project; returns (sid, enter url).
pub async fn open(user: &TestUser, project: u64) -> (String, String) {
    let (status, body) = user
        .post(&format!("/api/v1/projects/{project}/open"), json!({}))
        .await;
    assert!(
        status == StatusCode::CREATED || status == StatusCode::OK,
        "{status} {body}"
    );
    (
        body["session_id"]
            .as_str()
            .expect("a session id")
            .to_owned(),
        body["url"].as_str().expect("an enter url").to_owned(),
    )
}

/// Waits until session `sid` is running; returns the time it took.
pub async fn wait_running(stack: &TestStack, sid: &str) -> Duration {
    let (_, took) = eventually(
        "the session becoming ready",
        Duration::from_secs(90),
        || async {
            let (_, state) = stack.session_row(sid).await;
            assert!(
                matches!(state.as_str(), "starting" | "running"),
                "the session ended while starting: {state}"
            );
            (state == "running").then_some(())
        },
    )
    .await;
    took
}
