//! [`Discover`]: the healthy instances of a service, now and as they change.

use std::fmt;
use std::sync::Arc;

use futures_util::stream::BoxStream;
use micro_core::service::BoxFuture;

use crate::error::{Error, Result};
use crate::instance::Instance;

/// What [`Discover::watch`] returns: the healthy instances of one service, each time they
/// change.
///
/// - The first item is the current set (possibly empty).
/// - Then an item comes whenever the set may have changed; each `Ok` item is the whole
///   healthy set, sorted by id, not a delta, so a consumer that missed items loses
///   nothing. Consecutive items may be equal.
/// - An `Err` item reports that the registry could not be read; the stream goes on
///   trying on its own and its next `Ok` item is again the whole set. Consumers keep
///   using the last set they had meanwhile (see [`CachedDiscover`](crate::CachedDiscover)).
/// - It ends only when its backend is dropped.
pub type Watch = BoxStream<'static, Result<Vec<Instance>, Error>>;

/// Finds the healthy ([passing or warning](crate::HealthStatus::is_healthy)) instances
/// of a service.
///
/// Backends: [`MemoryRegistry`](crate::memory::MemoryRegistry),
/// [`StaticDiscover`](crate::static_list::StaticDiscover), and behind features
/// `etcd::EtcdRegistry` (feature `etcd`) and
/// `consul::ConsulRegistry` (feature `consul`). The trait is
/// dyn-compatible; a [`Balancer`](crate::balance::Balancer) follows a
/// [`watch`](Self::watch) stream.
///
/// # When the registry is unreachable
///
/// [`instances`](Self::instances) fails with a retryable [`Error::Unavailable`] and a
/// watch stream yields an `Err` item; neither forgets anything on its own. Wrap a backend
/// in [`CachedDiscover`](crate::CachedDiscover) to keep answering with the last known set
/// and to say so in a readiness report ([`CachedDiscover::health_check`](crate::CachedDiscover::health_check));
/// a [`Balancer`](crate::balance::Balancer) keeps routing to the last set it had.
pub trait Discover: Send + Sync + fmt::Debug {
    /// The healthy instances of `service` now, sorted by id.
    fn instances<'a>(&'a self, service: &'a str) -> BoxFuture<'a, Result<Vec<Instance>>>;

    /// A stream of the healthy instances of `service`; see [`Watch`].
    fn watch(&self, service: &str) -> Watch;
}

impl<D: Discover + ?Sized> Discover for Arc<D> {
    fn instances<'a>(&'a self, service: &'a str) -> BoxFuture<'a, Result<Vec<Instance>>> {
        (**self).instances(service)
    }

    fn watch(&self, service: &str) -> Watch {
        (**self).watch(service)
    }
}
