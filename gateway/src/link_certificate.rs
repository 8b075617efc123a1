//! The gateway's client certificate for host links (see
//! `opencloud_protocol::link`). Its key is made once in the state dir
//! (`link-client.key`, 0600) and never leaves it; control signs a request
//! for it on the internal API and sends its host CA along, the only CA a
//! host's certificate is checked against. The certificate is kept beside
//! the key (`link-client.json`), so a restart serves sessions at once even
//! while control is away, and is renewed with a third of its life left.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use opencloud_protocol::config::{read_or_create_private_file, write_private_file, ConfigError};
use opencloud_protocol::link::{certificate_request, new_private_key, LinkCertificate};
use pingora::utils::tls::{parse_x509, CertKey, WrappedX509};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::clock::unix_now;
use crate::control_client::ControlClient;

/// The client key, in the state dir.
pub const KEY_FILE: &str = "link-client.key";
/// The last certificate control issued for it, with the host CA.
pub const CERTIFICATE_FILE: &str = "link-client.json";
/// Waits between failed requests to control: doubling up to the longest.
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_LONGEST: Duration = Duration::from_secs(60);

/// What a host link connection presents and trusts, in Pingora's form.
pub struct LinkCredentials {
    pub client: Arc<CertKey>,
    /// Control's host CA, alone.
    pub ca: Arc<[WrappedX509]>,
    /// Unix seconds.
    pub not_after: u64,
}

impl LinkCredentials {
    /// From control's answer and the key it was issued for. Everything is
    /// checked here (Pingora panics on a certificate it cannot parse, and
    /// would fail every connection with a key that is not the certificate's).
    pub fn new(certificate: &LinkCertificate, key_pem: &str) -> Result<Self, String> {
        let leaf = der_certificate("the certificate", &certificate.certificate)?;
        let ca = der_certificate("the host CA", &certificate.ca)?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| format!("the link client key: {e}"))?;
        pingora::tls::install_default_crypto_provider();
        let provider = CryptoProvider::get_default().ok_or("no TLS crypto provider")?;
        CertifiedKey::from_der(vec![leaf.clone().into()], key.clone_key(), provider)
            .map_err(|e| format!("the certificate is not for the link client key: {e}"))?;
        Ok(Self {
            client: Arc::new(CertKey::new(vec![leaf], key.secret_der().to_vec())),
            ca: Arc::from(vec![WrappedX509::new(ca, parse_x509)]),
            not_after: certificate.not_after,
        })
    }
}

/// The DER of the one certificate in `pem`, checked to parse as X.509.
fn der_certificate(what: &str, pem: &str) -> Result<Vec<u8>, String> {
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| format!("{what}: {e}"))?;
    X509Certificate::from_der(&der).map_err(|e| format!("{what}: {e}"))?;
    Ok(der.to_vec())
}

/// The current credentials, shared by the request path and the renewer.
#[derive(Clone, Default)]
pub struct ClientCredentials(Arc<ArcSwapOption<LinkCredentials>>);

impl ClientCredentials {
    pub fn current(&self) -> Option<Arc<LinkCredentials>> {
        self.0.load_full()
    }

    /// The current credentials, waiting up to `limit` for the first ones
    /// (a gateway that has just started and not heard from control yet).
    pub async fn wait(&self, limit: Duration) -> Option<Arc<LinkCredentials>> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(credentials) = self.current() {
                return Some(credentials);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn set(&self, credentials: LinkCredentials) {
        self.0.store(Some(Arc::new(credentials)));
    }
}

/// Keeps the client certificate current (a background service).
pub struct Renewer {
    credentials: ClientCredentials,
    control: ControlClient,
    state_dir: PathBuf,
    key: String,
    current: Option<LinkCertificate>,
}

impl Renewer {
    /// Reads (or makes) the key in `state_dir` and serves the certificate
    /// kept there, if it is still valid. A key others may read stops the
    /// start, naming the file.
    pub fn open(
        state_dir: &Path,
        credentials: ClientCredentials,
        control: ControlClient,
    ) -> Result<Self, ConfigError> {
        let key = read_or_create_private_file(
            "link client key",
            &state_dir.join(KEY_FILE),
            new_private_key,
        )?;
        let kept = std::fs::read_to_string(state_dir.join(CERTIFICATE_FILE))
            .ok()
            .and_then(|text| serde_json::from_str::<LinkCertificate>(&text).ok())
            .filter(|certificate| certificate.not_after > unix_now());
        let current = kept.and_then(
            |certificate| match LinkCredentials::new(&certificate, &key) {
                Ok(kept) => {
                    credentials.set(kept);
                    Some(certificate)
                }
                Err(e) => {
                    tracing::warn!("the kept link client certificate is not usable: {e}");
                    None
                }
            },
        );
        Ok(Self {
            credentials,
            control,
            state_dir: state_dir.to_owned(),
            key,
            current,
        })
    }

