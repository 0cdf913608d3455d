//! The shop as separate processes (`shop serve <service>`) on the real servers: services
//! register in etcd and find each other there; order events go through Kafka (tansu).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use http::Method;
use micro_core::client::HttpClient;
use serde_json::json;

use crate::support::{send, settled, KillOnDrop};

fn server(variable: &str, default: &str) -> String {
    let address = std::env::var(variable).unwrap_or_else(|_| default.to_owned());
    let host_port = address.trim_start_matches("http://").to_owned();
    assert!(
        std::net::TcpStream::connect(&host_port).is_ok(),
        "{address} ({variable}) is unreachable: start the servers with \
         `source scripts/servers.sh && servers_up`"
    );
    address
}

/// Starts `shop serve <service>`; returns it and the address it printed.
fn serve(service: &str, env: &[(&str, String)]) -> (Child, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_shop"));
    command
        .args(["serve", service])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env(
            format!("SHOP_LISTEN__{}", service.to_uppercase()),
            "127.0.0.1:0",
        )
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped());
    let mut child = command.spawn().expect("the shop binary starts");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some((_, url)) = line.split_once("http://") {
                let _ = tx.send(format!("http://{}", url.trim()));
            }
        }
    });
    let url = rx
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("`shop serve {service}` did not start"));
    (child, url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shop_runs_as_one_process_per_service_on_etcd_and_kafka() {
    let etcd = server("MICRO_TEST_ETCD_ENDPOINT", "http://127.0.0.1:23790");
    let kafka = server("MICRO_TEST_KAFKA_BROKERS", "127.0.0.1:19092");
    let data = tempfile::tempdir().unwrap();
    let unique = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let env = vec![
        ("SHOP_DATA_DIR", data.path().display().to_string()),
        ("SHOP_ETCD_ENDPOINTS", etcd),
        ("SHOP_ETCD_PREFIX", format!("/micro/shop-test-{unique}/")),
        ("SHOP_KAFKA_BROKERS", kafka),
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

    let account = json!({"email": "lee@shop.test", "password": "a long password", "name": "Lee"});
    let (status, body) = send(
        &client,
        Method::POST,
        "/api/users/register",
        None,
        None,
        Some(account),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let login = json!({"email": "lee@shop.test", "password": "a long password"});
    let (_, token) = send(
        &client,
        Method::POST,
        "/api/users/login",
        None,
        None,
        Some(login),
    )
    .await;
    let token = token["token"].as_str().unwrap().to_owned();

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

    // The notification service got the order's events over Kafka.
    let path = format!("/api/notifications?order_id={order}");
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let (_, sent) = send(&client, Method::GET, &path, Some(&token), None, None).await;
        if sent.as_array().is_some_and(|s| !s.is_empty()) {
            assert_eq!(sent[0]["kind"], "order_confirmed", "{sent}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no notification came through Kafka"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(processes);
}
