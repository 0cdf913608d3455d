//! TLS termination and mTLS on a real listener, tried with Debian's `curl` as an
//! independent client, with raw TCP clients that misbehave, and with micro-core's own
//! HTTPS client. Every certificate is made by the test.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use axum::routing::get;
use axum::{Extension, Json, Router};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use micro_core::client::{ErrorKind, HttpClient};
use micro_core::host::{HostError, RunningHost, ServiceHost};
use micro_core::listener::ListenerConfig;
use micro_core::service::Service;
use micro_core::tls::{ClientAuth, ClientTlsConfig, PeerCertificate, TlsConfig};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// A CA, a server certificate it issued for `localhost` and `127.0.0.1`, and a client
/// certificate it issued for `orders-service`, written as PEM files in a fresh directory.
struct Pki {
    dir: tempfile::TempDir,
    issuer: Issuer<'static, KeyPair>,
}

impl Pki {
    fn new() -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "micro test ca");
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let ca = params.self_signed(&key).unwrap();
        let pki = Self {
            dir: tempfile::tempdir().unwrap(),
            issuer: Issuer::new(params, key),
        };
        std::fs::write(pki.path("ca.pem"), ca.pem()).unwrap();
        pki.issue_server(1);
        pki.issue_client("client", "orders-service");
        pki
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// (Re)writes `server.pem` and `server.key` with a new key and this serial number,
    /// each file replaced in one rename. Returns the certificate's DER.
    fn issue_server(&self, serial: u64) -> CertificateDer<'static> {
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("server {serial}"));
        params.serial_number = Some(SerialNumber::from(serial));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        replace(&self.path("server.key"), &key.serialize_pem());
        replace(&self.path("server.pem"), &cert.pem());
        cert.der().clone()
    }

    /// Writes `<name>.pem` and `<name>.key`: a client certificate for `common_name`.
    fn issue_client(&self, name: &str, common_name: &str) {
        let mut params = CertificateParams::new(vec![format!("{common_name}.internal")]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.subject_alt_names.push(SanType::URI(
            format!("spiffe://shop.internal/{common_name}")
                .try_into()
                .unwrap(),
        ));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        std::fs::write(self.path(&format!("{name}.key")), key.serialize_pem()).unwrap();
        std::fs::write(self.path(&format!("{name}.pem")), cert.pem()).unwrap();
    }

    fn server_tls(&self) -> TlsConfig {
        TlsConfig::new(self.path("server.pem"), self.path("server.key"))
    }

    fn mtls(&self, auth: ClientAuth) -> TlsConfig {
        self.server_tls().client_ca(self.path("ca.pem"), auth)
    }

    fn client_tls(&self) -> ClientTlsConfig {
        ClientTlsConfig::new().ca(self.path("ca.pem"))
    }
}

fn replace(path: &Path, contents: &str) {
    let staged = path.with_extension("staged");
    std::fs::write(&staged, contents).unwrap();
    std::fs::rename(&staged, path).unwrap();
}

struct Secure;

impl Service for Secure {
    fn name(&self) -> &str {
        "secure"
    }

    fn router(&self) -> Router {
        Router::new()
            .route("/hello", get(|| async { "hello" }))
            .route(
                "/whoami",
                get(|peer: Option<Extension<PeerCertificate>>| async move {
                    Json(match peer {
                        Some(Extension(peer)) => serde_json::json!({
                            "common_name": peer.common_name(),
                            "dns_names": peer.dns_names(),
                            "uri_names": peer.uri_names(),
                        }),
                        None => serde_json::json!({ "anonymous": true }),
                    })
                }),
            )
    }
}

async fn start(limits: ListenerConfig) -> (RunningHost, SocketAddr) {
    let host = ServiceHost::builder()
        .service_with(Secure, "127.0.0.1:0".parse().unwrap(), limits)
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let addr = host.local_addr("secure").unwrap();
    (host, addr)
}

