use micro_gateway::config::DeclarativeConfig;

use crate::support::{echo, gateway, get_json, send};

#[tokio::test]
async fn a_kong_declarative_file_runs_the_gateway() {
    let users = echo().await;
    let orders = echo().await;
    let yaml = format!(
        r#"
_format_version: "3.0"
services:
  - name: user-service
    url: http://{users}
    read_timeout: 5000
    routes:
      - name: user-route
        paths:
          - /api/users
    plugins:
      - name: request-transformer
        config:
          add:
            headers: ["x-from-service:users"]
  - name: order-service
    host: 127.0.0.1
    port: {orders_port}
    path: /v1
routes:
  - name: order-route
    service: order-service
    paths: [/api/orders]
    plugins:
      - name: request-transformer
        config:
          add:
            headers: ["x-from-route:orders"]
      - name: request-size-limiting
        config:
          allowed_payload_size: 10
          size_unit: bytes
plugins:
  - name: response-transformer
    config:
      add:
        headers: ["x-gateway:micro"]
"#,
        users = users.addr,
        orders_port = orders.addr.port(),
    );
    let config = DeclarativeConfig::from_yaml(&yaml).unwrap();
    let (_host, addr) = gateway(config.build().unwrap().into_router()).await;

    let (status, seen) = get_json(addr, "/api/users/7", &[]).await;
    assert_eq!(status, 200);
    assert_eq!(seen["uri"], "/7");
    assert_eq!(seen["headers"]["x-from-service"], "users");

    let (status, seen) = get_json(addr, "/api/orders/9", &[]).await;
    assert_eq!(status, 200);
    assert_eq!(seen["uri"], "/v1/9");
    // The route's request-transformer replaced the service's one.
    assert_eq!(seen["headers"]["x-from-route"], "orders");
    assert!(seen["headers"].get("x-from-service").is_none());

    let request = http::Request::post("/api/orders")
        .header("host", "g")
        .body(axum::body::Body::from("more than ten bytes"))
        .unwrap();
    let (status, headers, _) = send(addr, request).await;
    assert_eq!(status, 413);
    assert_eq!(
        headers["x-gateway"], "micro",
        "global plugins wrap every route"
    );
}

#[test]
fn errors_name_the_place_in_the_file() {
    let cases = [
        (
            "services:\n  - name: a\n    url: http://x\n    routes:\n      - paths: [/a]\n        methdos: [GET]\n",
            "services[0].routes[0]",
            "unknown field `methdos`",
        ),
        (
            "services:\n  - name: a\n    url: http://x\n    routes:\n      - paths: [\"a\"]\n",
            "services[0].routes[0]",
            "invalid route pattern `a`",
        ),
        (
            "services:\n  - name: a\n    routes:\n      - paths: [/a]\n",
            "services[0]",
            "neither `url` nor `host`",
        ),
        (
            "services:\n  - name: a\n    url: http://x\n    routes:\n      - paths: [/a]\n        plugins:\n          - name: rate-limting\n",
            "services[0].routes[0].plugins[0].name",
            "unknown plugin `rate-limting`",
        ),
        (
            "services:\n  - name: a\n    url: http://x\n    routes:\n      - paths: [/a]\n        plugins:\n          - name: ip-restriction\n            config:\n              allow: [\"10.0.0.300\"]\n",
            "services[0].routes[0].plugins[0].config.allow",
            "`10.0.0.300`",
        ),
        (
            "routes:\n  - paths: [/a]\n    service: missing\n",
            "routes[0].service",
            "no service is named `missing`",
        ),
        ("services: [", "services", "did not find expected node content"),
    ];
    for (yaml, place, reason) in cases {
        let error = DeclarativeConfig::from_yaml(yaml)
            .and_then(|c| c.build().map(|_| ()))
            .unwrap_err();
        assert!(error.place().starts_with(place), "{yaml}\n=> {error}");
        assert!(error.reason().contains(reason), "{yaml}\n=> {error}");
    }
    let error = DeclarativeConfig::from_yaml("services:\n  - name: a\n    url: 7\n    bogus: 1\n")
        .unwrap_err();
    assert!(error.place().contains("line 4"), "{error}");
}

#[tokio::test]
async fn the_guide_s_example_file_builds() {
    let guide = include_str!("../../../docs/src/gateway.md");
    let example = guide
        .split("```yaml\n")
        .skip(1)
        .map(|block| block.split("```").next().unwrap())
        .find(|block| block.contains("compositions:"))
        .expect("the guide has the example");
    // The example's CA bundle, made here.
    let dir = tempfile::tempdir().unwrap();
    crate::support::test_ca(dir.path());
    let ca_path = dir.path().join("ca.pem");
    let example = example.replace("/etc/micro/tls/internal-ca.pem", ca_path.to_str().unwrap());
    let config = DeclarativeConfig::from_yaml(&example).unwrap();
    let discover = config.discovery.as_ref().unwrap().connect().await.unwrap();
    let resources = micro_gateway::config::Resources::new().discover(discover);
    config.build_with(&resources).unwrap();
}

