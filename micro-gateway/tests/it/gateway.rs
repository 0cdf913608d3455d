use micro_gateway::gateway::{Gateway, GatewayError, Route};
use micro_gateway::proxy::{Proxy, ProxyConfig, Upstream};

use crate::support::{echo, gateway, get_json, IntoText};

fn proxy(addr: std::net::SocketAddr) -> Proxy {
    Proxy::new(Upstream::from_addr(addr), ProxyConfig::new())
}

#[tokio::test]
async fn routes_strip_rewrite_and_answer_404_as_json() {
    let users = echo().await;
    let orders = echo().await;
    let gw = Gateway::builder()
        .route(Route::new("users").path("/api/users").to(proxy(users.addr)))
        .route(
            Route::new("order-by-id")
                .path("/api/orders/{id}")
                .method("GET")
                .rewrite("/orders/{id}/summary")
                .to(proxy(orders.addr)),
        )
        .route(
            Route::new("orders-kept")
                .path("/api/orders")
                .strip_path(false)
                .to(proxy(orders.addr)),
        )
        .build()
        .unwrap();
    let (_host, addr) = gateway(gw.into_router()).await;

    let (status, seen) = get_json(addr, "/api/users/7?verbose=1", &[]).await;
    assert_eq!(status, 200);
    assert_eq!(seen["uri"], "/7?verbose=1");
    let (_, seen) = get_json(addr, "/api/users", &[]).await;
    assert_eq!(seen["uri"], "/");

    let (_, seen) = get_json(addr, "/api/orders/42?x=1", &[]).await;
    assert_eq!(seen["uri"], "/orders/42/summary?x=1");

    let (status, body) = get_json(addr, "/nowhere", &[]).await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "no_route");

    // POST does not match the GET-only template route and falls to the prefix route.
    let request = http::Request::post("/api/orders/42")
        .header("host", "g")
        .body(axum::body::Body::empty())
        .unwrap();
    let (status, _, body) = crate::support::send(addr, request).await;
    assert_eq!(status, 200);
    let seen: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(seen["uri"], "/api/orders/42");

    let (_, metrics) = crate::support::send(
        addr,
        http::Request::get("/metrics")
            .header("host", "g")
            .body(axum::body::Body::empty())
            .unwrap(),
    )
    .await
    .into_text();
    assert!(
        metrics.contains(r#"micro_gateway_requests_total{route="order-by-id",status="2xx"} 1"#),
        "{metrics}"
    );
}

#[test]
fn bad_routes_are_named() {
    let upstream = Upstream::parse("http://127.0.0.1:1").unwrap();
    let error = Gateway::builder()
        .route(
            Route::new("broken")
                .path("api")
                .to(Proxy::new(upstream.clone(), ProxyConfig::new())),
        )
        .build()
        .unwrap_err();
    assert!(
        matches!(&error, GatewayError::Pattern { route, .. } if route == "broken"),
        "{error}"
    );
    assert!(error.to_string().contains("`api`"));

    let error = Gateway::builder()
        .route(Route::new("idle").path("/a"))
        .build()
        .unwrap_err();
    assert!(matches!(error, GatewayError::NoService(ref name) if name == "idle"));

    let error = Gateway::builder()
        .route(Route::new("everything").to(Proxy::new(upstream.clone(), ProxyConfig::new())))
        .build()
        .unwrap_err();
    assert!(matches!(error, GatewayError::NoPredicate(_)));

    let error = Gateway::builder()
        .route(
            Route::new("m")
                .method("GE T")
                .to(Proxy::new(upstream, ProxyConfig::new())),
        )
        .build()
        .unwrap_err();
    assert!(
        error.to_string().contains("invalid method `GE T`"),
        "{error}"
    );
}
