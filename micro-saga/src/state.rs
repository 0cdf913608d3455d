//! The saga state machine.

use std::collections::HashSet;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;

use crate::error::{Error, Result};
use crate::transition::Transition;

/// Where a saga is in its life.
///
/// ```text
///            step_failed / aborted
/// Running ──────────────────────────► Compensating ──compensation_failed──► Failed
///    │                                     │
///    │ last step_succeeded                 │ last compensation_succeeded
///    ▼                                     ▼
/// Completed                            Compensated
/// ```
///
/// A failure or abort before any step succeeded goes straight to
/// `Compensated`: there is nothing to undo. `Completed`, `Compensated` and
/// `Failed` are terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SagaStatus {
    /// Steps are being run forward.
    Running,
    /// A step failed or the saga was aborted; completed steps are being
    /// compensated, latest first.
    Compensating,
    /// Every step succeeded.
    Completed,
    /// Every completed step was compensated; the saga ended without effect.
    Compensated,
    /// A compensation failed for good: the saga needs attention from an
    /// operator.
    Failed,
}

impl SagaStatus {
    /// Whether the saga has finished: completed, compensated or failed.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            SagaStatus::Completed | SagaStatus::Compensated | SagaStatus::Failed
        )
    }

    /// The status in snake case, as in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            SagaStatus::Running => "running",
            SagaStatus::Compensating => "compensating",
            SagaStatus::Completed => "completed",
            SagaStatus::Compensated => "compensated",
            SagaStatus::Failed => "failed",
        }
    }
}

impl fmt::Display for SagaStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where one step of a saga is.
///
/// A step goes `Pending → Running → Succeeded` forward, or `Running → Failed`
/// (the participant refused), or `Running → Uncertain` (no definite answer);
/// a succeeded or uncertain step may later go `Compensating → Compensated`,
/// or `Compensating → CompensationFailed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    /// Not started.
    Pending,
    /// Its action was started and no outcome is recorded yet.
    Running,
    /// Its action took effect.
    Succeeded,
    /// Its action failed for good, without effect.
    Failed,
    /// Its action may have taken effect: no attempt got a definite answer.
    /// It is compensated as if it had succeeded.
    Uncertain,
    /// Its compensation was started and no outcome is recorded yet.
    Compensating,
    /// Its compensation took effect.
    Compensated,
    /// Its compensation failed for good.
    CompensationFailed,
}

/// The state of one step of a saga instance.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepState {
    name: String,
    status: StepStatus,
    attempts: u32,
    compensation_attempts: u32,
    output: Option<Value>,
    error: Option<String>,
}

impl StepState {
    fn new(name: String) -> Self {
        StepState {
            name,
            status: StepStatus::Pending,
            attempts: 0,
            compensation_attempts: 0,
            output: None,
            error: None,
        }
    }

    /// The step's name in the saga definition.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where the step is.
    pub fn status(&self) -> StepStatus {
        self.status
    }

    /// How many times the step's action was started.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// How many times the step's compensation was started.
    pub fn compensation_attempts(&self) -> u32 {
        self.compensation_attempts
    }

    /// What the step's action returned, recorded when it succeeded.
    pub fn output(&self) -> Option<&Value> {
        self.output.as_ref()
    }

    /// Why the step's action, or its compensation, failed.
    pub fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }
}

/// How an attempt at a step's action ended, when it did not succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AttemptFailure {
    /// The participant refused for good (a declined card, a `4xx`): nothing
    /// took effect.
    Refused,
    /// The participant refused for now (a `503`, a connection refused before
    /// the command was sent): nothing took effect, another attempt may pass.
    Transient,
    /// No definite answer: the attempt timed out, or the connection was lost
    /// after the command was sent. It may have taken effect.
    Unknown,
}

/// The bounds on the attempts at a step's action; see
/// [`StepPolicy::action_limits`](crate::StepPolicy::action_limits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct AttemptLimits {
    /// Attempts in all, the first included; `0` counts as `1`.
    pub max_attempts: u32,
    /// How long after the first attempt (as recorded) the step may still be
    /// tried; `None` bounds the attempts only.
    pub within: Option<std::time::Duration>,
}

impl AttemptLimits {
    /// At most `max_attempts` attempts, without a time bound.
    pub fn attempts(max_attempts: u32) -> Self {
        AttemptLimits {
            max_attempts,
            within: None,
        }
    }

    /// Adds a bound on the time since the first attempt.
    pub fn within(mut self, limit: std::time::Duration) -> Self {
        self.within = Some(limit);
        self
    }
}

/// What [`SagaInstance::resolve_failure`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Resolution {
    /// Try the action again, with the same idempotency key.
    Retry,
    /// Record [`Transition::StepFailed`]: the action had no effect.
    Fail,
    /// Record [`Transition::StepUncertain`]: the action may have taken
    /// effect and is compensated as if it succeeded.
    Uncertain,
}

/// What the orchestrator should do next for a saga.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextAction {
    /// Run the action of this step: start it, or start it again when an
    /// attempt was begun but no outcome recorded (a retry, or a resumption
    /// after a crash).
    RunStep(usize),
    /// Run the compensation of this step, the latest completed step not yet
    /// compensated (again, if an attempt was begun without outcome).
    CompensateStep(usize),
    /// Nothing: the saga has finished with this status.
    Finished(SagaStatus),
}

/// One saga: its steps, its status and the history of its transitions.
///
/// The state changes only through [`apply`](Self::apply) (or the shorthands
/// that build the transition for the current step, such as
/// [`step_succeeded`](Self::step_succeeded)), which refuses illegal moves with
/// an [`Error`] and leaves the saga unchanged. Every accepted [`Transition`] is
/// kept in [`history`](Self::history), and [`replay`](Self::replay) of that
/// history rebuilds an equal instance.
///
/// # Invariants
///
/// - Steps run forward in order, one at a time: a step starts only after every
///   earlier step succeeded.
/// - Only completed (succeeded) steps, and the step whose outcome stayed
///   unknown ([`StepStatus::Uncertain`]), are compensated, in reverse order:
///   after a failure or abort the next compensation is always the latest
///   succeeded step not yet compensated ([`next_action`](Self::next_action)),
///   and a compensation for any other step is refused.
/// - A finished saga (completed, compensated or failed) accepts nothing.
///
/// # Writing the log before acting
///
/// To record a transition before acting on it, build it from
/// [`next_action`](Self::next_action), [`check`](Self::check) it, append it to
/// the log, then [`apply`](Self::apply) it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SagaInstance {
    id: String,
    definition: String,
    status: SagaStatus,
    steps: Vec<StepState>,
    history: Vec<Transition>,
}

