//! Rate limiting (Kong's `rate-limiting`): GCRA per route, keyed by client, with a local
//! or a Redis store.
//!
//! [`RateLimit`] counts each request against the route's quotas (per second, minute,
//! hour, day) for the caller it identifies: the client IP (the peer, or
//! `X-Forwarded-For` behind trusted proxies), the consumer or subject of the token that
//! [`JwtAuth`](super::jwt::JwtAuth) verified, an API key header, any header, or the whole
//! route. The decision is GCRA ([`gcra`]): a burst of up to the limit, then one request
//! per `period / limit`, with no timer or background task. A [`LocalStore`] holds the
//! state of one process; a `RedisStore` (feature `redis`) holds it in Redis for every
//! gateway sharing that server, decided atomically by a Lua script.
//!
//! Answers carry the IETF draft headers `RateLimit-Limit`, `RateLimit-Remaining`,
//! `RateLimit-Reset` (seconds) and `RateLimit-Policy` (`10;w=1, 100;w=60`), for the quota
//! closest to refusing. A refused request gets `429` with `Retry-After` and the JSON body
//! of [`error_response`], and never reaches the upstream.
//!
//! ```
//! use micro_gateway::plugins::rate_limit::RateLimitConfig;
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let layer = RateLimitConfig::per_ip(Some(10), Some(100), None).layer()?;
//! // ServiceBuilder::new().layer(layer).service(proxy)
//! # let _ = layer;
//! # Ok(())
//! # }
//! ```

mod config;
pub mod gcra;
#[cfg(feature = "redis")]
mod redis;
mod store;

use std::convert::Infallible;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use ipnet::IpNet;
use micro_core::service::BoxFuture;
use tower_layer::Layer;
use tower_service::Service;

pub(crate) use self::config::nets;
pub use self::config::{RateLimitConfig, RateLimitConfigError, RedisSettings};
pub use self::gcra::{Decision, Quota};
#[cfg(feature = "redis")]
pub use self::redis::RedisStore;
pub use self::store::{LocalStore, RateLimitStore, StoreError};
use super::jwt::VerifiedClaims;
use super::rejections::count_rejection;
use super::HttpService;
use crate::error::error_response;
use crate::gateway::MatchedRoute;

#[derive(Debug, Clone)]
enum Identity {
    Subject,
    Credential,
    Ip,
    Header(HeaderName),
    Route,
    Path,
}

struct Limiter {
    quotas: Vec<Quota>,
    store: Arc<dyn RateLimitStore>,
    identity: Identity,
    trusted_proxies: Vec<IpNet>,
    fault_tolerant: bool,
    hide_client_headers: bool,
    status: StatusCode,
    message: String,
    policy_header: HeaderValue,
}

impl fmt::Debug for Limiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Limiter")
            .field("quotas", &self.quotas)
            .field("store", &self.store)
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

/// The longest identifier kept in a key; longer header values are cut.
const MAX_IDENTIFIER: usize = 256;

