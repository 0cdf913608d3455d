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

/// Connections to PostgreSQL for the services that keep their data there.
#[cfg(feature = "real-servers")]
pub mod postgres {
    use anyhow::Context as _;
    use tokio_postgres::{Client, NoTls};

    /// Connects to `url`; the connection runs in a task of its own.
    ///
    /// # Errors
    ///
    /// When PostgreSQL cannot be reached.
    pub async fn connect(url: &str) -> anyhow::Result<Client> {
        let (client, connection) = tokio_postgres::connect(url, NoTls)
            .await
            .context("connecting to PostgreSQL")?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::error!(%error, "a PostgreSQL connection failed");
            }
        });
        Ok(client)
    }

    /// Connects to `url` and creates `schema` if it is missing.
    ///
    /// # Errors
    ///
    /// When PostgreSQL cannot be reached, or `schema` is not a plain lowercase name.
    pub async fn connect_to_schema(url: &str, schema: &str) -> anyhow::Result<Client> {
        let plain = !schema.is_empty()
            && !schema.starts_with(|c: char| c.is_ascii_digit())
            && schema
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        anyhow::ensure!(plain, "`{schema}` is not a plain lowercase schema name");
        let client = connect(url).await?;
        client
            .batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {schema}"))
            .await?;
        Ok(client)
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
