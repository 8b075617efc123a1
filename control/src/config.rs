//! Control's config: what the file says (`ControlFile`, strict) and the
//! validated form the service runs on (`Config`). Validation happens once,
//! at start, and names the file and key that is wrong.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use opencloud_protocol::{config, Keyring};
use serde::Deserialize;

/// Environment overrides look like `OPENCLOUD_CONTROL__DATABASE__URL`.
pub const ENV_PREFIX: &str = "OPENCLOUD_CONTROL";

/// PBKDF2 rounds below this are refused (OWASP 2023 for PBKDF2-HMAC-SHA256).
pub const MIN_PBKDF2_ITERATIONS: u32 = 600_000;

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
    listen: ListenFile,
    database: DatabaseFile,
    #[serde(default)]
    login: LoginFile,
    #[serde(default)]
    passwords: PasswordsFile,
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

/// The validated config control runs on.
#[derive(Debug, Clone)]
pub struct Config {
    /// Scheme, host and port, no trailing slash: `http://localhost:8080`.
    pub public_origin: String,
    pub secure_cookies: bool,
    pub keys: Keyring,
    pub trusted_proxies: Vec<IpAddr>,
    pub listen_public: SocketAddr,
    pub listen_internal: SocketAddr,
    pub database_url: String,
    pub pool_min: usize,
    pub pool_max: usize,
    pub login: LoginPolicy,
    pub pbkdf2_iterations: u32,
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

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    File(#[from] config::ConfigError),
    #[error("{file}: key `{key}`: {message}")]
    Invalid {
        file: String,
        key: &'static str,
        message: String,
    },
    #[error(transparent)]
    Keys(#[from] opencloud_protocol::KeyringError),
}

impl Config {
    /// Loads `path`, applies `OPENCLOUD_CONTROL__…` overrides from the
    /// process environment, reads the keys file and validates everything.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = read(path)?;
        Self::from_toml(path, &text, std::env::vars())
    }

    pub fn from_toml(
        path: &Path,
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let file_name = path.display().to_string();
        let file: ControlFile = config::parse(&file_name, text, ENV_PREFIX, env)?;
        let invalid = |key: &'static str, message: String| ConfigError::Invalid {
            file: file_name.clone(),
            key,
            message,
        };

        let public_origin = parse_origin(&file.public_url).map_err(|m| invalid("public_url", m))?;
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

        let keys_path = path
            .parent()
            .unwrap_or(Path::new("."))
            .join(&file.keys_file);
        let keys = Keyring::from_toml(&keys_path.display().to_string(), &read(&keys_path)?)?;

        Ok(Self {
            secure_cookies: public_origin.starts_with("https://"),
            public_origin,
            keys,
            trusted_proxies: file.trusted_proxies,
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
            pbkdf2_iterations: file.passwords.pbkdf2_iterations,
        })
    }
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// `http(s)://host[:port]` with an optional trailing slash, nothing else.
fn parse_origin(url: &str) -> Result<String, String> {
    let trimmed = url.trim_end_matches('/');
    let rest = trimmed
        .strip_prefix("http://")
        .or_else(|| trimmed.strip_prefix("https://"))
        .ok_or_else(|| format!("`{url}` must start with http:// or https://"))?;
    if rest.is_empty() || rest.contains(['/', '?', '#', '@', ' ']) {
        return Err(format!(
            "`{url}` must be a bare origin like https://opencloud.example (no path)"
        ));
    }
    Ok(trimmed.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_keys(dir: &Path) {
        std::fs::write(dir.join("keys.toml"), Keyring::generate_toml("k1")).unwrap();
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
        let text =
            include_str!("../../config/control.toml").replace("../.local/keys.toml", "keys.toml");
        let config = Config::from_toml(&dir.join("control.toml"), &text, []).unwrap();
        assert_eq!(config.pbkdf2_iterations, 600_000);
        assert!(!config.secure_cookies);
    }

    #[test]
    fn a_path_in_public_url_is_refused() {
        let dir = temp_dir("origin");
        let text =
            include_str!("../../config/control.toml").replace("../.local/keys.toml", "keys.toml");
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
    fn weak_password_hashing_is_refused() {
        let dir = temp_dir("pbkdf2");
        let text =
            include_str!("../../config/control.toml").replace("../.local/keys.toml", "keys.toml");
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
