//! Stop calling a service that keeps failing, and try it again after a while.
//!
//! A [`CircuitBreaker`] is [closed](CircuitState::Closed) at first: calls go through and
//! their outcomes fill a sliding window of the last
//! [`window_size`](CircuitBreakerConfig::window_size) calls. Once the window holds at
//! least [`minimum_calls`](CircuitBreakerConfig::minimum_calls) outcomes and the share of
//! failures among them reaches
//! [`failure_rate_threshold`](CircuitBreakerConfig::failure_rate_threshold), the breaker
//! [opens](CircuitState::Open): for [`open_duration`](CircuitBreakerConfig::open_duration)
//! every call fails at once with [`CircuitOpen`], sparing the struggling service and the
//! caller's time. After that the breaker is [half-open](CircuitState::HalfOpen): it lets
//! [`half_open_calls`](CircuitBreakerConfig::half_open_calls) trial calls through and
//! rejects the rest. One failed trial opens it again; when every trial has succeeded it
//! closes with an empty window.
//!
//! Every error of the inner service counts as a failure, a timeout included when a
//! [`Timeout`](crate::resilience::Timeout) sits inside the breaker. A call dropped before
//! it finished counts as nothing, and frees its trial slot. The move from open to
//! half-open happens at the first call (or [`state`](CircuitBreaker::state) inspection)
//! after the open duration.
//!
//! The state is shared by clones of a [`CircuitBreaker`], so one breaker can guard every
//! handle to a backend. A breaker made with [`CircuitBreaker::named`] reports its state
//! through the [`metrics`] facade:
//!
//! | metric | kind | labels | value |
//! | --- | --- | --- | --- |
//! | `micro_circuit_breaker_state` | gauge | `name` | 0 closed, 1 open, 2 half-open |
//! | `micro_circuit_breaker_transitions_total` | counter | `name`, `from`, `to` | state changes |

mod config;
mod error;
pub mod future;
mod layer;
mod state;

#[cfg(test)]
mod tests;

pub use self::config::CircuitBreakerConfig;
pub use self::error::CircuitOpen;
pub use self::layer::CircuitBreakerLayer;

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use tower_service::Service;

use self::future::ResponseFuture;
use self::state::Breaker;
use crate::error::BoxError;

/// Name of the gauge holding a named breaker's state: 0 closed, 1 open, 2 half-open.
pub const STATE_METRIC: &str = "micro_circuit_breaker_state";

/// Name of the counter of a named breaker's state changes.
pub const TRANSITIONS_METRIC: &str = "micro_circuit_breaker_transitions_total";

/// Fails calls fast while the inner service keeps failing.
///
/// Clones share one breaker state.
#[derive(Debug, Clone)]
pub struct CircuitBreaker<S> {
    inner: S,
    breaker: Arc<Breaker>,
}

impl<S> CircuitBreaker<S> {
    /// Wraps `inner` in a new, closed breaker that exports no metrics.
    ///
    /// Out-of-range settings are clamped; see [`CircuitBreakerConfig`].
    pub fn new(inner: S, config: CircuitBreakerConfig) -> Self {
        Self {
            inner,
            breaker: Arc::new(Breaker::new(config, None)),
        }
    }

    /// Wraps `inner` in a new, closed breaker that exports its state as metrics labelled
    /// with `name`.
    pub fn named(inner: S, name: impl Into<Arc<str>>, config: CircuitBreakerConfig) -> Self {
        Self {
            inner,
            breaker: Arc::new(Breaker::new(config, Some(name.into()))),
        }
    }

    /// Returns the state of the breaker now.
    pub fn state(&self) -> CircuitState {
        self.breaker.state()
    }

    /// Returns the breaker's name, if it has one.
    pub fn name(&self) -> Option<&str> {
        self.breaker.name()
    }

    /// Returns the settings in use, after clamping.
    pub fn config(&self) -> &CircuitBreakerConfig {
        self.breaker.config()
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

impl<S, Req> Service<Req> for CircuitBreaker<S>
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
        match self.breaker.try_acquire() {
            Ok(permit) => ResponseFuture::called(self.inner.call(req), permit),
            Err(open) => ResponseFuture::rejected(open),
        }
    }
}

/// The state of a [`CircuitBreaker`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CircuitState {
    /// Calls go through and their outcomes are counted.
    Closed,
    /// Calls are rejected with [`CircuitOpen`].
    Open,
    /// A few trial calls go through to probe whether the service has recovered.
    HalfOpen,
}

impl CircuitState {
    /// Returns the state in snake case, as used in metric labels: `closed`, `open` or
    /// `half_open`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }

    fn as_gauge(self) -> f64 {
        match self {
            Self::Closed => 0.0,
            Self::Open => 1.0,
            Self::HalfOpen => 2.0,
        }
    }
}

impl fmt::Display for CircuitState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
