//! The durable logs under the orchestrator: sagas run to the end on them, and
//! a saga left unfinished is found again by a new log over the same storage
//! and resumed.

use std::sync::Arc;

use micro_saga::log::{Append, NewSaga};
use micro_saga::{Orchestrator, SagaInstance, SagaLog, SagaStatus, Transition};
use time::OffsetDateTime;

use crate::support::{order, order_saga, Journal};

/// Runs one saga to the end and leaves another with its first step in doubt
/// (started, outcome never recorded), as a crash would.
async fn run_one_and_leave_one_in_doubt(log: Arc<dyn SagaLog>) {
    let journal = Journal::default();
    let saga = order_saga(&journal);
    let orch = Orchestrator::builder(log.clone())
        .definition(&saga)
        .build()
        .unwrap();
    let done = orch.run(&saga, "o-1", order("o-1", "book")).await.unwrap();
    assert_eq!(done.status(), SagaStatus::Completed);

    let now = OffsetDateTime::now_utc();
    let mut doubt = SagaInstance::start("o-2", "place-order", saga.step_names(), now).unwrap();
    let new = NewSaga::new(
        doubt.history()[0].clone(),
        serde_json::to_value(order("o-2", "book")).unwrap(),
        None,
    )
    .unwrap();
    log.create(&new).await.unwrap();
    let started = doubt.step_started(now).unwrap();
    log.append(&Append::new(
        "o-2",
        1,
        vec![started],
        SagaStatus::Running,
        new.context.clone(),
    ))
    .await
    .unwrap();
}

/// Over a new log on the same storage: the finished saga is intact and the
/// one in doubt is resumed, its first step run again.
async fn recover_on_a_new_log(log: Arc<dyn SagaLog>) {
    let completed = log.load("o-1").await.unwrap().expect("o-1 survived");
    assert_eq!(completed.status, SagaStatus::Completed);
    assert_eq!(completed.version(), 9);
    assert_eq!(
        log.by_status(SagaStatus::Completed).await.unwrap()[0].saga_id,
        "o-1"
    );
    let unfinished = log.unfinished().await.unwrap();
    assert_eq!(unfinished.len(), 1);
    assert_eq!(unfinished[0].saga_id, "o-2");
    assert_eq!(unfinished[0].version, 2);

    let journal = Journal::default();
    let saga = order_saga(&journal);
    let orch = Orchestrator::builder(log.clone())
        .definition(&saga)
        .build()
        .unwrap();
    let recovery = orch.recover().await.unwrap();
    assert!(recovery.skipped.is_empty());
    let results = recovery.finished().await;
    assert_eq!(results.len(), 1);
    let done = results.into_iter().next().unwrap().unwrap();
    assert_eq!(done.status(), SagaStatus::Completed);
    assert_eq!(journal.lines()[0], "charge:o-2:charge-payment:action");
    let record = log.load("o-2").await.unwrap().unwrap();
    assert_eq!(record.status, SagaStatus::Completed);
    // The attempt in doubt is carried on within its recorded deadline (one
    // second after it started), or, on a slow machine, has timed out by then
    // and is followed by a second one (`timers` tests both on the paused clock).
    match done.steps()[0].attempts() {
        1 => assert!(matches!(
            record.transitions[1..3],
            [
                Transition::StepStarted { step: 0, .. },
                Transition::StepSucceeded { step: 0, .. }
            ]
        )),
        2 => assert!(matches!(
            record.transitions[1..4],
            [
                Transition::StepStarted { step: 0, .. },
                Transition::StepStarted { step: 0, .. },
                Transition::StepSucceeded { step: 0, .. }
            ]
        )),
        n => panic!("{n} attempts at the step in doubt"),
    }
    assert!(log.unfinished().await.unwrap().is_empty());
}

#[cfg(feature = "embedded")]
mod embedded {
    use std::sync::Arc;

    use micro_saga::log::EmbeddedSagaLog;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reopening_the_file_recovers_every_saga() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sagas.redb");
        let log = Arc::new(EmbeddedSagaLog::open(&path).unwrap());
        super::run_one_and_leave_one_in_doubt(log.clone()).await;
        // The file is locked while it is open.
        assert!(EmbeddedSagaLog::open(&path).is_err());
        drop(log);

