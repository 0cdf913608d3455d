//! A worker for micro-saga's crash test (not a tool for users): runs a fixed
//! set of order sagas, sequentially, against PostgreSQL, where the steps'
//! effects (money and stock) live too.
//!
//! Every step announces its boundaries on stdout, before and after its
//! effect, as `boundary <n> <step>:<before|after>`. With
//! `MICRO_SAGA_CRASH_HALT_AT=<n>` the worker prints `halt <n> ...` at the
//! n-th boundary and stops there, for the test to kill it with SIGKILL. On
//! start it resumes the sagas a previous run left unfinished, then starts the
//! ones never started, and prints `done boundaries=<n>` when all are finished.
//!
//! Environment: `MICRO_SAGA_CRASH_PG_URL`, `MICRO_SAGA_CRASH_SCHEMA` (the
//! schema holding both the saga log and the business tables, which the test
//! creates), `MICRO_SAGA_CRASH_HALT_AT` (optional), and
//! `MICRO_SAGA_CRASH_CONCURRENT=1` to start the sagas all at once instead of
//! one after the other. With `MICRO_SAGA_CRASH_EMBEDDED_LOG=<file>` (and the
//! `embedded` feature) the saga log is an embedded one in that file; the
//! steps' effects stay in PostgreSQL.

use std::error::Error as StdError;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use micro_saga::log::PostgresSagaLog;
use micro_saga::{
    Orchestrator, SagaDefinition, SagaLog, SagaStatus, StepContext, StepError, StepOutput,
    StepPolicy,
};
use serde::{Deserialize, Serialize};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};

type BoxError = Box<dyn StdError + Send + Sync>;

/// The orders the worker places, in order. The test knows them too.
const ORDERS: &[(&str, &str, i32, i64)] = &[
    // id, sku, quantity, cents
    ("o-1", "book", 1, 1_500),
    ("o-2", "pen", 5, 500), // 3 pens in stock: the payment is refunded
    ("o-3", "book", 2, 3_000),
    ("o-4", "book", 1, 1_500), // cancelled by the customer: released and refunded
    ("o-5", "book", 1, 90_000), // more than the balance: declined
];

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Order {
    id: String,
    sku: String,
    quantity: i32,
    cents: i64,
}

#[derive(Debug)]
struct Boundaries {
    passed: AtomicU64,
    halt_at: Option<u64>,
}

impl Boundaries {
    async fn pass(&self, label: &str) {
        let n = self.passed.fetch_add(1, Ordering::SeqCst) + 1;
        let halt = self.halt_at == Some(n);
        {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "boundary {n} {label}");
            if halt {
                let _ = writeln!(out, "halt {n} {label}");
            }
            let _ = out.flush();
        }
        if halt {
            std::future::pending::<()>().await;
        }
    }
}

#[derive(Debug, Clone)]
struct World {
    client: Arc<Client>,
    schema: Arc<str>,
    boundaries: Arc<Boundaries>,
}

fn retryable(err: tokio_postgres::Error) -> StepError {
    StepError::retryable(err)
}

