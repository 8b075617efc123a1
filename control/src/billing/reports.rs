//! What the pages show of the ledger: an account's lots, usage and
//! payments; a host owner's earnings; revenue and what is owed, for admins.
//! Read only; every figure comes from the ledger and the rows it names.

use mysql_async::prelude::*;
use mysql_async::Pool;
use serde::Serialize;

use super::ledger::{self, Plan};
use super::money::{self, MICRO_PER_MINOR};
use super::orders::{self, Order};
use crate::error::AppError;

/// How many rows a report's list shows at most.
const ROWS: u32 = 200;

const DAY: &str = "'%Y-%m-%d'";
const TIME: &str = "'%Y-%m-%d %H:%i:%s'";

/// An amount in micro units and its currency, with its words.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Amount {
    pub currency: String,
    pub amount_micro: i64,
    pub text: String,
}

impl Amount {
    pub fn new(currency: String, amount_micro: i64) -> Self {
        let text = money::micro(amount_micro, &currency);
        Self {
            currency,
            amount_micro,
            text,
        }
    }

    /// Whole minor units, rounded down: the most a payout can be.
    pub fn whole_minor(&self) -> i64 {
        self.amount_micro.div_euclid(MICRO_PER_MINOR)
    }

    /// [`Amount::whole_minor`] as a form's amount: `12.34`.
    pub fn whole_minor_input(&self) -> String {
        let minor = self.whole_minor().max(0);
        format!("{}.{:02}", minor / 100, minor % 100)
    }
}

/// What `owner_id` is owed, per currency.
pub async fn owed(conn: &mut impl Queryable, owner_id: u64) -> Result<Vec<Amount>, AppError> {
    Ok(ledger::owed(conn, owner_id)
        .await?
        .into_iter()
        .map(|(c, a)| Amount::new(c, a))
        .collect())
}

/// A lot of compute time as its holder sees it.
#[derive(Debug, Clone, Serialize)]
pub struct Lot {
    pub id: u64,
    /// purchase or grant.
    pub source: String,
    /// The package it was bought with; `None` for a grant.
    pub package_name: Option<String>,
    pub order_id: Option<u64>,
    pub seconds_total: u64,
    pub seconds_left: u64,
    pub created_at: String,
    pub expires_at: String,
    pub expired: bool,
    /// Its order was refunded (its unused time went with the money).
    pub refunded: bool,
}

impl Lot {
    pub fn total_text(&self) -> String {
        money::seconds(self.seconds_total as i64)
    }

    pub fn left_text(&self) -> String {
        money::seconds(self.seconds_left as i64)
    }
}

/// A session's time: what was metered, paid from lots, and left unpaid.
#[derive(Debug, Clone, Serialize)]
pub struct SessionUsage {
    pub sid: String,
    pub project_name: String,
    pub host_id: u64,
    pub ready_at: Option<String>,
    pub ended_at: Option<String>,
    pub metered_seconds: u64,
    pub paid_seconds: u64,
    pub unpaid_seconds: u64,
}

impl SessionUsage {
    pub fn metered_text(&self) -> String {
        money::seconds(self.metered_seconds as i64)
    }

    pub fn paid_text(&self) -> String {
        money::seconds(self.paid_seconds as i64)
    }

    pub fn unpaid_text(&self) -> String {
        money::seconds(self.unpaid_seconds as i64)
    }
}

/// A refund: the money given back and the unused time it took.
#[derive(Debug, Clone, Serialize)]
pub struct Refund {
    pub order_id: u64,
    pub package_name: String,
    pub amount: Amount,
    pub seconds_taken: u64,
    pub reason: String,
    pub refunded_at: String,
}

impl Refund {
    pub fn amount_text(&self) -> String {
        money::minor(self.amount.whole_minor(), &self.amount.currency)
    }

    pub fn taken_text(&self) -> String {
        money::seconds(self.seconds_taken as i64)
    }
}

/// Everything My account shows about compute time and money.
#[derive(Debug, Clone, Serialize)]
pub struct AccountSummary {
    pub plan: Plan,
    pub balance_text: String,
    pub lots: Vec<Lot>,
    pub usage: Vec<SessionUsage>,
    pub payments: Vec<Order>,
    pub refunds: Vec<Refund>,
}

type LotRow = (
    u64,
    String,
    Option<String>,
    Option<u64>,
    u64,
    u64,
    String,
    String,
    bool,
    bool,
);

