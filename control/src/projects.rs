//! Projects: a user's named notebook workspaces. A user only ever sees their
//! own; someone else's project answers exactly like a missing one.

use mysql_async::prelude::*;
use mysql_async::Pool;
use serde::Serialize;

use crate::error::AppError;
use crate::names::NameRule;
use crate::sessions::commands::Wakeups;
use crate::sessions::ending;
use crate::sessions::explain_end;
use crate::sessions::state::{self, Phase};

pub const NAME_MAX_CHARS: usize = 100;
pub const DESCRIPTION_MAX_CHARS: usize = 2000;
/// Live projects one user may hold, so one account cannot fill the table.
pub const MAX_PROJECTS_PER_USER: u64 = 1000;

#[derive(Debug, Clone, Serialize)]
pub struct Project {
    pub id: u64,
    pub name: String,
    pub description: String,
    pub created_at: String,
    pub updated_at: String,
    /// The project's latest session, if it ever had one.
    pub session: Option<LatestSession>,
}

/// A project's newest session, as My projects shows it.
#[derive(Debug, Clone, Serialize)]
pub struct LatestSession {
    pub sid: String,
    /// starting, running, stopping, stopped, failed or lost.
    pub state: String,
    /// Why it ended, in words; `None` while it is live.
    pub ended_because: Option<String>,
    /// What the host reported about it (a kernel stopped for memory).
    pub notice: Option<String>,
    /// Where its files came from: "Your files were restored from the
    /// autosave of 4 minutes ago."; `None` when it started empty.
    pub restored: Option<String>,
}

impl LatestSession {
    pub fn is_live(&self) -> bool {
        state::is_live_column(&self.state)
    }

    /// Starting or running: the owner can go in (or wait at the door).
    pub fn enterable(&self) -> bool {
        Phase::from_column(&self.state).is_some_and(Phase::is_enterable)
    }

    /// Starting or stopping: about to change by itself.
    pub fn changing(&self) -> bool {
        matches!(
            Phase::from_column(&self.state),
            Some(Phase::Starting | Phase::Stopping)
        )
    }
}

type ProjectRow = (
    u64,
    String,
    String,
    String,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<u64>,
    Option<String>,
    Option<u64>,
);

const COLUMNS: &str = "p.id, p.name, p.description, DATE_FORMAT(p.created_at, '%Y-%m-%d %H:%i'), \
    DATE_FORMAT(p.updated_at, '%Y-%m-%d %H:%i'), s.sid, s.state, s.end_reason, s.notice, \
    s.restored_version, v.reason, \
    CAST(GREATEST(TIMESTAMPDIFF(SECOND, s.restored_from_at, UTC_TIMESTAMP(6)), 0) AS UNSIGNED)";

/// The projects table joined with each project's newest session and the
/// version that session's files were restored from.
const FROM: &str = "projects p LEFT JOIN sessions s ON s.sid = (SELECT l.sid FROM sessions l \
    WHERE l.project_id = p.id ORDER BY l.created_at DESC, l.sid LIMIT 1) \
    LEFT JOIN project_versions v ON v.project_id = s.project_id AND v.version = s.restored_version";

/// `4 minutes`, `1 hour`, `3 days`: how long ago, roughly.
fn age_in_words(seconds: u64) -> String {
    let (n, unit) = match seconds {
        0..=59 => return "less than a minute".into(),
        60..=3599 => (seconds / 60, "minute"),
        3600..=86_399 => (seconds / 3600, "hour"),
        _ => (seconds / 86_400, "day"),
    };
    format!("{n} {unit}{}", if n == 1 { "" } else { "s" })
}

/// The sentence an owner reads about where a session's files came from.
pub fn restored_sentence(version: u64, reason: Option<&str>, age_seconds: Option<u64>) -> String {
    let what = match reason {
        Some("autosave") => "the autosave".to_owned(),
        Some("save") => "the save".to_owned(),
        Some("stop") => "the snapshot taken when your last session stopped".to_owned(),
        Some("upload") => "the upload".to_owned(),
        Some("restore") => "the restored version".to_owned(),
        _ => format!("version {version}"),
    };
    match age_seconds {
        Some(age) => format!(
            "Your files were restored from {what} of {} ago.",
            age_in_words(age)
        ),
        None => format!("Your files were restored from {what}."),
    }
}

fn from_row(
    (
        id,
        name,
        description,
        created_at,
        updated_at,
        sid,
        state,
        end_reason,
        notice,
        restored_version,
        restored_reason,
        restored_age,
    ): ProjectRow,
) -> Project {
    let session = sid.zip(state).map(|(sid, state)| {
        let ended_because = (!state::is_live_column(&state))
            .then(|| explain_end(state::route_state(&state), end_reason.as_deref()));
        LatestSession {
            sid,
            state,
            ended_because,
            notice,
            restored: restored_version
                .map(|v| restored_sentence(v, restored_reason.as_deref(), restored_age)),
        }
    });
    Project {
        id,
        name,
        description,
        created_at,
        updated_at,
        session,
    }
}

