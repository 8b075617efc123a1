//! Server-rendered pages. Every form works without JavaScript; errors are
//! shown next to the field, with what the user typed kept (except passwords).

use askama::Template;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;

use super::api::{parse_id, UserSearch};
use super::{safe_next, BeforeQuery, Ctx, FormError, Layout, PageForm, PageQuery};
use crate::accounts::{self, LoginAttempt, NewUser, Role, User};
use crate::error::{AppError, PageError};
use crate::hosts::{self, HostView};
use crate::packages::{self, Package, PackageInput};
use crate::projects::{self, Project};
use crate::sessions::{self, ending, placement, Session};
use crate::App;

pub fn routes() -> Router<App> {
    Router::new()
        .route("/", get(home))
        .route("/packages", get(packages_page))
        .route("/register", get(register_form).post(register))
        .route("/login", get(login_form).post(login))
        .route("/logout", post(logout))
        .route("/projects", get(projects_page).post(create_project))
        .route("/projects/{id}", get(project_page).post(update_project))
        .route("/projects/{id}/delete", post(delete_project))
        .route("/projects/{id}/open", post(open_project))
        .route("/sessions/{sid}/stop", post(stop_session))
        .route("/hosts", get(hosts_page).post(create_host))
        .route("/hosts/{id}/key", post(rotate_host_key))
        .route("/hosts/{id}/revoke", post(revoke_host_key))
        .route("/hosts/{id}/drain", post(drain_host))
        .route("/sessions/{sid}/enter", get(enter_session))
        .route("/account", get(account_page))
        .route("/account/password", post(change_password))
        .route("/admin", get(|| async { Redirect::to("/admin/users") }))
        .route("/admin/users", get(admin_users))
        .route("/admin/users/{id}", post(admin_update_user))
        .route(
            "/admin/packages",
            get(admin_packages).post(admin_create_package),
        )
        .route(
            "/admin/packages/{id}",
            get(admin_package).post(admin_update_package),
        )
}

pub(super) type PageResult = Result<Response, PageError>;

pub(super) fn render(status: StatusCode, page: impl Template) -> PageResult {
    Ok((status, Html(page.render()?)).into_response())
}

pub(super) fn ok(page: impl Template) -> PageResult {
    render(StatusCode::OK, page)
}

/// After a successful POST: go elsewhere so a reload does not resubmit.
pub(super) fn see_other(to: &str) -> PageResult {
    Ok(Redirect::to(to).into_response())
}

// ----- public pages -----

#[derive(Template)]
#[template(path = "home.html")]
struct HomePage {
    layout: Layout,
    packages: Vec<Package>,
}

async fn home(State(app): State<App>, ctx: Ctx) -> PageResult {
    let mut list = packages::list(&app.pool, false).await?;
    list.truncate(3);
    ok(HomePage {
        layout: ctx.layout(),
        packages: list,
    })
}

#[derive(Template)]
#[template(path = "packages.html")]
struct PackagesPage {
    layout: Layout,
    packages: Vec<Package>,
}

async fn packages_page(State(app): State<App>, ctx: Ctx) -> PageResult {
    ok(PackagesPage {
        layout: ctx.layout(),
        packages: packages::list(&app.pool, false).await?,
    })
}

// ----- registration and login -----

#[derive(Template)]
#[template(path = "register.html")]
struct RegisterPage {
    layout: Layout,
    error: FormError,
    name: String,
    email: String,
    role: String,
}

async fn register_form(ctx: Ctx) -> PageResult {
    if ctx.user.is_some() {
        return see_other("/projects");
    }
    ok(RegisterPage {
        layout: ctx.layout(),
        error: FormError::none(),
        name: String::new(),
        email: String::new(),
        role: "customer".into(),
    })
}

#[derive(Deserialize)]
struct RegisterForm {
    name: String,
    email: String,
    password: String,
    #[serde(default)]
    role: String,
}

