//! Subscribing: the [`Subscriber`] trait every bus implements, handlers, and
//! the consumer that runs them with at-least-once delivery.
//!
//! A bus hands out a [`Source`]: the records of the partitions assigned to
//! one member of a consumer group, and a way to commit offsets. Everything
//! else is the same for every bus and lives here: per-key ordering with
//! bounded concurrency, retries with backoff, dead letters, offset tracking,
//! the graceful stop, spans and metrics.

use std::fmt;
use std::future::Future;
use std::ops::Deref;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use micro_core::error::BoxError;
use micro_core::health::HealthCheck;
use micro_core::service::BoxFuture;
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::error::{Error, Result};
use crate::event::Event;
use crate::publish::Publisher;
use crate::record::{Headers, ReceivedRecord};

mod engine;
mod tracker;

pub use engine::dead_letter_headers;
pub(crate) use engine::Context;

/// Reads a topic as a member of a consumer group.
///
/// A backend implements [`open`](Subscriber::open) and
/// [`dead_letter_publisher`](Subscriber::dead_letter_publisher); applications
/// call [`SubscriberExt::subscribe`], which is available on every subscriber.
pub trait Subscriber: Send + Sync {
    /// Joins `group` as a new member reading `topic`.
    ///
    /// The members of a group share the topic's partitions; each record is
    /// delivered to one member. A new group starts at the beginning of the
    /// topic; a known group resumes after its last committed offsets.
    fn open<'a>(&'a self, topic: &'a str, group: &'a str)
        -> BoxFuture<'a, Result<Box<dyn Source>>>;

    /// Where dead letters are published: normally this same bus.
    fn dead_letter_publisher(&self) -> Arc<dyn Publisher>;
}

impl<S: Subscriber + ?Sized> Subscriber for Arc<S> {
    fn open<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
    ) -> BoxFuture<'a, Result<Box<dyn Source>>> {
        (**self).open(topic, group)
    }

    fn dead_letter_publisher(&self) -> Arc<dyn Publisher> {
        (**self).dead_letter_publisher()
    }
}

/// One member's view of a consumer group: the records of its partitions, in
/// order per partition, and the commits of its progress. For backend
/// implementations; applications use [`SubscriberExt::subscribe`].
///
/// `next` and `commit` are called concurrently, from different tasks.
pub trait Source: Send + Sync {
    /// Waits for the next record. Must be cancel safe: dropping the future
    /// loses no record. Fails with [`Error::Closed`] once the source is closed.
    fn next(&self) -> BoxFuture<'_, Result<ReceivedRecord>>;

    /// Records that every record of `partition` before `next_offset` is
    /// done: the group resumes at `next_offset`. Called in order for each
    /// partition, and must not block: backends send commits in the
    /// background, and [`close`](Source::close) flushes them.
    fn commit(&self, partition: i32, next_offset: i64) -> Result<()>;

    /// Flushes pending commits and leaves the group; called once, when the
    /// subscription ends. `next` fails with [`Error::Closed`] afterwards.
    fn close(&self) -> BoxFuture<'_, Result<()>>;
}

/// How a subscription consumes; [`SubscribeOptions::default`] suits most
/// services.
#[derive(Debug, Clone)]
pub struct SubscribeOptions {
    pub(crate) max_concurrency: usize,
    pub(crate) max_buffered: usize,
    pub(crate) max_attempts: u32,
    pub(crate) initial_backoff: Duration,
    pub(crate) max_backoff: Duration,
    pub(crate) dead_letter_topic: Option<String>,
    pub(crate) stop_timeout: Duration,
    pub(crate) handler_timeout: Duration,
}

impl Default for SubscribeOptions {
    fn default() -> Self {
        Self {
            max_concurrency: 16,
            max_buffered: 1024,
            max_attempts: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            dead_letter_topic: None,
            stop_timeout: Duration::from_secs(30),
            handler_timeout: Duration::from_secs(30),
        }
    }
}

impl SubscribeOptions {
    /// The default options: 16 keys at once, 5 attempts with backoff from
    /// 100 ms to 10 s, dead letters to `<topic>.dlq`, 30 s per handler call,
    /// 30 s to stop.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many events (of different keys) are handled at the same time;
    /// events of one key are always handled one after the other. At least 1.
    pub fn max_concurrency(mut self, n: usize) -> Self {
        self.max_concurrency = n.max(1);
        self
    }

