//! Our own accept loops in front of Pingora's HTTP sessions.
//!
//! We bind the sockets ourselves so that a listener asked for port 0 can report the port it
//! got, and we accept connections ourselves so that every listener enforces what Pingora
//! leaves to its users: a bound on open connections (further clients wait in the kernel's
//! backlog), a deadline for the TLS handshake and the request header, a cap on header size,
//! and a drain on shutdown that stops accepting at once while established connections finish
//! their current request. Pingora then owns each connection: HTTP/1.1 and HTTP/2 framing,
//! keep-alive, and the proxy phases of our services.

use std::future::Future;
use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::apps::ServerApp;
use pingora_core::listeners::tls::Acceptor;
use pingora_core::protocols::l4::stream::Stream as L4Stream;
use pingora_core::protocols::raw_connect::ProxyDigest;
use pingora_core::protocols::tls::SslDigest;
use pingora_core::protocols::{ALPN, Peek, Shutdown, Ssl, Stream, UniqueID, UniqueIDType};
use pingora_core::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, SocketDigest, TimingDigest,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::time::{Instant, Sleep};

use crate::config::Limits;

/// Open connections of one listener, for draining and for metrics.
#[derive(Debug, Default)]
pub struct ConnectionCount(AtomicU64);

impl ConnectionCount {
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Connections the data-plane listeners ended before Pingora served a request on them: what
/// a slow-header (slowloris) or oversized-header flood, or clients that fail TLS, look like.
#[derive(Debug, Default)]
pub struct ConnectionRefusals {
    header_too_large: AtomicU64,
    header_timeout: AtomicU64,
    tls_handshake: AtomicU64,
}

impl ConnectionRefusals {
    /// `(reason, count)` for `isthmus_connections_refused_total{reason}`.
    pub fn counts(&self) -> [(&'static str, u64); 3] {
        [
            (
                "header_too_large",
                self.header_too_large.load(Ordering::Relaxed),
            ),
            (
                "header_timeout",
                self.header_timeout.load(Ordering::Relaxed),
            ),
            ("tls_handshake", self.tls_handshake.load(Ordering::Relaxed)),
        ]
    }

    fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

struct ConnectionGuard(Arc<ConnectionCount>);

impl ConnectionGuard {
    fn new(count: &Arc<ConnectionCount>) -> Self {
        count.0.fetch_add(1, Ordering::Relaxed);
        ConnectionGuard(Arc::clone(count))
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One listener's settings.
pub struct ListenerSettings {
    /// Names the listener in logs.
    pub name: &'static str,
    pub tls: Option<Arc<Acceptor>>,
    pub limits: Limits,
    /// Shared by the data-plane listeners so the bound holds across them.
    pub connections: Arc<Semaphore>,
    /// Slots only connections from this machine may take when `connections` has none left
    /// (the admin listener: the service manager's and the kubelet's probes run here, and
    /// clients elsewhere holding every slot must not fail them). With it, a connection is
    /// accepted first and closed at once when no slot is free for it; without it, accepting
    /// waits for a slot.
    pub loopback_reserve: Option<Arc<Semaphore>>,
    pub open: Arc<ConnectionCount>,
    pub refusals: Arc<ConnectionRefusals>,
}

impl std::fmt::Debug for ListenerSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenerSettings")
            .field("name", &self.name)
            .field("tls", &self.tls.is_some())
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// Accepts connections until `shutdown` turns true, handing each to `app`.
pub async fn accept_loop<A>(
    listener: TcpListener,
    app: Arc<A>,
    settings: ListenerSettings,
    mut shutdown: watch::Receiver<bool>,
) where
    A: ServerApp + Send + Sync + 'static,
{
    loop {
        // Shutdown first: connections waiting in the backlog must not win over it.
        let accepted = tokio::select! {
            biased;
            _ = shutdown.changed() => break,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(listener = settings.name, %error, "accept failed");
                // Out of file descriptors and similar: give other tasks a moment to free some.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // The data plane waits for a free slot with the connection accepted (and accepts no
        // other meanwhile: the rest wait in the backlog), rather than holding a slot while
        // it waits for a connection: the data and plain-HTTP listeners share the slots, and
        // an idle listener holding one would strand it.
        let waited = match settings.loopback_reserve {
            Some(_) => None,
            None => Some(tokio::select! {
                biased;
                _ = shutdown.changed() => break,
                permit = Arc::clone(&settings.connections).acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
            }),
        };
        let permit = match (waited, &settings.loopback_reserve) {
            (Some(permit), _) => permit,
            (None, reserve) => {
                let taken = Arc::clone(&settings.connections)
                    .try_acquire_owned()
                    .or_else(|full| match reserve {
                        Some(reserve) if peer.ip().to_canonical().is_loopback() => {
                            Arc::clone(reserve).try_acquire_owned()
                        }
                        _ => Err(full),
                    });
                match taken {
                    Ok(permit) => permit,
                    Err(_) => {
                        tracing::debug!(listener = settings.name, %peer, "no connection slot free: closed");
                        drop(tcp);
                        continue;
                    }
                }
            }
        };
        let app = Arc::clone(&app);
        let tls = settings.tls.clone();
        let limits = settings.limits;
        let guard = ConnectionGuard::new(&settings.open);
        let refusals = Arc::clone(&settings.refusals);
        let shutdown = shutdown.clone();
        let name = settings.name;
        tokio::spawn(async move {
            let _permit = permit;
            let _guard = guard;
            let _ = tcp.set_nodelay(true);
            let fd = tcp.as_raw_fd();
            let mut l4 = L4Stream::from(tcp);
            l4.set_socket_digest(SocketDigest::from_raw_fd(fd));
            let stream: Stream = match tls {
                Some(acceptor) => {
                    match tokio::time::timeout(
                        limits.header_read_timeout,
                        acceptor.tls_handshake(l4),
                    )
                    .await
                    {
                        Ok(Ok(tls_stream)) => Box::new(tls_stream),
                        Ok(Err(error)) => {
                            ConnectionRefusals::count(&refusals.tls_handshake);
                            tracing::debug!(listener = name, %peer, %error, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            ConnectionRefusals::count(&refusals.tls_handshake);
                            tracing::debug!(listener = name, %peer, "TLS handshake timed out");
                            return;
                        }
                    }
                }
                None => Box::new(l4),
            };
            let http2 = matches!(stream.selected_alpn_proto(), Some(ALPN::H2));
            let stream: Stream = Box::new(GuardedStream::new(stream, &limits, !http2, refusals));
            let mut next = app.process_new(stream, &shutdown).await;
            while let Some(stream) = next {
                next = app.process_new(stream, &shutdown).await;
            }
        });
    }
    tracing::info!(listener = settings.name, "stopped accepting connections");
}

/// Where an HTTP/1 connection is in its request cycle, as seen from its bytes.
#[derive(Debug)]
enum Phase {
    /// Reading a request header: the deadline runs and the bytes are counted.
    Header {
        deadline: Pin<Box<Sleep>>,
        bytes: u64,
        /// Characters on the current header line, carriage returns not counted.
        line_length: u64,
        /// Whether a non-empty line was seen (empty lines before a request are allowed).
        seen_line: bool,
    },
    /// Header complete; the body is read under Pingora's per-read timeout.
    Body,
    /// A response is being written; the next byte read starts the next request.
    Responding,
    /// An HTTP/2 connection until the client's connection preface arrived: under the header
    /// deadline, since Pingora's HTTP/2 handshake has none of its own.
    Preface {
        deadline: Pin<Box<Sleep>>,
        bytes: usize,
    },
    /// Not guarded (HTTP/2 has its own framing and limits; an idle connection is closed by
    /// the server's `h2_idle_timeout`).
    Off,
    /// The header outgrew its cap: a 431 answer is being written, after which the
    /// connection is shut down and Pingora sees `error`.
    Refusing {
        answer: Vec<u8>,
        sent: usize,
        error: Option<io::Error>,
    },
}

/// `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`, which an HTTP/2 client sends first (RFC 9113 3.4).
const HTTP2_PREFACE_BYTES: usize = 24;

/// Bytes an HTTP/1 connection gathers before a write reaches the socket: a response head
/// and a JSON body, or the largest TLS record's plaintext.
pub const WRITE_BUFFER_BYTES: usize = 16 * 1024;

/// A connection that enforces the header deadline and size cap of HTTP/1 requests, and gathers
/// the writes of one HTTP/1 response into as few sends as possible.
///
/// Pingora's HTTP/1 server session writes a response head and its body separately and flushes
/// when a response is complete, after every chunk of a chunked (streamed) body and after every
/// write of a close-delimited one; on a connection it did not accept itself, Pingora has no
/// write buffer, so each write would be a send of its own (and on loopback a wake-up of the
/// peer). Writes are gathered here until Pingora flushes, the buffer is full, or the
/// connection shuts down. HTTP/2 connections pass through: the h2 framing buffers itself.
#[derive(Debug)]
pub struct GuardedStream {
    inner: Stream,
    phase: Phase,
    header_bytes_max: u64,
    header_read_timeout: Duration,
    pending: WriteBuffer,
    refusals: Arc<ConnectionRefusals>,
}

impl GuardedStream {
    pub fn new(
        inner: Stream,
        limits: &Limits,
        enabled: bool,
        refusals: Arc<ConnectionRefusals>,
    ) -> Self {
        let phase = if enabled {
            header_phase(limits.header_read_timeout)
        } else {
            Phase::Preface {
                deadline: Box::pin(tokio::time::sleep_until(
                    Instant::now() + limits.header_read_timeout,
                )),
                bytes: 0,
            }
        };
        GuardedStream {
            inner,
            phase,
            header_bytes_max: limits.header_bytes_max,
            header_read_timeout: limits.header_read_timeout,
            pending: WriteBuffer::new(if enabled { WRITE_BUFFER_BYTES } else { 0 }),
            refusals,
        }
    }

    /// Follows the bytes of a request header to its end (an empty line).
    fn observe_read(&mut self, data: &[u8]) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        if matches!(self.phase, Phase::Responding) {
            self.phase = header_phase(self.header_read_timeout);
        }
        if let Phase::Preface { bytes, .. } = &mut self.phase {
            *bytes += data.len();
            if *bytes >= HTTP2_PREFACE_BYTES {
                self.phase = Phase::Off;
            }
            return Ok(());
        }
        let Phase::Header {
            bytes,
            line_length,
            seen_line,
            ..
        } = &mut self.phase
        else {
            return Ok(());
        };
        for byte in data {
            *bytes += 1;
            match byte {
                b'\r' => {}
                b'\n' if *line_length == 0 && *seen_line => {
                    self.phase = Phase::Body;
                    return Ok(());
                }
                b'\n' => {
                    *seen_line |= *line_length > 0;
                    *line_length = 0;
                }
                _ => *line_length += 1,
            }
            if *bytes > self.header_bytes_max {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("request header larger than {} bytes", self.header_bytes_max),
                ));
            }
        }
        Ok(())
    }

    /// A write is the answer to the request, so the next byte read starts the next request;
    /// except `100 Continue` (written before the body is read, which is still to come).
    fn observe_write(&mut self, data: &[u8]) {
        match self.phase {
            Phase::Body if data.starts_with(b"HTTP/1.1 100 ") => {}
            Phase::Off | Phase::Preface { .. } | Phase::Refusing { .. } => {}
            _ => self.phase = Phase::Responding,
        }
    }

    /// Writes the 431 answer of `Phase::Refusing` and shuts the connection down; then
    /// yields the error that ends Pingora's session. A client that is still sending its
    /// header may see a reset instead: the rest of its bytes are never read.
    fn poll_refuse(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Phase::Refusing {
            answer,
            sent,
            error,
        } = &mut self.phase
        else {
            return Poll::Ready(Ok(()));
        };
        while *sent < answer.len() {
            match ready!(Pin::new(&mut self.inner).poll_write(cx, &answer[*sent..])) {
                Ok(0) | Err(_) => break,
                Ok(written) => *sent += written,
            }
        }
        if *sent == answer.len() {
            let _ = ready!(Pin::new(&mut self.inner).poll_flush(cx));
            let _ = ready!(Pin::new(&mut self.inner).poll_shutdown(cx));
        }
        *sent = answer.len();
        Poll::Ready(Err(error.take().unwrap_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, "request header refused")
        })))
    }
}

/// The whole HTTP/1.1 answer to a header over `limit_bytes`.
fn header_too_large_answer(limit_bytes: u64) -> Vec<u8> {
    let body = crate::error::GatewayError::HeaderTooLarge { limit_bytes }.body_json();
    let mut answer = format!(
        "HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    answer.extend_from_slice(&body);
    answer
}

fn header_phase(timeout: Duration) -> Phase {
    Phase::Header {
        deadline: Box::pin(tokio::time::sleep_until(Instant::now() + timeout)),
        bytes: 0,
        line_length: 0,
        seen_line: false,
    }
}

impl AsyncRead for GuardedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if matches!(this.phase, Phase::Refusing { .. }) {
            return this.poll_refuse(cx);
        }
        if let Phase::Header { deadline, .. } | Phase::Preface { deadline, .. } = &mut this.phase
            && deadline.as_mut().poll(cx).is_ready()
        {
            ConnectionRefusals::count(&this.refusals.header_timeout);
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "request header not received in time",
            )));
        }
        let filled_before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let data = &buf.filled()[filled_before..];
                match this.observe_read(data) {
                    Ok(()) => Poll::Ready(Ok(())),
                    Err(error) => {
                        // None of the oversized header reaches Pingora.
                        buf.set_filled(filled_before);
                        ConnectionRefusals::count(&this.refusals.header_too_large);
                        this.phase = Phase::Refusing {
                            answer: header_too_large_answer(this.header_bytes_max),
                            sent: 0,
                            error: Some(error),
                        };
                        this.poll_refuse(cx)
                    }
                }
            }
            other => other,
        }
    }
}

