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
    /// The platform origin's certificate chain and key (PEM); with `acme`,
    /// where the issued pair is kept (default: in the state directory).
    #[serde(default)]
    cert: Option<PathBuf>,
    #[serde(default)]
    key: Option<PathBuf>,
    /// The wildcard certificate for `*.{session_domain}` and its key;
    /// without them `cert` must name the wildcard too.
    #[serde(default)]
    session_cert: Option<PathBuf>,
    #[serde(default)]
    session_key: Option<PathBuf>,
    /// Obtain and renew the platform certificate from an ACME CA.
    #[serde(default)]
    acme: Option<AcmeFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AcmeFile {
    /// The CA's ACME directory URL.
    directory: String,
    /// An email address the CA may write to about the account.
    #[serde(default)]
    contact: Option<String>,
    #[serde(default = "default_renew_before_days")]
    renew_before_days: u32,
    /// A PEM CA certificate to trust for the ACME server itself (a test
    /// CA's); without it the system's roots.
    #[serde(default)]
    directory_ca: Option<PathBuf>,
}

fn default_renew_before_days() -> u32 {
    30
}

/// Where an ACME-issued platform pair is kept when `tls.cert`/`tls.key`
/// are not given, under the state directory.
pub const ACME_CERT_FILE: &str = "acme-platform.pem";
pub const ACME_KEY_FILE: &str = "acme-platform.key";

