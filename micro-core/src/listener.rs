//! [`ListenerConfig`]: the limits every listener of a [`ServiceHost`](crate::host::ServiceHost)
//! enforces, so that a slow, stuck or greedy client costs bounded time and memory.
//!
//! Every limit has a default in line with nginx and Envoy and can be set per listener, in
//! code ([`ServiceHostBuilder::service_with`](crate::host::ServiceHostBuilder::service_with))
//! or in configuration ([`HostConfig::listener`](crate::host::HostConfig::listener) for every
//! listener, [`HostConfig::listeners`](crate::host::HostConfig::listeners) per service):
//!
//! ```toml
//! [host.listener]            # every listener
//! header_read_timeout = "10s"
//!
//! [host.listeners.gateway]   # one service's listener; unset keys take the defaults below
//! max_connections = 20000
//! ```
//!
//! | setting | default | what happens past it |
//! |---|---|---|
//! | `header_read_timeout` | 30 s (nginx `client_header_timeout` 60 s, hyper 30 s) | a connection that has not sent a whole request head in time is closed; for HTTP/1 the timer also runs while a kept-alive connection waits for its next request |
//! | `idle_timeout` | 75 s (nginx `keepalive_timeout`) | a connection with no request in flight and no bytes moving is closed (HTTP/2 gets a `GOAWAY` first) |
//! | `body_read_timeout` | 60 s (nginx `client_body_timeout`) | a client that sends no part of a request body for this long has its request failed and its connection closed |
//! | `max_header_bytes` | 64 KiB (Envoy `max_request_headers_kb` 60) | `431 Request Header Fields Too Large` |
//! | `max_headers` | 100 (Envoy `max_headers_count`) | `431 Request Header Fields Too Large` |
//! | `max_connections` | 10 000 | accepting pauses until a connection closes; open connections are unaffected |
//! | `http2.max_concurrent_streams` | 100 (Envoy's edge recommendation) | the peer is told in `SETTINGS`; extra streams are refused |
//! | `http2.max_header_list_size` | 64 KiB | the stream is refused |
//! | `http2.max_pending_accept_reset_streams` | 20 | the rapid-reset guard (CVE-2023-44487): a client that resets streams faster than they are served gets `GOAWAY` |
//! | `http2.max_local_error_reset_streams` | 1024 | a client that keeps making the server reset streams gets `GOAWAY` |
//!
//! With the `tls` feature (on by default), a `tls` table turns on TLS termination, with
//! optional client certificates (mTLS); see [`tls`](crate::tls) for its settings:
//!
//! ```toml
//! [host.listeners.gateway.tls]
//! cert = "/etc/micro/tls/gateway.pem"
//! key = "/etc/micro/tls/gateway.key"
//! ```
//!
//! A zero duration or count is refused by [`ListenerConfig::validate`] (which
//! [`ServiceHost::start`](crate::host::ServiceHost::start) calls): a limit can be raised but
//! never switched off by accident.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Limits of one listener; see the [module docs](self) for each default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct ListenerConfig {
    /// How long a client may take to send a whole request head.
    #[serde(with = "crate::config::duration")]
    pub header_read_timeout: Duration,
    /// How long a connection may sit with no request in flight (a request is in flight
    /// until its response body is sent: a slow stream keeps its connection) and no bytes
    /// moving.
    #[serde(with = "crate::config::duration")]
    pub idle_timeout: Duration,
    /// How long a client may pause between two parts of a request body.
    #[serde(with = "crate::config::duration")]
    pub body_read_timeout: Duration,
    /// The largest request head (request line and headers) in bytes. At least 8192.
    pub max_header_bytes: usize,
    /// The most headers a request may carry.
    pub max_headers: usize,
    /// The most connections served at once.
    pub max_connections: usize,
    /// HTTP/2 limits.
    pub http2: Http2Limits,
    /// TLS termination; `None` (the default) serves plain TCP.
    #[cfg(feature = "tls")]
    pub tls: Option<crate::tls::TlsConfig>,
    /// Where the host's own endpoints of this service (`/health/live`,
    /// `/health/ready`, `/metrics`) are served instead of on this listener: an admin
    /// listener, plain HTTP, kept off the public port (bind it to loopback or a private
    /// network). `None` (the default) serves them here, beside the service's routes.
    /// With it, the public port answers those paths as the service's own (its fallback,
    /// usually `404`).
    pub admin: Option<std::net::SocketAddr>,
}

