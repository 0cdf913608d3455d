//! [`Gateway`]: a route table in front of per-route services (plugins and a proxy).

use std::convert::Infallible;
use std::fmt;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::Body;
use axum::Router;
use http::uri::PathAndQuery;
use http::{header, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri};
use micro_core::service::BoxFuture;
use tower::util::BoxCloneSyncService;
use tower::ServiceExt;
use tower_service::Service;

use crate::error::error_response;
use crate::routing::{HostPattern, InvalidPattern, Params, PathPattern, Predicates, RouteTable};

type RouteService = BoxCloneSyncService<Request<Body>, Response<Body>, Infallible>;

/// The route a request matched, put in its extensions for the plugins and handlers
/// behind the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MatchedRoute {
    /// The route's name.
    pub name: Arc<str>,
    /// Parameters captured by the route's path template.
    pub params: Params,
}

/// Put in a request's extensions when `strip_path` removed its whole path: the proxy then
/// sends the service's own path (`/orders`, not `/orders/`), as Kong does.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WholePathStripped;

/// One route: what it matches, how it changes the path, and the service that answers.
pub struct Route {
    name: String,
    paths: Vec<String>,
    methods: Vec<String>,
    hosts: Vec<String>,
    headers: Vec<(String, Vec<String>)>,
    strip_path: bool,
    allow_encoded_slashes: bool,
    rewrite: Option<String>,
    service: Option<RouteService>,
}

impl Route {
    /// A route named `name` (the name labels its metrics). It strips the matched path
    /// prefix by default, as Kong's `strip_path` does.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            paths: Vec::new(),
            methods: Vec::new(),
            hosts: Vec::new(),
            headers: Vec::new(),
            strip_path: true,
            allow_encoded_slashes: false,
            rewrite: None,
            service: None,
        }
    }

    /// Adds a path pattern; see [`routing`](crate::routing) for the syntax.
    pub fn path(mut self, pattern: impl Into<String>) -> Self {
        self.paths.push(pattern.into());
        self
    }

    /// Adds a method the route answers (`"GET"`).
    pub fn method(mut self, method: impl Into<String>) -> Self {
        self.methods.push(method.into());
        self
    }

    /// Adds a host (`api.example.com`, `*.example.com`).
    pub fn host(mut self, host: impl Into<String>) -> Self {
        self.hosts.push(host.into());
        self
    }

    /// Requires header `name` to have one of `values`.
    pub fn header<I, V>(mut self, name: impl Into<String>, values: I) -> Self
    where
        I: IntoIterator<Item = V>,
        V: Into<String>,
    {
        self.headers
            .push((name.into(), values.into_iter().map(Into::into).collect()));
        self
    }

    /// Whether the matched path prefix is removed before the request goes on.
    pub fn strip_path(mut self, strip: bool) -> Self {
        self.strip_path = strip;
        self
    }

    /// Whether this route accepts encoded slashes and backslashes (`%2F`, `%5C`) in the
    /// path and passes them on unchanged; by default such a request gets `400 bad_path`
    /// (see [`path`](crate::path)).
    pub fn allow_encoded_slashes(mut self, allow: bool) -> Self {
        self.allow_encoded_slashes = allow;
        self
    }

    /// Replaces the path with `template`, filled with the parameters the path pattern
    /// captured (`/users/{id}`); the query is kept.
    pub fn rewrite(mut self, template: impl Into<String>) -> Self {
        self.rewrite = Some(template.into());
        self
    }

    /// The service that answers this route's requests: typically plugins around a
    /// [`Proxy`](crate::proxy::Proxy).
    pub fn to<S>(mut self, service: S) -> Self
    where
        S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        self.service = Some(BoxCloneSyncService::new(service));
        self
    }
}

impl fmt::Debug for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Route")
            .field("name", &self.name)
            .field("paths", &self.paths)
            .field("methods", &self.methods)
            .field("hosts", &self.hosts)
            .field("strip_path", &self.strip_path)
            .field("rewrite", &self.rewrite)
            .finish_non_exhaustive()
    }
}

/// A route that cannot be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GatewayError {
    /// A path pattern is invalid.
    #[error("route `{route}`: {source}")]
    Pattern {
        /// The route's name.
        route: String,
        /// What is wrong with the pattern.
        #[source]
        source: InvalidPattern,
    },
    /// A method, header name or header value is invalid.
    #[error("route `{route}`: invalid {what} `{value}`")]
    Predicate {
        /// The route's name.
        route: String,
        /// Which kind of predicate.
        what: &'static str,
        /// The offending text.
        value: String,
    },
    /// A route has no service to send requests to.
    #[error("route `{0}` has no service: call `Route::to`")]
    NoService(String),
    /// A route matches every request and would hide the others' fallbacks.
    #[error("route `{0}` has no predicate: give it a path, method, host or header")]
    NoPredicate(String),
    /// Two routes share a name.
    #[error("two routes are named `{0}`")]
    DuplicateRoute(String),
}

