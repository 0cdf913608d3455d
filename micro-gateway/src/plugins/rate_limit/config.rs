//! [`RateLimitConfig`]: Kong's `rate-limiting` plugin configuration.

use std::sync::Arc;
use std::time::Duration;

use http::HeaderName;
use ipnet::IpNet;
use serde::Deserialize;

use super::gcra::Quota;
use super::store::{LocalStore, RateLimitStore};
use super::{Identity, Limiter, RateLimitLayer};

/// Kong's `rate-limiting` configuration, with the same field names and defaults.
///
/// ```yaml
/// name: rate-limiting
/// config:
///   second: 10
///   minute: 100
///   limit_by: consumer      # the JWT subject; ip, credential, header, service, path
///   policy: redis           # or local
///   redis_host: 127.0.0.1
///   redis_port: 6379
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct RateLimitConfig {
    /// Requests per second.
    pub second: Option<u64>,
    /// Requests per minute.
    pub minute: Option<u64>,
    /// Requests per hour.
    pub hour: Option<u64>,
    /// Requests per day.
    pub day: Option<u64>,
    /// Kong's calendar month; not supported (refused when set).
    pub month: Option<u64>,
    /// Kong's calendar year; not supported (refused when set).
    pub year: Option<u64>,
    /// Whom a limit counts: `consumer` (the default, as in Kong: the consumer whose key
    /// verified the JWT, else the verified token's `sub`), `credential` (the credential
    /// the gateway verified: the JWT's consumer, else its `sub`; never an unverified
    /// header), `ip`, `header` (the value of `header_name`), `service` (everyone on the
    /// route together) or `path`. A request without the consumer, credential or header is
    /// counted by its IP, as Kong does.
    pub limit_by: String,
    /// The header `limit_by: header` reads.
    pub header_name: Option<String>,
    /// Kong's header of `key-auth` API keys. micro-gateway has no `key-auth` to verify
    /// one, so an API key never picks a bucket: only `apikey` (Kong's default) is
    /// accepted, and another value is refused rather than ignored.
    pub api_key_header: String,
    /// Proxies whose `X-Forwarded-For` is believed: the client is the right-most address
    /// in it that is not one of these. Empty (the default): the peer address.
    #[serde(deserialize_with = "nets")]
    pub trusted_proxies: Vec<IpNet>,
    /// `local` (this process) or `redis` (shared; needs the `redis` feature).
    pub policy: String,
    /// Let requests through when the store fails (true, as Kong); else answer `503`.
    pub fault_tolerant: bool,
    /// Leave out the `RateLimit-*` headers.
    pub hide_client_headers: bool,
    /// The status of a refusal (429).
    pub error_code: u16,
    /// The message of a refusal.
    pub error_message: String,
    /// Redis host (Kong's flat field; `redis.host` too).
    pub redis_host: Option<String>,
    /// Redis port (6379).
    pub redis_port: Option<u16>,
    /// Redis user.
    pub redis_username: Option<String>,
    /// Redis password.
    pub redis_password: Option<String>,
    /// Redis database number.
    pub redis_database: Option<u32>,
    /// Milliseconds to wait for Redis (2000).
    pub redis_timeout: Option<u64>,
    /// TLS to Redis; not supported (refused when true).
    pub redis_ssl: bool,
    /// Accepted and ignored (no TLS).
    pub redis_ssl_verify: Option<bool>,
    /// Accepted and ignored (no TLS).
    pub redis_server_name: Option<String>,
    /// Kong 3's nested form of the Redis settings.
    pub redis: Option<RedisSettings>,
    /// A full Redis URL, instead of the fields above (our addition).
    pub redis_url: Option<String>,
    /// The prefix of every Redis key (`micro-gateway:rl:`, our addition).
    pub redis_prefix: String,
    /// Kong's `sync_rate`; accepted and ignored (every decision is synchronous).
    pub sync_rate: Option<f64>,
    /// Kong's `path` for `limit_by: path`; accepted and ignored (the request path is
    /// used).
    pub path: Option<String>,
}