impl SagaInstance {
    /// Starts a saga: records a [`Transition::Started`] and returns the
    /// instance, whose first step is next.
    ///
    /// # Errors
    ///
    /// Fails with [`Error::InvalidDefinition`] when the id or definition name
    /// is empty, or the steps are none, have an empty name or a name twice.
    pub fn start<I>(
        saga_id: impl Into<String>,
        definition: impl Into<String>,
        steps: I,
        at: OffsetDateTime,
    ) -> Result<Self>
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        Self::from_started(Transition::Started {
            saga_id: saga_id.into(),
            definition: definition.into(),
            steps: steps.into_iter().map(Into::into).collect(),
            at,
        })
    }

    /// Rebuilds a saga from its history, applying each transition in order.
    ///
    /// # Errors
    ///
    /// Fails when the history is empty ([`Error::EmptyHistory`]), does not
    /// begin with `started` ([`Error::MissingStart`]), starts an invalid saga,
    /// or holds a transition the state machine refuses ([`Error::Replay`],
    /// with its position).
    pub fn replay<I>(history: I) -> Result<Self>
    where
        I: IntoIterator<Item = Transition>,
    {
        let mut history = history.into_iter();
        let first = history.next().ok_or(Error::EmptyHistory)?;
        let mut saga = Self::from_started(first)?;
        for (index, transition) in history.enumerate() {
            saga.apply(transition).map_err(|e| Error::Replay {
                index: index + 1,
                source: Box::new(e),
            })?;
        }
        Ok(saga)
    }

    fn from_started(started: Transition) -> Result<Self> {
        let Transition::Started {
            saga_id,
            definition,
            steps,
            ..
        } = &started
        else {
            return Err(Error::MissingStart);
        };
        let invalid = |reason: String| Err(Error::InvalidDefinition { reason });
        if saga_id.is_empty() {
            return invalid("the saga id is empty".into());
        }
        if definition.is_empty() {
            return invalid("the definition name is empty".into());
        }
        if steps.is_empty() {
            return invalid(format!("`{definition}` has no steps"));
        }
        let mut seen = HashSet::new();
        for name in steps {
            if name.is_empty() {
                return invalid(format!("`{definition}` has a step with an empty name"));
            }
            if !seen.insert(name) {
                return invalid(format!("`{definition}` has two steps named `{name}`"));
            }
        }
        Ok(SagaInstance {
            id: saga_id.clone(),
            definition: definition.clone(),
            status: SagaStatus::Running,
            steps: steps.iter().cloned().map(StepState::new).collect(),
            history: vec![started],
        })
    }

    /// The saga instance's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The name of the saga's definition.
    pub fn definition(&self) -> &str {
        &self.definition
    }

    /// Where the saga is.
    pub fn status(&self) -> SagaStatus {
        self.status
    }

    /// Whether the saga has finished (see [`SagaStatus::is_terminal`]).
    pub fn is_finished(&self) -> bool {
        self.status.is_terminal()
    }

    /// The steps, in the order they run forward.
    pub fn steps(&self) -> &[StepState] {
        &self.steps
    }

    /// Every accepted transition, oldest first; the saga log's content.
    pub fn history(&self) -> &[Transition] {
        &self.history
    }

    /// When the saga started.
    pub fn started_at(&self) -> OffsetDateTime {
        self.history[0].at()
    }

    /// When the saga last changed.
    pub fn updated_at(&self) -> OffsetDateTime {
        self.history[self.history.len() - 1].at()
    }

    /// The step whose turn it is: while running, the step to run; while
    /// compensating, the step to compensate; `None` once finished.
    pub fn current_step(&self) -> Option<usize> {
        match self.status {
            SagaStatus::Running => self
                .steps
                .iter()
                .position(|s| s.status != StepStatus::Succeeded),
            SagaStatus::Compensating => self.steps.iter().rposition(|s| {
                matches!(
                    s.status,
                    StepStatus::Succeeded | StepStatus::Uncertain | StepStatus::Compensating
                )
            }),
            SagaStatus::Completed | SagaStatus::Compensated | SagaStatus::Failed => None,
        }
    }

    /// What the orchestrator should do next.
    pub fn next_action(&self) -> NextAction {
        match (self.status, self.current_step()) {
            (SagaStatus::Running, Some(step)) => NextAction::RunStep(step),
            (SagaStatus::Compensating, Some(step)) => NextAction::CompensateStep(step),
            (status, _) => NextAction::Finished(status),
        }
    }

    /// Checks whether `transition` may be applied now, without applying it.
    ///
    /// # Errors
    ///
    /// The error [`apply`](Self::apply) would return.
    pub fn check(&self, transition: &Transition) -> Result<()> {
        let name = transition.name();
        if let Transition::Started { .. } = transition {
            return Err(Error::AlreadyStarted);
        }
        if self.status.is_terminal() {
            return Err(Error::Finished {
                status: self.status,
            });
        }
        let expected_status = match transition {
            Transition::CompensationStarted { .. }
            | Transition::CompensationSucceeded { .. }
            | Transition::CompensationFailed { .. } => SagaStatus::Compensating,
            _ => SagaStatus::Running,
        };
        if self.status != expected_status {
            return Err(Error::NotAllowed {
                transition: name,
                status: self.status,
            });
        }
        let current = self
            .current_step()
            .expect("a running or compensating saga has a current step");
        let current_status = self.steps[current].status;
        let Some(step) = transition.step() else {
            // Only `aborted` names no step.
            if current_status == StepStatus::Running {
                return Err(Error::StepInFlight { step: current });
            }
            return Ok(());
        };
        if step != current {
            return Err(Error::WrongStep {
                transition: name,
                expected: current,
                found: step,
            });
        }
        let in_flight = match transition {
            Transition::StepSucceeded { .. }
            | Transition::StepFailed { .. }
            | Transition::StepUncertain { .. } => StepStatus::Running,
            Transition::CompensationSucceeded { .. } | Transition::CompensationFailed { .. } => {
                StepStatus::Compensating
            }
            _ => return Ok(()),
        };
        if current_status != in_flight {
            return Err(Error::NotStarted {
                transition: name,
                step,
            });
        }
        Ok(())
    }

    /// Applies `transition` if the state machine allows it, and records it in
    /// the history.
    ///
    /// # Errors
    ///
    /// Refuses, leaving the saga unchanged:
    /// - anything once the saga has finished ([`Error::Finished`]);
    /// - another `started` ([`Error::AlreadyStarted`]);
    /// - a forward transition while compensating, or a compensation while
    ///   running ([`Error::NotAllowed`]);
    /// - a transition for a step whose turn it is not ([`Error::WrongStep`]):
    ///   forward, the first step not yet succeeded; compensating, the latest
    ///   succeeded step not yet compensated;
    /// - an outcome for a step or compensation not started
    ///   ([`Error::NotStarted`]);
    /// - an abort while a step is running ([`Error::StepInFlight`]).
    pub fn apply(&mut self, transition: Transition) -> Result<()> {
        self.check(&transition)?;
        match &transition {
            Transition::StepStarted { step, .. } => {
                let state = &mut self.steps[*step];
                state.status = StepStatus::Running;
                state.attempts = state.attempts.saturating_add(1);
            }
            Transition::StepSucceeded { step, output, .. } => {
                let state = &mut self.steps[*step];
                state.status = StepStatus::Succeeded;
                state.output.clone_from(output);
                if *step + 1 == self.steps.len() {
                    self.status = SagaStatus::Completed;
                }
            }
            Transition::StepFailed { step, error, .. } => {
                let state = &mut self.steps[*step];
                state.status = StepStatus::Failed;
                state.error = Some(error.clone());
                self.begin_compensation();
            }
            Transition::StepUncertain { step, error, .. } => {
                let state = &mut self.steps[*step];
                state.status = StepStatus::Uncertain;
                state.error = Some(error.clone());
                self.begin_compensation();
            }
            Transition::Aborted { .. } => self.begin_compensation(),
            Transition::CompensationStarted { step, .. } => {
                let state = &mut self.steps[*step];
                state.status = StepStatus::Compensating;
                state.compensation_attempts = state.compensation_attempts.saturating_add(1);
            }
            Transition::CompensationSucceeded { step, .. } => {
                self.steps[*step].status = StepStatus::Compensated;
                if self.current_step().is_none() {
                    self.status = SagaStatus::Compensated;
                }
            }
            Transition::CompensationFailed { step, error, .. } => {
                let state = &mut self.steps[*step];
                state.status = StepStatus::CompensationFailed;
                state.error = Some(error.clone());
                self.status = SagaStatus::Failed;
            }
            Transition::Started { .. } => return Err(Error::AlreadyStarted),
        }
        self.history.push(transition);
        Ok(())
    }

    fn begin_compensation(&mut self) {
        self.status = SagaStatus::Compensating;
        if self.current_step().is_none() {
            self.status = SagaStatus::Compensated;
        }
    }

    fn current_or_first(&self) -> usize {
        self.current_step().unwrap_or_default()
    }

    fn record(&mut self, transition: Transition) -> Result<Transition> {
        self.apply(transition.clone())?;
        Ok(transition)
    }

    /// Records the start of an attempt at the current step's action.
    ///
    /// # Errors
    ///
    /// As [`apply`](Self::apply); returns the applied transition otherwise.
    pub fn step_started(&mut self, at: OffsetDateTime) -> Result<Transition> {
        let step = self.current_or_first();
        self.record(Transition::StepStarted { step, at })
    }

    /// Records that the current step's action succeeded, with what it
    /// returned.
    ///
    /// # Errors
    ///
    /// As [`apply`](Self::apply); returns the applied transition otherwise.
    pub fn step_succeeded(
        &mut self,
        output: Option<Value>,
        at: OffsetDateTime,
    ) -> Result<Transition> {
        let step = self.current_or_first();
        self.record(Transition::StepSucceeded { step, output, at })
    }

    /// Records that the current step's action failed for good.
    ///
    /// # Errors
    ///
    /// As [`apply`](Self::apply); returns the applied transition otherwise.
    pub fn step_failed(
        &mut self,
        error: impl Into<String>,
        at: OffsetDateTime,
    ) -> Result<Transition> {
        let step = self.current_or_first();
        self.record(Transition::StepFailed {
            step,
            error: error.into(),
            at,
        })
    }

    /// Records that the current step's action may have taken effect without
    /// a definite answer; compensation begins with it.
    ///
    /// # Errors
    ///
    /// As [`apply`](Self::apply); returns the applied transition otherwise.
    pub fn step_uncertain(
        &mut self,
        error: impl Into<String>,
        at: OffsetDateTime,
    ) -> Result<Transition> {
        let step = self.current_or_first();
        self.record(Transition::StepUncertain {
            step,
            error: error.into(),
            at,
        })
    }

    /// When the current step's first attempt started, as recorded; `None`
    /// when it has not started.
    pub fn step_first_started_at(&self, step: usize) -> Option<OffsetDateTime> {
        self.history.iter().find_map(|t| match t {
            Transition::StepStarted { step: s, at } if *s == step => Some(*at),
            _ => None,
        })
    }

    /// Decides what comes of an attempt at the current step's action that
    /// did not succeed: this is where an unknown outcome is kept from being
    /// taken as "did not happen".
    ///
    /// - A definite refusal ([`AttemptFailure::Refused`]) fails the step:
    ///   the participant said no to the step's idempotency key, so nothing
    ///   took effect, whatever earlier attempts did.
    /// - A transient refusal or an unknown outcome is tried again, with the
    ///   same key, while `limits` allow.
    /// - Past the limits, the step fails only if this was its only attempt
    ///   and the participant answered ([`AttemptFailure::Transient`]); if any
    ///   attempt may have taken effect (this one's outcome is unknown, or an
    ///   earlier attempt was retried or interrupted), the step is
    ///   [`Resolution::Uncertain`] and is compensated as if it succeeded.
    ///
    /// `now` is compared with the step's first attempt as the log recorded
    /// it, so [`AttemptLimits::within`] holds across restarts. Returns
    /// [`Resolution::Retry`] when no step is running (nothing to decide).
    pub fn resolve_failure(
        &self,
        failure: AttemptFailure,
        limits: AttemptLimits,
        now: OffsetDateTime,
    ) -> Resolution {
        let Some(step) = self
            .current_step()
            .filter(|_| self.status == SagaStatus::Running)
        else {
            return Resolution::Retry;
        };
        let state = &self.steps[step];
        if failure == AttemptFailure::Refused {
            return Resolution::Fail;
        }
        let out_of_attempts = state.attempts >= limits.max_attempts.max(1);
        let out_of_time = match (limits.within, self.step_first_started_at(step)) {
            (Some(within), Some(first)) => now - first >= within,
            _ => false,
        };
        if !out_of_attempts && !out_of_time {
            return Resolution::Retry;
        }
        if failure == AttemptFailure::Transient && state.attempts <= 1 {
            Resolution::Fail
        } else {
            Resolution::Uncertain
        }
    }

    /// Abandons the saga between steps; compensation begins.
    ///
    /// # Errors
    ///
    /// As [`apply`](Self::apply); returns the applied transition otherwise.
    pub fn abort(&mut self, reason: impl Into<String>, at: OffsetDateTime) -> Result<Transition> {
        self.record(Transition::Aborted {
            reason: reason.into(),
            at,
        })
    }

    /// Records the start of an attempt at the current step's compensation.
    ///
    /// # Errors
    ///
    /// As [`apply`](Self::apply); returns the applied transition otherwise.
    pub fn compensation_started(&mut self, at: OffsetDateTime) -> Result<Transition> {
        let step = self.current_or_first();
        self.record(Transition::CompensationStarted { step, at })
    }

    /// Records that the current step's compensation succeeded.
    ///
    /// # Errors
    ///
    /// As [`apply`](Self::apply); returns the applied transition otherwise.
    pub fn compensation_succeeded(&mut self, at: OffsetDateTime) -> Result<Transition> {
        let step = self.current_or_first();
        self.record(Transition::CompensationSucceeded { step, at })
    }

    /// Records that the current step's compensation failed for good; the saga
    /// then needs attention.
    ///
    /// # Errors
    ///
    /// As [`apply`](Self::apply); returns the applied transition otherwise.
    pub fn compensation_failed(
        &mut self,
        error: impl Into<String>,
        at: OffsetDateTime,
    ) -> Result<Transition> {
        let step = self.current_or_first();
        self.record(Transition::CompensationFailed {
            step,
            error: error.into(),
            at,
        })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;
    use time::macros::datetime;
    use time::Duration;

    use super::*;

    const T0: OffsetDateTime = datetime!(2024-05-01 10:00 UTC);

    fn at(seconds: i64) -> OffsetDateTime {
        T0 + Duration::seconds(seconds)
    }

    fn saga(steps: usize) -> SagaInstance {
        let names = (0..steps).map(|i| format!("step-{i}"));
        SagaInstance::start("saga-1", "test", names, T0).unwrap()
    }

    fn statuses(saga: &SagaInstance) -> Vec<StepStatus> {
        saga.steps().iter().map(StepState::status).collect()
    }

    fn succeed(saga: &mut SagaInstance, count: usize) {
        for _ in 0..count {
            saga.step_started(at(1)).unwrap();
            saga.step_succeeded(None, at(2)).unwrap();
        }
    }

    #[test]
    fn all_steps_succeed() {
        let mut saga = saga(3);
        assert_eq!(saga.next_action(), NextAction::RunStep(0));
        for step in 0..3 {
            assert_eq!(saga.current_step(), Some(step));
            saga.step_started(at(step as i64)).unwrap();
            assert_eq!(saga.steps()[step].status(), StepStatus::Running);
            saga.step_succeeded(Some(json!(step)), at(step as i64 + 1))
                .unwrap();
        }
        assert_eq!(saga.status(), SagaStatus::Completed);
        assert!(saga.is_finished());
        assert_eq!(saga.current_step(), None);
        assert_eq!(
            saga.next_action(),
            NextAction::Finished(SagaStatus::Completed)
        );
        assert_eq!(saga.steps()[2].output(), Some(&json!(2)));
        assert_eq!(saga.steps()[1].attempts(), 1);
        assert_eq!(saga.history().len(), 7);
        assert_eq!(saga.started_at(), T0);
        assert_eq!(saga.updated_at(), at(3));
    }

    #[test]
    fn failure_compensates_completed_steps_in_reverse() {
        let mut saga = saga(4);
        succeed(&mut saga, 2);
        saga.step_started(at(3)).unwrap();
        saga.step_failed("out of stock", at(4)).unwrap();
        assert_eq!(saga.status(), SagaStatus::Compensating);
        assert_eq!(saga.steps()[2].error(), Some("out of stock"));
        assert_eq!(saga.next_action(), NextAction::CompensateStep(1));

        for wrong in [0, 2, 3] {
            let err = saga
                .apply(Transition::CompensationStarted {
                    step: wrong,
                    at: at(5),
                })
                .unwrap_err();
            assert!(
                matches!(err, Error::WrongStep { expected: 1, found, .. } if found == wrong),
                "{err:?}"
            );
        }
        saga.compensation_started(at(5)).unwrap();
        saga.compensation_succeeded(at(6)).unwrap();
        assert_eq!(saga.next_action(), NextAction::CompensateStep(0));
        saga.compensation_started(at(7)).unwrap();
        saga.compensation_succeeded(at(8)).unwrap();

        assert_eq!(saga.status(), SagaStatus::Compensated);
        assert_eq!(
            statuses(&saga),
            [
                StepStatus::Compensated,
                StepStatus::Compensated,
                StepStatus::Failed,
                StepStatus::Pending
            ]
        );
        let compensated: Vec<usize> = saga
            .history()
            .iter()
            .filter_map(|t| match t {
                Transition::CompensationSucceeded { step, .. } => Some(*step),
                _ => None,
            })
            .collect();
        assert_eq!(compensated, [1, 0]);
    }

    #[test]
    fn failing_first_step_leaves_nothing_to_compensate() {
        let mut saga = saga(2);
        saga.step_started(at(1)).unwrap();
        saga.step_failed("card declined", at(2)).unwrap();
        assert_eq!(saga.status(), SagaStatus::Compensated);
        assert_eq!(
            saga.next_action(),
            NextAction::Finished(SagaStatus::Compensated)
        );
    }

    #[test]
    fn failed_compensation_needs_attention_and_ends_the_saga() {
        let mut saga = saga(2);
        succeed(&mut saga, 1);
        saga.step_started(at(3)).unwrap();
        saga.step_failed("out of stock", at(4)).unwrap();
        saga.compensation_started(at(5)).unwrap();
        saga.compensation_failed("refund refused", at(6)).unwrap();
        assert_eq!(saga.status(), SagaStatus::Failed);
        assert_eq!(saga.steps()[0].status(), StepStatus::CompensationFailed);
        assert_eq!(saga.steps()[0].error(), Some("refund refused"));

        let before = saga.clone();
        let attempts = [
            Transition::StepStarted { step: 1, at: at(7) },
            Transition::CompensationStarted { step: 0, at: at(7) },
            Transition::CompensationSucceeded { step: 0, at: at(7) },
            Transition::Aborted {
                reason: "x".into(),
                at: at(7),
            },
        ];
        for t in attempts {
            let err = saga.apply(t).unwrap_err();
            assert!(
                matches!(
                    err,
                    Error::Finished {
                        status: SagaStatus::Failed
                    }
                ),
                "{err:?}"
            );
            assert_eq!(err.to_string(), "saga is failed and accepts no transitions");
        }
        assert_eq!(saga, before);
    }

    #[test]
    fn retries_count_attempts() {
        let mut saga = saga(2);
        saga.step_started(at(1)).unwrap();
        saga.step_started(at(2)).unwrap();
        saga.step_succeeded(None, at(3)).unwrap();
        assert_eq!(saga.steps()[0].attempts(), 2);
        saga.step_started(at(4)).unwrap();
        saga.step_failed("boom", at(5)).unwrap();
        saga.compensation_started(at(6)).unwrap();
        saga.compensation_started(at(7)).unwrap();
        assert_eq!(saga.steps()[0].compensation_attempts(), 2);
        saga.compensation_succeeded(at(8)).unwrap();
        assert_eq!(saga.status(), SagaStatus::Compensated);
    }

    #[test]
    fn outcomes_need_a_start() {
        let mut saga = saga(2);
        let err = saga.step_succeeded(None, at(1)).unwrap_err();
        assert!(matches!(err, Error::NotStarted { step: 0, .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            "transition `step_succeeded` for step 0, which has not been started"
        );
        assert!(matches!(
            saga.step_failed("x", at(1)),
            Err(Error::NotStarted { .. })
        ));

        succeed(&mut saga, 1);
        saga.step_started(at(3)).unwrap();
        saga.step_failed("x", at(4)).unwrap();
        assert!(matches!(
            saga.compensation_succeeded(at(5)),
            Err(Error::NotStarted { step: 0, .. })
        ));
        assert!(matches!(
            saga.compensation_failed("x", at(5)),
            Err(Error::NotStarted { step: 0, .. })
        ));
    }

    #[test]
    fn forward_and_backward_transitions_do_not_mix() {
        let mut saga = saga(3);
        let err = saga.compensation_started(at(1)).unwrap_err();
        assert!(
            matches!(
                err,
                Error::NotAllowed {
                    transition: "compensation_started",
                    status: SagaStatus::Running
                }
            ),
            "{err:?}"
        );
        succeed(&mut saga, 1);
        let err = saga
            .apply(Transition::StepStarted { step: 2, at: at(3) })
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::WrongStep {
                    expected: 1,
                    found: 2,
                    ..
                }
            ),
            "{err:?}"
        );
        saga.abort("cancelled", at(3)).unwrap();
        let err = saga.step_started(at(4)).unwrap_err();
        assert!(
            matches!(
                err,
                Error::NotAllowed {
                    status: SagaStatus::Compensating,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(matches!(
            saga.abort("again", at(4)),
            Err(Error::NotAllowed { .. })
        ));
    }

    #[test]
    fn abort_only_between_steps() {
        let mut saga = saga(3);
        succeed(&mut saga, 1);
        saga.step_started(at(3)).unwrap();
        let err = saga.abort("cancelled", at(4)).unwrap_err();
        assert!(matches!(err, Error::StepInFlight { step: 1 }), "{err:?}");
        saga.step_succeeded(None, at(5)).unwrap();
        saga.abort("cancelled", at(6)).unwrap();
        assert_eq!(saga.status(), SagaStatus::Compensating);
        assert_eq!(saga.next_action(), NextAction::CompensateStep(1));
        assert_eq!(saga.history().last().unwrap().reason(), Some("cancelled"));

        let mut fresh = self::saga(2);
        fresh.abort("cancelled", at(1)).unwrap();
        assert_eq!(fresh.status(), SagaStatus::Compensated);
    }

    #[test]
    fn started_is_only_the_first_transition() {
        let mut saga = saga(1);
        let again = saga.history()[0].clone();
        assert!(matches!(saga.apply(again), Err(Error::AlreadyStarted)));
    }

    #[test]
    fn rejects_invalid_definitions() {
        let cases: [(&str, &str, Vec<&str>, &str); 5] = [
            ("", "d", vec!["a"], "saga id is empty"),
            ("s", "", vec!["a"], "definition name is empty"),
            ("s", "d", vec![], "`d` has no steps"),
            ("s", "d", vec!["a", ""], "empty name"),
            ("s", "d", vec!["a", "b", "a"], "two steps named `a`"),
        ];
        for (id, definition, steps, reason) in cases {
            let err = SagaInstance::start(id, definition, steps, T0).unwrap_err();
            assert!(matches!(err, Error::InvalidDefinition { .. }), "{err:?}");
            assert!(err.to_string().contains(reason), "{err} lacks {reason}");
        }
    }

    #[test]
    fn replay_rejects_bad_histories() {
        assert!(matches!(
            SagaInstance::replay(Vec::new()),
            Err(Error::EmptyHistory)
        ));
        assert!(matches!(
            SagaInstance::replay([Transition::StepStarted { step: 0, at: T0 }]),
            Err(Error::MissingStart)
        ));
        let mut history = saga(2).history().to_vec();
        history.push(Transition::StepStarted { step: 0, at: at(1) });
        history.push(Transition::CompensationStarted { step: 0, at: at(2) });
        let err = SagaInstance::replay(history).unwrap_err();
        assert!(matches!(err, Error::Replay { index: 2, .. }), "{err:?}");
        let source = std::error::Error::source(&err).unwrap();
        assert!(
            source.to_string().contains("compensation_started"),
            "{source}"
        );
    }

    #[test]
    fn serializes_for_the_query_api() {
        let mut saga = saga(2);
        succeed(&mut saga, 1);
        let value = serde_json::to_value(&saga).unwrap();
        assert_eq!(value["status"], "running");
        assert_eq!(value["steps"][0]["status"], "succeeded");
        assert_eq!(value["steps"][1]["name"], "step-1");
        assert_eq!(value["history"][1]["type"], "step_started");
    }

    /// Checks the shape of the step statuses against the saga status, writing
    /// each step status as one letter.
    fn assert_shape(saga: &SagaInstance) {
        let letters: String = saga
            .steps()
            .iter()
            .map(|s| match s.status() {
                StepStatus::Pending => 'P',
                StepStatus::Running => 'R',
                StepStatus::Succeeded => 'S',
                StepStatus::Failed => 'F',
                StepStatus::Uncertain => 'U',
                StepStatus::Compensating => 'C',
                StepStatus::Compensated => 'X',
                StepStatus::CompensationFailed => 'E',
            })
            .collect();
        // After the step being compensated: compensated steps, then the step
        // that failed (or, after an abort, the step that never ran), then steps
        // that never ran; nothing, when the uncertain last step was compensated.
        let tail_ok = |tail: &str| {
            let mut rest = tail.trim_start_matches('X').chars();
            matches!(rest.next(), Some('F' | 'P') | None) && rest.all(|c| c == 'P')
        };
        let ok = match saga.status() {
            SagaStatus::Running => {
                let mut rest = letters.trim_start_matches('S').chars();
                matches!(rest.next(), Some('P' | 'R')) && rest.all(|c| c == 'P')
            }
            SagaStatus::Completed => letters.chars().all(|c| c == 'S'),
            SagaStatus::Compensating => match letters.rfind(['S', 'C', 'U']) {
                Some(k) => letters[..k].chars().all(|c| c == 'S') && tail_ok(&letters[k + 1..]),
                None => false,
            },
            SagaStatus::Compensated => tail_ok(&letters),
            SagaStatus::Failed => match letters.find('E') {
                Some(k) => letters[..k].chars().all(|c| c == 'S') && tail_ok(&letters[k + 1..]),
                None => false,
            },
        };
        assert!(ok, "steps {letters} in a {} saga", saga.status());
    }

    /// Checks, from the history alone, that steps ran forward in order and
    /// that compensations ran only for completed steps, latest first.
    fn assert_history(saga: &SagaInstance) {
        let mut succeeded = Vec::new();
        let mut compensated = Vec::new();
        let mut compensating = false;
        for t in &saga.history()[1..] {
            match t {
                Transition::StepStarted { .. } => assert!(!compensating),
                Transition::StepSucceeded { step, .. } => {
                    assert!(!compensating);
                    assert_eq!(*step, succeeded.len(), "steps run in order");
                    succeeded.push(*step);
                }
                Transition::StepFailed { .. } | Transition::Aborted { .. } => {
                    assert!(!compensating);
                    compensating = true;
                }
                // An uncertain step is compensated as if it had succeeded.
                Transition::StepUncertain { step, .. } => {
                    assert!(!compensating);
                    assert_eq!(*step, succeeded.len(), "steps run in order");
                    succeeded.push(*step);
                    compensating = true;
                }
                Transition::CompensationStarted { step, .. }
                | Transition::CompensationSucceeded { step, .. }
                | Transition::CompensationFailed { step, .. } => {
                    assert!(compensating);
                    assert!(
                        succeeded.contains(step),
                        "compensated step {step} never completed"
                    );
                    let latest = succeeded.iter().rev().find(|s| !compensated.contains(*s));
                    assert_eq!(latest, Some(step), "compensations run in reverse order");
                    if let Transition::CompensationSucceeded { .. } = t {
                        compensated.push(*step);
                    }
                }
                Transition::Started { .. } => panic!("started twice"),
            }
        }
        let reversed: Vec<usize> = succeeded.iter().rev().copied().collect();
        assert_eq!(compensated, reversed[..compensated.len()]);
        match saga.status() {
            SagaStatus::Running => assert!(!compensating),
            SagaStatus::Completed => {
                assert!(!compensating);
                assert_eq!(succeeded.len(), saga.steps().len());
            }
            SagaStatus::Compensating => assert!(compensated.len() < succeeded.len()),
            SagaStatus::Compensated => {
                assert!(compensating);
                assert_eq!(compensated, reversed);
            }
            SagaStatus::Failed => assert!(matches!(
                saga.history().last(),
                Some(Transition::CompensationFailed { .. })
            )),
        }
    }

    /// A transition to try; `None` targets the step whose turn it is, `Some`
    /// any step, in range or not.
    #[derive(Debug, Clone)]
    enum Op {
        StepStarted(Option<usize>),
        StepSucceeded(Option<usize>, bool),
        StepFailed(Option<usize>),
        StepUncertain(Option<usize>),
        Abort,
        CompensationStarted(Option<usize>),
        CompensationSucceeded(Option<usize>),
        CompensationFailed(Option<usize>),
        Restart,
    }

    fn arb_op() -> impl Strategy<Value = Op> {
        let target = || prop_oneof![4 => Just(None), 1 => (0..6usize).prop_map(Some)];
        prop_oneof![
            4 => target().prop_map(Op::StepStarted),
            4 => (target(), any::<bool>()).prop_map(|(t, o)| Op::StepSucceeded(t, o)),
            1 => target().prop_map(Op::StepFailed),
            1 => target().prop_map(Op::StepUncertain),
            1 => Just(Op::Abort),
            3 => target().prop_map(Op::CompensationStarted),
            3 => target().prop_map(Op::CompensationSucceeded),
            1 => target().prop_map(Op::CompensationFailed),
            1 => Just(Op::Restart),
        ]
    }

    fn transition(saga: &SagaInstance, op: Op, at: OffsetDateTime) -> Transition {
        let step = |target: Option<usize>| target.or(saga.current_step()).unwrap_or(0);
        match op {
            Op::StepStarted(t) => Transition::StepStarted { step: step(t), at },
            Op::StepSucceeded(t, output) => Transition::StepSucceeded {
                step: step(t),
                output: output.then(|| json!({"at": at.unix_timestamp()})),
                at,
            },
            Op::StepFailed(t) => Transition::StepFailed {
                step: step(t),
                error: "failed".into(),
                at,
            },
            Op::StepUncertain(t) => Transition::StepUncertain {
                step: step(t),
                error: "timed out".into(),
                at,
            },
            Op::Abort => Transition::Aborted {
                reason: "aborted".into(),
                at,
            },
            Op::CompensationStarted(t) => Transition::CompensationStarted { step: step(t), at },
            Op::CompensationSucceeded(t) => Transition::CompensationSucceeded { step: step(t), at },
            Op::CompensationFailed(t) => Transition::CompensationFailed {
                step: step(t),
                error: "failed".into(),
                at,
            },
            Op::Restart => saga.history()[0].clone(),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn random_transitions_keep_the_invariants(
            steps in 1..=5usize,
            ops in prop::collection::vec(arb_op(), 0..48),
        ) {
            let mut saga = saga(steps);
            for (i, op) in ops.into_iter().enumerate() {
                let t = transition(&saga, op, at(i as i64));
                let before = saga.clone();
                let checked = saga.check(&t);
                match saga.apply(t.clone()) {
                    Ok(()) => {
                        prop_assert!(checked.is_ok());
                        prop_assert!(!before.is_finished(), "a finished saga accepted {t:?}");
                        prop_assert_eq!(saga.history().last(), Some(&t));
                        match t {
                            Transition::StepStarted { step, .. } => {
                                prop_assert_eq!(before.next_action(), NextAction::RunStep(step));
                            }
                            Transition::CompensationStarted { step, .. } => {
                                prop_assert_eq!(before.next_action(), NextAction::CompensateStep(step));
                            }
                            _ => {}
                        }
                        assert_shape(&saga);
                        assert_history(&saga);
                    }
                    Err(err) => {
                        prop_assert!(checked.is_err());
                        prop_assert_eq!(&saga, &before, "a refused transition changed the saga");
                        if before.is_finished() {
                            prop_assert!(
                                matches!(err, Error::Finished { .. } | Error::AlreadyStarted),
                                "{err:?}"
                            );
                        }
                    }
                }
            }
            prop_assert_eq!(&SagaInstance::replay(saga.history().to_vec()).unwrap(), &saga);
            let log = serde_json::to_string(saga.history()).unwrap();
            let history: Vec<Transition> = serde_json::from_str(&log).unwrap();
            prop_assert_eq!(&SagaInstance::replay(history).unwrap(), &saga);
        }

        /// An orchestrator that follows `next_action` always finishes, and a
        /// saga without failures completes.
        #[test]
        fn following_next_action_finishes(
            steps in 1..=5usize,
            outcomes in prop::collection::vec(0..5u8, 0..32),
        ) {
            let mut saga = saga(steps);
            let mut outcomes = outcomes.into_iter();
            let mut failed = false;
            let mut clock = 0;
            let mut tick = || { clock += 1; at(clock) };
            // Each outcome: 0 retry, 1 fail for good, 3 uncertain, anything
            // else succeed.
            for _ in 0..200 {
                match saga.next_action() {
                    NextAction::RunStep(_) => {
                        saga.step_started(tick()).unwrap();
                        match outcomes.next().unwrap_or(2) {
                            0 => {}
                            1 => {
                                failed = true;
                                saga.step_failed("no", tick()).unwrap();
                            }
                            3 => {
                                failed = true;
                                saga.step_uncertain("timed out", tick()).unwrap();
                            }
                            _ => {
                                saga.step_succeeded(None, tick()).unwrap();
                            }
                        }
                    }
                    NextAction::CompensateStep(_) => {
                        saga.compensation_started(tick()).unwrap();
                        match outcomes.next().unwrap_or(2) {
                            0 => {}
                            1 => {
                                saga.compensation_failed("no", tick()).unwrap();
                            }
                            _ => {
                                saga.compensation_succeeded(tick()).unwrap();
                            }
                        }
                    }
                    NextAction::Finished(status) => {
                        prop_assert_eq!(status, saga.status());
                        break;
                    }
                }
            }
            prop_assert!(saga.is_finished());
            prop_assert_eq!(saga.status() == SagaStatus::Completed, !failed);
            if saga.status() == SagaStatus::Compensated {
                prop_assert!(
                    saga.steps().iter().all(|s| !matches!(s.status(), StepStatus::Succeeded | StepStatus::Uncertain)),
                    "a compensated saga left an effect behind"
                );
            }
            assert_shape(&saga);
            assert_history(&saga);
        }

        /// However an action's attempts end, an outcome that may have taken
        /// effect is never recorded as "did not happen": the step fails only
        /// on a definite refusal, or a transient refusal of its only attempt;
        /// otherwise it is retried within its limits, then compensated.
        #[test]
        fn unknown_outcomes_are_never_taken_as_failures(
            failures in prop::collection::vec(
                prop_oneof![Just(AttemptFailure::Refused), Just(AttemptFailure::Transient), Just(AttemptFailure::Unknown)],
                1..12,
            ),
            succeeds_at in prop::option::of(0..12usize),
            max_attempts in 0..6u32,
            within in prop::option::of(1..20i64),
            restart_at in prop::option::of(0..12usize),
        ) {
            let mut saga = saga(2);
            succeed(&mut saga, 1);
            let mut limits = AttemptLimits::attempts(max_attempts);
            if let Some(secs) = within {
                limits = limits.within(std::time::Duration::from_secs(secs as u64));
            }
            let mut clock = 10;
            let mut maybe_effect = false;
            let mut resolved = None;
            for (attempt, failure) in failures.iter().copied().enumerate() {
                clock += 3;
                saga.step_started(at(clock)).unwrap();
                if restart_at == Some(attempt) {
                    // The process died during the attempt: its outcome is unknown.
                    saga = SagaInstance::replay(saga.history().to_vec()).unwrap();
                    maybe_effect = true;
                    continue;
                }
                if succeeds_at == Some(attempt) {
                    saga.step_succeeded(None, at(clock)).unwrap();
                    resolved = Some(StepStatus::Succeeded);
                    break;
                }
                let first = saga.step_first_started_at(1).unwrap();
                let decision = saga.resolve_failure(failure, limits, at(clock));
                let attempts = saga.steps()[1].attempts();
                let exhausted = attempts >= max_attempts.max(1)
                    || within.is_some_and(|w| (at(clock) - first).whole_seconds() >= w);
                match decision {
                    Resolution::Retry => {
                        prop_assert!(failure != AttemptFailure::Refused && !exhausted);
                    }
                    Resolution::Fail => {
                        prop_assert!(
                            failure == AttemptFailure::Refused
                                || (failure == AttemptFailure::Transient && attempts == 1),
                            "{failure:?} after {attempts} attempts taken as no effect"
                        );
                        saga.step_failed("no", at(clock)).unwrap();
                        resolved = Some(StepStatus::Failed);
                        break;
                    }
                    Resolution::Uncertain => {
                        prop_assert!(failure != AttemptFailure::Refused && exhausted);
                        prop_assert!(failure == AttemptFailure::Unknown || attempts > 1 || maybe_effect);
                        saga.step_uncertain("unknown", at(clock)).unwrap();
                        resolved = Some(StepStatus::Uncertain);
                        break;
                    }
                }
                maybe_effect |= failure == AttemptFailure::Unknown;
            }
            match resolved {
                Some(StepStatus::Uncertain) => {
                    // The uncertain step is compensated first, then the one before.
                    prop_assert_eq!(saga.next_action(), NextAction::CompensateStep(1));
                    for _ in 0..2 {
                        saga.compensation_started(at(90)).unwrap();
                        saga.compensation_succeeded(at(91)).unwrap();
                    }
                    prop_assert_eq!(saga.status(), SagaStatus::Compensated);
                    prop_assert_eq!(saga.steps()[1].status(), StepStatus::Compensated);
                }
                Some(StepStatus::Failed) => {
                    prop_assert_eq!(saga.next_action(), NextAction::CompensateStep(0));
                }
                Some(_) => prop_assert_eq!(saga.status(), SagaStatus::Completed),
                None => prop_assert_eq!(saga.next_action(), NextAction::RunStep(1)),
            }
            prop_assert_eq!(&SagaInstance::replay(saga.history().to_vec()).unwrap(), &saga);
        }
    }

    #[test]
    fn an_uncertain_step_is_compensated_as_if_it_succeeded() {
        let mut saga = saga(3);
        succeed(&mut saga, 1);
        saga.step_started(at(3)).unwrap();
        let limits = AttemptLimits::attempts(2);
        assert_eq!(
            saga.resolve_failure(AttemptFailure::Unknown, limits, at(4)),
            Resolution::Retry
        );
        saga.step_started(at(5)).unwrap();
        assert_eq!(
            saga.resolve_failure(AttemptFailure::Transient, limits, at(6)),
            Resolution::Uncertain,
            "the first attempt may have taken effect"
        );
        assert_eq!(
            saga.resolve_failure(AttemptFailure::Refused, limits, at(6)),
            Resolution::Fail,
            "a definite no for the same key"
        );
        saga.step_uncertain("timed out", at(6)).unwrap();
        assert_eq!(saga.steps()[1].status(), StepStatus::Uncertain);
        assert_eq!(saga.steps()[1].error(), Some("timed out"));
        assert_eq!(saga.next_action(), NextAction::CompensateStep(1));
        saga.compensation_started(at(7)).unwrap();
        saga.compensation_succeeded(at(8)).unwrap();
        assert_eq!(saga.next_action(), NextAction::CompensateStep(0));
        let value = serde_json::to_value(&saga.history()[5]).unwrap();
        assert_eq!(value["type"], "step_uncertain");
    }

    #[test]
    fn the_time_bound_counts_from_the_first_recorded_attempt() {
        let mut saga = saga(1);
        saga.step_started(at(0)).unwrap();
        let limits = AttemptLimits::attempts(100).within(std::time::Duration::from_secs(30));
        assert_eq!(
            saga.resolve_failure(AttemptFailure::Unknown, limits, at(29)),
            Resolution::Retry
        );
        saga.step_started(at(29)).unwrap();
        let saga = SagaInstance::replay(saga.history().to_vec()).unwrap();
        assert_eq!(
            saga.resolve_failure(AttemptFailure::Unknown, limits, at(30)),
            Resolution::Uncertain
        );
    }
}
