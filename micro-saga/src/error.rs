//! The error type of this crate.

use crate::state::SagaStatus;

/// A `Result` whose error defaults to [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a saga could not be started, a transition was refused, or a history
/// could not be replayed.
///
/// A refused transition leaves the saga unchanged. These errors come from the
/// saga's own state, so retrying the same transition fails the same way (see
/// [`Error::is_retryable`]); a refused transition during replay means the log
/// does not belong to a saga this state machine could have produced.
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
}

impl Error {
    /// Whether trying the same operation again could succeed.
    ///
    /// Always `false`: the saga state machine is deterministic, so a refused
    /// transition is refused again.
    pub fn is_retryable(&self) -> bool {
        false
    }
}
