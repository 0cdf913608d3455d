//! [`ServiceHost`]: runs one or many [`Service`]s in one process, each on its own
//! listener, with health, metrics and one ordered graceful shutdown.
//!
//! # Shutdown
//!
//! When the shutdown future given to [`RunningHost::run_until`] resolves (or a
//! [`Shutdown`] trigger fires), the host runs one sequence:
//!
//! 1. readiness turns `503` on every service, so load balancers send new work elsewhere;
//! 2. the `before_drain` hooks run in the order they were added (deregistration from
//!    discovery and stopping event consumers plug in here);
//! 3. the host keeps accepting for [`HostConfig::readiness_grace`], for load balancers
//!    that only notice readiness on their next probe;
//! 4. listeners close, so new connections are refused, and in-flight requests drain for up
//!    to [`HostConfig::drain_timeout`]; connections still busy then are closed;
//! 5. the `after_drain` hooks run (flushing an outbox, say);
//! 6. each service's [`Service::stop`] runs, in reverse order of start;
//! 7. [`RunningHost::run_until`] returns a [`ShutdownReport`].
//!
//! A hook that fails or outlives [`HostConfig::hook_timeout`] is logged and reported, and
//! the sequence goes on: a stuck hook must not keep a process from exiting.

use std::collections::{BTreeMap, HashSet};
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tower::BoxError;

use crate::health::{self, HealthCheck, Readiness};
use crate::listener::{InvalidListenerConfig, ListenerConfig};
use crate::metrics::{
    self as host_metrics, HttpMetrics, MetricsError, PrometheusHandle, RecordHttp, TagRouteLayer,
};
use crate::middleware::{RequestSpan, SetRequestId};
use crate::serve::{self, Drained, Security};
use crate::service::{BoxFuture, DynService, Service};
use crate::shutdown::Shutdown;

/// Timing of the host's lifecycle. Deserializes from configuration with durations such as
/// `"30s"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HostConfig {
    /// How long in-flight requests may take to finish once listeners close.
    #[serde(with = "crate::config::duration")]
    pub drain_timeout: Duration,
    /// How long the host keeps accepting after readiness turned `503`.
    #[serde(with = "crate::config::duration")]
    pub readiness_grace: Duration,
    /// How long each lifecycle hook may take.
    #[serde(with = "crate::config::duration")]
    pub hook_timeout: Duration,
    /// The limits of every listener (timeouts, sizes, connections); see
    /// [`listener`](crate::listener).
    pub listener: ListenerConfig,
    /// Limits of one service's listener, by service name, in place of
    /// [`listener`](Self::listener) (and of what the code set with
    /// [`ServiceHostBuilder::service_with`]). Keys left out of an entry take
    /// [`ListenerConfig`]'s defaults. A name that no service has fails
    /// [`ServiceHostBuilder::build`].
    pub listeners: BTreeMap<String, ListenerConfig>,
}

impl Default for HostConfig {
    fn default() -> Self {
        Self {
            drain_timeout: Duration::from_secs(30),
            readiness_grace: Duration::ZERO,
            hook_timeout: Duration::from_secs(10),
            listener: ListenerConfig::default(),
            listeners: BTreeMap::new(),
        }
    }
}

