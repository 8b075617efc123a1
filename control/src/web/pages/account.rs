//! My account: who I am, changing my name, changing my password (which
//! logs out every other login), and my compute time: balance, lots, use
//! per session, payments and refunds.

use askama::Template;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;

use crate::accounts::{self, User};
use crate::app::App;
use crate::billing::reports::{self, AccountSummary};
use crate::error::AppError;
use crate::web::auth::Ctx;
use crate::web::errors::{FormError, PageResult};
use crate::web::extract::PageForm;
use crate::web::layout::Layout;
use crate::web::render::{ok, render, see_other};

pub fn routes() -> Router<App> {
    Router::new()
        .route("/account", get(account_page))
        .route("/account/name", post(rename))
        .route("/account/password", post(change_password))
}

#[derive(Template)]
#[template(path = "account.html")]
struct AccountPage {
    layout: Layout,
    user: User,
    error: FormError,
    /// What the name field holds: the name, or what was typed when refused.
    name: String,
    name_notice: Option<&'static str>,
    notice: Option<&'static str>,
    billing: AccountSummary,
}

impl AccountPage {
    async fn of(app: &App, ctx: &Ctx, user: &User) -> Result<Self, AppError> {
        Ok(Self {
            billing: reports::account(&app.pool, user.id).await?,
            user: user.clone(),
            layout: ctx.layout(),
            error: FormError::none(),
            name: user.name.clone(),
            name_notice: None,
            notice: None,
        })
    }
}

#[derive(Deserialize)]
struct AccountQuery {
    renamed: Option<String>,
}

async fn account_page(
    State(app): State<App>,
    ctx: Ctx,
    Query(query): Query<AccountQuery>,
) -> PageResult {
    let (user, _) = ctx.require_user()?;
    ok(AccountPage {
        name_notice: query.renamed.map(|_| "Name saved."),
        ..AccountPage::of(&app, &ctx, user).await?
    })
}

#[derive(Deserialize)]
struct NameForm {
    name: String,
}

async fn rename(
    State(app): State<App>,
    ctx: Ctx,
    PageForm(form): PageForm<NameForm>,
) -> PageResult {
    let (user, _) = ctx.require_user()?;
    match accounts::rename(&app.pool, user.id, &form.name).await {
        // Back to the page, so the header shows the new name too.
        Ok(_) => see_other("/account?renamed=1"),
        Err(e @ AppError::Invalid { .. }) => render(
            e.status(),
            AccountPage {
                error: FormError::from(&e),
                name: form.name,
                ..AccountPage::of(&app, &ctx, user).await?
            },
        ),
        Err(e) => Err(e.into()),
    }
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
            error,
            notice,
            ..AccountPage::of(&app, &ctx, user).await?
        },
    )
}
