//! The outbox: events written together with the state change that caused
//! them, and a relay that publishes them afterwards, in order per key.
//!
//! Publishing straight from a request handler loses the event when the
//! process dies between the database commit and the publish, and publishes a
//! lie when the commit fails after the publish. An outbox writes the event in
//! the same transaction as the state change; a relay publishes what was
//! committed, marks it sent, and after a crash publishes again what it had not
//! marked (downstream, the [inbox](crate::inbox) absorbs the duplicate).
//!
//! - `postgres::PgOutbox` (feature `postgres`) is the
//!   transactional outbox in PostgreSQL, with a relay that several processes
//!   can run at once.
//! - [`MemoryOutbox`] is the embedded equivalent for the one-process default.
//!   It lives **in memory**, on purpose: in that mode the bus is the
//!   [`MemoryBus`](crate::MemoryBus), which is in memory too, so an outbox on
//!   disk would keep events for a bus that no longer exists after a restart.
//!   What it gives is the ordering of the pattern: write events while holding
//!   the lock of your state, publish after releasing it, in write order,
//!   retrying a failed publish.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::Notify;

use crate::error::Result;
use crate::event::Event;
use crate::publish::{to_record, with_current_trace, Publisher};
use crate::record::Record;

/// An in-memory outbox; clones share it. See the [module docs](self) for
/// why in memory.
#[derive(Debug, Clone, Default)]
pub struct MemoryOutbox {
    inner: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    pending: Mutex<VecDeque<(String, Record)>>,
    written: Notify,
    /// Serialises relays, so that order is kept even if several run.
    relaying: tokio::sync::Mutex<()>,
}

impl MemoryOutbox {
    /// An empty outbox.
    pub fn new() -> Self {
        Self::default()
    }

    /// Queues `event` for `topic` under `key`. Synchronous and cheap, so it
    /// can be called while holding the lock of the state the event is about.
    ///
    /// # Errors
    ///
    /// [`Error::Encode`](crate::Error::Encode) when the data cannot be written
    /// as JSON.
    pub fn write<T: Serialize>(&self, topic: &str, key: &str, event: &Event<T>) -> Result<()> {
        let record = with_current_trace(to_record(key, event)?);
        self.inner
            .pending
            .lock()
            .expect("outbox lock")
            .push_back((topic.to_owned(), record));
        self.inner.written.notify_one();
        Ok(())
    }

    /// How many events wait to be published.
    pub fn len(&self) -> usize {
        self.inner.pending.lock().expect("outbox lock").len()
    }

    /// Whether no event waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A relay that publishes this outbox's events with `publisher`.
    pub fn relay<P: Publisher>(&self, publisher: P) -> MemoryRelay<P> {
        MemoryRelay {
            outbox: self.clone(),
            publisher,
            batch_size: 256,
            retry_interval: Duration::from_millis(500),
        }
    }
}

/// Publishes the events of a [`MemoryOutbox`]; made by
/// [`MemoryOutbox::relay`].
#[derive(Debug)]
pub struct MemoryRelay<P> {
    outbox: MemoryOutbox,
    publisher: P,
    batch_size: usize,
    retry_interval: Duration,
}

impl<P: Publisher> MemoryRelay<P> {
    /// How many events one round publishes at most (default 256).
    pub fn batch_size(mut self, n: usize) -> Self {
        self.batch_size = n.max(1);
        self
    }

    /// How long [`run`](Self::run) waits after a failed publish (default
    /// 500 ms).
    pub fn retry_interval(mut self, interval: Duration) -> Self {
        self.retry_interval = interval;
        self
    }

    /// Publishes up to one batch of waiting events, in write order, and
    /// removes them; returns how many were published.
    ///
    /// # Errors
    ///
    /// The publisher's error; the events stay in the outbox, and those of
    /// the batch that were stored before the failure are published again by
    /// the next round.
    pub async fn relay_once(&self) -> Result<usize> {
        let _relaying = self.outbox.inner.relaying.lock().await;
        let batch: Vec<(String, Record)> = {
            let pending = self.outbox.inner.pending.lock().expect("outbox lock");
            pending.iter().take(self.batch_size).cloned().collect()
        };
        if batch.is_empty() {
            return Ok(0);
        }
        publish_in_order(&self.publisher, batch.clone()).await?;
        let mut pending = self.outbox.inner.pending.lock().expect("outbox lock");
        pending.drain(..batch.len());
        Ok(batch.len())
    }

    /// Publishes everything that waits, then returns; for a `ServiceHost`
    /// `after_drain` hook.
    ///
    /// # Errors
    ///
    /// As [`relay_once`](Self::relay_once).
    pub async fn flush(&self) -> Result<()> {
        while self.relay_once().await? > 0 {}
        Ok(())
    }

