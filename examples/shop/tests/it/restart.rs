//! A shop killed with SIGKILL mid-checkout finishes its sagas after it restarts, from
//! its embedded stores on disk.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use http::Method;
use micro_core::client::HttpClient;
use serde_json::json;

use crate::support::{checkout, send, settled, sign_up, KillOnDrop};

/// Starts the shop on free ports with its data in `data`; returns it and its gateway.
fn start(data: &Path) -> (Child, HttpClient) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_shop"));
    command
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
    let (mut shop, client) = start(data.path());

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

    let (shop, client) = start(data.path());
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
