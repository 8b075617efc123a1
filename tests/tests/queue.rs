#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test
//! Opening under load: a crowd of opens never puts more sessions on a host
//! than it has room for; the rest wait in a first-come-first-served queue
//! with a place and an expected wait, start in order as places free up,
//! can leave the queue, keep their places across a control restart, and
//! cost nothing while they wait. A host that refuses a start hands the
//! session to another host. Real control, gateway, agents and Jupyter.
//! Run on its own (`--test-threads=1`): every test starts many servers.

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use opencloud_e2e::agents::eventually;
use opencloud_e2e::browser::Browser;
use opencloud_e2e::sessions::wait_running;
use opencloud_e2e::{TestStack, TestUser, PASSWORD};
use reqwest::StatusCode;
use serde_json::{json, Value};

async fn open(user: &TestUser, project: u64) -> (StatusCode, Value) {
    user.post(&format!("/api/v1/projects/{project}/open"), json!({}))
        .await
}

fn sid_of(body: &Value) -> String {
    body["session_id"].as_str().unwrap().to_owned()
}

/// The queued open's place in line, as its owner's API answers it.
async fn position(user: &TestUser, sid: &str) -> Option<u64> {
    let body = user.get_json(&format!("/api/v1/sessions/{sid}")).await;
    (body["state"] == "queued").then(|| body["position"].as_u64().unwrap())
}

