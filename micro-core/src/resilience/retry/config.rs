use std::time::Duration;

use serde::Deserialize;

use crate::config::duration;
use crate::resilience::InvalidConfig;

/// How [`Retry`](super::Retry) retries.
///
/// Deserializes from configuration; missing fields take their defaults and durations are
/// milliseconds or strings like `"100ms"` or `"2s"`:
///
/// ```
/// # use micro_core::resilience::RetryConfig;
/// # use std::time::Duration;
/// let config: RetryConfig = serde_json::from_str(r#"{
///     "max_attempts": 4,
///     "initial_backoff": "50ms",
///     "max_backoff": "1s"
/// }"#).unwrap();
/// assert_eq!(config, RetryConfig::new()
///     .max_attempts(4)
///     .initial_backoff(Duration::from_millis(50))
///     .max_backoff(Duration::from_secs(1)));
/// ```
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct RetryConfig {
    /// Attempts in all, the first call included; `1` never retries. Default `3`; `0`
    /// counts as `1`.
    pub max_attempts: u32,
    /// The delay before the first retry, before jitter. Default 100 ms.
    #[serde(with = "duration")]
    pub initial_backoff: Duration,
    /// The longest delay between attempts, jitter included. Default 5 s.
    #[serde(with = "duration")]
    pub max_backoff: Duration,
    /// How much the delay grows after each retry. Default `2.0`; values below `1.0` count
    /// as `1.0`.
    pub multiplier: f64,
    /// How far a delay is spread at random around its nominal value, between `0.0` (no
    /// jitter) and `1.0`: with `0.5` a nominal 100 ms becomes anything from 50 ms to
    /// 150 ms. Default `0.5`.
    pub randomization_factor: f64,
    /// How many retries may be made overall.
    pub budget: RetryBudgetConfig,
}

impl RetryConfig {
    /// Returns the default settings.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets [`max_attempts`](Self::max_attempts).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts;
        self
    }

    /// Sets [`initial_backoff`](Self::initial_backoff).
    pub fn initial_backoff(mut self, delay: Duration) -> Self {
        self.initial_backoff = delay;
        self
    }

    /// Sets [`max_backoff`](Self::max_backoff).
    pub fn max_backoff(mut self, delay: Duration) -> Self {
        self.max_backoff = delay;
        self
    }

    /// Sets [`multiplier`](Self::multiplier).
    pub fn multiplier(mut self, multiplier: f64) -> Self {
        self.multiplier = multiplier;
        self
    }

    /// Sets [`randomization_factor`](Self::randomization_factor).
    pub fn randomization_factor(mut self, factor: f64) -> Self {
        self.randomization_factor = factor;
        self
    }

    /// Sets [`budget`](Self::budget).
    pub fn budget(mut self, budget: RetryBudgetConfig) -> Self {
        self.budget = budget;
        self
    }

    pub(crate) fn validate(&self) -> Result<(), InvalidConfig> {
        let invalid = InvalidConfig::new;
        if self.max_attempts == 0 {
            return Err(invalid("retry.max_attempts", "must be at least 1"));
        }
        if !(self.multiplier >= 1.0 && self.multiplier.is_finite()) {
            return Err(invalid(
                "retry.multiplier",
                "must be a number of at least 1.0",
            ));
        }
        if !(0.0..=1.0).contains(&self.randomization_factor) {
            return Err(invalid(
                "retry.randomization_factor",
                "must be between 0.0 and 1.0",
            ));
        }
        if self.initial_backoff > self.max_backoff {
            return Err(invalid(
                "retry.initial_backoff",
                "must not be longer than retry.max_backoff",
            ));
        }
        self.budget.validate()
    }

    pub(super) fn clamped(mut self) -> Self {
        self.max_attempts = self.max_attempts.max(1);
        if !(self.multiplier >= 1.0 && self.multiplier.is_finite()) {
            self.multiplier = 1.0;
        }
        self.randomization_factor = if self.randomization_factor.is_nan() {
            0.0
        } else {
            self.randomization_factor.clamp(0.0, 1.0)
        };
        self.initial_backoff = self.initial_backoff.min(self.max_backoff);
        self.budget = self.budget.clamped();
        self
    }
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            multiplier: 2.0,
            randomization_factor: 0.5,
            budget: RetryBudgetConfig::default(),
        }
    }
}

/// The retry budget of a [`Retry`](super::Retry): how many retries its calls may make.
///
/// Each call earns [`retry_ratio`](Self::retry_ratio) of a retry, and
/// [`min_retries_per_sec`](Self::min_retries_per_sec) more are allowed regardless;
/// earnings and retries count for [`ttl`](Self::ttl). With the defaults, retries add at
/// most 20% to the load, plus 10 a second.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct RetryBudgetConfig {
    /// How long a call's earnings and a retry's cost count, between 1 s and 60 s.
    /// Default 10 s.
    #[serde(with = "duration")]
    pub ttl: Duration,
    /// Retries allowed per second whatever the traffic, so that a client making few calls
    /// can still retry. Default `10`.
    pub min_retries_per_sec: u32,
    /// Retries earned by each call: `0.2` allows one retry for every five calls. Between
    /// `0.0` and `1000.0`; default `0.2`.
    pub retry_ratio: f32,
}

impl RetryBudgetConfig {
    /// Returns the default settings.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets [`ttl`](Self::ttl).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Sets [`min_retries_per_sec`](Self::min_retries_per_sec).
    pub fn min_retries_per_sec(mut self, retries: u32) -> Self {
        self.min_retries_per_sec = retries;
        self
    }

    /// Sets [`retry_ratio`](Self::retry_ratio).
    pub fn retry_ratio(mut self, ratio: f32) -> Self {
        self.retry_ratio = ratio;
        self
    }

    fn validate(&self) -> Result<(), InvalidConfig> {
        if !(MIN_TTL..=MAX_TTL).contains(&self.ttl) {
            return Err(InvalidConfig::new(
                "retry.budget.ttl",
                "must be between 1s and 60s",
            ));
        }
        if !(0.0..=MAX_RATIO).contains(&self.retry_ratio) {
            return Err(InvalidConfig::new(
                "retry.budget.retry_ratio",
                "must be between 0.0 and 1000.0",
            ));
        }
        if self.min_retries_per_sec > MAX_MIN_PER_SEC {
            return Err(InvalidConfig::new(
                "retry.budget.min_retries_per_sec",
                "is too large",
            ));
        }
        Ok(())
    }

    /// Brings every setting into the range `TpsBudget::new` accepts without panicking.
    fn clamped(mut self) -> Self {
        self.ttl = self.ttl.clamp(MIN_TTL, MAX_TTL);
        self.retry_ratio = if self.retry_ratio.is_nan() {
            0.0
        } else {
            self.retry_ratio.clamp(0.0, MAX_RATIO)
        };
        self.min_retries_per_sec = self.min_retries_per_sec.min(MAX_MIN_PER_SEC);
        self
    }
}

const MIN_TTL: Duration = Duration::from_secs(1);
const MAX_TTL: Duration = Duration::from_secs(60);
const MAX_RATIO: f32 = 1000.0;
const MAX_MIN_PER_SEC: u32 = i32::MAX as u32 - 1;

impl Default for RetryBudgetConfig {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(10),
            min_retries_per_sec: 10,
            retry_ratio: 0.2,
        }
    }
}
