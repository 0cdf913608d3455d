//! Steps that send a command event and wait for the reply event.
//!
//! Some services take their orders from the event bus: the order saga
//! publishes `ChargePayment` and the payment service answers with
//! `PaymentProcessed` or `PaymentFailed`. [`RequestReply`] turns that
//! exchange into an awaitable call for a step's action or compensation:
//!
//! 1. it registers a waiter under the step's
//!    [idempotency key](crate::StepContext::idempotency_key), which is the
//!    command's [`correlation_id`](Command::correlation_id);
//! 2. it sends the [`Command`] through your [`CommandSender`] (a publisher to
//!    the bus, in practice);
//! 3. your reply consumer hands each reply event to
//!    [`RequestReply::deliver`], which wakes the waiter with the same
//!    correlation id;
//! 4. no reply within the timeout is a retryable [`RequestError::TimedOut`]:
//!    the step's policy sends the command again, with the same correlation
//!    id, and the service, which deduplicates by that id, answers again
//!    without acting twice. The same holds after a crash: the resumed step
//!    sends the command again. The step policy's
//!    [`timeout`](crate::StepPolicy::timeout) is the durable timer: after a
//!    restart, the attempt that was waiting is carried on only until its
//!    deadline as the saga log recorded it (its start plus that timeout), and
//!    one whose deadline passed while the process was down has timed out. The
//!    timeout given to [`RequestReply::new`] is in memory and restarts with
//!    the resent command, so keep it below the step's.
//!
//! This module knows no event bus: a [`CommandSender`] is one method, and
//! replies come in through [`deliver`](RequestReply::deliver), so any
//! publisher and subscriber can be wired to it.
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//!
//! use micro_saga::reply::{Command, CommandSender, Reply, RequestReply};
//! use micro_saga::{BoxFuture, MemorySagaLog, Orchestrator, SagaDefinition, SagaStatus, StepOutput};
//!
//! /// Stands for the bus and the payment service: answers every command.
//! struct PaymentService(std::sync::OnceLock<RequestReply>);
//!
//! impl CommandSender for PaymentService {
//!     fn send<'a>(
//!         &'a self,
//!         command: &'a Command,
//!     ) -> BoxFuture<'a, Result<(), micro_core::error::BoxError>> {
//!         let replies = self.0.get().unwrap().clone();
//!         let reply = Reply::succeeded(&command.correlation_id, serde_json::json!({"payment": "p-1"}));
//!         Box::pin(async move {
//!             tokio::spawn(async move { replies.deliver(reply) });
//!             Ok(())
//!         })
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), micro_saga::Error> {
//! let service = Arc::new(PaymentService(Default::default()));
//! let payments = RequestReply::new(service.clone(), Duration::from_secs(5));
//! service.0.set(payments.clone()).unwrap();
//!
//! let charge = payments.clone();
//! let saga = SagaDefinition::<u64>::builder("place-order")
//!     .pivot("charge-payment", move |cx| {
//!         let payments = charge.clone();
//!         async move {
//!             let cents = *cx.data();
//!             let reply = payments
//!                 .request(&cx, "ChargePayment", serde_json::json!({ "cents": cents }))
//!                 .await?;
//!             Ok(StepOutput::value(reply))
//!         }
//!     })
//!     .build()?;
//! let orchestrator = Orchestrator::builder(Arc::new(MemorySagaLog::new()))
//!     .definition(&saga)
//!     .build()?;
//! let done = orchestrator.run(&saga, "order-1", 4200).await?;
//! assert_eq!(done.status(), SagaStatus::Completed);
//! assert_eq!(done.steps()[0].output(), Some(&serde_json::json!({"payment": "p-1"})));
//! # Ok(())
//! # }
//! ```

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use micro_core::error::{is_retryable, BoxError};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::oneshot;

use crate::definition::BoxFuture;
use crate::step::{StepContext, StepError};

/// Sends commands: a publisher to the event bus, in practice.
pub trait CommandSender: Send + Sync + 'static {
    /// Sends `command`. Returning `Ok` means it is on its way (the bus has
    /// it), not that it was handled.
    ///
    /// # Errors
    ///
    /// Any failure to send; the step retries it when micro-core's
    /// [`is_retryable`] says so.
    fn send<'a>(&'a self, command: &'a Command) -> BoxFuture<'a, Result<(), BoxError>>;
}

