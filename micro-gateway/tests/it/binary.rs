//! The `micro-gateway` binary, run as a process.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::{echo, get_json, IntoText};

fn binary() -> Command {
    Command::new(env!("CARGO_BIN_EXE_micro-gateway"))
}

/// Starts the binary on `config` and a free port; returns it and the address it bound.
pub(crate) fn spawn(
    config: &std::path::Path,
    args: &[&str],
) -> (std::process::Child, std::net::SocketAddr) {
    let (child, addrs) = spawn_reporting(config, args);
    let addr = std::iter::from_fn(|| addrs.recv_timeout(Duration::from_secs(20)).ok())
        .find(|(admin, _)| !admin)
        .expect("the gateway did not report its address")
        .1;
    (child, addr)
}

/// Starts the binary on `config` and a free port; returns it and the addresses it logs
/// as it binds them, each marked whether it is the admin listener's.
fn spawn_reporting(
    config: &std::path::Path,
    args: &[&str],
) -> (
    std::process::Child,
    std::sync::mpsc::Receiver<(bool, std::net::SocketAddr)>,
) {
    let mut child = binary()
        .args([
            "--config",
            config.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ])
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // The host logs the address it bound; port 0 picked a free one.
    let stdout = child.stdout.take().unwrap();
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let admin = line.contains("admin endpoints listening");
            if let Some(rest) = line.split("addr=").nth(1) {
                let addr = rest.split_whitespace().next().unwrap().parse().unwrap();
                let _ = addr_tx.send((admin, addr));
            }
        }
    });
    (child, addr_rx)
}

/// Sends SIGTERM and waits (20 s at most) for the process to exit; its exit status.
async fn terminate(child: &mut std::process::Child, what: &str) -> std::process::ExitStatus {
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what} did not stop on SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn echo_config(upstream: std::net::SocketAddr, path: &str) -> String {
    format!("services:\n  - name: echo\n    url: http://{upstream}\n    routes:\n      - paths: [{path}]\n")
}

#[tokio::test]
async fn a_changed_file_is_reloaded_without_dropping_connections() {
    let upstream = echo().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.yaml");
    std::fs::write(&config, echo_config(upstream.addr, "/old")).unwrap();
    let (mut child, addr) = spawn(&config, &["--reload-interval", "50ms"]);
    let _kill = KillOnDrop(&mut child);

    // A keep-alive connection opened before the reload.
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut kept, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    let mut on_kept = |path: &str| {
        let request = http::Request::get(path)
            .header("host", "gateway.test")
            .body(axum::body::Body::empty())
            .unwrap();
        let sent = kept.send_request(request);
        async move { sent.await.unwrap().status() }
    };
    assert_eq!(on_kept("/old/a").await, 200);

    std::fs::write(&config, echo_config(upstream.addr, "/new")).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while get_json(addr, "/new/a", &[]).await.0 != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "the new file was not loaded"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(get_json(addr, "/old/a", &[]).await.0, 404);
    assert_eq!(
        on_kept("/new/a").await,
        200,
        "the old connection still serves"
    );

    // A broken file is refused and counted; the running configuration stays.
    std::fs::write(&config, "services: [{name: broken}]\n").unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let request = http::Request::get("/metrics")
            .body(axum::body::Body::empty())
            .unwrap();
        let (_, metrics) = crate::support::send(addr, request).await.into_text();
        if metrics.contains("micro_gateway_config_reloads_total{result=\"error\"} 1") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the broken file was not refused: {metrics}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(on_kept("/new/a").await, 200);
}

/// Kills the child when the test ends, passed or not.
pub(crate) struct KillOnDrop<'a>(pub(crate) &'a mut std::process::Child);

