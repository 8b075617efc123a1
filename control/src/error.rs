//! Control's one error type: what went wrong, in words written for the
//! person who sees them; internal details go to the log only. How an error
//! becomes an HTTP answer (status, JSON body, error page) is the web layer's
//! business (`web::errors`), so the domain modules know nothing of HTTP.

use crate::db::DbError;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// A value the user supplied is not acceptable.
    #[error("{message}")]
    Invalid {
        field: Option<&'static str>,
        message: String,
    },
    /// The request body could not be read as what the endpoint takes.
    #[error("{0}")]
    BadRequest(String),
    #[error("send the body as JSON with Content-Type: application/json")]
    UnsupportedMediaType,
    #[error("the request body is larger than the limit of 1 MiB")]
    PayloadTooLarge,
    /// A body over a quota the caller has (a snapshot over the owner's
    /// storage), with the quota in words.
    #[error("{0}")]
    QuotaExceeded(String),
    #[error("log in first")]
    Unauthenticated,
    #[error("the email or password is not right")]
    BadCredentials,
    /// A machine caller (a gateway) without a valid key.
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("this address does not accept {0} requests")]
    MethodNotAllowed(String),
    #[error("{message}")]
    Conflict {
        field: Option<&'static str>,
        message: String,
    },
    #[error("{message}")]
    TooManyAttempts { retry_after: u64, message: String },
    #[error("the service is briefly unavailable; try again in a moment")]
    Unavailable,
    /// The payment provider did not answer, or failed on its side: no
    /// money moved.
    #[error("{0} is not answering right now, so no money moved; try again in a few minutes")]
    ProviderUnavailable(&'static str),
    /// No host can take a new session right now.
    #[error("{0}")]
    NoCapacity(String),
    /// An agent presented a HostKey no host has.
    #[error("this HostKey belongs to no host; copy it again from My hosts")]
    HostKeyInvalid,
    /// An agent presented the key of a host whose key was revoked.
    #[error("this host's HostKey was revoked; rotate it on My hosts to get a new one")]
    HostKeyRevoked,
    /// The account has no compute time left to do this.
    #[error("{0}")]
    PaymentRequired(String),
    /// A limit of the user's package (sessions at once) is reached.
    #[error("{0}")]
    LimitReached(String),
    /// A payment provider's message that is not right (a webhook with a bad
    /// signature, an unknown order): refused, nothing changes.
    #[error("{message}")]
    Rejected {
        reason: &'static str,
        message: String,
    },
    /// The database gave up on a transaction to break a deadlock or a lock
    /// wait; [`retrying`] runs it again.
    #[error("the service is briefly busy; try again in a moment")]
    Contended,
    #[error("something went wrong on our side; it has been logged")]
    Internal(String),
}

/// Runs `attempt` again (up to 8 times, with a short growing pause) while
/// the database refuses it as [`AppError::Contended`].
pub async fn retrying<T, F, Fut>(mut attempt: F) -> Result<T, AppError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, AppError>>,
{
    let mut pause_ms = 5;
    for _ in 0..8 {
        match attempt().await {
            Err(AppError::Contended) => {
                metrics::counter!("opencloud_control_db_transaction_retries_total").increment(1);
                tokio::time::sleep(std::time::Duration::from_millis(
                    pause_ms + crate::ids::small_jitter(pause_ms),
                ))
                .await;
                pause_ms *= 2;
            }
            other => return other,
        }
    }
    attempt().await
}

impl AppError {
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        Self::Invalid {
            field: Some(field),
            message: message.into(),
        }
    }

    pub fn field(&self) -> Option<&'static str> {
        match self {
            AppError::Invalid { field, .. } | AppError::Conflict { field, .. } => *field,
            _ => None,
        }
    }
}

impl From<DbError> for AppError {
    fn from(e: DbError) -> Self {
        match e {
            DbError::Mysql(mysql_async::Error::Driver(_) | mysql_async::Error::Io(_)) => {
                tracing::error!(error = %e, "database unreachable");
                AppError::Unavailable
            }
            // Too many connections (1040), or too many for our user (1203
            // server-wide, 1226 the user's own limit): the database is out
            // of room, not broken; say so as a 503.
            DbError::Mysql(mysql_async::Error::Server(ref s))
                if matches!(s.code, 1040 | 1203 | 1226) =>
            {
                tracing::error!(error = %e, "the database refuses new connections");
                AppError::Unavailable
            }
            // Deadlock victim (1213) or lock wait timeout (1205).
            DbError::Mysql(mysql_async::Error::Server(ref s))
                if s.code == 1213 || s.code == 1205 =>
            {
                AppError::Contended
            }
            other => AppError::Internal(other.to_string()),
        }
    }
}

impl From<mysql_async::Error> for AppError {
    fn from(e: mysql_async::Error) -> Self {
        DbError::from(e).into()
    }
}
