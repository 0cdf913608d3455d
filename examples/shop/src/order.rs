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
//! - `POST /orders/{id}/cancel` moves a confirmed order to `CANCELLING` and starts the
//!   cancel-order saga: refund (the go/no-go), return the stock, record `CANCELLED` with
//!   `OrderCancelled`; the steps after the refund retry until done, and recovery resumes
//!   a cancel a crash interrupted. It answers `200` with the order once the saga is done
//!   (it waits up to [`Orders::CANCEL_WAIT`]), `202` with the order `CANCELLING` before.
//!   The refund and the release are the place-order saga's compensations, one code
//!   path for both sagas.
//! - Status is written only by [`Ledger::transition`], checked by [`Order::transition`],
//!   which rejects illegal moves.
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
    idempotency_key, Orchestrator, Phase, SagaDefinition, SagaHandle, SagaInstance, SagaLog,
    SagaStatus, StepContext, StepError, StepOutput, StepPolicy,
};
use serde::{Deserialize, Serialize};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::api::{ApiError, Body, IdempotencyKey, UserId};
use crate::cart::{CartView, Line};
use crate::catalog::Money;
use crate::events::OrderEvent;
use crate::inventory::{Item, ReserveRequest};
use crate::payment::{ChargeRequest, Payment, PaymentMethod};
use micro_core::identity::OnBehalfOf;

mod ledger;

pub use self::ledger::{Ledger, Transitioned};

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
    /// Its customer cancelled it: the cancel-order saga is refunding the payment and
    /// returning the stock, and will record it `CANCELLED`.
    Cancelling,
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
                | (Confirmed, Shipped | Cancelling | RequiresAttention)
                | (Cancelling, Cancelled | Confirmed | RequiresAttention)
                | (Shipped, Delivered)
        )
    }

    /// Whether the order will not move again by itself.
    pub fn is_final(self) -> bool {
        !matches!(
            self,
            OrderStatus::Pending | OrderStatus::Paid | OrderStatus::Cancelling
        )
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
    cancel: SagaDefinition<Cancellation>,
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

/// The place-order saga's name in the saga log.
const PLACE_ORDER: &str = "place-order";
/// The cancel-order saga's name in the saga log.
const CANCEL_ORDER: &str = "cancel-order";

/// The policy of calls to the other services: each attempt bounded, a few retries.
fn calls() -> StepPolicy {
    StepPolicy::new()
        .timeout(Duration::from_secs(2))
        .max_attempts(3)
        // A refund or a release is keyed, so safe to repeat: one that fails for now (the
        // payment or inventory service restarting, a lost answer) is tried again until
        // it is done; only a definite refusal (a 4xx) leaves the order needing attention.
        .compensation_max_attempts(StepPolicy::UNBOUNDED)
        .initial_backoff(Duration::from_millis(50))
        .max_backoff(Duration::from_secs(2))
}

/// What the cancel-order saga carries.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Cancellation {
    /// The order.
    pub order_id: String,
    /// Its captured payment, to refund.
    pub payment_id: String,
    /// Why it is cancelled, for its history and its `OrderCancelled`.
    pub reason: String,
}

impl Cancellation {
    /// The cancellation of a confirmed (or cancelling) order.
    fn of(order: &Order) -> anyhow::Result<Self> {
        let payment_id = order
            .payment_id
            .clone()
            .ok_or_else(|| anyhow::anyhow!("order `{}` has no payment to refund", order.id))?;
        Ok(Self {
            order_id: order.id.clone(),
            payment_id,
            reason: CANCELLED_BY_CUSTOMER.to_owned(),
        })
    }

    /// The id of the cancel saga of `order`: one per time the order moved to
    /// `CANCELLING`, so that a cancel refused once can be asked for again.
    fn saga_id(order: &Order) -> String {
        let asked = order
            .history
            .iter()
            .filter(|c| c.status == OrderStatus::Cancelling)
            .count();
        format!("{}{CANCEL_SAGA}{asked}", order.id)
    }

    /// The order a cancel saga id (from [`Cancellation::saga_id`]) is for.
    fn order_of(saga_id: &str) -> Option<&str> {
        saga_id.rsplit_once(CANCEL_SAGA).map(|(order, _)| order)
    }
}

/// What separates the order id from the attempt in a cancel saga's id.
const CANCEL_SAGA: &str = ":cancel-";
const CANCEL_REQUESTED: &str = "cancel requested by the customer";
const CANCELLED_BY_CUSTOMER: &str = "cancelled by the customer";

