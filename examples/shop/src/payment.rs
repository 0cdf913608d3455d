//! The payment service: charges and refunds, with deterministic test cards.
//!
//! | card number | what happens |
//! |---|---|
//! | `4242 4242 4242 4242` (and any other valid number) | charged, refundable |
//! | `4000 0000 0000 0002` | declined (`402 card_declined`) |
//! | `4000 0000 0000 0119` | charged, but the processor never answers: a `504 processor_timeout` after the hang, for a repeat of the key too (the saga refunds it by its key) |
//! | `4000 0000 0000 0259` | charged, but the first answer comes late (the caller times out); a repeat of the key answers at once |
//! | `4000 0000 0000 0341` | charged, but every refund is refused for good (`422 refund_refused`) |
//!
//! The payment service is the only holder of card numbers. The order service hands it
//! the card at checkout (`POST /payments/methods`) and gets back a payment-method token
//! and the last four digits; the order, its saga and its events carry only those. A
//! token belongs to the user it was made for: a charge for another user doesn't find it.
//! Payments are read by their owner only (`GET /payments?order_id=`).
//!
//! A charge needs an `Idempotency-Key`: the same key answers the same payment (or the
//! same decline) without charging twice. Refunds are idempotent per payment. A refund by
//! the charge's key (`POST /payments/by-key/{key}/refund`) is for a caller that never got
//! an answer: it refunds what the key charged, or, when nothing was charged, voids the
//! key so that a charge arriving later with it is refused.

use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use micro_core::service::Service;
use serde::{Deserialize, Serialize};

use crate::api::{ApiError, Body, IdempotencyKey, UserId};
use crate::catalog::Money;
use crate::store::Store;
use crate::trust::{only, GATEWAY, ORDER_SERVICE};

const PAYMENTS: &str = "payments";
const BY_KEY: &str = "payments-by-key";
const VOIDED: &str = "payments-voided-keys";
const METHODS: &str = "payment-methods";

/// The card that is always declined.
pub const DECLINED_CARD: &str = "4000000000000002";
/// The card whose charge is captured but never answered.
pub const TIMEOUT_CARD: &str = "4000000000000119";
/// The card whose charge is captured and answered late the first time.
pub const LATE_CARD: &str = "4000000000000259";
/// The card whose refunds always fail.
pub const REFUND_FAILS_CARD: &str = "4000000000000341";
/// A card that works.
pub const GOOD_CARD: &str = "4242424242424242";

/// Where a payment is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PaymentStatus {
    /// The money was taken.
    Captured,
    /// The card was refused; nothing was taken.
    Declined,
    /// The money was given back.
    Refunded,
}

/// A payment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payment {
    /// Its id.
    pub id: String,
    /// The order it pays.
    pub order_id: String,
    /// How much.
    pub amount: Money,
    /// The card's last four digits.
    pub card_last4: String,
    /// Where it is.
    pub status: PaymentStatus,
}

/// A payment as the service keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Stored {
    #[serde(flatten)]
    payment: Payment,
    /// Whether refunds of this payment fail (the test card).
    refund_fails: bool,
    /// The user whose card paid.
    #[serde(default)]
    user_id: String,
}

/// A card, as only this service keeps it.
#[derive(Clone, Serialize, Deserialize)]
struct Card {
    user_id: String,
    number: String,
}

/// `POST /payments/methods`: a card to keep for a charge.
#[derive(Deserialize)]
pub struct NewPaymentMethod {
    /// The card number, digits and spaces.
    pub card_number: String,
}

impl std::fmt::Debug for NewPaymentMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewPaymentMethod").finish_non_exhaustive()
    }
}

/// A kept card, as the rest of the shop knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentMethod {
    /// The token that stands for the card in a charge.
    pub token: String,
    /// The card's last four digits.
    pub card_last4: String,
}

