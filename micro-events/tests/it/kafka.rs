//! The Kafka bus against a real Kafka protocol broker: tansu, started by
//! `scripts/tansu.sh`, found through `MICRO_TEST_KAFKA_BROKERS` (default
//! `127.0.0.1:19092`). Each test makes topics of its own.

use std::time::Duration;

use micro_events::kafka::{KafkaBus, KafkaConfig};

use crate::conformance::{conformance_tests, Backend};
use crate::support::unique;

pub(crate) fn brokers() -> String {
    let brokers =
        std::env::var("MICRO_TEST_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:19092".to_owned());
    let first = brokers.split(',').next().unwrap_or_default();
    if let Err(e) = std::net::TcpStream::connect_timeout(
        &first
            .parse()
            .expect("MICRO_TEST_KAFKA_BROKERS is host:port"),
        Duration::from_secs(5),
    ) {
        panic!(
            "the Kafka broker is not reachable at {brokers} ({e}); run scripts/tansu.sh's tansu_up"
        );
    }
    brokers
}

/// The settings the tests use: a crashed member is evicted quickly, and
/// offsets are committed often.
pub(crate) fn config() -> KafkaConfig {
    KafkaConfig::new(brokers())
        .session_timeout(Duration::from_secs(6))
        .max_poll_interval(Duration::from_secs(10))
        .commit_interval(Duration::from_millis(100))
        .close_timeout(Duration::from_secs(10))
}

pub(crate) struct Kafka {
    bus: KafkaBus,
}

impl Backend for Kafka {
    type Bus = KafkaBus;

    async fn new() -> Self {
        Self {
            bus: KafkaBus::new(config()).unwrap(),
        }
    }

    fn bus(&self) -> KafkaBus {
        self.bus.clone()
    }

    async fn topic(&self, partitions: i32) -> String {
        let topic = unique("t");
        self.bus.create_topic(&topic, partitions, 1).await.unwrap();
        self.bus
            .create_topic(&format!("{topic}.dlq"), partitions, 1)
            .await
            .unwrap();
        topic
    }

    fn settle(&self) -> Duration {
        Duration::from_secs(60)
    }
}

conformance_tests!(Kafka, (flavor = "multi_thread", worker_threads = 2));

/// Events cross between our bus and kafka-python, an independent client in
/// another language, with every CloudEvents attribute intact.
mod interop {
    use std::process::Command;

    use micro_events::{Event, PublisherExt, Received, SubscribeOptions, SubscriberExt};
    use serde_json::{json, Value};

    use super::*;
    use crate::support::{eventually, Log};

