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
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use http::{Request, Response};
use serde::Deserialize;
use tower::util::BoxCloneSyncService;
use tower_layer::Layer;

use micro_core::identity::KeyRing;
use micro_discovery::balance::BalanceConfig;
use micro_discovery::Discover;

use crate::compose::{Composition, Leg};
use crate::gateway::{Gateway, GatewayError, Route};
use crate::plugins::access_log::AccessLogLayer;
use crate::plugins::body_limit::{BodyLimitConfig, BodyLimitLayer};
use crate::plugins::cors::CorsConfig;
use crate::plugins::ip_restriction::{IpRestrictionConfig, IpRestrictionLayer};
use crate::plugins::jwt::{JwtAuthLayer, JwtConfig, JwtConsumer};
use crate::plugins::rate_limit::{RateLimitConfig, RateLimitLayer};
use crate::plugins::transform::{RequestEdits, ResponseEdits, TransformLayer};
use crate::proxy::{Proxy, ProxyConfig, Upstream};
use crate::release::{RolloutPolicy, Split, StickyKey};

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
    /// Routes answered by calling several services and merging their JSON (our addition).
    #[serde(default)]
    pub compositions: Vec<CompositionSpec>,
    /// Where `discovery:` services are found, for the `micro-gateway` binary (our
    /// addition); see [`DiscoverySpec`]. A program that embeds the gateway passes its own
    /// registry in [`Resources`] instead.
    #[serde(default)]
    pub discovery: Option<DiscoverySpec>,
    /// Kong's consumers; their `jwt_secrets` are keys of every `jwt` plugin.
    #[serde(default)]
    pub consumers: Vec<JwtConsumer>,
    /// The proxies in front of the gateway whose `X-Forwarded-For` and `Forwarded` are
    /// believed (Kong's `trusted_ips`, in kong.conf there; addresses or CIDR ranges);
    /// from anyone else those headers are dropped. See [`ProxyConfig::trusted_proxies`].
    #[serde(default, deserialize_with = "crate::plugins::rate_limit::nets")]
    pub trusted_ips: Vec<ipnet::IpNet>,
}

/// A composition route (our addition): matched like a route, answered by calling each
/// leg's service concurrently; see [`compose`](crate::compose).
///
/// ```yaml
/// compositions:
///   - name: order-summary
///     paths: ["/api/order-summary/{id}"]
///     legs:
///       - name: order
///         service: order-service
///         path: /api/orders/{id}
///       - name: payment
///         service: payment-service
///         path: /api/payments/by-order/{id}
///         timeout: 500ms
///         optional: true
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct CompositionSpec {
    /// The route's name.
    pub name: String,
    /// Path patterns.
    pub paths: Vec<String>,
    /// Hosts.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// The calls whose answers are merged.
    pub legs: Vec<LegSpec>,
    /// Plugins for this route.
    #[serde(default)]
    pub plugins: Vec<PluginSpec>,
}

/// One call of a composition.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct LegSpec {
    /// The key of its answer in the merged object.
    pub name: String,
    /// The service called, by its name under `services`.
    pub service: String,
    /// The path sent to it: a template filled with the route's parameters, put after the
    /// service's own `path` as a route's path is.
    pub path: String,
    /// How long it may take (`"500ms"`, `"2s"`); 5 s when absent.
    #[serde(default, with = "micro_core::config::duration::option")]
    pub timeout: Option<Duration>,
    /// Whether the answer can do without it.
    #[serde(default)]
    pub optional: bool,
}