/// `POST /payments`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChargeRequest {
    /// The order to pay.
    pub order_id: String,
    /// How much.
    pub amount: Money,
    /// The payment method's token, from `POST /payments/methods`.
    pub payment_method: String,
}

/// `GET /payments?order_id=`.
#[derive(Debug, Deserialize)]
pub struct ByOrder {
    /// The order.
    pub order_id: String,
}

/// The payment service.
#[derive(Debug, Clone)]
pub struct Payments {
    store: Store,
    hang: Duration,
}

/// Whether `digits` pass the Luhn check.
pub fn luhn(digits: &str) -> bool {
    let mut sum = 0;
    for (i, c) in digits.chars().rev().enumerate() {
        let Some(mut d) = c.to_digit(10) else {
            return false;
        };
        if i % 2 == 1 {
            d *= 2;
            if d > 9 {
                d -= 9;
            }
        }
        sum += d;
    }
    !digits.is_empty() && sum % 10 == 0
}

impl Payments {
    /// The service over `store`. The timeout card's charge answers after `hang` (make it
    /// longer than the caller's timeout).
    pub fn new(store: Store, hang: Duration) -> Self {
        Self { store, hang }
    }

    /// Keeps `user`'s card and answers the token that stands for it.
    pub fn add_method(&self, user: &str, card_number: &str) -> Result<PaymentMethod, ApiError> {
        let number: String = card_number.chars().filter(|c| *c != ' ').collect();
        if !(12..=19).contains(&number.len()) || !luhn(&number) {
            return Err(ApiError::bad_request(
                "invalid_card",
                "the card number is not valid",
            ));
        }
        let method = PaymentMethod {
            token: format!("pm_{}", uuid::Uuid::new_v4().simple()),
            card_last4: number[number.len() - 4..].to_owned(),
        };
        let card = Card {
            user_id: user.to_owned(),
            number,
        };
        self.store
            .write(|tx| tx.put(METHODS, &method.token, &card))?;
        Ok(method)
    }

    /// The card behind `user`'s payment-method token; `404` for a token of another user.
    fn card(&self, user: &str, token: &str) -> Result<Card, ApiError> {
        self.store
            .get::<Card>(METHODS, token)?
            .filter(|card| card.user_id == user)
            .ok_or_else(|| {
                ApiError::not_found("payment_method_not_found", "no such payment method")
            })
    }

    /// Charges `user`'s payment method once per idempotency key.
    pub async fn charge(
        &self,
        key: &str,
        user: &str,
        request: &ChargeRequest,
    ) -> Result<Payment, ApiError> {
        let number = self.card(user, &request.payment_method)?.number;
        if request.amount.amount <= 0 || request.amount.currency.len() != 3 {
            return Err(ApiError::bad_request(
                "invalid_amount",
                "the amount must be positive, with a 3-letter currency",
            ));
        }
        if let Some(id) = self.store.get::<String>(BY_KEY, key)? {
            if let Some(stored) = self.store.get::<Stored>(PAYMENTS, &id)? {
                if number == TIMEOUT_CARD {
                    return Err(self.lose_answer().await);
                }
                return answer(stored.payment);
            }
        }
        let stored = Stored {
            payment: Payment {
                id: format!("pay-{}", uuid::Uuid::new_v4().simple()),
                order_id: request.order_id.clone(),
                amount: request.amount.clone(),
                card_last4: number[number.len() - 4..].to_owned(),
                status: if number == DECLINED_CARD {
                    PaymentStatus::Declined
                } else {
                    PaymentStatus::Captured
                },
            },
            refund_fails: number == REFUND_FAILS_CARD,
            user_id: user.to_owned(),
        };
        let payment = self.store.write(|tx| {
            if tx.get::<bool>(VOIDED, key)?.is_some() {
                return Ok(None);
            }
            // Two requests with one key may race: the first to commit wins.
            if let Some(id) = tx.get::<String>(BY_KEY, key)? {
                if let Some(existing) = tx.get::<Stored>(PAYMENTS, &id)? {
                    return Ok(Some(existing.payment));
                }
            }
            tx.put(PAYMENTS, &stored.payment.id, &stored)?;
            tx.put(BY_KEY, key, &stored.payment.id)?;
            Ok(Some(stored.payment))
        })?;
        let Some(payment) = payment else {
            return Err(ApiError::conflict(
                "key_voided",
                "this key was refunded before anything was charged with it",
            ));
        };
        match number.as_str() {
            TIMEOUT_CARD => return Err(self.lose_answer().await),
            // Captured; the answer comes after the caller stopped waiting.
            LATE_CARD => tokio::time::sleep(self.hang).await,
            _ => {}
        }
        answer(payment)
    }

