//! The static backend is `Discover` only: the read side of the conformance suite.

use micro_discovery::static_list::StaticDiscover;
use micro_discovery::{Discover, HealthStatus, Instance};

#[tokio::test]
async fn lists_healthy_instances_by_service_and_never_mixes_them() {
    let discover = StaticDiscover::new([
        Instance::new("a", "a-2", "10.0.0.2", 80),
        Instance::new("a", "a-1", "10.0.0.1", 80),
        Instance::new("a", "a-3", "10.0.0.3", 80).with_health(HealthStatus::Critical),
        Instance::new("b", "b-1", "10.0.0.4", 80),
    ])
    .unwrap();
    let a = discover.instances("a").await.unwrap();
    assert_eq!(crate::support::ids(&a), ["a-1", "a-2"]);
    assert_eq!(discover.instances("b").await.unwrap().len(), 1);
    assert!(discover.instances("c").await.unwrap().is_empty());
}