fn lot(
    (
        id,
        source,
        package_name,
        order_id,
        seconds_total,
        seconds_left,
        created_at,
        expires_at,
        expired,
        refunded,
    ): LotRow,
) -> Lot {
    Lot {
        id,
        source,
        package_name,
        order_id,
        seconds_total,
        seconds_left,
        created_at,
        expires_at,
        expired,
        refunded,
    }
}

/// `user_id`'s balance, lots (newest first), usage per session, orders and refunds.
pub async fn account(pool: &Pool, user_id: u64) -> Result<AccountSummary, AppError> {
    let mut conn = pool.get_conn().await?;
    let plan = ledger::plan(&mut conn, user_id).await?;
    let lots = conn
        .exec_map(
            format!(
                "SELECT l.id, l.source, o.package_name, l.order_id, l.seconds_total, l.seconds_left,
                    DATE_FORMAT(l.created_at, {TIME}), DATE_FORMAT(l.expires_at, {TIME}),
                    l.expired_at IS NOT NULL OR l.expires_at <= UTC_TIMESTAMP(6),
                    COALESCE(o.status = 'refunded', FALSE)
                 FROM lots l LEFT JOIN orders o ON o.id = l.order_id
                 WHERE l.user_id = ? ORDER BY l.id DESC LIMIT {ROWS}"
            ),
            (user_id,),
            lot,
        )
        .await?;
    let usage = conn
        .exec_map(
            format!(
                "SELECT s.sid, p.name, s.host_id, DATE_FORMAT(s.ready_at, {TIME}),
                    DATE_FORMAT(s.ended_at, {TIME}), s.metered_seconds,
                    CAST(COALESCE((SELECT -SUM(e.seconds) FROM ledger_entries e
                        WHERE e.sid = s.sid AND e.kind = 'usage'), 0) AS UNSIGNED),
                    s.unpaid_seconds
                 FROM sessions s JOIN projects p ON p.id = s.project_id
                 WHERE s.user_id = ? AND s.ready_at IS NOT NULL
                 ORDER BY s.ready_at DESC LIMIT {ROWS}"
            ),
            (user_id,),
            |(
                sid,
                project_name,
                host_id,
                ready_at,
                ended_at,
                metered_seconds,
                paid_seconds,
                unpaid_seconds,
            )| {
                SessionUsage {
                    sid,
                    project_name,
                    host_id,
                    ready_at,
                    ended_at,
                    metered_seconds,
                    paid_seconds,
                    unpaid_seconds,
                }
            },
        )
        .await?;
    let refunds = conn
        .exec_map(
            format!(
                "SELECT e.order_id, o.package_name, o.currency, -e.amount_micro, -e.seconds,
                    COALESCE(e.reason, ''), DATE_FORMAT(e.created_at, {TIME})
                 FROM ledger_entries e JOIN orders o ON o.id = e.order_id
                 WHERE e.user_id = ? AND e.kind = 'refund' ORDER BY e.id DESC LIMIT {ROWS}"
            ),
            (user_id,),
            |(
                order_id,
                package_name,
                currency,
                amount_micro,
                seconds_taken,
                reason,
                refunded_at,
            ): (u64, String, String, i64, i64, String, String)| Refund {
                order_id,
                package_name,
                amount: Amount::new(currency, amount_micro),
                seconds_taken: seconds_taken.max(0) as u64,
                reason,
                refunded_at,
            },
        )
        .await?;
    drop(conn);
    Ok(AccountSummary {
        balance_text: money::seconds(plan.balance_seconds as i64),
        plan,
        lots,
        usage,
        payments: orders::list(pool, Some(user_id), ROWS).await?,
        refunds,
    })
}

/// One UTC day's use of an owner's hosts, in one currency (`None`: time
/// that was granted, which earns nothing).
#[derive(Debug, Clone, Serialize)]
pub struct EarningDay {
    pub day: String,
    pub currency: Option<String>,
    pub seconds_used: u64,
    pub earned_micro: i64,
    pub earned_text: String,
}

impl EarningDay {
    pub fn used_text(&self) -> String {
        money::seconds(self.seconds_used as i64)
    }
}

/// What one host has earned in one currency.
#[derive(Debug, Clone, Serialize)]
pub struct HostEarning {
    pub host_id: u64,
    pub earned: Amount,
}

/// A payout recorded by an admin.
#[derive(Debug, Clone, Serialize)]
pub struct Payout {
    pub id: u64,
    pub owner_id: u64,
    pub owner_email: String,
    pub amount: Amount,
    pub reference: String,
    pub paid_at: String,
}

