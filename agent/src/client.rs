//! Talking to control's `/agent/v1/` API with the host key.

use std::time::Duration;

use opencloud_protocol::agent::{
    AgentEvent, AgentHello, CommandBatch, Heartbeat, HeartbeatReply, Registered,
    COMMAND_POLL_SECONDS, HOST_KEY_SCHEME,
};
use opencloud_protocol::link::{CertificateRequest, LinkCertificate};
use opencloud_protocol::paths::agent::{COMMANDS, EVENTS, HEARTBEAT, LINK_CERTIFICATE, REGISTER};
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

    async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let request = self.http.post(format!("{}{path}", self.base)).json(body);
        self.send(request).await
    }

    async fn send<T: DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<T, ClientError> {
        let response = request
            .header(reqwest::header::AUTHORIZATION, &self.authorization)
            .send()
            .await
            .map_err(|e| ClientError::Unavailable(without_url(e)))?;
        let status = response.status();
        if status.is_success() {
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
            return serde_json::from_slice(text).map_err(|e| {
                ClientError::Unavailable(format!("control's answer was not understood: {e}"))
            });
        }
        let body = response.bytes().await.unwrap_or_default();
        Err(classify(status, &body))
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