async fn register(
    State(app): State<App>,
    ctx: Ctx,
    PageForm(form): PageForm<RegisterForm>,
) -> PageResult {
    let role = match form.role.as_str() {
        "host_owner" => Role::HostOwner,
        _ => Role::Customer,
    };
    let result = accounts::register(
        &app.pool,
        &app.passwords,
        NewUser {
            email: form.email.clone(),
            name: form.name.clone(),
            password: form.password,
            role,
        },
    )
    .await;
    match result {
        Ok(user) => see_other(&format!(
            "/login?registered=1&email={}",
            urlencode(&user.email)
        )),
        Err(e) if e.field().is_some() => render(
            e.status(),
            RegisterPage {
                layout: ctx.layout(),
                error: FormError::from(&e),
                name: form.name,
                email: form.email,
                role: role.as_str().into(),
            },
        ),
        Err(e) => Err(e.into()),
    }
}

fn urlencode(s: &str) -> String {
    serde_urlencoded::to_string([("v", s)])
        .map(|pair| pair[2..].to_owned())
        .unwrap_or_default()
}

#[derive(Template)]
#[template(path = "login.html")]
struct LoginPage {
    layout: Layout,
    error: FormError,
    email: String,
    next: String,
    notice: Option<String>,
}

#[derive(Deserialize)]
struct LoginQuery {
    next: Option<String>,
    email: Option<String>,
    registered: Option<String>,
}

async fn login_form(ctx: Ctx, Query(query): Query<LoginQuery>) -> PageResult {
    let next = safe_next(query.next.as_deref());
    if ctx.user.is_some() {
        return see_other(&next);
    }
    ok(LoginPage {
        layout: ctx.layout(),
        error: FormError::none(),
        email: query.email.unwrap_or_default(),
        next,
        notice: query
            .registered
            .map(|_| "Your account is ready. Log in to start.".to_owned()),
    })
}

#[derive(Deserialize)]
struct LoginForm {
    email: String,
    password: String,
    #[serde(default)]
    next: Option<String>,
}

async fn login(
    State(app): State<App>,
    ctx: Ctx,
    PageForm(form): PageForm<LoginForm>,
) -> PageResult {
    let next = safe_next(form.next.as_deref());
    let result = accounts::login(
        &app.pool,
        &app.passwords,
        &app.config.login,
        LoginAttempt {
            email: &form.email,
            password: &form.password,
            client_ip: ctx.client_ip.to_string(),
            user_agent: &ctx.user_agent,
        },
    )
    .await;
    match result {
        Ok(logged_in) => {
            let token = super::platform_token(&app, logged_in.user.id, &logged_in.login_session);
            Ok((
                [(header::SET_COOKIE, super::session_cookie(&app, token))],
                Redirect::to(&next),
            )
                .into_response())
        }
        Err(
            e @ (AppError::Invalid { .. }
            | AppError::BadCredentials
            | AppError::Forbidden(_)
            | AppError::TooManyAttempts { .. }),
        ) => {
            let mut response = render(
                e.status(),
                LoginPage {
                    layout: ctx.layout(),
                    error: FormError::from(&e),
                    email: form.email,
                    next,
                    notice: None,
                },
            )?;
            if let AppError::TooManyAttempts { retry_after, .. } = e {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, retry_after.into());
            }
            Ok(response)
        }
        Err(e) => Err(e.into()),
    }
}

async fn logout(State(app): State<App>, ctx: Ctx) -> PageResult {
    if let Some(session) = &ctx.login_session {
        accounts::revoke_login_session(&app.pool, session, "logout").await?;
    }
    Ok((
        [(header::SET_COOKIE, super::clear_session_cookie(&app))],
        Redirect::to("/"),
    )
        .into_response())
}

// ----- projects -----

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
}

impl ProjectsPage {
    /// While a session starts or stops the page refreshes itself.
    fn changing(&self) -> bool {
        self.projects.iter().any(|p| {
            p.session
                .as_ref()
                .is_some_and(|s| matches!(s.state.as_str(), "starting" | "stopping"))
        })
    }
}

async fn projects_page(State(app): State<App>, ctx: Ctx) -> PageResult {
    let (user, _) = ctx.require_user()?;
    ok(ProjectsPage {
        projects: projects::list(&app.pool, user.id).await?,
        layout: ctx.layout(),
        error: FormError::none(),
        name: String::new(),
        description: String::new(),
        open_error: None,
    })
}

