#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test
//! What every part shows Prometheus, against the metric contract
//! (docs/metrics.md): names are `opencloud_<part>_…`, counters and only
//! counters end in `_total`, no label names a person, a session, a project
//! or an order (and no label value holds one), each part reports its build,
//! counters with fixed label values are there at zero before their first
//! event, and the gateway tells how old its route table is and which hosts
//! it reaches.

use std::time::{Duration, Instant};

use opencloud_e2e::exposition::{Exposition, PERSONAL_LABELS};
use opencloud_e2e::sessions::{open, wait_running};
use opencloud_e2e::TestStack;

/// The version every part reports: the workspace's, as this crate's.
const VERSION: &str = env!("CARGO_PKG_VERSION");

fn is_contract_name(name: &str) -> bool {
    let Some((part, tail)) = name
        .strip_prefix("opencloud_")
        .and_then(|rest| rest.split_once('_'))
    else {
        return false;
    };
    ["control", "gateway", "agent"].contains(&part)
        && !tail.is_empty()
        && tail
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// An email, or a sid anywhere in the value (a path, say).
fn looks_personal(value: &str) -> bool {
    value.contains('@')
        || value
            .split(|c: char| !c.is_ascii_alphanumeric())
            .any(opencloud_protocol::routes::is_valid_sid)
}

/// Part `part`'s scrape `text`, parsed and checked against the naming and
/// label rules; `secrets` (emails, sids, tokens this test made) must appear
/// in no label value.
fn checked(part: &str, text: &str, secrets: &[&str]) -> Exposition {
    let scrape = Exposition::parse(text)
        .unwrap_or_else(|e| panic!("{part}: the scrape does not parse: {e}\n{text}"));
    let prefix = format!("opencloud_{part}_");
    assert!(!scrape.types.is_empty(), "{part}: no metric families");
    for (family, kind) in &scrape.types {
        assert!(
            is_contract_name(family),
            "{part}: {family} is not named opencloud_(control|gateway|agent)_[a-z0-9_]+"
        );
        assert!(
            family.starts_with(&prefix),
            "{part}: {family} does not start with the part's {prefix}"
        );
        assert_eq!(
            kind == "counter",
            family.ends_with("_total"),
            "{part}: {family} is a {kind}; counters, and only counters, end in _total"
        );
    }
    for sample in &scrape.samples {
        let family = scrape.family_of(&sample.name);
        assert!(
            scrape.types.contains_key(family),
            "{part}: {} has no TYPE line",
            sample.name
        );
        for (label, value) in &sample.labels {
            assert!(
                !PERSONAL_LABELS.contains(&label.as_str()),
                "{part}: {family} has the label {label}"
            );
            assert!(
                !looks_personal(value),
                "{part}: {family}'s label {label}=\"{value}\" looks like a sid or an email"
            );
            for secret in secrets {
                assert!(
                    !value.contains(secret),
                    "{part}: {family}'s label {label} holds {secret}"
                );
            }
        }
    }
    let build_info = format!("{prefix}build_info");
    assert_eq!(
        scrape.value(&build_info, &[("version", VERSION)]),
        Some(1.0),
        "{part}: no {build_info}{{version=\"{VERSION}\"}} 1"
    );
    scrape
}

/// Each `(metric, labels)` is in `scrape` with the value 0.
fn at_zero(part: &str, scrape: &Exposition, series: &[(&str, &[(&str, &str)])]) {
    for (name, labels) in series {
        assert_eq!(
            scrape.value(name, labels),
            Some(0.0),
            "{part}: {name}{labels:?} is not registered at 0 before its first event"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_part_names_its_metrics_by_the_contract_and_keeps_people_out_of_labels() {
    let stack = TestStack::with_gateway().await.unwrap();

    // Fresh processes: the fixed-label counters are there before any event.
    let control = checked("control", &stack.control().metrics().await, &[]);
    at_zero(
        "control",
        &control,
        &[
            (
                "opencloud_control_webhook_rejections_total",
                &[("provider", "sandbox"), ("reason", "bad_signature")],
            ),
            (
                "opencloud_control_payments_total",
                &[("provider", "sandbox"), ("outcome", "paid")],
            ),
            ("opencloud_control_logins_total", &[("outcome", "success")]),
            (
                "opencloud_control_logins_total",
                &[("outcome", "throttled")],
            ),
            (
                "opencloud_control_token_rejections_total",
                &[("reason", "expired")],
            ),
            (
                "opencloud_control_placements_total",
                &[("outcome", "no_capacity")],
            ),
            (
                "opencloud_control_compute_seconds_total",
                &[("kind", "refunded")],
            ),
            (
                "opencloud_control_sessions_ended_total",
                &[("reason", "idle")],
            ),
        ],
    );
    let gateway = checked("gateway", &stack.gateway().metrics().await, &[]);
    at_zero(
        "gateway",
        &gateway,
        &[
            (
                "opencloud_gateway_token_rejections_total",
                &[("kind", "ticket"), ("reason", "reused")],
            ),
            (
                "opencloud_gateway_token_rejections_total",
                &[("kind", "session"), ("reason", "expired")],
            ),
            (
                "opencloud_gateway_origin_refusals_total",
                &[("reason", "foreign")],
            ),
            (
                "opencloud_gateway_rejected_requests_total",
                &[("reason", "slow header")],
            ),
            (
                "opencloud_gateway_rejected_requests_total",
                &[("reason", "header section too large")],
            ),
            (
                "opencloud_gateway_connections_closed_total",
                &[("reason", "host_gone")],
            ),
        ],
    );
    let age = gateway
        .value("opencloud_gateway_route_table_age_seconds", &[])
        .expect("gateway: no opencloud_gateway_route_table_age_seconds");
    // Control's stream sends a heartbeat every 5 s.
    assert!(
        (0.0..=10.0).contains(&age),
        "gateway: opencloud_gateway_route_table_age_seconds is {age}"
    );

    let owner = stack.host_owner().await;
    let [(host, agent)] = stack.online_hosts(&owner, [("host-a", 1)]).await;
    let fresh_agent = checked("agent", &agent.metrics().await, &[]);
    at_zero(
        "agent",
        &fresh_agent,
        &[
            ("opencloud_agent_spawn_failures_total", &[]),
            ("opencloud_agent_oom_kills_total", &[]),
            ("opencloud_agent_exits_total", &[]),
            (
                "opencloud_agent_snapshot_failures_total",
                &[("op", "restore")],
            ),
            ("opencloud_agent_snapshot_failures_total", &[("op", "push")]),
            ("opencloud_agent_warm_binds_total", &[]),
            ("opencloud_agent_warm_bind_failures_total", &[]),
            // Gauges, there from the start: no warm pool on test hosts, nobody waiting.
            ("opencloud_agent_warm_servers", &[]),
            ("opencloud_agent_starts_waiting", &[]),
        ],
    );

    // A little traffic: a login that fails, one that works, a session
    // opened and entered through the gateway.
    let alice = stack.new_user().await;
    let _ = stack.login(&alice.email, "not the password at all").await;
    let project = alice.create_project("Metrics").await;
    let (sid, url) = open(&alice, project).await;
    wait_running(&stack, &sid).await;
    let cookie = stack.follow_ticket(&sid, &url).await;
    let status = stack
        .gateway()
        .client(&[&sid], false)
        .get(format!(
            "{}/api/status",
            stack.gateway().session_origin(&sid)
        ))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap()
        .status();
    assert!(status.is_success(), "the session answered {status}");

    let secrets = [alice.email.as_str(), sid.as_str(), alice.token.as_str()];
    let control = checked("control", &stack.control().metrics().await, &secrets);
    for (name, labels, value) in [
        // The host owner's login and alice's.
        (
            "opencloud_control_logins_total",
            &[("outcome", "success")][..],
            2.0,
        ),
        (
            "opencloud_control_logins_total",
            &[("outcome", "bad_credentials")][..],
            1.0,
        ),
        (
            "opencloud_control_placements_total",
            &[("outcome", "placed")][..],
            1.0,
        ),
        (
            "opencloud_control_sessions",
            &[("state", "running")][..],
            1.0,
        ),
    ] {
        assert_eq!(
            control.value(name, labels),
            Some(value),
            "control: {name}{labels:?} after the traffic"
        );
    }
    let host_label = host.to_string();
    let reachable = [("host", host_label.as_str())];
    let started = Instant::now();
    loop {
        let gateway = checked("gateway", &stack.gateway().metrics().await, &secrets);
        if gateway.value("opencloud_gateway_host_reachable", &reachable) == Some(1.0) {
            assert!(
                gateway
                    .family("opencloud_gateway_requests_total")
                    .any(|s| s.labels.iter().any(|(k, v)| k == "class" && v == "session")),
                "gateway: the session's request is not in opencloud_gateway_requests_total"
            );
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "gateway: no opencloud_gateway_host_reachable{{host=\"{host}\"}} 1"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let agent_scrape = checked("agent", &agent.metrics().await, &secrets);
    assert!(
        agent_scrape.family("opencloud_agent_spawn_seconds").count() > 0,
        "agent: the session's start is not in opencloud_agent_spawn_seconds"
    );
}

/// A scrape that keeps every rule, to break one rule at a time below.
const GOOD: &str = "# TYPE opencloud_gateway_build_info gauge\n\
                    opencloud_gateway_build_info{version=\"VERSION\"} 1\n\
                    # TYPE opencloud_gateway_requests_total counter\n\
                    opencloud_gateway_requests_total{class=\"session\",status=\"200\"} 3\n";

fn good() -> String {
    GOOD.replace("VERSION", VERSION)
}

#[test]
fn the_checks_pass_a_scrape_that_keeps_the_rules() {
    checked("gateway", &good(), &["someone@example.com"]);
}

#[test]
#[should_panic(expected = "counters, and only counters, end in _total")]
fn the_checks_refuse_a_counter_without_total() {
    checked(
        "gateway",
        &good().replace("requests_total", "requests"),
        &[],
    );
}

#[test]
#[should_panic(expected = "does not start with the part's opencloud_gateway_")]
fn the_checks_refuse_another_parts_name() {
    checked(
        "gateway",
        &good().replace("gateway_requests", "control_requests"),
        &[],
    );
}

#[test]
#[should_panic(expected = "has the label sid")]
fn the_checks_refuse_a_sid_label() {
    checked("gateway", &good().replace("class=", "sid="), &[]);
}

#[test]
#[should_panic(expected = "looks like a sid or an email")]
fn the_checks_refuse_an_email_in_a_label_value() {
    checked(
        "gateway",
        &good().replace("\"session\"", "\"someone@example.com\""),
        &[],
    );
}

#[test]
#[should_panic(expected = "no opencloud_gateway_build_info")]
fn the_checks_want_build_info() {
    checked("gateway", &good().replace("} 1\n", "} 0\n"), &[]);
}

/// A stranger sending made-up methods and paths must not grow control's
/// series: each would be a new label value kept forever.
#[tokio::test(flavor = "multi_thread")]
async fn made_up_methods_and_paths_do_not_grow_controls_series() {
    let stack = TestStack::control_only().await.unwrap();
    let http = stack.http();
    for n in 0..20 {
        let method = reqwest::Method::from_bytes(format!("ZZTOP{n}").as_bytes()).unwrap();
        for path in ["/api/v1/packages".to_owned(), format!("/made-up/{n}")] {
            let r = http
                .request(method.clone(), stack.url(&path))
                .send()
                .await
                .unwrap();
            assert!(r.status().is_client_error(), "{} {path}", r.status());
        }
    }
    let text = stack.control().metrics().await;
    checked("control", &text, &[]);
    let requests: Vec<_> = text
        .lines()
        .filter(|l| l.starts_with("opencloud_control_http_requests_total{"))
        .collect();
    assert!(
        requests
            .iter()
            .all(|l| !l.contains("ZZTOP") && !l.contains("made-up")),
        "made-up methods or paths became label values:\n{}",
        requests.join("\n")
    );
}
