//! A double of the Consul agent's HTTP endpoints the consul backend uses, because no
//! Consul agent can be installed where the tests run.
//!
//! It follows Consul's documented behaviour for those endpoints:
//!
//! - `PUT /v1/agent/service/register`: a service definition (keys in any case, as Consul
//!   accepts) with `Check` or `Checks`; TTL checks and HTTP checks (`HTTP`, `Interval`,
//!   `Timeout`), which the double runs itself; check ids `service:<id>` (one check) or
//!   `service:<id>:<n>` unless `CheckID` is given; checks start `critical` unless
//!   `Status` says otherwise; `DeregisterCriticalServiceAfter` removes a service whose TTL
//!   lapsed (HTTP checks do not deregister in the double); `400`
//!   for a definition without a name or a check without TTL or HTTP.
//! - `PUT /v1/agent/service/deregister/<id>`: `404` for an unknown id.
//! - `PUT /v1/agent/check/pass|warn|fail/<check id>`: renews a TTL check; `404` for an
//!   unknown check, `400` for one without a TTL. A TTL not renewed in time turns
//!   `critical`.
//! - `GET /v1/health/service/<name>`: entries of `Node`, `Service` and `Checks` (with the
//!   node's `serfHealth`); `passing` keeps entries whose checks all pass; `dc` other than
//!   the double's answers `500`; `X-Consul-Index` on every answer; with `index`, the
//!   query blocks until the index moves past it or `wait` (default 5 minutes) elapses.
//! - `X-Consul-Token`: when the double has a token, a request without it gets `403`.
//!
//! Its index is one counter for all changes (Consul's is per service), which a client
//! must tolerate anyway: a blocking query may return with nothing changed.

#![cfg(feature = "consul")]

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use axum::extract::{Path, Query, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::support::Server;

pub(crate) const DATACENTER: &str = "dc1";

/// A running double; [`kill`](Self::kill) and [`restart`](Self::restart) take its
/// listener down and up again on the same port, keeping its state.
pub(crate) struct ConsulDouble {
    shared: Arc<Shared>,
    addr: SocketAddr,
    server: Option<Server>,
    /// The micro-core host serving the double over TLS, for Consul's HTTPS API.
    tls_host: Option<micro_core::host::RunningHost>,
}

/// The double as a micro-core service, to serve it on a TLS listener.
struct Agent(Router);

impl micro_core::service::Service for Agent {
    fn name(&self) -> &str {
        "consul"
    }

    fn router(&self) -> Router {
        self.0.clone()
    }
}

struct Shared {
    state: Mutex<AgentState>,
    index: watch::Sender<u64>,
    token: Option<String>,
}

#[derive(Default)]
struct AgentState {
    services: BTreeMap<String, Service>,
    /// Every registration body received, as sent.
    registrations: Vec<Value>,
    /// The query string of every health query.
    health_queries: Vec<String>,
    /// Health queries blocked right now.
    blocked: usize,
    generation: u64,
}

struct Service {
    id: String,
    name: String,
    tags: Vec<String>,
    address: String,
    port: u16,
    meta: BTreeMap<String, String>,
    checks: BTreeMap<String, Check>,
}

struct Check {
    name: String,
    status: &'static str,
    ttl: Option<Duration>,
    deregister_after: Option<Duration>,
    generation: u64,
}

impl ConsulDouble {
    /// A double on 127.0.0.1:0, requiring `token` when given.
    pub(crate) async fn start(token: Option<&str>) -> Self {
        let shared = Arc::new(Shared {
            state: Mutex::default(),
            index: watch::channel(1).0,
            token: token.map(str::to_owned),
        });
        let server = Server::start(router(shared.clone())).await;
        Self {
            shared,
            addr: server.addr,
            server: Some(server),
            tls_host: None,
        }
    }

    /// A double on 127.0.0.1:0 that speaks only HTTPS, with `tls`, served by a real
    /// micro-core TLS listener. It can't be killed and restarted.
    pub(crate) async fn start_tls(tls: micro_core::tls::TlsConfig) -> Self {
        let shared = Arc::new(Shared {
            state: Mutex::default(),
            index: watch::channel(1).0,
            token: None,
        });
        let host = micro_core::host::ServiceHost::builder()
            .service_with(
                Agent(router(shared.clone())),
                "127.0.0.1:0".parse().unwrap(),
                micro_core::listener::ListenerConfig::default().tls(tls),
            )
            .build()
            .unwrap()
            .start()
            .await
            .unwrap();
        Self {
            shared,
            addr: host.local_addr("consul").unwrap(),
            server: None,
            tls_host: Some(host),
        }
    }

    /// `http://127.0.0.1:port`, or `https://` for a double started with
    /// [`start_tls`](Self::start_tls).
    pub(crate) fn address(&self) -> String {
        let scheme = if self.tls_host.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.addr)
    }

    /// Stops answering: the listener and every connection close.
    pub(crate) async fn kill(&mut self) {
        if let Some(server) = self.server.take() {
            server.kill().await;
        }
    }

    /// Answers again on the same port, with the state it had.
    pub(crate) async fn restart(&mut self) {
        let listener = tokio::net::TcpListener::bind(self.addr).await.unwrap();
        self.server = Some(Server::start_on(listener, router(self.shared.clone())));
    }

    /// The registration bodies received so far.
    pub(crate) fn registrations(&self) -> Vec<Value> {
        self.shared.lock().registrations.clone()
    }

    /// The query strings of the health queries received so far.
    pub(crate) fn health_queries(&self) -> Vec<String> {
        self.shared.lock().health_queries.clone()
    }

    /// How many health queries are blocked now.
    pub(crate) fn blocked(&self) -> usize {
        self.shared.lock().blocked
    }

    /// The current index.
    pub(crate) fn index(&self) -> u64 {
        *self.shared.index.borrow()
    }

    /// The status of a check, if it exists.
    pub(crate) fn check_status(&self, check_id: &str) -> Option<&'static str> {
        let state = self.shared.lock();
        state
            .services
            .values()
            .find_map(|service| service.checks.get(check_id))
            .map(|check| check.status)
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, AgentState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn changed(&self) {
        self.index.send_modify(|index| *index += 1);
    }

    /// Whether the request carries the token, when the double has one.
    fn authorized(&self, headers: &HeaderMap) -> bool {
        self.token.as_deref().is_none_or(|token| {
            headers
                .get("x-consul-token")
                .and_then(|value| value.to_str().ok())
                == Some(token)
        })
    }
}

