#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test
//! Restarting the gateway: graceful shutdown lets in-flight requests finish,
//! and `--upgrade` replaces the binary without refusing a connection.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use opencloud_e2e::TestStack;
use reqwest::StatusCode;

#[tokio::test]
async fn an_upgrade_replaces_the_gateway_without_refusing_connections() {
    let mut stack = TestStack::with_gateway().await.unwrap();
    let url = format!("{}/healthz", stack.gateway().platform());
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        // A fresh connection per request, so every accept is exercised.
        let http = reqwest::Client::builder()
            .resolve("localhost", stack.gateway().addr())
            .pool_max_idle_per_host(0)
            .build()
            .unwrap();
        let url = url.clone();
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match http.get(&url).send().await {
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
    println!("{ok} requests answered across the upgrade ({before} before it), {failed} failed");
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
    assert!(tokio::net::TcpStream::connect(stack.gateway().addr())
        .await
        .is_err());
}
