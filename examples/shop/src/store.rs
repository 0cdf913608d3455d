//! Each service's own storage: JSON documents in named tables of a redb database, on local
//! disk (state survives a restart) or in memory (tests).
//!
//! redb is an embedded, transactional key-value store in pure Rust: one file, ACID write
//! transactions, no server. A service keeps its tables in its own file, so services share
//! no data, as in the reference architecture. Keys are strings; a key prefix such as
//! `"user-42/"` groups the documents of one owner for [`Tx::list`].

use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use redb::{backends::InMemoryBackend, Database, ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// A service's database.
#[derive(Clone)]
pub struct Store {
    db: Arc<Database>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

fn table(name: &str) -> TableDefinition<'_, &'static str, &'static [u8]> {
    TableDefinition::new(name)
}

impl Store {
    /// Opens (or creates) the database file at `path`, creating its directory.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let db = Database::create(path).with_context(|| format!("opening {}", path.display()))?;
        Ok(Self { db: Arc::new(db) })
    }

    /// A database that lives as long as the process.
    pub fn in_memory() -> anyhow::Result<Self> {
        let db = Database::builder().create_with_backend(InMemoryBackend::new())?;
        Ok(Self { db: Arc::new(db) })
    }

    /// Runs `f` in one write transaction: everything it writes is committed together, or
    /// nothing is when it fails.
    pub fn write<R>(&self, f: impl FnOnce(&mut Tx<'_>) -> anyhow::Result<R>) -> anyhow::Result<R> {
        let txn = self.db.begin_write()?;
        let result = f(&mut Tx { txn: &txn })?;
        txn.commit()?;
        Ok(result)
    }

    /// Reads one document.
    pub fn get<T: DeserializeOwned>(&self, name: &str, key: &str) -> anyhow::Result<Option<T>> {
        let txn = self.db.begin_read()?;
        let table = match txn.open_table(table(name)) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(error) => return Err(error.into()),
        };
        let value = table.get(key)?;
        value
            .map(|v| serde_json::from_slice(v.value()).context("decoding a stored document"))
            .transpose()
    }

    /// Reads every document whose key starts with `prefix`, in key order.
    pub fn list<T: DeserializeOwned>(
        &self,
        name: &str,
        prefix: &str,
    ) -> anyhow::Result<Vec<(String, T)>> {
        let txn = self.db.begin_read()?;
        let table = match txn.open_table(table(name)) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(error) => return Err(error.into()),
        };
        collect(table.range(prefix..)?, prefix)
    }
}

fn collect<T: DeserializeOwned>(
    range: redb::Range<'_, &'static str, &'static [u8]>,
    prefix: &str,
) -> anyhow::Result<Vec<(String, T)>> {
    let mut found = Vec::new();
    for entry in range {
        let (key, value) = entry?;
        if !key.value().starts_with(prefix) {
            break;
        }
        found.push((
            key.value().to_owned(),
            serde_json::from_slice(value.value()).context("decoding a stored document")?,
        ));
    }
    Ok(found)
}

/// A write transaction; see [`Store::write`].
pub struct Tx<'a> {
    txn: &'a redb::WriteTransaction,
}

impl std::fmt::Debug for Tx<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tx").finish_non_exhaustive()
    }
}

impl Tx<'_> {
    /// Reads one document, seeing this transaction's writes.
    pub fn get<T: DeserializeOwned>(&self, name: &str, key: &str) -> anyhow::Result<Option<T>> {
        let table = self.txn.open_table(table(name))?;
        let value = table.get(key)?;
        value
            .map(|v| serde_json::from_slice(v.value()).context("decoding a stored document"))
            .transpose()
    }

    /// Writes one document.
    pub fn put<T: Serialize>(&mut self, name: &str, key: &str, value: &T) -> anyhow::Result<()> {
        let bytes = serde_json::to_vec(value)?;
        self.txn
            .open_table(table(name))?
            .insert(key, bytes.as_slice())?;
        Ok(())
    }

    /// Removes one document; whether it was there.
    pub fn delete(&mut self, name: &str, key: &str) -> anyhow::Result<bool> {
        Ok(self.txn.open_table(table(name))?.remove(key)?.is_some())
    }

    /// Reads every document whose key starts with `prefix`, in key order.
    pub fn list<T: DeserializeOwned>(
        &self,
        name: &str,
        prefix: &str,
    ) -> anyhow::Result<Vec<(String, T)>> {
        let table = self.txn.open_table(table(name))?;
        collect(table.range(prefix..)?, prefix)
    }
}

