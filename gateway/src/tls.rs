//! TLS on the public listener: the platform's certificate and the session
//! domain's wildcard certificate, chosen by SNI, checked before the gateway
//! starts and reloaded when their files change or on SIGHUP.
//!
//! A pair that cannot work (missing file, key not matching, expired, not
//! naming the host it serves) stops start-up with the file and the problem;
//! at reload the same checks keep the old pair serving and log why.

use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use pingora::tls::{ClientHello, ResolvesServerCert};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

pub use crate::config::{CertFiles, TlsConfig};

/// How often the files are looked at for a change.
const POLL: Duration = Duration::from_millis(500);

/// Why a certificate pair cannot serve.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{key} {path}: cannot read the file: {message}")]
    Read {
        key: &'static str,
        path: String,
        message: String,
    },
    #[error("{key} {path}: {message}")]
    Invalid {
        key: &'static str,
        path: String,
        message: String,
    },
}

/// The host part of `host[:port]`.
pub(crate) fn host_only(host: &str) -> &str {
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

/// What a certificate must name to serve.
#[derive(Debug, Clone)]
struct Wanted {
    /// DNS names a client will ask for (`localhost`, `*.nb.localhost`).
    names: Vec<String>,
}

/// One loaded, checked pair; `None` while an ACME-kept pair is awaited.
struct Loaded {
    key: Option<Arc<CertifiedKey>>,
    stamp: Stamp,
}

/// What changes when a file is replaced or rewritten.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp(Vec<Option<(SystemTime, u64, u64)>>);

impl Stamp {
    fn of(files: &CertFiles) -> Self {
        use std::os::unix::fs::MetadataExt;
        Self(
            [&files.cert, &files.key]
                .iter()
                .map(|p| {
                    std::fs::metadata(p)
                        .ok()
                        .and_then(|m| Some((m.modified().ok()?, m.len(), m.ino())))
                })
                .collect(),
        )
    }
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::Read {
        key,
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

/// Loads and checks the pair in `files` for the names in `wanted`.
/// Also returns when the certificate expires.
fn load(
    files: &CertFiles,
    wanted: &Wanted,
    now: SystemTime,
) -> Result<(Loaded, SystemTime), TlsError> {
    let stamp = Stamp::of(files);
    let (cert_key, key_key) = (files.cert_key, files.key_key);
    let cert_path = files.cert.display().to_string();
    let invalid = |key: &'static str, path: &str, message: String| TlsError::Invalid {
        key,
        path: path.to_owned(),
        message,
    };
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(&read(cert_key, &files.cert)?)
            .collect::<Result<_, _>>()
            .map_err(|e| invalid(cert_key, &cert_path, format!("not PEM certificates: {e}")))?;
    let Some(leaf) = chain.first() else {
        return Err(invalid(
            cert_key,
            &cert_path,
            "holds no certificate (expected PEM `BEGIN CERTIFICATE` blocks)".into(),
        ));
    };
    let key_path = files.key.display().to_string();
    let private = PrivateKeyDer::from_pem_slice(&read(key_key, &files.key)?).map_err(|e| {
        invalid(
            key_key,
            &key_path,
            format!("holds no usable PEM private key: {e}"),
        )
    })?;
    let not_after = check_leaf(leaf, wanted, now).map_err(|m| invalid(cert_key, &cert_path, m))?;
    pingora::tls::install_default_crypto_provider();
    let provider = CryptoProvider::get_default().expect("installed just now");
    let key = CertifiedKey::from_der(chain, private, provider).map_err(|e| {
        let why = match e {
            rustls::Error::InconsistentKeys(_) => String::new(),
            other => format!(": {other}"),
        };
        invalid(
            key_key,
            &key_path,
            format!("does not match the certificate in {cert_key} ({cert_path}){why}"),
        )
    })?;
    Ok((
        Loaded {
            key: Some(Arc::new(key)),
            stamp,
        },
        not_after,
    ))
}

/// The leaf is valid now and names every wanted name; when it expires.
fn check_leaf(
    leaf: &CertificateDer<'_>,
    wanted: &Wanted,
    now: SystemTime,
) -> Result<SystemTime, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| format!("the first certificate does not parse: {e}"))?;
    let now = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let validity = cert.validity();
    if validity.not_after.timestamp() < now {
        return Err(format!("the certificate expired on {}", validity.not_after));
    }
    if validity.not_before.timestamp() > now {
        return Err(format!(
            "the certificate is not valid before {}",
            validity.not_before
        ));
    }
    let names: Vec<String> = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_ascii_lowercase()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    let missing: Vec<&String> = wanted
        .names
        .iter()
        .filter(|w| !names.iter().any(|n| covers(n, w)))
        .collect();
    if missing.is_empty() {
        let expires =
            Duration::from_secs(u64::try_from(validity.not_after.timestamp()).unwrap_or(0));
        Ok(SystemTime::UNIX_EPOCH + expires)
    } else {
        Err(format!(
            "the certificate does not name {} (it names: {})",
            missing
                .iter()
                .map(|m| m.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            if names.is_empty() {
                "nothing in subjectAltName".to_owned()
            } else {
                names.join(", ")
            }
        ))
    }
}

/// Whether certificate name `name` serves `wanted` (which may itself be a
/// wildcard, served only by the same wildcard).
fn covers(name: &str, wanted: &str) -> bool {
    if name == wanted {
        return true;
    }
    match (name.strip_prefix("*."), wanted.split_once('.')) {
        (Some(parent), Some((label, rest))) => label != "*" && parent == rest,
        _ => false,
    }
}

/// The certificates the listener serves, replaced in place on reload.
pub struct Certificates {
    platform: Slot,
    sessions: Option<Slot>,
    /// `.nb.example.com`: an SNI ending so is a session origin.
    session_suffix: String,
}

struct Slot {
    files: CertFiles,
    wanted: Wanted,
    current: RwLock<Loaded>,
}

impl Slot {
    fn load(files: &CertFiles, wanted: Wanted) -> Result<Self, TlsError> {
        let (current, _) = load(files, &wanted, SystemTime::now())?;
        Ok(Self {
            files: files.clone(),
            wanted,
            current: RwLock::new(current),
        })
    }

    /// A slot for a pair ACME keeps: empty (no handshake succeeds) until a
    /// usable pair is on disk, which the reload then picks up.
    fn load_or_await(files: &CertFiles, wanted: Wanted) -> Self {
        let current = match load(files, &wanted, SystemTime::now()) {
            Ok((loaded, _)) => loaded,
            Err(e) => {
                tracing::info!("no usable platform certificate yet, ACME will obtain one: {e}");
                Loaded {
                    key: None,
                    stamp: Stamp::of(files),
                }
            }
        };
        Self {
            files: files.clone(),
            wanted,
            current: RwLock::new(current),
        }
    }

    fn key(&self) -> Option<Arc<CertifiedKey>> {
        self.current.read().expect("certificate slot").key.clone()
    }

    /// Loads the files again if they changed; `Err` keeps the old pair.
    fn reload_if_changed(&self, forced: bool) -> Result<bool, TlsError> {
        let stamp = Stamp::of(&self.files);
        if !forced && stamp == self.current.read().expect("certificate slot").stamp {
            return Ok(false);
        }
        match load(&self.files, &self.wanted, SystemTime::now()) {
            Ok((loaded, _)) => {
                *self.current.write().expect("certificate slot") = loaded;
                Ok(true)
            }
            Err(e) => {
                // Remember the stamp: one message per change, not per poll.
                self.current.write().expect("certificate slot").stamp = stamp;
                Err(e)
            }
        }
    }
}

impl Certificates {
    /// Loads and checks every pair: the platform's for `platform_host`, the
    /// sessions' for `*.{session_host}` (both `host[:port]`).
    pub fn load(
        config: &TlsConfig,
        platform_host: &str,
        session_host: &str,
    ) -> Result<Self, TlsError> {
        let platform_name = host_only(platform_host).to_owned();
        let session_name = format!("*.{}", host_only(session_host));
        let (platform, sessions) = match &config.sessions {
            Some(files) => (
                {
                    let wanted = Wanted {
                        names: vec![platform_name],
                    };
                    if config.acme.is_some() {
                        Slot::load_or_await(&config.platform, wanted)
                    } else {
                        Slot::load(&config.platform, wanted)?
                    }
                },
                Some(Slot::load(
                    files,
                    Wanted {
                        names: vec![session_name],
                    },
                )?),
            ),
            None => (
                Slot::load(
                    &config.platform,
                    Wanted {
                        names: vec![platform_name, session_name],
                    },
                )?,
                None,
            ),
        };
        Ok(Self {
            platform,
            sessions,
            session_suffix: format!(".{}", host_only(session_host)),
        })
    }

    fn slots(&self) -> impl Iterator<Item = &Slot> {
        std::iter::once(&self.platform).chain(self.sessions.as_ref())
    }

    /// Reloads what changed (everything when `forced`); logs and counts
    /// each outcome.
    pub fn reload(&self, forced: bool) {
        for slot in self.slots() {
            match slot.reload_if_changed(forced) {
                Ok(false) => {}
                Ok(true) => {
                    tracing::info!(file = %slot.files.cert.display(), "certificate reloaded");
                    metrics::counter!("opencloud_gateway_certificate_reloads_total", "outcome" => "loaded")
                        .increment(1);
                }
                Err(e) => {
                    tracing::error!("certificate not reloaded, the previous one stays: {e}");
                    metrics::counter!("opencloud_gateway_certificate_reloads_total", "outcome" => "refused")
                        .increment(1);
                }
            }
        }
    }

    /// Watches the files and SIGHUP until the gateway stops.
    pub async fn watch(self: Arc<Self>) {
        let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        {
            Ok(signal) => Some(signal),
            Err(e) => {
                tracing::warn!("no SIGHUP reload: {e}");
                None
            }
        };
        let mut tick = tokio::time::interval(POLL);
        loop {
            let forced = tokio::select! {
                _ = tick.tick() => false,
                Some(()) = async { match hangup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
            };
            if forced {
                tracing::info!("SIGHUP: reloading the certificates");
            }
            self.reload(forced);
        }
    }
}

/// When the platform pair in `files` is due for renewal (`renew_before`
/// ahead of its expiry); an error when it cannot serve at all.
pub fn renewal_due(
    files: &CertFiles,
    platform_host: &str,
    renew_before: Duration,
) -> Result<SystemTime, TlsError> {
    let wanted = Wanted {
        names: vec![host_only(platform_host).to_owned()],
    };
    let (_, not_after) = load(files, &wanted, SystemTime::now())?;
    Ok(not_after
        .checked_sub(renew_before)
        .unwrap_or(SystemTime::UNIX_EPOCH))
}

impl std::fmt::Debug for Certificates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certificates")
            .field("platform", &self.platform.files)
            .field("sessions", &self.sessions.as_ref().map(|s| &s.files))
            .finish()
    }
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let for_session = hello
            .server_name()
            .is_some_and(|name| name.ends_with(&self.session_suffix));
        match (&self.sessions, for_session) {
            (Some(sessions), true) => sessions.key(),
            _ => self.platform.key(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Made {
        cert: String,
        key: String,
    }

    fn make(names: &[&str], not_after: Option<time::OffsetDateTime>) -> Made {
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        if let Some(not_after) = not_after {
            params.not_before = not_after - time::Duration::days(30);
            params.not_after = not_after;
        }
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Made {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    use std::path::PathBuf;

    fn dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("oc-tls-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn write(dir: &Path, made: &Made, stem: &str) -> CertFiles {
        let files = CertFiles {
            cert: dir.join(format!("{stem}.pem")),
            key: dir.join(format!("{stem}.key")),
            cert_key: "tls.cert",
            key_key: "tls.key",
        };
        std::fs::write(&files.cert, &made.cert).unwrap();
        std::fs::write(&files.key, &made.key).unwrap();
        files
    }

    fn one(files: CertFiles) -> TlsConfig {
        TlsConfig {
            platform: files,
            sessions: None,
            acme: None,
        }
    }

    const PLATFORM: &str = "app.example.com:8443";
    const SESSIONS: &str = "nb.example.com:8443";

    fn refused(config: &TlsConfig) -> String {
        Certificates::load(config, PLATFORM, SESSIONS)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn a_pair_naming_both_origins_loads() {
        let d = dir("both");
        let files = write(
            &d,
            &make(&["app.example.com", "*.nb.example.com"], None),
            "a",
        );
        Certificates::load(&one(files), PLATFORM, SESSIONS).unwrap();
    }

    #[test]
    fn a_missing_file_is_named() {
        let d = dir("missing");
        let mut files = write(
            &d,
            &make(&["app.example.com", "*.nb.example.com"], None),
            "a",
        );
        files.cert = d.join("nowhere.pem");
        let err = refused(&one(files));
        assert!(err.starts_with("tls.cert "), "{err}");
        assert!(err.contains("nowhere.pem: cannot read the file"), "{err}");
    }

    #[test]
    fn a_key_of_another_certificate_is_refused() {
        let d = dir("mismatch");
        let files = write(
            &d,
            &make(&["app.example.com", "*.nb.example.com"], None),
            "a",
        );
        let other = make(&["app.example.com"], None);
        std::fs::write(&files.key, other.key).unwrap();
        let err = refused(&one(files));
        assert!(err.starts_with("tls.key "), "{err}");
        assert!(
            err.contains("does not match the certificate in tls.cert"),
            "{err}"
        );
    }

    #[test]
    fn an_expired_certificate_is_refused() {
        let d = dir("expired");
        let past = time::OffsetDateTime::now_utc() - time::Duration::days(1);
        let files = write(
            &d,
            &make(&["app.example.com", "*.nb.example.com"], Some(past)),
            "a",
        );
        let err = refused(&one(files));
        assert!(err.contains("the certificate expired on"), "{err}");
    }

    #[test]
    fn a_certificate_not_naming_the_session_wildcard_is_refused() {
        let d = dir("names");
        let files = write(&d, &make(&["app.example.com"], None), "a");
        let err = refused(&one(files));
        assert!(
            err.contains("does not name *.nb.example.com (it names: app.example.com)"),
            "{err}"
        );
    }

    #[test]
    fn names_cover_like_browsers_match_them() {
        assert!(covers("app.example.com", "app.example.com"));
        assert!(covers("*.example.com", "app.example.com"));
        assert!(!covers("*.example.com", "a.b.example.com"));
        assert!(covers("*.nb.example.com", "*.nb.example.com"));
        assert!(!covers("*.example.com", "*.nb.example.com"));
        assert!(!covers("example.com", "app.example.com"));
    }

    #[test]
    fn sni_chooses_the_session_certificate_and_a_broken_reload_keeps_the_old_one() {
        let d = dir("sni");
        let platform = write(&d, &make(&["app.example.com"], None), "platform");
        let mut sessions = write(&d, &make(&["*.nb.example.com"], None), "sessions");
        sessions.cert_key = "tls.session_cert";
        sessions.key_key = "tls.session_key";
        let config = TlsConfig {
            platform,
            sessions: Some(sessions.clone()),
            acme: None,
        };
        let certs = Certificates::load(&config, PLATFORM, SESSIONS).unwrap();
        let served = certs.sessions.as_ref().unwrap().key().unwrap();
        assert!(!Arc::ptr_eq(&served, &certs.platform.key().unwrap()));

        // A key that does not match: refused, the old pair serves on.
        std::fs::write(&sessions.key, make(&["x"], None).key).unwrap();
        certs.reload(false);
        assert!(Arc::ptr_eq(
            &served,
            &certs.sessions.as_ref().unwrap().key().unwrap()
        ));
        // A good new pair: served from now on.
        let renewed = make(&["*.nb.example.com"], None);
        std::fs::write(&sessions.cert, &renewed.cert).unwrap();
        std::fs::write(&sessions.key, &renewed.key).unwrap();
        certs.reload(false);
        assert!(!Arc::ptr_eq(
            &served,
            &certs.sessions.as_ref().unwrap().key().unwrap()
        ));
    }
}
