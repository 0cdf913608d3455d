//! Orchestrated sagas for micro services.
//!
//! A saga is a business transaction that spans services: placing an order
//! charges the payment, reserves the stock, confirms the order and notifies the
//! customer. Each step is an action with a compensation that undoes it; when a
//! step fails, the steps that completed are compensated in reverse order (the
//! stock reservation fails, so the payment is refunded).
//!
//! This version of the crate is the saga state machine, as pure logic:
//!
//! - [`SagaInstance`] is one saga: its steps ([`StepState`]), its status
//!   ([`SagaStatus`]: running, compensating, completed, compensated, or failed
//!   and needing attention) and the history of its transitions.
//! - [`Transition`] is one change, a serde value carrying its time and, for
//!   failures, the error. The state changes only by applying transitions, and
//!   illegal ones are refused with an [`Error`], so a saga log of transitions
//!   is the saga: [`SagaInstance::replay`] rebuilds it.
//! - [`SagaInstance::next_action`] tells what to do next: run a step, or
//!   compensate the latest completed step not yet compensated.
//!
//! The orchestrator that runs typed steps with timeouts, retries and
//! idempotency keys, the durable saga log it writes each transition to before
//! acting, recovery of unfinished sagas on restart, the query API and the test
//! kit come next, built on this state machine.
//!
//! # Example
//!
//! ```
//! use micro_saga::{NextAction, SagaInstance, SagaStatus, Transition};
//! use time::OffsetDateTime;
//!
//! let now = OffsetDateTime::now_utc();
//! let mut saga = SagaInstance::start(
//!     "order-42",
//!     "place-order",
//!     ["charge-payment", "reserve-inventory", "confirm-order"],
//!     now,
//! )?;
//!
//! // The payment goes through; the reservation fails.
//! assert_eq!(saga.next_action(), NextAction::RunStep(0));
//! saga.step_started(now)?;
//! saga.step_succeeded(Some(serde_json::json!({"payment_id": "p-7"})), now)?;
//! saga.step_started(now)?;
//! saga.step_failed("sku-13 is out of stock", now)?;
//!
//! // So the payment, the only completed step, is compensated.
//! assert_eq!(saga.status(), SagaStatus::Compensating);
//! assert_eq!(saga.next_action(), NextAction::CompensateStep(0));
//!
//! // An orchestrator checks a transition and writes it to its log before
//! // acting on it.
//! let refund = Transition::CompensationStarted { step: 0, at: now };
//! saga.check(&refund)?;
//! let log_record = serde_json::to_string(&refund).unwrap();
//! saga.apply(serde_json::from_str(&log_record).unwrap())?;
//! saga.compensation_succeeded(now)?;
//! assert_eq!(saga.status(), SagaStatus::Compensated);
//!
//! // A finished saga accepts nothing, and its history rebuilds it.
//! assert!(saga.step_started(now).is_err());
//! let replayed = SagaInstance::replay(saga.history().to_vec())?;
//! assert_eq!(replayed, saga);
//! # Ok::<(), micro_saga::Error>(())
//! ```
//!
//! # Feature flags
//!
//! | feature | default | what it enables |
//! |---|---|---|
//! | *(none yet)* | | the state machine is always available; durable log backends such as `postgres` arrive with the saga log |

mod error;
mod state;
mod transition;

pub use error::{Error, Result};
pub use state::{NextAction, SagaInstance, SagaStatus, StepState, StepStatus};
pub use transition::Transition;
