//! Accounts: users, passwords, login sessions, login throttling.

use std::net::IpAddr;
use std::sync::Arc;

use mysql_async::prelude::*;
use mysql_async::{Pool, Transaction};
use opencloud_protocol::metrics::LabelValue;
use opencloud_protocol::routes::Change;
use serde::Serialize;

use crate::billing::ledger;
use crate::config::{BillingPolicy, LoginPolicy, RegistrationPolicy};
use crate::error::AppError;
use crate::ids::random_id;
use crate::names::NameRule;
use crate::routes;
use crate::throttle::{self, Events, Limit};

pub const PASSWORD_MIN_CHARS: usize = 10;
pub const PASSWORD_MAX_CHARS: usize = 256;
pub const NAME_MAX_CHARS: usize = 100;
pub const EMAIL_MAX_CHARS: usize = 254;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Customer,
    HostOwner,
    Admin,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Customer, Role::HostOwner, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Customer => "customer",
            Role::HostOwner => "host_owner",
            Role::Admin => "admin",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Role::Customer => "Customer",
            Role::HostOwner => "Host owner",
            Role::Admin => "Admin",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct User {
    pub id: u64,
    pub email: String,
    pub name: String,
    pub role: Role,
    pub disabled: bool,
    pub created_at: String,
}

impl User {
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }

    /// Host owners (and admins) may add hosts.
    pub fn may_host(&self) -> bool {
        matches!(self.role, Role::HostOwner | Role::Admin)
    }
}

const USER_COLUMNS: &str =
    "u.id, u.email, u.name, u.role, u.disabled, DATE_FORMAT(u.created_at, '%Y-%m-%d %H:%i')";

type UserRow = (u64, String, String, String, bool, String);

fn user_from_row((id, email, name, role, disabled, created_at): UserRow) -> User {
    User {
        id,
        email,
        name,
        role: Role::parse(&role).unwrap_or(Role::Customer),
        disabled,
        created_at,
    }
}

/// Lower-cases and checks an email address; the error names the field.
pub fn normalize_email(raw: &str) -> Result<String, AppError> {
    let email = raw.trim().to_lowercase();
    let bad = || AppError::invalid("email", "Enter an email address like name@example.com.");
    if email.is_empty() {
        return Err(AppError::invalid("email", "Enter your email address."));
    }
    if email.chars().count() > EMAIL_MAX_CHARS {
        return Err(AppError::invalid(
            "email",
            format!("An email address has at most {EMAIL_MAX_CHARS} characters."),
        ));
    }
    let (local, domain) = email.rsplit_once('@').ok_or_else(bad)?;
    let domain_ok = domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !domain.contains("..")
        && domain
            .chars()
            .all(|c| c.is_alphanumeric() || c == '.' || c == '-');
    let local_ok = !local.is_empty()
        && local.len() <= 64
        && !local.contains('@')
        && !local
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || "<>\"(),;:[]\\".contains(c));
    if !domain_ok || !local_ok {
        return Err(bad());
    }
    Ok(email)
}

pub fn check_password_rules(password: &str, field: &'static str) -> Result<(), AppError> {
    let chars = password.chars().count();
    if chars < PASSWORD_MIN_CHARS {
        return Err(AppError::invalid(
            field,
            format!("Use at least {PASSWORD_MIN_CHARS} characters for the password."),
        ));
    }
    if chars > PASSWORD_MAX_CHARS {
        return Err(AppError::invalid(
            field,
            format!("A password has at most {PASSWORD_MAX_CHARS} characters."),
        ));
    }
    Ok(())
}

/// The rule for a person's display name.
pub const DISPLAY_NAME: NameRule = NameRule {
    field: "name",
    what: "A name",
    when_empty: "Enter your name.",
    max_chars: NAME_MAX_CHARS,
};

/// PBKDF2-HMAC-SHA256 hashing on the blocking pool, so hashing never stalls
/// the request threads.
#[derive(Clone)]
pub struct Passwords {
    iterations: u32,
    /// Verified against when the email is unknown, so both answers take the
    /// same time. Made on first need so start-up stays fast.
    dummy_hash: Arc<tokio::sync::OnceCell<String>>,
}

impl Passwords {
    pub fn new(iterations: u32) -> Self {
        Self {
            iterations,
            dummy_hash: Arc::new(tokio::sync::OnceCell::new()),
        }
    }

