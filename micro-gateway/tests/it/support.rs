//! Upstreams and a gateway for the tests, on loopback ports.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::Request;
use axum::routing::any;
use axum::{Json, Router};
use http_body_util::BodyExt;
use micro_core::host::{RunningHost, ServiceHost};
use micro_core::service::Service;
use serde_json::{json, Value};
use tokio::net::TcpListener;

/// An upstream that answers every request with what it received, and counts the
/// connections it accepted.
pub(crate) struct Echo {
    pub(crate) addr: SocketAddr,
    pub(crate) connections: Arc<AtomicUsize>,
}

pub(crate) async fn echo() -> Echo {
    let app = Router::new().fallback(any(|request: Request| async move {
        let (parts, body) = request.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        let headers: serde_json::Map<String, Value> = parts
            .headers
            .iter()
            .map(|(name, value)| {
                (
                    name.to_string(),
                    json!(value.to_str().unwrap_or("<binary>")),
                )
            })
            .collect();
        Json(json!({
            "method": parts.method.as_str(),
            "uri": parts.uri.to_string(),
            "version": format!("{:?}", parts.version),
            "headers": headers,
            "body_len": body.len(),
        }))
    }));
    serve_counting(app).await
}

/// Serves `app` on a fresh loopback port, counting accepted connections.
pub(crate) async fn serve_counting(app: Router) -> Echo {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let counter = connections.clone();
    let listener = axum::serve::ListenerExt::tap_io(listener, move |_| {
        counter.fetch_add(1, Ordering::SeqCst);
    });
    tokio::spawn(async move { axum::serve(listener, app).await });
    Echo { addr, connections }
}

/// A gateway service with a router the test chooses.
pub(crate) struct Gateway(pub(crate) Router);

impl Service for Gateway {
    fn name(&self) -> &str {
        "gateway"
    }

    fn router(&self) -> Router {
        self.0.clone()
    }
}

/// Hosts `router` as the gateway on a loopback port.
pub(crate) async fn gateway(router: Router) -> (RunningHost, SocketAddr) {
    let running = ServiceHost::builder()
        .service(Gateway(router), "127.0.0.1:0".parse().unwrap())
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let addr = running.local_addr("gateway").unwrap();
    (running, addr)
}

/// Sends `request` on a new HTTP/1 connection to `addr` and reads the whole answer.
pub(crate) async fn send(
    addr: SocketAddr,
    request: http::Request<Body>,
) -> (http::StatusCode, http::HeaderMap, bytes::Bytes) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    let response = sender.send_request(request).await.unwrap();
    let (parts, body) = response.into_parts();
    (
        parts.status,
        parts.headers,
        body.collect().await.unwrap().to_bytes(),
    )
}

/// `GET path` with `headers`, answered as JSON.
pub(crate) async fn get_json(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (http::StatusCode, Value) {
    let mut request = http::Request::get(path).header("host", "gateway.test");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let (status, _, body) = send(addr, request.body(Body::empty()).unwrap()).await;
    (
        status,
        serde_json::from_slice(&body).unwrap_or_else(|e| panic!("{e}: {body:?}")),
    )
}

/// Reads a [`send`] answer's body as text.
pub(crate) trait IntoText {
    fn into_text(self) -> (http::StatusCode, String);
}

impl IntoText for (http::StatusCode, http::HeaderMap, bytes::Bytes) {
    fn into_text(self) -> (http::StatusCode, String) {
        (self.0, String::from_utf8_lossy(&self.2).into_owned())
    }
}

/// A CA made for the test, its certificate written to `dir/ca.pem`.
pub(crate) fn test_ca(dir: &std::path::Path) -> rcgen::Issuer<'static, rcgen::KeyPair> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    std::fs::write(dir.join("ca.pem"), ca.self_signed(&ca_key).unwrap().pem()).unwrap();
    Issuer::new(ca, ca_key)
}

/// Serves `app` over TLS only, on a real micro-core listener on loopback, with a
/// certificate for 127.0.0.1 issued by a [`test_ca`] (`ca.pem` in `dir`).
pub(crate) async fn serve_tls(app: Router, dir: &std::path::Path) -> (RunningHost, SocketAddr) {
    let issuer = test_ca(dir);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    std::fs::write(dir.join("server.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("server.key"), key.serialize_pem()).unwrap();
    let tls = micro_core::tls::TlsConfig::new(dir.join("server.pem"), dir.join("server.key"));
    let host = ServiceHost::builder()
        .service_with(
            Gateway(app),
            "127.0.0.1:0".parse().unwrap(),
            micro_core::listener::ListenerConfig::default().tls(tls),
        )
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let addr = host.local_addr("gateway").unwrap();
    (host, addr)
}
