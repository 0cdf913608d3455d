//! gRPC hosted beside the router: health tied to readiness, reflection, per-method
//! metrics, trace context, identity, graceful shutdown; the channel's errors and retries.
#![cfg(feature = "grpc")]

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::routing::get;
use axum::Router;
use futures_util::StreamExt;
use http::uri::PathAndQuery;
use micro_core::grpc::{GrpcChannel, GrpcServices};
use micro_core::host::{HostConfig, RunningHost, ServiceHost};
use micro_core::resilience::{ResiliencePolicy, RetryConfig};
use micro_core::service::{BoxFuture, Service};
use micro_core::trace::TraceContext;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::{Code, Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_prost::ProstCodec;

use crate::support;

/// The messages of the test service `test.Echo`, written by hand as tonic-build would.
mod pb {
    #[derive(Clone, PartialEq, prost::Message)]
    pub(crate) struct Ask {
        /// A status code to answer with (0: answer normally).
        #[prost(int32, tag = "1")]
        pub(crate) fail_with: i32,
        /// How many numbers to stream.
        #[prost(uint32, tag = "2")]
        pub(crate) count: u32,
        /// The pause before each number, in milliseconds.
        #[prost(uint64, tag = "3")]
        pub(crate) pause_ms: u64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub(crate) struct Answer {
        #[prost(string, tag = "1")]
        pub(crate) name: String,
        #[prost(string, tag = "2")]
        pub(crate) trace_id: String,
        #[prost(string, tag = "3")]
        pub(crate) caller: String,
        #[prost(uint32, tag = "4")]
        pub(crate) number: u32,
    }
}

/// `test.Echo`: `Whoami` (unary: its name, the trace id and the caller it saw, or the
/// asked failure) and `Count` (server streaming).
#[derive(Clone)]
pub(crate) struct Echo {
    name: &'static str,
    calls: Arc<AtomicUsize>,
    /// Codes to fail the next calls with, first first.
    failures: Arc<Mutex<Vec<Code>>>,
}

impl NamedService for Echo {
    const NAME: &'static str = "test.Echo";
}

impl Echo {
    pub(crate) fn new(name: &'static str) -> Self {
        Self {
            name,
            calls: Arc::new(AtomicUsize::new(0)),
            failures: Arc::new(Mutex::new(Vec::new())),
        }
    }

    fn whoami(&self, request: Request<pb::Ask>) -> Result<Response<pb::Answer>, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let queued = {
            let mut failures = self.failures.lock().unwrap();
            (!failures.is_empty()).then(|| failures.remove(0))
        };
        if let Some(code) = queued {
            return Err(Status::new(code, "queued failure"));
        }
        if request.get_ref().fail_with != 0 {
            return Err(Status::new(
                request.get_ref().fail_with.into(),
                "asked to fail",
            ));
        }
        #[cfg(feature = "identity")]
        let caller = request
            .extensions()
            .get::<micro_core::identity::Caller>()
            .map(|caller| caller.service.clone())
            .unwrap_or_default();
        #[cfg(not(feature = "identity"))]
        let caller = String::new();
        Ok(Response::new(pb::Answer {
            name: self.name.to_owned(),
            trace_id: TraceContext::current()
                .map(|context| context.trace_id().to_string())
                .unwrap_or_default(),
            caller,
            number: 0,
        }))
    }
}

type CountStream = futures_util::stream::BoxStream<'static, Result<pb::Answer, Status>>;

impl tower::Service<http::Request<axum::body::Body>> for Echo {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<axum::body::Body>) -> Self::Future {
        let echo = self.clone();
        let mut grpc = tonic::server::Grpc::new(ProstCodec::<pb::Answer, pb::Ask>::default());
        Box::pin(async move {
            Ok(match request.uri().path() {
                "/test.Echo/Whoami" => {
                    let service = tower::service_fn(move |request: Request<pb::Ask>| {
                        let echo = echo.clone();
                        async move { echo.whoami(request) }
                    });
                    grpc.unary(service, request).await
                }
                "/test.Echo/Count" => {
                    let service = tower::service_fn(move |request: Request<pb::Ask>| {
                        let name = echo.name;
                        async move {
                            let ask = request.into_inner();
                            let pause = Duration::from_millis(ask.pause_ms);
                            let stream: CountStream = futures_util::stream::iter(1..=ask.count)
                                .then(move |number| async move {
                                    tokio::time::sleep(pause).await;
                                    Ok(pb::Answer {
                                        name: name.to_owned(),
                                        number,
                                        ..Default::default()
                                    })
                                })
                                .boxed();
                            Ok::<_, Status>(Response::new(stream))
                        }
                    });
                    grpc.server_streaming(service, request).await
                }
                _ => Status::unimplemented("").into_http(),
            })
        })
    }
}

