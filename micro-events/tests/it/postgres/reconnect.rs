//! The relay and the inbox store on a pool, against the real server:
//! connections PostgreSQL terminates mid-run are replaced, and a pool cut off
//! from the database fails its health check and retryably, and carries on by
//! itself once the database takes connections again.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use micro_core::health::CheckStatus;
use micro_events::inbox::InboxStore;
use micro_events::postgres::{health_check, PgInbox, PgInboxStore, PgOutbox, Pool};
use micro_events::{Error, MemoryBus};
use tokio_postgres::Client;

use super::{connect, decode, numbered, pool_named, pool_on, schema, url};

const SETTLE: Duration = Duration::from_secs(60);

/// Terminates the backends named `application_name` every few milliseconds
/// until `stop`; how many it terminated.
fn terminator(application_name: String, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        let admin = connect().await;
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
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        terminated
    })
}

/// A login role of its own: [`cut`](Self::cut) forbids it to log in and
/// terminates its backends, so that its pool can neither keep nor make a
/// connection; [`restore`](Self::restore) lets it in again.
struct Role {
    name: String,
    admin: Client,
}

impl Role {
    async fn new() -> Self {
        let name = format!("ev_role_{}", uuid::Uuid::new_v4().simple());
        let admin = connect().await;
        admin
            .batch_execute(&format!("CREATE ROLE {name} LOGIN SUPERUSER"))
            .await
            .unwrap();
        Role { name, admin }
    }

    fn pool(&self) -> Pool {
        let mut config: tokio_postgres::Config = url().parse().unwrap();
        config.user(&self.name).application_name(&self.name);
        pool_on(config)
    }

    async fn cut(&self) {
        self.admin
            .batch_execute(&format!("ALTER ROLE {} NOLOGIN", self.name))
            .await
            .unwrap();
        self.admin
            .execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1",
                &[&self.name],
            )
            .await
            .unwrap();
    }

    async fn restore(&self) {
        self.admin
            .batch_execute(&format!("ALTER ROLE {} LOGIN", self.name))
            .await
            .unwrap();
    }

    async fn drop_role(self) {
        self.cut().await;
        self.admin
            .batch_execute(&format!("DROP ROLE {}", self.name))
            .await
            .unwrap();
    }
}

async fn write(
    client: &mut Client,
    outbox: &PgOutbox,
    keys: &[&str],
    numbers: std::ops::Range<u32>,
) {
    let tx = client.transaction().await.unwrap();
    for n in numbers {
        let key = keys[n as usize % keys.len()];
        outbox
            .write(&tx, "orders", key, &numbered(key, n))
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_carries_on_while_its_connections_are_terminated() {
    let mut client = connect().await;
    let s = schema(&client).await;
    let outbox = PgOutbox::new(&format!("{s}.outbox")).unwrap();
    outbox.create_table(&client).await.unwrap();
    let name = format!("ev_relay_{}", uuid::Uuid::new_v4().simple());
    let bus = MemoryBus::with_partitions(2);
    let (stop_relay, stopped) = tokio::sync::oneshot::channel::<()>();
    let relay = tokio::spawn(
        outbox
            .relay(pool_named(&name), bus.clone())
            .batch_size(5)
            .poll_interval(Duration::from_millis(10))
            .run(async {
                let _ = stopped.await;
            }),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let terminating = terminator(name, stop.clone());

    let keys = ["k0", "k1", "k2", "k3", "k4"];
    for n in (0..300).step_by(3) {
        write(&mut client, &outbox, &keys, n..n + 3).await;
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    let deadline = tokio::time::Instant::now() + SETTLE;
    while outbox.unsent(&client).await.unwrap() > 0 {
        assert!(tokio::time::Instant::now() < deadline, "the relay stalled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let terminated = terminating.await.unwrap();
    assert!(terminated > 0, "no connection was terminated");
    stop_relay.send(()).unwrap();
    tokio::time::timeout(SETTLE, relay)
        .await
        .expect("the relay did not stop")
        .unwrap()
        .unwrap();

    // At least once, and in order per key: a round that lost its connection
    // after publishing publishes its rows again, which consumers drop by id.
    let mut seen = HashSet::new();
    let mut per_key: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for record in bus.records("orders") {
        let event = decode(&record);
        if seen.insert(event.id().to_owned()) {
            let (key, n) = event.into_data();
            per_key.entry(key).or_default().push(n);
        }
    }
    let mut all: Vec<u32> = per_key.values().flatten().copied().collect();
    all.sort_unstable();
    assert_eq!(all, (0..300).collect::<Vec<_>>(), "every event, once each");
    for (key, numbers) in &per_key {
        assert!(numbers.is_sorted(), "{key}: {numbers:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_cut_off_from_the_database_fails_its_check_and_resumes_by_itself() {
    let mut client = connect().await;
    let s = schema(&client).await;
    let outbox = PgOutbox::new(&format!("{s}.outbox")).unwrap();
    outbox.create_table(&client).await.unwrap();
    let inbox = PgInbox::new(&format!("{s}.inbox")).unwrap();
    inbox.create_table(&client).await.unwrap();
    let role = Role::new().await;
    let pool = role.pool();
    let check = health_check(&pool);
    assert_eq!(check.run().await.status, CheckStatus::Pass);
    let store = PgInboxStore::new(pool.clone(), inbox);
    assert!(store.mark_processed("c", "e-1").await.unwrap());
    let bus = MemoryBus::with_partitions(1);
    let mut relay = outbox.relay(pool.clone(), bus.clone());
    write(&mut client, &outbox, &["k"], 0..3).await;
    assert_eq!(relay.relay_once().await.unwrap(), 3);

    role.cut().await;
    let report = check.run().await;
    assert_ne!(report.status, CheckStatus::Pass, "{report:?}");
    write(&mut client, &outbox, &["k"], 3..6).await;
    // A round fails, retryably: on a pooled connection not yet seen closed
    // (`Postgres`), then for want of any connection (`PostgresPool`).
    for attempt in 0.. {
        let err = relay.relay_once().await.unwrap_err();
        assert!(err.is_retryable(), "{err:?}");
        if matches!(err, Error::PostgresPool(_)) {
            break;
        }
        assert!(attempt < 10, "{err:?}");
    }
    let err = store.is_processed("c", "e-1").await.unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
    assert_eq!(bus.records("orders").len(), 3);

    role.restore().await;
    let deadline = tokio::time::Instant::now() + SETTLE;
    let mut published = 0;
    while published < 3 {
        match relay.relay_once().await {
            Ok(n) => published += n,
            Err(err) => assert!(err.is_retryable(), "{err:?}"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the relay never resumed"
        );
    }
    assert_eq!(published, 3);
    let numbers: Vec<u32> = bus
        .records("orders")
        .iter()
        .map(|r| decode(r).into_data().1)
        .collect();
    assert_eq!(numbers, [0, 1, 2, 3, 4, 5]);
    assert_eq!(check.run().await.status, CheckStatus::Pass);
    assert!(store.is_processed("c", "e-1").await.unwrap());
    assert!(!store.mark_processed("c", "e-1").await.unwrap());
    drop((relay, store, pool));
    role.drop_role().await;
}
