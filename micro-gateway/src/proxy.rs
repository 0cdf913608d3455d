//! Forwarding a request to an upstream: bodies streamed both ways, pooled keep-alive
//! connections (HTTP/1.1, or h2c with prior knowledge), hop-by-hop headers removed,
//! forwarding headers set, the trace carried on.

use std::convert::Infallible;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use micro_core::error::{BoxError, Chain};
use micro_core::identity::{Caller, KeyRing, IDENTITY_HEADER};
use micro_core::middleware::RequestId;
use micro_core::resilience::{CircuitBreaker, CircuitOpen};
use micro_core::service::BoxFuture;
use micro_core::tls::{ClientTlsConfig, HttpsConnector, TlsError};
use micro_core::trace::TraceContext;
use micro_discovery::balance::{Attempts, BalanceConfig, Balancer};
use micro_discovery::Discover;
use serde::Deserialize;
use tower::util::BoxCloneSyncService;
use tower::ServiceExt;
use tower_layer::Layer;
use tower_service::Service;

use crate::error::error_response;

/// How a [`Proxy`] talks to its upstream.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct ProxyConfig {
    /// How long to wait for the upstream's response headers; `None` waits as long as the
    /// upstream takes. The body that follows is streamed without a bound of its own.
    #[serde(with = "micro_core::config::duration::option")]
    pub timeout: Option<Duration>,
    /// How long to wait for a connection to be made.
    #[serde(with = "micro_core::config::duration")]
    pub connect_timeout: Duration,
    /// Speak HTTP/2 over cleartext with prior knowledge (h2c) instead of HTTP/1.1.
    pub http2: bool,
    /// Send the client's `Host` header upstream instead of the upstream's own authority.
    pub preserve_host: bool,
    /// How long an idle pooled connection is kept.
    #[serde(with = "micro_core::config::duration")]
    pub pool_idle_timeout: Duration,
    /// How many times a request that failed to reach an instance (refused, reset, timed
    /// out) is sent again, each time to another instance. Only requests that are safe to
    /// repeat and carry no body are retried: `GET`, `HEAD`, `OPTIONS`, `DELETE`.
    pub retries: u32,
    /// A circuit breaker for the upstream: while it is open, requests are answered `503`
    /// at once instead of waiting on an upstream that keeps failing. Off when absent.
    pub circuit_breaker: Option<micro_core::resilience::CircuitBreakerConfig>,
    /// How an `https` upstream is verified (a CA bundle, a client certificate for mTLS;
    /// see [`ClientTlsConfig`]); the system trust store when unset. For URL upstreams
    /// ([`Proxy::new`]); discovered instances are called over `http`.
    pub tls: Option<ClientTlsConfig>,
    /// Proxies (load balancers) in front of the gateway whose forwarding headers are
    /// believed, as Kong's `trusted_ips`. A request from any other peer has its
    /// `X-Forwarded-For`, `X-Forwarded-Host`, `X-Forwarded-Proto`, `X-Real-IP` and
    /// `Forwarded` removed before the gateway adds its own, so a client can't spoof the
    /// address upstreams see. Empty (the default): no one is believed.
    #[serde(skip)]
    pub trusted_proxies: Vec<ipnet::IpNet>,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            timeout: Some(Duration::from_secs(60)),
            connect_timeout: Duration::from_secs(5),
            http2: false,
            preserve_host: false,
            pool_idle_timeout: Duration::from_secs(90),
            retries: 0,
            circuit_breaker: None,
            tls: None,
            trusted_proxies: Vec::new(),
        }
    }
}

impl ProxyConfig {
    /// The defaults: HTTP/1.1, a 60 s response timeout, a 5 s connect timeout.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the response-headers timeout.
    pub fn timeout(mut self, timeout: impl Into<Option<Duration>>) -> Self {
        self.timeout = timeout.into();
        self
    }

    /// Sets [`trusted_proxies`](Self::trusted_proxies).
    pub fn trusted_proxies(mut self, proxies: impl IntoIterator<Item = ipnet::IpNet>) -> Self {
        self.trusted_proxies = proxies.into_iter().collect();
        self
    }

    /// Sets the connect timeout.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Speaks h2c to the upstream.
    pub fn http2(mut self, http2: bool) -> Self {
        self.http2 = http2;
        self
    }

