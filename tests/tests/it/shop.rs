//! The shop end to end through its gateway, in one process on embedded defaults.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use http::Method;
use micro_core::client::HttpClient;
use micro_events::PublisherExt;
use serde_json::{json, Value};
use shop::app::{self, Listen, Shop, ShopConfig};
use shop::events::{OrderEvent, ORDER_EVENTS};
use shop::order::OrderStatus;
use shop::payment::{
    PaymentStatus, DECLINED_CARD, GOOD_CARD, LATE_CARD, REFUND_FAILS_CARD, TIMEOUT_CARD,
};

const INITIAL_STOCK: i64 = 20;

struct TestShop {
    shop: Shop,
    client: HttpClient,
    tokens: Mutex<HashMap<String, String>>,
}

fn test_config() -> ShopConfig {
    ShopConfig {
        data_dir: None,
        listen: Listen::ephemeral(),
        payment_hang: Duration::from_secs(10),
        initial_stock: INITIAL_STOCK,
        // Fast hashes for many test users; the default is OWASP's 600,000.
        password_iterations: 10_000,
        ..ShopConfig::default()
    }
}

async fn spawn_shop() -> TestShop {
    spawn_shop_with(test_config()).await
}

/// The shop with the services' key `secret`, so the test can sign as a service.
async fn spawn_shop_keyed(secret: &str) -> TestShop {
    spawn_shop_with(ShopConfig {
        identity_secret: Some(shop::trust::SecretString::new(secret)),
        ..test_config()
    })
    .await
}

async fn spawn_shop_with(config: ShopConfig) -> TestShop {
    let shop = app::start(&config).await.expect("the shop starts");
    let client = HttpClient::builder(&format!("http://{}", shop.gateway()))
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    TestShop {
        shop,
        client,
        tokens: Mutex::default(),
    }
}

