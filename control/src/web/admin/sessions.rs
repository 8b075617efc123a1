//! Admin: Session data, every session with filters and keyset pages, its
//! CSV export, and stopping a live session. Handlers parse the query or
//! form and render; `sessions::data` and `sessions::ending` do the work.

use askama::Template;
use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;
use futures_util::StreamExt;
use serde::Deserialize;

use super::numbers::{human_bytes, human_duration};
use crate::app::App;
use crate::error::AppError;
use crate::sessions::data::{self, Filter, Row};
use crate::sessions::ending;
use crate::sessions::explain_end;
use crate::sessions::state::{self, Phase};
use crate::web::auth::Ctx;
use crate::web::errors::{FormError, PageResult};
use crate::web::extract::{safe_next, PageForm};
use crate::web::layout::Layout;
use crate::web::render::{render, see_other};

pub fn routes() -> Router<App> {
    Router::new()
        .route("/admin/sessions", get(sessions_page))
        .route("/admin/sessions.csv", get(sessions_csv))
        .route("/admin/sessions/{sid}/stop", post(stop_session))
}

/// The fields the filter form shows; errors about any other parameter
/// (`after`, `per_page`) are shown above the form.
const FORM_FIELDS: [&str; 6] = ["user", "project", "host", "state", "from", "to"];

/// Reads the filter from the query string. Unknown parameters are ignored
/// (an old bookmark still works); a `per_page` that is not a number is
/// reported, with the rest of the filter kept for the form.
fn filter_from_query(raw: Option<&str>) -> (Filter, Option<AppError>) {
    let pairs: Vec<(String, String)> = match serde_urlencoded::from_str(raw.unwrap_or("")) {
        Ok(pairs) => pairs,
        Err(_) => {
            let error = AppError::BadRequest("This address's filters cannot be read.".into());
            return (Filter::default(), Some(error));
        }
    };
    let mut filter = Filter::default();
    let mut error = None;
    for (key, value) in pairs {
        match key.as_str() {
            "user" => filter.user = value,
            "project" => filter.project = value,
            "host" => filter.host = value,
            "state" => filter.state = value,
            "from" => filter.from = value,
            "to" => filter.to = value,
            "after" => filter.after = value,
            "per_page" if !value.trim().is_empty() => match value.trim().parse() {
                Ok(n) => filter.per_page = Some(n),
                Err(_) => {
                    error = Some(AppError::invalid(
                        "per_page",
                        format!("Show between 1 and {} sessions a page.", data::MAX_PER_PAGE),
                    ))
                }
            },
            _ => {}
        }
    }
    (filter, error)
}

/// The filter as a query string (`user=…&state=…`), with the page size and
/// cursor when asked for.
fn filter_query(filter: &Filter, per_page: bool, after: Option<&str>) -> String {
    let mut pairs: Vec<(&str, String)> = [
        ("user", &filter.user),
        ("project", &filter.project),
        ("host", &filter.host),
        ("state", &filter.state),
        ("from", &filter.from),
        ("to", &filter.to),
    ]
    .into_iter()
    .filter(|(_, v)| !v.trim().is_empty())
    .map(|(k, v)| (k, v.trim().to_owned()))
    .collect();
    if let Some(n) = filter.per_page.filter(|_| per_page) {
        pairs.push(("per_page", n.to_string()));
    }
    if let Some(after) = after.filter(|a| !a.is_empty()) {
        pairs.push(("after", after.to_owned()));
    }
    serde_urlencoded::to_string(&pairs).unwrap_or_default()
}

fn with_query(path: &str, query: String) -> String {
    if query.is_empty() {
        path.to_owned()
    } else {
        format!("{path}?{query}")
    }
}

/// A session row with its numbers in words.
struct SessionLine {
    row: Row,
    duration: String,
    bytes_in: String,
    bytes_out: String,
    /// What the end reason means, for the cell's tooltip.
    explanation: String,
    /// Starting or running: an admin can stop it.
    live: bool,
}

impl From<Row> for SessionLine {
    fn from(row: Row) -> Self {
        let explanation = match &row.end_reason {
            Some(reason) => explain_end(state::route_state(&row.state), Some(reason.as_str())),
            None => String::new(),
        };
        Self {
            duration: human_duration(row.duration_seconds),
            bytes_in: human_bytes(row.bytes_in),
            bytes_out: human_bytes(row.bytes_out),
            explanation,
            live: Phase::from_column(&row.state).is_some_and(Phase::is_enterable),
            row,
        }
    }
}

#[derive(Template)]
#[template(path = "admin_sessions.html")]
struct SessionsPage {
    layout: Layout,
    filter: Filter,
    /// (state, selected) for the select.
    states: Vec<(&'static str, bool)>,
    sessions: Vec<SessionLine>,
    error: FormError,
    /// The filter was refused, so no rows are shown.
    failed: bool,
    next_link: Option<String>,
    first_link: Option<String>,
    csv_link: String,
    /// This page, for the stop forms to come back to.
    here: String,
}

impl SessionsPage {
    fn new(layout: Layout, filter: Filter) -> Self {
        // In the order a session goes through them.
        let states = Phase::ALL
            .iter()
            .map(|p| (p.as_column(), filter.state.trim() == p.as_column()))
            .collect();
        let csv_link = with_query("/admin/sessions.csv", filter_query(&filter, false, None));
        let here = with_query(
            "/admin/sessions",
            filter_query(&filter, true, Some(&filter.after)),
        );
        let first_link = (!filter.after.trim().is_empty())
            .then(|| with_query("/admin/sessions", filter_query(&filter, true, None)));
        Self {
            layout,
            filter,
            states,
            sessions: Vec::new(),
            error: FormError::none(),
            failed: false,
            next_link: None,
            first_link,
            csv_link,
            here,
        }
    }

