#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test
//! Projects through the API: the owner's operations, isolation between
//! users, and bad input that writes nothing.

use opencloud_e2e::{expect_error, expect_not_found, TestStack};
use reqwest::header::{CONTENT_TYPE, LOCATION, ORIGIN};
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test]
async fn a_user_creates_renames_describes_and_deletes_a_project() {
    let stack = TestStack::control_only().await.unwrap();
    let user = stack.new_user().await;
    let (status, body) = user
        .post(
            "/api/v1/projects",
            json!({"name": "  Thesis  ", "description": "Chapter 3 plots"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["project"]["name"], "Thesis");
    let id = body["project"]["id"].as_u64().unwrap();

    let body = user
        .patch_json(
            &format!("/api/v1/projects/{id}"),
            json!({"name": "Thesis final"}),
        )
        .await;
    assert_eq!(body["project"]["name"], "Thesis final");
    assert_eq!(
        body["project"]["description"], "Chapter 3 plots",
        "unsent fields stay"
    );
    let (_, body) = user
        .patch(
            &format!("/api/v1/projects/{id}"),
            json!({"description": ""}),
        )
        .await;
    assert_eq!(body["project"]["description"], "");

    let body = user.get_json("/api/v1/projects").await;
    assert_eq!(body["projects"].as_array().unwrap().len(), 1);

    assert_eq!(
        user.delete(&format!("/api/v1/projects/{id}")).await.0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        user.get(&format!("/api/v1/projects/{id}")).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        user.delete(&format!("/api/v1/projects/{id}")).await.0,
        StatusCode::NOT_FOUND
    );
    let (_, body) = user.get("/api/v1/projects").await;
    assert!(body["projects"].as_array().unwrap().is_empty());
    // Deleted projects are kept (soft delete) for sessions and the ledger.
    assert_eq!(
        stack
            .db
            .count("projects WHERE deleted_at IS NOT NULL")
            .await,
        1
    );
}

#[tokio::test]
async fn a_user_never_sees_or_changes_another_users_project() {
    let stack = TestStack::control_only().await.unwrap();
    let alice = stack.new_user().await;
    let bob = stack.new_user().await;
    let id = alice.create_project("Alice's secrets").await;
    let path = format!("/api/v1/projects/{id}");

    let (_, body) = bob.get("/api/v1/projects").await;
    assert!(body["projects"].as_array().unwrap().is_empty(), "{body}");
    expect_not_found(&bob.get(&path).await);
    expect_not_found(&bob.patch(&path, json!({"name": "mine now"})).await);
    expect_not_found(&bob.delete(&path).await);

    let (_, body) = alice.get(&path).await;
    assert_eq!(
        body["project"]["name"], "Alice's secrets",
        "nothing changed"
    );
    // The pages answer the same way.
    let (status, page) = bob.get_text(&format!("/projects/{id}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(!page.contains("Alice's secrets"));
}

#[tokio::test]
async fn bad_project_input_gets_a_clear_error_and_writes_nothing() {
    let stack = TestStack::control_only().await.unwrap();
    let user = stack.new_user().await;
    let id = user.create_project("Keep me").await;
    let path = format!("/api/v1/projects/{id}");

    let cases = [
        (
            json!({"name": ""}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            Some("name"),
        ),
        (
            json!({"name": "   "}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            Some("name"),
        ),
        (
            json!({"name": "x".repeat(101)}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            Some("name"),
        ),
        (
            json!({"name": "ok", "description": "d".repeat(2001)}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            Some("description"),
        ),
        (
            json!({"name": "ok", "owner_id": 1}),
            StatusCode::BAD_REQUEST,
            "bad_request",
            None,
        ),
        (
            json!({"title": "ok"}),
            StatusCode::BAD_REQUEST,
            "bad_request",
            None,
        ),
        (
            json!({"name": 42}),
            StatusCode::BAD_REQUEST,
            "bad_request",
            None,
        ),
    ];
    for (body, status, code, field) in &cases {
        let message = expect_error(
            &user.post("/api/v1/projects", body.clone()).await,
            *status,
            code,
            *field,
        );
        if *code == "invalid" {
            assert!(
                message.contains("name") || message.contains("description"),
                "{message}"
            );
        }
    }
    expect_error(
        &user.patch(&path, json!({"name": ""})).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid",
        Some("name"),
    );
    expect_error(
        &user.patch(&path, json!({"name": "x".repeat(101)})).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid",
        Some("name"),
    );
    expect_not_found(&user.get("/api/v1/projects/abc").await);
    expect_not_found(&user.get("/api/v1/projects/99999999").await);

    assert_eq!(
        stack.db.count("projects").await,
        1,
        "no bad request wrote a project"
    );
    let (_, body) = user.get(&path).await;
    assert_eq!(body["project"]["name"], "Keep me");
}

#[tokio::test]
async fn without_a_login_the_api_answers_401_and_pages_send_you_to_log_in() {
    let stack = TestStack::control_only().await.unwrap();
    let got = stack
        .post_anonymous("/api/v1/projects", json!({"name": "x"}))
        .await;
    expect_error(&got, StatusCode::UNAUTHORIZED, "unauthenticated", None);
    let r = stack
        .get_with_bearer("/api/v1/projects", "v1.k1.forged.token")
        .await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    let r = stack.get_anonymous("/projects?view=all").await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(
        r.headers()[LOCATION],
        "/login?next=%2Fprojects%3Fview%3Dall"
    );
    assert_eq!(stack.db.count("projects").await, 0);
}

#[tokio::test]
async fn cookie_authenticated_changes_need_json_and_our_origin() {
    let stack = TestStack::control_only().await.unwrap();
    let user = stack.new_user().await;
    let browser = stack.browser_like();
    browser
        .post(stack.url("/api/v1/auth/login"))
        .json(&json!({"email": user.email, "password": user.password}))
        .send()
        .await
        .unwrap();

    // A cross-site form can only send form encodings or text/plain.
    let r = browser
        .post(stack.url("/api/v1/projects"))
        .header(CONTENT_TYPE, "text/plain")
        .body(r#"{"name":"csrf"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let r = browser
        .post(stack.url("/api/v1/projects"))
        .header(ORIGIN, "https://evil.example")
        .json(&json!({"name": "csrf"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("another site"),
        "{body}"
    );

    let r = browser
        .post(stack.url("/api/v1/projects"))
        .header(ORIGIN, stack.control().public.as_str())
        .json(&json!({"name": "legit"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(
        stack.db.count("projects").await,
        1,
        "only the same-origin request wrote"
    );

    // A page form without its CSRF token is refused, with a page saying why.
    let r = browser
        .post(stack.url("/projects"))
        .form(&[("name", "forged")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert!(r.text().await.unwrap().contains("This form has expired"));
    assert_eq!(stack.db.count("projects").await, 1);
}
