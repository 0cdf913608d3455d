//! JSON Web Token authentication (Kong's `jwt`), with JWKS, claim forwarding and scopes.
//!
//! [`JwtAuth`] takes a bearer token from the request (the `Authorization` header by
//! default; other headers, a query parameter or a cookie when configured), verifies it
//! with [`JwtVerifier`], and only then lets the request through:
//!
//! - HS256/384/512 with a shared secret; RS256/384/512, ES256/384 and EdDSA with a public
//!   key in PEM, or from a JSON Web Key Set fetched from `jwks_url` (cached, refetched
//!   when a token names an unknown `kid`, at most once per `jwks_min_refresh_interval`).
//! - Every key is pinned to its algorithms: a token naming another algorithm is refused
//!   before any cryptography, so `alg: none` and the HMAC-with-an-RSA-public-key
//!   confusion cannot succeed.
//! - `exp` and `nbf` with a leeway, `iss` and `aud`, and Kong's `maximum_expiration`.
//! - The verified claims go into the request's extensions as [`VerifiedClaims`] (the
//!   rate limiter keys on their subject) and, for the configured ones, upstream as
//!   headers; the client's own copies of those headers are always removed.
//! - Required scopes or roles per route, read from `scope` (space-separated), `scp` and
//!   `roles`.
//!
//! A request without a token gets `401` with `WWW-Authenticate: Bearer realm="..."`; a bad
//! token `401` with `error="invalid_token"` and a description; a token lacking a scope
//! `403` with `error="insufficient_scope"`; each with the JSON body of
//! [`error_response`]. A token longer than `max_token_size` (8 KiB by default) is refused
//! with `401` without being decoded; a header block larger than the HTTP server accepts
//! never reaches the gateway (hyper answers `431`).
//!
//! ```
//! use micro_gateway::plugins::jwt::{JwtConfig, KeyConfig};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut config = JwtConfig::with_keys([KeyConfig::secret("HS256", "a long shared secret")]);
//! config.issuer = vec!["https://auth.shop.example".to_owned()];
//! config.forward_claims.insert("sub".to_owned(), "x-user-id".to_owned());
//! let layer = config.layer()?;
//! // ServiceBuilder::new().layer(layer).service(proxy)
//! # let _ = layer;
//! # Ok(())
//! # }
//! ```

mod config;
mod error;
mod keys;

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use http::{header, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use jsonwebtoken::Validation;
use micro_core::service::BoxFuture;
use serde_json::{Map, Value};
use tower_layer::Layer;
use tower_service::Service;

pub use self::config::{JwtConfig, JwtConsumer, KeyConfig};
pub use self::error::{JwksError, JwtConfigError, JwtError};
use self::keys::{JwksCache, ResolvedKey, StaticKey};
use super::rejections::count_rejection;
use super::HttpService;
use crate::error::error_response;

/// The header naming the consumer whose key verified the token, as Kong sends it.
const CONSUMER_USERNAME: &str = "x-consumer-username";

/// The claims of a verified token, put in the request's extensions by [`JwtAuth`].
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedClaims {
    claims: Arc<Map<String, Value>>,
    consumer: Option<Arc<str>>,
}

impl VerifiedClaims {
    /// Wraps claims that were verified.
    pub fn new(claims: Map<String, Value>) -> Self {
        Self {
            claims: Arc::new(claims),
            consumer: None,
        }
    }

    /// The consumer whose key verified the token, for keys from Kong's `consumers`.
    pub fn consumer(&self) -> Option<&str> {
        self.consumer.as_deref()
    }

    /// The `sub` claim, when it is a string.
    pub fn subject(&self) -> Option<&str> {
        self.claims.get("sub").and_then(Value::as_str)
    }

    /// A claim by name.
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.claims.get(name)
    }

    /// Every claim.
    pub fn as_map(&self) -> &Map<String, Value> {
        &self.claims
    }

    /// The scopes and roles the token holds: the words of `scope` (or of `scp` when it is
    /// a string) and the items of `scp` and `roles`.
    pub fn scopes(&self) -> impl Iterator<Item = &str> {
        ["scope", "scp", "roles"]
            .into_iter()
            .filter_map(|name| self.claims.get(name))
            .flat_map(|value| -> Box<dyn Iterator<Item = &str> + '_> {
                match value {
                    Value::String(words) => Box::new(words.split_whitespace()),
                    Value::Array(items) => Box::new(items.iter().filter_map(Value::as_str)),
                    _ => Box::new(std::iter::empty()),
                }
            })
    }
}

