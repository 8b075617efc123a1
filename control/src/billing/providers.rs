//! Payment providers behind one trait: the sandbox (control's own checkout
//! page with test cards, the default) and Stripe (Checkout Sessions and
//! refunds over its HTTP API). Both confirm payments with a webhook in
//! Stripe's format, signed with the webhook secret, so a payment reaches
//! the ledger by one path whichever provider took it.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use opencloud_protocol::metrics::LabelValue;
use serde::Deserialize;

use super::webhook::{self, WebhookSecret};
use crate::config::{BillingPolicy, ProviderChoice};
use crate::error::AppError;
use crate::ids::random_id;

/// What a checkout is for: copied from the order, which copied the package.
#[derive(Debug, Clone)]
pub struct CheckoutRequest {
    pub order_id: u64,
    pub package_name: String,
    pub amount_minor: u64,
    pub currency: String,
    /// Where the buyer lands after paying (the order's return page).
    pub success_url: String,
    /// Where the buyer lands after giving up (Packages).
    pub cancel_url: String,
}

/// A started checkout: the provider's reference and where to send the buyer.
#[derive(Debug, Clone)]
pub struct Checkout {
    pub checkout_ref: String,
    pub url: String,
}

#[async_trait]
pub trait PaymentProvider: Send + Sync {
    /// The name in webhook addresses and on orders: `sandbox`, `stripe`.
    fn name(&self) -> &'static str;
    /// Starts paying for an order.
    async fn start_checkout(&self, request: &CheckoutRequest) -> Result<Checkout, AppError>;
    /// Gives an order's payment back; returns the provider's refund id.
    async fn refund(&self, order_id: u64, payment_ref: &str) -> Result<String, AppError>;
    /// What the provider's webhooks are signed with.
    fn webhook_secret(&self) -> &WebhookSecret;
}

/// Reads the secret in `path` (owner-only), or, when `create` and the
/// file is missing, makes a random one there with mode 0600.
pub fn secret_file(path: &Path, what: &'static str, create: bool) -> anyhow::Result<String> {
    if create && !path.exists() {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let secret = format!("whsec_{}{}", random_id(), random_id());
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| anyhow::anyhow!("cannot create the {what} {}: {e}", path.display()))?;
        file.write_all(secret.as_bytes())?;
        return Ok(secret);
    }
    let text = opencloud_protocol::config::read_private_file(what, path)?;
    let secret = text.trim().to_owned();
    anyhow::ensure!(!secret.is_empty(), "the {what} {} is empty", path.display());
    Ok(secret)
}

/// The provider in use, and the sandbox itself when that is it (its
/// checkout page needs more than the trait).
#[derive(Clone)]
pub struct Payments {
    pub provider: Arc<dyn PaymentProvider>,
    pub sandbox: Option<Arc<Sandbox>>,
}

impl Payments {
    /// The provider `policy` names, with its secrets read. `webhook_url` is
    /// control's own webhook address, where the sandbox delivers.
    pub fn from_policy(policy: &BillingPolicy, webhook_url: String) -> anyhow::Result<Self> {
        let is_sandbox = policy.provider == ProviderChoice::Sandbox;
        let secret = WebhookSecret::new(secret_file(
            &policy.webhook_secret_file,
            "webhook secret (billing.webhook_secret_file)",
            is_sandbox,
        )?);
        Ok(match &policy.provider {
            ProviderChoice::Sandbox => {
                let sandbox = Arc::new(Sandbox::new(
                    secret,
                    webhook_url,
                    policy.sandbox_delivery_delay,
                ));
                Self {
                    provider: sandbox.clone(),
                    sandbox: Some(sandbox),
                }
            }
            ProviderChoice::Stripe {
                api_url,
                secret_key_file,
            } => Self {
                provider: Arc::new(Stripe {
                    api_url: api_url.clone(),
                    secret_key: secret_file(
                        secret_key_file,
                        "Stripe secret key (billing.stripe.secret_key_file)",
                        false,
                    )?,
                    webhook_secret: secret,
                    http: reqwest::Client::builder()
                        .timeout(Duration::from_secs(20))
                        .build()?,
                }),
                sandbox: None,
            },
        })
    }
}

