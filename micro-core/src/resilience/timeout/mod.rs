//! Fail a call that takes longer than a fixed duration.
//!
//! [`Timeout`] races the inner service's response against a [`tokio::time::sleep`]; if the
//! sleep wins, the call fails with [`Elapsed`], which [`is_retryable`] treats as
//! retryable. The response future of the inner service is dropped, cancelling its work.
//!
//! [`is_retryable`]: crate::error::is_retryable

mod error;
pub mod future;
mod layer;

#[cfg(test)]
mod tests;

pub use self::error::Elapsed;
pub use self::layer::TimeoutLayer;

use std::task::{Context, Poll};
use std::time::Duration;

use tower_service::Service;

use self::future::ResponseFuture;
use crate::error::BoxError;

/// Applies a timeout to each call of the inner service.
#[derive(Debug, Clone)]
pub struct Timeout<S> {
    inner: S,
    timeout: Duration,
}

impl<S> Timeout<S> {
    /// Wraps `inner`, failing calls that take longer than `timeout`.
    pub fn new(inner: S, timeout: Duration) -> Self {
        Self { inner, timeout }
    }

    /// Returns the timeout applied to each call.
    pub fn timeout(&self) -> Duration {
        self.timeout
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

impl<S, Req> Service<Req> for Timeout<S>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let response = self.inner.call(req);
        ResponseFuture::new(response, self.timeout)
    }
}
