#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test
//! Registering accounts, as an abuser would try it: many accounts from one
//! address (throttled per client, through the API and the form, with the
//! forwarding header trusted only from the gateway), and names carrying
//! text-direction overrides or invisible characters (refused wherever a
//! person names something: their account, projects, hosts, packages).

use std::net::IpAddr;
use std::time::{Duration, Instant};

use opencloud_e2e::agents::eventually;
use opencloud_e2e::{
    expect_error, fresh_loopback, hidden_input, unique, Control, ControlOptions, TestDatabase,
    TestStack, PASSWORD,
};
use reqwest::header::RETRY_AFTER;
use reqwest::{Response, StatusCode};
use serde_json::{json, Value};

fn email() -> String {
    format!("{}@example.com", unique("reg"))
}

fn registration(email: &str, name: &str) -> Value {
    json!({"email": email, "password": PASSWORD, "name": name})
}

/// The whole seconds a throttled answer asks the client to wait.
fn retry_after(r: &Response) -> u64 {
    r.headers()[RETRY_AFTER].to_str().unwrap().parse().unwrap()
}

/// Accounts stored with `email`.
async fn accounts_with(stack: &TestStack, email: &str) -> u64 {
    stack
        .db
        .count(&format!("users WHERE email = '{email}'"))
        .await
}

