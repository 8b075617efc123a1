#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test
//! The route table from control's side, against the real process: the
//! watch stream (snapshot, deltas, revocations, heartbeats), gateway
//! authentication, the health and usage reports, and entering a session.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use mysql_async::prelude::*;
use opencloud_control::{routes, sessions};
use opencloud_e2e::external::register_external;
use opencloud_e2e::upstream::loopback;
use opencloud_e2e::{expect_error, hidden_input, TestStack, TestUser, PASSWORD};
use opencloud_protocol::routes::{Change, SessionRoute, SessionState, Snapshot, WatchMessage};
use opencloud_protocol::token::{self, TokenKind};
use opencloud_protocol::Keyring;
use reqwest::header::{CACHE_CONTROL, CONTENT_TYPE, LOCATION};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

/// An open `GET /internal/v1/routes/watch` stream, read line by line.
struct Watch {
    response: reqwest::Response,
    pending: Vec<u8>,
}

impl Watch {
    async fn open(stack: &TestStack, since: u64) -> Self {
        let response = stack
            .as_gateway(
                Method::GET,
                &format!("/internal/v1/routes/watch?since={since}"),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()[CONTENT_TYPE], "application/x-ndjson");
        Self {
            response,
            pending: Vec::new(),
        }
    }

    /// The next message, or None when nothing came within `wait`.
    async fn next_within(&mut self, wait: Duration) -> Option<WatchMessage> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(end) = self.pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=end).collect();
                return Some(serde_json::from_slice(&line).unwrap_or_else(|e| {
                    panic!("bad line {:?}: {e}", String::from_utf8_lossy(&line))
                }));
            }
            match tokio::time::timeout_at(deadline, self.response.chunk()).await {
                Err(_) => return None,
                Ok(chunk) => match chunk.unwrap() {
                    Some(bytes) => self.pending.extend_from_slice(&bytes),
                    None => return None,
                },
            }
        }
    }

    async fn next(&mut self) -> WatchMessage {
        self.next_within(Duration::from_secs(10))
            .await
            .expect("a watch message within 10 s")
    }

    async fn snapshot(&mut self) -> Snapshot {
        match self.next().await {
            WatchMessage::Snapshot(s) => s,
            other => panic!("expected a snapshot, got {other:?}"),
        }
    }

    /// The next delta's changes, skipping heartbeats; checks its version.
    async fn delta(&mut self, version: u64) -> Vec<Change> {
        loop {
            match self.next().await {
                WatchMessage::Delta(d) => {
                    assert_eq!(d.version, version, "deltas come in version order");
                    return d.changes;
                }
                WatchMessage::Heartbeat { .. } => continue,
                other => panic!("expected delta {version}, got {other:?}"),
            }
        }
    }
}

/// A pool on the test database, as the agent code will have one.
fn pool(stack: &TestStack) -> mysql_async::Pool {
    mysql_async::Pool::new(stack.db.url.as_str())
}

/// Registers a Jupyter server "running" at 127.0.0.1:port, on a stand-in
/// host of its own, for a new project of `user`. Only its routes matter
/// here: the host's link stops when this returns.
async fn external_session(stack: &TestStack, user: &TestUser, port: u16) -> SessionRoute {
    let project = user.create_project(&format!("Project on {port}")).await;
    let pool = pool(stack);
    let external = register_external(&pool, &stack.host_ca(), user.id, project, loopback(port))
        .await
        .unwrap();
    pool.disconnect().await.unwrap();
    external.session.clone()
}

/// A new user's session on `port` whose row `set` (an SQL `SET` list) has
/// put in the state a step of its life leaves it in; with a connection to
/// look at it.
async fn session_left_as(
    stack: &TestStack,
    port: u16,
    set: &str,
) -> (TestUser, SessionRoute, mysql_async::Conn) {
    let user = stack.new_user().await;
    let session = external_session(stack, &user, port).await;
    let mut conn = stack.db.conn().await;
    conn.exec_drop(
        format!("UPDATE sessions SET {set} WHERE sid = ?"),
        (&session.sid,),
    )
    .await
    .unwrap();
    (user, session, conn)
}

async fn version(stack: &TestStack) -> u64 {
    stack
        .db
        .conn()
        .await
        .query_first("SELECT version FROM route_version")
        .await
        .unwrap()
        .unwrap()
}

