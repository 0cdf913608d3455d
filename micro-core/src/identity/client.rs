//! The calling side: sign each outgoing request as this service.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderValue, Request};
use tower_layer::Layer;
use tower_service::Service;

use super::{current_caller, Caller, KeyRing, IDENTITY_HEADER};
use crate::error::BoxError;
use crate::service::BoxFuture;

/// A request extension naming the end user an outgoing call acts for, overriding the
/// [current caller](super::current_caller)'s user.
///
/// Set it with [`RequestBuilder::extension`](crate::client::RequestBuilder::extension)
/// where the call is not made while handling the user's request (a saga step, an event
/// consumer).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OnBehalfOf(pub Option<String>);

impl OnBehalfOf {
    /// The call acts for `user`.
    pub fn user(user: impl Into<String>) -> Self {
        Self(Some(user.into()))
    }

    /// The call acts for nobody, whoever the current caller's user is.
    pub fn nobody() -> Self {
        Self(None)
    }
}

/// Signs every request with an [identity token](super::IDENTITY_HEADER) saying that
/// `service` calls `audience` (the target service's name), for the end user of the
/// [`OnBehalfOf`] extension, else of the [current caller](super::current_caller).
///
/// Add it to a client with
/// [`ClientBuilder::layer`](crate::client::ClientBuilder::layer). It replaces any
/// identity header the request had. Each attempt of a retried call is signed afresh
/// when the layer sits below the retry.
#[derive(Clone, Debug)]
pub struct SignCallerLayer {
    keys: KeyRing,
    service: Arc<str>,
    audience: Arc<str>,
}

impl SignCallerLayer {
    /// Signs as `service` for `audience` with `keys`.
    pub fn new(keys: KeyRing, service: impl Into<Arc<str>>, audience: impl Into<Arc<str>>) -> Self {
        Self {
            keys,
            service: service.into(),
            audience: audience.into(),
        }
    }
}

impl<S> Layer<S> for SignCallerLayer {
    type Service = SignCaller<S>;

    fn layer(&self, inner: S) -> Self::Service {
        SignCaller {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service made by [`SignCallerLayer`].
#[derive(Clone, Debug)]
pub struct SignCaller<S> {
    inner: S,
    layer: SignCallerLayer,
}

impl<S> SignCaller<S> {
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

impl<S, B> Service<Request<B>> for SignCaller<S>
where
    S: Service<Request<B>> + Send,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<S::Response, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let user = match req.extensions().get::<OnBehalfOf>() {
            Some(on_behalf_of) => on_behalf_of.0.clone(),
            None => current_caller().and_then(|c| c.user),
        };
        let caller = Caller {
            service: self.layer.service.to_string(),
            user,
        };
        let signed = self
            .layer
            .keys
            .sign(&caller, &self.layer.audience)
            .map_err(BoxError::from)
            .and_then(|token| HeaderValue::try_from(token).map_err(BoxError::from));
        match signed {
            Ok(value) => {
                req.headers_mut().insert(IDENTITY_HEADER, value);
                let future = self.inner.call(req);
                Box::pin(async move { future.await.map_err(Into::into) })
            }
            Err(err) => Box::pin(async move { Err(err) }),
        }
    }
}
