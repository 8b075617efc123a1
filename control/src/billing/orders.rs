//! Buying a package: an order priced from the database, the provider's
//! checkout, and the provider's webhooks applied to the ledger exactly
//! once (the event id is unique and the order row is locked, so the same
//! webhook delivered 20 times at once, late or out of order, credits once).
//! Refunds give the money back and take the lot's unused time.

use mysql_async::prelude::*;
use mysql_async::{Pool, TxOpts};
use serde::Serialize;

use super::ledger::{self, ComputeFlow, Kind, Limits, NewLot};
use super::money::{self, MICRO_PER_MINOR};
use super::providers::{CheckoutRequest, PaymentOutcome, PaymentProvider};
use super::webhook::{rejected, Event, Meaning, WebhookRejection};
use crate::error::{retrying, AppError};
use crate::packages;

/// An order as its buyer and admins see it.
#[derive(Debug, Clone, Serialize)]
pub struct Order {
    pub id: u64,
    pub user_id: u64,
    pub package_id: u64,
    pub package_name: String,
    pub provider: String,
    pub amount_minor: u64,
    pub currency: String,
    pub compute_seconds: u64,
    pub validity_days: u32,
    /// pending, paid, refunded.
    pub status: String,
    /// Why the last attempt to pay failed (a declined card).
    pub last_failure: Option<String>,
    pub created_at: String,
    pub paid_at: Option<String>,
    pub refunded_at: Option<String>,
    #[serde(skip)]
    pub checkout_ref: Option<String>,
    #[serde(skip)]
    pub payment_ref: Option<String>,
    #[serde(skip)]
    pub refund_ref: Option<String>,
}

impl Order {
    pub fn price_display(&self) -> String {
        money::minor(self.amount_minor as i64, &self.currency)
    }

    pub fn compute_display(&self) -> String {
        money::seconds(self.compute_seconds as i64)
    }

    pub fn is_paid(&self) -> bool {
        self.status == "paid"
    }
}

const COLUMNS: &str = "id, user_id, package_id, package_name, provider, amount_minor, currency,
    compute_seconds, validity_days, status, last_failure,
    DATE_FORMAT(created_at, '%Y-%m-%d %H:%i:%s'), DATE_FORMAT(paid_at, '%Y-%m-%d %H:%i:%s'),
    DATE_FORMAT(refunded_at, '%Y-%m-%d %H:%i:%s'), checkout_ref, payment_ref, refund_ref";

fn from_row(mut row: mysql_async::Row) -> Order {
    let mut take = |i: usize| {
        row.take::<mysql_async::Value, _>(i)
            .unwrap_or(mysql_async::Value::NULL)
    };
    use mysql_async::from_value as v;
    Order {
        id: v(take(0)),
        user_id: v(take(1)),
        package_id: v(take(2)),
        package_name: v(take(3)),
        provider: v(take(4)),
        amount_minor: v(take(5)),
        currency: v(take(6)),
        compute_seconds: v(take(7)),
        validity_days: v(take(8)),
        status: v(take(9)),
        last_failure: v(take(10)),
        created_at: v(take(11)),
        paid_at: v(take(12)),
        refunded_at: v(take(13)),
        checkout_ref: v(take(14)),
        payment_ref: v(take(15)),
        refund_ref: v(take(16)),
    }
}

async fn find(conn: &mut impl Queryable, id: u64, suffix: &str) -> Result<Order, AppError> {
    let row: Option<mysql_async::Row> = conn
        .exec_first(
            format!("SELECT {COLUMNS} FROM orders WHERE id = ?{suffix}"),
            (id,),
        )
        .await?;
    row.map(from_row).ok_or(AppError::NotFound("order"))
}

/// Order `id` if `user_id` placed it; anyone else's reads as not found.
pub async fn get_owned(pool: &Pool, user_id: u64, id: u64) -> Result<Order, AppError> {
    let order = find(&mut pool.get_conn().await?, id, "").await?;
    if order.user_id != user_id {
        return Err(AppError::NotFound("order"));
    }
    Ok(order)
}

