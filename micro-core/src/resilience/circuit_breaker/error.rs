use std::sync::Arc;

use crate::error::Retryable;

/// The error returned by [`CircuitBreaker`](super::CircuitBreaker) while it is open, or
/// half-open with all its trial calls under way.
///
/// It is not retryable: retrying at once would defeat the breaker.
#[derive(Debug, Clone, thiserror::Error)]
#[error("circuit breaker{} is open", display_name(.name))]
pub struct CircuitOpen {
    name: Option<Arc<str>>,
}

fn display_name(name: &Option<Arc<str>>) -> String {
    name.as_deref()
        .map(|name| format!(" `{name}`"))
        .unwrap_or_default()
}

impl CircuitOpen {
    pub(crate) fn new(name: Option<Arc<str>>) -> Self {
        Self { name }
    }

    /// Returns the name of the breaker that rejected the call, if it has one.
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }
}

impl Retryable for CircuitOpen {
    fn is_retryable(&self) -> bool {
        false
    }
}
