//! The etcd backend against a real etcd server: the conformance suite, leases, watches
//! across connections, and an outage.
//!
//! The server is found through `MICRO_TEST_ETCD_ENDPOINT` (set by `scripts/etcd.sh`),
//! else `http://127.0.0.1:23790`, where that script starts it. An unreachable server
//! fails the tests. Each test works under its own key prefix.

#![cfg(feature = "etcd")]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use micro_discovery::etcd::etcd_client::Client;
use micro_discovery::etcd::{EtcdConfig, EtcdRegistry};
use micro_discovery::{CachedDiscover, Discover, HealthStatus, Instance, Registration, Registry};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::conformance::{conformance_tests, Backend};
use crate::support::{eventually, ids, watch_until};

pub(crate) fn endpoint() -> String {
    std::env::var("MICRO_TEST_ETCD_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:23790".into())
}

/// A key prefix no other test uses.
pub(crate) fn fresh_prefix() -> String {
    format!("/micro-test/{:016x}/", rand::random::<u64>())
}

/// A registry on `endpoint` under `prefix`, checked to answer.
pub(crate) async fn connect(endpoint: &str, prefix: &str) -> EtcdRegistry {
    let config = EtcdConfig::new([endpoint])
        .prefix(prefix)
        .request_timeout(Duration::from_secs(2))
        .max_retry_backoff(Duration::from_millis(500));
    let registry = EtcdRegistry::connect(&config)
        .await
        .unwrap_or_else(|error| {
            panic!("cannot set up an etcd client for {endpoint}: {error} (run scripts/etcd.sh)")
        });
    if let Err(error) = registry.instances("probe").await {
        panic!("etcd at {endpoint} is unreachable: {error:?} (start it with `source scripts/servers.sh && servers_up`)");
    }
    registry
}

pub(crate) struct Etcd(EtcdRegistry);

impl Backend for Etcd {
    async fn new() -> Self {
        Self(connect(&endpoint(), &fresh_prefix()).await)
    }

    fn registry(&self) -> Arc<dyn Registry> {
        Arc::new(self.0.clone())
    }

    fn discover(&self) -> Arc<dyn Discover> {
        Arc::new(self.0.clone())
    }

    fn short_ttl(&self) -> Duration {
        // etcd's shortest lease with default settings.
        Duration::from_secs(2)
    }
}