impl Limiter {
    fn client_ip(&self, request: &Request<Body>) -> Option<IpAddr> {
        let peer = request
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|info| info.0.ip().to_canonical())?;
        Some(crate::forwarded::client_behind(
            peer,
            request.headers(),
            &self.trusted_proxies,
        ))
    }

    /// The store key: the route, then who is counted.
    fn key(&self, request: &Request<Body>) -> String {
        let route = request
            .extensions()
            .get::<MatchedRoute>()
            .map(|m| &*m.name)
            .unwrap_or("");
        let header = |name: &HeaderName| {
            request
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .filter(|v| !v.is_empty())
                .map(|v| v.chars().take(MAX_IDENTIFIER).collect::<String>())
        };
        let who = match &self.identity {
            Identity::Subject => request
                .extensions()
                .get::<VerifiedClaims>()
                .and_then(|claims| {
                    let (kind, name) = match claims.consumer() {
                        Some(consumer) => ("consumer", consumer),
                        None => ("sub", claims.subject()?),
                    };
                    let name: String = name.chars().take(MAX_IDENTIFIER).collect();
                    Some(format!("{kind}:{name}"))
                }),
            // Only a credential the gateway verified picks a bucket: a header the client
            // chose would let it take a fresh bucket per request and grow the store.
            Identity::Credential => {
                request
                    .extensions()
                    .get::<VerifiedClaims>()
                    .and_then(|claims| {
                        let name = claims.consumer().or(claims.subject())?;
                        let name: String = name.chars().take(MAX_IDENTIFIER).collect();
                        Some(format!("credential:{name}"))
                    })
            }
            Identity::Header(name) => header(name).map(|value| format!("hdr:{value}")),
            Identity::Ip => None,
            Identity::Route => Some("route".to_owned()),
            Identity::Path => Some(format!(
                "path:{}",
                request
                    .uri()
                    .path()
                    .chars()
                    .take(MAX_IDENTIFIER)
                    .collect::<String>()
            )),
        };
        let who = who.unwrap_or_else(|| match self.client_ip(request) {
            Some(ip) => format!("ip:{ip}"),
            None => "ip:unknown".to_owned(),
        });
        format!("{route}|{who}")
    }

    fn headers(&self, response: &mut Response<Body>, decision: &Decision) {
        if self.hide_client_headers {
            return;
        }
        let headers = response.headers_mut();
        headers.insert("ratelimit-limit", HeaderValue::from(decision.limit));
        headers.insert("ratelimit-remaining", HeaderValue::from(decision.remaining));
        headers.insert(
            "ratelimit-reset",
            HeaderValue::from(ceil_secs(decision.reset)),
        );
        headers.insert("ratelimit-policy", self.policy_header.clone());
    }

    fn refuse(&self, request: &Request<Body>, decision: &Decision) -> Response<Body> {
        count_rejection(request, "rate_limit");
        let mut response = error_response(self.status, "rate_limited", &self.message);
        let wait = ceil_secs(decision.retry_after.unwrap_or(decision.reset)).max(1);
        response
            .headers_mut()
            .insert(http::header::RETRY_AFTER, HeaderValue::from(wait));
        self.headers(&mut response, decision);
        response
    }
}

fn ceil_secs(duration: Duration) -> u64 {
    duration.as_secs() + u64::from(duration.subsec_nanos() > 0)
}

/// Applies [`RateLimit`]; built by [`RateLimitConfig::layer`].
#[derive(Debug, Clone)]
pub struct RateLimitLayer {
    limiter: Arc<Limiter>,
}

impl RateLimitLayer {
    fn new(limiter: Limiter) -> Self {
        Self {
            limiter: Arc::new(limiter),
        }
    }

    /// The quotas it enforces.
    pub fn quotas(&self) -> &[Quota] {
        &self.limiter.quotas
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit {
            inner,
            limiter: self.limiter.clone(),
        }
    }
}

/// Refuses requests over the route's quotas with `429`; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct RateLimit<S> {
    inner: S,
    limiter: Arc<Limiter>,
}

impl<S> RateLimit<S> {
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

impl<S: HttpService> Service<Request<Body>> for RateLimit<S> {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let limiter = self.limiter.clone();
        Box::pin(async move {
            let key = limiter.key(&request);
            match limiter.store.check(&key, &limiter.quotas).await {
                Ok(decision) if decision.allowed => {
                    let mut response = inner.call(request).await?;
                    limiter.headers(&mut response, &decision);
                    Ok(response)
                }
                Ok(decision) => Ok(limiter.refuse(&request, &decision)),
                Err(error) if limiter.fault_tolerant => {
                    tracing::warn!(error = %error, "rate limit store failed; letting the request through");
                    inner.call(request).await
                }
                Err(error) => {
                    tracing::error!(error = %error, "rate limit store failed");
                    Ok(error_response(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "rate_limit_unavailable",
                        "the rate limiter cannot decide; try again later",
                    ))
                }
            }
        })
    }
}
