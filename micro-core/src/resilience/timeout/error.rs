use std::time::Duration;

use crate::error::Retryable;

/// The error returned by [`Timeout`](super::Timeout) when a call took too long.
///
/// It is retryable: the next attempt may well be faster.
#[derive(Debug, Clone, thiserror::Error)]
#[error("request timed out after {timeout:?}")]
pub struct Elapsed {
    timeout: Duration,
}

impl Elapsed {
    pub(crate) fn new(timeout: Duration) -> Self {
        Self { timeout }
    }

    /// Returns the timeout that elapsed.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}

impl Retryable for Elapsed {
    fn is_retryable(&self) -> bool {
        true
    }
}