    /// The answer of a charge captured behind a processor that never answered: a
    /// `504` after the hang, which tells the caller nothing about the money.
    async fn lose_answer(&self) -> ApiError {
        tokio::time::sleep(self.hang).await;
        ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "processor_timeout",
            "the card processor did not answer",
        )
    }

    /// Refunds what the charge with `key` captured, for a caller that never got the
    /// charge's answer. Nothing charged with the key is nothing to refund: the key is
    /// voided instead, so that a charge still on its way is refused. `None` when nothing
    /// was charged.
    pub fn refund_by_key(&self, key: &str) -> Result<Option<Payment>, ApiError> {
        let id = self.store.write(|tx| {
            let id = tx.get::<String>(BY_KEY, key)?;
            if id.is_none() {
                tx.put(VOIDED, key, &true)?;
            }
            Ok(id)
        })?;
        match id {
            None => Ok(None),
            Some(id) => match self.refund(&id) {
                Err(e) if e.code() == "not_captured" => Ok(None),
                other => other.map(Some),
            },
        }
    }

    /// Gives the money of a captured payment back, once.
    pub fn refund(&self, id: &str) -> Result<Payment, ApiError> {
        self.store
            .write(|tx| {
                let Some(mut stored) = tx.get::<Stored>(PAYMENTS, id)? else {
                    return Ok(Err(ApiError::not_found(
                        "payment_not_found",
                        format!("no payment `{id}`"),
                    )));
                };
                match stored.payment.status {
                    PaymentStatus::Refunded => return Ok(Ok(stored.payment)),
                    PaymentStatus::Declined => {
                        return Ok(Err(ApiError::conflict(
                            "not_captured",
                            "a declined payment has nothing to refund",
                        )))
                    }
                    PaymentStatus::Captured if stored.refund_fails => {
                        return Ok(Err(ApiError::new(
                            StatusCode::UNPROCESSABLE_ENTITY,
                            "refund_refused",
                            "the card processor refused the refund",
                        )))
                    }
                    PaymentStatus::Captured => {}
                }
                stored.payment.status = PaymentStatus::Refunded;
                tx.put(PAYMENTS, id, &stored)?;
                Ok(Ok(stored.payment))
            })
            .map_err(ApiError::from)?
    }

    /// `user`'s payments of an order; `404` when the order's payments are another
    /// user's.
    pub fn of_order(&self, user: &str, order_id: &str) -> Result<Vec<Payment>, ApiError> {
        let of_order: Vec<Stored> = self
            .store
            .list::<Stored>(PAYMENTS, "")?
            .into_iter()
            .map(|(_, s)| s)
            .filter(|s| s.payment.order_id == order_id)
            .collect();
        if of_order.iter().any(|s| s.user_id != user) {
            return Err(ApiError::not_found(
                "order_not_found",
                format!("no order `{order_id}`"),
            ));
        }
        Ok(of_order.into_iter().map(|s| s.payment).collect())
    }

    /// Every payment, for the shop's invariant checks.
    pub fn all(&self) -> anyhow::Result<Vec<Payment>> {
        Ok(self
            .store
            .list::<Stored>(PAYMENTS, "")?
            .into_iter()
            .map(|(_, s)| s.payment)
            .collect())
    }
}

