//! [`JwtConfig`]: Kong's `jwt` plugin configuration plus issuer, audience, leeway, JWKS,
//! claim forwarding and required scopes.

use std::collections::BTreeMap;
use std::time::Duration;

use http::HeaderName;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use super::error::JwtConfigError;
use super::keys::{JwksCache, ResolvedKey, StaticKey};
use super::{JwtAuthLayer, JwtVerifier, VerifierInner};

/// How the `jwt` plugin finds, verifies and forwards tokens.
///
/// Kong's fields keep their meaning (`header_names`, `uri_param_names`, `cookie_names`,
/// `claims_to_verify`, `key_claim_name`, `secret_is_base64`, `maximum_expiration`,
/// `run_on_preflight`, `realm`); Kong's consumer credentials (`key`, `algorithm`,
/// `secret`, `rsa_public_key`) are given inline under `keys`. The rest is ours.
///
/// ```yaml
/// name: jwt
/// config:
///   keys:
///     - kid: k1
///       algorithm: RS256
///       rsa_public_key: |
///         -----BEGIN PUBLIC KEY-----
///         ...
///   jwks_url: https://auth.internal/.well-known/jwks.json
///   jwks_tls: { ca: /etc/micro/tls/internal-ca.pem }   # optional: the system store otherwise
///   issuer: https://auth.shop.example
///   audience: shop
///   leeway: 30
///   forward_claims: { sub: x-user-id }
///   required_scopes: [orders:write]
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct JwtConfig {
    /// Headers that may carry the token, `Bearer ` prefix optional (`authorization`).
    pub header_names: Vec<String>,
    /// Query parameters that may carry the token (`jwt`).
    pub uri_param_names: Vec<String>,
    /// Cookies that may carry the token (none).
    pub cookie_names: Vec<String>,
    /// Registered claims that must be present and valid: `exp` and `nbf` (`[exp]`).
    /// `exp` and `nbf` are checked whenever present anyway.
    pub claims_to_verify: Vec<String>,
    /// The claim (or header field) naming the credential a `keys[].key` matches (`iss`).
    pub key_claim_name: String,
    /// HMAC secrets are base64 (Kong's flag).
    pub secret_is_base64: bool,
    /// When not zero, the longest lifetime in seconds a token may have left.
    pub maximum_expiration: u64,
    /// Check CORS preflight (`OPTIONS`) requests too (true, as Kong).
    pub run_on_preflight: bool,
    /// The `realm` of the `WWW-Authenticate` challenge (`micro-gateway`).
    pub realm: String,
    /// Keys given in the file; each is pinned to one algorithm.
    pub keys: Vec<KeyConfig>,
    /// A JSON Web Key Set to fetch keys from by `kid`: an `https://` URL (verified against
    /// the system trust store, or as [`jwks_tls`](Self::jwks_tls) says), or `http://` on
    /// a trusted network only, as whoever can change the answer can mint tokens.
    pub jwks_url: Option<String>,
    /// How an `https` [`jwks_url`](Self::jwks_url) is verified: a CA bundle in place of
    /// the system store, a client certificate (`ca`, `cert`, `key`; see
    /// [`ClientTlsConfig`](micro_core::tls::ClientTlsConfig)).
    pub jwks_tls: micro_core::tls::ClientTlsConfig,
    /// Seconds before a fetched JWKS is fetched again (600).
    pub jwks_cache_ttl: u64,
    /// The fewest seconds between two fetches, however many unknown `kid`s arrive (10).
    pub jwks_min_refresh_interval: u64,
    /// Accepted `iss` values; any when empty.
    #[serde(deserialize_with = "one_or_many")]
    pub issuer: Vec<String>,
    /// Accepted `aud` values; a token must carry one of them. When empty, a token that
    /// carries an `aud` at all is refused (`401 invalid_token`, audience): a token meant
    /// for another API is not accepted by a gateway that names none.
    #[serde(deserialize_with = "one_or_many")]
    pub audience: Vec<String>,
    /// Seconds of clock skew allowed on `exp` and `nbf` (0).
    pub leeway: u64,
    /// Claims sent upstream as headers: claim name to header name. Incoming copies of
    /// those headers are always removed, so a client cannot forge them.
    pub forward_claims: BTreeMap<String, String>,
    /// Scopes or roles the token must all hold, found in `scope` (space-separated),
    /// `scp` and `roles`; a token lacking one gets `403`.
    pub required_scopes: Vec<String>,
    /// The longest token accepted, in bytes (8192); longer ones are refused undecoded.
    pub max_token_size: usize,
    /// Kong's anonymous consumer; not supported, accepted only when empty.
    pub anonymous: Option<String>,
    /// Consumers whose `jwt_secrets` are keys too (from the declarative file's
    /// `consumers`).
    #[serde(skip)]
    pub consumers: Vec<JwtConsumer>,
}

