//! What all OpenCloud parts must agree on: the token format and the keys that
//! sign it, the route table, what agents and gateways say to control (and on
//! which paths), the host link's names and certificates, the cookie and
//! header names, the platform and session origins, and the way config files
//! are read, and the metric conventions every part shares. Pure functions
//! only (but for `metrics`, which records through the `metrics` facade):
//! callers pass in the time, the file text and the environment.

pub mod agent;
pub mod config;
pub mod credentials;
pub mod keys;
pub mod link;
pub mod logs;
pub mod metrics;
pub mod names;
pub mod origin;
pub mod paths;
pub mod reports;
pub mod routes;
pub mod sid;
pub mod snapshots;
pub mod token;

pub use keys::{KeyId, Keyring, KeyringError};
pub use token::{Claims, TokenError, TokenKind};
