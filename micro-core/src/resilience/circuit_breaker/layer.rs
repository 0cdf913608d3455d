use std::sync::Arc;

use tower_layer::Layer;

use super::{CircuitBreaker, CircuitBreakerConfig};

/// Applies a [`CircuitBreaker`] to the services it wraps.
///
/// Each service it wraps gets a breaker of its own, shared by that service's clones.
#[derive(Debug, Clone, Default)]
pub struct CircuitBreakerLayer {
    config: CircuitBreakerConfig,
    name: Option<Arc<str>>,
}

impl CircuitBreakerLayer {
    /// Creates a layer of breakers that export no metrics.
    pub fn new(config: CircuitBreakerConfig) -> Self {
        Self { config, name: None }
    }

    /// Creates a layer of breakers that export their state as metrics labelled with
    /// `name`.
    pub fn named(name: impl Into<Arc<str>>, config: CircuitBreakerConfig) -> Self {
        Self {
            config,
            name: Some(name.into()),
        }
    }
}

impl<S> Layer<S> for CircuitBreakerLayer {
    type Service = CircuitBreaker<S>;

    fn layer(&self, inner: S) -> Self::Service {
        match &self.name {
            Some(name) => CircuitBreaker::named(inner, name.clone(), self.config.clone()),
            None => CircuitBreaker::new(inner, self.config.clone()),
        }
    }
}
