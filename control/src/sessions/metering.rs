//! Charging sessions for their time: from the moment a session is ready
//! until it ends, per second, from its owner's lots (the one expiring
//! first first), with the host owner credited their share of the price in
//! the same transaction. The watch job charges running sessions every few
//! seconds; [`super::ending::end_tx`] charges the last seconds exactly
//! when a session ends. A balance never goes below zero: seconds it cannot
//! pay are counted as unpaid and the session is stopped.

use mysql_async::prelude::*;
use mysql_async::Transaction;

use crate::billing::ledger::{self, ComputeFlow, Debit, Kind};
use crate::error::AppError;

/// What charging a session did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Charged {
    pub user_id: u64,
    /// Seconds charged now.
    pub seconds: u64,
    /// The owner's balance is empty: the session must stop.
    pub exhausted: bool,
}

/// Charges session `sid` for the seconds since its last charge, up to now
/// (or its end, once `ended_at` is set), in the caller's transaction.
/// Sessions that never became ready cost nothing.
pub(crate) async fn charge_tx(tx: &mut Transaction<'_>, sid: &str) -> Result<Charged, AppError> {
    let row: Option<(u64, u64, u64, u8, Option<i64>, u64)> = tx
        .exec_first(
            "SELECT s.user_id, s.host_id, h.owner_id, s.host_share_percent,
                TIMESTAMPDIFF(SECOND, s.ready_at, COALESCE(s.ended_at, UTC_TIMESTAMP(6))),
                s.metered_seconds
             FROM sessions s JOIN hosts h ON h.id = s.host_id
             WHERE s.sid = ? FOR UPDATE",
            (sid,),
        )
        .await?;
    let Some((user_id, host_id, owner_id, share, Some(elapsed), metered)) = row else {
        return Ok(Charged::default());
    };
    let due = (elapsed.max(0) as u64).saturating_sub(metered);
    if due == 0 {
        return Ok(Charged {
            user_id,
            ..Default::default()
        });
    }
    ledger::lock_account(tx, user_id).await?;
    let why = Debit {
        kind: Kind::Usage,
        sid: Some(sid),
        host_id: Some(host_id),
        actor_id: None,
        reason: None,
    };
    let taken = ledger::take(tx, user_id, due, why).await?;
    tx.exec_drop(
        "UPDATE sessions SET metered_seconds = metered_seconds + ?, unpaid_seconds = unpaid_seconds + ?
         WHERE sid = ?",
        (due, due - taken.seconds, sid),
    )
    .await?;
    ledger::credit_host_share(tx, sid, host_id, owner_id, share).await?;
    let left = ledger::plan(&mut *tx, user_id).await?.balance_seconds;
    ComputeFlow::Used.count(taken.seconds);
    if taken.seconds < due {
        metrics::counter!("opencloud_control_compute_seconds_unpaid_total")
            .increment(due - taken.seconds);
    }
    Ok(Charged {
        user_id,
        seconds: taken.seconds,
        exhausted: left == 0,
    })
}