/// Fills and posts the register form from `source` the way a browser
/// without JavaScript does (page, CSRF cookie and token, form).
async fn register_with_form(
    stack: &TestStack,
    source: IpAddr,
    name: &str,
    email: &str,
) -> Response {
    let http = stack.client_from(source, true);
    let page = http.get(stack.url("/register")).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let csrf = hidden_input(&page.text().await.unwrap(), "csrf");
    http.post(stack.url("/register"))
        .form(&[
            ("csrf", csrf.as_str()),
            ("name", name),
            ("email", email),
            ("password", PASSWORD),
            ("role", "host_owner"),
        ])
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn the_eleventh_registration_from_one_address_is_refused_and_other_addresses_are_not() {
    // Behind the real gateway, with the shipped limit (10 an hour): the
    // address control counts is the one the gateway saw.
    let stack = TestStack::with_gateway().await.unwrap();
    let one_machine = fresh_loopback();
    let started = Instant::now();
    for n in 0..10 {
        let (status, body) = stack
            .register_from(one_machine, registration(&email(), &format!("Person {n}")))
            .await;
        assert_eq!(
            status,
            StatusCode::CREATED,
            "registration {}: {body}",
            n + 1
        );
    }
    println!(
        "10 registrations from {one_machine} took {:?}",
        started.elapsed()
    );

    // The eleventh, through the API: 429, a wait of up to the window, and
    // no account.
    let eleventh = email();
    let r = stack
        .client_from(one_machine, false)
        .post(stack.url("/api/v1/auth/register"))
        .json(&registration(&eleventh, "Eleven"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let wait = retry_after(&r);
    assert!((3500..=3600).contains(&wait), "Retry-After {wait}");
    let body: Value = r.json().await.unwrap();
    let message = expect_error(
        &(StatusCode::TOO_MANY_REQUESTS, body),
        StatusCode::TOO_MANY_REQUESTS,
        "too_many_attempts",
        None,
    );
    assert!(
        message.contains("from your address") && message.contains("minutes"),
        "{message}"
    );
    assert_eq!(accounts_with(&stack, &eleventh).await, 0);

    // The form says the same, keeps what was typed, and creates nothing.
    let r = register_with_form(&stack, one_machine, "Form Person", &eleventh).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(retry_after(&r) >= 3500);
    let page = r.text().await.unwrap();
    assert!(
        page.contains("Too many accounts were registered from your address"),
        "{page}"
    );
    assert!(page.contains("value=\"Form Person\""), "name kept: {page}");
    assert!(
        page.contains(&format!("value=\"{eleventh}\"")),
        "email kept"
    );
    assert!(
        page.contains("value=\"host_owner\" checked"),
        "role kept: {page}"
    );
    assert_eq!(accounts_with(&stack, &eleventh).await, 0);

    // A forwarding header the client makes up is not believed: the
    // gateway is the trusted proxy, and it names the real peer.
    let r = stack
        .client_from(one_machine, false)
        .post(stack.url("/api/v1/auth/register"))
        .header("x-forwarded-for", "203.0.113.77")
        .json(&registration(&eleventh, "Forged"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(accounts_with(&stack, &eleventh).await, 0);

    // Another machine registers as usual, through the API and the form.
    let (status, body) = stack
        .register_from(fresh_loopback(), registration(&eleventh, "Elsewhere"))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let r = register_with_form(&stack, fresh_loopback(), "By Form", &email()).await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(stack.db.count("users").await, 12);
    assert_eq!(stack.db.count("registration_attempts").await, 12);
    let metrics = stack.control().metrics().await;
    assert!(
        metrics.contains("opencloud_control_registrations_throttled_total 3"),
        "three refusals counted: {metrics}"
    );
}

#[tokio::test]
async fn taken_emails_count_bad_input_does_not_and_the_wait_ends_with_the_window() {
    let stack = TestStack::control_only_with(ControlOptions::config(
        "[registration]\nper_client = 2\nwindow_seconds = 3\n",
    ))
    .await
    .unwrap();
    let machine = fresh_loopback();
    let first = email();
    // Input that is no good creates nothing and costs nothing.
    for bad in [
        registration("not-an-email", "Bad"),
        registration(&email(), ""),
    ] {
        let (status, body) = stack.register_from(machine, bad).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    }
    let (status, body) = stack
        .register_from(machine, registration(&first, "First"))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    // Trying an email that has an account counts, so the form cannot test
    // address after address for accounts.
    let (status, body) = stack
        .register_from(machine, registration(&first, "Again"))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let refused_at = Instant::now();
    let r = stack
        .client_from(machine, false)
        .post(stack.url("/api/v1/auth/register"))
        .json(&registration(&email(), "Third"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let wait = retry_after(&r);
    assert!((1..=3).contains(&wait), "Retry-After {wait}");

    // Once the wait is over, the address may register again.
    tokio::time::sleep(Duration::from_secs(wait) + Duration::from_millis(300)).await;
    let (status, body) = stack
        .register_from(machine, registration(&email(), "Later"))
        .await;
    println!(
        "Retry-After {wait} s; registered again {:?} after the refusal",
        refused_at.elapsed()
    );
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(stack.db.count("users").await, 2);
}

/// Names that read as something else or as nothing: a right-to-left
/// override, an isolate, a zero-width space, a direction mark.
const HOSTILE: [(&str, &str); 4] = [
    ("gpu\u{202E}exe.txt", "U+202E"),
    ("Lab \u{2067}A", "U+2067"),
    ("gpu\u{200B}1", "U+200B"),
    ("\u{200F}Admin", "U+200F"),
];

#[tokio::test]
async fn names_with_direction_overrides_or_invisible_characters_are_refused_and_not_stored() {
    let stack = TestStack::control_only().await.unwrap();
    let owner = stack.host_owner().await;
    let project = owner.create_project("Thesis").await;
    // Forms carry the token bound to the login session.
    let csrf = hidden_input(&owner.page("/projects").await, "csrf");
    let csrf = csrf.as_str();
    let admin = stack.admin().await;
    let (users, packages) = (
        stack.db.count("users").await,
        stack.db.count("packages").await,
    );

    for (name, char_code) in HOSTILE {
        let says = |message: String| {
            assert!(message.contains(char_code), "{name:?}: {message}");
            assert!(!message.contains(name), "the message echoes the name");
        };
        // Registering, through the API and the form.
        let address = email();
        let got = stack
            .register_from(fresh_loopback(), registration(&address, name))
            .await;
        says(expect_error(
            &got,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            Some("name"),
        ));
        let r = register_with_form(&stack, fresh_loopback(), name, &address).await;
        assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
        let page = r.text().await.unwrap();
        assert!(page.contains("id=\"name-error\""), "{page}");
        assert!(page.contains(char_code), "{page}");
        assert!(page.contains(&format!("value=\"{address}\"")), "email kept");
        assert_eq!(accounts_with(&stack, &address).await, 0);

        // Changing one's name in the account settings, API and form.
        let got = owner.patch("/api/v1/me", json!({"name": name})).await;
        says(expect_error(
            &got,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            Some("name"),
        ));
        let r = owner
            .post_form("/account/name", &[("csrf", csrf), ("name", name)])
            .await;
        assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
        let page = r.text().await.unwrap();
        assert!(
            page.contains("id=\"name-error\"") && page.contains(char_code),
            "{page}"
        );

        // Creating and renaming a project, through the API and the form.
        let got = owner.post("/api/v1/projects", json!({"name": name})).await;
        says(expect_error(
            &got,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            Some("name"),
        ));
        let r = owner
            .post_form(
                "/projects",
                &[("csrf", csrf), ("name", name), ("description", "kept")],
            )
            .await;
        assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
        let page = r.text().await.unwrap();
        assert!(
            page.contains(char_code) && page.contains(">kept<"),
            "{page}"
        );
        let got = owner
            .patch(
                &format!("/api/v1/projects/{project}"),
                json!({"name": name}),
            )
            .await;
        says(expect_error(
            &got,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            Some("name"),
        ));
        let r = owner
            .post_form(
                &format!("/projects/{project}"),
                &[("csrf", csrf), ("name", name), ("description", "")],
            )
            .await;
        assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
        assert!(r.text().await.unwrap().contains(char_code));

        // Adding a host, through the API and the form.
        let got = owner.post("/api/v1/hosts", json!({"name": name})).await;
        says(expect_error(
            &got,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            Some("name"),
        ));
        let r = owner
            .post_form("/hosts", &[("csrf", csrf), ("name", name)])
            .await;
        assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
        assert!(r.text().await.unwrap().contains(char_code));

        // An admin naming a package.
        let got = admin
            .post("/api/v1/admin/packages", package_named(name))
            .await;
        says(expect_error(
            &got,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            Some("name"),
        ));
    }
    assert_eq!(stack.db.count("users").await, users);
    assert_eq!(
        stack
            .db
            .count(&format!(
                "users WHERE id = {} AND name = 'Host Owner'",
                owner.id
            ))
            .await,
        1,
        "the owner kept their name"
    );
    assert_eq!(stack.db.count("projects").await, 1);
    assert_eq!(
        stack
            .db
            .count(&format!(
                "projects WHERE id = {project} AND name = 'Thesis'"
            ))
            .await,
        1,
        "the project kept its name"
    );
    assert_eq!(stack.db.count("hosts").await, 0);
    assert_eq!(stack.db.count("packages").await, packages);
}

fn package_named(name: &str) -> Value {
    json!({
        "name": name, "description": "", "price_minor": 900, "currency": "eur",
        "compute_minutes": 600, "max_concurrent_sessions": 1, "cpu_cores": 2, "memory_mib": 4096,
        "storage_quota_mib": 1024, "validity_days": 30
    })
}

#[tokio::test]
async fn names_in_any_script_with_accents_and_emoji_are_kept_as_typed() {
    let stack = TestStack::control_only().await.unwrap();
    let person = "Zoë 李 🚀";
    let (status, body) = stack
        .register_from(fresh_loopback(), registration(&email(), person))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["user"]["name"], person);

    let owner = stack.host_owner().await;
    let csrf = hidden_input(&owner.page("/account").await, "csrf");
    let r = owner
        .post_form("/account/name", &[("csrf", &csrf), ("name", person)])
        .await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert!(owner
        .page("/account?renamed=1")
        .await
        .contains("Name saved."));
    assert_eq!(owner.get_json("/api/v1/me").await["user"]["name"], person);
    let renamed = owner
        .patch_json("/api/v1/me", json!({"name": "  Zoë 🚀 "}))
        .await;
    assert_eq!(renamed["user"]["name"], "Zoë 🚀");
    // U+FE0F (a variation selector, a mark) gives the heart its emoji look;
    // U+0301 is a combining accent.
    for name in ["Thèse 論文 📊", "\u{2764}\u{FE0F} Rene\u{301}e", "مشروع"] {
        let (status, body) = owner.post("/api/v1/projects", json!({"name": name})).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        assert_eq!(body["project"]["name"], name, "{body}");
    }
    let (status, body) = owner
        .post("/api/v1/hosts", json!({"name": "Zoë's 🖥\u{FE0F}"}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["host"]["name"], "Zoë's 🖥\u{FE0F}");
    let page = owner.page("/projects").await;
    assert!(page.contains("Thèse 論文 📊"), "{page}");
}

#[tokio::test]
async fn ipv6_clients_are_counted_by_their_64_not_by_address() {
    // The test plays the gateway (loopback is trusted) and names the client.
    let stack =
        TestStack::control_only_with(ControlOptions::config("[registration]\nper_client = 2\n"))
            .await
            .unwrap();
    let register_as = |client: &'static str| {
        let request = stack
            .http()
            .post(stack.url("/api/v1/auth/register"))
            .header("x-forwarded-for", client)
            .json(&registration(&email(), "Six"));
        async move { request.send().await.unwrap().status() }
    };
    // One subscriber's /64 is one client, however many addresses it uses.
    assert_eq!(register_as("2001:db8:1:2::1").await, StatusCode::CREATED);
    assert_eq!(register_as("2001:db8:1:2::2").await, StatusCode::CREATED);
    assert_eq!(
        register_as("2001:db8:1:2:ffff::3").await,
        StatusCode::TOO_MANY_REQUESTS
    );
    // The next /64 is someone else.
    assert_eq!(register_as("2001:db8:1:3::1").await, StatusCode::CREATED);
    assert_eq!(stack.db.count("users").await, 3);
}

#[tokio::test]
async fn throttle_rows_past_their_window_are_swept_when_control_starts() {
    let db = TestDatabase::create().await.unwrap();
    let options = ControlOptions::default();
    // The first start makes the tables; the rows go in while control is down.
    drop(Control::start(&db, &options).await.unwrap());
    let mut conn = db.conn().await;
    mysql_async::prelude::Queryable::query_drop(
        &mut conn,
        "INSERT INTO registration_attempts (client_ip, attempted_at) VALUES
           ('192.0.2.1', NOW(6) - INTERVAL 2 HOUR), ('192.0.2.1', NOW(6) - INTERVAL 10 MINUTE);
         INSERT INTO login_failures (email, client_ip, failed_at) VALUES
           ('a@example.com', '192.0.2.1', NOW(6) - INTERVAL 1 HOUR),
           ('a@example.com', '192.0.2.1', NOW(6) - INTERVAL 1 MINUTE)",
    )
    .await
    .unwrap();
    drop(conn);

    // Windows by default: an hour for registrations, 15 minutes for logins.
    let _control = Control::start(&db, &options).await.unwrap();
    let (_, took) = eventually(
        "the old rows are swept",
        Duration::from_secs(20),
        || async {
            let left = (
                db.count("registration_attempts").await,
                db.count("login_failures").await,
            );
            (left == (1, 1)).then_some(())
        },
    )
    .await;
    println!("swept {took:?} after control answered");
    assert_eq!(
        db.count("registration_attempts WHERE attempted_at > NOW(6) - INTERVAL 1 HOUR")
            .await,
        1,
        "the recent one stays"
    );
}
