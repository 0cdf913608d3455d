//! The etcd v3 backend: instances as keys under a prefix, TTLs as leases, changes by watch.
//!
//! [`EtcdRegistry`] is both a [`Registry`] and a [`Discover`].
//!
//! - **Keys**: an instance lives at `<prefix><service>/<id>` (prefix `/micro/services/`
//!   by default), its value a small JSON record: the [`Instance`] with the health it
//!   reported, and the outcome of its HTTP check. Service names cannot contain `/`, so one
//!   service's prefix never covers another's.
//! - **TTL**: a registration with a TTL is attached to a lease granted for it, rounded up
//!   to whole seconds (etcd's unit; etcd also raises very short leases to its minimum,
//!   about two seconds with default settings). [`keep_alive`](Registry::keep_alive)
//!   renews the lease once; when renewals stop, etcd revokes the lease and deletes the
//!   key, and every watcher sees the instance leave.
//!   [`deregister`](Registry::deregister) deletes the key and revokes its lease.
//! - **Health**: [`report_health`](Registry::report_health) rewrites the stored status
//!   (keeping the lease). An [`HttpCheck`](crate::HttpCheck) runs in the registering
//!   process, as etcd has no checker of its own, and stores its outcome beside it; the
//!   worse of the two decides.
//! - **Watch**: [`watch`](Discover::watch) reads the prefix, then watches it from the
//!   next revision and applies each event. When the connection fails the stream yields an
//!   `Err` item, waits (backing off up to [`EtcdConfig::max_retry_backoff`]) and starts
//!   again with a fresh read, so nothing that changed meanwhile is missed.
//!
//! ```no_run
//! use micro_discovery::etcd::{EtcdConfig, EtcdRegistry};
//! use micro_discovery::{Discover, Instance, Registration, Registry};
//! use std::time::Duration;
//!
//! # async fn run() -> Result<(), micro_discovery::Error> {
//! let registry = EtcdRegistry::connect(
//!     &EtcdConfig::new(["http://127.0.0.1:2379"]).prefix("/shop/services/"),
//! )
//! .await?;
//! let instance = Instance::new("cart-service", "cart-1", "10.0.0.4", 8004);
//! registry.register(&Registration::new(instance).ttl(Duration::from_secs(10))).await?;
//! let carts = registry.instances("cart-service").await?;
//! # Ok(())
//! # }
//! ```

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, KeyValue, PutOptions, Txn,
    TxnOp, WatchOptions,
};
use futures_util::StreamExt;
use micro_core::service::BoxFuture;
use micro_core::tls::ClientTlsConfig;
use serde::{Deserialize, Serialize};

/// The etcd client crate this backend uses, for [`EtcdRegistry::with_client`].
pub use etcd_client;

use crate::checker::{self, Checker};
use crate::discover::{Discover, Watch};
use crate::error::{Error, Result};
use crate::instance::{sorted, HealthStatus, Instance};
use crate::registry::{Registration, Registry};

const BACKEND: &str = "etcd";
/// How often a read-modify-write of a record is tried when others write it meanwhile.
const UPDATE_ATTEMPTS: usize = 10;

/// How to reach etcd. Deserializes from configuration, durations as `"5s"`:
///
/// ```
/// # use micro_discovery::etcd::EtcdConfig;
/// let config: EtcdConfig = serde_json::from_str(
///     r#"{"endpoints": ["http://10.0.0.2:2379"], "request_timeout": "2s"}"#,
/// ).unwrap();
/// assert_eq!(config.prefix, "/micro/services/");
/// ```
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct EtcdConfig {
    /// The cluster's client URLs. Default `["http://127.0.0.1:2379"]`.
    pub endpoints: Vec<String>,
    /// The key prefix instances live under; a `/` is added when missing. Default
    /// `/micro/services/`.
    pub prefix: String,
    /// How long connecting may take. Default 5 s.
    #[serde(with = "micro_core::config::duration")]
    pub connect_timeout: Duration,
    /// How long one request (a read, a write, a lease renewal) may take. Default 5 s.
    #[serde(with = "micro_core::config::duration")]
    pub request_timeout: Duration,
    /// The longest wait between attempts of a watch whose connection failed. Default 5 s.
    #[serde(with = "micro_core::config::duration")]
    pub max_retry_backoff: Duration,
    /// A user name, when etcd has authentication on.
    pub user: Option<String>,
    /// The user's password.
    pub password: Option<String>,
    /// TLS for `https://` endpoints: `ca`, the PEM bundle the servers' certificates are
    /// verified against (required: etcd clusters run on a CA of their own), and `cert` and
    /// `key` for a cluster started with `--client-cert-auth`. `danger_accept_invalid_certs`
    /// is not supported here and is refused.
    pub tls: Option<ClientTlsConfig>,
}

