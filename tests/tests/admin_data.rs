#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test
//! The admin panel's data pages, read as an admin's browser reads them:
//! Hosts (every host with its owner and state) and Session data (newest
//! first, filters, keyset pages, CSV export, stopping a session).
//!
//! Hosts are added by their owners and kept alive by a stand-in agent that
//! registers with the HostKey and heartbeats; sessions come from
//! `external::register_external` and end through `sessions::ending::end`, and the
//! bulk of old rows is inserted with SQL.

use std::collections::HashSet;
use std::time::Duration;

use mysql_async::prelude::*;
use opencloud_control::hosts;
use opencloud_control::sessions;
use opencloud_e2e::browser::{log_in, Browser};
use opencloud_e2e::external::register_external;
use opencloud_e2e::hosts::agent_hello;
use opencloud_e2e::upstream::loopback;
use opencloud_e2e::{TestStack, TestUser, PASSWORD};
use opencloud_protocol::agent::{Heartbeat, Load, HOST_KEY_SCHEME};
use opencloud_protocol::reports::SessionUsage;
use opencloud_protocol::routes::{new_sid, SessionState};
use reqwest::{Method, StatusCode};
use serde_json::json;

// ----- helpers -----

/// A host added by its owner on My hosts, its agent played by this test:
/// registered with the HostKey, then a heartbeat every second so control
/// keeps it (and the sessions on it) alive.
struct Host {
    id: u64,
    name: String,
    key: String,
    heartbeats: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Host {
    fn drop(&mut self) {
        if let Some(task) = self.heartbeats.take() {
            task.abort();
        }
    }
}

/// Adds a host named `name` for `owner` (made a host owner by `admin`).
async fn add_host(stack: &TestStack, admin: &TestUser, owner: &TestUser, name: &str) -> Host {
    admin
        .patch_json(
            &format!("/api/v1/admin/users/{}", owner.id),
            json!({"role": "host_owner"}),
        )
        .await;
    let (id, key) = stack.add_host(owner, name).await;
    Host {
        id,
        name: name.to_owned(),
        key,
        heartbeats: None,
    }
}

/// A host added for `owner` whose stand-in agent is online at `address`.
async fn add_online_host(
    stack: &TestStack,
    admin: &TestUser,
    owner: &TestUser,
    name: &str,
    address: &str,
) -> Host {
    let mut host = add_host(stack, admin, owner, name).await;
    host.come_online(stack, address).await;
    host
}

impl Host {
    /// Registers the host's agent at `address` and keeps it heartbeating.
    async fn come_online(&mut self, stack: &TestStack, address: &str) {
        let http = stack.http();
        let auth = format!("{HOST_KEY_SCHEME} {}", self.key);
        let r = http
            .post(stack.url("/agent/v1/register"))
            .header("authorization", &auth)
            .json(&agent_hello(address))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{}", r.text().await.unwrap());
        let url = stack.url("/agent/v1/heartbeat");
        let beat = Heartbeat {
            version: "0.1.0-test".into(),
            load: Load {
                cpu_percent: 12.0,
                memory_used_mib: 2048,
                memory_total_mib: 16384,
                disk_free_mib: 100_000,
            },
            sessions: Vec::new(),
            warm_servers: 0,
        };
        self.heartbeats = Some(tokio::spawn(async move {
            loop {
                let _ = http
                    .post(&url)
                    .header("authorization", &auth)
                    .json(&beat)
                    .send()
                    .await;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }));
        // The first heartbeat has landed when the host reports a load.
        self.wait_for_heartbeat(stack).await;
    }

    async fn wait_for_heartbeat(&self, stack: &TestStack) {
        for _ in 0..100 {
            let beat: Option<Option<String>> = stack
                .db
                .conn()
                .await
                .exec_first(
                    "SELECT CAST(last_heartbeat_at AS CHAR) FROM hosts WHERE id = ? AND cpu_percent > 0",
                    (self.id,),
                )
                .await
                .unwrap();
            if beat.flatten().is_some() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("host {} never heartbeated", self.name);
    }
}

/// An admin, two users who own hosts (online, heartbeating) and a project
/// each; `bob`'s project has a comma in its name.
struct Fixture {
    stack: TestStack,
    admin: TestUser,
    alice: TestUser,
    bob: TestUser,
    alice_host: Host,
    bob_host: Host,
    alice_project: u64,
    bob_project: u64,
    pool: mysql_async::Pool,
}

const BOB_PROJECT: &str = "Survey, wave 2";
const ALICE_ADDRESS: &str = "127.0.0.1";
const BOB_ADDRESS: &str = "127.0.0.2";

impl Fixture {
    async fn start() -> Self {
        let stack = TestStack::control_only().await.unwrap();
        let admin = stack.admin().await;
        let alice = stack.new_user().await;
        let bob = stack.new_user().await;
        let alice_host =
            add_online_host(&stack, &admin, &alice, "alice-desktop", ALICE_ADDRESS).await;
        let bob_host = add_online_host(&stack, &admin, &bob, "bob-laptop", BOB_ADDRESS).await;
        let alice_project = alice.create_project("Thesis").await;
        let bob_project = bob.create_project(BOB_PROJECT).await;
        let pool = mysql_async::Pool::new(stack.db.url.as_str());
        Self {
            stack,
            admin,
            alice,
            bob,
            alice_host,
            bob_host,
            alice_project,
            bob_project,
            pool,
        }
    }

    /// `user`'s project and their own host.
    fn own(&self, user: &TestUser) -> (u64, u64) {
        match user.id {
            id if id == self.alice.id => (self.alice_project, self.alice_host.id),
            id if id == self.bob.id => (self.bob_project, self.bob_host.id),
            _ => panic!("only alice and bob have a project and a host"),
        }
    }

    /// A running session of `user`'s project on their own host, recorded the
    /// way a Jupyter server started elsewhere is.
    async fn session(&self, user: &TestUser) -> String {
        let (project, host) = self.own(user);
        let external = register_external(
            &self.pool,
            &self.stack.host_ca(),
            user.id,
            project,
            loopback(9),
        )
        .await
        .unwrap();
        // On the user's own host, the one the admin pages filter by.
        self.stack
            .db
            .conn()
            .await
            .exec_drop(
                "UPDATE sessions SET host_id = ? WHERE sid = ?",
                (host, external.sid()),
            )
            .await
            .unwrap();
        external.sid().to_owned()
    }

    /// A session that has already ended with `state` and `reason`.
    async fn ended_session(&self, user: &TestUser, state: SessionState, reason: &str) -> String {
        let sid = self.session(user).await;
        let ended = sessions::ending::end(&self.pool, &sid, state, reason)
            .await
            .unwrap();
        assert_eq!(ended.state, state);
        sid
    }

    /// The admin's session list filtered by `query`; it must answer 200 OK.
    async fn sessions_page(&self, query: &str) -> String {
        self.admin.page(&format!("/admin/sessions?{query}")).await
    }

    /// The admin's session list refusing the filter `query` (422); the
    /// page that names what is wrong.
    async fn refused_filter(&self, query: &str) -> String {
        self.admin
            .page_with_status(
                &format!("/admin/sessions?{query}"),
                StatusCode::UNPROCESSABLE_ENTITY,
            )
            .await
    }

    /// Inserts `rows` sessions straight into the database.
    async fn insert(&self, rows: &[Bulk]) {
        let mut conn = self.stack.db.conn().await;
        for chunk in rows.chunks(500) {
            // Old sessions' routes are long gone from the route table.
            let marks = vec!["(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"; chunk.len()].join(", ");
            let params: Vec<mysql_async::Value> = chunk
                .iter()
                .flat_map(|r| {
                    [
                        r.sid.clone().into(),
                        r.project.into(),
                        r.user.into(),
                        r.host.into(),
                        r.state.into(),
                        r.created_at.clone().into(),
                        r.ended_at.clone().into(),
                        r.ended_at.clone().into(),
                        r.reason.into(),
                        r.bytes_in.into(),
                        r.bytes_out.into(),
                    ]
                })
                .collect();
            conn.exec_drop(
                format!(
                    "INSERT INTO sessions (sid, project_id, user_id, host_id, state,
                        created_at, ended_at, routes_removed_at, end_reason, bytes_in, bytes_out)
                     VALUES {marks}"
                ),
                params,
            )
            .await
            .unwrap();
        }
    }

    /// Every sid the filter `sql` (over `sessions s`) matches, newest first.
    async fn sids_where(&self, sql: &str) -> Vec<String> {
        self.stack
            .db
            .conn()
            .await
            .query(format!(
                "SELECT s.sid FROM sessions s WHERE {sql} ORDER BY s.created_at DESC, s.sid DESC"
            ))
            .await
            .unwrap()
    }
}

/// One old session for the bulk insert.
#[derive(Clone)]
struct Bulk {
    sid: String,
    user: u64,
    project: u64,
    host: u64,
    state: &'static str,
    created_at: String,
    ended_at: Option<String>,
    reason: Option<&'static str>,
    bytes_in: u64,
    bytes_out: u64,
}

impl Bulk {
    /// A session that ran 1 h 02 min from `created_at` and stopped idle.
    fn stopped(user: u64, project: u64, host: u64, created_at: &str) -> Self {
        Self {
            sid: new_sid(),
            user,
            project,
            host,
            state: "stopped",
            created_at: created_at.to_owned(),
            ended_at: Some(time_add(created_at, 3720)),
            reason: Some("idle"),
            bytes_in: 1000,
            bytes_out: 5000,
        }
    }

