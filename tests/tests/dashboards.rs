#![allow(clippy::unwrap_used)]
//! The Grafana dashboards against a real Prometheus scraping a real stack
//! (control, gateway, one agent): after a customer's day (register, a
//! purchase, Open, the notebook through the gateway, refused tokens) every
//! query of every panel must answer with data. And their shape: data
//! source, ids, bounded labels, metric names the code records; and the
//! alert rules: known names, valid, and quiet on the healthy stack.
//!
//! OPENCLOUD_PROMETHEUS_KEEP=<seconds> keeps the stack and Prometheus up
//! that long after the traffic, printing Prometheus's URL (for
//! dashboards/plot.py).

use std::time::{Duration, Instant};

use opencloud_e2e::dashboards::{unanswered, AlertRule, Dashboard};
use opencloud_e2e::prometheus::{Prometheus, ScrapeTarget};
use opencloud_e2e::sessions::{open, wait_running};
use opencloud_e2e::{kernel, TestStack};
use reqwest::StatusCode;

#[test]
fn dashboards_and_alerts_use_known_bounded_names_and_panels_their_data_source() {
    let dashboards = Dashboard::all();
    let problems: Vec<String> = dashboards
        .iter()
        .flat_map(Dashboard::problems)
        .chain(AlertRule::all().iter().flat_map(AlertRule::problems))
        .collect();
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    let mut uids: Vec<&str> = dashboards
        .iter()
        .map(|d| d.json["uid"].as_str().unwrap())
        .collect();
    uids.sort();
    uids.dedup();
    assert_eq!(uids.len(), dashboards.len(), "dashboard uids must differ");
}

#[tokio::test]
async fn every_panel_answers_from_prometheus_scraping_a_stack_in_use() {
    // No sign-up grant: the customer's session runs on bought time, so its
    // host's owner earns (granted time pays hosts nothing).
    let stack = TestStack::with_gateway_env(vec![(
        "OPENCLOUD_CONTROL__BILLING__SIGNUP_GRANT_SECONDS".into(),
        "0".into(),
    )])
    .await
    .unwrap();
    let owner = stack.host_owner().await;
    let (host, key) = stack.add_host(&owner, "host-a").await;
    let agent = stack.start_agent(&key, 2);
    stack.wait_placeable(host).await;

    let control = stack.control();
    let gateway = stack.gateway();
    let prometheus = Prometheus::start(&[
        ScrapeTarget {
            job: "control",
            address: control.internal.trim_start_matches("http://").to_owned(),
            bearer: Some(control.gateway_key.clone()),
        },
        ScrapeTarget {
            job: "gateway",
            address: format!("127.0.0.1:{}", gateway.metrics_port),
            bearer: Some(gateway.metrics_key.clone()),
        },
        ScrapeTarget {
            job: "agent",
            address: agent.metrics_addr().to_string(),
            bearer: None,
        },
    ])
    .await
    .unwrap();
    let started = Instant::now();

    // A customer buys time through the sandbox provider, opens a project
    // and works in the notebook through the gateway, a kernel's WebSocket
    // left open.
    let user = stack.new_user().await;
    stack.admin().await;
    let package = stack.packages_on_sale().await[0].id;
    stack.buy(&user, package).await;
    let project = user.create_project("Dashboards").await;
    let (sid, url) = open(&user, project).await;
    wait_running(&stack, &sid).await;
    let cookie = stack.follow_ticket(&sid, &url).await;
    let origin = gateway.session_origin(&sid);
    let client = gateway.client(&[&sid], false);
    let lab = client
        .get(format!("{origin}/lab"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(lab.status(), StatusCode::OK, "Lab through the gateway");
    let channels = kernel::start(&client, &origin, &cookie).await.unwrap();
    let mut ws = kernel::connect(&channels, gateway.addr(), &cookie)
        .await
        .unwrap();
    assert_eq!(kernel::run(&mut ws, "print(6*7)").await.unwrap(), "42");

    // Refused tokens: a forged session cookie at the gateway, a forged
    // bearer at control.
    let forged = client
        .get(format!("{origin}/lab"))
        .header("cookie", "oc_s=forged")
        .send()
        .await
        .unwrap();
    assert_ne!(forged.status(), StatusCode::OK, "a forged session cookie");
    let r = stack.get_with_bearer("/api/v1/projects", "forged").await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    prometheus
        .wait_scraped(5, Duration::from_secs(60))
        .await
        .unwrap();
    // The events above in a few more scrapes, for rate() windows.
    tokio::time::sleep(Duration::from_secs(5)).await;
    if let Some(seconds) = std::env::var("OPENCLOUD_PROMETHEUS_KEEP")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        println!("Prometheus at {} for {seconds} s", prometheus.url);
        // Steady use meanwhile, so the plots show rates and latencies: Lab,
        // code in the kernel, the API, a forged cookie.
        let until = Instant::now() + Duration::from_secs(seconds);
        while Instant::now() < until {
            let _ = client
                .get(format!("{origin}/lab"))
                .header("cookie", &cookie)
                .send()
                .await;
            let _ = kernel::run(&mut ws, "sum(range(10**5))").await;
            let _ = user.get("/api/v1/projects").await;
            let _ = client
                .get(format!("{origin}/lab"))
                .header("cookie", "oc_s=forged")
                .send()
                .await;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    let range = started.elapsed().max(Duration::from_secs(30));
    let failures = unanswered(
        &prometheus,
        &Dashboard::all(),
        range,
        Duration::from_secs(2),
    )
    .await;
    assert!(
        failures.is_empty(),
        "{} queries without data:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // A healthy stack raises no alert, and every rule is valid PromQL.
    for rule in AlertRule::all() {
        let firing = prometheus.query(&rule.expr).await.unwrap_or_else(|e| {
            panic!("alerts.yml {}: {e}", rule.alert);
        });
        assert!(
            firing.is_empty(),
            "alerts.yml {} fires on a healthy stack: {firing:?}",
            rule.alert
        );
    }
    drop(ws);
}
