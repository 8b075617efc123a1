//! The site's server-rendered pages, by area. Every form works without
//! JavaScript; errors are shown next to the field, with what the user typed
//! kept (except passwords).

mod account;
mod billing;
mod hosts;
mod projects;
mod public;
mod sessions;

use axum::Router;

use crate::app::App;

pub fn routes() -> Router<App> {
    Router::new()
        .merge(public::routes())
        .merge(projects::routes())
        .merge(sessions::routes())
        .merge(hosts::routes())
        .merge(account::routes())
        .merge(billing::routes())
}
