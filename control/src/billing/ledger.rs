//! The ledger: lots of compute time and the append-only entries that move
//! them, each inside the caller's transaction with its cause.
//!
//! Invariants, which [`drift`] checks and the tests assert:
//! - a lot's `seconds_left` equals the sum of its entries' seconds;
//! - a balance is the sum of the account's live lots, never negative;
//! - use takes from the lot that expires first;
//! - a lot's money is used up exactly: the value of its first `n` seconds
//!   is `floor(amount × n / seconds_total)`, so its usage entries add up to
//!   its price to the micro unit.
//!
//! Every function that changes an account expects the caller to hold the
//! account's row lock ([`lock_account`]) so that changes to one account
//! happen one at a time.

use mysql_async::prelude::*;
use mysql_async::{Params, Pool, Transaction, TxOpts};
use opencloud_protocol::metrics::LabelValue;
use serde::Serialize;

use crate::config::TrialLimits;
use crate::error::{retrying, AppError};

/// Why an entry was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Purchase,
    Grant,
    Usage,
    Refund,
    Expiry,
    Revoke,
    Earning,
    Payout,
}

impl Kind {
    pub fn as_column(self) -> &'static str {
        match self {
            Kind::Purchase => "purchase",
            Kind::Grant => "grant",
            Kind::Usage => "usage",
            Kind::Refund => "refund",
            Kind::Expiry => "expiry",
            Kind::Revoke => "revoke",
            Kind::Earning => "earning",
            Kind::Payout => "payout",
        }
    }

    /// A customer's compute time, or a host owner's earnings.
    fn book(self) -> &'static str {
        match self {
            Kind::Earning | Kind::Payout => "earnings",
            _ => "compute",
        }
    }
}

/// Which way compute seconds moved: the `kind` of
/// `opencloud_control_compute_seconds_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ComputeFlow {
    Sold,
    Granted,
    Used,
    Expired,
    Refunded,
    Revoked,
}

impl LabelValue for ComputeFlow {
    const ALL: &'static [Self] = &[
        ComputeFlow::Sold,
        ComputeFlow::Granted,
        ComputeFlow::Used,
        ComputeFlow::Expired,
        ComputeFlow::Refunded,
        ComputeFlow::Revoked,
    ];
    fn label(self) -> &'static str {
        match self {
            ComputeFlow::Sold => "sold",
            ComputeFlow::Granted => "granted",
            ComputeFlow::Used => "used",
            ComputeFlow::Expired => "expired",
            ComputeFlow::Refunded => "refunded",
            ComputeFlow::Revoked => "revoked",
        }
    }
}

impl ComputeFlow {
    pub const METRIC: &'static str = "opencloud_control_compute_seconds_total";

    pub fn count(self, seconds: u64) {
        metrics::counter!(Self::METRIC, "kind" => self.label()).increment(seconds);
    }
}

/// What a session may use: from the package a lot was bought with, or the
/// trial limits for granted time.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Limits {
    pub sessions_at_once: u32,
    pub cpu_cores: f64,
    pub memory_mib: u32,
    /// How much of the project store the owner's files may take.
    pub storage_mib: u32,
}

impl From<&TrialLimits> for Limits {
    fn from(t: &TrialLimits) -> Self {
        Self {
            sessions_at_once: t.sessions_at_once,
            cpu_cores: t.cpu_cores,
            memory_mib: t.memory_mib,
            storage_mib: t.storage_mib,
        }
    }
}

/// One ledger row before it is written. `Default` leaves every cause empty.
#[derive(Debug, Default)]
pub struct Entry<'a> {
    pub user_id: u64,
    pub kind: Option<Kind>,
    pub seconds: i64,
    pub amount_micro: i64,
    pub currency: Option<&'a str>,
    pub lot_id: Option<u64>,
    pub order_id: Option<u64>,
    pub sid: Option<&'a str>,
    pub host_id: Option<u64>,
    pub actor_id: Option<u64>,
    pub reason: Option<&'a str>,
}

