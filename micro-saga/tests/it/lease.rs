//! Leases on the PostgreSQL log: several orchestrators on one log each drive
//! their own sagas, take over the sagas of one that stopped once its leases
//! lapse, and a stale owner's writes are refused.
//!
//! Leases expire by PostgreSQL's clock, which no test can pause, so the
//! tests use short leases (a second) and poll for outcomes with generous
//! deadlines; nothing asserts how long anything took.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use micro_saga::log::{Append, NewSaga, PostgresSagaLog};
use micro_saga::{
    Error, LogError, MemorySagaLog, Orchestrator, SagaDefinition, SagaInstance, SagaLog,
    SagaStatus, StepOutput, StepPolicy, Transition,
};
use time::OffsetDateTime;

use crate::support::pg::{Role, TestSchema};

const TTL: Duration = Duration::from_secs(1);
const SETTLE: Duration = Duration::from_secs(60);

/// The participant every step calls: it counts calls per idempotency key,
/// by owner, and notes any call that overlaps another one with the same key.
#[derive(Default)]
struct Participant {
    state: Mutex<State>,
    /// (owner, step) pairs whose calls never answer.
    hang: Mutex<HashSet<(&'static str, &'static str)>>,
}

#[derive(Default)]
struct State {
    in_flight: HashMap<String, u32>,
    calls: Vec<(String, &'static str)>,
    overlaps: Vec<String>,
}

/// Takes a call off the in-flight count when it ends, or is dropped.
struct InFlight<'a>(&'a Participant, String);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut state = self.0.state.lock().unwrap();
        *state.in_flight.get_mut(&self.1).unwrap() -= 1;
    }
}

impl Participant {
    async fn call(&self, owner: &'static str, step: &'static str, key: &str) {
        {
            let mut state = self.state.lock().unwrap();
            let n = state.in_flight.entry(key.to_owned()).or_default();
            *n += 1;
            if *n > 1 {
                state.overlaps.push(key.to_owned());
            }
            state.calls.push((key.to_owned(), owner));
        }
        let _in_flight = InFlight(self, key.to_owned());
        if self.hang.lock().unwrap().contains(&(owner, step)) {
            std::future::pending::<()>().await;
        }
        // Long enough for sweeps and renewals to happen while steps run.
        tokio::time::sleep(Duration::from_millis(15)).await;
    }

    fn hang(&self, owner: &'static str, step: &'static str) {
        self.hang.lock().unwrap().insert((owner, step));
    }

    fn calls(&self) -> Vec<(String, &'static str)> {
        self.state.lock().unwrap().calls.clone()
    }

    fn overlaps(&self) -> Vec<String> {
        self.state.lock().unwrap().overlaps.clone()
    }
}

/// Three steps, each calling the participant as `owner`.
fn saga(owner: &'static str, participant: &Arc<Participant>) -> SagaDefinition<u32> {
    let mut builder = SagaDefinition::<u32>::builder("leased").policy(
        StepPolicy::new()
            .timeout(Duration::from_secs(300))
            .initial_backoff(Duration::from_millis(10)),
    );
    for step in ["a", "b", "c"] {
        let p = participant.clone();
        builder = builder.step(
            step,
            move |cx| {
                let p = p.clone();
                async move {
                    p.call(owner, step, cx.idempotency_key()).await;
                    Ok(StepOutput::empty())
                }
            },
            |_cx| async move { Ok(()) },
        );
    }
    builder.build().unwrap()
}

async fn log(db: &TestSchema) -> Arc<PostgresSagaLog> {
    let log = PostgresSagaLog::with_schema(db.pool.clone(), &db.schema).unwrap();
    log.install().await.unwrap();
    Arc::new(log)
}

fn orchestrator(
    log: Arc<PostgresSagaLog>,
    owner: &'static str,
    participant: &Arc<Participant>,
) -> Orchestrator {
    Orchestrator::builder(log)
        .definition(&saga(owner, participant))
        .lease(owner, TTL)
        .build()
        .unwrap()
}