/// Counts a blocked query for as long as it lives, even when its client goes away.
struct Blocked<'a>(&'a Shared);

impl<'a> Blocked<'a> {
    fn new(shared: &'a Shared) -> Self {
        shared.lock().blocked += 1;
        Self(shared)
    }
}

impl Drop for Blocked<'_> {
    fn drop(&mut self) {
        self.0.lock().blocked -= 1;
    }
}

fn forbidden() -> Response {
    (StatusCode::FORBIDDEN, "Permission denied: token not found").into_response()
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/agent/service/register", put(register))
        .route("/v1/agent/service/deregister/{id}", put(deregister))
        .route("/v1/agent/check/{verb}/{check_id}", put(update_check))
        .route("/v1/health/service/{name}", get(health))
        .with_state(shared)
}

/// A key of a JSON object, in any case.
fn field<'a>(object: &'a Value, name: &str) -> Option<&'a Value> {
    object
        .as_object()?
        .iter()
        .find(|(key, _)| key.eq_ignore_ascii_case(name))
        .map(|(_, value)| value)
}

fn duration_field(object: &Value, name: &str) -> Result<Option<Duration>, String> {
    field(object, name)
        .and_then(Value::as_str)
        .map(|text| micro_core::config::duration::parse(text).map_err(|e| format!("{name}: {e}")))
        .transpose()
}

fn bad_request(message: impl Into<String>) -> Response {
    (StatusCode::BAD_REQUEST, message.into()).into_response()
}

struct HttpCheckSpec {
    check_id: String,
    url: String,
    interval: Duration,
    timeout: Duration,
}

