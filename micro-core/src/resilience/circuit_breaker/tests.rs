use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics::{Counter, CounterFn, Gauge, GaugeFn, Histogram, Key, KeyName, Metadata};
use metrics::{Recorder, SharedString, Unit};
use tower::{service_fn, ServiceExt};
use tower_layer::Layer;

use super::*;
use crate::error::is_retryable;

#[derive(Debug)]
enum Call {
    Succeed,
    Fail,
    /// Succeeds after a while.
    Slow(Duration),
    /// Never finishes.
    Hang,
}

type Backend = CircuitBreaker<tower::util::BoxCloneService<Call, (), io::Error>>;

fn breaker(config: CircuitBreakerConfig) -> (Backend, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    let backend = service_fn(move |call: Call| {
        seen.fetch_add(1, Ordering::SeqCst);
        async move {
            match call {
                Call::Succeed => Ok(()),
                Call::Fail => Err(io::Error::other("boom")),
                Call::Slow(delay) => {
                    tokio::time::sleep(delay).await;
                    Ok(())
                }
                Call::Hang => std::future::pending().await,
            }
        }
    });
    let backend = tower::util::BoxCloneService::new(backend);
    (CircuitBreaker::named(backend, "ledger", config), calls)
}

async fn call(breaker: &mut Backend, call: Call) -> Result<(), BoxError> {
    breaker.ready().await?.call(call).await
}

fn config() -> CircuitBreakerConfig {
    CircuitBreakerConfig::new()
        .failure_rate_threshold(0.5)
        .window_size(4)
        .minimum_calls(4)
        .open_duration(Duration::from_secs(10))
        .half_open_calls(2)
}

async fn opened(config: CircuitBreakerConfig) -> (Backend, Arc<AtomicUsize>) {
    let (mut breaker, calls) = breaker(config.clone());
    for _ in 0..config.minimum_calls {
        call(&mut breaker, Call::Fail).await.unwrap_err();
    }
    assert_eq!(breaker.state(), CircuitState::Open);
    (breaker, calls)
}

#[tokio::test(start_paused = true)]
async fn failures_are_judged_only_once_the_minimum_calls_are_in() {
    let (mut breaker, _) = breaker(config().window_size(10).minimum_calls(4));

    for _ in 0..3 {
        call(&mut breaker, Call::Fail).await.unwrap_err();
        assert_eq!(breaker.state(), CircuitState::Closed);
    }
    call(&mut breaker, Call::Fail).await.unwrap_err();
    assert_eq!(breaker.state(), CircuitState::Open);
}

#[tokio::test(start_paused = true)]
async fn it_opens_when_the_failure_rate_over_the_window_reaches_the_threshold() {
    let (mut breaker, _) = breaker(config().failure_rate_threshold(0.75));
    use Call::{Fail, Succeed};

    // The two early failures slide out of the window before the rate is reached.
    for outcome in [Fail, Fail, Succeed, Succeed, Succeed, Succeed, Fail, Fail] {
        let _ = call(&mut breaker, outcome).await;
        assert_eq!(breaker.state(), CircuitState::Closed);
    }
    call(&mut breaker, Fail).await.unwrap_err();
    assert_eq!(breaker.state(), CircuitState::Open);
}

#[tokio::test(start_paused = true)]
async fn an_open_breaker_rejects_without_calling_the_service() {
    let (mut breaker, calls) = opened(config()).await;

    let err = call(&mut breaker, Call::Succeed).await.unwrap_err();

    assert_eq!(calls.load(Ordering::SeqCst), 4);
    let open = err
        .downcast_ref::<CircuitOpen>()
        .expect("a CircuitOpen error");
    assert_eq!(open.name(), Some("ledger"));
    assert_eq!(err.to_string(), "circuit breaker `ledger` is open");
    assert!(!is_retryable(&*err));
}

#[tokio::test(start_paused = true)]
async fn it_turns_half_open_after_the_open_duration() {
    let (breaker, _) = opened(config()).await;

    tokio::time::advance(Duration::from_secs(10) - Duration::from_millis(1)).await;
    assert_eq!(breaker.state(), CircuitState::Open);
    tokio::time::advance(Duration::from_millis(1)).await;
    assert_eq!(breaker.state(), CircuitState::HalfOpen);
}