    fn lost(mut self) -> Self {
        self.state = "lost";
        self.reason = Some("host_lost");
        self
    }
}

/// `YYYY-MM-DD HH:MM:SS[.ffffff]` plus `secs` seconds (no time zones).
fn time_add(at: &str, secs: i64) -> String {
    let (date, rest) = at.split_once(' ').unwrap();
    let (clock, frac) = rest.split_once('.').unwrap_or((rest, ""));
    let mut parts = clock.split(':').map(|p| p.parse::<i64>().unwrap());
    let (h, m, s) = (
        parts.next().unwrap(),
        parts.next().unwrap(),
        parts.next().unwrap(),
    );
    let total = h * 3600 + m * 60 + s + secs;
    assert!(
        (0..86_400).contains(&total),
        "bulk sessions end on their start day"
    );
    let clock = format!(
        "{:02}:{:02}:{:02}",
        total / 3600,
        total / 60 % 60,
        total % 60
    );
    if frac.is_empty() {
        format!("{date} {clock}")
    } else {
        format!("{date} {clock}.{frac}")
    }
}

/// Posts the Stop form of session `sid` as `who`.
async fn stop(who: &TestUser, sid: &str, csrf: &str, back: &str) -> reqwest::Response {
    who.post_form(
        &format!("/admin/sessions/{sid}/stop"),
        &[("csrf", csrf), ("back", back)],
    )
    .await
}

/// The HTML of each session row, by sid, in page order.
fn rows(html: &str) -> Vec<(String, String)> {
    html.split("<tr data-sid=\"")
        .skip(1)
        .map(|part| {
            let (sid, rest) = part.split_once('"').unwrap();
            let row = rest.split("</tr>").next().unwrap();
            (sid.to_owned(), row.to_owned())
        })
        .collect()
}

fn sids(html: &str) -> Vec<String> {
    rows(html).into_iter().map(|(sid, _)| sid).collect()
}

fn row<'a>(rows: &'a [(String, String)], sid: &str) -> &'a str {
    &rows.iter().find(|(s, _)| s == sid).unwrap().1
}

