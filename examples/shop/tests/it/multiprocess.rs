//! The shop as separate processes (`shop serve <service>`) on the real servers: services
//! register in etcd and find each other there; order events go through Kafka (tansu)
//! from a PostgreSQL outbox; orders and order sagas are kept in PostgreSQL, carts in
//! Redis.

use std::process::Command;
use std::time::{Duration, Instant};

use http::Method;
use micro_core::client::HttpClient;

use crate::support::{send, serve, server, settled, sign_up, KillOnDrop, TEST_IDENTITY_SECRET};

#[test]
fn shop_serve_refuses_a_guessable_jwt_secret() {
    for (service, secret) in [
        ("user", None),
        ("gateway", None),
        ("user", Some("too-short")),
        ("gateway", Some("please-change-me-before-going-live-now")),
    ] {
        let mut command = Command::new(env!("CARGO_BIN_EXE_shop"));
        command
            .args(["serve", service])
            .env_remove("SHOP_JWT_SECRET");
        if let Some(secret) = secret {
            command.env("SHOP_JWT_SECRET", secret);
        }
        let output = command.output().expect("the shop binary runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !output.status.success(),
            "{service} started with {secret:?}"
        );
        assert!(
            stderr.contains("`jwt_secret` (SHOP_JWT_SECRET)"),
            "{service}, {secret:?}: {stderr}"
        );
    }
}