/// Where the services named by `discovery:` are found (our addition):
///
/// ```yaml
/// discovery:
///   static:                       # always available
///     services:
///       order-service: ["10.0.0.7:8003", "10.0.0.8:8003"]
/// # or  etcd: { endpoints: ["http://127.0.0.1:2379"] }        (feature `etcd`)
/// # or  consul: { address: "http://127.0.0.1:8500" }          (feature `consul`)
/// ```
///
/// It is read when the binary starts; a reload of the file keeps the registry it has.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct DiscoverySpec {
    /// A fixed list; see [`micro_discovery::static_list`].
    #[serde(rename = "static")]
    pub static_list: Option<micro_discovery::static_list::StaticConfig>,
    /// An etcd cluster; see [`micro_discovery::etcd`].
    #[cfg(feature = "etcd")]
    pub etcd: Option<micro_discovery::etcd::EtcdConfig>,
    /// A Consul agent; see [`micro_discovery::consul`].
    #[cfg(feature = "consul")]
    pub consul: Option<micro_discovery::consul::ConsulConfig>,
}

impl DiscoverySpec {
    /// Connects to the registry it names.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] at `discovery` when it names no registry or several, the list is
    /// invalid, or the registry client cannot be made.
    pub async fn connect(&self) -> Result<Arc<dyn Discover>, ConfigError> {
        let failed = |e: micro_discovery::Error| ConfigError::at("discovery", e);
        let mut found: Vec<Arc<dyn Discover>> = Vec::new();
        if let Some(config) = &self.static_list {
            found.push(Arc::new(
                micro_discovery::static_list::StaticDiscover::from_config(config)
                    .map_err(failed)?,
            ));
        }
        #[cfg(feature = "etcd")]
        if let Some(config) = &self.etcd {
            found.push(Arc::new(
                micro_discovery::etcd::EtcdRegistry::connect(config)
                    .await
                    .map_err(failed)?,
            ));
        }
        #[cfg(feature = "consul")]
        if let Some(config) = &self.consul {
            found.push(Arc::new(
                micro_discovery::consul::ConsulRegistry::new(config.clone()).map_err(failed)?,
            ));
        }
        if found.len() != 1 {
            return Err(ConfigError::at(
                "discovery",
                "name exactly one registry: `static`, `etcd` (feature `etcd`) or `consul` \
                 (feature `consul`)",
            ));
        }
        Ok(found.remove(0))
    }
}

/// What a configuration may refer to beyond itself, given when it is built.
#[derive(Clone, Default)]
#[non_exhaustive]
pub struct Resources {
    discover: Option<Arc<dyn Discover>>,
    identity: Option<(KeyRing, Arc<str>)>,
    rollouts: crate::release::Rollouts,
}

impl Resources {
    /// No resources: services must have fixed URLs.
    pub fn new() -> Self {
        Self::default()
    }

    /// Where services named by `discovery:` are looked up.
    pub fn discover(mut self, discover: Arc<dyn Discover>) -> Self {
        self.discover = Some(discover);
        self
    }

    /// Signs every forwarded request as the gateway's `service` with `keys` (see
    /// [`Proxy::sign_as`]): for the upstream's `discovery:` name, or the service's `name`
    /// for a service at a fixed URL. Without it, requests reach the services with no
    /// identity at all (any that came with them is removed).
    pub fn identity(mut self, keys: KeyRing, service: impl Into<Arc<str>>) -> Self {
        self.identity = Some((keys, service.into()));
        self
    }
}

impl fmt::Debug for Resources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Resources")
            .field("discover", &self.discover)
            .field(
                "identity",
                &self.identity.as_ref().map(|(_, service)| service),
            )
            .finish()
    }
}

