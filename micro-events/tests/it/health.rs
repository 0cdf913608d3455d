//! A subscription's readiness check: passes while it runs, fails with the
//! reason once it stops.

use std::sync::Arc;
use std::time::Duration;

use micro_core::health::{CheckStatus, HealthCheck};
use micro_core::service::BoxFuture;
use micro_events::{
    Error, MemoryBus, Publisher, Received, ReceivedRecord, Source, Subscriber, SubscriberExt,
};

use crate::support::eventually;

async fn ok(_: Received<i32>) -> Result<(), std::io::Error> {
    Ok(())
}

async fn failing_with(check: &HealthCheck, reason: &str) {
    let mut last = None;
    for _ in 0..500 {
        let report = check.run().await;
        if report.status == CheckStatus::Fail {
            let error = report.error.unwrap();
            assert!(error.contains(reason), "{error:?} should say {reason:?}");
            return;
        }
        last = Some(report);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the check kept passing: {last:?}");
}

#[tokio::test(start_paused = true)]
async fn passes_while_running_and_fails_once_shut_down() {
    let bus = MemoryBus::new();
    let sub = bus.subscribe("orders", "g", ok).await.unwrap();
    let check = sub.health_check();
    assert_eq!(check.name(), "subscription g of orders");
    assert!(check.is_critical());
    assert_eq!(check.run().await.status, CheckStatus::Pass);
    sub.shutdown().await.unwrap();
    failing_with(&check, "the subscription was stopped").await;
}

#[tokio::test(start_paused = true)]
async fn fails_once_aborted() {
    let bus = MemoryBus::new();
    let sub = bus.subscribe("orders", "g", ok).await.unwrap();
    let check = sub.health_check();
    sub.abort();
    failing_with(&check, "ended unexpectedly").await;
}

/// A bus whose source closes on its own, as a broker connection given up on.
struct Closing(MemoryBus);

struct ClosedSource;

impl Source for ClosedSource {
    fn next(&self) -> BoxFuture<'_, micro_events::Result<ReceivedRecord>> {
        Box::pin(async { Err(Error::Closed) })
    }

    fn commit(&self, _: i32, _: i64) -> micro_events::Result<()> {
        Ok(())
    }

    fn close(&self) -> BoxFuture<'_, micro_events::Result<()>> {
        Box::pin(async { Ok(()) })
    }
}

impl Subscriber for Closing {
    fn open<'a>(
        &'a self,
        _: &'a str,
        _: &'a str,
    ) -> BoxFuture<'a, micro_events::Result<Box<dyn Source>>> {
        Box::pin(async { Ok(Box::new(ClosedSource) as Box<dyn Source>) })
    }

    fn dead_letter_publisher(&self) -> Arc<dyn Publisher> {
        Arc::new(self.0.clone())
    }
}

#[tokio::test(start_paused = true)]
async fn fails_when_the_source_closes_on_its_own() {
    let sub = Closing(MemoryBus::new())
        .subscribe("orders", "g", ok)
        .await
        .unwrap();
    let check = sub.health_check();
    eventually(Duration::from_secs(5), "the subscription to end", || {
        sub.is_finished().then_some(())
    })
    .await;
    failing_with(&check, "the event source closed").await;
}
