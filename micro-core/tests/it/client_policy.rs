//! The HTTP client with a resilience policy, against a real hosted service.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::Router;
use micro_core::client::{ErrorKind, HttpClient};
use micro_core::host::{RunningHost, ServiceHost};
use micro_core::resilience::{CircuitBreakerConfig, ResiliencePolicy, RetryConfig};
use micro_core::service::Service;

#[derive(Default)]
struct Calls {
    flaky: AtomicUsize,
    hang: AtomicUsize,
    broken: AtomicUsize,
}

struct Upstream(Arc<Calls>);

impl Service for Upstream {
    fn name(&self) -> &str {
        "it-upstream"
    }

    fn router(&self) -> Router {
        Router::new()
            .route(
                "/flaky",
                get(|State(calls): State<Arc<Calls>>| async move {
                    // Unavailable twice, then fine.
                    match calls.flaky.fetch_add(1, Ordering::SeqCst) {
                        0 | 1 => Err(StatusCode::SERVICE_UNAVAILABLE),
                        _ => Ok("\"ok\""),
                    }
                }),
            )
            .route(
                "/hang",
                post(|State(calls): State<Arc<Calls>>| async move {
                    calls.hang.fetch_add(1, Ordering::SeqCst);
                    std::future::pending::<()>().await;
                }),
            )
            .route(
                "/broken",
                get(|State(calls): State<Arc<Calls>>| async move {
                    calls.broken.fetch_add(1, Ordering::SeqCst);
                    StatusCode::INTERNAL_SERVER_ERROR
                }),
            )
            .with_state(self.0.clone())
    }
}

async fn upstream() -> (RunningHost, String, Arc<Calls>) {
    let calls = Arc::new(Calls::default());
    let running = ServiceHost::builder()
        .service(Upstream(calls.clone()), "127.0.0.1:0".parse().unwrap())
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let url = format!("http://{}", running.local_addr("it-upstream").unwrap());
    (running, url, calls)
}

fn quick_retries() -> RetryConfig {
    RetryConfig::new()
        .max_attempts(3)
        .initial_backoff(Duration::from_millis(1))
        .max_backoff(Duration::from_millis(5))
}

#[tokio::test]
async fn a_retryable_answer_is_retried_until_it_succeeds() {
    let (_host, url, calls) = upstream().await;
    let client = HttpClient::builder(&url)
        .policy("it-flaky", ResiliencePolicy::new().retry(quick_retries()))
        .build()
        .unwrap();
    let answer: String = client.get_json("/flaky").await.unwrap();
    assert_eq!(answer, "ok");
    assert_eq!(calls.flaky.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_post_that_timed_out_is_not_sent_again() {
    let (_host, url, calls) = upstream().await;
    let policy = ResiliencePolicy::new()
        .timeout(Duration::from_millis(100))
        .retry(quick_retries());
    let client = HttpClient::builder(&url)
        .policy("it-hang", policy)
        .build()
        .unwrap();
    let error = client
        .post_json::<_, serde_json::Value>("/hang", &serde_json::json!({}))
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Timeout, "{error}");
    assert!(!error.is_retryable());
    assert_eq!(
        calls.hang.load(Ordering::SeqCst),
        1,
        "the POST was sent again"
    );

    // With an idempotency key the same POST is safe to repeat, and is.
    let error = client
        .request(http::Method::POST, "/hang")
        .idempotency_key("order-1")
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Timeout);
    assert_eq!(calls.hang.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn an_open_breaker_fails_fast_without_calling_the_upstream() {
    let (_host, url, calls) = upstream().await;
    let breaker = CircuitBreakerConfig::new()
        .minimum_calls(4)
        .window_size(4)
        .failure_rate_threshold(0.5);
    let client = HttpClient::builder(&url)
        .policy(
            "it-broken",
            ResiliencePolicy::new().circuit_breaker(breaker),
        )
        .build()
        .unwrap();
    for _ in 0..4 {
        let error = client
            .get_json::<serde_json::Value>("/broken")
            .await
            .unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Status);
    }
    let error = client
        .get_json::<serde_json::Value>("/broken")
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::CircuitOpen, "{error}");
    assert!(!error.is_retryable());
    assert_eq!(calls.broken.load(Ordering::SeqCst), 4);
}