/// Open: place (or find) the session and go straight to its origin; the
/// gateway shows a "starting" page there until Jupyter is ready.
async fn open_project(State(app): State<App>, ctx: Ctx, Path(id): Path<String>) -> PageResult {
    let (user, login_session) = ctx.require_user()?;
    let id = parse_id(&id, "project")?;
    match placement::open(&app.pool, &app.wakeups, user.id, id).await {
        Ok(opened) => {
            let url = sessions::enter_url(
                &app.config,
                user.id,
                login_session,
                &opened.session_id,
                super::now_unix(),
            );
            Ok(([(header::CACHE_CONTROL, "no-store")], Redirect::to(&url)).into_response())
        }
        Err(e @ (AppError::NoCapacity(_) | AppError::Conflict { .. })) => render(
            e.status(),
            ProjectsPage {
                projects: projects::list(&app.pool, user.id).await?,
                layout: ctx.layout(),
                error: FormError::none(),
                name: String::new(),
                description: String::new(),
                open_error: Some(e.to_string()),
            },
        ),
        Err(e) => Err(e.into()),
    }
}

async fn stop_session(State(app): State<App>, ctx: Ctx, Path(sid): Path<String>) -> PageResult {
    let (user, _) = ctx.require_user()?;
    ending::stop(
        &app.pool,
        &app.wakeups,
        Some(user.id),
        &sid,
        "stopped_by_user",
    )
    .await?;
    see_other("/projects")
}

// ----- my hosts -----

#[derive(Template)]
#[template(path = "hosts.html")]
struct HostsPage {
    layout: Layout,
    hosts: Vec<HostView>,
    total: u64,
    first_link: Option<String>,
    next_link: Option<String>,
    error: FormError,
    name: String,
    /// A key just made: shown this once.
    new_key: Option<(String, String)>,
    control_url: String,
}

/// My hosts showing the page of hosts older than `before`.
async fn hosts_view(
    app: &App,
    ctx: &Ctx,
    owner: u64,
    error: FormError,
    name: String,
    new_key: Option<(String, String)>,
    before: Option<u64>,
) -> Result<HostsPage, AppError> {
    let page = hosts::list(&app.pool, Some(owner), before).await?;
    Ok(HostsPage {
        hosts: page.hosts,
        total: page.total,
        first_link: before.map(|_| "/hosts".to_owned()),
        next_link: page.next_before.map(|b| format!("/hosts?before={b}")),
        layout: ctx.layout(),
        error,
        name,
        new_key,
        control_url: app.config.public_origin.clone(),
    })
}

async fn hosts_page(
    State(app): State<App>,
    ctx: Ctx,
    PageQuery(query): PageQuery<BeforeQuery>,
) -> PageResult {
    let user = ctx.require_host_owner()?;
    let view = hosts_view(
        &app,
        &ctx,
        user.id,
        FormError::none(),
        String::new(),
        None,
        query.before,
    )
    .await?;
    ok(view)
}

#[derive(Deserialize)]
struct HostForm {
    name: String,
}

async fn create_host(
    State(app): State<App>,
    ctx: Ctx,
    PageForm(form): PageForm<HostForm>,
) -> PageResult {
    let user = ctx.require_host_owner()?;
    match hosts::create(&app.pool, user.id, &form.name).await {
        Ok((host, key)) => render(
            StatusCode::CREATED,
            hosts_view(
                &app,
                &ctx,
                user.id,
                FormError::none(),
                String::new(),
                Some((host.name, key)),
                None,
            )
            .await?,
        ),
        Err(e @ AppError::Invalid { .. }) => render(
            e.status(),
            hosts_view(
                &app,
                &ctx,
                user.id,
                FormError::from(&e),
                form.name,
                None,
                None,
            )
            .await?,
        ),
        Err(e) => Err(e.into()),
    }
}