    pub async fn hash(&self, password: &str) -> Result<String, AppError> {
        let iterations = self.iterations;
        let password = password.to_owned();
        tokio::task::spawn_blocking(move || opencloud_passwords::hash(&password, iterations))
            .await
            .map_err(|e| AppError::Internal(format!("hashing task: {e}")))
    }

    /// Checks `password` against `stored`, or against a dummy hash when
    /// there is no stored hash (same work either way). Constant-time compare.
    pub async fn verify(&self, password: &str, stored: Option<String>) -> Result<bool, AppError> {
        let known = stored.is_some();
        let stored = match stored {
            Some(stored) => stored,
            None => self
                .dummy_hash
                .get_or_try_init(|| async { self.hash(&random_id()).await })
                .await?
                .clone(),
        };
        let password = password.to_owned();
        let matches =
            tokio::task::spawn_blocking(move || opencloud_passwords::verify(&password, &stored))
                .await
                .map_err(|e| AppError::Internal(format!("hashing task: {e}")))?;
        Ok(known && matches)
    }
}

pub struct NewUser {
    pub email: String,
    pub name: String,
    pub password: String,
    pub role: Role,
}

/// Registration attempts: what registration throttling counts.
pub const REGISTRATION_ATTEMPTS: Events = Events {
    table: "registration_attempts",
    at_column: "attempted_at",
};

/// Validates and creates an account, at most `policy.per_client` tries per
/// window from one client address. Errors name the field at fault.
///
/// Every try with well-formed input counts, the ones whose email is taken
/// too, so the form cannot be used to test many addresses for accounts.
/// Tries with bad input create nothing and do not count. The check and the
/// count are not one transaction: a client racing requests may pass the
/// limit by as many as it sends at once, each still paying for a password
/// hash.
pub async fn register(
    pool: &Pool,
    passwords: &Passwords,
    policy: &RegistrationPolicy,
    billing: &BillingPolicy,
    client_ip: IpAddr,
    new: NewUser,
) -> Result<User, AppError> {
    let email = normalize_email(&new.email)?;
    let name = DISPLAY_NAME.check(&new.name)?;
    check_password_rules(&new.password, "password")?;
    if new.role == Role::Admin {
        return Err(AppError::invalid(
            "role",
            "Admins are appointed by another admin.",
        ));
    }
    let client = throttle::client_key(client_ip);
    let mut conn = pool.get_conn().await?;
    throttle::refuse_while_limited(
        &mut conn,
        &REGISTRATION_ATTEMPTS,
        "client_ip = ?",
        vec![client.as_str().into()],
        policy.window_seconds,
        Limit::Quota {
            per_window: policy.per_client,
        },
        |wait| {
            format!(
                "Too many accounts were registered from your address. Try again in {}.",
                in_words(wait)
            )
        },
    )
    .await
    .inspect_err(|_| {
        metrics::counter!("opencloud_control_registrations_throttled_total").increment(1)
    })?;
    conn.exec_drop(
        "INSERT INTO registration_attempts (client_ip) VALUES (?)",
        (&client,),
    )
    .await?;
    let taken: Option<u64> = conn
        .exec_first("SELECT id FROM users WHERE email = ?", (&email,))
        .await?;
    if taken.is_some() {
        return Err(duplicate_email());
    }
    let hash = passwords.hash(&new.password).await?;
    // The account and its sign-up grant appear together or not at all.
    let mut tx = conn
        .start_transaction(mysql_async::TxOpts::default())
        .await?;
    let inserted = tx
        .exec_drop(
            "INSERT INTO users (email, name, password_hash, role) VALUES (?, ?, ?, ?)",
            (&email, &name, &hash, new.role.as_str()),
        )
        .await;
    match inserted {
        Ok(()) => {}
        // Two registrations racing for one address: the unique index decides.
        Err(mysql_async::Error::Server(e)) if e.code == 1062 => return Err(duplicate_email()),
        Err(e) => return Err(e.into()),
    }
    let id = tx.last_insert_id().unwrap_or_default();
    ledger::grant_signup(&mut tx, &billing.trial, id, billing.signup_grant_seconds).await?;
    tx.commit().await?;
    metrics::counter!("opencloud_control_registrations_total").increment(1);
    drop(conn);
    user_by_id(pool, id)
        .await?
        .ok_or(AppError::Internal("new user vanished".into()))
}

