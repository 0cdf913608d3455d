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
use micro_core::grpc::GrpcChannel;
use micro_core::host::{HostConfig, RunningHost, ServiceHost, ServiceHostBuilder};
use micro_core::identity::KeyRing;
use micro_core::resilience::{ResiliencePolicy, RetryConfig};
use micro_core::service::Service;
use micro_core::telemetry::TelemetryConfig;
use micro_discovery::client::ServiceClient;
use micro_discovery::grpc::GrpcClient;
use micro_discovery::host::ServiceHostBuilderExt;
use micro_discovery::identity::ProvenOnly;
use micro_discovery::memory::MemoryRegistry;
use micro_discovery::{Discover, Instance, Registration, Registry};
use micro_gateway::config::{DeclarativeConfig, Resources};
use micro_gateway::reload::{ConfigWatcher, Reloadable};
use micro_saga::log::EmbeddedSagaLog;
use micro_saga::{MemorySagaLog, SagaLog};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

use micro_events::host::ServiceHostBuilderExt as _;
use micro_events::identity::SignedPublisher;
use micro_events::{MemoryBus, Publisher, Subscriber};

use crate::cart::{CartStore, Carts};
use crate::catalog::Catalog;
use crate::events::BusSink;
use crate::inventory::Inventory;
use crate::notification::Notifications;
use crate::order::{Ledger, Orders, Upstreams};
use crate::payment::Payments;
use crate::store::Store;
use crate::trust::{self, KeysFile, SecretString, Verified};
use crate::user::{UserStore, Users};

