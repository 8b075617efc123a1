#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test
//! The admin overview at `/admin` and the scrape-time gauges behind it:
//! after real users register, buy through the sandbox and open a session
//! on a real agent, the tiles, the hosts table, the charts and control's
//! `/metrics` all tell the same, right numbers; only admins see the page.

use mysql_async::prelude::Queryable;
use opencloud_control::billing::money;
use opencloud_e2e::control::ControlOptions;
use opencloud_e2e::sessions::{open, wait_running};
use opencloud_e2e::{TestStack, TestUser};
use quick_xml::events::Event;
use reqwest::StatusCode;

// ----- reading the page -----

/// The values of the headline tile `id` (`tile-{id}`), as the page shows them.
fn tile(html: &str, id: &str) -> Vec<String> {
    let start = html
        .find(&format!("id=\"tile-{id}\""))
        .unwrap_or_else(|| panic!("no tile {id}: {html}"));
    let rest = &html[start..];
    let tile = &rest[..rest.find("</div>").unwrap()];
    tile.split("<strong class=\"tile-value\">")
        .skip(1)
        .map(|v| v[..v.find("</strong>").unwrap()].trim().to_owned())
        .collect()
}

/// The `<svg>` of chart `id` (`chart-{id}`).
fn chart_svg<'a>(html: &'a str, id: &str) -> &'a str {
    let start = html
        .find(&format!("id=\"chart-{id}\""))
        .unwrap_or_else(|| panic!("no chart {id}: {html}"));
    let rest = &html[start..];
    let svg = rest.find("<svg").unwrap();
    let end = rest.find("</svg>").unwrap() + "</svg>".len();
    &rest[svg..end]
}

/// A chart as parsed (which fails on XML that is not well-formed): its
/// title, and its bars as (bucket, value).
struct ParsedChart {
    title: String,
    bars: Vec<(String, String)>,
    text: String,
}

fn parse_chart(svg: &str) -> ParsedChart {
    let mut reader = quick_xml::Reader::from_str(svg);
    let mut chart = ParsedChart {
        title: String::new(),
        bars: Vec::new(),
        text: String::new(),
    };
    let mut depth = 0;
    let mut in_title = false;
    let attr = |e: &quick_xml::events::BytesStart<'_>, name: &str| {
        e.try_get_attribute(name)
            .unwrap()
            .map(|a| String::from_utf8_lossy(&a.value).into_owned())
    };
    loop {
        match reader.read_event() {
            Ok(Event::Start(e)) => {
                depth += 1;
                in_title = depth == 2 && e.name().as_ref() == b"title";
                if e.name().as_ref() == b"rect" && attr(&e, "class").as_deref() == Some("bar") {
                    chart.bars.push((
                        attr(&e, "data-bucket").unwrap(),
                        attr(&e, "data-value").unwrap(),
                    ));
                }
            }
            Ok(Event::Empty(e)) => {
                assert_ne!(e.name().as_ref(), b"rect", "bars carry their <title>");
            }
            Ok(Event::End(_)) => {
                depth -= 1;
                in_title = false;
            }
            Ok(Event::Text(t)) => {
                let text = String::from_utf8_lossy(&t).into_owned();
                if in_title {
                    chart.title.push_str(&text);
                }
                chart.text.push_str(&text);
            }
            Ok(Event::Eof) => break,
            Ok(_) => {}
            Err(e) => panic!("the chart is not well-formed XML: {e}\n{svg}"),
        }
    }
    assert_eq!(depth, 0, "every element is closed: {svg}");
    chart
}

/// `HH:00` of the UTC hour holding now.
fn this_hour() -> String {
    format!("{:02}:00", opencloud_control::now_unix() / 3600 % 24)
}

// ----- reading /metrics -----

/// The value of the series `name_and_labels` (exactly as exposed, e.g.
/// `opencloud_control_host_up{host="3"}`), if present.
fn metric(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .filter_map(|line| line.strip_prefix(name_and_labels))
        .find_map(|rest| rest.strip_prefix(' '))
        .map(|v| v.trim().parse().unwrap())
}

