//! Balanced clients over real servers: three instances of a service on 127.0.0.1:0,
//! registered in the memory registry, called by name.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use futures_util::StreamExt;
use micro_core::resilience::{ResiliencePolicy, RetryBudgetConfig, RetryConfig};
use micro_core::service::BoxFuture;
use micro_discovery::balance::{BalanceConfig, Strategy};
use micro_discovery::client::ServiceClient;
use micro_discovery::memory::MemoryRegistry;
use micro_discovery::{
    CachedDiscover, Discover, Error, HttpCheck, Instance, Registration, Registry, Watch,
};
use tokio::sync::watch;

use crate::support::{eventually, Server};

const SERVICE: &str = "product-service";

/// Hits per instance name.
type Hits = Arc<Mutex<HashMap<String, usize>>>;

async fn instance_server(name: &str, hits: Hits, status: StatusCode) -> Server {
    let name = name.to_owned();
    Server::start(
        Router::new()
            .route(
                "/whoami",
                get(
                    move |State((name, hits)): State<(String, Hits)>| async move {
                        *hits.lock().unwrap().entry(name.clone()).or_default() += 1;
                        (status, name)
                    },
                ),
            )
            .route("/health", get(|| async { "ok" }))
            .with_state((name, hits)),
    )
    .await
}

/// Three servers registered as `product-1..3`, each with an HTTP check every `interval`.
pub(crate) async fn three_instances(
    registry: &dyn Registry,
    hits: &Hits,
    interval: Duration,
) -> Vec<(String, Server)> {
    let mut servers = Vec::new();
    for name in ["product-1", "product-2", "product-3"] {
        let server = instance_server(name, hits.clone(), StatusCode::OK).await;
        let instance = Instance::new(SERVICE, name, "127.0.0.1", server.addr.port());
        let check = HttpCheck::new(format!("http://{}/health", server.addr), interval)
            .timeout(Duration::from_millis(200));
        registry
            .register(&Registration::new(instance).http_check(check))
            .await
            .unwrap();
        servers.push((name.to_owned(), server));
    }
    servers
}

fn retrying() -> ResiliencePolicy {
    ResiliencePolicy::new().retry(
        RetryConfig::new()
            .max_attempts(3)
            .initial_backoff(Duration::from_millis(5))
            .max_backoff(Duration::from_millis(20))
            .budget(
                RetryBudgetConfig::new()
                    .retry_ratio(1.0)
                    .min_retries_per_sec(1000),
            ),
    )
}

async fn whoami(client: &ServiceClient) -> Result<String, micro_core::client::Error> {
    let reply = client
        .http()
        .send(
            http::Request::get("/whoami")
                .body(bytes::Bytes::new())
                .unwrap(),
        )
        .await?;
    Ok(String::from_utf8(reply.into_body().to_vec()).unwrap())
}

