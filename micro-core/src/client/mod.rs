//! An HTTP client for calling another service by its base URL.
//!
//! [`HttpClient`] speaks JSON over HTTP/1.1 with pooled keep-alive connections, and over
//! HTTPS (with the `tls` feature, on by default) with HTTP/2 when the server offers it by
//! ALPN. An `https` base URL verifies the server against the system's trust store;
//! [`ClientBuilder::tls`] names a CA bundle or a client certificate (mTLS) instead. Every
//! request carries a `traceparent` header continuing the
//! [current trace](crate::trace::TraceContext::current), a `user-agent` of
//! `micro/<version>` and `accept: application/json`. A non-`2xx` answer is an
//! [`Error`] of kind [`ErrorKind::Status`] that keeps the status and body.
//!
//! Resilience layers (retry, circuit breaker, ...) plug in with
//! [`ClientBuilder::layer`]; they sit above the transport and see each call's
//! classified [`Error`], so a retry can ask [`Error::is_retryable`].
//!
//! ```no_run
//! use micro_core::client::HttpClient;
//! use serde::{Deserialize, Serialize};
//! use std::time::Duration;
//!
//! #[derive(Serialize)]
//! struct NewOrder { item: String }
//!
//! #[derive(Deserialize)]
//! struct Order { id: u64, item: String }
//!
//! # async fn run() -> Result<(), micro_core::client::Error> {
//! let orders = HttpClient::builder("http://orders.internal:8080/api")
//!     .timeout(Duration::from_secs(2))
//!     .build()?;
//!
//! let order: Order = orders.get_json("/orders/7").await?;
//! let created: Order = orders
//!     .request(http::Method::POST, "/orders")
//!     .idempotency_key("3f2c9e1a")
//!     .json(&NewOrder { item: "book".into() })
//!     .send_json()
//!     .await?;
//! # Ok(())
//! # }
//! ```

mod error;
mod transport;

#[cfg(test)]
mod tests;

pub use self::error::{Error, ErrorKind};

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, Uri};
use http_body_util::Full;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tower::util::BoxCloneSyncService;
use tower::ServiceExt;
use tower_layer::Layer;
use tower_service::Service;

use self::error::{Reason, RequestInfo};
use self::transport::Transport;
use crate::resilience::ResiliencePolicy;
use crate::trace::{PropagateTrace, TraceContext};

pub use crate::error::BoxError;

#[cfg(feature = "tls")]
type Connector = crate::tls::HttpsConnector;
#[cfg(not(feature = "tls"))]
type Connector = HttpConnector;

/// The request type of the client stack: a fully buffered body.
pub type ClientRequest = Request<Full<Bytes>>;

/// The client stack, type-erased: what a layer added with [`ClientBuilder::layer`]
/// wraps.
///
/// The stack's error is a [`BoxError`]; the transport's failures are [`Error`]s in it
/// (`err.downcast_ref::<Error>()`).
pub type ClientService = BoxCloneSyncService<ClientRequest, Response<Bytes>, BoxError>;

/// The `Idempotency-Key` header: a request carrying it may be retried even when its
/// method is not idempotent (see [`Error::is_retryable`]).
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

const USER_AGENT: &str = concat!("micro/", env!("CARGO_PKG_VERSION"));
const APPLICATION_JSON: HeaderValue = HeaderValue::from_static("application/json");

type LayerFn = Box<dyn FnOnce(ClientService) -> ClientService + Send>;

/// A client for one service, addressed by base URL. Cheap to clone; clones share the
/// connection pool.
///
/// Build one with [`HttpClient::builder`]; see the [module docs](self).
#[derive(Clone)]
pub struct HttpClient {
    shared: Arc<Shared>,
}

struct Shared {
    base: BaseUrl,
    /// Whether `https` URLs can be called: the base URL is one, or TLS was configured.
    https: bool,
    default_headers: HeaderMap,
    service: ClientService,
}

impl HttpClient {
    /// Starts building a client for the service at `base_url`, such as
    /// `http://orders:8080` or `http://gateway/orders/v1`; request paths are appended
    /// to it. An invalid URL is reported by [`ClientBuilder::build`].
    pub fn builder(base_url: &str) -> ClientBuilder {
        ClientBuilder::new(base_url)
    }

    /// A client for `base_url` with the default settings.
    pub fn new(base_url: &str) -> Result<Self, Error> {
        Self::builder(base_url).build()
    }

