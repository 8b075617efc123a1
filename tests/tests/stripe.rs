#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test
//! Control with the Stripe provider, against a recording stand-in for
//! Stripe's API: what a checkout and a refund send (the database's price,
//! the secret key as the bearer, an idempotency key), webhooks trusted only
//! for the configured secret's signature, and Stripe failing.

use opencloud_e2e::payments::{balance, place_order, PlacedOrder, Webhook};
use opencloud_e2e::stripe::{Failure, Recorded, StripeStandIn};
use opencloud_e2e::{expect_error, unique, ControlOptions, TestStack, TestUser};
use opencloud_protocol::config::write_private_file;
use reqwest::StatusCode;
use serde_json::{json, Value};

/// Control selling through the stand-in, with a customer and an admin.
struct Shop {
    stack: TestStack,
    stripe: StripeStandIn,
    secret_key: String,
    webhook_secret: String,
    admin: TestUser,
    customer: TestUser,
    /// A starter package (`seed` adds them), as `/api/v1/packages` lists it.
    package: Value,
}

impl Shop {
    async fn open() -> Self {
        let stripe = StripeStandIn::start().await;
        // The secrets live in files of their own (0600), named by the config.
        let dir = std::env::temp_dir().join(unique("oc-stripe-"));
        std::fs::create_dir_all(&dir).unwrap();
        let secret_key = unique("sk_test_51");
        let webhook_secret = unique("whsec_");
        let (key_file, webhook_file) = (dir.join("stripe.key"), dir.join("webhook.secret"));
        write_private_file(&key_file, &secret_key).unwrap();
        write_private_file(&webhook_file, &webhook_secret).unwrap();
        let stack = TestStack::control_only_with(ControlOptions::config(&format!(
            "[billing]\nprovider = \"stripe\"\nwebhook_secret_file = \"{}\"\n\
             [billing.stripe]\napi_url = \"{}\"\nsecret_key_file = \"{}\"\n",
            webhook_file.display(),
            stripe.url,
            key_file.display(),
        )))
        .await
        .unwrap();
        let admin = stack.admin().await;
        let customer = stack.new_user().await;
        let packages = stack.get_json_anonymous("/api/v1/packages").await;
        let package = packages["packages"][0].clone();
        assert!(package["price_minor"].as_u64().unwrap() > 0, "{package}");
        Self {
            stack,
            stripe,
            secret_key,
            webhook_secret,
            admin,
            customer,
            package,
        }
    }

    fn package_id(&self) -> u64 {
        self.package["id"].as_u64().unwrap()
    }

    async fn order(&self) -> PlacedOrder {
        place_order(&self.customer, self.package_id()).await
    }

    /// Posts `webhook` to the Stripe webhook address, as Stripe does.
    async fn deliver(&self, webhook: &Webhook) -> (StatusCode, Value) {
        webhook
            .post(&self.stack.http(), &self.stack.platform(), "stripe")
            .await
    }

    /// Pays `order` with a webhook signed with the configured secret.
    async fn pay(&self, order: &PlacedOrder, payment_intent: &str) -> (StatusCode, Value) {
        let webhook = Webhook::paid(
            &self.webhook_secret,
            order,
            checkout_ref(order),
            payment_intent,
        );
        self.deliver(&webhook).await
    }

    async fn order_status(&self, order: &PlacedOrder) -> String {
        let body = self
            .customer
            .get_json(&format!("/api/v1/orders/{}", order.id))
            .await;
        body["order"]["status"].as_str().unwrap().to_owned()
    }

    async fn refund(&self, who: &TestUser, order: &PlacedOrder) -> (StatusCode, Value) {
        who.post(
            &format!("/api/v1/admin/orders/{}/refund", order.id),
            json!({"reason": "The customer asked for their money back."}),
        )
        .await
    }

    /// Asserts that the secret key is in no request but Stripe's own (as
    /// the bearer), in no answer given and nowhere in control's log.
    fn assert_key_kept(&self, answers: &[&Value]) {
        let log = self.stack.control().log();
        assert!(!log.is_empty(), "control logs");
        assert!(
            !log.contains(&self.secret_key),
            "the secret key is in control's log"
        );
        assert!(
            !log.contains(&self.webhook_secret),
            "the webhook secret is in control's log"
        );
        for answer in answers {
            let text = answer.to_string();
            assert!(
                !text.contains(&self.secret_key),
                "an answer has the key: {text}"
            );
        }
        for call in self.stripe.requests() {
            assert!(!call.body.contains(&self.secret_key), "{call:?}");
            assert!(!call.path.contains(&self.secret_key), "{call:?}");
        }
    }
}

