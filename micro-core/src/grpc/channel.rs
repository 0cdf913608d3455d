//! [`GrpcChannel`]: the transport of generated tonic clients, with micro's client stack.

use std::collections::HashSet;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tonic::body::Body;
use tonic::{Code, Status};
use tower::util::BoxCloneSyncService;
use tower::ServiceExt;
use tower_layer::Layer;
use tower_service::Service;

use super::status::{status_from_error, CallError};
use super::timeout::{format_timeout, timeout_of, GRPC_TIMEOUT};
use crate::error::BoxError;
use crate::resilience::ResiliencePolicy;
use crate::service::BoxFuture;
use crate::trace::{PropagateTrace, TraceContext};

#[cfg(feature = "tls")]
type Connector = crate::tls::HttpsConnector;
#[cfg(not(feature = "tls"))]
type Connector = HttpConnector;

/// The request type of the channel's stack: its body can be sent again when the method is
/// idempotent (it was read whole), and only once otherwise.
pub type GrpcRequest = Request<CallBody>;

/// The channel's stack, type-erased: what a layer added with
/// [`GrpcChannelBuilder::layer`] wraps. Its failures are [`CallError`]s in the
/// [`BoxError`].
pub type GrpcStack = BoxCloneSyncService<GrpcRequest, Response<Body>, BoxError>;

type LayerFn = Box<dyn FnOnce(GrpcStack) -> GrpcStack + Send>;

/// The body of a [`GrpcRequest`]: cheap to clone; a streaming body is sent by the first
/// attempt only.
#[derive(Clone)]
pub struct CallBody(Kind);

#[derive(Clone)]
enum Kind {
    Buffered(Bytes),
    Once(Arc<Mutex<Option<Body>>>),
}

impl CallBody {
    fn is_buffered(&self) -> bool {
        matches!(self.0, Kind::Buffered(_))
    }

    fn take(&self) -> Option<Body> {
        match &self.0 {
            Kind::Buffered(bytes) => Some(Body::new(Full::new(bytes.clone()))),
            Kind::Once(body) => body.lock().unwrap_or_else(PoisonError::into_inner).take(),
        }
    }
}

impl fmt::Debug for CallBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Kind::Buffered(bytes) => write!(f, "CallBody::Buffered({} bytes)", bytes.len()),
            Kind::Once(_) => f.write_str("CallBody::Streaming"),
        }
    }
}

/// Whether the call may be sent again, in each attempt's extensions.
#[derive(Debug, Clone, Copy)]
struct ReplaySafe(bool);

/// When the whole call must be over, in each attempt's extensions.
#[derive(Debug, Clone, Copy)]
struct CallDeadline(Instant);

/// The transport of generated tonic clients (`ProductServiceClient::new(channel)`): HTTP/2
/// over pooled connections, with the deadline, the trace context, the resilience policy
/// and the layers given to its [builder](GrpcChannelBuilder). See the
/// [module docs](super#calling).
///
/// Cheap to clone; clones share the connections, the breaker and the retry budget.
#[derive(Clone)]
pub struct GrpcChannel {
    shared: Arc<Shared>,
}

struct Shared {
    scheme: Scheme,
    authority: Authority,
    stack: GrpcStack,
    idempotent: HashSet<String>,
    retries: bool,
    timeout: Option<Duration>,
    max_buffered: usize,
}

impl GrpcChannel {
    /// Starts building a channel to `base_url` (`http://orders:8080`; `https` with the
    /// `tls` feature). An invalid URL is reported by [`GrpcChannelBuilder::build`].
    pub fn builder(base_url: &str) -> GrpcChannelBuilder {
        GrpcChannelBuilder::new(base_url)
    }

    /// Whether calls to `path` (`/package.Service/Method`) were marked
    /// [idempotent](GrpcChannelBuilder::idempotent).
    pub fn is_idempotent(&self, path: &str) -> bool {
        is_idempotent(&self.shared.idempotent, path)
    }
}

impl fmt::Debug for GrpcChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrpcChannel")
            .field("authority", &self.shared.authority)
            .field("idempotent", &self.shared.idempotent)
            .field("timeout", &self.shared.timeout)
            .finish_non_exhaustive()
    }
}

impl Service<Request<Body>> for GrpcChannel {
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Response<Body>, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let shared = self.shared.clone();
        Box::pin(async move {
            let outcome = call(&shared, request).await;
            // The generated client finds the status in the error and answers with it.
            outcome.map_err(|error| -> BoxError { Box::new(status_from_error(&*error)) })
        })
    }
}

