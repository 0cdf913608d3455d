//! A hosted service's consumer stops, committing what finished, when the host
//! shuts down.

use std::time::Duration;

use axum::routing::get;
use axum::Router;
use micro_core::host::ServiceHost;
use micro_core::service::Service;
use micro_events::host::ServiceHostBuilderExt;
use micro_events::{Event, MemoryBus, PublisherExt, Received, SubscriberExt};

use crate::support::{eventually, Log};

struct Notifications;

impl Service for Notifications {
    fn name(&self) -> &str {
        "notification-service"
    }

    fn router(&self) -> Router {
        Router::new().route("/notifications", get(|| async { "[]" }))
    }
}

#[tokio::test]
async fn the_host_stops_its_consumers_before_draining() {
    let bus = MemoryBus::with_partitions(1);
    for n in 0..3 {
        bus.publish("orders", "o-1", &Event::new("/s", "t", n).unwrap())
            .await
            .unwrap();
    }
    let seen = Log::new();
    let log = seen.clone();
    let subscription = bus
        .subscribe("orders", "notifications", move |e: Received<i32>| {
            let log = log.clone();
            async move {
                log.push(*e.data());
                Ok::<_, std::io::Error>(())
            }
        })
        .await
        .unwrap();
    let running = ServiceHost::builder()
        .service(Notifications, "127.0.0.1:0".parse().unwrap())
        .subscription(subscription)
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "three events", || {
        (seen.len() == 3).then_some(())
    })
    .await;
    running.shutdown_trigger().trigger();
    let report = running.run_until(std::future::pending()).await;
    assert!(report.failed_hooks.is_empty(), "{report:?}");
    assert_eq!(bus.committed("orders", "notifications").get(&0), Some(&3));
    // The consumer left: what is published now waits for the next one.
    bus.publish("orders", "o-1", &Event::new("/s", "t", 3).unwrap())
        .await
        .unwrap();
    tokio::task::yield_now().await;
    assert_eq!(seen.len(), 3);
}