impl Default for ListenerConfig {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(75),
            body_read_timeout: Duration::from_secs(60),
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            max_connections: 10_000,
            http2: Http2Limits::default(),
            #[cfg(feature = "tls")]
            tls: None,
            admin: None,
        }
    }
}

/// HTTP/2 limits of one listener.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct Http2Limits {
    /// The most streams a client may have open on one connection.
    pub max_concurrent_streams: u32,
    /// The largest header list of one stream, in bytes.
    pub max_header_list_size: u32,
    /// Streams reset by the client before the server accepted them, beyond which the
    /// connection is closed (the rapid-reset guard).
    pub max_pending_accept_reset_streams: usize,
    /// Streams the server had to reset because of client errors, beyond which the
    /// connection is closed.
    pub max_local_error_reset_streams: usize,
}

impl Default for Http2Limits {
    fn default() -> Self {
        Self {
            max_concurrent_streams: 100,
            max_header_list_size: 64 * 1024,
            max_pending_accept_reset_streams: 20,
            max_local_error_reset_streams: 1024,
        }
    }
}

/// A listener setting that can't be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("listener setting `{key}` {reason}")]
pub struct InvalidListenerConfig {
    key: &'static str,
    reason: &'static str,
}

impl InvalidListenerConfig {
    /// The setting, as it is spelled in configuration (`http2.max_concurrent_streams`).
    pub fn key(&self) -> &str {
        self.key
    }
}

impl ListenerConfig {
    /// Sets [`header_read_timeout`](Self::header_read_timeout).
    pub fn header_read_timeout(mut self, timeout: Duration) -> Self {
        self.header_read_timeout = timeout;
        self
    }

    /// Sets [`idle_timeout`](Self::idle_timeout).
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// Sets [`body_read_timeout`](Self::body_read_timeout).
    pub fn body_read_timeout(mut self, timeout: Duration) -> Self {
        self.body_read_timeout = timeout;
        self
    }

    /// Sets [`max_header_bytes`](Self::max_header_bytes).
    pub fn max_header_bytes(mut self, bytes: usize) -> Self {
        self.max_header_bytes = bytes;
        self
    }

    /// Sets [`max_headers`](Self::max_headers).
    pub fn max_headers(mut self, count: usize) -> Self {
        self.max_headers = count;
        self
    }

    /// Sets [`max_connections`](Self::max_connections).
    pub fn max_connections(mut self, count: usize) -> Self {
        self.max_connections = count;
        self
    }

    /// Sets the [HTTP/2 limits](Self::http2).
    pub fn http2(mut self, limits: Http2Limits) -> Self {
        self.http2 = limits;
        self
    }

    /// Terminates TLS on this listener with `tls`; see [`tls`](crate::tls).
    #[cfg(feature = "tls")]
    pub fn tls(mut self, tls: crate::tls::TlsConfig) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Serves the host's endpoints on an admin listener at `addr`; see
    /// [`admin`](Self::admin).
    pub fn admin(mut self, addr: std::net::SocketAddr) -> Self {
        self.admin = Some(addr);
        self
    }

