//! One conformance suite for every `SagaLog` backend.

use std::sync::Arc;

use micro_saga::log::{Append, LogError, NewSaga};
use std::time::Duration;

use micro_saga::{
    idempotency_key, Orchestrator, Phase, SagaDefinition, SagaInstance, SagaLog, SagaStatus,
    StepError, StepOutput, StepPolicy, StepStatus, Transition,
};
use serde_json::json;
use time::macros::datetime;
use time::OffsetDateTime;

const T0: OffsetDateTime = datetime!(2024-05-01 10:00:00.123456789 UTC);
const TRACE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn at(seconds: i64) -> OffsetDateTime {
    T0 + time::Duration::seconds(seconds)
}

fn new_saga(id: &str) -> (NewSaga, SagaInstance) {
    let saga = SagaInstance::start(id, "place-order", ["charge", "reserve"], T0).unwrap();
    let new = NewSaga::new(
        saga.history()[0].clone(),
        json!({"order": id, "cents": 4200}),
        Some(TRACE.to_owned()),
    )
    .unwrap();
    (new, saga)
}

/// Applies `transitions` to `saga` and appends them to the log.
async fn advance(
    log: &dyn SagaLog,
    saga: &mut SagaInstance,
    transitions: Vec<Transition>,
) -> Result<u64, LogError> {
    let version = saga.history().len() as u64;
    let mut next = saga.clone();
    for t in &transitions {
        next.apply(t.clone()).unwrap();
    }
    let append = Append::new(
        saga.id(),
        version,
        transitions,
        next.status(),
        json!({"version": next.history().len()}),
    );
    let new_version = log.append(&append).await?;
    *saga = next;
    Ok(new_version)
}

pub(crate) async fn create_then_load(log: Arc<dyn SagaLog>) {
    let (new, saga) = new_saga("s-1");
    log.create(&new).await.unwrap();
    let record = log
        .load("s-1")
        .await
        .unwrap()
        .expect("the saga was created");
    assert_eq!(record.saga_id, "s-1");
    assert_eq!(record.definition, "place-order");
    assert_eq!(record.status, SagaStatus::Running);
    assert_eq!(record.context, json!({"order": "s-1", "cents": 4200}));
    assert_eq!(record.trace_parent.as_deref(), Some(TRACE));
    assert_eq!(record.version(), 1);
    assert_eq!(record.transitions, saga.history());
    assert_eq!(record.instance().unwrap(), saga);
    assert!(log.load("s-2").await.unwrap().is_none());
}

pub(crate) async fn create_is_unique_by_id(log: Arc<dyn SagaLog>) {
    let (new, _) = new_saga("s-1");
    log.create(&new).await.unwrap();
    let err = log.create(&new).await.unwrap_err();
    assert!(
        matches!(&err, LogError::AlreadyExists { saga_id, .. } if saga_id == "s-1"),
        "{err:?}"
    );
    assert_eq!(log.load("s-1").await.unwrap().unwrap().version(), 1);
}

pub(crate) async fn append_extends_history_context_and_status(log: Arc<dyn SagaLog>) {
    let (new, mut saga) = new_saga("s-1");
    log.create(&new).await.unwrap();
    let v = advance(
        &*log,
        &mut saga,
        vec![Transition::StepStarted { step: 0, at: at(1) }],
    )
    .await
    .unwrap();
    assert_eq!(v, 2);
    let v = advance(
        &*log,
        &mut saga,
        vec![
            Transition::StepSucceeded {
                step: 0,
                output: Some(json!({"payment_id": "p-1"})),
                at: at(2),
            },
            Transition::StepStarted { step: 1, at: at(3) },
            Transition::StepFailed {
                step: 1,
                error: "out of stock".into(),
                at: at(4),
            },
        ],
    )
    .await
    .unwrap();
    assert_eq!(v, 5);
    let record = log.load("s-1").await.unwrap().unwrap();
    assert_eq!(record.version(), 5);
    assert_eq!(record.status, SagaStatus::Compensating);
    assert_eq!(record.context, json!({"version": 5}));
    assert_eq!(record.transitions, saga.history());
    assert_eq!(record.instance().unwrap(), saga);
    assert_eq!(record.trace_parent.as_deref(), Some(TRACE));
}