async fn rotate_host_key(State(app): State<App>, ctx: Ctx, Path(id): Path<String>) -> PageResult {
    let user = ctx.require_host_owner()?;
    let id = parse_id(&id, "host")?;
    let key = hosts::rotate_key(&app.pool, user.id, id).await?;
    let name = hosts::get(&app.pool, Some(user.id), id).await?.name;
    ok(hosts_view(
        &app,
        &ctx,
        user.id,
        FormError::none(),
        String::new(),
        Some((name, key)),
        None,
    )
    .await?)
}

async fn revoke_host_key(State(app): State<App>, ctx: Ctx, Path(id): Path<String>) -> PageResult {
    let user = ctx.require_host_owner()?;
    hosts::revoke_key(&app.pool, user.id, parse_id(&id, "host")?).await?;
    see_other("/hosts")
}

#[derive(Deserialize)]
struct DrainForm {
    draining: String,
}

async fn drain_host(
    State(app): State<App>,
    ctx: Ctx,
    Path(id): Path<String>,
    PageForm(form): PageForm<DrainForm>,
) -> PageResult {
    let user = ctx.require_host_owner()?;
    let draining = form.draining == "true";
    hosts::set_draining(&app.pool, Some(user.id), parse_id(&id, "host")?, draining).await?;
    see_other("/hosts")
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
                projects: projects::list(&app.pool, user.id).await?,
                layout: ctx.layout(),
                error: FormError::from(&e),
                name: form.name,
                description: form.description,
                open_error: None,
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
            },
        ),
        Err(e) => Err(e.into()),
    }
}

async fn delete_project(State(app): State<App>, ctx: Ctx, Path(id): Path<String>) -> PageResult {
    let (user, _) = ctx.require_user()?;
    let id = parse_id(&id, "project")?;
    ending::stop_project(&app.pool, &app.wakeups, user.id, id).await?;
    projects::delete(&app.pool, user.id, id).await?;
    see_other("/projects")
}

// ----- sessions -----

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
    let (user, login_session) = ctx.require_user()?;
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
    let url = sessions::enter_url(
        &app.config,
        user.id,
        login_session,
        &session.sid,
        super::now_unix(),
    );
    Ok(([(header::CACHE_CONTROL, "no-store")], Redirect::to(&url)).into_response())
}

// ----- account -----

#[derive(Template)]
#[template(path = "account.html")]
struct AccountPage {
    layout: Layout,
    user: User,
    error: FormError,
    notice: Option<&'static str>,
}

async fn account_page(ctx: Ctx) -> PageResult {
    let (user, _) = ctx.require_user()?;
    ok(AccountPage {
        user: user.clone(),
        layout: ctx.layout(),
        error: FormError::none(),
        notice: None,
    })
}

#[derive(Deserialize)]
struct PasswordForm {
    current_password: String,
    new_password: String,
    confirm_password: String,
}

async fn change_password(
    State(app): State<App>,
    ctx: Ctx,
    PageForm(form): PageForm<PasswordForm>,
) -> PageResult {
    let (user, session) = ctx.require_user()?;
    let result = if form.new_password != form.confirm_password {
        Err(AppError::invalid(
            "confirm_password",
            "The two new passwords differ.",
        ))
    } else {
        accounts::change_password(
            &app.pool,
            &app.passwords,
            user.id,
            session,
            &form.current_password,
            &form.new_password,
        )
        .await
    };
    let (status, error, notice) = match result {
        Ok(()) => (
            StatusCode::OK,
            FormError::none(),
            Some("Password changed. You were logged out everywhere else."),
        ),
        Err(e @ AppError::Invalid { .. }) => (e.status(), FormError::from(&e), None),
        Err(e) => return Err(e.into()),
    };
    render(
        status,
        AccountPage {
            user: user.clone(),
            layout: ctx.layout(),
            error,
            notice,
        },
    )
}

// ----- admin -----

#[derive(Template)]
#[template(path = "admin_users.html")]
struct AdminUsersPage {
    layout: Layout,
    users: Vec<User>,
    q: String,
    page: u64,
    pages: u64,
    total: u64,
    roles: [Role; 3],
    me: u64,
}

impl AdminUsersPage {
    fn page_link(&self, page: impl std::borrow::Borrow<u64>) -> String {
        let page = *page.borrow();
        format!("/admin/users?q={}&page={page}", urlencode(&self.q))
    }
}