    /// Publishes events as they are written until `shutdown` resolves, then
    /// flushes what waits (once; events left after a failure stay in the
    /// outbox).
    ///
    /// # Errors
    ///
    /// The error of the final flush.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<()> {
        tokio::pin!(shutdown);
        loop {
            let written = self.outbox.inner.written.notified();
            tokio::pin!(written);
            written.as_mut().enable();
            let wait = match self.relay_once().await {
                Ok(n) if n > 0 => continue,
                Ok(_) => None,
                Err(e) => {
                    tracing::warn!(error = %e, "outbox relay failed to publish; trying again");
                    Some(self.retry_interval)
                }
            };
            tokio::select! {
                _ = &mut shutdown => break,
                _ = &mut written, if wait.is_none() => {}
                _ = tokio::time::sleep(wait.unwrap_or_default()), if wait.is_some() => {}
            }
        }
        self.flush().await
    }
}

/// Publishes `(topic, record)` pairs keeping their order: consecutive records
/// of one topic go in one batch.
pub(crate) async fn publish_in_order<P: Publisher + ?Sized>(
    publisher: &P,
    records: Vec<(String, Record)>,
) -> Result<()> {
    let mut batch: Vec<Record> = Vec::new();
    let mut batch_topic: Option<String> = None;
    for (topic, record) in records {
        if batch_topic.as_deref() != Some(topic.as_str()) {
            if let Some(t) = batch_topic.take() {
                publisher
                    .publish_records(&t, std::mem::take(&mut batch))
                    .await?;
            }
            batch_topic = Some(topic);
        }
        batch.push(record);
    }
    if let Some(t) = batch_topic {
        publisher.publish_records(&t, batch).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryBus;

    fn event(n: u32) -> Event<u32> {
        Event::new("/s", "t", n).unwrap()
    }

    #[tokio::test]
    async fn relays_in_write_order_across_topics() {
        let bus = MemoryBus::with_partitions(1);
        let outbox = MemoryOutbox::new();
        for n in 0..5 {
            let topic = if n % 2 == 0 { "even" } else { "odd" };
            outbox.write(topic, "k", &event(n)).unwrap();
        }
        assert_eq!(outbox.len(), 5);
        let relay = outbox.relay(bus.clone()).batch_size(3);
        assert_eq!(relay.relay_once().await.unwrap(), 3);
        relay.flush().await.unwrap();
        assert!(outbox.is_empty());
        let even: Vec<u32> = bus
            .records("even")
            .iter()
            .map(|r| {
                *Event::<u32>::from_binary(r.headers.clone(), &r.payload)
                    .unwrap()
                    .data()
            })
            .collect();
        assert_eq!(even, [0, 2, 4]);
        assert_eq!(bus.records("odd").len(), 2);
    }

    /// Fails its first publish, then forwards to the bus.
    struct FlakyOnce(MemoryBus, std::sync::atomic::AtomicBool);

    impl Publisher for FlakyOnce {
        fn publish_records<'a>(
            &'a self,
            topic: &'a str,
            records: Vec<Record>,
        ) -> micro_core::service::BoxFuture<'a, Result<Vec<crate::Delivery>>> {
            if !self.1.swap(true, std::sync::atomic::Ordering::SeqCst) {
                return Box::pin(std::future::ready(Err(crate::Error::Closed)));
            }
            self.0.publish_records(topic, records)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_publish_keeps_the_events_and_is_retried() {
        let bus = MemoryBus::with_partitions(1);
        let outbox = MemoryOutbox::new();
        outbox.write("t", "k", &event(1)).unwrap();
        let relay = outbox.relay(FlakyOnce(bus.clone(), false.into()));
        assert!(relay.relay_once().await.is_err());
        assert_eq!(outbox.len(), 1, "kept for the next round");
        let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let outbox2 = outbox.clone();
        let running = tokio::spawn(
            outbox
                .relay(FlakyOnce(bus.clone(), false.into()))
                .run(async {
                    let _ = stopped.await;
                }),
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !outbox2.is_empty() {
            assert!(tokio::time::Instant::now() < deadline, "never retried");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(bus.records("t").len(), 1);
        running.abort();
    }

    #[tokio::test]
    async fn run_publishes_as_events_are_written_and_flushes_on_shutdown() {
        let bus = MemoryBus::with_partitions(1);
        let outbox = MemoryOutbox::new();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let relay = tokio::spawn(outbox.relay(bus.clone()).run(async {
            let _ = stopped.await;
        }));
        outbox.write("t", "k", &event(1)).unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while bus.records("t").is_empty() {
            assert!(tokio::time::Instant::now() < deadline, "never published");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        outbox.write("t", "k", &event(2)).unwrap();
        stop.send(()).unwrap();
        relay.await.unwrap().unwrap();
        assert_eq!(bus.records("t").len(), 2);
    }
}