fn metric_is(text: &str, name_and_labels: &str, want: f64) {
    assert_eq!(
        metric(text, name_and_labels),
        Some(want),
        "{name_and_labels} in:\n{}",
        text.lines()
            .filter(|l| l.starts_with("opencloud_control_"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

async fn backdate_last_seen(stack: &TestStack, user: &TestUser, minutes: u32) {
    stack
        .db
        .conn()
        .await
        .exec_drop(
            "UPDATE login_sessions SET last_seen_at = UTC_TIMESTAMP(6) - INTERVAL ? MINUTE
             WHERE user_id = ?",
            (minutes, user.id),
        )
        .await
        .unwrap();
}

async fn outstanding_seconds(stack: &TestStack) -> f64 {
    let seconds: i64 = stack
        .db
        .conn()
        .await
        .query_first(
            "SELECT CAST(COALESCE(SUM(seconds_left), 0) AS SIGNED) FROM lots
             WHERE expired_at IS NULL AND expires_at > UTC_TIMESTAMP(6)",
        )
        .await
        .unwrap()
        .unwrap();
    seconds as f64
}

#[tokio::test(flavor = "multi_thread")]
async fn the_overview_and_the_metrics_show_a_purchase_a_running_session_and_its_host() {
    let stack = TestStack::with_gateway().await.unwrap();
    let admin = stack.admin().await;
    let owner = stack.host_owner().await;
    let [(host, _agent)] = stack.online_hosts(&owner, [("overview-host", 2)]).await;
    let customer = stack.new_user().await;
    let hour_before = this_hour();

    // A purchase through the sandbox, and a session on the real agent.
    let package = stack.packages_on_sale().await.remove(0);
    let order = stack.buy(&customer, package.id).await;
    let currency: String = stack
        .db
        .conn()
        .await
        .exec_first("SELECT currency FROM orders WHERE id = ?", (order,))
        .await
        .unwrap()
        .unwrap();
    let project = customer.create_project("Overview").await;
    let (sid, _) = open(&customer, project).await;
    wait_running(&stack, &sid).await;
    // Everyone has made a request within the minute.
    for user in [&owner, &customer] {
        assert_eq!(user.get("/api/v1/me").await.0, StatusCode::OK);
    }
    assert_eq!(stack.db.count("users").await, 3, "no other users");

    let html = admin.page("/admin").await;
    let hour_after = this_hour();
    assert_eq!(tile(&html, "users-online"), ["3"]);
    assert_eq!(tile(&html, "sessions"), ["1"]);
    assert_eq!(tile(&html, "hosts-online"), ["1 / 1"]);
    let ready = &tile(&html, "open-to-ready")[0];
    assert!(ready.ends_with(" s"), "a median, in seconds: {ready}");
    assert_eq!(
        tile(&html, "revenue-today"),
        [money::minor(package.price_minor as i64, &currency)]
    );
    assert!(html.contains("1 opened, none failed"), "{html}");
    let row = &html[html
        .find(&format!("<tr data-host-id=\"{host}\">"))
        .expect("the host's row")..];
    let row = &row[..row.find("</tr>").unwrap()];
    assert!(row.contains("data-up=\"up\""), "{row}");
    assert!(row.contains("<td class=\"num\">1 / 2</td>"), "{row}");
    assert!(html.contains("class=\"active\">Overview</a>"), "{html}");

    // The charts: well-formed, titled, a bar in the hour the session opened.
    let hours = [hour_before.as_str(), hour_after.as_str()];
    let opens = parse_chart(chart_svg(&html, "opens"));
    assert_eq!(opens.title, "Sessions opened per hour (UTC)");
    assert_eq!(opens.bars.len(), 1, "one hour had opens: {:?}", opens.bars);
    assert!(
        hours.contains(&opens.bars[0].0.as_str()),
        "{:?}",
        opens.bars
    );
    assert_eq!(opens.bars[0].1, "1 session");
    let running = parse_chart(chart_svg(&html, "sessions-running"));
    assert!(hours.contains(&running.bars.last().unwrap().0.as_str()));
    let failures = parse_chart(chart_svg(&html, "open-failures"));
    assert!(failures.bars.is_empty());
    assert!(failures.text.contains("No data in the last 24 h"));
    let signups = parse_chart(chart_svg(&html, "signups"));
    let signed_up: f64 = signups
        .bars
        .iter()
        .map(|(_, v)| v.split(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert_eq!(signed_up, 3.0, "{:?}", signups.bars);
    let revenue = parse_chart(chart_svg(
        &html,
        &format!("revenue-{}", currency.to_lowercase()),
    ));
    assert_eq!(revenue.bars.len(), 1, "{:?}", revenue.bars);
    let paid = package.price_minor as f64 / 100.0;
    assert_eq!(revenue.bars[0].1, format!("{paid} {currency}"));
    parse_chart(chart_svg(&html, "hosts-online"));

    // /metrics: the same numbers, per host by its id.
    let before = outstanding_seconds(&stack).await;
    let text = stack.control().metrics().await;
    let after = outstanding_seconds(&stack).await;
    let h = format!("{{host=\"{host}\"}}");
    metric_is(&text, "opencloud_control_users_online", 3.0);
    metric_is(&text, &format!("opencloud_control_host_up{h}"), 1.0);
    metric_is(&text, &format!("opencloud_control_host_sessions{h}"), 1.0);
    metric_is(
        &text,
        &format!("opencloud_control_revenue_today_minor{{currency=\"{currency}\"}}"),
        package.price_minor as f64,
    );
    let age = metric(
        &text,
        &format!("opencloud_control_host_heartbeat_age_seconds{h}"),
    )
    .unwrap();
    assert!((0.0..30.0).contains(&age), "heartbeat age {age}");
    let memory = metric(
        &text,
        &format!("opencloud_control_host_memory_used_ratio{h}"),
    )
    .unwrap();
    assert!(memory > 0.0 && memory <= 1.0, "memory used {memory}");
    for name in ["cpu_ratio", "uptime_ratio_30d"] {
        let v = metric(&text, &format!("opencloud_control_host_{name}{h}")).unwrap();
        assert!((0.0..=1.0).contains(&v), "{name} {v}");
    }
    let outstanding = metric(&text, "opencloud_control_compute_seconds_outstanding").unwrap();
    assert!(
        (after..=before).contains(&outstanding)
            && outstanding >= package.compute_seconds as f64 / 2.0,
        "outstanding {outstanding}, database {before}..{after}"
    );

    // Quiet for 10 minutes: the owner is no longer online; the customer
    // still is, through the running session.
    backdate_last_seen(&stack, &owner, 10).await;
    backdate_last_seen(&stack, &customer, 10).await;
    assert_eq!(tile(&admin.page("/admin").await, "users-online"), ["2"]);
    let text = stack.control().metrics().await;
    metric_is(&text, "opencloud_control_users_online", 2.0);

    // A host whose key is revoked leaves the page, and its series go to 0.
    let (status, body) = owner
        .post(
            &format!("/api/v1/hosts/{host}/revoke"),
            serde_json::json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let html = admin.page("/admin").await;
    assert!(
        !html.contains(&format!("data-host-id=\"{host}\"")),
        "{html}"
    );
    assert_eq!(tile(&html, "hosts-online"), ["0 / 0"]);
    let text = stack.control().metrics().await;
    metric_is(&text, &format!("opencloud_control_host_up{h}"), 0.0);
    metric_is(&text, &format!("opencloud_control_host_sessions{h}"), 0.0);
    // A session that ran and then failed (as when an agent restarts without
    // it) was no failed open: only one that never became ready counts.
    stack
        .db
        .conn()
        .await
        .query_drop("UPDATE sessions SET state = 'failed', end_reason = 'agent_restarted'")
        .await
        .unwrap();
    let html = admin.page("/admin").await;
    assert!(html.contains("1 opened, none failed"), "{html}");
    stack
        .db
        .conn()
        .await
        .query_drop("UPDATE sessions SET ready_at = NULL")
        .await
        .unwrap();
    let html = admin.page("/admin").await;
    assert!(html.contains("1 opened, 1 failed to start"), "{html}");
}

#[tokio::test]
async fn only_admins_see_the_overview_and_empty_charts_say_so() {
    let stack = TestStack::control_only_with(ControlOptions {
        env: vec![(
            "OPENCLOUD_CONTROL__GRAFANA_URL".into(),
            "https://grafana.example/d/opencloud".into(),
        )],
        ..ControlOptions::default()
    })
    .await
    .unwrap();
    let admin = stack.admin().await;
    let user = stack.new_user().await;

    let (status, body) = user.get_text("/admin").await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let r = stack.get_anonymous("/admin").await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER, "sent to log in");
    let to = r.headers()["location"].to_str().unwrap();
    assert!(to.starts_with("/login"), "{to}");

    let html = admin.page("/admin").await;
    assert!(
        html.contains("href=\"https://grafana.example/d/opencloud\""),
        "the Grafana link: {html}"
    );
    assert_eq!(tile(&html, "sessions"), ["0"]);
    assert_eq!(tile(&html, "hosts-online"), ["0 / 0"]);
    assert_eq!(tile(&html, "open-to-ready"), ["—"]);
    assert!(html.contains("No registered hosts."), "{html}");
    for id in ["sessions-running", "opens", "open-failures", "revenue"] {
        let chart = parse_chart(chart_svg(&html, id));
        assert!(chart.bars.is_empty(), "{id}: {:?}", chart.bars);
        assert!(chart.text.contains("No data in the last 24 h"), "{id}");
    }
    // Before any money moved, the money gauges exist at 0 for the
    // packages' currency, so their panels and alerts have a series.
    let text = stack.control().metrics().await;
    let currency: String = stack
        .db
        .conn()
        .await
        .query_first("SELECT currency FROM packages LIMIT 1")
        .await
        .unwrap()
        .unwrap();
    for name in [
        "opencloud_control_revenue_today_minor",
        "opencloud_control_host_earnings_owed_minor",
    ] {
        metric_is(&text, &format!("{name}{{currency=\"{currency}\"}}"), 0.0);
    }
    let hosts = parse_chart(chart_svg(&html, "hosts-online"));
    assert!(hosts
        .text
        .contains("No host was online in the last 30 days"));
    // The two sign-ups are this hour's bar.
    let signups = parse_chart(chart_svg(&html, "signups"));
    assert_eq!(signups.bars.len(), 1, "{:?}", signups.bars);
    assert_eq!(signups.bars[0].1, "2 users");
    assert!(!signups.text.contains("No data"));

    // Without a Grafana URL there is no link.
    let plain = TestStack::control_only().await.unwrap();
    let html = plain.admin().await.page("/admin").await;
    assert!(!html.contains("Open Grafana"), "{html}");
}
