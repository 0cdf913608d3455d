//! micro-core is the foundation of micro: the [`Service`](service::Service) trait and the
//! [`ServiceHost`](host::ServiceHost) that runs services with health checks, Prometheus
//! metrics and an ordered graceful shutdown, plus layered configuration, telemetry for
//! binaries, W3C trace context, resilience layers and an HTTP client for calling other
//! services.
//!
//! Services are ordinary [axum] routers; middleware is ordinary [tower] middleware.
//! micro-core depends on no backend (no broker, database or registry client), so every
//! other micro crate, and your services, can depend on it cheaply.
//!
//! # Example
//!
//! A service with one route and one health check, run on a free port, called once and
//! shut down:
//!
//! ```
//! use axum::{routing::get, Router};
//! use micro_core::health::HealthCheck;
//! use micro_core::host::ServiceHost;
//! use micro_core::service::Service;
//!
//! struct Hello;
//!
//! impl Service for Hello {
//!     fn name(&self) -> &str {
//!         "hello"
//!     }
//!
//!     fn router(&self) -> Router {
//!         Router::new().route("/hello", get(|| async { "hello, world" }))
//!     }
//!
//!     fn health_checks(&self) -> Vec<HealthCheck> {
//!         vec![HealthCheck::new("always", || async { Ok(()) })]
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let running = ServiceHost::builder()
//!     .service(Hello, "127.0.0.1:0".parse()?)
//!     .build()?
//!     .start()
//!     .await?;
//! let addr = running.local_addr("hello").unwrap();
//!
//! // Every service also answers /health/live, /health/ready and /metrics.
//! let mut stream = tokio::net::TcpStream::connect(addr).await?;
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//! stream
//!     .write_all(b"GET /health/ready HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
//!     .await?;
//! let mut reply = String::new();
//! stream.read_to_string(&mut reply).await?;
//! assert!(reply.starts_with("HTTP/1.1 200"));
//! assert!(reply.contains(r#""status":"ready""#));
//!
//! // A binary passes `micro_core::shutdown::signal()` to `run_until` instead.
//! running.shutdown_trigger().trigger();
//! let report = running.run_until(std::future::pending()).await;
//! assert_eq!(report.aborted_connections, 0);
//! # Ok(())
//! # }
//! ```
//!
//! # Modules
//!
//! | module | what it holds |
//! |---|---|
//! | [`service`] | the [`Service`](service::Service) trait |
//! | [`host`] | [`ServiceHost`](host::ServiceHost), its configuration and the shutdown sequence |
//! | [`listener`] | the limits every listener enforces: timeouts, sizes, connections, HTTP/2 |
//! | [`health`] | [`HealthCheck`](health::HealthCheck) and the readiness report |
//! | [`metrics`] | the Prometheus recorder and the HTTP metrics every service records |
//! | [`middleware`] | request ids and the per-request span, for any tower HTTP service |
//! | [`config`] | layered configuration: defaults < TOML file < environment |
//! | [`telemetry`] | the tracing subscriber for binaries |
//! | [`trace`] | W3C trace context: parse, propagate, the current context |
//! | [`backoff`] | the one exponential backoff with jitter, used by retries, consumers and sagas |
//! | [`resilience`] | timeout, retry with backoff and budget, circuit breaker, bulkhead |
//! | [`identity`] | verified service-to-service identity: signed tokens, [`Caller`](identity::Caller), route policies |
//! | [`tls`] | TLS termination and mTLS for listeners, HTTPS for clients (rustls) |
//! | [`client`] | an HTTP client for calling another service, with those layers |
//! | `grpc` | tonic services beside the router (health, reflection, metrics, lifecycle) and a channel to call them (with the `grpc` feature) |
//! | [`error`] | [`BoxError`](error::BoxError) and which errors are worth a retry |
//! | [`shutdown`] | shutdown triggers: OS signals and a [`Shutdown`](shutdown::Shutdown) handle |
//!
//! # Features
//!
//! | feature | default | what it adds |
//! |---|---|---|
//! | `identity` | yes | the [`identity`] module (HS256 tokens through `jsonwebtoken` on `aws-lc-rs`) |
//! | `tls` | yes | the [`tls`] module: TLS and mTLS on listeners, HTTPS in [`client`] (rustls on `aws-lc-rs`, the same crypto as `identity`) |
//! | `grpc` | no | the `grpc` module: tonic services hosted beside the router with health, reflection and metrics, and `GrpcChannel` (tonic, tonic-health, tonic-reflection) |
//!
//! Backends (Kafka, etcd, Consul, PostgreSQL, Redis) are features of the crates that use
//! them.
//!
//! # Rules the crate keeps
//!
//! - It never installs a global tracing subscriber; [`telemetry::init`] is for binaries.
//! - It reads no environment variable unless asked to ([`config::ConfigLoader::env_prefix`]).
//! - It binds only the addresses it is given (port 0 works).
//! - The one process-wide thing it touches is the `metrics` recorder, which the `metrics`
//!   facade makes global by design; see [`metrics`].
//!
//! [axum]: https://docs.rs/axum
//! [tower]: https://docs.rs/tower

pub mod backoff;
pub mod client;
pub mod config;
pub mod error;
#[cfg(feature = "grpc")]
pub mod grpc;
pub mod health;
pub mod host;
#[cfg(feature = "identity")]
pub mod identity;
pub mod listener;
pub mod metrics;
pub mod middleware;
pub mod resilience;
mod serve;
pub mod service;
pub mod shutdown;
pub mod telemetry;
#[cfg(feature = "tls")]
pub mod tls;
pub mod trace;
