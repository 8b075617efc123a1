#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test
//! The pages in a real browser, the way a new user meets them: sign up, log
//! in, make projects, and an admin at work. Run one at a time
//! (`--test-threads=1`): each test drives its own Chromium.

use fantoccini::Locator;
use opencloud_e2e::browser::{log_in, login_in_browser, Browser};
use opencloud_e2e::{hidden_input, unique, TestStack, PASSWORD};
use reqwest::header::{CONTENT_TYPE, LOCATION};
use reqwest::StatusCode;

fn email() -> String {
    format!("{}@example.com", unique("web"))
}

/// Creates a project through the form on `/projects` (where the browser is)
/// and returns its id, read from the list entry that appears.
async fn create_project_in_browser(browser: &Browser, name: &str) -> u64 {
    let before = browser.count("li.project").await.unwrap();
    browser.submit_new_project(name).await.unwrap();
    // The form posts back to /projects, so wait for the list to grow.
    let grown = format!("li.project:nth-child({})", before + 1);
    browser.wait_for(&grown).await.unwrap();
    for entry in browser
        .client
        .find_all(Locator::Css("li.project"))
        .await
        .unwrap()
    {
        let link = entry.find(Locator::Css("h3 a")).await.unwrap();
        if link.text().await.unwrap() == name {
            let id = entry.attr("data-project-id").await.unwrap();
            return id
                .expect("a listed project carries its id")
                .parse()
                .unwrap();
        }
    }
    panic!("{name:?} is not in the list after creating it");
}

