//! Control's config: what the file says (`ControlFile`, strict) and the
//! validated form the service runs on (`Config`). Validation happens once,
//! at start, and names the file and key that is wrong.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use opencloud_protocol::origin::{Origins, SessionDomain};
use opencloud_protocol::{config, Keyring};
use serde::Deserialize;

/// Environment overrides look like `OPENCLOUD_CONTROL__DATABASE__URL`.
pub const ENV_PREFIX: &str = "OPENCLOUD_CONTROL";

/// PBKDF2 rounds below this are refused (OWASP 2023 for PBKDF2-HMAC-SHA256).
pub const MIN_PBKDF2_ITERATIONS: u32 = 600_000;

/// Gateway keys shorter than this are refused.
pub const MIN_GATEWAY_KEY_CHARS: usize = 32;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ControlFile {
    /// The URL users open: the platform origin (through the gateway).
    public_url: String,
    /// The token keys file, relative to this config file.
    keys_file: PathBuf,
    /// Peers whose `X-Forwarded-For` is believed: the gateways.
    #[serde(default)]
    trusted_proxies: Vec<IpAddr>,
    /// Accept hosts that advertise a loopback, private or link-local
    /// address (a test bed or a LAN-only deployment).
    #[serde(default)]
    allow_private_hosts: bool,
    /// Sessions are served at `{scheme}://{sid}.{session_domain}`.
    session_domain: String,
    /// Bearer keys gateways present on the internal listener.
    #[serde(default)]
    gateway_keys: Vec<String>,
    /// Where operators open Grafana; the admin overview links to it.
    #[serde(default)]
    grafana_url: Option<String>,
    listen: ListenFile,
    database: DatabaseFile,
    #[serde(default)]
    login: LoginFile,
    #[serde(default)]
    registration: RegistrationFile,
    #[serde(default)]
    passwords: PasswordsFile,
    #[serde(default)]
    sessions: SessionsFile,
    #[serde(default)]
    billing: BillingFile,
    #[serde(default)]
    store: StoreFile,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListenFile {
    public: SocketAddr,
    internal: SocketAddr,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DatabaseFile {
    url: String,
    #[serde(default = "default_pool_min")]
    pool_min: usize,
    #[serde(default = "default_pool_max")]
    pool_max: usize,
}

fn default_pool_min() -> usize {
    2
}
fn default_pool_max() -> usize {
    16
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct LoginFile {
    failures_before_throttle: u32,
    window_seconds: u64,
    first_delay_seconds: u64,
    max_delay_seconds: u64,
    client_failure_cap: u32,
}

impl Default for LoginFile {
    fn default() -> Self {
        Self {
            failures_before_throttle: 5,
            window_seconds: 900,
            first_delay_seconds: 15,
            max_delay_seconds: 900,
            client_failure_cap: 50,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RegistrationFile {
    per_client: u32,
    window_seconds: u64,
}

impl Default for RegistrationFile {
    fn default() -> Self {
        Self {
            per_client: 10,
            window_seconds: 3600,
        }
    }
}

/// The longest registration window: a day. Longer would hold one address
/// (a school's, an office's NAT) to its count for days.
pub const MAX_REGISTRATION_WINDOW_SECONDS: u64 = 24 * 3600;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct PasswordsFile {
    pbkdf2_iterations: u32,
}

impl Default for PasswordsFile {
    fn default() -> Self {
        Self {
            pbkdf2_iterations: MIN_PBKDF2_ITERATIONS,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct SessionsFile {
    /// A running session with no traffic and no busy kernel for this long is stopped.
    idle_timeout_seconds: u64,
}

impl Default for SessionsFile {
    fn default() -> Self {
        Self {
            idle_timeout_seconds: 30 * 60,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct BillingFile {
    /// `sandbox` (control's own checkout) or `stripe`.
    provider: String,
    /// Compute time every new account gets to try Open at once.
    signup_grant_seconds: u64,
    /// The host owner's share of what a session on their host costs.
    host_share_percent: u8,
    /// Sessions warn this long before the balance runs out.
    warning_seconds: u64,
    /// The webhook signing secret (`whsec_…`), relative to this file.
    /// Empty: `payments-webhook.secret` beside the keys file, made on
    /// first start (what the sandbox signs with).
    webhook_secret_file: PathBuf,
    /// The sandbox confirms a payment this long after the card is taken,
    /// as a real provider's webhook comes a moment after the buyer returns.
    sandbox_delivery_delay_ms: u64,
    trial: TrialFile,
    stripe: StripeFile,
}

impl Default for BillingFile {
    fn default() -> Self {
        Self {
            provider: "sandbox".into(),
            signup_grant_seconds: 30 * 60,
            host_share_percent: 70,
            warning_seconds: 300,
            webhook_secret_file: PathBuf::new(),
            sandbox_delivery_delay_ms: 0,
            trial: TrialFile::default(),
            stripe: StripeFile::default(),
        }
    }
}

/// The limits of granted time (a trial), which has no package.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct TrialFile {
    sessions_at_once: u32,
    cpu_cores: f64,
    memory_mib: u32,
    /// How much of the project store the owner's files may take.
    storage_mib: u32,
    validity_days: u32,
}

impl Default for TrialFile {
    fn default() -> Self {
        Self {
            sessions_at_once: 1,
            cpu_cores: 1.0,
            memory_mib: 2048,
            storage_mib: 1024,
            validity_days: 30,
        }
    }
}

/// `[store]`: where projects' snapshots live. Either `path` (a local
/// directory) or `url` (`s3://bucket/prefix`) with its endpoint, region and
/// credential files; the credentials never appear in this file's text.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct StoreFile {
    path: PathBuf,
    url: String,
    endpoint: String,
    region: String,
    access_key_id_file: PathBuf,
    secret_access_key_file: PathBuf,
    keep_versions: u32,
}

impl Default for StoreFile {
    fn default() -> Self {
        Self {
            path: PathBuf::new(),
            url: String::new(),
            endpoint: String::new(),
            region: String::new(),
            access_key_id_file: PathBuf::new(),
            secret_access_key_file: PathBuf::new(),
            keep_versions: 10,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct StripeFile {
    /// Stripe's API base; a test points it at a stand-in.
    api_url: String,
    /// The secret API key (`sk_…`), relative to this file.
    secret_key_file: PathBuf,
}

impl Default for StripeFile {
    fn default() -> Self {
        Self {
            api_url: "https://api.stripe.com".into(),
            secret_key_file: PathBuf::new(),
        }
    }
}

/// Which payment provider takes the money.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProviderChoice {
    Sandbox,
    Stripe {
        api_url: String,
        secret_key_file: PathBuf,
    },
}

/// What billing runs on: the provider, the grants and the shares.
#[derive(Debug, Clone)]
pub struct BillingPolicy {
    pub provider: ProviderChoice,
    pub signup_grant_seconds: u64,
    pub host_share_percent: u8,
    pub warning_seconds: u64,
    pub webhook_secret_file: PathBuf,
    pub sandbox_delivery_delay: std::time::Duration,
    pub trial: TrialLimits,
}

/// The limits granted time runs with.
#[derive(Debug, Clone, Copy)]
pub struct TrialLimits {
    pub sessions_at_once: u32,
    pub cpu_cores: f64,
    pub memory_mib: u32,
    pub storage_mib: u32,
    pub validity_days: u32,
}

/// Where the project store is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreLocation {
    /// A local directory.
    Local(PathBuf),
    /// An S3-compatible bucket; the keys are read from the files at start.
    S3 {
        bucket: String,
        prefix: String,
        /// Empty: AWS's own endpoint for the region.
        endpoint: String,
        region: String,
        access_key_id_file: PathBuf,
        secret_access_key_file: PathBuf,
    },
}

/// The project store and how many versions of each project it keeps.
#[derive(Debug, Clone)]
pub struct StorePolicy {
    pub location: StoreLocation,
    pub keep_versions: u32,
}

/// The validated config control runs on.
#[derive(Debug, Clone)]
pub struct Config {
    /// Scheme, host and port, no trailing slash: `http://localhost:8080`.
    pub public_origin: String,
    pub secure_cookies: bool,
    /// Host and optional port under which sessions live: `nb.localhost:8080`.
    pub session_domain: SessionDomain,
    /// Keys gateways authenticate with on the internal listener.
    pub gateway_keys: GatewayKeys,
    pub keys: Keyring,
    /// Where the host CA's key and certificate live: the keys file's
    /// directory (`host_ca`).
    pub host_ca_dir: PathBuf,
    pub trusted_proxies: Vec<IpAddr>,
    /// Hosts may advertise loopback, private and link-local addresses.
    pub allow_private_hosts: bool,
    pub listen_public: SocketAddr,
    pub listen_internal: SocketAddr,
    pub database_url: String,
    pub pool_min: usize,
    pub pool_max: usize,
    pub login: LoginPolicy,
    pub registration: RegistrationPolicy,
    pub pbkdf2_iterations: u32,
    pub idle_timeout: std::time::Duration,
    pub billing: BillingPolicy,
    pub store: StorePolicy,
    /// An http(s) URL of the operators' Grafana, for the admin overview.
    pub grafana_url: Option<String>,
}

impl Config {
    /// `{scheme}://{sid}.{session_domain}`: where session `sid` is served.
    pub fn session_origin(&self, sid: &str) -> String {
        self.session_domain.origin(self.secure_cookies, sid)
    }
}

/// The gateway keys; never printed.
#[derive(Clone, Default)]
pub struct GatewayKeys(Vec<String>);

impl GatewayKeys {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// True when `presented` is one of the keys (compared in constant time,
    /// and against every key, so timing says nothing about which matched).
    pub fn accepts(&self, presented: &str) -> bool {
        use subtle::ConstantTimeEq;
        self.0.iter().fold(false, |found, key| {
            found | bool::from(key.as_bytes().ct_eq(presented.as_bytes()))
        })
    }
}

impl std::fmt::Debug for GatewayKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GatewayKeys({} key(s))", self.0.len())
    }
}

/// How failed logins slow down, per account and client and per client.
#[derive(Debug, Clone)]
pub struct LoginPolicy {
    pub failures_before_throttle: u32,
    pub window_seconds: u64,
    pub first_delay_seconds: u64,
    pub max_delay_seconds: u64,
    pub client_failure_cap: u32,
}

/// How many accounts one client address may register per window.
#[derive(Debug, Clone)]
pub struct RegistrationPolicy {
    pub per_client: u32,
    pub window_seconds: u64,
}

pub use opencloud_protocol::config::ConfigError;

/// Checks `[billing]`; relative files are resolved against `config_dir`.
fn billing_policy(
    file: BillingFile,
    config_dir: &Path,
    keys_dir: &Path,
    invalid: &impl Fn(&'static str, String) -> ConfigError,
) -> Result<BillingPolicy, ConfigError> {
    if file.host_share_percent > 100 {
        return Err(invalid(
            "billing.host_share_percent",
            "must be 0 to 100".into(),
        ));
    }
    if file.signup_grant_seconds > 100 * 3600 {
        return Err(invalid(
            "billing.signup_grant_seconds",
            "must be at most 360000 (100 hours)".into(),
        ));
    }
    if !(1..=3600).contains(&file.warning_seconds) {
        return Err(invalid(
            "billing.warning_seconds",
            "must be 1 to 3600".into(),
        ));
    }
    let trial = file.trial;
    if !(1..=100).contains(&trial.sessions_at_once) {
        return Err(invalid(
            "billing.trial.sessions_at_once",
            "must be 1 to 100".into(),
        ));
    }
    if !(trial.cpu_cores.is_finite() && (0.25..=256.0).contains(&trial.cpu_cores)) {
        return Err(invalid(
            "billing.trial.cpu_cores",
            "must be 0.25 to 256".into(),
        ));
    }
    if trial.memory_mib < 256 {
        return Err(invalid(
            "billing.trial.memory_mib",
            "must be at least 256".into(),
        ));
    }
    if trial.storage_mib == 0 {
        return Err(invalid(
            "billing.trial.storage_mib",
            "must be at least 1".into(),
        ));
    }
    if !(1..=3650).contains(&trial.validity_days) {
        return Err(invalid(
            "billing.trial.validity_days",
            "must be 1 to 3650".into(),
        ));
    }
    if file.sandbox_delivery_delay_ms > 60_000 {
        return Err(invalid(
            "billing.sandbox_delivery_delay_ms",
            "must be at most 60000".into(),
        ));
    }
    let webhook_secret_file = if file.webhook_secret_file.as_os_str().is_empty() {
        keys_dir.join("payments-webhook.secret")
    } else {
        config_dir.join(&file.webhook_secret_file)
    };
    let provider = match file.provider.as_str() {
        "sandbox" => ProviderChoice::Sandbox,
        "stripe" => {
            if file.stripe.secret_key_file.as_os_str().is_empty() {
                return Err(invalid(
                    "billing.stripe.secret_key_file",
                    "the stripe provider needs the file holding the secret API key".into(),
                ));
            }
            if file.webhook_secret_file.as_os_str().is_empty() {
                return Err(invalid(
                    "billing.webhook_secret_file",
                    "the stripe provider needs the file holding Stripe's webhook signing secret"
                        .into(),
                ));
            }
            let api_url = file.stripe.api_url.trim_end_matches('/').to_owned();
            if !(api_url.starts_with("https://") || api_url.starts_with("http://127.0.0.1:")) {
                return Err(invalid(
                    "billing.stripe.api_url",
                    "must be an https:// URL".into(),
                ));
            }
            ProviderChoice::Stripe {
                api_url,
                secret_key_file: config_dir.join(&file.stripe.secret_key_file),
            }
        }
        other => {
            return Err(invalid(
                "billing.provider",
                format!("{other:?} is not a provider; use \"sandbox\" or \"stripe\""),
            ))
        }
    };
    Ok(BillingPolicy {
        provider,
        signup_grant_seconds: file.signup_grant_seconds,
        host_share_percent: file.host_share_percent,
        warning_seconds: file.warning_seconds,
        webhook_secret_file,
        sandbox_delivery_delay: std::time::Duration::from_millis(file.sandbox_delivery_delay_ms),
        trial: TrialLimits {
            sessions_at_once: trial.sessions_at_once,
            cpu_cores: trial.cpu_cores,
            memory_mib: trial.memory_mib,
            storage_mib: trial.storage_mib,
            validity_days: trial.validity_days,
        },
    })
}

/// Checks `[store]`; a relative `path` is resolved against `config_dir`,
/// the default is `store` in `keys_dir`.
fn store_policy(
    file: StoreFile,
    config_dir: &Path,
    keys_dir: &Path,
    invalid: &impl Fn(&'static str, String) -> ConfigError,
) -> Result<StorePolicy, ConfigError> {
    if !(1..=1000).contains(&file.keep_versions) {
        return Err(invalid("store.keep_versions", "must be 1 to 1000".into()));
    }
    let location = if file.url.is_empty() {
        for (key, set) in [
            ("store.endpoint", !file.endpoint.is_empty()),
            ("store.region", !file.region.is_empty()),
            (
                "store.access_key_id_file",
                !file.access_key_id_file.as_os_str().is_empty(),
            ),
            (
                "store.secret_access_key_file",
                !file.secret_access_key_file.as_os_str().is_empty(),
            ),
        ] {
            if set {
                return Err(invalid(
                    key,
                    "is for an s3:// store; set store.url too".into(),
                ));
            }
        }
        StoreLocation::Local(if file.path.as_os_str().is_empty() {
            keys_dir.join("store")
        } else {
            config_dir.join(&file.path)
        })
    } else {
        if !file.path.as_os_str().is_empty() {
            return Err(invalid(
                "store.path",
                "give either path (a local directory) or url (s3://…), not both".into(),
            ));
        }
        let Some(rest) = file.url.strip_prefix("s3://") else {
            return Err(invalid(
                "store.url",
                "must look like s3://bucket/prefix".into(),
            ));
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let prefix = prefix.trim_matches('/');
        let bucket_ok = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !bucket_ok {
            return Err(invalid(
                "store.url",
                "the bucket must be 3 to 63 lower-case letters, digits, dots and dashes".into(),
            ));
        }
        if prefix.contains("//") || prefix.contains('?') || prefix.contains('#') {
            return Err(invalid(
                "store.url",
                "the prefix must be a plain path, like s3://bucket/opencloud".into(),
            ));
        }
        if file.region.is_empty() {
            return Err(invalid(
                "store.region",
                "an s3:// store needs its region (any name the service accepts, such as us-east-1)"
                    .into(),
            ));
        }
        let endpoint = file.endpoint.trim_end_matches('/').to_owned();
        if !(endpoint.is_empty()
            || endpoint.starts_with("https://")
            || endpoint.starts_with("http://127.0.0.1:")
            || endpoint.starts_with("http://localhost:"))
        {
            return Err(invalid(
                "store.endpoint",
                "must be an https:// URL (http:// only on loopback)".into(),
            ));
        }
        for (key, value) in [
            ("store.access_key_id_file", &file.access_key_id_file),
            ("store.secret_access_key_file", &file.secret_access_key_file),
        ] {
            if value.as_os_str().is_empty() {
                return Err(invalid(
                    key,
                    "an s3:// store needs the owner-only file holding this credential".into(),
                ));
            }
        }
        StoreLocation::S3 {
            bucket: bucket.to_owned(),
            prefix: prefix.to_owned(),
            endpoint,
            region: file.region,
            access_key_id_file: config_dir.join(&file.access_key_id_file),
            secret_access_key_file: config_dir.join(&file.secret_access_key_file),
        }
    };
    Ok(StorePolicy {
        location,
        keep_versions: file.keep_versions,
    })
}

impl Config {
    /// Loads `path`, applies `OPENCLOUD_CONTROL__…` overrides from the
    /// process environment, reads the keys file and validates everything.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        config::load(path, Self::from_toml)
    }

    pub fn from_toml(
        path: &Path,
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let (file, invalid) = config::parse_file::<ControlFile>(path, text, ENV_PREFIX, env)?;

        let origins = Origins::parse(&file.public_url, &file.session_domain)
            .map_err(|e| invalid(e.key, e.message))?;
        if let Some(n) = file
            .gateway_keys
            .iter()
            .position(|k| k.chars().count() < MIN_GATEWAY_KEY_CHARS || k.trim() != k)
        {
            return Err(invalid(
                "gateway_keys",
                format!(
                    "key #{} must be at least {MIN_GATEWAY_KEY_CHARS} characters, without surrounding spaces",
                    n + 1
                ),
            ));
        }
        let grafana_url = match file.grafana_url.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(url) => Some(
                web_url(url)
                    .map_err(|message| invalid("grafana_url", message))?
                    .to_owned(),
            ),
        };
        if !file.database.url.starts_with("mysql://") {
            return Err(invalid("database.url", "must start with mysql://".into()));
        }
        if file.database.pool_max == 0 || file.database.pool_min > file.database.pool_max {
            return Err(invalid(
                "database.pool_max",
                format!(
                    "must be at least 1 and at least pool_min ({})",
                    file.database.pool_min
                ),
            ));
        }
        if file.passwords.pbkdf2_iterations < MIN_PBKDF2_ITERATIONS {
            return Err(invalid(
                "passwords.pbkdf2_iterations",
                format!("must be at least {MIN_PBKDF2_ITERATIONS}"),
            ));
        }
        let login = file.login;
        if login.failures_before_throttle == 0 || login.first_delay_seconds == 0 {
            return Err(invalid(
                "login.failures_before_throttle",
                "failures_before_throttle and first_delay_seconds must be above 0".into(),
            ));
        }
        let registration = file.registration;
        if registration.per_client == 0 {
            return Err(invalid(
                "registration.per_client",
                "must be at least 1".into(),
            ));
        }
        if !(1..=MAX_REGISTRATION_WINDOW_SECONDS).contains(&registration.window_seconds) {
            return Err(invalid(
                "registration.window_seconds",
                format!("must be 1 to {MAX_REGISTRATION_WINDOW_SECONDS} seconds"),
            ));
        }

        if file.sessions.idle_timeout_seconds < 10 {
            return Err(invalid(
                "sessions.idle_timeout_seconds",
                "must be at least 10".into(),
            ));
        }

        let keys = config::load_keys(path, &file.keys_file)?;
        let config_dir = path.parent().unwrap_or(Path::new("."));
        let host_ca_dir = config_dir
            .join(&file.keys_file)
            .parent()
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        let billing = billing_policy(file.billing, config_dir, &host_ca_dir, &invalid)?;
        let store = store_policy(file.store, config_dir, &host_ca_dir, &invalid)?;

        Ok(Self {
            secure_cookies: origins.platform.https(),
            public_origin: origins.platform.as_str().to_owned(),
            session_domain: origins.sessions,
            gateway_keys: GatewayKeys(file.gateway_keys),
            keys,
            host_ca_dir,
            trusted_proxies: file.trusted_proxies,
            allow_private_hosts: file.allow_private_hosts,
            listen_public: file.listen.public,
            listen_internal: file.listen.internal,
            database_url: file.database.url,
            pool_min: file.database.pool_min,
            pool_max: file.database.pool_max,
            login: LoginPolicy {
                failures_before_throttle: login.failures_before_throttle,
                window_seconds: login.window_seconds,
                first_delay_seconds: login.first_delay_seconds,
                max_delay_seconds: login.max_delay_seconds,
                client_failure_cap: login.client_failure_cap,
            },
            billing,
            store,
            registration: RegistrationPolicy {
                per_client: registration.per_client,
                window_seconds: registration.window_seconds,
            },
            pbkdf2_iterations: file.passwords.pbkdf2_iterations,
            idle_timeout: std::time::Duration::from_secs(file.sessions.idle_timeout_seconds),
            grafana_url,
        })
    }
}

/// `url` if it is an absolute http:// or https:// URL with a host.
fn web_url(url: &str) -> Result<&str, String> {
    let parsed: axum::http::Uri = url.parse().map_err(|_| format!("{url:?} is not a URL"))?;
    let web = matches!(parsed.scheme_str(), Some("http" | "https"));
    if !web || parsed.host().is_none_or(str::is_empty) {
        return Err(format!("{url:?} must be an http:// or https:// URL"));
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_keys(dir: &Path) {
        config::write_private_file(&dir.join("keys.toml"), Keyring::generate_toml("k1")).unwrap();
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("oc-config-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        write_keys(&dir);
        dir
    }

    #[test]
    fn the_shipped_default_config_loads() {
        let dir = temp_dir("default");
        let text = include_str!("../../config/control.toml")
            .replace("../.local/secrets/keys.toml", "keys.toml");
        let config = Config::from_toml(&dir.join("control.toml"), &text, []).unwrap();
        assert_eq!(config.pbkdf2_iterations, 600_000);
        assert!(!config.secure_cookies);
    }

    #[test]
    fn a_grafana_url_must_be_a_web_url() {
        let dir = temp_dir("grafana");
        let text = include_str!("../../config/control.toml")
            .replace("../.local/secrets/keys.toml", "keys.toml");
        let path = dir.join("control.toml");
        let with = |url: &str| {
            Config::from_toml(
                &path,
                &text,
                [(
                    "OPENCLOUD_CONTROL__GRAFANA_URL".to_string(),
                    url.to_string(),
                )],
            )
        };
        assert_eq!(with("").unwrap().grafana_url, None);
        assert_eq!(
            with("https://grafana.example/d/opencloud")
                .unwrap()
                .grafana_url,
            Some("https://grafana.example/d/opencloud".to_string())
        );
        for bad in [
            "grafana.example",
            "ftp://grafana.example",
            "javascript:alert(1)",
            "https://",
        ] {
            let err = with(bad).unwrap_err().to_string();
            assert!(err.contains("key `grafana_url`"), "{bad}: {err}");
        }
    }

    #[test]
    fn a_path_in_public_url_is_refused() {
        let dir = temp_dir("origin");
        let text = include_str!("../../config/control.toml")
            .replace("../.local/secrets/keys.toml", "keys.toml");
        let err = Config::from_toml(
            &dir.join("control.toml"),
            &text,
            [(
                "OPENCLOUD_CONTROL__PUBLIC_URL".to_string(),
                "https://x.example/app".to_string(),
            )],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("key `public_url`"), "{err}");
    }

    #[test]
    fn short_gateway_keys_and_a_session_domain_equal_to_the_platform_are_refused() {
        let dir = temp_dir("gateway-keys");
        let text = include_str!("../../config/control.toml")
            .replace("../.local/secrets/keys.toml", "keys.toml");
        let path = dir.join("control.toml");
        let err = Config::from_toml(
            &path,
            &text,
            [(
                "OPENCLOUD_CONTROL__GATEWAY_KEYS".to_string(),
                "[\"short\"]".to_string(),
            )],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("key `gateway_keys`"), "{err}");
        let err = Config::from_toml(
            &path,
            &text,
            [(
                "OPENCLOUD_CONTROL__SESSION_DOMAIN".to_string(),
                "localhost:8080".to_string(),
            )],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("key `session_domain`"), "{err}");
        let config = Config::from_toml(&path, &text, []).unwrap();
        assert_eq!(config.session_domain.as_str(), "nb.localhost:8080");
        assert!(!config.gateway_keys.is_empty());
        assert!(!format!("{config:?}").contains("local-development"));
        assert_eq!(config.session_origin("abc"), "http://abc.nb.localhost:8080");
    }

    #[test]
    fn registration_limits_default_and_bad_ones_are_named() {
        let dir = temp_dir("registration");
        let text = include_str!("../../config/control.toml")
            .replace("../.local/secrets/keys.toml", "keys.toml");
        let path = dir.join("control.toml");
        let config = Config::from_toml(&path, &text, []).unwrap();
        assert_eq!(config.registration.per_client, 10);
        assert_eq!(config.registration.window_seconds, 3600);
        for (key, value, named) in [
            ("PER_CLIENT", "0", "registration.per_client"),
            ("WINDOW_SECONDS", "0", "registration.window_seconds"),
            ("WINDOW_SECONDS", "86401", "registration.window_seconds"),
            ("PER_HOUR", "5", "per_hour"),
        ] {
            let env = [(
                format!("OPENCLOUD_CONTROL__REGISTRATION__{key}"),
                value.to_string(),
            )];
            let err = Config::from_toml(&path, &text, env)
                .unwrap_err()
                .to_string();
            assert!(err.contains(named), "{key}={value}: {err}");
        }
    }

    #[test]
    fn a_stripe_provider_without_its_key_or_an_unknown_provider_is_named() {
        let dir = temp_dir("billing");
        // The shipped file without its own [billing] tables, which each case replaces.
        let shipped = include_str!("../../config/control.toml")
            .replace("../.local/secrets/keys.toml", "keys.toml");
        let text = shipped.split("\n# Money.").next().unwrap_or_default();
        let defaults = Config::from_toml(&dir.join("control.toml"), &shipped, []).unwrap();
        assert_eq!(defaults.billing.provider, ProviderChoice::Sandbox);
        assert_eq!(defaults.billing.host_share_percent, 70);
        let path = dir.join("control.toml");
        for (billing, named) in [
            (
                "provider = \"stripe\"\nwebhook_secret_file = \"whsec\"",
                "billing.stripe.secret_key_file",
            ),
            (
                "provider = \"stripe\"\n[billing.stripe]\nsecret_key_file = \"sk\"",
                "billing.webhook_secret_file",
            ),
            (
                "provider = \"stripe\"\nwebhook_secret_file = \"whsec\"\n\
                 [billing.stripe]\nsecret_key_file = \"sk\"\napi_url = \"http://stripe.example\"",
                "billing.stripe.api_url",
            ),
            ("provider = \"paypal\"", "billing.provider"),
        ] {
            let err = Config::from_toml(&path, &format!("{text}\n[billing]\n{billing}\n"), [])
                .unwrap_err()
                .to_string();
            assert!(err.contains(named), "{billing}: {err}");
        }
        let stripe = "provider = \"stripe\"\nwebhook_secret_file = \"whsec\"\n\
            [billing.stripe]\nsecret_key_file = \"sk\"\napi_url = \"http://127.0.0.1:9/\"";
        let config =
            Config::from_toml(&path, &format!("{text}\n[billing]\n{stripe}\n"), []).unwrap();
        assert_eq!(
            config.billing.provider,
            ProviderChoice::Stripe {
                api_url: "http://127.0.0.1:9".into(),
                secret_key_file: dir.join("sk"),
            }
        );
    }

    #[test]
    fn the_store_defaults_beside_the_keys_and_bad_store_keys_are_named() {
        let dir = temp_dir("store");
        let shipped = include_str!("../../config/control.toml")
            .replace("../.local/secrets/keys.toml", "keys.toml");
        let path = dir.join("control.toml");
        // The shipped file keeps the local stack's projects under .local/.
        let config = Config::from_toml(&path, &shipped, []).unwrap();
        assert_eq!(
            config.store.location,
            StoreLocation::Local(dir.join("../.local/store"))
        );
        // Without a [store] section: beside the keys file.
        let text = shipped
            .split("\n# The project store:")
            .next()
            .unwrap_or_default();
        let config = Config::from_toml(&path, text, []).unwrap();
        assert_eq!(
            config.store.location,
            StoreLocation::Local(dir.join("store"))
        );
        assert_eq!(config.store.keep_versions, 10);
        assert_eq!(config.billing.trial.storage_mib, 1024);
        let config =
            Config::from_toml(&path, &format!("{text}\n[store]\npath = \"snaps\"\n"), []).unwrap();
        assert_eq!(
            config.store.location,
            StoreLocation::Local(dir.join("snaps"))
        );
        let s3 = "url = \"s3://oc-projects/prod/\"\nendpoint = \"https://s3.example.com/\"\n\
            region = \"eu-1\"\naccess_key_id_file = \"id\"\nsecret_access_key_file = \"secret\"";
        let config = Config::from_toml(&path, &format!("{text}\n[store]\n{s3}\n"), []).unwrap();
        assert_eq!(
            config.store.location,
            StoreLocation::S3 {
                bucket: "oc-projects".into(),
                prefix: "prod".into(),
                endpoint: "https://s3.example.com".into(),
                region: "eu-1".into(),
                access_key_id_file: dir.join("id"),
                secret_access_key_file: dir.join("secret"),
            }
        );
        for (store, named) in [
            ("keep_versions = 0", "store.keep_versions"),
            ("url = \"https://bucket\"", "store.url"),
            ("url = \"s3://B\"\nregion = \"r\"", "store.url"),
            ("url = \"s3://bucket\"", "store.region"),
            (
                "url = \"s3://bucket\"\nregion = \"r\"\nendpoint = \"http://s3.example.com\"",
                "store.endpoint",
            ),
            (
                "url = \"s3://bucket\"\nregion = \"r\"\naccess_key_id_file = \"id\"",
                "store.secret_access_key_file",
            ),
            ("path = \"p\"\nurl = \"s3://bucket\"", "store.path"),
            ("region = \"r\"", "store.region"),
            ("access_key_id = \"AKIA\"", "access_key_id"),
        ] {
            let err = Config::from_toml(&path, &format!("{text}\n[store]\n{store}\n"), [])
                .unwrap_err()
                .to_string();
            assert!(err.contains(named), "{store}: {err}");
        }
        let err = Config::from_toml(
            &path,
            text,
            [(
                "OPENCLOUD_CONTROL__BILLING__TRIAL__STORAGE_MIB".to_string(),
                "0".to_string(),
            )],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("billing.trial.storage_mib"), "{err}");
    }

    #[test]
    fn weak_password_hashing_is_refused() {
        let dir = temp_dir("pbkdf2");
        let text = include_str!("../../config/control.toml")
            .replace("../.local/secrets/keys.toml", "keys.toml");
        let err = Config::from_toml(
            &dir.join("control.toml"),
            &format!("{text}\n[passwords]\npbkdf2_iterations = 1000\n"),
            [],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("passwords.pbkdf2_iterations"), "{err}");
    }
}