async fn stop(host: RunningHost) {
    host.shutdown_trigger().trigger();
    host.run_until(std::future::pending()).await;
}

/// What `curl` did: its exit code, what it printed and what it complained about.
#[derive(Debug)]
struct Curl {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs Debian's `curl` against `https://localhost:<port><path>` (resolved to the
/// listener), with `args` before the URL.
async fn curl(addr: SocketAddr, path: &str, args: &[&str]) -> Curl {
    let mut command = Command::new("curl");
    command
        .args(["--silent", "--show-error", "--max-time", "10"])
        .arg("--resolve")
        .arg(format!("localhost:{}:127.0.0.1", addr.port()))
        .args(args)
        .arg(format!("https://localhost:{}{path}", addr.port()));
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .unwrap()
        .expect("curl runs (Debian's curl package)");
    Curl {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Reads until the peer closes the connection, failing past `within`. Returns what was read.
async fn until_closed(stream: &mut TcpStream, within: Duration) -> Vec<u8> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return seen,
            Ok(Ok(n)) => seen.extend_from_slice(&buf[..n]),
            Err(_) => panic!("the server kept the connection open past {within:?}"),
        }
    }
}

/// A TLS connection made with rustls (through micro-core's client configuration),
/// speaking HTTP/1.1, with the certificate the server showed.
struct Connection {
    sender: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    server_cert: CertificateDer<'static>,
}

impl Connection {
    async fn open(addr: SocketAddr, tls: &ClientTlsConfig) -> anyhow::Result<Self> {
        let mut config = tls.rustls_config()?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let tcp = TcpStream::connect(addr).await?;
        let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("localhost")?, tcp)
            .await?;
        let server_cert = stream.get_ref().1.peer_certificates().unwrap()[0].clone();
        let (sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        Ok(Self {
            sender,
            server_cert,
        })
    }

