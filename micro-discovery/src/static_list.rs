//! A fixed list of instances from configuration: [`Discover`] only, for services whose
//! addresses do not change (a database proxy, a partner's API, a development setup).
//!
//! ```
//! use micro_core::config::ConfigLoader;
//! use micro_discovery::static_list::{StaticConfig, StaticDiscover};
//! use micro_discovery::Discover;
//!
//! let config: StaticConfig = ConfigLoader::new()
//!     .toml_str(r#"
//!         [services]
//!         product-service = ["127.0.0.1:8002", "127.0.0.1:9002"]
//!
//!         [[instances]]
//!         id = "payment-1"
//!         service = "payment-service"
//!         address = "10.0.0.9"
//!         port = 8005
//!         zone = "b"
//!     "#)
//!     .load()
//!     .unwrap();
//! let discover = StaticDiscover::from_config(&config).unwrap();
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let products = discover.instances("product-service").await.unwrap();
//! assert_eq!(products.len(), 2);
//! assert_eq!(products[0].id, "product-service-127.0.0.1-8002");
//! assert_eq!(discover.instances("payment-service").await.unwrap()[0].port, 8005);
//! # });
//! ```

use std::collections::BTreeMap;

use futures_util::StreamExt;
use micro_core::service::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::discover::{Discover, Watch};
use crate::error::{Error, Result};
use crate::instance::{sorted, Instance};

/// The configuration of a [`StaticDiscover`]: short `"host:port"` entries by service,
/// and full [`Instance`]s.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct StaticConfig {
    /// `"host:port"` entries by service name; each gets the id `service-host-port`.
    pub services: BTreeMap<String, Vec<String>>,
    /// Instances written out in full.
    pub instances: Vec<Instance>,
}

/// A [`Discover`] over a fixed list; see the [module docs](self).
///
/// Every listed instance counts as healthy unless its `health` says `critical`. A
/// [`watch`](Discover::watch) yields the list once and then nothing more.
#[derive(Debug, Clone, Default)]
pub struct StaticDiscover {
    services: BTreeMap<String, Vec<Instance>>,
}

impl StaticDiscover {
    /// Discovers exactly `instances`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidRegistration`] when an instance fails [`Instance::validate`] or
    /// two instances of a service share an id.
    pub fn new(instances: impl IntoIterator<Item = Instance>) -> Result<Self> {
        let mut services: BTreeMap<String, Vec<Instance>> = BTreeMap::new();
        for instance in instances {
            instance.validate()?;
            let list = services.entry(instance.service.clone()).or_default();
            if list.iter().any(|known| known.id == instance.id) {
                return Err(Error::invalid(format!(
                    "two instances of `{}` have the id `{}`",
                    instance.service, instance.id
                )));
            }
            list.push(instance);
        }
        for list in services.values_mut() {
            *list = sorted(std::mem::take(list));
        }
        Ok(Self { services })
    }

    /// Discovers what `config` lists.
    ///
    /// # Errors
    ///
    /// As [`new`](Self::new), and when a short entry is not `host:port`.
    pub fn from_config(config: &StaticConfig) -> Result<Self> {
        let mut instances = config.instances.clone();
        for (service, entries) in &config.services {
            for entry in entries {
                let (host, port) = entry
                    .rsplit_once(':')
                    .and_then(|(host, port)| Some((host, port.parse::<u16>().ok()?)))
                    .ok_or_else(|| {
                        Error::invalid(format!("`{entry}` for `{service}` is not `host:port`"))
                    })?;
                let host = host.trim_start_matches('[').trim_end_matches(']');
                let id = format!("{service}-{host}-{port}");
                instances.push(Instance::new(service.clone(), id, host, port));
            }
        }
        Self::new(instances)
    }

    fn healthy(&self, service: &str) -> Vec<Instance> {
        self.services
            .get(service)
            .map(|list| {
                list.iter()
                    .filter(|instance| instance.health.is_healthy())
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Discover for StaticDiscover {
    fn instances<'a>(&'a self, service: &'a str) -> BoxFuture<'a, Result<Vec<Instance>>> {
        Box::pin(std::future::ready(Ok(self.healthy(service))))
    }

    fn watch(&self, service: &str) -> Watch {
        futures_util::stream::once(std::future::ready(Ok(self.healthy(service))))
            .chain(futures_util::stream::pending())
            .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_entries_are_reported() {
        let mut config = StaticConfig::default();
        config.services.insert("svc".into(), vec!["no-port".into()]);
        let err = StaticDiscover::from_config(&config).unwrap_err();
        assert!(err
            .to_string()
            .contains("`no-port` for `svc` is not `host:port`"));

        let twice = Instance::new("svc", "a", "h", 1);
        assert!(StaticDiscover::new([twice.clone(), twice]).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn watch_yields_the_list_then_waits() {
        let discover = StaticDiscover::new([Instance::new("svc", "a", "h", 1)]).unwrap();
        let mut watch = discover.watch("svc");
        assert_eq!(watch.next().await.unwrap().unwrap().len(), 1);
        let more = tokio::time::timeout(std::time::Duration::from_millis(10), watch.next()).await;
        assert!(more.is_err());
    }
}
