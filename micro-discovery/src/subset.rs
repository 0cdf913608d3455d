//! [`VersionSubset`]: the instances of a service that run one version, for releases that
//! send part of the traffic to a new version (canary) or switch it all at once
//! (blue-green).

use std::sync::Arc;

use futures_util::StreamExt as _;
use micro_core::service::BoxFuture;

use crate::discover::{Discover, Watch};
use crate::error::Result;
use crate::instance::Instance;

/// The healthy instances of another [`Discover`] whose
/// [`version`](Instance::version) is one given version; instances without a version are
/// in no subset.
///
/// A [`Balancer`](crate::balance::Balancer) over a `VersionSubset` balances over that
/// version only and follows its instances as they come and go, like over the whole
/// service.
///
/// ```
/// # use std::sync::Arc;
/// use micro_discovery::memory::MemoryRegistry;
/// use micro_discovery::subset::VersionSubset;
/// use micro_discovery::{Discover, Instance, Registration, Registry};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> micro_discovery::Result<()> {
/// let registry = MemoryRegistry::new();
/// for (id, version) in [("a", "1.0"), ("b", "2.0")] {
///     let instance = Instance::new("shop", id, "10.0.0.1", 80).with_version(version);
///     registry.register(&Registration::new(instance)).await?;
/// }
///
/// let canary = VersionSubset::new(Arc::new(registry), "2.0");
/// let ids: Vec<String> = canary.instances("shop").await?.into_iter().map(|i| i.id).collect();
/// assert_eq!(ids, ["b"]);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct VersionSubset {
    inner: Arc<dyn Discover>,
    version: Arc<str>,
}

impl VersionSubset {
    /// The instances of `inner` that run `version`.
    pub fn new(inner: Arc<dyn Discover>, version: impl Into<Arc<str>>) -> Self {
        Self {
            inner,
            version: version.into(),
        }
    }

    /// The version this subset holds.
    pub fn version(&self) -> &str {
        &self.version
    }

    fn keep(version: &str, mut instances: Vec<Instance>) -> Vec<Instance> {
        instances.retain(|instance| instance.version.as_deref() == Some(version));
        instances
    }
}

impl Discover for VersionSubset {
    fn instances<'a>(&'a self, service: &'a str) -> BoxFuture<'a, Result<Vec<Instance>>> {
        Box::pin(async move {
            let all = self.inner.instances(service).await?;
            Ok(Self::keep(&self.version, all))
        })
    }

    fn watch(&self, service: &str) -> Watch {
        let version = self.version.clone();
        self.inner
            .watch(service)
            .map(move |item| item.map(|all| Self::keep(&version, all)))
            .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryRegistry;
    use crate::{Registration, Registry};

    fn instance(id: &str, version: Option<&str>) -> Instance {
        let instance = Instance::new("shop", id, "127.0.0.1", 80);
        match version {
            Some(version) => instance.with_version(version),
            None => instance,
        }
    }

    #[tokio::test]
    async fn a_subset_holds_one_version_and_follows_its_changes() {
        let registry = MemoryRegistry::new();
        let stable = VersionSubset::new(Arc::new(registry.clone()), "1.0");
        let mut watch = stable.watch("shop");
        let ids = |set: Vec<Instance>| set.into_iter().map(|i| i.id).collect::<Vec<_>>();
        assert!(ids(watch.next().await.unwrap().unwrap()).is_empty());

        for (id, version) in [("a", Some("1.0")), ("b", Some("2.0")), ("c", None)] {
            registry
                .register(&Registration::new(instance(id, version)))
                .await
                .unwrap();
        }
        assert_eq!(ids(stable.instances("shop").await.unwrap()), ["a"]);
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let set = tokio::time::timeout_at(deadline, watch.next())
                .await
                .expect("the watch saw the registration")
                .unwrap()
                .unwrap();
            if !set.is_empty() {
                assert_eq!(ids(set), ["a"]);
                break;
            }
        }
    }
}
