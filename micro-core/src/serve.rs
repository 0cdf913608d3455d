//! The accept loop of one listener: the [`ListenerConfig`] limits, TLS termination, and a
//! graceful drain bounded by a deadline.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::Router;
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::{Instant, Sleep};
use tower::ServiceExt;

use crate::listener::ListenerConfig;
use crate::shutdown::Shutdown;
#[cfg(feature = "tls")]
use crate::tls::{PeerCertificate, ServerTls};

/// What a listener does with the bytes of a new connection before HTTP.
#[derive(Clone, Default)]
pub(crate) enum Security {
    /// HTTP straight over TCP.
    #[default]
    Plain,
    /// TLS first, with the certificate current when the connection was accepted.
    #[cfg(feature = "tls")]
    Tls(ServerTls),
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How a drain ended.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Drained {
    /// Connections still busy at the deadline, closed without an answer.
    pub(crate) aborted: usize,
}

/// Serves `app` on `listener` until `stop` resolves, then stops accepting (the listener is
/// closed, so new connections are refused), lets in-flight requests finish for up to
/// `drain_timeout`, and closes whatever is left.
pub(crate) async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ListenerConfig,
    security: Security,
    stop: impl Future<Output = ()>,
    drain_timeout: Duration,
) -> Drained {
    let _reloading: Option<AbortOnDrop> = match &security {
        Security::Plain => None,
        #[cfg(feature = "tls")]
        Security::Tls(tls) => Some(AbortOnDrop(tokio::spawn(tls.clone().watch()))),
    };
    let builder = Arc::new(builder(&limits));
    let limits = Arc::new(limits);
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let draining = Shutdown::new();
    let mut connections = JoinSet::new();
    tokio::pin!(stop);
    loop {
        // Past `max_connections`, no accept is attempted: new connections wait in the
        // kernel's backlog, and the ones being served are left alone.
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            () = &mut stop => break,
        };
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    // Nagle only adds latency to small request/response exchanges.
                    let _ = stream.set_nodelay(true);
                    let connection = Connection {
                        stream,
                        peer,
                        handshake: Handshake::of(&security),
                        app: app.clone(),
                        builder: builder.clone(),
                        limits: limits.clone(),
                    };
                    let draining = draining.clone();
                    connections.spawn(async move {
                        connection.run(draining.wait()).await;
                        drop(permit);
                    });
                }
                Err(error) => {
                    // Running out of file descriptors is transient; spinning on it is not.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            () = &mut stop => break,
        }
    }
    drop(listener);
    draining.trigger();
    let finished = tokio::time::timeout(drain_timeout, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    let mut drained = Drained::default();
    if finished.is_err() {
        connections.abort_all();
        while let Some(joined) = connections.join_next().await {
            if matches!(joined, Err(ref error) if error.is_cancelled()) {
                drained.aborted += 1;
            }
        }
    }
    drained
}

fn builder(limits: &ListenerConfig) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_headers(limits.max_headers)
        .max_buf_size(limits.max_header_bytes);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.http2.max_concurrent_streams)
        .max_header_list_size(limits.http2.max_header_list_size)
        .max_pending_accept_reset_streams(limits.http2.max_pending_accept_reset_streams)
        .max_local_error_reset_streams(limits.http2.max_local_error_reset_streams);
    builder
}

/// The TLS handshake a connection starts with, if any.
enum Handshake {
    None,
    #[cfg(feature = "tls")]
    Tls(tokio_rustls::TlsAcceptor),
}

impl Handshake {
    fn of(security: &Security) -> Self {
        match security {
            Security::Plain => Self::None,
            #[cfg(feature = "tls")]
            Security::Tls(tls) => Self::Tls(tls.acceptor()),
        }
    }
}

struct Connection {
    stream: TcpStream,
    peer: SocketAddr,
    handshake: Handshake,
    app: Router,
    builder: Arc<auto::Builder<TokioExecutor>>,
    limits: Arc<ListenerConfig>,
}

