//! PostgreSQL: the transactional inbox and outbox (feature `postgres`).
//!
//! What commits with the caller's state change works on the caller's
//! [`tokio_postgres`] transaction: [`PgInbox::claim`] and [`PgOutbox::write`].
//! What runs on its own, the [`PgRelay`] and the [`PgInboxStore`], takes its
//! connections from a [`Pool`] of [`deadpool_postgres`], one per operation, so
//! that a connection PostgreSQL closed (a restart, a failover,
//! `pg_terminate_backend`) is replaced by a new one at the next operation: an
//! operation that was on the lost connection fails with a retryable
//! [`Error::Postgres`], one that finds no connection with a retryable
//! [`Error::PostgresPool`], and the relay carries on by itself. Statements are
//! prepared through the pool's per-connection cache, so a new connection
//! prepares them again. [`health_check`] turns a service's readiness off while
//! the pool cannot reach the database.
//!
//! Build the pool as you like (TLS, sizes, timeouts): set a `wait` and a
//! `create` timeout on it, or an operation waits for as long as the database is
//! unreachable. Table names are given by the caller (optionally
//! schema-qualified) and created by `create_table`.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//!
//! use micro_events::postgres::deadpool_postgres::{Manager, Pool, Runtime};
//! use micro_events::postgres::PgOutbox;
//!
//! let mut config: tokio_postgres::Config = "postgres://postgres@127.0.0.1/shop".parse()?;
//! config.application_name("order-service");
//! let manager = Manager::new(config, tokio_postgres::NoTls);
//! let pool = Pool::builder(manager)
//!     .max_size(8)
//!     .runtime(Runtime::Tokio1)
//!     .wait_timeout(Some(Duration::from_secs(2)))
//!     .create_timeout(Some(Duration::from_secs(2)))
//!     .build()?;
//! let outbox = PgOutbox::new("orders.outbox")?;
//! let client = pool.get().await?;
//! outbox.create_table(&client).await?;
//! # Ok(())
//! # }
//! ```

use std::future::Future;
use std::time::Duration;

use micro_core::health::HealthCheck;
use micro_core::service::BoxFuture;
use serde::Serialize;
use tokio_postgres::{Client, Transaction};

pub use deadpool_postgres;
pub use deadpool_postgres::Pool;

use crate::error::{Error, Result};
use crate::event::Event;
use crate::inbox::InboxStore;
use crate::outbox::publish_in_order;
use crate::publish::{to_record, with_current_trace, Publisher};
use crate::record::Record;

/// A readiness check that passes while `pool` can reach PostgreSQL: it takes
/// a connection (a new one if the pooled ones were lost) and runs `SELECT 1`
/// on it. Named `postgres`; critical. Return it from the service's
/// [`health_checks`](micro_core::service::Service::health_checks), so that
/// `/health/ready` answers `503` while the database is unreachable and turns
/// back on by itself once it is reachable again.
pub fn health_check(pool: &Pool) -> HealthCheck {
    let pool = pool.clone();
    HealthCheck::new("postgres", move || {
        let pool = pool.clone();
        async move {
            let client = pool.get().await?;
            client.simple_query("SELECT 1").await?;
            Ok(())
        }
    })
}

/// A table name: one or two (schema-qualified) lowercase SQL identifiers.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Table {
    qualified: String,
    name: String,
}

impl Table {
    fn parse(table: &str) -> Result<Self> {
        let parts: Vec<&str> = table.split('.').collect();
        let valid = |p: &str| {
            let mut chars = p.chars();
            matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
                && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                && p.len() <= 48
        };
        if parts.is_empty() || parts.len() > 2 || !parts.iter().all(|p| valid(p)) {
            return Err(Error::InvalidTableName {
                table: table.to_owned(),
            });
        }
        Ok(Self {
            qualified: table.to_owned(),
            name: parts[parts.len() - 1].to_owned(),
        })
    }
}

/// The inbox in a PostgreSQL table: one row per (consumer, event id).
///
/// Use [`claim`](Self::claim) inside the transaction that applies the
/// handler's effects: the claim and the effects commit together, so a
/// redelivered event finds its claim and does nothing, and a rolled-back
/// attempt leaves no claim behind. A concurrent delivery of the same event
/// waits on the first one's row lock and then sees the claim.
///
/// ```no_run
/// # async fn handle(client: &mut tokio_postgres::Client, event_id: &str) -> Result<(), Box<dyn std::error::Error>> {
/// use micro_events::postgres::PgInbox;
///
/// let inbox = PgInbox::new("billing.inbox")?;
/// let tx = client.transaction().await?;
/// if inbox.claim(&tx, "billing", event_id).await? {
///     tx.execute("UPDATE billing.accounts SET balance = balance - 10 WHERE id = 1", &[]).await?;
/// }
/// tx.commit().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct PgInbox {
    table: Table,
}