/// Appends `entry` in the caller's transaction.
pub async fn append(tx: &mut Transaction<'_>, entry: &Entry<'_>) -> Result<(), AppError> {
    let kind = entry
        .kind
        .ok_or_else(|| AppError::Internal("a ledger entry without a kind".into()))?;
    tx.exec_drop(
        "INSERT INTO ledger_entries (user_id, book, kind, seconds, amount_micro, currency, lot_id,
            order_id, sid, host_id, actor_id, reason, created_at)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, UTC_TIMESTAMP(6))",
        (
            entry.user_id,
            kind.book(),
            kind.as_column(),
            entry.seconds,
            entry.amount_micro,
            entry.currency,
            entry.lot_id,
            entry.order_id,
            entry.sid,
            entry.host_id,
            entry.actor_id,
            entry.reason,
        ),
    )
    .await?;
    Ok(())
}

/// Locks account `user_id` for the rest of the transaction.
pub async fn lock_account(tx: &mut Transaction<'_>, user_id: u64) -> Result<(), AppError> {
    let found: Option<u64> = tx
        .exec_first("SELECT id FROM users WHERE id = ? FOR UPDATE", (user_id,))
        .await?;
    found.map(|_| ()).ok_or(AppError::NotFound("user"))
}

/// A lot about to be added: bought (with its order and price) or granted.
#[derive(Debug)]
pub struct NewLot<'a> {
    pub user_id: u64,
    pub kind: Kind,
    pub order_id: Option<u64>,
    pub package_id: Option<u64>,
    pub seconds: u64,
    pub amount_micro: i64,
    pub currency: Option<&'a str>,
    pub limits: Limits,
    pub validity_days: u32,
    pub actor_id: Option<u64>,
    pub reason: Option<&'a str>,
}

/// Adds a lot and its credit entry; returns the lot's id.
pub async fn add_lot(tx: &mut Transaction<'_>, lot: &NewLot<'_>) -> Result<u64, AppError> {
    let source = if lot.kind == Kind::Purchase {
        "purchase"
    } else {
        "grant"
    };
    tx.exec_drop(
        "INSERT INTO lots (user_id, source, order_id, package_id, seconds_total, seconds_left,
            amount_micro, currency, sessions_at_once, cpu_cores, memory_mib, storage_mib, expires_at,
            created_at)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, UTC_TIMESTAMP(6) + INTERVAL ? DAY,
            UTC_TIMESTAMP(6))",
        // More values than a tuple takes.
        Params::Positional(vec![
            lot.user_id.into(),
            source.into(),
            lot.order_id.into(),
            lot.package_id.into(),
            lot.seconds.into(),
            lot.seconds.into(),
            lot.amount_micro.into(),
            lot.currency.into(),
            lot.limits.sessions_at_once.into(),
            lot.limits.cpu_cores.into(),
            lot.limits.memory_mib.into(),
            lot.limits.storage_mib.into(),
            lot.validity_days.into(),
        ]),
    )
    .await?;
    let lot_id = tx
        .last_insert_id()
        .ok_or_else(|| AppError::Internal("no id for the new lot".into()))?;
    append(
        tx,
        &Entry {
            user_id: lot.user_id,
            kind: Some(lot.kind),
            seconds: lot.seconds as i64,
            amount_micro: lot.amount_micro,
            currency: lot.currency,
            lot_id: Some(lot_id),
            order_id: lot.order_id,
            actor_id: lot.actor_id,
            reason: lot.reason,
            ..Default::default()
        },
    )
    .await?;
    let flow = if lot.kind == Kind::Purchase {
        ComputeFlow::Sold
    } else {
        ComputeFlow::Granted
    };
    flow.count(lot.seconds);
    Ok(lot_id)
}

/// The value of a lot's first `used` seconds: `floor(amount × used / total)`.
fn worth(amount_micro: i64, seconds_total: u64, used: u64) -> i64 {
    if seconds_total == 0 {
        return 0;
    }
    (i128::from(amount_micro) * i128::from(used) / i128::from(seconds_total)) as i64
}

