//! The Consul backend: Consul's HTTP API, spoken to the local Consul agent.
//!
//! [`ConsulRegistry`] is both a [`Registry`] and a [`Discover`]:
//!
//! | operation | Consul endpoint |
//! |---|---|
//! | [`register`](Registry::register) | `PUT /v1/agent/service/register?replace-existing-checks=true` |
//! | [`deregister`](Registry::deregister) | `PUT /v1/agent/service/deregister/<id>` |
//! | [`keep_alive`](Registry::keep_alive), [`report_health`](Registry::report_health) | `PUT /v1/agent/check/pass\|warn\|fail/service:<id>` |
//! | [`instances`](Discover::instances) | `GET /v1/health/service/<name>?passing` |
//! | [`watch`](Discover::watch) | the same as a blocking query: `&index=<X-Consul-Index>&wait=<wait>` |
//!
//! Every request carries the ACL token in `X-Consul-Token` when one is configured, and
//! health queries the datacenter in `dc`.
//!
//! - **Registration**: the body is the service definition users know from Consul's docs
//!   (`ID`, `Name`, `Tags`, `Address`, `Port`, `Meta`, and a `Check`). The instance's
//!   version and zone travel as the `version` and `zone` keys of `Meta`. An
//!   [`HttpCheck`](crate::HttpCheck) becomes `{"HTTP", "Interval", "Timeout"}` and runs in
//!   the agent; a TTL becomes `{"TTL"}`, the check `service:<id>` that keep-alives and
//!   health reports update; with both, they go in `Checks`. Checks that stay critical for
//!   [`deregister_critical_after`](ConsulConfig::deregister_critical_after) make the agent
//!   deregister the instance (`DeregisterCriticalServiceAfter`).
//! - **Health**: Consul holds an instance's health in its checks, so
//!   [`report_health`](Registry::report_health) needs a TTL check (without one it fails
//!   with [`Error::Unsupported`]); it also renews the TTL, and later keep-alives repeat
//!   the status last reported.
//! - **Discovery**: by default only instances whose every check passes are returned
//!   (`?passing`, what Consul users expect), so on Consul a *warning* instance is left
//!   out. With [`passing_only`](ConsulConfig::passing_only) off, every instance is
//!   fetched and only critical ones are dropped, as other backends do.
//! - **Watch**: blocking queries. The stream waits for the index to move, yields the set
//!   when it changed, and after a failure yields an `Err` item, backs off (up to
//!   [`max_retry_backoff`](ConsulConfig::max_retry_backoff)) and reads afresh.
//! - Instance ids are the agent's service ids: unique per agent, across services.
//! - Plain HTTP only: Consul's model is a local agent on loopback; put a TLS-terminating
//!   agent address in front for anything else.
//!
//! The tests run against a double of these endpoints kept in the test suite, as no Consul
//! agent can be installed where they run (see the [crate docs](crate#backends-and-features)).
//!
//! ```no_run
//! use std::time::Duration;
//! use micro_discovery::consul::{ConsulConfig, ConsulRegistry};
//! use micro_discovery::{Discover, HttpCheck, Instance, Registration, Registry};
//!
//! # async fn run() -> Result<(), micro_discovery::Error> {
//! let consul = ConsulRegistry::new(
//!     ConsulConfig::new("http://127.0.0.1:8500").token("s3cr3t").datacenter("dc1"),
//! )?;
//! let instance = Instance::new("user-service", "user-1", "10.0.0.5", 8001);
//! let check = HttpCheck::new("http://10.0.0.5:8001/health", Duration::from_secs(10));
//! consul.register(&Registration::new(instance).http_check(check)).await?;
//! let users = consul.instances("user-service").await?;
//! # Ok(())
//! # }
//! ```

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{header, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use micro_core::service::BoxFuture;
use micro_core::tls::{ClientTlsConfig, HttpsConnector};
use serde::{Deserialize, Serialize};

use crate::discover::{Discover, Watch};
use crate::error::{Error, Result};
use crate::instance::{sorted, HealthStatus, Instance};
use crate::registry::{Registration, Registry};

const BACKEND: &str = "consul";
/// The header that carries the ACL token.
const TOKEN_HEADER: &str = "x-consul-token";
/// The header that carries a blocking query's index.
const INDEX_HEADER: &str = "x-consul-index";
const META_VERSION: &str = "version";
const META_ZONE: &str = "zone";
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// How to reach the Consul agent. Deserializes from configuration, durations as `"30s"`:
///
/// ```
/// # use micro_discovery::consul::ConsulConfig;
/// let config: ConsulConfig = serde_json::from_str(
///     r#"{"address": "http://127.0.0.1:8500", "datacenter": "dc1", "wait": "1m"}"#,
/// ).unwrap();
/// assert_eq!(config.wait.as_secs(), 60);
/// assert!(config.passing_only);
/// ```
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct ConsulConfig {
    /// The agent's HTTP address: `http://host:port`, or `https://host:port` for Consul's
    /// HTTPS API (verified as [`tls`](Self::tls) says). Default `http://127.0.0.1:8500`.
    pub address: String,
    /// How an `https` [`address`](Self::address) is verified: a CA bundle in place of the
    /// system trust store, a client certificate when the agent has `verify_incoming`
    /// (`ca`, `cert`, `key`; see [`ClientTlsConfig`]). Refused with an `http` address.
    pub tls: Option<ClientTlsConfig>,
    /// The ACL token sent in `X-Consul-Token`.
    pub token: Option<String>,
    /// The datacenter health queries ask (`dc`); the agent's own when unset.
    pub datacenter: Option<String>,
    /// How long a blocking query waits for a change (`wait`, at most 10 minutes).
    /// Default 30 s.
    #[serde(with = "micro_core::config::duration")]
    pub wait: Duration,
    /// How long any other request may take. Default 5 s.
    #[serde(with = "micro_core::config::duration")]
    pub request_timeout: Duration,
    /// The longest wait between attempts of a watch whose queries fail. Default 5 s.
    #[serde(with = "micro_core::config::duration")]
    pub max_retry_backoff: Duration,
    /// `DeregisterCriticalServiceAfter` for every check registered: the agent removes an
    /// instance whose check stayed critical that long. Default 1 minute (Consul's
    /// minimum); `None` keeps critical instances registered.
    #[serde(with = "micro_core::config::duration::option")]
    pub deregister_critical_after: Option<Duration>,
    /// Whether discovery asks for instances whose checks all pass (`?passing`, leaving
    /// warning ones out) rather than for all of them, dropping only critical ones.
    /// Default `true`.
    pub passing_only: bool,
}

impl Default for ConsulConfig {
    fn default() -> Self {
        Self {
            address: "http://127.0.0.1:8500".to_owned(),
            tls: None,
            token: None,
            datacenter: None,
            wait: Duration::from_secs(30),
            request_timeout: Duration::from_secs(5),
            max_retry_backoff: Duration::from_secs(5),
            deregister_critical_after: Some(Duration::from_secs(60)),
            passing_only: true,
        }
    }
}

impl fmt::Debug for ConsulConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsulConfig")
            .field("address", &self.address)
            .field("tls", &self.tls)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("datacenter", &self.datacenter)
            .field("wait", &self.wait)
            .field("request_timeout", &self.request_timeout)
            .field("max_retry_backoff", &self.max_retry_backoff)
            .field("deregister_critical_after", &self.deregister_critical_after)
            .field("passing_only", &self.passing_only)
            .finish()
    }
}

