//! A test kit for code that defines sagas (feature `testkit`).
//!
//! [`SagaTest`] drives one saga of a definition move by move, on a
//! [`MemorySagaLog`], in the test's own task: no orchestrator, no spawned
//! tasks. It records every command the saga issues, each step's action or
//! compensation with its attempt and idempotency key ([`Call`]), and it can
//! make a chosen step fail or time out ([`Fault`]) instead of running it.
//!
//! Run the test on tokio's paused clock (`#[tokio::test(start_paused =
//! true)]`): backoffs and timeouts then pass at once.
//!
//! ```
//! use micro_saga::testkit::{Fault, SagaTest};
//! use micro_saga::{Phase, SagaDefinition, SagaStatus, StepOutput};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), micro_saga::Error> {
//! let saga = SagaDefinition::<u64>::builder("place-order")
//!     .step("charge", |_| async { Ok(StepOutput::empty()) }, |_| async { Ok(()) })
//!     .step("reserve", |_| async { Ok(StepOutput::empty()) }, |_| async { Ok(()) })
//!     .pivot("confirm", |_| async { Ok(StepOutput::empty()) })
//!     .build()?;
//!
//! let mut test = SagaTest::start(&saga, "order-1", 4200).await?;
//! test.inject("reserve", Phase::Action, Fault::permanent());
//!
//! // One move at a time...
//! let first = test.next().await?.unwrap();
//! assert_eq!((first.step.as_str(), first.phase), ("charge", Phase::Action));
//! // ...or to the end.
//! assert_eq!(test.run().await?, SagaStatus::Compensated);
//!
//! assert_eq!(test.compensated(), ["charge"]);
//! let refund = test.calls().into_iter().last().unwrap();
//! assert_eq!(refund.idempotency_key, "order-1:charge:compensation");
//! # Ok(())
//! # }
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use micro_core::trace::TraceContext;

use crate::definition::{SagaContext, SagaDefinition, StepDef};
use crate::driver::{Driver, Move};
use crate::error::Result;
use crate::log::MemorySagaLog;
use crate::state::{SagaInstance, SagaStatus};
use crate::step::{Phase, StepContext, StepError, StepOutput};
use crate::transition::Transition;

/// A failure to inject into a step's action or compensation; see
/// [`SagaTest::inject`].
///
/// By default it hits every attempt; [`times`](Self::times) limits it to the
/// next `n` attempts, after which the step runs for real.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    kind: FaultKind,
    times: Option<u32>,
}

/// What a [`Fault`] does to an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FaultKind {
    /// The attempt fails with a permanent [`StepError`].
    Permanent,
    /// The attempt fails with a retryable [`StepError`].
    Transient,
    /// The attempt never answers, so the step's timeout fires (with no
    /// timeout in the step's policy it fails at once as if one had).
    Timeout,
}

impl Fault {
    /// Attempts fail for good.
    pub fn permanent() -> Self {
        Fault {
            kind: FaultKind::Permanent,
            times: None,
        }
    }

    /// Attempts fail with a retryable error.
    pub fn transient() -> Self {
        Fault {
            kind: FaultKind::Transient,
            times: None,
        }
    }

    /// Attempts time out.
    pub fn timeout() -> Self {
        Fault {
            kind: FaultKind::Timeout,
            times: None,
        }
    }

    /// Limits the fault to the next `n` attempts.
    pub fn times(mut self, n: u32) -> Self {
        self.times = Some(n);
        self
    }

    /// What the fault does.
    pub fn kind(&self) -> FaultKind {
        self.kind
    }
}

/// One command the saga issued: an attempt at a step's action or
/// compensation.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Call {
    /// The step's name.
    pub step: String,
    /// Action or compensation.
    pub phase: Phase,
    /// The attempt, from 1.
    pub attempt: u32,
    /// The idempotency key the command carried.
    pub idempotency_key: String,
    /// The fault injected instead of running the step, if any.
    pub fault: Option<FaultKind>,
}

#[derive(Default)]
struct Probe {
    calls: Mutex<Vec<Call>>,
    faults: Mutex<HashMap<(String, Phase), Fault>>,
}

impl Probe {
    fn calls(&self) -> MutexGuard<'_, Vec<Call>> {
        self.calls.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn faults(&self) -> MutexGuard<'_, HashMap<(String, Phase), Fault>> {
        self.faults.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records the call and consumes one shot of its fault, if any.
    fn call<C>(&self, cx: &StepContext<C>) -> Option<FaultKind> {
        let key = (cx.step().to_owned(), cx.phase());
        let kind = {
            let mut faults = self.faults();
            match faults.get_mut(&key) {
                Some(fault) => {
                    let kind = fault.kind;
                    match &mut fault.times {
                        Some(0) => None,
                        Some(n) => {
                            *n -= 1;
                            Some(kind)
                        }
                        None => Some(kind),
                    }
                }
                None => None,
            }
        };
        self.calls().push(Call {
            step: key.0,
            phase: key.1,
            attempt: cx.attempt(),
            idempotency_key: cx.idempotency_key().to_owned(),
            fault: kind,
        });
        kind
    }
}

