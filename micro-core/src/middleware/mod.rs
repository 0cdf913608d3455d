//! HTTP middleware every hosted service gets, usable on any tower service of
//! `http::Request`s: request ids and a tracing span per request.

pub mod request_id;
pub mod span;

pub use request_id::{RequestId, SetRequestId, SetRequestIdLayer};
pub use span::{RequestSpan, RequestSpanLayer};
