//! The cost of service identity per internal call: signing a caller token (the calling
//! side) and verifying it (the called side), alone and around an axum router in process,
//! side by side with the same router without it.

use axum::body::Body;
use axum::routing::get;
use axum::Router;
use criterion::{criterion_group, criterion_main, Criterion};
use http::Request;
use micro_core::identity::{Caller, KeyRing, KeySet, Secret, VerifyCallerLayer, IDENTITY_HEADER};
use tower::ServiceExt;

fn keys() -> KeyRing {
    KeyRing::new(KeySet::new(
        "k1",
        Secret::new(*b"a benchmark key, 0123456789abcdef0123").expect("a strong secret"),
    ))
}

fn router() -> Router {
    Router::new().route("/payments", get(|| async { "ok" }))
}

fn identity(c: &mut Criterion) {
    let keys = keys();
    let caller = Caller::for_user("order-service", "usr-1");
    let mut group = c.benchmark_group("identity");
    group.bench_function("sign", |b| {
        b.iter(|| keys.sign(&caller, "payment-service").expect("signed"))
    });
    let token = keys.sign(&caller, "payment-service").expect("signed");
    group.bench_function("verify", |b| {
        b.iter(|| keys.verify(&token, "payment-service").expect("verified"))
    });
    group.finish();

    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let plain = router();
    let verified = router().layer(VerifyCallerLayer::new(keys.clone(), "payment-service"));
    let mut group = c.benchmark_group("internal_call_in_process");
    group.bench_function("without_identity", |b| {
        b.to_async(&runtime).iter(|| {
            let request = Request::get("/payments")
                .body(Body::empty())
                .expect("request");
            plain.clone().oneshot(request)
        })
    });
    group.bench_function("signed_and_verified", |b| {
        b.to_async(&runtime).iter(|| {
            let token = keys.sign(&caller, "payment-service").expect("signed");
            let request = Request::get("/payments")
                .header(IDENTITY_HEADER, token)
                .body(Body::empty())
                .expect("request");
            verified.clone().oneshot(request)
        })
    });
    group.finish();
}

criterion_group!(benches, identity);
criterion_main!(benches);
