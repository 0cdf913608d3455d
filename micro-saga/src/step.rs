//! What a step sees and returns: its context, its output and its error.

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use micro_core::error::{is_retryable, BoxError, Permanent, Retryable, Transient};
use micro_core::trace::TraceContext;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

/// Which half of a step runs: its action, or the compensation that undoes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    /// The step's action, run forward.
    Action,
    /// The step's compensation, run when a later step failed.
    Compensation,
}

impl Phase {
    /// The phase in snake case: `"action"` or `"compensation"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Action => "action",
            Phase::Compensation => "compensation",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The idempotency key of one step's action or compensation in one saga:
/// `"{saga_id}:{step}:{phase}"`.
///
/// It is the same for every attempt, and after a restart, so a service that
/// honours it (micro-core's client sends it with
/// [`idempotency_key`](micro_core::client::RequestBuilder::idempotency_key))
/// gives a command sent twice one effect. Keep saga ids and step names to
/// visible ASCII so that the key is a valid header value.
///
/// ```
/// use micro_saga::{idempotency_key, Phase};
///
/// assert_eq!(
///     idempotency_key("order-42", "charge-payment", Phase::Compensation),
///     "order-42:charge-payment:compensation"
/// );
/// ```
pub fn idempotency_key(saga_id: &str, step: &str, phase: Phase) -> String {
    format!("{saga_id}:{step}:{phase}")
}

/// What a step's action or compensation receives.
///
/// It names the saga and the step, counts the attempt, carries the
/// [idempotency key](Self::idempotency_key) to send with the step's command,
/// the saga's typed context and, for a compensation, what the action
/// returned.
#[derive(Debug, Clone)]
pub struct StepContext<C> {
    pub(crate) saga_id: Arc<str>,
    pub(crate) definition: Arc<str>,
    pub(crate) step: Arc<str>,
    pub(crate) index: usize,
    pub(crate) phase: Phase,
    pub(crate) attempt: u32,
    pub(crate) idempotency_key: String,
    pub(crate) trace: TraceContext,
    pub(crate) data: C,
    pub(crate) output: Option<Value>,
}

impl<C> StepContext<C> {
    /// The saga's id.
    pub fn saga_id(&self) -> &str {
        &self.saga_id
    }

    /// The name of the saga's definition.
    pub fn definition(&self) -> &str {
        &self.definition
    }

    /// The step's name.
    pub fn step(&self) -> &str {
        &self.step
    }

    /// The step's position in the definition, from 0.
    pub fn step_index(&self) -> usize {
        self.index
    }

    /// Whether this is the step's action or its compensation.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Which attempt this is, from 1, counted over the saga's whole life
    /// (attempts made before a crash included).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The key to send with the step's command; see [`idempotency_key`].
    pub fn idempotency_key(&self) -> &str {
        &self.idempotency_key
    }

    /// The trace context of this attempt, a child of the saga's; the step
    /// also runs inside its [`scope`](TraceContext::scope), so micro-core's
    /// client propagates it.
    pub fn trace(&self) -> TraceContext {
        self.trace
    }

    /// The saga's context, as the previous steps left it.
    pub fn data(&self) -> &C {
        &self.data
    }

    /// Takes the saga's context, to return an updated one in
    /// [`StepOutput::with_context`].
    pub fn into_data(self) -> C {
        self.data
    }

    /// For a compensation, what the step's action returned
    /// ([`StepOutput::output`]); `None` for an action.
    pub fn output(&self) -> Option<&Value> {
        self.output.as_ref()
    }

    /// Decodes what the step's action returned.
    ///
    /// # Errors
    ///
    /// A permanent [`StepError`] when there is no output or it does not
    /// decode as `T`.
    pub fn output_as<T: DeserializeOwned>(&self) -> Result<T, StepError> {
        let value = self.output.clone().ok_or_else(|| {
            StepError::permanent(format!("step `{}` recorded no output", self.step))
        })?;
        serde_json::from_value(value).map_err(StepError::permanent)
    }
}

/// What a step's action returns when it takes effect: an output kept in the
/// saga log for its compensation (a payment id, say), and optionally an
/// updated saga context.
#[derive(Debug, Clone, PartialEq)]
pub struct StepOutput<C> {
    pub(crate) output: Option<Value>,
    pub(crate) context: Option<C>,
}

impl<C> StepOutput<C> {
    /// No output, context unchanged.
    pub fn empty() -> Self {
        StepOutput {
            output: None,
            context: None,
        }
    }

    /// Records `value` as the step's output.
    pub fn value(value: Value) -> Self {
        StepOutput {
            output: Some(value),
            context: None,
        }
    }

