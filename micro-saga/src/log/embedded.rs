use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{
    refuse_lease, validate_append, Append, LogError, NewSaga, SagaLog, SagaRecord, SagaSummary,
};
use crate::definition::BoxFuture;
use crate::state::SagaStatus;
use crate::transition::Transition;

/// saga id → the saga's [`Header`], as JSON.
const SAGAS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("sagas");
/// (saga id, sequence number from 1) → a [`Transition`], as JSON.
const TRANSITIONS: TableDefinition<'_, (&str, u64), &[u8]> = TableDefinition::new("transitions");
/// (status, insertion order) → saga id: the index behind the listings.
const BY_STATUS: TableDefinition<'_, (&str, u64), &str> = TableDefinition::new("by_status");
/// Counters; `next_order` numbers sagas in the order they were created.
const META: TableDefinition<'_, &str, u64> = TableDefinition::new("meta");

/// A saga log in a [redb](https://docs.rs/redb) file on local disk: the
/// durable default for a service that runs as one process.
///
/// Every [`create`](SagaLog::create) and [`append`](SagaLog::append) is one
/// redb write transaction, committed with an `fsync` before the call
/// returns, so a transition the orchestrator has been told is recorded
/// survives a crash of the process or of the machine. Reopening the file
/// with [`open`](Self::open) finds every saga as it was left, and
/// [`Orchestrator::recover`](crate::Orchestrator::recover) resumes the
/// unfinished ones.
///
/// redb allows one write transaction at a time, which makes the optimistic
/// version check trivially race free: the check and the write happen inside
/// the same transaction. Reads run on snapshots, concurrently with writes.
/// Database calls block, so they run on tokio's blocking thread pool.
///
/// # Why redb
///
/// The embedded log needs crash-safe transactions on one local file, from a
/// library that every user compiles. redb is pure Rust (no C toolchain, as
/// RocksDB and SQLite bindings need), has a small dependency tree, a stable
/// file format since 1.0, ACID transactions over copy-on-write B-trees with
/// checksums, and MVCC reads. sled's file format is not stable, and an LSM
/// store such as fjall is built for write volumes a saga log does not have.
///
/// A file can be open in one process at a time; a second
/// [`open`](Self::open) of the same file fails while the first is alive.
/// The log is therefore single-process, and holds no leases
/// ([`SagaLog::supports_leases`] is `false`, and a fenced write is refused
/// with [`LogError::LeasesUnsupported`](super::LogError::LeasesUnsupported)):
/// within one process, an orchestrator drives each saga in one task, and
/// recovery skips the sagas it drives. Use one orchestrator per file.
pub struct EmbeddedSagaLog {
    db: Arc<Database>,
    path: PathBuf,
}

/// What the log keeps of a saga beside its transitions.
#[derive(Serialize, Deserialize)]
struct Header {
    definition: String,
    status: SagaStatus,
    context: Value,
    trace_parent: Option<String>,
    version: u64,
    order: u64,
}

impl EmbeddedSagaLog {
    /// Opens the log in the file at `path`, creating it if it does not
    /// exist.
    ///
    /// # Errors
    ///
    /// [`LogError::Embedded`] when the file cannot be created or opened, is
    /// not a redb database, or is open in another process.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, LogError> {
        let path = path.as_ref().to_owned();
        let db = Database::create(&path)?;
        let tx = db.begin_write()?;
        tx.open_table(SAGAS)?;
        tx.open_table(TRANSITIONS)?;
        tx.open_table(BY_STATUS)?;
        tx.open_table(META)?;
        tx.commit()?;
        Ok(EmbeddedSagaLog {
            db: Arc::new(db),
            path,
        })
    }

    /// The file the log is in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T, LogError>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> Result<T, LogError> + Send + 'static,
    {
        let db = self.db.clone();
        match tokio::task::spawn_blocking(move || f(&db)).await {
            Ok(result) => result,
            Err(err) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
            // Only a runtime shutting down cancels a blocking task.
            Err(_) => Err(LogError::Embedded(Box::new(redb::Error::Io(
                std::io::Error::other("the runtime shut down during a saga log call"),
            )))),
        }
    }

    fn list(db: &Database, statuses: &[SagaStatus]) -> Result<Vec<SagaSummary>, LogError> {
        let tx = db.begin_read()?;
        let index = tx.open_table(BY_STATUS)?;
        let sagas = tx.open_table(SAGAS)?;
        let mut found = Vec::new();
        for status in statuses {
            let s = status.as_str();
            for entry in index.range((s, 0)..=(s, u64::MAX))? {
                let (key, saga_id) = entry?;
                let saga_id = saga_id.value().to_owned();
                let Some(header) = sagas.get(saga_id.as_str())? else {
                    continue;
                };
                let header = decode::<Header>(&saga_id, header.value())?;
                found.push((
                    key.value().1,
                    SagaSummary::new(saga_id, header.definition, *status, header.version),
                ));
            }
        }
        found.sort_by_key(|(order, _)| *order);
        Ok(found.into_iter().map(|(_, s)| s).collect())
    }
}

