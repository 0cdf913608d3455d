//! The declarative configuration: a YAML file in Kong's declarative format (services,
//! routes, plugins), turned into a [`Gateway`].
//!
//! ```yaml
//! _format_version: "3.0"
//! services:
//!   - name: user-service
//!     url: http://127.0.0.1:8001
//!     read_timeout: 5000          # milliseconds, as in Kong
//!     routes:
//!       - name: user-route
//!         paths: [/api/users]
//!     plugins:
//!       - name: request-size-limiting
//!         config:
//!           allowed_payload_size: 1
//! plugins:                        # global: every route
//!   - name: cors
//!     config:
//!       origins: ["https://shop.example"]
//! ```
//!
//! Supported plugins: `cors`, `jwt`, `ip-restriction`, `request-size-limiting`,
//! `rate-limiting`, `request-transformer`, `response-transformer` and `access-log`. As in
//! Kong, a plugin configured on a route overrides the same plugin on its service, which
//! overrides a global one. They run in a fixed order, outermost first: `access-log`, `response-transformer`
//! (so it edits the gateway's own rejections too), `cors`, `jwt`, `ip-restriction`,
//! `request-size-limiting`, `rate-limiting` (after `jwt`, so it can count by the token's
//! subject), `request-transformer`.
//!
//! Every error names the place in the file: `services[0].routes[1].paths[0]: invalid route
//! pattern ...`, with the line and column where the YAML parser can tell them.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt;
use std::time::Duration;

use axum::body::Body;
use http::{Request, Response};
use serde::Deserialize;
use tower::util::BoxCloneSyncService;
use tower_layer::Layer;

use crate::gateway::{Gateway, GatewayError, Route};
use crate::plugins::access_log::AccessLogLayer;
use crate::plugins::body_limit::{BodyLimitConfig, BodyLimitLayer};
use crate::plugins::cors::CorsConfig;
use crate::plugins::ip_restriction::{IpRestrictionConfig, IpRestrictionLayer};
use crate::plugins::jwt::{JwtAuthLayer, JwtConfig, JwtConsumer};
use crate::plugins::rate_limit::{RateLimitConfig, RateLimitLayer};
use crate::plugins::transform::{HeaderTransform, TransformLayer};
use crate::proxy::{Proxy, ProxyConfig, Upstream};

type RouteService = BoxCloneSyncService<Request<Body>, Response<Body>, Infallible>;

/// A Kong declarative configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct DeclarativeConfig {
    /// Kong's `_format_version`; accepted and ignored.
    #[serde(rename = "_format_version", default)]
    pub format_version: Option<String>,
    /// Kong's `_transform`; accepted and ignored.
    #[serde(rename = "_transform", default)]
    pub transform: Option<bool>,
    /// Upstream services and their routes.
    #[serde(default)]
    pub services: Vec<ServiceSpec>,
    /// Routes declared at the top level, naming their service.
    #[serde(default)]
    pub routes: Vec<RouteSpec>,
    /// Plugins for every route.
    #[serde(default)]
    pub plugins: Vec<PluginSpec>,
    /// Kong's consumers; their `jwt_secrets` are keys of every `jwt` plugin.
    #[serde(default)]
    pub consumers: Vec<JwtConsumer>,
}

/// An upstream service: where it is and how to talk to it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct ServiceSpec {
    /// The service's name.
    pub name: String,
    /// `http://host:port/path`; or give `host` (with `port`, `protocol`, `path`).
    pub url: Option<String>,
    /// The upstream's protocol; only `http`.
    pub protocol: Option<String>,
    /// The upstream's host.
    pub host: Option<String>,
    /// The upstream's port (80 by default).
    pub port: Option<u16>,
    /// A path prefix for every request.
    pub path: Option<String>,
    /// Milliseconds to connect.
    pub connect_timeout: Option<u64>,
    /// Milliseconds to wait for the response headers.
    pub read_timeout: Option<u64>,
    /// Milliseconds to send the request (accepted; the read timeout bounds the exchange).
    pub write_timeout: Option<u64>,
    /// Kong's retry count (accepted; retries need a discovery upstream).
    pub retries: Option<u32>,
    /// Speak h2c to the upstream (our addition).
    #[serde(default)]
    pub http2: bool,
    /// The service's routes.
    #[serde(default)]
    pub routes: Vec<RouteSpec>,
    /// Plugins for every route of this service.
    #[serde(default)]
    pub plugins: Vec<PluginSpec>,
    /// Kong's tags; accepted and ignored.
    #[serde(default)]
    pub tags: Vec<String>,
}