/// A hosted service with one HTTP route and `test.Echo`.
struct Hosted {
    echo: Echo,
    layer: Option<fn(GrpcServices) -> GrpcServices>,
}

impl Service for Hosted {
    fn name(&self) -> &str {
        "echo-service"
    }

    fn router(&self) -> Router {
        Router::new().route("/hello", get(|| async { "hello" }))
    }

    fn grpc(&self) -> Option<GrpcServices> {
        let services = GrpcServices::new().add_service(self.echo.clone());
        Some(match self.layer {
            Some(layer) => layer(services),
            None => services,
        })
    }
}

/// Starts `hosted` on a free loopback port under `config`: the host and its address.
async fn start(config: HostConfig, hosted: Hosted) -> (RunningHost, std::net::SocketAddr) {
    let running = ServiceHost::builder()
        .config(config)
        .service(hosted, "127.0.0.1:0".parse().unwrap())
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let addr = running.local_addr("echo-service").unwrap();
    (running, addr)
}

fn channel(addr: std::net::SocketAddr) -> GrpcChannel {
    GrpcChannel::builder(&format!("http://{addr}"))
        .build()
        .unwrap()
}

pub(crate) async fn whoami(
    channel: GrpcChannel,
    ask: pb::Ask,
) -> Result<Response<pb::Answer>, Status> {
    let mut client = tonic::client::Grpc::new(channel);
    client.ready().await.map_err(Status::from_error)?;
    client
        .unary(
            Request::new(ask),
            PathAndQuery::from_static("/test.Echo/Whoami"),
            ProstCodec::<pb::Ask, pb::Answer>::default(),
        )
        .await
}

async fn count(
    channel: GrpcChannel,
    count: u32,
    pause_ms: u64,
) -> Result<tonic::Streaming<pb::Answer>, Status> {
    let mut client = tonic::client::Grpc::new(channel);
    client.ready().await.map_err(Status::from_error)?;
    let ask = pb::Ask {
        count,
        pause_ms,
        ..Default::default()
    };
    Ok(client
        .server_streaming(
            Request::new(ask),
            PathAndQuery::from_static("/test.Echo/Count"),
            ProstCodec::<pb::Ask, pb::Answer>::default(),
        )
        .await?
        .into_inner())
}

async fn health(channel: GrpcChannel, service: &str) -> Result<ServingStatus, Status> {
    let answer = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await?;
    Ok(answer.into_inner().status())
}

