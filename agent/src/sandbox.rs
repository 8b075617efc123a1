//! The walls around one session: Jupyter runs inside Debian's `bubblewrap`
//! as the project's user, with its own PID, IPC, UTS, cgroup and user
//! namespaces, a private `/tmp`, the whole system read-only except the
//! project directory, the home and the session's own directory, and none of
//! the agent's work dir visible besides those.
//!
//! Networking is a network namespace the agent (root) makes before the
//! sandbox exists: only `lo`, and for `egress = "internet"` a `slirp4netns`
//! user-mode link with the host's loopback disabled and `prohibit` routes to
//! every private, shared, link-local and own address of the host. The
//! sandboxed user has no `CAP_NET_ADMIN` over that namespace (it belongs to
//! the host's user namespace), so the routes cannot be changed from inside.
//!
//! Before bwrap runs, a short root step ([`ENTER`], POSIX sh) joins the
//! session's cgroups, `nsenter`
//! joins the network namespace and `setpriv` drops to the project's user:
//! nothing of the session ever runs outside its limits or on the host's
//! network. (The workspace forbids `unsafe`, so no `pre_exec`.)

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use serde::Deserialize;

/// What a session's code may reach on the network (the host owner's choice).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Egress {
    /// Public internet through user-mode networking; never the host or its LAN.
    #[default]
    Internet,
    /// Nothing but the sandbox's own loopback.
    None,
}

/// IPv4 ranges no session may reach: private (RFC 1918), shared (RFC 6598),
/// link-local and cloud metadata. Loopback is the namespace's own.
pub const BLOCKED_V4: &[&str] = &[
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "169.254.0.0/16",
];

/// slirp4netns's network inside the namespace (its default).
const SLIRP_TAP: &str = "tap0";

/// The root step before the sandbox: the `cgroup.procs` files to join up
/// to `--`, then the command to run. Arguments only ever arrive as
/// positional parameters.
pub const ENTER: &str = r#"while [ "$#" -gt 0 ] && [ "$1" != "--" ]; do
  echo $$ > "$1" || exit 125
  shift
done
shift
exec "$@"
"#;

/// What the sandbox shows of the file system.
pub struct Walls<'a> {
    /// Hidden as a whole behind an empty tmpfs.
    pub work_dir: &'a Path,
    /// Writable, bound back at their own paths.
    pub writable: &'a [&'a Path],
    /// The session's directory (its socket), writable.
    pub session_dir: &'a Path,
    /// Read-only files or directories under `work_dir` the server needs.
    pub read_only: &'a [&'a Path],
    /// Where the server starts.
    pub chdir: &'a Path,
    /// When the agent could not make a network namespace (not root), bwrap
    /// makes an empty one.
    pub unshare_net: bool,
}

/// bwrap's arguments for `walls`, up to and including the `--` before the
/// sandboxed command.
pub fn bwrap_args(walls: &Walls<'_>) -> Vec<OsString> {
    let mut args: Vec<OsString> = Vec::new();
    let mut push = |parts: &[&OsStr]| args.extend(parts.iter().map(|p| p.to_os_string()));
    let os = |s: &'static str| OsStr::new(s);
    push(&[
        os("--unshare-user"),
        // Kernel code that needs a fresh user namespace is out of reach.
        os("--disable-userns"),
        os("--unshare-pid"),
        os("--unshare-ipc"),
        os("--unshare-uts"),
        os("--unshare-cgroup-try"),
    ]);
    if walls.unshare_net {
        push(&[os("--unshare-net")]);
    }
    // No --die-with-parent: sessions outlive an agent restart and are adopted.
    push(&[
        os("--new-session"),
        os("--cap-drop"),
        os("ALL"),
        os("--ro-bind"),
        os("/"),
        os("/"),
        os("--dev"),
        os("/dev"),
        os("--proc"),
        os("/proc"),
        os("--tmpfs"),
        os("/tmp"),
        os("--tmpfs"),
        walls.work_dir.as_os_str(),
    ]);
    for dir in walls.writable {
        push(&[os("--bind"), dir.as_os_str(), dir.as_os_str()]);
    }
    let dir = walls.session_dir.as_os_str();
    push(&[os("--bind"), dir, dir]);
    for path in walls.read_only {
        push(&[os("--ro-bind"), path.as_os_str(), path.as_os_str()]);
    }
    push(&[os("--chdir"), walls.chdir.as_os_str(), os("--")]);
    args
}