        let log = Arc::new(EmbeddedSagaLog::open(&path).unwrap());
        assert_eq!(log.path(), path);
        super::recover_on_a_new_log(log).await;
    }
}

#[cfg(feature = "postgres")]
mod postgres {
    use std::sync::Arc;

    use micro_saga::log::{LogError, PostgresSagaLog};

    use crate::support::pg;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_new_connection_recovers_every_saga() {
        let db = pg::TestSchema::new().await;
        let log = PostgresSagaLog::with_schema(db.pool.clone(), &db.schema).unwrap();
        log.install().await.unwrap();
        super::run_one_and_leave_one_in_doubt(Arc::new(log)).await;

        let log = PostgresSagaLog::with_schema(pg::pool(), &db.schema).unwrap();
        log.install().await.unwrap();
        assert_eq!(log.schema(), db.schema);
        super::recover_on_a_new_log(Arc::new(log)).await;
        db.drop_schema().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_orchestrators_recovering_the_same_sagas_finish_each_once() {
        use micro_saga::{Error, Orchestrator, SagaLog, SagaStatus};

        use crate::support::{order_saga, Journal};

        let db = pg::TestSchema::new().await;
        let log = PostgresSagaLog::with_schema(db.pool.clone(), &db.schema).unwrap();
        log.install().await.unwrap();
        let log = Arc::new(log);
        super::run_one_and_leave_one_in_doubt(log.clone()).await;

        let mut orchestrators = Vec::new();
        for _ in 0..2 {
            let journal = Journal::default();
            let saga = order_saga(&journal);
            let log = PostgresSagaLog::with_schema(pg::pool(), &db.schema).unwrap();
            let orch = Orchestrator::builder(Arc::new(log))
                .definition(&saga)
                .build()
                .unwrap();
            orchestrators.push((orch, journal));
        }
        let recoveries = orchestrators.iter().map(|(orch, _)| {
            let orch = orch.clone();
            tokio::spawn(async move { orch.recover().await.unwrap().finished().await })
        });
        let mut completed = 0;
        for recovery in recoveries {
            for result in recovery.await.unwrap() {
                match result {
                    Ok(saga) => {
                        assert_eq!(saga.status(), SagaStatus::Completed);
                        completed += 1;
                    }
                    Err(Error::Log(err)) => assert!(err.is_conflict(), "{err:?}"),
                    Err(err) => panic!("{err:?}"),
                }
            }
        }
        assert_eq!(completed, 1, "one orchestrator finished the saga");
        let record = log.load("o-2").await.unwrap().unwrap();
        assert_eq!(record.status, SagaStatus::Completed);
        let saga = record.instance().expect("a valid history");
        assert!(saga.is_finished());
        // Between them, every step ran (a step may run twice, when the loser
        // read the saga while the winner was acting: idempotency keys cover it).
        let lines: Vec<String> = orchestrators.iter().flat_map(|(_, j)| j.lines()).collect();
        for step in ["charge:", "reserve:", "confirm:", "notify:"] {
            assert!(
                lines.iter().any(|l| l.starts_with(step)),
                "{step} {lines:?}"
            );
        }
        db.drop_schema().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_installs_all_succeed() {
        let db = pg::TestSchema::new().await;
        let installs = (0..4).map(|_| {
            let schema = db.schema.clone();
            tokio::spawn(async move {
                let log = PostgresSagaLog::with_schema(pg::pool(), schema).unwrap();
                log.install().await
            })
        });
        for install in installs {
            install.await.unwrap().unwrap();
        }
        db.drop_schema().await;
    }

    #[tokio::test]
    async fn schema_names_are_checked() {
        let pool = pg::pool();
        for bad in ["", "1abc", "a-b", "a;drop", "é", &"x".repeat(64)] {
            let err = PostgresSagaLog::with_schema(pool.clone(), bad).unwrap_err();
            assert!(
                matches!(err, LogError::InvalidSchema { .. }),
                "{bad}: {err}"
            );
        }
        assert!(PostgresSagaLog::with_schema(pool.clone(), "shop_orders_2").is_ok());
        assert_eq!(PostgresSagaLog::new(pool).schema(), "micro_saga");
    }
}
