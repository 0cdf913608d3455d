//! JWT authentication through a real gateway: bad tokens refused before the upstream,
//! good tokens of every algorithm family let through, JWKS rotation.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::routing::{any, get};
use axum::{Json, Router};
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header};
use micro_core::host::RunningHost;
use micro_gateway::gateway::{Gateway, Route};
use micro_gateway::plugins::jwt::{JwtConfig, KeyConfig};
use micro_gateway::proxy::{Proxy, ProxyConfig, Upstream};
use serde_json::{json, Value};
use tower::ServiceBuilder;

use crate::support::{gateway, send};

pub(crate) fn fixture(name: &str) -> String {
    let path = format!("{}/tests/it/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

pub(crate) fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

pub(crate) const SECRET: &str = "a shared secret long enough for HS512 tests";

/// The signing key of `alg` from the fixtures (HMAC: [`SECRET`]).
pub(crate) fn signing_key(alg: Algorithm) -> EncodingKey {
    match alg {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
            EncodingKey::from_secret(SECRET.as_bytes())
        }
        Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512 => {
            EncodingKey::from_rsa_pem(fixture("rsa_private.pem").as_bytes()).unwrap()
        }
        Algorithm::ES256 => {
            EncodingKey::from_ec_pem(fixture("ec256_private.pem").as_bytes()).unwrap()
        }
        Algorithm::ES384 => {
            EncodingKey::from_ec_pem(fixture("ec384_private.pem").as_bytes()).unwrap()
        }
        Algorithm::EdDSA => {
            EncodingKey::from_ed_pem(fixture("ed25519_private.pem").as_bytes()).unwrap()
        }
        other => panic!("no fixture for {other:?}"),
    }
}

pub(crate) fn sign(alg: Algorithm, kid: Option<&str>, claims: &Value, key: &EncodingKey) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, key).unwrap()
}

pub(crate) fn good_claims() -> Value {
    json!({
        "sub": "user-42",
        "iss": "https://auth.test",
        "aud": "shop",
        "exp": now() + 600,
        "scope": "orders:read orders:write",
        "roles": ["customer"],
    })
}

const FAMILIES: [Algorithm; 9] = [
    Algorithm::HS256,
    Algorithm::HS384,
    Algorithm::HS512,
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

fn public_pem(alg: Algorithm) -> String {
    match alg {
        Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512 => fixture("rsa_public.pem"),
        Algorithm::ES256 => fixture("ec256_public.pem"),
        Algorithm::ES384 => fixture("ec384_public.pem"),
        Algorithm::EdDSA => fixture("ed25519_public.pem"),
        other => panic!("{other:?} has no public key"),
    }
}

/// One key per algorithm, selected by a `kid` equal to the algorithm's name, and an
/// unnamed RS256 key for tokens without a `kid`.
fn config_with_every_family() -> JwtConfig {
    let mut keys: Vec<KeyConfig> = FAMILIES
        .iter()
        .map(|alg| {
            let name = format!("{alg:?}");
            match alg {
                Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
                    KeyConfig::secret(&name, SECRET)
                }
                _ => KeyConfig::public_key(&name, public_pem(*alg)),
            }
            .with_kid(name)
        })
        .collect();
    keys.push(KeyConfig::public_key("RS256", fixture("rsa_public.pem")));
    let mut config = JwtConfig::with_keys(keys);
    config.issuer = vec!["https://auth.test".to_owned()];
    config.audience = vec!["shop".to_owned()];
    config
        .forward_claims
        .insert("sub".to_owned(), "x-user-id".to_owned());
    config
        .forward_claims
        .insert("roles".to_owned(), "x-user-roles".to_owned());
    config
}

/// An upstream that counts the requests it answers and echoes their headers.
pub(crate) struct Counted {
    pub(crate) addr: SocketAddr,
    pub(crate) hits: Arc<AtomicUsize>,
}

