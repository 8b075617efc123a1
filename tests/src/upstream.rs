//! A tiny HTTP upstream that records every request head it receives, to see
//! exactly what the gateway forwards.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Clone, Default)]
pub struct Captured(Arc<Mutex<Vec<String>>>);

impl Captured {
    pub fn heads(&self) -> Vec<String> {
        self.0.lock().expect("lock").clone()
    }

    pub fn last(&self) -> String {
        self.heads().pop().unwrap_or_default()
    }

    /// The heads the gateway forwarded to the upstream on `port`: its
    /// health probes, sent straight to `127.0.0.1:port`, left out.
    pub fn forwarded(&self, port: u16) -> Vec<String> {
        let probe = format!("host: 127.0.0.1:{port}");
        self.heads()
            .into_iter()
            .filter(|h| !h.to_ascii_lowercase().contains(&probe))
            .collect()
    }
}

/// Listens on a free loopback port; answers every request with `ok` and two
/// cookies, one of them for another domain.
pub async fn capture_upstream() -> (u16, Captured) {
    let upstream = start(bind(0).await, false).await;
    (upstream.port, upstream.captured)
}

/// Like [`capture_upstream`], on a given port (a host coming back).
pub async fn capture_upstream_on(port: u16) -> (u16, Captured) {
    let upstream = start(bind(port).await, false).await;
    (upstream.port, upstream.captured)
}

/// A host that hangs: it records each head and never answers, except the
/// gateway's health probe (`/api/status`), so the host still counts as up.
pub async fn silent_upstream() -> (u16, Captured) {
    let upstream = start(bind(0).await, true).await;
    (upstream.port, upstream.captured)
}

/// A capture upstream that can be taken down like a crashed host.
pub async fn stoppable_upstream() -> Upstream {
    start(bind(0).await, false).await
}

pub struct Upstream {
    pub port: u16,
    pub captured: Captured,
    stop: watch::Sender<bool>,
    open: Arc<AtomicUsize>,
}

impl Upstream {
    /// Closes the listener and every open connection, and waits until the
    /// port refuses connections.
    pub async fn stop(&self) {
        self.stop.send_replace(true);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).await.is_ok()
            || self.open.load(Ordering::SeqCst) > 0
        {
            assert!(Instant::now() < deadline, "the upstream did not stop");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

async fn bind(port: u16) -> TcpListener {
    TcpListener::bind(("127.0.0.1", port)).await.expect("bind")
}

/// Resolves once a stop is requested; never if the sender is gone.
async fn stopped(mut stop: watch::Receiver<bool>) {
    if stop.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

async fn start(listener: TcpListener, silent: bool) -> Upstream {
    let port = listener.local_addr().expect("addr").port();
    let captured = Captured::default();
    let (stop, stop_rx) = watch::channel(false);
    let open = Arc::new(AtomicUsize::new(0));
    let (sink, live) = (captured.clone(), open.clone());
    tokio::spawn(async move {
        loop {
            let socket = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((socket, _)) => socket,
                    Err(_) => return,
                },
                _ = stopped(stop_rx.clone()) => return,
            };
            live.fetch_add(1, Ordering::SeqCst);
            let (sink, live, stop_rx) = (sink.clone(), live.clone(), stop_rx.clone());
            tokio::spawn(async move {
                serve(socket, sink, silent, stop_rx).await;
                live.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    Upstream {
        port,
        captured,
        stop,
        open,
    }
}

/// Answers each request head; on stop, closes between requests (a head
/// already read still gets its answer).
async fn serve(mut socket: TcpStream, sink: Captured, silent: bool, stop: watch::Receiver<bool>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = tokio::select! {
            read = socket.read(&mut chunk) => match read {
                Ok(n) if n > 0 => n,
                _ => return,
            },
            _ = stopped(stop.clone()) => return,
        };
        buf.extend_from_slice(&chunk[..n]);
        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head: Vec<u8> = buf.drain(..end + 4).collect();
            let probe = head.starts_with(b"GET /api/status ");
            sink.0
                .lock()
                .expect("lock")
                .push(String::from_utf8_lossy(&head).into_owned());
            if silent && !probe {
                // Hold the connection open and never answer.
                stopped(stop).await;
                return;
            }
            let reply = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nSet-Cookie: stolen=1; Domain=nb.localhost; Path=/\r\nSet-Cookie: kept=2; Path=/\r\n\r\nok";
            if socket.write_all(reply).await.is_err() {
                return;
            }
        }
    }
}

/// Where a stand-in host's link reaches an upstream on loopback `port`.
pub fn loopback(port: u16) -> crate::stack::Target {
    crate::stack::Target::Tcp(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
}

/// Reads a request head byte by byte (so nothing of the body is taken);
/// `None` when the client closes first.
pub async fn read_request_head(socket: &mut TcpStream) -> Option<Vec<u8>> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if socket.read(&mut byte).await.unwrap_or(0) == 0 {
            return None;
        }
        head.push(byte[0]);
    }
    Some(head)
}
