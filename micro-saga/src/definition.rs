//! Saga definitions: a typed context and an ordered list of steps.

use std::collections::HashSet;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::policy::StepPolicy;
use crate::step::{StepContext, StepError, StepOutput};

/// A boxed, sendable future, as the saga log and the steps return: micro-core's, the one
/// every micro crate uses.
pub use micro_core::service::BoxFuture;

pub(crate) type ActionFn<C> = Arc<
    dyn Fn(StepContext<C>) -> BoxFuture<'static, Result<StepOutput<C>, StepError>> + Send + Sync,
>;
pub(crate) type CompensationFn<C> =
    Arc<dyn Fn(StepContext<C>) -> BoxFuture<'static, Result<(), StepError>> + Send + Sync>;

/// What a saga's context must be: owned, cloneable and serde, since it is
/// written to the saga log with every transition and read back on recovery.
pub trait SagaContext: Serialize + DeserializeOwned + Clone + Send + Sync + 'static {}

impl<T> SagaContext for T where T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static {}

/// Where a step sits in its saga, which decides whether it has a
/// compensation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepKind {
    /// A step whose effect a compensation undoes; declared with
    /// [`SagaBuilder::step`].
    Compensatable,
    /// The go/no-go step: once it succeeds the saga can no longer be undone.
    /// It has no compensation; declared with [`SagaBuilder::pivot`].
    Pivot,
    /// A step after the pivot, which should only fail transiently; it has no
    /// compensation. Declared with [`SagaBuilder::final_step`].
    Final,
}

pub(crate) struct StepDef<C> {
    pub(crate) name: String,
    pub(crate) kind: StepKind,
    pub(crate) policy: StepPolicy,
    pub(crate) action: ActionFn<C>,
    pub(crate) compensation: Option<CompensationFn<C>>,
}

impl<C> Clone for StepDef<C> {
    fn clone(&self) -> Self {
        StepDef {
            name: self.name.clone(),
            kind: self.kind,
            policy: self.policy.clone(),
            action: self.action.clone(),
            compensation: self.compensation.clone(),
        }
    }
}

/// A saga definition: a name, the type `C` of its context and its steps, in
/// order. Cheap to clone.
///
/// Build one with [`SagaDefinition::builder`]. Steps come in three kinds
/// ([`StepKind`]), and the builder's types keep them in order:
///
/// 1. **Compensatable steps**, [`step(name, action, compensation)`](SagaBuilder::step):
///    every step that may be followed by a failure must be undoable, so the
///    compensation is a required argument; there is no way to declare a
///    compensatable step without one.
/// 2. At most one **pivot**, [`pivot(name, action)`](SagaBuilder::pivot): the
///    step after which the saga must go through (confirming the order, say).
///    If it fails, the steps before it are compensated; once it succeeds,
///    nothing is undone.
/// 3. **Final steps**, [`final_step(name, action)`](SagaBuilder::final_step),
///    only after the pivot: steps that should only fail transiently (a
///    notification). They are retried by their policy; if one fails for good
///    the saga cannot be compensated past the pivot and ends
///    [`Failed`](crate::SagaStatus::Failed), needing attention.
///
/// The pivot and the final steps are the only steps without a compensation.
///
/// ```
/// use micro_saga::{SagaDefinition, StepOutput};
///
/// #[derive(Clone, serde::Serialize, serde::Deserialize)]
/// struct Order { id: u64, cents: u64 }
///
/// let saga = SagaDefinition::<Order>::builder("place-order")
///     .step(
///         "charge-payment",
///         |cx| async move { StepOutput::json(&format!("payment-{}", cx.data().id)) },
///         |_cx| async move { Ok(()) },
///     )
///     .pivot("confirm-order", |_cx| async move { Ok(StepOutput::empty()) })
///     .final_step("notify", |_cx| async move { Ok(StepOutput::empty()) })
///     .build()?;
/// assert_eq!(saga.step_names(), ["charge-payment", "confirm-order", "notify"]);
/// # Ok::<(), micro_saga::Error>(())
/// ```
pub struct SagaDefinition<C> {
    inner: Arc<DefinitionInner<C>>,
}

pub(crate) struct DefinitionInner<C> {
    pub(crate) name: String,
    pub(crate) steps: Vec<StepDef<C>>,
}

impl<C> Clone for SagaDefinition<C> {
    fn clone(&self) -> Self {
        SagaDefinition {
            inner: self.inner.clone(),
        }
    }
}

