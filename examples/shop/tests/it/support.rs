//! What the process tests share: calls through the gateway, starting `shop serve`
//! processes, and process cleanup.

#[cfg(feature = "real-servers")]
use std::io::{BufRead, BufReader};
#[cfg(feature = "real-servers")]
use std::path::Path;
use std::process::Child;
#[cfg(feature = "real-servers")]
use std::process::{Command, Stdio};
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

/// The address in `variable` (else `default`), checked to accept connections.
#[cfg(feature = "real-servers")]
pub(crate) fn server(variable: &str, default: &str) -> String {
    let address = std::env::var(variable).unwrap_or_else(|_| default.to_owned());
    let host_port = address
        .trim_start_matches("http://")
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .to_owned();
    assert!(
        std::net::TcpStream::connect(&host_port).is_ok(),
        "{address} ({variable}) is unreachable: start the servers with \
         `source scripts/servers.sh && servers_up`"
    );
    address
}

#[cfg(feature = "real-servers")]
/// The token secret of these test processes (`shop serve` refuses the built-in default).
pub(crate) const TEST_JWT_SECRET: &str = "multi-process test secret, 9f3c1a77e0b24d58a6c1";
#[cfg(feature = "real-servers")]
/// The services' key of these test processes (`shop serve` has none built in).
pub(crate) const TEST_IDENTITY_SECRET: &str = "multi-process service key, 51b0c9e2d47f8a36e5d2";

#[cfg(feature = "real-servers")]
/// Starts `shop serve <service>` on a free port; returns it and the address it printed.
pub(crate) fn serve(service: &str, env: &[(&str, String)]) -> (Child, String) {
    serve_at(service, env, "127.0.0.1:0", None)
}

#[cfg(feature = "real-servers")]
/// Starts `shop serve <service>` listening on `listen`, its log (stderr) appended to
/// `log` when given; returns it and the address it printed.
pub(crate) fn serve_at(
    service: &str,
    env: &[(&str, String)],
    listen: &str,
    log: Option<&Path>,
) -> (Child, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_shop"));
    command
        .args(["serve", service])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env(format!("SHOP_LISTEN__{}", service.to_uppercase()), listen)
        .env("SHOP_JWT_SECRET", TEST_JWT_SECRET)
        .env("SHOP_IDENTITY_SECRET", TEST_IDENTITY_SECRET)
        .env("SHOP_PASSWORD_ITERATIONS", "10000")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped());
    let mut log = log.map(|log| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap()
    });
    if let Some(file) = &log {
        command.stderr(file.try_clone().unwrap());
    }
    let mut child = command.spawn().expect("the shop binary starts");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::Write as _;
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(file) = &mut log {
                let _ = writeln!(file, "{line}");
            }
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