/// The checkout's id, the last part of the URL Stripe gave for it.
fn checkout_ref(order: &PlacedOrder) -> &str {
    order.checkout_url.rsplit('/').next().unwrap()
}

fn assert_authenticated(call: &Recorded, secret_key: &str) {
    assert_eq!(
        call.header("authorization"),
        Some(format!("Bearer {secret_key}").as_str()),
        "the secret key is the bearer"
    );
    assert!(
        call.header("idempotency-key")
            .is_some_and(|k| !k.is_empty()),
        "every call carries an idempotency key: {call:?}"
    );
}

#[tokio::test]
async fn a_webhook_signed_with_another_secret_is_refused_and_credits_nothing() {
    let shop = Shop::open().await;
    let order = shop.order().await;
    let before = balance(&shop.customer).await;

    let forged = Webhook::paid(
        &unique("whsec_someone_else_"),
        &order,
        checkout_ref(&order),
        "pi_forged",
    );
    let refused = shop.deliver(&forged).await;
    expect_error(&refused, StatusCode::BAD_REQUEST, "bad_signature", None);
    // The right signature on a changed body is no better.
    let mut altered = Webhook::paid(
        &shop.webhook_secret,
        &order,
        checkout_ref(&order),
        "pi_altered",
    );
    altered.body = altered.body.replace("pi_altered", "pi_attacker");
    expect_error(
        &shop.deliver(&altered).await,
        StatusCode::BAD_REQUEST,
        "bad_signature",
        None,
    );
    // Nor is the sandbox's address, which is not the provider in use.
    let signed = Webhook::paid(
        &shop.webhook_secret,
        &order,
        checkout_ref(&order),
        "pi_sandbox",
    );
    let (status, _) = signed
        .post(&shop.stack.http(), &shop.stack.platform(), "sandbox")
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    assert_eq!(balance(&shop.customer).await, before, "nothing credited");
    assert_eq!(shop.order_status(&order).await, "pending");
    assert_eq!(shop.stack.db.count("payment_events").await, 0);
    assert_eq!(
        shop.stack
            .db
            .count("ledger_entries WHERE kind = 'purchase'")
            .await,
        0
    );
    shop.assert_key_kept(&[&refused.1]);
}

#[tokio::test]
async fn stripe_failing_on_checkout_is_a_clear_503_and_nothing_is_paid() {
    let shop = Shop::open().await;
    let before = balance(&shop.customer).await;
    shop.stripe.fail_with(Some(Failure::ServerError));

    let failed = shop
        .customer
        .post("/api/v1/orders", json!({"package_id": shop.package_id()}))
        .await;
    let message = expect_error(
        &failed,
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        None,
    );
    assert!(
        message.contains("Stripe") && message.contains("no money moved"),
        "{message}"
    );
    assert_eq!(shop.stripe.calls_to("/v1/checkout/sessions").len(), 1);
    assert!(failed.1.get("checkout_url").is_none());
    assert_eq!(balance(&shop.customer).await, before);
    assert_eq!(
        shop.stack
            .db
            .count("orders WHERE status <> 'pending'")
            .await,
        0
    );
    assert_eq!(
        shop.stack.db.count("lots WHERE source = 'purchase'").await,
        0
    );

    // Once Stripe answers again, buying works.
    shop.stripe.fail_with(None);
    let order = shop.order().await;
    assert!(order
        .checkout_url
        .starts_with("https://checkout.stripe.example/"));
    shop.assert_key_kept(&[&failed.1]);
}

#[tokio::test]
async fn a_refund_stripe_refuses_leaves_the_order_paid_and_the_time_in_place() {
    let shop = Shop::open().await;
    let order = shop.order().await;
    assert_eq!(shop.pay(&order, "pi_refused").await.0, StatusCode::OK);
    let paid = balance(&shop.customer).await;

    let (status, _) = shop.refund(&shop.customer, &order).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "only admins refund");
    assert!(shop.stripe.calls_to("/v1/refunds").is_empty());

    shop.stripe.fail_with(Some(Failure::Refused(
        "Charge ch_3Q has already been refunded.".into(),
    )));
    let refused = shop.refund(&shop.admin, &order).await;
    let message = expect_error(&refused, StatusCode::CONFLICT, "conflict", None);
    assert!(message.contains("already been refunded"), "{message}");
    shop.stripe.fail_with(Some(Failure::ServerError));
    let failed = shop.refund(&shop.admin, &order).await;
    expect_error(
        &failed,
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        None,
    );

    assert_eq!(shop.order_status(&order).await, "paid");
    assert_eq!(balance(&shop.customer).await, paid, "the time stays");
    assert_eq!(
        shop.stack
            .db
            .count("ledger_entries WHERE kind = 'refund'")
            .await,
        0
    );
    shop.assert_key_kept(&[&refused.1, &failed.1]);
}

