use std::error::Error as StdError;
use std::task::{Context, Poll};

use http::uri::{PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use micro_core::client::ErrorKind;
use micro_core::error::BoxError;
use micro_core::service::BoxFuture;
use tower::ServiceExt;
use tower_layer::Layer;
use tower_service::Service;

use super::{Attempts, Balancer, InFlight};
use crate::error::Error;

/// Wraps services in [`Balance`] with one [`Balancer`]; see [`Balancer::layer`].
#[derive(Debug, Clone)]
pub struct BalanceLayer {
    balancer: Balancer,
}

impl BalanceLayer {
    /// A layer that balances with `balancer`.
    pub fn new(balancer: Balancer) -> Self {
        Self { balancer }
    }
}

impl<S> Layer<S> for BalanceLayer {
    type Service = Balance<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Balance::new(inner, self.balancer.clone())
    }
}

/// Sends each HTTP request to one instance chosen by a [`Balancer`]: the request's
/// scheme and authority are replaced by `http://address:port` of the instance, its path
/// and query are kept. See the [module docs](super).
///
/// Its errors are the inner service's, or this crate's [`Error::NoInstances`] when no
/// instance is known, boxed so that
/// [`micro_core::error::is_retryable`] sees it as retryable.
#[derive(Debug, Clone)]
pub struct Balance<S> {
    inner: S,
    balancer: Balancer,
}

impl<S> Balance<S> {
    /// Balances the requests given to `inner` with `balancer`.
    pub fn new(inner: S, balancer: Balancer) -> Self {
        Self { inner, balancer }
    }

    /// The balancer.
    pub fn balancer(&self) -> &Balancer {
        &self.balancer
    }

    /// Returns a reference to the inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Returns a mutable reference to the inner service.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes the wrapper, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, B, RB> Service<Request<B>> for Balance<S>
where
    S: Service<Request<B>, Response = Response<RB>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    B: Send + 'static,
    RB: Send + 'static,
{
    type Response = Response<RB>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Response<RB>, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Which instance serves the request is only known in `call`; the inner service's
        // readiness is awaited there.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let balancer = self.balancer.clone();
        Box::pin(async move {
            let endpoints = balancer.snapshot().await.map_err(Error::into_stack_error)?;
            let attempts = req.extensions().get::<Attempts>().cloned();
            let endpoint = balancer
                .pick(&endpoints, attempts.as_ref())
                .ok_or_else(|| balancer.no_instances().into_stack_error())?;
            if let Some(attempts) = &attempts {
                attempts.record(endpoint.id());
            }
            let mut parts = req.uri().clone().into_parts();
            parts.scheme = Some(parts.scheme.unwrap_or(Scheme::HTTP));
            parts.authority = Some(endpoint.authority().clone());
            parts.path_and_query = Some(
                parts
                    .path_and_query
                    .unwrap_or_else(|| PathAndQuery::from_static("/")),
            );
            *req.uri_mut() = Uri::from_parts(parts)?;

            let in_flight = InFlight::new(endpoint.clone());
            let result = inner.oneshot(req).await.map_err(Into::into);
            drop(in_flight);
            let failed = match &result {
                Ok(response) => response.status().is_server_error(),
                Err(error) => is_instance_failure(&**error),
            };
            balancer.record(&endpoint, failed);
            result
        })
    }
}

/// Whether an error says the instance is unwell (rather than the request being wrong).
fn is_instance_failure(error: &(dyn StdError + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(error) = next {
        #[cfg(feature = "grpc")]
        if let Some(error) = error.downcast_ref::<micro_core::grpc::CallError>() {
            return error.is_instance_failure();
        }
        if let Some(error) = error.downcast_ref::<micro_core::client::Error>() {
            return match error.kind() {
                ErrorKind::Connect | ErrorKind::Timeout | ErrorKind::Transport => true,
                ErrorKind::Status => error.status().is_some_and(|s| s.is_server_error()),
                _ => false,
            };
        }
        if let Some(error) = error.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            return matches!(
                error.kind(),
                ConnectionRefused | ConnectionReset | ConnectionAborted | TimedOut | BrokenPipe
            );
        }
        next = error.source();
    }
    false
}
