//! The conformance suite of [`Registry`] and [`Discover`]: every backend runs every test
//! here through [`conformance_tests!`].
//!
//! A backend module implements [`Backend`] and invokes the macro, optionally with
//! arguments for `#[tokio::test]` (`start_paused = true` for backends on Tokio time).
//! Waits are deadlines on Tokio time, so on a paused clock they take no real time and on
//! a real server they poll.

use std::sync::Arc;
use std::time::Duration;

use micro_discovery::{Discover, Error, HealthStatus, Instance, Registration, Registry};

use crate::support::{eventually, ids, watch_until};

/// A backend under test: a fresh, isolated registry per test.
pub(crate) trait Backend: Sized {
    /// A registry no other test sees (its own key prefix, its own server double, ...).
    async fn new() -> Self;
    fn registry(&self) -> Arc<dyn Registry>;
    fn discover(&self) -> Arc<dyn Discover>;
    /// A TTL short enough to lapse within a test.
    fn short_ttl(&self) -> Duration;
    /// How long a change may take to show.
    fn settle(&self) -> Duration {
        Duration::from_secs(10)
    }
}

/// Runs the whole suite as one `#[tokio::test]` per case.
macro_rules! conformance_tests {
    ($backend:ty, $args:tt) => {
        $crate::conformance::conformance_tests!(@each $backend, $args
            registered_instances_are_discovered,
            deregistered_instances_leave_and_watchers_see_it,
            critical_instances_are_not_returned,
            lapsed_ttls_remove_instances,
            keep_alive_keeps_instances,
            services_do_not_mix,
            watch_sees_every_change,
            registering_again_replaces,
            unknown_instances_are_not_registered
        );
    };
    (@each $backend:ty, $args:tt $($case:ident),*) => {
        $(
            #[tokio::test $args]
            async fn $case() {
                $crate::conformance::$case::<$backend>().await;
            }
        )*
    };
}
pub(crate) use conformance_tests;

fn instance(service: &str, id: &str, port: u16) -> Instance {
    Instance::new(service, id, "127.0.0.1", port)
}

/// Long enough never to lapse during a test; backends whose health reports need a TTL
/// (Consul) get one.
const LONG_TTL: Duration = Duration::from_secs(600);

pub(crate) async fn registered_instances_are_discovered<B: Backend>() {
    let backend = B::new().await;
    let registry = backend.registry();
    let rich = instance("catalog", "catalog-1", 8002)
        .with_tag("primary")
        .with_tag("eu")
        .with_metadata("build", "42")
        .with_version("1.2.3")
        .with_zone("zone-a");
    registry
        .register(&Registration::new(rich.clone()).ttl(LONG_TTL))
        .await
        .unwrap();
    let found = backend.discover().instances("catalog").await.unwrap();
    assert_eq!(found, vec![rich]);
}

pub(crate) async fn deregistered_instances_leave_and_watchers_see_it<B: Backend>() {
    let backend = B::new().await;
    let registry = backend.registry();
    let discover = backend.discover();
    for (id, port) in [("orders-1", 8003), ("orders-2", 9003)] {
        registry
            .register(&Registration::new(instance("orders", id, port)).ttl(LONG_TTL))
            .await
            .unwrap();
    }
    let mut watch = discover.watch("orders");
    watch_until(&mut watch, backend.settle(), "both instances", |set| {
        set.len() == 2
    })
    .await;

    registry.deregister("orders", "orders-1").await.unwrap();
    let set = watch_until(&mut watch, backend.settle(), "orders-1 to leave", |set| {
        set.len() == 1
    })
    .await;
    assert_eq!(ids(&set), ["orders-2"]);
    assert_eq!(
        ids(&discover.instances("orders").await.unwrap()),
        ["orders-2"]
    );

    // Deregistering twice is not an error.
    registry.deregister("orders", "orders-1").await.unwrap();
}

pub(crate) async fn critical_instances_are_not_returned<B: Backend>() {
    let backend = B::new().await;
    let registry = backend.registry();
    let discover = backend.discover();
    for (id, port) in [("cart-1", 8004), ("cart-2", 9004)] {
        registry
            .register(&Registration::new(instance("cart", id, port)).ttl(LONG_TTL))
            .await
            .unwrap();
    }
    registry
        .report_health("cart", "cart-1", HealthStatus::Critical)
        .await
        .unwrap();
    eventually(backend.settle(), "cart-1 to turn critical", || async {
        ids(&discover.instances("cart").await.unwrap()) == ["cart-2"]
    })
    .await;

    registry
        .report_health("cart", "cart-1", HealthStatus::Passing)
        .await
        .unwrap();
    eventually(backend.settle(), "cart-1 to pass again", || async {
        discover.instances("cart").await.unwrap().len() == 2
    })
    .await;
}

pub(crate) async fn lapsed_ttls_remove_instances<B: Backend>() {
    let backend = B::new().await;
    let registry = backend.registry();
    let discover = backend.discover();
    let ttl = backend.short_ttl();
    registry
        .register(&Registration::new(instance("payments", "payments-1", 8005)).ttl(ttl))
        .await
        .unwrap();
    registry
        .register(&Registration::new(instance("payments", "payments-2", 9005)))
        .await
        .unwrap();
    let mut watch = discover.watch("payments");
    watch_until(&mut watch, backend.settle(), "both instances", |set| {
        set.len() == 2
    })
    .await;
    let set = watch_until(
        &mut watch,
        ttl * 4 + backend.settle(),
        "the ttl to lapse",
        |set| set.len() == 1,
    )
    .await;
    assert_eq!(ids(&set), ["payments-2"], "an instance without a ttl stays");
}