    async fn get(&mut self, path: &str) -> anyhow::Result<String> {
        let request = http::Request::get(path)
            .header("host", "localhost")
            .body(Empty::new())?;
        let response = self.sender.send_request(request).await?;
        anyhow::ensure!(response.status() == 200, "status {}", response.status());
        let body = response.into_body().collect().await?.to_bytes();
        Ok(String::from_utf8(body.to_vec())?)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_is_served_over_https_with_h2_or_http1_by_alpn() {
    let pki = Pki::new();
    let (host, addr) = start(ListenerConfig::default().tls(pki.server_tls())).await;
    let ca = pki.path("ca.pem");
    let ca = ca.to_str().unwrap();

    let h2 = curl(
        addr,
        "/hello",
        &["--cacert", ca, "--http2", "--write-out", " %{http_version}"],
    )
    .await;
    assert_eq!(h2.code, 0, "{h2:?}");
    assert_eq!(h2.stdout, "hello 2", "{h2:?}");

    let h1 = curl(
        addr,
        "/hello",
        &[
            "--cacert",
            ca,
            "--http1.1",
            "--write-out",
            " %{http_version}",
        ],
    )
    .await;
    assert_eq!(h1.code, 0, "{h1:?}");
    assert_eq!(h1.stdout, "hello 1.1", "{h1:?}");

    // Without the CA, curl does not trust the server: the certificate is really checked.
    let untrusted = curl(addr, "/hello", &[]).await;
    assert_eq!(untrusted.code, 60, "{untrusted:?}");
    assert!(untrusted.stderr.contains("certificate"), "{untrusted:?}");
    stop(host).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_listener_refuses_plain_text() {
    let pki = Pki::new();
    let (host, addr) = start(ListenerConfig::default().tls(pki.server_tls())).await;

    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /hello HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .unwrap();
    let seen = until_closed(&mut stream, Duration::from_secs(5)).await;
    assert!(
        !seen.starts_with(b"HTTP"),
        "answered in plain text: {seen:?}"
    );
    // What comes back, if anything, is a TLS alert record.
    assert!(seen.is_empty() || seen[0] == 0x15, "{seen:?}");

    let plain = Command::new("curl")
        .args(["--silent", "--max-time", "10"])
        .arg(format!("http://127.0.0.1:{}/hello", addr.port()))
        .output()
        .unwrap();
    assert!(!plain.status.success(), "{plain:?}");
    assert!(plain.stdout.is_empty(), "{plain:?}");
    stop(host).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_refuses_a_client_without_a_certificate_and_shows_the_verified_identity() {
    let pki = Pki::new();
    let (host, addr) = start(ListenerConfig::default().tls(pki.mtls(ClientAuth::Required))).await;
    let (ca, cert, key) = (
        pki.path("ca.pem"),
        pki.path("client.pem"),
        pki.path("client.key"),
    );
    let (ca, cert, key) = (
        ca.to_str().unwrap(),
        cert.to_str().unwrap(),
        key.to_str().unwrap(),
    );

    let anonymous = curl(addr, "/whoami", &["--cacert", ca]).await;
    assert_ne!(anonymous.code, 0, "{anonymous:?}");
    assert!(anonymous.stdout.is_empty(), "{anonymous:?}");

    let known = curl(
        addr,
        "/whoami",
        &["--cacert", ca, "--cert", cert, "--key", key],
    )
    .await;
    assert_eq!(known.code, 0, "{known:?}");
    let identity: serde_json::Value = serde_json::from_str(&known.stdout).unwrap();
    assert_eq!(identity["common_name"], "orders-service");
    assert_eq!(
        identity["dns_names"],
        serde_json::json!(["orders-service.internal"])
    );
    assert_eq!(
        identity["uri_names"],
        serde_json::json!(["spiffe://shop.internal/orders-service"])
    );

    // A certificate from another CA is refused, whatever its name says.
    let stranger = Pki::new();
    let (cert, key) = (stranger.path("client.pem"), stranger.path("client.key"));
    let forged = curl(
        addr,
        "/whoami",
        &[
            "--cacert",
            ca,
            "--cert",
            cert.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
        ],
    )
    .await;
    assert_ne!(forged.code, 0, "{forged:?}");
    assert!(forged.stdout.is_empty(), "{forged:?}");
    stop(host).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn optional_client_certificates_let_anonymous_clients_in_without_an_identity() {
    let pki = Pki::new();
    let (host, addr) = start(ListenerConfig::default().tls(pki.mtls(ClientAuth::Optional))).await;
    let ca = pki.path("ca.pem");
    let anonymous = curl(addr, "/whoami", &["--cacert", ca.to_str().unwrap()]).await;
    assert_eq!(anonymous.code, 0, "{anonymous:?}");
    assert_eq!(anonymous.stdout, r#"{"anonymous":true}"#);

    let client = HttpClient::builder(&format!("https://127.0.0.1:{}", addr.port()))
        .tls(
            pki.client_tls()
                .client_cert(pki.path("client.pem"), pki.path("client.key")),
        )
        .build()
        .unwrap();
    let identity: serde_json::Value = client.get_json("/whoami").await.unwrap();
    assert_eq!(identity["common_name"], "orders-service");
    stop(host).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_certificate_files_reach_new_connections_while_open_ones_keep_working() {
    let pki = Pki::new();
    let first = pki.issue_server(1);
    let tls = pki.server_tls().reload_interval(Duration::from_millis(50));
    let (host, addr) = start(ListenerConfig::default().tls(tls)).await;

    let mut old = Connection::open(addr, &pki.client_tls()).await.unwrap();
    assert_eq!(old.server_cert, first);
    assert_eq!(old.get("/hello").await.unwrap(), "hello");

    let second = pki.issue_server(2);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let fresh = Connection::open(addr, &pki.client_tls()).await.unwrap();
        if fresh.server_cert == second {
            break;
        }
        assert_eq!(
            fresh.server_cert, first,
            "neither the old nor the new certificate"
        );
        assert!(
            Instant::now() < deadline,
            "the new certificate was not picked up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The connection made before the rotation is still served.
    assert_eq!(old.get("/hello").await.unwrap(), "hello");

    // Files that can't be used leave the current certificate in place.
    std::fs::write(pki.path("server.key"), "not a key").unwrap();
    let reloader = host.tls_reloader("secure").unwrap();
    let error = reloader.reload().unwrap_err();
    assert_eq!(error.key(), "tls.key");
    assert!(reloader
        .last_error()
        .unwrap()
        .contains("no PEM private key"));
    let after = Connection::open(addr, &pki.client_tls()).await.unwrap();
    assert_eq!(after.server_cert, second);

    // An explicit reload of good files takes effect at once.
    let third = pki.issue_server(3);
    reloader.reload().unwrap();
    assert_eq!(reloader.last_error(), None);
    let after = Connection::open(addr, &pki.client_tls()).await.unwrap();
    assert_eq!(after.server_cert, third);
    assert_eq!(old.get("/hello").await.unwrap(), "hello");
    stop(host).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stalls_the_handshake_is_closed_by_the_header_timeout() {
    let pki = Pki::new();
    let limits = ListenerConfig::default()
        .header_read_timeout(Duration::from_millis(500))
        .tls(pki.server_tls());
    let (host, addr) = start(limits).await;

    // One sends nothing; one sends the first bytes of a ClientHello record and stops.
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let mut partial = TcpStream::connect(addr).await.unwrap();
    partial
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .await
        .unwrap();
    let ca = pki.path("ca.pem");
    let served = curl(addr, "/hello", &["--cacert", ca.to_str().unwrap()]).await;
    assert_eq!(served.stdout, "hello", "{served:?}");
    assert!(until_closed(&mut silent, Duration::from_secs(5))
        .await
        .is_empty());
    assert!(until_closed(&mut partial, Duration::from_secs(5))
        .await
        .is_empty());
    stop(host).await;
}

fn build_error(tls: TlsConfig) -> micro_core::tls::TlsError {
    let error = ServiceHost::builder()
        .service_with(
            Secure,
            "127.0.0.1:0".parse().unwrap(),
            ListenerConfig::default().tls(tls),
        )
        .build()
        .unwrap_err();
    match error {
        HostError::Tls { service, source } => {
            assert_eq!(service, "secure");
            source
        }
        other => panic!("expected a tls error, got {other}"),
    }
}

#[test]
fn unusable_tls_files_are_refused_at_build_with_their_setting() {
    let pki = Pki::new();
    let missing = build_error(TlsConfig::new(pki.path("nope.pem"), pki.path("server.key")));
    assert_eq!(missing.key(), "tls.cert");
    assert_eq!(missing.path(), Some(pki.path("nope.pem").as_path()));
    assert!(missing.to_string().contains("can't be read"), "{missing}");

    std::fs::write(pki.path("garbage.pem"), "hello").unwrap();
    let not_pem = build_error(TlsConfig::new(
        pki.path("server.pem"),
        pki.path("garbage.pem"),
    ));
    assert_eq!(not_pem.key(), "tls.key");
    let not_pem = build_error(TlsConfig::new(
        pki.path("garbage.pem"),
        pki.path("server.key"),
    ));
    assert_eq!(not_pem.key(), "tls.cert");

    let mismatch = build_error(TlsConfig::new(
        pki.path("server.pem"),
        pki.path("client.key"),
    ));
    assert_eq!(mismatch.key(), "tls.key");
    assert!(
        mismatch.to_string().contains("can't be used with"),
        "{mismatch}"
    );

    let bad_ca = build_error(
        pki.server_tls()
            .client_ca(pki.path("garbage.pem"), ClientAuth::Required),
    );
    assert_eq!(bad_ca.key(), "tls.client_ca");
}

#[test]
fn tls_is_configured_from_toml_and_half_set_ups_are_refused() {
    let pki = Pki::new();
    let toml = format!(
        "[tls]\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\nclient_auth = \"optional\"\nreload_interval = \"5s\"\n",
        pki.path("server.pem"),
        pki.path("server.key"),
        pki.path("ca.pem"),
    );
    let config: ListenerConfig = micro_core::config::ConfigLoader::new()
        .toml_str(&toml)
        .load()
        .unwrap();
    let tls = config.tls.clone().unwrap();
    assert_eq!(tls.client_auth, Some(ClientAuth::Optional));
    assert_eq!(tls.reload_interval, Duration::from_secs(5));
    ServiceHost::builder()
        .service_with(Secure, "127.0.0.1:0".parse().unwrap(), config)
        .build()
        .unwrap();

    let toml = format!(
        "[tls]\ncert = {:?}\nkey = {:?}\nclient_auth = \"required\"\n",
        pki.path("server.pem"),
        pki.path("server.key"),
    );
    let config: ListenerConfig = micro_core::config::ConfigLoader::new()
        .toml_str(&toml)
        .load()
        .unwrap();
    let error = build_error(config.tls.unwrap());
    assert_eq!(error.key(), "tls.client_auth");

    let error = micro_core::config::ConfigLoader::new()
        .toml_str("[tls]\ncert = \"a.pem\"\nkey = \"a.key\"\nciphers = \"all\"\n")
        .load::<ListenerConfig>()
        .unwrap_err();
    assert!(error.to_string().contains("ciphers"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_client_calls_https_with_h2_and_verifies_the_server() {
    let pki = Pki::new();
    let (host, addr) = start(ListenerConfig::default().tls(pki.server_tls())).await;
    let base = format!("https://127.0.0.1:{}", addr.port());

    let client = HttpClient::builder(&base)
        .tls(pki.client_tls())
        .build()
        .unwrap();
    let response = client
        .request(http::Method::GET, "/hello")
        .send()
        .await
        .unwrap();
    assert_eq!(response.body().as_ref(), b"hello");
    assert_eq!(response.version(), http::Version::HTTP_2);

    // SNI and name checks: the certificate is for localhost and 127.0.0.1 only.
    let pki_other = Pki::new();
    let stranger = HttpClient::builder(&base)
        .tls(pki_other.client_tls())
        .build()
        .unwrap();
    let error = stranger
        .get_json::<serde_json::Value>("/hello")
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Connect, "{error:?}");

    // The system store does not know the test CA.
    let system = HttpClient::builder(&base).build().unwrap();
    let error = system
        .request(http::Method::GET, "/hello")
        .send()
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Connect, "{error:?}");

    // Only the loudly named option turns verification off.
    let reckless = HttpClient::builder(&base)
        .tls(ClientTlsConfig::new().danger_accept_invalid_certs(true))
        .build()
        .unwrap();
    let response = reckless
        .request(http::Method::GET, "/hello")
        .send()
        .await
        .unwrap();
    assert_eq!(response.body().as_ref(), b"hello");

    // A plain-http client refuses an absolute https URL instead of sending it unverified.
    let plain = HttpClient::new("http://127.0.0.1:9").unwrap();
    let error = plain
        .send(
            http::Request::get(format!("{base}/hello"))
                .body(Bytes::new())
                .unwrap(),
        )
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::InvalidUrl, "{error:?}");
    stop(host).await;
}

#[test]
fn unusable_client_tls_files_fail_the_build() {
    let pki = Pki::new();
    let error = HttpClient::builder("https://localhost")
        .tls(ClientTlsConfig::new().ca(pki.path("nope.pem")))
        .build()
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Tls);
    let source = std::error::Error::source(&error)
        .and_then(|source| source.downcast_ref::<micro_core::tls::TlsError>())
        .unwrap();
    assert_eq!(source.key(), "ca");

    let mut half = pki.client_tls();
    half.cert = Some(pki.path("client.pem"));
    let error = HttpClient::builder("https://localhost")
        .tls(half)
        .build()
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Tls);
}