impl ConsulConfig {
    /// The defaults, with the agent at `address` (`http://host:port`).
    pub fn new(address: impl Into<String>) -> Self {
        Self {
            address: address.into(),
            ..Self::default()
        }
    }

    /// Sets [`tls`](Self::tls), for an `https` address.
    pub fn tls(mut self, tls: ClientTlsConfig) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Sets [`token`](Self::token).
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Sets [`datacenter`](Self::datacenter).
    pub fn datacenter(mut self, datacenter: impl Into<String>) -> Self {
        self.datacenter = Some(datacenter.into());
        self
    }

    /// Sets [`wait`](Self::wait).
    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }

    /// Sets [`request_timeout`](Self::request_timeout).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Sets [`max_retry_backoff`](Self::max_retry_backoff).
    pub fn max_retry_backoff(mut self, backoff: Duration) -> Self {
        self.max_retry_backoff = backoff;
        self
    }

    /// Sets [`deregister_critical_after`](Self::deregister_critical_after).
    pub fn deregister_critical_after(mut self, after: Option<Duration>) -> Self {
        self.deregister_critical_after = after;
        self
    }

    /// Sets [`passing_only`](Self::passing_only).
    pub fn passing_only(mut self, passing_only: bool) -> Self {
        self.passing_only = passing_only;
        self
    }
}

