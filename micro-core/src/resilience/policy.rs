//! One resilience policy for service clients, gateway routes and event consumers.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use serde::Deserialize;
use tower_layer::Layer;
use tower_service::Service;

use super::optional::Optional;
use super::{
    Bulkhead, BulkheadConfig, CircuitBreaker, CircuitBreakerConfig, CircuitState, Retry,
    RetryConfig, Timeout,
};
use crate::config::duration;
use crate::error::BoxError;

/// Which resilience middleware to put around a service, and how each behaves.
///
/// Every part is optional and off by default, so the default policy changes nothing. A
/// policy becomes middleware through [`layer`](Self::layer), which names it; the stack it
/// builds is, from the outside in:
///
/// ```text
/// bulkhead -> retry -> circuit breaker -> timeout -> service
/// ```
///
/// - The **bulkhead** is outermost, so a call holds one permit for all its attempts:
///   retries never raise concurrency beyond the limit, and a call turned away costs
///   nothing downstream. [`BulkheadFull`](super::BulkheadFull) is retryable, but by the
///   caller: this stack's retry sits inside the bulkhead.
/// - **Retry** is outside the breaker, so the breaker sees every attempt, and once it
///   opens the next attempt fails with [`CircuitOpen`](super::CircuitOpen), which is not
///   retryable: an open breaker stops retries at once instead of being hammered.
/// - The **circuit breaker** is outside the timeout, so timeouts count as failures.
/// - The **timeout** is innermost, so it bounds each attempt: a hung attempt is cut short
///   and retried ([`Elapsed`](super::Elapsed) is retryable) instead of using up the whole
///   call. To bound a call with all its retries, put another timeout outside the policy.
///
/// It deserializes from configuration; durations are milliseconds or strings like
/// `"250ms"`, `"2s"`, `"5m"`, and a part that is absent stays off while one given as an
/// empty table takes its defaults. In TOML:
///
/// ```toml
/// timeout = "2s"
///
/// [retry]
/// max_attempts = 3
/// initial_backoff = "100ms"
/// max_backoff = "2s"
///
/// [circuit_breaker]
/// failure_rate_threshold = 0.5
/// open_duration = "30s"
///
/// [bulkhead]
/// max_concurrent = 32
/// max_queued = 64
/// ```
///
/// Or in code:
///
/// ```
/// use micro_core::resilience::{CircuitBreakerConfig, ResiliencePolicy, RetryConfig};
/// use std::time::Duration;
/// use tower::{service_fn, Layer, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), micro_core::error::BoxError> {
/// let policy = ResiliencePolicy::new()
///     .timeout(Duration::from_secs(2))
///     .retry(RetryConfig::new().max_attempts(3))
///     .circuit_breaker(CircuitBreakerConfig::new());
/// policy.validate()?;
///
/// let inventory = service_fn(|sku: &'static str| async move {
///     Ok::<_, std::io::Error>(sku.len())
/// });
/// let inventory = policy.layer("inventory").layer(inventory);
/// assert_eq!(inventory.oneshot("ABC-123").await?, 7);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct ResiliencePolicy {
    /// The longest one attempt may take.
    #[serde(with = "duration::option")]
    pub timeout: Option<Duration>,
    /// How to retry failed attempts.
    pub retry: Option<RetryConfig>,
    /// When to stop calling a failing service.
    pub circuit_breaker: Option<CircuitBreakerConfig>,
    /// How many calls to run and queue at once.
    pub bulkhead: Option<BulkheadConfig>,
}

impl ResiliencePolicy {
    /// Returns a policy with every part off.
    pub fn new() -> Self {
        Self::default()
    }

    /// Bounds each attempt by `timeout`.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Retries failed attempts as `config` says.
    pub fn retry(mut self, config: RetryConfig) -> Self {
        self.retry = Some(config);
        self
    }

    /// Guards the service with a circuit breaker configured by `config`.
    pub fn circuit_breaker(mut self, config: CircuitBreakerConfig) -> Self {
        self.circuit_breaker = Some(config);
        self
    }