/// What a debit took: seconds, and their value per currency.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Taken {
    pub seconds: u64,
    pub value: Vec<(String, i64)>,
}

/// Why seconds are taken from an account.
#[derive(Debug, Clone, Copy)]
pub struct Debit<'a> {
    pub kind: Kind,
    pub sid: Option<&'a str>,
    pub host_id: Option<u64>,
    pub actor_id: Option<u64>,
    pub reason: Option<&'a str>,
}

type LotRow = (u64, u64, u64, i64, Option<String>);

/// Takes up to `want` seconds from the account's live lots, the one that
/// expires first first, one entry per lot touched. Takes less when the
/// balance is smaller; never makes it negative.
pub async fn take(
    tx: &mut Transaction<'_>,
    user_id: u64,
    want: u64,
    why: Debit<'_>,
) -> Result<Taken, AppError> {
    let mut taken = Taken::default();
    if want == 0 {
        return Ok(taken);
    }
    let lots: Vec<LotRow> = tx
        .exec(
            "SELECT id, seconds_total, seconds_left, amount_micro, currency FROM lots
             WHERE user_id = ? AND seconds_left > 0 AND expires_at > UTC_TIMESTAMP(6)
             ORDER BY expires_at, id FOR UPDATE",
            (user_id,),
        )
        .await?;
    for (lot_id, total, left, amount, currency) in lots {
        let still = want - taken.seconds;
        if still == 0 {
            break;
        }
        let n = still.min(left);
        let used = total - left;
        let value = worth(amount, total, used + n) - worth(amount, total, used);
        tx.exec_drop(
            "UPDATE lots SET seconds_left = seconds_left - ? WHERE id = ?",
            (n, lot_id),
        )
        .await?;
        append(
            tx,
            &Entry {
                user_id,
                kind: Some(why.kind),
                seconds: -(n as i64),
                amount_micro: -value,
                currency: currency.as_deref(),
                lot_id: Some(lot_id),
                sid: why.sid,
                host_id: why.host_id,
                actor_id: why.actor_id,
                reason: why.reason,
                ..Default::default()
            },
        )
        .await?;
        taken.seconds += n;
        if let Some(currency) = currency {
            match taken.value.iter_mut().find(|(c, _)| *c == currency) {
                Some((_, v)) => *v += value,
                None => taken.value.push((currency, value)),
            }
        }
    }
    Ok(taken)
}

/// What an account may do now: its balance and the best limits among its
/// live lots (none without a live lot).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Plan {
    pub balance_seconds: u64,
    pub limits: Option<Limits>,
}

/// The account's balance and limits, read on `conn` (in a transaction
/// holding the account's lock when it must not change underneath).
pub async fn plan(conn: &mut impl Queryable, user_id: u64) -> Result<Plan, AppError> {
    type PlanRow = (u64, Option<u32>, Option<f64>, Option<u32>, Option<u32>);
    let row: Option<PlanRow> = conn
        .exec_first(
            "SELECT CAST(COALESCE(SUM(seconds_left), 0) AS UNSIGNED), MAX(sessions_at_once),
                    CAST(MAX(cpu_cores) AS DOUBLE), MAX(memory_mib),
                    MAX(storage_mib)
             FROM lots WHERE user_id = ? AND seconds_left > 0 AND expires_at > UTC_TIMESTAMP(6)",
            (user_id,),
        )
        .await?;
    let (balance_seconds, sessions, cpu, memory, storage) =
        row.unwrap_or((0, None, None, None, None));
    let limits = match (sessions, cpu, memory, storage) {
        (Some(sessions_at_once), Some(cpu_cores), Some(memory_mib), Some(storage_mib)) => {
            Some(Limits {
                sessions_at_once,
                cpu_cores,
                memory_mib,
                storage_mib,
            })
        }
        _ => None,
    };
    Ok(Plan {
        balance_seconds,
        limits,
    })
}

/// The account's balance in seconds.
pub async fn balance(pool: &Pool, user_id: u64) -> Result<u64, AppError> {
    Ok(plan(&mut pool.get_conn().await?, user_id)
        .await?
        .balance_seconds)
}