/// A Kong consumer and its JWT credentials (`consumers[].jwt_secrets` in a declarative
/// file). A token verified with one of its keys names it upstream in
/// `X-Consumer-Username`, and the rate limiter counts it by that name.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct JwtConsumer {
    /// The consumer's name.
    pub username: Option<String>,
    /// Kong's `custom_id`, used when there is no `username`.
    pub custom_id: Option<String>,
    /// Kong's id; accepted and ignored.
    pub id: Option<String>,
    /// Kong's tags; accepted and ignored.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Its keys, each selected by `key` against the token's `key_claim_name` claim.
    #[serde(default)]
    pub jwt_secrets: Vec<KeyConfig>,
}

impl Default for JwtConfig {
    fn default() -> Self {
        Self {
            header_names: vec!["authorization".to_owned()],
            uri_param_names: vec!["jwt".to_owned()],
            cookie_names: Vec::new(),
            claims_to_verify: vec!["exp".to_owned()],
            key_claim_name: "iss".to_owned(),
            secret_is_base64: false,
            maximum_expiration: 0,
            run_on_preflight: true,
            realm: "micro-gateway".to_owned(),
            keys: Vec::new(),
            jwks_url: None,
            jwks_tls: micro_core::tls::ClientTlsConfig::default(),
            jwks_cache_ttl: 600,
            jwks_min_refresh_interval: 10,
            issuer: Vec::new(),
            audience: Vec::new(),
            leeway: 0,
            forward_claims: BTreeMap::new(),
            required_scopes: Vec::new(),
            max_token_size: 8192,
            anonymous: None,
            consumers: Vec::new(),
        }
    }
}

/// One verification key, in the shape of Kong's `jwt_secrets` credential.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct KeyConfig {
    /// Selects this key for tokens whose `kid` header is this.
    #[serde(default)]
    pub kid: Option<String>,
    /// Selects this key for tokens whose `key_claim_name` claim is this (Kong's `key`).
    #[serde(default)]
    pub key: Option<String>,
    /// The one algorithm tokens signed with this key may name (`HS256`).
    #[serde(default = "hs256")]
    pub algorithm: String,
    /// The HMAC secret, for `HS*`.
    #[serde(default)]
    pub secret: Option<String>,
    /// The public key PEM, for `RS*`, `ES*` and `EdDSA` (Kong's name; `public_key` too).
    #[serde(default, alias = "public_key")]
    pub rsa_public_key: Option<String>,
    /// Kong's credential id; accepted and ignored.
    #[serde(default)]
    pub id: Option<String>,
    /// Kong's tags; accepted and ignored.
    #[serde(default)]
    pub tags: Vec<String>,
}

fn hs256() -> String {
    "HS256".to_owned()
}

impl KeyConfig {
    /// A key with an HMAC secret for `algorithm` (`HS256`, `HS384`, `HS512`).
    pub fn secret(algorithm: &str, secret: impl Into<String>) -> Self {
        Self {
            kid: None,
            key: None,
            algorithm: algorithm.to_owned(),
            secret: Some(secret.into()),
            rsa_public_key: None,
            id: None,
            tags: Vec::new(),
        }
    }

    /// A key with a public key PEM for `algorithm` (`RS256`, `ES384`, `EdDSA`, ...).
    pub fn public_key(algorithm: &str, pem: impl Into<String>) -> Self {
        Self {
            kid: None,
            key: None,
            algorithm: algorithm.to_owned(),
            secret: None,
            rsa_public_key: Some(pem.into()),
            id: None,
            tags: Vec::new(),
        }
    }