impl AsyncWrite for GuardedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        this.observe_write(buf);
        this.pending.poll_write(Pin::new(&mut this.inner), cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        this.pending.poll_flush(Pin::new(&mut this.inner), cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.pending.poll_drain(Pin::new(&mut this.inner), cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if let Some(first) = bufs.iter().find(|slice| !slice.is_empty()) {
            this.observe_write(first);
        }
        this.pending
            .poll_write_vectored(Pin::new(&mut this.inner), cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        // Gathered slices are copied into the buffer; large ones pass on as they came.
        true
    }
}

/// Writes gathered in memory until a flush, with the order of bytes kept across partial
/// sends. A capacity of 0 passes every write straight through.
#[derive(Debug)]
pub struct WriteBuffer {
    bytes: Vec<u8>,
    /// Bytes of `bytes` already sent.
    sent: usize,
    capacity: usize,
}

impl WriteBuffer {
    pub fn new(capacity: usize) -> Self {
        WriteBuffer {
            bytes: Vec::new(),
            sent: 0,
            capacity,
        }
    }

    /// Bytes waiting to be sent.
    pub fn len(&self) -> usize {
        self.bytes.len() - self.sent
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sends what is gathered; ready once nothing is left.
    pub fn poll_drain<W: AsyncWrite + ?Sized>(
        &mut self,
        mut inner: Pin<&mut W>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        while self.sent < self.bytes.len() {
            let written = ready!(inner.as_mut().poll_write(cx, &self.bytes[self.sent..]))?;
            if written == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += written;
        }
        // An idle keep-alive connection holds no buffer: hundreds of them would otherwise
        // keep up to 16 KiB each.
        self.bytes = Vec::new();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }

    pub fn poll_write<W: AsyncWrite + ?Sized>(
        &mut self,
        mut inner: Pin<&mut W>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.len() + buf.len() > self.capacity {
            ready!(self.poll_drain(inner.as_mut(), cx))?;
        }
        if buf.len() >= self.capacity {
            return inner.poll_write(cx, buf);
        }
        self.bytes.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    pub fn poll_write_vectored<W: AsyncWrite + ?Sized>(
        &mut self,
        mut inner: Pin<&mut W>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let total: usize = bufs.iter().map(|buf| buf.len()).sum();
        if self.len() + total > self.capacity {
            ready!(self.poll_drain(inner.as_mut(), cx))?;
        }
        if total >= self.capacity {
            return inner.poll_write_vectored(cx, bufs);
        }
        for buf in bufs {
            self.bytes.extend_from_slice(buf);
        }
        Poll::Ready(Ok(total))
    }

    pub fn poll_flush<W: AsyncWrite + ?Sized>(
        &mut self,
        mut inner: Pin<&mut W>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(inner.as_mut(), cx))?;
        inner.poll_flush(cx)
    }
}

#[async_trait]
impl Shutdown for GuardedStream {
    async fn shutdown(&mut self) {
        // What a response left gathered goes out before the connection closes.
        let _ =
            std::future::poll_fn(|cx| self.pending.poll_drain(Pin::new(&mut self.inner), cx)).await;
        self.inner.shutdown().await;
    }
}

impl UniqueID for GuardedStream {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for GuardedStream {
    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for GuardedStream {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }
}

impl GetProxyDigest for GuardedStream {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
}

impl GetSocketDigest for GuardedStream {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }
}

#[async_trait]
impl Peek for GuardedStream {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

#[cfg(test)]
mod tests;