/// A [`Registry`] and [`Discover`] on Consul's HTTP API; see the [module docs](self).
///
/// Clones share one connection pool and what they know of the instances they registered.
#[derive(Clone)]
pub struct ConsulRegistry {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client<HttpsConnector, Full<Bytes>>,
    /// `http(s)://host:port`, without a trailing `/`.
    address: String,
    token: Option<HeaderValue>,
    datacenter: Option<String>,
    wait: Duration,
    request_timeout: Duration,
    max_retry_backoff: Duration,
    deregister_critical_after: Option<Duration>,
    passing_only: bool,
    /// What this process registered: whether with a TTL, and the status last reported.
    local: Mutex<HashMap<(String, String), Local>>,
}

#[derive(Debug, Clone, Copy)]
struct Local {
    ttl: bool,
    reported: HealthStatus,
}

impl ConsulRegistry {
    /// A registry talking to the agent in `config`. Connects lazily.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidRegistration`] for an address that is not `http://host[:port]` or
    /// `https://host[:port]`, TLS settings that can't be used (or with an `http` address), a
    /// token that cannot be a header value, a datacenter name with characters other than
    /// letters, digits, `-`, `_` and `.`, or a wait over 10 minutes.
    pub fn new(config: ConsulConfig) -> Result<Self> {
        let address = config.address.trim_end_matches('/').to_owned();
        let uri: http::Uri = address
            .parse()
            .map_err(|_| Error::invalid(format!("the consul address `{address}` is not a url")))?;
        let https = uri.scheme() == Some(&http::uri::Scheme::HTTPS);
        if (uri.scheme() != Some(&http::uri::Scheme::HTTP) && !https)
            || uri.authority().is_none()
            || uri.path().len() > 1
        {
            return Err(Error::invalid(format!(
                "the consul address `{address}` must be http://host[:port] or https://host[:port]"
            )));
        }
        let http = HttpConnector::new();
        let connector = match (&config.tls, https) {
            (Some(_), false) => {
                return Err(Error::invalid(format!(
                    "the consul `tls` settings need an https address, not `{address}`"
                )))
            }
            (tls, true) => tls
                .clone()
                .unwrap_or_default()
                .https_connector(http)
                .map_err(|e| Error::invalid(format!("the consul {e}")))?,
            (None, false) => micro_core::tls::http_only_connector(http),
        };
        let token = config
            .token
            .as_deref()
            .map(|token| {
                let mut value = HeaderValue::from_str(token)
                    .map_err(|_| Error::invalid("the consul token is not a valid header value"))?;
                value.set_sensitive(true);
                Ok::<_, Error>(value)
            })
            .transpose()?;
        if let Some(dc) = &config.datacenter {
            if dc.is_empty()
                || !dc
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            {
                return Err(Error::invalid(format!(
                    "the consul datacenter `{dc}` must be letters, digits, `-`, `_` or `.`"
                )));
            }
        }
        if config.wait > Duration::from_secs(600) || config.wait.is_zero() {
            return Err(Error::invalid(
                "the consul wait must be more than zero and at most 10 minutes",
            ));
        }
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                address,
                token,
                datacenter: config.datacenter,
                wait: config.wait,
                request_timeout: config.request_timeout,
                max_retry_backoff: config.max_retry_backoff,
                deregister_critical_after: config.deregister_critical_after,
                passing_only: config.passing_only,
                local: Mutex::default(),
            }),
        })
    }

    /// The JSON body [`register`](Registry::register) sends for `registration`: the
    /// service definition of Consul's `PUT /v1/agent/service/register`.
    ///
    /// ```
    /// use std::time::Duration;
    /// use micro_discovery::consul::{ConsulConfig, ConsulRegistry};
    /// use micro_discovery::{HttpCheck, Instance, Registration};
    ///
    /// let consul = ConsulRegistry::new(ConsulConfig::new("http://127.0.0.1:8500")).unwrap();
    /// let registration = Registration::new(Instance::new("user-service", "user-1", "localhost", 8001))
    ///     .http_check(HttpCheck::new("http://localhost:8001/health", Duration::from_secs(10)));
    /// let body = consul.registration_body(&registration);
    /// assert_eq!(body["Name"], "user-service");
    /// assert_eq!(body["Port"], 8001);
    /// assert_eq!(body["Check"]["HTTP"], "http://localhost:8001/health");
    /// assert_eq!(body["Check"]["Interval"], "10s");
    /// ```
    pub fn registration_body(&self, registration: &Registration) -> serde_json::Value {
        serde_json::to_value(self.inner.definition(registration))
            .expect("a service definition serializes")
    }
}