#[tokio::test(start_paused = true)]
async fn it_closes_once_every_trial_call_succeeded() {
    let (mut breaker, _) = opened(config()).await;
    tokio::time::advance(Duration::from_secs(10)).await;

    call(&mut breaker, Call::Succeed).await.unwrap();
    assert_eq!(breaker.state(), CircuitState::HalfOpen);
    call(&mut breaker, Call::Succeed).await.unwrap();
    assert_eq!(breaker.state(), CircuitState::Closed);

    // The window starts empty: one failure is below the minimum calls.
    call(&mut breaker, Call::Fail).await.unwrap_err();
    assert_eq!(breaker.state(), CircuitState::Closed);
}

#[tokio::test(start_paused = true)]
async fn a_failed_trial_opens_it_again_for_a_full_open_duration() {
    let (mut breaker, _) = opened(config()).await;
    tokio::time::advance(Duration::from_secs(10)).await;

    call(&mut breaker, Call::Succeed).await.unwrap();
    call(&mut breaker, Call::Fail).await.unwrap_err();
    assert_eq!(breaker.state(), CircuitState::Open);

    tokio::time::advance(Duration::from_secs(10) - Duration::from_millis(1)).await;
    assert_eq!(breaker.state(), CircuitState::Open);
    tokio::time::advance(Duration::from_millis(1)).await;
    assert_eq!(breaker.state(), CircuitState::HalfOpen);
}

#[tokio::test(start_paused = true)]
async fn half_open_admits_only_the_trial_calls_and_a_dropped_trial_frees_its_slot() {
    let (mut breaker, calls) = opened(config().half_open_calls(1)).await;
    tokio::time::advance(Duration::from_secs(10)).await;

    let hanging = breaker.ready().await.unwrap().call(Call::Hang);
    let err = call(&mut breaker, Call::Succeed).await.unwrap_err();
    assert!(err.is::<CircuitOpen>());
    assert_eq!(calls.load(Ordering::SeqCst), 5);

    drop(hanging);
    call(&mut breaker, Call::Succeed).await.unwrap();
    assert_eq!(breaker.state(), CircuitState::Closed);
}

#[tokio::test(start_paused = true)]
async fn a_call_admitted_before_a_state_change_does_not_count_after_it() {
    let (mut breaker, _) = breaker(config().minimum_calls(2).half_open_calls(1));

    let slow = breaker
        .ready()
        .await
        .unwrap()
        .call(Call::Slow(Duration::from_secs(15)));
    let slow = tokio::spawn(slow);
    call(&mut breaker, Call::Fail).await.unwrap_err();
    call(&mut breaker, Call::Fail).await.unwrap_err();
    assert_eq!(breaker.state(), CircuitState::Open);
    tokio::time::advance(Duration::from_secs(10)).await;
    assert_eq!(breaker.state(), CircuitState::HalfOpen);

    slow.await.unwrap().unwrap();
    assert_eq!(breaker.state(), CircuitState::HalfOpen);
}

#[tokio::test(start_paused = true)]
async fn clones_share_one_state_but_each_layered_service_has_its_own() {
    let (breaker, _) = opened(config()).await;
    let mut clone = breaker.clone();
    assert_eq!(clone.state(), CircuitState::Open);
    assert!(call(&mut clone, Call::Succeed).await.is_err());

    let layer = CircuitBreakerLayer::new(config());
    let mut first = layer.layer(breaker.clone().into_inner());
    let second = layer.layer(breaker.into_inner());
    for _ in 0..4 {
        first
            .ready()
            .await
            .unwrap()
            .call(Call::Fail)
            .await
            .unwrap_err();
    }
    assert_eq!(first.state(), CircuitState::Open);
    assert_eq!(second.state(), CircuitState::Closed);
    assert_eq!(second.name(), None);
}

