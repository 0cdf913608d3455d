//! Transitions: the records of a saga log.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;

/// One change in the life of a saga, as written to the saga log.
///
/// A saga's whole state is the fold of its transitions: the first is always
/// [`Transition::Started`], and [`SagaInstance::replay`] rebuilds the instance
/// from the list. Each transition carries the time it happened (given by the
/// caller, so replay is deterministic) and, for failures, the error or reason.
///
/// Steps are named by their index in the saga's definition; `Started` records
/// the step names so that a log can be read, and checked against the
/// definition, on its own.
///
/// In JSON a transition is an object whose `type` member is its
/// [`name`](Self::name), with times in RFC 3339:
///
/// ```json
/// {"type":"step_failed","step":1,"error":"out of stock","at":"2024-05-01T10:00:00Z"}
/// ```
///
/// [`SagaInstance::replay`]: crate::SagaInstance::replay
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Transition {
    /// The saga began; its first step is next.
    Started {
        /// The saga instance's id.
        saga_id: String,
        /// The name of the saga's definition, such as `"place-order"`.
        definition: String,
        /// The names of the steps, in the order they run.
        steps: Vec<String>,
        /// When it happened.
        #[serde(with = "time::serde::rfc3339")]
        at: OffsetDateTime,
    },
    /// An attempt at a step's action began. It is recorded again for each
    /// retry, and when a recovered saga resumes a step whose outcome was never
    /// recorded.
    StepStarted {
        /// The step's index.
        step: usize,
        /// When it happened.
        #[serde(with = "time::serde::rfc3339")]
        at: OffsetDateTime,
    },
    /// A step's action took effect; the next step follows, or the saga is
    /// complete.
    StepSucceeded {
        /// The step's index.
        step: usize,
        /// What the action returned that its compensation will need (a payment
        /// id, say).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        output: Option<Value>,
        /// When it happened.
        #[serde(with = "time::serde::rfc3339")]
        at: OffsetDateTime,
    },
    /// A step's action failed for good, without lasting effect; compensation
    /// of the steps that succeeded begins.
    ///
    /// Only a definite refusal by the participant is recorded so: an action
    /// whose outcome is unknown (a timeout, a connection lost after the
    /// command was sent) has not failed in this sense. It is started again,
    /// which its idempotency key makes safe, until the participant answers
    /// definitely; if it never does, the step ends [`StepUncertain`](Self::StepUncertain).
    StepFailed {
        /// The step's index.
        step: usize,
        /// Why it failed.
        error: String,
        /// When it happened.
        #[serde(with = "time::serde::rfc3339")]
        at: OffsetDateTime,
    },
    /// A step's action may have taken effect, but no attempt got a definite
    /// answer within the step's limits (attempts, total time): the step is
    /// treated as if it succeeded, and compensation begins with it. Its
    /// compensation gets no output and must tolerate "nothing to undo".
    StepUncertain {
        /// The step's index.
        step: usize,
        /// The last attempt's error.
        error: String,
        /// When it happened.
        #[serde(with = "time::serde::rfc3339")]
        at: OffsetDateTime,
    },
    /// The saga was abandoned between steps (an order cancelled while being
    /// placed, say); compensation of the steps that succeeded begins.
    Aborted {
        /// Why it was abandoned.
        reason: String,
        /// When it happened.
        #[serde(with = "time::serde::rfc3339")]
        at: OffsetDateTime,
    },
    /// An attempt at a step's compensation began; recorded again for each
    /// retry.
    CompensationStarted {
        /// The step's index.
        step: usize,
        /// When it happened.
        #[serde(with = "time::serde::rfc3339")]
        at: OffsetDateTime,
    },
    /// A step's compensation took effect; the previous completed step is
    /// compensated next, or the saga is compensated.
    CompensationSucceeded {
        /// The step's index.
        step: usize,
        /// When it happened.
        #[serde(with = "time::serde::rfc3339")]
        at: OffsetDateTime,
    },
    /// A step's compensation failed for good; the saga needs attention.
    CompensationFailed {
        /// The step's index.
        step: usize,
        /// Why it failed.
        error: String,
        /// When it happened.
        #[serde(with = "time::serde::rfc3339")]
        at: OffsetDateTime,
    },
}