impl fmt::Debug for ConsulRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsulRegistry")
            .field("address", &self.inner.address)
            .field("datacenter", &self.inner.datacenter)
            .field("token", &self.inner.token.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

/// The service definition sent to `/v1/agent/service/register`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
struct ServiceDefinition<'a> {
    #[serde(rename = "ID")]
    id: &'a str,
    name: &'a str,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    tags: &'a [String],
    address: &'a str,
    port: u16,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    meta: BTreeMap<&'a str, &'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    check: Option<CheckDefinition>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    checks: Vec<CheckDefinition>,
}

#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "PascalCase")]
struct CheckDefinition {
    #[serde(rename = "CheckID", skip_serializing_if = "Option::is_none")]
    check_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(rename = "HTTP", skip_serializing_if = "Option::is_none")]
    http: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    interval: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    timeout: Option<String>,
    #[serde(rename = "TTL", skip_serializing_if = "Option::is_none")]
    ttl: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    deregister_critical_service_after: Option<String>,
}

/// One entry of `/v1/health/service/<name>`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct HealthEntry {
    #[serde(default)]
    node: NodeEntry,
    service: ServiceEntry,
    #[serde(default)]
    checks: Vec<CheckEntry>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct NodeEntry {
    #[serde(default)]
    address: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ServiceEntry {
    #[serde(rename = "ID")]
    id: String,
    service: String,
    #[serde(default)]
    tags: Option<Vec<String>>,
    #[serde(default)]
    address: String,
    port: u16,
    #[serde(default)]
    meta: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct CheckEntry {
    status: String,
}

impl HealthEntry {
    fn into_instance(self) -> Instance {
        let status = self
            .checks
            .iter()
            .map(|check| match check.status.as_str() {
                "passing" => HealthStatus::Passing,
                "warning" => HealthStatus::Warning,
                // critical, maintenance, or anything new.
                _ => HealthStatus::Critical,
            })
            .max()
            .unwrap_or(HealthStatus::Passing);
        let service = self.service;
        let address = if service.address.is_empty() {
            self.node.address
        } else {
            service.address
        };
        let mut metadata = service.meta.unwrap_or_default();
        let mut instance = Instance::new(service.service, service.id, address, service.port);
        instance.version = metadata.remove(META_VERSION);
        instance.zone = metadata.remove(META_ZONE);
        instance.metadata = metadata;
        instance.tags = service.tags.unwrap_or_default();
        instance.health = status;
        instance
    }
}

/// A duration as Consul (Go) writes it: `"10s"`, or `"1500ms"` when not whole seconds.
fn go_duration(duration: Duration) -> String {
    if duration.subsec_millis() == 0 {
        format!("{}s", duration.as_secs().max(u64::from(duration.is_zero())))
    } else {
        format!("{}ms", duration.as_millis())
    }
}

fn check_verb(status: HealthStatus) -> &'static str {
    match status {
        HealthStatus::Passing => "pass",
        HealthStatus::Warning => "warn",
        HealthStatus::Critical => "fail",
    }
}

/// An answer from the agent.
struct Answer {
    status: StatusCode,
    index: Option<u64>,
    body: Bytes,
}

impl Answer {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).trim().to_owned()
    }

    /// Fails on anything but `2xx`; `404` as `not_found`.
    fn ok_or(self, not_found: impl FnOnce() -> Error) -> Result<Self> {
        let status = self.status;
        if status.is_success() {
            return Ok(self);
        }
        let source = format!("{status}: {}", self.text()).into();
        Err(match status {
            StatusCode::NOT_FOUND => not_found(),
            StatusCode::FORBIDDEN | StatusCode::UNAUTHORIZED => Error::Refused {
                backend: BACKEND,
                source,
            },
            StatusCode::BAD_REQUEST => {
                Error::invalid(format!("consul rejected the registration: {}", self.text()))
            }
            s if s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS => Error::Unavailable {
                backend: BACKEND,
                source,
            },
            _ => Error::Refused {
                backend: BACKEND,
                source,
            },
        })
    }
}