    /// `date` for the day fields, `text` when the value was refused, so
    /// the browser shows what it cannot read as a date.
    fn input_type(&self, field: &str) -> &'static str {
        if self.error.on(field).is_some() {
            "text"
        } else {
            "date"
        }
    }

    /// Shows `e` next to its field, or above the form when the form has no
    /// such field.
    fn with_error(mut self, e: &AppError) -> Self {
        self.failed = true;
        self.error = match e.field() {
            Some(field) if FORM_FIELDS.contains(&field) => FormError::from(e),
            _ => FormError::from(&AppError::Invalid {
                field: None,
                message: e.to_string(),
            }),
        };
        self
    }
}

async fn sessions_page(State(app): State<App>, ctx: Ctx, RawQuery(raw): RawQuery) -> PageResult {
    ctx.require_admin()?;
    let (filter, error) = filter_from_query(raw.as_deref());
    let mut page = SessionsPage::new(ctx.layout(), filter);
    if let Some(e) = error {
        return render(e.status(), page.with_error(&e));
    }
    match data::page(&app.pool, &page.filter).await {
        Ok(found) => {
            page.next_link = found.next.map(|after| {
                with_query(
                    "/admin/sessions",
                    filter_query(&page.filter, true, Some(&after)),
                )
            });
            page.sessions = found.sessions.into_iter().map(SessionLine::from).collect();
            render(StatusCode::OK, page)
        }
        Err(e @ AppError::Invalid { .. }) => render(e.status(), page.with_error(&e)),
        Err(e) => Err(e.into()),
    }
}

/// Every session the filter matches, as CSV, streamed batch by batch so a
/// million rows never sit in memory. The filter is checked before the
/// first byte; a database error later cuts the download off (the client
/// sees an incomplete transfer, not a file that looks whole).
async fn sessions_csv(State(app): State<App>, ctx: Ctx, RawQuery(raw): RawQuery) -> PageResult {
    let admin = ctx.require_admin()?;
    let (filter, error) = filter_from_query(raw.as_deref());
    if let Some(e) = error {
        return Err(e.into());
    }
    data::check(&filter).map_err(named_field)?;
    tracing::info!(admin = admin.id, "session data exported as CSV");
    let pool = app.pool.clone();
    let batches = futures_util::stream::unfold(Some(filter), move |state| {
        let pool = pool.clone();
        async move {
            let filter = state?;
            match data::csv_batch(&pool, &filter).await {
                Ok((text, next)) => {
                    let following = next.map(|after| Filter { after, ..filter });
                    Some((Ok(Bytes::from(text)), following))
                }
                Err(e) => {
                    tracing::error!(error = %e, "CSV export cut off");
                    Some((Err(std::io::Error::other(e.to_string())), None))
                }
            }
        }
    });
    let header_line = futures_util::stream::once(async {
        Ok::<_, std::io::Error>(Bytes::from_static(data::CSV_HEADER.as_bytes()))
    });
    let body = Body::from_stream(header_line.chain(batches));
    Ok((
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8"),
            (
                header::CONTENT_DISPOSITION,
                "attachment; filename=\"sessions.csv\"",
            ),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response())
}

/// On a page without the form, an error must say which filter it is about.
fn named_field(e: AppError) -> AppError {
    match e {
        AppError::Invalid {
            field: Some(field),
            message,
        } => AppError::Invalid {
            field: Some(field),
            message: format!("The “{field}” filter: {}", lower_first(&message)),
        },
        other => other,
    }
}

fn lower_first(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

#[derive(Deserialize)]
struct StopForm {
    /// The Session data page to return to, with its filters.
    #[serde(default)]
    back: String,
}

async fn stop_session(
    State(app): State<App>,
    ctx: Ctx,
    Path(sid): Path<String>,
    PageForm(form): PageForm<StopForm>,
) -> PageResult {
    let admin = ctx.require_admin()?;
    let state = ending::stop_as_admin(&app.pool, &app.wakeups, &sid).await?;
    tracing::info!(
        sid,
        admin = admin.id,
        state,
        "session stopped by an administrator"
    );
    let back = form.back;
    let back = if back == "/admin/sessions" || back.starts_with("/admin/sessions?") {
        safe_next(Some(&back))
    } else {
        "/admin/sessions".to_owned()
    };
    see_other(&back)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_survive_the_round_trip_through_links() {
        let (filter, error) = filter_from_query(Some(
            "user=a%2Bb%40example.com&state=lost&from=2026-01-02&per_page=20&after=123.abc&junk=1",
        ));
        assert!(error.is_none());
        assert_eq!(filter.user, "a+b@example.com");
        assert_eq!(filter.per_page, Some(20));
        let next = filter_query(&filter, true, Some("456.def"));
        assert_eq!(
            next,
            "user=a%2Bb%40example.com&state=lost&from=2026-01-02&per_page=20&after=456.def"
        );
        let (again, _) = filter_from_query(Some(&next));
        assert_eq!((again.user, again.after), (filter.user, "456.def".into()));
        assert_eq!(
            filter_query(&Filter::default(), true, None),
            "",
            "no filter, no query"
        );
    }

    #[test]
    fn a_page_size_that_is_no_number_is_named() {
        let (filter, error) = filter_from_query(Some("state=running&per_page=lots"));
        assert_eq!(filter.state, "running", "the rest of the filter is kept");
        assert_eq!(error.unwrap().field(), Some("per_page"));
    }
}
