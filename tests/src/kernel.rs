//! A raw Jupyter kernel-channel client: a kernel started over a session's
//! REST API, then one `execute_request` on the shell channel over the
//! kernel WebSocket, reading iopub until the result. The same code runs
//! through the gateway (TCP, cookie) or on a session's Unix socket.

use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// Starts a Python kernel in the session at `origin` (http://…), sending
/// `cookie` and, as a browser does, the page's own `Origin` and Jupyter's
/// XSRF pair; the URL (ws://…) of its channels.
pub async fn start(http: &reqwest::Client, origin: &str, cookie: &str) -> anyhow::Result<String> {
    let xsrf = crate::jupyter::XSRF;
    let kernel: Value = http
        .post(format!("{origin}/api/kernels"))
        .header("cookie", format!("{cookie}; _xsrf={xsrf}"))
        .header("x-xsrftoken", xsrf)
        .header("origin", origin)
        .json(&json!({"name": "python3"}))
        .send()
        .await?
        .json()
        .await?;
    let id = kernel["id"]
        .as_str()
        .with_context(|| format!("no kernel id in {kernel}"))?;
    // http → ws, https → wss.
    Ok(format!("ws{}/api/kernels/{id}/channels", &origin[4..]))
}

/// A kernel's channels, open through the gateway.
pub type Channels =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Connects to `url` (ws://…) through `connect_to` (the gateway's address),
/// sending `cookie` and, as a browser does, the page's own `Origin`.
pub async fn connect(
    url: &str,
    connect_to: std::net::SocketAddr,
    cookie: &str,
) -> anyhow::Result<Channels> {
    connect_trusting(url, connect_to, cookie, None).await
}

/// [`connect`], for a `wss://` URL trusting the CA `ca_pem`.
pub async fn connect_trusting(
    url: &str,
    connect_to: std::net::SocketAddr,
    cookie: &str,
    ca_pem: Option<&str>,
) -> anyhow::Result<Channels> {
    let mut request = url.into_client_request()?;
    request.headers_mut().insert("cookie", cookie.parse()?);
    // ws → http, wss → https.
    let origin = format!("http{}", &url[2..]);
    let origin = origin.split('/').take(3).collect::<Vec<_>>().join("/");
    request.headers_mut().insert("origin", origin.parse()?);
    let tcp = tokio::net::TcpStream::connect(connect_to).await?;
    let connector = ca_pem
        .map(|pem| crate::certs::client_config(pem).map(tokio_tungstenite::Connector::Rustls))
        .transpose()?;
    let (ws, response) =
        tokio_tungstenite::client_async_tls_with_config(request, tcp, None, connector)
            .await
            .context("websocket handshake through the gateway")?;
    if response.status().as_u16() != 101 {
        bail!("handshake answered {}", response.status());
    }
    Ok(ws)
}

/// Connects to `url` (ws://…) through `connect_to` (the gateway's address),
/// sending `cookie`, runs `code` and returns the `text/plain` result.
pub async fn execute(
    url: &str,
    connect_to: std::net::SocketAddr,
    cookie: &str,
    code: &str,
) -> anyhow::Result<String> {
    let mut ws = connect(url, connect_to, cookie).await?;
    run(&mut ws, code).await
}

/// Starts a Python kernel in the Jupyter server on `socket` (the way the
/// host link reaches it); the kernel's id.
pub async fn start_on_socket(socket: &std::path::Path) -> anyhow::Result<String> {
    let kernel = crate::sandbox::unix_request(
        socket,
        "POST",
        "/api/kernels",
        Some(json!({"name": "python3"})),
    )
    .await?
    .1;
    Ok(kernel["id"]
        .as_str()
        .with_context(|| format!("no kernel id in {kernel}"))?
        .to_owned())
}

/// Runs `code` in kernel `id` of the server on `socket`.
pub async fn execute_on_socket(
    socket: &std::path::Path,
    id: &str,
    code: &str,
) -> anyhow::Result<String> {
    let request = format!("ws://localhost/api/kernels/{id}/channels").into_client_request()?;
    let stream = tokio::net::UnixStream::connect(socket).await?;
    let (mut ws, response) = tokio_tungstenite::client_async(request, stream)
        .await
        .context("websocket handshake on the socket")?;
    if response.status().as_u16() != 101 {
        bail!("handshake answered {}", response.status());
    }
    run(&mut ws, code).await
}

/// Runs `code` on open channels and returns the `text/plain` result.
pub async fn run<S>(
    ws: &mut tokio_tungstenite::WebSocketStream<S>,
    code: &str,
) -> anyhow::Result<String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let msg_id = format!("exec-{}", rand::random::<u32>());
    let message = json!({
        "header": {"msg_id": msg_id, "msg_type": "execute_request", "username": "test",
                   "session": "e2e", "date": "2026-01-01T00:00:00Z", "version": "5.3"},
        "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
        "content": {"code": code, "silent": false, "store_history": false,
                    "user_expressions": {}, "allow_stdin": false, "stop_on_error": true}
    });
    ws.send(Message::Text(message.to_string().into())).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let next = tokio::time::timeout_at(deadline, ws.next())
            .await
            .map_err(|_| anyhow!("no result for {code:?} within 60 s"))?
            .ok_or_else(|| anyhow!("websocket closed"))??;
        let Message::Text(text) = next else { continue };
        let reply: Value = serde_json::from_str(&text)?;
        if reply["parent_header"]["msg_id"] != msg_id.as_str() {
            continue;
        }
        match reply["header"]["msg_type"].as_str() {
            Some("execute_result") => {
                return Ok(reply["content"]["data"]["text/plain"]
                    .as_str()
                    .unwrap_or("")
                    .to_owned());
            }
            Some("stream") => {
                return Ok(reply["content"]["text"]
                    .as_str()
                    .unwrap_or("")
                    .trim_end()
                    .to_owned())
            }
            Some("error") => bail!("kernel error: {}", reply["content"]),
            _ => {}
        }
    }
}

/// Reads (and drops) whatever the kernel sends until the channels close;
/// how long that took, or `None` if they were still open after `limit`.
pub async fn closes_within(ws: &mut Channels, limit: Duration) -> Option<Duration> {
    let started = tokio::time::Instant::now();
    let deadline = started + limit;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return None,
            Ok(None | Some(Err(_)) | Some(Ok(Message::Close(_)))) => {
                return Some(started.elapsed())
            }
            Ok(Some(Ok(_))) => {}
        }
    }
}
