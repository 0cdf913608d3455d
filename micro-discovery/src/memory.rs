//! The in-process registry: the embedded default, always available.
//!
//! [`MemoryRegistry`] is both a [`Registry`] and a [`Discover`]; clones share one set of
//! instances, so a whole system running in one process (`cargo run -p shop`) registers
//! and discovers through one value.
//!
//! - **TTL**: an instance registered with a TTL leaves discovery (and its watchers see
//!   it leave) once the TTL passes without a [keep-alive](Registry::keep_alive). Expiry
//!   runs on [`tokio::time`], so tests drive it with a paused clock.
//! - **HTTP checks**: a registered [`HttpCheck`](crate::HttpCheck) runs in this process,
//!   right away and then every interval; its outcome combines with the reported health
//!   (the worse wins), as Consul combines a service's checks.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use micro_core::service::BoxFuture;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use crate::checker::{self, Checker};
use crate::discover::{Discover, Watch};
use crate::error::{Error, Result};
use crate::instance::{sorted, HealthStatus, Instance};
use crate::registry::{Registration, Registry};

/// An in-process [`Registry`] and [`Discover`]; see the [module docs](self).
///
/// ```
/// use micro_discovery::{memory::MemoryRegistry, Discover, Instance, Registration, Registry};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), micro_discovery::Error> {
/// let registry = MemoryRegistry::new();
/// let instance = Instance::new("cart-service", "cart-1", "127.0.0.1", 8004);
/// registry.register(&Registration::new(instance.clone())).await?;
/// assert_eq!(registry.instances("cart-service").await?, vec![instance]);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Default)]
pub struct MemoryRegistry {
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    // Wakes the reaper when a deadline moves earlier, and when the registry is dropped.
    wake: Arc<Notify>,
}

#[derive(Debug, Default)]
struct State {
    services: HashMap<String, BTreeMap<String, Entry>>,
    watchers: HashMap<String, watch::Sender<Vec<Instance>>>,
    reaper_running: bool,
}

#[derive(Debug)]
struct Entry {
    instance: Instance,
    ttl: Option<Duration>,
    expires: Option<Instant>,
    reported: HealthStatus,
    checked: HealthStatus,
    _checker: Option<Checker>,
}

impl Entry {
    fn status(&self) -> HealthStatus {
        self.reported.max(self.checked)
    }
}