/// Polls the log until `n` sagas are completed.
async fn completed(log: &dyn SagaLog, n: usize) {
    let give_up = tokio::time::Instant::now() + SETTLE;
    loop {
        let done = log.by_status(SagaStatus::Completed).await.unwrap().len();
        if done >= n {
            assert_eq!(done, n);
            return;
        }
        assert!(
            tokio::time::Instant::now() < give_up,
            "{done} of {n} sagas completed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn owners_of(calls: &[(String, &'static str)], saga_prefix: &str) -> HashSet<&'static str> {
    calls
        .iter()
        .filter(|(key, _)| key.starts_with(saga_prefix))
        .map(|(_, owner)| *owner)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_orchestrators_on_one_log_each_drive_only_their_own_sagas() {
    let db = TestSchema::new().await;
    let participant = Arc::new(Participant::default());
    let a = orchestrator(log(&db).await, "A", &participant);
    let b = orchestrator(log(&db).await, "B", &participant);
    // Sweeping all the time, with no idle time: without leases each would
    // pick up the other's sagas between their steps.
    let _sweep_a = a.keep_recovering(Duration::from_millis(10), Duration::ZERO);
    let _sweep_b = b.keep_recovering(Duration::from_millis(10), Duration::ZERO);

    let mut handles = Vec::new();
    for i in 0..10 {
        handles.push(
            a.start(&saga("A", &participant), format!("a-{i}"), i)
                .await
                .unwrap(),
        );
        handles.push(
            b.start(&saga("B", &participant), format!("b-{i}"), i)
                .await
                .unwrap(),
        );
    }
    for handle in handles {
        let saga = handle.finished().await.unwrap();
        assert_eq!(saga.status(), SagaStatus::Completed);
    }
    let calls = participant.calls();
    assert_eq!(calls.len(), 60, "each step once: {calls:?}");
    assert_eq!(owners_of(&calls, "a-"), HashSet::from(["A"]));
    assert_eq!(owners_of(&calls, "b-"), HashSet::from(["B"]));
    assert!(participant.overlaps().is_empty());
    db.drop_schema().await;
}

/// An orchestrator "dies" (its runtime is shut down, so its tasks and
/// connections go and its leases are not renewed) while many of its sagas
/// hang in a step; the other orchestrator, busy with sagas of its own, claims
/// them once their leases lapse and completes them. No key is ever called by
/// two owners at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_orchestrator_s_sagas_are_taken_over_once_its_leases_lapse() {
    let db = TestSchema::new().await;
    let participant = Arc::new(Participant::default());
    participant.hang("A", "b");

    // A, in a runtime of its own.
    let doomed = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let a_log = {
        let schema = db.schema.clone();
        doomed
            .spawn(async move {
                let log =
                    PostgresSagaLog::with_schema(crate::support::pg::pool(), &schema).unwrap();
                log.install().await.unwrap();
                Arc::new(log)
            })
            .await
            .unwrap()
    };
    let a = orchestrator(a_log, "A", &participant);
    let started = {
        let (a, participant) = (a.clone(), participant.clone());
        doomed.spawn(async move {
            for i in 0..20 {
                a.start(&saga("A", &participant), format!("a-{i}"), i)
                    .await
                    .unwrap();
            }
        })
    };
    started.await.unwrap();
    let b = orchestrator(log(&db).await, "B", &participant);
    let _sweep_b = b.keep_recovering(Duration::from_millis(20), Duration::ZERO);
    let mut handles = Vec::new();
    for i in 0..10 {
        handles.push(
            b.start(&saga("B", &participant), format!("b-{i}"), i)
                .await
                .unwrap(),
        );
    }
    // Every saga of A is in its hanging step, which B has not touched.
    let give_up = tokio::time::Instant::now() + SETTLE;
    loop {
        let calls = participant.calls();
        let hanging = calls
            .iter()
            .filter(|(key, owner)| {
                key.ends_with(":b:action") && key.starts_with("a-") && *owner == "A"
            })
            .count();
        if hanging == 20 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < give_up,
            "A's sagas never reached step b"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(owners_of(&participant.calls(), "a-")
        .iter()
        .all(|o| *o == "A"));
    doomed.shutdown_background();

    let check = log(&db).await;
    completed(&*check, 30).await;
    for handle in handles {
        handle.finished().await.unwrap();
    }
    let calls = participant.calls();
    for i in 0..20 {
        let key = format!("a-{i}:b:action");
        let by: Vec<&str> = calls
            .iter()
            .filter(|(k, _)| *k == key)
            .map(|(_, o)| *o)
            .collect();
        assert_eq!(
            by,
            ["A", "B"],
            "{key}: A's attempt, then B's with the same key"
        );
        let key = format!("a-{i}:c:action");
        let by: Vec<&str> = calls
            .iter()
            .filter(|(k, _)| *k == key)
            .map(|(_, o)| *o)
            .collect();
        assert_eq!(by, ["B"], "{key}");
    }
    assert_eq!(owners_of(&calls, "b-"), HashSet::from(["B"]));
    assert!(
        participant.overlaps().is_empty(),
        "{:?}",
        participant.overlaps()
    );
    db.drop_schema().await;
}

fn new_saga(id: &str) -> (NewSaga, SagaInstance) {
    let saga = SagaInstance::start(id, "leased", ["a", "b"], OffsetDateTime::now_utc()).unwrap();
    let new = NewSaga::new(saga.history()[0].clone(), serde_json::json!(0), None).unwrap();
    (new, saga)
}

fn step_started(saga: &SagaInstance, version: u64) -> Append {
    let mut next = saga.clone();
    let started = Transition::StepStarted {
        step: 0,
        at: OffsetDateTime::now_utc(),
    };
    next.apply(started.clone()).unwrap();
    Append::new(
        saga.id(),
        version,
        vec![started],
        next.status(),
        serde_json::json!(0),
    )
}

/// Lapses every lease in the schema, as time passing would.
async fn lapse(db: &TestSchema) {
    db.client
        .batch_execute(&format!(
            "UPDATE {}.saga SET lease_expires = now() - interval '1 second'",
            db.schema
        ))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_stale_owner_s_writes_are_refused() {
    let db = TestSchema::new().await;
    let log = log(&db).await;
    let defs = ["leased".to_owned()];
    let (new, saga) = new_saga("s-1");
    let a = log.create_leased(&new, "A", TTL).await.unwrap();
    assert_eq!(a.epoch, 1);

    // Held and live: nobody else can claim it.
    assert!(log
        .claim_due("B", TTL, &defs, &[], false)
        .await
        .unwrap()
        .is_empty());
    // Lapsed, but not claimed: the owner renews it and carries on.
    lapse(&db).await;
    log.renew_lease(&a, TTL).await.unwrap();
    assert!(log
        .claim_due("B", TTL, &defs, &[], false)
        .await
        .unwrap()
        .is_empty());

    // Lapsed and claimed: A is fenced off.
    lapse(&db).await;
    let claimed = log.claim_due("B", TTL, &defs, &[], false).await.unwrap();
    assert_eq!(claimed.len(), 1);
    let b = claimed[0].clone();
    assert_eq!((b.owner.as_str(), b.epoch), ("B", 2));
    let err = log
        .append(&step_started(&saga, 1).fenced(a.clone()))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, LogError::Fenced { owner, epoch: 1, .. } if owner == "A"),
        "{err}"
    );
    assert!(!err.is_retryable());
    assert!(log.renew_lease(&a, TTL).await.unwrap_err().is_fenced());
    assert_eq!(
        log.load("s-1").await.unwrap().unwrap().version(),
        1,
        "nothing written"
    );
    assert_eq!(
        log.append(&step_started(&saga, 1).fenced(b.clone()))
            .await
            .unwrap(),
        2
    );

    // Given up: due at once, with a new epoch; the old one is fenced.
    log.release_lease(&b).await.unwrap();
    assert!(log.renew_lease(&b, TTL).await.unwrap_err().is_fenced());
    let claimed = log.claim_due("C", TTL, &defs, &[], false).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].epoch, 3);
    // Skipped ids, other definitions and finished sagas are not claimed.
    lapse(&db).await;
    assert!(log
        .claim_due("D", TTL, &defs, &["s-1".to_owned()], false)
        .await
        .unwrap()
        .is_empty());
    assert!(log
        .claim_due("D", TTL, &["other".to_owned()], &[], false)
        .await
        .unwrap()
        .is_empty());
    // An owner takes its own live lease back only when asked to.
    let (new, _) = new_saga("s-2");
    log.create_leased(&new, "E", TTL).await.unwrap();
    let mine = |l: &Vec<micro_saga::Lease>| l.iter().map(|l| l.saga_id.clone()).collect::<Vec<_>>();
    assert_eq!(
        mine(
            &log.claim_due("E", TTL, &defs, &["s-1".to_owned()], false)
                .await
                .unwrap()
        ),
        Vec::<String>::new()
    );
    assert_eq!(
        mine(
            &log.claim_due("E", TTL, &defs, &["s-1".to_owned()], true)
                .await
                .unwrap()
        ),
        ["s-2"]
    );
    db.drop_schema().await;
}