/// Whether `error` says that the service's database cannot be reached now (no
/// connection to be had, or the one in use was lost): a request that met it is
/// answered `503`, worth another try, not `500`.
pub fn unreachable(error: &anyhow::Error) -> bool {
    #[cfg(feature = "real-servers")]
    {
        error.chain().any(postgres::lost)
    }
    #[cfg(not(feature = "real-servers"))]
    {
        let _ = error;
        false
    }
}

/// Connections to PostgreSQL for the services that keep their data there: a pool
/// per service that replaces the connections PostgreSQL closes, and a readiness check.
#[cfg(feature = "real-servers")]
pub mod postgres {
    use std::time::Duration;

    use anyhow::Context as _;
    use micro_core::health::HealthCheck;
    use micro_events::postgres::deadpool_postgres::{
        Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime,
    };
    use tokio_postgres::NoTls;

    /// How long an operation waits for a connection, and a new connection for
    /// PostgreSQL, before the request is answered `503`.
    const WAIT: Duration = Duration::from_secs(2);

    /// A pool of connections to `url`, named `service` in `pg_stat_activity` unless the
    /// url names them (`?application_name=`). A connection is checked with an empty
    /// query each time it is taken, so one that PostgreSQL closed while it was idle is
    /// dropped and a new one made before the request uses it.
    ///
    /// # Errors
    ///
    /// When `url` is not a PostgreSQL url.
    pub fn pool(url: &str, service: &str) -> anyhow::Result<Pool> {
        let mut config: tokio_postgres::Config =
            url.parse().context("reading the PostgreSQL url")?;
        if config.get_application_name().is_none() {
            config.application_name(service);
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(WAIT);
        }
        let manager = ManagerConfig {
            recycling_method: RecyclingMethod::Verified,
        };
        Pool::builder(Manager::from_config(config, NoTls, manager))
            .max_size(8)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(WAIT))
            .create_timeout(Some(WAIT))
            .recycle_timeout(Some(WAIT))
            .build()
            .context("making the PostgreSQL pool")
    }

    /// A pool of connections to `url` (see [`pool`]), with `schema` created if it is
    /// missing.
    ///
    /// # Errors
    ///
    /// When PostgreSQL cannot be reached, or `schema` is not a plain lowercase name.
    pub async fn pool_with_schema(url: &str, schema: &str, service: &str) -> anyhow::Result<Pool> {
        anyhow::ensure!(
            plain(schema),
            "`{schema}` is not a plain lowercase schema name"
        );
        let pool = pool(url, service)?;
        pool.get()
            .await
            .context("connecting to PostgreSQL")?
            .batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {schema}"))
            .await?;
        Ok(pool)
    }

    /// Whether `schema` can be written into SQL unquoted: lowercase letters, digits and
    /// `_`, not starting with a digit.
    pub fn plain(schema: &str) -> bool {
        !schema.is_empty()
            && !schema.starts_with(|c: char| c.is_ascii_digit())
            && schema
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    }

    /// The readiness check of a service whose data is behind `pool`: it fails while
    /// PostgreSQL cannot be reached, and passes again by itself once it can.
    pub fn health_check(pool: &Pool) -> HealthCheck {
        micro_events::postgres::health_check(pool)
    }

    /// Whether `error` is a lost or unobtainable connection.
    pub(super) fn lost(error: &(dyn std::error::Error + 'static)) -> bool {
        if error.is::<PoolError>() {
            return true;
        }
        let Some(error) = error.downcast_ref::<tokio_postgres::Error>() else {
            return false;
        };
        if error.is_closed() {
            return true;
        }
        match error.code() {
            // Connection exceptions, the server shutting down or terminating the
            // backend, too many connections.
            Some(code) => {
                let code = code.code();
                code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03" | "53300")
            }
            None => std::error::Error::source(error).is_some_and(|e| e.is::<std::io::Error>()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_atomic_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("svc.redb");
        {
            let store = Store::open(&path).unwrap();
            store
                .write(|tx| {
                    tx.put("stock", "SKU-1", &5)?;
                    tx.put("stock", "SKU-2", &7)
                })
                .unwrap();
            let failed: anyhow::Result<()> = store.write(|tx| {
                tx.put("stock", "SKU-1", &0)?;
                anyhow::bail!("rolled back")
            });
            assert!(failed.is_err());
            assert_eq!(store.get::<i64>("stock", "SKU-1").unwrap(), Some(5));
        }
        let store = Store::open(&path).unwrap();
        let all: Vec<(String, i64)> = store.list("stock", "SKU-").unwrap();
        assert_eq!(all, [("SKU-1".to_owned(), 5), ("SKU-2".to_owned(), 7)]);
        assert_eq!(store.list::<i64>("stock", "SKU-2").unwrap().len(), 1);
        assert!(store.get::<i64>("missing", "x").unwrap().is_none());
    }
}
