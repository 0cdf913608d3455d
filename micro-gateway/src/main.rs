//! `micro-gateway --config gateway.yaml [--listen 127.0.0.1:8080] [--reload-interval 2s]
//! [--runtime multi-thread|current-thread] [--workers N] [--admin 127.0.0.1:9901]`: the
//! gateway as a process, with `/health/live`, `/health/ready`, `/metrics` and graceful
//! shutdown on SIGTERM. With `--admin`, those three are served on that admin listener
//! only (keep it on loopback or a private network) and the public port serves routes
//! alone; without it they share the public port. The file
//! is read again when it changes (checked every reload interval, `0s` for never) and at
//! once on SIGHUP; a file that does not load leaves the running configuration in place.
//!
//! By default one multi-thread tokio runtime serves every connection (its worker count
//! from `TOKIO_WORKER_THREADS`, else one per CPU). `--runtime current-thread` runs
//! `--workers` threads (one per CPU by default) instead, each a single-threaded runtime
//! with its own listening socket on the same address (`SO_REUSEPORT`, the kernel spreads
//! connections over them), its own gateway and its own upstream connections, as nginx
//! runs one worker process per core: no work moves between threads.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use axum::Router;
use micro_core::host::ServiceHost;
use micro_core::service::Service;
use micro_core::telemetry::{self, TelemetryConfig};
use micro_gateway::config::{DeclarativeConfig, Resources};
use micro_gateway::reload::{ConfigWatcher, Reloadable};

const USAGE: &str = "usage: micro-gateway --config <gateway.yaml> [--listen <addr:port>] \
                     [--reload-interval <duration, e.g. 2s; 0s never>] \
                     [--runtime multi-thread|current-thread] [--workers <n>] \
                     [--admin <addr:port>]";

struct Args {
    config: PathBuf,
    listen: SocketAddr,
    reload_interval: Duration,
    runtime: Flavor,
    workers: Option<usize>,
    admin: Option<SocketAddr>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Flavor {
    MultiThread,
    CurrentThread,
}

fn parse_args() -> Result<Args, String> {
    let mut config = None;
    let mut listen = SocketAddr::from(([127, 0, 0, 1], 8080));
    let mut reload_interval = Duration::from_secs(2);
    let mut runtime = Flavor::MultiThread;
    let mut workers = None;
    let mut admin = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--config" | "-c" => {
                config = Some(PathBuf::from(args.next().ok_or("--config needs a path")?))
            }
            "--listen" | "-l" => {
                let value = args.next().ok_or("--listen needs an address")?;
                listen = value
                    .parse()
                    .map_err(|_| format!("`{value}` is not an address such as 127.0.0.1:8080"))?;
            }
            "--reload-interval" => {
                let value = args.next().ok_or("--reload-interval needs a duration")?;
                reload_interval = micro_core::config::duration::parse(&value)
                    .map_err(|e| format!("--reload-interval: {e}"))?;
            }
            "--runtime" => {
                runtime = match args.next().as_deref() {
                    Some("multi-thread") => Flavor::MultiThread,
                    Some("current-thread") => Flavor::CurrentThread,
                    other => {
                        return Err(format!(
                            "--runtime is `multi-thread` or `current-thread`, not `{}`",
                            other.unwrap_or("")
                        ))
                    }
                }
            }
            "--workers" => {
                let value = args.next().ok_or("--workers needs a number")?;
                workers = Some(
                    value
                        .parse()
                        .ok()
                        .filter(|&n: &usize| n > 0)
                        .ok_or_else(|| format!("--workers: `{value}` is not a positive number"))?,
                );
            }
            "--admin" => {
                let value = args.next().ok_or("--admin needs an address")?;
                admin =
                    Some(value.parse().map_err(|_| {
                        format!("`{value}` is not an address such as 127.0.0.1:9901")
                    })?);
            }
            "--help" | "-h" => return Err(USAGE.to_owned()),
            other => return Err(format!("unknown argument `{other}`\n{USAGE}")),
        }
    }
    if workers.is_some() && runtime == Flavor::MultiThread {
        return Err(
            "--workers is for --runtime current-thread; the multi-thread runtime takes \
             TOKIO_WORKER_THREADS"
                .to_owned(),
        );
    }
    if admin.is_some() && runtime == Flavor::CurrentThread && workers != Some(1) {
        return Err(
            "--admin with --runtime current-thread needs --workers 1: one admin listener \
             serves one host"
                .to_owned(),
        );
    }
    Ok(Args {
        config: config.ok_or_else(|| format!("--config is required\n{USAGE}"))?,
        listen,
        reload_interval,
        runtime,
        workers,
        admin,
    })
}

/// The gateway, hosted like any micro service.
struct GatewayService(Router);

impl Service for GatewayService {
    fn name(&self) -> &str {
        "gateway"
    }

    fn version(&self) -> &str {
        env!("CARGO_PKG_VERSION")
    }

    fn router(&self) -> Router {
        self.0.clone()
    }
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::from(2);
        }
    };
    let mut log = TelemetryConfig::default();
    if let Ok(filter) = std::env::var("RUST_LOG") {
        log.filter = filter;
    }
    if let Err(error) = telemetry::init(&log) {
        eprintln!("micro-gateway: {error}");
        return ExitCode::FAILURE;
    }
    match args.runtime {
        Flavor::MultiThread => {
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(error) => {
                    eprintln!("micro-gateway: cannot start the runtime: {error}");
                    return ExitCode::FAILURE;
                }
            };
            runtime.block_on(serve(&args, None))
        }
        Flavor::CurrentThread => per_core(&args),
    }
}

