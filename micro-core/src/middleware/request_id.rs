//! Accept or create an `x-request-id`, make it visible to handlers and return it.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use http::{HeaderName, HeaderValue, Request, Response};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

/// The `x-request-id` header.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The longest incoming request id that is kept; longer ones are replaced.
pub const MAX_LEN: usize = 128;

/// A request's id, from the incoming `x-request-id` header or freshly made.
///
/// [`SetRequestId`] puts it in the request's extensions, where handlers read it with
/// `Extension<RequestId>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RequestId(HeaderValue);

impl RequestId {
    /// A new random id: 32 lowercase hex digits.
    pub fn generate() -> Self {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let random = rand::random::<u128>();
        let mut hex = [0u8; 32];
        for (i, digit) in hex.iter_mut().enumerate() {
            *digit = DIGITS[((random >> (124 - 4 * i)) & 0xf) as usize];
        }
        Self(HeaderValue::from_bytes(&hex).expect("hex digits are a valid header value"))
    }

    /// Accepts an incoming id if it is 1 to [`MAX_LEN`] visible ASCII characters.
    pub fn parse(value: &HeaderValue) -> Option<Self> {
        let bytes = value.as_bytes();
        let acceptable = !bytes.is_empty()
            && bytes.len() <= MAX_LEN
            && bytes.iter().all(|b| b.is_ascii_graphic());
        acceptable.then(|| Self(value.clone()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        self.0
            .to_str()
            .expect("only visible ASCII ids are constructed")
    }

    /// The id as a header value.
    pub fn header_value(&self) -> &HeaderValue {
        &self.0
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Applies [`SetRequestId`].
#[derive(Debug, Clone, Copy, Default)]
pub struct SetRequestIdLayer;

impl SetRequestIdLayer {
    /// Creates the layer.
    pub fn new() -> Self {
        Self
    }
}

impl<S> Layer<S> for SetRequestIdLayer {
    type Service = SetRequestId<S>;

    fn layer(&self, inner: S) -> Self::Service {
        SetRequestId::new(inner)
    }
}

/// Keeps a valid incoming `x-request-id` or replaces it with a new one, stores the
/// [`RequestId`] in the request's extensions and writes it on the response.
#[derive(Debug, Clone)]
pub struct SetRequestId<S> {
    inner: S,
}

impl<S> SetRequestId<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        Self { inner }
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

impl<S, B, ResBody> Service<Request<B>> for SetRequestId<S>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let id = request
            .headers()
            .get(&X_REQUEST_ID)
            .and_then(RequestId::parse)
            .unwrap_or_else(RequestId::generate);
        request
            .headers_mut()
            .insert(X_REQUEST_ID.clone(), id.header_value().clone());
        request.extensions_mut().insert(id.clone());
        ResponseFuture {
            inner: self.inner.call(request),
            id: Some(id),
        }
    }
}

pin_project! {
    /// The response future of [`SetRequestId`].
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        id: Option<RequestId>,
    }
}

impl<F, ResBody, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut response = ready!(this.inner.poll(cx))?;
        if let Some(id) = this.id.take() {
            response
                .headers_mut()
                .insert(X_REQUEST_ID.clone(), id.header_value().clone());
        }
        Poll::Ready(Ok(response))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use tower::ServiceExt;

    async fn echo_extension(request: Request<()>) -> Result<Response<String>, Infallible> {
        let seen = request.extensions().get::<RequestId>().unwrap().to_string();
        Ok(Response::new(seen))
    }

    #[tokio::test]
    async fn keeps_a_valid_incoming_id() {
        let service = SetRequestIdLayer::new().layer(tower::service_fn(echo_extension));
        let request = Request::builder()
            .header("x-request-id", "abc-123")
            .body(())
            .unwrap();
        let response = service.oneshot(request).await.unwrap();
        assert_eq!(response.headers()["x-request-id"], "abc-123");
        assert_eq!(response.body(), "abc-123");
    }

    #[tokio::test]
    async fn replaces_a_missing_or_unacceptable_id() {
        for incoming in [None, Some("has space"), Some(&*"x".repeat(MAX_LEN + 1))] {
            let service = SetRequestIdLayer::new().layer(tower::service_fn(echo_extension));
            let mut request = Request::builder();
            if let Some(value) = incoming {
                request = request.header("x-request-id", value);
            }
            let response = service.oneshot(request.body(()).unwrap()).await.unwrap();
            let id = response.headers()["x-request-id"].to_str().unwrap();
            assert_eq!(id.len(), 32, "{incoming:?} gave {id}");
            assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
            assert_eq!(response.body(), id);
        }
    }

    #[test]
    fn generated_ids_differ() {
        assert_ne!(RequestId::generate(), RequestId::generate());
    }
}
