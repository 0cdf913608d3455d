use super::*;
use std::collections::BTreeMap;
use std::error::Error as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use axum::extract::{Path, State};
use axum::routing::get;
use axum::serve::ListenerExt;
use axum::{Json, Router};
use serde::Deserialize;
use tokio::net::TcpListener;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Order {
    id: u64,
    item: String,
}

#[derive(Default)]
struct Seen {
    flaky_calls: AtomicUsize,
    traceparents: Mutex<Vec<String>>,
}

struct TestServer {
    base_url: String,
    connections: Arc<AtomicUsize>,
    seen: Arc<Seen>,
}

async fn spawn_server() -> TestServer {
    let seen = Arc::new(Seen::default());
    let app = Router::new()
        .route(
            "/orders/{id}",
            get(|Path(id): Path<u64>| async move {
                Json(Order {
                    id,
                    item: "book".into(),
                })
            })
            .put(|Path(id): Path<u64>, Json(order): Json<Order>| async move {
                Json(Order { id, ..order })
            })
            .delete(|| async { http::StatusCode::NO_CONTENT }),
        )
        .route(
            "/orders",
            axum::routing::post(|Json(order): Json<Order>| async move {
                (http::StatusCode::CREATED, Json(Order { id: 1, ..order }))
            }),
        )
        .route(
            "/missing",
            get(|| async {
                (
                    http::StatusCode::NOT_FOUND,
                    Json(serde_json::json!({ "error": "no such order" })),
                )
            }),
        )
        .route(
            "/boom",
            get(|| async { (http::StatusCode::INTERNAL_SERVER_ERROR, "database on fire") }),
        )
        .route("/echo", get(echo_headers).post(echo_headers))
        .route(
            "/never",
            get(std::future::pending::<()>).post(std::future::pending::<()>),
        )
        .route("/big", get(|| async { "x".repeat(2048) }))
        .route("/flaky", get(flaky).post(flaky))
        .with_state(seen.clone());

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let counter = connections.clone();
    let listener = listener.tap_io(move |_| {
        counter.fetch_add(1, Ordering::SeqCst);
    });
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    TestServer {
        base_url: format!("http://{addr}"),
        connections,
        seen,
    }
}

async fn echo_headers(headers: http::HeaderMap) -> Json<BTreeMap<String, String>> {
    Json(
        headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_owned()))
            .collect(),
    )
}

/// Answers 503 to the first call and 200 after; records every traceparent.
async fn flaky(
    State(seen): State<Arc<Seen>>,
    headers: http::HeaderMap,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    if let Some(tp) = headers.get("traceparent") {
        seen.traceparents
            .lock()
            .unwrap()
            .push(tp.to_str().unwrap().to_owned());
    }
    if seen.flaky_calls.fetch_add(1, Ordering::SeqCst) == 0 {
        (http::StatusCode::SERVICE_UNAVAILABLE, "warming up").into_response()
    } else {
        Json(serde_json::json!({ "ok": true })).into_response()
    }
}

/// Retries once when the client error says it may.
#[derive(Clone)]
struct RetryOnce(bool);

impl tower::retry::Policy<ClientRequest, Response<Bytes>, BoxError> for RetryOnce {
    type Future = std::future::Ready<()>;

    fn retry(
        &mut self,
        _req: &mut ClientRequest,
        result: &mut Result<Response<Bytes>, BoxError>,
    ) -> Option<Self::Future> {
        let retryable = match result {
            Err(err) => err.downcast_ref::<Error>().is_some_and(Error::is_retryable),
            Ok(_) => false,
        };
        (retryable && std::mem::replace(&mut self.0, false)).then(|| std::future::ready(()))
    }

    fn clone_request(&mut self, req: &ClientRequest) -> Option<ClientRequest> {
        Some(req.clone())
    }
}