/// `45 seconds`, `12 minutes`: a wait as a person reads it, rounded up.
fn in_words(seconds: u64) -> String {
    match seconds {
        1 => "1 second".into(),
        0..60 => format!("{seconds} seconds"),
        60 => "1 minute".into(),
        _ => format!("{} minutes", seconds.div_ceil(60)),
    }
}

fn duplicate_email() -> AppError {
    AppError::Conflict {
        field: Some("email"),
        message: "An account with this email already exists. Log in instead.".into(),
    }
}

pub async fn user_by_id(pool: &Pool, id: u64) -> Result<Option<User>, AppError> {
    let row: Option<UserRow> = pool
        .get_conn()
        .await?
        .exec_first(
            format!("SELECT {USER_COLUMNS} FROM users u WHERE u.id = ?"),
            (id,),
        )
        .await?;
    Ok(row.map(user_from_row))
}

/// Who is asking, as far as login throttling is concerned.
pub struct LoginAttempt<'a> {
    pub email: &'a str,
    pub password: &'a str,
    pub client_ip: IpAddr,
    pub user_agent: &'a str,
}

/// A successful login: the user and the new login session's id.
pub struct LoggedIn {
    pub user: User,
    pub login_session: String,
}

/// Checks the credentials under the throttling policy and opens a login
/// session. Unknown email and wrong password give the same answer.
pub async fn login(
    pool: &Pool,
    passwords: &Passwords,
    policy: &LoginPolicy,
    attempt: LoginAttempt<'_>,
) -> Result<LoggedIn, AppError> {
    let email = attempt.email.trim().to_lowercase();
    if email.is_empty() {
        return Err(AppError::invalid("email", "Enter your email address."));
    }
    if attempt.password.is_empty() {
        return Err(AppError::invalid("password", "Enter your password."));
    }
    let mut conn = pool.get_conn().await?;
    // Failures are counted per throttle client (an IPv6 /64), the login
    // session records the address itself.
    let client = throttle::client_key(attempt.client_ip);
    throttle(&mut conn, policy, &email, &client).await?;

    let row: Option<(u64, String, bool)> = conn
        .exec_first(
            "SELECT id, password_hash, disabled FROM users WHERE email = ?",
            (&email,),
        )
        .await?;
    let (user_id, stored, disabled) = match row {
        Some((id, hash, disabled)) => (Some(id), Some(hash), disabled),
        None => (None, None, false),
    };
    let password = attempt
        .password
        .chars()
        .take(PASSWORD_MAX_CHARS + 1)
        .collect::<String>();
    let matches = passwords.verify(&password, stored).await?;
    let Some(user_id) = user_id.filter(|_| matches) else {
        conn.exec_drop(
            "INSERT INTO login_failures (email, client_ip) VALUES (?, ?)",
            (&email, &client),
        )
        .await?;
        LoginOutcome::BadCredentials.count();
        return Err(AppError::BadCredentials);
    };
    if disabled {
        LoginOutcome::Disabled.count();
        return Err(AppError::Forbidden(
            "This account has been disabled. Contact support if you think this is a mistake."
                .into(),
        ));
    }
    conn.exec_drop(
        "DELETE FROM login_failures WHERE email = ? AND client_ip = ?",
        (&email, &client),
    )
    .await?;
    let login_session = random_id();
    let user_agent: String = attempt.user_agent.chars().take(255).collect();
    conn.exec_drop(
        "INSERT INTO login_sessions (id, user_id, expires_at, client_ip, user_agent)
         VALUES (?, ?, NOW(6) + INTERVAL ? SECOND, ?, ?)",
        (
            &login_session,
            user_id,
            opencloud_protocol::token::PLATFORM_TOKEN_SECONDS,
            attempt.client_ip.to_string(),
            &user_agent,
        ),
    )
    .await?;
    LoginOutcome::Success.count();
    drop(conn);
    let user = user_by_id(pool, user_id)
        .await?
        .ok_or(AppError::Internal("user vanished during login".into()))?;
    Ok(LoggedIn {
        user,
        login_session,
    })
}

/// Failed logins: what login throttling counts.
pub const LOGIN_FAILURES: Events = Events {
    table: "login_failures",
    at_column: "failed_at",
};