    /// The base URL that request paths are appended to.
    pub fn base_url(&self) -> &str {
        &self.shared.base.prefix
    }

    /// Starts a request to `path` (relative to the base URL, with an optional query),
    /// to add headers or a body before sending it.
    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let request = self.shared.base.join(path).and_then(|uri| {
            Request::builder()
                .method(method)
                .uri(uri)
                .body(Bytes::new())
                .map_err(Error::invalid_request)
        });
        RequestBuilder {
            client: self.clone(),
            request,
        }
    }

    /// `GET`s `path` and decodes the JSON answer.
    pub async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, Error> {
        self.request(Method::GET, path).send_json().await
    }

    /// `POST`s `body` as JSON to `path` and decodes the JSON answer.
    pub async fn post_json<B, T>(&self, path: &str, body: &B) -> Result<T, Error>
    where
        B: Serialize + ?Sized,
        T: DeserializeOwned,
    {
        self.request(Method::POST, path)
            .json(body)
            .send_json()
            .await
    }

    /// `PUT`s `body` as JSON to `path` and decodes the JSON answer.
    pub async fn put_json<B, T>(&self, path: &str, body: &B) -> Result<T, Error>
    where
        B: Serialize + ?Sized,
        T: DeserializeOwned,
    {
        self.request(Method::PUT, path).json(body).send_json().await
    }

    /// `DELETE`s `path`, ignoring the body of the answer.
    pub async fn delete(&self, path: &str) -> Result<(), Error> {
        self.request(Method::DELETE, path).send().await.map(drop)
    }

    /// Sends a request built by hand.
    ///
    /// A URI with only a path and query is appended to the base URL; an absolute
    /// `http` URI is used as is, and so is an `https` one when the client can call them
    /// (its base URL is `https`, or it was given [`ClientBuilder::tls`]). Default headers
    /// the request lacks are added.
    pub async fn send<B: Into<Bytes>>(&self, req: Request<B>) -> Result<Response<Bytes>, Error> {
        let (mut parts, body) = req.into_parts();
        if parts.uri.scheme().is_none() {
            let path = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
            parts.uri = self.shared.base.join(path)?;
        } else if parts.uri.scheme() == Some(&http::uri::Scheme::HTTPS) && !self.shared.https {
            return Err(Error::invalid_url(
                &parts.uri.to_string(),
                Reason(
                    "an https url needs a client with an https base url or `ClientBuilder::tls`",
                ),
            ));
        } else if parts.uri.scheme() != Some(&http::uri::Scheme::HTTP)
            && parts.uri.scheme() != Some(&http::uri::Scheme::HTTPS)
        {
            return Err(Error::invalid_url(
                &parts.uri.to_string(),
                Reason("only http and https urls are supported"),
            ));
        }
        self.execute(Request::from_parts(parts, Full::new(body.into())))
            .await
    }

    async fn execute(&self, mut req: ClientRequest) -> Result<Response<Bytes>, Error> {
        let headers = req.headers_mut();
        for name in self.shared.default_headers.keys() {
            if !headers.contains_key(name) {
                for value in self.shared.default_headers.get_all(name) {
                    headers.append(name, value.clone());
                }
            }
        }
        // Carried in the extensions as well as the task-local, so that the trace
        // survives layers that move the call to another task.
        if req.extensions().get::<TraceContext>().is_none() {
            if let Some(ctx) = TraceContext::current() {
                req.extensions_mut().insert(ctx);
            }
        }
        #[cfg(feature = "identity")]
        if req
            .extensions()
            .get::<crate::identity::OnBehalfOf>()
            .is_none()
        {
            if let Some(caller) = crate::identity::current_caller() {
                req.extensions_mut()
                    .insert(crate::identity::OnBehalfOf(caller.user));
            }
        }
        let info = RequestInfo::of(&req);
        self.shared
            .service
            .clone()
            .oneshot(req)
            .await
            .map_err(|err| Error::from_stack(err, &info))
    }
}

impl fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpClient")
            .field("base_url", &self.shared.base.prefix)
            .field(
                "default_headers",
                &header_names(&self.shared.default_headers),
            )
            .finish_non_exhaustive()
    }
}

