#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test
//! Through the gateway to a real `jupyter server`: entering a session, API
//! and kernel WebSocket traffic, who gets what, revocation, resilience.

use std::time::{Duration, Instant};

use opencloud_e2e::jupyter::JupyterServer;
use opencloud_e2e::kernel;
use opencloud_e2e::stack::Target;
use opencloud_e2e::upstream::{capture_upstream, loopback};
use opencloud_e2e::{TestStack, TestUser};
use reqwest::header::{ACCEPT, LOCATION, SET_COOKIE};
use reqwest::{RequestBuilder, Response, StatusCode};
use serde_json::Value;

/// A user with a project and a session served from `upstream`.
struct Fixture {
    stack: TestStack,
    user: TestUser,
    sid: String,
}

impl Fixture {
    async fn new(upstream: Target) -> Self {
        let stack = TestStack::with_gateway().await.unwrap();
        let user = stack.new_user().await;
        let sid = stack.session_for(&user, upstream).await;
        Self { stack, user, sid }
    }

    /// A GET of `path` in the session, with `with` adding credentials
    /// and headers; the response as it came.
    async fn get(
        &self,
        path: &str,
        with: impl FnOnce(RequestBuilder) -> RequestBuilder,
    ) -> Response {
        with(self.client(false).get(format!("{}{path}", self.origin())))
            .send()
            .await
            .unwrap()
    }

    fn origin(&self) -> String {
        self.stack.gateway().session_origin(&self.sid)
    }

    fn client(&self, cookies: bool) -> reqwest::Client {
        self.stack.gateway().client(&[&self.sid], cookies)
    }

    /// The enter URL control hands out for this session.
    async fn enter_url(&self) -> String {
        let body = self
            .user
            .get_json(&format!("/api/v1/sessions/{}", self.sid))
            .await;
        body["url"]
            .as_str()
            .unwrap_or_else(|| panic!("no url in {body}"))
            .to_owned()
    }

    /// Enters the session; returns the `oc_s` cookie pair (`oc_s=…`).
    async fn enter(&self) -> String {
        self.stack.enter(&self.user, &self.sid).await
    }
}

#[tokio::test]
async fn entering_a_session_lands_on_lab_and_the_kernel_runs_code_through_the_gateway() {
    let jupyter = JupyterServer::start().await.unwrap();
    let f = Fixture::new(jupyter.target()).await;

    let url = f.enter_url().await;
    assert!(
        url.starts_with(&format!("{}/_oc/enter?ticket=v1.", f.origin())),
        "{url}"
    );
    let r = f.client(false).get(&url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::FOUND);
    assert_eq!(r.headers()[LOCATION], "/lab");
    let set_cookie = r.headers()[SET_COOKIE].to_str().unwrap().to_owned();
    for attribute in ["oc_s=v1.", "HttpOnly", "SameSite=Lax", "Path=/"] {
        assert!(
            set_cookie.contains(attribute),
            "{attribute} in {set_cookie}"
        );
    }
    assert!(
        !set_cookie.to_ascii_lowercase().contains("domain"),
        "host-only: {set_cookie}"
    );
    // A ticket works once.
    assert_eq!(
        f.client(false).get(&url).send().await.unwrap().status(),
        StatusCode::FORBIDDEN
    );

    let cookie = set_cookie.split(';').next().unwrap().to_owned();
    let http = f.client(false);
    let contents = f
        .get("/api/contents", |r| r.header("cookie", &cookie))
        .await;
    assert_eq!(contents.status(), StatusCode::OK);
    let listing: Value = contents.json().await.unwrap();
    assert_eq!(listing["type"], "directory");

    // Lab loads, and no credential is in what the browser gets: no server
    // token exists, and the host's link key never leaves the host.
    let lab = f
        .get("/lab", |r| {
            r.header("cookie", &cookie).header(ACCEPT, "text/html")
        })
        .await;
    assert_eq!(lab.status(), StatusCode::OK);
    let headers = format!("{:?}", lab.headers());
    let html = lab.text().await.unwrap();
    assert!(html.contains("jupyter-config-data"), "a Lab page");
    let (host, _) = f.stack.session_row(&f.sid).await;
    let link_key = f.stack.link_key(host);
    assert!(
        !html.contains(&link_key) && !headers.contains(&link_key),
        "the link key leaked"
    );
    assert!(
        !html.contains("data-jupyter-api-token"),
        "a server token leaked"
    );

    let ws_url = kernel::start(&http, &f.origin(), &cookie).await.unwrap();
    let result = kernel::execute(&ws_url, f.stack.gateway().addr(), &cookie, "1+1")
        .await
        .unwrap();
    assert_eq!(result, "2");
    let printed = kernel::execute(&ws_url, f.stack.gateway().addr(), &cookie, "print(6*7)")
        .await
        .unwrap();
    assert_eq!(printed, "42");
}

