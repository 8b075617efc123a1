//! Buying as customers and payment providers do it: orders through the
//! API, webhooks signed the way Stripe signs them (with the secret control
//! made for its sandbox), and the ledger's invariants read back from the
//! database.

use mysql_async::prelude::Queryable;
use reqwest::StatusCode;
use serde_json::{json, Value};

use opencloud_control::billing::webhook::{self, WebhookSecret};

use crate::stack::TestStack;
use crate::user::TestUser;

/// A package on sale, as `/api/v1/packages` lists it.
#[derive(Debug, Clone)]
pub struct OnSale {
    pub id: u64,
    pub name: String,
    pub price_minor: u64,
    pub compute_seconds: u64,
}

impl TestStack {
    /// The packages on sale (the seeded starters once an admin exists).
    pub async fn packages_on_sale(&self) -> Vec<OnSale> {
        let body = self.get_json_anonymous("/api/v1/packages").await;
        body["packages"]
            .as_array()
            .expect("a package list")
            .iter()
            .map(|p| OnSale {
                id: p["id"].as_u64().expect("id"),
                name: p["name"].as_str().expect("name").to_owned(),
                price_minor: p["price_minor"].as_u64().expect("price"),
                compute_seconds: p["compute_minutes"].as_u64().expect("minutes") * 60,
            })
            .collect()
    }

    /// The signing secret control made for its sandbox provider.
    pub fn webhook_secret(&self) -> WebhookSecret {
        let path = self.control().webhook_secret_path();
        WebhookSecret::new(
            std::fs::read_to_string(&path)
                .expect("the webhook secret")
                .trim()
                .to_owned(),
        )
    }

    /// A paid `checkout.session.completed` event for order `order_id`, as
    /// the provider would send it (read from what control recorded).
    pub async fn paid_event(&self, order_id: u64, event_id: &str) -> Value {
        let (checkout_ref, amount, currency): (String, u64, String) = self
            .db
            .conn()
            .await
            .exec_first(
                "SELECT checkout_ref, amount_minor, currency FROM orders WHERE id = ?",
                (order_id,),
            )
            .await
            .expect("read the order")
            .expect("the order exists");
        webhook::paid_event(
            event_id,
            &checkout_ref,
            order_id,
            amount,
            &currency,
            &format!("pi_{event_id}"),
            opencloud_control::now_unix(),
        )
    }

    /// POSTs a webhook body with its `Stripe-Signature` header to the
    /// platform, as the provider does: the status and the JSON answer.
    pub async fn post_webhook(&self, body: &str, signature: &str) -> (StatusCode, Value) {
        let r = self
            .http()
            .post(self.url("/api/v1/payments/webhooks/sandbox"))
            .header("content-type", "application/json")
            .header(webhook::SIGNATURE_HEADER, signature)
            .body(body.to_owned())
            .send()
            .await
            .expect("post the webhook");
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Signs `body` now with the sandbox's secret and POSTs it.
    pub async fn post_signed_webhook(&self, body: &str) -> (StatusCode, Value) {
        let signature = self
            .webhook_secret()
            .sign(opencloud_control::now_unix(), body.as_bytes());
        self.post_webhook(body, &signature).await
    }

    /// Buys `package` for `user`: the order, then its paid webhook. Returns
    /// the order id.
    pub async fn buy(&self, user: &TestUser, package: u64) -> u64 {
        let order = place_order(user, package).await;
        let event = self.paid_event(order, &crate::unique("evt_")).await;
        let (status, body) = self.post_signed_webhook(&event.to_string()).await;
        assert_eq!(status, StatusCode::OK, "webhook: {body}");
        assert_eq!(body["outcome"], "credited", "{body}");
        order
    }

    /// Checks the ledger's invariants over the whole database: every lot's
    /// cached balance is the sum of its entries, every account's balance
    /// the sum of its compute entries, and the purchases the paid orders.
    pub async fn assert_ledger_adds_up(&self) {
        let mut conn = self.db.conn().await;
        let drifting: Vec<(u64, u64, i64)> = conn
            .query(
                "SELECT l.id, l.seconds_left, CAST(COALESCE(SUM(e.seconds), 0) AS SIGNED)
                 FROM lots l LEFT JOIN ledger_entries e ON e.lot_id = l.id
                 GROUP BY l.id, l.seconds_left HAVING l.seconds_left <> COALESCE(SUM(e.seconds), 0)",
            )
            .await
            .expect("read the lots");
        assert!(
            drifting.is_empty(),
            "lots whose balance is not their entries' sum: {drifting:?}"
        );
        let accounts: Vec<(u64, i64, i64)> = conn
            .query(
                "SELECT u.id,
                    CAST((SELECT COALESCE(SUM(seconds_left), 0) FROM lots WHERE user_id = u.id) AS SIGNED),
                    CAST((SELECT COALESCE(SUM(seconds), 0) FROM ledger_entries
                          WHERE user_id = u.id AND book = 'compute') AS SIGNED)
                 FROM users u",
            )
            .await
            .expect("read the accounts");
        for (user, lots, entries) in accounts {
            assert_eq!(
                lots, entries,
                "user {user}: lots hold {lots} s, entries sum to {entries} s"
            );
            assert!(lots >= 0, "user {user} has a negative balance");
        }
        let (purchased, paid): (i64, i64) = conn
            .query_first(
                "SELECT
                    CAST((SELECT COALESCE(SUM(amount_micro), 0) FROM ledger_entries WHERE kind = 'purchase') AS SIGNED),
                    CAST((SELECT COALESCE(SUM(amount_minor), 0) * 1000000 FROM orders
                          WHERE status IN ('paid', 'refunded')) AS SIGNED)",
            )
            .await
            .expect("sum the payments")
            .expect("one row");
        assert_eq!(purchased, paid, "purchase entries and paid orders differ");
    }
}

/// Places an order for `package`; returns its id (the checkout URL must be
/// the platform's sandbox checkout).
pub async fn place_order(user: &TestUser, package: u64) -> u64 {
    let (status, body) = user
        .post("/api/v1/orders", json!({"package_id": package}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "order: {body}");
    let order = body["order_id"].as_u64().expect("an order id");
    let url = body["checkout_url"].as_str().expect("a checkout url");
    assert!(
        url.ends_with(&format!("/checkout/sandbox/{order}")),
        "{url}"
    );
    order
}

/// The user's balance as `/api/v1/me` shows it.
pub async fn balance(user: &TestUser) -> u64 {
    user.get_json("/api/v1/me").await["balance_seconds"]
        .as_u64()
        .expect("balance_seconds")
}