#[tokio::test]
async fn grpc_is_served_beside_http_with_health_reflection_metrics_and_trace() {
    let (running, addr) = start(
        HostConfig::default(),
        Hosted {
            echo: Echo::new("one"),
            layer: None,
        },
    )
    .await;
    let grpc = channel(addr);

    assert_eq!(support::get(addr, "/hello").await.unwrap().body, "hello");
    let parent = TraceContext::new_root();
    let mut ask = Request::new(pb::Ask::default());
    let mut headers = http::HeaderMap::new();
    parent.inject(&mut headers);
    *ask.metadata_mut() = tonic::metadata::MetadataMap::from_headers(headers);
    let mut client = tonic::client::Grpc::new(grpc.clone());
    client.ready().await.unwrap();
    let answer = client
        .unary(
            ask,
            PathAndQuery::from_static("/test.Echo/Whoami"),
            ProstCodec::<pb::Ask, pb::Answer>::default(),
        )
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.name, "one");
    assert_eq!(
        answer.trace_id,
        parent.trace_id().to_string(),
        "traceparent from the metadata"
    );
    let failed = whoami(
        grpc.clone(),
        pb::Ask {
            fail_with: Code::NotFound as i32,
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(failed.code(), Code::NotFound);
    let mut numbers = count(grpc.clone(), 3, 0).await.unwrap();
    let mut seen = Vec::new();
    while let Some(answer) = numbers.message().await.unwrap() {
        seen.push(answer.number);
    }
    assert_eq!(seen, [1, 2, 3]);

    for service in ["", "test.Echo", "grpc.health.v1.Health"] {
        assert_eq!(
            health(grpc.clone(), service).await.unwrap(),
            ServingStatus::Serving,
            "{service:?}"
        );
    }
    assert_eq!(
        health(grpc.clone(), "test.Nope").await.unwrap_err().code(),
        Code::NotFound
    );

    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let list = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = ServerReflectionClient::new(grpc.clone())
        .server_reflection_info(futures_util::stream::iter([list]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(listed)) =
        replies.message().await.unwrap().unwrap().message_response
    else {
        panic!("no service list");
    };
    let names: Vec<String> = listed.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"grpc.health.v1.Health".to_owned()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.reflection.v1.ServerReflection".to_owned()),
        "{names:?}"
    );

    let metrics = support::get(addr, "/metrics").await.unwrap().body;
    let handled = |method: &str, code: &str| {
        metrics.lines().any(|line| {
            line.starts_with("grpc_server_handled_total{")
                && line.contains(r#"service="echo-service""#)
                && line.contains(r#"grpc_service="test.Echo""#)
                && line.contains(&format!(r#"grpc_method="{method}""#))
                && line.contains(&format!(r#"grpc_code="{code}""#))
        })
    };
    assert!(handled("Whoami", "OK"), "{metrics}");
    assert!(handled("Whoami", "NOT_FOUND"), "{metrics}");
    assert!(handled("Count", "OK"), "{metrics}");
    assert!(
        !metrics
            .lines()
            .any(|l| l.starts_with("http_server_requests_total") && l.contains("test.Echo")),
        "gRPC calls are not HTTP routes: {metrics}"
    );
    assert!(metrics.contains(r#"route="/hello""#), "{metrics}");

    running.shutdown_trigger().trigger();
    running.run_until(std::future::pending()).await;
}

#[tokio::test]
async fn health_turns_not_serving_at_shutdown_and_a_stream_in_flight_finishes() {
    let seen_in_drain = Arc::new(Mutex::new(None));
    let host_addr = Arc::new(Mutex::new(None::<std::net::SocketAddr>));
    let config = HostConfig {
        drain_timeout: Duration::from_secs(20),
        ..HostConfig::default()
    };
    let (seen, at) = (seen_in_drain.clone(), host_addr.clone());
    let running = ServiceHost::builder()
        .config(config)
        .service(
            Hosted {
                echo: Echo::new("one"),
                layer: None,
            },
            "127.0.0.1:0".parse().unwrap(),
        )
        .before_drain("ask health", move || async move {
            let addr = at.lock().unwrap().expect("the address is known");
            *seen.lock().unwrap() = Some(health(channel(addr), "test.Echo").await);
            Ok(())
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let addr = running.local_addr("echo-service").unwrap();
    *host_addr.lock().unwrap() = Some(addr);
    let grpc = channel(addr);

    let mut watch = HealthClient::new(grpc.clone())
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.message().await.unwrap().unwrap().status(),
        ServingStatus::Serving
    );
    let mut stream = count(grpc.clone(), 5, 300).await.unwrap();
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(first.number, 1);

    let trigger = running.shutdown_trigger();
    let shutdown = tokio::spawn(running.run_until(std::future::pending()));
    trigger.trigger();

    assert_eq!(
        watch.message().await.unwrap().unwrap().status(),
        ServingStatus::NotServing
    );
    assert!(
        watch.message().await.unwrap().is_none(),
        "the watch ends at shutdown"
    );
    let mut rest = Vec::new();
    while let Some(answer) = stream.message().await.expect("the stream ends with OK") {
        rest.push(answer.number);
    }
    assert_eq!(rest, [2, 3, 4, 5], "the stream in flight finished");
    let report = shutdown.await.unwrap();
    assert_eq!(report.aborted_connections, 0);
    let seen = seen_in_drain.lock().unwrap().take().expect("the hook ran");
    assert_eq!(seen.unwrap(), ServingStatus::NotServing);
}

#[tokio::test]
async fn the_channel_retries_only_idempotent_methods_and_maps_errors() {
    let echo = Echo::new("one");
    let (running, addr) = start(
        HostConfig::default(),
        Hosted {
            echo: echo.clone(),
            layer: None,
        },
    )
    .await;
    let policy = ResiliencePolicy::new().retry(
        RetryConfig::new()
            .max_attempts(3)
            .initial_backoff(Duration::from_millis(1))
            .max_backoff(Duration::from_millis(5)),
    );
    let retrying = GrpcChannel::builder(&format!("http://{addr}"))
        .idempotent("/test.Echo/Whoami")
        .policy("echo", policy.clone())
        .build()
        .unwrap();
    let not_marked = GrpcChannel::builder(&format!("http://{addr}"))
        .policy("echo", policy)
        .build()
        .unwrap();

    *echo.failures.lock().unwrap() = vec![Code::Unavailable, Code::Unavailable];
    let answer = whoami(retrying.clone(), pb::Ask::default()).await.unwrap();
    assert_eq!(answer.into_inner().name, "one");
    assert_eq!(echo.calls.swap(0, Ordering::SeqCst), 3, "two retries");

    *echo.failures.lock().unwrap() = vec![Code::Unavailable];
    let failed = whoami(not_marked, pb::Ask::default()).await.unwrap_err();
    assert_eq!(failed.code(), Code::Unavailable);
    assert!(
        !micro_core::error::is_retryable(&failed),
        "a call that is not safe to repeat says so: {:?}",
        failed.metadata()
    );
    assert_eq!(echo.calls.swap(0, Ordering::SeqCst), 1, "no retry");

    *echo.failures.lock().unwrap() = vec![Code::InvalidArgument];
    let failed = whoami(retrying.clone(), pb::Ask::default())
        .await
        .unwrap_err();
    assert_eq!(failed.code(), Code::InvalidArgument);
    assert_eq!(
        echo.calls.swap(0, Ordering::SeqCst),
        1,
        "not a retryable code"
    );

    let mut late = Request::new(pb::Ask {
        count: 3,
        pause_ms: 2_000,
        ..Default::default()
    });
    late.set_timeout(Duration::from_millis(200));
    let mut client = tonic::client::Grpc::new(retrying.clone());
    client.ready().await.unwrap();
    let mut stream = client
        .server_streaming(
            late,
            PathAndQuery::from_static("/test.Echo/Count"),
            ProstCodec::<pb::Ask, pb::Answer>::default(),
        )
        .await
        .unwrap()
        .into_inner();
    let late = stream.message().await.unwrap_err();
    assert_eq!(late.code(), Code::DeadlineExceeded, "{late:?}");
    drop(stream);

    running.shutdown_trigger().trigger();
    running.run_until(std::future::pending()).await;
    let gone = whoami(channel(addr), pb::Ask::default()).await.unwrap_err();
    assert_eq!(gone.code(), Code::Unavailable, "{gone:?}");
    assert!(
        micro_core::error::is_retryable(&gone),
        "never sent: {gone:?}"
    );
}

#[cfg(feature = "identity")]
#[tokio::test]
async fn identity_layers_answer_in_grpc_terms_and_signed_calls_pass() {
    use micro_core::identity::{AllowCallersLayer, KeyRing, KeySet, Secret, VerifyCallerLayer};
    fn keys() -> KeyRing {
        KeyRing::new(KeySet::new("k1", Secret::new_unchecked(vec![7u8; 32])))
    }
    fn verified(services: GrpcServices) -> GrpcServices {
        services
            .layer(AllowCallersLayer::new(["cart-service"]))
            .layer(VerifyCallerLayer::new(keys(), "echo-service"))
    }
    let (running, addr) = start(
        HostConfig::default(),
        Hosted {
            echo: Echo::new("one"),
            layer: Some(verified),
        },
    )
    .await;
    let base = format!("http://{addr}");

    let anonymous = whoami(channel(addr), pb::Ask::default()).await.unwrap_err();
    assert_eq!(anonymous.code(), Code::Unauthenticated);
    let stranger = GrpcChannel::builder(&base)
        .sign_as(keys(), "order-service", "echo-service")
        .build()
        .unwrap();
    let refused = whoami(stranger, pb::Ask::default()).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    let cart = GrpcChannel::builder(&base)
        .sign_as(keys(), "cart-service", "echo-service")
        .build()
        .unwrap();
    let answer = whoami(cart, pb::Ask::default()).await.unwrap().into_inner();
    assert_eq!(answer.caller, "cart-service");
    assert_eq!(
        health(channel(addr), "").await.unwrap(),
        ServingStatus::Serving,
        "health stays open to probes"
    );

    running.shutdown_trigger().trigger();
    running.run_until(std::future::pending()).await;
}

#[tokio::test]
async fn a_stream_quieter_than_the_idle_timeout_keeps_its_connection() {
    let config = HostConfig {
        listener: micro_core::listener::ListenerConfig::default()
            .idle_timeout(Duration::from_millis(200)),
        ..HostConfig::default()
    };
    let (running, addr) = start(
        config,
        Hosted {
            echo: Echo::new("one"),
            layer: None,
        },
    )
    .await;

    let mut stream = count(channel(addr), 3, 500).await.unwrap();
    let mut seen = Vec::new();
    while let Some(answer) = stream.message().await.expect("the stream is not cut") {
        seen.push(answer.number);
    }
    assert_eq!(seen, [1, 2, 3]);

    running.shutdown_trigger().trigger();
    running.run_until(std::future::pending()).await;
}
