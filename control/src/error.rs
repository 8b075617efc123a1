//! Control's one error type and its one mapping to HTTP: JSON for the API,
//! a page for browsers. Messages are written for the person who sees them;
//! internal details go to the log only.

use askama::Template;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use serde_json::json;

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
    /// No host can take a new session right now.
    #[error("{0}")]
    NoCapacity(String),
    /// An agent presented a HostKey no host has.
    #[error("this HostKey belongs to no host; copy it again from My hosts")]
    HostKeyInvalid,
    /// An agent presented the key of a host whose key was revoked.
    #[error("this host's HostKey was revoked; rotate it on My hosts to get a new one")]
    HostKeyRevoked,
    #[error("something went wrong on our side; it has been logged")]
    Internal(String),
}

impl AppError {
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        Self::Invalid {
            field: Some(field),
            message: message.into(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            AppError::Invalid { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            AppError::BadRequest(_) => StatusCode::BAD_REQUEST,
            AppError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            AppError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            AppError::Unauthenticated | AppError::BadCredentials | AppError::Unauthorized(_) => {
                StatusCode::UNAUTHORIZED
            }
            AppError::Forbidden(_) => StatusCode::FORBIDDEN,
            AppError::NotFound(_) => StatusCode::NOT_FOUND,
            AppError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            AppError::Conflict { .. } => StatusCode::CONFLICT,
            AppError::TooManyAttempts { .. } => StatusCode::TOO_MANY_REQUESTS,
            AppError::Unavailable | AppError::NoCapacity(_) => StatusCode::SERVICE_UNAVAILABLE,
            AppError::HostKeyInvalid => StatusCode::UNAUTHORIZED,
            AppError::HostKeyRevoked => StatusCode::FORBIDDEN,
            AppError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            AppError::Invalid { .. } => "invalid",
            AppError::BadRequest(_) => "bad_request",
            AppError::UnsupportedMediaType => "unsupported_media_type",
            AppError::PayloadTooLarge => "payload_too_large",
            AppError::Unauthenticated => "unauthenticated",
            AppError::BadCredentials => "bad_credentials",
            AppError::Unauthorized(_) => "unauthorized",
            AppError::Forbidden(_) => "forbidden",
            AppError::NotFound(_) => "not_found",
            AppError::MethodNotAllowed(_) => "method_not_allowed",
            AppError::Conflict { .. } => "conflict",
            AppError::TooManyAttempts { .. } => "too_many_attempts",
            AppError::Unavailable => "unavailable",
            AppError::NoCapacity(_) => "no_capacity",
            AppError::HostKeyInvalid => opencloud_protocol::agent::HOST_KEY_INVALID,
            AppError::HostKeyRevoked => opencloud_protocol::agent::HOST_KEY_REVOKED,
            AppError::Internal(_) => "internal",
        }
    }

    pub fn field(&self) -> Option<&'static str> {
        match self {
            AppError::Invalid { field, .. } | AppError::Conflict { field, .. } => *field,
            _ => None,
        }
    }

    fn log(&self) {
        if let AppError::Internal(detail) = self {
            tracing::error!(%detail, "internal error");
        }
    }

    fn with_retry_after(&self, mut response: Response) -> Response {
        if let AppError::TooManyAttempts { retry_after, .. } = self {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(*retry_after));
        }
        response
    }
}

impl From<DbError> for AppError {
    fn from(e: DbError) -> Self {
        match e {
            DbError::Mysql(mysql_async::Error::Driver(_) | mysql_async::Error::Io(_)) => {
                tracing::error!(error = %e, "database unreachable");
                AppError::Unavailable
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

impl From<askama::Error> for AppError {
    fn from(e: askama::Error) -> Self {
        AppError::Internal(format!("template: {e}"))
    }
}

/// An error answered as `{"error": {"code", "message", "field"}}`.
#[derive(Debug)]
pub struct ApiError(pub AppError);

impl<E: Into<AppError>> From<E> for ApiError {
    fn from(e: E) -> Self {
        ApiError(e.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let e = self.0;
        e.log();
        let body = json!({"error": {
            "code": e.code(),
            "message": e.to_string(),
            "field": e.field(),
        }});
        e.with_retry_after((e.status(), axum::Json(body)).into_response())
    }
}

/// An error answered as a page in the site's layout.
#[derive(Debug)]
pub struct PageError(pub AppError);

impl<E: Into<AppError>> From<E> for PageError {
    fn from(e: E) -> Self {
        PageError(e.into())
    }
}

#[derive(Template)]
#[template(path = "error.html")]
struct ErrorPage<'a> {
    layout: crate::web::Layout,
    title: &'a str,
    message: String,
    login_link: bool,
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let e = self.0;
        e.log();
        let status = e.status();
        let page = ErrorPage {
            layout: crate::web::Layout::anonymous(),
            title: status.canonical_reason().unwrap_or("Error"),
            message: e.to_string(),
            login_link: matches!(e, AppError::Unauthenticated),
        };
        let body = page
            .render()
            .unwrap_or_else(|_| format!("<h1>{}</h1>", status.as_u16()));
        e.with_retry_after((status, Html(body)).into_response())
    }
}