    /// Sends the client's `Host` upstream.
    pub fn preserve_host(mut self, preserve: bool) -> Self {
        self.preserve_host = preserve;
        self
    }

    /// Sends a failed request that is safe to repeat again, up to `retries` times.
    pub fn retries(mut self, retries: u32) -> Self {
        self.retries = retries;
        self
    }

    /// Sets [`tls`](Self::tls), for an `https` upstream.
    pub fn tls(mut self, tls: ClientTlsConfig) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Puts a circuit breaker in front of the upstream.
    pub fn circuit_breaker(mut self, config: micro_core::resilience::CircuitBreakerConfig) -> Self {
        self.circuit_breaker = Some(config);
        self
    }
}

/// The upstream URL is not one the proxy can use.
#[derive(Debug, thiserror::Error)]
#[error("invalid upstream url `{url}`: {reason}")]
pub struct InvalidUpstream {
    url: String,
    reason: &'static str,
}

/// Where a [`Proxy`] sends requests: scheme, authority and a path prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    scheme: Scheme,
    authority: Authority,
    prefix: String,
}

impl Upstream {
    /// Parses `http://host:port` or `http://host:port/prefix`, or the same with
    /// `https://` (verified as [`ProxyConfig::tls`] says).
    ///
    /// # Errors
    ///
    /// When the URL does not parse, is neither `http` nor `https`, or has a query.
    pub fn parse(url: &str) -> Result<Self, InvalidUpstream> {
        let invalid = |reason| InvalidUpstream {
            url: url.to_owned(),
            reason,
        };
        let uri: Uri = url.parse().map_err(|_| invalid("not a url"))?;
        let scheme = uri.scheme().cloned().ok_or_else(|| invalid("no scheme"))?;
        if scheme != Scheme::HTTP && scheme != Scheme::HTTPS {
            return Err(invalid("only http and https upstreams are supported"));
        }
        let authority = uri.authority().cloned().ok_or_else(|| invalid("no host"))?;
        if uri.query().is_some() {
            return Err(invalid("an upstream url has no query"));
        }
        let prefix = uri.path().trim_end_matches('/').to_owned();
        Ok(Self {
            scheme,
            authority,
            prefix,
        })
    }

    /// An upstream at `addr`.
    pub fn from_addr(addr: SocketAddr) -> Self {
        Self {
            scheme: Scheme::HTTP,
            authority: Authority::try_from(addr.to_string())
                .expect("a socket address is an authority"),
            prefix: String::new(),
        }
    }

    /// The upstream's authority (`host:port`).
    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    /// The URI of `path_and_query` on this upstream.
    fn join(&self, path_and_query: Option<&PathAndQuery>) -> Uri {
        let path = join_path(&self.prefix, path_and_query, false);
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(path)
            .build()
            .expect("parts taken from valid uris make a valid uri")
    }
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}{}", self.scheme, self.authority, self.prefix)
    }
}

/// Where a [`Proxy`] sends requests.
#[derive(Clone)]
enum Target {
    /// One upstream at a fixed address.
    Fixed(Arc<Upstream>),
    /// The healthy instances of a service in the registry, chosen per request.
    Discovered { service: Arc<str>, prefix: Arc<str> },
}

type Pipeline = BoxCloneSyncService<Request<Body>, Response<Incoming>, BoxError>;

/// A tower service that forwards every request to its upstream: one fixed address
/// ([`Proxy::new`]) or the healthy instances of a service found through discovery
/// ([`Proxy::discovered`]), balanced per request.
///
/// It never fails: an upstream that cannot be reached answers `502`, one that does not
/// answer in time `504`, a service without a healthy instance or behind an open circuit
/// breaker `503`, each with a JSON body; the details go to the log. A request that is safe
/// to repeat (`GET`, `HEAD`, `OPTIONS`, `DELETE` without a body) and failed to reach an
/// instance is sent again up to [`ProxyConfig::retries`] times, to another instance when
/// there is one.
///
/// The client address comes from axum's [`ConnectInfo<SocketAddr>`] extension, which
/// micro-core's host sets; it is appended to `X-Forwarded-For` and `Forwarded`.
///
/// An [identity token](micro_core::identity::IDENTITY_HEADER) that came with the request
/// is always removed: a client never speaks for a service. With
/// [`Proxy::sign_as`], the gateway signs each forwarded request as itself instead, for
/// the end user whose token the [JWT plugin](crate::plugins::jwt) verified.
#[derive(Clone)]
pub struct Proxy {
    pipeline: Pipeline,
    target: Target,
    label: Arc<str>,
    config: Arc<ProxyConfig>,
    identity: Option<Arc<SignAs>>,
    durations: Arc<UpstreamDurations>,
}