    /// Selects this key by the token's `kid` header.
    pub fn with_kid(mut self, kid: impl Into<String>) -> Self {
        self.kid = Some(kid.into());
        self
    }
}

fn one_or_many<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Option::<OneOrMany>::deserialize(deserializer)? {
        None => Vec::new(),
        Some(OneOrMany::One(one)) => vec![one],
        Some(OneOrMany::Many(many)) => many,
    })
}

const SUPPORTED: &str = "HS256, HS384, HS512, RS256, RS384, RS512, ES256, ES384, EdDSA";

pub(super) fn parse_algorithm(name: &str) -> Option<Algorithm> {
    Some(match name {
        "HS256" => Algorithm::HS256,
        "HS384" => Algorithm::HS384,
        "HS512" => Algorithm::HS512,
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        "EdDSA" => Algorithm::EdDSA,
        _ => return None,
    })
}

impl JwtConfig {
    /// Adds the keys of these consumers.
    pub fn with_consumers(mut self, consumers: &[JwtConsumer]) -> Self {
        self.consumers.extend_from_slice(consumers);
        self
    }

    /// A configuration with Kong's defaults and these keys.
    pub fn with_keys(keys: impl IntoIterator<Item = KeyConfig>) -> Self {
        Self {
            keys: keys.into_iter().collect(),
            ..Self::default()
        }
    }

    /// Checks the configuration, decodes its keys and builds the layer.
    ///
    /// # Errors
    ///
    /// A [`JwtConfigError`] naming the field at fault: an unknown algorithm, a key
    /// without the material its algorithm needs, a PEM that does not parse, an invalid
    /// header name or URL, no key source at all.
    pub fn layer(&self) -> Result<JwtAuthLayer, JwtConfigError> {
        Ok(JwtAuthLayer::from_verifier(self.verifier()?, self))
    }