impl TestShop {
    async fn call(
        &self,
        method: Method,
        path: &str,
        user: Option<&str>,
        key: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let token = match user {
            Some(user) => Some(self.token(user).await),
            None => None,
        };
        self.send(method, path, token, key, body).await
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        token: Option<String>,
        key: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut request = self.client.request(method, path);
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

    /// The user's token: registers and logs in `user@shop.test` the first time.
    async fn token(&self, user: &str) -> String {
        if let Some(token) = self.tokens.lock().unwrap().get(user) {
            return token.clone();
        }
        let email = format!("{user}@shop.test");
        let (status, body) = self
            .send(
                Method::POST,
                "/api/users/register",
                None,
                None,
                Some(json!({"email": email, "password": "a long password", "name": user})),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        let login = json!({"email": email, "password": "a long password"});
        let (status, body) = self
            .send(Method::POST, "/api/users/login", None, None, Some(login))
            .await;
        assert_eq!(status, 200, "{body}");
        let token = body["token"].as_str().unwrap().to_owned();
        self.tokens
            .lock()
            .unwrap()
            .insert(user.to_owned(), token.clone());
        token
    }

    async fn add(&self, user: &str, sku: &str, quantity: i64) {
        let body = json!({"sku": sku, "quantity": quantity});
        let (status, cart) = self
            .call(
                Method::POST,
                "/api/carts/me/items",
                Some(user),
                None,
                Some(body),
            )
            .await;
        assert_eq!(status, 200, "{cart}");
    }

    async fn checkout(&self, user: &str, key: &str, card: &str) -> Value {
        let body = json!({"card_number": card});
        let (status, order) = self
            .call(
                Method::POST,
                "/api/orders",
                Some(user),
                Some(key),
                Some(body),
            )
            .await;
        assert_eq!(status, 202, "{order}");
        order
    }

    /// Polls the order until it is final.
    async fn settled(&self, user: &str, order_id: &str) -> Value {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let path = format!("/api/orders/{order_id}");
            let (status, order) = self.call(Method::GET, &path, Some(user), None, None).await;
            assert_eq!(status, 200, "{order}");
            let pending = ["PENDING", "PAID"].contains(&order["status"].as_str().unwrap_or(""));
            if !pending {
                return order;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the order never settled: {order}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// The shop's invariants: stock is conserved, and every captured payment belongs to
    /// a confirmed order (refunds for the rest), and the outbox drains.
    async fn check_invariants(&self) {
        let orders = self.shop.orders.all().await.unwrap();
        for (sku, stock) in self.shop.inventory.levels().unwrap() {
            let initial = if sku == "SKU-OOS" { 0 } else { INITIAL_STOCK };
            assert_eq!(
                stock.available + stock.reserved,
                initial - stock.committed,
                "{sku}"
            );
            let confirmed: i64 = orders
                .iter()
                .filter(|o| o.status == OrderStatus::Confirmed)
                .flat_map(|o| &o.lines)
                .filter(|l| l.sku == sku)
                .map(|l| l.quantity)
                .sum();
            assert_eq!(
                stock.committed, confirmed,
                "{sku}: committed vs confirmed orders"
            );
            assert_eq!(
                stock.reserved, 0,
                "{sku}: nothing stays reserved once orders settle"
            );
        }
        for payment in self.shop.payments.all().unwrap() {
            let order = orders.iter().find(|o| o.id == payment.order_id).unwrap();
            match payment.status {
                PaymentStatus::Captured => assert!(
                    matches!(
                        order.status,
                        OrderStatus::Confirmed | OrderStatus::RequiresAttention
                    ),
                    "{payment:?} is captured for an order in {:?}",
                    order.status
                ),
                PaymentStatus::Refunded => assert_eq!(order.status, OrderStatus::Cancelled),
                PaymentStatus::Declined => assert_eq!(order.status, OrderStatus::Cancelled),
            }
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while self.shop.orders.undelivered().await.unwrap() > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the outbox does not drain"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_one_process_shop_off_loopback_refuses_the_built_in_token_secret() {
    let off_loopback = Listen {
        gateway: "0.0.0.0:0".parse().unwrap(),
        ..Listen::ephemeral()
    };
    let config = ShopConfig {
        listen: off_loopback.clone(),
        ..test_config()
    };
    let error = match app::start(&config).await {
        Ok(_) => panic!("the shop started off loopback with the built-in token secret"),
        Err(error) => format!("{error:#}"),
    };
    assert!(
        error.contains(
            "`jwt_secret` (SHOP_JWT_SECRET) is unusable with the gateway service \
                        listening off loopback (0.0.0.0:0)"
        ),
        "{error}"
    );

    // With a secret of its own it starts, and serves.
    let shop = spawn_shop_with(ShopConfig {
        listen: off_loopback,
        jwt_secret: shop::trust::SecretString::new("this test's token secret, 3c8e1f0a7d2b45"),
        ..test_config()
    })
    .await;
    shop.add("alice", "SKU-1001", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_is_charged_reserved_confirmed_and_notified() {
    const SECRET: &str = "the services' key of this test, 4be1d0c7a9f25e36";
    let shop = spawn_shop_keyed(SECRET).await;
    shop.add("alice", "SKU-1001", 2).await;
    shop.add("alice", "SKU-1004", 1).await;
    shop.add("alice", "SKU-1001", 1).await;
    let (_, cart) = shop
        .call(Method::GET, "/api/carts/me", Some("alice"), None, None)
        .await;
    assert_eq!(
        cart["lines"][0]["quantity"], 3,
        "adding again increments: {cart}"
    );
    assert_eq!(cart["total"]["amount"], 3 * 1200 + 1450);

    let placed = shop.checkout("alice", "k-1", GOOD_CARD).await;
    let id = placed["id"].as_str().unwrap().to_owned();
    let order = shop.settled("alice", &id).await;
    assert_eq!(order["status"], "CONFIRMED", "{order}");
    let moves: Vec<&str> = order["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["status"].as_str().unwrap())
        .collect();
    assert_eq!(moves, ["PENDING", "PAID", "CONFIRMED"]);

    let (_, cart) = shop
        .call(Method::GET, "/api/carts/me", Some("alice"), None, None)
        .await;
    assert_eq!(cart["lines"], json!([]), "the cart was emptied");
    let (_, stock) = shop
        .call(
            Method::GET,
            "/api/inventory/SKU-1001",
            Some("ops"),
            None,
            None,
        )
        .await;
    assert_eq!(stock["available"], INITIAL_STOCK - 3);

    let path = format!("/api/notifications?order_id={id}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, sent) = shop
            .call(Method::GET, &path, Some("alice"), None, None)
            .await;
        if sent.as_array().is_some_and(|s| !s.is_empty()) {
            assert_eq!(sent[0]["kind"], "order_confirmed");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no notification was sent"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The same event delivered again sends nothing twice.
    let (_, sent) = shop
        .call(Method::GET, &path, Some("alice"), None, None)
        .await;
    let event_id = sent[0]["event_id"].as_str().unwrap();
    let again = OrderEvent::OrderConfirmed {
        order_id: id.clone(),
        user_id: sent[0]["user_id"].as_str().unwrap().to_owned(),
        total: serde_json::from_value(order["total"].clone()).unwrap(),
    }
    .envelope(event_id)
    .unwrap();
    let bus = &shop.shop.bus;
    // Signed as the order service, as the consumer requires.
    let keys = shop::trust::keys_from_secret(SECRET).unwrap();
    micro_events::identity::SignedPublisher::new(bus.clone(), keys, "order-service")
        .publish(ORDER_EVENTS, &id, &again)
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let published = bus.records(ORDER_EVENTS).len() as i64;
        let committed: i64 = bus
            .committed(ORDER_EVENTS, "notification-service")
            .values()
            .sum();
        if committed >= published {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the duplicate was not consumed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, sent) = shop
        .call(Method::GET, &path, Some("alice"), None, None)
        .await;
    assert_eq!(sent.as_array().unwrap().len(), 1, "{sent}");

    // The same key again answers the same order and charges nothing more.
    shop.add("alice", "SKU-1002", 1).await;
    let again = shop.checkout("alice", "k-1", GOOD_CARD).await;
    assert_eq!(again["id"], placed["id"]);
    let (_, mine) = shop
        .call(Method::GET, "/api/orders", Some("alice"), None, None)
        .await;
    assert_eq!(mine.as_array().unwrap().len(), 1);
    shop.check_invariants().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_end_cancelled_with_a_reason_or_needing_attention() {
    let shop = spawn_shop().await;

    shop.add("bob", "SKU-1003", 1).await;
    let declined = shop.checkout("bob", "declined", DECLINED_CARD).await;
    let order = shop.settled("bob", declined["id"].as_str().unwrap()).await;
    assert_eq!(order["status"], "CANCELLED", "{order}");
    assert!(
        order["history"][1]["reason"]
            .as_str()
            .unwrap()
            .contains("declined"),
        "{order}"
    );

    shop.add("carol", "SKU-1005", 1).await;
    shop.add("carol", "SKU-OOS", 1).await;
    let oos = shop.checkout("carol", "oos", GOOD_CARD).await;
    let order = shop.settled("carol", oos["id"].as_str().unwrap()).await;
    assert_eq!(order["status"], "CANCELLED", "{order}");
    let reason = order["history"].as_array().unwrap().last().unwrap()["reason"].to_string();
    assert!(reason.contains("out of stock"), "{order}");
    let path = format!("/api/payments?order_id={}", order["id"].as_str().unwrap());
    let (_, payments) = shop
        .call(Method::GET, &path, Some("carol"), None, None)
        .await;
    assert_eq!(payments[0]["status"], "REFUNDED", "{payments}");

    shop.add("dave", "SKU-OOS", 1).await;
    let stuck = shop.checkout("dave", "stuck", REFUND_FAILS_CARD).await;
    let order = shop.settled("dave", stuck["id"].as_str().unwrap()).await;
    assert_eq!(order["status"], "REQUIRES_ATTENTION", "{order}");

    // The timeout card is charged, but no answer ever comes back: the charge is
    // refunded and the order cancelled, never charged-and-cancelled.
    shop.add("erin", "SKU-1006", 1).await;
    let slow = shop.checkout("erin", "slow", TIMEOUT_CARD).await;
    let order = shop.settled("erin", slow["id"].as_str().unwrap()).await;
    assert_eq!(order["status"], "CANCELLED", "{order}");
    let path = format!("/api/payments?order_id={}", order["id"].as_str().unwrap());
    let (_, payments) = shop
        .call(Method::GET, &path, Some("erin"), None, None)
        .await;
    assert_eq!(payments.as_array().unwrap().len(), 1, "{payments}");
    assert_eq!(payments[0]["status"], "REFUNDED", "{payments}");

    // The late card's first answer comes after the step's timeout; the retry with the
    // same key gets the captured payment, and the order is confirmed, charged once.
    shop.add("frank", "SKU-1007", 1).await;
    let late = shop.checkout("frank", "late", LATE_CARD).await;
    let order = shop.settled("frank", late["id"].as_str().unwrap()).await;
    assert_eq!(order["status"], "CONFIRMED", "{order}");
    let path = format!("/api/payments?order_id={}", order["id"].as_str().unwrap());
    let (_, payments) = shop
        .call(Method::GET, &path, Some("frank"), None, None)
        .await;
    assert_eq!(payments.as_array().unwrap().len(), 1, "{payments}");
    assert_eq!(payments[0]["status"], "CAPTURED", "{payments}");

    // Late and charged, then out of stock: the charge the retry found is refunded.
    shop.add("gina", "SKU-OOS", 1).await;
    let late = shop.checkout("gina", "late-oos", LATE_CARD).await;
    let order = shop.settled("gina", late["id"].as_str().unwrap()).await;
    assert_eq!(order["status"], "CANCELLED", "{order}");

    shop.check_invariants().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confirmed_order_can_be_cancelled_and_bad_requests_are_refused() {
    let shop = spawn_shop().await;
    shop.add("frank", "SKU-1007", 2).await;
    let placed = shop.checkout("frank", "k", GOOD_CARD).await;
    let id = placed["id"].as_str().unwrap();
    assert_eq!(shop.settled("frank", id).await["status"], "CONFIRMED");
    let path = format!("/api/orders/{id}/cancel");
    let (status, order) = shop
        .call(Method::POST, &path, Some("frank"), None, None)
        .await;
    assert_eq!(status, 200, "{order}");
    assert_eq!(order["status"], "CANCELLED");
    let (status, body) = shop
        .call(Method::POST, &path, Some("frank"), None, None)
        .await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (409, &json!("cannot_cancel"))
    );
    let (_, stock) = shop
        .call(
            Method::GET,
            "/api/inventory/SKU-1007",
            Some("ops"),
            None,
            None,
        )
        .await;
    assert_eq!(stock["available"], INITIAL_STOCK);

    // Someone else's order is not found; no identity is 401; no key is 400; an empty
    // cart is 400; a bad quantity is 400.
    let (status, _) = shop
        .call(
            Method::GET,
            &format!("/api/orders/{id}"),
            Some("mallory"),
            None,
            None,
        )
        .await;
    assert_eq!(status, 404);
    let (status, body) = shop
        .call(Method::GET, "/api/orders", None, None, None)
        .await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (401, &json!("unauthorized"))
    );
    let card = Some(json!({"card_number": GOOD_CARD}));
    let (status, body) = shop
        .call(
            Method::POST,
            "/api/orders",
            Some("frank"),
            None,
            card.clone(),
        )
        .await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (400, &json!("idempotency_key_required"))
    );
    let (status, body) = shop
        .call(Method::POST, "/api/orders", Some("frank"), Some("k2"), card)
        .await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (400, &json!("cart_empty"))
    );
    let item = Some(json!({"sku": "SKU-1001", "quantity": 1000}));
    let (status, body) = shop
        .call(
            Method::POST,
            "/api/carts/me/items",
            Some("frank"),
            None,
            item,
        )
        .await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (400, &json!("invalid_quantity"))
    );
    let (status, body) = shop
        .call(Method::GET, "/api/nowhere", None, None, None)
        .await;
    assert_eq!((status, &body["error"]["code"]), (404, &json!("no_route")));
    shop.check_invariants().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_checked_at_the_gateway_and_limits_hold() {
    let yaml = app::GATEWAY_YAML.replace(
        "      second: 50\n      minute: 1000\n",
        "      minute: 5\n",
    );
    assert_ne!(yaml, app::GATEWAY_YAML, "the test's limit was put in");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.yaml");
    std::fs::write(&path, yaml).unwrap();
    let shop = spawn_shop_with(ShopConfig {
        gateway_config: Some(path),
        ..test_config()
    })
    .await;

    // A forged identity header without a token gets nowhere.
    let forged = shop
        .client
        .request(Method::GET, "/api/carts/me")
        .header("x-user-id", "alice")
        .send()
        .await
        .unwrap_err();
    assert_eq!(forged.status().map(|s| s.as_u16()), Some(401));
    let bad = shop
        .client
        .request(Method::GET, "/api/carts/me")
        .header("authorization", "Bearer not.a.token")
        .send()
        .await
        .unwrap_err();
    assert_eq!(bad.status().map(|s| s.as_u16()), Some(401));

    // With a token, the profile is the token's user, whatever header came along.
    let token = shop.token("grace").await;
    let profile: Value = shop
        .client
        .request(Method::GET, "/api/users/me")
        .header("authorization", format!("Bearer {token}"))
        .header("x-user-id", "someone-else")
        .send_json()
        .await
        .unwrap();
    assert_eq!(profile["email"], "grace@shop.test");

    // Five calls a minute for one user: the sixth cart read is refused.
    let mut statuses = Vec::new();
    for _ in 0..6 {
        statuses.push(
            shop.call(Method::GET, "/api/carts/me", Some("heidi"), None, None)
                .await
                .0,
        );
    }
    assert_eq!(statuses, [200, 200, 200, 200, 200, 429]);
    let limited = shop
        .client
        .request(Method::GET, "/api/carts/me")
        .header(
            "authorization",
            format!("Bearer {}", shop.token("heidi").await),
        )
        .send()
        .await
        .unwrap_err();
    assert_eq!(limited.status().map(|s| s.as_u16()), Some(429));
    // The catalog needs no token.
    let (status, _) = shop
        .call(Method::GET, "/api/products/SKU-1001", None, None, None)
        .await;
    assert_eq!(status, 200);

    // A changed file is applied while the shop runs, with the token secret filled in:
    // the new gateway's limits start afresh and the old token is still good.
    let relaxed = app::GATEWAY_YAML.replace(
        "      second: 50\n      minute: 1000\n",
        "      minute: 100\n",
    );
    std::fs::write(dir.path().join("gateway.yaml"), relaxed).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = shop
            .call(Method::GET, "/api/carts/me", Some("heidi"), None, None)
            .await;
        if status == 200 {
            break;
        }
        assert_eq!(status, 429, "{body}");
        assert!(
            std::time::Instant::now() < deadline,
            "the changed file was not applied"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_answers_a_second_user_with_the_first_users_ids_not_found() {
    let shop = spawn_shop().await;
    shop.add("alice", "SKU-1001", 1).await;
    let placed = shop.checkout("alice", "mine", GOOD_CARD).await;
    let id = placed["id"].as_str().unwrap().to_owned();
    let order = shop.settled("alice", &id).await;
    assert_eq!(order["status"], "CONFIRMED", "{order}");
    // Wait until the owner sees the notification, so there is something to hide.
    let notifications = format!("/api/notifications?order_id={id}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, sent) = shop
            .call(Method::GET, &notifications, Some("alice"), None, None)
            .await;
        if sent.as_array().is_some_and(|s| !s.is_empty()) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "nothing was sent");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let payments = format!("/api/payments?order_id={id}");
    let (status, mine) = shop
        .call(Method::GET, &payments, Some("alice"), None, None)
        .await;
    assert_eq!(
        (status, mine.as_array().map(Vec::len)),
        (200, Some(1)),
        "{mine}"
    );
    assert!(
        !mine.to_string().contains(GOOD_CARD) && mine[0].get("user_id").is_none(),
        "a payment shows the card or its owner: {mine}"
    );

    // Every route that takes an id of alice's, called by bob.
    let by_id = [
        (Method::GET, format!("/api/orders/{id}")),
        (Method::POST, format!("/api/orders/{id}/cancel")),
        (Method::GET, payments.clone()),
        (Method::GET, notifications.clone()),
    ];
    for (method, path) in by_id {
        let (status, body) = shop
            .call(method.clone(), &path, Some("bob"), None, None)
            .await;
        assert_eq!(status, 404, "{method} {path}: {body}");
        assert!(!body.to_string().contains(GOOD_CARD), "{body}");
    }
    // The routes of "my" things show bob's own, never alice's.
    let (status, orders) = shop
        .call(Method::GET, "/api/orders", Some("bob"), None, None)
        .await;
    assert_eq!(status, 200, "{orders}");
    assert!(!orders.to_string().contains(&id), "{orders}");
    let (_, cart) = shop
        .call(Method::GET, "/api/carts/me", Some("bob"), None, None)
        .await;
    assert_eq!(cart["lines"], json!([]), "{cart}");
    let (_, profile) = shop
        .call(Method::GET, "/api/users/me", Some("bob"), None, None)
        .await;
    assert_eq!(profile["email"], "bob@shop.test");
    // Alice's order is untouched by bob's cancel.
    let order = shop.settled("alice", &id).await;
    assert_eq!(order["status"], "CONFIRMED", "{order}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_endpoints_refuse_calls_without_identity_or_from_the_wrong_service() {
    use micro_core::identity::{Caller, KeyRing, KeySet, Secret, IDENTITY_HEADER};
    const SECRET: &str = "the services' key of this test, 7d1e04b9a2c35f68";
    let shop = spawn_shop_keyed(SECRET).await;
    let keys = shop::trust::keys_from_secret(SECRET).unwrap();
    let stranger = KeyRing::new(KeySet::new(
        "shop",
        Secret::new(*b"an attacker's own key, 0123456789abcdef").unwrap(),
    ));
    let service = |name: &str| {
        let addr = shop.shop.host.local_addr(name).unwrap();
        HttpClient::builder(&format!("http://{addr}"))
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap()
    };
    // (service, method, path, a service that may call it, one that may not)
    let endpoints = [
        (
            "payment-service",
            Method::POST,
            "/payments",
            "order-service",
            "gateway",
        ),
        (
            "payment-service",
            Method::POST,
            "/payments/methods",
            "order-service",
            "gateway",
        ),
        (
            "payment-service",
            Method::POST,
            "/payments/pay-x/refund",
            "order-service",
            "gateway",
        ),
        (
            "payment-service",
            Method::POST,
            "/payments/by-key/k/refund",
            "order-service",
            "cart-service",
        ),
        (
            "payment-service",
            Method::GET,
            "/payments?order_id=o",
            "gateway",
            "order-service",
        ),
        (
            "inventory-service",
            Method::POST,
            "/inventory/reservations",
            "order-service",
            "gateway",
        ),
        (
            "inventory-service",
            Method::POST,
            "/inventory/reservations/o/commit",
            "order-service",
            "gateway",
        ),
        (
            "inventory-service",
            Method::POST,
            "/inventory/reservations/o/release",
            "order-service",
            "cart-service",
        ),
        (
            "inventory-service",
            Method::GET,
            "/inventory",
            "gateway",
            "notification-service",
        ),
        (
            "order-service",
            Method::GET,
            "/orders",
            "gateway",
            "payment-service",
        ),
        (
            "order-service",
            Method::POST,
            "/orders",
            "gateway",
            "cart-service",
        ),
        (
            "cart-service",
            Method::GET,
            "/carts/me",
            "order-service",
            "payment-service",
        ),
        (
            "user-service",
            Method::GET,
            "/users/me",
            "gateway",
            "order-service",
        ),
        (
            "notification-service",
            Method::GET,
            "/notifications?order_id=o",
            "gateway",
            "order-service",
        ),
        (
            "product-service",
            Method::GET,
            "/products",
            "cart-service",
            "payment-service",
        ),
    ];
    let call = |name: &str, method: &Method, path: &str, token: Option<String>| {
        let mut request = service(name)
            .request(method.clone(), path)
            .header("x-user-id", "alice")
            .idempotency_key("k");
        if *method == Method::POST {
            request = request.json(&json!({}));
        }
        if let Some(token) = token {
            request = request.header(IDENTITY_HEADER, token);
        }
        async move {
            match request.send().await {
                Ok(response) => response.status().as_u16(),
                Err(error) => error.status().map_or(0, |s| s.as_u16()),
            }
        }
    };
    for (name, method, path, allowed, refused) in endpoints {
        let place = format!("{name} {method} {path}");
        // A bare user header is no identity.
        assert_eq!(call(name, &method, path, None).await, 401, "{place}");
        let forged = stranger
            .sign(&Caller::for_user(allowed, "alice"), name)
            .unwrap();
        assert_eq!(
            call(name, &method, path, Some(forged)).await,
            401,
            "{place}: forged"
        );
        let for_another = keys
            .sign(&Caller::for_user(allowed, "alice"), "some-other-service")
            .unwrap();
        assert_eq!(
            call(name, &method, path, Some(for_another)).await,
            401,
            "{place}: a token for another service"
        );
        let wrong = keys
            .sign(&Caller::for_user(refused, "alice"), name)
            .unwrap();
        assert_eq!(
            call(name, &method, path, Some(wrong)).await,
            403,
            "{place}: {refused}"
        );
        let right = keys
            .sign(&Caller::for_user(allowed, "alice"), name)
            .unwrap();
        let status = call(name, &method, path, Some(right)).await;
        assert!(
            ![401, 403].contains(&status),
            "{place}: {allowed} was refused ({status})"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_store_but_the_payment_services_holds_a_card_number() {
    let data = tempfile::tempdir().unwrap();
    let shop = spawn_shop_with(ShopConfig {
        data_dir: Some(data.path().to_owned()),
        ..test_config()
    })
    .await;
    let cards = [GOOD_CARD, DECLINED_CARD, LATE_CARD];
    for (i, card) in cards.iter().enumerate() {
        let user = format!("card-user-{i}");
        shop.add(&user, "SKU-1001", 1).await;
        let placed = shop.checkout(&user, "k", card).await;
        shop.settled(&user, placed["id"].as_str().unwrap()).await;
    }
    let mut scanned = Vec::new();
    for entry in std::fs::read_dir(data.path()).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let holds = |card: &str| bytes.windows(card.len()).any(|w| w == card.as_bytes());
        if name == "payment.redb" {
            // The one holder: the scan does find what is there.
            assert!(
                holds(GOOD_CARD),
                "the scan missed the payment service's card"
            );
        } else {
            for card in cards {
                assert!(!holds(card), "{name} holds the card number {card}");
            }
        }
        scanned.push(name);
    }
    scanned.sort();
    for store in [
        "order-sagas.redb",
        "order.redb",
        "payment.redb",
        "notification.redb",
    ] {
        assert!(
            scanned.iter().any(|s| s == store),
            "{store} not in {scanned:?}"
        );
    }
    // Nor does any event on the bus.
    let records = shop.shop.bus.records(ORDER_EVENTS);
    assert!(!records.is_empty());
    for record in records {
        let text = String::from_utf8_lossy(&record.payload);
        assert!(text.contains("order_id"), "{text}");
        for card in cards {
            assert!(!text.contains(card), "an event holds {card}: {text}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_that_cannot_prove_its_service_draws_no_traffic() {
    use micro_discovery::identity::prove;
    use micro_discovery::{Instance, Registration, Registry};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    const SECRET: &str = "the services' key of this test, 1c9a7e5f3b2d4068";
    let shop = spawn_shop_keyed(SECRET).await;
    // Two impostors of the user service, each counting what reaches it.
    let impostor = || async {
        let hits = Arc::new(AtomicUsize::new(0));
        let counter = hits.clone();
        let app = axum::Router::new().fallback(move || {
            counter.fetch_add(1, Ordering::SeqCst);
            async { (http::StatusCode::SERVICE_UNAVAILABLE, "impostor") }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (addr, hits)
    };
    let (rogue, rogue_hits) = impostor().await;
    let (vouched, vouched_hits) = impostor().await;
    let registry = &shop.shop.registry;
    registry
        .register(&Registration::new(Instance::from_addr(
            "user-service",
            rogue,
        )))
        .await
        .unwrap();
    // One the services' key does vouch for: the check below could fail.
    let keys = shop::trust::keys_from_secret(SECRET).unwrap();
    let proven = prove(Instance::from_addr("user-service", vouched), &keys).unwrap();
    registry.register(&Registration::new(proven)).await.unwrap();

    let mut answers = Vec::new();
    for i in 0..30 {
        let body = json!({"email": format!("u{i}@shop.test"), "password": "x", "name": "n"});
        let (status, _) = shop
            .send(Method::POST, "/api/users/login", None, None, Some(body))
            .await;
        answers.push(status);
    }
    assert_eq!(rogue_hits.load(Ordering::SeqCst), 0, "{answers:?}");
    assert!(
        vouched_hits.load(Ordering::SeqCst) > 0,
        "the vouched-for instance got nothing either: {answers:?}"
    );
}
