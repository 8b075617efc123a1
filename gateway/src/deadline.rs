//! Time limits on a client connection, kept by the connection's own stream.
//!
//! * A request head must arrive complete within the head limit of its
//!   first byte (of the connection, for the first head). Pingora 0.9.1
//!   times each read, not the head, so a client sending a byte every few
//!   seconds could hold a connection forever.
//! * Otherwise the exchange must keep moving: when no byte has gone either
//!   way for the answer limit while a read waits, the read fails with
//!   [`AnswerTimedOut`]. Mid-request the gateway answers 504 (or, in the
//!   middle of a response, closes); between requests the kept-alive
//!   connection is closed. Pingora's upstream `read_timeout` does the first
//!   with a timer armed and dropped for every upstream read, some 2 200
//!   instructions a request; the gateway keeps it for requests with a body
//!   only, where Pingora may stop reading the client.
//! * After `101 Switching Protocols` there are no limits: WebSocket frames
//!   are not heads, and a WebSocket may stay quiet for as long as it likes.
//!
//! One timer per connection ticks while a read waits, ten ticks to the
//! shorter limit, and the limits count ticks: a request answered in time
//! never arms, moves or drops a timer.
//!
//! Pingora keeps an HTTP/1 connection alive inside its own loop, so the
//! stream tells heads apart itself: after a final response head is written,
//! the next byte read begins the next request head. `1xx` interim answers
//! such as `100 Continue` are followed by a body, not a head.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
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

use crate::hardening::REJECTED_REQUESTS;

/// The `reason` a request head that took too long is counted with.
pub const SLOW_HEADER: &str = "slow header";

/// How long a connection may take for each part of an exchange.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// For a whole request head, from its first byte.
    pub head: Duration,
    /// Without a byte either way at any other time.
    pub answer: Duration,
}

/// Wraps a server app so its connections keep [`Limits`].
pub struct HeaderDeadline<A> {
    pub inner: Arc<A>,
    pub limits: Limits,
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
                    wrapped.begin_head();
                    wrapped as Stream
                }
                Err(_) => return None,
            }
        } else {
            wrap(stream, self.limits)
        };
        self.inner.process_new(stream, shutdown).await
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await
    }
}

/// Wraps a fresh connection, waiting for its first request head.
pub fn wrap(stream: Stream, limits: Limits) -> Stream {
    Box::new(DeadlineStream::new(stream, limits))
}

/// The error a waiting read fails with when an exchange stood still for the
/// answer limit.
#[derive(Debug)]
pub struct AnswerTimedOut;

impl std::fmt::Display for AnswerTimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("nothing moved for the whole read timeout")
    }
}

impl std::error::Error for AnswerTimedOut {}

/// Whether Pingora gave up on a request because its stream said
/// [`AnswerTimedOut`].
pub fn is_answer_timeout(e: &pingora::Error) -> bool {
    e.root_cause()
        .downcast_ref::<std::io::Error>()
        .and_then(|io| io.get_ref())
        .is_some_and(|inner| inner.is::<AnswerTimedOut>())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// A request head is partly read (or, on a new connection, expected).
    Head,
    /// A head is in: the request body and the answer must keep moving,
    /// then the next head must begin.
    Answer,
    /// The connection switched protocols; no more limits.
    Upgraded,
}

#[derive(Debug)]
pub struct DeadlineStream {
    inner: Stream,
    phase: Phase,
    tick: Duration,
    head_ticks: u32,
    answer_ticks: u32,
    /// Ticks so far; they run only while a read waits.
    ticks: u32,
    /// The tick the current head began at.
    head_began: u32,
    /// The tick at which a byte last went either way.
    last_moved: u32,
    /// Created by the first read that waits, then moved on tick by tick.
    timer: Option<Pin<Box<Sleep>>>,
    /// The task the timer wakes when it fires. While the same task waits,
    /// polling the timer again would only register it again.
    timer_wakes: Option<Waker>,
    /// The last bytes read, to find `\r\n\r\n` across reads.
    tail: [u8; 3],
    /// A final response head was written: the next byte read begins a
    /// new head.
    answered: bool,
}

impl DeadlineStream {
    fn new(inner: Stream, limits: Limits) -> Self {
        let tick = (limits.head.min(limits.answer) / 10).max(Duration::from_millis(1));
        let in_ticks = |limit: Duration| limit.as_nanos().div_ceil(tick.as_nanos()) as u32;
        DeadlineStream {
            inner,
            phase: Phase::Head,
            tick,
            head_ticks: in_ticks(limits.head),
            answer_ticks: in_ticks(limits.answer),
            ticks: 0,
            head_began: 0,
            last_moved: 0,
            timer: None,
            timer_wakes: None,
            tail: [0; 3],
            answered: false,
        }
    }

