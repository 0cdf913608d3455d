//! `micro-gateway --config gateway.yaml [--listen 127.0.0.1:8080]`: the gateway as a
//! process, with `/health/live`, `/health/ready`, `/metrics` and graceful shutdown on
//! SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use axum::Router;
use micro_core::host::ServiceHost;
use micro_core::service::Service;
use micro_core::telemetry::{self, TelemetryConfig};
use micro_gateway::config::DeclarativeConfig;

const USAGE: &str = "usage: micro-gateway --config <gateway.yaml> [--listen <addr:port>]";

struct Args {
    config: PathBuf,
    listen: SocketAddr,
}

fn parse_args() -> Result<Args, String> {
    let mut config = None;
    let mut listen = SocketAddr::from(([127, 0, 0, 1], 8080));
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
            "--help" | "-h" => return Err(USAGE.to_owned()),
            other => return Err(format!("unknown argument `{other}`\n{USAGE}")),
        }
    }
    Ok(Args {
        config: config.ok_or_else(|| format!("--config is required\n{USAGE}"))?,
        listen,
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
    let gateway = match DeclarativeConfig::from_file(&args.config).and_then(|config| config.build())
    {
        Ok(gateway) => gateway,
        Err(error) => {
            eprintln!("micro-gateway: invalid configuration: {error}");
            return ExitCode::from(2);
        }
    };
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
