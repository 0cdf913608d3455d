//! Allow and deny lists of client addresses (Kong's `ip-restriction`).

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::extract::ConnectInfo;
use http::{Request, Response, StatusCode};
use ipnet::IpNet;
use micro_core::service::BoxFuture;
use serde::Deserialize;
use tower_layer::Layer;
use tower_service::Service;

use super::rejections::count_rejection;
use super::HttpService;
use crate::error::error_response;

/// Which clients may call a route. A client in `deny` is refused; when `allow` is not
/// empty, a client outside it is refused too. Addresses are single IPs or CIDR blocks.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct IpRestrictionConfig {
    /// Clients that may call, when not empty.
    #[serde(deserialize_with = "nets")]
    pub allow: Vec<IpNet>,
    /// Clients that may not call.
    #[serde(deserialize_with = "nets")]
    pub deny: Vec<IpNet>,
}

fn nets<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<IpNet>, D::Error> {
    let texts = Vec::<String>::deserialize(deserializer)?;
    texts
        .iter()
        .map(|text| parse_net(text).map_err(serde::de::Error::custom))
        .collect()
}

/// Parses `10.0.0.0/8` or a single address such as `192.0.2.1` or `::1`.
///
/// # Errors
///
/// A message naming the text when it is neither.
pub fn parse_net(text: &str) -> Result<IpNet, String> {
    let text = text.trim();
    text.parse::<IpNet>()
        .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| format!("`{text}` is not an ip address or cidr block"))
}

impl IpRestrictionConfig {
    /// Whether `client` may call.
    pub fn permits(&self, client: IpAddr) -> bool {
        let client = client.to_canonical();
        if self.deny.iter().any(|net| net.contains(&client)) {
            return false;
        }
        self.allow.is_empty() || self.allow.iter().any(|net| net.contains(&client))
    }
}

/// Applies [`IpRestriction`].
#[derive(Debug, Clone)]
pub struct IpRestrictionLayer {
    config: Arc<IpRestrictionConfig>,
}

impl IpRestrictionLayer {
    /// A layer enforcing `config`.
    pub fn new(config: IpRestrictionConfig) -> Self {
        Self {
            config: Arc::new(config),
        }
    }
}

impl<S> Layer<S> for IpRestrictionLayer {
    type Service = IpRestriction<S>;

    fn layer(&self, inner: S) -> Self::Service {
        IpRestriction {
            inner,
            config: self.config.clone(),
        }
    }
}

/// Answers `403` to clients the [`IpRestrictionConfig`] refuses, judged by the peer
/// address of the connection (axum's `ConnectInfo<SocketAddr>`). A request without one
/// is refused: a restriction that cannot tell who calls must not let everyone in.
#[derive(Debug, Clone)]
pub struct IpRestriction<S> {
    inner: S,
    config: Arc<IpRestrictionConfig>,
}

impl<S> IpRestriction<S> {
    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: HttpService> Service<Request<Body>> for IpRestriction<S> {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let client = request
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|info| info.0.ip());
        if client.is_some_and(|ip| self.config.permits(ip)) {
            Box::pin(self.inner.call(request))
        } else {
            count_rejection(&request, "ip_restriction");
            Box::pin(async {
                Ok(error_response(
                    StatusCode::FORBIDDEN,
                    "ip_not_allowed",
                    "your address may not call this route",
                ))
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(allow: &[&str], deny: &[&str]) -> IpRestrictionConfig {
        let json = serde_json::json!({ "allow": allow, "deny": deny });
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn deny_wins_and_an_allow_list_closes_the_rest() {
        let c = config(&["10.0.0.0/8", "192.0.2.1"], &["10.1.0.0/16"]);
        assert!(c.permits("10.2.3.4".parse().unwrap()));
        assert!(!c.permits("10.1.3.4".parse().unwrap()));
        assert!(c.permits("192.0.2.1".parse().unwrap()));
        assert!(!c.permits("192.0.2.2".parse().unwrap()));
        // An IPv4 client seen through an IPv6 socket is still itself.
        assert!(c.permits("::ffff:10.2.3.4".parse().unwrap()));
        let open = config(&[], &["::1"]);
        assert!(open.permits("203.0.113.9".parse().unwrap()));
        assert!(!open.permits("::1".parse().unwrap()));
    }

    #[test]
    fn a_bad_address_is_named() {
        let error = serde_json::from_value::<IpRestrictionConfig>(
            serde_json::json!({ "allow": ["10.0.0.300"] }),
        )
        .unwrap_err();
        assert!(error.to_string().contains("`10.0.0.300`"), "{error}");
    }
}
