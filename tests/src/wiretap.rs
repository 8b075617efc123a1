//! A wiretap in front of the gateway: every byte the gateway sends to a
//! client of the tests (reqwest, WebSocket clients, Chromium) passes through
//! here and is searched for the platform's secrets before the client gets
//! it. A response carrying one is cut off, and the test fails when its
//! gateway goes away, naming the secret and the request it answered.
//!
//! The tap listens where clients expect the gateway (`127.0.0.1:PORT`) and
//! connects to the gateway from the client's own source address, so the
//! gateway sees the same peers it would see without it.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, LazyLock, Mutex, RwLock};

use memchr::memmem::Finder;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

struct Forbidden {
    label: String,
    finder: Finder<'static>,
}

static FORBIDDEN: LazyLock<RwLock<Vec<Forbidden>>> = LazyLock::new(Default::default);

/// Shorter strings would match by chance; every real secret is longer.
const SHORTEST_SECRET: usize = 16;

/// Jupyter's pages carry the server's token in this attribute when it has
/// one; on our sessions it must be absent or empty.
const JUPYTER_TOKEN_ATTRIBUTE: &[u8] = b"data-jupyter-api-token=\"";

/// Adds `secret` to what no response to a client may contain.
pub fn forbid(label: impl Into<String>, secret: &str) {
    if secret.len() < SHORTEST_SECRET {
        return;
    }
    let mut forbidden = FORBIDDEN.write().expect("forbidden secrets");
    if forbidden
        .iter()
        .any(|f| f.finder.needle() == secret.as_bytes())
    {
        return;
    }
    forbidden.push(Forbidden {
        label: label.into(),
        finder: Finder::new(secret.as_bytes()).into_owned(),
    });
}

/// Forbids every secret of a keys file (`secret = "…"`, `signing_key`
/// naming one of them), as `label`.
pub fn forbid_keys_file(label: &str, path: &std::path::Path) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    for line in text.lines() {
        let Some((name, value)) = line.split_once('=') else {
            continue;
        };
        if name.trim() == "secret" {
            forbid(format!("a key of {label}"), value.trim().trim_matches('"'));
        }
    }
}

/// A secret found in what the gateway sent.
#[derive(Clone, Debug)]
pub struct Leak {
    pub what: String,
    /// The request line of the last request on that connection.
    pub answering: String,
}

