//! Prometheus metrics: the recorder behind the `metrics` facade and the HTTP server
//! metrics every hosted service records.
//!
//! The `metrics` facade has one recorder per process. [`install_prometheus`] installs a
//! Prometheus recorder as that recorder, once; a [`ServiceHost`](crate::host::ServiceHost)
//! calls it when no [`PrometheusHandle`] was given to it, and renders that handle at
//! `GET /metrics`. A binary that installs its own Prometheus recorder passes its handle
//! with [`ServiceHostBuilder::metrics`](crate::host::ServiceHostBuilder::metrics).
//!
//! Every service records, labelled with its name:
//!
//! | metric | kind | labels |
//! |---|---|---|
//! | `http_server_requests_total` | counter | `service`, `method` (a standard method or `_OTHER`), `route` (the route template, or `unmatched`), `status` (`2xx`, `4xx`, ...) |
//! | `http_server_request_duration_seconds` | histogram | `service`, `method`, `route`, `status` |
//! | `http_server_requests_in_flight` | gauge | `service` |
//! | `micro_service_info` | gauge (1) | `service`, `version` |
//!
//! `route` is the axum route template (`/orders/{id}`), never the raw path, so the number
//! of series stays bounded; requests no route matched are labelled `unmatched`.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock, RwLock};
use std::task::{ready, Context, Poll};
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

pub use metrics_exporter_prometheus::PrometheusHandle;

/// Latency buckets in seconds, from 1 ms to 10 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The metric recorder could not be installed.
#[derive(Debug, thiserror::Error)]
#[error("cannot install the prometheus recorder: another metrics recorder is already installed; pass its PrometheusHandle to the host instead")]
pub struct MetricsError {
    #[source]
    source: metrics::SetRecorderError<metrics_exporter_prometheus::PrometheusRecorder>,
}

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs a Prometheus recorder as the process's `metrics` recorder and returns the
/// handle that renders it. Later calls return the same handle.
///
/// Histograms whose name ends in `_seconds` get [`LATENCY_BUCKETS`].
///
/// # Errors
///
/// Fails when a recorder other than this one was installed first.
pub fn install_prometheus() -> Result<PrometheusHandle, MetricsError> {
    static INSTALL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    if let Some(handle) = HANDLE.get() {
        return Ok(handle.clone());
    }
    let _guard = INSTALL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(handle) = HANDLE.get() {
        return Ok(handle.clone());
    }
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), LATENCY_BUCKETS)
        .expect("the bucket list is not empty")
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).map_err(|source| MetricsError { source })?;
    Ok(HANDLE.get_or_init(|| handle).clone())
}

/// One service's HTTP metrics: the in-flight gauge, and the counter and histogram of
/// each series (method, route, status) met so far.
///
/// The handles of a series are taken from the recorder once, when the series is first
/// seen, and kept: a request then costs a map lookup under a read lock instead of
/// formatting four labels and hashing them in the recorder's registry.
#[derive(Clone)]
pub(crate) struct HttpMetrics {
    inner: Arc<MetricsInner>,
}

struct MetricsInner {
    service: Arc<str>,
    in_flight: metrics::Gauge,
    /// By route template (or `unmatched`), then method label, then status class.
    series: RwLock<HashMap<Box<str>, Arc<RouteSeries>>>,
}

type RouteSeries =
    [[OnceLock<(metrics::Counter, metrics::Histogram)>; STATUSES.len()]; METHODS.len()];

impl HttpMetrics {
    pub(crate) fn new(service: &str, version: &str) -> Self {
        metrics::gauge!(
            "micro_service_info",
            "service" => service.to_owned(),
            "version" => version.to_owned()
        )
        .set(1.0);
        let in_flight =
            metrics::gauge!("http_server_requests_in_flight", "service" => service.to_owned());
        Self {
            inner: Arc::new(MetricsInner {
                service: service.into(),
                in_flight,
                series: RwLock::new(HashMap::new()),
            }),
        }
    }

    /// Counts one finished request and records its latency.
    fn finished(&self, method: usize, route: &str, status: u16, elapsed: f64) {
        let status = status_index(status);
        let series = self.route_series(route);
        let (counter, histogram) = series[method][status].get_or_init(|| {
            let labels = [
                ("service", self.inner.service.to_string()),
                ("method", METHODS[method].to_owned()),
                ("route", route.to_owned()),
                ("status", STATUSES[status].to_owned()),
            ];
            (
                metrics::counter!("http_server_requests_total", &labels),
                metrics::histogram!("http_server_request_duration_seconds", &labels),
            )
        });
        counter.increment(1);
        histogram.record(elapsed);
    }

    fn route_series(&self, route: &str) -> Arc<RouteSeries> {
        let series = &self.inner.series;
        if let Some(found) = series.read().unwrap_or_else(|e| e.into_inner()).get(route) {
            return found.clone();
        }
        series
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(route.into())
            .or_insert_with(|| Arc::new(Default::default()))
            .clone()
    }
}

impl fmt::Debug for HttpMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpMetrics")
            .field("service", &self.inner.service)
            .finish_non_exhaustive()
    }
}

/// The route template that served a response, copied from [`MatchedPath`] by
/// [`TagRoute`] so that [`RecordHttp`], which runs outside the router, can label with it.
#[derive(Debug, Clone)]
struct RouteTemplate(MatchedPath);