impl MemoryRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every registered instance of `service`, critical ones included, with its current
    /// health: what an operator's dashboard shows.
    pub fn all_instances(&self, service: &str) -> Vec<Instance> {
        let mut state = self.shared.lock();
        state.expire(Instant::now());
        state
            .services
            .get(service)
            .map(|entries| {
                entries
                    .values()
                    .map(|entry| entry.instance.clone().with_health(entry.status()))
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set_checked(&self, service: &str, id: &str, status: HealthStatus) -> bool {
        let mut state = self.lock();
        let Some(entry) = state.services.get_mut(service).and_then(|e| e.get_mut(id)) else {
            return false;
        };
        if entry.checked != status {
            tracing::debug!(service, id, %status, "http check changed");
            entry.checked = status;
            state.publish(service);
        }
        true
    }

    /// Removes what expired and returns the next deadline.
    fn expire_and_next(&self) -> Option<Instant> {
        let mut state = self.lock();
        state.expire(Instant::now());
        state
            .services
            .values()
            .flat_map(|entries| entries.values().filter_map(|entry| entry.expires))
            .min()
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.wake.notify_one();
    }
}

impl State {
    fn healthy(&self, service: &str) -> Vec<Instance> {
        self.services
            .get(service)
            .map(|entries| {
                entries
                    .values()
                    .filter(|entry| entry.status().is_healthy())
                    .map(|entry| entry.instance.clone().with_health(entry.status()))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn publish(&mut self, service: &str) {
        let Some(sender) = self.watchers.get(service) else {
            return;
        };
        if sender.receiver_count() == 0 {
            self.watchers.remove(service);
            return;
        }
        let healthy = self.healthy(service);
        sender.send_if_modified(|current| {
            let changed = *current != healthy;
            if changed {
                *current = healthy;
            }
            changed
        });
    }

    fn expire(&mut self, now: Instant) {
        let mut touched = Vec::new();
        for (service, entries) in &mut self.services {
            let before = entries.len();
            entries.retain(|id, entry| {
                let alive = entry.expires.is_none_or(|at| at > now);
                if !alive {
                    tracing::info!(service = %service, id = %id, "instance ttl lapsed");
                }
                alive
            });
            if entries.len() != before {
                touched.push(service.clone());
            }
        }
        for service in touched {
            self.publish(&service);
        }
    }
}

async fn reap(shared: Weak<Shared>, wake: Arc<Notify>) {
    loop {
        let next = match shared.upgrade() {
            Some(shared) => shared.expire_and_next(),
            None => return,
        };
        let woken = wake.notified();
        match next {
            Some(at) => {
                tokio::select! {
                    () = tokio::time::sleep_until(at) => {}
                    () = woken => {}
                }
            }
            None => woken.await,
        }
    }
}

impl Registry for MemoryRegistry {
    fn register<'a>(&'a self, registration: &'a Registration) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            registration.validate()?;
            let instance = registration.instance.clone();
            let checker = registration.http_check.as_ref().map(|check| {
                let shared = Arc::downgrade(&self.shared);
                let (service, id) = (instance.service.clone(), instance.id.clone());
                checker::spawn(check, move |status| {
                    let alive = shared
                        .upgrade()
                        .is_some_and(|shared| shared.set_checked(&service, &id, status));
                    std::future::ready(alive)
                })
            });
            let now = Instant::now();
            let entry = Entry {
                reported: instance.health,
                checked: HealthStatus::Passing,
                ttl: registration.ttl,
                expires: registration.ttl.map(|ttl| now + ttl),
                instance,
                _checker: checker,
            };
            let service = entry.instance.service.clone();
            let mut state = self.shared.lock();
            state.expire(now);
            state
                .services
                .entry(service.clone())
                .or_default()
                .insert(entry.instance.id.clone(), entry);
            state.publish(&service);
            if registration.ttl.is_some() {
                if !state.reaper_running {
                    state.reaper_running = true;
                    tokio::spawn(reap(Arc::downgrade(&self.shared), self.shared.wake.clone()));
                }
                self.shared.wake.notify_one();
            }
            Ok(())
        })
    }

    fn deregister<'a>(&'a self, service: &'a str, id: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let mut state = self.shared.lock();
            let removed = state
                .services
                .get_mut(service)
                .and_then(|entries| entries.remove(id));
            if removed.is_some() {
                state.publish(service);
            }
            Ok(())
        })
    }

    fn keep_alive<'a>(&'a self, service: &'a str, id: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let now = Instant::now();
            let mut state = self.shared.lock();
            state.expire(now);
            let entry = state
                .services
                .get_mut(service)
                .and_then(|entries| entries.get_mut(id))
                .ok_or_else(|| Error::not_registered(service, id))?;
            if let Some(ttl) = entry.ttl {
                entry.expires = Some(now + ttl);
            }
            Ok(())
        })
    }

    fn report_health<'a>(
        &'a self,
        service: &'a str,
        id: &'a str,
        status: HealthStatus,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let mut state = self.shared.lock();
            state.expire(Instant::now());
            let entry = state
                .services
                .get_mut(service)
                .and_then(|entries| entries.get_mut(id))
                .ok_or_else(|| Error::not_registered(service, id))?;
            entry.reported = status;
            state.publish(service);
            Ok(())
        })
    }
}

impl Discover for MemoryRegistry {
    fn instances<'a>(&'a self, service: &'a str) -> BoxFuture<'a, Result<Vec<Instance>>> {
        Box::pin(async move {
            let mut state = self.shared.lock();
            state.expire(Instant::now());
            Ok(sorted(state.healthy(service)))
        })
    }

    fn watch(&self, service: &str) -> Watch {
        let receiver = {
            let mut state = self.shared.lock();
            state.expire(Instant::now());
            let healthy = state.healthy(service);
            state
                .watchers
                .entry(service.to_owned())
                .or_insert_with(|| watch::channel(healthy).0)
                .subscribe()
        };
        futures_util::stream::unfold((receiver, true), |(mut receiver, first)| async move {
            if !first && receiver.changed().await.is_err() {
                return None;
            }
            let current = receiver.borrow_and_update().clone();
            Some((Ok(current), (receiver, false)))
        })
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(id: &str) -> Instance {
        Instance::new("svc", id, "127.0.0.1", 9000)
    }

    #[tokio::test(start_paused = true)]
    async fn warning_instances_are_still_discovered() {
        let registry = MemoryRegistry::new();
        registry
            .register(&Registration::new(instance("a")))
            .await
            .unwrap();
        registry
            .report_health("svc", "a", HealthStatus::Warning)
            .await
            .unwrap();
        let found = registry.instances("svc").await.unwrap();
        assert_eq!(found[0].health, HealthStatus::Warning);
        registry
            .report_health("svc", "a", HealthStatus::Critical)
            .await
            .unwrap();
        assert!(registry.instances("svc").await.unwrap().is_empty());
        assert_eq!(
            registry.all_instances("svc")[0].health,
            HealthStatus::Critical
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_reaper_stops_with_the_registry() {
        let registry = MemoryRegistry::new();
        registry
            .register(&Registration::new(instance("a")).ttl(Duration::from_secs(5)))
            .await
            .unwrap();
        let weak = Arc::downgrade(&registry.shared);
        drop(registry);
        tokio::task::yield_now().await;
        assert!(weak.upgrade().is_none());
    }
}
