//! WebSocket echo server and round-trip load client.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

/// Echoes every text and binary message back on the same connection.
/// Plain HTTP requests (the gateway's host health probe) get `200 ok`.
pub async fn echo(listen: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    loop {
        let (mut stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            match is_upgrade(&stream).await {
                Some(true) => {}
                Some(false) => {
                    let _ = stream
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\nok\n")
                        .await;
                    return;
                }
                None => return,
            }
            let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                return;
            };
            while let Some(Ok(message)) = ws.next().await {
                let reply = match message {
                    Message::Text(_) | Message::Binary(_) => message,
                    Message::Close(_) => break,
                    _ => continue,
                };
                if ws.send(reply).await.is_err() {
                    break;
                }
            }
        });
    }
}

/// Peeks at the request head (without consuming it): is it a WebSocket
/// upgrade? `None` when the peer went away first.
async fn is_upgrade(stream: &TcpStream) -> Option<bool> {
    let mut buf = vec![0u8; 8192];
    loop {
        let n = stream.peek(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        let head = &buf[..n];
        if head.windows(4).any(|w| w == b"\r\n\r\n") || n == buf.len() {
            return Some(
                String::from_utf8_lossy(head)
                    .to_ascii_lowercase()
                    .contains("upgrade: websocket"),
            );
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// `ws-load`: where to connect and how hard to push.
#[derive(clap::Args)]
pub struct LoadOptions {
    /// Where to connect, e.g. 127.0.0.1:9000.
    #[arg(long)]
    pub connect: SocketAddr,
    /// Host header (default: the connect address).
    #[arg(long)]
    pub host: Option<String>,
    #[arg(long)]
    pub cookie: Option<String>,
    #[arg(long, default_value = "/ws")]
    pub path: String,
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Message size in bytes.
    #[arg(long, default_value_t = 128)]
    pub size: usize,
}

/// Opens all connections, then lets each do send-and-wait round trips until
/// the time is up. Prints `msgs_per_s p50_us p99_us errors`, where a
/// message is one round trip (one message each way).
pub async fn load(options: LoadOptions) -> anyhow::Result<()> {
    let host = options
        .host
        .clone()
        .unwrap_or_else(|| options.connect.to_string());
    let mut sockets = Vec::with_capacity(options.connections);
    for _ in 0..options.connections {
        let mut request = format!("ws://{host}{}", options.path).into_client_request()?;
        // As a browser on the session's own page: the gateway refuses a
        // cookie-authenticated upgrade from any other Origin.
        request
            .headers_mut()
            .insert("origin", HeaderValue::from_str(&format!("http://{host}"))?);
        if let Some(cookie) = &options.cookie {
            request
                .headers_mut()
                .insert("cookie", HeaderValue::from_str(cookie)?);
        }
        let stream = TcpStream::connect(options.connect).await?;
        stream.set_nodelay(true)?;
        let (ws, response) = tokio_tungstenite::client_async(request, stream)
            .await
            .context("WebSocket handshake")?;
        anyhow::ensure!(
            response.status().as_u16() == 101,
            "handshake answered {}",
            response.status()
        );
        sockets.push(ws);
    }
    let payload = "x".repeat(options.size);
    let duration = Duration::from_secs_f64(options.seconds);
    let started = Instant::now();
    let deadline = started + duration;
    let tasks: Vec<_> = sockets
        .into_iter()
        .map(|mut ws| {
            let payload = payload.clone();
            tokio::spawn(async move {
                let mut samples: Vec<u32> = Vec::with_capacity(1 << 16);
                let mut errors = 0u64;
                while Instant::now() < deadline {
                    let sent = Instant::now();
                    if ws.send(Message::text(payload.as_str())).await.is_err() {
                        errors += 1;
                        break;
                    }
                    match ws.next().await {
                        Some(Ok(Message::Text(text))) if text.len() == payload.len() => {
                            samples
                                .push(sent.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                        }
                        _ => {
                            errors += 1;
                            break;
                        }
                    }
                }
                let _ = ws.close(None).await;
                (samples, errors)
            })
        })
        .collect();
    let mut all: Vec<u32> = Vec::new();
    let mut errors = 0;
    for task in tasks {
        let (samples, e) = task.await?;
        all.extend(samples);
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_unstable();
    println!(
        "{:.0} {} {} {errors}",
        all.len() as f64 / elapsed,
        crate::stats::nearest_rank(&all, 0.50),
        crate::stats::nearest_rank(&all, 0.99)
    );
    Ok(())
}