async fn admin_users(
    State(app): State<App>,
    ctx: Ctx,
    Query(search): Query<UserSearch>,
) -> PageResult {
    let admin = ctx.require_admin()?;
    let (offset, limit) = search.checked()?;
    let found = accounts::search_users(&app.pool, &search.q, offset, limit).await?;
    ok(AdminUsersPage {
        me: admin.id,
        layout: ctx.layout(),
        users: found.users,
        q: search.q,
        page: search.page,
        pages: found.total.div_ceil(limit).max(1),
        total: found.total,
        roles: Role::ALL,
    })
}

#[derive(Deserialize)]
struct AdminUserForm {
    action: String,
    #[serde(default)]
    role: String,
    #[serde(default)]
    back: String,
}

async fn admin_update_user(
    State(app): State<App>,
    ctx: Ctx,
    Path(id): Path<String>,
    PageForm(form): PageForm<AdminUserForm>,
) -> PageResult {
    let admin = ctx.require_admin()?;
    let id = parse_id(&id, "user")?;
    let (role, disabled) = match form.action.as_str() {
        "disable" => (None, Some(true)),
        "enable" => (None, Some(false)),
        "role" => (
            Some(
                Role::parse(&form.role)
                    .ok_or_else(|| AppError::invalid("role", "Pick a role from the list."))?,
            ),
            None,
        ),
        _ => return Err(AppError::BadRequest("Unknown action.".into()).into()),
    };
    accounts::admin_update_user(&app.pool, admin.id, id, role, disabled).await?;
    let back = if form.back.starts_with("/admin/users") {
        safe_next(Some(&form.back))
    } else {
        "/admin/users".into()
    };
    see_other(&back)
}

/// The package form as typed: prices in major units (`19.00`).
#[derive(Deserialize, Default, Clone)]
struct PackageForm {
    name: String,
    #[serde(default)]
    description: String,
    price: String,
    currency: String,
    compute_hours: String,
    max_concurrent_sessions: String,
    cpu_cores: String,
    memory_gib: String,
    storage_gib: String,
    validity_days: String,
    #[serde(default)]
    retired: Option<String>,
}

impl PackageForm {
    fn from_package(p: &Package) -> Self {
        Self {
            name: p.name.clone(),
            description: p.description.clone(),
            price: format!("{}.{:02}", p.price_minor / 100, p.price_minor % 100),
            currency: p.currency.clone(),
            compute_hours: trim_number(f64::from(p.compute_minutes) / 60.0),
            max_concurrent_sessions: p.max_concurrent_sessions.to_string(),
            cpu_cores: trim_number(p.cpu_cores),
            memory_gib: trim_number(f64::from(p.memory_mib) / 1024.0),
            storage_gib: trim_number(f64::from(p.storage_quota_mib) / 1024.0),
            validity_days: p.validity_days.to_string(),
            retired: p.retired.then(|| "on".into()),
        }
    }

    fn blank() -> Self {
        Self {
            currency: "USD".into(),
            validity_days: "30".into(),
            max_concurrent_sessions: "1".into(),
            ..Self::default()
        }
    }

    fn to_input(&self) -> Result<PackageInput, AppError> {
        fn number(field: &'static str, raw: &str) -> Result<f64, AppError> {
            raw.trim()
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && *v >= 0.0)
                .ok_or_else(|| AppError::invalid(field, "Enter a number, like 2 or 1.5."))
        }
        let price = number("price", &self.price)?;
        let whole = |field, raw: &str, scale: f64| -> Result<u32, AppError> {
            let value = (number(field, raw)? * scale).round();
            if value > f64::from(u32::MAX) {
                return Err(AppError::invalid(field, "That number is too large."));
            }
            Ok(value as u32)
        };
        if price > 1_000_000.0 {
            return Err(AppError::invalid(
                "price",
                "A price is at most 1 000 000.00.",
            ));
        }
        Ok(PackageInput {
            name: self.name.clone(),
            description: self.description.clone(),
            price_minor: (price * 100.0).round() as u64,
            currency: self.currency.clone(),
            compute_minutes: whole("compute_hours", &self.compute_hours, 60.0)?,
            max_concurrent_sessions: whole(
                "max_concurrent_sessions",
                &self.max_concurrent_sessions,
                1.0,
            )?,
            cpu_cores: number("cpu_cores", &self.cpu_cores)?,
            memory_mib: whole("memory_gib", &self.memory_gib, 1024.0)?,
            storage_quota_mib: whole("storage_gib", &self.storage_gib, 1024.0)?,
            validity_days: whole("validity_days", &self.validity_days, 1.0)?,
            retired: self.retired.is_some(),
        })
    }
}