fn answer(payment: Payment) -> Result<Payment, ApiError> {
    if payment.status == PaymentStatus::Declined {
        return Err(ApiError::new(
            StatusCode::PAYMENT_REQUIRED,
            "card_declined",
            "the card was declined",
        ));
    }
    Ok(payment)
}

async fn add_method(
    State(payments): State<Payments>,
    UserId(user): UserId,
    Body(request): Body<NewPaymentMethod>,
) -> Result<(StatusCode, Json<PaymentMethod>), ApiError> {
    let method = payments.add_method(&user, &request.card_number)?;
    Ok((StatusCode::CREATED, Json(method)))
}

async fn charge(
    State(payments): State<Payments>,
    IdempotencyKey(key): IdempotencyKey,
    UserId(user): UserId,
    Body(request): Body<ChargeRequest>,
) -> Result<(StatusCode, Json<Payment>), ApiError> {
    let payment = payments.charge(&key, &user, &request).await?;
    Ok((StatusCode::CREATED, Json(payment)))
}

async fn refund(
    State(payments): State<Payments>,
    Path(id): Path<String>,
) -> Result<Json<Payment>, ApiError> {
    payments.refund(&id).map(Json)
}

async fn refund_by_key(
    State(payments): State<Payments>,
    Path(key): Path<String>,
) -> Result<Json<Option<Payment>>, ApiError> {
    payments.refund_by_key(&key).map(Json)
}

async fn by_order(
    State(payments): State<Payments>,
    UserId(user): UserId,
    Query(query): Query<ByOrder>,
) -> Result<Json<Vec<Payment>>, ApiError> {
    payments.of_order(&user, &query.order_id).map(Json)
}

impl Service for Payments {
    fn name(&self) -> &str {
        "payment-service"
    }

    fn version(&self) -> &str {
        env!("CARGO_PKG_VERSION")
    }

