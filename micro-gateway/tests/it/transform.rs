//! Kong's request- and response-transformer through a gateway built from the file: query
//! strings and bodies (JSON and forms) edited on the way in, JSON on the way out, and
//! what the gateway doesn't implement refused at load with its place.

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::routing::any;
use axum::{Json, Router};
use micro_gateway::config::DeclarativeConfig;
use serde_json::{json, Value};

use crate::support::{gateway, send, serve_counting};

/// An upstream that answers what it got: the query, the content type and the body.
async fn mirror() -> std::net::SocketAddr {
    let app = Router::new().fallback(any(|request: Request| async move {
        let query = request.uri().query().unwrap_or("").to_owned();
        let content_type = request
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned());
        let length = request
            .headers()
            .get("content-length")
            .map(|v| v.to_str().unwrap().to_owned());
        let body: Bytes = axum::body::to_bytes(request.into_body(), usize::MAX)
            .await
            .unwrap();
        Json(json!({
            "query": query,
            "content_type": content_type,
            "content_length": length,
            "body": String::from_utf8_lossy(&body),
            "secret": "internal",
            "kept": 1,
            "tags": "a",
            "nested": {"secret": "deep"},
        }))
    }));
    serve_counting(app).await.addr
}

#[tokio::test]
async fn query_strings_and_bodies_are_edited_as_kong_does() {
    let upstream = mirror().await;
    let yaml = format!(
        r#"
services:
  - name: api
    url: http://{upstream}
    routes: [{{ name: api, paths: [/api] }}]
    plugins:
      - name: request-transformer
        config:
          remove: {{ querystring: [debug], body: [password] }}
          rename: {{ querystring: ["q:search"], body: ["user:username"] }}
          replace: {{ querystring: ["page:1", "absent:x"], body: ["role:customer"] }}
          add: {{ querystring: ["lang:en", "page:9"], body: ["source:gateway"] }}
          append: {{ querystring: ["tag:new"], body: ["tags:gw"] }}
      - name: response-transformer
        config:
          remove: {{ json: [secret] }}
          add: {{ json: ["via:micro"], headers: ["x-edited:yes"] }}
          append: {{ json: ["tags:b"] }}
"#
    );
    let config = DeclarativeConfig::from_yaml(&yaml).unwrap();
    let (_host, addr) = gateway(config.build().unwrap().into_router()).await;

    let json_body = json!({"user": "ada", "password": "hunter2", "role": "admin", "tags": ["x"]});
    let request = http::Request::post("/api/things?q=coffee&debug=1&page=3&tag=old")
        .header("host", "g")
        .header("content-type", "application/json")
        .body(Body::from(json_body.to_string()))
        .unwrap();
    let (status, headers, body) = send(addr, request).await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-edited"], "yes");
    let seen: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        seen["query"],
        "search=coffee&tag=old&page=1&lang=en&tag=new"
    );
    let sent: Value = serde_json::from_str(seen["body"].as_str().unwrap()).unwrap();
    assert_eq!(
        sent,
        json!({"username": "ada", "role": "customer", "source": "gateway", "tags": ["x", "gw"]})
    );
    assert_eq!(
        seen["content_length"],
        json!(seen["body"].as_str().unwrap().len().to_string()),
        "the length follows the edited body"
    );
    // The answer's JSON, edited on the way out.
    assert!(seen.get("secret").is_none(), "{seen}");
    assert_eq!(seen["kept"], 1);
    assert_eq!(seen["via"], "micro");
    assert_eq!(seen["tags"], json!(["a", "b"]));
    assert_eq!(
        seen["nested"]["secret"], "deep",
        "only top-level members are edited"
    );

    // A form is edited too; a body of another kind goes on untouched.
    let request = http::Request::post("/api/form")
        .header("host", "g")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Body::from("user=ada&password=x&role=admin"))
        .unwrap();
    let (_, _, body) = send(addr, request).await;
    let seen: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        seen["body"],
        "username=ada&role=customer&source=gateway&tags=gw"
    );
    let request = http::Request::post("/api/raw")
        .header("host", "g")
        .header("content-type", "text/plain")
        .body(Body::from("password=kept as is"))
        .unwrap();
    let (_, _, body) = send(addr, request).await;
    let seen: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(seen["body"], "password=kept as is");

    // A body too long to edit is refused, not passed on unedited.
    let request = http::Request::post("/api/big")
        .header("host", "g")
        .header("content-type", "application/json")
        .body(Body::from(vec![b' '; (1 << 20) + 1]))
        .unwrap();
    let (status, _, _) = send(addr, request).await;
    assert_eq!(status, 413);
}

#[test]
fn what_the_transformers_do_not_implement_is_refused_with_its_place() {
    let cases = [
        ("request-transformer", "http_method: POST", "http_method"),
        ("request-transformer", "replace: { uri: /x }", "uri"),
        ("request-transformer", "add: { json: [\"a:1\"] }", "json"),
        ("response-transformer", "add: { body: [\"a:1\"] }", "body"),
        ("response-transformer", "json_types: [string]", "json_types"),
        (
            "request-transformer",
            "add: { querystring: [\"no-colon\"] }",
            "no-colon",
        ),
    ];
    for (plugin, config, field) in cases {
        let yaml = format!(
            "services:\n  - name: a\n    url: http://127.0.0.1:1\n    routes: [{{ name: r, paths: [/a] }}]\n    plugins:\n      - name: {plugin}\n        config: {{ {config} }}\n"
        );
        let error = DeclarativeConfig::from_yaml(&yaml)
            .and_then(|c| c.build().map(|_| ()))
            .unwrap_err();
        assert!(
            error.place().starts_with("services[0].plugins[0]"),
            "{config}: {error}"
        );
        assert!(error.reason().contains(field), "{config}: {error}");
    }
}
