#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test
//! Buying in a real browser: Packages → Buy → the sandbox checkout → the
//! return page, which shows the payment once its webhook is in without
//! being reloaded. The sandbox confirms 3 s after the card is taken, so the
//! page is seen waiting first.

use opencloud_e2e::billing::balance;
use opencloud_e2e::browser::{log_in, Browser};
use opencloud_e2e::{TestStack, PASSWORD};

async fn pay_with(browser: &Browser, card: &str) {
    browser.fill("#card_number", card).await.unwrap();
    browser.fill("#expiry", "12/34").await.unwrap();
    browser.fill("#cvc", "123").await.unwrap();
    browser
        .click(".checkout button[type=submit]")
        .await
        .unwrap();
}

/// Waits until `css` says `expected` (a form posted back to its own page
/// replaces the element that said something else).
async fn wait_for_text(browser: &Browser, css: &str, expected: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let now = browser.text(css).await.unwrap_or_default();
        if now == expected {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{css} says {now:?}, not {expected:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_new_user_buys_a_package_and_sees_the_balance_rise_without_a_reload() {
    let stack = TestStack::with_gateway_env(vec![(
        "OPENCLOUD_CONTROL__BILLING__SANDBOX_DELIVERY_DELAY_MS".into(),
        "3000".into(),
    )])
    .await
    .unwrap();
    stack.admin().await;
    let user = stack.new_user().await;
    let browser = Browser::start().await.unwrap();
    log_in(&browser, &stack.platform(), &user.email, PASSWORD)
        .await
        .unwrap();

    browser.goto(&stack.url("/packages")).await.unwrap();
    browser
        .click("article[data-package='Starter'] form.buy button")
        .await
        .unwrap();
    browser
        .wait_for_url("at the sandbox checkout", |url| {
            url.contains("/checkout/sandbox/")
        })
        .await
        .unwrap();
    let checkout = browser.path().await.unwrap();
    let total = browser.text("#checkout-total").await.unwrap();
    assert_eq!(total, "5.00 USD", "the database's price");

    // A declined card: a clear message, the form again, nothing credited.
    pay_with(&browser, "4000 0000 0000 0002").await;
    wait_for_text(&browser, "#card-error", "Your card was declined.").await;
    assert_eq!(browser.path().await.unwrap(), checkout);
    pay_with(&browser, "4000 0000 0000 9995").await;
    wait_for_text(&browser, "#card-error", "Your card has insufficient funds.").await;
    assert_eq!(balance(&user).await, 1800, "a declined card credited time");

    // The good card: the return page waits, then shows the payment.
    pay_with(&browser, "4242 4242 4242 4242").await;
    browser
        .wait_for_url("on the order's return page", |url| url.contains("/orders/"))
        .await
        .unwrap();
    let waiting = browser.text("#order-message").await.unwrap();
    browser
        .client
        .execute("window.sameDocument = true; return true", vec![])
        .await
        .unwrap();
    println!("return page first said: {waiting:?}");
    browser
        .wait_for("#order-status[data-paid='true']")
        .await
        .unwrap();
    let message = browser.text("#order-message").await.unwrap();
    assert_eq!(message, "Payment received: 10 h added.");
    assert_eq!(browser.text("#order-balance").await.unwrap(), "10 h 30 min");
    let same = browser
        .client
        .execute("return window.sameDocument === true", vec![])
        .await
        .unwrap();
    assert_eq!(same, serde_json::json!(true), "the page was reloaded");
    assert!(
        waiting.contains("Waiting"),
        "the page should have waited for the webhook: {waiting:?}"
    );
    assert_eq!(balance(&user).await, 1800 + 36_000);

    // The receipt is one click away and printable.
    browser
        .click("#order-next a[href$='/receipt']")
        .await
        .unwrap();
    browser.wait_for(".receipt").await.unwrap();
    let receipt = browser.text(".receipt").await.unwrap();
    assert!(
        receipt.contains("5.00 USD") && receipt.contains("Starter"),
        "{receipt}"
    );
    browser.close().await;
}
