//! Talking to control's `/agent/v1/` API with the host key.

use std::time::Duration;

use opencloud_protocol::agent::{
    AgentEvent, AgentHello, CommandBatch, Heartbeat, HeartbeatReply, Registered,
    COMMAND_POLL_SECONDS, HOST_KEY_SCHEME,
};
use opencloud_protocol::link::{CertificateRequest, LinkCertificate};
use opencloud_protocol::paths::agent::{COMMANDS, EVENTS, HEARTBEAT, LINK_CERTIFICATE, REGISTER};
use opencloud_protocol::snapshots::{
    damaged_path, snapshot_path, Damaged, Reason, Stored, CREATED_HEADER, SHA256_HEADER,
    VERSION_HEADER,
};
use reqwest::StatusCode;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// How a call to control went wrong.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// 401/403: the key is wrong or revoked. Nothing will work until the
    /// owner fixes the config.
    #[error("control refused the host key ({code}): {message}")]
    KeyRejected { code: String, message: String },
    /// Any other 4xx: control will not accept this request as it is.
    #[error("control answered {status} ({code}): {message}")]
    Refused {
        status: u16,
        code: String,
        message: String,
    },
    /// Connection failures, timeouts, 5xx: worth trying again.
    #[error("control is unreachable: {0}")]
    Unavailable(String),
}

impl ClientError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, ClientError::Unavailable(_))
    }
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
}

/// How long one snapshot upload or download may take; callers bound
/// theirs further (the one at a stop is short).
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// A snapshot control is sending: its headers, and the body still to read.
pub struct SnapshotDownload {
    pub version: u64,
    /// Lower-case hex, as control sent it.
    pub sha256: String,
    pub created: Option<u64>,
    pub response: reqwest::Response,
}

/// A client for one control URL and host key.
#[derive(Clone)]
pub struct ControlClient {
    http: reqwest::Client,
    base: String,
    authorization: String,
}

impl ControlClient {
    pub fn new(control_url: &str, host_key: &str) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(15))
            .user_agent(concat!("opencloud-agent/", env!("CARGO_PKG_VERSION")))
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        Self {
            http,
            base: control_url.trim_end_matches('/').to_owned(),
            authorization: format!("{HOST_KEY_SCHEME} {host_key}"),
        }
    }

    pub async fn register(&self, hello: &AgentHello) -> Result<Registered, ClientError> {
        self.post(REGISTER, hello).await
    }

    /// A new host link certificate for the request `csr` (PEM).
    pub async fn link_certificate(&self, csr: String) -> Result<LinkCertificate, ClientError> {
        self.post(LINK_CERTIFICATE, &CertificateRequest { csr })
            .await
    }

    pub async fn heartbeat(&self, heartbeat: &Heartbeat) -> Result<HeartbeatReply, ClientError> {
        self.post(HEARTBEAT, heartbeat).await
    }

    /// Long-polls for commands with ids above `after`.
    pub async fn commands(&self, after: u64) -> Result<CommandBatch, ClientError> {
        let request = self
            .http
            .get(format!("{}{COMMANDS}", self.base))
            .query(&[("after", after)])
            .timeout(Duration::from_secs(COMMAND_POLL_SECONDS + 10));
        self.send(request).await
    }

    pub async fn event(&self, event: &AgentEvent) -> Result<(), ClientError> {
        let request = self.http.post(format!("{}{EVENTS}", self.base)).json(event);
        self.send::<serde::de::IgnoredAny>(request)
            .await
            .map(|_| ())
    }

    /// The session's latest good snapshot (`before`: older than that
    /// version); `None` when there is none.
    pub async fn snapshot(
        &self,
        sid: &str,
        before: Option<u64>,
    ) -> Result<Option<SnapshotDownload>, ClientError> {
        let mut request = self
            .http
            .get(format!("{}{}", self.base, snapshot_path(sid)))
            .timeout(TRANSFER_TIMEOUT);
        if let Some(before) = before {
            request = request.query(&[("before", before)]);
        }
        let response = self.send_raw(request).await?;
        if response.status() == StatusCode::NO_CONTENT {
            return Ok(None);
        }
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let unclear = |what: &str| {
            ClientError::Unavailable(format!("control's snapshot answer has no valid {what}"))
        };
        let version = header(VERSION_HEADER)
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| unclear(VERSION_HEADER))?;
        let sha256 = header(SHA256_HEADER)
            .filter(|v| v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| unclear(SHA256_HEADER))?
            .to_ascii_lowercase();
        let created = header(CREATED_HEADER).and_then(|v| v.parse().ok());
        Ok(Some(SnapshotDownload {
            version,
            sha256,
            created,
            response,
        }))
    }

    /// Uploads a snapshot of `size` bytes streamed from `body`.
    pub async fn put_snapshot(
        &self,
        sid: &str,
        reason: Reason,
        body: reqwest::Body,
        size: u64,
        sha256: &str,
    ) -> Result<Stored, ClientError> {
        let request = self
            .http
            .put(format!("{}{}", self.base, snapshot_path(sid)))
            .query(&[("reason", reason.as_str())])
            .header(SHA256_HEADER, sha256)
            // Lets control refuse an upload over quota before it is sent.
            .header(reqwest::header::CONTENT_LENGTH, size)
            .header(reqwest::header::CONTENT_TYPE, "application/zstd")
            .timeout(TRANSFER_TIMEOUT)
            .body(body);
        self.send(request).await
    }

    /// Tells control that `version` failed its checksum here.
    pub async fn snapshot_damaged(&self, sid: &str, version: u64) -> Result<(), ClientError> {
        let request = self
            .http
            .post(format!("{}{}", self.base, damaged_path(sid)))
            .json(&Damaged { version });
        self.send::<serde::de::IgnoredAny>(request)
            .await
            .map(|_| ())
    }

    async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let request = self.http.post(format!("{}{path}", self.base)).json(body);
        self.send(request).await
    }

    /// Sends with the host key; a success's response, or control's error.
    async fn send_raw(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, ClientError> {
        let response = request
            .header(reqwest::header::AUTHORIZATION, &self.authorization)
            .send()
            .await
            .map_err(|e| ClientError::Unavailable(without_url(e)))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body = response.bytes().await.unwrap_or_default();
        Err(classify(status, &body))
    }

    async fn send<T: DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<T, ClientError> {
        let response = self.send_raw(request).await?;
        let bytes = response
            .bytes()
            .await
            .map_err(|e| ClientError::Unavailable(without_url(e)))?;
        // 204 and empty bodies read as `null` (fine for answers we ignore).
        let text = if bytes.is_empty() {
            &b"null"[..]
        } else {
            &bytes[..]
        };
        serde_json::from_slice(text).map_err(|e| {
            ClientError::Unavailable(format!("control's answer was not understood: {e}"))
        })
    }
}

