use std::collections::HashMap;
use std::sync::Arc;

use http::{Request, Response, StatusCode};
use tokio::sync::Semaphore;
use tower::{service_fn, Layer, ServiceExt};

use micro_core::error::BoxError;

use super::*;
use crate::memory::MemoryRegistry;
use crate::{Registration, Registry};

const SERVICE: &str = "svc";

async fn registry_with(ports: &[u16]) -> MemoryRegistry {
    let registry = MemoryRegistry::new();
    for port in ports {
        let instance = Instance::new(SERVICE, format!("i-{port}"), "127.0.0.1", *port);
        registry
            .register(&Registration::new(instance))
            .await
            .unwrap();
    }
    registry
}

fn port_of<B>(req: &Request<B>) -> u16 {
    req.uri().port_u16().unwrap()
}

/// Answers with the port the request was sent to, failing with `500` for `bad` ports.
fn echo(
    bad: &'static [u16],
) -> impl tower_service::Service<
    Request<()>,
    Response = Response<u16>,
    Error = BoxError,
    Future = impl Send,
> + Clone
       + Send
       + 'static {
    service_fn(move |req: Request<()>| async move {
        let port = port_of(&req);
        let status = if bad.contains(&port) {
            StatusCode::INTERNAL_SERVER_ERROR
        } else {
            StatusCode::OK
        };
        Ok::<_, BoxError>(Response::builder().status(status).body(port).unwrap())
    })
}

fn request() -> Request<()> {
    Request::get("http://svc/path?q=1").body(()).unwrap()
}

#[tokio::test(start_paused = true)]
async fn requests_are_rewritten_to_the_chosen_instance() {
    let registry = registry_with(&[7001]).await;
    let balancer = Balancer::new(Arc::new(registry), SERVICE, BalanceConfig::default());
    let service = balancer
        .layer()
        .layer(service_fn(|req: Request<()>| async move {
            Ok::<_, BoxError>(Response::new(req.uri().to_string()))
        }));
    let response = service.oneshot(request()).await.unwrap();
    assert_eq!(response.body(), "http://127.0.0.1:7001/path?q=1");
}

#[tokio::test(start_paused = true)]
async fn round_robin_takes_turns() {
    let registry = registry_with(&[7001, 7002, 7003]).await;
    let config = BalanceConfig::new().strategy(Strategy::RoundRobin);
    let balancer = Balancer::new(Arc::new(registry), SERVICE, config);
    let service = balancer.layer().layer(echo(&[]));
    let mut ports = Vec::new();
    for _ in 0..6 {
        ports.push(*service.clone().oneshot(request()).await.unwrap().body());
    }
    assert_eq!(ports, [7001, 7002, 7003, 7001, 7002, 7003]);
}

#[tokio::test(start_paused = true)]
async fn power_of_two_choices_avoids_the_loaded_instance() {
    let registry = registry_with(&[7001, 7002]).await;
    let balancer = Balancer::new(Arc::new(registry), SERVICE, BalanceConfig::default());
    // Requests to 7001 hang until released; 7002 answers at once.
    let gate = Arc::new(Semaphore::new(0));
    let service = balancer.layer().layer(service_fn({
        let gate = gate.clone();
        move |req: Request<()>| {
            let gate = gate.clone();
            async move {
                let port = port_of(&req);
                if port == 7001 {
                    let _permit = gate.acquire().await?;
                }
                Ok::<_, BoxError>(Response::new(port))
            }
        }
    }));
    // Load 7001 with one request in flight.
    let mut pending = Vec::new();
    while balancer
        .endpoints()
        .iter()
        .all(|e| e.in_flight == 0 || e.instance.port != 7001)
    {
        let call = tokio::spawn(service.clone().oneshot(request()));
        tokio::task::yield_now().await;
        pending.push(call);
    }
    // With two instances both are always compared: every new request avoids 7001.
    for _ in 0..20 {
        assert_eq!(
            *service.clone().oneshot(request()).await.unwrap().body(),
            7002
        );
    }
    gate.add_permits(pending.len());
    for call in pending {
        call.await.unwrap().unwrap();
    }
    assert!(balancer.endpoints().iter().all(|e| e.in_flight == 0));
}