/// The host could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HostError {
    /// Two services share a name.
    #[error("two services are named `{0}`")]
    DuplicateService(String),
    /// A listener could not be bound.
    #[error("cannot listen on {addr} for service `{service}`")]
    Bind {
        /// The service the listener was for.
        service: String,
        /// The address that could not be bound.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A service's start hook failed.
    #[error("service `{service}` failed to start")]
    Start {
        /// The service that failed.
        service: String,
        /// Why.
        #[source]
        source: BoxError,
    },
    /// An `on_ready` hook failed.
    #[error("hook `{hook}` failed")]
    Hook {
        /// The hook's name.
        hook: String,
        /// Why.
        #[source]
        source: BoxError,
    },
    /// A listener's limits can't be used.
    #[error("the listener of service `{service}` is misconfigured")]
    Listener {
        /// The service the listener is for.
        service: String,
        /// Which setting, and why.
        #[source]
        source: InvalidListenerConfig,
    },
    /// A listener's TLS files can't be used (missing, not PEM, a key that does not
    /// match its certificate).
    #[cfg(feature = "tls")]
    #[error("the tls set-up of the listener of service `{service}` can't be used")]
    Tls {
        /// The service the listener is for.
        service: String,
        /// Which setting and file, and why.
        #[source]
        source: crate::tls::TlsError,
    },
    /// A service's gRPC services can't be served (a file descriptor set for reflection
    /// that does not decode).
    #[cfg(feature = "grpc")]
    #[error("the grpc services of service `{service}` can't be served")]
    Grpc {
        /// The service.
        service: String,
        /// Why.
        #[source]
        source: BoxError,
    },
    /// [`HostConfig::listeners`] names a service the host does not run.
    #[error("`listeners.{0}` names no service of this host")]
    UnknownListener(String),
    /// The metrics recorder could not be installed.
    #[error(transparent)]
    Metrics(#[from] MetricsError),
}

/// What happened during a shutdown.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// Connections still busy at the drain deadline, closed without an answer.
    pub aborted_connections: usize,
    /// Hooks and stop hooks that failed or timed out, with the reason.
    pub failed_hooks: Vec<(String, String)>,
}

enum Listen {
    Addr(SocketAddr),
    Listener(TcpListener),
}

type HookFn = Box<dyn FnOnce() -> BoxFuture<'static, Result<(), BoxError>> + Send>;

struct Planned {
    service: Arc<dyn DynService>,
    listen: Listen,
    limits: Option<ListenerConfig>,
    security: Security,
}

struct Hook {
    name: String,
    run: HookFn,
}

impl Hook {
    fn new<F, Fut>(name: impl Into<String>, hook: F) -> Self
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), BoxError>> + Send + 'static,
    {
        Self {
            name: name.into(),
            run: Box::new(move || Box::pin(hook())),
        }
    }
}

/// Collects the services and hooks of a [`ServiceHost`].
pub struct ServiceHostBuilder {
    services: Vec<Planned>,
    config: HostConfig,
    metrics: Option<PrometheusHandle>,
    on_ready: Vec<Hook>,
    before_drain: Vec<Hook>,
    after_drain: Vec<Hook>,
}

impl ServiceHostBuilder {
    /// Adds a service that listens on `addr` (port 0 picks a free port).
    pub fn service(self, service: impl Service, addr: SocketAddr) -> Self {
        self.plan(service, Listen::Addr(addr), None)
    }

    /// Adds a service that listens on `addr` with its own listener limits, in place of
    /// [`HostConfig::listener`]. An entry for the service in [`HostConfig::listeners`]
    /// still replaces them, so operators have the last word.
    pub fn service_with(
        self,
        service: impl Service,
        addr: SocketAddr,
        limits: ListenerConfig,
    ) -> Self {
        self.plan(service, Listen::Addr(addr), Some(limits))
    }

    /// Adds a service that serves on an already bound listener.
    pub fn service_on(self, service: impl Service, listener: TcpListener) -> Self {
        self.plan(service, Listen::Listener(listener), None)
    }

    fn plan(
        mut self,
        service: impl Service,
        listen: Listen,
        limits: Option<ListenerConfig>,
    ) -> Self {
        self.services.push(Planned {
            service: Arc::new(service),
            listen,
            limits,
            security: Security::Plain,
        });
        self
    }

    /// Sets the lifecycle timing.
    pub fn config(mut self, config: HostConfig) -> Self {
        self.config = config;
        self
    }

    /// Renders `/metrics` from this handle instead of installing the Prometheus recorder
    /// with [`install_prometheus`](crate::metrics::install_prometheus).
    pub fn metrics(mut self, handle: PrometheusHandle) -> Self {
        self.metrics = Some(handle);
        self
    }