/// Configures and builds an [`HttpClient`]; see [`HttpClient::builder`].
#[must_use]
pub struct ClientBuilder {
    base: Result<BaseUrl, Error>,
    timeout: Option<Duration>,
    connect_timeout: Option<Duration>,
    pool_idle_timeout: Option<Duration>,
    pool_max_idle_per_host: usize,
    max_response_body: usize,
    default_headers: Result<HeaderMap, Error>,
    layers: Vec<LayerFn>,
    #[cfg(feature = "tls")]
    tls: Option<crate::tls::ClientTlsConfig>,
}

impl ClientBuilder {
    fn new(base_url: &str) -> Self {
        let mut default_headers = HeaderMap::new();
        default_headers.insert(header::USER_AGENT, HeaderValue::from_static(USER_AGENT));
        default_headers.insert(header::ACCEPT, APPLICATION_JSON);
        Self {
            base: BaseUrl::parse(base_url),
            timeout: Some(Duration::from_secs(30)),
            connect_timeout: None,
            pool_idle_timeout: Some(Duration::from_secs(90)),
            pool_max_idle_per_host: usize::MAX,
            max_response_body: 16 * 1024 * 1024,
            default_headers: Ok(default_headers),
            layers: Vec::new(),
            #[cfg(feature = "tls")]
            tls: None,
        }
    }

    /// Bounds each exchange (connecting, sending, reading the whole answer); a call
    /// that takes longer fails with [`ErrorKind::Timeout`]. `None` for no bound.
    /// Defaults to 30 seconds.
    ///
    /// The bound applies to each attempt: it sits below the layers, so a retry layer
    /// sees the timeout and a retried call gets a fresh one.
    pub fn timeout(mut self, timeout: impl Into<Option<Duration>>) -> Self {
        self.timeout = timeout.into();
        self
    }

    /// Bounds connecting to the server; failing that is an [`ErrorKind::Connect`]
    /// error, which is always retryable. Defaults to no bound of its own.
    pub fn connect_timeout(mut self, timeout: impl Into<Option<Duration>>) -> Self {
        self.connect_timeout = timeout.into();
        self
    }

    /// How long an unused keep-alive connection stays in the pool. `None` keeps it
    /// until the server closes it. Defaults to 90 seconds.
    pub fn pool_idle_timeout(mut self, timeout: impl Into<Option<Duration>>) -> Self {
        self.pool_idle_timeout = timeout.into();
        self
    }

    /// The most unused connections kept per host. Defaults to no limit.
    pub fn pool_max_idle_per_host(mut self, max: usize) -> Self {
        self.pool_max_idle_per_host = max;
        self
    }

    /// The largest response body accepted, in bytes; a larger one fails with
    /// [`ErrorKind::BodyTooLarge`]. Defaults to 16 MiB.
    pub fn max_response_body(mut self, bytes: usize) -> Self {
        self.max_response_body = bytes;
        self
    }

    /// Sends this header with every request that does not set it itself, replacing
    /// an earlier default (such as `user-agent`). An invalid name or value is reported
    /// by [`build`](Self::build).
    pub fn default_header<K, V>(mut self, name: K, value: V) -> Self
    where
        HeaderName: TryFrom<K>,
        <HeaderName as TryFrom<K>>::Error: Into<http::Error>,
        HeaderValue: TryFrom<V>,
        <HeaderValue as TryFrom<V>>::Error: Into<http::Error>,
    {
        self.default_headers = self.default_headers.and_then(|mut headers| {
            let (name, value) = header_pair(name, value)?;
            headers.insert(name, value);
            Ok(headers)
        });
        self
    }

    /// Verifies servers and shows a client certificate as `tls` says, for an `https`
    /// base URL or absolute `https` URLs given to [`HttpClient::send`]. Without it, an
    /// `https` base URL trusts the system's store and shows no client certificate.
    #[cfg(feature = "tls")]
    pub fn tls(mut self, tls: crate::tls::ClientTlsConfig) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Wraps the client stack in `layer`, such as a resilience policy.
    ///
    /// The first layer added is the outermost, as with
    /// [`tower::ServiceBuilder`]. Every layer wraps the trace propagation and the
    /// transport, so it sees each call's [`Error`] (inside a [`BoxError`]) and may
    /// call the inner service again. Errors of its own come out of the client as
    /// [`ErrorKind::Rejected`] with the layer's error as the source.
    pub fn layer<L>(mut self, layer: L) -> Self
    where
        L: Layer<ClientService> + Send + 'static,
        L::Service:
            Service<ClientRequest, Response = Response<Bytes>> + Clone + Send + Sync + 'static,
        <L::Service as Service<ClientRequest>>::Error: Into<BoxError>,
        <L::Service as Service<ClientRequest>>::Future: Send + 'static,
    {
        self.layers.push(Box::new(move |inner: ClientService| {
            BoxCloneSyncService::new(layer.layer(inner).map_err(Into::into))
        }));
        self
    }

