//! TLS termination for listeners: the configuration, the reloadable server state and its
//! handle.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use rustls::server::WebPkiClientVerifier;
use rustls::ServerConfig;
use serde::{Deserialize, Serialize};
use tokio_rustls::TlsAcceptor;

use super::files::{self, TlsError};

/// TLS on one listener: its certificate, and optionally the CAs its clients'
/// certificates must chain to (mTLS). See the [module docs](super).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct TlsConfig {
    /// The PEM file of the certificate chain, the leaf first.
    pub cert: PathBuf,
    /// The PEM file of the private key of the leaf certificate (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// A PEM bundle of the CAs that clients' certificates are verified against. Without
    /// it the listener asks for no client certificate.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// Whether a client must show a certificate; only with
    /// [`client_ca`](Self::client_ca), [`ClientAuth::Required`] when unset.
    #[serde(default)]
    pub client_auth: Option<ClientAuth>,
    /// How often the files' modification times and sizes are checked for a change.
    /// Defaults to 60 seconds.
    #[serde(default = "default_reload_interval", with = "crate::config::duration")]
    pub reload_interval: Duration,
}

fn default_reload_interval() -> Duration {
    Duration::from_secs(60)
}

/// Whether a listener with a [client CA](TlsConfig::client_ca) insists on a client
/// certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ClientAuth {
    /// A handshake without a client certificate fails.
    Required,
    /// A client may connect without a certificate; one it shows must still verify.
    /// Requests of a client without one carry no [`PeerCertificate`](super::PeerCertificate).
    Optional,
}

impl TlsConfig {
    /// TLS with the certificate chain and key in these PEM files, and no client
    /// certificates.
    pub fn new(cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        Self {
            cert: cert.into(),
            key: key.into(),
            client_ca: None,
            client_auth: None,
            reload_interval: default_reload_interval(),
        }
    }

    /// Verifies client certificates against the CAs of this PEM bundle (mTLS).
    pub fn client_ca(mut self, bundle: impl Into<PathBuf>, auth: ClientAuth) -> Self {
        self.client_ca = Some(bundle.into());
        self.client_auth = Some(auth);
        self
    }

    /// Sets [`reload_interval`](Self::reload_interval).
    pub fn reload_interval(mut self, interval: Duration) -> Self {
        self.reload_interval = interval;
        self
    }

    /// Reads the files and builds the rustls configuration, with ALPN `h2` and
    /// `http/1.1`.
    fn server_config(&self) -> Result<ServerConfig, TlsError> {
        if self.reload_interval.is_zero() {
            return Err(TlsError::new(
                "tls.reload_interval",
                "must be greater than zero",
            ));
        }
        let provider = super::provider();
        let certs = files::certs(&self.cert, "tls.cert")?;
        let key = files::private_key(&self.key, "tls.key")?;
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|source| {
                TlsError::new("tls", "has no usable protocol version").with_source(source)
            })?;
        let builder = match (&self.client_ca, self.client_auth) {
            (None, None) => builder.with_no_client_auth(),
            (None, Some(_)) => {
                return Err(TlsError::new(
                    "tls.client_auth",
                    "needs `tls.client_ca`, the CAs to verify client certificates against",
                ))
            }
            (Some(bundle), auth) => {
                let roots = files::roots(bundle, "tls.client_ca")?;
                let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider);
                let verifier = match auth.unwrap_or(ClientAuth::Required) {
                    ClientAuth::Required => verifier,
                    ClientAuth::Optional => verifier.allow_unauthenticated(),
                };
                let verifier = verifier.build().map_err(|source| {
                    TlsError::new("tls.client_ca", "can't verify client certificates")
                        .at(bundle)
                        .with_source(source)
                })?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder.with_single_cert(certs, key).map_err(|source| {
            TlsError::new(
                "tls.key",
                "can't be used with the certificate of `tls.cert` (not its key, or an unsupported kind)",
            )
            .at(&self.key)
            .with_source(source)
        })?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(config)
    }

    fn paths(&self) -> impl Iterator<Item = &Path> {
        [Some(&self.cert), Some(&self.key), self.client_ca.as_ref()]
            .into_iter()
            .flatten()
            .map(PathBuf::as_path)
    }