    /// Limits concurrent and queued calls as `config` says.
    pub fn bulkhead(mut self, config: BulkheadConfig) -> Self {
        self.bulkhead = Some(config);
        self
    }

    /// Checks that every setting is in range.
    ///
    /// The middleware clamps settings that are out of range rather than fail; call this
    /// when loading configuration to report them instead.
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        if self.timeout == Some(Duration::ZERO) {
            return Err(InvalidConfig::new("timeout", "must be longer than zero"));
        }
        if let Some(retry) = &self.retry {
            retry.validate()?;
        }
        if let Some(breaker) = &self.circuit_breaker {
            breaker.validate()?;
        }
        if let Some(bulkhead) = &self.bulkhead {
            bulkhead.validate()?;
        }
        Ok(())
    }

    /// Returns a layer applying this policy, naming what it protects: the name labels the
    /// circuit breaker's metrics and logs.
    pub fn layer(&self, name: impl Into<Arc<str>>) -> ResilienceLayer {
        ResilienceLayer::new(name, self.clone())
    }
}

/// Applies a [`ResiliencePolicy`] to the services it wraps, giving each one a
/// [`Resilience`].
///
/// Each service it wraps gets a circuit breaker, retry budget and bulkhead of its own,
/// shared by that service's clones.
#[derive(Debug, Clone)]
pub struct ResilienceLayer {
    name: Arc<str>,
    policy: ResiliencePolicy,
}

impl ResilienceLayer {
    /// Creates a layer applying `policy` under `name`.
    pub fn new(name: impl Into<Arc<str>>, policy: ResiliencePolicy) -> Self {
        Self {
            name: name.into(),
            policy,
        }
    }
}

impl<S> Layer<S> for ResilienceLayer {
    type Service = Resilience<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Resilience::new(inner, self.name.clone(), &self.policy)
    }
}

type Timed<S> = Optional<Timeout<S>, S>;
type Guarded<S> = Optional<CircuitBreaker<Timed<S>>, Timed<S>>;
type Retried<S> = Optional<Retry<Guarded<S>>, Guarded<S>>;
type Stack<S> = Optional<Bulkhead<Retried<S>>, Retried<S>>;

/// A service wrapped in the middleware a [`ResiliencePolicy`] asks for.
///
/// Clones share the circuit breaker, retry budget and bulkhead. Its type does not depend
/// on which parts the policy turns on, so it always asks what the most demanding part
/// needs: a [`Clone`] service (the bulkhead clones it per call, retries keep a copy) and
/// [`Clone`] requests (retries resend them).
#[derive(Debug, Clone)]
pub struct Resilience<S> {
    inner: Stack<S>,
    name: Arc<str>,
}

impl<S> Resilience<S> {
    /// Wraps `inner` as `policy` says, under `name`.
    pub fn new(inner: S, name: impl Into<Arc<str>>, policy: &ResiliencePolicy) -> Self {
        let name = name.into();
        let timeout = policy
            .timeout
            .map(|timeout| move |inner| Timeout::new(inner, timeout));
        let breaker = policy.circuit_breaker.clone().map(|config| {
            let name = name.clone();
            move |inner| CircuitBreaker::named(inner, name, config)
        });
        let retry = policy
            .retry
            .clone()
            .map(|config| move |inner| Retry::new(inner, config));
        let bulkhead = policy
            .bulkhead
            .clone()
            .map(|config| move |inner| Bulkhead::new(inner, config));

        let timed = Optional::new(timeout, inner);
        let guarded = Optional::new(breaker, timed);
        let retried = Optional::new(retry, guarded);
        Self {
            inner: Optional::new(bulkhead, retried),
            name,
        }
    }

    /// Returns the name the policy was applied under.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Returns the state of the circuit breaker, if the policy has one.
    pub fn circuit_state(&self) -> Option<CircuitState> {
        let retried = self.inner.service_ref();
        let guarded = retried.service_ref();
        guarded.as_on().map(CircuitBreaker::state)
    }

