//! The PostgreSQL inbox and outbox against the real server
//! (`MICRO_TEST_POSTGRES_URL`, default `postgres://postgres@127.0.0.1:5432/test`).
//! Each test works in a fresh schema.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use micro_core::service::BoxFuture;
use micro_events::inbox::Inbox;
use micro_events::postgres::deadpool_postgres::{Manager, Pool, Runtime};
use micro_events::postgres::{PgInbox, PgInboxStore, PgOutbox};
use micro_events::{
    Delivery, Event, MemoryBus, Publisher, Received, Record, SubscribeOptions, SubscriberExt,
};
use tokio::sync::Mutex;
use tokio_postgres::{Client, NoTls};

use crate::support::{eventually, within, Log};

mod reconnect;

pub(crate) fn url() -> String {
    std::env::var("MICRO_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A pool on the tests' PostgreSQL, whose connections are named
/// `application_name` in `pg_stat_activity`.
pub(crate) fn pool_named(application_name: &str) -> Pool {
    let mut config: tokio_postgres::Config = url().parse().expect("a PostgreSQL url");
    config.application_name(application_name);
    pool_on(config)
}

/// A pool on the tests' PostgreSQL.
pub(crate) fn pool() -> Pool {
    pool_named("micro-events-test")
}

/// A pool of at most 4 connections with `config`, waiting at most 2 s for one.
pub(crate) fn pool_on(config: tokio_postgres::Config) -> Pool {
    Pool::builder(Manager::new(config, NoTls))
        .max_size(4)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(Duration::from_secs(2)))
        .create_timeout(Some(Duration::from_secs(2)))
        .build()
        .expect("a pool")
}

pub(crate) async fn connect() -> Client {
    let url = url();
    let (client, connection) = tokio_postgres::connect(&url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL is not reachable at {url}: {e}"));
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// A fresh schema; returns its name.
pub(crate) async fn schema(client: &Client) -> String {
    let name = format!("ev_{}", uuid::Uuid::new_v4().simple());
    client
        .batch_execute(&format!("CREATE SCHEMA {name}"))
        .await
        .unwrap();
    name
}

fn fast() -> SubscribeOptions {
    SubscribeOptions::new().backoff(Duration::from_millis(10), Duration::from_millis(50))
}

const SETTLE: Duration = Duration::from_secs(30);

#[tokio::test]
async fn a_claim_commits_or_rolls_back_with_the_effect() {
    let mut client = connect().await;
    let s = schema(&client).await;
    let inbox = PgInbox::new(&format!("{s}.inbox")).unwrap();
    inbox.create_table(&client).await.unwrap();
    client
        .batch_execute(&format!("CREATE TABLE {s}.effects (n int)"))
        .await
        .unwrap();

    let tx = client.transaction().await.unwrap();
    assert!(inbox.claim(&tx, "billing", "e1").await.unwrap());
    tx.execute(&format!("INSERT INTO {s}.effects VALUES (1)"), &[])
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    assert!(!inbox.is_processed(&client, "billing", "e1").await.unwrap());

    let tx = client.transaction().await.unwrap();
    assert!(
        inbox.claim(&tx, "billing", "e1").await.unwrap(),
        "the rolled back claim is gone"
    );
    tx.execute(&format!("INSERT INTO {s}.effects VALUES (1)"), &[])
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let tx = client.transaction().await.unwrap();
    assert!(!inbox.claim(&tx, "billing", "e1").await.unwrap());
    assert!(
        inbox.claim(&tx, "shipping", "e1").await.unwrap(),
        "per consumer"
    );
    tx.commit().await.unwrap();
    assert!(inbox.is_processed(&client, "billing", "e1").await.unwrap());
    let n: i64 = client
        .query_one(&format!("SELECT count(*) FROM {s}.effects"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
}

#[tokio::test]
async fn concurrent_claims_have_one_winner() {
    let client = connect().await;
    let s = schema(&client).await;
    let inbox = PgInbox::new(&format!("{s}.inbox")).unwrap();
    inbox.create_table(&client).await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let inbox = inbox.clone();
        tasks.push(tokio::spawn(async move {
            let mut client = connect().await;
            let tx = client.transaction().await.unwrap();
            let won = inbox.claim(&tx, "c", "same-event").await.unwrap();
            tx.commit().await.unwrap();
            won
        }));
    }
    let mut winners = 0;
    for task in tasks {
        winners += usize::from(task.await.unwrap());
    }
    assert_eq!(winners, 1);
}

#[tokio::test]
async fn the_inbox_store_skips_redelivered_events() {
    let client = connect().await;
    let s = schema(&client).await;
    let inbox = PgInbox::new(&format!("{s}.inbox")).unwrap();
    inbox.create_table(&client).await.unwrap();
    let store = PgInboxStore::new(pool(), inbox);

    let bus = MemoryBus::with_partitions(1);
    let event = Event::new("/s", "t", 7u32).unwrap();
    let other = Event::new("/s", "t", 8u32).unwrap();
    for e in [&event, &event, &other, &event] {
        micro_events::PublisherExt::publish(&bus, "t", "k", e)
            .await
            .unwrap();
    }
    let effects = Log::new();
    let log = effects.clone();
    let handler = Inbox::new(store, "counter").deduplicate(move |e: Received<u32>| {
        let log = log.clone();
        async move {
            log.push(*e.data());
            Ok::<_, std::io::Error>(())
        }
    });
    let sub = bus.subscribe_with("t", "g", fast(), handler).await.unwrap();
    eventually(SETTLE, "four commits", || {
        (bus.committed("t", "g").get(&0) == Some(&4)).then_some(())
    })
    .await;
    sub.shutdown().await.unwrap();
    assert_eq!(effects.snapshot(), [7, 8]);
}

pub(crate) fn decode(record: &micro_events::ReceivedRecord) -> Event<(String, u32)> {
    Event::from_binary(record.headers.clone(), &record.payload).unwrap()
}

pub(crate) fn numbered(key: &str, n: u32) -> Event<(String, u32)> {
    Event::new("/orders", "test.numbered", (key.to_owned(), n)).unwrap()
}

#[tokio::test]
async fn the_outbox_publishes_what_committed_in_order_per_key() {
    let mut client = connect().await;
    let s = schema(&client).await;
    let outbox = PgOutbox::new(&format!("{s}.outbox")).unwrap();
    outbox.create_table(&client).await.unwrap();

    let tx = client.transaction().await.unwrap();
    outbox
        .write(&tx, "orders", "lost", &numbered("lost", 0))
        .await
        .unwrap();
    tx.rollback().await.unwrap();

    let tx = client.transaction().await.unwrap();
    for n in 0..10 {
        let key = if n % 2 == 0 { "a" } else { "b" };
        outbox
            .write(&tx, "orders", key, &numbered(key, n))
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    assert_eq!(outbox.unsent(&client).await.unwrap(), 10);

    let bus = MemoryBus::with_partitions(3);
    let mut relay = outbox.relay(pool(), bus.clone()).batch_size(4);
    let mut published = 0;
    loop {
        let n = relay.relay_once().await.unwrap();
        if n == 0 {
            break;
        }
        published += n;
    }
    assert_eq!(published, 10);
    assert_eq!(outbox.unsent(&client).await.unwrap(), 0);
    let mut per_key: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for r in bus.records("orders") {
        let (key, n) = decode(&r).into_data();
        assert_eq!(r.key.as_deref(), Some(key.as_bytes()));
        per_key.entry(key).or_default().push(n);
    }
    assert_eq!(per_key["a"], [0, 2, 4, 6, 8]);
    assert_eq!(per_key["b"], [1, 3, 5, 7, 9]);
    assert!(!per_key.contains_key("lost"));
    assert_eq!(
        outbox.purge_sent(&client, Duration::ZERO).await.unwrap(),
        10
    );
}

#[tokio::test]
async fn two_relays_never_publish_a_row_twice_and_keep_key_order() {
    let mut client = connect().await;
    let s = schema(&client).await;
    let outbox = PgOutbox::new(&format!("{s}.outbox")).unwrap();
    outbox.create_table(&client).await.unwrap();
    let keys = ["k0", "k1", "k2", "k3", "k4"];
    let tx = client.transaction().await.unwrap();
    for n in 0..200u32 {
        let key = keys[n as usize % keys.len()];
        outbox
            .write(&tx, "orders", key, &numbered(key, n))
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();

    let bus = MemoryBus::with_partitions(2);
    let mut relays = Vec::new();
    for _ in 0..2 {
        let mut relay = outbox.relay(pool(), bus.clone()).batch_size(7);
        relays.push(tokio::spawn(async move {
            let mut total = 0;
            let mut idle = 0;
            // Stop after a few empty rounds: the other relay may hold rows.
            while idle < 5 {
                match relay.relay_once().await.unwrap() {
                    0 => {
                        idle += 1;
                        tokio::task::yield_now().await;
                    }
                    n => {
                        idle = 0;
                        total += n;
                    }
                }
            }
            total
        }));
    }
    let mut totals = Vec::new();
    for relay in relays {
        totals.push(within(SETTLE, "a relay", relay).await.unwrap());
    }
    let mut last = outbox.relay(pool(), bus.clone());
    while last.relay_once().await.unwrap() > 0 {}
    assert_eq!(outbox.unsent(&client).await.unwrap(), 0);

    let records = bus.records("orders");
    let mut ids = HashSet::new();
    let mut per_key: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for r in &records {
        let event = decode(r);
        assert!(
            ids.insert(event.id().to_owned()),
            "published twice: {}",
            event.id()
        );
        let (key, n) = event.into_data();
        per_key.entry(key).or_default().push(n);
    }
    assert_eq!(records.len(), 200, "relays published {totals:?}");
    for (i, key) in keys.iter().enumerate() {
        let expected: Vec<u32> = (0..200).filter(|n| *n as usize % 5 == i).collect();
        assert_eq!(per_key[*key], expected, "order of {key}");
    }
}

/// Publishes, then never returns: a relay "killed" after the publish and
/// before it marks the rows.
struct DiesAfterPublish(MemoryBus);

impl Publisher for DiesAfterPublish {
    fn publish_records<'a>(
        &'a self,
        topic: &'a str,
        records: Vec<Record>,
    ) -> BoxFuture<'a, micro_events::Result<Vec<Delivery>>> {
        Box::pin(async move {
            self.0.publish_records(topic, records).await?;
            std::future::pending().await
        })
    }
}

#[tokio::test]
async fn a_relay_killed_before_marking_publishes_again_and_the_inbox_absorbs_it() {
    let mut client = connect().await;
    let s = schema(&client).await;
    let outbox = PgOutbox::new(&format!("{s}.outbox")).unwrap();
    outbox.create_table(&client).await.unwrap();
    let inbox = PgInbox::new(&format!("{s}.inbox")).unwrap();
    inbox.create_table(&client).await.unwrap();
    client
        .batch_execute(&format!("CREATE TABLE {s}.ledger (n int)"))
        .await
        .unwrap();
    let tx = client.transaction().await.unwrap();
    for n in 0..5 {
        outbox
            .write(&tx, "payments", "o-1", &numbered("o-1", n))
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();

    let bus = MemoryBus::with_partitions(1);
    let mut doomed = outbox.relay(pool(), DiesAfterPublish(bus.clone()));
    let killed = tokio::spawn(async move { doomed.relay_once().await });
    eventually(SETTLE, "the doomed publish", || {
        (bus.records("payments").len() == 5).then_some(())
    })
    .await;
    killed.abort();
    let _ = killed.await;

    // Its connection is gone, its transaction rolled back: the rows wait again.
    let mut relay = outbox.relay(pool(), bus.clone());
    let mut republished = 0;
    let give_up = tokio::time::Instant::now() + SETTLE;
    while republished < 5 {
        republished += relay.relay_once().await.unwrap();
        assert!(
            tokio::time::Instant::now() < give_up,
            "rows never republished"
        );
        tokio::task::yield_now().await;
    }
    assert_eq!(
        bus.records("payments").len(),
        10,
        "each event twice on the bus"
    );

    let db = Arc::new(Mutex::new(connect().await));
    let (db2, inbox2, schema2) = (db.clone(), inbox.clone(), s.clone());
    let sub = bus
        .subscribe_with(
            "payments",
            "ledger",
            fast(),
            move |e: Received<(String, u32)>| {
                let (db, inbox, s) = (db2.clone(), inbox2.clone(), schema2.clone());
                async move {
                    let mut client = db.lock().await;
                    let tx = client.transaction().await?;
                    if inbox.claim(&tx, "ledger", e.id()).await? {
                        tx.execute(
                            &format!("INSERT INTO {s}.ledger VALUES ($1)"),
                            &[&(e.data().1 as i32)],
                        )
                        .await?;
                    }
                    tx.commit().await?;
                    Ok::<_, micro_core::error::BoxError>(())
                }
            },
        )
        .await
        .unwrap();
    eventually(SETTLE, "ten commits", || {
        (bus.committed("payments", "ledger").get(&0) == Some(&10)).then_some(())
    })
    .await;
    sub.shutdown().await.unwrap();
    let rows = db
        .lock()
        .await
        .query(&format!("SELECT n FROM {s}.ledger ORDER BY n"), &[])
        .await
        .unwrap();
    let ledger: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(ledger, [0, 1, 2, 3, 4], "each payment applied once");
}

#[tokio::test]
async fn a_running_relay_publishes_rows_as_they_commit_and_stops_on_shutdown() {
    let mut client = connect().await;
    let s = schema(&client).await;
    let outbox = PgOutbox::new(&format!("{s}.outbox")).unwrap();
    outbox.create_table(&client).await.unwrap();
    let bus = MemoryBus::with_partitions(1);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let relay = tokio::spawn(
        outbox
            .relay(pool(), bus.clone())
            .poll_interval(Duration::from_millis(20))
            .run(async {
                let _ = stopped.await;
            }),
    );
    for n in 0..3 {
        let tx = client.transaction().await.unwrap();
        outbox
            .write(&tx, "orders", "o-1", &numbered("o-1", n))
            .await
            .unwrap();
        tx.commit().await.unwrap();
        eventually(SETTLE, "the row on the bus", || {
            (bus.records("orders").len() == n as usize + 1).then_some(())
        })
        .await;
    }
    stop.send(()).unwrap();
    within(SETTLE, "the relay to stop", relay)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(outbox.unsent(&client).await.unwrap(), 0);
}

async fn backend_pid(client: &Client) -> i32 {
    client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0)
}

/// Whether the backend `waiting` is blocked by the backend `holder`.
async fn blocked_by(client: &Client, waiting: i32, holder: i32) -> bool {
    client
        .query_one(
            "SELECT $2 = ANY(pg_blocking_pids($1))",
            &[&waiting, &holder],
        )
        .await
        .unwrap()
        .get(0)
}

async fn relay_all<P: Publisher>(relay: &mut micro_events::postgres::PgRelay<P>) -> usize {
    let mut total = 0;
    loop {
        match relay.relay_once().await.unwrap() {
            0 => return total,
            n => total += n,
        }
    }
}

fn per_key(bus: &MemoryBus, topic: &str) -> BTreeMap<String, Vec<u32>> {
    let mut per_key: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for r in bus.records(topic) {
        let (key, n) = decode(&r).into_data();
        per_key.entry(key).or_default().push(n);
    }
    per_key
}

/// A transaction that wrote a key and stays open holds back the next writer
/// of that key, not the key's readers or other keys: the key's events are
/// published in commit order, and none is passed over.
#[tokio::test]
async fn a_key_s_events_are_published_in_commit_order_while_a_writer_holds_it_open() {
    let bus = MemoryBus::with_partitions(2);
    hold_a_key_open(bus.clone(), "orders").await;
    let published = per_key(&bus, "orders");
    assert_eq!(published["k"], [0, 2, 1], "k in commit order");
    assert_eq!(published["j"], [100, 101]);
}

/// The same on the real broker: what a fresh consumer group reads from
/// Kafka (tansu) is each key's events in commit order.
#[cfg(feature = "kafka")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_kafka_a_key_s_events_arrive_in_commit_order() {
    use micro_events::kafka::KafkaBus;

    let bus = KafkaBus::new(crate::kafka::config()).unwrap();
    let topic = crate::support::unique("outbox");
    bus.create_topic(&topic, 2, 1).await.unwrap();
    bus.create_topic(&format!("{topic}.dlq"), 2, 1)
        .await
        .unwrap();
    hold_a_key_open(bus.clone(), &topic).await;

    let received: Log<(String, u32)> = Log::new();
    let log = received.clone();
    let sub = bus
        .subscribe_with(
            &topic,
            "checker",
            fast(),
            move |e: Received<(String, u32)>| {
                let log = log.clone();
                async move {
                    log.push(e.data().clone());
                    Ok::<_, std::io::Error>(())
                }
            },
        )
        .await
        .unwrap();
    eventually(Duration::from_secs(60), "five events from Kafka", || {
        (received.len() >= 5).then_some(())
    })
    .await;
    sub.shutdown().await.unwrap();
    let mut per_key: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for (key, n) in received.snapshot() {
        per_key.entry(key).or_default().push(n);
    }
    assert_eq!(per_key["k"], [0, 2, 1], "k in commit order");
    assert_eq!(per_key["j"], [100, 101]);
}

/// Writes, in this order: `k`:0 (first transaction, held open), `j`:100
/// (committed, published alone), `j`:101 and `k`:1 (second transaction,
/// which must wait for the first), `k`:2 (first), then commits the first and
/// the second; relays to `publisher` on `topic` along the way, and checks
/// that nothing is published while `k` is held and nothing is left unsent.
async fn hold_a_key_open<P: Publisher>(publisher: P, topic: &str) {
    let client = connect().await;
    let s = schema(&client).await;
    let outbox = PgOutbox::new(&format!("{s}.outbox")).unwrap();
    outbox.create_table(&client).await.unwrap();
    let mut relay = outbox.relay(pool(), publisher);

    // First: writes k and stays open.
    let mut first = connect().await;
    let first_pid = backend_pid(&first).await;
    let first_tx = first.transaction().await.unwrap();
    outbox
        .write(&first_tx, topic, "k", &numbered("k", 0))
        .await
        .unwrap();

    // Another key is not held back.
    let mut other = connect().await;
    let tx = other.transaction().await.unwrap();
    outbox
        .write(&tx, topic, "j", &numbered("j", 100))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(relay_all(&mut relay).await, 1, "j's event, alone");

    // Second: writes k (after an unrelated key) and must wait for first.
    let mut second = connect().await;
    let second_pid = backend_pid(&second).await;
    let (outbox2, topic2) = (outbox.clone(), topic.to_owned());
    let second_done = tokio::spawn(async move {
        let tx = second.transaction().await.unwrap();
        outbox2
            .write(&tx, &topic2, "j", &numbered("j", 101))
            .await
            .unwrap();
        outbox2
            .write(&tx, &topic2, "k", &numbered("k", 1))
            .await
            .unwrap();
        tx.commit().await.unwrap();
    });
    let give_up = tokio::time::Instant::now() + SETTLE;
    while !blocked_by(&client, second_pid, first_pid).await {
        assert!(
            tokio::time::Instant::now() < give_up,
            "the second writer of k never waited for the first"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        relay_all(&mut relay).await,
        0,
        "nothing of k (nor the second writer's j) is visible yet"
    );

    // First writes k once more, then commits; second then goes on.
    outbox
        .write(&first_tx, topic, "k", &numbered("k", 2))
        .await
        .unwrap();
    first_tx.commit().await.unwrap();
    within(SETTLE, "the second writer", second_done)
        .await
        .unwrap();

    assert_eq!(relay_all(&mut relay).await, 4);
    assert_eq!(outbox.unsent(&client).await.unwrap(), 0, "nothing skipped");
}

/// Many writers on a few keys, each holding its transaction open for a
/// while after writing, with a relay running all along: every event is
/// published once, and each key's events in the order of their row ids,
/// which the writers drew in commit order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_and_a_running_relay_keep_every_key_in_order() {
    let client = connect().await;
    let s = schema(&client).await;
    let outbox = PgOutbox::new(&format!("{s}.outbox")).unwrap();
    outbox.create_table(&client).await.unwrap();
    let bus = MemoryBus::with_partitions(2);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let relay = tokio::spawn(
        outbox
            .relay(pool(), bus.clone())
            .batch_size(5)
            .poll_interval(Duration::from_millis(1))
            .run(async {
                let _ = stopped.await;
            }),
    );

    const WRITERS: u32 = 8;
    const ROUNDS: u32 = 15;
    let keys = ["a", "b"];
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let outbox = outbox.clone();
        writers.push(tokio::spawn(async move {
            let mut client = connect().await;
            for r in 0..ROUNDS {
                let key = keys[((w + r) % 2) as usize];
                let tx = client.transaction().await.unwrap();
                outbox
                    .write(&tx, "orders", key, &numbered(key, w * 1000 + r))
                    .await
                    .unwrap();
                // Stay open a little, varying per writer, so that
                // transactions of one key would commit out of id order
                // if nothing ordered them.
                tokio::time::sleep(Duration::from_millis(u64::from((w * 7 + r * 3) % 10))).await;
                tx.commit().await.unwrap();
            }
        }));
    }
    for writer in writers {
        within(SETTLE, "a writer", writer).await.unwrap();
    }
    stop.send(()).unwrap();
    within(SETTLE, "the relay's last round", relay)
        .await
        .unwrap()
        .unwrap();

    assert_eq!(outbox.unsent(&client).await.unwrap(), 0, "nothing skipped");
    // Row id of each event, by its number.
    let rows = client
        .query(&format!("SELECT id, payload FROM {s}.outbox"), &[])
        .await
        .unwrap();
    let mut row_of: BTreeMap<u32, i64> = BTreeMap::new();
    for row in rows {
        let payload: Vec<u8> = row.get(1);
        let (_, n): (String, u32) = serde_json::from_slice(&payload).unwrap();
        row_of.insert(n, row.get(0));
    }
    let published = per_key(&bus, "orders");
    let total: usize = published.values().map(Vec::len).sum();
    assert_eq!(total, (WRITERS * ROUNDS) as usize, "each event once");
    for (key, numbers) in &published {
        let ids: Vec<i64> = numbers.iter().map(|n| row_of[n]).collect();
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "{key} published out of order: rows {ids:?}"
        );
    }
}