    /// How many received events may wait for their key's turn before the
    /// subscription stops reading. At least 1.
    pub fn max_buffered(mut self, n: usize) -> Self {
        self.max_buffered = n.max(1);
        self
    }

    /// How many times the handler is tried before the event is dead-lettered.
    /// At least 1.
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n.max(1);
        self
    }

    /// The backoff before the first retry, and its ceiling; it doubles from one
    /// retry to the next, with jitter.
    pub fn backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.initial_backoff = initial;
        self.max_backoff = max.max(initial);
        self
    }

    /// The dead-letter topic; the default is `<topic>.dlq`.
    pub fn dead_letter_topic(mut self, topic: impl Into<String>) -> Self {
        self.dead_letter_topic = Some(topic.into());
        self
    }

    /// How long one handler call may take. A call that outlives it is
    /// cancelled (its future dropped) and counts as a failed delivery: retried
    /// with backoff, then dead-lettered with a
    /// [`dlq_error`](dead_letter_headers::ERROR) of
    /// `handler did not finish within <timeout>`. The default is 30 s.
    pub fn handler_timeout(mut self, timeout: Duration) -> Self {
        self.handler_timeout = timeout;
        self
    }

    /// How long [`Subscription::shutdown`] waits for handlers that are
    /// running; after that they are cancelled and their events are delivered
    /// again later.
    pub fn stop_timeout(mut self, timeout: Duration) -> Self {
        self.stop_timeout = timeout;
        self
    }
}

/// Handles the events of a subscription.
///
/// Implemented for every `Fn(Received<T>) -> impl Future<Output = Result<(), E>>`
/// where `E` converts into a [`BoxError`].
///
/// An error is retried with backoff, unless it is marked with
/// [`micro_core::error::permanent`], which sends the event to the dead-letter
/// topic at once (as does an event that cannot be decoded into `T`). Note the
/// difference with [`micro_core::error::is_retryable`]: a failed handler is
/// retried by default, because redelivering an event to an idempotent handler
/// is harmless and a database that was briefly away is the common cause.
///
/// A handler that panics has failed like one that returned an error: the
/// panic is caught, the event is retried with the subscription's backoff and
/// then dead-lettered with a [`dlq_error`](dead_letter_headers::ERROR) of
/// `handler panicked: <message>`; the subscription keeps running. (The panic
/// is still printed by the panic hook.)
pub trait Handler<T>: Send + Sync + 'static {
    /// Handles one event.
    fn handle(&self, event: Received<T>) -> impl Future<Output = Result<(), BoxError>> + Send;
}