/// The warning an owner sees while their running sessions would use up
/// the balance within `warning_seconds`: each running session uses one
/// second per second.
pub async fn runs_out_warning(
    pool: &Pool,
    user_id: u64,
    warning_seconds: u64,
) -> Result<Option<String>, AppError> {
    let mut conn = pool.get_conn().await?;
    let running: u64 = conn
        .exec_first(
            "SELECT COUNT(*) FROM sessions WHERE user_id = ? AND state = 'running'",
            (user_id,),
        )
        .await?
        .unwrap_or(0);
    if running == 0 {
        return Ok(None);
    }
    let left = plan(&mut conn, user_id).await?.balance_seconds / running;
    Ok((left <= warning_seconds).then(|| {
        format!(
            "Your compute time runs out in about {}. Your sessions stop then; buy a package to keep working.",
            super::money::seconds(left as i64)
        )
    }))
}

/// A reason (or reference) an admin gives is required and bounded;
/// `field` names it in the error.
fn check_reason(field: &'static str, reason: &str) -> Result<String, AppError> {
    let reason = reason.trim();
    if reason.is_empty() {
        return Err(AppError::invalid(
            field,
            format!("Give the {field}: it is kept in the ledger."),
        ));
    }
    if reason.chars().count() > 500 {
        return Err(AppError::invalid(
            field,
            format!("The {field} has at most 500 characters."),
        ));
    }
    Ok(reason.to_owned())
}

/// The most an admin may grant or revoke at once: 10 000 hours.
pub const MAX_ADJUSTMENT_SECONDS: i64 = 10_000 * 3600;

/// Grants (`seconds` > 0) or revokes (< 0) compute time on `user_id`'s
/// account as `actor_id`, with a required reason. A revocation takes at
/// most the balance. Returns the seconds actually moved (signed).
pub async fn adjust(
    pool: &Pool,
    trial: &TrialLimits,
    user_id: u64,
    seconds: i64,
    actor_id: u64,
    reason: &str,
) -> Result<i64, AppError> {
    let reason = check_reason("reason", reason)?;
    if seconds == 0 || seconds.abs() > MAX_ADJUSTMENT_SECONDS {
        return Err(AppError::invalid(
            "seconds",
            format!("Grant or revoke 1 to {MAX_ADJUSTMENT_SECONDS} seconds (a negative number revokes)."),
        ));
    }
    retrying(|| async {
        let mut tx = pool.start_transaction(TxOpts::default()).await?;
        lock_account(&mut tx, user_id).await?;
        let moved = if seconds > 0 {
            add_lot(
                &mut tx,
                &NewLot {
                    user_id,
                    kind: Kind::Grant,
                    order_id: None,
                    package_id: None,
                    seconds: seconds as u64,
                    amount_micro: 0,
                    currency: None,
                    limits: trial.into(),
                    validity_days: trial.validity_days,
                    actor_id: Some(actor_id),
                    reason: Some(&reason),
                },
            )
            .await?;
            seconds
        } else {
            let why = Debit {
                kind: Kind::Revoke,
                sid: None,
                host_id: None,
                actor_id: Some(actor_id),
                reason: Some(&reason),
            };
            -(take(&mut tx, user_id, seconds.unsigned_abs(), why)
                .await?
                .seconds as i64)
        };
        tx.commit().await?;
        if moved < 0 {
            ComputeFlow::Revoked.count(moved.unsigned_abs());
        }
        tracing::info!(
            user = user_id,
            seconds = moved,
            actor = actor_id,
            "compute time adjusted by an admin"
        );
        Ok(moved)
    })
    .await
}

/// The sign-up grant, in the registration's transaction.
pub async fn grant_signup(
    tx: &mut Transaction<'_>,
    trial: &TrialLimits,
    user_id: u64,
    seconds: u64,
) -> Result<(), AppError> {
    if seconds == 0 {
        return Ok(());
    }
    add_lot(
        tx,
        &NewLot {
            user_id,
            kind: Kind::Grant,
            order_id: None,
            package_id: None,
            seconds,
            amount_micro: 0,
            currency: None,
            limits: trial.into(),
            validity_days: trial.validity_days,
            actor_id: None,
            reason: Some("sign-up trial"),
        },
    )
    .await?;
    Ok(())
}

