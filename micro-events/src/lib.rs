//! Events for micro services: the envelope every event travels in.
//!
//! Services tell each other what happened through events on a bus. This crate
//! defines the envelope, [`Event<T>`]: the context attributes of
//! [CloudEvents 1.0] (`id`, `source`, `type`, `time`, `subject`, ...) around a
//! typed payload, plus the extensions micro relies on: W3C trace context
//! (`traceparent`, `tracestate`) so one trace runs from producer to consumer,
//! `correlationid` and `causationid` so a conversation can be followed event by
//! event, and `schemaversion` so consumers can upcast older payloads.
//!
//! An event is encoded in either of the two CloudEvents modes:
//!
//! - **structured**: the whole event as one JSON document, attributes at the top
//!   level and the payload under `data` ([`Event::to_json`],
//!   [`Event::from_json`], or `serde` directly);
//! - **binary**: the attributes as `ce_`-prefixed headers and the payload as
//!   the message body, as the CloudEvents Kafka binding does
//!   ([`Event::to_binary_headers`], [`Event::to_binary_data`],
//!   [`Event::from_binary`]).
//!
//! Decoding checks the event: a missing or empty required attribute, a
//! `specversion` other than `1.0`, non-JSON data or a malformed attribute is an
//! [`Error`] that names the attribute.
//!
//! Events travel on a bus: a [`Publisher`] stores them in topics
//! ([`PublisherExt::publish`]), a [`Subscriber`] hands them to a [`Handler`]
//! as a member of a consumer group ([`SubscriberExt::subscribe`]), at least
//! once, in order per key, with retries and a dead-letter topic. The
//! [`MemoryBus`] is the embedded default.
//!
//! [CloudEvents 1.0]: https://github.com/cloudevents/spec/blob/v1.0.2/cloudevents/spec.md
//!
//! # Example
//!
//! ```
//! use micro_events::Event;
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Debug, PartialEq, Serialize, Deserialize)]
//! struct OrderCreated {
//!     order_id: String,
//!     total_minor: i64,
//!     currency: String,
//! }
//!
//! let created = Event::builder(
//!     "/order-service",
//!     "shop.order.created",
//!     OrderCreated { order_id: "o-1".into(), total_minor: 4999, currency: "EUR".into() },
//! )
//! .subject("o-1")
//! .schema_version(1)
//! .traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
//! .build()?;
//!
//! // Binary mode, as a Kafka record would carry it.
//! let headers = created.to_binary_headers();
//! let body = created.to_binary_data()?;
//! let received = Event::<OrderCreated>::from_binary(headers, &body)?;
//! assert_eq!(received, created);
//!
//! // A consumer reacts with an event caused by the one it received.
//! let paid = Event::builder("/payment-service", "shop.payment.processed", "o-1".to_owned())
//!     .caused_by(&received)
//!     .build()?;
//! assert_eq!(paid.causation_id(), Some(created.id()));
//! assert_eq!(paid.correlation_id(), Some(created.id()));
//! assert_eq!(paid.traceparent(), created.traceparent());
//!
//! // Structured mode: one JSON document.
//! let json = paid.to_json()?;
//! assert_eq!(Event::<String>::from_json(&json)?, paid);
//! # Ok::<(), micro_events::Error>(())
//! ```
//!
//! # Feature flags
//!
//! | feature | default | what it enables |
//! |---|---|---|
//! | *(always)* | | the envelope, both encodings, the publish/subscribe API and the [`MemoryBus`] |
//! | `kafka` | no | the Kafka backend (rdkafka with a bundled librdkafka; building it needs cmake) |
//! | `postgres` | no | the PostgreSQL inbox and transactional outbox (tokio-postgres) |

mod binary;
mod error;
mod event;
pub mod inbox;
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
