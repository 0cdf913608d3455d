//! Future types for [`Retry`](super::Retry).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower_service::Service;

use super::Policy;
use crate::error::{is_retryable, BoxError};

pin_project! {
    /// Response future of [`Retry`](super::Retry).
    pub struct ResponseFuture<S, Req>
    where
        S: Service<Req>,
    {
        #[pin]
        state: State<S::Future>,
        service: S,
        // A copy of the request for the next attempt; `None` once the last one is sent.
        request: Option<Req>,
        attempt: u32,
        policy: Arc<Policy>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Called { #[pin] future: F },
        Sleeping { #[pin] sleep: Sleep },
        Readying,
    }
}

impl<S, Req> ResponseFuture<S, Req>
where
    S: Service<Req>,
{
    pub(super) fn new(
        future: S::Future,
        service: S,
        request: Option<Req>,
        policy: Arc<Policy>,
    ) -> Self {
        Self {
            state: State::Called { future },
            service,
            request,
            attempt: 1,
            policy,
        }
    }
}

impl<S, Req> Future for ResponseFuture<S, Req>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    Req: Clone,
{
    type Output = Result<S::Response, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Called { future } => {
                    let err: BoxError = match ready!(future.poll(cx)) {
                        Ok(response) => return Poll::Ready(Ok(response)),
                        Err(err) => err.into(),
                    };
                    let attempt = *this.attempt;
                    if this.request.is_none() || !is_retryable(&*err) {
                        return Poll::Ready(Err(err));
                    }
                    if !this.policy.withdraw() {
                        tracing::debug!(attempt, error = %err, "retry budget exhausted");
                        return Poll::Ready(Err(err));
                    }
                    let delay = this.policy.delay(attempt);
                    tracing::debug!(attempt, ?delay, error = %err, "retrying");
                    this.state.set(State::Sleeping {
                        sleep: tokio::time::sleep(delay),
                    });
                }
                StateProj::Sleeping { sleep } => {
                    ready!(sleep.poll(cx));
                    this.state.set(State::Readying);
                }
                StateProj::Readying => {
                    if let Err(err) = ready!(this.service.poll_ready(cx)) {
                        return Poll::Ready(Err(err.into()));
                    }
                    *this.attempt += 1;
                    let request = if *this.attempt < this.policy.max_attempts() {
                        this.request.clone()
                    } else {
                        this.request.take()
                    }
                    .expect("a retry is only scheduled while a request is kept");
                    this.state.set(State::Called {
                        future: this.service.call(request),
                    });
                }
            }
        }
    }
}

impl<S, Req> fmt::Debug for ResponseFuture<S, Req>
where
    S: Service<Req>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("attempt", &self.attempt)
            .finish_non_exhaustive()
    }
}
