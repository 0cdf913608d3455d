//! [`ServiceHost`](micro_core::host::ServiceHost) integration: register when ready,
//! keep alive, deregister first when shutdown begins.
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use axum::Router;
//! use micro_core::host::ServiceHost;
//! use micro_core::service::Service;
//! use micro_discovery::host::ServiceHostBuilderExt;
//! use micro_discovery::memory::MemoryRegistry;
//! use micro_discovery::{Discover, HttpCheck, Instance, Registration};
//!
//! struct Cart;
//! impl Service for Cart {
//!     fn name(&self) -> &str { "cart-service" }
//!     fn router(&self) -> Router { Router::new() }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let registry = MemoryRegistry::new();
//! // Bind first, so the registration knows the port.
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let addr = listener.local_addr()?;
//! let registration = Registration::new(Instance::from_addr("cart-service", addr))
//!     .ttl(Duration::from_secs(10))
//!     .http_check(HttpCheck::new(format!("http://{addr}/health/ready"), Duration::from_secs(5)));
//!
//! let running = ServiceHost::builder()
//!     .service_on(Cart, listener)
//!     .register_in(Arc::new(registry.clone()), registration)
//!     .build()?
//!     .start()
//!     .await?;
//! assert_eq!(registry.instances("cart-service").await?.len(), 1);
//!
//! running.shutdown_trigger().trigger();
//! running.run_until(std::future::pending()).await;
//! assert!(registry.instances("cart-service").await?.is_empty());
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use micro_core::host::ServiceHostBuilder;
use tokio::task::JoinHandle;

use crate::error::{Error, Result};
use crate::registry::{Registration, Registry};

/// Keeps one registration alive: registers it, renews its TTL in the background
/// (registering again if the registry forgot it), and deregisters it.
///
/// [`ServiceHostBuilderExt::register_in`] runs one with a host's lifecycle; use it
/// directly elsewhere. Clones share the background task.
#[derive(Clone)]
pub struct Registrar {
    shared: Arc<Shared>,
}

struct Shared {
    registry: Arc<dyn Registry>,
    registration: Registration,
    interval: Option<Duration>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Registrar {
    /// Keeps `registration` in `registry`; with a TTL, it is renewed every third of it.
    pub fn new(registry: Arc<dyn Registry>, registration: Registration) -> Self {
        let interval = registration.ttl.map(|ttl| ttl / 3);
        Self {
            shared: Arc::new(Shared {
                registry,
                registration,
                interval,
                task: Mutex::new(None),
            }),
        }
    }

    /// The registration it keeps.
    pub fn registration(&self) -> &Registration {
        &self.shared.registration
    }

    /// Registers, and starts renewing the TTL if there is one.
    ///
    /// # Errors
    ///
    /// What [`Registry::register`] returns.
    pub async fn start(&self) -> Result<()> {
        let shared = &self.shared;
        shared.registry.register(&shared.registration).await?;
        tracing::info!(
            service = %shared.registration.instance.service,
            id = %shared.registration.instance.id,
            "registered"
        );
        if let Some(interval) = shared.interval {
            let task = tokio::spawn(renew(Arc::downgrade(shared), interval));
            if let Some(old) = shared.lock().replace(task) {
                old.abort();
            }
        }
        Ok(())
    }

    /// Stops renewing and deregisters.
    ///
    /// # Errors
    ///
    /// What [`Registry::deregister`] returns.
    pub async fn stop(&self) -> Result<()> {
        let task = self.shared.lock().take();
        if let Some(task) = task {
            task.abort();
            // A renewal in progress must not register again after the deregistration.
            let _ = task.await;
        }
        let instance = &self.shared.registration.instance;
        self.shared
            .registry
            .deregister(&instance.service, &instance.id)
            .await?;
        tracing::info!(service = %instance.service, id = %instance.id, "deregistered");
        Ok(())
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<JoinHandle<()>>> {
        self.task.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Some(task) = self.lock().take() {
            task.abort();
        }
    }
}

async fn renew(shared: std::sync::Weak<Shared>, interval: Duration) {
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let instance = &shared.registration.instance;
        match shared
            .registry
            .keep_alive(&instance.service, &instance.id)
            .await
        {
            Ok(()) => {}
            Err(Error::NotRegistered { .. }) => {
                tracing::warn!(service = %instance.service, id = %instance.id, "registration lapsed: registering again");
                if let Err(error) = shared.registry.register(&shared.registration).await {
                    tracing::warn!(service = %instance.service, id = %instance.id, %error, "registering again failed");
                }
            }
            Err(error) => {
                tracing::warn!(service = %instance.service, id = %instance.id, %error, "keep-alive failed");
            }
        }
    }
}

impl fmt::Debug for Registrar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registrar")
            .field("registry", &self.shared.registry)
            .field("registration", &self.shared.registration)
            .field("interval", &self.shared.interval)
            .finish_non_exhaustive()
    }
}

/// Registration as part of a [`ServiceHostBuilder`]'s lifecycle.
pub trait ServiceHostBuilderExt: Sized {
    /// Registers `registration` in `registry` in an `on_ready` hook (once every listener
    /// accepts), renews its TTL while the host runs, and deregisters it in a
    /// `before_drain` hook, right after readiness turns off and before requests drain.
    ///
    /// The address must be known before the host starts: bind the listener first and
    /// add the service with [`service_on`](ServiceHostBuilder::service_on).
    fn register_in(self, registry: Arc<dyn Registry>, registration: Registration) -> Self;
}

impl ServiceHostBuilderExt for ServiceHostBuilder {
    fn register_in(self, registry: Arc<dyn Registry>, registration: Registration) -> Self {
        let id = registration.instance.id.clone();
        let registrar = Registrar::new(registry, registration);
        let on_ready = registrar.clone();
        self.on_ready(format!("discovery.register({id})"), move || async move {
            on_ready.start().await.map_err(Into::into)
        })
        .before_drain(format!("discovery.deregister({id})"), move || async move {
            registrar.stop().await.map_err(Into::into)
        })
    }
}
