use std::sync::atomic::Ordering;

use axum::body::Body;
use axum::Router;
use micro_gateway::plugins::body_limit::{BodyLimitConfig, BodyLimitLayer};
use micro_gateway::plugins::cors::CorsConfig;
use micro_gateway::plugins::ip_restriction::{IpRestrictionConfig, IpRestrictionLayer};
use micro_gateway::plugins::transform::{HeaderTransform, TransformLayer};
use micro_gateway::proxy::{Proxy, ProxyConfig, Upstream};
use tower::ServiceBuilder;

use crate::support::{echo, gateway, get_json, send};

fn proxy(addr: std::net::SocketAddr) -> Proxy {
    Proxy::new(Upstream::from_addr(addr), ProxyConfig::new())
}

#[tokio::test]
async fn a_refused_client_gets_403_and_the_upstream_nothing() {
    let upstream = echo().await;
    let deny_loopback: IpRestrictionConfig =
        serde_json::from_value(serde_json::json!({ "deny": ["127.0.0.0/8"] })).unwrap();
    let allow_loopback: IpRestrictionConfig =
        serde_json::from_value(serde_json::json!({ "allow": ["127.0.0.1"] })).unwrap();
    let router = Router::new()
        .nest_service(
            "/denied",
            ServiceBuilder::new()
                .layer(IpRestrictionLayer::new(deny_loopback))
                .service(proxy(upstream.addr)),
        )
        .nest_service(
            "/allowed",
            ServiceBuilder::new()
                .layer(IpRestrictionLayer::new(allow_loopback))
                .service(proxy(upstream.addr)),
        );
    let (_host, addr) = gateway(router).await;
    let (status, body) = get_json(addr, "/denied/x", &[]).await;
    assert_eq!(status, 403);
    assert_eq!(body["error"]["code"], "ip_not_allowed");
    assert_eq!(upstream.connections.load(Ordering::SeqCst), 0);
    let (status, _) = get_json(addr, "/allowed/x", &[]).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn oversized_bodies_get_413_declared_or_streamed() {
    let upstream = echo().await;
    let limited = ServiceBuilder::new()
        .layer(BodyLimitLayer::new(&BodyLimitConfig::bytes(1024)))
        .service(proxy(upstream.addr));
    let (_host, addr) = gateway(Router::new().nest_service("/api", limited)).await;

    let declared = http::Request::post("/api/upload")
        .header("host", "g")
        .body(Body::from(vec![0u8; 4096]))
        .unwrap();
    let (status, _, body) = send(addr, declared).await;
    assert_eq!(status, 413);
    assert!(String::from_utf8_lossy(&body).contains("payload_too_large"));
    assert_eq!(
        upstream.connections.load(Ordering::SeqCst),
        0,
        "the upstream saw the request"
    );

    // A chunked body has no length to check up front: it is cut where it passes the bound.
    let chunks = futures_free_stream(vec![vec![1u8; 700], vec![2u8; 700]]);
    let streamed = http::Request::post("/api/upload")
        .header("host", "g")
        .body(Body::new(chunks))
        .unwrap();
    let (status, _, _) = send(addr, streamed).await;
    assert_eq!(status, 413);

    let fits = http::Request::post("/api/upload")
        .header("host", "g")
        .body(Body::from(vec![0u8; 1000]))
        .unwrap();
    let (status, _, body) = send(addr, fits).await;
    assert_eq!(status, 200);
    let seen: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(seen["body_len"], 1000);
}

/// A body of the given chunks without a length, as a chunked upload arrives.
fn futures_free_stream(chunks: Vec<Vec<u8>>) -> http_body_util::StreamBody<ChunkIter> {
    http_body_util::StreamBody::new(ChunkIter(chunks.into_iter()))
}

struct ChunkIter(std::vec::IntoIter<Vec<u8>>);

impl futures_core::Stream for ChunkIter {
    type Item = Result<http_body::Frame<bytes::Bytes>, std::io::Error>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        std::task::Poll::Ready(
            self.0
                .next()
                .map(|chunk| Ok(http_body::Frame::data(chunk.into()))),
        )
    }
}

#[tokio::test]
async fn headers_are_transformed_on_the_way_in_and_out() {
    let upstream = echo().await;
    let inbound: HeaderTransform = serde_json::from_value(serde_json::json!({
        "remove": { "headers": ["x-debug"] },
        "add": { "headers": ["x-gateway:micro"] }
    }))
    .unwrap();
    let outbound: HeaderTransform = serde_json::from_value(serde_json::json!({
        "add": { "headers": ["x-served-by:micro-gateway"] }
    }))
    .unwrap();
    let route = ServiceBuilder::new()
        .layer(TransformLayer::response(outbound))
        .layer(TransformLayer::request(inbound))
        .service(proxy(upstream.addr));
    let (_host, addr) = gateway(Router::new().nest_service("/api", route)).await;
    let request = http::Request::get("/api/x")
        .header("host", "g")
        .header("x-debug", "1")
        .body(Body::empty())
        .unwrap();
    let (status, headers, body) = send(addr, request).await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-served-by"], "micro-gateway");
    let seen: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(seen["headers"]["x-gateway"], "micro");
    assert!(seen["headers"].get("x-debug").is_none());
}

#[tokio::test]
async fn cors_preflights_are_answered_by_the_gateway() {
    let upstream = echo().await;
    let cors: CorsConfig = serde_json::from_value(serde_json::json!({
        "origins": ["https://shop.example"],
        "methods": ["GET", "POST"],
        "credentials": true,
        "max_age": 600
    }))
    .unwrap();
    let route = ServiceBuilder::new()
        .layer(cors.layer().unwrap())
        .service(proxy(upstream.addr));
    let (_host, addr) = gateway(Router::new().nest_service("/api", route)).await;
    let preflight = http::Request::builder()
        .method("OPTIONS")
        .uri("/api/orders")
        .header("host", "g")
        .header("origin", "https://shop.example")
        .header("access-control-request-method", "POST")
        .body(Body::empty())
        .unwrap();
    let (status, headers, _) = send(addr, preflight).await;
    assert_eq!(status, 200);
    assert_eq!(
        headers["access-control-allow-origin"],
        "https://shop.example"
    );
    assert_eq!(headers["access-control-allow-credentials"], "true");
    assert_eq!(headers["access-control-max-age"], "600");
    assert_eq!(
        upstream.connections.load(Ordering::SeqCst),
        0,
        "a preflight reached the upstream"
    );

    let (status, _) = get_json(addr, "/api/orders", &[("origin", "https://evil.example")]).await;
    assert_eq!(
        status, 200,
        "CORS does not block requests, the browser does"
    );
}
