//! The order service: orders placed from the caller's cart, driven by the order saga
//! (charge → reserve → confirm → notify), with their status history and events.
//!
//! - `POST /orders` needs an `Idempotency-Key`: the same key from the same user answers
//!   the same order. The order is written `PENDING` with its `OrderCreated` event in one
//!   transaction, the saga starts, and the answer is `202` with `Location`.
//! - The saga charges the card, reserves the stock, confirms the order (committing the
//!   stock) and publishes `OrderConfirmed`. When the reservation fails the payment is
//!   refunded and the order ends `CANCELLED` with the reason; when the refund keeps
//!   failing it ends `REQUIRES_ATTENTION`.
//! - Status moves only through [`Order::transition`], which rejects illegal moves.
//! - Events go through the outbox of the order's [`Ledger`] (its embedded store, or
//!   PostgreSQL with micro-events' outbox) and a relay to the bus.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use micro_core::client::HttpClient;
use micro_core::error::BoxError;
use micro_core::service::Service;
use micro_saga::{
    idempotency_key, Orchestrator, Phase, SagaDefinition, SagaInstance, SagaLog, SagaStatus,
    StepError, StepOutput, StepPolicy,
};
use serde::{Deserialize, Serialize};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::api::{ApiError, Body, IdempotencyKey, UserId};
use crate::cart::{CartView, Line};
use crate::catalog::Money;
use crate::events::OrderEvent;
use crate::inventory::Item;
use crate::payment::{ChargeRequest, Payment, PaymentMethod};
use micro_core::identity::OnBehalfOf;

mod ledger;

pub use self::ledger::Ledger;

/// Where an order is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OrderStatus {
    /// Placed; the saga is running.
    Pending,
    /// Paid; the stock is being reserved.
    Paid,
    /// Paid and reserved: it will ship.
    Confirmed,
    /// On its way.
    Shipped,
    /// Arrived.
    Delivered,
    /// Ended without effect (nothing charged, or refunded).
    Cancelled,
    /// Something could not be undone: a person must look.
    RequiresAttention,
}

impl OrderStatus {
    /// Whether an order may move from `self` to `to`.
    pub fn can_move_to(self, to: OrderStatus) -> bool {
        use OrderStatus::*;
        matches!(
            (self, to),
            (Pending, Paid | Cancelled | RequiresAttention)
                | (Paid, Confirmed | Cancelled | RequiresAttention)
                | (Confirmed, Shipped | Cancelled | RequiresAttention)
                | (Shipped, Delivered)
        )
    }

    /// Whether the order will not move again by itself.
    pub fn is_final(self) -> bool {
        !matches!(self, OrderStatus::Pending | OrderStatus::Paid)
    }
}

/// One move of an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusChange {
    /// The status it moved to.
    pub status: OrderStatus,
    /// Why.
    pub reason: String,
    /// When (RFC 3339).
    pub at: String,
}

/// The move is not allowed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("an order cannot move from {from:?} to {to:?}")]
pub struct IllegalTransition {
    /// Where it was.
    pub from: OrderStatus,
    /// Where it was asked to go.
    pub to: OrderStatus,
}

/// An order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    /// Its id.
    pub id: String,
    /// Its owner.
    pub user_id: String,
    /// What was bought, priced when the order was placed.
    pub lines: Vec<Line>,
    /// The sum.
    pub total: Money,
    /// Where it is.
    pub status: OrderStatus,
    /// Every move, oldest first.
    pub history: Vec<StatusChange>,
    /// The payment, once captured.
    pub payment_id: Option<String>,
}

impl Order {
    /// Moves the order to `to`, recording why.
    ///
    /// # Errors
    ///
    /// [`IllegalTransition`] when the status machine forbids it; the order is unchanged.
    pub fn transition(
        &mut self,
        to: OrderStatus,
        reason: impl Into<String>,
    ) -> Result<(), IllegalTransition> {
        if !self.status.can_move_to(to) {
            return Err(IllegalTransition {
                from: self.status,
                to,
            });
        }
        self.status = to;
        self.history.push(StatusChange {
            status: to,
            reason: reason.into(),
            at: now(),
        });
        Ok(())
    }
}

fn now() -> String {
    OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_default()
}

