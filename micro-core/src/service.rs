//! The [`Service`] trait: one named, versioned unit with an HTTP router, lifecycle hooks
//! and health checks.

use std::fmt;
use std::future::Future;
use std::pin::Pin;

use axum::Router;
use tower::BoxError;

use crate::health::HealthCheck;

/// A boxed, `Send` future, used where a trait must stay dyn-compatible.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A microservice: a name, a version, an axum [`Router`], health checks and start/stop hooks.
///
/// A [`ServiceHost`](crate::host::ServiceHost) runs one or many services, each on its own
/// listener, and adds `/health/live`, `/health/ready` and `/metrics` to every router.
///
/// Only [`name`](Service::name) and [`router`](Service::router) are required; the hooks
/// default to doing nothing and a service without health checks is ready as soon as it has
/// started.
///
/// ```
/// use axum::{routing::get, Router};
/// use micro_core::health::HealthCheck;
/// use micro_core::service::Service;
///
/// struct Catalog;
///
/// impl Service for Catalog {
///     fn name(&self) -> &str {
///         "catalog"
///     }
///
///     fn version(&self) -> &str {
///         "1.2.0"
///     }
///
///     fn router(&self) -> Router {
///         Router::new().route("/products", get(|| async { "[]" }))
///     }
///
///     fn health_checks(&self) -> Vec<HealthCheck> {
///         vec![HealthCheck::new("storage", || async { Ok(()) })]
///     }
///
///     async fn start(&self) -> Result<(), tower::BoxError> {
///         // open pools, run migrations, warm caches ...
///         Ok(())
///     }
/// }
/// ```
pub trait Service: Send + Sync + 'static {
    /// The service's name, as it is registered and labelled in metrics (`"order-service"`).
    fn name(&self) -> &str;

    /// The service's version, reported by `/health/ready` and in the `micro_service_info`
    /// metric.
    fn version(&self) -> &str {
        "0.0.0"
    }

    /// The HTTP routes of the service. Called once, when the host starts.
    fn router(&self) -> Router;

    /// The checks `/health/ready` runs. Called once, when the host starts.
    fn health_checks(&self) -> Vec<HealthCheck> {
        Vec::new()
    }

    /// The service's tonic services, served on its listener beside the
    /// [`router`](Self::router) with the host's health, reflection and metrics; see
    /// [`grpc`](crate::grpc). Called once, when the host starts. `None` (the default)
    /// serves no gRPC.
    #[cfg(feature = "grpc")]
    fn grpc(&self) -> Option<crate::grpc::GrpcServices> {
        None
    }

    /// Runs before the service's listener accepts its first connection. An error aborts
    /// the host's start.
    fn start(&self) -> impl Future<Output = Result<(), BoxError>> + Send {
        async { Ok(()) }
    }

    /// Runs once in-flight requests have drained during shutdown. An error is logged and
    /// the shutdown sequence goes on.
    fn stop(&self) -> impl Future<Output = Result<(), BoxError>> + Send {
        async { Ok(()) }
    }
}

/// A dyn-compatible view of [`Service`], so one host can run services of different types.
pub(crate) trait DynService: Send + Sync + 'static {
    fn name(&self) -> &str;
    fn version(&self) -> &str;
    fn router(&self) -> Router;
    fn health_checks(&self) -> Vec<HealthCheck>;
    #[cfg(feature = "grpc")]
    fn grpc(&self) -> Option<crate::grpc::GrpcServices>;
    fn start(&self) -> BoxFuture<'_, Result<(), BoxError>>;
    fn stop(&self) -> BoxFuture<'_, Result<(), BoxError>>;
}

impl<T: Service> DynService for T {
    fn name(&self) -> &str {
        Service::name(self)
    }

    fn version(&self) -> &str {
        Service::version(self)
    }

    fn router(&self) -> Router {
        Service::router(self)
    }

    fn health_checks(&self) -> Vec<HealthCheck> {
        Service::health_checks(self)
    }

    #[cfg(feature = "grpc")]
    fn grpc(&self) -> Option<crate::grpc::GrpcServices> {
        Service::grpc(self)
    }

    fn start(&self) -> BoxFuture<'_, Result<(), BoxError>> {
        Box::pin(Service::start(self))
    }

    fn stop(&self) -> BoxFuture<'_, Result<(), BoxError>> {
        Box::pin(Service::stop(self))
    }
}

impl fmt::Debug for dyn DynService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Service")
            .field("name", &self.name())
            .field("version", &self.version())
            .finish()
    }
}
