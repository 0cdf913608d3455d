//! micro-discovery: where services announce themselves and how callers find them.
//!
//! A running instance announces itself in a [`Registry`] (register, keep alive by TTL,
//! report health, deregister). Callers ask a [`Discover`] for the healthy instances of a
//! service by name, now or as a stream of changes, and a [`Balancer`](balance::Balancer)
//! turns that stream into one instance per request. [`ServiceClient`](client::ServiceClient)
//! gives you micro-core's [`HttpClient`](micro_core::client::HttpClient) for
//! `http://product-service`: resolve → balance → timeout/retry/breaker → trace headers.
//! [`host::ServiceHostBuilderExt::register_in`] registers a hosted service when it is
//! ready and deregisters it first when shutdown begins.
//!
//! # Example
//!
//! Three instances registered in the in-memory registry, one of them failing its
//! health, and a balanced client that only ever reaches the other two:
//!
//! ```
//! use std::sync::Arc;
//! use axum::{extract::State, routing::get, Router};
//! use micro_discovery::client::ServiceClient;
//! use micro_discovery::memory::MemoryRegistry;
//! use micro_discovery::{Discover, HealthStatus, Instance, Registration, Registry};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let registry = MemoryRegistry::new();
//! for name in ["product-1", "product-2", "product-3"] {
//!     let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//!     let instance = Instance::new("product-service", name, "127.0.0.1", listener.local_addr()?.port());
//!     let app = Router::new().route("/whoami", get(|State(name): State<&'static str>| async move { name }))
//!         .with_state(name);
//!     tokio::spawn(async move { axum::serve(listener, app).await });
//!     registry.register(&Registration::new(instance)).await?;
//! }
//! registry.report_health("product-service", "product-2", HealthStatus::Critical).await?;
//! assert_eq!(registry.instances("product-service").await?.len(), 2);
//!
//! let products = ServiceClient::builder(Arc::new(registry.clone()), "product-service").build()?;
//! for _ in 0..10 {
//!     let reply = products.http().send(http::Request::get("/whoami").body(bytes::Bytes::new())?).await?;
//!     assert_ne!(reply.body().as_ref(), b"product-2");
//! }
//! # Ok(())
//! # }
//! ```
//!
//! # Backends and features
//!
//! | backend | feature | [`Registry`] | [`Discover`] | notes |
//! |---|---|---|---|---|
//! | [`memory`] | always | yes | yes | the embedded default; TTLs on Tokio time, HTTP checks run in-process |
//! | [`static_list`] | always | — | yes | a fixed list from configuration |
//! | `etcd` | `etcd` | yes | yes | etcd v3: leases with keep-alive, watch on a key prefix; needs `protoc` to build |
//! | `consul` | `consul` | yes | yes | Consul's HTTP API: agent register/deregister, HTTP and TTL checks, blocking health queries, ACL token, datacenter |
//!
//! The `grpc` feature adds the `grpc` module: `GrpcClient`, a micro-core `GrpcChannel` to
//! a service by name, balanced over its healthy instances like
//! [`ServiceClient`](client::ServiceClient).
//!
//! Every backend passes one conformance suite (`tests/it/conformance.rs`). The etcd
//! backend runs it against a real etcd server (Debian's etcd-server, started by
//! `scripts/etcd.sh`). The Consul backend runs it against a double of the documented
//! Consul agent endpoints kept inside the test suite (`tests/it/consul_double.rs`: it
//! holds state, runs TTL and HTTP checks, honours blocking queries and ACL tokens),
//! because no Consul agent can be installed on the machines the tests run on; the etcd
//! tests are the real-server proof of the same traits.
//!
//! HTTP checks run in the registering process for the memory and etcd backends (etcd
//! has no checker of its own; the outcome is stored beside the instance), and in the
//! Consul agent for Consul.
//!
//! # When the registry is unreachable
//!
//! Nothing forgets instances because the registry is down. A watch stream reports the
//! failure as an `Err` item and keeps trying; a [`Balancer`](balance::Balancer) keeps
//! routing to the last set it had; [`CachedDiscover`] answers
//! [`instances`](Discover::instances) from the last set it read and fails its
//! non-critical [`health_check`](CachedDiscover::health_check), so `/health/ready` says
//! the service runs on stale discovery data without taking it out of rotation.
//!
//! # Metrics
//!
//! Recorded through the `metrics` facade (rendered at `/metrics` by a
//! [`ServiceHost`](micro_core::host::ServiceHost)):
//!
//! | metric | kind | labels | what |
//! |---|---|---|---|
//! | `micro_discovery_instances` | gauge | `service` | instances in a balancer's rotation |
//! | `micro_discovery_resolution_errors_total` | counter | `service` | failed registry reads and requests that found no instance |
//! | `micro_discovery_ejections_total` | counter | `service` | instances ejected by passive health checking |

mod cache;
mod checker;
mod discover;
mod error;
mod instance;
mod metrics;
mod registry;

pub mod balance;
pub mod client;
#[cfg(feature = "consul")]
pub mod consul;
#[cfg(feature = "etcd")]
pub mod etcd;
#[cfg(feature = "grpc")]
pub mod grpc;
pub mod host;
pub mod identity;
pub mod memory;
pub mod static_list;
pub mod subset;

pub use self::cache::CachedDiscover;

/// The guide's discovery chapter (`docs/src/discovery.md`), whose examples run as
/// doctests of this crate with every backend feature on.
#[cfg(all(doctest, feature = "etcd", feature = "consul"))]
#[doc = include_str!("../../docs/src/discovery.md")]
pub struct GuideDiscovery;
pub use self::discover::{Discover, Watch};
pub use self::error::{Error, Result};
pub use self::instance::{HealthStatus, Instance};
pub use self::registry::{HttpCheck, Registration, Registry};
