//! The listener limits, tried with raw TCP clients that misbehave on purpose.

use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Bytes;
use axum::routing::{get, post};
use axum::Router;
use micro_core::host::{HostConfig, HostError, RunningHost, ServiceHost};
use micro_core::listener::{Http2Limits, ListenerConfig};
use micro_core::service::Service;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::support::get as http_get;

struct Echo;

impl Service for Echo {
    fn name(&self) -> &str {
        "echo"
    }

    fn router(&self) -> Router {
        Router::new()
            .route("/hello", get(|| async { "hello" }))
            .route("/echo", post(|body: Bytes| async move { body }))
    }
}

async fn start(limits: ListenerConfig) -> (RunningHost, SocketAddr) {
    let host = ServiceHost::builder()
        .service_with(Echo, "127.0.0.1:0".parse().unwrap(), limits)
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let addr = host.local_addr("echo").unwrap();
    (host, addr)
}

/// Reads until the peer closes the connection, failing past `within`. Returns what was read.
async fn until_closed(stream: &mut TcpStream, within: Duration) -> Vec<u8> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return seen,
            Ok(Ok(n)) => seen.extend_from_slice(&buf[..n]),
            Err(_) => panic!(
                "the server kept the connection open past {within:?}; it sent {:?}",
                String::from_utf8_lossy(&seen)
            ),
        }
    }
}