    /// Adds a hook that runs once every listener accepts and every service has started
    /// (registering with discovery, say). A failing hook fails [`ServiceHost::start`].
    pub fn on_ready<F, Fut>(mut self, name: impl Into<String>, hook: F) -> Self
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), BoxError>> + Send + 'static,
    {
        self.on_ready.push(Hook::new(name, hook));
        self
    }

    /// Adds a hook that runs when shutdown begins, after readiness turned `503` and before
    /// requests drain (deregistration, stopping consumers).
    pub fn before_drain<F, Fut>(mut self, name: impl Into<String>, hook: F) -> Self
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), BoxError>> + Send + 'static,
    {
        self.before_drain.push(Hook::new(name, hook));
        self
    }

    /// Adds a hook that runs once in-flight requests have drained (flushing an outbox).
    pub fn after_drain<F, Fut>(mut self, name: impl Into<String>, hook: F) -> Self
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), BoxError>> + Send + 'static,
    {
        self.after_drain.push(Hook::new(name, hook));
        self
    }

    /// Finishes the builder.
    ///
    /// # Errors
    ///
    /// [`HostError::DuplicateService`] when two services share a name,
    /// [`HostError::UnknownListener`] when [`HostConfig::listeners`] names no service, and
    /// [`HostError::Listener`] when a listener's limits can't be used, and (with the `tls`
    /// feature) `HostError::Tls` when a listener's TLS files can't be used: they are read
    /// here.
    pub fn build(mut self) -> Result<ServiceHost, HostError> {
        let mut names = HashSet::new();
        for planned in &self.services {
            if !names.insert(planned.service.name().to_owned()) {
                return Err(HostError::DuplicateService(
                    planned.service.name().to_owned(),
                ));
            }
        }
        if let Some(unknown) = self
            .config
            .listeners
            .keys()
            .find(|name| !names.contains(name.as_str()))
        {
            return Err(HostError::UnknownListener(unknown.clone()));
        }
        for planned in &mut self.services {
            let name = planned.service.name();
            let limits = self
                .config
                .listeners
                .get(name)
                .or(planned.limits.as_ref())
                .unwrap_or(&self.config.listener)
                .clone();
            limits.validate().map_err(|source| HostError::Listener {
                service: name.to_owned(),
                source,
            })?;
            #[cfg(feature = "tls")]
            if let Some(tls) = &limits.tls {
                let loaded =
                    crate::tls::ServerTls::load(name, tls).map_err(|source| HostError::Tls {
                        service: name.to_owned(),
                        source,
                    })?;
                planned.security = Security::Tls(loaded);
            }
            planned.limits = Some(limits);
        }
        Ok(ServiceHost { builder: self })
    }
}

impl fmt::Debug for ServiceHostBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceHostBuilder")
            .field(
                "services",
                &self
                    .services
                    .iter()
                    .map(|planned| planned.service.name())
                    .collect::<Vec<_>>(),
            )
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Runs services, each on its own listener, and shuts them down in one ordered sequence.
///
/// ```
/// use axum::{routing::get, Router};
/// use micro_core::host::ServiceHost;
/// use micro_core::service::Service;
/// use micro_core::shutdown::Shutdown;
///
/// struct Hello;
///
/// impl Service for Hello {
///     fn name(&self) -> &str {
///         "hello"
///     }
///     fn router(&self) -> Router {
///         Router::new().route("/hello", get(|| async { "hello" }))
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let host = ServiceHost::builder()
///     .service(Hello, "127.0.0.1:0".parse()?)
///     .build()?;
/// let running = host.start().await?;
/// let addr = running.local_addr("hello").unwrap();
/// assert_ne!(addr.port(), 0);
///
/// // A binary passes `micro_core::shutdown::signal()` here.
/// let shutdown = Shutdown::new();
/// shutdown.trigger();
/// let report = running.run_until(shutdown.wait()).await;
/// assert_eq!(report.aborted_connections, 0);
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct ServiceHost {
    builder: ServiceHostBuilder,
}

impl ServiceHost {
    /// Starts describing a host.
    pub fn builder() -> ServiceHostBuilder {
        ServiceHostBuilder {
            services: Vec::new(),
            config: HostConfig::default(),
            metrics: None,
            on_ready: Vec::new(),
            before_drain: Vec::new(),
            after_drain: Vec::new(),
        }
    }