/// Kong 3's `redis:` block of the `rate-limiting` plugin.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct RedisSettings {
    /// Host.
    pub host: Option<String>,
    /// Port.
    pub port: Option<u16>,
    /// User.
    pub username: Option<String>,
    /// Password.
    pub password: Option<String>,
    /// Database number.
    pub database: Option<u32>,
    /// Milliseconds to wait.
    pub timeout: Option<u64>,
    /// TLS; not supported.
    pub ssl: bool,
    /// Accepted and ignored.
    pub ssl_verify: Option<bool>,
    /// Accepted and ignored.
    pub server_name: Option<String>,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            second: None,
            minute: None,
            hour: None,
            day: None,
            month: None,
            year: None,
            limit_by: "consumer".to_owned(),
            header_name: None,
            api_key_header: "apikey".to_owned(),
            trusted_proxies: Vec::new(),
            policy: "local".to_owned(),
            fault_tolerant: true,
            hide_client_headers: false,
            error_code: 429,
            error_message: "API rate limit exceeded".to_owned(),
            redis_host: None,
            redis_port: None,
            redis_username: None,
            redis_password: None,
            redis_database: None,
            redis_timeout: None,
            redis_ssl: false,
            redis_ssl_verify: None,
            redis_server_name: None,
            redis: None,
            redis_url: None,
            redis_prefix: "micro-gateway:rl:".to_owned(),
            sync_rate: None,
            path: None,
        }
    }
}

pub(crate) fn nets<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<IpNet>, D::Error> {
    let texts = Vec::<String>::deserialize(deserializer)?;
    texts
        .iter()
        .map(|text| super::super::ip_restriction::parse_net(text).map_err(serde::de::Error::custom))
        .collect()
}

/// A rate-limiting configuration that cannot be used: which field, and why.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct RateLimitConfigError {
    field: String,
    reason: String,
    #[source]
    source: Option<super::store::StoreError>,
}

impl RateLimitConfigError {
    fn new(field: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        Self {
            field: field.into(),
            reason: reason.to_string(),
            source: None,
        }
    }

    /// The field at fault, relative to the plugin's configuration.
    pub fn field(&self) -> &str {
        &self.field
    }

    /// What is wrong with it.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

impl RateLimitConfig {
    /// Limits per second, minute and hour (any may be `None`), counted by client IP.
    pub fn per_ip(second: Option<u64>, minute: Option<u64>, hour: Option<u64>) -> Self {
        Self {
            second,
            minute,
            hour,
            limit_by: "ip".to_owned(),
            ..Self::default()
        }
    }

    /// The quotas, shortest period first.
    ///
    /// # Errors
    ///
    /// When none is set, one is zero, or `month` or `year` is set.
    pub fn quotas(&self) -> Result<Vec<Quota>, RateLimitConfigError> {
        for (field, value) in [("month", self.month), ("year", self.year)] {
            if value.is_some() {
                return Err(RateLimitConfigError::new(
                    field,
                    "calendar limits are not supported; use second, minute, hour or day",
                ));
            }
        }
        let mut quotas = Vec::new();
        for (field, value, seconds) in [
            ("second", self.second, 1),
            ("minute", self.minute, 60),
            ("hour", self.hour, 3600),
            ("day", self.day, 86_400),
        ] {
            match value {
                None => {}
                Some(0) => {
                    return Err(RateLimitConfigError::new(
                        field,
                        "a limit must be at least 1",
                    ))
                }
                Some(limit) => quotas.push(Quota::new(limit, Duration::from_secs(seconds))),
            }
        }
        if quotas.is_empty() {
            return Err(RateLimitConfigError::new(
                "second",
                "set at least one of second, minute, hour, day",
            ));
        }
        Ok(quotas)
    }

