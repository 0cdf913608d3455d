//! Balanced clients: send each request to one healthy instance of a named service.
//!
//! A [`Balancer`] follows a [`Discover::watch`] stream for one service and keeps the
//! instances it routes to. [`Balance`] (made by [`BalanceLayer`]) is the tower
//! middleware that uses it: for each HTTP request it picks an instance, rewrites the
//! request's authority to that instance's `address:port` and calls the service below.
//!
//! - **Choice**: [power of two choices](Strategy::PowerOfTwoChoices) (two instances at
//!   random, the one with fewer requests in flight wins) or
//!   [round robin](Strategy::RoundRobin).
//! - **Passive health**: an instance whose calls fail
//!   [`consecutive_failures`](BalanceConfig::consecutive_failures) times in a row (refused
//!   connections, timeouts, broken connections, `5xx` answers) is ejected for
//!   [`ejection_time`](BalanceConfig::ejection_time) and then comes back on probation. When
//!   every instance is ejected the balancer uses them anyway rather than fail.
//! - **Retries**: a request that carries [`Attempts`] (put there by [`AttemptsLayer`],
//!   outside the retry layer) is not sent to an instance it already tried while another
//!   is available, so a retried request goes to a different instance.
//! - **Changes**: each new set from the registry replaces the list atomically; requests
//!   in flight keep the instance they were given and finish, an instance that stays keeps
//!   its load and ejection state, and a registry that fails keeps the last set in use.
//!
//! [`ServiceClient`](crate::client::ServiceClient) puts it together with micro-core's
//! HTTP client, for calling `http://product-service` by name.

mod attempts;
mod service;

pub use self::attempts::{Attempts, AttemptsLayer, TrackAttempts};
pub use self::service::{Balance, BalanceLayer};

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::StreamExt;
use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::discover::{Discover, Watch};
use crate::error::{Error, Result};
use crate::instance::Instance;
use crate::metrics;

/// How a [`Balancer`] chooses among healthy instances.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Strategy {
    /// Two instances at random; the one with fewer requests in flight wins. Adapts to
    /// slow instances without global coordination.
    #[default]
    PowerOfTwoChoices,
    /// Each instance in turn.
    RoundRobin,
}

/// How a [`Balancer`] behaves. Deserializes from configuration, durations as `"30s"`:
///
/// ```
/// # use micro_discovery::balance::{BalanceConfig, Strategy};
/// let config: BalanceConfig = serde_json::from_str(
///     r#"{"strategy": "round_robin", "ejection_time": "10s"}"#,
/// ).unwrap();
/// assert_eq!(config.strategy, Strategy::RoundRobin);
/// assert_eq!(config.consecutive_failures, 3);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct BalanceConfig {
    /// How to choose. Default [`Strategy::PowerOfTwoChoices`].
    pub strategy: Strategy,
    /// Failed calls in a row that eject an instance; `0` never ejects. Default `3`.
    pub consecutive_failures: u32,
    /// How long an ejected instance is left out. Default 30 s.
    #[serde(with = "micro_core::config::duration")]
    pub ejection_time: Duration,
    /// How long a call waits for the first set of instances before failing with
    /// [`Error::NoInstances`]. Default 5 s.
    #[serde(with = "micro_core::config::duration")]
    pub resolve_timeout: Duration,
}

impl Default for BalanceConfig {
    fn default() -> Self {
        Self {
            strategy: Strategy::default(),
            consecutive_failures: 3,
            ejection_time: Duration::from_secs(30),
            resolve_timeout: Duration::from_secs(5),
        }
    }
}

impl BalanceConfig {
    /// The default settings.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets [`strategy`](Self::strategy).
    pub fn strategy(mut self, strategy: Strategy) -> Self {
        self.strategy = strategy;
        self
    }

    /// Sets [`consecutive_failures`](Self::consecutive_failures).
    pub fn consecutive_failures(mut self, failures: u32) -> Self {
        self.consecutive_failures = failures;
        self
    }

    /// Sets [`ejection_time`](Self::ejection_time).
    pub fn ejection_time(mut self, time: Duration) -> Self {
        self.ejection_time = time;
        self
    }

    /// Sets [`resolve_timeout`](Self::resolve_timeout).
    pub fn resolve_timeout(mut self, timeout: Duration) -> Self {
        self.resolve_timeout = timeout;
        self
    }
}

/// One instance as a balancer sees it.
#[derive(Debug)]
pub(crate) struct Endpoint {
    instance: Instance,
    authority: http::uri::Authority,
    in_flight: AtomicUsize,
    failures: AtomicU32,
    ejected_until: Mutex<Option<Instant>>,
}