impl World {
    async fn charge(&self, cx: StepContext<Order>) -> Result<StepOutput<Order>, StepError> {
        self.boundaries.pass("charge:before").await;
        let s = &self.schema;
        let key = cx.idempotency_key();
        let order = cx.data();
        let charged = self
            .client
            .execute(
                &format!(
                    "WITH p AS (
                         INSERT INTO {s}.payment (key, order_id, amount) VALUES ($1, $2, $3)
                         ON CONFLICT (key) DO NOTHING RETURNING amount
                     )
                     UPDATE {s}.account SET balance = balance - p.amount FROM p
                     WHERE account.id = 'customer'"
                ),
                &[&key, &order.id, &order.cents],
            )
            .await;
        match charged {
            Ok(_) => {}
            Err(err) if err.code() == Some(&SqlState::CHECK_VIOLATION) => {
                return Err(StepError::permanent(format!(
                    "card declined for {}",
                    order.id
                )));
            }
            Err(err) => return Err(retryable(err)),
        }
        self.boundaries.pass("charge:after").await;
        StepOutput::json(key)
    }

    async fn refund(&self, cx: StepContext<Order>) -> Result<(), StepError> {
        self.boundaries.pass("refund:before").await;
        let s = &self.schema;
        let payment: String = cx.output_as()?;
        self.client
            .execute(
                &format!(
                    "WITH r AS (
                         UPDATE {s}.payment SET refunded_by = $2
                         WHERE key = $1 AND refunded_by IS NULL RETURNING amount
                     )
                     UPDATE {s}.account SET balance = balance + r.amount FROM r
                     WHERE account.id = 'customer'"
                ),
                &[&payment, &cx.idempotency_key()],
            )
            .await
            .map_err(retryable)?;
        self.boundaries.pass("refund:after").await;
        Ok(())
    }

    async fn reserve(&self, cx: StepContext<Order>) -> Result<StepOutput<Order>, StepError> {
        self.boundaries.pass("reserve:before").await;
        let s = &self.schema;
        let key = cx.idempotency_key();
        let order = cx.data();
        self.client
            .execute(
                &format!(
                    "WITH s AS (
                         UPDATE {s}.stock SET available = available - $3
                         WHERE sku = $2 AND available >= $3
                           AND NOT EXISTS (SELECT 1 FROM {s}.reservation WHERE key = $1)
                         RETURNING sku
                     )
                     INSERT INTO {s}.reservation (key, order_id, sku, quantity)
                     SELECT $1, $4, s.sku, $3 FROM s"
                ),
                &[&key, &order.sku, &order.quantity, &order.id],
            )
            .await
            .map_err(retryable)?;
        let reserved = self
            .client
            .query_opt(
                &format!("SELECT 1 FROM {s}.reservation WHERE key = $1"),
                &[&key],
            )
            .await
            .map_err(retryable)?;
        if reserved.is_none() {
            return Err(StepError::permanent(format!(
                "{} × {} is out of stock",
                order.quantity, order.sku
            )));
        }
        self.boundaries.pass("reserve:after").await;
        StepOutput::json(key)
    }

    async fn release(&self, cx: StepContext<Order>) -> Result<(), StepError> {
        self.boundaries.pass("release:before").await;
        let s = &self.schema;
        let reservation: String = cx.output_as()?;
        self.client
            .execute(
                &format!(
                    "WITH r AS (
                         UPDATE {s}.reservation SET released_by = $2
                         WHERE key = $1 AND released_by IS NULL RETURNING sku, quantity
                     )
                     UPDATE {s}.stock SET available = available + r.quantity FROM r
                     WHERE stock.sku = r.sku"
                ),
                &[&reservation, &cx.idempotency_key()],
            )
            .await
            .map_err(retryable)?;
        self.boundaries.pass("release:after").await;
        Ok(())
    }

    async fn confirm(&self, cx: StepContext<Order>) -> Result<StepOutput<Order>, StepError> {
        self.boundaries.pass("confirm:before").await;
        let s = &self.schema;
        let confirmed = self
            .client
            .execute(
                &format!(
                    "UPDATE {s}.orders SET status = 'confirmed', confirmed_by = $2
                     WHERE id = $1 AND status IN ('pending', 'confirmed')"
                ),
                &[&cx.data().id, &cx.idempotency_key()],
            )
            .await
            .map_err(retryable)?;
        if confirmed == 0 {
            return Err(StepError::permanent(format!(
                "order {} was cancelled",
                cx.data().id
            )));
        }
        self.boundaries.pass("confirm:after").await;
        Ok(StepOutput::empty())
    }

    async fn notify(&self, cx: StepContext<Order>) -> Result<StepOutput<Order>, StepError> {
        self.boundaries.pass("notify:before").await;
        let s = &self.schema;
        self.client
            .execute(
                &format!(
                    "INSERT INTO {s}.notification (key, order_id) VALUES ($1, $2)
                     ON CONFLICT (key) DO NOTHING"
                ),
                &[&cx.idempotency_key(), &cx.data().id],
            )
            .await
            .map_err(retryable)?;
        self.boundaries.pass("notify:after").await;
        Ok(StepOutput::empty())
    }
}