pub(crate) struct VerifierInner {
    keys: Vec<StaticKey>,
    jwks: Option<JwksCache>,
    key_claim_name: String,
    template: Validation,
    maximum_expiration: u64,
    max_token_size: usize,
}

/// Verifies tokens against the configured keys and JWKS; built by
/// [`JwtConfig::verifier`]. Cheap to clone.
#[derive(Clone)]
pub struct JwtVerifier {
    inner: Arc<VerifierInner>,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("keys", &self.inner.keys.len())
            .field("jwks", &self.inner.jwks.is_some())
            .finish_non_exhaustive()
    }
}

impl JwtVerifier {
    fn new(inner: VerifierInner) -> Self {
        Self {
            inner: Arc::new(inner),
        }
    }

    /// Verifies `token` (without its `Bearer ` prefix) and returns its claims.
    ///
    /// # Errors
    ///
    /// A [`JwtError`] saying why the token is refused.
    pub async fn verify(&self, token: &str) -> Result<VerifiedClaims, JwtError> {
        let inner = &*self.inner;
        if token.len() > inner.max_token_size {
            return Err(JwtError::TooLarge(inner.max_token_size));
        }
        let header = jsonwebtoken::decode_header(token).map_err(JwtError::Malformed)?;
        let (key, consumer) = self.find_key(token, &header).await?;
        if !key.algorithms.contains(&header.alg) {
            return Err(JwtError::Algorithm);
        }
        let data =
            jsonwebtoken::decode::<Map<String, Value>>(token, &key.decoding, &key.validation)
                .map_err(JwtError::from_jsonwebtoken)?;
        if inner.maximum_expiration > 0 {
            let now = jsonwebtoken::get_current_timestamp();
            let exp = data.claims.get("exp").and_then(Value::as_u64);
            if exp.is_some_and(|exp| exp.saturating_sub(now) > inner.maximum_expiration) {
                return Err(JwtError::LifetimeTooLong(inner.maximum_expiration));
            }
        }
        Ok(VerifiedClaims {
            claims: Arc::new(data.claims),
            consumer,
        })
    }

    async fn find_key(
        &self,
        token: &str,
        header: &jsonwebtoken::Header,
    ) -> Result<(Arc<ResolvedKey>, Option<Arc<str>>), JwtError> {
        let inner = &*self.inner;
        let found = |key: &StaticKey| (key.resolved.clone(), key.consumer.clone());
        if let Some(kid) = &header.kid {
            if let Some(key) = inner.keys.iter().find(|k| k.kid.as_ref() == Some(kid)) {
                return Ok(found(key));
            }
            if let Some(jwks) = &inner.jwks {
                return Ok((jwks.key(kid, &inner.template).await?, None));
            }
            // A `kid` is only ignored where no key is named by one.
            if inner.keys.iter().any(|k| k.kid.is_some()) {
                return Err(JwtError::UnknownKey);
            }
        }
        if inner.keys.iter().any(|k| k.key.is_some()) {
            // Kong's lookup: the credential named by a claim (or header field) of the
            // token, read before verification and trusted only once the signature is.
            let claims: Map<String, Value> = jsonwebtoken::dangerous::insecure_decode_claims(token)
                .map_err(JwtError::Malformed)?;
            let named = claims
                .get(&inner.key_claim_name)
                .and_then(Value::as_str)
                .map(str::to_owned)
                .or_else(|| {
                    header
                        .extras
                        .get::<String>(&inner.key_claim_name)
                        .ok()
                        .flatten()
                });
            if let Some(named) = named {
                if let Some(key) = inner.keys.iter().find(|k| k.key.as_ref() == Some(&named)) {
                    return Ok(found(key));
                }
            }
        }
        // Keys named neither way serve any token signed with their algorithm.
        let mut anonymous = inner
            .keys
            .iter()
            .filter(|k| k.kid.is_none() && k.key.is_none())
            .peekable();
        if anonymous.peek().is_none() {
            return Err(JwtError::UnknownKey);
        }
        anonymous
            .find(|k| k.resolved.algorithms.contains(&header.alg))
            .map(found)
            .ok_or(JwtError::Algorithm)
    }
}

