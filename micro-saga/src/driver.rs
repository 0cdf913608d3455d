//! Drives one saga, one move at a time, writing each transition to the log
//! before acting on it.

use std::sync::Arc;
use std::time::Duration;

use micro_core::backoff::{Backoff, Jitter};
use micro_core::trace::TraceContext;
use serde_json::Value;
use time::OffsetDateTime;
use tracing::Instrument;

use crate::definition::{BoxFuture, SagaContext, SagaDefinition};
use crate::error::{Error, Result};
use crate::log::{Append, Lease, SagaLog, SagaRecord};
use crate::metrics;
use crate::state::{NextAction, Resolution, SagaInstance, StepStatus};
use crate::step::{idempotency_key, Phase, StepContext, StepError, StepOutput};
use crate::transition::Transition;

/// One move of a saga: an attempt at a step's action or compensation, and
/// what came of it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Move {
    /// The step's name.
    pub step: String,
    /// The step's position, from 0.
    pub index: usize,
    /// Action or compensation.
    pub phase: Phase,
    /// The attempt, from 1.
    pub attempt: u32,
    /// What came of it.
    pub outcome: MoveOutcome,
}

/// What came of a [`Move`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum MoveOutcome {
    /// The action or compensation took effect, and that is recorded.
    Succeeded,
    /// It failed or timed out, and will be tried again after `backoff`.
    Retrying {
        /// The error, with its causes.
        error: String,
        /// The delay before the next attempt.
        backoff: Duration,
    },
    /// No attempt at an action got a definite answer, and that is recorded:
    /// the step may have taken effect, and the saga compensates it as if it
    /// had succeeded.
    Uncertain {
        /// Why, with the last attempt's error.
        error: String,
    },
    /// It failed for good, and that is recorded: the saga compensates (after
    /// an action) or needs attention (after a compensation).
    Failed {
        /// The error, with its causes, as recorded.
        error: String,
    },
}

/// What is left of an attempt in flight that a resumed saga carries on.
#[derive(Debug, Clone, Copy)]
enum Left {
    /// This long, until the attempt's recorded deadline.
    For(Duration),
    /// Nothing: the deadline passed, so the attempt timed out; the step's
    /// timeout is given.
    Expired(Duration),
}

pub(crate) struct Driver<C> {
    def: SagaDefinition<C>,
    log: Arc<dyn SagaLog>,
    saga: SagaInstance,
    saga_id: Arc<str>,
    definition: Arc<str>,
    context: C,
    context_json: Value,
    version: u64,
    trace: TraceContext,
    backoff: Option<Duration>,
    /// The lease this driver holds the saga under; every write carries it.
    lease: Option<Lease>,
    /// Whether the saga was loaded from the log and has not moved since: its
    /// current attempt, if one is in flight, was started by an earlier driver.
    resumed: bool,
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

impl<C: SagaContext> Driver<C> {
    /// Records a new saga in the log, leased to `lease`'s owner for its ttl
    /// when given, and returns its driver.
    pub(crate) async fn create(
        def: SagaDefinition<C>,
        log: Arc<dyn SagaLog>,
        saga_id: String,
        context: C,
        trace: TraceContext,
        lease: Option<(&str, Duration)>,
    ) -> Result<Self> {
        let saga = SagaInstance::start(saga_id, def.name(), def.step_names(), now())?;
        let context_json = serde_json::to_value(&context).map_err(Error::Context)?;
        let new = crate::log::NewSaga::new(
            saga.history()[0].clone(),
            context_json.clone(),
            Some(trace.to_traceparent()),
        )?;
        let lease = match lease {
            Some((owner, ttl)) => Some(log.create_leased(&new, owner, ttl).await?),
            None => {
                log.create(&new).await?;
                None
            }
        };
        metrics::started(def.name());
        Ok(Driver {
            saga_id: saga.id().into(),
            definition: def.name().into(),
            def,
            log,
            saga,
            context,
            context_json,
            version: 1,
            trace,
            backoff: None,
            lease,
            resumed: false,
        })
    }