#[tokio::test]
async fn json_round_trips() {
    let server = spawn_server().await;
    let client = HttpClient::new(&server.base_url).unwrap();

    let order: Order = client.get_json("/orders/7").await.unwrap();
    assert_eq!(
        order,
        Order {
            id: 7,
            item: "book".into()
        }
    );

    let new = Order {
        id: 0,
        item: "pen".into(),
    };
    let created: Order = client.post_json("orders", &new).await.unwrap();
    assert_eq!(
        created,
        Order {
            id: 1,
            item: "pen".into()
        }
    );

    let updated: Order = client.put_json("/orders/3", &new).await.unwrap();
    assert_eq!(updated.id, 3);

    client.delete("/orders/3").await.unwrap();
    let nothing: Option<Order> = client
        .request(Method::DELETE, "/orders/3")
        .send_json()
        .await
        .unwrap();
    assert_eq!(nothing, None);
}

#[tokio::test]
async fn base_url_path_is_a_prefix() {
    let server = spawn_server().await;
    let client = HttpClient::new(&format!("{}/orders/", server.base_url)).unwrap();
    assert_eq!(client.base_url(), format!("{}/orders", server.base_url));
    let order: Order = client.get_json("/9").await.unwrap();
    assert_eq!(order.id, 9);

    let res = client
        .send(Request::get("/5").body(Bytes::new()).unwrap())
        .await
        .unwrap();
    assert_eq!(res.status(), http::StatusCode::OK);
}

#[tokio::test]
async fn sends_default_and_per_call_headers() {
    let server = spawn_server().await;
    let client = HttpClient::builder(&server.base_url)
        .default_header("x-team", "checkout")
        .build()
        .unwrap();

    let seen: BTreeMap<String, String> = client
        .request(Method::POST, "/echo")
        .header("x-extra", "1")
        .idempotency_key("k-1")
        .json(&serde_json::json!({}))
        .send_json()
        .await
        .unwrap();
    assert_eq!(seen["user-agent"], USER_AGENT);
    assert!(USER_AGENT.starts_with("micro/0."));
    assert_eq!(seen["accept"], "application/json");
    assert_eq!(seen["content-type"], "application/json");
    assert_eq!(seen["x-team"], "checkout");
    assert_eq!(seen["x-extra"], "1");
    assert_eq!(seen["idempotency-key"], "k-1");
    assert!(
        !seen.contains_key("traceparent"),
        "no trace outside a scope"
    );

    let seen: BTreeMap<String, String> = client
        .request(Method::GET, "/echo")
        .header("user-agent", "custom")
        .send_json()
        .await
        .unwrap();
    assert_eq!(seen["user-agent"], "custom");
    assert!(!seen.contains_key("content-type"));
}

#[tokio::test]
async fn error_status_keeps_status_and_body() {
    let server = spawn_server().await;
    let client = HttpClient::new(&server.base_url).unwrap();

    let err = client.get_json::<Order>("/missing").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Status);
    assert_eq!(err.status(), Some(http::StatusCode::NOT_FOUND));
    let body: serde_json::Value = err.body_json().unwrap();
    assert_eq!(body["error"], "no such order");
    assert!(!err.is_retryable());
    assert_eq!(
        err.to_string(),
        format!(
            "server answered 404 Not Found (GET {}/missing)",
            server.base_url
        )
    );

    let err = client.get_json::<Order>("/boom").await.unwrap_err();
    assert_eq!(err.status(), Some(http::StatusCode::INTERNAL_SERVER_ERROR));
    assert_eq!(err.body_text().as_deref(), Some("database on fire"));
    assert!(!err.is_retryable());
}

#[tokio::test]
async fn sends_a_child_of_the_current_trace() {
    let server = spawn_server().await;
    let client = HttpClient::new(&server.base_url).unwrap();
    let ctx = TraceContext::new_root();

    let seen: BTreeMap<String, String> = ctx.scope(client.get_json("/echo")).await.unwrap();
    let sent = TraceContext::parse(&seen["traceparent"]).unwrap();
    assert_eq!(sent.trace_id(), ctx.trace_id());
    assert_ne!(sent.span_id(), ctx.span_id());
    assert!(sent.is_sampled());
}