/// How a login attempt ended: the `outcome` of `opencloud_control_logins_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginOutcome {
    Success,
    BadCredentials,
    Disabled,
    Throttled,
}

impl LabelValue for LoginOutcome {
    const ALL: &'static [Self] = &[
        LoginOutcome::Success,
        LoginOutcome::BadCredentials,
        LoginOutcome::Disabled,
        LoginOutcome::Throttled,
    ];
    fn label(self) -> &'static str {
        match self {
            LoginOutcome::Success => "success",
            LoginOutcome::BadCredentials => "bad_credentials",
            LoginOutcome::Disabled => "disabled",
            LoginOutcome::Throttled => "throttled",
        }
    }
}

impl LoginOutcome {
    pub const METRIC: &'static str = "opencloud_control_logins_total";

    fn count(self) {
        metrics::counter!(Self::METRIC, "outcome" => self.label()).increment(1);
    }
}

/// Refuses the attempt with 429 while the account+client pair, or the
/// client across all accounts, is inside its back-off.
async fn throttle(
    conn: &mut mysql_async::Conn,
    policy: &LoginPolicy,
    email: &str,
    client_ip: &str,
) -> Result<(), AppError> {
    backing_off(conn, policy, email, client_ip)
        .await
        .inspect_err(|_| LoginOutcome::Throttled.count())
}

async fn backing_off(
    conn: &mut mysql_async::Conn,
    policy: &LoginPolicy,
    email: &str,
    client_ip: &str,
) -> Result<(), AppError> {
    let backoff = |after| Limit::Backoff {
        after,
        first_delay: policy.first_delay_seconds,
        max_delay: policy.max_delay_seconds,
    };
    throttle::refuse_while_limited(
        conn,
        &LOGIN_FAILURES,
        "email = ? AND client_ip = ?",
        vec![email.into(), client_ip.into()],
        policy.window_seconds,
        backoff(policy.failures_before_throttle),
        |wait| {
            format!(
                "Too many failed logins for this account from your address. \
                 Try again in {wait} seconds, or reset your password."
            )
        },
    )
    .await?;
    throttle::refuse_while_limited(
        conn,
        &LOGIN_FAILURES,
        "client_ip = ?",
        vec![client_ip.into()],
        policy.window_seconds,
        backoff(policy.client_failure_cap),
        |wait| format!("Too many failed logins from your address. Try again in {wait} seconds."),
    )
    .await
}

/// The user behind a verified token, if its login session is still live and
/// the user is not disabled. Records that the login made a request now, at
/// most once a minute and on the same connection (users online are counted
/// from it).
pub async fn authenticate(
    pool: &Pool,
    user_id: u64,
    login_session: &str,
) -> Result<Option<User>, AppError> {
    let mut conn = pool.get_conn().await?;
    let row: Option<(u64, String, String, String, bool, String, bool)> = conn
        .exec_first(
            format!(
                "SELECT {USER_COLUMNS},
                    s.last_seen_at IS NULL OR s.last_seen_at < UTC_TIMESTAMP(6) - INTERVAL 60 SECOND
                 FROM login_sessions s JOIN users u ON u.id = s.user_id
                 WHERE s.id = ? AND s.user_id = ? AND s.revoked_at IS NULL
                   AND s.expires_at > NOW(6) AND NOT u.disabled"
            ),
            (login_session, user_id),
        )
        .await?;
    let Some((id, email, name, role, disabled, created_at, seen_long_ago)) = row else {
        return Ok(None);
    };
    if seen_long_ago {
        conn.exec_drop(
            "UPDATE login_sessions SET last_seen_at = UTC_TIMESTAMP(6) WHERE id = ?",
            (login_session,),
        )
        .await?;
    }
    Ok(Some(user_from_row((
        id, email, name, role, disabled, created_at,
    ))))
}

/// Extends a login session when its token is re-issued.
pub async fn extend_login_session(pool: &Pool, login_session: &str) -> Result<(), AppError> {
    pool.get_conn()
        .await?
        .exec_drop(
            "UPDATE login_sessions SET expires_at = NOW(6) + INTERVAL ? SECOND
             WHERE id = ? AND revoked_at IS NULL",
            (
                opencloud_protocol::token::PLATFORM_TOKEN_SECONDS,
                login_session,
            ),
        )
        .await?;
    Ok(())
}