fn place_order(world: &World) -> Result<SagaDefinition<Order>, micro_saga::Error> {
    let policy = StepPolicy::new()
        .timeout(Duration::from_secs(10))
        .max_attempts(5)
        .compensation_max_attempts(5)
        .initial_backoff(Duration::from_millis(10));
    let (w1, w2, w3, w4, w5, w6) = (
        world.clone(),
        world.clone(),
        world.clone(),
        world.clone(),
        world.clone(),
        world.clone(),
    );
    SagaDefinition::builder("place-order")
        .policy(policy)
        .step(
            "charge-payment",
            move |cx| {
                let w = w1.clone();
                async move { w.charge(cx).await }
            },
            move |cx| {
                let w = w2.clone();
                async move { w.refund(cx).await }
            },
        )
        .step(
            "reserve-inventory",
            move |cx| {
                let w = w3.clone();
                async move { w.reserve(cx).await }
            },
            move |cx| {
                let w = w4.clone();
                async move { w.release(cx).await }
            },
        )
        .pivot("confirm-order", move |cx| {
            let w = w5.clone();
            async move { w.confirm(cx).await }
        })
        .final_step("notify", move |cx| {
            let w = w6.clone();
            async move { w.notify(cx).await }
        })
        .build()
}

async fn run() -> Result<(), BoxError> {
    let url = std::env::var("MICRO_SAGA_CRASH_PG_URL")?;
    let schema = std::env::var("MICRO_SAGA_CRASH_SCHEMA")?;
    let concurrent = std::env::var("MICRO_SAGA_CRASH_CONCURRENT").is_ok_and(|v| v == "1");
    let halt_at = match std::env::var("MICRO_SAGA_CRASH_HALT_AT") {
        Ok(n) => Some(n.parse()?),
        Err(_) => None,
    };
    let (client, connection) = tokio_postgres::connect(&url, NoTls).await?;
    tokio::spawn(connection);
    let client = Arc::new(client);
    let log: Arc<dyn SagaLog> = match std::env::var_os("MICRO_SAGA_CRASH_EMBEDDED_LOG") {
        #[cfg(feature = "embedded")]
        Some(path) => Arc::new(micro_saga::log::EmbeddedSagaLog::open(path)?),
        #[cfg(not(feature = "embedded"))]
        Some(_) => return Err("built without the `embedded` feature".into()),
        None => {
            let config: tokio_postgres::Config = url.parse()?;
            let pool = micro_saga::log::deadpool_postgres::Pool::builder(
                micro_saga::log::deadpool_postgres::Manager::new(config, NoTls),
            )
            .build()?;
            let log = PostgresSagaLog::with_schema(pool, &schema)?;
            log.install().await?;
            Arc::new(log)
        }
    };

    let world = World {
        client,
        schema: schema.into(),
        boundaries: Arc::new(Boundaries {
            passed: AtomicU64::new(0),
            halt_at,
        }),
    };
    let saga = place_order(&world)?;
    let orchestrator = Orchestrator::builder(log.clone())
        .definition(&saga)
        .build()?;

    let recovery = orchestrator.recover().await?;
    if let Some((id, err)) = recovery.skipped.first() {
        return Err(format!("could not resume {id}: {err}").into());
    }
    let resumed: Vec<String> = recovery
        .resumed
        .iter()
        .map(|h| h.saga_id().to_owned())
        .collect();
    for finished in recovery.finished().await {
        finished?;
    }
    // The killed run's last `create` can commit after `recover` listed the
    // log: the server finishes a statement it received before its client
    // died. Such a saga is found below, and recovered once more at the end.
    let mut created_late = false;
    let mut running = Vec::new();
    for &(id, sku, quantity, cents) in ORDERS {
        if let Some(record) = log.load(id).await? {
            created_late |=
                !record.status.is_terminal() && !resumed.iter().any(|r| r.as_str() == id);
            continue;
        }
        let order = Order {
            id: id.to_owned(),
            sku: sku.to_owned(),
            quantity,
            cents,
        };
        let handle = orchestrator.start(&saga, id, order).await?;
        if concurrent {
            running.push(handle);
        } else {
            handle.finished().await?;
        }
    }
    for handle in running {
        handle.finished().await?;
    }
    if created_late {
        for finished in orchestrator.recover().await?.finished().await {
            finished?;
        }
    }
    let unfinished = log.unfinished().await?;
    if !unfinished.is_empty() {
        return Err(format!("sagas left unfinished: {unfinished:?}").into());
    }
    let failed = log.by_status(SagaStatus::Failed).await?;
    if !failed.is_empty() {
        return Err(format!("sagas that need attention: {failed:?}").into());
    }
    println!(
        "done boundaries={}",
        world.boundaries.passed.load(Ordering::SeqCst)
    );
    Ok(())
}

fn main() -> Result<(), BoxError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(run())
}
