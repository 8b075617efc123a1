//! A tiny HTTP upstream that records every request head it receives, to see
//! exactly what the gateway forwards.

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[derive(Clone, Default)]
pub struct Captured(Arc<Mutex<Vec<String>>>);

impl Captured {
    pub fn heads(&self) -> Vec<String> {
        self.0.lock().expect("lock").clone()
    }

    pub fn last(&self) -> String {
        self.heads().pop().unwrap_or_default()
    }
}

/// Listens on a free loopback port; answers every request with `ok` and two
/// cookies, one of them for another domain.
pub async fn capture_upstream() -> (u16, Captured) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let captured = Captured::default();
    let sink = captured.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let sink = sink.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Ok(n) = socket.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head: Vec<u8> = buf.drain(..end + 4).collect();
                        sink.0
                            .lock()
                            .expect("lock")
                            .push(String::from_utf8_lossy(&head).into_owned());
                        let reply = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nSet-Cookie: stolen=1; Domain=nb.localhost; Path=/\r\nSet-Cookie: kept=2; Path=/\r\n\r\nok";
                        if socket.write_all(reply).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    (port, captured)
}
