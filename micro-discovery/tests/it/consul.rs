//! The consul backend against the double of Consul's HTTP endpoints
//! ([`consul_double`](crate::consul_double)): the conformance suite, the registration
//! body, blocking queries, ACL token, datacenter, HTTP checks run by the agent, and an
//! outage.

#![cfg(feature = "consul")]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use micro_discovery::balance::{BalanceConfig, Strategy};
use micro_discovery::client::ServiceClient;
use micro_discovery::consul::{ConsulConfig, ConsulRegistry};
use micro_discovery::{
    CachedDiscover, Discover, Error, HealthStatus, HttpCheck, Instance, Registration, Registry,
};
use serde_json::{json, Value};

use crate::conformance::{conformance_tests, Backend};
use crate::consul_double::{ConsulDouble, DATACENTER};
use crate::support::{eventually, ids, watch_until, Server};

fn config(double: &ConsulDouble) -> ConsulConfig {
    ConsulConfig::new(double.address())
        .wait(Duration::from_secs(2))
        .request_timeout(Duration::from_secs(2))
        .max_retry_backoff(Duration::from_millis(300))
}

pub(crate) struct Consul {
    _double: ConsulDouble,
    registry: ConsulRegistry,
}

impl Backend for Consul {
    async fn new() -> Self {
        let double = ConsulDouble::start(None).await;
        let registry = ConsulRegistry::new(config(&double)).unwrap();
        Self {
            _double: double,
            registry,
        }
    }

    fn registry(&self) -> Arc<dyn Registry> {
        Arc::new(self.registry.clone())
    }

    fn discover(&self) -> Arc<dyn Discover> {
        Arc::new(self.registry.clone())
    }

    fn short_ttl(&self) -> Duration {
        Duration::from_secs(1)
    }
}

conformance_tests!(Consul, (flavor = "multi_thread", worker_threads = 2));

/// Lowercases every object key, as Consul reads definitions case-insensitively.
fn lowercase_keys(value: &Value) -> Value {
    match value {
        Value::Object(object) => Value::Object(
            object
                .iter()
                .map(|(k, v)| (k.to_lowercase(), lowercase_keys(v)))
                .collect(),
        ),
        Value::Array(values) => Value::Array(values.iter().map(lowercase_keys).collect()),
        other => other.clone(),
    }
}

/// Whether every key of `expected` is in `actual` with the same value, recursively.
fn contains(actual: &Value, expected: &Value) -> bool {
    match (actual, expected) {
        (Value::Object(actual), Value::Object(expected)) => expected
            .iter()
            .all(|(k, v)| actual.get(k).is_some_and(|a| contains(a, v))),
        _ => actual == expected,
    }
}

#[tokio::test]
async fn the_registration_body_has_the_reference_shape() {
    // The example registration of the reference architecture, in Consul's config-file
    // form; the HTTP API takes the same definition (keys in any case) without the
    // `service` wrapper.
    let reference = json!({
      "service": {
        "name": "user-service",
        "port": 8001,
        "check": {
          "http": "http://localhost:8001/health",
          "interval": "10s"
        }
      }
    });
    let double = ConsulDouble::start(None).await;
    let consul = ConsulRegistry::new(config(&double)).unwrap();
    let instance = Instance::new("user-service", "user-1", "localhost", 8001)
        .with_tag("v1")
        .with_metadata("build", "42")
        .with_version("1.4.0")
        .with_zone("eu-1");
    let check = HttpCheck::new("http://localhost:8001/health", Duration::from_secs(10))
        .timeout(Duration::from_secs(2));
    consul
        .register(&Registration::new(instance).http_check(check))
        .await
        .unwrap();

    let sent = &double.registrations()[0];
    assert!(
        contains(&lowercase_keys(sent), &reference["service"]),
        "{sent:#}"
    );
    // The API's own spelling, as Consul documents it.
    assert_eq!(
        *sent,
        json!({
            "ID": "user-1",
            "Name": "user-service",
            "Tags": ["v1"],
            "Address": "localhost",
            "Port": 8001,
            "Meta": {"build": "42", "version": "1.4.0", "zone": "eu-1"},
            "Check": {
                "HTTP": "http://localhost:8001/health",
                "Interval": "10s",
                "Timeout": "2s",
                "DeregisterCriticalServiceAfter": "60s"
            }
        })
    );

    // A TTL registration carries `{"TTL"}` and starts with the instance's health.
    consul
        .register(
            &Registration::new(Instance::new("cart-service", "cart-1", "10.0.0.4", 8004))
                .ttl(Duration::from_secs(15)),
        )
        .await
        .unwrap();
    let sent = &double.registrations()[1];
    assert_eq!(
        sent["Check"],
        json!({"TTL": "15s", "Status": "passing", "DeregisterCriticalServiceAfter": "60s"})
    );
    assert_eq!(double.check_status("service:cart-1"), Some("passing"));
}

