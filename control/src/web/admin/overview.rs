//! Admin: the overview at `/admin`. The headline numbers, every host's
//! health and the last 24 hours as charts, all from `crate::stats` (the
//! same numbers `/metrics` publishes).

use askama::Template;
use axum::extract::State;
use axum::routing::get;
use axum::Router;
use time::macros::format_description;

use super::chart::{self, Chart, Spec};
use super::numbers::{human_duration, trim_number};
use crate::app::App;
use crate::billing::money;
use crate::clock::now_unix;
use crate::stats::{self, HostStat, Hourly, Stats};
use crate::web::auth::Ctx;
use crate::web::errors::PageResult;
use crate::web::layout::Layout;
use crate::web::render::ok;

pub fn routes() -> Router<App> {
    Router::new().route("/admin", get(overview_page))
}

/// A headline tile: a label, its number(s) and a line saying what it is.
struct Tile {
    id: &'static str,
    label: &'static str,
    values: Vec<String>,
    note: String,
}

impl Tile {
    fn new(id: &'static str, label: &'static str, value: String, note: String) -> Self {
        Self {
            id,
            label,
            values: vec![value],
            note,
        }
    }
}

/// A host's row, formatted.
struct HostRow {
    id: u64,
    name: String,
    /// `up`, `draining` or `down`; also its badge's class.
    state: &'static str,
    heartbeat: String,
    sessions: String,
    load: String,
    cpu: String,
    memory: String,
    uptime: String,
}

fn percent(ratio: f64) -> String {
    format!("{} %", trim_number(100.0 * ratio, 1))
}

impl From<&HostStat> for HostRow {
    fn from(h: &HostStat) -> Self {
        let state = match (h.up, h.draining) {
            (true, false) => "up",
            (true, true) => "draining",
            (false, _) => "down",
        };
        Self {
            id: h.id,
            name: h.name.clone(),
            state,
            heartbeat: h.heartbeat_age_seconds.map_or_else(
                || "never".to_owned(),
                |age| format!("{} ago", human_duration(age as u64)),
            ),
            sessions: format!("{} / {}", h.sessions, h.max_sessions),
            load: percent(h.load_ratio),
            cpu: percent(h.cpu_ratio),
            memory: percent(h.memory_used_ratio),
            uptime: percent(h.uptime_ratio_30d),
        }
    }
}

#[derive(Template)]
#[template(path = "admin_overview.html")]
struct OverviewPage {
    layout: Layout,
    tiles: Vec<Tile>,
    compute: Vec<Tile>,
    hosts: Vec<HostRow>,
    charts: Vec<Chart>,
    grafana_url: Option<String>,
    /// When the numbers were read, UTC.
    as_of: String,
}

async fn overview_page(State(app): State<App>, ctx: Ctx) -> PageResult {
    ctx.require_admin()?;
    let now = now_unix();
    let stats = stats::read(&app.pool).await?;
    let day = stats::last_day(&app.pool, now).await?;
    ok(OverviewPage {
        layout: ctx.layout(),
        tiles: tiles(&stats),
        compute: compute_tiles(&stats),
        hosts: stats.hosts.iter().map(HostRow::from).collect(),
        charts: charts(&day),
        grafana_url: app.config.grafana_url.clone(),
        as_of: clock_time(now, format_description!("[hour]:[minute]:[second]")),
    })
}

fn tiles(stats: &Stats) -> Vec<Tile> {
    let h = &stats.headline;
    let open_to_ready = h.open_to_ready_median_seconds.map_or_else(
        || "—".to_owned(),
        |s| {
            if s < 60.0 {
                format!("{} s", trim_number(s, 1))
            } else {
                human_duration(s.round() as u64)
            }
        },
    );
    let failures = match h.open_failures_last_hour {
        0 => "none failed".to_owned(),
        n => format!("{n} failed to start"),
    };
    let money_tile = |id, label, values: Vec<String>, note: &str| Tile {
        id,
        label,
        values: if values.is_empty() {
            vec!["—".to_owned()]
        } else {
            values
        },
        note: note.to_owned(),
    };
    vec![
        Tile::new(
            "users-online",
            "Users online",
            h.users_online.to_string(),
            "a live session or a request in the last 5 min".into(),
        ),
        Tile::new(
            "sessions",
            "Sessions running",
            h.sessions_running.to_string(),
            format!("{} starting", h.sessions_starting),
        ),
        Tile::new(
            "queue",
            "Opens waiting",
            h.queue_length.to_string(),
            if h.queue_length == 0 {
                "every open found a host with room".into()
            } else {
                format!(
                    "the first for {}",
                    human_duration(h.queue_oldest_wait_seconds.round() as u64)
                )
            },
        ),
        Tile::new(
            "hosts-online",
            "Hosts online",
            format!("{} / {}", h.hosts_online, h.hosts_total),
            "registered hosts heartbeating".into(),
        ),
        Tile::new(
            "open-to-ready",
            "Open to ready",
            open_to_ready,
            format!(
                "median, last hour · {} opened, {failures}",
                h.opens_last_hour
            ),
        ),
        money_tile(
            "revenue-today",
            "Revenue today",
            h.revenue_today.iter().map(|r| r.net_text()).collect(),
            "paid since 00:00 UTC, less refunds",
        ),
        money_tile(
            "owed",
            "Owed to hosts",
            h.owed_to_hosts
                .iter()
                .map(|a| money::minor(a.whole_minor(), &a.currency))
                .collect(),
            "host earnings not yet paid out",
        ),
    ]
}