/// How a [`Proxy`] signs what it forwards.
#[derive(Debug)]
struct SignAs {
    keys: KeyRing,
    service: Arc<str>,
    audience: Arc<str>,
}

/// The `micro_gateway_upstream_duration_seconds` histogram of each route a proxy serves,
/// taken from the recorder at the route's first request and kept.
#[derive(Default)]
struct UpstreamDurations {
    by_route: std::sync::RwLock<std::collections::HashMap<Arc<str>, metrics::Histogram>>,
}

impl UpstreamDurations {
    fn record(&self, route: &Arc<str>, upstream: &Arc<str>, seconds: f64) {
        let by_route = &self.by_route;
        if let Some(histogram) = by_route
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(route)
        {
            histogram.record(seconds);
            return;
        }
        by_route
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(route.clone())
            .or_insert_with(|| {
                metrics::histogram!(
                    "micro_gateway_upstream_duration_seconds",
                    "route" => route.clone(),
                    "upstream" => upstream.clone(),
                )
            })
            .record(seconds);
    }
}

impl Proxy {
    /// A proxy to `upstream`, with its own connection pool.
    ///
    /// An `https` upstream whose [TLS settings](ProxyConfig::tls) can't be used (a CA
    /// file that can't be read) is answered `502` and the reason logged; use
    /// [`try_new`](Self::try_new) to be told at once.
    pub fn new(upstream: Upstream, config: ProxyConfig) -> Self {
        let name = upstream.to_string();
        let sender = Sender::new(&config, upstream.scheme == Scheme::HTTPS);
        Self::assemble(
            BoxCloneSyncService::new(sender),
            Target::Fixed(Arc::new(upstream)),
            &name,
            config,
        )
    }

    /// Like [`new`](Self::new), but fails when the upstream is `https` and its [TLS
    /// settings](ProxyConfig::tls) can't be used.
    ///
    /// # Errors
    ///
    /// The [`TlsError`] naming the setting (`ca`, `cert`, `key`) and the file.
    pub fn try_new(upstream: Upstream, config: ProxyConfig) -> Result<Self, TlsError> {
        if upstream.scheme == Scheme::HTTPS {
            config.tls.clone().unwrap_or_default().rustls_config()?;
        }
        Ok(Self::new(upstream, config))
    }

    /// A proxy to the instances of `service` that `discover` finds, balanced by
    /// `balance` (power of two choices by default; failing instances are ejected for a
    /// while). `prefix` is put before every request path (`""` for none).
    pub fn discovered(
        discover: Arc<dyn Discover>,
        service: &str,
        prefix: &str,
        balance: BalanceConfig,
        config: ProxyConfig,
    ) -> Self {
        let balancer = Balancer::new(discover, service, balance);
        let balanced = balancer.layer().layer(Sender::new(&config, false));
        let target = Target::Discovered {
            service: service.into(),
            prefix: prefix.trim_end_matches('/').into(),
        };
        Self::assemble(BoxCloneSyncService::new(balanced), target, service, config)
    }

    fn assemble(pipeline: Pipeline, target: Target, name: &str, config: ProxyConfig) -> Self {
        let pipeline = match &config.circuit_breaker {
            Some(breaker) => BoxCloneSyncService::new(CircuitBreaker::named(
                pipeline,
                name.to_owned(),
                breaker.clone(),
            )),
            None => pipeline,
        };
        // Named once: the name labels every request's metrics.
        let label = match &target {
            Target::Fixed(upstream) => upstream.to_string(),
            Target::Discovered { service, .. } => format!("discovery:{service}"),
        };
        Self {
            pipeline,
            target,
            label: label.into(),
            config: Arc::new(config),
            durations: Arc::default(),
            identity: None,
        }
    }

