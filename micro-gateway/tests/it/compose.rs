//! Composition routes: legs called concurrently, answers merged, failures by leg.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::Path;
use axum::routing::get;
use axum::{Json, Router};
use micro_discovery::memory::MemoryRegistry;
use micro_discovery::{Instance, Registration, Registry};
use micro_gateway::compose::{Composition, Leg};
use micro_gateway::config::{DeclarativeConfig, Resources};
use micro_gateway::gateway::{Gateway, Route};
use micro_gateway::proxy::{Proxy, ProxyConfig, Upstream};
use serde_json::json;

use crate::support::{gateway, get_json, serve_counting};

/// An order service that knows order 42 only, and a payment service that is slow for
/// order 7.
async fn upstreams() -> (std::net::SocketAddr, std::net::SocketAddr) {
    let orders = Router::new().route(
        "/orders/{id}",
        get(|Path(id): Path<u32>| async move {
            if id == 42 || id == 7 {
                Ok(Json(json!({"id": id, "status": "CONFIRMED"})))
            } else {
                Err(http::StatusCode::NOT_FOUND)
            }
        }),
    );
    let payments = Router::new().route(
        "/payments/{id}",
        get(|Path(id): Path<u32>| async move {
            if id == 7 {
                std::future::pending::<()>().await;
            }
            Json(json!({"order": id, "amount": 1999, "currency": "EUR"}))
        }),
    );
    (
        serve_counting(orders).await.addr,
        serve_counting(payments).await.addr,
    )
}

fn proxy(addr: std::net::SocketAddr) -> Proxy {
    Proxy::new(Upstream::from_addr(addr), ProxyConfig::new())
}

fn summary(orders: Proxy, payments: Proxy, payment_optional: bool) -> Router {
    let composition = Composition::new()
        .leg(Leg::new("order", "/orders/{id}", orders))
        .leg(
            Leg::new("payment", "/payments/{id}", payments)
                .optional(payment_optional)
                .timeout(Duration::from_millis(200)),
        );
    Gateway::builder()
        .route(
            Route::new("summary")
                .path("/api/summary/{id}")
                .to(composition),
        )
        .build()
        .unwrap()
        .into_router()
}

fn closed_port() -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

#[tokio::test]
async fn legs_are_merged_under_their_names() {
    let (orders, payments) = upstreams().await;
    let (_host, addr) = gateway(summary(proxy(orders), proxy(payments), true)).await;
    let (status, body) = get_json(addr, "/api/summary/42", &[]).await;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        json!({
            "order": {"id": 42, "status": "CONFIRMED"},
            "payment": {"order": 42, "amount": 1999, "currency": "EUR"},
        })
    );
}

#[tokio::test]
async fn a_failed_optional_leg_leaves_its_part_null() {
    let (orders, payments) = upstreams().await;
    let (_host, addr) = gateway(summary(proxy(orders), proxy(payments), true)).await;
    // Slow: past the leg's timeout.
    let (status, body) = get_json(addr, "/api/summary/7", &[]).await;
    assert_eq!(status, 200);
    assert_eq!(body["order"]["id"], 7);
    assert!(body["payment"].is_null(), "{body}");

    // Down.
    let (_host, addr) = gateway(summary(proxy(orders), proxy(closed_port()), true)).await;
    let (status, body) = get_json(addr, "/api/summary/42", &[]).await;
    assert_eq!(status, 200);
    assert_eq!(body["order"]["id"], 42);
    assert!(body["payment"].is_null(), "{body}");
}

#[tokio::test]
async fn a_failed_required_leg_fails_the_answer_with_its_reason() {
    let (orders, payments) = upstreams().await;
    let (_host, addr) = gateway(summary(proxy(orders), proxy(payments), false)).await;
    let (status, body) = get_json(addr, "/api/summary/1", &[]).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "leg_failed");
    let (status, body) = get_json(addr, "/api/summary/7", &[]).await;
    assert_eq!(status, 504, "{body}");
    assert_eq!(body["error"]["code"], "upstream_timeout");

    let (_host, addr) = gateway(summary(proxy(orders), proxy(closed_port()), false)).await;
    let (status, body) = get_json(addr, "/api/summary/42", &[]).await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["error"]["code"], "upstream_failed");
}