/// An upstream service: where it is and how to talk to it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct ServiceSpec {
    /// The service's name.
    pub name: String,
    /// `http://host:port/path` or `https://host:port/path`; or give `host` (with `port`,
    /// `protocol`, `path`).
    pub url: Option<String>,
    /// The upstream's protocol: `http` or `https`.
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
    /// Kong's retry count: how many times a failed request that is safe to repeat is sent
    /// again, to another instance when there is one. Default 0.
    pub retries: Option<u32>,
    /// Speak h2c to the upstream (our addition).
    #[serde(default)]
    pub http2: bool,
    /// Pass encoded slashes and backslashes (`%2F`, `%5C`) in this service's routes'
    /// paths on unchanged instead of refusing them with `400` (our addition; see
    /// [`path`](crate::path)).
    #[serde(default)]
    pub allow_encoded_slashes: bool,
    /// The service's name in discovery, instead of `url` or `host` (our addition):
    /// requests go to its healthy instances, balanced. `path` still applies as a prefix.
    pub discovery: Option<String>,
    /// How a `discovery` service's instances are balanced (our addition).
    pub balance: Option<BalanceConfig>,
    /// A circuit breaker for this service (our addition): `503` at once while it is open.
    pub circuit_breaker: Option<micro_core::resilience::CircuitBreakerConfig>,
    /// How an `https` upstream is verified (our addition): `ca`, a PEM bundle in place
    /// of the system trust store, and `cert` and `key` for mTLS; see
    /// [`ClientTlsConfig`](micro_core::tls::ClientTlsConfig). Refused for `http` and
    /// `discovery` services.
    pub tls: Option<micro_core::tls::ClientTlsConfig>,
    /// A `discovery` service's traffic split between versions of its instances (our
    /// addition): a canary or blue-green release; see [`ReleaseSpec`].
    pub release: Option<ReleaseSpec>,
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

/// How a `discovery` service's requests are split between versions (our addition), with
/// the rules of a [`Split`]:
///
/// ```yaml
/// services:
///   - name: product
///     discovery: product-service
///     release:
///       subsets:                            # stretches of points, in this order
///         - {name: stable, version: "1.4.0", weight: 95}
///         - {name: canary, version: "1.5.0", weight: 5}
///       sticky: subject                     # or {header: x-session}, {cookie: session}
///       remember: {cookie: micro-subset, lifetime: 1h}
///       force: {header: x-micro-subset, cookie: micro-subset-force}
/// ```
///
/// A blue-green switch is a reload of the file with the weights swapped (`blue: 0`,
/// `green: 100`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct ReleaseSpec {
    /// The subsets, each the instances that registered one version.
    pub subsets: Vec<SubsetSpec>,
    /// What keeps a user on one subset: `subject`, `{header: <name>}` or
    /// `{cookie: <name>}`.
    pub sticky: Option<StickySpec>,
    /// A cookie that remembers each client's subset for a while.
    pub remember: Option<RememberSpec>,
    /// A header and/or cookie naming the subset a request must go to.
    pub force: Option<ForceSpec>,
    /// A canary release the gateway runs by itself: steps, and the limits that roll the
    /// canary back; see [`RolloutSpec`].
    pub rollout: Option<RolloutSpec>,
}

/// A rollout of a [`ReleaseSpec`], with the rules of a
/// [`RolloutPolicy`]; the weights of its two subsets are
/// then the rollout's to set:
///
/// ```yaml
/// rollout:
///   stable: stable
///   canary: canary
///   steps: [5, 25, 50, 100]     # the canary's share, percent
///   step_time: 5m               # at least this long per step
///   step_requests: 200          # and at least this many canary answers
///   max_error_rate: 0.01        # above stable's; else rolled back
///   max_latency_ratio: 1.5      # times stable's mean; else rolled back
/// ```
///
/// A reload with the same rollout (subsets' versions and policy) continues it where it
/// stood; a changed one starts again.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct RolloutSpec {
    /// The subset that runs the current version.
    pub stable: String,
    /// The subset that runs the new one.
    pub canary: String,
    /// The canary's share at each step, rising to 100 (default 5, 25, 50, 100).
    pub steps: Option<Vec<u32>>,
    /// The shortest time a step lasts (default `1m`).
    #[serde(default, with = "optional_duration")]
    pub step_time: Option<Duration>,
    /// The fewest canary answers per step (default 100).
    pub step_requests: Option<u64>,
    /// How far above stable's the canary's error rate may be (default 0.01).
    pub max_error_rate: Option<f64>,
    /// How many times stable's mean latency the canary's may be (default 1.5).
    pub max_latency_ratio: Option<f64>,
}

