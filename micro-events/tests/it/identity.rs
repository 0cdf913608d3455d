//! Verified publishers: a consumer acts only on events its allowed publishers signed;
//! anything else is dead-lettered at once.

use std::time::Duration;

use micro_core::identity::{KeyRing, KeySet, Secret};
use micro_events::identity::{publisher, require_publisher, SignedPublisher, IDENTITY_HEADER};
use micro_events::{
    dead_letter_headers as dlq, Event, MemoryBus, PublisherExt, Received, SubscribeOptions,
    SubscriberExt,
};

use crate::support::{eventually, Log};

fn keys(secret: &[u8; 36]) -> KeyRing {
    KeyRing::new(KeySet::new("k1", Secret::new(*secret).unwrap()))
}

#[tokio::test(start_paused = true)]
async fn only_events_an_allowed_publisher_signed_are_handled() {
    let ours = keys(b"the services' key, 0123456789abcdef!");
    let theirs = keys(b"somebody else's key, 0123456789abcde");
    let bus = MemoryBus::with_partitions(1);
    bus.create_topic("orders", 1).unwrap();
    bus.create_topic("orders.dlq", 1).unwrap();
    let event = |n: u32| Event::new("/orders", "order.created", n).unwrap();

    SignedPublisher::new(bus.clone(), ours.clone(), "order-service")
        .publish("orders", "k", &event(1))
        .await
        .unwrap();
    bus.publish("orders", "k", &event(2)).await.unwrap();
    SignedPublisher::new(bus.clone(), ours.clone(), "cart-service")
        .publish("orders", "k", &event(3))
        .await
        .unwrap();
    SignedPublisher::new(bus.clone(), theirs, "order-service")
        .publish("orders", "k", &event(4))
        .await
        .unwrap();
    SignedPublisher::new(bus.clone(), ours.clone(), "order-service")
        .publish("orders", "k", &event(5))
        .await
        .unwrap();

    let handled = Log::new();
    let log = handled.clone();
    let verifier = ours.clone();
    let options =
        SubscribeOptions::new().backoff(Duration::from_millis(10), Duration::from_millis(20));
    let subscription = bus
        .subscribe_with("orders", "g", options, move |received: Received<u32>| {
            let (log, keys) = (log.clone(), verifier.clone());
            async move {
                let caller = require_publisher(&received, &keys, &["order-service"])?;
                log.push((*received.data(), caller.service));
                Ok::<_, micro_core::error::BoxError>(())
            }
        })
        .await
        .unwrap();
    eventually(Duration::from_secs(5), "five deliveries", || {
        (bus.committed("orders", "g").get(&0) == Some(&5)).then_some(())
    })
    .await;
    subscription.shutdown().await.unwrap();
    assert_eq!(
        handled.snapshot(),
        [
            (1, "order-service".to_owned()),
            (5, "order-service".to_owned())
        ]
    );
    let letters = bus.records("orders.dlq");
    assert_eq!(letters.len(), 3, "{letters:?}");
    for letter in &letters {
        assert_eq!(
            letter.header(dlq::ATTEMPTS),
            Some(&b"1"[..]),
            "never retried"
        );
    }
    let reasons: Vec<String> = letters
        .iter()
        .map(|l| String::from_utf8_lossy(l.header(dlq::ERROR).unwrap()).into_owned())
        .collect();
    assert!(
        reasons[0].contains("no valid publisher identity"),
        "{reasons:?}"
    );
    assert!(
        reasons[1].contains("published by `cart-service`"),
        "{reasons:?}"
    );
    assert!(
        reasons[2].contains("no valid publisher identity"),
        "{reasons:?}"
    );
    let published = bus.records("orders");
    assert!(published[0].header(IDENTITY_HEADER).is_some());
    assert!(published[1].header(IDENTITY_HEADER).is_none());
}

