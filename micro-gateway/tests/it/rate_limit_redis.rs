//! The Redis store against the real Redis (`MICRO_TEST_REDIS_URL`, by default
//! `redis://127.0.0.1:6379`): one limit held across two gateway instances.
#![cfg(feature = "redis")]

use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use axum::body::Body;
use micro_core::host::RunningHost;
use micro_gateway::gateway::{Gateway, Route};
use micro_gateway::plugins::rate_limit::RateLimitConfig;
use micro_gateway::proxy::{Proxy, ProxyConfig, Upstream};

use crate::jwt::counted_upstream;
use crate::support::{gateway, send};

fn redis_url() -> String {
    std::env::var("MICRO_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// A connection to the test Redis; panics when it cannot be reached.
async fn redis() -> redis::aio::MultiplexedConnection {
    let url = redis_url();
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut connection = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        client.get_multiplexed_async_connection(),
    )
    .await
    .unwrap_or_else(|_| panic!("redis at {url} did not answer: is it running?"))
    .unwrap_or_else(|e| panic!("redis at {url} is unreachable ({e}): is it running?"));
    let pong: String = redis::cmd("PING")
        .query_async(&mut connection)
        .await
        .unwrap();
    assert_eq!(pong, "PONG");
    connection
}

fn unique_prefix(test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("micro-test:{test}:{}:{nanos}:", std::process::id())
}

fn config(prefix: &str) -> RateLimitConfig {
    let mut config = RateLimitConfig::per_ip(None, Some(5), Some(100));
    config.policy = "redis".to_owned();
    config.redis_url = Some(redis_url());
    config.redis_prefix = prefix.to_owned();
    config.fault_tolerant = false;
    config
}

/// A gateway instance with its own store (its own connection) on `config`.
async fn instance(config: &RateLimitConfig, upstream: SocketAddr) -> (RunningHost, SocketAddr) {
    let route = tower::ServiceBuilder::new()
        .layer(config.layer().unwrap())
        .service(Proxy::new(
            Upstream::from_addr(upstream),
            ProxyConfig::new(),
        ));
    let gw = Gateway::builder()
        .route(Route::new("orders").path("/api").to(route))
        .build()
        .unwrap();
    gateway(gw.into_router()).await
}

async fn get(addr: SocketAddr) -> (u16, http::HeaderMap) {
    let request = http::Request::get("/api/orders")
        .header("host", "g")
        .body(Body::empty())
        .unwrap();
    let (status, headers, _) = send(addr, request).await;
    (status.as_u16(), headers)
}

#[tokio::test]
async fn two_gateways_share_one_limit() {
    let mut connection = redis().await;
    let prefix = unique_prefix("shared");
    let upstream = counted_upstream().await;
    let config = config(&prefix);
    let (_a, a) = instance(&config, upstream.addr).await;
    let (_b, b) = instance(&config, upstream.addr).await;

    let mut statuses = Vec::new();
    for i in 0..8 {
        let (status, headers) = get(if i % 2 == 0 { a } else { b }).await;
        if status == 200 {
            assert_eq!(headers["ratelimit-limit"], "5");
        }
        statuses.push(status);
    }
    assert_eq!(statuses, [200, 200, 200, 200, 200, 429, 429, 429]);
    assert_eq!(
        upstream.hits.load(Ordering::SeqCst),
        5,
        "one limit across both"
    );
    let (_, refused) = get(a).await;
    assert_eq!(refused["retry-after"], "12");
    assert_eq!(refused["ratelimit-remaining"], "0");

    // The state is in Redis under the prefix, and expires by itself.
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut connection)
        .await
        .unwrap();
    assert_eq!(keys.len(), 2, "one key per quota: {keys:?}");
    for key in keys {
        let ttl: i64 = redis::cmd("PTTL")
            .arg(&key)
            .query_async(&mut connection)
            .await
            .unwrap();
        assert!(ttl > 0 && ttl <= 3_600_001, "{key}: {ttl}");
    }
}

#[tokio::test]
async fn another_prefix_is_another_limit() {
    let _connection = redis().await;
    let upstream = counted_upstream().await;
    let (_a, a) = instance(&config(&unique_prefix("one")), upstream.addr).await;
    let (_b, b) = instance(&config(&unique_prefix("two")), upstream.addr).await;
    for _ in 0..5 {
        assert_eq!(get(a).await.0, 200);
        assert_eq!(get(b).await.0, 200);
    }
    assert_eq!(get(a).await.0, 429);
    assert_eq!(get(b).await.0, 429);
}

#[tokio::test]
async fn an_unreachable_redis_fails_open_or_closed() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let upstream = counted_upstream().await;
    let mut config = config("micro-test:unreachable:");
    config.redis_url = Some(format!("redis://127.0.0.1:{port}"));
    config.redis_timeout = Some(500);
    let (_closed, closed) = instance(&config, upstream.addr).await;
    assert_eq!(get(closed).await.0, 503);
    config.fault_tolerant = true;
    let (_open, open) = instance(&config, upstream.addr).await;
    assert_eq!(get(open).await.0, 200);
    assert_eq!(upstream.hits.load(Ordering::SeqCst), 1);
}
