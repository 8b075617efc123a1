//! Admin: every host, newest first, with what it offers and what it uses.

use askama::Template;
use axum::extract::State;
use axum::routing::get;
use axum::Router;

use super::numbers::{human_bytes, trim_number, MIB};
use crate::app::App;
use crate::hosts::{self, HostView};
use crate::web::auth::Ctx;
use crate::web::errors::PageResult;
use crate::web::extract::{BeforeQuery, PageQuery};
use crate::web::layout::{pager_links, Layout};
use crate::web::render::ok;

pub fn routes() -> Router<App> {
    Router::new().route("/admin/hosts", get(hosts_page))
}

/// A host with the numbers the table shows, formatted.
struct HostLine {
    host: HostView,
    offered: String,
    in_use: String,
}

impl From<HostView> for HostLine {
    fn from(host: HostView) -> Self {
        let offered = if host.max_sessions == 0 {
            "—".to_owned()
        } else {
            format!(
                "{} cores · {}",
                trim_number(host.cpu_cores, 2),
                human_bytes(host.memory_mib.saturating_mul(MIB))
            )
        };
        let in_use = if host.last_heartbeat.is_none() {
            String::new()
        } else {
            format!(
                "{:.0} % · {} of {}",
                host.cpu_percent,
                human_bytes(host.memory_used_mib.saturating_mul(MIB)),
                human_bytes(host.memory_total_mib.saturating_mul(MIB))
            )
        };
        Self {
            host,
            offered,
            in_use,
        }
    }
}

#[derive(Template)]
#[template(path = "admin_hosts.html")]
struct HostsPage {
    layout: Layout,
    hosts: Vec<HostLine>,
    total: u64,
    /// Not on the first page: a link back to it.
    first_link: Option<String>,
    next_link: Option<String>,
}

async fn hosts_page(
    State(app): State<App>,
    ctx: Ctx,
    PageQuery(query): PageQuery<BeforeQuery>,
) -> PageResult {
    ctx.require_admin()?;
    let page = hosts::list(&app.pool, None, query.before).await?;
    let (first_link, next_link) = pager_links("/admin/hosts", query.before, page.next_before);
    ok(HostsPage {
        layout: ctx.layout(),
        hosts: page.hosts.into_iter().map(HostLine::from).collect(),
        total: page.total,
        first_link,
        next_link,
    })
}