#[tokio::test]
async fn without_credentials_pages_go_to_enter_apis_get_401_and_strangers_get_404() {
    let (port, _captured) = capture_upstream().await;
    let f = Fixture::new(loopback(port)).await;
    let http = f.client(false);

    let page = f.get("/lab", |r| r.header(ACCEPT, "text/html")).await;
    assert_eq!(page.status(), StatusCode::FOUND);
    assert_eq!(
        page.headers()[LOCATION],
        format!("{}/sessions/{}/enter", f.stack.gateway().platform(), f.sid).as_str()
    );
    let api = f
        .get("/api/contents", |r| r.header(ACCEPT, "application/json"))
        .await;
    assert_eq!(api.status(), StatusCode::UNAUTHORIZED);

    assert_eq!(
        f.get("/api/contents", |r| r.bearer_auth(&f.user.token))
            .await
            .status(),
        StatusCode::OK
    );
    let stranger = f.stack.new_user().await.token;
    let r = f.get("/api/contents", |r| r.bearer_auth(&stranger)).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = f
        .get("/lab", |r| {
            r.bearer_auth("v1.k1.forged.sig")
                .header(ACCEPT, "text/html")
        })
        .await;
    assert_eq!(
        r.status(),
        StatusCode::FOUND,
        "a bad token on a page navigation is sent to log in"
    );

    // A sid that is a prefix of the real one, and unknown hosts.
    let prefix = &f.sid[..25];
    let other = f.stack.gateway().client(&[prefix, "evil"], false);
    let r = other
        .get(format!(
            "http://{prefix}.nb.localhost:{}/api/contents",
            f.stack.gateway().port
        ))
        .bearer_auth(&f.user.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = http
        .get(format!("http://127.0.0.1:{}/", f.stack.gateway().port))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::MISDIRECTED_REQUEST);

    // The platform's internal paths are not reachable through the gateway.
    for path in ["/internal/v1/routes/watch", "/metrics"] {
        let r = http
            .get(format!("{}{path}", f.stack.gateway().platform()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "{path}");
    }
    assert!(f.user.id > 0);
}

#[tokio::test]
async fn the_metrics_listener_answers_only_a_scrape_with_its_key() {
    let stack = TestStack::with_gateway().await.unwrap();
    let gateway = stack.gateway();
    let url = format!("http://127.0.0.1:{}/metrics", gateway.metrics_port);
    let wrong = format!("Bearer {}x", gateway.metrics_key);
    for (what, auth) in [("no key", None), ("a wrong key", Some(wrong.as_str()))] {
        let mut request = stack.http().get(&url);
        if let Some(auth) = auth {
            request = request.header("authorization", auth);
        }
        let r = request.send().await.unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{what}");
        assert!(!r.text().await.unwrap().contains("opencloud_"), "{what}");
    }
    assert!(gateway.metrics().await.contains("opencloud_gateway_"));
}

#[tokio::test]
async fn the_upstream_never_gets_the_platform_credentials_nor_any_token() {
    let (port, captured) = capture_upstream().await;
    let f = Fixture::new(loopback(port)).await;
    let cookie = f.enter().await;
    let r = f
        .client(false)
        .get(format!("{}/api/contents", f.origin()))
        .header(
            "cookie",
            format!("{cookie}; oc_session={}; theme=dark", f.user.token),
        )
        .header("connection", "keep-alive, X-Hop-Secret")
        .header("x-hop-secret", "must not pass")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let cookies: Vec<String> = r
        .headers()
        .get_all(SET_COOKIE)
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        cookies,
        vec!["kept=2; Path=/".to_string()],
        "a Set-Cookie with Domain is dropped"
    );
    let head = captured.last().to_ascii_lowercase();
    // The session trusts its link: no credential of any kind goes upstream.
    assert!(!head.contains("authorization"), "{head}");
    assert!(
        head.contains(&format!(
            "host: {}.nb.localhost:{}",
            f.sid,
            f.stack.gateway().port
        )),
        "{head}"
    );
    assert!(head.contains("cookie: theme=dark"), "{head}");
    assert!(
        !head.contains("oc_s=") && !head.contains("oc_session"),
        "{head}"
    );
    assert!(!head.contains("x-hop-secret"), "{head}");
    assert!(head.contains("x-forwarded-for: 127.0.0.1"), "{head}");
    assert!(head.contains("x-forwarded-proto: http"), "{head}");

    // A bearer platform token is removed too.
    f.get("/api/contents", |r| r.bearer_auth(&f.user.token))
        .await;
    let head = captured.last();
    assert!(!head.contains(&f.user.token), "{head}");
    assert!(
        !head.to_ascii_lowercase().contains("authorization"),
        "{head}"
    );
}