/// What runs before bwrap, as root: the [`ENTER`] step, then `nsenter`
/// and `setpriv`. The program and its arguments, up to bwrap.
pub fn entry_command(cgroup_procs: &[PathBuf], netns: &Path, uid: u32, gid: u32) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec!["/bin/sh".into(), "-c".into(), ENTER.into(), "enter".into()];
    args.extend(cgroup_procs.iter().map(|p| p.into()));
    args.push("--".into());
    let mut netns_arg = OsString::from("--net=");
    netns_arg.push(netns);
    args.extend([
        "nsenter".into(),
        netns_arg,
        "--".into(),
        "setpriv".into(),
        format!("--reuid={uid}").into(),
        format!("--regid={gid}").into(),
        "--clear-groups".into(),
        "--".into(),
    ]);
    args
}

/// A session's network namespace, named `oc-<sid>` (`/run/netns/…`), so a
/// restarted agent finds and removes what it no longer needs.
pub struct NetNs {
    name: String,
}

/// The prefix of every session's network namespace.
pub const NETNS_PREFIX: &str = "oc-";

impl NetNs {
    pub fn for_session(sid: &str) -> Self {
        Self {
            name: format!("{NETNS_PREFIX}{sid}"),
        }
    }

    /// The path `nsenter` and slirp4netns join.
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// Makes the namespace, brings `lo` up and, for `Internet`, blocks the
    /// host's ranges and starts slirp4netns on it: the pid of slirp4netns.
    pub async fn create(
        &self,
        egress: Egress,
        host_addresses: &[String],
        log: std::fs::File,
    ) -> std::io::Result<Option<u32>> {
        // One left by a crash mid-start: start clean.
        self.remove().await;
        ip(&["netns", "add", &self.name], None).await?;
        let script = routes_script(egress, host_addresses);
        ip(&["-n", &self.name, "-batch", "-"], Some(&script)).await?;
        if egress == Egress::None {
            return Ok(None);
        }
        let mut slirp = tokio::process::Command::new("slirp4netns");
        slirp
            .args([
                "--configure",
                "--mtu=65520",
                "--disable-host-loopback",
                "--enable-seccomp",
                "--netns-type=path",
            ])
            .arg(self.path())
            .arg(SLIRP_TAP)
            .env_clear()
            .env("PATH", SYSTEM_PATH)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            // Its own group, and it outlives an agent restart like the session.
            .process_group(0)
            .kill_on_drop(false);
        let child = slirp.spawn()?;
        // Not waited for: tokio reaps it once it exits; the session's end stops it.
        Ok(child.id())
    }

    /// Deletes the namespace (gone for good once its last process is).
    pub async fn remove(&self) {
        if self.path().exists() {
            if let Err(e) = ip(&["netns", "delete", &self.name], None).await {
                tracing::warn!(netns = self.name, error = %e, "cannot remove a network namespace");
            }
        }
    }
}