pub(crate) async fn keep_alive_keeps_instances<B: Backend>() {
    let backend = B::new().await;
    let registry = backend.registry();
    let discover = backend.discover();
    let ttl = backend.short_ttl();
    registry
        .register(&Registration::new(instance("inventory", "inventory-1", 8006)).ttl(ttl))
        .await
        .unwrap();
    // Renew for three TTLs: the instance never leaves.
    let until = tokio::time::Instant::now() + ttl * 3;
    while tokio::time::Instant::now() < until {
        registry
            .keep_alive("inventory", "inventory-1")
            .await
            .unwrap();
        assert_eq!(
            ids(&discover.instances("inventory").await.unwrap()),
            ["inventory-1"]
        );
        tokio::time::sleep(ttl / 4).await;
    }
    // Then stop renewing: it leaves.
    eventually(ttl * 4 + backend.settle(), "the ttl to lapse", || async {
        discover.instances("inventory").await.unwrap().is_empty()
    })
    .await;
}

pub(crate) async fn services_do_not_mix<B: Backend>() {
    let backend = B::new().await;
    let registry = backend.registry();
    let discover = backend.discover();
    registry
        .register(&Registration::new(instance("user", "shared-id", 8001)).ttl(LONG_TTL))
        .await
        .unwrap();
    registry
        .register(&Registration::new(instance("user-admin", "admin-1", 8101)).ttl(LONG_TTL))
        .await
        .unwrap();
    assert_eq!(
        ids(&discover.instances("user").await.unwrap()),
        ["shared-id"]
    );
    assert_eq!(
        ids(&discover.instances("user-admin").await.unwrap()),
        ["admin-1"]
    );
    assert!(discover.instances("use").await.unwrap().is_empty());
    assert!(discover.instances("nobody").await.unwrap().is_empty());

    let mut watch = discover.watch("user-admin");
    registry.deregister("user", "shared-id").await.unwrap();
    registry
        .register(&Registration::new(instance("user-admin", "admin-2", 8102)).ttl(LONG_TTL))
        .await
        .unwrap();
    let set = watch_until(&mut watch, backend.settle(), "admin-2", |set| {
        set.len() == 2
    })
    .await;
    assert_eq!(ids(&set), ["admin-1", "admin-2"]);
}

pub(crate) async fn watch_sees_every_change<B: Backend>() {
    let backend = B::new().await;
    let registry = backend.registry();
    let mut watch = backend.discover().watch("notifications");
    watch_until(&mut watch, backend.settle(), "the empty set", |set| {
        set.is_empty()
    })
    .await;

    registry
        .register(&Registration::new(instance("notifications", "n-1", 8007)).ttl(LONG_TTL))
        .await
        .unwrap();
    watch_until(&mut watch, backend.settle(), "n-1", |set| {
        ids(set) == ["n-1"]
    })
    .await;

    registry
        .register(&Registration::new(instance("notifications", "n-2", 9007)).ttl(LONG_TTL))
        .await
        .unwrap();
    watch_until(&mut watch, backend.settle(), "n-2", |set| {
        ids(set) == ["n-1", "n-2"]
    })
    .await;

    registry
        .report_health("notifications", "n-1", HealthStatus::Critical)
        .await
        .unwrap();
    watch_until(&mut watch, backend.settle(), "n-1 critical", |set| {
        ids(set) == ["n-2"]
    })
    .await;

    registry.deregister("notifications", "n-2").await.unwrap();
    watch_until(&mut watch, backend.settle(), "nothing", |set| {
        set.is_empty()
    })
    .await;
}

pub(crate) async fn registering_again_replaces<B: Backend>() {
    let backend = B::new().await;
    let registry = backend.registry();
    let discover = backend.discover();
    registry
        .register(&Registration::new(instance("search", "search-1", 8010)).ttl(LONG_TTL))
        .await
        .unwrap();
    let moved = instance("search", "search-1", 8011).with_version("2");
    registry
        .register(&Registration::new(moved.clone()).ttl(LONG_TTL))
        .await
        .unwrap();
    eventually(backend.settle(), "the new port", || async {
        discover.instances("search").await.unwrap() == vec![moved.clone()]
    })
    .await;
}

pub(crate) async fn unknown_instances_are_not_registered<B: Backend>() {
    let backend = B::new().await;
    let registry = backend.registry();
    let err = registry.keep_alive("ghost", "ghost-1").await.unwrap_err();
    assert!(
        matches!(err, Error::NotRegistered { .. }),
        "keep_alive: {err:?}"
    );
    assert!(!err.is_retryable());
    let err = registry
        .report_health("ghost", "ghost-1", HealthStatus::Passing)
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::NotRegistered { .. }),
        "report_health: {err:?}"
    );
    let invalid = Registration::new(instance("bad name", "x", 1));
    assert!(matches!(
        registry.register(&invalid).await.unwrap_err(),
        Error::InvalidRegistration { .. }
    ));
}