#[tokio::test]
async fn after_logout_the_old_session_cookie_is_refused_within_a_second() {
    let (port, _captured) = capture_upstream().await;
    let f = Fixture::new(loopback(port)).await;
    let cookie = f.enter().await;
    let http = f.client(false);
    assert_eq!(
        f.get("/api/contents", |r| r.header("cookie", &cookie))
            .await
            .status(),
        StatusCode::OK
    );

    let r = http
        .post(format!(
            "{}/api/v1/auth/logout",
            f.stack.gateway().platform()
        ))
        .bearer_auth(&f.user.token)
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let logged_out = Instant::now();
    loop {
        let status = f
            .get("/api/contents", |r| r.header("cookie", &cookie))
            .await
            .status();
        if status == StatusCode::UNAUTHORIZED {
            break;
        }
        assert!(
            logged_out.elapsed() < Duration::from_secs(10),
            "the cookie still worked 10 s after logout"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = logged_out.elapsed();
    println!("revoked cookie refused {took:?} after logout");
    assert_eq!(
        f.get("/api/contents", |r| r.bearer_auth(&f.user.token))
            .await
            .status(),
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn with_control_down_the_gateway_serves_sessions_and_so_does_a_restarted_gateway() {
    let (port, _captured) = capture_upstream().await;
    let mut f = Fixture::new(loopback(port)).await;
    let cookie = f.enter().await;

    f.stack.kill_control();
    assert_eq!(
        f.get("/api/contents", |r| r.header("cookie", &cookie))
            .await
            .status(),
        StatusCode::OK
    );

    f.stack.gateway_mut().stop();
    f.stack.gateway_mut().start().await.unwrap();
    let r = f
        .get("/api/contents", |r| r.header("cookie", &cookie))
        .await;
    assert_eq!(
        r.status(),
        StatusCode::OK,
        "a restarted gateway serves from its saved table"
    );
    // The platform itself is down, and says so clearly.
    let r = f
        .client(false)
        .get(format!("{}/", f.stack.gateway().platform()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    assert!(r.text().await.unwrap().contains("not answering"));
}

#[tokio::test]
async fn a_lost_session_gets_the_clear_page_at_once() {
    let (port, _captured) = capture_upstream().await;
    let f = Fixture::new(loopback(port)).await;
    let cookie = f.enter().await;
    let pool = mysql_async::Pool::new(f.stack.db.url.as_str());
    opencloud_control::sessions::ending::end(
        &pool,
        &f.sid,
        opencloud_protocol::routes::SessionState::Lost,
        "host_lost",
    )
    .await
    .unwrap();
    pool.disconnect().await.unwrap();
    let started = Instant::now();
    loop {
        let r = f
            .get("/lab", |r| {
                r.header("cookie", &cookie).header(ACCEPT, "text/html")
            })
            .await;
        if r.status() == StatusCode::GONE {
            assert!(r.text().await.unwrap().contains("went offline"));
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "still {} after 10 s",
            r.status()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "lost tombstone served {:?} after the change",
        started.elapsed()
    );
}

#[tokio::test]
async fn the_gateway_reports_host_reachability_and_session_usage_to_control() {
    let (port, _captured) = capture_upstream().await;
    let f = Fixture::new(loopback(port)).await;
    let cookie = f.enter().await;
    for _ in 0..3 {
        let r = f
            .client(false)
            .post(format!("{}/api/contents", f.origin()))
            .header("cookie", &cookie)
            .header("origin", f.origin())
            .body("0123456789")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }
    let started = Instant::now();
    loop {
        let mut conn = f.stack.db.conn().await;
        let usage: Option<(u64, u64, bool)> = mysql_async::prelude::Queryable::exec_first(
            &mut conn,
            "SELECT bytes_in, bytes_out, last_activity_at IS NOT NULL FROM sessions WHERE sid = ?",
            (&f.sid,),
        )
        .await
        .unwrap();
        let reachable: Option<bool> = mysql_async::prelude::Queryable::query_first(
            &mut conn,
            "SELECT reachable FROM host_reachability WHERE gateway = 'test-gateway'",
        )
        .await
        .unwrap();
        if let (Some((bytes_in, bytes_out, active)), Some(reachable)) = (usage, reachable) {
            if bytes_in >= 30 && bytes_out >= 6 && active {
                assert!(reachable, "the host answers, so it is reported reachable");
                println!(
                    "usage and health reached control after {:?}",
                    started.elapsed()
                );
                break;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no usage/health report reached control: {usage:?} {reachable:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