impl PgInbox {
    /// The inbox in `table` (such as `inbox` or `billing.inbox`).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidTableName`] when `table` is not a plain lowercase name.
    pub fn new(table: &str) -> Result<Self> {
        Ok(Self {
            table: Table::parse(table)?,
        })
    }

    /// Creates the table if it does not exist.
    ///
    /// # Errors
    ///
    /// [`Error::Postgres`].
    pub async fn create_table(&self, client: &Client) -> Result<()> {
        client
            .batch_execute(&format!(
                "CREATE TABLE IF NOT EXISTS {} (
                    consumer text NOT NULL,
                    event_id text NOT NULL,
                    processed_at timestamptz NOT NULL DEFAULT now(),
                    PRIMARY KEY (consumer, event_id)
                )",
                self.table.qualified
            ))
            .await?;
        Ok(())
    }

    /// Claims `event_id` for `consumer` in `tx`: `true` the first time, when
    /// the caller applies its effects in `tx` and commits; `false` when the
    /// event was processed before.
    ///
    /// # Errors
    ///
    /// [`Error::Postgres`].
    pub async fn claim(
        &self,
        tx: &Transaction<'_>,
        consumer: &str,
        event_id: &str,
    ) -> Result<bool> {
        let inserted = tx
            .execute(
                &format!(
                    "INSERT INTO {} (consumer, event_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                    self.table.qualified
                ),
                &[&consumer, &event_id],
            )
            .await?;
        Ok(inserted == 1)
    }

    /// Whether `consumer` processed `event_id` (committed claims only).
    ///
    /// # Errors
    ///
    /// [`Error::Postgres`].
    pub async fn is_processed(
        &self,
        client: &Client,
        consumer: &str,
        event_id: &str,
    ) -> Result<bool> {
        let row = client
            .query_opt(
                &format!(
                    "SELECT 1 FROM {} WHERE consumer = $1 AND event_id = $2",
                    self.table.qualified
                ),
                &[&consumer, &event_id],
            )
            .await?;
        Ok(row.is_some())
    }

    async fn mark(&self, client: &Client, consumer: &str, event_id: &str) -> Result<bool> {
        let inserted = client
            .execute(
                &format!(
                    "INSERT INTO {} (consumer, event_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                    self.table.qualified
                ),
                &[&consumer, &event_id],
            )
            .await?;
        Ok(inserted == 1)
    }
}

/// A [`PgInbox`] on connections of a [`Pool`], as an [`InboxStore`] for
/// [`Inbox::deduplicate`](crate::inbox::Inbox::deduplicate), when the
/// handler's effects are not in this database.
///
/// Each check and each mark takes a connection from the pool. A lost
/// connection fails that delivery with a retryable error (the consumer
/// retries it, and a mark that committed before the loss is found by the
/// next check); the next delivery gets a new connection.
#[derive(Debug, Clone)]
pub struct PgInboxStore {
    pool: Pool,
    inbox: PgInbox,
}

impl PgInboxStore {
    /// The store over `inbox`, on connections from `pool`.
    pub fn new(pool: Pool, inbox: PgInbox) -> Self {
        Self { pool, inbox }
    }

    /// The pool the store takes its connections from.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }
}

impl InboxStore for PgInboxStore {
    fn is_processed<'a>(
        &'a self,
        consumer: &'a str,
        event_id: &'a str,
    ) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            let client = self.pool.get().await?;
            self.inbox.is_processed(&client, consumer, event_id).await
        })
    }

    fn mark_processed<'a>(
        &'a self,
        consumer: &'a str,
        event_id: &'a str,
    ) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            let client = self.pool.get().await?;
            self.inbox.mark(&client, consumer, event_id).await
        })
    }
}

