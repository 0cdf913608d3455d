//! Publishing: the [`Publisher`] trait every bus implements and the typed
//! [`PublisherExt::publish`].

use std::future::Future;
use std::sync::Arc;

use micro_core::service::BoxFuture;
use micro_core::trace::TraceContext;
use serde::Serialize;

use crate::attr;
use crate::error::Result;
use crate::event::Event;
use crate::record::{Delivery, Record};
use crate::HEADER_PREFIX;

/// Sends records to topics and confirms where they landed.
///
/// A backend implements [`publish_records`](Publisher::publish_records); the
/// typed [`PublisherExt::publish`] and [`PublisherExt::publish_batch`] are
/// available on every publisher. The trait is object safe, so services can
/// hold an `Arc<dyn Publisher>` chosen by configuration.
pub trait Publisher: Send + Sync {
    /// Publishes `records` to `topic` and waits until the bus has stored every
    /// one of them, returning their positions in the same order.
    ///
    /// Records with the same key keep their order. A backend that batches
    /// (Kafka) sends them together; a failure part-way may leave a prefix
    /// stored, which at-least-once consumers tolerate.
    fn publish_records<'a>(
        &'a self,
        topic: &'a str,
        records: Vec<Record>,
    ) -> BoxFuture<'a, Result<Vec<Delivery>>>;
}

impl<P: Publisher + ?Sized> Publisher for Arc<P> {
    fn publish_records<'a>(
        &'a self,
        topic: &'a str,
        records: Vec<Record>,
    ) -> BoxFuture<'a, Result<Vec<Delivery>>> {
        (**self).publish_records(topic, records)
    }
}

impl<P: Publisher + ?Sized> Publisher for &P {
    fn publish_records<'a>(
        &'a self,
        topic: &'a str,
        records: Vec<Record>,
    ) -> BoxFuture<'a, Result<Vec<Delivery>>> {
        (**self).publish_records(topic, records)
    }
}

/// Typed publishing, for every [`Publisher`].
pub trait PublisherExt: Publisher {
    /// Publishes `event` to `topic` under the partition `key`, in the
    /// CloudEvents binary mode, and waits for the bus's confirmation.
    ///
    /// An event without a `traceparent` published inside a
    /// [`TraceContext::scope`] carries a child of the current context, so the
    /// consumer's span continues the producer's trace.
    ///
    /// # Errors
    ///
    /// [`Error::Encode`](crate::Error::Encode) when the data cannot be written
    /// as JSON, or the backend's error.
    fn publish<T: Serialize>(
        &self,
        topic: &str,
        key: &str,
        event: &Event<T>,
    ) -> impl Future<Output = Result<Delivery>> + Send {
        let record = to_record(key, event);
        async move {
            let record = with_current_trace(record?);
            let mut deliveries = self.publish_records(topic, vec![record]).await?;
            Ok(deliveries.remove(0))
        }
    }

    /// Publishes several events to `topic` at once, each under its key, and
    /// waits until all are stored; the confirmations come in the same order.
    ///
    /// # Errors
    ///
    /// As [`publish`](Self::publish).
    fn publish_batch<'a, T, I>(
        &'a self,
        topic: &'a str,
        events: I,
    ) -> impl Future<Output = Result<Vec<Delivery>>> + Send + 'a
    where
        T: Serialize + 'a,
        I: IntoIterator<Item = (&'a str, &'a Event<T>)>,
    {
        let records: Result<Vec<_>> = events
            .into_iter()
            .map(|(key, event)| to_record(key, event))
            .collect();
        async move {
            let records = records?.into_iter().map(with_current_trace).collect();
            self.publish_records(topic, records).await
        }
    }
}

impl<P: Publisher + ?Sized> PublisherExt for P {}

/// Encodes `event` as a binary-mode record keyed by `key`.
pub(crate) fn to_record<T: Serialize>(key: &str, event: &Event<T>) -> Result<Record> {
    Ok(Record {
        key: Some(key.as_bytes().to_vec()),
        headers: event.to_binary_headers(),
        payload: event.to_binary_data()?,
    })
}

/// Adds a child of the current trace context to a record that carries no
/// `traceparent`; called where the publish is awaited, so that the context of
/// the awaiting task counts.
pub(crate) fn with_current_trace(mut record: Record) -> Record {
    let name = format!("{HEADER_PREFIX}{}", attr::TRACEPARENT);
    if record.header(&name).is_none() {
        if let Some(current) = TraceContext::current() {
            record
                .headers
                .push((name, current.child().to_traceparent().into_bytes()));
        }
    }
    record
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn records_carry_the_current_trace() {
        let event = Event::new("/s", "t", 1).unwrap();
        let record = with_current_trace(to_record("k", &event).unwrap());
        assert!(record.header("ce_traceparent").is_none());
        assert_eq!(record.key.as_deref(), Some(&b"k"[..]));

        let ctx = TraceContext::new_root();
        let record = ctx
            .scope(async { with_current_trace(to_record("k", &event).unwrap()) })
            .await;
        let carried = std::str::from_utf8(record.header("ce_traceparent").unwrap()).unwrap();
        let carried = TraceContext::parse(carried).unwrap();
        assert_eq!(carried.trace_id(), ctx.trace_id());
        assert_ne!(carried.span_id(), ctx.span_id());

        let decoded = Event::<i32>::from_binary(record.headers, &record.payload).unwrap();
        assert_eq!(decoded.traceparent(), Some(carried.to_string().as_str()));
    }

    #[tokio::test]
    async fn an_event_keeps_its_own_trace() {
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let event = Event::builder("/s", "t", 1)
            .traceparent(tp)
            .build()
            .unwrap();
        let record = TraceContext::new_root()
            .scope(async { with_current_trace(to_record("k", &event).unwrap()) })
            .await;
        let values: Vec<_> = record
            .headers
            .iter()
            .filter(|(n, _)| n == "ce_traceparent")
            .collect();
        assert_eq!(values.len(), 1);
        assert_eq!(values[0].1, tp.as_bytes());
    }
}
