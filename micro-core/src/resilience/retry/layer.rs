use tower_layer::Layer;

use super::{Retry, RetryConfig};

/// Applies [`Retry`] to the services it wraps.
///
/// Each service it wraps gets a retry budget of its own, shared by that service's clones.
#[derive(Debug, Clone, Default)]
pub struct RetryLayer {
    config: RetryConfig,
}

impl RetryLayer {
    /// Creates a layer that retries as `config` says.
    pub fn new(config: RetryConfig) -> Self {
        Self { config }
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Retry::new(inner, self.config.clone())
    }
}
