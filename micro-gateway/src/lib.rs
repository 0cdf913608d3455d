//! micro-gateway: the API gateway of micro, as tower middleware and as a binary.
//!
//! - [`gateway::Gateway`] finds each request's route (path exact, prefix or template;
//!   method; host; headers — see [`routing`]), strips or rewrites its path and hands it to
//!   the route's service, answering `404` with a JSON body when nothing matches.
//! - [`proxy::Proxy`] is the service most routes end in: bodies streamed both ways, pooled
//!   keep-alive connections (HTTP/1.1 or h2c), hop-by-hop headers removed,
//!   `X-Forwarded-*` and `Forwarded` set, `traceparent` and `x-request-id` carried on;
//!   `502` when the upstream cannot be reached, `504` when it does not answer in time.
//! - [`plugins`] are tower layers for any route: JWT authentication
//!   ([`plugins::jwt`]: `401`/`403`), rate limiting ([`plugins::rate_limit`]: `429`), IP
//!   allow and deny lists, request and response header transforms, a body size limit
//!   (`413`), CORS and an access log.
//! - [`config::DeclarativeConfig`] reads Kong's declarative YAML (services, routes,
//!   plugins) and builds the gateway; errors name the place in the file.
//! - The `micro-gateway` binary runs a config file behind micro-core's host:
//!   `micro-gateway --config gateway.yaml --listen 127.0.0.1:8080`, with `/health/live`,
//!   `/health/ready`, `/metrics` and graceful shutdown on SIGTERM.
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
//! Discovery-name upstreams with load balancing and retries, composition routes and
//! reloading the file on change come next.
//!
//! # Features
//!
//! | feature | what it adds |
//! |---|---|
//! | `redis` | `RedisStore`: rate limits held in Redis, shared by several gateways (`policy: redis`) |
//!
//! Everything else is always built.

pub mod config;
pub mod error;
pub mod gateway;
pub mod plugins;
pub mod proxy;
pub mod routing;