impl Default for EtcdConfig {
    fn default() -> Self {
        Self {
            endpoints: vec!["http://127.0.0.1:2379".to_owned()],
            prefix: "/micro/services/".to_owned(),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
            max_retry_backoff: Duration::from_secs(5),
            user: None,
            password: None,
            tls: None,
        }
    }
}

impl fmt::Debug for EtcdConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdConfig")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("max_retry_backoff", &self.max_retry_backoff)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("tls", &self.tls)
            .finish()
    }
}

impl EtcdConfig {
    /// The defaults, with these endpoints.
    pub fn new<I, S>(endpoints: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            ..Self::default()
        }
    }

    /// Sets [`prefix`](Self::prefix).
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Sets [`request_timeout`](Self::request_timeout).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Sets [`connect_timeout`](Self::connect_timeout).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets [`max_retry_backoff`](Self::max_retry_backoff).
    pub fn max_retry_backoff(mut self, backoff: Duration) -> Self {
        self.max_retry_backoff = backoff;
        self
    }

    /// Sets [`tls`](Self::tls), for `https` endpoints.
    pub fn tls(mut self, tls: ClientTlsConfig) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Sets the user name and password.
    pub fn credentials(mut self, user: impl Into<String>, password: impl Into<String>) -> Self {
        self.user = Some(user.into());
        self.password = Some(password.into());
        self
    }
}

/// A [`Registry`] and [`Discover`] on etcd v3; see the [module docs](self).
///
/// Clones share one connection and the HTTP checks they started.
#[derive(Clone)]
pub struct EtcdRegistry {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    prefix: String,
    request_timeout: Duration,
    max_retry_backoff: Duration,
    checkers: Mutex<HashMap<(String, String), Checker>>,
}

/// What is stored at an instance's key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Record {
    /// The instance, its `health` the status it reported.
    instance: Instance,
    /// The outcome of its HTTP check, passing when it has none.
    #[serde(default)]
    checked: HealthStatus,
}

impl Record {
    fn status(&self) -> HealthStatus {
        self.instance.health.max(self.checked)
    }

    fn discovered(&self) -> Option<Instance> {
        let status = self.status();
        status
            .is_healthy()
            .then(|| self.instance.clone().with_health(status))
    }
}

impl EtcdRegistry {
    /// Connects to the endpoints in `config`.
    ///
    /// Without credentials the connection is made lazily: an etcd that is down does not
    /// fail this call, and calls fail with [`Error::Unavailable`] until it is up. With
    /// credentials, the token is fetched here, so etcd must answer.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidRegistration`] for an empty endpoint list or prefix, `https`
    /// endpoints without [`tls`](EtcdConfig::tls) (or `tls` with `http` ones), TLS files
    /// that can't be used, and [`Error::Unavailable`] when the client cannot be set up.
    pub async fn connect(config: &EtcdConfig) -> Result<Self> {
        if config.endpoints.is_empty() {
            return Err(Error::invalid("no etcd endpoint configured"));
        }
        let mut options = ConnectOptions::new()
            .with_connect_timeout(config.connect_timeout)
            .with_keep_alive(Duration::from_secs(10), config.request_timeout);
        if let (Some(user), Some(password)) = (&config.user, &config.password) {
            options = options.with_user(user.clone(), password.clone());
        }
        let https = config
            .endpoints
            .iter()
            .any(|endpoint| endpoint.starts_with("https://"));
        match (&config.tls, https) {
            (Some(tls), true) => options = options.with_tls(tls_options(tls)?),
            (None, true) => {
                return Err(Error::invalid(
                    "https etcd endpoints need `tls` with the cluster's `ca`",
                ))
            }
            (Some(_), false) => {
                return Err(Error::invalid(
                    "the etcd `tls` settings need https endpoints",
                ))
            }
            (None, false) => {}
        }
        let client = tokio::time::timeout(
            config.connect_timeout,
            Client::connect(&config.endpoints, Some(options)),
        )
        .await
        .map_err(|_| unavailable("connecting timed out"))?
        .map_err(from_etcd)?;
        let mut registry = Self::with_client(client, &config.prefix)?;
        let inner = Arc::get_mut(&mut registry.inner).expect("not shared yet");
        inner.request_timeout = config.request_timeout;
        inner.max_retry_backoff = config.max_retry_backoff;
        Ok(registry)
    }

