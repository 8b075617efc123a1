//! Everything the gateway says to control, on control's internal listener:
//! it follows the route stream, posts health and usage reports, and asks
//! for its host link client certificate and, for Lab's banner, whether a
//! session's owner runs out of compute time soon. Every
//! call carries this gateway's key as a bearer token; the URLs come from
//! [`paths::internal`], the bodies from
//! [`reports`](opencloud_protocol::reports). The loops that decide
//! when to call (`watch`, `health`, `usage`) never touch HTTP themselves.
//!
//! Timeouts: connecting gives up after [`CONNECT_TIMEOUT`]; a report gives
//! up after its own limit; the route stream has none (it stays open for
//! good, and the watcher notices silence itself).

use std::time::Duration;

use bytes::Bytes;
use opencloud_protocol::link::{CertificateRequest, LinkCertificate};
use opencloud_protocol::paths;
use opencloud_protocol::reports::{BalanceNotice, HealthReport, UsageReport};
use reqwest::StatusCode;
use serde::Serialize;

/// Control is on the same network: a connect that takes longer failed.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// A health report is sent every probe round; a slow one is simply late.
const HEALTH_REPORT_TIMEOUT: Duration = Duration::from_secs(2);
/// A usage report that does not arrive in time is kept for the next round.
const USAGE_REPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// A user waits on this one (Lab's banner asks): answer or give up fast.
const BALANCE_TIMEOUT: Duration = Duration::from_secs(2);
/// Signing a certificate is quick; a slow answer is asked for again.
const CERTIFICATE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a call to control did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Control could not be reached, or the connection broke.
    #[error("{0}")]
    Transport(#[from] reqwest::Error),
    /// Control answered, but not with success.
    #[error("control answered {0}")]
    Status(StatusCode),
}

/// Control's internal listener, as this gateway calls it.
#[derive(Clone)]
pub struct ControlClient {
    /// Control's internal base URL, no trailing slash.
    base_url: String,
    gateway_key: String,
    http: reqwest::Client,
}

impl ControlClient {
    /// `base_url` is control's internal URL without a trailing slash.
    pub fn new(base_url: &str, gateway_key: &str) -> reqwest::Result<Self> {
        Ok(Self {
            base_url: base_url.to_owned(),
            gateway_key: gateway_key.to_owned(),
            http: reqwest::Client::builder()
                .connect_timeout(CONNECT_TIMEOUT)
                .build()?,
        })
    }

    /// Opens the route stream from version `since` on: the table's changes
    /// as lines of [`WatchMessage`](opencloud_protocol::routes::WatchMessage).
    pub async fn watch_routes(&self, since: u64) -> Result<RouteStream, ControlError> {
        let url = format!(
            "{}{}?since={since}",
            self.base_url,
            paths::internal::ROUTES_WATCH
        );
        let response = self.send(self.http.get(url)).await?;
        Ok(RouteStream(response))
    }

    /// Posts which hosts this gateway can reach.
    pub async fn report_health(&self, report: &HealthReport) -> Result<(), ControlError> {
        self.post(paths::internal::HEALTH, HEALTH_REPORT_TIMEOUT, report)
            .await
    }

    /// Posts the sessions' traffic since the last report that arrived.
    pub async fn report_usage(&self, report: &UsageReport) -> Result<(), ControlError> {
        self.post(paths::internal::USAGE, USAGE_REPORT_TIMEOUT, report)
            .await
    }

    /// A client certificate for host links for the request `csr` (PEM),
    /// with the host CA.
    pub async fn link_certificate(&self, csr: String) -> Result<LinkCertificate, ControlError> {
        let url = format!("{}{}", self.base_url, paths::internal::LINK_CERTIFICATE);
        let request = self
            .http
            .post(url)
            .timeout(CERTIFICATE_TIMEOUT)
            .json(&CertificateRequest { csr });
        Ok(self.send(request).await?.json().await?)
    }

    /// Whether the owner of session `sid` runs out of compute time soon.
    pub async fn session_balance(&self, sid: &str) -> Result<BalanceNotice, ControlError> {
        let url = format!("{}{}", self.base_url, paths::internal::session_balance(sid));
        let request = self.http.get(url).timeout(BALANCE_TIMEOUT);
        Ok(self.send(request).await?.json().await?)
    }

    /// Posts `body` as JSON to `path`, giving up after `limit`.
    async fn post(
        &self,
        path: &str,
        limit: Duration,
        body: &impl Serialize,
    ) -> Result<(), ControlError> {
        let url = format!("{}{path}", self.base_url);
        let request = self.http.post(url).timeout(limit).json(body);
        self.send(request).await.map(drop)
    }

    /// Sends with the gateway key; anything but success is an error.
    async fn send(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, ControlError> {
        let response = request.bearer_auth(&self.gateway_key).send().await?;
        if !response.status().is_success() {
            return Err(ControlError::Status(response.status()));
        }
        Ok(response)
    }
}

/// An open route stream: its body arrives in chunks of any size.
pub struct RouteStream(reqwest::Response);

impl RouteStream {
    /// The next piece of the body; `None` when control ended the stream.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, ControlError> {
        Ok(self.0.chunk().await?)
    }
}
