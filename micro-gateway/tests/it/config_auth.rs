//! `jwt` and `rate-limiting` in the declarative file: the reference's Kong file, errors
//! that name their place, and the rejection counter.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use axum::body::Body;
use axum::extract::ConnectInfo;
use jsonwebtoken::Algorithm;
use micro_gateway::config::DeclarativeConfig;
use serde_json::json;
use tower::ServiceExt;

use crate::jwt::{counted_upstream, fixture, now, sign, signing_key, SECRET};
use crate::support::{gateway, send};

/// The reference architecture's Kong file, with the consumers Kong keeps its JWT
/// credentials in.
fn reference(upstream: SocketAddr, minute: u32) -> String {
    let public = fixture("rsa_public.pem").replace('\n', "\n            ");
    format!(
        r#"
_format_version: "3.0"
services:
  - name: user-service
    url: http://{upstream}
    routes:
      - name: user-route
        paths:
          - /api/users
    plugins:
      - name: rate-limiting
        config:
          minute: {minute}
      - name: jwt
consumers:
  - username: web-shop
    jwt_secrets:
      - key: https://shop.test
        algorithm: HS256
        secret: "{SECRET}"
  - username: mobile-app
    jwt_secrets:
      - key: https://mobile.test
        algorithm: RS256
        rsa_public_key: |
            {public}
"#
    )
}

fn bearer(alg: Algorithm, iss: &str, sub: &str) -> String {
    let claims = json!({ "iss": iss, "sub": sub, "exp": now() + 300 });
    format!("Bearer {}", sign(alg, None, &claims, &signing_key(alg)))
}

async fn get(
    addr: SocketAddr,
    authorization: Option<&str>,
) -> (u16, http::HeaderMap, serde_json::Value) {
    let mut request = http::Request::get("/api/users/7").header("host", "g");
    if let Some(value) = authorization {
        request = request.header("authorization", value);
    }
    let (status, headers, body) = send(addr, request.body(Body::empty()).unwrap()).await;
    (
        status.as_u16(),
        headers,
        serde_json::from_slice(&body).unwrap_or_default(),
    )
}

#[tokio::test]
async fn the_reference_kong_file_authenticates_and_limits() {
    let upstream = counted_upstream().await;
    let config = DeclarativeConfig::from_yaml(&reference(upstream.addr, 3)).unwrap();
    let (_host, addr) = gateway(config.build().unwrap().into_router()).await;

    let (status, headers, _) = get(addr, None).await;
    assert_eq!(status, 401);
    assert!(headers.contains_key("www-authenticate"));

    let web = bearer(Algorithm::HS256, "https://shop.test", "alice");
    let (status, headers, seen) = get(addr, Some(&web)).await;
    assert_eq!(status, 200);
    assert_eq!(headers["ratelimit-limit"], "3");
    assert_eq!(seen["headers"]["x-consumer-username"], "web-shop");

    // The RS256 consumer; an HS256 token claiming to be it is refused (pinned algorithm).
    let mobile = bearer(Algorithm::RS256, "https://mobile.test", "bob");
    let (status, _, seen) = get(addr, Some(&mobile)).await;
    assert_eq!(status, 200);
    assert_eq!(seen["headers"]["x-consumer-username"], "mobile-app");
    let forged = bearer(Algorithm::HS256, "https://mobile.test", "bob");
    assert_eq!(get(addr, Some(&forged)).await.0, 401);

    // Limits count per consumer: web-shop has two left, mobile-app two.
    assert_eq!(get(addr, Some(&web)).await.0, 200);
    assert_eq!(get(addr, Some(&web)).await.0, 200);
    let (status, headers, body) = get(addr, Some(&web)).await;
    assert_eq!(status, 429);
    assert!(headers.contains_key("retry-after"));
    assert_eq!(body["error"]["code"], "rate_limited");
    assert_eq!(get(addr, Some(&mobile)).await.0, 200);
    assert_eq!(upstream.hits.load(Ordering::SeqCst), 5);
}

