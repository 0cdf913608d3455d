//! The whole shop assembled: every service on its own listener in one host, found by
//! name through the registry, and the gateway in front.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use micro_core::client::HttpClient;
use micro_core::host::{HostConfig, RunningHost, ServiceHost, ServiceHostBuilder};
use micro_core::service::Service;
use micro_core::telemetry::TelemetryConfig;
use micro_discovery::client::ServiceClient;
use micro_discovery::host::ServiceHostBuilderExt;
use micro_discovery::memory::MemoryRegistry;
use micro_discovery::{Discover, Instance, Registration, Registry};
use micro_gateway::config::{DeclarativeConfig, Resources};
use micro_gateway::reload::Reloadable;
use micro_saga::log::EmbeddedSagaLog;
use micro_saga::{MemorySagaLog, SagaLog};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

use micro_events::host::ServiceHostBuilderExt as _;
use micro_events::MemoryBus;

use crate::cart::Carts;
use crate::catalog::Catalog;
use crate::events::BusSink;
use crate::inventory::Inventory;
use crate::notification::Notifications;
use crate::order::{Orders, Upstreams};
use crate::payment::Payments;
use crate::store::Store;
use crate::user::Users;

/// The gateway configuration the shop ships with.
pub const GATEWAY_YAML: &str = include_str!("../config/gateway.yaml");

/// Everything the shop reads from configuration (`shop.toml`, `SHOP_` variables).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShopConfig {
    /// Logging, for the binary.
    pub log: TelemetryConfig,
    /// Shutdown timing.
    pub host: HostConfig,
    /// Where each service keeps its data; in memory when absent.
    pub data_dir: Option<PathBuf>,
    /// Where each service listens.
    pub listen: Listen,
    /// The gateway's configuration file; the built-in one when absent.
    pub gateway_config: Option<PathBuf>,
    /// How long the payment service's timeout test card makes a charge wait.
    #[serde(with = "micro_core::config::duration")]
    pub payment_hang: Duration,
    /// Units of each product in stock when the inventory starts empty.
    pub initial_stock: i64,
    /// The HS256 secret the user service signs tokens with and the gateway checks them
    /// with. Set your own (`SHOP_JWT_SECRET`) anywhere but on your machine.
    pub jwt_secret: String,
    /// How long a login token lives.
    #[serde(with = "micro_core::config::duration")]
    pub token_lifetime: Duration,
}

/// Where each service listens; port 0 picks a free port.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Listen {
    /// The gateway, 8080.
    pub gateway: SocketAddr,
    /// The user service, 8001.
    pub user: SocketAddr,
    /// The product service, 8002.
    pub product: SocketAddr,
    /// The order service, 8003.
    pub order: SocketAddr,
    /// The cart service, 8004.
    pub cart: SocketAddr,
    /// The payment service, 8005.
    pub payment: SocketAddr,
    /// The inventory service, 8006.
    pub inventory: SocketAddr,
    /// The notification service, 8007.
    pub notification: SocketAddr,
}

impl Default for Listen {
    fn default() -> Self {
        let at = |port| SocketAddr::from(([127, 0, 0, 1], port));
        Self {
            gateway: at(8080),
            user: at(8001),
            product: at(8002),
            order: at(8003),
            cart: at(8004),
            payment: at(8005),
            inventory: at(8006),
            notification: at(8007),
        }
    }
}

impl Listen {
    /// Every service on a free loopback port, for tests.
    pub fn ephemeral() -> Self {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        Self {
            gateway: any,
            user: any,
            product: any,
            order: any,
            cart: any,
            payment: any,
            inventory: any,
            notification: any,
        }
    }
}

impl Default for ShopConfig {
    fn default() -> Self {
        Self {
            log: TelemetryConfig::default(),
            host: HostConfig::default(),
            data_dir: Some(PathBuf::from("target/shop-data")),
            listen: Listen::default(),
            gateway_config: None,
            payment_hang: Duration::from_secs(30),
            initial_stock: 100,
            jwt_secret: "micro-shop-development-secret-change-me".to_owned(),
            token_lifetime: Duration::from_secs(3600),
        }
    }
}

/// The running shop, with handles on its services for checks.
#[derive(Debug)]
pub struct Shop {
    /// The host running every service.
    pub host: RunningHost,
    /// The order service.
    pub orders: Orders,
    /// The inventory service.
    pub inventory: Inventory,
    /// The payment service.
    pub payments: Payments,
    /// The notification service.
    pub notifications: Notifications,
    /// The registry the services are found in.
    pub registry: MemoryRegistry,
    /// The event bus.
    pub bus: MemoryBus,
}

impl Shop {
    /// The gateway's address.
    pub fn gateway(&self) -> SocketAddr {
        self.host
            .local_addr("gateway")
            .expect("the shop hosts a gateway")
    }
}

