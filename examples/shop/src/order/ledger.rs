//! Where the order service keeps its orders and its outbox: every change of an order and
//! the events it causes are written in one transaction, and a relay publishes the events.
//!
//! Two backends: the service's embedded store (the one-process default), and PostgreSQL
//! (`SHOP_POSTGRES_URL`), where the outbox is micro-events' `PgOutbox` and its relay.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use super::{Checkout, IllegalTransition, Order, OrderStatus};
use crate::events::{EventSink, OrderEvent};
use crate::store::{Store, Tx};

const ORDERS: &str = "orders";
const BY_KEY: &str = "orders-by-key";
const CHECKOUTS: &str = "checkouts";
const OUTBOX: &str = "outbox";
const META: &str = "meta";

/// An event to write, with the seed of its id (so that writing it again after a crash
/// gives the same id, which consumers drop).
pub(super) type Pending = (String, OrderEvent);

/// What came of [`Ledger::transition`].
#[derive(Debug)]
pub enum Transitioned {
    /// The order moved; here it is, moved.
    Moved(Order),
    /// It was there already: nothing was written.
    Already(Order),
    /// The status machine forbids the move: nothing was written.
    Refused(Order, IllegalTransition),
    /// There is no such order.
    Missing,
}

impl Transitioned {
    /// Logs a refused move or a missing order, which a caller that cannot do more
    /// about it only reports.
    pub fn warn_if_refused(&self, order_id: &str) {
        match self {
            Transitioned::Refused(_, error) => {
                tracing::warn!(order_id, %error, "status change refused")
            }
            Transitioned::Missing => tracing::warn!(order_id, "status change of a missing order"),
            Transitioned::Moved(_) | Transitioned::Already(_) => {}
        }
    }
}

/// The order store with its outbox.
#[derive(Clone)]
pub struct Ledger {
    backend: Arc<Backend>,
}

enum Backend {
    Embedded {
        store: Store,
        sink: Arc<dyn EventSink>,
        wake: Notify,
    },
    #[cfg(feature = "real-servers")]
    Postgres(Box<postgres::PgLedger>),
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &*self.backend {
            Backend::Embedded { store, .. } => f.debug_tuple("Embedded").field(store).finish(),
            #[cfg(feature = "real-servers")]
            Backend::Postgres(pg) => f.debug_tuple("Postgres").field(pg).finish(),
        }
    }
}

fn append_events(tx: &mut Tx<'_>, events: Vec<Pending>) -> anyhow::Result<()> {
    let mut next: u64 = tx.get(META, "outbox-seq")?.unwrap_or(0);
    for (id, event) in events {
        let envelope = event.envelope(&id)?;
        tx.put(OUTBOX, &format!("{next:020}"), &envelope)?;
        next += 1;
    }
    tx.put(META, "outbox-seq", &next)
}

impl Ledger {
    /// Orders in the service's embedded store; the relay delivers events to `sink`.
    pub fn embedded(store: Store, sink: Arc<dyn EventSink>) -> Self {
        Self {
            backend: Arc::new(Backend::Embedded {
                store,
                sink,
                wake: Notify::new(),
            }),
        }
    }

