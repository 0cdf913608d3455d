//! The fault-injection run of the multi-process shop: the load generator runs
//! checkouts, cancels and declines through the gateway while a driver SIGKILLs and
//! restarts services (the two order-service replicas among them), restarts the broker,
//! delays and drops the order saga's calls to payment and inventory (a [`proxy`] in
//! front of each), and, once the shop reconnects to PostgreSQL, terminates its database
//! connections. When the faults stop and the shop has settled, the run checks from the
//! stores themselves that no money, stock, saga, notification or event went astray,
//! prints its figures, and fails on any violation.
//!
//! The CI test runs a minute of faults. `scripts/fault-run.sh <duration>` runs the same
//! driver for longer; it sets the variables read here:
//!
//! | variable | meaning | default |
//! |---|---|---|
//! | `MICRO_FAULT_DURATION` | how long faults are injected (`90s`, `10m`) | `60s` |
//! | `MICRO_FAULT_SEED` | seed of the driver's choices, printed by each run | the clock |
//! | `MICRO_FAULT_PG_TERMINATE` | `1`: also `pg_terminate_backend` the shop's connections | off |
//! | `MICRO_FAULT_USERS` | the load generator's virtual users | `6` |
//! | `MICRO_FAULT_VICTIMS` | the services that may be killed, comma-separated | all but the gateway |
//!
//! Service discovery places the proxies: payment and inventory register under a key
//! prefix of their own, which nobody resolves, and the driver registers each proxy
//! (with the services' proof) under the shop's prefix in their name.

mod proxy;
#[path = "../../../../micro-events/tests/it/tansu.rs"]
mod tansu;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use micro_discovery::etcd::{EtcdConfig, EtcdRegistry};
use micro_discovery::host::Registrar;
use micro_discovery::{Instance, Registration};
use shop::events::OrderEvent;
use shop::inventory::{Reservation, ReservationState};
use shop::loadgen::{Journey, LoadgenConfig, Weights};
use shop::notification::Notification;
use shop::order::{Order, OrderStatus};
use shop::payment::{Payment, PaymentStatus};
use shop::store::Store;

use self::proxy::{Counts, Odds, Proxy};
use self::tansu::Tansu;
use crate::support::{serve_at, server, TEST_IDENTITY_SECRET};

/// Units of each product loaded into the inventory (SKU-OOS always has none).
const INITIAL_STOCK: i64 = 1000;
/// The services the driver kills; the gateway, the load's entry, stays up.
const VICTIMS: &[&str] = &[
    "order-a",
    "order-b",
    "payment",
    "inventory",
    "notification",
    "cart",
    "product",
    "user",
];

pub(crate) use shop::loadgen::Rng;

/// A pause of `low..=high` milliseconds, drawn from `rng`.
fn millis(rng: &mut Rng, low: u64, high: u64) -> Duration {
    Duration::from_millis(low + rng.below(high - low + 1))
}

/// What one run does.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    /// How long faults are injected.
    pub(crate) duration: Duration,
    /// Seed of the driver's and the load's choices.
    pub(crate) seed: u64,
    /// Whether the driver terminates the shop's PostgreSQL connections.
    pub(crate) pg_terminate: bool,
    /// The load generator's virtual users.
    pub(crate) users: usize,
    /// The services the driver may kill.
    pub(crate) victims: Vec<&'static str>,
}

impl Plan {
    /// The plan from the `MICRO_FAULT_*` variables, `duration` when unset.
    pub(crate) fn from_env(duration: Duration) -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let duration = var("MICRO_FAULT_DURATION").map_or(duration, |d| {
            shop::loadgen::parse_args(["--duration".to_owned(), d.clone()].into_iter())
                .unwrap_or_else(|e| panic!("MICRO_FAULT_DURATION `{d}`: {e}"))
                .duration
        });
        let seed = var("MICRO_FAULT_SEED").map_or_else(
            || {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            },
            |s| s.parse().expect("MICRO_FAULT_SEED is a number"),
        );
        let pg_terminate = var("MICRO_FAULT_PG_TERMINATE").is_some_and(|v| v == "1");
        let users = var("MICRO_FAULT_USERS").map_or(6, |u| u.parse().expect("a number"));
        let victims = var("MICRO_FAULT_VICTIMS").map_or_else(
            || VICTIMS.to_vec(),
            |list| {
                list.split(',')
                    .map(|name| {
                        *VICTIMS
                            .iter()
                            .find(|v| **v == name.trim())
                            .unwrap_or_else(|| {
                                panic!("MICRO_FAULT_VICTIMS: `{name}` is not one of {VICTIMS:?}")
                            })
                    })
                    .collect()
            },
        );
        Self {
            duration,
            seed,
            pg_terminate,
            users,
            victims,
        }
    }
}