/// The transactional outbox in a PostgreSQL table.
///
/// [`write`](Self::write) inserts an event in the caller's transaction; a
/// [`PgRelay`] publishes committed rows in id order and marks them sent.
///
/// # Order per key is commit order
///
/// Row ids come from a sequence, and a sequence hands out numbers when rows
/// are inserted, not when their transactions commit: a transaction could take
/// id 7, stay open, and commit after another one that took id 8 for the same
/// key. A relay round in between would then publish 8 before 7 ever became
/// visible, and the key's events would reach consumers in neither id order nor
/// commit order. So a write of a keyed record first takes a transaction-scoped
/// advisory lock on (table, topic, key) (`pg_advisory_xact_lock`, released by
/// the commit or rollback), and only then draws its id. A second transaction
/// writing the same key waits at its `write` until the first one ends, so a
/// key's ids are drawn in the order their transactions commit, and a row
/// becomes visible only after every lower-id row of its key has committed (or
/// rolled back). The relay publishes in id order, which for one key is
/// therefore commit order, and never passes over a row that commits later.
///
/// What this costs and asks of the caller:
/// - Transactions writing events for the *same* key serialise from their
///   first write of that key to their end (writes for other keys do not wait,
///   up to a rare 32-bit hash collision, which only makes two keys wait for
///   each other). State changes on one aggregate usually serialise on its row
///   lock anyway; write the events after the state change, near the end of
///   the transaction, to keep the wait short.
/// - A transaction that writes several keys takes their locks in the order
///   it writes them; two transactions writing the same two keys in opposite
///   orders can deadlock, and PostgreSQL then aborts one of them (SQLSTATE
///   `40P01`, safe to retry). Write keys in a consistent order (sorted) when
///   one transaction writes several.
/// - Records without a key take no lock and have no order promise, as on
///   Kafka.
/// - The locks live in PostgreSQL's two-key advisory lock space: the first key
///   is derived from the table name, the second from the topic and key. An
///   application that uses two-key advisory locks of its own shares that space.
/// - The table's schema is unchanged: tables created by earlier versions work
///   as they are. During a rolling upgrade, writers of an earlier version take
///   no lock, so the promise holds once every writer runs this version.
///
/// ```no_run
/// # async fn place(client: &mut tokio_postgres::Client) -> Result<(), Box<dyn std::error::Error>> {
/// use micro_events::{postgres::PgOutbox, Event};
///
/// let outbox = PgOutbox::new("orders.outbox")?;
/// let tx = client.transaction().await?;
/// tx.execute("INSERT INTO orders.orders (id, status) VALUES ('o-1', 'PENDING')", &[]).await?;
/// let created = Event::new("/order-service", "shop.order.created", "o-1")?;
/// outbox.write(&tx, "order-events", "o-1", &created).await?;
/// tx.commit().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct PgOutbox {
    table: Table,
}

impl PgOutbox {
    /// The outbox in `table` (such as `outbox` or `orders.outbox`).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidTableName`] when `table` is not a plain lowercase name.
    pub fn new(table: &str) -> Result<Self> {
        Ok(Self {
            table: Table::parse(table)?,
        })
    }