/// What the saga carries.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Checkout {
    /// The order.
    pub order_id: String,
    /// The user who placed it: the charge is made for them.
    #[serde(default)]
    pub user_id: String,
    /// The amount to charge.
    pub total: Money,
    /// The payment method to charge: the payment service's token for the card (the
    /// card number itself is only ever held by the payment service).
    #[serde(default)]
    pub payment_method: String,
    /// The card's last four digits, for people.
    #[serde(default)]
    pub card_last4: String,
    /// The stock to reserve.
    pub items: Vec<Item>,
}

/// `POST /orders`.
#[derive(Deserialize)]
pub struct PlaceOrder {
    /// The card to charge; handed to the payment service and kept nowhere else.
    pub card_number: String,
}

impl std::fmt::Debug for PlaceOrder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlaceOrder").finish_non_exhaustive()
    }
}

/// `GET /orders?status=`.
#[derive(Debug, Deserialize)]
pub struct ListOrders {
    /// Only orders with this status.
    pub status: Option<OrderStatus>,
}

/// Clients of the services the order service calls.
#[derive(Debug, Clone)]
pub struct Upstreams {
    /// The cart service.
    pub carts: HttpClient,
    /// The payment service.
    pub payments: HttpClient,
    /// The inventory service.
    pub inventory: HttpClient,
}