    /// Binds every listener, runs every service's start hook, starts serving and runs the
    /// `on_ready` hooks.
    ///
    /// # Errors
    ///
    /// When a listener cannot be bound, a start hook or an `on_ready` hook fails, or the
    /// metrics recorder cannot be installed. Services already started are stopped first.
    pub async fn start(self) -> Result<RunningHost, HostError> {
        let ServiceHostBuilder {
            services,
            config,
            metrics,
            on_ready,
            before_drain,
            after_drain,
        } = self.builder;
        let metrics = match metrics {
            Some(handle) => handle,
            None => host_metrics::install_prometheus()?,
        };

        let mut bound = Vec::with_capacity(services.len());
        for Planned {
            service,
            listen,
            limits,
            security,
        } in services
        {
            let listener = match listen {
                Listen::Listener(listener) => listener,
                Listen::Addr(addr) => {
                    serve::bind(addr)
                        .await
                        .map_err(|source| HostError::Bind {
                            service: service.name().to_owned(),
                            addr,
                            source,
                        })?
                        .0
                }
            };
            let limits = limits.unwrap_or_default();
            let admin = match limits.admin {
                Some(addr) => Some(
                    serve::bind(addr)
                        .await
                        .map_err(|source| HostError::Bind {
                            service: format!("{} (admin)", service.name()),
                            addr,
                            source,
                        })?
                        .0,
                ),
                None => None,
            };
            bound.push((service, listener, limits, security, admin));
        }

        let phase = Arc::new(Phase::new());
        let stop = Shutdown::new();
        let mut started: Vec<Arc<dyn DynService>> = Vec::new();
        let mut servers = Vec::new();
        let mut admins = Vec::new();
        for (service, listener, limits, security, admin) in bound {
            if let Err(source) = service.start().await {
                let error = HostError::Start {
                    service: service.name().to_owned(),
                    source,
                };
                stop_services(&started, config.hook_timeout, &mut Vec::new()).await;
                return Err(error);
            }
            let addr = listener.local_addr().map_err(|source| HostError::Bind {
                service: service.name().to_owned(),
                addr: SocketAddr::from(([0, 0, 0, 0], 0)),
                source,
            })?;
            let (app, ops) = match app(&service, phase.clone(), metrics.clone(), admin.is_some()) {
                Ok(apps) => apps,
                Err(error) => {
                    started.push(service);
                    stop_services(&started, config.hook_timeout, &mut Vec::new()).await;
                    return Err(error);
                }
            };
            if let (Some(admin), Some(ops)) = (admin, ops) {
                let admin_addr = admin.local_addr().map_err(|source| HostError::Bind {
                    service: format!("{} (admin)", service.name()),
                    addr: SocketAddr::from(([0, 0, 0, 0], 0)),
                    source,
                })?;
                let task = tokio::spawn(serve::serve(
                    admin,
                    ops,
                    ListenerConfig::default(),
                    Security::Plain,
                    stop.wait(),
                    config.drain_timeout,
                ));
                tracing::info!(service = service.name(), addr = %admin_addr, "admin endpoints listening");
                admins.push(Server {
                    name: service.name().to_owned(),
                    addr: admin_addr,
                    security: Security::Plain,
                    task,
                });
            }
            let tls = match &security {
                Security::Plain => false,
                #[cfg(feature = "tls")]
                Security::Tls(_) => true,
            };
            let task = tokio::spawn(serve::serve(
                listener,
                app,
                limits,
                security.clone(),
                stop.wait(),
                config.drain_timeout,
            ));
            tracing::info!(service = service.name(), %addr, tls, "service listening");
            servers.push(Server {
                name: service.name().to_owned(),
                addr,
                security,
                task,
            });
            started.push(service);
        }
        phase.set(PhaseValue::Running);

        let mut running = RunningHost {
            servers,
            admins,
            services: started,
            phase,
            stop,
            trigger: Shutdown::new(),
            config,
            before_drain,
            after_drain,
        };
        for hook in on_ready {
            let outcome = tokio::time::timeout(running.config.hook_timeout, (hook.run)()).await;
            let source: Option<BoxError> = match outcome {
                Ok(Ok(())) => None,
                Ok(Err(error)) => Some(error),
                Err(_) => Some(format!("timed out after {:?}", running.config.hook_timeout).into()),
            };
            if let Some(source) = source {
                running.before_drain.clear();
                running.after_drain.clear();
                running.shutdown_now().await;
                return Err(HostError::Hook {
                    hook: hook.name,
                    source,
                });
            }
        }
        Ok(running)
    }

