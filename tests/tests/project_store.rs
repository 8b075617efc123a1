#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test
//! A project's files follow its owner (issue 15): written in Lab's contents
//! API on one host, there after a stop and a reopen on another; after a
//! host dies, reopening elsewhere restores the last autosave and the page
//! says how old it is. Real agents, real Jupyter, the real store.

use std::time::Duration;

use opencloud_e2e::agents::eventually;
use opencloud_e2e::sessions::{open, wait_running};
use opencloud_e2e::{hidden_input, TestStack, TestUser};
use reqwest::StatusCode;
use serde_json::json;

async fn set_draining(owner: &TestUser, host: u64, draining: bool) {
    owner
        .post_json(
            &format!("/api/v1/hosts/{host}/drain"),
            json!({"draining": draining}),
        )
        .await;
}

/// Opens `project` and waits until it runs on `host`; its sid and cookie.
async fn open_on(stack: &TestStack, user: &TestUser, project: u64, host: u64) -> (String, String) {
    let (sid, _) = open(user, project).await;
    assert_eq!(
        stack.session_row(&sid).await.0,
        host,
        "placed on the expected host"
    );
    wait_running(stack, &sid).await;
    let cookie = stack.enter(user, &sid).await;
    (sid, cookie)
}

async fn versions(stack: &TestStack, project: u64) -> u64 {
    stack
        .db
        .count(&format!("project_versions WHERE project_id = {project}"))
        .await
}

