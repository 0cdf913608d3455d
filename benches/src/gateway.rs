//! Fixtures of the gateway benches: a realistic route table, a stub upstream and the
//! plugin stacks compared in `benches/gateway.rs`.

use std::convert::Infallible;
use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::ConnectInfo;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response};
use micro_gateway::gateway::{Gateway, Route};
use micro_gateway::plugins::access_log::AccessLogLayer;
use micro_gateway::plugins::body_limit::{BodyLimitConfig, BodyLimitLayer};
use micro_gateway::plugins::cors::CorsConfig;
use micro_gateway::plugins::ip_restriction::{IpRestrictionConfig, IpRestrictionLayer};
use micro_gateway::plugins::transform::{HeaderTransform, TransformLayer};
use micro_gateway::routing::{HostPattern, PathPattern, Predicates, RouteTable};
use tower::util::BoxCloneSyncService;
use tower::{Layer, ServiceExt};

/// The JSON every stub upstream answers.
pub const UPSTREAM_BODY: &[u8] =
    br#"{"id":7,"name":"kettle","price":{"amount":2999,"currency":"EUR"},"stock":12}"#;

/// A boxed route service, what a [`Route`] holds.
pub type RouteService = BoxCloneSyncService<Request<Body>, Response<Body>, Infallible>;

/// The upstream of the in-process benches: a tower service answering [`UPSTREAM_BODY`]
/// at once, standing in for the proxy so that only the gateway's own work is measured.
pub fn stub_upstream() -> RouteService {
    BoxCloneSyncService::new(tower::service_fn(|_request: Request<Body>| async {
        let mut response = Response::new(Body::from(Bytes::from_static(UPSTREAM_BODY)));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        Ok::<_, Infallible>(response)
    }))
}

/// One route of [`realistic_routes`]: its predicates, as a declarative file would give
/// them.
#[derive(Debug, Clone, Default)]
pub struct RouteSpec {
    /// The route's name.
    pub name: String,
    /// Path patterns.
    pub paths: Vec<String>,
    /// Methods.
    pub methods: Vec<&'static str>,
    /// Hosts.
    pub hosts: Vec<String>,
    /// Header predicates.
    pub headers: Vec<(&'static str, &'static str)>,
}

impl RouteSpec {
    fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ..Self::default()
        }
    }

    fn path(mut self, path: impl Into<String>) -> Self {
        self.paths.push(path.into());
        self
    }

    fn method(mut self, method: &'static str) -> Self {
        self.methods.push(method);
        self
    }

    fn host(mut self, host: impl Into<String>) -> Self {
        self.hosts.push(host.into());
        self
    }

    fn header(mut self, name: &'static str, value: &'static str) -> Self {
        self.headers.push((name, value));
        self
    }

    /// The predicates, for a bare [`RouteTable`].
    ///
    /// # Panics
    ///
    /// When a pattern is invalid: the fixtures are fixed.
    pub fn predicates(&self) -> Predicates {
        Predicates {
            paths: self
                .paths
                .iter()
                .map(|p| PathPattern::parse(p).expect("pattern"))
                .collect(),
            methods: self
                .methods
                .iter()
                .map(|m| Method::from_bytes(m.as_bytes()).expect("method"))
                .collect(),
            hosts: self.hosts.iter().map(|h| HostPattern::new(h)).collect(),
            headers: self
                .headers
                .iter()
                .map(|(n, v)| {
                    (
                        HeaderName::from_static(n),
                        vec![HeaderValue::from_static(v)],
                    )
                })
                .collect(),
        }
    }

    /// The route for a [`Gateway`], answered by `service`.
    pub fn route(&self, service: RouteService) -> Route {
        let mut route = Route::new(&self.name).strip_path(false);
        for path in &self.paths {
            route = route.path(path);
        }
        for method in &self.methods {
            route = route.method(*method);
        }
        for host in &self.hosts {
            route = route.host(host);
        }
        for (name, value) in &self.headers {
            route = route.header(*name, [*value]);
        }
        route.to(service)
    }
}

