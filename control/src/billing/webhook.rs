//! Stripe's webhook format, which both providers speak: the
//! `Stripe-Signature` header (`t=<unix>,v1=<hex HMAC-SHA256(secret,
//! "<t>.<raw body>")>`), checked against the raw body in constant time
//! within a 300 s tolerance, and the few event types that move money.

use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;

use opencloud_protocol::metrics::LabelValue;

use crate::error::AppError;

/// Webhooks signed longer ago (or further ahead) than this are refused.
pub const TOLERANCE_SECONDS: u64 = 300;

pub const SIGNATURE_HEADER: &str = "stripe-signature";

/// The signing secret; never printed.
#[derive(Clone)]
pub struct WebhookSecret(String);

impl WebhookSecret {
    pub fn new(secret: String) -> Self {
        Self(secret)
    }

    fn mac(&self, timestamp: u64, body: &[u8]) -> Hmac<Sha256> {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(self.0.as_bytes()).expect("HMAC takes any key length");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        mac
    }

    /// The `Stripe-Signature` header value for `body` signed at `timestamp`.
    pub fn sign(&self, timestamp: u64, body: &[u8]) -> String {
        let digest = self.mac(timestamp, body).finalize().into_bytes();
        format!("t={timestamp},v1={}", hex::encode(digest))
    }

    /// Checks `header` against `body` at time `now`: one of its `v1`
    /// signatures must match, and its timestamp be within the tolerance.
    pub fn verify(&self, header: Option<&str>, body: &[u8], now: u64) -> Result<(), AppError> {
        let header = header.ok_or_else(|| {
            rejected(
                WebhookRejection::BadSignature,
                "The Stripe-Signature header is missing.",
            )
        })?;
        let mut timestamp = None;
        let mut signatures = Vec::new();
        for part in header.split(',') {
            match part.trim().split_once('=') {
                Some(("t", t)) => timestamp = t.parse::<u64>().ok(),
                Some(("v1", v)) => signatures.extend(hex::decode(v).ok()),
                _ => {}
            }
        }
        let timestamp = timestamp.ok_or_else(|| {
            rejected(
                WebhookRejection::BadSignature,
                "The Stripe-Signature header has no timestamp.",
            )
        })?;
        let matched = signatures
            .iter()
            .any(|s| self.mac(timestamp, body).verify_slice(s).is_ok());
        if !matched {
            return Err(rejected(
                WebhookRejection::BadSignature,
                "The signature does not match the body.",
            ));
        }
        if now.abs_diff(timestamp) > TOLERANCE_SECONDS {
            return Err(rejected(
                WebhookRejection::Stale,
                format!("The signature's timestamp is more than {TOLERANCE_SECONDS} s from now."),
            ));
        }
        Ok(())
    }
}

impl std::fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WebhookSecret(…)")
    }
}

/// Why a webhook was refused: the `reason` of
/// `opencloud_control_webhook_rejections_total` and of the 400 answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookRejection {
    BadSignature,
    Stale,
    Malformed,
    UnknownOrder,
    AmountMismatch,
    CurrencyMismatch,
}

impl LabelValue for WebhookRejection {
    const ALL: &'static [Self] = &[
        WebhookRejection::BadSignature,
        WebhookRejection::Stale,
        WebhookRejection::Malformed,
        WebhookRejection::UnknownOrder,
        WebhookRejection::AmountMismatch,
        WebhookRejection::CurrencyMismatch,
    ];
    fn label(self) -> &'static str {
        match self {
            WebhookRejection::BadSignature => "bad_signature",
            WebhookRejection::Stale => "stale",
            WebhookRejection::Malformed => "malformed",
            WebhookRejection::UnknownOrder => "unknown_order",
            WebhookRejection::AmountMismatch => "amount_mismatch",
            WebhookRejection::CurrencyMismatch => "currency_mismatch",
        }
    }
}

impl WebhookRejection {
    pub const METRIC: &'static str = "opencloud_control_webhook_rejections_total";
}

pub fn rejected(reason: WebhookRejection, message: impl Into<String>) -> AppError {
    AppError::Rejected {
        reason: reason.label(),
        message: message.into(),
    }
}

/// A Stripe event, as much of it as we read.
#[derive(Debug, Deserialize)]
pub struct Event {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub data: EventData,
}

#[derive(Debug, Deserialize)]
pub struct EventData {
    pub object: CheckoutSession,
}