/// What the layer does around the verifier.
#[derive(Debug)]
struct Policy {
    header_names: Vec<HeaderName>,
    uri_param_names: Vec<String>,
    cookie_names: Vec<String>,
    run_on_preflight: bool,
    realm: String,
    forward: Vec<(String, HeaderName)>,
    required_scopes: Vec<String>,
}

/// Applies [`JwtAuth`]; built by [`JwtConfig::layer`].
#[derive(Debug, Clone)]
pub struct JwtAuthLayer {
    verifier: JwtVerifier,
    policy: Arc<Policy>,
}

impl JwtAuthLayer {
    fn from_verifier(verifier: JwtVerifier, config: &JwtConfig) -> Self {
        let policy = Policy {
            header_names: config
                .header_names
                .iter()
                .filter_map(|h| HeaderName::from_bytes(h.as_bytes()).ok())
                .collect(),
            uri_param_names: config.uri_param_names.clone(),
            cookie_names: config.cookie_names.clone(),
            run_on_preflight: config.run_on_preflight,
            realm: config.realm.replace(['"', '\\'], ""),
            forward: config
                .forward_claims
                .iter()
                .filter_map(|(claim, h)| {
                    Some((claim.clone(), HeaderName::from_bytes(h.as_bytes()).ok()?))
                })
                .collect(),
            required_scopes: config.required_scopes.clone(),
        };
        Self {
            verifier,
            policy: Arc::new(policy),
        }
    }

    /// The verifier this layer uses.
    pub fn verifier(&self) -> &JwtVerifier {
        &self.verifier
    }
}

impl<S> Layer<S> for JwtAuthLayer {
    type Service = JwtAuth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        JwtAuth {
            inner,
            verifier: self.verifier.clone(),
            policy: self.policy.clone(),
        }
    }
}

/// Lets a request through only with a valid token holding the required scopes; see the
/// [module docs](self).
#[derive(Debug, Clone)]
pub struct JwtAuth<S> {
    inner: S,
    verifier: JwtVerifier,
    policy: Arc<Policy>,
}

impl<S> JwtAuth<S> {
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

impl Policy {
    fn token<'a>(&self, request: &'a Request<Body>) -> Option<&'a str> {
        for name in &self.header_names {
            if let Some(value) = request.headers().get(name) {
                let value = value.to_str().ok()?.trim();
                let token = match value.split_once(' ') {
                    Some((scheme, rest)) if scheme.eq_ignore_ascii_case("bearer") => rest.trim(),
                    _ => value,
                };
                return Some(token);
            }
        }
        if let Some(query) = request.uri().query() {
            for pair in query.split('&') {
                if let Some((name, value)) = pair.split_once('=') {
                    if self.uri_param_names.iter().any(|n| n == name) {
                        return Some(value);
                    }
                }
            }
        }
        for cookies in request.headers().get_all(header::COOKIE) {
            let Ok(cookies) = cookies.to_str() else {
                continue;
            };
            for cookie in cookies.split(';') {
                if let Some((name, value)) = cookie.trim().split_once('=') {
                    if self.cookie_names.iter().any(|n| n == name) {
                        return Some(value);
                    }
                }
            }
        }
        None
    }

    fn unauthorized(&self, request: &Request<Body>, error: &JwtError) -> Response<Body> {
        let (challenge, reason, code) = match error {
            JwtError::MissingToken => (
                format!("Bearer realm=\"{}\"", self.realm),
                "jwt_missing",
                "unauthorized",
            ),
            other => (
                format!(
                    "Bearer realm=\"{}\", error=\"invalid_token\", error_description=\"{other}\"",
                    self.realm
                ),
                "jwt_invalid",
                "invalid_token",
            ),
        };
        count_rejection(request, reason);
        tracing::debug!(error = %error, "jwt: refused");
        let mut response = error_response(StatusCode::UNAUTHORIZED, code, &error.to_string());
        if let Ok(value) = HeaderValue::from_str(&challenge) {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, value);
        }
        response
    }

    fn forbidden(&self, request: &Request<Body>) -> Response<Body> {
        count_rejection(request, "jwt_scope");
        let scopes = self.required_scopes.join(" ").replace(['"', '\\'], "");
        let mut response = error_response(
            StatusCode::FORBIDDEN,
            "insufficient_scope",
            "the token lacks a scope this route requires",
        );
        let challenge = format!(
            "Bearer realm=\"{}\", error=\"insufficient_scope\", scope=\"{scopes}\"",
            self.realm
        );
        if let Ok(value) = HeaderValue::from_str(&challenge) {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, value);
        }
        response
    }

    fn forward(&self, request: &mut Request<Body>, claims: &VerifiedClaims) {
        if let Some(value) = claims
            .consumer()
            .and_then(|c| HeaderValue::from_str(c).ok())
        {
            request.headers_mut().insert(CONSUMER_USERNAME, value);
        }
        for (claim, name) in &self.forward {
            let text = match claims.get(claim) {
                None | Some(Value::Null) => continue,
                Some(Value::String(text)) => text.clone(),
                Some(Value::Array(items)) if items.iter().all(Value::is_string) => items
                    .iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(","),
                Some(other) => other.to_string(),
            };
            match HeaderValue::from_str(&text) {
                Ok(value) => {
                    request.headers_mut().insert(name.clone(), value);
                }
                Err(_) => tracing::debug!(claim, "jwt: claim not sendable as a header"),
            }
        }
    }
}

