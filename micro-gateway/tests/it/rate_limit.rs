//! Rate limiting with the local store, on tokio's paused clock, and once through a real
//! gateway.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use http::{Request, Response};
use micro_core::service::BoxFuture;
use micro_gateway::gateway::{Gateway, Route};
use micro_gateway::plugins::jwt::VerifiedClaims;
use micro_gateway::plugins::rate_limit::{
    Decision, Quota, RateLimit, RateLimitConfig, RateLimitStore, StoreError,
};
use micro_gateway::proxy::{Proxy, ProxyConfig, Upstream};
use tower::{Layer, ServiceExt};

use crate::jwt::counted_upstream;
use crate::support::{gateway, send};

type Counting = tower::util::BoxCloneSyncService<Request<Body>, Response<Body>, Infallible>;

/// A limited service whose inner service counts the requests that got through.
fn limited(config: &RateLimitConfig) -> (Arc<AtomicUsize>, impl Fn() -> RateLimit<Counting>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    let inner = Counting::new(tower::service_fn(move |_request: Request<Body>| {
        counter.fetch_add(1, Ordering::SeqCst);
        async { Ok::<_, Infallible>(Response::new(Body::from("ok"))) }
    }));
    let layer = config.layer().unwrap();
    (hits, move || layer.layer(inner.clone()))
}

fn from(peer: &str) -> Request<Body> {
    let mut request = Request::get("/x").body(Body::empty()).unwrap();
    let ip: std::net::IpAddr = peer.parse().unwrap();
    let addr = SocketAddr::new(ip, 40000);
    request.extensions_mut().insert(ConnectInfo(addr));
    request
}

fn header(response: &Response<Body>, name: &str) -> String {
    response.headers()[name].to_str().unwrap().to_owned()
}

#[tokio::test(start_paused = true)]
async fn a_burst_of_the_limit_then_429_until_the_interval_passes() {
    let (hits, service) = limited(&RateLimitConfig::per_ip(Some(3), None, None));
    let first = service().oneshot(from("192.0.2.1")).await.unwrap();
    assert_eq!(first.status(), 200);
    assert_eq!(header(&first, "ratelimit-limit"), "3");
    assert_eq!(header(&first, "ratelimit-remaining"), "2");
    assert_eq!(header(&first, "ratelimit-reset"), "1");
    assert_eq!(header(&first, "ratelimit-policy"), "3;w=1");
    for remaining in ["1", "0"] {
        let response = service().oneshot(from("192.0.2.1")).await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(header(&response, "ratelimit-remaining"), remaining);
    }
    let refused = service().oneshot(from("192.0.2.1")).await.unwrap();
    assert_eq!(refused.status(), 429);
    assert_eq!(header(&refused, "retry-after"), "1");
    assert_eq!(header(&refused, "ratelimit-remaining"), "0");
    let body = axum::body::to_bytes(refused.into_body(), 1024)
        .await
        .unwrap();
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["error"]["code"], "rate_limited");
    assert_eq!(body["error"]["message"], "API rate limit exceeded");
    assert_eq!(hits.load(Ordering::SeqCst), 3);

    // Another client has its own bucket.
    let other = service().oneshot(from("192.0.2.2")).await.unwrap();
    assert_eq!(other.status(), 200);

    // One interval (a third of a second) frees one request, not more.
    tokio::time::advance(Duration::from_millis(334)).await;
    assert_eq!(
        service().oneshot(from("192.0.2.1")).await.unwrap().status(),
        200
    );
    assert_eq!(
        service().oneshot(from("192.0.2.1")).await.unwrap().status(),
        429
    );
    // A full second later the whole burst is back.
    tokio::time::advance(Duration::from_secs(1)).await;
    for _ in 0..3 {
        assert_eq!(
            service().oneshot(from("192.0.2.1")).await.unwrap().status(),
            200
        );
    }
    assert_eq!(hits.load(Ordering::SeqCst), 8);
}