/// Revokes one login session (logout) and publishes the revocation to the
/// gateways in the same transaction.
pub async fn revoke_login_session(
    pool: &Pool,
    login_session: &str,
    reason: &str,
) -> Result<(), AppError> {
    let mut conn = pool.get_conn().await?;
    let mut tx = conn.start_transaction(Default::default()).await?;
    revoke_where(&mut tx, "id = ?", vec![login_session.into()], reason).await?;
    routes::commit(tx).await
}

/// Revokes the live login sessions `filter` selects and publishes a
/// `Revoke` for each whose tokens may still be in use. Publishes last, so
/// call it after the transaction's other writes.
async fn revoke_where(
    tx: &mut Transaction<'_>,
    filter: &str,
    params: Vec<mysql_async::Value>,
    reason: &str,
) -> Result<(), AppError> {
    let rows: Vec<(String, u64)> = tx
        .exec(
            format!(
                "SELECT id, TIMESTAMPDIFF(SECOND, '1970-01-01', expires_at) FROM login_sessions
                 WHERE {filter} AND revoked_at IS NULL FOR UPDATE"
            ),
            params,
        )
        .await?;
    if rows.is_empty() {
        return Ok(());
    }
    let marks = vec!["?"; rows.len()].join(", ");
    let mut update: Vec<mysql_async::Value> = vec![reason.into()];
    update.extend(
        rows.iter()
            .map(|(id, _)| mysql_async::Value::from(id.as_str())),
    );
    tx.exec_drop(
        format!(
            "UPDATE login_sessions SET revoked_at = UTC_TIMESTAMP(6), revoke_reason = ?
             WHERE id IN ({marks})"
        ),
        update,
    )
    .await?;
    let now = crate::clock::now_unix();
    let changes: Vec<Change> = rows
        .into_iter()
        .map(|(id, expires)| routes::revocation(id, expires))
        .filter(|r| r.expires_at > now)
        .map(Change::Revoke)
        .collect();
    if !changes.is_empty() {
        routes::publish(tx, &changes).await?;
    }
    Ok(())
}

/// Changes the user's display name, under the same rule as at
/// registration.
pub async fn rename(pool: &Pool, user_id: u64, name: &str) -> Result<User, AppError> {
    let name = DISPLAY_NAME.check(name)?;
    pool.get_conn()
        .await?
        .exec_drop(
            "UPDATE users SET name = ?, updated_at = NOW(6) WHERE id = ?",
            (&name, user_id),
        )
        .await?;
    user_by_id(pool, user_id)
        .await?
        .ok_or(AppError::NotFound("user"))
}

/// Changes the password and revokes every other login session of the user.
pub async fn change_password(
    pool: &Pool,
    passwords: &Passwords,
    user_id: u64,
    keep_login_session: &str,
    current: &str,
    new: &str,
) -> Result<(), AppError> {
    check_password_rules(new, "new_password")?;
    let stored: Option<String> = pool
        .get_conn()
        .await?
        .exec_first("SELECT password_hash FROM users WHERE id = ?", (user_id,))
        .await?;
    if !passwords.verify(current, stored).await? {
        return Err(AppError::invalid(
            "current_password",
            "The current password is not right.",
        ));
    }
    let hash = passwords.hash(new).await?;
    let mut conn = pool.get_conn().await?;
    let mut tx = conn.start_transaction(Default::default()).await?;
    tx.exec_drop(
        "UPDATE users SET password_hash = ?, updated_at = NOW(6) WHERE id = ?",
        (&hash, user_id),
    )
    .await?;
    revoke_where(
        &mut tx,
        "user_id = ? AND id <> ?",
        vec![user_id.into(), keep_login_session.into()],
        "password_changed",
    )
    .await?;
    routes::commit(tx).await
}

/// One page of users for the admin panel, newest first.
pub struct UserPage {
    pub users: Vec<User>,
    pub total: u64,
}

pub async fn search_users(
    pool: &Pool,
    query: &str,
    offset: u64,
    limit: u64,
) -> Result<UserPage, AppError> {
    let pattern = format!("%{}%", escape_like(query.trim()));
    let mut conn = pool.get_conn().await?;
    let total: u64 = conn
        .exec_first(
            "SELECT COUNT(*) FROM users u WHERE u.email LIKE ? OR u.name LIKE ?",
            (&pattern, &pattern),
        )
        .await?
        .unwrap_or(0);
    let rows: Vec<UserRow> = conn
        .exec(
            format!(
                "SELECT {USER_COLUMNS} FROM users u WHERE u.email LIKE ? OR u.name LIKE ?
                 ORDER BY u.id DESC LIMIT ? OFFSET ?"
            ),
            (&pattern, &pattern, limit, offset),
        )
        .await?;
    Ok(UserPage {
        users: rows.into_iter().map(user_from_row).collect(),
        total,
    })
}

