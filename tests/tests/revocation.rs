#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test
//! Revocation reaches requests already open: a kernel WebSocket (or a long
//! download) that a logout, a password change, a disabled account, a
//! stopped session or a revoked host no longer allows is closed within a second, and nobody
//! else's is. The deadline is polled with a second of slack and the
//! measured time printed.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use opencloud_e2e::jupyter::JupyterServer;
use opencloud_e2e::kernel::{self, Channels};
use opencloud_e2e::upstream::{loopback, read_request_head};
use opencloud_e2e::{TestStack, TestUser};
use reqwest::StatusCode;
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

/// The stated deadline, and the slack the poll allows on top of it.
const DEADLINE: Duration = Duration::from_secs(1);
const SLACK: Duration = Duration::from_secs(1);

/// A user in a real Jupyter session, entered through a ticket as a browser
/// does, with a kernel started.
struct Fixture {
    stack: TestStack,
    _jupyter: JupyterServer,
    user: TestUser,
    sid: String,
    /// The `oc_s` cookie `user` got for the session.
    cookie: String,
    /// The kernel's channels (ws://…).
    channels: String,
}

impl Fixture {
    async fn new() -> Self {
        Self::started(false).await
    }

    /// With `host_owner`, the user owns the host the session runs on (and
    /// may revoke it).
    async fn started(host_owner: bool) -> Self {
        let stack = TestStack::with_gateway().await.unwrap();
        let jupyter = JupyterServer::start().await.unwrap();
        let user = if host_owner {
            stack.host_owner().await
        } else {
            stack.new_user().await
        };
        let sid = stack.session_for(&user, jupyter.target()).await;
        let cookie = stack.enter(&user, &sid).await;
        let gateway = stack.gateway();
        let channels = kernel::start(
            &gateway.client(&[&sid], false),
            &gateway.session_origin(&sid),
            &cookie,
        )
        .await
        .unwrap();
        Self {
            stack,
            _jupyter: jupyter,
            user,
            sid,
            cookie,
            channels,
        }
    }

    /// Enters the session as `user` (another login session): its cookie.
    /// (Two tickets for one login session and sid within a second are the
    /// same ticket, used once: the fixture's user has its cookie already.)
    async fn enter_as(&self, user: &TestUser) -> String {
        self.stack.enter(user, &self.sid).await
    }

    /// Opens the kernel's WebSocket as a browser would from the session's
    /// page, with the `oc_s` `cookie`, and runs code on it.
    async fn open_kernel(&self, cookie: &str) -> Channels {
        let mut ws = kernel::connect(&self.channels, self.stack.gateway().addr(), cookie)
            .await
            .unwrap();
        assert_eq!(kernel::run(&mut ws, "6*7").await.unwrap(), "42");
        ws
    }
}

/// Runs `revoke`, then waits for `ws` to close; fails past the deadline
/// plus slack. Prints and returns the time from the revoking call to the
/// close.
async fn closed_after(
    what: &str,
    ws: &mut Channels,
    revoke: impl std::future::Future<Output = ()>,
) -> Duration {
    let started = Instant::now();
    revoke.await;
    let answered = started.elapsed();
    let closed = kernel::closes_within(ws, DEADLINE + SLACK).await;
    let took = started.elapsed();
    let state = if closed.is_some() {
        "closed"
    } else {
        "was still open"
    };
    println!(
        "{what}: the kernel WebSocket {state} {took:?} after the call (which answered in {answered:?})"
    );
    assert!(
        closed.is_some(),
        "{what}: the kernel WebSocket was still open after {took:?}"
    );
    assert!(
        took <= DEADLINE + SLACK,
        "{what}: closed only after {took:?}"
    );
    took
}