/// The order service.
#[derive(Debug, Clone)]
pub struct Orders {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    ledger: Ledger,
    upstreams: Upstreams,
    orchestrator: Orchestrator,
    saga: SagaDefinition<Checkout>,
    relay: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    recovery: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// A call's failure as a saga step error: a `4xx` answer is final; a call never sent,
/// a `503` or a `429` is a refusal that may pass; a call sent without a definite answer
/// (a timeout, a connection lost in flight, another `5xx`) may have taken effect, and
/// the saga resolves it (retry with the same key, then compensate).
fn step_error(error: micro_core::client::Error, what: &str) -> StepError {
    use micro_core::client::ErrorKind;
    let message = format!("{what}: {}", describe(&error));
    match (error.kind(), error.status()) {
        (_, Some(status)) if status.is_client_error() && status != 429 => {
            StepError::permanent(message)
        }
        (_, Some(status)) if status == 429 || status == 503 => StepError::retryable(message),
        (_, Some(_)) | (ErrorKind::Timeout | ErrorKind::Transport | ErrorKind::Decode, _) => {
            StepError::unknown(message)
        }
        _ => StepError::retryable(message),
    }
}

/// A write to the order's ledger failed: the step may succeed when it runs again.
fn unstored(error: anyhow::Error) -> StepError {
    StepError::retryable(error.to_string())
}

/// Records the event of a step that failed for good (`event` gets the reason) and hands
/// the failure back; a failure that may pass on a retry records nothing.
async fn failed(
    ledger: &Ledger,
    id: String,
    failure: StepError,
    event: impl FnOnce(String) -> OrderEvent,
) -> StepError {
    if failure.is_retryable() {
        return failure;
    }
    match ledger.event(id, event(failure.to_string())).await {
        Ok(()) => failure,
        Err(error) => unstored(error),
    }
}

/// The message of a shop error answer, or the error itself.
fn describe(error: &micro_core::client::Error) -> String {
    error
        .body_json::<serde_json::Value>()
        .and_then(|body| body["error"]["message"].as_str().map(str::to_owned))
        .unwrap_or_else(|| error.to_string())
}

fn order_saga(
    ledger: Ledger,
    upstreams: Upstreams,
) -> micro_saga::Result<SagaDefinition<Checkout>> {
    let (charge_ledger, charge_client) = (ledger.clone(), upstreams.payments.clone());
    let (refund_ledger, refund_client) = (ledger.clone(), upstreams.payments.clone());
    let (reserve_ledger, reserve_client) = (ledger.clone(), upstreams.inventory.clone());
    let release_client = upstreams.inventory.clone();
    let (confirm_ledger, confirm_client) = (ledger.clone(), upstreams.inventory.clone());
    let notify_ledger = ledger;
    let calls = StepPolicy::new()
        .timeout(Duration::from_secs(2))
        .max_attempts(3)
        .compensation_max_attempts(5)
        .initial_backoff(Duration::from_millis(50))
        .max_backoff(Duration::from_millis(500));

    SagaDefinition::<Checkout>::builder("place-order")
        .policy(calls)
        .step(
            "charge-payment",
            move |cx| {
                let (ledger, payments) = (charge_ledger.clone(), charge_client.clone());
                async move {
                    let checkout = cx.data();
                    let body = ChargeRequest {
                        order_id: checkout.order_id.clone(),
                        amount: checkout.total.clone(),
                        payment_method: checkout.payment_method.clone(),
                    };
                    let charged = payments
                        .request(http::Method::POST, "/payments")
                        .idempotency_key(cx.idempotency_key())
                        .extension(OnBehalfOf::user(&checkout.user_id))
                        .json(&body)
                        .send_json::<Payment>()
                        .await;
                    let id = format!("{}:payment", cx.idempotency_key());
                    match charged {
                        Ok(payment) => {
                            let event = OrderEvent::PaymentProcessed {
                                order_id: checkout.order_id.clone(),
                                payment_id: payment.id.clone(),
                            };
                            ledger
                                .moved(
                                    &checkout.order_id,
                                    OrderStatus::Paid,
                                    "payment captured",
                                    Some((id, event)),
                                    Some(&payment.id),
                                )
                                .await
                                .map_err(unstored)?;
                            StepOutput::json(&payment.id)
                        }
                        Err(error) => {
                            let failure = step_error(error, "payment failed");
                            Err(
                                failed(&ledger, id, failure, |reason| OrderEvent::PaymentFailed {
                                    order_id: checkout.order_id.clone(),
                                    reason,
                                })
                                .await,
                            )
                        }
                    }
                }
            },
            move |cx| {
                let (ledger, payments) = (refund_ledger.clone(), refund_client.clone());
                async move {
                    let payment_id = match cx.output() {
                        Some(_) => cx.output_as::<String>()?,
                        None => {
                            // The charge never answered: refund whatever its key charged
                            // (nothing charged is nothing to undo).
                            let key = idempotency_key(cx.saga_id(), cx.step(), Phase::Action);
                            let refunded = payments
                                .request(
                                    http::Method::POST,
                                    &format!("/payments/by-key/{key}/refund"),
                                )
                                .idempotency_key(cx.idempotency_key())
                                .send_json::<Option<Payment>>()
                                .await
                                .map_err(|e| {
                                    StepError::retryable(format!("refund failed: {}", describe(&e)))
                                })?;
                            match refunded {
                                Some(payment) => payment.id,
                                None => return Ok(()),
                            }
                        }
                    };
                    payments
                        .request(
                            http::Method::POST,
                            &format!("/payments/{payment_id}/refund"),
                        )
                        .idempotency_key(cx.idempotency_key())
                        .send()
                        .await
                        .map_err(|e| {
                            StepError::retryable(format!("refund failed: {}", describe(&e)))
                        })?;
                    let event = OrderEvent::PaymentRefunded {
                        order_id: cx.data().order_id.clone(),
                        payment_id,
                    };
                    ledger
                        .event(format!("{}:refund", cx.idempotency_key()), event)
                        .await
                        .map_err(unstored)?;
                    Ok(())
                }
            },
        )
        .step(
            "reserve-inventory",
            move |cx| {
                let (ledger, inventory) = (reserve_ledger.clone(), reserve_client.clone());
                async move {
                    let checkout = cx.data();
                    let body = serde_json::json!({
                        "order_id": checkout.order_id,
                        "items": checkout.items,
                    });
                    let reserved = inventory
                        .request(http::Method::POST, "/inventory/reservations")
                        .idempotency_key(cx.idempotency_key())
                        .json(&body)
                        .send()
                        .await;
                    let id = format!("{}:reservation", cx.idempotency_key());
                    let order_id = checkout.order_id.clone();
                    match reserved {
                        Ok(_) => {
                            ledger
                                .event(id, OrderEvent::InventoryReserved { order_id })
                                .await
                                .map_err(unstored)?;
                            Ok(StepOutput::empty())
                        }
                        Err(error) => {
                            let failure = step_error(error, "reservation failed");
                            Err(failed(&ledger, id, failure, |reason| {
                                OrderEvent::InventoryReservationFailed { order_id, reason }
                            })
                            .await)
                        }
                    }
                }
            },
            move |cx| {
                let inventory = release_client.clone();
                async move {
                    let path = format!("/inventory/reservations/{}/release", cx.data().order_id);
                    inventory
                        .request(http::Method::POST, &path)
                        .idempotency_key(cx.idempotency_key())
                        .send()
                        .await
                        .map_err(|e| step_error(e, "release failed"))?;
                    Ok(())
                }
            },
        )
        .pivot("confirm-order", move |cx| {
            let (ledger, inventory) = (confirm_ledger.clone(), confirm_client.clone());
            async move {
                let order_id = &cx.data().order_id;
                inventory
                    .request(
                        http::Method::POST,
                        &format!("/inventory/reservations/{order_id}/commit"),
                    )
                    .idempotency_key(cx.idempotency_key())
                    .send()
                    .await
                    .map_err(|e| step_error(e, "commit failed"))?;
                ledger
                    .moved(
                        order_id,
                        OrderStatus::Confirmed,
                        "paid and reserved",
                        None,
                        None,
                    )
                    .await
                    .map_err(unstored)?;
                Ok(StepOutput::empty())
            }
        })
        .final_step("notify", move |cx| {
            let ledger = notify_ledger.clone();
            async move {
                let order = ledger
                    .order(&cx.data().order_id)
                    .await
                    .map_err(unstored)?
                    .ok_or_else(|| StepError::permanent("the order is gone"))?;
                let event = OrderEvent::OrderConfirmed {
                    order_id: order.id.clone(),
                    user_id: order.user_id.clone(),
                    total: order.total.clone(),
                };
                ledger
                    .event(cx.idempotency_key().to_owned(), event)
                    .await
                    .map_err(unstored)?;
                Ok(StepOutput::empty())
            }
        })
        .build()
}

impl Orders {
    /// How long an order-service replica's hold on a saga lasts without renewal, on a
    /// log shared by replicas (PostgreSQL): a replica that dies leaves its sagas to the
    /// others this long after its last renewal.
    pub const SAGA_LEASE: Duration = Duration::from_secs(10);

