//! Admin: every user, searched and paged; disabling, enabling and
//! changing a user's role.

use askama::Template;
use axum::extract::{Path, Query, State};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;

use crate::accounts::{self, Role, User};
use crate::app::App;
use crate::error::AppError;
use crate::web::auth::Ctx;
use crate::web::errors::PageResult;
use crate::web::extract::{parse_id, safe_next, PageForm, UserSearch};
use crate::web::layout::{urlencode, Layout};
use crate::web::render::{ok, see_other};

pub fn routes() -> Router<App> {
    Router::new()
        .route("/admin/users", get(admin_users))
        .route("/admin/users/{id}", post(admin_update_user))
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