/// The rule for a project's name.
pub const NAME: NameRule = NameRule {
    field: "name",
    what: "A project name",
    when_empty: "Give the project a name.",
    max_chars: NAME_MAX_CHARS,
};

pub fn check_description(raw: &str) -> Result<String, AppError> {
    let description = raw.trim();
    if description.chars().count() > DESCRIPTION_MAX_CHARS {
        return Err(AppError::invalid(
            "description",
            format!("A description has at most {DESCRIPTION_MAX_CHARS} characters."),
        ));
    }
    Ok(description.replace("\r\n", "\n"))
}

pub async fn list(pool: &Pool, owner: u64) -> Result<Vec<Project>, AppError> {
    let rows: Vec<ProjectRow> = pool
        .get_conn()
        .await?
        .exec(
            format!("SELECT {COLUMNS} FROM {FROM} WHERE p.owner_id = ? AND p.deleted_at IS NULL ORDER BY p.updated_at DESC, p.id DESC"),
            (owner,),
        )
        .await?;
    Ok(rows.into_iter().map(from_row).collect())
}

pub async fn get(pool: &Pool, owner: u64, id: u64) -> Result<Project, AppError> {
    let row: Option<ProjectRow> = pool
        .get_conn()
        .await?
        .exec_first(
            format!("SELECT {COLUMNS} FROM {FROM} WHERE p.id = ? AND p.owner_id = ? AND p.deleted_at IS NULL"),
            (id, owner),
        )
        .await?;
    row.map(from_row).ok_or(AppError::NotFound("project"))
}

pub async fn create(
    pool: &Pool,
    owner: u64,
    name: &str,
    description: &str,
) -> Result<Project, AppError> {
    let name = NAME.check(name)?;
    let description = check_description(description)?;
    let mut conn = pool.get_conn().await?;
    let count: u64 = conn
        .exec_first(
            "SELECT COUNT(*) FROM projects WHERE owner_id = ? AND deleted_at IS NULL",
            (owner,),
        )
        .await?
        .unwrap_or(0);
    if count >= MAX_PROJECTS_PER_USER {
        return Err(AppError::Conflict {
            field: None,
            message: format!("You have {MAX_PROJECTS_PER_USER} projects, the most an account may hold. Delete one first."),
        });
    }
    conn.exec_drop(
        "INSERT INTO projects (owner_id, name, description) VALUES (?, ?, ?)",
        (owner, &name, &description),
    )
    .await?;
    let id = conn.last_insert_id().unwrap_or_default();
    drop(conn);
    get(pool, owner, id).await
}

/// Renames and/or re-describes a project; `None` leaves a value as it is.
pub async fn update(
    pool: &Pool,
    owner: u64,
    id: u64,
    name: Option<&str>,
    description: Option<&str>,
) -> Result<Project, AppError> {
    let name = name.map(|n| NAME.check(n)).transpose()?;
    let description = description.map(check_description).transpose()?;
    let mut conn = pool.get_conn().await?;
    let result = conn
        .exec_iter(
            "UPDATE projects SET name = COALESCE(?, name), description = COALESCE(?, description),
                    updated_at = NOW(6)
             WHERE id = ? AND owner_id = ? AND deleted_at IS NULL",
            (name, description, id, owner),
        )
        .await?;
    let matched = result.affected_rows();
    drop(result);
    drop(conn);
    if matched == 0 {
        return Err(AppError::NotFound("project"));
    }
    get(pool, owner, id).await
}

/// Stops the project's live session, if any, then deletes the project.
pub async fn delete(pool: &Pool, wakeups: &Wakeups, owner: u64, id: u64) -> Result<(), AppError> {
    ending::stop_project(pool, wakeups, owner, id).await?;
    let mut conn = pool.get_conn().await?;
    let result = conn
        .exec_iter(
            "UPDATE projects SET deleted_at = NOW(6) WHERE id = ? AND owner_id = ? AND deleted_at IS NULL",
            (id, owner),
        )
        .await?;
    if result.affected_rows() == 0 {
        return Err(AppError::NotFound("project"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_trimmed_and_limited() {
        assert_eq!(NAME.check("  Thesis  ").unwrap(), "Thesis");
        assert!(NAME.check("   ").is_err());
        assert!(NAME.check(&"x".repeat(100)).is_ok());
        assert!(NAME.check(&"x".repeat(101)).is_err());
        assert!(NAME.check("a\u{0}b").is_err());
    }

    #[test]
    fn the_restored_sentence_says_what_and_how_long_ago() {
        assert_eq!(
            restored_sentence(7, Some("autosave"), Some(4 * 60 + 10)),
            "Your files were restored from the autosave of 4 minutes ago."
        );
        assert_eq!(
            restored_sentence(7, None, Some(3600)),
            "Your files were restored from version 7 of 1 hour ago."
        );
        assert_eq!(age_in_words(5), "less than a minute");
        assert_eq!(age_in_words(3 * 86_400), "3 days");
    }
}