/// Runs `ip args`, feeding it `input`.
async fn ip(args: &[&str], input: Option<&str>) -> std::io::Result<()> {
    let mut command = tokio::process::Command::new("ip");
    command
        .args(args)
        .env_clear()
        .env("PATH", SYSTEM_PATH)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = command.spawn()?;
    if let (Some(mut stdin), Some(input)) = (child.stdin.take(), input) {
        use tokio::io::AsyncWriteExt;
        stdin.write_all(input.as_bytes()).await?;
    }
    let output = child.wait_with_output().await?;
    if output.status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "ip {} failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}

const SYSTEM_PATH: &str = "/usr/sbin:/usr/bin:/sbin:/bin";

/// `ip -batch` lines for a session's namespace.
pub fn routes_script(egress: Egress, host_addresses: &[String]) -> String {
    let mut script = String::from("link set lo up\n");
    if egress == Egress::Internet {
        for range in BLOCKED_V4 {
            script.push_str(&format!("route add prohibit {range}\n"));
        }
        for address in host_addresses {
            if !address.contains(':') && !address.starts_with("127.") {
                script.push_str(&format!("route add prohibit {address}/32\n"));
            }
        }
    }
    script
}

/// The host's own IPv4 addresses (a session must not reach the host's
/// services through them either), from `ip -o -4 addr`.
pub async fn host_addresses() -> Vec<String> {
    let output = tokio::process::Command::new("ip")
        .args(["-o", "-4", "addr", "show"])
        .env_clear()
        .env("PATH", SYSTEM_PATH)
        .output()
        .await;
    output
        .map(|o| parse_addresses(&String::from_utf8_lossy(&o.stdout)))
        .unwrap_or_default()
}

/// `2: eth0    inet 192.0.2.2/24 brd …` → `192.0.2.2`.
pub fn parse_addresses(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            fields.find(|f| *f == "inet")?;
            Some(fields.next()?.split('/').next()?.to_owned())
        })
        .collect()
}

/// Whether this machine has what sandboxes need, and why not.
pub fn check_tools(egress: Egress, root: bool) -> Result<(), String> {
    let mut missing = vec![];
    if which("bwrap").is_none() {
        missing.push("bwrap (Debian package bubblewrap)");
    }
    if root && egress == Egress::Internet && which("slirp4netns").is_none() {
        missing.push("slirp4netns (Debian package slirp4netns; or egress = \"none\")");
    }
    if root {
        for (tool, hint) in [
            ("ip", "ip (Debian package iproute2)"),
            ("nsenter", "nsenter (Debian package util-linux)"),
            ("setpriv", "setpriv (Debian package util-linux)"),
        ] {
            if which(tool).is_none() {
                missing.push(hint);
            }
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "sessions run in a sandbox, and this machine lacks: {}",
            missing.join(", ")
        ))
    }
}

