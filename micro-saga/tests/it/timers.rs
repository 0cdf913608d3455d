//! Step timers survive restarts: an attempt in flight when its process
//! stopped times out by its deadline as the log recorded it (its start plus
//! the step's timeout), not by a timer started afresh by the process that
//! resumes it.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use micro_saga::log::{Append, NewSaga};
use micro_saga::{
    MemorySagaLog, Orchestrator, SagaDefinition, SagaInstance, SagaLog, SagaStatus, StepOutput,
    StepPolicy, Transition,
};
use time::OffsetDateTime;

const TIMEOUT: Duration = Duration::from_secs(3600);

/// One compensatable step whose action counts its calls and, when `answer`
/// is false, never answers.
fn saga(calls: Arc<AtomicU32>, answer: bool, max_attempts: u32) -> SagaDefinition<u32> {
    SagaDefinition::<u32>::builder("timed")
        .policy(
            StepPolicy::new()
                .timeout(TIMEOUT)
                .max_attempts(max_attempts)
                .initial_backoff(Duration::from_millis(10)),
        )
        .step(
            "wait-for-reply",
            move |cx| {
                let calls = calls.clone();
                async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    assert_eq!(cx.idempotency_key(), "t-1:wait-for-reply:action");
                    if !answer {
                        std::future::pending::<()>().await;
                    }
                    Ok(StepOutput::empty())
                }
            },
            |_cx| async move { Ok(()) },
        )
        .pivot("confirm", |_cx| async move { Ok(StepOutput::empty()) })
        .build()
        .unwrap()
}

/// A log holding saga `t-1` with its first step started `ago` and no
/// outcome, as a process that died while waiting leaves it.
async fn in_flight_since(ago: Duration) -> Arc<MemorySagaLog> {
    let log = Arc::new(MemorySagaLog::new());
    let started_at = OffsetDateTime::now_utc() - ago;
    let mut saga =
        SagaInstance::start("t-1", "timed", ["wait-for-reply", "confirm"], started_at).unwrap();
    let new = NewSaga::new(saga.history()[0].clone(), serde_json::json!(1), None).unwrap();
    log.create(&new).await.unwrap();
    let started = saga.step_started(started_at).unwrap();
    log.append(&Append::new(
        "t-1",
        1,
        vec![started],
        SagaStatus::Running,
        serde_json::json!(1),
    ))
    .await
    .unwrap();
    log
}

async fn recover(log: Arc<MemorySagaLog>, definition: &SagaDefinition<u32>) -> SagaInstance {
    let orchestrator = Orchestrator::builder(log)
        .definition(definition)
        .build()
        .unwrap();
    let recovery = orchestrator.recover().await.unwrap();
    let mut results = recovery.finished().await;
    assert_eq!(results.len(), 1);
    results.pop().unwrap().unwrap()
}

/// The attempt had 5 s left of its hour when the process stopped; the
/// resumed saga waits those 5 s (of the paused clock), not another hour,
/// then treats the outcome as unknown: out of attempts, it compensates.
#[tokio::test(start_paused = true)]
async fn an_attempt_in_flight_times_out_at_its_recorded_deadline_after_a_restart() {
    let log = in_flight_since(TIMEOUT - Duration::from_secs(5)).await;
    let calls = Arc::new(AtomicU32::new(0));
    let definition = saga(calls.clone(), false, 1);
    let began = tokio::time::Instant::now();
    let done = recover(log.clone(), &definition).await;
    let waited = began.elapsed();
    assert!(
        waited < Duration::from_secs(60),
        "waited {waited:?} of the paused clock: the timer started afresh"
    );
    assert_eq!(done.status(), SagaStatus::Compensated);
    assert_eq!(
        done.steps()[0].attempts(),
        1,
        "the same attempt, carried on"
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the command was sent again once"
    );
    let record = log.load("t-1").await.unwrap().unwrap();
    assert!(matches!(
        record.transitions[1..3],
        [
            Transition::StepStarted { step: 0, .. },
            Transition::StepUncertain { step: 0, .. }
        ]
    ));
}

/// The attempt's deadline passed while no process ran: it timed out, so the
/// resumed saga does not wait for it at all, and retries with a new attempt
/// (same idempotency key), which is answered.
#[tokio::test]
async fn an_attempt_whose_deadline_passed_while_down_has_timed_out() {
    let log = in_flight_since(TIMEOUT + Duration::from_secs(60)).await;
    let calls = Arc::new(AtomicU32::new(0));
    let definition = saga(calls.clone(), true, 3);
    let done = recover(log.clone(), &definition).await;
    assert_eq!(done.status(), SagaStatus::Completed);
    assert_eq!(
        done.steps()[0].attempts(),
        2,
        "the expired attempt, then one more"
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "only the new attempt called"
    );

    // Out of attempts, an expired attempt is not run again: it is uncertain.
    let log = in_flight_since(TIMEOUT + Duration::from_secs(60)).await;
    let calls = Arc::new(AtomicU32::new(0));
    let done = recover(log, &saga(calls.clone(), true, 1)).await;
    assert_eq!(done.status(), SagaStatus::Compensated);
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}