#[tokio::test]
async fn refused_connection_is_a_retryable_connect_error() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);

    let client = HttpClient::new(&format!("http://{addr}")).unwrap();
    let err = client
        .post_json::<_, Order>("/orders", &serde_json::json!({}))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Connect);
    assert!(
        err.is_retryable(),
        "never sent, so even a POST may be retried"
    );
    assert!(err.source().is_some());
    assert!(
        err.to_string().starts_with("failed to connect (POST "),
        "{err}"
    );
}

#[tokio::test]
async fn decode_error_names_type_and_problem() {
    let server = spawn_server().await;
    let client = HttpClient::new(&server.base_url).unwrap();

    let err = client.get_json::<Order>("/echo").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Decode);
    assert_eq!(err.status(), Some(http::StatusCode::OK));
    assert!(err.body().is_some());
    let message = err.to_string();
    assert!(
        message.starts_with("failed to decode response body as `micro_core::client::tests::Order`"),
        "{message}"
    );
    let reason = err.source().unwrap().to_string();
    assert!(reason.contains("missing field `id`"), "{reason}");

    let err = client
        .request(Method::DELETE, "/orders/1")
        .send_json::<Order>()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("empty response body"), "{err}");
}

#[tokio::test]
async fn reuses_keep_alive_connections() {
    let server = spawn_server().await;
    let client = HttpClient::new(&server.base_url).unwrap();

    let _: Order = client.get_json("/orders/1").await.unwrap();
    let _: Order = client.clone().get_json("/orders/2").await.unwrap();
    let _ = client.get_json::<Order>("/missing").await.unwrap_err();
    let _: Order = client.get_json("/orders/3").await.unwrap();
    assert_eq!(server.connections.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn times_out_on_a_server_that_never_answers() {
    let server = spawn_server().await;
    let client = HttpClient::builder(&server.base_url)
        .timeout(Duration::from_millis(150))
        .build()
        .unwrap();

    let err = client.get_json::<Order>("/never").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout);
    assert!(err.is_retryable());
    assert!(
        err.to_string().starts_with("request timed out after 150ms"),
        "{err}"
    );

    let err = client
        .request(Method::POST, "/never")
        .send()
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout);
    assert!(!err.is_retryable(), "a POST may have been processed");
}

#[tokio::test]
async fn rejects_oversized_bodies() {
    let server = spawn_server().await;
    let client = HttpClient::builder(&server.base_url)
        .max_response_body(1024)
        .build()
        .unwrap();
    let err = client
        .request(Method::GET, "/big")
        .send()
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::BodyTooLarge);
    assert!(!err.is_retryable());
}

#[tokio::test]
async fn retry_layer_sees_the_classified_error() {
    let server = spawn_server().await;
    let client = HttpClient::builder(&server.base_url)
        .layer(tower::retry::RetryLayer::new(RetryOnce(true)))
        .build()
        .unwrap();

    let ctx = TraceContext::new_root();
    let ok: serde_json::Value = ctx.scope(client.get_json("/flaky")).await.unwrap();
    assert_eq!(ok["ok"], true);
    assert_eq!(server.seen.flaky_calls.load(Ordering::SeqCst), 2);

    let sent: Vec<TraceContext> = server
        .seen
        .traceparents
        .lock()
        .unwrap()
        .iter()
        .map(|tp| tp.parse().unwrap())
        .collect();
    assert_eq!(sent.len(), 2);
    assert!(sent.iter().all(|s| s.trace_id() == ctx.trace_id()));
    assert_ne!(
        sent[0].span_id(),
        sent[1].span_id(),
        "each attempt is its own span"
    );
}