/// The `href` of the element with `id`, unescaped.
fn link(html: &str, id: &str) -> Option<String> {
    let at = html.find(&format!("id=\"{id}\""))?;
    let tag_start = html[..at].rfind('<')?;
    let tag = &html[tag_start..at + html[at..].find('>')?];
    let href = tag.split("href=\"").nth(1)?.split('"').next()?;
    Some(unescape(href))
}

fn unescape(s: &str) -> String {
    // askama writes numeric entities (&#38;), other writers named ones.
    s.replace("&#34;", "\"")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&#60;", "<")
        .replace("&lt;", "<")
        .replace("&#62;", ">")
        .replace("&gt;", ">")
        .replace("&#38;", "&")
        .replace("&amp;", "&")
}

/// The CSRF token the page's forms carry.
fn csrf(html: &str) -> String {
    html.split("name=\"csrf\" value=\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .to_owned()
}

/// Follows "Next page" from `first` to the end; every sid in page order.
async fn walk(user: &TestUser, first: &str) -> (Vec<String>, usize) {
    let mut all = Vec::new();
    let mut pages = 0;
    let mut next = Some(first.to_owned());
    while let Some(path) = next {
        let html = user.page(&path).await;
        pages += 1;
        assert!(pages < 1000, "paging never ends");
        if pages > 1 {
            assert!(
                link(&html, "first-page").is_some(),
                "page {pages} links back to the first"
            );
        }
        all.extend(sids(&html));
        next = link(&html, "next-page");
    }
    (all, pages)
}

// ----- Hosts -----

#[tokio::test]
async fn the_hosts_page_lists_every_host_with_its_owner_and_state() {
    let stack = TestStack::control_only().await.unwrap();
    let admin = stack.admin().await;
    let ann = stack.new_user().await;
    let ben = stack.new_user().await;
    let desktop = add_online_host(&stack, &admin, &ann, "ann-desktop", "10.1.2.3").await;
    let attic = add_online_host(&stack, &admin, &ann, "ann-attic", "10.1.2.4").await;
    ann.post_json(
        &format!("/api/v1/hosts/{}/drain", attic.id),
        json!({"draining": true}),
    )
    .await;
    let fresh = add_host(&stack, &admin, &ben, "ben-new-pc").await;
    let old = add_host(&stack, &admin, &ben, "ben-old-pc").await;
    let (status, body) = ben
        .post(&format!("/api/v1/hosts/{}/revoke", old.id), json!({}))
        .await;
    assert!(status.is_success(), "{status} {body}");

    let html = admin.page("/admin/hosts").await;
    let host_row = |id: u64| -> String {
        let start = html
            .find(&format!("data-host-id=\"{id}\""))
            .unwrap_or_else(|| panic!("host {id} is listed"));
        html[start..].split("</tr>").next().unwrap().to_owned()
    };
    for (host, owner, state) in [
        (&desktop, &ann, "online"),
        (&attic, &ann, "draining"),
        (&fresh, &ben, "new"),
        (&old, &ben, "revoked"),
    ] {
        let row = host_row(host.id);
        assert!(row.contains(&host.name), "{row}");
        assert!(row.contains(&owner.email), "owner of {}: {row}", host.name);
        assert!(
            row.contains(&format!("data-host-state=\"{state}\"")),
            "{} is {state}: {row}",
            host.name
        );
    }
    let online = host_row(desktop.id);
    for shown in [
        "10.1.2.3",
        "8 cores · 16.0 GiB",
        "12 % · 2.0 GiB",
        "2.0 GiB of 16.0 GiB",
        "yes",
        "agent 0.1.0-test",
    ] {
        assert!(online.contains(shown), "{shown:?} in {online}");
    }
    assert!(host_row(fresh.id).contains("never"), "no heartbeat yet");
    assert!(
        html.contains("href=\"/admin/sessions\""),
        "the admin tabs link Session data"
    );
    // Newest first.
    let at = |id: u64| html.find(&format!("data-host-id=\"{id}\"")).unwrap();
    assert!(at(old.id) < at(fresh.id) && at(fresh.id) < at(desktop.id));

    let (status, _) = ann.get_text("/admin/hosts").await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "host owners see only My hosts"
    );
}

