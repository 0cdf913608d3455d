//! Recovery is continuous: a transient saga-log failure never leaves a saga
//! unowned, and abandoned sagas are picked up while the process runs.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use micro_saga::log::{Append, LogError, NewSaga};
use micro_saga::{
    BoxFuture, MemorySagaLog, Orchestrator, SagaInstance, SagaLog, SagaRecord, SagaStatus,
    SagaSummary,
};

use crate::support::{order, order_saga, Journal};

/// A real log whose next `fail` appends fail transiently; every other one of
/// those failures is ambiguous: the write is applied, and only its answer is
/// lost. Loads fail transiently once after each failed append.
#[derive(Debug)]
struct FlakyLog {
    inner: MemorySagaLog,
    fail: AtomicU32,
    failed: AtomicU32,
    fail_load: AtomicU32,
}

impl FlakyLog {
    fn new(fail: u32) -> Self {
        FlakyLog {
            inner: MemorySagaLog::new(),
            fail: AtomicU32::new(fail),
            failed: AtomicU32::new(0),
            fail_load: AtomicU32::new(0),
        }
    }

    fn take(counter: &AtomicU32) -> bool {
        counter
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }
}

fn unavailable() -> LogError {
    LogError::Unavailable("connection reset".into())
}

impl SagaLog for FlakyLog {
    fn create<'a>(&'a self, saga: &'a NewSaga) -> BoxFuture<'a, Result<(), LogError>> {
        self.inner.create(saga)
    }

    fn append<'a>(&'a self, append: &'a Append) -> BoxFuture<'a, Result<u64, LogError>> {
        Box::pin(async move {
            if Self::take(&self.fail) {
                let n = self.failed.fetch_add(1, Ordering::SeqCst);
                self.fail_load.fetch_add(1, Ordering::SeqCst);
                if n % 2 == 1 {
                    self.inner.append(append).await?;
                }
                return Err(unavailable());
            }
            self.inner.append(append).await
        })
    }

    fn load<'a>(&'a self, saga_id: &'a str) -> BoxFuture<'a, Result<Option<SagaRecord>, LogError>> {
        Box::pin(async move {
            if Self::take(&self.fail_load) {
                return Err(unavailable());
            }
            self.inner.load(saga_id).await
        })
    }

    fn unfinished(&self) -> BoxFuture<'_, Result<Vec<SagaSummary>, LogError>> {
        self.inner.unfinished()
    }

    fn by_status(&self, status: SagaStatus) -> BoxFuture<'_, Result<Vec<SagaSummary>, LogError>> {
        self.inner.by_status(status)
    }
}

#[tokio::test(start_paused = true)]
async fn transient_log_failures_are_retried_and_the_saga_finishes() {
    let journal = Journal::default();
    let saga = order_saga(&journal);
    let log = Arc::new(FlakyLog::new(4));
    let orch = Orchestrator::builder(log.clone())
        .definition(&saga)
        .build()
        .unwrap();
    let done = orch.run(&saga, "o-1", order("o-1", "book")).await.unwrap();
    assert_eq!(done.status(), SagaStatus::Completed);
    assert_eq!(log.failed.load(Ordering::SeqCst), 4);
    let record = log.load("o-1").await.unwrap().unwrap();
    assert_eq!(record.transitions, done.history(), "each write landed once");
    assert_eq!(SagaInstance::replay(record.transitions).unwrap(), done);
    assert_eq!(orch.in_flight(), 0);
    // Each step ran once: the retried writes did not run them again.
    assert_eq!(journal.lines().len(), 4, "{:?}", journal.lines());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_sagas_are_picked_up_while_the_process_runs() {
    let journal = Journal::default();
    let saga = order_saga(&journal);
    let log: Arc<dyn SagaLog> = Arc::new(MemorySagaLog::new());
    // A saga some process started ten minutes ago and then abandoned.
    let at = time::OffsetDateTime::now_utc() - time::Duration::minutes(10);
    let started = SagaInstance::start("o-9", "place-order", saga.step_names(), at).unwrap();
    let context = serde_json::to_value(order("o-9", "book")).unwrap();
    let new = NewSaga::new(started.history()[0].clone(), context, None).unwrap();
    log.create(&new).await.unwrap();

    let orch = Orchestrator::builder(log.clone())
        .definition(&saga)
        .build()
        .unwrap();
    // A saga that moved just now is not abandoned: this one is left alone.
    let fresh = SagaInstance::start(
        "o-10",
        "place-order",
        saga.step_names(),
        time::OffsetDateTime::now_utc(),
    )
    .unwrap();
    let context = serde_json::to_value(order("o-10", "book")).unwrap();
    log.create(&NewSaga::new(fresh.history()[0].clone(), context, None).unwrap())
        .await
        .unwrap();

    let mut sweeping = orch.keep_recovering(Duration::from_millis(10), Duration::from_secs(60));
    let handle = tokio::time::timeout(Duration::from_secs(10), sweeping.resumed())
        .await
        .expect("the abandoned saga is picked up")
        .unwrap();
    assert_eq!(handle.saga_id(), "o-9");
    let done = handle.finished().await.unwrap();
    assert_eq!(done.status(), SagaStatus::Completed);
    assert!(
        tokio::time::timeout(Duration::from_millis(200), sweeping.resumed())
            .await
            .is_err(),
        "a saga that moved recently, or finished, is not resumed"
    );
    let fresh = log.load("o-10").await.unwrap().unwrap();
    assert_eq!(fresh.transitions.len(), 1);
}
