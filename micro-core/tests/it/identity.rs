//! Identity over real loopback HTTP: a payment service that verifies callers, an order
//! service that calls it through a signing client.
#![cfg(feature = "identity")]

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use axum::routing::{get, post};
use axum::{Json, Router};
use micro_core::client::HttpClient;
use micro_core::host::{RunningHost, ServiceHost};
use micro_core::identity::{
    AllowCallersLayer, Caller, KeyRing, KeySet, OnBehalfOf, Secret, SignCallerLayer,
    VerifyCallerLayer,
};
use micro_core::service::Service;
use serde_json::Value;

use crate::support::{get_with, Reply};

fn secret(seed: u8) -> Secret {
    Secret::new(
        (0..32)
            .map(|i| seed.wrapping_mul(7).wrapping_add(i))
            .collect::<Vec<u8>>(),
    )
    .unwrap()
}

struct Named(&'static str, Router);

impl Service for Named {
    fn name(&self) -> &str {
        self.0
    }

    fn router(&self) -> Router {
        self.1.clone()
    }
}

/// payment-service: `/whoami` for any verified caller, `/refund` for the order service
/// only.
fn payment(keys: &KeyRing) -> Router {
    Router::new()
        .route("/whoami", get(|caller: Caller| async move { Json(caller) }))
        .route(
            "/refund",
            post(|caller: Caller| async move { Json(caller) })
                .route_layer(AllowCallersLayer::new(["order-service"])),
        )
        .layer(VerifyCallerLayer::new(keys.clone(), "payment-service"))
}

async fn start(services: Vec<Named>) -> RunningHost {
    let mut host = ServiceHost::builder();
    for service in services {
        host = host.service(service, "127.0.0.1:0".parse().unwrap());
    }
    host.build().unwrap().start().await.unwrap()
}

async fn whoami(addr: SocketAddr, token: Option<&str>) -> Reply {
    let headers: Vec<(&str, &str)> = token
        .map(|t| vec![("x-micro-identity", t)])
        .unwrap_or_default();
    get_with(addr, "/whoami", &headers).await.unwrap()
}

fn assert_refused(reply: &Reply, status: u16, code: &str) {
    assert_eq!(reply.status.as_u16(), status, "{}", reply.body);
    assert_eq!(reply.json()["error"]["code"], code, "{}", reply.body);
}

#[tokio::test]
async fn verifies_tokens_over_http() {
    let keys = KeyRing::new(KeySet::new("k1", secret(1)));
    let host = start(vec![Named("payment-service", payment(&keys))]).await;
    let addr = host.local_addr("payment-service").unwrap();

    let valid = keys
        .sign(&Caller::for_user("gateway", "u-1"), "payment-service")
        .unwrap();
    let reply = whoami(addr, Some(&valid)).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json()["service"], "gateway");
    assert_eq!(reply.json()["user"], "u-1");

    assert_refused(&whoami(addr, None).await, 401, "unauthenticated");
    // A bare user header is no identity.
    let bare = get_with(addr, "/whoami", &[("x-user-id", "u-1")])
        .await
        .unwrap();
    assert_refused(&bare, 401, "unauthenticated");

    let old = SystemTime::now() - Duration::from_secs(300);
    let expired = keys
        .sign_at(&Caller::service("gateway"), "payment-service", old)
        .unwrap();
    assert_refused(&whoami(addr, Some(&expired)).await, 401, "unauthenticated");

    let stranger = KeyRing::new(KeySet::new("k1", secret(2)));
    let wrong_key = stranger
        .sign(&Caller::service("gateway"), "payment-service")
        .unwrap();
    assert_refused(
        &whoami(addr, Some(&wrong_key)).await,
        401,
        "unauthenticated",
    );

    let wrong_audience = keys
        .sign(&Caller::service("gateway"), "inventory-service")
        .unwrap();
    let reply = whoami(addr, Some(&wrong_audience)).await;
    assert_refused(&reply, 401, "unauthenticated");
    assert!(reply.body.contains("another service"), "{}", reply.body);

    host.shutdown_trigger().trigger();
    host.run_until(std::future::pending()).await;
}

