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

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

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

/// The label values one service's HTTP metrics share.
#[derive(Debug, Clone)]
pub(crate) struct HttpMetrics {
    service: Arc<str>,
}

impl HttpMetrics {
    pub(crate) fn new(service: &str, version: &str) -> Self {
        metrics::gauge!(
            "micro_service_info",
            "service" => service.to_owned(),
            "version" => version.to_owned()
        )
        .set(1.0);
        Self {
            service: service.into(),
        }
    }
}

/// The route template that served a response, copied from [`MatchedPath`] by
/// [`tag_route`] so that [`record`], which runs outside the router, can label with it.
#[derive(Debug, Clone)]
struct RouteTemplate(MatchedPath);

/// Applied with `Router::layer`, so it runs after routing and sees the [`MatchedPath`].
pub(crate) async fn tag_route(request: Request, next: Next) -> Response {
    let matched = request.extensions().get::<MatchedPath>().cloned();
    let mut response = next.run(request).await;
    if let Some(matched) = matched {
        response.extensions_mut().insert(RouteTemplate(matched));
    }
    response
}

/// Records request count, latency and in-flight requests. Wraps the whole router, so
/// requests no route matched are counted too.
pub(crate) async fn record(
    State(metrics): State<HttpMetrics>,
    request: Request,
    next: Next,
) -> Response {
    let service = metrics.service.to_string();
    let method = method_label(request.method());
    let in_flight = metrics::gauge!("http_server_requests_in_flight", "service" => service.clone());
    in_flight.increment(1.0);
    let _in_flight = DecrementOnDrop(in_flight);
    let started = Instant::now();
    let response = next.run(request).await;
    let route = response.extensions().get::<RouteTemplate>().map_or_else(
        || "unmatched".to_owned(),
        |route| route.0.as_str().to_owned(),
    );
    let status = status_class(response.status().as_u16());
    let labels = [
        ("service", service),
        ("method", method.to_owned()),
        ("route", route),
        ("status", status.to_owned()),
    ];
    metrics::counter!("http_server_requests_total", &labels).increment(1);
    metrics::histogram!("http_server_request_duration_seconds", &labels)
        .record(started.elapsed().as_secs_f64());
    response
}

/// Keeps the in-flight gauge right when a request's future is dropped mid-way (client gone,
/// drain deadline passed).
struct DecrementOnDrop(metrics::Gauge);

impl Drop for DecrementOnDrop {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// The method as a label: one of the standard methods, or `_OTHER` (as OpenTelemetry's
/// HTTP conventions name it), so that a client inventing methods can't create series.
fn method_label(method: &http::Method) -> &'static str {
    use http::Method;
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::CONNECT => "CONNECT",
        Method::OPTIONS => "OPTIONS",
        Method::TRACE => "TRACE",
        Method::PATCH => "PATCH",
        _ => "_OTHER",
    }
}

fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
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