impl<S: HttpService> Service<Request<Body>> for JwtAuth<S> {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let policy = self.policy.clone();
        let verifier = self.verifier.clone();
        for (_, name) in &policy.forward {
            request.headers_mut().remove(name);
        }
        request.headers_mut().remove(CONSUMER_USERNAME);
        if request.method() == Method::OPTIONS && !policy.run_on_preflight {
            return Box::pin(inner.call(request));
        }
        let token = policy.token(&request).map(str::to_owned);
        Box::pin(async move {
            let claims = match token {
                None => Err(JwtError::MissingToken),
                Some(token) => verifier.verify(&token).await,
            };
            let claims = match claims {
                Ok(claims) => claims,
                Err(error) => return Ok(policy.unauthorized(&request, &error)),
            };
            if !policy
                .required_scopes
                .iter()
                .all(|needed| claims.scopes().any(|held| held == needed))
            {
                return Ok(policy.forbidden(&request));
            }
            policy.forward(&mut request, &claims);
            request.extensions_mut().insert(claims);
            inner.call(request).await
        })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn verifier() -> JwtVerifier {
        JwtConfig::with_keys([
            KeyConfig::secret("HS256", "secret"),
            KeyConfig::secret("HS512", "other").with_kid("k"),
        ])
        .verifier()
        .unwrap()
    }

    fn block_on<F: std::future::Future>(future: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(future)
    }

    proptest! {
        /// No string, however made, passes or panics the verifier.
        #[test]
        fn garbage_is_refused(token in "[A-Za-z0-9_.=+/-]{0,300}") {
            prop_assert!(block_on(verifier().verify(&token)).is_err());
        }

        /// Three base64url parts of random bytes are refused too.
        #[test]
        fn random_parts_are_refused(
            parts in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 3),
        ) {
            const TABLE: &[u8; 64] =
                b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
            let encoded: Vec<String> = parts
                .iter()
                .map(|bytes| bytes.iter().map(|b| TABLE[usize::from(b % 64)] as char).collect())
                .collect();
            prop_assert!(block_on(verifier().verify(&encoded.join("."))).is_err());
        }
    }

    #[test]
    fn scopes_come_from_scope_scp_and_roles() {
        let claims = serde_json::json!({
            "scope": "a b",
            "scp": ["c"],
            "roles": ["d", 7],
        });
        let claims = VerifiedClaims::new(claims.as_object().unwrap().clone());
        assert_eq!(claims.scopes().collect::<Vec<_>>(), ["a", "b", "c", "d"]);
        let scp_string = serde_json::json!({ "scp": "e f" });
        let claims = VerifiedClaims::new(scp_string.as_object().unwrap().clone());
        assert_eq!(claims.scopes().collect::<Vec<_>>(), ["e", "f"]);
    }

    #[test]
    fn a_jwks_verifier_builds_outside_a_runtime() {
        let config = JwtConfig {
            jwks_url: Some("http://127.0.0.1:9/jwks.json".to_owned()),
            ..JwtConfig::default()
        };
        assert!(config.layer().is_ok());
    }
}