async fn call(shared: &Shared, request: Request<Body>) -> Result<Response<Body>, BoxError> {
    let (mut parts, body) = request.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let replay_safe = shared.retries && is_idempotent(&shared.idempotent, path.path());
    let mut uri = Uri::builder()
        .scheme(shared.scheme.clone())
        .authority(shared.authority.clone())
        .path_and_query(path);
    if let Some(scheme) = parts.uri.scheme() {
        uri = uri.scheme(scheme.clone());
    }
    parts.uri = uri
        .build()
        .map_err(|err| CallError::invalid(Status::internal(format!("invalid uri: {err}"))))?;
    let timeout = timeout_of(&parts.headers).or(shared.timeout);
    let deadline = timeout.map(|after| Instant::now() + after);
    if let Some(deadline) = deadline {
        parts.extensions.insert(CallDeadline(deadline));
    }
    parts.extensions.insert(ReplaySafe(replay_safe));
    // Carried in the extensions as well as the task-local, so that the trace survives
    // layers that move the call to another task.
    if parts.extensions.get::<TraceContext>().is_none() {
        if let Some(context) = TraceContext::current() {
            parts.extensions.insert(context);
        }
    }
    #[cfg(feature = "identity")]
    if parts
        .extensions
        .get::<crate::identity::OnBehalfOf>()
        .is_none()
    {
        if let Some(caller) = crate::identity::current_caller() {
            parts
                .extensions
                .insert(crate::identity::OnBehalfOf(caller.user));
        }
    }
    let body = if replay_safe {
        let bytes = Limited::new(body, shared.max_buffered)
            .collect()
            .await
            .map_err(|err| {
                let status = if err.is::<LengthLimitError>() {
                    Status::resource_exhausted(format!(
                        "the request is larger than the {} bytes an idempotent call may buffer",
                        shared.max_buffered
                    ))
                } else {
                    Status::cancelled(format!("the request body failed: {err}"))
                };
                CallError::invalid(status)
            })?
            .to_bytes();
        CallBody(Kind::Buffered(bytes))
    } else {
        CallBody(Kind::Once(Arc::new(Mutex::new(Some(body)))))
    };
    let request = Request::from_parts(parts, body);
    let response = shared.stack.clone().oneshot(request);
    let response = match deadline {
        Some(deadline) => tokio::time::timeout_at(deadline, response)
            .await
            .map_err(|_| {
                CallError::invalid(Status::deadline_exceeded(format!(
                    "no answer within the call's deadline of {:?}",
                    timeout.unwrap_or_default()
                )))
            })??,
        None => response.await?,
    };
    Ok(match deadline {
        Some(deadline) => response.map(|body| Body::new(DeadlineBody::new(body, deadline))),
        None => response,
    })
}

fn is_idempotent(idempotent: &HashSet<String>, path: &str) -> bool {
    let service = path
        .strip_prefix('/')
        .and_then(|path| path.split_once('/'))
        .map(|(service, _)| service);
    idempotent.contains(path) || service.is_some_and(|service| idempotent.contains(service))
}

/// Configures and builds a [`GrpcChannel`]; see [`GrpcChannel::builder`].
#[must_use]
pub struct GrpcChannelBuilder {
    base: Result<(Scheme, Authority), String>,
    timeout: Option<Duration>,
    attempt_timeout: Option<Duration>,
    connect_timeout: Option<Duration>,
    idempotent: HashSet<String>,
    retries: bool,
    layers: Vec<LayerFn>,
    max_buffered: usize,
    #[cfg(feature = "tls")]
    tls: Option<crate::tls::ClientTlsConfig>,
}

impl GrpcChannelBuilder {
    fn new(base_url: &str) -> Self {
        let base = base_url
            .parse::<Uri>()
            .map_err(|err| format!("invalid url `{base_url}`: {err}"))
            .and_then(|uri| {
                let parts = uri.into_parts();
                match (parts.scheme, parts.authority) {
                    (Some(scheme), Some(authority))
                        if scheme == Scheme::HTTP
                            || (scheme == Scheme::HTTPS && cfg!(feature = "tls")) =>
                    {
                        Ok((scheme, authority))
                    }
                    (Some(scheme), Some(_)) if scheme == Scheme::HTTPS => Err(format!(
                        "`{base_url}`: https urls need micro-core's `tls` feature"
                    )),
                    _ => Err(format!(
                        "`{base_url}` is not an http or https url with a host"
                    )),
                }
            });
        Self {
            base,
            timeout: None,
            attempt_timeout: None,
            connect_timeout: None,
            idempotent: HashSet::new(),
            retries: false,
            layers: Vec::new(),
            max_buffered: 4 * 1024 * 1024,
            #[cfg(feature = "tls")]
            tls: None,
        }
    }