/// A route: what it matches and how it changes the path.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct RouteSpec {
    /// The route's name (defaults to `<service>-<index>`).
    pub name: Option<String>,
    /// Path patterns; see [`routing`](crate::routing).
    #[serde(default)]
    pub paths: Vec<String>,
    /// Methods.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Hosts.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Header predicates: each header must have one of its values.
    #[serde(default)]
    pub headers: BTreeMap<String, Vec<String>>,
    /// Remove the matched path prefix (Kong's default: yes).
    #[serde(default = "yes")]
    pub strip_path: bool,
    /// Send the client's `Host` upstream.
    #[serde(default)]
    pub preserve_host: bool,
    /// Replace the path with this template filled with the path's parameters (our
    /// addition).
    pub rewrite: Option<String>,
    /// For a top-level route, its service: a name or `{name: ...}`.
    pub service: Option<ServiceRef>,
    /// Plugins for this route.
    #[serde(default)]
    pub plugins: Vec<PluginSpec>,
    /// Kong's `protocols`; accepted and ignored.
    #[serde(default)]
    pub protocols: Vec<String>,
    /// Kong's tags; accepted and ignored.
    #[serde(default)]
    pub tags: Vec<String>,
}

fn yes() -> bool {
    true
}

/// A reference to a service by name.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum ServiceRef {
    /// `service: user-service`.
    Name(String),
    /// `service: {name: user-service}`.
    Object {
        /// The service's name.
        name: String,
    },
}

impl ServiceRef {
    fn name(&self) -> &str {
        match self {
            Self::Name(name) | Self::Object { name } => name,
        }
    }
}

/// A plugin and its configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct PluginSpec {
    /// The plugin's name (`cors`, `ip-restriction`, ...).
    pub name: String,
    /// Its configuration, as that plugin reads it.
    #[serde(default)]
    pub config: serde_json::Value,
    /// Whether it is on.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Kong's `protocols`; accepted and ignored.
    #[serde(default)]
    pub protocols: Vec<String>,
    /// Kong's tags; accepted and ignored.
    #[serde(default)]
    pub tags: Vec<String>,
}

