//! A middleware that may or may not be there, so a policy's stack has one type whatever
//! it enables.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use pin_project_lite::pin_project;
use tower_service::Service;

use crate::error::BoxError;

/// Either the middleware `M` around a service, or that service `S` bare.
#[derive(Debug, Clone)]
pub(crate) enum Optional<M, S> {
    On(M),
    Off(S),
}

impl<M, S> Optional<M, S> {
    pub(crate) fn new(middleware: Option<impl FnOnce(S) -> M>, inner: S) -> Self {
        match middleware {
            Some(wrap) => Self::On(wrap(inner)),
            None => Self::Off(inner),
        }
    }

    pub(crate) fn as_on(&self) -> Option<&M> {
        match self {
            Self::On(middleware) => Some(middleware),
            Self::Off(_) => None,
        }
    }
}

/// A middleware that wraps one inner service.
pub(crate) trait Wrapper {
    type Inner;
    fn inner_ref(&self) -> &Self::Inner;
    fn inner_mut(&mut self) -> &mut Self::Inner;
    fn into_inner(self) -> Self::Inner;
}

impl<M, S> Optional<M, S>
where
    M: Wrapper<Inner = S>,
{
    pub(crate) fn service_ref(&self) -> &S {
        match self {
            Self::On(middleware) => middleware.inner_ref(),
            Self::Off(inner) => inner,
        }
    }

    pub(crate) fn service_mut(&mut self) -> &mut S {
        match self {
            Self::On(middleware) => middleware.inner_mut(),
            Self::Off(inner) => inner,
        }
    }

    pub(crate) fn into_service(self) -> S {
        match self {
            Self::On(middleware) => middleware.into_inner(),
            Self::Off(inner) => inner,
        }
    }
}

macro_rules! wrapper {
    ($($name:ident),+) => {$(
        impl<S> Wrapper for super::$name<S> {
            type Inner = S;
            fn inner_ref(&self) -> &S {
                self.get_ref()
            }
            fn inner_mut(&mut self) -> &mut S {
                self.get_mut()
            }
            fn into_inner(self) -> S {
                super::$name::into_inner(self)
            }
        }
    )+};
}

wrapper!(Bulkhead, Retry, CircuitBreaker, Timeout);

impl<M, S, Req> Service<Req> for Optional<M, S>
where
    M: Service<Req, Response = S::Response>,
    M::Error: Into<BoxError>,
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = OptionalFuture<M::Future, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        match self {
            Self::On(middleware) => middleware.poll_ready(cx).map_err(Into::into),
            Self::Off(inner) => inner.poll_ready(cx).map_err(Into::into),
        }
    }

    fn call(&mut self, req: Req) -> Self::Future {
        match self {
            Self::On(middleware) => OptionalFuture::On {
                future: middleware.call(req),
            },
            Self::Off(inner) => OptionalFuture::Off {
                future: inner.call(req),
            },
        }
    }
}

pin_project! {
    #[project = OptionalProj]
    pub(crate) enum OptionalFuture<A, B> {
        On { #[pin] future: A },
        Off { #[pin] future: B },
    }
}

impl<A, B, T, E1, E2> Future for OptionalFuture<A, B>
where
    A: Future<Output = Result<T, E1>>,
    E1: Into<BoxError>,
    B: Future<Output = Result<T, E2>>,
    E2: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Poll::Ready(match self.project() {
            OptionalProj::On { future } => ready!(future.poll(cx)).map_err(Into::into),
            OptionalProj::Off { future } => ready!(future.poll(cx)).map_err(Into::into),
        })
    }
}
