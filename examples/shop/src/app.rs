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
use micro_gateway::reload::{ConfigWatcher, Reloadable};
use micro_saga::log::EmbeddedSagaLog;
use micro_saga::{MemorySagaLog, SagaLog};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

use micro_events::host::ServiceHostBuilderExt as _;
use micro_events::{MemoryBus, Publisher, Subscriber};

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
    /// etcd endpoints, comma-separated (`http://127.0.0.1:2379`): where the services of
    /// `shop serve` register and find each other. Needs the `real-servers` feature.
    pub etcd_endpoints: Option<String>,
    /// The key prefix of the shop's registrations in etcd.
    pub etcd_prefix: String,
    /// Kafka bootstrap servers (`127.0.0.1:9092`): the event bus of `shop serve`. Needs
    /// the `real-servers` feature.
    pub kafka_brokers: Option<String>,
    /// The host other services reach this process at, registered in discovery (a pod's
    /// IP, say); the address each service bound when absent.
    pub advertise_host: Option<String>,
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
            etcd_endpoints: None,
            etcd_prefix: "/micro/shop/".to_owned(),
            kafka_brokers: None,
            advertise_host: None,
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
/// The gateway as a hosted service; it follows its configuration file, when it has one.
struct GatewayService {
    router: Router,
    watcher: std::sync::Mutex<Option<ConfigWatcher>>,
    watching: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Service for GatewayService {
    fn name(&self) -> &str {
        "gateway"
    }

    fn router(&self) -> Router {
        self.router.clone()
    }

    async fn start(&self) -> Result<(), micro_core::error::BoxError> {
        let watcher = self
            .watcher
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(watcher) = watcher {
            let task = tokio::spawn(watcher.run(Duration::from_secs(2)));
            *self.watching.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
        }
        Ok(())
    }

    async fn stop(&self) -> Result<(), micro_core::error::BoxError> {
        if let Some(task) = self
            .watching
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            task.abort();
        }
        Ok(())
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
    registry: &Arc<dyn Registry>,
    service: S,
    addr: SocketAddr,
    advertise: Option<&str>,
) -> anyhow::Result<ServiceHostBuilder> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("{} cannot listen on {addr}", service.name()))?;
    let bound = listener.local_addr()?;
    let instance = match advertise {
        Some(host) => Instance::new(
            service.name(),
            format!("{}-{host}-{}", service.name(), bound.port()),
            host,
            bound.port(),
        ),
        None => Instance::from_addr(service.name(), bound),
    }
    .with_version(service.version());
    let registration = Registration::new(instance).ttl(Duration::from_secs(10));
    Ok(builder
        .service_on(service, listener)
        .register_in(registry.clone(), registration))
}

fn client(discover: &Arc<dyn Discover>, service: &str) -> anyhow::Result<HttpClient> {
    Ok(ServiceClient::builder(discover.clone(), service)
        .configure(|builder| builder.timeout(Duration::from_secs(5)))
        .build()?
        .into_http())
}

/// Where the services find each other and send their events.
struct Infra {
    registry: Arc<dyn Registry>,
    discover: Arc<dyn Discover>,
    publisher: Arc<dyn Publisher>,
    subscriber: Arc<dyn Subscriber>,
}

impl Infra {
    fn embedded(registry: &MemoryRegistry, bus: &MemoryBus) -> Self {
        Self {
            registry: Arc::new(registry.clone()),
            discover: Arc::new(registry.clone()),
            publisher: Arc::new(bus.clone()),
            subscriber: Arc::new(bus.clone()),
        }
    }

