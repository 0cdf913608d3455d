//! The shop's PostgreSQL services (user, product, order) losing their database: the
//! one-process shop with those three on the real PostgreSQL, under a load of requests
//! while PostgreSQL terminates their backends again and again, then while it refuses
//! them altogether. Every answer is a success or a `503` (never a `500`, never a hang),
//! readiness turns off while the database is out of reach, and the shop serves again by
//! itself once it is back.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::Method;
use micro_core::client::HttpClient;
use serde_json::{json, Value};
use shop::app::{Listen, ShopConfig};
use tokio_postgres::{Client, NoTls};

use crate::support::{checkout, send, settled, sign_up};

/// The services that keep their data in PostgreSQL.
const ON_POSTGRES: [&str; 3] = ["user-service", "product-service", "order-service"];

fn url() -> String {
    std::env::var("MICRO_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

async fn admin() -> Client {
    let url = url();
    let (client, connection) = tokio_postgres::connect(&url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at {url} is unreachable: {e}"));
    tokio::spawn(connection);
    client
}

/// The login role the shop's services connect as, so that the test can find their
/// backends and forbid them new ones.
struct Role {
    name: String,
    admin: Client,
}

impl Role {
    async fn new() -> Self {
        let name = format!("shop_role_{}", uuid::Uuid::new_v4().simple());
        let admin = admin().await;
        admin
            .batch_execute(&format!("CREATE ROLE {name} LOGIN SUPERUSER"))
            .await
            .unwrap();
        Role { name, admin }
    }

    /// The tests' PostgreSQL url, as this role.
    fn url(&self) -> String {
        let mut config: tokio_postgres::Config = url().parse().unwrap();
        config.user(&self.name);
        let host = match &config.get_hosts()[0] {
            tokio_postgres::config::Host::Tcp(host) => host.clone(),
            other => panic!("a TCP host, not {other:?}"),
        };
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let db = config.get_dbname().unwrap_or("postgres");
        format!("postgres://{}@{host}:{port}/{db}", self.name)
    }

    /// The application names of the role's backends.
    async fn backends(&self) -> Vec<String> {
        self.admin
            .query(
                "SELECT DISTINCT application_name FROM pg_stat_activity WHERE usename = $1",
                &[&self.name],
            )
            .await
            .unwrap()
            .iter()
            .map(|row| row.get(0))
            .collect()
    }

    /// Terminates the role's backends; how many.
    async fn terminate(&self) -> usize {
        self.admin
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1",
                &[&self.name],
            )
            .await
            .unwrap()
            .len()
    }

    async fn cut(&self) {
        self.admin
            .batch_execute(&format!("ALTER ROLE {} NOLOGIN", self.name))
            .await
            .unwrap();
        self.terminate().await;
    }

    async fn restore(&self) {
        self.admin
            .batch_execute(&format!("ALTER ROLE {} LOGIN", self.name))
            .await
            .unwrap();
    }

    /// Drops the role with the schemas it made.
    async fn drop_role(self) {
        self.cut().await;
        self.admin
            .batch_execute(&format!(
                "DROP OWNED BY {n} CASCADE; DROP ROLE {n}",
                n = self.name
            ))
            .await
            .unwrap();
    }
}

/// The status of each PostgreSQL service's `/health/ready`.
async fn readiness(shop: &shop::app::Shop) -> BTreeMap<&'static str, u16> {
    let mut statuses = BTreeMap::new();
    for service in ON_POSTGRES {
        let addr = shop.host.local_addr(service).unwrap();
        let client = HttpClient::builder(&format!("http://{addr}"))
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        let (status, _) = send(&client, Method::GET, "/health/ready", None, None, None).await;
        statuses.insert(service, status);
    }
    statuses
}

/// Polls readiness until every PostgreSQL service answers `status`.
async fn wait_ready(shop: &shop::app::Shop, status: u16) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let statuses = readiness(shop).await;
        if statuses.values().all(|s| *s == status) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "readiness never became {status}: {statuses:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What one request answered: its path, status and error code.
type Answer = (String, u16, Value);

/// Asserts that an answer is a success or a `503` in the shop's error shape.
fn served_or_unavailable((path, status, body): &Answer) {
    assert!(
        (200..300).contains(status) || *status == 503,
        "{path} answered {status}: {body}"
    );
    if *status == 503 {
        assert!(body["error"]["code"].is_string(), "{path}: {body}");
    }
}

/// One user's requests on every PostgreSQL service, `rounds` times: the catalog, a
/// login every third round, the order list, and a checkout every third round, retried
/// with its key while it is answered 503. Returns the answers and the ids of the orders
/// accepted.
async fn journeys(
    client: HttpClient,
    email: String,
    token: String,
    rounds: usize,
) -> (Vec<Answer>, Vec<String>) {
    let mut answers = Vec::new();
    let mut accepted = Vec::new();
    let login = json!({"email": email, "password": "a long password"});
    let mut call = async |method: Method, path: &str, body: Option<Value>, key: Option<&str>| {
        let (status, answer) = send(&client, method, path, Some(&token), key, body).await;
        answers.push((path.to_owned(), status, answer.clone()));
        (status, answer)
    };
    for round in 0..rounds {
        call(Method::GET, "/api/products?page=1", None, None).await;
        call(Method::GET, "/api/products/SKU-1001", None, None).await;
        // Logins every few rounds: the gateway allows an address 20 a second.
        if round % 3 == 1 {
            call(Method::POST, "/api/users/login", Some(login.clone()), None).await;
        }
        call(Method::GET, "/api/orders", None, None).await;
        if round % 3 != 0 {
            continue;
        }
        let item = json!({"sku": "SKU-1004", "quantity": 1});
        let (status, _) = call(Method::POST, "/api/carts/me/items", Some(item), None).await;
        if status != 200 {
            continue;
        }
        let key = format!("{email}-{round}");
        for _ in 0..20 {
            let card = json!({"card_number": "4242424242424242"});
            let (status, order) = call(Method::POST, "/api/orders", Some(card), Some(&key)).await;
            if status == 202 {
                accepted.push(order["id"].as_str().unwrap().to_owned());
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    (answers, accepted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_postgres_services_answer_503_while_the_database_is_lost_and_resume_by_themselves() {
    let role = Role::new().await;
    let schema = format!(
        "outage_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let config = ShopConfig {
        data_dir: None,
        listen: Listen::ephemeral(),
        password_iterations: 10_000,
        postgres_url: Some(role.url()),
        postgres_schema: schema,
        ..ShopConfig::default()
    };
    let _ = micro_core::telemetry::init(&micro_core::telemetry::TelemetryConfig {
        filter: "warn".into(),
        ..Default::default()
    });
    let shop = shop::app::start(&config).await.expect("the shop starts");
    let client = HttpClient::builder(&format!("http://{}", shop.gateway()))
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    assert_eq!(
        readiness(&shop).await.values().collect::<Vec<_>>(),
        [&200; 3]
    );
    let mut users = Vec::new();
    for n in 0..3 {
        let email = format!("outage-{n}@shop.test");
        let token = sign_up(&client, &email).await;
        users.push((email, token));
    }
    let first = checkout(
        &client,
        &users[0].1,
        "before",
        "SKU-1001",
        "4242424242424242",
    )
    .await;
    assert_eq!(
        settled(&client, &users[0].1, &first).await["status"],
        "CONFIRMED"
    );
    // Each service's pool names its connections after it.
    let names = role.backends().await;
    for service in ON_POSTGRES {
        assert!(names.iter().any(|n| n == service), "{service} in {names:?}");
    }

    // Phase 1: PostgreSQL terminates every backend of the shop every 300 ms while
    // three users run their journeys.
    let stop = Arc::new(AtomicBool::new(false));
    let terminating = {
        let stop = stop.clone();
        let role_name = role.name.clone();
        tokio::spawn(async move {
            let admin = admin().await;
            let mut terminated = 0;
            while !stop.load(Ordering::Relaxed) {
                terminated += admin
                    .query(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                         WHERE usename = $1",
                        &[&role_name],
                    )
                    .await
                    .unwrap()
                    .len();
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            terminated
        })
    };
    let loads: Vec<_> = users
        .iter()
        .map(|(email, token)| {
            tokio::spawn(journeys(client.clone(), email.clone(), token.clone(), 12))
        })
        .collect();
    let mut answers = Vec::new();
    let mut accepted = Vec::new();
    for (load, (_, token)) in loads.into_iter().zip(&users) {
        let (a, ids) = tokio::time::timeout(Duration::from_secs(120), load)
            .await
            .expect("a journey hung")
            .unwrap();
        answers.extend(a);
        accepted.extend(ids.into_iter().map(|id| (token.clone(), id)));
    }
    stop.store(true, Ordering::Relaxed);
    let terminated = terminating.await.unwrap();
    assert!(terminated > 0, "no backend was terminated");
    answers.iter().for_each(served_or_unavailable);
    let served = answers
        .iter()
        .filter(|(_, s, _)| (200..300).contains(s))
        .count();
    let unavailable = answers.len() - served;
    eprintln!(
        "under terminations: {} requests, {served} served, {unavailable} answered 503, \
         {terminated} backends terminated",
        answers.len()
    );
    assert!(served > 0, "nothing was served");
    // An order accepted is never lost: its saga runs to the end.
    for (token, id) in &accepted {
        let order = settled(&client, token, id).await;
        assert!(
            ["CONFIRMED", "CANCELLED"].contains(&order["status"].as_str().unwrap_or("")),
            "{order}"
        );
    }

    // Phase 2: PostgreSQL refuses the shop altogether. Readiness turns off, and
    // requests are answered 503 in the shop's error shape.
    role.cut().await;
    wait_ready(&shop, 503).await;
    let token = &users[1].1;
    for path in [
        "/api/products/SKU-1001",
        "/api/products?page=1",
        "/api/orders",
    ] {
        let (status, body) = send(&client, Method::GET, path, Some(token), None, None).await;
        assert_eq!(status, 503, "{path}: {body}");
        // The catalog names itself (`catalog_unavailable`), the others answer
        // `service_unavailable`.
        let code = body["error"]["code"].as_str().unwrap_or_default();
        assert!(code.ends_with("_unavailable"), "{path}: {body}");
    }
    let login = json!({"email": users[1].0, "password": "a long password"});
    let (status, body) = send(
        &client,
        Method::POST,
        "/api/users/login",
        None,
        None,
        Some(login.clone()),
    )
    .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "service_unavailable", "{body}");

    // Phase 3: PostgreSQL takes connections again. With no restart, readiness comes
    // back and every service serves.
    role.restore().await;
    wait_ready(&shop, 200).await;
    let (status, body) = send(
        &client,
        Method::POST,
        "/api/users/login",
        None,
        None,
        Some(login),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = send(
        &client,
        Method::GET,
        "/api/products/SKU-1001",
        None,
        None,
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let after = checkout(&client, token, "after", "SKU-1002", "4242424242424242").await;
    assert_eq!(settled(&client, token, &after).await["status"], "CONFIRMED");

    let report = shop.host.run_until(async {}).await;
    drop(report);
    role.drop_role().await;
}
