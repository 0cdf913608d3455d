//! The cost of hosting: the same axum router served bare by `axum::serve` and by a
//! `ServiceHost` (request id, request span with trace context, HTTP metrics), one
//! keep-alive connection over loopback, side by side in one run.

use axum::routing::get;
use axum::Router;
use criterion::{criterion_group, criterion_main, Criterion};
use micro_benches::Connection;
use micro_core::host::ServiceHost;
use micro_core::service::Service;

fn router() -> Router {
    Router::new().route("/items/{id}", get(|| async { "item" }))
}

struct Items;

impl Service for Items {
    fn name(&self) -> &str {
        "bench-items"
    }

    fn router(&self) -> Router {
        router()
    }
}

fn hosting(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");

    let (bare, hosted) = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let bare_addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, router()).await });
        let running = ServiceHost::builder()
            .service(Items, "127.0.0.1:0".parse().expect("addr"))
            .build()
            .expect("host")
            .start()
            .await
            .expect("start");
        let hosted_addr = running.local_addr("bench-items").expect("addr");
        tokio::spawn(running.run_until(std::future::pending()));
        (
            Connection::open(bare_addr).await,
            Connection::open(hosted_addr).await,
        )
    });

    let mut group = c.benchmark_group("get_over_loopback");
    let bare = tokio::sync::Mutex::new(bare);
    let hosted = tokio::sync::Mutex::new(hosted);
    group.bench_function("axum_serve", |b| {
        b.to_async(&runtime)
            .iter(|| async { bare.lock().await.get("/items/1").await })
    });
    group.bench_function("service_host", |b| {
        b.to_async(&runtime)
            .iter(|| async { hosted.lock().await.get("/items/1").await })
    });
    group.finish();
}

criterion_group!(benches, hosting);
criterion_main!(benches);
