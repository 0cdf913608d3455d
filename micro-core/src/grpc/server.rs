//! The gRPC side of a hosted service: its tonic services with the host's health,
//! reflection, metrics, deadline and HTTP-to-gRPC answers.

use std::convert::Infallible;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use axum::Router;
use http::header::CONTENT_TYPE;
use tonic::server::NamedService;
use tonic::Status;
use tonic_health::pb::health_server::HealthServer;
use tower_service::Service;

use super::health::{HostHealth, ReadinessProbe};
use super::metrics::{GrpcMetrics, RecordBody};
use super::status::code_from_http;
use super::timeout::timeout_of;
use super::GrpcServices;
use crate::error::BoxError;
use crate::service::BoxFuture;

/// A hosted service's gRPC services, ready to serve.
pub(crate) struct GrpcApp;

impl GrpcApp {
    /// The router of `services` beside the host's health and reflection services, for the
    /// service `name`.
    ///
    /// # Errors
    ///
    /// When a file descriptor set given for reflection does not decode.
    pub(crate) fn build(
        name: &str,
        services: GrpcServices,
        probe: ReadinessProbe,
    ) -> Result<Router, BoxError> {
        let GrpcServices {
            routes,
            names,
            descriptors,
        } = services;
        let reflection = || {
            descriptors.iter().fold(
                tonic_reflection::server::Builder::configure()
                    .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET),
                |builder, descriptor| builder.register_encoded_file_descriptor_set(descriptor),
            )
        };
        let v1 = reflection().build_v1()?;
        let v1alpha = reflection().build_v1alpha()?;
        let health = HealthServer::new(HostHealth::new(
            probe,
            names
                .iter()
                .map(|name| (*name).to_owned())
                .chain([HealthServer::<HostHealth>::NAME.to_owned()]),
        ));
        let known = names
            .iter()
            .copied()
            .chain([
                HealthServer::<HostHealth>::NAME,
                named(&v1),
                named(&v1alpha),
            ])
            .map(str::to_owned);
        let metrics = GrpcMetrics::new(name, known);
        let routes = routes
            .route_service(&path_of(HealthServer::<HostHealth>::NAME), health)
            .route_service(&path_of(named(&v1)), v1)
            .route_service(&path_of(named(&v1alpha)), v1alpha)
            .fallback(unimplemented);
        Ok(Router::new().fallback_service(GrpcHost { routes, metrics }))
    }
}

fn named<S: NamedService>(_: &S) -> &'static str {
    S::NAME
}

fn path_of(service: &str) -> String {
    format!("/{service}/{{*rest}}")
}

async fn unimplemented() -> Response {
    Status::unimplemented("no such service here").into_http::<Body>()
}

/// Records each call, applies its deadline and turns HTTP answers into gRPC ones.
#[derive(Clone)]
struct GrpcHost {
    routes: Router,
    metrics: GrpcMetrics,
}

impl Service<Request> for GrpcHost {
    type Response = Response;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let record = self.metrics.start(request.uri().path());
        let deadline = timeout_of(request.headers());
        let answer = self.routes.clone().call(request);
        Box::pin(async move {
            let answer = match deadline {
                Some(after) => tokio::time::timeout(after, answer).await.ok(),
                None => Some(answer.await),
            };
            let response = match answer {
                Some(Ok(response)) => as_grpc(response),
                Some(Err(never)) => match never {},
                None => Status::deadline_exceeded("the deadline passed before an answer")
                    .into_http::<Body>(),
            };
            let (parts, body) = response.into_parts();
            let body = RecordBody::new(body, record, &parts.headers);
            Ok(Response::from_parts(parts, Body::new(body)))
        })
    }
}

/// A gRPC answer as it is, an HTTP one (a layer's `401`, the listener's `413`) as the
/// matching status, trailers-only.
fn as_grpc(response: Response) -> Response {
    let grpc = response.headers().contains_key("grpc-status")
        || response
            .headers()
            .get(CONTENT_TYPE)
            .is_some_and(|value| value.as_bytes().starts_with(b"application/grpc"));
    if grpc {
        return response;
    }
    let status = response.status();
    let message = status
        .canonical_reason()
        .unwrap_or("the request was refused");
    Status::new(code_from_http(status), message)
        .into_http::<Body>()
        .into_response()
}
