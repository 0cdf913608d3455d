//! The notification service: consumes order events and records what it sent, queryable
//! by order. An event it has seen (by id) is dropped, so a redelivered event sends
//! nothing twice.

use axum::extract::{Query, State};
use axum::routing::get;
use axum::{Json, Router};
use micro_core::service::{BoxFuture, Service};
use micro_events::{Event, Received, Subscriber, SubscriberExt, Subscription};
use serde::{Deserialize, Serialize};

use crate::api::{ApiError, UserId};
use crate::events::{EventSink, OrderEvent};
use crate::store::Store;

const SENT: &str = "sent";
const SEEN: &str = "seen";

/// A message sent to a customer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notification {
    /// The order it is about.
    pub order_id: String,
    /// The customer.
    pub user_id: String,
    /// `order_confirmed` or `order_cancelled`.
    pub kind: String,
    /// The text.
    pub message: String,
    /// The event that caused it.
    pub event_id: String,
}

/// `GET /notifications?order_id=`.
#[derive(Debug, Deserialize)]
pub struct ByOrder {
    /// The order.
    pub order_id: String,
}

/// The notification service.
#[derive(Debug, Clone)]
pub struct Notifications {
    store: Store,
}

impl Notifications {
    /// The service over `store`.
    pub fn new(store: Store) -> Self {
        Self { store }
    }

    /// Handles one order event, once per event id.
    pub fn handle(&self, event: &Event<OrderEvent>) -> anyhow::Result<()> {
        let notification = match event.data() {
            OrderEvent::OrderConfirmed {
                order_id,
                user_id,
                total,
            } => Some(Notification {
                order_id: order_id.clone(),
                user_id: user_id.clone(),
                kind: "order_confirmed".to_owned(),
                message: format!(
                    "Your order {order_id} is confirmed: {} {}.",
                    total.amount, total.currency
                ),
                event_id: event.id().to_owned(),
            }),
            OrderEvent::OrderCancelled {
                order_id,
                user_id,
                reason,
            } => Some(Notification {
                order_id: order_id.clone(),
                user_id: user_id.clone(),
                kind: "order_cancelled".to_owned(),
                message: format!("Your order {order_id} was cancelled: {reason}."),
                event_id: event.id().to_owned(),
            }),
            _ => None,
        };
        self.store.write(|tx| {
            if tx.get::<bool>(SEEN, event.id())?.is_some() {
                return Ok(());
            }
            tx.put(SEEN, event.id(), &true)?;
            if let Some(notification) = &notification {
                let key = format!("{}/{}", notification.order_id, event.id());
                tx.put(SENT, &key, notification)?;
            }
            Ok(())
        })
    }

    /// Consumes the order events of `topic` on `bus` as a member of `group`.
    ///
    /// # Errors
    ///
    /// When the bus refuses the subscription.
    pub async fn subscribe(
        &self,
        bus: &dyn Subscriber,
        topic: &str,
        group: &str,
    ) -> micro_events::Result<Subscription> {
        let this = self.clone();
        bus.subscribe(topic, group, move |received: Received<OrderEvent>| {
            let this = this.clone();
            async move {
                this.handle(received.event())
                    .map_err(micro_core::error::BoxError::from)
            }
        })
        .await
    }

    /// What was sent about an order.
    pub fn for_order(&self, order_id: &str) -> anyhow::Result<Vec<Notification>> {
        Ok(self
            .store
            .list(SENT, &format!("{order_id}/"))?
            .into_iter()
            .map(|(_, n)| n)
            .collect())
    }
}

impl EventSink for Notifications {
    fn deliver<'a>(&'a self, event: &'a Event<OrderEvent>) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move { self.handle(event) })
    }
}

async fn by_order(
    State(notifications): State<Notifications>,
    UserId(user): UserId,
    Query(query): Query<ByOrder>,
) -> Result<Json<Vec<Notification>>, ApiError> {
    let sent = notifications.for_order(&query.order_id)?;
    // An order's notifications are its owner's: another user's order is not found.
    if sent.iter().any(|n| n.user_id != user) {
        return Err(ApiError::not_found(
            "order_not_found",
            format!("no order `{}`", query.order_id),
        ));
    }
    Ok(Json(sent))
}

impl Service for Notifications {
    fn name(&self) -> &str {
        "notification-service"
    }

    fn version(&self) -> &str {
        env!("CARGO_PKG_VERSION")
    }

    fn router(&self) -> Router {
        Router::new()
            .route("/notifications", get(by_order))
            .with_state(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Money;

    #[test]
    fn a_redelivered_event_sends_nothing_twice() {
        let notifications = Notifications::new(Store::in_memory().unwrap());
        let event = OrderEvent::OrderConfirmed {
            order_id: "o1".into(),
            user_id: "u1".into(),
            total: Money {
                amount: 1200,
                currency: "USD".into(),
            },
        }
        .envelope("o1:notify")
        .unwrap();
        notifications.handle(&event).unwrap();
        notifications.handle(&event).unwrap();
        let sent = notifications.for_order("o1").unwrap();
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].kind, "order_confirmed");
        assert!(notifications.for_order("o2").unwrap().is_empty());
    }
}