    /// Records `value`, encoded as JSON, as the step's output.
    ///
    /// # Errors
    ///
    /// A permanent [`StepError`] when `value` does not encode.
    pub fn json<T: Serialize + ?Sized>(value: &T) -> Result<Self, StepError> {
        serde_json::to_value(value)
            .map(Self::value)
            .map_err(StepError::permanent)
    }

    /// Replaces the saga's context with `context` once the step's success is
    /// recorded; the log keeps the new context with that transition.
    pub fn with_context(mut self, context: C) -> Self {
        self.context = Some(context);
        self
    }

    /// The recorded output.
    pub fn output(&self) -> Option<&Value> {
        self.output.as_ref()
    }

    /// The updated context, if any.
    pub fn context(&self) -> Option<&C> {
        self.context.as_ref()
    }
}

impl<C> Default for StepOutput<C> {
    fn default() -> Self {
        Self::empty()
    }
}

/// A step's failure, and whether trying the step again may help.
///
/// A retryable error is retried with backoff, with the same idempotency key,
/// up to the step's [`max_attempts`](crate::StepPolicy::max_attempts); a
/// permanent one fails the step at once (for an action: the saga
/// compensates; for a compensation: the saga needs attention).
///
/// `?` converts any error: micro-core's
/// [`is_retryable`](micro_core::error::is_retryable) decides whether it is
/// retryable, so a reset connection or a client error with a 503 is retried
/// and a 4xx or an unknown error is not. Say it yourself with
/// [`StepError::retryable`] and [`StepError::permanent`].
///
/// Like `anyhow::Error`, `StepError` does not implement
/// [`std::error::Error`] itself (that is what lets `?` convert every error);
/// [`as_error`](Self::as_error) and `BoxError::from` give the error it holds,
/// whose verdict [`is_retryable`](micro_core::error::is_retryable) reads.
pub struct StepError {
    inner: BoxError,
    retryable: bool,
    timed_out: bool,
    outcome_unknown: bool,
}

impl StepError {
    /// A failure worth another attempt.
    pub fn retryable(err: impl Into<BoxError>) -> Self {
        StepError {
            inner: Box::new(Transient::new(err)),
            retryable: true,
            timed_out: false,
            outcome_unknown: false,
        }
    }

    /// An attempt without a definite answer: the command may have taken
    /// effect (the connection was lost after it was sent, the participant
    /// answered `504`, say). It is retried with the same idempotency key
    /// and, if no attempt gets a definite answer, the step is compensated as
    /// if it succeeded; see [`SagaInstance::resolve_failure`](crate::SagaInstance::resolve_failure).
    pub fn unknown(err: impl Into<BoxError>) -> Self {
        StepError {
            inner: Box::new(Transient::new(err)),
            retryable: true,
            timed_out: false,
            outcome_unknown: true,
        }
    }

    /// A failure for good: the step is not tried again.
    pub fn permanent(err: impl Into<BoxError>) -> Self {
        StepError {
            inner: Box::new(Permanent::new(err)),
            retryable: false,
            timed_out: false,
            outcome_unknown: false,
        }
    }

    /// Wraps `err`, retryable if micro-core's
    /// [`is_retryable`](micro_core::error::is_retryable) says so.
    pub fn from_boxed(err: BoxError) -> Self {
        let retryable = is_retryable(&*err);
        StepError {
            inner: err,
            retryable,
            timed_out: false,
            outcome_unknown: false,
        }
    }

    pub(crate) fn timed_out(timeout: Duration) -> Self {
        StepError {
            inner: Box::new(Transient::new(StepTimedOut { timeout })),
            retryable: true,
            timed_out: true,
            outcome_unknown: true,
        }
    }

    /// Whether another attempt may succeed.
    pub fn is_retryable(&self) -> bool {
        self.retryable
    }

    /// Whether the attempt ran out of time (its outcome is unknown). Such an
    /// error is retryable.
    pub fn is_timeout(&self) -> bool {
        self.timed_out
    }

    /// Whether the attempt's outcome is unknown: it timed out, or was made
    /// with [`StepError::unknown`].
    pub fn is_outcome_unknown(&self) -> bool {
        self.outcome_unknown
    }

    /// The attempt's failure as the state machine classifies it.
    pub fn failure(&self) -> crate::AttemptFailure {
        if self.outcome_unknown {
            crate::AttemptFailure::Unknown
        } else if self.retryable {
            crate::AttemptFailure::Transient
        } else {
            crate::AttemptFailure::Refused
        }
    }

    /// The error this holds.
    pub fn as_error(&self) -> &(dyn StdError + Send + Sync + 'static) {
        &*self.inner
    }

    /// The error this holds, boxed.
    pub fn into_inner(self) -> BoxError {
        self.inner
    }

