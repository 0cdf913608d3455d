//! A hosted service registers when ready, stays registered by keep-alive, and leaves
//! discovery before its requests drain.

use std::sync::Arc;
use std::time::Duration;

use axum::routing::get;
use axum::Router;
use micro_core::host::ServiceHost;
use micro_core::service::Service;
use micro_discovery::host::{Registrar, ServiceHostBuilderExt};
use micro_discovery::memory::MemoryRegistry;
use micro_discovery::{Discover, Instance, Registration, Registry};

use crate::support::{ids, watch_until};

struct Orders;

impl Service for Orders {
    fn name(&self) -> &str {
        "order-service"
    }

    fn router(&self) -> Router {
        Router::new().route("/orders", get(|| async { "[]" }))
    }
}

#[tokio::test(start_paused = true)]
async fn registers_when_ready_keeps_alive_and_deregisters_first_on_shutdown() {
    let registry = MemoryRegistry::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let ttl = Duration::from_secs(3);
    let registration = Registration::new(Instance::from_addr("order-service", addr)).ttl(ttl);
    let mut watch = registry.watch("order-service");
    watch_until(&mut watch, Duration::from_secs(1), "nothing", |set| {
        set.is_empty()
    })
    .await;

    let running = ServiceHost::builder()
        .service_on(Orders, listener)
        .register_in(Arc::new(registry.clone()), registration)
        .before_drain("after-deregistration", {
            let registry = registry.clone();
            move || async move {
                // Hooks run in order: the instance is already out of discovery.
                assert!(registry.instances("order-service").await?.is_empty());
                Ok(())
            }
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let set = watch_until(&mut watch, Duration::from_secs(1), "the instance", |set| {
        set.len() == 1
    })
    .await;
    assert_eq!(
        ids(&set),
        [format!("order-service-{}-{}", addr.ip(), addr.port())]
    );

    // Ten TTLs later it is still there: the keep-alive renews it.
    tokio::time::sleep(ttl * 10).await;
    assert_eq!(registry.instances("order-service").await.unwrap().len(), 1);

    running.shutdown_trigger().trigger();
    let report = running.run_until(std::future::pending()).await;
    assert!(report.failed_hooks.is_empty(), "{:?}", report.failed_hooks);
    watch_until(
        &mut watch,
        Duration::from_secs(1),
        "deregistration",
        |set| set.is_empty(),
    )
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_lapsed_registration_is_registered_again() {
    let registry = MemoryRegistry::new();
    let ttl = Duration::from_secs(3);
    let registration =
        Registration::new(Instance::new("audit", "audit-1", "127.0.0.1", 9100)).ttl(ttl);
    let registrar = Registrar::new(Arc::new(registry.clone()), registration);
    registrar.start().await.unwrap();
    // The registry forgets it (a restarted registry, say).
    registry.deregister("audit", "audit-1").await.unwrap();
    let mut watch = registry.watch("audit");
    watch_until(&mut watch, ttl * 2, "registration again", |set| {
        set.len() == 1
    })
    .await;
    registrar.stop().await.unwrap();
    assert!(registry.instances("audit").await.unwrap().is_empty());
}