impl Connection {
    /// Serves one connection until it ends, the watchdog closes it, or `drain` resolves
    /// and its in-flight requests finish.
    async fn run(self, drain: impl Future<Output = ()>) {
        let Self {
            stream,
            peer,
            handshake,
            app,
            builder,
            limits,
        } = self;
        let activity = Arc::new(Activity::new());
        let io = Watched {
            inner: stream,
            activity: activity.clone(),
        };
        tokio::pin!(drain);
        let serving = Serving {
            peer,
            app,
            builder,
            limits,
            activity,
        };
        match handshake {
            Handshake::None => serving.serve(io, Extras::default(), drain).await,
            #[cfg(feature = "tls")]
            Handshake::Tls(acceptor) => {
                // The handshake counts against the header-read timeout, so a client that
                // never sends its ClientHello is closed like one that never sends a head.
                let deadline = serving.activity.born + serving.limits.header_read_timeout;
                let handshake = tokio::time::timeout_at(deadline, acceptor.accept(io));
                let stream = tokio::select! {
                    done = handshake => match done {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(error)) => {
                            tracing::debug!(%peer, %error, "tls handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "no tls handshake within the header-read timeout: closing");
                            return;
                        }
                    },
                    () = &mut drain => return,
                };
                let extras = Extras {
                    peer_certificate: stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(PeerCertificate::from_chain),
                };
                serving.serve(stream, extras, drain).await;
            }
        }
    }
}

/// What every request of a connection carries besides its peer address.
#[derive(Clone, Default)]
struct Extras {
    #[cfg(feature = "tls")]
    peer_certificate: Option<PeerCertificate>,
}

/// A connection past its handshake, being served HTTP.
struct Serving {
    peer: SocketAddr,
    app: Router,
    builder: Arc<auto::Builder<TokioExecutor>>,
    limits: Arc<ListenerConfig>,
    activity: Arc<Activity>,
}

impl Serving {
    async fn serve<I, D>(self, io: I, extras: Extras, mut drain: Pin<&mut D>)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        D: Future<Output = ()>,
    {
        let Self {
            peer,
            app,
            builder,
            limits,
            activity,
        } = self;
        #[cfg(not(feature = "tls"))]
        let Extras {} = extras;
        let body_timeout = limits.body_read_timeout;
        let service = {
            let activity = activity.clone();
            hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
                let guard = activity.request_started();
                let mut request = request.map(|body| {
                    if body.is_end_stream() {
                        Body::new(body)
                    } else {
                        Body::new(TimedBody::new(body, body_timeout))
                    }
                });
                request.extensions_mut().insert(ConnectInfo(peer));
                #[cfg(feature = "tls")]
                if let Some(certificate) = &extras.peer_certificate {
                    request.extensions_mut().insert(certificate.clone());
                }
                let response = app.clone().oneshot(request);
                async move {
                    // The request stays in flight while its body streams (a gRPC stream, a
                    // long download), so neither the idle timeout nor the drain cuts it.
                    let response = response.await;
                    response.map(|response| {
                        response.map(|body| {
                            Body::new(GuardedBody {
                                inner: body,
                                _guard: guard,
                            })
                        })
                    })
                }
            })
        };
        let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
        tokio::pin!(connection);
        let watchdog = tokio::time::sleep(limits.header_read_timeout.min(limits.idle_timeout));
        tokio::pin!(watchdog);
        let mut closing = false;
        loop {
            tokio::select! {
                ended = connection.as_mut() => {
                    if let Err(error) = ended {
                        tracing::debug!(%peer, error = %error, "connection ended with an error");
                    }
                    return;
                }
                () = drain.as_mut(), if !closing => {
                    connection.as_mut().graceful_shutdown();
                    closing = true;
                }
                () = watchdog.as_mut() => match activity.check(&limits) {
                    Check::Busy(next) => watchdog.as_mut().reset(next),
                    Check::NoRequest => {
                        tracing::debug!(%peer, "no request head within the header-read timeout: closing");
                        return;
                    }
                    Check::Idle if closing => {
                        tracing::debug!(%peer, "idle connection did not close after GOAWAY: closing");
                        return;
                    }
                    Check::Idle => {
                        tracing::debug!(%peer, "idle timeout: closing");
                        connection.as_mut().graceful_shutdown();
                        closing = true;
                        watchdog.as_mut().reset(Instant::now() + limits.header_read_timeout);
                    }
                },
            }
        }
    }
}

/// What one connection has been doing, for its watchdog.
struct Activity {
    born: Instant,
    /// Milliseconds after `born` of the last byte read or written.
    last_io: AtomicU64,
    in_flight: AtomicUsize,
    started: AtomicBool,
}

enum Check {
    /// Nothing to do before this instant.
    Busy(Instant),
    /// No request began within the header-read timeout (a client stuck before or inside
    /// the protocol preface, which hyper's own header timer does not cover).
    NoRequest,
    /// No request in flight and no bytes moving for the idle timeout.
    Idle,
}