    /// Creates the table and its index of unsent rows if they do not exist.
    ///
    /// # Errors
    ///
    /// [`Error::Postgres`].
    pub async fn create_table(&self, client: &Client) -> Result<()> {
        client
            .batch_execute(&format!(
                "CREATE TABLE IF NOT EXISTS {t} (
                    id bigserial PRIMARY KEY,
                    topic text NOT NULL,
                    key bytea,
                    header_names text[] NOT NULL,
                    header_values bytea[] NOT NULL,
                    payload bytea NOT NULL,
                    created_at timestamptz NOT NULL DEFAULT now(),
                    sent_at timestamptz
                );
                CREATE INDEX IF NOT EXISTS {n}_unsent ON {t} (topic, key, id) WHERE sent_at IS NULL;",
                t = self.table.qualified,
                n = self.table.name,
            ))
            .await?;
        Ok(())
    }

    /// Writes `event` for `topic` under `key` in `tx`; it is published once
    /// `tx` commits. Returns the row id. An event without a `traceparent`
    /// carries a child of the current trace context.
    ///
    /// # Errors
    ///
    /// [`Error::Encode`] or [`Error::Postgres`].
    pub async fn write<T: Serialize>(
        &self,
        tx: &Transaction<'_>,
        topic: &str,
        key: &str,
        event: &Event<T>,
    ) -> Result<i64> {
        let record = with_current_trace(to_record(key, event)?);
        self.write_record(tx, topic, record).await
    }

    /// Writes a raw record for `topic` in `tx`; returns the row id. A keyed
    /// record first waits for any other open transaction that wrote the same
    /// topic and key (see [order per key](Self#order-per-key-is-commit-order)).
    ///
    /// # Errors
    ///
    /// [`Error::Postgres`].
    pub async fn write_record(
        &self,
        tx: &Transaction<'_>,
        topic: &str,
        record: Record,
    ) -> Result<i64> {
        if let Some(key) = record.key.as_deref() {
            let (space, lock) = self.order_lock(topic, key);
            tx.execute("SELECT pg_advisory_xact_lock($1, $2)", &[&space, &lock])
                .await?;
        }
        let (names, values): (Vec<String>, Vec<Vec<u8>>) = record.headers.into_iter().unzip();
        let row = tx
            .query_one(
                &format!(
                    "INSERT INTO {} (topic, key, header_names, header_values, payload)
                     VALUES ($1, $2, $3, $4, $5) RETURNING id",
                    self.table.qualified
                ),
                &[&topic, &record.key, &names, &values, &record.payload],
            )
            .await?;
        Ok(row.get(0))
    }

    /// The advisory lock that orders the writers of `key` on `topic`: a
    /// 32-bit FNV-1a hash of the table name, and one of the topic and key.
    /// Computed here rather than by a PostgreSQL hash function so that it is
    /// fixed by this crate and the same for every writer of every version.
    fn order_lock(&self, topic: &str, key: &[u8]) -> (i32, i32) {
        let space = fnv1a32(&[b"micro-events outbox ", self.table.qualified.as_bytes()]);
        let lock = fnv1a32(&[topic.as_bytes(), &[0], key]);
        (space, lock)
    }

    /// How many rows wait to be published.
    ///
    /// # Errors
    ///
    /// [`Error::Postgres`].
    pub async fn unsent(&self, client: &Client) -> Result<i64> {
        let row = client
            .query_one(
                &format!(
                    "SELECT count(*) FROM {} WHERE sent_at IS NULL",
                    self.table.qualified
                ),
                &[],
            )
            .await?;
        Ok(row.get(0))
    }

    /// Deletes rows sent more than `age` ago; returns how many.
    ///
    /// # Errors
    ///
    /// [`Error::Postgres`].
    pub async fn purge_sent(&self, client: &Client, age: Duration) -> Result<u64> {
        let deleted = client
            .execute(
                &format!(
                    "DELETE FROM {} WHERE sent_at < now() - make_interval(secs => $1)",
                    self.table.qualified
                ),
                &[&age.as_secs_f64()],
            )
            .await?;
        Ok(deleted)
    }

    /// A relay publishing this outbox's rows with `publisher`, on
    /// connections from `pool` (one per round).
    pub fn relay<P: Publisher>(&self, pool: Pool, publisher: P) -> PgRelay<P> {
        let t = &self.table.qualified;
        PgRelay {
            pool,
            claim: format!(
                "WITH claimed AS MATERIALIZED (
                    SELECT id FROM {t} WHERE sent_at IS NULL
                    ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED
                )
                SELECT o.id, o.topic, o.key, o.header_names, o.header_values, o.payload
                FROM {t} o JOIN claimed c ON c.id = o.id
                WHERE NOT EXISTS (
                    SELECT 1 FROM {t} p
                    WHERE p.sent_at IS NULL AND p.topic = o.topic
                      AND p.key IS NOT DISTINCT FROM o.key AND p.id < o.id
                      AND p.id NOT IN (SELECT id FROM claimed)
                )
                ORDER BY o.id"
            ),
            mark: format!("UPDATE {t} SET sent_at = now() WHERE id = ANY($1)"),
            publisher,
            batch_size: 256,
            poll_interval: Duration::from_millis(200),
        }
    }
}

/// Publishes the rows of a [`PgOutbox`]; made by [`PgOutbox::relay`].
///
/// Each round claims the oldest unsent rows with `FOR UPDATE SKIP LOCKED`,
/// so several relays (in several processes) share the work without
/// publishing a row twice, publishes them in id order, marks them sent and
/// commits. A relay that dies before its commit leaves its rows unmarked and
/// unlocked: they are published again, and the inbox downstream absorbs the
/// duplicate.
///
/// Order per key: a round skips any row with an older unsent row of the same
/// topic and key that it did not claim itself (another relay holds it), so a
/// key's rows are published in id order even with several relays. Id order
/// is a key's commit order, and a row never becomes visible after a
/// higher-id row of its key was published, because writers of one key
/// serialise (see [`PgOutbox`'s order per key](PgOutbox#order-per-key-is-commit-order)).
///
/// # Lost connections
///
/// Each round takes a connection from the relay's [`Pool`] and returns it at
/// the end. A round whose connection is lost, or that finds none (the
/// database is restarting, say), fails with a retryable error and leaves its
/// rows unsent; [`run`](PgRelay::run) logs it and tries again after the poll
/// interval, on a new connection once the database takes one. A round that
/// published and then lost its connection before the commit publishes those
/// rows again (at least once, as after a crash).
#[derive(Debug)]
pub struct PgRelay<P> {
    pool: Pool,
    claim: String,
    mark: String,
    publisher: P,
    batch_size: i64,
    poll_interval: Duration,
}