    /// Orders in PostgreSQL on connections of `pool`, in `schema` (created if
    /// missing); the relay publishes events to `topic` with `publisher`.
    ///
    /// # Errors
    ///
    /// When PostgreSQL cannot be reached or the schema is not a plain lowercase name.
    #[cfg(feature = "real-servers")]
    pub async fn postgres(
        pool: micro_events::postgres::Pool,
        schema: &str,
        publisher: Arc<dyn micro_events::Publisher>,
        topic: String,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            backend: Arc::new(Backend::Postgres(Box::new(
                postgres::PgLedger::new(pool, schema, publisher, topic).await?,
            ))),
        })
    }

    /// What readiness checks: that PostgreSQL can be reached, for orders kept there.
    pub fn health_checks(&self) -> Vec<micro_core::health::HealthCheck> {
        match &*self.backend {
            Backend::Embedded { .. } => Vec::new(),
            #[cfg(feature = "real-servers")]
            Backend::Postgres(pg) => vec![crate::store::postgres::health_check(&pg.pool)],
        }
    }

    /// The order with this id.
    pub async fn order(&self, order_id: &str) -> anyhow::Result<Option<Order>> {
        match &*self.backend {
            Backend::Embedded { store, .. } => store.get(ORDERS, order_id),
            #[cfg(feature = "real-servers")]
            Backend::Postgres(pg) => pg.order(order_id).await,
        }
    }

    /// Every order.
    pub async fn all(&self) -> anyhow::Result<Vec<Order>> {
        match &*self.backend {
            Backend::Embedded { store, .. } => Ok(store
                .list::<Order>(ORDERS, "")?
                .into_iter()
                .map(|(_, o)| o)
                .collect()),
            #[cfg(feature = "real-servers")]
            Backend::Postgres(pg) => pg.all().await,
        }
    }

    /// The order placed with this `user/key`.
    pub async fn by_key(&self, index: &str) -> anyhow::Result<Option<Order>> {
        match &*self.backend {
            Backend::Embedded { store, .. } => match store.get::<String>(BY_KEY, index)? {
                Some(id) => store.get(ORDERS, &id),
                None => Ok(None),
            },
            #[cfg(feature = "real-servers")]
            Backend::Postgres(pg) => pg.by_key(index).await,
        }
    }

    /// What the saga of an order needs, kept until the saga started.
    pub async fn checkout(&self, order_id: &str) -> anyhow::Result<Option<Checkout>> {
        match &*self.backend {
            Backend::Embedded { store, .. } => store.get(CHECKOUTS, order_id),
            #[cfg(feature = "real-servers")]
            Backend::Postgres(pg) => pg.checkout(order_id).await,
        }
    }

    /// Writes a new order with its checkout and events, unless an order with the same
    /// `index` exists: then that one is answered, and `false`.
    pub async fn place(
        &self,
        index: &str,
        order: &Order,
        checkout: &Checkout,
        events: Vec<Pending>,
    ) -> anyhow::Result<(Order, bool)> {
        let placed = match &*self.backend {
            Backend::Embedded { store, .. } => store.write(|tx| {
                // Two requests with one key may race: the first to commit wins.
                if let Some(existing) = tx.get::<String>(BY_KEY, index)? {
                    let order = tx
                        .get::<Order>(ORDERS, &existing)?
                        .ok_or_else(|| anyhow::anyhow!("an order index points nowhere"))?;
                    return Ok((order, false));
                }
                tx.put(ORDERS, &order.id, order)?;
                tx.put(BY_KEY, index, &order.id)?;
                tx.put(CHECKOUTS, &order.id, checkout)?;
                append_events(tx, events)?;
                Ok((order.clone(), true))
            })?,
            #[cfg(feature = "real-servers")]
            Backend::Postgres(pg) => pg.place(index, order, checkout, events).await?,
        };
        self.wake();
        Ok(placed)
    }

    /// Applies `change` to the order, writing the order and the events it returns
    /// together. A change that returns `None` writes nothing. Only
    /// [`transition`](Self::transition) changes orders.
    async fn update(
        &self,
        order_id: &str,
        change: impl FnOnce(&mut Order) -> Option<Vec<Pending>>,
    ) -> anyhow::Result<Option<Order>> {
        let written = match &*self.backend {
            Backend::Embedded { store, .. } => store.write(|tx| {
                let Some(mut order) = tx.get::<Order>(ORDERS, order_id)? else {
                    return Ok(None);
                };
                let Some(events) = change(&mut order) else {
                    return Ok(Some(order));
                };
                tx.put(ORDERS, order_id, &order)?;
                append_events(tx, events)?;
                Ok(Some(order))
            })?,
            #[cfg(feature = "real-servers")]
            Backend::Postgres(pg) => pg.update(order_id, change).await?,
        };
        self.wake();
        Ok(written)
    }

    /// Moves the order to `to` for `reason`, the one place where an order's status is
    /// written: the move is checked by the status machine ([`Order::transition`]), and
    /// the order, the `payment_id` it records (when given) and the events `events`
    /// makes of the moved order are written in one transaction. An order already at
    /// `to` (a step run again after a crash) or whose move is illegal is left as it is.
    pub async fn transition(
        &self,
        order_id: &str,
        to: OrderStatus,
        reason: &str,
        payment_id: Option<&str>,
        events: impl FnOnce(&Order) -> Vec<Pending>,
    ) -> anyhow::Result<Transitioned> {
        let mut refused = None;
        let mut already = false;
        let order = self
            .update(order_id, |order| {
                if order.status == to {
                    already = true;
                    return None;
                }
                if let Err(illegal) = order.transition(to, reason) {
                    refused = Some(illegal);
                    return None;
                }
                if let Some(id) = payment_id {
                    order.payment_id = Some(id.to_owned());
                }
                Some(events(order))
            })
            .await?;
        Ok(match (order, refused) {
            (None, _) => Transitioned::Missing,
            (Some(order), Some(illegal)) => Transitioned::Refused(order, illegal),
            (Some(order), None) if already => Transitioned::Already(order),
            (Some(order), None) => Transitioned::Moved(order),
        })
    }

    /// Writes one event.
    pub async fn event(&self, id: String, event: OrderEvent) -> anyhow::Result<()> {
        match &*self.backend {
            Backend::Embedded { store, .. } => {
                store.write(|tx| append_events(tx, vec![(id, event)]))?
            }
            #[cfg(feature = "real-servers")]
            Backend::Postgres(pg) => pg.event(id, event).await?,
        }
        self.wake();
        Ok(())
    }

    /// Events written but not yet published.
    pub async fn undelivered(&self) -> anyhow::Result<usize> {
        match &*self.backend {
            Backend::Embedded { store, .. } => {
                Ok(store.list::<serde_json::Value>(OUTBOX, "")?.len())
            }
            #[cfg(feature = "real-servers")]
            Backend::Postgres(pg) => pg.undelivered().await,
        }
    }

    fn wake(&self) {
        match &*self.backend {
            Backend::Embedded { wake, .. } => wake.notify_one(),
            // micro-events' relay polls the table.
            #[cfg(feature = "real-servers")]
            Backend::Postgres(_) => {}
        }
    }

    /// Publishes the outbox in order, forever; each event is marked (or removed) once the
    /// bus confirmed it. Run it in a task; abort the task to stop.
    pub async fn relay(self) {
        match &*self.backend {
            Backend::Embedded { store, sink, wake } => loop {
                match store.list::<micro_events::Event<OrderEvent>>(OUTBOX, "") {
                    Ok(pending) => {
                        for (seq, event) in pending {
                            if let Err(error) = sink.deliver(&event).await {
                                tracing::warn!(%error, "an order event was not delivered; retrying");
                                break;
                            }
                            if let Err(error) = store.write(|tx| tx.delete(OUTBOX, &seq)) {
                                tracing::error!(%error, "a delivered event stays in the outbox");
                                break;
                            }
                        }
                    }
                    Err(error) => tracing::error!(%error, "the outbox cannot be read"),
                }
                let _ = tokio::time::timeout(Duration::from_millis(500), wake.notified()).await;
            },
            #[cfg(feature = "real-servers")]
            Backend::Postgres(pg) => pg.relay().await,
        }
    }
}

