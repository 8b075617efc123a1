#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test
//! The service as an operator sees it: listeners, metrics, migrations,
//! configuration errors, shutdown.

use std::process::Command;

use mysql_async::prelude::*;
use opencloud_e2e::{binary, set_mode, Control, ControlOptions, TestDatabase, TestStack, PASSWORD};
use reqwest::header::CONTENT_TYPE;
use reqwest::StatusCode;

#[tokio::test]
async fn internal_endpoints_are_never_served_on_the_public_listener() {
    let stack = TestStack::control_only().await.unwrap();
    let user = stack.new_user().await;
    let _ = stack.login(&user.email, "wrong password here").await;
    for path in ["/metrics", "/internal/v1/routes/watch"] {
        let r = stack.get_anonymous(path).await;
        assert_eq!(
            r.status(),
            StatusCode::NOT_FOUND,
            "{path} on the public listener"
        );
    }
    let metrics = stack.control().metrics().await;
    for expected in [
        "opencloud_control_http_requests_total{route=\"/api/v1/auth/login\",method=\"POST\",status=\"200\"}",
        "opencloud_control_http_request_duration_seconds_bucket",
        "opencloud_control_logins_total{outcome=\"success\"} 1",
        "opencloud_control_logins_total{outcome=\"bad_credentials\"} 1",
        "opencloud_control_registrations_total 1",
        "opencloud_control_db_pool_connections{state=\"in_use\"}",
        "opencloud_control_db_pool_connections{state=\"idle\"}",
    ] {
        assert!(metrics.contains(expected), "{expected} missing from:\n{metrics}");
    }
    // The internal listener serves nothing of the public site.
    let r = stack
        .http()
        .get(format!("{}/api/v1/packages", stack.control().internal))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn controls_metrics_answer_only_a_caller_with_the_gateway_key() {
    let stack = TestStack::control_only().await.unwrap();
    let url = format!("{}/metrics", stack.control().internal);
    let http = stack.http();
    for (what, auth) in [
        ("no key", None),
        (
            "a wrong key",
            Some("Bearer not-the-gateway-key-at-all-000000"),
        ),
    ] {
        let mut request = http.get(&url);
        if let Some(auth) = auth {
            request = request.header("authorization", auth);
        }
        let r = request.send().await.unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{what}");
        assert!(!r.text().await.unwrap().contains("opencloud_"), "{what}");
    }
    assert!(stack
        .control()
        .metrics()
        .await
        .contains("opencloud_control_http_requests_total"));
}

#[tokio::test]
async fn pages_and_the_stylesheet_are_served_by_control() {
    let stack = TestStack::control_only().await.unwrap();
    stack.admin().await; // seeds the starter packages, as scripts/up does
    let home = stack.get_anonymous("/").await;
    assert_eq!(home.status(), StatusCode::OK);
    let html = home.text().await.unwrap();
    assert!(
        html.contains("/static/style.css") && html.contains("Starter"),
        "{html}"
    );
    let css = stack.get_anonymous("/static/style.css").await;
    assert!(css.headers()[CONTENT_TYPE]
        .to_str()
        .unwrap()
        .starts_with("text/css"));
    for path in ["/packages", "/register", "/login"] {
        let r = stack.get_anonymous(path).await;
        assert_eq!(r.status(), StatusCode::OK, "{path}");
    }
    let missing = stack.get_anonymous("/no/such/page").await;
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    assert!(missing.text().await.unwrap().contains("page not found"));
    let health = stack.get_json_anonymous("/healthz").await;
    assert_eq!(health["status"], "ok");
}

#[tokio::test]
async fn two_replicas_starting_together_migrate_once() {
    let db = TestDatabase::create().await.unwrap();
    let options = ControlOptions::default();
    let (a, b) = tokio::join!(Control::start(&db, &options), Control::start(&db, &options));
    let (a, b) = (a.unwrap(), b.unwrap());
    let files = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../migrations"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "sql")
        })
        .count() as u64;
    assert_eq!(db.count("schema_migrations").await, files);
    assert_eq!(
        db.count("leases").await,
        0,
        "the migration lease is released"
    );
    let applied_logs = [a.log(), b.log()]
        .iter()
        .map(|l| l.matches("applied").count())
        .sum::<usize>();
    assert_eq!(
        applied_logs as u64, files,
        "each migration applied by exactly one replica"
    );
}