    /// Uses a client you set up (TLS, a custom channel), with instances under `prefix`
    /// and the default timeouts.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidRegistration`] for an empty prefix.
    pub fn with_client(client: Client, prefix: &str) -> Result<Self> {
        if prefix.is_empty() {
            return Err(Error::invalid("the etcd key prefix is empty"));
        }
        let mut prefix = prefix.to_owned();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        let defaults = EtcdConfig::default();
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                prefix,
                request_timeout: defaults.request_timeout,
                max_retry_backoff: defaults.max_retry_backoff,
                checkers: Mutex::default(),
            }),
        })
    }

    /// The key prefix instances live under.
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// Every registered instance of `service`, critical ones included, with its current
    /// health: what an operator's dashboard shows.
    ///
    /// # Errors
    ///
    /// [`Error::Unavailable`] when etcd cannot be read.
    pub async fn all_instances(&self, service: &str) -> Result<Vec<Instance>> {
        let (records, _) = self.inner.read(service).await?;
        Ok(sorted(
            records
                .into_values()
                .map(|record| record.instance.clone().with_health(record.status()))
                .collect(),
        ))
    }
}

impl fmt::Debug for EtcdRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdRegistry")
            .field("prefix", &self.inner.prefix)
            .field("request_timeout", &self.inner.request_timeout)
            .finish_non_exhaustive()
    }
}

impl Inner {
    fn service_prefix(&self, service: &str) -> String {
        format!("{}{service}/", self.prefix)
    }

    fn key(&self, service: &str, id: &str) -> String {
        format!("{}{service}/{id}", self.prefix)
    }

    fn checkers(&self) -> MutexGuard<'_, HashMap<(String, String), Checker>> {
        self.checkers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs one etcd call with the request timeout.
    async fn call<T, F>(&self, call: F) -> Result<T>
    where
        F: Future<Output = Result<T, etcd_client::Error>>,
    {
        tokio::time::timeout(self.request_timeout, call)
            .await
            .map_err(|_| unavailable("the request timed out"))?
            .map_err(from_etcd)
    }

    /// The records under a service's prefix by key, and the revision they were read at.
    async fn read(&self, service: &str) -> Result<(BTreeMap<String, Record>, i64)> {
        let mut client = self.client.clone();
        let response = self
            .call(client.get(
                self.service_prefix(service),
                Some(GetOptions::new().with_prefix()),
            ))
            .await?;
        let revision = response.header().map_or(0, |header| header.revision());
        let records = response
            .kvs()
            .iter()
            .filter_map(|kv| Some((String::from_utf8_lossy(kv.key()).into_owned(), decode(kv)?)))
            .collect();
        Ok((records, revision))
    }

    async fn get(&self, service: &str, id: &str) -> Result<Option<KeyValue>> {
        let mut client = self.client.clone();
        let mut response = self.call(client.get(self.key(service, id), None)).await?;
        Ok(response.take_kvs().into_iter().next())
    }

    /// Rewrites an instance's record with `change`, keeping its lease, unless someone
    /// wrote it meanwhile (then it reads again).
    async fn update(&self, service: &str, id: &str, change: impl Fn(&mut Record)) -> Result<()> {
        let key = self.key(service, id);
        for _ in 0..UPDATE_ATTEMPTS {
            let kv = self
                .get(service, id)
                .await?
                .ok_or_else(|| Error::not_registered(service, id))?;
            let mut record = decode(&kv).ok_or_else(|| Error::Decode {
                backend: BACKEND,
                source: format!("the value at `{key}` is not an instance record").into(),
            })?;
            let before = record.clone();
            change(&mut record);
            if record == before {
                return Ok(());
            }
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    key.clone(),
                    CompareOp::Equal,
                    kv.mod_revision(),
                )])
                .and_then([TxnOp::put(
                    key.clone(),
                    encode(&record)?,
                    Some(PutOptions::new().with_ignore_lease()),
                )]);
            let mut client = self.client.clone();
            if self.call(client.txn(txn)).await?.succeeded() {
                return Ok(());
            }
        }
        Err(unavailable("the record kept changing while being updated"))
    }

    /// Revokes a lease, which also deletes its keys; a lease already gone is fine.
    async fn revoke(&self, lease: i64) -> Result<()> {
        let mut client = self.client.clone();
        match self.call(client.lease_revoke(lease)).await {
            Ok(_) => Ok(()),
            Err(Error::Refused { source, .. }) if source.to_string().contains("not found") => {
                Ok(())
            }
            Err(error) => Err(error),
        }
    }
}