    /// This proxy, signing every request it forwards with a
    /// [`Caller`] token saying that `service` (the
    /// gateway's own name) calls `audience` (the upstream service's name, which its
    /// [`VerifyCallerLayer`](micro_core::identity::VerifyCallerLayer) expects), for the
    /// subject of the token the [JWT plugin](crate::plugins::jwt) verified, if any.
    ///
    /// Keys rotate without a rebuild: [`KeyRing::rotate`] is seen by the next request.
    pub fn sign_as(
        mut self,
        keys: KeyRing,
        service: impl Into<Arc<str>>,
        audience: impl Into<Arc<str>>,
    ) -> Self {
        self.identity = Some(Arc::new(SignAs {
            keys,
            service: service.into(),
            audience: audience.into(),
        }));
        self
    }

    /// The upstream's service name in discovery, for a discovered proxy.
    pub fn service(&self) -> Option<&str> {
        match &self.target {
            Target::Fixed(_) => None,
            Target::Discovered { service, .. } => Some(service),
        }
    }

    /// Where requests go, for logs and metrics: the upstream's URL or
    /// `discovery:<service>`.
    pub fn target(&self) -> &str {
        &self.label
    }

    /// This proxy with [`ProxyConfig::preserve_host`] set, sharing its connection pool,
    /// balancer and circuit breaker: for routes to the same upstream that differ only there.
    pub fn with_preserve_host(mut self, preserve: bool) -> Self {
        if self.config.preserve_host != preserve {
            Arc::make_mut(&mut self.config).preserve_host = preserve;
        }
        self
    }

    async fn forward(self, request: Request<Body>) -> Response<Body> {
        let (mut parts, body) = request.into_parts();
        let route: Arc<str> = parts
            .extensions
            .get::<crate::gateway::MatchedRoute>()
            .map_or_else(|| Arc::from(""), |matched| matched.name.clone());
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|info| info.0.ip());
        let host = parts.headers.get(header::HOST).cloned().or_else(|| {
            parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        });

        remove_hop_by_hop(&mut parts.headers);
        let trusted = peer.is_some_and(|peer| {
            let peer = peer.to_canonical();
            self.config
                .trusted_proxies
                .iter()
                .any(|net| net.contains(&peer))
        });
        if !trusted {
            remove_forwarding_headers(&mut parts.headers);
        }
        set_forwarding_headers(&mut parts.headers, peer, host.as_ref());
        parts.headers.remove(IDENTITY_HEADER);
        if let Some(identity) = &self.identity {
            let user = parts
                .extensions
                .get::<crate::plugins::jwt::VerifiedClaims>()
                .and_then(|claims| claims.subject())
                .map(str::to_owned);
            let caller = Caller {
                service: identity.service.to_string(),
                user,
            };
            let signed = identity
                .keys
                .sign(&caller, &identity.audience)
                .map_err(BoxError::from)
                .and_then(|token| HeaderValue::try_from(token).map_err(BoxError::from));
            match signed {
                Ok(token) => {
                    parts.headers.insert(IDENTITY_HEADER, token);
                }
                Err(error) => {
                    tracing::error!(target = %self.target(), error = %Chain(&*error), "cannot sign the gateway's identity");
                    return error_response(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "identity_unavailable",
                        "the gateway cannot vouch for this request now",
                    );
                }
            }
        }
        if !self.config.preserve_host {
            parts.headers.remove(header::HOST);
        }
        if let Some(context) = TraceContext::current() {
            context.child().inject(&mut parts.headers);
        }
        if let Some(id) = parts.extensions.get::<RequestId>() {
            parts.headers.insert(
                micro_core::middleware::request_id::X_REQUEST_ID.clone(),
                id.header_value().clone(),
            );
        }
        let whole = parts
            .extensions
            .get::<crate::gateway::WholePathStripped>()
            .is_some();
        parts.uri = match &self.target {
            Target::Fixed(upstream) => {
                let path = join_path(&upstream.prefix, parts.uri.path_and_query(), whole);
                let mut uri = upstream.join(None).into_parts();
                match PathAndQuery::try_from(path) {
                    Ok(pq) => uri.path_and_query = Some(pq),
                    Err(_) => {
                        return error_response(
                            StatusCode::BAD_REQUEST,
                            "bad_path",
                            "the request path is invalid",
                        )
                    }
                }
                Uri::from_parts(uri).expect("parts taken from valid uris make a valid uri")
            }
            Target::Discovered { prefix, .. } => {
                match Uri::try_from(join_path(prefix, parts.uri.path_and_query(), whole)) {
                    Ok(uri) => uri,
                    Err(_) => {
                        return error_response(
                            StatusCode::BAD_REQUEST,
                            "bad_path",
                            "the request path is invalid",
                        )
                    }
                }
            }
        };
        parts.version = if self.config.http2 {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        };