/// The resources of a shop-like API, each served by a handful of routes.
const RESOURCES: &[&str] = &[
    "users",
    "orders",
    "products",
    "carts",
    "payments",
    "inventory",
    "shipments",
    "reviews",
    "coupons",
    "notifications",
];

/// `count` routes as an API gateway in front of a shop holds them: for each resource a
/// collection prefix, an item template by method, a nested template, an exact health
/// path, a versioned host-bound route and a header-selected canary; past the ten base
/// resources the names repeat with a numeric suffix (`orders-12`).
pub fn realistic_routes(count: usize) -> Vec<RouteSpec> {
    let mut routes = Vec::with_capacity(count);
    let mut round = 0;
    'fill: loop {
        for resource in RESOURCES {
            let resource = if round == 0 {
                (*resource).to_owned()
            } else {
                format!("{resource}-{round}")
            };
            let kinds = [
                RouteSpec::new(format!("{resource}-list"))
                    .path(format!("/api/{resource}"))
                    .method("GET"),
                RouteSpec::new(format!("{resource}-item"))
                    .path(format!("/api/{resource}/{{id}}"))
                    .method("GET")
                    .method("HEAD"),
                RouteSpec::new(format!("{resource}-update"))
                    .path(format!("/api/{resource}/{{id}}"))
                    .method("PUT")
                    .method("PATCH")
                    .method("DELETE"),
                RouteSpec::new(format!("{resource}-nested"))
                    .path(format!("/api/{resource}/{{id}}/history/{{entry}}")),
                RouteSpec::new(format!("{resource}-health")).path(format!("=/health/{resource}")),
                RouteSpec::new(format!("{resource}-v2"))
                    .path(format!("/v2/{resource}"))
                    .host(format!("{resource}.api.example.com")),
                RouteSpec::new(format!("{resource}-partner"))
                    .path(format!("/partner/{resource}/{{*rest}}"))
                    .host("*.partners.example.com"),
                RouteSpec::new(format!("{resource}-canary"))
                    .path(format!("/api/{resource}"))
                    .header("x-canary", "1"),
            ];
            for spec in kinds {
                routes.push(spec);
                if routes.len() == count {
                    break 'fill;
                }
            }
        }
        round += 1;
    }
    routes
}

/// A bare route table of `routes`.
pub fn route_table(routes: &[RouteSpec]) -> RouteTable {
    let mut table = RouteTable::new();
    for spec in routes {
        table.add(spec.predicates());
    }
    table
}

/// A request the route matching benches look up.
#[derive(Debug, Clone)]
pub struct Lookup {
    /// What it shows (`template hit`, `miss`).
    pub label: &'static str,
    /// Its method.
    pub method: Method,
    /// Its `Host`.
    pub host: &'static str,
    /// Its path.
    pub path: &'static str,
    /// Its headers.
    pub headers: HeaderMap,
    /// The name of the route it should find, `None` for a miss.
    pub expected: Option<&'static str>,
}

/// Requests to look up in a table of [`realistic_routes`]: hits of each kind of route
/// (all of the first resource, present in every table of eight routes or more) and a
/// miss that every route has to reject.
pub fn lookups() -> Vec<Lookup> {
    let plain = |label, method, host, path, expected| Lookup {
        label,
        method,
        host,
        path,
        headers: HeaderMap::new(),
        expected,
    };
    let mut canary = HeaderMap::new();
    canary.insert("x-canary", HeaderValue::from_static("1"));
    vec![
        plain(
            "prefix",
            Method::GET,
            "shop.example.com",
            "/api/users",
            Some("users-list"),
        ),
        plain(
            "template",
            Method::GET,
            "shop.example.com",
            "/api/users/42",
            Some("users-item"),
        ),
        plain(
            "nested_template",
            Method::POST,
            "shop.example.com",
            "/api/users/42/history/7",
            Some("users-nested"),
        ),
        plain(
            "exact",
            Method::GET,
            "shop.example.com",
            "/health/users",
            Some("users-health"),
        ),
        plain(
            "host",
            Method::GET,
            "users.api.example.com:8080",
            "/v2/users/42",
            Some("users-v2"),
        ),
        Lookup {
            label: "header",
            method: Method::GET,
            host: "shop.example.com",
            path: "/api/users",
            headers: canary,
            expected: Some("users-canary"),
        },
        plain(
            "miss",
            Method::GET,
            "shop.example.com",
            "/nowhere/to/be/found",
            None,
        ),
    ]
}