impl<T, F, Fut, E> Handler<T> for F
where
    F: Fn(Received<T>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = std::result::Result<(), E>> + Send,
    E: Into<BoxError>,
{
    fn handle(&self, event: Received<T>) -> impl Future<Output = Result<(), BoxError>> + Send {
        let fut = self(event);
        async move { fut.await.map_err(Into::into) }
    }
}

/// An event handed to a [`Handler`], with where it came from. Dereferences to
/// the [`Event`].
#[derive(Debug)]
pub struct Received<T> {
    event: Event<T>,
    topic: Arc<str>,
    group: Arc<str>,
    partition: i32,
    offset: i64,
    key: Option<Vec<u8>>,
    headers: Headers,
    attempt: u32,
}

impl<T> Received<T> {
    /// The event.
    pub fn event(&self) -> &Event<T> {
        &self.event
    }

    /// Takes the event out.
    pub fn into_event(self) -> Event<T> {
        self.event
    }

    /// The topic it was read from.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The consumer group reading it.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// Its partition.
    pub fn partition(&self) -> i32 {
        self.partition
    }

    /// Its offset within the partition.
    pub fn offset(&self) -> i64 {
        self.offset
    }

    /// Its partition key.
    pub fn key(&self) -> Option<&[u8]> {
        self.key.as_deref()
    }

    /// The record's headers, `ce_` attributes included.
    pub fn headers(&self) -> &Headers {
        &self.headers
    }

    /// Which attempt this is, from 1.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }
}

impl<T> Deref for Received<T> {
    type Target = Event<T>;

    fn deref(&self) -> &Event<T> {
        &self.event
    }
}

/// Subscribing with a typed handler, for every [`Subscriber`].
pub trait SubscriberExt: Subscriber {
    /// Subscribes `handler` to `topic` as a member of `group`, with the default
    /// [`SubscribeOptions`].
    ///
    /// The subscription runs in a background task until
    /// [`Subscription::shutdown`]. Delivery is at least once: an offset is
    /// committed only after the handler succeeded on the event, or the event
    /// was dead-lettered, and so did every event before it in the partition.
    ///
    /// # Errors
    ///
    /// The backend's error when joining the group fails.
    fn subscribe<T, H>(
        &self,
        topic: &str,
        group: &str,
        handler: H,
    ) -> impl Future<Output = Result<Subscription>> + Send
    where
        T: DeserializeOwned + Send + 'static,
        H: Handler<T>,
    {
        self.subscribe_with(topic, group, SubscribeOptions::default(), handler)
    }

    /// [`subscribe`](Self::subscribe) with options.
    ///
    /// # Errors
    ///
    /// As [`subscribe`](Self::subscribe).
    fn subscribe_with<T, H>(
        &self,
        topic: &str,
        group: &str,
        options: SubscribeOptions,
        handler: H,
    ) -> impl Future<Output = Result<Subscription>> + Send
    where
        T: DeserializeOwned + Send + 'static,
        H: Handler<T>,
    {
        async move {
            let source = self.open(topic, group).await?;
            let dead_letters = self.dead_letter_publisher();
            Ok(engine::start(
                source,
                dead_letters,
                topic,
                group,
                options,
                typed(handler),
            ))
        }
    }
}

impl<S: Subscriber + ?Sized> SubscriberExt for S {}

/// A running subscription. [`shutdown`](Self::shutdown) stops it gracefully;
/// dropping it stops it too, without waiting.
#[must_use = "dropping a subscription stops it"]
pub struct Subscription {
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<Result<()>>>,
    status: Arc<Status>,
    topic: String,
    group: String,
}

/// Whether a subscription still runs: `None` while it does, else why it
/// stopped. The first reason recorded stays.
#[derive(Debug, Default)]
pub(crate) struct Status(Mutex<Option<String>>);

impl Status {
    pub(crate) fn stopped(&self, reason: String) {
        let mut status = self.0.lock().expect("status lock");
        if status.is_none() {
            *status = Some(reason);
        }
    }

    fn reason(&self) -> Option<String> {
        self.0.lock().expect("status lock").clone()
    }
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("topic", &self.topic)
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}

impl Subscription {
    /// The topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The consumer group.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// A readiness check that fails once the subscription has stopped, for
    /// whatever reason (it was shut down or aborted, its source closed, its
    /// engine failed), with the reason as the check's error. Return it from
    /// the consuming service's
    /// [`health_checks`](micro_core::service::Service::health_checks), so
    /// that a service whose consumer died stops taking work that would need
    /// it. Named `subscription <group> of <topic>`; critical; cheap to run.
    ///
    /// The check holds only the subscription's status, so it may be taken
    /// before the subscription moves into the host's shutdown sequence.
    pub fn health_check(&self) -> HealthCheck {
        let status = Arc::clone(&self.status);
        HealthCheck::new(
            format!("subscription {} of {}", self.group, self.topic),
            move || {
                let reason = status.reason();
                async move {
                    match reason {
                        None => Ok(()),
                        Some(reason) => Err(reason.into()),
                    }
                }
            },
        )
    }

    /// Whether the subscription has ended (it was stopped, or its source
    /// failed for good).
    pub fn is_finished(&self) -> bool {
        self.task.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Stops gracefully: stops reading, lets running handlers finish (up to
    /// [`SubscribeOptions::stop_timeout`]), commits every event that finished,
    /// and leaves the group. Events not handled yet are delivered again to
    /// the group later.
    ///
    /// [`ServiceHostBuilderExt::subscription`](crate::host::ServiceHostBuilderExt::subscription)
    /// calls it in micro-core's `ServiceHost` shutdown sequence.
    ///
    /// # Errors
    ///
    /// The error that ended the subscription, or that closing the source
    /// returned.
    pub async fn shutdown(mut self) -> Result<()> {
        let _ = self.stop.send(true);
        match self.task.take() {
            Some(task) => task.await.map_err(Error::Task)?,
            None => Ok(()),
        }
    }

    /// Stops at once, as a crashed process would: running handlers are
    /// cancelled and nothing more is committed by this subscription.
    pub fn abort(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// Why a handler call failed, as the engine sees it.
#[derive(Debug)]
pub(crate) enum Failure {
    /// The record is not an event of the handler's type: never retried.
    Decode(Error),
    /// The handler failed.
    Handler(BoxError),
    /// The handler panicked, with this message.
    Panicked(String),
    /// The handler did not finish within its timeout.
    TimedOut(Duration),
}

impl Failure {
    pub(crate) fn is_permanent(&self) -> bool {
        match self {
            Failure::Decode(_) => true,
            Failure::Handler(e) => is_permanent(&**e),
            Failure::Panicked(_) | Failure::TimedOut(_) => false,
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Decode(e) => write!(f, "cannot decode event: {}", Chain(e)),
            Failure::Handler(e) => write!(f, "{}", Chain(&**e)),
            Failure::Panicked(message) => write!(f, "handler panicked: {message}"),
            Failure::TimedOut(timeout) => {
                write!(f, "handler did not finish within {timeout:?}")
            }
        }
    }
}

pub(crate) use micro_core::error::Chain;

/// Whether a handler error must not be retried: the nearest marker in its
/// chain decides ([`micro_core::error::permanent`] or
/// [`micro_core::error::retryable`]), then this crate's own errors; anything
/// else is retried.
fn is_permanent(err: &(dyn std::error::Error + 'static)) -> bool {
    use micro_core::error::{Permanent, Transient};
    let mut next = Some(err);
    while let Some(err) = next {
        if err.is::<Permanent>() {
            return true;
        }
        if err.is::<Transient>() {
            return false;
        }
        if let Some(e) = err.downcast_ref::<Error>() {
            return !e.is_retryable();
        }
        next = err.source();
    }
    false
}

/// A handler over raw records: decodes, opens the consumer span, calls.
pub(crate) type RawHandler = Arc<
    dyn Fn(&engine::Context, &ReceivedRecord, u32) -> BoxFuture<'static, Result<(), Failure>>
        + Send
        + Sync,
>;

fn typed<T, H>(handler: H) -> RawHandler
where
    T: DeserializeOwned + Send + 'static,
    H: Handler<T>,
{
    let handler = Arc::new(handler);
    Arc::new(
        move |ctx: &engine::Context, record: &ReceivedRecord, attempt: u32| {
            let event = match Event::<T>::from_binary(
                record.headers.iter().map(|(n, v)| (n, v)),
                &record.payload,
            ) {
                Ok(event) => event,
                Err(e) => return Box::pin(std::future::ready(Err(Failure::Decode(e)))),
            };
            let received = Received {
                event,
                topic: ctx.topic.clone(),
                group: ctx.group.clone(),
                partition: record.partition,
                offset: record.offset,
                key: record.key.clone(),
                headers: record.headers.clone(),
                attempt,
            };
            let handler = handler.clone();
            let (trace, span) = engine::consumer_span(ctx, &received);
            Box::pin(tracing::Instrument::instrument(
                trace
                    .scope(async move { handler.handle(received).await.map_err(Failure::Handler) }),
                span,
            ))
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use micro_core::error::{permanent, retryable};

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] BoxError);

    #[test]
    fn handler_errors_are_retried_unless_marked_permanent() {
        let plain: BoxError = "database away".into();
        assert!(!is_permanent(&*plain));
        assert!(is_permanent(&*permanent("bad order")));
        assert!(is_permanent(&Outer(permanent("bad order"))));
        assert!(!is_permanent(&*retryable(permanent("x"))));
        assert!(is_permanent(&Error::MissingData));
    }

    #[test]
    fn failures_display_their_chain() {
        let failure = Failure::Handler(Box::new(Outer("inner".into())));
        assert_eq!(failure.to_string(), "outer: inner");
    }

    #[test]
    fn options_have_floors() {
        let options = SubscribeOptions::new()
            .max_concurrency(0)
            .max_buffered(0)
            .max_attempts(0)
            .backoff(Duration::from_secs(2), Duration::from_secs(1));
        assert_eq!(options.max_concurrency, 1);
        assert_eq!(options.max_buffered, 1);
        assert_eq!(options.max_attempts, 1);
        assert_eq!(options.max_backoff, Duration::from_secs(2));
    }
}
