//! API composition: one route that calls several upstreams concurrently and merges their
//! JSON answers into one object, keyed by leg name.
//!
//! ```
//! # use std::time::Duration;
//! # use micro_gateway::compose::{Composition, Leg};
//! # use micro_gateway::gateway::{Gateway, Route};
//! # use micro_gateway::proxy::{Proxy, ProxyConfig, Upstream};
//! let orders = Proxy::new(Upstream::parse("http://127.0.0.1:8003").unwrap(), ProxyConfig::new());
//! let payments = Proxy::new(Upstream::parse("http://127.0.0.1:8005").unwrap(), ProxyConfig::new());
//! let summary = Composition::new()
//!     .leg(Leg::new("order", "/api/orders/{id}", orders))
//!     .leg(Leg::new("payment", "/api/payments/by-order/{id}", payments)
//!         .optional(true)
//!         .timeout(Duration::from_millis(500)));
//! let gateway = Gateway::builder()
//!     .route(Route::new("order-summary").path("/api/order-summary/{id}").method("GET").to(summary))
//!     .build()
//!     .unwrap();
//! # drop(gateway);
//! ```
//!
//! `GET /api/order-summary/42` then answers `{"order": {...}, "payment": {...}}`. Each leg
//! has its own timeout (5 s by default). A failed optional leg leaves its part `null`; a
//! failed required leg fails the whole answer: the leg's own status for a `4xx`, `504` when
//! it timed out, `502` otherwise, each with the gateway's JSON error body naming the leg.
//! Unlike proxied routes, a composition reads each leg's body whole, up to
//! [`Composition::max_leg_body`] (1 MiB by default).

use std::convert::Infallible;
use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use futures_util::future::join_all;
use http::{header, HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use micro_core::service::BoxFuture;
use serde_json::{Map, Value};
use tower::util::BoxCloneSyncService;
use tower::ServiceExt;
use tower_service::Service;

use crate::error::error_response;
use crate::gateway::MatchedRoute;

type LegService = BoxCloneSyncService<Request<Body>, Response<Body>, Infallible>;

/// One upstream call of a [`Composition`].
#[derive(Clone)]
pub struct Leg {
    name: Arc<str>,
    path: Arc<str>,
    service: LegService,
    timeout: Duration,
    optional: bool,
}

impl Leg {
    /// A leg named `name` (its key in the merged answer) that sends `GET path` to
    /// `service`. `path` is a template: `{id}` is replaced by the route's `id` parameter.
    pub fn new<S>(name: impl Into<String>, path: impl Into<String>, service: S) -> Self
    where
        S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        Self {
            name: Arc::from(name.into()),
            path: Arc::from(path.into()),
            service: BoxCloneSyncService::new(service),
            timeout: Duration::from_secs(5),
            optional: false,
        }
    }

    /// How long the leg may take, body included. Default 5 s.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Whether the answer can do without this leg (its part is then `null`). Default no.
    pub fn optional(mut self, optional: bool) -> Self {
        self.optional = optional;
        self
    }

    /// The leg's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl fmt::Debug for Leg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Leg")
            .field("name", &self.name)
            .field("path", &self.path)
            .field("timeout", &self.timeout)
            .field("optional", &self.optional)
            .finish_non_exhaustive()
    }
}

/// Why a leg gave no JSON.
#[derive(Debug, thiserror::Error)]
enum LegFailure {
    #[error("timed out")]
    TimedOut,
    #[error("answered {0}")]
    Status(StatusCode),
    #[error("unreadable answer: {0}")]
    Unreadable(String),
}

/// A tower service that answers a request by calling its [`Leg`]s concurrently and
/// merging their JSON answers; see the [module docs](self).
#[derive(Clone, Debug)]
pub struct Composition {
    legs: Arc<[Leg]>,
    max_leg_body: usize,
}

impl Default for Composition {
    fn default() -> Self {
        Self::new()
    }
}

impl Composition {
    /// A composition without legs yet.
    pub fn new() -> Self {
        Self {
            legs: Arc::from(Vec::new()),
            max_leg_body: 1024 * 1024,
        }
    }