impl Activity {
    fn new() -> Self {
        Self {
            born: Instant::now(),
            last_io: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            started: AtomicBool::new(false),
        }
    }

    fn touch(&self) {
        let elapsed = self.born.elapsed().as_millis();
        self.last_io.store(
            u64::try_from(elapsed).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    fn request_started(self: &Arc<Self>) -> InFlight {
        self.started.store(true, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    fn check(&self, limits: &ListenerConfig) -> Check {
        let now = Instant::now();
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return Check::Busy(now + limits.idle_timeout);
        }
        let started = self.started.load(Ordering::Relaxed);
        let head_deadline = self.born + limits.header_read_timeout;
        if !started && now >= head_deadline {
            return Check::NoRequest;
        }
        let idle_deadline = self.idle_deadline(limits);
        if now >= idle_deadline {
            return Check::Idle;
        }
        // Both deadlines are still ahead, so the watchdog never re-arms in the past.
        if started {
            Check::Busy(idle_deadline)
        } else {
            Check::Busy(idle_deadline.min(head_deadline))
        }
    }

    fn idle_deadline(&self, limits: &ListenerConfig) -> Instant {
        let last = self.born + Duration::from_millis(self.last_io.load(Ordering::Relaxed));
        last + limits.idle_timeout
    }
}

/// Counts a request as in flight until its response body is sent or dropped.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

pin_project! {
    /// A response body that keeps its request in flight until it is dropped.
    struct GuardedBody {
        #[pin]
        inner: Body,
        _guard: InFlight,
    }
}

impl HttpBody for GuardedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pin_project! {
    /// A socket that notes when bytes move, for the idle timeout.
    struct Watched {
        #[pin]
        inner: TcpStream,
        activity: Arc<Activity>,
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let polled = this.inner.poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.touch();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let polled = this.inner.poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let polled = this.inner.poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

/// A request body's client paused longer than the listener's `body_read_timeout`.
#[derive(Debug, thiserror::Error)]
#[error("the client sent no part of the request body for {0:?}")]
pub(crate) struct BodyReadTimeout(Duration);

pin_project! {
    /// A request body that fails when its client pauses longer than `timeout` between
    /// two frames.
    struct TimedBody {
        #[pin]
        inner: Incoming,
        #[pin]
        pause: Sleep,
        timeout: Duration,
    }
}

impl TimedBody {
    fn new(inner: Incoming, timeout: Duration) -> Self {
        Self {
            inner,
            pause: tokio::time::sleep(timeout),
            timeout,
        }
    }
}

impl HttpBody for TimedBody {
    type Data = Bytes;
    type Error = tower::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(frame) => {
                this.pause.as_mut().reset(Instant::now() + *this.timeout);
                Poll::Ready(frame.map(|frame| frame.map_err(Into::into)))
            }
            Poll::Pending => match this.pause.poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(BodyReadTimeout(*this.timeout).into()))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Binds `addr`, returning the listener and the address it really got (port 0 picks one).
pub(crate) async fn bind(addr: SocketAddr) -> std::io::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(activity: &Activity, limits: &ListenerConfig) -> &'static str {
        match activity.check(limits) {
            Check::Busy(next) => {
                assert!(
                    next > Instant::now(),
                    "the watchdog would re-arm in the past"
                );
                "busy"
            }
            Check::NoRequest => "no request",
            Check::Idle => "idle",
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_watchdog_closes_silent_and_idle_connections_and_never_spins() {
        let limits = ListenerConfig::default()
            .header_read_timeout(Duration::from_secs(30))
            .idle_timeout(Duration::from_secs(5));
        let silent = Activity::new();
        assert_eq!(verdict(&silent, &limits), "busy");
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(verdict(&silent, &limits), "idle");

        let limits = limits.idle_timeout(Duration::from_secs(75));
        let silent = Activity::new();
        tokio::time::advance(Duration::from_secs(29)).await;
        assert_eq!(verdict(&silent, &limits), "busy");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(verdict(&silent, &limits), "no request");

        let served = Arc::new(Activity::new());
        let request = served.request_started();
        tokio::time::advance(Duration::from_secs(100)).await;
        assert_eq!(verdict(&served, &limits), "busy", "a request is in flight");
        drop(request);
        tokio::time::advance(Duration::from_secs(74)).await;
        assert_eq!(verdict(&served, &limits), "busy");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(verdict(&served, &limits), "idle");
    }
}