/// `name` on the system path.
pub fn which(name: &str) -> Option<PathBuf> {
    SYSTEM_PATH
        .split(':')
        .map(|dir| Path::new(dir).join(name))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[OsString]) -> Vec<String> {
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    fn walls_args(unshare_net: bool) -> Vec<String> {
        let project = Path::new("/w/projects/7");
        let home = Path::new("/w/homes/oc-p7");
        let config = Path::new("/w/jupyter_server_config.py");
        strings(&bwrap_args(&Walls {
            work_dir: Path::new("/w"),
            writable: &[project, home],
            session_dir: Path::new("/w/sessions/abc"),
            read_only: &[config],
            chdir: project,
            unshare_net,
        }))
    }

    /// The position of `window` in `args`.
    fn find(args: &[String], window: &[&str]) -> usize {
        args.windows(window.len())
            .position(|w| w == window)
            .unwrap_or_else(|| panic!("{window:?} not in {args:?}"))
    }

    #[test]
    fn every_namespace_but_the_network_is_made_by_bwrap() {
        let args = walls_args(false);
        for flag in [
            "--unshare-user",
            "--disable-userns",
            "--unshare-pid",
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-cgroup-try",
            "--new-session",
        ] {
            find(&args, &[flag]);
        }
        find(&args, &["--cap-drop", "ALL"]);
        assert!(!args.contains(&"--unshare-net".to_owned()));
        assert!(!args.contains(&"--die-with-parent".to_owned()));
        assert!(walls_args(true).contains(&"--unshare-net".to_owned()));
        assert_eq!(args.last().map(String::as_str), Some("--"));
    }

    #[test]
    fn the_system_is_read_only_and_the_work_dir_hidden_before_binds() {
        let args = walls_args(false);
        let root = find(&args, &["--ro-bind", "/", "/"]);
        let tmp = find(&args, &["--tmpfs", "/tmp"]);
        let hidden = find(&args, &["--tmpfs", "/w"]);
        let project = find(&args, &["--bind", "/w/projects/7", "/w/projects/7"]);
        let home = find(&args, &["--bind", "/w/homes/oc-p7", "/w/homes/oc-p7"]);
        let session = find(&args, &["--bind", "/w/sessions/abc", "/w/sessions/abc"]);
        let config = find(
            &args,
            &[
                "--ro-bind",
                "/w/jupyter_server_config.py",
                "/w/jupyter_server_config.py",
            ],
        );
        find(&args, &["--dev", "/dev"]);
        find(&args, &["--proc", "/proc"]);
        find(&args, &["--chdir", "/w/projects/7"]);
        // bwrap applies them in order: later mounts go on top.
        assert!(root < tmp && tmp < hidden, "{args:?}");
        assert!(
            hidden < project.min(home).min(session).min(config),
            "{args:?}"
        );
        // Nothing else of the work dir is bound writable.
        let writable = args.iter().filter(|a| *a == "--bind").count();
        assert_eq!(writable, 3, "{args:?}");
    }

    #[test]
    fn internet_egress_blocks_the_host_and_private_ranges() {
        let script = routes_script(
            Egress::Internet,
            &["127.0.0.1".into(), "192.0.2.2".into(), "fe80::1".into()],
        );
        for line in [
            "link set lo up",
            "route add prohibit 10.0.0.0/8",
            "route add prohibit 172.16.0.0/12",
            "route add prohibit 192.168.0.0/16",
            "route add prohibit 100.64.0.0/10",
            "route add prohibit 169.254.0.0/16",
            "route add prohibit 192.0.2.2/32",
        ] {
            assert!(script.lines().any(|l| l == line), "{line}: {script}");
        }
        assert!(!script.contains("127.0.0.1"), "{script}");
        assert!(!script.contains("fe80"), "{script}");
        assert_eq!(routes_script(Egress::None, &[]), "link set lo up\n");
    }

    #[test]
    fn host_addresses_are_read_from_ip() {
        let text = "1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever\n\
                    2: eth0    inet 192.0.2.2/24 brd 192.0.2.255 scope global eth0\n";
        assert_eq!(parse_addresses(text), vec!["127.0.0.1", "192.0.2.2"]);
        assert_eq!(
            NetNs::for_session("abc").path(),
            Path::new("/run/netns/oc-abc")
        );
    }

    #[test]
    fn the_root_step_joins_cgroups_then_the_network_then_drops_to_the_user() {
        let args = strings(&entry_command(
            &["/cg/memory/procs".into(), "/cg/pids/procs".into()],
            Path::new("/run/netns/oc-abc"),
            998,
            997,
        ));
        assert_eq!(args[..2], ["/bin/sh", "-c"]);
        assert_eq!(
            args[3..],
            [
                "enter",
                "/cg/memory/procs",
                "/cg/pids/procs",
                "--",
                "nsenter",
                "--net=/run/netns/oc-abc",
                "--",
                "setpriv",
                "--reuid=998",
                "--regid=997",
                "--clear-groups",
                "--"
            ]
        );
    }

    #[test]
    fn the_root_step_runs_in_a_shell() {
        let dir = std::env::temp_dir().join(format!("oc-enter-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let procs = dir.join("cgroup.procs");
        let output = std::process::Command::new("/bin/sh")
            .args(["-c", ENTER, "enter"])
            .arg(&procs)
            .args(["--", "/bin/sh", "-c", "echo $$"])
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let written = std::fs::read_to_string(&procs).unwrap();
        // The pid written is the one that went on to exec the command.
        assert_eq!(stdout.lines().next(), Some(written.trim()), "{stdout}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn egress_reads_as_the_config_spells_it() {
        #[derive(Deserialize)]
        struct File {
            egress: Egress,
        }
        let file: File = toml_like(r#"{"egress":"none"}"#);
        assert_eq!(file.egress, Egress::None);
        assert_eq!(Egress::default(), Egress::Internet);
    }

    fn toml_like<T: serde::de::DeserializeOwned>(json: &str) -> T {
        serde_json::from_str(json).unwrap()
    }
}