impl<P: Publisher> PgRelay<P> {
    /// How many rows one round claims at most (default 256).
    pub fn batch_size(mut self, n: usize) -> Self {
        self.batch_size = i64::try_from(n.max(1)).unwrap_or(i64::MAX);
        self
    }

    /// How long [`run`](Self::run) waits when there is nothing to publish,
    /// or after a failure (default 200 ms).
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// Publishes one batch of unsent rows and marks them sent; returns how
    /// many rows were published.
    ///
    /// # Errors
    ///
    /// [`Error::PostgresPool`] when no connection can be had,
    /// [`Error::Postgres`], a row that cannot be read back
    /// ([`Error::InvalidOutboxRow`]), or the publisher's error; the rows stay
    /// unsent.
    pub async fn relay_once(&mut self) -> Result<usize> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let claim = tx.prepare_cached(&self.claim).await?;
        let rows = tx.query(&claim, &[&self.batch_size]).await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let mut ids = Vec::with_capacity(rows.len());
        let mut records = Vec::with_capacity(rows.len());
        for row in rows {
            let id: i64 = row.get(0);
            let names: Vec<String> = row.get(3);
            let values: Vec<Vec<u8>> = row.get(4);
            if names.len() != values.len() {
                return Err(Error::InvalidOutboxRow {
                    id,
                    reason: "header names and values differ in number".into(),
                });
            }
            ids.push(id);
            records.push((
                row.get::<_, String>(1),
                Record {
                    key: row.get(2),
                    headers: names.into_iter().zip(values).collect(),
                    payload: row.get(5),
                },
            ));
        }
        publish_in_order(&self.publisher, records).await?;
        let mark = tx.prepare_cached(&self.mark).await?;
        tx.execute(&mark, &[&ids]).await?;
        tx.commit().await?;
        Ok(ids.len())
    }

    /// Publishes rows until `shutdown` resolves, polling when idle; then
    /// publishes what is left once. A failed round (a lost connection, the
    /// database or the publisher unavailable) is logged and tried again after
    /// the poll interval: the relay outlives any outage.
    ///
    /// # Errors
    ///
    /// The error of the final round.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> Result<()> {
        tokio::pin!(shutdown);
        loop {
            let wait = match self.relay_once().await {
                Ok(n) if n > 0 => continue,
                Ok(_) => self.poll_interval,
                Err(e) => {
                    tracing::warn!(error = %e, "outbox relay round failed; trying again");
                    self.poll_interval
                }
            };
            tokio::select! {
                _ = &mut shutdown => break,
                _ = tokio::time::sleep(wait) => {}
            }
        }
        while self.relay_once().await? > 0 {}
        Ok(())
    }
}

/// The 32-bit FNV-1a hash of the concatenated `parts`, as a signed integer
/// (PostgreSQL's `int4`).
fn fnv1a32(parts: &[&[u8]]) -> i32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in parts.iter().flat_map(|p| p.iter()) {
        hash ^= u32::from(*byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    i32::from_ne_bytes(hash.to_ne_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_order_lock_is_fixed_per_table_topic_and_key() {
        // The published FNV-1a test vectors: the lock must never change
        // between versions, or writers of two versions would not wait for
        // each other.
        assert_eq!(fnv1a32(&[b""]) as u32, 0x811c_9dc5);
        assert_eq!(fnv1a32(&[b"a"]) as u32, 0xe40c_292c);
        assert_eq!(fnv1a32(&[b"fo", b"obar"]) as u32, 0xbf9c_f968);
        let outbox = PgOutbox::new("orders.outbox").unwrap();
        let other = PgOutbox::new("billing.outbox").unwrap();
        let lock = outbox.order_lock("orders", b"o-1");
        assert_eq!(lock, outbox.order_lock("orders", b"o-1"));
        assert_ne!(lock.1, outbox.order_lock("orders", b"o-2").1);
        assert_ne!(lock.1, outbox.order_lock("orders-x", b"o-1").1);
        assert_ne!(lock.0, other.order_lock("orders", b"o-1").0);
    }

    #[test]
    fn table_names_are_checked() {
        assert_eq!(Table::parse("outbox").unwrap().name, "outbox");
        let t = Table::parse("orders.outbox_2").unwrap();
        assert_eq!(
            (t.qualified.as_str(), t.name.as_str()),
            ("orders.outbox_2", "outbox_2")
        );
        for bad in ["", "a.b.c", "Outbox", "x; drop table y", "1x", "a."] {
            assert!(Table::parse(bad).is_err(), "{bad}");
        }
    }
}
