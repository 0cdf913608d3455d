//! The server side: verify the caller, then check the route's policy.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::response::{IntoResponse, Response};
use http::Request;
use tower_layer::Layer;
use tower_service::Service;

use super::{Caller, Error, ErrorKind, KeyRing, IDENTITY_HEADER};
use crate::service::BoxFuture;

tokio::task_local! {
    static CURRENT: Caller;
}

/// The caller of the request being handled on this task, if a [`VerifyCaller`]
/// verified one.
///
/// [`SignCallerLayer`](super::SignCallerLayer) reads it to carry the end user on to the
/// next service. It is not inherited by spawned tasks: work that outlives the request
/// (a saga step, a consumer) passes the user explicitly with
/// [`OnBehalfOf`](super::OnBehalfOf).
pub fn current_caller() -> Option<Caller> {
    CURRENT.try_with(Clone::clone).ok()
}

/// Verifies the [identity token](super::IDENTITY_HEADER) of every request made for
/// `audience` (this service's name) and puts the [`Caller`] in its extensions; answers
/// `401` to a request without a valid one.
///
/// Any incoming [`Caller`] extension is replaced, so only a verified one reaches the
/// handler. The inner service runs with the caller as [`current_caller`].
#[derive(Clone, Debug)]
pub struct VerifyCallerLayer {
    keys: KeyRing,
    audience: Arc<str>,
}

impl VerifyCallerLayer {
    /// Verifies tokens with `keys`, accepting only those made for `audience`.
    pub fn new(keys: KeyRing, audience: impl Into<Arc<str>>) -> Self {
        Self {
            keys,
            audience: audience.into(),
        }
    }
}

impl<S> Layer<S> for VerifyCallerLayer {
    type Service = VerifyCaller<S>;

    fn layer(&self, inner: S) -> Self::Service {
        VerifyCaller {
            inner,
            keys: self.keys.clone(),
            audience: self.audience.clone(),
        }
    }
}

/// The service made by [`VerifyCallerLayer`].
#[derive(Clone, Debug)]
pub struct VerifyCaller<S> {
    inner: S,
    keys: KeyRing,
    audience: Arc<str>,
}

impl<S> VerifyCaller<S> {
    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the service.
    pub fn into_inner(self) -> S {
        self.inner
    }

    fn caller<B>(&self, req: &Request<B>) -> Result<Caller, Error> {
        let mut values = req.headers().get_all(IDENTITY_HEADER).iter();
        let (Some(value), None) = (values.next(), values.next()) else {
            return Err(Error::new(if req.headers().contains_key(IDENTITY_HEADER) {
                ErrorKind::Malformed
            } else {
                ErrorKind::Missing
            }));
        };
        let token = value
            .to_str()
            .map_err(|_| Error::new(ErrorKind::Malformed))?;
        self.keys.verify(token, &self.audience)
    }
}

impl<S, B> Service<Request<B>> for VerifyCaller<S>
where
    S: Service<Request<B>, Response = Response> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        match self.caller(&req) {
            Ok(caller) => {
                req.extensions_mut().insert(caller.clone());
                let future = CURRENT.sync_scope(caller.clone(), || self.inner.call(req));
                Box::pin(CURRENT.scope(caller, future))
            }
            Err(err) => {
                req.extensions_mut().remove::<Caller>();
                Box::pin(async move { Ok(err.into_response()) })
            }
        }
    }
}

/// Lets only the named services call the routes it wraps: `403` for a verified caller
/// of another service, `401` for a request no [`VerifyCaller`] verified.
///
/// Put it on a route with axum's `route_layer`, under a [`VerifyCallerLayer`].
#[derive(Clone)]
pub struct AllowCallersLayer {
    services: Arc<HashSet<String>>,
}

impl AllowCallersLayer {
    /// Allows calls from `services` only.
    pub fn new<I, T>(services: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<String>,
    {
        Self {
            services: Arc::new(services.into_iter().map(Into::into).collect()),
        }
    }
}

impl fmt::Debug for AllowCallersLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.services.iter()).finish()
    }
}

impl<S> Layer<S> for AllowCallersLayer {
    type Service = AllowCallers<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AllowCallers {
            inner,
            services: self.services.clone(),
        }
    }
}

/// The service made by [`AllowCallersLayer`].
#[derive(Clone)]
pub struct AllowCallers<S> {
    inner: S,
    services: Arc<HashSet<String>>,
}

impl<S: fmt::Debug> fmt::Debug for AllowCallers<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AllowCallers")
            .field("inner", &self.inner)
            .field("services", &self.services)
            .finish()
    }
}

impl<S> AllowCallers<S> {
    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, B> Service<Request<B>> for AllowCallers<S>
where
    S: Service<Request<B>, Response = Response> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let refusal = match req.extensions().get::<Caller>() {
            None => Some(Error::new(ErrorKind::Missing)),
            Some(caller) if !self.services.contains(&caller.service) => {
                Some(Error::new(ErrorKind::Forbidden {
                    service: caller.service.clone(),
                }))
            }
            Some(_) => None,
        };
        match refusal {
            Some(err) => Box::pin(async move { Ok(err.into_response()) }),
            None => Box::pin(self.inner.call(req)),
        }
    }
}
