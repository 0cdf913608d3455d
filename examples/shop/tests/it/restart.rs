//! A shop killed with SIGKILL mid-checkout, or mid-cancel, finishes its sagas after it
//! restarts, from its embedded stores on disk.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use http::Method;
use micro_core::client::HttpClient;
use serde_json::json;

use crate::support::{checkout, send, settled, sign_up, KillOnDrop};

/// Starts the shop on free ports with its data in `data` and `env` set; returns it and
/// its gateway.
fn start(data: &Path, env: &[(&str, &str)]) -> (Child, HttpClient) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_shop"));
    command
        .envs(env.iter().copied())
        .env("SHOP_DATA_DIR", data)
        .env("SHOP_PAYMENT_HANG", "60s")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped());
    for service in [
        "GATEWAY",
        "USER",
        "PRODUCT",
        "ORDER",
        "CART",
        "PAYMENT",
        "INVENTORY",
        "NOTIFICATION",
    ] {
        command.env(format!("SHOP_LISTEN__{service}"), "127.0.0.1:0");
    }
    let mut child = command.spawn().expect("the shop binary starts");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(url) = line.strip_prefix("gateway") {
                let _ = tx.send(url.trim().to_owned());
            }
        }
    });
    let url = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the shop printed its gateway's address");
    let client = HttpClient::builder(&url)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    (child, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_shop_finishes_its_orders_after_a_restart() {
    let data = tempfile::tempdir().unwrap();
    let (mut shop, client) = start(data.path(), &[]);

    let token = sign_up(&client, "kim@shop.test").await;

    let confirmed = checkout(&client, &token, "first", "SKU-1002", "4242424242424242").await;
    assert_eq!(
        settled(&client, &token, &confirmed).await["status"],
        "CONFIRMED"
    );
    // This one's charge is captured but never answered: its saga is mid-flight when
    // the process dies.
    let in_flight = checkout(&client, &token, "second", "SKU-1003", "4000000000000119").await;
    shop.kill().unwrap();
    shop.wait().unwrap();

    let (shop, client) = start(data.path(), &[]);
    let _shop = KillOnDrop(shop);
    let order = settled(&client, &token, &in_flight).await;
    assert_eq!(order["status"], "CANCELLED", "{order}");
    let order = settled(&client, &token, &confirmed).await;
    assert_eq!(
        order["status"], "CONFIRMED",
        "the first order survived: {order}"
    );
    let (_, stock) = send(
        &client,
        Method::GET,
        "/api/inventory/SKU-1002",
        Some(&token),
        None,
        None,
    )
    .await;
    assert_eq!(stock["committed"], 1, "{stock}");
    let (_, stock) = send(
        &client,
        Method::GET,
        "/api/inventory/SKU-1003",
        Some(&token),
        None,
        None,
    )
    .await;
    assert_eq!(
        (&stock["reserved"], &stock["committed"]),
        (&json!(0), &json!(0)),
        "{stock}"
    );
    let path = format!("/api/payments?order_id={in_flight}");
    let (_, payments) = send(&client, Method::GET, &path, Some(&token), None, None).await;
    // The timeout card charges without answering: whatever it charged was refunded.
    assert!(
        payments
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["status"] == "REFUNDED"),
        "a charge of the cancelled order was kept: {payments}"
    );
}

async fn get(client: &HttpClient, token: &str, path: &str) -> serde_json::Value {
    let (status, body) = send(client, Method::GET, path, Some(token), None, None).await;
    assert_eq!(status, 200, "{path}: {body}");
    body
}

