//! The public pages: home, the package list, registering, logging in and
//! out.

use askama::Template;
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Redirect};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;

use crate::accounts::{self, NewUser, Role};
use crate::app::App;
use crate::error::AppError;
use crate::packages::{self, Package};
use crate::web::auth::{self, Ctx};
use crate::web::cookies;
use crate::web::errors::{FormError, PageResult};
use crate::web::extract::{safe_next, PageForm};
use crate::web::layout::{urlencode, Layout};
use crate::web::render::{ok, render, see_other};

pub fn routes() -> Router<App> {
    Router::new()
        .route("/", get(home))
        .route("/packages", get(packages_page))
        .route("/register", get(register_form).post(register))
        .route("/login", get(login_form).post(login))
        .route("/logout", post(logout))
}

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
        &app.config.registration,
        &app.config.billing,
        ctx.client_ip,
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
        // The form again, with what was typed and the message (and the
        // wait, when throttled).
        Err(e) if e.field().is_some() || matches!(e, AppError::TooManyAttempts { .. }) => {
            let page = render(
                e.status(),
                RegisterPage {
                    layout: ctx.layout(),
                    error: FormError::from(&e),
                    name: form.name,
                    email: form.email,
                    role: role.as_str().into(),
                },
            )?;
            Ok(e.with_retry_after(page))
        }
        Err(e) => Err(e.into()),
    }
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
    match auth::log_in(&app, &ctx, &form.email, &form.password).await {
        Ok((_, token)) => Ok((
            [(header::SET_COOKIE, cookies::platform_cookie(&app, token))],
            Redirect::to(&next),
        )
            .into_response()),
        Err(
            e @ (AppError::Invalid { .. }
            | AppError::BadCredentials
            | AppError::Forbidden(_)
            | AppError::TooManyAttempts { .. }),
        ) => {
            let page = render(
                e.status(),
                LoginPage {
                    layout: ctx.layout(),
                    error: FormError::from(&e),
                    email: form.email,
                    next,
                    notice: None,
                },
            )?;
            Ok(e.with_retry_after(page))
        }
        Err(e) => Err(e.into()),
    }
}

async fn logout(State(app): State<App>, ctx: Ctx) -> PageResult {
    let cleared = auth::log_out(&app, &ctx).await?;
    Ok(([(header::SET_COOKIE, cleared)], Redirect::to("/")).into_response())
}
