#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test
//! Origin on session origins: every session origin is on one site
//! (`*.{session_domain}`), so SameSite lets a page on another session send
//! the victim's `oc_s` along. A change or WebSocket upgrade carrying `oc_s`
//! must come from the session's own `Origin`; otherwise the gateway answers
//! 403 and the host never sees it. Bearer calls are not browser calls and
//! are not subject to the rule.

use opencloud_e2e::upstream::{capture_upstream, loopback, Captured};
use opencloud_e2e::{TestStack, TestUser};
use reqwest::{Method, RequestBuilder, StatusCode};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// A victim entered into their session on a recording upstream, and an
/// attacker with a session origin of their own on the same site.
struct Fixture {
    stack: TestStack,
    victim: TestUser,
    sid: String,
    cookie: String,
    attacker_origin: String,
    captured: Captured,
    upstream_port: u16,
}

/// How a request proves who sends it.
#[derive(Clone, Copy)]
enum Credential {
    /// The victim's `oc_s`, as the browser sends it.
    Cookie,
    /// The victim's platform token, as an API client sends it.
    Bearer,
}

impl Fixture {
    async fn new() -> Self {
        let (upstream_port, captured) = capture_upstream().await;
        let stack = TestStack::with_gateway().await.unwrap();
        let victim = stack.new_user().await;
        let sid = stack.session_for(&victim, loopback(upstream_port)).await;
        let cookie = stack.enter(&victim, &sid).await;
        let attacker = stack.new_user().await;
        let attacker_sid = stack.session_for(&attacker, loopback(upstream_port)).await;
        let attacker_origin = stack.gateway().session_origin(&attacker_sid);
        Self {
            stack,
            victim,
            sid,
            cookie,
            attacker_origin,
            captured,
            upstream_port,
        }
    }

    fn origin(&self) -> String {
        self.stack.gateway().session_origin(&self.sid)
    }

    /// Origins a page that is not the victim's session could send: another
    /// session, an opaque origin, the platform, and near misses of the
    /// victim's own.
    fn foreign_origins(&self) -> Vec<String> {
        let own = self.origin();
        let port = self.stack.gateway().port;
        vec![
            self.attacker_origin.clone(),
            "null".to_owned(),
            self.stack.gateway().platform(),
            own.replacen("http://", "https://", 1),
            format!("{own}.evil.example"),
            format!("{own}/"),
            own.replace(&format!(":{port}"), ":1"),
            own[..own.len() - 1].to_owned(),
        ]
    }

    /// Heads the gateway forwarded to the host (health probes left out).
    fn forwarded(&self) -> Vec<String> {
        self.captured.forwarded(self.upstream_port)
    }

    /// `method path` on the victim's session with `credential` and, if
    /// given, `Origin: origin`.
    fn request(
        &self,
        method: Method,
        path: &str,
        credential: Credential,
        origin: Option<&str>,
    ) -> RequestBuilder {
        let r = self
            .stack
            .gateway()
            .client(&[&self.sid], false)
            .request(method, format!("{}{path}", self.origin()));
        let r = match credential {
            Credential::Cookie => r.header("cookie", &self.cookie),
            Credential::Bearer => r.bearer_auth(&self.victim.token),
        };
        match origin {
            Some(origin) => r.header("origin", origin),
            None => r,
        }
    }

    /// `method path` must pass: 200 from the host, which got it.
    async fn passes(
        &self,
        method: Method,
        path: &str,
        credential: Credential,
        origin: Option<&str>,
    ) {
        let r = self
            .request(method.clone(), path, credential, origin)
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            StatusCode::OK,
            "{method} {path} from {origin:?}"
        );
        let head = self.forwarded().pop().unwrap();
        assert!(head.starts_with(&format!("{method} {path} ")), "{head}");
    }

    /// A WebSocket handshake to a kernel's channels; the status it got.
    async fn upgrade(&self, credential: Credential, origin: Option<&str>) -> u16 {
        let url = format!(
            "{}/api/kernels/k1/channels",
            self.origin().replacen("http://", "ws://", 1)
        );
        let mut request = url.into_client_request().unwrap();
        let headers = request.headers_mut();
        match credential {
            Credential::Cookie => headers.insert("cookie", self.cookie.parse().unwrap()),
            Credential::Bearer => headers.insert(
                "authorization",
                format!("Bearer {}", self.victim.token).parse().unwrap(),
            ),
        };
        if let Some(origin) = origin {
            headers.insert("origin", origin.parse().unwrap());
        }
        let tcp = tokio::net::TcpStream::connect(self.stack.gateway().addr())
            .await
            .unwrap();
        match tokio_tungstenite::client_async(request, tcp).await {
            Ok((_, response)) => response.status().as_u16(),
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                response.status().as_u16()
            }
            Err(e) => panic!("the handshake failed without an answer: {e}"),
        }
    }
}