    /// Returns a reference to the inner service.
    pub fn get_ref(&self) -> &S {
        let retried = self.inner.service_ref();
        let guarded = retried.service_ref();
        guarded.service_ref().service_ref()
    }

    /// Returns a mutable reference to the inner service.
    pub fn get_mut(&mut self) -> &mut S {
        let retried = self.inner.service_mut();
        let guarded = retried.service_mut();
        guarded.service_mut().service_mut()
    }

    /// Consumes the wrapper, returning the inner service.
    pub fn into_inner(self) -> S {
        let retried = self.inner.into_service();
        let guarded = retried.into_service();
        guarded.into_service().into_service()
    }
}

impl<S, Req> Service<Req> for Resilience<S>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    Req: Clone,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S, Req>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        ResponseFuture {
            inner: self.inner.call(req),
        }
    }
}

pin_project! {
    /// Response future of [`Resilience`].
    pub struct ResponseFuture<S, Req>
    where
        S: Service<Req>,
        S: Clone,
        S::Error: Into<BoxError>,
        Req: Clone,
    {
        #[pin]
        inner: <Stack<S> as Service<Req>>::Future,
    }
}

impl<S, Req> Future for ResponseFuture<S, Req>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    Req: Clone,
{
    type Output = Result<S::Response, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project().inner.poll(cx)
    }
}

impl<S, Req> fmt::Debug for ResponseFuture<S, Req>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    Req: Clone,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

/// A resilience setting out of range, reported by [`ResiliencePolicy::validate`].
#[derive(Debug, Clone, thiserror::Error)]
#[error("invalid resilience setting `{field}`: {reason}")]
pub struct InvalidConfig {
    field: &'static str,
    reason: &'static str,
}

impl InvalidConfig {
    pub(crate) fn new(field: &'static str, reason: &'static str) -> Self {
        Self { field, reason }
    }

    /// Returns the setting at fault, as a dotted path such as `retry.multiplier`.
    pub fn field(&self) -> &str {
        self.field
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use figment::providers::{Format, Toml};
    use figment::Figment;
    use tokio::time::Instant;
    use tower::util::BoxCloneService;
    use tower::{service_fn, ServiceExt};

    use super::*;
    use crate::error::is_retryable;
    use crate::resilience::{BulkheadFull, CircuitOpen, RetryBudgetConfig};

    /// A backend that answers its `n`th call (from 1) with `answer(n)`, after sleeping
    /// for `delay(n)`.
    fn backend(
        delay: fn(usize) -> Duration,
        answer: fn(usize) -> Result<usize, io::Error>,
    ) -> (BoxCloneService<(), usize, io::Error>, Arc<AtomicUsize>) {
        let calls = Arc::new(AtomicUsize::new(0));
        let seen = calls.clone();
        let service = service_fn(move |()| {
            let n = seen.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                tokio::time::sleep(delay(n)).await;
                answer(n)
            }
        });
        (BoxCloneService::new(service), calls)
    }

    fn at_once(_: usize) -> Duration {
        Duration::ZERO
    }

    fn reset(_: usize) -> Result<usize, io::Error> {
        Err(io::ErrorKind::ConnectionReset.into())
    }

    fn retry(max_attempts: u32, backoff: Duration) -> RetryConfig {
        RetryConfig::new()
            .max_attempts(max_attempts)
            .initial_backoff(backoff)
            .randomization_factor(0.0)
            .budget(RetryBudgetConfig::new().min_retries_per_sec(1000))
    }

    #[tokio::test(start_paused = true)]
    async fn an_open_breaker_stops_the_retries() {
        let (backend, calls) = backend(at_once, reset);
        let policy = ResiliencePolicy::new()
            .retry(retry(5, Duration::from_millis(10)))
            .circuit_breaker(CircuitBreakerConfig::new().window_size(2).minimum_calls(2));
        let service = policy.layer("ledger").layer(backend);

        let err = service.clone().oneshot(()).await.unwrap_err();

        assert!(err.is::<CircuitOpen>(), "{err}");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert_eq!(service.circuit_state(), Some(CircuitState::Open));
    }

