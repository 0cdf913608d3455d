//! The model: a running [`Instance`] of a service and its [`HealthStatus`].

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How an instance's health checks see it, in Consul's three states.
///
/// [`Passing`](Self::Passing) and [`Warning`](Self::Warning) instances take traffic;
/// [`Critical`](Self::Critical) ones are left out of discovery.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum HealthStatus {
    /// Healthy.
    #[default]
    Passing,
    /// Degraded but serving (Consul maps an HTTP `429` here).
    Warning,
    /// Failing: not returned by discovery.
    Critical,
}

impl HealthStatus {
    /// Whether an instance in this state should receive traffic.
    pub fn is_healthy(self) -> bool {
        self != Self::Critical
    }

    /// The state's name, as Consul writes it (`"passing"`, `"warning"`, `"critical"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Passing => "passing",
            Self::Warning => "warning",
            Self::Critical => "critical",
        }
    }

    /// What an HTTP health check answering `status` means, as Consul reads it: `2xx`
    /// passes, `429 Too Many Requests` warns, anything else is critical.
    pub fn from_http_status(status: http::StatusCode) -> Self {
        if status.is_success() {
            Self::Passing
        } else if status == http::StatusCode::TOO_MANY_REQUESTS {
            Self::Warning
        } else {
            Self::Critical
        }
    }
}

impl fmt::Display for HealthStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One running copy of a service: where it listens and what it says about itself.
///
/// Serializes to and from JSON or configuration; only `id`, `service`, `address` and
/// `port` are required:
///
/// ```
/// use micro_discovery::{HealthStatus, Instance};
///
/// let instance: Instance = serde_json::from_str(r#"{
///     "id": "product-1",
///     "service": "product-service",
///     "address": "10.0.0.7",
///     "port": 8002,
///     "tags": ["primary"],
///     "zone": "eu-west-1a"
/// }"#).unwrap();
/// assert_eq!(instance.authority(), "10.0.0.7:8002");
/// assert_eq!(instance.health, HealthStatus::Passing);
///
/// let same = Instance::new("product-service", "product-1", "10.0.0.7", 8002)
///     .with_tag("primary")
///     .with_zone("eu-west-1a");
/// assert_eq!(instance, same);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Instance {
    /// Unique among the service's instances (`"product-1"`, a host name and port, ...).
    pub id: String,
    /// The service's name (`"product-service"`).
    pub service: String,
    /// The host name or IP address it listens on.
    pub address: String,
    /// The TCP port it listens on.
    pub port: u16,
    /// Free-form labels (`"primary"`, `"canary"`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Free-form key/value metadata.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    /// The version of the service this instance runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Where it runs (an availability zone, a rack).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// Its health as last checked or reported.
    #[serde(default)]
    pub health: HealthStatus,
}

impl Instance {
    /// An instance `id` of `service` listening on `address:port`, passing, with no tags,
    /// metadata, version or zone.
    pub fn new(
        service: impl Into<String>,
        id: impl Into<String>,
        address: impl Into<String>,
        port: u16,
    ) -> Self {
        Self {
            id: id.into(),
            service: service.into(),
            address: address.into(),
            port,
            tags: Vec::new(),
            metadata: BTreeMap::new(),
            version: None,
            zone: None,
            health: HealthStatus::Passing,
        }
    }

    /// An instance of `service` listening on `addr`, its id made of the service name and
    /// the address (`product-service-127.0.0.1-8002`).
    pub fn from_addr(service: impl Into<String>, addr: SocketAddr) -> Self {
        let service = service.into();
        let id = format!("{service}-{}-{}", addr.ip(), addr.port());
        Self::new(service, id, addr.ip().to_string(), addr.port())
    }

    /// Adds a tag.
    pub fn with_tag(mut self, tag: impl Into<String>) -> Self {
        self.tags.push(tag.into());
        self
    }

    /// Adds a metadata entry.
    pub fn with_metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// Sets the version.
    pub fn with_version(mut self, version: impl Into<String>) -> Self {
        self.version = Some(version.into());
        self
    }

