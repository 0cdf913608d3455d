//! Shutdown triggers: operating system signals for binaries, and a handle for tests and
//! embedders.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::watch;

/// Resolves on the first SIGTERM or SIGINT (Ctrl-C on other platforms).
///
/// Meant for binaries, which pass it to
/// [`RunningHost::run_until`](crate::host::RunningHost::run_until); the host itself never
/// listens for signals unless given this future.
pub async fn signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot listen for ctrl-c");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut stream) => {
                stream.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("received SIGINT, shutting down"),
        () = terminate => tracing::info!("received SIGTERM, shutting down"),
    }
}

/// A cloneable trigger for a shutdown, and a way to wait for it.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use micro_core::shutdown::Shutdown;
///
/// let shutdown = Shutdown::new();
/// let waiter = shutdown.clone();
/// let waiting = tokio::spawn(async move { waiter.wait().await });
/// shutdown.trigger();
/// waiting.await.unwrap();
/// assert!(shutdown.is_triggered());
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Shutdown {
    sender: Arc<watch::Sender<bool>>,
}

impl Shutdown {
    /// Creates a trigger that has not fired.
    pub fn new() -> Self {
        Self {
            sender: Arc::new(watch::channel(false).0),
        }
    }

    /// Fires the trigger. Firing twice is the same as firing once.
    pub fn trigger(&self) {
        self.sender.send_replace(true);
    }

    /// Whether the trigger has fired.
    pub fn is_triggered(&self) -> bool {
        *self.sender.borrow()
    }

    /// Resolves once the trigger has fired (at once if it already has).
    pub fn wait(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut receiver = self.sender.subscribe();
        async move {
            // The sender lives in `self`, which the caller may drop: treat that as "never".
            if receiver.wait_for(|fired| *fired).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}