    fn identity(&self) -> Result<Identity, RateLimitConfigError> {
        let header = |field: &str, name: &str| {
            HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                RateLimitConfigError::new(field, format!("`{name}` is not a header name"))
            })
        };
        Ok(match self.limit_by.as_str() {
            "consumer" | "consumer-group" => Identity::Subject,
            "credential" => {
                if self.api_key_header != "apikey" {
                    return Err(RateLimitConfigError::new(
                        "api_key_header",
                        "micro-gateway has no key-auth to verify an API key: \
                         `limit_by: credential` counts the credential the jwt plugin verified",
                    ));
                }
                Identity::Credential
            }
            "ip" => Identity::Ip,
            "header" => {
                let name = self.header_name.as_deref().ok_or_else(|| {
                    RateLimitConfigError::new(
                        "header_name",
                        "`limit_by: header` needs `header_name`",
                    )
                })?;
                Identity::Header(header("header_name", name)?)
            }
            "service" => Identity::Route,
            "path" => Identity::Path,
            other => {
                return Err(RateLimitConfigError::new(
                    "limit_by",
                    format!(
                        "`{other}` is not one of consumer, credential, ip, header, service, path"
                    ),
                ))
            }
        })
    }

    /// The Redis URL the `redis` policy connects to.
    pub fn redis_url(&self) -> String {
        if let Some(url) = &self.redis_url {
            return url.clone();
        }
        let nested = self.redis.clone().unwrap_or_default();
        let host = nested
            .host
            .or_else(|| self.redis_host.clone())
            .unwrap_or_else(|| "127.0.0.1".to_owned());
        let port = nested.port.or(self.redis_port).unwrap_or(6379);
        let database = nested.database.or(self.redis_database).unwrap_or(0);
        let user = nested
            .username
            .or_else(|| self.redis_username.clone())
            .unwrap_or_default();
        let auth = match nested.password.or_else(|| self.redis_password.clone()) {
            Some(password) => format!("{user}:{password}@"),
            None if !user.is_empty() => format!("{user}@"),
            None => String::new(),
        };
        format!("redis://{auth}{host}:{port}/{database}")
    }

    fn store(&self) -> Result<Arc<dyn RateLimitStore>, RateLimitConfigError> {
        match self.policy.as_str() {
            "local" => Ok(Arc::new(LocalStore::new())),
            "redis" => self.redis_store(),
            "cluster" => Err(RateLimitConfigError::new(
                "policy",
                "`cluster` needs Kong's database; use `redis` to share limits",
            )),
            other => Err(RateLimitConfigError::new(
                "policy",
                format!("`{other}` is not one of local, redis"),
            )),
        }
    }

    #[cfg(feature = "redis")]
    fn redis_store(&self) -> Result<Arc<dyn RateLimitStore>, RateLimitConfigError> {
        if self.redis_ssl || self.redis.as_ref().is_some_and(|r| r.ssl) {
            return Err(RateLimitConfigError::new(
                "redis_ssl",
                "tls to redis is not supported",
            ));
        }
        let timeout = self
            .redis
            .as_ref()
            .and_then(|r| r.timeout)
            .or(self.redis_timeout)
            .unwrap_or(2000);
        let store = super::redis::RedisStore::new(
            &self.redis_url(),
            self.redis_prefix.clone(),
            Duration::from_millis(timeout.max(1)),
        )
        .map_err(|source| RateLimitConfigError {
            field: "redis_url".to_owned(),
            reason: "not a redis url".to_owned(),
            source: Some(source),
        })?;
        Ok(Arc::new(store))
    }

    #[cfg(not(feature = "redis"))]
    fn redis_store(&self) -> Result<Arc<dyn RateLimitStore>, RateLimitConfigError> {
        Err(RateLimitConfigError::new(
            "policy",
            "this gateway was built without the `redis` feature",
        ))
    }

    /// Checks the configuration, makes its store and builds the layer.
    ///
    /// # Errors
    ///
    /// A [`RateLimitConfigError`] naming the field at fault.
    pub fn layer(&self) -> Result<RateLimitLayer, RateLimitConfigError> {
        let store = self.store()?;
        self.layer_with_store(store)
    }

    /// Builds the layer on a store of the caller's (shared by several routes, say).
    ///
    /// # Errors
    ///
    /// As [`layer`](Self::layer), the store aside.
    pub fn layer_with_store(
        &self,
        store: Arc<dyn RateLimitStore>,
    ) -> Result<RateLimitLayer, RateLimitConfigError> {
        let status = http::StatusCode::from_u16(self.error_code)
            .ok()
            .filter(|s| s.is_client_error() || s.is_server_error())
            .ok_or_else(|| RateLimitConfigError::new("error_code", "not a 4xx or 5xx status"))?;
        let quotas = self.quotas()?;
        let policy_header = quotas
            .iter()
            .map(|q| format!("{};w={}", q.limit, q.period.as_secs()))
            .collect::<Vec<_>>()
            .join(", ");
        Ok(RateLimitLayer::new(Limiter {
            quotas,
            store,
            identity: self.identity()?,
            trusted_proxies: self.trusted_proxies.clone(),
            fault_tolerant: self.fault_tolerant,
            hide_client_headers: self.hide_client_headers,
            status,
            message: self.error_message.clone(),
            policy_header: http::HeaderValue::from_str(&policy_header)
                .map_err(|e| RateLimitConfigError::new("second", e))?,
        }))
    }
}
