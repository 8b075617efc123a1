//! Talking to a sandboxed session the way its host link does: HTTP on the
//! Jupyter server's Unix socket.

use std::path::Path;

use serde_json::Value;

use crate::jupyter::request;
use crate::stack::Target;

/// `method path` on the server at `socket`: status and JSON body (`Null`
/// when the body is not JSON).
pub async fn unix_request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> anyhow::Result<(u16, Value)> {
    request(&Target::Unix(socket.to_owned()), method, path, body).await
}
