//! My account: who I am, and changing my password (which logs out every
//! other login).

use askama::Template;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;

use crate::accounts::{self, User};
use crate::app::App;
use crate::error::AppError;
use crate::web::auth::Ctx;
use crate::web::errors::{FormError, PageResult};
use crate::web::extract::PageForm;
use crate::web::layout::Layout;
use crate::web::render::{ok, render};

pub fn routes() -> Router<App> {
    Router::new()
        .route("/account", get(account_page))
        .route("/account/password", post(change_password))
}

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