/// What the steps of both sagas act on: the order's ledger and the services it calls.
/// One value shared by every step, instead of clones captured per closure.
#[derive(Debug, Clone)]
struct Participants {
    ledger: Ledger,
    upstreams: Upstreams,
}

/// A step written as a function of the participants and the step's context.
fn with<C, T, F, Fut>(
    participants: &Participants,
    step: F,
) -> impl Fn(StepContext<C>) -> Fut + Send + Sync + 'static
where
    F: Fn(Participants, StepContext<C>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<T, StepError>> + Send + 'static,
{
    let participants = participants.clone();
    move |cx| step(participants.clone(), cx)
}

impl Participants {
    /// charge-payment: captures the order's total; the order becomes `PAID`.
    async fn charge(self, cx: StepContext<Checkout>) -> Result<StepOutput<Checkout>, StepError> {
        let checkout = cx.data();
        let body = ChargeRequest {
            order_id: checkout.order_id.clone(),
            amount: checkout.total.clone(),
            payment_method: checkout.payment_method.clone(),
        };
        let charged = self
            .upstreams
            .payments
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
                self.ledger
                    .transition(
                        &checkout.order_id,
                        OrderStatus::Paid,
                        "payment captured",
                        Some(&payment.id),
                        |_| vec![(id, event)],
                    )
                    .await
                    .map_err(unstored)?
                    .warn_if_refused(&checkout.order_id);
                StepOutput::json(&payment.id)
            }
            Err(error) => {
                let failure = step_error(error, "payment failed");
                Err(failed(&self.ledger, id, failure, |reason| {
                    OrderEvent::PaymentFailed {
                        order_id: checkout.order_id.clone(),
                        reason,
                    }
                })
                .await)
            }
        }
    }

    /// charge-payment's compensation: refunds what the charge captured, or, when the
    /// charge never answered, whatever its key charged (nothing charged is nothing to
    /// undo).
    async fn refund_charge(self, cx: StepContext<Checkout>) -> Result<(), StepError> {
        let payment_id = match cx.output() {
            Some(_) => cx.output_as::<String>()?,
            None => {
                let key = idempotency_key(cx.saga_id(), cx.step(), Phase::Action);
                let refunded = self
                    .upstreams
                    .payments
                    .request(
                        http::Method::POST,
                        &format!("/payments/by-key/{key}/refund"),
                    )
                    .idempotency_key(cx.idempotency_key())
                    .send_json::<Option<Payment>>()
                    .await
                    .map_err(|e| step_error(e, "refund failed"))?;
                match refunded {
                    Some(payment) => payment.id,
                    None => return Ok(()),
                }
            }
        };
        self.refund(&cx.data().order_id, &payment_id, cx.idempotency_key())
            .await
    }

    /// cancel-order's refund-payment.
    async fn refund_cancelled(
        self,
        cx: StepContext<Cancellation>,
    ) -> Result<StepOutput<Cancellation>, StepError> {
        let cancellation = cx.data();
        self.refund(
            &cancellation.order_id,
            &cancellation.payment_id,
            cx.idempotency_key(),
        )
        .await?;
        Ok(StepOutput::empty())
    }

    /// The refund, for both sagas: the payment goes back (again is nothing more: the
    /// payment service refunds a payment once), then `PaymentRefunded`, its id from
    /// the step's key, so that a step run again writes the same event.
    async fn refund(&self, order_id: &str, payment_id: &str, key: &str) -> Result<(), StepError> {
        self.upstreams
            .payments
            .request(
                http::Method::POST,
                &format!("/payments/{payment_id}/refund"),
            )
            .idempotency_key(key)
            .send()
            .await
            .map_err(|e| step_error(e, "refund failed"))?;
        let event = OrderEvent::PaymentRefunded {
            order_id: order_id.to_owned(),
            payment_id: payment_id.to_owned(),
        };
        self.ledger
            .event(format!("{key}:refund"), event)
            .await
            .map_err(unstored)
    }

    /// reserve-inventory: holds every line's units, or none.
    async fn reserve(self, cx: StepContext<Checkout>) -> Result<StepOutput<Checkout>, StepError> {
        let checkout = cx.data();
        let body = ReserveRequest {
            order_id: checkout.order_id.clone(),
            items: checkout.items.clone(),
        };
        let reserved = self
            .upstreams
            .inventory
            .request(http::Method::POST, "/inventory/reservations")
            .idempotency_key(cx.idempotency_key())
            .json(&body)
            .send()
            .await;
        let id = format!("{}:reservation", cx.idempotency_key());
        let order_id = checkout.order_id.clone();
        match reserved {
            Ok(_) => {
                self.ledger
                    .event(id, OrderEvent::InventoryReserved { order_id })
                    .await
                    .map_err(unstored)?;
                Ok(StepOutput::empty())
            }
            Err(error) => {
                let failure = step_error(error, "reservation failed");
                Err(failed(&self.ledger, id, failure, |reason| {
                    OrderEvent::InventoryReservationFailed { order_id, reason }
                })
                .await)
            }
        }
    }

    /// reserve-inventory's compensation.
    async fn release_reservation(self, cx: StepContext<Checkout>) -> Result<(), StepError> {
        self.release(&cx.data().order_id, cx.idempotency_key())
            .await
    }

    /// cancel-order's return-stock.
    async fn return_stock(
        self,
        cx: StepContext<Cancellation>,
    ) -> Result<StepOutput<Cancellation>, StepError> {
        self.release(&cx.data().order_id, cx.idempotency_key())
            .await?;
        Ok(StepOutput::empty())
    }

    /// The release, for both sagas: the order's units go back to stock, whether they
    /// were held or had left with the confirmed order; releasing what was never
    /// reserved, or again, is nothing more.
    async fn release(&self, order_id: &str, key: &str) -> Result<(), StepError> {
        self.upstreams
            .inventory
            .request(
                http::Method::POST,
                &format!("/inventory/reservations/{order_id}/release"),
            )
            .idempotency_key(key)
            .send()
            .await
            .map_err(|e| step_error(e, "release failed"))?;
        Ok(())
    }

    /// confirm-order, the pivot: commits the reservation; the order becomes `CONFIRMED`.
    async fn confirm(self, cx: StepContext<Checkout>) -> Result<StepOutput<Checkout>, StepError> {
        let order_id = &cx.data().order_id;
        self.upstreams
            .inventory
            .request(
                http::Method::POST,
                &format!("/inventory/reservations/{order_id}/commit"),
            )
            .idempotency_key(cx.idempotency_key())
            .send()
            .await
            .map_err(|e| step_error(e, "commit failed"))?;
        self.ledger
            .transition(
                order_id,
                OrderStatus::Confirmed,
                "paid and reserved",
                None,
                |_| Vec::new(),
            )
            .await
            .map_err(unstored)?
            .warn_if_refused(order_id);
        Ok(StepOutput::empty())
    }

    /// notify: publishes `OrderConfirmed`.
    async fn notify(self, cx: StepContext<Checkout>) -> Result<StepOutput<Checkout>, StepError> {
        let order = self
            .ledger
            .order(&cx.data().order_id)
            .await
            .map_err(unstored)?
            .ok_or_else(|| StepError::permanent("the order is gone"))?;
        let event = OrderEvent::OrderConfirmed {
            order_id: order.id.clone(),
            user_id: order.user_id.clone(),
            total: order.total.clone(),
        };
        self.ledger
            .event(cx.idempotency_key().to_owned(), event)
            .await
            .map_err(unstored)?;
        Ok(StepOutput::empty())
    }

    /// cancel-order's record-cancelled: the order becomes `CANCELLED` with its
    /// `OrderCancelled`, once the payment and the stock are back.
    async fn record_cancelled(
        self,
        cx: StepContext<Cancellation>,
    ) -> Result<StepOutput<Cancellation>, StepError> {
        let cancellation = cx.data();
        let moved = self
            .ledger
            .transition(
                &cancellation.order_id,
                OrderStatus::Cancelled,
                &cancellation.reason,
                None,
                |order| vec![cancelled_event(order, &cancellation.reason)],
            )
            .await
            .map_err(unstored)?;
        match moved {
            Transitioned::Moved(_) | Transitioned::Already(_) => Ok(StepOutput::empty()),
            Transitioned::Refused(_, refused) => Err(StepError::permanent(refused.to_string())),
            Transitioned::Missing => Err(StepError::permanent("the order is gone")),
        }
    }
}