struct CompiledRoute {
    name: Arc<str>,
    strip_path: bool,
    allow_encoded_slashes: bool,
    rewrite: Option<String>,
    service: RouteService,
    metrics: RouteMetrics,
}

/// A route's metric handles, each taken from the recorder the first time it is used
/// (not when the gateway is built, which may be before the recorder is installed), so
/// that a request does not build and look up its labels again.
#[derive(Default)]
struct RouteMetrics {
    requests: [OnceLock<metrics::Counter>; STATUS_CLASSES.len()],
    duration: OnceLock<metrics::Histogram>,
}

const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

impl RouteMetrics {
    fn record(&self, route: &Arc<str>, status: StatusCode, elapsed: f64) {
        let class = match status.as_u16() {
            100..=199 => 0,
            200..=299 => 1,
            300..=399 => 2,
            400..=499 => 3,
            _ => 4,
        };
        self.requests[class]
            .get_or_init(|| {
                metrics::counter!(
                    "micro_gateway_requests_total",
                    "route" => route.clone(),
                    "status" => STATUS_CLASSES[class],
                )
            })
            .increment(1);
        self.duration
            .get_or_init(|| {
                metrics::histogram!("micro_gateway_request_duration_seconds", "route" => route.clone())
            })
            .record(elapsed);
    }
}

/// Collects routes; see [`Gateway::builder`].
#[derive(Debug, Default)]
pub struct GatewayBuilder {
    routes: Vec<Route>,
}

impl GatewayBuilder {
    /// Adds a route.
    pub fn route(mut self, route: Route) -> Self {
        self.routes.push(route);
        self
    }

    /// Checks every route and builds the gateway.
    ///
    /// # Errors
    ///
    /// A [`GatewayError`] naming the first route at fault.
    pub fn build(self) -> Result<Gateway, GatewayError> {
        let mut table = RouteTable::new();
        let mut compiled = Vec::with_capacity(self.routes.len());
        let mut names = std::collections::HashSet::new();
        for route in self.routes {
            if !names.insert(route.name.clone()) {
                return Err(GatewayError::DuplicateRoute(route.name));
            }
            let predicate = |what, value: &str| GatewayError::Predicate {
                route: route.name.clone(),
                what,
                value: value.to_owned(),
            };
            let paths = route
                .paths
                .iter()
                .map(|p| PathPattern::parse(p))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|source| GatewayError::Pattern {
                    route: route.name.clone(),
                    source,
                })?;
            let methods = route
                .methods
                .iter()
                .map(|m| {
                    Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                        .map_err(|_| predicate("method", m))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let headers = route
                .headers
                .iter()
                .map(|(name, values)| {
                    let name_parsed = HeaderName::from_bytes(name.as_bytes())
                        .map_err(|_| predicate("header name", name))?;
                    let values = values
                        .iter()
                        .map(|v| HeaderValue::from_str(v).map_err(|_| predicate("header value", v)))
                        .collect::<Result<Vec<_>, _>>()?;
                    Ok((name_parsed, values))
                })
                .collect::<Result<Vec<_>, GatewayError>>()?;
            let predicates = Predicates {
                paths,
                methods,
                hosts: route.hosts.iter().map(|h| HostPattern::new(h)).collect(),
                headers,
            };
            if predicates.paths.is_empty()
                && predicates.methods.is_empty()
                && predicates.hosts.is_empty()
                && predicates.headers.is_empty()
            {
                return Err(GatewayError::NoPredicate(route.name));
            }
            let service = route
                .service
                .ok_or_else(|| GatewayError::NoService(route.name.clone()))?;
            table.add(predicates);
            compiled.push(CompiledRoute {
                name: route.name.into(),
                strip_path: route.strip_path,
                allow_encoded_slashes: route.allow_encoded_slashes,
                rewrite: route.rewrite,
                service,
                metrics: RouteMetrics::default(),
            });
        }
        Ok(Gateway {
            inner: Arc::new(Inner {
                table,
                routes: compiled,
            }),
        })
    }
}

struct Inner {
    table: RouteTable,
    routes: Vec<CompiledRoute>,
}

/// The gateway: finds the route of each request, rewrites its path, and hands it to the
/// route's service. A request no route matches gets `404` with a JSON body.
///
/// Before routing, the path is normalized ([`path`](crate::path)): a path the gateway
/// refuses gets `400 bad_path`, and the route and its service see (and the upstream
/// receives) only the normalized path. A request with two `Host` headers gets
/// `400 bad_host`; one without a `Host` matches no host-restricted route.
///
/// It records, per route, `micro_gateway_requests_total{route, status}` and
/// `micro_gateway_request_duration_seconds{route}`.
#[derive(Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
}