/// A cancel whose stock cannot be returned (the inventory refuses releases) waits in
/// `CANCELLING`, refunded but never `CANCELLED` with its stock missing; the shop is
/// killed then, and after the restart, with releases back, the cancel-order saga
/// finishes: stock and payment restored once, `CANCELLED`, notified once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_waits_for_the_stock_and_finishes_after_a_crash() {
    let data = tempfile::tempdir().unwrap();
    let (mut shop, client) = start(data.path(), &[("SHOP_INVENTORY_REFUSES_RELEASES", "true")]);
    let token = sign_up(&client, "noa@shop.test").await;

    let order = checkout(&client, &token, "one", "SKU-1004", "4242424242424242").await;
    assert_eq!(
        settled(&client, &token, &order).await["status"],
        "CONFIRMED"
    );
    let later = checkout(&client, &token, "two", "SKU-1005", "4242424242424242").await;
    assert_eq!(
        settled(&client, &token, &later).await["status"],
        "CONFIRMED"
    );

    let cancel = format!("/api/orders/{order}/cancel");
    let (status, answer) = send(&client, Method::POST, &cancel, Some(&token), None, None).await;
    assert_eq!(
        (status, &answer["status"]),
        (202, &json!("CANCELLING")),
        "{answer}"
    );
    // Asked again, the cancel under way answers the same.
    let (status, again) = send(&client, Method::POST, &cancel, Some(&token), None, None).await;
    assert_eq!(
        (status, &again["status"]),
        (202, &json!("CANCELLING")),
        "{again}"
    );

    // The refund (the go/no-go) goes through; the release is retried, and until it
    // passes the order stays CANCELLING with its units still committed.
    let payments = format!("/api/payments?order_id={order}");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut polls_after_refund = 0;
    while polls_after_refund < 5 {
        let now = get(&client, &token, &format!("/api/orders/{order}")).await;
        assert_eq!(now["status"], "CANCELLING", "{now}");
        let stock = get(&client, &token, "/api/inventory/SKU-1004").await;
        assert_eq!(
            stock["committed"], 1,
            "the stock left before the release: {stock}"
        );
        if get(&client, &token, &payments).await[0]["status"] == "REFUNDED" {
            polls_after_refund += 1;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never refunded: {now}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    shop.kill().unwrap();
    shop.wait().unwrap();

    let (shop, client) = start(data.path(), &[]);
    let _shop = KillOnDrop(shop);
    let cancelled = settled(&client, &token, &order).await;
    assert_eq!(cancelled["status"], "CANCELLED", "{cancelled}");
    let moves: Vec<&str> = cancelled["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        moves,
        ["PENDING", "PAID", "CONFIRMED", "CANCELLING", "CANCELLED"],
        "{cancelled}"
    );
    let stock = get(&client, &token, "/api/inventory/SKU-1004").await;
    assert_eq!(
        (&stock["available"], &stock["reserved"], &stock["committed"]),
        (&json!(100), &json!(0), &json!(0)),
        "{stock}"
    );
    let paid = get(&client, &token, &payments).await;
    assert_eq!(paid.as_array().map(Vec::len), Some(1), "{paid}");
    assert_eq!(paid[0]["status"], "REFUNDED", "{paid}");

    // With the inventory releasing again, a cancel is done before it answers.
    let (status, answer) = send(
        &client,
        Method::POST,
        &format!("/api/orders/{later}/cancel"),
        Some(&token),
        None,
        None,
    )
    .await;
    assert_eq!(
        (status, &answer["status"]),
        (200, &json!("CANCELLED")),
        "{answer}"
    );
    let stock = get(&client, &token, "/api/inventory/SKU-1005").await;
    assert_eq!(
        (&stock["available"], &stock["committed"]),
        (&json!(100), &json!(0)),
        "{stock}"
    );
    // A refund refused for good (the card whose refunds are refused) stops the cancel at
    // its go/no-go: nothing is half-applied, the payment kept and the units still
    // committed, and the order is confirmed again.
    let stuck = checkout(&client, &token, "three", "SKU-1006", "4000000000000341").await;
    assert_eq!(
        settled(&client, &token, &stuck).await["status"],
        "CONFIRMED"
    );
    let (status, answer) = send(
        &client,
        Method::POST,
        &format!("/api/orders/{stuck}/cancel"),
        Some(&token),
        None,
        None,
    )
    .await;
    assert!(status == 409 || status == 202, "{status}: {answer}");
    if status == 409 {
        assert_eq!(answer["error"]["code"], "cancel_refused", "{answer}");
    }
    let order_now = settled(&client, &token, &stuck).await;
    assert_eq!(order_now["status"], "CONFIRMED", "{order_now}");
    let paid = get(&client, &token, &format!("/api/payments?order_id={stuck}")).await;
    assert_eq!(paid[0]["status"], "CAPTURED", "{paid}");
    let stock = get(&client, &token, "/api/inventory/SKU-1006").await;
    assert_eq!(
        (&stock["available"], &stock["committed"]),
        (&json!(99), &json!(1)),
        "{stock}"
    );

    let (status, body) = send(&client, Method::POST, &cancel, Some(&token), None, None).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (409, &json!("cannot_cancel")),
        "{body}"
    );

    // Each order is notified confirmed, then cancelled: each once, over the restart.
    for id in [&order, &later] {
        let path = format!("/api/notifications?order_id={id}");
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let sent = get(&client, &token, &path).await;
            let kinds: Vec<&str> = sent
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|n| n["kind"].as_str())
                .collect();
            if kinds.contains(&"order_cancelled") {
                assert_eq!(kinds.len(), 2, "{sent}");
                assert!(kinds.contains(&"order_confirmed"), "{sent}");
                break;
            }
            assert!(std::time::Instant::now() < deadline, "not notified: {sent}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
