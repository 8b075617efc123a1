//! Launching one `jupyter server` and asking it how it is.

use std::io::{Read, Seek, SeekFrom};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use serde::Deserialize;

use crate::users::RunAs;

/// The settings every session's server runs with (token kept out of pages,
/// no silent port change, remote Host headers allowed).
pub const SERVER_CONFIG: &str = include_str!("../../config/jupyter_server_config.py");

/// What one launch needs.
pub struct Launch<'a> {
    pub venv: &'a Path,
    pub addr: SocketAddr,
    pub project_dir: &'a Path,
    pub home: &'a Path,
    pub config_file: &'a Path,
    pub token: &'a str,
    pub run_as: &'a RunAs,
    /// Receives stdout and stderr.
    pub log: std::fs::File,
}

/// The command line, environment and identity of a session's server. The
/// token travels only in the environment: arguments are visible to every
/// user of the machine.
pub fn command(launch: Launch<'_>) -> std::io::Result<tokio::process::Command> {
    let mut command = tokio::process::Command::new(launch.venv.join("bin/jupyter"));
    command
        .arg("server")
        .arg("--no-browser")
        .arg(format!("--ServerApp.ip={}", launch.addr.ip()))
        .arg(format!("--ServerApp.port={}", launch.addr.port()))
        .arg(format!(
            "--ServerApp.root_dir={}",
            launch.project_dir.display()
        ))
        .arg("--ServerApp.base_url=/")
        .arg(format!("--config={}", launch.config_file.display()))
        .env_clear()
        .env(
            "PATH",
            format!(
                "{}:/usr/local/bin:/usr/bin:/bin",
                launch.venv.join("bin").display()
            ),
        )
        .env("HOME", launch.home)
        .env("LANG", "C.UTF-8")
        .env("JUPYTER_TOKEN", launch.token)
        .current_dir(launch.project_dir)
        // Its own group, so the server and its helpers are signalled together.
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(launch.log.try_clone()?)
        .stderr(launch.log)
        .kill_on_drop(false);
    if launch.run_as.switch {
        // std clears the supplementary groups when it switches the uid.
        command.uid(launch.run_as.uid).gid(launch.run_as.gid);
    }
    Ok(command)
}

/// A client for talking to local Jupyter servers: never through a proxy,
/// short timeouts.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(3))
        .build()
        .unwrap_or_else(|_| reqwest::Client::new())
}

#[derive(Debug, Deserialize)]
struct StatusBody {
    #[serde(default)]
    last_activity: Option<String>,
}

#[derive(Debug, Deserialize)]
struct KernelBody {
    #[serde(default)]
    execution_state: Option<String>,
}

/// `GET /api/status` with the token: `Some(last activity)` when it answers 200.
pub async fn status(http: &reqwest::Client, addr: SocketAddr, token: &str) -> Option<Option<u64>> {
    let body: StatusBody = get_json(http, addr, "/api/status", token).await?;
    Some(body.last_activity.as_deref().and_then(parse_timestamp))
}

/// How many kernels are executing code (`GET /api/kernels`).
pub async fn busy_kernels(http: &reqwest::Client, addr: SocketAddr, token: &str) -> Option<u32> {
    // Our own polling must not count as the user's activity, or the idle
    // culler could never stop the session.
    let kernels: Vec<KernelBody> =
        get_json(http, addr, "/api/kernels?no_track_activity=1", token).await?;
    Some(count_busy(&kernels))
}

/// `GET path` on the server with the token: the body when it answers 200.
async fn get_json<T: serde::de::DeserializeOwned>(
    http: &reqwest::Client,
    addr: SocketAddr,
    path: &str,
    token: &str,
) -> Option<T> {
    let response = http
        .get(format!("http://{addr}{path}"))
        .header("authorization", format!("token {token}"))
        .send()
        .await
        .ok()?;
    if response.status() != reqwest::StatusCode::OK {
        return None;
    }
    response.json().await.ok()
}

fn count_busy(kernels: &[KernelBody]) -> u32 {
    kernels
        .iter()
        .filter(|k| k.execution_state.as_deref() == Some("busy"))
        .count() as u32
}

/// Jupyter's ISO 8601 timestamps (`2026-11-25T10:00:00.123456Z`) as unix seconds.
pub fn parse_timestamp(text: &str) -> Option<u64> {
    let at =
        time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()?;
    u64::try_from(at.unix_timestamp()).ok()
}