/// An optional duration written with a unit (`30s`).
mod optional_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Duration>, D::Error> {
        let text = Option::<String>::deserialize(deserializer)?;
        text.map(|text| {
            micro_core::config::duration::parse(&text).map_err(serde::de::Error::custom)
        })
        .transpose()
    }
}

/// One subset of a [`ReleaseSpec`].
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct SubsetSpec {
    /// Its name (`stable`, `canary`, `blue`).
    pub name: String,
    /// The version its instances registered with.
    pub version: String,
    /// Its share of the requests, relative to the others' weights.
    pub weight: u32,
}

/// The sticky key of a [`ReleaseSpec`]; see [`StickyKey`]. Written `subject`,
/// `{header: <name>}` or `{cookie: <name>}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "StickyForm")]
#[non_exhaustive]
pub enum StickySpec {
    /// The verified token's subject.
    Subject,
    /// A request header's value.
    Header(String),
    /// A request cookie's value.
    Cookie(String),
}

/// How a [`StickySpec`] is written.
#[derive(Deserialize)]
#[serde(
    untagged,
    expecting = "a sticky key: `subject`, `{header: <name>}` or `{cookie: <name>}`"
)]
enum StickyForm {
    Word(String),
    Header(ByHeader),
    Cookie(ByCookie),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ByHeader {
    header: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ByCookie {
    cookie: String,
}

impl TryFrom<StickyForm> for StickySpec {
    type Error = String;

    fn try_from(form: StickyForm) -> Result<Self, String> {
        match form {
            StickyForm::Word(word) if word == "subject" => Ok(Self::Subject),
            StickyForm::Word(word) => Err(format!(
                "`{word}` is not a sticky key: write `subject`, `{{header: <name>}}` or \
                 `{{cookie: <name>}}`"
            )),
            StickyForm::Header(ByHeader { header }) => Ok(Self::Header(header)),
            StickyForm::Cookie(ByCookie { cookie }) => Ok(Self::Cookie(cookie)),
        }
    }
}

/// The remember cookie of a [`ReleaseSpec`]; see [`SplitBuilder::remember`](crate::release::SplitBuilder::remember).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct RememberSpec {
    /// The cookie's name.
    pub cookie: String,
    /// How long a client stays on its subset (`30m`, `1h`).
    #[serde(with = "micro_core::config::duration")]
    pub lifetime: Duration,
}

/// Where a [`ReleaseSpec`] reads a forced subset's name.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct ForceSpec {
    /// A request header.
    pub header: Option<String>,
    /// A request cookie.
    pub cookie: Option<String>,
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

    pub(crate) fn unreadable(path: &std::path::Path, error: impl fmt::Display) -> Self {
        Self::at(path.display().to_string(), format!("cannot read: {error}"))
    }

