//! The JSON API under `/api/v1`, by area: the same operations as the
//! pages. Errors are `{"error": {"code", "message", "field"}}`.

mod accounts;
mod admin;
mod billing;
mod hosts;
mod packages;
mod project_files;
mod projects;
mod sessions;

use axum::Router;

use crate::app::App;

pub fn routes() -> Router<App> {
    Router::new()
        .merge(accounts::routes())
        .merge(projects::routes())
        .merge(project_files::routes())
        .merge(sessions::routes())
        .merge(hosts::routes())
        .merge(packages::routes())
        .merge(admin::routes())
        .merge(billing::routes())
}

pub use billing::{order_message, webhook_routes};
pub use project_files::zip_response;
