//! What the test machine offers every harness module: the workspace
//! binaries `cargo build` made, free ports below the ephemeral range, names
//! no other test uses, a Prometheus scrape, the start-up wait and
//! process-group signal every spawned server needs, and files' modes.

use std::future::Future;
use std::net::TcpListener;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use rand::Rng;

/// Where cargo put the workspace binaries (`target/debug`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/debug/deps/<test> → target/debug
    exe.parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps")
        .to_path_buf()
}

pub fn binary(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (scripts/test does)",
        path.display()
    );
    path
}

/// Where test servers listen: below Linux's ephemeral ports (32768 and
/// up). A port the kernel just handed out as ephemeral is soon handed out
/// again to some outgoing connection, and a server started there a moment
/// later finds it taken (a CI run lost control's start-up that way).
pub const TEST_PORTS: std::ops::Range<u16> = 20_000..32_000;

/// A port that was free a moment ago and that no other test of this
/// machine has been given.
pub fn free_port() -> u16 {
    free_ports_in_a_row(1).0
}

/// `n` consecutive ports that were free a moment ago and are claimed for
/// this test: (first, last).
///
/// Free is not enough: a test that got a port range for its agent has not
/// started the Jupyter servers on it yet, so another test would find those
/// ports free too, and one of the two servers would later fail to bind
/// (CI lost a control start-up that way). Every port handed out is claimed
/// once per run, and across processes on this machine by a lease file.
pub fn free_ports_in_a_row(n: u16) -> (u16, u16) {
    for _ in 0..500 {
        let first = rand::Rng::gen_range(
            &mut rand::thread_rng(),
            TEST_PORTS.start..TEST_PORTS.end - n,
        );
        let last = first + n - 1;
        if (first..=last).all(|port| TcpListener::bind(("127.0.0.1", port)).is_ok())
            && port_leases::claim(first..=last)
        {
            return (first, last);
        }
    }
    panic!("no {n} consecutive free ports in {TEST_PORTS:?}");
}

/// Ports handed out to tests: in this process a set, across processes
/// (other test binaries, other checkouts) a file per port whose lease runs
/// out after 20 minutes, longer than any one test.
mod port_leases {
    use std::collections::HashSet;
    use std::ops::RangeInclusive;
    use std::path::PathBuf;
    use std::sync::Mutex;
    use std::time::{Duration, SystemTime};

    static CLAIMED: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    const LEASE: Duration = Duration::from_secs(20 * 60);

    fn lease_dir() -> PathBuf {
        std::env::temp_dir().join("opencloud-test-ports")
    }

    /// Claims every port of `ports`, or none when one is already claimed.
    pub fn claim(ports: RangeInclusive<u16>) -> bool {
        let mut claimed = CLAIMED.lock().unwrap_or_else(|e| e.into_inner());
        let claimed = claimed.get_or_insert_with(HashSet::new);
        if ports.clone().any(|port| claimed.contains(&port)) {
            return false;
        }
        let dir = lease_dir();
        let _ = std::fs::create_dir_all(&dir);
        let mut taken = Vec::new();
        for port in ports.clone() {
            if !lease(&dir.join(port.to_string())) {
                for path in taken {
                    let _ = std::fs::remove_file(path);
                }
                return false;
            }
            taken.push(dir.join(port.to_string()));
        }
        claimed.extend(ports);
        true
    }

    /// Takes the lease file at `path` unless someone holds it and it is
    /// younger than [`LEASE`].
    fn lease(path: &std::path::Path) -> bool {
        let fresh = |p: &std::path::Path| {
            std::fs::metadata(p)
                .and_then(|m| m.modified())
                .is_ok_and(|t| SystemTime::now().duration_since(t).unwrap_or_default() < LEASE)
        };
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
        {
            Ok(_) => true,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && !fresh(path) => {
                // A stale lease: renew it by rewriting the file (its mtime).
                std::fs::write(path, b"").is_ok()
            }
            Err(_) => false,
        }
    }
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A unique suffix for databases, emails and names within this run.
pub fn unique(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let r: u32 = rand::thread_rng().gen();
    format!("{prefix}{}x{n}x{r:08x}", std::process::id())
}

static LOOPBACKS: AtomicU32 = AtomicU32::new(0);

/// A loopback address no other client of this run has used, for a client
/// that must count as another person: Linux answers on all of 127.0.0.0/8,
/// so a connection bound here reaches control and the gateway like any
/// other, and they see this address as its source. Never 127.0.0.1.
pub fn fresh_loopback() -> std::net::IpAddr {
    let n = LOOPBACKS.fetch_add(1, Ordering::Relaxed);
    // 127.1.0.1 and up; the last byte skips 0 and 255.
    let (low, rest) = (n % 254 + 1, n / 254);
    let (middle, high) = (rest % 256, 1 + rest / 256);
    std::net::IpAddr::from([127, high as u8, middle as u8, low as u8])
}

/// The text of `{listener}/metrics`, asked with `key` as a bearer token when
/// given (empty when the body cannot be read).
pub async fn metrics(listener: &str, key: Option<&str>) -> String {
    let mut request = reqwest::Client::new().get(format!("{listener}/metrics"));
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    request
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .unwrap_or_default()
}

/// Waits until `ready` answers true, polling every `every`: an error at
/// once when `child` (the server called `name`) exits, or after `within`,
/// each with the server's log at `log`.
pub async fn wait_until_ready<F, Fut>(
    child: &mut Child,
    name: &str,
    log: &Path,
    within: Duration,
    every: Duration,
    mut ready: F,
) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let log = || std::fs::read_to_string(log).unwrap_or_default();
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait()? {
            anyhow::bail!("{name} exited with {status} during start-up:\n{}", log());
        }
        if ready().await {
            return Ok(());
        }
        if Instant::now() > deadline {
            anyhow::bail!("{name} was not ready within {within:?}:\n{}", log());
        }
        tokio::time::sleep(every).await;
    }
}

/// Sends `signal` (`TERM`, `KILL`) to the whole process group led by
/// `leader`: a server and whatever it started.
pub fn signal_group(leader: u32, signal: &str) {
    let _ = Command::new("kill")
        .args([format!("-{signal}"), "--".into(), format!("-{leader}")])
        .stderr(Stdio::null())
        .status();
}

/// The permission bits of `path` (`0o600`) and its owner's uid.
pub fn mode_and_owner(path: &Path) -> (u32, u32) {
    let meta = std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (meta.mode() & 0o7777, meta.uid())
}

/// Sets the permission bits of `path`, as a careless operator (or an older
/// release) would have left them.
pub fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// Runs `command`, which must refuse to start, to its exit and returns its
/// output; an error (the process killed) when it is still running after
/// `within`, i.e. it started.
pub fn run_to_refusal(
    command: &mut Command,
    within: Duration,
) -> anyhow::Result<std::process::Output> {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let deadline = Instant::now() + within;
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output()?;
            anyhow::bail!(
                "still running after {within:?}: it started\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(child.wait_with_output()?)
}
