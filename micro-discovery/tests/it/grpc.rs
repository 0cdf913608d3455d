//! gRPC by name: a balanced channel over the registry's healthy instances, following its
//! changes and moving to the survivors when an instance dies during a stream of calls.
#![cfg(feature = "grpc")]

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use micro_core::resilience::{ResiliencePolicy, RetryConfig};
use micro_discovery::grpc::GrpcClient;
use micro_discovery::memory::MemoryRegistry;
use micro_discovery::{Discover, Instance, Registration, Registry};
use tonic::{Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

use crate::support::{eventually, Server};

const SERVICE: &str = "product-service";

/// A health service that names its instance in the `x-instance` metadata of its answers.
#[derive(Clone)]
struct Named(&'static str);

#[tonic::async_trait]
impl Health for Named {
    async fn check(
        &self,
        _: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        let mut answer = Response::new(HealthCheckResponse {
            status: ServingStatus::Serving as i32,
        });
        answer
            .metadata_mut()
            .insert("x-instance", self.0.parse().expect("an ascii name"));
        Ok(answer)
    }

    type WatchStream = futures_util::stream::Empty<Result<HealthCheckResponse, Status>>;

    async fn watch(
        &self,
        _: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
}

async fn instance(name: &'static str) -> Server {
    let router = tonic::service::Routes::new(HealthServer::new(Named(name))).into_axum_router();
    Server::start(router).await
}

/// Which instance answered one call.
async fn who(client: &GrpcClient) -> Result<String, Status> {
    let answer = HealthClient::new(client.channel())
        .check(HealthCheckRequest::default())
        .await?;
    Ok(answer
        .metadata()
        .get("x-instance")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned())
}

/// Three instances of `SERVICE` in `registry`: calls spread over all, follow a
/// deregistration, and move to the survivors when one is killed between calls.
pub(crate) async fn balances_follows_and_survives<R>(registry: R)
where
    R: Registry + Discover + Clone + 'static,
{
    let names = ["product-1", "product-2", "product-3"];
    let mut servers = Vec::new();
    for name in names {
        let server = instance(name).await;
        let entry = Instance::new(SERVICE, name, "127.0.0.1", server.addr.port());
        registry
            .register(&Registration::new(entry).ttl(Duration::from_secs(30)))
            .await
            .unwrap();
        servers.push(server);
    }
    let client = GrpcClient::builder(Arc::new(registry.clone()), SERVICE)
        .idempotent("grpc.health.v1.Health")
        .policy(
            ResiliencePolicy::new().retry(
                RetryConfig::new()
                    .max_attempts(3)
                    .initial_backoff(Duration::from_millis(5))
                    .max_backoff(Duration::from_millis(20)),
            ),
        )
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();

    let mut seen = HashSet::new();
    for _ in 0..30 {
        seen.insert(who(&client).await.unwrap());
    }
    assert_eq!(seen.len(), 3, "every instance took calls: {seen:?}");

    registry.deregister(SERVICE, "product-1").await.unwrap();
    eventually(
        Duration::from_secs(10),
        "the balancer drops product-1",
        || {
            let ids: Vec<String> = client
                .balancer()
                .endpoints()
                .into_iter()
                .map(|e| e.instance.id)
                .collect();
            async move { ids.len() == 2 && !ids.contains(&"product-1".to_owned()) }
        },
    )
    .await;
    for _ in 0..20 {
        assert_ne!(who(&client).await.unwrap(), "product-1");
    }

    // product-2 dies mid-way through a stream of calls, still registered: every call
    // still succeeds, on the survivor once the failures are retried and it is ejected.
    let victim = servers.remove(1);
    let mut after_kill = Vec::new();
    let mut victim = Some(victim);
    for call in 0..40 {
        if call == 10 {
            victim.take().unwrap().kill().await;
        }
        let answered = who(&client).await.unwrap_or_else(|status| {
            panic!("call {call} failed although a survivor is up: {status:?}")
        });
        if call > 10 {
            after_kill.push(answered);
        }
    }
    assert!(
        after_kill.iter().all(|name| name == "product-3"),
        "only the survivor answers: {after_kill:?}"
    );
    for server in servers {
        server.kill().await;
    }
}

#[tokio::test]
async fn calls_by_name_over_the_memory_registry() {
    balances_follows_and_survives(MemoryRegistry::new()).await;
}

#[cfg(feature = "etcd")]
#[tokio::test]
async fn calls_by_name_over_etcd() {
    use crate::etcd::{connect, endpoint, fresh_prefix};
    balances_follows_and_survives(connect(&endpoint(), &fresh_prefix()).await).await;
}
