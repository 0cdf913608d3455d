//! Cap the calls in flight, queue a few more, and turn the rest away at once.
//!
//! A [`Bulkhead`] admits at most [`max_concurrent`](BulkheadConfig::max_concurrent)
//! calls at a time. A call beyond that waits, in arrival order, for one to finish, as long
//! as fewer than [`max_queued`](BulkheadConfig::max_queued) calls are already waiting;
//! otherwise it fails at once with [`BulkheadFull`]. One slow dependency so cannot tie up
//! every task of a service, and callers learn at once that they should back off instead
//! of piling up.
//!
//! The limit is a [`tokio::sync::Semaphore`] and the queue length an atomic counter, both
//! shared by clones of the bulkhead. Admission is decided in
//! [`call`](tower_service::Service::call), so the service is always ready; the inner
//! service is cloned for each call, which then waits for the clone's readiness under its
//! permit (the ready-oneshot pattern). Time spent queued is not bounded here: put a
//! timeout outside the bulkhead to bound it.

mod config;
mod error;
pub mod future;
mod layer;

#[cfg(test)]
mod tests;

pub use self::config::BulkheadConfig;
pub use self::error::BulkheadFull;
pub use self::layer::BulkheadLayer;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::{Semaphore, TryAcquireError};
use tower_service::Service;

use self::future::{QueueSlot, ResponseFuture};
use crate::error::BoxError;

/// Limits the calls in flight to the inner service, with a bounded queue.
///
/// Clones share the limit and the queue.
#[derive(Debug, Clone)]
pub struct Bulkhead<S> {
    inner: S,
    permits: Arc<Semaphore>,
    queued: Arc<AtomicUsize>,
    config: BulkheadConfig,
}

impl<S> Bulkhead<S> {
    /// Wraps `inner` in a new bulkhead sized by `config`.
    ///
    /// Out-of-range settings are clamped; see [`BulkheadConfig`].
    pub fn new(inner: S, config: BulkheadConfig) -> Self {
        let config = config.clamped();
        Self {
            inner,
            permits: Arc::new(Semaphore::new(config.max_concurrent)),
            queued: Arc::new(AtomicUsize::new(0)),
            config,
        }
    }

    /// Returns the settings in use, after clamping.
    pub fn config(&self) -> &BulkheadConfig {
        &self.config
    }

    /// Returns how many calls are running now.
    pub fn in_flight(&self) -> usize {
        self.config.max_concurrent - self.permits.available_permits()
    }

    /// Returns how many calls are waiting for a permit now.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    /// Returns a reference to the inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Returns a mutable reference to the inner service.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes the wrapper, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// Takes a place in the queue, unless it is full.
    fn enqueue(&self) -> Option<QueueSlot> {
        let max = self.config.max_queued;
        self.queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| QueueSlot::new(self.queued.clone()))
    }
}

impl<S, Req> Service<Req> for Bulkhead<S>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S, Req>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let service = self.inner.clone();
        match self.permits.clone().try_acquire_owned() {
            Ok(permit) => ResponseFuture::running(service, req, permit),
            Err(TryAcquireError::NoPermits) => match self.enqueue() {
                Some(slot) => ResponseFuture::queued(service, req, self.permits.clone(), slot),
                None => ResponseFuture::rejected(BulkheadFull::new()),
            },
            // The semaphore is never closed; if it were, nothing could be admitted.
            Err(TryAcquireError::Closed) => ResponseFuture::rejected(BulkheadFull::new()),
        }
    }
}