async fn register(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if !shared.authorized(&headers) {
        return forbidden();
    }
    let Some(name) = field(&body, "Name").and_then(Value::as_str) else {
        return bad_request("Missing service name");
    };
    let id = field(&body, "ID")
        .and_then(Value::as_str)
        .unwrap_or(name)
        .to_owned();
    let definitions: Vec<&Value> = match (field(&body, "Check"), field(&body, "Checks")) {
        (Some(check), _) if !check.is_null() => vec![check],
        (_, Some(Value::Array(checks))) => checks.iter().collect(),
        _ => Vec::new(),
    };
    let mut checks = BTreeMap::new();
    let mut http_checks = Vec::new();
    let mut ttl_checks = Vec::new();
    let mut state = shared.lock();
    for (n, definition) in definitions.iter().enumerate() {
        let check_id = match field(definition, "CheckID").and_then(Value::as_str) {
            Some(check_id) => check_id.to_owned(),
            None if definitions.len() == 1 => format!("service:{id}"),
            None => format!("service:{id}:{}", n + 1),
        };
        let parsed = (|| {
            let ttl = duration_field(definition, "TTL")?;
            let interval = duration_field(definition, "Interval")?;
            let timeout = duration_field(definition, "Timeout")?;
            let deregister_after = duration_field(definition, "DeregisterCriticalServiceAfter")?;
            Ok::<_, String>((ttl, interval, timeout, deregister_after))
        })();
        let (ttl, interval, timeout, deregister_after) = match parsed {
            Ok(parsed) => parsed,
            Err(message) => return bad_request(message),
        };
        let http = field(definition, "HTTP").and_then(Value::as_str);
        state.generation += 1;
        match (ttl, http, interval) {
            (Some(_), None, _) => {}
            (None, Some(url), Some(interval)) if !interval.is_zero() => {
                let spec = HttpCheckSpec {
                    check_id: check_id.clone(),
                    url: url.to_owned(),
                    interval,
                    timeout: timeout.unwrap_or(Duration::from_secs(10)),
                };
                http_checks.push((spec, state.generation));
            }
            (None, Some(_), _) => return bad_request("Interval must be > 0 for HTTP checks"),
            _ => return bad_request("Invalid check: must be a TTL or an HTTP check"),
        }
        let status = match field(definition, "Status").and_then(Value::as_str) {
            Some("passing") => "passing",
            Some("warning") => "warning",
            Some("critical") | None => "critical",
            Some(other) => return bad_request(format!("Invalid status: {other}")),
        };
        if let Some(ttl) = ttl {
            ttl_checks.push((check_id.clone(), state.generation, ttl));
        }
        checks.insert(
            check_id,
            Check {
                name: field(definition, "Name")
                    .and_then(Value::as_str)
                    .map_or_else(|| format!("Service '{name}' check"), str::to_owned),
                status,
                ttl,
                deregister_after,
                generation: state.generation,
            },
        );
    }
    let strings = |key: &str| -> Vec<String> {
        field(&body, key)
            .and_then(Value::as_array)
            .map(|values| {
                values
                    .iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let meta = field(&body, "Meta")
        .and_then(Value::as_object)
        .map(|meta| {
            meta.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                .collect()
        })
        .unwrap_or_default();
    let service = Service {
        id: id.clone(),
        name: name.to_owned(),
        tags: strings("Tags"),
        address: field(&body, "Address")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        port: field(&body, "Port")
            .and_then(Value::as_u64)
            .and_then(|port| u16::try_from(port).ok())
            .unwrap_or(0),
        meta,
        checks,
    };
    state.services.insert(id.clone(), service);
    state.registrations.push(body.clone());
    drop(state);
    for (check_id, generation, ttl) in ttl_checks {
        tokio::spawn(ttl_timer(
            Arc::downgrade(&shared),
            check_id,
            generation,
            ttl,
        ));
    }
    for (spec, generation) in http_checks {
        tokio::spawn(run_http_check(Arc::downgrade(&shared), spec, generation));
    }
    shared.changed();
    StatusCode::OK.into_response()
}

/// Finds a check by id; returns its service id too.
fn find_check<'a>(state: &'a mut AgentState, check_id: &str) -> Option<(String, &'a mut Check)> {
    state.services.values_mut().find_map(|service| {
        let id = service.id.clone();
        service.checks.get_mut(check_id).map(|check| (id, check))
    })
}

/// Sets a check's status if it is still the same check; bumps the index on a change.
fn set_status(shared: &Shared, check_id: &str, generation: u64, status: &'static str) -> bool {
    let mut state = shared.lock();
    let Some((_, check)) = find_check(&mut state, check_id) else {
        return false;
    };
    if check.generation != generation {
        return false;
    }
    let changed = check.status != status;
    check.status = status;
    drop(state);
    if changed {
        shared.changed();
    }
    true
}

async fn ttl_timer(shared: Weak<Shared>, check_id: String, generation: u64, ttl: Duration) {
    tokio::time::sleep(ttl).await;
    let Some(strong) = shared.upgrade() else {
        return;
    };
    if !set_status(&strong, &check_id, generation, "critical") {
        return;
    }
    let deregister_after = {
        let mut state = strong.lock();
        find_check(&mut state, &check_id).and_then(|(_, check)| check.deregister_after)
    };
    drop(strong);
    if let Some(after) = deregister_after {
        tokio::time::sleep(after).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let mut state = shared.lock();
        let still_critical = find_check(&mut state, &check_id)
            .filter(|(_, check)| check.generation == generation && check.status == "critical")
            .map(|(service_id, _)| service_id);
        if let Some(service_id) = still_critical {
            state.services.remove(&service_id);
            drop(state);
            shared.changed();
        }
    }
}

async fn run_http_check(shared: Weak<Shared>, spec: HttpCheckSpec, generation: u64) {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build_http::<Empty<Bytes>>();
    let mut ticker = tokio::time::interval(spec.interval);
    loop {
        ticker.tick().await;
        let status = match spec.url.parse::<http::Uri>() {
            Ok(uri) => match tokio::time::timeout(spec.timeout, client.get(uri)).await {
                Ok(Ok(response)) => {
                    let code = response.status();
                    let _ = response.into_body().collect().await;
                    if code.is_success() {
                        "passing"
                    } else if code == StatusCode::TOO_MANY_REQUESTS {
                        "warning"
                    } else {
                        "critical"
                    }
                }
                _ => "critical",
            },
            Err(_) => "critical",
        };
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if !set_status(&shared, &spec.check_id, generation, status) {
            return;
        }
    }
}

async fn deregister(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if !shared.authorized(&headers) {
        return forbidden();
    }
    if shared.lock().services.remove(&id).is_none() {
        return (StatusCode::NOT_FOUND, format!("Unknown service ID {id:?}")).into_response();
    }
    shared.changed();
    StatusCode::OK.into_response()
}

async fn update_check(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path((verb, check_id)): Path<(String, String)>,
) -> Response {
    if !shared.authorized(&headers) {
        return forbidden();
    }
    let status = match verb.as_str() {
        "pass" => "passing",
        "warn" => "warning",
        "fail" => "critical",
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    let mut state = shared.lock();
    state.generation += 1;
    let generation = state.generation;
    let Some((_, check)) = find_check(&mut state, &check_id) else {
        return (
            StatusCode::NOT_FOUND,
            format!("Unknown check ID {check_id:?}"),
        )
            .into_response();
    };
    let Some(ttl) = check.ttl else {
        return bad_request(format!("CheckID {check_id:?} does not have associated TTL"));
    };
    let changed = check.status != status;
    check.status = status;
    check.generation = generation;
    drop(state);
    tokio::spawn(ttl_timer(
        Arc::downgrade(&shared),
        check_id,
        generation,
        ttl,
    ));
    if changed {
        shared.changed();
    }
    StatusCode::OK.into_response()
}

async fn health(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    RawQuery(raw): RawQuery,
) -> Response {
    if !shared.authorized(&headers) {
        return forbidden();
    }
    shared.lock().health_queries.push(raw.unwrap_or_default());
    if let Some(dc) = query.get("dc") {
        if dc != DATACENTER {
            return (StatusCode::INTERNAL_SERVER_ERROR, "No path to datacenter").into_response();
        }
    }
    if let Some(index) = query.get("index") {
        let Ok(index) = index.parse::<u64>() else {
            return bad_request("Invalid index");
        };
        let wait = match query
            .get("wait")
            .map(|w| micro_core::config::duration::parse(w))
        {
            None => Duration::from_secs(300),
            Some(Ok(wait)) => wait.min(Duration::from_secs(600)),
            Some(Err(_)) => return bad_request("Invalid wait"),
        };
        let mut receiver = shared.index.subscribe();
        let _blocked = Blocked::new(&shared);
        let _ = tokio::time::timeout(wait, receiver.wait_for(|current| *current > index)).await;
    }
    let passing_only = query.contains_key("passing");
    let index = *shared.index.borrow();
    let state = shared.lock();
    let entries: Vec<Value> = state
        .services
        .values()
        .filter(|service| service.name == name)
        .filter(|service| {
            !passing_only
                || service
                    .checks
                    .values()
                    .all(|check| check.status == "passing")
        })
        .map(|service| {
            let mut checks = vec![json!({
                "Node": "double", "CheckID": "serfHealth", "Name": "Serf Health Status",
                "Status": "passing", "ServiceID": "", "ServiceName": "",
            })];
            checks.extend(service.checks.iter().map(|(check_id, check)| {
                json!({
                    "Node": "double", "CheckID": check_id, "Name": check.name,
                    "Status": check.status, "ServiceID": service.id, "ServiceName": service.name,
                })
            }));
            json!({
                "Node": {"Node": "double", "Address": "127.0.0.1", "Datacenter": DATACENTER},
                "Service": {
                    "ID": service.id, "Service": service.name, "Tags": service.tags,
                    "Address": service.address, "Port": service.port, "Meta": service.meta,
                },
                "Checks": checks,
            })
        })
        .collect();
    drop(state);
    ([("x-consul-index", index.to_string())], Json(entries)).into_response()
}
