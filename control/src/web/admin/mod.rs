//! The admin panel, every page of it: users, packages, hosts, Session
//! data and billing. Each page checks for an administrator itself (`Ctx::require_admin`).

mod billing;
mod hosts;
mod numbers;
mod packages;
mod sessions;
mod users;

use axum::response::Redirect;
use axum::routing::get;
use axum::Router;

use crate::app::App;

pub fn routes() -> Router<App> {
    Router::new()
        .route("/admin", get(|| async { Redirect::to("/admin/users") }))
        .merge(users::routes())
        .merge(packages::routes())
        .merge(hosts::routes())
        .merge(sessions::routes())
        .merge(billing::routes())
}
