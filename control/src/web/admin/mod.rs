//! The admin panel, every page of it: the overview, users, packages,
//! hosts, Session data and billing. Each page checks for an administrator itself (`Ctx::require_admin`).

mod billing;
mod chart;
mod hosts;
mod numbers;
mod overview;
mod packages;
mod sessions;
mod users;

use axum::Router;

use crate::app::App;

pub fn routes() -> Router<App> {
    Router::new()
        .merge(overview::routes())
        .merge(users::routes())
        .merge(packages::routes())
        .merge(hosts::routes())
        .merge(sessions::routes())
        .merge(billing::routes())
}
