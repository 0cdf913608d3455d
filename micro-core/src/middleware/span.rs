//! A tracing span per request, continuing the caller's W3C trace.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Instant;

use http::{Request, Response};
use pin_project_lite::pin_project;
use tokio::task::futures::TaskLocalFuture;
use tower_layer::Layer;
use tower_service::Service;

use crate::middleware::RequestId;
use crate::trace::TraceContext;

/// Applies [`RequestSpan`].
#[derive(Debug, Clone)]
pub struct RequestSpanLayer {
    service: Arc<str>,
}

impl RequestSpanLayer {
    /// Creates the layer; `service` is recorded on every span.
    pub fn new(service: &str) -> Self {
        Self {
            service: service.into(),
        }
    }
}

impl<S> Layer<S> for RequestSpanLayer {
    type Service = RequestSpan<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestSpan {
            inner,
            service: self.service.clone(),
        }
    }
}

/// Runs each request inside an `http.request` span and a [`TraceContext`] scope.
///
/// The context continues the incoming `traceparent` (a new span in the caller's trace) or
/// starts a new trace. It is made [current](TraceContext::current) for the handler, so
/// outgoing calls made through [`inject_current`](crate::trace::inject_current) or
/// [`PropagateTrace`](crate::trace::PropagateTrace) carry it on, and it is put in the
/// request's extensions. The span records the service, method, path, the
/// [`RequestId`] when [`SetRequestId`](crate::middleware::SetRequestId) ran before, the
/// trace id, and, when the response is ready, its status and latency.
#[derive(Debug, Clone)]
pub struct RequestSpan<S> {
    inner: S,
    service: Arc<str>,
}

impl<S> RequestSpan<S> {
    /// Wraps `inner`; `service` is recorded on every span.
    pub fn new(inner: S, service: &str) -> Self {
        Self {
            inner,
            service: service.into(),
        }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, B, ResBody> Service<Request<B>> for RequestSpan<S>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    S::Error: std::fmt::Display,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let context = TraceContext::from_headers(request.headers())
            .map_or_else(TraceContext::new_root, |parent| parent.child());
        // The fields are formatted only when a subscriber wants the span.
        let span = tracing::info_span!(
            "http.request",
            service = %self.service,
            method = %request.method(),
            path = %request.uri().path(),
            request_id = %request.extensions().get::<RequestId>().map_or("", RequestId::as_str),
            trace_id = %context.trace_id(),
            span_id = %context.span_id(),
            status = tracing::field::Empty,
            latency_ms = tracing::field::Empty,
        );
        request.extensions_mut().insert(context);
        ResponseFuture {
            inner: context.scoped(self.inner.call(request)),
            span,
            started: Instant::now(),
        }
    }
}

pin_project! {
    /// The response future of [`RequestSpan`]: the inner future, polled inside the span
    /// and the trace context's scope.
    pub struct ResponseFuture<F> {
        #[pin]
        inner: TaskLocalFuture<TraceContext, F>,
        span: tracing::Span,
        started: Instant,
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("span", &self.span)
            .finish_non_exhaustive()
    }
}

impl<F, ResBody, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
    E: std::fmt::Display,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let _entered = this.span.enter();
        let result = ready!(this.inner.poll(cx));
        if !this.span.is_disabled() {
            this.span
                .record("latency_ms", this.started.elapsed().as_secs_f64() * 1000.0);
        }
        match &result {
            Ok(response) => {
                this.span.record("status", response.status().as_u16());
                tracing::debug!("request finished");
            }
            Err(error) => tracing::warn!(%error, "request failed"),
        }
        Poll::Ready(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use tower::ServiceExt;

    async fn current_trace(request: Request<()>) -> Result<Response<String>, Infallible> {
        let current = TraceContext::current().expect("a current context");
        assert_eq!(request.extensions().get::<TraceContext>(), Some(&current));
        Ok(Response::new(current.to_traceparent()))
    }

    #[tokio::test]
    async fn continues_the_incoming_trace_with_a_new_span() {
        let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let service = RequestSpanLayer::new("svc").layer(tower::service_fn(current_trace));
        let request = Request::builder()
            .header("traceparent", incoming)
            .body(())
            .unwrap();
        let response = service.oneshot(request).await.unwrap();
        let current = TraceContext::parse(response.body()).unwrap();
        let parent = TraceContext::parse(incoming).unwrap();
        assert_eq!(current.trace_id(), parent.trace_id());
        assert_ne!(current.span_id(), parent.span_id());
        assert!(current.is_sampled());
    }

    #[tokio::test]
    async fn starts_a_trace_when_none_or_a_bad_one_comes_in() {
        for header in [
            None,
            Some("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
        ] {
            let service = RequestSpanLayer::new("svc").layer(tower::service_fn(current_trace));
            let mut request = Request::builder();
            if let Some(value) = header {
                request = request.header("traceparent", value);
            }
            let response = service.oneshot(request.body(()).unwrap()).await.unwrap();
            assert!(TraceContext::parse(response.body()).is_ok());
        }
    }
}
