//! Publish and consume throughput: the memory bus, the Kafka bus, and raw
//! rdkafka producing and consuming the same messages (the ceiling for the
//! Kafka bus), side by side in one run.
//!
//! The Kafka groups run when `MICRO_TEST_KAFKA_BROKERS` names a broker
//! (`scripts/tansu.sh` starts one); otherwise only the memory bus is measured.
//!
//! ```text
//! cargo bench -p micro-events --features kafka --bench throughput
//! ```

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use micro_events::kafka::{KafkaBus, KafkaConfig};
use micro_events::{
    Event, MemoryBus, Publisher, PublisherExt, Received, SubscribeOptions, SubscriberExt,
};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use serde::{Deserialize, Serialize};

const EVENTS: usize = 2_000;
const KEYS: usize = 64;

#[derive(Clone, Serialize, Deserialize)]
struct Payload {
    order_id: String,
    total_minor: i64,
}

fn events() -> Vec<(String, Event<Payload>)> {
    (0..EVENTS)
        .map(|i| {
            let key = format!("order-{}", i % KEYS);
            let event = Event::builder(
                "/bench",
                "bench.order.created",
                Payload {
                    order_id: key.clone(),
                    total_minor: i as i64,
                },
            )
            .build()
            .unwrap();
            (key, event)
        })
        .collect()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

async fn publish_all<P: Publisher>(bus: &P, topic: &str, events: &[(String, Event<Payload>)]) {
    bus.publish_batch(topic, events.iter().map(|(k, e)| (k.as_str(), e)))
        .await
        .unwrap();
}

/// Subscribes a fresh group and waits until it handled every event; the time
/// from the first event handled to the last (joining the group, which takes
/// most of a second on Kafka, is left out, for the raw consumer as well).
async fn consume_all<S: SubscriberExt>(bus: &S, topic: &str) -> Duration {
    let handled = Arc::new(AtomicUsize::new(0));
    let (done_tx, done) = tokio::sync::watch::channel(false);
    let counter = handled.clone();
    let first = Arc::new(std::sync::OnceLock::new());
    let first_seen = first.clone();
    let sub = bus
        .subscribe_with(
            topic,
            &unique("g"),
            SubscribeOptions::new().max_concurrency(64),
            move |_: Received<Payload>| {
                let counter = counter.clone();
                let done_tx = done_tx.clone();
                first_seen.get_or_init(Instant::now);
                async move {
                    if counter.fetch_add(1, Ordering::Relaxed) + 1 == EVENTS {
                        let _ = done_tx.send(true);
                    }
                    Ok::<_, std::io::Error>(())
                }
            },
        )
        .await
        .unwrap();
    let mut done = done;
    done.wait_for(|d| *d).await.unwrap();
    let elapsed = first.get().expect("an event was handled").elapsed();
    sub.shutdown().await.unwrap();
    elapsed
}

fn raw_producer(brokers: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "5")
        .create()
        .unwrap()
}

async fn raw_publish(producer: &FutureProducer, topic: &str, events: &[(String, Event<Payload>)]) {
    let mut pending = Vec::with_capacity(events.len());
    for (key, event) in events {
        let mut headers = OwnedHeaders::new();
        for (name, value) in event.to_binary_headers() {
            headers = headers.insert(Header {
                key: &name,
                value: Some(&value),
            });
        }
        let payload = event.to_binary_data().unwrap();
        let record = FutureRecord::to(topic)
            .key(key.as_str())
            .payload(&payload)
            .headers(headers);
        pending.push(producer.send_result(record).map_err(|(e, _)| e).unwrap());
    }
    for delivery in pending {
        delivery.await.unwrap().map_err(|(e, _)| e).unwrap();
    }
}

async fn raw_consume(brokers: &str, topic: &str) -> Duration {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique("g"))
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let mut started = None;
    for _ in 0..EVENTS {
        let message = consumer.recv().await.unwrap();
        started.get_or_insert_with(Instant::now);
        // Decode as the bus does, so both do the same work.
        let headers = rdkafka::message::Message::headers(&message).map(|h| {
            rdkafka::message::Headers::iter(h)
                .map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec()))
                .collect::<Vec<_>>()
        });
        let _ = Event::<Payload>::from_binary(
            headers.unwrap_or_default(),
            rdkafka::message::Message::payload(&message).unwrap_or_default(),
        )
        .unwrap();
    }
    let elapsed = started.expect("a message was read").elapsed();
    std::thread::spawn(move || drop(consumer));
    elapsed
}

fn kafka() -> Option<(String, KafkaBus)> {
    let brokers = std::env::var("MICRO_TEST_KAFKA_BROKERS").ok()?;
    let bus = KafkaBus::new(
        KafkaConfig::new(&brokers)
            .session_timeout(Duration::from_secs(6))
            .max_poll_interval(Duration::from_secs(10)),
    )
    .unwrap();
    Some((brokers, bus))
}

fn publish(c: &mut Criterion) {
    let rt = runtime();
    let events = events();
    let mut group = c.benchmark_group("publish");
    group.throughput(Throughput::Elements(EVENTS as u64));
    group.sample_size(10);
    // A fresh bus per iteration: the memory bus keeps every record.
    group.bench_function(BenchmarkId::new("memory", EVENTS), |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let events = &events;
            async move {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let memory = MemoryBus::new();
                    let started = Instant::now();
                    publish_all(&memory, "bench-publish", events).await;
                    total += started.elapsed();
                }
                total
            }
        });
    });
    if let Some((brokers, bus)) = kafka() {
        let topic = unique("bench-publish");
        rt.block_on(bus.create_topic(&topic, 4, 1)).unwrap();
        group.bench_function(BenchmarkId::new("kafka-bus", EVENTS), |b| {
            b.to_async(&rt).iter(|| publish_all(&bus, &topic, &events));
        });
        let producer = raw_producer(&brokers);
        group.bench_function(BenchmarkId::new("raw-rdkafka", EVENTS), |b| {
            b.to_async(&rt)
                .iter(|| raw_publish(&producer, &topic, &events));
        });
    } else {
        eprintln!("MICRO_TEST_KAFKA_BROKERS is not set: measuring the memory bus only");
    }
    group.finish();
}

fn consume(c: &mut Criterion) {
    let rt = runtime();
    let events = events();
    let mut group = c.benchmark_group("consume");
    group.throughput(Throughput::Elements(EVENTS as u64));
    group.sample_size(10);
    let memory = MemoryBus::new();
    rt.block_on(publish_all(&memory, "bench-consume", &events));
    group.bench_function(BenchmarkId::new("memory", EVENTS), |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let memory = memory.clone();
            async move {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    total += consume_all(&memory, "bench-consume").await;
                }
                total
            }
        });
    });
    if let Some((brokers, bus)) = kafka() {
        let topic = unique("bench-consume");
        rt.block_on(async {
            bus.create_topic(&topic, 4, 1).await.unwrap();
            publish_all(&bus, &topic, &events).await;
        });
        group.bench_function(BenchmarkId::new("kafka-bus", EVENTS), |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let (bus, topic) = (bus.clone(), topic.clone());
                async move {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        total += consume_all(&bus, &topic).await;
                    }
                    total
                }
            });
        });
        group.bench_function(BenchmarkId::new("raw-rdkafka", EVENTS), |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let (brokers, topic) = (brokers.clone(), topic.clone());
                async move {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        total += raw_consume(&brokers, &topic).await;
                    }
                    total
                }
            });
        });
    }
    group.finish();
}

criterion_group!(benches, publish, consume);
criterion_main!(benches);