fn decode(kv: &KeyValue) -> Option<Record> {
    match serde_json::from_slice(kv.value()) {
        Ok(record) => Some(record),
        Err(error) => {
            tracing::warn!(key = %String::from_utf8_lossy(kv.key()), %error, "ignoring a value that is not an instance record");
            None
        }
    }
}

fn encode(record: &Record) -> Result<Vec<u8>> {
    serde_json::to_vec(record).map_err(|error| Error::Decode {
        backend: BACKEND,
        source: error.into(),
    })
}

/// tonic's TLS options from ours, reading the files here so that a bad one is reported
/// with its setting.
fn tls_options(tls: &ClientTlsConfig) -> Result<etcd_client::TlsOptions> {
    use etcd_client::{Certificate, Identity, TlsOptions};
    if tls.danger_accept_invalid_certs {
        return Err(Error::invalid(
            "the etcd `tls.danger_accept_invalid_certs` is not supported",
        ));
    }
    // Checks every file as the other clients do (readable, PEM, the key matches).
    tls.rustls_config()
        .map_err(|e| Error::invalid(format!("the etcd {e}")))?;
    let read = |path: &std::path::Path| {
        std::fs::read(path)
            .map_err(|e| Error::invalid(format!("the etcd tls file {}: {e}", path.display())))
    };
    let ca = tls
        .ca
        .as_deref()
        .ok_or_else(|| Error::invalid("the etcd `tls` settings need `ca`"))?;
    let mut options = TlsOptions::new().ca_certificate(Certificate::from_pem(read(ca)?));
    if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
        options = options.identity(Identity::from_pem(read(cert)?, read(key)?));
    }
    Ok(options)
}

fn unavailable(reason: &'static str) -> Error {
    Error::Unavailable {
        backend: BACKEND,
        source: reason.into(),
    }
}

fn from_etcd(error: etcd_client::Error) -> Error {
    use etcd_client::Error as E;
    // gRPC codes: invalid argument, not found, permission denied, failed precondition,
    // unauthenticated.
    const REFUSED: [i32; 5] = [3, 5, 7, 9, 16];
    let refused = match &error {
        E::GRpcStatus(status) => REFUSED.contains(&i32::from(status.code())),
        E::InvalidArgs(_) | E::InvalidUri(_) | E::InvalidMetadataValue(_) => true,
        _ => false,
    };
    if refused {
        Error::Refused {
            backend: BACKEND,
            source: error.into(),
        }
    } else {
        Error::Unavailable {
            backend: BACKEND,
            source: error.into(),
        }
    }
}

/// Whole seconds, rounded up, at least one.
fn lease_seconds(ttl: Duration) -> i64 {
    let seconds = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    i64::try_from(seconds.max(1)).unwrap_or(i64::MAX)
}

