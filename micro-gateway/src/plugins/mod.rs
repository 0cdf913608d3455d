//! Per-route plugins as tower layers over `http::Request<axum::body::Body>`: IP
//! restriction, request and response header transforms, a request body size limit, CORS
//! and an access log.
//!
//! Each plugin is configured by a serde type whose fields follow the Kong plugin of the
//! same purpose (`ip-restriction`, `request-transformer`, `response-transformer`,
//! `request-size-limiting`, `cors`), so a Kong declarative file maps onto them. Every
//! rejection is a JSON answer from [`error_response`](crate::error::error_response) and the
//! rejected request never reaches the upstream.

pub mod access_log;
pub mod body_limit;
pub mod cors;
pub mod ip_restriction;
pub mod jwt;
pub mod rate_limit;
pub mod transform;

mod rejections;

use std::convert::Infallible;

use axum::body::Body;
use http::{Request, Response};
use tower_service::Service;

/// The services plugins wrap: axum bodies in and out, and no error (failures are answers).
pub trait HttpService:
    Service<Request<Body>, Response = Response<Body>, Error = Infallible, Future: Send + 'static>
    + Clone
    + Send
    + 'static
{
}

impl<S> HttpService for S where
    S: Service<
            Request<Body>,
            Response = Response<Body>,
            Error = Infallible,
            Future: Send + 'static,
        > + Clone
        + Send
        + 'static
{
}