fn unavailable(source: impl Into<micro_core::error::BoxError>) -> Error {
    Error::Unavailable {
        backend: BACKEND,
        source: source.into(),
    }
}

impl Inner {
    fn local(&self) -> MutexGuard<'_, HashMap<(String, String), Local>> {
        self.local.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn definition<'a>(&self, registration: &'a Registration) -> ServiceDefinition<'a> {
        let instance = &registration.instance;
        let mut meta: BTreeMap<&str, &str> = instance
            .metadata
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        if let Some(version) = &instance.version {
            meta.insert(META_VERSION, version);
        }
        if let Some(zone) = &instance.zone {
            meta.insert(META_ZONE, zone);
        }
        let deregister_after = self.deregister_critical_after.map(go_duration);
        let http = registration
            .http_check
            .as_ref()
            .map(|check| CheckDefinition {
                http: Some(check.http.clone()),
                interval: Some(go_duration(check.interval)),
                timeout: Some(go_duration(check.effective_timeout())),
                deregister_critical_service_after: deregister_after.clone(),
                ..CheckDefinition::default()
            });
        let ttl = registration.ttl.map(|ttl| CheckDefinition {
            ttl: Some(go_duration(ttl)),
            status: Some(instance.health.as_str()),
            deregister_critical_service_after: deregister_after.clone(),
            ..CheckDefinition::default()
        });
        let (check, checks) = match (http, ttl) {
            (Some(mut http), Some(mut ttl)) => {
                // Named, so that `service:<id>` stays the TTL check's id.
                ttl.check_id = Some(format!("service:{}", instance.id));
                ttl.name = Some(format!("Service '{}' TTL", instance.service));
                http.check_id = Some(format!("service:{}:http", instance.id));
                http.name = Some(format!("Service '{}' HTTP", instance.service));
                (None, vec![ttl, http])
            }
            (check, None) | (None, check) => (check, Vec::new()),
        };
        ServiceDefinition {
            id: &instance.id,
            name: &instance.service,
            tags: &instance.tags,
            address: &instance.address,
            port: instance.port,
            meta,
            check,
            checks,
        }
    }

    /// Sends one request; `timeout` bounds the whole exchange.
    async fn send(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<Answer> {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("{}{path_and_query}", self.address));
        if let Some(token) = &self.token {
            request = request.header(TOKEN_HEADER, token.clone());
        }
        if body.is_some() {
            request = request.header(header::CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|error| Error::invalid(format!("cannot build a consul request: {error}")))?;
        let exchange = async {
            let response = self.client.request(request).await.map_err(unavailable)?;
            let status = response.status();
            let index = response
                .headers()
                .get(INDEX_HEADER)
                .and_then(|value| value.to_str().ok())
                .and_then(|value| value.parse().ok());
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(unavailable)?
                .to_bytes();
            Ok(Answer {
                status,
                index,
                body,
            })
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| unavailable("the request timed out"))?
    }

    /// The instances of `service`, and the index to block on for the next change.
    async fn health(&self, service: &str, index: u64) -> Result<(Vec<Instance>, u64)> {
        let mut query = format!("/v1/health/service/{service}?");
        if self.passing_only {
            query.push_str("passing&");
        }
        if let Some(dc) = &self.datacenter {
            query.push_str(&format!("dc={dc}&"));
        }
        let mut timeout = self.request_timeout;
        if index > 0 {
            query.push_str(&format!("index={index}&wait={}&", go_duration(self.wait)));
            // Consul adds up to wait/16 of jitter.
            timeout += self.wait + self.wait / 16;
        }
        query.pop();
        let answer = self
            .send(Method::GET, &query, None, timeout)
            .await?
            .ok_or(|| unavailable("the health endpoint was not found"))?;
        let entries: Vec<HealthEntry> =
            serde_json::from_slice(&answer.body).map_err(|error| Error::Decode {
                backend: BACKEND,
                source: error.into(),
            })?;
        let instances = entries
            .into_iter()
            .map(HealthEntry::into_instance)
            .filter(|instance| instance.health.is_healthy())
            .collect();
        Ok((sorted(instances), answer.index.unwrap_or(0)))
    }

    async fn update_check(&self, service: &str, id: &str, status: HealthStatus) -> Result<()> {
        self.send(
            Method::PUT,
            &format!("/v1/agent/check/{}/service:{id}", check_verb(status)),
            None,
            self.request_timeout,
        )
        .await?
        .ok_or(|| Error::not_registered(service, id))?;
        Ok(())
    }
}