#[tokio::test]
async fn a_config_file_composes_services_found_by_discovery() {
    let (orders, payments) = upstreams().await;
    let registry = MemoryRegistry::new();
    for (service, addr) in [("order-service", orders), ("payment-service", payments)] {
        let instance = Instance::from_addr(service, addr);
        registry
            .register(&Registration::new(instance))
            .await
            .unwrap();
    }
    let yaml = r#"
services:
  - name: orders
    discovery: order-service
    path: /orders
    retries: 2
    balance: { strategy: round_robin }
    routes:
      - paths: [/api/orders]
  - name: payments
    discovery: payment-service
compositions:
  - name: order-summary
    paths: ["/api/order-summary/{id}"]
    legs:
      - { name: order, service: orders, path: "/{id}" }
      - { name: payment, service: payments, path: "/payments/{id}", timeout: 200ms, optional: true }
"#;
    let config = DeclarativeConfig::from_yaml(yaml).unwrap();

    let error = config.build().unwrap_err();
    assert_eq!(error.place(), "services[0]");
    assert!(error.reason().contains("no registry"), "{error}");

    let resources = Resources::new().discover(Arc::new(registry));
    let (_host, addr) = gateway(config.build_with(&resources).unwrap().into_router()).await;
    let (status, body) = get_json(addr, "/api/orders/42", &[]).await;
    assert_eq!(
        (status.as_u16(), &body["status"]),
        (200, &json!("CONFIRMED"))
    );
    let (status, body) = get_json(addr, "/api/order-summary/42", &[]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["payment"]["amount"], 1999);
}

#[test]
fn composition_errors_name_the_leg() {
    let yaml = r#"
services:
  - { name: orders, url: "http://127.0.0.1:1" }
compositions:
  - name: order-summary
    paths: ["/api/order-summary/{id}"]
    legs:
      - { name: order, service: orders, path: "/orders/{id}" }
      - { name: payment, service: payment-service, path: "/payments/{id}" }
"#;
    let error = DeclarativeConfig::from_yaml(yaml)
        .unwrap()
        .build()
        .unwrap_err();
    assert_eq!(error.place(), "compositions[0].legs[1].service");
}

#[tokio::test]
async fn a_leg_goes_through_the_plugins_of_the_service_it_calls() {
    let (orders, payments) = upstreams().await;
    let yaml = format!(
        r#"
services:
  - name: orders
    url: http://{orders}
    routes:
      - paths: [/api/orders]
  - name: payments
    url: http://{payments}
    plugins:
      # Only from the private network: never from this loopback client.
      - name: ip-restriction
        config: {{ allow: [10.0.0.0/8] }}
    routes:
      - paths: [/api/payments]
compositions:
  - name: order-summary
    paths: ["/api/order-summary/{{id}}"]
    legs:
      - {{ name: order, service: orders, path: "/orders/{{id}}" }}
      - {{ name: payment, service: payments, path: "/payments/{{id}}" }}
      - {{ name: maybe, service: payments, path: "/payments/{{id}}", optional: true }}
"#
    );
    let built = DeclarativeConfig::from_yaml(&yaml)
        .unwrap()
        .build()
        .unwrap();
    let (_host, addr) = gateway(built.into_router()).await;

    // The service's own route refuses this client...
    let (status, body) = get_json(addr, "/api/payments/payments/42", &[]).await;
    assert_eq!(status, 403, "{body}");
    // ...and so does the composition's leg to it: the required leg fails the answer.
    let (status, body) = get_json(addr, "/api/order-summary/42", &[]).await;
    assert_eq!(status, 403, "{body}");
}
