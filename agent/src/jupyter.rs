//! Launching one `jupyter server` and asking it how it is.

use std::ffi::OsString;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde::Deserialize;

/// The settings every session's server runs with (token kept out of pages,
/// kernels over IPC, remote Host headers allowed).
pub const SERVER_CONFIG: &str = include_str!("../../config/jupyter_server_config.py");

/// Inside the sandbox's private `/tmp`: connection files and the kernels'
/// IPC sockets live there, out of every other session's sight, and their
/// paths stay far below the 107 bytes a Unix socket path may have.
pub const RUNTIME_DIR: &str = "/tmp/jupyter-runtime";

/// What one launch needs.
pub struct Launch<'a> {
    pub venv: &'a Path,
    /// The Unix socket Jupyter serves on (and nothing else).
    pub socket: &'a Path,
    pub project_dir: &'a Path,
    pub home: &'a Path,
    pub config_file: &'a Path,
    /// Put first on `JUPYTER_PATH`: holds the `python3` kernel spec.
    pub data_dir: &'a Path,
    /// Receives stdout and stderr.
    pub log: std::fs::File,
}

/// The sandboxed command line and environment of a session's server:
/// `<prefix: entry…, bwrap, sandbox…, --> jupyter server …`. No token: the
/// server trusts whoever reaches its socket (the agent, for the host link).
pub fn command(
    launch: Launch<'_>,
    prefix: Vec<OsString>,
) -> std::io::Result<tokio::process::Command> {
    let mut prefix = prefix.into_iter();
    let program = prefix
        .next()
        .ok_or_else(|| std::io::Error::other("no sandbox command"))?;
    let mut command = tokio::process::Command::new(program);
    command
        .args(prefix)
        .arg(launch.venv.join("bin/jupyter"))
        .args(server_args(&launch))
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
        .env("JUPYTER_RUNTIME_DIR", RUNTIME_DIR)
        .env("JUPYTER_PATH", launch.data_dir)
        .current_dir("/")
        // Its own group, so the sandbox's outer process is signalled alone.
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(launch.log.try_clone()?)
        .stderr(launch.log)
        .kill_on_drop(false);
    Ok(command)
}

fn server_args(launch: &Launch<'_>) -> Vec<String> {
    vec![
        "server".into(),
        "--no-browser".into(),
        format!("--ServerApp.sock={}", launch.socket.display()),
        "--ServerApp.sock_mode=0600".into(),
        format!("--ServerApp.root_dir={}", launch.project_dir.display()),
        "--ServerApp.base_url=/".into(),
        format!("--config={}", launch.config_file.display()),
    ]
}

/// The `python3` kernel spec every session uses: the kernel makes itself
/// the first choice of the OOM killer, so a kernel that outgrows the
/// session's memory is killed, not its server.
pub fn kernel_spec(venv: &Path) -> String {
    serde_json::json!({
        "argv": [
            "/bin/sh",
            "-c",
            "echo 1000 > /proc/self/oom_score_adj; exec \"$@\"",
            "ipykernel",
            venv.join("bin/python"),
            "-m",
            "ipykernel_launcher",
            "-f",
            "{connection_file}"
        ],
        "display_name": "Python 3 (ipykernel)",
        "language": "python",
        "metadata": { "debugger": true }
    })
    .to_string()
}

/// The longest path a Unix socket may have (`sun_path` less its NUL).
pub const SOCKET_PATH_MAX: usize = 107;

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

/// `GET /api/status`: `Some(last activity)` when it answers 200.
pub async fn status(socket: &Path) -> Option<Option<u64>> {
    let body: StatusBody = get_json(socket, "/api/status").await?;
    Some(body.last_activity.as_deref().and_then(parse_timestamp))
}

/// How many kernels are executing code (`GET /api/kernels`).
pub async fn busy_kernels(socket: &Path) -> Option<u32> {
    // Our own polling must not count as the user's activity, or the idle
    // culler could never stop the session.
    let kernels: Vec<KernelBody> = get_json(socket, "/api/kernels?no_track_activity=1").await?;
    Some(count_busy(&kernels))
}