#[tokio::test]
async fn a_failing_migration_stops_start_up_naming_the_file_and_mysqls_message() {
    let db = TestDatabase::create().await.unwrap();
    // A users table whose id cannot be referenced by login_sessions.user_id.
    db.conn()
        .await
        .query_drop("CREATE TABLE users (id INT NOT NULL PRIMARY KEY) ENGINE = InnoDB")
        .await
        .unwrap();
    let err = match Control::start(&db, &ControlOptions::default()).await {
        Ok(_) => panic!("control started on a database it cannot migrate"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("0002_create_login_sessions.sql failed"),
        "{err}"
    );
    assert!(
        err.contains("MySQL error 1005"),
        "MySQL's own message: {err}"
    );
    assert_eq!(
        db.count("schema_migrations").await,
        1,
        "the first migration stays applied"
    );
    assert_eq!(
        db.count("leases").await,
        0,
        "the lease is released on failure"
    );
}

#[tokio::test]
async fn a_migration_changed_after_it_was_applied_is_refused() {
    let db = TestDatabase::create().await.unwrap();
    let stack_control = Control::start(&db, &ControlOptions::default())
        .await
        .unwrap();
    stack_control.stop().unwrap();
    db.conn()
        .await
        .query_drop("UPDATE schema_migrations SET checksum = REPEAT('0', 64) WHERE version = 3")
        .await
        .unwrap();
    let err = Control::start(&db, &ControlOptions::default())
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("0003_create_projects.sql failed: was changed after it was applied"),
        "{err}"
    );
}

#[tokio::test]
async fn a_wrong_config_key_is_named_with_its_file() {
    let db = TestDatabase::create().await.unwrap();
    let (_dir, config, _, _) = Control::prepare(
        &db,
        &ControlOptions {
            extra_config: "pool_size = 3\n".into(),
            ..Default::default()
        },
    )
    .unwrap();
    let out = Command::new(binary("opencloud-control"))
        .arg("--config")
        .arg(&config)
        .arg("migrate")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("{}: key `database.pool_size`", config.display())),
        "{stderr}"
    );
    assert!(stderr.contains("unknown field `pool_size`"), "{stderr}");

    let (_dir, clean_config, _, _) = Control::prepare(&db, &ControlOptions::default()).unwrap();
    let out = Command::new(binary("opencloud-control"))
        .arg("--config")
        .arg(&clean_config)
        .arg("migrate")
        .env("OPENCLOUD_CONTROL__PASSWORDS__PBKDF2_ITERATIONS", "1000")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("key `passwords.pbkdf2_iterations` (from OPENCLOUD_CONTROL__PASSWORDS__PBKDF2_ITERATIONS)")
            || stderr.contains("key `passwords.pbkdf2_iterations`: must be at least 600000"),
        "{stderr}"
    );
    assert_eq!(
        db.count("information_schema.tables WHERE table_schema = DATABASE()")
            .await,
        0,
        "nothing touched"
    );
}

/// A keys file other users can read gives them every token's signing key:
/// control refuses to start, naming the file and its mode.
#[tokio::test]
async fn control_with_a_keys_file_others_can_read_refuses_to_start() {
    let db = TestDatabase::create().await.unwrap();
    let (dir, config, _, _) = Control::prepare(&db, &ControlOptions::default()).unwrap();
    let keys = dir.join("keys.toml");
    for mode in [0o644, 0o640] {
        set_mode(&keys, mode);
        let stderr = Control::refusal(&config);
        assert!(
            stderr.contains(&format!(
                "keys file {} is readable by others (mode {mode:04o}); chmod 600 it",
                keys.display()
            )),
            "{stderr}"
        );
    }
}