#[tokio::test(start_paused = true)]
async fn minute_and_hour_limits_hold_together() {
    let (hits, service) = limited(&RateLimitConfig::per_ip(None, Some(5), Some(6)));
    for _ in 0..5 {
        assert_eq!(service().oneshot(from("::1")).await.unwrap().status(), 200);
    }
    let refused = service().oneshot(from("::1")).await.unwrap();
    assert_eq!(refused.status(), 429);
    assert_eq!(header(&refused, "retry-after"), "12", "one minute / 5");
    assert_eq!(header(&refused, "ratelimit-limit"), "5");

    tokio::time::advance(Duration::from_secs(60)).await;
    let sixth = service().oneshot(from("::1")).await.unwrap();
    assert_eq!(sixth.status(), 200);
    assert_eq!(
        header(&sixth, "ratelimit-limit"),
        "6",
        "the hour is now the tighter"
    );
    assert_eq!(header(&sixth, "ratelimit-remaining"), "0");
    let refused = service().oneshot(from("::1")).await.unwrap();
    assert_eq!(refused.status(), 429);
    assert_eq!(header(&refused, "ratelimit-limit"), "6");
    let retry: u64 = header(&refused, "retry-after").parse().unwrap();
    assert!(
        (500..=600).contains(&retry),
        "an hour / 6 after the first: {retry}"
    );
    assert_eq!(
        hits.load(Ordering::SeqCst),
        6,
        "a refused request is not counted"
    );
}

#[tokio::test(start_paused = true)]
async fn consumers_are_counted_by_jwt_subject_else_by_ip() {
    let mut config = RateLimitConfig::per_ip(None, Some(1), None);
    config.limit_by = "consumer".to_owned();
    let (_, service) = limited(&config);
    let as_user = |sub: &str| {
        let mut request = from("192.0.2.9");
        let claims = serde_json::json!({ "sub": sub });
        request
            .extensions_mut()
            .insert(VerifiedClaims::new(claims.as_object().unwrap().clone()));
        request
    };
    assert_eq!(
        service().oneshot(as_user("alice")).await.unwrap().status(),
        200
    );
    assert_eq!(
        service().oneshot(as_user("alice")).await.unwrap().status(),
        429
    );
    assert_eq!(
        service().oneshot(as_user("bob")).await.unwrap().status(),
        200
    );
    // Without a verified subject, the address counts (and is not alice's bucket).
    assert_eq!(
        service().oneshot(from("192.0.2.9")).await.unwrap().status(),
        200
    );
    assert_eq!(
        service().oneshot(from("192.0.2.9")).await.unwrap().status(),
        429
    );
}

#[tokio::test(start_paused = true)]
async fn unverified_api_keys_pick_no_bucket_and_headers_identify_callers() {
    let mut by_key = RateLimitConfig::per_ip(None, Some(1), None);
    by_key.limit_by = "credential".to_owned();
    let (_, service) = limited(&by_key);
    let with = |name: &str, value: &str| {
        let mut request = from("192.0.2.1");
        request.headers_mut().insert(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
        request
    };
    assert_eq!(
        service()
            .oneshot(with("apikey", "k1"))
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        service()
            .oneshot(with("apikey", "k1"))
            .await
            .unwrap()
            .status(),
        429
    );
    // An API key nobody verified picks no bucket of its own: a client can't dodge the
    // limit (or grow the store) with a fresh key per request.
    assert_eq!(
        service()
            .oneshot(with("apikey", "k2"))
            .await
            .unwrap()
            .status(),
        429
    );

    let mut by_header = RateLimitConfig::per_ip(None, Some(1), None);
    by_header.limit_by = "header".to_owned();
    by_header.header_name = Some("x-tenant".to_owned());
    let (_, service) = limited(&by_header);
    assert_eq!(
        service()
            .oneshot(with("x-tenant", "a"))
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        service()
            .oneshot(with("x-tenant", "a"))
            .await
            .unwrap()
            .status(),
        429
    );
    assert_eq!(
        service()
            .oneshot(with("x-tenant", "b"))
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test(start_paused = true)]
async fn forwarded_for_counts_only_behind_a_trusted_proxy() {
    let mut config = RateLimitConfig::per_ip(None, Some(1), None);
    config.trusted_proxies = vec!["10.0.0.0/8".parse().unwrap()];
    let (_, service) = limited(&config);
    let forwarded = |peer: &str, chain: &str| {
        let mut request = from(peer);
        request
            .headers_mut()
            .insert("x-forwarded-for", chain.parse().unwrap());
        request
    };
    // Behind two trusted hops the client is the right-most untrusted address.
    let chain = "198.51.100.7, 203.0.113.5, 10.0.0.2";
    assert_eq!(
        service()
            .oneshot(forwarded("10.0.0.1", chain))
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        service()
            .oneshot(forwarded("10.9.9.9", "203.0.113.5"))
            .await
            .unwrap()
            .status(),
        429,
        "same client through another proxy"
    );
    // An untrusted peer cannot escape its bucket by claiming another address.
    assert_eq!(
        service()
            .oneshot(forwarded("192.0.2.50", "203.0.113.77"))
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        service()
            .oneshot(forwarded("192.0.2.50", "203.0.113.78"))
            .await
            .unwrap()
            .status(),
        429
    );
}

/// A store that always fails.
#[derive(Debug)]
struct Broken;

impl RateLimitStore for Broken {
    fn check<'a>(
        &'a self,
        _: &'a str,
        _: &'a [Quota],
    ) -> BoxFuture<'a, Result<Decision, StoreError>> {
        Box::pin(async { Err(StoreError::Unavailable("down".into())) })
    }
}