/// Writes off what is left of lots past their validity, one entry each;
/// returns the seconds written off.
pub async fn expire_due(pool: &Pool) -> Result<u64, AppError> {
    let due: Vec<(u64, u64)> = pool
        .get_conn()
        .await?
        .query(
            "SELECT id, user_id FROM lots
             WHERE expired_at IS NULL AND expires_at <= UTC_TIMESTAMP(6) ORDER BY expires_at LIMIT 500",
        )
        .await?;
    let mut expired = 0;
    for (lot_id, user_id) in due {
        expired += retrying(|| expire_lot(pool, lot_id, user_id)).await?;
    }
    Ok(expired)
}

async fn expire_lot(pool: &Pool, lot_id: u64, user_id: u64) -> Result<u64, AppError> {
    let mut tx = pool.start_transaction(TxOpts::default()).await?;
    lock_account(&mut tx, user_id).await?;
    let row: Option<(u64, u64, i64, Option<String>)> = tx
        .exec_first(
            "SELECT seconds_total, seconds_left, amount_micro, currency FROM lots
             WHERE id = ? AND expired_at IS NULL AND expires_at <= UTC_TIMESTAMP(6) FOR UPDATE",
            (lot_id,),
        )
        .await?;
    let Some((total, left, amount, currency)) = row else {
        return Ok(0);
    };
    if left > 0 {
        let value = amount - worth(amount, total, total - left);
        append(
            &mut tx,
            &Entry {
                user_id,
                kind: Some(Kind::Expiry),
                seconds: -(left as i64),
                amount_micro: -value,
                currency: currency.as_deref(),
                lot_id: Some(lot_id),
                reason: Some("validity ended"),
                ..Default::default()
            },
        )
        .await?;
    }
    tx.exec_drop(
        "UPDATE lots SET seconds_left = 0, expired_at = UTC_TIMESTAMP(6) WHERE id = ?",
        (lot_id,),
    )
    .await?;
    tx.commit().await?;
    ComputeFlow::Expired.count(left);
    tracing::info!(lot = lot_id, user = user_id, seconds = left, "lot expired");
    Ok(left)
}

/// Lots whose cached `seconds_left` differs from the sum of their entries,
/// and by how many seconds in all. Both are zero unless something is wrong.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Drift {
    pub lots: u64,
    pub seconds: i64,
}

pub async fn drift(pool: &Pool) -> Result<Drift, AppError> {
    let row: Option<(u64, i64)> = pool
        .get_conn()
        .await?
        .query_first(
            "SELECT COUNT(*), CAST(COALESCE(SUM(ABS(CAST(l.seconds_left AS SIGNED) - COALESCE(e.s, 0))), 0) AS SIGNED)
             FROM lots l
             LEFT JOIN (SELECT lot_id, SUM(seconds) s FROM ledger_entries
                        WHERE lot_id IS NOT NULL GROUP BY lot_id) e ON e.lot_id = l.id
             WHERE CAST(l.seconds_left AS SIGNED) <> COALESCE(e.s, 0)",
        )
        .await?;
    let (lots, seconds) = row.unwrap_or((0, 0));
    metrics::gauge!("opencloud_control_ledger_drift_lots").set(lots as f64);
    metrics::gauge!("opencloud_control_ledger_drift_seconds").set(seconds as f64);
    if lots > 0 {
        tracing::error!(
            lots,
            seconds,
            "ledger drift: cached lot balances differ from their entries"
        );
    }
    Ok(Drift { lots, seconds })
}