#[test]
fn out_of_range_settings_are_clamped() {
    let config = CircuitBreakerConfig::new()
        .failure_rate_threshold(7.0)
        .window_size(0)
        .minimum_calls(5)
        .half_open_calls(0);
    let breaker = CircuitBreaker::new((), config);

    assert_eq!(breaker.config().failure_rate_threshold, 1.0);
    assert_eq!(breaker.config().window_size, 1);
    assert_eq!(breaker.config().minimum_calls, 1);
    assert_eq!(breaker.config().half_open_calls, 1);
}

/// Records what is done to gauges and counters, as `name{label=value,...}` keys.
#[derive(Default)]
struct Recorded {
    gauges: Mutex<Vec<(String, f64)>>,
    counters: Mutex<Vec<(String, u64)>>,
}

struct TestRecorder(Arc<Recorded>);

struct Handle {
    key: String,
    recorded: Arc<Recorded>,
}

fn render(key: &Key) -> String {
    let labels: Vec<String> = key
        .labels()
        .map(|label| format!("{}={}", label.key(), label.value()))
        .collect();
    format!("{}{{{}}}", key.name(), labels.join(","))
}

impl Recorder for TestRecorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(Arc::new(Handle {
            key: render(key),
            recorded: self.0.clone(),
        }))
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(Arc::new(Handle {
            key: render(key),
            recorded: self.0.clone(),
        }))
    }

    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

// The breaker's state gauge is only ever set, and its counter only incremented: any other
// call is a bug that fails the test.
impl GaugeFn for Handle {
    fn increment(&self, _: f64) {
        panic!(
            "{} was incremented; a breaker sets its state gauge",
            self.key
        )
    }
    fn decrement(&self, _: f64) {
        panic!(
            "{} was decremented; a breaker sets its state gauge",
            self.key
        )
    }
    fn set(&self, value: f64) {
        let entry = (self.key.clone(), value);
        self.recorded.gauges.lock().unwrap().push(entry);
    }
}

impl CounterFn for Handle {
    fn increment(&self, value: u64) {
        let entry = (self.key.clone(), value);
        self.recorded.counters.lock().unwrap().push(entry);
    }
    fn absolute(&self, _: u64) {
        panic!(
            "{} was set absolutely; a breaker increments its counter",
            self.key
        )
    }
}

#[tokio::test(start_paused = true)]
async fn a_named_breaker_exports_its_state_and_transitions() {
    let recorded = Arc::new(Recorded::default());
    let recorder = TestRecorder(recorded.clone());
    let _guard = metrics::set_default_local_recorder(&recorder);

    let (mut breaker, _) = opened(config().half_open_calls(1)).await;
    tokio::time::advance(Duration::from_secs(10)).await;
    call(&mut breaker, Call::Succeed).await.unwrap();

    let state = "micro_circuit_breaker_state{name=ledger}";
    let gauges = recorded.gauges.lock().unwrap().clone();
    let expected: Vec<(String, f64)> = [0.0, 1.0, 2.0, 0.0]
        .into_iter()
        .map(|value| (state.to_owned(), value))
        .collect();
    assert_eq!(gauges, expected);

    let counters = recorded.counters.lock().unwrap().clone();
    let transition = |from, to| {
        (
            format!("micro_circuit_breaker_transitions_total{{name=ledger,from={from},to={to}}}"),
            1,
        )
    };
    assert_eq!(
        counters,
        [
            transition("closed", "open"),
            transition("open", "half_open"),
            transition("half_open", "closed"),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn an_unnamed_breaker_exports_nothing() {
    let recorded = Arc::new(Recorded::default());
    let recorder = TestRecorder(recorded.clone());
    let _guard = metrics::set_default_local_recorder(&recorder);

    let mut breaker = CircuitBreaker::new(
        service_fn(|()| async { Err::<(), _>(io::Error::other("boom")) }),
        config(),
    );
    for _ in 0..4 {
        breaker.ready().await.unwrap().call(()).await.unwrap_err();
    }

    assert_eq!(breaker.state(), CircuitState::Open);
    assert!(recorded.gauges.lock().unwrap().is_empty());
    assert!(recorded.counters.lock().unwrap().is_empty());
}