    /// Adds a leg.
    pub fn leg(mut self, leg: Leg) -> Self {
        let mut legs = self.legs.to_vec();
        legs.push(leg);
        self.legs = legs.into();
        self
    }

    /// The largest body a leg may answer with; a larger one fails the leg. Default 1 MiB.
    pub fn max_leg_body(mut self, bytes: usize) -> Self {
        self.max_leg_body = bytes;
        self
    }

    async fn answer(self, request: Request<Body>) -> Response<Body> {
        if request.method() != Method::GET && request.method() != Method::HEAD {
            return error_response(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "a composed resource can only be read",
            );
        }
        let (parts, _) = request.into_parts();
        let matched = parts.extensions.get::<MatchedRoute>().cloned();
        let calls = self.legs.iter().map(|leg| {
            let path = match &matched {
                Some(matched) => matched.params.render(&leg.path),
                None => leg.path.to_string(),
            };
            let request = leg_request(&parts, &path);
            let max = self.max_leg_body;
            async move {
                let outcome = match request {
                    Some(request) => {
                        tokio::time::timeout(leg.timeout, call(leg.service.clone(), request, max))
                            .await
                            .unwrap_or(Err(LegFailure::TimedOut))
                    }
                    None => Err(LegFailure::Unreadable("invalid leg path".to_owned())),
                };
                (leg, outcome)
            }
        });
        let mut merged = Map::new();
        for (leg, outcome) in join_all(calls).await {
            match outcome {
                Ok(value) => {
                    merged.insert(leg.name.to_string(), value);
                }
                Err(failure) if leg.optional => {
                    tracing::debug!(leg = %leg.name, %failure, "optional leg failed");
                    merged.insert(leg.name.to_string(), Value::Null);
                }
                Err(failure) => {
                    tracing::warn!(leg = %leg.name, %failure, "required leg failed");
                    let message = format!("the `{}` part could not be read", leg.name);
                    return match failure {
                        LegFailure::TimedOut => error_response(
                            StatusCode::GATEWAY_TIMEOUT,
                            "upstream_timeout",
                            &message,
                        ),
                        LegFailure::Status(status) if status.is_client_error() => {
                            error_response(status, "leg_failed", &message)
                        }
                        LegFailure::Status(_) | LegFailure::Unreadable(_) => {
                            error_response(StatusCode::BAD_GATEWAY, "upstream_failed", &message)
                        }
                    };
                }
            }
        }
        let mut response = Response::new(Body::from(Value::Object(merged).to_string()));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/json"),
        );
        response
    }
}

/// The `GET` a leg sends: the client's end-to-end headers (credentials, request id,
/// trace context) without those that describe the client's own body.
fn leg_request(parts: &http::request::Parts, path: &str) -> Option<Request<Body>> {
    let mut headers = HeaderMap::with_capacity(parts.headers.len());
    for (name, value) in &parts.headers {
        if name != header::CONTENT_LENGTH
            && name != header::CONTENT_TYPE
            && name != header::TRANSFER_ENCODING
            && name != header::ACCEPT_ENCODING
        {
            headers.append(name.clone(), value.clone());
        }
    }
    let mut request = Request::get(path).body(Body::empty()).ok()?;
    *request.headers_mut() = headers;
    // The proxy reads the client's address and the request id from the extensions.
    *request.extensions_mut() = parts.extensions.clone();
    Some(request)
}

async fn call(
    service: LegService,
    request: Request<Body>,
    max: usize,
) -> Result<Value, LegFailure> {
    let Ok(response) = service.oneshot(request).await;
    let status = response.status();
    if !status.is_success() {
        return Err(LegFailure::Status(status));
    }
    let bytes = Limited::new(response.into_body(), max)
        .collect()
        .await
        .map_err(|e| LegFailure::Unreadable(e.to_string()))?
        .to_bytes();
    if bytes.is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_slice(&bytes).map_err(|e| LegFailure::Unreadable(e.to_string()))
}

impl Service<Request<Body>> for Composition {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { Ok(this.answer(request).await) })
    }
}