#[tokio::test(start_paused = true)]
async fn a_token_copied_onto_another_event_proves_nothing() {
    let ours = keys(b"the services' key, 0123456789abcdef!");
    let bus = MemoryBus::with_partitions(1);
    bus.create_topic("orders", 1).unwrap();
    SignedPublisher::new(bus.clone(), ours.clone(), "order-service")
        .publish(
            "orders",
            "k",
            &Event::new("/orders", "order.created", 1u32).unwrap(),
        )
        .await
        .unwrap();
    let token = bus.records("orders")[0]
        .header(IDENTITY_HEADER)
        .unwrap()
        .to_vec();
    // A forged event, with the real token moved onto it.
    let forged = Event::new("/orders", "order.created", 2u32).unwrap();
    let records = vec![forged_record(&forged, token)];
    use micro_events::Publisher as _;
    bus.publish_records("orders", records).await.unwrap();
    let verdicts = Log::new();
    let log = verdicts.clone();
    let subscription = bus
        .subscribe("orders", "g", move |received: Received<u32>| {
            let (log, keys) = (log.clone(), ours.clone());
            async move {
                log.push((*received.data(), publisher(&received, &keys).is_ok()));
                Ok::<_, std::io::Error>(())
            }
        })
        .await
        .unwrap();
    eventually(Duration::from_secs(5), "both events", || {
        (verdicts.len() == 2).then_some(())
    })
    .await;
    subscription.shutdown().await.unwrap();
    assert_eq!(verdicts.snapshot(), [(1, true), (2, false)]);
}

/// `event` as a record in the binary mode, carrying `token` as its publisher identity.
fn forged_record(event: &Event<u32>, token: Vec<u8>) -> micro_events::Record {
    let mut record = micro_events::Record::new(
        Some(b"k".to_vec()),
        serde_json::to_vec(event.data()).unwrap(),
    );
    record.headers = vec![
        ("ce_specversion".into(), b"1.0".to_vec()),
        ("ce_id".into(), event.id().as_bytes().to_vec()),
        ("ce_source".into(), event.source().as_bytes().to_vec()),
        ("ce_type".into(), event.event_type().as_bytes().to_vec()),
        ("content-type".into(), b"application/json".to_vec()),
        (IDENTITY_HEADER.into(), token),
    ];
    record
}

/// The claims of a JWT, decoded (base64url without padding) without checking it.
fn claims(token: &[u8]) -> serde_json::Value {
    let payload = std::str::from_utf8(token)
        .unwrap()
        .split('.')
        .nth(1)
        .unwrap();
    let mut bits = 0u32;
    let mut held = 0;
    let mut bytes = Vec::new();
    for c in payload.bytes() {
        let value = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => panic!("not base64url: {payload}"),
        };
        bits = (bits << 6) | u32::from(value);
        held += 6;
        if held >= 8 {
            held -= 8;
            bytes.push((bits >> held) as u8);
        }
    }
    serde_json::from_slice(&bytes).unwrap()
}

/// An event is read when its consumer gets to it, maybe long after it was published: its
/// token holds for a week (Kafka's default retention), not for a call's minute, unless
/// the publisher says otherwise.
#[tokio::test]
async fn an_event_s_token_outlives_a_call_s() {
    let ours = keys(b"the services' key, 0123456789abcdef!");
    let bus = MemoryBus::with_partitions(1);
    bus.create_topic("orders", 1).unwrap();
    let event = Event::new("/orders", "order.created", 1u32).unwrap();
    SignedPublisher::new(bus.clone(), ours.clone(), "order-service")
        .publish("orders", "k", &event)
        .await
        .unwrap();
    SignedPublisher::new(bus.clone(), ours.clone(), "order-service")
        .token_lifetime(Duration::from_secs(3600))
        .publish("orders", "k", &event)
        .await
        .unwrap();
    let lifetimes: Vec<u64> = bus
        .records("orders")
        .iter()
        .map(|r| {
            let c = claims(r.header(IDENTITY_HEADER).unwrap());
            c["exp"].as_u64().unwrap() - c["iat"].as_u64().unwrap()
        })
        .collect();
    assert_eq!(lifetimes, [7 * 24 * 3600, 3600]);
    assert_eq!(
        SignedPublisher::<MemoryBus>::DEFAULT_TOKEN_LIFETIME,
        Duration::from_secs(7 * 24 * 3600)
    );
}
