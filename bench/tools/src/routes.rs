//! The route table at the scale the architecture names (1 000 000 sessions,
//! 100 000 hosts): measured in this process with the gateway's own types,
//! written as a gateway state snapshot, and fed to a running gateway as a
//! stream of deltas by a stand-in for control's watch endpoint (which also
//! signs the gateway's link client certificate). Host 1 of the snapshot is
//! served by [`link`], a host link (the agent's own code) in front of the
//! benchmark's upstream, with a certificate from a host CA of the run.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::{BufWriter, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Query, State};
use axum::routing::get;
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use opencloud_agent::host_link::{self, LinkIdentity, Sessions, Target};
use opencloud_control::host_ca::{Holder, HostCa};
use opencloud_gateway::table::{RouteTable, Routes};
use opencloud_protocol::link::{
    certificate_request, new_private_key, CertFingerprint, CertificateRequest,
};
use opencloud_protocol::routes::{
    new_sid, sid_from_bytes, Change, Delta, HostRoute, HostState, SessionRoute, SessionState,
    Snapshot, Version, WatchMessage,
};

/// The version of the generated snapshot.
pub const SNAPSHOT_VERSION: Version = 1_000_000;
/// Sids of sessions that deltas add start here, far from the snapshot's.
const DELTA_SID_BASE: u64 = 1 << 40;

/// A distinct, valid sid for every index.
fn sid_for(index: u64) -> String {
    let mixed = u128::from(index).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835);
    sid_from_bytes(mixed.to_be_bytes())
}

/// Where host 1's link listens, and the certificate it serves.
#[derive(Clone)]
pub struct Link {
    pub port: u16,
    pub pinned: CertFingerprint,
}

/// Host 1 is the benchmark's link (its `/healthz` answers); the others are
/// loopback addresses (127.x.y.z) with nothing listening on their link
/// port, so the gateway's probes stay on this machine and fail at once.
/// Every host has a certificate pin of its own, as control issues them.
fn host(id: u64, link: &Link) -> HostRoute {
    if id == 1 {
        return HostRoute {
            id,
            address: "127.0.0.1".into(),
            link_port: link.port,
            link_cert_sha256: Some(link.pinned),
            health_url: format!("http://127.0.0.1:{}/healthz", link.port),
            state: HostState::Online,
        };
    }
    let address = format!("127.{}.{}.{}", (id >> 16) & 255, (id >> 8) & 255, id & 255);
    HostRoute {
        id,
        health_url: format!("http://{address}:9/healthz"),
        address,
        link_port: 9,
        link_cert_sha256: Some(CertFingerprint::of(&id.to_le_bytes())),
        state: HostState::Online,
    }
}

/// Session `index` on one of hosts 2..=hosts (host 1 when there is no other).
fn session(index: u64, hosts: u64) -> SessionRoute {
    SessionRoute {
        sid: sid_for(index),
        owner: 2 + index % 500_000,
        host: if hosts > 1 {
            2 + index % (hosts - 1)
        } else {
            1
        },
        state: SessionState::Running,
    }
}

/// The delta that takes the stand-in's table to `version`: odd versions add
/// a session, even ones remove the one added just before, so the table
/// keeps its size while deltas stream.
fn delta_for(version: Version) -> Delta {
    let change = if version % 2 == 1 {
        Change::UpsertSession(session(DELTA_SID_BASE + version, 1))
    } else {
        Change::RemoveSession {
            sid: sid_for(DELTA_SID_BASE + version - 1),
        }
    };
    Delta {
        version,
        changes: vec![change],
    }
}

fn proc_status_kib(field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no {field} in /proc/self/status"))
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[index].as_secs_f64() * 1e6
}

