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
use http::{Request, Response, StatusCode, Uri, Version};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use micro_core::middleware::RequestId;
use micro_core::service::BoxFuture;
use micro_core::trace::TraceContext;
use serde::Deserialize;
use tower_service::Service;

use crate::error::error_response;

/// How a [`Proxy`] talks to its upstream.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
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
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            timeout: Some(Duration::from_secs(60)),
            connect_timeout: Duration::from_secs(5),
            http2: false,
            preserve_host: false,
            pool_idle_timeout: Duration::from_secs(90),
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
    /// Parses `http://host:port` or `http://host:port/prefix`.
    ///
    /// # Errors
    ///
    /// When the URL does not parse, is not `http`, or has a query.
    pub fn parse(url: &str) -> Result<Self, InvalidUpstream> {
        let invalid = |reason| InvalidUpstream {
            url: url.to_owned(),
            reason,
        };
        let uri: Uri = url.parse().map_err(|_| invalid("not a url"))?;
        let scheme = uri.scheme().cloned().ok_or_else(|| invalid("no scheme"))?;
        if scheme != Scheme::HTTP {
            return Err(invalid("only http upstreams are supported"));
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
        let tail = path_and_query.map_or("/", PathAndQuery::as_str);
        let path = format!("{}{tail}", self.prefix);
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

/// A tower service that forwards every request to one [`Upstream`].
///
/// It never fails: an upstream that cannot be reached answers `502`, one that does not
/// answer in time `504`, each with a JSON body; the details go to the log.
///
/// The client address comes from axum's [`ConnectInfo<SocketAddr>`] extension, which
/// micro-core's host sets; it is appended to `X-Forwarded-For` and `Forwarded`.
#[derive(Clone)]
pub struct Proxy {
    client: Client<HttpConnector, Body>,
    upstream: Arc<Upstream>,
    config: Arc<ProxyConfig>,
}

impl Proxy {
    /// A proxy to `upstream`, with its own connection pool.
    pub fn new(upstream: Upstream, config: ProxyConfig) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(config.connect_timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(config.pool_idle_timeout)
            .pool_timer(TokioTimer::new())
            .http2_only(config.http2)
            .build(connector);
        Self {
            client,
            upstream: Arc::new(upstream),
            config: Arc::new(config),
        }
    }

    /// The upstream requests go to.
    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    async fn forward(self, request: Request<Body>) -> Response<Body> {
        let (mut parts, body) = request.into_parts();
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
        set_forwarding_headers(&mut parts.headers, peer, host.as_ref());
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
        parts.uri = self.upstream.join(parts.uri.path_and_query());
        parts.version = if self.config.http2 {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        };

        let sent = self.client.request(Request::from_parts(parts, body));
        let outcome = match self.config.timeout {
            Some(timeout) => tokio::time::timeout(timeout, sent).await.ok(),
            None => Some(sent.await),
        };
        match outcome {
            Some(Ok(response)) => {
                let (mut parts, body) = response.into_parts();
                remove_hop_by_hop(&mut parts.headers);
                Response::from_parts(parts, Body::new(body))
            }
            Some(Err(error)) if caused_by::<http_body_util::LengthLimitError>(&error) => {
                crate::plugins::body_limit::too_large()
            }
            Some(Err(error)) => {
                let code = if error.is_connect() {
                    "upstream_unreachable"
                } else {
                    "upstream_failed"
                };
                tracing::warn!(upstream = %self.upstream, error = %DisplayChain(&error), "upstream request failed");
                error_response(
                    StatusCode::BAD_GATEWAY,
                    code,
                    "the upstream service failed to answer",
                )
            }
            None => {
                tracing::warn!(upstream = %self.upstream, timeout = ?self.config.timeout, "upstream timed out");
                error_response(
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream_timeout",
                    "the upstream service did not answer in time",
                )
            }
        }
    }
}

impl fmt::Debug for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Proxy")
            .field("upstream", &self.upstream)
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

/// The headers that describe one connection and must not be forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes the hop-by-hop headers and every header the `Connection` header names.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
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

    if let Some(client) = client {
        let chain = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
            Some(earlier) => format!("{earlier}, {client}"),
            None => client.to_string(),
        };
        if let Ok(value) = HeaderValue::try_from(chain) {
            headers.insert(X_FORWARDED_FOR, value);
        }
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    let mut element = String::new();
    if let Some(client) = client {
        match client {
            IpAddr::V4(ip) => element.push_str(&format!("for={ip}")),
            IpAddr::V6(ip) => element.push_str(&format!("for=\"[{ip}]\"")),
        }
        element.push(';');
    }
    element.push_str("proto=http");
    if let Some(host) = host
        .and_then(|h| h.to_str().ok())
        .filter(|h| is_token_safe(h))
    {
        headers.insert(
            X_FORWARDED_HOST,
            HeaderValue::from_str(host).expect("checked above"),
        );
        element.push_str(&format!(";host=\"{host}\""));
    }
    let forwarded = match headers.get(header::FORWARDED).and_then(|v| v.to_str().ok()) {
        Some(earlier) => format!("{earlier}, {element}"),
        None => element,
    };
    if let Ok(value) = HeaderValue::try_from(forwarded) {
        headers.insert(header::FORWARDED, value);
    }
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
    let mut next = Some(error);
    while let Some(current) = next {
        if current.is::<E>() {
            return true;
        }
        next = current.source();
    }
    false
}

/// Shows an error with its causes, for the log.
struct DisplayChain<'a>(&'a (dyn std::error::Error + 'static));

impl fmt::Display for DisplayChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(error) = source {
            write!(f, ": {error}")?;
            source = error.source();
        }
        Ok(())
    }
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
        assert!(Upstream::parse("https://secure").is_err());
        assert!(Upstream::parse("orders:8003").is_err());
        assert!(Upstream::parse("http://orders/?q=1").is_err());
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_removed() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert("x-secret", HeaderValue::from_static("1"));
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