    /// The deadline of calls that carry none of their own (a tonic request's
    /// `set_timeout` sends `grpc-timeout`, which wins): the whole call, retries included,
    /// and its response stream. Each attempt tells the server the time left in its
    /// `grpc-timeout`. Defaults to none.
    pub fn timeout(mut self, timeout: impl Into<Option<Duration>>) -> Self {
        self.timeout = timeout.into();
        self
    }

    /// Bounds connecting to a server; failing that is retryable whatever the method, as the
    /// call was never sent.
    pub fn connect_timeout(mut self, timeout: impl Into<Option<Duration>>) -> Self {
        self.connect_timeout = timeout.into();
        self
    }

    /// Marks a method (`/shop.product.v1.ProductService/GetProduct`) or every method of a
    /// service (`shop.product.v1.ProductService`) as idempotent: its calls are retried by
    /// the [policy](Self::policy) when they fail in a retryable way. Their request messages
    /// are buffered (up to 4 MiB) so that they can be sent again.
    pub fn idempotent(mut self, method_or_service: impl Into<String>) -> Self {
        self.idempotent.insert(method_or_service.into());
        self
    }

    /// Wraps the calls in `policy` named `name` (the name labels its breaker's metrics):
    /// retries (of idempotent methods only), the breaker, the bulkhead. It takes its place
    /// among the [layers](Self::layer), in the order they are added. The policy's timeout
    /// bounds each attempt until its answer begins; a timed-out attempt is retried only for
    /// an idempotent method.
    ///
    /// The breaker counts the failures that say the server is unwell (a call that could
    /// not be made or was lost, `UNAVAILABLE`, `INTERNAL`, `UNKNOWN`, `DATA_LOSS`,
    /// `RESOURCE_EXHAUSTED`, a timeout), not the answers that say the call was wrong
    /// (`NOT_FOUND`, `INVALID_ARGUMENT`, ...).
    ///
    /// # Errors
    ///
    /// [`build`](Self::build) fails when a setting of the policy is out of range.
    pub fn policy(mut self, name: &str, mut policy: ResiliencePolicy) -> Self {
        if let Some(timeout) = policy.timeout.take() {
            self.attempt_timeout = Some(timeout);
        }
        if let Err(invalid) = policy.validate() {
            self.base = Err(format!("the policy of `{name}`: {invalid}"));
        }
        self.retries |= policy.retry.is_some();
        self.layer(policy.layer(name))
    }

    /// Wraps the stack in `layer`, outside the transport and trace propagation. The first
    /// layer added is the outermost; a layer added after the [policy](Self::policy) sees
    /// each attempt. Balancers and identity signing plug in here.
    pub fn layer<L>(mut self, layer: L) -> Self
    where
        L: Layer<GrpcStack> + Send + 'static,
        L::Service: Service<GrpcRequest, Response = Response<Body>> + Clone + Send + Sync + 'static,
        <L::Service as Service<GrpcRequest>>::Error: Into<BoxError>,
        <L::Service as Service<GrpcRequest>>::Future: Send + 'static,
    {
        self.layers.push(Box::new(move |inner: GrpcStack| {
            BoxCloneSyncService::new(layer.layer(inner).map_err(Into::into))
        }));
        self
    }

    /// Signs every attempt as the service `caller` for `audience` (the called service),
    /// carrying the end user along, as
    /// [`SignCallerLayer`](crate::identity::SignCallerLayer) does for HTTP.
    #[cfg(feature = "identity")]
    pub fn sign_as(
        self,
        keys: crate::identity::KeyRing,
        caller: impl Into<Arc<str>>,
        audience: impl Into<Arc<str>>,
    ) -> Self {
        self.layer(crate::identity::SignCallerLayer::new(
            keys, caller, audience,
        ))
    }

    /// Verifies servers and shows a client certificate as `tls` says, for an `https`
    /// base URL.
    #[cfg(feature = "tls")]
    pub fn tls(mut self, tls: crate::tls::ClientTlsConfig) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Builds the channel. Needs no runtime; the first call must be made inside a Tokio
    /// runtime.
    ///
    /// # Errors
    ///
    /// When the base URL is not an `http` (or, with `tls`, `https`) URL with a host, the
    /// policy is out of range, or the TLS files can't be used.
    pub fn build(self) -> Result<GrpcChannel, BoxError> {
        let (scheme, authority) = self.base?;
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(self.connect_timeout);
        http.enforce_http(false);
        #[cfg(feature = "tls")]
        let connector = if self.tls.is_some() || scheme == Scheme::HTTPS {
            self.tls.unwrap_or_default().https_connector(http)?
        } else {
            crate::tls::http_only_connector(http)
        };
        #[cfg(not(feature = "tls"))]
        let connector = http;
        let client = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .build(connector);
        let transport = Transport {
            client,
            attempt_timeout: self.attempt_timeout,
        };
        let mut stack = GrpcStack::new(PropagateTrace::new(transport));
        for layer in self.layers.into_iter().rev() {
            stack = layer(stack);
        }
        Ok(GrpcChannel {
            shared: Arc::new(Shared {
                scheme,
                authority,
                stack,
                idempotent: self.idempotent,
                retries: self.retries,
                timeout: self.timeout,
                max_buffered: self.max_buffered,
            }),
        })
    }
}

