//! Upstreams found by discovery name: balancing, retries on another instance, 503s.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::routing::{get, post};
use axum::Router;
use micro_core::resilience::CircuitBreakerConfig;
use micro_discovery::balance::{BalanceConfig, Strategy};
use micro_discovery::memory::MemoryRegistry;
use micro_discovery::{Instance, Registration, Registry};
use micro_gateway::proxy::{Proxy, ProxyConfig, Upstream};

use crate::support::{gateway, get_json, send, serve_counting, IntoText};

/// An instance of `product-service` that answers `GET /whoami` with its name.
async fn instance(registry: &MemoryRegistry, name: &'static str) -> std::net::SocketAddr {
    let app = Router::new()
        .route(
            "/v1/whoami",
            get(|State(name): State<&'static str>| async move { name }),
        )
        .route(
            "/v1/orders",
            post(|State(name): State<&'static str>| async move { name }),
        )
        .with_state(name);
    let upstream = serve_counting(app).await;
    register(registry, name, upstream.addr).await;
    upstream.addr
}

async fn register(registry: &MemoryRegistry, id: &str, addr: std::net::SocketAddr) {
    let instance = Instance::new("product-service", id, "127.0.0.1", addr.port());
    registry
        .register(&Registration::new(instance))
        .await
        .unwrap();
}

fn closed_port() -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

fn discovered(registry: &MemoryRegistry, balance: BalanceConfig, config: ProxyConfig) -> Router {
    let proxy = Proxy::discovered(
        Arc::new(registry.clone()),
        "product-service",
        "/v1",
        balance,
        config,
    );
    Router::new().nest_service("/api", proxy)
}

fn round_robin() -> BalanceConfig {
    BalanceConfig::new().strategy(Strategy::RoundRobin)
}

async fn whoami(addr: std::net::SocketAddr) -> (http::StatusCode, String) {
    let request = http::Request::get("/api/whoami")
        .body(Body::empty())
        .unwrap();
    send(addr, request).await.into_text()
}

#[tokio::test]
async fn requests_are_balanced_across_the_registered_instances() {
    let registry = MemoryRegistry::new();
    for name in ["product-1", "product-2", "product-3"] {
        instance(&registry, name).await;
    }
    let router = discovered(&registry, round_robin(), ProxyConfig::new());
    let (_host, addr) = gateway(router).await;

    let mut seen = Vec::new();
    for _ in 0..6 {
        let (status, body) = whoami(addr).await;
        assert_eq!(status, 200, "{body}");
        seen.push(body);
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen, ["product-1", "product-2", "product-3"]);
}

#[tokio::test]
async fn an_idempotent_request_that_fails_to_reach_an_instance_goes_to_another() {
    let registry = MemoryRegistry::new();
    instance(&registry, "product-1").await;
    register(&registry, "product-dead", closed_port()).await;
    // Never ejected, so that every other pick lands on the dead instance.
    let balance = round_robin().consecutive_failures(0);
    let router = discovered(&registry, balance, ProxyConfig::new().retries(1));
    let (_host, addr) = gateway(router).await;

    for _ in 0..6 {
        let (status, body) = whoami(addr).await;
        assert_eq!((status.as_u16(), body.as_str()), (200, "product-1"));
    }
}

#[tokio::test]
async fn a_request_with_a_body_is_never_sent_twice() {
    let registry = MemoryRegistry::new();
    instance(&registry, "product-1").await;
    register(&registry, "product-dead", closed_port()).await;
    let balance = round_robin().consecutive_failures(0);
    let router = discovered(&registry, balance, ProxyConfig::new().retries(3));
    let (_host, addr) = gateway(router).await;

    let mut statuses = Vec::new();
    for _ in 0..4 {
        let request = http::Request::post("/api/orders")
            .body(Body::from("{\"sku\":\"SKU-1\"}"))
            .unwrap();
        statuses.push(send(addr, request).await.0.as_u16());
    }
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 200, 502, 502]);
}

#[tokio::test]
async fn a_service_without_instances_is_a_503() {
    let registry = MemoryRegistry::new();
    let balance = round_robin().resolve_timeout(Duration::from_millis(50));
    let (_host, addr) = gateway(discovered(&registry, balance, ProxyConfig::new())).await;
    let (status, body) = get_json(addr, "/api/whoami", &[]).await;
    assert_eq!(status, 503);
    assert_eq!(body["error"]["code"], "no_healthy_instance");
}

#[tokio::test]
async fn an_open_circuit_breaker_answers_503_without_calling_the_upstream() {
    let breaker = CircuitBreakerConfig::new()
        .failure_rate_threshold(0.5)
        .minimum_calls(2)
        .window_size(4)
        .open_duration(Duration::from_secs(60));
    let config = ProxyConfig::new().circuit_breaker(breaker);
    let proxy = Proxy::new(Upstream::from_addr(closed_port()), config);
    let (_host, addr) = gateway(Router::new().nest_service("/api", proxy)).await;

    for _ in 0..2 {
        let (status, body) = get_json(addr, "/api/whoami", &[]).await;
        assert_eq!(status, 502);
        assert_eq!(body["error"]["code"], "upstream_unreachable");
    }
    let (status, body) = get_json(addr, "/api/whoami", &[]).await;
    assert_eq!(status, 503);
    assert_eq!(body["error"]["code"], "circuit_open");
}