/// Control's error answer, as the agent acts on it.
pub fn classify(status: StatusCode, body: &[u8]) -> ClientError {
    let (code, message) = match serde_json::from_slice::<ErrorBody>(body) {
        Ok(ErrorBody { error }) => (error.code, error.message),
        Err(_) => (
            String::new(),
            String::from_utf8_lossy(&body[..body.len().min(200)])
                .trim()
                .to_owned(),
        ),
    };
    let code = if code.is_empty() {
        status.as_str().to_owned()
    } else {
        code
    };
    match status {
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
            ClientError::KeyRejected { code, message }
        }
        // Throttled, or a proxy in front of control that timed out.
        StatusCode::TOO_MANY_REQUESTS | StatusCode::REQUEST_TIMEOUT => {
            ClientError::Unavailable(format!("{status}: {message}"))
        }
        s if s.is_client_error() => ClientError::Refused {
            status: s.as_u16(),
            code,
            message,
        },
        s => ClientError::Unavailable(format!("{s}: {message}")),
    }
}

/// reqwest's errors name the URL, which is fine; never the headers.
fn without_url(e: reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    format!("{kind}: {e}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_errors_are_told_apart_from_others() {
        let body = br#"{"error":{"code":"host_key_revoked","message":"this host was removed","field":null}}"#;
        match classify(StatusCode::FORBIDDEN, body) {
            ClientError::KeyRejected { code, message } => {
                assert_eq!(code, "host_key_revoked");
                assert_eq!(message, "this host was removed");
            }
            other => panic!("{other:?}"),
        }
        let err = classify(StatusCode::UNAUTHORIZED, b"");
        assert!(matches!(err, ClientError::KeyRejected { ref code, .. } if code == "401"));
        assert!(!err.is_retryable());
    }

    #[test]
    fn server_trouble_is_retried_and_bad_requests_are_not() {
        assert!(classify(StatusCode::BAD_GATEWAY, b"<html>").is_retryable());
        assert!(classify(StatusCode::SERVICE_UNAVAILABLE, b"").is_retryable());
        assert!(classify(StatusCode::TOO_MANY_REQUESTS, b"").is_retryable());
        let refused = classify(
            StatusCode::UNPROCESSABLE_ENTITY,
            br#"{"error":{"code":"invalid","message":"port_range overlaps","field":"port_range"}}"#,
        );
        assert!(!refused.is_retryable());
        assert!(
            refused.to_string().contains("port_range overlaps"),
            "{refused}"
        );
    }

    #[tokio::test]
    async fn an_unreachable_control_is_retryable() {
        // Port 1 on loopback: nothing listens there.
        let client = ControlClient::new("http://127.0.0.1:1/", "key");
        let err = client
            .event(&AgentEvent::Stopped { sid: "a".into() })
            .await
            .unwrap_err();
        assert!(err.is_retryable(), "{err}");
    }
}