#[tokio::test(flavor = "multi_thread")]
async fn logging_out_closes_the_kernel_websocket_and_the_cookie_opens_no_new_one() {
    let f = Fixture::new().await;
    let mut ws = f.open_kernel(&f.cookie).await;

    closed_after("logout", &mut ws, async {
        let (status, body) = f.user.post("/api/v1/auth/logout", json!({})).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    })
    .await;

    // A new connection with the revoked login session's cookie is refused.
    let again = kernel::connect(&f.channels, f.stack.gateway().addr(), &f.cookie).await;
    let Err(refused) = again else {
        panic!("a revoked cookie opened a kernel");
    };
    assert!(format!("{refused:#}").contains("401"), "{refused:#}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_admin_disabling_the_account_closes_its_kernel_websocket() {
    let f = Fixture::new().await;
    let admin = f.stack.admin().await;
    let mut ws = f.open_kernel(&f.cookie).await;

    closed_after("account disabled", &mut ws, async {
        admin
            .patch_json(
                &format!("/api/v1/admin/users/{}", f.user.id),
                json!({"disabled": true}),
            )
            .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_password_change_closes_the_other_login_sessions_websockets_only() {
    let f = Fixture::new().await;
    let mut elsewhere = f.open_kernel(&f.cookie).await;
    let here = f.stack.logged_in(&f.user.email, &f.user.password).await;
    let mut kept = f.open_kernel(&f.enter_as(&here).await).await;

    closed_after("password changed", &mut elsewhere, async {
        here.post_json(
            "/api/v1/auth/password",
            json!({"current_password": here.password, "new_password": "another long password 42"}),
        )
        .await;
    })
    .await;
    assert_eq!(
        kernel::run(&mut kept, "1+1").await.unwrap(),
        "2",
        "the login session that changed the password keeps its kernel"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn stopping_the_session_closes_its_kernel_websocket() {
    let f = Fixture::new().await;
    let mut ws = f.open_kernel(&f.cookie).await;

    closed_after("session stopped", &mut ws, async {
        let (status, body) = f
            .user
            .post(&format!("/api/v1/sessions/{}/stop", f.sid), json!({}))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn revoking_the_host_closes_the_kernel_websockets_it_serves() {
    let f = Fixture::started(true).await;
    let (host, _) = f.stack.session_row(&f.sid).await;
    let mut ws = f.open_kernel(&f.cookie).await;

    closed_after("host revoked", &mut ws, async {
        let (status, body) = f
            .user
            .post(&format!("/api/v1/hosts/{host}/revoke"), json!({}))
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    })
    .await;

    // And the revoked host serves no new connection.
    let again = kernel::connect(&f.channels, f.stack.gateway().addr(), &f.cookie).await;
    assert!(again.is_err(), "a revoked host's session opened a kernel");
}

#[tokio::test(flavor = "multi_thread")]
async fn other_logouts_leave_an_open_kernel_websocket_alone() {
    let f = Fixture::new().await;
    let mut ws = f.open_kernel(&f.cookie).await;

    // Someone else logs out, and so does another login session of the
    // same user (another browser).
    let stranger = f.stack.new_user().await;
    let (status, _) = stranger.post("/api/v1/auth/logout", json!({})).await;
    assert_eq!(status, StatusCode::OK);
    let other_browser = f.stack.logged_in(&f.user.email, &f.user.password).await;
    let mut other_ws = f.open_kernel(&f.enter_as(&other_browser).await).await;
    closed_after("the other browser's logout", &mut other_ws, async {
        let (status, _) = other_browser.post("/api/v1/auth/logout", json!({})).await;
        assert_eq!(status, StatusCode::OK);
    })
    .await;

    // Past the deadline with slack, this one still runs code.
    assert!(
        kernel::closes_within(&mut ws, DEADLINE + SLACK)
            .await
            .is_none(),
        "a logout of another login session closed this one"
    );
    assert_eq!(kernel::run(&mut ws, "2+3").await.unwrap(), "5");
}

/// An upstream that answers every request with an endless body, a chunk
/// every 50 ms, as a slow download or an event stream would.
async fn endless_upstream() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                if read_request_head(&mut socket).await.is_none() {
                    return;
                }
                let reply = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
                if socket.write_all(reply.as_bytes()).await.is_err() {
                    return;
                }
                while socket.write_all(b"5\r\ntick\n\r\n").await.is_ok() {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread")]
async fn logging_out_ends_a_long_download_too() {
    let stack = TestStack::with_gateway().await.unwrap();
    let port = endless_upstream().await;
    let user = stack.new_user().await;
    let sid = stack.session_for(&user, loopback(port)).await;
    let cookie = stack.enter(&user, &sid).await;
    let response = stack
        .gateway()
        .client(&[&sid], false)
        .get(format!(
            "{}/files/big.csv",
            stack.gateway().session_origin(&sid)
        ))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.bytes_stream();
    assert!(body.next().await.unwrap().is_ok(), "the download flows");

    let started = Instant::now();
    let (status, _) = user.post("/api/v1/auth/logout", json!({})).await;
    assert_eq!(status, StatusCode::OK);
    let ended = tokio::time::timeout(DEADLINE + SLACK, async {
        while let Some(Ok(_)) = body.next().await {}
    })
    .await;
    let took = started.elapsed();
    let state = if ended.is_ok() {
        "ended"
    } else {
        "still flowed"
    };
    println!("logout: the download {state} {took:?} after the call");
    assert!(ended.is_ok(), "the download still flowed after {took:?}");
}
