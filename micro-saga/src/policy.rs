//! Per-step timeouts and retries.

use std::time::Duration;

use micro_core::backoff::{Backoff, Jitter};
use micro_core::config::duration;
use micro_core::resilience::RetryConfig;
use serde::Deserialize;

/// How one step's action and compensation are timed out and retried.
///
/// Each attempt runs under [`timeout`](Self::timeout). A retryable failure or
/// a timeout is tried again after an exponential backoff (with jitter), with
/// the same idempotency key, until [`max_attempts`](Self::max_attempts) for
/// the action (then the step fails and the saga compensates) or
/// [`compensation_max_attempts`](Self::compensation_max_attempts) for the
/// compensation (then the saga fails and needs attention). A permanent
/// failure is not retried.
///
/// The timeout is durable: an attempt's deadline is its start as the saga
/// log recorded it plus `timeout`. When a saga is resumed (after a restart,
/// or by another orchestrator) with an attempt in flight, that attempt is
/// carried on (its action called again, with the same idempotency key and
/// attempt number) only until that deadline; an attempt whose deadline passed
/// while nobody drove the saga has timed out, an unknown outcome, and is
/// resolved as one (retried while the limits allow, else uncertain). Without
/// a timeout, a resumed attempt in flight is started afresh.
///
/// Deserializes from configuration, with micro-core's duration format:
///
/// ```
/// use micro_saga::StepPolicy;
/// use std::time::Duration;
///
/// let policy: StepPolicy = serde_json::from_str(r#"{
///     "timeout": "2s",
///     "max_attempts": 5,
///     "initial_backoff": "50ms"
/// }"#).unwrap();
/// assert_eq!(policy, StepPolicy::new()
///     .timeout(Duration::from_secs(2))
///     .max_attempts(5)
///     .initial_backoff(Duration::from_millis(50)));
/// ```
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct StepPolicy {
    /// How long one attempt may take; `None` waits for ever. Default 30 s.
    #[serde(with = "duration::option")]
    pub timeout: Option<Duration>,
    /// Attempts at the action in all, the first included. Default `3`; `0`
    /// counts as `1`; [`UNBOUNDED`](Self::UNBOUNDED) sets no bound (see
    /// [`until_done`](Self::until_done)).
    pub max_attempts: u32,
    /// The longest an action may be tried, from its first attempt as the
    /// saga log recorded it (so the bound holds across restarts), on top of
    /// [`max_attempts`](Self::max_attempts). `None`, the default, bounds the
    /// attempts only. Once either bound is reached, an action whose outcome
    /// is still unknown is compensated as if it succeeded (see
    /// [`Resolution`](crate::Resolution)).
    #[serde(with = "duration::option")]
    pub resolve_within: Option<Duration>,
    /// Attempts at the compensation in all. Default `10`: a compensation
    /// that cannot run leaves an effect behind, so it is tried harder.
    /// [`UNBOUNDED`](Self::UNBOUNDED) sets no bound.
    pub compensation_max_attempts: u32,
    /// The delay before the first retry, before jitter. Default 100 ms.
    #[serde(with = "duration")]
    pub initial_backoff: Duration,
    /// The longest delay between attempts. Default 10 s.
    #[serde(with = "duration")]
    pub max_backoff: Duration,
    /// How much the delay grows after each retry. Default `2.0`; values
    /// below `1.0` count as `1.0`.
    pub multiplier: f64,
    /// How far a delay is spread at random around its nominal value, from
    /// `0.0` to `1.0`. Default `0.2`.
    pub randomization_factor: f64,
}

impl StepPolicy {
    /// The attempt count that is no bound: a step with it as
    /// [`max_attempts`](Self::max_attempts) (or a compensation, as
    /// [`compensation_max_attempts`](Self::compensation_max_attempts)) is
    /// tried until it gives a definite answer.
    pub const UNBOUNDED: u32 = u32::MAX;

    /// The default policy.
    pub fn new() -> Self {
        Self::default()
    }

    /// Forward recovery: the step is retried, with backoff up to
    /// [`max_backoff`](Self::max_backoff), until it is done. Every transient
    /// refusal and every unknown outcome (a timeout, a connection lost in
    /// flight) is tried again with the same idempotency key, without a bound
    /// on the attempts or the time ([`max_attempts`](Self::max_attempts) and
    /// [`compensation_max_attempts`](Self::compensation_max_attempts) become
    /// [`UNBOUNDED`](Self::UNBOUNDED), [`resolve_within`](Self::resolve_within)
    /// is removed); only a definite refusal ([`StepError::permanent`]) fails
    /// the step.
    ///
    /// For the steps after a pivot that must go through once it passed (a
    /// cancellation that refunded the payment must return the stock), and
    /// for sagas made only of such steps. The step must be idempotent by its
    /// key and tolerate "nothing to do" (it may have taken effect in an
    /// attempt whose answer was lost), and the participant it calls must
    /// come back some day: the saga waits for it, resumed by recovery after
    /// a restart, with its attempts counted in the log.
    ///
    /// ```
    /// use micro_saga::StepPolicy;
    /// use std::time::Duration;
    ///
    /// let policy = StepPolicy::new().max_backoff(Duration::from_secs(5)).until_done();
    /// assert!(policy.is_until_done());
    /// assert_eq!(policy.max_attempts, StepPolicy::UNBOUNDED);
    /// assert_eq!(policy.max_backoff, Duration::from_secs(5));
    /// assert!(!StepPolicy::new().is_until_done());
    /// ```
    ///
    /// [`StepError::permanent`]: crate::StepError::permanent
    pub fn until_done(mut self) -> Self {
        self.max_attempts = Self::UNBOUNDED;
        self.compensation_max_attempts = Self::UNBOUNDED;
        self.resolve_within = None;
        self
    }