#[tokio::test]
async fn host_lists_page_through_every_host_once_and_name_a_bad_page() {
    let stack = TestStack::control_only().await.unwrap();
    let admin = stack.admin().await;
    let ann = stack.new_user().await;
    admin
        .patch_json(
            &format!("/api/v1/admin/users/{}", ann.id),
            json!({"role": "host_owner"}),
        )
        .await;
    let pool = mysql_async::Pool::new(stack.db.url.as_str());
    let count = hosts::HOSTS_PER_PAGE + 5;
    for i in 0..count {
        hosts::create(&pool, ann.id, &format!("rig-{i:03}"))
            .await
            .unwrap();
    }

    // The API, for the admin and for the owner: two pages, newest first,
    // every host exactly once.
    let mut second_page = String::new();
    for (user, path) in [(&admin, "/api/v1/admin/hosts"), (&ann, "/api/v1/hosts")] {
        let (status, first) = user.get(path).await;
        assert_eq!(status, StatusCode::OK, "{first}");
        assert_eq!(first["total"], count as u64);
        let before = first["next_before"].as_u64().expect("a next page");
        let (status, second) = user.get(&format!("{path}?before={before}")).await;
        assert_eq!(status, StatusCode::OK, "{second}");
        assert!(second["next_before"].is_null(), "two pages: {second}");
        let ids: Vec<u64> = [&first, &second]
            .iter()
            .flat_map(|page| page["hosts"].as_array().unwrap().iter())
            .map(|h| h["id"].as_u64().unwrap())
            .collect();
        assert_eq!(
            first["hosts"].as_array().unwrap().len(),
            hosts::HOSTS_PER_PAGE
        );
        assert_eq!(ids.len(), count);
        assert!(
            ids.windows(2).all(|w| w[0] > w[1]),
            "newest first, no repeats"
        );
        second_page = format!("?before={before}");
    }

    // The pages link the older hosts and back.
    for (user, base) in [(&admin, "/admin/hosts"), (&ann, "/hosts")] {
        let html = user.page(base).await;
        assert_eq!(html.matches("data-host-id=").count(), hosts::HOSTS_PER_PAGE);
        let next = link(&html, "next-page").expect("a link to older hosts");
        assert_eq!(next, format!("{base}{second_page}"));
        let html = user.page(&next).await;
        assert_eq!(html.matches("data-host-id=").count(), 5);
        assert!(html.contains(&format!("5 of {count} hosts")), "{html}");
        assert_eq!(link(&html, "first-page").as_deref(), Some(base));
        assert!(link(&html, "next-page").is_none());
    }

    // A page that is not a number gets a clear answer.
    let html = admin
        .page_with_status("/admin/hosts?before=soon", StatusCode::BAD_REQUEST)
        .await;
    assert!(html.contains("before"), "{html}");
    let (status, body) = admin.get("/api/v1/admin/hosts?before=-1").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("before"),
        "{body}"
    );
}

// ----- Session data -----

#[tokio::test]
async fn session_data_shows_sessions_newest_first_with_user_project_host_and_traffic() {
    let f = Fixture::start().await;
    let first = f
        .ended_session(&f.alice, SessionState::Stopped, "idle")
        .await;
    sessions::usage::record_usage(
        &f.pool,
        &[SessionUsage {
            sid: first.clone(),
            last_activity: 0,
            bytes_in: 1_258_291,
            bytes_out: 2048,
        }],
        opencloud_control::now_unix(),
    )
    .await
    .unwrap();
    let second = f.session(&f.bob).await;
    let third = f
        .ended_session(&f.alice, SessionState::Lost, "host_lost")
        .await;

    let html = f.admin.page("/admin/sessions").await;
    assert_eq!(sids(&html), [third.clone(), second.clone(), first.clone()]);
    let rows = rows(&html);
    let stopped = row(&rows, &first);
    for shown in [
        f.alice.email.as_str(),
        "Thesis",
        &f.alice_host.name,
        "stopped",
        "idle",
        "1.2 MiB",
        "2.0 KiB",
    ] {
        assert!(stopped.contains(shown), "{shown:?} in {stopped}");
    }
    assert!(
        !stopped.contains("/stop\""),
        "ended sessions have no Stop button"
    );
    let running = row(&rows, &second);
    assert!(
        running.contains(&f.bob.email) && running.contains(&f.bob_host.name),
        "{running}"
    );
    assert!(running.contains("Survey, wave 2") && running.contains("running"));
    assert!(
        running.contains(&format!("/admin/sessions/{second}/stop")),
        "{running}"
    );
    assert!(row(&rows, &third).contains("host_lost"));
    assert!(
        link(&html, "next-page").is_none(),
        "one page holds three sessions"
    );
    assert_eq!(link(&html, "export-csv").unwrap(), "/admin/sessions.csv");
}

