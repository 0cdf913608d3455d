//! `grpc.health.v1.Health`, answered from the host's readiness.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use tokio::sync::Notify;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_server::Health;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

use crate::service::BoxFuture;

/// How often a `Watch` stream looks at readiness again when nothing signalled a change
/// (health checks are not watched; they are run).
const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// What the host says of a service's readiness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Serving,
    NotServing,
    /// Not serving, and never again: the host is shutting down.
    ShuttingDown,
}

/// The host's readiness, as the gRPC health service asks for it.
#[derive(Clone)]
pub(crate) struct ReadinessProbe {
    pub(crate) check: Arc<dyn Fn() -> BoxFuture<'static, Verdict> + Send + Sync>,
    /// Notified when the host's phase changes.
    pub(crate) changed: Arc<Notify>,
}

#[derive(Clone)]
pub(super) struct HostHealth {
    probe: ReadinessProbe,
    /// The services it answers for; `""` is the server as a whole.
    names: Arc<HashSet<String>>,
}

impl HostHealth {
    pub(super) fn new(probe: ReadinessProbe, names: impl IntoIterator<Item = String>) -> Self {
        let mut names: HashSet<String> = names.into_iter().collect();
        names.insert(String::new());
        Self {
            probe,
            names: Arc::new(names),
        }
    }

    fn answer(verdict: Verdict) -> HealthCheckResponse {
        let status = match verdict {
            Verdict::Serving => ServingStatus::Serving,
            Verdict::NotServing | Verdict::ShuttingDown => ServingStatus::NotServing,
        };
        HealthCheckResponse {
            status: status as i32,
        }
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Health for HostHealth {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        let service = &request.get_ref().service;
        if !self.names.contains(service) {
            return Err(Status::not_found(format!("no service `{service}` here")));
        }
        let verdict = (self.probe.check)().await;
        Ok(Response::new(Self::answer(verdict)))
    }

    type WatchStream = WatchStream;

    /// Sends the status now and at each change; ends after `NOT_SERVING` once shutdown has
    /// begun, so a watching client does not hold the drain up.
    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        if !self.names.contains(&request.get_ref().service) {
            let unknown = HealthCheckResponse {
                status: ServingStatus::ServiceUnknown as i32,
            };
            let stream = futures_util::stream::iter([Ok(unknown)]);
            return Ok(Response::new(Box::pin(stream)));
        }
        let probe = self.probe.clone();
        let stream = futures_util::stream::unfold(Some(None), move |state| {
            let probe = probe.clone();
            async move {
                let last = state?;
                loop {
                    let changed = probe.changed.notified();
                    let verdict = (probe.check)().await;
                    if Some(verdict) != last {
                        let next = (verdict != Verdict::ShuttingDown).then_some(Some(verdict));
                        return Some((Ok(Self::answer(verdict)), next));
                    }
                    tokio::select! {
                        () = changed => {}
                        () = tokio::time::sleep(WATCH_INTERVAL) => {}
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }
}
