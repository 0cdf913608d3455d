//! TLS for clients: which CAs to trust, which certificate to show.

use std::path::PathBuf;
use std::sync::Arc;

use hyper_util::client::legacy::connect::HttpConnector;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use serde::{Deserialize, Serialize};

use super::files::{self, TlsError};

/// A hyper connector that speaks TLS to `https` URLs and plain TCP to `http` ones, with
/// ALPN `h2` and `http/1.1`; from [`ClientTlsConfig::https_connector`].
pub type HttpsConnector = hyper_rustls::HttpsConnector<HttpConnector>;

/// How a client verifies the servers it calls over HTTPS, and which certificate it shows
/// them (mTLS). Deserializes from configuration:
///
/// ```toml
/// ca = "/etc/micro/tls/internal-ca.pem"   # trust these CAs instead of the system store
/// cert = "/etc/micro/tls/orders.pem"      # a client certificate for mTLS...
/// key = "/etc/micro/tls/orders.key"       # ...and its key
/// ```
///
/// With no [`ca`](Self::ca), the system's trust store is used, found as OpenSSL finds it
/// (which honours the `SSL_CERT_FILE` and `SSL_CERT_DIR` environment variables).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct ClientTlsConfig {
    /// A PEM bundle of the CAs to trust, in place of the system store.
    pub ca: Option<PathBuf>,
    /// The PEM file of a client certificate chain, the leaf first, shown to servers that
    /// ask for one. Needs [`key`](Self::key).
    pub cert: Option<PathBuf>,
    /// The PEM file of the client certificate's private key. Needs [`cert`](Self::cert).
    pub key: Option<PathBuf>,
    /// Accepts any server certificate, expired, self-signed or for another name: the
    /// connection is encrypted but the server is not authenticated, so anyone on the path
    /// can read and change the traffic. For a test bench only; a warning is logged each
    /// time a connector is built with it. Off by default.
    pub danger_accept_invalid_certs: bool,
}

impl ClientTlsConfig {
    /// The system trust store, and no client certificate.
    pub fn new() -> Self {
        Self::default()
    }

    /// Trusts the CAs of this PEM bundle instead of the system store.
    pub fn ca(mut self, bundle: impl Into<PathBuf>) -> Self {
        self.ca = Some(bundle.into());
        self
    }

    /// Shows this certificate chain and key (PEM files) to servers that ask for one.
    pub fn client_cert(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.cert = Some(cert.into());
        self.key = Some(key.into());
        self
    }

    /// Sets [`danger_accept_invalid_certs`](Self::danger_accept_invalid_certs): read its
    /// warning first.
    pub fn danger_accept_invalid_certs(mut self, accept: bool) -> Self {
        self.danger_accept_invalid_certs = accept;
        self
    }

    /// Reads the files and builds the rustls configuration, with ALPN `h2` and
    /// `http/1.1`.
    ///
    /// # Errors
    ///
    /// A file that can't be read or holds no usable PEM, a key that does not match the
    /// certificate, a certificate without a key or the other way round, or no CA at all
    /// (no [`ca`](Self::ca) and an empty system store).
    pub fn rustls_config(&self) -> Result<ClientConfig, TlsError> {
        let provider = super::provider();
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|source| {
                TlsError::new("tls", "has no usable protocol version").with_source(source)
            })?;
        let builder = if self.danger_accept_invalid_certs {
            tracing::warn!(
                "tls: `danger_accept_invalid_certs` is set: servers' certificates are not verified"
            );
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAnyCert(provider)))
        } else {
            builder.with_root_certificates(self.roots()?)
        };
        let mut config = match (&self.cert, &self.key) {
            (None, None) => builder.with_no_client_auth(),
            (Some(cert), Some(key)) => {
                let chain = files::certs(cert, "cert")?;
                let private = files::private_key(key, "key")?;
                builder
                    .with_client_auth_cert(chain, private)
                    .map_err(|source| {
                        TlsError::new(
                            "key",
                            "can't be used with the certificate of `cert` (not its key, or an unsupported kind)",
                        )
                        .at(key)
                        .with_source(source)
                    })?
            }
            (Some(_), None) => return Err(TlsError::new("cert", "needs `key`")),
            (None, Some(_)) => return Err(TlsError::new("key", "needs `cert`")),
        };
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(config)
    }

    fn roots(&self) -> Result<RootCertStore, TlsError> {
        if let Some(bundle) = &self.ca {
            return files::roots(bundle, "ca");
        }
        let found = rustls_native_certs::load_native_certs();
        let mut roots = RootCertStore::empty();
        let (added, _ignored) = roots.add_parsable_certificates(found.certs);
        if added == 0 {
            let mut error = TlsError::new(
                "ca",
                "is not set and the system trust store has no usable certificate",
            );
            if let Some(first) = found.errors.into_iter().next() {
                error = error.with_source(first);
            }
            return Err(error);
        }
        Ok(roots)
    }

    /// A connector for a hyper client (`hyper_util::client::legacy::Client`) that calls
    /// `https` URLs with this configuration, and `http` ones over plain TCP. `http` is
    /// the TCP connector to build on, with its timeouts and `nodelay` already set.
    ///
    /// # Errors
    ///
    /// As [`rustls_config`](Self::rustls_config).
    pub fn https_connector(&self, mut http: HttpConnector) -> Result<HttpsConnector, TlsError> {
        http.enforce_http(false);
        let mut config = self.rustls_config()?;
        // The connector offers the protocols it was enabled for (the same two).
        config.alpn_protocols.clear();
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(config)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        Ok(connector)
    }
}

/// The verifier of [`ClientTlsConfig::danger_accept_invalid_certs`]: any certificate,
/// but the handshake's signatures are still checked, so the connection is at least
/// encrypted to the holder of the key it shows.
#[derive(Debug)]
struct AcceptAnyCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A connector of the same type as [`ClientTlsConfig::https_connector`]'s for a client
/// that calls only `http` URLs, built without reading any trust store: it trusts no CA,
/// so an `https` URL fails its handshake. For a client whose URL is known to be `http`.
pub fn http_only_connector(http: HttpConnector) -> HttpsConnector {
    let config = ClientConfig::builder_with_provider(super::provider())
        .with_safe_default_protocol_versions()
        .expect("the provider supports the default protocol versions")
        .with_root_certificates(RootCertStore::empty())
        .with_no_client_auth();
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http)
}