#[tokio::test]
async fn session_data_filters_by_user_project_state_host_and_dates() {
    let f = Fixture::start().await;
    let live = f.session(&f.bob).await;
    let mut bulk = Vec::new();
    for day in 1..=10 {
        bulk.push(Bulk::stopped(
            f.alice.id,
            f.alice_project,
            f.alice_host.id,
            &format!("2025-03-{day:02} 12:00:00"),
        ));
    }
    for day in 5..=9 {
        bulk.push(
            Bulk::stopped(
                f.bob.id,
                f.bob_project,
                f.bob_host.id,
                &format!("2025-03-{day:02} 22:30:00"),
            )
            .lost(),
        );
    }
    f.insert(&bulk).await;

    let cases = [
        (format!("user={}", f.alice.email), "s.user_id = ALICE"),
        (
            format!("user={}", f.alice.email.to_uppercase()),
            "s.user_id = ALICE",
        ),
        (format!("user={}", f.alice.id), "s.user_id = ALICE"),
        ("user=nobody%40example.com".to_owned(), "FALSE"),
        (format!("project={}", f.bob_project), "s.project_id = BOBP"),
        ("state=lost".to_owned(), "s.state = 'lost'"),
        ("state=running".to_owned(), "s.state = 'running'"),
        (format!("host={}", f.bob_host.id), "s.host_id = BOBH"),
        (
            "from=2025-03-05&to=2025-03-06".to_owned(),
            "s.created_at >= '2025-03-05' AND s.created_at < '2025-03-07'",
        ),
        (
            format!("user={}&from=2025-03-08", f.bob.email),
            "s.user_id = BOB AND s.created_at >= '2025-03-08'",
        ),
        (
            format!("host={}&state=stopped&to=2025-03-02", f.alice_host.id),
            "s.host_id = ALICEH AND s.state = 'stopped' AND s.created_at < '2025-03-03'",
        ),
    ];
    for (query, sql) in cases {
        let sql = sql
            .replace("ALICEH", &f.alice_host.id.to_string())
            .replace("ALICE", &f.alice.id.to_string())
            .replace("BOBP", &f.bob_project.to_string())
            .replace("BOBH", &f.bob_host.id.to_string())
            .replace("BOB", &f.bob.id.to_string());
        let want = f.sids_where(&sql).await;
        let html = f.sessions_page(&query).await;
        assert_eq!(sids(&html), want, "{query}");
        // The form shows the filter, and the CSV link carries it.
        let csv = link(&html, "export-csv").unwrap();
        assert!(csv.starts_with("/admin/sessions.csv?"), "{csv}");
    }
    let html = f.sessions_page("state=running").await;
    assert_eq!(sids(&html), [live]);
    assert!(
        html.contains("<option value=\"running\" selected>"),
        "the form keeps the state"
    );
    let html = f.sessions_page("from=2025-03-05&to=2025-03-05").await;
    let rows = rows(&html);
    assert_eq!(rows.len(), 2, "one day, both users");
    let alices = rows
        .iter()
        .find(|(_, r)| r.contains(&f.alice.email))
        .unwrap();
    for shown in [
        "2025-03-05 12:00:00",
        "2025-03-05 13:02:00",
        "1 h 02 min",
        "1000 B",
        "4.9 KiB",
    ] {
        assert!(alices.1.contains(shown), "{shown:?} in {}", alices.1);
    }
    assert!(
        html.contains("value=\"2025-03-05\""),
        "the form keeps the dates"
    );
}

