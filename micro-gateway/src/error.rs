//! The gateway's own answers: a status code and a small JSON body, never an upstream's
//! internals.

use std::sync::Arc;

use axum::body::Body;
use http::{header, HeaderValue, Response, StatusCode};

/// Builds `{"error": {"code": code, "message": message}}` with `status`.
///
/// Every answer the gateway makes itself (no route, upstream down, timeout, rejected by a
/// plugin) has this shape, so clients can handle them alike. The code is also put in the
/// response's extensions as an [`ErrorCode`], for logs and metrics further out.
pub fn error_response(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    let body = serde_json::json!({ "error": { "code": code, "message": message } });
    let mut response = Response::new(Body::from(body.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response.extensions_mut().insert(ErrorCode(code.into()));
    response
}

/// The code of an answer the gateway made itself, found in the response's extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorCode(Arc<str>);

impl ErrorCode {
    /// The code, such as `no_route` or `upstream_timeout`.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}
