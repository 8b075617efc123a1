//! My hosts, for host owners: the list with each host's earnings, adding a
//! host (its HostKey shown once), rotating and revoking a key, draining a
//! host; earnings per day, what is owed and the payouts received.

use askama::Template;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;

use crate::app::App;
use crate::billing::reports::{self, Earnings};
use crate::error::AppError;
use crate::hosts::{self, HostView};
use crate::web::auth::Ctx;
use crate::web::errors::{FormError, PageResult};
use crate::web::extract::{parse_id, BeforeQuery, PageForm, PageQuery};
use crate::web::layout::{pager_links, Layout};
use crate::web::render::{ok, render, see_other};

pub fn routes() -> Router<App> {
    Router::new()
        .route("/hosts", get(hosts_page).post(create_host))
        .route("/hosts/{id}/key", post(rotate_host_key))
        .route("/hosts/{id}/revoke", post(revoke_host_key))
        .route("/hosts/{id}/drain", post(drain_host))
}

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
    earnings: Earnings,
}

impl HostsPage {
    /// My hosts showing the page of hosts older than `before`, with an
    /// empty form, no error and no new key.
    async fn of(app: &App, ctx: &Ctx, owner: u64, before: Option<u64>) -> Result<Self, AppError> {
        let mut page = hosts::list(&app.pool, Some(owner), before).await?;
        let (first_link, next_link) = pager_links("/hosts", before, page.next_before);
        let earnings = reports::earnings(&app.pool, owner).await?;
        for host in &mut page.hosts {
            host.earnings = reports::host_text(&earnings.hosts, host.id);
        }
        Ok(Self {
            earnings,
            hosts: page.hosts,
            total: page.total,
            first_link,
            next_link,
            layout: ctx.layout(),
            error: FormError::none(),
            name: String::new(),
            new_key: None,
            control_url: app.config.public_origin.clone(),
        })
    }
}

async fn hosts_page(
    State(app): State<App>,
    ctx: Ctx,
    PageQuery(query): PageQuery<BeforeQuery>,
) -> PageResult {
    let user = ctx.require_host_owner()?;
    ok(HostsPage::of(&app, &ctx, user.id, query.before).await?)
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
            HostsPage {
                new_key: Some((host.name, key)),
                ..HostsPage::of(&app, &ctx, user.id, None).await?
            },
        ),
        Err(e @ AppError::Invalid { .. }) => render(
            e.status(),
            HostsPage {
                error: FormError::from(&e),
                name: form.name,
                ..HostsPage::of(&app, &ctx, user.id, None).await?
            },
        ),
        Err(e) => Err(e.into()),
    }
}

async fn rotate_host_key(State(app): State<App>, ctx: Ctx, Path(id): Path<String>) -> PageResult {
    let user = ctx.require_host_owner()?;
    let id = parse_id(&id, "host")?;
    let key = hosts::rotate_key(&app.pool, user.id, id).await?;
    let name = hosts::get(&app.pool, Some(user.id), id).await?.name;
    ok(HostsPage {
        new_key: Some((name, key)),
        ..HostsPage::of(&app, &ctx, user.id, None).await?
    })
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
