//! A whole-header deadline. Pingora 0.9.1 times out each read, not the
//! header as a whole, so a client sending one byte every few seconds could
//! hold a connection forever. Every request head on a connection must
//! arrive complete within the limit, or the connection is closed.
//!
//! Pingora keeps an HTTP/1 connection alive inside its own loop, so the
//! stream re-arms itself: after a final response head is written, the next
//! read starts the next request head. A `101 Switching Protocols` ends all
//! of this (WebSocket frames are not HTTP heads), and `1xx` interim answers
//! such as `100 Continue` are followed by a body, not a head.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, SocketDigest, TimingDigest,
};
use pingora::protocols::{Peek, Shutdown, Ssl, Stream, UniqueID, UniqueIDType};
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Wraps a server app so each request head has `limit` to arrive.
pub struct HeaderDeadline<A> {
    pub inner: Arc<A>,
    pub limit: Duration,
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for HeaderDeadline<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        // A reused connection comes back already wrapped: re-arm it for the
        // next request head.
        let stream = if stream.as_any().is::<DeadlineStream>() {
            match stream.into_any().downcast::<DeadlineStream>() {
                Ok(mut wrapped) => {
                    wrapped.arm(self.limit);
                    wrapped as Stream
                }
                Err(_) => return None,
            }
        } else {
            wrap(stream, self.limit)
        };
        self.inner.process_new(stream, shutdown).await
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await
    }
}

/// Wraps a fresh connection; `HeaderDeadline` re-arms it per request.
pub fn wrap(stream: Stream, limit: Duration) -> Stream {
    let mut wrapped = DeadlineStream::new(stream, limit);
    wrapped.arm(limit);
    Box::new(wrapped)
}

#[derive(Debug)]
pub struct DeadlineStream {
    inner: Stream,
    /// A request head is expected or partly read.
    reading_head: bool,
    /// When that head must be complete. The clock starts at the first read
    /// that waits or ends short of the blank line, so a head that arrives in
    /// one read never asks for the time.
    deadline: Option<Instant>,
    /// Wakes a read that waits past the deadline. Created on the first wait
    /// and moved on from then on: most heads arrive in one read and never
    /// touch the timer wheel.
    timer: Option<Pin<Box<Sleep>>>,
    /// The last bytes read, to find `\r\n\r\n` across reads.
    tail: [u8; 3],
    limit: Duration,
    /// A final response head was written: the next read begins a new head.
    answered: bool,
    /// The connection switched protocols; no more heads will come.
    upgraded: bool,
}

impl DeadlineStream {
    fn new(inner: Stream, limit: Duration) -> Self {
        DeadlineStream {
            inner,
            reading_head: false,
            deadline: None,
            timer: None,
            tail: [0; 3],
            limit,
            answered: false,
            upgraded: false,
        }
    }

    fn arm(&mut self, limit: Duration) {
        self.limit = limit;
        self.reading_head = true;
        self.deadline = None;
        self.tail = [0; 3];
        self.answered = false;
    }

    fn head_done(&mut self) {
        self.reading_head = false;
        self.deadline = None;
    }

    fn deadline(&mut self) -> Instant {
        let limit = self.limit;
        *self.deadline.get_or_insert_with(|| Instant::now() + limit)
    }

    fn timed_out() -> std::io::Error {
        metrics::counter!("opencloud_gateway_rejected_requests_total", "reason" => "slow header")
            .increment(1);
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "request head not complete in time",
        )
    }

    /// Notes a write: a response head tells what the next read will be.
    fn wrote(&mut self, bytes: &[u8]) {
        if self.upgraded || !bytes.starts_with(b"HTTP/1.") || bytes.len() < 12 {
            return;
        }
        match &bytes[9..12] {
            b"101" => {
                self.upgraded = true;
                self.head_done();
            }
            code if code[0] == b'1' => {}
            _ => self.answered = true,
        }
    }

    /// Notes bytes read; the head is complete at the first blank line,
    /// which may straddle two reads.
    fn saw(&mut self, bytes: &[u8]) {
        let mut seam = [0u8; 6];
        let start = bytes.len().min(3);
        seam[..3].copy_from_slice(&self.tail);
        seam[3..3 + start].copy_from_slice(&bytes[..start]);
        if has_blank_line(&seam[..3 + start]) || has_blank_line(bytes) {
            self.head_done();
        }
        let from_bytes = bytes.len().min(3);
        let from_tail = 3 - from_bytes;
        self.tail.copy_within(3 - from_tail.., 0);
        self.tail[from_tail..].copy_from_slice(&bytes[bytes.len() - from_bytes..]);
    }
}

/// Whether `bytes` hold `\r\n\r\n`. A head read whole ends with it, so that
/// is looked at first; otherwise every line feed is a candidate end.
fn has_blank_line(bytes: &[u8]) -> bool {
    bytes.ends_with(b"\r\n\r\n")
        || memchr::memchr_iter(b'\n', bytes).any(|at| at >= 3 && &bytes[at - 3..=at] == b"\r\n\r\n")
}

