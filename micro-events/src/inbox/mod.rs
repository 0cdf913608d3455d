//! The inbox: duplicate suppression by event id, so that a redelivered event
//! has no second effect.
//!
//! Delivery is at least once: after a crash or a rebalance a handler may see
//! an event it already handled. An inbox remembers, per consumer, the ids of
//! the events it processed.
//!
//! - When the handler's effects live in PostgreSQL, mark the event in the same
//!   transaction as the effects with
//!   `postgres::PgInbox::claim` (feature `postgres`):
//!   the effect and the mark commit together or not at all, exactly once.
//! - Otherwise wrap the handler with [`Inbox::deduplicate`]: the event is
//!   marked after the handler succeeded, so a crash between the two still
//!   repeats the effect; the window is small, not closed. The store is a
//!   [`MemoryInbox`] or, with feature `postgres`,
//!   `postgres::PgInboxStore`.

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};

use micro_core::error::BoxError;
use micro_core::service::BoxFuture;

use crate::error::Result;
use crate::subscribe::{Handler, Received};

/// Remembers which events a consumer processed.
pub trait InboxStore: Send + Sync {
    /// Whether `consumer` processed the event `event_id`.
    fn is_processed<'a>(
        &'a self,
        consumer: &'a str,
        event_id: &'a str,
    ) -> BoxFuture<'a, Result<bool>>;

    /// Records that `consumer` processed `event_id`; `false` when it was
    /// recorded already.
    fn mark_processed<'a>(
        &'a self,
        consumer: &'a str,
        event_id: &'a str,
    ) -> BoxFuture<'a, Result<bool>>;
}

impl<S: InboxStore + ?Sized> InboxStore for Arc<S> {
    fn is_processed<'a>(
        &'a self,
        consumer: &'a str,
        event_id: &'a str,
    ) -> BoxFuture<'a, Result<bool>> {
        (**self).is_processed(consumer, event_id)
    }

    fn mark_processed<'a>(
        &'a self,
        consumer: &'a str,
        event_id: &'a str,
    ) -> BoxFuture<'a, Result<bool>> {
        (**self).mark_processed(consumer, event_id)
    }
}

/// An inbox store in memory, for the one-process default and tests.
///
/// It remembers the last `capacity` events (all of them by default): a
/// duplicate arrives soon after its original, so a bound that covers the
/// redelivery window is enough. Clones share the store.
#[derive(Debug, Clone, Default)]
pub struct MemoryInbox {
    inner: Arc<Mutex<Seen>>,
}

#[derive(Debug, Default)]
struct Seen {
    ids: HashSet<(String, String)>,
    order: VecDeque<(String, String)>,
    capacity: Option<usize>,
}

impl MemoryInbox {
    /// An empty store without bound.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty store that forgets the oldest ids beyond `capacity`.
    pub fn with_capacity(capacity: usize) -> Self {
        let inbox = Self::default();
        inbox.inner.lock().expect("inbox lock").capacity = Some(capacity.max(1));
        inbox
    }

    fn mark(&self, consumer: &str, event_id: &str) -> bool {
        let mut seen = self.inner.lock().expect("inbox lock");
        let entry = (consumer.to_owned(), event_id.to_owned());
        if !seen.ids.insert(entry.clone()) {
            return false;
        }
        seen.order.push_back(entry);
        if let Some(capacity) = seen.capacity {
            while seen.order.len() > capacity {
                if let Some(old) = seen.order.pop_front() {
                    seen.ids.remove(&old);
                }
            }
        }
        true
    }

    fn contains(&self, consumer: &str, event_id: &str) -> bool {
        self.inner
            .lock()
            .expect("inbox lock")
            .ids
            .contains(&(consumer.to_owned(), event_id.to_owned()))
    }
}

impl InboxStore for MemoryInbox {
    fn is_processed<'a>(
        &'a self,
        consumer: &'a str,
        event_id: &'a str,
    ) -> BoxFuture<'a, Result<bool>> {
        Box::pin(std::future::ready(Ok(self.contains(consumer, event_id))))
    }

    fn mark_processed<'a>(
        &'a self,
        consumer: &'a str,
        event_id: &'a str,
    ) -> BoxFuture<'a, Result<bool>> {
        Box::pin(std::future::ready(Ok(self.mark(consumer, event_id))))
    }
}