/// `--runtime current-thread`: one single-threaded runtime per worker thread, each with
/// its own socket on the address. The first binds (to a port of its choosing when the
/// address's port is 0) and the others join it on the port it got.
fn per_core(args: &Args) -> ExitCode {
    let workers = args.workers.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    std::thread::scope(|scope| {
        let (bound_tx, bound_rx) = std::sync::mpsc::channel();
        let mut threads = vec![spawn_worker(scope, args, 0, args.listen, Some(bound_tx))];
        if let Ok(addr) = bound_rx.recv() {
            for index in 1..workers {
                threads.push(spawn_worker(scope, args, index, addr, None));
            }
        }
        let mut code = ExitCode::SUCCESS;
        for thread in threads {
            let ended = match thread {
                Ok(handle) => handle.join().unwrap_or(ExitCode::FAILURE),
                Err(error) => {
                    eprintln!("micro-gateway: cannot start a worker thread: {error}");
                    ExitCode::FAILURE
                }
            };
            if ended != ExitCode::SUCCESS {
                code = ended;
            }
        }
        code
    })
}

/// One worker: a single-threaded runtime serving on its own socket bound to `addr`, which
/// it reports on `bound` once bound.
fn spawn_worker<'scope>(
    scope: &'scope std::thread::Scope<'scope, '_>,
    args: &'scope Args,
    index: usize,
    addr: SocketAddr,
    bound: Option<std::sync::mpsc::Sender<SocketAddr>>,
) -> std::io::Result<std::thread::ScopedJoinHandle<'scope, ExitCode>> {
    std::thread::Builder::new()
        .name(format!("micro-gateway-{index}"))
        .spawn_scoped(scope, move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(error) => {
                    eprintln!("micro-gateway: cannot start the runtime: {error}");
                    return ExitCode::FAILURE;
                }
            };
            runtime.block_on(async {
                let listener = match reuse_port(addr) {
                    Ok(listener) => listener,
                    Err(error) => {
                        eprintln!("micro-gateway: cannot listen on {addr}: {error}");
                        return ExitCode::FAILURE;
                    }
                };
                if let (Some(bound), Ok(local)) = (bound, listener.local_addr()) {
                    let _ = bound.send(local);
                }
                serve(args, Some(listener)).await
            })
        })
}

/// A listener on `addr` that other workers' listeners share.
fn reuse_port(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Builds the gateway from the file and serves it until SIGTERM: on `listener` when
/// given, else on a listener the host binds to `--listen`.
async fn serve(args: &Args, listener: Option<tokio::net::TcpListener>) -> ExitCode {
    let built = async {
        let config = DeclarativeConfig::from_file(&args.config)?;
        let mut resources = Resources::new();
        if let Some(discovery) = &config.discovery {
            resources = resources.discover(discovery.connect().await?);
        }
        let gateway = config.build_with(&resources)?;
        Ok::<_, micro_gateway::config::ConfigError>((gateway, resources))
    };
    let (gateway, resources) = match built.await {
        Ok(built) => built,
        Err(error) => {
            eprintln!("micro-gateway: invalid configuration: {error}");
            return ExitCode::from(2);
        }
    };
    let gateway = Reloadable::new(gateway);
    let watcher = ConfigWatcher::new(&args.config, resources, gateway.clone());
    let _watching = tokio::spawn(watch(watcher, args.reload_interval));
    let service = GatewayService(gateway.into_router());
    let mut config = micro_core::host::HostConfig::default();
    if let Some(admin) = args.admin {
        // /health/* and /metrics leave the public port for the admin listener.
        config.listeners.insert(
            "gateway".to_owned(),
            micro_core::listener::ListenerConfig::default().admin(admin),
        );
    }
    let builder = ServiceHost::builder().config(config);
    let host = match listener {
        Some(listener) => builder.service_on(service, listener),
        None => builder.service(service, args.listen),
    }
    .build()
    .map_err(|e| e.to_string());
    let running = match host {
        Ok(host) => host.start().await.map_err(|e| e.to_string()),
        Err(e) => Err(e),
    };
    let running = match running {
        Ok(running) => running,
        Err(error) => {
            eprintln!("micro-gateway: {error}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(admin) = running.admin_addr("gateway") {
        tracing::info!(%admin, "health and metrics on the admin listener");
    }
    tracing::info!(listen = %args.listen, config = %args.config.display(), "micro-gateway ready");
    let report = running.run_until(micro_core::shutdown::signal()).await;
    if report.aborted_connections > 0 {
        tracing::warn!(
            aborted = report.aborted_connections,
            "connections were cut at the drain deadline"
        );
    }
    ExitCode::SUCCESS
}

/// Reloads the configuration when the file changes and on SIGHUP.
async fn watch(mut watcher: ConfigWatcher, interval: Duration) {
    let mut hangups = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(signals) => Some(signals),
        Err(error) => {
            tracing::warn!(%error, "SIGHUP will not reload the configuration");
            None
        }
    };
    let mut ticks = (!interval.is_zero()).then(|| {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks
    });
    loop {
        tokio::select! {
            Some(_) = async { ticks.as_mut()?.tick().await.into() } => {}
            Some(()) = async { hangups.as_mut()?.recv().await } => {}
            else => return,
        }
        // Errors are logged and counted by the watcher; the running gateway stays.
        let _ = watcher.check();
    }
}
