//! The cost of the saga log: sagas of no-op steps run by the orchestrator on
//! the memory, embedded (redb) and PostgreSQL logs, side by side in one run.
//!
//! - `saga_throughput`: 32 sagas of 4 steps started at once and awaited (the
//!   figure is per saga); PostgreSQL with one connection and with four;
//! - `saga_steps`: one saga of 1 and of 9 steps at a time; the difference
//!   over 8 is the overhead of one step (two log writes: started, succeeded).
//!
//! PostgreSQL is the one at `MICRO_TEST_POSTGRES_URL` (by default
//! postgres://postgres@127.0.0.1:5432/test), in a fresh schema dropped at the
//! end.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use micro_saga::log::deadpool_postgres::{Manager, Pool, Runtime};
use micro_saga::log::{EmbeddedSagaLog, PostgresSagaLog};
use micro_saga::{MemorySagaLog, Orchestrator, SagaDefinition, SagaLog, SagaStatus, StepOutput};

const CONCURRENT: u64 = 32;

fn saga(steps: usize) -> SagaDefinition<u64> {
    let mut builder = SagaDefinition::<u64>::builder(format!("noop-{steps}"));
    for i in 0..steps {
        builder = builder.step(
            format!("step-{i}"),
            |_cx| async { Ok(StepOutput::empty()) },
            |_cx| async { Ok(()) },
        );
    }
    builder.build().expect("definition")
}

struct Backend {
    name: &'static str,
    orchestrator: Orchestrator,
}

/// A pool of at most `connections` connections.
fn pool(connections: usize) -> Pool {
    let url = std::env::var("MICRO_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let config: tokio_postgres::Config = url.parse().expect("a PostgreSQL url");
    Pool::builder(Manager::new(config, tokio_postgres::NoTls))
        .max_size(connections)
        .runtime(Runtime::Tokio1)
        .create_timeout(Some(Duration::from_secs(5)))
        .build()
        .expect("pool")
}

async fn postgres(schema: &str, connections: usize) -> Arc<PostgresSagaLog> {
    let log = PostgresSagaLog::with_schema(pool(connections), schema).expect("schema");
    log.install().await.expect("install");
    Arc::new(log)
}

fn sagas(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let schema = format!("saga_bench_{}", std::process::id());
    let pg = runtime.block_on(postgres(&schema, 1));
    let pg4 = runtime.block_on(postgres(&schema, 4));
    let definitions = [saga(1), saga(4), saga(9)];
    let logs: [(&'static str, Arc<dyn SagaLog>); 4] = [
        ("memory", Arc::new(MemorySagaLog::new())),
        (
            "embedded",
            Arc::new(EmbeddedSagaLog::open(dir.path().join("sagas.redb")).expect("redb")),
        ),
        ("postgres", pg.clone()),
        ("postgres_4_connections", pg4),
    ];
    let backends: Vec<Backend> = logs
        .into_iter()
        .map(|(name, log)| {
            let mut builder = Orchestrator::builder(log);
            for d in &definitions {
                builder = builder.definition(d);
            }
            Backend {
                name,
                orchestrator: builder.build().expect("orchestrator"),
            }
        })
        .collect();
    let ids = Arc::new(AtomicU64::new(0));
    let next_id = move || format!("s-{}", ids.fetch_add(1, Ordering::Relaxed));

    let mut group = c.benchmark_group("saga_throughput");
    group.throughput(Throughput::Elements(CONCURRENT));
    group.measurement_time(Duration::from_secs(8));
    group.sample_size(10);
    for backend in &backends {
        let def = &definitions[1];
        group.bench_function(BenchmarkId::new(backend.name, "4_steps"), |b| {
            b.to_async(&runtime).iter(|| async {
                let mut handles = Vec::new();
                for i in 0..CONCURRENT {
                    let handle = backend.orchestrator.start(def, next_id(), i).await;
                    handles.push(handle.expect("start"));
                }
                for handle in handles {
                    let saga = handle.finished().await.expect("saga");
                    assert_eq!(saga.status(), SagaStatus::Completed);
                }
            });
        });
    }
    group.finish();

    let mut group = c.benchmark_group("saga_steps");
    group.measurement_time(Duration::from_secs(5));
    group.sample_size(10);
    for backend in backends
        .iter()
        .filter(|b| b.name != "postgres_4_connections")
    {
        for def in [&definitions[0], &definitions[2]] {
            let steps = def.step_names().len();
            group.bench_function(BenchmarkId::new(backend.name, steps), |b| {
                b.to_async(&runtime).iter(|| async {
                    let saga = backend
                        .orchestrator
                        .run(def, next_id(), 0)
                        .await
                        .expect("saga");
                    assert_eq!(saga.status(), SagaStatus::Completed);
                });
            });
        }
    }
    group.finish();

    runtime.block_on(async {
        pg.pool()
            .get()
            .await
            .expect("a connection")
            .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
            .await
            .expect("drop schema");
    });
}

criterion_group!(benches, sagas);
criterion_main!(benches);
