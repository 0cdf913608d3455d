//! The load generator against the one-process shop, through its gateway.

use std::time::Duration;

use shop::app::{self, Listen, Shop, ShopConfig};
use shop::loadgen::{self, Journey, LoadgenConfig};
use shop::order::OrderStatus;

const INITIAL_STOCK: i64 = 1_000;

/// A gateway without the user service and without tokens: it vouches for no user, so a
/// user's own `x-user-id` header gets them nowhere.
const HEADER_GATEWAY: &str = r#"
_format_version: "3.0"
services:
  - name: products
    discovery: product-service
    path: /products
    routes: [{ name: catalog, paths: [/api/products], methods: [GET] }]
  - name: carts
    discovery: cart-service
    path: /carts
    routes: [{ name: cart, paths: [/api/carts] }]
  - name: orders
    discovery: order-service
    path: /orders
    routes: [{ name: orders, paths: [/api/orders] }]
"#;

fn shop_config() -> ShopConfig {
    ShopConfig {
        data_dir: None,
        listen: Listen::ephemeral(),
        payment_hang: Duration::from_millis(300),
        initial_stock: INITIAL_STOCK,
        // Fast hashes for many test users; the default is OWASP's 600,000.
        password_iterations: 10_000,
        ..ShopConfig::default()
    }
}

async fn spawn_shop() -> Shop {
    app::start(&shop_config()).await.expect("the shop starts")
}

fn config_for(shop: &Shop, args: &str) -> LoadgenConfig {
    let target = format!("--target http://{} ", shop.gateway());
    loadgen::parse_args((target + args).split_whitespace().map(str::to_owned))
        .expect("valid arguments")
}

/// Stock plus reservations is the starting stock less what confirmed orders took.
async fn check_stock(shop: &Shop) {
    let orders = shop.orders.all().await.unwrap();
    for (sku, stock) in shop.inventory.levels().unwrap() {
        let initial = if sku == "SKU-OOS" { 0 } else { INITIAL_STOCK };
        let confirmed: i64 = orders
            .iter()
            .filter(|o| o.status == OrderStatus::Confirmed)
            .flat_map(|o| &o.lines)
            .filter(|l| l.sku == sku)
            .map(|l| l.quantity)
            .sum();
        assert_eq!(stock.committed, confirmed, "{sku}");
        assert_eq!(
            stock.available + stock.reserved,
            initial - confirmed,
            "{sku}"
        );
        assert_eq!(stock.reserved, 0, "{sku}: every order settled");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_smoke_run_meets_no_unexpected_error_and_runs_every_journey() {
    let shop = spawn_shop().await;
    let config = config_for(
        &shop,
        "--smoke --users 4 --seed 3 --weights payment-timeout=1 --poll-interval 10ms",
    );
    let report = loadgen::run(&config).await.expect("the smoke run passes");
    println!("{report}");

    assert_eq!(report.unexpected_errors(), 0, "{report}");
    for journey in Journey::ALL {
        let ran = report.journey(*journey).map_or(0, |r| r.ok);
        assert_eq!(
            ran,
            1,
            "{} ran once and went well:\n{report}",
            journey.name()
        );
    }
    let sign_in = report
        .journey(Journey::SignIn)
        .expect("the users signed in");
    assert_eq!(sign_in.ok, 4);

    let orders = shop.orders.all().await.unwrap();
    let count = |status| orders.iter().filter(|o| o.status == status).count();
    // The cancel journey may cancel the order another journey of the same user confirmed,
    // so count the orders that were ever confirmed.
    let confirmed = orders
        .iter()
        .filter(|o| o.history.iter().any(|h| h.status == OrderStatus::Confirmed))
        .count();
    assert!(confirmed >= 2, "{orders:?}");
    assert!(count(OrderStatus::Cancelled) >= 4, "{orders:?}");
    check_stock(&shop).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_run_mixes_journeys_and_reports_them() {
    let shop = spawn_shop().await;
    let config = config_for(&shop, "--users 3 --duration 1500ms --seed 11");
    let report = loadgen::run(&config).await.expect("the run completes");
    println!("{report}");

    assert_eq!(report.unexpected_errors(), 0, "{report}");
    let ran: u64 = report
        .journeys
        .iter()
        .filter(|r| r.journey != Journey::SignIn)
        .map(|r| r.count)
        .sum();
    assert!(ran >= 3, "{report}");
    assert!(
        report.journey(Journey::PaymentTimeout).is_none(),
        "weight 0"
    );
    let table = report.to_string();
    assert!(table.contains("p99 ms"), "{table}");
    check_stock(&shop).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_tokens_a_users_own_id_header_is_believed_by_no_service() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = dir.path().join("gateway.yaml");
    std::fs::write(&yaml, HEADER_GATEWAY).unwrap();
    let shop = app::start(&ShopConfig {
        gateway_config: Some(yaml),
        ..shop_config()
    })
    .await
    .expect("the shop starts");
    let config = config_for(&shop, "--smoke --users 2 --poll-interval 10ms");
    let error = loadgen::run(&config).await.unwrap_err().to_string();
    assert!(error.contains("the smoke run failed"), "{error}");
    // The carts and orders refuse a user only a header names: no service believes it.
    assert!(error.contains("answered 401"), "{error}");
    check_stock(&shop).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_smoke_run_fails_on_unexpected_answers() {
    // Behind the JWT gateway, users sending only a header are refused: 401s.
    let shop = spawn_shop().await;
    let config = config_for(&shop, "--smoke --users 2 --auth header");
    let error = loadgen::run(&config).await.unwrap_err().to_string();
    assert!(error.contains("the smoke run failed"), "{error}");
    assert!(error.contains("answered 401"), "{error}");
    // All but the catalog reads, open to anyone, and payment-timeout, of weight 0.
    let journeys = Journey::ALL.len() - 3;
    assert!(
        error.contains(&format!("{journeys} unexpected errors")),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_smoke_run_against_nothing_fails() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let config = loadgen::parse_args(
        ["--smoke", "--target", &format!("http://{addr}")]
            .into_iter()
            .map(str::to_owned),
    )
    .unwrap();
    let error = loadgen::run(&config).await.unwrap_err();
    assert!(
        format!("{error:#}").contains("does not answer"),
        "{error:#}"
    );
}