#[tokio::test]
async fn sigterm_stops_control_cleanly() {
    let mut stack = TestStack::control_only().await.unwrap();
    let user = stack.new_user().await;
    assert_eq!(user.get("/api/v1/me").await.0, StatusCode::OK);
    let status = stack.stop_control().unwrap();
    assert!(status.success(), "exit status {status}");
}

#[tokio::test]
async fn seeding_is_idempotent_and_keeps_the_admins_password() {
    let stack = TestStack::control_only().await.unwrap();
    let admin = stack.admin().await;
    let out = Command::new(binary("opencloud-control"))
        .arg("--config")
        .arg(&stack.control().config_path)
        .args(["seed", "--admin-email", &admin.email])
        .env("OPENCLOUD_ADMIN_PASSWORD", "a different password")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("exists"));
    assert_eq!(stack.db.count("packages").await, 3);
    assert_eq!(stack.login(&admin.email, PASSWORD).await.0, StatusCode::OK);
}

/// MariaDB refuses a connection beyond its limits ("too many connections").
/// That is the database out of room, not a bug: callers get a 503 saying
/// to try again, never a 500, and control serves again once room is back.
#[tokio::test(flavor = "multi_thread")]
async fn a_database_out_of_connections_answers_503_never_500_and_control_recovers() {
    let db = TestDatabase::create().await.unwrap();
    // A database user allowed 2 connections, against control's pool of 8.
    let user = opencloud_e2e::unique("oc_small_");
    let password = opencloud_e2e::unique("pw");
    let mut root = db.conn().await;
    root.query_drop(format!(
        "CREATE USER '{user}'@'%' IDENTIFIED BY '{password}' WITH MAX_USER_CONNECTIONS 2"
    ))
    .await
    .unwrap();
    root.query_drop(format!("GRANT ALL ON `{}`.* TO '{user}'@'%'", db.name))
        .await
        .unwrap();
    let server = mysql_async::Opts::from_url(&opencloud_e2e::mysql_server_url()).unwrap();
    let host = format!("{}:{}", server.ip_or_hostname(), server.tcp_port());
    let options = ControlOptions {
        env: vec![(
            "OPENCLOUD_CONTROL__DATABASE__URL".into(),
            format!("mysql://{user}:{password}@{host}/{}", db.name),
        )],
        ..Default::default()
    };
    let control = Control::start(&db, &options).await.unwrap();
    let http = reqwest::Client::new();
    let url = format!("{}/api/v1/packages", control.public);
    let answers = futures_util::future::join_all((0..80).map(|_| async {
        let r = http.get(&url).send().await.unwrap();
        (r.status(), r.text().await.unwrap())
    }))
    .await;
    let refused = answers
        .iter()
        .filter(|(s, _)| *s == StatusCode::SERVICE_UNAVAILABLE)
        .count();
    for (status, body) in &answers {
        assert!(
            *status == StatusCode::OK || *status == StatusCode::SERVICE_UNAVAILABLE,
            "{status}: {body}"
        );
        if *status == StatusCode::SERVICE_UNAVAILABLE {
            assert!(body.contains("\"unavailable\""), "{body}");
        }
    }
    assert!(
        refused > 0,
        "80 requests at once never needed a third connection: the test proves nothing"
    );
    println!("{refused} of 80 answered 503 while the database refused connections");
    let mut recovered = false;
    for _ in 0..100 {
        if http.get(&url).send().await.unwrap().status() == StatusCode::OK {
            recovered = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(recovered, "control did not serve again");
    assert!(
        control
            .log()
            .contains("the database refuses new connections"),
        "the refusal is not in control's log"
    );
    drop(control);
    root.query_drop(format!("DROP USER '{user}'@'%'"))
        .await
        .unwrap();
}
