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
//!
//! `shop loadgen --target http://127.0.0.1:8080 --users 10 --duration 30s [--smoke]` runs
//! weighted user journeys against a running shop and reports per journey.
//!
//! `shop --check <arguments>` says whether `shop <arguments>` would be accepted, without
//! reading the configuration or starting anything: it prints the command and exits 0, or
//! prints why not and the usage and exits 2 (as the command itself would). `shop --check
//! serve gateway` fails in a binary built without `real-servers`. The shop's tests run it
//! on every container command of the Kubernetes manifests.

use anyhow::Context as _;
use micro_core::config::ConfigLoader;
use micro_core::telemetry;
use shop::app::{self, ShopConfig};

/// What the arguments ask for.
#[derive(Debug)]
enum Command {
    /// Every service and the gateway in one process.
    All,
    /// One service, by its `shop serve` name.
    Serve(String),
    /// The load generator.
    Loadgen(shop::loadgen::LoadgenConfig),
}

/// The command `args` (after the program's name) ask for, or why it is refused.
fn parse(args: &[String]) -> Result<Command, String> {
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    match words.as_slice() {
        [] => Ok(Command::All),
        ["serve", service] => {
            if !app::SERVICES.contains(service) {
                return Err(format!(
                    "there is no service `{service}`; the shop has {}",
                    app::SERVICES.join(", ")
                ));
            }
            if !cfg!(feature = "real-servers") {
                let reason = "`shop serve` needs etcd and Kafka, and this binary was built \
                              without them: build it with `--features real-servers`";
                return Err(reason.to_owned());
            }
            Ok(Command::Serve((*service).to_owned()))
        }
        ["loadgen", rest @ ..] => {
            shop::loadgen::parse_args(rest.iter().map(|s| s.to_string())).map(Command::Loadgen)
        }
        _ => Err(format!("unknown arguments `{}`", words.join(" "))),
    }
}

fn usage() -> String {
    format!(
        "usage: shop                    every service and the gateway in one process\n       \
         shop serve <service>    one of: {}\n       \
         shop loadgen [--target URL] [--users N] [--duration 30s] [--smoke] [--seed N]\n       \
         shop --check <args...>  whether `shop <args...>` would be accepted",
        app::SERVICES.join(", ")
    )
}

/// The command, or the reason and the usage on stderr and exit code 2.
fn parse_or_exit(args: &[String]) -> Command {
    parse(args).unwrap_or_else(|reason| {
        eprintln!("shop: {reason}\n{}", usage());
        std::process::exit(2);
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--check") {
        let args = &args[1..];
        parse_or_exit(args);
        let words: Vec<&str> = std::iter::once("shop")
            .chain(args.iter().map(String::as_str))
            .collect();
        println!("{}: accepted", words.join(" "));
        return Ok(());
    }
    let command = parse_or_exit(&args);

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

    match command {
        Command::All => {}
        Command::Serve(service) => {
            let host = app::serve(&config, &service)
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
        Command::Loadgen(options) => {
            let report = shop::loadgen::run(&options).await?;
            println!("{report}");
            if options.smoke && report.unexpected_errors() > 0 {
                eprintln!(
                    "smoke run failed: {} unexpected errors",
                    report.unexpected_errors()
                );
                std::process::exit(1);
            }
            return Ok(());
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
    let json = "-H 'content-type: application/json'";
    println!("try:  curl http://{gateway}/api/products?q=coffee");
    println!(
        "      curl -X POST http://{gateway}/api/users/register {json} \\\n           \
         -d '{{\"email\": \"ada@example.com\", \"password\": \"correct horse\", \"name\": \"Ada\"}}'"
    );
    println!(
        "      curl -X POST http://{gateway}/api/users/login {json} \\\n           \
         -d '{{\"email\": \"ada@example.com\", \"password\": \"correct horse\"}}'"
    );
    println!("      then, with the token it answers, as -H 'authorization: Bearer <token>':");
    println!(
        "      curl -X POST http://{gateway}/api/carts/me/items {json} -d '{{\"sku\": \"SKU-1001\", \"quantity\": 2}}'"
    );
    println!(
        "      curl -X POST http://{gateway}/api/orders -H 'idempotency-key: 1' {json} \\\n           \
         -d '{{\"card_number\": \"4242424242424242\"}}'"
    );
    println!("      curl http://{gateway}/api/orders");
    println!("      curl http://{gateway}/metrics");
    println!("The tour of the shop is docs/src/shop.md.");
    println!("Ctrl-C stops the shop gracefully.");

    let report = shop.host.run_until(micro_core::shutdown::signal()).await;
    if report.aborted_connections > 0 || !report.failed_hooks.is_empty() {
        tracing::warn!(?report, "the shop did not shut down cleanly");
    }
    Ok(())
}