/// Opens the registration page and submits it; the caller waits for what
/// should follow.
async fn register_in(
    browser: &Browser,
    stack: &TestStack,
    name: &str,
    email: &str,
    password: &str,
) {
    browser.goto(&stack.url("/register")).await.unwrap();
    browser
        .submit_register(name, email, password)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_new_user_registers_logs_in_creates_and_renames_a_project_and_logs_out() {
    let stack = TestStack::control_only().await.unwrap();
    let browser = Browser::start().await.unwrap();
    let address = email();

    register_in(&browser, &stack, "Grace Hopper", &address, PASSWORD).await;
    browser.wait_for_path("/login").await.unwrap();
    let notice = browser.text(".alert-ok").await.unwrap();
    assert!(notice.contains("Your account is ready"), "{notice}");
    assert_eq!(
        browser.value("#email").await.unwrap(),
        address,
        "the login form is filled in with the new address"
    );

    browser.submit_login(&address, PASSWORD).await.unwrap();
    browser.wait_for_path("/projects").await.unwrap();
    assert!(browser
        .text(".empty")
        .await
        .unwrap()
        .contains("No projects yet"));
    assert_eq!(browser.text("a.who").await.unwrap(), "Grace Hopper");

    let id = create_project_in_browser(&browser, "Thesis notebooks").await;
    assert_eq!(
        browser.text("li.project h3 a").await.unwrap(),
        "Thesis notebooks"
    );

    browser.click("li.project h3 a").await.unwrap();
    let page = format!("/projects/{id}");
    browser.wait_for_path(&page).await.unwrap();
    assert_eq!(browser.text("h1").await.unwrap(), "Thesis notebooks");
    assert_eq!(browser.value("#name").await.unwrap(), "Thesis notebooks");

    browser.fill("#name", "Dissertation").await.unwrap();
    browser
        .click(&format!("form[action='{page}'] button[type=submit]"))
        .await
        .unwrap();
    // The form posts back to the same path; the redirect adds ?saved=1.
    browser
        .wait_for_url("ending in ?saved=1", |url| url.ends_with("?saved=1"))
        .await
        .unwrap();
    assert_eq!(browser.path().await.unwrap(), page);
    assert_eq!(browser.text(".alert-ok").await.unwrap(), "Saved.");
    assert_eq!(browser.text("h1").await.unwrap(), "Dissertation");
    assert_eq!(browser.value("#name").await.unwrap(), "Dissertation");

    browser
        .follow(".crumbs a[href='/projects']", "/projects")
        .await
        .unwrap();
    let names = browser.text(".project-list").await.unwrap();
    assert!(names.contains("Dissertation"), "{names}");
    assert!(!names.contains("Thesis notebooks"), "{names}");
    assert_eq!(browser.count("li.project").await.unwrap(), 1);

    browser.log_out().await.unwrap();
    browser.goto(&stack.url("/projects")).await.unwrap();
    browser.wait_for_path("/login").await.unwrap();
    let url = browser.client.current_url().await.unwrap();
    assert_eq!(url.query(), Some("next=%2Fprojects"), "{url}");
    assert_eq!(
        stack
            .db
            .count("login_sessions WHERE revoked_at IS NULL")
            .await,
        0,
        "logging out revoked the login session"
    );

    browser.close().await;
}

#[tokio::test]
async fn registration_errors_show_next_to_the_field_and_keep_what_was_typed() {
    let stack = TestStack::control_only().await.unwrap();
    let browser = Browser::start().await.unwrap();
    let address = email();

    register_in(&browser, &stack, "Short Password", &address, "123456789").await;
    // The form posts back to /register; the error appears on the new page.
    let error = browser.wait_for("#password-error").await.unwrap();
    let message = error.text().await.unwrap();
    assert!(message.contains("at least 10"), "{message}");
    assert_eq!(browser.path().await.unwrap(), "/register");
    assert_eq!(browser.value("#email").await.unwrap(), address);
    assert_eq!(browser.value("#name").await.unwrap(), "Short Password");
    assert_eq!(
        browser.value("#password").await.unwrap(),
        "",
        "passwords are never sent back"
    );
    assert_eq!(browser.count("#email-error, #name-error").await.unwrap(), 0);
    assert_eq!(stack.db.count("users").await, 0, "nothing was written");

    let taken = stack.new_user().await;
    browser.fill("#email", &taken.email).await.unwrap();
    browser.fill("#password", PASSWORD).await.unwrap();
    browser
        .click("form[action='/register'] button[type=submit]")
        .await
        .unwrap();
    let message = browser.text("#email-error").await.unwrap();
    assert!(message.contains("already exists"), "{message}");
    assert_eq!(browser.count("#password-error").await.unwrap(), 0);
    assert_eq!(browser.value("#email").await.unwrap(), taken.email);
    assert_eq!(stack.db.count("users").await, 1);

    browser.close().await;
}

#[tokio::test]
async fn an_admin_disables_a_user_who_then_cannot_log_in() {
    let stack = TestStack::control_only().await.unwrap();
    let user = stack.new_user().await;
    let admin = stack.admin().await;
    assert_eq!(user.get("/api/v1/me").await.0, StatusCode::OK);
    let browser = Browser::start().await.unwrap();
    let base = &stack.control().public;

    log_in(&browser, base, &admin.email, PASSWORD)
        .await
        .unwrap();
    browser
        .follow("header.topbar a[href='/admin']", "/admin")
        .await
        .unwrap();
    browser
        .follow("nav.tabs a[href='/admin/users']", "/admin/users")
        .await
        .unwrap();

    browser
        .fill("form.searchbar input[name=q]", &user.email)
        .await
        .unwrap();
    browser
        .click("form.searchbar button[type=submit]")
        .await
        .unwrap();
    let searched = user.email.replace('@', "%40");
    browser
        .wait_for_url("searching for the user", |url| url.contains(&searched))
        .await
        .unwrap();
    let row = format!("tr[data-email='{}']", user.email);
    assert_eq!(browser.count("#users tbody tr").await.unwrap(), 1);
    assert_eq!(
        browser.text(&format!("{row} .badge")).await.unwrap(),
        "Active"
    );

    browser
        .click(&format!("{row} button[value=disable]"))
        .await
        .unwrap();
    let badge = browser
        .wait_for(&format!("{row} .badge-off"))
        .await
        .unwrap();
    assert_eq!(badge.text().await.unwrap(), "Disabled");
    assert!(
        browser
            .client
            .current_url()
            .await
            .unwrap()
            .as_str()
            .contains(&searched),
        "the admin stays on the search they came from"
    );
    assert_eq!(
        browser
            .count(&format!("{row} button[value=enable]"))
            .await
            .unwrap(),
        1
    );

    assert_eq!(
        user.get("/api/v1/me").await.0,
        StatusCode::UNAUTHORIZED,
        "the disabled user's token stopped working"
    );

    browser.log_out().await.unwrap();
    login_in_browser(&browser, base, &user.email, PASSWORD)
        .await
        .unwrap();
    let message = browser.text("#login-error").await.unwrap();
    assert!(message.contains("disabled"), "{message}");
    assert_eq!(browser.path().await.unwrap(), "/login");
    assert_eq!(browser.value("#email").await.unwrap(), user.email);
    assert_eq!(
        browser
            .count("header.topbar a[href='/login']")
            .await
            .unwrap(),
        1,
        "still logged out"
    );

    browser.close().await;
}

#[tokio::test]
async fn user_supplied_text_is_escaped_in_pages() {
    let stack = TestStack::control_only().await.unwrap();
    let user = stack.new_user().await;
    let browser = Browser::start().await.unwrap();
    let hostile = "<img src=x onerror=alert(1)>";

    log_in(&browser, &stack.control().public, &user.email, PASSWORD)
        .await
        .unwrap();
    let id = create_project_in_browser(&browser, hostile).await;

    assert_eq!(browser.text("li.project h3 a").await.unwrap(), hostile);
    assert_eq!(browser.count(".project-list img").await.unwrap(), 0);
    let source = browser.page_source().await.unwrap();
    assert!(source.contains("&lt;img"), "escaped in the list");

    browser
        .goto(&stack.url(&format!("/projects/{id}")))
        .await
        .unwrap();
    assert_eq!(browser.text("h1").await.unwrap(), hostile);
    assert_eq!(browser.value("#name").await.unwrap(), hostile);
    assert_eq!(browser.count("main img").await.unwrap(), 0);
    assert!(browser.client.title().await.unwrap().starts_with(hostile));

    browser.close().await;
}

#[tokio::test]
async fn pages_work_without_javascript_and_look_styled() {
    let stack = TestStack::control_only().await.unwrap();
    let http = stack.browser_like();
    let address = email();

    let page = http.get(stack.url("/register")).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let csrf = hidden_input(&page.text().await.unwrap(), "csrf");
    assert!(csrf.len() >= 16, "{csrf}");
    let form = [
        ("csrf", csrf.as_str()),
        ("name", "No Script"),
        ("email", address.as_str()),
        ("password", PASSWORD),
        ("role", "customer"),
    ];
    let r = http
        .post(stack.url("/register"))
        .form(&form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let location = r.headers()[LOCATION].to_str().unwrap();
    assert!(location.starts_with("/login?"), "{location}");
    assert_eq!(stack.db.count("users").await, 1);

    // The same form for a fresh address, without the token.
    let other = email();
    let r = http
        .post(stack.url("/register"))
        .form(&[
            ("name", "No Token"),
            ("email", other.as_str()),
            ("password", PASSWORD),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let body = r.text().await.unwrap();
    assert!(body.contains("This form has expired"), "{body}");
    assert_eq!(stack.db.count("users").await, 1);

    let r = http
        .get(stack.url("/static/style.css"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let content_type = r.headers()[CONTENT_TYPE].to_str().unwrap().to_owned();
    assert!(content_type.starts_with("text/css"), "{content_type}");
    assert!(r.text().await.unwrap().contains(".topbar"));

    let browser = Browser::start().await.unwrap();
    browser.goto(&stack.url("/")).await.unwrap();
    browser.wait_for("header.topbar").await.unwrap();
    let background = browser
        .client
        .execute(
            "return getComputedStyle(document.querySelector('header.topbar')).backgroundColor",
            vec![],
        )
        .await
        .unwrap();
    let background = background.as_str().unwrap_or_default();
    assert!(
        !background.is_empty() && background != "transparent" && background != "rgba(0, 0, 0, 0)",
        "the stylesheet colours the top bar: {background:?}"
    );

    browser.close().await;
}
