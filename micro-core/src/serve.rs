//! The accept loop of one listener, with a graceful drain bounded by a deadline.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tower::ServiceExt;

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
    stop: impl Future<Output = ()>,
    drain_timeout: Duration,
) -> Drained {
    let builder = auto::Builder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    // Nagle only adds latency to small request/response exchanges.
                    let _ = stream.set_nodelay(true);
                    let app = app.clone();
                    let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
                        request.extensions_mut().insert(ConnectInfo(peer));
                        app.clone().oneshot(request)
                    });
                    let connection = builder
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .into_owned();
                    let connection = graceful.watch(connection);
                    connections.spawn(async move {
                        if let Err(error) = connection.await {
                            tracing::debug!(%peer, error = %error, "connection ended with an error");
                        }
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
    let local_drain = tokio::time::timeout(drain_timeout, graceful.shutdown()).await;
    let mut drained = Drained::default();
    if local_drain.is_err() {
        connections.abort_all();
    }
    while let Some(joined) = connections.join_next().await {
        if matches!(joined, Err(ref error) if error.is_cancelled()) {
            drained.aborted += 1;
        }
    }
    drained
}

/// Binds `addr`, returning the listener and the address it really got (port 0 picks one).
pub(crate) async fn bind(addr: SocketAddr) -> std::io::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}