pub(crate) async fn counted_upstream() -> Counted {
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    let app = Router::new().fallback(any(move |request: axum::extract::Request| {
        let counter = counter.clone();
        async move {
            counter.fetch_add(1, Ordering::SeqCst);
            let headers: serde_json::Map<String, Value> = request
                .headers()
                .iter()
                .map(|(n, v)| (n.to_string(), json!(v.to_str().unwrap_or("<binary>"))))
                .collect();
            Json(json!({ "headers": headers }))
        }
    }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    Counted { addr, hits }
}

/// A gateway whose one route `/api` checks `config` in front of `upstream`.
async fn guarded(config: &JwtConfig, upstream: SocketAddr) -> (RunningHost, SocketAddr) {
    let proxy = Proxy::new(Upstream::from_addr(upstream), ProxyConfig::new());
    let route = ServiceBuilder::new()
        .layer(config.layer().unwrap())
        .service(proxy);
    let gw = Gateway::builder()
        .route(Route::new("api").path("/api").to(route))
        .build()
        .unwrap();
    gateway(gw.into_router()).await
}

async fn call(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, http::HeaderMap, Value) {
    let mut request = http::Request::get(path).header("host", "gateway.test");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let (status, headers, body) = send(addr, request.body(Body::empty()).unwrap()).await;
    let body = serde_json::from_slice(&body).unwrap_or(Value::Null);
    (status.as_u16(), headers, body)
}

fn b64(bytes: &[u8]) -> String {
    use std::fmt::Write;
    // base64url without padding, enough for hand-made tokens.
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            let _ = out.write_char(TABLE[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

#[tokio::test]
async fn every_bad_token_is_refused_and_nothing_reaches_the_upstream() {
    let upstream = counted_upstream().await;
    let (_host, addr) = guarded(&config_with_every_family(), upstream.addr).await;
    let rs = signing_key(Algorithm::RS256);
    let with = |patch: Value| {
        let mut claims = good_claims();
        for (k, v) in patch.as_object().unwrap() {
            if v.is_null() {
                claims.as_object_mut().unwrap().remove(k);
            } else {
                claims[k] = v.clone();
            }
        }
        sign(Algorithm::RS256, Some("RS256"), &claims, &rs)
    };
    let other_rsa = EncodingKey::from_rsa_pem(fixture("rsa2_private.pem").as_bytes()).unwrap();
    let good = with(json!({}));
    let (head, rest) = good.split_once('.').unwrap();
    let (_, signature) = rest.split_once('.').unwrap();
    let mut admin = good_claims();
    admin["sub"] = json!("admin");
    let tampered = format!("{head}.{}.{signature}", b64(admin.to_string().as_bytes()));
    let alg_none = format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT"}"#),
        b64(good_claims().to_string().as_bytes())
    );
    let confusion = sign(
        Algorithm::HS256,
        None,
        &good_claims(),
        &EncodingKey::from_secret(fixture("rsa_public.pem").as_bytes()),
    );
    let confusion_named = sign(
        Algorithm::HS256,
        Some("RS256"),
        &good_claims(),
        &EncodingKey::from_secret(fixture("rsa_public.pem").as_bytes()),
    );
    let enormous = format!("{good}{}", "A".repeat(16 * 1024));
    let corpus: Vec<(&str, String, &str)> = vec![
        ("expired", with(json!({ "exp": now() - 3600 })), "expired"),
        (
            "not yet valid",
            with(json!({ "nbf": now() + 3600 })),
            "not valid yet",
        ),
        (
            "wrong issuer",
            with(json!({ "iss": "https://evil.test" })),
            "issuer",
        ),
        ("no issuer", with(json!({ "iss": null })), "`iss`"),
        (
            "wrong audience",
            with(json!({ "aud": "admin-api" })),
            "audience",
        ),
        ("no expiry", with(json!({ "exp": null })), "`exp`"),
        (
            "bad signature",
            sign(Algorithm::RS256, Some("RS256"), &good_claims(), &other_rsa),
            "signature",
        ),
        ("tampered payload", tampered, "signature"),
        ("alg none", alg_none, "malformed"),
        ("hs/rs confusion", confusion, "algorithm"),
        ("hs/rs confusion with kid", confusion_named, "algorithm"),
        ("malformed base64", "abc!!.d$f.gh*".to_owned(), "malformed"),
        (
            "two parts",
            "eyJhbGciOiJIUzI1NiJ9.e30".to_owned(),
            "malformed",
        ),
        (
            "unknown kid",
            sign(Algorithm::RS256, Some("nobody"), &good_claims(), &rs),
            "no key",
        ),
        ("enormous", enormous, "larger than 8192 bytes"),
    ];
    for (case, token, why) in &corpus {
        let bearer = format!("Bearer {token}");
        let (status, headers, body) =
            call(addr, "/api/orders", &[("authorization", &bearer)]).await;
        assert_eq!(status, 401, "{case}: {body}");
        let challenge = headers["www-authenticate"].to_str().unwrap();
        assert!(
            challenge.starts_with("Bearer realm=\"micro-gateway\""),
            "{case}: {challenge}"
        );
        assert!(
            challenge.contains("error=\"invalid_token\""),
            "{case}: {challenge}"
        );
        assert_eq!(body["error"]["code"], "invalid_token", "{case}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(why), "{case}: {message}");
    }

    let (status, headers, body) = call(addr, "/api/orders", &[]).await;
    assert_eq!(status, 401);
    assert_eq!(
        headers["www-authenticate"],
        "Bearer realm=\"micro-gateway\""
    );
    assert_eq!(body["error"]["code"], "unauthorized");

    // Beyond what the HTTP server takes in a header block, the gateway never runs.
    let huge = format!("Bearer {}", "A".repeat(1024 * 1024));
    let (status, _, _) = call(addr, "/api/orders", &[("authorization", &huge)]).await;
    assert_eq!(status, 431);

    assert_eq!(
        upstream.hits.load(Ordering::SeqCst),
        0,
        "a refused request reached the upstream"
    );
    let (status, _, _) = call(
        addr,
        "/api/orders",
        &[("authorization", &format!("Bearer {good}"))],
    )
    .await;
    assert_eq!(status, 200, "the good token the corpus was made from");
    assert_eq!(upstream.hits.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn every_algorithm_family_verifies_and_claims_go_upstream() {
    let upstream = counted_upstream().await;
    let (_host, addr) = guarded(&config_with_every_family(), upstream.addr).await;
    for alg in FAMILIES {
        let token = sign(
            alg,
            Some(&format!("{alg:?}")),
            &good_claims(),
            &signing_key(alg),
        );
        let bearer = format!("Bearer {token}");
        let (status, _, body) = call(
            addr,
            "/api/orders",
            &[("authorization", &bearer), ("x-user-id", "forged")],
        )
        .await;
        assert_eq!(status, 200, "{alg:?}: {body}");
        assert_eq!(body["headers"]["x-user-id"], "user-42", "{alg:?}");
        assert_eq!(body["headers"]["x-user-roles"], "customer", "{alg:?}");
    }
    // A token without `kid` finds the unnamed key of its algorithm; `?jwt=` carries it too.
    let token = sign(
        Algorithm::RS256,
        None,
        &good_claims(),
        &signing_key(Algorithm::RS256),
    );
    let (status, _, _) = call(addr, &format!("/api/orders?jwt={token}"), &[]).await;
    assert_eq!(status, 200);
    // A forged identity header without a token goes nowhere, and with a token lacking
    // the claim it is removed rather than passed on.
    let mut anonymous = good_claims();
    anonymous.as_object_mut().unwrap().remove("sub");
    let token = sign(
        Algorithm::HS256,
        Some("HS256"),
        &anonymous,
        &signing_key(Algorithm::HS256),
    );
    let (status, _, body) = call(
        addr,
        "/api/orders",
        &[
            ("authorization", &format!("bearer {token}")),
            ("x-user-id", "forged"),
        ],
    )
    .await;
    assert_eq!(status, 200);
    assert!(body["headers"].get("x-user-id").is_none(), "{body}");
    assert_eq!(upstream.hits.load(Ordering::SeqCst), FAMILIES.len() + 2);
}

#[tokio::test]
async fn a_missing_scope_is_forbidden_not_unauthorized() {
    let upstream = counted_upstream().await;
    let mut config = JwtConfig::with_keys([KeyConfig::secret("HS256", SECRET)]);
    config.required_scopes = vec!["orders:write".to_owned()];
    let (_host, addr) = guarded(&config, upstream.addr).await;
    let key = signing_key(Algorithm::HS256);
    let token = |claims: Value| format!("Bearer {}", sign(Algorithm::HS256, None, &claims, &key));

    let mut in_scope = good_claims();
    in_scope.as_object_mut().unwrap().remove("aud");
    let (status, _, _) = call(addr, "/api/x", &[("authorization", &token(in_scope))]).await;
    assert_eq!(status, 200, "in `scope`");
    let scp = json!({ "exp": now() + 60, "scp": ["orders:write"] });
    let (status, _, _) = call(addr, "/api/x", &[("authorization", &token(scp))]).await;
    assert_eq!(status, 200, "in `scp`");
    let role = json!({ "exp": now() + 60, "roles": ["orders:write"] });
    let (status, _, _) = call(addr, "/api/x", &[("authorization", &token(role))]).await;
    assert_eq!(status, 200, "in `roles`");

    let reader = json!({ "exp": now() + 60, "scope": "orders:read", "roles": ["admin"] });
    let (status, headers, body) = call(addr, "/api/x", &[("authorization", &token(reader))]).await;
    assert_eq!(status, 403);
    assert_eq!(body["error"]["code"], "insufficient_scope");
    let challenge = headers["www-authenticate"].to_str().unwrap();
    assert!(
        challenge.contains("error=\"insufficient_scope\""),
        "{challenge}"
    );
    assert!(challenge.contains("scope=\"orders:write\""), "{challenge}");
    assert_eq!(upstream.hits.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn with_no_audience_configured_a_token_carrying_one_is_refused() {
    let upstream = counted_upstream().await;
    let key = signing_key(Algorithm::HS256);
    let token = |claims: Value| format!("Bearer {}", sign(Algorithm::HS256, None, &claims, &key));
    let none = JwtConfig::with_keys([KeyConfig::secret("HS256", SECRET)]);
    let (_host, addr) = guarded(&none, upstream.addr).await;
    for aud in [json!("other-api"), json!(["other-api"]), json!([])] {
        let claims = json!({ "exp": now() + 60, "aud": aud });
        let (status, _, body) = call(addr, "/api/x", &[("authorization", &token(claims))]).await;
        assert_eq!(status, 401, "{aud}: {body}");
    }
    let (status, _, _) = call(
        addr,
        "/api/x",
        &[("authorization", &token(json!({ "exp": now() + 60 })))],
    )
    .await;
    assert_eq!(status, 200, "no `aud`, no audience: accepted");
    assert_eq!(upstream.hits.load(Ordering::SeqCst), 1);

    // With an audience, one of its values is required and others are refused.
    let mut named = none.clone();
    named.audience = vec!["shop".to_owned()];
    let (_host, addr) = guarded(&named, upstream.addr).await;
    for (claims, want) in [
        (json!({ "exp": now() + 60, "aud": "shop" }), 200),
        (json!({ "exp": now() + 60, "aud": ["other", "shop"] }), 200),
        (json!({ "exp": now() + 60, "aud": "other-api" }), 401),
        (json!({ "exp": now() + 60 }), 401),
    ] {
        let (status, _, _) =
            call(addr, "/api/x", &[("authorization", &token(claims.clone()))]).await;
        assert_eq!(status, want, "{claims}");
    }
}

#[tokio::test]
async fn leeway_and_maximum_expiration() {
    let upstream = counted_upstream().await;
    let mut config = JwtConfig::with_keys([KeyConfig::secret("HS384", SECRET)]);
    config.leeway = 120;
    config.maximum_expiration = 3600;
    let (_host, addr) = guarded(&config, upstream.addr).await;
    let key = signing_key(Algorithm::HS384);
    let token = |claims: Value| format!("Bearer {}", sign(Algorithm::HS384, None, &claims, &key));
    let cases = [
        (json!({ "exp": now() - 60 }), 200),
        (json!({ "exp": now() - 600 }), 401),
        (json!({ "exp": now() + 60, "nbf": now() + 60 }), 200),
        (json!({ "exp": now() + 60, "nbf": now() + 600 }), 401),
        (json!({ "exp": now() + 7200 }), 401),
    ];
    for (claims, expected) in cases {
        let (status, _, body) =
            call(addr, "/api/x", &[("authorization", &token(claims.clone()))]).await;
        assert_eq!(status, expected, "{claims}: {body}");
    }
}

/// A JWKS endpoint serving whatever keys the test puts in, counting fetches.
struct Jwks {
    url: String,
    keys: Arc<Mutex<Vec<Jwk>>>,
    fetches: Arc<AtomicUsize>,
    failing: Arc<std::sync::atomic::AtomicBool>,
}

async fn jwks_server() -> Jwks {
    let keys: Arc<Mutex<Vec<Jwk>>> = Arc::default();
    let fetches = Arc::new(AtomicUsize::new(0));
    let failing = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (k, f, fail) = (keys.clone(), fetches.clone(), failing.clone());
    let app = Router::new().route(
        "/.well-known/jwks.json",
        get(move || {
            let (k, f, fail) = (k.clone(), f.clone(), fail.clone());
            async move {
                f.fetch_add(1, Ordering::SeqCst);
                if fail.load(Ordering::SeqCst) {
                    return Err(http::StatusCode::INTERNAL_SERVER_ERROR);
                }
                Ok(Json(JwkSet {
                    keys: k.lock().unwrap().clone(),
                }))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    Jwks {
        url: format!("http://{addr}/.well-known/jwks.json"),
        keys,
        fetches,
        failing,
    }
}

fn jwk(alg: Algorithm, kid: &str, pem: &str) -> Jwk {
    let decoding = match alg {
        Algorithm::ES256 | Algorithm::ES384 => DecodingKey::from_ec_pem(pem.as_bytes()),
        Algorithm::EdDSA => DecodingKey::from_ed_pem(pem.as_bytes()),
        _ => DecodingKey::from_rsa_pem(pem.as_bytes()),
    }
    .unwrap();
    let mut jwk = Jwk::from_decoding_key(&decoding, Some(alg)).unwrap();
    jwk.common.key_id = Some(kid.to_owned());
    jwk
}

#[tokio::test]
async fn jwks_rotation_refreshes_once_per_unknown_kid() {
    let upstream = counted_upstream().await;
    let jwks = jwks_server().await;
    jwks.keys
        .lock()
        .unwrap()
        .push(jwk(Algorithm::RS256, "k1", &fixture("rsa_public.pem")));
    let mut config = JwtConfig::default();
    config.audience = vec!["shop".to_owned()];
    config.jwks_url = Some(jwks.url.clone());
    config.jwks_min_refresh_interval = 0;
    let (_host, addr) = guarded(&config, upstream.addr).await;
    let bearer = |alg: Algorithm, kid: &str, key: &EncodingKey| {
        format!("Bearer {}", sign(alg, Some(kid), &good_claims(), key))
    };
    let rs1 = bearer(Algorithm::RS256, "k1", &signing_key(Algorithm::RS256));
    for _ in 0..3 {
        let (status, _, body) = call(addr, "/api/x", &[("authorization", &rs1)]).await;
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(jwks.fetches.load(Ordering::SeqCst), 1, "the set is cached");

    // The provider rotates to an EC key; tokens naming it arrive at once, concurrently.
    jwks.keys
        .lock()
        .unwrap()
        .push(jwk(Algorithm::ES256, "k2", &fixture("ec256_public.pem")));
    let ec2 = bearer(Algorithm::ES256, "k2", &signing_key(Algorithm::ES256));
    let calls = (0..8).map(|_| {
        let ec2 = ec2.clone();
        async move { call(addr, "/api/x", &[("authorization", &ec2)]).await.0 }
    });
    let statuses = futures_join_all(calls).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(
        jwks.fetches.load(Ordering::SeqCst),
        2,
        "one refresh for the new kid"
    );

    // An RSA-signed token naming the EC key is refused: the key pins the algorithm.
    let wrong = bearer(Algorithm::RS256, "k2", &signing_key(Algorithm::RS256));
    let (status, _, _) = call(addr, "/api/x", &[("authorization", &wrong)]).await;
    assert_eq!(status, 401);
    assert_eq!(jwks.fetches.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn jwks_refreshes_are_rate_limited() {
    let upstream = counted_upstream().await;
    let jwks = jwks_server().await;
    jwks.keys
        .lock()
        .unwrap()
        .push(jwk(Algorithm::EdDSA, "k1", &fixture("ed25519_public.pem")));
    let mut config = JwtConfig::default();
    config.audience = vec!["shop".to_owned()];
    config.jwks_url = Some(jwks.url.clone());
    config.jwks_min_refresh_interval = 3600;
    let (_host, addr) = guarded(&config, upstream.addr).await;
    let ed = format!(
        "Bearer {}",
        sign(
            Algorithm::EdDSA,
            Some("k1"),
            &good_claims(),
            &signing_key(Algorithm::EdDSA)
        )
    );
    let (status, _, _) = call(addr, "/api/x", &[("authorization", &ed)]).await;
    assert_eq!(status, 200);
    for i in 0..20 {
        let made_up = format!(
            "Bearer {}",
            sign(
                Algorithm::EdDSA,
                Some(&format!("kid-{i}")),
                &good_claims(),
                &signing_key(Algorithm::EdDSA)
            )
        );
        let (status, _, body) = call(addr, "/api/x", &[("authorization", &made_up)]).await;
        assert_eq!(status, 401);
        assert_eq!(body["error"]["message"], "no key matches the token");
    }
    assert_eq!(
        jwks.fetches.load(Ordering::SeqCst),
        1,
        "made-up kids caused fetches"
    );
    assert_eq!(upstream.hits.load(Ordering::SeqCst), 1);
}

async fn futures_join_all<F: std::future::Future<Output = u16> + Send + 'static>(
    futures: impl Iterator<Item = F>,
) -> Vec<u16> {
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for handle in handles {
        out.push(handle.await.unwrap());
    }
    out
}

#[tokio::test]
async fn a_stale_jwks_is_refetched_and_kept_when_the_endpoint_fails() {
    let upstream = counted_upstream().await;
    let jwks = jwks_server().await;
    jwks.keys
        .lock()
        .unwrap()
        .push(jwk(Algorithm::ES384, "k1", &fixture("ec384_public.pem")));
    // Stale at once, so every request tries a fetch.
    let mut config = JwtConfig::default();
    config.audience = vec!["shop".to_owned()];
    config.jwks_url = Some(jwks.url.clone());
    config.jwks_cache_ttl = 0;
    config.jwks_min_refresh_interval = 0;
    let (_host, addr) = guarded(&config, upstream.addr).await;
    let token = format!(
        "Bearer {}",
        sign(
            Algorithm::ES384,
            Some("k1"),
            &good_claims(),
            &signing_key(Algorithm::ES384)
        )
    );
    assert_eq!(
        call(addr, "/api/x", &[("authorization", &token)]).await.0,
        200
    );
    assert_eq!(
        call(addr, "/api/x", &[("authorization", &token)]).await.0,
        200
    );
    assert_eq!(jwks.fetches.load(Ordering::SeqCst), 2);

    // The endpoint fails: the keys it published keep working...
    jwks.failing.store(true, Ordering::SeqCst);
    assert_eq!(
        call(addr, "/api/x", &[("authorization", &token)]).await.0,
        200
    );
    assert_eq!(jwks.fetches.load(Ordering::SeqCst), 3);
    // ...but a gateway that never fetched them has nothing to verify with.
    let (_fresh, fresh) = guarded(&config, upstream.addr).await;
    let (status, _, body) = call(fresh, "/api/x", &[("authorization", &token)]).await;
    assert_eq!(status, 401);
    assert_eq!(
        body["error"]["message"],
        "the signing keys cannot be fetched"
    );

    // Back, without the key: a rotation removes it.
    jwks.keys.lock().unwrap().clear();
    jwks.failing.store(false, Ordering::SeqCst);
    assert_eq!(
        call(addr, "/api/x", &[("authorization", &token)]).await.0,
        401
    );
    assert_eq!(upstream.hits.load(Ordering::SeqCst), 3);
}

/// A JWKS endpoint served over TLS by a real micro-core listener, with a certificate for
/// `127.0.0.1` issued by a CA made here (`ca.pem` in `dir`). Returns the host and the URL.
async fn jwks_over_https(keys: Vec<Jwk>, dir: &std::path::Path) -> (RunningHost, String) {
    let app = Router::new().route(
        "/.well-known/jwks.json",
        get(move || {
            let keys = keys.clone();
            async move { Json(JwkSet { keys }) }
        }),
    );
    let (host, addr) = crate::support::serve_tls(app, dir).await;
    (host, format!("https://{addr}/.well-known/jwks.json"))
}

#[tokio::test]
async fn jwks_is_fetched_over_https_and_the_server_is_verified() {
    let upstream = counted_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let keys = vec![jwk(Algorithm::ES256, "k1", &fixture("ec256_public.pem"))];
    let (_jwks, url) = jwks_over_https(keys, dir.path()).await;
    let token = format!(
        "Bearer {}",
        sign(
            Algorithm::ES256,
            Some("k1"),
            &good_claims(),
            &signing_key(Algorithm::ES256)
        )
    );

    let mut config = JwtConfig::default();
    config.audience = vec!["shop".to_owned()];
    config.jwks_url = Some(url.clone());
    config.jwks_tls = micro_core::tls::ClientTlsConfig::new().ca(dir.path().join("ca.pem"));
    let (_host, addr) = guarded(&config, upstream.addr).await;
    let (status, _, body) = call(addr, "/api/x", &[("authorization", &token)]).await;
    assert_eq!(status, 200, "{body}");

    // Trusting only the system store, the test CA is unknown: no keys, no entry.
    config.jwks_tls = micro_core::tls::ClientTlsConfig::default();
    let (_host, addr) = guarded(&config, upstream.addr).await;
    let (status, _, body) = call(addr, "/api/x", &[("authorization", &token)]).await;
    assert_eq!(status, 401);
    assert_eq!(
        body["error"]["message"],
        "the signing keys cannot be fetched"
    );
    assert_eq!(upstream.hits.load(Ordering::SeqCst), 1);

    // TLS settings that can't be used, or that an `http` URL would ignore, are refused.
    config.jwks_tls = micro_core::tls::ClientTlsConfig::new().ca(dir.path().join("nope.pem"));
    let error = config.layer().unwrap_err();
    assert!(error.to_string().contains("jwks_tls.ca"), "{error}");
    config.jwks_url = Some(url.replace("https://", "http://"));
    config.jwks_tls = micro_core::tls::ClientTlsConfig::new().ca(dir.path().join("ca.pem"));
    let error = config.layer().unwrap_err();
    assert!(error.to_string().contains("jwks_tls"), "{error}");
}
