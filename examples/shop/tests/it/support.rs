//! What the process tests share: calls through the gateway and process cleanup.

use std::process::Child;
use std::time::{Duration, Instant};

use http::Method;
use micro_core::client::HttpClient;
use serde_json::{json, Value};

/// Kills the process when dropped, passed or not.
pub(crate) struct KillOnDrop(pub(crate) Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) async fn send(
    client: &HttpClient,
    method: Method,
    path: &str,
    token: Option<&str>,
    key: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut request = client.request(method, path);
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    if let Some(key) = key {
        request = request.idempotency_key(key);
    }
    if let Some(body) = &body {
        request = request.json(body);
    }
    match request.send().await {
        Ok(response) => (
            response.status().as_u16(),
            serde_json::from_slice(response.body()).unwrap_or(Value::Null),
        ),
        Err(error) => (
            error.status().map_or(0, |s| s.as_u16()),
            error.body_json().unwrap_or(Value::Null),
        ),
    }
}

pub(crate) async fn checkout(
    client: &HttpClient,
    token: &str,
    key: &str,
    sku: &str,
    card: &str,
) -> String {
    let item = json!({"sku": sku, "quantity": 1});
    let (status, body) = send(
        client,
        Method::POST,
        "/api/carts/me/items",
        Some(token),
        None,
        Some(item),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let card = json!({"card_number": card});
    let (status, order) = send(
        client,
        Method::POST,
        "/api/orders",
        Some(token),
        Some(key),
        Some(card),
    )
    .await;
    assert_eq!(status, 202, "{order}");
    order["id"].as_str().unwrap().to_owned()
}

/// Polls the order until it is final (not `PENDING`, `PAID` or `CANCELLING`).
pub(crate) async fn settled(client: &HttpClient, token: &str, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (status, order) = send(
            client,
            Method::GET,
            &format!("/api/orders/{id}"),
            Some(token),
            None,
            None,
        )
        .await;
        assert_eq!(status, 200, "{order}");
        if !["PENDING", "PAID", "CANCELLING"].contains(&order["status"].as_str().unwrap_or("")) {
            return order;
        }
        assert!(
            Instant::now() < deadline,
            "the order never settled: {order}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Registers `email` and logs in; returns the token.
pub(crate) async fn sign_up(client: &HttpClient, email: &str) -> String {
    let account = json!({"email": email, "password": "a long password", "name": "Test"});
    let (status, body) = send(
        client,
        Method::POST,
        "/api/users/register",
        None,
        None,
        Some(account),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let login = json!({"email": email, "password": "a long password"});
    let (status, body) = send(
        client,
        Method::POST,
        "/api/users/login",
        None,
        None,
        Some(login),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body["token"].as_str().unwrap().to_owned()
}