fn decode<T: serde::de::DeserializeOwned>(saga_id: &str, bytes: &[u8]) -> Result<T, LogError> {
    serde_json::from_slice(bytes).map_err(|source| LogError::Corrupt {
        saga_id: saga_id.to_owned(),
        source,
    })
}

fn encode<T: Serialize>(saga_id: &str, value: &T) -> Result<Vec<u8>, LogError> {
    serde_json::to_vec(value).map_err(|source| LogError::Corrupt {
        saga_id: saga_id.to_owned(),
        source,
    })
}

impl fmt::Debug for EmbeddedSagaLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmbeddedSagaLog")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl SagaLog for EmbeddedSagaLog {
    fn create<'a>(&'a self, saga: &'a NewSaga) -> BoxFuture<'a, Result<(), LogError>> {
        let saga = saga.clone();
        Box::pin(self.blocking(move |db| {
            let id = saga.saga_id.as_str();
            let tx = db.begin_write()?;
            {
                let mut sagas = tx.open_table(SAGAS)?;
                if sagas.get(id)?.is_some() {
                    return Err(LogError::AlreadyExists {
                        saga_id: saga.saga_id.clone(),
                    });
                }
                let mut meta = tx.open_table(META)?;
                let order = meta.get("next_order")?.map_or(0, |v| v.value());
                meta.insert("next_order", order + 1)?;
                let header = Header {
                    definition: saga.definition.clone(),
                    status: SagaStatus::Running,
                    context: saga.context.clone(),
                    trace_parent: saga.trace_parent.clone(),
                    version: 1,
                    order,
                };
                sagas.insert(id, encode(id, &header)?.as_slice())?;
                tx.open_table(TRANSITIONS)?
                    .insert((id, 1), encode(id, &saga.started)?.as_slice())?;
                tx.open_table(BY_STATUS)?
                    .insert((SagaStatus::Running.as_str(), order), id)?;
            }
            tx.commit()?;
            Ok(())
        }))
    }

    fn append<'a>(&'a self, append: &'a Append) -> BoxFuture<'a, Result<u64, LogError>> {
        let append = append.clone();
        Box::pin(self.blocking(move |db| {
            validate_append(&append)?;
            refuse_lease(&append)?;
            let id = append.saga_id.as_str();
            let tx = db.begin_write()?;
            {
                let mut sagas = tx.open_table(SAGAS)?;
                let mut header = match sagas.get(id)? {
                    Some(bytes) => decode::<Header>(id, bytes.value())?,
                    None => {
                        return Err(LogError::NotFound {
                            saga_id: append.saga_id.clone(),
                        })
                    }
                };
                if header.version != append.expected_version {
                    return Err(LogError::Conflict {
                        saga_id: append.saga_id.clone(),
                        expected: append.expected_version,
                        actual: header.version,
                    });
                }
                let mut transitions = tx.open_table(TRANSITIONS)?;
                for (seq, t) in (header.version + 1..).zip(&append.transitions) {
                    transitions.insert((id, seq), encode(id, t)?.as_slice())?;
                }
                if header.status != append.status {
                    let mut index = tx.open_table(BY_STATUS)?;
                    index.remove((header.status.as_str(), header.order))?;
                    index.insert((append.status.as_str(), header.order), id)?;
                }
                header.status = append.status;
                header.version = append.new_version();
                header.context = append.context.clone();
                sagas.insert(id, encode(id, &header)?.as_slice())?;
            }
            tx.commit()?;
            Ok(append.new_version())
        }))
    }

    fn load<'a>(&'a self, saga_id: &'a str) -> BoxFuture<'a, Result<Option<SagaRecord>, LogError>> {
        let saga_id = saga_id.to_owned();
        Box::pin(self.blocking(move |db| {
            let id = saga_id.as_str();
            let tx = db.begin_read()?;
            let Some(header) = tx.open_table(SAGAS)?.get(id)? else {
                return Ok(None);
            };
            let header = decode::<Header>(id, header.value())?;
            let transitions = tx
                .open_table(TRANSITIONS)?
                .range((id, 1)..=(id, u64::MAX))?
                .map(|entry| decode::<Transition>(id, entry?.1.value()))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Some(SagaRecord::new(
                id,
                header.definition,
                header.status,
                header.context,
                header.trace_parent,
                transitions,
            )))
        }))
    }

    fn unfinished(&self) -> BoxFuture<'_, Result<Vec<SagaSummary>, LogError>> {
        Box::pin(
            self.blocking(|db| Self::list(db, &[SagaStatus::Running, SagaStatus::Compensating])),
        )
    }

    fn by_status(&self, status: SagaStatus) -> BoxFuture<'_, Result<Vec<SagaSummary>, LogError>> {
        Box::pin(self.blocking(move |db| Self::list(db, &[status])))
    }
}
