use std::time::Duration;

use serde::Deserialize;

use crate::config::duration;
use crate::resilience::InvalidConfig;

/// When a [`CircuitBreaker`](super::CircuitBreaker) opens and how it recovers.
///
/// Deserializes from configuration; missing fields take their defaults and durations are
/// milliseconds or strings like `"30s"`:
///
/// ```
/// # use micro_core::resilience::CircuitBreakerConfig;
/// # use std::time::Duration;
/// let config: CircuitBreakerConfig = serde_json::from_str(r#"{
///     "failure_rate_threshold": 0.25,
///     "open_duration": "10s"
/// }"#).unwrap();
/// assert_eq!(config, CircuitBreakerConfig::new()
///     .failure_rate_threshold(0.25)
///     .open_duration(Duration::from_secs(10)));
/// ```
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct CircuitBreakerConfig {
    /// The share of failed calls in the window, between `0.0` and `1.0`, at which the
    /// breaker opens: `0.5` opens when half the calls failed. Default `0.5`. At `0.0` any
    /// failure opens it.
    pub failure_rate_threshold: f64,
    /// How many of the most recent calls the sliding window holds. Default `20`; `0`
    /// counts as `1`.
    pub window_size: u32,
    /// How many calls the window must hold before the failure rate is judged, at most
    /// `window_size`. Default `10`.
    pub minimum_calls: u32,
    /// How long the breaker stays open before it lets trial calls through. Default 30 s.
    #[serde(with = "duration")]
    pub open_duration: Duration,
    /// How many trial calls the half-open breaker lets through; all must succeed for it
    /// to close. Default `3`; `0` counts as `1`.
    pub half_open_calls: u32,
}

impl CircuitBreakerConfig {
    /// Returns the default settings.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets [`failure_rate_threshold`](Self::failure_rate_threshold).
    pub fn failure_rate_threshold(mut self, threshold: f64) -> Self {
        self.failure_rate_threshold = threshold;
        self
    }

    /// Sets [`window_size`](Self::window_size).
    pub fn window_size(mut self, calls: u32) -> Self {
        self.window_size = calls;
        self
    }

    /// Sets [`minimum_calls`](Self::minimum_calls).
    pub fn minimum_calls(mut self, calls: u32) -> Self {
        self.minimum_calls = calls;
        self
    }

    /// Sets [`open_duration`](Self::open_duration).
    pub fn open_duration(mut self, duration: Duration) -> Self {
        self.open_duration = duration;
        self
    }

    /// Sets [`half_open_calls`](Self::half_open_calls).
    pub fn half_open_calls(mut self, calls: u32) -> Self {
        self.half_open_calls = calls;
        self
    }

    pub(crate) fn validate(&self) -> Result<(), InvalidConfig> {
        let invalid = InvalidConfig::new;
        if !(0.0..=1.0).contains(&self.failure_rate_threshold) {
            return Err(invalid(
                "circuit_breaker.failure_rate_threshold",
                "must be between 0.0 and 1.0",
            ));
        }
        if self.window_size == 0 {
            return Err(invalid("circuit_breaker.window_size", "must be at least 1"));
        }
        if !(1..=self.window_size).contains(&self.minimum_calls) {
            return Err(invalid(
                "circuit_breaker.minimum_calls",
                "must be between 1 and circuit_breaker.window_size",
            ));
        }
        if self.half_open_calls == 0 {
            return Err(invalid(
                "circuit_breaker.half_open_calls",
                "must be at least 1",
            ));
        }
        Ok(())
    }

    pub(super) fn clamped(mut self) -> Self {
        self.failure_rate_threshold = if self.failure_rate_threshold.is_nan() {
            Self::default().failure_rate_threshold
        } else {
            self.failure_rate_threshold.clamp(0.0, 1.0)
        };
        self.window_size = self.window_size.max(1);
        self.minimum_calls = self.minimum_calls.clamp(1, self.window_size);
        self.half_open_calls = self.half_open_calls.max(1);
        self
    }
}

impl Default for CircuitBreakerConfig {
    fn default() -> Self {
        Self {
            failure_rate_threshold: 0.5,
            window_size: 20,
            minimum_calls: 10,
            open_duration: Duration::from_secs(30),
            half_open_calls: 3,
        }
    }
}