/// A consumer's view of an [`InboxStore`]: the store and the consumer's name
/// (events are remembered per consumer, so two services sharing a store do
/// not suppress each other's events).
#[derive(Debug, Clone)]
pub struct Inbox<S> {
    store: S,
    consumer: Arc<str>,
}

/// What [`Inbox::run_once`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Processed<T> {
    /// The effect ran, for the first time; here is its output.
    Now(T),
    /// The event had been processed before; the effect did not run.
    Before,
}

impl<S: InboxStore> Inbox<S> {
    /// The inbox of `consumer` in `store`.
    pub fn new(store: S, consumer: impl Into<String>) -> Self {
        Self {
            store,
            consumer: consumer.into().into(),
        }
    }

    /// The consumer's name.
    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Runs `effect` unless `event_id` was processed, then marks it processed.
    ///
    /// # Errors
    ///
    /// The effect's error (the event stays unmarked, so a retry runs it
    /// again), or the store's error converted into a [`BoxError`].
    pub async fn run_once<F, Fut, T, E>(
        &self,
        event_id: &str,
        effect: F,
    ) -> std::result::Result<Processed<T>, BoxError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = std::result::Result<T, E>>,
        E: Into<BoxError>,
    {
        if self.store.is_processed(&self.consumer, event_id).await? {
            return Ok(Processed::Before);
        }
        let output = effect().await.map_err(Into::into)?;
        self.store.mark_processed(&self.consumer, event_id).await?;
        Ok(Processed::Now(output))
    }

    /// Wraps `handler` so that it is skipped for events this consumer
    /// processed before (by event id), and events are marked after it
    /// succeeded.
    pub fn deduplicate<T, H>(self, handler: H) -> Deduplicate<S, H>
    where
        H: Handler<T>,
    {
        Deduplicate {
            inbox: self,
            handler,
        }
    }
}

/// A [`Handler`] that skips events processed before; made by
/// [`Inbox::deduplicate`].
#[derive(Debug, Clone)]
pub struct Deduplicate<S, H> {
    inbox: Inbox<S>,
    handler: H,
}

impl<T, S, H> Handler<T> for Deduplicate<S, H>
where
    T: Send + 'static,
    S: InboxStore + 'static,
    H: Handler<T>,
{
    async fn handle(&self, event: Received<T>) -> std::result::Result<(), BoxError> {
        let id = event.id().to_owned();
        match self
            .inbox
            .run_once(&id, || self.handler.handle(event))
            .await?
        {
            Processed::Now(()) => {}
            Processed::Before => {
                tracing::debug!(consumer = %self.inbox.consumer, event.id = %id, "duplicate event skipped");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn runs_each_event_once_per_consumer() {
        let inbox = Inbox::new(MemoryInbox::new(), "billing");
        let other = Inbox::new(inbox.store().clone(), "shipping");
        let first = inbox
            .run_once("e1", || async { Ok::<_, std::io::Error>(1) })
            .await
            .unwrap();
        assert_eq!(first, Processed::Now(1));
        let again = inbox
            .run_once("e1", || async { Ok::<_, std::io::Error>(2) })
            .await
            .unwrap();
        assert_eq!(again, Processed::Before);
        let elsewhere = other
            .run_once("e1", || async { Ok::<_, std::io::Error>(3) })
            .await
            .unwrap();
        assert_eq!(elsewhere, Processed::Now(3));
    }

    #[tokio::test]
    async fn a_failed_effect_is_not_marked() {
        let inbox = Inbox::new(MemoryInbox::new(), "c");
        let err = inbox
            .run_once("e", || async {
                Err::<(), _>(std::io::Error::other("down"))
            })
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), "down");
        let ok = inbox
            .run_once("e", || async { Ok::<_, std::io::Error>(()) })
            .await
            .unwrap();
        assert_eq!(ok, Processed::Now(()));
    }

    #[tokio::test]
    async fn a_bounded_store_forgets_the_oldest() {
        let store = MemoryInbox::with_capacity(2);
        for id in ["a", "b", "c"] {
            assert!(store.mark_processed("c", id).await.unwrap());
        }
        assert!(!store.is_processed("c", "a").await.unwrap());
        assert!(store.is_processed("c", "b").await.unwrap());
        assert!(store.is_processed("c", "c").await.unwrap());
        assert!(!store.mark_processed("c", "c").await.unwrap());
    }
}