    /// The service: orders and their outbox in `ledger`, sagas in `saga_log`.
    ///
    /// On a log that holds leases (PostgreSQL, shared by every replica), each saga is
    /// leased to this replica while it drives it ([`Self::SAGA_LEASE`]), so two replicas
    /// never drive one saga, and one that dies has its sagas taken over.
    pub fn new(
        ledger: Ledger,
        saga_log: Arc<dyn SagaLog>,
        upstreams: Upstreams,
    ) -> anyhow::Result<Self> {
        let saga = order_saga(ledger.clone(), upstreams.clone())?;
        let leases = saga_log.supports_leases();
        let mut orchestrator = Orchestrator::builder(saga_log).definition(&saga);
        if leases {
            let owner = format!("order-service-{}", uuid::Uuid::new_v4().simple());
            orchestrator = orchestrator.lease(owner, Self::SAGA_LEASE);
        }
        let orchestrator = orchestrator.build()?;
        Ok(Self {
            inner: Arc::new(Inner {
                ledger,
                upstreams,
                orchestrator,
                saga,
                relay: std::sync::Mutex::new(None),
                recovery: std::sync::Mutex::new(None),
            }),
        })
    }

    /// The order with this id.
    pub async fn order(&self, order_id: &str) -> anyhow::Result<Option<Order>> {
        self.inner.ledger.order(order_id).await
    }

    /// Every order, for the shop's invariant checks.
    pub async fn all(&self) -> anyhow::Result<Vec<Order>> {
        self.inner.ledger.all().await
    }

