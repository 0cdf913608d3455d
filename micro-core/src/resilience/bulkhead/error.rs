use crate::error::Retryable;

/// The error returned by [`Bulkhead`](super::Bulkhead) when every permit is taken and the
/// queue is full.
///
/// It is retryable: the call was never started, and room may free up soon.
#[derive(Debug, Clone, thiserror::Error)]
#[error("bulkhead is full")]
pub struct BulkheadFull(());

impl BulkheadFull {
    pub(crate) fn new() -> Self {
        Self(())
    }
}

impl Retryable for BulkheadFull {
    fn is_retryable(&self) -> bool {
        true
    }
}
