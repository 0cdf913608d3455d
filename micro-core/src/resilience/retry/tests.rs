use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tower::{service_fn, ServiceExt};
use tower_layer::Layer;

use super::*;
use crate::error::permanent;

type Calls = Arc<Mutex<Vec<Instant>>>;

/// A backend that fails its first `failures` calls with `error()`, then succeeds, and
/// records when each call arrived.
fn flaky(
    failures: usize,
    error: fn() -> BoxError,
) -> (
    impl Service<&'static str, Response = &'static str, Error = BoxError> + Clone,
    Calls,
) {
    let calls = Calls::default();
    let seen = calls.clone();
    let service = service_fn(move |_request: &'static str| {
        let seen = seen.clone();
        async move {
            let mut seen = seen.lock().unwrap();
            seen.push(Instant::now());
            if seen.len() <= failures {
                Err(error())
            } else {
                Ok("ok")
            }
        }
    });
    (service, calls)
}

fn reset() -> BoxError {
    io::Error::from(io::ErrorKind::ConnectionReset).into()
}

fn gaps(calls: &Calls) -> Vec<Duration> {
    let calls = calls.lock().unwrap();
    calls.windows(2).map(|pair| pair[1] - pair[0]).collect()
}

fn generous() -> RetryBudgetConfig {
    RetryBudgetConfig::new().min_retries_per_sec(1000)
}

fn steady(max_attempts: u32) -> RetryConfig {
    RetryConfig::new()
        .max_attempts(max_attempts)
        .initial_backoff(Duration::from_millis(100))
        .multiplier(2.0)
        .max_backoff(Duration::from_millis(300))
        .randomization_factor(0.0)
        .budget(generous())
}

#[tokio::test(start_paused = true)]
async fn retryable_errors_are_retried_until_success() {
    let (backend, calls) = flaky(2, reset);

    let response = Retry::new(backend, steady(5)).oneshot("GET").await.unwrap();

    assert_eq!(response, "ok");
    assert_eq!(
        gaps(&calls),
        [Duration::from_millis(100), Duration::from_millis(200)]
    );
}

#[tokio::test(start_paused = true)]
async fn delays_grow_up_to_the_ceiling_and_attempts_stop_at_the_maximum() {
    let (backend, calls) = flaky(usize::MAX, reset);

    let err = RetryLayer::new(steady(5))
        .layer(backend)
        .oneshot("GET")
        .await
        .unwrap_err();

    let err = err
        .downcast::<io::Error>()
        .expect("the last error, unchanged");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    let millis: Vec<u128> = gaps(&calls).iter().map(Duration::as_millis).collect();
    assert_eq!(millis, [100, 200, 300, 300]);
}

#[tokio::test(start_paused = true)]
async fn jittered_delays_stay_within_their_bounds() {
    let config = RetryConfig::new()
        .max_attempts(6)
        .initial_backoff(Duration::from_millis(100))
        .multiplier(2.0)
        .max_backoff(Duration::from_secs(1))
        .randomization_factor(0.5)
        .budget(generous());
    let nominal: [f64; 5] = [100.0, 200.0, 400.0, 800.0, 1000.0];
    let mut jittered = false;

    for _ in 0..20 {
        let (backend, calls) = flaky(usize::MAX, reset);
        Retry::new(backend, config.clone())
            .oneshot("GET")
            .await
            .unwrap_err();

        let gaps = gaps(&calls);
        assert_eq!(gaps.len(), nominal.len());
        for (gap, nominal) in gaps.iter().zip(nominal) {
            let millis = gap.as_secs_f64() * 1000.0;
            // The timer rounds a deadline up to the next millisecond.
            let (low, high) = (nominal * 0.5, (nominal * 1.5).min(1000.0) + 1.0);
            assert!(
                (low..=high).contains(&millis),
                "{millis}ms not in {low}..={high}"
            );
            jittered |= (millis - nominal).abs() > 1.0;
        }
    }
    assert!(jittered, "no delay strayed from its nominal value");
}

#[tokio::test(start_paused = true)]
async fn errors_that_are_not_retryable_are_returned_at_once() {
    fn not_found() -> BoxError {
        io::Error::from(io::ErrorKind::NotFound).into()
    }
    fn vetoed() -> BoxError {
        permanent(reset())
    }
    fn unknown() -> BoxError {
        "invalid order".into()
    }

    for error in [not_found, vetoed, unknown] {
        let (backend, calls) = flaky(usize::MAX, error);
        let err = Retry::new(backend, steady(5))
            .oneshot("GET")
            .await
            .unwrap_err();
        assert_eq!(calls.lock().unwrap().len(), 1, "{err}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_single_attempt_never_retries() {
    let (backend, calls) = flaky(usize::MAX, reset);
    Retry::new(backend, steady(1))
        .oneshot("GET")
        .await
        .unwrap_err();
    assert_eq!(calls.lock().unwrap().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn retries_stop_when_the_budget_is_spent_and_resume_when_it_refills() {
    let (backend, calls) = flaky(usize::MAX, reset);
    let budget = RetryBudgetConfig::new()
        .ttl(Duration::from_secs(1))
        .min_retries_per_sec(1)
        .retry_ratio(0.0);
    let retry = Retry::new(backend, steady(5).budget(budget));
    let attempts = |before: usize| calls.lock().unwrap().len() - before;

    retry.clone().oneshot("GET").await.unwrap_err();
    assert_eq!(attempts(0), 2, "the reserve allows one retry");

    retry.clone().oneshot("GET").await.unwrap_err();
    assert_eq!(attempts(2), 1, "the budget is spent, and shared by clones");

    tokio::time::sleep(Duration::from_secs(2)).await;
    retry.oneshot("GET").await.unwrap_err();
    assert_eq!(attempts(3), 2, "the reserve is back once the retry expired");
}

#[tokio::test(start_paused = true)]
async fn calls_earn_retries() {
    let budget = |ratio| {
        RetryBudgetConfig::new()
            .min_retries_per_sec(0)
            .retry_ratio(ratio)
    };

    let (backend, calls) = flaky(usize::MAX, reset);
    Retry::new(backend, steady(5).budget(budget(0.0)))
        .oneshot("GET")
        .await
        .unwrap_err();
    assert_eq!(calls.lock().unwrap().len(), 1, "no reserve, nothing earned");

    let (backend, calls) = flaky(usize::MAX, reset);
    Retry::new(backend, steady(5).budget(budget(1.0)))
        .oneshot("GET")
        .await
        .unwrap_err();
    assert_eq!(calls.lock().unwrap().len(), 2, "one call earns one retry");
}

#[test]
fn out_of_range_settings_are_clamped() {
    let config = RetryConfig::new()
        .max_attempts(0)
        .multiplier(0.5)
        .randomization_factor(f64::NAN)
        .budget(
            RetryBudgetConfig::new()
                .ttl(Duration::ZERO)
                .retry_ratio(-1.0),
        );
    let retry = Retry::new((), config);

    assert_eq!(retry.config().max_attempts, 1);
    assert_eq!(retry.config().multiplier, 1.0);
    assert_eq!(retry.config().randomization_factor, 0.0);
    assert_eq!(retry.config().budget.ttl, Duration::from_secs(1));
    assert_eq!(retry.config().budget.retry_ratio, 0.0);
}