/// The `OrderCancelled` of an order; one per order, whichever saga cancelled it.
fn cancelled_event(order: &Order, reason: &str) -> ledger::Pending {
    (
        format!("{}:cancelled", order.id),
        OrderEvent::OrderCancelled {
            order_id: order.id.clone(),
            user_id: order.user_id.clone(),
            reason: reason.to_owned(),
        },
    )
}

/// charge → reserve → confirm (the pivot) → notify; a failure before the pivot refunds
/// and releases.
fn order_saga(participants: &Participants) -> micro_saga::Result<SagaDefinition<Checkout>> {
    let p = participants;
    SagaDefinition::<Checkout>::builder(PLACE_ORDER)
        .policy(calls())
        .step(
            "charge-payment",
            with(p, Participants::charge),
            with(p, Participants::refund_charge),
        )
        .step(
            "reserve-inventory",
            with(p, Participants::reserve),
            with(p, Participants::release_reservation),
        )
        // Past the pivot the order is kept: a step that can't tell (a call or a write of
        // our own that failed for now, a database blip) is retried until it can, never
        // turned into an order that needs attention.
        .policy(calls().max_backoff(Duration::from_secs(2)).until_done())
        .pivot("confirm-order", with(p, Participants::confirm))
        .final_step("notify", with(p, Participants::notify))
        .build()
}

