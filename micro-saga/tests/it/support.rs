//! Fixtures shared by the tests: an order saga whose steps write what they do
//! to a journal.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use micro_saga::{SagaDefinition, StepError, StepOutput, StepPolicy};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Order {
    pub(crate) id: String,
    pub(crate) cents: u64,
    pub(crate) sku: String,
    pub(crate) payment_id: Option<String>,
}

pub(crate) fn order(id: &str, sku: &str) -> Order {
    Order {
        id: id.to_owned(),
        cents: 4200,
        sku: sku.to_owned(),
        payment_id: None,
    }
}

/// What the steps did, as `"<step>:<phase>:<key>"` lines.
#[derive(Debug, Clone, Default)]
pub(crate) struct Journal(Arc<Mutex<Vec<String>>>);

impl Journal {
    pub(crate) fn push(&self, line: String) {
        self.0.lock().unwrap().push(line);
    }

    pub(crate) fn lines(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

pub(crate) fn fast_policy() -> StepPolicy {
    StepPolicy::new()
        .timeout(Duration::from_secs(1))
        .max_attempts(3)
        .compensation_max_attempts(4)
        .initial_backoff(Duration::from_millis(10))
        .randomization_factor(0.0)
}

/// charge (refund) → reserve (release; fails for the SKU `out-of-stock`) →
/// confirm (pivot) → notify (final).
pub(crate) fn order_saga(journal: &Journal) -> SagaDefinition<Order> {
    let j = journal.clone();
    let charge = move |cx: micro_saga::StepContext<Order>| {
        let j = j.clone();
        async move {
            j.push(format!("charge:{}", cx.idempotency_key()));
            let payment = format!("pay-{}", cx.data().id);
            let mut order = cx.data().clone();
            order.payment_id = Some(payment.clone());
            Ok(StepOutput::json(&payment)?.with_context(order))
        }
    };
    let j = journal.clone();
    let refund = move |cx: micro_saga::StepContext<Order>| {
        let j = j.clone();
        async move {
            let payment: String = cx.output_as()?;
            j.push(format!("refund:{payment}:{}", cx.idempotency_key()));
            Ok(())
        }
    };
    let j = journal.clone();
    let reserve = move |cx: micro_saga::StepContext<Order>| {
        let j = j.clone();
        async move {
            if cx.data().sku == "out-of-stock" {
                return Err(StepError::permanent(format!(
                    "{} is out of stock",
                    cx.data().sku
                )));
            }
            j.push(format!("reserve:{}", cx.idempotency_key()));
            Ok(StepOutput::empty())
        }
    };
    let j = journal.clone();
    let release = move |cx: micro_saga::StepContext<Order>| {
        let j = j.clone();
        async move {
            j.push(format!("release:{}", cx.idempotency_key()));
            Ok(())
        }
    };
    let j = journal.clone();
    let confirm = move |cx: micro_saga::StepContext<Order>| {
        let j = j.clone();
        async move {
            j.push(format!(
                "confirm:{}:{}",
                cx.data().payment_id.as_deref().unwrap_or("unpaid"),
                cx.idempotency_key()
            ));
            Ok(StepOutput::empty())
        }
    };
    let j = journal.clone();
    let notify = move |cx: micro_saga::StepContext<Order>| {
        let j = j.clone();
        async move {
            j.push(format!("notify:{}", cx.idempotency_key()));
            Ok(StepOutput::empty())
        }
    };
    SagaDefinition::builder("place-order")
        .policy(fast_policy())
        .step("charge-payment", charge, refund)
        .step("reserve-inventory", reserve, release)
        .pivot("confirm-order", confirm)
        .final_step("notify", notify)
        .build()
        .unwrap()
}

/// Polls `check` every millisecond of (possibly paused) tokio time until it
/// holds, for at most `limit`.
pub(crate) async fn eventually(limit: Duration, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[cfg(feature = "postgres")]
pub(crate) mod pg {
    use std::sync::Arc;

    use std::time::Duration;

    use micro_saga::log::deadpool_postgres::{Manager, Pool, Runtime};
    use tokio_postgres::{Client, NoTls};

    /// The PostgreSQL the tests use: `MICRO_TEST_POSTGRES_URL`, or the local
    /// default.
    pub(crate) fn url() -> String {
        std::env::var("MICRO_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
    }

    /// A pool on the tests' PostgreSQL, whose connections are named
    /// `application_name` in `pg_stat_activity`.
    pub(crate) fn pool_named(application_name: &str) -> Pool {
        let mut config: tokio_postgres::Config = url().parse().expect("a PostgreSQL url");
        config.application_name(application_name);
        pool_on(config)
    }

    /// A pool on the tests' PostgreSQL.
    pub(crate) fn pool() -> Pool {
        pool_named("micro-saga-test")
    }

    /// A pool of at most 4 connections with `config`, waiting at most 2 s for
    /// one.
    pub(crate) fn pool_on(config: tokio_postgres::Config) -> Pool {
        Pool::builder(Manager::new(config, NoTls))
            .max_size(4)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(2)))
            .create_timeout(Some(Duration::from_secs(2)))
            .build()
            .expect("a pool")
    }

    /// A login role of its own, for a test that cuts a component off the
    /// database: [`cut`](Self::cut) forbids the role to log in and
    /// terminates its backends, so that its pool can neither keep nor make a
    /// connection, and [`restore`](Self::restore) lets it in again.
    pub(crate) struct Role {
        pub(crate) name: String,
        admin: Arc<Client>,
    }

    impl Role {
        pub(crate) async fn new() -> Self {
            let name = fresh_schema("saga_role");
            let admin = connect().await;
            admin
                .batch_execute(&format!("CREATE ROLE {name} LOGIN SUPERUSER"))
                .await
                .unwrap();
            Role { name, admin }
        }

        /// A pool connecting as this role.
        pub(crate) fn pool(&self) -> Pool {
            let mut config: tokio_postgres::Config = url().parse().expect("a PostgreSQL url");
            config.user(&self.name).application_name(&self.name);
            pool_on(config)
        }

        /// Terminates the role's backends; how many.
        pub(crate) async fn terminate(&self) -> usize {
            self.admin
                .query(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE usename = $1 AND pid <> pg_backend_pid()",
                    &[&self.name],
                )
                .await
                .unwrap()
                .len()
        }

        /// Forbids new connections as the role and terminates its backends.
        pub(crate) async fn cut(&self) {
            self.admin
                .batch_execute(&format!("ALTER ROLE {} NOLOGIN", self.name))
                .await
                .unwrap();
            self.terminate().await;
        }

        /// Lets the role log in again.
        pub(crate) async fn restore(&self) {
            self.admin
                .batch_execute(&format!("ALTER ROLE {} LOGIN", self.name))
                .await
                .unwrap();
        }

        /// Drops the role (and whatever it owns).
        pub(crate) async fn drop_role(self) {
            self.cut().await;
            self.admin
                .batch_execute(&format!(
                    "DROP OWNED BY {n} CASCADE; DROP ROLE {n}",
                    n = self.name
                ))
                .await
                .unwrap();
        }
    }

    pub(crate) async fn connect() -> Arc<Client> {
        let url = url();
        let (client, connection) = tokio_postgres::connect(&url, NoTls)
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL at {url} is unreachable: {e}"));
        tokio::spawn(connection);
        Arc::new(client)
    }

    /// A fresh schema name, so that tests run in parallel.
    pub(crate) fn fresh_schema(prefix: &str) -> String {
        format!("{prefix}_{:016x}", rand::random::<u64>())
    }

    /// A client, a pool and a schema name of its own for one test.
    pub(crate) struct TestSchema {
        pub(crate) client: Arc<Client>,
        pub(crate) pool: Pool,
        pub(crate) schema: String,
    }

    impl TestSchema {
        pub(crate) async fn new() -> Self {
            TestSchema {
                client: connect().await,
                pool: pool(),
                schema: fresh_schema("saga_test"),
            }
        }

        pub(crate) async fn drop_schema(self) {
            self.client
                .batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema))
                .await
                .unwrap();
        }
    }
}