pub(crate) async fn stale_writes_conflict_and_change_nothing(log: Arc<dyn SagaLog>) {
    let (new, mut saga) = new_saga("s-1");
    log.create(&new).await.unwrap();
    advance(
        &*log,
        &mut saga,
        vec![Transition::StepStarted { step: 0, at: at(1) }],
    )
    .await
    .unwrap();
    for expected in [0, 1, 3] {
        let stale = Append::new(
            "s-1",
            expected,
            vec![Transition::StepStarted { step: 0, at: at(9) }],
            SagaStatus::Running,
            json!("stale"),
        );
        let err = log.append(&stale).await.unwrap_err();
        assert!(
            matches!(err, LogError::Conflict { expected: e, actual: 2, .. } if e == expected),
            "{err:?}"
        );
        assert!(err.is_conflict() && !err.is_retryable());
    }
    let record = log.load("s-1").await.unwrap().unwrap();
    assert_eq!(record.transitions, saga.history());
    assert_eq!(record.context, json!({"version": 2}));
}

pub(crate) async fn bad_writes_are_refused(log: Arc<dyn SagaLog>) {
    let unknown = Append::new(
        "nobody",
        1,
        vec![Transition::StepStarted { step: 0, at: at(1) }],
        SagaStatus::Running,
        json!(null),
    );
    let err = log.append(&unknown).await.unwrap_err();
    assert!(matches!(err, LogError::NotFound { .. }), "{err:?}");

    let (new, saga) = new_saga("s-1");
    log.create(&new).await.unwrap();
    let empty = Append::new("s-1", 1, vec![], SagaStatus::Running, json!(null));
    let err = log.append(&empty).await.unwrap_err();
    assert!(matches!(err, LogError::InvalidWrite { .. }), "{err:?}");
    let restart = Append::new(
        "s-1",
        1,
        vec![saga.history()[0].clone()],
        SagaStatus::Running,
        json!(null),
    );
    let err = log.append(&restart).await.unwrap_err();
    assert!(matches!(err, LogError::InvalidWrite { .. }), "{err:?}");
    assert_eq!(log.load("s-1").await.unwrap().unwrap().version(), 1);
}

pub(crate) async fn one_of_two_racing_writers_wins(log: Arc<dyn SagaLog>) {
    let (new, _) = new_saga("s-1");
    log.create(&new).await.unwrap();
    let writes = (0..8).map(|i| {
        let log = log.clone();
        tokio::spawn(async move {
            let append = Append::new(
                "s-1",
                1,
                vec![Transition::StepStarted { step: 0, at: at(i) }],
                SagaStatus::Running,
                json!({"writer": i}),
            );
            log.append(&append).await
        })
    });
    let mut won = Vec::new();
    for (i, write) in writes.enumerate() {
        match write.await.unwrap() {
            Ok(version) => {
                assert_eq!(version, 2);
                won.push(i as i64);
            }
            Err(err) => assert!(err.is_conflict(), "{err:?}"),
        }
    }
    assert_eq!(won.len(), 1, "exactly one writer wins: {won:?}");
    let record = log.load("s-1").await.unwrap().unwrap();
    assert_eq!(record.version(), 2);
    assert_eq!(record.context, json!({"writer": won[0]}));
    assert_eq!(record.transitions[1].at(), at(won[0]));
}

pub(crate) async fn lists_by_status_oldest_first(log: Arc<dyn SagaLog>) {
    let mut sagas = Vec::new();
    for id in ["a", "b", "c", "d"] {
        let (new, saga) = new_saga(id);
        log.create(&new).await.unwrap();
        sagas.push(saga);
    }
    let ids = |list: Vec<micro_saga::SagaSummary>| {
        list.into_iter().map(|s| s.saga_id).collect::<Vec<_>>()
    };
    assert_eq!(ids(log.unfinished().await.unwrap()), ["a", "b", "c", "d"]);

    // b completes its two steps, c fails with nothing to undo, d compensates.
    let [_, b, c, d] = &mut sagas[..] else {
        unreachable!()
    };
    for step in 0..2 {
        advance(
            &*log,
            b,
            vec![
                Transition::StepStarted { step, at: at(1) },
                Transition::StepSucceeded {
                    step,
                    output: None,
                    at: at(2),
                },
            ],
        )
        .await
        .unwrap();
    }
    advance(
        &*log,
        c,
        vec![
            Transition::StepStarted { step: 0, at: at(1) },
            Transition::StepFailed {
                step: 0,
                error: "declined".into(),
                at: at(2),
            },
        ],
    )
    .await
    .unwrap();
    advance(
        &*log,
        d,
        vec![
            Transition::StepStarted { step: 0, at: at(1) },
            Transition::StepSucceeded {
                step: 0,
                output: None,
                at: at(2),
            },
            Transition::Aborted {
                reason: "cancelled".into(),
                at: at(3),
            },
        ],
    )
    .await
    .unwrap();

    assert_eq!(ids(log.unfinished().await.unwrap()), ["a", "d"]);
    let running = log.by_status(SagaStatus::Running).await.unwrap();
    assert_eq!(ids(running.clone()), ["a"]);
    assert_eq!(running[0].definition, "place-order");
    assert_eq!(running[0].version, 1);
    assert_eq!(
        ids(log.by_status(SagaStatus::Completed).await.unwrap()),
        ["b"]
    );
    let compensated = log.by_status(SagaStatus::Compensated).await.unwrap();
    assert_eq!(ids(compensated.clone()), ["c"]);
    assert_eq!(compensated[0].version, 3);
    assert_eq!(
        ids(log.by_status(SagaStatus::Compensating).await.unwrap()),
        ["d"]
    );
    assert!(log.by_status(SagaStatus::Failed).await.unwrap().is_empty());
}