impl Registry for ConsulRegistry {
    fn register<'a>(&'a self, registration: &'a Registration) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            registration.validate()?;
            let inner = &self.inner;
            let body = serde_json::to_vec(&inner.definition(registration)).map_err(|error| {
                Error::Decode {
                    backend: BACKEND,
                    source: error.into(),
                }
            })?;
            let instance = &registration.instance;
            inner
                .send(
                    Method::PUT,
                    "/v1/agent/service/register?replace-existing-checks=true",
                    Some(body),
                    inner.request_timeout,
                )
                .await?
                .ok_or(|| unavailable("the register endpoint was not found"))?;
            inner.local().insert(
                (instance.service.clone(), instance.id.clone()),
                Local {
                    ttl: registration.ttl.is_some(),
                    reported: instance.health,
                },
            );
            Ok(())
        })
    }

    fn deregister<'a>(&'a self, service: &'a str, id: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let inner = &self.inner;
            let answer = inner
                .send(
                    Method::PUT,
                    &format!("/v1/agent/service/deregister/{id}"),
                    None,
                    inner.request_timeout,
                )
                .await?;
            inner.local().remove(&(service.to_owned(), id.to_owned()));
            match answer.ok_or(|| Error::not_registered(service, id)) {
                Ok(_) | Err(Error::NotRegistered { .. }) => Ok(()),
                Err(error) => Err(error),
            }
        })
    }

    fn keep_alive<'a>(&'a self, service: &'a str, id: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let local = self
                .inner
                .local()
                .get(&(service.to_owned(), id.to_owned()))
                .copied();
            match local {
                Some(Local { ttl: false, .. }) => Ok(()),
                Some(Local { reported, .. }) => {
                    self.inner.update_check(service, id, reported).await
                }
                None => {
                    self.inner
                        .update_check(service, id, HealthStatus::Passing)
                        .await
                }
            }
        })
    }

    fn report_health<'a>(
        &'a self,
        service: &'a str,
        id: &'a str,
        status: HealthStatus,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let key = (service.to_owned(), id.to_owned());
            if matches!(self.inner.local().get(&key), Some(Local { ttl: false, .. })) {
                return Err(Error::Unsupported {
                    backend: BACKEND,
                    operation: "reporting health for an instance registered without a ttl",
                });
            }
            self.inner.update_check(service, id, status).await?;
            self.inner
                .local()
                .entry(key)
                .and_modify(|local| local.reported = status)
                .or_insert(Local {
                    ttl: true,
                    reported: status,
                });
            Ok(())
        })
    }
}

impl Discover for ConsulRegistry {
    fn instances<'a>(&'a self, service: &'a str) -> BoxFuture<'a, Result<Vec<Instance>>> {
        Box::pin(async move { Ok(self.inner.health(service, 0).await?.0) })
    }

    fn watch(&self, service: &str) -> Watch {
        let state = WatchState {
            inner: Arc::downgrade(&self.inner),
            service: service.to_owned(),
            index: 0,
            last: None,
            backoff: None,
        };
        futures_util::stream::unfold(state, |mut state| async move {
            let item = state.next().await?;
            Some((item, state))
        })
        .boxed()
    }
}

struct WatchState {
    // Weak, so that the stream ends once the registry is gone.
    inner: Weak<Inner>,
    service: String,
    /// The index to block on; 0 reads without blocking.
    index: u64,
    /// The set last yielded; `None` after a failure, so that the next read is yielded.
    last: Option<Vec<Instance>>,
    backoff: Option<Duration>,
}

