use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use http::Request;
use tower_layer::Layer;
use tower_service::Service;

/// The instances a request was sent to, shared by the copies a retry layer makes of it.
///
/// Put into a request's extensions by [`TrackAttempts`] before a retry layer clones the
/// request, it lets [`Balance`](super::Balance) send each retry to an instance not tried
/// yet.
#[derive(Debug, Clone, Default)]
pub struct Attempts {
    tried: Arc<Mutex<Vec<String>>>,
}

impl Attempts {
    /// No attempt yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The ids of the instances tried so far, in order.
    pub fn instances(&self) -> Vec<String> {
        self.tried
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn contains(&self, id: &str) -> bool {
        self.tried
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .any(|tried| tried == id)
    }

    pub(crate) fn record(&self, id: &str) {
        self.tried
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(id.to_owned());
    }
}

/// Wraps services in [`TrackAttempts`]. Put it outside the retry layer.
#[derive(Debug, Clone, Copy, Default)]
pub struct AttemptsLayer;

impl AttemptsLayer {
    /// The layer.
    pub fn new() -> Self {
        Self
    }
}

impl<S> Layer<S> for AttemptsLayer {
    type Service = TrackAttempts<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TrackAttempts::new(inner)
    }
}

/// Gives every request that has none a fresh [`Attempts`] in its extensions.
#[derive(Debug, Clone)]
pub struct TrackAttempts<S> {
    inner: S,
}

impl<S> TrackAttempts<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        Self { inner }
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
}

impl<S, B> Service<Request<B>> for TrackAttempts<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        if req.extensions().get::<Attempts>().is_none() {
            req.extensions_mut().insert(Attempts::new());
        }
        self.inner.call(req)
    }
}