fn keys(stack: &TestStack) -> Keyring {
    let path = stack.control().dir.join("keys.toml");
    Keyring::from_toml(
        &path.display().to_string(),
        &std::fs::read_to_string(&path).unwrap(),
    )
    .unwrap()
}

#[tokio::test]
async fn a_watch_from_zero_starts_with_a_snapshot_holding_the_session() {
    let stack = TestStack::control_only().await.unwrap();
    let user = stack.new_user().await;
    let session = external_session(&stack, &user, 18_888).await;

    let mut watch = Watch::open(&stack, 0).await;
    let snapshot = watch.snapshot().await;
    assert_eq!(snapshot.version, 1, "one change so far: {snapshot:?}");
    assert_eq!(snapshot.sessions, vec![session.clone()]);
    assert_eq!(snapshot.sessions[0].owner, user.id);
    assert_eq!(snapshot.sessions[0].state, SessionState::Running);
    assert_eq!(snapshot.hosts.len(), 1);
    assert_eq!(snapshot.hosts[0].id, session.host);
    let host = &snapshot.hosts[0];
    assert_eq!(host.address, "127.0.0.1");
    assert_eq!(
        host.health_url,
        format!("http://127.0.0.1:{}/healthz", host.link_port)
    );
    assert!(
        host.link_cert_sha256.is_some(),
        "the gateway gets the pin of the host's link certificate"
    );
    // Nothing else happens: a heartbeat within about 5 s names the version.
    let started = Instant::now();
    match watch.next_within(Duration::from_secs(8)).await {
        Some(WatchMessage::Heartbeat { version }) => assert_eq!(version, 1),
        other => panic!("expected a heartbeat, got {other:?}"),
    }
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "heartbeats are not chatty"
    );

    // A gateway that is up to date gets nothing at once, then each change.
    let mut from_start = Watch::open(&stack, 1).await;
    assert!(
        from_start
            .next_within(Duration::from_millis(500))
            .await
            .is_none(),
        "an up-to-date gateway gets nothing but heartbeats"
    );
    // A second stand-in host and its session come in one delta.
    let second = external_session(&stack, &user, 18_888).await;
    assert_ne!(second.host, session.host);
    let changes = from_start.delta(2).await;
    assert!(matches!(&changes[0], Change::UpsertHost(h) if h.id == second.host));
    assert!(matches!(&changes[1], Change::UpsertSession(s) if *s == second));

    // A version the database never reached (a restored database): snapshot.
    let mut ahead = Watch::open(&stack, 1_000).await;
    assert_eq!(ahead.snapshot().await.version, 2);
}