/// Applies [`TagRoute`]; used with `Router::layer`, so it runs after routing and sees
/// the [`MatchedPath`].
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct TagRouteLayer;

impl<S> Layer<S> for TagRouteLayer {
    type Service = TagRoute<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TagRoute { inner }
    }
}

/// Copies the request's [`MatchedPath`] to its response's extensions.
#[derive(Debug, Clone)]
pub(crate) struct TagRoute<S> {
    inner: S,
}

impl<S, B> Service<Request> for TagRoute<S>
where
    S: Service<Request, Response = http::Response<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = TagRouteFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let matched = request.extensions().get::<MatchedPath>().cloned();
        TagRouteFuture {
            inner: self.inner.call(request),
            matched,
        }
    }
}

pin_project! {
    /// The response future of [`TagRoute`].
    pub(crate) struct TagRouteFuture<F> {
        #[pin]
        inner: F,
        matched: Option<MatchedPath>,
    }
}

impl<F, B, E> Future for TagRouteFuture<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut response = ready!(this.inner.poll(cx))?;
        if let Some(matched) = this.matched.take() {
            response.extensions_mut().insert(RouteTemplate(matched));
        }
        Poll::Ready(Ok(response))
    }
}

/// Records request count, latency and in-flight requests. Wraps the whole router, so
/// requests no route matched are counted too.
#[derive(Debug, Clone)]
pub(crate) struct RecordHttp<S> {
    inner: S,
    metrics: HttpMetrics,
}

impl<S> RecordHttp<S> {
    pub(crate) fn new(inner: S, metrics: HttpMetrics) -> Self {
        Self { inner, metrics }
    }
}

impl<S, B> Service<Request> for RecordHttp<S>
where
    S: Service<Request, Response = http::Response<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = RecordFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let method = method_index(request.method());
        let in_flight = self.metrics.inner.in_flight.clone();
        in_flight.increment(1.0);
        RecordFuture {
            inner: self.inner.call(request),
            metrics: self.metrics.clone(),
            method,
            started: Instant::now(),
            _in_flight: DecrementOnDrop(in_flight),
        }
    }
}

pin_project! {
    /// The response future of [`RecordHttp`].
    pub(crate) struct RecordFuture<F> {
        #[pin]
        inner: F,
        metrics: HttpMetrics,
        method: usize,
        started: Instant,
        _in_flight: DecrementOnDrop,
    }
}

impl<F, B, E> Future for RecordFuture<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = ready!(this.inner.poll(cx))?;
        let route = response
            .extensions()
            .get::<RouteTemplate>()
            .map_or("unmatched", |route| route.0.as_str());
        this.metrics.finished(
            *this.method,
            route,
            response.status().as_u16(),
            this.started.elapsed().as_secs_f64(),
        );
        Poll::Ready(Ok(response))
    }
}

/// Keeps the in-flight gauge right when a request's future is dropped mid-way (client gone,
/// drain deadline passed).
struct DecrementOnDrop(metrics::Gauge);

impl Drop for DecrementOnDrop {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// The method labels: the standard methods, then `_OTHER`.
const METHODS: [&str; 10] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", "_OTHER",
];

/// The status class labels.
const STATUSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

fn method_index(method: &http::Method) -> usize {
    use http::Method;
    match *method {
        Method::GET => 0,
        Method::HEAD => 1,
        Method::POST => 2,
        Method::PUT => 3,
        Method::DELETE => 4,
        Method::CONNECT => 5,
        Method::OPTIONS => 6,
        Method::TRACE => 7,
        Method::PATCH => 8,
        _ => 9,
    }
}

fn status_index(status: u16) -> usize {
    match status {
        100..=199 => 0,
        200..=299 => 1,
        300..=399 => 2,
        400..=499 => 3,
        _ => 4,
    }
}

/// The method as a label: one of the standard methods, or `_OTHER` (as OpenTelemetry's
/// HTTP conventions name it), so that a client inventing methods can't create series.
#[cfg(test)]
fn method_label(method: &http::Method) -> &'static str {
    METHODS[method_index(method)]
}

#[cfg(test)]
fn status_class(status: u16) -> &'static str {
    STATUSES[status_index(status)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invented_methods_share_one_label() {
        assert_eq!(method_label(&http::Method::PATCH), "PATCH");
        for invented in ["FOOBAR", "GETX", "get", "PROPFIND"] {
            let method = http::Method::from_bytes(invented.as_bytes()).unwrap();
            assert_eq!(method_label(&method), "_OTHER", "{invented}");
        }
    }

    #[test]
    fn status_classes() {
        assert_eq!(status_class(101), "1xx");
        assert_eq!(status_class(204), "2xx");
        assert_eq!(status_class(308), "3xx");
        assert_eq!(status_class(429), "4xx");
        assert_eq!(status_class(503), "5xx");
    }

    #[test]
    fn install_is_idempotent_and_renders_recorded_values() {
        let first = install_prometheus().unwrap();
        let second = install_prometheus().unwrap();
        metrics::counter!("micro_test_counter_total", "case" => "idempotent").increment(3);
        let rendered = second.render();
        assert!(rendered.contains("micro_test_counter_total{case=\"idempotent\"} 3"));
        assert!(first.render().contains("micro_test_counter_total"));
    }
}