impl Endpoint {
    fn new(instance: Instance) -> Option<Self> {
        let authority = instance.authority().parse().ok()?;
        Some(Self {
            instance,
            authority,
            in_flight: AtomicUsize::new(0),
            failures: AtomicU32::new(0),
            ejected_until: Mutex::new(None),
        })
    }

    fn is_ejected(&self, now: Instant) -> bool {
        self.ejected_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some_and(|until| until > now)
    }

    pub(crate) fn authority(&self) -> &http::uri::Authority {
        &self.authority
    }

    pub(crate) fn id(&self) -> &str {
        &self.instance.id
    }
}

/// Counts a request in flight on an endpoint while it lives.
#[derive(Debug)]
pub(crate) struct InFlight(Arc<Endpoint>);

impl InFlight {
    pub(crate) fn new(endpoint: Arc<Endpoint>) -> Self {
        endpoint.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(endpoint)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An instance in a [`Balancer`]'s rotation, as [`Balancer::endpoints`] shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct EndpointState {
    /// The instance.
    pub instance: Instance,
    /// Requests sent to it that have not finished.
    pub in_flight: usize,
    /// Whether passive health checking has left it out for now.
    pub ejected: bool,
}

type Snapshot = Arc<[Arc<Endpoint>]>;

/// The instances of one service that requests go to; see the [module docs](self).
///
/// It starts following the registry on first use (a call, [`ready`](Self::ready)), inside
/// the Tokio runtime, and stops when the last clone is dropped. Clones share everything.
#[derive(Clone)]
pub struct Balancer {
    shared: Arc<Shared>,
}

struct Shared {
    service: String,
    config: BalanceConfig,
    discover: Arc<dyn Discover>,
    endpoints: watch::Receiver<Option<Snapshot>>,
    unstarted: Mutex<Option<watch::Sender<Option<Snapshot>>>>,
    next: AtomicUsize,
}

impl Balancer {
    /// A balancer over the instances of `service` that `discover` finds.
    pub fn new(
        discover: Arc<dyn Discover>,
        service: impl Into<String>,
        config: BalanceConfig,
    ) -> Self {
        let (sender, receiver) = watch::channel(None);
        Self {
            shared: Arc::new(Shared {
                service: service.into(),
                config,
                discover,
                endpoints: receiver,
                unstarted: Mutex::new(Some(sender)),
                next: AtomicUsize::new(0),
            }),
        }
    }

    /// The service it balances.
    pub fn service(&self) -> &str {
        &self.shared.service
    }

    /// Its settings.
    pub fn config(&self) -> &BalanceConfig {
        &self.shared.config
    }

    /// A layer that balances the requests of the service it wraps with this balancer.
    pub fn layer(&self) -> BalanceLayer {
        BalanceLayer::new(self.clone())
    }

    /// Waits until the first set of instances is known, for up to the
    /// [`resolve_timeout`](BalanceConfig::resolve_timeout), and returns how many there
    /// are.
    ///
    /// # Errors
    ///
    /// [`Error::NoInstances`] when no set came in time.
    pub async fn ready(&self) -> Result<usize> {
        Ok(self.snapshot().await?.len())
    }

    /// The instances in rotation now, sorted by id.
    pub fn endpoints(&self) -> Vec<EndpointState> {
        let now = Instant::now();
        self.shared
            .endpoints
            .borrow()
            .as_deref()
            .unwrap_or_default()
            .iter()
            .map(|endpoint| EndpointState {
                instance: endpoint.instance.clone(),
                in_flight: endpoint.in_flight.load(Ordering::Relaxed),
                ejected: endpoint.is_ejected(now),
            })
            .collect()
    }

    fn start(&self) {
        let sender = self
            .shared
            .unstarted
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(sender) = sender {
            let watch = self.shared.discover.watch(&self.shared.service);
            tokio::spawn(follow(watch, sender, self.shared.service.clone()));
        }
    }

    pub(crate) async fn snapshot(&self) -> Result<Snapshot> {
        self.start();
        let mut receiver = self.shared.endpoints.clone();
        if let Some(snapshot) = receiver.borrow().clone() {
            return Ok(snapshot);
        }
        let waited = tokio::time::timeout(
            self.shared.config.resolve_timeout,
            receiver.wait_for(Option::is_some),
        )
        .await;
        match waited {
            Ok(Ok(snapshot)) => snapshot.clone().ok_or_else(|| self.no_instances()),
            _ => Err(self.no_instances()),
        }
    }

