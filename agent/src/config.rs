//! The agent's config: what the file says (strict) and the validated form the
//! agent runs on.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use opencloud_protocol::agent::Capacity;
use opencloud_protocol::config;
use serde::Deserialize;

pub use crate::sandbox::Egress;

pub use opencloud_protocol::config::ConfigError;

/// Environment overrides look like `OPENCLOUD_AGENT__CAPACITY__MAX_SESSIONS`.
pub const ENV_PREFIX: &str = "OPENCLOUD_AGENT";

/// Where `scripts/test` and `scripts/up` build the Jupyter venv.
pub const DEFAULT_VENV: &str = "/opt/opencloud/venv";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentFile {
    /// Control's public URL, e.g. `http://127.0.0.1:8081`.
    control_url: String,
    host_key: String,
    /// The IP address gateways connect to (the host link listens on it).
    address: String,
    /// The host link's port: every session is reached through it, and it
    /// answers `/healthz`.
    link_port: u16,
    /// Keys from earlier versions, named in a clear refusal.
    #[serde(default)]
    health_port: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    port_range: Option<serde::de::IgnoredAny>,
    capacity: CapacityFile,
    /// Project files, homes, logs and session state (relative to this file).
    work_dir: PathBuf,
    #[serde(default = "default_venv")]
    venv: PathBuf,
    #[serde(default)]
    metrics_listen: Option<SocketAddr>,
    /// When set, a scrape must send `Authorization: Bearer <metrics_key>`.
    #[serde(default)]
    metrics_key: Option<String>,
    #[serde(default = "default_stop_grace")]
    stop_grace_seconds: u64,
    #[serde(default = "default_start_timeout")]
    start_timeout_seconds: u64,
    /// How often a running session's files are pushed when they changed.
    #[serde(default = "default_autosave_interval")]
    autosave_interval_seconds: u64,
    /// How long a stop waits for the last snapshot before it is reported.
    #[serde(default = "default_final_snapshot")]
    final_snapshot_seconds: u64,
    /// What sessions may reach: `internet` (never the host or its LAN) or `none`.
    #[serde(default)]
    egress: Egress,
    /// Jupyter servers kept started and ready for the next opens.
    #[serde(default = "default_warm_pool")]
    warm_pool: u32,
    /// Servers starting at once (cold starts and warm refills); the rest wait
    /// their turn in arrival order. Default: the machine's CPU count.
    #[serde(default)]
    start_concurrency: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CapacityFile {
    max_sessions: u32,
    cpu_cores: f32,
    memory_mib: u64,
}

/// The shortest metrics key accepted.
pub const METRICS_KEY_MIN_CHARS: usize = 32;

fn default_venv() -> PathBuf {
    PathBuf::from(DEFAULT_VENV)
}

fn default_stop_grace() -> u64 {
    10
}

fn default_start_timeout() -> u64 {
    60
}

fn default_autosave_interval() -> u64 {
    60
}

/// Shorter autosaves would pack big projects back to back.
pub const AUTOSAVE_MIN_SECONDS: u64 = 5;

fn default_final_snapshot() -> u64 {
    60
}

fn default_warm_pool() -> u32 {
    1
}

/// A Jupyter start keeps about one core busy: one start per core at once.
fn default_start_concurrency() -> u32 {
    std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1)
}

/// The validated config the agent runs on.
#[derive(Clone)]
pub struct Config {
    /// No trailing slash.
    pub control_url: String,
    pub host_key: String,
    pub address: IpAddr,
    pub link_port: u16,
    pub capacity: Capacity,
    /// Absolute.
    pub work_dir: PathBuf,
    /// Absolute; `bin/jupyter` exists in it.
    pub venv: PathBuf,
    pub metrics_listen: Option<SocketAddr>,
    /// What a scrape of `/metrics` must present; never printed.
    pub metrics_key: Option<String>,
    /// SIGTERM → SIGKILL when control does not say otherwise.
    pub stop_grace: Duration,
    /// Spawn → `/api/status` answering, or the start failed.
    pub start_timeout: Duration,
    pub egress: Egress,
    /// Between checks of a running session's files for changes to push.
    pub autosave_interval: Duration,
    /// The bound on a stopping session's last snapshot.
    pub final_snapshot: Duration,
    /// Ready servers kept for the next opens (at most `capacity.max_sessions`).
    pub warm_pool: u32,
    /// Servers starting at once; at least 1.
    pub start_concurrency: u32,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the host key.
        f.debug_struct("Config")
            .field("control_url", &self.control_url)
            .field("address", &self.address)
            .field("link_port", &self.link_port)
            .field("capacity", &self.capacity)
            .field("work_dir", &self.work_dir)
            .field("venv", &self.venv)
            .field("metrics_listen", &self.metrics_listen)
            .field("metrics_key", &self.metrics_key.as_ref().map(|_| "…"))
            .field("stop_grace", &self.stop_grace)
            .field("start_timeout", &self.start_timeout)
            .field("egress", &self.egress)
            .field("autosave_interval", &self.autosave_interval)
            .field("final_snapshot", &self.final_snapshot)
            .field("warm_pool", &self.warm_pool)
            .field("start_concurrency", &self.start_concurrency)
            .finish_non_exhaustive()
    }
}