conformance_tests!(Etcd, (flavor = "multi_thread", worker_threads = 2));

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lapsed_lease_deletes_the_key_once_keep_alives_stop() {
    let prefix = fresh_prefix();
    let registry = connect(&endpoint(), &prefix).await;
    let mut raw = Client::connect([endpoint()], None).await.unwrap();
    let ttl = Duration::from_secs(2);
    registry
        .register(
            &Registration::new(Instance::new("leased", "leased-1", "127.0.0.1", 7001)).ttl(ttl),
        )
        .await
        .unwrap();
    let key = format!("{prefix}leased/leased-1");
    let stored = raw.get(key.as_str(), None).await.unwrap();
    let lease = stored.kvs()[0].lease();
    assert_ne!(lease, 0, "a registration with a ttl is attached to a lease");
    let granted = raw.lease_time_to_live(lease, None).await.unwrap();
    assert_eq!(granted.granted_ttl(), 2);

    // Renewed for three leases' worth of time, it stays.
    let until = tokio::time::Instant::now() + ttl * 3;
    while tokio::time::Instant::now() < until {
        registry.keep_alive("leased", "leased-1").await.unwrap();
        tokio::time::sleep(ttl / 4).await;
    }
    assert_eq!(
        ids(&registry.instances("leased").await.unwrap()),
        ["leased-1"]
    );

    // Renewals stop: etcd revokes the lease and deletes the key.
    let mut watch = registry.watch("leased");
    watch_until(&mut watch, ttl * 4, "the lease to lapse", |set| {
        set.is_empty()
    })
    .await;
    assert!(raw.get(key.as_str(), None).await.unwrap().kvs().is_empty());
    assert!(registry.all_instances("leased").await.unwrap().is_empty());
    let err = registry.keep_alive("leased", "leased-1").await.unwrap_err();
    assert!(
        matches!(err, micro_discovery::Error::NotRegistered { .. }),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_connection_watches_registrations_and_deregistrations() {
    let prefix = fresh_prefix();
    let writer = connect(&endpoint(), &prefix).await;
    let reader = connect(&endpoint(), &prefix).await;
    let within = Duration::from_secs(10);
    let mut watch = reader.watch("catalog");
    watch_until(&mut watch, within, "the empty set", |set| set.is_empty()).await;

    let first = Instance::new("catalog", "catalog-1", "10.0.0.1", 8002).with_version("1.0");
    writer
        .register(&Registration::new(first.clone()).ttl(Duration::from_secs(30)))
        .await
        .unwrap();
    let set = watch_until(&mut watch, within, "catalog-1", |set| set.len() == 1).await;
    assert_eq!(set, vec![first]);

    writer
        .register(&Registration::new(Instance::new(
            "catalog",
            "catalog-2",
            "10.0.0.2",
            8002,
        )))
        .await
        .unwrap();
    watch_until(&mut watch, within, "catalog-2", |set| {
        ids(set) == ["catalog-1", "catalog-2"]
    })
    .await;

    writer
        .report_health("catalog", "catalog-2", HealthStatus::Warning)
        .await
        .unwrap();
    let set = watch_until(&mut watch, within, "catalog-2 warning", |set| {
        set.iter().any(|i| i.health == HealthStatus::Warning)
    })
    .await;
    assert_eq!(set.len(), 2, "a warning instance is still discovered");

    writer.deregister("catalog", "catalog-1").await.unwrap();
    watch_until(&mut watch, within, "catalog-1 to leave", |set| {
        ids(set) == ["catalog-2"]
    })
    .await;
    writer.deregister("catalog", "catalog-2").await.unwrap();
    watch_until(&mut watch, within, "nothing", |set| set.is_empty()).await;
}

/// A TCP forwarder to etcd that can be cut and restored on the same port: an outage as
/// the client sees it, without touching the shared server.
struct Proxy {
    addr: SocketAddr,
    target: SocketAddr,
    tasks: JoinSet<()>,
}

impl Proxy {
    async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut proxy = Self {
            addr,
            target,
            tasks: JoinSet::new(),
        };
        proxy.serve(listener);
        proxy
    }

    fn serve(&mut self, listener: TcpListener) {
        let target = self.target;
        let (conn_tx, mut conn_rx) = tokio::sync::mpsc::unbounded_channel();
        self.tasks.spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                if conn_tx.send(stream).is_err() {
                    return;
                }
            }
        });
        self.tasks.spawn(async move {
            let mut connections = JoinSet::new();
            while let Some(mut inbound) = conn_rx.recv().await {
                connections.spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
    }

    /// Closes the listener and every forwarded connection.
    async fn cut(&mut self) {
        self.tasks.shutdown().await;
    }

    /// Listens again on the same port.
    async fn restore(&mut self) {
        let listener = TcpListener::bind(self.addr).await.unwrap();
        self.serve(listener);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_keeps_the_last_known_instances_and_a_reconnect_reads_afresh() {
    let prefix = fresh_prefix();
    let direct = connect(&endpoint(), &prefix).await;
    let target: SocketAddr = endpoint()
        .trim_start_matches("http://")
        .parse()
        .expect("the etcd endpoint is http://ip:port");
    let mut proxy = Proxy::start(target).await;
    let through_proxy = connect(&format!("http://{}", proxy.addr), &prefix).await;
    let cached = CachedDiscover::new(through_proxy.clone());
    for (id, port) in [("stock-1", 8006), ("stock-2", 9006)] {
        direct
            .register(&Registration::new(Instance::new(
                "stock",
                id,
                "127.0.0.1",
                port,
            )))
            .await
            .unwrap();
    }
    let within = Duration::from_secs(15);
    let mut watch = through_proxy.watch("stock");
    watch_until(&mut watch, within, "both instances", |set| set.len() == 2).await;
    assert_eq!(cached.instances("stock").await.unwrap().len(), 2);

    proxy.cut().await;
    // The watch reports the failure and goes on; reads fail, the cache answers.
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let item = tokio::time::timeout_at(deadline, futures_util::StreamExt::next(&mut watch))
            .await
            .expect("the watch reports the outage")
            .expect("the watch goes on");
        if let Err(error) = item {
            assert!(error.is_retryable(), "{error:?}");
            break;
        }
    }
    let err = through_proxy.instances("stock").await.unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
    assert_eq!(
        ids(&cached.instances("stock").await.unwrap()),
        ["stock-1", "stock-2"]
    );
    assert!(cached.is_degraded());

    // Meanwhile the registry changes; after the reconnect the watch reads it afresh.
    direct.deregister("stock", "stock-1").await.unwrap();
    proxy.restore().await;
    let set = watch_until(
        &mut watch,
        within,
        "the change made during the outage",
        |set| set.len() == 1,
    )
    .await;
    assert_eq!(ids(&set), ["stock-2"]);
    eventually(within, "the cache to recover", || async {
        cached.instances("stock").await.is_ok() && !cached.is_degraded()
    })
    .await;
    assert_eq!(ids(&cached.instances("stock").await.unwrap()), ["stock-2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_one_of_three_instances_loses_no_request() {
    // HTTP checks run in this process and write their outcome to etcd; the client
    // follows an etcd watch from a second connection.
    let prefix = fresh_prefix();
    let registry = connect(&endpoint(), &prefix).await;
    let watcher = connect(&endpoint(), &prefix).await;
    crate::balance::kill_one_of_three(
        Arc::new(registry),
        Arc::new(watcher),
        Duration::from_millis(300),
    )
    .await;
}

/// A CA and certificates it issued, for 127.0.0.1 (`server`) and for a client
/// (`client`), as PEM files in `dir`.
fn loopback_pki(dir: &std::path::Path) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    std::fs::write(dir.join("ca.pem"), ca.self_signed(&ca_key).unwrap().pem()).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    for (name, san, usage) in [
        (
            "server",
            "127.0.0.1",
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        ),
        (
            "client",
            "registry.internal",
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ),
    ] {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![san.to_owned()]).unwrap();
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &issuer).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    }
}

/// A free loopback port (bound and released; etcd binds it next).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A second etcd (Debian's `etcd` binary, as `scripts/etcd.sh` installs it) that serves
/// clients only over TLS and asks them for a certificate; killed when dropped.
struct TlsEtcd {
    child: std::process::Child,
    endpoint: String,
}

impl TlsEtcd {
    fn start(dir: &std::path::Path) -> Self {
        let (client, peer) = (free_port(), free_port());
        let endpoint = format!("https://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let child = std::process::Command::new("etcd")
            .arg("--name=micro-tls")
            .arg(format!("--data-dir={}", dir.join("data").display()))
            .arg(format!("--listen-client-urls={endpoint}"))
            .arg(format!("--advertise-client-urls={endpoint}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=micro-tls={peer_url}"))
            .arg(format!("--cert-file={}", dir.join("server.pem").display()))
            .arg(format!("--key-file={}", dir.join("server.key").display()))
            .arg(format!(
                "--trusted-ca-file={}",
                dir.join("ca.pem").display()
            ))
            .arg("--client-cert-auth")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.join("etcd.log")).unwrap())
            .spawn()
            .expect("Debian's etcd runs (scripts/etcd.sh installs it)");
        Self { child, endpoint }
    }
}