#[tokio::test(start_paused = true)]
async fn failing_instances_are_ejected_for_a_while_and_come_back() {
    let registry = registry_with(&[7001, 7002]).await;
    let config = BalanceConfig::new()
        .strategy(Strategy::RoundRobin)
        .consecutive_failures(2)
        .ejection_time(Duration::from_secs(30));
    let balancer = Balancer::new(Arc::new(registry), SERVICE, config);
    let service = balancer.layer().layer(echo(&[7002]));
    let mut seen = HashMap::<u16, usize>::new();
    for _ in 0..10 {
        let port = *service.clone().oneshot(request()).await.unwrap().body();
        *seen.entry(port).or_default() += 1;
    }
    assert_eq!(seen.get(&7002), Some(&2), "two failures eject it");
    assert!(balancer
        .endpoints()
        .iter()
        .any(|e| e.instance.port == 7002 && e.ejected));

    tokio::time::advance(Duration::from_secs(31)).await;
    assert!(balancer.endpoints().iter().all(|e| !e.ejected));
    let mut came_back = false;
    for _ in 0..4 {
        came_back |= *service.clone().oneshot(request()).await.unwrap().body() == 7002;
    }
    assert!(came_back);
}

#[tokio::test(start_paused = true)]
async fn when_every_instance_is_ejected_they_are_used_anyway() {
    let registry = registry_with(&[7001]).await;
    let config = BalanceConfig::new().consecutive_failures(1);
    let balancer = Balancer::new(Arc::new(registry), SERVICE, config);
    let service = balancer.layer().layer(echo(&[7001]));
    for _ in 0..3 {
        let response = service.clone().oneshot(request()).await.unwrap();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }
}

#[tokio::test(start_paused = true)]
async fn attempts_steer_retries_to_untried_instances() {
    let registry = registry_with(&[7001, 7002, 7003]).await;
    let config = BalanceConfig::new().consecutive_failures(0);
    let balancer = Balancer::new(Arc::new(registry), SERVICE, config);
    let service = AttemptsLayer::new().layer(balancer.layer().layer(echo(&[])));
    let mut req = request();
    let attempts = Attempts::new();
    req.extensions_mut().insert(attempts.clone());
    for _ in 0..3 {
        service.clone().oneshot(req.clone()).await.unwrap();
    }
    let mut tried = attempts.instances();
    tried.sort();
    assert_eq!(tried, ["i-7001", "i-7002", "i-7003"]);
}

#[tokio::test(start_paused = true)]
async fn instance_changes_keep_requests_in_flight() {
    let registry = registry_with(&[7001]).await;
    let balancer = Balancer::new(
        Arc::new(registry.clone()),
        SERVICE,
        BalanceConfig::default(),
    );
    let gate = Arc::new(Semaphore::new(0));
    let service = balancer.layer().layer(service_fn({
        let gate = gate.clone();
        move |req: Request<()>| {
            let gate = gate.clone();
            async move {
                let _permit = gate.acquire().await?;
                Ok::<_, BoxError>(Response::new(port_of(&req)))
            }
        }
    }));
    let in_flight = tokio::spawn(service.clone().oneshot(request()));
    while balancer
        .endpoints()
        .first()
        .is_none_or(|e| e.in_flight == 0)
    {
        tokio::task::yield_now().await;
    }

    // 7001 leaves and 7002 arrives while the request is in flight.
    registry
        .register(&Registration::new(Instance::new(
            SERVICE,
            "i-7002",
            "127.0.0.1",
            7002,
        )))
        .await
        .unwrap();
    registry.deregister(SERVICE, "i-7001").await.unwrap();
    while balancer.endpoints().iter().any(|e| e.instance.port == 7001) {
        tokio::task::yield_now().await;
    }
    gate.add_permits(10);
    assert_eq!(*in_flight.await.unwrap().unwrap().body(), 7001);
    assert_eq!(*service.oneshot(request()).await.unwrap().body(), 7002);
}

/// A registry that never answers.
#[derive(Debug)]
struct Silent;

impl Discover for Silent {
    fn instances<'a>(
        &'a self,
        _service: &'a str,
    ) -> micro_core::service::BoxFuture<'a, Result<Vec<Instance>>> {
        Box::pin(std::future::pending())
    }

    fn watch(&self, _service: &str) -> Watch {
        futures_util::stream::pending().boxed()
    }
}

#[tokio::test(start_paused = true)]
async fn the_first_set_is_awaited_up_to_the_resolve_timeout() {
    let config = BalanceConfig::new().resolve_timeout(Duration::from_secs(2));
    let balancer = Balancer::new(Arc::new(Silent), SERVICE, config);
    let started = Instant::now();
    let err = balancer.ready().await.unwrap_err();
    assert!(matches!(err, Error::NoInstances { .. }));
    assert_eq!(started.elapsed(), Duration::from_secs(2));
}
