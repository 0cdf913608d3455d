//! Events for micro services: a CloudEvents envelope, publish and subscribe on
//! an in-memory bus or Kafka, dead letters, an inbox and a transactional
//! outbox.
//!
//! Services tell each other what happened through events on a bus:
//!
//! - [`Event<T>`] is the envelope: the context attributes of [CloudEvents 1.0]
//!   (`id`, `source`, `type`, `time`, `subject`, ...) around a typed payload,
//!   plus W3C trace context (`traceparent`, `tracestate`), `correlationid`,
//!   `causationid` and `schemaversion`. It is encoded in the structured mode
//!   (one JSON document, [`Event::to_json`]) or the binary mode (`ce_` headers
//!   and the data as body, [`Event::to_binary_headers`]), which is what the
//!   buses carry.
//! - A [`Publisher`] stores events in topics and confirms where they landed
//!   ([`PublisherExt::publish`], [`PublisherExt::publish_batch`]).
//! - A [`Subscriber`] runs a [`Handler`] as a member of a consumer group
//!   ([`SubscriberExt::subscribe`]): **at least once** (an offset is committed
//!   only once the handler succeeded or the event was dead-lettered), **in
//!   order per key** while different keys run concurrently up to a bound,
//!   failures **retried with backoff** and then sent to a **dead-letter
//!   topic** (`<topic>.dlq`) with the error, the attempt count and the
//!   original position in headers. [`Subscription::shutdown`] stops
//!   gracefully and commits what finished. The consumer's span continues the
//!   producer's trace; [`metrics`] lists what is measured.
//! - The [`MemoryBus`] is the embedded default, with Kafka's semantics
//!   (partitions by key hash, consumer groups, committed offsets);
//!   `kafka::KafkaBus` (feature `kafka`) is the real thing.
//! - The [`inbox`] suppresses redelivered events by id; the [`outbox`] writes
//!   events in the same transaction as the state change and relays them.
//!
//! [CloudEvents 1.0]: https://github.com/cloudevents/spec/blob/v1.0.2/cloudevents/spec.md
//!
//! # Example
//!
//! ```
//! use micro_events::{Event, MemoryBus, PublisherExt, Received, SubscriberExt};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Debug, Clone, Serialize, Deserialize)]
//! struct OrderCreated {
//!     order_id: String,
//!     total_minor: i64,
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let bus = MemoryBus::new();
//!
//! // The notification service reacts to every order.
//! let (tx, mut notified) = tokio::sync::mpsc::unbounded_channel();
//! let subscription = bus
//!     .subscribe("order-events", "notification-service", move |event: Received<OrderCreated>| {
//!         let tx = tx.clone();
//!         async move {
//!             // An error here is retried, then dead-lettered to `order-events.dlq`.
//!             tx.send(event.data().order_id.clone())?;
//!             Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
//!         }
//!     })
//!     .await?;
//!
//! // The order service publishes, keyed by order id: one order's events stay in order.
//! let created = Event::builder(
//!     "/order-service",
//!     "shop.order.created",
//!     OrderCreated { order_id: "o-1".into(), total_minor: 4999 },
//! )
//! .subject("o-1")
//! .build()?;
//! let delivery = bus.publish("order-events", "o-1", &created).await?;
//! assert_eq!(delivery.topic, "order-events");
//!
//! assert_eq!(notified.recv().await.as_deref(), Some("o-1"));
//!
//! // In a service, this goes in the ServiceHost's `before_drain` hook.
//! subscription.shutdown().await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Feature flags
//!
//! | feature | default | what it enables |
//! |---|---|---|
//! | *(always)* | | the envelope, both encodings, [`Publisher`] and [`Subscriber`], the [`MemoryBus`], the [`MemoryInbox`] and the [`MemoryOutbox`] |
//! | `kafka` | no | `kafka::KafkaBus`: rdkafka with a bundled librdkafka (building it needs cmake) |
//! | `postgres` | no | `postgres::PgInbox` and `postgres::PgOutbox` with its relay, on a deadpool-postgres pool (tokio-postgres) |

mod binary;
mod error;
mod event;
pub mod host;
pub mod identity;
pub mod inbox;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod memory;
pub mod metrics;
pub mod outbox;
#[cfg(feature = "postgres")]
pub mod postgres;
mod publish;
mod raw;
mod record;
mod structured;
mod subscribe;

#[cfg(test)]
mod test_support;

pub use binary::{CONTENT_TYPE_HEADER, HEADER_PREFIX};
pub use error::{Error, Result};
pub use event::{Event, EventBuilder, DATA_CONTENT_TYPE, SPEC_VERSION};
pub use inbox::{Inbox, MemoryInbox};
pub use memory::MemoryBus;
pub use outbox::MemoryOutbox;
pub use publish::{Publisher, PublisherExt};
pub use record::{Delivery, Headers, ReceivedRecord, Record};
pub use structured::STRUCTURED_CONTENT_TYPE;
pub use subscribe::{
    dead_letter_headers, Handler, Received, Source, SubscribeOptions, Subscriber, SubscriberExt,
    Subscription,
};

/// The CloudEvents names of the attributes this crate reads and writes.
mod attr {
    pub(crate) const SPECVERSION: &str = "specversion";
    pub(crate) const ID: &str = "id";
    pub(crate) const SOURCE: &str = "source";
    pub(crate) const TYPE: &str = "type";
    pub(crate) const DATACONTENTTYPE: &str = "datacontenttype";
    pub(crate) const DATASCHEMA: &str = "dataschema";
    pub(crate) const SUBJECT: &str = "subject";
    pub(crate) const TIME: &str = "time";
    pub(crate) const TRACEPARENT: &str = "traceparent";
    pub(crate) const TRACESTATE: &str = "tracestate";
    pub(crate) const CORRELATIONID: &str = "correlationid";
    pub(crate) const CAUSATIONID: &str = "causationid";
    pub(crate) const SCHEMAVERSION: &str = "schemaversion";
}

#[cfg(doctest)]
#[doc = include_str!("../../docs/src/events.md")]
struct GuideEvents;
