//! Attacks on the edge, through the `micro-gateway` binary with a raw TCP client (HTTP
//! clients normalize paths themselves, so they cannot send these spellings).

use std::sync::{Arc, Mutex};

use axum::extract::Request;
use axum::routing::any;
use axum::Router;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::binary::{spawn, KillOnDrop};
use crate::support::serve_counting;

/// Writes `raw` on a new connection and reads the status code and body of the answer.
async fn raw(addr: std::net::SocketAddr, raw: &[u8]) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(raw).await.unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {answer:?}"));
    let body = answer
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_owned());
    (status, body)
}

fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: gateway.test\r\nConnection: close\r\n\r\n").into_bytes()
}

#[tokio::test]
async fn no_spelling_of_a_path_reaches_a_protected_route_unauthenticated() {
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let record = seen.clone();
    let upstream = serve_counting(Router::new().fallback(any(move |request: Request| {
        let record = record.clone();
        async move {
            let mut seen = request.uri().to_string();
            if request.uri().path() == "/public/headers" {
                let names: Vec<&str> = request.headers().keys().map(|n| n.as_str()).collect();
                seen = names.join(",");
            }
            record.lock().unwrap().push(seen);
            "ok"
        }
    })))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.yaml");
    let yaml = format!(
        r#"
services:
  - name: public
    url: http://{up}
    routes:
      - paths: [/public]
        strip_path: false
  - name: api
    url: http://{up}
    routes:
      - paths: [/api]
        strip_path: false
        plugins:
          - name: jwt
            config:
              keys: [{{ algorithm: HS256, secret: "s3cret" }}]
  - name: files
    url: http://{up}
    allow_encoded_slashes: true
    routes:
      - paths: [/files]
        strip_path: false
"#,
        up = upstream.addr
    );
    std::fs::write(&config, yaml).unwrap();
    let (mut child, addr) = spawn(&config, &[]);
    let _kill = KillOnDrop(&mut child);

    // Every spelling of `..` lands on the protected route, which wants a token.
    for path in [
        "/public/../api/secret",
        "/public/%2e%2e/api/secret",
        "/public/%2E%2E/api/secret",
        "/public/.%2e/api/secret",
        "/public/%2e./api/secret",
        "/public/%2E./api/secret",
        "/public/./.././api/secret",
        "//api//secret",
        "/public//..//api/secret",
        "/%61pi/secret",
        "/api/secret",
    ] {
        let (status, body) = raw(addr, &get(path)).await;
        assert_eq!(status, 401, "{path}: {body}");
    }
    // Ambiguous spellings are refused with the gateway's JSON error.
    for path in [
        "/public/..%2Fapi/secret",
        "/public/..%2fapi/secret",
        "/public/..%5Capi/secret",
        "/public/..%5capi/secret",
        "/public/..;/api/secret",
        "/public/.;x/../api/secret",
        "/public/%c0%ae%c0%ae/api/secret",
        "/public/%ff",
        "/public/a%00b",
        "/public/a%2",
    ] {
        let (status, body) = raw(addr, &get(path)).await;
        assert_eq!(status, 400, "{path}: {body}");
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["error"]["code"], "bad_path", "{path}");
    }
    // A raw backslash is refused, by the gateway or by the HTTP parser before it.
    let (status, _) = raw(addr, &get("/public/..\\api/secret")).await;
    assert_eq!(status, 400);

    // A duplicated Host is refused; a missing one does not open the protected route.
    let (status, _) = raw(
        addr,
        b"GET /public/a HTTP/1.1\r\nHost: gateway.test\r\nHost: evil.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 400);
    let (status, _) = raw(
        addr,
        b"GET /public/../api/secret HTTP/1.1\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(status == 400 || status == 401, "{status}");

    // Hop-by-hop headers, and those `Connection` names, stop at the gateway.
    let (status, _) = raw(
        addr,
        b"GET /public/headers HTTP/1.1\r\nHost: gateway.test\r\nConnection: close, X-Secret\r\nX-Secret: 1\r\nProxy-Connection: keep-alive\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nUpgrade: websocket\r\nProxy-Authorization: Basic eA==\r\nX-Kept: 1\r\n\r\n",
    )
    .await;
    assert_eq!(status, 200);
    let names = seen.lock().unwrap().pop().unwrap();
    assert!(names.contains("x-kept"), "{names}");
    for hop in [
        "x-secret",
        "proxy-connection",
        "keep-alive",
        "te",
        "upgrade",
        "proxy-authorization",
    ] {
        assert!(
            !names.split(',').any(|n| n == hop),
            "{hop} reached the upstream: {names}"
        );
    }

    // What passes reaches the upstream normalized, the query as sent.
    for path in [
        "/public/a",
        "/public/x/../b?q=%2e%2e/../c",
        "/public//c/./d",
        "/public/%7Ee",
        "/public/f;v=2",
        "/files/a%2fb",
    ] {
        let (status, body) = raw(addr, &get(path)).await;
        assert_eq!(status, 200, "{path}: {body}");
    }
    assert_eq!(
        *seen.lock().unwrap(),
        [
            "/public/a",
            "/public/b?q=%2e%2e/../c",
            "/public/c/d",
            "/public/~e",
            "/public/f;v=2",
            "/files/a%2Fb",
        ],
        "the upstream saw only normalized paths"
    );
}