    /// A driver for a saga loaded from the log, held under `lease` if given.
    pub(crate) fn resume(
        def: SagaDefinition<C>,
        log: Arc<dyn SagaLog>,
        record: SagaRecord,
        lease: Option<Lease>,
    ) -> Result<Self> {
        let saga = record.instance()?;
        let mismatch = |reason: String| Error::DefinitionMismatch {
            saga_id: record.saga_id.clone(),
            definition: def.name().to_owned(),
            reason,
        };
        if saga.definition() != def.name() {
            return Err(mismatch(format!("the saga is a `{}`", saga.definition())));
        }
        let recorded: Vec<&str> = saga.steps().iter().map(|s| s.name()).collect();
        if recorded != def.step_names() {
            return Err(mismatch(format!(
                "the saga has steps {recorded:?}, the definition {:?}",
                def.step_names()
            )));
        }
        let context = record.context_as::<C>()?;
        let trace = record
            .trace_parent
            .as_deref()
            .and_then(|t| TraceContext::parse(t).ok())
            .unwrap_or_else(TraceContext::new_root);
        Ok(Driver {
            saga_id: saga.id().into(),
            definition: def.name().into(),
            def,
            log,
            version: record.version(),
            saga,
            context,
            context_json: record.context,
            trace,
            backoff: None,
            lease,
            resumed: true,
        })
    }

    #[cfg_attr(not(feature = "testkit"), allow(dead_code))]
    pub(crate) fn saga(&self) -> &SagaInstance {
        &self.saga
    }

    pub(crate) fn saga_id(&self) -> &Arc<str> {
        &self.saga_id
    }

    pub(crate) fn definition(&self) -> &Arc<str> {
        &self.definition
    }

    pub(crate) fn lease(&self) -> Option<&Lease> {
        self.lease.as_ref()
    }

    #[cfg_attr(not(feature = "testkit"), allow(dead_code))]
    pub(crate) fn context(&self) -> &C {
        &self.context
    }

    /// Drives the saga to its end.
    pub(crate) async fn run(mut self) -> Result<SagaInstance> {
        while self.advance().await?.is_some() {}
        Ok(self.saga)
    }

    /// Makes one move, or returns `None` when the saga has finished.
    pub(crate) async fn advance(&mut self) -> Result<Option<Move>> {
        let moved = match self.saga.next_action() {
            NextAction::Finished(_) => return Ok(None),
            NextAction::RunStep(index) => self.run_step(index).await,
            NextAction::CompensateStep(index) => self.compensate_step(index).await,
        };
        self.resumed = false;
        moved.map(Some)
    }

    async fn run_step(&mut self, index: usize) -> Result<Move> {
        if let Some(delay) = self.backoff.take() {
            tokio::time::sleep(delay).await;
        }
        let step = self.def.steps()[index].clone();
        let carried_on = self.attempt_in_flight(index, Phase::Action, step.policy.timeout);
        if carried_on.is_none() {
            self.record(
                vec![Transition::StepStarted {
                    step: index,
                    at: now(),
                }],
                None,
            )
            .await?;
        }
        let attempt = self.saga.steps()[index].attempts();
        let cx = self.step_context(index, Phase::Action, attempt, None);
        let trace = cx.trace;
        let result = match carried_on {
            Some(Left::Expired(limit)) => Err(StepError::timed_out(limit)),
            Some(Left::For(left)) => {
                self.call(
                    index,
                    Phase::Action,
                    attempt,
                    Some(left),
                    trace,
                    (step.action)(cx),
                )
                .await
            }
            None => {
                self.call(
                    index,
                    Phase::Action,
                    attempt,
                    step.policy.timeout,
                    trace,
                    (step.action)(cx),
                )
                .await
            }
        };
        let outcome = match result {
            Ok(StepOutput { output, context }) => {
                let succeeded = Transition::StepSucceeded {
                    step: index,
                    output,
                    at: now(),
                };
                self.record(vec![succeeded], context).await?;
                MoveOutcome::Succeeded
            }
            Err(err) => {
                let at = now();
                match self
                    .saga
                    .resolve_failure(err.failure(), step.policy.action_limits(), at)
                {
                    Resolution::Retry => self.retry_later(&step.policy, attempt, &err),
                    Resolution::Fail => {
                        let error = give_up_message(&err, attempt);
                        let failed = Transition::StepFailed {
                            step: index,
                            error: error.clone(),
                            at,
                        };
                        self.record(vec![failed], None).await?;
                        MoveOutcome::Failed { error }
                    }
                    Resolution::Uncertain => {
                        let error = format!(
                            "no definite answer after {attempt} attempts, compensating: {}",
                            err.chain_message()
                        );
                        let uncertain = Transition::StepUncertain {
                            step: index,
                            error: error.clone(),
                            at,
                        };
                        self.record(vec![uncertain], None).await?;
                        MoveOutcome::Uncertain { error }
                    }
                }
            }
        };
        Ok(self.moved(index, Phase::Action, attempt, outcome))
    }

