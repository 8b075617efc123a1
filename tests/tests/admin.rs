#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test
//! The admin API: users (search, paging, disable, roles) and packages
//! (create, edit, retire), and that nobody else can reach it.

use opencloud_e2e::{expect_error, expect_not_found, listed, unique, TestStack, PASSWORD};
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test]
async fn an_admin_disables_a_user_who_then_cannot_log_in_and_loses_every_session() {
    let stack = TestStack::control_only().await.unwrap();
    let admin = stack.admin().await;
    let user = stack.new_user().await;

    let body = admin
        .patch_json(
            &format!("/api/v1/admin/users/{}", user.id),
            json!({"disabled": true}),
        )
        .await;
    assert_eq!(body["user"]["disabled"], true);
    assert_eq!(
        user.get("/api/v1/me").await.0,
        StatusCode::UNAUTHORIZED,
        "existing sessions end at once"
    );
    let message = expect_error(
        &stack.login(&user.email, PASSWORD).await,
        StatusCode::FORBIDDEN,
        "forbidden",
        None,
    );
    assert!(message.contains("disabled"), "{message}");

    admin
        .patch(
            &format!("/api/v1/admin/users/{}", user.id),
            json!({"disabled": false}),
        )
        .await;
    assert_eq!(stack.login(&user.email, PASSWORD).await.0, StatusCode::OK);
}

#[tokio::test]
async fn admins_search_and_page_through_users_and_change_roles() {
    let stack = TestStack::control_only().await.unwrap();
    let admin = stack.admin().await;
    let marker = unique("needle");
    for n in 0..23 {
        let (status, _) = stack
            .register(
                &format!("{marker}-{n}@example.com"),
                PASSWORD,
                &format!("Person {n}"),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED);
    }
    let body = admin
        .get_json(&format!(
            "/api/v1/admin/users?q={marker}&per_page=10&page=3"
        ))
        .await;
    assert_eq!(body["total"], 23);
    assert_eq!(body["users"].as_array().unwrap().len(), 3);
    // LIKE wildcards in the query are literal.
    let (_, body) = admin.get("/api/v1/admin/users?q=%25").await;
    assert_eq!(body["total"], 0, "{body}");

    let id = body_user_id(
        &admin
            .get(&format!("/api/v1/admin/users?q={marker}-7@"))
            .await
            .1,
    );
    let body = admin
        .patch_json(
            &format!("/api/v1/admin/users/{id}"),
            json!({"role": "host_owner"}),
        )
        .await;
    assert_eq!(body["user"]["role"], "host_owner");

    expect_error(
        &admin
            .patch(
                &format!("/api/v1/admin/users/{id}"),
                json!({"role": "emperor"}),
            )
            .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid",
        Some("role"),
    );
    expect_error(
        &admin.get("/api/v1/admin/users?page=0").await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid",
        Some("page"),
    );
    expect_error(
        &admin.get("/api/v1/admin/users?per_page=5000").await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid",
        Some("per_page"),
    );
    expect_error(
        &admin.get("/api/v1/admin/users?page=x").await,
        StatusCode::BAD_REQUEST,
        "bad_request",
        None,
    );
    expect_not_found(
        &admin
            .patch("/api/v1/admin/users/999999", json!({"disabled": true}))
            .await,
    );
    // An admin cannot lock themselves out.
    expect_error(
        &admin
            .patch(
                &format!("/api/v1/admin/users/{}", admin.id),
                json!({"disabled": true}),
            )
            .await,
        StatusCode::FORBIDDEN,
        "forbidden",
        None,
    );
    assert_eq!(stack.db.count("users WHERE disabled").await, 0);
}

fn body_user_id(body: &serde_json::Value) -> u64 {
    body["users"][0]["id"]
        .as_u64()
        .unwrap_or_else(|| panic!("one user in {body}"))
}

#[tokio::test]
async fn only_admins_reach_the_admin_api_and_pages() {
    let stack = TestStack::control_only().await.unwrap();
    let user = stack.new_user().await;
    for path in ["/api/v1/admin/users", "/api/v1/admin/packages"] {
        expect_error(
            &user.get(path).await,
            StatusCode::FORBIDDEN,
            "forbidden",
            None,
        );
    }
    expect_error(
        &user
            .patch(
                &format!("/api/v1/admin/users/{}", user.id),
                json!({"role": "admin"}),
            )
            .await,
        StatusCode::FORBIDDEN,
        "forbidden",
        None,
    );
    let (status, _) = user.get_text("/admin/users").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(stack.db.count("users WHERE role = 'admin'").await, 0);
}

#[tokio::test]
async fn admins_create_edit_and_retire_packages() {
    let stack = TestStack::control_only().await.unwrap();
    let admin = stack.admin().await;
    let body = stack.get_json_anonymous("/api/v1/packages").await;
    assert_eq!(
        body["packages"].as_array().unwrap().len(),
        3,
        "seed adds three packages"
    );

    let package = json!({
        "name": "GPU-less Pro", "description": "Lots of RAM", "price_minor": 9900, "currency": "eur",
        "compute_minutes": 6000, "max_concurrent_sessions": 3, "cpu_cores": 8, "memory_mib": 32768,
        "storage_quota_mib": 102400, "validity_days": 90
    });
    let (status, body) = admin.post("/api/v1/admin/packages", package.clone()).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["package"]["currency"], "EUR");
    let id = body["package"]["id"].as_u64().unwrap();
    expect_error(
        &admin.post("/api/v1/admin/packages", package.clone()).await,
        StatusCode::CONFLICT,
        "conflict",
        Some("name"),
    );

    let mut bad = package.clone();
    bad["name"] = json!("Other");
    bad["memory_mib"] = json!(10);
    expect_error(
        &admin.post("/api/v1/admin/packages", bad.clone()).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid",
        Some("memory_mib"),
    );
    bad["memory_mib"] = json!(1024);
    bad["currency"] = json!("euros");
    expect_error(
        &admin.post("/api/v1/admin/packages", bad.clone()).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid",
        Some("currency"),
    );
    bad["currency"] = json!("EUR");
    bad["price_minor"] = json!(-5);
    expect_error(
        &admin.post("/api/v1/admin/packages", bad).await,
        StatusCode::BAD_REQUEST,
        "bad_request",
        None,
    );
    assert_eq!(
        stack.db.count("packages").await,
        4,
        "bad packages wrote nothing"
    );

    let body = admin
        .patch_json(
            &format!("/api/v1/admin/packages/{id}"),
            json!({"price_minor": 8900}),
        )
        .await;
    assert_eq!(body["package"]["price_minor"], 8900);
    assert_eq!(
        body["package"]["name"], "GPU-less Pro",
        "unsent fields stay"
    );

    let (_, body) = admin
        .patch(
            &format!("/api/v1/admin/packages/{id}"),
            json!({"retired": true}),
        )
        .await;
    assert_eq!(body["package"]["retired"], true);
    let on_sale = stack.get_json_anonymous("/api/v1/packages").await;
    assert!(
        listed(&on_sale, "packages", id).is_none(),
        "retired packages are not sold"
    );
    let (_, all) = admin.get("/api/v1/admin/packages").await;
    assert!(
        listed(&all, "packages", id).is_some(),
        "admins still see them"
    );
    expect_not_found(
        &admin
            .patch("/api/v1/admin/packages/424242", json!({"retired": true}))
            .await,
    );
}