#[tokio::test]
async fn round_robin_spreads_requests_evenly() {
    let registry = MemoryRegistry::new();
    let hits = Hits::default();
    let _servers = three_instances(&registry, &hits, Duration::from_secs(5)).await;
    let client = ServiceClient::builder(Arc::new(registry), SERVICE)
        .balance(BalanceConfig::new().strategy(Strategy::RoundRobin))
        .build()
        .unwrap();
    for _ in 0..30 {
        whoami(&client).await.unwrap();
    }
    let hits = hits.lock().unwrap();
    for name in ["product-1", "product-2", "product-3"] {
        assert_eq!(hits.get(name), Some(&10), "{hits:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_an_instance_loses_no_request_and_it_leaves_the_rotation() {
    let registry = MemoryRegistry::new();
    kill_one_of_three(
        Arc::new(registry.clone()),
        Arc::new(registry),
        Duration::ZERO,
    )
    .await;
}

/// With three instances behind a client under load, killing one loses no request
/// beyond those in flight on it, and it leaves the rotation within its health-check
/// interval (plus the check's timeout and `propagation`, the time the registry takes to
/// tell watchers).
pub(crate) async fn kill_one_of_three(
    registry: Arc<dyn Registry>,
    discover: Arc<dyn Discover>,
    propagation: Duration,
) {
    let interval = Duration::from_millis(500);
    let hits = Hits::default();
    let mut servers = three_instances(&*registry, &hits, interval).await;
    let client = ServiceClient::builder(discover, SERVICE)
        .policy(retrying())
        .configure(|client| client.timeout(Duration::from_secs(2)))
        .build()
        .unwrap();
    client.balancer().ready().await.unwrap();
    // Where checks start critical (Consul), instances join after their first check.
    eventually(Duration::from_secs(5), "three instances", || async {
        client.balancer().endpoints().len() == 3
    })
    .await;

    // Four callers, bounded in count, until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut callers = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (client, stop, ok, failed) = (client.clone(), stop.clone(), ok.clone(), failed.clone());
        callers.spawn(async move {
            for _ in 0..5_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                match whoami(&client).await {
                    Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        });
    }
    eventually(
        Duration::from_secs(10),
        "traffic on every instance",
        || async { hits.lock().unwrap().values().filter(|&&n| n >= 5).count() == 3 },
    )
    .await;

    let (name, victim) = servers.remove(1);
    let in_flight_at_kill = client
        .balancer()
        .endpoints()
        .iter()
        .find(|e| e.instance.id == name)
        .map_or(0, |e| e.in_flight);
    let killed_at = tokio::time::Instant::now();
    victim.kill().await;

    eventually(
        interval * 2 + Duration::from_secs(1) + propagation,
        "the killed instance to leave the rotation",
        || async {
            client
                .balancer()
                .endpoints()
                .iter()
                .all(|e| e.instance.id != name)
        },
    )
    .await;
    let left_after = killed_at.elapsed();
    let ok_at_removal = ok.load(Ordering::Relaxed);
    eventually(
        Duration::from_secs(10),
        "more traffic after the removal",
        || async { ok.load(Ordering::Relaxed) > ok_at_removal + 50 },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    while callers.join_next().await.is_some() {}

    let failed = failed.load(Ordering::Relaxed);
    assert!(
        failed <= in_flight_at_kill,
        "{failed} requests failed, {in_flight_at_kill} were in flight on the killed instance"
    );
    // The check runs every interval and may take its timeout to fail.
    assert!(
        left_after
            <= interval + Duration::from_millis(200) + Duration::from_millis(300) + propagation,
        "left the rotation after {left_after:?}"
    );
    assert!(ok.load(Ordering::Relaxed) > 100);
}

#[tokio::test]
async fn a_retried_request_goes_to_another_instance() {
    let registry = MemoryRegistry::new();
    let hits = Hits::default();
    let good = instance_server("good", hits.clone(), StatusCode::OK).await;
    let bad = instance_server("bad", hits.clone(), StatusCode::SERVICE_UNAVAILABLE).await;
    for (name, server) in [("good", &good), ("bad", &bad)] {
        let instance = Instance::new(SERVICE, name, "127.0.0.1", server.addr.port());
        registry
            .register(&Registration::new(instance))
            .await
            .unwrap();
    }
    // Two attempts, no ejection: only choosing an untried instance makes every call
    // succeed.
    let client = ServiceClient::builder(Arc::new(registry), SERVICE)
        .balance(BalanceConfig::new().consecutive_failures(0))
        .policy(
            ResiliencePolicy::new().retry(
                RetryConfig::new()
                    .max_attempts(2)
                    .initial_backoff(Duration::from_millis(1))
                    .max_backoff(Duration::from_millis(1))
                    .budget(RetryBudgetConfig::new().min_retries_per_sec(1000)),
            ),
        )
        .build()
        .unwrap();
    for _ in 0..40 {
        assert_eq!(whoami(&client).await.unwrap(), "good");
    }
    let hits = hits.lock().unwrap();
    assert!(hits.get("bad").copied().unwrap_or(0) > 0, "{hits:?}");
    assert_eq!(hits.get("good"), Some(&40));
}

/// A discoverer whose registry can be cut off.
#[derive(Debug, Clone)]
struct Outage {
    inner: MemoryRegistry,
    down: Arc<watch::Sender<bool>>,
}

impl Outage {
    fn error() -> Error {
        Error::Unavailable {
            backend: "test",
            source: "connection refused".into(),
        }
    }
}

impl Discover for Outage {
    fn instances<'a>(
        &'a self,
        service: &'a str,
    ) -> BoxFuture<'a, micro_discovery::Result<Vec<Instance>>> {
        Box::pin(async move {
            if *self.down.borrow() {
                return Err(Self::error());
            }
            self.inner.instances(service).await
        })
    }

    fn watch(&self, service: &str) -> Watch {
        let inner = self.inner.watch(service);
        let down = self.down.subscribe();
        futures_util::stream::unfold((inner, down), |(mut inner, mut down)| async move {
            loop {
                tokio::select! {
                    item = inner.next() => {
                        let item = item?;
                        if !*down.borrow() {
                            return Some((item, (inner, down)));
                        }
                    }
                    changed = down.changed() => {
                        changed.ok()?;
                        if *down.borrow_and_update() {
                            return Some((Err(Outage::error()), (inner, down)));
                        }
                    }
                }
            }
        })
        .boxed()
    }
}

#[tokio::test]
async fn a_registry_outage_keeps_the_last_known_instances_serving() {
    let registry = MemoryRegistry::new();
    let hits = Hits::default();
    let _servers = three_instances(&registry, &hits, Duration::from_secs(5)).await;
    let outage = Outage {
        inner: registry.clone(),
        down: Arc::new(watch::channel(false).0),
    };
    let cached = CachedDiscover::new(outage.clone());
    let client = ServiceClient::builder(Arc::new(cached.clone()), SERVICE)
        .balance(BalanceConfig::new().strategy(Strategy::RoundRobin))
        .build()
        .unwrap();
    assert_eq!(cached.instances(SERVICE).await.unwrap().len(), 3);
    whoami(&client).await.unwrap();
    assert!(!cached.is_degraded());

    outage.down.send_replace(true);
    // Reads answer from the cache, calls go on to every known instance.
    assert_eq!(cached.instances(SERVICE).await.unwrap().len(), 3);
    for _ in 0..30 {
        whoami(&client).await.unwrap();
    }
    assert_eq!(client.balancer().endpoints().len(), 3);
    assert!(cached.is_degraded());
    let report = cached.health_check().run().await;
    assert!(!report.critical);
    let error = report.error.unwrap();
    assert!(
        error.contains("`product-service` served from 3 last known instances"),
        "{error}"
    );

    outage.down.send_replace(false);
    assert_eq!(cached.instances(SERVICE).await.unwrap().len(), 3);
    assert!(!cached.is_degraded());
    assert!(cached.health_check().run().await.error.is_none());
}

#[tokio::test]
async fn no_instances_is_a_retryable_error() {
    let registry = MemoryRegistry::new();
    let client = ServiceClient::builder(Arc::new(registry), "nobody")
        .balance(BalanceConfig::new().resolve_timeout(Duration::from_millis(100)))
        .build()
        .unwrap();
    let err = whoami(&client).await.unwrap_err();
    assert_eq!(err.kind(), micro_core::client::ErrorKind::Rejected);
    assert!(err.is_retryable());
    let source = std::error::Error::source(&err).unwrap().to_string();
    assert_eq!(source, "no healthy instance of service `nobody`");
}

#[tokio::test]
async fn a_signing_client_proves_its_service_and_carries_the_user_on_every_attempt() {
    use micro_core::identity::{Caller, KeyRing, KeySet, OnBehalfOf, Secret, VerifyCallerLayer};
    let keys = KeyRing::new(KeySet::new(
        "k1",
        Secret::new(*b"discovery test key, 0123456789abcdef").unwrap(),
    ));
    let registry = MemoryRegistry::new();
    let failures = Arc::new(AtomicUsize::new(1));
    let app = Router::new()
        .route(
            "/whoami",
            get(move |caller: Caller| {
                let failures = failures.clone();
                async move {
                    // The first attempt fails: the retry must carry a valid token too.
                    if failures.fetch_sub(1, Ordering::SeqCst) == 1 {
                        return Err(StatusCode::SERVICE_UNAVAILABLE);
                    }
                    Ok(format!("{} for {:?}", caller.service, caller.user))
                }
            }),
        )
        .layer(VerifyCallerLayer::new(keys.clone(), SERVICE));
    let server = Server::start(app).await;
    registry
        .register(&Registration::new(Instance::from_addr(
            SERVICE,
            server.addr,
        )))
        .await
        .unwrap();
    let client = ServiceClient::builder(Arc::new(registry.clone()), SERVICE)
        .policy(retrying())
        .sign_as(keys.clone(), "cart-service")
        .build()
        .unwrap();
    let answer = client
        .http()
        .request(http::Method::GET, "/whoami")
        .extension(OnBehalfOf::user("usr-7"))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.body().as_ref(), b"cart-service for Some(\"usr-7\")");

    let unsigned = ServiceClient::builder(Arc::new(registry), SERVICE)
        .build()
        .unwrap();
    let refused = unsigned
        .http()
        .request(http::Method::GET, "/whoami")
        .send()
        .await
        .unwrap_err();
    assert_eq!(refused.status(), Some(StatusCode::UNAUTHORIZED));
}
