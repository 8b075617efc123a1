//! Automatic certificates for the platform origin (ACME, RFC 8555, HTTP-01).
//!
//! One background task keeps the platform pair in `tls.cert`/`tls.key`
//! current: it orders a certificate when the kept one is missing, cannot
//! serve, or expires within `renew_before_days`, and otherwise sleeps until
//! then. The challenge answers go where the plain-HTTP listener serves them
//! (`{state_dir}/acme-challenges/{token}`) and are removed after the order.
//! A new pair is written next to the old one and renamed over it, so the
//! certificate reload (file polling in `tls.rs`) sees a whole pair; a
//! failed order is logged, counted and retried with backoff, and never
//! touches the pair that is serving. The account key is kept in the state
//! directory (0600) and reused.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};
use opencloud_protocol::config::write_private_file;
use serde::{Deserialize, Serialize};

use crate::config::{AcmeConfig, CertFiles};

/// The ACME account (its key and the CA's id for it), under the state dir.
const ACCOUNT_FILE: &str = "acme-account.json";
/// The first wait after a failed order; doubled per failure up to the last.
const FIRST_RETRY: Duration = Duration::from_secs(10);
const LAST_RETRY: Duration = Duration::from_secs(3600);
/// Look again at least this often: an operator may replace the files.
const RECHECK: Duration = Duration::from_secs(3600);
/// How long the CA may take to validate and to issue, each.
const CA_PATIENCE: Duration = Duration::from_secs(60);

/// Keeps the platform certificate issued and renewed.
pub struct Acme {
    pub config: AcmeConfig,
    /// Where the platform pair is kept (and served from).
    pub files: CertFiles,
    /// `host[:port]` of the platform origin; the certificate names the host.
    pub platform_host: String,
    pub state_dir: PathBuf,
    /// `{state_dir}/acme-challenges`, served by the plain-HTTP listener.
    pub challenges: PathBuf,
}

/// The account as kept on disk, with the directory it belongs to: another
/// CA (a changed `tls.acme.directory`) needs another account.
#[derive(Serialize, Deserialize)]
struct KeptAccount {
    directory: String,
    credentials: AccountCredentials,
}

impl Acme {
    pub async fn run(self) {
        let mut retry = FIRST_RETRY;
        let mut account = None;
        loop {
            let now = SystemTime::now();
            match crate::tls::renewal_due(
                &self.files,
                &self.platform_host,
                self.config.renew_before,
            ) {
                Ok(due) if due > now => {
                    let wait = due.duration_since(now).unwrap_or_default();
                    tokio::time::sleep(wait.min(RECHECK)).await;
                    continue;
                }
                Ok(_) => tracing::info!("the platform certificate is due for renewal: ordering"),
                Err(e) => tracing::info!("ordering a platform certificate: {e}"),
            }
            let started = std::time::Instant::now();
            match self.order(&mut account).await {
                Ok(()) => {
                    tracing::info!(took = ?started.elapsed(), "platform certificate issued by ACME");
                    metrics::counter!("opencloud_gateway_acme_orders_total", "outcome" => "issued")
                        .increment(1);
                    retry = FIRST_RETRY;
                    self.warn_if_due_at_once().await;
                }
                Err(e) => {
                    tracing::error!(
                        retry_in = ?retry,
                        "ACME order failed, the serving certificate stays: {e:#}"
                    );
                    metrics::counter!("opencloud_gateway_acme_orders_total", "outcome" => "failed")
                        .increment(1);
                    // The CA may have forgotten the account, or its nonce
                    // state gone stale: start the next try afresh.
                    account = None;
                    tokio::time::sleep(retry).await;
                    retry = (retry * 2).min(LAST_RETRY);
                }
            }
        }
    }

    /// A CA whose certificates live shorter than `renew_before_days` would
    /// be asked again at once, forever: say so and wait instead.
    async fn warn_if_due_at_once(&self) {
        let due =
            crate::tls::renewal_due(&self.files, &self.platform_host, self.config.renew_before);
        if due.is_ok_and(|due| due <= SystemTime::now()) {
            tracing::warn!(
                next_in = ?RECHECK,
                "the new certificate is already within tls.acme.renew_before_days of expiry \
                 (the CA issues shorter-lived ones): not ordering again before the next check"
            );
            tokio::time::sleep(RECHECK).await;
        }
    }