#[tokio::test]
async fn paging_with_after_visits_every_matching_session_once() {
    let f = Fixture::start().await;
    // Sessions that start in the same microsecond (ordered by sid), in the
    // same tenth of a millisecond, a microsecond apart, and seconds apart.
    let mut bulk = Vec::new();
    let mut add = |at: String, user: &TestUser, project: u64, host: u64| {
        bulk.push(Bulk::stopped(user.id, project, host, &at));
    };
    for n in 0..40 {
        add(
            "2025-06-01 10:00:00.500000".into(),
            &f.alice,
            f.alice_project,
            f.alice_host.id,
        );
        add(
            format!("2025-06-01 10:00:01.1234{n:02}"),
            &f.bob,
            f.bob_project,
            f.bob_host.id,
        );
        add(
            format!("2025-06-01 10:00:02.{:06}", 999_960 + n),
            &f.alice,
            f.alice_project,
            f.alice_host.id,
        );
        add(
            format!("2025-06-01 11:{n:02}:00"),
            &f.bob,
            f.bob_project,
            f.bob_host.id,
        );
    }
    for lost in bulk.iter_mut().step_by(3) {
        *lost = lost.clone().lost();
    }
    f.insert(&bulk).await;
    f.ended_session(&f.alice, SessionState::Stopped, "idle")
        .await;

    let everything = f.sids_where("TRUE").await;
    assert_eq!(everything.len(), 161);
    let (seen, pages) = walk(&f.admin, "/admin/sessions?per_page=7").await;
    assert_eq!(pages, 23, "161 sessions, 7 a page");
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "no session twice");
    assert_eq!(seen, everything, "every session, newest first, no gaps");

    // The next-page links keep the filters.
    let filtered = f
        .sids_where(&format!("s.user_id = {} AND s.state = 'lost'", f.bob.id))
        .await;
    assert!(filtered.len() > 10);
    let (seen, _) = walk(
        &f.admin,
        &format!("/admin/sessions?user={}&state=lost&per_page=4", f.bob.id),
    )
    .await;
    assert_eq!(seen, filtered);

    // The default page holds 50.
    let html = f.admin.page("/admin/sessions").await;
    assert_eq!(sids(&html), everything[..50]);
    let next = link(&html, "next-page").unwrap();
    assert!(next.starts_with("/admin/sessions?after="), "{next}");
    let html = f.admin.page(&next).await;
    assert_eq!(sids(&html), everything[50..100]);
}

#[tokio::test]
async fn csv_export_streams_the_header_and_one_line_per_matching_session() {
    let f = Fixture::start().await;
    // More than one export batch (5 000 rows).
    let mut bulk = Vec::new();
    for n in 0..5_300u32 {
        let at = format!(
            "2025-0{}-{:02} {:02}:{:02}:{:02}.{:06}",
            1 + n % 9,
            1 + n % 28,
            n % 20,
            n % 60,
            n % 59,
            n
        );
        let row = if n % 4 == 0 {
            Bulk::stopped(f.alice.id, f.alice_project, f.alice_host.id, &at)
        } else {
            Bulk::stopped(f.bob.id, f.bob_project, f.bob_host.id, &at)
        };
        bulk.push(if n % 5 == 0 { row.lost() } else { row });
    }
    f.insert(&bulk).await;
    f.ended_session(&f.bob, SessionState::Stopped, "stopped_by_user")
        .await;

    let csv = |query: String| {
        let admin = &f.admin;
        async move {
            let r = admin
                .request(Method::GET, &format!("/admin/sessions.csv{query}"))
                .send()
                .await
                .unwrap();
            let status = r.status();
            let headers = r.headers().clone();
            (status, headers, r.text().await.unwrap())
        }
    };
    let (status, headers, text) = csv(String::new()).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert_eq!(headers["content-type"], "text/csv; charset=utf-8");
    assert_eq!(
        headers["content-disposition"],
        "attachment; filename=\"sessions.csv\""
    );
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        format!("{}\n", lines[0]),
        opencloud_control::sessions::data::CSV_HEADER
    );
    let everything = f.sids_where("TRUE").await;
    assert_eq!(lines.len(), 1 + everything.len(), "one line per session");
    let line_sids: Vec<String> = lines[1..]
        .iter()
        .map(|l| l.split(',').next().unwrap().to_owned())
        .collect();
    assert_eq!(
        line_sids, everything,
        "newest first, across batches, no duplicates"
    );
    let bobs = lines.iter().find(|l| l.contains(&f.bob.email)).unwrap();
    assert!(
        bobs.contains(&format!(",\"{BOB_PROJECT}\",")),
        "a name with a comma is quoted: {bobs}"
    );

    // The same filters as the page.
    let query = format!(
        "?user={}&state=lost&from=2025-03-01&to=2025-06-30",
        f.alice.email
    );
    let (status, _, text) = csv(query).await;
    assert_eq!(status, StatusCode::OK);
    let want = f
        .sids_where(&format!(
            "s.user_id = {} AND s.state = 'lost' AND s.created_at >= '2025-03-01' AND s.created_at < '2025-07-01'",
            f.alice.id
        ))
        .await;
    assert!(!want.is_empty());
    let got: Vec<&str> = text.lines().skip(1).map(|l| &l[..26]).collect();
    assert_eq!(got, want);
    assert!(text.lines().skip(1).all(|l| l.contains(",lost,host_lost,")));

    // The page's Export CSV link is the same export.
    let html = f.sessions_page(&format!("host={}", f.alice_host.id)).await;
    let href = link(&html, "export-csv").unwrap();
    assert_eq!(
        href,
        format!("/admin/sessions.csv?host={}", f.alice_host.id)
    );
    let (_, _, text) = csv(href.trim_start_matches("/admin/sessions.csv").to_owned()).await;
    assert_eq!(
        text.lines().count() - 1,
        f.sids_where(&format!("s.host_id = {}", f.alice_host.id))
            .await
            .len()
    );
}