pub async fn get(pool: &Pool, id: u64) -> Result<Order, AppError> {
    find(&mut pool.get_conn().await?, id, "").await
}

/// `user_id`'s orders, newest first (all users' with `None`, for admins).
pub async fn list(pool: &Pool, user_id: Option<u64>, limit: u32) -> Result<Vec<Order>, AppError> {
    let rows: Vec<mysql_async::Row> = pool
        .get_conn()
        .await?
        .exec(
            format!("SELECT {COLUMNS} FROM orders WHERE ? IS NULL OR user_id = ? ORDER BY id DESC LIMIT ?"),
            (user_id, user_id, limit),
        )
        .await?;
    Ok(rows.into_iter().map(from_row).collect())
}

/// Places an order for `package_id` at the database's price and starts
/// the provider's checkout; returns the order and where to pay.
pub async fn create(
    pool: &Pool,
    provider: &dyn PaymentProvider,
    origin: &str,
    user_id: u64,
    package_id: u64,
) -> Result<(Order, String), AppError> {
    let package = match packages::get(pool, package_id).await {
        Err(AppError::NotFound(_)) => {
            return Err(AppError::invalid(
                "package_id",
                "There is no package with this id.",
            ))
        }
        other => other?,
    };
    if package.retired {
        return Err(AppError::Conflict {
            field: Some("package_id"),
            message: format!(
                "{} is no longer sold; choose a package on the Packages page.",
                package.name
            ),
        });
    }
    let mut conn = pool.get_conn().await?;
    conn.exec_drop(
        "INSERT INTO orders (user_id, package_id, package_name, provider, amount_minor, currency,
            compute_seconds, validity_days, created_at)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, UTC_TIMESTAMP(6))",
        (
            user_id,
            package.id,
            &package.name,
            provider.name(),
            package.price_minor,
            &package.currency,
            u64::from(package.compute_minutes) * 60,
            package.validity_days,
        ),
    )
    .await?;
    let order_id = conn
        .last_insert_id()
        .ok_or_else(|| AppError::Internal("no id for the new order".into()))?;
    let checkout = provider
        .start_checkout(&CheckoutRequest {
            order_id,
            package_name: package.name.clone(),
            amount_minor: package.price_minor,
            currency: package.currency.clone(),
            success_url: format!("{origin}/orders/{order_id}"),
            cancel_url: format!("{origin}/packages"),
        })
        .await?;
    conn.exec_drop(
        "UPDATE orders SET checkout_ref = ? WHERE id = ?",
        (&checkout.checkout_ref, order_id),
    )
    .await?;
    PaymentOutcome::Started.count(provider.name());
    tracing::info!(
        order = order_id,
        user = user_id,
        package = package.id,
        "order placed"
    );
    let order = find(&mut conn, order_id, "").await?;
    Ok((order, checkout.url))
}

/// Notes an attempt to pay a pending order: why it failed (a declined
/// card), or `None` when the card was taken and the confirmation is on its way.
pub async fn note_attempt(
    pool: &Pool,
    order_id: u64,
    failure: Option<&str>,
) -> Result<(), AppError> {
    pool.get_conn()
        .await?
        .exec_drop(
            "UPDATE orders SET last_failure = ? WHERE id = ? AND status = 'pending'",
            (failure, order_id),
        )
        .await?;
    Ok(())
}

/// What a webhook did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WebhookOutcome {
    /// The order was paid and its time credited now.
    Credited,
    /// This event was applied before.
    Duplicate,
    /// The order was already paid (by another event for the same payment).
    AlreadyPaid,
    /// The checkout ended unpaid.
    Failed,
    /// An event type that moves no money.
    Ignored,
}

