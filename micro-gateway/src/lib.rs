//! micro-gateway: the API gateway of micro as tower middleware.
//!
//! Today it holds the proxy every route ends in: [`proxy::Proxy`] forwards a request to
//! an upstream with bodies streamed both ways, pooled keep-alive connections (HTTP/1.1 or
//! h2c), hop-by-hop headers removed, `X-Forwarded-*` and `Forwarded` set, and the
//! `traceparent` and `x-request-id` carried on. Its failures are JSON answers: `502` when
//! the upstream cannot be reached, `504` when it does not answer in time.
//!
//! ```no_run
//! use axum::Router;
//! use micro_gateway::proxy::{Proxy, ProxyConfig, Upstream};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let orders = Proxy::new(Upstream::parse("http://127.0.0.1:8003")?, ProxyConfig::new());
//! // Everything under /api/orders goes to the order service; host it with micro-core's
//! // ServiceHost to get health, metrics, request ids and traces.
//! let gateway: Router = Router::new().nest_service("/api/orders", orders);
//! # let _ = gateway;
//! # Ok(())
//! # }
//! ```
//!
//! The [`plugins`] are tower layers for any route: IP allow and deny lists, request and
//! response header transforms, a body size limit (`413`), CORS and an access log.
//!
//! Routing by predicates, JWT, rate limiting, composition and the declarative
//! configuration come next.
//!
//! # Features
//!
//! None yet.

pub mod error;
pub mod gateway;
pub mod plugins;
pub mod proxy;
pub mod routing;
