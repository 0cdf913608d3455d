//! Where the rate limiter keeps its state: [`LocalStore`] in memory, or
//! `RedisStore` (feature `redis`) shared by several gateways.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use micro_core::service::BoxFuture;
use tokio::time::Instant;

use super::gcra::{decide, Decision, Quota};

/// The store could not decide.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The backend failed or did not answer in time.
    #[error("the rate limit store is unavailable")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Keeps the state of the rate limiter's keys and decides for one request.
pub trait RateLimitStore: fmt::Debug + Send + Sync + 'static {
    /// Counts one request of `key` against every quota, atomically: the request is
    /// allowed only when every quota allows it, and only then is it counted.
    fn check<'a>(
        &'a self,
        key: &'a str,
        quotas: &'a [Quota],
    ) -> BoxFuture<'a, Result<Decision, StoreError>>;
}

/// An in-memory store for one gateway process. Its clock is tokio's, so tests can pause
/// and advance it.
#[derive(Debug)]
pub struct LocalStore {
    origin: Instant,
    // One map behind one lock: a decision is a few arithmetic steps, far shorter than the
    // request around it, so contention stays low without sharding.
    // key -> (period in ns, TAT) per quota
    tats: Mutex<HashMap<String, Vec<(u64, u64)>>>,
    checks: AtomicU64,
}

impl Default for LocalStore {
    fn default() -> Self {
        Self::new()
    }
}

const SWEEP_EVERY: u64 = 4096;

impl LocalStore {
    /// An empty store.
    pub fn new() -> Self {
        Self {
            origin: Instant::now(),
            tats: Mutex::new(HashMap::new()),
            checks: AtomicU64::new(0),
        }
    }

    /// How many keys it holds (expired ones are swept now and then).
    pub fn len(&self) -> usize {
        self.tats.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether it holds no key.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Decides synchronously; [`RateLimitStore::check`] without the future.
    pub fn check_now(&self, key: &str, quotas: &[Quota]) -> Decision {
        let now = u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let mut tats = self.tats.lock().unwrap_or_else(|e| e.into_inner());
        if self.checks.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            // A TAT in the past is the same as no TAT.
            tats.retain(|_, entry| entry.iter().any(|(_, tat)| *tat > now));
        }
        let period_of = |q: &Quota| u64::try_from(q.period.as_nanos()).unwrap_or(u64::MAX);
        let entry = tats.get(key);
        let current: Vec<Option<u64>> = quotas
            .iter()
            .map(|q| {
                let period = period_of(q);
                entry.and_then(|v| v.iter().find(|(p, _)| *p == period).map(|(_, t)| *t))
            })
            .collect();
        let (decision, new_tats) = decide(now, &current, quotas);
        if let Some(new_tats) = new_tats {
            let stored = quotas.iter().map(period_of).zip(new_tats).collect();
            match tats.get_mut(key) {
                Some(entry) => *entry = stored,
                None => {
                    tats.insert(key.to_owned(), stored);
                }
            }
        }
        decision
    }
}

impl RateLimitStore for LocalStore {
    fn check<'a>(
        &'a self,
        key: &'a str,
        quotas: &'a [Quota],
    ) -> BoxFuture<'a, Result<Decision, StoreError>> {
        let decision = self.check_now(key, quotas);
        Box::pin(std::future::ready(Ok(decision)))
    }
}
