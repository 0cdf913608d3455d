use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::body::Body;
use axum::routing::get;
use axum::Router;
use micro_gateway::proxy::{Proxy, ProxyConfig, Upstream};
use tokio::io::AsyncReadExt;

use crate::support::{echo, gateway, get_json, send, serve_counting};

fn proxy_to(addr: std::net::SocketAddr, config: ProxyConfig) -> Router {
    Router::new().nest_service("/api", Proxy::new(Upstream::from_addr(addr), config))
}

#[tokio::test]
async fn forwards_path_query_and_headers_and_strips_hop_by_hop_ones() {
    let upstream = echo().await;
    // The test is the load balancer in front: its forwarding headers are believed.
    let config = ProxyConfig::new().trusted_proxies(["127.0.0.0/8".parse().unwrap()]);
    let (_host, addr) = gateway(proxy_to(upstream.addr, config)).await;
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let (status, seen) = get_json(
        addr,
        "/api/orders/7?expand=items",
        &[
            ("connection", "x-hop"),
            ("x-hop", "secret"),
            ("keep-alive", "timeout=5"),
            ("x-forwarded-for", "203.0.113.7"),
            ("x-request-id", "req-123"),
            ("traceparent", traceparent),
            ("accept", "application/json"),
        ],
    )
    .await;
    assert_eq!(status, 200, "{seen}");
    assert_eq!(seen["uri"], "/orders/7?expand=items");
    let headers = &seen["headers"];
    assert!(headers.get("x-hop").is_none(), "{seen}");
    assert!(headers.get("keep-alive").is_none(), "{seen}");
    assert_eq!(headers["accept"], "application/json");
    assert_eq!(headers["x-forwarded-for"], "203.0.113.7, 127.0.0.1");
    assert_eq!(headers["x-forwarded-proto"], "http");
    assert_eq!(headers["x-forwarded-host"], "gateway.test");
    assert_eq!(
        headers["forwarded"],
        "for=127.0.0.1;proto=http;host=\"gateway.test\""
    );
    assert_eq!(headers["host"], upstream.addr.to_string());
    assert_eq!(headers["x-request-id"], "req-123");
    let forwarded_trace = headers["traceparent"].as_str().unwrap();
    assert!(
        forwarded_trace.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "{forwarded_trace}"
    );
    assert_ne!(
        forwarded_trace, traceparent,
        "the gateway's hop is a span of its own"
    );
}

#[tokio::test]
async fn keeps_upstream_connections_alive_and_speaks_h2c() {
    let upstream = echo().await;
    let (_host, addr) = gateway(proxy_to(upstream.addr, ProxyConfig::new())).await;
    for _ in 0..5 {
        let (status, seen) = get_json(addr, "/api/ping", &[]).await;
        assert_eq!(status, 200);
        assert_eq!(seen["version"], "HTTP/1.1");
    }
    assert_eq!(upstream.connections.load(Ordering::SeqCst), 1);

    let upstream = echo().await;
    let (_host, addr) = gateway(proxy_to(upstream.addr, ProxyConfig::new().http2(true))).await;
    let (_, seen) = get_json(addr, "/api/ping", &[]).await;
    assert_eq!(seen["version"], "HTTP/2.0");
}

#[tokio::test]
async fn streams_bodies_without_buffering_them_whole() {
    // The upstream sends a first chunk, then waits for the test before finishing: the
    // client can only read the first chunk if the gateway streams.
    let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
    let release = std::sync::Arc::new(std::sync::Mutex::new(Some(release_rx)));
    let app = Router::new().route(
        "/slow-stream",
        get(move || {
            let release = release.lock().unwrap().take().unwrap();
            async move {
                let (chunks, body) = tokio::sync::mpsc::channel(2);
                chunks
                    .send(bytes::Bytes::from_static(b"first-chunk"))
                    .await
                    .unwrap();
                tokio::spawn(async move {
                    let _ = release.await;
                    let _ = chunks.send(bytes::Bytes::from_static(b"last-chunk")).await;
                });
                Body::new(ChannelBody(body))
            }
        }),
    );
    let upstream = serve_counting(app).await;
    let (_host, addr) = gateway(proxy_to(upstream.addr, ProxyConfig::new())).await;

    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(
        &mut stream,
        b"GET /api/slow-stream HTTP/1.1\r\nhost: g\r\n\r\n",
    )
    .await
    .unwrap();
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    while !String::from_utf8_lossy(&received).contains("first-chunk") {
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buffer))
            .await
            .expect("the first chunk did not arrive while the upstream was still sending")
            .unwrap();
        assert_ne!(read, 0, "connection closed early");
        received.extend_from_slice(&buffer[..read]);
    }
    release_tx.send(()).unwrap();

    // A large request body goes through too.
    let echo = echo().await;
    let (_host, addr) = gateway(proxy_to(echo.addr, ProxyConfig::new())).await;
    let big = vec![b'x'; 8 * 1024 * 1024];
    let request = http::Request::post("/api/upload")
        .header("host", "g")
        .body(Body::from(big))
        .unwrap();
    let (status, _, body) = send(addr, request).await;
    assert_eq!(status, 200);
    let seen: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(seen["body_len"], 8 * 1024 * 1024);
}