impl Registry for EtcdRegistry {
    fn register<'a>(&'a self, registration: &'a Registration) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            registration.validate()?;
            let inner = &self.inner;
            let instance = &registration.instance;
            let mut client = inner.client.clone();
            let lease = match registration.ttl {
                Some(ttl) => inner
                    .call(client.lease_grant(lease_seconds(ttl), None))
                    .await?
                    .id(),
                None => 0,
            };
            let record = Record {
                instance: instance.clone(),
                checked: HealthStatus::Passing,
            };
            let put = inner
                .call(client.put(
                    inner.key(&instance.service, &instance.id),
                    encode(&record)?,
                    Some(PutOptions::new().with_lease(lease).with_prev_key()),
                ))
                .await;
            let previous = match put {
                Ok(response) => response.prev_key().map(KeyValue::lease).unwrap_or(0),
                Err(error) => {
                    if lease != 0 {
                        let _ = inner.revoke(lease).await;
                    }
                    return Err(error);
                }
            };
            if previous != 0 && previous != lease {
                // The key moved to the new lease: the old one holds nothing now.
                if let Err(error) = inner.revoke(previous).await {
                    tracing::debug!(%error, lease = previous, "revoking a replaced lease failed");
                }
            }
            let checker = registration.http_check.as_ref().map(|check| {
                let weak = Arc::downgrade(inner);
                let (service, id) = (instance.service.clone(), instance.id.clone());
                let written = Arc::new(Mutex::new(None));
                checker::spawn(check, move |status| {
                    store_check(
                        weak.clone(),
                        service.clone(),
                        id.clone(),
                        status,
                        written.clone(),
                    )
                })
            });
            let key = (instance.service.clone(), instance.id.clone());
            let mut checkers = inner.checkers();
            match checker {
                Some(checker) => {
                    checkers.insert(key, checker);
                }
                None => {
                    checkers.remove(&key);
                }
            }
            Ok(())
        })
    }

    fn deregister<'a>(&'a self, service: &'a str, id: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let inner = &self.inner;
            inner
                .checkers()
                .remove(&(service.to_owned(), id.to_owned()));
            let mut client = inner.client.clone();
            let deleted = inner
                .call(client.delete(
                    inner.key(service, id),
                    Some(etcd_client::DeleteOptions::new().with_prev_key()),
                ))
                .await?;
            for kv in deleted.prev_kvs() {
                if kv.lease() != 0 {
                    inner.revoke(kv.lease()).await?;
                }
            }
            Ok(())
        })
    }

    fn keep_alive<'a>(&'a self, service: &'a str, id: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let inner = &self.inner;
            let kv = inner
                .get(service, id)
                .await?
                .ok_or_else(|| Error::not_registered(service, id))?;
            if kv.lease() == 0 {
                return Ok(());
            }
            let mut client = inner.client.clone();
            match tokio::time::timeout(inner.request_timeout, client.lease_keep_alive(kv.lease()))
                .await
            {
                Err(_) => Err(unavailable("the lease renewal timed out")),
                Ok(Ok(_)) => Ok(()),
                // The lease lapsed between the read and the renewal: its key is gone.
                Ok(Err(etcd_client::Error::LeaseKeepAliveError(_))) => {
                    Err(Error::not_registered(service, id))
                }
                Ok(Err(error)) => Err(from_etcd(error)),
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
            self.inner
                .update(service, id, |record| record.instance.health = status)
                .await
        })
    }
}

/// Stores an HTTP check's outcome when it changed; answers whether to go on checking.
async fn store_check(
    inner: Weak<Inner>,
    service: String,
    id: String,
    status: HealthStatus,
    written: Arc<Mutex<Option<HealthStatus>>>,
) -> bool {
    let Some(inner) = inner.upgrade() else {
        return false;
    };
    let last = *written.lock().unwrap_or_else(PoisonError::into_inner);
    if last == Some(status) {
        return true;
    }
    match inner
        .update(&service, &id, |record| record.checked = status)
        .await
    {
        Ok(()) => {
            *written.lock().unwrap_or_else(PoisonError::into_inner) = Some(status);
            true
        }
        Err(Error::NotRegistered { .. }) => false,
        Err(error) => {
            tracing::debug!(%service, %id, %error, "storing a health check outcome failed");
            true
        }
    }
}

impl Discover for EtcdRegistry {
    fn instances<'a>(&'a self, service: &'a str) -> BoxFuture<'a, Result<Vec<Instance>>> {
        Box::pin(async move {
            let (records, _) = self.inner.read(service).await?;
            Ok(healthy(&records))
        })
    }