/// An orchestrator whose saga is claimed by someone else stops driving it:
/// its renewal is refused, it drops the attempt in flight and never starts
/// the next step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_orchestrator_stops_driving_the_saga() {
    let db = TestSchema::new().await;
    let participant = Arc::new(Participant::default());
    participant.hang("A", "b");
    let log = log(&db).await;
    let a = orchestrator(log.clone(), "A", &participant);
    let handle = a.start(&saga("A", &participant), "s-1", 1).await.unwrap();
    crate::support::eventually(SETTLE, || {
        participant
            .calls()
            .iter()
            .any(|(key, _)| key == "s-1:b:action")
    })
    .await;
    let defs = ["leased".to_owned()];
    let give_up = tokio::time::Instant::now() + SETTLE;
    // A renews all along; lapse its lease until a claim gets in between.
    let thief = loop {
        lapse(&db).await;
        if let Some(lease) = log
            .claim_due("thief", Duration::from_secs(3600), &defs, &[], false)
            .await
            .unwrap()
            .pop()
        {
            break lease;
        }
        assert!(tokio::time::Instant::now() < give_up, "never claimed");
    };
    assert_eq!(thief.epoch, 2);
    let err = tokio::time::timeout(SETTLE, handle.finished())
        .await
        .expect("A never stopped")
        .unwrap_err();
    assert!(
        matches!(&err, Error::Log(LogError::Fenced { owner, epoch: 1, .. }) if owner == "A"),
        "{err:?}"
    );
    assert_eq!(a.in_flight(), 0);
    let record = log.load("s-1").await.unwrap().unwrap();
    assert_eq!(record.status, SagaStatus::Running);
    assert!(
        !participant
            .calls()
            .iter()
            .any(|(key, _)| key == "s-1:c:action"),
        "A went on after it was fenced"
    );
    assert!(participant.overlaps().is_empty());
    db.drop_schema().await;
}

