//! The memory bus: the conformance suite, and what only it can show.

use std::time::Duration;

use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use micro_events::{
    dead_letter_headers as dlq, MemoryBus, Publisher, PublisherExt, Received, Record,
    SubscribeOptions, SubscriberExt,
};

use crate::conformance::{conformance_tests, Backend};
use crate::support::{eventually, unique, Log};

pub(crate) struct Memory {
    bus: MemoryBus,
}

impl Backend for Memory {
    type Bus = MemoryBus;

    async fn new() -> Self {
        Self {
            bus: MemoryBus::new(),
        }
    }

    fn bus(&self) -> MemoryBus {
        self.bus.clone()
    }

    async fn topic(&self, partitions: i32) -> String {
        let topic = unique("t");
        self.bus.create_topic(&topic, partitions).unwrap();
        self.bus
            .create_topic(&format!("{topic}.dlq"), partitions)
            .unwrap();
        topic
    }
}

mod paused {
    use super::*;
    conformance_tests!(Memory, (start_paused = true));
}

mod multi_thread {
    use super::*;
    conformance_tests!(Memory, (flavor = "multi_thread", worker_threads = 2));
}

fn fast() -> SubscribeOptions {
    SubscribeOptions::new().backoff(Duration::from_millis(10), Duration::from_millis(20))
}

#[tokio::test(start_paused = true)]
async fn undecodable_records_are_dead_lettered_without_a_retry() {
    let bus = MemoryBus::with_partitions(1);
    let mut garbage = Record::new(Some(b"k".to_vec()), b"not json".to_vec());
    garbage.headers.push(("ce_id".into(), b"x".to_vec()));
    bus.publish_records("t", vec![garbage]).await.unwrap();
    bus.publish(
        "t",
        "k",
        &micro_events::Event::new("/s", "t", 1u32).unwrap(),
    )
    .await
    .unwrap();
    let seen = Log::new();
    let log = seen.clone();
    let sub = bus
        .subscribe_with("t", "g", fast(), move |e: Received<u32>| {
            let log = log.clone();
            async move {
                log.push(*e.data());
                Ok::<_, std::io::Error>(())
            }
        })
        .await
        .unwrap();
    eventually(Duration::from_secs(5), "the good event", || {
        (seen.len() == 1).then_some(())
    })
    .await;
    sub.shutdown().await.unwrap();
    let letters = bus.records("t.dlq");
    assert_eq!(letters.len(), 1);
    let error = String::from_utf8(letters[0].header(dlq::ERROR).unwrap().to_vec()).unwrap();
    assert!(
        error.starts_with("cannot decode event: missing required attribute"),
        "{error}"
    );
    assert_eq!(letters[0].header(dlq::ATTEMPTS), Some(&b"1"[..]));
    assert_eq!(letters[0].payload, b"not json");
    assert_eq!(bus.committed("t", "g").get(&0), Some(&2));
}

#[tokio::test(start_paused = true)]
async fn members_of_a_group_share_the_partitions() {
    let bus = MemoryBus::with_partitions(4);
    for i in 0..40 {
        let key = format!("k{i}");
        bus.publish("t", &key, &micro_events::Event::new("/s", "t", i).unwrap())
            .await
            .unwrap();
    }
    let (a, b) = (Log::new(), Log::new());
    let mut subs = Vec::new();
    for log in [a.clone(), b.clone()] {
        subs.push(
            bus.subscribe_with("t", "g", fast(), move |e: Received<i32>| {
                let log = log.clone();
                async move {
                    log.push((e.partition(), *e.data()));
                    Ok::<_, std::io::Error>(())
                }
            })
            .await
            .unwrap(),
        );
    }
    eventually(Duration::from_secs(5), "every event", || {
        (a.len() + b.len() >= 40).then_some(())
    })
    .await;
    for sub in subs {
        sub.shutdown().await.unwrap();
    }
    let mut all: Vec<i32> = a
        .snapshot()
        .into_iter()
        .chain(b.snapshot())
        .map(|(_, i)| i)
        .collect();
    all.sort_unstable();
    assert_eq!(all, (0..40).collect::<Vec<_>>(), "each event to one member");
    let pa: std::collections::HashSet<i32> = a.snapshot().into_iter().map(|(p, _)| p).collect();
    let pb: std::collections::HashSet<i32> = b.snapshot().into_iter().map(|(p, _)| p).collect();
    assert!(pa.is_disjoint(&pb), "{pa:?} {pb:?}");

    // Both left having committed everything: a third member sees only what comes next.
    bus.publish("t", "k0", &micro_events::Event::new("/s", "t", 99).unwrap())
        .await
        .unwrap();
    let c = Log::new();
    let log = c.clone();
    let third = bus
        .subscribe_with("t", "g", fast(), move |e: Received<i32>| {
            let log = log.clone();
            async move {
                log.push(*e.data());
                Ok::<_, std::io::Error>(())
            }
        })
        .await
        .unwrap();
    eventually(Duration::from_secs(5), "the next event", || {
        (c.len() == 1).then_some(())
    })
    .await;
    third.shutdown().await.unwrap();
    assert_eq!(c.snapshot(), [99]);
}

