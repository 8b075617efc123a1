#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test
//! Accounts through the real control process: registration, login, cookies,
//! throttling, logout, password changes, and every bad input.

use std::time::{Duration, Instant};

use opencloud_e2e::{expect_error, unique, ControlOptions, TestStack, PASSWORD};
use reqwest::header::{CONTENT_TYPE, RETRY_AFTER, SET_COOKIE};
use reqwest::StatusCode;
use serde_json::json;

fn email() -> String {
    format!("{}@example.com", unique("acct"))
}

#[tokio::test]
async fn registration_and_login_work_and_set_a_hardened_cookie() {
    let stack = TestStack::control_only().await.unwrap();
    let address = email();
    let (status, body) = stack
        .register(&address.to_uppercase(), PASSWORD, "Ada")
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(
        body["user"]["email"], address,
        "emails are stored lower-cased"
    );
    assert_eq!(body["user"]["role"], "customer");

    let response = stack
        .http()
        .post(stack.url("/api/v1/auth/login"))
        .json(&json!({"email": address, "password": PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let cookie = set_cookie(&response, "oc_session=").expect("login sets oc_session");
    for attribute in ["HttpOnly", "SameSite=Lax", "Path=/"] {
        assert!(
            cookie.contains(attribute),
            "{attribute} missing in {cookie}"
        );
    }
    assert!(
        !cookie.contains("Secure"),
        "no Secure on a plain-http public URL: {cookie}"
    );
    assert!(
        !cookie.contains("Domain"),
        "the cookie is host-only: {cookie}"
    );
    let body: serde_json::Value = response.json().await.unwrap();
    let token = body["token"].as_str().unwrap();
    assert!(token.starts_with("v1."), "{token}");

    // The token works as a bearer token and as the cookie.
    let me: serde_json::Value = stack
        .get_with_bearer("/api/v1/me", token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(me["user"]["email"], address);
    let me = stack
        .get_with_cookie("/api/v1/me", &format!("oc_session={token}"))
        .await;
    assert_eq!(me.status(), StatusCode::OK);

    // The password is stored as a PBKDF2 PHC string with 600 000 rounds.
    let hash: String = mysql_async::prelude::Queryable::query_first(
        &mut stack.db.conn().await,
        format!("SELECT password_hash FROM users WHERE email = '{address}'"),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(hash.starts_with("$pbkdf2-sha256$i=600000,"), "{hash}");
    assert!(
        !stack.control().log().contains(PASSWORD),
        "passwords are never logged"
    );
}

#[tokio::test]
async fn bad_registration_input_gets_a_clear_error_and_writes_nothing() {
    let stack = TestStack::control_only().await.unwrap();
    let taken = email();
    assert_eq!(
        stack.register(&taken, PASSWORD, "First").await.0,
        StatusCode::CREATED
    );

    let cases = [
        (
            json!({"email": "not-an-email", "password": PASSWORD, "name": "A"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            Some("email"),
            "email address",
        ),
        (
            json!({"email": "a@b", "password": PASSWORD, "name": "A"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            Some("email"),
            "email address",
        ),
        (
            json!({"email": email(), "password": "123456789", "name": "A"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            Some("password"),
            "at least 10",
        ),
        (
            json!({"email": email(), "password": "x".repeat(257), "name": "A"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            Some("password"),
            "at most 256",
        ),
        (
            json!({"email": email(), "password": PASSWORD, "name": "  "}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            Some("name"),
            "name",
        ),
        (
            json!({"email": taken.to_uppercase(), "password": PASSWORD, "name": "A"}),
            StatusCode::CONFLICT,
            "conflict",
            Some("email"),
            "already exists",
        ),
        (
            json!({"email": email(), "password": PASSWORD, "name": "A", "admin": true}),
            StatusCode::BAD_REQUEST,
            "bad_request",
            None,
            "unknown field `admin`",
        ),
        (
            json!({"email": email(), "password": PASSWORD}),
            StatusCode::BAD_REQUEST,
            "bad_request",
            None,
            "missing field `name`",
        ),
        (
            json!({"email": email(), "password": PASSWORD, "name": "A", "role": "admin"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            Some("role"),
            "appointed",
        ),
    ];
    for (body, status, code, field, says) in cases {
        let got = stack
            .post_anonymous("/api/v1/auth/register", body.clone())
            .await;
        let message = expect_error(&got, status, code, field);
        assert!(message.contains(says), "{body} → {message}");
    }

    let raw = |body: String, content_type: &'static str| {
        stack
            .http()
            .post(stack.url("/api/v1/auth/register"))
            .header(CONTENT_TYPE, content_type)
            .body(body)
    };
    let r = raw("{\"email\": ".into(), "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(
        body["error"]["message"].as_str().unwrap().contains("EOF"),
        "names the problem: {body}"
    );

    let r = raw(
        json!({"email": email(), "password": PASSWORD, "name": "A"}).to_string(),
        "text/plain",
    )
    .send()
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);

    let huge =
        json!({"email": email(), "password": PASSWORD, "name": "x".repeat(1 << 20)}).to_string();
    let r = raw(huge, "application/json").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "payload_too_large");

    assert_eq!(
        stack.db.count("users").await,
        1,
        "no bad request wrote a user"
    );
    let log = stack.control().log();
    assert!(!log.contains("panicked"), "{log}");
}

#[tokio::test]
async fn unknown_email_and_wrong_password_get_the_same_answer_in_similar_time() {
    let stack = TestStack::control_only().await.unwrap();
    let user = stack.new_user().await;
    // Warm the dummy hash so the first unknown-email attempt is not special.
    let _ = stack.login(&email(), "whatever-password").await;

    let time = |email: String, password: &'static str| {
        let stack = &stack;
        async move {
            let started = Instant::now();
            let got = stack.login(&email, password).await;
            (started.elapsed(), got)
        }
    };
    let mut wrong = Duration::ZERO;
    let mut unknown = Duration::ZERO;
    for _ in 0..3 {
        let (t, got) = time(user.email.clone(), "wrong password!").await;
        wrong += t;
        let wrong_message = expect_error(&got, StatusCode::UNAUTHORIZED, "bad_credentials", None);
        let (t, got) = time(email(), "wrong password!").await;
        unknown += t;
        let unknown_message = expect_error(&got, StatusCode::UNAUTHORIZED, "bad_credentials", None);
        assert_eq!(wrong_message, unknown_message);
    }
    println!(
        "login with a wrong password: {:?} avg; with an unknown email: {:?} avg",
        wrong / 3,
        unknown / 3
    );
    // Both paths run PBKDF2; without the dummy hash the unknown path would
    // be two orders of magnitude faster.
    assert!(
        unknown * 3 > wrong,
        "unknown-email logins must also hash: {unknown:?} vs {wrong:?}"
    );
}

/// Asserts that a login from `client_ip` gets `want`.
async fn assert_login(
    stack: &TestStack,
    client_ip: &str,
    email: &str,
    password: &str,
    want: StatusCode,
) {
    let got = login_from(stack, client_ip, email, password).await.status();
    assert_eq!(got, want, "login as {email} from {client_ip}");
}

async fn login_from(
    stack: &TestStack,
    client_ip: &str,
    email: &str,
    password: &str,
) -> reqwest::Response {
    stack
        .http()
        .post(stack.url("/api/v1/auth/login"))
        .header("x-forwarded-for", format!("203.0.113.77, {client_ip}"))
        .json(&json!({"email": email, "password": password}))
        .send()
        .await
        .unwrap()
}

/// A login from `client_ip` that must be refused as one try too many,
/// before the password is checked; the response for its headers and body.
async fn throttled_login(
    stack: &TestStack,
    client_ip: &str,
    email: &str,
    password: &str,
) -> reqwest::Response {
    let r = login_from(stack, client_ip, email, password).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    r
}

/// The whole seconds a throttled answer asks the client to wait.
fn retry_after(r: &reqwest::Response) -> u64 {
    r.headers()[RETRY_AFTER].to_str().unwrap().parse().unwrap()
}

/// Asserts the throttled answer's error message says `what`.
async fn assert_refusal_says(r: reqwest::Response, what: &str) {
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(
        body["error"]["message"].as_str().unwrap().contains(what),
        "{body}"
    );
}

#[tokio::test]
async fn failed_logins_slow_down_per_account_and_client_without_locking_out_the_owner() {
    let stack = TestStack::control_only().await.unwrap();
    let victim = stack.new_user().await;
    let other = stack.new_user().await;
    let attacker = "198.51.100.1";

    for attempt in 1..=5 {
        let r = login_from(&stack, attacker, &victim.email, "guess-guess-guess").await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "attempt {attempt}");
    }
    // The sixth try from that client is refused before the password is
    // checked, even with the right password.
    let r = throttled_login(&stack, attacker, &victim.email, PASSWORD).await;
    let wait = retry_after(&r);
    assert!((1..=15).contains(&wait), "Retry-After {wait}");
    assert_refusal_says(r, "Try again in").await;

    // The owner, from their own address, logs in normally.
    assert_login(
        &stack,
        "192.0.2.10",
        &victim.email,
        PASSWORD,
        StatusCode::OK,
    )
    .await;
    // The attacker's address is not blocked for other accounts.
    assert_login(&stack, attacker, &other.email, PASSWORD, StatusCode::OK).await;
    assert_eq!(stack.db.count("login_failures").await, 5);
}

#[tokio::test]
async fn the_back_off_grows_with_each_failure_after_the_wait() {
    let stack = TestStack::control_only_with(ControlOptions::config(
        "[login]\nfailures_before_throttle = 2\nfirst_delay_seconds = 1\n",
    ))
    .await
    .unwrap();
    let user = stack.new_user().await;
    let ip = "198.51.100.2";
    let wrong_guess = || {
        assert_login(
            &stack,
            ip,
            &user.email,
            "nope nope nope",
            StatusCode::UNAUTHORIZED,
        )
    };
    for _ in 0..2 {
        wrong_guess().await;
    }
    let r = throttled_login(&stack, ip, &user.email, "nope nope nope").await;
    assert_eq!(r.headers()[RETRY_AFTER], "1");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // After the wait one more guess is allowed; it fails and doubles the wait.
    wrong_guess().await;
    let r = throttled_login(&stack, ip, &user.email, "nope nope nope").await;
    let wait = retry_after(&r);
    assert!((1..=2).contains(&wait), "second back-off {wait}");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    // A success clears the pair's failures.
    assert_login(&stack, ip, &user.email, PASSWORD, StatusCode::OK).await;
    assert_eq!(stack.db.count("login_failures").await, 0);
}

#[tokio::test]
async fn a_client_spraying_many_accounts_is_capped() {
    let stack =
        TestStack::control_only_with(ControlOptions::config("[login]\nclient_failure_cap = 6\n"))
            .await
            .unwrap();
    let real = stack.new_user().await;
    let sprayer = "198.51.100.3";
    for _ in 0..6 {
        assert_login(
            &stack,
            sprayer,
            &email(),
            "Password123!",
            StatusCode::UNAUTHORIZED,
        )
        .await;
    }
    let r = throttled_login(&stack, sprayer, &email(), "Password123!").await;
    assert_refusal_says(r, "from your address").await;
    assert_login(&stack, "192.0.2.11", &real.email, PASSWORD, StatusCode::OK).await;
}

#[tokio::test]
async fn forwarded_for_is_ignored_unless_the_peer_is_a_trusted_gateway() {
    let stack = TestStack::control_only_with(ControlOptions {
        trusted_proxies: Some(vec![]),
        ..Default::default()
    })
    .await
    .unwrap();
    let user = stack.new_user().await;
    for n in 0..5 {
        assert_login(
            &stack,
            &format!("198.51.100.{}", 10 + n),
            &user.email,
            "wrong wrong wrong",
            StatusCode::UNAUTHORIZED,
        )
        .await;
    }
    // A forged header does not make a new client: the peer is.
    throttled_login(&stack, "198.51.100.99", &user.email, PASSWORD).await;
    let ips: Vec<String> = mysql_async::prelude::Queryable::query(
        &mut stack.db.conn().await,
        "SELECT DISTINCT client_ip FROM login_failures",
    )
    .await
    .unwrap();
    assert_eq!(ips, vec!["127.0.0.1".to_string()]);
}

#[tokio::test]
async fn logout_revokes_the_login_session_for_cookie_and_token() {
    let stack = TestStack::control_only().await.unwrap();
    let user = stack.new_user().await;
    let browser = stack.browser_like();
    let r = browser
        .post(stack.url("/api/v1/auth/login"))
        .json(&json!({"email": user.email, "password": PASSWORD}))
        .send()
        .await
        .unwrap();
    let token = r.json::<serde_json::Value>().await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let me = || async {
        browser
            .get(stack.url("/api/v1/me"))
            .send()
            .await
            .unwrap()
            .status()
    };
    assert_eq!(me().await, StatusCode::OK);

    let r = browser
        .post(stack.url("/api/v1/auth/logout"))
        .header(CONTENT_TYPE, "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(me().await, StatusCode::UNAUTHORIZED);
    // The old token, replayed, is refused too: the login session is revoked.
    let replay = stack
        .get_with_cookie("/api/v1/me", &format!("oc_session={token}"))
        .await;
    assert_eq!(replay.status(), StatusCode::UNAUTHORIZED);
    assert!(
        set_cookie(&replay, "oc_session=;").is_some(),
        "a dead cookie is cleared"
    );
    // The other login (the helper's token) is unaffected.
    assert_eq!(user.get("/api/v1/me").await.0, StatusCode::OK);
    assert_eq!(
        stack
            .db
            .count("login_sessions WHERE revoke_reason = 'logout'")
            .await,
        1
    );
}

#[tokio::test]
async fn changing_the_password_revokes_the_users_other_sessions() {
    let stack = TestStack::control_only().await.unwrap();
    let here = stack.new_user().await;
    let elsewhere = stack.logged_in(&here.email, PASSWORD).await;
    let new_password = "a much better passphrase";

    let got = here
        .post(
            "/api/v1/auth/password",
            json!({"current_password": "not it at all", "new_password": new_password}),
        )
        .await;
    expect_error(
        &got,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid",
        Some("current_password"),
    );
    let got = here
        .post(
            "/api/v1/auth/password",
            json!({"current_password": PASSWORD, "new_password": "short"}),
        )
        .await;
    expect_error(
        &got,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid",
        Some("new_password"),
    );
    assert_eq!(
        elsewhere.get("/api/v1/me").await.0,
        StatusCode::OK,
        "failed changes revoke nothing"
    );

    here.post_json(
        "/api/v1/auth/password",
        json!({"current_password": PASSWORD, "new_password": new_password}),
    )
    .await;
    assert_eq!(
        here.get("/api/v1/me").await.0,
        StatusCode::OK,
        "this session stays"
    );
    assert_eq!(
        elsewhere.get("/api/v1/me").await.0,
        StatusCode::UNAUTHORIZED,
        "other sessions end"
    );
    expect_error(
        &stack.login(&here.email, PASSWORD).await,
        StatusCode::UNAUTHORIZED,
        "bad_credentials",
        None,
    );
    assert_eq!(
        stack.login(&here.email, new_password).await.0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn a_cookie_past_half_life_is_reissued() {
    use opencloud_protocol::token::{self, Claims};
    let stack = TestStack::control_only().await.unwrap();
    let user = stack.new_user().await;
    let keys_text = std::fs::read_to_string(stack.control().dir.join("keys.toml")).unwrap();
    let keys = opencloud_protocol::Keyring::from_toml("keys.toml", &keys_text).unwrap();
    let claims = token::verify(&keys, &user.token, token::TokenKind::Platform, now()).unwrap();
    let seven_hours_ago = now() - 7 * 3600;
    let old = token::sign(
        &keys,
        &Claims::platform(user.id, claims.login_session.clone(), seven_hours_ago),
    );

    let r = stack
        .get_with_cookie("/api/v1/me", &format!("oc_session={old}"))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let fresh = set_cookie(&r, "oc_session=v1.").expect("a fresh cookie past half life");
    let fresh_token = fresh
        .trim_start_matches("oc_session=")
        .split(';')
        .next()
        .unwrap();
    let fresh_claims =
        token::verify(&keys, fresh_token, token::TokenKind::Platform, now()).unwrap();
    assert_eq!(fresh_claims.login_session, claims.login_session);
    assert!(fresh_claims.issued_at >= now() - 5);

    // A young cookie is left alone.
    let r = stack
        .get_with_cookie("/api/v1/me", &format!("oc_session={}", user.token))
        .await;
    assert!(r.headers().get(SET_COOKIE).is_none());
}

/// The first `Set-Cookie` of `r` that starts with `start`.
fn set_cookie(r: &reqwest::Response, start: &str) -> Option<String> {
    r.headers()
        .get_all(SET_COOKIE)
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .find(|c| c.starts_with(start))
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}
