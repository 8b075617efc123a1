#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test
//! TLS at the gateway, used as users use it: the platform and a session
//! over https with HTTP/2 where the client offers it, a kernel WebSocket
//! over wss, certificates chosen by SNI and replaced on disk without
//! dropping open connections, and configs whose TLS cannot work refused at
//! start-up with the file and the problem.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use opencloud_e2e::certs::client_config;
use opencloud_e2e::gateway::{GatewayProcess, GatewayTls};
use opencloud_e2e::jupyter::JupyterServer;
use opencloud_e2e::{binary, free_port, kernel, run_to_refusal, TestStack};
use reqwest::{StatusCode, Version};

/// The leaf certificate the gateway at `addr` presents for `server_name`.
fn served_certificate(addr: SocketAddr, server_name: &str, tls: &GatewayTls) -> Vec<u8> {
    let config = client_config(&tls.ca.pem()).unwrap();
    let name = rustls::pki_types::ServerName::try_from(server_name.to_owned()).unwrap();
    let mut conn = rustls::ClientConnection::new(config, name).unwrap();
    let mut tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).unwrap();
    }
    conn.peer_certificates().unwrap()[0].to_vec()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_platform_a_session_and_its_kernel_work_over_tls_with_http2_for_pages() {
    let stack = TestStack::with_gateway_tls().await.unwrap();
    let gateway = stack.gateway();
    let tls = gateway.tls.as_ref().unwrap();

    let home = stack.http().get(stack.url("/")).send().await.unwrap();
    assert_eq!(home.status(), StatusCode::OK);
    assert_eq!(home.version(), Version::HTTP_2, "ALPN chose h2");

    // SNI chooses the certificate: the platform's for localhost, the
    // wildcard for a session origin.
    let platform = served_certificate(gateway.addr(), "localhost", tls);
    let sessions = served_certificate(gateway.addr(), "abc.nb.localhost", tls);
    assert_ne!(platform, sessions);
    assert_eq!(
        sessions,
        std::fs::read(&tls.session_cert).map(pem_der).unwrap()
    );

    // Plain HTTP on the TLS port gets no answer, and the gateway lives on.
    let mut plain = std::net::TcpStream::connect(gateway.addr()).unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    plain
        .write_all(b"GET / HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .unwrap();
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer);
    assert!(
        !String::from_utf8_lossy(&answer).contains("HTTP/1.1 200"),
        "plain HTTP was served on the TLS listener"
    );

    // A session, entered through the ticket handshake, all on https.
    let jupyter = JupyterServer::start().await.unwrap();
    let user = stack.new_user().await;
    let sid = stack.session_for(&user, jupyter.target()).await;
    let cookie = stack.enter(&user, &sid).await;
    let origin = gateway.session_origin(&sid);
    assert!(origin.starts_with("https://"), "{origin}");
    let client = gateway.client(&[&sid], false);
    let lab = client
        .get(format!("{origin}/lab"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(lab.status(), StatusCode::OK);
    assert_eq!(lab.version(), Version::HTTP_2);

    let channels = kernel::start(&client, &origin, &cookie).await.unwrap();
    assert!(channels.starts_with("wss://"), "{channels}");
    let ca = tls.ca.pem();
    let mut ws = kernel::connect_trusting(&channels, gateway.addr(), &cookie, Some(&ca))
        .await
        .unwrap();
    assert_eq!(kernel::run(&mut ws, "1+1").await.unwrap(), "2");
}

/// The DER of the first certificate in a PEM file.
fn pem_der(pem: Vec<u8>) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(&pem)
        .next()
        .unwrap()
        .unwrap()
        .to_vec()
}

/// The stated deadline for a replaced certificate, and the poll's slack.
const RELOAD_DEADLINE: Duration = Duration::from_secs(2);
const SLACK: Duration = Duration::from_secs(3);

#[tokio::test(flavor = "multi_thread")]
async fn a_replaced_certificate_is_served_to_new_connections_while_a_websocket_stays_open() {
    let stack = TestStack::with_gateway_tls().await.unwrap();
    let gateway = stack.gateway();
    let tls = gateway.tls.as_ref().unwrap();
    let jupyter = JupyterServer::start().await.unwrap();
    let user = stack.new_user().await;
    let sid = stack.session_for(&user, jupyter.target()).await;
    let cookie = stack.enter(&user, &sid).await;
    let origin = gateway.session_origin(&sid);
    let channels = kernel::start(&gateway.client(&[&sid], false), &origin, &cookie)
        .await
        .unwrap();
    let ca = tls.ca.pem();
    let mut ws = kernel::connect_trusting(&channels, gateway.addr(), &cookie, Some(&ca))
        .await
        .unwrap();
    assert_eq!(kernel::run(&mut ws, "1+1").await.unwrap(), "2");

    let server_name = format!("{sid}.nb.localhost");
    let renewed = tls.renew_sessions().unwrap();
    let started = Instant::now();
    loop {
        if served_certificate(gateway.addr(), &server_name, tls) == renewed.cert_der {
            break;
        }
        assert!(
            started.elapsed() < RELOAD_DEADLINE + SLACK,
            "the replaced certificate was not served after {:?}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = started.elapsed();
    println!("the replaced certificate was served {took:?} after the files were written");
    assert!(took <= RELOAD_DEADLINE + SLACK);
    assert_eq!(
        kernel::run(&mut ws, "2+3").await.unwrap(),
        "5",
        "the open WebSocket went on"
    );

    // SIGHUP reloads too, and does not stop the gateway.
    gateway.signal("HUP");
    let mut logged = false;
    for _ in 0..50 {
        logged = gateway.log().contains("SIGHUP: reloading the certificates");
        if logged {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(logged, "{}", gateway.log());
    let home = stack.http().get(stack.url("/")).send().await.unwrap();
    assert_eq!(home.status(), StatusCode::OK);
    assert_eq!(kernel::run(&mut ws, "3+4").await.unwrap(), "7");
}

/// Starts a gateway whose TLS files `spoil` changed; its refusal message.
async fn refusal(stack: &TestStack, spoil: impl FnOnce(&GatewayTls)) -> String {
    let gateway = GatewayProcess::prepare_with(stack.control(), free_port(), true).unwrap();
    spoil(gateway.tls.as_ref().unwrap());
    let out = run_to_refusal(
        std::process::Command::new(binary("opencloud-gateway"))
            .arg("--config")
            .arg(&gateway.config_path),
        Duration::from_secs(20),
    )
    .unwrap();
    assert!(!out.status.success());
    let message = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !message.contains("panicked"),
        "a refusal, not a panic: {message}"
    );
    message
}

#[tokio::test(flavor = "multi_thread")]
async fn configs_whose_tls_cannot_work_stop_start_up_naming_the_file_and_the_problem() {
    let stack = TestStack::control_only().await.unwrap();

    let missing = refusal(&stack, |tls| {
        std::fs::remove_file(&tls.platform_cert).unwrap()
    })
    .await;
    assert!(
        missing.contains("tls.cert ") && missing.contains("platform.pem: cannot read the file"),
        "{missing}"
    );

    let mismatched = refusal(&stack, |tls| {
        let other = tls.ca.issue(&["*.nb.localhost"]);
        std::fs::write(&tls.session_key, other.key_pem).unwrap();
    })
    .await;
    assert!(
        mismatched.contains("tls.session_key ")
            && mismatched.contains("does not match the certificate in tls.session_cert"),
        "{mismatched}"
    );

    let expired = refusal(&stack, |tls| {
        let now = time::OffsetDateTime::now_utc();
        tls.ca
            .issue_valid(
                &["localhost"],
                now - time::Duration::days(30),
                now - time::Duration::days(1),
            )
            .write(&tls.platform_cert, &tls.platform_key)
            .unwrap();
    })
    .await;
    assert!(
        expired.contains("tls.cert ") && expired.contains("the certificate expired on"),
        "{expired}"
    );

    let misnamed = refusal(&stack, |tls| {
        tls.ca
            .issue(&["nb.localhost"])
            .write(&tls.session_cert, &tls.session_key)
            .unwrap();
    })
    .await;
    assert!(
        misnamed.contains("tls.session_cert ")
            && misnamed.contains("does not name *.nb.localhost (it names: nb.localhost)"),
        "{misnamed}"
    );
    println!("refusals:\n{missing}\n{mismatched}\n{expired}\n{misnamed}");
}

#[tokio::test(flavor = "multi_thread")]
async fn https_answers_carry_hsts_cookies_take_the_host_prefix_and_plain_http_redirects() {
    let stack = TestStack::with_gateway_tls().await.unwrap();
    let gateway = stack.gateway();
    let tls = gateway.tls.as_ref().unwrap();
    let hsts = |r: &reqwest::Response| {
        r.headers()
            .get("strict-transport-security")
            .map(|v| v.to_str().unwrap().to_owned())
    };

    // HSTS on control's pages through the gateway and on the gateway's own.
    let home = stack.http().get(stack.url("/")).send().await.unwrap();
    assert_eq!(hsts(&home).as_deref(), Some("max-age=31536000"));
    let sid = opencloud_protocol::routes::new_sid();
    let nobody = gateway
        .client(&[&sid], false)
        .get(format!("{}/lab", gateway.session_origin(&sid)))
        .send()
        .await
        .unwrap();
    assert!(nobody.status().is_client_error(), "{}", nobody.status());
    assert_eq!(hsts(&nobody).as_deref(), Some("max-age=31536000"));

    // The platform cookie and the session cookie: `__Host-`, Secure,
    // path /, no Domain.
    let user = stack.new_user().await;
    let login = stack
        .http()
        .post(stack.url("/api/v1/auth/login"))
        .json(&serde_json::json!({"email": user.email, "password": user.password}))
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), StatusCode::OK);
    let platform_cookie = login.headers()["set-cookie"].to_str().unwrap().to_owned();
    let jupyter = JupyterServer::start().await.unwrap();
    let session = stack.session_for(&user, jupyter.target()).await;
    let entered = stack.enter(&user, &session).await;
    for (cookie, name) in [
        (platform_cookie.as_str(), "__Host-oc_session="),
        (entered.as_str(), "__Host-oc_s="),
    ] {
        assert!(cookie.starts_with(name), "{cookie}");
    }
    let attributes = platform_cookie.to_ascii_lowercase();
    assert!(
        attributes.contains("; secure") && attributes.contains("; path=/"),
        "{platform_cookie}"
    );
    assert!(!attributes.contains("domain="), "{platform_cookie}");

    // Plain HTTP: the same path on https, for the platform's own names only.
    let plain = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let http = |host: String, path: &str| {
        plain
            .get(format!("http://127.0.0.1:{}{path}", tls.http_port))
            .header("host", host)
            .send()
    };
    let to_platform = http("localhost".into(), "/projects?tab=all").await.unwrap();
    assert_eq!(to_platform.status(), StatusCode::PERMANENT_REDIRECT);
    assert_eq!(
        to_platform.headers()["location"],
        format!("https://localhost:{}/projects?tab=all", gateway.port).as_str()
    );
    let to_session = http(format!("{session}.nb.localhost:80"), "/lab")
        .await
        .unwrap();
    assert_eq!(
        to_session.headers()["location"],
        format!("{}/lab", gateway.session_origin(&session)).as_str()
    );
    let elsewhere = http("evil.example".into(), "/").await.unwrap();
    assert_eq!(elsewhere.status(), StatusCode::NOT_FOUND);
    assert!(elsewhere.headers().get("location").is_none());

    // ACME HTTP-01: a challenge file in the state directory is served.
    let challenges = gateway.dir.join("state/acme-challenges");
    std::fs::write(challenges.join("t0ken-_x"), "t0ken-_x.thumbprint").unwrap();
    let challenge = http("localhost".into(), "/.well-known/acme-challenge/t0ken-_x")
        .await
        .unwrap();
    assert_eq!(challenge.status(), StatusCode::OK);
    assert_eq!(challenge.text().await.unwrap(), "t0ken-_x.thumbprint");
}