#[tokio::test]
async fn an_admin_stops_a_live_session_and_comes_back_to_the_same_filters() {
    let f = Fixture::start().await;
    let sid = f.session(&f.bob).await;
    let back = format!("/admin/sessions?user={}&state=running", f.bob.id);
    let html = f.admin.page(&back).await;
    assert_eq!(sids(&html), std::slice::from_ref(&sid));
    let token = csrf(&html);
    let back_field = html.split("name=\"back\" value=\"").nth(1).unwrap();
    assert_eq!(
        unescape(back_field.split('"').next().unwrap()),
        back,
        "the Stop form comes back to this page"
    );

    let r = stop(&f.admin, &sid, "", &back).await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN, "no CSRF token, no stop");
    let own_page = f.alice.page("/projects").await;
    let r = stop(&f.alice, &sid, &csrf(&own_page), &back).await;
    assert_eq!(
        r.status(),
        StatusCode::FORBIDDEN,
        "only admins stop others' sessions"
    );

    let r = stop(&f.admin, &sid, &token, &back).await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(r.headers()["location"], back.as_str());
    let state: Option<(String, Option<String>)> = f
        .stack
        .db
        .conn()
        .await
        .exec_first(
            "SELECT state, end_reason FROM sessions WHERE sid = ?",
            (&sid,),
        )
        .await
        .unwrap();
    assert_eq!(
        state,
        Some(("stopping".into(), Some("stopped_by_admin".into()))),
        "the host's agent is told to stop it"
    );
    let html = f.sessions_page("state=stopping").await;
    let rows = rows(&html);
    assert!(!row(&rows, &sid).contains("/stop\""), "no second Stop");

    // A redirect elsewhere is not followed.
    let other = f.session(&f.alice).await;
    let r = stop(&f.admin, &other, &token, "https://elsewhere.example/").await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(r.headers()["location"], "/admin/sessions");
    let r = stop(&f.admin, &sid, &token, &back).await;
    assert_eq!(
        r.status(),
        StatusCode::SEE_OTHER,
        "stopping twice changes nothing"
    );
}

#[tokio::test]
async fn only_admins_see_session_data_and_bad_filters_are_named_not_fatal() {
    let f = Fixture::start().await;
    for path in ["/admin/sessions", "/admin/sessions.csv", "/admin/hosts"] {
        let html = f.bob.page_with_status(path, StatusCode::FORBIDDEN).await;
        assert!(html.contains("for administrators"), "{html}");
    }
    let anonymous = f.stack.get_anonymous("/admin/sessions?state=lost").await;
    assert!(anonymous.status().is_redirection());
    assert!(anonymous.headers()["location"]
        .to_str()
        .unwrap()
        .starts_with("/login?next="));

    let html = f.refused_filter("from=yesterday&state=running").await;
    let error = html
        .split("<p class=\"field-error\" id=\"error-from\">")
        .nth(1)
        .expect("the error stands next to the from field");
    assert!(error.starts_with("Give the day as YYYY-MM-DD"), "{error}");
    assert!(
        html.contains("value=\"yesterday\""),
        "what was typed is kept"
    );
    assert!(html.contains("<option value=\"running\" selected>"));

    for (query, field) in [
        ("to=2025-02-30", "to"),
        ("state=zombie", "state"),
        ("host=abc", "host"),
        ("project=-1", "project"),
    ] {
        let html = f.refused_filter(query).await;
        assert!(
            html.contains(&format!("id=\"error-{field}\"")),
            "{query}: {html}"
        );
    }
    for query in [
        "after=garbage",
        "per_page=0",
        "per_page=lots",
        "per_page=100000",
    ] {
        let html = f.refused_filter(query).await;
        assert!(
            html.contains("class=\"alert alert-error\""),
            "{query}: {html}"
        );
    }
    // An unknown user does not hide a bad date.
    f.refused_filter("user=nobody%40example.com&from=x").await;

    let (status, html) = f
        .admin
        .get_text("/admin/sessions.csv?from=2025-13-01")
        .await;
    assert_eq!(
        status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "checked before the first byte"
    );
    assert!(
        html.contains("“from”"),
        "the message names the filter: {html}"
    );
    assert!(!html.starts_with("sid,"));
}