/// The cancel of a confirmed order, which is `CANCELLING` before it starts: the refund
/// (the place-order saga's own, retried as its compensation is) is the go/no-go, since
/// the payment service may refuse it; once the money is back, the stock is returned
/// (the place-order saga's release) and the order recorded `CANCELLED`, each retried
/// until done (forward recovery). A refund refused for good leaves nothing applied, and
/// the order goes back to `CONFIRMED`; one that fails for now is tried again until it
/// is done, as every compensation is.
fn cancel_saga(participants: &Participants) -> micro_saga::Result<SagaDefinition<Cancellation>> {
    let p = participants;
    let forward = calls().max_backoff(Duration::from_secs(2)).until_done();
    SagaDefinition::<Cancellation>::builder(CANCEL_ORDER)
        .policy(calls().max_attempts(calls().compensation_max_attempts))
        .pivot("refund-payment", with(p, Participants::refund_cancelled))
        .policy(forward)
        .final_step("return-stock", with(p, Participants::return_stock))
        .final_step("record-cancelled", with(p, Participants::record_cancelled))
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
        let participants = Participants {
            ledger: ledger.clone(),
            upstreams: upstreams.clone(),
        };
        let saga = order_saga(&participants)?;
        let cancel = cancel_saga(&participants)?;
        let leases = saga_log.supports_leases();
        let mut orchestrator = Orchestrator::builder(saga_log)
            .definition(&saga)
            .definition(&cancel);
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
                cancel,
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
        self.start(&self.inner.saga, &order_id, checkout).await?;
        Ok(())
    }

    /// Starts a saga, and settles its order when it finishes; `None` when a saga with
    /// this id exists (starting is idempotent by id).
    async fn start<C: micro_saga::SagaContext>(
        &self,
        saga: &SagaDefinition<C>,
        saga_id: &str,
        context: C,
    ) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
        match self.inner.orchestrator.start(saga, saga_id, context).await {
            Ok(handle) => Ok(Some(self.watch(handle))),
            Err(micro_saga::Error::Log(micro_saga::log::LogError::AlreadyExists { .. })) => {
                Ok(None)
            }
            Err(error) => Err(error.into()),
        }
    }

    /// Settles the saga's order when it finishes. A saga another replica took over
    /// ends here with a fenced or lapsed lease: it is no longer this replica's to
    /// settle.
    fn watch(&self, handle: SagaHandle) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let saga_id = handle.saga_id().to_owned();
            match handle.finished().await {
                Ok(saga) => this.settle(&saga).await,
                Err(error) => tracing::warn!(%error, saga_id, "a saga stopped here"),
            }
        })
    }

    /// Moves the order to where its finished saga says, when the saga did not write it
    /// itself: a compensated place-order saga cancels the order, a cancel-order saga
    /// whose refund was refused gives the order back to `CONFIRMED`, and a failed saga
    /// of either kind needs attention.
    async fn settle(&self, saga: &SagaInstance) {
        let reason = saga
            .steps()
            .iter()
            .filter_map(|s| s.error())
            .next_back()
            .unwrap_or("the saga ended")
            .to_owned();
        let order_id = match saga.definition() {
            CANCEL_ORDER => Cancellation::order_of(saga.id()).unwrap_or(saga.id()),
            _ => saga.id(),
        };
        let (to, reason) = match (saga.definition(), saga.status()) {
            (_, SagaStatus::Failed) => (OrderStatus::RequiresAttention, reason),
            (CANCEL_ORDER, SagaStatus::Compensated) => (
                OrderStatus::Confirmed,
                format!("the cancel was refused: {reason}"),
            ),
            (_, SagaStatus::Compensated) => (OrderStatus::Cancelled, reason),
            _ => return,
        };
        let events = |order: &Order| match to {
            OrderStatus::Cancelled => vec![cancelled_event(order, &reason)],
            _ => Vec::new(),
        };
        let ledger = &self.inner.ledger;
        // Written until it is: an outcome left unwritten would leave the order PENDING
        // (or CANCELLING) for good while its saga has ended.
        let backoff =
            micro_core::backoff::Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        for attempt in 0.. {
            match ledger
                .transition(order_id, to, &reason, None, &events)
                .await
            {
                Ok(moved) => return moved.warn_if_refused(order_id),
                Err(error) => {
                    tracing::warn!(
                        error = format!("{error:#}"),
                        order_id,
                        attempt,
                        "the order's outcome was not recorded yet"
                    );
                    tokio::time::sleep(backoff.delay(attempt)).await;
                }
            }
        }
    }

    /// Resumes unfinished sagas, settles orders whose saga ended while nobody watched,
    /// and starts the sagas of orders placed just before a crash.
    async fn recover(&self) -> anyhow::Result<()> {
        let recovery = self.inner.orchestrator.recover().await?;
        for handle in recovery.resumed {
            self.watch(handle);
        }
        for order in self.all().await? {
            if order.status.is_final() {
                continue;
            }
            if order.status == OrderStatus::Cancelling {
                self.resume_cancel(&order).await?;
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

    /// How long a cancel request waits for its cancel-order saga before it answers
    /// with the order still `CANCELLING`.
    pub const CANCEL_WAIT: Duration = Duration::from_secs(3);

    /// Cancels a confirmed order: it becomes `CANCELLING`, and the cancel-order saga
    /// refunds it, returns its stock and records it `CANCELLED`. Waits up to
    /// [`Self::CANCEL_WAIT`] for the saga, then answers the order as it is; the saga
    /// goes on (after a crash too, resumed by recovery). Cancelling an order already
    /// `CANCELLING` answers it. A refund refused for good gives the order back to
    /// `CONFIRMED`, answered `409 cancel_refused` with the reason.
    pub async fn cancel(&self, user: &str, order_id: &str) -> Result<Order, ApiError> {
        let order = self.owned(user, order_id).await?;
        cancellable(order.status)?;
        let order = match self
            .inner
            .ledger
            .transition(
                order_id,
                OrderStatus::Cancelling,
                CANCEL_REQUESTED,
                None,
                |_| Vec::new(),
            )
            .await?
        {
            Transitioned::Moved(order) | Transitioned::Already(order) => order,
            // It moved on in the meantime.
            Transitioned::Refused(order, refused) => {
                cancellable(order.status)?;
                return Err(anyhow::Error::from(refused).into());
            }
            Transitioned::Missing => {
                return Err(ApiError::not_found("order_not_found", "no such order"))
            }
        };
        if let Some(finished) = self.resume_cancel(&order).await? {
            if tokio::time::timeout(Self::CANCEL_WAIT, finished)
                .await
                .is_err()
            {
                tracing::info!(order_id, "the cancel goes on after its answer");
            }
        }
        let order = self
            .order(order_id)
            .await?
            .ok_or_else(|| ApiError::not_found("order_not_found", "no such order"))?;
        if order.status == OrderStatus::Confirmed {
            let why = order.history.last().map_or("", |c| c.reason.as_str());
            return Err(ApiError::conflict("cancel_refused", why));
        }
        Ok(order)
    }

    /// Starts the cancel-order saga of a `CANCELLING` order unless it runs (or ran:
    /// then its outcome is settled); the task that settles it, when it was started.
    async fn resume_cancel(
        &self,
        order: &Order,
    ) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
        let saga_id = Cancellation::saga_id(order);
        match self.inner.orchestrator.saga(&saga_id).await? {
            Some(record) if record.status.is_terminal() => {
                self.settle(&record.instance()?).await;
                Ok(None)
            }
            Some(_) => Ok(None),
            None => {
                let cancellation = Cancellation::of(order)?;
                self.start(&self.inner.cancel, &saga_id, cancellation).await
            }
        }
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

/// `200` with the order `CANCELLED`, or `202` with `Location` while it is still
/// `CANCELLING`; `409 cancel_refused` when the refund was refused and the order is
/// `CONFIRMED` again.
async fn cancel(
    State(orders): State<Orders>,
    UserId(user): UserId,
    Path(order_id): Path<String>,
) -> Result<Response, ApiError> {
    let order = orders.cancel(&user, &order_id).await?;
    if order.status != OrderStatus::Cancelling {
        return Ok(Json(order).into_response());
    }
    let location = HeaderValue::from_str(&format!("/api/orders/{}", order.id))
        .map_err(|e| anyhow::anyhow!(e))?;
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, location)],
        Json(order),
    )
        .into_response())
}

