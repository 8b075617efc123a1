#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test
//! What users and admins see of money: compute time on My account,
//! earnings on My hosts, the admins' Billing page, grants and revocations,
//! refunds and payouts, through the JSON API and the pages. The attacks
//! first: nobody but an admin moves money, nobody sees another's.

use std::time::{Duration, Instant};

use mysql_async::prelude::*;
use opencloud_e2e::{expect_error, expect_not_found, hidden_input, TestStack, TestUser};
use reqwest::header::LOCATION;
use reqwest::StatusCode;
use serde_json::{json, Value};

/// The sign-up grant every new user starts with (billing.signup_grant_seconds).
const SIGNUP_SECONDS: u64 = 1800;

/// The seeded Starter package: 5.00 USD for 600 minutes.
const STARTER_MINOR: i64 = 500;
const STARTER_SECONDS: i64 = 600 * 60;

/// Buys the Starter package as `user` through the sandbox checkout, as a
/// browser does, and waits for its webhook; the order's id.
async fn buy_starter(user: &TestUser) -> u64 {
    let packages = user.get_json("/api/v1/packages").await;
    let starter = packages["packages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "Starter")
        .expect("the seeded Starter package (stack.admin() seeds it)")["id"]
        .as_u64()
        .unwrap();
    let (status, body) = user
        .post("/api/v1/orders", json!({"package_id": starter}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let order = body["order_id"].as_u64().unwrap();
    let checkout = format!("/checkout/sandbox/{order}");
    let csrf = hidden_input(&user.page(&checkout).await, "csrf");
    let r = user
        .post_form(
            &checkout,
            &[
                ("csrf", csrf.as_str()),
                ("card_number", "4242 4242 4242 4242"),
                ("expiry", "12/40"),
                ("cvc", "123"),
            ],
        )
        .await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let body = user.get_json(&format!("/api/v1/orders/{order}")).await;
        if body["paid"] == true {
            return order;
        }
        assert!(
            Instant::now() < deadline,
            "the order was never paid: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Records that `customer` used `seconds` on a new host of `owner`'s,
/// ended now, as control does after an agent reports the session stopped
/// (without an agent); metering charges it within seconds. The host's id.
async fn used_on_host_of(
    stack: &TestStack,
    customer: &TestUser,
    owner: &TestUser,
    seconds: u64,
) -> u64 {
    let project = customer.create_project("Paid work").await;
    let (status, body) = owner
        .post("/api/v1/hosts", json!({"name": "Attic PC"}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let host = body["host"]["id"].as_u64().unwrap();
    let mut conn = stack.db.conn().await;
    // Stopping with its end set: metering charges up to `ended_at`, exactly.
    conn.exec_drop(
        "INSERT INTO sessions (sid, project_id, user_id, host_id, state, host_share_percent,
            created_at, ready_at, ended_at)
         VALUES (?, ?, ?, ?, 'stopping', 70, UTC_TIMESTAMP(6) - INTERVAL ? SECOND,
                 UTC_TIMESTAMP(6) - INTERVAL ? SECOND, UTC_TIMESTAMP(6))",
        (
            opencloud_protocol::routes::new_sid(),
            project,
            customer.id,
            host,
            seconds,
            seconds,
        ),
    )
    .await
    .unwrap();
    host
}

/// Waits until `owner`'s earnings API shows something owed; the answer.
async fn owed_to(owner: &TestUser) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let body = owner.get_json("/api/v1/hosts/earnings").await;
        if body["owed"].as_array().is_some_and(|o| !o.is_empty()) {
            return body;
        }
        assert!(Instant::now() < deadline, "nothing was ever owed: {body}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn balance(user: &TestUser) -> u64 {
    user.get_json("/api/v1/me").await["balance_seconds"]
        .as_u64()
        .unwrap()
}

/// The CSRF token `user`'s forms carry (any page shows it).
async fn csrf(user: &TestUser) -> String {
    hidden_input(&user.page("/account").await, "csrf")
}

#[tokio::test]
async fn customers_and_host_owners_cannot_use_the_admins_money_calls_or_pages() {
    let stack = TestStack::control_only().await.unwrap();
    let admin = stack.admin().await;
    let customer = stack.new_user().await;
    let owner = stack.host_owner().await;
    let order = buy_starter(&customer).await;
    let owner_id = owner.id.to_string();
    for who in [&customer, &owner] {
        let token = csrf(who).await;
        let calls = [
            who.get("/api/v1/admin/billing").await,
            who.post(
                &format!("/api/v1/admin/users/{}/credit", who.id),
                json!({"seconds": 360_000, "reason": "free time for me"}),
            )
            .await,
            who.post(
                &format!("/api/v1/admin/orders/{order}/refund"),
                json!({"reason": "I want my money and the time"}),
            )
            .await,
            who.post(
                "/api/v1/admin/payouts",
                json!({"owner_id": owner.id, "amount_minor": 1, "currency": "USD", "reference": "x"}),
            )
            .await,
        ];
        for got in &calls {
            expect_error(got, StatusCode::FORBIDDEN, "forbidden", None);
        }
        assert_eq!(
            who.get_text("/admin/billing").await.0,
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            who.get_text(&format!("/admin/users/{}", who.id)).await.0,
            StatusCode::FORBIDDEN
        );
        let forms = [
            who.post_form(
                &format!("/admin/users/{}/credit", who.id),
                &[
                    ("csrf", token.as_str()),
                    ("action", "grant"),
                    ("amount", "6000"),
                    ("unit", "minutes"),
                    ("reason", "free time for me"),
                ],
            )
            .await,
            who.post_form(
                &format!("/admin/orders/{order}/refund"),
                &[("csrf", token.as_str()), ("reason", "I want my money")],
            )
            .await,
            who.post_form(
                "/admin/billing/payouts",
                &[
                    ("csrf", token.as_str()),
                    ("owner_id", owner_id.as_str()),
                    ("amount", "0.01"),
                    ("currency", "USD"),
                    ("reference", "x"),
                ],
            )
            .await,
        ];
        for r in forms {
            assert_eq!(r.status(), StatusCode::FORBIDDEN);
        }
    }
    // Nothing moved.
    assert_eq!(
        balance(&customer).await,
        SIGNUP_SECONDS + STARTER_SECONDS as u64
    );
    assert_eq!(balance(&owner).await, SIGNUP_SECONDS);
    let body = customer.get_json(&format!("/api/v1/orders/{order}")).await;
    assert_eq!(body["order"]["status"], "paid");
    assert!(
        admin.get_json("/api/v1/admin/billing").await["summary"]["payouts"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    // A customer has no earnings to look at.
    expect_error(
        &customer.get("/api/v1/hosts/earnings").await,
        StatusCode::FORBIDDEN,
        "forbidden",
        None,
    );
}

#[tokio::test]
async fn nobody_sees_another_users_order_receipt_or_compute_time() {
    let stack = TestStack::control_only().await.unwrap();
    stack.admin().await;
    let buyer = stack.new_user().await;
    let other = stack.new_user().await;
    let order = buy_starter(&buyer).await;

    expect_not_found(&other.get(&format!("/api/v1/orders/{order}")).await);
    for page in [
        format!("/orders/{order}"),
        format!("/orders/{order}/receipt"),
    ] {
        let (status, body) = other.get_text(&page).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{page}");
        assert!(!body.contains(&buyer.email), "{page} names the buyer");
    }
    let theirs = other.get_json("/api/v1/me/billing").await;
    assert!(
        theirs["payments"].as_array().unwrap().is_empty(),
        "{theirs}"
    );
    assert_eq!(theirs["plan"]["balance_seconds"], SIGNUP_SECONDS);
    assert!(!other.page("/account").await.contains("Starter"));

    // The buyer sees theirs, with the receipt.
    let mine = buyer.get_json("/api/v1/me/billing").await;
    assert_eq!(mine["payments"][0]["id"], order);
    assert!(buyer
        .page(&format!("/orders/{order}/receipt"))
        .await
        .contains("5.00 USD"));
}

#[tokio::test]
async fn a_grant_needs_a_reason_and_a_revocation_never_takes_more_than_the_balance() {
    let stack = TestStack::control_only().await.unwrap();
    let admin = stack.admin().await;
    let user = stack.new_user().await;
    let credit = format!("/api/v1/admin/users/{}/credit", user.id);

    // Without a reason (missing or blank), nothing is granted.
    for body in [
        json!({"seconds": 600}),
        json!({"seconds": 600, "reason": "   "}),
    ] {
        expect_error(
            &admin.post(&credit, body).await,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            Some("reason"),
        );
    }
    expect_error(
        &admin
            .post(&credit, json!({"seconds": 0, "reason": "nothing"}))
            .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid",
        Some("seconds"),
    );
    expect_not_found(
        &admin
            .post(
                "/api/v1/admin/users/987654321/credit",
                json!({"seconds": 60, "reason": "nobody"}),
            )
            .await,
    );
    assert_eq!(balance(&user).await, SIGNUP_SECONDS);

    // A grant shows in the balance and on My account.
    let body = admin
        .post_json(
            &credit,
            json!({"seconds": 5400, "reason": "sorry for the outage"}),
        )
        .await;
    assert_eq!(body["moved_seconds"], 5400);
    assert_eq!(body["balance_seconds"], SIGNUP_SECONDS + 5400);
    assert_eq!(balance(&user).await, SIGNUP_SECONDS + 5400);
    let page = user.page("/account").await;
    assert!(page.contains("Compute time"), "{page}");
    assert!(
        page.contains("data-seconds=\"7200\">2 h</p>"),
        "the balance: {page}"
    );
    assert!(page.contains("1 h 30 min"), "the granted lot: {page}");
    let summary = user.get_json("/api/v1/me/billing").await;
    let lots = summary["lots"].as_array().unwrap();
    assert_eq!(lots.len(), 2, "{summary}");
    assert!(lots
        .iter()
        .all(|l| l["source"] == "grant" && l["expired"] == false));

    // A revocation takes part, then at most what is left, never below zero.
    let body = admin
        .post_json(&credit, json!({"seconds": -1200, "reason": "double grant"}))
        .await;
    assert_eq!(body["moved_seconds"], -1200);
    assert_eq!(balance(&user).await, SIGNUP_SECONDS + 5400 - 1200);
    let body = admin
        .post_json(
            &credit,
            json!({"seconds": -100_000, "reason": "account closed"}),
        )
        .await;
    assert_eq!(body["moved_seconds"], -(SIGNUP_SECONDS as i64 + 4200));
    assert_eq!(body["balance_seconds"], 0);
    let body = admin
        .post_json(&credit, json!({"seconds": -60, "reason": "again"}))
        .await;
    assert_eq!(body["moved_seconds"], 0);
    assert_eq!(balance(&user).await, 0);
    let page = user.page("/account").await;
    assert!(page.contains("No compute time left"), "{page}");

    // The same through the admin's form: errors next to their field, with
    // what was typed kept; a success redirects to the user's page.
    let user_page = format!("/admin/users/{}", user.id);
    let token = hidden_input(&admin.page(&user_page).await, "csrf");
    let form = format!("{user_page}/credit");
    let r = admin
        .post_form(
            &form,
            &[
                ("csrf", token.as_str()),
                ("action", "grant"),
                ("amount", "45"),
                ("unit", "minutes"),
                ("reason", ""),
            ],
        )
        .await;
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let page = r.text().await.unwrap();
    assert!(page.contains("class=\"field-error\""), "{page}");
    assert!(page.contains("value=\"45\""), "the amount is kept: {page}");
    assert!(
        page.find("field-error").unwrap() > page.find("id=\"reason\"").unwrap(),
        "the error sits under the reason field"
    );
    let r = admin
        .post_form(
            &form,
            &[
                ("csrf", token.as_str()),
                ("action", "grant"),
                ("amount", "lots"),
                ("unit", "minutes"),
                ("reason", "kept reason"),
            ],
        )
        .await;
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let page = r.text().await.unwrap();
    assert!(page.contains("Enter a whole number"), "{page}");
    assert!(page.contains("value=\"kept reason\""), "{page}");
    assert_eq!(balance(&user).await, 0);
    let r = admin
        .post_form(
            &form,
            &[
                ("csrf", token.as_str()),
                ("action", "grant"),
                ("amount", "45"),
                ("unit", "minutes"),
                ("reason", "goodwill"),
            ],
        )
        .await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let to = r.headers()[LOCATION].to_str().unwrap().to_owned();
    assert_eq!(to, format!("{user_page}?moved=2700"));
    let page = admin.page(&to).await;
    assert!(page.contains("Granted 45 min 00 s."), "{page}");
    assert!(page.contains("data-seconds=\"2700\""), "{page}");
    assert_eq!(balance(&user).await, 2700);
    let r = admin
        .post_form(
            &form,
            &[
                ("csrf", token.as_str()),
                ("action", "revoke"),
                ("amount", "100000"),
                ("unit", "seconds"),
                ("reason", "test over"),
            ],
        )
        .await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(balance(&user).await, 0);
}

#[tokio::test]
async fn a_payout_is_at_most_what_is_owed_and_shows_on_both_sides() {
    let stack = TestStack::control_only().await.unwrap();
    let admin = stack.admin().await;
    let customer = stack.new_user().await;
    let owner = stack.host_owner().await;
    let payout = |amount_minor: u64, reference: &str| json!({"owner_id": owner.id, "amount_minor": amount_minor, "currency": "USD", "reference": reference});

    // Nothing owed yet: any payout is too much.
    let message = expect_error(
        &admin
            .post("/api/v1/admin/payouts", payout(1, "early"))
            .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid",
        Some("amount_minor"),
    );
    assert!(message.contains("0.0000 USD"), "{message}");

    // Two hours on the owner's host: the sign-up grant's half hour first
    // (it expires first, and earns nothing), then 1.5 h of the Starter.
    buy_starter(&customer).await;
    let host = used_on_host_of(&stack, &customer, &owner, 7200).await;
    let earnings = owed_to(&owner).await;
    let paid_micro = STARTER_MINOR * 1_000_000 * 5400 / STARTER_SECONDS;
    let earned = paid_micro * 70 / 100;
    assert_eq!(earnings["owed"][0]["currency"], "USD");
    assert_eq!(earnings["owed"][0]["amount_micro"], earned, "{earnings}");
    assert_eq!(earnings["owed"][0]["text"], "0.5250 USD");
    assert_eq!(earnings["hosts"][0]["host_id"], host);
    let listed = owner.get_json("/api/v1/hosts").await;
    assert_eq!(listed["hosts"][0]["earnings"], "0.5250 USD", "{listed}");
    let days = earnings["days"].as_array().unwrap();
    let used: u64 = days
        .iter()
        .map(|d| d["seconds_used"].as_u64().unwrap())
        .sum();
    assert_eq!(used, 7200, "{earnings}");
    let usd = days.iter().find(|d| d["currency"] == "USD").unwrap();
    assert_eq!(
        (usd["seconds_used"].as_u64(), usd["earned_micro"].as_i64()),
        (Some(5400), Some(earned))
    );

    // The customer sees the session's time, paid and unpaid.
    let summary = customer.get_json("/api/v1/me/billing").await;
    let usage = &summary["usage"][0];
    assert_eq!(
        (
            &usage["metered_seconds"],
            &usage["paid_seconds"],
            &usage["unpaid_seconds"]
        ),
        (&json!(7200), &json!(7200), &json!(0)),
        "{summary}"
    );
    assert_eq!(usage["project_name"], "Paid work");

    // More than owed, or without a reference, is refused and moves nothing.
    expect_error(
        &admin
            .post("/api/v1/admin/payouts", payout(53, "too much"))
            .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid",
        Some("amount_minor"),
    );
    expect_error(
        &admin.post("/api/v1/admin/payouts", payout(10, " ")).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid",
        Some("reference"),
    );
    expect_error(
        &admin
            .post(
                "/api/v1/admin/payouts",
                json!({"owner_id": owner.id, "amount_minor": 10, "currency": "EUR", "reference": "wrong money"}),
            )
            .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid",
        Some("amount_minor"),
    );
    let (status, body) = admin
        .post("/api/v1/admin/payouts", payout(50, "transfer 0001"))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["owed"][0]["amount_micro"], earned - 50_000_000);

    // The owner's page: earnings per host and day, owed, the payout.
    let page = owner.page("/hosts").await;
    let row = page
        .split(&format!("<tr data-host-id=\"{host}\">"))
        .nth(1)
        .and_then(|rest| rest.split("</tr>").next())
        .expect("the host's row");
    assert!(row.contains("0.5250 USD"), "the host's earnings: {row}");
    assert!(page.contains("0.0250 USD"), "owed: {page}");
    assert!(page.contains("transfer 0001"), "{page}");
    assert!(page.contains("1 h 30 min"), "time used, paid: {page}");

    // The admin's page: revenue, owed, the payout; a refused form keeps
    // what was typed and says why next to the amount.
    let page = admin.page("/admin/billing").await;
    assert!(page.contains("5.00 USD"), "revenue: {page}");
    assert!(page.contains(&owner.email), "{page}");
    assert!(page.contains("transfer 0001"), "{page}");
    let token = hidden_input(&page, "csrf");
    let owner_id = owner.id.to_string();
    let r = admin
        .post_form(
            "/admin/billing/payouts",
            &[
                ("csrf", token.as_str()),
                ("owner_id", owner_id.as_str()),
                ("amount", "0.03"),
                ("currency", "USD"),
                ("reference", "transfer 0002"),
            ],
        )
        .await;
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let page = r.text().await.unwrap();
    assert!(page.contains("value=\"0.03\""), "{page}");
    assert!(page.contains("value=\"transfer 0002\""), "{page}");
    assert!(page.contains("a payout cannot be more"), "{page}");
    let r = admin
        .post_form(
            "/admin/billing/payouts",
            &[
                ("csrf", token.as_str()),
                ("owner_id", owner_id.as_str()),
                ("amount", "0.02"),
                ("currency", "USD"),
                ("reference", "transfer 0002"),
            ],
        )
        .await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let body = owner.get_json("/api/v1/hosts/earnings").await;
    assert_eq!(body["owed"][0]["amount_micro"], earned - 52_000_000);
    assert_eq!(body["payouts"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn an_admin_refunds_a_paid_order_with_a_reason_and_the_customer_sees_it() {
    let stack = TestStack::control_only().await.unwrap();
    let admin = stack.admin().await;
    let customer = stack.new_user().await;
    let order = buy_starter(&customer).await;
    let refund = format!("/api/v1/admin/orders/{order}/refund");

    let page = customer.page("/account").await;
    assert!(page.contains("10 h 30 min"), "balance: {page}");
    assert!(page.contains(&format!("/orders/{order}/receipt")), "{page}");
    let page = admin.page("/admin/billing").await;
    assert!(
        page.contains(&format!("/admin/orders/{order}/refund")),
        "{page}"
    );

    expect_error(
        &admin.post(&refund, json!({})).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid",
        Some("reason"),
    );
    let token = hidden_input(&page, "csrf");
    let r = admin
        .post_form(
            &format!("/admin/orders/{order}/refund"),
            &[("csrf", token.as_str()), ("reason", "")],
        )
        .await;
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert!(r.text().await.unwrap().contains("field-error"));
    assert_eq!(
        balance(&customer).await,
        SIGNUP_SECONDS + STARTER_SECONDS as u64
    );

    let body = admin
        .post_json(&refund, json!({"reason": "bought by mistake"}))
        .await;
    assert_eq!(body["order"]["status"], "refunded");
    assert_eq!(balance(&customer).await, SIGNUP_SECONDS);
    expect_error(
        &admin.post(&refund, json!({"reason": "twice"})).await,
        StatusCode::CONFLICT,
        "conflict",
        None,
    );

    let summary = customer.get_json("/api/v1/me/billing").await;
    assert_eq!(summary["payments"][0]["status"], "refunded");
    assert_eq!(summary["refunds"][0]["order_id"], order);
    assert_eq!(summary["refunds"][0]["seconds_taken"], STARTER_SECONDS);
    let page = customer.page("/account").await;
    assert!(page.contains("pay-refunded"), "{page}");
    assert!(page.contains("bought by mistake"), "{page}");
    assert!(page.contains(&format!("/orders/{order}/receipt")), "{page}");
    let billing = admin.get_json("/api/v1/admin/billing").await;
    let usd = &billing["summary"]["revenue"][0];
    assert_eq!(
        (
            &usd["purchases_minor"],
            &usd["refunds_minor"],
            &usd["net_minor"]
        ),
        (&json!(STARTER_MINOR), &json!(STARTER_MINOR), &json!(0))
    );
    assert_eq!(billing["summary"]["compute"]["refunded"], STARTER_SECONDS);
    let page = admin.page("/admin/billing").await;
    assert!(page.contains("0.00 USD"), "net revenue: {page}");
}