#[tokio::test]
async fn an_admin_filters_pages_and_stops_sessions_in_a_browser() {
    let f = Fixture::start().await;
    let mut bulk = Vec::new();
    for n in 0..60 {
        let at = format!("2025-04-{:02} 09:{:02}:00", 1 + n % 28, n % 60);
        bulk.push(Bulk::stopped(
            f.alice.id,
            f.alice_project,
            f.alice_host.id,
            &at,
        ));
    }
    for n in 0..10 {
        let at = format!("2025-04-{:02} 18:00:00", 1 + n);
        bulk.push(Bulk::stopped(f.bob.id, f.bob_project, f.bob_host.id, &at).lost());
    }
    f.insert(&bulk).await;
    let live = f.session(&f.bob).await;

    let browser = Browser::start().await.unwrap();
    let base = f.stack.control().public.as_str();
    log_in(&browser, base, &f.admin.email, PASSWORD)
        .await
        .unwrap();
    browser.goto(&format!("{base}/admin/users")).await.unwrap();
    browser
        .follow("nav.tabs a[href='/admin/hosts']", "/admin/hosts")
        .await
        .unwrap();
    browser
        .wait_for("tr[data-host='bob-laptop']")
        .await
        .unwrap();
    screenshot(&browser, "admin-hosts").await;
    browser
        .follow("nav.tabs a[href='/admin/sessions']", "/admin/sessions")
        .await
        .unwrap();
    assert_eq!(browser.count("tr[data-sid]").await.unwrap(), 50);

    // The filter form is a plain GET form.
    browser.fill("#f-user", &f.alice.email).await.unwrap();
    browser
        .click_until_url(
            "form.filters button[type=submit]",
            "filtered by user",
            |url| url.contains("user="),
        )
        .await
        .unwrap();
    assert_eq!(browser.count("tr[data-sid]").await.unwrap(), 50);
    screenshot(&browser, "admin-sessions").await;
    browser
        .click_until_url("#next-page", "on page 2", |url| url.contains("after="))
        .await
        .unwrap();
    assert_eq!(
        browser.count("tr[data-sid]").await.unwrap(),
        10,
        "60 of alice's"
    );
    assert_eq!(browser.value("#f-user").await.unwrap(), f.alice.email);
    assert_eq!(browser.count("#next-page").await.unwrap(), 0);
    browser
        .click_until_url("#first-page", "back on page 1", |url| {
            !url.contains("after=")
        })
        .await
        .unwrap();

    // A bad date comes back with the error next to the field.
    browser
        .goto(&format!("{base}/admin/sessions?from=2025-02-30"))
        .await
        .unwrap();
    let error = browser.text("#error-from").await.unwrap();
    assert!(error.contains("YYYY-MM-DD"), "{error}");
    screenshot(&browser, "admin-sessions-error").await;

    // Stop, and land on the same filtered page.
    browser
        .goto(&format!("{base}/admin/sessions?state=running"))
        .await
        .unwrap();
    browser
        .click_until_url(
            &format!("tr[data-sid='{live}'] form button"),
            "back on the filtered page",
            |url| url.ends_with("/admin/sessions?state=running"),
        )
        .await
        .unwrap();
    browser.wait_for(".empty").await.unwrap();
    assert_eq!(
        browser.count("tr[data-sid]").await.unwrap(),
        0,
        "it is stopping now"
    );
    browser.close().await;
}

#[tokio::test]
async fn an_admin_opens_the_overview_in_a_browser() {
    let f = Fixture::start().await;
    f.session(&f.bob).await;
    let browser = Browser::start().await.unwrap();
    let base = f.stack.control().public.as_str();
    log_in(&browser, base, &f.admin.email, PASSWORD)
        .await
        .unwrap();
    browser.goto(&format!("{base}/admin/users")).await.unwrap();
    browser
        .follow("nav.tabs a[href='/admin']", "/admin")
        .await
        .unwrap();
    browser.wait_for("#tile-users-online").await.unwrap();
    assert_eq!(
        browser
            .text("#tile-hosts-online .tile-value")
            .await
            .unwrap(),
        "2 / 2"
    );
    assert_eq!(
        browser.count("#overview-hosts tbody tr").await.unwrap(),
        2,
        "both hosts, heartbeating"
    );
    assert!(browser.count("figure.chart svg[role='img']").await.unwrap() >= 6);
    assert_eq!(
        browser.count("#chart-signups rect.bar").await.unwrap(),
        1,
        "this hour's sign-ups"
    );
    // Tall enough for the charts and the hosts table.
    browser.client.set_window_size(1280, 1800).await.unwrap();
    screenshot(&browser, "admin-overview").await;
    browser.close().await;
}

/// Saves a screenshot when OPENCLOUD_SCREENSHOT_DIR (or the older
/// OPENCLOUD_SCREENSHOTS) names a directory.
async fn screenshot(browser: &Browser, name: &str) {
    let dir = std::env::var("OPENCLOUD_SCREENSHOT_DIR")
        .or_else(|_| std::env::var("OPENCLOUD_SCREENSHOTS"));
    if let Ok(dir) = dir {
        let png = browser.client.screenshot().await.unwrap();
        std::fs::write(std::path::Path::new(&dir).join(format!("{name}.png")), png).unwrap();
    }
}