impl Config {
    /// Reads `path` with `OPENCLOUD_AGENT__…` overrides from the environment.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        config::load(path, Self::from_toml)
    }

    /// Parses and validates `text` as if read from `path` (relative paths in
    /// it are taken from the file's directory).
    pub fn from_toml(
        path: &Path,
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let (file, invalid) = config::parse_file::<AgentFile>(path, text, ENV_PREFIX, env)?;

        let control_url = file.control_url.trim_end_matches('/').to_owned();
        match control_url.split_once("://") {
            Some(("http", rest)) if !rest.is_empty() => {}
            Some(("https", _)) => {
                return Err(invalid(
                    "control_url",
                    "https is not supported by this build yet; use http:// (e.g. through a local TLS terminator)".into(),
                ))
            }
            _ => {
                return Err(invalid(
                    "control_url",
                    "must be a URL like http://127.0.0.1:8081".into(),
                ))
            }
        }

        if file.host_key.is_empty() || !file.host_key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(invalid(
                "host_key",
                "must be the key shown when the host was added (printable characters, no spaces)"
                    .into(),
            ));
        }

        let address: IpAddr = file.address.parse().map_err(|_| {
            invalid(
                "address",
                format!("`{}` is not an IP address", file.address),
            )
        })?;
        if address.is_unspecified() {
            return Err(invalid(
                "address",
                "must be an address gateways can connect to, not an unspecified one".into(),
            ));
        }

        for (key, used) in [
            ("health_port", file.health_port.is_some()),
            ("port_range", file.port_range.is_some()),
        ] {
            if used {
                return Err(invalid(
                    key,
                    "is no longer used: gateways reach every session through link_port, \
                     and Jupyter servers listen on private sockets; remove it"
                        .into(),
                ));
            }
        }
        if file.link_port == 0 {
            return Err(invalid("link_port", "must be a port above 0".into()));
        }

        if file.autosave_interval_seconds < AUTOSAVE_MIN_SECONDS {
            return Err(invalid(
                "autosave_interval_seconds",
                format!("must be at least {AUTOSAVE_MIN_SECONDS}"),
            ));
        }
        if file.final_snapshot_seconds == 0 {
            return Err(invalid("final_snapshot_seconds", "must be above 0".into()));
        }

        let capacity = &file.capacity;
        if capacity.max_sessions == 0 {
            return Err(invalid("capacity.max_sessions", "must be above 0".into()));
        }
        if !(capacity.cpu_cores.is_finite() && capacity.cpu_cores > 0.0) {
            return Err(invalid("capacity.cpu_cores", "must be above 0".into()));
        }
        if capacity.memory_mib == 0 {
            return Err(invalid("capacity.memory_mib", "must be above 0".into()));
        }
        if file.warm_pool > capacity.max_sessions {
            return Err(invalid(
                "warm_pool",
                format!(
                    "must be at most capacity.max_sessions ({}): warm servers take session slots",
                    capacity.max_sessions
                ),
            ));
        }
        let start_concurrency = match file.start_concurrency {
            Some(0) => {
                return Err(invalid(
                    "start_concurrency",
                    "must be above 0 (leave it out for one start per CPU)".into(),
                ))
            }
            Some(n) => n,
            None => default_start_concurrency(),
        };
        if file.stop_grace_seconds == 0 {
            return Err(invalid("stop_grace_seconds", "must be above 0".into()));
        }
        if file.start_timeout_seconds == 0 {
            return Err(invalid("start_timeout_seconds", "must be above 0".into()));
        }
        let metrics_key = match file.metrics_key {
            Some(key) if key.len() < METRICS_KEY_MIN_CHARS => {
                return Err(invalid(
                    "metrics_key",
                    format!("must be at least {METRICS_KEY_MIN_CHARS} characters"),
                ))
            }
            key => key,
        };

        let base = path.parent().unwrap_or(Path::new("."));
        let absolute = |key: &'static str, p: &Path| {
            std::path::absolute(base.join(p))
                .map_err(|e| invalid(key, format!("{}: {e}", p.display())))
        };
        let work_dir = absolute("work_dir", &file.work_dir)?;
        let venv = absolute("venv", &file.venv)?;
        if !venv.join("bin/jupyter").is_file() {
            return Err(invalid(
                "venv",
                format!(
                    "{} has no bin/jupyter (scripts/test and scripts/up build the venv)",
                    venv.display()
                ),
            ));
        }

        Ok(Self {
            control_url,
            host_key: file.host_key,
            address,
            link_port: file.link_port,
            capacity: Capacity {
                max_sessions: capacity.max_sessions,
                cpu_cores: capacity.cpu_cores,
                memory_mib: capacity.memory_mib,
            },
            work_dir,
            venv,
            metrics_listen: file.metrics_listen,
            metrics_key,
            stop_grace: Duration::from_secs(file.stop_grace_seconds),
            start_timeout: Duration::from_secs(file.start_timeout_seconds),
            egress: file.egress,
            autosave_interval: Duration::from_secs(file.autosave_interval_seconds),
            final_snapshot: Duration::from_secs(file.final_snapshot_seconds),
            warm_pool: file.warm_pool,
            start_concurrency,
        })
    }

    /// Where the host link (and `/healthz`) listens.
    pub fn link_addr(&self) -> SocketAddr {
        SocketAddr::new(self.address, self.link_port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A venv stand-in: the config only checks that `bin/jupyter` exists.
    fn fake_venv() -> PathBuf {
        // One fixed place, so runs do not pile up copies.
        let dir = std::env::temp_dir().join("oc-agent-config-venv");
        std::fs::create_dir_all(dir.join("bin")).unwrap();
        std::fs::write(dir.join("bin/jupyter"), "#!/bin/sh\n").unwrap();
        dir
    }

    fn text(extra: &str) -> String {
        format!(
            r#"
control_url = "http://127.0.0.1:8081/"
host_key = "hk_0123456789abcdef"
address = "127.0.0.1"
link_port = 9300
work_dir = "work"
venv = "{}"
{extra}
[capacity]
max_sessions = 4
cpu_cores = 2.0
memory_mib = 4096
"#,
            fake_venv().display()
        )
    }

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(Path::new("/etc/oc/agent.toml"), text, Vec::new())
    }

    fn error(text: &str) -> String {
        load(text).unwrap_err().to_string()
    }

    #[test]
    fn a_good_config_is_read_with_defaults() {
        let config = load(&text("")).unwrap();
        assert_eq!(config.control_url, "http://127.0.0.1:8081");
        assert_eq!(config.work_dir, PathBuf::from("/etc/oc/work"));
        assert_eq!(config.stop_grace, Duration::from_secs(10));
        assert_eq!(config.start_timeout, Duration::from_secs(60));
        assert_eq!(config.autosave_interval, Duration::from_secs(60));
        assert_eq!(config.final_snapshot, Duration::from_secs(60));
        assert_eq!(config.metrics_listen, None);
        assert_eq!(config.capacity.max_sessions, 4);
        assert_eq!(config.link_addr().to_string(), "127.0.0.1:9300");
    }

    #[test]
    fn the_default_venv_is_the_shared_one() {
        assert_eq!(default_venv(), PathBuf::from("/opt/opencloud/venv"));
    }

    #[test]
    fn the_host_key_is_never_printed() {
        let config = load(&text("")).unwrap();
        assert!(!format!("{config:?}").contains("hk_0123"));
    }

    #[test]
    fn an_unknown_key_is_named() {
        let err = error(&text("colour = \"blue\""));
        assert!(err.starts_with("/etc/oc/agent.toml: key `colour`"), "{err}");
        let err = error(&text("").replace("max_sessions = 4", "max_sessions = 4\ndisks = 2"));
        assert!(err.contains("key `capacity.disks`"), "{err}");
    }

    #[test]
    fn keys_of_the_per_session_ports_are_refused_by_name() {
        let err = error(&text("port_range = [9400, 9499]"));
        assert!(err.contains("key `port_range`"), "{err}");
        assert!(err.contains("link_port"), "{err}");
        let err = error(&text("health_port = 9201"));
        assert!(err.contains("key `health_port`"), "{err}");
        let err = error(&text("").replace("link_port = 9300", "link_port = 0"));
        assert!(err.contains("key `link_port`"), "{err}");
    }

    #[test]
    fn capacity_must_be_above_zero() {
        let err = error(&text("").replace("max_sessions = 4", "max_sessions = 0"));
        assert!(err.contains("key `capacity.max_sessions`"), "{err}");
        let err = error(&text("").replace("cpu_cores = 2.0", "cpu_cores = 0.0"));
        assert!(err.contains("key `capacity.cpu_cores`"), "{err}");
        let err = error(&text("").replace("memory_mib = 4096", "memory_mib = 0"));
        assert!(err.contains("key `capacity.memory_mib`"), "{err}");
    }

    #[test]
    fn the_address_must_be_a_connectable_ip() {
        let err = error(&text("").replace("\"127.0.0.1\"", "\"localhost\""));
        assert!(err.contains("key `address`"), "{err}");
        let err = error(&text("").replace("\"127.0.0.1\"", "\"0.0.0.0\""));
        assert!(err.contains("key `address`"), "{err}");
    }

    #[test]
    fn the_venv_must_hold_jupyter() {
        let err = error(&text("").replace(&fake_venv().display().to_string(), "/nonexistent"));
        assert!(err.contains("key `venv`"), "{err}");
        assert!(err.contains("/nonexistent has no bin/jupyter"), "{err}");
    }

    #[test]
    fn the_control_url_must_be_http() {
        let err = error(&text("").replace("http://127.0.0.1:8081/", "127.0.0.1:8081"));
        assert!(err.contains("key `control_url`"), "{err}");
    }

    #[test]
    fn the_example_host_configs_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../hosts.d");
        let mut loaded = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "toml") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            // The venv may not be built where unit tests run.
            let env = vec![(
                "OPENCLOUD_AGENT__VENV".to_owned(),
                fake_venv().display().to_string(),
            )];
            let config = Config::from_toml(&path, &text, env)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(config.metrics_listen.is_none_or(|a| a.ip().is_loopback()));
            loaded += 1;
        }
        assert!(loaded > 0, "no example config in {}", dir.display());
    }

    #[test]
    fn environment_overrides_apply_and_are_named_when_bad() {
        let config = Config::from_toml(
            Path::new("agent.toml"),
            &text(""),
            vec![("OPENCLOUD_AGENT__CAPACITY__MAX_SESSIONS".into(), "7".into())],
        )
        .unwrap();
        assert_eq!(config.capacity.max_sessions, 7);
        let err = Config::from_toml(
            Path::new("agent.toml"),
            &text(""),
            vec![("OPENCLOUD_AGENT__LINK_PORT".into(), "many".into())],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("key `link_port` (from OPENCLOUD_AGENT__LINK_PORT)"),
            "{err}"
        );
    }

    #[test]
    fn snapshot_timings_have_floors() {
        let config = load(&text(
            "autosave_interval_seconds = 5\nfinal_snapshot_seconds = 3",
        ))
        .unwrap();
        assert_eq!(config.autosave_interval, Duration::from_secs(5));
        assert_eq!(config.final_snapshot, Duration::from_secs(3));
        let err = error(&text("autosave_interval_seconds = 4"));
        assert!(err.contains("key `autosave_interval_seconds`"), "{err}");
        let err = error(&text("final_snapshot_seconds = 0"));
        assert!(err.contains("key `final_snapshot_seconds`"), "{err}");
    }

    #[test]
    fn the_warm_pool_fits_the_capacity_and_starts_are_paced() {
        let config = load(&text("")).unwrap();
        assert_eq!(config.warm_pool, 1);
        assert!(config.start_concurrency >= 1);
        let config = load(&text("warm_pool = 4\nstart_concurrency = 3")).unwrap();
        assert_eq!((config.warm_pool, config.start_concurrency), (4, 3));
        assert_eq!(load(&text("warm_pool = 0")).unwrap().warm_pool, 0);
        let err = error(&text("warm_pool = 5"));
        assert!(
            err.starts_with("/etc/oc/agent.toml: key `warm_pool`"),
            "{err}"
        );
        assert!(err.contains("capacity.max_sessions (4)"), "{err}");
        let err = error(&text("start_concurrency = 0"));
        assert!(err.contains("key `start_concurrency`"), "{err}");
    }

    #[test]
    fn egress_is_internet_unless_none_is_asked_for() {
        assert_eq!(load(&text("")).unwrap().egress, Egress::Internet);
        assert_eq!(
            load(&text("egress = \"none\"")).unwrap().egress,
            Egress::None
        );
        let err = error(&text("egress = \"lan\""));
        assert!(err.contains("egress"), "{err}");
    }
}