/// The sandbox: control's own checkout page (`/checkout/sandbox/{order}`)
/// with Stripe's test cards; a paid checkout is confirmed by a signed
/// webhook posted to control's own webhook address.
pub struct Sandbox {
    secret: WebhookSecret,
    webhook_url: String,
    delay: Duration,
    http: reqwest::Client,
}

/// The sandbox's test cards and what they do.
pub const CARD_SUCCEEDS: &str = "4242424242424242";
pub const CARD_DECLINED: &str = "4000000000000002";
pub const CARD_INSUFFICIENT_FUNDS: &str = "4000000000009995";

/// How a payment went: the `outcome` of `opencloud_control_payments_total`
/// (the last three are the sandbox's declines).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PaymentOutcome {
    Started,
    Paid,
    Failed,
    Refunded,
    InvalidCard,
    InsufficientFunds,
    Declined,
}

impl LabelValue for PaymentOutcome {
    const ALL: &'static [Self] = &[
        PaymentOutcome::Started,
        PaymentOutcome::Paid,
        PaymentOutcome::Failed,
        PaymentOutcome::Refunded,
        PaymentOutcome::InvalidCard,
        PaymentOutcome::InsufficientFunds,
        PaymentOutcome::Declined,
    ];
    fn label(self) -> &'static str {
        match self {
            PaymentOutcome::Started => "started",
            PaymentOutcome::Paid => "paid",
            PaymentOutcome::Failed => "failed",
            PaymentOutcome::Refunded => "refunded",
            PaymentOutcome::InvalidCard => "invalid_card",
            PaymentOutcome::InsufficientFunds => "insufficient_funds",
            PaymentOutcome::Declined => "declined",
        }
    }
}

impl PaymentOutcome {
    pub const METRIC: &'static str = "opencloud_control_payments_total";

    pub fn count(self, provider: &str) {
        metrics::counter!(Self::METRIC, "provider" => provider.to_owned(), "outcome" => self.label())
            .increment(1);
    }
}

/// Why the sandbox refused a card: the metric's outcome and the buyer's message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decline {
    pub outcome: PaymentOutcome,
    pub field: &'static str,
    pub message: String,
}

/// A card as the sandbox's form sends it.
#[derive(Debug, Clone, Default)]
pub struct Card {
    pub number: String,
    pub expiry: String,
    pub cvc: String,
}