/// The gateway as a hosted service.
struct GatewayService(Router);

impl Service for GatewayService {
    fn name(&self) -> &str {
        "gateway"
    }

    fn router(&self) -> Router {
        self.0.clone()
    }
}

fn store(config: &ShopConfig, service: &str) -> anyhow::Result<Store> {
    match &config.data_dir {
        Some(dir) => Store::open(&dir.join(format!("{service}.redb"))),
        None => Store::in_memory(),
    }
}

/// The order sagas' log: a redb file beside the order store, so that a process killed
/// mid-checkout finishes its sagas when it starts again; in memory without a data dir.
fn saga_log(config: &ShopConfig) -> anyhow::Result<Arc<dyn SagaLog>> {
    Ok(match &config.data_dir {
        Some(dir) => Arc::new(EmbeddedSagaLog::open(dir.join("order-sagas.redb"))?),
        None => Arc::new(MemorySagaLog::new()),
    })
}

/// The gateway's YAML with the token secret put in.
pub fn gateway_yaml(config: &ShopConfig) -> anyhow::Result<String> {
    let yaml = match &config.gateway_config {
        Some(path) => {
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
        }
        None => GATEWAY_YAML.to_owned(),
    };
    Ok(yaml.replace("${JWT_SECRET}", &config.jwt_secret))
}

/// Binds `addr`, adds `service` on it, and registers it in `registry` once ready.
async fn hosted<S: Service>(
    builder: ServiceHostBuilder,
    registry: &MemoryRegistry,
    service: S,
    addr: SocketAddr,
) -> anyhow::Result<ServiceHostBuilder> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("{} cannot listen on {addr}", service.name()))?;
    let bound = listener.local_addr()?;
    let instance = Instance::from_addr(service.name(), bound).with_version(service.version());
    let registry: Arc<dyn Registry> = Arc::new(registry.clone());
    Ok(builder
        .service_on(service, listener)
        .register_in(registry, Registration::new(instance)))
}

fn client(discover: &Arc<dyn Discover>, service: &str) -> anyhow::Result<HttpClient> {
    Ok(ServiceClient::builder(discover.clone(), service)
        .configure(|builder| builder.timeout(Duration::from_secs(5)))
        .build()?
        .into_http())
}

/// Starts every service and the gateway.
pub async fn start(config: &ShopConfig) -> anyhow::Result<Shop> {
    let registry = MemoryRegistry::new();
    let bus = MemoryBus::new();
    let discover: Arc<dyn Discover> = Arc::new(registry.clone());
    let catalog = Catalog::seeded();
    let initial: BTreeMap<String, i64> = catalog
        .products()
        .iter()
        .map(|p| (p.id.clone(), config.initial_stock))
        .collect();
    let inventory = Inventory::new(store(config, "inventory")?, &initial)?;
    let payments = Payments::new(store(config, "payment")?, config.payment_hang);
    let notifications = Notifications::new(store(config, "notification")?);
    let carts = Carts::new(
        store(config, "cart")?,
        client(&discover, "product-service")?,
    );
    let upstreams = Upstreams {
        carts: client(&discover, "cart-service")?,
        payments: client(&discover, "payment-service")?,
        inventory: client(&discover, "inventory-service")?,
    };
    let orders = Orders::new(
        store(config, "order")?,
        saga_log(config)?,
        upstreams,
        Arc::new(BusSink::new(Arc::new(bus.clone()))),
    )?;
    let notified = notifications.subscribe(&bus).await?;

    let users = Users::new(
        store(config, "user")?,
        &config.jwt_secret,
        config.token_lifetime,
    );
    let gateway = DeclarativeConfig::from_yaml(&gateway_yaml(config)?)?
        .build_with(&Resources::new().discover(discover.clone()))?;
    let gateway = GatewayService(Reloadable::new(gateway).into_router());

    let listen = &config.listen;
    let mut builder = ServiceHost::builder().config(config.host.clone());
    builder = hosted(builder, &registry, users, listen.user).await?;
    builder = hosted(builder, &registry, catalog, listen.product).await?;
    builder = hosted(builder, &registry, inventory.clone(), listen.inventory).await?;
    builder = hosted(builder, &registry, payments.clone(), listen.payment).await?;
    builder = hosted(
        builder,
        &registry,
        notifications.clone(),
        listen.notification,
    )
    .await?;
    builder = hosted(builder, &registry, carts, listen.cart).await?;
    builder = hosted(builder, &registry, orders.clone(), listen.order).await?;
    builder = hosted(builder, &registry, gateway, listen.gateway).await?;
    let host = builder.subscription(notified).build()?.start().await?;
    Ok(Shop {
        host,
        orders,
        inventory,
        payments,
        notifications,
        registry,
        bus,
    })
}