#[tokio::test]
async fn leases_need_a_log_that_holds_them_and_a_usable_ttl() {
    let participant = Arc::new(Participant::default());
    let err = Orchestrator::builder(Arc::new(MemorySagaLog::new()))
        .definition(&saga("A", &participant))
        .lease("A", TTL)
        .build()
        .unwrap_err();
    assert!(
        matches!(err, Error::Log(LogError::LeasesUnsupported)),
        "{err:?}"
    );
    let db = TestSchema::new().await;
    for (owner, ttl) in [("", TTL), ("A", Duration::from_millis(10))] {
        let err = Orchestrator::builder(log(&db).await)
            .lease(owner, ttl)
            .build()
            .unwrap_err();
        assert!(matches!(err, Error::Config { .. }), "{err:?}");
    }
    // A memory log refuses a fenced write rather than ignore the fence.
    let memory = MemorySagaLog::new();
    let (new, saga) = new_saga("m-1");
    memory.create(&new).await.unwrap();
    let fenced = step_started(&saga, 1).fenced(micro_saga::Lease::new("m-1", "A", 1));
    assert!(matches!(
        memory.append(&fenced).await,
        Err(LogError::LeasesUnsupported)
    ));
    db.drop_schema().await;
}

/// A log installed before leases existed gains them at the next install; its
/// sagas start without a lease, so they are due at once.
#[tokio::test]
async fn install_adds_leases_to_an_older_log() {
    let db = TestSchema::new().await;
    let s = &db.schema;
    db.client
        .batch_execute(&format!(
            "CREATE SCHEMA {s};
             CREATE TABLE {s}.saga (
                 saga_id text PRIMARY KEY, definition text NOT NULL, status text NOT NULL,
                 context jsonb NOT NULL, trace_parent text,
                 version bigint NOT NULL CHECK (version >= 1),
                 created_seq bigserial NOT NULL,
                 created_at timestamptz NOT NULL DEFAULT now(),
                 updated_at timestamptz NOT NULL DEFAULT now());
             CREATE TABLE {s}.saga_transition (
                 saga_id text NOT NULL REFERENCES {s}.saga (saga_id) ON DELETE CASCADE,
                 seq bigint NOT NULL CHECK (seq >= 1), transition jsonb NOT NULL,
                 PRIMARY KEY (saga_id, seq));"
        ))
        .await
        .unwrap();
    let old = PostgresSagaLog::with_schema(db.pool.clone(), s).unwrap();
    // What the earlier version wrote: the same statement shape, no lease.
    let (new, _) = new_saga("old-1");
    db.client
        .execute(
            &format!(
                "WITH s AS (INSERT INTO {s}.saga (saga_id, definition, status, context, version)
                            VALUES ($1, 'leased', 'running', '0', 1) RETURNING saga_id)
                 INSERT INTO {s}.saga_transition SELECT saga_id, 1, $2 FROM s"
            ),
            &[&"old-1", &serde_json::to_value(&new.started).unwrap()],
        )
        .await
        .unwrap();
    old.install().await.unwrap();
    let claimed = old
        .claim_due("A", TTL, &["leased".to_owned()], &[], false)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].epoch, 1);
    assert_eq!(old.load("old-1").await.unwrap().unwrap().version(), 1);
    db.drop_schema().await;
}