fn compute_tiles(stats: &Stats) -> Vec<Tile> {
    let h = &stats.headline;
    let time = |s: u64| money::seconds(s as i64);
    vec![
        Tile::new(
            "sold-today",
            "Time sold today",
            time(h.compute_today.sold),
            String::new(),
        ),
        Tile::new(
            "used-today",
            "Time used today",
            time(h.compute_today.used),
            String::new(),
        ),
        Tile::new(
            "expired-today",
            "Expired today",
            time(h.compute_today.expired),
            String::new(),
        ),
        Tile::new(
            "outstanding",
            "Time outstanding",
            time(h.compute_seconds_outstanding),
            "unused, unexpired, all accounts".into(),
        ),
    ]
}

/// `unix` seconds as UTC text in `format` (a `time` format description).
fn clock_time(unix: u64, format: &[time::format_description::BorrowedFormatItem<'_>]) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix as i64)
        .ok()
        .and_then(|t| t.format(format).ok())
        .unwrap_or_default()
}

/// The hours of `hourly` labelled `HH:00`, with their values.
fn hour_points(hourly: &Hourly) -> Vec<(String, f64)> {
    hourly
        .values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let start = hourly.first_hour + i as u64 * 3600;
            (clock_time(start, format_description!("[hour]:00")), *v)
        })
        .collect()
}

const SESSIONS: (&str, &str) = ("session", "sessions");
const NO_DATA: &str = "No data in the last 24 h";

fn charts(day: &stats::LastDay) -> Vec<Chart> {
    let hourly = |id: &str, title: &str, (unit_one, unit), hourly: &Hourly| {
        chart::bars(Spec {
            id: id.to_owned(),
            title: format!("{title} per hour (UTC)"),
            unit_one,
            unit,
            points: hour_points(hourly),
            tick_every: 6,
            empty_text: NO_DATA,
            decimals: 0,
        })
    };
    let mut charts = vec![
        hourly(
            "sessions-running",
            "Sessions running",
            SESSIONS,
            &day.sessions_running,
        ),
        hourly("opens", "Sessions opened", SESSIONS, &day.opens),
        hourly(
            "open-failures",
            "Opens that failed",
            SESSIONS,
            &day.open_failures,
        ),
    ];
    if day.revenue.is_empty() {
        charts.push(hourly(
            "revenue",
            "Revenue",
            ("", ""),
            &Hourly {
                first_hour: day.opens.first_hour,
                values: vec![0.0; day.opens.values.len()],
            },
        ));
    }
    for revenue in &day.revenue {
        charts.push(chart::bars(Spec {
            id: format!("revenue-{}", revenue.currency.to_lowercase()),
            title: format!("Revenue in {} per hour (UTC)", revenue.currency),
            unit_one: &revenue.currency,
            unit: &revenue.currency,
            points: hour_points(&revenue.minor)
                .into_iter()
                .map(|(label, minor)| (label, minor / 100.0))
                .collect(),
            tick_every: 6,
            empty_text: NO_DATA,
            decimals: 2,
        }));
    }
    charts.push(hourly(
        "signups",
        "Sign-ups",
        ("user", "users"),
        &day.signups,
    ));
    charts.push(chart::bars(Spec {
        id: "hosts-online".into(),
        title: "Hosts online per day (average, last 30 days)".into(),
        unit_one: "host",
        unit: "hosts",
        points: day
            .hosts_online_daily
            .iter()
            .map(|(day, hosts)| {
                (
                    clock_time(*day, format_description!("[month]-[day]")),
                    *hosts,
                )
            })
            .collect(),
        tick_every: 7,
        empty_text: "No host was online in the last 30 days",
        decimals: 1,
    }));
    charts
}