    /// The error and its causes, joined by `": "`, as the saga log records
    /// it.
    pub(crate) fn chain_message(&self) -> String {
        let mut message = self.inner.to_string();
        let mut source = self.inner.source();
        while let Some(err) = source {
            let text = err.to_string();
            // Transparent wrappers repeat their cause's message.
            if !message.ends_with(&text) {
                message.push_str(": ");
                message.push_str(&text);
            }
            source = err.source();
        }
        message
    }
}

impl<E> From<E> for StepError
where
    E: StdError + Send + Sync + 'static,
{
    fn from(err: E) -> Self {
        StepError::from_boxed(Box::new(err))
    }
}

impl From<StepError> for BoxError {
    fn from(err: StepError) -> Self {
        err.inner
    }
}

impl Retryable for StepError {
    fn is_retryable(&self) -> bool {
        self.retryable
    }
}

impl fmt::Debug for StepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StepError")
            .field("error", &self.inner)
            .field("retryable", &self.retryable)
            .field("timed_out", &self.timed_out)
            .field("outcome_unknown", &self.outcome_unknown)
            .finish()
    }
}

impl fmt::Display for StepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.inner, f)
    }
}

/// The error of a step attempt that ran past its
/// [timeout](crate::StepPolicy::timeout); retryable.
#[derive(Debug, Clone, thiserror::Error)]
#[error("step timed out after {timeout:?}")]
pub struct StepTimedOut {
    timeout: Duration,
}

impl StepTimedOut {
    /// The timeout that elapsed.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}

impl Retryable for StepTimedOut {
    fn is_retryable(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use std::io;

    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("card declined")]
    struct Declined;

    fn convert<E: StdError + Send + Sync + 'static>(err: E) -> StepError {
        let result: Result<(), StepError> = (|| Err(err)?)();
        result.unwrap_err()
    }

    #[test]
    fn question_mark_classifies_with_micro_core() {
        assert!(convert(io::Error::from(io::ErrorKind::ConnectionReset)).is_retryable());
        assert!(!convert(io::Error::from(io::ErrorKind::NotFound)).is_retryable());
        assert!(!convert(Declined).is_retryable());
        assert_eq!(convert(Declined).to_string(), "card declined");
    }

    #[test]
    fn markers_are_visible_to_is_retryable() {
        let err = StepError::retryable(Declined);
        assert!(err.is_retryable());
        assert!(is_retryable(err.as_error()));
        let err = StepError::permanent(io::Error::from(io::ErrorKind::ConnectionReset));
        assert!(!err.is_retryable());
        assert!(!is_retryable(&*BoxError::from(err)));
        let err = StepError::timed_out(Duration::from_secs(2));
        assert!(err.is_retryable() && err.is_timeout());
        assert!(is_retryable(err.as_error()));
        assert_eq!(err.to_string(), "step timed out after 2s");
        assert_eq!(err.failure(), crate::AttemptFailure::Unknown);
        let err = StepError::unknown(Declined);
        assert!(err.is_retryable() && err.is_outcome_unknown() && !err.is_timeout());
        assert_eq!(
            StepError::retryable(Declined).failure(),
            crate::AttemptFailure::Transient
        );
        assert_eq!(
            StepError::permanent(Declined).failure(),
            crate::AttemptFailure::Refused
        );
    }

    #[derive(Debug, thiserror::Error)]
    #[error("charging failed")]
    struct Outer(#[source] Declined);

    #[test]
    fn the_log_message_keeps_the_causes() {
        let err = StepError::permanent(Outer(Declined));
        assert_eq!(err.chain_message(), "charging failed: card declined");
        assert_eq!(
            StepError::permanent("plain").chain_message(),
            "plain",
            "a transparent marker adds nothing"
        );
    }

    #[test]
    fn output_round_trips() {
        let out = StepOutput::<()>::json(&serde_json::json!({"payment_id": "p-1"})).unwrap();
        let cx = StepContext {
            saga_id: "s".into(),
            definition: "d".into(),
            step: "charge".into(),
            index: 0,
            phase: Phase::Compensation,
            attempt: 1,
            idempotency_key: idempotency_key("s", "charge", Phase::Compensation),
            trace: TraceContext::new_root(),
            data: (),
            output: out.output.clone(),
        };
        let value: serde_json::Value = cx.output_as().unwrap();
        assert_eq!(value["payment_id"], "p-1");
        assert!(cx.output_as::<u32>().is_err());
        let none = StepContext { output: None, ..cx };
        let err = none.output_as::<String>().unwrap_err();
        assert!(!err.is_retryable());
        assert!(err.to_string().contains("no output"), "{err}");
    }
}