    fn watch(&self, service: &str) -> Watch {
        let state = WatchState {
            inner: Arc::downgrade(&self.inner),
            service: service.to_owned(),
            stream: None,
            records: BTreeMap::new(),
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

fn healthy(records: &BTreeMap<String, Record>) -> Vec<Instance> {
    sorted(records.values().filter_map(Record::discovered).collect())
}

/// The state behind a watch stream.
struct WatchState {
    // Weak, so that the stream ends once the registry is gone and it must reconnect.
    inner: Weak<Inner>,
    service: String,
    stream: Option<etcd_client::WatchStream>,
    records: BTreeMap<String, Record>,
    last: Option<Vec<Instance>>,
    /// Set after a failure: how long to wait before the next attempt.
    backoff: Option<Duration>,
}

const FIRST_BACKOFF: Duration = Duration::from_millis(100);

impl WatchState {
    async fn next(&mut self) -> Option<Result<Vec<Instance>>> {
        loop {
            let Some(stream) = self.stream.as_mut() else {
                if let Some(backoff) = self.backoff {
                    tokio::time::sleep(backoff).await;
                }
                let inner = self.inner.upgrade()?;
                match self.start(&inner).await {
                    Ok(()) => {
                        self.backoff = None;
                        let set = healthy(&self.records);
                        self.last = Some(set.clone());
                        return Some(Ok(set));
                    }
                    Err(error) => {
                        self.fail(&inner);
                        return Some(Err(error));
                    }
                }
            };
            match stream.message().await {
                Ok(Some(response)) => {
                    if response.canceled() {
                        // Compacted past our revision, or cancelled by the server: read
                        // afresh.
                        tracing::debug!(service = %self.service, reason = response.cancel_reason(), "etcd watch cancelled");
                        self.stream = None;
                        continue;
                    }
                    for event in response.events() {
                        let Some(kv) = event.kv() else { continue };
                        let key = String::from_utf8_lossy(kv.key()).into_owned();
                        match event.event_type() {
                            EventType::Put => match decode(kv) {
                                Some(record) => self.records.insert(key, record),
                                None => self.records.remove(&key),
                            },
                            EventType::Delete => self.records.remove(&key),
                        };
                    }
                    let set = healthy(&self.records);
                    if self.last.as_ref() != Some(&set) {
                        self.last = Some(set.clone());
                        return Some(Ok(set));
                    }
                }
                Ok(None) => {
                    let inner = self.inner.upgrade()?;
                    self.fail(&inner);
                    return Some(Err(unavailable("the watch stream ended")));
                }
                Err(error) => {
                    let inner = self.inner.upgrade()?;
                    self.fail(&inner);
                    return Some(Err(from_etcd(error)));
                }
            }
        }
    }

    /// Reads the service's records and watches for changes after them.
    async fn start(&mut self, inner: &Inner) -> Result<()> {
        let (records, revision) = inner.read(&self.service).await?;
        let mut client = inner.client.clone();
        let mut stream = inner
            .call(
                client.watch(
                    inner.service_prefix(&self.service),
                    Some(
                        WatchOptions::new()
                            .with_prefix()
                            .with_start_revision(revision + 1),
                    ),
                ),
            )
            .await?;
        // The first answer confirms the watch exists.
        match tokio::time::timeout(inner.request_timeout, stream.message()).await {
            Err(_) => return Err(unavailable("creating the watch timed out")),
            Ok(Err(error)) => return Err(from_etcd(error)),
            Ok(Ok(None)) => return Err(unavailable("the watch stream ended")),
            Ok(Ok(Some(response))) if response.canceled() => {
                return Err(Error::Refused {
                    backend: BACKEND,
                    source: format!("the watch was cancelled: {}", response.cancel_reason()).into(),
                })
            }
            Ok(Ok(Some(_))) => {}
        }
        self.records = records;
        self.stream = Some(stream);
        Ok(())
    }

    fn fail(&mut self, inner: &Inner) {
        self.stream = None;
        self.backoff = Some(match self.backoff {
            None => FIRST_BACKOFF,
            Some(backoff) => (backoff * 2).min(inner.max_retry_backoff),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_are_whole_seconds_rounded_up() {
        assert_eq!(lease_seconds(Duration::from_millis(1)), 1);
        assert_eq!(lease_seconds(Duration::from_secs(2)), 2);
        assert_eq!(lease_seconds(Duration::from_millis(2001)), 3);
    }

    #[test]
    fn records_combine_reported_and_checked_health() {
        let mut record = Record {
            instance: Instance::new("s", "a", "h", 1).with_health(HealthStatus::Warning),
            checked: HealthStatus::Passing,
        };
        assert_eq!(record.discovered().unwrap().health, HealthStatus::Warning);
        record.checked = HealthStatus::Critical;
        assert!(record.discovered().is_none());
        let json = serde_json::to_value(&record).unwrap();
        assert_eq!(json["instance"]["id"], "a");
        assert_eq!(json["checked"], "critical");
    }
}