    /// etcd and Kafka, as configured, for `shop serve`.
    #[cfg(feature = "real-servers")]
    async fn real(config: &ShopConfig) -> anyhow::Result<Self> {
        use micro_discovery::etcd::{EtcdConfig, EtcdRegistry};
        use micro_events::kafka::{KafkaBus, KafkaConfig};
        let (Some(endpoints), Some(brokers)) = (&config.etcd_endpoints, &config.kafka_brokers)
        else {
            anyhow::bail!("`shop serve` needs SHOP_ETCD_ENDPOINTS and SHOP_KAFKA_BROKERS");
        };
        let mut etcd = EtcdConfig::new(endpoints.split(',').map(str::trim));
        etcd.prefix = config.etcd_prefix.clone();
        let registry = EtcdRegistry::connect(&etcd).await?;
        let bus = KafkaBus::new(KafkaConfig::new(brokers.as_str()))?;
        bus.create_topic(crate::events::ORDER_EVENTS, 4, 1).await?;
        Ok(Self {
            registry: Arc::new(registry.clone()),
            discover: Arc::new(registry),
            publisher: Arc::new(bus.clone()),
            subscriber: Arc::new(bus),
        })
    }

    #[cfg(not(feature = "real-servers"))]
    async fn real(_config: &ShopConfig) -> anyhow::Result<Self> {
        anyhow::bail!(
            "`shop serve` needs etcd and Kafka: build the shop with `--features real-servers`"
        )
    }
}

/// The services of the shop, by the name `shop serve` knows them.
pub const SERVICES: &[&str] = &[
    "user",
    "product",
    "order",
    "cart",
    "payment",
    "inventory",
    "notification",
    "gateway",
];

/// Adds the service called `name` to `builder`, built over `infra`.
async fn add(
    builder: ServiceHostBuilder,
    name: &str,
    config: &ShopConfig,
    infra: &Infra,
) -> anyhow::Result<ServiceHostBuilder> {
    let listen = &config.listen;
    let registry = &infra.registry;
    let discover = &infra.discover;
    Ok(match name {
        "user" => {
            let users = Users::new(
                store(config, "user")?,
                &config.jwt_secret,
                config.token_lifetime,
            );
            hosted(
                builder,
                registry,
                users,
                listen.user,
                config.advertise_host.as_deref(),
            )
            .await?
        }
        "product" => {
            hosted(
                builder,
                registry,
                Catalog::seeded(),
                listen.product,
                config.advertise_host.as_deref(),
            )
            .await?
        }
        "inventory" => {
            let initial: BTreeMap<String, i64> = Catalog::seeded()
                .products()
                .iter()
                .map(|p| (p.id.clone(), config.initial_stock))
                .collect();
            let inventory = Inventory::new(store(config, "inventory")?, &initial)?;
            hosted(
                builder,
                registry,
                inventory,
                listen.inventory,
                config.advertise_host.as_deref(),
            )
            .await?
        }
        "payment" => {
            let payments = Payments::new(store(config, "payment")?, config.payment_hang);
            hosted(
                builder,
                registry,
                payments,
                listen.payment,
                config.advertise_host.as_deref(),
            )
            .await?
        }
        "notification" => {
            let notifications = Notifications::new(store(config, "notification")?);
            let subscription = notifications.subscribe(infra.subscriber.as_ref()).await?;
            hosted(
                builder,
                registry,
                notifications,
                listen.notification,
                config.advertise_host.as_deref(),
            )
            .await?
            .subscription(subscription)
        }
        "cart" => {
            let carts = Carts::new(store(config, "cart")?, client(discover, "product-service")?);
            hosted(
                builder,
                registry,
                carts,
                listen.cart,
                config.advertise_host.as_deref(),
            )
            .await?
        }
        "order" => {
            let upstreams = Upstreams {
                carts: client(discover, "cart-service")?,
                payments: client(discover, "payment-service")?,
                inventory: client(discover, "inventory-service")?,
            };
            let orders = Orders::new(
                store(config, "order")?,
                saga_log(config)?,
                upstreams,
                Arc::new(BusSink::new(infra.publisher.clone())),
            )?;
            hosted(
                builder,
                registry,
                orders,
                listen.order,
                config.advertise_host.as_deref(),
            )
            .await?
        }
        "gateway" => {
            let resources = Resources::new().discover(discover.clone());
            let gateway =
                DeclarativeConfig::from_yaml(&gateway_yaml(config)?)?.build_with(&resources)?;
            let reloadable = Reloadable::new(gateway);
            // A file given in the configuration is followed: a changed file is applied
            // without closing a connection, with the same secret filled in.
            let watcher = config.gateway_config.as_ref().map(|path| {
                let secret = config.jwt_secret.clone();
                ConfigWatcher::new(path, resources, reloadable.clone())
                    .preprocess(move |text| text.replace("${JWT_SECRET}", &secret))
            });
            let gateway = GatewayService {
                router: reloadable.into_router(),
                watcher: std::sync::Mutex::new(watcher),
                watching: std::sync::Mutex::new(None),
            };
            hosted(
                builder,
                registry,
                gateway,
                listen.gateway,
                config.advertise_host.as_deref(),
            )
            .await?
        }
        other => anyhow::bail!(
            "there is no service `{other}`; the shop has {}",
            SERVICES.join(", ")
        ),
    })
}