    fn python(script: &str, envs: &[(&str, &str)]) -> String {
        let output = Command::new("python3")
            .arg("-c")
            .arg(script)
            .envs(envs.iter().copied())
            .output()
            .expect("python3 runs");
        assert!(
            output.status.success(),
            "python failed (is kafka-python installed? scripts/tansu.sh installs it): {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    const READ_ONE: &str = r#"
import json, os
from kafka import KafkaConsumer
consumer = KafkaConsumer(
    os.environ["TOPIC"],
    bootstrap_servers=os.environ["BROKERS"],
    auto_offset_reset="earliest",
    consumer_timeout_ms=60000,
)
for m in consumer:
    print(json.dumps({
        "key": m.key.decode(),
        "headers": {k: v.decode() for k, v in m.headers},
        "value": json.loads(m.value),
    }))
    break
consumer.close()
"#;

    const WRITE_ONE: &str = r#"
import json, os
from kafka import KafkaProducer
producer = KafkaProducer(bootstrap_servers=os.environ["BROKERS"])
headers = [
    ("ce_specversion", b"1.0"),
    ("ce_id", b"py-1"),
    ("ce_source", b"/python-service"),
    ("ce_type", b"shop.python.said"),
    ("ce_subject", b"o-9"),
    ("ce_time", b"2024-05-06T07:08:09Z"),
    ("ce_traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
    ("ce_correlationid", b"conv-1"),
    ("ce_schemaversion", b"2"),
    ("content-type", b"application/json"),
]
producer.send(os.environ["TOPIC"], key=b"o-9", value=json.dumps({"hello": "rust"}).encode(), headers=headers)
producer.flush()
producer.close()
"#;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn kafka_python_reads_our_events() {
        let backend = Kafka::new().await;
        let topic = backend.topic(1).await;
        let cause = Event::new("/order-service", "shop.order.created", ()).unwrap();
        let event = Event::builder(
            "/payment-service",
            "shop.payment.processed",
            json!({"amount": 5}),
        )
        .subject("o-1")
        .data_schema("https://schemas.example/payment/1")
        .schema_version(1)
        .traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
        .tracestate("vendor=1")
        .caused_by(&cause)
        .build()
        .unwrap();
        backend.bus().publish(&topic, "o-1", &event).await.unwrap();
        let brokers = brokers();
        let out = tokio::task::spawn_blocking(move || {
            python(READ_ONE, &[("TOPIC", &topic), ("BROKERS", &brokers)])
        })
        .await
        .unwrap();
        let read: Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(read["key"], "o-1");
        assert_eq!(read["value"], json!({"amount": 5}));
        let h = &read["headers"];
        assert_eq!(h["ce_specversion"], "1.0");
        assert_eq!(h["ce_id"], event.id());
        assert_eq!(h["ce_source"], "/payment-service");
        assert_eq!(h["ce_type"], "shop.payment.processed");
        assert_eq!(h["ce_subject"], "o-1");
        assert_eq!(h["ce_dataschema"], "https://schemas.example/payment/1");
        assert_eq!(
            h["ce_time"],
            event
                .to_binary_headers()
                .iter()
                .find(|(n, _)| n == "ce_time")
                .map(|(_, v)| String::from_utf8(v.clone()).unwrap())
                .unwrap()
        );
        assert_eq!(h["ce_traceparent"], event.traceparent().unwrap());
        assert_eq!(h["ce_tracestate"], "vendor=1");
        assert_eq!(h["ce_correlationid"], cause.id());
        assert_eq!(h["ce_causationid"], cause.id());
        assert_eq!(h["ce_schemaversion"], "1");
        assert_eq!(h["content-type"], "application/json");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn we_read_events_kafka_python_wrote() {
        let backend = Kafka::new().await;
        let topic = backend.topic(1).await;
        let brokers = brokers();
        let t = topic.clone();
        tokio::task::spawn_blocking(move || {
            python(WRITE_ONE, &[("TOPIC", &t), ("BROKERS", &brokers)])
        })
        .await
        .unwrap();
        let seen = Log::new();
        let log = seen.clone();
        let sub = backend
            .bus()
            .subscribe_with(
                &topic,
                &unique("g"),
                SubscribeOptions::new(),
                move |e: Received<Value>| {
                    let log = log.clone();
                    async move {
                        log.push((e.key().map(<[u8]>::to_vec), e.into_event()));
                        Ok::<_, std::io::Error>(())
                    }
                },
            )
            .await
            .unwrap();
        eventually(backend.settle(), "the python event", || {
            (seen.len() == 1).then_some(())
        })
        .await;
        sub.shutdown().await.unwrap();
        let (key, event) = seen.snapshot().remove(0);
        assert_eq!(key.as_deref(), Some(&b"o-9"[..]));
        assert_eq!(event.id(), "py-1");
        assert_eq!(event.source(), "/python-service");
        assert_eq!(event.event_type(), "shop.python.said");
        assert_eq!(event.subject(), Some("o-9"));
        assert_eq!(
            event.time(),
            Some(time::macros::datetime!(2024-05-06 07:08:09 UTC))
        );
        assert_eq!(
            event.traceparent(),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        );
        assert_eq!(event.correlation_id(), Some("conv-1"));
        assert_eq!(event.schema_version(), Some(2));
        assert_eq!(event.data(), &json!({"hello": "rust"}));
    }
}

/// A consumer process killed with SIGKILL mid-stream, and restarted, loses
/// nothing and, with the inbox, applies nothing twice.
#[cfg(feature = "postgres")]
mod crash {
    use std::process::{Command, Stdio};
    use std::sync::Arc;

    use micro_events::postgres::PgInbox;
    use micro_events::{Event, PublisherExt, Received, SubscribeOptions, SubscriberExt};
    use tokio::sync::Mutex;
    use tokio_postgres::Client;

    use super::*;
    use crate::postgres::{connect, schema};
    use crate::support::within;

    const EVENTS: u32 = 120;
    const CHILD: &str = "kafka::crash::consumer_child";

    /// Applies each event to the ledger in one transaction with its inbox claim.
    pub(super) async fn subscribe(
        bus: &KafkaBus,
        topic: &str,
        group: &str,
        schema: &str,
    ) -> micro_events::Subscription {
        let db = Arc::new(Mutex::new(connect().await));
        let inbox = PgInbox::new(&format!("{schema}.inbox")).unwrap();
        let schema = schema.to_owned();
        bus.subscribe_with(
            topic,
            group,
            SubscribeOptions::new(),
            move |e: Received<u32>| {
                let (db, inbox, schema) = (db.clone(), inbox.clone(), schema.clone());
                async move {
                    // Some work per event, so that the kill lands mid-stream.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    let mut client = db.lock().await;
                    let tx = client.transaction().await?;
                    if inbox.claim(&tx, "ledger", e.id()).await? {
                        tx.execute(
                            &format!("INSERT INTO {schema}.ledger VALUES ($1)"),
                            &[&(*e.data() as i32)],
                        )
                        .await?;
                    }
                    tx.commit().await?;
                    Ok::<_, micro_core::error::BoxError>(())
                }
            },
        )
        .await
        .unwrap()
    }

    /// How many events the ledger holds, and how many distinct ones.
    pub(super) async fn applied(client: &Client, schema: &str) -> (i64, i64) {
        let row = client
            .query_one(
                &format!("SELECT count(*), count(DISTINCT n) FROM {schema}.ledger"),
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    }

    /// The consumer process: runs only when the crash test starts it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "started by a_consumer_killed_mid_stream_loses_nothing"]
    async fn consumer_child() {
        let (Ok(topic), Ok(group), Ok(schema)) = (
            std::env::var("CRASH_TOPIC"),
            std::env::var("CRASH_GROUP"),
            std::env::var("CRASH_SCHEMA"),
        ) else {
            return;
        };
        let bus = KafkaBus::new(config()).unwrap();
        let _sub = subscribe(&bus, &topic, &group, &schema).await;
        std::future::pending::<()>().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_consumer_killed_mid_stream_loses_nothing() {
        let backend = Kafka::new().await;
        let topic = backend.topic(2).await;
        let group = unique("g");
        let client = connect().await;
        let schema = schema(&client).await;
        PgInbox::new(&format!("{schema}.inbox"))
            .unwrap()
            .create_table(&client)
            .await
            .unwrap();
        client
            .batch_execute(&format!("CREATE TABLE {schema}.ledger (n int)"))
            .await
            .unwrap();
        // One record per batch (each publish awaits its confirmation): the
        // broker's memory engine cannot resume inside a batch.
        for n in 0..EVENTS {
            let key = format!("k{}", n % 7);
            backend
                .bus()
                .publish(&topic, &key, &Event::new("/crash", "test.n", n).unwrap())
                .await
                .unwrap();
        }

        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([CHILD, "--exact", "--ignored", "--nocapture"])
            .env("CRASH_TOPIC", &topic)
            .env("CRASH_GROUP", &group)
            .env("CRASH_SCHEMA", &schema)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut before = (0, 0);
        let give_up = tokio::time::Instant::now() + backend.settle();
        while before.0 < 30 {
            assert!(
                tokio::time::Instant::now() < give_up,
                "the child applied {before:?}"
            );
            assert!(child.try_wait().unwrap().is_none(), "the child exited");
            tokio::time::sleep(Duration::from_millis(20)).await;
            before = applied(&client, &schema).await;
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let at_kill = applied(&client, &schema).await;
        assert!(
            at_kill.0 < i64::from(EVENTS),
            "killed mid-stream, not after: {at_kill:?}"
        );

        let bus = backend.bus();
        let sub = subscribe(&bus, &topic, &group, &schema).await;
        let give_up = tokio::time::Instant::now() + Duration::from_secs(120);
        loop {
            let now = applied(&client, &schema).await;
            if now.1 == i64::from(EVENTS) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < give_up,
                "after the restart: {now:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        within(Duration::from_secs(30), "shutdown", sub.shutdown())
            .await
            .unwrap();
        let (total, distinct) = applied(&client, &schema).await;
        assert_eq!(distinct, i64::from(EVENTS), "nothing lost");
        assert_eq!(total, distinct, "nothing applied twice");
    }
}

/// The broker killed and started again while events flow both ways: a broker of the
/// test's own on PostgreSQL storage, which keeps records and committed offsets across
/// its restart. The producer's sends wait out the outage (librdkafka retries them until
/// `message.timeout.ms`), a send that still fails is sent again with the same event id,
/// and the consumer resumes from its committed offsets: every event arrives, and the
/// inbox applies each once.
#[cfg(feature = "postgres")]
mod broker_restart {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    use micro_events::postgres::PgInbox;
    use micro_events::{Event, PublisherExt};

    use super::crash::{applied, subscribe};
    use super::*;
    use crate::postgres::{connect, schema};
    use crate::support::within;
    use crate::tansu::Tansu;

    const EVENTS: u32 = 240;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_broker_restarted_mid_stream_loses_nothing() {
        let mut tansu = Tansu::start().await;
        let bus = KafkaBus::new(
            KafkaConfig::new(tansu.brokers())
                .session_timeout(Duration::from_secs(6))
                .max_poll_interval(Duration::from_secs(10))
                .commit_interval(Duration::from_millis(100))
                .close_timeout(Duration::from_secs(10)),
        )
        .unwrap();
        let topic = unique("t");
        for name in [topic.clone(), format!("{topic}.dlq")] {
            bus.create_topic(&name, 2, 1).await.unwrap();
        }
        let client = connect().await;
        let schema = schema(&client).await;
        PgInbox::new(&format!("{schema}.inbox"))
            .unwrap()
            .create_table(&client)
            .await
            .unwrap();
        client
            .batch_execute(&format!("CREATE TABLE {schema}.ledger (n int)"))
            .await
            .unwrap();
        let group = unique("g");
        let sub = subscribe(&bus, &topic, &group, &schema).await;

        // Published one at a time, as an outbox relay does; a send that fails is sent
        // again with the same event.
        let resent = Arc::new(AtomicU32::new(0));
        let publisher = {
            let (bus, topic, resent) = (bus.clone(), topic.clone(), resent.clone());
            tokio::spawn(async move {
                for n in 0..EVENTS {
                    let event = Event::new("/restart", "test.n", n).unwrap();
                    let key = format!("k{}", n % 7);
                    while let Err(e) = bus.publish(&topic, &key, &event).await {
                        tracing::warn!(error = %e, "publishing failed; sending again");
                        resent.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
        };

        // Two outages, each while events are being both published and consumed.
        for at in [EVENTS / 4, EVENTS / 2] {
            let give_up = tokio::time::Instant::now() + Duration::from_secs(120);
            loop {
                let now = applied(&client, &schema).await;
                if now.1 >= i64::from(at) {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < give_up,
                    "only {now:?} applied before the outage at {at}; broker log {}",
                    tansu.log().display()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            tansu.kill();
            // The outage itself, not a wait for something to happen.
            tokio::time::sleep(Duration::from_secs(3)).await;
            tansu.restart();
        }

        within(Duration::from_secs(120), "the publisher", publisher)
            .await
            .unwrap();
        let give_up = tokio::time::Instant::now() + Duration::from_secs(120);
        loop {
            let now = applied(&client, &schema).await;
            if now.1 == i64::from(EVENTS) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < give_up,
                "after the restarts only {now:?} of {EVENTS} arrived; broker log {}",
                tansu.log().display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        within(Duration::from_secs(30), "shutdown", sub.shutdown())
            .await
            .unwrap();
        let (total, distinct) = applied(&client, &schema).await;
        assert_eq!(distinct, i64::from(EVENTS), "nothing lost");
        assert_eq!(total, distinct, "nothing applied twice");
        eprintln!(
            "broker restarted twice: {EVENTS} events delivered, {} sends repeated",
            resent.load(Ordering::Relaxed)
        );
    }
}

/// Consumer lag from librdkafka's statistics: the events not finished yet.
mod lag {
    use micro_events::{Event, PublisherExt, Received, SubscribeOptions, SubscriberExt};
    use tokio::sync::Semaphore;

    use super::*;
    use crate::support::eventually;

    /// The lag gauge of `topic` as Prometheus renders it.
    fn lag(handle: &micro_core::metrics::PrometheusHandle, topic: &str) -> Option<f64> {
        handle
            .render()
            .lines()
            .filter(|l| l.starts_with("micro_events_consumer_lag{"))
            .find(|l| l.contains(&format!("topic=\"{topic}\"")))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn consumer_lag_counts_the_unfinished_events() {
        // The statistics arrive on librdkafka's threads: only the global
        // recorder sees them (the one a ServiceHost installs).
        let handle = micro_core::metrics::install_prometheus().unwrap();

        let bus = KafkaBus::new(config().lag_interval(Duration::from_millis(100))).unwrap();
        let topic = unique("t");
        bus.create_topic(&topic, 1, 1).await.unwrap();
        for n in 0..10u32 {
            bus.publish(&topic, "k", &Event::new("/lag", "test.n", n).unwrap())
                .await
                .unwrap();
        }
        // Events from 3 on wait for permits: 7 stay unfinished.
        let gate = std::sync::Arc::new(Semaphore::new(0));
        let g = gate.clone();
        let sub = bus
            .subscribe_with(
                &topic,
                &unique("g"),
                SubscribeOptions::new(),
                move |e: Received<u32>| {
                    let gate = g.clone();
                    async move {
                        if *e.data() >= 3 {
                            gate.acquire().await?.forget();
                        }
                        Ok::<_, micro_core::error::BoxError>(())
                    }
                },
            )
            .await
            .unwrap();
        eventually(Duration::from_secs(60), "a lag of 7", || {
            (lag(&handle, &topic) == Some(7.0)).then_some(())
        })
        .await;
        gate.add_permits(7);
        eventually(Duration::from_secs(60), "no lag", || {
            (lag(&handle, &topic) == Some(0.0)).then_some(())
        })
        .await;
        sub.shutdown().await.unwrap();
    }
}