/// The `checkout.session` object of Stripe's API.
#[derive(Debug, Deserialize)]
pub struct CheckoutSession {
    pub id: String,
    #[serde(default)]
    pub client_reference_id: Option<String>,
    #[serde(default)]
    pub amount_total: Option<u64>,
    #[serde(default)]
    pub currency: Option<String>,
    #[serde(default)]
    pub payment_status: Option<String>,
    #[serde(default)]
    pub payment_intent: Option<String>,
}

/// What an event means for its order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Meaning {
    /// The money is in: credit the order (once).
    Paid,
    /// The checkout ended without payment.
    Failed,
    /// Nothing for us (an event type we do not act on, or a checkout whose
    /// payment is still on its way).
    Nothing,
}

impl Event {
    /// Parses a verified body; a body that is not an event is refused.
    pub fn parse(body: &[u8]) -> Result<Self, AppError> {
        serde_json::from_slice(body).map_err(|e| {
            rejected(
                WebhookRejection::Malformed,
                format!("The body is not a Stripe event: {e}"),
            )
        })
    }

    pub fn meaning(&self) -> Meaning {
        let paid = self.data.object.payment_status.as_deref() == Some("paid");
        match self.kind.as_str() {
            "checkout.session.completed" if paid => Meaning::Paid,
            "checkout.session.async_payment_succeeded" => Meaning::Paid,
            "checkout.session.async_payment_failed" | "checkout.session.expired" => Meaning::Failed,
            _ => Meaning::Nothing,
        }
    }

    /// The order this event is about (`client_reference_id`), if it names one.
    pub fn order_id(&self) -> Option<u64> {
        self.data
            .object
            .client_reference_id
            .as_deref()
            .and_then(|id| id.parse().ok())
    }
}

/// A `checkout.session.completed` event for `order_id`, paid, as the
/// sandbox sends it and Stripe would.
pub fn paid_event(
    event_id: &str,
    checkout_ref: &str,
    order_id: u64,
    amount_minor: u64,
    currency: &str,
    payment_ref: &str,
    created: u64,
) -> serde_json::Value {
    serde_json::json!({
        "id": event_id,
        "object": "event",
        "type": "checkout.session.completed",
        "created": created,
        "livemode": false,
        "data": {"object": {
            "id": checkout_ref,
            "object": "checkout.session",
            "client_reference_id": order_id.to_string(),
            "amount_total": amount_minor,
            "currency": currency.to_ascii_lowercase(),
            "payment_status": "paid",
            "status": "complete",
            "payment_intent": payment_ref,
            "metadata": {"order_id": order_id.to_string()},
        }},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_fails_on_any_changed_byte_key_or_stale_time() {
        let secret = WebhookSecret::new("whsec_test".into());
        let body = br#"{"id":"evt_1"}"#;
        let header = secret.sign(1000, body);
        secret.verify(Some(&header), body, 1000).unwrap();
        secret.verify(Some(&header), body, 1300).unwrap();
        let code = |r: Result<(), AppError>| match r.unwrap_err() {
            AppError::Rejected { reason, .. } => reason,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            code(secret.verify(Some(&header), br#"{"id":"evt_2"}"#, 1000)),
            "bad_signature"
        );
        assert_eq!(code(secret.verify(Some(&header), body, 1301)), "stale");
        let other = WebhookSecret::new("whsec_other".into());
        assert_eq!(
            code(other.verify(Some(&header), body, 1000)),
            "bad_signature"
        );
        assert_eq!(code(secret.verify(None, body, 1000)), "bad_signature");
        // A re-timed header with the old signature does not pass.
        let moved = header.replace("t=1000", "t=1200");
        assert_eq!(
            code(secret.verify(Some(&moved), body, 1200)),
            "bad_signature"
        );
        // Stripe may send several v1 signatures (secret rotation): one match is enough.
        let both = format!(
            "{},v1={}",
            other.sign(1000, body),
            &header[header.find("v1=").unwrap() + 3..]
        );
        secret.verify(Some(&both), body, 1000).unwrap();
    }

    #[test]
    fn only_paid_checkouts_credit() {
        let body = paid_event("evt_1", "cs_1", 7, 500, "USD", "pi_1", 1).to_string();
        let event = Event::parse(body.as_bytes()).unwrap();
        assert_eq!(event.meaning(), Meaning::Paid);
        assert_eq!(event.order_id(), Some(7));
        let unpaid = body.replace("\"paid\"", "\"unpaid\"");
        assert_eq!(
            Event::parse(unpaid.as_bytes()).unwrap().meaning(),
            Meaning::Nothing
        );
        assert!(Event::parse(b"not json").is_err());
    }
}