    fn begin_head(&mut self) {
        self.phase = Phase::Head;
        self.head_began = self.ticks;
        self.tail = [0; 3];
        self.answered = false;
    }

    /// Counts the ticks that passed (arming the timer on the first wait)
    /// and says whether the current phase ran out of time.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        if self.phase == Phase::Upgraded {
            return false;
        }
        let tick = self.tick;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(tick)));
        let registered = self
            .timer_wakes
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()));
        if !registered || timer.is_elapsed() {
            while timer.as_mut().poll(cx).is_ready() {
                self.ticks += 1;
                timer.as_mut().reset(Instant::now() + tick);
            }
            if !registered {
                self.timer_wakes = Some(cx.waker().clone());
            }
        }
        // More ticks than the limit holds: more than the limit has passed.
        match self.phase {
            Phase::Head => self.ticks - self.head_began > self.head_ticks,
            Phase::Answer => self.ticks - self.last_moved > self.answer_ticks,
            Phase::Upgraded => false,
        }
    }

    fn timed_out(&self) -> std::io::Error {
        if self.phase == Phase::Answer {
            return std::io::Error::new(std::io::ErrorKind::TimedOut, AnswerTimedOut);
        }
        metrics::counter!(REJECTED_REQUESTS, "reason" => SLOW_HEADER).increment(1);
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "request head not complete in time",
        )
    }

    /// Notes a write: a response head tells what the next read will be.
    fn wrote(&mut self, bytes: &[u8]) {
        self.last_moved = self.ticks;
        if self.phase == Phase::Upgraded || !bytes.starts_with(b"HTTP/1.") || bytes.len() < 12 {
            return;
        }
        match &bytes[9..12] {
            b"101" => self.phase = Phase::Upgraded,
            code if code[0] == b'1' => {}
            _ => self.answered = true,
        }
    }

    /// Notes bytes read; the head is complete at the first blank line,
    /// which may straddle two reads.
    fn saw(&mut self, bytes: &[u8]) {
        self.last_moved = self.ticks;
        if self.phase != Phase::Head {
            return;
        }
        let mut seam = [0u8; 6];
        let start = bytes.len().min(3);
        seam[..3].copy_from_slice(&self.tail);
        seam[3..3 + start].copy_from_slice(&bytes[..start]);
        if has_blank_line(&seam[..3 + start]) || has_blank_line(bytes) {
            self.phase = Phase::Answer;
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
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        match polled {
            Poll::Ready(Ok(())) => {
                let read = &buf.filled()[before..];
                if self.answered && self.phase == Phase::Answer && !read.is_empty() {
                    self.begin_head();
                }
                self.saw(read);
                // A client that trickles a head never makes a read wait.
                if self.phase == Phase::Head && self.timer.is_some() && self.expired(cx) {
                    return Poll::Ready(Err(self.timed_out()));
                }
            }
            Poll::Pending if self.expired(cx) => return Poll::Ready(Err(self.timed_out())),
            _ => {}
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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const LIMITS: Limits = Limits {
        head: Duration::from_millis(200),
        answer: Duration::from_millis(500),
    };

    fn stream() -> (DeadlineStream, tokio::io::DuplexStream) {
        let (client, server) = tokio::io::duplex(1024);
        (DeadlineStream::new(Box::new(client), LIMITS), server)
    }

    /// A fresh stream whose client has sent `head`, already read by the
    /// stream.
    async fn after_head(head: &[u8]) -> (DeadlineStream, tokio::io::DuplexStream) {
        let (mut stream, mut server) = stream();
        send_head(&mut stream, &mut server, head).await;
        (stream, server)
    }

    /// Like [`after_head`], and the stream (as the proxy) has written
    /// `answer` back.
    async fn answered(head: &[u8], answer: &[u8]) -> (DeadlineStream, tokio::io::DuplexStream) {
        let (mut stream, server) = after_head(head).await;
        stream.write_all(answer).await.unwrap();
        (stream, server)
    }

    /// Reads from `stream` for `wait`: nothing may come and nothing may cut
    /// the connection.
    async fn assert_stays_open(stream: &mut DeadlineStream, wait: Duration, what: &str) {
        let mut buf = [0u8; 256];
        let read = tokio::time::timeout(wait, stream.read(&mut buf)).await;
        assert!(read.is_err(), "{what}: {read:?}");
    }

    /// The client sends `head`; the stream reads it.
    async fn send_head(
        stream: &mut (impl AsyncRead + Unpin),
        server: &mut tokio::io::DuplexStream,
        head: &[u8],
    ) {
        server.write_all(head).await.unwrap();
        let mut buf = [0u8; 256];
        assert!(stream.read(&mut buf).await.unwrap() > 0);
    }

    #[tokio::test]
    async fn the_head_ends_at_the_first_blank_line_even_across_reads() {
        let (mut stream, _server) = stream();
        let head = |s: &DeadlineStream| s.phase == Phase::Head;
        stream.saw(b"GET / HTTP/1.1\r\nHost: x\r");
        assert!(head(&stream));
        stream.saw(b"\n\r");
        assert!(head(&stream));
        stream.saw(b"\nbody");
        assert!(!head(&stream), "a head until the blank line, then not");
        for split in 0..=4 {
            stream.begin_head();
            let (a, b) = b"x\r\n\r\ny".split_at(split + 1);
            stream.saw(b"GET / HTTP/1.1\r\nHost: x");
            stream.saw(a);
            stream.saw(b);
            assert!(!head(&stream), "split at {split}");
        }
        stream.begin_head();
        for byte in b"GET / HTTP/1.1\r\nHost: x\r\n\r" {
            stream.saw(std::slice::from_ref(byte));
            assert!(head(&stream));
        }
        stream.saw(b"\n");
        assert!(!head(&stream), "one byte at a time");
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_head_is_cut_off_after_the_head_limit() {
        let (mut stream, mut server) = stream();
        let started = Instant::now();
        server.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let mut buf = [0u8; 64];
        assert!(stream.read(&mut buf).await.is_ok());
        let err = stream.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        assert!(!err.get_ref().is_some_and(|e| e.is::<AnswerTimedOut>()));
        let took = started.elapsed();
        assert!(
            took > LIMITS.head && took <= LIMITS.head * 12 / 10,
            "{took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_next_head_on_a_kept_alive_connection_is_timed_too() {
        let (mut stream, mut server) = answered(
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        )
        .await;
        // Kept alive: waiting for the next head is not a slow head...
        assert_stays_open(&mut stream, LIMITS.head * 2, "still open").await;
        let mut buf = [0u8; 256];
        // ...but once it begins, it must come in time.
        server.write_all(b"GET /next HTTP/1.1\r\n").await.unwrap();
        assert!(stream.read(&mut buf).await.unwrap() > 0);
        let started = Instant::now();
        let err = stream.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        assert!(started.elapsed() <= LIMITS.head * 12 / 10);
    }

    #[tokio::test(start_paused = true)]
    async fn an_exchange_that_stands_still_times_out_with_answer_timed_out() {
        let (mut stream, _server) = after_head(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        let mut buf = [0u8; 256];
        let started = Instant::now();
        let err = stream.read(&mut buf).await.unwrap_err();
        let took = started.elapsed();
        assert!(
            err.get_ref().is_some_and(|e| e.is::<AnswerTimedOut>()),
            "{err:?}"
        );
        assert!(
            took > LIMITS.answer && took <= LIMITS.answer + LIMITS.head / 5,
            "{took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_response_that_keeps_moving_is_never_cut() {
        let (stream, mut server) = stream();
        let (mut reader, mut writer) = tokio::io::split(stream);
        send_head(
            &mut reader,
            &mut server,
            b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n",
        )
        .await;
        // Pingora keeps a read waiting (to notice a client leaving) while
        // it streams the answer, for far longer than either limit.
        let idle_read = tokio::spawn(async move {
            let mut buf = [0u8; 1];
            reader.read(&mut buf).await.map(|_| ())
        });
        writer
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 40\r\n\r\n")
            .await
            .unwrap();
        let drain = tokio::spawn(async move {
            let mut sink = Vec::new();
            server.read_to_end(&mut sink).await.map(|_| sink)
        });
        for _ in 0..40 {
            tokio::time::sleep(LIMITS.head / 2).await;
            writer.write_all(b"x").await.unwrap();
            assert!(!idle_read.is_finished(), "cut while the answer moved");
        }
        idle_read.abort();
        drop(writer);
        drop(drain);
    }

    #[tokio::test(start_paused = true)]
    async fn websockets_and_interim_answers_are_not_timed() {
        let (mut stream, mut server) = answered(
            b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
        )
        .await;
        assert_stays_open(
            &mut stream,
            LIMITS.answer * 10,
            "a quiet WebSocket stays open",
        )
        .await;
        let mut buf = [0u8; 256];
        server.write_all(b"frame").await.unwrap();
        assert_eq!(stream.read(&mut buf).await.unwrap(), 5, "frames still flow");

        let (mut stream, mut server) = answered(
            b"POST / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
            b"HTTP/1.1 100 Continue\r\n\r\n",
        )
        .await;
        server.write_all(b"body").await.unwrap();
        assert_eq!(stream.read(&mut buf).await.unwrap(), 4);
        assert_eq!(
            stream.phase,
            Phase::Answer,
            "a body after 100 Continue is not a head"
        );
    }
}