    /// Starts the host and runs it until `shutdown` resolves; see [`RunningHost::run_until`].
    ///
    /// # Errors
    ///
    /// As [`start`](Self::start).
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<ShutdownReport, HostError> {
        Ok(self.start().await?.run_until(shutdown).await)
    }
}

struct Server {
    name: String,
    addr: SocketAddr,
    #[cfg_attr(not(feature = "tls"), allow(dead_code))]
    security: Security,
    task: JoinHandle<Drained>,
}

/// A started [`ServiceHost`]: its services are serving.
pub struct RunningHost {
    servers: Vec<Server>,
    /// The admin listeners of the services that have one.
    admins: Vec<Server>,
    services: Vec<Arc<dyn DynService>>,
    phase: Arc<Phase>,
    stop: Shutdown,
    trigger: Shutdown,
    config: HostConfig,
    before_drain: Vec<Hook>,
    after_drain: Vec<Hook>,
}

impl RunningHost {
    /// The address a service listens on.
    pub fn local_addr(&self, service: &str) -> Option<SocketAddr> {
        self.servers
            .iter()
            .find(|server| server.name == service)
            .map(|server| server.addr)
    }

    /// The address of a service's admin listener (its host endpoints), when its
    /// [`ListenerConfig::admin`] is set.
    pub fn admin_addr(&self, service: &str) -> Option<SocketAddr> {
        self.admins
            .iter()
            .find(|server| server.name == service)
            .map(|server| server.addr)
    }

    /// The handle that reloads the TLS files of a service's listener at once, or `None`
    /// when the service has no TLS listener (or no such service runs here).
    #[cfg(feature = "tls")]
    pub fn tls_reloader(&self, service: &str) -> Option<crate::tls::TlsReloader> {
        self.servers
            .iter()
            .find(|server| server.name == service)
            .and_then(|server| match &server.security {
                Security::Tls(tls) => Some(tls.reloader()),
                Security::Plain => None,
            })
    }

    /// Every service's name and address, in the order they were added.
    pub fn addrs(&self) -> Vec<(String, SocketAddr)> {
        self.servers
            .iter()
            .map(|server| (server.name.clone(), server.addr))
            .collect()
    }

    /// A trigger that begins the shutdown sequence, as the future given to
    /// [`run_until`](Self::run_until) does.
    pub fn shutdown_trigger(&self) -> Shutdown {
        self.trigger.clone()
    }

    /// Serves until `shutdown` resolves or the [`shutdown_trigger`](Self::shutdown_trigger)
    /// fires, then runs the shutdown sequence described in the [module docs](self).
    pub async fn run_until(self, shutdown: impl Future<Output = ()> + Send) -> ShutdownReport {
        let trigger = self.trigger.wait();
        tokio::select! {
            () = shutdown => {}
            () = trigger => {}
        }
        self.shutdown_now().await
    }

    async fn shutdown_now(self) -> ShutdownReport {
        let mut report = ShutdownReport::default();
        self.phase.set(PhaseValue::ShuttingDown);
        tracing::info!("shutdown begun: readiness is off");
        run_hooks(
            self.before_drain,
            self.config.hook_timeout,
            &mut report.failed_hooks,
        )
        .await;
        if !self.config.readiness_grace.is_zero() {
            tokio::time::sleep(self.config.readiness_grace).await;
        }
        self.stop.trigger();
        for server in self.servers.into_iter().chain(self.admins) {
            match server.task.await {
                Ok(drained) => report.aborted_connections += drained.aborted,
                Err(error) => tracing::error!(service = %server.name, %error, "server task failed"),
            }
        }
        if report.aborted_connections > 0 {
            tracing::warn!(
                aborted = report.aborted_connections,
                deadline = ?self.config.drain_timeout,
                "connections still busy at the drain deadline were closed"
            );
        }
        run_hooks(
            self.after_drain,
            self.config.hook_timeout,
            &mut report.failed_hooks,
        )
        .await;
        stop_services(
            &self.services,
            self.config.hook_timeout,
            &mut report.failed_hooks,
        )
        .await;
        tracing::info!("shutdown complete");
        report
    }
}

