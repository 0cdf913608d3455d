//! Future types for [`Bulkhead`](super::Bulkhead).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use pin_project_lite::pin_project;
use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore};
use tower::util::Oneshot;
use tower_service::Service;

use super::BulkheadFull;
use crate::error::BoxError;

type Acquire = Pin<Box<dyn Future<Output = Result<OwnedSemaphorePermit, AcquireError>> + Send>>;

pin_project! {
    /// Response future of [`Bulkhead`](super::Bulkhead).
    pub struct ResponseFuture<S, Req>
    where
        S: Service<Req>,
    {
        #[pin]
        state: State<S, Req>,
    }
}

pin_project! {
    #[project = StateProj]
    #[project_replace = StateReplace]
    enum State<S, Req>
    where
        S: Service<Req>,
    {
        Queued {
            acquire: Acquire,
            service: S,
            request: Req,
            slot: QueueSlot,
        },
        Running {
            #[pin]
            call: Oneshot<S, Req>,
            permit: OwnedSemaphorePermit,
        },
        Rejected {
            error: BulkheadFull,
        },
        Done,
    }
}

impl<S, Req> ResponseFuture<S, Req>
where
    S: Service<Req>,
{
    pub(super) fn running(service: S, request: Req, permit: OwnedSemaphorePermit) -> Self {
        Self {
            state: State::Running {
                call: Oneshot::new(service, request),
                permit,
            },
        }
    }

    pub(super) fn queued(
        service: S,
        request: Req,
        permits: Arc<Semaphore>,
        slot: QueueSlot,
    ) -> Self {
        Self {
            state: State::Queued {
                acquire: Box::pin(permits.acquire_owned()),
                service,
                request,
                slot,
            },
        }
    }

    pub(super) fn rejected(error: BulkheadFull) -> Self {
        Self {
            state: State::Rejected { error },
        }
    }
}

impl<S, Req> Future for ResponseFuture<S, Req>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    type Output = Result<S::Response, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        loop {
            match state.as_mut().project() {
                StateProj::Queued { acquire, .. } => {
                    let permit = match ready!(acquire.as_mut().poll(cx)) {
                        Ok(permit) => permit,
                        Err(_closed) => return Poll::Ready(Err(BulkheadFull::new().into())),
                    };
                    // Replacing the state drops the queue slot as the call starts.
                    if let StateReplace::Queued {
                        service, request, ..
                    } = state.as_mut().project_replace(State::Done)
                    {
                        state.set(State::Running {
                            call: Oneshot::new(service, request),
                            permit,
                        });
                    }
                }
                StateProj::Running { call, .. } => {
                    let result = ready!(call.poll(cx));
                    // Free the permit now rather than when the future is dropped.
                    state.set(State::Done);
                    return Poll::Ready(result.map_err(Into::into));
                }
                StateProj::Rejected { error } => return Poll::Ready(Err(error.clone().into())),
                StateProj::Done => panic!("bulkhead response future polled after completion"),
            }
        }
    }
}

impl<S, Req> fmt::Debug for ResponseFuture<S, Req>
where
    S: Service<Req>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            State::Queued { .. } => "queued",
            State::Running { .. } => "running",
            State::Rejected { .. } => "rejected",
            State::Done => "done",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}

/// A place in a bulkhead's queue, given back when dropped.
pub(super) struct QueueSlot(Arc<AtomicUsize>);

impl QueueSlot {
    pub(super) fn new(queued: Arc<AtomicUsize>) -> Self {
        Self(queued)
    }
}

impl Drop for QueueSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}