/// `GET path` on the server's socket: the body when it answers 200 within
/// a few seconds.
async fn get_json<T: serde::de::DeserializeOwned>(socket: &Path, path: &str) -> Option<T> {
    let request = async {
        let stream = tokio::net::UnixStream::connect(socket).await.ok()?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .ok()?;
        tokio::spawn(connection);
        let request = hyper::Request::get(path)
            .header(hyper::header::HOST, "localhost")
            .body(Empty::<Bytes>::new())
            .ok()?;
        let response = sender.send_request(request).await.ok()?;
        if response.status() != hyper::StatusCode::OK {
            return None;
        }
        let body = response.into_body().collect().await.ok()?.to_bytes();
        serde_json::from_slice(&body).ok()
    };
    tokio::time::timeout(Duration::from_secs(3), request)
        .await
        .ok()
        .flatten()
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

/// The last `lines` lines of a log.
pub fn log_tail(path: &Path, lines: usize) -> String {
    const WINDOW: u64 = 64 * 1024;
    let mut text = Vec::new();
    if let Ok(mut file) = std::fs::File::open(path) {
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = file.seek(SeekFrom::Start(len.saturating_sub(WINDOW)));
        let _ = file.read_to_end(&mut text);
    }
    let text = String::from_utf8_lossy(&text);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_config_trusts_the_link_and_uses_ipc() {
        assert!(SERVER_CONFIG.contains("page_config[\"token\"] = \"\""));
        assert!(SERVER_CONFIG.contains("identity_provider_class = LinkIdentityProvider"));
        assert!(SERVER_CONFIG.contains("c.KernelManager.transport = \"ipc\""));
        assert!(SERVER_CONFIG.contains("allow_remote_access = True"));
    }

    #[test]
    fn the_server_listens_on_its_socket_and_gets_no_token() {
        let log_path =
            std::env::temp_dir().join(format!("oc-agent-cmd-{}.log", std::process::id()));
        let log = std::fs::File::create(&log_path).unwrap();
        std::fs::remove_file(&log_path).unwrap();
        let command = command(
            Launch {
                venv: Path::new("/opt/venv"),
                socket: Path::new("/w/sessions/abc/jupyter.sock"),
                project_dir: Path::new("/w/projects/1"),
                home: Path::new("/w/homes/u"),
                config_file: Path::new("/w/jupyter_server_config.py"),
                data_dir: Path::new("/w/jupyter"),
                log,
            },
            vec!["/usr/bin/bwrap".into(), "--unshare-pid".into(), "--".into()],
        )
        .unwrap();
        let std = command.as_std();
        let args: Vec<String> = std
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(std.get_program(), "/usr/bin/bwrap");
        assert_eq!(args[..3], ["--unshare-pid", "--", "/opt/venv/bin/jupyter"]);
        assert!(
            args.contains(&"--ServerApp.sock=/w/sessions/abc/jupyter.sock".to_owned()),
            "{args:?}"
        );
        assert!(args.contains(&"--ServerApp.sock_mode=0600".to_owned()));
        assert!(
            !args.iter().any(|a| a.contains("ServerApp.port")),
            "{args:?}"
        );
        assert!(!args.iter().any(|a| a.contains("ServerApp.ip")), "{args:?}");
        assert!(args.contains(&"--ServerApp.root_dir=/w/projects/1".to_owned()));
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
        assert_eq!(
            names,
            vec![
                "HOME",
                "JUPYTER_PATH",
                "JUPYTER_RUNTIME_DIR",
                "LANG",
                "PATH"
            ]
        );
    }

    #[test]
    fn kernels_offer_themselves_to_the_oom_killer_first() {
        let spec: serde_json::Value =
            serde_json::from_str(&kernel_spec(Path::new("/opt/venv"))).unwrap();
        let argv: Vec<&str> = spec["argv"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert!(argv[2].contains("1000 > /proc/self/oom_score_adj"));
        assert_eq!(
            argv[4..],
            [
                "/opt/venv/bin/python",
                "-m",
                "ipykernel_launcher",
                "-f",
                "{connection_file}"
            ]
        );
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
    fn the_log_tail_is_short() {
        let path = std::env::temp_dir().join(format!("oc-agent-tail-{}.log", std::process::id()));
        let text: String = (1..=50).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&path, text).unwrap();
        let tail = log_tail(&path, 20);
        assert_eq!(tail.lines().count(), 20);
        assert!(tail.starts_with("line 31"), "{tail}");
        std::fs::remove_file(&path).unwrap();
        assert_eq!(log_tail(Path::new("/nonexistent"), 20), "");
    }
}
