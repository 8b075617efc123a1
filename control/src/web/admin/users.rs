//! Admin: every user, searched and paged; disabling, enabling and
//! changing a user's role; one user's compute time, granted or revoked.

use askama::Template;
use axum::extract::{Path, Query, State};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;

use crate::accounts::{self, Role, User};
use crate::app::App;
use crate::billing::reports::{self, AccountSummary};
use crate::billing::{ledger, money};
use crate::error::AppError;
use crate::web::auth::Ctx;
use crate::web::errors::{FormError, PageResult};
use crate::web::extract::{parse_id, safe_next, PageForm, UserSearch};
use crate::web::layout::{urlencode, Layout};
use crate::web::render::{ok, render, see_other};

pub fn routes() -> Router<App> {
    Router::new()
        .route("/admin/users", get(admin_users))
        .route("/admin/users/{id}", get(admin_user).post(admin_update_user))
        .route("/admin/users/{id}/credit", post(admin_credit))
}

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

/// The grant or revoke form as typed.
#[derive(Deserialize)]
struct CreditForm {
    /// grant or revoke.
    action: String,
    amount: String,
    /// minutes or seconds.
    unit: String,
    #[serde(default)]
    reason: String,
}

impl CreditForm {
    fn blank() -> Self {
        Self {
            action: "grant".into(),
            amount: String::new(),
            unit: "minutes".into(),
            reason: String::new(),
        }
    }

    /// The signed seconds to move: negative revokes.
    fn seconds(&self) -> Result<i64, AppError> {
        let amount: i64 = self
            .amount
            .trim()
            .parse()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| AppError::invalid("amount", "Enter a whole number above 0."))?;
        let scale = if self.unit == "seconds" { 1 } else { 60 };
        let sign = if self.action == "revoke" { -1 } else { 1 };
        Ok(amount.saturating_mul(scale).saturating_mul(sign))
    }
}

#[derive(Template)]
#[template(path = "admin_user.html")]
struct AdminUserPage {
    layout: Layout,
    user: User,
    billing: AccountSummary,
    form: CreditForm,
    error: FormError,
    notice: Option<String>,
}

impl AdminUserPage {
    async fn of(app: &App, ctx: &Ctx, id: u64) -> Result<Self, AppError> {
        let user = accounts::user_by_id(&app.pool, id)
            .await?
            .ok_or(AppError::NotFound("user"))?;
        Ok(Self {
            layout: ctx.layout(),
            billing: reports::account(&app.pool, id).await?,
            user,
            form: CreditForm::blank(),
            error: FormError::none(),
            notice: None,
        })
    }
}

#[derive(Deserialize)]
struct MovedQuery {
    moved: Option<i64>,
}

async fn admin_user(
    State(app): State<App>,
    ctx: Ctx,
    Path(id): Path<String>,
    Query(query): Query<MovedQuery>,
) -> PageResult {
    ctx.require_admin()?;
    let notice = query.moved.map(|moved| match moved {
        0 => "Nothing revoked: the balance was already empty.".to_owned(),
        m if m > 0 => format!("Granted {}.", money::seconds(m)),
        m => format!("Revoked {}.", money::seconds(-m)),
    });
    ok(AdminUserPage {
        notice,
        ..AdminUserPage::of(&app, &ctx, parse_id(&id, "user")?).await?
    })
}

async fn admin_credit(
    State(app): State<App>,
    ctx: Ctx,
    Path(id): Path<String>,
    PageForm(form): PageForm<CreditForm>,
) -> PageResult {
    let admin = ctx.require_admin()?;
    let id = parse_id(&id, "user")?;
    let moved = async {
        let seconds = form.seconds()?;
        ledger::adjust(
            &app.pool,
            &app.config.billing.trial,
            id,
            seconds,
            admin.id,
            &form.reason,
        )
        .await
    }
    .await;
    match moved {
        Ok(moved) => see_other(&format!("/admin/users/{id}?moved={moved}")),
        Err(e @ AppError::Invalid { .. }) => render(
            e.status(),
            AdminUserPage {
                error: FormError::renamed(&e, &[("seconds", "amount")]),
                form,
                ..AdminUserPage::of(&app, &ctx, id).await?
            },
        ),
        Err(e) => Err(e.into()),
    }
}