/// The changes a page could try: create a file, start a kernel, write,
/// rename and delete one.
fn changes() -> [(Method, &'static str); 5] {
    [
        (Method::POST, "/api/contents"),
        (Method::POST, "/api/kernels"),
        (Method::PUT, "/api/contents/x.txt"),
        (Method::PATCH, "/api/contents/x.txt"),
        (Method::DELETE, "/api/contents/x.txt"),
    ]
}

#[tokio::test]
async fn a_change_with_the_victims_cookie_from_another_origin_is_refused_before_the_host() {
    let f = Fixture::new().await;
    let before = f.forwarded().len();
    let origins = f.foreign_origins();
    let cases = origins.iter().map(|o| Some(o.as_str())).chain([None]);
    let mut refused = 0;
    for origin in cases {
        for (method, path) in changes() {
            let r = f
                .request(method.clone(), path, Credential::Cookie, origin)
                .body("{}")
                .send()
                .await
                .unwrap();
            let status = r.status();
            let text = r.text().await.unwrap();
            println!("{method} {path} from {origin:?}: {status} {text:?}");
            assert_eq!(
                status,
                StatusCode::FORBIDDEN,
                "{method} {path} from {origin:?}"
            );
            assert!(
                text.contains("the session's own page"),
                "{method} {path} from {origin:?}: {text:?}"
            );
            refused += 1;
        }
    }
    let since = f.forwarded().split_off(before);
    assert!(
        since.is_empty(),
        "refused changes reached the host: {since:#?}"
    );

    let foreign = refused - changes().len();
    f.stack
        .gateway()
        .metrics_show(&[
            &format!("opencloud_gateway_origin_refusals_total{{reason=\"foreign\"}} {foreign}"),
            &format!(
                "opencloud_gateway_origin_refusals_total{{reason=\"missing\"}} {}",
                changes().len()
            ),
        ])
        .await;
}

#[tokio::test]
async fn a_websocket_with_the_victims_cookie_from_another_origin_is_refused_before_the_host() {
    let f = Fixture::new().await;
    let before = f.forwarded().len();
    let origins = f.foreign_origins();
    for origin in origins.iter().map(|o| Some(o.as_str())).chain([None]) {
        let status = f.upgrade(Credential::Cookie, origin).await;
        println!("kernel channels from {origin:?}: {status}");
        assert_eq!(status, 403, "kernel channels from {origin:?}");
    }
    let since = f.forwarded().split_off(before);
    assert!(
        since.is_empty(),
        "refused upgrades reached the host: {since:#?}"
    );
}

#[tokio::test]
async fn the_sessions_own_origin_still_changes_and_upgrades_and_reads_need_no_origin() {
    let f = Fixture::new().await;
    let own = f.origin();
    for (method, path) in changes() {
        f.passes(method, path, Credential::Cookie, Some(&own)).await;
    }
    // Browsers spell origins in lower case; the gateway compares ignoring case.
    let shouted = own.to_ascii_uppercase();
    f.passes(
        Method::POST,
        "/api/contents",
        Credential::Cookie,
        Some(&shouted),
    )
    .await;

    // The upgrade reaches the host (which, recording only, does not switch).
    let before = f.forwarded().len();
    f.upgrade(Credential::Cookie, Some(&own)).await;
    let since = f.forwarded().split_off(before);
    assert_eq!(since.len(), 1, "{since:#?}");
    assert!(
        since[0].to_ascii_lowercase().contains("upgrade: websocket"),
        "{since:#?}"
    );

    // Reads are not changes: no Origin needed, and another one is not refused.
    for (method, origin) in [
        (Method::GET, None),
        (Method::HEAD, None),
        (Method::OPTIONS, None),
        (Method::GET, Some(f.attacker_origin.as_str())),
    ] {
        f.passes(method, "/api/contents", Credential::Cookie, origin)
            .await;
    }
}

#[tokio::test]
async fn bearer_calls_are_not_subject_to_the_origin_rule() {
    let f = Fixture::new().await;
    let attacker = f.attacker_origin.clone();
    for origin in [None, Some(attacker.as_str())] {
        for (method, path) in changes() {
            f.passes(method, path, Credential::Bearer, origin).await;
        }
        let before = f.forwarded().len();
        f.upgrade(Credential::Bearer, origin).await;
        assert_eq!(
            f.forwarded().len(),
            before + 1,
            "the bearer upgrade reached the host"
        );
    }
}
