//! Answering with a page: a template rendered with a status, or, after a
//! successful form, a redirect.

use askama::Template;
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Redirect};

use super::errors::PageResult;

pub fn render(status: StatusCode, page: impl Template) -> PageResult {
    Ok((status, Html(page.render()?)).into_response())
}

pub fn ok(page: impl Template) -> PageResult {
    render(StatusCode::OK, page)
}

/// After a successful POST: go elsewhere so a reload does not resubmit.
pub fn see_other(to: &str) -> PageResult {
    Ok(Redirect::to(to).into_response())
}
