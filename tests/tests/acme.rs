#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test
//! Automatic certificates against a real ACME CA (pebble): a gateway with
//! `[tls.acme]` and no platform certificate gets one issued over HTTP-01,
//! serves it, and renews it when it nears expiry, the reload picking the
//! new pair up without a restart; a CA that fails is counted and retried
//! while the kept pair serves on.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use opencloud_e2e::certs::client_config;
use opencloud_e2e::gateway::GatewayProcess;
use opencloud_e2e::pebble::Pebble;
use opencloud_e2e::{free_port, TestStack};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

/// The chain the gateway at `addr` presents for `localhost`, checked
/// against `root_pem`; `None` while no handshake succeeds.
fn served_chain(addr: SocketAddr, root_pem: &str) -> Option<Vec<Vec<u8>>> {
    let config = client_config(root_pem).unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut conn = rustls::ClientConnection::new(config, name).unwrap();
    let mut tcp = std::net::TcpStream::connect(addr).ok()?;
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).ok()?;
    }
    Some(
        conn.peer_certificates()?
            .iter()
            .map(|c| c.to_vec())
            .collect(),
    )
}

/// Polls until the served chain satisfies `wanted`, for at most `limit`;
/// the chain and how long it took.
async fn wait_for_chain(
    gateway: &GatewayProcess,
    root_pem: &str,
    limit: Duration,
    what: &str,
    wanted: impl Fn(&[Vec<u8>]) -> bool,
) -> (Vec<Vec<u8>>, Duration) {
    let started = Instant::now();
    loop {
        if let Some(chain) = served_chain(gateway.addr(), root_pem) {
            if wanted(&chain) {
                return (chain, started.elapsed());
            }
        }
        assert!(
            started.elapsed() < limit,
            "{what}: not within {limit:?}; gateway log:\n{}",
            gateway.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn der(pem: &str) -> Vec<u8> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .unwrap()
        .unwrap()
        .to_vec()
}

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread")]
async fn acme_issues_the_platform_certificate_serves_it_and_renews_it_near_expiry() {
    let stack = TestStack::control_only().await.unwrap();
    let mut gateway = GatewayProcess::prepare_with(stack.control(), free_port(), true).unwrap();
    let http_port = gateway.tls.as_ref().unwrap().http_port;
    // Certificates that live 30 days and 30 s against the default window
    // of 30 days: each is due for renewal half a minute after issue.
    let validity = Duration::from_secs(30 * 86_400 + 30);
    let pebble = Pebble::start(http_port, validity).await.unwrap();
    gateway
        .use_acme(&format!(
            "directory = \"{}\"\ndirectory_ca = \"{}\"\ncontact = \"ops@example.com\"\n",
            pebble.directory,
            pebble.listener_ca.display()
        ))
        .unwrap();
    gateway.start().await.unwrap();
    let root = pebble.root_pem().await.unwrap();
    let intermediate = der(&pebble.intermediate_pem().await.unwrap());

    // Issued: a chain to pebble's root, signed by its intermediate.
    let (first, took) = wait_for_chain(
        &gateway,
        &root,
        Duration::from_secs(60),
        "a certificate issued by pebble",
        |_| true,
    )
    .await;
    println!("pebble's certificate was served {took:?} after the gateway listened");
    assert_eq!(
        first.get(1),
        Some(&intermediate),
        "issued by pebble's intermediate"
    );
    let tls = gateway.tls.as_ref().unwrap();
    assert_eq!(mode(&tls.platform_key), 0o600);
    assert_eq!(mode(&gateway.dir.join("state/acme-account.json")), 0o600);
    let leftover: Vec<_> = std::fs::read_dir(gateway.dir.join("state/acme-challenges"))
        .unwrap()
        .collect();
    assert!(
        leftover.is_empty(),
        "challenge answers left behind: {leftover:?}"
    );

    // Renewed near expiry: a new certificate, served without a restart.
    let (renewed, took) = wait_for_chain(
        &gateway,
        &root,
        Duration::from_secs(90),
        "a renewed certificate",
        |chain| chain[0] != first[0],
    )
    .await;
    println!("the renewed certificate was served {took:?} after the first");
    assert_eq!(renewed.get(1), Some(&intermediate));
    let metrics = gateway.metrics().await;
    assert!(
        metrics.contains("opencloud_gateway_acme_orders_total{outcome=\"issued\"}"),
        "{metrics}"
    );
    let log = gateway.log();
    assert_eq!(
        log.matches("ACME account created and kept").count(),
        1,
        "the account is reused:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_ca_is_counted_and_retried_while_the_kept_certificate_serves_on() {
    let stack = TestStack::control_only().await.unwrap();
    let mut gateway = GatewayProcess::prepare_with(stack.control(), free_port(), true).unwrap();
    let ca_file = gateway.dir.join("nobody-ca.pem");
    std::fs::write(&ca_file, gateway.tls.as_ref().unwrap().ca.pem()).unwrap();
    // A CA nobody answers for.
    gateway
        .use_acme(&format!(
            "directory = \"https://127.0.0.1:{}/dir\"\ndirectory_ca = \"{}\"\n",
            free_port(),
            ca_file.display()
        ))
        .unwrap();
    // The kept pair is valid but inside the 30-day renewal window.
    let tls = gateway.tls.as_ref().unwrap();
    let now = time::OffsetDateTime::now_utc();
    let kept = tls.ca.issue_valid(
        &["localhost"],
        now - time::Duration::days(80),
        now + time::Duration::days(10),
    );
    kept.write(&tls.platform_cert, &tls.platform_key).unwrap();
    gateway.start().await.unwrap();
    let ca = gateway.tls.as_ref().unwrap().ca.pem();

    let (served, _) = wait_for_chain(
        &gateway,
        &ca,
        Duration::from_secs(10),
        "the kept pair",
        |_| true,
    )
    .await;
    assert_eq!(served[0], kept.cert_der);
    gateway
        .metrics_show(&["opencloud_gateway_acme_orders_total{outcome=\"failed\"} 1"])
        .await;
    let log = gateway.log();
    assert!(
        log.contains("ACME order failed, the serving certificate stays"),
        "{log}"
    );
    assert_eq!(served_chain(gateway.addr(), &ca).unwrap()[0], kept.cert_der);
}