/// The configuration cannot be used; says where and why.
#[derive(Debug, thiserror::Error)]
#[error("{place}: {reason}")]
pub struct ConfigError {
    place: String,
    reason: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl ConfigError {
    fn at(place: impl Into<String>, reason: impl fmt::Display) -> Self {
        Self {
            place: place.into(),
            reason: reason.to_string(),
            source: None,
        }
    }

    /// Where in the file: a path such as `services[0].routes[1].paths[0]`, with the line
    /// and column when known.
    pub fn place(&self) -> &str {
        &self.place
    }

    /// What is wrong.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

/// The plugins this gateway knows, from the outermost to the innermost layer: the access
/// log sees everything; the response transformer edits every answer, the gateway's own
/// rejections included; then Kong's request-phase priorities.
const PLUGINS: &[&str] = &[
    "access-log",
    "response-transformer",
    "cors",
    "jwt",
    "ip-restriction",
    "request-size-limiting",
    "rate-limiting",
    "request-transformer",
];

/// A plugin resolved to its layer, ready to wrap a route's service.
enum Plugin {
    Cors(Box<tower_http::cors::CorsLayer>),
    AccessLog(AccessLogLayer),
    IpRestriction(IpRestrictionLayer),
    BodyLimit(BodyLimitLayer),
    RequestTransform(TransformLayer),
    ResponseTransform(TransformLayer),
    Jwt(JwtAuthLayer),
    RateLimit(RateLimitLayer),
}

impl Plugin {
    fn resolve(
        spec: &PluginSpec,
        place: &str,
        consumers: &[JwtConsumer],
    ) -> Result<Self, ConfigError> {
        fn typed<T: serde::de::DeserializeOwned>(
            spec: &PluginSpec,
            place: &str,
        ) -> Result<T, ConfigError> {
            let config = if spec.config.is_null() {
                serde_json::Value::Object(Default::default())
            } else {
                spec.config.clone()
            };
            serde_path_to_error::deserialize(config).map_err(|error| {
                let inner = error.path().to_string();
                let at = if inner == "." {
                    format!("{place}.config")
                } else {
                    format!("{place}.config.{inner}")
                };
                ConfigError::at(at, error.inner())
            })
        }
        Ok(match spec.name.as_str() {
            "cors" => {
                let config: CorsConfig = typed(spec, place)?;
                let layer = config
                    .layer()
                    .map_err(|e| ConfigError::at(format!("{place}.config"), e))?;
                Self::Cors(Box::new(layer))
            }
            "access-log" => Self::AccessLog(AccessLogLayer::new()),
            "ip-restriction" => {
                Self::IpRestriction(IpRestrictionLayer::new(typed::<IpRestrictionConfig>(
                    spec, place,
                )?))
            }
            "request-size-limiting" => {
                Self::BodyLimit(BodyLimitLayer::new(&typed::<BodyLimitConfig>(spec, place)?))
            }
            "request-transformer" => {
                Self::RequestTransform(TransformLayer::request(typed::<HeaderTransform>(
                    spec, place,
                )?))
            }
            "response-transformer" => {
                Self::ResponseTransform(TransformLayer::response(typed::<HeaderTransform>(
                    spec, place,
                )?))
            }
            "jwt" => Self::Jwt(
                typed::<JwtConfig>(spec, place)?
                    .with_consumers(consumers)
                    .layer()
                    .map_err(|e| {
                        let at = if e.field().starts_with("consumers[") {
                            e.field().to_owned()
                        } else {
                            format!("{place}.config.{}", e.field())
                        };
                        ConfigError::at(at, e.reason())
                    })?,
            ),
            "rate-limiting" => Self::RateLimit(
                typed::<RateLimitConfig>(spec, place)?
                    .layer()
                    .map_err(|e| {
                        ConfigError::at(format!("{place}.config.{}", e.field()), e.reason())
                    })?,
            ),
            other => {
                return Err(ConfigError::at(
                    format!("{place}.name"),
                    format!(
                        "unknown plugin `{other}`; this gateway knows {}",
                        PLUGINS.join(", ")
                    ),
                ))
            }
        })
    }

    fn wrap(&self, inner: RouteService) -> RouteService {
        match self {
            Self::Cors(layer) => BoxCloneSyncService::new(layer.as_ref().layer(inner)),
            Self::AccessLog(layer) => BoxCloneSyncService::new(layer.layer(inner)),
            Self::IpRestriction(layer) => BoxCloneSyncService::new(layer.layer(inner)),
            Self::BodyLimit(layer) => BoxCloneSyncService::new(layer.layer(inner)),
            Self::RequestTransform(layer) | Self::ResponseTransform(layer) => {
                BoxCloneSyncService::new(layer.layer(inner))
            }
            Self::Jwt(layer) => BoxCloneSyncService::new(layer.layer(inner)),
            Self::RateLimit(layer) => BoxCloneSyncService::new(layer.layer(inner)),
        }
    }
}

impl DeclarativeConfig {
    /// Parses YAML (or JSON, which is YAML).
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the key path, line and column of the first problem.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        let deserializer = serde_yaml_ng::Deserializer::from_str(text);
        serde_path_to_error::deserialize(deserializer).map_err(|error| {
            let path = error.path().to_string();
            let inner = error.into_inner();
            let mut place = if path == "." {
                "the document".to_owned()
            } else {
                path
            };
            if let Some(location) = inner.location() {
                place = format!(
                    "{place} (line {}, column {})",
                    location.line(),
                    location.column()
                );
            }
            let mut reason = inner.to_string();
            // serde_yaml_ng appends the location to its message; it is in `place` already.
            if let Some(index) = reason.find(" at line ") {
                reason.truncate(index);
            }
            ConfigError {
                place,
                reason,
                source: Some(Box::new(inner)),
            }
        })
    }

    /// Reads and parses a file.
    ///
    /// # Errors
    ///
    /// When the file cannot be read, or as [`from_yaml`](Self::from_yaml).
    pub fn from_file(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::at(path.display().to_string(), format!("cannot read: {e}"))
        })?;
        Self::from_yaml(&text).map_err(|mut e| {
            e.place = format!("{}: {}", path.display(), e.place);
            e
        })
    }

    /// Checks everything and builds the gateway.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the place of the first problem: a service without an
    /// address, a route naming a missing service, a bad pattern, an unknown plugin or a
    /// plugin configuration it does not accept.
    pub fn build(&self) -> Result<Gateway, ConfigError> {
        let global = self
            .plugins
            .iter()
            .enumerate()
            .map(|(i, spec)| (format!("plugins[{i}]"), spec))
            .collect::<Vec<_>>();
        let mut builder = Gateway::builder();
        // Where each route was declared, by route name, to place the builder's errors.
        let mut places: Vec<(String, String)> = Vec::new();
        let mut by_name = BTreeMap::new();
        for (index, service) in self.services.iter().enumerate() {
            let place = format!("services[{index}]");
            if by_name.insert(service.name.as_str(), index).is_some() {
                return Err(ConfigError::at(
                    format!("{place}.name"),
                    format!("a second service is named `{}`", service.name),
                ));
            }
        }
        let mut routes: Vec<(String, &RouteSpec, usize)> = Vec::new();
        for (index, service) in self.services.iter().enumerate() {
            for (r, route) in service.routes.iter().enumerate() {
                routes.push((format!("services[{index}].routes[{r}]"), route, index));
            }
        }
        for (r, route) in self.routes.iter().enumerate() {
            let place = format!("routes[{r}]");
            let service = route
                .service
                .as_ref()
                .ok_or_else(|| ConfigError::at(&place, "a top-level route needs `service`"))?;
            let index = *by_name.get(service.name()).ok_or_else(|| {
                ConfigError::at(
                    format!("{place}.service"),
                    format!("no service is named `{}`", service.name()),
                )
            })?;
            routes.push((place, route, index));
        }

        for (place, route, service_index) in routes {
            let service = &self.services[service_index];
            let service_place = format!("services[{service_index}]");
            let upstream =
                upstream(service).map_err(|reason| ConfigError::at(&service_place, reason))?;
            let mut proxy_config = ProxyConfig::new()
                .http2(service.http2)
                .preserve_host(route.preserve_host);
            if let Some(ms) = service.read_timeout {
                proxy_config = proxy_config.timeout(Duration::from_millis(ms));
            }
            if let Some(ms) = service.connect_timeout {
                proxy_config = proxy_config.connect_timeout(Duration::from_millis(ms));
            }
            let mut stack: RouteService =
                BoxCloneSyncService::new(Proxy::new(upstream, proxy_config));

            // The most specific instance of each plugin wins: route over service over global.
            let mut chosen: BTreeMap<&str, (String, &PluginSpec)> = BTreeMap::new();
            let service_plugins = service
                .plugins
                .iter()
                .enumerate()
                .map(|(i, spec)| (format!("{service_place}.plugins[{i}]"), spec));
            let route_plugins = route
                .plugins
                .iter()
                .enumerate()
                .map(|(i, spec)| (format!("{place}.plugins[{i}]"), spec));
            for (plugin_place, spec) in global
                .iter()
                .cloned()
                .chain(service_plugins)
                .chain(route_plugins)
            {
                chosen.insert(spec.name.as_str(), (plugin_place, spec));
            }
            let mut plugins = Vec::new();
            for (plugin_place, spec) in chosen.values() {
                let plugin = Plugin::resolve(spec, plugin_place, &self.consumers)?;
                if spec.enabled {
                    let rank = PLUGINS
                        .iter()
                        .position(|p| *p == spec.name)
                        .unwrap_or(PLUGINS.len());
                    plugins.push((rank, plugin));
                }
            }
            plugins.sort_by_key(|(rank, _)| std::cmp::Reverse(*rank));
            for (_, plugin) in &plugins {
                stack = plugin.wrap(stack);
            }

            let name = route.name.clone().unwrap_or_else(|| {
                format!("{}-{}", service.name, place.replace(['[', ']', '.'], "-"))
            });
            let mut built = Route::new(name.clone())
                .strip_path(route.strip_path)
                .to(stack);
            for path in &route.paths {
                built = built.path(path);
            }
            for method in &route.methods {
                built = built.method(method);
            }
            for host in &route.hosts {
                built = built.host(host);
            }
            for (header, values) in &route.headers {
                built = built.header(header, values.clone());
            }
            if let Some(template) = &route.rewrite {
                built = built.rewrite(template);
            }
            builder = builder.route(built);
            places.push((name, place));
        }
        builder.build().map_err(|error| {
            let route = match &error {
                GatewayError::Pattern { route, .. }
                | GatewayError::Predicate { route, .. }
                | GatewayError::NoService(route)
                | GatewayError::NoPredicate(route)
                | GatewayError::DuplicateRoute(route) => Some(route.as_str()),
            };
            // A duplicate name is reported where it is declared the second time.
            let place = places
                .iter()
                .rev()
                .find(|(name, _)| Some(name.as_str()) == route)
                .map_or_else(|| "routes".to_owned(), |(_, place)| place.clone());
            ConfigError {
                place,
                reason: error.to_string(),
                source: Some(Box::new(error)),
            }
        })
    }
}

fn upstream(service: &ServiceSpec) -> Result<Upstream, String> {
    let url = match (&service.url, &service.host) {
        (Some(url), None) => url.clone(),
        (None, Some(host)) => {
            let protocol = service.protocol.as_deref().unwrap_or("http");
            let port = service.port.unwrap_or(80);
            let path = service.path.as_deref().unwrap_or("");
            format!("{protocol}://{host}:{port}{path}")
        }
        (Some(_), Some(_)) => return Err("give either `url` or `host`, not both".to_owned()),
        (None, None) => {
            return Err(format!(
                "service `{}` has neither `url` nor `host`",
                service.name
            ))
        }
    };
    Upstream::parse(&url).map_err(|e| e.to_string())
}