impl<T: CommandSender + ?Sized> CommandSender for Arc<T> {
    fn send<'a>(&'a self, command: &'a Command) -> BoxFuture<'a, Result<(), BoxError>> {
        (**self).send(command)
    }
}

/// A command a step sends to a service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Command {
    /// The step's idempotency key: the service deduplicates by it, and puts
    /// it in its reply.
    pub correlation_id: String,
    /// The saga's id, the event's key on the bus (so a saga's commands keep
    /// their order).
    pub saga_id: String,
    /// The step's name.
    pub step: String,
    /// The attempt, from 1.
    pub attempt: u32,
    /// What is asked, such as `"ChargePayment"`: the event's type.
    pub kind: String,
    /// The command's data.
    pub payload: Value,
    /// The W3C `traceparent` of the step, for the event's headers.
    pub trace_parent: String,
}

/// A service's reply to a [`Command`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Reply {
    /// The [`Command::correlation_id`] it answers.
    pub correlation_id: String,
    /// What came of the command.
    pub outcome: ReplyOutcome,
}

/// What came of a [`Command`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
#[non_exhaustive]
pub enum ReplyOutcome {
    /// It took effect; the value is the step's output.
    Succeeded {
        /// What the service answered.
        payload: Value,
    },
    /// It did not take effect.
    Failed {
        /// Why.
        reason: String,
        /// Whether sending it again may succeed.
        retryable: bool,
    },
}

impl Reply {
    /// A reply saying the command took effect.
    pub fn succeeded(correlation_id: impl Into<String>, payload: Value) -> Self {
        Reply {
            correlation_id: correlation_id.into(),
            outcome: ReplyOutcome::Succeeded { payload },
        }
    }

    /// A reply saying the command failed, and whether it is worth sending
    /// again.
    pub fn failed(
        correlation_id: impl Into<String>,
        reason: impl Into<String>,
        retryable: bool,
    ) -> Self {
        Reply {
            correlation_id: correlation_id.into(),
            outcome: ReplyOutcome::Failed {
                reason: reason.into(),
                retryable,
            },
        }
    }
}

/// Why a [`RequestReply::request`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// The command could not be sent.
    #[error("sending `{kind}` failed")]
    #[non_exhaustive]
    Send {
        /// The command's kind.
        kind: String,
        /// Why.
        #[source]
        source: BoxError,
    },
    /// No reply came in time; the command may still take effect.
    #[error("no reply to `{kind}` within {timeout:?}")]
    #[non_exhaustive]
    TimedOut {
        /// The command's kind.
        kind: String,
        /// How long the step waited.
        timeout: Duration,
    },
    /// The service answered that the command failed.
    #[error("`{kind}` failed: {reason}")]
    #[non_exhaustive]
    Failed {
        /// The command's kind.
        kind: String,
        /// The reply's reason.
        reason: String,
        /// Whether the reply said to try again.
        retryable: bool,
    },
    /// Another request with the same correlation id took over the wait (two
    /// orchestrators in one process driving the same saga, say).
    #[error("another request for `{correlation_id}` took over")]
    #[non_exhaustive]
    Superseded {
        /// The correlation id.
        correlation_id: String,
    },
}

impl RequestError {
    /// Whether the step should send the command again: after a timeout, a
    /// retryable reply, or a send failure micro-core deems retryable.
    pub fn is_retryable(&self) -> bool {
        match self {
            RequestError::Send { source, .. } => is_retryable(&**source),
            RequestError::TimedOut { .. } => true,
            RequestError::Failed { retryable, .. } => *retryable,
            RequestError::Superseded { .. } => false,
        }
    }

    /// The step error this makes, retryable as [`is_retryable`](Self::is_retryable)
    /// says. (Converting with `?` would not do: micro-core cannot tell that a
    /// timeout reported by this type is retryable.)
    pub fn into_step_error(self) -> StepError {
        if self.is_retryable() {
            StepError::retryable(self)
        } else {
            StepError::permanent(self)
        }
    }
}

/// Sends commands and routes their replies back to the steps waiting for
/// them; see the [module docs](self). Cheap to clone; clones share the
/// waiters.
#[derive(Clone)]
pub struct RequestReply {
    inner: Arc<Inner>,
}