#[test]
fn shop_serve_refuses_to_run_without_the_services_key() {
    for (secret, expected) in [
        (None, "`shop serve` needs the services' key"),
        (
            Some("short"),
            "`identity_secret` (SHOP_IDENTITY_SECRET) is unusable",
        ),
    ] {
        let mut command = Command::new(env!("CARGO_BIN_EXE_shop"));
        command
            .args(["serve", "payment"])
            .env_remove("SHOP_IDENTITY_SECRET")
            .env_remove("SHOP_IDENTITY_KEYS_FILE");
        if let Some(secret) = secret {
            command.env("SHOP_IDENTITY_SECRET", secret);
        }
        let output = command.output().expect("the shop binary runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "started with {secret:?}");
        assert!(stderr.contains(expected), "{secret:?}: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shop_runs_as_one_process_per_service_on_etcd_and_kafka() {
    let etcd = server("MICRO_TEST_ETCD_ENDPOINT", "http://127.0.0.1:23790");
    let kafka = server("MICRO_TEST_KAFKA_BROKERS", "127.0.0.1:19092");
    let kafka_brokers = kafka.clone();
    let redis = server("MICRO_TEST_REDIS_URL", "redis://127.0.0.1:6379");
    let postgres = std::env::var("MICRO_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    assert!(
        std::net::TcpStream::connect("127.0.0.1:5432").is_ok()
            || postgres.contains('@') && !postgres.contains("127.0.0.1:5432"),
        "PostgreSQL ({postgres}) is unreachable"
    );
    let data = tempfile::tempdir().unwrap();
    let unique = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let schema = format!("shop_test_{}", unique.replace('-', "_"));
    // The shop's gateway file, with a limit of three profile reads a minute per user.
    let profile_route = "        rewrite: /me\n        methods: [GET]\n";
    assert!(shop::app::GATEWAY_YAML.contains(profile_route));
    let yaml = shop::app::GATEWAY_YAML.replace(
        profile_route,
        &format!(
            "{profile_route}        plugins:\n          - name: rate-limiting\n            config: {{ minute: 3, limit_by: consumer }}\n"
        ),
    );
    let gateway_file = data.path().join("gateway.yaml");
    std::fs::write(&gateway_file, yaml).unwrap();
    let env = vec![
        ("SHOP_DATA_DIR", data.path().display().to_string()),
        ("SHOP_ETCD_ENDPOINTS", etcd),
        ("SHOP_ETCD_PREFIX", format!("/micro/shop-test-{unique}/")),
        ("SHOP_KAFKA_BROKERS", kafka),
        // A topic and a consumer group of this run's own on the shared broker.
        ("SHOP_EVENT_PREFIX", format!("test-{unique}-")),
        // Carts in the real Redis, under keys of this run's own.
        ("SHOP_REDIS_URL", redis),
        ("SHOP_REDIS_PREFIX", format!("shop-test-{unique}:")),
        // Orders, their outbox and the order sagas in the real PostgreSQL, in schemas of
        // this run's own.
        ("SHOP_POSTGRES_URL", postgres.clone()),
        ("SHOP_POSTGRES_SCHEMA", schema.clone()),
        // Longer than the order saga's charge timeout, so the timeout card times out.
        ("SHOP_PAYMENT_HANG", "10s".to_owned()),
        ("SHOP_GATEWAY_CONFIG", gateway_file.display().to_string()),
    ];
    let mut processes = Vec::new();
    let mut gateway = String::new();
    for service in shop::app::SERVICES {
        let (child, url) = serve(service, &env);
        if *service == "gateway" {
            gateway = url;
        }
        processes.push(KillOnDrop(child));
    }
    // A second order-service replica on the same PostgreSQL saga log: the gateway
    // spreads checkouts over both, and their leases keep each saga to one of them.
    let (replica, _) = serve("order", &env);
    processes.push(KillOnDrop(replica));
    let client = HttpClient::builder(&gateway)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();

    // Registrations reach the gateway through etcd.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, _) = send(
            &client,
            Method::GET,
            "/api/products/SKU-1001",
            None,
            None,
            None,
        )
        .await;
        if status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the catalog never became reachable: {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let token = sign_up(&client, "lee@shop.test").await;

    let order =
        crate::support::checkout(&client, &token, "mp-1", "SKU-1004", "4242424242424242").await;
    let confirmed = settled(&client, &token, &order).await;
    assert_eq!(confirmed["status"], "CONFIRMED", "{confirmed}");
    let declined =
        crate::support::checkout(&client, &token, "mp-2", "SKU-1005", "4000000000000002").await;
    assert_eq!(
        settled(&client, &token, &declined).await["status"],
        "CANCELLED"
    );
    let out_of_stock =
        crate::support::checkout(&client, &token, "mp-3", "SKU-OOS", "4242424242424242").await;
    let cancelled = settled(&client, &token, &out_of_stock).await;
    assert_eq!(cancelled["status"], "CANCELLED", "{cancelled}");
    assert!(
        cancelled.to_string().contains("out of stock"),
        "{cancelled}"
    );
    let stuck =
        crate::support::checkout(&client, &token, "mp-4", "SKU-OOS", "4000000000000341").await;
    assert_eq!(
        settled(&client, &token, &stuck).await["status"],
        "REQUIRES_ATTENTION"
    );
    let slow =
        crate::support::checkout(&client, &token, "mp-5", "SKU-1006", "4000000000000119").await;
    assert_eq!(settled(&client, &token, &slow).await["status"], "CANCELLED");
    let again =
        crate::support::checkout(&client, &token, "mp-1", "SKU-1007", "4242424242424242").await;
    assert_eq!(again, order, "the same key answers the same order");
    let (status, body) = send(
        &client,
        Method::POST,
        &format!("/api/orders/{order}/cancel"),
        Some(&token),
        None,
        None,
    )
    .await;
    assert_eq!(
        (status, &body["status"]),
        (200, &serde_json::json!("CANCELLED"))
    );
    let kept =
        crate::support::checkout(&client, &token, "mp-6", "SKU-1008", "4242424242424242").await;
    assert_eq!(settled(&client, &token, &kept).await["status"], "CONFIRMED");

    // A cancel while the inventory service is down: the refund passes, the release is
    // retried, and the order waits CANCELLING (never CANCELLED with its stock missing);
    // once an inventory runs again the cancel-order saga finishes.
    let waited =
        crate::support::checkout(&client, &token, "mp-7", "SKU-1003", "4242424242424242").await;
    assert_eq!(
        settled(&client, &token, &waited).await["status"],
        "CONFIRMED"
    );
    let inventory = shop::app::SERVICES
        .iter()
        .position(|s| *s == "inventory")
        .unwrap();
    // Stopped (SIGTERM), so that it leaves etcd and no caller keeps its address.
    let mut stopped = processes.remove(inventory);
    let sent = Command::new("kill")
        .args(["-TERM", &stopped.0.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    stopped.0.wait().unwrap();
    let (status, body) = send(
        &client,
        Method::POST,
        &format!("/api/orders/{waited}/cancel"),
        Some(&token),
        None,
        None,
    )
    .await;
    assert_eq!(
        (status, &body["status"]),
        (202, &serde_json::json!("CANCELLING")),
        "{body}"
    );
    let waited_payments = format!("/api/payments?order_id={waited}");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut polls_after_refund = 0;
    while polls_after_refund < 5 {
        let path = format!("/api/orders/{waited}");
        let (_, now) = send(&client, Method::GET, &path, Some(&token), None, None).await;
        assert_eq!(now["status"], "CANCELLING", "{now}");
        let (_, payments) = send(
            &client,
            Method::GET,
            &waited_payments,
            Some(&token),
            None,
            None,
        )
        .await;
        if payments[0]["status"] == "REFUNDED" {
            polls_after_refund += 1;
        }
        assert!(Instant::now() < deadline, "never refunded: {payments}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let (restarted, _) = serve("inventory", &env);
    processes.push(KillOnDrop(restarted));
    let cancelled = settled(&client, &token, &waited).await;
    assert_eq!(cancelled["status"], "CANCELLED", "{cancelled}");
    // The gateway finds the new inventory too.
    let deadline = Instant::now() + Duration::from_secs(60);
    while send(
        &client,
        Method::GET,
        "/api/inventory",
        Some(&token),
        None,
        None,
    )
    .await
    .0 != 200
    {
        assert!(
            Instant::now() < deadline,
            "the gateway never found the inventory"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, _) = send(&client, Method::GET, "/api/orders", None, None, None).await;
    assert_eq!(status, 401);
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let (status, _) = send(
            &client,
            Method::GET,
            "/api/users/me",
            Some(&token),
            None,
            None,
        )
        .await;
        statuses.push(status);
    }
    assert_eq!(
        statuses,
        [200, 200, 200, 429],
        "three profile reads a minute"
    );

    // Every charge is matched by a confirmed order, a refund, or an order needing
    // attention; nothing is left reserved; stock is conserved.
    let expected = [
        (&order, "REFUNDED"),
        (&waited, "REFUNDED"),
        (&out_of_stock, "REFUNDED"),
        (&stuck, "CAPTURED"),
        (&kept, "CAPTURED"),
    ];
    for (id, status) in expected {
        let path = format!("/api/payments?order_id={id}");
        let (_, payments) = send(&client, Method::GET, &path, Some(&token), None, None).await;
        assert_eq!(payments.as_array().map(Vec::len), Some(1), "{payments}");
        assert_eq!(payments[0]["status"], status, "{payments}");
    }
    for id in [&declined, &slow] {
        let path = format!("/api/payments?order_id={id}");
        let (_, payments) = send(&client, Method::GET, &path, Some(&token), None, None).await;
        assert!(
            payments
                .as_array()
                .is_some_and(|p| p.iter().all(|p| p["status"] != "CAPTURED")),
            "{payments}"
        );
    }
    check_stock(&client, &token, &[("SKU-1008", 1)]).await;

    // The load generator's smoke run finds no unexpected error.
    let mut options = shop::loadgen::LoadgenConfig {
        target: gateway.clone(),
        smoke: true,
        ..Default::default()
    };
    options
        .weights
        .set(shop::loadgen::Journey::PaymentTimeout, 0);
    let report = shop::loadgen::run(&options)
        .await
        .expect("the smoke run passes");
    assert_eq!(report.unexpected_errors(), 0, "{report}");
    check_stock(&client, &token, &[]).await;

    // The notification service got the order's events over Kafka.
    let path = format!("/api/notifications?order_id={order}");
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let (_, sent) = send(&client, Method::GET, &path, Some(&token), None, None).await;
        let kinds: Vec<&str> = sent
            .as_array()
            .map(|s| s.iter().filter_map(|n| n["kind"].as_str()).collect())
            .unwrap_or_default();
        // Confirmed, then cancelled by its owner: two messages, each sent once.
        if kinds.len() >= 2 {
            assert_eq!(kinds.len(), 2, "{sent}");
            assert!(
                kinds.contains(&"order_confirmed") && kinds.contains(&"order_cancelled"),
                "{sent}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no notification came through Kafka"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The confirmation delivered again over Kafka sends nothing twice: a duplicate, then a
    // marker on the same key (so the same partition, consumed after it).
    let path_sent = path.clone();
    let (_, sent) = send(&client, Method::GET, &path_sent, Some(&token), None, None).await;
    let confirmation = sent
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["kind"] == "order_confirmed")
        .unwrap()
        .clone();
    let total = shop::catalog::Money {
        amount: 1450,
        currency: "USD".to_owned(),
    };
    let duplicate = shop::events::OrderEvent::OrderConfirmed {
        order_id: order.clone(),
        user_id: confirmation["user_id"].as_str().unwrap().to_owned(),
        total: total.clone(),
    }
    .envelope(confirmation["event_id"].as_str().unwrap())
    .unwrap();
    let marker_order = format!("marker-{unique}");
    // The marker is the same user's, who alone may read its notifications.
    let marker = shop::events::OrderEvent::OrderConfirmed {
        order_id: marker_order.clone(),
        user_id: confirmation["user_id"].as_str().unwrap().to_owned(),
        total,
    }
    .envelope(&format!("{marker_order}:notify"))
    .unwrap();
    // Signed as the order service with the services' key, as the consumer requires.
    let bus = micro_events::identity::SignedPublisher::new(
        micro_events::kafka::KafkaBus::new(micro_events::kafka::KafkaConfig::new(
            kafka_brokers.as_str(),
        ))
        .unwrap(),
        shop::trust::keys_from_secret(TEST_IDENTITY_SECRET).unwrap(),
        "order-service",
    );
    let topic = format!("test-{unique}-order-events");
    use micro_events::PublisherExt as _;
    bus.publish(&topic, &order, &duplicate).await.unwrap();
    bus.publish(&topic, &order, &marker).await.unwrap();
    let marker_path = format!("/api/notifications?order_id={marker_order}");
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let (_, sent) = send(&client, Method::GET, &marker_path, Some(&token), None, None).await;
        if sent.as_array().is_some_and(|s| !s.is_empty()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the marker event was not consumed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, sent) = send(&client, Method::GET, &path_sent, Some(&token), None, None).await;
    assert_eq!(
        sent.as_array().map(Vec::len),
        Some(2),
        "the duplicate sent nothing: {sent}"
    );
    drop(processes);

    // The orders were in PostgreSQL: the schema holds them. Then it goes.
    let (client, connection) = tokio_postgres::connect(&postgres, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let row = client
        .query_one(&format!("SELECT count(*) FROM {schema}_orders.orders"), &[])
        .await
        .unwrap();
    assert!(row.get::<_, i64>(0) >= 8, "the orders are in PostgreSQL");
    // No table of the shop's schemas, the saga log and the outbox included, holds a card
    // number: the payment service (on its own embedded store) is their only holder.
    let tables = client
        .query(
            "SELECT table_schema, table_name FROM information_schema.tables
             WHERE table_schema LIKE $1 AND table_type = 'BASE TABLE'",
            &[&format!("{schema}\\_%")],
        )
        .await
        .unwrap();
    let names: Vec<String> = tables
        .iter()
        .map(|t| format!("{}.{}", t.get::<_, String>(0), t.get::<_, String>(1)))
        .collect();
    assert!(
        names
            .iter()
            .any(|n| n.ends_with("_order_sagas.sagas") || n.contains("_order_sagas.")),
        "no saga log among {names:?}"
    );
    let mut rows_scanned = 0;
    for table in &names {
        let rows = client
            .query(&format!("SELECT row_to_json(t)::text FROM {table} t"), &[])
            .await
            .unwrap();
        for row in rows {
            let text: String = row.get(0);
            for card in [
                "4242424242424242",
                "4000000000000002",
                "4000000000000341",
                "4000000000000119",
            ] {
                assert!(
                    !text.contains(card),
                    "{table} holds the card number {card}: {text}"
                );
            }
            rows_scanned += 1;
        }
    }
    assert!(rows_scanned >= 14, "only {rows_scanned} rows in {names:?}");
    // Each cancel wrote its PaymentRefunded and its OrderCancelled once, in that order.
    for id in [&order, &waited] {
        let rows = client
            .query(
                &format!(
                    "SELECT convert_from(payload, 'UTF8')::jsonb ->> 'type'
                     FROM {schema}_orders.outbox WHERE key = convert_to($1, 'UTF8') ORDER BY id"
                ),
                &[id],
            )
            .await
            .unwrap();
        let types: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        let of = |kind: &str| types.iter().filter(|t| t.ends_with(kind)).count();
        assert_eq!(
            (of("PaymentRefunded"), of("OrderCancelled")),
            (1, 1),
            "{types:?}"
        );
        let refunded = types.iter().position(|t| t.ends_with("PaymentRefunded"));
        assert!(
            refunded < types.iter().position(|t| t.ends_with("OrderCancelled")),
            "{types:?}"
        );
    }
    client
        .batch_execute(&format!(
            "DROP SCHEMA {schema}_orders CASCADE; DROP SCHEMA {schema}_order_sagas CASCADE;
             DROP SCHEMA {schema}_users CASCADE; DROP SCHEMA {schema}_products CASCADE;"
        ))
        .await
        .unwrap();
}

/// For every SKU, available + reserved + committed is the starting stock, and nothing
/// stays reserved once orders settle; `committed` lists some SKUs' exact commitments.
async fn check_stock(client: &HttpClient, token: &str, committed: &[(&str, i64)]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, levels) = send(
            client,
            Method::GET,
            "/api/inventory",
            Some(token),
            None,
            None,
        )
        .await;
        assert_eq!(status, 200, "{levels}");
        let levels = levels.as_object().unwrap();
        let settled = levels.values().all(|s| s["reserved"] == 0);
        if settled || Instant::now() > deadline {
            for (sku, stock) in levels {
                let initial = if sku == "SKU-OOS" { 0 } else { 100 };
                let sum = stock["available"].as_i64().unwrap()
                    + stock["reserved"].as_i64().unwrap()
                    + stock["committed"].as_i64().unwrap();
                assert_eq!(sum, initial, "{sku}: {stock}");
                assert_eq!(stock["reserved"], 0, "{sku}: {stock}");
            }
            for (sku, units) in committed {
                assert_eq!(levels[*sku]["committed"], *units, "{sku}");
            }
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