        let replayable = matches!(
            parts.method,
            Method::GET | Method::HEAD | Method::OPTIONS | Method::DELETE
        ) && http_body::Body::size_hint(&body).exact() == Some(0);
        let attempts = if replayable {
            1 + self.config.retries
        } else {
            1
        };
        // Only a balancer reads the instances already tried.
        if matches!(self.target, Target::Discovered { .. }) {
            parts.extensions.insert(Attempts::new());
        }
        let mut body = Some(body);
        let mut parts = Some(parts);
        let mut attempt = 0;
        let started = std::time::Instant::now();
        let outcome = loop {
            attempt += 1;
            // Only an attempt that may be followed by another needs a copy of the head.
            let request = if attempt == attempts {
                let parts = parts.take().expect("the last attempt takes the parts");
                Request::from_parts(parts, body.take().unwrap_or_default())
            } else {
                let parts = parts.as_ref().expect("kept until the last attempt").clone();
                Request::from_parts(parts, Body::empty())
            };
            match self.pipeline.clone().oneshot(request).await {
                Ok(response) => break Ok(response),
                Err(error) if attempt < attempts && is_transport_failure(&*error) => {
                    tracing::debug!(target = %self.target(), attempt, error = %Chain(&*error), "retrying on another instance");
                }
                Err(error) => break Err(error),
            }
        };
        self.durations
            .record(&route, &self.label, started.elapsed().as_secs_f64());
        match outcome {
            Ok(response) => {
                let (mut parts, body) = response.into_parts();
                remove_hop_by_hop(&mut parts.headers);
                Response::from_parts(parts, Body::new(body))
            }
            Err(error) => {
                let response = self.failure(&*error);
                let reason = response
                    .extensions()
                    .get::<crate::error::ErrorCode>()
                    .map_or_else(
                        || "upstream_failed".to_owned(),
                        |code| code.as_str().to_owned(),
                    );
                metrics::counter!(
                    "micro_gateway_upstream_errors_total",
                    "route" => route,
                    "upstream" => self.label.clone(),
                    "reason" => reason,
                )
                .increment(1);
                response
            }
        }
    }

    /// The answer to a request that got no response from the upstream.
    fn failure(&self, error: &(dyn std::error::Error + 'static)) -> Response<Body> {
        let target = self.target();
        if error.is::<CircuitOpen>() {
            tracing::warn!(%target, "circuit breaker open");
            return error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "circuit_open",
                "the upstream service is failing; try again later",
            );
        }
        if no_instances(error) {
            tracing::warn!(%target, "no healthy instance");
            return error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "no_healthy_instance",
                "no healthy instance of the upstream service",
            );
        }
        if caused_by::<http_body_util::LengthLimitError>(error) {
            return crate::plugins::body_limit::too_large();
        }
        if caused_by::<UpstreamTimeout>(error) {
            tracing::warn!(%target, timeout = ?self.config.timeout, "upstream timed out");
            return error_response(
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_timeout",
                "the upstream service did not answer in time",
            );
        }
        let connect =
            find::<hyper_util::client::legacy::Error>(error).is_some_and(|e| e.is_connect());
        let code = if connect {
            "upstream_unreachable"
        } else {
            "upstream_failed"
        };
        tracing::warn!(%target, error = %Chain(error), "upstream request failed");
        error_response(
            StatusCode::BAD_GATEWAY,
            code,
            "the upstream service failed to answer",
        )
    }
}

impl fmt::Debug for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Proxy")
            .field("target", &self.target())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Service<Request<Body>> for Proxy {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { Ok(this.forward(request).await) })
    }
}

/// The upstream path: the service's prefix, then the request's path and query. When the
/// route stripped the whole path, a prefix stands alone (`/orders?x=1`, not `/orders/?x=1`).
fn join_path(prefix: &str, path_and_query: Option<&PathAndQuery>, whole: bool) -> String {
    let tail = path_and_query.map_or("/", PathAndQuery::as_str);
    if whole && !prefix.is_empty() {
        if let Some(rest) = tail.strip_prefix('/') {
            if rest.is_empty() || rest.starts_with('?') {
                return format!("{prefix}{rest}");
            }
        }
    }
    format!("{prefix}{tail}")
}

