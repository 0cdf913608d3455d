//! The order events of the shop, and where they go.
//!
//! The order service writes each event into its outbox in the same transaction as the
//! state change it reports; a relay delivers the outbox in order to an [`EventSink`], and
//! marks each event sent only once it was delivered. A crash between delivery and mark
//! delivers the event again, so consumers drop events whose id they have seen.

use std::sync::Arc;

use micro_core::service::BoxFuture;
use micro_events::{Event, Publisher, PublisherExt};
use serde::{Deserialize, Serialize};

use crate::catalog::Money;

/// The topic of order events.
pub const ORDER_EVENTS: &str = "order-events";

/// What happened to an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum OrderEvent {
    /// The order was placed and awaits payment.
    OrderCreated {
        /// The order.
        order_id: String,
        /// Its owner.
        user_id: String,
        /// What it costs.
        total: Money,
    },
    /// The payment was captured.
    PaymentProcessed {
        /// The order.
        order_id: String,
        /// The payment.
        payment_id: String,
    },
    /// The payment was refused.
    PaymentFailed {
        /// The order.
        order_id: String,
        /// Why.
        reason: String,
    },
    /// The payment was given back.
    PaymentRefunded {
        /// The order.
        order_id: String,
        /// The payment.
        payment_id: String,
    },
    /// The stock was reserved.
    InventoryReserved {
        /// The order.
        order_id: String,
    },
    /// The stock could not be reserved.
    InventoryReservationFailed {
        /// The order.
        order_id: String,
        /// Why.
        reason: String,
    },
    /// The order is confirmed.
    OrderConfirmed {
        /// The order.
        order_id: String,
        /// Its owner.
        user_id: String,
        /// What was paid.
        total: Money,
    },
    /// The order was cancelled.
    OrderCancelled {
        /// The order.
        order_id: String,
        /// Its owner.
        user_id: String,
        /// Why.
        reason: String,
    },
}

impl OrderEvent {
    /// The order the event is about: the partition key.
    pub fn order_id(&self) -> &str {
        match self {
            Self::OrderCreated { order_id, .. }
            | Self::PaymentProcessed { order_id, .. }
            | Self::PaymentFailed { order_id, .. }
            | Self::PaymentRefunded { order_id, .. }
            | Self::InventoryReserved { order_id }
            | Self::InventoryReservationFailed { order_id, .. }
            | Self::OrderConfirmed { order_id, .. }
            | Self::OrderCancelled { order_id, .. } => order_id,
        }
    }

    /// The event's type name, as in the CloudEvents `type` attribute.
    pub fn name(&self) -> &'static str {
        match self {
            Self::OrderCreated { .. } => "OrderCreated",
            Self::PaymentProcessed { .. } => "PaymentProcessed",
            Self::PaymentFailed { .. } => "PaymentFailed",
            Self::PaymentRefunded { .. } => "PaymentRefunded",
            Self::InventoryReserved { .. } => "InventoryReserved",
            Self::InventoryReservationFailed { .. } => "InventoryReservationFailed",
            Self::OrderConfirmed { .. } => "OrderConfirmed",
            Self::OrderCancelled { .. } => "OrderCancelled",
        }
    }

    /// The event in its CloudEvents envelope, with an id derived from `id_seed` so that
    /// writing it twice gives one id.
    pub fn envelope(self, id_seed: &str) -> anyhow::Result<Event<OrderEvent>> {
        let order_id = self.order_id().to_owned();
        let event_type = format!("shop.order.{}", self.name());
        Ok(Event::builder("/shop/order-service", event_type, self)
            .id(id_seed)
            .subject(order_id)
            .schema_version(1)
            .build()?)
    }
}

/// Where the relay delivers order events.
pub trait EventSink: Send + Sync + std::fmt::Debug {
    /// Delivers one event; an error leaves it in the outbox, to be delivered again.
    fn deliver<'a>(&'a self, event: &'a Event<OrderEvent>) -> BoxFuture<'a, anyhow::Result<()>>;
}

/// Publishes order events on a bus, to a topic ([`ORDER_EVENTS`] unless the shop is told
/// a prefix), keyed by order id so that one order's events stay in order.
#[derive(Clone)]
pub struct BusSink {
    publisher: Arc<dyn Publisher>,
    topic: String,
}

impl BusSink {
    /// Publishes with `publisher` to `topic`.
    pub fn new(publisher: Arc<dyn Publisher>, topic: impl Into<String>) -> Self {
        Self {
            publisher,
            topic: topic.into(),
        }
    }
}

impl std::fmt::Debug for BusSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BusSink").finish_non_exhaustive()
    }
}

impl EventSink for BusSink {
    fn deliver<'a>(&'a self, event: &'a Event<OrderEvent>) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            let key = event.data().order_id().to_owned();
            self.publisher.publish(&self.topic, &key, event).await?;
            Ok(())
        })
    }
}