#[tokio::test]
async fn keys_rotate_at_runtime() {
    let keys = KeyRing::new(KeySet::new("k1", secret(1)));
    let host = start(vec![Named("payment-service", payment(&keys))]).await;
    let addr = host.local_addr("payment-service").unwrap();

    // Another process, still signing with k1 while this one rotates.
    let old_signer = KeyRing::new(KeySet::new("k1", secret(1)));
    let old_token = old_signer
        .sign(&Caller::service("gateway"), "payment-service")
        .unwrap();

    // Step 1: the new key is accepted everywhere, the old one still signs.
    keys.rotate(KeySet::new("k1", secret(1)).verify_with("k2", secret(3)));
    let new_signer = KeyRing::new(KeySet::new("k2", secret(3)));
    let new_token = new_signer
        .sign(&Caller::service("gateway"), "payment-service")
        .unwrap();
    assert_eq!(whoami(addr, Some(&old_token)).await.status, 200);
    assert_eq!(whoami(addr, Some(&new_token)).await.status, 200);

    // Step 2: the new key signs; step 3: the old key is dropped.
    keys.rotate(KeySet::new("k2", secret(3)));
    assert_eq!(whoami(addr, Some(&new_token)).await.status, 200);
    assert_refused(
        &whoami(addr, Some(&old_token)).await,
        401,
        "unauthenticated",
    );

    host.shutdown_trigger().trigger();
    host.run_until(std::future::pending()).await;
}

#[tokio::test]
async fn routes_accept_only_their_services_and_clients_propagate_the_user() {
    let keys = KeyRing::new(KeySet::new("k1", secret(1)));
    let payment_host = start(vec![Named("payment-service", payment(&keys))]).await;
    let payment_addr = payment_host.local_addr("payment-service").unwrap();
    let base = format!("http://{payment_addr}");

    let as_order = HttpClient::builder(&base)
        .layer(SignCallerLayer::new(
            keys.clone(),
            "order-service",
            "payment-service",
        ))
        .build()
        .unwrap();
    let as_cart = HttpClient::builder(&base)
        .layer(SignCallerLayer::new(
            keys.clone(),
            "cart-service",
            "payment-service",
        ))
        .build()
        .unwrap();

    // Explicit user for work outside a request (a saga step).
    let caller: Caller = as_order
        .request(http::Method::POST, "/refund")
        .extension(OnBehalfOf::user("u-9"))
        .send_json()
        .await
        .unwrap();
    assert_eq!(caller, Caller::for_user("order-service", "u-9"));

    let err = as_cart
        .request(http::Method::POST, "/refund")
        .send()
        .await
        .unwrap_err();
    assert_eq!(err.status().map(|s| s.as_u16()), Some(403), "{err}");
    let body: Value = serde_json::from_slice(err.body().unwrap()).unwrap();
    assert_eq!(body["error"]["code"], "forbidden");

    // order-service handles a user's request and calls payment: the user goes along
    // with the order service as the caller.
    let client = as_order.clone();
    let order = Router::new()
        .route(
            "/pay",
            post(move |_caller: Caller| {
                let client = client.clone();
                async move {
                    let seen: Caller = client.post_json("/refund", &()).await.unwrap();
                    Json(seen)
                }
            }),
        )
        .layer(VerifyCallerLayer::new(keys.clone(), "order-service"));
    let order_host = start(vec![Named("order-service", order)]).await;
    let order_addr = order_host.local_addr("order-service").unwrap();
    let gateway = HttpClient::builder(&format!("http://{order_addr}"))
        .layer(SignCallerLayer::new(
            keys.clone(),
            "gateway",
            "order-service",
        ))
        .build()
        .unwrap();
    let seen: Caller = gateway
        .request(http::Method::POST, "/pay")
        .extension(OnBehalfOf::user("u-7"))
        .send_json()
        .await
        .unwrap();
    assert_eq!(seen, Caller::for_user("order-service", "u-7"));

    // Without a credential the order service's route is never reached.
    let plain = HttpClient::new(&format!("http://{order_addr}")).unwrap();
    let err = plain.post_json::<_, Value>("/pay", &()).await.unwrap_err();
    assert_eq!(err.status().map(|s| s.as_u16()), Some(401), "{err}");

    for host in [payment_host, order_host] {
        host.shutdown_trigger().trigger();
        host.run_until(std::future::pending()).await;
    }
}