    #[tokio::test(start_paused = true)]
    async fn the_timeout_bounds_each_attempt_and_a_timed_out_attempt_is_retried() {
        fn slow_first(n: usize) -> Duration {
            if n == 1 {
                Duration::from_secs(60)
            } else {
                Duration::from_millis(5)
            }
        }
        let (backend, calls) = backend(slow_first, Ok);
        let policy = ResiliencePolicy::new()
            .timeout(Duration::from_secs(1))
            .retry(retry(3, Duration::from_millis(100)));
        let start = Instant::now();

        let answer = policy
            .layer("ledger")
            .layer(backend)
            .oneshot(())
            .await
            .unwrap();

        assert_eq!(answer, 2);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert_eq!(start.elapsed(), Duration::from_millis(1105));
    }

    #[tokio::test(start_paused = true)]
    async fn timeouts_count_as_failures_for_the_breaker() {
        fn hang(_: usize) -> Duration {
            Duration::from_secs(3600)
        }
        let (backend, _) = backend(hang, Ok);
        let policy = ResiliencePolicy::new()
            .timeout(Duration::from_millis(100))
            .circuit_breaker(CircuitBreakerConfig::new().window_size(1).minimum_calls(1));
        let service = policy.layer("ledger").layer(backend);

        let err = service.clone().oneshot(()).await.unwrap_err();

        assert!(err.is::<crate::resilience::Elapsed>());
        assert!(is_retryable(&*err));
        assert_eq!(service.circuit_state(), Some(CircuitState::Open));
    }

    #[tokio::test(start_paused = true)]
    async fn one_bulkhead_permit_covers_every_attempt_of_a_call() {
        fn fail_first(n: usize) -> Result<usize, io::Error> {
            if n == 1 {
                reset(n)
            } else {
                Ok(n)
            }
        }
        let (backend, calls) = backend(at_once, fail_first);
        let policy = ResiliencePolicy::new()
            .retry(retry(3, Duration::from_secs(1)))
            .bulkhead(BulkheadConfig::new().max_concurrent(1).max_queued(0));
        let service = policy.layer("ledger").layer(backend);

        let first = tokio::spawn(service.clone().oneshot(()));
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "the first call is backing off"
        );

