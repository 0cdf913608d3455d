//! A bound on request body size (Kong's `request-size-limiting`).

use std::convert::Infallible;
use std::task::{Context, Poll};

use axum::body::Body;
use http::{header, Request, Response, StatusCode};
use http_body_util::Limited;
use micro_core::service::BoxFuture;
use serde::Deserialize;
use tower_layer::Layer;
use tower_service::Service;

use super::rejections::count_rejection;
use super::HttpService;
use crate::error::error_response;

/// The unit of [`BodyLimitConfig::allowed_payload_size`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum SizeUnit {
    /// Bytes.
    Bytes,
    /// Kibibytes (1024 bytes).
    Kilobytes,
    /// Mebibytes, Kong's default.
    #[default]
    Megabytes,
}

/// The largest request body a route accepts.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct BodyLimitConfig {
    /// The bound, in `size_unit`s. Kong's default is 128 megabytes.
    pub allowed_payload_size: u64,
    /// The unit of the bound.
    pub size_unit: SizeUnit,
}

impl Default for BodyLimitConfig {
    fn default() -> Self {
        Self {
            allowed_payload_size: 128,
            size_unit: SizeUnit::Megabytes,
        }
    }
}

impl BodyLimitConfig {
    /// A bound of `bytes` bytes.
    pub fn bytes(bytes: u64) -> Self {
        Self {
            allowed_payload_size: bytes,
            size_unit: SizeUnit::Bytes,
        }
    }

    /// The bound in bytes.
    pub fn max_bytes(&self) -> u64 {
        let unit = match self.size_unit {
            SizeUnit::Bytes => 1,
            SizeUnit::Kilobytes => 1024,
            SizeUnit::Megabytes => 1024 * 1024,
        };
        self.allowed_payload_size.saturating_mul(unit)
    }
}

/// Applies [`BodyLimit`].
#[derive(Debug, Clone, Copy)]
pub struct BodyLimitLayer {
    max: u64,
}

impl BodyLimitLayer {
    /// A layer enforcing `config`.
    pub fn new(config: &BodyLimitConfig) -> Self {
        Self {
            max: config.max_bytes(),
        }
    }
}

impl<S> Layer<S> for BodyLimitLayer {
    type Service = BodyLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        BodyLimit {
            inner,
            max: self.max,
        }
    }
}

/// Answers `413` at once to a request whose `Content-Length` exceeds the bound, before
/// anything reaches the upstream. A body without a length (chunked) is counted as it
/// streams and cut at the bound; the [`Proxy`](crate::proxy::Proxy) then answers `413`,
/// and an axum extractor answers `413` too.
#[derive(Debug, Clone)]
pub struct BodyLimit<S> {
    inner: S,
    max: u64,
}

impl<S> BodyLimit<S> {
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

impl<S: HttpService> Service<Request<Body>> for BodyLimit<S> {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let declared = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|length| length > self.max) {
            count_rejection(&request, "body_too_large");
            return Box::pin(async { Ok(too_large()) });
        }
        let limit = usize::try_from(self.max).unwrap_or(usize::MAX);
        let request = request.map(|body| Body::new(Limited::new(body, limit)));
        Box::pin(self.inner.call(request))
    }
}

/// The `413` answer.
pub(crate) fn too_large() -> Response<Body> {
    error_response(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        "the request body is larger than this route accepts",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_scale_the_bound() {
        assert_eq!(BodyLimitConfig::default().max_bytes(), 128 * 1024 * 1024);
        let kb: BodyLimitConfig = serde_json::from_value(
            serde_json::json!({"allowed_payload_size": 2, "size_unit": "kilobytes"}),
        )
        .unwrap();
        assert_eq!(kb.max_bytes(), 2048);
        assert_eq!(BodyLimitConfig::bytes(10).max_bytes(), 10);
    }
}