    pub(crate) fn in_file(mut self, path: &std::path::Path) -> Self {
        self.place = format!("{}: {}", path.display(), self.place);
        self
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
            "request-transformer" => Self::RequestTransform(TransformLayer::request_edits(
                typed::<RequestEdits>(spec, place)?,
            )),
            "response-transformer" => Self::ResponseTransform(TransformLayer::response_edits(
                typed::<ResponseEdits>(spec, place)?,
            )),
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
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::unreadable(path, e))?;
        Self::from_yaml(&text).map_err(|e| e.in_file(path))
    }

    /// Checks everything and builds the gateway, for services with fixed URLs only.
    ///
    /// # Errors
    ///
    /// As [`build_with`](Self::build_with); a `discovery:` service is an error.
    pub fn build(&self) -> Result<Gateway, ConfigError> {
        self.build_with(&Resources::new())
    }

    /// Checks everything and builds the gateway, finding `discovery:` services through
    /// `resources`.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the place of the first problem: a service without an
    /// address, a route naming a missing service, a bad pattern, an unknown plugin or a
    /// plugin configuration it does not accept.
    pub fn build_with(&self, resources: &Resources) -> Result<Gateway, ConfigError> {
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

        // One proxy per service, so that its routes share connections, balancer and breaker.
        // Every service is checked, whether a route uses it yet or not.
        let proxies = self
            .services
            .iter()
            .enumerate()
            .map(|(index, service)| {
                let place = format!("services[{index}]");
                match &service.release {
                    None => proxy(service, resources, &self.trusted_ips)
                        .map(Upstreams::One)
                        .map_err(|reason| ConfigError::at(place, reason)),
                    Some(release) => split(service, release, resources, &self.trusted_ips, &place)
                        .map(Upstreams::Split),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        let proxy_of =
            |index: usize| -> Result<Upstreams, ConfigError> { Ok(proxies[index].clone()) };

        for (place, route, service_index) in routes {
            let service = &self.services[service_index];
            let service_place = format!("services[{service_index}]");
            let proxy = proxy_of(service_index)?.with_preserve_host(route.preserve_host);
            let stack = with_plugins(
                proxy.boxed(),
                &global,
                Some((&service_place, &service.plugins)),
                (&place, &route.plugins),
                &self.consumers,
            )?;

            let name = route.name.clone().unwrap_or_else(|| {
                format!("{}-{}", service.name, place.replace(['[', ']', '.'], "-"))
            });
            let mut built = Route::new(name.clone())
                .strip_path(route.strip_path)
                .allow_encoded_slashes(service.allow_encoded_slashes)
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

        for (index, composition) in self.compositions.iter().enumerate() {
            let place = format!("compositions[{index}]");
            if composition.legs.is_empty() {
                return Err(ConfigError::at(
                    format!("{place}.legs"),
                    "a composition needs at least one leg",
                ));
            }
            let mut composed = Composition::new();
            for (l, leg) in composition.legs.iter().enumerate() {
                let leg_place = format!("{place}.legs[{l}]");
                let service_index = *by_name.get(leg.service.as_str()).ok_or_else(|| {
                    ConfigError::at(
                        format!("{leg_place}.service"),
                        format!("no service is named `{}`", leg.service),
                    )
                })?;
                // A leg goes through the plugins of the service it calls (its JWT, IP
                // rules and limits), so a composition can't reach a service around them.
                let service = &self.services[service_index];
                let through = with_plugins(
                    proxy_of(service_index)?.boxed(),
                    &[],
                    Some((&format!("services[{service_index}]"), &service.plugins)),
                    (&leg_place, &[]),
                    &self.consumers,
                )?;
                let mut built = Leg::new(&leg.name, &leg.path, through).optional(leg.optional);
                if let Some(timeout) = leg.timeout {
                    built = built.timeout(timeout);
                }
                composed = composed.leg(built);
            }
            let stack = with_plugins(
                BoxCloneSyncService::new(composed),
                &global,
                None,
                (&place, &composition.plugins),
                &self.consumers,
            )?;
            let mut built = Route::new(&composition.name)
                .method("GET")
                .method("HEAD")
                .to(stack);
            for path in &composition.paths {
                built = built.path(path);
            }
            for host in &composition.hosts {
                built = built.host(host);
            }
            builder = builder.route(built);
            places.push((composition.name.clone(), place));
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

/// Wraps `stack` in the plugins that apply: the most specific instance of each plugin
/// wins (route over service over global), and they run in the fixed order of [`PLUGINS`].
fn with_plugins(
    mut stack: RouteService,
    global: &[(String, &PluginSpec)],
    service: Option<(&str, &[PluginSpec])>,
    route: (&str, &[PluginSpec]),
    consumers: &[JwtConsumer],
) -> Result<RouteService, ConfigError> {
    let mut chosen: BTreeMap<&str, (String, &PluginSpec)> = BTreeMap::new();
    let service_plugins = service.into_iter().flat_map(|(place, specs)| {
        specs
            .iter()
            .enumerate()
            .map(move |(i, spec)| (format!("{place}.plugins[{i}]"), spec))
    });
    let route_plugins = route
        .1
        .iter()
        .enumerate()
        .map(|(i, spec)| (format!("{}.plugins[{i}]", route.0), spec));
    for (plugin_place, spec) in global
        .iter()
        .cloned()
        .chain(service_plugins)
        .chain(route_plugins)
    {
        chosen.insert(spec.name.as_str(), (plugin_place, spec));
    }
    let mut plugins = Vec::new();
    // A disabled plugin only switches off the same plugin of a wider scope, so its
    // configuration (often none) is not resolved.
    for (plugin_place, spec) in chosen.values() {
        if !spec.enabled && !PLUGINS.contains(&spec.name.as_str()) {
            return Err(ConfigError::at(
                format!("{plugin_place}.name"),
                format!("unknown plugin `{}`", spec.name),
            ));
        }
        if spec.enabled {
            let plugin = Plugin::resolve(spec, plugin_place, consumers)?;
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
    Ok(stack)
}

/// Where a service's requests go: one proxy, or a split between versions.
#[derive(Clone)]
enum Upstreams {
    One(Proxy),
    Split(Split),
}

impl Upstreams {
    fn with_preserve_host(self, preserve: bool) -> Self {
        match self {
            Self::One(proxy) => Self::One(proxy.with_preserve_host(preserve)),
            Self::Split(split) => Self::Split(split.with_preserve_host(preserve)),
        }
    }

    fn boxed(self) -> RouteService {
        match self {
            Self::One(proxy) => BoxCloneSyncService::new(proxy),
            Self::Split(split) => BoxCloneSyncService::new(split),
        }
    }
}

/// The split of a `discovery` service between its versions' instances, one discovered
/// proxy per subset.
fn split(
    service: &ServiceSpec,
    release: &ReleaseSpec,
    resources: &Resources,
    trusted_ips: &[ipnet::IpNet],
    place: &str,
) -> Result<Split, ConfigError> {
    let at =
        |field: &str, reason: String| ConfigError::at(format!("{place}.release{field}"), reason);
    let Some(name) = &service.discovery else {
        return Err(at(
            "",
            "`release` splits a service's instances by version: it needs `discovery`".to_owned(),
        ));
    };
    let mut builder = Split::builder(name.as_str());
    for (index, subset) in release.subsets.iter().enumerate() {
        // The service itself is checked (and its proxy built) the usual way, once per
        // subset, over that version's instances only.
        let discover = resources.discover.clone().map(|all| {
            Arc::new(micro_discovery::subset::VersionSubset::new(
                all,
                subset.version.as_str(),
            )) as Arc<dyn Discover>
        });
        let resources = Resources {
            discover,
            ..resources.clone()
        };
        let proxy = proxy(service, &resources, trusted_ips)
            .map_err(|reason| ConfigError::at(place, reason))?;
        if subset.name.is_empty() {
            return Err(at(
                &format!(".subsets[{index}].name"),
                "a subset needs a name".to_owned(),
            ));
        }
        builder = builder.subset(subset.name.as_str(), proxy, subset.weight);
    }
    match &release.sticky {
        None => {}
        Some(StickySpec::Subject) => builder = builder.sticky(StickyKey::Subject),
        Some(StickySpec::Header(header)) => {
            let header = http::HeaderName::try_from(header.as_str())
                .map_err(|_| at(".sticky.header", format!("`{header}` is not a header name")))?;
            builder = builder.sticky(StickyKey::Header(header));
        }
        Some(StickySpec::Cookie(cookie)) => {
            builder = builder.sticky(StickyKey::Cookie(cookie.clone()));
        }
    }
    if let Some(remember) = &release.remember {
        builder = builder.remember(remember.cookie.as_str(), remember.lifetime);
    }
    if let Some(rollout) = &release.rollout {
        let defaults = RolloutPolicy::default();
        let mut policy = defaults.clone();
        policy.steps = rollout.steps.clone().unwrap_or(defaults.steps);
        policy.step_time = rollout.step_time.unwrap_or(defaults.step_time);
        policy.step_requests = rollout.step_requests.unwrap_or(defaults.step_requests);
        policy.max_error_rate = rollout.max_error_rate.unwrap_or(defaults.max_error_rate);
        policy.max_latency_ratio = rollout
            .max_latency_ratio
            .unwrap_or(defaults.max_latency_ratio);
        let version = |name: &str| {
            release
                .subsets
                .iter()
                .find(|s| s.name == name)
                .map(|s| s.version.clone())
                .ok_or_else(|| at(".rollout", format!("there is no subset `{name}`")))
        };
        let id = format!(
            "{name}: {} -> {} {policy:?}",
            version(&rollout.stable)?,
            version(&rollout.canary)?
        );
        builder = builder
            .rollout(rollout.stable.as_str(), rollout.canary.as_str(), policy)
            .rollout_kept_in(&resources.rollouts, id);
    }
    if let Some(force) = &release.force {
        if let Some(header) = &force.header {
            let name = http::HeaderName::try_from(header.as_str())
                .map_err(|_| at(".force.header", format!("`{header}` is not a header name")))?;
            builder = builder.force_header(name);
        }
        if let Some(cookie) = &force.cookie {
            builder = builder.force_cookie(cookie.as_str());
        }
    }
    builder.build().map_err(|error| {
        let field = match &error {
            crate::release::SplitError::CookieName(_) => "",
            crate::release::SplitError::Rollout(_) => ".rollout",
            _ => ".subsets",
        };
        at(field, error.to_string())
    })
}

/// The proxy to a service: its fixed URL, or its instances in discovery.
fn proxy(
    service: &ServiceSpec,
    resources: &Resources,
    trusted_ips: &[ipnet::IpNet],
) -> Result<Proxy, String> {
    let mut config = ProxyConfig::new()
        .trusted_proxies(trusted_ips.iter().copied())
        .http2(service.http2)
        .retries(service.retries.unwrap_or(0));
    if let Some(ms) = service.read_timeout {
        config = config.timeout(Duration::from_millis(ms));
    }
    if let Some(ms) = service.connect_timeout {
        config = config.connect_timeout(Duration::from_millis(ms));
    }
    if let Some(breaker) = &service.circuit_breaker {
        config = config.circuit_breaker(breaker.clone());
    }
    let Some(name) = &service.discovery else {
        if service.balance.is_some() {
            return Err("`balance` needs `discovery`".to_owned());
        }
        let upstream = upstream(service)?;
        let proxy = match &service.tls {
            Some(_) if !upstream.to_string().starts_with("https://") => {
                return Err("`tls` needs an `https` url".to_owned())
            }
            Some(tls) => Proxy::try_new(upstream, config.tls(tls.clone()))
                .map_err(|e| format!("`tls.{}`: {e}", e.key()))?,
            None => Proxy::try_new(upstream, config).map_err(|e| e.to_string())?,
        };
        return Ok(match &resources.identity {
            Some((keys, gateway)) => {
                proxy.sign_as(keys.clone(), gateway.clone(), service.name.as_str())
            }
            None => proxy,
        });
    };
    if service.url.is_some() || service.host.is_some() {
        return Err("give either `discovery` or `url`/`host`, not both".to_owned());
    }
    if service.tls.is_some() {
        return Err("`tls` applies to an `https` url, not to `discovery`".to_owned());
    }
    let discover = resources.discover.clone().ok_or_else(|| {
        format!(
            "service `{}` uses discovery, but the gateway has no registry",
            service.name
        )
    })?;
    let prefix = service.path.as_deref().unwrap_or("");
    if !prefix.is_empty() && !prefix.starts_with('/') {
        return Err(format!("`path` must start with `/`, not `{prefix}`"));
    }
    let proxy = Proxy::discovered(
        discover,
        name,
        prefix,
        service.balance.clone().unwrap_or_default(),
        config,
    );
    Ok(match &resources.identity {
        Some((keys, gateway)) => proxy.sign_as(keys.clone(), gateway.clone(), name.as_str()),
        None => proxy,
    })
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
