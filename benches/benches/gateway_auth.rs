//! The gateway's authentication and rate-limit decisions, without the network: one JWT
//! verification per algorithm family (HS256, RS256, ES256, EdDSA), and one rate-limit
//! decision of the local store, alone and through its tower layer.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::body::Body;
use axum::extract::ConnectInfo;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use http::{Request, Response};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use micro_gateway::plugins::jwt::{JwtConfig, KeyConfig};
use micro_gateway::plugins::rate_limit::{LocalStore, Quota, RateLimitConfig};
use tower::{Layer, ServiceExt};

fn fixture(name: &str) -> String {
    let path = format!(
        "{}/../micro-gateway/tests/it/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

const SECRET: &str = "a shared secret for the benchmark";

/// A token of `alg` and a configuration with the one key that verifies it.
fn token_and_config(alg: Algorithm) -> (String, JwtConfig) {
    let (signing, key) = match alg {
        Algorithm::HS256 => (
            EncodingKey::from_secret(SECRET.as_bytes()),
            KeyConfig::secret("HS256", SECRET),
        ),
        Algorithm::RS256 => (
            EncodingKey::from_rsa_pem(fixture("rsa_private.pem").as_bytes()).unwrap(),
            KeyConfig::public_key("RS256", fixture("rsa_public.pem")),
        ),
        Algorithm::ES256 => (
            EncodingKey::from_ec_pem(fixture("ec256_private.pem").as_bytes()).unwrap(),
            KeyConfig::public_key("ES256", fixture("ec256_public.pem")),
        ),
        Algorithm::EdDSA => (
            EncodingKey::from_ed_pem(fixture("ed25519_private.pem").as_bytes()).unwrap(),
            KeyConfig::public_key("EdDSA", fixture("ed25519_public.pem")),
        ),
        other => panic!("{other:?}"),
    };
    let claims = serde_json::json!({
        "sub": "user-42",
        "iss": "https://auth.bench",
        "aud": "shop",
        "exp": jsonwebtoken::get_current_timestamp() + 3600,
        "scope": "orders:read orders:write",
    });
    let token = jsonwebtoken::encode(&Header::new(alg), &claims, &signing).unwrap();
    let mut config = JwtConfig::with_keys([key]);
    config.issuer = vec!["https://auth.bench".to_owned()];
    config.audience = vec!["shop".to_owned()];
    (token, config)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn jwt(c: &mut Criterion) {
    let runtime = runtime();
    let mut group = c.benchmark_group("jwt_verify");
    for alg in [
        Algorithm::HS256,
        Algorithm::RS256,
        Algorithm::ES256,
        Algorithm::EdDSA,
    ] {
        let (token, config) = token_and_config(alg);
        let verifier = config.verifier().unwrap();
        assert!(runtime.block_on(verifier.verify(&token)).is_ok());
        group.bench_function(BenchmarkId::from_parameter(format!("{alg:?}")), |b| {
            b.to_async(&runtime)
                .iter(|| async { verifier.verify(&token).await.unwrap() })
        });
    }
    group.finish();

    // The whole layer: token extraction, verification, claims into the request.
    let mut group = c.benchmark_group("jwt_layer");
    let inner = tower::service_fn(|_: Request<Body>| async {
        Ok::<_, Infallible>(Response::new(Body::empty()))
    });
    let (token, mut config) = token_and_config(Algorithm::HS256);
    config
        .forward_claims
        .insert("sub".to_owned(), "x-user-id".to_owned());
    let service = config.layer().unwrap().layer(inner);
    let bearer = format!("Bearer {token}");
    group.bench_function("none", |b| {
        b.to_async(&runtime).iter(|| async {
            let request = Request::get("/orders").body(Body::empty()).unwrap();
            inner.oneshot(request).await.unwrap()
        })
    });
    group.bench_function("HS256", |b| {
        b.to_async(&runtime).iter(|| async {
            let request = Request::get("/orders")
                .header("authorization", &bearer)
                .body(Body::empty())
                .unwrap();
            let response = service.clone().oneshot(request).await.unwrap();
            assert_eq!(response.status(), 200);
            response
        })
    });
    group.finish();
}

fn rate_limit(c: &mut Criterion) {
    let mut group = c.benchmark_group("rate_limit_decision");
    let quotas = [
        Quota::per_second(1_000_000_000),
        Quota::per_minute(u64::MAX / 2),
        Quota::per_hour(u64::MAX / 2),
    ];
    let store = LocalStore::new();
    group.bench_function("local/one_key", |b| {
        b.iter(|| store.check_now("route|ip:192.0.2.1", &quotas))
    });
    let keys: Vec<String> = (0..10_000).map(|i| format!("route|ip:10.0.{i}")).collect();
    let next = AtomicU64::new(0);
    let store = LocalStore::new();
    group.bench_function("local/10k_keys", |b| {
        b.iter(|| {
            let i = next.fetch_add(1, Ordering::Relaxed) as usize % keys.len();
            store.check_now(&keys[i], &quotas)
        })
    });
    group.finish();

    let runtime = runtime();
    let mut group = c.benchmark_group("rate_limit_layer");
    let inner = tower::service_fn(|_: Request<Body>| async {
        Ok::<_, Infallible>(Response::new(Body::empty()))
    });
    let config = RateLimitConfig::per_ip(Some(1_000_000_000), Some(u64::MAX / 2), None);
    let service = config.layer().unwrap().layer(inner);
    let peer: SocketAddr = "192.0.2.1:40000".parse().unwrap();
    group.bench_function("local", |b| {
        b.to_async(&runtime).iter(|| async {
            let mut request = Request::get("/orders").body(Body::empty()).unwrap();
            request.extensions_mut().insert(ConnectInfo(peer));
            let response = service.clone().oneshot(request).await.unwrap();
            assert_eq!(response.status(), 200);
            response
        })
    });
    group.finish();
}

criterion_group!(benches, jwt, rate_limit);
criterion_main!(benches);
