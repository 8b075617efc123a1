//! A real session through the real control and gateway: the same steps a
//! user takes (register, log in, create a project), the session recorded
//! with `opencloud_e2e::external::register_external`, entered through
//! the ticket URL control hands out. The stand-in host's link (the agent's
//! own link code) runs in this process, so the gateway reaches the upstream
//! through a real host link hop, as it reaches a real session.

use std::io::Write;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use opencloud_agent::host_link::Target;
use opencloud_protocol::token::{self, Claims};
use opencloud_protocol::Keyring;
use reqwest::header::{LOCATION, SET_COOKIE};
use reqwest::StatusCode;
use serde_json::{json, Value};

pub const PASSWORD: &str = "bench password 1234";

fn client(
    gateway: SocketAddr,
    sid: Option<&str>,
    ca: Option<&reqwest::Certificate>,
) -> anyhow::Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .resolve("localhost", gateway);
    if let Some(sid) = sid {
        builder = builder.resolve(&format!("{sid}.nb.localhost"), gateway);
    }
    if let Some(ca) = ca {
        builder = builder.add_root_certificate(ca.clone());
    }
    Ok(builder.build()?)
}

async fn json_of(
    response: reqwest::Response,
    what: &str,
    want: StatusCode,
) -> anyhow::Result<Value> {
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    if status != want {
        bail!("{what}: {status}: {text}");
    }
    serde_json::from_str(&text).with_context(|| format!("{what}: not JSON: {text}"))
}

/// Registers `email` (password [`PASSWORD`]) on `platform` with `http`
/// and logs in: the user's id and token.
pub async fn sign_up(
    http: &reqwest::Client,
    platform: &str,
    email: &str,
) -> anyhow::Result<(u64, String)> {
    let register = http
        .post(format!("{platform}/api/v1/auth/register"))
        .json(&json!({"email": email, "password": PASSWORD, "name": "Bench User"}))
        .send()
        .await?;
    json_of(register, "register", StatusCode::CREATED).await?;
    let login = http
        .post(format!("{platform}/api/v1/auth/login"))
        .json(&json!({"email": email, "password": PASSWORD}))
        .send()
        .await?;
    let login = json_of(login, "login", StatusCode::OK).await?;
    let token = login["token"]
        .as_str()
        .context("no token in the login answer")?
        .to_owned();
    let user_id = login["user"]["id"]
        .as_u64()
        .context("no user id in the login answer")?;
    Ok((user_id, token))
}

/// Sets the session up, prints `SID=`, `HOST=` and `COOKIE=`, then keeps
/// serving the stand-in host's link until the process is ended (SIGTERM,
/// as bench/lib.sh's cleanup does).
pub async fn session(
    db_url: &str,
    gateway: SocketAddr,
    upstream_port: u16,
    websocket_upstream: bool,
    ca_dir: &std::path::Path,
    tls_ca: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    let port = gateway.port();
    let gateway_ca = tls_ca
        .map(|path| -> anyhow::Result<reqwest::Certificate> {
            Ok(reqwest::Certificate::from_pem(&std::fs::read(path)?)?)
        })
        .transpose()?;
    let scheme = if gateway_ca.is_some() {
        "https"
    } else {
        "http"
    };
    let platform = format!("{scheme}://localhost:{port}");
    let http = client(gateway, None, gateway_ca.as_ref())?;
    let nonce = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos();
    let email = format!("bench-{}-{nonce}@example.com", std::process::id());

    let (user_id, token) = sign_up(&http, &platform, &email).await?;
    let project = http
        .post(format!("{platform}/api/v1/projects"))
        .bearer_auth(&token)
        .json(&json!({"name": "Bench"}))
        .send()
        .await?;
    let project = json_of(project, "create project", StatusCode::CREATED).await?;
    let project_id = project["project"]["id"].as_u64().context("no project id")?;

    let pool = mysql_async::Pool::new(db_url);
    let upstream = SocketAddr::from(([127, 0, 0, 1], upstream_port));
    // Its link stops when this is dropped: it lives until the process ends.
    let host_ca = opencloud_control::host_ca::HostCa::open(ca_dir, opencloud_control::now_unix())
        .context("control's host CA")?;
    let external = opencloud_e2e::external::register_external(
        &pool,
        &host_ca,
        user_id,
        project_id,
        Target::Tcp(upstream),
    )
    .await
    .context("register_external")?;
    pool.disconnect().await?;
    let sid = external.sid().to_owned();
    let host = format!("{sid}.nb.localhost:{port}");
    let origin = format!("{scheme}://{host}");
    let http = client(gateway, Some(&sid), gateway_ca.as_ref())?;

    // The route reaches the gateway through control's watch stream.
    let started = Instant::now();
    loop {
        let status = http
            .get(format!("{origin}/api/status"))
            .bearer_auth(&token)
            .send()
            .await?
            .status();
        if status != StatusCode::NOT_FOUND && status != StatusCode::SERVICE_UNAVAILABLE {
            break;
        }
        if started.elapsed() > Duration::from_secs(20) {
            bail!("the session route did not reach the gateway in 20 s (last status {status})");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let info = http
        .get(format!("{platform}/api/v1/sessions/{sid}"))
        .bearer_auth(&token)
        .send()
        .await?;
    let info = json_of(info, "get session", StatusCode::OK).await?;
    let url = info["url"]
        .as_str()
        .with_context(|| format!("no enter url in {info}"))?;
    let cookie = enter(&http, url).await?;

    if !websocket_upstream {
        let check = http
            .get(format!("{origin}/"))
            .header("cookie", &cookie)
            .send()
            .await?;
        if check.status() != StatusCode::OK {
            bail!("GET / with the session cookie answered {}", check.status());
        }
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "SID={sid}")?;
    writeln!(out, "HOST={host}")?;
    writeln!(out, "LINK={}", external.link_addr)?;
    writeln!(out, "COOKIE={cookie}")?;
    out.flush()?;
    drop(out);
    // The gateway reaches the upstream only through this process's link.
    std::future::pending::<()>().await;
    drop(external);
    Ok(())
}

/// GETs an enter URL; returns the `oc_s=…` pair it sets (`__Host-oc_s` on
/// https).
async fn enter(http: &reqwest::Client, url: &str) -> anyhow::Result<String> {
    let r = http.get(url).send().await?;
    if r.status() != StatusCode::FOUND {
        bail!(
            "enter answered {}: {}",
            r.status(),
            r.text().await.unwrap_or_default()
        );
    }
    if r.headers().get(LOCATION).and_then(|v| v.to_str().ok()) != Some("/lab") {
        bail!("enter did not send the browser to /lab");
    }
    let set_cookie = r
        .headers()
        .get(SET_COOKIE)
        .and_then(|v| v.to_str().ok())
        .context("enter set no cookie")?;
    let pair = set_cookie
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_owned();
    if !pair.starts_with("oc_s=") && !pair.starts_with("__Host-oc_s=") {
        bail!("enter set {set_cookie}, not oc_s");
    }
    Ok(pair)
}

/// Enters `sid` with a ticket signed here (for a gateway whose control is a
/// stand-in, as in `bench/routes`).
pub async fn enter_with_signed_ticket(
    gateway: SocketAddr,
    host: &str,
    keys: &Keyring,
    user_id: u64,
    login_session: &str,
    sid: &str,
) -> anyhow::Result<String> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let ticket = token::sign(keys, &Claims::ticket(user_id, login_session, sid, now));
    let name = host.split(':').next().unwrap_or(host);
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .resolve(name, gateway)
        .build()?;
    enter(&http, &format!("http://{host}/_oc/enter?ticket={ticket}")).await
}
