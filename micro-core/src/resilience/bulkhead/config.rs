use serde::Deserialize;
use tokio::sync::Semaphore;

use crate::resilience::InvalidConfig;

/// How many calls a [`Bulkhead`](super::Bulkhead) runs and queues.
///
/// ```
/// # use micro_core::resilience::BulkheadConfig;
/// let config: BulkheadConfig = serde_json::from_str(r#"{ "max_concurrent": 8 }"#).unwrap();
/// assert_eq!(config, BulkheadConfig::new().max_concurrent(8));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct BulkheadConfig {
    /// Calls allowed in flight at once. Default `32`; `0` counts as `1`.
    pub max_concurrent: usize,
    /// Calls allowed to wait for a permit; `0` rejects every call that cannot start at
    /// once. Default `32`.
    pub max_queued: usize,
}

impl BulkheadConfig {
    /// Returns the default settings.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets [`max_concurrent`](Self::max_concurrent).
    pub fn max_concurrent(mut self, calls: usize) -> Self {
        self.max_concurrent = calls;
        self
    }

    /// Sets [`max_queued`](Self::max_queued).
    pub fn max_queued(mut self, calls: usize) -> Self {
        self.max_queued = calls;
        self
    }

    pub(crate) fn validate(&self) -> Result<(), InvalidConfig> {
        if !(1..=Semaphore::MAX_PERMITS).contains(&self.max_concurrent) {
            return Err(InvalidConfig::new(
                "bulkhead.max_concurrent",
                "must be at least 1 and fit a semaphore",
            ));
        }
        Ok(())
    }

    pub(super) fn clamped(mut self) -> Self {
        self.max_concurrent = self.max_concurrent.clamp(1, Semaphore::MAX_PERMITS);
        self
    }
}

impl Default for BulkheadConfig {
    fn default() -> Self {
        Self {
            max_concurrent: 32,
            max_queued: 32,
        }
    }
}