impl<C> fmt::Debug for SagaDefinition<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SagaDefinition")
            .field("name", &self.inner.name)
            .field(
                "steps",
                &self
                    .inner
                    .steps
                    .iter()
                    .map(|s| (s.name.as_str(), s.kind))
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl<C: SagaContext> SagaDefinition<C> {
    /// Starts a definition named `name` (such as `"place-order"`); the name
    /// is how the saga log and recovery find it again.
    pub fn builder(name: impl Into<String>) -> SagaBuilder<C, Compensatable> {
        SagaBuilder {
            name: name.into(),
            steps: Vec::new(),
            policy: StepPolicy::default(),
            _state: PhantomData,
        }
    }
}

impl<C> SagaDefinition<C> {
    /// The definition's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The steps' names, in order.
    pub fn step_names(&self) -> Vec<&str> {
        self.inner.steps.iter().map(|s| s.name.as_str()).collect()
    }

    /// The kind of each step, in order.
    pub fn step_kinds(&self) -> Vec<StepKind> {
        self.inner.steps.iter().map(|s| s.kind).collect()
    }

    /// The policy of the step named `step`.
    pub fn policy(&self, step: &str) -> Option<&StepPolicy> {
        self.inner
            .steps
            .iter()
            .find(|s| s.name == step)
            .map(|s| &s.policy)
    }

    pub(crate) fn steps(&self) -> &[StepDef<C>] {
        &self.inner.steps
    }

    /// The same definition with each step replaced by `f(step)`; the test kit
    /// wraps steps this way.
    #[cfg_attr(not(feature = "testkit"), allow(dead_code))]
    pub(crate) fn map_steps(&self, f: impl Fn(StepDef<C>) -> StepDef<C>) -> Self {
        SagaDefinition {
            inner: Arc::new(DefinitionInner {
                name: self.inner.name.clone(),
                steps: self.inner.steps.iter().cloned().map(f).collect(),
            }),
        }
    }
}

/// Builder state: compensatable steps and the pivot may be declared.
#[derive(Debug, Clone, Copy)]
pub enum Compensatable {}

/// Builder state: the pivot was declared; only final steps may follow.
#[derive(Debug, Clone, Copy)]
pub enum Pivoted {}

/// Builds a [`SagaDefinition`]; see there for the kinds of step.
///
/// The state parameter `S` is [`Compensatable`] until the pivot is declared,
/// then [`Pivoted`]; each state offers only the steps allowed in it.
pub struct SagaBuilder<C, S> {
    name: String,
    steps: Vec<StepDef<C>>,
    policy: StepPolicy,
    _state: PhantomData<fn() -> S>,
}

impl<C, S> fmt::Debug for SagaBuilder<C, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SagaBuilder")
            .field("name", &self.name)
            .field(
                "steps",
                &self.steps.iter().map(|s| &s.name).collect::<Vec<_>>(),
            )
            .field("policy", &self.policy)
            .finish()
    }
}

