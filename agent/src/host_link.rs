//! The host's end of the host link (see `opencloud_protocol::link`): one
//! TCP listener for every session of this host. A gateway proves it holds
//! the link key control issued to this host, the agent proves the same, and
//! then the connection is spliced to the session's Jupyter server, which
//! listens only where the agent can reach it. A plain `GET /healthz`
//! answers `ok` for the gateways' reachability probe; anything else is
//! refused before a byte reaches a session.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use opencloud_protocol::link::{Hello, LinkError, LinkKey, HEALTH_REQUEST_LINE, MAX_LINE};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::sync::watch;

/// A peer gets this long to finish the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Who this host is, as control told it at registration.
#[derive(Clone, Debug)]
pub struct LinkIdentity {
    pub host_id: u64,
    pub key: LinkKey,
}

/// Where a session's server answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// The session's private socket (what the agent's sessions use).
    Unix(PathBuf),
    /// A TCP address (servers started by tests and benchmarks).
    Tcp(SocketAddr),
}

/// The sessions a link may reach: only running ones of this host.
pub trait Sessions: Send + Sync + 'static {
    fn target(&self, sid: &str) -> Option<Target>;
}

/// Serves the link until `stop` turns true. Before `identity` holds a key
/// (the agent has not registered yet) only `/healthz` answers.
pub async fn serve(
    listener: TcpListener,
    identity: watch::Receiver<Option<LinkIdentity>>,
    sessions: Arc<dyn Sessions>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait_for(|s| *s) => return,
        };
        let (tcp, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!("host link accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let identity = identity.borrow().clone();
        let sessions = sessions.clone();
        let mut stopped = stop.clone();
        tokio::spawn(async move {
            // A stopped link ends its open connections too, as a host that
            // goes away does.
            let outcome = tokio::select! {
                outcome = connection(tcp, identity, sessions.as_ref()) => outcome,
                _ = stopped.wait_for(|s| *s) => Outcome::Stopped,
            };
            metrics::counter!("opencloud_agent_link_connections_total", "outcome" => outcome.label())
                .increment(1);
            if let Outcome::Refused(reason) = &outcome {
                tracing::warn!(%peer, "host link refused: {reason}");
            }
        });
    }
}

enum Outcome {
    Health,
    Spliced,
    Stopped,
    NoSession,
    Refused(String),
}

impl Outcome {
    fn label(&self) -> &'static str {
        match self {
            Outcome::Health => "health",
            Outcome::Spliced => "spliced",
            Outcome::Stopped => "stopped",
            Outcome::NoSession => "no_session",
            Outcome::Refused(_) => "refused",
        }
    }
}

async fn connection(
    mut tcp: TcpStream,
    identity: Option<LinkIdentity>,
    sessions: &dyn Sessions,
) -> Outcome {
    let _ = tcp.set_nodelay(true);
    let accepted = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&mut tcp, identity)).await;
    let (sid, early) = match accepted {
        Ok(Ok(Handshake::Health)) => return Outcome::Health,
        Ok(Ok(Handshake::Link { sid, early })) => (sid, early),
        Ok(Err(reason)) => return Outcome::Refused(reason),
        Err(_) => return Outcome::Refused("handshake timed out".into()),
    };
    let Some(target) = sessions.target(&sid) else {
        let _ = tcp
            .write_all(
                b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\n\
                  content-length: 41\r\nconnection: close\r\n\r\n\
                  this session is not running on this host\n",
            )
            .await;
        return Outcome::NoSession;
    };
    let spliced = match &target {
        Target::Unix(path) => match UnixStream::connect(path).await {
            Ok(upstream) => splice(tcp, upstream, &early).await,
            Err(e) => Err(e),
        },
        Target::Tcp(addr) => match TcpStream::connect(addr).await {
            Ok(upstream) => {
                let _ = upstream.set_nodelay(true);
                splice(tcp, upstream, &early).await
            }
            Err(e) => Err(e),
        },
    };
    match spliced {
        Ok(()) => Outcome::Spliced,
        // The server closed or went away: the gateway sees the connection
        // end, like any upstream that stopped.
        Err(e) => {
            tracing::debug!(sid, "host link to {target:?}: {e}");
            Outcome::Spliced
        }
    }
}

enum Handshake {
    Health,
    /// Proved; `early` is what the gateway sent after its proof (the start
    /// of its first request).
    Link {
        sid: String,
        early: Vec<u8>,
    },
}

async fn handshake(
    tcp: &mut TcpStream,
    identity: Option<LinkIdentity>,
) -> Result<Handshake, String> {
    let mut buffer = Vec::with_capacity(MAX_LINE);
    let first = read_line(tcp, &mut buffer).await?;
    if first == HEALTH_REQUEST_LINE {
        let _ = tcp
            .write_all(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\
                  content-length: 3\r\nconnection: close\r\n\r\nok\n",
            )
            .await;
        return Ok(Handshake::Health);
    }
    let hello = match Hello::parse(&first) {
        Ok(hello) => hello,
        Err(LinkError::NotALink) => {
            let _ = tcp
                .write_all(
                    b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                )
                .await;
            return Err("not a host link handshake".into());
        }
        Err(e) => return Err(e.to_string()),
    };
    let Some(identity) = identity else {
        return Err("not registered with control yet".into());
    };
    if hello.host != identity.host_id {
        return Err(format!(
            "the gateway asked for host {}, this is host {}",
            hello.host, identity.host_id
        ));
    }
    let answer = hello.answer(&identity.key);
    tcp.write_all(answer.encode().as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let proof = read_line(tcp, &mut buffer).await?;
    hello
        .check_gateway_proof(&identity.key, &answer, &proof)
        .map_err(|e| e.to_string())?;
    Ok(Handshake::Link {
        sid: hello.sid,
        early: buffer,
    })
}

/// Takes one line (without its newline) off the front of `buffer`, reading
/// more as needed; what follows the line stays in `buffer`.
async fn read_line(tcp: &mut TcpStream, buffer: &mut Vec<u8>) -> Result<String, String> {
    loop {
        if let Some(end) = buffer.iter().position(|&b| b == b'\n') {
            let mut line: Vec<u8> = buffer.drain(..=end).collect();
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            return String::from_utf8(line).map_err(|_| "a handshake line is text".into());
        }
        if buffer.len() > MAX_LINE {
            return Err("handshake line too long".into());
        }
        let mut chunk = [0u8; MAX_LINE];
        let n = tcp.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("closed during the handshake".into());
        }
        buffer.extend_from_slice(&chunk[..n]);
    }
}

