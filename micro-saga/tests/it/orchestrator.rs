//! The orchestrator on the memory log: happy path, compensation, retries,
//! timeouts, queries, traces, metrics, concurrency and recovery.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use micro_core::trace::TraceContext;
use micro_saga::log::LogError;
use micro_saga::{
    Error, MemorySagaLog, Orchestrator, SagaDefinition, SagaLog, SagaStatus, StepError, StepOutput,
    StepPolicy, StepStatus, Transition,
};
use tokio::sync::Notify;

use crate::support::{eventually, fast_policy, order, order_saga, Journal, Order};

fn orchestrator(log: &Arc<MemorySagaLog>, saga: &SagaDefinition<Order>) -> Orchestrator {
    Orchestrator::builder(log.clone())
        .definition(saga)
        .build()
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn completes_every_step_in_order_with_idempotency_keys() {
    let journal = Journal::default();
    let saga = order_saga(&journal);
    let log = Arc::new(MemorySagaLog::new());
    let orch = orchestrator(&log, &saga);

    let done = orch.run(&saga, "o-1", order("o-1", "book")).await.unwrap();
    assert_eq!(done.status(), SagaStatus::Completed);
    assert_eq!(
        journal.lines(),
        [
            "charge:o-1:charge-payment:action",
            "reserve:o-1:reserve-inventory:action",
            "confirm:pay-o-1:o-1:confirm-order:action",
            "notify:o-1:notify:action",
        ]
    );
    let record = orch.saga("o-1").await.unwrap().unwrap();
    assert_eq!(record.status, SagaStatus::Completed);
    assert_eq!(record.transitions, done.history());
    let stored: Order = record.context_as().unwrap();
    assert_eq!(stored.payment_id.as_deref(), Some("pay-o-1"));
    assert_eq!(
        done.steps()[0].output(),
        Some(&serde_json::json!("pay-o-1"))
    );
    // Every action was logged as started before it ran, and done after.
    let names: Vec<_> = record.transitions.iter().map(|t| t.name()).collect();
    assert_eq!(
        names,
        [
            "started",
            "step_started",
            "step_succeeded",
            "step_started",
            "step_succeeded",
            "step_started",
            "step_succeeded",
            "step_started",
            "step_succeeded"
        ]
    );
    assert_eq!(orch.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_failed_reservation_refunds_the_payment() {
    let journal = Journal::default();
    let saga = order_saga(&journal);
    let log = Arc::new(MemorySagaLog::new());
    let orch = orchestrator(&log, &saga);

    let done = orch
        .run(&saga, "o-2", order("o-2", "out-of-stock"))
        .await
        .unwrap();
    assert_eq!(done.status(), SagaStatus::Compensated);
    assert_eq!(
        journal.lines(),
        [
            "charge:o-2:charge-payment:action",
            "refund:pay-o-2:o-2:charge-payment:compensation",
        ]
    );
    let reserve = &done.steps()[1];
    assert_eq!(reserve.status(), StepStatus::Failed);
    assert_eq!(reserve.error(), Some("out-of-stock is out of stock"));
    assert_eq!(reserve.attempts(), 1, "a permanent failure is not retried");
    assert_eq!(done.steps()[0].status(), StepStatus::Compensated);
    let compensated = orch.sagas_by_status(SagaStatus::Compensated).await.unwrap();
    assert_eq!(compensated.len(), 1);
    assert_eq!(compensated[0].saga_id, "o-2");
}

fn flaky_saga(failures: u32, timeouts: u32, calls: Arc<AtomicU32>) -> SagaDefinition<u32> {
    SagaDefinition::<u32>::builder("flaky")
        .policy(fast_policy().max_attempts(5))
        .step(
            "flaky",
            move |cx| {
                let calls = calls.clone();
                async move {
                    let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                    assert_eq!(cx.attempt(), n, "attempts count from 1");
                    assert_eq!(cx.idempotency_key(), "f-1:flaky:action");
                    if n <= timeouts {
                        std::future::pending::<()>().await;
                    }
                    if n <= timeouts + failures {
                        return Err(StepError::retryable("busy"));
                    }
                    Ok(StepOutput::empty())
                }
            },
            |_| async { Ok(()) },
        )
        .build()
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn transient_failures_and_timeouts_are_retried_with_backoff() {
    let calls = Arc::new(AtomicU32::new(0));
    let saga = flaky_saga(2, 1, calls.clone());
    let log = Arc::new(MemorySagaLog::new());
    let orch = Orchestrator::builder(log.clone())
        .definition(&saga)
        .build()
        .unwrap();
    let started = tokio::time::Instant::now();
    let done = orch.run(&saga, "f-1", 0).await.unwrap();
    assert_eq!(done.status(), SagaStatus::Completed);
    assert_eq!(calls.load(Ordering::SeqCst), 4);
    assert_eq!(done.steps()[0].attempts(), 4);
    // 1 s timeout, then backoffs of 10, 20 and 40 ms.
    assert_eq!(started.elapsed(), Duration::from_millis(1070));
}

#[tokio::test(start_paused = true)]
async fn a_step_that_keeps_failing_gives_up_after_max_attempts() {
    let calls = Arc::new(AtomicU32::new(0));
    let saga = flaky_saga(100, 0, calls.clone());
    let log = Arc::new(MemorySagaLog::new());
    let orch = Orchestrator::builder(log.clone())
        .definition(&saga)
        .build()
        .unwrap();
    let done = orch.run(&saga, "f-1", 0).await.unwrap();
    assert_eq!(done.status(), SagaStatus::Compensated);
    assert_eq!(calls.load(Ordering::SeqCst), 5);
    // An earlier attempt may have taken effect: the step is compensated.
    assert_eq!(done.steps()[0].status(), StepStatus::Compensated);
    assert_eq!(
        done.steps()[0].error(),
        Some("no definite answer after 5 attempts, compensating: busy")
    );
    assert_eq!(done.steps()[0].compensation_attempts(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_transient_refusal_of_the_only_attempt_has_nothing_to_undo() {
    let calls = Arc::new(AtomicU32::new(0));
    let saga = SagaDefinition::<u32>::builder("busy")
        .policy(fast_policy().max_attempts(1))
        .step(
            "busy",
            move |_| {
                let calls = calls.clone();
                async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    Err::<StepOutput<u32>, _>(StepError::retryable("busy"))
                }
            },
            |_| async { panic!("nothing took effect") },
        )
        .build()
        .unwrap();
    let log = Arc::new(MemorySagaLog::new());
    let orch = Orchestrator::builder(log.clone())
        .definition(&saga)
        .build()
        .unwrap();
    let done = orch.run(&saga, "b-1", 0).await.unwrap();
    assert_eq!(done.status(), SagaStatus::Compensated);
    assert_eq!(done.steps()[0].status(), StepStatus::Failed);
}

#[tokio::test(start_paused = true)]
async fn a_compensation_that_keeps_failing_leaves_the_saga_failed() {
    let refunds = Arc::new(AtomicU32::new(0));
    let r = refunds.clone();
    let saga = SagaDefinition::<u32>::builder("refund-fails")
        .policy(fast_policy().compensation_max_attempts(3))
        .step(
            "charge",
            |_| async { Ok(StepOutput::empty()) },
            move |_| {
                let r = r.clone();
                async move {
                    r.fetch_add(1, Ordering::SeqCst);
                    Err(StepError::retryable("the bank is down"))
                }
            },
        )
        .step(
            "reserve",
            |_| async { Err(StepError::permanent("out of stock")) },
            |_| async { Ok(()) },
        )
        .build()
        .unwrap();
    let log = Arc::new(MemorySagaLog::new());
    let orch = Orchestrator::builder(log.clone())
        .definition(&saga)
        .build()
        .unwrap();
    let done = orch.run(&saga, "r-1", 7).await.unwrap();
    assert_eq!(done.status(), SagaStatus::Failed);
    assert_eq!(refunds.load(Ordering::SeqCst), 3);
    assert_eq!(done.steps()[0].status(), StepStatus::CompensationFailed);
    assert_eq!(
        done.steps()[0].error(),
        Some("gave up after 3 attempts: the bank is down")
    );
    let attention = orch.sagas_by_status(SagaStatus::Failed).await.unwrap();
    assert_eq!(attention.len(), 1);
    assert_eq!(attention[0].saga_id, "r-1");
    assert!(orch.unfinished().await.unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_final_step_failing_for_good_cannot_be_undone() {
    let undone = Arc::new(AtomicU32::new(0));
    let u = undone.clone();
    let saga = SagaDefinition::<u32>::builder("past-the-pivot")
        .policy(fast_policy())
        .step(
            "charge",
            |_| async { Ok(StepOutput::empty()) },
            move |_| {
                u.fetch_add(1, Ordering::SeqCst);
                async { Ok(()) }
            },
        )
        .pivot("confirm", |_| async { Ok(StepOutput::empty()) })
        .final_step("notify", |_| async {
            Err(StepError::permanent("no such address"))
        })
        .build()
        .unwrap();
    let log = Arc::new(MemorySagaLog::new());
    let orch = Orchestrator::builder(log.clone())
        .definition(&saga)
        .build()
        .unwrap();
    let done = orch.run(&saga, "p-1", 1).await.unwrap();
    assert_eq!(done.status(), SagaStatus::Failed);
    assert_eq!(
        undone.load(Ordering::SeqCst),
        0,
        "nothing before the pivot is undone"
    );
    let error = done.steps()[1].error().unwrap();
    assert!(
        error.contains("`confirm` (Pivot) has no compensation"),
        "{error}"
    );
    assert_eq!(done.steps()[2].error(), Some("no such address"));
}

#[tokio::test]
async fn start_checks_the_definition_and_the_id() {
    let journal = Journal::default();
    let saga = order_saga(&journal);
    let log = Arc::new(MemorySagaLog::new());
    let empty = Orchestrator::builder(log.clone()).build().unwrap();
    let err = empty
        .start(&saga, "o-1", order("o-1", "x"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::UnknownDefinition { ref name, .. } if name == "place-order"),
        "{err:?}"
    );

    let other = SagaDefinition::<Order>::builder("place-order")
        .pivot("only", |_| async { Ok(StepOutput::empty()) })
        .build()
        .unwrap();
    let orch = orchestrator(&log, &saga);
    let err = orch
        .start(&other, "o-1", order("o-1", "x"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::DefinitionMismatch { .. }), "{err:?}");

    orch.run(&saga, "o-1", order("o-1", "x")).await.unwrap();
    let err = orch
        .start(&saga, "o-1", order("o-1", "x"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Log(LogError::AlreadyExists { .. })),
        "{err:?}"
    );
    assert_eq!(journal.lines().len(), 4, "the duplicate ran nothing");

    let err = Orchestrator::builder(log.clone())
        .definition(&saga)
        .definition(&saga)
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("two definitions"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_many_sagas_concurrently() {
    let journal = Journal::default();
    let saga = order_saga(&journal);
    let log = Arc::new(MemorySagaLog::new());
    let orch = orchestrator(&log, &saga);
    let mut handles = Vec::new();
    for i in 0..200 {
        let sku = if i % 10 == 0 { "out-of-stock" } else { "book" };
        let id = format!("o-{i}");
        handles.push(
            orch.start(&saga, id.clone(), order(&id, sku))
                .await
                .unwrap(),
        );
    }
    for handle in handles {
        let id = handle.saga_id().to_owned();
        let done = handle.finished().await.unwrap();
        let expected = if id.ends_with('0') {
            SagaStatus::Compensated
        } else {
            SagaStatus::Completed
        };
        assert_eq!(done.status(), expected, "{id}");
    }
    assert_eq!(
        orch.sagas_by_status(SagaStatus::Completed)
            .await
            .unwrap()
            .len(),
        180
    );
    assert_eq!(
        orch.sagas_by_status(SagaStatus::Compensated)
            .await
            .unwrap()
            .len(),
        20
    );
    assert_eq!(journal.lines().len(), 180 * 4 + 20 * 2);
    assert_eq!(orch.in_flight(), 0);
}

#[tokio::test]
async fn steps_run_in_the_saga_trace() {
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let s = seen.clone();
    let saga = SagaDefinition::<u32>::builder("traced")
        .step(
            "one",
            move |cx| {
                let s = s.clone();
                async move {
                    s.lock()
                        .unwrap()
                        .push((TraceContext::current(), cx.trace()));
                    Ok(StepOutput::empty())
                }
            },
            |_| async { Ok(()) },
        )
        .build()
        .unwrap();
    let log = Arc::new(MemorySagaLog::new());
    let orch = Orchestrator::builder(log.clone())
        .definition(&saga)
        .build()
        .unwrap();
    let caller = TraceContext::new_root();
    caller.scope(orch.run(&saga, "t-1", 0)).await.unwrap();

    let (current, given) = seen.lock().unwrap()[0];
    let current = current.expect("the step runs inside a trace scope");
    assert_eq!(current, given);
    assert_eq!(current.trace_id(), caller.trace_id());
    assert_ne!(current.span_id(), caller.span_id());
    let record = orch.saga("t-1").await.unwrap().unwrap();
    let stored = TraceContext::parse(record.trace_parent.as_deref().unwrap()).unwrap();
    assert_eq!(stored.trace_id(), caller.trace_id());
}

#[test]
fn records_metrics() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    metrics::with_local_recorder(&recorder, || {
        rt.block_on(async {
            let journal = Journal::default();
            let saga = order_saga(&journal);
            let log = Arc::new(MemorySagaLog::new());
            let orch = orchestrator(&log, &saga);
            orch.run(&saga, "m-1", order("m-1", "book")).await.unwrap();
            orch.run(&saga, "m-2", order("m-2", "out-of-stock"))
                .await
                .unwrap();
        })
    });

    let mut counters = std::collections::HashMap::new();
    let mut latencies = 0;
    let mut gauge = None;
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        let key = key.key();
        let labels: Vec<String> = key
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        match value {
            DebugValue::Counter(n) => {
                counters.insert(format!("{}{{{}}}", key.name(), labels.join(",")), n);
            }
            DebugValue::Histogram(values) => {
                assert_eq!(key.name(), "micro_saga_step_duration_seconds");
                latencies += values.len();
            }
            DebugValue::Gauge(g) => gauge = Some(g.into_inner()),
        }
    }
    assert_eq!(
        counters["micro_saga_started_total{definition=place-order}"],
        2
    );
    assert_eq!(
        counters["micro_saga_completed_total{definition=place-order}"],
        1
    );
    assert_eq!(
        counters["micro_saga_compensated_total{definition=place-order}"],
        1
    );
    assert!(!counters.contains_key("micro_saga_failed_total{definition=place-order}"));
    assert_eq!(
        counters["micro_saga_compensations_total{definition=place-order,step=charge-payment,outcome=ok}"],
        1
    );
    // 4 actions, then 2 actions and 1 compensation.
    assert_eq!(latencies, 7);
    assert_eq!(gauge, Some(0.0), "nothing is in flight at the end");
}

/// A saga whose second step blocks on `gate` the first time it runs.
fn gated_saga(gate: Arc<Notify>, entered: Arc<Notify>, keys: Journal) -> SagaDefinition<u32> {
    let first_time = Arc::new(AtomicU32::new(0));
    SagaDefinition::<u32>::builder("gated")
        .policy(fast_policy().no_timeout())
        .step(
            "one",
            |_| async { Ok(StepOutput::empty()) },
            |_| async { Ok(()) },
        )
        .step(
            "two",
            move |cx| {
                let (gate, entered, keys) = (gate.clone(), entered.clone(), keys.clone());
                let first = first_time.fetch_add(1, Ordering::SeqCst) == 0;
                async move {
                    keys.push(format!("{}#{}", cx.idempotency_key(), cx.attempt()));
                    if first {
                        entered.notify_one();
                        gate.notified().await;
                    }
                    Ok(StepOutput::empty())
                }
            },
            |_| async { Ok(()) },
        )
        .build()
        .unwrap()
}

#[test]
fn recover_reruns_the_step_in_doubt_after_a_crash() {
    let log = Arc::new(MemorySagaLog::new());
    let keys = Journal::default();
    let gate = Arc::new(Notify::new());
    let entered = Arc::new(Notify::new());
    let saga = gated_saga(gate, entered.clone(), keys.clone());

    // The first process starts the saga and dies while step two runs.
    let crashed = tokio::runtime::Runtime::new().unwrap();
    crashed.block_on(async {
        let orch = Orchestrator::builder(log.clone())
            .definition(&saga)
            .build()
            .unwrap();
        orch.start(&saga, "g-1", 5).await.unwrap();
        entered.notified().await;
    });
    crashed.shutdown_background();

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let record = log.load("g-1").await.unwrap().unwrap();
        assert_eq!(record.status, SagaStatus::Running);
        assert!(matches!(
            record.transitions.last(),
            Some(Transition::StepStarted { step: 1, .. })
        ));

        let orch = Orchestrator::builder(log.clone())
            .definition(&saga)
            .build()
            .unwrap();
        let recovery = orch.recover().await.unwrap();
        assert!(recovery.skipped.is_empty());
        assert_eq!(recovery.resumed.len(), 1);
        let results = recovery.finished().await;
        let done = results.into_iter().next().unwrap().unwrap();
        assert_eq!(done.status(), SagaStatus::Completed);
        assert_eq!(
            done.steps()[0].attempts(),
            1,
            "a recorded success is not rerun"
        );
        assert_eq!(done.steps()[1].attempts(), 2);
        assert!(orch.recover().await.unwrap().resumed.is_empty());
    });
    assert_eq!(keys.lines(), ["g-1:two:action#1", "g-1:two:action#2"]);
}

#[tokio::test(start_paused = true)]
async fn recover_carries_on_compensating_and_reports_unknown_definitions() {
    let log = Arc::new(MemorySagaLog::new());
    let journal = Journal::default();
    let saga = order_saga(&journal);
    // A saga that stopped between its failure and its refund.
    let mut instance = micro_saga::SagaInstance::start(
        "o-9",
        "place-order",
        saga.step_names(),
        time::OffsetDateTime::now_utc(),
    )
    .unwrap();
    let now = time::OffsetDateTime::now_utc();
    let new = micro_saga::log::NewSaga::new(
        instance.history()[0].clone(),
        serde_json::to_value(order("o-9", "book")).unwrap(),
        None,
    )
    .unwrap();
    log.create(&new).await.unwrap();
    let mut transitions = vec![instance.step_started(now).unwrap()];
    transitions.push(
        instance
            .step_succeeded(Some(serde_json::json!("pay-o-9")), now)
            .unwrap(),
    );
    transitions.push(instance.step_started(now).unwrap());
    transitions.push(instance.step_failed("out of stock", now).unwrap());
    transitions.push(instance.compensation_started(now).unwrap());
    log.append(&micro_saga::log::Append::new(
        "o-9",
        1,
        transitions,
        instance.status(),
        serde_json::to_value(order("o-9", "book")).unwrap(),
    ))
    .await
    .unwrap();
    // And one of a definition nobody registered.
    let stranger = micro_saga::SagaInstance::start("x-1", "unknown", ["a"], now).unwrap();
    log.create(
        &micro_saga::log::NewSaga::new(stranger.history()[0].clone(), serde_json::json!(1), None)
            .unwrap(),
    )
    .await
    .unwrap();

    let orch = orchestrator(&log, &saga);
    let recovery = orch.recover().await.unwrap();
    assert_eq!(recovery.skipped.len(), 1);
    assert_eq!(recovery.skipped[0].0, "x-1");
    assert!(matches!(
        recovery.skipped[0].1,
        Error::UnknownDefinition { .. }
    ));
    let done = recovery.finished().await.remove(0).unwrap();
    assert_eq!(done.status(), SagaStatus::Compensated);
    // The compensation in flight is carried on within its recorded deadline
    // (one second after it started), or, on a slow machine, has timed out by
    // then and is followed by a second attempt.
    assert!(
        (1..=2).contains(&done.steps()[0].compensation_attempts()),
        "{} attempts",
        done.steps()[0].compensation_attempts()
    );
    assert_eq!(
        journal.lines(),
        ["refund:pay-o-9:o-9:charge-payment:compensation"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_orchestrators_cannot_both_advance_a_saga() {
    let log = Arc::new(MemorySagaLog::new());
    let keys = Journal::default();
    let gate = Arc::new(Notify::new());
    let entered = Arc::new(Notify::new());
    let saga = gated_saga(gate.clone(), entered.clone(), keys.clone());
    let first = Orchestrator::builder(log.clone())
        .definition(&saga)
        .build()
        .unwrap();
    let second = Orchestrator::builder(log.clone())
        .definition(&saga)
        .build()
        .unwrap();

    let handle = first.start(&saga, "g-2", 1).await.unwrap();
    entered.notified().await;
    // The second orchestrator takes the saga over while the first is stuck.
    let done = second.recover().await.unwrap().finished().await;
    assert_eq!(done[0].as_ref().unwrap().status(), SagaStatus::Completed);
    gate.notify_one();
    let err = handle.finished().await.unwrap_err();
    assert!(
        matches!(err, Error::Log(ref e) if e.is_conflict()),
        "{err:?}"
    );
    let record = log.load("g-2").await.unwrap().unwrap();
    assert_eq!(record.status, SagaStatus::Completed);
    eventually(Duration::from_secs(5), || first.in_flight() == 0).await;
}

#[tokio::test(start_paused = true)]
async fn policies_come_from_configuration() {
    let policy: StepPolicy =
        serde_json::from_str(r#"{"timeout": "50ms", "max_attempts": 2, "initial_backoff": "1ms", "randomization_factor": 0.0}"#)
            .unwrap();
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let saga = SagaDefinition::<u32>::builder("slow")
        .policy(policy)
        .pivot("slow", move |_| {
            c.fetch_add(1, Ordering::SeqCst);
            async {
                tokio::time::sleep(Duration::from_secs(1)).await;
                Ok(StepOutput::empty())
            }
        })
        .build()
        .unwrap();
    let log = Arc::new(MemorySagaLog::new());
    let orch = Orchestrator::builder(log.clone())
        .definition(&saga)
        .build()
        .unwrap();
    let started = tokio::time::Instant::now();
    let done = orch.run(&saga, "s-1", 0).await.unwrap();
    // A pivot without a compensation whose outcome stayed unknown cannot be
    // undone: the saga needs attention instead of passing for compensated.
    assert_eq!(done.status(), SagaStatus::Failed);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(done.steps()[0].status(), StepStatus::CompensationFailed);
    let uncertain = done
        .history()
        .iter()
        .find_map(|t| match t {
            Transition::StepUncertain { error, .. } => Some(error.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(
        uncertain,
        "no definite answer after 2 attempts, compensating: step timed out after 50ms"
    );
    assert_eq!(started.elapsed(), Duration::from_millis(101));
}

/// A saga of forward recovery: once the pivot passed, its final steps are retried until
/// done, far past any bounded policy's attempts, and a definite refusal still fails it.
#[tokio::test(start_paused = true)]
async fn until_done_steps_are_retried_past_any_bound_and_refusals_still_fail() {
    let flaky_failures = Arc::new(AtomicU32::new(0));
    let failures = flaky_failures.clone();
    let forward = fast_policy()
        .max_backoff(Duration::from_secs(1))
        .until_done();
    let saga = SagaDefinition::<u32>::builder("cancel")
        .policy(fast_policy())
        .pivot("refund", |_| async { Ok(StepOutput::empty()) })
        .policy(forward.clone())
        .final_step("release", move |cx| {
            let failures = failures.clone();
            async move {
                // Down for the first 40 attempts: a refused connection, then lost answers.
                let attempt = cx.attempt();
                if attempt <= 20 {
                    failures.fetch_add(1, Ordering::SeqCst);
                    return Err(StepError::retryable("inventory is down"));
                }
                if attempt <= 40 {
                    failures.fetch_add(1, Ordering::SeqCst);
                    return Err(StepError::unknown("connection lost after the request"));
                }
                Ok(StepOutput::empty())
            }
        })
        .final_step("record", |cx| async move {
            if *cx.data() == 7 {
                return Err(StepError::permanent("the order is gone"));
            }
            // Times out once, then answers.
            if cx.attempt() == 1 {
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
            Ok(StepOutput::empty())
        })
        .build()
        .unwrap();
    assert!(saga.policy("release").unwrap().is_until_done());
    assert!(!saga.policy("refund").unwrap().is_until_done());
    let log = Arc::new(MemorySagaLog::new());
    let orch = Orchestrator::builder(log.clone())
        .definition(&saga)
        .build()
        .unwrap();

    let done = orch.run(&saga, "c-1", 1).await.unwrap();
    assert_eq!(done.status(), SagaStatus::Completed, "{:?}", done.history());
    assert_eq!(flaky_failures.load(Ordering::SeqCst), 40);
    assert_eq!(done.steps()[1].attempts(), 41);
    assert_eq!(done.steps()[2].attempts(), 2);

    let refused = orch.run(&saga, "c-2", 7).await.unwrap();
    assert_eq!(refused.status(), SagaStatus::Failed);
    assert_eq!(refused.steps()[2].attempts(), 1);
    assert!(
        refused.steps()[2]
            .error()
            .is_some_and(|e| e.contains("the order is gone")),
        "{:?}",
        refused.steps()[2]
    );
}