/// The last `lines` lines of a log, with `secret` blanked out wherever it appears.
pub fn log_tail(path: &Path, lines: usize, secret: &str) -> String {
    const WINDOW: u64 = 64 * 1024;
    let mut text = Vec::new();
    if let Ok(mut file) = std::fs::File::open(path) {
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = file.seek(SeekFrom::Start(len.saturating_sub(WINDOW)));
        let _ = file.read_to_end(&mut text);
    }
    let text = String::from_utf8_lossy(&text);
    let all: Vec<&str> = text.lines().collect();
    let tail = all[all.len().saturating_sub(lines)..].join("\n");
    if secret.is_empty() {
        tail
    } else {
        tail.replace(secret, "[token]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_config_hides_the_token_and_pins_the_port() {
        assert!(SERVER_CONFIG.contains("page_config[\"token\"] = \"\""));
        assert!(SERVER_CONFIG.contains("port_retries = 0"));
        assert!(SERVER_CONFIG.contains("allow_remote_access = True"));
    }

    #[test]
    fn the_token_is_in_the_environment_not_the_arguments() {
        let log_path =
            std::env::temp_dir().join(format!("oc-agent-cmd-{}.log", std::process::id()));
        let log = std::fs::File::create(&log_path).unwrap();
        std::fs::remove_file(&log_path).unwrap();
        let run_as = crate::users::current();
        let command = command(Launch {
            venv: Path::new("/opt/venv"),
            addr: "127.0.0.1:9400".parse().unwrap(),
            project_dir: Path::new("/w/projects/1"),
            home: Path::new("/w/homes/u"),
            config_file: Path::new("/w/jupyter_server_config.py"),
            token: "secret-token",
            run_as: &run_as,
            log,
        })
        .unwrap();
        let std = command.as_std();
        let args: Vec<String> = std
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(std.get_program(), "/opt/venv/bin/jupyter");
        assert!(
            args.contains(&"--ServerApp.port=9400".to_owned()),
            "{args:?}"
        );
        assert!(args.contains(&"--ServerApp.root_dir=/w/projects/1".to_owned()));
        assert!(args.contains(&"--ServerApp.base_url=/".to_owned()));
        assert!(!args.iter().any(|a| a.contains("secret-token")), "{args:?}");
        let env: Vec<(String, String)> = std
            .get_envs()
            .filter_map(|(k, v)| {
                Some((
                    k.to_string_lossy().into_owned(),
                    v?.to_string_lossy().into_owned(),
                ))
            })
            .collect();
        let names: Vec<&str> = env.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, vec!["HOME", "JUPYTER_TOKEN", "LANG", "PATH"]);
        assert!(env.contains(&("JUPYTER_TOKEN".into(), "secret-token".into())));
    }

    #[test]
    fn timestamps_and_busy_kernels_are_read() {
        assert_eq!(
            parse_timestamp("2026-11-25T10:00:00.123456Z"),
            Some(1_795_600_800)
        );
        assert_eq!(
            parse_timestamp("2026-11-25T11:00:00+01:00"),
            Some(1_795_600_800)
        );
        assert_eq!(parse_timestamp("yesterday"), None);
        let kernels: Vec<KernelBody> = serde_json::from_str(
            r#"[{"id":"a","execution_state":"busy"},{"id":"b","execution_state":"idle"},{"id":"c"}]"#,
        )
        .unwrap();
        assert_eq!(count_busy(&kernels), 1);
    }

    #[test]
    fn the_log_tail_is_short_and_never_shows_the_token() {
        let path = std::env::temp_dir().join(format!("oc-agent-tail-{}.log", std::process::id()));
        let text: String = (1..=50).map(|i| format!("line {i} tok-123\n")).collect();
        std::fs::write(&path, text).unwrap();
        let tail = log_tail(&path, 20, "tok-123");
        assert_eq!(tail.lines().count(), 20);
        assert!(tail.starts_with("line 31 [token]"), "{tail}");
        assert!(!tail.contains("tok-123"));
        std::fs::remove_file(&path).unwrap();
        assert_eq!(log_tail(Path::new("/nonexistent"), 20, "x"), "");
    }
}