/// A response body fed by a channel, so a test decides when each chunk is sent.
struct ChannelBody(tokio::sync::mpsc::Receiver<bytes::Bytes>);

impl http_body::Body for ChannelBody {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|c| Ok(http_body::Frame::data(c))))
    }
}

#[tokio::test]
async fn an_unreachable_upstream_is_a_502_with_a_json_body() {
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let (_host, addr) = gateway(proxy_to(closed, ProxyConfig::new())).await;
    let (status, body) = get_json(addr, "/api/orders", &[]).await;
    assert_eq!(status, 502);
    assert_eq!(body["error"]["code"], "upstream_unreachable");
}

#[tokio::test]
async fn an_upstream_that_drops_connections_is_a_502() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let reset = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut buffer = [0u8; 1024];
            let _ = stream.read(&mut buffer).await;
            drop(stream);
        }
    });
    let (_host, addr) = gateway(proxy_to(reset, ProxyConfig::new())).await;
    let (status, body) = get_json(addr, "/api/orders", &[]).await;
    assert_eq!(status, 502);
    assert_eq!(body["error"]["code"], "upstream_failed");
}

#[tokio::test]
async fn a_slow_upstream_is_a_504() {
    let app = Router::new().route("/slow", get(std::future::pending::<()>));
    let upstream = serve_counting(app).await;
    let config = ProxyConfig::new().timeout(Duration::from_millis(100));
    let (_host, addr) = gateway(proxy_to(upstream.addr, config)).await;
    let (status, body) = get_json(addr, "/api/slow", &[]).await;
    assert_eq!(status, 504);
    assert_eq!(body["error"]["code"], "upstream_timeout");
}

/// An upstream answering `GET /hello` over TLS only, on a real micro-core listener, with
/// a certificate for 127.0.0.1 issued by a CA made here (`ca.pem` in `dir`).
async fn tls_upstream(
    dir: &std::path::Path,
) -> (micro_core::host::RunningHost, std::net::SocketAddr) {
    let app = Router::new().route("/hello", get(|| async { "hello over tls" }));
    crate::support::serve_tls(app, dir).await
}

async fn body_of(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let request = http::Request::get(path)
        .header("host", "gateway.test")
        .body(Body::empty())
        .unwrap();
    let (status, _, body) = send(addr, request).await;
    (status.as_u16(), String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn https_upstreams_are_verified_against_the_configured_ca() {
    let dir = tempfile::tempdir().unwrap();
    let (_upstream, upstream) = tls_upstream(dir.path()).await;
    let url = format!("https://{upstream}");
    let ca = micro_core::tls::ClientTlsConfig::new().ca(dir.path().join("ca.pem"));

    let trusted = Proxy::try_new(
        Upstream::parse(&url).unwrap(),
        ProxyConfig::new().tls(ca.clone()),
    )
    .unwrap();
    let untrusted = Proxy::new(Upstream::parse(&url).unwrap(), ProxyConfig::new());
    let router = Router::new()
        .nest_service("/trusted", trusted)
        .nest_service("/untrusted", untrusted);
    let (_host, addr) = gateway(router).await;
    assert_eq!(
        body_of(addr, "/trusted/hello").await,
        (200, "hello over tls".to_owned())
    );
    // The system store does not know the test CA: nothing reaches the upstream.
    let (status, body) = body_of(addr, "/untrusted/hello").await;
    assert_eq!(status, 502, "{body}");
    assert!(!body.contains("hello over tls"));

    // From the declarative file, with the CA of our `tls` addition.
    let yaml = format!(
        "services:\n  - name: secure\n    url: {url}\n    tls:\n      ca: {ca}\n    routes:\n      - paths: [/secure]\n",
        ca = dir.path().join("ca.pem").display()
    );
    let config = micro_gateway::config::DeclarativeConfig::from_yaml(&yaml).unwrap();
    let (_host, addr) = gateway(config.build().unwrap().into_router()).await;
    assert_eq!(
        body_of(addr, "/secure/hello").await,
        (200, "hello over tls".to_owned())
    );

    // A CA file that can't be read, or `tls` on an http upstream, is refused at load.
    let missing = yaml.replace("ca.pem", "nope.pem");
    let error = micro_gateway::config::DeclarativeConfig::from_yaml(&missing)
        .and_then(|c| c.build().map(|_| ()))
        .unwrap_err();
    assert!(error.to_string().contains("tls.ca"), "{error}");
    let plain = yaml.replace("https://", "http://");
    let error = micro_gateway::config::DeclarativeConfig::from_yaml(&plain)
        .and_then(|c| c.build().map(|_| ()))
        .unwrap_err();
    assert!(
        error.to_string().contains("`tls` needs an `https` url"),
        "{error}"
    );
}