    /// Whether the action is retried until it is done
    /// ([`until_done`](Self::until_done)): its attempts and time are unbounded.
    pub fn is_until_done(&self) -> bool {
        self.max_attempts == Self::UNBOUNDED && self.resolve_within.is_none()
    }

    /// The backoff and attempts of micro-core's [`RetryConfig`] (its retry
    /// budget does not apply to sagas), with the default timeout and
    /// compensation attempts.
    pub fn from_retry_config(config: &RetryConfig) -> Self {
        StepPolicy {
            max_attempts: config.max_attempts,
            initial_backoff: config.initial_backoff,
            max_backoff: config.max_backoff,
            multiplier: config.multiplier,
            randomization_factor: config.randomization_factor,
            ..Self::default()
        }
    }

    /// Sets [`timeout`](Self::timeout).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Removes the [`timeout`](Self::timeout).
    pub fn no_timeout(mut self) -> Self {
        self.timeout = None;
        self
    }

    /// Sets [`max_attempts`](Self::max_attempts).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts;
        self
    }

    /// Sets [`resolve_within`](Self::resolve_within).
    pub fn resolve_within(mut self, limit: Duration) -> Self {
        self.resolve_within = Some(limit);
        self
    }

    /// The bounds on the action's attempts, for
    /// [`SagaInstance::resolve_failure`](crate::SagaInstance::resolve_failure).
    pub fn action_limits(&self) -> crate::AttemptLimits {
        crate::AttemptLimits {
            max_attempts: self.attempts(false),
            within: self.resolve_within,
        }
    }

    /// Sets [`compensation_max_attempts`](Self::compensation_max_attempts).
    pub fn compensation_max_attempts(mut self, attempts: u32) -> Self {
        self.compensation_max_attempts = attempts;
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

    pub(crate) fn attempts(&self, compensation: bool) -> u32 {
        let attempts = if compensation {
            self.compensation_max_attempts
        } else {
            self.max_attempts
        };
        attempts.max(1)
    }

    /// The delay before the attempt after `attempt` (counted from 1).
    pub(crate) fn backoff(&self, attempt: u32) -> Duration {
        Backoff::new(self.initial_backoff, self.max_backoff)
            .multiplier(self.multiplier)
            .jitter(Jitter::Proportional(self.randomization_factor))
            .delay(attempt)
    }
}

impl Default for StepPolicy {
    fn default() -> Self {
        StepPolicy {
            timeout: Some(Duration::from_secs(30)),
            max_attempts: 3,
            resolve_within: None,
            compensation_max_attempts: 10,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            multiplier: 2.0,
            randomization_factor: 0.2,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_exponentially_up_to_the_cap() {
        let policy = StepPolicy::new()
            .randomization_factor(0.0)
            .initial_backoff(Duration::from_millis(100))
            .max_backoff(Duration::from_millis(700));
        let delays: Vec<_> = (1..=5).map(|a| policy.backoff(a).as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 700, 700]);
        assert_eq!(policy.backoff(1000).as_millis(), 700);
    }

    #[test]
    fn jitter_stays_in_range() {
        let policy = StepPolicy::new()
            .randomization_factor(0.5)
            .initial_backoff(Duration::from_millis(100));
        for _ in 0..200 {
            let d = policy.backoff(1).as_millis();
            assert!((50..=150).contains(&d), "{d}");
        }
    }

    #[test]
    fn bad_values_are_clamped() {
        let policy = StepPolicy::new()
            .max_attempts(0)
            .compensation_max_attempts(0)
            .multiplier(f64::NAN)
            .randomization_factor(f64::NAN);
        assert_eq!(policy.attempts(false), 1);
        assert_eq!(policy.attempts(true), 1);
        assert_eq!(policy.backoff(5), policy.initial_backoff);
    }

    #[test]
    fn takes_micro_core_retry_config() {
        let config = RetryConfig::new()
            .max_attempts(7)
            .initial_backoff(Duration::from_millis(5));
        let policy = StepPolicy::from_retry_config(&config);
        assert_eq!(policy.max_attempts, 7);
        assert_eq!(policy.initial_backoff, Duration::from_millis(5));
        assert_eq!(policy.timeout, StepPolicy::new().timeout);
    }

    #[test]
    fn rejects_unknown_fields() {
        let err = serde_json::from_str::<StepPolicy>(r#"{"retries": 2}"#).unwrap_err();
        assert!(err.to_string().contains("retries"), "{err}");
        let policy: StepPolicy = serde_json::from_str(r#"{"timeout": null}"#).unwrap();
        assert_eq!(policy.timeout, None);
    }
}