    /// What the files look like now, to notice a change.
    fn stamp(&self) -> Vec<Option<(SystemTime, u64)>> {
        self.paths()
            .map(|path| {
                let meta = std::fs::metadata(path).ok()?;
                Some((meta.modified().ok()?, meta.len()))
            })
            .collect()
    }
}

/// A listener's TLS state: the configuration new connections get, replaced when the
/// files change.
#[derive(Clone)]
pub(crate) struct ServerTls {
    shared: Arc<Shared>,
}

struct Shared {
    service: String,
    config: TlsConfig,
    current: RwLock<Arc<ServerConfig>>,
    /// The files as they were at the last load attempt, good or bad.
    stamp: Mutex<Vec<Option<(SystemTime, u64)>>>,
    last_error: Mutex<Option<String>>,
}

impl ServerTls {
    /// Loads the files of `config` for the listener of `service`.
    pub(crate) fn load(service: &str, config: &TlsConfig) -> Result<Self, TlsError> {
        let stamp = config.stamp();
        let server = config.server_config()?;
        Ok(Self {
            shared: Arc::new(Shared {
                service: service.to_owned(),
                config: config.clone(),
                current: RwLock::new(Arc::new(server)),
                stamp: Mutex::new(stamp),
                last_error: Mutex::new(None),
            }),
        })
    }

    /// The acceptor for a new connection, with the current certificate.
    pub(crate) fn acceptor(&self) -> TlsAcceptor {
        let current = self
            .shared
            .current
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        TlsAcceptor::from(current.clone())
    }

    pub(crate) fn reloader(&self) -> TlsReloader {
        TlsReloader {
            shared: self.shared.clone(),
        }
    }

    /// Checks the files every `reload_interval` and reloads them when they changed; runs
    /// until dropped.
    pub(crate) async fn watch(self) {
        let mut ticks = tokio::time::interval(self.shared.config.reload_interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await;
        loop {
            ticks.tick().await;
            let stamp = self.shared.config.stamp();
            let changed = *self
                .shared
                .stamp
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                != stamp;
            if changed {
                // The outcome is logged and recorded by `reload`.
                let _ = self.shared.reload(stamp);
            }
        }
    }
}

impl Shared {
    /// Loads the files again; on failure the previous configuration stays.
    fn reload(&self, stamp: Vec<Option<(SystemTime, u64)>>) -> Result<(), TlsError> {
        *self.stamp.lock().unwrap_or_else(PoisonError::into_inner) = stamp;
        let loaded = self.config.server_config();
        let outcome = if loaded.is_ok() { "ok" } else { "error" };
        metrics::counter!(
            "micro_tls_reloads_total",
            "service" => self.service.clone(),
            "outcome" => outcome
        )
        .increment(1);
        let mut last_error = self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match loaded {
            Ok(server) => {
                *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(server);
                *last_error = None;
                tracing::info!(service = %self.service, "tls files reloaded");
                Ok(())
            }
            Err(error) => {
                let message = crate::error::Chain(&error).to_string();
                tracing::error!(
                    service = %self.service,
                    error = %message,
                    "tls files can't be used: the previous certificate stays in place"
                );
                *last_error = Some(message);
                Err(error)
            }
        }
    }
}

/// Reloads a listener's TLS files on demand; from
/// [`RunningHost::tls_reloader`](crate::host::RunningHost::tls_reloader). Cheap to clone.
///
/// The listener also reloads them by itself when they change (see
/// [`TlsConfig::reload_interval`]); this handle is for doing it at once, after a
/// certificate renewal.
#[derive(Clone)]
pub struct TlsReloader {
    shared: Arc<Shared>,
}

impl TlsReloader {
    /// Reads the files again and, when they can be used, gives new connections the new
    /// certificate. Open connections keep theirs.
    ///
    /// # Errors
    ///
    /// When the files can't be used; the previous certificate then stays in place.
    pub fn reload(&self) -> Result<(), TlsError> {
        self.shared.reload(self.shared.config.stamp())
    }

    /// Why the last reload failed, or `None` when it succeeded (or none was needed yet).
    pub fn last_error(&self) -> Option<String> {
        self.shared
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl fmt::Debug for TlsReloader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsReloader")
            .field("service", &self.shared.service)
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}
