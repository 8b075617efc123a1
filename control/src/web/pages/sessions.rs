//! A user's own session from the platform side: entering it (the page the
//! gateway sends a browser without a session cookie to), waiting for it in
//! the queue, and stopping it (or leaving the queue).

use askama::Template;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Redirect};
use axum::routing::{get, post};
use axum::Router;

use crate::app::App;
use crate::error::AppError;
use crate::sessions::ending;
use crate::sessions::queue::{self, Stopped, Waiting};
use crate::sessions::{self, Session};
use crate::web::auth::Ctx;
use crate::web::errors::PageResult;
use crate::web::layout::{self, Layout};
use crate::web::render::{ok, render, see_other};

pub fn routes() -> Router<App> {
    Router::new()
        .route("/sessions/{sid}/stop", post(stop_session))
        .route("/sessions/{sid}/save", post(save_session))
        .route("/sessions/{sid}/enter", get(enter_session))
        .route("/sessions/{sid}/waiting", get(waiting_page))
        .route("/static/queue.js", get(queue_script))
}

#[derive(Template)]
#[template(path = "waiting.html")]
struct WaitingPage {
    layout: Layout,
    waiting: Waiting,
    project_name: String,
}

impl WaitingPage {
    fn position(&self) -> Option<u64> {
        self.waiting.spot.map(|s| s.position)
    }

    fn wait_text(&self) -> String {
        self.waiting.spot.map(|s| s.wait_text()).unwrap_or_default()
    }

    fn left_text(&self) -> Option<&'static str> {
        self.waiting.left.map(queue::Exit::explanation)
    }
}

/// Where an open waits for a host: its place in line and the expected wait,
/// kept up to date by `queue.js` (or a refresh without JavaScript), and
/// Lab as soon as it has a place.
async fn waiting_page(State(app): State<App>, ctx: Ctx, Path(sid): Path<String>) -> PageResult {
    let (user, _) = ctx.require_user()?;
    let Some(waiting) = queue::get_owned(&app.pool, user.id, &sid).await? else {
        return Err(AppError::NotFound("session").into());
    };
    if waiting.left == Some(queue::Exit::Placed) {
        return see_other(&format!("/sessions/{sid}/enter"));
    }
    let project_name = crate::projects::get(&app.pool, user.id, waiting.project_id)
        .await
        .map(|p| p.name)
        .unwrap_or_default();
    ok(WaitingPage {
        layout: ctx.layout(),
        waiting,
        project_name,
    })
}

async fn queue_script() -> impl IntoResponse {
    layout::script(include_str!("../../../static/queue.js"))
}

#[derive(Template)]
#[template(path = "session_ended.html")]
struct SessionEndedPage {
    layout: Layout,
    session: Session,
    explanation: String,
}

/// Where the gateway sends a browser without a session cookie: a live
/// session answers with a redirect to its origin carrying a fresh ticket;
/// an ended one with a page that says so. Logged-out browsers are sent to
/// log in first (the 401 becomes a redirect in `platform_context`).
async fn enter_session(State(app): State<App>, ctx: Ctx, Path(sid): Path<String>) -> PageResult {
    let (user, _) = ctx.require_user()?;
    let session = match sessions::get_owned(&app.pool, user.id, &sid).await {
        Err(AppError::NotFound(_))
            if queue::get_owned(&app.pool, user.id, &sid).await?.is_some() =>
        {
            return see_other(&format!("/sessions/{sid}/waiting"));
        }
        other => other?,
    };
    if !session.is_live() {
        let explanation = session.end_explanation();
        return render(
            StatusCode::GONE,
            SessionEndedPage {
                layout: ctx.layout(),
                session,
                explanation,
            },
        );
    }
    let url = ctx.enter_url(&app, &session.sid)?;
    Ok(([(header::CACHE_CONTROL, "no-store")], Redirect::to(&url)).into_response())
}

/// "Save now": the agent pushes the files in a moment; back to the list.
async fn save_session(State(app): State<App>, ctx: Ctx, Path(sid): Path<String>) -> PageResult {
    let (user, _) = ctx.require_user()?;
    let project_id = ending::save_now(&app.pool, &app.wakeups, user.id, &sid).await?;
    // The project's page lists the versions: the new one shows up there.
    see_other(&format!("/projects/{project_id}?saving=1#files"))
}

/// Stop, or for an open still in the queue: leave the queue.
async fn stop_session(State(app): State<App>, ctx: Ctx, Path(sid): Path<String>) -> PageResult {
    let (user, _) = ctx.require_user()?;
    match queue::leave_or_stop(&app.pool, &app.wakeups, user.id, &sid).await? {
        Stopped::LeftQueue => see_other(&format!("/sessions/{sid}/waiting")),
        Stopped::Session(_) => see_other("/projects"),
    }
}