/// A payment participant that honours idempotency keys: a charge is captured
/// once per key, and a refund of a key undoes it, or does nothing when
/// nothing was captured.
#[derive(Debug, Default)]
struct Bank {
    captured: std::sync::Mutex<std::collections::BTreeSet<String>>,
    refunded: std::sync::Mutex<std::collections::BTreeSet<String>>,
    calls: std::sync::atomic::AtomicU32,
}

impl Bank {
    fn capture(&self, key: &str) -> u32 {
        self.captured.lock().unwrap().insert(key.to_owned());
        self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1
    }

    /// Every captured charge was refunded, or the saga completed.
    fn assert_money_kept(&self, completed: bool) {
        let captured = self.captured.lock().unwrap().clone();
        let refunded = self.refunded.lock().unwrap().clone();
        if completed {
            assert!(
                refunded.is_empty(),
                "a completed saga refunded {refunded:?}"
            );
        } else {
            assert!(
                captured.is_subset(&refunded),
                "captured {captured:?}, refunded {refunded:?}"
            );
        }
    }
}

/// charge (refund by key) → reserve (fails for good when `fail_reserve`);
/// the charge is captured on every attempt, and answered only from attempt
/// `answer_from` on (later ones time out after capturing).
fn late_charge_saga(bank: Arc<Bank>, answer_from: u32, fail_reserve: bool) -> SagaDefinition<u32> {
    let refunds = bank.clone();
    SagaDefinition::<u32>::builder("late-charge")
        .policy(
            StepPolicy::new()
                .timeout(Duration::from_millis(50))
                .max_attempts(3)
                .initial_backoff(Duration::from_millis(5))
                .randomization_factor(0.0),
        )
        .step(
            "charge",
            move |cx| {
                let bank = bank.clone();
                async move {
                    let attempt = bank.capture(cx.idempotency_key());
                    if attempt < answer_from {
                        // Captured, but the answer never arrives.
                        std::future::pending::<()>().await;
                    }
                    StepOutput::json(&cx.idempotency_key())
                }
            },
            move |cx| {
                let bank = refunds.clone();
                async move {
                    // Without an output (the charge's outcome stayed unknown),
                    // refund by the charge's key; nothing captured is nothing
                    // to undo.
                    let key = match cx.output() {
                        Some(_) => cx.output_as::<String>()?,
                        None => idempotency_key(cx.saga_id(), "charge", Phase::Action),
                    };
                    if bank.captured.lock().unwrap().contains(&key) {
                        bank.refunded.lock().unwrap().insert(key);
                    }
                    Ok(())
                }
            },
        )
        .step(
            "reserve",
            move |_| async move {
                if fail_reserve {
                    return Err(StepError::permanent("out of stock"));
                }
                Ok(StepOutput::empty())
            },
            |_| async { Ok(()) },
        )
        .build()
        .unwrap()
}

/// A charge captured but never answered is compensated, not taken as
/// "did not happen"; the saga's state is read back from the log.
pub(crate) async fn a_late_action_is_compensated(log: Arc<dyn SagaLog>) {
    let bank = Arc::new(Bank::default());
    let saga = late_charge_saga(bank.clone(), u32::MAX, false);
    let orch = Orchestrator::builder(log.clone())
        .definition(&saga)
        .build()
        .unwrap();
    let done = orch.run(&saga, "late-1", 0).await.unwrap();
    assert_eq!(done.status(), SagaStatus::Compensated);
    assert_eq!(done.steps()[0].status(), StepStatus::Compensated);
    assert_eq!(done.steps()[0].attempts(), 3);
    assert_eq!(bank.calls.load(std::sync::atomic::Ordering::SeqCst), 3);
    bank.assert_money_kept(false);
    assert_eq!(bank.refunded.lock().unwrap().len(), 1);
    let record = log.load("late-1").await.unwrap().unwrap();
    assert_eq!(record.status, SagaStatus::Compensated);
    let names: Vec<_> = record.transitions.iter().map(|t| t.name()).collect();
    assert_eq!(
        names,
        [
            "started",
            "step_started",
            "step_started",
            "step_started",
            "step_uncertain",
            "compensation_started",
            "compensation_succeeded",
        ]
    );
    assert_eq!(record.instance().unwrap(), done);
}