#[tokio::test(start_paused = true)]
async fn a_new_member_takes_over_when_one_leaves() {
    let bus = MemoryBus::with_partitions(2);
    let a = Log::new();
    let log = a.clone();
    let first = bus
        .subscribe_with("t", "g", fast(), move |e: Received<i32>| {
            let log = log.clone();
            async move {
                log.push(*e.data());
                Ok::<_, std::io::Error>(())
            }
        })
        .await
        .unwrap();
    for i in 0..4 {
        bus.publish(
            "t",
            &format!("k{i}"),
            &micro_events::Event::new("/s", "t", i).unwrap(),
        )
        .await
        .unwrap();
    }
    eventually(Duration::from_secs(5), "first batch", || {
        (a.len() == 4).then_some(())
    })
    .await;
    first.shutdown().await.unwrap();
    let b = Log::new();
    let log = b.clone();
    let second = bus
        .subscribe_with("t", "g", fast(), move |e: Received<i32>| {
            let log = log.clone();
            async move {
                log.push(*e.data());
                Ok::<_, std::io::Error>(())
            }
        })
        .await
        .unwrap();
    for i in 4..8 {
        bus.publish(
            "t",
            &format!("k{i}"),
            &micro_events::Event::new("/s", "t", i).unwrap(),
        )
        .await
        .unwrap();
    }
    eventually(Duration::from_secs(5), "second batch", || {
        (b.len() == 4).then_some(())
    })
    .await;
    second.shutdown().await.unwrap();
    let mut got = b.snapshot();
    got.sort_unstable();
    assert_eq!(got, [4, 5, 6, 7]);
}

#[test]
fn metrics_count_every_outcome() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap()
            .block_on(async {
                let bus = MemoryBus::with_partitions(1);
                for i in 0..3 {
                    bus.publish("m", "k", &micro_events::Event::new("/s", "t", i).unwrap())
                        .await
                        .unwrap();
                }
                let done = Log::new();
                let log = done.clone();
                let sub = bus
                    .subscribe_with("m", "g", fast().max_attempts(2), move |e: Received<i32>| {
                        let log = log.clone();
                        async move {
                            log.push(());
                            if *e.data() == 1 {
                                return Err(std::io::Error::other("no"));
                            }
                            Ok(())
                        }
                    })
                    .await
                    .unwrap();
                eventually(Duration::from_secs(5), "all attempts", || {
                    (done.len() == 4).then_some(())
                })
                .await;
                eventually(Duration::from_secs(5), "the dead letter", || {
                    (bus.records("m.dlq").len() == 1).then_some(())
                })
                .await;
                sub.shutdown().await.unwrap();
            });
    });
    let metrics: Vec<_> = snapshotter.snapshot().into_vec();
    let value = |name: &str, topic: &str| {
        metrics
            .iter()
            .filter(|(key, ..)| {
                key.key().name() == name
                    && key
                        .key()
                        .labels()
                        .any(|l| l.key() == "topic" && l.value() == topic)
            })
            .map(|(.., v)| v)
            .next()
    };
    assert_eq!(
        value("micro_events_published_total", "m"),
        Some(&DebugValue::Counter(3))
    );
    assert_eq!(
        value("micro_events_published_total", "m.dlq"),
        Some(&DebugValue::Counter(1))
    );
    assert_eq!(
        value("micro_events_consumed_total", "m"),
        Some(&DebugValue::Counter(2))
    );
    assert_eq!(
        value("micro_events_retried_total", "m"),
        Some(&DebugValue::Counter(1))
    );
    assert_eq!(
        value("micro_events_dead_lettered_total", "m"),
        Some(&DebugValue::Counter(1))
    );
    match value("micro_events_handler_duration_seconds", "m") {
        Some(DebugValue::Histogram(samples)) => assert!(!samples.is_empty()),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        value("micro_events_consumer_lag", "m"),
        Some(DebugValue::Gauge(_))
    ));
    let _ = unique("unused");
}

#[tokio::test(start_paused = true)]
async fn the_dead_letter_topic_is_configurable() {
    let bus = MemoryBus::with_partitions(1);
    bus.publish(
        "t",
        "k",
        &micro_events::Event::new("/s", "t", 1u32).unwrap(),
    )
    .await
    .unwrap();
    let sub = bus
        .subscribe_with(
            "t",
            "g",
            fast().max_attempts(1).dead_letter_topic("parked"),
            |_: Received<u32>| async { Err::<(), _>(std::io::Error::other("no")) },
        )
        .await
        .unwrap();
    eventually(Duration::from_secs(5), "the dead letter", || {
        (bus.records("parked").len() == 1).then_some(())
    })
    .await;
    sub.shutdown().await.unwrap();
    assert!(bus.records("t.dlq").is_empty());
    assert_eq!(bus.committed("t", "g").get(&0), Some(&1));
}

#[tokio::test(start_paused = true)]
async fn a_stop_does_not_wait_forever_nor_commit_a_stuck_event() {
    let bus = MemoryBus::with_partitions(1);
    for n in 0..3u32 {
        bus.publish("t", "k", &micro_events::Event::new("/s", "t", n).unwrap())
            .await
            .unwrap();
    }
    let started = Log::new();
    let log = started.clone();
    let sub = bus
        .subscribe_with(
            "t",
            "g",
            fast().stop_timeout(Duration::from_secs(5)),
            move |e: Received<u32>| {
                let log = log.clone();
                async move {
                    log.push(*e.data());
                    if *e.data() == 1 {
                        std::future::pending::<()>().await;
                    }
                    Ok::<_, std::io::Error>(())
                }
            },
        )
        .await
        .unwrap();
    eventually(Duration::from_secs(5), "the stuck event", || {
        started.snapshot().contains(&1).then_some(())
    })
    .await;
    sub.shutdown().await.unwrap();
    assert_eq!(
        bus.committed("t", "g").get(&0),
        Some(&1),
        "only event 0 finished"
    );
    assert_eq!(
        started.snapshot(),
        [0, 1],
        "nothing after the stuck event of its key"
    );
}
