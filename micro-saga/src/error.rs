//! The error type of this crate.

use crate::log::LogError;
use crate::state::SagaStatus;

/// A `Result` whose error defaults to [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a saga could not be started, driven or queried, a transition was
/// refused, or a history could not be replayed.
///
/// A refused transition leaves the saga unchanged. Errors from the saga's own
/// state are deterministic, so retrying the same transition fails the same way
/// (see [`Error::is_retryable`]); a refused transition during replay means the
/// log does not belong to a saga this state machine could have produced. An
/// error of the saga log ([`Error::Log`]) may be worth a retry.
///
/// A step's own failure is not an `Error`: it is recorded in the saga (see
/// [`StepError`](crate::StepError)), which then compensates.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The saga's id, definition name or step list is unusable.
    #[error("invalid saga definition: {reason}")]
    #[non_exhaustive]
    InvalidDefinition {
        /// What is wrong.
        reason: String,
    },

    /// A `started` transition was applied to a saga that has already started.
    #[error("saga has already started")]
    AlreadyStarted,

    /// The saga has finished and accepts no transitions.
    #[error("saga is {status} and accepts no transitions")]
    #[non_exhaustive]
    Finished {
        /// The saga's terminal status.
        status: SagaStatus,
    },

    /// The transition is not allowed in the saga's status, such as a
    /// compensation while the saga is running.
    #[error("transition `{transition}` is not allowed while the saga is {status}")]
    #[non_exhaustive]
    NotAllowed {
        /// The refused transition's name.
        transition: &'static str,
        /// The saga's status.
        status: SagaStatus,
    },

    /// The transition names another step than the one whose turn it is;
    /// compensations, in particular, must run in reverse order of the
    /// completed steps.
    #[error("transition `{transition}` names step {found}, but it is step {expected}'s turn")]
    #[non_exhaustive]
    WrongStep {
        /// The refused transition's name.
        transition: &'static str,
        /// The step whose turn it is.
        expected: usize,
        /// The step the transition names.
        found: usize,
    },

    /// An outcome was recorded for a step, or a step's compensation, that had
    /// not been started.
    #[error("transition `{transition}` for step {step}, which has not been started")]
    #[non_exhaustive]
    NotStarted {
        /// The refused transition's name.
        transition: &'static str,
        /// The step.
        step: usize,
    },

    /// The saga cannot be aborted while a step's action is in flight: its
    /// outcome must be recorded first.
    #[error("cannot abort while step {step} is running")]
    #[non_exhaustive]
    StepInFlight {
        /// The running step.
        step: usize,
    },

    /// A history to replay was empty.
    #[error("saga history is empty")]
    EmptyHistory,

    /// A history to replay does not begin with a `started` transition.
    #[error("saga history does not begin with `started`")]
    MissingStart,

    /// A transition in a history to replay was refused.
    #[error("transition {index} of the saga history was refused")]
    #[non_exhaustive]
    Replay {
        /// The transition's position in the history, from 0.
        index: usize,
        /// Why it was refused.
        #[source]
        source: Box<Error>,
    },

    /// The saga log failed, or refused a write (another orchestrator moved
    /// the saga first, say).
    #[error("saga log error")]
    Log(#[from] LogError),

    /// No definition of this name is registered with the orchestrator, so its
    /// sagas can be neither started nor resumed.
    #[error("no saga definition named `{name}` is registered")]
    #[non_exhaustive]
    UnknownDefinition {
        /// The definition's name.
        name: String,
    },

    /// A saga in the log does not match the registered definition of its
    /// name: its steps differ.
    #[error("saga `{saga_id}` does not match definition `{definition}`: {reason}")]
    #[non_exhaustive]
    DefinitionMismatch {
        /// The saga's id.
        saga_id: String,
        /// The definition's name.
        definition: String,
        /// What differs.
        reason: String,
    },

    /// The orchestrator's configuration is unusable (a zero lease ttl, say).
    #[error("invalid orchestrator configuration: {reason}")]
    #[non_exhaustive]
    Config {
        /// What is wrong.
        reason: String,
    },

    /// The saga's context could not be written to, or read from, JSON.
    #[error("saga context could not be encoded or decoded")]
    Context(#[source] serde_json::Error),

    /// The task driving the saga stopped before the saga finished: it
    /// panicked, or its runtime shut down. The saga log still holds the saga,
    /// and [`Orchestrator::recover`](crate::Orchestrator::recover) resumes it.
    #[error("the task driving saga `{saga_id}` stopped before the saga finished")]
    #[non_exhaustive]
    Interrupted {
        /// The saga's id.
        saga_id: String,
    },
}

impl Error {
    /// Whether trying the same operation again could succeed.
    ///
    /// `false` for errors of the saga state machine, which is deterministic,
    /// so a refused transition is refused again; the saga log's answer for
    /// [`Error::Log`] (see [`LogError::is_retryable`]); `true` for
    /// [`Error::Interrupted`], since the saga can be resumed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Log(err) => err.is_retryable(),
            Error::Interrupted { .. } => true,
            _ => false,
        }
    }
}

impl micro_core::error::Retryable for Error {
    fn is_retryable(&self) -> bool {
        Error::is_retryable(self)
    }
}