#[tokio::test(start_paused = true)]
async fn client_headers_can_be_hidden() {
    let mut config = RateLimitConfig::per_ip(Some(1), None, None);
    config.hide_client_headers = true;
    let (_, service) = limited(&config);
    let passed = service().oneshot(from("192.0.2.1")).await.unwrap();
    assert_eq!(passed.status(), 200);
    assert!(!passed.headers().contains_key("ratelimit-limit"));
    let refused = service().oneshot(from("192.0.2.1")).await.unwrap();
    assert_eq!(refused.status(), 429);
    assert!(!refused.headers().contains_key("ratelimit-remaining"));
    assert_eq!(
        header(&refused, "retry-after"),
        "1",
        "Retry-After is not a client header"
    );
}

#[tokio::test]
async fn a_failing_store_fails_open_or_closed_as_configured() {
    let inner = tower::service_fn(|_: Request<Body>| async {
        Ok::<_, Infallible>(Response::new(Body::empty()))
    });
    let mut config = RateLimitConfig::per_ip(Some(1), None, None);
    let open = config
        .layer_with_store(Arc::new(Broken))
        .unwrap()
        .layer(inner);
    assert_eq!(open.oneshot(from("192.0.2.1")).await.unwrap().status(), 200);
    config.fault_tolerant = false;
    let closed = config
        .layer_with_store(Arc::new(Broken))
        .unwrap()
        .layer(inner);
    let response = closed.oneshot(from("192.0.2.1")).await.unwrap();
    assert_eq!(response.status(), 503);
}

#[tokio::test]
async fn through_the_gateway_a_refused_request_never_reaches_the_upstream() {
    let upstream = counted_upstream().await;
    let mut config = RateLimitConfig::per_ip(None, Some(2), None);
    config.error_message = "slow down".to_owned();
    let route = tower::ServiceBuilder::new()
        .layer(config.layer().unwrap())
        .service(Proxy::new(
            Upstream::from_addr(upstream.addr),
            ProxyConfig::new(),
        ));
    let gw = Gateway::builder()
        .route(Route::new("limited").path("/api").to(route))
        .build()
        .unwrap();
    let (_host, addr) = gateway(gw.into_router()).await;
    let get = || {
        http::Request::get("/api/x")
            .header("host", "g")
            .body(Body::empty())
            .unwrap()
    };
    for remaining in ["1", "0"] {
        let (status, headers, _) = send(addr, get()).await;
        assert_eq!(status, 200);
        assert_eq!(headers["ratelimit-remaining"], remaining);
    }
    let (status, headers, body) = send(addr, get()).await;
    assert_eq!(status, 429);
    assert!(headers.contains_key("retry-after"));
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["error"]["message"], "slow down");
    assert_eq!(upstream.hits.load(Ordering::SeqCst), 2);
}

#[test]
fn bad_configurations_name_their_field() {
    let cases = [
        (serde_json::json!({}), "second", "at least one"),
        (serde_json::json!({ "minute": 0 }), "minute", "at least 1"),
        (serde_json::json!({ "month": 10 }), "month", "not supported"),
        (
            serde_json::json!({ "minute": 1, "limit_by": "moon" }),
            "limit_by",
            "`moon`",
        ),
        (
            serde_json::json!({ "minute": 1, "limit_by": "header" }),
            "header_name",
            "needs",
        ),
        (
            serde_json::json!({ "minute": 1, "policy": "cluster" }),
            "policy",
            "cluster",
        ),
        (
            serde_json::json!({ "minute": 1, "error_code": 200 }),
            "error_code",
            "4xx",
        ),
    ];
    for (json, field, reason) in cases {
        let config: RateLimitConfig = serde_json::from_value(json.clone()).unwrap();
        let error = config.layer().unwrap_err();
        assert_eq!(error.field(), field, "{json}");
        assert!(error.reason().contains(reason), "{json}: {error}");
    }
}