/// Applies a provider's webhook: signature, then the event, then the
/// order, in one transaction. Refusals say why, are logged and counted,
/// and change nothing.
pub async fn apply_webhook(
    pool: &Pool,
    provider: &dyn PaymentProvider,
    signature: Option<&str>,
    body: &[u8],
    now: u64,
) -> Result<WebhookOutcome, AppError> {
    let result = async {
        provider.webhook_secret().verify(signature, body, now)?;
        let event = Event::parse(body)?;
        let meaning = event.meaning();
        if meaning == Meaning::Nothing {
            return Ok(WebhookOutcome::Ignored);
        }
        let order_id = event.order_id().ok_or_else(|| {
            rejected(
                WebhookRejection::UnknownOrder,
                "The event names no order (client_reference_id).",
            )
        })?;
        retrying(|| apply_event(pool, provider.name(), &event, meaning, order_id)).await
    }
    .await;
    match &result {
        Err(AppError::Rejected { reason, message }) => {
            metrics::counter!(WebhookRejection::METRIC, "provider" => provider.name(), "reason" => *reason)
                .increment(1);
            tracing::warn!(provider = provider.name(), reason, %message, "webhook refused");
        }
        Ok(outcome) => tracing::info!(provider = provider.name(), ?outcome, "webhook applied"),
        Err(_) => {}
    }
    result
}

async fn apply_event(
    pool: &Pool,
    provider: &'static str,
    event: &Event,
    meaning: Meaning,
    order_id: u64,
) -> Result<WebhookOutcome, AppError> {
    let mut tx = pool.start_transaction(TxOpts::default()).await?;
    let order = match find(&mut tx, order_id, " FOR UPDATE").await {
        Err(AppError::NotFound(_)) => None,
        other => Some(other?),
    };
    let object = &event.data.object;
    let Some(order) = order.filter(|o| {
        o.provider == provider && o.checkout_ref.as_deref() == Some(object.id.as_str())
    }) else {
        return Err(rejected(
            WebhookRejection::UnknownOrder,
            format!("No {provider} order {order_id} with this checkout."),
        ));
    };
    if object.amount_total != Some(order.amount_minor) {
        return Err(rejected(
            WebhookRejection::AmountMismatch,
            format!(
                "The amount paid ({:?}) is not the order's ({}).",
                object.amount_total, order.amount_minor
            ),
        ));
    }
    if !object
        .currency
        .as_deref()
        .is_some_and(|c| c.eq_ignore_ascii_case(&order.currency))
    {
        return Err(rejected(
            WebhookRejection::CurrencyMismatch,
            format!(
                "The currency paid ({:?}) is not the order's ({}).",
                object.currency, order.currency
            ),
        ));
    }
    let inserted = tx
        .exec_iter(
            "INSERT IGNORE INTO payment_events (provider, event_id, order_id, event_type, received_at)
             VALUES (?, ?, ?, ?, UTC_TIMESTAMP(6))",
            (provider, &event.id, order_id, &event.kind),
        )
        .await?
        .affected_rows();
    if inserted == 0 {
        tx.commit().await?;
        return Ok(WebhookOutcome::Duplicate);
    }
    let outcome = match meaning {
        Meaning::Paid if order.status == "pending" => {
            ledger::lock_account(&mut tx, order.user_id).await?;
            let package = packages::get_in(&mut tx, order.package_id).await?;
            ledger::add_lot(
                &mut tx,
                &NewLot {
                    user_id: order.user_id,
                    kind: Kind::Purchase,
                    order_id: Some(order.id),
                    package_id: Some(order.package_id),
                    seconds: order.compute_seconds,
                    amount_micro: order.amount_minor as i64 * MICRO_PER_MINOR,
                    currency: Some(&order.currency),
                    limits: Limits {
                        sessions_at_once: package.max_concurrent_sessions,
                        cpu_cores: package.cpu_cores,
                        memory_mib: package.memory_mib,
                        storage_mib: package.storage_quota_mib,
                    },
                    validity_days: order.validity_days,
                    actor_id: None,
                    reason: Some(&event.id),
                },
            )
            .await?;
            tx.exec_drop(
                "UPDATE orders SET status = 'paid', paid_at = UTC_TIMESTAMP(6), last_failure = NULL,
                    payment_ref = COALESCE(?, payment_ref) WHERE id = ?",
                (&object.payment_intent, order.id),
            )
            .await?;
            WebhookOutcome::Credited
        }
        Meaning::Paid => WebhookOutcome::AlreadyPaid,
        Meaning::Failed => {
            tx.exec_drop(
                "UPDATE orders SET last_failure = 'The checkout ended without a payment.'
                 WHERE id = ? AND status = 'pending'",
                (order.id,),
            )
            .await?;
            WebhookOutcome::Failed
        }
        Meaning::Nothing => WebhookOutcome::Ignored,
    };
    tx.commit().await?;
    if outcome == WebhookOutcome::Credited {
        PaymentOutcome::Paid.count(provider);
        metrics::counter!("opencloud_control_revenue_minor_total", "currency" => order.currency.clone())
            .increment(order.amount_minor);
        tracing::info!(order = order.id, user = order.user_id, "payment credited");
    } else if outcome == WebhookOutcome::Failed {
        PaymentOutcome::Failed.count(provider);
    }
    Ok(outcome)
}

