//! The gateway vouches for the caller: every forwarded request carries the gateway's
//! signed identity, with the user whose token the JWT plugin verified, and an identity a
//! client sent is never passed on.

use std::net::SocketAddr;

use axum::body::Body;
use axum::routing::any;
use axum::{Json, Router};
use http::Request;
use micro_core::identity::{Caller, KeyRing, KeySet, Secret, VerifyCallerLayer, IDENTITY_HEADER};
use micro_gateway::gateway::{Gateway, Route};
use micro_gateway::proxy::{Proxy, ProxyConfig, Upstream};
use serde_json::{json, Value};
use tower::ServiceBuilder;

use crate::jwt::{good_claims, sign, signing_key, SECRET};
use crate::support::{gateway, send};

fn keys(secret: &[u8; 40]) -> KeyRing {
    KeyRing::new(KeySet::new("k1", Secret::new(*secret).unwrap()))
}

/// An upstream that verifies callers as `orders-service` and answers who called.
async fn verifying_upstream(keys: KeyRing) -> SocketAddr {
    let app = Router::new()
        .fallback(any(|caller: Caller| async move { Json(json!(caller)) }))
        .layer(VerifyCallerLayer::new(keys, "orders-service"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

async fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (u16, Value) {
    let mut request = Request::get(path).header("host", "gateway.test");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let (status, _, body) = send(addr, request.body(Body::empty()).unwrap()).await;
    (
        status.as_u16(),
        serde_json::from_slice(&body).unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn forwarded_requests_carry_the_gateways_identity_and_the_verified_user() {
    let services = keys(b"the services' shared key, 0123456789abcd");
    let upstream = verifying_upstream(services.clone()).await;
    let proxy = Proxy::new(Upstream::from_addr(upstream), ProxyConfig::new()).sign_as(
        services.clone(),
        "gateway",
        "orders-service",
    );
    let mut jwt = micro_gateway::plugins::jwt::JwtConfig::with_keys([
        micro_gateway::plugins::jwt::KeyConfig::secret("HS256", SECRET),
    ]);
    jwt.audience = vec!["shop".to_owned()];
    let protected = ServiceBuilder::new()
        .layer(jwt.layer().unwrap())
        .service(proxy.clone());
    let gw = Gateway::builder()
        .route(Route::new("api").path("/api").to(protected))
        .route(Route::new("public").path("/public").to(proxy))
        .build()
        .unwrap();
    let (_host, addr) = gateway(gw.into_router()).await;

    let token = sign(
        jsonwebtoken::Algorithm::HS256,
        None,
        &good_claims(),
        &signing_key(jsonwebtoken::Algorithm::HS256),
    );
    let bearer = format!("Bearer {token}");
    let (status, caller) = get(addr, "/api/orders", &[("authorization", &bearer)]).await;
    assert_eq!(status, 200, "{caller}");
    assert_eq!(caller, json!({"service": "gateway", "user": "user-42"}));

    // A public route vouches for the gateway alone, whatever the client claims: its own
    // identity token (even one signed with the real key) and an `x-user-id`.
    let forged = services
        .sign(
            &Caller::for_user("order-service", "admin"),
            "orders-service",
        )
        .unwrap();
    let (status, caller) = get(
        addr,
        "/public/x",
        &[(IDENTITY_HEADER.as_str(), &forged), ("x-user-id", "admin")],
    )
    .await;
    assert_eq!(status, 200, "{caller}");
    assert_eq!(caller, json!({"service": "gateway", "user": null}));

    // Keys rotate under the running gateway: the upstream trusts only the new key, and
    // the next request is signed with it.
    let rotated = KeySet::new(
        "k2",
        Secret::new(*b"the services' next key, 0123456789abcdef").unwrap(),
    );
    services.rotate(rotated);
    let (status, caller) = get(addr, "/api/orders", &[("authorization", &bearer)]).await;
    assert_eq!(
        (status, &caller["user"]),
        (200, &json!("user-42")),
        "{caller}"
    );
}

#[tokio::test]
async fn without_signing_a_clients_identity_header_is_still_removed() {
    let services = keys(b"the services' shared key, 0123456789abcd");
    let upstream = verifying_upstream(services.clone()).await;
    let proxy = Proxy::new(Upstream::from_addr(upstream), ProxyConfig::new());
    let gw = Gateway::builder()
        .route(Route::new("public").path("/public").to(proxy))
        .build()
        .unwrap();
    let (_host, addr) = gateway(gw.into_router()).await;
    let forged = services
        .sign(
            &Caller::for_user("order-service", "admin"),
            "orders-service",
        )
        .unwrap();
    let (status, body) = get(addr, "/public/x", &[(IDENTITY_HEADER.as_str(), &forged)]).await;
    assert_eq!(
        status, 401,
        "the forged identity reached the upstream: {body}"
    );
}