fn escape_like(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_")
}

/// Admin changes to a user. Disabling revokes every login session at once.
pub async fn admin_update_user(
    pool: &Pool,
    acting_admin: u64,
    user_id: u64,
    role: Option<Role>,
    disabled: Option<bool>,
) -> Result<User, AppError> {
    if user_id == acting_admin && (disabled == Some(true) || role.is_some_and(|r| r != Role::Admin))
    {
        return Err(AppError::Forbidden(
            "You cannot disable yourself or take away your own admin role; ask another admin."
                .into(),
        ));
    }
    let mut conn = pool.get_conn().await?;
    let mut tx = conn.start_transaction(Default::default()).await?;
    let exists: Option<u64> = tx
        .exec_first("SELECT id FROM users WHERE id = ? FOR UPDATE", (user_id,))
        .await?;
    if exists.is_none() {
        return Err(AppError::NotFound("user"));
    }
    if let Some(role) = role {
        tx.exec_drop(
            "UPDATE users SET role = ?, updated_at = NOW(6) WHERE id = ?",
            (role.as_str(), user_id),
        )
        .await?;
    }
    if let Some(disabled) = disabled {
        tx.exec_drop(
            "UPDATE users SET disabled = ?, updated_at = NOW(6) WHERE id = ?",
            (disabled, user_id),
        )
        .await?;
        if disabled {
            revoke_where(
                &mut tx,
                "user_id = ?",
                vec![user_id.into()],
                "user_disabled",
            )
            .await?;
        }
    }
    routes::commit(tx).await?;
    drop(conn);
    user_by_id(pool, user_id)
        .await?
        .ok_or(AppError::NotFound("user"))
}

/// Creates the admin if no user has that email; with `reset`, sets the
/// password of an existing one. Returns true when a user was created.
pub async fn ensure_admin(
    pool: &Pool,
    passwords: &Passwords,
    email: &str,
    password: &str,
    reset: bool,
) -> Result<bool, AppError> {
    let email = normalize_email(email)?;
    check_password_rules(password, "password")?;
    let existing: Option<u64> = pool
        .get_conn()
        .await?
        .exec_first("SELECT id FROM users WHERE email = ?", (&email,))
        .await?;
    let hash = passwords.hash(password).await?;
    let mut conn = pool.get_conn().await?;
    match existing {
        Some(id) if reset => {
            conn.exec_drop(
                "UPDATE users SET password_hash = ?, role = 'admin', disabled = FALSE WHERE id = ?",
                (&hash, id),
            )
            .await?;
            Ok(false)
        }
        Some(_) => Ok(false),
        None => {
            conn.exec_drop(
                "INSERT INTO users (email, name, password_hash, role) VALUES (?, 'Administrator', ?, 'admin')",
                (&email, &hash),
            )
            .await?;
            Ok(true)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_normalised_and_checked() {
        assert_eq!(
            normalize_email("  Ann@Example.COM ").unwrap(),
            "ann@example.com"
        );
        for bad in [
            "",
            "ann",
            "ann@",
            "@example.com",
            "ann@example",
            "a b@example.com",
            "ann@exa mple.com",
            "ann@.com",
        ] {
            assert!(normalize_email(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn waits_read_in_seconds_then_whole_minutes_rounded_up() {
        assert_eq!(in_words(1), "1 second");
        assert_eq!(in_words(59), "59 seconds");
        assert_eq!(in_words(60), "1 minute");
        assert_eq!(in_words(61), "2 minutes");
        assert_eq!(in_words(3600), "60 minutes");
    }

    #[test]
    fn password_length_limits_count_characters() {
        assert!(check_password_rules("123456789", "password").is_err());
        assert!(check_password_rules("1234567890", "password").is_ok());
        assert!(check_password_rules(&"é".repeat(256), "password").is_ok());
        assert!(check_password_rules(&"é".repeat(257), "password").is_err());
    }
}