/// Everything My hosts shows about earnings.
#[derive(Debug, Clone, Serialize)]
pub struct Earnings {
    pub days: Vec<EarningDay>,
    pub hosts: Vec<HostEarning>,
    pub owed: Vec<Amount>,
    pub payouts: Vec<Payout>,
}

/// Host `host_id`'s earnings in words, `—` before its first.
pub fn host_text(hosts: &[HostEarning], host_id: u64) -> String {
    let texts: Vec<&str> = hosts
        .iter()
        .filter(|h| h.host_id == host_id)
        .map(|h| h.earned.text.as_str())
        .collect();
    if texts.is_empty() {
        "—".into()
    } else {
        texts.join(", ")
    }
}

/// What each of `owner_id`'s hosts has earned, per currency.
pub async fn host_earnings(
    conn: &mut impl Queryable,
    owner_id: u64,
) -> Result<Vec<HostEarning>, AppError> {
    Ok(conn
        .exec_map(
            "SELECT host_id, currency, CAST(SUM(amount_micro) AS SIGNED) FROM ledger_entries
             WHERE user_id = ? AND kind = 'earning' AND host_id IS NOT NULL AND currency IS NOT NULL
             GROUP BY host_id, currency ORDER BY host_id, currency",
            (owner_id,),
            |(host_id, currency, amount): (u64, String, i64)| HostEarning {
                host_id,
                earned: Amount::new(currency, amount),
            },
        )
        .await?)
}

const PAYOUT_COLUMNS: &str = "e.id, e.user_id, u.email, e.currency, -e.amount_micro,
    COALESCE(e.reason, ''), DATE_FORMAT(e.created_at, '%Y-%m-%d %H:%i:%s')";

type PayoutRow = (u64, u64, String, String, i64, String, String);

fn payout((id, owner_id, owner_email, currency, amount, reference, paid_at): PayoutRow) -> Payout {
    Payout {
        id,
        owner_id,
        owner_email,
        amount: Amount::new(currency, amount),
        reference,
        paid_at,
    }
}

/// `owner_id`'s earnings: per UTC day and currency (the seconds customers
/// used on their hosts, what the owner earned), per host, what is owed,
/// and the payouts received.
pub async fn earnings(pool: &Pool, owner_id: u64) -> Result<Earnings, AppError> {
    let mut conn = pool.get_conn().await?;
    let days = conn
        .exec_map(
            format!(
                "SELECT day, currency, CAST(SUM(used) AS UNSIGNED), CAST(SUM(earned) AS SIGNED) FROM (
                    SELECT DATE_FORMAT(e.created_at, {DAY}) day, e.currency, -e.seconds used, 0 earned
                    FROM ledger_entries e JOIN hosts h ON h.id = e.host_id
                    WHERE h.owner_id = ? AND e.kind = 'usage'
                  UNION ALL
                    SELECT DATE_FORMAT(created_at, {DAY}), currency, 0, amount_micro
                    FROM ledger_entries WHERE user_id = ? AND kind = 'earning'
                 ) t GROUP BY day, currency ORDER BY day DESC, currency LIMIT {ROWS}"
            ),
            (owner_id, owner_id),
            |(day, currency, seconds_used, earned_micro): (String, Option<String>, u64, i64)| {
                EarningDay {
                    earned_text: currency
                        .as_deref()
                        .map_or_else(|| "—".into(), |c| money::micro(earned_micro, c)),
                    day,
                    currency,
                    seconds_used,
                    earned_micro,
                }
            },
        )
        .await?;
    let hosts = host_earnings(&mut conn, owner_id).await?;
    let owed = owed(&mut conn, owner_id).await?;
    let payouts = conn
        .exec_map(
            format!(
                "SELECT {PAYOUT_COLUMNS} FROM ledger_entries e JOIN users u ON u.id = e.user_id
                 WHERE e.user_id = ? AND e.kind = 'payout' ORDER BY e.id DESC LIMIT {ROWS}"
            ),
            (owner_id,),
            payout,
        )
        .await?;
    Ok(Earnings {
        days,
        hosts,
        owed,
        payouts,
    })
}

/// Money taken in one currency: purchases, refunds, and what stays.
#[derive(Debug, Clone, Serialize)]
pub struct Revenue {
    pub currency: String,
    pub purchases_minor: i64,
    pub refunds_minor: i64,
    pub net_minor: i64,
}

impl Revenue {
    pub fn purchases_text(&self) -> String {
        money::minor(self.purchases_minor, &self.currency)
    }

