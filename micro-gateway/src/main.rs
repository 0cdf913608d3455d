//! `micro-gateway --config gateway.yaml [--listen 127.0.0.1:8080] [--reload-interval 2s]`:
//! the gateway as a process, with `/health/live`, `/health/ready`, `/metrics` and graceful
//! shutdown on SIGTERM. The file is read again when it changes (checked every reload
//! interval, `0s` for never) and at once on SIGHUP; a file that does not load leaves the
//! running configuration in place.

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
                     [--reload-interval <duration, e.g. 2s; 0s never>]";

struct Args {
    config: PathBuf,
    listen: SocketAddr,
    reload_interval: Duration,
}

fn parse_args() -> Result<Args, String> {
    let mut config = None;
    let mut listen = SocketAddr::from(([127, 0, 0, 1], 8080));
    let mut reload_interval = Duration::from_secs(2);
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
            "--help" | "-h" => return Err(USAGE.to_owned()),
            other => return Err(format!("unknown argument `{other}`\n{USAGE}")),
        }
    }
    Ok(Args {
        config: config.ok_or_else(|| format!("--config is required\n{USAGE}"))?,
        listen,
        reload_interval,
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

#[tokio::main]
async fn main() -> ExitCode {
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
    let host = ServiceHost::builder()
        .service(GatewayService(gateway.into_router()), args.listen)
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