/// A raw `GET` of the health endpoint: status, index and body.
async fn raw_health(double: &ConsulDouble, query: &str) -> (StatusCode, u64, Value) {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Empty<Bytes>>();
    let uri = format!("{}/v1/health/service/{query}", double.address());
    let response = client.get(uri.parse().unwrap()).await.unwrap();
    let status = response.status();
    let index = response.headers()["x-consul-index"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, index, serde_json::from_slice(&body).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocking_query_returns_when_a_change_happens() {
    let double = ConsulDouble::start(None).await;
    let consul = ConsulRegistry::new(config(&double)).unwrap();
    let (status, index, body) = raw_health(&double, "orders?passing").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, json!([]));
    assert_eq!(index, double.index());

    // Nothing changes: the query waits out its `wait` and answers the same index.
    let (_, same, _) =
        raw_health(&double, &format!("orders?passing&index={index}&wait=100ms")).await;
    assert_eq!(same, index);

    // A query blocked on the current index returns once a registration changes it.
    let blocked = {
        let query = format!("orders?passing&index={index}&wait=60s");
        let address = double.address();
        tokio::spawn(async move {
            let double_address = address;
            let client =
                hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                    .build_http::<Empty<Bytes>>();
            let uri = format!("{double_address}/v1/health/service/{query}");
            let response = client.get(uri.parse().unwrap()).await.unwrap();
            let index: u64 = response.headers()["x-consul-index"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            (index, serde_json::from_slice::<Value>(&body).unwrap())
        })
    };
    eventually(Duration::from_secs(5), "the query to block", || async {
        double.blocked() == 1
    })
    .await;
    assert!(!blocked.is_finished());
    consul
        .register(
            &Registration::new(Instance::new("orders", "orders-1", "10.0.0.3", 8003))
                .ttl(Duration::from_secs(60)),
        )
        .await
        .unwrap();
    let (new_index, body) = tokio::time::timeout(Duration::from_secs(5), blocked)
        .await
        .expect("the blocked query returns on the change")
        .unwrap();
    assert!(new_index > index);
    assert_eq!(body[0]["Service"]["ID"], "orders-1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watch_blocks_on_the_index_in_the_configured_datacenter() {
    let double = ConsulDouble::start(None).await;
    let consul = ConsulRegistry::new(config(&double).datacenter(DATACENTER)).unwrap();
    let mut watch = consul.watch("search");
    watch_until(&mut watch, Duration::from_secs(5), "the empty set", |set| {
        set.is_empty()
    })
    .await;
    consul
        .register(&Registration::new(Instance::new(
            "search", "search-1", "10.0.0.8", 8010,
        )))
        .await
        .unwrap();
    watch_until(&mut watch, Duration::from_secs(5), "search-1", |set| {
        ids(set) == ["search-1"]
    })
    .await;
    let queries = double.health_queries();
    assert!(
        queries
            .iter()
            .all(|q| q.contains("passing") && q.contains("dc=dc1")),
        "{queries:?}"
    );
    assert!(
        queries
            .iter()
            .any(|q| q.contains("index=") && q.contains("wait=2s")),
        "the watch uses blocking queries: {queries:?}"
    );

    // A datacenter the agent cannot reach is an unavailable registry.
    let elsewhere = ConsulRegistry::new(config(&double).datacenter("dc2")).unwrap();
    let err = elsewhere.instances("search").await.unwrap_err();
    assert!(matches!(err, Error::Unavailable { .. }), "{err:?}");
}

#[tokio::test]
async fn the_acl_token_is_sent_and_a_missing_one_is_refused() {
    let double = ConsulDouble::start(Some("s3cr3t")).await;
    let registration = Registration::new(Instance::new("audit", "audit-1", "10.0.0.9", 9100))
        .ttl(Duration::from_secs(60));

    let anonymous = ConsulRegistry::new(config(&double)).unwrap();
    let err = anonymous.register(&registration).await.unwrap_err();
    assert!(matches!(err, Error::Refused { .. }), "{err:?}");
    assert!(!err.is_retryable());
    assert!(matches!(
        anonymous.instances("audit").await.unwrap_err(),
        Error::Refused { .. }
    ));

    let wrong = ConsulRegistry::new(config(&double).token("guess")).unwrap();
    assert!(matches!(
        wrong.register(&registration).await.unwrap_err(),
        Error::Refused { .. }
    ));

    let allowed = ConsulRegistry::new(config(&double).token("s3cr3t")).unwrap();
    allowed.register(&registration).await.unwrap();
    allowed.keep_alive("audit", "audit-1").await.unwrap();
    assert_eq!(ids(&allowed.instances("audit").await.unwrap()), ["audit-1"]);
    allowed.deregister("audit", "audit-1").await.unwrap();
    assert!(allowed.instances("audit").await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warning_instances_follow_passing_only() {
    let double = ConsulDouble::start(None).await;
    let strict = ConsulRegistry::new(config(&double)).unwrap();
    let lenient = ConsulRegistry::new(config(&double).passing_only(false)).unwrap();
    for id in ["pay-1", "pay-2"] {
        strict
            .register(
                &Registration::new(Instance::new("payments", id, "10.0.0.5", 8005))
                    .ttl(Duration::from_secs(60)),
            )
            .await
            .unwrap();
    }
    strict
        .report_health("payments", "pay-1", HealthStatus::Warning)
        .await
        .unwrap();
    assert_eq!(double.check_status("service:pay-1"), Some("warning"));
    // A keep-alive repeats the status last reported.
    strict.keep_alive("payments", "pay-1").await.unwrap();
    assert_eq!(double.check_status("service:pay-1"), Some("warning"));

    assert_eq!(ids(&strict.instances("payments").await.unwrap()), ["pay-2"]);
    let all = lenient.instances("payments").await.unwrap();
    assert_eq!(ids(&all), ["pay-1", "pay-2"]);
    assert_eq!(all[0].health, HealthStatus::Warning);

    // Without a TTL check there is nothing to report health on.
    strict
        .register(&Registration::new(Instance::new(
            "payments", "pay-3", "10.0.0.6", 8005,
        )))
        .await
        .unwrap();
    let err = strict
        .report_health("payments", "pay-3", HealthStatus::Critical)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Unsupported { .. }), "{err:?}");
    strict.keep_alive("payments", "pay-3").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_one_of_three_instances_loses_no_request() {
    // The agent (the double) runs the HTTP checks; the client follows blocking queries.
    let double = ConsulDouble::start(None).await;
    let consul = ConsulRegistry::new(config(&double)).unwrap();
    crate::balance::kill_one_of_three(
        Arc::new(consul.clone()),
        Arc::new(consul),
        Duration::from_millis(300),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_outage_keeps_the_last_known_instances_serving() {
    let mut double = ConsulDouble::start(None).await;
    let consul = ConsulRegistry::new(config(&double)).unwrap();
    let hits: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let mut servers = Vec::new();
    for name in ["product-1", "product-2", "product-3"] {
        let hits = hits.clone();
        let server = Server::start(Router::new().route(
            "/whoami",
            get(move || {
                *hits.lock().unwrap().entry(name.to_owned()).or_default() += 1;
                async move { name }
            }),
        ))
        .await;
        consul
            .register(
                &Registration::new(Instance::new(
                    "product-service",
                    name,
                    "127.0.0.1",
                    server.addr.port(),
                ))
                .ttl(Duration::from_secs(60)),
            )
            .await
            .unwrap();
        servers.push(server);
    }
    let cached = CachedDiscover::new(consul.clone());
    let client = ServiceClient::builder(Arc::new(cached.clone()), "product-service")
        .balance(BalanceConfig::new().strategy(Strategy::RoundRobin))
        .build()
        .unwrap();
    assert_eq!(client.balancer().ready().await.unwrap(), 3);

    // Callers run through the outage.
    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicUsize::new(0));
    let caller = {
        let (client, stop, failed) = (client.clone(), stop.clone(), failed.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let request = http::Request::get("/whoami").body(Bytes::new()).unwrap();
                if client.http().send(request).await.is_err() {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };

    double.kill().await;
    eventually(Duration::from_secs(10), "the watch to notice", || async {
        cached.is_degraded()
    })
    .await;
    hits.lock().unwrap().clear();
    eventually(
        Duration::from_secs(10),
        "traffic on every known instance",
        || async { hits.lock().unwrap().values().filter(|&&n| n >= 10).count() == 3 },
    )
    .await;
    assert_eq!(
        ids(&cached.instances("product-service").await.unwrap()).len(),
        3
    );
    let report = cached.health_check().run().await;
    assert!(!report.critical);
    assert!(report
        .error
        .unwrap()
        .contains("served from 3 last known instances"));

    // The agent comes back; a change made there reaches the client.
    double.restart().await;
    consul
        .deregister("product-service", "product-2")
        .await
        .unwrap();
    eventually(
        Duration::from_secs(10),
        "product-2 to leave the rotation",
        || async { client.balancer().endpoints().len() == 2 },
    )
    .await;
    eventually(Duration::from_secs(10), "the cache to recover", || async {
        !cached.is_degraded()
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    caller.await.unwrap();
    assert_eq!(failed.load(Ordering::Relaxed), 0, "no call failed");
}

/// A CA and a certificate it issued for 127.0.0.1, as PEM files in `dir`.
fn loopback_pki(dir: &std::path::Path) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    std::fs::write(dir.join("ca.pem"), ca.self_signed(&ca_key).unwrap().pem()).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    std::fs::write(dir.join("server.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("server.key"), key.serialize_pem()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_is_reached_over_https_verified_against_its_ca() {
    let dir = tempfile::tempdir().unwrap();
    loopback_pki(dir.path());
    let double = ConsulDouble::start_tls(micro_core::tls::TlsConfig::new(
        dir.path().join("server.pem"),
        dir.path().join("server.key"),
    ))
    .await;
    assert!(double.address().starts_with("https://"));
    let tls = micro_core::tls::ClientTlsConfig::new().ca(dir.path().join("ca.pem"));
    let consul = ConsulRegistry::new(config(&double).tls(tls)).unwrap();
    let instance = Instance::new("orders", "orders-1", "10.0.0.7", 8003);
    consul
        .register(&Registration::new(instance.clone()))
        .await
        .unwrap();
    let found = consul.instances("orders").await.unwrap();
    assert_eq!(ids(&found), ["orders-1"]);

    // The system store does not know the test CA: nothing is sent.
    let untrusting = ConsulRegistry::new(config(&double)).unwrap();
    assert!(untrusting.instances("orders").await.is_err());
    assert_eq!(double.registrations().len(), 1);

    // A CA file that can't be read is refused when the registry is made.
    let error = ConsulRegistry::new(
        config(&double)
            .tls(micro_core::tls::ClientTlsConfig::new().ca(dir.path().join("nope.pem"))),
    )
    .unwrap_err();
    assert!(error.to_string().contains("`ca`"), "{error}");
}