    /// One order: challenge, finalize, and the new pair in place.
    async fn order(&self, account: &mut Option<Account>) -> anyhow::Result<()> {
        let account = match account {
            Some(account) => account,
            None => account.insert(self.account().await?),
        };
        let host = crate::tls::host_only(&self.platform_host).to_owned();
        let identifiers = [Identifier::Dns(host)];
        let mut order = account
            .new_order(&NewOrder::new(&identifiers))
            .await
            .context("new order")?;
        let mut answers = Challenges::default();
        let mut authorizations = order.authorizations();
        while let Some(authorization) = authorizations.next().await {
            let mut authorization = authorization.context("authorization")?;
            match authorization.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                other => anyhow::bail!("the authorization is {other:?}"),
            }
            let mut challenge = authorization
                .challenge(ChallengeType::Http01)
                .context("the CA offers no http-01 challenge")?;
            let path = self.challenges.join(&challenge.token);
            answers.written.push(path.clone());
            write_private_file(&path, challenge.key_authorization().as_str())
                .with_context(|| format!("{}", path.display()))?;
            challenge.set_ready().await.context("challenge ready")?;
        }
        let patience = RetryPolicy::new().timeout(CA_PATIENCE);
        let status = order.poll_ready(&patience).await.context("validation")?;
        if status != OrderStatus::Ready {
            let problems: Vec<String> = order
                .authorizations()
                .next()
                .await
                .and_then(Result::ok)
                .map(|a| {
                    a.challenges
                        .iter()
                        .filter_map(|c| c.error.as_ref().map(|e| e.to_string()))
                        .collect()
                })
                .unwrap_or_default();
            anyhow::bail!("the order is {status:?}: {}", problems.join("; "));
        }
        let key_pem = order.finalize().await.context("finalize")?;
        let chain_pem = order
            .poll_certificate(&patience)
            .await
            .context("certificate")?;
        drop(answers);
        self.keep(&chain_pem, &key_pem)
    }

    /// Writes the pair next to the kept one and renames it over: the key
    /// first, then the certificate, microseconds apart against a 500 ms poll.
    fn keep(&self, chain_pem: &str, key_pem: &str) -> anyhow::Result<()> {
        // `platform.pem.new`: the whole name, so a key and a certificate
        // sharing a stem do not share a staging file.
        let staged = |path: &Path| {
            let mut name = path.as_os_str().to_owned();
            name.push(".new");
            PathBuf::from(name)
        };
        for (path, contents) in [(&self.files.key, key_pem), (&self.files.cert, chain_pem)] {
            write_private_file(&staged(path), contents)
                .with_context(|| format!("{}", staged(path).display()))?;
        }
        for path in [&self.files.key, &self.files.cert] {
            std::fs::rename(staged(path), path).with_context(|| format!("{}", path.display()))?;
        }
        Ok(())
    }

    /// The kept account for this directory, or a new one (then kept).
    async fn account(&self) -> anyhow::Result<Account> {
        let builder = || match &self.config.directory_ca {
            Some(ca) => Account::builder_with_root(ca)
                .with_context(|| format!("tls.acme.directory_ca {}", ca.display())),
            None => Account::builder().context("the system's root certificates"),
        };
        let path = self.state_dir.join(ACCOUNT_FILE);
        let kept = std::fs::read(&path)
            .ok()
            .and_then(|text| serde_json::from_slice::<KeptAccount>(&text).ok())
            .filter(|kept| kept.directory == self.config.directory);
        if let Some(kept) = kept {
            return builder()?
                .from_credentials(kept.credentials)
                .await
                .context("the kept ACME account");
        }
        let contact: Vec<&str> = self.config.contact.iter().map(String::as_str).collect();
        let (account, credentials) = builder()?
            .create(
                &NewAccount {
                    contact: &contact,
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                },
                self.config.directory.clone(),
                None,
            )
            .await
            .context("a new ACME account")?;
        let kept = KeptAccount {
            directory: self.config.directory.clone(),
            credentials,
        };
        write_private_file(&path, serde_json::to_vec(&kept)?)
            .with_context(|| format!("{}", path.display()))?;
        tracing::info!(file = %path.display(), "ACME account created and kept");
        Ok(account)
    }
}

/// The challenge answers written for an order, removed when it ends
/// however it ends.
#[derive(Default)]
struct Challenges {
    written: Vec<PathBuf>,
}

impl Drop for Challenges {
    fn drop(&mut self) {
        for path in &self.written {
            let _ = std::fs::remove_file(path);
        }
    }
}
