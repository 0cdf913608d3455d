//! Per-method gRPC server metrics, recorded when a call's stream ends.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body as HttpBody, Frame, SizeHint};
use pin_project_lite::pin_project;
use tonic::Code;

use super::status::code_name;

const HANDLED: &str = "grpc_server_handled_total";
const HANDLING: &str = "grpc_server_handling_seconds";

/// The labels a host's gRPC calls are recorded under.
#[derive(Debug, Clone)]
pub(super) struct GrpcMetrics {
    service: Arc<str>,
    /// The gRPC services served; calls to others are labelled `unknown`.
    known: Arc<HashSet<String>>,
}

/// One call being recorded.
#[derive(Debug)]
pub(super) struct CallRecord {
    metrics: GrpcMetrics,
    grpc_service: String,
    grpc_method: String,
    started: Instant,
}

impl GrpcMetrics {
    pub(super) fn new(service: &str, known: impl IntoIterator<Item = String>) -> Self {
        metrics::describe_counter!(HANDLED, "gRPC calls finished, by method and status code");
        metrics::describe_histogram!(
            HANDLING,
            metrics::Unit::Seconds,
            "gRPC call duration until the stream ended, by method and status code"
        );
        Self {
            service: service.into(),
            known: Arc::new(known.into_iter().collect()),
        }
    }

    /// Starts recording a call to `path` (`/package.Service/Method`).
    pub(super) fn start(&self, path: &str) -> CallRecord {
        let (service, method) = path
            .strip_prefix('/')
            .and_then(|path| path.split_once('/'))
            .filter(|(service, method)| self.known.contains(*service) && !method.contains('/'))
            .unwrap_or(("unknown", "unknown"));
        CallRecord {
            metrics: self.clone(),
            grpc_service: service.to_owned(),
            grpc_method: method.to_owned(),
            started: Instant::now(),
        }
    }
}

impl CallRecord {
    fn finish(self, code: Code) {
        // A method the service does not have is only known by its answer.
        let method = if code == Code::Unimplemented {
            "unknown".to_owned()
        } else {
            self.grpc_method
        };
        let labels = [
            ("service", self.metrics.service.to_string()),
            ("grpc_service", self.grpc_service),
            ("grpc_method", method),
            ("grpc_code", code_name(code).to_owned()),
        ];
        metrics::counter!(HANDLED, &labels).increment(1);
        metrics::histogram!(HANDLING, &labels).record(self.started.elapsed().as_secs_f64());
    }
}

fn code_in(headers: &HeaderMap) -> Option<Code> {
    headers
        .get("grpc-status")
        .map(|value| Code::from_bytes(value.as_bytes()))
}

pin_project! {
    /// A response body that records its call when its stream ends: with the code of the
    /// trailers, of the headers for a trailers-only answer, or `CANCELLED` when it is
    /// dropped before its end.
    pub(super) struct RecordBody<B> {
        #[pin]
        inner: B,
        record: Option<CallRecord>,
        // The code of a trailers-only answer.
        head_code: Option<Code>,
    }

    impl<B> PinnedDrop for RecordBody<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(record) = this.record.take() {
                record.finish(this.head_code.unwrap_or(Code::Cancelled));
            }
        }
    }
}

impl<B> RecordBody<B> {
    pub(super) fn new(inner: B, record: CallRecord, headers: &HeaderMap) -> Self {
        Self {
            inner,
            record: Some(record),
            head_code: code_in(headers),
        }
    }
}

impl<B> HttpBody for RecordBody<B>
where
    B: HttpBody<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        let code = match &frame {
            Some(Ok(frame)) => frame
                .trailers_ref()
                .map(|trailers| code_in(trailers).unwrap_or(Code::Unknown)),
            Some(Err(_)) => Some(Code::Internal),
            None => Some(this.head_code.unwrap_or(Code::Unknown)),
        };
        if let Some(code) = code {
            if let Some(record) = this.record.take() {
                record.finish(code);
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