        let err = service.clone().oneshot(()).await.unwrap_err();
        assert!(err.is::<BulkheadFull>());
        assert_eq!(first.await.unwrap().unwrap(), 2);
        assert_eq!(service.oneshot(()).await.unwrap(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn the_default_policy_changes_nothing_but_the_error_type() {
        let (backend, calls) = backend(at_once, reset);
        let service = ResiliencePolicy::default().layer("ledger").layer(backend);
        assert_eq!(service.circuit_state(), None);
        assert_eq!(service.name(), "ledger");

        let err = service.oneshot(()).await.unwrap_err();

        assert_eq!(calls.load(Ordering::SeqCst), 1);
        let err = err
            .downcast::<io::Error>()
            .expect("the service's own error");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    }

    #[tokio::test(start_paused = true)]
    async fn each_application_of_the_layer_gets_its_own_breaker() {
        let (backend, _) = backend(at_once, reset);
        let breaker = CircuitBreakerConfig::new().window_size(1).minimum_calls(1);
        let layer = ResiliencePolicy::new()
            .circuit_breaker(breaker)
            .layer("ledger");
        let first = layer.layer(backend.clone());
        let second = layer.layer(backend);

        first.clone().oneshot(()).await.unwrap_err();

        assert_eq!(first.circuit_state(), Some(CircuitState::Open));
        assert_eq!(second.circuit_state(), Some(CircuitState::Closed));
    }

    #[test]
    fn the_inner_service_is_reachable_through_every_part() {
        let everything = ResiliencePolicy::new()
            .timeout(Duration::from_secs(1))
            .retry(RetryConfig::new())
            .circuit_breaker(CircuitBreakerConfig::new())
            .bulkhead(BulkheadConfig::new());
        for policy in [everything, ResiliencePolicy::new()] {
            let mut service = Resilience::new(41_u32, "answer", &policy);
            *service.get_mut() += 1;
            assert_eq!(*service.get_ref(), 42);
            assert_eq!(service.into_inner(), 42);
        }
    }

    #[test]
    fn it_reads_the_documented_toml() {
        let toml = r#"
            timeout = "2s"

            [retry]
            max_attempts = 3
            initial_backoff = "100ms"
            max_backoff = "2s"

            [circuit_breaker]
            failure_rate_threshold = 0.5
            open_duration = "30s"

            [bulkhead]
            max_concurrent = 32
            max_queued = 64
        "#;
        let policy: ResiliencePolicy = Figment::from(Toml::string(toml)).extract().unwrap();

        let expected = ResiliencePolicy::new()
            .timeout(Duration::from_secs(2))
            .retry(
                RetryConfig::new()
                    .max_attempts(3)
                    .initial_backoff(Duration::from_millis(100))
                    .max_backoff(Duration::from_secs(2)),
            )
            .circuit_breaker(CircuitBreakerConfig::new().open_duration(Duration::from_secs(30)))
            .bulkhead(BulkheadConfig::new().max_concurrent(32).max_queued(64));
        assert_eq!(policy, expected);
        policy.validate().unwrap();
    }

    #[test]
    fn absent_parts_stay_off_and_empty_ones_take_defaults() {
        let policy: ResiliencePolicy =
            serde_json::from_str(r#"{"timeout": 250, "retry": {}}"#).unwrap();
        assert_eq!(
            policy,
            ResiliencePolicy::new()
                .timeout(Duration::from_millis(250))
                .retry(RetryConfig::default())
        );
        let policy: ResiliencePolicy = serde_json::from_str("{}").unwrap();
        assert_eq!(policy, ResiliencePolicy::default());
    }

    #[test]
    fn typos_and_bad_durations_are_reported() {
        let err = serde_json::from_str::<ResiliencePolicy>(r#"{"timeout_ms": 5}"#).unwrap_err();
        assert!(
            err.to_string().contains("unknown field `timeout_ms`"),
            "{err}"
        );
        let err = serde_json::from_str::<ResiliencePolicy>(r#"{"retry": {"max_backof": 5}}"#)
            .unwrap_err();
        assert!(
            err.to_string().contains("unknown field `max_backof`"),
            "{err}"
        );
        let err = serde_json::from_str::<ResiliencePolicy>(r#"{"timeout": "soon"}"#).unwrap_err();
        assert!(
            err.to_string()
                .contains("`soon` does not start with a number"),
            "{err}"
        );
    }

    #[test]
    fn validate_names_the_setting_at_fault() {
        let field = |policy: ResiliencePolicy| policy.validate().unwrap_err().field().to_owned();

        assert_eq!(
            field(ResiliencePolicy::new().timeout(Duration::ZERO)),
            "timeout"
        );
        assert_eq!(
            field(ResiliencePolicy::new().retry(RetryConfig::new().multiplier(0.5))),
            "retry.multiplier"
        );
        assert_eq!(
            field(ResiliencePolicy::new().retry(
                RetryConfig::new().budget(RetryBudgetConfig::new().ttl(Duration::from_secs(90)))
            )),
            "retry.budget.ttl"
        );
        assert_eq!(
            field(
                ResiliencePolicy::new()
                    .circuit_breaker(CircuitBreakerConfig::new().window_size(5).minimum_calls(6))
            ),
            "circuit_breaker.minimum_calls"
        );
        assert_eq!(
            field(ResiliencePolicy::new().bulkhead(BulkheadConfig::new().max_concurrent(0))),
            "bulkhead.max_concurrent"
        );
        let err = ResiliencePolicy::new()
            .retry(RetryConfig::new().max_attempts(0))
            .validate()
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid resilience setting `retry.max_attempts`: must be at least 1"
        );
        ResiliencePolicy::new()
            .timeout(Duration::from_secs(1))
            .retry(RetryConfig::new())
            .circuit_breaker(CircuitBreakerConfig::new())
            .bulkhead(BulkheadConfig::new())
            .validate()
            .unwrap();
    }
}