/// Runs one service of the shop in this process (`shop serve <name>`), finding the others
/// in etcd and publishing and consuming events on Kafka.
pub async fn serve(config: &ShopConfig, name: &str) -> anyhow::Result<RunningHost> {
    if !SERVICES.contains(&name) {
        anyhow::bail!(
            "there is no service `{name}`; the shop has {}",
            SERVICES.join(", ")
        );
    }
    let infra = Infra::real(config).await?;
    let builder = ServiceHost::builder().config(config.host.clone());
    let builder = add(builder, name, config, &infra).await?;
    Ok(builder.build()?.start().await?)
}

/// Starts every service and the gateway in this process, on embedded defaults.
pub async fn start(config: &ShopConfig) -> anyhow::Result<Shop> {
    let registry = MemoryRegistry::new();
    let bus = MemoryBus::new();
    let infra = Infra::embedded(&registry, &bus);
    let discover = &infra.discover;
    let catalog = Catalog::seeded();
    let initial: BTreeMap<String, i64> = catalog
        .products()
        .iter()
        .map(|p| (p.id.clone(), config.initial_stock))
        .collect();
    let inventory = Inventory::new(store(config, "inventory")?, &initial)?;
    let payments = Payments::new(store(config, "payment")?, config.payment_hang);
    let notifications = Notifications::new(store(config, "notification")?);
    let upstreams = Upstreams {
        carts: client(discover, "cart-service")?,
        payments: client(discover, "payment-service")?,
        inventory: client(discover, "inventory-service")?,
    };
    let orders = Orders::new(
        store(config, "order")?,
        saga_log(config)?,
        upstreams,
        Arc::new(BusSink::new(infra.publisher.clone())),
    )?;
    let notified = notifications.subscribe(&bus).await?;

    let listen = &config.listen;
    let registry_dyn = &infra.registry;
    let mut builder = ServiceHost::builder().config(config.host.clone());
    builder = add(builder, "user", config, &infra).await?;
    builder = add(builder, "product", config, &infra).await?;
    builder = hosted(
        builder,
        registry_dyn,
        inventory.clone(),
        listen.inventory,
        config.advertise_host.as_deref(),
    )
    .await?;
    builder = hosted(
        builder,
        registry_dyn,
        payments.clone(),
        listen.payment,
        config.advertise_host.as_deref(),
    )
    .await?;
    builder = hosted(
        builder,
        registry_dyn,
        notifications.clone(),
        listen.notification,
        config.advertise_host.as_deref(),
    )
    .await?;
    builder = add(builder, "cart", config, &infra).await?;
    builder = hosted(
        builder,
        registry_dyn,
        orders.clone(),
        listen.order,
        config.advertise_host.as_deref(),
    )
    .await?;
    builder = add(builder, "gateway", config, &infra).await?;
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
