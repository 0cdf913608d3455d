//! Orchestrated sagas for micro services.
//!
//! A saga is a business transaction that spans services: placing an order
//! charges the payment, reserves the stock, confirms the order and notifies the
//! customer. Each step is an action with a compensation that undoes it; when a
//! step fails, the steps that completed are compensated in reverse order (the
//! stock reservation fails, so the payment is refunded).
//!
//! - A [`SagaDefinition`] is a typed context `C` and an ordered list of steps.
//!   Its builder cannot declare a step that may need undoing without its
//!   compensation; only the pivot and the steps after it have none (see
//!   [`SagaDefinition`]). Steps are async closures that receive a
//!   [`StepContext`] (saga id, step, attempt, [idempotency key](idempotency_key),
//!   context) and return a [`StepOutput`] or a [`StepError`] that says
//!   whether to retry. Each step has a [`StepPolicy`]: a timeout, and retries
//!   with exponential backoff.
//! - The [`Orchestrator`] runs many sagas concurrently. Before each move it
//!   checks the [`Transition`] against the saga's state machine
//!   ([`SagaInstance`]), appends it to the durable [`SagaLog`], and only then
//!   acts. On a failure it compensates the completed steps in reverse order,
//!   retrying each compensation up to a bound; then the saga is
//!   [`Failed`](SagaStatus::Failed) and needs attention, with the error in its
//!   history. [`Orchestrator::recover`] resumes every unfinished saga after a
//!   crash: the step in doubt runs again with the same idempotency key;
//!   [`Orchestrator::keep_recovering`] goes on picking up abandoned sagas
//!   while the process runs, and a transient log failure is retried, never
//!   leaving a saga unowned.
//! - Queries: [`Orchestrator::saga`] (state, context, history) and
//!   [`Orchestrator::sagas_by_status`]. Metrics: see [`metrics`]. Every step
//!   attempt runs in a `saga_step` span and inside the saga's W3C trace
//!   ([`TraceContext::scope`](micro_core::trace::TraceContext::scope)), which
//!   the log keeps so that recovered steps stay in the same trace.
//! - The saga log has a memory backend and, behind features, PostgreSQL and an
//!   embedded one on local disk ([`log`]).
//! - A step may call a service over HTTP (micro-core's client, which sends
//!   the idempotency key), or send a command event and wait for the reply
//!   event with a timeout ([`reply::RequestReply`], which works over any
//!   publisher and subscriber).
//! - `testkit` (feature `testkit`) drives a definition step by step in a
//!   unit test, injects failures and timeouts, and records the commands.
//!
//! # Example
//!
//! An order saga whose reservation fails, so the payment is refunded:
//!
//! ```
//! use std::sync::{Arc, Mutex};
//!
//! use micro_saga::{
//!     MemorySagaLog, Orchestrator, SagaDefinition, SagaStatus, StepError, StepOutput,
//! };
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Clone, Serialize, Deserialize)]
//! struct Order {
//!     id: String,
//!     cents: u64,
//!     sku: String,
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), micro_saga::Error> {
//! // What the "services" did, in order.
//! let ledger = Arc::new(Mutex::new(Vec::<String>::new()));
//! let (charges, refunds) = (ledger.clone(), ledger.clone());
//!
//! let place_order = SagaDefinition::<Order>::builder("place-order")
//!     .step(
//!         "charge-payment",
//!         move |cx| {
//!             let ledger = charges.clone();
//!             async move {
//!                 // A real step sends `cx.idempotency_key()` with its command.
//!                 let payment = format!("payment-for-{}", cx.data().id);
//!                 ledger.lock().unwrap().push(format!("charge {}", cx.data().cents));
//!                 StepOutput::json(&payment)
//!             }
//!         },
//!         move |cx| {
//!             let ledger = refunds.clone();
//!             async move {
//!                 let payment: String = cx.output_as()?;
//!                 ledger.lock().unwrap().push(format!("refund {payment}"));
//!                 Ok(())
//!             }
//!         },
//!     )
//!     .step(
//!         "reserve-inventory",
//!         |cx| async move {
//!             Err(StepError::permanent(format!("{} is out of stock", cx.data().sku)))
//!         },
//!         |_cx| async { Ok(()) },
//!     )
//!     .pivot("confirm-order", |_cx| async { Ok(StepOutput::empty()) })
//!     .build()?;
//!
//! let orchestrator = Orchestrator::builder(Arc::new(MemorySagaLog::new()))
//!     .definition(&place_order)
//!     .build()?;
//! orchestrator.recover().await?; // nothing to resume in a new memory log
//!
//! let order = Order { id: "order-42".into(), cents: 1999, sku: "sku-13".into() };
//! let saga = orchestrator.run(&place_order, "order-42", order).await?;
//!
//! assert_eq!(saga.status(), SagaStatus::Compensated);
//! assert_eq!(saga.steps()[1].error(), Some("sku-13 is out of stock"));
//! assert_eq!(
//!     *ledger.lock().unwrap(),
//!     ["charge 1999", "refund payment-for-order-42"]
//! );
//!
//! // The log answers queries: the saga's state and history by id.
//! let record = orchestrator.saga("order-42").await?.unwrap();
//! assert_eq!(record.status, SagaStatus::Compensated);
//! assert_eq!(record.transitions.last().unwrap().name(), "compensation_succeeded");
//! # Ok(())
//! # }
//! ```
//!
//! # Semantics worth knowing
//!
//! - **At least once, one effect.** A step may run more than once: after a
//!   retryable failure, a timeout, or a crash between the log's
//!   `step_started` and its outcome. Each run carries the same idempotency
//!   key, so the service it calls must honour it (micro-core's client sends
//!   it as the `Idempotency-Key` header).
//! - **An unknown outcome is never taken as "did not happen".** A timed-out
//!   attempt, or one made with [`StepError::unknown`] (the connection was
//!   lost after the command was sent), is retried with the same idempotency
//!   key until the participant answers definitely, within the step's
//!   limits. If none does, the step is recorded
//!   [`StepUncertain`](Transition::StepUncertain) and compensated as if it
//!   had succeeded, so a compensation must tolerate "nothing to undo" (and
//!   may run without the action's output). Only a definite refusal records
//!   [`StepFailed`](Transition::StepFailed); the state machine decides
//!   ([`SagaInstance::resolve_failure`]).
//! - **Attempts are counted over the saga's life.** The log records every
//!   attempt, so a crash does not reset the count; a step in doubt after a
//!   crash is always run once more.
//!
//! # Feature flags
//!
//! | feature | default | what it enables |
//! |---|---|---|
//! | `postgres` | no | `log::PostgresSagaLog`, the saga log in PostgreSQL, on a deadpool-postgres pool (tokio-postgres) |
//! | `embedded` | no | `log::EmbeddedSagaLog`, the saga log in a redb file on local disk |
//! | `testkit` | no | the `testkit` module, to drive a saga step by step in tests and inject faults |
//!
//! The memory log ([`MemorySagaLog`]) and the saga state machine are always
//! available.

mod definition;
mod driver;
mod error;
pub mod log;
pub mod metrics;
mod orchestrator;
mod policy;
pub mod reply;
mod state;
mod step;
#[cfg(feature = "testkit")]
pub mod testkit;
mod transition;

pub use definition::{
    BoxFuture, Compensatable, Pivoted, SagaBuilder, SagaContext, SagaDefinition, StepKind,
};
pub use driver::{Move, MoveOutcome};
pub use error::{Error, Result};
pub use log::{Lease, LogError, MemorySagaLog, SagaLog, SagaRecord, SagaSummary};
pub use orchestrator::{Orchestrator, OrchestratorBuilder, Recovery, RecoveryLoop, SagaHandle};
pub use policy::StepPolicy;
pub use state::{
    AttemptFailure, AttemptLimits, NextAction, Resolution, SagaInstance, SagaStatus, StepState,
    StepStatus,
};
pub use step::{idempotency_key, Phase, StepContext, StepError, StepOutput, StepTimedOut};
pub use transition::Transition;

/// The guide's chapter on sagas (`docs/src/sagas.md`), whose examples run as
/// doctests here.
#[cfg(all(
    doctest,
    feature = "postgres",
    feature = "embedded",
    feature = "testkit"
))]
#[doc = include_str!("../../docs/src/sagas.md")]
pub struct Guide;