    pub(crate) fn no_instances(&self) -> Error {
        metrics::resolution_error(&self.shared.service);
        Error::NoInstances {
            service: self.shared.service.clone(),
        }
    }

    /// Picks an endpoint: healthy and untried first, then healthy, then untried, then any.
    pub(crate) fn pick(
        &self,
        endpoints: &[Arc<Endpoint>],
        attempts: Option<&Attempts>,
    ) -> Option<Arc<Endpoint>> {
        let now = Instant::now();
        let tried = |endpoint: &Endpoint| attempts.is_some_and(|a| a.contains(endpoint.id()));
        let tiers: [&dyn Fn(&Endpoint) -> bool; 4] = [
            &|e| !e.is_ejected(now) && !tried(e),
            &|e| !e.is_ejected(now),
            &|e| !tried(e),
            &|_| true,
        ];
        for tier in tiers {
            let candidates: Vec<&Arc<Endpoint>> = endpoints.iter().filter(|e| tier(e)).collect();
            if let Some(chosen) = self.choose(&candidates) {
                return Some(chosen.clone());
            }
        }
        None
    }

    fn choose<'a>(&self, candidates: &[&'a Arc<Endpoint>]) -> Option<&'a Arc<Endpoint>> {
        match (candidates.len(), self.shared.config.strategy) {
            (0, _) => None,
            (1, _) => Some(candidates[0]),
            (len, Strategy::RoundRobin) => {
                Some(candidates[self.shared.next.fetch_add(1, Ordering::Relaxed) % len])
            }
            (len, Strategy::PowerOfTwoChoices) => {
                let mut rng = rand::rng();
                let first = rng.random_range(0..len);
                let second = (first + rng.random_range(1..len)) % len;
                let (a, b) = (candidates[first], candidates[second]);
                let load = |e: &Endpoint| e.in_flight.load(Ordering::Relaxed);
                Some(if load(b) < load(a) { b } else { a })
            }
        }
    }

    /// Records how a call to `endpoint` went, ejecting it after too many failures.
    pub(crate) fn record(&self, endpoint: &Endpoint, failed: bool) {
        let threshold = self.shared.config.consecutive_failures;
        if !failed {
            endpoint.failures.store(0, Ordering::Relaxed);
            return;
        }
        if threshold == 0 {
            return;
        }
        let failures = endpoint.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures >= threshold {
            endpoint.failures.store(0, Ordering::Relaxed);
            let until = Instant::now() + self.shared.config.ejection_time;
            *endpoint
                .ejected_until
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(until);
            metrics::ejection(&self.shared.service);
            tracing::warn!(
                service = %self.shared.service,
                instance = %endpoint.id(),
                failures,
                for_ = ?self.shared.config.ejection_time,
                "instance ejected"
            );
        }
    }
}

impl fmt::Debug for Balancer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Balancer")
            .field("service", &self.shared.service)
            .field("config", &self.shared.config)
            .field("endpoints", &self.endpoints().len())
            .finish_non_exhaustive()
    }
}

/// Follows the registry until every receiver is gone.
async fn follow(mut watch: Watch, sender: watch::Sender<Option<Snapshot>>, service: String) {
    let mut known: HashMap<String, Arc<Endpoint>> = HashMap::new();
    loop {
        let item = tokio::select! {
            () = sender.closed() => return,
            item = watch.next() => item,
        };
        match item {
            // The backend is gone: the last set stays in use.
            None => return,
            Some(Err(error)) => {
                metrics::resolution_error(&service);
                tracing::warn!(%service, %error, "discovery failed: keeping the last known instances");
            }
            Some(Ok(instances)) => {
                let mut next = HashMap::with_capacity(instances.len());
                for instance in instances {
                    let endpoint = match known.remove(&instance.id) {
                        Some(endpoint) if endpoint.instance == instance => endpoint,
                        _ => match Endpoint::new(instance) {
                            Some(endpoint) => Arc::new(endpoint),
                            None => continue,
                        },
                    };
                    next.insert(endpoint.id().to_owned(), endpoint);
                }
                known = next;
                let mut list: Vec<Arc<Endpoint>> = known.values().cloned().collect();
                list.sort_by(|a, b| a.id().cmp(b.id()));
                metrics::instances(&service, list.len());
                tracing::debug!(%service, instances = list.len(), "instances changed");
                sender.send_replace(Some(list.into()));
            }
        }
    }
}

#[cfg(test)]
mod tests;
