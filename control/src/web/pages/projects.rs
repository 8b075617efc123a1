//! My projects: the list, creating, editing and deleting a project, and
//! Open, which places (or finds) its session and goes to it; on a
//! project's page its files: download, upload a zip, versions, restore.

use askama::Template;
use axum::extract::{DefaultBodyLimit, Multipart, Path, Query, State};
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
use crate::sessions::queue::{self, QueueSpot};
use crate::snapshots::files;
use crate::snapshots::versions::Listed;
use crate::web::api::zip_response;
use crate::web::auth::Ctx;
use crate::web::csrf;
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
        .route("/projects/{id}/files/download", get(download_files))
        // Spooled to disk; the owner's quota bounds it instead.
        .route(
            "/projects/{id}/files/upload",
            post(upload_files).layer(DefaultBodyLimit::disable()),
        )
        .route("/projects/{id}/files/{n}/restore", post(restore_files))
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
    /// Opens waiting in the queue: project, session id, place.
    waiting: Vec<(u64, String, QueueSpot)>,
}

impl ProjectsPage {
    /// The project's open waiting in the queue, if any.
    fn waiting_for(&self, project_id: &u64) -> Option<(&str, &QueueSpot)> {
        self.waiting
            .iter()
            .find(|(id, ..)| id == project_id)
            .map(|(_, sid, spot)| (sid.as_str(), spot))
    }

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
            waiting: queue::waiting_of_user(&app.pool, user_id).await?,
        })
    }

    /// While a session starts or stops, or an open waits, the page
    /// refreshes itself.
    fn changing(&self) -> bool {
        !self.waiting.is_empty()
            || self.projects.iter().any(|p| {
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
/// gateway shows a "starting" page there until Jupyter is ready. An open
/// that has to wait goes to its page in the queue.
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
        Ok(opened) if opened.queue.is_some() => {
            see_other(&format!("/sessions/{}/waiting", opened.session_id))
        }
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
    versions: Vec<VersionView>,
    /// Why the last upload or restore stored nothing.
    files_error: Option<String>,
    files_notice: Option<String>,
}

/// A version as the Files panel shows it.
struct VersionView {
    version: u64,
    size: String,
    reason: String,
    created: String,
    damaged: bool,
    latest: bool,
}

fn size_text(bytes: u64) -> String {
    match bytes {
        b if b < 1 << 10 => format!("{b} B"),
        b if b < 1 << 20 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{:.1} MiB", b as f64 / (1 << 20) as f64),
    }
}

fn time_text(unix: u64) -> String {
    let format = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute] UTC");
    i64::try_from(unix)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .and_then(|t| t.format(&format).ok())
        .unwrap_or_default()
}

fn version_views(list: Vec<Listed>) -> Vec<VersionView> {
    let latest = list.iter().find(|v| !v.damaged).map(|v| v.version);
    list.into_iter()
        .map(|v| VersionView {
            version: v.version,
            size: size_text(v.size_bytes),
            reason: v.reason,
            created: time_text(v.created_at),
            damaged: v.damaged,
            latest: Some(v.version) == latest,
        })
        .collect()
}

impl ProjectPage {
    async fn of(app: &App, ctx: &Ctx, user_id: u64, id: u64) -> Result<Self, AppError> {
        let project = projects::get(&app.pool, user_id, id).await?;
        Ok(Self {
            layout: ctx.layout(),
            name: project.name.clone(),
            description: project.description.clone(),
            project,
            error: FormError::none(),
            notice: None,
            balance_warning: warning(app, user_id).await?,
            versions: version_views(files::list(&app.pool, user_id, id).await?),
            files_error: None,
            files_notice: None,
        })
    }
}

#[derive(Deserialize)]
struct SavedQuery {
    saved: Option<String>,
    /// The version a finished upload or restore stored.
    stored: Option<u64>,
    /// Save now was asked for the project's running session.
    saving: Option<String>,
}

async fn project_page(
    State(app): State<App>,
    ctx: Ctx,
    Path(id): Path<String>,
    Query(query): Query<SavedQuery>,
) -> PageResult {
    let (user, _) = ctx.require_user()?;
    let id = parse_id(&id, "project")?;
    ok(ProjectPage {
        notice: query.saved.map(|_| "Saved."),
        files_notice: match (query.stored, query.saving) {
            (Some(n), _) => Some(format!(
                "Stored as version {n}; it is what the project opens with next."
            )),
            (None, Some(_)) => Some(
                "Saving the running session's files now: the new version appears below within \
                 seconds (reload the page to see it)."
                    .into(),
            ),
            (None, None) => None,
        },
        ..ProjectPage::of(&app, &ctx, user.id, id).await?
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
                error: FormError::from(&e),
                name: form.name,
                description: form.description,
                ..ProjectPage::of(&app, &ctx, user.id, id).await?
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

#[derive(Deserialize)]
struct DownloadQuery {
    version: Option<u64>,
}

async fn download_files(
    State(app): State<App>,
    ctx: Ctx,
    Path(id): Path<String>,
    Query(query): Query<DownloadQuery>,
) -> PageResult {
    let (user, _) = ctx.require_user()?;
    let id = parse_id(&id, "project")?;
    let download = files::download(&app.pool, &app.store, user.id, id, query.version).await?;
    Ok(zip_response(download))
}

/// The outcome of an upload or restore: back to the page with the new
/// version, or the page again with why nothing was stored.
async fn files_outcome(
    app: &App,
    ctx: &Ctx,
    user_id: u64,
    id: u64,
    result: Result<u64, AppError>,
) -> PageResult {
    match result {
        Ok(version) => see_other(&format!("/projects/{id}?stored={version}")),
        Err(
            e @ (AppError::Invalid { .. }
            | AppError::QuotaExceeded(_)
            | AppError::Conflict { .. }
            | AppError::BadRequest(_)
            | AppError::NotFound("version")),
        ) => render(
            e.status(),
            ProjectPage {
                files_error: Some(e.to_string()),
                ..ProjectPage::of(app, ctx, user_id, id).await?
            },
        ),
        Err(e) => Err(e.into()),
    }
}

/// The upload form: `csrf` first (checked before any file byte is read),
/// then the `zip` file.
async fn upload_files(
    State(app): State<App>,
    ctx: Ctx,
    Path(id): Path<String>,
    mut form: Multipart,
) -> PageResult {
    let (user, _) = ctx.require_user()?;
    let id = parse_id(&id, "project")?;
    let bad_form = |e: axum::extract::multipart::MultipartError| {
        AppError::BadRequest(format!("The upload form could not be read ({e})."))
    };
    let first = form.next_field().await.map_err(bad_form)?;
    let sent = match first {
        Some(field) if field.name() == Some("csrf") => field.text().await.map_err(bad_form)?,
        _ => String::new(),
    };
    if !csrf::token_matches(&sent, &ctx.csrf) {
        return Err(csrf::expired_form().into());
    }
    let quota_bytes = files::quota(&app.pool, user.id, &app.config.billing.trial).await?;
    let up = files::Upload {
        user: user.id,
        project_id: id,
        quota_bytes,
        declared_len: None,
        policy: &app.config.store,
    };
    let result = match form.next_field().await.map_err(bad_form)? {
        Some(field) if field.name() == Some("zip") => {
            files::upload(&app.pool, &app.store, &up, field).await
        }
        _ => Err(AppError::invalid("zip", "Choose a zip file to upload.")),
    };
    files_outcome(&app, &ctx, user.id, id, result).await
}

async fn restore_files(
    State(app): State<App>,
    ctx: Ctx,
    Path((id, n)): Path<(String, String)>,
) -> PageResult {
    let (user, _) = ctx.require_user()?;
    let id = parse_id(&id, "project")?;
    let result = files::restore(
        &app.pool,
        &app.store,
        &app.config.store,
        &app.config.billing.trial,
        user.id,
        id,
        parse_id(&n, "version")?,
    )
    .await;
    files_outcome(&app, &ctx, user.id, id, result).await
}
