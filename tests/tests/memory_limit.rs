#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test
//! A kernel that takes twice its session's memory, as a customer would see
//! it: through the gateway, a real agent and its sandbox. The kernel is
//! killed alone, the session says why (API and My projects), and another
//! session on the same host runs on.

use std::time::{Duration, Instant};

use opencloud_e2e::agents::eventually;
use opencloud_e2e::kernel;
use opencloud_e2e::sessions::{open, wait_running};
use opencloud_e2e::TestStack;

#[tokio::test(flavor = "multi_thread")]
async fn a_kernel_over_its_memory_is_killed_alone_and_the_session_says_why() {
    let stack = TestStack::with_gateway().await.unwrap();
    let owner = stack.host_owner().await;
    // 2048 MiB over 4 sessions: 512 MiB each.
    let [(_, _agent)] = stack.online_hosts(&owner, [("host-a", 4)]).await;
    let alice = stack.new_user().await;
    let hungry = alice.create_project("Hungry").await;
    let calm = alice.create_project("Calm").await;
    let (hungry_sid, _) = open(&alice, hungry).await;
    let (calm_sid, _) = open(&alice, calm).await;
    wait_running(&stack, &hungry_sid).await;
    wait_running(&stack, &calm_sid).await;

    // Started on idle CPU; the session's share (2 cores / 4) applies once
    // it is ready.
    for sid in [&hungry_sid, &calm_sid] {
        let v1 = format!("/sys/fs/cgroup/cpu/opencloud/{sid}/cpu.cfs_quota_us");
        let v2 = format!("/sys/fs/cgroup/opencloud/{sid}/cpu.max");
        let quota = std::fs::read_to_string(&v1)
            .or_else(|_| std::fs::read_to_string(&v2))
            .unwrap();
        assert!(
            quota.trim() == "50000" || quota.starts_with("50000 "),
            "{sid}: {quota}"
        );
    }
    let gateway = stack.gateway();
    let run = |sid: String, code: &'static str| {
        let stack = &stack;
        let alice = &alice;
        async move {
            let cookie = stack.enter(alice, &sid).await;
            let origin = gateway.session_origin(&sid);
            let http = gateway.client(&[&sid], false);
            let channels = kernel::start(&http, &origin, &cookie).await.unwrap();
            kernel::execute(&channels, gateway.addr(), &cookie, code).await
        }
    };
    assert_eq!(
        run(calm_sid.clone(), "print(6 * 7)").await.unwrap().trim(),
        "42"
    );

    let started = Instant::now();
    // The kernel dies without answering: give up on its answer early.
    let hog = tokio::time::timeout(
        Duration::from_secs(20),
        run(
            hungry_sid.clone(),
            "x = bytearray(1024 * 1024 * 1024); print(len(x))",
        ),
    )
    .await;
    assert!(
        !matches!(&hog, Ok(Ok(out)) if out.trim() == "1073741824"),
        "1 GiB fitted in a 512 MiB session: {hog:?}"
    );
    let (notice, _) = eventually(
        "the session saying why its kernel stopped",
        Duration::from_secs(30),
        || async {
            let body = alice
                .get_json(&format!("/api/v1/sessions/{hungry_sid}"))
                .await;
            body["notice"].as_str().map(str::to_owned)
        },
    )
    .await;
    println!(
        "kernel killed; the session said so {:?} after the allocation began: {notice}",
        started.elapsed()
    );
    assert!(notice.contains("512 MiB memory limit"), "{notice}");
    let page = alice.page("/projects").await;
    assert!(page.contains(&notice), "My projects shows the notice");

    // The server survived its kernel; the other session never noticed.
    let (_, state) = stack.session_row(&hungry_sid).await;
    assert_eq!(state, "running");
    assert_eq!(
        run(hungry_sid.clone(), "print('still here')")
            .await
            .unwrap()
            .trim(),
        "still here"
    );
    assert_eq!(
        run(calm_sid.clone(), "print(6 * 7)").await.unwrap().trim(),
        "42"
    );
}
