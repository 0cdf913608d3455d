//! A request enters one hosted service, which calls another through micro-core's client:
//! both hops run in the caller's trace, and the shop's catalog answers through the client.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::get;
use axum::{Json, Router};
use micro_core::client::{ErrorKind, HttpClient};
use micro_core::host::ServiceHost;
use micro_core::service::Service;
use micro_core::trace::TraceContext;
use serde_json::{json, Value};

/// Answers with the trace context it runs in and the one its caller sent.
struct Downstream;

impl Service for Downstream {
    fn name(&self) -> &str {
        "e2e-downstream"
    }

    fn router(&self) -> Router {
        Router::new().route(
            "/whoami",
            get(|headers: HeaderMap| async move {
                let current = TraceContext::current().expect("the host sets a context");
                Json(json!({
                    "received": headers["traceparent"].to_str().unwrap(),
                    "current": current.to_traceparent(),
                }))
            }),
        )
    }
}

/// Calls the downstream service by base URL and returns what it saw.
struct Upstream {
    downstream: HttpClient,
}

impl Service for Upstream {
    fn name(&self) -> &str {
        "e2e-upstream"
    }

    fn router(&self) -> Router {
        Router::new()
            .route(
                "/relay",
                get(|State(client): State<HttpClient>| async move {
                    let seen: Value = client.get_json("/whoami").await.unwrap();
                    let current = TraceContext::current().unwrap();
                    Json(json!({ "downstream": seen, "upstream": current.to_traceparent() }))
                }),
            )
            .with_state(self.downstream.clone())
    }
}

#[tokio::test]
async fn one_trace_runs_through_two_services() {
    let downstream = ServiceHost::builder()
        .service(Downstream, "127.0.0.1:0".parse().unwrap())
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let downstream_url = format!(
        "http://{}",
        downstream.local_addr("e2e-downstream").unwrap()
    );
    let upstream = ServiceHost::builder()
        .service(
            Upstream {
                downstream: HttpClient::new(&downstream_url).unwrap(),
            },
            "127.0.0.1:0".parse().unwrap(),
        )
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let upstream_url = format!("http://{}", upstream.local_addr("e2e-upstream").unwrap());

    let caller = TraceContext::new_root();
    let client = HttpClient::new(&upstream_url).unwrap();
    let answer: Value = caller.scope(client.get_json("/relay")).await.unwrap();

    let hop = |path: &str| {
        let text = answer.pointer(path).and_then(Value::as_str).unwrap();
        TraceContext::parse(text).unwrap()
    };
    let upstream_span = hop("/upstream");
    let received = hop("/downstream/received");
    let downstream_span = hop("/downstream/current");
    for ctx in [upstream_span, received, downstream_span] {
        assert_eq!(ctx.trace_id(), caller.trace_id(), "{answer}");
    }
    // Every hop is a span of its own.
    let spans = [
        caller.span_id(),
        upstream_span.span_id(),
        received.span_id(),
        downstream_span.span_id(),
    ];
    for (i, a) in spans.iter().enumerate() {
        for b in &spans[i + 1..] {
            assert_ne!(a, b, "{answer}");
        }
    }

    upstream.shutdown_trigger().trigger();
    downstream.shutdown_trigger().trigger();
}

#[tokio::test]
async fn the_shop_catalog_answers_through_the_client() {
    let running = ServiceHost::builder()
        .service(
            shop::catalog::Catalog::seeded(),
            "127.0.0.1:0".parse().unwrap(),
        )
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let url = format!("http://{}", running.local_addr("product-service").unwrap());
    let client = HttpClient::new(&url).unwrap();

    let page: Value = client.get_json("/products?q=grinder").await.unwrap();
    assert_eq!(page["total"], 1);
    assert_eq!(page["items"][0]["id"], "SKU-1003");

    let missing = client
        .get_json::<Value>("/products/SKU-0")
        .await
        .unwrap_err();
    assert_eq!(missing.kind(), ErrorKind::Status);
    assert_eq!(missing.status(), Some(http::StatusCode::NOT_FOUND));
    assert_eq!(
        missing.body_json::<Value>().unwrap()["error"]["code"],
        "product_not_found"
    );
    assert!(!missing.is_retryable());

    running.shutdown_trigger().trigger();
}