/// Prints `name value` lines: memory and timings of the table in-process.
pub fn table(sessions: usize, hosts: u64, deltas: usize) -> anyhow::Result<()> {
    let n = sessions as u64;
    let rss_before = proc_status_kib("VmRSS:")?;
    let started = Instant::now();
    // Built straight from the routes, so no snapshot is alive beside it and
    // the RSS growth is the table's own.
    let mut table = RouteTable {
        version: SNAPSHOT_VERSION,
        ..RouteTable::default()
    };
    let link = Link {
        port: 9000,
        pinned: CertFingerprint::of(b"host 1"),
    };
    for id in 1..=hosts {
        table.upsert_host(host(id, &link));
    }
    for i in 0..n {
        table.upsert_session(&session(i, hosts));
    }
    let build = started.elapsed();
    let rss_table = proc_status_kib("VmRSS:")?;
    println!("sessions {sessions}");
    println!("hosts {hosts}");
    println!(
        "table_rss_mib {:.0}",
        (rss_table - rss_before) as f64 / 1024.0
    );
    println!("table_build_s {:.2}", build.as_secs_f64());

    let routes = Routes::new(table);
    let mut apply = Vec::with_capacity(deltas);
    let mut apply_publish = Vec::with_capacity(deltas);
    for k in 0..deltas as u64 {
        let current = routes.current();
        let change = match k % 3 {
            // Change an existing session (a state or port change).
            0 => {
                let mut s = session((k * 7919) % n, hosts);
                s.state = SessionState::Lost;
                Change::UpsertSession(s)
            }
            1 => Change::UpsertSession(session(DELTA_SID_BASE + k, hosts)),
            _ => Change::RemoveSession {
                sid: sid_for(DELTA_SID_BASE + k - 1),
            },
        };
        let delta = Delta {
            version: current.version + 1,
            changes: vec![change],
        };
        let t = Instant::now();
        let next = current.apply(&delta)?;
        let applied = t.elapsed();
        drop(current);
        routes.publish(next);
        apply.push(applied);
        apply_publish.push(t.elapsed());
    }
    apply.sort_unstable();
    apply_publish.sort_unstable();
    println!("deltas {deltas}");
    println!("apply_p50_us {:.1}", percentile(&apply, 0.5));
    println!("apply_p99_us {:.1}", percentile(&apply, 0.99));
    println!("apply_max_us {:.1}", percentile(&apply, 1.0));
    println!(
        "apply_publish_p50_us {:.1}",
        percentile(&apply_publish, 0.5)
    );
    println!(
        "apply_publish_p99_us {:.1}",
        percentile(&apply_publish, 0.99)
    );
    println!(
        "apply_publish_max_us {:.1}",
        percentile(&apply_publish, 1.0)
    );
    println!(
        "rss_after_deltas_mib {:.0}",
        (proc_status_kib("VmRSS:")? - rss_before) as f64 / 1024.0
    );

    // What the gateway's store does every 1000 deltas (compaction) and at
    // start (load).
    let table = routes.current();
    let t = Instant::now();
    let mut bytes = Vec::new();
    table.write_snapshot(&mut bytes)?;
    println!("snapshot_serialize_s {:.2}", t.elapsed().as_secs_f64());
    println!("snapshot_mib {:.0}", bytes.len() as f64 / 1048576.0);
    // The gateway's own store writing that snapshot (write, fsync, rename).
    let dir = std::env::temp_dir().join(format!("oc-bench-store-{}", std::process::id()));
    let mut store = opencloud_gateway::store::Store::open(&dir)?;
    let t = Instant::now();
    store.save_snapshot(&table)?;
    println!("store_save_snapshot_s {:.2}", t.elapsed().as_secs_f64());
    let _ = std::fs::remove_dir_all(&dir);
    let t = Instant::now();
    let loaded = RouteTable::read_snapshot(&bytes[..])?;
    println!("snapshot_load_s {:.2}", t.elapsed().as_secs_f64());
    anyhow::ensure!(
        loaded.sessions.len() == table.sessions.len(),
        "the snapshot lost sessions"
    );
    println!(
        "peak_rss_mib {:.0}",
        proc_status_kib("VmHWM:")? as f64 / 1024.0
    );
    Ok(())
}

/// Writes `dir/routes.snapshot.json` as the gateway's store would.
pub fn write_snapshot(
    dir: &Path,
    sessions: usize,
    hosts: u64,
    link: &Link,
    owner: u64,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let sid = new_sid();
    let mut all: Vec<SessionRoute> = Vec::with_capacity(sessions);
    all.push(SessionRoute {
        sid: sid.clone(),
        owner,
        host: 1,
        state: SessionState::Running,
    });
    all.extend((1..sessions as u64).map(|i| session(i, hosts)));
    let snapshot = Snapshot {
        version: SNAPSHOT_VERSION,
        hosts: (1..=hosts).map(|id| host(id, link)).collect(),
        sessions: all,
        revocations: vec![],
    };
    let path = dir.join("routes.snapshot.json");
    let mut out = BufWriter::new(std::fs::File::create(&path)?);
    serde_json::to_writer(&mut out, &snapshot)?;
    out.flush()?;
    println!("SID={sid}");
    println!("VERSION={SNAPSHOT_VERSION}");
    Ok(())
}

#[derive(Clone)]
struct Feed {
    /// Deltas per second.
    rate: Arc<AtomicU64>,
    /// The last version sent on any stream.
    sent: Arc<AtomicU64>,
}