async fn injected<T>(kind: FaultKind, step: &str, timeout: bool) -> Result<T, StepError> {
    match kind {
        FaultKind::Permanent => Err(StepError::permanent(format!(
            "injected permanent failure of `{step}`"
        ))),
        FaultKind::Transient => Err(StepError::retryable(format!(
            "injected transient failure of `{step}`"
        ))),
        FaultKind::Timeout if timeout => std::future::pending().await,
        FaultKind::Timeout => Err(StepError::timed_out(std::time::Duration::ZERO)),
    }
}

fn instrument<C: SagaContext>(probe: &Arc<Probe>, mut step: StepDef<C>) -> StepDef<C> {
    let has_timeout = step.policy.timeout.is_some();
    let action = step.action.clone();
    let p = probe.clone();
    step.action =
        Arc::new(move |cx| {
            let fault = p.call(&cx);
            match fault {
                None => action(cx),
                Some(kind) => Box::pin(async move {
                    injected::<StepOutput<C>>(kind, cx.step(), has_timeout).await
                }),
            }
        });
    if let Some(compensation) = step.compensation.clone() {
        let p = probe.clone();
        step.compensation = Some(Arc::new(move |cx| {
            let fault = p.call(&cx);
            match fault {
                None => compensation(cx),
                Some(kind) => {
                    Box::pin(async move { injected::<()>(kind, cx.step(), has_timeout).await })
                }
            }
        }));
    }
    step
}

/// Drives one saga of a definition step by step, recording its commands and
/// injecting faults; see the [module docs](self).
pub struct SagaTest<C> {
    driver: Driver<C>,
    log: Arc<MemorySagaLog>,
    probe: Arc<Probe>,
}

impl<C> std::fmt::Debug for SagaTest<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SagaTest")
            .field("log", &self.log)
            .field("calls", &self.probe.calls().len())
            .finish()
    }
}

impl<C: SagaContext> SagaTest<C> {
    /// Records a saga of `definition` with this id and context in a fresh
    /// memory log, ready for its first move.
    ///
    /// # Errors
    ///
    /// As [`Orchestrator::start`](crate::Orchestrator::start).
    pub async fn start(
        definition: &SagaDefinition<C>,
        saga_id: impl Into<String>,
        context: C,
    ) -> Result<Self> {
        let probe = Arc::new(Probe::default());
        let definition = definition.map_steps(|step| instrument(&probe, step));
        let log = Arc::new(MemorySagaLog::new());
        let driver = Driver::create(
            definition,
            log.clone(),
            saga_id.into(),
            context,
            TraceContext::new_root(),
            None,
        )
        .await?;
        Ok(SagaTest { driver, log, probe })
    }

    /// Makes the attempts at `step`'s action or compensation hit `fault`
    /// instead of running; replaces an earlier fault on the same target.
    pub fn inject(&mut self, step: &str, phase: Phase, fault: Fault) -> &mut Self {
        self.probe.faults().insert((step.to_owned(), phase), fault);
        self
    }

    /// Removes the fault on `step`'s action or compensation.
    pub fn heal(&mut self, step: &str, phase: Phase) -> &mut Self {
        self.probe.faults().remove(&(step.to_owned(), phase));
        self
    }

    /// Makes the next move, after the backoff a retry waits for: one attempt
    /// at a step's action or compensation. Returns `None` once the saga has
    /// finished.
    ///
    /// # Errors
    ///
    /// A failure of the saga log or of the context's encoding; a step's
    /// failure is a [`Move`] outcome, not an error.
    pub async fn next(&mut self) -> Result<Option<Move>> {
        self.driver.advance().await
    }

    /// Makes moves until the saga finishes, and returns its final status.
    ///
    /// # Errors
    ///
    /// As [`next`](Self::next).
    pub async fn run(&mut self) -> Result<SagaStatus> {
        while self.next().await?.is_some() {}
        Ok(self.status())
    }

    /// The saga's state and history.
    pub fn saga(&self) -> &SagaInstance {
        self.driver.saga()
    }

    /// The saga's status.
    pub fn status(&self) -> SagaStatus {
        self.driver.saga().status()
    }

    /// The saga's context, as the steps left it.
    pub fn context(&self) -> &C {
        self.driver.context()
    }

    /// The memory log the saga is recorded in.
    pub fn log(&self) -> &Arc<MemorySagaLog> {
        &self.log
    }

    /// Every command issued so far, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.probe.calls().clone()
    }

    /// The commands issued for `step`'s action or compensation, in order.
    pub fn calls_to(&self, step: &str, phase: Phase) -> Vec<Call> {
        self.probe
            .calls()
            .iter()
            .filter(|c| c.step == step && c.phase == phase)
            .cloned()
            .collect()
    }

    /// The steps whose action succeeded, in order.
    pub fn completed(&self) -> Vec<String> {
        self.recorded(|t| matches!(t, Transition::StepSucceeded { .. }))
    }

    /// The steps whose compensation succeeded, in the order they ran.
    pub fn compensated(&self) -> Vec<String> {
        self.recorded(|t| matches!(t, Transition::CompensationSucceeded { .. }))
    }

    fn recorded(&self, keep: impl Fn(&Transition) -> bool) -> Vec<String> {
        let saga = self.driver.saga();
        saga.history()
            .iter()
            .filter(|t| keep(t))
            .filter_map(Transition::step)
            .map(|i| saga.steps()[i].name().to_owned())
            .collect()
    }
}