fn action<C, F, Fut>(f: F) -> ActionFn<C>
where
    F: Fn(StepContext<C>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<StepOutput<C>, StepError>> + Send + 'static,
{
    Arc::new(move |cx| Box::pin(f(cx)))
}

impl<C: SagaContext, S> SagaBuilder<C, S> {
    /// Sets the policy of the steps declared after this call (the ones before
    /// keep theirs). Until it is called, steps get [`StepPolicy::default`].
    pub fn policy(mut self, policy: StepPolicy) -> Self {
        self.policy = policy;
        self
    }

    fn push<F, Fut>(&mut self, name: String, kind: StepKind, f: F, c: Option<CompensationFn<C>>)
    where
        F: Fn(StepContext<C>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<StepOutput<C>, StepError>> + Send + 'static,
    {
        self.steps.push(StepDef {
            name,
            kind,
            policy: self.policy.clone(),
            action: action(f),
            compensation: c,
        });
    }

    fn with_state<T>(self) -> SagaBuilder<C, T> {
        SagaBuilder {
            name: self.name,
            steps: self.steps,
            policy: self.policy,
            _state: PhantomData,
        }
    }

    /// Builds the definition.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidDefinition`] when the name is empty, there are no
    /// steps, or a step name is empty or used twice.
    pub fn build(self) -> Result<SagaDefinition<C>> {
        let invalid = |reason: String| Err(Error::InvalidDefinition { reason });
        if self.name.is_empty() {
            return invalid("the definition name is empty".into());
        }
        if self.steps.is_empty() {
            return invalid(format!("`{}` has no steps", self.name));
        }
        let mut seen = HashSet::new();
        for step in &self.steps {
            if step.name.is_empty() {
                return invalid(format!("`{}` has a step with an empty name", self.name));
            }
            if !seen.insert(step.name.as_str()) {
                return invalid(format!(
                    "`{}` has two steps named `{}`",
                    self.name, step.name
                ));
            }
        }
        Ok(SagaDefinition {
            inner: Arc::new(DefinitionInner {
                name: self.name,
                steps: self.steps,
            }),
        })
    }
}

impl<C: SagaContext> SagaBuilder<C, Compensatable> {
    /// Declares a compensatable step: its action, and the compensation that
    /// undoes the action's effect when a later step fails.
    ///
    /// Both receive a [`StepContext`]; the compensation's carries what the
    /// action returned. Both must honour the context's idempotency key, and
    /// the compensation must be safe to run again.
    pub fn step<A, AF, K, KF>(mut self, name: impl Into<String>, action: A, compensation: K) -> Self
    where
        A: Fn(StepContext<C>) -> AF + Send + Sync + 'static,
        AF: Future<Output = Result<StepOutput<C>, StepError>> + Send + 'static,
        K: Fn(StepContext<C>) -> KF + Send + Sync + 'static,
        KF: Future<Output = Result<(), StepError>> + Send + 'static,
    {
        let compensation: CompensationFn<C> = Arc::new(move |cx| Box::pin(compensation(cx)));
        self.push(
            name.into(),
            StepKind::Compensatable,
            action,
            Some(compensation),
        );
        self
    }

    /// Declares the pivot: the step after which the saga cannot be undone. It
    /// has no compensation; if it fails, the steps before it are compensated.
    /// After it, only [`final_step`](SagaBuilder::final_step)s may follow.
    pub fn pivot<A, AF>(mut self, name: impl Into<String>, action: A) -> SagaBuilder<C, Pivoted>
    where
        A: Fn(StepContext<C>) -> AF + Send + Sync + 'static,
        AF: Future<Output = Result<StepOutput<C>, StepError>> + Send + 'static,
    {
        self.push(name.into(), StepKind::Pivot, action, None);
        self.with_state()
    }
}

impl<C: SagaContext> SagaBuilder<C, Pivoted> {
    /// Declares a step after the pivot, which has no compensation: give it a
    /// policy with enough attempts, since failing for good leaves the saga
    /// [`Failed`](crate::SagaStatus::Failed).
    pub fn final_step<A, AF>(mut self, name: impl Into<String>, action: A) -> Self
    where
        A: Fn(StepContext<C>) -> AF + Send + Sync + 'static,
        AF: Future<Output = Result<StepOutput<C>, StepError>> + Send + 'static,
    {
        self.push(name.into(), StepKind::Final, action, None);
        self
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    async fn ok(_: StepContext<u32>) -> Result<StepOutput<u32>, StepError> {
        Ok(StepOutput::empty())
    }

    async fn undo(_: StepContext<u32>) -> Result<(), StepError> {
        Ok(())
    }

    #[test]
    fn kinds_and_policies_follow_the_declarations() {
        let fast = StepPolicy::new().timeout(Duration::from_millis(10));
        let def = SagaDefinition::<u32>::builder("d")
            .step("a", ok, undo)
            .policy(fast.clone())
            .step("b", ok, undo)
            .pivot("c", ok)
            .final_step("d", ok)
            .build()
            .unwrap();
        assert_eq!(def.name(), "d");
        assert_eq!(def.step_names(), ["a", "b", "c", "d"]);
        assert_eq!(
            def.step_kinds(),
            [
                StepKind::Compensatable,
                StepKind::Compensatable,
                StepKind::Pivot,
                StepKind::Final
            ]
        );
        assert_eq!(def.policy("a"), Some(&StepPolicy::default()));
        assert_eq!(def.policy("b"), Some(&fast));
        assert_eq!(def.policy("d"), Some(&fast));
        assert!(def.steps()[0].compensation.is_some());
        assert!(def.steps()[2].compensation.is_none());
        assert!(format!("{def:?}").contains("Pivot"));
    }

    #[test]
    fn rejects_invalid_definitions() {
        let err = SagaDefinition::<u32>::builder("d").build().unwrap_err();
        assert!(err.to_string().contains("no steps"), "{err}");
        let err = SagaDefinition::<u32>::builder("")
            .pivot("a", ok)
            .build()
            .unwrap_err();
        assert!(err.to_string().contains("name is empty"), "{err}");
        let err = SagaDefinition::<u32>::builder("d")
            .step("a", ok, undo)
            .pivot("a", ok)
            .build()
            .unwrap_err();
        assert!(err.to_string().contains("two steps named `a`"), "{err}");
        let err = SagaDefinition::<u32>::builder("d")
            .step("", ok, undo)
            .build()
            .unwrap_err();
        assert!(matches!(err, Error::InvalidDefinition { .. }), "{err:?}");
    }
}