    /// Places an order from the user's cart, once per idempotency key.
    pub async fn place(&self, user: &str, key: &str, card_number: &str) -> Result<Order, ApiError> {
        let index = format!("{user}/{key}");
        let ledger = &self.inner.ledger;
        if let Some(order) = ledger.by_key(&index).await? {
            // A try whose saga did not start (its log was unreachable, answered 503)
            // starts it now; a saga that exists is left as it is.
            if order.status == OrderStatus::Pending {
                if let Some(checkout) = ledger.checkout(&order.id).await? {
                    self.start_saga(checkout).await?;
                }
            }
            return Ok(order);
        }
        let cart: CartView = self
            .inner
            .upstreams
            .carts
            .request(http::Method::GET, "/carts/me")
            .extension(OnBehalfOf::user(user))
            .send_json()
            .await
            .map_err(|error| {
                tracing::warn!(%error, "the cart service failed");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "cart_unavailable",
                    "the cart cannot be read now; try again",
                )
            })?;
        let Some(total) = cart.total.clone().filter(|_| !cart.lines.is_empty()) else {
            return Err(ApiError::bad_request("cart_empty", "the cart is empty"));
        };
        let id = format!("ord-{}", uuid::Uuid::new_v4().simple());
        let order = Order {
            id: id.clone(),
            user_id: user.to_owned(),
            lines: cart.lines.clone(),
            total: total.clone(),
            status: OrderStatus::Pending,
            history: vec![StatusChange {
                status: OrderStatus::Pending,
                reason: "placed".to_owned(),
                at: now(),
            }],
            payment_id: None,
        };
        let method = self.keep_card(user, card_number).await?;
        let checkout = Checkout {
            order_id: id.clone(),
            user_id: user.to_owned(),
            total: total.clone(),
            payment_method: method.token,
            card_last4: method.card_last4,
            items: cart
                .lines
                .iter()
                .map(|l| Item {
                    sku: l.sku.clone(),
                    quantity: l.quantity,
                })
                .collect(),
        };
        let created = OrderEvent::OrderCreated {
            order_id: id.clone(),
            user_id: user.to_owned(),
            total: total.clone(),
        };
        let (order, new) = ledger
            .place(
                &index,
                &order,
                &checkout,
                vec![(format!("{id}:created"), created)],
            )
            .await?;
        if new {
            let cleared = self
                .inner
                .upstreams
                .carts
                .request(http::Method::DELETE, "/carts/me")
                .extension(OnBehalfOf::user(user))
                .send()
                .await;
            if let Err(error) = cleared {
                tracing::warn!(%error, order_id = %order.id, "the cart was not cleared");
            }
            self.start_saga(checkout).await?;
        }
        Ok(order)
    }

