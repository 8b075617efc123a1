//! Gateways' usage reports: per-session traffic and the time of the last
//! request, which the idle culler reads.

use mysql_async::prelude::*;
use mysql_async::Pool;
use opencloud_protocol::reports::{SessionUsage, MAX_USAGE_ENTRIES};
use opencloud_protocol::routes;

use crate::error::AppError;

/// A single report's byte count above this is a bug, not traffic (1 PiB).
const MAX_REPORTED_BYTES: u64 = 1 << 50;
/// Clock skew tolerated in reported activity times.
const MAX_FUTURE_SECONDS: u64 = 300;

/// Adds a gateway's usage report: `last_activity_at` becomes the later of
/// the stored and the reported time, byte counts are added. Sids that name
/// no session are skipped (the session may be long gone).
pub async fn record_usage(pool: &Pool, usage: &[SessionUsage], now: u64) -> Result<(), AppError> {
    if usage.len() > MAX_USAGE_ENTRIES {
        return Err(AppError::invalid(
            "sessions",
            format!("A report holds at most {MAX_USAGE_ENTRIES} sessions; send several."),
        ));
    }
    let merged = merge_usage(usage, now)?;
    if merged.is_empty() {
        return Ok(());
    }
    let mut conn = pool.get_conn().await?;
    for chunk in merged.chunks(500) {
        let rows =
            vec!["SELECT ? AS sid, ? AS activity, ? AS bytes_in, ? AS bytes_out"; chunk.len()]
                .join(" UNION ALL ");
        let params: Vec<mysql_async::Value> = chunk
            .iter()
            .flat_map(|u| {
                [
                    u.sid.clone().into(),
                    u.last_activity.into(),
                    u.bytes_in.into(),
                    u.bytes_out.into(),
                ]
            })
            .collect();
        conn.exec_drop(
            format!(
                "UPDATE sessions s JOIN ({rows}) u ON s.sid = u.sid SET
                   s.last_activity_at = CASE WHEN u.activity = 0 THEN s.last_activity_at
                     ELSE GREATEST(COALESCE(s.last_activity_at, TIMESTAMP'1970-01-01 00:00:00'),
                                   TIMESTAMP'1970-01-01 00:00:00' + INTERVAL u.activity SECOND) END,
                   s.bytes_in = s.bytes_in + u.bytes_in,
                   s.bytes_out = s.bytes_out + u.bytes_out"
            ),
            params,
        )
        .await?;
    }
    Ok(())
}

/// Checks a usage report and folds repeated sids into one entry.
fn merge_usage(usage: &[SessionUsage], now: u64) -> Result<Vec<SessionUsage>, AppError> {
    let mut merged: Vec<SessionUsage> = Vec::with_capacity(usage.len());
    let mut index = std::collections::HashMap::new();
    for (n, u) in usage.iter().enumerate() {
        if !routes::is_valid_sid(&u.sid) {
            return Err(AppError::invalid(
                "sessions",
                format!("sessions[{n}].sid is not a session id (26 characters a-z, 2-7)."),
            ));
        }
        if u.last_activity > now + MAX_FUTURE_SECONDS {
            return Err(AppError::invalid(
                "sessions",
                format!("sessions[{n}].last_activity is in the future; check the gateway's clock."),
            ));
        }
        if u.bytes_in > MAX_REPORTED_BYTES || u.bytes_out > MAX_REPORTED_BYTES {
            return Err(AppError::invalid(
                "sessions",
                format!("sessions[{n}]: byte counts are per report and cannot be this large."),
            ));
        }
        match index.get(&u.sid) {
            Some(&i) => {
                let m: &mut SessionUsage = &mut merged[i];
                m.last_activity = m.last_activity.max(u.last_activity);
                m.bytes_in += u.bytes_in;
                m.bytes_out += u.bytes_out;
            }
            None => {
                index.insert(u.sid.clone(), merged.len());
                merged.push(u.clone());
            }
        }
    }
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(sid: &str, last_activity: u64, bytes: u64) -> SessionUsage {
        SessionUsage {
            sid: sid.into(),
            last_activity,
            bytes_in: bytes,
            bytes_out: bytes * 2,
        }
    }

    #[test]
    fn usage_for_one_sid_is_merged_and_bad_entries_are_named() {
        let a = "a".repeat(26);
        let b = "b".repeat(26);
        let merged =
            merge_usage(&[usage(&a, 10, 1), usage(&b, 5, 7), usage(&a, 8, 2)], 100).unwrap();
        assert_eq!(merged.len(), 2);
        assert_eq!(merged[0].last_activity, 10);
        assert_eq!((merged[0].bytes_in, merged[0].bytes_out), (3, 6));
        let err = merge_usage(&[usage(&a, 1, 1), usage("nope", 1, 1)], 100).unwrap_err();
        assert!(err.to_string().contains("sessions[1].sid"), "{err}");
        let err = merge_usage(&[usage(&a, 10_000, 1)], 100).unwrap_err();
        assert!(err.to_string().contains("future"), "{err}");
    }
}