async fn stop(user: &TestUser, sid: &str) {
    let (status, body) = user
        .post(&format!("/api/v1/sessions/{sid}/stop"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

async fn balance(user: &TestUser) -> u64 {
    user.get_json("/api/v1/me").await["balance_seconds"]
        .as_u64()
        .unwrap()
}

async fn wait_ended(stack: &TestStack, sid: &str) {
    eventually("the session ending", Duration::from_secs(60), || async {
        let (_, state) = stack.session_row(sid).await;
        (!matches!(state.as_str(), "starting" | "running" | "stopping")).then_some(())
    })
    .await;
}

/// Waits until a queued open has its session (a place freed up), then
/// until it runs.
async fn wait_placed_and_running(stack: &TestStack, sid: &str) -> Duration {
    let (_, placed) = eventually(
        "the queued open getting a place",
        Duration::from_secs(60),
        || async {
            (stack
                .db
                .count(&format!("sessions WHERE sid = '{sid}'"))
                .await
                == 1)
                .then_some(())
        },
    )
    .await;
    placed + wait_running(stack, sid).await
}

/// Sessions of the stack that ended without running (for lack of room or
/// otherwise): there must be none.
async fn failed_starts(stack: &TestStack) -> u64 {
    stack.db.count("sessions WHERE state = 'failed'").await
}

#[tokio::test(flavor = "multi_thread")]
async fn thirty_opens_on_nine_places_run_nine_and_the_rest_start_in_order() {
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
            .map(|(user, project)| open(user, *project)),
    )
    .await;
    println!("30 opens answered in {:?}", started.elapsed());
    let mut admitted = Vec::new();
    let mut queued = Vec::new();
    for (i, (status, body)) in answers.iter().enumerate() {
        match *status {
            StatusCode::CREATED => admitted.push((i, sid_of(body))),
            StatusCode::ACCEPTED => {
                assert_eq!(body["queued"], true, "{body}");
                assert_eq!(body["state"], "queued", "{body}");
                assert!(body["url"].as_str().unwrap().contains("/sessions/"));
                queued.push((body["position"].as_u64().unwrap(), i, sid_of(body)));
            }
            other => panic!("{other}: {body}"),
        }
    }
    assert_eq!(admitted.len(), 9, "exactly the 9 places are given out");
    queued.sort();
    let positions: Vec<u64> = queued.iter().map(|(p, ..)| *p).collect();
    assert_eq!(positions, (1..=21).collect::<Vec<_>>(), "places 1…21");
    for (host, room) in [(host_a, 6), (host_b, 3)] {
        let placed = stack
            .db
            .count(&format!("sessions WHERE host_id = {host}"))
            .await;
        assert_eq!(placed, room, "host {host} got {placed} for {room} places");
    }
    for (_, sid) in &admitted {
        wait_running(&stack, sid).await;
    }
    println!(
        "the first 9 running {:?} after the click",
        started.elapsed()
    );
    // Nothing runs for a waiting open, so nothing is charged for it.
    for (_, i, sid) in &queued {
        assert!(position(&users[*i], sid).await.is_some(), "still waiting");
        assert_eq!(
            stack
                .db
                .count(&format!("sessions WHERE sid = '{sid}'"))
                .await,
            0
        );
    }

    // Places free up: the queue starts in its order, a prefix at a time.
    let mut running: Vec<(usize, String)> = admitted;
    let mut waiting: Vec<(usize, String)> =
        queued.into_iter().map(|(_, i, sid)| (i, sid)).collect();
    let mut round = 0;
    while !waiting.is_empty() {
        round += 1;
        let freed = running.len().min(waiting.len());
        let stopping: Vec<(usize, String)> = running.drain(..freed).collect();
        for (i, sid) in &stopping {
            stop(&users[*i], sid).await;
        }
        let next: Vec<(usize, String)> = waiting.drain(..freed).collect();
        for (i, sid) in &next {
            wait_placed_and_running(&stack, sid).await;
            assert_eq!(position(&users[*i], sid).await, None);
        }
        // Those still waiting moved up by exactly the places that freed.
        for (place, (i, sid)) in waiting.iter().enumerate() {
            assert_eq!(
                position(&users[*i], sid).await,
                Some(place as u64 + 1),
                "round {round}"
            );
        }
        for (_, sid) in &stopping {
            wait_ended(&stack, sid).await;
        }
        running.extend(next);
        println!("round {round}: {freed} started, {} wait", waiting.len());
    }
    assert_eq!(failed_starts(&stack).await, 0, "no admitted session failed");
    let queue_metrics = stack.control().metrics().await;
    assert!(
        queue_metrics.contains("opencloud_control_queue_wait_seconds_count 21"),
        "21 waits recorded"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_host_that_refuses_a_start_hands_the_session_to_the_other_host() {
    let stack = TestStack::with_gateway().await.unwrap();
    let owner = stack.host_owner().await;
    let [(liar, _agent_a), (host_b, _agent_b)] = stack
        .online_hosts(&owner, [("host-a", 1), ("host-b", 1)])
        .await;
    // Control believes host-a has room for 4; its agent knows it has 1.
    let mut conn = stack.db.conn().await;
    use mysql_async::prelude::Queryable;
    conn.query_drop(format!(
        "UPDATE hosts SET max_sessions = 4 WHERE id = {liar}"
    ))
    .await
    .unwrap();
    let first = stack.new_user().await;
    let second = stack.new_user().await;
    let (p1, p2) = (
        first.create_project("Fills host-a").await,
        second.create_project("Refused at first").await,
    );
    // Both projects last ran on host-a, so placement tries it first.
    conn.query_drop(format!(
        "UPDATE projects SET last_host_id = {liar} WHERE id IN ({p1}, {p2})"
    ))
    .await
    .unwrap();
    let (status, body) = open(&first, p1).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let s1 = sid_of(&body);
    wait_running(&stack, &s1).await;
    assert_eq!(stack.session_row(&s1).await.0, liar);

    let (status, body) = open(&second, p2).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let s2 = sid_of(&body);
    let took = wait_running(&stack, &s2).await;
    println!("refused on host-a, running on host-b {took:?} after the open");
    assert_eq!(stack.session_row(&s2).await.0, host_b);
    let tries: Vec<(u8, u64, Option<String>)> = conn
        .exec(
            "SELECT attempt, host_id, failure FROM session_placements WHERE sid = ? ORDER BY attempt",
            (&s2,),
        )
        .await
        .unwrap();
    assert_eq!(tries.len(), 2, "{tries:?}");
    assert_eq!(tries[0].1, liar);
    assert!(
        tries[0].2.as_deref().unwrap_or("").contains("full"),
        "the refusal is recorded: {tries:?}"
    );
    assert_eq!(
        (tries[1].0, tries[1].1, tries[1].2.clone()),
        (2, host_b, None)
    );
    // The user sees a running session they can enter through the gateway.
    let session = second.get_json(&format!("/api/v1/sessions/{s2}")).await;
    assert_eq!(session["state"], "running", "{session}");
    let cookie = stack.enter(&second, &s2).await;
    let lab = stack
        .gateway()
        .client(&[&s2], false)
        .get(format!("{}/lab", stack.gateway().session_origin(&s2)))
        .header(reqwest::header::COOKIE, cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(lab.status(), StatusCode::OK, "Lab through the gateway");
    assert_eq!(failed_starts(&stack).await, 0);
    assert!(stack
        .control()
        .metrics()
        .await
        .contains("opencloud_control_placement_retries_total{outcome=\"replaced\"} 1"));
}

/// One host with one place, taken by `holder`: every further open waits.
async fn one_full_place(
    stack: &TestStack,
) -> (TestUser, String, opencloud_e2e::agents::AgentProcess) {
    let owner = stack.host_owner().await;
    let [(_, agent)] = stack.online_hosts(&owner, [("only", 1)]).await;
    let holder = stack.new_user().await;
    let project = holder.create_project("Holds the place").await;
    let (status, body) = open(&holder, project).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let sid = sid_of(&body);
    wait_running(stack, &sid).await;
    (holder, sid, agent)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cancelled_open_leaves_the_queue_costs_nothing_and_the_next_moves_up() {
    let stack = TestStack::with_gateway().await.unwrap();
    let (holder, holding, _agent) = one_full_place(&stack).await;
    let leaver = stack.new_user().await;
    let stayer = stack.new_user().await;
    let leaver_project = leaver.create_project("Leaves").await;
    let stayer_project = stayer.create_project("Stays").await;
    let before = balance(&leaver).await;

    let (status, body) = open(&leaver, leaver_project).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["position"], 1);
    let leaving = sid_of(&body);
    let (status, body) = open(&stayer, stayer_project).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["position"], 2);
    let staying = sid_of(&body);
    // Opening it again while it waits: the same place, not a second one.
    let (status, again) = open(&leaver, leaver_project).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{again}");
    assert_eq!(
        (sid_of(&again), again["position"].clone()),
        (leaving.clone(), json!(1))
    );
    // The admins see the queue on the overview and in /metrics.
    let admin = stack.admin().await;
    let overview = admin.page("/admin").await;
    let tile = &overview[overview.find("id=\"tile-queue\"").expect("a queue tile")..];
    assert!(
        tile[..tile.find("</div>").unwrap()].contains("<strong class=\"tile-value\">2</strong>"),
        "{tile}"
    );
    assert!(stack
        .control()
        .metrics()
        .await
        .contains("opencloud_control_queue_length 2"));
    // Another user cannot take someone's open out of the queue.
    let (status, _) = stayer
        .post(&format!("/api/v1/sessions/{leaving}/stop"), json!({}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(position(&leaver, &leaving).await, Some(1));

    let (status, body) = leaver
        .post(&format!("/api/v1/sessions/{leaving}/stop"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["state"], "left_queue");
    let left = leaver
        .get_json(&format!("/api/v1/sessions/{leaving}"))
        .await;
    assert_eq!(left["state"], "left_queue", "{left}");
    assert_eq!(left["left_queue"], "cancelled", "{left}");
    assert_eq!(position(&stayer, &staying).await, Some(1), "moved up");
    assert_eq!(
        stack
            .db
            .count(&format!("sessions WHERE sid = '{leaving}'"))
            .await,
        0,
        "nothing ran for it"
    );
    assert_eq!(balance(&leaver).await, before, "nothing charged");

    // The place frees up: the one who stayed gets it, the leaver does not.
    stop(&holder, &holding).await;
    wait_placed_and_running(&stack, &staying).await;
    assert_eq!(
        stack
            .db
            .count(&format!("sessions WHERE sid = '{leaving}'"))
            .await,
        0
    );
    assert_eq!(balance(&leaver).await, before);
    assert!(stack
        .control()
        .metrics()
        .await
        .contains("opencloud_control_queue_exits_total{outcome=\"cancelled\"} 1"));
}

#[tokio::test(flavor = "multi_thread")]
async fn waiting_opens_keep_their_places_across_a_control_restart() {
    let mut stack = TestStack::with_gateway().await.unwrap();
    let (holder, holding, _agent) = one_full_place(&stack).await;
    let first = stack.new_user().await;
    let second = stack.new_user().await;
    let (p1, p2) = (
        first.create_project("First").await,
        second.create_project("Second").await,
    );
    let before = (balance(&first).await, balance(&second).await);
    let s1 = sid_of(&open(&first, p1).await.1);
    let s2 = sid_of(&open(&second, p2).await.1);
    assert_eq!(position(&first, &s1).await, Some(1));
    assert_eq!(position(&second, &s2).await, Some(2));

    let restarted = Instant::now();
    stack.restart_control().await.unwrap();
    println!("control restarted in {:?}", restarted.elapsed());
    assert_eq!(
        position(&first, &s1).await,
        Some(1),
        "kept after the restart"
    );
    assert_eq!(position(&second, &s2).await, Some(2));

    stop(&holder, &holding).await;
    wait_placed_and_running(&stack, &s1).await;
    assert_eq!(position(&second, &s2).await, Some(1));
    // Without JavaScript: the waiting page refreshes itself, and once the
    // open has its place it sends the browser on to the session.
    let page = second.page(&format!("/sessions/{s2}/waiting")).await;
    assert!(page.contains(r#"<noscript><meta http-equiv="refresh" content="5">"#));
    assert!(page.contains(r#"data-position="1""#), "{page}");
    let placed = first
        .request(reqwest::Method::GET, &format!("/sessions/{s1}/waiting"))
        .send()
        .await
        .unwrap();
    assert_eq!(placed.status(), StatusCode::SEE_OTHER);
    assert_eq!(
        placed.headers()[reqwest::header::LOCATION],
        format!("/sessions/{s1}/enter").as_str()
    );
    assert_eq!(balance(&second).await, before.1, "waiting costs nothing");
    assert_eq!(
        stack
            .db
            .count(&format!("sessions WHERE sid = '{s2}'"))
            .await,
        0
    );
    // The first pays only for time it ran, from when it was ready.
    let charged = before.0 - balance(&first).await;
    assert!(
        charged <= 60,
        "charged {charged} s for a session that just started"
    );
}

/// Waits until `browser` shows Lab on session `sid`'s origin.
async fn into_lab(browser: &Browser, sid: &str) -> Duration {
    eventually(
        "the waiting page turning into Lab",
        Duration::from_secs(120),
        || async {
            let url = browser.client.current_url().await.ok()?;
            let on_session = url.host_str()?.starts_with(sid);
            let lab = browser
                .page_source()
                .await
                .ok()?
                .contains("jupyter-config-data");
            (on_session && url.path() == "/lab" && lab).then_some(())
        },
    )
    .await
    .1
}

#[tokio::test(flavor = "multi_thread")]
async fn queued_users_pages_show_place_and_wait_and_turn_into_lab_in_turn() {
    let stack = TestStack::with_gateway().await.unwrap();
    let (holder, holding, _agent) = one_full_place(&stack).await;
    // One session ended lately, so the wait can be estimated.
    stop(&holder, &holding).await;
    wait_ended(&stack, &holding).await;
    let holding = sid_of(&open(&holder, holder.create_project("Again").await).await.1);
    wait_running(&stack, &holding).await;

    // Two customers click Open in their own Chromium and wait in line.
    let platform = stack.gateway().platform();
    let mut waiting = Vec::new();
    for place in 1..=2u64 {
        let waiter = stack.new_user().await;
        let project = waiter.create_project("Waits in Chromium").await;
        let browser = Browser::start().await.unwrap();
        browser.goto(&format!("{platform}/login")).await.unwrap();
        browser.submit_login(&waiter.email, PASSWORD).await.unwrap();
        browser.wait_for_path("/projects").await.unwrap();
        browser
            .click(&format!(
                "li.project form[action='/projects/{project}/open'] button[type=submit]"
            ))
            .await
            .unwrap();
        browser.wait_for("#queue-position").await.unwrap();
        let path = browser.path().await.unwrap();
        assert!(path.ends_with("/waiting"), "{path}");
        let sid = path
            .trim_start_matches("/sessions/")
            .trim_end_matches("/waiting")
            .to_owned();
        assert_eq!(
            browser.text("#queue-position").await.unwrap(),
            place.to_string()
        );
        let eta = browser.text("#queue-eta").await.unwrap();
        assert!(
            eta.starts_with("about") || eta == "less than a minute",
            "an estimated wait: {eta}"
        );
        println!("the waiting page says: place {place}, wait {eta}");
        // My projects shows it waiting too.
        let list = waiter.page("/projects").await;
        assert!(list.contains(&format!("In line: number {place}")), "{list}");
        // Marks this page: a reload would lose the mark.
        browser
            .client
            .execute("window.notReloaded = true;", vec![])
            .await
            .unwrap();
        waiting.push((waiter, sid, browser));
    }

    // A place frees up: the first page goes into Lab by itself, and the
    // second moves up to place 1 without a reload.
    let freed = Instant::now();
    stop(&holder, &holding).await;
    let (first, first_sid, first_browser) = &waiting[0];
    let took = into_lab(first_browser, first_sid).await;
    println!(
        "first waiter in Lab {took:?} after the place freed ({:?})",
        freed.elapsed()
    );
    assert_eq!(stack.session_row(first_sid).await.1, "running");
    let (_, second_sid, second_browser) = &waiting[1];
    eventually(
        "the second page showing place 1",
        Duration::from_secs(30),
        || async { (second_browser.text("#queue-position").await.ok()? == "1").then_some(()) },
    )
    .await;
    let same_page = second_browser
        .client
        .execute("return window.notReloaded === true;", vec![])
        .await
        .unwrap();
    assert_eq!(same_page, json!(true), "the place changed without a reload");

    // The first leaves: the second goes into Lab too.
    stop(first, first_sid).await;
    let took = into_lab(second_browser, second_sid).await;
    println!("second waiter in Lab {took:?} after the first stopped");
    assert_eq!(stack.session_row(second_sid).await.1, "running");
}

/// `user` talking to another control replica directly.
fn via(user: &TestUser, replica: &opencloud_e2e::Control) -> TestUser {
    TestUser {
        id: user.id,
        email: user.email.clone(),
        password: user.password.clone(),
        token: user.token.clone(),
        http: user.http.clone(),
        base: replica.public.clone(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn two_control_replicas_serve_one_queue_and_place_each_open_once_in_order() {
    let stack = TestStack::with_gateway().await.unwrap();
    let replica = stack.control().replica().await.unwrap();
    let (holder, holding, _agent) = one_full_place(&stack).await;
    let users = join_all((0..6).map(|_| stack.new_user())).await;
    let projects = join_all(users.iter().map(|u| u.create_project("Two replicas"))).await;
    // Every other user's open goes to the second replica, all at once.
    let answers = join_all(
        users
            .iter()
            .zip(&projects)
            .enumerate()
            .map(|(i, (user, project))| {
                let replica = &replica;
                async move {
                    if i % 2 == 1 {
                        open(&via(user, replica), *project).await
                    } else {
                        open(user, *project).await
                    }
                }
            }),
    )
    .await;
    let mut order: Vec<(u64, usize, String)> = answers
        .iter()
        .enumerate()
        .map(|(i, (status, body))| {
            assert_eq!(*status, StatusCode::ACCEPTED, "{body}");
            (body["position"].as_u64().unwrap(), i, sid_of(body))
        })
        .collect();
    order.sort();
    assert_eq!(
        order.iter().map(|(p, ..)| *p).collect::<Vec<_>>(),
        (1..=6).collect::<Vec<_>>(),
        "one queue across both replicas"
    );
    // Either replica answers for any open.
    for (place, i, sid) in &order {
        assert_eq!(
            position(&via(&users[*i], &replica), sid).await,
            Some(*place)
        );
    }

    // One place frees up at a time; both replicas' promoters race for it.
    let (mut running_user, mut running_sid) = (&holder, holding);
    for (_, i, sid) in order {
        stop(running_user, &running_sid).await;
        wait_placed_and_running(&stack, &sid).await;
        wait_ended(&stack, &running_sid).await;
        (running_user, running_sid) = (&users[i], sid);
    }
    // Each open was placed exactly once, and nothing else was placed.
    assert_eq!(stack.db.count("sessions").await, 7);
    assert_eq!(
        stack
            .db
            .count("open_queue WHERE outcome = 'placed' AND waiting_project_id IS NULL")
            .await,
        6
    );
    assert_eq!(failed_starts(&stack).await, 0);
    let placed_by = |log: String| log.matches("queued open placed").count();
    println!(
        "placed by the first replica: {}, by the second: {}",
        placed_by(stack.control().log()),
        placed_by(replica.log())
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_host_lost_while_holding_warm_servers_loses_no_work_and_charges_nobody_for_them() {
    use mysql_async::prelude::Queryable;
    let stack = TestStack::with_gateway().await.unwrap();
    let owner = stack.host_owner().await;
    let (warm_host, warm_key) = stack.add_host(&owner, "warm").await;
    let (cold_host, cold_key) = stack.add_host(&owner, "cold").await;
    let mut warm_agent = stack.start_agent_with_warm_pool(&warm_key, 2, 1);
    let _cold_agent = stack.start_agent(&cold_key, 2);
    stack.wait_placeable(warm_host).await;
    stack.wait_placeable(cold_host).await;
    let warm_servers = || async {
        stack
            .db
            .count(&format!(
                "hosts WHERE id = {warm_host} AND warm_servers = 1"
            ))
            .await
            == 1
    };
    eventually(
        "control hearing of the warm server",
        Duration::from_secs(90),
        || async { warm_servers().await.then_some(()) },
    )
    .await;

    // The open goes to the host with a warm server and is bound to it.
    let alice = stack.new_user().await;
    let project = alice.create_project("Warm and then gone").await;
    let (status, body) = open(&alice, project).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let sid = sid_of(&body);
    let took = wait_running(&stack, &sid).await;
    println!("open → running on the warm host: {took:?}");
    assert_eq!(stack.session_row(&sid).await.0, warm_host);
    assert!(warm_agent.log().contains("session bound to a warm server"));
    let cookie = stack.enter(&alice, &sid).await;
    stack
        .write_file(&sid, &cookie, "notes.md", "# kept\n")
        .await;
    eventually("an autosave", Duration::from_secs(60), || async {
        (stack
            .db
            .count(&format!("project_versions WHERE project_id = {project}"))
            .await
            >= 1)
            .then_some(())
    })
    .await;
    // The host holds a new warm server when it dies.
    eventually(
        "a replacement warm server",
        Duration::from_secs(90),
        || async { warm_servers().await.then_some(()) },
    )
    .await;

    warm_agent.kill_hard();
    eventually("the session lost", Duration::from_secs(60), || async {
        (stack.session_row(&sid).await.1 == "lost").then_some(())
    })
    .await;
    assert_eq!(
        stack
            .db
            .count(&format!(
                "hosts WHERE id = {warm_host} AND warm_servers = 0"
            ))
            .await,
        1,
        "a lost host's warm servers are no longer counted"
    );

    // Reopened: on the other host, with the autosaved file.
    let (status, body) = open(&alice, project).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let again = sid_of(&body);
    wait_running(&stack, &again).await;
    assert_eq!(stack.session_row(&again).await.0, cold_host);
    let cookie = stack.enter(&alice, &again).await;
    assert_eq!(
        stack
            .read_file(&again, &cookie, "notes.md")
            .await
            .as_deref(),
        Some("# kept\n"),
        "nothing of the work was lost"
    );

    // Only sessions are charged, each for its own metered time: a warm
    // server nobody used costs nobody anything.
    let mut conn = stack.db.conn().await;
    let stray: u64 = conn
        .query_first(
            "SELECT COUNT(*) FROM ledger_entries
             WHERE kind = 'usage' AND (sid IS NULL OR sid NOT IN (SELECT sid FROM sessions))",
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stray, 0, "usage charged to something that is not a session");
    let (charged, metered): (i64, u64) = conn
        .exec_first(
            "SELECT CAST(COALESCE(ABS(SUM(l.seconds)), 0) AS SIGNED), s.metered_seconds
             FROM sessions s LEFT JOIN ledger_entries l ON l.sid = s.sid AND l.kind = 'usage'
             WHERE s.sid = ? GROUP BY s.sid",
            (&sid,),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        charged as u64, metered,
        "the lost session paid for its own time only"
    );
    assert_eq!(stack.db.count("sessions").await, 2);
}