    async fn compensate_step(&mut self, index: usize) -> Result<Move> {
        let step = self.def.steps()[index].clone();
        let Some(compensation) = step.compensation.clone() else {
            let error = format!(
                "step `{}` ({:?}) has no compensation: the saga cannot be undone past it",
                step.name, step.kind
            );
            let at = now();
            let transitions = vec![
                Transition::CompensationStarted { step: index, at },
                Transition::CompensationFailed {
                    step: index,
                    error: error.clone(),
                    at,
                },
            ];
            self.record(transitions, None).await?;
            let attempt = self.saga.steps()[index].compensation_attempts();
            metrics::compensation(&self.definition, &step.name, "error");
            return Ok(self.moved(
                index,
                Phase::Compensation,
                attempt,
                MoveOutcome::Failed { error },
            ));
        };
        if let Some(delay) = self.backoff.take() {
            tokio::time::sleep(delay).await;
        }
        let carried_on = self.attempt_in_flight(index, Phase::Compensation, step.policy.timeout);
        if carried_on.is_none() {
            self.record(
                vec![Transition::CompensationStarted {
                    step: index,
                    at: now(),
                }],
                None,
            )
            .await?;
        }
        let attempt = self.saga.steps()[index].compensation_attempts();
        let output = self.saga.steps()[index].output().cloned();
        let cx = self.step_context(index, Phase::Compensation, attempt, output);
        let trace = cx.trace;
        let timeout = match carried_on {
            Some(Left::Expired(_)) => None,
            Some(Left::For(left)) => Some(left),
            None => step.policy.timeout,
        };
        let result = match carried_on {
            Some(Left::Expired(limit)) => Err(StepError::timed_out(limit)),
            _ => {
                self.call(
                    index,
                    Phase::Compensation,
                    attempt,
                    timeout,
                    trace,
                    Box::pin(async move { compensation(cx).await.map(|()| StepOutput::empty()) }),
                )
                .await
            }
        };
        let outcome = match result {
            Ok(_) => {
                let done = Transition::CompensationSucceeded {
                    step: index,
                    at: now(),
                };
                self.record(vec![done], None).await?;
                metrics::compensation(&self.definition, &step.name, "ok");
                MoveOutcome::Succeeded
            }
            Err(err) if err.is_retryable() && attempt < step.policy.attempts(true) => {
                self.retry_later(&step.policy, attempt, &err)
            }
            Err(err) => {
                let error = give_up_message(&err, attempt);
                let failed = Transition::CompensationFailed {
                    step: index,
                    error: error.clone(),
                    at: now(),
                };
                self.record(vec![failed], None).await?;
                metrics::compensation(&self.definition, &step.name, "error");
                MoveOutcome::Failed { error }
            }
        };
        Ok(self.moved(index, Phase::Compensation, attempt, outcome))
    }

    /// On the first move after the saga was loaded from the log: when an
    /// attempt at step `index`'s `phase` is in flight (started, no outcome
    /// recorded) and the step has a timeout, how long that attempt has left
    /// before its deadline, the recorded start plus the timeout. The attempt
    /// is then carried on for that long rather than started afresh, so a
    /// restart does not reset its timer; an attempt past its deadline timed
    /// out while nobody was waiting.
    fn attempt_in_flight(
        &mut self,
        index: usize,
        phase: Phase,
        timeout: Option<Duration>,
    ) -> Option<Left> {
        if !std::mem::take(&mut self.resumed) {
            return None;
        }
        let limit = timeout?;
        let in_flight = match phase {
            Phase::Action => StepStatus::Running,
            Phase::Compensation => StepStatus::Compensating,
        };
        if self.saga.steps()[index].status() != in_flight {
            return None;
        }
        let started = self
            .saga
            .history()
            .iter()
            .rev()
            .find_map(|t| match (phase, t) {
                (Phase::Action, Transition::StepStarted { step, at })
                | (Phase::Compensation, Transition::CompensationStarted { step, at })
                    if *step == index =>
                {
                    Some(*at)
                }
                _ => None,
            })?;
        let left = started + limit - now();
        tracing::info!(
            saga.id = %self.saga_id,
            step = %self.def.steps()[index].name,
            %phase,
            left_ms = left.whole_milliseconds() as i64,
            "carrying on the attempt in flight until its recorded deadline"
        );
        Some(match Duration::try_from(left) {
            Ok(left) if !left.is_zero() => Left::For(left),
            _ => Left::Expired(limit),
        })
    }

    fn retry_later(
        &mut self,
        policy: &crate::policy::StepPolicy,
        attempt: u32,
        err: &StepError,
    ) -> MoveOutcome {
        let backoff = policy.backoff(attempt);
        self.backoff = Some(backoff);
        MoveOutcome::Retrying {
            error: err.chain_message(),
            backoff,
        }
    }

    fn moved(&self, index: usize, phase: Phase, attempt: u32, outcome: MoveOutcome) -> Move {
        Move {
            step: self.def.steps()[index].name.clone(),
            index,
            phase,
            attempt,
            outcome,
        }
    }

