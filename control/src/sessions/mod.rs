//! Notebook sessions: where one project's Jupyter server runs, who owns it,
//! and how a browser enters it. Every change to a session is published to
//! the route table in the same transaction.
//!
//! The rooms: [`state`] (the row's state, mapped to the column in one
//! place), [`placement`] (opening a project), [`room`] (taking a place on a host), [`commands`] (the queue to
//! agents), [`events`] (what agents report), [`ending`] (stopping and the
//! one end), [`queue`] (opens waiting for room), [`metering`] (charging a session's time to its owner's
//! balance), [`usage`] (gateways' traffic reports), [`watch`] (the job that
//! loses silent hosts, charges running sessions and culls idle ones) and [`data`] (the admins'
//! Session data). This file holds what owners see of a session.
//!
//! Submodules never use this file's items, and hosts use only
//! [`ending`] and [`state`], so the imports stay free of circles.

pub mod commands;
pub mod data;
pub mod ending;
pub mod events;
pub mod metering;
pub mod placement;
pub mod queue;
pub mod room;
pub mod state;
pub mod usage;
pub mod watch;

use mysql_async::prelude::*;
use mysql_async::Pool;
use opencloud_protocol::routes::{self, SessionState};
use opencloud_protocol::token::{self, Claims};
use serde::Serialize;

use crate::config::Config;
use crate::error::AppError;

/// A session as its owner sees it (never the upstream token).
#[derive(Debug, Clone, Serialize)]
pub struct Session {
    pub sid: String,
    pub project_id: u64,
    /// What the route table says (starting, running, lost, stopped).
    pub state: SessionState,
    /// The finer state owners see: starting, running, stopping, stopped,
    /// failed or lost.
    pub phase: String,
    pub created_at: String,
    pub ended_at: Option<String>,
    pub end_reason: Option<String>,
    /// What the owner should know while it runs (a kernel stopped for memory).
    pub notice: Option<String>,
}

impl Session {
    pub fn is_live(&self) -> bool {
        self.state.is_live()
    }

    /// Why the session ended, in words for its owner.
    pub fn end_explanation(&self) -> String {
        explain_end(self.state, self.end_reason.as_deref())
    }
}

/// Words for an end reason. Unknown reasons still get a sentence.
pub fn explain_end(state: SessionState, reason: Option<&str>) -> String {
    match (state, reason) {
        (_, Some("host_lost")) | (SessionState::Lost, None) => {
            "The computer it ran on went offline.".into()
        }
        (_, Some("stopped_by_user" | "user")) => "You stopped it.".into(),
        (_, Some("idle")) => "It was stopped after a long time without activity.".into(),
        (_, Some("balance_exhausted" | "out_of_time" | "no_compute_time")) => {
            "Your compute time ran out. Buy a package to go on.".into()
        }
        (_, Some("host_draining")) => "The host owner took the computer out of service.".into(),
        (_, Some("host_revoked")) => "The host owner removed the computer from OpenCloud.".into(),
        (_, Some("stopped_by_admin" | "admin")) => "An administrator stopped it.".into(),
        (_, Some("failed_to_start")) => "The notebook server could not start.".into(),
        (_, Some("jupyter_exited")) => "The notebook server exited unexpectedly.".into(),
        (_, Some("agent_restarted")) => "The host's agent restarted without it.".into(),
        (_, Some(other)) => format!("It was stopped ({}).", other.replace('_', " ")),
        (_, None) => "It was stopped.".into(),
    }
}

type SessionRow = (
    String,
    u64,
    String,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
);

const COLUMNS: &str = "sid, project_id, state, DATE_FORMAT(created_at, '%Y-%m-%d %H:%i:%s'), \
                       DATE_FORMAT(ended_at, '%Y-%m-%d %H:%i:%s'), end_reason, notice";

fn from_row(
    (sid, project_id, state, created_at, ended_at, end_reason, notice): SessionRow,
) -> Session {
    Session {
        sid,
        project_id,
        state: state::route_state(&state),
        phase: state,
        created_at,
        ended_at,
        end_reason,
        notice,
    }
}

/// The session `sid` if `user_id` owns it. Others' sessions, unknown sids
/// and malformed ones all answer "not found".
pub async fn get_owned(pool: &Pool, user_id: u64, sid: &str) -> Result<Session, AppError> {
    if !routes::is_valid_sid(sid) {
        return Err(AppError::NotFound("session"));
    }
    let row: Option<SessionRow> = pool
        .get_conn()
        .await?
        .exec_first(
            format!("SELECT {COLUMNS} FROM sessions WHERE sid = ? AND user_id = ?"),
            (sid, user_id),
        )
        .await?;
    row.map(from_row).ok_or(AppError::NotFound("session"))
}

/// `{session origin}/_oc/enter?ticket=…`: a fresh ticket (valid
/// [`token::TICKET_SECONDS`]) bound to the session, the user and their
/// login session, signed with the token keys.
pub fn enter_url(
    config: &Config,
    user_id: u64,
    login_session: &str,
    sid: &str,
    now: u64,
) -> String {
    let ticket = token::sign(
        &config.keys,
        &Claims::ticket(user_id, login_session, sid, now),
    );
    format!("{}/_oc/enter?ticket={ticket}", config.session_origin(sid))
}

/// The owner of `sid` while it is live.
pub async fn live_owner(pool: &Pool, sid: &str) -> Result<Option<u64>, AppError> {
    if !routes::is_valid_sid(sid) {
        return Ok(None);
    }
    Ok(pool
        .get_conn()
        .await?
        .exec_first(
            format!(
                "SELECT user_id FROM sessions WHERE sid = ? AND state IN ({})",
                state::live_sql()
            ),
            (sid,),
        )
        .await?)
}

/// Live sessions by state, for the metrics endpoint.
pub async fn count_by_state(pool: &Pool) -> Result<Vec<(String, u64)>, AppError> {
    Ok(pool
        .get_conn()
        .await?
        .query(format!(
            "SELECT state, COUNT(*) FROM sessions WHERE state IN ({}) GROUP BY state",
            state::live_sql()
        ))
        .await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn end_reasons_read_as_sentences() {
        assert_eq!(
            explain_end(SessionState::Lost, Some("host_lost")),
            "The computer it ran on went offline."
        );
        assert_eq!(
            explain_end(SessionState::Stopped, Some("quota_exceeded")),
            "It was stopped (quota exceeded)."
        );
        assert_eq!(explain_end(SessionState::Stopped, None), "It was stopped.");
    }
}
