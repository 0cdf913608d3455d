//! The in-process HTTP health checker behind registered [`HttpCheck`]s, for backends that
//! have no checker of their own (memory, etcd).

use std::future::Future;

use http::{Method, Request};
use micro_core::client::{ErrorKind, HttpClient};
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;

use crate::instance::HealthStatus;
use crate::registry::HttpCheck;

/// A running check; dropping it stops the check.
#[derive(Debug)]
pub(crate) struct Checker {
    task: JoinHandle<()>,
}

impl Drop for Checker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Runs `check` now and then every interval, handing each outcome to `report`, until
/// `report` answers `false` or the checker is dropped. Must be called within a Tokio
/// runtime; the check's URL must have passed [`Registration::validate`](crate::Registration::validate).
pub(crate) fn spawn<F, Fut>(check: &HttpCheck, mut report: F) -> Checker
where
    F: FnMut(HealthStatus) -> Fut + Send + 'static,
    Fut: Future<Output = bool> + Send,
{
    let url = check.http.clone();
    let interval = check.interval;
    let client = url
        .parse::<http::Uri>()
        .ok()
        .and_then(|uri| uri.authority().cloned())
        .and_then(|authority| {
            HttpClient::builder(&format!("http://{authority}"))
                .timeout(check.effective_timeout())
                // A fresh connection per check: a pooled one would hide a listener that
                // stopped accepting.
                .pool_max_idle_per_host(0)
                .build()
                .ok()
        });
    let task = tokio::spawn(async move {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let status = match &client {
                Some(client) => probe(client, &url).await,
                None => HealthStatus::Critical,
            };
            if !report(status).await {
                break;
            }
        }
    });
    Checker { task }
}

async fn probe(client: &HttpClient, url: &str) -> HealthStatus {
    let Ok(request) = Request::builder()
        .method(Method::GET)
        .uri(url)
        .body(bytes::Bytes::new())
    else {
        return HealthStatus::Critical;
    };
    match client.send(request).await {
        Ok(response) => HealthStatus::from_http_status(response.status()),
        Err(err) if err.kind() == ErrorKind::Status => err
            .status()
            .map_or(HealthStatus::Critical, HealthStatus::from_http_status),
        Err(err) => {
            tracing::debug!(%url, error = %err, "health check failed");
            HealthStatus::Critical
        }
    }
}