/// The faults injected, by kind.
#[derive(Debug, Default)]
struct Injected {
    kills: BTreeMap<&'static str, u64>,
    broker_restarts: u64,
    pg_terminations: u64,
    proxy: Arc<Counts>,
}

impl Injected {
    fn total(&self) -> u64 {
        self.kills.values().sum::<u64>()
            + self.broker_restarts
            + self.pg_terminations
            + self.proxy.delayed.load(Ordering::Relaxed)
            + self.proxy.refused.load(Ordering::Relaxed)
            + self.proxy.lost.load(Ordering::Relaxed)
    }
}

/// One `shop serve` process the driver may kill and start again on the same port.
struct Process {
    service: &'static str,
    listen: String,
    env: Vec<(&'static str, String)>,
    log: PathBuf,
    child: Option<Child>,
}

impl Process {
    fn start(&mut self) {
        let (child, _) = serve_at(self.service, &self.env, &self.listen, Some(&self.log));
        self.child = Some(child);
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops it with SIGTERM (its graceful shutdown: consumers commit, the outbox
    /// flushes), SIGKILL after 30 s.
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A free loopback port.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The shop under faults: its processes, its broker, its proxies and its database.
struct Shop {
    processes: BTreeMap<&'static str, Process>,
    tansu: Tansu,
    proxies: Vec<Proxy>,
    _registrars: Vec<Registrar>,
    gateway: String,
    /// The shop's own database (so that terminating its connections touches nobody
    /// else's) and the URL of the server's maintenance database.
    database: String,
    server: String,
    schema: String,
    event_prefix: String,
    data: tempfile::TempDir,
}

impl Shop {
    async fn start(seed: u64, counts: Arc<Counts>, odds: Odds) -> Self {
        let etcd = server("MICRO_TEST_ETCD_ENDPOINT", "http://127.0.0.1:23790");
        let redis = server("MICRO_TEST_REDIS_URL", "redis://127.0.0.1:6379");
        let postgres = std::env::var("MICRO_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
        let tansu = Tansu::start().await;
        let data = tempfile::tempdir().unwrap();
        let unique = format!(
            "{}_{:x}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        );
        let database = format!("shop_faults_{unique}");
        pg(&postgres)
            .await
            .batch_execute(&format!("CREATE DATABASE {database}"))
            .await
            .unwrap();
        let shop_url = tansu::with_database(&postgres, &database);
        let schema = "shop".to_owned();
        let prefix = format!("/micro/shop-faults-{unique}/");
        let event_prefix = format!("faults-{unique}-");
        let base = vec![
            ("SHOP_DATA_DIR", data.path().display().to_string()),
            ("SHOP_ETCD_ENDPOINTS", etcd.clone()),
            ("SHOP_ETCD_PREFIX", prefix.clone()),
            ("SHOP_KAFKA_BROKERS", tansu.brokers()),
            ("SHOP_EVENT_PREFIX", event_prefix.clone()),
            ("SHOP_REDIS_URL", redis),
            ("SHOP_REDIS_PREFIX", format!("shop-faults-{unique}:")),
            ("SHOP_POSTGRES_URL", shop_url),
            ("SHOP_POSTGRES_SCHEMA", schema.clone()),
            ("SHOP_INITIAL_STOCK", INITIAL_STOCK.to_string()),
            // A killed notification service's successor gets its partitions quickly.
            ("SHOP_KAFKA_SESSION_TIMEOUT", "6s".to_owned()),
            // tansu forgets to time out a crashed member's session once it has
            // restarted: the rebalance waits this long for it instead.
            ("SHOP_KAFKA_MAX_POLL_INTERVAL", "10s".to_owned()),
        ];
        let hidden = format!("{prefix}behind-proxy/");
        let mut processes = BTreeMap::new();
        let mut upstream = BTreeMap::new();
        for name in [
            "user",
            "product",
            "cart",
            "payment",
            "inventory",
            "order-a",
            "order-b",
            "notification",
            "gateway",
        ] {
            let service = name.trim_end_matches("-a").trim_end_matches("-b");
            let port = free_port();
            let mut env = base.clone();
            if matches!(service, "payment" | "inventory") {
                // Registered where nobody looks: callers reach it through its proxy.
                env.push(("SHOP_ETCD_PREFIX", hidden.clone()));
                upstream.insert(service, port);
            }
            let mut process = Process {
                service,
                listen: format!("127.0.0.1:{port}"),
                env,
                log: data.path().join(format!("{name}.log")),
                child: None,
            };
            tokio::task::block_in_place(|| process.start());
            processes.insert(name, process);
        }
        let gateway = format!("http://{}", processes["gateway"].listen);

        let keys = shop::trust::keys_from_secret(TEST_IDENTITY_SECRET).unwrap();
        let mut config = EtcdConfig::default();
        config.endpoints = vec![etcd];
        config.prefix = prefix;
        let registry: Arc<dyn micro_discovery::Registry> =
            Arc::new(EtcdRegistry::connect(&config).await.unwrap());
        let mut proxies = Vec::new();
        let mut registrars = Vec::new();
        for (i, (service, port)) in upstream.into_iter().enumerate() {
            let proxy = Proxy::start(0, port, odds, counts.clone(), seed ^ (i as u64 + 1)).await;
            let name = format!("{service}-service");
            let instance = Instance::new(&name, format!("{name}-proxy"), "127.0.0.1", proxy.port());
            let instance = micro_discovery::identity::prove(instance, &keys).unwrap();
            let registrar = Registrar::new(
                registry.clone(),
                Registration::new(instance).ttl(Duration::from_secs(10)),
            );
            registrar.start().await.unwrap();
            proxies.push(proxy);
            registrars.push(registrar);
        }
        Self {
            processes,
            tansu,
            proxies,
            _registrars: registrars,
            gateway,
            database,
            server: postgres,
            schema,
            event_prefix,
            data,
        }
    }

    fn shop_url(&self) -> String {
        tansu::with_database(&self.server, &self.database)
    }

    /// Waits until the gateway finds the catalog and the order service.
    async fn reachable(&self) {
        let client = micro_core::client::HttpClient::builder(&self.gateway)
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (status, _) = crate::support::send(
                &client,
                http::Method::GET,
                "/api/products/SKU-1001",
                None,
                None,
                None,
            )
            .await;
            if status == 200 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the shop never came up: {status}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn faults(&self, on: bool) {
        for proxy in &self.proxies {
            proxy.faults(on);
        }
    }

    /// Kills `name`, leaves it down for `down`, starts it again.
    async fn kill(&mut self, name: &'static str, down: Duration) {
        let process = self.processes.get_mut(name).unwrap();
        process.kill();
        tokio::time::sleep(down).await;
        tokio::task::block_in_place(|| process.start());
    }

    async fn restart_broker(&mut self, down: Duration) {
        self.tansu.kill();
        tokio::time::sleep(down).await;
        tokio::task::block_in_place(|| self.tansu.restart());
    }

    /// Terminates every connection to the shop's database; returns how many.
    async fn terminate_connections(&self) -> u64 {
        let rows = pg(&self.server)
            .await
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE datname = $1 AND pid <> pg_backend_pid()",
                &[&self.database],
            )
            .await
            .unwrap();
        rows.len() as u64
    }
}

impl Drop for Shop {
    fn drop(&mut self) {
        self.processes.clear();
        let (server, database) = (self.server.clone(), self.database.clone());
        let _ = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(async {
                    pg(&server)
                        .await
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)"))
                        .await
                })
        })
        .join();
    }
}

async fn pg(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at {url}: {e}"));
    tokio::spawn(connection);
    client
}

/// Injects faults until `until`, one every 2–5 s.
async fn inject(
    shop: &mut Shop,
    plan: &Plan,
    rng: &mut Rng,
    injected: &mut Injected,
    until: Instant,
) {
    shop.faults(true);
    while Instant::now() < until {
        tokio::time::sleep(millis(rng, 2000, 5000)).await;
        match rng.below(10) {
            0..=6 => {
                let victim = plan.victims[rng.below(plan.victims.len() as u64) as usize];
                *injected.kills.entry(victim).or_default() += 1;
                let down = millis(rng, 200, 3000);
                shop.kill(victim, down).await;
            }
            7 => {
                injected.broker_restarts += 1;
                let down = millis(rng, 1000, 4000);
                shop.restart_broker(down).await;
            }
            8 if plan.pg_terminate => {
                injected.pg_terminations += shop.terminate_connections().await;
            }
            _ => {
                // Both order replicas at once: their sagas wait for one to come back.
                for victim in ["order-a", "order-b"] {
                    *injected.kills.entry(victim).or_default() += 1;
                    shop.processes.get_mut(victim).unwrap().kill();
                }
                tokio::time::sleep(millis(rng, 500, 2000)).await;
                for victim in ["order-a", "order-b"] {
                    let process = shop.processes.get_mut(victim).unwrap();
                    tokio::task::block_in_place(|| process.start());
                }
            }
        }
    }
    shop.faults(false);
}

/// The load: mostly orders, their cancels and declines, some reads.
fn load(gateway: &str, plan: &Plan) -> LoadgenConfig {
    let mut weights = Weights::default();
    for (journey, weight) in [
        (Journey::Browse, 2),
        (Journey::Search, 0),
        (Journey::AddToCart, 0),
        (Journey::EditCart, 0),
        (Journey::ViewCart, 1),
        (Journey::Checkout, 8),
        (Journey::MultiCheckout, 4),
        (Journey::OrderHistory, 1),
        (Journey::Cancel, 4),
        (Journey::DeclinedCard, 2),
        (Journey::OutOfStock, 1),
        (Journey::PaymentTimeout, 0),
    ] {
        weights.set(journey, weight);
    }
    LoadgenConfig {
        target: gateway.to_owned(),
        users: plan.users,
        duration: plan.duration,
        seed: plan.seed,
        weights,
        request_timeout: Duration::from_secs(10),
        order_timeout: Duration::from_secs(20),
        poll_interval: Duration::from_millis(200),
        ..Default::default()
    }
}

/// What the stores say once the shop has settled.
struct Findings {
    orders: Vec<Order>,
    sagas: BTreeMap<String, String>,
    payments: Vec<Payment>,
    levels: BTreeMap<String, shop::inventory::Stock>,
    reservations: Vec<Reservation>,
    notifications: Vec<Notification>,
    events: Vec<OrderEvent>,
}

/// Waits until no saga runs and no order is on its way, or `deadline` passes.
async fn settle(shop: &Shop, deadline: Duration) -> bool {
    let give_up = Instant::now() + deadline;
    let s = &shop.schema;
    loop {
        if let Ok((client, connection)) =
            tokio_postgres::connect(&shop.shop_url(), tokio_postgres::NoTls).await
        {
            tokio::spawn(connection);
            let busy = client
                .query_one(
                    &format!(
                        "SELECT (SELECT count(*) FROM {s}_order_sagas.saga
                                  WHERE status NOT IN ('completed', 'compensated', 'failed'))
                              + (SELECT count(*) FROM {s}_orders.orders
                                  WHERE doc->>'status' IN ('PENDING', 'PAID'))
                              + (SELECT count(*) FROM {s}_orders.outbox WHERE sent_at IS NULL)"
                    ),
                    &[],
                )
                .await
                .map(|row| row.get::<_, i64>(0));
            if busy.is_ok_and(|n| n == 0) {
                return true;
            }
        }
        if Instant::now() >= give_up {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Waits until the notification service has committed every order event, or
/// `deadline` passes (read from the broker's own tables).
async fn consumed(shop: &Shop, deadline: Duration) -> bool {
    let give_up = Instant::now() + deadline;
    let broker = pg(&shop.tansu.database_url()).await;
    let topic = format!("{}order-events", shop.event_prefix);
    let group = format!("{}notification-service", shop.event_prefix);
    loop {
        let behind: Option<i64> = broker
            .query_one(
                "SELECT sum(w.high - coalesce(co.committed_offset, 0))::bigint
                 FROM topic t
                 JOIN topition tp ON tp.topic = t.id
                 JOIN watermark w ON w.topition = tp.id
                 LEFT JOIN consumer_group cg ON cg.name = $2
                 LEFT JOIN consumer_offset co ON co.topition = tp.id AND co.consumer_group = cg.id
                 WHERE t.name = $1",
                &[&topic, &group],
            )
            .await
            .ok()
            .and_then(|row| row.get(0));
        if behind == Some(0) {
            return true;
        }
        if Instant::now() >= give_up {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Reads every store: PostgreSQL for orders and sagas, the broker's tables for the
/// events, the stopped services' files for payments, stock and notifications.
async fn read(shop: &Shop) -> Findings {
    let s = &shop.schema;
    let client = pg(&shop.shop_url()).await;
    let orders = client
        .query(&format!("SELECT doc FROM {s}_orders.orders"), &[])
        .await
        .unwrap()
        .iter()
        .map(|row| serde_json::from_value(row.get(0)).unwrap())
        .collect();
    let sagas = client
        .query(
            &format!("SELECT saga_id, status FROM {s}_order_sagas.saga"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    let broker = pg(&shop.tansu.database_url()).await;
    let topic = format!("{}order-events", shop.event_prefix);
    let events = broker
        .query(
            "SELECT r.v FROM record r
             JOIN topition tp ON tp.id = r.topition
             JOIN topic t ON t.id = tp.topic
             WHERE t.name = $1 ORDER BY tp.partition, r.offset_id",
            &[&topic],
        )
        .await
        .unwrap()
        .iter()
        .filter_map(|row| serde_json::from_slice(row.get::<_, &[u8]>(0)).ok())
        .collect();
    let file =
        |service: &str| Store::open(&shop.data.path().join(format!("{service}.redb"))).unwrap();
    let payments = shop::payment::Payments::new(file("payment"), Duration::ZERO)
        .all()
        .unwrap();
    let inventory = file("inventory");
    let reservations = inventory
        .list::<Reservation>("reservations", "")
        .unwrap()
        .into_iter()
        .map(|(_, r)| r)
        .collect();
    let levels = shop::inventory::Inventory::new(inventory, &BTreeMap::new())
        .unwrap()
        .levels()
        .unwrap();
    let notifications = file("notification")
        .list::<Notification>("sent", "")
        .unwrap()
        .into_iter()
        .map(|(_, n)| n)
        .collect();
    Findings {
        orders,
        sagas,
        payments,
        levels,
        reservations,
        notifications,
        events,
    }
}

/// Every invariant the run promises, and each breach of it.
fn violations(f: &Findings) -> Vec<String> {
    let mut found = Vec::new();
    let orders: BTreeMap<&str, &Order> = f.orders.iter().map(|o| (o.id.as_str(), o)).collect();
    let kept = |o: &Order| {
        matches!(
            o.status,
            OrderStatus::Confirmed | OrderStatus::Shipped | OrderStatus::Delivered
        )
    };

    // Money: a captured payment belongs to an order that is kept; a kept order was
    // paid exactly once.
    let mut captured: BTreeMap<&str, usize> = BTreeMap::new();
    for p in &f.payments {
        if p.status == PaymentStatus::Captured {
            *captured.entry(p.order_id.as_str()).or_default() += 1;
            match orders.get(p.order_id.as_str()) {
                Some(o) if kept(o) => {}
                Some(o) => found.push(format!(
                    "payment {} captured for order {} which is {:?}",
                    p.id, o.id, o.status
                )),
                None => found.push(format!(
                    "payment {} captured for an unknown order {}",
                    p.id, p.order_id
                )),
            }
        }
    }
    for o in f.orders.iter().filter(|o| kept(o)) {
        let n = captured.get(o.id.as_str()).copied().unwrap_or(0);
        if n != 1 {
            found.push(format!(
                "order {} is {:?} with {n} captured payments",
                o.id, o.status
            ));
        }
    }

    // Stock: conserved per SKU, nothing left reserved, committed only for kept orders.
    let mut committed: BTreeMap<&str, i64> = BTreeMap::new();
    for r in &f.reservations {
        let kept_order = orders.get(r.order_id.as_str()).is_some_and(|o| kept(o));
        match r.state {
            ReservationState::Committed if kept_order => {
                for item in &r.items {
                    *committed.entry(item.sku.as_str()).or_default() += item.quantity;
                }
            }
            ReservationState::Released if !kept_order => {}
            state => found.push(format!(
                "reservation of order {} is {state:?} while the order is {:?}",
                r.order_id,
                orders.get(r.order_id.as_str()).map(|o| o.status)
            )),
        }
    }
    for o in f.orders.iter().filter(|o| kept(o)) {
        if !f
            .reservations
            .iter()
            .any(|r| r.order_id == o.id && r.state == ReservationState::Committed)
        {
            found.push(format!(
                "order {} is {:?} with no stock committed",
                o.id, o.status
            ));
        }
    }
    for (sku, stock) in &f.levels {
        let loaded = if shop::inventory::ALWAYS_OUT_OF_STOCK.contains(&sku.as_str()) {
            0
        } else {
            INITIAL_STOCK
        };
        let sum = stock.available + stock.reserved + stock.committed;
        if sum != loaded || stock.reserved != 0 {
            found.push(format!("{sku}: loaded {loaded}, now {stock:?}"));
        }
        let expected = committed.get(sku.as_str()).copied().unwrap_or(0);
        if stock.committed != expected {
            found.push(format!(
                "{sku}: {} committed, the kept orders hold {expected}",
                stock.committed
            ));
        }
    }

    // Sagas and orders: all ended, none needing a person.
    for (id, status) in &f.sagas {
        if !matches!(status.as_str(), "completed" | "compensated") {
            found.push(format!("saga {id} is {status}"));
        }
    }
    for o in &f.orders {
        if !matches!(o.status, OrderStatus::Confirmed | OrderStatus::Cancelled) {
            found.push(format!("order {} ended {:?}", o.id, o.status));
        }
    }

    // Events: each order's creation and outcome reached the broker, and each outcome
    // was notified exactly once.
    let mut seen: BTreeMap<&str, BTreeSet<&'static str>> = BTreeMap::new();
    for e in &f.events {
        seen.entry(e.order_id()).or_default().insert(e.name());
    }
    for o in &f.orders {
        let kinds = seen.get(o.id.as_str()).cloned().unwrap_or_default();
        let outcome = match o.status {
            OrderStatus::Confirmed => "OrderConfirmed",
            OrderStatus::Cancelled => "OrderCancelled",
            // Counted above: it did not end.
            _ => continue,
        };
        for needed in ["OrderCreated", outcome] {
            if !kinds.contains(needed) {
                found.push(format!(
                    "order {} ({:?}) has no {needed} event",
                    o.id, o.status
                ));
            }
        }
    }
    let mut sent: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    for n in &f.notifications {
        *sent
            .entry((n.order_id.as_str(), n.kind.as_str()))
            .or_default() += 1;
    }
    for ((order, kind), n) in &sent {
        if *n > 1 {
            found.push(format!("{kind} of order {order} notified {n} times"));
        }
    }
    for e in &f.events {
        let kind = match e {
            OrderEvent::OrderConfirmed { .. } => "order_confirmed",
            OrderEvent::OrderCancelled { .. } => "order_cancelled",
            _ => continue,
        };
        if !sent.contains_key(&(e.order_id(), kind)) {
            found.push(format!(
                "{kind} of order {} was never notified",
                e.order_id()
            ));
        }
    }
    found
}

/// Runs `plan`: starts the shop, injects faults under load, settles, checks. Panics
/// with the violations if there are any.
pub(crate) async fn run(plan: Plan) {
    eprintln!(
        "fault run: {:?} of faults, seed {} (MICRO_FAULT_SEED), pg_terminate_backend {}",
        plan.duration,
        plan.seed,
        if plan.pg_terminate { "on" } else { "off" }
    );
    let mut injected = Injected::default();
    let odds = Odds {
        delay: 60,
        refuse: 20,
        lose: 20,
    };
    let mut shop = Shop::start(plan.seed, injected.proxy.clone(), odds).await;
    shop.reachable().await;
    let logs = shop.data.path().to_owned();

    let started = Instant::now();
    let load = tokio::spawn({
        let config = load(&shop.gateway, &plan);
        async move { shop::loadgen::run(&config).await }
    });
    let mut rng = Rng::new(plan.seed);
    inject(
        &mut shop,
        &plan,
        &mut rng,
        &mut injected,
        started + plan.duration,
    )
    .await;
    let report = load.await.unwrap().expect("the load generator ran");

    let settled = settle(&shop, Duration::from_secs(120)).await;
    let caught_up = consumed(&shop, Duration::from_secs(60)).await;
    for process in shop.processes.values_mut() {
        tokio::task::block_in_place(|| process.stop());
    }
    let findings = read(&shop).await;
    let mut found = violations(&findings);
    if !settled {
        found.push("the shop did not settle within 120 s of the faults' end".to_owned());
    }
    if !caught_up {
        found.push("the notification service did not catch up within 60 s".to_owned());
    }

    let ordering = [
        Journey::Checkout,
        Journey::MultiCheckout,
        Journey::Cancel,
        Journey::DeclinedCard,
        Journey::OutOfStock,
    ];
    let attempted: u64 = ordering
        .iter()
        .filter_map(|j| report.journey(*j))
        .map(|j| j.count)
        .sum();
    let status = |s: OrderStatus| findings.orders.iter().filter(|o| o.status == s).count();
    eprintln!("{report}");
    eprintln!(
        "fault run figures (seed {}, {:?} of faults, {:?} in all):\n\
         \x20 orders attempted: {attempted} order journeys; {} orders placed \
         ({} confirmed, {} cancelled); {} payments, {} events\n\
         \x20 faults injected: {} — kills {:?}, broker restarts {}, pg connections \
         terminated {}, calls delayed {}, refused {}, answers lost {}\n\
         \x20 invariant violations: {}",
        plan.seed,
        plan.duration,
        started.elapsed(),
        findings.orders.len(),
        status(OrderStatus::Confirmed),
        status(OrderStatus::Cancelled),
        findings.payments.len(),
        findings.events.len(),
        injected.total(),
        injected.kills,
        injected.broker_restarts,
        injected.pg_terminations,
        injected.proxy.delayed.load(Ordering::Relaxed),
        injected.proxy.refused.load(Ordering::Relaxed),
        injected.proxy.lost.load(Ordering::Relaxed),
        found.len(),
    );
    if !found.is_empty() {
        let kept = logs_kept(&logs, shop.tansu.log());
        panic!(
            "{} invariant violations (seed {}; logs in {}):\n  {}",
            found.len(),
            plan.seed,
            kept.display(),
            found.join("\n  ")
        );
    }
    assert!(
        findings.orders.len() >= 10,
        "too few orders to prove anything: {}",
        findings.orders.len()
    );
}

/// Copies the services' and the broker's logs out of the data directory, which goes
/// with the run.
fn logs_kept(from: &Path, broker: &Path) -> PathBuf {
    let to = std::env::temp_dir().join(format!(
        "shop-fault-run-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    ));
    std::fs::create_dir_all(&to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "log") {
            let _ = std::fs::copy(&path, to.join(entry.file_name()));
        }
    }
    let _ = std::fs::copy(broker, to.join("tansu.log"));
    to
}

/// The bounded run: a minute of faults (`MICRO_FAULT_DURATION` changes it;
/// `scripts/fault-run.sh` runs it long).
///
/// Not in the default suite yet: about one run in three fails, mostly (as far as the
/// logs tell) when a restarted notification service is given no partitions by tansu's
/// group coordinator; see "Failure and recovery" in the guide.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "flaky until the notification consumer's stall after a restart is fixed; run by scripts/fault-run.sh"]
async fn the_shop_loses_nothing_under_faults() {
    run(Plan::from_env(Duration::from_secs(60))).await;
}