/// Whether an order in `status` may be cancelled; the answer when it may not.
fn cancellable(status: OrderStatus) -> Result<(), ApiError> {
    match status {
        OrderStatus::Confirmed | OrderStatus::Cancelling => Ok(()),
        OrderStatus::Pending | OrderStatus::Paid => Err(ApiError::conflict(
            "order_in_progress",
            "the order is being processed; try again in a moment",
        )),
        other => Err(ApiError::conflict(
            "cannot_cancel",
            format!("an order in status {other:?} cannot be cancelled"),
        )),
    }
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
                this.watch(handle);
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
        // A customer's cancel goes through CANCELLING, never straight to CANCELLED.
        assert!(order.transition(OrderStatus::Cancelled, "skip").is_err());
        order
            .transition(OrderStatus::Cancelling, "changed mind")
            .unwrap();
        assert!(order.transition(OrderStatus::Shipped, "ship").is_err());
        order
            .transition(OrderStatus::Cancelled, "cancelled")
            .unwrap();
        assert!(order.transition(OrderStatus::Paid, "again").is_err());
        assert_eq!(order.history.len(), 4);
        assert_eq!(order.history[2].reason, "changed mind");
    }

    #[test]
    fn the_status_machine_allows_exactly_these_moves() {
        use OrderStatus::*;
        let all = [
            Pending,
            Paid,
            Confirmed,
            Cancelling,
            Shipped,
            Delivered,
            Cancelled,
            RequiresAttention,
        ];
        let allowed = [
            (Pending, Paid),
            (Pending, Cancelled),
            (Pending, RequiresAttention),
            (Paid, Confirmed),
            (Paid, Cancelled),
            (Paid, RequiresAttention),
            (Confirmed, Shipped),
            (Confirmed, Cancelling),
            (Confirmed, RequiresAttention),
            // The cancel-order saga: done, refused (nothing was applied), or stuck.
            (Cancelling, Cancelled),
            (Cancelling, Confirmed),
            (Cancelling, RequiresAttention),
            (Shipped, Delivered),
        ];
        for from in all {
            for to in all {
                assert_eq!(
                    from.can_move_to(to),
                    allowed.contains(&(from, to)),
                    "{from:?} -> {to:?}"
                );
            }
            // Final statuses move no more by themselves; the others are on their way.
            let on_the_way = matches!(from, Pending | Paid | Cancelling);
            assert_eq!(from.is_final(), !on_the_way, "{from:?}");
        }
    }

    #[test]
    fn a_cancel_saga_id_names_its_order_and_the_time_it_was_asked() {
        let mut order = Order {
            id: "ord-1".into(),
            user_id: "u".into(),
            lines: Vec::new(),
            total: Money {
                amount: 1,
                currency: "USD".into(),
            },
            status: OrderStatus::Confirmed,
            history: Vec::new(),
            payment_id: Some("pay-1".into()),
        };
        order.transition(OrderStatus::Cancelling, "asked").unwrap();
        let first = Cancellation::saga_id(&order);
        assert_eq!(first, "ord-1:cancel-1");
        assert_eq!(Cancellation::order_of(&first), Some("ord-1"));
        // Refused, then asked again: a saga of its own.
        order.transition(OrderStatus::Confirmed, "refused").unwrap();
        order.transition(OrderStatus::Cancelling, "again").unwrap();
        assert_eq!(Cancellation::saga_id(&order), "ord-1:cancel-2");
        assert_eq!(Cancellation::order_of("ord-1"), None);
        let cancellation = Cancellation::of(&order).unwrap();
        assert_eq!(
            (
                cancellation.order_id.as_str(),
                cancellation.payment_id.as_str()
            ),
            ("ord-1", "pay-1")
        );
        order.payment_id = None;
        assert!(Cancellation::of(&order).is_err());
    }
}