#[test]
fn jwt_and_rate_limiting_errors_name_the_place_in_the_file() {
    let route = "services:\n  - name: a\n    url: http://x\n    routes:\n      - paths: [/a]\n        plugins:\n";
    let cases = [
        (
            format!("{route}          - name: jwt\n"),
            "services[0].routes[0].plugins[0].config.keys",
            "no key",
        ),
        (
            format!("{route}          - name: jwt\n            config:\n              keys:\n                - algorithm: HS257\n                  secret: s\n"),
            "services[0].routes[0].plugins[0].config.keys[0].algorithm",
            "unknown algorithm `HS257`",
        ),
        (
            format!("{route}          - name: jwt\n            config:\n              keys:\n                - algorithm: RS256\n                  secret: s\n"),
            "services[0].routes[0].plugins[0].config.keys[0]",
            "RS256 needs an `rsa_public_key`",
        ),
        (
            format!("{route}          - name: jwt\n            config:\n              jwks_url: ftp://idp.test/keys\n"),
            "services[0].routes[0].plugins[0].config.jwks_url",
            "only `https://",
        ),
        (
            format!("{route}          - name: jwt\n            config:\n              leeway: soon\n              keys: []\n"),
            "services[0].routes[0].plugins[0].config.leeway",
            "invalid type",
        ),
        (
            format!("{route}          - name: jwt\nconsumers:\n  - username: c\n    jwt_secrets:\n      - key: k\n        algorithm: ES256\n        rsa_public_key: not a pem\n"),
            "consumers[0].jwt_secrets[0].rsa_public_key",
            "not a ES256 public key pem",
        ),
        (
            format!("{route}          - name: rate-limiting\n            config:\n              minute: 0\n"),
            "services[0].routes[0].plugins[0].config.minute",
            "at least 1",
        ),
        (
            format!("{route}          - name: rate-limiting\n            config:\n              minute: 5\n              limit_by: header\n"),
            "services[0].routes[0].plugins[0].config.header_name",
            "needs `header_name`",
        ),
        (
            format!("{route}          - name: rate-limiting\n            config:\n              minute: 5\n              limit_by: credential\n              api_key_header: x-api-key\n"),
            "services[0].routes[0].plugins[0].config.api_key_header",
            "no key-auth to verify an API key",
        ),
        (
            format!("{route}          - name: rate-limiting\n            config:\n              minute: 5\n              polcy: redis\n"),
            "services[0].routes[0].plugins[0].config.polcy",
            "unknown field `polcy`",
        ),
    ];
    for (yaml, place, reason) in cases {
        let error = DeclarativeConfig::from_yaml(&yaml)
            .and_then(|c| c.build().map(|_| ()))
            .unwrap_err();
        assert_eq!(error.place(), place, "{yaml}\n=> {error}");
        assert!(error.reason().contains(reason), "{yaml}\n=> {error}");
    }
}

#[test]
fn rejections_are_counted_by_route_and_reason() {
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let yaml = r#"
services:
  - name: a
    url: http://127.0.0.1:9
    routes:
      - name: orders
        paths: [/orders]
        plugins:
          - name: rate-limiting
            config: { minute: 1, limit_by: ip }
          - name: jwt
            config:
              keys: [{ algorithm: HS256, secret: "s3cret" }]
              required_scopes: [orders]
"#;
    let gateway = DeclarativeConfig::from_yaml(yaml).unwrap().build().unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let key = jsonwebtoken::EncodingKey::from_secret(b"s3cret");
    let no_scope = sign(Algorithm::HS256, None, &json!({ "exp": now() + 60 }), &key);
    let scoped = json!({ "exp": now() + 60, "scope": "orders" });
    let scoped = sign(Algorithm::HS256, None, &scoped, &key);
    let calls = [
        (None, 401),
        (Some("Bearer nonsense".to_owned()), 401),
        (Some(format!("Bearer {no_scope}")), 403),
        // Let through to an upstream that is not there.
        (Some(format!("Bearer {scoped}")), 502),
        (Some(format!("Bearer {scoped}")), 429),
    ];
    metrics::with_local_recorder(&recorder, || {
        runtime.block_on(async {
            for (authorization, expected) in calls {
                let mut request = http::Request::get("/orders/1").header("host", "g");
                if let Some(value) = authorization {
                    request = request.header("authorization", value);
                }
                let mut request = request.body(Body::empty()).unwrap();
                let peer: SocketAddr = "192.0.2.1:5000".parse().unwrap();
                request.extensions_mut().insert(ConnectInfo(peer));
                let response = gateway.clone().oneshot(request).await.unwrap();
                assert_eq!(response.status().as_u16(), expected);
            }
        })
    });
    let mut counts = std::collections::BTreeMap::new();
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        let key = key.key();
        if key.name() != "micro_gateway_rejections_total" {
            continue;
        }
        let labels: Vec<String> = key
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        let metrics_util::debugging::DebugValue::Counter(count) = value else {
            panic!("not a counter")
        };
        counts.insert(labels.join(","), count);
    }
    let expected: std::collections::BTreeMap<String, u64> = [
        ("route=orders,reason=jwt_missing", 1),
        ("route=orders,reason=jwt_invalid", 1),
        ("route=orders,reason=jwt_scope", 1),
        ("route=orders,reason=rate_limit", 1),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    assert_eq!(counts, expected);
}
