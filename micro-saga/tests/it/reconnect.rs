//! The PostgreSQL saga log on a pool, against the real server: connections
//! that PostgreSQL terminates mid-run are replaced, and a log cut off from the
//! database is not ready, answers retryable errors, and carries on by itself
//! once it is back.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use micro_core::health::CheckStatus;
use micro_saga::log::{LogError, PostgresSagaLog};
use micro_saga::{
    Error, Orchestrator, SagaDefinition, SagaHandle, SagaLog, SagaStatus, StepOutput, StepPolicy,
};
use tokio::sync::Semaphore;

use crate::support::pg::{self, Role, TestSchema};
use crate::support::{order, order_saga, Journal};

const SETTLE: Duration = Duration::from_secs(60);

/// Terminates the backends named `application_name` every few milliseconds
/// until `stop`; how many it terminated.
fn terminator(application_name: String, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        let admin = pg::connect().await;
        let mut terminated = 0;
        while !stop.load(Ordering::Relaxed) {
            terminated += admin
                .query(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE application_name = $1",
                    &[&application_name],
                )
                .await
                .unwrap()
                .len();
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        terminated
    })
}

/// Starts `id`, trying again while the log is unavailable. `None` when a
/// try whose answer was lost had created it: then recovery drives it.
async fn start_retrying<C: micro_saga::SagaContext + Clone>(
    orch: &Orchestrator,
    definition: &SagaDefinition<C>,
    id: &str,
    context: C,
) -> Option<SagaHandle> {
    let deadline = tokio::time::Instant::now() + SETTLE;
    loop {
        match orch.start(definition, id, context.clone()).await {
            Ok(handle) => return Some(handle),
            Err(Error::Log(LogError::AlreadyExists { .. })) => return None,
            Err(err) if err.is_retryable() => {
                assert!(tokio::time::Instant::now() < deadline, "{id}: {err}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(err) => panic!("{id}: {err:?}"),
        }
    }
}

/// Polls the log until `n` sagas are completed.
async fn completed(log: &dyn SagaLog, n: usize) {
    let deadline = tokio::time::Instant::now() + SETTLE;
    loop {
        match log.by_status(SagaStatus::Completed).await {
            Ok(done) if done.len() == n => return,
            Ok(done) => assert!(
                tokio::time::Instant::now() < deadline,
                "{} of {n} sagas completed",
                done.len()
            ),
            Err(err) => assert!(err.is_retryable(), "{err}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sagas_complete_while_the_logs_connections_are_terminated() {
    let db = TestSchema::new().await;
    let name = pg::fresh_schema("saga_reconnect");
    let log = Arc::new(PostgresSagaLog::with_schema(pg::pool_named(&name), &db.schema).unwrap());
    log.install().await.unwrap();
    let journal = Journal::default();
    let saga = order_saga(&journal);
    let orch = Orchestrator::builder(log.clone())
        .definition(&saga)
        .lease("A", Duration::from_secs(30))
        .build()
        .unwrap();
    // Sagas whose start was answered by a lost connection are picked up.
    let _sweep = orch.keep_recovering(Duration::from_millis(100), Duration::from_millis(500));

    let stop = Arc::new(AtomicBool::new(false));
    let terminating = terminator(name, stop.clone());
    let mut handles = Vec::new();
    for i in 0..40 {
        let id = format!("o-{i}");
        if let Some(handle) = start_retrying(&orch, &saga, &id, order(&id, "sku-1")).await {
            handles.push(handle);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for handle in handles {
        match tokio::time::timeout(SETTLE, handle.finished())
            .await
            .expect("a saga never finished")
        {
            Ok(saga) => assert_eq!(saga.status(), SagaStatus::Completed),
            // Recovery may have taken over a saga whose first driver met a
            // lost write (conflict): it finishes it, as `completed` checks.
            Err(Error::Log(err)) if err.is_conflict() || err.is_fenced() => {}
            Err(err) => panic!("{err:?}"),
        }
    }
    stop.store(true, Ordering::Relaxed);
    let terminated = terminating.await.unwrap();
    assert!(terminated > 0, "no connection was terminated");

    completed(&*log, 40).await;
    let lines = journal.lines();
    for i in 0..40 {
        let key = format!("o-{i}");
        for step in ["charge:", "reserve:", "confirm:", "notify:"] {
            assert!(
                lines
                    .iter()
                    .any(|l| l.starts_with(step) && l.contains(&format!("{key}:"))),
                "{key} {step} never ran"
            );
        }
    }
    db.drop_schema().await;
}

/// One step that waits for a permit of `gate`, then one that finishes.
fn gated(gate: &Arc<Semaphore>) -> SagaDefinition<u32> {
    let gate = gate.clone();
    SagaDefinition::<u32>::builder("gated")
        .policy(StepPolicy::new().initial_backoff(Duration::from_millis(10)))
        .step(
            "wait",
            move |_cx| {
                let gate = gate.clone();
                async move {
                    gate.acquire().await.unwrap().forget();
                    Ok(StepOutput::empty())
                }
            },
            |_cx| async move { Ok(()) },
        )
        .pivot("done", |_cx| async move { Ok(StepOutput::empty()) })
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_cut_off_from_the_database_is_not_ready_and_resumes_by_itself() {
    let db = TestSchema::new().await;
    let role = Role::new().await;
    let log = Arc::new(PostgresSagaLog::with_schema(role.pool(), &db.schema).unwrap());
    log.install().await.unwrap();
    let check = log.health_check();
    assert_eq!(check.run().await.status, CheckStatus::Pass);
    let gate = Arc::new(Semaphore::new(0));
    let saga = gated(&gate);
    let orch = Orchestrator::builder(log.clone())
        .definition(&saga)
        .lease("A", Duration::from_secs(60))
        .build()
        .unwrap();
    let mut handles = Vec::new();
    for i in 0..5 {
        handles.push(orch.start(&saga, format!("g-{i}"), i).await.unwrap());
    }

    role.cut().await;
    let report = check.run().await;
    assert_ne!(report.status, CheckStatus::Pass, "{report:?}");
    // A start fails, retryably: on a pooled connection not yet seen closed
    // (`Postgres`), then for want of any connection (`Unavailable`).
    for attempt in 0.. {
        let err = orch.start(&saga, "g-late", 9).await.unwrap_err();
        assert!(err.is_retryable(), "{err:?}");
        if matches!(err, Error::Log(LogError::Unavailable(_))) {
            break;
        }
        assert!(attempt < 10, "{err:?}");
    }
    // The steps finish while the log is unreachable: their writes wait.
    gate.add_permits(5);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let completed_meanwhile: i64 = db
        .client
        .query_one(
            &format!(
                "SELECT count(*) FROM {}.saga WHERE status = 'completed'",
                db.schema
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(completed_meanwhile, 0);

    role.restore().await;
    for handle in handles {
        let saga = tokio::time::timeout(SETTLE, handle.finished())
            .await
            .expect("a saga never finished")
            .unwrap();
        assert_eq!(saga.status(), SagaStatus::Completed);
    }
    assert_eq!(check.run().await.status, CheckStatus::Pass);
    completed(&*log, 5).await;
    db.drop_schema().await;
    role.drop_role().await;
}
