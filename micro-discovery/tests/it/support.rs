//! Helpers shared by the tests: waiting with a deadline, and real HTTP servers that can
//! be killed.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use futures_util::StreamExt;
use micro_discovery::{Instance, Watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Polls `condition` until it holds, failing after `within`.
pub(crate) async fn eventually<F, Fut>(within: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if condition().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Reads `watch` until a set satisfies `predicate`, failing after `within`.
pub(crate) async fn watch_until(
    watch: &mut Watch,
    within: Duration,
    what: &str,
    predicate: impl Fn(&[Instance]) -> bool,
) -> Vec<Instance> {
    let deadline = Instant::now() + within;
    loop {
        let item = tokio::time::timeout_at(deadline, watch.next())
            .await
            .unwrap_or_else(|_| panic!("timed out watching for {what}"))
            .expect("watch streams do not end");
        if let Ok(set) = item {
            if predicate(&set) {
                return set;
            }
        }
    }
}

/// The ids of `instances`.
pub(crate) fn ids(instances: &[Instance]) -> Vec<&str> {
    instances.iter().map(|i| i.id.as_str()).collect()
}

/// A real HTTP server (HTTP/1.1 and h2c) on 127.0.0.1:0 that can be killed: its listener and every open
/// connection close at once, as when a process dies.
#[derive(Debug)]
pub(crate) struct Server {
    pub(crate) addr: SocketAddr,
    tasks: JoinSet<()>,
}

impl Server {
    pub(crate) async fn start(router: axum::Router) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::start_on(listener, router)
    }

    /// Serves `router` on `listener` (to come back on the port of a killed server).
    pub(crate) fn start_on(listener: tokio::net::TcpListener, router: axum::Router) -> Self {
        let addr = listener.local_addr().unwrap();
        let mut tasks = JoinSet::new();
        let (conn_tx, mut conn_rx) = tokio::sync::mpsc::unbounded_channel();
        tasks.spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                if conn_tx.send(stream).is_err() {
                    return;
                }
            }
        });
        // Connections run in tasks owned by this set, so that killing the server
        // aborts them too.
        let mut connections = JoinSet::new();
        tasks.spawn(async move {
            while let Some(stream) = conn_rx.recv().await {
                let service = hyper_util::service::TowerToHyperService::new(router.clone());
                connections.spawn(async move {
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(io, service)
                    .await;
                });
            }
        });
        Self { addr, tasks }
    }

    /// Closes the listener and every connection, answering nothing more.
    pub(crate) async fn kill(mut self) {
        self.tasks.shutdown().await;
    }
}