struct Inner {
    sender: Box<dyn CommandSender>,
    timeout: Duration,
    next_token: AtomicU64,
    waiters: Mutex<HashMap<String, Waiter>>,
}

struct Waiter {
    token: u64,
    reply: oneshot::Sender<Reply>,
}

impl Inner {
    fn waiters(&self) -> MutexGuard<'_, HashMap<String, Waiter>> {
        self.waiters.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Removes a request's waiter when the request ends, however it ends
/// (reply, timeout, the step's own timeout dropping the future).
struct Registration<'a> {
    inner: &'a Inner,
    correlation_id: &'a str,
    token: u64,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        let mut waiters = self.inner.waiters();
        if waiters
            .get(self.correlation_id)
            .is_some_and(|w| w.token == self.token)
        {
            waiters.remove(self.correlation_id);
        }
    }
}

impl RequestReply {
    /// Sends commands through `sender` and waits up to `timeout` for each
    /// reply. Keep the timeout below the step policy's own, or the step's
    /// timeout fires first (with the same effect: the command is sent
    /// again).
    pub fn new(sender: impl CommandSender, timeout: Duration) -> Self {
        RequestReply {
            inner: Arc::new(Inner {
                sender: Box::new(sender),
                timeout,
                next_token: AtomicU64::new(0),
                waiters: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// How long a request waits for its reply.
    pub fn timeout(&self) -> Duration {
        self.inner.timeout
    }

    /// Sends a command of `kind` with `payload` for the step of `cx`, and
    /// waits for its reply; returns the reply's payload.
    ///
    /// # Errors
    ///
    /// A [`RequestError`], converted into a [`StepError`] that is retryable
    /// after a timeout, a retryable reply or a retryable send failure.
    pub async fn request<C>(
        &self,
        cx: &StepContext<C>,
        kind: &str,
        payload: Value,
    ) -> Result<Value, StepError> {
        let command = Command {
            correlation_id: cx.idempotency_key().to_owned(),
            saga_id: cx.saga_id().to_owned(),
            step: cx.step().to_owned(),
            attempt: cx.attempt(),
            kind: kind.to_owned(),
            payload,
            trace_parent: cx.trace().to_traceparent(),
        };
        self.send(&command)
            .await
            .map_err(RequestError::into_step_error)
    }

    /// Sends `command` and waits for its reply; the lower-level form of
    /// [`request`](Self::request).
    ///
    /// # Errors
    ///
    /// See [`RequestError`].
    pub async fn send(&self, command: &Command) -> Result<Value, RequestError> {
        let inner = &*self.inner;
        let token = inner.next_token.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        // Registered before sending, so that a reply cannot come first.
        inner
            .waiters()
            .insert(command.correlation_id.clone(), Waiter { token, reply: tx });
        let _registration = Registration {
            inner,
            correlation_id: &command.correlation_id,
            token,
        };
        inner
            .sender
            .send(command)
            .await
            .map_err(|source| RequestError::Send {
                kind: command.kind.clone(),
                source,
            })?;
        let reply = match tokio::time::timeout(inner.timeout, rx).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(_)) => {
                return Err(RequestError::Superseded {
                    correlation_id: command.correlation_id.clone(),
                })
            }
            Err(_) => {
                return Err(RequestError::TimedOut {
                    kind: command.kind.clone(),
                    timeout: inner.timeout,
                })
            }
        };
        match reply.outcome {
            ReplyOutcome::Succeeded { payload } => Ok(payload),
            ReplyOutcome::Failed { reason, retryable } => Err(RequestError::Failed {
                kind: command.kind.clone(),
                reason,
                retryable,
            }),
        }
    }

    /// Hands a reply to the step waiting for it. Returns `false` when none
    /// is (a duplicate, or a reply that came after its request timed out):
    /// such a reply is dropped, and the service answers the command again
    /// when the step resends it.
    pub fn deliver(&self, reply: Reply) -> bool {
        let waiter = self.inner.waiters().remove(&reply.correlation_id);
        match waiter {
            Some(waiter) => waiter.reply.send(reply).is_ok(),
            None => false,
        }
    }

    /// How many requests are waiting for their reply.
    pub fn waiting(&self) -> usize {
        self.inner.waiters().len()
    }
}

impl fmt::Debug for RequestReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestReply")
            .field("timeout", &self.inner.timeout)
            .field("waiting", &self.waiting())
            .finish_non_exhaustive()
    }
}
