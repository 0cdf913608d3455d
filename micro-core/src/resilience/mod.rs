//! Resilience as tower middleware: timeouts, retries, circuit breakers and bulkheads,
//! usable on any [`tower::Service`].
//!
//! Each middleware stands alone in its module, as a service, its layer, its response
//! future and its error:
//!
//! | module | service | layer | fails with | retryable |
//! | --- | --- | --- | --- | --- |
//! | [`timeout`] | [`Timeout`] | [`TimeoutLayer`] | [`Elapsed`] | yes |
//! | [`retry`] | [`Retry`] | [`RetryLayer`] | the last error | |
//! | [`circuit_breaker`] | [`CircuitBreaker`] | [`CircuitBreakerLayer`] | [`CircuitOpen`] | no |
//! | [`bulkhead`] | [`Bulkhead`] | [`BulkheadLayer`] | [`BulkheadFull`] | yes |
//!
//! Service clients, gateway routes and event consumers configure all four at once with
//! one [`ResiliencePolicy`], which composes them in the right order; see its docs. Errors
//! are [`BoxError`](crate::error::BoxError)s and say whether to retry through
//! [`is_retryable`](crate::error::is_retryable).
//!
//! All waiting goes through [`tokio::time`], so tests can pause the clock and advance it
//! instead of sleeping.

pub mod bulkhead;
pub mod circuit_breaker;
mod optional;
mod policy;
pub mod retry;
pub mod timeout;

pub use self::bulkhead::{Bulkhead, BulkheadConfig, BulkheadFull, BulkheadLayer};
pub use self::circuit_breaker::{
    CircuitBreaker, CircuitBreakerConfig, CircuitBreakerLayer, CircuitOpen, CircuitState,
};
pub use self::policy::{InvalidConfig, Resilience, ResilienceLayer, ResiliencePolicy};
pub use self::retry::{Retry, RetryBudgetConfig, RetryConfig, RetryLayer};
pub use self::timeout::{Elapsed, Timeout, TimeoutLayer};
