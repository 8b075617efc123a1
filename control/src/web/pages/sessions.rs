//! A user's own session from the platform side: entering it (the page the
//! gateway sends a browser without a session cookie to) and stopping it.

use askama::Template;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Redirect};
use axum::routing::{get, post};
use axum::Router;

use crate::app::App;
use crate::sessions::ending;
use crate::sessions::{self, Session};
use crate::web::auth::Ctx;
use crate::web::errors::PageResult;
use crate::web::layout::Layout;
use crate::web::render::{render, see_other};

pub fn routes() -> Router<App> {
    Router::new()
        .route("/sessions/{sid}/stop", post(stop_session))
        .route("/sessions/{sid}/save", post(save_session))
        .route("/sessions/{sid}/enter", get(enter_session))
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
    let session = sessions::get_owned(&app.pool, user.id, &sid).await?;
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

async fn stop_session(State(app): State<App>, ctx: Ctx, Path(sid): Path<String>) -> PageResult {
    let (user, _) = ctx.require_user()?;
    ending::stop_own(&app.pool, &app.wakeups, user.id, &sid).await?;
    see_other("/projects")
}
