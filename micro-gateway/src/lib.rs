//! micro-gateway: the API gateway of micro, as tower middleware and as a binary.
//!
//! - [`path`] puts every request path in one canonical spelling before routing (dot
//!   segments removed, slashes merged, unreserved escapes decoded) and refuses ambiguous
//!   ones (`%2F`, `\\`, `%00`, non-UTF-8 escapes) with `400`; the upstream receives the
//!   normalized path.
//! - [`gateway::Gateway`] finds each request's route (path exact, prefix or template;
//!   method; host; headers — see [`routing`]), strips or rewrites its path and hands it to
//!   the route's service, answering `404` with a JSON body when nothing matches.
//! - [`proxy::Proxy`] is the service most routes end in: to a fixed URL, or to the
//!   healthy instances of a service found through micro-discovery, balanced per request
//!   (power of two choices or round robin, failing instances ejected for a while).
//!   Bodies are streamed both ways over pooled keep-alive connections (HTTP/1.1 or h2c);
//!   hop-by-hop headers are removed, `X-Forwarded-*` and `Forwarded` set, `traceparent`
//!   and `x-request-id` carried on. Requests safe to repeat are retried on another
//!   instance; a circuit breaker per upstream can stop calls to one that keeps failing.
//!   Failures are JSON answers: `502` unreachable or failed, `503` no healthy instance or
//!   breaker open, `504` timeout.
//! - [`compose::Composition`] answers one route by calling several upstreams concurrently
//!   and merging their JSON, with a timeout per leg and optional legs.
//! - [`plugins`] are tower layers for any route: JWT authentication
//!   ([`plugins::jwt`]: `401`/`403`), rate limiting ([`plugins::rate_limit`]: `429`), IP
//!   allow and deny lists, request and response header transforms, a body size limit
//!   (`413`), CORS and an access log.
//! - [`config::DeclarativeConfig`] reads Kong's declarative YAML (services, routes,
//!   plugins) plus our additions (`discovery:` services, `compositions:`) and builds the
//!   gateway; errors name the place in the file. [`reload`] replaces the running gateway
//!   when the file changes, without closing a connection.
//! - The `micro-gateway` binary runs a config file behind micro-core's host:
//!   `micro-gateway --config gateway.yaml --listen 127.0.0.1:8080`, with `/health/live`,
//!   `/health/ready`, `/metrics` and graceful shutdown on SIGTERM; it reloads the file
//!   when it changes and on SIGHUP.
//!
//! ```
//! use micro_gateway::gateway::{Gateway, Route};
//! use micro_gateway::proxy::{Proxy, ProxyConfig, Upstream};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let orders = Proxy::new(Upstream::parse("http://127.0.0.1:8003")?, ProxyConfig::new());
//! let gateway = Gateway::builder()
//!     .route(
//!         Route::new("order-by-id")
//!             .path("/api/orders/{id}")
//!             .method("GET")
//!             .rewrite("/orders/{id}")
//!             .to(orders),
//!     )
//!     .build()?;
//! // Host `gateway.into_router()` with micro-core's ServiceHost to get health, metrics,
//! // request ids and trace spans.
//! # let _ = gateway.into_router();
//! # Ok(())
//! # }
//! ```
//!
//! # Metrics
//!
//! Through the `metrics` facade, rendered at the host's `/metrics`:
//!
//! | metric | kind | labels |
//! |---|---|---|
//! | `micro_gateway_requests_total` | counter | `route`, `status` (class: `2xx`...) |
//! | `micro_gateway_request_duration_seconds` | histogram | `route` |
//! | `micro_gateway_upstream_duration_seconds` | histogram | `route`, `upstream` |
//! | `micro_gateway_upstream_errors_total` | counter | `route`, `upstream`, `reason` |
//! | `micro_gateway_rejections_total` | counter | `reason` (and `route` once matched) |
//! | `micro_gateway_config_reloads_total` | counter | `result` (`ok`, `error`) |
//! | `micro_gateway_subset_responses_total` | counter | `service`, `subset`, `class` (see [`release`]) |
//!
//! # Features
//!
//! | feature | what it adds |
//! |---|---|
//! | `redis` | `RedisStore`: rate limits held in Redis, shared by several gateways (`policy: redis`) |
//!
//! Everything else is always built.

pub mod compose;
pub mod config;
pub mod error;
mod forwarded;
pub mod gateway;
pub mod path;
pub mod plugins;
pub mod proxy;
pub mod release;
pub mod reload;
pub mod routing;