/// Copies both ways until either side closes.
async fn splice<U>(mut tcp: TcpStream, mut upstream: U, early: &[u8]) -> std::io::Result<()>
where
    U: AsyncRead + AsyncWrite + Unpin,
{
    upstream.write_all(early).await?;
    tokio::io::copy_bidirectional(&mut tcp, &mut upstream).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use tokio::io::AsyncBufReadExt;

    const SID: &str = "abcdefghijklmnopqrstuvwxyz";

    struct Fixed(HashMap<String, Target>);

    impl Sessions for Fixed {
        fn target(&self, sid: &str) -> Option<Target> {
            self.0.get(sid).cloned()
        }
    }

    /// An upstream that answers every connection with one fixed response.
    async fn upstream(body: &'static str) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                let mut request = vec![0u8; 1024];
                let _ = tcp.read(&mut request).await;
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tcp.write_all(answer.as_bytes()).await;
            }
        });
        addr
    }

    async fn link(key: &LinkKey, host_id: u64) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let target = upstream("secret notebook").await;
        let sessions = Fixed(HashMap::from([(SID.to_owned(), Target::Tcp(target))]));
        let identity = LinkIdentity {
            host_id,
            key: key.clone(),
        };
        let (_, identity) = watch::channel(Some(identity));
        let (stop_tx, stop) = watch::channel(false);
        std::mem::forget(stop_tx);
        tokio::spawn(serve(listener, identity, Arc::new(sessions), stop));
        addr
    }

    /// Runs the gateway's side of the handshake with `key`, then sends one
    /// request; returns everything the link sent back.
    async fn as_gateway(addr: SocketAddr, host: u64, sid: &str, key: &LinkKey) -> String {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let mut tcp = tokio::io::BufReader::new(tcp);
        let hello = Hello::new(host, sid);
        tcp.get_mut()
            .write_all(hello.encode().as_bytes())
            .await
            .unwrap();
        let mut answer = String::new();
        tcp.read_line(&mut answer).await.unwrap();
        let proof = match hello.check_answer(key, answer.trim_end()) {
            Ok(proof) => proof,
            // A gateway without the key: try a made-up proof.
            Err(_) => format!("{}\n", "0".repeat(64)),
        };
        let request = format!("{proof}GET /api/contents HTTP/1.1\r\nhost: x\r\n\r\n");
        let _ = tcp.get_mut().write_all(request.as_bytes()).await;
        let mut rest = String::new();
        let _ = tcp.read_to_string(&mut rest).await;
        rest
    }

    #[tokio::test]
    async fn a_gateway_with_the_key_reaches_the_session() {
        let key = LinkKey::generate();
        let addr = link(&key, 7).await;
        let answer = as_gateway(addr, 7, SID, &key).await;
        assert!(answer.ends_with("secret notebook"), "{answer}");
    }

    #[tokio::test]
    async fn a_gateway_without_the_key_gets_nothing() {
        let addr = link(&LinkKey::generate(), 7).await;
        let answer = as_gateway(addr, 7, SID, &LinkKey::generate()).await;
        assert_eq!(answer, "");
    }

    #[tokio::test]
    async fn a_gateway_meaning_another_host_gets_no_answer() {
        let key = LinkKey::generate();
        let addr = link(&key, 7).await;
        let answer = as_gateway(addr, 8, SID, &key).await;
        assert_eq!(answer, "");
    }

    #[tokio::test]
    async fn an_unknown_session_gets_a_plain_refusal() {
        let key = LinkKey::generate();
        let addr = link(&key, 7).await;
        let answer = as_gateway(addr, 7, "bbcdefghijklmnopqrstuvwxyz", &key).await;
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        assert!(!answer.contains("secret notebook"));
    }

    #[tokio::test]
    async fn health_answers_and_plain_http_is_refused() {
        let addr = link(&LinkKey::generate(), 7).await;
        for (request, expected) in [
            (
                "GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n",
                "HTTP/1.1 200 OK",
            ),
            (
                "GET /api/contents HTTP/1.1\r\nhost: x\r\n\r\n",
                "HTTP/1.1 400",
            ),
        ] {
            let mut tcp = TcpStream::connect(addr).await.unwrap();
            tcp.write_all(request.as_bytes()).await.unwrap();
            let mut answer = String::new();
            tcp.read_to_string(&mut answer).await.unwrap();
            assert!(answer.starts_with(expected), "{request}: {answer}");
            assert!(!answer.contains("secret notebook"));
        }
    }
}