/// The `jwt_secret` of the one-process mode on your machine, refused by `shop serve`.
const DEVELOPMENT_JWT_SECRET: &str = "micro-shop-development-secret-change-me";

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
    /// A fault for demos and tests: the inventory service refuses every release of
    /// stock (`503`), as if it were down for them, so that cancels wait in `CANCELLING`
    /// until an inventory without it runs. Off by default.
    pub inventory_refuses_releases: bool,
    /// The HS256 secret the user service signs tokens with and the gateway checks them
    /// with. Set your own (`SHOP_JWT_SECRET`) anywhere but on your machine: `shop serve`
    /// refuses the built-in one.
    pub jwt_secret: SecretString,
    /// The HMAC key the services sign their calls to each other with
    /// (`SHOP_IDENTITY_SECRET`, at least 32 bytes). `shop serve` needs it (or
    /// `identity_keys_file`); the one-process mode makes one at random when absent.
    pub identity_secret: Option<SecretString>,
    /// A file of service keys, one `<key id> <secret>` per line, the first signing
    /// (see [`KeysFile`]); followed while the shop runs, so keys
    /// rotate without a restart. Takes the place of `identity_secret`.
    pub identity_keys_file: Option<PathBuf>,
    /// PBKDF2-HMAC-SHA256 iterations for new password hashes (OWASP asks 600,000);
    /// hashes made with fewer are upgraded at the user's next login.
    pub password_iterations: u32,
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
    /// How long a silent member of the shop's consumer groups keeps its partitions
    /// (Kafka's `session.timeout.ms`, default 45 s): after a consumer crashes, its
    /// partitions wait this long before its restarted successor gets them.
    #[serde(with = "micro_core::config::duration")]
    pub kafka_session_timeout: Duration,
    /// How long a member of the shop's consumer groups may go between polls, and how
    /// long a rebalance waits for the members to rejoin (Kafka's
    /// `max.poll.interval.ms`, default 300 s): a crashed member the broker no longer
    /// times out by its session (tansu after a restart) holds a rebalance this long.
    #[serde(with = "micro_core::config::duration")]
    pub kafka_max_poll_interval: Duration,
    /// PostgreSQL (`postgres://user@host/db`): where the order service keeps its orders,
    /// outbox and saga log. Needs the `real-servers` feature.
    pub postgres_url: Option<String>,
    /// The prefix of the services' schemas in PostgreSQL: users in `<prefix>_users`,
    /// products in `<prefix>_products`, orders and their outbox in `<prefix>_orders`,
    /// order sagas in `<prefix>_order_sagas`.
    pub postgres_schema: String,
    /// Redis (`redis://127.0.0.1:6379`): where the cart service keeps carts, in both
    /// modes; its embedded store when absent.
    pub redis_url: Option<String>,
    /// Put before the cart service's Redis keys.
    pub redis_prefix: String,
    /// Put before the event topic and consumer group names (`order-events`,
    /// `notification-service`), so that several shops can share one broker.
    pub event_prefix: String,
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
    /// Each service's name with where it listens, the gateway first.
    pub fn each(&self) -> [(&'static str, SocketAddr); 8] {
        [
            ("gateway", self.gateway),
            ("user", self.user),
            ("product", self.product),
            ("order", self.order),
            ("cart", self.cart),
            ("payment", self.payment),
            ("inventory", self.inventory),
            ("notification", self.notification),
        ]
    }

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

impl ShopConfig {
    /// The topic of order events, with the configured prefix.
    pub fn order_events(&self) -> String {
        format!("{}{}", self.event_prefix, crate::events::ORDER_EVENTS)
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
            inventory_refuses_releases: false,
            jwt_secret: SecretString::new(DEVELOPMENT_JWT_SECRET),
            identity_secret: None,
            identity_keys_file: None,
            password_iterations: crate::user::OWASP_ITERATIONS,
            token_lifetime: Duration::from_secs(3600),
            etcd_endpoints: None,
            etcd_prefix: "/micro/shop/".to_owned(),
            kafka_brokers: None,
            kafka_session_timeout: Duration::from_secs(45),
            kafka_max_poll_interval: Duration::from_secs(300),
            advertise_host: None,
            event_prefix: String::new(),
            postgres_url: None,
            postgres_schema: "shop".to_owned(),
            redis_url: None,
            redis_prefix: "shop:".to_owned(),
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

/// Where the order service keeps its orders, outbox and saga log: PostgreSQL when
/// configured; else its embedded store with the saga log in a redb file beside it (so a
/// process killed mid-checkout finishes its sagas when it starts again), or in memory
/// without a data dir.
async fn order_storage(
    config: &ShopConfig,
    infra: &Infra,
) -> anyhow::Result<(Ledger, Arc<dyn SagaLog>)> {
    if let Some(url) = &config.postgres_url {
        return postgres_order_storage(config, infra, url).await;
    }
    let sink = Arc::new(BusSink::new(infra.order_publisher(), config.order_events()));
    let ledger = Ledger::embedded(store(config, "order")?, sink);
    let sagas: Arc<dyn SagaLog> = match &config.data_dir {
        Some(dir) => Arc::new(EmbeddedSagaLog::open(dir.join("order-sagas.redb"))?),
        None => Arc::new(MemorySagaLog::new()),
    };
    Ok((ledger, sagas))
}

#[cfg(feature = "real-servers")]
async fn postgres_order_storage(
    config: &ShopConfig,
    infra: &Infra,
    url: &str,
) -> anyhow::Result<(Ledger, Arc<dyn SagaLog>)> {
    let prefix = &config.postgres_schema;
    // One pool for the orders, their outbox and relay, and the saga log: one readiness
    // check covers them all.
    let pool = crate::store::postgres::pool(url, "order-service")?;
    let ledger = Ledger::postgres(
        pool.clone(),
        &format!("{prefix}_orders"),
        infra.order_publisher(),
        config.order_events(),
    )
    .await?;
    let sagas =
        micro_saga::log::PostgresSagaLog::with_schema(pool, format!("{prefix}_order_sagas"))?;
    sagas.install().await?;
    Ok((ledger, Arc::new(sagas)))
}

#[cfg(feature = "real-servers")]
async fn user_store_in_postgres(config: &ShopConfig, url: &str) -> anyhow::Result<UserStore> {
    UserStore::postgres(url, &format!("{}_users", config.postgres_schema)).await
}

#[cfg(feature = "real-servers")]
async fn catalog_in_postgres(config: &ShopConfig, url: &str) -> anyhow::Result<Catalog> {
    let schema = format!("{}_products", config.postgres_schema);
    Catalog::in_postgres(url, &schema, &Catalog::seeded()).await
}

#[cfg(not(feature = "real-servers"))]
async fn catalog_in_postgres(_config: &ShopConfig, _url: &str) -> anyhow::Result<Catalog> {
    anyhow::bail!("the catalog in PostgreSQL needs the shop built with `--features real-servers`")
}

#[cfg(not(feature = "real-servers"))]
async fn user_store_in_postgres(_config: &ShopConfig, _url: &str) -> anyhow::Result<UserStore> {
    anyhow::bail!("users in PostgreSQL need the shop built with `--features real-servers`")
}

#[cfg(not(feature = "real-servers"))]
async fn postgres_order_storage(
    _config: &ShopConfig,
    _infra: &Infra,
    _url: &str,
) -> anyhow::Result<(Ledger, Arc<dyn SagaLog>)> {
    anyhow::bail!("orders in PostgreSQL need the shop built with `--features real-servers`")
}

/// The gateway's YAML with the token secret put in.
pub fn gateway_yaml(config: &ShopConfig) -> anyhow::Result<String> {
    let yaml = match &config.gateway_config {
        Some(path) => {
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
        }
        None => GATEWAY_YAML.to_owned(),
    };
    Ok(yaml.replace("${JWT_SECRET}", config.jwt_secret.expose()))
}

/// Binds `addr`, adds `service` on it, and registers it in the registry once ready, at
/// the advertised host when there is one.
async fn hosted<S: Service>(
    builder: ServiceHostBuilder,
    infra: &Infra,
    config: &ShopConfig,
    service: S,
    addr: SocketAddr,
) -> anyhow::Result<ServiceHostBuilder> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("{} cannot listen on {addr}", service.name()))?;
    let bound = listener.local_addr()?;
    let instance = match config.advertise_host.as_deref() {
        Some(host) => Instance::new(
            service.name(),
            format!("{}-{host}-{}", service.name(), bound.port()),
            host,
            bound.port(),
        ),
        None => Instance::from_addr(service.name(), bound),
    }
    .with_version(service.version());
    // The registration proves which service made it: the others find only proven
    // instances, so a rogue registration under this name draws no traffic.
    let instance = micro_discovery::identity::prove(instance, &infra.keys)?;
    let registration = Registration::new(instance).ttl(Duration::from_secs(10));
    let builder = if service.name() == trust::GATEWAY {
        // The public face: callers are checked by its own plugins (JWT), not by tokens.
        builder.service_on(service, listener)
    } else {
        builder.service_on(Verified::new(service, infra.keys.clone()), listener)
    };
    Ok(builder.register_in(infra.registry.clone(), registration))
}

/// A client of the service `to` found in discovery, signing each call as `from`.
fn client(infra: &Infra, from: &str, to: &str) -> anyhow::Result<HttpClient> {
    Ok(ServiceClient::builder(infra.discover.clone(), to)
        .configure(|builder| builder.timeout(Duration::from_secs(5)))
        .sign_as(infra.keys.clone(), from)
        .build()?
        .into_http())
}

/// A gRPC channel to the service `to` found in discovery, signing each call as `from`;
/// the product service's reads are idempotent, so they are retried on another instance.
fn grpc_client(infra: &Infra, from: &str, to: &str) -> anyhow::Result<GrpcChannel> {
    let client = GrpcClient::builder(infra.discover.clone(), to)
        .idempotent(crate::product_grpc::SERVICE)
        .policy(ResiliencePolicy::new().retry(RetryConfig::new().max_attempts(3)))
        .timeout(Duration::from_secs(5))
        .sign_as(infra.keys.clone(), from)
        .build()
        .map_err(|error| anyhow::anyhow!("the grpc client of {to}: {error}"))?;
    Ok(client.channel())
}

/// Where the services find each other and send their events.
struct Infra {
    keys: KeyRing,
    registry: Arc<dyn Registry>,
    discover: Arc<dyn Discover>,
    publisher: Arc<dyn Publisher>,
    subscriber: Arc<dyn Subscriber>,
}

impl Infra {
    /// The order service's publisher: every event it publishes carries its signed
    /// identity, which the consumers check.
    fn order_publisher(&self) -> Arc<dyn Publisher> {
        Arc::new(SignedPublisher::new(
            self.publisher.clone(),
            self.keys.clone(),
            trust::ORDER_SERVICE,
        ))
    }

    fn embedded(registry: &MemoryRegistry, bus: &MemoryBus, keys: KeyRing) -> Self {
        Self {
            discover: Arc::new(ProvenOnly::new(registry.clone(), keys.clone())),
            keys,
            registry: Arc::new(registry.clone()),
            publisher: Arc::new(bus.clone()),
            subscriber: Arc::new(bus.clone()),
        }
    }

    /// etcd and Kafka, as configured, for `shop serve`.
    #[cfg(feature = "real-servers")]
    async fn real(config: &ShopConfig, keys: KeyRing) -> anyhow::Result<Self> {
        use micro_discovery::etcd::{EtcdConfig, EtcdRegistry};
        use micro_events::kafka::{KafkaBus, KafkaConfig};
        let (Some(endpoints), Some(brokers)) = (&config.etcd_endpoints, &config.kafka_brokers)
        else {
            anyhow::bail!("`shop serve` needs SHOP_ETCD_ENDPOINTS and SHOP_KAFKA_BROKERS");
        };
        let mut etcd = EtcdConfig::new(endpoints.split(',').map(str::trim));
        etcd.prefix = config.etcd_prefix.clone();
        let registry = EtcdRegistry::connect(&etcd).await?;
        let bus = KafkaBus::new(
            KafkaConfig::new(brokers.as_str())
                .session_timeout(config.kafka_session_timeout)
                .max_poll_interval(config.kafka_max_poll_interval),
        )?;
        // Kafka brokers need not create topics on first use; the dead-letter topic
        // too, or a dead letter would hold its partition up until someone made it.
        bus.create_topic(&config.order_events(), 4, 1).await?;
        bus.create_topic(&format!("{}.dlq", config.order_events()), 4, 1)
            .await?;
        Ok(Self {
            discover: Arc::new(ProvenOnly::new(registry.clone(), keys.clone())),
            keys,
            registry: Arc::new(registry),
            publisher: Arc::new(bus.clone()),
            subscriber: Arc::new(bus),
        })
    }

    #[cfg(not(feature = "real-servers"))]
    async fn real(_config: &ShopConfig, _keys: KeyRing) -> anyhow::Result<Self> {
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

/// Handles on the services that were built, for checks.
#[derive(Default)]
struct Handles {
    orders: Option<Orders>,
    inventory: Option<Inventory>,
    payments: Option<Payments>,
    notifications: Option<Notifications>,
}

/// Adds the service called `name` to `builder`, built over `infra`.
async fn add(
    builder: ServiceHostBuilder,
    name: &str,
    config: &ShopConfig,
    infra: &Infra,
    handles: &mut Handles,
) -> anyhow::Result<ServiceHostBuilder> {
    let listen = &config.listen;
    Ok(match name {
        "user" => {
            let users_store = match &config.postgres_url {
                Some(url) => user_store_in_postgres(config, url).await?,
                None => UserStore::Embedded(store(config, "user")?),
            };
            let users = Users::new(
                users_store,
                config.jwt_secret.expose(),
                config.token_lifetime,
            )
            .password_iterations(config.password_iterations);
            hosted(builder, infra, config, users, listen.user).await?
        }
        "product" => {
            let catalog = match &config.postgres_url {
                Some(url) => catalog_in_postgres(config, url).await?,
                None => Catalog::seeded(),
            };
            hosted(builder, infra, config, catalog, listen.product).await?
        }
        "inventory" => {
            let initial: BTreeMap<String, i64> = Catalog::seeded()
                .products()
                .iter()
                .map(|p| (p.id.clone(), config.initial_stock))
                .collect();
            let inventory = Inventory::new(store(config, "inventory")?, &initial)?
                .refusing_releases(config.inventory_refuses_releases);
            handles.inventory = Some(inventory.clone());
            hosted(builder, infra, config, inventory, listen.inventory).await?
        }
        "payment" => {
            let payments = Payments::new(store(config, "payment")?, config.payment_hang);
            handles.payments = Some(payments.clone());
            hosted(builder, infra, config, payments, listen.payment).await?
        }
        "notification" => {
            let notifications = Notifications::new(store(config, "notification")?);
            let group = format!("{}notification-service", config.event_prefix);
            let subscription = notifications
                .subscribe(
                    infra.subscriber.as_ref(),
                    &config.order_events(),
                    &group,
                    infra.keys.clone(),
                )
                .await?;
            handles.notifications = Some(notifications.clone());
            hosted(builder, infra, config, notifications, listen.notification)
                .await?
                .subscription(subscription)
        }
        "cart" => {
            let carts_store = match &config.redis_url {
                Some(url) => CartStore::redis(url, config.redis_prefix.clone()).await?,
                None => CartStore::Embedded(store(config, "cart")?),
            };
            let carts = Carts::new(
                carts_store,
                grpc_client(infra, "cart-service", "product-service")?,
            );
            hosted(builder, infra, config, carts, listen.cart).await?
        }
        "order" => {
            let upstreams = Upstreams {
                carts: client(infra, trust::ORDER_SERVICE, "cart-service")?,
                payments: client(infra, trust::ORDER_SERVICE, "payment-service")?,
                inventory: client(infra, trust::ORDER_SERVICE, "inventory-service")?,
            };
            let (ledger, sagas) = order_storage(config, infra).await?;
            let orders = Orders::new(ledger, sagas, upstreams)?;
            handles.orders = Some(orders.clone());
            hosted(builder, infra, config, orders, listen.order).await?
        }
        "gateway" => {
            let resources = Resources::new()
                .discover(infra.discover.clone())
                .identity(infra.keys.clone(), trust::GATEWAY);
            let gateway =
                DeclarativeConfig::from_yaml(&gateway_yaml(config)?)?.build_with(&resources)?;
            let reloadable = Reloadable::new(gateway);
            // A file given in the configuration is followed: a changed file is applied
            // without closing a connection, with the same secret filled in.
            let watcher = config.gateway_config.as_ref().map(|path| {
                let secret = config.jwt_secret.expose().to_owned();
                ConfigWatcher::new(path, resources, reloadable.clone())
                    .preprocess(move |text| text.replace("${JWT_SECRET}", &secret))
            });
            let gateway = GatewayService {
                router: reloadable.into_router(),
                watcher: std::sync::Mutex::new(watcher),
                watching: std::sync::Mutex::new(None),
            };
            hosted(builder, infra, config, gateway, listen.gateway).await?
        }
        other => anyhow::bail!(
            "there is no service `{other}`; the shop has {}",
            SERVICES.join(", ")
        ),
    })
}

/// The services that sign (user) or verify (gateway) the clients' tokens with `jwt_secret`.
const SIGNS_OR_CHECKS_TOKENS: [&str; 2] = ["user", "gateway"];

/// Refuses a `jwt_secret` that anyone could guess: the built-in development default (it is
/// in the repository), anything shorter than 32 bytes, or a known placeholder. Only the
/// one-process mode on loopback (`cargo run -p shop`) runs with the default; `when` says
/// why this one may not (" outside the one-process mode", say).
fn check_jwt_secret(secret: &str, when: &str) -> anyhow::Result<()> {
    trust::secret_setting("jwt_secret", "SHOP_JWT_SECRET", when, secret)?;
    Ok(())
}

/// The services' key ring from `identity_keys_file` (followed while the process runs)
/// or `identity_secret`, if either is set.
fn configured_keys(config: &ShopConfig) -> anyhow::Result<Option<KeyRing>> {
    if let Some(path) = &config.identity_keys_file {
        if config.identity_secret.is_some() {
            anyhow::bail!("set `identity_secret` or `identity_keys_file`, not both");
        }
        let file = KeysFile::new(path);
        let keys = KeyRing::new(file.read()?);
        tokio::spawn(file.watch(keys.clone(), Duration::from_secs(2)));
        return Ok(Some(keys));
    }
    config
        .identity_secret
        .as_ref()
        .map(|secret| trust::keys_from_secret(secret.expose()))
        .transpose()
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
    if SIGNS_OR_CHECKS_TOKENS.contains(&name) {
        check_jwt_secret(config.jwt_secret.expose(), " outside the one-process mode")?;
    }
    let Some(keys) = configured_keys(config)? else {
        anyhow::bail!(
            "`shop serve` needs the services' key: set `identity_secret` \
             (SHOP_IDENTITY_SECRET, e.g. `openssl rand -base64 48`, the same for every \
             service) or `identity_keys_file` (SHOP_IDENTITY_KEYS_FILE)"
        );
    };
    let infra = Infra::real(config, keys).await?;
    let builder = ServiceHost::builder().config(config.host.clone());
    let builder = add(builder, name, config, &infra, &mut Handles::default()).await?;
    Ok(builder.build()?.start().await?)
}

/// Starts every service and the gateway in this process, on embedded defaults.
pub async fn start(config: &ShopConfig) -> anyhow::Result<Shop> {
    // Reachable from other machines, the shop is no longer only its developer's: the
    // token secret must be one nobody else knows.
    let exposed = config
        .listen
        .each()
        .into_iter()
        .find(|(_, at)| !at.ip().is_loopback());
    if let Some((name, at)) = exposed {
        check_jwt_secret(
            config.jwt_secret.expose(),
            &format!(" with the {name} service listening off loopback ({at})"),
        )?;
    }
    let registry = MemoryRegistry::new();
    let bus = MemoryBus::new();
    let keys = match configured_keys(config)? {
        Some(keys) => keys,
        None => trust::random_keys()?,
    };
    let infra = Infra::embedded(&registry, &bus, keys);
    let mut handles = Handles::default();
    let mut builder = ServiceHost::builder().config(config.host.clone());
    for name in SERVICES {
        builder = add(builder, name, config, &infra, &mut handles).await?;
    }
    let host = builder.build()?.start().await?;
    let built = |what: &str| anyhow::anyhow!("the {what} service was not built");
    Ok(Shop {
        host,
        orders: handles.orders.ok_or_else(|| built("order"))?,
        inventory: handles.inventory.ok_or_else(|| built("inventory"))?,
        payments: handles.payments.ok_or_else(|| built("payment"))?,
        notifications: handles.notifications.ok_or_else(|| built("notification"))?,
        registry,
        bus,
    })
}