/// A setup of the in-process stack: the plugins wrapped around the stub upstream of the
/// route that requests go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plugins {
    /// No plugin: the gateway's routing alone.
    None,
    /// The access log.
    AccessLog,
    /// A response header transform.
    ResponseTransform,
    /// CORS.
    Cors,
    /// An IP allow list.
    IpRestriction,
    /// A body size limit.
    BodyLimit,
    /// A request header transform.
    RequestTransform,
    /// All of the above, in the order the declarative configuration stacks them.
    FullChain,
}

impl Plugins {
    /// Each single plugin.
    pub const EACH: [Plugins; 6] = [
        Plugins::AccessLog,
        Plugins::ResponseTransform,
        Plugins::Cors,
        Plugins::IpRestriction,
        Plugins::BodyLimit,
        Plugins::RequestTransform,
    ];

    /// The setup's name in bench ids.
    pub fn name(self) -> &'static str {
        match self {
            Plugins::None => "routing_only",
            Plugins::AccessLog => "access_log",
            Plugins::ResponseTransform => "response_transform",
            Plugins::Cors => "cors",
            Plugins::IpRestriction => "ip_restriction",
            Plugins::BodyLimit => "body_limit",
            Plugins::RequestTransform => "request_transform",
            Plugins::FullChain => "full_chain",
        }
    }

    /// Wraps `upstream` in this setup's plugins, outermost first as the declarative
    /// configuration orders them: access log, response transform, CORS, IP restriction,
    /// body limit, request transform.
    ///
    /// # Panics
    ///
    /// When a plugin configuration is invalid: the fixtures are fixed.
    pub fn wrap(self, upstream: RouteService) -> RouteService {
        let all = self == Plugins::FullChain;
        let mut stack = upstream;
        if all || self == Plugins::RequestTransform {
            stack = BoxCloneSyncService::new(
                TransformLayer::request(transform(serde_json::json!({
                    "remove": {"headers": ["x-debug"]},
                    "rename": {"headers": ["x-client-version:x-upstream-client-version"]},
                    "add": {"headers": ["x-gateway:micro"]},
                    "append": {"headers": ["x-via:micro-gateway"]},
                })))
                .layer(stack),
            );
        }
        if all || self == Plugins::BodyLimit {
            stack = BoxCloneSyncService::new(
                BodyLimitLayer::new(&BodyLimitConfig::bytes(1024 * 1024)).layer(stack),
            );
        }
        if all || self == Plugins::IpRestriction {
            let config: IpRestrictionConfig = serde_json::from_value(serde_json::json!({
                "allow": ["10.0.0.0/8", "192.168.0.0/16", "127.0.0.1"],
                "deny": ["10.66.0.0/16"],
            }))
            .expect("ip restriction");
            stack = BoxCloneSyncService::new(IpRestrictionLayer::new(config).layer(stack));
        }
        if all || self == Plugins::Cors {
            let config: CorsConfig = serde_json::from_value(serde_json::json!({
                "origins": ["https://shop.example.com", "https://admin.example.com"],
                "methods": ["GET", "POST", "PUT"],
                "exposed_headers": ["x-request-id"],
                "max_age": 600,
            }))
            .expect("cors");
            stack = BoxCloneSyncService::new(config.layer().expect("cors").layer(stack));
        }
        if all || self == Plugins::ResponseTransform {
            stack = BoxCloneSyncService::new(
                TransformLayer::response(transform(serde_json::json!({
                    "remove": {"headers": ["server"]},
                    "add": {"headers": ["cache-control:no-store"]},
                })))
                .layer(stack),
            );
        }
        if all || self == Plugins::AccessLog {
            stack = BoxCloneSyncService::new(AccessLogLayer::new().layer(stack));
        }
        stack
    }
}

fn transform(config: serde_json::Value) -> HeaderTransform {
    serde_json::from_value(config).expect("header transform")
}

