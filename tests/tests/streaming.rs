#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test
//! Bodies stream through the gateway both ways: a large upload or download
//! never sits in the gateway's memory.

use std::time::Instant;

use futures_util::StreamExt;
use opencloud_e2e::upstream::{loopback, read_request_head};
use opencloud_e2e::TestStack;
use reqwest::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const SIZE: u64 = 512 << 20;

/// An upstream that reads (and discards) a request body of any size, then
/// answers with the byte count; `GET /big` streams `SIZE` bytes back.
async fn sink_upstream() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Some(head) = read_request_head(&mut socket).await else {
                    return;
                };
                let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
                if head.starts_with("get /big") {
                    let reply = format!("HTTP/1.1 200 OK\r\nContent-Length: {SIZE}\r\n\r\n");
                    socket.write_all(reply.as_bytes()).await.unwrap();
                    let chunk = vec![b'x'; 1 << 20];
                    for _ in 0..(SIZE >> 20) {
                        if socket.write_all(&chunk).await.is_err() {
                            return;
                        }
                    }
                    return;
                }
                let length: u64 = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                let mut left = length;
                let mut buf = vec![0u8; 1 << 16];
                while left > 0 {
                    let n = socket.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    left -= n as u64;
                }
                let body = length.to_string();
                let reply = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(reply.as_bytes()).await;
            });
        }
    });
    port
}

#[tokio::test]
async fn a_large_upload_and_download_stream_through_without_filling_memory() {
    let stack = TestStack::with_gateway().await.unwrap();
    let port = sink_upstream().await;
    let user = stack.new_user().await;
    let token = user.token.clone();
    let sid = stack.session_for(&user, loopback(port)).await;
    let origin = stack.gateway().session_origin(&sid);
    let client = stack.gateway().client(&[&sid], false);
    let baseline = stack.gateway().rss_kib().unwrap();

    // Upload: a body produced on the fly, 1 MiB at a time.
    let chunks = futures_util::stream::iter(
        (0..(SIZE >> 20)).map(|_| Ok::<_, std::io::Error>(vec![b'y'; 1 << 20])),
    );
    let started = Instant::now();
    let r = client
        .post(format!("{origin}/upload"))
        .bearer_auth(&token)
        .header("content-length", SIZE)
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.text().await.unwrap(),
        SIZE.to_string(),
        "every byte reached the upstream"
    );
    let upload = started.elapsed();
    let after_upload = stack.gateway().rss_kib().unwrap();

    // Download: read it as it comes.
    let started = Instant::now();
    let r = client
        .get(format!("{origin}/big"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let mut received = 0u64;
    let mut stream = r.bytes_stream();
    while let Some(chunk) = stream.next().await {
        received += chunk.unwrap().len() as u64;
    }
    assert_eq!(received, SIZE);
    let download = started.elapsed();
    let after_download = stack.gateway().rss_kib().unwrap();
    println!(
        "512 MiB up in {upload:?}, down in {download:?}; gateway RSS {baseline} KiB → {after_upload} KiB → {after_download} KiB"
    );
    for (what, rss) in [("upload", after_upload), ("download", after_download)] {
        assert!(
            rss < baseline + 64 * 1024,
            "gateway RSS grew by {} KiB during the {what}",
            rss - baseline
        );
    }
}