impl fmt::Debug for GrpcChannelBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrpcChannelBuilder")
            .field("base", &self.base)
            .field("timeout", &self.timeout)
            .field("idempotent", &self.idempotent)
            .field("retries", &self.retries)
            .field("layers", &self.layers.len())
            .finish_non_exhaustive()
    }
}

/// The bottom of the stack: one attempt over a pooled HTTP/2 connection, its outcome
/// classified into a [`CallError`].
#[derive(Clone)]
struct Transport {
    client: Client<Connector, Body>,
    attempt_timeout: Option<Duration>,
}

impl Service<GrpcRequest> for Transport {
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Response<Body>, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: GrpcRequest) -> Self::Future {
        let (mut parts, body) = request.into_parts();
        let replay_safe = parts.extensions.get::<ReplaySafe>().is_some_and(|r| r.0);
        let left = parts
            .extensions
            .get::<CallDeadline>()
            .map(|deadline| deadline.0.saturating_duration_since(Instant::now()));
        let attempt = match (left, self.attempt_timeout) {
            (Some(left), Some(attempt)) => Some(left.min(attempt)),
            (left, attempt) => left.or(attempt),
        };
        if let Some(attempt) = attempt {
            parts.headers.insert(GRPC_TIMEOUT, format_timeout(attempt));
        }
        let resendable = body.is_buffered();
        let Some(body) = body.take() else {
            let error =
                CallError::invalid(Status::internal("a streaming request can't be sent twice"));
            return Box::pin(async move { Err(error.into()) });
        };
        let exchange = self.client.request(Request::from_parts(parts, body));
        Box::pin(async move {
            let outcome = match attempt {
                Some(after) => match tokio::time::timeout(after, exchange).await {
                    Ok(outcome) => outcome,
                    Err(_) => return Err(CallError::deadline(after, replay_safe).into()),
                },
                None => exchange.await,
            };
            let response = match outcome {
                Ok(response) => response,
                Err(error) => {
                    let sent = !error.is_connect();
                    let error = CallError::transport(error.into(), sent, replay_safe, resendable);
                    return Err(error.into());
                }
            };
            if let Some(status) = Status::from_header_map(response.headers()) {
                if is_server_fault(status.code()) {
                    let error = CallError::from_status(status, replay_safe);
                    if error.is_retryable() && error.code() == Code::ResourceExhausted {
                        // The server said when to come back: the retry's own backoff
                        // starts after that.
                        if let Some(delay) = pushback_delay(error.status()) {
                            tokio::time::sleep(delay).await;
                        }
                    }
                    return Err(error.into());
                }
            }
            Ok(response.map(Body::new))
        })
    }
}

fn pushback_delay(status: &Status) -> Option<Duration> {
    status
        .metadata()
        .get(super::status::RETRY_PUSHBACK)?
        .to_str()
        .ok()?
        .parse()
        .ok()
        .map(Duration::from_millis)
}

/// The codes that say the server (not the call) is at fault: they count against the
/// breaker, and the retryable ones among them are retried.
fn is_server_fault(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::ResourceExhausted
            | Code::Internal
            | Code::Unknown
            | Code::DataLoss
            | Code::DeadlineExceeded
    )
}

pin_project! {
    /// A response stream that ends with `DEADLINE_EXCEEDED` when the call's deadline
    /// passes.
    struct DeadlineBody<B> {
        #[pin]
        inner: B,
        #[pin]
        sleep: Sleep,
        expired: bool,
    }
}

impl<B> DeadlineBody<B> {
    fn new(inner: B, deadline: Instant) -> Self {
        Self {
            inner,
            sleep: tokio::time::sleep_until(deadline),
            expired: false,
        }
    }
}

impl<B> HttpBody for DeadlineBody<B>
where
    B: HttpBody<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.project();
        if *this.expired {
            return Poll::Ready(None);
        }
        if let Poll::Ready(frame) = this.inner.poll_frame(cx) {
            return Poll::Ready(
                frame.map(|frame| frame.map_err(|err| Status::from_error(err.into()))),
            );
        }
        ready!(this.sleep.poll(cx));
        *this.expired = true;
        Poll::Ready(Some(Err(Status::deadline_exceeded(
            "the call's deadline passed during its response stream",
        ))))
    }

    fn is_end_stream(&self) -> bool {
        self.expired || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
