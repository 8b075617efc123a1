//! How an [`AppError`] is answered over HTTP, in one place: its status and
//! machine code, JSON (`ApiError`) for the API and agents, an error page in
//! the site's layout (`PageError`) for browsers, and the `FormError` a form
//! shows next to the field it names. Internal details go to the log only.

use askama::Template;
use axum::extract::Request;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use serde_json::json;

use super::layout::Layout;
use crate::error::AppError;

/// What an API handler answers.
pub type ApiResult = Result<Response, ApiError>;

/// What a page handler answers.
pub type PageResult = Result<Response, PageError>;

// The HTTP side of the domain error lives here, next to the answers that
// use it, so `crate::error` needs no HTTP types.
impl AppError {
    pub fn status(&self) -> StatusCode {
        match self {
            AppError::Invalid { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            AppError::BadRequest(_) => StatusCode::BAD_REQUEST,
            AppError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            AppError::PayloadTooLarge | AppError::QuotaExceeded(_) => StatusCode::PAYLOAD_TOO_LARGE,
            AppError::Unauthenticated | AppError::BadCredentials | AppError::Unauthorized(_) => {
                StatusCode::UNAUTHORIZED
            }
            AppError::Forbidden(_) => StatusCode::FORBIDDEN,
            AppError::NotFound(_) => StatusCode::NOT_FOUND,
            AppError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            AppError::Conflict { .. } => StatusCode::CONFLICT,
            AppError::TooManyAttempts { .. } => StatusCode::TOO_MANY_REQUESTS,
            AppError::Unavailable
            | AppError::ProviderUnavailable(_)
            | AppError::NoCapacity(_)
            | AppError::Contended => StatusCode::SERVICE_UNAVAILABLE,
            AppError::PaymentRequired(_) => StatusCode::PAYMENT_REQUIRED,
            AppError::LimitReached(_) => StatusCode::CONFLICT,
            AppError::Rejected { .. } => StatusCode::BAD_REQUEST,
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
            AppError::QuotaExceeded(_) => "quota_exceeded",
            AppError::Unauthenticated => "unauthenticated",
            AppError::BadCredentials => "bad_credentials",
            AppError::Unauthorized(_) => "unauthorized",
            AppError::Forbidden(_) => "forbidden",
            AppError::NotFound(_) => "not_found",
            AppError::MethodNotAllowed(_) => "method_not_allowed",
            AppError::Conflict { .. } => "conflict",
            AppError::TooManyAttempts { .. } => "too_many_attempts",
            AppError::Unavailable | AppError::ProviderUnavailable(_) | AppError::Contended => {
                "unavailable"
            }
            AppError::PaymentRequired(_) => "no_balance",
            AppError::LimitReached(_) => "limit_reached",
            AppError::Rejected { reason, .. } => reason,
            AppError::NoCapacity(_) => "no_capacity",
            AppError::HostKeyInvalid => opencloud_protocol::agent::HOST_KEY_INVALID,
            AppError::HostKeyRevoked => opencloud_protocol::agent::HOST_KEY_REVOKED,
            AppError::Internal(_) => "internal",
        }
    }

    fn log(&self) {
        if let AppError::Internal(detail) = self {
            tracing::error!(%detail, "internal error");
        }
    }

    /// `response` with the `Retry-After` a refusal for too many attempts
    /// carries.
    pub fn with_retry_after(&self, mut response: Response) -> Response {
        if let AppError::TooManyAttempts { retry_after, .. } = self {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(*retry_after));
        }
        response
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
    layout: Layout,
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
            layout: Layout::anonymous(),
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

/// JSON under `/api/`, a page everywhere else.
pub fn respond_error(is_api: bool, e: AppError) -> Response {
    if is_api {
        ApiError(e).into_response()
    } else {
        PageError(e).into_response()
    }
}

/// Whether `path` is the JSON API's, whose errors are JSON.
pub fn is_api_path(path: &str) -> bool {
    path.starts_with("/api/")
}

fn is_api(request: &Request) -> bool {
    is_api_path(request.uri().path())
}

/// The platform's answer to an address it does not serve.
pub async fn not_found(request: Request) -> Response {
    respond_error(is_api(&request), AppError::NotFound("page"))
}

/// The platform's answer to a method an address does not take.
pub async fn method_not_allowed(request: Request) -> Response {
    let error = AppError::MethodNotAllowed(request.method().to_string());
    respond_error(is_api(&request), error)
}

/// A form's error, shown next to the field it names.
#[derive(Debug, Default, Clone)]
pub struct FormError {
    field: Option<&'static str>,
    message: Option<String>,
}

impl FormError {
    pub fn none() -> Self {
        Self::default()
    }

    /// The message for `field`, if the error is about that field.
    pub fn on(&self, field: &str) -> Option<&str> {
        match (self.field, &self.message) {
            (Some(f), Some(m)) if f == field => Some(m),
            _ => None,
        }
    }

    /// The message when it is about no particular field.
    pub fn general(&self) -> Option<&str> {
        match (self.field, &self.message) {
            (None, Some(m)) => Some(m),
            _ => None,
        }
    }
}

impl FormError {
    /// `e` shown on a form whose fields have other names than the
    /// domain's: each `(domain, form)` pair renames one.
    pub fn renamed(e: &AppError, names: &[(&str, &'static str)]) -> Self {
        let field = e.field().map(|f| {
            names
                .iter()
                .find(|(domain, _)| *domain == f)
                .map_or(f, |(_, form)| *form)
        });
        Self {
            field,
            message: Some(e.to_string()),
        }
    }
}

impl From<&AppError> for FormError {
    fn from(e: &AppError) -> Self {
        Self {
            field: e.field(),
            message: Some(e.to_string()),
        }
    }
}