#[tokio::test]
async fn retry_layer_does_not_repeat_a_post_without_idempotency_key() {
    let server = spawn_server().await;
    let client = HttpClient::builder(&server.base_url)
        .layer(tower::retry::RetryLayer::new(RetryOnce(true)))
        .build()
        .unwrap();

    let err = client
        .request(Method::POST, "/flaky")
        .send()
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(http::StatusCode::SERVICE_UNAVAILABLE));
    assert!(!err.is_retryable());
    assert_eq!(server.seen.flaky_calls.load(Ordering::SeqCst), 1);

    server.seen.flaky_calls.store(0, Ordering::SeqCst);
    client
        .request(Method::POST, "/flaky")
        .idempotency_key("order-42")
        .send()
        .await
        .unwrap();
    assert_eq!(server.seen.flaky_calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn layer_errors_pass_through_as_rejected() {
    let refuse = tower::layer::layer_fn(|_inner: ClientService| {
        tower::service_fn(|_req: ClientRequest| async {
            Err::<Response<Bytes>, BoxError>(Reason("bulkhead full").into())
        })
    });
    let client = HttpClient::builder("http://127.0.0.1:9")
        .layer(refuse)
        .build()
        .unwrap();
    let err = client.get_json::<Order>("/orders/1").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Rejected);
    assert_eq!(err.source().unwrap().to_string(), "bulkhead full");
    assert!(!err.is_retryable());
}

#[test]
fn invalid_urls_are_typed_errors() {
    for url in [
        "not a url",
        "ftp://orders:21",
        "orders:8080",
        "/orders",
        "http://orders/api?x=1",
    ] {
        let err = HttpClient::new(url).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidUrl, "{url}");
        assert_eq!(err.to_string(), format!("invalid url `{url}`"));
        assert!(err.source().is_some(), "{url}");
    }

    let err = HttpClient::builder("http://orders")
        .default_header("bad header", "x")
        .build()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidRequest);
}

#[tokio::test]
async fn invalid_request_parts_fail_before_sending() {
    let client = HttpClient::new("http://127.0.0.1:9").unwrap();

    let err = client.get_json::<Order>("/orders/a b").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidUrl);

    let err = client
        .request(Method::GET, "/orders")
        .header("x-bad", "line\nbreak")
        .send()
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidRequest);

    let err = client
        .send(Request::get("ftp://files/x").body(Bytes::new()).unwrap())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidUrl);

    let mut not_json = BTreeMap::new();
    not_json.insert((1, 2), "tuple keys are not json");
    let err = client
        .post_json::<_, Order>("/orders", &not_json)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Encode);
}

#[test]
fn client_and_futures_are_send_and_sync() {
    fn assert_send<T: Send>(_: &T) {}
    fn assert_send_sync<T: Send + Sync + 'static>() {}
    assert_send_sync::<HttpClient>();
    assert_send_sync::<RequestBuilder>();
    assert_send_sync::<Error>();

    let client = HttpClient::new("http://127.0.0.1:9").unwrap();
    assert_send(&client.get_json::<Order>("/"));
    assert_send(&client.request(Method::GET, "/").send_json::<Order>());
}

#[test]
fn debug_output_hides_header_values() {
    let builder = HttpClient::builder("http://orders").default_header("authorization", "secret");
    assert!(!format!("{builder:?}").contains("secret"));
    let client = builder.build().unwrap();
    let debug = format!("{client:?}");
    assert!(
        debug.contains("authorization") && !debug.contains("secret"),
        "{debug}"
    );
}

#[test]
fn request_builder_debug_hides_header_values() {
    let client = HttpClient::new("http://orders").unwrap();
    let req = client
        .request(Method::GET, "/orders")
        .header("authorization", "secret");
    let debug = format!("{req:?}");
    assert!(
        debug.contains("authorization") && !debug.contains("secret"),
        "{debug}"
    );
}