    /// Hands the card to the payment service, the only one that keeps card numbers, for
    /// the token that stands for it.
    async fn keep_card(&self, user: &str, card_number: &str) -> Result<PaymentMethod, ApiError> {
        let body = serde_json::json!({ "card_number": card_number });
        self.inner
            .upstreams
            .payments
            .request(http::Method::POST, "/payments/methods")
            .extension(OnBehalfOf::user(user))
            .json(&body)
            .send_json()
            .await
            .map_err(|error| match error.status() {
                Some(status) if status == StatusCode::BAD_REQUEST => {
                    ApiError::bad_request("invalid_card", describe(&error))
                }
                _ => {
                    tracing::warn!(%error, "the payment service failed");
                    ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "payment_unavailable",
                        "the card cannot be taken now; try again",
                    )
                }
            })
    }

    async fn start_saga(&self, checkout: Checkout) -> anyhow::Result<()> {
        let order_id = checkout.order_id.clone();
        match self
            .inner
            .orchestrator
            .start(&self.inner.saga, &order_id, checkout)
            .await
        {
            Ok(handle) => {
                let this = self.clone();
                tokio::spawn(async move {
                    match handle.finished().await {
                        Ok(saga) => this.settle(&saga).await,
                        Err(error) => tracing::error!(%error, order_id, "the order saga stopped"),
                    }
                });
                Ok(())
            }
            Err(micro_saga::Error::Log(micro_saga::log::LogError::AlreadyExists { .. })) => Ok(()),
            Err(error) => Err(error.into()),
        }
    }

    /// Moves the order to where its finished saga says.
    async fn settle(&self, saga: &SagaInstance) {
        let order_id = saga.id();
        let reason = saga
            .steps()
            .iter()
            .filter_map(|s| s.error())
            .next_back()
            .unwrap_or("the saga ended")
            .to_owned();
        let ledger = &self.inner.ledger;
        let result = match saga.status() {
            SagaStatus::Compensated => {
                ledger
                    .update(order_id, |order| {
                        order
                            .transition(OrderStatus::Cancelled, reason.clone())
                            .ok()?;
                        let event = OrderEvent::OrderCancelled {
                            order_id: order.id.clone(),
                            user_id: order.user_id.clone(),
                            reason: reason.clone(),
                        };
                        Some(vec![(format!("{order_id}:cancelled"), event)])
                    })
                    .await
            }
            SagaStatus::Failed => {
                ledger
                    .update(order_id, |order| {
                        order
                            .transition(OrderStatus::RequiresAttention, reason.clone())
                            .ok()?;
                        Some(Vec::new())
                    })
                    .await
            }
            _ => Ok(None),
        };
        if let Err(error) = result {
            tracing::error!(%error, order_id, "the order's outcome was not recorded");
        }
    }

    /// Resumes unfinished sagas, settles orders whose saga ended while nobody watched,
    /// and starts the sagas of orders placed just before a crash.
    async fn recover(&self) -> anyhow::Result<()> {
        let recovery = self.inner.orchestrator.recover().await?;
        for handle in recovery.resumed {
            let this = self.clone();
            tokio::spawn(async move {
                if let Ok(saga) = handle.finished().await {
                    this.settle(&saga).await;
                }
            });
        }
        for order in self.all().await? {
            if order.status.is_final() {
                continue;
            }
            match self.inner.orchestrator.saga(&order.id).await? {
                Some(record) if record.status.is_terminal() => {
                    self.settle(&record.instance()?).await
                }
                Some(_) => {}
                None => {
                    if let Some(checkout) = self.inner.ledger.checkout(&order.id).await? {
                        self.start_saga(checkout).await?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Cancels a confirmed order: refunds it and returns its stock.
    pub async fn cancel(&self, user: &str, order_id: &str) -> Result<Order, ApiError> {
        let order = self.owned(user, order_id).await?;
        match order.status {
            OrderStatus::Pending | OrderStatus::Paid => {
                return Err(ApiError::conflict(
                    "order_in_progress",
                    "the order is being processed; try again in a moment",
                ))
            }
            OrderStatus::Confirmed => {}
            other => {
                return Err(ApiError::conflict(
                    "cannot_cancel",
                    format!("an order in status {other:?} cannot be cancelled"),
                ))
            }
        }
        let Some(payment_id) = &order.payment_id else {
            return Err(anyhow::anyhow!("a confirmed order has no payment").into());
        };
        let key = format!("{order_id}:cancel");
        self.inner
            .upstreams
            .payments
            .request(
                http::Method::POST,
                &format!("/payments/{payment_id}/refund"),
            )
            .idempotency_key(key.as_str())
            .send()
            .await
            .map_err(|error| {
                ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "refund_failed",
                    format!("the refund failed: {}", describe(&error)),
                )
            })?;
        self.inner
            .upstreams
            .inventory
            .request(
                http::Method::POST,
                &format!("/inventory/reservations/{order_id}/release"),
            )
            .idempotency_key(key.as_str())
            .send()
            .await
            .map_err(|error| {
                ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "release_failed",
                    format!("the stock was not returned: {}", describe(&error)),
                )
            })?;
        let reason = "cancelled by the customer".to_owned();
        let cancelled = self
            .inner
            .ledger
            .update(order_id, |order| {
                order
                    .transition(OrderStatus::Cancelled, reason.clone())
                    .ok()?;
                Some(vec![
                    (
                        format!("{key}:refund"),
                        OrderEvent::PaymentRefunded {
                            order_id: order.id.clone(),
                            payment_id: payment_id.clone(),
                        },
                    ),
                    (
                        format!("{order_id}:cancelled"),
                        OrderEvent::OrderCancelled {
                            order_id: order.id.clone(),
                            user_id: order.user_id.clone(),
                            reason: reason.clone(),
                        },
                    ),
                ])
            })
            .await?;
        cancelled.ok_or_else(|| ApiError::not_found("order_not_found", "no such order"))
    }

    async fn owned(&self, user: &str, order_id: &str) -> Result<Order, ApiError> {
        self.order(order_id)
            .await?
            .filter(|o| o.user_id == user)
            .ok_or_else(|| ApiError::not_found("order_not_found", format!("no order `{order_id}`")))
    }

    /// Events written but not yet published.
    pub async fn undelivered(&self) -> anyhow::Result<usize> {
        self.inner.ledger.undelivered().await
    }
}

async fn place(
    State(orders): State<Orders>,
    UserId(user): UserId,
    IdempotencyKey(key): IdempotencyKey,
    Body(request): Body<PlaceOrder>,
) -> Result<Response, ApiError> {
    let order = orders.place(&user, &key, &request.card_number).await?;
    let location = HeaderValue::from_str(&format!("/api/orders/{}", order.id))
        .map_err(|e| anyhow::anyhow!(e))?;
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, location)],
        Json(order),
    )
        .into_response())
}