mod any_file {
    use micro_gateway::config::DeclarativeConfig;
    use proptest::prelude::*;

    /// Lines of a Kong declarative file, well-formed or not, at any indentation.
    fn line() -> impl Strategy<Value = String> {
        let keys = prop::sample::select(vec![
            "_format_version",
            "services",
            "routes",
            "plugins",
            "name",
            "url",
            "host",
            "port",
            "path",
            "paths",
            "methods",
            "hosts",
            "strip_path",
            "config",
            "enabled",
            "service",
            "consumers",
            "jwt_secrets",
            "remove",
            "add",
            "headers",
            "querystring",
            "body",
            "json",
            "second",
            "minute",
            "limit_by",
            "header_name",
            "allow",
            "deny",
            "origins",
            "retries",
            "read_timeout",
            "discovery",
            "compositions",
            "regex_priority",
            "rewrite",
            "- name",
            "-",
        ]);
        let values = prop::sample::select(vec![
            "",
            "a",
            "http://127.0.0.1:1",
            "[/a, /b]",
            "[GET]",
            "{}",
            "[]",
            "1",
            "-1",
            "99999999999999999999",
            "true",
            "jwt",
            "rate-limiting",
            "cors",
            "request-transformer",
            "response-transformer",
            "ip-restriction",
            "request-size-limiting",
            "access-log",
            "\"x:y\"",
            "[\"a:1\"]",
            "~",
            "'",
            "\"3.0\"",
            "/a/../b",
            "/%2e%2e/",
            "{ name: jwt }",
            "- /x",
        ]);
        (0usize..4, keys, values)
            .prop_map(|(indent, key, value)| format!("{}{key}: {value}", "  ".repeat(indent)))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn any_file_loads_or_is_refused_with_a_place_and_never_panics(
            lines in prop::collection::vec(line(), 0..24)
        ) {
            let text = lines.join("\n");
            if let Err(error) = DeclarativeConfig::from_yaml(&text).and_then(|c| c.build().map(|_| ())) {
                prop_assert!(!error.reason().is_empty(), "{text}\n=> {error}");
                prop_assert!(!error.to_string().is_empty());
            }
        }
    }
}

#[tokio::test]
async fn forwarding_headers_are_believed_only_from_trusted_proxies() {
    let upstream = echo().await;
    let build = |trusted: &str| {
        let yaml = format!(
            "{trusted}services:\n  - name: a\n    url: http://{}\n    routes: [{{ name: a, paths: [/a] }}]\n",
            upstream.addr
        );
        DeclarativeConfig::from_yaml(&yaml)
            .unwrap()
            .build()
            .unwrap()
    };
    let spoofed = [
        ("x-forwarded-for", "203.0.113.9"),
        ("forwarded", "for=203.0.113.9"),
        ("x-real-ip", "203.0.113.9"),
        ("x-forwarded-host", "evil.example"),
    ];

    // From a peer nobody trusts (this test, on loopback): the client's claims are gone.
    let (_host, addr) = gateway(build("").into_router()).await;
    let (status, seen) = get_json(addr, "/a", &spoofed).await;
    assert_eq!(status, 200);
    assert_eq!(seen["headers"]["x-forwarded-for"], "127.0.0.1", "{seen}");
    assert!(
        !seen["headers"]["forwarded"]
            .as_str()
            .unwrap()
            .contains("203.0.113.9"),
        "{seen}"
    );
    assert!(seen["headers"].get("x-real-ip").is_none(), "{seen}");
    assert_ne!(seen["headers"]["x-forwarded-host"], "evil.example");

    // From a trusted load balancer: its chain is kept, the peer appended.
    let (_host, addr) = gateway(build("trusted_ips: [127.0.0.0/8]\n").into_router()).await;
    let (_, seen) = get_json(addr, "/a", &spoofed).await;
    assert_eq!(
        seen["headers"]["x-forwarded-for"], "203.0.113.9, 127.0.0.1",
        "{seen}"
    );
    assert!(seen["headers"]["forwarded"]
        .as_str()
        .unwrap()
        .starts_with("for=203.0.113.9, for=127.0.0.1"));

    let refused = DeclarativeConfig::from_yaml("trusted_ips: [not-an-address]\n").unwrap_err();
    assert!(refused.to_string().contains("not-an-address"), "{refused}");
}
