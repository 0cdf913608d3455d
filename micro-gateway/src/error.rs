//! The gateway's own answers: a status code and a small JSON body, never an upstream's
//! internals.

use axum::body::Body;
use http::{header, HeaderValue, Response, StatusCode};

/// Builds `{"error": {"code": code, "message": message}}` with `status`.
///
/// Every answer the gateway makes itself (no route, upstream down, timeout, rejected by a
/// plugin) has this shape, so clients can handle them alike.
pub fn error_response(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    let body = serde_json::json!({ "error": { "code": code, "message": message } });
    let mut response = Response::new(Body::from(body.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}