/// A retry with the same key that gets the definite answer carries on.
pub(crate) async fn a_late_action_answered_on_retry_succeeds(log: Arc<dyn SagaLog>) {
    let bank = Arc::new(Bank::default());
    let saga = late_charge_saga(bank.clone(), 2, false);
    let orch = Orchestrator::builder(log.clone())
        .definition(&saga)
        .build()
        .unwrap();
    let done = orch.run(&saga, "late-2", 0).await.unwrap();
    assert_eq!(done.status(), SagaStatus::Completed);
    assert_eq!(done.steps()[0].attempts(), 2);
    assert_eq!(
        bank.captured.lock().unwrap().len(),
        1,
        "one key, one charge"
    );
    bank.assert_money_kept(true);

    // Later failure: the charge answered on retry is refunded from its output.
    let bank = Arc::new(Bank::default());
    let saga = late_charge_saga(bank.clone(), 2, true);
    let orch = Orchestrator::builder(log.clone())
        .definition(&saga)
        .build()
        .unwrap();
    let done = orch.run(&saga, "late-3", 0).await.unwrap();
    assert_eq!(done.status(), SagaStatus::Compensated);
    bank.assert_money_kept(false);
    let record = log.load("late-3").await.unwrap().unwrap();
    assert_eq!(record.status, SagaStatus::Compensated);
}

/// Generates one test per suite case for a backend; `$fixture` is an async
/// fn returning a value with a `log` field and an async `finish` method.
macro_rules! conformance {
    ($fixture:path) => {
        conformance!(@cases $fixture;
            create_then_load,
            create_is_unique_by_id,
            append_extends_history_context_and_status,
            stale_writes_conflict_and_change_nothing,
            bad_writes_are_refused,
            one_of_two_racing_writers_wins,
            lists_by_status_oldest_first,
            a_late_action_is_compensated,
            a_late_action_answered_on_retry_succeeds,
        );
    };
    (@cases $fixture:path; $($case:ident,)*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let fixture = $fixture().await;
                $crate::conformance::$case(fixture.log.clone()).await;
                fixture.finish().await;
            }
        )*
    };
}

mod memory {
    use std::sync::Arc;

    use micro_saga::{MemorySagaLog, SagaLog};

    pub(crate) struct Fixture {
        pub(crate) log: Arc<dyn SagaLog>,
    }

    impl Fixture {
        pub(crate) async fn finish(self) {}
    }

    pub(crate) async fn fixture() -> Fixture {
        Fixture {
            log: Arc::new(MemorySagaLog::new()),
        }
    }

    conformance!(fixture);
}

#[cfg(feature = "postgres")]
mod postgres {
    use std::sync::Arc;

    use micro_saga::log::PostgresSagaLog;
    use micro_saga::SagaLog;

    pub(crate) struct Fixture {
        pub(crate) log: Arc<dyn SagaLog>,
        db: crate::support::pg::TestSchema,
    }

    impl Fixture {
        pub(crate) async fn finish(self) {
            self.db.drop_schema().await;
        }
    }

    pub(crate) async fn fixture() -> Fixture {
        let db = crate::support::pg::TestSchema::new().await;
        // A pool of several connections, so that racing writers race in
        // PostgreSQL itself.
        let log = PostgresSagaLog::with_schema(db.pool.clone(), &db.schema).unwrap();
        log.install().await.unwrap();
        // Installing again changes nothing.
        log.install().await.unwrap();
        Fixture {
            log: Arc::new(log),
            db,
        }
    }

    conformance!(fixture);
}

#[cfg(feature = "embedded")]
mod embedded {
    use std::sync::Arc;

    use micro_saga::log::EmbeddedSagaLog;
    use micro_saga::SagaLog;

    pub(crate) struct Fixture {
        pub(crate) log: Arc<dyn SagaLog>,
        _dir: tempfile::TempDir,
    }

    impl Fixture {
        pub(crate) async fn finish(self) {}
    }

    pub(crate) async fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let log = EmbeddedSagaLog::open(dir.path().join("sagas.redb")).unwrap();
        Fixture {
            log: Arc::new(log),
            _dir: dir,
        }
    }

    conformance!(fixture);
}