#[tokio::test]
async fn a_logout_reaches_an_open_watch_stream_within_a_second() {
    let stack = TestStack::control_only().await.unwrap();
    let user = stack.new_user().await;
    let mut watch = Watch::open(&stack, 0).await;
    let start = watch.snapshot().await;
    assert!(start.revocations.is_empty());
    let login_session = token::verify(&keys(&stack), &user.token, TokenKind::Platform, now())
        .unwrap()
        .login_session;

    let started = Instant::now();
    user.post_json("/api/v1/auth/logout", json!({})).await;
    let changes = watch.delta(start.version + 1).await;
    let latency = started.elapsed();
    println!("logout → Revoke on the watch stream: {latency:?}");
    assert!(latency < Duration::from_secs(1), "took {latency:?}");
    let [Change::Revoke(revocation)] = changes.as_slice() else {
        panic!("expected one revocation: {changes:?}");
    };
    assert_eq!(revocation.login_session, login_session);
    // Carried until every token derived from the login could have expired.
    let expected = now() + 2 * token::PLATFORM_TOKEN_SECONDS;
    assert!(
        revocation.expires_at.abs_diff(expected) < 120,
        "{} vs {expected}",
        revocation.expires_at
    );
    // A second logout with the same (now revoked) token publishes nothing.
    user.post("/api/v1/auth/logout", json!({})).await;
    assert_eq!(version(&stack).await, start.version + 1);

    // A password change revokes the user's other logins.
    let other = stack.new_user().await;
    let second_login = stack.logged_in(&other.email, PASSWORD).await;
    other
        .post_json(
            "/api/v1/auth/password",
            json!({"current_password": PASSWORD, "new_password": "another good password"}),
        )
        .await;
    let changes = watch.delta(start.version + 2).await;
    let revoked = token::verify(
        &keys(&stack),
        &second_login.token,
        TokenKind::Platform,
        now(),
    )
    .unwrap()
    .login_session;
    assert!(
        matches!(changes.as_slice(), [Change::Revoke(r)] if r.login_session == revoked),
        "{changes:?}"
    );

    // Disabling a user revokes all of their logins.
    let admin = stack.admin().await;
    admin
        .patch_json(
            &format!("/api/v1/admin/users/{}", other.id),
            json!({"disabled": true}),
        )
        .await;
    let changes = watch.delta(start.version + 3).await;
    assert_eq!(changes.len(), 1, "only the login still live: {changes:?}");
    assert_eq!(other.get("/api/v1/me").await.0, StatusCode::UNAUTHORIZED);

    // A new gateway gets all three in its snapshot.
    let mut fresh = Watch::open(&stack, 0).await;
    let snapshot = fresh.snapshot().await;
    assert_eq!(snapshot.version, start.version + 3);
    let listed: BTreeSet<String> = snapshot
        .revocations
        .iter()
        .map(|r| r.login_session.clone())
        .collect();
    assert!(listed.contains(&login_session) && listed.contains(&revoked));
    assert_eq!(listed.len(), 3, "{listed:?}");
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_changes_get_contiguous_versions_in_commit_order() {
    let stack = TestStack::control_only().await.unwrap();
    let user = stack.new_user().await;
    let mut projects = Vec::new();
    for n in 0..4 {
        projects.push(user.create_project(&format!("Concurrent {n}")).await);
    }
    let mut logins = Vec::new();
    for _ in 0..4 {
        logins.push(stack.logged_in(&user.email, PASSWORD).await);
    }
    let base = version(&stack).await;
    let mut watch = Watch::open(&stack, 0).await;
    assert_eq!(watch.snapshot().await.version, base);

    // 4 tasks × 4 sessions, and 4 logouts, all at once: 20 versions.
    let mut tasks = Vec::new();
    for (n, project) in projects.into_iter().enumerate() {
        let url = stack.db.url.clone();
        let user_id = user.id;
        let ca = stack.host_ca();
        tasks.push(tokio::spawn(async move {
            let pool = mysql_async::Pool::new(url.as_str());
            let mut sids = Vec::new();
            for i in 0..4 {
                let port = 20_000 + (n * 10 + i) as u16;
                let s = register_external(&pool, &ca, user_id, project, loopback(port))
                    .await
                    .unwrap();
                sids.push(s.sid().to_owned());
            }
            pool.disconnect().await.unwrap();
            sids
        }));
    }
    let logouts: Vec<_> = logins
        .into_iter()
        .map(|login| {
            tokio::spawn(async move { login.post("/api/v1/auth/logout", json!({})).await.0 })
        })
        .collect();
    for logout in logouts {
        assert_eq!(logout.await.unwrap(), StatusCode::OK);
    }
    let mut registered = BTreeSet::new();
    for task in tasks {
        registered.extend(task.await.unwrap());
    }
    assert_eq!(version(&stack).await, base + 20);

    // The stream delivers all 20, one version after the other.
    let mut streamed = BTreeSet::new();
    let mut revokes = 0;
    for v in base + 1..=base + 20 {
        for change in watch.delta(v).await {
            match change {
                Change::UpsertSession(s) => {
                    streamed.insert(s.sid);
                }
                Change::Revoke(_) => revokes += 1,
                Change::UpsertHost(_) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    assert_eq!(streamed, registered);
    assert_eq!(revokes, 4);
    // And the log itself has no gaps.
    let stored: Vec<u64> = stack
        .db
        .conn()
        .await
        .query("SELECT version FROM route_changes ORDER BY version")
        .await
        .unwrap();
    assert_eq!(stored, (1..=base + 20).collect::<Vec<_>>());
}

#[tokio::test]
async fn gateway_endpoints_refuse_a_missing_or_wrong_key() {
    let stack = TestStack::control_only().await.unwrap();
    let http = reqwest::Client::new();
    let internal = &stack.control().internal;
    let watch = format!("{internal}/internal/v1/routes/watch?since=0");
    let health = format!("{internal}/internal/v1/health");
    let usage = format!("{internal}/internal/v1/usage");
    for key in [
        None,
        Some("wrong-key-wrong-key-wrong-key-wrong-key"),
        Some(""),
    ] {
        let requests = [
            http.get(&watch),
            http.post(&health)
                .json(&json!({"gateway": "gw", "hosts": []})),
            http.post(&usage).json(&json!({"sessions": []})),
        ];
        for request in requests {
            let request = match key {
                Some(key) => request.bearer_auth(key),
                None => request,
            };
            let r = request.send().await.unwrap();
            let status = r.status();
            let body: Value = r.json().await.unwrap();
            let message = expect_error(
                &(status, body),
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                None,
            );
            assert!(
                message.contains("gateway key") || message.contains("Bearer"),
                "{message}"
            );
        }
    }
    // A user's platform token is not a gateway key.
    let user = stack.new_user().await;
    let r = http
        .get(&watch)
        .bearer_auth(&user.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let watch_as_gateway = |since: &str| {
        let request = stack.as_gateway(
            Method::GET,
            &format!("/internal/v1/routes/watch?since={since}"),
        );
        async move { request.send().await.unwrap().status() }
    };
    // The right key works.
    assert_eq!(watch_as_gateway("0").await, StatusCode::OK);
    // A bad `since` is a clear 400.
    assert_eq!(watch_as_gateway("yesterday").await, StatusCode::BAD_REQUEST);
}

async fn report(
    stack: &TestStack,
    path: &str,
    body: reqwest::Body,
    json: bool,
) -> (StatusCode, Value) {
    let mut request = stack
        .as_gateway(Method::POST, &format!("/internal/v1/{path}"))
        .body(body);
    if json {
        request = request.header(CONTENT_TYPE, "application/json");
    }
    let r = request.send().await.unwrap();
    let status = r.status();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// A report control must refuse, and what its error must say.
struct BadReport {
    path: &'static str,
    body: String,
    json: bool,
    status: u16,
    field: Option<&'static str>,
    mentions: &'static str,
}

impl BadReport {
    fn json(
        path: &'static str,
        body: &str,
        status: u16,
        field: Option<&'static str>,
        mentions: &'static str,
    ) -> Self {
        Self {
            path,
            body: body.to_owned(),
            json: true,
            status,
            field,
            mentions,
        }
    }
}

async fn report_json(stack: &TestStack, path: &str, body: Value) -> (StatusCode, Value) {
    report(stack, path, body.to_string().into(), true).await
}

#[tokio::test]
async fn health_and_usage_reports_update_rows_and_bad_ones_say_why() {
    let stack = TestStack::control_only().await.unwrap();
    let user = stack.new_user().await;
    let session = external_session(&stack, &user, 18_001).await;

    // Health: upserted per (host, gateway); unknown hosts are skipped.
    let (status, body) = report_json(
        &stack,
        "health",
        json!({"gateway": "gw-a", "hosts": [{"id": session.host, "reachable": true}, {"id": 999_999, "reachable": false}]}),
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    report_json(
        &stack,
        "health",
        json!({"gateway": "gw-b", "hosts": [{"id": session.host, "reachable": true}]}),
    )
    .await;
    let (status, _) = report_json(
        &stack,
        "health",
        json!({"gateway": "gw-a", "hosts": [{"id": session.host, "reachable": false}]}),
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let rows: Vec<(u64, String, bool)> = stack
        .db
        .conn()
        .await
        .query("SELECT host_id, gateway, reachable FROM host_reachability ORDER BY gateway")
        .await
        .unwrap();
    assert_eq!(
        rows,
        vec![
            (session.host, "gw-a".to_owned(), false),
            (session.host, "gw-b".to_owned(), true)
        ]
    );

    // Usage: bytes add up, the last activity only moves forward.
    let t = now() - 100;
    for (activity, bytes_in, bytes_out) in [(t, 100, 1_000), (t - 50, 20, 30)] {
        let (status, body) = report_json(
            &stack,
            "usage",
            json!({"sessions": [{"sid": session.sid, "last_activity": activity, "bytes_in": bytes_in, "bytes_out": bytes_out}]}),
        )
        .await;
        assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    }
    let unknown = "a".repeat(26);
    let (status, _) = report_json(
        &stack,
        "usage",
        json!({"sessions": [{"sid": unknown, "last_activity": t, "bytes_in": 1, "bytes_out": 1},
                            {"sid": session.sid, "last_activity": 0, "bytes_in": 1, "bytes_out": 2}]}),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::NO_CONTENT,
        "unknown sessions are skipped"
    );
    let row: (u64, u64, u64) = stack
        .db
        .conn()
        .await
        .exec_first(
            "SELECT TIMESTAMPDIFF(SECOND, '1970-01-01', last_activity_at), bytes_in, bytes_out FROM sessions WHERE sid = ?",
            (&session.sid,),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row, (t, 121, 1_032));

    // Bad bodies: the shape is 400 naming the problem, a bad value 422
    // naming the field, a non-JSON body 415.
    let sid = session.sid.as_str();
    let usage = |entry: Value| json!({ "sessions": [entry] }).to_string();
    let cases = [
        BadReport::json("health", "{\"gateway\": \"gw\"}", 400, None, "hosts"),
        BadReport::json(
            "health",
            &json!({"gateway": "gw", "hosts": [{"id": "one", "reachable": true}]}).to_string(),
            400,
            None,
            "id",
        ),
        BadReport::json(
            "health",
            &json!({"gateway": "", "hosts": []}).to_string(),
            422,
            Some("gateway"),
            "gateway",
        ),
        BadReport::json("health", "not json", 400, None, ""),
        BadReport {
            json: false,
            ..BadReport::json(
                "health",
                &json!({"gateway": "gw", "hosts": []}).to_string(),
                415,
                None,
                "JSON",
            )
        },
        BadReport::json(
            "usage",
            &usage(json!({"sid": "nope", "last_activity": 1, "bytes_in": 1, "bytes_out": 1})),
            422,
            Some("sessions"),
            "sessions[0].sid",
        ),
        BadReport::json(
            "usage",
            &usage(
                json!({"sid": sid, "last_activity": now() + 86_400, "bytes_in": 1, "bytes_out": 1}),
            ),
            422,
            Some("sessions"),
            "future",
        ),
        BadReport::json(
            "usage",
            &usage(json!({"sid": sid, "last_activity": 1, "bytes_in": -1, "bytes_out": 1})),
            400,
            None,
            "bytes_in",
        ),
        BadReport::json(
            "usage",
            &usage(
                json!({"sid": sid, "last_activity": 1, "bytes_in": 1, "bytes_out": 1, "extra": 1}),
            ),
            400,
            None,
            "extra",
        ),
        BadReport::json("usage", "{\"session\": []}", 400, None, "session"),
    ];
    for case in cases {
        let got = report(&stack, case.path, case.body.into(), case.json).await;
        let code = match case.status {
            400 => "bad_request",
            415 => "unsupported_media_type",
            _ => "invalid",
        };
        let status = StatusCode::from_u16(case.status).unwrap();
        let message = expect_error(&got, status, code, case.field);
        assert!(
            message.contains(case.mentions),
            "{}: {message:?} should mention {:?}",
            case.path,
            case.mentions
        );
    }
    // Nothing of the refused reports was applied.
    let bytes: Option<u64> = stack
        .db
        .conn()
        .await
        .exec_first(
            "SELECT bytes_in FROM sessions WHERE sid = ?",
            (&session.sid,),
        )
        .await
        .unwrap();
    assert_eq!(bytes, Some(121));
}

#[tokio::test]
async fn entering_a_session_redirects_to_its_origin_with_a_ticket_that_verifies() {
    let stack = TestStack::control_only().await.unwrap();
    let user = stack.new_user().await;
    let session = external_session(&stack, &user, 18_002).await;
    let keys = keys(&stack);
    let login_session = token::verify(&keys, &user.token, TokenKind::Platform, now())
        .unwrap()
        .login_session;
    let enter = format!("/sessions/{}/enter", session.sid);
    let port = stack.control().public.rsplit(':').next().unwrap();
    let origin = format!("http://{}.nb.localhost:{port}", session.sid);

    let check_ticket = |location: &str| {
        let prefix = format!("{origin}/_oc/enter?ticket=");
        let ticket = location
            .strip_prefix(&prefix)
            .unwrap_or_else(|| panic!("{location} should start with {prefix}"));
        let claims = token::verify(&keys, ticket, TokenKind::Ticket, now()).unwrap();
        assert_eq!(claims.sid.as_deref(), Some(session.sid.as_str()));
        assert_eq!(claims.user_id, user.id);
        assert_eq!(claims.login_session, login_session);
        assert!(claims.expires_at <= now() + token::TICKET_SECONDS);
        // A platform token it is not.
        assert!(token::verify(&keys, ticket, TokenKind::Platform, now()).is_err());
    };

    // The owner, by cookie: 303 to the session origin with a fresh ticket.
    let r = stack
        .get_with_cookie(&enter, &format!("oc_session={}", user.token))
        .await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(r.headers()[CACHE_CONTROL], "no-store");
    check_ticket(r.headers()[LOCATION].to_str().unwrap());

    // The API hands out the same kind of URL.
    let body = user
        .get_json(&format!("/api/v1/sessions/{}", session.sid))
        .await;
    assert_eq!(body["session_id"], session.sid.as_str());
    assert_eq!(body["state"], "running");
    check_ticket(body["url"].as_str().unwrap());
    assert!(
        !body.to_string().contains("up-token"),
        "the upstream token never reaches users"
    );

    // Someone else's session, an unknown one and a malformed one: 404.
    let stranger = stack.new_user().await;
    for sid in [session.sid.as_str(), &"b".repeat(26), "not-a-sid"] {
        let r = stack
            .get_with_cookie(
                &format!("/sessions/{sid}/enter"),
                &format!("oc_session={}", stranger.token),
            )
            .await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "{sid}");
        assert!(r.text().await.unwrap().contains("session not found"));
        let got = stranger.get(&format!("/api/v1/sessions/{sid}")).await;
        expect_error(&got, StatusCode::NOT_FOUND, "not_found", None);
    }

    // Anonymous: to the login page and, after logging in, back to enter.
    let browser = stack.browser_like();
    let r = browser.get(stack.url(&enter)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let login_url = r.headers()[LOCATION].to_str().unwrap().to_owned();
    assert_eq!(
        login_url,
        format!("/login?next=%2Fsessions%2F{}%2Fenter", session.sid)
    );
    let page = browser.get(stack.url(&login_url)).send().await.unwrap();
    let html = page.text().await.unwrap();
    let next = hidden_input(&html, "next");
    assert_eq!(next, format!("/sessions/{}/enter", session.sid));
    let r = browser
        .post(stack.url("/login"))
        .form(&[
            ("csrf", hidden_input(&html, "csrf").as_str()),
            ("next", next.as_str()),
            ("email", user.email.as_str()),
            ("password", PASSWORD),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(r.headers()[LOCATION].to_str().unwrap(), next);
    let r = browser.get(stack.url(&next)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let location = r.headers()[LOCATION].to_str().unwrap();
    assert!(
        location.starts_with(&format!("{origin}/_oc/enter?ticket=v1.")),
        "{location}"
    );
}

#[tokio::test]
async fn an_ended_session_says_so_and_leaves_the_table_after_its_tombstone_time() {
    let stack = TestStack::control_only().await.unwrap();
    let user = stack.new_user().await;
    let session = external_session(&stack, &user, 18_003).await;
    let mut watch = Watch::open(&stack, 1).await;
    let pool = pool(&stack);

    // Ended from another process: control finds it by polling.
    let started = Instant::now();
    let ended = sessions::ending::end(&pool, &session.sid, SessionState::Lost, "host_lost")
        .await
        .unwrap();
    assert_eq!(ended.state, SessionState::Lost);
    let changes = watch.delta(2).await;
    let latency = started.elapsed();
    println!("change committed by another process → watch stream: {latency:?}");
    assert!(latency < Duration::from_secs(1), "took {latency:?}");
    assert!(
        matches!(changes.as_slice(), [Change::UpsertSession(s)] if s.sid == session.sid && s.state == SessionState::Lost),
        "the tombstone is published: {changes:?}"
    );
    // Ending it again changes nothing.
    sessions::ending::end(&pool, &session.sid, SessionState::Stopped, "user")
        .await
        .unwrap();
    assert_eq!(version(&stack).await, 2);
    let err = sessions::ending::end(&pool, &session.sid, SessionState::Running, "x")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("lost or stopped"), "{err}");

    // The enter page explains, the API too (and hands out no URL).
    let r = stack
        .get_with_cookie(
            &format!("/sessions/{}/enter", session.sid),
            &format!("oc_session={}", user.token),
        )
        .await;
    assert_eq!(r.status(), StatusCode::GONE);
    let html = r.text().await.unwrap();
    assert!(html.contains("This session has ended"), "{html}");
    assert!(html.contains("went offline"), "{html}");
    let body = user
        .get_json(&format!("/api/v1/sessions/{}", session.sid))
        .await;
    assert_eq!(body["state"], "lost");
    assert_eq!(body["url"], Value::Null);
    assert!(body["ended_because"]
        .as_str()
        .unwrap()
        .contains("went offline"));

    // The tombstone is in a new gateway's snapshot...
    let snapshot = Watch::open(&stack, 0).await.snapshot().await;
    assert_eq!(snapshot.sessions[0].state, SessionState::Lost);
    // ...until it expires (an hour in production; at once here).
    let removed = routes::expire_tombstones(&pool, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(removed, 1);
    let changes = watch.delta(3).await;
    assert_eq!(
        changes,
        vec![Change::RemoveSession {
            sid: session.sid.clone()
        }]
    );
    assert_eq!(
        routes::expire_tombstones(&pool, Duration::ZERO)
            .await
            .unwrap(),
        0
    );
    let snapshot = Watch::open(&stack, 0).await.snapshot().await;
    assert!(snapshot.sessions.is_empty(), "{snapshot:?}");
    assert_eq!(snapshot.hosts.len(), 1, "the host stays");
    // The user still gets the clear page.
    let (_, body) = user.get(&format!("/api/v1/sessions/{}", session.sid)).await;
    assert_eq!(body["state"], "lost");

    // Pruning: a gateway whose version is older than the kept log gets a
    // snapshot instead of deltas.
    let pruned = routes::prune(&pool, Duration::ZERO, 1).await.unwrap();
    assert_eq!(pruned, 2);
    let mut old = Watch::open(&stack, 1).await;
    assert_eq!(old.snapshot().await.version, 3);
    let mut recent = Watch::open(&stack, 2).await;
    assert_eq!(recent.delta(3).await.len(), 1, "the latest change is kept");
    pool.disconnect().await.unwrap();
}

#[tokio::test]
async fn a_session_ended_through_end_frees_its_project_for_a_new_one() {
    let stack = TestStack::control_only().await.unwrap();
    // As `open` leaves it: the project's live session.
    let (user, session, mut conn) =
        session_left_as(&stack, 18_004, "live_project_id = project_id").await;
    let project: u64 = conn
        .exec_first(
            "SELECT project_id FROM sessions WHERE sid = ?",
            (&session.sid,),
        )
        .await
        .unwrap()
        .unwrap();
    let (status, body) = user
        .post(&format!("/api/v1/projects/{project}/open"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["session_id"], session.sid.as_str(), "its live session");

    let pool = pool(&stack);
    sessions::ending::end(&pool, &session.sid, SessionState::Stopped, "user")
        .await
        .unwrap();
    pool.disconnect().await.unwrap();
    let live: Option<Option<u64>> = conn
        .exec_first(
            "SELECT live_project_id FROM sessions WHERE sid = ?",
            (&session.sid,),
        )
        .await
        .unwrap();
    assert_eq!(live, Some(None), "the project is freed");
    // Opening it again makes a new open instead of answering the ended
    // session (here no host has room, so it waits in the queue).
    let (status, body) = user
        .post(&format!("/api/v1/projects/{project}/open"), json!({}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_ne!(body["session_id"], json!(session.sid));
}

#[tokio::test]
async fn ending_a_stopping_session_finishes_it_and_keeps_why_it_was_stopped() {
    let stack = TestStack::control_only().await.unwrap();
    // As a stop leaves it while the agent stops the server.
    let (_user, session, mut conn) = session_left_as(
        &stack,
        18_005,
        "state = 'stopping', end_reason = 'stopped_by_user', live_project_id = project_id",
    )
    .await;
    let pool = pool(&stack);
    let ended = sessions::ending::end(&pool, &session.sid, SessionState::Lost, "host_lost")
        .await
        .unwrap();
    pool.disconnect().await.unwrap();
    assert_eq!(ended.state, SessionState::Lost);
    let row: Option<(String, Option<String>, bool, Option<u64>)> = conn
        .exec_first(
            "SELECT state, end_reason, ended_at IS NOT NULL, live_project_id FROM sessions WHERE sid = ?",
            (&session.sid,),
        )
        .await
        .unwrap();
    assert_eq!(
        row,
        Some(("lost".into(), Some("stopped_by_user".into()), true, None))
    );
}

#[tokio::test]
async fn control_stops_promptly_with_watch_streams_open() {
    let mut stack = TestStack::control_only().await.unwrap();
    let mut watch = Watch::open(&stack, 0).await;
    watch.snapshot().await;
    let started = Instant::now();
    let status = stack.stop_control().unwrap();
    assert!(status.success(), "{status}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        watch.next_within(Duration::from_secs(2)).await.is_none(),
        "the stream ended"
    );
}