    fn step_context(
        &self,
        index: usize,
        phase: Phase,
        attempt: u32,
        output: Option<Value>,
    ) -> StepContext<C> {
        let step = &self.def.steps()[index].name;
        StepContext {
            saga_id: self.saga_id.clone(),
            definition: self.definition.clone(),
            step: step.as_str().into(),
            index,
            phase,
            attempt,
            idempotency_key: idempotency_key(&self.saga_id, step, phase),
            trace: self.trace.child(),
            data: self.context.clone(),
            output,
        }
    }

    /// Runs one attempt in its span and trace scope, under the step's
    /// timeout, and records its latency.
    async fn call(
        &self,
        index: usize,
        phase: Phase,
        attempt: u32,
        timeout: Option<Duration>,
        trace: TraceContext,
        fut: BoxFuture<'static, Result<StepOutput<C>, StepError>>,
    ) -> Result<StepOutput<C>, StepError> {
        let step = &self.def.steps()[index].name;
        let span = tracing::info_span!(
            "saga_step",
            saga.id = %self.saga_id,
            saga.definition = %self.definition,
            step = %step,
            phase = %phase,
            attempt,
            trace_id = %trace.trace_id(),
            span_id = %trace.span_id(),
        );
        let started = tokio::time::Instant::now();
        let result = async {
            match timeout {
                Some(limit) => tokio::time::timeout(limit, fut)
                    .await
                    .unwrap_or_else(|_| Err(StepError::timed_out(limit))),
                None => fut.await,
            }
        };
        let result = trace.scope(result).instrument(span.clone()).await;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(err) if err.is_retryable() => "retry",
            Err(_) => "error",
        };
        if let Err(err) = &result {
            span.in_scope(|| {
                tracing::warn!(
                    error = %err.chain_message(),
                    retryable = err.is_retryable(),
                    "saga step attempt failed"
                );
            });
        }
        metrics::step_duration(&self.definition, step, phase, outcome, started.elapsed());
        result
    }

    /// Checks `transitions` against the saga, appends them to the log, and
    /// only then applies them: the log is written before anything acts on
    /// the new state.
    async fn record(&mut self, transitions: Vec<Transition>, context: Option<C>) -> Result<()> {
        let mut next = self.saga.clone();
        for transition in &transitions {
            next.apply(transition.clone())?;
        }
        let context_json = match &context {
            Some(context) => serde_json::to_value(context).map_err(Error::Context)?,
            None => self.context_json.clone(),
        };
        let mut append = Append::new(
            &*self.saga_id,
            self.version,
            transitions,
            next.status(),
            context_json,
        );
        if let Some(lease) = &self.lease {
            append = append.fenced(lease.clone());
        }
        self.version = self.append(&append, &next).await?;
        if next.is_finished() && !self.saga.is_finished() {
            metrics::finished(&self.definition, next.status());
        }
        self.saga = next;
        self.context_json = append.context;
        if let Some(context) = context {
            self.context = context;
        }
        Ok(())
    }
}

impl<C: SagaContext> Driver<C> {
    /// Appends to the log, retrying a transient failure with backoff for as
    /// long as it lasts, so that a saga is never left unowned in memory. A
    /// failed write may have been applied all the same (the answer was
    /// lost): a conflict after such a failure is checked against the log,
    /// and taken as success when the log holds exactly this write.
    async fn append(&self, append: &Append, next: &SagaInstance) -> Result<u64> {
        let backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5))
            .jitter(Jitter::Proportional(0.2));
        let mut failures = 0u32;
        loop {
            match self.log.append(append).await {
                Ok(version) => return Ok(version),
                Err(err) if err.is_conflict() && failures > 0 => {
                    let record = self.log.load(&self.saga_id).await;
                    match record {
                        Ok(Some(record)) if record.transitions == next.history() => {
                            return Ok(record.version());
                        }
                        Ok(_) => return Err(err.into()),
                        Err(load) if load.is_retryable() => {}
                        Err(load) => return Err(load.into()),
                    }
                }
                Err(err) if err.is_retryable() => {}
                Err(err) => return Err(err.into()),
            }
            failures += 1;
            let delay = backoff.delay(failures);
            tracing::warn!(
                saga.id = %self.saga_id,
                failures,
                delay_ms = delay.as_millis() as u64,
                "saga log write failed; retrying"
            );
            metrics::log_retry(&self.definition);
            tokio::time::sleep(delay).await;
        }
    }
}

fn give_up_message(err: &StepError, attempt: u32) -> String {
    if err.is_retryable() {
        format!("gave up after {attempt} attempts: {}", err.chain_message())
    } else {
        err.chain_message()
    }
}
