//! The page layout every page shares (who is logged in, the logout form's
//! CSRF token), the stylesheet it links to, and escaping for the links
//! pages build.

use axum::http::header;
use axum::response::IntoResponse;

use crate::accounts::User;

/// What the shared page layout shows: who is logged in, the logout form's
/// CSRF token.
#[derive(Clone, Debug, Default)]
pub struct Layout {
    pub user: Option<User>,
    pub csrf: String,
}

impl Layout {
    pub fn anonymous() -> Self {
        Self::default()
    }

    pub fn is_admin(&self) -> bool {
        self.user.as_ref().is_some_and(User::is_admin)
    }
}

/// `s` escaped for a query string value.
/// The pager links of a newest-first list at `base`: back to the newest
/// page when showing older ones (`before` is set), and on to the older
/// items when there are more (`next_before`).
pub fn pager_links(
    base: &str,
    before: Option<u64>,
    next_before: Option<u64>,
) -> (Option<String>, Option<String>) {
    (
        before.map(|_| base.to_owned()),
        next_before.map(|b| format!("{base}?before={b}")),
    )
}

pub fn urlencode(s: &str) -> String {
    serde_urlencoded::to_string([("v", s)])
        .map(|pair| pair[2..].to_owned())
        .unwrap_or_default()
}

/// One of our own scripts, served like the stylesheet.
pub fn script(source: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        source,
    )
}

pub async fn stylesheet() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        include_str!("../../static/style.css"),
    )
}
