#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test
//! Every page the platform serves, and every page the gateway answers
//! itself, carries the headers that keep it out of frames and keep
//! injected markup from running: a Content-Security-Policy without inline
//! script, `X-Frame-Options: DENY`, `X-Content-Type-Options: nosniff` and a
//! `Referrer-Policy`; JSON answers are `nosniff` too. What a session's own
//! server answers is left as it is. Everything is fetched through the
//! gateway, as a browser would.

use base64::Engine;
use opencloud_e2e::upstream::{capture_upstream, loopback};
use opencloud_e2e::TestStack;
use reqwest::header::{HeaderMap, ACCEPT};
use reqwest::{Response, StatusCode};
use sha2::{Digest, Sha256};

fn header<'h>(headers: &'h HeaderMap, name: &str) -> &'h str {
    headers.get(name).map(|v| v.to_str().unwrap()).unwrap_or("")
}

/// The headers every answer carries, JSON included.
fn assert_nosniff(what: &str, headers: &HeaderMap) {
    assert_eq!(
        header(headers, "x-content-type-options"),
        "nosniff",
        "{what}"
    );
}

/// The headers of a page; returns its policy.
fn assert_page_headers(what: &str, headers: &HeaderMap) -> String {
    assert_nosniff(what, headers);
    assert_eq!(header(headers, "x-frame-options"), "DENY", "{what}");
    assert_eq!(header(headers, "referrer-policy"), "same-origin", "{what}");
    let policy = header(headers, "content-security-policy").to_owned();
    for directive in ["frame-ancestors 'none'", "base-uri 'none'"] {
        assert!(
            policy.contains(directive),
            "{what}: {directive}: {policy:?}"
        );
    }
    // Plugins are off, by name or because nothing is allowed by default.
    assert!(
        policy.contains("object-src 'none'") || policy.contains("default-src 'none'"),
        "{what}: {policy:?}"
    );
    assert!(!policy.contains("unsafe-"), "{what}: {policy:?}");
    policy
}

/// A platform page: the headers, and markup the policy lets work (no
/// inline script, style element or style attribute).
async fn check_platform_page(what: &str, r: Response, status: StatusCode) {
    assert_eq!(r.status(), status, "{what}");
    let policy = assert_page_headers(what, r.headers());
    assert!(policy.contains("default-src 'self'"), "{what}: {policy:?}");
    assert!(policy.contains("form-action 'self'"), "{what}: {policy:?}");
    let html = r.text().await.unwrap();
    for inline in ["<script", "<style", " style=", " onclick=", "javascript:"] {
        assert!(!html.contains(inline), "{what} has {inline}");
    }
}

#[tokio::test]
async fn every_platform_page_and_answer_carries_the_security_headers() {
    let stack = TestStack::with_gateway().await.unwrap();
    let anonymous = stack.browser_like();
    for (path, status) in [
        ("/", StatusCode::OK),
        ("/login", StatusCode::OK),
        ("/register", StatusCode::OK),
        ("/no/such/page", StatusCode::NOT_FOUND),
    ] {
        let r = anonymous.get(stack.url(path)).send().await.unwrap();
        check_platform_page(&format!("anonymous {path}"), r, status).await;
    }
    let css = anonymous
        .get(stack.url("/static/style.css"))
        .send()
        .await
        .unwrap();
    assert_nosniff("the stylesheet", css.headers());

    let user = stack.new_user().await;
    let project = user.create_project("Headers").await;
    let admin = stack.admin().await;
    let project_page = format!("/projects/{project}");
    let pages = [
        (&user, "/projects", StatusCode::OK),
        (&user, project_page.as_str(), StatusCode::OK),
        (&user, "/account", StatusCode::OK),
        (&user, "/packages", StatusCode::OK),
        (&user, "/admin/users", StatusCode::FORBIDDEN),
        (&admin, "/admin/users", StatusCode::OK),
        (&admin, "/admin/packages", StatusCode::OK),
        (&admin, "/admin/hosts", StatusCode::OK),
        (&admin, "/admin/sessions", StatusCode::OK),
    ];
    for (who, path, status) in pages {
        let r = who
            .request(reqwest::Method::GET, path)
            .send()
            .await
            .unwrap();
        check_platform_page(&format!("user {} on {path}", who.id), r, status).await;
    }
    for path in ["/api/v1/projects", "/api/v1/no-such-call"] {
        let r = user
            .request(reqwest::Method::GET, path)
            .header(ACCEPT, "application/json")
            .send()
            .await
            .unwrap();
        assert_nosniff(&format!("JSON {path}"), r.headers());
    }
}

#[tokio::test]
async fn the_gateways_own_pages_carry_them_and_a_sessions_own_answers_are_left_alone() {
    let stack = TestStack::with_gateway().await.unwrap();
    let (port, captured) = capture_upstream().await;
    let user = stack.new_user().await;
    let sid = stack.session_for(&user, loopback(port)).await;
    let gateway = stack.gateway();
    let nowhere = gateway.client(&["nosuch"], false);
    let r = nowhere
        .get(format!("{}/lab", gateway.session_origin("nosuch")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    check_gateway_page("no session here", r).await;

    let client = gateway.client(&[&sid], false);
    let origin = gateway.session_origin(&sid);
    let r = client
        .get(format!("{origin}/_oc/enter?ticket=v1.bogus"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    check_gateway_page("an expired link", r).await;

    // The session's own server answers as it likes; the gateway adds nothing.
    let cookie = stack.enter(&user, &sid).await;
    let r = client
        .get(format!("{origin}/lab"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert!(
        captured.last().starts_with("GET /lab"),
        "reached the session"
    );
    assert!(
        r.headers().get("content-security-policy").is_none(),
        "the session's answer got the gateway's policy: {:?}",
        r.headers()
    );
}

/// A page of the gateway's: the headers, and a policy that allows its one
/// inline style by hash and nothing else.
async fn check_gateway_page(what: &str, r: Response) {
    let policy = assert_page_headers(what, r.headers());
    assert!(policy.contains("default-src 'none'"), "{what}: {policy:?}");
    let html = r.text().await.unwrap();
    let style = html
        .split_once("<style>")
        .and_then(|(_, rest)| rest.split_once("</style>"))
        .map(|(style, _)| style)
        .unwrap();
    let hash = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(style));
    assert!(
        policy.contains(&format!("style-src 'sha256-{hash}'")),
        "{what}: the policy must allow the page's style: {policy:?}"
    );
    assert!(!html.contains("<script"), "{what}");
}