/// Credits the host owner `share_percent` of what session `sid` has been
/// charged so far, exactly: after this, the owner's earnings from the
/// session are `floor(value × share / 100)` in each currency it was paid in.
pub async fn credit_host_share(
    tx: &mut Transaction<'_>,
    sid: &str,
    host_id: u64,
    owner_id: u64,
    share_percent: u8,
) -> Result<(), AppError> {
    let rows: Vec<(String, i64, i64)> = tx
        .exec(
            "SELECT currency,
                CAST(-SUM(CASE WHEN book = 'compute' THEN amount_micro ELSE 0 END) AS SIGNED),
                CAST(SUM(CASE WHEN book = 'earnings' THEN amount_micro ELSE 0 END) AS SIGNED)
             FROM ledger_entries WHERE sid = ? AND currency IS NOT NULL
               AND kind IN ('usage', 'earning') GROUP BY currency",
            (sid,),
        )
        .await?;
    for (currency, charged, earned) in rows {
        let due = (i128::from(charged) * i128::from(share_percent) / 100) as i64 - earned;
        if due > 0 {
            append(
                tx,
                &Entry {
                    user_id: owner_id,
                    kind: Some(Kind::Earning),
                    amount_micro: due,
                    currency: Some(&currency),
                    sid: Some(sid),
                    host_id: Some(host_id),
                    ..Default::default()
                },
            )
            .await?;
        }
    }
    Ok(())
}

/// What `owner_id` is owed per currency (earnings less payouts), in micro units.
pub async fn owed(
    conn: &mut impl Queryable,
    owner_id: u64,
) -> Result<Vec<(String, i64)>, AppError> {
    Ok(conn
        .exec(
            "SELECT currency, CAST(SUM(amount_micro) AS SIGNED) FROM ledger_entries
             WHERE user_id = ? AND book = 'earnings' GROUP BY currency ORDER BY currency",
            (owner_id,),
        )
        .await?)
}

/// Records a payout of `amount_minor` to host owner `owner_id`; it may not
/// exceed what they are owed in that currency.
pub async fn record_payout(
    pool: &Pool,
    owner_id: u64,
    amount_minor: u64,
    currency: &str,
    actor_id: u64,
    reference: &str,
) -> Result<(), AppError> {
    let reason = check_reason("reference", reference)?;
    let currency = currency.trim().to_ascii_uppercase();
    if amount_minor == 0 || amount_minor > 100_000_000 {
        return Err(AppError::invalid(
            "amount_minor",
            "A payout is 0.01 to 1 000 000.00.",
        ));
    }
    let amount = amount_minor as i64 * super::money::MICRO_PER_MINOR;
    retrying(|| async {
        let mut tx = pool.start_transaction(TxOpts::default()).await?;
        lock_account(&mut tx, owner_id).await?;
        let owed_now = owed(&mut tx, owner_id)
            .await?
            .into_iter()
            .find(|(c, _)| *c == currency)
            .map_or(0, |(_, v)| v);
        if amount > owed_now {
            return Err(AppError::invalid(
                "amount_minor",
                format!(
                    "This owner is owed {}; a payout cannot be more.",
                    super::money::micro(owed_now, &currency)
                ),
            ));
        }
        append(
            &mut tx,
            &Entry {
                user_id: owner_id,
                kind: Some(Kind::Payout),
                amount_micro: -amount,
                currency: Some(&currency),
                actor_id: Some(actor_id),
                reason: Some(&reason),
                ..Default::default()
            },
        )
        .await?;
        tx.commit().await?;
        tracing::info!(owner = owner_id, amount_minor, %currency, actor = actor_id, "payout recorded");
        Ok(())
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lots_usage_adds_up_to_its_price_however_it_is_sliced() {
        let (amount, total) = (500 * 1_000_000, 36_000);
        let mut used = 0;
        let mut sum = 0;
        for step in [1, 7, 13, 29, 3_600, 10_000].iter().cycle() {
            let n = (*step as u64).min(total - used);
            sum += worth(amount, total, used + n) - worth(amount, total, used);
            used += n;
            if used == total {
                break;
            }
        }
        assert_eq!(sum, amount);
        assert_eq!(worth(amount, total, 30), 416_666);
        assert_eq!(worth(0, total, 30), 0);
    }
}