/// Maps a checked package's field names to the form's.
fn package_form_error(e: &AppError) -> FormError {
    let field = match e.field() {
        Some("price_minor") => Some("price"),
        Some("compute_minutes") => Some("compute_hours"),
        Some("memory_mib") => Some("memory_gib"),
        Some("storage_quota_mib") => Some("storage_gib"),
        other => other,
    };
    let message = match field {
        Some("memory_gib") => "Between 0.25 and 1024 GiB.".to_owned(),
        Some("storage_gib") => "Between 0.001 and 10240 GiB.".to_owned(),
        Some("compute_hours") => "Between 1 minute (0.02) and 16 666 hours.".to_owned(),
        _ => e.to_string(),
    };
    FormError::from(&AppError::Invalid { field, message })
}

fn trim_number(v: f64) -> String {
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

#[derive(Template)]
#[template(path = "admin_packages.html")]
struct AdminPackagesPage {
    layout: Layout,
    packages: Vec<Package>,
    error: FormError,
    form: PackageForm,
}

async fn admin_packages(State(app): State<App>, ctx: Ctx) -> PageResult {
    ctx.require_admin()?;
    ok(AdminPackagesPage {
        layout: ctx.layout(),
        packages: packages::list(&app.pool, true).await?,
        error: FormError::none(),
        form: PackageForm::blank(),
    })
}

async fn admin_create_package(
    State(app): State<App>,
    ctx: Ctx,
    PageForm(form): PageForm<PackageForm>,
) -> PageResult {
    ctx.require_admin()?;
    let created = match form.to_input() {
        Ok(input) => packages::create(&app.pool, input).await,
        Err(e) => Err(e),
    };
    match created {
        Ok(_) => see_other("/admin/packages"),
        Err(e @ (AppError::Invalid { .. } | AppError::Conflict { .. })) => render(
            e.status(),
            AdminPackagesPage {
                layout: ctx.layout(),
                packages: packages::list(&app.pool, true).await?,
                error: package_form_error(&e),
                form,
            },
        ),
        Err(e) => Err(e.into()),
    }
}

#[derive(Template)]
#[template(path = "admin_package.html")]
struct AdminPackagePage {
    layout: Layout,
    package: Package,
    error: FormError,
    form: PackageForm,
}

async fn admin_package(State(app): State<App>, ctx: Ctx, Path(id): Path<String>) -> PageResult {
    ctx.require_admin()?;
    let package = packages::get(&app.pool, parse_id(&id, "package")?).await?;
    ok(AdminPackagePage {
        layout: ctx.layout(),
        form: PackageForm::from_package(&package),
        package,
        error: FormError::none(),
    })
}

async fn admin_update_package(
    State(app): State<App>,
    ctx: Ctx,
    Path(id): Path<String>,
    PageForm(form): PageForm<PackageForm>,
) -> PageResult {
    ctx.require_admin()?;
    let id = parse_id(&id, "package")?;
    let updated = match form.to_input() {
        Ok(input) => packages::update(&app.pool, id, input).await,
        Err(e) => Err(e),
    };
    match updated {
        Ok(_) => see_other("/admin/packages"),
        Err(e @ (AppError::Invalid { .. } | AppError::Conflict { .. })) => render(
            e.status(),
            AdminPackagePage {
                layout: ctx.layout(),
                package: packages::get(&app.pool, id).await?,
                error: package_form_error(&e),
                form,
            },
        ),
        Err(e) => Err(e.into()),
    }
}
