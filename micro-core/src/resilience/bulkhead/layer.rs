use tower_layer::Layer;

use super::{Bulkhead, BulkheadConfig};

/// Applies a [`Bulkhead`] to the services it wraps.
///
/// Each service it wraps gets a limit and queue of its own, shared by that service's
/// clones.
#[derive(Debug, Clone, Default)]
pub struct BulkheadLayer {
    config: BulkheadConfig,
}

impl BulkheadLayer {
    /// Creates a layer of bulkheads sized by `config`.
    pub fn new(config: BulkheadConfig) -> Self {
        Self { config }
    }
}

impl<S> Layer<S> for BulkheadLayer {
    type Service = Bulkhead<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Bulkhead::new(inner, self.config.clone())
    }
}