/// Sends one request on the pooled connections, bounded by the response timeout.
#[derive(Clone)]
struct Sender {
    client: Client<HttpsConnector, Body>,
    timeout: Option<Duration>,
}

impl Sender {
    fn new(config: &ProxyConfig, https: bool) -> Self {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(config.connect_timeout));
        let tls = config.tls.clone().unwrap_or_default();
        let connector = match https.then(|| tls.https_connector(http.clone())) {
            Some(Ok(connector)) => connector,
            Some(Err(error)) => {
                tracing::error!(%error, "the upstream's tls settings can't be used: its requests fail");
                micro_core::tls::http_only_connector(http)
            }
            None => micro_core::tls::http_only_connector(http),
        };
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(config.pool_idle_timeout)
            .pool_timer(TokioTimer::new())
            .http2_only(config.http2)
            .build(connector);
        Self {
            client,
            timeout: config.timeout,
        }
    }
}

impl Service<Request<Body>> for Sender {
    type Response = Response<Incoming>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Response<Incoming>, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let sent = self.client.request(request);
        let timeout = self.timeout;
        Box::pin(async move {
            match timeout {
                Some(limit) => match tokio::time::timeout(limit, sent).await {
                    Ok(result) => result.map_err(Into::into),
                    Err(_) => Err(UpstreamTimeout::new(limit).into()),
                },
                None => sent.await.map_err(Into::into),
            }
        })
    }
}

/// The upstream did not send response headers within the timeout.
#[derive(Debug, thiserror::Error)]
#[error("the upstream did not answer within {limit:?}")]
struct UpstreamTimeout {
    limit: Duration,
    // Balancers count an io `TimedOut` in the chain as the instance failing.
    #[source]
    source: std::io::Error,
}

impl UpstreamTimeout {
    fn new(limit: Duration) -> Self {
        Self {
            limit,
            source: std::io::Error::new(std::io::ErrorKind::TimedOut, "upstream response timeout"),
        }
    }
}