impl Drop for KillOnDrop<'_> {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn serves_a_config_file_and_stops_on_sigterm() {
    let upstream = echo().await;
    let dir = std::env::temp_dir().join(format!("micro-gateway-it-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("gateway.yaml");
    std::fs::write(
        &config,
        format!(
            "services:\n  - name: echo\n    url: http://{}\n    routes:\n      - paths: [/api]\n",
            upstream.addr
        ),
    )
    .unwrap();
    let (mut child, addr) = spawn(&config, &[]);

    let (status, seen) = get_json(addr, "/api/hello", &[]).await;
    assert_eq!(status, 200);
    assert_eq!(seen["uri"], "/hello");
    // Readiness turns on once the start sequence has run, just after the port listens.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let ready = loop {
        let (status, ready) = get_json(addr, "/health/ready", &[]).await;
        if status == 200 {
            break ready;
        }
        assert!(std::time::Instant::now() < deadline, "never ready: {ready}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(ready["service"], "gateway");

    let status = terminate(&mut child, "the gateway").await;
    assert!(status.success(), "{status}");
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn a_bad_config_stops_it_with_the_place_of_the_problem() {
    let dir = std::env::temp_dir().join(format!("micro-gateway-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("gateway.yaml");
    std::fs::write(
        &config,
        "services:\n  - name: a\n    url: http://x\n    routes:\n      - paths: [nope]\n",
    )
    .unwrap();
    let output = binary()
        .args(["--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("services[0].routes[0]") && stderr.contains("`nope`"),
        "{stderr}"
    );

    let output = binary().output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--config is required"));
    std::fs::remove_dir_all(dir).ok();
}

#[tokio::test]
async fn the_file_names_where_discovery_services_are_found() {
    let upstream = echo().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.yaml");
    let yaml = format!(
        "discovery:\n  static:\n    services:\n      echo-service: [\"{}\"]\nservices:\n  - name: echo\n    discovery: echo-service\n    routes:\n      - paths: [/api]\n",
        upstream.addr
    );
    std::fs::write(&config, yaml).unwrap();
    let (mut child, addr) = spawn(&config, &[]);
    let _kill = KillOnDrop(&mut child);
    let (status, seen) = get_json(addr, "/api/hello", &[]).await;
    assert_eq!(status, 200);
    assert_eq!(seen["uri"], "/hello");
}

#[tokio::test]
async fn current_thread_workers_share_the_port_and_all_stop_on_sigterm() {
    let upstream = echo().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.yaml");
    std::fs::write(&config, echo_config(upstream.addr, "/api")).unwrap();
    let (mut child, addr) = spawn(&config, &["--runtime", "current-thread", "--workers", "3"]);

    // Each call is a new connection; the kernel spreads them over the workers' sockets.
    for i in 0..12 {
        let (status, seen) = get_json(addr, &format!("/api/{i}"), &[]).await;
        assert_eq!(status, 200);
        assert_eq!(seen["uri"], format!("/{i}"));
    }

    let status = terminate(&mut child, "a worker").await;
    assert!(status.success(), "{status}");
}

#[test]
fn runtime_arguments_are_checked() {
    for (args, expected) in [
        (
            &["--runtime", "single"][..],
            "--runtime is `multi-thread` or `current-thread`",
        ),
        (
            &["--workers", "2"][..],
            "--workers is for --runtime current-thread",
        ),
        (
            &["--runtime", "current-thread", "--workers", "0"][..],
            "`0` is not a positive number",
        ),
    ] {
        let output = binary()
            .args(["--config", "gateway.yaml"])
            .args(args)
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}

#[tokio::test]
async fn with_an_admin_listener_the_public_port_serves_routes_only() {
    let upstream = echo().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.yaml");
    std::fs::write(&config, echo_config(upstream.addr, "/")).unwrap();
    let (mut child, addrs) = spawn_reporting(&config, &["--admin", "127.0.0.1:0"]);
    let (mut admin, mut public) = (None, None);
    while admin.is_none() || public.is_none() {
        let (is_admin, addr) = addrs
            .recv_timeout(Duration::from_secs(20))
            .expect("the gateway did not report both addresses");
        *if is_admin { &mut admin } else { &mut public } = Some(addr);
    }
    let (admin, public) = (admin.unwrap(), public.unwrap());
    let _child = KillOnDrop(&mut child);

    // The public port hands every path to the routes, /metrics and /health included.
    let (_, seen) = get_json(public, "/metrics", &[]).await;
    assert_eq!(seen["uri"], "/metrics", "{seen}");
    let (_, seen) = get_json(public, "/health/ready", &[]).await;
    assert_eq!(seen["uri"], "/health/ready", "{seen}");
    // The admin listener has them, and nothing else.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (status, ready) = get_json(admin, "/health/ready", &[]).await;
        if status == 200 {
            assert_eq!(ready["service"], "gateway");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never ready: {ready}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let request = http::Request::get("/metrics")
        .header("host", "admin")
        .body(axum::body::Body::empty())
        .unwrap();
    let (status, metrics) = crate::support::send(admin, request).await.into_text();
    assert_eq!(status, 200);
    assert!(metrics.contains("http_server_requests_total"), "{metrics}");
    let request = http::Request::get("/anything")
        .header("host", "admin")
        .body(axum::body::Body::empty())
        .unwrap();
    let (status, _) = crate::support::send(admin, request).await.into_text();
    assert_eq!(status, 404);
}
