//! Verification keys: those from the configuration, and a cached JSON Web Key Set.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http::{StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use micro_core::tls::{ClientTlsConfig, HttpsConnector, TlsError};
use tokio::time::Instant;

use super::error::{JwksError, JwtError};

/// A decoded key, the algorithms it may verify, and the checks applied with it.
pub(crate) struct ResolvedKey {
    pub(crate) algorithms: Vec<Algorithm>,
    pub(crate) decoding: DecodingKey,
    pub(crate) validation: Validation,
}

/// A key from the configuration, selected by `kid` or by the key claim.
pub(crate) struct StaticKey {
    pub(crate) kid: Option<String>,
    pub(crate) key: Option<String>,
    pub(crate) consumer: Option<Arc<str>>,
    pub(crate) resolved: Arc<ResolvedKey>,
}

const JWKS_BODY_LIMIT: usize = 1024 * 1024;
const JWKS_TIMEOUT: Duration = Duration::from_secs(5);

struct State {
    keys: HashMap<String, Arc<ResolvedKey>>,
    fetched_at: Option<Instant>,
    /// Bumped by every fetch attempt, so requests that queued behind one do not repeat it.
    generation: u64,
}

/// The keys of a JWKS URL by `kid`, fetched on first use, again when older than the TTL,
/// and on an unknown `kid` — but never twice within the minimum refresh interval, so a
/// flood of made-up `kid`s cannot turn the gateway against the identity provider.
pub(crate) struct JwksCache {
    url: Uri,
    ttl: Duration,
    min_refresh: Duration,
    client: Client<HttpsConnector, Empty<Bytes>>,
    state: RwLock<State>,
    // One fetch at a time; the others wait for it and reuse its answer.
    fetching: tokio::sync::Mutex<()>,
}

impl JwksCache {
    /// A cache of the set at `url`; an `https` one is verified as `tls` says.
    pub(crate) fn new(
        url: Uri,
        ttl: Duration,
        min_refresh: Duration,
        tls: &ClientTlsConfig,
    ) -> Result<Self, TlsError> {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        let connector = if url.scheme() == Some(&http::uri::Scheme::HTTPS) {
            tls.https_connector(http)?
        } else {
            micro_core::tls::http_only_connector(http)
        };
        Ok(Self {
            url,
            ttl,
            min_refresh,
            client: Client::builder(TokioExecutor::new()).build(connector),
            state: RwLock::new(State {
                keys: HashMap::new(),
                fetched_at: None,
                generation: 0,
            }),
            fetching: tokio::sync::Mutex::new(()),
        })
    }

    fn lookup(&self, kid: &str) -> (Option<Arc<ResolvedKey>>, bool, u64) {
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let fresh = state
            .fetched_at
            .is_some_and(|at| now.duration_since(at) < self.ttl);
        let may_refresh = state
            .fetched_at
            .is_none_or(|at| now.duration_since(at) >= self.min_refresh);
        (
            state
                .keys
                .get(kid)
                .cloned()
                .filter(|_| fresh || !may_refresh),
            may_refresh,
            state.generation,
        )
    }

    /// The key named `kid`, fetching the set when it is unknown or stale and a fetch is
    /// allowed.
    pub(crate) async fn key(
        &self,
        kid: &str,
        template: &Validation,
    ) -> Result<Arc<ResolvedKey>, JwtError> {
        let (found, may_refresh, generation) = self.lookup(kid);
        if let Some(key) = found {
            return Ok(key);
        }
        if !may_refresh {
            return Err(JwtError::UnknownKey);
        }
        let _fetching = self.fetching.lock().await;
        let current = self
            .state
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .generation;
        let outcome = if current == generation {
            let fetched = self.fetch(template).await;
            let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
            state.generation += 1;
            state.fetched_at = Some(Instant::now());
            match fetched {
                Ok(keys) => {
                    state.keys = keys;
                    Ok(())
                }
                Err(error) => {
                    tracing::warn!(url = %self.url, error = %error, "cannot fetch the jwks");
                    Err(error)
                }
            }
        } else {
            Ok(())
        };
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        match (state.keys.get(kid), outcome) {
            (Some(key), _) => Ok(key.clone()),
            (None, Ok(())) => Err(JwtError::UnknownKey),
            (None, Err(error)) => Err(JwtError::Jwks(error)),
        }
    }

    async fn fetch(
        &self,
        template: &Validation,
    ) -> Result<HashMap<String, Arc<ResolvedKey>>, JwksError> {
        let response = tokio::time::timeout(JWKS_TIMEOUT, self.client.get(self.url.clone()))
            .await
            .map_err(|elapsed| JwksError::Request(Box::new(elapsed)))?
            .map_err(|e| JwksError::Request(Box::new(e)))?;
        if response.status() != StatusCode::OK {
            return Err(JwksError::Status(response.status()));
        }
        let body = tokio::time::timeout(
            JWKS_TIMEOUT,
            Limited::new(response.into_body(), JWKS_BODY_LIMIT).collect(),
        )
        .await
        .map_err(|elapsed| JwksError::Request(Box::new(elapsed)))?
        .map_err(JwksError::Body)?
        .to_bytes();
        let set: JwkSet =
            serde_json::from_slice(&body).map_err(|e| JwksError::Body(Box::new(e)))?;
        let mut keys = HashMap::new();
        for jwk in &set.keys {
            let Some(kid) = &jwk.common.key_id else {
                continue;
            };
            match resolve_jwk(jwk, template) {
                Some(key) => {
                    keys.insert(kid.clone(), Arc::new(key));
                }
                None => tracing::debug!(kid, "skipping an unusable jwk"),
            }
        }
        Ok(keys)
    }
}

/// A published key and the algorithms it may verify: its `alg` when it names one, else
/// those of its key type. Symmetric (`oct`) keys are never taken from a URL.
fn resolve_jwk(jwk: &Jwk, template: &Validation) -> Option<ResolvedKey> {
    let by_type = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => vec![Algorithm::RS256, Algorithm::RS384, Algorithm::RS512],
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => vec![Algorithm::ES256],
            EllipticCurve::P384 => vec![Algorithm::ES384],
            _ => return None,
        },
        AlgorithmParameters::OctetKeyPair(okp) if okp.curve == EllipticCurve::Ed25519 => {
            vec![Algorithm::EdDSA]
        }
        _ => return None,
    };
    let algorithms = match jwk.common.key_algorithm {
        Some(named) => {
            let named = super::config::parse_algorithm(&format!("{named:?}"))?;
            by_type.contains(&named).then(|| vec![named])?
        }
        None => by_type,
    };
    let decoding = DecodingKey::from_jwk(jwk).ok()?;
    let mut validation = template.clone();
    validation.algorithms = algorithms.clone();
    Some(ResolvedKey {
        algorithms,
        decoding,
        validation,
    })
}
