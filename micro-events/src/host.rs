//! Plugging subscriptions into micro-core's `ServiceHost` shutdown sequence.

use micro_core::host::ServiceHostBuilder;

use crate::subscribe::Subscription;

/// Adds event consumers to a [`ServiceHostBuilder`].
pub trait ServiceHostBuilderExt {
    /// Shuts `subscription` down in the host's `before_drain` step: once
    /// readiness is off and before in-flight requests drain, the consumer
    /// stops reading, lets running handlers finish and commits what finished.
    ///
    /// Readiness is per service: return
    /// [`Subscription::health_check`] from the consuming service's
    /// `health_checks` so that `/health/ready` fails if the consumer stops.
    #[must_use]
    fn subscription(self, subscription: Subscription) -> Self;
}

impl ServiceHostBuilderExt for ServiceHostBuilder {
    fn subscription(self, subscription: Subscription) -> Self {
        let name = format!(
            "stop consumer {} of {}",
            subscription.group(),
            subscription.topic()
        );
        self.before_drain(name, move || async move {
            subscription.shutdown().await.map_err(Into::into)
        })
    }
}