#[tokio::test]
async fn a_checkout_carries_the_database_price_a_signed_webhook_credits_once_and_a_refund_takes_it_back(
) {
    let shop = Shop::open().await;
    let before = balance(&shop.customer).await;

    // The client names the package only; a price it sends is refused.
    let priced_by_client = shop
        .customer
        .post(
            "/api/v1/orders",
            json!({"package_id": shop.package_id(), "amount_minor": 1}),
        )
        .await;
    assert_eq!(
        priced_by_client.0,
        StatusCode::BAD_REQUEST,
        "{}",
        priced_by_client.1
    );
    assert!(shop.stripe.requests().is_empty(), "nothing reached Stripe");

    let order = shop.order().await;
    let package = &shop.package;
    assert_eq!(order.amount_minor, package["price_minor"].as_u64().unwrap());
    assert_eq!(
        order.compute_seconds,
        package["compute_minutes"].as_u64().unwrap() * 60
    );
    let calls = shop.stripe.requests();
    assert_eq!(calls.len(), 1, "{calls:?}");
    let checkout = &calls[0];
    assert_eq!(
        (checkout.method.as_str(), checkout.path.as_str()),
        ("POST", "/v1/checkout/sessions")
    );
    assert_authenticated(checkout, &shop.secret_key);
    assert_eq!(
        checkout.header("content-type"),
        Some("application/x-www-form-urlencoded")
    );
    let id = order.id.to_string();
    let currency = package["currency"].as_str().unwrap().to_ascii_lowercase();
    let price = order.amount_minor.to_string();
    let success_url = format!("{}/orders/{id}", shop.stack.platform());
    for (field, want) in [
        ("mode", "payment"),
        ("client_reference_id", id.as_str()),
        ("metadata[order_id]", id.as_str()),
        ("success_url", success_url.as_str()),
        ("line_items[0][quantity]", "1"),
        ("line_items[0][price_data][unit_amount]", price.as_str()),
        ("line_items[0][price_data][currency]", currency.as_str()),
        (
            "line_items[0][price_data][product_data][name]",
            package["name"].as_str().unwrap(),
        ),
    ] {
        assert_eq!(checkout.field(field), Some(want), "{field} in {checkout:?}");
    }
    assert!(checkout.field("cancel_url").is_some());
    assert!(
        order
            .checkout_url
            .starts_with("https://checkout.stripe.example/c/pay/cs_test_"),
        "the buyer goes to Stripe's page: {}",
        order.checkout_url
    );

    // Paid: the time arrives once, however often Stripe delivers.
    let webhook = Webhook::paid(
        &shop.webhook_secret,
        &order,
        checkout_ref(&order),
        "pi_3QpaidOnce",
    );
    let credited = shop.deliver(&webhook).await;
    assert_eq!(credited.0, StatusCode::OK, "{}", credited.1);
    assert_eq!(credited.1["outcome"], "credited");
    assert_eq!(
        balance(&shop.customer).await,
        before + order.compute_seconds
    );
    let again = shop.deliver(&webhook).await;
    assert_eq!(again.1["outcome"], "duplicate");
    assert_eq!(
        balance(&shop.customer).await,
        before + order.compute_seconds
    );
    assert_eq!(shop.order_status(&order).await, "paid");

    // The admin refunds: Stripe is asked for the payment back, the time goes.
    let refunded = shop.refund(&shop.admin, &order).await;
    assert_eq!(refunded.0, StatusCode::OK, "{}", refunded.1);
    assert_eq!(refunded.1["order"]["status"], "refunded");
    let refunds = shop.stripe.calls_to("/v1/refunds");
    assert_eq!(refunds.len(), 1, "{refunds:?}");
    assert_authenticated(&refunds[0], &shop.secret_key);
    assert_eq!(refunds[0].field("payment_intent"), Some("pi_3QpaidOnce"));
    assert_ne!(
        refunds[0].header("idempotency-key"),
        checkout.header("idempotency-key"),
        "a refund is not a retry of the checkout"
    );
    assert_eq!(balance(&shop.customer).await, before);
    assert_eq!(shop.order_status(&order).await, "refunded");
    let twice = shop.refund(&shop.admin, &order).await;
    assert_eq!(twice.0, StatusCode::CONFLICT, "{}", twice.1);
    assert_eq!(shop.stripe.calls_to("/v1/refunds").len(), 1);

    let order_page = shop
        .customer
        .get_json(&format!("/api/v1/orders/{id}"))
        .await;
    shop.assert_key_kept(&[
        &priced_by_client.1,
        &credited.1,
        &again.1,
        &refunded.1,
        &twice.1,
        &order_page,
    ]);
}