async fn list(
    State(orders): State<Orders>,
    UserId(user): UserId,
    Query(query): Query<ListOrders>,
) -> Result<Json<Vec<Order>>, ApiError> {
    let mut mine: Vec<Order> = orders
        .all()
        .await?
        .into_iter()
        .filter(|o| o.user_id == user && query.status.is_none_or(|s| o.status == s))
        .collect();
    mine.sort_by(|a, b| b.history[0].at.cmp(&a.history[0].at));
    Ok(Json(mine))
}

async fn show(
    State(orders): State<Orders>,
    UserId(user): UserId,
    Path(order_id): Path<String>,
) -> Result<Json<Order>, ApiError> {
    orders.owned(&user, &order_id).await.map(Json)
}

async fn cancel(
    State(orders): State<Orders>,
    UserId(user): UserId,
    Path(order_id): Path<String>,
) -> Result<Json<Order>, ApiError> {
    orders.cancel(&user, &order_id).await.map(Json)
}

impl Service for Orders {
    fn name(&self) -> &str {
        "order-service"
    }

    fn version(&self) -> &str {
        env!("CARGO_PKG_VERSION")
    }

    fn router(&self) -> Router {
        Router::new()
            .route("/orders", post(place).get(list))
            .route("/orders/{id}", get(show))
            .route("/orders/{id}/cancel", post(cancel))
            .with_state(self.clone())
    }

    fn health_checks(&self) -> Vec<micro_core::health::HealthCheck> {
        self.inner.ledger.health_checks()
    }

    async fn start(&self) -> Result<(), BoxError> {
        let relay = tokio::spawn(self.inner.ledger.clone().relay());
        *self.inner.relay.lock().unwrap_or_else(|e| e.into_inner()) = Some(relay);
        // Recovery calls the other services, which may still be starting: run it aside.
        // Then recovery goes on: sagas abandoned while the service runs (their driver
        // stopped, another instance died) are picked up once idle past any step's
        // attempts and backoffs.
        let this = self.clone();
        let recovery = tokio::spawn(async move {
            if let Err(error) = this.recover().await {
                tracing::error!(error = format!("{error:#}"), "order recovery failed");
            }
            let mut sweeping = this
                .inner
                .orchestrator
                .keep_recovering(Duration::from_secs(5), Duration::from_secs(60));
            while let Some(handle) = sweeping.resumed().await {
                let this = this.clone();
                tokio::spawn(async move {
                    // A saga another replica took over ends here with a fenced or
                    // lapsed lease: it is no longer this replica's to settle.
                    if let Ok(saga) = handle.finished().await {
                        this.settle(&saga).await;
                    }
                });
            }
        });
        *self
            .inner
            .recovery
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(recovery);
        Ok(())
    }

    async fn stop(&self) -> Result<(), BoxError> {
        if let Some(relay) = self
            .inner
            .relay
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            relay.abort();
        }
        if let Some(recovery) = self
            .inner
            .recovery
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            recovery.abort();
        }
        Ok(())
    }
}

/// Counts of orders by status, for summaries.
pub fn by_status(orders: &[Order]) -> BTreeMap<OrderStatus, usize> {
    let mut counts = BTreeMap::new();
    for order in orders {
        *counts.entry(order.status).or_default() += 1;
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_machine_rejects_illegal_moves() {
        let mut order = Order {
            id: "o".into(),
            user_id: "u".into(),
            lines: Vec::new(),
            total: Money {
                amount: 1,
                currency: "USD".into(),
            },
            status: OrderStatus::Pending,
            history: Vec::new(),
            payment_id: None,
        };
        assert_eq!(
            order.transition(OrderStatus::Confirmed, "skip"),
            Err(IllegalTransition {
                from: OrderStatus::Pending,
                to: OrderStatus::Confirmed
            })
        );
        order.transition(OrderStatus::Paid, "paid").unwrap();
        order.transition(OrderStatus::Confirmed, "ok").unwrap();
        order
            .transition(OrderStatus::Cancelled, "changed mind")
            .unwrap();
        assert!(order.transition(OrderStatus::Paid, "again").is_err());
        assert_eq!(order.history.len(), 3);
        assert_eq!(order.history[2].reason, "changed mind");
    }
}