    /// Sets the zone.
    pub fn with_zone(mut self, zone: impl Into<String>) -> Self {
        self.zone = Some(zone.into());
        self
    }

    /// Sets the health status.
    pub fn with_health(mut self, health: HealthStatus) -> Self {
        self.health = health;
        self
    }

    /// `address:port`, with an IPv6 address in brackets: what goes in a URL.
    pub fn authority(&self) -> String {
        if self.address.contains(':') && !self.address.starts_with('[') {
            format!("[{}]:{}", self.address, self.port)
        } else {
            format!("{}:{}", self.address, self.port)
        }
    }

    /// `http://address:port`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.authority())
    }

    /// Checks that every backend can store this instance: the service name and id are
    /// non-empty and made of ASCII letters, digits and `-`, `_`, `.`, `:`; the address is
    /// non-empty and the port is not 0.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidRegistration`] saying what is wrong.
    pub fn validate(&self) -> Result<()> {
        validate_name("service name", &self.service)?;
        validate_name("instance id", &self.id)?;
        if self.address.is_empty() {
            return Err(Error::invalid(format!(
                "instance `{}` has no address",
                self.id
            )));
        }
        if self.port == 0 {
            return Err(Error::invalid(format!("instance `{}` has port 0", self.id)));
        }
        Ok(())
    }
}

pub(crate) fn validate_name(what: &str, name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::invalid(format!("the {what} is empty")));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':')))
    {
        return Err(Error::invalid(format!(
            "the {what} `{name}` contains `{c}`: use ascii letters, digits, `-`, `_`, `.` or `:`"
        )));
    }
    Ok(())
}

/// Sorts instances by id, the order every backend returns them in.
pub(crate) fn sorted(mut instances: Vec<Instance>) -> Vec<Instance> {
    instances.sort_by(|a, b| a.id.cmp(&b.id));
    instances
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated() {
        let ok = Instance::new("product-service", "p-1", "127.0.0.1", 80);
        assert!(ok.validate().is_ok());
        let bad = Instance::new("product service", "p-1", "127.0.0.1", 80);
        assert!(bad.validate().unwrap_err().to_string().contains("` `"));
        assert!(Instance::new("s", "", "h", 1).validate().is_err());
        assert!(Instance::new("s", "a/b", "h", 1).validate().is_err());
        assert!(Instance::new("s", "a", "", 1).validate().is_err());
        assert!(Instance::new("s", "a", "h", 0).validate().is_err());
    }

    #[test]
    fn ipv6_authorities_are_bracketed() {
        let v6 = Instance::from_addr("s", "[::1]:8080".parse().unwrap());
        assert_eq!(v6.authority(), "[::1]:8080");
        assert_eq!(v6.base_url(), "http://[::1]:8080");
        assert_eq!(v6.id, "s-::1-8080");
        assert!(v6.validate().is_ok());
    }

    #[test]
    fn http_statuses_map_as_consul_does() {
        use http::StatusCode;
        assert_eq!(
            HealthStatus::from_http_status(StatusCode::NO_CONTENT),
            HealthStatus::Passing
        );
        assert_eq!(
            HealthStatus::from_http_status(StatusCode::TOO_MANY_REQUESTS),
            HealthStatus::Warning
        );
        assert_eq!(
            HealthStatus::from_http_status(StatusCode::SERVICE_UNAVAILABLE),
            HealthStatus::Critical
        );
        assert!(!HealthStatus::Critical.is_healthy());
        assert!(HealthStatus::Warning.is_healthy());
    }

    #[test]
    fn serde_round_trip_omits_empty_fields() {
        let instance = Instance::new("s", "a", "h", 1);
        let json = serde_json::to_string(&instance).unwrap();
        assert_eq!(
            json,
            r#"{"id":"a","service":"s","address":"h","port":1,"health":"passing"}"#
        );
        assert_eq!(serde_json::from_str::<Instance>(&json).unwrap(), instance);
    }
}