/// Serves the watch stream, the gateway's link client certificate (from
/// the run's host CA in `ca_dir`) and the two `/bench/` knobs until killed.
pub async fn fake_watch(listen: SocketAddr, ca_dir: &Path) -> anyhow::Result<()> {
    let feed = Feed {
        rate: Arc::new(AtomicU64::new(0)),
        sent: Arc::new(AtomicU64::new(0)),
    };
    let ca = HostCa::open(ca_dir, opencloud_control::now_unix())?;
    let app = Router::new()
        .route("/internal/v1/routes/watch", get(watch))
        .route(
            opencloud_protocol::paths::internal::LINK_CERTIFICATE,
            post(
                move |axum::Json(request): axum::Json<CertificateRequest>| async move {
                    let issued = ca
                        .issue(Holder::Gateway, &request.csr, opencloud_control::now_unix())
                        .map_err(|e| (axum::http::StatusCode::BAD_REQUEST, e.to_string()))?;
                    Ok::<_, (axum::http::StatusCode, String)>(axum::Json(issued.certificate))
                },
            ),
        )
        .route(
            "/bench/rate",
            get(
                |State(feed): State<Feed>, Query(q): Query<HashMap<String, String>>| async move {
                    let rate = q.get("value").and_then(|v| v.parse().ok()).unwrap_or(0);
                    feed.rate.store(rate, Ordering::Relaxed);
                    format!("rate {rate}\n")
                },
            ),
        )
        .route(
            "/bench/stats",
            get(|State(feed): State<Feed>| async move {
                format!("{}\n", feed.sent.load(Ordering::Relaxed))
            }),
        )
        // Health and usage reports from the gateway: accepted, ignored.
        .fallback(|| async { axum::http::StatusCode::NO_CONTENT })
        .with_state(feed);
    let listener = tokio::net::TcpListener::bind(listen).await?;
    axum::serve(listener, app).await?;
    Ok(())
}

struct Stream {
    feed: Feed,
    version: Version,
    ticker: tokio::time::Interval,
    last: Instant,
    last_heartbeat: Instant,
    budget: f64,
}

async fn watch(State(feed): State<Feed>, Query(q): Query<HashMap<String, String>>) -> Body {
    let since: Version = q.get("since").and_then(|v| v.parse().ok()).unwrap_or(0);
    let mut ticker = tokio::time::interval(Duration::from_millis(5));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let state = Stream {
        feed,
        version: since,
        ticker,
        last: Instant::now(),
        last_heartbeat: Instant::now() - Duration::from_secs(10),
        budget: 0.0,
    };
    let stream = futures_util::stream::unfold(state, |mut s| async move {
        loop {
            s.ticker.tick().await;
            let now = Instant::now();
            let rate = s.feed.rate.load(Ordering::Relaxed) as f64;
            s.budget += rate * (now - s.last).as_secs_f64();
            s.last = now;
            let mut lines = Vec::new();
            while s.budget >= 1.0 {
                s.budget -= 1.0;
                s.version += 1;
                let message = WatchMessage::Delta(delta_for(s.version));
                if serde_json::to_writer(&mut lines, &message).is_err() {
                    return None;
                }
                lines.push(b'\n');
            }
            if now - s.last_heartbeat >= Duration::from_secs(2) {
                s.last_heartbeat = now;
                let beat = WatchMessage::Heartbeat { version: s.version };
                if serde_json::to_writer(&mut lines, &beat).is_err() {
                    return None;
                }
                lines.push(b'\n');
            }
            if !lines.is_empty() {
                s.feed.sent.fetch_max(s.version, Ordering::Relaxed);
                return Some((Ok::<Bytes, Infallible>(Bytes::from(lines)), s));
            }
        }
    });
    Body::from_stream(stream)
}

/// Every sid leads to the one upstream: the benchmark's host serves all.
struct EverySession(Target);

impl Sessions for EverySession {
    fn target(&self, _sid: &str) -> Option<Target> {
        Some(self.0.clone())
    }
}

/// Reads a certificate pin (64 hex characters) from `path`.
pub fn read_link_pin(path: &Path) -> anyhow::Result<CertFingerprint> {
    let text =
        std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    CertFingerprint::parse(text.trim()).ok_or_else(|| {
        anyhow::anyhow!(
            "{}: not a certificate pin (64 hex characters)",
            path.display()
        )
    })
}

/// Host `host_id`'s link on `listen` (the agent's own link code), splicing
/// every session to `upstream`, until killed. Its certificate comes from the
/// host CA in `ca_dir` (made there if missing), as control issues them; its
/// pin is written to `pin_file` for the snapshot.
pub async fn link(
    listen: SocketAddr,
    upstream: SocketAddr,
    host_id: u64,
    ca_dir: &Path,
    pin_file: &Path,
) -> anyhow::Result<()> {
    let ca = HostCa::open(ca_dir, opencloud_control::now_unix())?;
    let key = new_private_key()?;
    let issued = ca.issue(
        Holder::Host(host_id),
        &certificate_request(&key)?,
        opencloud_control::now_unix(),
    )?;
    std::fs::write(pin_file, issued.fingerprint.to_string())?;
    let identity = LinkIdentity::new(host_id, &issued.certificate, &key)?;
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let (_identity_tx, identity) = tokio::sync::watch::channel(Some(identity));
    let (_stop_tx, stop) = tokio::sync::watch::channel(false);
    host_link::serve(
        listener,
        identity,
        Arc::new(EverySession(Target::Tcp(upstream))),
        stop,
    )
    .await;
    Ok(())
}