#[cfg(feature = "real-servers")]
mod postgres {
    use std::sync::Arc;

    use anyhow::Context as _;
    use micro_events::postgres::{PgOutbox, Pool};
    use micro_events::Publisher;
    use serde_json::Value;

    use super::Pending;
    use crate::order::{Checkout, Order};

    /// Orders in PostgreSQL: a table of documents with their idempotency index, and
    /// micro-events' outbox in the same schema. Each read and each transaction takes a
    /// connection of the pool.
    pub(super) struct PgLedger {
        pub(super) pool: Pool,
        schema: String,
        outbox: PgOutbox,
        publisher: Arc<dyn Publisher>,
        topic: String,
    }

    impl std::fmt::Debug for PgLedger {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("PgLedger")
                .field("schema", &self.schema)
                .field("topic", &self.topic)
                .finish_non_exhaustive()
        }
    }

    fn doc<T: serde::de::DeserializeOwned>(value: Value) -> anyhow::Result<T> {
        serde_json::from_value(value).context("decoding a stored order")
    }

    impl PgLedger {
        pub(super) async fn new(
            pool: Pool,
            schema: &str,
            publisher: Arc<dyn Publisher>,
            topic: String,
        ) -> anyhow::Result<Self> {
            anyhow::ensure!(
                crate::store::postgres::plain(schema),
                "`{schema}` is not a plain lowercase schema name"
            );
            let client = pool.get().await.context("connecting to PostgreSQL")?;
            client
                .batch_execute(&format!(
                    "CREATE SCHEMA IF NOT EXISTS {schema};
                     CREATE TABLE IF NOT EXISTS {schema}.orders (
                         id text PRIMARY KEY,
                         user_id text NOT NULL,
                         idempotency text NOT NULL UNIQUE,
                         doc jsonb NOT NULL,
                         checkout jsonb NOT NULL,
                         created_at timestamptz NOT NULL DEFAULT now()
                     );"
                ))
                .await?;
            let outbox = PgOutbox::new(&format!("{schema}.outbox"))?;
            outbox.create_table(&client).await?;
            drop(client);
            Ok(Self {
                pool,
                schema: schema.to_owned(),
                outbox,
                publisher,
                topic,
            })
        }

        pub(super) async fn order(&self, id: &str) -> anyhow::Result<Option<Order>> {
            let s = &self.schema;
            let row = self
                .pool
                .get()
                .await?
                .query_opt(&format!("SELECT doc FROM {s}.orders WHERE id = $1"), &[&id])
                .await?;
            row.map(|r| doc(r.get(0))).transpose()
        }

        pub(super) async fn all(&self) -> anyhow::Result<Vec<Order>> {
            let s = &self.schema;
            let rows = self
                .pool
                .get()
                .await?
                .query(
                    &format!("SELECT doc FROM {s}.orders ORDER BY created_at"),
                    &[],
                )
                .await?;
            rows.into_iter().map(|r| doc(r.get(0))).collect()
        }

        pub(super) async fn by_key(&self, index: &str) -> anyhow::Result<Option<Order>> {
            let s = &self.schema;
            let row = self
                .pool
                .get()
                .await?
                .query_opt(
                    &format!("SELECT doc FROM {s}.orders WHERE idempotency = $1"),
                    &[&index],
                )
                .await?;
            row.map(|r| doc(r.get(0))).transpose()
        }

        pub(super) async fn checkout(&self, id: &str) -> anyhow::Result<Option<Checkout>> {
            let s = &self.schema;
            let row = self
                .pool
                .get()
                .await?
                .query_opt(
                    &format!("SELECT checkout FROM {s}.orders WHERE id = $1"),
                    &[&id],
                )
                .await?;
            row.map(|r| doc(r.get(0))).transpose()
        }

        async fn write_events(
            &self,
            tx: &tokio_postgres::Transaction<'_>,
            events: Vec<Pending>,
        ) -> anyhow::Result<()> {
            for (id, event) in events {
                let key = event.order_id().to_owned();
                let envelope = event.envelope(&id)?;
                self.outbox.write(tx, &self.topic, &key, &envelope).await?;
            }
            Ok(())
        }

        pub(super) async fn place(
            &self,
            index: &str,
            order: &Order,
            checkout: &Checkout,
            events: Vec<Pending>,
        ) -> anyhow::Result<(Order, bool)> {
            let s = &self.schema;
            let mut client = self.pool.get().await?;
            let tx = client.transaction().await?;
            let inserted = tx
                .execute(
                    &format!(
                        "INSERT INTO {s}.orders (id, user_id, idempotency, doc, checkout)
                         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (idempotency) DO NOTHING"
                    ),
                    &[
                        &order.id,
                        &order.user_id,
                        &index,
                        &serde_json::to_value(order)?,
                        &serde_json::to_value(checkout)?,
                    ],
                )
                .await?;
            if inserted == 0 {
                // Another process placed it first: the unique index says so.
                let row = tx
                    .query_one(
                        &format!("SELECT doc FROM {s}.orders WHERE idempotency = $1"),
                        &[&index],
                    )
                    .await?;
                tx.commit().await?;
                return Ok((doc(row.get(0))?, false));
            }
            self.write_events(&tx, events).await?;
            tx.commit().await?;
            Ok((order.clone(), true))
        }

        pub(super) async fn update(
            &self,
            id: &str,
            change: impl FnOnce(&mut Order) -> Option<Vec<Pending>>,
        ) -> anyhow::Result<Option<Order>> {
            let s = &self.schema;
            let mut client = self.pool.get().await?;
            let tx = client.transaction().await?;
            let Some(row) = tx
                .query_opt(
                    &format!("SELECT doc FROM {s}.orders WHERE id = $1 FOR UPDATE"),
                    &[&id],
                )
                .await?
            else {
                return Ok(None);
            };
            let mut order: Order = doc(row.get(0))?;
            let Some(events) = change(&mut order) else {
                return Ok(Some(order));
            };
            tx.execute(
                &format!("UPDATE {s}.orders SET doc = $2 WHERE id = $1"),
                &[&id, &serde_json::to_value(&order)?],
            )
            .await?;
            self.write_events(&tx, events).await?;
            tx.commit().await?;
            Ok(Some(order))
        }

        pub(super) async fn event(
            &self,
            id: String,
            event: crate::events::OrderEvent,
        ) -> anyhow::Result<()> {
            let mut client = self.pool.get().await?;
            let tx = client.transaction().await?;
            self.write_events(&tx, vec![(id, event)]).await?;
            tx.commit().await?;
            Ok(())
        }

        pub(super) async fn undelivered(&self) -> anyhow::Result<usize> {
            let client = self.pool.get().await?;
            Ok(usize::try_from(self.outbox.unsent(&client).await?)?)
        }

        /// micro-events' relay on connections of the pool: claims unsent rows with
        /// `FOR UPDATE SKIP LOCKED`, so several order processes can each run one. A lost
        /// connection fails one round, and the relay goes on with a new one.
        pub(super) async fn relay(&self) {
            let relay = self.outbox.relay(self.pool.clone(), self.publisher.clone());
            if let Err(error) = relay.run(std::future::pending::<()>()).await {
                tracing::error!(%error, "the outbox relay stopped");
            }
        }
    }
}
