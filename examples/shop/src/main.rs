//! The micro reference shop.
//!
//! `cargo run -p shop` starts every service and the gateway in one process, on embedded
//! defaults (each service's data in `target/shop-data/`, the registry in memory), and
//! prints where to send requests. Configuration comes from `shop.toml` in the working
//! directory and from `SHOP_` environment variables (`SHOP_LISTEN__GATEWAY=0.0.0.0:8080`,
//! `SHOP_LOG__FORMAT=json`); `RUST_LOG` sets the log filter.
//!
//! `shop serve <service>` runs one service (user, product, order, cart, payment,
//! inventory, notification or gateway) in this process, finding the others in etcd
//! (`SHOP_ETCD_ENDPOINTS`) and using Kafka (`SHOP_KAFKA_BROKERS`) for events; it needs
//! the `real-servers` feature.

use anyhow::Context as _;
use micro_core::config::ConfigLoader;
use micro_core::telemetry;
use shop::app::{self, ShopConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config: ShopConfig = ConfigLoader::new()
        .defaults(&ShopConfig::default())
        .file("shop.toml")
        .env_prefix("SHOP_")
        .load()?;
    let mut log = config.log.clone();
    if let Ok(filter) = std::env::var("RUST_LOG") {
        log.filter = filter;
    }
    telemetry::init(&log)?;

    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        [] => {}
        ["serve", service] => {
            let host = app::serve(&config, service)
                .await
                .with_context(|| format!("{service} could not start"))?;
            for (name, addr) in host.addrs() {
                println!("{name:<22} http://{addr}");
            }
            let report = host.run_until(micro_core::shutdown::signal()).await;
            if report.aborted_connections > 0 || !report.failed_hooks.is_empty() {
                tracing::warn!(?report, "{service} did not shut down cleanly");
            }
            return Ok(());
        }
        _ => {
            eprintln!(
                "usage: shop                    every service and the gateway in one process\n       \
                 shop serve <service>    one of: {}",
                app::SERVICES.join(", ")
            );
            std::process::exit(2);
        }
    }

    let shop = app::start(&config)
        .await
        .context("the shop could not start")?;
    for (service, addr) in shop.host.addrs() {
        println!("{service:<22} http://{addr}");
    }
    let gateway = shop.gateway();
    println!();
    println!("try:  curl http://{gateway}/api/products?q=coffee");
    println!("      curl -X POST http://{gateway}/api/carts/me/items -H 'x-user-id: alice' \\");
    println!("           -H 'content-type: application/json' -d '{{\"sku\": \"SKU-1001\", \"quantity\": 2}}'");
    println!("      curl -X POST http://{gateway}/api/orders -H 'x-user-id: alice' -H 'idempotency-key: 1' \\");
    println!("           -H 'content-type: application/json' -d '{{\"card_number\": \"4242424242424242\"}}'");
    println!("      curl http://{gateway}/api/orders -H 'x-user-id: alice'");
    println!("      curl http://{gateway}/metrics");
    println!("Ctrl-C stops the shop gracefully.");

    let report = shop.host.run_until(micro_core::shutdown::signal()).await;
    if report.aborted_connections > 0 || !report.failed_hooks.is_empty() {
        tracing::warn!(?report, "the shop did not shut down cleanly");
    }
    Ok(())
}