/// The ACME part of the TLS config, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcmeConfig {
    /// `https://…/directory`.
    pub directory: String,
    /// `mailto:` URLs for the account.
    pub contact: Vec<String>,
    /// Renew when the certificate expires sooner than this.
    pub renew_before: Duration,
    pub directory_ca: Option<PathBuf>,
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
    /// When set, `platform` is obtained and renewed by ACME.
    pub acme: Option<AcmeConfig>,
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
        let tls = match file.tls {
            None => None,
            Some(_) if !origins.platform.https() => {
                return Err(invalid(
                    "public_url",
                    "must start with https:// when [tls] is set: users would be sent to plain http"
                        .into(),
                ))
            }
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
                let acme = tls
                    .acme
                    .map(|acme| acme_config(acme, base, sessions.is_some(), file.listen.http))
                    .transpose()
                    .map_err(|(key, message)| invalid(key, message))?;
                let state_dir = base.join(&file.state_dir);
                // With ACME the pair may be left to the state directory.
                let platform_file =
                    |given: Option<PathBuf>, key: &'static str, kept: &str| match (given, &acme) {
                        (Some(path), _) => Ok(base.join(path)),
                        (None, Some(_)) => Ok(state_dir.join(kept)),
                        (None, None) => Err(invalid(
                            key,
                            "is missing: name the platform's pair, or set [tls.acme] to obtain it"
                                .into(),
                        )),
                    };
                Some(TlsConfig {
                    platform: CertFiles {
                        cert: platform_file(tls.cert, "tls.cert", ACME_CERT_FILE)?,
                        key: platform_file(tls.key, "tls.key", ACME_KEY_FILE)?,
                        cert_key: "tls.cert",
                        key_key: "tls.key",
                    },
                    sessions,
                    acme,
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

/// Checks `[tls.acme]`; an error names its key.
fn acme_config(
    file: AcmeFile,
    base: &Path,
    separate_session_pair: bool,
    listen_http: Option<SocketAddr>,
) -> Result<AcmeConfig, (&'static str, String)> {
    // RFC 8555 §6.1: ACME runs over https only.
    let directory_ok = file
        .directory
        .strip_prefix("https://")
        .is_some_and(|rest| !rest.is_empty() && !rest.contains(char::is_whitespace));
    if !directory_ok {
        return Err((
            "tls.acme.directory",
            "must be the CA's https:// ACME directory URL".into(),
        ));
    }
    let contact = match file.contact {
        None => Vec::new(),
        Some(email) => {
            let plausible = email
                .split_once('@')
                .is_some_and(|(user, domain)| !user.is_empty() && domain.contains('.'))
                && !email.contains(|c: char| c.is_whitespace() || c == ',' || c == ':');
            if !plausible {
                return Err((
                    "tls.acme.contact",
                    "must be one email address (name@example.com)".into(),
                ));
            }
            vec![format!("mailto:{email}")]
        }
    };
    if !(1..=365).contains(&file.renew_before_days) {
        return Err((
            "tls.acme.renew_before_days",
            "must be between 1 and 365".into(),
        ));
    }
    if !separate_session_pair {
        return Err((
            "tls.session_cert",
            "is required with [tls.acme]: ACME obtains the platform's certificate only; \
             the session wildcard needs DNS-01 and stays yours to provide"
                .into(),
        ));
    }
    if listen_http.is_none() {
        return Err((
            "listen.http",
            "is required with [tls.acme]: the CA checks HTTP-01 challenges there (port 80)".into(),
        ));
    }
    Ok(AcmeConfig {
        directory: file.directory,
        contact,
        renew_before: Duration::from_secs(u64::from(file.renew_before_days) * 86_400),
        directory_ca: file.directory_ca.map(|ca| base.join(ca)),
    })
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

    #[test]
    fn acme_keeps_the_pair_in_the_state_dir_and_refuses_what_cannot_work_by_key() {
        let (path, text) = shipped("acme");
        let env = vec![
            (
                format!("{ENV_PREFIX}__PUBLIC_URL"),
                "https://localhost:8443".to_owned(),
            ),
            (
                format!("{ENV_PREFIX}__LISTEN__HTTP"),
                "127.0.0.1:8080".to_owned(),
            ),
        ];
        let sessions = "session_cert = \"s.pem\"\nsession_key = \"s.key\"\n";
        let with = |tls: &str, acme: &str| {
            Config::from_toml(
                &path,
                &format!("{text}\n[tls]\n{tls}[tls.acme]\n{acme}"),
                env.clone(),
            )
        };
        let refused = |tls: &str, acme: &str| with(tls, acme).unwrap_err().to_string();

        let config = with(
            sessions,
            "directory = \"https://ca.example/dir\"\ncontact = \"ops@example.com\"\n\
             directory_ca = \"ca.pem\"\n",
        )
        .unwrap();
        let tls = config.tls.unwrap();
        assert_eq!(tls.platform.cert, config.state_dir.join(ACME_CERT_FILE));
        assert_eq!(tls.platform.key, config.state_dir.join(ACME_KEY_FILE));
        let acme = tls.acme.unwrap();
        assert_eq!(acme.contact, ["mailto:ops@example.com"]);
        assert_eq!(acme.renew_before, Duration::from_secs(30 * 86_400));
        assert_eq!(
            acme.directory_ca,
            Some(path.parent().unwrap().join("ca.pem"))
        );

        // Named files are where the issued pair is kept.
        let named = with(
            &format!("cert = \"p.pem\"\nkey = \"p.key\"\n{sessions}"),
            "directory = \"https://ca.example/dir\"\nrenew_before_days = 10\n",
        )
        .unwrap()
        .tls
        .unwrap();
        assert_eq!(named.platform.cert, path.parent().unwrap().join("p.pem"));
        assert_eq!(
            named.acme.unwrap().renew_before,
            Duration::from_secs(10 * 86_400)
        );

        for (tls, acme, key) in [
            (
                sessions,
                "directory = \"http://ca.example/dir\"\n",
                "tls.acme.directory",
            ),
            (sessions, "", "tls.acme"),
            (
                sessions,
                "directory = \"https://ca.example/dir\"\ncontact = \"mailto:ops\"\n",
                "tls.acme.contact",
            ),
            (
                sessions,
                "directory = \"https://ca.example/dir\"\nrenew_before_days = 0\n",
                "tls.acme.renew_before_days",
            ),
            (
                sessions,
                "directory = \"https://ca.example/dir\"\nsurprise = 1\n",
                "tls.acme",
            ),
            (
                "",
                "directory = \"https://ca.example/dir\"\n",
                "tls.session_cert",
            ),
        ] {
            let err = refused(tls, acme);
            assert!(err.contains(&format!("key `{key}")), "{key}: {err}");
        }
        let no_http_listener = Config::from_toml(
            &path,
            &format!(
                "{text}\n[tls]\n{sessions}[tls.acme]\ndirectory = \"https://ca.example/dir\"\n"
            ),
            env[..1].to_vec(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            no_http_listener.contains("key `listen.http`"),
            "{no_http_listener}"
        );
    }
}