async fn wait_ended(stack: &TestStack, sid: &str) {
    eventually("the session ending", Duration::from_secs(90), || async {
        let state = stack.session_row(sid).await.1;
        matches!(state.as_str(), "stopped" | "failed" | "lost").then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_file_written_on_one_host_is_there_after_reopening_on_another() {
    let stack = TestStack::with_gateway().await.unwrap();
    let owner = stack.host_owner().await;
    let [(host_a, _agent_a), (host_b, _agent_b)] = stack
        .online_hosts(&owner, [("host-a", 2), ("host-b", 2)])
        .await;
    let user = stack.new_user().await;
    let project = user.create_project("Thesis").await;

    set_draining(&owner, host_b, true).await;
    let (sid, cookie) = open_on(&stack, &user, project, host_a).await;
    let text = "# Chapter 1\nWritten on host-a, read on host-b: ünïcödé ✓\n";
    stack.write_file(&sid, &cookie, "chapter1.md", text).await;
    // Save now: a version with reason `save` (a checkpoint, even when an
    // autosave got there first).
    let (status, body) = user
        .post(&format!("/api/v1/sessions/{sid}/save"), json!({}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let (_, took) = eventually("the saved version", Duration::from_secs(30), || async {
        let saved = stack
            .db
            .count(&format!(
                "project_versions WHERE project_id = {project} AND reason = 'save'"
            ))
            .await;
        (saved >= 1).then_some(())
    })
    .await;
    println!("save now → stored in {took:?}");
    // The Save now button: the project's page, which lists the versions,
    // says the save is on its way.
    let csrf = hidden_input(&user.page("/projects").await, "csrf");
    let r = user
        .post_form(&format!("/sessions/{sid}/save"), &[("csrf", &csrf)])
        .await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let to = r.headers()["location"].to_str().unwrap().to_owned();
    assert_eq!(to, format!("/projects/{project}?saving=1#files"));
    let page = user.page(to.trim_end_matches("#files")).await;
    assert!(page.contains("Saving the running session"), "{page}");
    // Nobody else can ask for it.
    let stranger = stack.new_user().await;
    let (status, _) = stranger
        .post(&format!("/api/v1/sessions/{sid}/save"), json!({}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, body) = user
        .post(&format!("/api/v1/sessions/{sid}/stop"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    wait_ended(&stack, &sid).await;
    assert!(
        versions(&stack, project).await >= 1,
        "the stop pushed a snapshot"
    );

    set_draining(&owner, host_a, true).await;
    set_draining(&owner, host_b, false).await;
    let (sid_b, cookie_b) = open_on(&stack, &user, project, host_b).await;
    assert_eq!(
        stack
            .read_file(&sid_b, &cookie_b, "chapter1.md")
            .await
            .as_deref(),
        Some(text),
        "the file followed its project to host-b"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn after_a_host_dies_reopening_restores_the_last_autosave_and_says_how_old_it_is() {
    let stack = TestStack::with_gateway().await.unwrap();
    let owner = stack.host_owner().await;
    let [(host_a, mut agent_a), (host_b, _agent_b)] = stack
        .online_hosts(&owner, [("host-a", 2), ("host-b", 2)])
        .await;
    let user = stack.new_user().await;
    let project = user.create_project("Experiment").await;

    set_draining(&owner, host_b, true).await;
    let (sid, cookie) = open_on(&stack, &user, project, host_a).await;
    stack
        .write_file(&sid, &cookie, "results.csv", "run,score\n1,0.93\n")
        .await;
    // The autosave (every 5 s in the tests' agents) picks the change up.
    let (_, took) = eventually("an autosave", Duration::from_secs(60), || async {
        (versions(&stack, project).await >= 1).then_some(())
    })
    .await;
    println!("autosaved {took:?} after the write");

    // host-a dies hard: agent and Jupyter, SIGKILL, no goodbye.
    agent_a.kill_hard();
    eventually("the session lost", Duration::from_secs(60), || async {
        (stack.session_row(&sid).await.1 == "lost").then_some(())
    })
    .await;

    set_draining(&owner, host_b, false).await;
    let (sid_b, cookie_b) = open_on(&stack, &user, project, host_b).await;
    assert_eq!(
        stack
            .read_file(&sid_b, &cookie_b, "results.csv")
            .await
            .as_deref(),
        Some("run,score\n1,0.93\n"),
        "the autosave was restored on host-b"
    );
    let page = user.page("/projects").await;
    assert!(
        page.contains("restored from"),
        "My projects says which save it restored: {page}"
    );
    let _ = host_a;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_damaged_snapshot_is_caught_by_its_checksum_and_the_one_before_is_used() {
    let stack = TestStack::with_gateway().await.unwrap();
    let owner = stack.host_owner().await;
    let [(host_a, _agent_a), (host_b, _agent_b)] = stack
        .online_hosts(&owner, [("host-a", 2), ("host-b", 2)])
        .await;
    let user = stack.new_user().await;
    let project = user.create_project("Fragile").await;

    // Two saved states on host-a: version 1, then version 2.
    set_draining(&owner, host_b, true).await;
    for (n, text) in [(1, "first draft\n"), (2, "second draft\n")] {
        let (sid, cookie) = open_on(&stack, &user, project, host_a).await;
        stack.write_file(&sid, &cookie, "draft.txt", text).await;
        user.post_json(&format!("/api/v1/sessions/{sid}/stop"), json!({}))
            .await;
        wait_ended(&stack, &sid).await;
        assert_eq!(versions(&stack, project).await, n, "a version per stop");
    }

    // One flipped byte in the latest version's object in the store.
    let key: String = {
        use mysql_async::prelude::Queryable;
        stack
            .db
            .conn()
            .await
            .exec_first(
                "SELECT object_key FROM project_versions WHERE project_id = ? AND version = 2",
                (project,),
            )
            .await
            .unwrap()
            .unwrap()
    };
    let object = stack.control().dir.join("store").join(&key);
    let mut bytes = std::fs::read(&object).unwrap_or_else(|e| panic!("{}: {e}", object.display()));
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&object, bytes).unwrap();

    // Reopened elsewhere (no warm copy there): version 1 comes back, and the
    // owner is told.
    set_draining(&owner, host_a, true).await;
    set_draining(&owner, host_b, false).await;
    let (sid_b, cookie_b) = open_on(&stack, &user, project, host_b).await;
    assert_eq!(
        stack
            .read_file(&sid_b, &cookie_b, "draft.txt")
            .await
            .as_deref(),
        Some("first draft\n"),
        "the version before the damaged one"
    );
    assert_eq!(
        stack
            .db
            .count(&format!(
                "project_versions WHERE project_id = {project} AND version = 2 AND damaged_at IS NOT NULL"
            ))
            .await,
        1,
        "version 2 is marked damaged"
    );
    let session = user.get_json(&format!("/api/v1/sessions/{sid_b}")).await;
    let notice = session["notice"].as_str().unwrap_or_default();
    assert!(notice.contains("damaged"), "the owner is told: {session}");
}
