//! [`CachedDiscover`]: keep serving the last known instances while the registry is
//! unreachable, and say so in health.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use futures_util::StreamExt;
use micro_core::health::HealthCheck;
use micro_core::service::BoxFuture;

use crate::discover::{Discover, Watch};
use crate::error::Result;
use crate::instance::Instance;
use crate::metrics;

/// Wraps a [`Discover`] so that an unreachable registry does not take callers down.
///
/// - [`instances`](Discover::instances) answers with the last set read for that service
///   when the registry fails, and fails only when it has never read one.
/// - A [`watch`](Discover::watch) stream drops `Err` items once it has a set (its
///   consumer keeps the set it had), and passes them on before that.
/// - Meanwhile the service counts as *degraded*: [`is_degraded`](Self::is_degraded) is
///   true and the non-critical [`health_check`](Self::health_check) fails with the
///   reason, so `/health/ready` shows it without taking the service out of rotation.
///   The next successful read clears it.
///
/// Clones share the cache.
#[derive(Debug, Clone)]
pub struct CachedDiscover<D> {
    inner: D,
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<HashMap<String, Cached>>,
}

#[derive(Debug, Default)]
struct Cached {
    last: Option<Vec<Instance>>,
    failure: Option<String>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Cached>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn succeeded(&self, service: &str, instances: &[Instance]) {
        let mut state = self.lock();
        let cached = state.entry(service.to_owned()).or_default();
        if cached.failure.take().is_some() {
            tracing::info!(service, "registry reachable again");
        }
        cached.last = Some(instances.to_vec());
    }

    /// Records a failure; returns the last known set, if any.
    fn failed(&self, service: &str, error: &dyn std::error::Error) -> Option<Vec<Instance>> {
        metrics::resolution_error(service);
        let mut state = self.lock();
        let cached = state.entry(service.to_owned()).or_default();
        let reason = micro_core::error::Chain(error).to_string();
        if cached.failure.is_none() {
            tracing::warn!(
                service,
                error = %reason,
                known = cached.last.as_ref().map_or(0, Vec::len),
                "registry unreachable: serving the last known instances"
            );
        }
        cached.failure = Some(reason);
        cached.last.clone()
    }
}

impl<D: Discover> CachedDiscover<D> {
    /// Wraps `inner`.
    pub fn new(inner: D) -> Self {
        Self {
            inner,
            shared: Arc::default(),
        }
    }

    /// Whether the last read of any service failed.
    pub fn is_degraded(&self) -> bool {
        self.shared
            .lock()
            .values()
            .any(|cached| cached.failure.is_some())
    }

    /// The services whose last read failed, with the reason.
    pub fn degraded(&self) -> Vec<(String, String)> {
        let mut degraded: Vec<_> = self
            .shared
            .lock()
            .iter()
            .filter_map(|(service, cached)| {
                let reason = cached.failure.as_ref()?;
                Some((service.clone(), reason.clone()))
            })
            .collect();
        degraded.sort();
        degraded
    }

    /// A non-critical [`HealthCheck`] named `discovery` that fails while the cache is
    /// degraded, saying which services are served from the last known set.
    pub fn health_check(&self) -> HealthCheck {
        let shared = self.shared.clone();
        HealthCheck::new("discovery", move || {
            let state = shared.lock();
            let mut failing: Vec<String> = state
                .iter()
                .filter_map(|(service, cached)| {
                    let reason = cached.failure.as_ref()?;
                    let known = cached.last.as_ref().map_or(0, Vec::len);
                    Some(format!(
                        "`{service}` served from {known} last known instances ({reason})"
                    ))
                })
                .collect();
            failing.sort();
            let result = if failing.is_empty() {
                Ok(())
            } else {
                Err(format!("registry unreachable: {}", failing.join("; ")).into())
            };
            std::future::ready(result)
        })
        .critical(false)
    }

    /// The wrapped discoverer.
    pub fn get_ref(&self) -> &D {
        &self.inner
    }

    /// Consumes the wrapper, returning the wrapped discoverer.
    pub fn into_inner(self) -> D {
        self.inner
    }
}

impl<D: Discover> Discover for CachedDiscover<D> {
    fn instances<'a>(&'a self, service: &'a str) -> BoxFuture<'a, Result<Vec<Instance>>> {
        Box::pin(async move {
            match self.inner.instances(service).await {
                Ok(instances) => {
                    self.shared.succeeded(service, &instances);
                    Ok(instances)
                }
                Err(error) => match self.shared.failed(service, &error) {
                    Some(last) => Ok(last),
                    None => Err(error),
                },
            }
        })
    }

    fn watch(&self, service: &str) -> Watch {
        let shared = self.shared.clone();
        let service = service.to_owned();
        self.inner
            .watch(&service)
            .filter_map(move |item| {
                let forwarded = match item {
                    Ok(instances) => {
                        shared.succeeded(&service, &instances);
                        Some(Ok(instances))
                    }
                    Err(error) => match shared.failed(&service, &error) {
                        Some(_) => None,
                        None => Some(Err(error)),
                    },
                };
                std::future::ready(forwarded)
            })
            .boxed()
    }
}
