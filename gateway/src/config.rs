//! The gateway's config: the file (strict) and the validated runtime form.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use opencloud_protocol::origin::{Origins, SessionDomain};
use opencloud_protocol::{config, Keyring};
use serde::Deserialize;

/// Environment overrides look like `OPENCLOUD_GATEWAY__LISTEN__PUBLIC`.
pub const ENV_PREFIX: &str = "OPENCLOUD_GATEWAY";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GatewayFile {
    /// Names this gateway in reports to control.
    name: String,
    /// The platform origin, e.g. `http://localhost:8080`.
    public_url: String,
    /// Sessions live at `{sid}.{session_domain}`, e.g. `nb.localhost:8080`.
    session_domain: String,
    keys_file: PathBuf,
    /// Where the route table is kept between restarts (relative to this file).
    state_dir: PathBuf,
    listen: ListenFile,
    control: ControlFile,
    #[serde(default)]
    tls: Option<TlsFile>,
    #[serde(default)]
    timeouts: TimeoutsFile,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListenFile {
    public: SocketAddr,
    /// Prometheus `/metrics`; loopback unless the operator says otherwise.
    #[serde(default = "loopback_metrics")]
    metrics: SocketAddr,
    /// When set, a scrape must send `Authorization: Bearer <metrics_key>`.
    #[serde(default)]
    metrics_key: Option<String>,
    /// Plain HTTP that redirects to https and answers ACME HTTP-01
    /// challenges; only with `[tls]`.
    #[serde(default)]
    http: Option<SocketAddr>,
}

fn loopback_metrics() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9101))
}

/// The shortest metrics key accepted.
pub const METRICS_KEY_MIN_CHARS: usize = 32;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ControlFile {
    /// Control's public listener, where platform requests go.
    public: SocketAddr,
    /// Control's internal base URL, for the route watch and reports.
    internal_url: String,
    /// The key this gateway presents on the internal listener.
    gateway_key: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsFile {
    /// The platform origin's certificate chain and key (PEM).
    cert: PathBuf,
    key: PathBuf,
    /// The wildcard certificate for `*.{session_domain}` and its key;
    /// without them `cert` must name the wildcard too.
    #[serde(default)]
    session_cert: Option<PathBuf>,
    #[serde(default)]
    session_key: Option<PathBuf>,
}

/// Where a certificate and its key are, and the config keys naming them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// `tls.cert` or `tls.session_cert`, for messages.
    pub cert_key: &'static str,
    /// `tls.key` or `tls.session_key`.
    pub key_key: &'static str,
}

/// The TLS part of the config, its paths resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    pub platform: CertFiles,
    /// The wildcard certificate for the session domain, when separate.
    pub sessions: Option<CertFiles>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct TimeoutsFile {
    connect_ms: u64,
    read_seconds: u64,
    header_seconds: u64,
}

impl Default for TimeoutsFile {
    fn default() -> Self {
        Self {
            connect_ms: 1000,
            read_seconds: 60,
            header_seconds: 10,
        }
    }
}

/// The validated config the gateway runs on.
#[derive(Debug, Clone)]
pub struct Config {
    pub name: String,
    /// `http://localhost:8080`, no trailing slash.
    pub public_origin: String,
    /// The `Host` header of the platform origin, lower case (`localhost:8080`).
    pub platform_host: String,
    /// `nb.localhost:8080`, lower case.
    pub session_domain: SessionDomain,
    pub https: bool,
    pub keys: Keyring,
    pub state_dir: PathBuf,
    pub listen_public: SocketAddr,
    pub listen_metrics: SocketAddr,
    /// The plain-HTTP redirect listener, with TLS only.
    pub listen_http: Option<SocketAddr>,
    pub metrics_key: Option<MetricsKey>,
    pub control_public: SocketAddr,
    pub control_internal_url: String,
    pub gateway_key: String,
    pub tls: Option<TlsConfig>,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub header_timeout: Duration,
}

pub use opencloud_protocol::config::ConfigError;

/// The key a Prometheus scrape must present; never printed.
#[derive(Clone)]
pub struct MetricsKey(String);