/// An orchestrator that is alive but has lost the log (its connection is
/// terminated by the server) cannot renew: its tasks stop driving their
/// sagas, dropping the step attempts in flight, before the leases lapse in
/// the log; the other orchestrator then takes the sagas over. The two never
/// call a participant with one key at the same time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_cut_off_from_the_log_stops_before_another_takes_over() {
    let db = TestSchema::new().await;
    let participant = Arc::new(Participant::default());
    participant.hang("A", "b");
    // A's pool logs in as a role of its own, which is then forbidden to log
    // in: the pool can neither keep a connection nor make a new one.
    let a_role = Role::new().await;
    let a_log = PostgresSagaLog::with_schema(a_role.pool(), &db.schema).unwrap();
    a_log.install().await.unwrap();
    let a = orchestrator(Arc::new(a_log), "A", &participant);
    let mut a_handles = Vec::new();
    for i in 0..10 {
        a_handles.push(
            a.start(&saga("A", &participant), format!("a-{i}"), i)
                .await
                .unwrap(),
        );
    }
    crate::support::eventually(SETTLE, || {
        participant
            .calls()
            .iter()
            .filter(|(key, owner)| key.ends_with(":b:action") && *owner == "A")
            .count()
            == 10
    })
    .await;
    let b = orchestrator(log(&db).await, "B", &participant);
    let _sweep_b = b.keep_recovering(Duration::from_millis(20), Duration::ZERO);

    a_role.cut().await;
    for handle in a_handles {
        let err = tokio::time::timeout(SETTLE, handle.finished())
            .await
            .expect("A never stopped")
            .unwrap_err();
        assert!(
            matches!(err, Error::Log(LogError::LeaseLapsed { .. })),
            "{err:?}"
        );
    }
    assert_eq!(a.in_flight(), 0);
    completed(&*log(&db).await, 10).await;
    let calls = participant.calls();
    for i in 0..10 {
        let key = format!("a-{i}:b:action");
        let by: Vec<&str> = calls
            .iter()
            .filter(|(k, _)| *k == key)
            .map(|(_, o)| *o)
            .collect();
        assert_eq!(by, ["A", "B"], "{key}");
    }
    assert!(
        participant.overlaps().is_empty(),
        "{:?}",
        participant.overlaps()
    );
    db.drop_schema().await;
    a_role.drop_role().await;
}
