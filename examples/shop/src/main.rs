//! The micro reference shop.
//!
//! `cargo run -p shop` starts every service that exists so far in one process, on embedded
//! defaults, and prints where to send requests. Configuration comes from `shop.toml` in
//! the working directory and from `SHOP_` environment variables (`SHOP_CATALOG__LISTEN`,
//! `SHOP_LOG__FORMAT=json`); `RUST_LOG` sets the log filter.

use std::net::SocketAddr;

use anyhow::Context as _;
use micro_core::config::ConfigLoader;
use micro_core::host::{HostConfig, ServiceHost};
use micro_core::telemetry::{self, TelemetryConfig};
use serde::{Deserialize, Serialize};

/// Everything the shop reads from configuration.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ShopConfig {
    log: TelemetryConfig,
    host: HostConfig,
    catalog: Listen,
}

/// Where one service listens.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Listen {
    listen: SocketAddr,
}

impl Default for ShopConfig {
    fn default() -> Self {
        Self {
            log: TelemetryConfig::default(),
            host: HostConfig::default(),
            catalog: Listen {
                listen: SocketAddr::from(([127, 0, 0, 1], 8002)),
            },
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config: ShopConfig = ConfigLoader::new()
        .defaults(&ShopConfig::default())
        .file("shop.toml")
        .env_prefix("SHOP_")
        .load()?;
    let mut log = config.log;
    if let Ok(filter) = std::env::var("RUST_LOG") {
        log.filter = filter;
    }
    telemetry::init(&log)?;

    let running = ServiceHost::builder()
        .config(config.host)
        .service(shop::catalog::Catalog::seeded(), config.catalog.listen)
        .build()?
        .start()
        .await
        .context("the shop could not start")?;

    for (service, addr) in running.addrs() {
        println!("{service:<16} http://{addr}");
    }
    if let Some(addr) = running.local_addr("product-service") {
        println!();
        println!("try:  curl http://{addr}/products?q=coffee");
        println!("      curl http://{addr}/health/ready");
        println!("      curl http://{addr}/metrics");
    }
    println!("Ctrl-C stops the shop gracefully.");

    let report = running.run_until(micro_core::shutdown::signal()).await;
    if report.aborted_connections > 0 || !report.failed_hooks.is_empty() {
        tracing::warn!(?report, "the shop did not shut down cleanly");
    }
    Ok(())
}