/// Whether the request never got an answer from an instance: it may go to another one.
fn is_transport_failure(error: &(dyn std::error::Error + 'static)) -> bool {
    caused_by::<UpstreamTimeout>(error)
        || find::<hyper_util::client::legacy::Error>(error).is_some()
}

/// Whether discovery had no instance to offer. micro-core's retry markers are
/// transparent, so they are looked through by hand.
fn no_instances(error: &(dyn std::error::Error + 'static)) -> bool {
    let inner = error
        .downcast_ref::<micro_core::error::Transient>()
        .map(|t| t.get_ref() as &(dyn std::error::Error + 'static))
        .unwrap_or(error);
    find::<micro_discovery::Error>(inner)
        .is_some_and(|e| matches!(e, micro_discovery::Error::NoInstances { .. }))
}

/// The first error of type `E` in `error`'s chain of causes.
fn find<'a, E: std::error::Error + 'static>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a E> {
    let mut next = Some(error);
    while let Some(current) = next {
        if let Some(found) = current.downcast_ref::<E>() {
            return Some(found);
        }
        next = current.source();
    }
    None
}

/// The headers that describe one connection and must not be forwarded (RFC 9110 §7.6.1).
/// `Proxy-Connection` is not standard but old clients send it and some servers honour it.
/// The gateway proxies no protocol upgrade, so `Upgrade` is always dropped.
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes the hop-by-hop headers and every header the `Connection` header names.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over the names is cheaper than nine removals.
    if !headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
}

/// Appends the client to `X-Forwarded-For` and `Forwarded`, and sets
/// `X-Forwarded-Proto` and `X-Forwarded-Host`.
pub fn set_forwarding_headers(
    headers: &mut HeaderMap,
    client: Option<IpAddr>,
    host: Option<&HeaderValue>,
) {
    const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
    const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
    const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

    use std::fmt::Write as _;
    let mut value = String::with_capacity(64);
    if let Some(client) = client {
        if let Some(earlier) = headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
            value.push_str(earlier);
            value.push_str(", ");
        }
        let _ = write!(value, "{client}");
        if let Ok(chain) = HeaderValue::from_str(&value) {
            headers.insert(X_FORWARDED_FOR, chain);
        }
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    value.clear();
    if let Some(earlier) = headers.get(header::FORWARDED).and_then(|v| v.to_str().ok()) {
        value.push_str(earlier);
        value.push_str(", ");
    }
    if let Some(client) = client {
        let _ = match client {
            IpAddr::V4(ip) => write!(value, "for={ip};"),
            IpAddr::V6(ip) => write!(value, "for=\"[{ip}]\";"),
        };
    }
    value.push_str("proto=http");
    if let Some(host) = host
        .and_then(|h| h.to_str().ok())
        .filter(|h| is_token_safe(h))
    {
        headers.insert(
            X_FORWARDED_HOST,
            HeaderValue::from_str(host).expect("checked above"),
        );
        value.push_str(";host=\"");
        value.push_str(host);
        value.push('"');
    }
    if let Ok(forwarded) = HeaderValue::from_str(&value) {
        headers.insert(header::FORWARDED, forwarded);
    }
}

/// Removes the forwarding headers a client sent, which only a trusted proxy may set.
pub fn remove_forwarding_headers(headers: &mut HeaderMap) {
    for name in [
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
        "x-forwarded-port",
        "x-real-ip",
    ] {
        headers.remove(name);
    }
    headers.remove(header::FORWARDED);
}

/// A host fit to be quoted in `Forwarded` without escaping.
fn is_token_safe(host: &str) -> bool {
    !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]_".contains(&b))
}

/// Whether an error of type `E` is somewhere in `error`'s chain of causes.
fn caused_by<E: std::error::Error + 'static>(error: &(dyn std::error::Error + 'static)) -> bool {
    find::<E>(error).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstreams_join_their_prefix_and_the_request_path() {
        let upstream = Upstream::parse("http://orders:8003/api/").unwrap();
        let path: PathAndQuery = "/orders/7?expand=items".parse().unwrap();
        assert_eq!(
            upstream.join(Some(&path)).to_string(),
            "http://orders:8003/api/orders/7?expand=items"
        );
        assert!(Upstream::parse("ftp://files").is_err());
        assert_eq!(
            Upstream::parse("https://secure:8443/api")
                .unwrap()
                .to_string(),
            "https://secure:8443/api"
        );
        assert!(Upstream::parse("orders:8003").is_err());
        assert!(Upstream::parse("http://orders/?q=1").is_err());
    }

    #[test]
    fn a_wholly_stripped_path_leaves_the_prefix_alone() {
        let pq = |s: &str| -> PathAndQuery { s.parse().unwrap() };
        assert_eq!(join_path("/orders", Some(&pq("/")), true), "/orders");
        assert_eq!(
            join_path("/orders", Some(&pq("/?status=PAID")), true),
            "/orders?status=PAID"
        );
        assert_eq!(join_path("/orders", Some(&pq("/")), false), "/orders/");
        assert_eq!(join_path("/orders", Some(&pq("/7")), true), "/orders/7");
        assert_eq!(join_path("", Some(&pq("/")), true), "/");
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_removed() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.append(header::CONNECTION, HeaderValue::from_static("X-Other"));
        headers.insert("x-secret", HeaderValue::from_static("1"));
        headers.insert("x-other", HeaderValue::from_static("1"));
        for name in [
            "proxy-connection",
            "te",
            "trailer",
            "upgrade",
            "proxy-authorization",
            "proxy-authenticate",
        ] {
            headers.insert(name, HeaderValue::from_static("x"));
        }
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        headers.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        remove_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1);
        assert!(headers.contains_key(header::ACCEPT));
    }

    #[test]
    fn forwarding_headers_append_to_what_came_in() {
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", HeaderValue::from_static("203.0.113.7"));
        let host = HeaderValue::from_static("shop.example:8080");
        set_forwarding_headers(&mut headers, Some("::1".parse().unwrap()), Some(&host));
        assert_eq!(headers["x-forwarded-for"], "203.0.113.7, ::1");
        assert_eq!(headers["x-forwarded-proto"], "http");
        assert_eq!(headers["x-forwarded-host"], "shop.example:8080");
        assert_eq!(
            headers["forwarded"],
            "for=\"[::1]\";proto=http;host=\"shop.example:8080\""
        );
    }
}
