//! Buying as a customer and paying as the provider does: an order placed
//! through the API, and the `checkout.session.completed` webhook that pays
//! it, signed with the webhook secret the way Stripe and the sandbox sign.
//! The Stripe tests and bench/payments both buy this way.

use opencloud_control::billing::webhook::{paid_event, WebhookSecret, SIGNATURE_HEADER};
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::machine::unique;
use crate::user::TestUser;

/// An order as `POST /api/v1/orders` answered it.
#[derive(Debug, Clone)]
pub struct PlacedOrder {
    pub id: u64,
    pub checkout_url: String,
    pub amount_minor: u64,
    pub currency: String,
    pub compute_seconds: u64,
}

/// `user` orders package `package_id`, which must be accepted (201).
pub async fn place_order(user: &TestUser, package_id: u64) -> PlacedOrder {
    let (status, body) = user
        .post("/api/v1/orders", json!({ "package_id": package_id }))
        .await;
    assert_eq!(status, StatusCode::CREATED, "order: {body}");
    let number = |v: &Value| v.as_u64().unwrap_or_else(|| panic!("a number in {body}"));
    let order = &body["order"];
    PlacedOrder {
        id: number(&body["order_id"]),
        checkout_url: body["checkout_url"].as_str().unwrap_or_default().to_owned(),
        amount_minor: number(&order["amount_minor"]),
        currency: order["currency"].as_str().unwrap_or_default().to_owned(),
        compute_seconds: number(&order["compute_seconds"]),
    }
}

/// `user`'s compute balance as `GET /api/v1/me` shows it.
pub async fn balance(user: &TestUser) -> u64 {
    let me = user.get_json("/api/v1/me").await;
    me["balance_seconds"]
        .as_u64()
        .unwrap_or_else(|| panic!("no balance in {me}"))
}

/// A webhook ready to post: its body and `Stripe-Signature` header.
#[derive(Debug, Clone)]
pub struct Webhook {
    pub body: String,
    pub signature: String,
}

impl Webhook {
    /// A paid `checkout.session.completed` for `order`, whose checkout is
    /// `checkout_ref` and payment `payment_intent`, signed now with `secret`.
    pub fn paid(
        secret: &str,
        order: &PlacedOrder,
        checkout_ref: &str,
        payment_intent: &str,
    ) -> Self {
        let now = opencloud_control::now_unix();
        let body = paid_event(
            &unique("evt_"),
            checkout_ref,
            order.id,
            order.amount_minor,
            &order.currency,
            payment_intent,
            now,
        )
        .to_string();
        let signature = WebhookSecret::new(secret.to_owned()).sign(now, body.as_bytes());
        Self { body, signature }
    }

    /// Posts it to `provider`'s webhook address on the platform at `base`,
    /// without a cookie, as the provider does: the status and JSON answer.
    pub async fn post(
        &self,
        http: &reqwest::Client,
        base: &str,
        provider: &str,
    ) -> (StatusCode, Value) {
        let r = http
            .post(format!("{base}/api/v1/payments/webhooks/{provider}"))
            .header("content-type", "application/json")
            .header(SIGNATURE_HEADER, &self.signature)
            .body(self.body.clone())
            .send()
            .await
            .expect("webhook request");
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }
}
