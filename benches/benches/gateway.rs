//! The gateway's own cost, in process, without a socket:
//!
//! - `route_match_50`: looking a request up in a table of 50 realistic routes, for a hit
//!   of each kind of route and a miss; `route_match_scaling`: a template hit and a miss
//!   in tables of 10, 100 and 1000 routes.
//! - `gateway_routes`: one request through a gateway of 10 and of 1000 routes, routing
//!   only.
//! - `gateway_stack`: one request through the stack with `oneshot`, answered by a stub
//!   upstream service, side by side: the stub called directly (no layer), through the
//!   gateway's routing alone, with each plugin alone, and with the full plugin chain.
//!
//! As in the `micro-gateway` binary, a Prometheus recorder takes the gateway's metrics,
//! and the access log is formatted by a `fmt` subscriber (writing to a sink here).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion};
use micro_benches::gateway::{
    call, gateway, lookups, realistic_routes, request, route_table, stub_upstream, Plugins,
    RouteService,
};
use tower::util::BoxCloneSyncService;

fn route_matching(c: &mut Criterion) {
    let table = route_table(&realistic_routes(50));
    let mut group = c.benchmark_group("route_match_50");
    for lookup in lookups() {
        let expect_hit = lookup.expected.is_some();
        group.bench_function(lookup.label, |b| {
            b.iter(|| {
                let found = table.find(
                    black_box(&lookup.method),
                    black_box(Some(lookup.host)),
                    black_box(lookup.path),
                    black_box(&lookup.headers),
                );
                assert_eq!(found.is_some(), expect_hit);
                found
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("route_match_scaling");
    let wanted = ["template", "miss"];
    for count in [10, 100, 1000] {
        let table = route_table(&realistic_routes(count));
        for lookup in lookups().into_iter().filter(|l| wanted.contains(&l.label)) {
            group.bench_with_input(BenchmarkId::new(lookup.label, count), &lookup, |b, l| {
                b.iter(|| {
                    table.find(
                        black_box(&l.method),
                        black_box(Some(l.host)),
                        black_box(l.path),
                        black_box(&l.headers),
                    )
                })
            });
        }
    }
    group.finish();
}

fn gateway_stack(c: &mut Criterion) {
    micro_core::metrics::install_prometheus().expect("metrics recorder");
    // One thread: the thread-local log subscriber sees every poll, and only the stack's
    // CPU work is measured.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");

    let mut setups: Vec<(&str, RouteService)> = vec![("upstream_direct", stub_upstream())];
    for plugins in [Plugins::None]
        .into_iter()
        .chain(Plugins::EACH)
        .chain([Plugins::FullChain])
    {
        setups.push((
            plugins.name(),
            BoxCloneSyncService::new(gateway(50, plugins)),
        ));
    }

    // The whole routing step (normalization, index, precedence checks, path rewrite,
    // metrics) in front of tables of 10 and 1000 routes: the index keeps them close.
    let mut group = c.benchmark_group("gateway_routes");
    for count in [10, 1000] {
        let service = BoxCloneSyncService::new(gateway(count, Plugins::None));
        group.bench_with_input(
            BenchmarkId::from_parameter(count),
            &service,
            |b, service| {
                b.to_async(&runtime).iter_batched(
                    request,
                    |request| call(service.clone(), request),
                    BatchSize::SmallInput,
                )
            },
        );
    }
    group.finish();

    let mut group = c.benchmark_group("gateway_stack");
    for (name, service) in setups {
        let logged = name == Plugins::AccessLog.name() || name == Plugins::FullChain.name();
        let mut bench = || {
            group.bench_function(name, |b| {
                b.to_async(&runtime).iter_batched(
                    request,
                    |request| call(service.clone(), request),
                    BatchSize::SmallInput,
                )
            });
        };
        if logged {
            let subscriber = tracing_subscriber::fmt()
                .with_writer(std::io::sink)
                .finish();
            tracing::subscriber::with_default(subscriber, bench);
        } else {
            bench();
        }
    }
    group.finish();
}

criterion_group!(benches, route_matching, gateway_stack);
criterion_main!(benches);