impl MetricsKey {
    /// Whether a scrape's headers present the key.
    pub fn admits(&self, headers: &http::HeaderMap) -> bool {
        opencloud_protocol::credentials::bearer_is(headers, &self.0)
    }
}

impl std::fmt::Debug for MetricsKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MetricsKey(…)")
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        config::load(path, Self::from_toml)
    }

    pub fn from_toml(
        path: &Path,
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let (file, invalid) = config::parse_file::<GatewayFile>(path, text, ENV_PREFIX, env)?;
        let origins = Origins::parse(&file.public_url, &file.session_domain)
            .map_err(|e| invalid(e.key, e.message))?;
        if file.control.gateway_key.len() < 32 {
            return Err(invalid(
                "control.gateway_key",
                "must be at least 32 characters".into(),
            ));
        }
        let metrics_key = match file.listen.metrics_key {
            Some(key) if key.len() < METRICS_KEY_MIN_CHARS => {
                return Err(invalid(
                    "listen.metrics_key",
                    format!("must be at least {METRICS_KEY_MIN_CHARS} characters"),
                ))
            }
            key => key.map(MetricsKey),
        };
        let internal_url = file.control.internal_url.trim_end_matches('/').to_owned();
        if !internal_url.starts_with("http://") && !internal_url.starts_with("https://") {
            return Err(invalid(
                "control.internal_url",
                "must start with http:// or https://".into(),
            ));
        }
        if file.timeouts.connect_ms == 0
            || file.timeouts.read_seconds == 0
            || file.timeouts.header_seconds == 0
        {
            return Err(invalid("timeouts", "timeouts must be above 0".into()));
        }
        let base = path.parent().unwrap_or(Path::new("."));
        let tls =
            match file.tls {
                None => None,
                Some(_) if !origins.platform.https() => return Err(invalid(
                    "public_url",
                    "must start with https:// when [tls] is set: users would be sent to plain http"
                        .into(),
                )),
                Some(tls) => {
                    let sessions = match (tls.session_cert, tls.session_key) {
                        (Some(cert), Some(key)) => Some(CertFiles {
                            cert: base.join(cert),
                            key: base.join(key),
                            cert_key: "tls.session_cert",
                            key_key: "tls.session_key",
                        }),
                        (None, None) => None,
                        (Some(_), None) => {
                            return Err(invalid(
                                "tls.session_key",
                                "is missing: tls.session_cert needs its key".into(),
                            ))
                        }
                        (None, Some(_)) => {
                            return Err(invalid(
                                "tls.session_cert",
                                "is missing: tls.session_key needs its certificate".into(),
                            ))
                        }
                    };
                    Some(TlsConfig {
                        platform: CertFiles {
                            cert: base.join(tls.cert),
                            key: base.join(tls.key),
                            cert_key: "tls.cert",
                            key_key: "tls.key",
                        },
                        sessions,
                    })
                }
            };
        if file.listen.http.is_some() && tls.is_none() {
            return Err(invalid(
                "listen.http",
                "redirects plain HTTP to https and needs [tls]".into(),
            ));
        }
        let keys = config::load_keys(path, &file.keys_file)?;
        Ok(Self {
            name: file.name,
            public_origin: origins.platform.as_str().to_owned(),
            platform_host: origins.platform.host().to_owned(),
            https: origins.platform.https(),
            session_domain: origins.sessions,
            keys,
            state_dir: base.join(&file.state_dir),
            listen_public: file.listen.public,
            listen_metrics: file.listen.metrics,
            listen_http: file.listen.http,
            metrics_key,
            control_public: file.control.public,
            control_internal_url: internal_url,
            gateway_key: file.control.gateway_key,
            tls,
            connect_timeout: Duration::from_millis(file.timeouts.connect_ms),
            read_timeout: Duration::from_secs(file.timeouts.read_seconds),
            header_timeout: Duration::from_secs(file.timeouts.header_seconds),
        })
    }

    /// `{scheme}://{sid}.{session_domain}`.
    pub fn session_origin(&self, sid: &str) -> String {
        self.session_domain.origin(self.https, sid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shipped config, its keys file next to it in a fresh directory.
    fn shipped(name: &str) -> (PathBuf, String) {
        let dir = std::env::temp_dir().join(format!("oc-gw-config-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        config::write_private_file(&dir.join("keys.toml"), Keyring::generate_toml("k1")).unwrap();
        let text = include_str!("../../config/gateway.toml")
            .replace("../.local/secrets/keys.toml", "keys.toml");
        (dir.join("gateway.toml"), text)
    }

    fn refused_key(name: &str, key: &str, value: &str) -> String {
        let (path, text) = shipped(name);
        let env = [(
            format!("{ENV_PREFIX}__{}", key.to_ascii_uppercase()),
            value.to_owned(),
        )];
        Config::from_toml(&path, &text, env)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn the_shipped_default_config_loads() {
        let (path, text) = shipped("default");
        let config = Config::from_toml(&path, &text, []).unwrap();
        assert_eq!(config.public_origin, "http://localhost:8080");
        assert_eq!(config.platform_host, "localhost:8080");
        assert_eq!(config.session_domain.as_str(), "nb.localhost:8080");
        assert!(!config.https);
        assert_eq!(config.session_origin("abc"), "http://abc.nb.localhost:8080");
    }

    #[test]
    fn a_short_metrics_key_is_refused_by_name_and_a_long_one_admits_a_scrape() {
        let err = refused_key("metrics-key", "listen__metrics_key", "short");
        assert!(err.contains("key `listen.metrics_key`"), "{err}");
        let (path, text) = shipped("metrics-key-ok");
        let key = "k".repeat(METRICS_KEY_MIN_CHARS);
        let env = [(format!("{ENV_PREFIX}__LISTEN__METRICS_KEY"), key.clone())];
        let config = Config::from_toml(&path, &text, env).unwrap();
        let metrics_key = config.metrics_key.unwrap();
        let mut headers = http::HeaderMap::new();
        assert!(!metrics_key.admits(&headers));
        headers.insert("authorization", format!("Bearer {key}").parse().unwrap());
        assert!(metrics_key.admits(&headers));
        assert!(!format!("{metrics_key:?}").contains(&key));
    }

    #[test]
    fn origins_are_checked_as_control_checks_them() {
        for (key, value) in [
            ("public_url", "https://x.example/app"),
            ("session_domain", "nb_x.localhost:8080"),
            ("session_domain", "nb.localhost:99999"),
            ("session_domain", "localhost:8080"),
        ] {
            let err = refused_key(key, key, value);
            assert!(err.contains(&format!("key `{key}`")), "{value}: {err}");
        }
    }

    #[test]
    fn tls_wants_https_pairs_whole_and_the_redirect_listener_wants_tls() {
        let (path, text) = shipped("tls");
        let with = |extra: &str, env: Vec<(String, String)>| {
            Config::from_toml(&path, &format!("{text}\n{extra}"), env)
        };
        let https = vec![(
            format!("{ENV_PREFIX}__PUBLIC_URL"),
            "https://localhost:8443".to_owned(),
        )];
        let tls = "[tls]\ncert = \"p.pem\"\nkey = \"p.key\"\n";
        let err = with(tls, Vec::new()).unwrap_err().to_string();
        assert!(
            err.contains("key `public_url`") && err.contains("https://"),
            "{err}"
        );
        let err = with(&format!("{tls}session_cert = \"s.pem\"\n"), https.clone())
            .unwrap_err()
            .to_string();
        assert!(err.contains("key `tls.session_key`"), "{err}");
        let config = with(tls, https.clone()).unwrap();
        let files = config.tls.unwrap();
        assert_eq!(files.platform.cert, path.parent().unwrap().join("p.pem"));
        assert!(files.sessions.is_none());
        let plain = vec![(
            format!("{ENV_PREFIX}__LISTEN__HTTP"),
            "127.0.0.1:8080".to_owned(),
        )];
        let err = with("", plain).unwrap_err().to_string();
        assert!(err.contains("key `listen.http`"), "{err}");
    }
}