impl fmt::Debug for RunningHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RunningHost")
            .field("services", &self.addrs())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

async fn run_hooks(hooks: Vec<Hook>, timeout: Duration, failed: &mut Vec<(String, String)>) {
    for hook in hooks {
        let reason = match tokio::time::timeout(timeout, (hook.run)()).await {
            Ok(Ok(())) => continue,
            Ok(Err(error)) => error.to_string(),
            Err(_) => format!("timed out after {timeout:?}"),
        };
        tracing::error!(hook = %hook.name, %reason, "shutdown hook failed");
        failed.push((hook.name, reason));
    }
}

async fn stop_services(
    services: &[Arc<dyn DynService>],
    timeout: Duration,
    failed: &mut Vec<(String, String)>,
) {
    for service in services.iter().rev() {
        let reason = match tokio::time::timeout(timeout, service.stop()).await {
            Ok(Ok(())) => continue,
            Ok(Err(error)) => error.to_string(),
            Err(_) => format!("timed out after {timeout:?}"),
        };
        tracing::error!(service = service.name(), %reason, "stop hook failed");
        failed.push((format!("{}.stop", service.name()), reason));
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum PhaseValue {
    Starting = 0,
    Running = 1,
    ShuttingDown = 2,
}

/// The host's lifecycle phase, read by every readiness probe.
#[derive(Debug)]
struct Phase {
    value: AtomicU8,
    /// Wakes those who watch readiness (gRPC health `Watch` streams).
    changed: Arc<tokio::sync::Notify>,
}

impl Phase {
    fn new() -> Self {
        Self {
            value: AtomicU8::new(PhaseValue::Starting as u8),
            changed: Arc::new(tokio::sync::Notify::new()),
        }
    }

    fn set(&self, value: PhaseValue) {
        self.value.store(value as u8, Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    fn readiness_override(&self) -> Option<Readiness> {
        match self.value.load(Ordering::SeqCst) {
            0 => Some(Readiness::Starting),
            1 => None,
            _ => Some(Readiness::ShuttingDown),
        }
    }
}

#[derive(Clone)]
struct OpsState {
    name: Arc<str>,
    version: Arc<str>,
    checks: Arc<[HealthCheck]>,
    phase: Arc<Phase>,
    metrics: PrometheusHandle,
}

/// The service's router, with metrics recorded per route and the host's own endpoints;
/// with `admin`, the host's endpoints apart, for the admin listener. With the `grpc`
/// feature, the service's gRPC services beside them.
fn app(
    service: &Arc<dyn DynService>,
    phase: Arc<Phase>,
    metrics: PrometheusHandle,
    admin: bool,
) -> Result<(Router, Option<Router>), HostError> {
    let http_metrics = HttpMetrics::new(service.name(), service.version());
    let ops = OpsState {
        name: service.name().into(),
        version: service.version().into(),
        checks: service.health_checks().into(),
        phase,
        metrics,
    };
    let grpc = grpc_app(service, &ops)?;
    let service_routes = RecordHttp::new(service.router().layer(TagRouteLayer), http_metrics);
    let ops = Router::new()
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .route("/metrics", get(render_metrics))
        .with_state(ops);
    let (ops, admin_routes) = if admin {
        (None, Some(ops))
    } else {
        (Some(ops), None)
    };
    let routes = HostRoutes {
        ops,
        grpc,
        service: service_routes,
    };
    // One stack under one route, rather than `Router::layer`, which boxes each layer
    // again and clones every box per request.
    Ok((
        Router::new().fallback_service(SetRequestId::new(RequestSpan::new(routes, service.name()))),
        admin_routes,
    ))
}

#[cfg(feature = "grpc")]
fn grpc_app(service: &Arc<dyn DynService>, ops: &OpsState) -> Result<Option<Router>, HostError> {
    use crate::grpc::{GrpcApp, ReadinessProbe, Verdict};
    let Some(services) = service.grpc() else {
        return Ok(None);
    };
    let changed = ops.phase.changed.clone();
    let ops = ops.clone();
    let probe = ReadinessProbe {
        check: Arc::new(move || {
            let ops = ops.clone();
            Box::pin(async move {
                let phase = ops.phase.readiness_override();
                if phase == Some(Readiness::ShuttingDown) {
                    return Verdict::ShuttingDown;
                }
                let report = health::readiness(&ops.name, &ops.version, &ops.checks, phase).await;
                if report.is_ready() {
                    Verdict::Serving
                } else {
                    Verdict::NotServing
                }
            })
        }),
        changed,
    };
    GrpcApp::build(service.name(), services, probe)
        .map(Some)
        .map_err(|source| HostError::Grpc {
            service: service.name().to_owned(),
            source,
        })
}

#[cfg(not(feature = "grpc"))]
fn grpc_app(_: &Arc<dyn DynService>, _: &OpsState) -> Result<Option<Router>, HostError> {
    Ok(None)
}

/// The host's endpoints sit in front of the service's router, so probes and scrapes are
/// not counted as the service's traffic, and the service keeps its own fallback. They are
/// told apart by path alone, as a router holding the three routes with the service as its
/// fallback would, without the service's traffic going through that router too. gRPC
/// calls, told apart by their content type, go to the gRPC services, so they are counted
/// per RPC method rather than as HTTP routes.
#[derive(Clone)]
struct HostRoutes<S> {
    /// `None` when the host's endpoints are on the admin listener.
    ops: Option<Router>,
    grpc: Option<Router>,
    service: S,
}

/// Whether a request is a gRPC call (any `application/grpc` content type, `+proto` and
/// the like included).
fn is_grpc(request: &axum::extract::Request) -> bool {
    request
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes().starts_with(b"application/grpc"))
}

const HOST_PATHS: [&str; 3] = ["/health/live", "/health/ready", "/metrics"];

impl<S> tower::Service<axum::extract::Request> for HostRoutes<S>
where
    S: tower::Service<axum::extract::Request, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = HostFuture<<Router as tower::Service<axum::extract::Request>>::Future, S::Future>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        // The routers are always ready.
        self.service.poll_ready(cx)
    }

    fn call(&mut self, request: axum::extract::Request) -> Self::Future {
        let router = match (&mut self.grpc, &mut self.ops) {
            (Some(grpc), _) if is_grpc(&request) => Some(grpc),
            (_, Some(ops)) if HOST_PATHS.contains(&request.uri().path()) => Some(ops),
            _ => None,
        };
        match router {
            Some(router) => HostFuture::Router {
                future: tower::Service::call(router, request),
            },
            None => HostFuture::Service {
                future: self.service.call(request),
            },
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`HostRoutes`].
    #[project = HostFutureProj]
    enum HostFuture<O, S> {
        Router { #[pin] future: O },
        Service { #[pin] future: S },
    }
}

impl<O, S> Future for HostFuture<O, S>
where
    O: Future<Output = Result<Response, Infallible>>,
    S: Future<Output = Result<Response, Infallible>>,
{
    type Output = Result<Response, Infallible>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        match self.project() {
            HostFutureProj::Router { future } => future.poll(cx),
            HostFutureProj::Service { future } => future.poll(cx),
        }
    }
}

async fn live(State(ops): State<OpsState>) -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "up", "service": &*ops.name }))
}

async fn ready(State(ops): State<OpsState>) -> Response {
    let report = health::readiness(
        &ops.name,
        &ops.version,
        &ops.checks,
        ops.phase.readiness_override(),
    )
    .await;
    let status = if report.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(report)).into_response()
}

async fn render_metrics(State(ops): State<OpsState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        ops.metrics.render(),
    )
        .into_response()
}
