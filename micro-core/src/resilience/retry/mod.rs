//! Retry failed calls with exponential backoff and jitter, within a retry budget.
//!
//! [`Retry`] calls the inner service again when a call fails with an error that
//! [`is_retryable`] accepts, up to [`RetryConfig::max_attempts`] attempts in all. Before
//! each retry it sleeps for a delay drawn by micro's one [`Backoff`]: the delay
//! starts at [`initial_backoff`](RetryConfig::initial_backoff), is multiplied by
//! [`multiplier`](RetryConfig::multiplier) after each retry, is spread by
//! [`randomization_factor`](RetryConfig::randomization_factor) so clients that failed
//! together do not retry together, and never exceeds
//! [`max_backoff`](RetryConfig::max_backoff). The sleep is a [`tokio::time::sleep`], so
//! tests with a paused clock see exact delays.
//!
//! Retries multiply load on a service that is already struggling. A retry budget
//! ([`RetryBudgetConfig`]) caps them: every call deposits a fraction of a token, every
//! retry withdraws a whole one, and a small reserve lets a quiet client retry at all. When
//! the budget is empty the last error is returned as it is.
//!
//! The request is cloned for each attempt, so it must be [`Clone`].
//!
//! [`is_retryable`]: crate::error::is_retryable

mod config;
pub mod future;
mod layer;

#[cfg(test)]
mod tests;

pub use self::config::{RetryBudgetConfig, RetryConfig};
pub use self::layer::RetryLayer;

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tower::retry::budget::{Budget, TpsBudget};
use tower_service::Service;

use crate::backoff::{Backoff, Jitter};

use self::future::ResponseFuture;
use crate::error::BoxError;

/// Retries calls to the inner service that fail with a retryable error.
///
/// Clones share one retry budget.
#[derive(Debug, Clone)]
pub struct Retry<S> {
    inner: S,
    policy: Arc<Policy>,
}

impl<S> Retry<S> {
    /// Wraps `inner`, retrying as `config` says, with a budget of its own.
    ///
    /// Out-of-range settings are clamped; see [`RetryConfig`].
    pub fn new(inner: S, config: RetryConfig) -> Self {
        Self {
            inner,
            policy: Arc::new(Policy::new(config)),
        }
    }

    /// Returns the settings in use, after clamping.
    pub fn config(&self) -> &RetryConfig {
        &self.policy.config
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

impl<S, Req> Service<Req> for Retry<S>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    Req: Clone,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S, Req>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        self.policy.budget.deposit();
        let kept = (self.policy.config.max_attempts > 1).then(|| req.clone());
        let response = self.inner.call(req);
        ResponseFuture::new(response, self.inner.clone(), kept, self.policy.clone())
    }
}

/// What clones of a [`Retry`] and their futures share.
pub(super) struct Policy {
    config: RetryConfig,
    budget: TpsBudget,
}

impl Policy {
    fn new(config: RetryConfig) -> Self {
        let config = config.clamped();
        let budget = TpsBudget::new(
            config.budget.ttl,
            config.budget.min_retries_per_sec,
            config.budget.retry_ratio,
        );
        Self { config, budget }
    }

    fn max_attempts(&self) -> u32 {
        self.config.max_attempts
    }

    fn withdraw(&self) -> bool {
        self.budget.withdraw()
    }

    /// The delay before the retry that follows attempt `attempt` (from 1).
    fn delay(&self, attempt: u32) -> Duration {
        Backoff::new(self.config.initial_backoff, self.config.max_backoff)
            .multiplier(self.config.multiplier)
            .jitter(Jitter::Proportional(self.config.randomization_factor))
            .delay(attempt)
    }
}

impl fmt::Debug for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Policy")
            .field("config", &self.config)
            .field("budget", &self.budget)
            .finish()
    }
}