fn luhn_valid(digits: &str) -> bool {
    let sum: u32 = digits
        .bytes()
        .rev()
        .enumerate()
        .map(|(i, b)| {
            let d = u32::from(b - b'0');
            if i % 2 == 1 {
                let d2 = d * 2;
                if d2 > 9 {
                    d2 - 9
                } else {
                    d2
                }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

impl Card {
    /// What the sandbox's bank says: `Ok` for the card that succeeds, a
    /// decline with a message for the rest. `now_year_month` is `(2026, 12)`.
    pub fn charge(&self, now_year_month: (u32, u32)) -> Result<(), Decline> {
        let decline = |outcome, field, message: &str| Decline {
            outcome,
            field,
            message: message.into(),
        };
        let number: String = self
            .number
            .chars()
            .filter(|c| !c.is_whitespace() && *c != '-')
            .collect();
        if !(12..=19).contains(&number.len())
            || !number.bytes().all(|b| b.is_ascii_digit())
            || !luhn_valid(&number)
        {
            return Err(decline(
                PaymentOutcome::InvalidCard,
                "card_number",
                "Your card number is incorrect.",
            ));
        }
        let expiry: String = self.expiry.chars().filter(|c| !c.is_whitespace()).collect();
        let valid_expiry = expiry.split_once('/').and_then(|(m, y)| {
            let month: u32 = m.parse().ok()?;
            let year: u32 = y.parse().ok()?;
            let year = if year < 100 { 2000 + year } else { year };
            ((1..=12).contains(&month)).then_some((year, month))
        });
        match valid_expiry {
            None => {
                return Err(decline(
                    PaymentOutcome::InvalidCard,
                    "expiry",
                    "Write the expiry date as MM/YY.",
                ))
            }
            Some(date) if date < now_year_month => {
                return Err(decline(
                    PaymentOutcome::InvalidCard,
                    "expiry",
                    "Your card has expired.",
                ))
            }
            Some(_) => {}
        }
        let cvc = self.cvc.trim();
        if !(3..=4).contains(&cvc.len()) || !cvc.bytes().all(|b| b.is_ascii_digit()) {
            return Err(decline(
                PaymentOutcome::InvalidCard,
                "cvc",
                "Your card's security code is incorrect.",
            ));
        }
        match number.as_str() {
            CARD_SUCCEEDS => Ok(()),
            CARD_INSUFFICIENT_FUNDS => Err(decline(
                PaymentOutcome::InsufficientFunds,
                "card_number",
                "Your card has insufficient funds.",
            )),
            CARD_DECLINED => Err(decline(
                PaymentOutcome::Declined,
                "card_number",
                "Your card was declined.",
            )),
            _ => Err(decline(
                PaymentOutcome::Declined,
                "card_number",
                "Your card was declined. This is the sandbox: pay with 4242 4242 4242 4242.",
            )),
        }
    }
}

impl Sandbox {
    pub fn new(secret: WebhookSecret, webhook_url: String, delay: Duration) -> Self {
        Self {
            secret,
            webhook_url,
            delay,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .expect("an HTTP client"),
        }
    }

    /// Posts `event` to control's webhook address as Stripe would: signed
    /// afresh for each attempt, retried with growing pauses until a 2xx or
    /// a 4xx answer (a refusal is final), for about a minute.
    pub async fn deliver(&self, event: serde_json::Value) {
        let body = event.to_string();
        tokio::time::sleep(self.delay).await;
        let mut pause = Duration::from_millis(250);
        for attempt in 1..=8 {
            let signature = self.secret.sign(crate::clock::now_unix(), body.as_bytes());
            let sent = self
                .http
                .post(&self.webhook_url)
                .header("content-type", "application/json")
                .header(webhook::SIGNATURE_HEADER, signature)
                .body(body.clone())
                .send()
                .await;
            match sent {
                Ok(r) if r.status().is_success() => return,
                Ok(r) if r.status().is_client_error() => {
                    tracing::error!(status = %r.status(), "sandbox webhook refused");
                    return;
                }
                Ok(r) => {
                    tracing::warn!(attempt, status = %r.status(), "sandbox webhook failed; retrying")
                }
                Err(e) => tracing::warn!(attempt, error = %e, "sandbox webhook failed; retrying"),
            }
            tokio::time::sleep(pause).await;
            pause *= 2;
        }
        tracing::error!("sandbox webhook gave up after 8 attempts");
    }
}

#[async_trait]
impl PaymentProvider for Sandbox {
    fn name(&self) -> &'static str {
        "sandbox"
    }

    async fn start_checkout(&self, request: &CheckoutRequest) -> Result<Checkout, AppError> {
        // The return page's origin is the checkout's too.
        let origin = request
            .success_url
            .split("/orders/")
            .next()
            .unwrap_or_default();
        Ok(Checkout {
            checkout_ref: format!("cs_sandbox_{}", random_id()),
            url: format!("{origin}/checkout/sandbox/{}", request.order_id),
        })
    }

    async fn refund(&self, _order_id: u64, _payment_ref: &str) -> Result<String, AppError> {
        Ok(format!("re_sandbox_{}", random_id()))
    }

    fn webhook_secret(&self) -> &WebhookSecret {
        &self.secret
    }
}

/// Stripe: Checkout Sessions and refunds over its HTTP API with the secret
/// key; every call carries an idempotency key so a retry never pays twice.
pub struct Stripe {
    api_url: String,
    secret_key: String,
    webhook_secret: WebhookSecret,
    http: reqwest::Client,
}

#[derive(Deserialize)]
struct StripeObject {
    id: String,
    #[serde(default)]
    url: Option<String>,
}

#[derive(Deserialize)]
struct StripeError {
    error: StripeErrorBody,
}

#[derive(Deserialize)]
struct StripeErrorBody {
    #[serde(default)]
    message: String,
}

impl Stripe {
    async fn post(
        &self,
        path: &str,
        idempotency_key: String,
        form: &[(String, String)],
    ) -> Result<StripeObject, AppError> {
        let response = self
            .http
            .post(format!("{}{path}", self.api_url))
            .bearer_auth(&self.secret_key)
            .header("Idempotency-Key", idempotency_key)
            .form(form)
            .send()
            .await
            .map_err(|e| {
                tracing::error!(error = %e, path, "Stripe unreachable");
                AppError::ProviderUnavailable("Stripe")
            })?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(|_| AppError::ProviderUnavailable("Stripe"))?;
        if status.is_success() {
            return serde_json::from_slice(&body)
                .map_err(|e| AppError::Internal(format!("Stripe {path}: unexpected answer: {e}")));
        }
        let message = serde_json::from_slice::<StripeError>(&body)
            .map(|e| e.error.message)
            .unwrap_or_default();
        tracing::error!(%status, path, %message, "Stripe refused a call");
        if status.is_server_error() || status.as_u16() == 429 {
            Err(AppError::ProviderUnavailable("Stripe"))
        } else if status.as_u16() == 402 {
            // Stripe's "the request was valid but failed" (an already
            // refunded charge): its message is written for people.
            Err(AppError::Conflict {
                field: None,
                message: format!("Stripe refused: {message}"),
            })
        } else {
            Err(AppError::Internal(format!(
                "Stripe {path} answered {status}: {message}"
            )))
        }
    }
}

#[async_trait]
impl PaymentProvider for Stripe {
    fn name(&self) -> &'static str {
        "stripe"
    }

    async fn start_checkout(&self, r: &CheckoutRequest) -> Result<Checkout, AppError> {
        let pairs = [
            ("mode", "payment".to_owned()),
            ("client_reference_id", r.order_id.to_string()),
            ("metadata[order_id]", r.order_id.to_string()),
            ("success_url", r.success_url.clone()),
            ("cancel_url", r.cancel_url.clone()),
            ("line_items[0][quantity]", "1".into()),
            (
                "line_items[0][price_data][currency]",
                r.currency.to_ascii_lowercase(),
            ),
            (
                "line_items[0][price_data][unit_amount]",
                r.amount_minor.to_string(),
            ),
            (
                "line_items[0][price_data][product_data][name]",
                r.package_name.clone(),
            ),
        ];
        let form: Vec<(String, String)> =
            pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
        let session = self
            .post(
                "/v1/checkout/sessions",
                format!("opencloud-order-{}-checkout", r.order_id),
                &form,
            )
            .await?;
        let url = session
            .url
            .ok_or_else(|| AppError::Internal("Stripe's checkout session has no url".into()))?;
        Ok(Checkout {
            checkout_ref: session.id,
            url,
        })
    }

    async fn refund(&self, order_id: u64, payment_ref: &str) -> Result<String, AppError> {
        let form = vec![
            ("payment_intent".to_owned(), payment_ref.to_owned()),
            ("metadata[order_id]".to_owned(), order_id.to_string()),
        ];
        Ok(self
            .post(
                "/v1/refunds",
                format!("opencloud-order-{order_id}-refund"),
                &form,
            )
            .await?
            .id)
    }

    fn webhook_secret(&self) -> &WebhookSecret {
        &self.webhook_secret
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn card(number: &str, expiry: &str) -> Card {
        Card {
            number: number.into(),
            expiry: expiry.into(),
            cvc: "123".into(),
        }
    }

    #[test]
    fn the_test_cards_do_what_stripe_documents() {
        let now = (2026, 12);
        assert_eq!(card("4242 4242 4242 4242", "12/30").charge(now), Ok(()));
        assert_eq!(
            card("4000 0000 0000 0002", "12/30")
                .charge(now)
                .unwrap_err()
                .outcome,
            PaymentOutcome::Declined
        );
        assert_eq!(
            card("4000000000009995", "01/27")
                .charge(now)
                .unwrap_err()
                .outcome,
            PaymentOutcome::InsufficientFunds
        );
        let wrong = card("4242 4242 4242 4241", "12/30")
            .charge(now)
            .unwrap_err();
        assert_eq!(
            (wrong.field, wrong.message.as_str()),
            ("card_number", "Your card number is incorrect.")
        );
        assert_eq!(
            card(CARD_SUCCEEDS, "11/26").charge(now).unwrap_err().field,
            "expiry"
        );
        assert_eq!(
            card(CARD_SUCCEEDS, "13/30").charge(now).unwrap_err().field,
            "expiry"
        );
        assert_eq!(card(CARD_SUCCEEDS, "12/26").charge(now), Ok(()));
        let mut no_cvc = card(CARD_SUCCEEDS, "12/30");
        no_cvc.cvc = "12a".into();
        assert_eq!(no_cvc.charge(now).unwrap_err().field, "cvc");
    }
}