/// A running tap; stops (and drops every connection) when dropped.
pub struct Wiretap {
    listen: SocketAddr,
    leaks: Arc<Mutex<Vec<Leak>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Wiretap {
    /// Listens on `listen` and relays every connection to `gateway`.
    pub fn start(listen: SocketAddr, gateway: SocketAddr) -> anyhow::Result<Self> {
        let listener = std::net::TcpListener::bind(listen)?;
        listener.set_nonblocking(true)?;
        let leaks: Arc<Mutex<Vec<Leak>>> = Default::default();
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let found = leaks.clone();
        // A thread and runtime of its own: the tap keeps relaying while a
        // test blocks its own runtime, and outlives none of it.
        let thread = std::thread::Builder::new()
            .name("wiretap".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("wiretap runtime");
                runtime.block_on(async move {
                    let listener = TcpListener::from_std(listener).expect("wiretap listener");
                    tokio::select! {
                        _ = stopped => {}
                        _ = accept_all(listener, gateway, found) => {}
                    }
                });
            })?;
        Ok(Self {
            listen,
            leaks,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.listen
    }

    /// The secrets found so far.
    pub fn leaks(&self) -> Vec<Leak> {
        self.leaks.lock().expect("leaks").clone()
    }
}

impl Drop for Wiretap {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let leaks = self.leaks();
        if !leaks.is_empty() && !std::thread::panicking() {
            panic!("the gateway sent secrets to clients: {leaks:#?}");
        }
    }
}

async fn accept_all(listener: TcpListener, gateway: SocketAddr, leaks: Arc<Mutex<Vec<Leak>>>) {
    loop {
        let Ok((client, peer)) = listener.accept().await else {
            continue;
        };
        let leaks = leaks.clone();
        tokio::spawn(async move {
            match connect_from(peer.ip(), gateway).await {
                Ok(upstream) => relay(client, upstream, leaks).await,
                // As close to "connection refused" as an accepted
                // connection gets: a reset.
                Err(_) => reset(client),
            }
        });
    }
}

async fn connect_from(source: IpAddr, gateway: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = match source {
        IpAddr::V4(_) => TcpSocket::new_v4()?,
        IpAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.bind(SocketAddr::new(source, 0))?;
    let stream = socket.connect(gateway).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
}

/// What the client last asked on a connection: its request line.
#[derive(Default)]
struct Asking {
    request_line: String,
}

async fn relay(client: TcpStream, upstream: TcpStream, leaks: Arc<Mutex<Vec<Leak>>>) {
    let _ = client.set_nodelay(true);
    let asking: Arc<Mutex<Asking>> = Default::default();
    let (mut client_read, mut client_write) = client.into_split();
    let (mut upstream_read, mut upstream_write) = upstream.into_split();
    let requests = {
        let asking = asking.clone();
        async move {
            let mut buf = vec![0u8; 16 * 1024];
            while let Ok(n) = client_read.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                note_request(&buf[..n], &mut asking.lock().expect("asking"));
                if upstream_write.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
            let _ = upstream_write.shutdown().await;
        }
    };
    let responses = async move {
        let mut scanner = Scanner::default();
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(n) = upstream_read.read(&mut buf).await {
            if n == 0 {
                break;
            }
            if let Some(what) = scanner.scan(&buf[..n]) {
                let answering = asking.lock().expect("asking").request_line.clone();
                eprintln!("wiretap: the gateway sent {what} answering {answering:?}");
                leaks.lock().expect("leaks").push(Leak { what, answering });
                return true;
            }
            if client_write.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = client_write.shutdown().await;
        false
    };
    tokio::pin!(requests, responses);
    // A leak ends both directions at once; otherwise each side ends when
    // its sender does, as a plain TCP path would.
    tokio::select! {
        cut = &mut responses => if !cut { requests.await },
        () = &mut requests => { responses.await; }
    }
}

fn note_request(bytes: &[u8], asking: &mut Asking) {
    let starts_request = bytes
        .iter()
        .take_while(|b| **b != b' ')
        .all(u8::is_ascii_uppercase)
        && bytes.first().is_some_and(u8::is_ascii_uppercase);
    if !starts_request {
        return;
    }
    let line_end = memchr::memmem::find(bytes, b"\r\n").unwrap_or(bytes.len().min(200));
    asking.request_line = String::from_utf8_lossy(&bytes[..line_end]).into_owned();
}

/// Searches a byte stream for the forbidden secrets, across read
/// boundaries (it keeps the end of what it saw last).
#[derive(Default)]
struct Scanner {
    tail: Vec<u8>,
}

impl Scanner {
    /// What secret `chunk` (after what came before) reveals, if any.
    fn scan(&mut self, chunk: &[u8]) -> Option<String> {
        let mut window = std::mem::take(&mut self.tail);
        window.extend_from_slice(chunk);
        let forbidden = FORBIDDEN.read().expect("forbidden secrets");
        let found = forbidden
            .iter()
            .find(|f| f.finder.find(&window).is_some())
            .map(|f| f.label.clone())
            .or_else(|| jupyter_token(&window));
        let keep = forbidden
            .iter()
            .map(|f| f.finder.needle().len())
            .chain([JUPYTER_TOKEN_ATTRIBUTE.len() + 1])
            .max()
            .unwrap_or(0)
            .min(window.len());
        self.tail = window.split_off(window.len() - keep);
        found
    }
}

/// A Jupyter page that carries a non-empty server token.
fn jupyter_token(window: &[u8]) -> Option<String> {
    memchr::memmem::find_iter(window, JUPYTER_TOKEN_ATTRIBUTE)
        .filter_map(|at| window.get(at + JUPYTER_TOKEN_ATTRIBUTE.len()))
        .any(|next| *next != b'"')
        .then(|| "a Jupyter server token (data-jupyter-api-token)".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-shot server on loopback that answers any request with `answer`.
    async fn answering(answer: Vec<Vec<u8>>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let answer = answer.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = stream.read(&mut buf).await;
                    for part in answer {
                        let _ = stream.write_all(&part).await;
                        stream.flush().await.unwrap();
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    }
                });
            }
        });
        addr
    }

    /// Sends `request` through a tap in front of a server answering
    /// `answer` in parts; what the client received, and the tap's leaks.
    async fn through_tap(answer: Vec<Vec<u8>>, request: &str) -> (Vec<u8>, Vec<Leak>) {
        let server = answering(answer).await;
        let listen = SocketAddr::new(crate::machine::fresh_loopback(), crate::free_port());
        let tap = Wiretap::start(listen, server).unwrap();
        let mut client = TcpStream::connect(tap.addr()).await.unwrap();
        client.write_all(request.as_bytes()).await.unwrap();
        let mut got = Vec::new();
        let _ = client.read_to_end(&mut got).await;
        let leaks = tap.leaks();
        // The test inspects the leaks itself; the tap must not panic on drop.
        tap.leaks.lock().unwrap().clear();
        (got, leaks)
    }

    const GET: &str = "GET /api/x HTTP/1.1\r\nhost: a\r\n\r\n";

    #[tokio::test]
    async fn a_secret_split_across_reads_is_caught_and_cut_off() {
        let secret = crate::unique("platform-secret-for-the-tap-");
        forbid("the tap test's platform secret", &secret);
        let (head, rest) = secret.split_at(10);
        let answer = vec![
            b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nbefore ".to_vec(),
            head.as_bytes().to_vec(),
            rest.as_bytes().to_vec(),
        ];
        let (got, leaks) = through_tap(answer, GET).await;
        assert_eq!(leaks.len(), 1, "{leaks:?}");
        assert_eq!(leaks[0].what, "the tap test's platform secret");
        assert_eq!(leaks[0].answering, "GET /api/x HTTP/1.1");
        assert!(
            !String::from_utf8_lossy(&got).contains(&secret),
            "the client never gets the secret"
        );
    }

    #[tokio::test]
    async fn a_jupyter_token_attribute_counts_only_when_filled() {
        let empty = vec![b"HTTP/1.1 200 OK\r\n\r\n<body data-jupyter-api-token=\"\">".to_vec()];
        let (got, leaks) = through_tap(empty, GET).await;
        assert!(leaks.is_empty(), "{leaks:?}");
        assert!(got.ends_with(b"token=\"\">"));
        let filled = vec![
            b"HTTP/1.1 200 OK\r\n\r\n<body data-jupyter-api-token=\"".to_vec(),
            b"abc\">".to_vec(),
        ];
        let (_, leaks) = through_tap(filled, GET).await;
        assert_eq!(leaks.len(), 1, "{leaks:?}");
    }

    #[tokio::test]
    async fn clean_traffic_passes_unchanged_both_ways() {
        let body = "x".repeat(100_000);
        let answer =
            vec![format!("HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n{body}").into_bytes()];
        let (got, leaks) = through_tap(answer, GET).await;
        assert!(leaks.is_empty());
        assert!(got.ends_with(body.as_bytes()));
    }
}
