//! Call a service by name: an [`HttpClient`] for `http://product-service` whose requests
//! go through discovery and a [`Balancer`].
//!
//! ```no_run
//! use std::sync::Arc;
//! use std::time::Duration;
//! use micro_core::resilience::{ResiliencePolicy, RetryConfig};
//! use micro_discovery::client::ServiceClient;
//! use micro_discovery::memory::MemoryRegistry;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let registry = MemoryRegistry::new();
//! let products = ServiceClient::builder(Arc::new(registry), "product-service")
//!     .policy(ResiliencePolicy::new()
//!         .timeout(Duration::from_secs(2))
//!         .retry(RetryConfig::new().max_attempts(3)))
//!     .build()?;
//! let product: serde_json::Value = products.http().get_json("/products/42").await?;
//! # Ok(())
//! # }
//! ```
//!
//! The stack, from the outside in:
//!
//! ```text
//! layers added with configure -> attempts -> resilience policy (retry, breaker, ...)
//!     -> balance (pick an instance, rewrite the url) -> trace headers -> transport
//! ```
//!
//! Retries sit outside the balancer, so each attempt picks again and a retried request
//! goes to an instance it has not tried yet. A request that finds no instance fails
//! with [`ErrorKind::Rejected`](micro_core::client::ErrorKind::Rejected) whose source is
//! this crate's [`Error::NoInstances`](crate::Error::NoInstances); it is retryable.

use std::fmt;
use std::sync::Arc;

use micro_core::client::{ClientBuilder, HttpClient};
use micro_core::identity::{KeyRing, SignCallerLayer};
use micro_core::resilience::ResiliencePolicy;

use crate::balance::{AttemptsLayer, BalanceConfig, Balancer};
use crate::discover::Discover;

type Configure = Box<dyn FnOnce(ClientBuilder) -> ClientBuilder + Send>;

/// A micro-core [`HttpClient`] bound to a service name, with its [`Balancer`].
///
/// Cheap to clone; clones share the connection pool and the balancer.
#[derive(Debug, Clone)]
pub struct ServiceClient {
    http: HttpClient,
    balancer: Balancer,
}

impl ServiceClient {
    /// Starts building a client for `service`, found through `discover`.
    pub fn builder(
        discover: Arc<dyn Discover>,
        service: impl Into<String>,
    ) -> ServiceClientBuilder {
        ServiceClientBuilder {
            discover,
            service: service.into(),
            balance: BalanceConfig::default(),
            policy: None,
            configure: Vec::new(),
            identity: None,
        }
    }

    /// The HTTP client: paths are relative to `http://<service>`.
    pub fn http(&self) -> &HttpClient {
        &self.http
    }

    /// The balancer: which instances are in rotation.
    pub fn balancer(&self) -> &Balancer {
        &self.balancer
    }

    /// The HTTP client, dropping this handle.
    pub fn into_http(self) -> HttpClient {
        self.http
    }
}

/// Configures a [`ServiceClient`]; see [`ServiceClient::builder`].
#[must_use]
pub struct ServiceClientBuilder {
    discover: Arc<dyn Discover>,
    service: String,
    balance: BalanceConfig,
    policy: Option<ResiliencePolicy>,
    configure: Vec<Configure>,
    identity: Option<(KeyRing, String)>,
}

impl ServiceClientBuilder {
    /// Sets how instances are chosen and ejected.
    pub fn balance(mut self, config: BalanceConfig) -> Self {
        self.balance = config;
        self
    }

    /// Wraps each call in `policy` (as [`ClientBuilder::policy`] does), outside the
    /// balancer: each retry picks an instance again.
    pub fn policy(mut self, policy: ResiliencePolicy) -> Self {
        self.policy = Some(policy);
        self
    }

    /// Signs every call as the service `caller` with `keys`, for this client's service
    /// (the token's audience), carrying the end user along: the user of the request
    /// being handled, or the one of an [`OnBehalfOf`](micro_core::identity::OnBehalfOf)
    /// extension (see [`SignCallerLayer`]). It sits inside the retry policy, so each
    /// attempt is signed afresh.
    pub fn sign_as(mut self, keys: KeyRing, caller: impl Into<String>) -> Self {
        self.identity = Some((keys, caller.into()));
        self
    }

    /// Adjusts the underlying [`ClientBuilder`] (timeouts, default headers, layers of
    /// your own, which go outermost).
    pub fn configure(
        mut self,
        configure: impl FnOnce(ClientBuilder) -> ClientBuilder + Send + 'static,
    ) -> Self {
        self.configure.push(Box::new(configure));
        self
    }

    /// Builds the client. Needs no runtime; the balancer starts following discovery on
    /// the first request.
    ///
    /// # Errors
    ///
    /// When the service name does not make a valid URL authority, or a setting given to
    /// [`configure`](Self::configure) is invalid.
    pub fn build(self) -> Result<ServiceClient, micro_core::client::Error> {
        let balancer = Balancer::new(self.discover, self.service.clone(), self.balance);
        let mut builder = HttpClient::builder(&format!("http://{}", self.service));
        for configure in self.configure {
            builder = configure(builder);
        }
        builder = builder.layer(AttemptsLayer::new());
        if let Some(policy) = self.policy {
            builder = builder.policy(&self.service, policy);
        }
        if let Some((keys, caller)) = self.identity {
            builder = builder.layer(SignCallerLayer::new(keys, caller, self.service.clone()));
        }
        let http = builder.layer(balancer.layer()).build()?;
        Ok(ServiceClient { http, balancer })
    }
}

impl fmt::Debug for ServiceClientBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceClientBuilder")
            .field("service", &self.service)
            .field("balance", &self.balance)
            .field("policy", &self.policy)
            .field("configure", &self.configure.len())
            .field("sign_as", &self.identity.as_ref().map(|(_, caller)| caller))
            .finish_non_exhaustive()
    }
}
