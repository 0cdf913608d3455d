//! The memory backend: the conformance suite on a paused clock, and its in-process HTTP
//! checks against real servers.

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use micro_discovery::memory::MemoryRegistry;
use micro_discovery::{Discover, HealthStatus, HttpCheck, Instance, Registration, Registry};

use crate::conformance::{conformance_tests, Backend};
use crate::support::{eventually, Server};

pub(crate) struct Memory(MemoryRegistry);

impl Backend for Memory {
    async fn new() -> Self {
        Self(MemoryRegistry::new())
    }

    fn registry(&self) -> Arc<dyn Registry> {
        Arc::new(self.0.clone())
    }

    fn discover(&self) -> Arc<dyn Discover> {
        Arc::new(self.0.clone())
    }

    fn short_ttl(&self) -> Duration {
        Duration::from_secs(10)
    }
}

conformance_tests!(Memory, (start_paused = true));

#[tokio::test]
async fn http_checks_follow_the_instance() {
    let status = Arc::new(std::sync::Mutex::new(StatusCode::OK));
    let answer = status.clone();
    let server = Server::start(Router::new().route(
        "/health",
        get(move || {
            let answer = answer.clone();
            async move { *answer.lock().unwrap() }
        }),
    ))
    .await;
    let registry = MemoryRegistry::new();
    let instance = Instance::from_addr("shipping", server.addr);
    let check = HttpCheck::new(
        format!("http://{}/health", server.addr),
        Duration::from_millis(50),
    );
    registry
        .register(&Registration::new(instance.clone()).http_check(check))
        .await
        .unwrap();
    let health = || async { registry.all_instances("shipping")[0].health };

    *status.lock().unwrap() = StatusCode::TOO_MANY_REQUESTS;
    eventually(Duration::from_secs(5), "warning", || async {
        health().await == HealthStatus::Warning
    })
    .await;
    assert_eq!(registry.instances("shipping").await.unwrap().len(), 1);

    *status.lock().unwrap() = StatusCode::INTERNAL_SERVER_ERROR;
    eventually(Duration::from_secs(5), "critical", || async {
        health().await == HealthStatus::Critical
    })
    .await;
    assert!(registry.instances("shipping").await.unwrap().is_empty());

    *status.lock().unwrap() = StatusCode::OK;
    eventually(Duration::from_secs(5), "passing", || async {
        health().await == HealthStatus::Passing
    })
    .await;

    server.kill().await;
    eventually(
        Duration::from_secs(5),
        "a dead server to turn critical",
        || async { registry.instances("shipping").await.unwrap().is_empty() },
    )
    .await;
}

#[tokio::test]
async fn a_reported_critical_wins_over_a_passing_check() {
    let server = Server::start(Router::new().route("/health", get(|| async { "ok" }))).await;
    let registry = MemoryRegistry::new();
    let instance = Instance::from_addr("billing", server.addr);
    registry
        .register(
            &Registration::new(instance.clone()).http_check(HttpCheck::new(
                format!("http://{}/health", server.addr),
                Duration::from_secs(1),
            )),
        )
        .await
        .unwrap();
    registry
        .report_health("billing", &instance.id, HealthStatus::Critical)
        .await
        .unwrap();
    assert!(registry.instances("billing").await.unwrap().is_empty());
}
