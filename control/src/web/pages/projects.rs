//! My projects: the list, creating, editing and deleting a project, and
//! Open, which places (or finds) its session and goes to it.

use askama::Template;
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Redirect};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;

use crate::app::App;
use crate::billing::ledger;
use crate::error::AppError;
use crate::projects::{self, Project};
use crate::sessions::placement;
use crate::web::auth::Ctx;
use crate::web::errors::{FormError, PageResult};
use crate::web::extract::{parse_id, PageForm};
use crate::web::layout::Layout;
use crate::web::render::{ok, render, see_other};

pub fn routes() -> Router<App> {
    Router::new()
        .route("/projects", get(projects_page).post(create_project))
        .route("/projects/{id}", get(project_page).post(update_project))
        .route("/projects/{id}/delete", post(delete_project))
        .route("/projects/{id}/open", post(open_project))
}

#[derive(Template)]
#[template(path = "projects.html")]
struct ProjectsPage {
    layout: Layout,
    projects: Vec<Project>,
    error: FormError,
    name: String,
    description: String,
    /// Why the last Open did not work (no host with room, …).
    open_error: Option<String>,
    /// The refusal is about compute time or package limits: link Packages.
    open_buy_link: bool,
    /// The balance runs out soon.
    balance_warning: Option<String>,
}

impl ProjectsPage {
    /// The user's projects with an empty form and no error.
    async fn of(app: &App, ctx: &Ctx, user_id: u64) -> Result<Self, AppError> {
        Ok(Self {
            projects: projects::list(&app.pool, user_id).await?,
            layout: ctx.layout(),
            error: FormError::none(),
            name: String::new(),
            description: String::new(),
            open_error: None,
            open_buy_link: false,
            balance_warning: warning(app, user_id).await?,
        })
    }

    /// While a session starts or stops the page refreshes itself.
    fn changing(&self) -> bool {
        self.projects.iter().any(|p| {
            p.session
                .as_ref()
                .is_some_and(projects::LatestSession::changing)
        })
    }
}

/// The warning shown while the owner's balance is about to run out.
async fn warning(app: &App, user_id: u64) -> Result<Option<String>, AppError> {
    ledger::runs_out_warning(&app.pool, user_id, app.config.billing.warning_seconds).await
}

async fn projects_page(State(app): State<App>, ctx: Ctx) -> PageResult {
    let (user, _) = ctx.require_user()?;
    ok(ProjectsPage::of(&app, &ctx, user.id).await?)
}

/// Open: place (or find) the session and go straight to its origin; the
/// gateway shows a "starting" page there until Jupyter is ready.
async fn open_project(State(app): State<App>, ctx: Ctx, Path(id): Path<String>) -> PageResult {
    let (user, _) = ctx.require_user()?;
    let id = parse_id(&id, "project")?;
    match placement::open(
        &app.pool,
        &app.wakeups,
        app.config.billing.host_share_percent,
        user.id,
        id,
    )
    .await
    {
        Ok(opened) => {
            let url = ctx.enter_url(&app, &opened.session_id)?;
            Ok(([(header::CACHE_CONTROL, "no-store")], Redirect::to(&url)).into_response())
        }
        Err(
            e @ (AppError::NoCapacity(_)
            | AppError::Conflict { .. }
            | AppError::PaymentRequired(_)
            | AppError::LimitReached(_)),
        ) => render(
            e.status(),
            ProjectsPage {
                open_buy_link: matches!(
                    e,
                    AppError::PaymentRequired(_) | AppError::LimitReached(_)
                ),
                open_error: Some(e.to_string()),
                ..ProjectsPage::of(&app, &ctx, user.id).await?
            },
        ),
        Err(e) => Err(e.into()),
    }
}

#[derive(Deserialize)]
struct ProjectForm {
    name: String,
    #[serde(default)]
    description: String,
}

async fn create_project(
    State(app): State<App>,
    ctx: Ctx,
    PageForm(form): PageForm<ProjectForm>,
) -> PageResult {
    let (user, _) = ctx.require_user()?;
    match projects::create(&app.pool, user.id, &form.name, &form.description).await {
        Ok(_) => see_other("/projects"),
        Err(e @ (AppError::Invalid { .. } | AppError::Conflict { .. })) => render(
            e.status(),
            ProjectsPage {
                error: FormError::from(&e),
                name: form.name,
                description: form.description,
                ..ProjectsPage::of(&app, &ctx, user.id).await?
            },
        ),
        Err(e) => Err(e.into()),
    }
}

#[derive(Template)]
#[template(path = "project.html")]
struct ProjectPage {
    layout: Layout,
    project: Project,
    error: FormError,
    name: String,
    description: String,
    notice: Option<&'static str>,
    /// The balance runs out soon.
    balance_warning: Option<String>,
}

#[derive(Deserialize)]
struct SavedQuery {
    saved: Option<String>,
}

async fn project_page(
    State(app): State<App>,
    ctx: Ctx,
    Path(id): Path<String>,
    Query(query): Query<SavedQuery>,
) -> PageResult {
    let (user, _) = ctx.require_user()?;
    let project = projects::get(&app.pool, user.id, parse_id(&id, "project")?).await?;
    ok(ProjectPage {
        layout: ctx.layout(),
        name: project.name.clone(),
        description: project.description.clone(),
        project,
        error: FormError::none(),
        notice: query.saved.map(|_| "Saved."),
        balance_warning: warning(&app, user.id).await?,
    })
}

async fn update_project(
    State(app): State<App>,
    ctx: Ctx,
    Path(id): Path<String>,
    PageForm(form): PageForm<ProjectForm>,
) -> PageResult {
    let (user, _) = ctx.require_user()?;
    let id = parse_id(&id, "project")?;
    match projects::update(
        &app.pool,
        user.id,
        id,
        Some(&form.name),
        Some(&form.description),
    )
    .await
    {
        Ok(_) => see_other(&format!("/projects/{id}?saved=1")),
        Err(e @ AppError::Invalid { .. }) => render(
            e.status(),
            ProjectPage {
                layout: ctx.layout(),
                project: projects::get(&app.pool, user.id, id).await?,
                error: FormError::from(&e),
                name: form.name,
                description: form.description,
                notice: None,
                balance_warning: warning(&app, user.id).await?,
            },
        ),
        Err(e) => Err(e.into()),
    }
}

async fn delete_project(State(app): State<App>, ctx: Ctx, Path(id): Path<String>) -> PageResult {
    let (user, _) = ctx.require_user()?;
    let id = parse_id(&id, "project")?;
    projects::delete(&app.pool, &app.wakeups, user.id, id).await?;
    see_other("/projects")
}