    pub async fn run(mut self) {
        let mut retry = RETRY_FIRST;
        loop {
            let due = self.current.as_ref().map_or(0, LinkCertificate::renew_at);
            let wait = due.saturating_sub(unix_now());
            tokio::time::sleep(Duration::from_secs(wait)).await;
            match self.renew().await {
                Ok(not_after) => {
                    tracing::info!(not_after, "link client certificate issued");
                    retry = RETRY_FIRST;
                }
                Err(e) => {
                    tracing::warn!("no link client certificate from control yet: {e}");
                    tokio::time::sleep(retry).await;
                    retry = (retry * 2).min(RETRY_LONGEST);
                }
            }
        }
    }

    async fn renew(&mut self) -> Result<u64, String> {
        let csr = certificate_request(&self.key).map_err(|e| e.to_string())?;
        let certificate = self
            .control
            .link_certificate(csr)
            .await
            .map_err(|e| e.to_string())?;
        self.credentials
            .set(LinkCredentials::new(&certificate, &self.key)?);
        let kept = serde_json::to_string(&certificate).unwrap_or_default();
        let path = self.state_dir.join(CERTIFICATE_FILE);
        if let Err(e) = write_private_file(&path, kept) {
            tracing::warn!(path = %path.display(), "cannot keep the link client certificate: {e}");
        }
        let not_after = certificate.not_after;
        self.current = Some(certificate);
        Ok(not_after)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A certificate for `key_pem` from a CA made for the test, as control
    /// would answer (names do not matter here).
    pub(crate) fn issued_for(key_pem: &str) -> LinkCertificate {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::default();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::from_pem(key_pem).unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["gateway.opencloud.internal".into()])
            .unwrap()
            .signed_by(&key, &ca, &ca_key)
            .unwrap();
        LinkCertificate {
            certificate: leaf.pem(),
            ca: ca.pem(),
            not_before: 0,
            not_after: unix_now() + 3600,
        }
    }

    #[test]
    fn credentials_take_only_a_certificate_for_their_own_key() {
        let key = new_private_key().unwrap();
        let certificate = issued_for(&key);
        let credentials = LinkCredentials::new(&certificate, &key).unwrap();
        assert_eq!(credentials.ca.len(), 1);
        assert_eq!(credentials.not_after, certificate.not_after);

        let other_key = new_private_key().unwrap();
        let err = LinkCredentials::new(&certificate, &other_key)
            .err()
            .unwrap();
        assert!(err.contains("not for the link client key"), "{err}");
        let garbage = LinkCertificate {
            certificate: "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".into(),
            ..certificate.clone()
        };
        assert!(
            LinkCredentials::new(&garbage, &key).is_err(),
            "parsed first, never a panic"
        );
        let no_ca = LinkCertificate {
            ca: String::new(),
            ..certificate
        };
        assert!(LinkCredentials::new(&no_ca, &key).is_err());
    }

    #[test]
    fn a_kept_certificate_serves_at_once_after_a_restart_until_it_runs_out() {
        let dir = std::env::temp_dir().join(format!("oc-link-client-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let control = ControlClient::new("http://127.0.0.1:9", "k").unwrap();
        let fresh = ClientCredentials::default();
        let first = Renewer::open(&dir, fresh.clone(), control.clone()).unwrap();
        assert!(fresh.current().is_none(), "nothing kept yet");
        let kept = issued_for(&first.key);
        std::fs::write(
            dir.join(CERTIFICATE_FILE),
            serde_json::to_string(&kept).unwrap(),
        )
        .unwrap();

        let restarted = ClientCredentials::default();
        let second = Renewer::open(&dir, restarted.clone(), control.clone()).unwrap();
        assert_eq!(second.key, first.key, "the key is kept");
        assert!(
            restarted.current().is_some(),
            "served before control answers"
        );

        let expired = LinkCertificate {
            not_after: unix_now() - 1,
            ..kept
        };
        std::fs::write(
            dir.join(CERTIFICATE_FILE),
            serde_json::to_string(&expired).unwrap(),
        )
        .unwrap();
        let late = ClientCredentials::default();
        Renewer::open(&dir, late.clone(), control).unwrap();
        assert!(late.current().is_none(), "an expired one is not served");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