    /// Wraps the client stack in a [`ResiliencePolicy`] named `name` (the name labels
    /// its circuit breaker's metrics).
    ///
    /// The policy's timeout becomes the client's [per-attempt timeout](Self::timeout)
    /// rather than a layer of its own: the client's timeout knows the request's method,
    /// so a `POST` that timed out is not retried (it may have had its effect), where the
    /// policy's timeout error is retryable whatever the request was.
    pub fn policy(mut self, name: &str, mut policy: ResiliencePolicy) -> Self {
        if let Some(timeout) = policy.timeout.take() {
            self.timeout = Some(timeout);
        }
        self.layer(policy.layer(name))
    }

    /// Builds the client. Fails when the base URL or a default header is invalid, or
    /// the [TLS settings](Self::tls) can't be used (their files are read here).
    ///
    /// Needs no runtime; the first request must be made inside a Tokio runtime.
    pub fn build(self) -> Result<HttpClient, Error> {
        let base = self.base?;
        let default_headers = self.default_headers?;

        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(self.connect_timeout);
        #[cfg(feature = "tls")]
        let (connector, https) = if self.tls.is_some() || base.https {
            let tls = self.tls.unwrap_or_default();
            (tls.https_connector(connector).map_err(Error::tls)?, true)
        } else {
            (crate::tls::http_only_connector(connector), false)
        };
        #[cfg(not(feature = "tls"))]
        let https = false;
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(self.pool_idle_timeout)
            .pool_max_idle_per_host(self.pool_max_idle_per_host)
            .pool_timer(TokioTimer::new())
            .build(connector);

        let transport = Transport {
            client,
            timeout: self.timeout,
            max_body: self.max_response_body,
        };
        let mut service = ClientService::new(PropagateTrace::new(transport));
        for layer in self.layers.into_iter().rev() {
            service = layer(service);
        }

        Ok(HttpClient {
            shared: Arc::new(Shared {
                base,
                https,
                default_headers,
                service,
            }),
        })
    }
}

impl fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientBuilder")
            .field("base_url", &self.base.as_ref().map(|b| &b.prefix))
            .field("timeout", &self.timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("pool_idle_timeout", &self.pool_idle_timeout)
            .field("pool_max_idle_per_host", &self.pool_max_idle_per_host)
            .field("max_response_body", &self.max_response_body)
            .field(
                "default_headers",
                &self.default_headers.as_ref().map(header_names),
            )
            .field("layers", &self.layers.len())
            .finish()
    }
}

/// A request being put together; see [`HttpClient::request`].
///
/// Errors (an invalid header, a body that does not encode) are reported when it is
/// sent.
#[must_use = "a request does nothing until it is sent"]
pub struct RequestBuilder {
    client: HttpClient,
    request: Result<Request<Bytes>, Error>,
}

impl RequestBuilder {
    /// Adds a header, keeping earlier values of the same name.
    pub fn header<K, V>(mut self, name: K, value: V) -> Self
    where
        HeaderName: TryFrom<K>,
        <HeaderName as TryFrom<K>>::Error: Into<http::Error>,
        HeaderValue: TryFrom<V>,
        <HeaderValue as TryFrom<V>>::Error: Into<http::Error>,
    {
        self.request = self.request.and_then(|mut req| {
            let (name, value) = header_pair(name, value)?;
            req.headers_mut().append(name, value);
            Ok(req)
        });
        self
    }

    /// Sets the [`Idempotency-Key`](IDEMPOTENCY_KEY) header, which makes a `POST` or
    /// `PATCH` safe to retry (the server must honour the key).
    pub fn idempotency_key<V>(mut self, key: V) -> Self
    where
        HeaderValue: TryFrom<V>,
        <HeaderValue as TryFrom<V>>::Error: Into<http::Error>,
    {
        self.request = self.request.and_then(|mut req| {
            let (name, value) = header_pair(IDEMPOTENCY_KEY, key)?;
            req.headers_mut().insert(name, value);
            Ok(req)
        });
        self
    }

