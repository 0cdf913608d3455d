//! The PostgreSQL inbox and outbox against the real server
//! (`MICRO_TEST_POSTGRES_URL`, default `postgres://postgres@127.0.0.1:5432/test`).
//! Each test works in a fresh schema.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use micro_core::service::BoxFuture;
use micro_events::inbox::Inbox;
use micro_events::postgres::{PgInbox, PgInboxStore, PgOutbox};
use micro_events::{
    Delivery, Event, MemoryBus, Publisher, Received, Record, SubscribeOptions, SubscriberExt,
};
use tokio::sync::Mutex;
use tokio_postgres::{Client, NoTls};

use crate::support::{eventually, within, Log};

pub(crate) async fn connect() -> Client {
    let url = std::env::var("MICRO_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
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
    let store = PgInboxStore::new(Arc::new(client), inbox);

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

fn decode(record: &micro_events::ReceivedRecord) -> Event<(String, u32)> {
    Event::from_binary(record.headers.clone(), &record.payload).unwrap()
}

fn numbered(key: &str, n: u32) -> Event<(String, u32)> {
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
    let mut relay = outbox.relay(connect().await, bus.clone()).batch_size(4);
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
        let mut relay = outbox.relay(connect().await, bus.clone()).batch_size(7);
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
    let mut last = outbox.relay(connect().await, bus.clone());
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
    let mut doomed = outbox.relay(connect().await, DiesAfterPublish(bus.clone()));
    let killed = tokio::spawn(async move { doomed.relay_once().await });
    eventually(SETTLE, "the doomed publish", || {
        (bus.records("payments").len() == 5).then_some(())
    })
    .await;
    killed.abort();
    let _ = killed.await;

    // Its connection is gone, its transaction rolled back: the rows wait again.
    let mut relay = outbox.relay(connect().await, bus.clone());
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
            .relay(connect().await, bus.clone())
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