/// A gateway of [`realistic_routes`]`(count)` whose `users-item` route (hit by
/// [`request`]) is answered by `plugins` around the stub upstream, the others by the bare
/// stub.
///
/// # Panics
///
/// When the gateway cannot be built: the fixtures are fixed.
pub fn gateway(count: usize, plugins: Plugins) -> Gateway {
    let mut builder = Gateway::builder();
    for spec in realistic_routes(count) {
        let service = if spec.name == "users-item" {
            plugins.wrap(stub_upstream())
        } else {
            stub_upstream()
        };
        builder = builder.route(spec.route(service));
    }
    builder.build().expect("gateway")
}

/// The request of the in-process benches: `GET /api/users/42` from a browser on an
/// allowed origin, with the peer address the server would put in its extensions.
///
/// # Panics
///
/// Never: the parts are fixed.
pub fn request() -> Request<Body> {
    let mut request = Request::get("/api/users/42?expand=orders")
        .header(header::HOST, "shop.example.com")
        .header(header::ORIGIN, "https://shop.example.com")
        .header(header::ACCEPT, "application/json")
        .header(header::USER_AGENT, "bench/1.0")
        .header("x-client-version", "3.4.1")
        .header("x-debug", "1")
        .body(Body::empty())
        .expect("request");
    request
        .extensions_mut()
        .insert(ConnectInfo(SocketAddr::from(([192, 168, 1, 20], 51_234))));
    request
}

/// Sends `request` through `service` and checks the answer is the upstream's.
///
/// # Panics
///
/// When the status is not 200: the setup is broken and its figure would mean nothing.
pub async fn call(service: RouteService, request: Request<Body>) -> Response<Body> {
    let response = service.oneshot(request).await.expect("infallible");
    assert_eq!(response.status(), 200, "the stack rejected the request");
    response
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn tables_have_the_size_asked_and_unique_names() {
        for count in [10, 50, 100, 1000] {
            let routes = realistic_routes(count);
            assert_eq!(routes.len(), count);
            let names: HashSet<_> = routes.iter().map(|r| r.name.as_str()).collect();
            assert_eq!(names.len(), count);
        }
    }

    #[test]
    fn each_lookup_finds_its_route_at_every_size() {
        for count in [10, 50, 100, 1000] {
            let routes = realistic_routes(count);
            let table = route_table(&routes);
            for lookup in lookups() {
                let found = table
                    .find(
                        &lookup.method,
                        Some(lookup.host),
                        lookup.path,
                        &lookup.headers,
                    )
                    .map(|m| routes[m.route].name.as_str());
                assert_eq!(found, lookup.expected, "{} in {count}", lookup.label);
            }
        }
    }

    #[tokio::test]
    async fn the_full_chain_runs_every_plugin_and_reaches_the_upstream() {
        let service = BoxCloneSyncService::new(gateway(50, Plugins::FullChain));
        let response = call(service, request()).await;
        assert_eq!(response.headers()["cache-control"], "no-store");
        assert_eq!(
            response.headers()["access-control-allow-origin"],
            "https://shop.example.com"
        );
        let body = http_body_util::BodyExt::collect(response.into_body())
            .await
            .unwrap()
            .to_bytes();
        assert_eq!(&body[..], UPSTREAM_BODY);
    }

    #[tokio::test]
    async fn an_address_outside_the_allow_list_is_refused() {
        let service = BoxCloneSyncService::new(gateway(50, Plugins::IpRestriction));
        let mut refused = request();
        refused
            .extensions_mut()
            .insert(ConnectInfo(SocketAddr::from(([203, 0, 113, 9], 4000))));
        let response = service.oneshot(refused).await.unwrap();
        assert_eq!(response.status(), 403);
    }

    #[derive(Clone, Default)]
    struct Lines(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_access_log_formats_a_line_under_a_fmt_subscriber() {
        let lines = Lines::default();
        let writer = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .finish();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        tracing::subscriber::with_default(subscriber, || {
            let service = BoxCloneSyncService::new(gateway(50, Plugins::AccessLog));
            runtime.block_on(call(service, request()));
        });
        let logged = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        assert!(
            logged.contains("/api/users/42") && logged.contains("200"),
            "{logged}"
        );
    }
}