    /// Adds a request extension, seen by the client's layers (for example
    /// `micro_core::identity::OnBehalfOf`, which names the end user a signed call acts
    /// for). It does not travel over the wire.
    pub fn extension<T: Clone + Send + Sync + 'static>(mut self, value: T) -> Self {
        if let Ok(req) = &mut self.request {
            req.extensions_mut().insert(value);
        }
        self
    }

    /// Sets `body`, encoded as JSON, as the body, with `content-type:
    /// application/json`.
    pub fn json<T: Serialize + ?Sized>(mut self, body: &T) -> Self {
        self.request = self.request.and_then(|mut req| {
            let bytes = serde_json::to_vec(body).map_err(Error::encode::<T>)?;
            *req.body_mut() = Bytes::from(bytes);
            req.headers_mut()
                .insert(header::CONTENT_TYPE, APPLICATION_JSON);
            Ok(req)
        });
        self
    }

    /// Sets raw bytes as the body; set a `content-type` header to go with them.
    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        if let Ok(req) = &mut self.request {
            *req.body_mut() = body.into();
        }
        self
    }

    /// Sends the request and returns the `2xx` answer with its whole body.
    pub async fn send(self) -> Result<Response<Bytes>, Error> {
        let req = self.request?.map(Full::new);
        self.client.execute(req).await
    }

    /// Sends the request and decodes the JSON answer. An empty body decodes as JSON
    /// `null`, so `()` and `Option<_>` accept a `204 No Content`.
    pub async fn send_json<T: DeserializeOwned>(self) -> Result<T, Error> {
        let (parts, body) = self.send().await?.into_parts();
        let json: &[u8] = if body.is_empty() { b"null" } else { &body };
        serde_json::from_slice(json).map_err(|err| Error::decode::<T>(parts.status, body, err))
    }
}

impl fmt::Debug for RequestBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("RequestBuilder");
        match &self.request {
            Ok(req) => d
                .field("method", req.method())
                .field("uri", req.uri())
                .field("headers", &header_names(req.headers()))
                .field("body_len", &req.body().len()),
            Err(err) => d.field("error", err),
        };
        d.finish()
    }
}

fn header_pair<K, V>(name: K, value: V) -> Result<(HeaderName, HeaderValue), Error>
where
    HeaderName: TryFrom<K>,
    <HeaderName as TryFrom<K>>::Error: Into<http::Error>,
    HeaderValue: TryFrom<V>,
    <HeaderValue as TryFrom<V>>::Error: Into<http::Error>,
{
    let name = HeaderName::try_from(name).map_err(|err| Error::invalid_request(err.into()))?;
    let value = HeaderValue::try_from(value).map_err(|err| Error::invalid_request(err.into()))?;
    Ok((name, value))
}

/// Header names only: values may be credentials.
fn header_names(headers: &HeaderMap) -> Vec<&HeaderName> {
    headers.keys().collect()
}

/// A validated `http` (or `https`) base URL, without a trailing slash.
#[derive(Debug, Clone)]
struct BaseUrl {
    prefix: String,
    #[cfg_attr(not(feature = "tls"), allow(dead_code))]
    https: bool,
}

impl BaseUrl {
    fn parse(url: &str) -> Result<Self, Error> {
        let uri: Uri = url.parse().map_err(|err| Error::invalid_url(url, err))?;
        let https = uri.scheme() == Some(&http::uri::Scheme::HTTPS);
        let reason = if https && cfg!(not(feature = "tls")) {
            Some("https urls need micro-core's `tls` feature")
        } else if uri.scheme() != Some(&http::uri::Scheme::HTTP) && !https {
            Some("only http and https urls are supported")
        } else if uri.authority().is_none() {
            Some("the url has no host")
        } else if uri.query().is_some() {
            Some("a base url cannot have a query")
        } else {
            None
        };
        if let Some(reason) = reason {
            return Err(Error::invalid_url(url, Reason(reason)));
        }
        Ok(Self {
            prefix: url.trim_end_matches('/').to_owned(),
            https,
        })
    }

    fn join(&self, path: &str) -> Result<Uri, Error> {
        let url = format!("{}/{}", self.prefix, path.trim_start_matches('/'));
        url.parse().map_err(|err| Error::invalid_url(&url, err))
    }
}
