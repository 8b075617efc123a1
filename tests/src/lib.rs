//! The end-to-end harness: real `opencloud-control`, gateway and agent
//! processes on free ports, each stack against its own fresh MariaDB
//! database, driven over HTTP like a client would; real Chromium through
//! chromedriver for the pages.
//!
//! A test starts a [`TestStack`] (control alone, control behind a gateway,
//! agents on top) and talks through [`TestUser`]s. This crate is the only
//! place that knows ports, paths and processes.

pub mod agents;
pub mod billing;
pub mod browser;
pub mod certs;
pub mod contents;
pub mod control;
pub mod dashboards;
pub mod db;
pub mod exposition;
pub mod external;
pub mod gateway;
pub mod hosts;
pub mod jupyter;
pub mod kernel;
pub mod machine;
pub mod payments;
pub mod pebble;
pub mod prometheus;
pub mod sandbox;
pub mod sessions;
pub mod stack;
pub mod stripe;
pub mod upstream;
pub mod user;
pub mod wiretap;

use reqwest::StatusCode;
use serde_json::Value;

pub use control::{Control, ControlOptions};
pub use db::{mysql_server_url, TestDatabase};
pub use machine::{
    bin_dir, binary, free_port, free_ports_in_a_row, fresh_loopback, mode_and_owner,
    run_to_refusal, set_mode, unique, TEST_PORTS,
};
pub use stack::TestStack;
pub use user::{TestUser, PASSWORD};

/// Asserts an API error's status, code and field, and returns its message.
pub fn expect_error(
    got: &(StatusCode, Value),
    status: StatusCode,
    code: &str,
    field: Option<&str>,
) -> String {
    let (got_status, body) = got;
    assert_eq!(*got_status, status, "status for {body}");
    assert_eq!(body["error"]["code"], code, "code in {body}");
    assert_eq!(body["error"]["field"].as_str(), field, "field in {body}");
    let message = body["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        !message.is_empty(),
        "an error must say what is wrong: {body}"
    );
    message
}

/// Asserts the API's answer for something that is not there (or not the
/// caller's to see): 404 `not_found`, naming no field; returns its message.
pub fn expect_not_found(got: &(StatusCode, Value)) -> String {
    expect_error(got, StatusCode::NOT_FOUND, "not_found", None)
}

/// The entry of the JSON list `body[list]` whose `id` is `id`, if listed.
pub fn listed<'a>(body: &'a Value, list: &str, id: u64) -> Option<&'a Value> {
    body[list]
        .as_array()
        .unwrap_or_else(|| panic!("no list {list:?} in {body}"))
        .iter()
        .find(|entry| entry["id"] == id)
}

/// The value of the hidden input `name` in a page's HTML (the CSRF token a
/// form carries), with the escaping askama adds undone.
pub fn hidden_input(html: &str, name: &str) -> String {
    let marker = format!("name=\"{name}\" value=\"");
    let start = html.find(&marker).expect("the form has the hidden input") + marker.len();
    let len = html[start..].find('"').expect("the value attribute ends");
    html[start..start + len]
        .replace("&#x2f;", "/")
        .replace("&#47;", "/")
}