impl Gateway {
    /// Starts a gateway description.
    pub fn builder() -> GatewayBuilder {
        GatewayBuilder::default()
    }

    /// The gateway as an axum router, to host with micro-core's `ServiceHost` (which adds
    /// health, metrics, request ids and trace spans) or to nest in a bigger router.
    pub fn into_router(self) -> Router {
        Router::new().fallback_service(self)
    }

    async fn dispatch(self, mut request: Request<Body>) -> Response<Body> {
        if request
            .headers()
            .get_all(header::HOST)
            .iter()
            .nth(1)
            .is_some()
        {
            metrics::counter!("micro_gateway_rejections_total", "reason" => "bad_host")
                .increment(1);
            return error_response(
                StatusCode::BAD_REQUEST,
                "bad_host",
                "the request has more than one Host header",
            );
        }
        let has_encoded_slash = match normalize_request(&mut request) {
            Ok(has_encoded_slash) => has_encoded_slash,
            Err(error) => return bad_path(error),
        };
        let host = request
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| request.uri().authority().map(|a| a.as_str()));
        let found = self.inner.table.find(
            request.method(),
            host,
            request.uri().path(),
            request.headers(),
        );
        let Some(found) = found else {
            metrics::counter!("micro_gateway_rejections_total", "reason" => "no_route")
                .increment(1);
            return error_response(
                StatusCode::NOT_FOUND,
                "no_route",
                "no route matches this request",
            );
        };
        let route = &self.inner.routes[found.route];
        if has_encoded_slash && !route.allow_encoded_slashes {
            return bad_path(crate::path::PathError::EncodedSlash);
        }
        let path = request.uri().path();
        let whole_path_stripped =
            route.rewrite.is_none() && route.strip_path && found.matched_len >= path.len();
        let new_path = match &route.rewrite {
            Some(template) => found.params.render(template),
            None if route.strip_path => {
                let rest = &path[found.matched_len.min(path.len())..];
                if rest.starts_with('/') {
                    rest.to_owned()
                } else {
                    format!("/{rest}")
                }
            }
            None => path.to_owned(),
        };
        if new_path != path {
            let path_and_query = match request.uri().query() {
                Some(query) => format!("{new_path}?{query}"),
                None => new_path,
            };
            let mut parts = request.uri().clone().into_parts();
            match PathAndQuery::try_from(path_and_query) {
                Ok(pq) => parts.path_and_query = Some(pq),
                Err(_) => {
                    return error_response(
                        StatusCode::BAD_REQUEST,
                        "bad_path",
                        "the rewritten path is invalid",
                    );
                }
            }
            if let Ok(uri) = Uri::from_parts(parts) {
                *request.uri_mut() = uri;
            }
        }
        if whole_path_stripped {
            request.extensions_mut().insert(WholePathStripped);
        }
        request.extensions_mut().insert(MatchedRoute {
            name: route.name.clone(),
            params: found.params,
        });
        let started = Instant::now();
        let response = match route.service.clone().oneshot(request).await {
            Ok(response) => response,
            Err(never) => match never {},
        };
        route.metrics.record(
            &route.name,
            response.status(),
            started.elapsed().as_secs_f64(),
        );
        response
    }
}

/// Replaces the request's path with its normalized spelling (query kept); `Ok(true)`
/// when an encoded slash was kept, for the route to allow or refuse.
fn normalize_request(request: &mut Request<Body>) -> Result<bool, crate::path::PathError> {
    use crate::path::{is_canonical, normalize, Options, PathError};
    if is_canonical(request.uri().path()) {
        return Ok(false);
    }
    let normalized = normalize(
        request.uri().path(),
        Options::new().allow_encoded_slashes(true),
    )?;
    if normalized.path != request.uri().path() {
        let path_and_query = match request.uri().query() {
            Some(query) => format!("{}?{query}", normalized.path),
            None => normalized.path,
        };
        let mut parts = request.uri().clone().into_parts();
        parts.path_and_query =
            Some(PathAndQuery::try_from(path_and_query).map_err(|_| PathError::BadEscape)?);
        *request.uri_mut() = Uri::from_parts(parts).map_err(|_| PathError::BadEscape)?;
    }
    Ok(normalized.has_encoded_slash)
}

fn bad_path(error: crate::path::PathError) -> Response<Body> {
    tracing::debug!(%error, "refused a request path");
    metrics::counter!("micro_gateway_rejections_total", "reason" => "bad_path").increment(1);
    error_response(StatusCode::BAD_REQUEST, "bad_path", &error.to_string())
}

impl fmt::Debug for Gateway {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.inner.routes.iter().map(|r| &*r.name).collect();
        f.debug_struct("Gateway").field("routes", &names).finish()
    }
}

impl Service<Request<Body>> for Gateway {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { Ok(this.dispatch(request).await) })
    }
}
