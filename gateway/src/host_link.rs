//! The gateway's end of the host link (see `opencloud_protocol::link`): a
//! Pingora connector that opens a TCP connection to the host's link port and
//! runs the handshake before Pingora writes the first request. A peer that
//! cannot prove it holds the host's link key gets nothing: the connection
//! is dropped before any request byte leaves the gateway.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use opencloud_protocol::link::{Hello, LinkKey, MAX_LINE};
use pingora::connectors::L4Connect;
use pingora::protocols::l4::socket::SocketAddr;
use pingora::protocols::l4::stream::Stream;
use pingora::{Error, ErrorType, OrErr, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::table::SessionKey;

/// Connects to one session through its host's link.
pub struct LinkConnector {
    pub host: u64,
    pub sid: SessionKey,
    pub key: Arc<LinkKey>,
    /// TCP connect and handshake together.
    pub timeout: Duration,
}

impl std::fmt::Debug for LinkConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkConnector")
            .field("host", &self.host)
            .field("sid", &self.sid)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl L4Connect for LinkConnector {
    async fn connect(&self, addr: &SocketAddr) -> Result<Stream> {
        let SocketAddr::Inet(inet) = addr else {
            return Error::e_explain(ErrorType::InternalError, "a host link is TCP");
        };
        let tcp = tokio::time::timeout(self.timeout, self.handshake(*inet))
            .await
            .or_err(ErrorType::ConnectTimedout, "host link handshake timed out")
            .inspect_err(|_| refused("timeout"))??;
        Ok(tcp.into())
    }
}

impl LinkConnector {
    async fn handshake(&self, addr: std::net::SocketAddr) -> Result<TcpStream> {
        let mut tcp = TcpStream::connect(addr)
            .await
            .or_err(ErrorType::ConnectRefused, "cannot reach the host link")?;
        tcp.set_nodelay(true)
            .or_err(ErrorType::SocketError, "host link nodelay")?;
        let hello = Hello::new(self.host, &self.sid.sid());
        tcp.write_all(hello.encode().as_bytes())
            .await
            .or_err(ErrorType::WriteError, "host link hello")?;
        let answer = read_line(&mut tcp)
            .await
            .inspect_err(|_| refused("no_answer"))?;
        let proof = hello.check_answer(&self.key, &answer).map_err(|e| {
            refused("bad_proof");
            tracing::warn!(host = self.host, %addr, "host link refused: {e}");
            Error::explain(
                ErrorType::HandshakeError,
                "the host could not prove who it is",
            )
        })?;
        tcp.write_all(proof.as_bytes())
            .await
            .or_err(ErrorType::WriteError, "host link proof")?;
        Ok(tcp)
    }
}

fn refused(reason: &'static str) {
    metrics::counter!("opencloud_gateway_host_link_refusals_total", "reason" => reason)
        .increment(1);
}

/// Reads the host's answer line. The host sends nothing after it until it
/// has our proof, so reading byte chunks never swallows response bytes; a
/// peer that sends more than a line is not speaking the link protocol.
async fn read_line(tcp: &mut TcpStream) -> Result<String> {
    let mut line = Vec::with_capacity(MAX_LINE);
    let mut chunk = [0u8; MAX_LINE];
    loop {
        let n = tcp
            .read(&mut chunk)
            .await
            .or_err(ErrorType::ReadError, "host link answer")?;
        if n == 0 {
            return Error::e_explain(ErrorType::ConnectionClosed, "the host closed the link");
        }
        line.extend_from_slice(&chunk[..n]);
        if let Some(end) = line.iter().position(|&b| b == b'\n') {
            if end + 1 != line.len() {
                return Error::e_explain(ErrorType::HandshakeError, "not a host link answer");
            }
            line.truncate(end);
            return String::from_utf8(line)
                .or_err(ErrorType::HandshakeError, "not a host link answer");
        }
        if line.len() > MAX_LINE {
            return Error::e_explain(ErrorType::HandshakeError, "not a host link answer");
        }
    }
}