    fn router(&self) -> Router {
        // Moving money and keeping cards: the order service only. Reading: the users,
        // through the gateway.
        let money = Router::new()
            .route("/payments", post(charge))
            .route("/payments/methods", post(add_method))
            .route("/payments/{id}/refund", post(refund))
            .route("/payments/by-key/{key}/refund", post(refund_by_key))
            .route_layer(only([ORDER_SERVICE]));
        let reads = Router::new()
            .route("/payments", get(by_order))
            .route_layer(only([GATEWAY]));
        money.merge(reads).with_state(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A charge of `card`, kept for the user `u1`.
    fn request(payments: &Payments, card: &str) -> ChargeRequest {
        ChargeRequest {
            order_id: "o1".into(),
            amount: Money {
                amount: 1999,
                currency: "USD".into(),
            },
            payment_method: payments.add_method("u1", card).unwrap().token,
        }
    }

    #[test]
    fn the_test_cards_are_valid_numbers() {
        for card in [
            GOOD_CARD,
            DECLINED_CARD,
            TIMEOUT_CARD,
            LATE_CARD,
            REFUND_FAILS_CARD,
        ] {
            assert!(luhn(card), "{card}");
        }
        assert!(!luhn("4242424242424241"));
        assert!(!luhn("42424242x4242424"));
    }

    #[tokio::test]
    async fn one_key_charges_once_and_cards_behave_as_documented() {
        let payments = Payments::new(Store::in_memory().unwrap(), Duration::from_secs(60));
        let first = payments
            .charge("k1", "u1", &request(&payments, GOOD_CARD))
            .await
            .unwrap();
        let again = payments
            .charge("k1", "u1", &request(&payments, GOOD_CARD))
            .await
            .unwrap();
        assert_eq!(first, again);
        assert_eq!(payments.all().unwrap().len(), 1);

        let declined = payments
            .charge("k2", "u1", &request(&payments, DECLINED_CARD))
            .await
            .unwrap_err();
        assert_eq!(declined.code(), "card_declined");
        let invalid = payments.add_method("u1", "1234").unwrap_err();
        assert_eq!(invalid.code(), "invalid_card");

        assert_eq!(
            payments.refund(&first.id).unwrap().status,
            PaymentStatus::Refunded
        );
        assert_eq!(
            payments.refund(&first.id).unwrap().status,
            PaymentStatus::Refunded
        );
        let sticky = payments
            .charge("k4", "u1", &request(&payments, REFUND_FAILS_CARD))
            .await
            .unwrap();
        assert_eq!(
            payments.refund(&sticky.id).unwrap_err().code(),
            "refund_refused"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_timeout_card_charges_and_never_answers_and_its_key_refunds_it() {
        let payments = Payments::new(Store::in_memory().unwrap(), Duration::from_secs(60));
        let request = request(&payments, TIMEOUT_CARD);
        for _ in 0..2 {
            let charge = payments.charge("k1", "u1", &request);
            let hung = tokio::time::timeout(Duration::from_secs(59), charge).await;
            assert!(hung.is_err());
        }
        let all = payments.all().unwrap();
        assert_eq!(all.len(), 1, "one key, one charge");
        assert_eq!(all[0].status, PaymentStatus::Captured);
        let refunded = payments.refund_by_key("k1").unwrap().unwrap();
        assert_eq!(refunded.status, PaymentStatus::Refunded);
        assert_eq!(payments.refund_by_key("k1").unwrap().unwrap(), refunded);
    }

    #[tokio::test(start_paused = true)]
    async fn the_late_card_answers_a_repeat_at_once() {
        let payments = Payments::new(Store::in_memory().unwrap(), Duration::from_secs(60));
        let request = request(&payments, LATE_CARD);
        let charge = payments.charge("k1", "u1", &request);
        assert!(tokio::time::timeout(Duration::from_secs(2), charge)
            .await
            .is_err());
        let again = tokio::time::timeout(
            Duration::from_secs(2),
            payments.charge("k1", "u1", &request),
        )
        .await
        .expect("a repeat answers at once")
        .unwrap();
        assert_eq!(again.status, PaymentStatus::Captured);
        assert_eq!(payments.all().unwrap(), [again]);
    }

    #[tokio::test]
    async fn refunding_a_key_that_charged_nothing_voids_it() {
        let payments = Payments::new(Store::in_memory().unwrap(), Duration::from_secs(60));
        assert_eq!(payments.refund_by_key("k1").unwrap(), None);
        let late = payments
            .charge("k1", "u1", &request(&payments, GOOD_CARD))
            .await
            .unwrap_err();
        assert_eq!(late.code(), "key_voided");
        assert!(payments.all().unwrap().is_empty());
        payments
            .charge("k2", "u1", &request(&payments, DECLINED_CARD))
            .await
            .unwrap_err();
        assert_eq!(payments.refund_by_key("k2").unwrap(), None);
    }

    #[tokio::test]
    async fn cards_and_payments_belong_to_their_user() {
        let payments = Payments::new(Store::in_memory().unwrap(), Duration::from_secs(60));
        let request = request(&payments, GOOD_CARD);
        assert!(request.payment_method.starts_with("pm_"));
        let stolen = payments.charge("k1", "u2", &request).await.unwrap_err();
        assert_eq!(stolen.code(), "payment_method_not_found");
        let paid = payments.charge("k1", "u1", &request).await.unwrap();
        assert_eq!(paid.card_last4, "4242");
        assert_eq!(payments.of_order("u1", "o1").unwrap(), [paid]);
        assert_eq!(
            payments.of_order("u2", "o1").unwrap_err().code(),
            "order_not_found"
        );
        assert!(payments.of_order("u2", "o2").unwrap().is_empty());
    }
}