impl Drop for TlsEtcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_is_reached_over_tls_with_a_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    loopback_pki(dir.path());
    let etcd = TlsEtcd::start(dir.path());
    let tls = micro_core::tls::ClientTlsConfig::new()
        .ca(dir.path().join("ca.pem"))
        .client_cert(dir.path().join("client.pem"), dir.path().join("client.key"));
    let config = EtcdConfig::new([etcd.endpoint.as_str()])
        .prefix(fresh_prefix())
        .request_timeout(Duration::from_secs(2))
        .tls(tls);
    let registry = EtcdRegistry::connect(&config).await.unwrap();
    // etcd takes a moment to start: poll until it answers.
    eventually(
        Duration::from_secs(20),
        "the tls etcd to answer",
        || async { registry.instances("probe").await.is_ok() },
    )
    .await;
    let instance = Instance::new("orders", "orders-1", "10.0.0.7", 8003);
    registry
        .register(&Registration::new(instance))
        .await
        .unwrap();
    assert_eq!(
        ids(&registry.instances("orders").await.unwrap()),
        ["orders-1"]
    );

    // Without the client certificate the cluster turns the client away.
    let anonymous = EtcdConfig::new([etcd.endpoint.as_str()])
        .prefix(fresh_prefix())
        .request_timeout(Duration::from_secs(2))
        .tls(micro_core::tls::ClientTlsConfig::new().ca(dir.path().join("ca.pem")));
    let anonymous = EtcdRegistry::connect(&anonymous).await.unwrap();
    assert!(anonymous.instances("orders").await.is_err());

    // https without tls, tls without https, and unreadable files are refused up front.
    let bare = EtcdConfig::new([etcd.endpoint.as_str()]);
    assert!(EtcdRegistry::connect(&bare).await.is_err());
    let plain = EtcdConfig::new([endpoint()])
        .tls(micro_core::tls::ClientTlsConfig::new().ca(dir.path().join("ca.pem")));
    assert!(EtcdRegistry::connect(&plain).await.is_err());
    let missing = EtcdConfig::new([etcd.endpoint.as_str()])
        .tls(micro_core::tls::ClientTlsConfig::new().ca(dir.path().join("nope.pem")));
    let error = EtcdRegistry::connect(&missing).await.unwrap_err();
    assert!(error.to_string().contains("`ca`"), "{error}");
}
