#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test
//! Money end to end: orders priced by control, webhooks signed as Stripe
//! signs them and applied exactly once, the ledger adding up under
//! concurrency, per-second metering of real sessions with the host owner's
//! share, the balance running out, lots expiring, and Open's refusals.
//! The attacks come first in each test.

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use mysql_async::prelude::Queryable;
use opencloud_e2e::agents::eventually;
use opencloud_e2e::billing::{balance, place_order};
use opencloud_e2e::exposition::Exposition;
use opencloud_e2e::sessions::{open, wait_running};
use opencloud_e2e::{expect_error, hidden_input, ControlOptions, TestStack, TestUser};
use reqwest::StatusCode;
use serde_json::{json, Value};

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (format!("OPENCLOUD_CONTROL__BILLING__{k}"), v.to_string()))
        .collect()
}

/// The ledger entries of `kind` for order `order`.
async fn entries_for_order(stack: &TestStack, kind: &str, order: u64) -> u64 {
    stack
        .db
        .count(&format!(
            "ledger_entries WHERE kind = '{kind}' AND order_id = {order}"
        ))
        .await
}

async fn order_status(user: &TestUser, order: u64) -> String {
    user.get_json(&format!("/api/v1/orders/{order}")).await["order"]["status"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_payment_is_credited_once_however_often_its_webhook_comes_and_forgeries_credit_nothing() {
    let stack = TestStack::with_gateway().await.unwrap();
    stack.admin().await;
    let starter = stack.packages_on_sale().await.remove(0);
    let buyer = stack.new_user().await;
    let trial = balance(&buyer).await;
    assert_eq!(trial, 1800, "the sign-up grant");

    // Forgeries against a real pending order: each refused with its reason.
    let order = place_order(&buyer, starter.id).await;
    let event = stack.paid_event(order, "evt_forged").await;
    let body = event.to_string();
    let secret = stack.webhook_secret();
    let now = opencloud_control::now_unix();
    let good_signature = secret.sign(now, body.as_bytes());
    let tampered_body = body.replace(
        &format!("\"amount_total\":{}", starter.price_minor),
        "\"amount_total\":1",
    );
    assert_ne!(tampered_body, body);
    let other_secret =
        opencloud_control::billing::webhook::WebhookSecret::new("whsec_guess".into());
    let mut wrong_amount = event.clone();
    wrong_amount["data"]["object"]["amount_total"] = json!(1);
    let mut wrong_currency = event.clone();
    wrong_currency["data"]["object"]["currency"] = json!("eur");
    let mut unknown_order = event.clone();
    unknown_order["data"]["object"]["client_reference_id"] = json!("999999");
    let mut other_checkout = event.clone();
    other_checkout["data"]["object"]["id"] = json!("cs_someone_elses");
    let attempts: Vec<(&str, String, String)> = vec![
        (
            "tampered body",
            tampered_body.clone(),
            good_signature.clone(),
        ),
        (
            "tampered signature",
            body.clone(),
            good_signature.replace("v1=", "v1=00"),
        ),
        (
            "another secret",
            body.clone(),
            other_secret.sign(now, body.as_bytes()),
        ),
        ("no signature", body.clone(), String::new()),
        (
            "stale timestamp",
            body.clone(),
            secret.sign(now - 301, body.as_bytes()),
        ),
        (
            "unknown order",
            unknown_order.to_string(),
            secret.sign(now, unknown_order.to_string().as_bytes()),
        ),
        (
            "another checkout",
            other_checkout.to_string(),
            secret.sign(now, other_checkout.to_string().as_bytes()),
        ),
        (
            "wrong amount",
            wrong_amount.to_string(),
            secret.sign(now, wrong_amount.to_string().as_bytes()),
        ),
        (
            "wrong currency",
            wrong_currency.to_string(),
            secret.sign(now, wrong_currency.to_string().as_bytes()),
        ),
    ];
    let expected_codes = [
        "bad_signature",
        "bad_signature",
        "bad_signature",
        "bad_signature",
        "stale",
        "unknown_order",
        "unknown_order",
        "amount_mismatch",
        "currency_mismatch",
    ];
    for ((what, body, signature), code) in attempts.iter().zip(expected_codes) {
        let got = stack.post_webhook(body, signature).await;
        let message = expect_error(&got, StatusCode::BAD_REQUEST, code, None);
        println!("{what}: 400 {code}: {message}");
    }
    assert_eq!(balance(&buyer).await, trial, "a forgery credited time");
    assert_eq!(order_status(&buyer, order).await, "pending");
    assert_eq!(entries_for_order(&stack, "purchase", order).await, 0);
    // The webhook for another provider's address is not there.
    let r = stack
        .http()
        .post(stack.url("/api/v1/payments/webhooks/stripe"))
        .header("stripe-signature", &good_signature)
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);

    // Without JavaScript, the waiting return page refreshes itself.
    let waiting = buyer.page(&format!("/orders/{order}")).await;
    assert!(
        waiting.contains("<noscript><meta http-equiv=\"refresh\""),
        "{waiting}"
    );

    // The genuine webhook, 20 times at once: one credit.
    let genuine = body.clone();
    let answers = join_all((0..20).map(|_| stack.post_signed_webhook(&genuine))).await;
    let mut outcomes: Vec<String> = answers
        .iter()
        .map(|(status, body)| {
            assert_eq!(*status, StatusCode::OK, "{body}");
            body["outcome"].as_str().unwrap().to_owned()
        })
        .collect();
    outcomes.sort();
    assert_eq!(
        outcomes.iter().filter(|o| *o == "credited").count(),
        1,
        "{outcomes:?}"
    );
    assert!(
        outcomes.iter().all(|o| o == "credited" || o == "duplicate"),
        "{outcomes:?}"
    );
    assert_eq!(balance(&buyer).await, trial + starter.compute_seconds);
    assert_eq!(order_status(&buyer, order).await, "paid");
    assert_eq!(entries_for_order(&stack, "purchase", order).await, 1);
    let paid_page = buyer.page(&format!("/orders/{order}")).await;
    assert!(
        paid_page.contains("Payment received: 10 h added."),
        "{paid_page}"
    );
    assert!(
        !paid_page.contains("http-equiv=\"refresh\""),
        "a paid order stops refreshing"
    );

    // Late and out of order: a second event for the same payment (async
    // success), and the first again a minute's worth later, credit nothing.
    let mut late = event.clone();
    late["id"] = json!("evt_async_success");
    late["type"] = json!("checkout.session.async_payment_succeeded");
    let (status, answer) = stack.post_signed_webhook(&late.to_string()).await;
    assert_eq!(
        (status, answer["outcome"].as_str()),
        (StatusCode::OK, Some("already_paid"))
    );
    let (_, again) = stack.post_signed_webhook(&genuine).await;
    assert_eq!(again["outcome"], "duplicate");
    assert_eq!(balance(&buyer).await, trial + starter.compute_seconds);

    // Another user cannot read the order, nor order with a made-up price.
    let other = stack.new_user().await;
    assert_eq!(
        other.get(&format!("/api/v1/orders/{order}")).await.0,
        StatusCode::NOT_FOUND
    );
    let (status, _) = other
        .post(
            "/api/v1/orders",
            json!({"package_id": starter.id, "price_minor": 1}),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "unknown fields are refused"
    );
    stack.assert_ledger_adds_up().await;

    // Rejections are counted by reason.
    let metrics = stack
        .as_gateway(reqwest::Method::GET, "/metrics")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    // (Every reason is there from the start, at 0.)
    let metrics = Exposition::parse(&metrics).unwrap();
    for reason in ["bad_signature", "stale", "unknown_order", "amount_mismatch"] {
        let counted = metrics.value(
            "opencloud_control_webhook_rejections_total",
            &[("provider", "sandbox"), ("reason", reason)],
        );
        assert!(
            counted >= Some(1.0),
            "no rejection counted for {reason}: {counted:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn two_hundred_purchases_by_fifty_users_at_once_add_up_to_the_cent() {
    let stack = TestStack::control_only().await.unwrap();
    stack.admin().await;
    let packages = stack.packages_on_sale().await;
    let users = join_all((0..50).map(|_| stack.new_user())).await;
    let started = Instant::now();
    let purchases = users.iter().enumerate().flat_map(|(n, user)| {
        let stack = &stack;
        let packages = &packages;
        (0..4).map(move |k| {
            let package = packages[(n + k) % packages.len()].clone();
            async move {
                let order = place_order(user, package.id).await;
                let event = stack
                    .paid_event(order, &format!("evt_{order}"))
                    .await
                    .to_string();
                // Every other payment's webhook is delivered twice at once.
                let copies = if order % 2 == 0 { 2 } else { 1 };
                let answers =
                    join_all((0..copies).map(|_| stack.post_signed_webhook(&event))).await;
                for (status, body) in answers {
                    assert_eq!(status, StatusCode::OK, "{body}");
                }
                (user.id, package)
            }
        })
    });
    let bought = join_all(purchases).await;
    let took = started.elapsed();
    println!(
        "200 purchases by 50 users in {took:?} ({:.0} purchases/s)",
        200.0 / took.as_secs_f64()
    );
    assert_eq!(stack.db.count("orders WHERE status = 'paid'").await, 200);
    assert_eq!(
        stack
            .db
            .count("ledger_entries WHERE kind = 'purchase'")
            .await,
        200
    );
    for user in &users {
        let expected: u64 = 1800
            + bought
                .iter()
                .filter(|(id, _)| *id == user.id)
                .map(|(_, p)| p.compute_seconds)
                .sum::<u64>();
        assert_eq!(balance(user).await, expected, "user {}", user.id);
    }
    let revenue: i64 = stack
        .db
        .conn()
        .await
        .query_first(
            "SELECT CAST(SUM(amount_micro) AS SIGNED) FROM ledger_entries WHERE kind = 'purchase'",
        )
        .await
        .unwrap()
        .unwrap();
    let paid: u64 = bought.iter().map(|(_, p)| p.price_minor).sum();
    assert_eq!(revenue, paid as i64 * 1_000_000);
    stack.assert_ledger_adds_up().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn open_is_refused_without_compute_time_beyond_the_packages_sessions_and_for_retired_packages(
) {
    let stack = TestStack::with_gateway_env(env(&[
        ("SIGNUP_GRANT_SECONDS", "0"),
        ("TRIAL__SESSIONS_AT_ONCE", "1"),
    ]))
    .await
    .unwrap();
    let admin = stack.admin().await;
    let owner = stack.host_owner().await;
    let [(_host, _agent)] = stack.online_hosts(&owner, [("host-a", 4)]).await;

    // No balance: a clear refusal with the way to Packages, page and JSON.
    let broke = stack.new_user().await;
    assert_eq!(balance(&broke).await, 0);
    let project = broke.create_project("Thesis").await;
    let got = broke
        .post(&format!("/api/v1/projects/{project}/open"), json!({}))
        .await;
    let message = expect_error(&got, StatusCode::PAYMENT_REQUIRED, "no_balance", None);
    assert!(message.contains("Packages"), "{message}");
    let csrf = hidden_input(&broke.page("/projects").await, "csrf");
    let r = broke
        .post_form(&format!("/projects/{project}/open"), &[("csrf", &csrf)])
        .await;
    assert_eq!(r.status(), StatusCode::PAYMENT_REQUIRED);
    let page = r.text().await.unwrap();
    assert!(
        page.contains("no compute time left") && page.contains("href=\"/packages\""),
        "{page}"
    );
    assert_eq!(stack.db.count("sessions").await, 0);

    // An admin grant (trial limits: one session at once): one opens, a
    // second is refused and names the limit.
    let (status, body) = admin
        .post(
            &format!("/api/v1/admin/users/{}/credit", broke.id),
            json!({"seconds": 600, "reason": "support ticket 42"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (sid, _) = open(&broke, project).await;
    let second = broke.create_project("Side quest").await;
    let got = broke
        .post(&format!("/api/v1/projects/{second}/open"), json!({}))
        .await;
    let message = expect_error(&got, StatusCode::CONFLICT, "limit_reached", None);
    assert!(message.contains("1 session at once"), "{message}");
    // Opening the running project again is no new session.
    assert_eq!(open(&broke, project).await.0, sid);
    // Stopped, the place is theirs again at once, while the server still
    // stops (and saves) on its host.
    let (status, body) = broke
        .post(&format!("/api/v1/sessions/{sid}/stop"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = broke
        .post(&format!("/api/v1/projects/{second}/open"), json!({}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");

    // A retired package cannot be bought; an unknown one is named.
    let starter = stack.packages_on_sale().await.remove(0);
    admin
        .patch_json(
            &format!("/api/v1/admin/packages/{}", starter.id),
            json!({"retired": true}),
        )
        .await;
    let got = broke
        .post("/api/v1/orders", json!({"package_id": starter.id}))
        .await;
    let message = expect_error(&got, StatusCode::CONFLICT, "conflict", Some("package_id"));
    assert!(message.contains("no longer sold"), "{message}");
    let got = broke
        .post("/api/v1/orders", json!({"package_id": 987654}))
        .await;
    expect_error(
        &got,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid",
        Some("package_id"),
    );
    assert_eq!(stack.db.count("orders").await, 0);
}

/// (ready_at → ended_at in whole seconds, metered seconds, unpaid seconds, end reason).
async fn metered(stack: &TestStack, sid: &str) -> (i64, u64, u64, Option<String>) {
    stack
        .db
        .conn()
        .await
        .exec_first(
            "SELECT TIMESTAMPDIFF(SECOND, ready_at, ended_at), metered_seconds, unpaid_seconds, end_reason
             FROM sessions WHERE sid = ?",
            (sid,),
        )
        .await
        .unwrap()
        .unwrap()
}

async fn wait_ended(stack: &TestStack, sid: &str, limit: Duration) -> Duration {
    eventually("the session ending", limit, || async {
        let state = stack.session_row(sid).await.1;
        matches!(state.as_str(), "stopped" | "failed" | "lost").then_some(())
    })
    .await
    .1
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_is_charged_by_the_second_and_its_host_owner_earns_exactly_the_share() {
    let stack = TestStack::with_gateway_env(env(&[("SIGNUP_GRANT_SECONDS", "0")]))
        .await
        .unwrap();
    let admin = stack.admin().await;
    let owner = stack.host_owner().await;
    let [(host, _agent)] = stack.online_hosts(&owner, [("host-a", 2)]).await;
    // A package below the host's fair share (1 core, 1024 MiB here), so its
    // limits are the ones the sandbox gets.
    let (status, body) = admin
        .post(
            "/api/v1/admin/packages",
            json!({"name": "Tiny", "price_minor": 500, "currency": "USD", "compute_minutes": 600,
                   "max_concurrent_sessions": 1, "cpu_cores": 0.25, "memory_mib": 512,
                   "storage_quota_mib": 100, "validity_days": 30}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let starter = stack
        .packages_on_sale()
        .await
        .into_iter()
        .find(|p| p.name == "Tiny")
        .unwrap();
    let user = stack.new_user().await;
    stack.buy(&user, starter.id).await;
    let bought = balance(&user).await;
    assert_eq!(bought, starter.compute_seconds);
    // The lot carries the package's storage quota (for project snapshots).
    let storage: Option<u32> = stack
        .db
        .conn()
        .await
        .exec_first(
            "SELECT storage_mib FROM lots WHERE user_id = ? AND source = 'purchase'",
            (user.id,),
        )
        .await
        .unwrap();
    assert_eq!(storage, Some(100));

    let project = user.create_project("Metered").await;
    let (sid, _) = open(&user, project).await;
    wait_running(&stack, &sid).await;
    let ran_from = Instant::now();
    // cgroup v1 (controller, file) or v2 file.
    let cgroup = |v1: (&str, &str), v2: &str| {
        std::fs::read_to_string(format!("/sys/fs/cgroup/{}/opencloud/{sid}/{}", v1.0, v1.1))
            .or_else(|_| std::fs::read_to_string(format!("/sys/fs/cgroup/opencloud/{sid}/{v2}")))
            .unwrap()
    };
    let quota = cgroup(("cpu", "cpu.cfs_quota_us"), "cpu.max");
    assert!(quota.starts_with("25000"), "a quarter core: {quota}");
    let memory = cgroup(("memory", "memory.limit_in_bytes"), "memory.max");
    assert_eq!(
        memory.trim(),
        (512u64 << 20).to_string(),
        "the package's memory"
    );
    // Charged while it runs, at least every 10 s.
    let (_, took) = eventually(
        "a charge while running",
        Duration::from_secs(15),
        || async { (balance(&user).await < bought).then_some(()) },
    )
    .await;
    println!("first charge {took:?} after running");
    tokio::time::sleep(Duration::from_secs(30).saturating_sub(ran_from.elapsed())).await;
    let (status, body) = user
        .post(&format!("/api/v1/sessions/{sid}/stop"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let stop_took = wait_ended(&stack, &sid, Duration::from_secs(30)).await;
    let (ran, metered_s, unpaid, _) = metered(&stack, &sid).await;
    let cost = bought - balance(&user).await;
    println!(
        "ran {ran} s by the database (stop took {stop_took:?}), charged {cost} s, unpaid {unpaid}"
    );
    assert_eq!(cost as i64, ran, "charged exactly ready → end");
    assert_eq!(metered_s, cost);
    assert_eq!(unpaid, 0);
    assert!(
        (29..=31 + stop_took.as_secs() as i64 + 1).contains(&ran),
        "ran {ran} s"
    );

    // The owner's share of exactly this session's price, to the micro unit.
    let mut conn = stack.db.conn().await;
    let (value, earned): (i64, i64) = conn
        .exec_first(
            "SELECT CAST(-SUM(CASE WHEN kind = 'usage' THEN amount_micro ELSE 0 END) AS SIGNED),
                    CAST(SUM(CASE WHEN kind = 'earning' THEN amount_micro ELSE 0 END) AS SIGNED)
             FROM ledger_entries WHERE sid = ?",
            (&sid,),
        )
        .await
        .unwrap()
        .unwrap();
    let price_micro = starter.price_minor as i128 * 1_000_000;
    let expected_value = (price_micro * cost as i128 / starter.compute_seconds as i128) as i64;
    assert_eq!(
        value, expected_value,
        "the session's price is its seconds' share of the package"
    );
    assert_eq!(earned, value * 70 / 100, "the owner's 70 %");
    let owner_entries: u64 = stack
        .db
        .count(&format!(
            "ledger_entries WHERE kind = 'earning' AND host_id = {host} AND user_id = {}",
            owner.id
        ))
        .await;
    assert!(owner_entries >= 1);
    println!("session price {value} µ-minor, owner earned {earned} µ-minor");
    stack.assert_ledger_adds_up().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_warns_then_stops_when_the_balance_runs_out_and_the_balance_stays_at_zero() {
    let stack = TestStack::with_gateway_env(env(&[("SIGNUP_GRANT_SECONDS", "90")]))
        .await
        .unwrap();
    let owner = stack.host_owner().await;
    let [(_host, _agent)] = stack.online_hosts(&owner, [("host-a", 2)]).await;
    let user = stack.new_user().await;
    assert_eq!(balance(&user).await, 90);
    let project = user.create_project("Short").await;
    let (sid, _) = open(&user, project).await;
    wait_running(&stack, &sid).await;
    let running_at = Instant::now();

    // The warning: on the session's API, the project page and the list.
    let session: Value = user.get_json(&format!("/api/v1/sessions/{sid}")).await;
    let warning = session["balance_warning"]
        .as_str()
        .unwrap_or_else(|| panic!("no warning: {session}"));
    assert!(warning.contains("runs out"), "{warning}");
    for page in [format!("/projects/{project}"), "/projects".to_owned()] {
        let html = user.page(&page).await;
        assert!(
            html.contains("id=\"balance-warning\""),
            "{page} shows no warning"
        );
    }

    // And in Lab: the gateway adds the banner's script to Lab's page and
    // answers its question for the session's owner only.
    let cookie = stack.enter(&user, &sid).await;
    let gateway = stack.gateway();
    let in_session = |path: &str| {
        gateway
            .client(&[&sid], false)
            .get(format!("{}{path}", gateway.session_origin(&sid)))
            .header("cookie", &cookie)
    };
    let lab = in_session("/lab").send().await.unwrap();
    assert_eq!(lab.status(), StatusCode::OK);
    let html = lab.text().await.unwrap();
    assert!(
        html.trim_end()
            .ends_with("<script src=\"/_oc/banner.js\" defer></script>"),
        "Lab's page ends with the banner's script: {}",
        &html[html.len().saturating_sub(200)..]
    );
    let notice: Value = in_session("/_oc/balance")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        notice["warning"].as_str().unwrap().contains("runs out"),
        "{notice}"
    );
    assert!(
        notice["packages_url"]
            .as_str()
            .unwrap()
            .ends_with("/packages"),
        "{notice}"
    );
    let script = in_session("/_oc/banner.js").send().await.unwrap();
    assert!(script.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/javascript"));
    assert!(script.text().await.unwrap().contains("oc-balance-banner"));
    let api = in_session("/api/contents")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!api.contains("banner.js"), "only Lab's page is changed");
    // Someone else's cookie learns nothing of this owner's balance.
    let stranger = stack.new_user().await;
    let r = gateway
        .client(&[&sid], false)
        .get(format!("{}/_oc/balance", gateway.session_origin(&sid)))
        .bearer_auth(&stranger.token)
        .send()
        .await
        .unwrap();
    assert_ne!(r.status(), StatusCode::OK, "a stranger got the balance");

    let took = wait_ended(&stack, &sid, Duration::from_secs(150)).await;
    let (ran, metered_s, unpaid, reason) = metered(&stack, &sid).await;
    println!(
        "stopped {:?} after running (ran {ran} s, metered {metered_s} s, unpaid {unpaid} s)",
        running_at.elapsed()
    );
    let _ = took;
    assert_eq!(reason.as_deref(), Some("balance_exhausted"));
    assert_eq!(
        balance(&user).await,
        0,
        "the balance is spent, and not below"
    );
    assert_eq!(metered_s - unpaid, 90, "exactly the balance was charged");
    let body = user.get_json(&format!("/api/v1/sessions/{sid}")).await;
    assert!(
        body["ended_because"]
            .as_str()
            .unwrap()
            .contains("compute time ran out"),
        "{body}"
    );
    // And no new session without buying.
    let got = user
        .post(&format!("/api/v1/projects/{project}/open"), json!({}))
        .await;
    expect_error(&got, StatusCode::PAYMENT_REQUIRED, "no_balance", None);
    stack.assert_ledger_adds_up().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn usage_takes_the_lot_that_expires_first_and_an_expired_lot_is_written_off() {
    let stack = TestStack::control_only_with(ControlOptions::default())
        .await
        .unwrap();
    let admin = stack.admin().await;
    let starter = stack.packages_on_sale().await.remove(0);
    let user = stack.new_user().await;
    stack.buy(&user, starter.id).await;
    let (trial_lot, bought_lot): (u64, u64) = stack
        .db
        .conn()
        .await
        .exec_first(
            "SELECT MIN(id), MAX(id) FROM lots WHERE user_id = ?",
            (user.id,),
        )
        .await
        .unwrap()
        .unwrap();
    // Time travel, the one thing a test cannot wait for: the bought lot
    // now ends before the trial does.
    let mut conn = stack.db.conn().await;
    conn.exec_drop(
        "UPDATE lots SET expires_at = UTC_TIMESTAMP(6) + INTERVAL 1 HOUR WHERE id = ?",
        (bought_lot,),
    )
    .await
    .unwrap();
    // A debit takes from the lot that expires first.
    let (status, body) = admin
        .post(
            &format!("/api/v1/admin/users/{}/credit", user.id),
            json!({"seconds": -100, "reason": "chargeback review"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let left = |lot: u64| {
        let stack = &stack;
        async move {
            let left: u64 = stack
                .db
                .conn()
                .await
                .exec_first("SELECT seconds_left FROM lots WHERE id = ?", (lot,))
                .await
                .unwrap()
                .unwrap();
            left
        }
    };
    assert_eq!(left(bought_lot).await, starter.compute_seconds - 100);
    assert_eq!(left(trial_lot).await, 1800);

    // Past its validity, the bought lot is written off by an entry.
    conn.exec_drop(
        "UPDATE lots SET expires_at = UTC_TIMESTAMP(6) - INTERVAL 1 SECOND WHERE id = ?",
        (bought_lot,),
    )
    .await
    .unwrap();
    assert_eq!(
        balance(&user).await,
        1800,
        "an expired lot no longer counts"
    );
    let (_, took) = eventually(
        "the expired lot written off",
        Duration::from_secs(20),
        || async {
            (stack
                .db
                .count(&format!(
                    "ledger_entries WHERE kind = 'expiry' AND lot_id = {bought_lot}"
                ))
                .await
                == 1)
                .then_some(())
        },
    )
    .await;
    println!("expired lot written off {took:?} after its end");
    let written_off: i64 = conn
        .exec_first(
            "SELECT seconds FROM ledger_entries WHERE kind = 'expiry' AND lot_id = ?",
            (bought_lot,),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(written_off, -((starter.compute_seconds - 100) as i64));
    assert_eq!(left(bought_lot).await, 0);
    assert_eq!(balance(&user).await, 1800);
    stack.assert_ledger_adds_up().await;
}