    pub fn refunds_text(&self) -> String {
        money::minor(self.refunds_minor, &self.currency)
    }

    pub fn net_text(&self) -> String {
        money::minor(self.net_minor, &self.currency)
    }
}

/// Compute seconds moved, all accounts together.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ComputeTotals {
    pub sold: u64,
    pub granted: u64,
    pub used: u64,
    pub expired: u64,
    pub refunded: u64,
    pub revoked: u64,
}

/// What one host owner is owed in one currency.
#[derive(Debug, Clone, Serialize)]
pub struct Owed {
    pub owner_id: u64,
    pub owner_email: String,
    pub owed: Amount,
}

/// The admins' view of money.
#[derive(Debug, Clone, Serialize)]
pub struct AdminSummary {
    pub revenue: Vec<Revenue>,
    pub compute: ComputeTotals,
    pub owed: Vec<Owed>,
    pub payouts: Vec<Payout>,
}

impl ComputeTotals {
    pub fn text(&self, seconds: impl std::borrow::Borrow<u64>) -> String {
        money::seconds(*seconds.borrow() as i64)
    }
}

/// Revenue per currency, compute totals, what each host owner is owed
/// (those owed something), and the latest payouts.
pub async fn admin(pool: &Pool) -> Result<AdminSummary, AppError> {
    let mut conn = pool.get_conn().await?;
    let revenue = conn
        .exec_map(
            "SELECT currency,
                CAST(SUM(CASE WHEN kind = 'purchase' THEN amount_micro ELSE 0 END) AS SIGNED),
                CAST(-SUM(CASE WHEN kind = 'refund' THEN amount_micro ELSE 0 END) AS SIGNED)
             FROM ledger_entries
             WHERE kind IN ('purchase', 'refund') AND currency IS NOT NULL
             GROUP BY currency ORDER BY currency",
            (),
            |(currency, purchases, refunds): (String, i64, i64)| Revenue {
                currency,
                purchases_minor: purchases / MICRO_PER_MINOR,
                refunds_minor: refunds / MICRO_PER_MINOR,
                net_minor: (purchases - refunds) / MICRO_PER_MINOR,
            },
        )
        .await?;
    let mut compute = ComputeTotals::default();
    let by_kind: Vec<(String, i64)> = conn
        .query(
            "SELECT kind, CAST(ABS(SUM(seconds)) AS SIGNED) FROM ledger_entries
             WHERE book = 'compute' GROUP BY kind",
        )
        .await?;
    for (kind, seconds) in by_kind {
        let seconds = seconds.max(0) as u64;
        match kind.as_str() {
            "purchase" => compute.sold = seconds,
            "grant" => compute.granted = seconds,
            "usage" => compute.used = seconds,
            "expiry" => compute.expired = seconds,
            "refund" => compute.refunded = seconds,
            "revoke" => compute.revoked = seconds,
            _ => {}
        }
    }
    let owed = conn
        .exec_map(
            format!(
                "SELECT e.user_id, u.email, e.currency, CAST(SUM(e.amount_micro) AS SIGNED)
                 FROM ledger_entries e JOIN users u ON u.id = e.user_id
                 WHERE e.book = 'earnings' AND e.currency IS NOT NULL
                 GROUP BY e.user_id, u.email, e.currency HAVING SUM(e.amount_micro) <> 0
                 ORDER BY SUM(e.amount_micro) DESC LIMIT {ROWS}"
            ),
            (),
            |(owner_id, owner_email, currency, amount): (u64, String, String, i64)| Owed {
                owner_id,
                owner_email,
                owed: Amount::new(currency, amount),
            },
        )
        .await?;
    let payouts = conn
        .exec_map(
            format!(
                "SELECT {PAYOUT_COLUMNS} FROM ledger_entries e JOIN users u ON u.id = e.user_id
                 WHERE e.kind = 'payout' ORDER BY e.id DESC LIMIT 50"
            ),
            (),
            payout,
        )
        .await?;
    Ok(AdminSummary {
        revenue,
        compute,
        owed,
        payouts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_payout_can_be_at_most_the_whole_cents_owed() {
        let owed = Amount::new("USD".into(), 1_234_999_999);
        assert_eq!(owed.whole_minor(), 1234);
        assert_eq!(owed.text, "12.3499 USD");
        assert_eq!(owed.whole_minor_input(), "12.34");
        assert_eq!(Amount::new("EUR".into(), 999_999).whole_minor(), 0);
    }
}