impl Transition {
    /// The transition's name in snake case, as in its JSON `type` member.
    pub fn name(&self) -> &'static str {
        match self {
            Transition::Started { .. } => "started",
            Transition::StepStarted { .. } => "step_started",
            Transition::StepSucceeded { .. } => "step_succeeded",
            Transition::StepFailed { .. } => "step_failed",
            Transition::StepUncertain { .. } => "step_uncertain",
            Transition::Aborted { .. } => "aborted",
            Transition::CompensationStarted { .. } => "compensation_started",
            Transition::CompensationSucceeded { .. } => "compensation_succeeded",
            Transition::CompensationFailed { .. } => "compensation_failed",
        }
    }

    /// When the transition happened.
    pub fn at(&self) -> OffsetDateTime {
        match self {
            Transition::Started { at, .. }
            | Transition::StepStarted { at, .. }
            | Transition::StepSucceeded { at, .. }
            | Transition::StepFailed { at, .. }
            | Transition::StepUncertain { at, .. }
            | Transition::Aborted { at, .. }
            | Transition::CompensationStarted { at, .. }
            | Transition::CompensationSucceeded { at, .. }
            | Transition::CompensationFailed { at, .. } => *at,
        }
    }

    /// The index of the step the transition is about, if it is about one.
    pub fn step(&self) -> Option<usize> {
        match self {
            Transition::StepStarted { step, .. }
            | Transition::StepSucceeded { step, .. }
            | Transition::StepFailed { step, .. }
            | Transition::StepUncertain { step, .. }
            | Transition::CompensationStarted { step, .. }
            | Transition::CompensationSucceeded { step, .. }
            | Transition::CompensationFailed { step, .. } => Some(*step),
            Transition::Started { .. } | Transition::Aborted { .. } => None,
        }
    }

    /// The error or reason the transition records, if any.
    pub fn reason(&self) -> Option<&str> {
        match self {
            Transition::StepFailed { error, .. }
            | Transition::StepUncertain { error, .. }
            | Transition::CompensationFailed { error, .. } => Some(error),
            Transition::Aborted { reason, .. } => Some(reason),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use time::macros::datetime;

    use super::*;

    #[test]
    fn json_form_is_tagged_with_rfc3339_times() {
        let t = Transition::StepFailed {
            step: 1,
            error: "out of stock".into(),
            at: datetime!(2024-05-01 10:00 UTC),
        };
        let value = serde_json::to_value(&t).unwrap();
        assert_eq!(
            value,
            json!({"type": "step_failed", "step": 1, "error": "out of stock", "at": "2024-05-01T10:00:00Z"})
        );
        assert_eq!(serde_json::from_value::<Transition>(value).unwrap(), t);
    }

    #[test]
    fn output_is_optional_in_json() {
        let t: Transition = serde_json::from_value(
            json!({"type": "step_succeeded", "step": 0, "at": "2024-05-01T10:00:00+02:00"}),
        )
        .unwrap();
        assert_eq!(
            t,
            Transition::StepSucceeded {
                step: 0,
                output: None,
                at: datetime!(2024-05-01 08:00 UTC),
            }
        );
        let with_output = Transition::StepSucceeded {
            step: 0,
            output: Some(json!({"payment_id": "p-1"})),
            at: datetime!(2024-05-01 08:00 UTC),
        };
        let text = serde_json::to_string(&with_output).unwrap();
        assert_eq!(
            serde_json::from_str::<Transition>(&text).unwrap(),
            with_output
        );
    }

    #[test]
    fn accessors() {
        let at = datetime!(2024-05-01 10:00 UTC);
        let t = Transition::Aborted {
            reason: "cancelled by customer".into(),
            at,
        };
        assert_eq!(t.name(), "aborted");
        assert_eq!(t.at(), at);
        assert_eq!(t.step(), None);
        assert_eq!(t.reason(), Some("cancelled by customer"));
        let t = Transition::CompensationStarted { step: 3, at };
        assert_eq!(t.step(), Some(3));
        assert_eq!(t.reason(), None);
        assert_eq!(serde_json::to_value(&t).unwrap()["type"], json!(t.name()));
    }
}