impl WatchState {
    async fn next(&mut self) -> Option<Result<Vec<Instance>>> {
        loop {
            if let Some(backoff) = self.backoff {
                tokio::time::sleep(backoff).await;
            }
            let inner = self.inner.upgrade()?;
            let started = tokio::time::Instant::now();
            match inner.health(&self.service, self.index).await {
                Ok((set, index)) => {
                    self.backoff = None;
                    if self.index > 0 && index == self.index && started.elapsed() < inner.wait / 2 {
                        // Nothing changed, yet the query did not block: an agent that
                        // ignores the index. Do not spin.
                        tokio::time::sleep(FIRST_BACKOFF).await;
                    }
                    // Consul's rules: an index that goes backwards starts over, and one
                    // below 1 must not be blocked on.
                    self.index = if index < self.index { 0 } else { index.max(1) };
                    if self.last.as_ref() != Some(&set) {
                        self.last = Some(set.clone());
                        return Some(Ok(set));
                    }
                }
                Err(error) => {
                    self.index = 0;
                    self.last = None;
                    self.backoff = Some(match self.backoff {
                        None => FIRST_BACKOFF,
                        Some(backoff) => (backoff * 2).min(inner.max_retry_backoff),
                    });
                    return Some(Err(error));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::HttpCheck;

    fn registry() -> ConsulRegistry {
        ConsulRegistry::new(ConsulConfig::new("http://127.0.0.1:8500")).unwrap()
    }

    #[test]
    fn durations_are_written_as_go_does() {
        assert_eq!(go_duration(Duration::from_secs(10)), "10s");
        assert_eq!(go_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(go_duration(Duration::from_millis(250)), "250ms");
    }

    #[test]
    fn a_ttl_and_an_http_check_go_in_checks_with_stable_ids() {
        let registration = Registration::new(Instance::new("svc", "svc-1", "10.0.0.1", 80))
            .ttl(Duration::from_secs(15))
            .http_check(HttpCheck::new(
                "http://10.0.0.1/health",
                Duration::from_secs(5),
            ));
        let body = registry().registration_body(&registration);
        assert!(body.get("Check").is_none());
        assert_eq!(body["Checks"][0]["CheckID"], "service:svc-1");
        assert_eq!(body["Checks"][0]["TTL"], "15s");
        assert_eq!(body["Checks"][0]["Status"], "passing");
        assert_eq!(body["Checks"][1]["HTTP"], "http://10.0.0.1/health");
        assert_eq!(body["Checks"][1]["Timeout"], "5s");
        assert_eq!(body["Checks"][1]["DeregisterCriticalServiceAfter"], "60s");
    }

    #[test]
    fn health_entries_become_instances() {
        let entry: HealthEntry = serde_json::from_str(
            r#"{"Node": {"Node": "n1", "Address": "10.1.1.1"},
                "Service": {"ID": "a-1", "Service": "a", "Tags": null, "Address": "", "Port": 80,
                            "Meta": {"version": "2", "zone": "z", "build": "7"}},
                "Checks": [{"Status": "passing"}, {"Status": "warning"}]}"#,
        )
        .unwrap();
        let instance = entry.into_instance();
        assert_eq!(instance.address, "10.1.1.1");
        assert_eq!(instance.version.as_deref(), Some("2"));
        assert_eq!(instance.zone.as_deref(), Some("z"));
        assert_eq!(instance.metadata.len(), 1);
        assert_eq!(instance.health, HealthStatus::Warning);
    }

    #[test]
    fn bad_configuration_is_refused() {
        assert!(ConsulRegistry::new(ConsulConfig::new("ftp://consul:8501")).is_err());
        assert!(ConsulRegistry::new(
            ConsulConfig::new("http://consul:8500").tls(ClientTlsConfig::new().ca("ca.pem"))
        )
        .is_err());
        assert!(ConsulRegistry::new(ConsulConfig::new("consul:8500")).is_err());
        assert!(ConsulRegistry::new(ConsulConfig::default().datacenter("dc 1")).is_err());
        assert!(ConsulRegistry::new(ConsulConfig::default().token("bad\ntoken")).is_err());
        assert!(
            ConsulRegistry::new(ConsulConfig::default().wait(Duration::from_secs(3600))).is_err()
        );
    }
}
