//! Reading input: extractors that turn bad input into our error type (JSON
//! for the API, an error page for forms), the body limits, and the small
//! parsers pages and API share (ids, roles, search pages, `next` links).

use axum::extract::rejection::{FormRejection, JsonRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::{Form, Json};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use super::errors::{ApiError, PageError};
use crate::accounts::Role;
use crate::error::AppError;

/// Requests larger than this are refused with 413.
pub const BODY_LIMIT: usize = 1 << 20;

/// Internal reports (host health of 100 000 hosts) are larger than what
/// browsers send.
pub const INTERNAL_BODY_LIMIT: usize = 16 << 20;

fn rejection_error(status: StatusCode, text: String) -> AppError {
    match status {
        StatusCode::PAYLOAD_TOO_LARGE => AppError::PayloadTooLarge,
        StatusCode::UNSUPPORTED_MEDIA_TYPE => AppError::UnsupportedMediaType,
        _ => AppError::BadRequest(text),
    }
}

/// `Json<T>` whose rejections are our JSON errors, naming the problem.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(value)) => Ok(ApiJson(value)),
            Err(rejection) => Err(ApiError(json_rejection(rejection))),
        }
    }
}

fn json_rejection(rejection: JsonRejection) -> AppError {
    rejection_error(rejection.status(), rejection.body_text())
}

/// The query string as `T`; a bad one is a 400 naming the problem.
async fn query<S: Send + Sync, T: DeserializeOwned>(
    parts: &mut Parts,
    state: &S,
) -> Result<T, AppError> {
    axum::extract::Query::<T>::from_request_parts(parts, state)
        .await
        .map(|q| q.0)
        .map_err(|r: QueryRejection| rejection_error(StatusCode::BAD_REQUEST, r.body_text()))
}

/// `Query<T>` for the API.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        query(parts, state).await.map(ApiQuery).map_err(ApiError)
    }
}

/// Which page of a newest-first list: the items older than `before`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BeforeQuery {
    pub before: Option<u64>,
}

/// `Query<T>` whose rejections are error pages.
pub struct PageQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for PageQuery<T> {
    type Rejection = PageError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        query(parts, state).await.map(PageQuery).map_err(PageError)
    }
}

/// `Form<T>` whose rejections are error pages.
pub struct PageForm<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for PageForm<T> {
    type Rejection = PageError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Form::<T>::from_request(req, state).await {
            Ok(Form(value)) => Ok(PageForm(value)),
            Err(rejection) => {
                let rejection: FormRejection = rejection;
                Err(PageError(rejection_error(
                    rejection.status(),
                    rejection.body_text(),
                )))
            }
        }
    }
}

/// Ids that are not numbers name nothing: 404, like a missing row.
pub fn parse_id(raw: &str, what: &'static str) -> Result<u64, AppError> {
    raw.parse().map_err(|_| AppError::NotFound(what))
}

/// A role as the API spells it.
pub fn parse_role(raw: &str) -> Result<Role, AppError> {
    Role::parse(raw)
        .ok_or_else(|| AppError::invalid("role", "The role must be customer, host_owner or admin."))
}

/// A page of the admin's user search, for the page and the API alike.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserSearch {
    #[serde(default)]
    pub q: String,
    #[serde(default = "first_page")]
    pub page: u64,
    #[serde(default = "default_per_page")]
    pub per_page: u64,
}

fn first_page() -> u64 {
    1
}
fn default_per_page() -> u64 {
    25
}

impl UserSearch {
    pub fn checked(&self) -> Result<(u64, u64), AppError> {
        if self.page == 0 {
            return Err(AppError::invalid("page", "Pages start at 1."));
        }
        if !(1..=200).contains(&self.per_page) {
            return Err(AppError::invalid(
                "per_page",
                "Show between 1 and 200 users a page.",
            ));
        }
        Ok(((self.page - 1).saturating_mul(self.per_page), self.per_page))
    }
}

/// Only same-origin relative paths are followed after login.
pub fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(path)
            if path.starts_with('/')
                && !path.starts_with("//")
                && !path.starts_with("/\\")
                && !path.chars().any(|c| c.is_control() || c == '\\') =>
        {
            path.to_owned()
        }
        _ => "/projects".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_only_follows_relative_paths_on_this_origin() {
        assert_eq!(safe_next(Some("/projects/3")), "/projects/3");
        for bad in [
            "//evil.example",
            "https://evil.example",
            "/\\evil.example",
            "evil",
            "/a\r\nb",
            "\\\\evil",
        ] {
            assert_eq!(safe_next(Some(bad)), "/projects", "{bad:?}");
        }
        assert_eq!(safe_next(None), "/projects");
    }
}
