#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test
//! Restarting the gateway: graceful shutdown lets in-flight requests finish,
//! `--upgrade` replaces the binary without refusing a connection, and what
//! it keeps on disk (the route table, its host link client key) and reads at
//! start (the keys file) is private to its user.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use opencloud_e2e::upstream::loopback;
use opencloud_e2e::{mode_and_owner, set_mode, TestStack};
use opencloud_gateway::link_certificate::KEY_FILE as LINK_CLIENT_KEY;
use reqwest::StatusCode;

/// A loopback source address (127.200.0.0 and up) that an earlier run of
/// this test almost surely did not use, one per load client.
fn unused_loopback(client: u8) -> std::net::IpAddr {
    let seed = std::process::id()
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
    let bytes = seed.to_le_bytes();
    std::net::IpAddr::from([
        127,
        200 + bytes[0] % 50,
        bytes[1],
        client * 50 + 1 + bytes[2] % 50,
    ])
}

#[tokio::test]
async fn an_upgrade_replaces_the_gateway_without_refusing_connections() {
    let mut stack = TestStack::with_gateway().await.unwrap();
    let url = format!("{}/healthz", stack.gateway().platform());
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let retried = Arc::new(AtomicU64::new(0));
    let mut load = Vec::new();
    for client in 0..4 {
        let (stop, ok, failed, retried) =
            (stop.clone(), ok.clone(), failed.clone(), retried.clone());
        // A fresh connection per request, so every accept is exercised,
        // from an address no earlier run used: thousands of connections a
        // second from one address reuse ports whose last connection the
        // gateway has not finished closing (the kernel reuses them early
        // on loopback), and those are reset before the upgrade even starts.
        let http = reqwest::Client::builder()
            .resolve("localhost", stack.gateway().addr())
            .local_address(unused_loopback(client))
            .pool_max_idle_per_host(0)
            .build()
            .unwrap();
        let url = url.clone();
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let mut answer = http.get(&url).send().await;
                // A connection the old process accepted but closed unread
                // as it stopped (Pingora's shutdown race): a GET on it is
                // retried, as browsers retry an idempotent request on a
                // connection closed without an answer. A refused
                // connection is never retried: that is what must not happen.
                if answer.as_ref().is_err_and(|e| !e.is_connect()) {
                    retried.fetch_add(1, Ordering::Relaxed);
                    answer = http.get(&url).send().await;
                }
                match answer {
                    Ok(r) if r.status() == StatusCode::OK => ok.fetch_add(1, Ordering::Relaxed),
                    Ok(r) => {
                        eprintln!("status {}", r.status());
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                    Err(e) => {
                        eprintln!("error {e}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = ok.load(Ordering::Relaxed);
    stack.gateway_mut().upgrade().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    let retried = retried.load(Ordering::Relaxed);
    println!(
        "{ok} requests answered across the upgrade ({before} before it), {failed} failed, \
         {retried} closed unanswered and answered on a retry"
    );
    assert_eq!(
        failed,
        0,
        "requests failed during the upgrade:\n{}",
        stack.gateway().log()
    );
    assert!(ok > before + 10, "the new gateway answers");
}

#[tokio::test]
async fn graceful_shutdown_lets_an_in_flight_request_finish() {
    let mut stack = TestStack::with_gateway().await.unwrap();
    // A slow request in flight: control's login takes a while (PBKDF2), so
    // start several and stop the gateway while they run.
    let http = stack.gateway().client(&[], false);
    let platform = stack.gateway().platform();
    let mut in_flight = Vec::new();
    for n in 0..4 {
        let http = http.clone();
        let url = format!("{platform}/api/v1/auth/register");
        in_flight.push(tokio::spawn(async move {
            http.post(url)
                .json(&serde_json::json!({
                    "email": format!("slow{n}-{}@example.com", std::process::id()),
                    "password": "correct horse battery",
                    "name": "Slow"
                }))
                .send()
                .await
                .map(|r| r.status())
        }));
    }
    tokio::time::sleep(Duration::from_millis(30)).await;
    let stopping = Instant::now();
    let status = stack.gateway_mut().stop().unwrap();
    println!("gateway stopped in {:?} with {status}", stopping.elapsed());
    for request in in_flight {
        let answered = request.await.unwrap();
        assert_eq!(
            answered.ok(),
            Some(StatusCode::CREATED),
            "an in-flight request was cut off"
        );
    }
    // And afterwards nothing listens any more.
    assert!(tokio::net::TcpStream::connect(stack.gateway().listener())
        .await
        .is_err());
}

/// The route table's files: every session, its owner and its host.
const STATE_FILES: [&str; 2] = ["routes.snapshot.json", "routes.deltas.ndjson"];

/// Attack: another user on the gateway's machine (a notebook's user) reads
/// the persisted route table (who runs what where) or takes the gateway's
/// host link client key to open sessions' links itself.
#[tokio::test]
async fn the_gateways_route_files_are_private_to_its_user_and_tightened_at_start() {
    let mut stack = TestStack::with_gateway().await.unwrap();
    let user = stack.new_user().await;
    let sid = stack.session_for(&user, loopback(9)).await;
    let gateway = stack.gateway();
    let state = gateway.dir.join("state");
    let (_, gateway_uid) = mode_and_owner(&gateway.config_path);
    let private = |what: &str| {
        assert_eq!(
            mode_and_owner(&state),
            (0o700, gateway_uid),
            "{what}: state dir"
        );
        for name in STATE_FILES.iter().chain([&LINK_CLIENT_KEY]) {
            let (mode, uid) = mode_and_owner(&state.join(name));
            assert_eq!(
                (mode, uid),
                (0o600, gateway_uid),
                "{what}: {name} is {mode:o}"
            );
        }
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !STATE_FILES.iter().all(|name| state.join(name).exists()) {
        assert!(Instant::now() < deadline, "the table was never persisted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        std::fs::read_to_string(state.join("routes.snapshot.json"))
            .unwrap()
            .contains(&sid)
            || std::fs::read_to_string(state.join("routes.deltas.ndjson"))
                .unwrap()
                .contains(&sid),
        "the files this test guards hold the session"
    );
    private("written by this gateway");

    // Files an older release left open are closed at the next start.
    stack.gateway_mut().stop();
    set_mode(&state, 0o755);
    for name in STATE_FILES {
        set_mode(&state.join(name), 0o644);
    }
    stack.gateway_mut().start().await.unwrap();
    private("left open by an older gateway");
    assert!(
        stack
            .gateway()
            .log()
            .contains("routes.snapshot.json was open to other users (mode 644)"),
        "the tightening is logged:\n{}",
        stack.gateway().log()
    );
}

/// A keys file other users can read gives them every token's signing key:
/// the gateway refuses to start, naming the file and its mode.
#[tokio::test]
async fn a_gateway_with_a_keys_file_others_can_read_refuses_to_start() {
    let mut stack = TestStack::with_gateway().await.unwrap();
    stack.gateway_mut().stop();
    let keys = stack.gateway().dir.join("keys.toml");
    for mode in [0o644, 0o640] {
        set_mode(&keys, mode);
        let err = stack.gateway_mut().start().await.unwrap_err().to_string();
        assert!(
            err.contains(&format!(
                "keys file {} is readable by others (mode {mode:04o}); chmod 600 it",
                keys.display()
            )),
            "{err}"
        );
    }
    set_mode(&keys, 0o600);
    stack.gateway_mut().start().await.unwrap();
}

/// Whoever reads the gateway's host link client key can open any host's
/// link as a gateway: one others can read stops the start, named, and is
/// never quietly closed (it may have been read already).
#[tokio::test]
async fn a_gateway_whose_link_client_key_others_can_read_refuses_to_start() {
    let mut stack = TestStack::with_gateway().await.unwrap();
    stack.gateway_mut().stop();
    let key = stack.gateway().dir.join("state").join(LINK_CLIENT_KEY);
    set_mode(&key, 0o644);
    let err = stack.gateway_mut().start().await.unwrap_err().to_string();
    assert!(
        err.contains(&format!(
            "link client key {} is readable by others (mode 0644); chmod 600 it",
            key.display()
        )),
        "{err}"
    );
    set_mode(&key, 0o600);
    stack.gateway_mut().start().await.unwrap();
}
