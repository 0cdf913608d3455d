//! [`Registry`]: how an instance announces itself, stays alive and reports its health.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use micro_core::service::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::instance::{HealthStatus, Instance};

/// An HTTP health check the registry runs against an instance, as in Consul's
/// registration JSON (`"check": {"http": "http://localhost:8001/health", "interval":
/// "10s"}`): every `interval` it `GET`s `url`; a `2xx` answer passes, a `429` warns and
/// anything else, a refused connection or a timeout is critical.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct HttpCheck {
    /// The URL to `GET` (a service on a [`ServiceHost`](micro_core::host::ServiceHost)
    /// answers `/health/ready`).
    pub http: String,
    /// How often to check.
    #[serde(with = "micro_core::config::duration")]
    pub interval: Duration,
    /// How long one check may take; defaults to the interval, at most 10 seconds.
    #[serde(default, with = "micro_core::config::duration::option")]
    pub timeout: Option<Duration>,
}

impl HttpCheck {
    /// Checks `url` every `interval`.
    pub fn new(url: impl Into<String>, interval: Duration) -> Self {
        Self {
            http: url.into(),
            interval,
            timeout: None,
        }
    }

    /// Sets how long one check may take.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// The timeout in force: the one set, or the interval capped at 10 seconds.
    pub fn effective_timeout(&self) -> Duration {
        self.timeout
            .unwrap_or_else(|| self.interval.min(Duration::from_secs(10)))
    }
}

/// What [`Registry::register`] is given: the instance and how its liveness is judged.
///
/// ```
/// use std::time::Duration;
/// use micro_discovery::{HttpCheck, Instance, Registration};
///
/// let registration = Registration::new(Instance::new("user-service", "user-1", "10.0.0.5", 8001))
///     .ttl(Duration::from_secs(15))
///     .http_check(HttpCheck::new("http://10.0.0.5:8001/health/ready", Duration::from_secs(10)));
/// assert!(registration.validate().is_ok());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Registration {
    /// The instance to announce.
    pub instance: Instance,
    /// When set, the instance must be [kept alive](Registry::keep_alive) more often than
    /// this or it leaves discovery.
    #[serde(default, with = "micro_core::config::duration::option")]
    pub ttl: Option<Duration>,
    /// An HTTP check run against the instance.
    #[serde(default)]
    pub http_check: Option<HttpCheck>,
}

impl Registration {
    /// Registers `instance` with no TTL and no check: it stays until deregistered.
    pub fn new(instance: Instance) -> Self {
        Self {
            instance,
            ttl: None,
            http_check: None,
        }
    }

    /// Requires a [keep-alive](Registry::keep_alive) at least every `ttl`.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// Adds an HTTP health check.
    pub fn http_check(mut self, check: HttpCheck) -> Self {
        self.http_check = Some(check);
        self
    }

    /// Checks the instance ([`Instance::validate`]), that the TTL is at least a
    /// millisecond and the check's interval is not zero and its URL is `http`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidRegistration`] saying what is wrong.
    pub fn validate(&self) -> Result<()> {
        self.instance.validate()?;
        if self.ttl.is_some_and(|ttl| ttl < Duration::from_millis(1)) {
            return Err(Error::invalid("the ttl must be at least 1ms"));
        }
        if let Some(check) = &self.http_check {
            if check.interval.is_zero() {
                return Err(Error::invalid("the http check's interval must not be zero"));
            }
            let uri: http::Uri = check
                .http
                .parse()
                .map_err(|_| Error::invalid(format!("`{}` is not a url", check.http)))?;
            if uri.scheme() != Some(&http::uri::Scheme::HTTP) || uri.authority().is_none() {
                return Err(Error::invalid(format!(
                    "the http check's url `{}` must be an http url with a host",
                    check.http
                )));
            }
        }
        Ok(())
    }
}

/// Where instances announce themselves.
///
/// Backends: [`MemoryRegistry`](crate::memory::MemoryRegistry), and behind features
/// `etcd::EtcdRegistry` (feature `etcd`) and
/// `consul::ConsulRegistry` (feature `consul`). The trait is
/// dyn-compatible: services hold an `Arc<dyn Registry>` chosen by configuration.
///
/// Instances are named by service and id. Calls on an instance that is not registered
/// (its TTL lapsed, say) fail with [`Error::NotRegistered`]; registering again is the
/// remedy, and [`Registrar`](crate::host::Registrar) does it on its own.
pub trait Registry: Send + Sync + fmt::Debug {
    /// Announces an instance, replacing an earlier registration with the same service and
    /// id. It is discoverable once this returns (after its first passing check, for a
    /// backend whose checks start critical).
    fn register<'a>(&'a self, registration: &'a Registration) -> BoxFuture<'a, Result<()>>;

    /// Removes an instance; watchers see it leave. Removing an instance that is not
    /// registered succeeds.
    fn deregister<'a>(&'a self, service: &'a str, id: &'a str) -> BoxFuture<'a, Result<()>>;

    /// Renews the TTL of an instance registered with one; does nothing for an instance
    /// registered without.
    fn keep_alive<'a>(&'a self, service: &'a str, id: &'a str) -> BoxFuture<'a, Result<()>>;

    /// Sets an instance's health as the instance itself sees it. A critical instance
    /// leaves discovery until it reports passing or warning again; where the backend
    /// holds the TTL as a check (Consul) this also renews it.
    fn report_health<'a>(
        &'a self,
        service: &'a str,
        id: &'a str,
        status: HealthStatus,
    ) -> BoxFuture<'a, Result<()>>;
}

impl<R: Registry + ?Sized> Registry for Arc<R> {
    fn register<'a>(&'a self, registration: &'a Registration) -> BoxFuture<'a, Result<()>> {
        (**self).register(registration)
    }

    fn deregister<'a>(&'a self, service: &'a str, id: &'a str) -> BoxFuture<'a, Result<()>> {
        (**self).deregister(service, id)
    }

    fn keep_alive<'a>(&'a self, service: &'a str, id: &'a str) -> BoxFuture<'a, Result<()>> {
        (**self).keep_alive(service, id)
    }

    fn report_health<'a>(
        &'a self,
        service: &'a str,
        id: &'a str,
        status: HealthStatus,
    ) -> BoxFuture<'a, Result<()>> {
        (**self).report_health(service, id, status)
    }
}