    /// Like [`layer`](Self::layer), for the verifier alone.
    ///
    /// # Errors
    ///
    /// As [`layer`](Self::layer).
    pub fn verifier(&self) -> Result<JwtVerifier, JwtConfigError> {
        if self.anonymous.as_deref().is_some_and(|a| !a.is_empty()) {
            return Err(JwtConfigError::new(
                "anonymous",
                "anonymous consumers are not supported",
            ));
        }
        let consumer_keys = self
            .consumers
            .iter()
            .map(|c| c.jwt_secrets.len())
            .sum::<usize>();
        if self.keys.is_empty() && self.jwks_url.is_none() && consumer_keys == 0 {
            return Err(JwtConfigError::new(
                "keys",
                "no key: give `keys`, a `jwks_url`, or consumers with `jwt_secrets`",
            ));
        }
        for (i, claim) in self.claims_to_verify.iter().enumerate() {
            if claim != "exp" && claim != "nbf" {
                return Err(JwtConfigError::new(
                    format!("claims_to_verify[{i}]"),
                    format!("`{claim}` is not one of `exp`, `nbf`"),
                ));
            }
        }
        for (i, name) in self.header_names.iter().enumerate() {
            HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                JwtConfigError::new(format!("header_names[{i}]"), "not a header name")
            })?;
        }
        for (claim, header) in &self.forward_claims {
            HeaderName::from_bytes(header.as_bytes()).map_err(|_| {
                JwtConfigError::new(
                    format!("forward_claims.{claim}"),
                    format!("`{header}` is not a header name"),
                )
            })?;
        }
        let mut keys = Vec::with_capacity(self.keys.len());
        for (i, key) in self.keys.iter().enumerate() {
            keys.push(self.static_key(key, None).map_err(|(field, reason)| {
                JwtConfigError::new(format!("keys[{i}]{field}"), reason)
            })?);
        }
        for (c, consumer) in self.consumers.iter().enumerate() {
            let name = consumer.username.as_ref().or(consumer.custom_id.as_ref());
            for (i, key) in consumer.jwt_secrets.iter().enumerate() {
                keys.push(self.static_key(key, name).map_err(|(field, reason)| {
                    JwtConfigError::new(format!("consumers[{c}].jwt_secrets[{i}]{field}"), reason)
                })?);
            }
        }
        let tls_set = self.jwks_tls != micro_core::tls::ClientTlsConfig::default();
        let https = self
            .jwks_url
            .as_deref()
            .is_some_and(|url| url.starts_with("https://"));
        if tls_set && !https {
            return Err(JwtConfigError::new(
                "jwks_tls",
                "applies to an `https://` jwks_url only",
            ));
        }
        let jwks = match &self.jwks_url {
            None => None,
            Some(url) => {
                let uri: http::Uri = url
                    .parse()
                    .map_err(|e| JwtConfigError::new("jwks_url", e))?;
                if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
                    return Err(JwtConfigError::new(
                        "jwks_url",
                        "only `https://host/...` and `http://host/...` urls are supported",
                    ));
                }
                let cache = JwksCache::new(
                    uri,
                    Duration::from_secs(self.jwks_cache_ttl),
                    Duration::from_secs(self.jwks_min_refresh_interval),
                    &self.jwks_tls,
                )
                .map_err(|e| JwtConfigError::new(format!("jwks_tls.{}", e.key()), e))?;
                Some(cache)
            }
        };
        Ok(JwtVerifier::new(VerifierInner {
            keys,
            jwks,
            key_claim_name: self.key_claim_name.clone(),
            template: self.validation_template(),
            maximum_expiration: self.maximum_expiration,
            max_token_size: self.max_token_size,
        }))
    }

    /// The validation every key starts from; the key adds its algorithm.
    fn validation_template(&self) -> Validation {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.algorithms.clear();
        validation.leeway = self.leeway;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        let mut required: Vec<&str> = self.claims_to_verify.iter().map(String::as_str).collect();
        if !self.issuer.is_empty() {
            validation.set_issuer(&self.issuer);
            required.push("iss");
        }
        // With no audience configured `validate_aud` stays on and `aud` unset, which
        // makes jsonwebtoken refuse any token that carries an `aud` (RFC 7519 §4.1.3).
        validation.validate_aud = true;
        if !self.audience.is_empty() {
            validation.set_audience(&self.audience);
            required.push("aud");
        }
        validation.set_required_spec_claims(&required);
        validation
    }

    fn static_key(
        &self,
        key: &KeyConfig,
        consumer: Option<&String>,
    ) -> Result<StaticKey, (&'static str, String)> {
        let algorithm = parse_algorithm(&key.algorithm).ok_or_else(|| {
            (
                ".algorithm",
                format!(
                    "unknown algorithm `{}`; use one of {SUPPORTED}",
                    key.algorithm
                ),
            )
        })?;
        let decoding = match (algorithm, &key.secret, &key.rsa_public_key) {
            (Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512, Some(secret), None) => {
                if secret.is_empty() {
                    return Err((".secret", "the secret is empty".to_owned()));
                }
                if self.secret_is_base64 {
                    DecodingKey::from_base64_secret(secret)
                        .map_err(|e| (".secret", format!("not base64: {e}")))?
                } else {
                    DecodingKey::from_secret(secret.as_bytes())
                }
            }
            (Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512, _, _) => {
                return Err((
                    "",
                    format!("{} needs a `secret` and no public key", key.algorithm),
                ))
            }
            (_, None, Some(pem)) => {
                let pem = pem.as_bytes();
                match algorithm {
                    Algorithm::ES256 | Algorithm::ES384 => DecodingKey::from_ec_pem(pem),
                    Algorithm::EdDSA => DecodingKey::from_ed_pem(pem),
                    _ => DecodingKey::from_rsa_pem(pem),
                }
                .map_err(|e| {
                    (
                        ".rsa_public_key",
                        format!("not a {} public key pem: {e}", key.algorithm),
                    )
                })?
            }
            (_, _, _) => {
                return Err((
                    "",
                    format!("{} needs an `rsa_public_key` and no secret", key.algorithm),
                ))
            }
        };
        let mut validation = self.validation_template();
        validation.algorithms = vec![algorithm];
        Ok(StaticKey {
            kid: key.kid.clone(),
            key: key.key.clone(),
            consumer: consumer.map(|name| name.as_str().into()),
            resolved: std::sync::Arc::new(ResolvedKey {
                algorithms: vec![algorithm],
                decoding,
                validation,
            }),
        })
    }
}