    /// Checks that every limit is usable.
    ///
    /// # Errors
    ///
    /// The first setting that is zero, or a head size below hyper's 8192-byte floor.
    pub fn validate(&self) -> Result<(), InvalidListenerConfig> {
        let positive = [
            ("header_read_timeout", self.header_read_timeout.is_zero()),
            ("idle_timeout", self.idle_timeout.is_zero()),
            ("body_read_timeout", self.body_read_timeout.is_zero()),
            ("max_headers", self.max_headers == 0),
            ("max_connections", self.max_connections == 0),
            (
                "http2.max_concurrent_streams",
                self.http2.max_concurrent_streams == 0,
            ),
            (
                "http2.max_header_list_size",
                self.http2.max_header_list_size == 0,
            ),
            #[cfg(feature = "tls")]
            (
                "tls.reload_interval",
                self.tls
                    .as_ref()
                    .is_some_and(|tls| tls.reload_interval.is_zero()),
            ),
        ];
        if let Some((key, _)) = positive.into_iter().find(|(_, zero)| *zero) {
            return Err(InvalidListenerConfig {
                key,
                reason: "must be greater than zero",
            });
        }
        if self.max_header_bytes < 8192 {
            return Err(InvalidListenerConfig {
                key: "max_header_bytes",
                reason: "must be at least 8192",
            });
        }
        Ok(())
    }
}

impl Http2Limits {
    /// Sets [`max_concurrent_streams`](Self::max_concurrent_streams).
    pub fn max_concurrent_streams(mut self, count: u32) -> Self {
        self.max_concurrent_streams = count;
        self
    }

    /// Sets [`max_header_list_size`](Self::max_header_list_size).
    pub fn max_header_list_size(mut self, bytes: u32) -> Self {
        self.max_header_list_size = bytes;
        self
    }

    /// Sets [`max_pending_accept_reset_streams`](Self::max_pending_accept_reset_streams).
    pub fn max_pending_accept_reset_streams(mut self, count: usize) -> Self {
        self.max_pending_accept_reset_streams = count;
        self
    }

    /// Sets [`max_local_error_reset_streams`](Self::max_local_error_reset_streams).
    pub fn max_local_error_reset_streams(mut self, count: usize) -> Self {
        self.max_local_error_reset_streams = count;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        ListenerConfig::default().validate().unwrap();
    }

    #[test]
    fn zero_limits_are_refused_with_their_key() {
        let error = ListenerConfig::default()
            .header_read_timeout(Duration::ZERO)
            .validate()
            .unwrap_err();
        assert_eq!(error.key(), "header_read_timeout");
        let error = ListenerConfig::default()
            .http2(Http2Limits::default().max_concurrent_streams(0))
            .validate()
            .unwrap_err();
        assert_eq!(error.key(), "http2.max_concurrent_streams");
        let error = ListenerConfig::default()
            .max_header_bytes(1024)
            .validate()
            .unwrap_err();
        assert_eq!(error.key(), "max_header_bytes");
    }

    #[cfg(feature = "tls")]
    #[test]
    fn a_zero_tls_reload_interval_is_refused_with_its_key() {
        let tls = crate::tls::TlsConfig::new("cert.pem", "key.pem").reload_interval(Duration::ZERO);
        let error = ListenerConfig::default().tls(tls).validate().unwrap_err();
        assert_eq!(error.key(), "tls.reload_interval");
    }

    #[test]
    fn deserializes_partial_tables_over_the_defaults() {
        let config: ListenerConfig = crate::config::ConfigLoader::new()
            .toml_str("header_read_timeout = \"2s\"\n[http2]\nmax_concurrent_streams = 7")
            .load()
            .unwrap();
        assert_eq!(config.header_read_timeout, Duration::from_secs(2));
        assert_eq!(config.http2.max_concurrent_streams, 7);
        assert_eq!(config.max_headers, 100);
        let error = crate::config::ConfigLoader::new()
            .toml_str("header_timeout = \"2s\"")
            .load::<ListenerConfig>()
            .unwrap_err();
        assert!(error.to_string().contains("header_timeout"), "{error}");
    }
}
