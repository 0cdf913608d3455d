//! TLS with [rustls] on the `aws-lc-rs` provider: termination (and mTLS) on every
//! listener of a [`ServiceHost`](crate::host::ServiceHost), and HTTPS for
//! [`HttpClient`](crate::client::HttpClient) and the other clients of micro.
//!
//! # Listeners
//!
//! A listener with a [`TlsConfig`] (the `tls` table of a
//! [`ListenerConfig`](crate::listener::ListenerConfig)) speaks only TLS: a client that
//! sends plain HTTP gets a TLS alert and the connection closes. The server offers `h2` and
//! `http/1.1` by ALPN.
//!
//! ```toml
//! [host.listener.tls]
//! cert = "/etc/micro/tls/server.pem"      # the chain, leaf first (PEM)
//! key = "/etc/micro/tls/server.key"       # PKCS#8, PKCS#1 or SEC1 (PEM)
//! client_ca = "/etc/micro/tls/clients.pem" # optional: ask clients for a certificate (mTLS)
//! client_auth = "required"                # or "optional"; only with client_ca
//! reload_interval = "30s"                 # how often the files' timestamps are checked
//! ```
//!
//! - **Handshake timeout.** The handshake counts against the listener's
//!   `header_read_timeout`: a client that connects and never sends a `ClientHello`, or
//!   stalls in the middle of the handshake, is closed when it runs out.
//! - **Reloading.** The files are checked every `reload_interval` and read again when one
//!   of them changed (modification time or size); [`TlsReloader::reload`] (from
//!   [`RunningHost::tls_reloader`](crate::host::RunningHost::tls_reloader)) does it at
//!   once, after a certificate renewal say. New connections get the new certificate;
//!   open ones keep the one they were made with and are not dropped. Files that can't be
//!   used (a half-written key, a key that does not match the certificate) leave the
//!   previous certificate in place: the error is logged, counted in
//!   `micro_tls_reloads_total{outcome="error"}` and kept in
//!   [`TlsReloader::last_error`], and the files are tried again when they change again.
//! - **Client certificates.** With `client_ca`, a client certificate is verified
//!   against that CA bundle; `client_auth = "required"` (the default) refuses a
//!   handshake without one, `"optional"` lets it through without a [`PeerCertificate`].
//!   The verified certificate of the client is in every request's extensions as a
//!   [`PeerCertificate`], for handlers (`Extension<PeerCertificate>` in axum).
//! - **Errors at start.** A missing or unreadable file, a file without a PEM certificate
//!   or key, or a key that does not match the certificate fails
//!   [`ServiceHostBuilder::build`](crate::host::ServiceHostBuilder::build) with
//!   [`HostError::Tls`](crate::host::HostError::Tls), which names the setting (`tls.key`)
//!   and the file.
//!
//! # Clients
//!
//! [`ClientTlsConfig`] says which CAs a client trusts (a PEM bundle, or the system store
//! by default) and which certificate it shows for mTLS;
//! [`ClientTlsConfig::https_connector`] turns it into a connector for a hyper client, and
//! [`ClientBuilder::tls`](crate::client::ClientBuilder::tls) gives it to an
//! [`HttpClient`](crate::client::HttpClient). The server name (SNI) is the URL's host,
//! and the server's certificate must be valid for it. Verification can only be turned
//! off by setting [`ClientTlsConfig::danger_accept_invalid_certs`], which logs a warning
//! each time a client is built with it.

mod client;
mod files;
mod peer;
mod server;

pub use self::client::{http_only_connector, ClientTlsConfig, HttpsConnector};
pub use self::files::TlsError;
pub use self::peer::PeerCertificate;
pub use self::server::{ClientAuth, TlsConfig, TlsReloader};

pub(crate) use self::server::ServerTls;

use std::sync::Arc;

use rustls::crypto::CryptoProvider;

/// The one provider every configuration is built with, named explicitly so that another
/// crate enabling a second rustls provider can't make the process default ambiguous.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}