impl AsyncRead for DeadlineStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.answered && !self.upgraded && !self.reading_head {
            let limit = self.limit;
            self.arm(limit);
        }
        if !self.reading_head {
            return Pin::new(&mut self.inner).poll_read(cx, buf);
        }
        // A client that sends a byte at a time never makes a read wait.
        if self.deadline.is_some_and(|due| Instant::now() >= due) {
            return Poll::Ready(Err(Self::timed_out()));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        match polled {
            Poll::Ready(Ok(())) => {
                self.saw(&buf.filled()[before..]);
                if self.reading_head {
                    self.deadline();
                }
            }
            Poll::Pending => {
                let deadline = self.deadline();
                let timer = self
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if timer.deadline() != deadline {
                    timer.as_mut().reset(deadline);
                }
                if timer.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(Self::timed_out()));
                }
            }
            Poll::Ready(Err(_)) => {}
        }
        polled
    }
}

impl AsyncWrite for DeadlineStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.wrote(buf);
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            if let Some(first) = bufs.iter().find(|b| !b.is_empty()) {
                self.wrote(first);
            }
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[async_trait]
impl Shutdown for DeadlineStream {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await
    }
}

impl UniqueID for DeadlineStream {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for DeadlineStream {
    fn get_ssl(&self) -> Option<&pingora::protocols::tls::TlsRef> {
        self.inner.get_ssl()
    }
    fn get_ssl_digest(&self) -> Option<Arc<pingora::protocols::tls::SslDigest>> {
        self.inner.get_ssl_digest()
    }
    fn selected_alpn_proto(&self) -> Option<pingora::protocols::ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for DeadlineStream {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }
    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }
    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for DeadlineStream {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for DeadlineStream {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }
    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

#[async_trait]
impl Peek for DeadlineStream {
    async fn try_peek(&mut self, buf: &mut [u8]) -> std::io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_head_ends_at_the_first_blank_line_even_across_reads() {
        let (client, _server) = tokio::io::duplex(64);
        let mut stream = DeadlineStream::new(Box::new(client), Duration::from_secs(10));
        stream.arm(Duration::from_secs(10));
        stream.saw(b"GET / HTTP/1.1\r\nHost: x\r");
        assert!(stream.reading_head);
        stream.saw(b"\n\r");
        assert!(stream.reading_head);
        stream.saw(b"\nbody");
        assert!(
            !stream.reading_head,
            "armed until the blank line, then released"
        );
        for split in 0..=4 {
            stream.arm(Duration::from_secs(10));
            let (a, b) = b"x\r\n\r\ny".split_at(split + 1);
            stream.saw(b"GET / HTTP/1.1\r\nHost: x");
            stream.saw(a);
            stream.saw(b);
            assert!(!stream.reading_head, "split at {split}");
        }
        stream.arm(Duration::from_secs(10));
        for byte in b"GET / HTTP/1.1\r\nHost: x\r\n\r" {
            stream.saw(std::slice::from_ref(byte));
            assert!(stream.reading_head);
        }
        stream.saw(b"\n");
        assert!(!stream.reading_head, "one byte at a time");
    }

    #[tokio::test]
    async fn a_slow_head_is_cut_off() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (client, mut server) = tokio::io::duplex(64);
        let mut stream = wrap(Box::new(client), Duration::from_millis(200));
        server.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let mut buf = [0u8; 64];
        assert!(stream.read(&mut buf).await.is_ok());
        let err = stream.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
    }

    #[tokio::test]
    async fn the_next_head_on_a_kept_alive_connection_is_timed_too() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (client, mut server) = tokio::io::duplex(1024);
        let mut stream = wrap(Box::new(client), Duration::from_millis(200));
        server
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 256];
        assert!(stream.read(&mut buf).await.unwrap() > 0);
        // Idle between requests is fine until the response is written...
        tokio::time::sleep(Duration::from_millis(300)).await;
        stream
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            .await
            .unwrap();
        // ...then the next head must come in time.
        server.write_all(b"GET /next HTTP/1.1\r\n").await.unwrap();
        assert!(stream.read(&mut buf).await.unwrap() > 0);
        let err = stream.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
    }

    #[tokio::test]
    async fn websockets_and_interim_answers_are_not_timed() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (client, mut server) = tokio::io::duplex(1024);
        let mut stream = wrap(Box::new(client), Duration::from_millis(100));
        server
            .write_all(b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 256];
        assert!(stream.read(&mut buf).await.unwrap() > 0);
        stream
            .write_all(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        server.write_all(b"frame").await.unwrap();
        assert_eq!(
            stream.read(&mut buf).await.unwrap(),
            5,
            "frames flow after the deadline"
        );

        let (client, mut server) = tokio::io::duplex(1024);
        let mut stream = wrap(Box::new(client), Duration::from_millis(100));
        server
            .write_all(b"POST / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n")
            .await
            .unwrap();
        assert!(stream.read(&mut buf).await.unwrap() > 0);
        stream
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        server.write_all(b"body").await.unwrap();
        assert_eq!(
            stream.read(&mut buf).await.unwrap(),
            4,
            "a body after 100 Continue is not a head"
        );
    }
}