fn resident_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .expect("VmRSS in /proc/self/status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_header_clients_are_closed_while_others_are_served() {
    let limits = ListenerConfig::default().header_read_timeout(Duration::from_millis(800));
    let (host, addr) = start(limits).await;
    let before = resident_kib();

    // Half stall inside the request head, half send nothing at all (stuck before hyper
    // has even seen which HTTP version they speak).
    let mut slow = Vec::new();
    for i in 0..300 {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        if i % 2 == 0 {
            stream
                .write_all(b"GET /hello HTTP/1.1\r\nhost: x\r\nx-slow: ")
                .await
                .unwrap();
        }
        slow.push(stream);
    }
    let served = tokio::spawn(async move {
        let mut served = 0;
        let until = Instant::now() + Duration::from_millis(1500);
        while Instant::now() < until {
            let reply = http_get(addr, "/hello").await.unwrap();
            assert_eq!(reply.body, "hello");
            served += 1;
        }
        served
    });

    for stream in &mut slow {
        let sent = until_closed(stream, Duration::from_secs(10)).await;
        // A client stuck in its head may get a 408 before the close, never a 200.
        assert!(
            !String::from_utf8_lossy(&sent).contains("200 OK"),
            "{:?}",
            String::from_utf8_lossy(&sent)
        );
    }
    assert!(served.await.unwrap() > 0, "a normal client was not served");
    let grown = resident_kib().saturating_sub(before);
    assert!(
        grown < 64 * 1024,
        "300 slow clients grew the process by {grown} KiB"
    );
    host.run_until(async {}).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_are_closed() {
    let limits = ListenerConfig::default()
        .header_read_timeout(Duration::from_secs(30))
        .idle_timeout(Duration::from_millis(500));
    let (host, addr) = start(limits).await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /hello HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = stream.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // Kept alive, then nothing: the idle timeout, not the 30 s header timer, closes it.
    until_closed(&mut stream, Duration::from_secs(5)).await;
    host.run_until(async {}).await;
}

#[tokio::test]
async fn too_many_or_too_large_headers_get_431() {
    let limits = ListenerConfig::default()
        .max_headers(10)
        .max_header_bytes(8192);
    let (host, addr) = start(limits).await;

    let mut many = String::from("GET /hello HTTP/1.1\r\nhost: x\r\n");
    for i in 0..20 {
        many.push_str(&format!("x-h{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(many.as_bytes()).await.unwrap();
    let reply = until_closed(&mut stream, Duration::from_secs(5)).await;
    assert!(
        String::from_utf8_lossy(&reply).starts_with("HTTP/1.1 431"),
        "{:?}",
        String::from_utf8_lossy(&reply)
    );

    let large = format!(
        "GET /hello HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    let mut stream = TcpStream::connect(addr).await.unwrap();
    // The server may stop reading once it has seen enough; a failed write is fine.
    let _ = stream.write_all(large.as_bytes()).await;
    let reply = until_closed(&mut stream, Duration::from_secs(5)).await;
    assert!(
        String::from_utf8_lossy(&reply).starts_with("HTTP/1.1 431"),
        "{:?}",
        String::from_utf8_lossy(&reply)
    );

    // Within the limits, the same request is served.
    assert_eq!(http_get(addr, "/hello").await.unwrap().body, "hello");
    host.run_until(async {}).await;
}

#[tokio::test]
async fn a_stalled_body_is_cut_off() {
    let limits = ListenerConfig::default().body_read_timeout(Duration::from_millis(300));
    let (host, addr) = start(limits).await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n0123456789")
        .await
        .unwrap();
    let reply = until_closed(&mut stream, Duration::from_secs(5)).await;
    let reply = String::from_utf8_lossy(&reply);
    assert!(
        reply.starts_with("HTTP/1.1 4"),
        "a stalled body got {reply:?}"
    );

    // A whole body is echoed.
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhello")
        .await
        .unwrap();
    let reply = until_closed(&mut stream, Duration::from_secs(5)).await;
    let reply = String::from_utf8_lossy(&reply);
    assert!(
        reply.starts_with("HTTP/1.1 200") && reply.ends_with("hello"),
        "{reply:?}"
    );
    host.run_until(async {}).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepting_pauses_at_max_connections() {
    let limits = ListenerConfig::default().max_connections(2);
    let (host, addr) = start(limits).await;
    let mut first = TcpStream::connect(addr).await.unwrap();
    let mut second = TcpStream::connect(addr).await.unwrap();
    for stream in [&mut first, &mut second] {
        stream
            .write_all(b"GET /hello HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 512];
        let n = stream.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    }
    // The kernel completes the third handshake, but the server does not accept it.
    let third = tokio::spawn(http_get(addr, "/hello"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !third.is_finished(),
        "a third connection was served past the limit"
    );
    // The two open connections are still served.
    first
        .write_all(b"GET /hello HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 512];
    let n = first.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    drop(second);
    let reply = tokio::time::timeout(Duration::from_secs(5), third)
        .await
        .expect("the third connection is served once one closes")
        .unwrap()
        .unwrap();
    assert_eq!(reply.body, "hello");
    drop(first);
    host.run_until(async {}).await;
}

/// The server's first SETTINGS frame after the HTTP/2 preface, as (id, value) pairs.
async fn server_settings(addr: SocketAddr) -> Vec<(u16, u32)> {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let mut header = [0u8; 9];
    stream.read_exact(&mut header).await.unwrap();
    assert_eq!(header[3], 0x4, "the first frame is SETTINGS");
    let len = usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).await.unwrap();
    payload
        .chunks(6)
        .map(|s| {
            (
                u16::from_be_bytes([s[0], s[1]]),
                u32::from_be_bytes([s[2], s[3], s[4], s[5]]),
            )
        })
        .collect()
}

#[tokio::test]
async fn http2_limits_are_announced() {
    let limits = ListenerConfig::default().http2(
        Http2Limits::default()
            .max_concurrent_streams(7)
            .max_header_list_size(12_345),
    );
    let (host, addr) = start(limits).await;
    let settings = server_settings(addr).await;
    assert!(settings.contains(&(0x3, 7)), "{settings:?}");
    assert!(settings.contains(&(0x6, 12_345)), "{settings:?}");
    host.run_until(async {}).await;
}

#[tokio::test]
async fn limits_come_from_configuration_per_service() {
    let config: HostConfig = micro_core::config::ConfigLoader::new()
        .toml_str(
            "[listener]\nmax_headers = 50\n[listeners.echo]\n[listeners.echo.http2]\nmax_concurrent_streams = 3\n",
        )
        .load()
        .unwrap();
    assert_eq!(config.listener.max_headers, 50);
    let host = ServiceHost::builder()
        .config(config)
        .service(Echo, "127.0.0.1:0".parse().unwrap())
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let settings = server_settings(host.local_addr("echo").unwrap()).await;
    assert!(settings.contains(&(0x3, 3)), "{settings:?}");
    host.run_until(async {}).await;

    let mut config = HostConfig::default();
    config
        .listeners
        .insert("ghost".into(), ListenerConfig::default());
    let error = ServiceHost::builder()
        .config(config)
        .service(Echo, "127.0.0.1:0".parse().unwrap())
        .build()
        .unwrap_err();
    assert!(matches!(error, HostError::UnknownListener(ref name) if name == "ghost"));

    let error = ServiceHost::builder()
        .service_with(
            Echo,
            "127.0.0.1:0".parse().unwrap(),
            ListenerConfig::default().max_connections(0),
        )
        .build()
        .unwrap_err();
    let HostError::Listener { service, source } = error else {
        panic!("{error}")
    };
    assert_eq!(
        (service.as_str(), source.key()),
        ("echo", "max_connections")
    );
}

#[tokio::test]
async fn invented_methods_and_paths_create_no_metric_series() {
    let (host, addr) = start(ListenerConfig::default()).await;
    for i in 0..20 {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let request =
            format!("FOO{i} /random-{i} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let reply = until_closed(&mut stream, Duration::from_secs(5)).await;
        assert!(String::from_utf8_lossy(&reply).starts_with("HTTP/1.1 "));
    }
    let metrics = http_get(addr, "/metrics").await.unwrap().body;
    let series: Vec<&str> = metrics
        .lines()
        .filter(|line| line.starts_with("http_server_requests_total{"))
        .collect();
    assert!(
        series.iter().any(
            |line| line.contains(r#"method="_OTHER""#) && line.contains(r#"route="unmatched""#)
        ),
        "{series:?}"
    );
    assert!(
        !metrics.contains("FOO") && !metrics.contains("random-"),
        "a client's method or path became a label: {series:?}"
    );
    host.run_until(async {}).await;
}