/// An admin refunds paid order `order_id`: the provider gives the money
/// back, then the lot's unused time is taken and the order marked, in one
/// transaction. Time already used stays used (and earned).
pub async fn refund(
    pool: &Pool,
    provider: &dyn PaymentProvider,
    order_id: u64,
    actor_id: u64,
    reason: &str,
) -> Result<Order, AppError> {
    let reason = reason.trim();
    if reason.is_empty() || reason.chars().count() > 500 {
        return Err(AppError::invalid(
            "reason",
            "Say why, in at most 500 characters: the reason is kept in the ledger.",
        ));
    }
    let order = get(pool, order_id).await?;
    if order.status != "paid" {
        return Err(AppError::Conflict {
            field: None,
            message: format!(
                "Only a paid order can be refunded; this one is {}.",
                order.status
            ),
        });
    }
    if order.provider != provider.name() {
        return Err(AppError::Conflict {
            field: None,
            message: format!(
                "This order was paid with {}, which is not the provider in use.",
                order.provider
            ),
        });
    }
    let refund_ref = provider
        .refund(order.id, order.payment_ref.as_deref().unwrap_or_default())
        .await?;
    retrying(|| async {
        let mut tx = pool.start_transaction(TxOpts::default()).await?;
        let order = find(&mut tx, order_id, " FOR UPDATE").await?;
        if order.status != "paid" {
            tx.rollback().await?;
            return Ok(order);
        }
        ledger::lock_account(&mut tx, order.user_id).await?;
        let lot: Option<(u64, u64)> = tx
            .exec_first("SELECT id, seconds_left FROM lots WHERE order_id = ? FOR UPDATE", (order.id,))
            .await?;
        let (lot_id, left) = lot.unwrap_or_default();
        ledger::append(
            &mut tx,
            &ledger::Entry {
                user_id: order.user_id,
                kind: Some(Kind::Refund),
                seconds: -(left as i64),
                amount_micro: -(order.amount_minor as i64 * MICRO_PER_MINOR),
                currency: Some(&order.currency),
                lot_id: (lot_id > 0).then_some(lot_id),
                order_id: Some(order.id),
                actor_id: Some(actor_id),
                reason: Some(reason),
                ..Default::default()
            },
        )
        .await?;
        tx.exec_drop("UPDATE lots SET seconds_left = 0 WHERE order_id = ?", (order.id,)).await?;
        tx.exec_drop(
            "UPDATE orders SET status = 'refunded', refunded_at = UTC_TIMESTAMP(6), refund_ref = ? WHERE id = ?",
            (&refund_ref, order.id),
        )
        .await?;
        tx.commit().await?;
        PaymentOutcome::Refunded.count(provider.name());
        ComputeFlow::Refunded.count(left);
        metrics::counter!("opencloud_control_refunds_minor_total", "currency" => order.currency.clone())
            .increment(order.amount_minor);
        tracing::info!(order = order.id, actor = actor_id, seconds = left, "order refunded");
        Ok(order)
    })
    .await?;
    get(pool, order_id).await
}
